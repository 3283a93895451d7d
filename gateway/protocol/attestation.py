"""dstack's ``VersionedAttestation``: a TDX quote, its event logs and the stack's claims.

Two wire forms, told apart by the first byte:

* **V0 (SCALE)**, first byte ``0x00``::

      0x00 || Attestation
      Attestation      = quote: AttestationQuote || runtime_events: Vec<RuntimeEvent>
                         || report_data: [u8; 64] || config: String
      AttestationQuote = enum { DstackTdx(0): TdxQuote, GcpTdx(1), NitroEnclave(2), ... }
      TdxQuote         = quote: Vec<u8> || event_log: Vec<TdxEvent>
      TdxEvent         = imr: u32 || event_type: u32 || digest: Vec<u8> || event: String
                         || event_payload: Vec<u8>
      RuntimeEvent     = event: String || payload: Vec<u8>        (V1 digests only)

* **V1 (msgpack, named)**, first byte a map header (``0x80-0x8f``, ``0xde``, ``0xdf``)::

      {version: 1, platform: {kind: "tdx", data: {quote, event_log}},
       stack: {kind: "dstack", data: {report_data, runtime_events, config}}}

  ``quote`` and ``report_data`` are arrays of u8 (serde's ``Vec<u8>``); event byte fields
  are bin. Runtime events may carry ``version: 2`` (JCS digests); V0 cannot express that,
  which is why dstack emits V1 only when some event is V2.

The **stripped** form (:func:`strip_attestation`) is what RA-TLS certificates carry: only
RTMR3 events remain in the TDX event log, with their digests emptied (the verifier recomputes
them from name and payload anyway); ``runtime_events`` stays complete.

Also here: the TdxEvent JSON objects of ``GetQuote``/``Info`` and of the legacy 1.2
certificate extension (``imr, event_type, digest, event, event_payload``, hex, optionally
``ELGZv1`` + gzip).

All decoders take a complete buffer and return a value or raise :class:`CodecError`.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass, replace
from typing import Any

from gateway.protocol import mpack
from gateway.protocol.errors import CodecError
from gateway.protocol.scale import (
    Reader,
    encode_bytes,
    encode_str,
    encode_u8,
    encode_u32,
    encode_vec,
)

__all__ = [
    "ACPI_DATA_EVENT_TYPE",
    "RUNTIME_EVENT_TYPE",
    "Attestation",
    "AttestedEvent",
    "TdxEvent",
    "decode_attestation",
    "decode_event_log_json",
    "decode_legacy_event_log",
    "encode_attestation_v0",
    "encode_attestation_v1",
    "encode_event_log_json",
    "runtime_event_digest",
    "strip_attestation",
]

RUNTIME_EVENT_TYPE = 0x08000001
ACPI_DATA_EVENT_TYPE = 10
REPORT_DATA_SIZE = 64
GZIP_MAGIC = b"ELGZv1"
_HEX_DIGITS = "0123456789abcdefABCDEF"

# Bounds on what one attestation may hold (real ones: a 5 KB quote, ~40 events).
MAX_INPUT = 4 * 1024 * 1024
MAX_QUOTE = 1024 * 1024
MAX_EVENTS = 4096
MAX_DIGEST = 64
MAX_NAME = 4096
MAX_PAYLOAD = 1024 * 1024
MAX_CONFIG = 1024 * 1024


def runtime_event_digest(name: str, payload: bytes, version: int = 1) -> bytes:
    """The 48-byte SHA384 digest that a dstack runtime event extends RTMR3 with.

    V1: ``SHA384(u32_le(0x08000001) || ":" || name || ":" || payload)``;
    V2: ``SHA384(JCS({"name": name, "payload": hex(payload), "type": 134217729}))``.
    """
    if version == 1:
        h = hashlib.sha384(RUNTIME_EVENT_TYPE.to_bytes(4, "little"))
        h.update(b":")
        h.update(name.encode("utf-8"))
        h.update(b":")
        h.update(payload)
        return h.digest()
    if version == 2:
        return hashlib.sha384(_jcs_v2(name, payload)).digest()
    raise ValueError(f"unknown runtime event version {version}")


def _jcs_v2(name: str, payload: bytes) -> bytes:
    # For this fixed shape (ASCII keys, a str, a hex str and a small int), Python's compact,
    # sorted, non-ASCII-preserving JSON is exactly RFC 8785's output.
    obj = {"name": name, "payload": payload.hex(), "type": RUNTIME_EVENT_TYPE}
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True, slots=True)
class AttestedEvent:
    """One runtime event as carried in an attestation: name, payload, digest version."""

    name: str
    payload: bytes
    version: int = 1

    def __post_init__(self) -> None:
        if self.version not in (1, 2):
            raise ValueError(f"runtime event version must be 1 or 2, not {self.version}")

    def digest(self) -> bytes:
        return runtime_event_digest(self.name, self.payload, self.version)


@dataclass(frozen=True, slots=True)
class TdxEvent:
    """One entry of the TDX event log: CCEL boot events (imr 0-2) and runtime events (imr 3)."""

    imr: int
    event_type: int
    digest: bytes
    event: str
    event_payload: bytes
    version: int = 1

    @property
    def is_runtime(self) -> bool:
        return self.event_type == RUNTIME_EVENT_TYPE

    def computed_digest(self) -> bytes:
        """The digest a verifier uses: recomputed for runtime events, as logged otherwise."""
        if self.is_runtime:
            return runtime_event_digest(self.event, self.event_payload, self.version)
        return self.digest

    def to_json(self) -> dict[str, Any]:
        """The JSON object of GetQuote/Info, keys in dstack's order, bytes as lowercase hex."""
        out: dict[str, Any] = {
            "imr": self.imr,
            "event_type": self.event_type,
            "digest": self.digest.hex(),
            "event": self.event,
            "event_payload": self.event_payload.hex(),
        }
        if self.version != 1:
            out["version"] = self.version
        return out

    @classmethod
    def from_json(cls, obj: Any, what: str = "event") -> TdxEvent:
        m = mpack.as_map(obj, what)
        return cls(
            imr=mpack.as_int(mpack.field(m, "imr", what), f"{what}.imr", hi=2**32 - 1),
            event_type=mpack.as_int(
                mpack.field(m, "event_type", what), f"{what}.event_type", hi=2**32 - 1
            ),
            digest=_hex(m.get("digest", ""), f"{what}.digest", MAX_DIGEST),
            event=mpack.as_str(mpack.field(m, "event", what), f"{what}.event"),
            event_payload=_hex(
                mpack.field(m, "event_payload", what), f"{what}.event_payload", MAX_PAYLOAD
            ),
            version=_version(m.get("version", 1), f"{what}.version"),
        )

    @classmethod
    def runtime(cls, event: AttestedEvent) -> TdxEvent:
        """The imr-3 log entry for a runtime event, with its true digest."""
        return cls(3, RUNTIME_EVENT_TYPE, event.digest(), event.name, event.payload, event.version)


