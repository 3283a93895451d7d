"""A real registration RPC server for the guest-side tests, and the identities around it.

``serve_rpc`` runs tunnel's RPC app (``gateway.control.registration``) with a real SQLite
registry on a thread's own loop, with any server ``SSLContext``: the gateway's attested
RA-TLS identity (``gateway.control.rpc_identity``) or an impostor's certificate. ``python -m
tests.helpers.gateway_rpc`` runs the same server as a process (inside the lab's gateway
namespace, driving the lab's WireGuard device).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import ipaddress
import signal
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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
from gateway.control.rpc_identity import RpcIdentity
from gateway.control.tls_server import TlsCredentials, TlsSite
from gateway.registry.service import Registry
from gateway.registry.sqlite import SqliteStore
from gateway.tee.base import RuntimeEvent
from gateway.tee.sim import SimTee
from gateway.tee.sim_pki import SimPki
from gateway.tunnel.ipalloc import AddressPlan
from gateway.tunnel.wg import Backend, DeviceSpec, WgDevice

GW_APP = "9a7e0f1b2c3d4e5f60718293a4b5c6d7e8f90a1b"
CVM_APP = "5bb4ff9a3837357f19dc176407a5709c62eb6c56"
OTHER_APP = "00112233445566778899aabbccddeeff00112233"
PLAN = AddressPlan(
    ipaddress.IPv4Interface("10.0.0.1/24"),
    ipaddress.IPv4Network("10.0.0.0/24"),
    (ipaddress.IPv4Network("10.0.0.1/32"),),
)

CA = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str, now: float | None = None) -> CA:
    key = ec.generate_private_key(ec.SECP256R1())
    start = dt.datetime.fromtimestamp((now or time.time()) - 86400, dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_ca(ca: CA, directory: Path, name: str) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    cert.write_bytes(ca[0].public_bytes(serialization.Encoding.PEM))
    key.write_bytes(pem_key(ca[1]))
    key.chmod(0o600)
    return cert, key


def measured_tee(pki: SimPki, state_dir: Path, app_hex: str, instance: bytes) -> SimTee:
    """A simulated TD that has measured ``app_hex`` as its app (dstack's boot events)."""
    tee = SimTee(pki, state_dir)
    if not tee.runtime_events():
        for name, payload in [
            ("system-preparing", b""),
            ("app-id", bytes.fromhex(app_hex)),
            ("compose-hash", b"\xc1" * 32),
            ("instance-id", instance),
            ("boot-mr-done", b""),
            ("system-ready", b""),
        ]:
            tee.emit_event(RuntimeEvent(name, payload))
    return tee


def plain_server_files(directory: Path, *, issuer: CA | None = None) -> tuple[Path, Path]:
    """A certificate without attestation (self-signed, or from ``issuer``)."""
    key = ec.generate_private_key(ec.SECP256R1())
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name("impostor-gateway"))
        .issuer_name(issuer[0].subject if issuer else _name("impostor-gateway"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=10))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            False,
        )
    )
    return _write_pair(directory, builder, key, issuer)


def kms_server_files(directory: Path, kms: CA, app_hex: str) -> tuple[Path, Path]:
    """dstack's gateway certificate: KMS-issued, with the app-id extension (1.3)."""
    key = ec.generate_private_key(ec.SECP256R1())
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name("dstack-gateway"))
        .issuer_name(kms[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=10))
        .add_extension(
            x509.UnrecognizedExtension(
                ratls.OID_APP_ID, ratls.der_octet_string(bytes.fromhex(app_hex))
            ),
            False,
        )
    )
    return _write_pair(directory, builder, key, kms)


def _write_pair(
    directory: Path,
    builder: x509.CertificateBuilder,
    key: ec.EllipticCurvePrivateKey,
    ca: CA | None,
) -> tuple[Path, Path]:
    cert = builder.sign(ca[1] if ca else key, hashes.SHA256())
    directory.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = directory / "server.pem", directory / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(pem_key(key))
    return cert_file, key_file


@dataclass
class RpcServer:
    port: int
    registry: Registry
    service: RegistrationService

    def instances(self) -> list[str]:
        return [r.instance_id for r in self.registry.store.list_instances()]


@contextlib.contextmanager
def serve_rpc(
    ctx: ssl.SSLContext | TlsCredentials,
    pki: SimPki,
    registry: Registry,
    advertised: Advertised,
    *,
    host: str = "127.0.0.1",
    port: int,
    allowed_apps: tuple[str, ...] = (CVM_APP,),
) -> Iterator[RpcServer]:
    """Tunnel's RPC app on ``host:port`` in a thread with its own loop: served by the
    gateway's own TLS server (:class:`TlsSite`) for credentials, by aiohttp's stdlib TLS
    for an ``SSLContext``."""
    check = evidence_check(
        source=SimCollateralSource(pki),
        anchors=TrustAnchors(collateral=None, root_ca_der=pki.root_ca_der),
        policy=lambda: AdmissionPolicy(app_ids=allowed_apps),
    )
    service = RegistrationService(registry, check, advertised)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(create_rpc_app(service))

    async def start() -> None:
        await runner.setup()
        if isinstance(ctx, TlsCredentials):
            await TlsSite(runner, host, port, ctx).start()
        else:
            await web.TCPSite(runner, host, port, ssl_context=ctx).start()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    try:
        yield RpcServer(port, registry, service)
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


# --- as a process (the lab's gateway namespace) -----------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--pki", type=Path, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--client-ca", type=Path, help="optional extra TLS-layer client CA")
    p.add_argument("--mode", choices=["ratls", "plain"], default="ratls")
    p.add_argument("--app", default=GW_APP, help="the app id this gateway's TD measured")
    p.add_argument("--wg-iface", help="an existing WireGuard device to drive (default: none)")
    p.add_argument("--wg-key-file", type=Path, required=True)
    p.add_argument("--wg-ip", default="10.0.0.1/24")
    p.add_argument("--wg-endpoint", required=True)
    p.add_argument("--ready-file", type=Path, required=True)
    args = p.parse_args(argv)
    pki = SimPki.load(args.pki)
    if args.mode == "ratls":
        tee = measured_tee(pki, args.dir / "tee", args.app, b"\x99" * 20)
        creds = RpcIdentity(tee, args.dir / "rpc").credentials(args.client_ca)
    else:
        cert, key = plain_server_files(args.dir / "plain")
        creds = TlsCredentials(cert, key, args.client_ca)
    wg_key = args.wg_key_file.read_text().strip()
    device = None
    if args.wg_iface:
        spec = DeviceSpec(args.wg_iface, wg_key, backend=Backend.WIREGUARD_GO)
        device = WgDevice(spec).open()
    store = SqliteStore(args.dir / "registry.sqlite3")
    registry = Registry(store, PLAN, device=device, clock=time.time)
    from gateway.tunnel.keys import public_key

    adv = Advertised(public_key(wg_key), args.wg_ip, args.wg_endpoint)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with serve_rpc(creds, pki, registry, adv, host="0.0.0.0", port=args.port):
        args.ready_file.write_text("ready")
        while not stop.wait(0.2):
            pass
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
