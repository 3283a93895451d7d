"""Run wrk and read its results.

wrk's text summary rounds (``1.21GB read``), so a Lua ``done()`` hook prints one exact,
machine-readable line (``BENCH-RESULT key=value ...``); :func:`parse_result_line` reads it.
:func:`parse_text_summary` reads the human summary too, as a cross-check and for runs without
the script.

wrk resolves the URL's host name and sends it as SNI and Host. The proxies route by SNI, so
the bench names must resolve to 127.0.0.1 for wrk only: it runs in a private mount namespace
(``unshare --mount``) with a hosts file bind-mounted over /etc/hosts. Nothing outside that
process sees the change.

wrk keeps one ``SSL`` object per connection slot and resumes TLS sessions on reconnect when
the server issues tickets (see /work/shared/reference/python-tls-performance.md), which is
why S2 is measured against servers with tickets on (resumed) and off (full handshakes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

LUA_DONE = """\
-- benchmarks/wrk.py: one exact, machine-readable result line
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH-RESULT requests=%d bytes=%d duration_us=%d connect_errors=%d read_errors=%d "
      .. "write_errors=%d status_errors=%d timeouts=%d p50_us=%d p99_us=%d max_us=%d\\n",
    summary.requests, summary.bytes, summary.duration, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(99), latency.max))
end
"""


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    bytes: int
    duration_s: float
    errors: int  # connect + read + write + status (>= 400) + timeouts
    p50_ms: float
    p99_ms: float
    error_kinds: str = ""  # e.g. "read=3 status=1": which kinds, for a reader chasing errors

    @property
    def req_per_s(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def mb_per_s(self) -> float:
        """Decimal megabytes (10^6 bytes) per second, response headers included."""
        return self.bytes / 1e6 / self.duration_s if self.duration_s > 0 else 0.0


_RESULT_RE = re.compile(r"^BENCH-RESULT (.*)$", re.MULTILINE)


def parse_result_line(output: str) -> WrkResult:
    """Parse the ``BENCH-RESULT`` line printed by :data:`LUA_DONE`; ValueError if absent."""
    m = _RESULT_RE.search(output)
    if m is None:
        raise ValueError("wrk printed no BENCH-RESULT line:\n" + output[-2000:])
    kv = dict(item.split("=", 1) for item in m.group(1).split())
    n = {k: int(v) for k, v in kv.items()}
    kinds = ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
    errors = sum(n[k] for k in kinds)
    detail = " ".join(f"{k.removesuffix('_errors')}={n[k]}" for k in kinds if n[k])
    return WrkResult(
        requests=n["requests"],
        bytes=n["bytes"],
        duration_s=n["duration_us"] / 1e6,
        errors=errors,
        p50_ms=n["p50_us"] / 1000,
        p99_ms=n["p99_us"] / 1000,
        error_kinds=detail,
    )


_UNITS = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_BYTE_UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}
_TIME_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if m is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _TIME_UNITS[m.group(2)]


def parse_text_summary(output: str) -> WrkResult:
    """Parse wrk's human summary (rounded values; the p99 needs ``--latency``).

    ``N requests in 5.00s, 1.21GB read`` gives requests, duration and bytes (wrk prints
    bytes in binary units); ``Socket errors: connect a, read b, write c, timeout d`` and
    ``Non-2xx or 3xx responses: n`` give the errors.
    """
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m), ([\d.]+)([KMGT]?B) read", output)
    if m is None:
        raise ValueError("no 'requests in' line in wrk output")
    requests = int(m.group(1))
    duration_s = _ms(m.group(2) + m.group(3)) / 1000
    nbytes = int(float(m.group(4)) * _BYTE_UNITS[m.group(5)])
    errors = 0
    s = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if s:
        errors += sum(int(x) for x in s.groups())
    s = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if s:
        errors += int(s.group(1))
    p50 = re.search(r"^\s+50%\s+(\S+)$", output, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+(\S+)$", output, re.MULTILINE)
    return WrkResult(
        requests=requests,
        bytes=nbytes,
        duration_s=duration_s,
        errors=errors,
        p50_ms=_ms(p50.group(1)) if p50 else float("nan"),
        p99_ms=_ms(p99.group(1)) if p99 else float("nan"),
    )


def hosts_file(path: Path, names: list[str]) -> Path:
    """A hosts file mapping ``names`` (and localhost) to 127.0.0.1, for wrk's namespace."""
    lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost"]
    lines += [f"127.0.0.1 {name}" for name in names]
    path.write_text("\n".join(lines) + "\n")
    return path


def wrk_command(
    url: str,
    *,
    script: Path,
    hosts: Path,
    duration_s: float,
    connections: int,
    threads: int = 1,
    close: bool = False,
    cpus: str | None = None,
) -> list[str]:
    """The argv running wrk in a private mount namespace where ``hosts`` is /etc/hosts."""
    wrk = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration_s))}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(script),
    ]
    if close:
        wrk += ["-H", "Connection: close"]
    wrk.append(url)
    if cpus is not None:
        wrk = ["taskset", "-c", cpus, *wrk]
    return [
        "unshare",
        "--mount",
        "sh",
        "-c",
        'mount --bind "$0" /etc/hosts && exec "$@"',
        str(hosts),
        *wrk,
    ]
