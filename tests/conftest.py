"""Shared pytest configuration. Fixtures for one area live beside its tests."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture
def data_dir() -> Path:
    """``tests/data``: copies of ../shared/data test vectors (see tests/data/README.md)."""
    return DATA
