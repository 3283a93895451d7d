"""Profile one gateway worker under the benchmark's load with py-spy (a diagnostic, not a bench).

    uv pip install py-spy      # into .venv only; not a project dependency
    .venv/bin/python -m benchmarks.profile --scenarios S1,S2r,S3 --duration 8

Starts the same origin and gateway as ``benchmarks.run`` (one worker, pinned like there),
drives one scenario at a time with wrk and samples the worker with ``py-spy record --native
--format raw`` (on-CPU samples only; C frames from OpenSSL, libc and uvloop included). Prints,
per scenario, the functions with the most self time and the most inclusive time, as shares
of all samples, and writes the collapsed stacks next to the output for flame graphs.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import procfs
from benchmarks.report import SCENARIO_BY_KEY
from benchmarks.run import ROOT, Options, Run, log, raise_nofile, workdir

IDLE_LEAVES = frozenset({"epoll_pwait", "epoll_wait"})  # the worker waiting, not working
SYSCALLS = frozenset(
    {
        "send",
        "recv",
        "read",
        "write",
        "connect",
        "close",
        "socket",
        "accept4",
        "accept",
        "epoll_ctl",
        "setsockopt",
        "getsockopt",
        "shutdown",
        "getpeername",
        "getsockname",
        "syscall",
        "ioctl",
        "fcntl",
        "splice",
        "writev",
        "readv",
        "sendmsg",
        "recvmsg",
    }
)


@dataclasses.dataclass(frozen=True, slots=True)
class Profile:
    samples: int  # on-CPU samples (idle waits in epoll left out)
    idle: int
    categories: list[tuple[str, int]]
    self_time: list[tuple[str, int]]
    inclusive: list[tuple[str, int]]


def _split(frame: str) -> tuple[str, str]:
    # py-spy raw frames: "func (gateway/proxy/conn.py:12)", "SSL_read (libssl.so.3)",
    # "0x7f82... (libcrypto.so.3)" for unsymbolised native code
    name, _, where = frame.partition(" (")
    return name, where.rstrip(")")


def _label(name: str, where: str) -> str:
    if name.startswith("0x"):
        return f"[{where}] (no symbols)"
    if ".py" in where:
        return f"{name} ({Path(where.rpartition(':')[0]).name})"
    return f"{name} [{Path(where).name}]" if where else name


def category(name: str, where: str) -> str:
    """Where a leaf frame's time goes, in the terms of the reference profile."""
    if "libssl" in where or "libcrypto" in where:
        return "OpenSSL (libssl + libcrypto)"
    if "libc.so" in where:
        return "kernel, via syscalls" if name in SYSCALLS else "libc (malloc, free, ...)"
    if name == "gc_collect_main" or "gcmodule" in where:
        return "CPython garbage collector"
    if ".py" in where:
        return "Python code (gateway/*.py)"
    if any(x in where for x in ("loop.c", "core.c", "linux.c", "heap-inl", "uv-common")):
        return "uvloop / libuv"
    return "CPython runtime and C modules (_ssl, socket)"


def parse_collapsed(text: str, top: int = 15) -> Profile:
    """Self, inclusive and per-category sample counts from py-spy's raw (collapsed) output.

    Samples whose innermost frame is the event loop's ``epoll_pwait`` are the worker waiting
    for work; they are counted apart so the shares are of on-CPU time. Frames present in
    nearly every sample (start-up and loop scaffolding) are dropped from the inclusive list.
    """
    self_counts: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    cats: collections.Counter[str] = collections.Counter()
    total = idle = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_split(f) for f in stack.split(";") if f]
        if not frames:
            continue
        if frames[-1][0] in IDLE_LEAVES:
            idle += count
            continue
        total += count
        self_counts[_label(*frames[-1])] += count
        cats[category(*frames[-1])] += count
        for label in {_label(*f) for f in frames}:
            incl[label] += count
    scaffolding = {k for k, v in incl.items() if v >= 0.97 * total}
    inclusive = [(k, v) for k, v in incl.most_common() if k not in scaffolding][:top]
    return Profile(total, idle, cats.most_common(), self_counts.most_common(top), inclusive)


