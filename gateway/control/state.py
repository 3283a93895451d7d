"""Operator-managed state: what the admin API changes at runtime, persisted in the registry.

Everything lives in the registry :class:`~gateway.registry.store.Store`'s generic tables
(one table per kind, below), so a restart keeps it and a cluster store can replicate it:

=====================  ===========  ===================================================
table                  key          value
=====================  ===========  ===================================================
``op_domains``         base domain  ``{dns_credential, port}``
``op_dns``             cred id      the credential, **secret included** (never returned)
``op_routes``          domain       ``{app_id, port}``: a static custom-domain route
``op_port_policy``     instance id  ``{ports: [{port, pp}], restrict_mode}`` override
``op_drain``           instance id  ``{since}``: no new connections to this instance
``op_admission``       ``policy``   the admission policy document
=====================  ===========  ===================================================

Records are frozen and validated at birth (``from_json`` raises :class:`FieldError` naming
the field), so nothing downstream re-checks. Each carries the store's ``revision``, which
the API exposes as an ETag and takes back in ``If-Match`` (a stale one raises
:class:`RevisionMismatch`). Base domains and DNS credentials from the configuration file are
merged in read-only (``source = "config"``).

Every successful write calls the subscribers of its :class:`Topic` synchronously, on the
caller's thread (the admin handlers run on the event loop): the admission-policy swap
reaches the registration verifier through :meth:`OperatorState.admission_policy`, and the
certificate manager rebuilds its certbot when domains or credentials change. A failing
subscriber is logged, never undoes the write. Store calls are short (SQLite in WAL mode)
and made on the loop: admin writes are rare and take well under a millisecond.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from gateway.attest.policy_settings import AdmissionPolicy, PolicyError
from gateway.certs.settings import DnsCredential
from gateway.control.models import (
    POLICY_KEY,
    T_ADMISSION,
    T_DNS,
    T_DOMAINS,
    T_DRAIN,
    T_PORT_POLICY,
    T_ROUTES,
    BaseDomain,
    CustomRoute,
    Drain,
    Exists,
    FieldError,
    InUse,
    NotFound,
    PortPolicyOverride,
    ReadOnly,
    RevisionMismatch,
    Source,
    StoredCredential,
    Topic,
    config_credential_json,
    parse_domain,
)
from gateway.control.registration import PortPolicy
from gateway.registry.records import KvEntry
from gateway.registry.store import Conflict, Store

logger = logging.getLogger(__name__)

__all__ = ["OperatorState", "drained_instances", "port_policy_overrides"]


# --- the state -----------------------------------------------------------------------------


class OperatorState:
    """Typed access to the operator tables, merged with the configuration's read-only part."""

    def __init__(
        self,
        store: Store,
        *,
        config_domains: Mapping[str, BaseDomain] | None = None,
        config_credentials: Mapping[str, DnsCredential] | None = None,
        config_policy: AdmissionPolicy | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.config_domains = dict(config_domains or {})
        self.config_credentials = dict(config_credentials or {})
        self.config_policy = config_policy or AdmissionPolicy()
        self.clock = clock
        self._subscribers: dict[Topic, list[Callable[[], Any]]] = {t: [] for t in Topic}
        self._policy, self._policy_revision = self._load_policy()

    # --- notifications ---------------------------------------------------------------------

    def subscribe(self, topic: Topic, callback: Callable[[], Any]) -> None:
        """Call ``callback()`` after every successful change of ``topic``."""
        self._subscribers[topic].append(callback)

    def _notify(self, topic: Topic) -> None:
        for callback in self._subscribers[topic]:
            try:
                callback()
            except Exception:  # the write is done; a subscriber bug must not undo it
                logger.exception("subscriber of %s changes failed", topic.value)

    def _put(
        self,
        table: str,
        key: str,
        value: Any,
        expect: int | None,
        topic: Topic | None,
        create: bool = False,
    ) -> KvEntry:
        try:
            entry = self.store.kv_put(table, key, value, expect_revision=expect)
        except Conflict as exc:
            if create:
                raise Exists(f"{key} already exists") from None
            raise RevisionMismatch(str(exc)) from None
        # an audit line per change: names and revisions only, never values (secrets)
        logger.info("operator state: %s/%s set (revision %d)", table, key, entry.revision)
        if topic is not None:
            self._notify(topic)
        return entry

    def _delete(self, table: str, key: str, expect: int | None, topic: Topic) -> None:
        try:
            found = self.store.kv_delete(table, key, expect_revision=expect)
        except Conflict as exc:
            raise RevisionMismatch(str(exc)) from None
        if not found:
            raise NotFound(f"{key} does not exist")
        logger.info("operator state: %s/%s deleted", table, key)
        self._notify(topic)

    # --- base domains ----------------------------------------------------------------------

    def domains(self) -> list[BaseDomain]:
        stored = [
            BaseDomain(e.key, e.value["dns_credential"], e.value["port"], "admin", e.revision)
            for e in self.store.kv_list(T_DOMAINS)
        ]
        return sorted([*self.config_domains.values(), *stored], key=lambda d: d.domain)

    def domain(self, name: str) -> BaseDomain:
        name = parse_domain(name)
        if name in self.config_domains:
            return self.config_domains[name]
        entry = self.store.kv_get(T_DOMAINS, name)
        if entry is None:
            raise NotFound(f"base domain {name} is not configured")
        return BaseDomain(
            name, entry.value["dns_credential"], entry.value["port"], "admin", entry.revision
        )

    def put_domain(self, d: BaseDomain, *, create: bool, expect: int | None = None) -> BaseDomain:
        if d.domain in self.config_domains:
            raise ReadOnly(f"{d.domain} is defined in the configuration file ([[acme.domains]])")
        if not self.has_credential(d.dns_credential):
            raise FieldError(
                "dns_credential", f"no DNS credential {d.dns_credential!r}; add it first"
            )
        if create:
            expect = 0
            covered = [r.domain for r in self.routes() if _under(r.domain, d.domain)]
            if covered:
                raise InUse(
                    f"custom-domain route(s) {', '.join(covered)} fall under {d.domain}; "
                    "remove them first"
                )
        elif self.store.kv_get(T_DOMAINS, d.domain) is None:
            raise NotFound(f"base domain {d.domain} is not configured")
        entry = self._put(T_DOMAINS, d.domain, d.value(), expect, Topic.DOMAINS, create)
        return BaseDomain(d.domain, d.dns_credential, d.port, "admin", entry.revision)

    def delete_domain(self, name: str, expect: int | None = None) -> None:
        name = parse_domain(name)
        if name in self.config_domains:
            raise ReadOnly(f"{name} is defined in the configuration file ([[acme.domains]])")
        self._delete(T_DOMAINS, name, expect, Topic.DOMAINS)

    # --- DNS credentials -------------------------------------------------------------------

    def has_credential(self, cred_id: str) -> bool:
        return cred_id in self.config_credentials or self.store.kv_get(T_DNS, cred_id) is not None

    def credentials(self) -> list[StoredCredential]:
        return [StoredCredential.from_stored(e) for e in self.store.kv_list(T_DNS)]

    def credential(self, cred_id: str) -> StoredCredential:
        entry = self.store.kv_get(T_DNS, cred_id)
        if entry is None:
            raise NotFound(f"no DNS credential {cred_id!r} (configured in the API)")
        return StoredCredential.from_stored(entry)

    def credentials_json(self) -> list[dict[str, Any]]:
        out = [config_credential_json(k, v) for k, v in self.config_credentials.items()]
        out += [c.to_json() for c in self.credentials()]
        return sorted(out, key=lambda c: str(c["id"]))

    def credential_json(self, cred_id: str) -> dict[str, Any]:
        if cred_id in self.config_credentials:
            return config_credential_json(cred_id, self.config_credentials[cred_id])
        return self.credential(cred_id).to_json()

    def put_credential(
        self, cred: StoredCredential, *, create: bool, expect: int | None = None
    ) -> StoredCredential:
        if cred.id in self.config_credentials:
            raise ReadOnly(f"{cred.id} is defined in the configuration file ([dns.credentials])")
        if create:
            expect = 0
        entry = self._put(T_DNS, cred.id, cred.stored(), expect, Topic.DNS, create)
        return StoredCredential.from_stored(entry)

    def delete_credential(self, cred_id: str, expect: int | None = None) -> None:
        if cred_id in self.config_credentials:
            raise ReadOnly(f"{cred_id} is defined in the configuration file ([dns.credentials])")
        users = [d.domain for d in self.domains() if d.dns_credential == cred_id]
        if users:
            raise InUse(f"credential {cred_id} is used by base domain(s) {', '.join(users)}")
        self._delete(T_DNS, cred_id, expect, Topic.DNS)

    def secrets(self) -> dict[str, str]:
        """``secret_ref -> secret`` for the provider factory (never logged, never returned)."""
        return {c.secret_ref: c.secret for c in self.credentials()}

    # --- custom-domain routes --------------------------------------------------------------

    def routes(self) -> list[CustomRoute]:
        return [
            CustomRoute(e.key, e.value["app_id"], e.value["port"], e.revision)
            for e in self.store.kv_list(T_ROUTES)
        ]

    def route(self, domain: str) -> CustomRoute:
        domain = parse_domain(domain)
        entry = self.store.kv_get(T_ROUTES, domain)
        if entry is None:
            raise NotFound(f"no custom-domain route for {domain}")
        return CustomRoute(domain, entry.value["app_id"], entry.value["port"], entry.revision)

    def put_route(self, r: CustomRoute, *, create: bool, expect: int | None = None) -> CustomRoute:
        for base in self.domains():
            if _under(r.domain, base.domain):
                raise InUse(
                    f"{r.domain} is under base domain {base.domain}; apps there route by name"
                )
        if create:
            expect = 0
        elif self.store.kv_get(T_ROUTES, r.domain) is None:
            raise NotFound(f"no custom-domain route for {r.domain}")
        entry = self._put(
            T_ROUTES, r.domain, {"app_id": r.app_id, "port": r.port}, expect, Topic.ROUTES, create
        )
        return CustomRoute(r.domain, r.app_id, r.port, entry.revision)

    def delete_route(self, domain: str, expect: int | None = None) -> None:
        self._delete(T_ROUTES, parse_domain(domain), expect, Topic.ROUTES)

    # --- port-policy overrides -------------------------------------------------------------

    def port_policy_override(self, instance_id: str) -> PortPolicyOverride | None:
        entry = self.store.kv_get(T_PORT_POLICY, instance_id)
        if entry is None:
            return None
        return PortPolicyOverride(instance_id, PortPolicy.from_json(entry.value), entry.revision)

    def port_policy_overrides(self) -> list[PortPolicyOverride]:
        return [
            PortPolicyOverride(e.key, PortPolicy.from_json(e.value), e.revision)
            for e in self.store.kv_list(T_PORT_POLICY)
        ]

    def put_port_policy(
        self, o: PortPolicyOverride, expect: int | None = None
    ) -> PortPolicyOverride:
        entry = self._put(
            T_PORT_POLICY, o.instance_id, o.policy.to_json(), expect, Topic.PORT_POLICY
        )
        return PortPolicyOverride(o.instance_id, o.policy, entry.revision)

    def delete_port_policy(self, instance_id: str, expect: int | None = None) -> None:
        self._delete(T_PORT_POLICY, instance_id, expect, Topic.PORT_POLICY)

    # --- drain -----------------------------------------------------------------------------

    def drained(self) -> dict[str, Drain]:
        return {
            e.key: Drain(e.key, float(e.value["since"]), e.revision)
            for e in self.store.kv_list(T_DRAIN)
        }

    def set_drain(self, instance_id: str, draining: bool) -> Drain | None:
        """Start or stop draining (idempotent); returns the drain record or None."""
        current = self.store.kv_get(T_DRAIN, instance_id)
        if draining:
            if current is not None:
                return Drain(instance_id, float(current.value["since"]), current.revision)
            entry = self._put(T_DRAIN, instance_id, {"since": self.clock()}, None, Topic.DRAIN)
            return Drain(instance_id, float(entry.value["since"]), entry.revision)
        if current is not None:
            self._delete(T_DRAIN, instance_id, None, Topic.DRAIN)
        return None

    # --- admission policy ------------------------------------------------------------------

    def _load_policy(self) -> tuple[AdmissionPolicy, int]:
        entry = self.store.kv_get(T_ADMISSION, POLICY_KEY)
        if entry is None:
            return self.config_policy, 0
        try:
            return AdmissionPolicy.from_json(entry.value), entry.revision
        except PolicyError as exc:  # fail closed: a corrupt stored policy admits nothing
            logger.error("stored admission policy is invalid (%s); admitting nothing", exc)
            return AdmissionPolicy(allowed_tcb_statuses=()), entry.revision

    def admission_policy(self) -> AdmissionPolicy:
        """The policy in force (cheap: a reference read; pass this method as the getter)."""
        return self._policy

    def admission(self) -> tuple[AdmissionPolicy, Source, int]:
        return self._policy, ("admin" if self._policy_revision else "config"), self._policy_revision

    def set_admission_policy(self, policy: AdmissionPolicy, expect: int | None = None) -> int:
        entry = self._put(T_ADMISSION, POLICY_KEY, policy.to_json(), expect, None)
        self._policy, self._policy_revision = policy, entry.revision
        self._notify(Topic.ADMISSION)
        return entry.revision

    def reset_admission_policy(self, expect: int | None = None) -> None:
        """Forget the runtime policy: the configuration file's applies again."""
        try:
            found = self.store.kv_delete(T_ADMISSION, POLICY_KEY, expect_revision=expect)
        except Conflict as exc:
            raise RevisionMismatch(str(exc)) from None
        if not found:
            raise NotFound("no runtime admission policy is set; the configuration's applies")
        self._policy, self._policy_revision = self.config_policy, 0
        logger.info(
            "operator state: %s/%s deleted (the file's policy applies)", T_ADMISSION, POLICY_KEY
        )
        self._notify(Topic.ADMISSION)


def _under(name: str, base: str) -> bool:
    return name == base or name.endswith("." + base)


def port_policy_overrides(store: Store) -> dict[str, dict[str, Any]]:
    """instance id -> admin port policy (JSON), read straight from a store.

    For readers without an :class:`OperatorState` (the proxy workers' registry route feed:
    ``RegistryRouteFeed(overrides=port_policy_overrides)``).
    """
    return {e.key: dict(e.value) for e in store.kv_list(T_PORT_POLICY)}


def drained_instances(store: Store) -> frozenset[str]:
    """The instances that get no new connections, read straight from a store."""
    return frozenset(e.key for e in store.kv_list(T_DRAIN))
