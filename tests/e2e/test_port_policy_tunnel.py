"""End to end: a port policy *registered* by a CVM decides PROXY headers and refusals.

Until now outbound PROXY headers were tested through static routes only. Here the policy
travels the real way: the CVM's registration client (``GatewayClient``, verifying the
gateway's RA-TLS certificate) sends ``port_policy`` in ``RegisterCvm`` to tunnel's real RPC
app (``tests.helpers.gateway_rpc.serve_rpc``), whose registry stores it and adds the CVM's
peer to the lab gateway's wireguard-go device; a real ``gateway serve`` in the gateway
namespace (prefix ``trp``) reads the registry file and routes over WireGuard to the CVM,
where ``gateway.proxy.origin`` reports the PROXY header each connection began with.

Policy: restrict mode, 8081 (plain HTTP, terminated) with ``pp``, 8443 (TLS passthrough)
without. The lab's own origin on 8080 is up and reachable over the tunnel, but not listed,
so the gateway must refuse it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.attest.collateral import SimCollateralSource
from gateway.certs.devca import ensure_dev_wildcard
from gateway.control.registration import Advertised
from gateway.control.rpc_identity import RpcIdentity
from gateway.guest.gateway_cache import GatewayKeyStore, TeeCertIssuer
from gateway.guest.gateway_client import GatewayClient, GatewayTrust, PortPolicy, parse_app_ids
from gateway.lab.harness import Lab, LabCvm, cleanup_leftovers
from gateway.registry.service import Registry
from gateway.registry.sqlite import SqliteStore
from gateway.tee.sim_pki import SimPki
from gateway.tunnel.commands import in_netns, run
from tests.helpers.gateway_rpc import CVM_APP, GW_APP, PLAN, measured_tee, serve_rpc
from tests.helpers.lab import require_lab
from tests.helpers.processes import free_port, start, stop_by_pid, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.netns]

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "trp"
BASE = "trp.test"
PROXY_PORT = 9443  # inside our own gateway namespace
PP_PORT = 8081
TLS_PORT = 8443
POLICY = PortPolicy(((PP_PORT, True), (TLS_PORT, False)), restrict_mode=True)


@dataclass
class World:
    lab: Lab
    node: LabCvm
    tmp: Path
    gw_ca: Path
    app_ca: Path
    serve: subprocess.Popen[bytes]
    registry: Registry


def _register(tmp: Path, pki: SimPki, port: int, node: LabCvm) -> str:
    """What the CVM's registrar does, in process: verify the gateway, send the policy."""
    tee = measured_tee(pki, tmp / "cvm-tee", CVM_APP, b"\x21" * 20)
    keys = asyncio.run(
        GatewayKeyStore(tmp / "cvm-cache").get_or_create(TeeCertIssuer(tee), int(time.time()))
    )
    keys = dataclasses.replace(keys, wg_sk=node.private_key, wg_pk=node.public_key)
    client = GatewayClient(
        GatewayTrust(parse_app_ids(GW_APP), SimCollateralSource(pki), pki.root_ca_der)
    )
    answer, verified = asyncio.run(client.register(f"https://127.0.0.1:{port}", keys, POLICY))
    assert verified.method == "ratls"
    return str(answer.client_ip)


