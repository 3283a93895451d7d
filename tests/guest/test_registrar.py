"""The registrar: the decision table, the config file format, and real refresh/failover.

The table tests read like upstream's ``gateway_checker.rs`` rules. The netns tests run the
registrar in this process against real RPC servers on 127.0.0.1 (tunnel's app, attested
RA-TLS identity), with the CVM's WireGuard device (wireguard-go) and its ``DSTACK_WG`` rules
in a namespace of our own. The gateway's advertised endpoint is unreachable from there (the
namespace has no routes), so no handshake ever happens: exactly the stale-handshake case.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
import os
import re
import shutil
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.attest.collateral import SimCollateralSource
from gateway.control.registration import Advertised
from gateway.control.rpc_identity import RpcIdentity
from gateway.control.tls_server import TlsCredentials
from gateway.guest.gateway_cache import GatewayKeyStore, TeeCertIssuer
from gateway.guest.gateway_client import (
    GatewayClient,
    GatewayTrust,
    RegisterResponse,
    WgServer,
    parse_app_ids,
)
from gateway.guest.registrar import (
    Action,
    Registrar,
    RegistrarSettings,
    RegistrarState,
    decide,
    retry_delay,
    url_order,
)
from gateway.guest.wgconfig import Tunnel, render_wg_config
from gateway.guest.wgfilter import FilterBackend, apply_wg_filter, iptables_rules, nft_rules
from gateway.lab.harness import new_tag
from gateway.registry.service import Registry
from gateway.registry.sqlite import SqliteStore
from gateway.tee.sim_pki import SimPki
from gateway.tunnel.commands import run
from gateway.tunnel.keys import generate_private_key, public_key
from gateway.tunnel.uapi import PeerConfig
from gateway.tunnel.wg import Backend, DeviceSpec, WgDevice, link_exists
from tests.helpers.gateway_rpc import (
    CA,
    CVM_APP,
    GW_APP,
    PLAN,
    RpcServer,
    make_ca,
    measured_tee,
    plain_server_files,
    serve_rpc,
    write_ca,
)
from tests.helpers.lab import require_lab
from tests.helpers.processes import free_port

S = RegistrarSettings()  # upstream's defaults: poll 10, refresh 180, handshake 180, 30..120


def st(**kw: float | bool) -> RegistrarState:
    return RegistrarState(**kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("state", "now", "handshake", "action"),
    [
        # no tunnel yet: register at once, then only after the back-off
        (st(), 0, None, Action.REGISTER),
        (st(retry_at=30), 10, None, Action.WAIT),
        (st(retry_at=30), 30, None, Action.REGISTER),
        # configured, fresh handshake: periodic refresh every 180 s
        (st(configured=True, configured_at=0, last_refresh=0), 100, 95, Action.WAIT),
        (st(configured=True, configured_at=0, last_refresh=0), 180, 175, Action.REFRESH),
        # no handshake since the interface came up 180 s ago: forced
        (st(configured=True, configured_at=0, last_refresh=0), 179, None, Action.WAIT),
        (st(configured=True, configured_at=0, last_refresh=0), 180, None, Action.FORCE),
        # the last handshake is 180 s old: forced
        (st(configured=True, configured_at=0, last_refresh=200), 380, 200, Action.FORCE),
        # ... but at most once per 180 s: a periodic refresh meanwhile
        (
            st(configured=True, configured_at=0, last_refresh=200, last_forced=300),
            400,
            100,
            Action.REFRESH,
        ),
        # a failed refresh backs off even when a tunnel exists
        (st(configured=True, configured_at=0, last_refresh=0, retry_at=250), 200, 190, Action.WAIT),
    ],
)
def test_decide(state: RegistrarState, now: float, handshake: float | None, action: Action) -> None:
    assert decide(S, state, now, handshake) is action


def test_retry_delay_doubles_to_the_cap() -> None:
    assert [retry_delay(S, n) for n in range(6)] == [0, 30, 60, 120, 120, 120]


def test_url_order() -> None:
    urls = ["a", "b", "c"]
    assert url_order(urls, None, skip_current=False) == ["a", "b", "c"]
    assert url_order(urls, "b", skip_current=False) == ["b", "c", "a"]
    assert url_order(urls, "b", skip_current=True) == ["c", "a", "b"]
    assert url_order(urls, "gone", skip_current=True) == ["a", "b", "c"]


K1, K2 = public_key(generate_private_key()), public_key(generate_private_key())


def test_config_is_upstreams_exact_text() -> None:
    sk = generate_private_key()
    servers = (
        WgServer(max(K1, K2), ipaddress.IPv4Interface("10.8.64.1/16"), "gw2.example:51820"),
        WgServer(min(K1, K2), ipaddress.IPv4Interface("10.8.0.1/16"), "192.0.2.1:51820"),
    )
    text = render_wg_config(sk, ipaddress.IPv4Address("10.8.0.7"), servers)
    assert text == (
        f"[Interface]\nPrivateKey = {sk}\nListenPort = 9182\nAddress = 10.8.0.7/32\n\n"
        f"[Peer]\nPublicKey = {min(K1, K2)}\nAllowedIPs = 10.8.0.1/32\n"
        "Endpoint = 192.0.2.1:51820\nPersistentKeepalive = 25\n"
        f"[Peer]\nPublicKey = {max(K1, K2)}\nAllowedIPs = 10.8.64.1/32\n"
        "Endpoint = gw2.example:51820\nPersistentKeepalive = 25\n"
    )


def test_filter_rules_text() -> None:
    ips = [ipaddress.IPv4Address("172.30.0.1"), ipaddress.IPv4Address("172.30.0.2")]
    assert iptables_rules(9182, ips).splitlines() == [
        "*filter",
        ":DSTACK_WG - [0:0]",
        "-F DSTACK_WG",
        "-A DSTACK_WG -s 172.30.0.1/32 -j ACCEPT",
        "-A DSTACK_WG -s 172.30.0.2/32 -j ACCEPT",
        "-A DSTACK_WG -j DROP",
        "COMMIT",
    ]
    assert "ip saddr { 172.30.0.1, 172.30.0.2 } accept" in nft_rules(9182, ips)
    assert "ip saddr" not in nft_rules(9182, [])  # no gateway: everything dropped


# --- real servers, real device ----------------------------------------------------------------


def _netns_env() -> None:
    require_lab("iptables")


@pytest.fixture
def netns() -> Iterator[str]:
    _netns_env()
    name = f"gwj{new_tag()}r"
    run(["ip", "netns", "add", name])
    try:
        run(["ip", "-n", name, "link", "set", "lo", "up"])
        yield name
    finally:
        for pid in run(["ip", "netns", "pids", name], check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), 9)
        run(["ip", "netns", "del", name], check=False)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> SimPki:
    return SimPki.load_or_create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def client_ca() -> CA:
    return make_ca("CVM client CA")


@contextlib.contextmanager
def gateway(tmp: Path, pki: SimPki, client_ca: CA, *, attested: bool = True) -> Iterator[RpcServer]:
    ca_file, _ = write_ca(client_ca, tmp, "client-ca")
    if attested:
        tee = measured_tee(pki, tmp / "tee", GW_APP, b"\x99" * 20)
        ctx = RpcIdentity(tee, tmp / "rpc").credentials(ca_file)
    else:
        ctx = TlsCredentials(*plain_server_files(tmp / "plain"), ca_file)
    store = SqliteStore(tmp / "registry.sqlite3")
    adv = Advertised(public_key(generate_private_key()), "10.0.0.1/24", "192.0.2.1:51820")
    try:
        with serve_rpc(
            ctx, pki, Registry(store, PLAN, clock=time.time), adv, port=free_port()
        ) as s:
            yield s
    finally:
        store.close()


def make_registrar(
    tmp: Path, pki: SimPki, client_ca: CA, netns: str, urls: list[str], **settings: float
) -> Registrar:
    tee = measured_tee(pki, tmp / "cvm-tee", CVM_APP, b"\x16" * 20)
    trust = GatewayTrust(parse_app_ids(GW_APP), SimCollateralSource(pki), pki.root_ca_der)
    return Registrar(
        urls=tuple(urls),
        client=GatewayClient(trust, timeout=3),
        keystore=GatewayKeyStore(tmp / "cvm"),
        issuer=TeeCertIssuer(tee, client_ca),
        tunnel=Tunnel(
            config_path=tmp / "cvm" / "wg.conf",
            iface=f"{netns}w",
            netns=netns,
            backend=Backend.WIREGUARD_GO,
            firewall=FilterBackend.IPTABLES,
            log_dir=tmp,
        ),
        settings=RegistrarSettings(
            poll_interval=settings.get("poll", 0.1),
            refresh_interval=settings.get("refresh", 1000),
            handshake_timeout=settings.get("handshake", 1000),
            retry_initial=0.1,
            retry_max=0.2,
        ),
        status_dir=tmp / "cvm",
    )


async def run_until(reg: Registrar, pred: object, timeout: float) -> None:
    task = reg.start()
    try:
        deadline = time.monotonic() + timeout
        while not pred():  # type: ignore[operator]
            assert not task.done(), task
            assert time.monotonic() < deadline, (reg.status(), reg.last_error)
            await asyncio.sleep(0.05)
    finally:
        await reg.stop()


@pytest.mark.netns
def test_failover_past_down_and_impostor_then_periodic_refresh(
    tmp_path: Path, pki: SimPki, client_ca: CA, netns: str
) -> None:
    down = f"https://127.0.0.1:{free_port()}"
    with (
        gateway(tmp_path / "imp", pki, client_ca, attested=False) as impostor,
        gateway(tmp_path / "gw", pki, client_ca) as good,
    ):
        urls = [down, f"https://127.0.0.1:{impostor.port}", f"https://127.0.0.1:{good.port}"]
        reg = make_registrar(tmp_path, pki, client_ca, netns, urls, refresh=0.3)

        async def scenario() -> None:
            try:
                await run_until(reg, lambda: reg.counters.registrations >= 3, 20)
            finally:
                await reg.close()

        started = time.monotonic()
        asyncio.run(scenario())
        assert reg.state.current_url == urls[2]
        assert reg.counters.rejected >= 1 and impostor.instances() == []
        assert len(good.instances()) == 1
        # periodic refreshes with an unchanged answer do not bounce the interface
        assert reg.counters.bounces == 1 and reg.counters.forced == 0
        conf = tmp_path / "cvm" / "wg.conf"
        assert stat.S_IMODE(conf.stat().st_mode) == 0o600
        assert conf.read_text().startswith("[Interface]\nPrivateKey = ")
        assert f"Address = {good.registry.store.list_instances()[0].ip}/32\n" in conf.read_text()
        assert time.monotonic() - started < 20
    assert not link_exists(f"{netns}w", netns)  # close() took it down


@pytest.mark.netns
def test_stale_handshake_forces_a_refresh_and_fails_over(
    tmp_path: Path, pki: SimPki, client_ca: CA, netns: str
) -> None:
    with (
        gateway(tmp_path / "a", pki, client_ca) as gw_a,
        gateway(tmp_path / "b", pki, client_ca) as gw_b,
    ):
        urls = [f"https://127.0.0.1:{gw_a.port}", f"https://127.0.0.1:{gw_b.port}"]
        reg = make_registrar(tmp_path, pki, client_ca, netns, urls, handshake=0.6)

        async def scenario() -> None:
            try:
                await run_until(reg, lambda: reg.state.configured, 15)
                assert reg.state.current_url == urls[0]
                first_pid = reg.tunnel.device.process.pid  # type: ignore[union-attr]
                # the endpoint is unreachable: no handshake, so after 0.6 s a forced refresh
                # starts with the other gateway and bounces the interface
                await run_until(
                    reg, lambda: reg.counters.forced >= 1 and reg.counters.bounces >= 2, 15
                )
                assert reg.state.current_url == urls[1]
                assert reg.tunnel.device.process.pid != first_pid  # type: ignore[union-attr]
            finally:
                await reg.close()

        asyncio.run(scenario())
        assert len(gw_a.instances()) == 1 and len(gw_b.instances()) == 1
        assert reg.state.last_forced > -math.inf


@pytest.mark.netns
def test_refused_gateway_writes_nothing_and_boot_is_not_blocked(
    tmp_path: Path, pki: SimPki, client_ca: CA, netns: str
) -> None:
    with gateway(tmp_path / "imp", pki, client_ca, attested=False) as impostor:
        reg = make_registrar(
            tmp_path, pki, client_ca, netns, [f"https://127.0.0.1:{impostor.port}"]
        )

        async def scenario() -> float:
            t0 = time.monotonic()
            task = reg.start()  # returns at once: boot goes on
            started = time.monotonic() - t0
            try:
                while reg.counters.failures < 2:
                    assert not task.done()
                    await asyncio.sleep(0.05)
            finally:
                await reg.close()
            return started

        assert asyncio.run(scenario()) < 0.05
        assert impostor.instances() == []
    assert not (tmp_path / "cvm" / "wg.conf").exists()
    assert not link_exists(f"{netns}w", netns)
    assert "not attested" in reg.last_error
    status = (tmp_path / "cvm" / "registrar-status.json").read_text()
    assert '"configured": false' in status


def test_bad_answer_never_reaches_the_config(tmp_path: Path) -> None:
    """Defence in depth: even a verified gateway's answer is validated before rendering."""
    with pytest.raises(ValueError):
        RegisterResponse.from_json(
            {
                "wg": {
                    "client_ip": "10.0.0.2",
                    "servers": [{"pk": K1, "ip": "10.0.0.1/24", "endpoint": "x:1\nPostUp = sh"}],
                }
            }
        )


