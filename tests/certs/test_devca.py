from __future__ import annotations

import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.certs.devca import ensure_dev_ca, ensure_dev_wildcard


def test_dev_ca_is_created_once(tmp_path: Path) -> None:
    ca = ensure_dev_ca(tmp_path / "ca")
    first = ca.cert_path.read_bytes()
    assert ensure_dev_ca(tmp_path / "ca").cert_path.read_bytes() == first
    assert oct(ca.key_path.stat().st_mode & 0o777) == "0o600"


def test_wildcard_chain_verifies_against_the_ca(tmp_path: Path) -> None:
    ca, cert_dir = ensure_dev_wildcard(tmp_path / "ca", tmp_path / "certs", "demo.test")
    chain = x509.load_pem_x509_certificates((cert_dir / "fullchain.pem").read_bytes())
    assert len(chain) == 2  # leaf first, then the CA: no per-handshake chain building
    leaf, root = chain
    ca_cert, _ = ca.load()
    assert root == ca_cert
    leaf.verify_directly_issued_by(ca_cert)
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
    assert leaf.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["*.demo.test", "demo.test"]
    # and a real TLS client accepts it
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_dir / "fullchain.pem", cert_dir / "privkey.pem")
    client = ssl.create_default_context(cafile=str(ca.cert_path))
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    cli = client.wrap_bio(c_in, c_out, server_hostname="app-1.demo.test")
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for obj in (cli, srv):
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    cli.do_handshake()
    assert cli.version() == "TLSv1.3"
