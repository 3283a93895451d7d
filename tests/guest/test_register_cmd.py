"""``gateway guest-register``: configuration mistakes are usage errors that say what to fix."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.guest.gateway_cache import TeeCertIssuer
from gateway.guest.gateway_client import PortPolicy
from gateway.guest.identity import KeyProviderKind
from gateway.guest.keys import app_keys_from_seed
from gateway.guest.register_cmd import add_arguments, build
from tests.helpers.gateway_rpc import GW_APP


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """The command configures the root logger; give pytest's handlers back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "no gateway URLs"),
        (["--gateway-url", "https://gw:1"], "no gateway app id is pinned"),
        (["--gateway-url", "https://gw:1", "--gateway-app-id", "any"], "refuses it"),
        (["--gateway-url", "https://gw:1", "--gateway-app-id", GW_APP], "nothing to verify"),
        (
            ["--gateway-url", "https://gw:1", "--gateway-app-id", GW_APP, "--trust-sim-root"],
            "--trust-sim-root needs --sim-dir",
        ),
    ],
)
def test_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    assert main(["guest-register", "--work-dir", str(tmp_path / "w"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_urls_and_pin_come_from_sys_config_and_appkeys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sys_config = tmp_path / ".sys-config.json"
    sys_config.write_text(json.dumps({"gateway_urls": ["https://gw.example:9012"]}))
    appkeys = tmp_path / ".appkeys.json"
    appkeys.write_text(json.dumps({"gateway_app_id": "any"}))
    argv = ["guest-register", "--work-dir", str(tmp_path / "w"), "--sys-config", str(sys_config)]
    assert main([*argv, "--appkeys", str(appkeys)]) == 2
    assert (
        "refuses it" in capsys.readouterr().err
    )  # the URL was found; the pin was read and refused


def _boot_dir(tmp_path: Path, *, enabled: bool) -> Path:
    boot = tmp_path / "boot"
    shared = boot / ".host-shared"
    shared.mkdir(parents=True)
    compose = {
        "manifest_version": 2,
        "name": "app",
        "runner": "bash",
        "bash_script": "",
        "gateway_enabled": enabled,
        "port_policy": {"ports": [{"port": 443, "pp": True}], "restrict_mode": True},
    }
    (shared / "app-compose.json").write_text(json.dumps(compose))
    sys_config = {"gateway_urls": ["https://gw1.example:9012", "https://gw2.example:9012/prpc"]}
    (shared / ".sys-config.json").write_text(json.dumps(sys_config))
    keys = dataclasses.replace(
        app_keys_from_seed(b"\x07" * 32, KeyProviderKind.NONE), gateway_app_id=GW_APP
    )
    (boot / ".appkeys.json").write_bytes(keys.to_json())
    return boot


def test_boot_dir_gives_urls_pin_policy_and_the_app_ca(tmp_path: Path) -> None:
    boot = _boot_dir(tmp_path, enabled=True)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--work-dir", str(tmp_path / "w"), "--boot-dir", str(boot), "--sim-dir",
         str(tmp_path / "sim"), "--trust-sim-root"]
    )  # fmt: skip
    reg = build(args)
    assert reg.urls == ("https://gw1.example:9012", "https://gw2.example:9012/prpc")
    assert reg.client.trust.app_ids == (bytes.fromhex(GW_APP),)
    assert reg.port_policy == PortPolicy(((443, True),), restrict_mode=True)
    assert isinstance(reg.issuer, TeeCertIssuer) and reg.issuer.issuer is not None
    assert reg.issuer.issuer[0].subject.rfc4514_string() == "CN=App Root Cert,O=Dstack"
    assert reg.settings.refresh_interval == 180 and reg.tunnel.iface == "dstack-wg0"


def test_boot_dir_with_gateway_disabled_does_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    boot = _boot_dir(tmp_path, enabled=False)
    argv = ["guest-register", "--work-dir", str(tmp_path / "w"), "--boot-dir", str(boot)]
    assert main(argv) == 0
    assert "gateway_enabled is false" in capsys.readouterr().err
