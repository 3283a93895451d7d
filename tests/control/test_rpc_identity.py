"""The gateway's RA-TLS RPC identity from configuration (``[rpc_identity]``)."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from gateway.attest.ratls import verify_ratls_cert
from gateway.config import ConfigError, parse_config
from gateway.control.rpc_identity import (
    RpcIdentity,
    RpcIdentityError,
    identity_from_settings,
    rpc_server_context,
)
from gateway.control.rpc_identity_settings import RpcIdentitySettings
from gateway.tee.sim_pki import SimPki
from gateway.util.tasks import spawn


def test_sim_identity_from_config_serves_an_attested_certificate(tmp_path: Path) -> None:
    cfg = parse_config(
        f"[rpc_identity]\ntee = 'sim'\nsim_dir = '{tmp_path / 'sim'}'\nvalidity_days = 2\n"
        "renew_before_hours = 12\nalt_names = ['gw.example']\n"
    )
    identity = identity_from_settings(cfg.rpc_identity, tmp_path / "data")
    assert identity is not None and identity.directory == tmp_path / "data" / "rpc-identity"
    ctx = rpc_server_context(identity, "", "", None)
    assert isinstance(ctx, ssl.SSLContext)
    cert = identity.current()
    assert cert is not None
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime.days == 2  # two days plus the five minutes of clock skew allowance
    pki = SimPki.load(tmp_path / "sim" / "pki")
    now = int(time.time())
    evidence = verify_ratls_cert(
        cert, collateral=pki.collateral(now), root_ca_der=pki.root_ca_der, now=now
    )
    assert evidence.identity.rtmr3  # the events the gateway's TD has measured so far


def test_without_identity_the_files_are_needed(tmp_path: Path) -> None:
    assert identity_from_settings(RpcIdentitySettings(), tmp_path) is None
    with pytest.raises(RpcIdentityError, match=r"\[rpc_identity\] tee"):
        rpc_server_context(None, "", "", None)


@pytest.mark.parametrize(
    "text",
    [
        "[rpc_identity]\ntee = 'sgx'\n",
        "[rpc_identity]\ntee = 'sim'\n",
        "[rpc_identity]\nvalidity_days = 1\nrenew_before_hours = 24\n",
    ],
)
def test_bad_settings_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_config(text)


def test_renewal_reaches_the_tls_server(tmp_path: Path) -> None:
    """identity.run(site.reload): after a renewal, new handshakes present the new pair."""
    from aiohttp import web

    from gateway.control.rpc_identity import RpcIdentityOptions, rpc_server_credentials
    from gateway.control.tls_server import TlsSite
    from gateway.tee.sim import SimTee

    pki = SimPki.create(not_before=int(time.time()) - 86400)
    clock = [time.time()]
    opts = RpcIdentityOptions(
        validity=dt.timedelta(days=2), renew_before=dt.timedelta(days=1), check_interval=0.05
    )
    identity = RpcIdentity(
        SimTee(pki, tmp_path / "tee"), tmp_path / "rpc", opts, clock=lambda: clock[0]
    )

    async def served(port: int) -> bytes:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # RA-TLS: the quote decides
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
        obj = writer.get_extra_info("ssl_object")
        der = obj.getpeercert(binary_form=True)
        writer.close()
        return bytes(der)

    async def scenario() -> tuple[bytes, bytes, bytes]:
        runner = web.AppRunner(web.Application())
        await runner.setup()
        site = TlsSite(runner, "127.0.0.1", 0, rpc_server_credentials(identity, "", "", None))
        await site.start()
        task = spawn(identity.run(site.reload), name="renew")
        try:
            first = await served(site.port)
            await asyncio.sleep(0.2)
            same = await served(site.port)  # nothing due: no renewal
            clock[0] += 86400 + 60
            deadline = time.monotonic() + 10
            while (renewed := await served(site.port)) == first:
                assert time.monotonic() < deadline, "the renewed certificate was not served"
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
            await runner.cleanup()
        return first, same, renewed

    first, same, renewed = asyncio.run(scenario())
    assert first == same != renewed
    current = identity.current()
    assert current is not None
    assert renewed == current.public_bytes(serialization.Encoding.DER)
