"""Typed registry records: frozen, validated at birth, with a JSON form for storage.

``revision`` is the store's modification revision of the record (0: not stored yet). It is
what compare-and-set compares, as etcd's ``mod_revision`` is, so a cluster store can follow
the same contract.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Change",
    "ChangeKind",
    "HandshakeObservation",
    "InstanceRecord",
    "KvEntry",
    "check_id",
    "dump_json",
]

_ID = re.compile(r"[0-9A-Za-z_.:-]{1,128}")


def check_id(what: str, value: str) -> str:
    """Ids are 1-128 characters of ``[0-9A-Za-z_.:-]``; raises ``ValueError`` naming ``what``."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ValueError(f"{what} must be 1-128 characters of [0-9A-Za-z_.:-], got {value!r:.80}")
    return value


def dump_json(value: Any) -> str:
    """Canonical JSON (sorted keys, no spaces) so equal values store as equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """One registered CVM instance.

    ``registered_at`` is its first registration, ``last_seen`` its latest registration or
    refresh, ``last_handshake`` the latest WireGuard handshake any node observed (None: never).
    ``port_policy`` is what the app declared (None: not reported); ``evidence`` a summary of
    what was verified at admission (measurements, TCB status), never the raw quote.
    """

    instance_id: str
    app_id: str
    public_key: str
    ip: ipaddress.IPv4Address
    registered_at: float
    last_seen: float
    last_handshake: float | None = None
    port_policy: Mapping[str, Any] | None = None
    evidence: Mapping[str, Any] = field(default_factory=dict)
    revision: int = 0

    def __post_init__(self) -> None:
        check_id("instance_id", self.instance_id)
        check_id("app_id", self.app_id)

    @property
    def last_activity(self) -> float:
        """The latest sign of life: registration, refresh or handshake."""
        return max(self.registered_at, self.last_seen, self.last_handshake or 0.0)


@dataclass(frozen=True, slots=True)
class HandshakeObservation:
    """A node saw this instance's latest handshake at ``handshake_at`` (unix seconds).

    ``endpoint`` is where the instance's packets came from: after a restart of a userspace
    device the gateway re-applies it so that it can start the handshake itself, instead of
    waiting minutes for the CVM's session to expire.
    """

    instance_id: str
    node_id: str
    handshake_at: float
    observed_at: float
    rx_bytes: int = 0
    tx_bytes: int = 0
    endpoint: str | None = None


@dataclass(frozen=True, slots=True)
class KvEntry:
    """A value in one of the generic tables (policies, routes, ...)."""

    table: str
    key: str
    value: Any
    revision: int


class ChangeKind(enum.StrEnum):
    INSTANCE = "instance"
    KV = "kv"


@dataclass(frozen=True, slots=True)
class Change:
    """One entry of the change feed: what a watcher re-reads after ``revision``."""

    revision: int
    kind: ChangeKind
    table: str
    key: str
    deleted: bool
