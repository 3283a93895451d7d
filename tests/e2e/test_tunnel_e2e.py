"""End to end: attested CVMs register with a real ``gateway serve`` and are reached over HTTPS.

Lab (``gateway.lab.harness``, prefix ``gwk``): a gateway namespace running one
``gateway serve`` (proxy workers + its control child: registration RPC with an RA-TLS identity
from simulated TDX, wireguard-go, registry maintenance) and two CVM namespaces of ONE app,
each with the lab origin (HTTP :8080, says which CVM answered), a TLS origin (:8443, its own
certificate from an "app CA" the gateway never sees) and the registration client
(``python -m gateway.guest.register_cmd``: simulated TDX, wireguard-go, iptables). Clients are
curl processes in the gateway namespace, dialling the proxy's listener there.

Everything goes through the real path: SNI -> registry route (read by the workers from the
SQLite file the control child writes) -> WireGuard tunnel -> the CVM's app.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.certs.devca import ensure_dev_wildcard
from gateway.lab.harness import Lab, LabCvm, cleanup_leftovers
from gateway.tee.sim_pki import SimPki
from gateway.tunnel.commands import in_netns, run
from tests.helpers.gateway_rpc import CVM_APP, GW_APP, make_ca, measured_tee, write_ca
from tests.helpers.lab import require_lab
from tests.helpers.processes import start, stop_by_pid, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.netns]

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "gwk"
BASE = "gwk.test"
PROXY_PORT = 9443  # inside the lab's own gateway namespace: nothing else listens there
RPC_PORT = 8010
TLS_PORT = 8443
POLICY = {"restrict_mode": True, "ports": [{"port": 8080}, {"port": TLS_PORT}]}
RECYCLE_TIMEOUT = 10.0  # > the registrars' 2 s refresh, short enough to watch a recycle


@dataclass
class World:
    lab: Lab
    tmp: Path
    config: Path
    gw_ca: Path  # the gateway's (terminating) dev CA
    app_ca: Path  # the CVM apps' own CA (passthrough)
    data: Path
    gateway: subprocess.Popen[bytes]
    registrars: dict[int, subprocess.Popen[bytes]]
    works: dict[int, Path]

    def db_instances(self) -> list[tuple[str, str]]:
        db = sqlite3.connect(f"file:{self.data / 'registry.sqlite3'}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT instance_id, ip FROM instances ORDER BY ip").fetchall()
        finally:
            db.close()
        return [(str(a), str(b)) for a, b in rows]


def _env_ok() -> None:
    require_lab("curl", "iptables")


def _write_config(lab: Lab, tmp: Path, pki: SimPki, pki_dir: Path, client_ca: Path) -> Path:
    sim = tmp / "gw-sim"
    sim.mkdir()
    (sim / "pki").symlink_to(pki_dir)
    measured_tee(pki, sim / "tee", GW_APP, b"\x99" * 20)
    (tmp / "root.der").write_bytes(pki.root_ca_der)
    (tmp / "collateral.json").write_text(pki.collateral(int(time.time())).to_json())
    config = tmp / "gateway.toml"
    config.write_text(
        f"[core]\ndata_dir = '{tmp / 'gw-data'}'\n"
        f"[proxy]\nlisten = ['0.0.0.0:{PROXY_PORT}']\nworkers = 2\nbase_domains = ['{BASE}']\n"
        f"certs_dir = '{tmp / 'gw-certs'}'\nregistry_poll_interval = 0.2\n"
        "registry_refresh_interval = 1.0\nstats_interval = 0.5\n"
        "[proxy.timeouts]\nconnect = 2.0\nhandshake = 3.0\ndrain = 1.0\n"
        f"[wg]\ninterface = '{lab.base}gw'\nlisten_port = {lab.wg_port}\n"
        f"endpoint = '{lab.endpoint}'\nbackend = 'wireguard-go'\n"
        "handshake_poll_interval = 0.3\nrecycle_interval = 1.0\n"
        f"recycle_timeout = {RECYCLE_TIMEOUT}\npersistent_keepalive = 5\n"
        f"[attest]\nroot_ca = '{tmp / 'root.der'}'\ncollateral_source = 'file'\n"
        f"collateral_file = '{tmp / 'collateral.json'}'\n"
        f"[admission]\napp_ids = ['{CVM_APP}']\n"
        f"[rpc]\naddress = '{lab.underlay.ip}'\nport = {RPC_PORT}\n"
        f"client_ca_file = '{client_ca}'\n"
        f"[rpc_identity]\ntee = 'sim'\nsim_dir = '{sim}'\n"
    )
    return config


def _start_gateway(world_tmp: Path, lab: Lab, config: Path, tag: str) -> subprocess.Popen[bytes]:
    log = world_tmp / f"serve-{tag}.log"
    argv = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
    proc = start(in_netns(lab.gw_netns, argv), log, cwd=ROOT)
    wait_until(
        lambda: b"registration RPC on" in log.read_bytes() and b"listening" in log.read_bytes(),
        proc,
        40,
        "gateway serve (proxy + registration RPC)",
        log,
    )
    return proc


def _stop_gateway(proc: subprocess.Popen[bytes], data: Path) -> None:
    """Stop serve by PID; its control child (own session) is stopped by serve itself."""
    stop_by_pid(proc, grace=15)


def _start_registrar(
    tmp: Path, lab: Lab, node: LabCvm, pki_dir: Path, ca: tuple[Path, Path]
) -> tuple[subprocess.Popen[bytes], Path]:
    work = tmp / f"cvm-{node.index}"
    sim = work / "sim"
    sim.mkdir(parents=True)
    (sim / "pki").symlink_to(pki_dir)
    measured_tee(SimPki.load(pki_dir), sim / "tee", CVM_APP, bytes([node.index + 1]) * 20)
    argv = [
        sys.executable, "-m", "gateway.guest.register_cmd",
        "--work-dir", str(work), "--gateway-app-id", GW_APP,
        "--gateway-url", f"https://{lab.underlay.ip}:{RPC_PORT}",
        "--tee", "sim", "--sim-dir", str(sim), "--trust-sim-root",
        "--client-ca-cert", str(ca[0]), "--client-ca-key", str(ca[1]),
        "--interface", f"{lab.base}x{node.index}",
        "--wg-config", str(work / "dstack-wg0.conf"),
        "--backend", "wireguard-go", "--firewall", "iptables",
        "--poll-interval", "0.3", "--refresh-interval", "2",
        "--retry-initial", "0.3", "--retry-max", "1",
        "--port-policy", json.dumps(POLICY),
    ]  # fmt: skip
    log = tmp / f"registrar-{node.index}.log"
    return start(in_netns(node.netns, argv), log, cwd=ROOT), work


def _start_tls_origin(tmp: Path, node: LabCvm, app_certs: Path) -> subprocess.Popen[bytes]:
    argv = [
        sys.executable, "-m", "gateway.proxy.origin", "--host", "0.0.0.0",
        "--tls", str(TLS_PORT), "--http", "0",
        "--cert", str(app_certs / "fullchain.pem"), "--key", str(app_certs / "privkey.pem"),
    ]  # fmt: skip
    log = tmp / f"tls-origin-{node.index}.log"
    proc = start(in_netns(node.netns, argv), log, cwd=ROOT)
    wait_until(lambda: b"{" in log.read_bytes(), proc, 15, "TLS origin", log)
    return proc


def status(work: Path) -> dict[str, Any]:
    try:
        doc: dict[str, Any] = json.loads((work / "registrar-status.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return doc


def curl(world: World, name: str, path: str = "/", *, ca: Path | None = None) -> tuple[int, str]:
    """One fresh HTTPS connection through the gateway; (exit code, body)."""
    argv = [
        "curl", "-sS", "--max-time", "5", "--cacert", str(ca or world.gw_ca),
        "--resolve", f"{name}:{PROXY_PORT}:127.0.0.1", f"https://{name}:{PROXY_PORT}{path}",
    ]  # fmt: skip
    res = run(argv, netns=world.lab.gw_netns, check=False, timeout=10)
    return res.returncode, res.stdout or res.stderr


def who(world: World) -> str | None:
    """Which CVM answered a terminated request for the app (None: the request failed)."""
    code, body = curl(world, f"{CVM_APP}-{world.lab.origin_port}.{BASE}")
    if code != 0:
        return None
    return str(json.loads(body)["instance"])


def served(world: World, times: int = 4) -> bool:
    """Several fresh connections in a row succeed: every worker has the route (each worker
    polls the registry on its own timer, so one success proves only one worker)."""
    return all(who(world) is not None for _ in range(times))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    _env_ok()
    cleanup_leftovers(PREFIX)
    tmp = tmp_path_factory.mktemp("tunnel-e2e")
    pki_dir = tmp / "pki"
    pki = SimPki.load_or_create(pki_dir)
    client_ca = write_ca(make_ca("CVM client CA"), tmp, "client-ca")
    gw_ca, _ = ensure_dev_wildcard(tmp / "gw-ca", tmp / "gw-certs", BASE)
    app_ca, app_certs = ensure_dev_wildcard(tmp / "app-ca", tmp / "app-certs", BASE)
    procs: list[subprocess.Popen[bytes]] = []
    with Lab(cvms=2, workdir=tmp / "lab", prefix=PREFIX, gateway_device=False) as lab:
        world = None
        try:
            config = _write_config(lab, tmp, pki, pki_dir, client_ca[0])
            gateway = _start_gateway(tmp, lab, config, "1")
            registrars: dict[int, subprocess.Popen[bytes]] = {}
            works: dict[int, Path] = {}
            for node in lab.nodes:
                procs.append(_start_tls_origin(tmp, node, app_certs))
                registrars[node.index], works[node.index] = _start_registrar(
                    tmp, lab, node, pki_dir, client_ca
                )
            world = World(
                lab, tmp, config, gw_ca.cert_path, app_ca.cert_path, tmp / "gw-data",
                gateway, registrars, works,
            )  # fmt: skip
            yield world
        finally:
            if world is not None:
                procs += [world.gateway, *world.registrars.values()]
            for proc in reversed(procs):
                stop_by_pid(proc, grace=15)


def test_terminate_and_passthrough_over_the_tunnel(world: World) -> None:
    t0 = time.monotonic()
    for index, work in world.works.items():
        wait_until(
            lambda w=work: bool(status(w).get("configured")),  # type: ignore[misc]
            world.registrars[index],
            30,
            f"CVM {index} registration",
            world.tmp / f"registrar-{index}.log",
        )
    registered = time.monotonic() - t0
    # terminated by the gateway (its dev CA), plain HTTP to the CVM over WireGuard
    log = world.tmp / "serve-1.log"
    wait_until(lambda: served(world), world.gateway, 20, "terminate over tunnel", log)
    reachable = time.monotonic() - t0
    print(f"both CVMs registered {registered:.2f}s, app reachable via HTTPS {reachable:.2f}s")
    assert who(world) in {n.netns for n in world.lab.nodes}
    # passthrough: the TLS is the app's own (verifies against the app CA, not the gateway's)
    name = f"{CVM_APP}-{TLS_PORT}s.{BASE}"
    code, body = curl(world, name, ca=world.app_ca)
    assert code == 0 and "Hello from the demo app" in body and "TLS" in body, body
    code, err = curl(world, name)  # the gateway's CA does not verify the app's certificate
    assert code == 60, err  # CURLE_PEER_FAILED_VERIFICATION
    # one instance by its id, through the same tunnel
    instance_id, ip = world.db_instances()[0]
    code, body = curl(world, f"{instance_id}-{world.lab.origin_port}.{BASE}")
    assert code == 0
    node = next(n for n in world.lab.nodes if status(world.works[n.index])["client_ip"] == ip)
    assert json.loads(body)["instance"] == node.netns
    # an unknown app, or a port the app did not declare, is refused (fail closed)
    code, _ = curl(world, f"{'ab' * 20}-8080.{BASE}")
    assert code != 0 and world.gateway.poll() is None
    code, _ = curl(world, f"{CVM_APP}-8081.{BASE}")
    assert code != 0 and "port 8081 denied" in (world.tmp / "serve-1.log").read_text()


def test_two_instances_of_one_app_both_serve(world: World) -> None:
    names = {n.netns for n in world.lab.nodes}
    seen: dict[str, int] = {}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (set(seen) != names or sum(seen.values()) < 12):
        answer = who(world)
        assert answer is not None
        seen[answer] = seen.get(answer, 0) + 1
    print(f"answers per CVM over {sum(seen.values())} connections: {seen}")
    assert set(seen) == names


def test_gateway_restart_resumes_traffic_without_reregistration(world: World) -> None:
    before = {i: status(w) for i, w in world.works.items()}
    db_before = world.db_instances()
    # freeze both registration clients: nothing can re-register while the gateway is away
    for proc in world.registrars.values():
        os.kill(proc.pid, signal.SIGSTOP)
    try:
        _stop_gateway(world.gateway, world.data)
        assert world.gateway.returncode == 0
        assert who(world) is None  # really down
        t0 = time.monotonic()
        world.gateway = _start_gateway(world.tmp, world.lab, world.config, "2")
        up = time.monotonic() - t0
        wait_until(lambda: served(world), world.gateway, 20, "traffic after restart")
        resumed = time.monotonic() - t0
        print(f"gateway restart: serving again {up:.2f}s, tunnel traffic back {resumed:.2f}s")
        assert world.db_instances() == db_before  # same instances, same addresses
    finally:
        for proc in world.registrars.values():
            os.kill(proc.pid, signal.SIGCONT)
    for i, work in world.works.items():
        assert status(work)["counters"]["registrations"] == before[i]["counters"]["registrations"]
        assert status(work)["client_ip"] == before[i]["client_ip"]


def test_a_dead_control_child_is_restarted(world: World) -> None:
    log = world.tmp / "serve-2.log"
    text = log.read_text()
    pid = int(re.findall(r"control process started, pid (\d+)", text)[-1])
    regs = status(world.works[1])["counters"]["registrations"]
    os.kill(pid, signal.SIGKILL)  # the registration RPC + WireGuard child dies
    t0 = time.monotonic()
    wait_until(
        lambda: log.read_text().count("registration RPC on") > text.count("registration RPC on"),
        world.gateway,
        20,
        "the control child's restart",
        log,
    )
    wait_until(lambda: served(world), world.gateway, 20, "traffic after restart", log)
    print(
        f"control child killed -> restarted and tunnel traffic back: {time.monotonic() - t0:.2f}s"
    )
    # the CVMs' periodic refresh reaches the new RPC listener
    wait_until(
        lambda: status(world.works[1])["counters"]["registrations"] > regs + 1,
        world.registrars[1],
        10,
        "a refresh against the restarted RPC",
    )


def test_failover_then_recycling_of_a_silent_instance(world: World) -> None:
    dead, alive = world.lab.nodes
    dead_ip = status(world.works[dead.index])["client_ip"]
    stop_by_pid(world.registrars[dead.index])  # takes its WireGuard interface down: silent
    t0 = time.monotonic()
    answers = [who(world) for _ in range(6)]
    failover = time.monotonic() - t0
    print(f"6 requests right after one CVM died: {failover:.2f}s, answers {set(answers)}")
    assert answers == [alive.netns] * 6
    # the silent instance is recycled after recycle_timeout; the live one stays
    wait_until(
        lambda: all(ip != dead_ip for _, ip in world.db_instances()),
        world.gateway,
        RECYCLE_TIMEOUT + 10,
        "recycling of the silent instance",
        world.tmp / "serve-2.log",
    )
    recycled = time.monotonic() - t0
    print(f"silent instance recycled after {recycled:.2f}s (timeout {RECYCLE_TIMEOUT}s)")
    assert [ip for _, ip in world.db_instances()] == [status(world.works[alive.index])["client_ip"]]
    assert who(world) == alive.netns
    log = (world.tmp / "serve-2.log").read_text(errors="replace")
    assert not re.search(r"Traceback", log), log[-2000:]
