"""``gateway.protocol`` does no I/O: no module imports one, and ruff is configured to refuse it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import gateway.protocol

PACKAGE = Path(gateway.protocol.__file__).parent
BANNED = {"asyncio", "socket", "ssl", "os", "time"}
RUFF = Path(sys.executable).parent / "ruff"


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("module", sorted(p.name for p in PACKAGE.glob("*.py")))
def test_protocol_module_imports_nothing_that_does_io(module: str) -> None:
    roots = {name.split(".")[0] for name in imported_modules(PACKAGE / module)}
    assert not roots & BANNED


@pytest.mark.skipif(not RUFF.exists(), reason="ruff is a dev dependency; run uv sync")
def test_ruff_config_bans_io_imports_in_the_package(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("".join(f"import {name}\n" for name in sorted(BANNED)))
    result = subprocess.run(
        [str(RUFF), "check", "--no-cache", "--config", str(PACKAGE / "ruff.toml")]
        + ["--select", "TID251", "--output-format", "concise", str(sample)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    banned = {name for name in BANNED if f"`{name}` is banned" in result.stdout}
    assert banned == BANNED, result.stdout + result.stderr
