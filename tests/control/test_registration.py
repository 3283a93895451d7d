"""RegisterCvm over real TLS: a simulated TDX CVM with an RA-TLS client certificate.

The server runs in a thread on 127.0.0.1 with a real registry (SQLite); clients are curl and
Python's ssl/http.client. The lab test at the end registers a CVM in a network namespace and
carries HTTP through the tunnel the answer describes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import http.client
import ipaddress
import json
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.attest import ratls
from gateway.attest.collateral import SimCollateralSource
from gateway.attest.policy_settings import AdmissionPolicy
from gateway.attest.verifier import TrustAnchors
from gateway.control.registration import (
    Advertised,
    RegistrationService,
    create_rpc_app,
    evidence_check,
)
from gateway.control.tls_server import TlsCredentials, TlsSite
from gateway.lab.harness import Lab
from gateway.protocol.appinfo import AppInfo, encode_app_info
from gateway.registry.service import Registry
from gateway.registry.sqlite import SqliteStore
from gateway.registry.store import Store
from gateway.tee.base import RuntimeEvent
from gateway.tee.sim import SimTee
from gateway.tee.sim_pki import SimPki
from gateway.tunnel.ipalloc import AddressPlan
from gateway.tunnel.keys import generate_private_key, public_key
from tests.helpers.gateway_rpc import make_ca, pem_key
from tests.helpers.lab import lab_env, make_lab, pytest_runtest_makereport

__all__ = ["lab_env", "make_lab", "pytest_runtest_makereport"]

APP = "5bb4ff9a3837357f19dc176407a5709c62eb6c56"
WG_KEY = public_key(generate_private_key())
NOW = int(time.time())
PLAN = AddressPlan(
    ipaddress.IPv4Interface("10.0.0.1/24"),
    ipaddress.IPv4Network("10.0.0.0/24"),
    (ipaddress.IPv4Network("10.0.0.1/32"),),
)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def server_cert(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], ip: str = "127.0.0.1"
) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    start = dt.datetime.fromtimestamp(NOW - 86400, dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("gateway-rpc"))
        .issuer_name(ca[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
            False,
        )
        .sign(ca[1], hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), pem_key(key)


@dataclass
class Cvm:
    """A simulated CVM's client credentials (files for curl and ssl)."""

    cert: Path
    key: Path
    instance_id: str


def make_cvm(
    pki: SimPki,
    directory: Path,
    instance: bytes,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    app: str = APP,
) -> Cvm:
    tee = SimTee(pki, directory / "tee")
    for name, payload in [
        ("system-preparing", b""),
        ("app-id", bytes.fromhex(app)),
        ("compose-hash", b"\xc1" * 32),
        ("instance-id", instance),
        ("boot-mr-done", b""),
        ("system-ready", b""),
    ]:
        tee.emit_event(RuntimeEvent(name, payload))
    key = ec.generate_private_key(ec.SECP256R1())
    req = ratls.CertRequest("dstack-guest-agent", client_auth=True, issuer=issuer)
    cert = ratls.build_ratls_cert(key, tee, req, now=dt.datetime.fromtimestamp(NOW, dt.UTC))
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(pem_key(key))
    return Cvm(directory / "cert.pem", directory / "key.pem", instance.hex())


