"""decide() as a table: each row reads like a routing rule."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.certs.custom_domains import AddressMiss, AppAddress, MissReason
from gateway.certs.devca import ensure_dev_ca, ensure_dev_wildcard, issue_wildcard, write_cert_dir
from gateway.certs.store import CertSnapshot, load_snapshot
from gateway.certs.tls import ALPN_H1, ALPN_H2
from gateway.protocol.clienthello import ClientHello
from gateway.protocol.errors import TlsAlert
from gateway.proxy.decide import (
    ConnInfo,
    Decision,
    Gateway,
    Passthrough,
    Reject,
    Resolve,
    Snapshot,
    Target,
    Terminate,
    decide,
    decide_custom,
)
from gateway.proxy.routes import Candidate, PortPolicy, StaticRoutes
from gateway.proxy.settings import Balance, PortRule, StaticRoute

OPEN = PortPolicy()
LOCKED = PortPolicy(True, {443: False, 8080: True})


class Table:
    """A hand-made RouteTable: app 'app' has three instances of mixed health and policy."""

    def __init__(self) -> None:
        self.apps = {
            "app": (
                Candidate("i1", "app", "10.0.0.2", OPEN, 5.0),
                Candidate("i2", "app", "10.0.0.3", OPEN, 1.0),
            ),
            "strict": (Candidate("s1", "strict", "10.0.1.2", LOCKED, 0.0),),
            "unknown": (Candidate("u1", "unknown", "10.0.2.2", None, 0.0),),
            "mixed": (
                Candidate("m1", "mixed", "10.0.3.2", None, 0.0),
                Candidate("m2", "mixed", "10.0.3.3", LOCKED, 1.0),
            ),
        }
        self.instances = {c.instance_id: c for cs in self.apps.values() for c in cs}
        self.instances["stale"] = Candidate("stale", "app", "10.0.0.9", OPEN, math.inf)

    def lookup(self, ident: str, top_n: int) -> tuple[Candidate, ...]:
        if ident in self.instances:
            return (self.instances[ident],)
        return tuple(sorted(self.apps.get(ident, ()), key=lambda c: c.freshness))[:top_n]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertSnapshot:
    root = tmp_path_factory.mktemp("decide")
    ensure_dev_wildcard(root / "ca", root / "certs", "gw.test")
    ca = ensure_dev_ca(root / "ca")
    ca_cert, _ = ca.load()
    for dirname, names in (("shop", ["shop.custom.test"]), ("wild", ["*.wild.test"])):
        leaf, key = issue_wildcard(ca, names)
        write_cert_dir(root / "certs", dirname, [leaf, ca_cert], key)
    return load_snapshot(root / "certs", ("1.2", "1.3"))


def snap(certs: CertSnapshot, **kw: object) -> Snapshot:
    base: dict[str, object] = {
        "base_domains": ("gw.test", "nocert.test"),
        "certs": certs,
        "routes": Table(),
        "balance": Balance.FRESHEST,  # upstream's order; round robin: tests/proxy/test_balance.py
    }
    base.update(kw)
    return Snapshot(**base)  # type: ignore[arg-type]


CONN = ConnInfo(("192.0.2.1", 5555), 443)


def hello(sni: str | None) -> ClientHello:
    return ClientHello(sni, (), (0x0304,), 0x0303, 200)


def up(decision: Decision) -> tuple[str, int, tuple[Target, ...]]:
    assert isinstance(decision, Terminate | Passthrough)
    u = decision.upstream
    return u.app_id, u.port, u.targets


T2, T3 = Target("i2", "10.0.0.3", False), Target("i1", "10.0.0.2", False)


@pytest.mark.parametrize(
    ("sni", "kind", "app", "port", "targets"),
    [
        # terminate: app id -> freshest first; default port 80
        ("app.gw.test", Terminate, "app", 80, (T2, T3)),
        ("app-8080.gw.test", Terminate, "app", 8080, (T2, T3)),
        # passthrough: default port 443
        ("app-s.gw.test", Passthrough, "app", 443, (T2, T3)),
        ("app-8443s.gw.test", Passthrough, "app", 8443, (T2, T3)),
        # h2
        ("app-g.gw.test", Terminate, "app", 80, (T2, T3)),
        # instance id -> exactly that instance, even if never seen
        ("i1-81.gw.test", Terminate, "app", 81, (T3,)),
        ("stale-81.gw.test", Terminate, "app", 81, (Target("stale", "10.0.0.9", False),)),
        # port policy: listed port allowed, pp flag carried
        ("strict-8080.gw.test", Terminate, "strict", 8080, (Target("s1", "10.0.1.2", True),)),
        ("strict-s.gw.test", Passthrough, "strict", 443, (Target("s1", "10.0.1.2", False),)),
        # unknown policy is skipped, the known one used
        ("mixed-443s.gw.test", Passthrough, "mixed", 443, (Target("m2", "10.0.3.3", False),)),
    ],
)
def test_routed(
    certs: CertSnapshot,
    sni: str,
    kind: type,
    app: str,
    port: int,
    targets: tuple[Target, ...],
) -> None:
    d = decide(hello(sni), CONN, snap(certs))
    assert isinstance(d, kind)
    assert up(d) == (app, port, targets)


def test_alpn_per_mode(certs: CertSnapshot) -> None:
    h2 = decide(hello("app-g.gw.test"), CONN, snap(certs))
    h1 = decide(hello("app.gw.test"), CONN, snap(certs))
    assert isinstance(h2, Terminate) and isinstance(h1, Terminate)
    assert h2.alpn == ALPN_H2 and h1.alpn == ALPN_H1
    assert h2.context is not h1.context


def test_top_n(certs: CertSnapshot) -> None:
    d = decide(hello("app.gw.test"), CONN, snap(certs, top_n=1))
    assert up(d)[2] == (T2,)


@pytest.mark.parametrize(
    ("sni", "alert", "reason"),
    [
        (None, TlsAlert.UNRECOGNIZED_NAME, "no_sni"),
        ("nope.gw.test", TlsAlert.UNRECOGNIZED_NAME, "unknown_app"),
        ("a-b-c.gw.test", TlsAlert.UNRECOGNIZED_NAME, "bad_address"),
        ("app-443gs.gw.test", TlsAlert.UNRECOGNIZED_NAME, "bad_address"),
        ("app-0.gw.test", TlsAlert.UNRECOGNIZED_NAME, "bad_address"),
        ("strict-80.gw.test", TlsAlert.HANDSHAKE_FAILURE, "port_denied"),
        ("unknown-80.gw.test", TlsAlert.HANDSHAKE_FAILURE, "port_denied"),
        ("app.nocert.test", TlsAlert.UNRECOGNIZED_NAME, "no_cert"),
        ("gateway.nocert.test", TlsAlert.UNRECOGNIZED_NAME, "no_cert"),
        ("localhost-80.gw.test", TlsAlert.UNRECOGNIZED_NAME, "unknown_app"),  # debug off
    ],
)
def test_rejected(certs: CertSnapshot, sni: str | None, alert: TlsAlert, reason: str) -> None:
    d = decide(hello(sni), CONN, snap(certs))
    assert isinstance(d, Reject)
    assert (d.alert, d.reason) == (alert, reason)
    if sni:
        assert d.detail


def test_passthrough_needs_no_certificate(certs: CertSnapshot) -> None:
    d = decide(hello("app-s.nocert.test"), CONN, snap(certs))
    assert isinstance(d, Passthrough)


@pytest.mark.parametrize(
    ("sni", "legacy"),
    [("gateway.gw.test", False), ("health.gw.test", True)],
)
def test_gateway_names(certs: CertSnapshot, sni: str, legacy: bool) -> None:
    d = decide(hello(sni), CONN, snap(certs))
    assert isinstance(d, Gateway) and d.legacy_health is legacy


def test_gateway_with_port_or_flag_is_an_ordinary_id(certs: CertSnapshot) -> None:
    d = decide(hello("gateway-s.gw.test"), CONN, snap(certs))
    assert isinstance(d, Reject) and d.reason == "unknown_app"


def test_localhost_backend_only_when_enabled(certs: CertSnapshot) -> None:
    d = decide(hello("localhost-8080s.gw.test"), CONN, snap(certs, localhost_backend=True))
    assert isinstance(d, Passthrough)
    assert up(d) == ("localhost", 8080, (Target("localhost", "127.0.0.1", False),))


def test_static_routes_table() -> None:
    routes = StaticRoutes(
        [
            StaticRoute(
                "a", ("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"), ("x1", "x2", "x3", "x4")
            ),
            StaticRoute("b", ("fd00::1",), restrict_mode=True, ports=(PortRule(80, pp=True),)),
        ]
    )
    assert [c.host for c in routes.lookup("a", 3)] == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert [c.instance_id for c in routes.lookup("x4", 3)] == ["x4"]
    (b,) = routes.lookup("b", 3)
    assert b.policy is not None
    assert b.policy.allows(80) and not b.policy.allows(81) and b.policy.wants_pp(80)
    assert routes.lookup("zzz", 3) == ()
    assert routes.lookup("b", 3)[0].instance_id == ""


# -- custom domains ---------------------------------------------------------------------------


@pytest.mark.parametrize("sni", ["example.com", "x.app.gw.test", "gw.test", "shop.custom.test"])
def test_custom_names_are_resolved_at_the_edge(certs: CertSnapshot, sni: str) -> None:
    assert decide(hello(sni), CONN, snap(certs)) == Resolve(sni)


S1PP, M2 = Target("s1", "10.0.1.2", True), Target("m2", "10.0.3.3", False)


def txt(app: str, port: int) -> AppAddress:
    return AppAddress(app, port, "_dstack-app-address.x")


@pytest.mark.parametrize(
    ("sni", "answer", "kind", "app", "port", "targets"),
    [
        # no certificate for the name: pass TLS through, like upstream
        ("a.example.com", txt("app", 8443), Passthrough, "app", 8443, (T2, T3)),
        # an instance id in the TXT record reaches exactly that instance
        ("a.example.com", txt("i1", 443), Passthrough, "app", 443, (T3,)),
        # port policy applies as for base-domain names, pp flag carried
        ("a.example.com", txt("strict", 8080), Passthrough, "strict", 8080, (S1PP,)),
        ("a.example.com", txt("mixed", 443), Passthrough, "mixed", 443, (M2,)),
        # a certificate for the exact name, or a one-level wildcard: terminate
        ("shop.custom.test", txt("app", 8080), Terminate, "app", 8080, (T2, T3)),
        ("any.wild.test", txt("app", 80), Terminate, "app", 80, (T2, T3)),
        # the wildcard covers one level only
        ("a.b.wild.test", txt("app", 443), Passthrough, "app", 443, (T2, T3)),
        # a base domain's wildcard does not cover deeper names routed as custom domains
        ("x.app.gw.test", txt("app", 443), Passthrough, "app", 443, (T2, T3)),
    ],
)
def test_custom_routed(
    certs: CertSnapshot,
    sni: str,
    answer: AppAddress,
    kind: type,
    app: str,
    port: int,
    targets: tuple[Target, ...],
) -> None:
    d = decide_custom(sni, answer, CONN, snap(certs))
    assert isinstance(d, kind)
    assert up(d) == (app, port, targets)
    if isinstance(d, Terminate):
        assert d.alpn == ALPN_H1


def test_custom_terminate_uses_the_names_certificate(certs: CertSnapshot) -> None:
    d = decide_custom("shop.custom.test", txt("app", 80), CONN, snap(certs))
    entry = certs.lookup("shop.custom.test")
    assert isinstance(d, Terminate) and entry is not None
    assert d.context is entry.context(ALPN_H1)
    assert entry is not certs.lookup("app.gw.test")


@pytest.mark.parametrize(
    ("answer", "alert", "reason"),
    [
        (
            AddressMiss("a.example.com", MissReason.NOT_FOUND, "no TXT"),
            "unrecognized",
            "custom_not_found",
        ),
        (
            AddressMiss("a.example.com", MissReason.MALFORMED, "bad"),
            "unrecognized",
            "custom_malformed",
        ),
        (
            AddressMiss("a.example.com", MissReason.TIMEOUT, "slow"),
            "unrecognized",
            "custom_timeout",
        ),
        (
            AddressMiss("a.example.com", MissReason.ERROR, "SERVFAIL"),
            "unrecognized",
            "custom_error",
        ),
        (txt("nope", 443), "unrecognized", "unknown_app"),
        (txt("strict", 8443), "handshake", "port_denied"),  # restrict_mode, not listed
        (txt("unknown", 443), "handshake", "port_denied"),  # unknown policy: fail closed
        (txt("strict", 80), "handshake", "port_denied"),
    ],
)
def test_custom_rejected(
    certs: CertSnapshot, answer: AppAddress | AddressMiss, alert: str, reason: str
) -> None:
    expected = {"unrecognized": TlsAlert.UNRECOGNIZED_NAME, "handshake": TlsAlert.HANDSHAKE_FAILURE}
    for sni in ("a.example.com", "shop.custom.test"):  # a certificate does not bypass routing
        d = decide_custom(sni, answer, CONN, snap(certs))
        assert isinstance(d, Reject)
        assert (d.alert, d.reason) == (expected[alert], reason)
        assert sni in d.detail


_LABEL = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=10)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    labels=st.lists(_LABEL, min_size=1, max_size=4),
    tld=st.sampled_from(["custom.test", "wild.test", "gw.test", "example.com"]),
    app=st.sampled_from(["app", "i1", "strict", "unknown", "mixed", "stale", "nope", "A-b_c"]),
    port=st.integers(1, 65535),
)
def test_custom_decision_properties(
    certs: CertSnapshot, labels: list[str], tld: str, app: str, port: int
) -> None:
    """Whatever the name and record: one of three outcomes; terminate iff a certificate
    matches; every target is allowed by its instance's port policy."""
    sni = ".".join([*labels, tld])
    d = decide_custom(sni, AppAddress(app, port, "r"), CONN, snap(certs))
    assert isinstance(d, Terminate | Passthrough | Reject)
    if isinstance(d, Reject):
        assert d.reason in {"unknown_app", "port_denied"} and sni in d.detail
        return
    assert isinstance(d, Terminate) == (certs.lookup(sni) is not None)
    assert d.upstream.port == port and d.upstream.targets
    table = Table()
    for t in d.upstream.targets:
        policy = table.instances[t.instance_id].policy
        assert policy is not None and policy.allows(port)