@dataclass(frozen=True, slots=True)
class Attestation:
    """A decoded ``VersionedAttestation`` for the DstackTdx platform.

    ``wire_version`` records which form it came in (0 SCALE, 1 msgpack); it does not take
    part in verification.
    """

    quote: bytes
    event_log: tuple[TdxEvent, ...]
    runtime_events: tuple[AttestedEvent, ...]
    report_data: bytes
    config: str
    wire_version: int = 0

    def __post_init__(self) -> None:
        if len(self.report_data) != REPORT_DATA_SIZE:
            raise ValueError(f"report_data must be 64 bytes, not {len(self.report_data)}")


def strip_attestation(att: Attestation) -> Attestation:
    """The certificate form: only imr-3 events in the TDX log, digests emptied."""
    log = tuple(replace(e, digest=b"") for e in att.event_log if e.imr == 3)
    return replace(att, event_log=log)


# --- V0 SCALE ------------------------------------------------------------------------------

_PLATFORMS = ("DstackTdx", "GcpTdx", "NitroEnclave", "AmdSevSnp", "AwsNitroTpm")


def _read_tdx_event(r: Reader, what: str) -> TdxEvent:
    return TdxEvent(
        imr=r.read_u32(f"{what}.imr"),
        event_type=r.read_u32(f"{what}.event_type"),
        digest=r.read_bytes(f"{what}.digest", MAX_DIGEST),
        event=r.read_str(f"{what}.event", MAX_NAME),
        event_payload=r.read_bytes(f"{what}.event_payload", MAX_PAYLOAD),
    )


def _read_runtime_event(r: Reader, what: str) -> AttestedEvent:
    return AttestedEvent(
        name=r.read_str(f"{what}.event", MAX_NAME),
        payload=r.read_bytes(f"{what}.payload", MAX_PAYLOAD),
    )


def _decode_v0(data: bytes) -> Attestation:
    r = Reader(data)
    r.read_u8("version")
    at = r.offset
    platform = r.read_u8("quote.platform")
    if platform != 0:
        name = _PLATFORMS[platform] if platform < len(_PLATFORMS) else f"#{platform}"
        raise CodecError(
            f"quote.platform: variant {name} at offset {at} is not supported (only DstackTdx)"
        )
    quote = r.read_bytes("quote.quote", MAX_QUOTE)
    log = r.read_vec(_read_tdx_event, "quote.event_log", MAX_EVENTS, min_item_size=11)
    events = r.read_vec(_read_runtime_event, "runtime_events", MAX_EVENTS, min_item_size=2)
    report_data = r.read_fixed(REPORT_DATA_SIZE, "report_data")
    config = r.read_str("config", MAX_CONFIG)
    r.expect_end("attestation")
    return Attestation(quote, tuple(log), tuple(events), report_data, config, wire_version=0)


