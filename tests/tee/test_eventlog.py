from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.tee.base import RuntimeEvent, TeeError
from gateway.tee.eventlog import format_event_line, read_event_log

events = st.builds(RuntimeEvent, st.text(max_size=40), st.binary(max_size=80))


@given(st.lists(events, max_size=8))
@settings(max_examples=100)
def test_read_of_format_is_identity(evs: list[RuntimeEvent]) -> None:
    data = b"".join(format_event_line(e) for e in evs)
    assert data.count(b"\n") == len(evs)  # one line each, whatever the name contains
    assert read_event_log(data) == tuple(evs)


@given(st.binary(max_size=200))
@settings(max_examples=200)
def test_garbage_only_raises_tee_error(data: bytes) -> None:
    try:
        read_event_log(data)
    except TeeError:
        pass


@pytest.mark.parametrize(
    "line",
    [
        b'{"event": 1, "payload": ""}',
        b'{"payload": ""}',
        b'{"event": "a", "payload": "not base64!"}',
        b"[]",
        b"\xff",
    ],
)
def test_bad_lines_are_tee_errors(line: bytes) -> None:
    with pytest.raises(TeeError, match="line 1"):
        read_event_log(line + b"\n")
