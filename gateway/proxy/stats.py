"""Per-worker counters, and how the admin API reads them across worker processes.

Each worker owns one :class:`WorkerState` (passed to every connection; no globals). Counters
are plain ints bumped on the event loop thread. Aggregation across processes is deliberately
simple: every ``stats_interval`` seconds (and at exit) a worker writes ``snapshot()`` as JSON to
``<stats_dir>/worker-<index>.json`` (temp file + rename), and :func:`read_stats` sums the
files. The figures are therefore at most one interval old; that is fine for dashboards and
keeps the hot path free of IPC.

TLS handshakes (terminated connections only; passthrough handshakes are the backend's) are
counted where ``conn.py`` finishes or abandons one: ``tls_done`` and ``tls_failed``. The
failure reason is OpenSSL's (``no_shared_cipher``, ``tlsv1_alert_unknown_ca``, ...), ``eof``,
``reset``, ``io_error`` or ``timeout``; OpenSSL's reasons are a fixed set, and the table is
capped anyway (``other`` beyond ``MAX_TLS_REASONS``) so a worker's snapshot stays small.
Per-app open connections (``app_open``) also back the per-app limit. ``upstream_open`` counts
open connections per backend address (a registered instance's tunnel IP, or a static
backend): one Counter increment when a backend accepts and one decrement at close, so the
admin API can show each instance's own connections.
"""

from __future__ import annotations

import json
import os
import ssl
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = [
    "MAX_TLS_REASONS",
    "WorkerState",
    "read_stats",
    "stats_dir_of",
    "tls_failure_reason",
    "write_stats",
]

MAX_TLS_REASONS = 32


def stats_dir_of(data_dir: Path) -> Path:
    """The proxy's run directory under ``core.data_dir``: the workers write their counters
    there and read what the control plane publishes for them (``gateway.proxy.info_file``)."""
    return data_dir / "run" / "proxy"


def tls_failure_reason(exc: BaseException | str) -> str:
    """A short, bounded label for why a handshake failed (never the peer's bytes)."""
    if isinstance(exc, str):
        return exc
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return "eof"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason
        if isinstance(reason, str) and reason.replace("_", "").isalnum() and len(reason) <= 64:
            return reason.lower()
        return "ssl_error"
    if isinstance(exc, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        return "reset"
    return "io_error"


class WorkerState:
    """Counters of one worker process. ``app_open`` also backs the per-app connection limit."""

    __slots__ = (
        "index",
        "pid",
        "accepted",
        "open",
        "closed",
        "bytes_up",
        "bytes_down",
        "terminated",
        "passthrough",
        "gateway",
        "errors",
        "app_open",
        "upstream_open",
        "draining",
        "tls_handshakes",
        "tls_resumed",
        "tls_failures",
    )

    def __init__(self, index: int = 0, pid: int = 0) -> None:
        self.index = index
        self.pid = pid
        self.accepted = 0
        self.open = 0
        self.closed = 0
        self.bytes_up = 0  # client -> backend
        self.bytes_down = 0  # backend -> client
        self.terminated = 0
        self.passthrough = 0
        self.gateway = 0
        self.errors: Counter[str] = Counter()  # close reason (not "done") -> count
        self.app_open: Counter[str] = Counter()
        self.upstream_open: Counter[str] = Counter()  # backend host -> open connections
        self.draining = False
        self.tls_handshakes = 0  # completed, resumed ones included
        self.tls_resumed = 0
        self.tls_failures: Counter[str] = Counter()  # tls_failure_reason -> count

    def error(self, reason: str) -> None:
        self.errors[reason] += 1

    def tls_done(self, resumed: bool) -> None:
        self.tls_handshakes += 1
        if resumed:
            self.tls_resumed += 1

    def tls_failed(self, exc: BaseException | str) -> None:
        reason = tls_failure_reason(exc)
        failures = self.tls_failures
        if reason not in failures and len(failures) >= MAX_TLS_REASONS:
            reason = "other"
        failures[reason] += 1

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy of every counter."""
        return {
            "index": self.index,
            "pid": self.pid,
            "accepted": self.accepted,
            "open": self.open,
            "closed": self.closed,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "terminated": self.terminated,
            "passthrough": self.passthrough,
            "gateway": self.gateway,
            "errors": dict(self.errors),
            "app_open": {k: v for k, v in self.app_open.items() if v},
            "upstream_open": {k: v for k, v in self.upstream_open.items() if v},
            "draining": self.draining,
            "tls_handshakes": self.tls_handshakes,
            "tls_resumed": self.tls_resumed,
            "tls_failures": dict(self.tls_failures),
        }


def write_stats(stats_dir: Path, state: WorkerState) -> None:
    """Write this worker's snapshot atomically; errors are the caller's to log."""
    stats_dir.mkdir(parents=True, exist_ok=True)
    final = stats_dir / f"worker-{state.index}.json"
    tmp = stats_dir / f".worker-{state.index}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(state.snapshot()), encoding="utf-8")
    os.replace(tmp, final)


def read_stats(stats_dir: Path) -> dict[str, Any]:
    """Sum every worker's last snapshot: totals plus the per-worker list."""
    workers: list[dict[str, Any]] = []
    for path in sorted(stats_dir.glob("worker-*.json")):
        try:
            workers.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue  # replaced between glob and read, or a torn legacy file
    total: dict[str, Any] = {"workers": workers}
    for key in (
        "accepted",
        "open",
        "closed",
        "bytes_up",
        "bytes_down",
        "terminated",
        "passthrough",
        "gateway",
        "tls_handshakes",
        "tls_resumed",
    ):
        total[key] = sum(int(w.get(key, 0)) for w in workers)
    for key in ("errors", "app_open", "upstream_open", "tls_failures"):
        summed: Counter[str] = Counter()
        for w in workers:
            summed.update(w.get(key, {}))
        total[key] = {k: v for k, v in summed.items() if v}
    return total
