from __future__ import annotations

from gateway.tee.base import RuntimeEvent, replay


def test_system_preparing_digest_matches_upstream() -> None:
    # guest-formats.md 3.2: the empty-payload system-preparing event
    assert RuntimeEvent("system-preparing", b"").digest().hex() == (
        "f9974020ef507068183313d0ca808e0d1ca9b2d1ad0c61f5784e7157c362c065"
        "36f5ddacdad4451693f48fcc72fff624"
    )


def test_replay_of_nothing_is_zero() -> None:
    assert replay([]) == bytes(48)
