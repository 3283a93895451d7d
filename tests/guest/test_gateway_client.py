"""The CVM's registration client against tunnel's real RPC server over real TLS (127.0.0.1).

The gateway presents its RA-TLS certificate (``RpcIdentity`` through a simulated TDX
backend); impostors present a plain certificate, an attested certificate of another app,
or a KMS-issued certificate. The CVM's client certificate is RA-TLS too, signed by the CA
the server's TLS layer asks for. Every refusal must leave the registry empty: the request
was never sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.attest.collateral import SimCollateralSource
from gateway.control.registration import Advertised
from gateway.control.rpc_identity import RpcIdentity, RpcIdentityOptions
from gateway.control.tls_server import TlsCredentials
from gateway.guest.gateway_cache import CacheError, GatewayKeys, GatewayKeyStore, TeeCertIssuer
from gateway.guest.gateway_client import (
    GatewayClient,
    GatewayRejected,
    GatewayTrust,
    GatewayUnavailable,
    PortPolicy,
    RegisterResponse,
    parse_app_ids,
    rpc_base,
)
from gateway.guest.http1 import parse_http_reply
from gateway.registry.service import Registry
from gateway.registry.sqlite import SqliteStore
from gateway.tee.sim_pki import SimPki
from gateway.tunnel.keys import generate_private_key, public_key
from tests.helpers.gateway_rpc import (
    CA,
    CVM_APP,
    GW_APP,
    OTHER_APP,
    PLAN,
    RpcServer,
    kms_server_files,
    make_ca,
    measured_tee,
    plain_server_files,
    serve_rpc,
    write_ca,
)
from tests.helpers.processes import free_port

GW_KEY = public_key(generate_private_key())
ADV = Advertised(GW_KEY, "10.0.0.1/24", "192.0.2.1:51820")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> SimPki:
    return SimPki.load_or_create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def client_ca() -> CA:
    return make_ca("CVM client CA")


@pytest.fixture
def keys(pki: SimPki, client_ca: CA, tmp_path: Path) -> GatewayKeys:
    tee = measured_tee(pki, tmp_path / "cvm-tee", CVM_APP, b"\x16" * 20)
    store = GatewayKeyStore(tmp_path / "cvm")
    return asyncio.run(store.get_or_create(TeeCertIssuer(tee, client_ca), int(time.time())))


def trust(pki: SimPki, app: str = GW_APP, kms_root: str | None = None) -> GatewayTrust:
    return GatewayTrust(
        parse_app_ids(app), SimCollateralSource(pki), pki.root_ca_der, kms_root_pem=kms_root
    )


@contextlib.contextmanager
def _server(
    tmp_path: Path, pki: SimPki, client_ca: CA, ctx_kind: str, **kw: str
) -> Iterator[RpcServer]:
    ca_file, _ = write_ca(client_ca, tmp_path / "gw", "client-ca")
    if ctx_kind == "ratls":
        tee = measured_tee(pki, tmp_path / "gw-tee", kw.get("app", GW_APP), b"\x99" * 20)
        ctx = RpcIdentity(tee, tmp_path / "gw-rpc").credentials(ca_file)
    elif ctx_kind == "plain":
        ctx = TlsCredentials(*plain_server_files(tmp_path / "plain"), ca_file)
    else:
        kms = make_ca("KMS root")
        (tmp_path / "kms-root.pem").write_bytes(kms[0].public_bytes(serialization.Encoding.PEM))
        files = kms_server_files(tmp_path / "kms", kms, kw.get("app", GW_APP))
        ctx = TlsCredentials(*files, ca_file)
    store = SqliteStore(tmp_path / "registry.sqlite3")
    registry = Registry(store, PLAN, clock=time.time)
    with serve_rpc(ctx, pki, registry, ADV, port=free_port()) as server:
        yield server
    store.close()


def register(client: GatewayClient, server: RpcServer, keys: GatewayKeys) -> RegisterResponse:
    answer, _ = asyncio.run(client.register(f"https://127.0.0.1:{server.port}", keys))
    return answer


def test_registers_with_the_attested_gateway(
    pki: SimPki, client_ca: CA, keys: GatewayKeys, tmp_path: Path
) -> None:
    with _server(tmp_path, pki, client_ca, "ratls") as server:
        client = GatewayClient(trust(pki))
        policy = PortPolicy(((443, True), (80, False)), restrict_mode=True)
        answer, verified = asyncio.run(
            client.register(f"https://127.0.0.1:{server.port}/", keys, policy)
        )
        assert verified.method == "ratls" and verified.app_id.hex() == GW_APP
        assert answer.servers[0].pk == GW_KEY and str(answer.servers[0].ip) == "10.0.0.1/24"
        assert answer.servers[0].endpoint == "192.0.2.1:51820"
        assert PLAN.assignable(answer.client_ip)
        assert answer.agent["internal_port"] == 8090 and answer.gateways
        (record,) = server.registry.store.list_instances()
        assert record.instance_id == "16" * 20 and record.app_id == CVM_APP
        assert record.public_key == keys.wg_pk and record.ip == answer.client_ip
        assert record.port_policy == policy.to_json()
        # again: same address (upstream keeps a valid IP on re-registration)
        assert register(client, server, keys).client_ip == answer.client_ip


def test_plain_certificate_is_refused_before_sending(
    pki: SimPki, client_ca: CA, keys: GatewayKeys, tmp_path: Path
) -> None:
    with _server(tmp_path, pki, client_ca, "plain") as server:
        with pytest.raises(GatewayRejected, match="not attested"):
            register(GatewayClient(trust(pki)), server, keys)
        assert server.instances() == []


def test_attested_gateway_of_another_app_is_refused(
    pki: SimPki, client_ca: CA, keys: GatewayKeys, tmp_path: Path
) -> None:
    with _server(tmp_path, pki, client_ca, "ratls", app=OTHER_APP) as server:
        with pytest.raises(GatewayRejected, match=f"app {OTHER_APP} is not the pinned"):
            register(GatewayClient(trust(pki)), server, keys)
        assert server.instances() == []


def test_quote_under_another_root_is_refused(
    pki: SimPki, client_ca: CA, keys: GatewayKeys, tmp_path: Path
) -> None:
    """A gateway whose quote chains to a root we were not told to trust (a second sim)."""
    other = SimPki.create()
    with _server(tmp_path, other, client_ca, "ratls") as server:
        with pytest.raises(GatewayRejected, match="does not verify"):
            register(GatewayClient(trust(pki)), server, keys)
        assert server.instances() == []


def test_kms_chained_gateway_only_when_configured(
    pki: SimPki, client_ca: CA, keys: GatewayKeys, tmp_path: Path
) -> None:
    with _server(tmp_path, pki, client_ca, "kms") as server:
        url = f"https://127.0.0.1:{server.port}"
        with pytest.raises(GatewayRejected, match="not attested"):
            asyncio.run(GatewayClient(trust(pki)).register(url, keys))
        root = (tmp_path / "kms-root.pem").read_text()
        answer, verified = asyncio.run(GatewayClient(trust(pki, kms_root=root)).register(url, keys))
        assert verified.method == "kms_cert" and answer.client_ip
        assert len(server.instances()) == 1
        wrong = make_ca("another KMS")[0].public_bytes(serialization.Encoding.PEM).decode()
        with pytest.raises(GatewayRejected, match="TLS"):
            asyncio.run(GatewayClient(trust(pki, kms_root=wrong)).register(url, keys))
        with pytest.raises(GatewayRejected, match="not the pinned"):
            asyncio.run(GatewayClient(trust(pki, app=OTHER_APP, kms_root=root)).register(url, keys))


def test_unreachable_gateway_is_unavailable(pki: SimPki, keys: GatewayKeys) -> None:
    client = GatewayClient(trust(pki), timeout=2)
    with pytest.raises(GatewayUnavailable, match="cannot connect"):
        asyncio.run(client.register(f"https://127.0.0.1:{free_port()}", keys))


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        (GW_APP, True),
        ("0x" + GW_APP.upper(), True),
        (f"{GW_APP}, {OTHER_APP}", True),
        ("any", False),
        ("", False),
        (GW_APP[:10], False),  # upstream's substring match would accept a fragment
        ("zz" * 20, False),
    ],
)
def test_parse_app_ids(text: str, ok: bool) -> None:
    if ok:
        assert bytes.fromhex(GW_APP) in parse_app_ids(text)
    else:
        with pytest.raises(ValueError):
            parse_app_ids(text)


@pytest.mark.parametrize(
    "doc",
    [
        {},
        {"wg": {"client_ip": "10.0.0.300", "servers": []}},
        {"wg": {"client_ip": "10.0.0.2", "servers": []}},
        {"wg": {"client_ip": "10.0.0.2", "servers": [{"pk": "x", "ip": "10.0.0.1/24"}]}},
        {
            "wg": {
                "client_ip": "10.0.0.2",
                "servers": [{"pk": GW_KEY, "ip": "10.0.0.1/24", "endpoint": "a b:1\nx"}],
            }
        },
        {
            "wg": {
                "client_ip": "10.0.0.2",
                "servers": [{"pk": GW_KEY, "ip": "nope", "endpoint": "1.2.3.4:5"}],
            }
        },
    ],
)
def test_bad_answers_are_errors(doc: object) -> None:
    with pytest.raises(ValueError):
        RegisterResponse.from_json(doc)


def test_rpc_base() -> None:
    assert rpc_base("https://gw:8000") == "https://gw:8000/prpc"
    assert rpc_base("https://gw:8000/prpc/") == "https://gw:8000/prpc"


def test_keystore_reuses_renews_and_keeps_the_wireguard_key(
    pki: SimPki, client_ca: CA, tmp_path: Path
) -> None:
    tee = measured_tee(pki, tmp_path / "tee", CVM_APP, b"\x17" * 20)
    issuer = TeeCertIssuer(tee, client_ca)
    store = GatewayKeyStore(tmp_path / "cache")
    now = int(time.time())
    first = asyncio.run(store.get_or_create(issuer, now))
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert first.cert_not_after - now == pytest.approx(864000, abs=5)
    assert asyncio.run(store.get_or_create(issuer, now + 3600)) == first  # reused
    later = first.cert_not_after - 300  # within 10 minutes of expiry: renewed
    renewed = asyncio.run(store.get_or_create(issuer, later))
    assert renewed.client_cert != first.client_cert and renewed.client_key != first.client_key
    assert (renewed.wg_sk, renewed.wg_pk) == (first.wg_sk, first.wg_pk)
    leaf = x509.load_pem_x509_certificate(renewed.client_cert.encode())
    assert leaf.issuer == client_ca[0].subject
    store.path.write_text("{not json")  # a corrupt cache is replaced, not fatal
    assert asyncio.run(store.get_or_create(issuer, now)).wg_pk != first.wg_pk


def test_rpc_identity_renews_before_expiry(pki: SimPki, tmp_path: Path) -> None:
    clock = [time.time()]
    tee = measured_tee(pki, tmp_path / "tee", GW_APP, b"\x98" * 20)
    opts = RpcIdentityOptions(validity=dt.timedelta(days=2), renew_before=dt.timedelta(days=1))
    ident = RpcIdentity(tee, tmp_path / "rpc", opts, clock=lambda: clock[0])
    assert ident.ensure() is True
    first = ident.current()
    assert first is not None
    assert stat.S_IMODE(ident.key_file.stat().st_mode) == 0o600
    assert ident.ensure() is False
    clock[0] += 86400 + 60
    assert ident.ensure() is True
    second = ident.current()
    assert second is not None and second.public_key() != first.public_key()
    ctx = ident.ssl_context(None)
    ident.reload(ctx)  # the live context takes the new pair
    from gateway.attest.ratls import verify_ratls_cert

    col = pki.collateral(int(clock[0]))
    ev = verify_ratls_cert(second, collateral=col, root_ca_der=pki.root_ca_der, now=int(clock[0]))
    assert ev.identity.app_id.hex() == GW_APP


def test_client_cert_is_for_client_auth(keys: GatewayKeys) -> None:
    """Our client certificate is what the server's TLS layer and evidence check need."""
    leaf = x509.load_pem_x509_certificate(keys.client_cert.encode())
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH in eku


