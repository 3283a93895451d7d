"""The real dstack-sdk 0.5.4 client against our agent over its unix socket."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from dstack_sdk import DstackClient, TappdClient
from dstack_sdk.dstack_client import TcbInfoV05x

from gateway.guest import certs, kdf
from gateway.guest.agent import create_agent_app, create_tappd_app
from gateway.guest.keccak import keccak256
from gateway.guest.service import AgentService
from gateway.protocol.attestation import decode_attestation, decode_event_log_json
from gateway.protocol.tdx_quote import parse_tdx_quote
from gateway.tee.base import RuntimeEvent, replay
from gateway.tee.sim import SimTee
from gateway.tee.sim_pki import SimPki

from .conftest import VECTORS, serve_unix, verify


@pytest.fixture
def sock(tmp_path: Path, service: AgentService) -> Iterator[Path]:
    path = tmp_path / "dstack.sock"
    with serve_unix(create_agent_app(service), path):
        yield path


@pytest.fixture
def client(sock: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[DstackClient]:
    """The SDK picks its endpoint from DSTACK_SIMULATOR_ENDPOINT (a socket path here)."""
    monkeypatch.setenv("DSTACK_SIMULATOR_ENDPOINT", str(sock))
    client = DstackClient()
    client.__enter__()  # (its __enter__ returns the inner async client, so no `with`)
    yield client
    client.__exit__(None, None, None)  # closes the SDK's pooled connection


def test_get_key_matches_upstream_chain(client: DstackClient) -> None:
    got = client.get_key("vms", "signing")
    case = next(c for c in VECTORS["cases"] if c["algorithm"] == "secp256k1")
    derived = got.decode_key()
    assert kdf.compressed_k256_pub(kdf.k256_key(derived)).hex() == case["public_key"]
    assert got.signature_chain == case["signature_chain"][1:]
    # the chain recovers to the app root, which the KMS root vouches for
    app_root = kdf.recover_k256_pub(
        keccak256(f"signing:{case['public_key']}".encode()), bytes.fromhex(got.signature_chain[0])
    )
    assert app_root.hex() == VECTORS["app_root_pubkey"]
    kms = kdf.recover_k256_pub(
        keccak256(b"dstack-kms-issued:" + bytes.fromhex(VECTORS["app_id"]) + app_root),
        bytes.fromhex(got.signature_chain[1]),
    )
    assert kms.hex() == VECTORS["kms_root_pubkey"]


def test_get_key_ed25519_and_default_path(client: DstackClient) -> None:
    ed = client.get_key("vms", "signing", algorithm="ed25519")
    case = next(c for c in VECTORS["cases"] if c["algorithm"] == "ed25519")
    assert ed.signature_chain[0] == case["signature_chain"][1]
    assert len(client.get_key().decode_key()) == 32
    assert client.get_key("a").key != client.get_key("b").key


def test_get_quote_binds_report_data_and_replays(
    client: DstackClient, tee: SimTee, sim_pki: SimPki
) -> None:
    got = client.get_quote("hello")
    quote = verify(got.decode_quote(), sim_pki)  # dcap-qvl under the simulator root
    assert quote.report_data == b"hello".ljust(64, b"\0")
    assert got.report_data == b"hello".ljust(64, b"\0").hex()
    # SDK 0.5.4's own replay reaches the quote's RTMR3 (we keep imr-3 digests)
    assert got.replay_rtmrs()[3] == quote.rt_mr3.hex()
    names = [e.event for e in got.decode_event_log()]
    assert names[:3] == ["system-preparing", "app-id", "compose-hash"]
    assert json.loads(got.vm_config)["cpu_count"] == 1
    with pytest.raises(ValueError, match="64 bytes"):
        client.get_quote(b"x" * 65)


def test_attest_decodes_and_replays(client: DstackClient, sim_pki: SimPki) -> None:
    att = decode_attestation(client.attest(b"\x01" * 64).decode_attestation())
    assert att.report_data == b"\x01" * 64
    quote = verify(att.quote, sim_pki)
    assert quote.report_data == att.report_data
    events = [RuntimeEvent(e.name, e.payload) for e in att.runtime_events]
    assert replay(events) == quote.rt_mr3
    assert [e.name for e in att.runtime_events][-1] == "system-ready"


def test_info_parses_with_the_sdk_models(client: DstackClient, service: AgentService) -> None:
    assert client.info().app_cert == ""
    asyncio.run(service.refresh_app_cert())
    info = client.info()
    cert = x509.load_pem_x509_certificate(info.app_cert.encode())
    assert cert.extensions.get_extension_for_oid(certs.OID_ATTESTATION)
    assert isinstance(info.tcb_info, TcbInfoV05x)
    assert info.app_id == VECTORS["app_id"]
    assert info.app_name == "sdk-test-app"
    assert info.compose_hash == service.state.compose.hash.hex()
    assert info.tcb_info.compose_hash == info.compose_hash
    assert info.tcb_info.app_compose == service.state.compose.text
    assert json.loads(info.key_provider_info) == {"name": "kms", "id": "3059"}
    assert len(info.instance_id) == 40 and len(info.tcb_info.rtmr3) == 96
    assert info.tcb_info.rtmr3 == service.tee.rtmrs()[3].hex()
    assert client.is_reachable()


def test_emit_event_extends_rtmr3_and_log(
    client: DstackClient, tee: SimTee, sim_pki: SimPki
) -> None:
    before = tee.rtmrs()[3]
    client.emit_event("app-ready", b"v1")
    assert tee.rtmrs()[3] != before
    assert tee.runtime_events()[-1].name == "app-ready"
    quote = client.get_quote(b"q")
    assert quote.replay_rtmrs()[3] == verify(quote.decode_quote(), sim_pki).rt_mr3.hex()
    with pytest.raises(ValueError, match="empty"):
        client.emit_event("", b"x")


def test_get_tls_key_ra_tls(client: DstackClient, sim_pki: SimPki) -> None:
    got = client.get_tls_key(
        subject="app.example",
        alt_names=["app.example", "127.0.0.1"],
        usage_ra_tls=True,
        usage_client_auth=True,
        with_app_info=True,
    )
    key = serialization.load_pem_private_key(got.key.encode(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    leaf = x509.load_pem_x509_certificate(got.certificate_chain[0].encode())
    ca = x509.load_pem_x509_certificate(got.certificate_chain[1].encode())
    leaf.verify_directly_issued_by(ca)
    assert leaf.public_key() == key.public_key()
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "app.example" in san.get_values_for_type(x509.DNSName)
    ext = leaf.extensions.get_extension_for_oid(certs.OID_ATTESTATION).value
    assert isinstance(ext, x509.UnrecognizedExtension)
    att = decode_attestation(ext.value[2:] if ext.value[1] < 0x80 else ext.value[4:])
    want = hashlib.sha512(b"ratls-cert:" + certs.spki_der(key)).digest()
    assert att.report_data == want == verify(att.quote, sim_pki).report_data
    assert leaf.extensions.get_extension_for_oid(certs.OID_APP_INFO)
    assert client.get_tls_key().key != client.get_tls_key().key


def test_get_tls_key_rejects_bad_validity(client: DstackClient) -> None:
    with pytest.raises(httpx.HTTPStatusError):
        client.get_tls_key(not_before=200, not_after=100)


@pytest.mark.parametrize("algorithm", ["secp256k1", "ed25519", "secp256k1_prehashed"])
def test_sign_and_verify(client: DstackClient, algorithm: str) -> None:
    case = next(c for c in VECTORS["cases"] if c["algorithm"] == algorithm)
    data = bytes.fromhex(case["data"])
    signed = client.sign(algorithm, data)
    assert signed.signature == case["signature"]
    assert signed.signature_chain == case["signature_chain"]
    assert signed.public_key == case["public_key"]
    assert client.verify(
        algorithm, data, signed.decode_signature(), signed.decode_public_key()
    ).valid
    assert not client.verify(
        algorithm,
        b"other" * 7 if algorithm != "secp256k1_prehashed" else bytes(32),
        signed.decode_signature(),
        signed.decode_public_key(),
    ).valid


def test_version(client: DstackClient) -> None:
    assert client.version().version


def test_transport_rules(sock: Path) -> None:
    transport = httpx.HTTPTransport(uds=str(sock))
    with httpx.Client(transport=transport, base_url="http://localhost") as http:
        assert http.get("/Version").json()["version"]
        r = http.post("/GetQuote?json", content=b'{"report_data":"0xaabb","extra":1}')
        assert r.json()["report_data"].startswith("aabb00")
        r = http.post("/GetQuote", content=b"\x0a\x02\xaa\xbb")
        assert r.status_code == 415 and "protobuf" in r.json()["error"]
        r = http.post("/Nope", json={})
        assert r.status_code == 400 and "Nope" in r.json()["error"]
        r = http.post("/GetQuote", json={"report_data": "zz"})
        assert r.status_code == 400 and r.text.startswith('{\n  "error"')
        r = http.post("/EmitEvent", json={"event": "x", "payload": ""})
        assert r.status_code == 200 and r.text == "null"
        r = http.post("/GetKey", json={"algorithm": "rsa"})
        assert r.status_code == 400 and "Unsupported algorithm" in r.json()["error"]


def test_tappd_client(
    tmp_path: Path, service: AgentService, monkeypatch: pytest.MonkeyPatch, sim_pki: SimPki
) -> None:
    path = tmp_path / "tappd.sock"
    with serve_unix(create_tappd_app(service), path):
        monkeypatch.setenv("TAPPD_SIMULATOR_ENDPOINT", str(path))
        client = TappdClient()
        client.__enter__()
        try:
            _check_tappd(client, sim_pki)
        finally:
            client.__exit__(None, None, None)


def _check_tappd(client: TappdClient, pki: SimPki) -> None:
    if True:
        raw = client.tdx_quote(b"\x02" * 64, "raw")
        assert verify(raw.decode_quote(), pki).report_data == b"\x02" * 64
        hashed = client.tdx_quote(b"data", "sha512")
        want = hashlib.sha512(b"app-data:data").digest()
        assert verify(hashed.decode_quote(), pki).report_data == want
        derived = client.derive_key("path", "subject")
        assert derived.certificate_chain and "PRIVATE KEY" in derived.key
        assert client.derive_key("path").key == derived.key  # deterministic per path
        info = client.info()
        assert info.app_id == VECTORS["app_id"]


def test_hostile_requests_get_clean_errors(sock: Path) -> None:
    transport = httpx.HTTPTransport(uds=str(sock))
    with httpx.Client(transport=transport, base_url="http://localhost") as http:
        deep = b"[" * 50_000 + b"]" * 50_000
        r = http.post("/GetQuote", content=deep, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "invalid JSON" in r.json()["error"]
        r = http.post(
            "/GetQuote", content=b"\xff\xfe", headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 400
        big = b'{"report_data":"' + b"00" * 600_000 + b'"}'
        r = http.post("/GetQuote", content=big, headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        r = http.post("/GetQuote", json={"report_data": "00" * 65})
        assert r.status_code == 400 and "too long" in r.json()["error"]
        r = http.post("/EmitEvent", json={"event": "", "payload": ""})
        assert r.status_code == 400
        assert http.post("/Version", json={}).status_code == 200  # still serving


def test_concurrent_emits_keep_log_and_rtmr3_consistent(sock: Path, sim_pki: SimPki) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def emit(i: int) -> int:
        transport = httpx.HTTPTransport(uds=str(sock))
        with httpx.Client(transport=transport, base_url="http://localhost") as http:
            for j in range(5):
                r = http.post("/EmitEvent", json={"event": f"e{i}", "payload": f"{j:02x}"})
                assert r.status_code == 200
                got = http.post("/GetQuote", json={"report_data": "ab"}).json()
                # each quote agrees with the log it came with, even while others emit
                log = decode_event_log_json(got["event_log"])
                events = [RuntimeEvent(e.event, e.event_payload) for e in log if e.imr == 3]
                quoted = parse_tdx_quote(bytes.fromhex(got["quote"])).report.rt_mr3
                assert replay(events) == quoted
        return i

    with ThreadPoolExecutor(8) as pool:
        assert sorted(pool.map(emit, range(8))) == list(range(8))
    transport = httpx.HTTPTransport(uds=str(sock))
    with httpx.Client(transport=transport, base_url="http://localhost") as http:
        got = http.post("/GetQuote", json={"report_data": "cd"}).json()
    events = [
        RuntimeEvent(e.event, e.event_payload) for e in decode_event_log_json(got["event_log"])
    ]
    assert sum(e.name.startswith("e") and len(e.name) == 2 for e in events) == 40
    assert replay(events) == verify(bytes.fromhex(got["quote"]), sim_pki).rt_mr3


ARG_NAMES = [
    "path", "purpose", "algorithm", "report_data", "event", "payload", "subject", "alt_names",
    "usage_ra_tls", "usage_server_auth", "usage_client_auth", "not_before", "not_after",
    "with_app_info", "data", "signature", "public_key",
]  # fmt: skip
METHODS = ["GetKey", "GetQuote", "Attest", "Info", "EmitEvent", "GetTlsKey", "Sign", "Verify"]


def test_random_arguments_never_crash_a_method(sock: Path) -> None:
    """Any JSON object to any method is answered 200 or 400, never 500."""
    from hypothesis import HealthCheck, example, given, settings
    from hypothesis import strategies as st

    values = (
        st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=10)
        | st.sampled_from(["00" * 64, "0x" + "11" * 32, "ed25519", "secp256k1", "zz"])
        | st.lists(st.text(max_size=5), max_size=3)
        | st.dictionaries(st.text(max_size=3), st.none())
        | st.sampled_from([2**64 - 1, 2**63, 253402300800, 0])
    )  # fmt: skip
    transport = httpx.HTTPTransport(uds=str(sock))
    with httpx.Client(transport=transport, base_url="http://localhost") as http:

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
        @example(method="GetTlsKey", args={"not_after": 2**64 - 1})
        @example(method="GetTlsKey", args={"not_before": 253402300800})
        @example(method="GetTlsKey", args={"subject": "s" * 65})
        @example(method="GetTlsKey", args={"alt_names": ["\u00e9 x", "", "*", "1.2.3.999"]})
        @given(
            method=st.sampled_from(METHODS),
            args=st.dictionaries(st.sampled_from(ARG_NAMES), values, max_size=6),
        )
        def check(method: str, args: dict[str, object]) -> None:
            r = http.post(f"/{method}", json=args)
            assert r.status_code in (200, 400), (method, args, r.status_code, r.text)

        check()


def test_tappd_random_arguments_never_crash(tmp_path: Path, service: AgentService) -> None:
    from hypothesis import HealthCheck, example, given, settings
    from hypothesis import strategies as st

    path = tmp_path / "tappd.sock"
    values = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.text(max_size=8)
        | st.sampled_from(
            ["00" * 64, "raw", "sha512", "keccak256", "sha3-256", "keccak512", "app-data:"]
        )
    )
    names = ["report_data", "hash_algorithm", "prefix", "path", "purpose", "subject",
             "random_seed", "usage_ra_tls", "alt_names"]  # fmt: skip
    methods = ["TdxQuote", "RawQuote", "DeriveKey", "DeriveK256Key", "Info", "Version"]
    with serve_unix(create_tappd_app(service), path):
        transport = httpx.HTTPTransport(uds=str(path))
        with httpx.Client(transport=transport, base_url="http://localhost") as http:

            @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
            @example(method="TdxQuote", args={"report_data": "00", "hash_algorithm": "keccak256"})
            @example(method="DeriveKey", args={"path": "0" * 128})
            @example(method="DeriveKey", args={"path": "p", "alt_names": ["\u00e9 x", "", "*"]})
            @given(
                method=st.sampled_from(methods),
                args=st.dictionaries(st.sampled_from(names), values, max_size=4),
            )
            def check(method: str, args: dict[str, object]) -> None:
                r = http.post(f"/prpc/Tappd.{method}", json=args)
                assert r.status_code in (200, 400), (method, args, r.text)

            check()