def _serve_config(tmp: Path, lab: Lab, data: Path, certs: Path) -> Path:
    config = tmp / "gateway.toml"
    config.write_text(
        f"[core]\ndata_dir = '{data}'\n"
        f"[proxy]\nlisten = ['{lab.underlay.ip}:{PROXY_PORT}']\nworkers = 1\n"
        f"base_domains = ['{BASE}']\ncerts_dir = '{certs}'\nregistry_poll_interval = 0.2\n"
        "registry_refresh_interval = 0.5\nstats_interval = 0.5\n"
        "[proxy.timeouts]\nconnect = 2.0\nhandshake = 3.0\ndrain = 1.0\n"
    )
    return config


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    require_lab("curl")
    cleanup_leftovers(PREFIX)
    tmp = tmp_path_factory.mktemp("pp-tunnel")
    pki = SimPki.load_or_create(tmp / "pki")
    gw_ca, _ = ensure_dev_wildcard(tmp / "gw-ca", tmp / "gw-certs", BASE)
    app_ca, app_certs = ensure_dev_wildcard(tmp / "app-ca", tmp / "app-certs", BASE)
    data = tmp / "gw-data"
    data.mkdir()
    procs: list[subprocess.Popen[bytes]] = []
    with Lab(cvms=1, workdir=tmp / "lab", prefix=PREFIX) as lab:
        store = SqliteStore(data / "registry.sqlite3")
        try:
            node = lab.nodes[0]
            origin_log = tmp / "origin.log"
            argv = [
                sys.executable, "-m", "gateway.proxy.origin", "--host", "0.0.0.0",
                "--http", str(PP_PORT), "--tls", str(TLS_PORT),
                "--cert", str(app_certs / "fullchain.pem"), "--key", str(app_certs / "privkey.pem"),
            ]  # fmt: skip
            procs.append(start(in_netns(node.netns, argv), origin_log, cwd=ROOT))
            wait_until(lambda: b"{" in origin_log.read_bytes(), procs[-1], 15, "origin", origin_log)
            registry = Registry(store, PLAN, device=lab.gateway, clock=time.time)
            adv = Advertised(lab.gateway_public_key, str(lab.wg_address), lab.endpoint)
            creds = RpcIdentity(
                measured_tee(pki, tmp / "gw-tee", GW_APP, b"\x99" * 20), tmp / "gw-rpc"
            ).credentials(None)
            with serve_rpc(creds, pki, registry, adv, port=free_port()) as server:
                client_ip = _register(tmp, pki, server.port, node)
            lab.connect(node, ipaddress.IPv4Address(client_ip))
            assert lab.gateway is not None
            gw_dev = lab.gateway
            wait_until(
                lambda: (
                    (p := gw_dev.state().peer(node.public_key)) is not None
                    and p.last_handshake is not None
                ),
                None,
                15,
                "the CVM's WireGuard handshake",
            )
            registry.observe(gw_dev.state())  # what the maintenance loop does: app routes need it
            log = tmp / "serve.log"
            argv = [sys.executable, "-m", "gateway", "serve", "--config"]
            argv.append(str(_serve_config(tmp, lab, data, tmp / "gw-certs")))
            serve = start(in_netns(lab.gw_netns, argv), log, cwd=ROOT)
            procs.append(serve)
            wait_until(lambda: b"listening" in log.read_bytes(), serve, 40, "gateway serve", log)
            yield World(lab, node, tmp, gw_ca.cert_path, app_ca.cert_path, serve, registry)
        finally:
            for proc in reversed(procs):
                stop_by_pid(proc, grace=10)
            store.close()


def curl(w: World, name: str, path: str, ca: Path) -> tuple[int, str, str]:
    """One HTTPS request from the gateway namespace: (exit code, body, "local_ip local_port")."""
    argv = [
        "curl", "-sS", "--max-time", "5", "--cacert", str(ca),
        "-w", "\n%{local_ip} %{local_port}",
        "--resolve", f"{name}:{PROXY_PORT}:{w.lab.underlay.ip}",
        f"https://{name}:{PROXY_PORT}{path}",
    ]  # fmt: skip
    res = run(argv, netns=w.lab.gw_netns, check=False, timeout=15)
    body, _, local = res.stdout.rpartition("\n")
    return res.returncode, body if res.returncode == 0 else res.stderr, local


def test_registered_pp_port_gets_a_proxy_header_with_the_real_client(world: World) -> None:
    name = f"{CVM_APP}-{PP_PORT}.{BASE}"
    log = world.tmp / "serve.log"
    wait_until(lambda: curl(world, name, "/pp", world.gw_ca)[0] == 0, world.serve, 20, "route", log)
    (record,) = world.registry.store.list_instances()
    assert record.port_policy == POLICY.to_json()  # stored as the CVM sent it
    for _ in range(3):  # fresh connections: each header describes its own client
        code, body, local = curl(world, name, "/pp", world.gw_ca)
        assert code == 0, body
        ip, port = local.split()
        doc = json.loads(body)
        assert doc["version"] == 2 and doc["command"] == "PROXY"
        assert doc["source"] == [ip, int(port)] and ip == str(world.lab.underlay.ip)
        assert doc["destination"] == [str(world.lab.underlay.ip), PROXY_PORT]


def test_listed_port_without_pp_gets_no_header(world: World) -> None:
    name = f"{CVM_APP}-{TLS_PORT}s.{BASE}"  # passthrough: the TLS is the app's own
    code, body, _ = curl(world, name, "/pp", world.app_ca)
    assert code == 0, body
    assert json.loads(body) is None


def test_port_not_listed_is_refused_under_restrict_mode(world: World) -> None:
    # the lab origin on 8080 is up and reachable through the tunnel...
    assert world.lab.fetch_instance(world.node) == world.node.netns
    # ...but the app did not declare it: the gateway refuses (fail closed)
    code, _, _ = curl(world, f"{CVM_APP}-{world.lab.origin_port}.{BASE}", "/", world.gw_ca)
    assert code != 0 and world.serve.poll() is None
    assert f"port {world.lab.origin_port} denied" in (world.tmp / "serve.log").read_text()
