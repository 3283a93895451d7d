"""``gateway attest`` end to end, as separate processes (exit codes and JSON reports)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.tee.base import RuntimeEvent, replay

DATA = Path(__file__).parents[1] / "data" / "tdx-sample"
COLLATERAL = DATA / "tdx_quote_collateral.json"


def gateway(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "attest", *map(str, args)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    r = gateway("sim-pki", "--dir", d / "pki")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["created"] is True and Path(info["root_ca"]).exists()
    again = json.loads(gateway("sim-pki", "--dir", d / "pki").stdout)
    assert again["created"] is False and again["root_sha256"] == info["root_sha256"]
    r = gateway("sim-quote", "--pki-dir", d / "pki", "--report-data", "ab" * 64,
                "--event", "app-id:0102", "--event", "system-ready:",
                "--out", d / "q", "--collateral-out", d / "c.json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    return d


def test_sample_accepted_at_its_time() -> None:
    r = gateway("verify", "--quote", DATA / "tdx_quote",
                "--collateral", COLLATERAL, "--at", "1751500000")  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["verdict"] == "accepted" and report["status"] == "UpToDate"
    assert report["root"] == "intel"
    assert report["measurements"]["mr_td"].startswith("91eb2b44d141d4ec")


def test_sample_rejected_after_crl_expiry() -> None:
    r = gateway("verify", "--quote", DATA / "tdx_quote",
                "--collateral", COLLATERAL, "--at", "1752919236")  # fmt: skip
    assert r.returncode == 1
    report = json.loads(r.stdout)
    assert report["verdict"] == "rejected" and report["reason"] == "crl_expired"


def test_sim_quote_accepted_under_its_root_only(sim: Path) -> None:
    r = gateway("verify", "--quote", sim / "q", "--collateral", sim / "c.json",
                "--root-ca", sim / "pki" / "root.der")  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["root"].startswith("sha256:")
    assert "non-Intel root" in r.stderr
    expected = replay([RuntimeEvent("app-id", b"\x01\x02"), RuntimeEvent("system-ready", b"")])
    assert report["measurements"]["rt_mr3"] == expected.hex()
    assert report["measurements"]["report_data"] == "ab" * 64
    r = gateway("verify", "--quote", sim / "q", "--collateral", sim / "c.json")
    assert r.returncode == 1
    assert json.loads(r.stdout)["reason"] == "wrong_root"


def test_hex_quote_file_is_accepted(sim: Path, tmp_path: Path) -> None:
    (tmp_path / "q.hex").write_text((sim / "q").read_bytes().hex() + "\n")
    r = gateway("verify", "--quote", tmp_path / "q.hex", "--collateral", sim / "c.json",
                "--root-ca", sim / "pki" / "root.pem")  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr


def test_debug_td_rejected_and_allow_status(sim: Path, tmp_path: Path) -> None:
    r = gateway("sim-quote", "--pki-dir", sim / "pki", "--report-data", "00",
                "--debug-td", "--out", tmp_path / "dq")  # fmt: skip
    assert r.returncode == 0
    r = gateway("verify", "--quote", tmp_path / "dq", "--collateral", sim / "c.json",
                "--root-ca", sim / "pki" / "root.der", "--allow-status", "OutOfDate",
                "SWHardeningNeeded")  # fmt: skip
    assert r.returncode == 1
    report = json.loads(r.stdout)
    assert report["reason"] == "debug_td"
    assert report["allowed_statuses"] == ["OutOfDate", "SWHardeningNeeded", "UpToDate"]


@pytest.mark.parametrize(
    "argv",
    [
        ["verify"],
        ["verify", "--quote", "/nonexistent/quote"],
        ["verify", "--quote", str(DATA / "tdx_quote"), "--collateral", "/nonexistent.json"],
        [
            "verify",
            "--quote",
            str(DATA / "tdx_quote"),
            "--allow-status",
            "Revoked",
            "--collateral",
            str(DATA / "tdx_quote_collateral.json"),
        ],
        ["verify", "--quote", str(DATA / "tdx_quote"), "--root-ca", "/nonexistent.der"],
        ["sim-quote", "--pki-dir", "/nonexistent", "--report-data", "00", "--out", "/tmp/x"],
        ["bogus"],
    ],
)
def test_usage_errors_exit_2(argv: list[str]) -> None:
    r = gateway(*argv)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr


def test_sim_quote_usage_errors(sim: Path, tmp_path: Path) -> None:
    base: list[str | Path] = ["sim-quote", "--pki-dir", sim / "pki", "--out", tmp_path / "x"]
    assert gateway(*base, "--report-data", "zz").returncode == 2
    assert gateway(*base, "--report-data", "00" * 65).returncode == 2
    assert gateway(*base, "--report-data", "00", "--rtmr3", "00").returncode == 2
    assert gateway(*base, "--report-data", "00", "--rtmr3", "00" * 48,
                   "--event", "a:00").returncode == 2  # fmt: skip
    assert gateway(*base, "--report-data", "00", "--event", "nocolon").returncode == 2


def test_garbage_quote_rejected_as_malformed(sim: Path, tmp_path: Path) -> None:
    (tmp_path / "g").write_bytes(b"\x04\x00garbage")
    r = gateway("verify", "--quote", tmp_path / "g", "--collateral", sim / "c.json")
    assert r.returncode == 1
    assert json.loads(r.stdout)["reason"] == "malformed"


def test_unreachable_pccs_is_exit_1(sim: Path, tmp_path: Path) -> None:
    from tests.helpers.processes import free_port

    r = gateway("verify", "--quote", sim / "q", "--pccs-url",
                f"http://127.0.0.1:{free_port()}", "--cache-dir", tmp_path)  # fmt: skip
    assert r.returncode == 1
    assert json.loads(r.stdout)["reason"] == "collateral_unavailable"


def test_benchmark_tamper_matrix_holds() -> None:
    """The table in docs/attestation.md comes from this script; keep it honest."""
    script = Path(__file__).parents[2] / "benchmarks" / "attest_bench.py"
    r = subprocess.run([sys.executable, str(script), "--matrix"], capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("\n| ") >= 30
