"""``https://gateway.<base>/acme-info`` and ``/app-info`` from a real ``gateway serve``.

The gateway runs with a non-default ``core.data_dir`` and no ``certs_dir`` anywhere: the
certbot (in the control-plane child) gets a wildcard certificate from pebble through knotd,
and the proxy workers serve it from the same ``<data_dir>/certs`` (the two defaults agree).
The control plane publishes ``/acme-info`` (upstream's ``AcmeInfoResponse``: the account
and every certificate key with a quote binding it) and ``/app-info`` (the gateway's own
identity, from its simulated TDX) to the workers; a forced renewal and an account rotation
change what the workers answer, with no restart.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.protocol.tdx_quote import parse_tdx_quote
from gateway.tee.base import RuntimeEvent
from gateway.tee.sim import SimTee
from tests.certs.localstack import LocalStack, binaries_present, local_stack
from tests.helpers.processes import free_port, start, stop_by_pid, wait_listening, wait_until

pytestmark = pytest.mark.slow
ZONE = "info.test"
HOST = f"gateway.{ZONE}"
TOKEN = "info-e2e-token-" + "i" * 17
APP_ID = bytes.fromhex("1f" * 20)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    if not binaries_present():
        pytest.skip("pebble and knotd are not installed (apt-get install pebble knot)")
    with local_stack(tmp_path_factory.mktemp("acme"), [ZONE]) as s:
        yield s


def write_config(root: Path, stack: LocalStack, port: int, admin: int) -> Path:
    path = root / "gateway.toml"
    path.write_text(
        f"""
[core]
data_dir = "{root / "data"}"
log_level = "info"
[admin]
listen = "127.0.0.1:{admin}"
token_env = "GW_TEST_INFO_TOKEN"
[acme]
enabled = true
directory_url = "{stack.directory_url}"
ca_bundle = "{stack.listener_ca}"
renew_before = 600.0
check_interval = 600.0
jitter = 0.0
backoff_initial = 1.0
backoff_max = 4.0
issue_timeout = 30.0
poll_interval = 0.2
quote_binding = true
[[acme.domains]]
base_domain = "{ZONE}"
dns = "knot"
[dns.credentials.knot]
kind = "rfc2136"
server = "127.0.0.1"
port = {stack.dns_port}
zone = "{ZONE}"
tsig_key_name = "{stack.tsig_name}"
tsig_secret_env = "GW_TEST_INFO_TSIG"
ttl = 10
check_port = {stack.dns_port}
[rpc]
enabled = false  # the sim TEE backs /app-info and quote binding; no tunnel in this test
[rpc_identity]
tee = "sim"
sim_dir = "{root / "sim"}"
[proxy]
listen = ["127.0.0.1:{port}"]
workers = 2
base_domains = ["{ZONE}"]
"""
    )
    return path


def fetch(port: int, root_ca: Path, path: str) -> tuple[int, Any, x509.Certificate]:
    """GET over TLS (SNI gateway.<base>, verified against pebble's root) with Python ssl."""
    ctx = ssl.create_default_context(cafile=str(root_ca))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=HOST) as tls:
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
            der = tls.getpeercert(binary_form=True)
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert der is not None
    return status, json.loads(body) if body else None, x509.load_der_x509_certificate(der)


def spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_acme_info_and_app_info_on_the_proxy_port(stack: LocalStack, tmp_path: Path) -> None:
    # the gateway CVM's identity, as its boot would have extended RTMR3
    sim = SimTee.open(tmp_path / "sim" / "pki", tmp_path / "sim" / "tee")
    sim.emit_event(RuntimeEvent("app-id", APP_ID))
    sim.emit_event(RuntimeEvent("instance-id", b"\x07" * 20))
    port, admin_port = free_port(), free_port()
    cfg = write_config(tmp_path, stack, port, admin_port)
    root_ca = tmp_path / "pebble-root.pem"
    root_ca.write_bytes(stack.pebble_root_pem())
    log = tmp_path / "gateway.log"
    env = {**os.environ, "GW_TEST_INFO_TOKEN": TOKEN, "GW_TEST_INFO_TSIG": stack.tsig_secret}
    cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(cfg)]
    proc = start(cmd, log, env=env)
    admin = httpx.Client(
        base_url=f"http://127.0.0.1:{admin_port}", headers={"X-Admin-Token": TOKEN}, timeout=60
    )
    try:
        wait_listening(proc, "127.0.0.1", port, timeout=20, log=log)
        wait_listening(proc, "127.0.0.1", admin_port, timeout=20, log=log)

        def keys() -> list[dict[str, str]]:
            try:
                status, doc, _ = fetch(port, root_ca, "/acme-info")
            except (OSError, ssl.SSLError):
                return []  # no certificate yet: the handshake fails
            return list(doc["quoted_hist_keys"]) if status == 200 else []

        wait_until(lambda: len(keys()) == 1, proc, 60, "first certificate in /acme-info", log)
        # what the proxy serves is the certbot's certificate, read from <data_dir>/certs
        assert (tmp_path / "data" / "certs" / ZONE / "fullchain.pem").exists()
        status, doc, served = fetch(port, root_ca, "/acme-info")
        assert list(doc) == ["account_uri", "quoted_hist_keys", "account_quote",
                             "account_attestation"]  # fmt: skip
        assert doc["account_uri"] == admin.get("/api/v1/acme").json()["account_uri"] != ""
        (key,) = doc["quoted_hist_keys"]
        assert bytes.fromhex(key["public_key"]) == spki(served)
        quote = json.loads(key["quote"])
        bound = hashlib.sha512(b"zt-cert:" + spki(served)).digest()
        assert bytes.fromhex(quote["report_data"]) == bound
        assert parse_tdx_quote(bytes.fromhex(quote["quote"])).report.report_data == bound
        account = json.loads(doc["account_quote"])
        assert account["account_uri"] == doc["account_uri"]

        # /app-info: the gateway's own identity, read back from its (simulated) RTMR3
        status, app, _ = fetch(port, root_ca, "/.dstack/app-info")
        assert status == 200 and app["app_id"] == APP_ID.hex(), app
        assert app["instance_id"] == "07" * 20
        assert json.loads(app["tcb_info"])["rtmr3"] == sim.rtmrs()[3].hex()

        # curl, as an operator would
        out = subprocess.run(
            ["curl", "-sS", "--cacert", str(root_ca), "--resolve", f"{HOST}:{port}:127.0.0.1",
             f"https://{HOST}:{port}/acme-info"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        assert json.loads(out.stdout) == doc, out.stderr

        # a forced renewal: a new key, served and published without a restart
        r = admin.post(f"/api/v1/certificates/{ZONE}/renew", json={"force": True})
        assert r.status_code == 200 and r.json()["renewed"] is True, r.text
        wait_until(lambda: len(keys()) == 2, proc, 20, "renewed key in /acme-info", log)
        _, doc2, served2 = fetch(port, root_ca, "/acme-info")
        assert served2.serial_number != served.serial_number
        assert spki(served2).hex() in {k["public_key"] for k in doc2["quoted_hist_keys"]}

        # a new ACME account: /acme-info names it, quoted again
        r = admin.post("/api/v1/acme/rotate-credentials", json={})
        assert r.status_code == 200, r.text
        new_uri = r.json()["account_uri"]
        assert new_uri != doc["account_uri"]

        def published_uri() -> str:
            return str(fetch(port, root_ca, "/acme-info")[1]["account_uri"])

        wait_until(lambda: published_uri() == new_uri, proc, 20, "new account in /acme-info", log)
        assert (
            json.loads(fetch(port, root_ca, "/acme-info")[1]["account_quote"])["account_uri"]
            == new_uri
        )
        info_file = tmp_path / "data" / "run" / "proxy" / "gateway-info.json"
        assert info_file.stat().st_mode & 0o777 == 0o644
        assert TOKEN not in log.read_text() and stack.tsig_secret not in log.read_text()
    finally:
        admin.close()
        stop_by_pid(proc, grace=10)
