"""Refused registrations through the real RPC: each with its reason, nothing changed anywhere.

One RPC server for the whole module (``tests.helpers.gateway_rpc.serve_rpc``: tunnel's RPC
app served by the gateway's own TLS server, a real SQLite registry and a real admission
policy) drives a real wireguard-go device in a lab namespace (prefix ``trr``). A genuine
CVM registers first, so the store and the device hold one instance and one peer. Then each
bad request arrives over real TLS with its client certificate (RA-TLS, built through a
simulated TDX backend, then forged where the case needs it) and must be refused with its
machine-readable reason, while the store's contents and revision and the device's peers
(read back over the UAPI socket) stay exactly as they were.
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.attest import ratls
from gateway.control.registration import MAX_BODY, Advertised
from gateway.control.tls_server import TlsCredentials
from gateway.lab.harness import Lab, cleanup_leftovers
from gateway.protocol.attestation import decode_attestation, encode_attestation_v0
from gateway.registry.service import Registry
from gateway.registry.sqlite import SqliteStore
from gateway.tee.base import RuntimeEvent, TeeBackend
from gateway.tee.sim import SimImage, SimTee
from gateway.tee.sim_pki import SimPki
from gateway.tunnel.keys import generate_private_key, public_key
from tests.helpers.gateway_rpc import (
    CVM_APP,
    OTHER_APP,
    PLAN,
    RpcServer,
    measured_tee,
    pem_key,
    plain_server_files,
    serve_rpc,
)
from tests.helpers.lab import require_lab
from tests.helpers.processes import free_port

pytestmark = [pytest.mark.slow, pytest.mark.netns]

PREFIX = "trr"


@dataclass(frozen=True)
class Identity:
    """A client certificate (PEM files) the RPC's TLS layer will be shown."""

    cert: Path
    key: Path


@dataclass
class World:
    lab: Lab
    server: RpcServer
    ids: dict[str, Identity]
    genuine_key: str  # the registered instance's WireGuard key


def _write(
    tmp: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> Identity:
    c, k = tmp / f"{name}.pem", tmp / f"{name}.key"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(pem_key(key))
    return Identity(c, k)


def _ratls(tee: TeeBackend) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    req = ratls.CertRequest("dstack-guest-agent", client_auth=True)
    return ratls.build_ratls_cert(key, tee, req, now=now), key


def _edited_rtmr3(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    """The same certificate whose event log claims another app id (RTMR3 no longer replays)."""
    att = decode_attestation(ratls.read_extension(cert, ratls.OID_ATTESTATION) or b"")
    events = [
        replace(e, payload=bytes.fromhex(CVM_APP)) if e.name == "app-id" else e
        for e in att.runtime_events
    ]
    forged = encode_attestation_v0(replace(att, runtime_events=tuple(events)))
    b = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(key.public_key())
        .serial_number(cert.serial_number)
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
    )
    for e in cert.extensions:
        value = e.value
        if e.oid == ratls.OID_ATTESTATION:
            value = x509.UnrecognizedExtension(e.oid, ratls.der_octet_string(forged))
        b = b.add_extension(value, critical=e.critical)
    return b.sign(key, hashes.SHA256())


def _booted(pki: SimPki, state: Path, image: SimImage, app: str, instance: bytes) -> SimTee:
    tee = SimTee(pki, state, image)
    for name, payload in [
        ("system-preparing", b""),
        ("app-id", bytes.fromhex(app)),
        ("compose-hash", b"\xc1" * 32),
        ("instance-id", instance),
        ("boot-mr-done", b""),
        ("system-ready", b""),
    ]:
        tee.emit_event(RuntimeEvent(name, payload))
    return tee


def _post(
    port: int, ident: Identity | None, body: bytes, *, content_type: str = "application/json"
) -> tuple[int, dict[str, object]]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # the CVM side is not tested here
    if ident is not None:
        ctx.load_cert_chain(ident.cert, ident.key)
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=20)
    try:
        conn.request(
            "POST", "/prpc/RegisterCvm?json", body=body, headers={"Content-Type": content_type}
        )
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _key_body(key: str) -> bytes:
    return json.dumps({"client_public_key": key}).encode()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    require_lab()
    cleanup_leftovers(PREFIX)
    tmp = tmp_path_factory.mktemp("rejections")
    pki = SimPki.load_or_create(tmp / "pki")
    other_root = SimPki.load_or_create(tmp / "other-pki")
    image = SimImage.named()
    debug = replace(image, td_attributes=bytes([1, 0, 0, 0x10, 0, 0, 0, 0]))
    tees = {
        "genuine": measured_tee(pki, tmp / "t-genuine", CVM_APP, b"\x01" * 20),
        "second": measured_tee(pki, tmp / "t-second", CVM_APP, b"\x02" * 20),
        "other_app": measured_tee(pki, tmp / "t-other", OTHER_APP, b"\x03" * 20),
        "wrong_root": measured_tee(other_root, tmp / "t-root", CVM_APP, b"\x04" * 20),
        "debug": _booted(pki, tmp / "t-debug", debug, CVM_APP, b"\x05" * 20),
        "rtmr3": measured_tee(pki, tmp / "t-rtmr3", OTHER_APP, b"\x06" * 20),
    }
    ids = {}
    for name, tee in tees.items():
        cert, key = _ratls(tee)
        if name == "rtmr3":  # an app not allowed, claiming an allowed app id in its log
            cert = _edited_rtmr3(cert, key)
        ids[name] = _write(tmp, name, cert, key)
    with Lab(cvms=0, workdir=tmp / "lab", prefix=PREFIX) as lab:
        store = SqliteStore(tmp / "registry.sqlite3")
        registry = Registry(store, PLAN, device=lab.gateway, clock=time.time)
        adv = Advertised(lab.gateway_public_key, str(lab.wg_address), lab.endpoint)
        creds = TlsCredentials(*plain_server_files(tmp / "server"))
        with serve_rpc(creds, pki, registry, adv, port=free_port()) as server:
            genuine_key = public_key(generate_private_key())
            status, answer = _post(server.port, ids["genuine"], _key_body(genuine_key))
            assert status == 200, answer
            yield World(lab, server, ids, genuine_key)
        store.close()