@dataclass
class Rpc:
    port: int
    ca_file: Path
    store: Store
    registry: Registry
    policy: list[AdmissionPolicy]
    service: RegistrationService
    site: TlsSite

    def post(
        self,
        cvm: Cvm | None,
        body: Any,
        *,
        path: str = "/prpc/RegisterCvm",
        content_type: str = "application/json",
    ) -> tuple[int, dict[str, Any]]:
        """Python ssl + http.client."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        if cvm is not None:
            ctx.load_cert_chain(cvm.cert, cvm.key)
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=ctx, timeout=10)
        try:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            conn.request("POST", path, data, {"Content-Type": content_type})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read() or b"{}")
        finally:
            conn.close()

    def curl(self, cvm: Cvm, body: Any, path: str = "/prpc/RegisterCvm") -> dict[str, Any]:
        """curl with the client certificate, JSON POST."""
        out = subprocess.run(
            [
                "curl", "-sS", "--fail-with-body", "--cacert", str(self.ca_file),
                "--cert", str(cvm.cert), "--key", str(cvm.key),
                "-H", "Content-Type: application/json", "--data", json.dumps(body),
                f"https://127.0.0.1:{self.port}{path}",
            ],
            capture_output=True, text=True, timeout=20, check=True,
        )  # fmt: skip
        result: dict[str, Any] = json.loads(out.stdout)
        return result


@pytest.fixture(scope="module")
def pki() -> SimPki:
    return SimPki.create(not_before=NOW - 86400)


@pytest.fixture(scope="module")
def kms_ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    return make_ca("test KMS CA")


@contextlib.contextmanager
def serve(
    tmp_path: Path,
    pki: SimPki,
    kms_ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    registry: Registry,
    advertised: Advertised,
    *,
    client_ca: bool = False,
    kms_root: x509.Certificate | None = None,
    handshake_timeout: float = 10.0,
) -> Iterator[Rpc]:
    """Run the RPC app (TlsSite) on 127.0.0.1 in a thread with its own loop; stop it after.

    ``ca_file`` (the KMS CA) signs the server certificate; it is the TLS-layer client CA
    only with ``client_ca`` (no longer needed: the evidence decides).
    """
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(kms_ca[0].public_bytes(serialization.Encoding.PEM))
    cert_pem, key_pem = server_cert(kms_ca)
    (tmp_path / "server.pem").write_bytes(cert_pem)
    (tmp_path / "server.key").write_bytes(key_pem)
    creds = TlsCredentials(
        tmp_path / "server.pem", tmp_path / "server.key", ca_file if client_ca else None
    )
    policy = [AdmissionPolicy(app_ids=(APP,), allow_kms_cert=True)]
    check = evidence_check(
        source=SimCollateralSource(pki, clock=lambda: NOW),
        anchors=TrustAnchors(collateral=None, root_ca_der=pki.root_ca_der, kms_root=kms_root),
        policy=lambda: policy[0],
        clock=lambda: NOW,
    )
    service = RegistrationService(registry, check, advertised)
    loop = asyncio.new_event_loop()
    errors: list[dict[str, Any]] = []  # anything that escaped to the loop is a server bug
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    runner = web.AppRunner(create_rpc_app(service))
    sites: list[TlsSite] = []

    async def start() -> None:
        await runner.setup()
        site = TlsSite(runner, "127.0.0.1", 0, creds, handshake_timeout=handshake_timeout)
        await site.start()
        sites.append(site)

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    try:
        yield Rpc(sites[0].port, ca_file, registry.store, registry, policy, service, sites[0])
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
    assert errors == []


@pytest.fixture
def rpc(
    tmp_path: Path, pki: SimPki, kms_ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]
) -> Iterator[Rpc]:
    store = SqliteStore(tmp_path / "registry.sqlite3")
    registry = Registry(store, PLAN, clock=time.time)
    gw_key = public_key(generate_private_key())
    adv = Advertised(gw_key, "10.0.0.1/24", "192.0.2.1:51820")
    with serve(tmp_path, pki, kms_ca, registry, adv) as server:
        yield server
    store.close()


def test_register_with_curl_and_reregister_keeps_ip(
    rpc: Rpc, pki: SimPki, kms_ca: Any, tmp_path: Path
) -> None:
    cvm = make_cvm(pki, tmp_path / "cvm1", b"\x16" * 20, kms_ca)
    wg_key = public_key(generate_private_key())
    policy = {"ports": [{"port": 443, "pp": True}], "restrict_mode": True}
    first = rpc.curl(cvm, {"client_public_key": wg_key, "port_policy": policy})
    ip = ipaddress.IPv4Address(first["wg"]["client_ip"])
    assert PLAN.assignable(ip)
    assert first["wg"]["servers"] == [
        {
            "pk": rpc.service.advertised.wg_public_key,
            "ip": "10.0.0.1/24",
            "endpoint": "192.0.2.1:51820",
        }
    ]
    assert first["agent"]["internal_port"] == 8090
    assert first["gateways"][0]["wg_public_key"] == rpc.service.advertised.wg_public_key

    record = rpc.store.get_instance(cvm.instance_id)
    assert record is not None and record.app_id == APP and record.ip == ip
    assert record.port_policy == policy
    assert record.evidence["method"] == "ratls"
    assert record.evidence["compose_hash"] == "c1" * 32
    assert record.evidence["tcb_status"] == "UpToDate"

    # again, through Python ssl, the legacy method name and ?json with no content type
    status, again = rpc.post(
        cvm, {"client_public_key": wg_key}, path="/prpc/Tproxy.RegisterCvm?json", content_type=""
    )
    assert status == 200 and again["wg"]["client_ip"] == str(ip)
    stored = rpc.store.get_instance(cvm.instance_id)
    assert stored is not None and stored.port_policy == policy  # kept: not in the request


def test_info_is_public_and_register_needs_a_certificate(rpc: Rpc) -> None:
    status, info = rpc.post(None, {}, path="/prpc/Info")
    assert status == 200 and info["version"] and "base_domain" in info
    status, err = rpc.post(None, {"client_public_key": public_key(generate_private_key())})
    assert (status, err["reason"]) == (401, "no_evidence")


def test_policy_refusal_and_runtime_swap(
    rpc: Rpc, pki: SimPki, kms_ca: Any, tmp_path: Path
) -> None:
    other_app = "00" * 20
    cvm = make_cvm(pki, tmp_path / "cvm", b"\x21" * 20, kms_ca, app=other_app)
    body = {"client_public_key": public_key(generate_private_key())}
    status, err = rpc.post(cvm, body)
    assert (status, err["reason"]) == (403, "app_not_allowed")
    assert rpc.store.list_instances() == []
    rpc.policy[0] = AdmissionPolicy(app_ids=(APP, other_app))  # as the admin API would
    status, ok = rpc.post(cvm, body)
    assert status == 200 and ok["wg"]["client_ip"]


@pytest.mark.parametrize(
    ("body", "content_type", "status", "reason"),
    [
        ({"client_public_key": "not-a-key"}, "application/json", 400, "invalid_registration"),
        ({}, "application/json", 400, "bad_request"),
        (b"\x0a\x2c", "application/x-protobuf", 415, "unsupported_encoding"),
        (b"{nope", "application/json", 400, "bad_request"),
        (
            {"client_public_key": WG_KEY, "port_policy": {"ports": [{"port": 0}]}},
            "application/json",
            400,
            "bad_request",
        ),
        (b"{" + b" " * 70000 + b"}", "application/json", 413, "too_large"),
    ],
)
def test_bad_requests(
    rpc: Rpc,
    pki: SimPki,
    kms_ca: Any,
    tmp_path: Path,
    body: Any,
    content_type: str,
    status: int,
    reason: str,
) -> None:
    cvm = make_cvm(pki, tmp_path / "cvm", b"\x31" * 20, kms_ca)
    got, err = rpc.post(cvm, body, content_type=content_type)
    assert (got, err.get("reason")) == (status, reason), err
    assert rpc.store.list_instances() == []


def test_key_held_by_another_instance_is_a_conflict(
    rpc: Rpc, pki: SimPki, kms_ca: Any, tmp_path: Path
) -> None:
    one = make_cvm(pki, tmp_path / "one", b"\x41" * 20, kms_ca)
    two = make_cvm(pki, tmp_path / "two", b"\x42" * 20, kms_ca)
    body = {"client_public_key": public_key(generate_private_key())}
    assert rpc.post(one, body)[0] == 200
    status, err = rpc.post(two, body)
    assert (status, err["reason"]) == (409, "key_in_use")


def test_client_ca_when_configured_is_an_extra_tls_requirement(
    pki: SimPki, kms_ca: Any, tmp_path: Path
) -> None:
    store = SqliteStore(tmp_path / "registry.sqlite3")
    registry = Registry(store, PLAN, clock=time.time)
    adv = Advertised(public_key(generate_private_key()), "10.0.0.1/24", "192.0.2.1:51820")
    with serve(tmp_path, pki, kms_ca, registry, adv, client_ca=True) as rpc:
        outside = make_cvm(pki, tmp_path / "cvm", b"\x51" * 20, None)  # self-signed RA-TLS
        with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
            rpc.post(outside, {"client_public_key": public_key(generate_private_key())})
        assert rpc.store.list_instances() == []
        inside = make_cvm(pki, tmp_path / "cvm2", b"\x52" * 20, kms_ca)
        status, ok = rpc.post(inside, {"client_public_key": public_key(generate_private_key())})
        assert status == 200 and ok["wg"]["client_ip"]
    store.close()


@pytest.mark.netns
@pytest.mark.slow
def test_registered_cvm_is_reachable_through_the_tunnel(
    make_lab: Callable[..., Lab], pki: SimPki, kms_ca: Any, tmp_path: Path
) -> None:
    lab = make_lab(cvms=1)
    assert lab.gateway is not None
    (node,) = lab.nodes
    store = SqliteStore(tmp_path / "registry.sqlite3")
    registry = Registry(store, PLAN, device=lab.gateway, clock=time.time)
    adv = Advertised(lab.gateway_public_key, str(lab.wg_address), lab.endpoint)
    cvm = make_cvm(pki, tmp_path / "cvm", b"\x61" * 20, kms_ca)
    with serve(tmp_path, pki, kms_ca, registry, adv) as rpc:
        answer = rpc.curl(cvm, {"client_public_key": node.public_key})
        (gw,) = answer["wg"]["servers"]
        lab.connect(
            node, ipaddress.IPv4Address(answer["wg"]["client_ip"]), server_public_key=gw["pk"]
        )
        assert lab.fetch_instance(node) == node.netns
        peer = lab.gateway.state().peer(node.public_key)
        assert peer is not None and peer.last_handshake is not None
    store.close()


def test_evidence_copied_to_another_key_is_refused(
    rpc: Rpc, pki: SimPki, kms_ca: Any, tmp_path: Path
) -> None:
    """The client CA signs anything attested: the quote must bind *this* certificate's key."""
    genuine = make_cvm(pki, tmp_path / "genuine", b"\x71" * 20, kms_ca)
    source = x509.load_pem_x509_certificate(genuine.cert.read_bytes())
    thief = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(source.subject)
        .issuer_name(kms_ca[0].subject)
        .public_key(thief.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(source.not_valid_before_utc)
        .not_valid_after(source.not_valid_after_utc)
    )
    for ext in source.extensions:  # the genuine quote and event log, copied
        builder = builder.add_extension(ext.value, ext.critical)
    forged = builder.sign(kms_ca[1], hashes.SHA256())
    (tmp_path / "forged.pem").write_bytes(forged.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "forged.key").write_bytes(pem_key(thief))
    cvm = Cvm(tmp_path / "forged.pem", tmp_path / "forged.key", genuine.instance_id)
    status, err = rpc.post(cvm, {"client_public_key": public_key(generate_private_key())})
    assert (status, err["reason"]) == (403, "key_binding")
    assert rpc.store.list_instances() == []


