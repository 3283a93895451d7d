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


@dataclasses.dataclass(frozen=True, slots=True)
class Profile:
    samples: int
    self_time: list[tuple[str, int]]
    inclusive: list[tuple[str, int]]


def _frame_name(frame: str) -> str:
    # py-spy raw frames look like "func (file.py:12)" or "SSL_read (libssl.so.3)"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    if ".py" in where:
        file, _, _line = where.rpartition(":")
        return f"{name} ({Path(file).name})"
    return f"{name} [{Path(where).name}]" if where else name


def parse_collapsed(text: str, top: int = 15) -> Profile:
    """Self and inclusive sample counts per function from py-spy's raw (collapsed) output."""
    self_counts: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        self_counts[frames[-1]] += count
        for name in set(frames):
            incl[name] += count
    return Profile(total, self_counts.most_common(top), incl.most_common(top + 10))


def worker_pid(leader: int) -> int:
    pids = [p for p in procfs.tree_pids(leader) if p != leader]
    if not pids:
        raise RuntimeError("the gateway has no worker process")
    return pids[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__)
    p.add_argument("--scenarios", default="S1,S2r,S3,S4")
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
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
                        "--nonblocking",
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
    lines = [
        f"### {key} ({SCENARIO_BY_KEY[key].title}; {rps:,.0f} req/s while sampled, "
        f"{prof.samples} samples)",
        "",
        "| self % | function | | inclusive % | function |",
        "|---:|---|---|---:|---|",
    ]
    rows = max(len(prof.self_time), len(prof.inclusive))
    for i in range(rows):
        s = prof.self_time[i] if i < len(prof.self_time) else None
        c = prof.inclusive[i] if i < len(prof.inclusive) else None
        lines.append(
            f"| {f'{100 * s[1] / n:.1f}' if s else ''} | {s[0] if s else ''} | "
            f"| {f'{100 * c[1] / n:.1f}' if c else ''} | {c[0] if c else ''} |"
        )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
