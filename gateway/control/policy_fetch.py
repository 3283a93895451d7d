"""Port policy of CVMs that register without one: fetched from their guest agent, verified.

Why: current dstack guests always send ``port_policy`` in ``RegisterCvm``, but older ones do
not. The data plane treats an unknown policy as "deny every port" (fail closed), so such a
CVM would stay unreachable. Upstream (``proxy/port_policy.rs``) then reads the policy the app
declared from the CVM's guest agent: ``Info().tcb_info.app_compose.port_policy`` at
``http://<tunnel ip>:<agent port>/prpc``. We do the same, with two differences on purpose:

* **Verified.** The app-compose text is accepted only when its SHA-256 equals the compose
  hash that was *attested* at registration (the registry's evidence summary), so neither the
  host nor a confused agent can widen the policy; the tunnel itself (WireGuard, the CVM's
  key) is what delivers the answer.
* **Fail closed when not published.** An agent with ``public_tcbinfo = false`` returns an
  empty ``tcb_info``; upstream then caches the *open* default. We leave the policy unknown
  (ports closed) and log how to fix it: the operator's override
  (``PUT /api/v1/instances/{id}/port-policy``) or a guest that sends its policy.

An app-compose without ``port_policy`` (a legacy app, hash verified) gets upstream's
default, ``{"ports": [], "restrict_mode": false}`` (every port, no PROXY header): that *is*
what the app declared.

It never blocks registration: :meth:`PortPolicyFetcher.schedule` only starts a background
task and returns (the RPC answers at once; the CVM brings its tunnel up afterwards, which is
why the first attempts usually fail and are retried with back-off, upstream's 1 s doubling
to 30 s, 5 retries, 10 s timeout). At most ``max_concurrent`` fetches run and at most
``max_pending`` instances wait; one instance is fetched at most once at a time, and an
instance given up on (malformed answer, hash mismatch, not published) is not fetched again
for the same compose hash. The policy is written with the store's compare-and-set, and only
while the record still has none (a CVM that re-registered with a policy meanwhile wins).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import functools
import hashlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from gateway.control.registration import PortPolicy, RpcError
from gateway.registry.records import InstanceRecord
from gateway.registry.store import Conflict, Store, StoreError
from gateway.util.bodies import BodyTooLarge, read_bounded
from gateway.util.tasks import spawn

logger = logging.getLogger(__name__)

__all__ = [
    "AgentGet",
    "FetchSettings",
    "PolicyUnavailable",
    "PortPolicyFetcher",
    "policy_from_info",
]

DEFAULT_POLICY: dict[str, Any] = {"ports": [], "restrict_mode": False}

#: ``get(url, timeout, limit)`` -> (HTTP status, body); raises OSError/TimeoutError.
AgentGet = Callable[[str, float, int], Awaitable[tuple[int, bytes]]]


@dataclass(frozen=True, slots=True)
class FetchSettings:
    """Upstream's ``[core.proxy.port_policy_fetch]`` defaults, plus bounds of our own."""

    agent_port: int = 8090
    timeout: float = 10.0
    max_retries: int = 5
    backoff_initial: float = 1.0
    backoff_max: float = 30.0
    max_concurrent: int = 8
    max_pending: int = 4096
    max_reply: int = 1024 * 1024

    def __post_init__(self) -> None:
        if not 0 < self.agent_port < 65536:
            raise ValueError("agent_port must be 1-65535")
        if self.timeout <= 0 or self.backoff_initial <= 0 or self.backoff_max < 0:
            raise ValueError("timeout and back-off must be positive")
        if self.max_retries < 0 or self.max_concurrent < 1 or self.max_pending < 1:
            raise ValueError("max_retries >= 0, max_concurrent and max_pending >= 1")


class PolicyUnavailable(Exception):
    """The agent's answer gives no usable policy; permanent for this compose hash."""


def policy_from_info(body: bytes, compose_hash_hex: str) -> dict[str, Any]:
    """The port policy from a guest agent's ``Info`` answer, checked against the attested
    compose hash. Pure. Raises :class:`PolicyUnavailable` saying why (never anything else)."""
    try:
        info = json.loads(body)
        tcb_text = info.get("tcb_info") if isinstance(info, dict) else None
        if not isinstance(tcb_text, str):
            raise PolicyUnavailable("the agent's Info has no tcb_info string")
        if not tcb_text:
            raise PolicyUnavailable("the agent does not publish tcb_info (public_tcbinfo is false)")
        tcb = json.loads(tcb_text)
        compose_text = tcb.get("app_compose") if isinstance(tcb, dict) else None
        if not isinstance(compose_text, str):
            raise PolicyUnavailable("tcb_info has no app_compose string")
        raw = compose_text.encode("utf-8")
        try:
            want = bytes.fromhex(compose_hash_hex)
        except ValueError:
            want = b""
        if len(want) != 32 or not hmac.compare_digest(hashlib.sha256(raw).digest(), want):
            raise PolicyUnavailable(
                "app_compose does not hash to the compose hash attested at registration"
            )
        compose = json.loads(raw)
        if not isinstance(compose, dict):
            raise PolicyUnavailable("app_compose is not a JSON object")
        declared = compose.get("port_policy")
        if declared is None:
            return dict(DEFAULT_POLICY)
        return PortPolicy.from_json(declared).to_json()
    except RpcError as exc:
        raise PolicyUnavailable(f"app_compose.port_policy: {exc.message}") from None
    except (ValueError, RecursionError, UnicodeError) as exc:  # JSON, hex, encoding
        raise PolicyUnavailable(f"malformed Info answer: {exc}") from None


