"""Per-process accounting from /proc: CPU time and memory of a server and all its workers.

A server under test is started in its own session, so its process group id equals the
leader's PID; workers (nginx workers, forked or spawned gateway workers) inherit the group.
Processes that start their own session are still found by walking the parent links, so the
set is "the group plus every descendant of the leader".

CPU time is what the processes themselves were charged (utime + stime of every thread, from
``/proc/PID/stat``), so it does not depend on what else runs on the machine; the load
generator's and other users' CPU is never counted against a proxy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class ProcStat:
    """The fields of ``/proc/PID/stat`` we use (times in clock ticks)."""

    pid: int
    ppid: int
    pgrp: int
    utime: int
    stime: int


def parse_stat(text: str) -> ProcStat:
    """Parse one ``/proc/PID/stat`` line.

    The command name (field 2) is in parentheses and may itself contain spaces and ')', so
    the remaining fields are split after the LAST ')'. Raises ValueError on a malformed line.
    """
    head, sep, rest = text.rpartition(")")
    if not sep:
        raise ValueError(f"not a /proc/PID/stat line: {text[:80]!r}")
    pid = int(head.split("(", 1)[0])
    fields = rest.split()
    # rest starts at field 3 (state); field n is fields[n - 3]
    return ProcStat(
        pid=pid,
        ppid=int(fields[1]),
        pgrp=int(fields[2]),
        utime=int(fields[11]),
        stime=int(fields[12]),
    )


def _all_stats(proc: Path = PROC) -> list[ProcStat]:
    stats: list[ProcStat] = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stats.append(parse_stat((entry / "stat").read_text()))
        except (OSError, ValueError):
            continue  # exited while we were reading
    return stats


def select_tree(stats: list[ProcStat], leader: int) -> list[ProcStat]:
    """The processes in ``leader``'s process group plus all descendants of ``leader``."""
    children: dict[int, list[ProcStat]] = {}
    for st in stats:
        children.setdefault(st.ppid, []).append(st)
    chosen = {st.pid: st for st in stats if st.pgrp == leader or st.pid == leader}
    todo = [leader]
    while todo:
        for child in children.get(todo.pop(), []):
            if child.pid not in chosen:
                chosen[child.pid] = child
            todo.append(child.pid)
    return sorted(chosen.values(), key=lambda s: s.pid)


def tree_pids(leader: int, proc: Path = PROC) -> list[int]:
    return [st.pid for st in select_tree(_all_stats(proc), leader)]


def cpu_seconds(leader: int, proc: Path = PROC) -> float:
    """utime + stime, in seconds, summed over ``leader``'s group and descendants (alive now)."""
    ticks = sum(st.utime + st.stime for st in select_tree(_all_stats(proc), leader))
    return ticks / CLK_TCK


@dataclass(frozen=True, slots=True)
class Memory:
    """Summed over a process tree, in bytes. PSS splits shared pages among their users."""

    rss: int
    pss: int


def parse_smaps_rollup(text: str) -> Memory:
    """Rss and Pss (kB in the file) from ``/proc/PID/smaps_rollup``, in bytes."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] in ("Rss:", "Pss:") and parts[2] == "kB":
            values[parts[0]] = int(parts[1]) * 1024
    if "Rss:" not in values or "Pss:" not in values:
        raise ValueError("smaps_rollup without Rss/Pss lines")
    return Memory(rss=values["Rss:"], pss=values["Pss:"])


def memory(leader: int, proc: Path = PROC) -> Memory:
    rss = pss = 0
    for pid in tree_pids(leader, proc):
        try:
            m = parse_smaps_rollup((proc / str(pid) / "smaps_rollup").read_text())
        except (OSError, ValueError):
            continue
        rss += m.rss
        pss += m.pss
    return Memory(rss=rss, pss=pss)


def busy_fractions(
    before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]
) -> tuple[float, ...]:
    """Busy fraction of cpu0, cpu1, ... between two :func:`cpu_busy_ticks` samples."""
    out: list[float] = []
    i = 0
    while f"cpu{i}" in after and f"cpu{i}" in before:
        (b0, t0), (b1, t1) = before[f"cpu{i}"], after[f"cpu{i}"]
        out.append((b1 - b0) / (t1 - t0) if t1 > t0 else 0.0)
        i += 1
    return tuple(out)


def cpu_busy_ticks(proc: Path = PROC) -> dict[str, tuple[int, int]]:
    """Per CPU line of /proc/stat: (busy ticks, total ticks); steal counts as busy."""
    out: dict[str, tuple[int, int]] = {}
    for line in (proc / "stat").read_text().splitlines():
        if not line.startswith("cpu"):
            continue
        name, *vals = line.split()
        nums = [int(v) for v in vals]
        idle = nums[3] + (nums[4] if len(nums) > 4 else 0)
        total = sum(nums[:8])
        out[name] = (total - idle, total)
    return out
