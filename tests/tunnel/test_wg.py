"""wireguard-go devices in network namespaces, driven through WgDevice (real processes)."""

from __future__ import annotations

import ipaddress
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.lab.harness import Lab
from gateway.tunnel.commands import run
from gateway.tunnel.control import WgToolControl, socket_listening, uapi_socket_path
from gateway.tunnel.errors import TunnelError
from gateway.tunnel.keys import generate_private_key, public_key
from gateway.tunnel.uapi import PeerConfig, PeerRemoval
from gateway.tunnel.wg import Backend, DeviceSpec, WgDevice, link_exists

pytestmark = [pytest.mark.netns, pytest.mark.slow]

MakeLab = Callable[..., Lab]


def peer(pk: str, ip: str, keepalive: int | None = 25) -> PeerConfig:
    return PeerConfig(pk, (ipaddress.ip_network(f"{ip}/32"),), persistent_keepalive=keepalive)


def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def test_incremental_peers_traffic_handshake_and_removal(make_lab: MakeLab) -> None:
    lab = make_lab(cvms=2)
    gw = lab.gateway
    assert gw is not None and gw.backend is Backend.WIREGUARD_GO
    a, b = lab.nodes
    ip_a, ip_b = ipaddress.IPv4Address("10.0.0.2"), ipaddress.IPv4Address("10.0.0.3")

    gw.set_peer(peer(a.public_key, str(ip_a)))
    lab.connect(a, ip_a)
    assert lab.fetch_instance(a) == a.netns  # HTTP GET over the tunnel address
    first = gw.state().peer(a.public_key)
    assert first is not None and first.last_handshake is not None
    assert abs(first.last_handshake - time.time()) < 30
    assert first.rx_bytes > 0 and first.tx_bytes > 0

    gw.set_peer(peer(b.public_key, str(ip_b)))  # adding b leaves a's session alone
    lab.connect(b, ip_b)
    assert lab.fetch_instance(b) == b.netns
    again = gw.state().peer(a.public_key)
    assert again is not None and again.last_handshake == first.last_handshake
    assert lab.fetch_instance(a) == a.netns

    gw.remove_peer(a.public_key)
    assert gw.state().peer(a.public_key) is None
    assert lab.fetch_instance(a, timeout=1) is None  # no peer: traffic stops
    assert lab.fetch_instance(b) == b.netns
    gw.remove_peer(a.public_key)  # removing an absent peer is fine


def test_key_rotation(make_lab: MakeLab) -> None:
    lab = make_lab(cvms=1)
    gw, (node,) = lab.gateway, lab.nodes
    assert gw is not None
    ip = ipaddress.IPv4Address("10.0.0.9")
    old = node.public_key
    gw.set_peer(peer(old, str(ip)))
    lab.connect(node, ip)
    assert lab.fetch_instance(node) == node.netns

    new_private = generate_private_key()
    node.device.set_private_key(new_private)
    assert node.device.state().public_key == public_key(new_private)
    assert lab.fetch_instance(node, timeout=1) is None  # the gateway does not know the new key
    gw.apply([PeerRemoval(old), peer(public_key(new_private), str(ip))])  # one request
    assert [p.public_key for p in gw.state().peers] == [public_key(new_private)]
    lab.connect(node, ip)  # the guest re-applies its config, which starts a handshake now
    wait_for(lambda: lab.fetch_instance(node, timeout=1) == node.netns, 10, "rotated tunnel")


def test_wg_tool_control_reads_and_changes_the_same_device(make_lab: MakeLab) -> None:
    """The kernel path (wg set / wg show dump) agrees with UAPI on a live device."""
    lab = make_lab(cvms=1)
    gw, (node,) = lab.gateway, lab.nodes
    assert gw is not None
    tool = WgToolControl(lab.gw_iface, netns=lab.gw_netns)
    tool.apply([peer(node.public_key, "10.0.0.5")])
    lab.connect(node, ipaddress.IPv4Address("10.0.0.5"))
    assert lab.fetch_instance(node) == node.netns
    via_tool, via_uapi = tool.state(), gw.state()
    assert via_tool.public_key == via_uapi.public_key == lab.gateway_public_key
    assert via_tool.listen_port == lab.wg_port
    (tp,), (up,) = via_tool.peers, via_uapi.peers
    assert tp.public_key == up.public_key and tp.allowed_ips == up.allowed_ips
    assert tp.endpoint == up.endpoint and tp.persistent_keepalive == 25
    assert tp.last_handshake is not None and int(tp.last_handshake) == int(up.last_handshake or 0)
    other = public_key(generate_private_key())
    tool.apply([peer(other, "10.0.0.6")], replace_peers=True)
    assert [p.public_key for p in gw.state().peers] == [other]
    tool.configure(private_key=generate_private_key(), listen_port=lab.wg_port + 1)
    assert gw.state().listen_port == lab.wg_port + 1