def _encode_tdx_event(e: TdxEvent) -> bytes:
    return (
        encode_u32(e.imr)
        + encode_u32(e.event_type)
        + encode_bytes(e.digest)
        + encode_str(e.event)
        + encode_bytes(e.event_payload)
    )


def _encode_runtime_event(e: AttestedEvent) -> bytes:
    return encode_str(e.name) + encode_bytes(e.payload)


def encode_attestation_v0(att: Attestation) -> bytes:
    """The V0 SCALE bytes. Raises ``ValueError`` if an event has V2 digests (V0 cannot say so)."""
    if any(e.version != 1 for e in att.runtime_events) or any(
        e.version != 1 for e in att.event_log
    ):
        raise ValueError("V0 attestations carry V1 runtime events only; use V1 (msgpack)")
    return (
        encode_u8(0)
        + encode_u8(0)
        + encode_bytes(att.quote)
        + encode_vec(att.event_log, _encode_tdx_event)
        + encode_vec(att.runtime_events, _encode_runtime_event)
        + att.report_data
        + encode_str(att.config)
    )


# --- V1 msgpack ----------------------------------------------------------------------------


def _version(value: Any, what: str) -> int:
    return mpack.as_int(value, what, lo=1, hi=2)


def _hex(value: Any, what: str, max_len: int) -> bytes:
    text = mpack.as_str(value, what)
    if text.startswith(("0x", "0X")):
        text = text[2:]
    if len(text) > 2 * max_len:
        raise CodecError(f"{what}: longer than {max_len} bytes")
    if len(text) % 2 or text.strip(_HEX_DIGITS):
        raise CodecError(f"{what}: not a hex string")
    return bytes.fromhex(text)


def _bounded_bytes(value: Any, what: str, max_len: int) -> bytes:
    out = mpack.as_bytes(value, what)
    if len(out) > max_len:
        raise CodecError(f"{what}: {len(out)} bytes exceeds the limit {max_len}")
    return out


def _bounded_str(value: Any, what: str, max_len: int) -> str:
    out = mpack.as_str(value, what)
    if len(out) > max_len:
        raise CodecError(f"{what}: {len(out)} characters exceeds the limit {max_len}")
    return out


def _events(value: Any, what: str) -> list[Any]:
    items = mpack.as_list(value, what)
    if len(items) > MAX_EVENTS:
        raise CodecError(f"{what}: {len(items)} events exceeds the limit {MAX_EVENTS}")
    return items


def _tdx_event_v1(obj: Any, what: str) -> TdxEvent:
    m = mpack.as_map(obj, what)
    return TdxEvent(
        imr=mpack.as_int(mpack.field(m, "imr", what), f"{what}.imr", hi=2**32 - 1),
        event_type=mpack.as_int(
            mpack.field(m, "event_type", what), f"{what}.event_type", hi=2**32 - 1
        ),
        digest=_bounded_bytes(m.get("digest", b""), f"{what}.digest", MAX_DIGEST),
        event=_bounded_str(mpack.field(m, "event", what), f"{what}.event", MAX_NAME),
        event_payload=_bounded_bytes(
            mpack.field(m, "event_payload", what), f"{what}.event_payload", MAX_PAYLOAD
        ),
        version=_version(m.get("version", 1), f"{what}.version"),
    )


def _runtime_event_v1(obj: Any, what: str) -> AttestedEvent:
    m = mpack.as_map(obj, what)
    return AttestedEvent(
        name=_bounded_str(mpack.field(m, "event", what), f"{what}.event", MAX_NAME),
        payload=_bounded_bytes(mpack.field(m, "payload", what), f"{what}.payload", MAX_PAYLOAD),
        version=_version(m.get("version", 1), f"{what}.version"),
    )


def _tagged(obj: Any, what: str, kind: str) -> dict[str, Any]:
    m = mpack.as_map(obj, what)
    got = mpack.as_str(mpack.field(m, "kind", what), f"{what}.kind")
    if got != kind:
        raise CodecError(f"{what}.kind: {got!r} is not supported (only {kind!r})")
    return mpack.as_map(mpack.field(m, "data", what), f"{what}.data")


