"""Fetching the port policy of a CVM that registered without one, from its real guest agent.

The agent is the real public app (``gateway.guest.public``, the 8090 port) on 127.0.0.1 with
a real ``AgentService``; the registry is a real SQLite store. The record's address is
127.0.0.1 so that the fetcher's ``http://<ip>:<agent_port>/prpc/Info`` reaches it.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import ipaddress
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.attest.collateral import SimCollateralSource
from gateway.control.policy_fetch import (
    DEFAULT_POLICY,
    FetchSettings,
    PolicyUnavailable,
    PortPolicyFetcher,
    policy_from_info,
)
from gateway.control.registration import Advertised
from gateway.control.rpc_identity import RpcIdentity
from gateway.guest.gateway_cache import GatewayKeyStore, TeeCertIssuer
from gateway.guest.gateway_client import GatewayClient, GatewayTrust, PortPolicy, parse_app_ids
from gateway.guest.identity import AppCompose, KeyProviderKind
from gateway.guest.keys import app_keys_from_seed
from gateway.guest.public import RateLimiter, create_public_app
from gateway.guest.service import AgentService, GuestState
from gateway.registry.records import InstanceRecord
from gateway.registry.service import Registry
from gateway.registry.sqlite import SqliteStore
from gateway.tee.sim import SimTee
from gateway.tee.sim_pki import SimPki
from tests.helpers.gateway_rpc import CVM_APP, GW_APP, PLAN, measured_tee, serve_rpc
from tests.helpers.processes import free_port


def public_key(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


POLICY = {"ports": [{"port": 443, "pp": True}, {"port": 80, "pp": False}], "restrict_mode": True}
INSTANCE = "ab" * 20


def compose_bytes(*, public: bool = True, policy: Any = POLICY) -> bytes:
    doc: dict[str, Any] = {
        "manifest_version": 2,
        "name": "legacy-app",
        "runner": "bash",
        "key_provider": "none",
        "public_tcbinfo": public,
    }
    if policy is not None:
        doc["port_policy"] = policy
    return json.dumps(doc).encode()


def info_body(compose: bytes, tcb_public: bool = True) -> bytes:
    tcb = json.dumps({"app_compose": compose.decode()}) if tcb_public else ""
    return json.dumps({"app_id": "x", "tcb_info": tcb}).encode()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- the pure part -----------------------------------------------------------------------


def test_policy_is_read_and_normalised() -> None:
    raw = compose_bytes(policy={"ports": [{"port": 8080}]})
    assert policy_from_info(info_body(raw), sha(raw)) == {
        "ports": [{"port": 8080, "pp": False}],
        "restrict_mode": False,
    }


def test_legacy_compose_without_policy_gets_upstreams_open_default() -> None:
    raw = compose_bytes(policy=None)
    assert policy_from_info(info_body(raw), sha(raw)) == DEFAULT_POLICY


@pytest.mark.parametrize(
    ("body", "hash_of", "message"),
    [
        (info_body(compose_bytes(), tcb_public=False), compose_bytes(), "public_tcbinfo"),
        (info_body(compose_bytes()), compose_bytes(policy=None), "does not hash"),
        (info_body(compose_bytes()), b"", "does not hash"),
        (b'{"tcb_info": 5}', b"", "no tcb_info"),
        (b'{"tcb_info": "{\\"app_compose\\": 1}"}', b"", "no app_compose"),
        (b"[", b"", "malformed"),
        (
            info_body(compose_bytes(policy={"ports": [{"port": 0}]})),
            compose_bytes(policy={"ports": [{"port": 0}]}),
            "ports[0].port",
        ),
        (info_body(b"[1]"), b"[1]", "not a JSON object"),
    ],
    ids=["not-public", "other-compose", "no-hash", "no-tcb", "no-compose", "json", "port", "list"],
)
def test_unusable_answers_say_why(body: bytes, hash_of: bytes, message: str) -> None:
    want = sha(hash_of) if hash_of else "zz"
    with pytest.raises(PolicyUnavailable) as info:
        policy_from_info(body, want)
    assert message in str(info.value)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 400), st.binary(max_size=4))
def test_mutated_answers_raise_only_our_error(junk: bytes, pos: int, insert: bytes) -> None:
    raw = compose_bytes()
    good = info_body(raw)
    for body in (junk, good[:pos] + insert + good[pos + len(insert) :]):
        try:
            policy_from_info(body, sha(raw))
        except PolicyUnavailable:
            pass


# --- against the real agent and store ----------------------------------------------------


def agent_app(compose: bytes, tmp: Path) -> web.Application:
    state = GuestState(
        compose=AppCompose.parse(compose),
        keys=app_keys_from_seed(b"\x09" * 32, KeyProviderKind.NONE),
    )
    tee = SimTee(SimPki.load_or_create(tmp / "pki"), tmp / "tee")
    return create_public_app(AgentService(state, tee), None, RateLimiter(rate=100, burst=100))


@asynccontextmanager
async def agent(app: web.Application, port: int) -> AsyncIterator[None]:
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield
    finally:
        await runner.cleanup()


def put_record(
    store: SqliteStore, compose: bytes, policy: Any = None, n: int = 0
) -> InstanceRecord:
    now = time.time()
    rec = InstanceRecord(
        instance_id=INSTANCE if n == 0 else f"{n:040x}",
        app_id=sha(compose)[:40],
        public_key=public_key(bytes([n + 1]) * 32),
        ip=ipaddress.IPv4Address("127.0.0.1") + n,
        registered_at=now,
        last_seen=now,
        port_policy=policy,
        evidence={"compose_hash": sha(compose)},
    )
    return store.put_instance(rec, expect_revision=0)


async def no_sleep(_: float) -> None:
    await asyncio.sleep(0)


def fetcher(store: SqliteStore, port: int, **kw: Any) -> PortPolicyFetcher:
    get = kw.pop("get", None)
    settings_ = FetchSettings(agent_port=port, timeout=2.0, **kw)
    if get is None:
        return PortPolicyFetcher(store, settings_, sleep=no_sleep)
    return PortPolicyFetcher(store, settings_, sleep=no_sleep, get=get)


def test_policy_is_fetched_from_the_agent_and_stored(tmp_path: Path) -> None:
    compose = compose_bytes()
    store = SqliteStore(tmp_path / "r.sqlite3")
    rec = put_record(store, compose)
    port = free_port()

    async def main() -> PortPolicyFetcher:
        f = fetcher(store, port)
        async with agent(agent_app(compose, tmp_path), port):
            assert f.schedule(rec) and not f.schedule(rec)  # one fetch per instance at a time
            await f.wait()
        return f

    f = asyncio.run(main())
    stored = store.get_instance(INSTANCE)
    assert stored is not None and stored.port_policy == POLICY and f.fetched == 1
    assert stored.revision > rec.revision and stored.public_key == rec.public_key
    store.close()


def test_unpublished_tcb_info_keeps_the_ports_closed_and_is_not_refetched(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    compose = compose_bytes(public=False)
    store = SqliteStore(tmp_path / "r.sqlite3")
    rec = put_record(store, compose)
    port = free_port()

    async def main() -> bool:
        f = fetcher(store, port)
        async with agent(agent_app(compose, tmp_path), port):
            f.schedule(rec)
            await f.wait()
        return f.schedule(rec)  # the same app version: not again

    assert asyncio.run(main()) is False
    stored = store.get_instance(INSTANCE)
    assert stored is not None and stored.port_policy is None
    assert "public_tcbinfo is false" in caplog.text and "port-policy" in caplog.text
    store.close()


def test_an_agent_claiming_another_compose_is_not_believed(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "r.sqlite3")
    rec = put_record(store, compose_bytes(policy={"ports": [], "restrict_mode": True}))
    port = free_port()

    async def main() -> None:
        f = fetcher(store, port)
        async with agent(agent_app(compose_bytes(), tmp_path), port):  # wider policy
            f.schedule(rec)
            await f.wait()

    asyncio.run(main())
    stored = store.get_instance(INSTANCE)
    assert stored is not None and stored.port_policy is None
    store.close()


def test_unreachable_agent_is_retried_with_backoff_then_given_up(tmp_path: Path) -> None:
    compose = compose_bytes()
    store = SqliteStore(tmp_path / "r.sqlite3")
    rec = put_record(store, compose)
    delays: list[float] = []

    async def sleep(d: float) -> None:
        delays.append(d)

    async def main() -> PortPolicyFetcher:
        f = PortPolicyFetcher(
            store,
            FetchSettings(agent_port=free_port(), timeout=1.0, max_retries=4, backoff_max=3.0),
            sleep=sleep,
        )
        f.schedule(rec)
        await f.wait()
        return f

    f = asyncio.run(main())
    assert delays == [1.0, 2.0, 3.0, 3.0] and f.failed == 1
    stored = store.get_instance(INSTANCE)
    assert stored is not None and stored.port_policy is None
    store.close()


def test_the_first_attempts_fail_until_the_tunnel_is_up(tmp_path: Path) -> None:
    """As after a real registration: the agent becomes reachable only later."""
    compose = compose_bytes()
    store = SqliteStore(tmp_path / "r.sqlite3")
    rec = put_record(store, compose)
    port = free_port()

    async def main() -> None:
        up = agent(agent_app(compose, tmp_path), port)
        started: list[bool] = []

        async def sleep(d: float) -> None:
            if not started:  # the tunnel comes up during the first back-off
                await up.__aenter__()
                started.append(True)

        f = PortPolicyFetcher(store, FetchSettings(agent_port=port, timeout=2.0), sleep=sleep)
        f.schedule(rec)
        await f.wait()
        await up.__aexit__(None, None, None)
        assert f.fetched == 1 and started

    asyncio.run(main())
    stored = store.get_instance(INSTANCE)
    assert stored is not None and stored.port_policy == POLICY
    store.close()


def test_a_policy_reported_meanwhile_wins(tmp_path: Path) -> None:
    compose = compose_bytes()
    store = SqliteStore(tmp_path / "r.sqlite3")
    rec = put_record(store, compose)
    reported = {"ports": [{"port": 1, "pp": False}], "restrict_mode": True}

    async def get(url: str, timeout: float, limit: int) -> tuple[int, bytes]:
        current = store.get_instance(INSTANCE)
        assert current is not None  # the CVM re-registers with a policy during the fetch
        store.put_instance(
            dataclasses.replace(current, port_policy=reported), expect_revision=current.revision
        )
        return 200, info_body(compose)

    async def main() -> None:
        f = fetcher(store, 1, get=get)
        f.schedule(rec)
        await f.wait()

    asyncio.run(main())
    stored = store.get_instance(INSTANCE)
    assert stored is not None and stored.port_policy == reported
    store.close()


def test_schedule_never_waits_and_fetches_are_bounded(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "r.sqlite3")
    compose = compose_bytes()
    records = [put_record(store, compose, n=n) for n in range(7)]
    running = 0
    peak = 0

    async def main() -> None:
        nonlocal running, peak
        gate = asyncio.Event()

        async def get(url: str, timeout: float, limit: int) -> tuple[int, bytes]:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await gate.wait()  # a hanging agent
            running -= 1
            return 503, b""

        f = fetcher(store, 1, get=get, max_concurrent=2, max_pending=5, max_retries=0)
        t0 = time.monotonic()
        started = [f.schedule(rec) for rec in records]
        assert time.monotonic() - t0 < 0.5  # schedule only starts tasks
        assert started == [True] * 5 + [False] * 2 and f.pending == 5
        for _ in range(20):
            await asyncio.sleep(0.01)
        assert peak == 2  # at most max_concurrent in flight
        gate.set()
        await f.wait()

    asyncio.run(main())
    store.close()


def test_the_rpc_schedules_a_fetch_only_when_no_policy_is_known(tmp_path: Path) -> None:
    """Through the real RegisterCvm: the hook gets the stored record, and the answer does
    not wait for it (the hook here never completes anything)."""
    pki = SimPki.load_or_create(tmp_path / "pki")
    store = SqliteStore(tmp_path / "r.sqlite3")
    creds = RpcIdentity(measured_tee(pki, tmp_path / "gw", GW_APP, b"\x99" * 20), tmp_path / "id")
    adv = Advertised(public_key(b"\x01" * 32), "10.0.0.1/24", "192.0.2.1:51820")
    tee = measured_tee(pki, tmp_path / "cvm", CVM_APP, b"\x16" * 20)
    keys = asyncio.run(
        GatewayKeyStore(tmp_path / "c").get_or_create(TeeCertIssuer(tee), int(time.time()))
    )
    client = GatewayClient(
        GatewayTrust(parse_app_ids(GW_APP), SimCollateralSource(pki), pki.root_ca_der)
    )
    seen: list[InstanceRecord] = []
    registry = Registry(store, PLAN, clock=time.time)
    with serve_rpc(creds.credentials(None), pki, registry, adv, port=free_port()) as server:
        server.service.policy_fetch = seen.append
        url = f"https://127.0.0.1:{server.port}"
        asyncio.run(client.register(url, keys))  # no port_policy: unknown
        assert [r.instance_id for r in seen] == ["16" * 20] and seen[0].port_policy is None
        assert seen[0].evidence["compose_hash"] == "c1" * 32  # what the fetch checks against
        asyncio.run(client.register(url, keys, PortPolicy(((443, False),))))
        asyncio.run(client.register(url, keys))  # same app version: the stored one is kept
        assert len(seen) == 1
    store.close()