def test_sync_peers_touches_only_differences(make_lab: MakeLab) -> None:
    lab = make_lab(cvms=0)
    gw = lab.gateway
    assert gw is not None
    keys = [public_key(generate_private_key()) for _ in range(4)]
    gw.apply([peer(keys[0], "10.0.0.2"), peer(keys[1], "10.0.0.3"), peer(keys[3], "10.0.0.9")])
    desired = {
        keys[0]: peer(keys[0], "10.0.0.2"),  # same: untouched
        keys[1]: peer(keys[1], "10.0.0.4"),  # moved
        keys[2]: peer(keys[2], "10.0.0.5"),  # new
    }
    result = gw.sync_peers(desired)
    assert (result.added, result.updated, result.removed) == ((keys[2],), (keys[1],), (keys[3],))
    state = {p.public_key: p.allowed_ips for p in gw.state().peers}
    assert state == {k: v.allowed_ips for k, v in desired.items()}
    assert gw.sync_peers(desired) == type(result)((), (), ())


def test_auto_backend_and_lifecycle(make_lab: MakeLab, tmp_path: Path) -> None:
    lab = make_lab(cvms=0, gateway_device=False)
    name = f"{lab.base}au"
    spec = DeviceSpec(name, generate_private_key(), 0, netns=lab.gw_netns)
    kernel = (
        run(
            ["ip", "-n", lab.gw_netns, "link", "add", "x" + lab.base, "type", "wireguard"],
            check=False,
        ).returncode
        == 0
    )
    with WgDevice(spec, log_dir=tmp_path) as dev:
        assert dev.backend is (Backend.KERNEL if kernel else Backend.WIREGUARD_GO)
        assert link_exists(name, lab.gw_netns)
        if not kernel:
            assert dev.process is not None and dev.process.alive()
            pid = dev.process.pid
    if not kernel:
        assert not link_exists(name, lab.gw_netns)  # stopping wireguard-go removed it
        assert not uapi_socket_path(name).exists()
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_kernel_backend_error_is_clear_without_module(make_lab: MakeLab) -> None:
    lab = make_lab(cvms=0, gateway_device=False)
    probe = run(
        ["ip", "-n", lab.gw_netns, "link", "add", f"{lab.base}kp", "type", "wireguard"], check=False
    )
    if probe.returncode == 0:
        pytest.skip("this kernel has WireGuard: the no-module error cannot be produced")
    spec = DeviceSpec(
        f"{lab.base}kn", generate_private_key(), netns=lab.gw_netns, backend=Backend.KERNEL
    )
    with pytest.raises(TunnelError, match="wireguard"):
        WgDevice(spec).open()


def test_stale_socket_is_replaced_and_name_clash_refused(make_lab: MakeLab, tmp_path: Path) -> None:
    lab = make_lab(cvms=1, gateway_device=False)
    name = f"{lab.base}st"
    sock_path = uapi_socket_path(name)
    sock_path.parent.mkdir(parents=True, exist_ok=True)
    with socket.socket(socket.AF_UNIX) as dead:  # a socket file nobody listens on any more
        dead.bind(str(sock_path))
    assert not socket_listening(sock_path)
    spec = DeviceSpec(
        name, generate_private_key(), netns=lab.gw_netns, backend=Backend.WIREGUARD_GO
    )
    with WgDevice(spec, log_dir=tmp_path) as dev:
        assert dev.state().listen_port > 0
        clash = DeviceSpec(
            name, generate_private_key(), netns=lab.nodes[0].netns, backend=Backend.WIREGUARD_GO
        )
        with pytest.raises(TunnelError, match="unique"):
            WgDevice(clash).open()
        assert dev.state().public_key == public_key(spec.private_key)  # still ours
