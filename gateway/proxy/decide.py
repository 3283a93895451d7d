"""What to do with a connection, given its ClientHello: a pure function and its result types.

``decide`` has no awaits, no logging, no clock and no I/O, so every routing rule is a row in a
table test (``tests/proxy/test_decide.py``). The edge (``gateway/proxy/conn.py``) carries the
decision out and writes ``Reject.reason``/``detail`` into the connection's access-log line.

Rules, in order (the parser has lower-cased and validated the SNI):

1. no SNI -> reject (``no_sni``);
2. SNI ``<label>.<base>`` for a configured base domain (exactly one label below it):
   * ``gateway`` (no port, no flag) -> the gateway's own HTTPS endpoints; ``health`` likewise;
   * ``localhost[-port][s|g]`` -> 127.0.0.1, only with ``insecure_localhost_backend``;
   * otherwise the label is an address ``<id>[-<port>][s|g]`` looked up in the route table,
     candidates filtered by drains (all drained -> reject ``drained``, the same alert as an
     unknown app) and port policy (fail-closed); ``s`` passes TLS through, anything else
     terminates (``g``: ALPN ``h2`` only) with the certificate for the SNI;
3. any other name is a custom domain. If the route table carries an operator route for it
   (:class:`CustomRouteTable`, e.g. ``gateway ctl custom-domains add`` through the control
   plane's overlay), that ``<app_id>:<port>`` goes straight to :func:`decide_custom` (no DNS,
   cached per SNI like any decision). Otherwise ``decide`` returns :class:`Resolve`, the edge
   looks up the TXT record ``_dstack-app-address.<sni>`` (or the wildcard fallback)
   asynchronously and hands the answer to :func:`decide_custom`, the second pure function:
   * a miss (not found, malformed, timeout, server error) -> reject ``custom_<why>``;
   * ``<app_id>:<port>`` -> the route table and port policy as in rule 2 (fail-closed);
   * a certificate in the store for the SNI (exact or one-level wildcard) -> terminate with
     ALPN ``http/1.1``; otherwise pass TLS through, as upstream always does.

Balancing (``proxy.balance``). The candidates that survive the filters are split into fresh
ones and fallbacks (seen, but past the stale window; used only when no fresh one is left).
``freshest`` keeps upstream's order (freshest first, at most ``top_n``). ``round_robin``
sorts the fresh ones by instance id (a stable order across table rebuilds, which re-rank by
handshake age) and precomputes every rotation, each cut to ``top_n``, into
``Upstream.rotations``: the edge picks one per connection (the worker's ``Turns`` in
``gateway/proxy/balance.py``, an index into a cached tuple), so the per-SNI decision cache
stays and nothing is built per connection, and races it staggered (``conn.py``). Which
rotation comes next is state, so it is not decided here.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from gateway.certs.custom_domains import AddressMiss, AppAddress
from gateway.certs.store import CertSnapshot
from gateway.certs.tls import ALPN_H1, ALPN_H2
from gateway.protocol.address import Mode, parse_address, split_sni
from gateway.protocol.clienthello import ClientHello
from gateway.protocol.errors import AddressError, TlsAlert
from gateway.proxy.routes import OPEN_POLICY, Candidate, RouteTable
from gateway.proxy.settings import Balance

__all__ = [
    "ConnInfo",
    "CustomRouteTable",
    "Decision",
    "Gateway",
    "Passthrough",
    "Reject",
    "Resolve",
    "Snapshot",
    "Target",
    "Terminate",
    "Upstream",
    "decide",
    "decide_custom",
]

LOCALHOST_ID = "localhost"
GATEWAY_LABELS = frozenset({"gateway", "health"})


@dataclass(frozen=True, slots=True)
class ConnInfo:
    """What the edge knows about the connection besides the hello."""

    client: tuple[str, int]
    local_port: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything ``decide`` reads; replaced whole on reload, never mutated."""

    base_domains: tuple[str, ...]
    certs: CertSnapshot
    routes: RouteTable
    top_n: int = 3
    localhost_backend: bool = False
    balance: Balance = Balance.ROUND_ROBIN