async def aiohttp_get(url: str, timeout: float, limit: int) -> tuple[int, bytes]:
    """The default :data:`AgentGet`: one GET, bounded in time and size, no redirects."""
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    try:
        async with (
            aiohttp.ClientSession(timeout=client_timeout) as session,
            session.get(url, allow_redirects=False) as resp,
        ):
            try:
                return resp.status, await read_bounded(resp.content, limit)
            except BodyTooLarge:
                raise OSError(f"answer larger than {limit} bytes") from None
    except aiohttp.ClientError as exc:
        raise OSError(str(exc) or type(exc).__name__) from None


class _Outcome(enum.Enum):
    DONE = "done"
    RETRY = "retry"
    GIVE_UP = "give_up"


class PortPolicyFetcher:
    """Background fetches for instances registered without a port policy (see module doc).

    Use :meth:`schedule` as ``RegistrationService.policy_fetch``; :meth:`close` cancels
    what is still running (at shutdown).
    """

    def __init__(
        self,
        store: Store,
        settings: FetchSettings | None = None,
        *,
        get: AgentGet = aiohttp_get,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.store = store
        self.settings = settings or FetchSettings()
        self._get = get
        self._sleep = sleep
        self._slots = asyncio.Semaphore(self.settings.max_concurrent)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._given_up: dict[str, str] = {}  # instance id -> compose hash it failed for
        self.fetched = 0
        self.failed = 0

    def schedule(self, record: InstanceRecord) -> bool:
        """Start fetching ``record``'s policy in the background; False if not started
        (already running, given up for this compose hash, has a policy, or too many)."""
        iid = record.instance_id
        compose = str(record.evidence.get("compose_hash", ""))
        if record.port_policy is not None or iid in self._tasks:
            return False
        if self._given_up.get(iid) == compose:
            return False
        if len(self._tasks) >= self.settings.max_pending:
            logger.warning(
                "port policy of %s not fetched: %d fetches already waiting", iid, len(self._tasks)
            )
            return False
        task = spawn(self._run(record), name=f"port-policy-{iid[:12]}")
        self._tasks[iid] = task
        task.add_done_callback(functools.partial(self._finished, iid))
        return True

    def _finished(self, instance_id: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(instance_id) is task:
            del self._tasks[instance_id]

    @property
    def pending(self) -> int:
        return len(self._tasks)

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def wait(self) -> None:
        """Until every scheduled fetch finished (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)

    async def _run(self, record: InstanceRecord) -> None:
        s = self.settings
        delay = s.backoff_initial
        reason = ""
        for attempt in range(s.max_retries + 1):
            if attempt:
                await self._sleep(delay)
                delay = min(delay * 2, s.backoff_max)
            async with self._slots:
                outcome, reason = await self._attempt(record.instance_id)
            if outcome is _Outcome.DONE:
                return
            if outcome is _Outcome.GIVE_UP:
                break
            logger.info(
                "port policy of %s: attempt %d failed (%s)", record.instance_id, attempt + 1, reason
            )
        self.failed += 1
        self._remember_failure(record)
        logger.warning(
            "instance %s (app %s) registered without a port policy and none could be read "
            "from its agent (%s): its ports stay closed. Set one with PUT "
            "/api/v1/instances/%s/port-policy, or have the CVM send port_policy",
            record.instance_id,
            record.app_id,
            reason,
            record.instance_id,
        )

    def _remember_failure(self, record: InstanceRecord) -> None:
        if len(self._given_up) >= 4 * self.settings.max_pending:
            self._given_up.clear()  # bounded memory: forget old failures rather than grow
        self._given_up[record.instance_id] = str(record.evidence.get("compose_hash", ""))

    async def _attempt(self, instance_id: str) -> tuple[_Outcome, str]:
        try:
            record = await asyncio.to_thread(self.store.get_instance, instance_id)
        except StoreError as exc:
            return _Outcome.RETRY, f"store: {exc}"
        if record is None or record.port_policy is not None:
            return _Outcome.DONE, "gone or reported meanwhile"
        compose = str(record.evidence.get("compose_hash", ""))
        url = f"http://{record.ip}:{self.settings.agent_port}/prpc/Info?json"
        try:
            status, body = await self._get(url, self.settings.timeout, self.settings.max_reply)
        except (OSError, TimeoutError) as exc:
            return _Outcome.RETRY, f"{url}: {exc or type(exc).__name__}"
        if status != 200:
            kind = _Outcome.RETRY if status == 429 or status >= 500 else _Outcome.GIVE_UP
            return kind, f"{url}: HTTP {status}"
        try:
            policy = policy_from_info(body, compose)
        except PolicyUnavailable as exc:
            return _Outcome.GIVE_UP, str(exc)
        try:
            stored = await asyncio.to_thread(self._store, instance_id, compose, policy)
        except StoreError as exc:
            return _Outcome.RETRY, f"store: {exc}"
        if stored:
            self.fetched += 1
            logger.info(
                "port policy of %s read from its agent (compose hash verified): %s",
                instance_id,
                json.dumps(policy, separators=(",", ":")),
            )
        return _Outcome.DONE, ""

    def _store(self, instance_id: str, compose: str, policy: dict[str, Any]) -> bool:
        """Compare-and-set, only while the record still has no policy and the same app
        version (a re-registration in between bumps the revision: re-read, re-check)."""
        for _ in range(5):
            record = self.store.get_instance(instance_id)
            if record is None or record.port_policy is not None:
                return False
            if str(record.evidence.get("compose_hash", "")) != compose:
                return False  # upgraded meanwhile: this policy belongs to the old version
            try:
                self.store.put_instance(
                    dataclasses.replace(record, port_policy=policy),
                    expect_revision=record.revision,
                )
            except Conflict:
                continue
            return True
        return False
