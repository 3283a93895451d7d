"""Pytest fixtures for the WireGuard lab (gateway.lab.harness); import them in a conftest.

``lab_env`` skips (saying why) when the machine cannot run the lab, and removes leftovers of
crashed runs with our prefix once per session. ``make_lab`` builds labs that are always torn
down, after a failing test too; their logs are attached to the failure report.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.lab.harness import Lab, cleanup_leftovers

PREFIX = "gwh"


def require_lab(*tools: str) -> None:
    """Skip (saying why) unless network namespaces, wireguard-go and ``tools`` can run here.

    CI runs as root with every tool installed (scripts/apt-packages.txt), so there these
    tests always run; the skip is for developers' machines without root.
    """
    if os.geteuid() != 0:
        pytest.skip("the WireGuard lab needs root (network namespaces, TUN devices)")
    for tool in ("ip", "wg", "wireguard-go", *tools):
        if shutil.which(tool) is None:
            pytest.skip(f"the WireGuard lab needs {tool} (apt-get install it)")
    if not Path("/dev/net/tun").exists():
        pytest.skip("the WireGuard lab needs /dev/net/tun for wireguard-go")


@pytest.fixture(scope="session")
def lab_env() -> None:
    require_lab("curl")
    cleanup_leftovers(PREFIX)


@pytest.fixture
def make_lab(
    lab_env: None, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Lab]]:
    labs: list[Lab] = []

    def build(cvms: int = 1, **kw: Any) -> Lab:
        lab = Lab(cvms=cvms, workdir=tmp_path / f"lab{len(labs)}", prefix=PREFIX, **kw)
        labs.append(lab)
        return lab.up()

    try:
        yield build
    finally:
        failed = getattr(request.node, "rep_call", None)
        for lab in labs:
            if failed is not None and failed.failed:
                for log in sorted(lab.workdir.glob("*.log")):
                    text = log.read_text(errors="replace")[-2000:]
                    request.node.add_report_section("call", log.name, text)
            lab.down()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Expose each phase's report as ``item.rep_<phase>`` so ``make_lab`` can attach logs.

    A hook: re-export it from the conftest of each directory that uses the lab.
    """
    outcome = yield
    setattr(item, f"rep_{call.when}", outcome.get_result())  # type: ignore[attr-defined]