# --- evidence at the TLS layer: self-signed RA-TLS, KMS chains, no evidence ---------------


def make_intermediate(
    root: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], cn: str
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    start = dt.datetime.fromtimestamp(NOW - 86400, dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(root[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root[1].public_key()), False
        )
        .sign(root[1], hashes.SHA256())
    )
    return cert, key


def make_kms_cvm(
    directory: Path,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    instance: bytes,
) -> Cvm:
    """A dstack-style KMS-issued client certificate: app info (.9), no quote; the PEM file
    holds the leaf and its issuing (app) CA, so the client sends both."""
    info = AppInfo(
        app_id=bytes.fromhex(APP),
        compose_hash=b"\xc2" * 32,
        instance_id=instance,
        device_id=b"\xd0" * 32,
        mr_system=b"\x01" * 32,
        mr_aggregated=b"\x02" * 32,
        os_image_hash=b"\x03" * 32,
        key_provider_info=b'{"type":"kms","id":"00"}',
    )
    key = ec.generate_private_key(ec.SECP256R1())
    start = dt.datetime.fromtimestamp(NOW - 3600, dt.UTC)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name("dstack-guest-agent"))
        .issuer_name(issuer[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()), False
        )
        .add_extension(
            x509.UnrecognizedExtension(
                ratls.OID_APP_INFO, ratls.der_octet_string(encode_app_info(info))
            ),
            False,
        )
        .sign(issuer[1], hashes.SHA256())
    )
    directory.mkdir(parents=True)
    pem = serialization.Encoding.PEM
    (directory / "chain.pem").write_bytes(leaf.public_bytes(pem) + issuer[0].public_bytes(pem))
    (directory / "key.pem").write_bytes(pem_key(key))
    return Cvm(directory / "chain.pem", directory / "key.pem", instance.hex())


