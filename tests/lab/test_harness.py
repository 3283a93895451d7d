"""The lab builds isolated namespaces and always leaves nothing behind."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.lab.harness import OWNER_DIR, Lab, cleanup_leftovers, new_tag
from gateway.tunnel.commands import run
from gateway.tunnel.control import uapi_socket_path
from gateway.tunnel.uapi import PeerConfig

pytestmark = [pytest.mark.netns, pytest.mark.slow]

MakeLab = Callable[..., Lab]


def namespaces() -> set[str]:
    return {line.split()[0] for line in run(["ip", "netns", "list"]).stdout.splitlines() if line}


def test_layout_is_isolated(make_lab: MakeLab) -> None:
    lab = make_lab(cvms=2)
    assert {lab.gw_netns, *(n.netns for n in lab.nodes)} <= namespaces()
    for ns in (lab.gw_netns, *(n.netns for n in lab.nodes)):
        routes = run(["ip", "-n", ns, "route", "show", "default"]).stdout
        assert routes.strip() == "", f"{ns} must have no default route"
    names = [lab.gw_iface, *(n.device.spec.name for n in lab.nodes)]
    assert all(len(name) <= 15 and name.startswith("gwh") for name in names)
    assert len(set(names)) == len(names)
    # the underlay works between the namespaces (the gateway can reach each CVM's origin)
    for node in lab.nodes:
        status, body = lab.http_get(lab.gw_netns, f"http://{node.underlay_ip}:{lab.origin_port}/x")
        assert status == 200 and node.netns.encode() in body
    # and nothing of it is visible from the machine's own namespace
    host_addrs = run(["ip", "-o", "addr"]).stdout
    assert str(lab.underlay.ip) not in host_addrs.split()


def test_down_removes_everything(tmp_path: Path, lab_env: None) -> None:
    lab = Lab(cvms=2, workdir=tmp_path)
    with lab:
        gw = lab.gateway
        assert gw is not None and gw.process is not None
        pids = [gw.process.pid] + [
            p.pid for n in lab.nodes for p in (n.device.process, n.origin) if p is not None
        ]
        socks = [uapi_socket_path(lab.gw_iface)] + [
            uapi_socket_path(n.device.spec.name) for n in lab.nodes
        ]
        made = {lab.gw_netns, *(n.netns for n in lab.nodes)}
        base = lab.base
    assert not made & namespaces()
    assert not any(s.exists() for s in socks)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not (OWNER_DIR / base).exists()


def test_failure_inside_the_lab_still_tears_down(tmp_path: Path, lab_env: None) -> None:
    lab = Lab(cvms=1, workdir=tmp_path)
    with pytest.raises(RuntimeError, match="boom"), lab:
        made = set(lab.namespaces)
        raise RuntimeError("boom")
    assert not made & namespaces()


def test_failed_build_is_rolled_back(tmp_path: Path, lab_env: None) -> None:
    lab = Lab(cvms=1, workdir=tmp_path, wireguard_go="/nonexistent/wireguard-go")
    with pytest.raises(Exception, match="wireguard-go"):
        lab.up()
    assert not any(ns.startswith(lab.base) for ns in namespaces())


def test_cleanup_removes_dead_labs_only(make_lab: MakeLab) -> None:
    live = make_lab(cvms=0)
    dead_base = f"gwh{new_tag()}"
    run(["ip", "netns", "add", f"{dead_base}g"])
    OWNER_DIR.mkdir(parents=True, exist_ok=True)
    (OWNER_DIR / dead_base).write_text("999999999")  # no such PID
    orphan = f"gwh{new_tag()}c1"  # a namespace of our prefix without an owner file
    run(["ip", "netns", "add", orphan])
    with contextlib.ExitStack() as stack:
        # a daemon that accepts but is slow to answer is alive; a bound, unlistened file is not
        busy = stack.enter_context(socket.socket(socket.AF_UNIX))
        busy_path = uapi_socket_path(f"gwh{new_tag()}bz")
        busy.bind(str(busy_path))
        busy.listen()
        stack.callback(busy_path.unlink, missing_ok=True)
        dead_path = uapi_socket_path(f"gwh{new_tag()}dd")
        with socket.socket(socket.AF_UNIX) as dead:
            dead.bind(str(dead_path))
        cleanup_leftovers("gwh")
        assert busy_path.exists() and not dead_path.exists()
    # (asserted on the result, not on what this call removed: a concurrent run's cleanup
    # may have removed the same leftovers first)
    assert f"{dead_base}g" not in namespaces() and orphan not in namespaces()
    assert not (OWNER_DIR / dead_base).exists()
    assert live.gw_netns in namespaces()  # its owner (this process) is alive
    assert live.gateway is not None and live.gateway.state().listen_port == live.wg_port


def test_connect_gives_the_tunnel_path(make_lab: MakeLab) -> None:
    lab = make_lab(cvms=1)
    (node,) = lab.nodes
    assert lab.gateway is not None
    ip = ipaddress.IPv4Address("10.0.0.77")
    lab.gateway.set_peer(PeerConfig(node.public_key, (ipaddress.ip_network(f"{ip}/32"),)))
    lab.connect(node, ip)
    assert lab.fetch_instance(node) == node.netns
    status, body = lab.http_get(lab.gw_netns, f"http://{ip}:{lab.origin_port}/big?bytes=1000000")
    assert status == 200 and len(body) == 1_000_000
    assert lab.status()["cvms"] == [
        {"netns": node.netns, "underlay": str(node.underlay_ip), "tunnel_ip": str(ip)}
    ]
