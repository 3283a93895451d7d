"""Event-log replay and dstack app identity.

RTMR3 is the only measurement a workload controls: dstack extends it at boot with a fixed
sequence of runtime events (``system-preparing, app-id, compose-hash, [init-script-hash...],
[gpu-policy-hash], instance-id, boot-mr-done, [os-image-hash], key-provider, storage-fs,
system-ready``) and apps may append more. A verifier never trusts a logged digest: it
recomputes each digest from the event's name and payload (V1 or V2 rules), replays
``mr = SHA384(mr || digest)`` from 48 zero bytes, and requires the result to equal the
quote's ``rt_mr3``. Only then are the events' payloads the app's identity.

RTMR0-2 are measured by firmware; their CCEL events carry digests only, so they are replayed
from the logged digests (useful to say *which* boot component differs, never needed for
trust: the quote's RTMR0-2 are what a policy compares).

When the replay does not match, :func:`explain_rtmr3_mismatch` says where the log diverges:
a prefix that matches (events logged after the quote was taken), an event whose payload no
longer matches its logged digest (edited), or nothing matching at all (missing/reordered).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.protocol.attestation import AttestedEvent, TdxEvent

__all__ = [
    "AppIdentity",
    "KeyProvider",
    "ReplayError",
    "check_boot_rtmrs",
    "decode_app_identity",
    "explain_rtmr3_mismatch",
    "mr_aggregated",
    "mr_system",
    "parse_key_provider",
    "replay_boot_rtmrs",
    "replay_rtmr3",
]

RTMR_SIZE = 48
BOOT_DONE_EVENT = "boot-mr-done"
SYSTEM_READY_EVENT = "system-ready"


class ReplayError(Exception):
    """The event log does not replay to the quoted register.

    ``register`` is ``rtmr0``..``rtmr3``; ``event_index``/``event_name`` point at the first
    event found to be bad, when one can be named.
    """

    def __init__(
        self,
        register: str,
        detail: str,
        *,
        event_index: int | None = None,
        event_name: str | None = None,
    ) -> None:
        super().__init__(f"{register}: {detail}")
        self.register = register
        self.detail = detail
        self.event_index = event_index
        self.event_name = event_name


def _extend(mr: bytes, digest: bytes) -> bytes:
    return hashlib.sha384(mr + digest).digest()


def replay_rtmr3(events: Sequence[AttestedEvent], *, until: str | None = None) -> bytes:
    """RTMR3 from the recomputed digests of ``events``; with ``until``, stop after the
    first event of that name (inclusive), as dstack's boot-time replay does."""
    mr = bytes(RTMR_SIZE)
    for event in events:
        mr = _extend(mr, event.digest())
        if until is not None and event.name == until:
            break
    return mr


def explain_rtmr3_mismatch(
    events: Sequence[AttestedEvent],
    expected: bytes,
    log: Sequence[TdxEvent] = (),
) -> ReplayError:
    """The most specific explanation of why ``events`` do not replay to ``expected``.

    ``log`` is the TDX event log; its imr-3 entries, when they carry digests, let us name
    an edited event. Returns (does not raise) the error, so callers decide.
    """
    mr = bytes(RTMR_SIZE)
    for k, event in enumerate(events):
        if mr == expected:
            rest = ", ".join(e.name for e in events[k:][:5])
            return ReplayError(
                "rtmr3",
                f"the quoted RTMR3 matches after the first {k} events; the {len(events) - k} "
                f"later ones ({rest}) are not in the quote (logged after it was taken, "
                "or forged)",
                event_index=k,
                event_name=event.name,
            )
        mr = _extend(mr, event.digest())
    logged = [e for e in log if e.imr == 3 and e.is_runtime and e.digest]
    if len(logged) == len(events):
        for i, (event, entry) in enumerate(zip(events, logged, strict=True)):
            if event.name != entry.event or event.payload != entry.event_payload:
                return ReplayError(
                    "rtmr3",
                    f"runtime event {i} ({event.name!r}) differs from the event log's entry "
                    f"({entry.event!r})",
                    event_index=i,
                    event_name=event.name,
                )
            if event.digest() != entry.digest:
                return ReplayError(
                    "rtmr3",
                    f"runtime event {i} ({event.name!r}): its name and payload do not hash to "
                    "the logged digest (the event was edited)",
                    event_index=i,
                    event_name=event.name,
                )
    return ReplayError(
        "rtmr3",
        f"no prefix of the {len(events)} runtime events replays to the quoted RTMR3 "
        f"{expected.hex()[:16]}...: an event is missing, edited or out of order",
    )


def replay_boot_rtmrs(log: Sequence[TdxEvent]) -> tuple[bytes, bytes, bytes]:
    """RTMR0-2 replayed from the logged digests of the CCEL (imr 0-2) events.

    Raises :class:`ReplayError` if a digest is not 48 bytes (a stripped or foreign log).
    """
    mrs = [bytes(RTMR_SIZE)] * 3
    for i, event in enumerate(log):
        if event.imr > 2:
            continue
        if len(event.digest) != RTMR_SIZE:
            raise ReplayError(
                f"rtmr{event.imr}",
                f"event {i} has a {len(event.digest)}-byte digest (stripped log?)",
                event_index=i,
                event_name=event.event,
            )
        mrs[event.imr] = _extend(mrs[event.imr], event.digest)
    return mrs[0], mrs[1], mrs[2]