def self_signed_plain(directory: Path) -> Cvm:
    """A self-signed client certificate with no evidence at all."""
    key = ec.generate_private_key(ec.SECP256R1())
    start = dt.datetime.fromtimestamp(NOW - 3600, dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("just-a-client"))
        .issuer_name(_name("just-a-client"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=7))
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True)
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(pem_key(key))
    return Cvm(directory / "cert.pem", directory / "key.pem", "")


def test_self_signed_ratls_client_registers_without_a_client_ca(
    rpc: Rpc, pki: SimPki, tmp_path: Path
) -> None:
    cvm = make_cvm(pki, tmp_path / "cvm", b"\x81" * 20, None)  # issuer None: self-signed
    leaf = x509.load_pem_x509_certificate(cvm.cert.read_bytes())
    assert leaf.issuer == leaf.subject
    answer = rpc.curl(cvm, {"client_public_key": public_key(generate_private_key())})
    record = rpc.store.get_instance(cvm.instance_id)
    assert record is not None and str(record.ip) == answer["wg"]["client_ip"]
    assert record.evidence["method"] == "ratls"


def test_self_signed_cert_without_evidence_is_refused_with_its_reason(
    rpc: Rpc, tmp_path: Path
) -> None:
    status, err = rpc.post(
        self_signed_plain(tmp_path / "plain"),
        {"client_public_key": public_key(generate_private_key())},
    )
    assert (status, err["reason"]) == (403, "no_evidence")
    assert "neither an attestation nor app info" in err["error"]
    assert rpc.store.list_instances() == []