@dataclass(frozen=True, slots=True)
class Target:
    """One backend to try: where, and whether it wants an outbound PROXY header first."""

    instance_id: str
    host: str
    pp: bool


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where the relay goes: an app (for limits and logs), a port and candidates, best first.

    ``rotations`` (round-robin balancing, more than one fresh instance): the candidate orders
    the edge takes turns with, each at most ``top_n`` long; ``targets`` is the first of them.
    Empty: always ``targets``.
    """

    app_id: str
    port: int
    targets: tuple[Target, ...]
    rotations: tuple[tuple[Target, ...], ...] = ()


@dataclass(frozen=True, slots=True)
class Terminate:
    upstream: Upstream
    context: ssl.SSLContext
    alpn: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Passthrough:
    upstream: Upstream


@dataclass(frozen=True, slots=True)
class Gateway:
    """Serve the gateway's own endpoints (``/health``, ``/index``, ...) over TLS."""

    context: ssl.SSLContext
    legacy_health: bool = False


@dataclass(frozen=True, slots=True)
class Reject:
    """Send ``alert`` and close. ``reason`` is a short stable token (a counter key)."""

    alert: TlsAlert
    reason: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Resolve:
    """A custom domain: look up its TXT record, then call :func:`decide_custom`."""

    sni: str


Decision = Terminate | Passthrough | Gateway | Reject | Resolve


def decide(hello: ClientHello, conn: ConnInfo, snap: Snapshot) -> Decision:
    """Map a parsed ClientHello to a :data:`Decision`. Pure.

    The result depends only on ``hello.sni`` and ``snap``, so each worker caches it per SNI
    until the snapshot is swapped (``Worker.decisions``). A rule that reads anything else
    (ALPN, the client address) must extend that cache key in ``conn.py``.
    """
    if not hello.sni:
        return Reject(TlsAlert.UNRECOGNIZED_NAME, "no_sni", "the ClientHello has no server name")
    sni = hello.sni  # already lower-case and validated by the parser
    split = split_sni(sni, snap.base_domains)
    if split is None:
        return _custom_domain(sni, conn, snap)
    label, _base = split
    try:
        addr = parse_address(label)
    except AddressError as exc:
        return Reject(exc.alert, "bad_address", f"{sni}: {exc}")

    cert = snap.certs.lookup(sni)
    if addr.id in GATEWAY_LABELS and addr.mode is Mode.TERMINATE and label in GATEWAY_LABELS:
        if cert is None:
            return Reject(TlsAlert.UNRECOGNIZED_NAME, "no_cert", f"no certificate for {sni}")
        return Gateway(cert.context(ALPN_H1), legacy_health=addr.id == "health")

    if addr.id == LOCALHOST_ID and snap.localhost_backend:
        cands: tuple[Candidate, ...] = (
            Candidate(LOCALHOST_ID, LOCALHOST_ID, "127.0.0.1", OPEN_POLICY),
        )
    else:
        cands = snap.routes.lookup(addr.id, _lookup_limit(snap))
        if not cands:
            return Reject(
                TlsAlert.UNRECOGNIZED_NAME, "unknown_app", f"{sni}: no app or instance {addr.id!r}"
            )

    upstream = _upstream(sni, cands, addr.port, snap)
    if isinstance(upstream, Reject):
        return upstream
    if addr.mode is Mode.PASSTHROUGH:
        return Passthrough(upstream)
    if cert is None:
        return Reject(TlsAlert.UNRECOGNIZED_NAME, "no_cert", f"no certificate for {sni}")
    alpn = ALPN_H2 if addr.mode is Mode.H2 else ALPN_H1
    return Terminate(upstream, cert.context(alpn), alpn)


_ALL = 1 << 16  # round robin rotates over every fresh instance, not only the top N


def _lookup_limit(snap: Snapshot) -> int:
    return _ALL if snap.balance is Balance.ROUND_ROBIN else snap.top_n