def _counted_drops(backend: FilterBackend, netns: str) -> int:
    if backend is FilterBackend.IPTABLES:
        out = run(["iptables", "-L", "DSTACK_WG", "-v", "-x", "-n"], netns=netns).stdout
        return sum(int(line.split()[0]) for line in out.splitlines() if " DROP " in line)
    out = run(["nft", "list", "table", "inet", "dstack_wg"], netns=netns).stdout
    match = re.search(r"counter packets (\d+) bytes \d+ drop", out)
    assert match, out
    return int(match.group(1))


def _send(netns: str, count: int) -> None:
    code = (
        "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"[s.sendto(b'x', ('127.0.0.1', 9182)) for _ in range({count})]"
    )
    run([sys.executable, "-c", code], netns=netns)


@pytest.mark.netns
@pytest.mark.parametrize("backend", [FilterBackend.IPTABLES, FilterBackend.NFTABLES])
def test_filter_drops_other_sources(backend: FilterBackend, netns: str) -> None:
    if backend is FilterBackend.NFTABLES and shutil.which("nft") is None:
        pytest.skip("needs nft (apt-get install nftables)")
    apply_wg_filter(9182, [ipaddress.IPv4Address("10.9.9.9")], backend=backend, netns=netns)
    _send(netns, 3)  # from 127.0.0.1: not a gateway
    assert _counted_drops(backend, netns) == 3
    # the same source once it is a gateway endpoint: accepted (rules replaced, not added)
    apply_wg_filter(9182, [ipaddress.IPv4Address("127.0.0.1")], backend=backend, netns=netns)
    apply_wg_filter(9182, [ipaddress.IPv4Address("127.0.0.1")], backend=backend, netns=netns)
    before = _counted_drops(backend, netns)
    _send(netns, 3)
    assert _counted_drops(backend, netns) == before
    if backend is FilterBackend.IPTABLES:
        jumps = run(["iptables", "-S", "INPUT"], netns=netns).stdout.count("-j DSTACK_WG")
        assert jumps == 1


@pytest.mark.netns
def test_an_interface_left_by_an_earlier_run_is_replaced(
    tmp_path: Path, pki: SimPki, client_ca: CA, netns: str
) -> None:
    """After a crash the link may still exist with stale peers: bring it up clean."""
    stale = WgDevice(
        DeviceSpec(f"{netns}w", generate_private_key(), netns=netns, backend=Backend.WIREGUARD_GO)
    ).open()
    stale.set_peer(PeerConfig(K1, (ipaddress.IPv4Network("10.9.9.9/32"),)))
    with gateway(tmp_path / "gw", pki, client_ca) as good:
        reg = make_registrar(tmp_path, pki, client_ca, netns, [f"https://127.0.0.1:{good.port}"])

        async def scenario() -> list[str]:
            try:
                assert await reg.refresh(force=True)
                assert reg.tunnel.device is not None
                return [p.public_key for p in reg.tunnel.device.state().peers]
            finally:
                await reg.close()

        peers = asyncio.run(scenario())
    stale.close()
    assert peers == [good.service.advertised.wg_public_key]  # the stale peer is gone
