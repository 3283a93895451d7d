"""One CVM to gateway flow on the simulated TDX, with every piece real: a SimTee emitting
events and quoting a key hash, a sim PCCS on loopback, the gateway's verifier built from
``[attest]`` settings naming the sim root, async verification, RTMR3 replay."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from pathlib import Path

import pytest
from aiohttp import web

from gateway.attest.collateral import collateral_source_from_settings
from gateway.attest.quote import QuoteVerificationError, RejectReason, verifier_from_settings
from gateway.config import parse_config
from gateway.tee.base import RuntimeEvent, replay
from gateway.tee.sim import SimImage, SimTee
from gateway.tee.sim_pccs import create_sim_pccs_app
from gateway.tee.sim_pki import SimPki


def test_cvm_quote_verified_by_gateway_settings(
    tmp_path: Path, sim_now: int, caplog: pytest.LogCaptureFixture
) -> None:
    pki = SimPki.load_or_create(tmp_path / "pki", not_before=sim_now - 86400)
    tee = SimTee.open(tmp_path / "pki", tmp_path / "cvm", SimImage.named("app"))
    events = [RuntimeEvent("system-preparing", b""), RuntimeEvent("app-id", b"\x07" * 20),
              RuntimeEvent("system-ready", b"")]  # fmt: skip
    for e in events:
        tee.emit_event(e)
    binding = hashlib.sha512(b"the CVM's TLS public key").digest()
    quote = tee.get_quote(binding)

    async def main() -> None:
        runner = web.AppRunner(create_sim_pccs_app(pki, clock=lambda: float(sim_now)))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            cfg = parse_config(
                "[attest]\n"
                f'root_ca = "{tmp_path / "pki" / "root.der"}"\n'
                f'pccs_url = "http://127.0.0.1:{port}"\n'
                f'cache_dir = "{tmp_path / "cache"}"\n'
                f"verification_time = {sim_now}\n"
            )
            with caplog.at_level(logging.WARNING):
                verifier = verifier_from_settings(cfg.attest)
            assert "NON-INTEL" in caplog.text
            source = collateral_source_from_settings(cfg.attest)
            verified = await verifier.verify_async(quote, await source.get(quote))
            assert verified.report_data == binding
            assert verified.mr_td == SimImage.named("app").mr_td
            assert verified.rt_mr3 == replay(tee.runtime_events()) == replay(events)
            # The same gateway under default settings (Intel root) refuses the CVM.
            intel = verifier_from_settings(parse_config("").attest)
            with pytest.raises(QuoteVerificationError) as err:
                await intel.verify_async(quote, await source.get(quote))
            assert err.value.reason is RejectReason.WRONG_ROOT
        finally:
            await runner.cleanup()

    asyncio.run(main())
