"""Turn measured cells into medians, ratios to nginx and PASS/MISS per target (no I/O).

A cell is one (server, scenario, round). Throughput is req/s (S1, S2, S5) or MB/s (S3, S4);
CPU per unit is the server's own utime+stime per request or per MB (µs). Ratios are
gateway ÷ nginx of the medians over rounds, measured in the same run. "Spread" is
(max − min) ÷ median over rounds, so a reader can tell a real gap from noise.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass

NGINX = "nginx"
GATEWAY = "gateway"


@dataclass(frozen=True, slots=True)
class Scenario:
    key: str
    title: str
    mode: str  # "terminate" | "passthrough"
    path: str  # "/small" | "/1m"
    close: bool  # one request per connection
    tickets: bool  # servers issue session tickets
    connections: int
    unit: str  # "req/s" | "MB/s"
    min_throughput: float  # target, ratio to nginx
    max_cpu: float  # target, ratio to nginx


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "S1",
        "terminate, keep-alive, 100 B",
        "terminate",
        "/small",
        False,
        True,
        50,
        "req/s",
        0.9,
        1.5,
    ),
    Scenario(
        "S2r",
        "terminate, new TLS connection per request, resumed",
        "terminate",
        "/small",
        True,
        True,
        50,
        "req/s",
        0.7,
        1.5,
    ),
    Scenario(
        "S2f",
        "terminate, new TLS connection per request, full handshake",
        "terminate",
        "/small",
        True,
        False,
        50,
        "req/s",
        0.7,
        1.5,
    ),
    Scenario(
        "S3", "terminate, 1 MiB downloads", "terminate", "/1m", False, True, 10, "MB/s", 1.0, 1.5
    ),
    Scenario(
        "S4",
        "passthrough, 1 MiB downloads",
        "passthrough",
        "/1m",
        False,
        True,
        10,
        "MB/s",
        1.0,
        1.0,
    ),
    Scenario(
        "S5",
        "passthrough, keep-alive, 100 B",
        "passthrough",
        "/small",
        False,
        True,
        50,
        "req/s",
        0.9,
        1.5,
    ),
)
SCENARIO_BY_KEY = {s.key: s for s in SCENARIOS}
MEMORY_KEY = "MEM"
MEMORY_TARGET = 1.5


@dataclass(frozen=True, slots=True)
class Cell:
    """One measurement of one server in one scenario and round."""

    server: str
    scenario: str
    round: int
    requests: int
    bytes: int
    duration_s: float
    errors: int
    p99_ms: float
    cpu_s: float
    origin_cpu_s: float = 0.0  # the origin's CPU in the same interval (diagnosis only)
    machine_busy: tuple[float, ...] = ()  # per CPU, busy fraction (everyone's work, incl. steal)
    error_kinds: str = ""

    @property
    def throughput(self) -> float:
        sc = SCENARIO_BY_KEY[self.scenario]
        if self.duration_s <= 0:
            return 0.0
        if sc.unit == "MB/s":
            return self.bytes / 1e6 / self.duration_s
        return self.requests / self.duration_s

    @property
    def cpu_per_unit(self) -> float:
        """µs per request (req/s scenarios) or per MB (MB/s scenarios); NaN without work."""
        sc = SCENARIO_BY_KEY[self.scenario]
        if sc.unit == "MB/s":
            return self.cpu_s * 1e6 / (self.bytes / 1e6) if self.bytes else math.nan
        return self.cpu_s * 1e6 / self.requests if self.requests else math.nan

    @property
    def cpu_share(self) -> float:
        """The server's CPU use during the cell, in cores (1.0 = one core busy)."""
        return self.cpu_s / self.duration_s if self.duration_s > 0 else 0.0


@dataclass(frozen=True, slots=True)
class MemoryCell:
    server: str
    round: int
    connections: int  # idle TLS connections actually open
    failed: int
    rss_delta: int  # bytes, summed over the server's processes
    pss_delta: int

    @property
    def kib_per_conn(self) -> float:
        return self.pss_delta / 1024 / self.connections if self.connections else math.nan