class OperatorTable(Table):
    """A table that also carries operator custom-domain routes (as ``OverlayRoutes`` does)."""

    def __init__(self, routes: dict[str, tuple[str, int]]) -> None:
        super().__init__()
        self.routes = routes

    def custom_route(self, sni: str) -> AppAddress | None:
        hit = self.routes.get(sni)
        return AppAddress(hit[0], hit[1], "x") if hit else None


@pytest.mark.parametrize(
    ("sni", "kind", "reason"),
    [
        ("op.example.com", Passthrough, ""),  # no DNS: routed in decide()
        ("shop.custom.test", Terminate, ""),  # a certificate for the name: terminate
        ("denied.example.com", Reject, "port_denied"),  # policy still applies
        ("gone.example.com", Reject, "unknown_app"),
        ("other.example.com", Resolve, ""),  # no operator route: DNS
    ],
)
def test_operator_routes_come_before_dns(
    certs: CertSnapshot, sni: str, kind: type, reason: str
) -> None:
    table = OperatorTable(
        {
            "op.example.com": ("app", 8443),
            "shop.custom.test": ("app", 8080),
            "denied.example.com": ("strict", 9999),
            "gone.example.com": ("nope", 443),
        }
    )
    d = decide(hello(sni), CONN, snap(certs, routes=table))
    assert isinstance(d, kind)
    if isinstance(d, Reject):
        assert d.reason == reason
    if isinstance(d, Passthrough | Terminate):
        assert d.upstream.app_id == "app" and d.upstream.targets == (T2, T3)