def test_kms_signed_client_certificate_registers(pki: SimPki, tmp_path: Path) -> None:
    """dstack's way: the client certificate comes from the KMS (SignCert, ext_quote), so a
    gateway whose TLS layer trusts the KMS root accepts it and verifies its quote."""
    from gateway.attest.quote import QuoteVerifier
    from gateway.guest.csr import CertSigningRequestV2
    from gateway.guest.gateway_cache import KmsCertIssuer
    from gateway.guest.kms_lab import KmsRoot, LabKms

    root = KmsRoot.create()
    kms = LabKms(
        root=root,
        verifier=QuoteVerifier(root_ca_der=pki.root_ca_der),
        collateral=lambda quote: pki.collateral(int(time.time())),
    )

    async def signer(csr: CertSigningRequestV2, signature: bytes) -> list[str]:
        return await kms.sign_cert(csr.encode(), signature)

    tee = measured_tee(pki, tmp_path / "cvm-tee", CVM_APP, b"\x18" * 20)
    store = GatewayKeyStore(tmp_path / "cvm")
    keys = asyncio.run(store.get_or_create(KmsCertIssuer(tee, signer), int(time.time())))
    assert keys.client_cert.count("BEGIN CERTIFICATE") == 3  # leaf, app CA, KMS root
    kms_ca = (root.ca_cert, root.ca_key)
    with _server(tmp_path, pki, kms_ca, "ratls") as server:
        answer = register(GatewayClient(trust(pki)), server, keys)
        (record,) = server.registry.store.list_instances()
        assert record.ip == answer.client_ip and record.instance_id == "18" * 20
        assert record.evidence["method"] == "ratls"  # the quote the KMS copied was verified


