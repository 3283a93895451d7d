"""End to end: a CVM registers with an attested gateway and is reachable over the tunnel.

Lab (``gateway.lab.harness``, prefix ``gwj``): a gateway namespace with the gateway's
wireguard-go device and a bridge, two CVM namespaces with the lab's origin app on :8080.
In the gateway namespace run three registration servers (``tests.helpers.gateway_rpc``,
tunnel's RPC app with a real registry driving the lab's device): the real gateway (RA-TLS
certificate through its simulated TDX backend, app ``GW_APP``), an impostor with a plain
certificate and an impostor that is attested but is another app. In a CVM namespace runs
the registrar as the CVM would (``python -m gateway.guest.register_cmd``), with its own
simulated TDX backend, wireguard-go and iptables.
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.guest.gateway_cache import GatewayKeys
from gateway.guest.gateway_client import RegisterResponse
from gateway.guest.wgconfig import render_wg_config
from gateway.lab.harness import Lab, LabCvm, cleanup_leftovers
from gateway.tee.sim_pki import SimPki
from gateway.tunnel.commands import in_netns, run
from gateway.tunnel.keys import generate_private_key, public_key
from gateway.tunnel.wg import link_exists
from tests.helpers.gateway_rpc import CVM_APP, GW_APP, OTHER_APP, make_ca, measured_tee, write_ca
from tests.helpers.lab import require_lab
from tests.helpers.processes import free_port, start, stop_by_pid, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.netns]

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "gwj"


@dataclass
class World:
    lab: Lab
    tmp: Path
    pki_dir: Path
    ca_cert: Path
    ca_key: Path
    good: str
    plain: str
    other: str
    down: str
    dirs: dict[str, Path]


def _env_ok() -> None:
    require_lab("curl", "iptables")


def _gateway_config(lab: Lab, tmp: Path, pki: SimPki, pki_dir: Path, ca_cert: Path) -> Path:
    """``gateway rpc``'s configuration: RA-TLS identity through its simulated TDX backend."""
    sim = tmp / "gw-sim"
    sim.mkdir()
    (sim / "pki").symlink_to(pki_dir)
    measured_tee(pki, sim / "tee", GW_APP, b"\x99" * 20)  # the gateway CVM measured its app
    (tmp / "root.der").write_bytes(pki.root_ca_der)
    (tmp / "collateral.json").write_text(pki.collateral(int(time.time())).to_json())
    config = tmp / "gateway.toml"
    config.write_text(
        f"[core]\ndata_dir = '{tmp / 'gw-data'}'\n"
        f"[wg]\ninterface = '{lab.base}rp'\nnetns = ''\nlisten_port = {lab.wg_port}\n"
        f"endpoint = '{lab.endpoint}'\nbackend = 'wireguard-go'\n"
        f"[attest]\nroot_ca = '{tmp / 'root.der'}'\ncollateral_source = 'file'\n"
        f"collateral_file = '{tmp / 'collateral.json'}'\n"
        f"[admission]\napp_ids = ['{CVM_APP}']\n"
        f"[rpc]\naddress = '{lab.underlay.ip}'\nport = {GOOD_PORT}\n"
        f"client_ca_file = '{ca_cert}'\n"
        f"[rpc_identity]\ntee = 'sim'\nsim_dir = '{sim}'\n"
    )
    return config