@pytest.mark.parametrize("root_configured", [True, False])
def test_kms_chain_with_an_intermediate(
    pki: SimPki, kms_ca: Any, tmp_path: Path, root_configured: bool
) -> None:
    """dstack's CVMs present leaf + app CA; the gateway verifies both up to the KMS root."""
    kms_root = make_ca("KMS root")
    app_ca = make_intermediate(kms_root, "app CA")
    cvm = make_kms_cvm(tmp_path / "kms-cvm", app_ca, b"\x91" * 20)
    store = SqliteStore(tmp_path / "registry.sqlite3")
    registry = Registry(store, PLAN, clock=time.time)
    adv = Advertised(public_key(generate_private_key()), "10.0.0.1/24", "192.0.2.1:51820")
    root = kms_root[0] if root_configured else None
    with serve(tmp_path, pki, kms_ca, registry, adv, kms_root=root) as rpc:
        body = {"client_public_key": public_key(generate_private_key())}
        status, answer = rpc.post(cvm, body)
        if root_configured:
            assert status == 200, answer
            record = rpc.store.get_instance(cvm.instance_id)
            assert record is not None and str(record.ip) == answer["wg"]["client_ip"]
            assert record.evidence["method"] == "kms_cert"
            assert record.evidence["compose_hash"] == "c2" * 32
            # without the intermediate the chain cannot be built: refused by the evidence
            leaf_only = tmp_path / "leaf.pem"
            leaf_only.write_bytes(cvm.cert.read_bytes().split(b"-----END CERTIFICATE-----")[0])
            leaf_only.write_bytes(leaf_only.read_bytes() + b"-----END CERTIFICATE-----\n")
            status, err = rpc.post(Cvm(leaf_only, cvm.key, cvm.instance_id), body)
            assert (status, err["reason"]) == (403, "chain_invalid")
        else:
            assert (status, answer["reason"]) == (403, "chain_invalid")
            assert "no KMS root CA is configured" in answer["error"]
            assert rpc.store.list_instances() == []
    store.close()


def test_kms_chain_to_another_root_is_refused(pki: SimPki, kms_ca: Any, tmp_path: Path) -> None:
    app_ca = make_intermediate(make_ca("rogue KMS"), "rogue app CA")
    cvm = make_kms_cvm(tmp_path / "kms-cvm", app_ca, b"\x92" * 20)
    store = SqliteStore(tmp_path / "registry.sqlite3")
    registry = Registry(store, PLAN, clock=time.time)
    adv = Advertised(public_key(generate_private_key()), "10.0.0.1/24", "192.0.2.1:51820")
    with serve(tmp_path, pki, kms_ca, registry, adv, kms_root=make_ca("KMS root")[0]) as rpc:
        status, err = rpc.post(cvm, {"client_public_key": public_key(generate_private_key())})
        assert (status, err["reason"]) == (403, "chain_invalid")
        assert rpc.store.list_instances() == []
    store.close()


# --- hostile TLS never breaks the listener ------------------------------------------------