def _decode_v1(data: bytes) -> Attestation:
    top = mpack.as_map(mpack.unpack(data, "attestation"), "attestation")
    version = mpack.as_int(mpack.field(top, "version", "attestation"), "attestation.version")
    if version != 1:
        raise CodecError(f"attestation.version: {version} is not supported (only 1)")
    plat = _tagged(mpack.field(top, "platform", "attestation"), "platform", "tdx")
    stack = _tagged(mpack.field(top, "stack", "attestation"), "stack", "dstack")
    quote = _bounded_bytes(mpack.field(plat, "quote", "platform.data"), "quote", MAX_QUOTE)
    log_raw = _events(mpack.field(plat, "event_log", "platform.data"), "event_log")
    log = tuple(_tdx_event_v1(e, f"event_log[{i}]") for i, e in enumerate(log_raw))
    rd = _bounded_bytes(mpack.field(stack, "report_data", "stack.data"), "report_data", 64)
    if len(rd) != REPORT_DATA_SIZE:
        raise CodecError(f"stack.report_data: must be 64 bytes, got {len(rd)}")
    ev_raw = _events(mpack.field(stack, "runtime_events", "stack.data"), "runtime_events")
    events = tuple(_runtime_event_v1(e, f"runtime_events[{i}]") for i, e in enumerate(ev_raw))
    config = _bounded_str(mpack.field(stack, "config", "stack.data"), "config", MAX_CONFIG)
    return Attestation(quote, log, events, rd, config, wire_version=1)


def encode_attestation_v1(att: Attestation) -> bytes:
    """The V1 msgpack bytes, shaped as ``rmp_serde::to_vec_named`` writes them."""

    def tdx_event(e: TdxEvent) -> dict[str, Any]:
        out: dict[str, Any] = {
            "imr": e.imr,
            "event_type": e.event_type,
            "digest": e.digest,
            "event": e.event,
            "event_payload": e.event_payload,
        }
        if e.version != 1:
            out["version"] = e.version
        return out

    doc = {
        "version": 1,
        "platform": {
            "kind": "tdx",
            "data": {"quote": list(att.quote), "event_log": [tdx_event(e) for e in att.event_log]},
        },
        "stack": {
            "kind": "dstack",
            "data": {
                "report_data": list(att.report_data),
                "runtime_events": [
                    {"event": e.name, "payload": e.payload, "version": e.version}
                    for e in att.runtime_events
                ],
                "config": att.config,
            },
        },
    }
    return mpack.pack(doc)


def decode_attestation(data: bytes) -> Attestation:
    """Decode a ``VersionedAttestation`` (V0 SCALE or V1 msgpack); raises CodecError."""
    if not data:
        raise CodecError("attestation: empty input")
    if len(data) > MAX_INPUT:
        raise CodecError(f"attestation: {len(data)} bytes exceeds the limit {MAX_INPUT}")
    first = data[0]
    if first == 0x00:
        return _decode_v0(data)
    if 0x80 <= first <= 0x8F or first in (0xDE, 0xDF):
        return _decode_v1(data)
    raise CodecError(f"attestation: unknown format (first byte {first:#04x})")


# --- TdxEvent JSON (GetQuote/Info, legacy certificate extension 1.2) ------------------------


def encode_event_log_json(events: tuple[TdxEvent, ...] | list[TdxEvent]) -> str:
    """A compact JSON array of TdxEvent objects (dstack's key order, hex bytes)."""
    return json.dumps([e.to_json() for e in events], separators=(",", ":"))


def decode_event_log_json(text: str | bytes) -> tuple[TdxEvent, ...]:
    """Parse a JSON array of TdxEvent objects; raises CodecError."""
    try:
        items = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise CodecError(f"event log: not JSON: {exc}") from None
    items = _events(items, "event log")
    return tuple(TdxEvent.from_json(e, f"event_log[{i}]") for i, e in enumerate(items))


def decode_legacy_event_log(data: bytes) -> tuple[TdxEvent, ...]:
    """The 1.2 extension's content: JSON, or ``ELGZv1`` + gzip(JSON) (bounded inflate)."""
    if data.startswith(GZIP_MAGIC):
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            data = inflater.decompress(data[len(GZIP_MAGIC) :], MAX_INPUT)
        except zlib.error as exc:
            raise CodecError(f"event log: bad gzip data: {exc}") from None
        if inflater.unconsumed_tail or not inflater.eof:
            raise CodecError(f"event log: gzip data truncated or inflates past {MAX_INPUT} bytes")
    return decode_event_log_json(data)


def encode_legacy_event_log(events: tuple[TdxEvent, ...], *, gzip: bool = False) -> bytes:
    """The 1.2 extension's content (optionally compressed)."""
    raw = encode_event_log_json(events).encode()
    if not gzip:
        return raw
    deflater = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
    return GZIP_MAGIC + deflater.compress(raw) + deflater.flush()
