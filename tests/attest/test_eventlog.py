from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.attest.eventlog import (
    KeyProvider,
    ReplayError,
    check_boot_rtmrs,
    decode_app_identity,
    explain_rtmr3_mismatch,
    mr_aggregated,
    mr_system,
    replay_boot_rtmrs,
    replay_rtmr3,
)
from gateway.protocol.attestation import Attestation, AttestedEvent, decode_attestation
from gateway.tee.base import RuntimeEvent, replay

FIXTURE = Path(__file__).parents[1] / "data" / "dstack-simulator" / "attestation.bin"
RTMR3 = (
    "f28a1490ee924e9396c2ccf2d93ad536b83cbe159a1d45024d1fd7ac"
    "dcc102145efcfcd0cfa209416446c70226affadf"
)


# TD report offsets inside a v4 quote (tdx-quotes.md 2.3); read directly so that these
# tests check the replay against the raw quote bytes, independent of the quote parser.
def _reg(quote: bytes, offset: int) -> bytes:
    return quote[offset : offset + 48]


@pytest.fixture(scope="module")
def att() -> Attestation:
    return decode_attestation(FIXTURE.read_bytes())


def test_fixture_replays_to_its_quote_rtmr3(att: Attestation) -> None:
    assert replay_rtmr3(att.runtime_events).hex() == RTMR3
    assert _reg(att.quote, 520).hex() == RTMR3
    # same as the TEE layer's V1 replay
    assert replay([RuntimeEvent(e.name, e.payload) for e in att.runtime_events]).hex() == RTMR3


def test_fixture_identity(att: Attestation) -> None:
    ident = decode_app_identity(att.runtime_events)
    assert ident.app_id.hex() == "5bb4ff9a3837357f19dc176407a5709c62eb6c56"
    assert ident.compose_hash.hex() == (
        "c143116fef3940e7f776bfc0919c256232ae5338a6e948c96b711e0b2383483a"
    )
    assert ident.instance_id.hex() == "1691ed1b47506cad7d08834668691d88246f5b1f"
    assert ident.os_image_hash.hex() == (
        "e61be43dd1cc6a6f5edefd7c51b608983780839b0000ce60dd99737dcffe09b9"
    )
    assert ident.key_provider is not None and ident.key_provider.name == "kms"
    assert ident.key_provider.id.startswith("3059301306072a8648ce3d0201")
    assert ident.boot_rtmr3.hex().startswith("161d4d87")
    assert ident.boot_rtmr3.hex().endswith("43b7")
    assert ident.rtmr3.hex() == RTMR3


def test_fixture_boot_rtmrs_and_derived_measurements(att: Attestation) -> None:
    q = att.quote
    mrtd = _reg(q, 184)
    rtmrs = [_reg(q, 376 + 48 * i) for i in range(4)]
    assert replay_boot_rtmrs(att.event_log) == tuple(rtmrs[:3])
    check_boot_rtmrs(att.event_log, rtmrs[:3])
    ident = decode_app_identity(att.runtime_events)
    ms = mr_system(mrtd, rtmrs, ident.key_provider_payload).hex()
    assert ms.startswith("51ea38f8") and ms.endswith("1197")
    ma = mr_aggregated(mrtd, rtmrs, _reg(q, 232), _reg(q, 280), _reg(q, 328)).hex()
    assert ma.startswith("85334a62") and ma.endswith("07cb")
    # mr_config_id is MrConfig V1: 01 || compose_hash || zeros
    assert _reg(q, 232)[1:33] == ident.compose_hash


def test_boot_rtmr_mismatch_names_the_register(att: Attestation) -> None:
    rtmrs = list(replay_boot_rtmrs(att.event_log))
    rtmrs[1] = bytes(48)
    with pytest.raises(ReplayError) as err:
        check_boot_rtmrs(att.event_log, rtmrs)
    assert err.value.register == "rtmr1"


def test_late_events_are_named(att: Attestation) -> None:
    events = (*att.runtime_events, AttestedEvent("app-event", b"x"))
    err = explain_rtmr3_mismatch(events, bytes.fromhex(RTMR3), att.event_log)
    assert err.event_index == 9 and err.event_name == "app-event"
    assert "matches after the first 9 events" in err.detail


def test_edited_event_is_named_by_its_logged_digest(att: Attestation) -> None:
    events = list(att.runtime_events)
    events[2] = replace(events[2], payload=b"\x00" * 32)  # compose-hash
    err = explain_rtmr3_mismatch(events, bytes.fromhex(RTMR3), att.event_log)
    assert err.event_index == 2 and err.event_name == "compose-hash"
    assert "edited" in err.detail or "differs" in err.detail


def test_removed_event_without_digests_is_reported_generically(att: Attestation) -> None:
    events = [e for e in att.runtime_events if e.name != "instance-id"]
    err = explain_rtmr3_mismatch(events, bytes.fromhex(RTMR3), ())
    assert err.event_index is None and "missing, edited or out of order" in err.detail


def test_identity_ignores_events_after_system_ready() -> None:
    events = [
        AttestedEvent("app-id", b"\x01" * 20),
        AttestedEvent("system-ready", b""),
        AttestedEvent("app-id", b"\x02" * 20),
    ]
    ident = decode_app_identity(events)
    assert ident.app_id == b"\x01" * 20
    assert ident.key_provider is None
    assert ident.boot_rtmr3 == ident.rtmr3  # no boot-mr-done: replay runs to the end


def test_key_provider_json_variants() -> None:
    kp = decode_app_identity([AttestedEvent("key-provider", b'{"name":"none","id":""}')])
    assert kp.key_provider == KeyProvider("none", "")
    bad = decode_app_identity([AttestedEvent("key-provider", b"[1]")])
    assert bad.key_provider is None and bad.key_provider_payload == b"[1]"


_NAMES = st.sampled_from(["app-id", "boot-mr-done", "system-ready", "compose-hash", "x"])


@given(st.lists(st.tuples(_NAMES, st.binary(max_size=8)), max_size=8))
def test_identity_replays_in_one_pass_what_two_replays_give(
    events: list[tuple[str, bytes]],
) -> None:
    """decode_app_identity computes boot_rtmr3 and rtmr3 in one pass; it must equal the two
    separate replays (until the first boot-mr-done, inclusive; and to the end)."""
    evs = [AttestedEvent(name, payload) for name, payload in events]
    ident = decode_app_identity(evs)
    assert ident.boot_rtmr3 == replay_rtmr3(evs, until="boot-mr-done")
    assert ident.rtmr3 == replay_rtmr3(evs)
