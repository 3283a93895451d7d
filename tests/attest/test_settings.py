from __future__ import annotations

from pathlib import Path

import pytest

from gateway.attest.settings import AttestSettings
from gateway.attest.tcb import TcbStatus
from gateway.config import ConfigError, parse_config


def test_defaults_trust_intel_and_up_to_date_only() -> None:
    cfg = parse_config("")
    assert cfg.attest == AttestSettings()
    assert cfg.attest.uses_intel_root
    assert cfg.attest.tcb_policy().allowed == frozenset({TcbStatus.UP_TO_DATE})


def test_values_decode() -> None:
    cfg = parse_config(
        "[attest]\n"
        'root_ca = "/srv/sim/root.der"\n'
        'collateral_source = "file"\n'
        'collateral_file = "/srv/col.json"\n'
        'cache_dir = "/srv/cache"\n'
        'allowed_tcb_statuses = ["SWHardeningNeeded", "OutOfDate"]\n'
        "verification_time = 1751500000\n"
    )
    a = cfg.attest
    assert not a.uses_intel_root and a.root_ca == "/srv/sim/root.der"
    assert a.cache_dir == Path("/srv/cache")
    assert a.tcb_policy().allowed == {
        TcbStatus.UP_TO_DATE, TcbStatus.SW_HARDENING_NEEDED, TcbStatus.OUT_OF_DATE
    }  # fmt: skip
    assert a.verification_time == 1751500000


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('allowed_tcb_statuses = ["Revoked"]', "Revoked"),
        ('allowed_tcb_statuses = ["Fine"]', "unknown TCB status 'Fine'"),
        ('collateral_source = "file"', "collateral_file"),
        ('collateral_source = "ftp"', "is not one of"),
        ('pccs_url = "pccs.local"', "not an http"),
        ('root_ca = ""', "root_ca"),
        ("fetch_timeout = 0", "positive"),
        ("verification_time = -1", ">= 0"),
    ],
)
def test_bad_values_are_reported_under_attest(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        parse_config(f"[attest]\n{text}\n")
    assert err.value.path.startswith("attest")
