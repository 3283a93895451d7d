"""A PCCS for the simulated PKI: the v4 endpoints a verifier fetches collateral from.

Lets the lab and the tests exercise ``gateway.attest.collateral.PccsCollateralSource``
(fetch, cache, refresh on ``nextUpdate``) without the internet. Collateral is generated
per request at the injected clock's time, like a PCCS that always has the current issue.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from urllib.parse import quote

import dcap_qvl
from aiohttp import web

from gateway.tee.sim_pki import SimPki

__all__ = ["REQUESTS", "create_sim_pccs_app"]

REQUESTS = web.AppKey("requests", Counter[str])


def create_sim_pccs_app(
    pki: SimPki, *, clock: Callable[[], float] = time.time, validity: int = 30 * 86400
) -> web.Application:
    """An aiohttp app serving ``pki``'s collateral valid for ``validity`` seconds from now."""

    def collateral() -> dcap_qvl.QuoteCollateralV3:
        now = int(clock())
        window = (now - 3600, now + validity)
        return pki.collateral(
            now, crl_window=window, tcb_info_window=window, qe_identity_window=window
        )

    def count(request: web.Request) -> None:
        request.app[REQUESTS][request.path] += 1

    async def pckcrl(request: web.Request) -> web.Response:
        count(request)
        if request.query.get("ca") != "platform":
            return web.Response(status=404, text="unknown ca")
        col = collateral()
        return web.Response(
            body=bytes(col.pck_crl),
            headers={"SGX-PCK-CRL-Issuer-Chain": quote(col.pck_crl_issuer_chain)},
        )

    async def rootcacrl(request: web.Request) -> web.Response:
        count(request)
        return web.Response(text=bytes(collateral().root_ca_crl).hex())

    async def tcb(request: web.Request) -> web.Response:
        count(request)
        if request.query.get("fmspc", "").upper() != pki.platform.fmspc.hex().upper():
            return web.Response(status=404, text="no TCB info for this FMSPC")
        col = collateral()
        body = (
            '{"tcbInfo":' + col.tcb_info
            + ',"signature":' + json.dumps(bytes(col.tcb_info_signature).hex()) + "}"
        )  # fmt: skip
        return web.Response(
            text=body,
            content_type="application/json",
            headers={"TCB-Info-Issuer-Chain": quote(col.tcb_info_issuer_chain)},
        )

    async def qe_identity(request: web.Request) -> web.Response:
        count(request)
        col = collateral()
        body = (
            '{"enclaveIdentity":' + col.qe_identity
            + ',"signature":' + json.dumps(bytes(col.qe_identity_signature).hex()) + "}"
        )  # fmt: skip
        return web.Response(
            text=body,
            content_type="application/json",
            headers={"SGX-Enclave-Identity-Issuer-Chain": quote(col.qe_identity_issuer_chain)},
        )

    app = web.Application()
    app[REQUESTS] = Counter()
    app.router.add_routes(
        [
            web.get("/sgx/certification/v4/pckcrl", pckcrl),
            web.get("/sgx/certification/v4/rootcacrl", rootcacrl),
            web.get("/tdx/certification/v4/tcb", tcb),
            web.get("/tdx/certification/v4/qe/identity", qe_identity),
        ]
    )
    return app
