"""An RA-TLS certificate in a real TLS handshake (Python ssl, and openssl s_client), and the
peer certificate taken from that handshake verified into an admission verdict."""

from __future__ import annotations

import datetime as dt
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.attest import ratls
from gateway.attest.policy_settings import AdmissionPolicy
from gateway.attest.verifier import TrustAnchors, verify_evidence
from gateway.tee.base import RuntimeEvent
from gateway.tee.sim import SimTee
from gateway.tee.sim_pki import SimPki

APP = "5bb4ff9a3837357f19dc176407a5709c62eb6c56"


@pytest.fixture
def server(sim_pki: SimPki, sim_now: int, tmp_path: Path) -> Iterator[int]:
    """A TLS server on 127.0.0.1 presenting an RA-TLS certificate; yields its port."""
    tee = SimTee(sim_pki, tmp_path / "cvm")
    for name, payload in [("app-id", bytes.fromhex(APP)), ("system-ready", b"")]:
        tee.emit_event(RuntimeEvent(name, payload))
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.fromtimestamp(sim_now, dt.UTC)
    cert = ratls.build_ratls_cert(
        key, tee, ratls.CertRequest("cvm", alt_names=("127.0.0.1",)), now=now
    )
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)  # the accept loop polls ``stop``
    port = listener.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(10)
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"hello\n")
            except (OSError, ssl.SSLError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        stop.set()
        listener.close()
        thread.join(timeout=5)


def _verdict(der: bytes, pki: SimPki, now: int) -> tuple[bool, str]:
    anchors = TrustAnchors(collateral=pki.collateral(now), root_ca_der=pki.root_ca_der)
    r = verify_evidence(anchors=anchors, policy=AdmissionPolicy(app_ids=(APP,)), now=now, cert=der)
    assert r.evidence is not None, r.verdict
    return r.verdict.accepted, r.evidence.identity.app_id.hex()


def test_python_ssl_peer_cert_verifies(server: int, sim_pki: SimPki, sim_now: int) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # trust comes from the quote, not from a web PKI
    with socket.create_connection(("127.0.0.1", server), timeout=10) as raw:
        with ctx.wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
            assert tls.recv(6) == b"hello\n"
    assert der is not None
    assert _verdict(der, sim_pki, sim_now) == (True, APP)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_openssl_s_client_sees_the_dstack_extensions(
    server: int, sim_pki: SimPki, sim_now: int
) -> None:
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{server}", "-showcerts"],
        input=b"", capture_output=True, timeout=20,
    )  # fmt: skip
    pem = out.stdout.split(b"-----BEGIN CERTIFICATE-----", 1)[1].split(b"-----END", 1)[0]
    pem = b"-----BEGIN CERTIFICATE-----" + pem + b"-----END CERTIFICATE-----\n"
    text = subprocess.run(
        ["openssl", "x509", "-noout", "-text"], input=pem, capture_output=True, timeout=20
    ).stdout
    assert b"1.3.6.1.4.1.62397.1.8" in text and b"1.3.6.1.4.1.62397.1.4" in text
    assert _verdict(pem, sim_pki, sim_now) == (True, APP)
