"""``gateway attest verify --cert/--attestation`` and ``attest replay``, as real processes."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.attest import ratls
from gateway.protocol.attestation import decode_attestation, encode_event_log_json
from gateway.tee.base import RuntimeEvent
from gateway.tee.sim import SimTee
from gateway.tee.sim_pki import SimPki

FIXTURE = Path(__file__).parents[1] / "data" / "dstack-simulator" / "attestation.bin"
FIXTURE_RTMR3 = (
    "f28a1490ee924e9396c2ccf2d93ad536b83cbe159a1d45024d1fd7ac"
    "dcc102145efcfcd0cfa209416446c70226affadf"
)
APP = "5bb4ff9a3837357f19dc176407a5709c62eb6c56"


def gateway(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "attest", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | int]:
    """A sim PKI on disk, a booted sim CVM, its RA-TLS cert (PEM) and collateral JSON."""
    d = tmp_path_factory.mktemp("evidence-cli")
    now = int(time.time())
    pki = SimPki.load_or_create(d / "pki")
    tee = SimTee(pki, d / "cvm")
    for name, payload in [
        ("system-preparing", b""),
        ("app-id", bytes.fromhex(APP)),
        ("compose-hash", b"\xc1" * 32),
        ("instance-id", b"\x16" * 20),
        ("boot-mr-done", b""),
        ("system-ready", b""),
    ]:
        tee.emit_event(RuntimeEvent(name, payload))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ratls.build_ratls_cert(
        key, tee, ratls.CertRequest("cvm"), now=dt.datetime.fromtimestamp(now, dt.UTC)
    )
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "col.json").write_text(pki.collateral(now).to_json())
    return {"dir": d, "now": now, "root": d / "pki" / "root.der", "cvm": d / "cvm"}


def verify_cert(sim: dict[str, Path | int], *extra: str | Path) -> subprocess.CompletedProcess[str]:
    d, root = sim["dir"], sim["root"]
    assert isinstance(d, Path) and isinstance(root, Path)
    return gateway(
        "verify", "--cert", d / "cert.pem", "--root-ca", root,
        "--collateral", d / "col.json", "--at", str(sim["now"]), *extra,
    )  # fmt: skip


def test_verify_cert_accepted(sim: dict[str, Path | int]) -> None:
    r = verify_cert(sim)
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads(r.stdout)
    assert rep["verdict"] == "accepted" and rep["reason"] is None
    assert rep["method"] == "ratls" and rep["status"] == "UpToDate"
    assert rep["identity"]["app_id"] == APP
    assert rep["measurements"]["rtmr3"] == rep["identity"]["rtmr3"]


def test_verify_cert_refused_by_policy_file(sim: dict[str, Path | int], tmp_path: Path) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"app_ids": ["00" * 20]}))
    r = verify_cert(sim, "--policy", policy)
    assert r.returncode == 1, r.stdout + r.stderr
    rep = json.loads(r.stdout)
    assert rep["verdict"] == "rejected" and rep["reason"] == "app_not_allowed"
    assert rep["identity"]["app_id"] == APP  # who was refused is reported
    policy.write_text(json.dumps({"app_ids": [APP]}))
    assert verify_cert(sim, "--policy", policy).returncode == 0


def test_verify_cert_under_intel_root_is_rejected(sim: dict[str, Path | int]) -> None:
    d = sim["dir"]
    assert isinstance(d, Path)
    r = gateway("verify", "--cert", d / "cert.pem", "--collateral", d / "col.json",
                "--at", str(sim["now"]))  # fmt: skip
    assert r.returncode == 1
    rep = json.loads(r.stdout)
    assert rep["reason"] == "quote_invalid" and rep["quote_reason"]


def test_verify_fixture_attestation_fails_closed(sim: dict[str, Path | int]) -> None:
    # The fixture's quote is a simulator's: no root we hold verifies it.
    d, root = sim["dir"], sim["root"]
    assert isinstance(d, Path) and isinstance(root, Path)
    r = gateway("verify", "--attestation", FIXTURE, "--root-ca", root,
                "--collateral", d / "col.json", "--at", str(sim["now"]))  # fmt: skip
    assert r.returncode == 1, r.stdout + r.stderr
    assert json.loads(r.stdout)["reason"] == "quote_invalid"


@pytest.mark.parametrize(
    "args",
    [
        ("verify",),
        ("verify", "--cert", "x", "--quote", "y"),
        ("verify", "--cert", "/nonexistent/cert.pem", "--collateral", FIXTURE),
        ("replay",),
    ],
)
def test_usage_errors(args: tuple[str, ...]) -> None:
    assert gateway(*args).returncode == 2


def test_bad_policy_file_is_a_usage_error(sim: dict[str, Path | int], tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"app_ids": ["nothex"]}')
    r = verify_cert(sim, "--policy", bad)
    assert r.returncode == 2 and "app_ids" in r.stderr


def test_replay_fixture_attestation() -> None:
    r = gateway("replay", "--attestation", FIXTURE)
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads(r.stdout)
    assert rep["status"] == "match" and rep["rtmr3"] == FIXTURE_RTMR3
    assert rep["boot_rtmrs_match"] is True
    assert rep["identity"]["app_id"] == APP
    assert rep["identity"]["boot_rtmr3"].startswith("161d4d87")
    assert [e["event"] for e in rep["events"]][:2] == ["system-preparing", "app-id"]


def test_replay_event_log_json(tmp_path: Path) -> None:
    log = tmp_path / "log.json"
    log.write_text(encode_event_log_json(decode_attestation(FIXTURE.read_bytes()).event_log))
    r = gateway("replay", "--event-log", log)
    assert r.returncode == 0 and json.loads(r.stdout)["rtmr3"] == FIXTURE_RTMR3
    r = gateway("replay", "--event-log", log, "--expect-rtmr3", "00" * 48)
    assert r.returncode == 1
    rep = json.loads(r.stdout)
    assert rep["status"] == "mismatch" and rep["mismatch"]


def test_replay_runtime_events_log_of_a_sim_cvm(sim: dict[str, Path | int]) -> None:
    cvm = sim["cvm"]
    assert isinstance(cvm, Path)
    tee = SimTee(SimPki.load(cvm.parent / "pki"), cvm)
    logs = [p for p in cvm.iterdir() if p.name.endswith(".log")]
    assert logs, "the sim CVM writes dstack's runtime_events.log"
    r = gateway("replay", "--event-log", logs[0], "--expect-rtmr3", tee.rtmrs()[3].hex())
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["identity"]["app_id"] == APP


def test_replay_garbage_is_invalid(tmp_path: Path) -> None:
    f = tmp_path / "junk"
    f.write_bytes(b"\x00\x00\xff\xff")
    r = gateway("replay", "--attestation", f)
    assert r.returncode == 1 and json.loads(r.stdout)["status"] == "invalid"


def test_replay_bad_runtime_log_line(tmp_path: Path) -> None:
    f = tmp_path / "runtime_events.log"
    f.write_text('{"event":"app-id","payload":"AQ=="}\n{"event":7,"payload":""}\n')
    r = gateway("replay", "--event-log", f)
    assert r.returncode == 1
    assert "line 2" in json.loads(r.stdout)["error"]
