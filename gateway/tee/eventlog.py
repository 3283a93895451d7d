"""dstack's runtime event log file: one JSON object per line, shared by both TEE backends.

Line format (dstack HEAD / v0.5.8+), payload in standard base64::

    {"event":"app-id","payload":"W7T/mjg3NX8Z3BdkB6VwnGLrbFY="}

The file is appended under an exclusive ``flock`` together with the RTMR3 extension, so its
order is the extend order and replaying it reproduces RTMR3.
"""

from __future__ import annotations

import base64
import binascii
import json

from gateway.tee.base import RuntimeEvent, TeeError

__all__ = ["format_event_line", "read_event_log"]


def format_event_line(event: RuntimeEvent) -> bytes:
    """One log line in dstack's runtime-event format (HEAD / v0.5.8+), newline included."""
    line = {"event": event.name, "payload": base64.b64encode(event.payload).decode("ascii")}
    return json.dumps(line, separators=(",", ":")).encode() + b"\n"


def read_event_log(data: bytes) -> tuple[RuntimeEvent, ...]:
    """Parse a runtime event log (JSON lines). Raises :class:`TeeError` naming the line."""
    events: list[RuntimeEvent] = []
    for number, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
            name = obj["event"]
            payload = base64.b64decode(obj.get("payload", ""), validate=True)
            if not isinstance(name, str):
                raise TypeError("event name is not a string")
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise TeeError(f"runtime event log line {number} is malformed: {exc}") from None
        events.append(RuntimeEvent(name, payload))
    return tuple(events)