# -- balancing: the orders the edge takes turns with (proxy.balance) ----------------------


class Pool:
    """A RouteTable of one app whose candidates the test writes out in full."""

    def __init__(self, *cands: Candidate) -> None:
        self.cands = cands

    def lookup(self, ident: str, top_n: int) -> tuple[Candidate, ...]:
        if ident != "app":
            return tuple(c for c in self.cands if c.instance_id == ident)[:1]
        return self.cands[:top_n]


def cand(
    iid: str,
    age: float = 1.0,
    policy: PortPolicy = OPEN,
    fallback: bool = False,
    drained: bool = False,
) -> Candidate:
    host = f"10.0.0.{int(iid[1:])}"
    return Candidate(iid, "app", host, policy, age, fallback=fallback, drained=drained)


def tgt(iid: str) -> Target:
    return Target(iid, f"10.0.0.{int(iid[1:])}", False)


def rr(certs: CertSnapshot, table: Pool, top_n: int = 3, sni: str = "app.gw.test") -> Decision:
    return decide(
        hello(sni), CONN, snap(certs, routes=table, top_n=top_n, balance=Balance.ROUND_ROBIN)
    )


def firsts(d: Decision) -> list[str]:
    assert isinstance(d, Terminate | Passthrough)
    return [order[0].instance_id for order in d.upstream.rotations]


