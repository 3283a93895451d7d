"""Readiness: the named conditions a control process needs before it should get traffic.

``GET /ready`` used to answer 200 as soon as the admin listener was up, which says nothing
(it could not answer otherwise). A :class:`Readiness` holds two kinds of condition:

* *milestones* (:meth:`require` then :meth:`mark`): start-up steps that happen once, e.g.
  ``certbot`` started, ``peers_restored`` (the WireGuard peers re-applied from the store),
  ``registration_rpc`` (its listener bound). The one who owns the step marks it; until then
  the probe says what is still pending.
* *live checks* (:meth:`check`): a function asked on every probe, e.g. "the store answers a
  query", returning None when fine or a short reason when not.

The report is JSON-ready: ``{"ready": bool, "checks": {name: {"ready": bool, "detail":
str}}}``; the admin API answers 200 or 503 with it. Nothing here is global; the control
plane owns one and hands it to whoever completes a step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["Readiness", "ReadinessReport", "store_check"]

LiveCheck = Callable[[], str | None]


@dataclass(frozen=True, slots=True)
class ReadinessReport:
    ready: bool
    checks: dict[str, dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "not_ready": [k for k, v in self.checks.items() if not v["ready"]],
            "checks": self.checks,
        }


@dataclass
class Readiness:
    """Milestones still pending (name -> what it waits for), done ones, and live checks."""

    _pending: dict[str, str] = field(default_factory=dict)
    _done: set[str] = field(default_factory=set)
    _live: dict[str, LiveCheck] = field(default_factory=dict)

    def require(self, name: str, waiting_for: str) -> None:
        """Add a milestone; not ready until :meth:`mark` (``waiting_for`` is shown till then)."""
        if name not in self._done:
            self._pending[name] = waiting_for

    def mark(self, name: str) -> None:
        """The milestone ``name`` is reached (marking one never required is allowed)."""
        if self._pending.pop(name, None) is not None:
            logger.info("ready: %s", name)
        self._done.add(name)

    def unmark(self, name: str, why: str) -> None:
        """``name`` is lost again (e.g. a listener closed): not ready, saying ``why``."""
        self._done.discard(name)
        self._pending[name] = why

    def check(self, name: str, fn: LiveCheck) -> None:
        """A condition evaluated on every probe: ``fn()`` is None when fine, else why not."""
        self._live[name] = fn

    def report(self) -> ReadinessReport:
        checks: dict[str, dict[str, Any]] = {}
        for name in sorted(self._done):
            checks[name] = {"ready": True, "detail": "done"}
        for name, waiting in sorted(self._pending.items()):
            checks[name] = {"ready": False, "detail": waiting}
        for name, fn in sorted(self._live.items()):
            try:
                problem = fn()
            except Exception as exc:  # a probe must answer, not raise
                problem = f"check failed: {type(exc).__name__}: {exc}"
            checks[name] = {"ready": problem is None, "detail": problem or "ok"}
        return ReadinessReport(all(c["ready"] for c in checks.values()), checks)


def store_check(store: Any) -> LiveCheck:
    """Live check: the registry store answers a query (a closed or broken one does not)."""

    def check() -> str | None:
        try:
            store.revision()
        except Exception as exc:
            return f"the registry store does not answer: {type(exc).__name__}: {exc}"
        return None

    return check
