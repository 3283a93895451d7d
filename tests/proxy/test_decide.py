"""decide() as a table: each row reads like a routing rule."""

from __future__ import annotations

import math

import pytest

from gateway.certs.devca import ensure_dev_wildcard
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
    Snapshot,
    Target,
    Terminate,
    decide,
)
from gateway.proxy.routes import Candidate, PortPolicy, StaticRoutes
from gateway.proxy.settings import PortRule, StaticRoute

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
    return load_snapshot(root / "certs", ("1.2", "1.3"))


def snap(certs: CertSnapshot, **kw: object) -> Snapshot:
    base: dict[str, object] = {
        "base_domains": ("gw.test", "nocert.test"),
        "certs": certs,
        "routes": Table(),
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
        ("example.com", TlsAlert.UNRECOGNIZED_NAME, "custom_domain"),
        ("x.app.gw.test", TlsAlert.UNRECOGNIZED_NAME, "custom_domain"),
        ("gw.test", TlsAlert.UNRECOGNIZED_NAME, "custom_domain"),
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