def test_round_robin_rotates_over_every_fresh_instance_in_a_stable_order(
    certs: CertSnapshot,
) -> None:
    # freshest first in the table; round robin sorts by instance id so that a rebuilt table
    # (handshake ages re-ranked) keeps the same rotations and the turn counter stays fair
    d = rr(certs, Pool(cand("i3", 1.0), cand("i1", 9.0), cand("i2", 5.0)))
    assert isinstance(d, Terminate)
    assert d.upstream.rotations == (
        (tgt("i1"), tgt("i2"), tgt("i3")),
        (tgt("i2"), tgt("i3"), tgt("i1")),
        (tgt("i3"), tgt("i1"), tgt("i2")),
    )
    assert d.upstream.targets == d.upstream.rotations[0]
    reranked = rr(certs, Pool(cand("i1", 0.5), cand("i2", 7.0), cand("i3", 8.0)))
    assert isinstance(reranked, Terminate) and reranked.upstream == d.upstream


def test_round_robin_covers_instances_beyond_top_n(certs: CertSnapshot) -> None:
    """Five fresh instances, two raced per connection: each is first exactly once per
    cycle (freshest would never send a new connection to the three oldest)."""
    d = rr(certs, Pool(*(cand(f"i{i}", float(i)) for i in range(1, 6))), top_n=2)
    assert isinstance(d, Terminate)
    assert firsts(d) == ["i1", "i2", "i3", "i4", "i5"]
    assert all(len(order) == 2 for order in d.upstream.rotations)
    assert d.upstream.rotations[4] == (tgt("i5"), tgt("i1"))  # wraps around
    pool = Pool(*(cand(f"i{i}", float(i)) for i in range(1, 6)))
    freshest = decide(hello("app.gw.test"), CONN, snap(certs, routes=pool, top_n=2))
    assert isinstance(freshest, Terminate)
    assert freshest.upstream.rotations == () and freshest.upstream.targets == (tgt("i1"), tgt("i2"))


