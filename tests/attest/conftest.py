"""Fixtures for quote verification: one simulated PKI per test session, a fixed clock."""

from __future__ import annotations

import time

import pytest

from gateway.tee.sim_pki import SimPki

# Every sim test verifies at this one instant; the PKI's certificates start a day earlier.
SIM_NOW = int(time.time())


@pytest.fixture(scope="session")
def sim_now() -> int:
    return SIM_NOW


@pytest.fixture(scope="session")
def sim_pki() -> SimPki:
    return SimPki.create(not_before=SIM_NOW - 86400)