@dataclass(frozen=True, slots=True)
class Summary:
    server: str
    scenario: str
    throughput: float
    spread: float
    p99_ms: float
    cpu_per_unit: float
    cpu_share: float
    errors: int
    requests: int
    rounds: int
    error_kinds: tuple[str, ...] = ()  # e.g. ("read",): which wrk counters the errors are in

    @property
    def valid(self) -> bool:
        """At most 1 % of the requests failed (wrk counts errors and non-2xx/3xx)."""
        return self.errors <= 0.01 * max(self.requests, 1)


def _median(values: list[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return statistics.median(vals) if vals else math.nan


def _spread(values: list[float]) -> float:
    med = _median(values)
    if not values or not med or math.isnan(med):
        return math.nan
    return (max(values) - min(values)) / med


def summarize(cells: list[Cell]) -> dict[tuple[str, str], Summary]:
    groups: dict[tuple[str, str], list[Cell]] = {}
    for c in cells:
        groups.setdefault((c.server, c.scenario), []).append(c)
    out: dict[tuple[str, str], Summary] = {}
    for key, group in groups.items():
        thr = [c.throughput for c in group]
        out[key] = Summary(
            server=key[0],
            scenario=key[1],
            throughput=_median(thr),
            spread=_spread(thr),
            p99_ms=_median([c.p99_ms for c in group]),
            cpu_per_unit=_median([c.cpu_per_unit for c in group]),
            cpu_share=_median([c.cpu_share for c in group]),
            errors=sum(c.errors for c in group),
            requests=sum(c.requests for c in group),
            rounds=len(group),
            error_kinds=tuple(
                sorted({k.split("=")[0] for c in group for k in c.error_kinds.split()})
            ),
        )
    return out


def summarize_memory(cells: list[MemoryCell]) -> dict[str, MemoryCell]:
    """Per server, the round with the median PSS growth."""
    groups: dict[str, list[MemoryCell]] = {}
    for c in cells:
        groups.setdefault(c.server, []).append(c)
    out: dict[str, MemoryCell] = {}
    for server, group in groups.items():
        ordered = sorted(group, key=lambda c: c.pss_delta)
        out[server] = ordered[(len(ordered) - 1) // 2]
    return out


@dataclass(frozen=True, slots=True)
class Verdict:
    what: str  # "S1 throughput", ...
    ratio: float
    target: str  # ">= 0.9" / "<= 1.5"
    ok: bool | None  # None: not measured


def _verdict(what: str, ratio: float, bound: float, at_least: bool) -> Verdict:
    target = f"{'>=' if at_least else '<='} {bound:g}"
    if math.isnan(ratio):
        return Verdict(what, ratio, target, None)
    return Verdict(what, ratio, target, ratio >= bound if at_least else ratio <= bound)


def ratio(a: float, b: float) -> float:
    if math.isnan(a) or math.isnan(b) or b == 0:
        return math.nan
    return a / b


def verdicts(
    summaries: dict[tuple[str, str], Summary],
    memory: dict[str, MemoryCell],
    server: str = GATEWAY,
) -> list[Verdict]:
    """The issue's targets for ``server`` against nginx, in scenario order."""
    out: list[Verdict] = []
    for sc in SCENARIOS:
        ours, ref = summaries.get((server, sc.key)), summaries.get((NGINX, sc.key))
        if ref is None:
            continue
        thr = ratio(ours.throughput, ref.throughput) if ours else math.nan
        cpu = ratio(ours.cpu_per_unit, ref.cpu_per_unit) if ours else math.nan
        v_thr = _verdict(f"{sc.key} throughput", thr, sc.min_throughput, True)
        v_cpu = _verdict(f"{sc.key} CPU per unit", cpu, sc.max_cpu, False)
        if ours is not None and not (ours.valid and ref.valid):
            # failed requests make both numbers meaningless: never a PASS
            v_thr = dataclasses.replace(v_thr, ok=False, target=v_thr.target + " (errors)")
            v_cpu = dataclasses.replace(v_cpu, ok=False, target=v_cpu.target + " (errors)")
        out += [v_thr, v_cpu]
    if NGINX in memory:
        ours_mem = memory.get(server)
        mem = ratio(ours_mem.kib_per_conn, memory[NGINX].kib_per_conn) if ours_mem else math.nan
        out.append(_verdict("idle memory", mem, MEMORY_TARGET, False))
    return out


def _fmt(value: float, digits: int = 2) -> str:
    if math.isnan(value):
        return "–"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}f}"


def _mark(v: Verdict | None) -> str:
    if v is None or v.ok is None:
        return "pending"
    return "PASS" if v.ok else "MISS"


def markdown(
    summaries: dict[tuple[str, str], Summary],
    memory: dict[str, MemoryCell],
    servers: list[str],
    scenarios: list[str],
) -> str:
    """The results as Markdown: one table per scenario, memory, and the gateway's verdicts."""
    lines: list[str] = []
    for key in scenarios:
        sc = SCENARIO_BY_KEY[key]
        cpu_unit = "CPU µs/MB" if sc.unit == "MB/s" else "CPU µs/req"
        lines += [
            f"**{sc.key}** {sc.title} (wrk -c{sc.connections}, {sc.unit})",
            "",
            f"| server | {sc.unit} | spread | p99 ms | {cpu_unit} | CPU cores "
            f"| throughput vs nginx | CPU/unit vs nginx | errors |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        ref = summaries.get((NGINX, key))
        for server in servers:
            s = summaries.get((server, key))
            if s is None:
                lines.append(f"| {server} | pending | | | | | | | |")
                continue
            thr = ratio(s.throughput, ref.throughput) if ref else math.nan
            cpu = ratio(s.cpu_per_unit, ref.cpu_per_unit) if ref else math.nan
            errs = f"{s.errors} ({', '.join(s.error_kinds)})" if s.error_kinds else str(s.errors)
            lines.append(
                f"| {server} | {_fmt(s.throughput, 1)} | {_fmt(s.spread * 100, 0)} % "
                f"| {_fmt(s.p99_ms)} | {_fmt(s.cpu_per_unit, 1)} | {_fmt(s.cpu_share)} "
                f"| {_fmt(thr)}x | {_fmt(cpu)}x | {errs} |"
            )
        lines.append("")
    if memory:
        lines += [
            "**MEM** idle TLS connections (terminate port, handshake done, no request); "
            "ratio per connection",
            "",
            "| server | connections | failed | PSS growth MB | RSS growth MB | KiB/conn "
            "| vs nginx |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        ref_mem = memory.get(NGINX)
        for server in servers:
            m = memory.get(server)
            if m is None:
                why = "n/a (no proxy)" if server == "direct" else "pending"
                lines.append(f"| {server} | {why} | | | | | |")
                continue
            rel = ratio(m.kib_per_conn, ref_mem.kib_per_conn) if ref_mem else math.nan
            lines.append(
                f"| {server} | {m.connections} | {m.failed} | {_fmt(m.pss_delta / 1e6, 1)} "
                f"| {_fmt(m.rss_delta / 1e6, 1)} | {_fmt(m.kib_per_conn, 1)} | {_fmt(rel)}x |"
            )
        lines.append("")
    vs = verdicts(summaries, memory)
    if vs:
        lines += ["**Targets** (gateway ÷ nginx, same run)", ""]
        lines += ["| target | ratio | bound | result |", "|---|---:|---:|---|"]
        for v in vs:
            lines.append(f"| {v.what} | {_fmt(v.ratio)}x | {v.target} | {_mark(v)} |")
        lines.append("")
    return "\n".join(lines)
