"""What the one control process runs, and what happens when the admin API has no credentials:
never served open; the RPC/tunnel and certbot run without it (warning) unless
``admin.required``; configured-but-broken credentials always refuse."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.commands.serve import wants_control
from gateway.config import ConfigError, parse_config
from gateway.control.node import node_config
from gateway.control.roles import credentials_configured, node_roles, rpc_identity_kind

NO_ENV = "[admin]\ntoken_env = 'GW_TEST_ROLES_UNSET'\n"
ATTESTED = "[rpc_identity]\ntee = 'sim'\nsim_dir = '/s'\n"
FILES = "[rpc]\ncert_file = '/x.pem'\nkey_file = '/x.key'\n"
ACME = "[acme]\nenabled = true\n"


@pytest.fixture(autouse=True)
def _unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GW_TEST_ROLES_UNSET", raising=False)
    monkeypatch.delenv("GW_TEST_ROLES_TOKEN", raising=False)


def test_rpc_identity_kind() -> None:
    assert rpc_identity_kind(parse_config("")) == ""
    assert rpc_identity_kind(parse_config(ATTESTED)) == "attested"
    assert rpc_identity_kind(parse_config(FILES)) == "files"
    assert rpc_identity_kind(parse_config(ATTESTED + FILES)) == "attested"  # the quote wins
    # rpc.enabled = false: an identity's TEE may back /app-info, but no RPC and no tunnel run
    off = "[rpc]\nenabled = false\ncert_file = '/x.pem'\nkey_file = '/x.key'\n"
    assert rpc_identity_kind(parse_config(ATTESTED + off)) == ""
    assert not node_roles(parse_config(ATTESTED + off)).runs_anything


@pytest.mark.parametrize("extra", [ATTESTED, FILES, ACME])
def test_no_credentials_runs_the_rest_without_the_admin_api(extra: str) -> None:
    cfg = parse_config(NO_ENV + extra)
    roles = node_roles(cfg)
    assert not roles.admin and roles.runs_anything
    assert "admin API is OFF" in roles.admin_off and "GW_TEST_ROLES_UNSET" in roles.admin_off
    assert "admin.required" in roles.admin_off
    assert wants_control(cfg)  # serve starts its one child
    ran = node_config(cfg, roles)
    assert not ran.admin.enabled  # the plane never serves it (nor asks for credentials)
    assert ran.acme.enabled == cfg.acme.enabled and ran.rpc == cfg.rpc


def test_required_admin_refuses_without_credentials() -> None:
    cfg = parse_config(NO_ENV.replace("[admin]\n", "[admin]\nrequired = true\n") + ATTESTED)
    with pytest.raises(ConfigError, match="required") as err:
        node_roles(cfg)
    assert "GW_TEST_ROLES_UNSET" in str(err.value)
    with pytest.raises(ConfigError):
        wants_control(cfg)


def test_configured_but_broken_credentials_always_refuse(tmp_path: Path) -> None:
    short = tmp_path / "short.token"
    short.write_text("short\n")
    for admin in (f"token_file = '{short}'\n", f"htpasswd_file = '{tmp_path / 'missing'}'\n"):
        cfg = parse_config(f"[admin]\n{admin}" + ATTESTED)
        assert credentials_configured(cfg.admin)
        with pytest.raises(ConfigError):
            node_roles(cfg)


def test_credentials_serve_the_admin_api(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GW_TEST_ROLES_TOKEN", "t" * 32)
    cfg = parse_config("[admin]\ntoken_env = 'GW_TEST_ROLES_TOKEN'\n" + ATTESTED)
    roles = node_roles(cfg)
    assert roles.admin and roles.rpc == "attested" and roles.admin_off == ""
    assert node_config(cfg, roles) is cfg


def test_proxy_only_without_credentials_starts_no_child() -> None:
    cfg = parse_config(NO_ENV)
    roles = node_roles(cfg)
    assert not roles.runs_anything and "the proxy only" in roles.admin_off
    assert not wants_control(cfg)
    assert not wants_control(parse_config("[admin]\nenabled = false\n"))
    assert node_roles(parse_config("[admin]\nenabled = false\n" + FILES)).rpc == "files"


def _gateway(tmp_path: Path, command: str, config: str) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f"[core]\ndata_dir = '{tmp_path / 'data'}'\n{config}")
    env = {k: v for k, v in os.environ.items() if k != "GW_TEST_ROLES_UNSET"}
    return subprocess.run(
        [sys.executable, "-m", "gateway", command, "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


@pytest.mark.slow
def test_commands_refuse_what_must_not_run(tmp_path: Path) -> None:
    """Exit 2 before anything binds: serve with a required admin API and no credentials,
    control with nothing to run, rpc without an RPC identity."""
    required = NO_ENV.replace("[admin]\n", "[admin]\nrequired = true\n") + ATTESTED
    out = _gateway(tmp_path, "serve", required)
    assert out.returncode == 2 and "admin.required = true" in out.stderr, out.stderr
    assert not (tmp_path / "data" / "run" / "gateway.pid").exists()
    out = _gateway(tmp_path, "control", NO_ENV)
    assert out.returncode == 2 and "nothing to run" in out.stderr, out.stderr
    out = _gateway(tmp_path, "rpc", NO_ENV)
    assert out.returncode == 2 and "[rpc_identity] tee" in out.stderr, out.stderr
