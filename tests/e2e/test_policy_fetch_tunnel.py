"""End to end: a CVM registers *without* a port policy; the gateway reads it from the CVM's
guest agent through the tunnel, checks it against the attested compose hash and stores it.

Lab prefix ``trf``. In the CVM namespace: a real ``gateway guest boot`` (simulated TDX,
app-compose with a port policy and ``public_tcbinfo``), then ``gateway guest agent`` serving
its public port (8090) and running the registration client (``--register``) as a legacy
guest would (``--port-policy ''``: no policy in ``RegisterCvm``). In the gateway namespace:
the registration RPC with the fetcher (``tests.helpers.policy_fetch_rpc``) driving the lab's
wireguard-go device. Nothing but WireGuard connects the two: the fetch can only succeed once
the CVM's tunnel is up.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.guest.identity import AppCompose
from gateway.lab.harness import Lab, cleanup_leftovers
from gateway.tee.sim_pki import SimPki
from gateway.tunnel.commands import in_netns
from tests.helpers.gateway_rpc import GW_APP
from tests.helpers.lab import require_lab
from tests.helpers.processes import free_port, start, stop_by_pid, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.netns]

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "trf"
POLICY = {"ports": [{"port": 8081, "pp": True}], "restrict_mode": True}


@dataclass
class World:
    lab: Lab
    tmp: Path
    rpc_dir: Path
    rpc_log: Path
    agent: subprocess.Popen[bytes]
    agent_log: Path
    compose_hash: str


def _compose() -> bytes:
    return json.dumps(
        {
            "manifest_version": 2,
            "name": "legacy-guest",
            "runner": "bash",
            "key_provider": "none",
            "gateway_enabled": True,
            "public_tcbinfo": True,
            "port_policy": POLICY,
        }
    ).encode()


def _rows(db_path: Path) -> list[tuple[str, str | None, str]]:
    if not db_path.exists():
        return []
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT instance_id, port_policy, evidence FROM instances").fetchall()
    finally:
        db.close()
    return [(str(a), b, str(c)) for a, b, c in rows]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    require_lab("iptables")
    cleanup_leftovers(PREFIX)
    tmp = tmp_path_factory.mktemp("policy-fetch")
    pki_dir = tmp / "pki"
    SimPki.load_or_create(pki_dir)
    compose = _compose()
    app_id = AppCompose.parse(compose).hash[:20].hex()  # key provider "none": compose hash
    procs: list[subprocess.Popen[bytes]] = []
    with Lab(cvms=1, workdir=tmp / "lab", prefix=PREFIX) as lab:
        try:
            node = lab.nodes[0]
            key_file = tmp / "gw-wg.key"
            key_file.write_text(lab.gateway_private_key)
            port = free_port()
            rpc_dir, rpc_log = tmp / "rpc", tmp / "rpc.log"
            rpc_dir.mkdir()
            argv = [
                sys.executable, "-m", "tests.helpers.policy_fetch_rpc",
                "--dir", str(rpc_dir), "--pki", str(pki_dir), "--port", str(port),
                "--allow-app", app_id, "--wg-iface", lab.gw_iface,
                "--wg-key-file", str(key_file), "--wg-ip", str(lab.wg_address),
                "--wg-port", str(lab.wg_port), "--wg-endpoint", lab.endpoint,
                "--ready-file", str(rpc_dir / "ready"),
            ]  # fmt: skip
            procs.append(start(in_netns(lab.gw_netns, argv), rpc_log, cwd=ROOT))
            wait_until((rpc_dir / "ready").exists, procs[-1], 30, "registration RPC", rpc_log)
            # the CVM: boot, then the agent with its public port and the registration client
            shared, work, sim = tmp / "shared", tmp / "cvm", tmp / "cvm-sim"
            shared.mkdir()
            sim.mkdir()
            (sim / "pki").symlink_to(pki_dir)
            (shared / "app-compose.json").write_bytes(compose)
            urls = {"gateway_urls": [f"https://{lab.underlay.ip}:{port}"]}
            (shared / ".sys-config.json").write_text(json.dumps(urls))
            guest = [sys.executable, "-m", "gateway", "guest"]
            tee = ["--tee", "sim", "--sim-dir", str(sim)]
            boot = subprocess.run(
                [*guest, "boot", "--host-shared", str(shared), "--work-dir", str(work),
                 "--runner", "none", *tee],
                capture_output=True, timeout=60, cwd=ROOT, check=False,
            )  # fmt: skip
            assert boot.returncode == 0, boot.stderr.decode()
            opts = (
                f"--gateway-app-id {GW_APP} --trust-sim-root --port-policy '' "
                f"--interface {lab.base}x1 --wg-config {work / 'dstack-wg0.conf'} "
                "--backend wireguard-go --firewall iptables --poll-interval 0.3 "
                "--refresh-interval 2 --retry-initial 0.3 --retry-max 1"
            )
            agent_log = tmp / "agent.log"
            argv = [
                *guest, "--log-level", "debug", "agent", "--work-dir", str(work),
                "--socket", str(tmp / "dstack.sock"), "--guest-api-socket", str(tmp / "api.sock"),
                "--public-port", "8090", "--public-host", "0.0.0.0", *tee,
                "--register", "--register-opts", opts,
            ]  # fmt: skip
            agent = start(in_netns(node.netns, argv), agent_log, cwd=ROOT)
            procs.append(agent)
            yield World(
                lab, tmp, rpc_dir, rpc_log, agent, agent_log, AppCompose.parse(compose).hash.hex()
            )
        finally:
            for proc in reversed(procs):
                stop_by_pid(proc, grace=10)


def test_policy_is_fetched_through_the_tunnel_and_verified(world: World) -> None:
    db = world.rpc_dir / "registry.sqlite3"
    wait_until(lambda: bool(_rows(db)), world.agent, 30, "registration", world.agent_log)
    ((instance, policy, evidence),) = _rows(db)
    assert json.loads(evidence)["compose_hash"] == world.compose_hash
    assert "registered without a port policy" not in world.rpc_log.read_text()
    wait_until(
        lambda: _rows(db)[0][1] is not None, world.agent, 30, "the fetched policy", world.rpc_log
    )
    stored: Any = json.loads(_rows(db)[0][1] or "null")
    assert stored == POLICY  # what app-compose declares, read from the agent over WireGuard
    log = world.rpc_log.read_text()
    assert f"port policy of {instance} read from its agent (compose hash verified)" in log
