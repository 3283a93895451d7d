"""The timer task against a real device: handshakes observed, silent instances recycled."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.config import parse_config
from gateway.lab.harness import Lab
from gateway.registry.factory import build_registry, open_store, store_path
from gateway.registry.maintenance import Maintenance
from gateway.registry.service import Registration
from gateway.util.tasks import spawn

pytestmark = [pytest.mark.netns, pytest.mark.slow]


def test_tick_observes_then_recycles(make_lab: Callable[..., Lab], tmp_path: Path) -> None:
    lab = make_lab(cvms=1)
    assert lab.gateway is not None
    cfg = parse_config(f"[wg]\nrecycle_timeout = 30.0\n[registry]\npath = '{tmp_path}/r.db'\n")
    store = open_store(cfg.registry, tmp_path)
    assert store_path(cfg.registry, tmp_path) == tmp_path / "r.db"
    registry = build_registry(store, cfg.wg, cfg.registry, lab.gateway)
    (node,) = lab.nodes
    rec = registry.register(Registration(node.netns, "app", node.public_key))
    assert rec.ip in cfg.wg.client_ip_range
    lab.connect(node, rec.ip)
    assert lab.fetch_instance(node) == node.netns

    ticks = Maintenance(registry, lab.gateway, poll_interval=0.05, recycle_interval=3600)
    ticks.tick()
    seen = store.get_instance(node.netns)
    assert seen is not None and seen.last_handshake is not None
    (obs,) = store.handshakes(node.netns)
    assert obs.endpoint is not None and obs.endpoint.startswith(f"{node.underlay_ip}:")

    registry.clock = lambda: time.time() + 31  # silent for longer than recycle_timeout
    ticks._next_recycle = 0.0
    node.device.remove_peer(lab.gateway_public_key)  # the CVM stops talking
    ticks.tick()
    assert store.get_instance(node.netns) is None
    assert lab.gateway.state().peers == ()
    store.close()


def test_run_loop_survives_failures_and_cancels(tmp_path: Path) -> None:
    class Broken:
        calls = 0

        def state(self) -> object:
            Broken.calls += 1
            raise RuntimeError("device gone")

    cfg = parse_config("")
    store = open_store(cfg.registry, tmp_path)
    registry = build_registry(store, cfg.wg, cfg.registry, None)
    loop_task = Maintenance(registry, Broken(), poll_interval=0.01, recycle_interval=3600)  # type: ignore[arg-type]

    async def main() -> None:
        task = spawn(loop_task.run(), name="maintenance")
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert Broken.calls >= 3  # kept polling after each failure
    store.close()