GOOD_PORT = 8010


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    _env_ok()
    cleanup_leftovers(PREFIX)
    tmp = tmp_path_factory.mktemp("cvmreg")
    pki_dir = tmp / "pki"
    pki = SimPki.load_or_create(pki_dir)
    ca_cert, ca_key = write_ca(make_ca("CVM client CA"), tmp, "client-ca")
    key_file = tmp / "impostor-wg.key"
    key_file.write_text(generate_private_key())
    procs: list[subprocess.Popen[bytes]] = []
    with Lab(cvms=2, workdir=tmp / "lab", prefix=PREFIX, gateway_device=False) as lab:
        dirs: dict[str, Path] = {}
        urls: dict[str, str] = {}
        try:
            # the real gateway node: `gateway rpc` (registration RPC + WireGuard + registry)
            config = _gateway_config(lab, tmp, pki, pki_dir, ca_cert)
            log = tmp / "gateway-rpc.log"
            argv = [sys.executable, "-m", "gateway", "rpc", "--config", str(config)]
            proc = start(in_netns(lab.gw_netns, argv), log, cwd=ROOT)
            procs.append(proc)
            wait_until(lambda: b"registration RPC on" in log.read_bytes(), proc, 30, "rpc", log)
            urls["good"] = f"https://{lab.underlay.ip}:{GOOD_PORT}"
            dirs["good"] = tmp / "gw-data"
            # impostors: tunnel's RPC app with a plain certificate / another app's quote
            for name, mode, app in [("plain", "plain", GW_APP), ("other", "ratls", OTHER_APP)]:
                port = free_port()
                d = tmp / f"gw-{name}"
                d.mkdir()
                ready, log = d / "ready", d / "server.log"
                argv = [
                    sys.executable, "-m", "tests.helpers.gateway_rpc",
                    "--dir", str(d), "--pki", str(pki_dir), "--port", str(port),
                    "--client-ca", str(ca_cert), "--mode", mode, "--app", app,
                    "--wg-key-file", str(key_file), "--wg-endpoint", lab.endpoint,
                    "--ready-file", str(ready),
                ]  # fmt: skip
                proc = start(in_netns(lab.gw_netns, argv), log, cwd=ROOT)
                procs.append(proc)
                wait_until(ready.exists, proc, 30, f"impostor {name}", log)
                urls[name] = f"https://{lab.underlay.ip}:{port}"
                dirs[name] = d
            yield World(
                lab,
                tmp,
                pki_dir,
                ca_cert,
                ca_key,
                urls["good"],
                urls["plain"],
                urls["other"],
                f"https://{lab.underlay.ip}:{free_port()}",
                dirs,
            )
        finally:
            for proc in procs:
                stop_by_pid(proc, grace=10)