@dataclass(frozen=True)
class Snapshot:
    revision: int
    records: tuple[tuple[object, ...], ...]
    peers: tuple[tuple[str, tuple[str, ...]], ...]


def _snapshot(w: World) -> Snapshot:
    store = w.server.registry.store
    records = sorted(
        (r.instance_id, r.app_id, r.public_key, str(r.ip), json.dumps(r.port_policy), r.revision)
        for r in store.list_instances()
    )
    assert w.lab.gateway is not None
    peers = sorted(
        (p.public_key, tuple(str(n) for n in p.allowed_ips)) for p in w.lab.gateway.state().peers
    )
    return Snapshot(store.revision(), tuple(records), tuple(peers))


Case = Callable[[World], tuple[Identity | None, bytes]]

CASES: list[tuple[str, Case, int, str]] = [
    ("wrong_root", lambda w: (w.ids["wrong_root"], _key_body(_new())), 403, "quote_invalid"),
    ("wrong_rtmr3", lambda w: (w.ids["rtmr3"], _key_body(_new())), 403, "rtmr_mismatch"),
    ("app_not_allowed", lambda w: (w.ids["other_app"], _key_body(_new())), 403, "app_not_allowed"),
    ("debug_td", lambda w: (w.ids["debug"], _key_body(_new())), 403, "debug_td"),
    ("no_certificate", lambda w: (None, _key_body(_new())), 401, "no_evidence"),
    ("key_of_another", lambda w: (w.ids["second"], _key_body(w.genuine_key)), 409, "key_in_use"),
    ("malformed_json", lambda w: (w.ids["second"], b'{"client_public_key": '), 400, "bad_request"),
    ("not_an_object", lambda w: (w.ids["second"], b"[1, 2]"), 400, "bad_request"),
    (
        "oversized",
        lambda w: (w.ids["second"], b'{"pad": "' + b"x" * MAX_BODY + b'"}'),
        413,
        "too_large",
    ),
    (
        "key_31_bytes",
        lambda w: (w.ids["second"], _key_body(_short_key())),
        400,
        "invalid_registration",
    ),
]


def _new() -> str:
    return public_key(generate_private_key())


def _short_key() -> str:
    import base64

    return base64.b64encode(b"\x07" * 31).decode()


@pytest.mark.parametrize(
    ("case", "status", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_refused_with_its_reason_and_nothing_changed(
    world: World, case: Case, status: int, reason: str
) -> None:
    before = _snapshot(world)
    assert len(before.records) == 1  # the genuine instance, and its peer on the device:
    assert [p[0] for p in before.peers] == [world.genuine_key]
    ident, body = case(world)
    got_status, answer = _post(world.server.port, ident, body)
    assert (got_status, answer.get("reason")) == (status, reason), answer
    assert isinstance(answer.get("error"), str) and answer["error"]
    assert _snapshot(world) == before


def test_the_second_instance_registers_afterwards(world: World) -> None:
    """The identity the malformed cases used is itself admissible: they failed on their own
    merits, not on its evidence. (Runs last: it changes the state.)"""
    key = _new()
    status, answer = _post(world.server.port, world.ids["second"], _key_body(key))
    assert status == 200, answer
    assert world.lab.gateway is not None
    assert {p.public_key for p in world.lab.gateway.state().peers} == {world.genuine_key, key}