def _upstream(
    sni: str, cands: tuple[Candidate, ...], port: int, snap: Snapshot
) -> Upstream | Reject:
    """The candidates that are not drained and whose port policy allows ``port``
    (fail-closed: unknown policy = no), fresh ones before fallbacks, in balancing order."""
    live = [c for c in cands if not c.drained]
    if not live:
        return Reject(
            TlsAlert.UNRECOGNIZED_NAME,
            "drained",
            f"{sni}: every instance of {cands[0].app_id!r} is drained by the operator",
        )
    allowed = [c for c in live if c.policy is not None and c.policy.allows(port)]
    if not allowed:
        return Reject(
            TlsAlert.HANDSHAKE_FAILURE,
            "port_denied",
            f"{sni}: port {port} denied by the app's port policy",
        )
    fresh = [c for c in allowed if not c.fallback] or allowed  # fallbacks when nothing fresh
    top_n = snap.top_n
    targets = [
        Target(c.instance_id, c.host, c.policy.wants_pp(port))
        for c in fresh
        if c.policy is not None  # (checked above; narrows the type)
    ]
    if snap.balance is not Balance.ROUND_ROBIN or len(targets) < 2:
        return Upstream(cands[0].app_id, port, tuple(targets[:top_n]))
    targets.sort(key=_stable)
    n = len(targets)
    width = range(min(top_n, n))
    rotations = tuple(tuple([targets[(i + k) % n] for k in width]) for i in range(n))
    return Upstream(cands[0].app_id, port, rotations[0], rotations)


def _stable(t: Target) -> tuple[str, str]:
    return (t.instance_id, t.host)


class _RouteTarget(Protocol):
    @property
    def app_id(self) -> str: ...

    @property
    def port(self) -> int: ...


@runtime_checkable
class CustomRouteTable(Protocol):
    """A route table that also knows operator-set custom-domain routes."""

    def custom_route(self, sni: str) -> _RouteTarget | None: ...


OPERATOR_ROUTE = "operator route"  # AppAddress.record for routes that did not come from DNS


def _custom_domain(sni: str, conn: ConnInfo, snap: Snapshot) -> Decision:
    """An operator route wins and needs no I/O; anything else needs a DNS lookup, which is
    I/O: hand it to the edge."""
    routes = snap.routes
    if isinstance(routes, CustomRouteTable):
        target = routes.custom_route(sni)
        if target is not None:
            answer = AppAddress(target.app_id, target.port, OPERATOR_ROUTE)
            return decide_custom(sni, answer, conn, snap)
    return Resolve(sni)


def decide_custom(
    sni: str, answer: AppAddress | AddressMiss, conn: ConnInfo, snap: Snapshot
) -> Terminate | Passthrough | Reject:
    """Map a custom domain's TXT answer to a decision. Pure, like :func:`decide`.

    ``<app_id>:<port>`` names an app or instance id in the route table. Upstream always
    passes custom domains through (the app terminates TLS, e.g. with dstack-ingress); when
    the operator installed a certificate for the name we terminate instead, offering
    ``http/1.1`` only, and the TXT port is then the app's plain-HTTP port.
    """
    if isinstance(answer, AddressMiss):
        reason = "custom_" + answer.reason.value.replace("-", "_")
        return Reject(TlsAlert.UNRECOGNIZED_NAME, reason, f"{sni}: {answer.detail}")
    cands = snap.routes.lookup(answer.app_id, _lookup_limit(snap))
    if not cands:
        return Reject(
            TlsAlert.UNRECOGNIZED_NAME,
            "unknown_app",
            f"{sni}: {answer.record} names {answer.app_id!r}, no such app or instance",
        )
    upstream = _upstream(sni, cands, answer.port, snap)
    if isinstance(upstream, Reject):
        return upstream
    cert = snap.certs.lookup(sni)
    if cert is None:
        return Passthrough(upstream)
    return Terminate(upstream, cert.context(ALPN_H1), ALPN_H1)
