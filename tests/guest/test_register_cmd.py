"""``gateway guest-register``: configuration mistakes are usage errors that say what to fix."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.cli import main
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
