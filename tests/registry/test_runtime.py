"""open_tunnel from a configuration: a gateway device in the lab's namespace, restart restore."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.config import parse_config
from gateway.control.registration import advertised_from_config
from gateway.lab.harness import Lab
from gateway.registry.runtime import open_tunnel
from gateway.registry.service import Registration
from gateway.tunnel.control import socket_listening, uapi_socket_path
from gateway.tunnel.wg import Backend

pytestmark = [pytest.mark.netns, pytest.mark.slow]


def test_open_register_close_reopen(make_lab: Callable[..., Lab], tmp_path: Path) -> None:
    lab = make_lab(cvms=1, gateway_device=False)
    (node,) = lab.nodes
    iface = f"{lab.base}rt"
    cfg = parse_config(
        f"[core]\ndata_dir = '{tmp_path}'\n"
        f"[wg]\ninterface = '{iface}'\nnetns = '{lab.gw_netns}'\nlisten_port = {lab.wg_port}\n"
        f"endpoint = '{lab.endpoint}'\nbackend = 'wireguard-go'\n"
        "handshake_poll_interval = 0.1\n"
    )

    async def first() -> str:
        async with open_tunnel(cfg) as tunnel:
            assert tunnel.device.backend is Backend.WIREGUARD_GO
            rec = await asyncio.to_thread(
                tunnel.registry.register, Registration(node.netns, "app", node.public_key)
            )
            lab.connect(node, rec.ip, server_public_key=tunnel.public_key)
            assert await asyncio.to_thread(lab.fetch_instance, node) == node.netns
            await asyncio.sleep(0.3)  # the maintenance task records the handshake
            seen = tunnel.store.get_instance(node.netns)
            assert seen is not None and seen.last_handshake is not None
            adv = advertised_from_config(cfg, tunnel.public_key)
            assert (adv.wg_ip, adv.wg_endpoint) == ("10.0.0.1/24", lab.endpoint)
            return str(rec.ip)

    ip = asyncio.run(first())
    assert not socket_listening(uapi_socket_path(iface))  # closed: wireguard-go stopped
    assert (tmp_path / "wg.key").stat().st_mode & 0o777 == 0o600

    async def second() -> None:
        async with open_tunnel(cfg) as tunnel:  # same key file, same database
            assert [p.public_key for p in tunnel.device.state().peers] == [node.public_key]
            assert str(node.tunnel_ip) == ip
            ok = False
            for _ in range(100):
                if await asyncio.to_thread(lab.fetch_instance, node, timeout=1) == node.netns:
                    ok = True
                    break
                await asyncio.sleep(0.05)
            assert ok, "traffic did not resume after reopening"

    asyncio.run(second())