class _OutOfDate:
    """The gateway's platform as Intel's collateral would rate it after a TCB recovery."""

    def __init__(self, pki: SimPki) -> None:
        self.pki = pki

    async def get(self, quote: bytes) -> object:
        return self.pki.collateral(int(time.time()), tcb_status="OutOfDate")


def test_gateway_tcb_status_must_be_allowed(
    pki: SimPki, client_ca: CA, keys: GatewayKeys, tmp_path: Path
) -> None:
    from gateway.attest.tcb import TcbPolicy

    source = _OutOfDate(pki)
    strict = GatewayTrust(parse_app_ids(GW_APP), source, pki.root_ca_der)
    lenient = GatewayTrust(
        parse_app_ids(GW_APP),
        source,
        pki.root_ca_der,
        tcb_policy=TcbPolicy.from_names(["OutOfDate"]),
    )
    with _server(tmp_path, pki, client_ca, "ratls") as server:
        with pytest.raises(GatewayRejected, match="tcb_status"):
            register(GatewayClient(strict), server, keys)
        assert server.instances() == []
        assert register(GatewayClient(lenient), server, keys).client_ip


# --- properties: gateway answers and cache files are input; only our errors escape -----------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["wg", "client_ip", "servers", "pk", "ip", "endpoint", "agent", "x"]),
            children,
            max_size=4,
        )
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(doc=_json)
def test_any_answer_is_a_value_or_value_error(doc: object) -> None:
    try:
        answer = RegisterResponse.from_json(doc)
    except ValueError:
        return
    assert answer.servers and all(s.endpoint for s in answer.servers)


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=300))
def test_any_http_reply_parses_or_raises_value_error(raw: bytes) -> None:
    try:
        status, _ = parse_http_reply(b"HTTP/1.1 200 OK\r\n" + raw)
    except ValueError:
        return
    assert status == 200


@settings(max_examples=100, deadline=None)
@given(raw=st.binary(max_size=200), cut=st.integers(0, 400))
def test_any_cache_file_loads_or_raises_cache_error(raw: bytes, cut: int) -> None:
    sk = generate_private_key()
    good = GatewayKeys("cert", "key", 1, sk, public_key(sk), "cert")
    assert GatewayKeys.from_json(good.to_json()) == good
    for data in (raw, good.to_json()[:cut] + raw):
        try:
            GatewayKeys.from_json(data)
        except CacheError:
            pass
