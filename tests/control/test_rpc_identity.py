"""The gateway's RA-TLS RPC identity from configuration (``[rpc_identity]``)."""

from __future__ import annotations

import ssl
import time
from pathlib import Path

import pytest

from gateway.attest.ratls import verify_ratls_cert
from gateway.config import ConfigError, parse_config
from gateway.control.rpc_identity import (
    RpcIdentityError,
    identity_from_settings,
    rpc_server_context,
)
from gateway.control.rpc_identity_settings import RpcIdentitySettings
from gateway.tee.sim_pki import SimPki


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
