from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest

from gateway.proxy.registry_routes import RegistryRouteFeed, RegistryRoutes, policy_from_json
from gateway.registry.records import InstanceRecord
from gateway.registry.sqlite import SqliteStore
from gateway.registry.store import StoreError

NOW = 1_800_000_000.0
OPEN = {"restrict_mode": False, "ports": []}
KEYS = iter(f"{i:02d}" + "A" * 41 + "=" for i in range(100))


def rec(iid: str, app: str, ip: int, handshake: float | None, policy: Any = OPEN) -> InstanceRecord:
    return InstanceRecord(
        instance_id=iid, app_id=app, public_key=next(KEYS),
        ip=ipaddress.IPv4Address(f"10.4.0.{ip}"), registered_at=NOW - 100, last_seen=NOW - 10,
        last_handshake=handshake, port_policy=policy,
    )  # fmt: skip


@pytest.mark.parametrize(
    "value,expected",
    [
        (None, None),
        ({}, (False, {})),
        (
            {"restrict_mode": True, "ports": [{"port": 443, "pp": True}, {"port": 80}]},
            (True, {443: True, 80: False}),
        ),
        ({"restrict_mode": "yes"}, None),
        ({"ports": [{"port": 0}]}, None),
        ({"ports": [{"port": 70000}]}, None),
        ({"ports": ["443"]}, None),
        ({"ports": [{"port": 1, "pp": 1}]}, None),
    ],
)
def test_policy_from_json_is_strict(value: Any, expected: Any) -> None:
    got = policy_from_json(value)
    if expected is None:
        assert got is None
    else:
        assert got is not None and (got.restrict_mode, dict(got.pp_ports)) == expected


def test_app_lookup_is_fresh_first_then_stale_fallbacks_and_skips_never_seen() -> None:
    table = RegistryRoutes(
        [
            rec("i-old", "app1", 2, NOW - 600),
            rec("i-new", "app1", 3, NOW - 5),
            rec("i-stale", "app1", 4, NOW - 4000),
            rec("i-never", "app1", 5, None),
            rec("i-other", "app2", 6, NOW - 1),
        ],
        now=NOW,
    )
    found = table.lookup("app1", 3)
    assert [c.instance_id for c in found] == ["i-new", "i-old", "i-stale"]
    assert [c.fallback for c in found] == [False, False, True]  # past the stale window
    assert [c.host for c in table.lookup("app1", 1)] == ["10.4.0.3"]
    assert not table.lookup("i-never", 3)[0].fallback  # never seen: by instance id only
    # by instance id: always, however stale or new
    assert table.lookup("i-stale", 3)[0].freshness == 4000
    assert table.lookup("i-never", 3)[0].host == "10.4.0.5"
    assert table.lookup("nobody", 3) == ()
    assert len(table) == 5


def test_unknown_policy_is_denied_and_overrides_win() -> None:
    table = RegistryRoutes(
        [rec("i1", "app", 2, NOW, policy=None), rec("i2", "app", 3, NOW, policy=OPEN)],
        now=NOW,
        overrides={"i2": {"restrict_mode": True, "ports": [{"port": 8080, "pp": True}]}},
    )
    assert table.lookup("i1", 1)[0].policy is None  # fail closed
    p = table.lookup("i2", 1)[0].policy
    assert p is not None and p.allows(8080) and not p.allows(80) and p.wants_pp(8080)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def test_feed_rebuilds_on_change_or_refresh_only(tmp_path: Path) -> None:
    db = tmp_path / "registry.sqlite"
    writer = SqliteStore(db)
    clock = Clock()

    def open_store() -> SqliteStore:
        if not db.exists():
            raise StoreError("no registry yet")
        return SqliteStore(db)

    feed = RegistryRouteFeed(open_store, refresh_every=10, clock=clock)
    try:
        first = feed.poll()
        assert first is not None and len(first) == 0
        assert feed.poll() is None  # nothing changed
        writer.put_instance(rec("i1", "app", 2, NOW - 1), expect_revision=0)
        second = feed.poll()
        assert second is not None and second.lookup("app", 3)[0].instance_id == "i1"
        assert feed.poll() is None
        clock.now += 11  # freshness ordering is refreshed even without writes
        third = feed.poll()
        assert third is not None and third.lookup("app", 3)[0].freshness == pytest.approx(12)
    finally:
        feed.close()
        writer.close()


def test_feed_waits_for_a_missing_registry(tmp_path: Path) -> None:
    db = tmp_path / "later.sqlite"

    def open_store() -> SqliteStore:
        if not db.exists():
            raise StoreError("no registry yet")
        return SqliteStore(db)

    feed = RegistryRouteFeed(open_store)
    assert feed.poll() is None
    SqliteStore(db).close()
    table = feed.poll()
    assert table is not None and len(table) == 0
    feed.close()