def check_boot_rtmrs(log: Sequence[TdxEvent], quoted: Sequence[bytes]) -> None:
    """Raise :class:`ReplayError` naming the first RTMR0-2 the CCEL events do not match."""
    replayed = replay_boot_rtmrs(log)
    for i, (got, want) in enumerate(zip(replayed, quoted, strict=False)):
        if got != want:
            raise ReplayError(
                f"rtmr{i}",
                f"the event log replays to {got.hex()[:16]}..., the quote says "
                f"{want.hex()[:16]}...",
            )


@dataclass(frozen=True, slots=True)
class KeyProvider:
    """Where the CVM got its keys: ``none | local-sgx | kms | tpm`` and the provider's id
    (hex of the KMS root SPKI DER, or of the SGX MR)."""

    name: str
    id: str


@dataclass(frozen=True, slots=True)
class AppIdentity:
    """Who the CVM is, read from replayed runtime events (empty bytes where absent).

    ``boot_rtmr3`` is RTMR3 replayed up to and including ``boot-mr-done``: it identifies the
    boot configuration independently of events emitted later.
    """

    app_id: bytes
    compose_hash: bytes
    instance_id: bytes
    os_image_hash: bytes
    key_provider: KeyProvider | None
    key_provider_payload: bytes
    boot_rtmr3: bytes
    rtmr3: bytes

    def to_json(self) -> dict[str, object]:
        return {
            "app_id": self.app_id.hex(),
            "compose_hash": self.compose_hash.hex(),
            "instance_id": self.instance_id.hex(),
            "os_image_hash": self.os_image_hash.hex(),
            "key_provider": None
            if self.key_provider is None
            else {"name": self.key_provider.name, "id": self.key_provider.id},
            "boot_rtmr3": self.boot_rtmr3.hex(),
            "rtmr3": self.rtmr3.hex(),
        }


def parse_key_provider(payload: bytes) -> KeyProvider | None:
    """The ``key-provider`` event payload ``{"name": N, "id": I}``; ``None`` if unreadable."""
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    name, ident = obj.get("name"), obj.get("id", "")
    if not isinstance(name, str) or not isinstance(ident, str):
        return None
    return KeyProvider(name, ident)


def decode_app_identity(events: Sequence[AttestedEvent]) -> AppIdentity:
    """The identity carried by ``events`` (which the caller has replayed to the quote).

    As dstack's ``decode_app_info``: the first event of each name before ``system-ready``
    counts; application events after ``system-ready`` are ignored here.
    """
    found: dict[str, bytes] = {}
    for event in events:
        if event.name == SYSTEM_READY_EVENT:
            break
        found.setdefault(event.name, event.payload)
    kp_payload = found.get("key-provider", b"")
    boot_rtmr3, rtmr3 = _replay_boot_and_all(events)
    return AppIdentity(
        app_id=found.get("app-id", b""),
        compose_hash=found.get("compose-hash", b""),
        instance_id=found.get("instance-id", b""),
        os_image_hash=found.get("os-image-hash", b""),
        key_provider=parse_key_provider(kp_payload) if kp_payload else None,
        key_provider_payload=kp_payload,
        boot_rtmr3=boot_rtmr3,
        rtmr3=rtmr3,
    )


def _replay_boot_and_all(events: Sequence[AttestedEvent]) -> tuple[bytes, bytes]:
    """``(replay_rtmr3(events, until=BOOT_DONE_EVENT), replay_rtmr3(events))`` in one pass
    (each event's digest is a SHA-384 of its encoding: hashed once, not twice)."""
    mr = bytes(RTMR_SIZE)
    boot: bytes | None = None
    for event in events:
        mr = _extend(mr, event.digest())
        if boot is None and event.name == BOOT_DONE_EVENT:
            boot = mr
    return (mr if boot is None else boot), mr


def mr_system(mr_td: bytes, rtmrs: Sequence[bytes], key_provider_payload: bytes) -> bytes:
    """``SHA256(mrtd || rtmr0 || rtmr1 || rtmr2 || mr_key_provider)``, where
    ``mr_key_provider = SHA256(key-provider payload)`` or 32 zero bytes without one."""
    mr_kp = hashlib.sha256(key_provider_payload).digest() if key_provider_payload else bytes(32)
    return hashlib.sha256(mr_td + rtmrs[0] + rtmrs[1] + rtmrs[2] + mr_kp).digest()


def mr_aggregated(
    mr_td: bytes,
    rtmrs: Sequence[bytes],
    mr_config_id: bytes,
    mr_owner: bytes,
    mr_owner_config: bytes,
) -> bytes:
    """``SHA256(mrtd || rtmr0..3 [|| mr_config_id || mr_owner || mr_owner_config])``; the
    last three are included only if any of them is non-zero."""
    h = hashlib.sha256(mr_td + rtmrs[0] + rtmrs[1] + rtmrs[2] + rtmrs[3])
    tail = mr_config_id + mr_owner + mr_owner_config
    if any(tail):
        h.update(tail)
    return h.digest()
