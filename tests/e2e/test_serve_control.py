"""``gateway serve`` with an attested registration RPC runs ONE control process, and the admin
API governs that RPC.

Lab (prefix ``unc``): a real ``gateway serve`` in the gateway namespace with ``[rpc_identity]
tee = "sim"`` (RA-TLS server identity from simulated TDX), an admin API on a unix socket
with a token, and a file admission policy that admits nobody; one CVM namespace running the
real registration client (``gateway.guest.register_cmd``: verifies the gateway's RA-TLS quote
and app id, presents its own RA-TLS client certificate, wireguard-go). Checked:

* the supervisor has exactly one control child (by PID, from ``/proc``), and it is
  ``gateway control`` (no ``gateway rpc``); the other children are the proxy workers;
* the CVM is refused (``app_not_allowed`` in ``/metrics``) until a ``PUT
  /api/v1/admission-policy`` through the admin API, after which its next attempt registers
  and its origin answers through the tunnel;
* SIGKILL of the control child: the supervisor starts exactly one new one, which admits the
  CVM's refresh under the policy the API stored (the file still admits nobody);
* stopping serve by PID leaves no control child behind.
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from gateway.lab.harness import Lab, cleanup_leftovers
from gateway.tee.sim_pki import SimPki
from gateway.tunnel.commands import in_netns
from tests.e2e.test_tunnel_e2e import RPC_PORT, _start_registrar, status
from tests.helpers.gateway_rpc import CVM_APP, GW_APP, make_ca, measured_tee, write_ca
from tests.helpers.lab import require_lab
from tests.helpers.processes import start, stop_by_pid, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.netns]

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "unc"
TOKEN = "unify-token-" + "u" * 20
WORKERS = 2


def children(pid: int) -> dict[int, list[str]]:
    """The live children of ``pid`` and their command lines, from ``/proc``."""
    found: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text(errors="replace")
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found[int(entry.name)] = [a.decode(errors="replace") for a in cmdline.split(b"\0")]
    return found


def _is(argv: list[str], command: str) -> bool:
    return argv[1:4] == ["-m", "gateway", command]


def control_children(serve_pid: int) -> list[int]:
    """PIDs of serve's control children, once each has exec'd (asserting nothing else runs
    beside them but the proxy workers)."""
    kids = children(serve_pid)
    control = [pid for pid, argv in kids.items() if _is(argv, "control")]
    others = {pid: argv for pid, argv in kids.items() if pid not in control}
    assert all(_is(argv, "serve") for argv in others.values()), others  # workers (forked)
    return control


def _config(tmp: Path, lab: Lab, pki: SimPki, pki_dir: Path, client_ca: Path) -> Path:
    sim = tmp / "gw-sim"
    sim.mkdir()
    (sim / "pki").symlink_to(pki_dir)
    measured_tee(pki, sim / "tee", GW_APP, b"\x55" * 20)
    (tmp / "root.der").write_bytes(pki.root_ca_der)
    (tmp / "collateral.json").write_text(pki.collateral(int(time.time())).to_json())
    config = tmp / "gateway.toml"
    config.write_text(
        f"[core]\ndata_dir = '{tmp / 'gw-data'}'\n"
        f"[admin]\nlisten = 'unix:{tmp / 'admin.sock'}'\ntoken_env = 'GW_TEST_UNIFY_TOKEN'\n"
        f"[proxy]\nlisten = ['127.0.0.1:9443']\nworkers = {WORKERS}\n"
        f"certs_dir = '{tmp / 'gw-certs'}'\n"
        "[proxy.timeouts]\ndrain = 1.0\n"
        f"[wg]\ninterface = '{lab.base}gw'\nlisten_port = {lab.wg_port}\n"
        f"endpoint = '{lab.endpoint}'\nbackend = 'wireguard-go'\nhandshake_poll_interval = 0.3\n"
        f"[attest]\nroot_ca = '{tmp / 'root.der'}'\ncollateral_source = 'file'\n"
        f"collateral_file = '{tmp / 'collateral.json'}'\n"
        "[admission]\napp_ids = []\n"  # the file admits nobody
        f"[rpc]\naddress = '{lab.underlay.ip}'\nport = {RPC_PORT}\nclient_ca_file = '{client_ca}'\n"
        f"[rpc_identity]\ntee = 'sim'\nsim_dir = '{sim}'\n"
    )
    return config


def _metric(admin: httpx.Client, outcome: str) -> int:
    text = admin.get("/metrics").text
    m = re.search(rf'gateway_registration_verifications_total{{outcome="{outcome}"}} (\d+)', text)
    return int(m.group(1)) if m else 0


def test_one_control_child_serves_the_attested_rpc_under_the_admin_policy(
    tmp_path: Path,
) -> None:
    require_lab("curl", "iptables")
    cleanup_leftovers(PREFIX)
    pki_dir = tmp_path / "pki"
    pki = SimPki.load_or_create(pki_dir)
    client_ca = write_ca(make_ca("CVM client CA"), tmp_path, "client-ca")
    with Lab(cvms=1, workdir=tmp_path / "lab", prefix=PREFIX, gateway_device=False) as lab:
        (node,) = lab.nodes
        config = _config(tmp_path, lab, pki, pki_dir, client_ca[0])
        log = tmp_path / "serve.log"
        env = {**os.environ, "GW_TEST_UNIFY_TOKEN": TOKEN}
        argv = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
        serve = start(in_netns(lab.gw_netns, argv), log, env=env, cwd=ROOT)
        registrar: subprocess.Popen[bytes] | None = None
        admin = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(tmp_path / "admin.sock")),
            base_url="http://admin",
            headers={"X-Admin-Token": TOKEN},
            timeout=10,
        )
        try:
            wait_until(lambda: b"registration RPC on" in log.read_bytes(), serve, 40, "rpc", log)
            text = log.read_text()
            assert "attested RA-TLS identity" in text and "admin API listening" in text
            assert text.count("control process started") == 1
            assert not re.search(r"-m gateway rpc|admin API is OFF", text)
            wait_until(lambda: len(children(serve.pid)) == WORKERS + 1, serve, 10, "children")
            (first,) = control_children(serve.pid)

            # the file admits nobody: the CVM (which verified our RA-TLS quote) is refused
            registrar, work = _start_registrar(tmp_path, lab, node, pki_dir, client_ca)
            registrar_log = tmp_path / f"registrar-{node.index}.log"
            wait_until(lambda: _metric(admin, "app_not_allowed") >= 1, registrar, 30, "a refusal")
            assert not status(work).get("configured") and _metric(admin, "accepted") == 0

            r = admin.put("/api/v1/admission-policy", json={"app_ids": [CVM_APP]})
            assert r.status_code == 200 and r.json()["source"] == "admin", r.text
            t0 = time.monotonic()
            wait_until(
                lambda: bool(status(work).get("configured")),
                registrar,
                20,
                "registration after the policy PUT",
                registrar_log,
            )
            print(f"registered {time.monotonic() - t0:.2f}s after the admission-policy PUT")
            assert _metric(admin, "accepted") >= 1
            # the RPC's answers are counted by final outcome, and the node reports ready
            reg = admin.get("/metrics").text
            assert re.search(
                r'gateway_registrations_total\{outcome="accepted",reason="ok"\} [1-9]', reg
            )
            assert re.search(r'gateway_registrations_total\{outcome="rejected",[^}]*\} [1-9]', reg)
            ready = admin.get("/ready")
            assert ready.status_code == 200, ready.text
            (inst,) = admin.get("/api/v1/instances").json()
            assert inst["app_id"] == CVM_APP and inst["ip"] == status(work)["client_ip"]
            node.tunnel_ip = ipaddress.IPv4Address(status(work)["client_ip"])
            wait_until(lambda: lab.fetch_instance(node) == node.netns, serve, 20, "the tunnel", log)

            # the one control child dies: exactly one new one, which keeps the API's policy
            regs = status(work)["counters"]["registrations"]
            os.kill(first, signal.SIGKILL)
            t0 = time.monotonic()
            wait_until(
                lambda: log.read_text().count("registration RPC on") == 2,
                serve,
                30,
                "the restarted control child",
                log,
            )
            (second,) = control_children(serve.pid)
            assert second != first
            wait_until(
                lambda: status(work)["counters"]["registrations"] > regs,
                registrar,
                20,
                "a refresh admitted by the restarted child",
                registrar_log,
            )
            print(f"control child killed -> CVM refresh admitted: {time.monotonic() - t0:.2f}s")
            assert _metric(admin, "accepted") >= 1  # the new process's counters
            assert log.read_text().count("control process started") == 2
        finally:
            admin.close()
            if registrar is not None:
                stop_by_pid(registrar, grace=15)
            kids = list(children(serve.pid))
            assert stop_by_pid(serve, grace=20) == 0, log.read_text()[-3000:]
        left = [pid for pid in kids if Path(f"/proc/{pid}").exists()]
        assert not left, f"children of serve still running: {left}"
        assert "Traceback" not in log.read_text()