def worker_pid(leader: int) -> int:
    pids = [p for p in procfs.tree_pids(leader) if p != leader]
    if not pids:
        raise RuntimeError("the gateway has no worker process")
    return pids[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__)
    p.add_argument("--scenarios", default="S1,S2r,S3,S4")
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/profile.md")
    a = p.parse_args(argv)
    spy = shutil.which("py-spy") or str(ROOT / ".venv/bin/py-spy")
    if not Path(spy).exists():
        raise SystemExit("py-spy not found: uv pip install py-spy (into .venv only)")
    raise_nofile()
    opts = Options(
        scenarios=tuple(a.scenarios.split(",")),
        servers=("gateway",),
        memory=False,
        memory_conns=0,
        duration=a.duration,
        warmup=1.0,
        rounds=1,
        memory_rounds=0,
        workers=1,
        pin=True,
        output=a.output,
        keep=False,
        python=str(ROOT / ".venv/bin/python"),
    )
    out: list[str] = []
    a.output.parent.mkdir(parents=True, exist_ok=True)
    with workdir(False) as work:
        run = Run(opts, work)
        try:
            run.start_origin()
            target = run.start_server("gateway", tickets=True)
            pid = worker_pid(target.leader)
            for key in opts.scenarios:
                sc = SCENARIO_BY_KEY[key]
                url = run.url(target, sc)
                run.run_wrk(url, sc, 1.0)
                raw = a.output.with_name(f"profile-{key}.txt")
                spy_proc = subprocess.Popen(
                    [
                        spy,
                        "record",
                        "--pid",
                        str(pid),
                        "--native",
                        "--format",
                        "raw",
                        "--rate",
                        str(a.rate),
                        "--duration",
                        str(int(a.duration)),
                        "--output",
                        str(raw),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                time.sleep(0.5)
                res = run.run_wrk(url, sc, a.duration)
                _, err = spy_proc.communicate(timeout=a.duration + 60)
                if spy_proc.returncode != 0 or not raw.exists():
                    out.append(f"### {key}\n\npy-spy failed: {err.strip()[-500:]}\n")
                    continue
                prof = parse_collapsed(raw.read_text())
                log(f"{key}: {res.req_per_s:.0f} req/s, {prof.samples} samples")
                out.append(render(key, prof, res.req_per_s))
        finally:
            run.close()
    a.output.write_text("\n".join(out))
    sys.stdout.write("\n".join(out) + "\n")
    return 0


def render(key: str, prof: Profile, rps: float) -> str:
    n = max(prof.samples, 1)
    busy = 100 * prof.samples / max(prof.samples + prof.idle, 1)
    lines = [
        f"### {key}: {SCENARIO_BY_KEY[key].title}",
        "",
        f"{rps:,.0f} req/s while sampled; {prof.samples} on-CPU samples ({busy:.0f} % of all "
        "samples; the rest is the worker waiting in epoll).",
        "",
        "| on-CPU time by leaf | % |",
        "|---|---:|",
        *[f"| {name} | {100 * c / n:.1f} |" for name, c in prof.categories],
        "",
        "| self % | function | inclusive % | function |",
        "|---:|---|---:|---|",
    ]
    rows = max(len(prof.self_time), len(prof.inclusive))
    for i in range(rows):
        s = prof.self_time[i] if i < len(prof.self_time) else None
        c = prof.inclusive[i] if i < len(prof.inclusive) else None
        lines.append(
            f"| {f'{100 * s[1] / n:.1f}' if s else ''} | {s[0] if s else ''} "
            f"| {f'{100 * c[1] / n:.1f}' if c else ''} | {c[0] if c else ''} |"
        )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