def _raw(port: int, data: bytes, *, wait: float = 5.0) -> bytes:
    """Send ``data`` on a plain TCP connection and read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(data)
        out = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(4096):
                out += chunk
        return out


def _client_hello(port: int) -> bytes:
    """A real ClientHello, captured from Python's ssl over memory BIOs."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_hostile_tls_is_refused_and_registration_still_works(
    pki: SimPki, kms_ca: Any, tmp_path: Path
) -> None:
    store = SqliteStore(tmp_path / "registry.sqlite3")
    registry = Registry(store, PLAN, clock=time.time)
    adv = Advertised(public_key(generate_private_key()), "10.0.0.1/24", "192.0.2.1:51820")
    with serve(tmp_path, pki, kms_ca, registry, adv, handshake_timeout=1.0) as rpc:
        # garbage: an alert (record type 21) or a plain close, quickly
        reply = _raw(rpc.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reply == b"" or reply[0] == 21
        assert _raw(rpc.port, bytes(range(256)) * 8)[:1] in (b"", b"\x15")
        # truncated handshake: half a ClientHello then FIN
        hello = _client_hello(rpc.port)
        with socket.create_connection(("127.0.0.1", rpc.port), timeout=5) as sock:
            sock.sendall(hello[: len(hello) // 2])
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(4096) == b""
        # slowloris: a byte at a time, never finishing; the deadline closes it
        slow = socket.create_connection(("127.0.0.1", rpc.port), timeout=5)
        started = time.monotonic()
        try:
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                for byte in hello[:40]:
                    slow.send(bytes([byte]))
                    time.sleep(0.02)
            assert slow.recv(4096) == b""  # closed by the server
        finally:
            slow.close()
        assert time.monotonic() - started < 4
        # a client that says hello and then never answers
        idle = socket.create_connection(("127.0.0.1", rpc.port), timeout=5)
        idle.sendall(hello)
        # meanwhile, and afterwards, CVMs register
        cvm = make_cvm(pki, tmp_path / "cvm", b"\xa1" * 20, None)
        status, ok = rpc.post(cvm, {"client_public_key": public_key(generate_private_key())})
        assert status == 200 and ok["wg"]["client_ip"]
        try:
            got = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := idle.recv(65536):
                    got += chunk
            assert got[:1] == b"\x16"  # the server's flight, then a close at the deadline
        finally:
            idle.close()
        status, info = rpc.post(None, {}, path="/prpc/Info")
        assert status == 200 and info["version"]
        stats = dict(rpc.site.stats)
        assert stats.get("refused", 0) >= 2, stats  # the two garbage connections
        assert stats.get("handshaking", 0) >= 1, stats  # the truncated one
        assert stats.get("timeout", 0) >= 2, stats  # slowloris and the stalled client
        assert stats.get("established", 0) >= 1, stats  # the last may still be closing
    store.close()


#: ``[0] INTEGER 2`` (version v3), then the serial ``INTEGER 7``, in the DER of _patched_cvm
_V3_SERIAL_7 = bytes.fromhex("a003020102020107")


def _patched_cvm(tmp_path: Path, name: str, replacement: bytes) -> Cvm:
    """A self-signed leaf whose version + serial bytes are patched after signing (the
    signature no longer matches, which the accept-any TLS layer does not check: the evidence
    would), as a client certificate OpenSSL takes but cryptography may refuse."""
    key = ec.generate_private_key(ec.SECP256R1())
    start = dt.datetime.fromtimestamp(NOW - 3600, dt.UTC)
    der = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    assert der.count(_V3_SERIAL_7) == 1
    der = der.replace(_V3_SERIAL_7, replacement)
    pem = (
        b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(der) + b"-----END CERTIFICATE-----\n"
    )
    (tmp_path / f"{name}.pem").write_bytes(pem)
    (tmp_path / f"{name}.key").write_bytes(pem_key(key))
    return Cvm(tmp_path / f"{name}.pem", tmp_path / f"{name}.key", "")


def test_a_certificate_only_openssl_accepts_is_malformed_evidence(rpc: Rpc, tmp_path: Path) -> None:
    """OpenSSL takes a negative serial; cryptography refuses it: 403 malformed, no crash."""
    cvm = _patched_cvm(tmp_path, "negative-serial", _V3_SERIAL_7[:-1] + b"\xf9")  # serial -7
    status, err = rpc.post(cvm, {"client_public_key": public_key(generate_private_key())})
    assert (status, err["reason"]) == (403, "malformed"), err
    assert "client certificate 0" in err["error"]
    status, _ = rpc.post(None, {}, path="/prpc/Info")
    assert status == 200


def test_a_body_split_across_tls_records_and_segments_is_read_whole(
    rpc: Rpc, pki: SimPki, tmp_path: Path
) -> None:
    """Clients may write the headers and the body separately (and a slow link delivers them
    apart): the handler waits for the whole body instead of parsing what arrived first."""
    cvm = make_cvm(pki, tmp_path / "split", b"\x5a" * 20, None)
    body = json.dumps({"client_public_key": public_key(generate_private_key())}).encode()
    head = (
        f"POST /prpc/RegisterCvm HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    ctx = ssl.create_default_context(cafile=str(rpc.ca_file))
    ctx.load_cert_chain(cvm.cert, cvm.key)
    with socket.create_connection(("127.0.0.1", rpc.port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(head + body[:10])
            time.sleep(0.2)
            tls.sendall(body[10:])
            reply = b""
            while chunk := tls.recv(65536):
                reply += chunk
    assert reply.startswith(b"HTTP/1.1 200"), reply[:300]
    assert b'"client_ip"' in reply


def test_a_certificate_with_a_version_cryptography_rejects_is_malformed(
    rpc: Rpc, tmp_path: Path
) -> None:
    """Version field 1 (X.509 v2): OpenSSL takes it, cryptography raises ``InvalidVersion``
    (not a ValueError): still 403 malformed, not a server error."""
    cvm = _patched_cvm(tmp_path, "v2", bytes.fromhex("a003020101020107"))  # version v2
    status, err = rpc.post(cvm, {"client_public_key": public_key(generate_private_key())})
    assert (status, err["reason"]) == (403, "malformed"), err
    assert "client certificate 0" in err["error"]


def test_advertised_base_domain_comes_from_the_configuration() -> None:
    """CVMs learn the domain their apps are published under (``agent.domain``, ``Info``)
    even when no base domain was added through the admin API."""
    from gateway.config import parse_config
    from gateway.control.registration import advertised_from_config

    key = "k" * 43 + "="
    assert advertised_from_config(parse_config(""), key).base_domain == ""
    proxy = parse_config("[proxy]\nbase_domains = ['apps.test', 'other.test']\n")
    assert advertised_from_config(proxy, key).base_domain == "apps.test"
    acme = parse_config("[[acme.domains]]\nbase_domain = 'acme.test'\ndns = 'x'\n")
    assert advertised_from_config(acme, key).base_domain == "acme.test"


def test_exhausted_address_pool_is_a_retryable_503_and_changes_nothing(
    pki: SimPki, kms_ca: Any, tmp_path: Path
) -> None:
    """Two assignable addresses: the third CVM gets 503 ``pool_exhausted`` (the CVM retries
    later, maybe at another gateway), and the two registered instances are untouched."""
    plan = AddressPlan(
        ipaddress.IPv4Interface("10.0.0.1/29"),
        ipaddress.IPv4Network("10.0.0.4/30"),  # .4-.7; minus network/broadcast -> .5, .6
        (),
    )
    store = SqliteStore(tmp_path / "registry.sqlite3")
    registry = Registry(store, plan, clock=time.time)
    adv = Advertised(public_key(generate_private_key()), "10.0.0.1/29", "192.0.2.1:51820")
    with serve(tmp_path, pki, kms_ca, registry, adv) as rpc:
        got = []
        for n in range(2):
            cvm = make_cvm(pki, tmp_path / f"cvm{n}", bytes([0x61 + n]) * 20, kms_ca)
            status, ok = rpc.post(cvm, {"client_public_key": public_key(generate_private_key())})
            assert status == 200, ok
            got.append(ok["wg"]["client_ip"])
        before = sorted((r.instance_id, str(r.ip)) for r in store.list_instances())
        third = make_cvm(pki, tmp_path / "cvm3", b"\x69" * 20, kms_ca)
        status, err = rpc.post(third, {"client_public_key": public_key(generate_private_key())})
        assert (status, err["reason"]) == (503, "pool_exhausted"), err
        assert sorted((r.instance_id, str(r.ip)) for r in store.list_instances()) == before
        assert len(set(got)) == 2
    store.close()
