"""``python -m gateway guest simulate``: a simulated CVM a developer points the SDK at."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from dstack_sdk import DstackClient, EnvVar, encrypt_env_vars_sync

from gateway.attest.quote import verify_quote
from gateway.protocol.attestation import decode_event_log_json
from gateway.tee.base import RuntimeEvent, replay
from gateway.tee.sim_pki import SimPki
from tests.helpers.processes import free_port, running, wait_until

pytestmark = pytest.mark.slow

APP = {
    "manifest_version": 2,
    "name": "dev-app",
    "runner": "bash",
    "bash_script": 'echo "secret=$DB_PASSWORD" > app-env.txt; exec sleep 60',
    "key_provider": "kms",
    "allowed_envs": ["DB_PASSWORD"],
    "public_tcbinfo": False,
    "public_sysinfo": True,
}


@contextmanager
def _simulate(tmp: Path, shared: Path, port: int, run: int) -> Iterator[Path]:
    """Start the simulator as a real process (own session), stop it by PID."""
    sock = tmp / "dstack.sock"
    log = tmp / f"simulate-{run}.log"
    cmd = [
        sys.executable, "-m", "gateway", "guest", "simulate", "--socket", str(sock),
        "--host-shared", str(shared), "--state-dir", str(tmp / "state"),
        "--tappd-socket", str(tmp / "tappd.sock"), "--public-port", str(port),
    ]  # fmt: skip
    with running(cmd, log, ready=lambda: b"dstack simulator ready" in log.read_bytes(), timeout=30):
        yield sock


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    d = tmp_path / "shared"
    d.mkdir()
    (d / "app-compose.json").write_text(json.dumps(APP))
    return d


def test_simulator_end_to_end(
    tmp_path: Path, shared: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    # first start: learn the env public key of this app (KMS keys persist in the state dir)
    with _simulate(tmp_path, shared, port, 1):
        pub = (tmp_path / "state" / "env-encrypt-pubkey.txt").read_text().strip()
    (shared / ".encrypted-env").write_bytes(
        bytes.fromhex(
            encrypt_env_vars_sync([EnvVar("DB_PASSWORD", "hunter2"), EnvVar("PATH", "/x")], pub)
        )
    )
    with _simulate(tmp_path, shared, port, 2) as sock:
        monkeypatch.setenv("DSTACK_SIMULATOR_ENDPOINT", str(sock))
        client = DstackClient()
        client.__enter__()
        try:
            info = client.info()
            quote = client.get_quote(b"nonce-1234")
            key = client.get_key("wallet", "eth")
            tls = client.get_tls_key(subject="dev", usage_ra_tls=True)
            client.emit_event("dev-event", b"1")
            after = client.get_quote(b"nonce-5678")
        finally:
            client.__exit__(None, None, None)
        # the app got its decrypted, filtered env
        out = tmp_path / "state" / "work" / "app-env.txt"
        wait_until(lambda: out.exists() and out.read_text().strip() != "", None, 10, "app output")
        assert out.read_text() == "secret=hunter2\n"
        # quotes really verify, under the simulator root the developer is told about
        root = x509.load_pem_x509_certificate((tmp_path / "state" / "sim-root-ca.pem").read_bytes())
        pki = SimPki.load(tmp_path / "state" / "pki")
        now = int(time.time())
        verified = verify_quote(
            quote.decode_quote(),
            pki.collateral(now),
            root_ca_der=root.public_bytes(serialization.Encoding.DER),
            now=now,
        )
        assert verified.report_data == b"nonce-1234".ljust(64, b"\0")
        events = [
            RuntimeEvent(e.event, e.event_payload)
            for e in decode_event_log_json(after.event_log)
            if e.imr == 3
        ]
        assert events[-1].name == "dev-event"
        later = verify_quote(
            after.decode_quote(), pki.collateral(now), root_ca_der=pki.root_ca_der, now=now
        )
        assert replay(events) == later.rt_mr3
        # the simulated firmware log makes the SDK's own replay match every RTMR
        assert after.replay_rtmrs() == {i: mr.hex() for i, mr in enumerate(later.rtmrs)}
        # ... and with the project's own verifier, collateral from the simulator's PCCS
        quote_file = tmp_path / "quote.hex"
        quote_file.write_text(quote.quote)
        pccs = (tmp_path / "state" / "pccs-url.txt").read_text().strip()
        check = subprocess.run(
            [sys.executable, "-m", "gateway", "attest", "verify", "--quote", str(quote_file),
             "--root-ca", str(tmp_path / "state" / "sim-root-ca.pem"), "--pccs-url", pccs,
             "--cache-dir", str(tmp_path / "state" / "collateral-cache")],
            capture_output=True, timeout=60,
        )  # fmt: skip
        assert check.returncode == 0, check.stdout + check.stderr
        report = json.loads(check.stdout)
        assert report["verdict"] == "accepted"
        assert report["measurements"]["report_data"].startswith(b"nonce-1234".hex())
        assert info.app_name == "dev-app" and len(key.decode_key()) == 32
        assert len(tls.certificate_chain) == 3  # leaf, app CA, KMS root (KMS SignCert)
        # the public port reveals only what app-compose makes public
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
            r = http.get("/prpc/Worker.Info")
            assert r.headers["X-App-Version"] and r.json()["app_id"] == info.app_id
            assert r.json()["tcb_info"] == ""  # public_tcbinfo is false
            assert "system_total_memory" in http.get("/metrics").text
            page = http.get("/").text
            assert "dev-app" in page and "TCB info is not public" in page
            assert "hunter2" not in page
        # the guest API (unix socket fallback in the lab)
        transport = httpx.HTTPTransport(uds=str(tmp_path / "state" / "guest-api.sock"))
        with httpx.Client(transport=transport, base_url="http://localhost") as api:
            containers = api.post("/api/ListContainers", json={}).json()["containers"]
            assert containers[0]["names"] == ["dev-app"] and containers[0]["state"] == "running"
            assert api.post("/api/SysInfo", json={}).json()["num_cpus"] >= 1
            assert api.post("/api/Info", json={}).json()["app_id"] == info.app_id