def registrar(
    world: World, node: LabCvm, urls: list[str], *, tag: str
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """Start the CVM's registrar in its namespace; returns (process, work dir, log)."""
    work = world.tmp / f"cvm-{tag}"
    sim = work / "sim"
    sim.mkdir(parents=True)
    (sim / "pki").symlink_to(world.pki_dir)
    measured_tee(SimPki.load(world.pki_dir), sim / "tee", CVM_APP, bytes([node.index]) * 20)
    argv = [
        sys.executable, "-m", "gateway.guest.register_cmd",
        "--work-dir", str(work), "--gateway-app-id", GW_APP,
        "--tee", "sim", "--sim-dir", str(sim), "--trust-sim-root",
        "--client-ca-cert", str(world.ca_cert), "--client-ca-key", str(world.ca_key),
        "--interface", f"{world.lab.base}x{node.index}",
        "--wg-config", str(work / "dstack-wg0.conf"),
        "--backend", "wireguard-go", "--firewall", "iptables",
        "--poll-interval", "0.3", "--refresh-interval", "2",
        "--retry-initial", "0.3", "--retry-max", "1",
    ]  # fmt: skip
    for url in urls:
        argv += ["--gateway-url", url]
    log = world.tmp / f"registrar-{tag}.log"
    return start(in_netns(node.netns, argv), log, cwd=ROOT), work, log


def status(work: Path) -> dict[str, Any]:
    try:
        doc: dict[str, Any] = json.loads((work / "registrar-status.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return doc


def instances(world: World, name: str) -> int:
    db = sqlite3.connect(f"file:{world.dirs[name] / 'registry.sqlite3'}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT count(*) FROM instances").fetchone()[0])
    finally:
        db.close()


def drop_counts(netns: str) -> dict[str, int]:
    """Packets counted per rule of DSTACK_WG (``iptables -L -v -x``)."""
    out = run(["iptables", "-L", "DSTACK_WG", "-v", "-x", "-n"], netns=netns).stdout
    counts = {}
    for line in out.splitlines()[2:]:
        cols = line.split()
        if len(cols) >= 8:
            counts[f"{cols[2]} {cols[7]}"] = int(cols[0])
    return counts


def test_cvm_registers_past_impostors_and_is_reachable(world: World) -> None:
    lab = world.lab
    node, other = lab.nodes
    urls = [world.down, world.plain, world.other, world.good]
    t0 = time.monotonic()
    proc, work, log = registrar(world, node, urls, tag="one")
    try:
        wait_until(lambda: bool(status(work).get("configured")), proc, 30, "registration", log)
        client_ip = str(status(work)["client_ip"])

        def reachable() -> bool:
            code, body = lab.http_get(lab.gw_netns, f"http://{client_ip}:8080/", timeout=1)
            return code == 200 and json.loads(body)["instance"] == node.netns

        wait_until(reachable, proc, 20, "HTTP over the tunnel", log)
        elapsed = time.monotonic() - t0
        print(f"registrar start -> origin reachable over the tunnel: {elapsed:.2f}s")

        st = status(work)
        assert st["gateway_url"] == world.good
        counters = st["counters"]
        assert isinstance(counters, dict) and counters["rejected"] >= 2
        assert (instances(world, "good"), instances(world, "plain"), instances(world, "other")) == (
            1,
            0,
            0,
        )

        # upstream's exact file, from the cached key and the gateway's key and address
        keys = GatewayKeys.from_json((work / "gateway-cache.json").read_bytes())
        gateway_pk = public_key((world.dirs["good"] / "wg.key").read_text().strip())
        answer = RegisterResponse.from_json(
            {
                "wg": {
                    "client_ip": client_ip,
                    "servers": [
                        {
                            "pk": gateway_pk,
                            "ip": str(lab.wg_address),
                            "endpoint": lab.endpoint,
                        }
                    ],
                }
            }
        )
        conf = work / "dstack-wg0.conf"
        assert conf.read_text() == render_wg_config(keys.wg_sk, answer.client_ip, answer.servers)
        assert conf.stat().st_mode & 0o777 == 0o600

        # DSTACK_WG: the gateway's endpoint is accepted, any other source dropped
        before = drop_counts(node.netns)
        assert before[f"ACCEPT {lab.underlay.ip}"] > 0  # the tunnel's own traffic
        probe = (
            "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"[s.sendto(b'\\x01' + bytes(147), ('{node.underlay_ip}', 9182)) for _ in range(5)]"
        )
        run([sys.executable, "-c", probe], netns=other.netns)
        after = drop_counts(node.netns)
        assert after["DROP 0.0.0.0/0"] - before["DROP 0.0.0.0/0"] == 5
        assert reachable()  # the tunnel is unaffected

        # periodic refresh (2 s here) re-registers without bouncing the interface
        wait_until(
            lambda: status(work)["counters"]["registrations"] >= 2,
            proc,
            10,
            "a periodic refresh",
            log,
        )
        assert status(work)["counters"]["bounces"] == 1
        assert reachable()
    finally:
        stop_by_pid(proc)
    # SIGTERM: the registrar took its interface down
    assert not link_exists(f"{lab.base}x{node.index}", node.netns)


def test_impostor_gateways_only_fail_closed(world: World) -> None:
    lab = world.lab
    node = lab.nodes[1]
    proc, work, log = registrar(world, node, [world.plain, world.other], tag="two")
    try:
        wait_until(
            lambda: int(status(work).get("counters", {}).get("failures", 0)) >= 2,
            proc,
            30,
            "two refused rounds",
            log,
        )
        st = status(work)
        assert st["configured"] is False and st["counters"]["rejected"] >= 4
        assert re.search(r"not attested", str(st["last_error"]))
        assert re.search(rf"app {OTHER_APP} is not the pinned", str(st["last_error"]))
        assert proc.poll() is None  # still retrying, not crashed
    finally:
        stop_by_pid(proc)
    assert not (work / "dstack-wg0.conf").exists()
    assert not link_exists(f"{lab.base}x{node.index}", node.netns)
    assert instances(world, "plain") == 0 and instances(world, "other") == 0