@pytest.mark.parametrize(
    ("cands", "expected"),
    [
        # one fresh instance: nothing to rotate, the connection goes to it
        ((cand("i1"),), ((tgt("i1"),), ())),
        # stale instances are fallbacks: not raced while a fresh one is eligible
        ((cand("i1"), cand("i2", 4000.0, fallback=True)), ((tgt("i1"),), ())),
        # ... and used (rotated) when no fresh one is
        (
            (cand("i1", 4000.0, fallback=True), cand("i2", 5000.0, fallback=True)),
            ((tgt("i1"), tgt("i2")), ((tgt("i1"), tgt("i2")), (tgt("i2"), tgt("i1")))),
        ),
        # a fresh instance whose policy denies the port does not hide the fallback
        (
            (cand("i1", policy=PortPolicy(True)), cand("i2", 4000.0, fallback=True)),
            ((tgt("i2"),), ()),
        ),
        # drained instances get no new connections
        (
            (cand("i1", drained=True), cand("i2"), cand("i3")),
            ((tgt("i2"), tgt("i3")), ((tgt("i2"), tgt("i3")), (tgt("i3"), tgt("i2")))),
        ),
    ],
)
def test_round_robin_orders(
    certs: CertSnapshot,
    cands: tuple[Candidate, ...],
    expected: tuple[tuple[Target, ...], tuple[tuple[Target, ...], ...]],
) -> None:
    d = rr(certs, Pool(*cands))
    assert isinstance(d, Terminate)
    assert (d.upstream.targets, d.upstream.rotations) == expected


def test_every_instance_drained_is_refused_like_an_unknown_app(certs: CertSnapshot) -> None:
    for balance in Balance:
        table = Pool(cand("i1", drained=True), cand("i2", drained=True))
        d = decide(hello("app.gw.test"), CONN, snap(certs, routes=table, balance=balance))
        unknown = decide(hello("nope.gw.test"), CONN, snap(certs, routes=table, balance=balance))
        assert isinstance(d, Reject) and isinstance(unknown, Reject)
        assert d.alert is unknown.alert is TlsAlert.UNRECOGNIZED_NAME
        assert (d.reason, unknown.reason) == ("drained", "unknown_app")
        assert "drained" in d.detail and "'app'" in d.detail
    # by instance id too
    d = rr(certs, Pool(cand("i1", drained=True)), sni="i1.gw.test")
    assert isinstance(d, Reject) and d.reason == "drained"
