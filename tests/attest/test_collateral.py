from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gateway.attest.collateral import (
    MIN_REFETCH_INTERVAL,
    CollateralError,
    FileCollateralSource,
    PccsCollateralSource,
    SimCollateralSource,
    collateral_expiry,
    collateral_source_from_settings,
    load_collateral_file,
    quote_collateral_key,
    raw_json_members,
)
from gateway.attest.quote import verify_quote
from gateway.attest.settings import AttestSettings
from gateway.tee.sim_pccs import REQUESTS, create_sim_pccs_app
from gateway.tee.sim_pki import SimPki

DATA = Path(__file__).parents[1] / "data" / "tdx-sample"


class Clock:
    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> float:
        return float(self.now)


def run(coro_fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(coro_fn())


async def _serve(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def test_sample_collateral_expiry_is_the_pck_crl() -> None:
    col = load_collateral_file(DATA / "tdx_quote_collateral.json")
    assert collateral_expiry(col) == 1752919235


def test_sample_quote_key() -> None:
    assert quote_collateral_key((DATA / "tdx_quote").read_bytes()) == ("B0C06F000000", "platform")


def test_file_source_and_errors(tmp_path: Path) -> None:
    src = FileCollateralSource(DATA / "tdx_quote_collateral.json")
    col = asyncio.run(src.get(b""))
    verify_quote((DATA / "tdx_quote").read_bytes(), col, now=1751500000)
    with pytest.raises(CollateralError, match="cannot read"):
        load_collateral_file(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(CollateralError, match="bad.json"):
        load_collateral_file(tmp_path / "bad.json")


def test_raw_json_members_keep_exact_text() -> None:
    text = '{ "tcbInfo" : {"b":1, "a":[1,2]} , "signature":"ab"}'
    assert raw_json_members(text) == {"tcbInfo": '{"b":1, "a":[1,2]}', "signature": '"ab"'}
    for bad in ("[]", "{", '{"a" 1}', '{"a":1,}', ""):
        with pytest.raises(CollateralError):
            raw_json_members(bad)


def test_sim_source_regenerates_before_expiry(sim_pki: SimPki, sim_now: int) -> None:
    clock = Clock(sim_now)
    src = SimCollateralSource(sim_pki, clock=clock)
    first = asyncio.run(src.get(b""))
    assert asyncio.run(src.get(b"")) is first
    clock.now = collateral_expiry(first) - 10
    second = asyncio.run(src.get(b""))
    assert second is not first and collateral_expiry(second) > clock.now + 86400


@pytest.fixture
def pccs(sim_pki: SimPki, sim_now: int) -> tuple[SimPki, Clock]:
    return sim_pki, Clock(sim_now)


def test_pccs_fetch_cache_and_refresh(pccs: tuple[SimPki, Clock], tmp_path: Path) -> None:
    pki, clock = pccs
    quote = pki.forge_quote(bytes(64))
    app = create_sim_pccs_app(pki, clock=clock, validity=7 * 86400)

    async def main() -> None:
        async for url in _serve(app):
            src = PccsCollateralSource(url + "/sgx/certification/v4", tmp_path / "cache",
                                       refresh_margin=3600, clock=clock)  # fmt: skip
            col = await src.get(quote)
            v = verify_quote(quote, col, root_ca_der=pki.root_ca_der, now=clock.now)
            assert v.report_data == bytes(64)
            assert src.fetches == 1
            key = quote_collateral_key(quote)
            cached = src.cache_path(key[0], "platform")
            assert cached.exists()
            # Served again from memory, then (new source) from disk: no new fetch.
            await src.get(quote)
            again = PccsCollateralSource(url, tmp_path / "cache", clock=clock)
            await again.get(quote)
            assert src.fetches == 1 and again.fetches == 0
            assert sum(app[REQUESTS].values()) == 4
            # Within the refresh margin of nextUpdate: refetched, and the new one verifies.
            clock.now = collateral_expiry(col) - 1800
            fresh = await again.get(quote)
            assert again.fetches == 1
            assert collateral_expiry(fresh) > collateral_expiry(col)
            verify_quote(quote, fresh, root_ca_der=pki.root_ca_der, now=clock.now)
            # Concurrent callers share one fetch.
            clock.now = collateral_expiry(fresh) - 10
            third = PccsCollateralSource(url, tmp_path / "cache", clock=clock)
            await asyncio.gather(*(third.get(quote) for _ in range(5)))
            assert third.fetches == 1

    run(main)


def test_pccs_failure_falls_back_to_unexpired_cache_only(
    pccs: tuple[SimPki, Clock], tmp_path: Path
) -> None:
    pki, clock = pccs
    quote = pki.forge_quote(bytes(64))

    async def main() -> None:
        async for url in _serve(create_sim_pccs_app(pki, clock=clock)):
            col = await PccsCollateralSource(url, tmp_path, clock=clock).get(quote)
        expiry = collateral_expiry(col)
        # The server is gone now.
        dead = PccsCollateralSource(url, tmp_path, clock=clock, timeout=2)
        clock.now = expiry - 60  # inside the margin, but not expired: cached copy is used
        assert collateral_expiry(await dead.get(quote)) == expiry
        clock.now = expiry + 1
        with pytest.raises(CollateralError, match="failed"):
            await PccsCollateralSource(url, tmp_path, clock=clock, timeout=2).get(quote)

    run(main)


def test_pccs_serving_near_expiry_data_is_not_hammered(
    pccs: tuple[SimPki, Clock], tmp_path: Path
) -> None:
    pki, clock = pccs
    quote = pki.forge_quote(bytes(64))
    # Valid for 30 minutes only: always inside the 1-hour refresh margin.
    app = create_sim_pccs_app(pki, clock=clock, validity=1800)

    async def main() -> None:
        async for url in _serve(app):
            src = PccsCollateralSource(url, tmp_path, clock=clock, refresh_margin=3600)
            await src.get(quote)
            clock.now += 60
            await src.get(quote)
            assert src.fetches == 1
            clock.now += MIN_REFETCH_INTERVAL
            col = await src.get(quote)
            assert src.fetches == 2
            verify_quote(quote, col, root_ca_der=pki.root_ca_der, now=clock.now)

    run(main)


def test_pccs_unknown_fmspc_and_corrupt_cache(pccs: tuple[SimPki, Clock], tmp_path: Path) -> None:
    pki, clock = pccs

    async def main() -> None:
        async for url in _serve(create_sim_pccs_app(pki, clock=clock)):
            src = PccsCollateralSource(url, tmp_path, clock=clock)
            with pytest.raises(CollateralError, match="404"):
                await src.get_for("00112233AABB", "platform")
            fmspc = pki.platform.fmspc.hex().upper()
            src.cache_path(fmspc, "platform").write_text("not json")
            col = await src.get_for(fmspc, "platform")
            assert src.fetches == 2
            assert json.loads(src.cache_path(fmspc, "platform").read_text())["tcb_info"]
            assert collateral_expiry(col) > clock.now

    run(main)


def test_source_from_settings(tmp_path: Path) -> None:
    f = collateral_source_from_settings(
        AttestSettings(collateral_source="file", collateral_file=str(tmp_path / "c.json"))
    )
    assert isinstance(f, FileCollateralSource)
    p = collateral_source_from_settings(AttestSettings(cache_dir=tmp_path))
    assert isinstance(p, PccsCollateralSource)
