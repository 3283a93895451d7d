"""The registry's rules, on top of a :class:`~gateway.registry.store.Store` and a device.

Rules (upstream ``do_register_cvm`` / ``recycle``, made explicit):

* A WireGuard public key must be standard base64 of 32 bytes and must not be held by another
  instance. The same instance may rotate its key: the old peer is dropped and the new one
  added in one device request.
* An instance keeps its app: re-registering an instance id under another app id is refused.
* Re-registration keeps the address while it is still assignable under the current plan;
  the first registration allocates one (:func:`gateway.tunnel.ipalloc.choose`).
* A request without a port policy keeps the stored one only while the compose hash is
  unchanged: an upgraded app's old policy is dropped (upstream's ``port_policy_hash``).
* Store first, device second: a device failure leaves the instance stored (the CVM retries
  and :meth:`Registry.restore` / the periodic reconcile re-applies peers); a store failure
  leaves the device untouched.
* Recycling removes instances with no sign of life (registration, refresh or handshake) for
  ``recycle_timeout`` seconds: the record, its address and its peer.

Methods are synchronous (SQLite and the UAPI socket answer in microseconds to milliseconds);
the aiohttp handlers call them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.registry.records import HandshakeObservation, InstanceRecord, check_id
from gateway.registry.store import Conflict, Store
from gateway.tunnel.errors import TunnelError
from gateway.tunnel.ipalloc import AddressPlan, PoolExhausted, choose
from gateway.tunnel.keys import WgKeyError, decode_key
from gateway.tunnel.uapi import DeviceState, PeerConfig, PeerRemoval
from gateway.tunnel.wg import PeerSync

logger = logging.getLogger(__name__)

__all__ = [
    "AppMismatch",
    "InvalidRegistration",
    "KeyInUse",
    "PeerDevice",
    "PoolExhausted",
    "Registration",
    "Registry",
    "RegistryError",
]


class RegistryError(Exception):
    """A registration was refused; ``code`` is stable for API clients, the text says why."""

    code = "registry_error"


class InvalidRegistration(RegistryError):
    code = "invalid_registration"


class KeyInUse(RegistryError):
    code = "key_in_use"


class AppMismatch(RegistryError):
    code = "app_mismatch"


class PeerDevice(Protocol):
    """What the registry needs from the WireGuard device (:class:`WgDevice` provides it)."""

    def apply(self, changes: Sequence[PeerConfig | PeerRemoval]) -> None: ...

    def sync_peers(
        self, desired: Mapping[str, PeerConfig], *, current: DeviceState | None = None
    ) -> PeerSync: ...

    def state(self) -> DeviceState: ...


@dataclass(frozen=True, slots=True)
class Registration:
    """A verified CVM asking for a tunnel: ids come from its attested identity."""

    instance_id: str
    app_id: str
    public_key: str
    port_policy: Mapping[str, Any] | None = None
    evidence: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            check_id("instance_id", self.instance_id)
            check_id("app_id", self.app_id)
            decode_key(self.public_key)
        except WgKeyError as exc:
            raise InvalidRegistration(f"client_public_key: {exc}") from None
        except ValueError as exc:
            raise InvalidRegistration(str(exc)) from None


class _TakenByOthers:
    """``ip in taken`` asks the store, so allocation never loads the whole table."""

    __slots__ = ("instance_id", "store")

    def __init__(self, store: Store, instance_id: str) -> None:
        self.store = store
        self.instance_id = instance_id

    def __contains__(self, ip: object) -> bool:
        if not isinstance(ip, ipaddress.IPv4Address):
            return False
        holder = self.store.ip_holder(ip)
        return holder is not None and holder != self.instance_id


class Registry:
    """Registers, refreshes, observes and recycles instances."""

    def __init__(
        self,
        store: Store,
        plan: AddressPlan,
        *,
        device: PeerDevice | None = None,
        clock: Callable[[], float],
        rng: random.Random | None = None,
        node_id: str = "local",
        recycle_timeout: float = 36000.0,
        persistent_keepalive: int | None = 25,
        attempts: int = 5,
    ) -> None:
        self.store = store
        self.plan = plan
        self.device = device
        self.clock = clock
        self.rng = rng
        self.node_id = node_id
        self.recycle_timeout = recycle_timeout
        self.persistent_keepalive = persistent_keepalive
        self.attempts = attempts
        self._lock = threading.Lock()
        self._seen: dict[str, float] = {}  # public key -> handshake already recorded
        # lowest order: where the next scan for a free address starts (the last address
        # this registry handed out, lowered when it frees one). Only a hint: the scan wraps
        # around, so an address freed elsewhere (another node) is still found, later.
        self._scan_from: ipaddress.IPv4Address | None = None

    def peer_for(
        self, record: InstanceRecord, endpoint: str | None = None, *, keepalive: bool = True
    ) -> PeerConfig:
        return PeerConfig(
            public_key=record.public_key,
            allowed_ips=(ipaddress.IPv4Network(f"{record.ip}/32"),),
            endpoint=endpoint,
            persistent_keepalive=self.persistent_keepalive if keepalive else None,
        )

    def register(self, reg: Registration) -> InstanceRecord:
        """Store the instance (allocating or keeping its address) and add its peer.

        Raises :class:`KeyInUse`, :class:`AppMismatch`, :class:`PoolExhausted`, or
        :class:`~gateway.tunnel.errors.TunnelError` if the device refused the peer (the
        record is stored; the CVM retries).
        """
        with self._lock:
            saved, previous = self._store_registration(reg)
            changes: list[PeerConfig | PeerRemoval] = []
            if previous is not None and previous.public_key != saved.public_key:
                changes.append(PeerRemoval(previous.public_key))
            if (
                previous is None
                or previous.public_key != saved.public_key
                or previous.ip != saved.ip
            ):
                changes.append(self.peer_for(saved))
            if changes and self.device is not None:
                self.device.apply(changes)
        # A plain refresh (same key, same address: every CVM every few minutes) changes
        # nothing worth a line at info; new instances, key rotations and moves do.
        logger.log(
            logging.INFO if changes else logging.DEBUG,
            "registered instance %s of app %s at %s%s",
            saved.instance_id,
            saved.app_id,
            saved.ip,
            " (new)" if previous is None else "" if changes else " (refresh)",
        )
        return saved

    def _store_registration(
        self, reg: Registration
    ) -> tuple[InstanceRecord, InstanceRecord | None]:
        last: Conflict | None = None
        for _ in range(self.attempts):
            holder = self.store.find_instance_by_key(reg.public_key)
            if holder is not None and holder.instance_id != reg.instance_id:
                raise KeyInUse("this WireGuard public key is registered to another instance")
            existing = self.store.get_instance(reg.instance_id)
            if existing is not None and existing.app_id != reg.app_id:
                raise AppMismatch(
                    f"instance {reg.instance_id} is registered for app {existing.app_id}, "
                    f"not {reg.app_id}"
                )
            ip = choose(
                self.plan,
                _TakenByOthers(self.store, reg.instance_id),
                current=existing.ip if existing else None,
                rng=self.rng,
                scan_from=self._scan_from,
            )
            now = self.clock()
            port_policy = reg.port_policy
            if (
                port_policy is None
                and existing is not None
                and existing.evidence.get("compose_hash") == reg.evidence.get("compose_hash")
            ):
                port_policy = existing.port_policy  # same app version: keep what it declared
            record = InstanceRecord(
                instance_id=reg.instance_id,
                app_id=reg.app_id,
                public_key=reg.public_key,
                ip=ip,
                registered_at=existing.registered_at if existing else now,
                last_seen=now,
                last_handshake=existing.last_handshake if existing else None,
                port_policy=port_policy,
                evidence=reg.evidence,
            )
            try:
                saved = self.store.put_instance(
                    record, expect_revision=existing.revision if existing else 0
                )
            except Conflict as exc:  # another writer (node, thread) raced us: re-read
                last = exc
                continue
            if existing is None or existing.ip != saved.ip:
                self._scan_from = saved.ip
                if existing is not None:
                    self._freed(existing.ip)
            return saved, existing
        raise RegistryError(f"registration kept conflicting, try again: {last}")

    def _freed(self, ip: ipaddress.IPv4Address) -> None:
        """Let the next lowest-first scan see an address this registry just freed."""
        if self._scan_from is not None and ip < self._scan_from:
            self._scan_from = ip

    def unregister(self, instance_id: str) -> bool:
        """Remove an instance now (admin action): record, address and peer."""
        with self._lock:
            record = self.store.get_instance(instance_id)
            if record is None:
                return False
            self.store.delete_instance(instance_id)
            self._freed(record.ip)
            if self.device is not None:
                self.device.apply([PeerRemoval(record.public_key)])
        return True

    def recycle(self) -> list[InstanceRecord]:
        """Remove every instance silent for longer than ``recycle_timeout``; returns them."""
        cutoff = self.clock() - self.recycle_timeout
        removed: list[InstanceRecord] = []
        with self._lock:
            for record in self.store.list_instances():
                if record.last_activity >= cutoff:
                    continue
                try:
                    self.store.delete_instance(record.instance_id, expect_revision=record.revision)
                except Conflict:
                    continue  # refreshed meanwhile: alive
                self._freed(record.ip)
                removed.append(record)
            if removed and self.device is not None:
                self.device.apply([PeerRemoval(r.public_key) for r in removed])
        for r in removed:
            logger.info(
                "recycled instance %s (%s), silent since %.0f", r.instance_id, r.ip, r.last_activity
            )
        return removed

    def observe(self, state: DeviceState) -> int:
        """Record the device's latest handshakes; returns how many were newer than stored.

        Only peers whose handshake changed since the last call reach the store (peers
        re-handshake every two minutes, the poll runs every few seconds), and their
        instances are found with one key-index query rather than one lookup per peer.
        """
        now = self.clock()
        changed = [
            p
            for p in state.peers
            if p.last_handshake is not None and self._seen.get(p.public_key) != p.last_handshake
        ]
        if not changed:
            return 0
        owners = self.store.instance_keys()
        observations = []
        for peer in changed:
            assert peer.last_handshake is not None
            instance_id = owners.get(peer.public_key)
            if instance_id is None:
                continue
            observations.append(
                HandshakeObservation(
                    instance_id=instance_id,
                    node_id=self.node_id,
                    handshake_at=peer.last_handshake,
                    observed_at=now,
                    rx_bytes=peer.rx_bytes,
                    tx_bytes=peer.tx_bytes,
                    endpoint=peer.endpoint,
                )
            )
        newer = self.store.record_handshakes(observations) if observations else 0
        if len(self._seen) > 4 * len(state.peers) + 1024:
            self._seen.clear()  # keys of removed peers: bounded, re-learned on the next poll
        for peer in changed:
            if peer.last_handshake is not None:
                self._seen[peer.public_key] = peer.last_handshake
        return newer

    def desired_peers(self, *, keepalive: bool = True) -> dict[str, PeerConfig]:
        """One peer per stored instance (routing only: no endpoint), most recently alive first.

        The order is the order :meth:`restore` applies them in, so after a restart the peers
        that carried traffic just before it are back in the device first.
        """
        return {
            r.public_key: self.peer_for(r, keepalive=keepalive)
            for r in sorted(self.store.list_instances(), key=_recency)
        }

    def restore(
        self, *, hint_max_age: float = 600.0, batch: int = 50, greet: bool = True
    ) -> PeerSync:
        """Make the device's peers match the store (start-up, and the periodic reconcile).

        When this returns, every stored instance is a peer of the device with its address
        (one pass, most recently alive first: ~1 s for 10 000 peers into a fresh
        wireguard-go; the lock is held only to apply the difference, see
        :meth:`_sync_device`), and peers no longer stored are gone. That is "restored": routing
        is back and nothing is mistaken for gone.

        Then, unless ``greet`` is False (:func:`~gateway.registry.runtime.open_tunnel` runs
        :meth:`greet` in the background instead, after serving starts), each added peer that
        this node saw shake hands within ``hint_max_age`` seconds gets the endpoint it was seen
        at and its keepalive, which makes the device greet it at once.

        Why the hint: upstream never sets endpoints (CVMs dial in), which is enough while the
        kernel device outlives the gateway process. A restarted userspace device has no
        sessions, and a CVM only re-handshakes when it sends data or its session ages out
        (minutes). Peers without a hint get no keepalive here: with no endpoint, wireguard-go
        would build a handshake initiation per peer at once and again every 5 s (10 000
        peers: ~1.4 s of its CPU at once, ~25 % of a core afterwards), all undeliverable.
        They get it once they have shaken hands (:meth:`settle_keepalives`, from the
        handshake poll).
        """
        if self.device is None:
            return PeerSync((), (), ())
        result = self._sync_device(self.device)
        hinted = len(self._greeting_plan(result.added, hint_max_age)) if result.added else 0
        logger.info(
            "peers restored: %d added (%d with endpoint hints), %d updated, %d removed",
            len(result.added),
            hinted,
            len(result.updated),
            len(result.removed),
        )
        if greet and hinted:
            self.greet(result.added, hint_max_age=hint_max_age, batch=batch)
        return result

    def _sync_device(self, device: PeerDevice) -> PeerSync:
        """``sync_peers`` to the store, holding the lock only to apply the difference.

        Reading the store and the device takes ~1 s at 10 000 peers; the periodic reconcile
        must not block registrations that long. Every writer of instances bumps the store's
        revision (and changes the device under the lock), so if the revision is unchanged
        when the lock is taken, the store read before is still the truth and any device
        change since came from a write the read already saw: re-adding or re-removing such
        a peer is a no-op. If the revision moved, both are read again under the lock.
        """
        revision = self.store.revision()
        desired = self.desired_peers(keepalive=False)
        current = device.state()
        with self._lock:
            if self.store.revision() != revision:
                desired, current = self.desired_peers(keepalive=False), device.state()
            return device.sync_peers(desired, current=current)

    def _greeting_plan(
        self, keys: Sequence[str], hint_max_age: float
    ) -> list[tuple[str, str, str]]:
        """``(public key, instance id, endpoint)`` of the ``keys`` with a fresh hint, in order."""
        hints = self.store.last_endpoints(self.node_id, since=self.clock() - hint_max_age)
        if not hints:
            return []
        owners = self.store.instance_keys()
        plan = []
        for key in keys:
            instance_id = owners.get(key)
            if instance_id is not None and instance_id in hints:
                plan.append((key, instance_id, hints[instance_id]))
        return plan

    def greet(
        self,
        keys: Sequence[str],
        *,
        hint_max_age: float = 600.0,
        batch: int = 50,
        stop: threading.Event | None = None,
    ) -> int:
        """Give the restored peers ``keys`` their endpoint hint and keepalive; returns how many.

        In ``keys`` order (restore's: most recently alive first), ``batch`` peers per device
        request, each batch under the lock and checked against the store, so a registration
        that rotated a key or an unregister meanwhile wins. Small batches because greeting a
        vanished neighbour *on the same link* blocks wireguard-go's UDP send until ARP gives
        up (~3 s per stuck batch); ``stop`` ends the pass between batches (shutdown).
        """
        if self.device is None:
            return 0
        plan = self._greeting_plan(keys, hint_max_age)
        greeted = 0
        for start in range(0, len(plan), batch):
            if stop is not None and stop.is_set():
                break
            with self._lock:
                changes = []
                for key, instance_id, endpoint in plan[start : start + batch]:
                    record = self.store.get_instance(instance_id)
                    if record is None or record.public_key != key:
                        continue  # removed or rotated meanwhile: leave it to that change
                    changes.append(self.peer_for(record, endpoint))
                try:
                    self.device.apply(changes)
                except TunnelError as exc:
                    logger.warning("restoring endpoint hints stopped: %s", exc)
                    break
                greeted += len(changes)
        if plan:
            logger.info(
                "greeted %d of %d restored peers at their last endpoint", greeted, len(plan)
            )
        return greeted

    def settle_keepalives(self, state: DeviceState) -> int:
        """Give the keepalive to stored peers that lack it and have shaken hands since.

        :meth:`restore` leaves it off peers without an endpoint hint (it would only make the
        device send undeliverable handshakes). Once such a CVM has dialled in, the device
        knows its endpoint and the keepalive works; the handshake poll calls this with the
        state it just read. Returns how many peers were changed.
        """
        if self.device is None or not self.persistent_keepalive:
            return 0
        pending = [
            p.public_key
            for p in state.peers
            if p.persistent_keepalive == 0 and p.last_handshake is not None and p.endpoint
        ]
        if not pending:
            return 0
        with self._lock:
            changes = []
            for key in pending:
                record = self.store.find_instance_by_key(key)
                if record is not None:
                    changes.append(self.peer_for(record))
            if changes:
                self.device.apply(changes)
        return len(changes)


def _recency(record: InstanceRecord) -> tuple[float, str]:
    """Sort key: most recent sign of life first, then by id (a stable order)."""
    return (-record.last_activity, record.instance_id)
