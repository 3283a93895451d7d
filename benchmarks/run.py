"""One command: the gateway, nginx, HAProxy and a direct-to-origin baseline, same run, same box.

    .venv/bin/python -m benchmarks.run            # full run (about 10 minutes)
    .venv/bin/python -m benchmarks.run --quick    # smoke check (1 round, 2 s cells)

Everything listens on 127.0.0.1 with kernel-chosen ports in a temporary directory: a test CA
and ECDSA P-256 wildcard certificate, an origin nginx (plain HTTP for terminate, TLS with its
own certificate for passthrough and the direct baseline), nginx (http terminate + stream
ssl_preread passthrough), HAProxy (mode http terminate + req.ssl_sni passthrough) and
``python -m gateway serve``. wrk drives each scenario; servers are interleaved per scenario
and the order is reversed every other round. Each server's CPU is the utime+stime of its
whole process tree (from /proc) before and after a cell; memory is the PSS growth of that
tree with 10 000 idle TLS connections open.

Pinning (default with one worker on a machine with two or more CPUs): every proxy on CPU 0,
the load generator and the origin on CPU 1, so a proxy never shares its core with the client
that drives it. With ``--workers 2`` nothing is pinned.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from benchmarks import configs, gateway_cfg, procfs, report, wrk
from benchmarks.report import SCENARIO_BY_KEY, SCENARIOS, Cell, MemoryCell, Scenario
from benchmarks.servers import Child, ServerError, Target, free_port, pinned, probe, start, stop
from benchmarks.servers import wait_listening as _wait
from benchmarks.tls import Pki, make_pki

ALL_SERVERS = ("nginx", "haproxy", "gateway", "direct")
# Optional variants, run only when named in --servers.
EXTRA_SERVERS = ("gateway-nosplice",)  # the gateway with proxy.splice_after = -1
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "latest.md"


def nofile_limit() -> int:
    """The descriptor limit every child inherits (raised to the hard limit at start-up).

    In a container the hard limit may be fixed (here: 20 000, without the right to raise
    it), which bounds the idle-connection cell: an L4 relay holds two descriptors per client.
    """
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def memory_cap(nofile: int) -> int:
    """Idle connections every server can hold: two descriptors each, minus a reserve."""
    return (nofile - 2000) // 2


def log(msg: str) -> None:
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


@dataclasses.dataclass(frozen=True, slots=True)
class Options:
    scenarios: tuple[str, ...]
    servers: tuple[str, ...]
    memory: bool
    memory_conns: int
    duration: float
    warmup: float
    rounds: int
    memory_rounds: int
    workers: int
    pin: bool
    output: Path
    keep: bool
    python: str


@dataclasses.dataclass(frozen=True, slots=True)
class Cpus:
    proxy: str | None
    load: str | None


def machine_info(python: str) -> dict[str, str]:
    """What the results depend on: CPUs, kernel, and the versions of every program used."""

    def first_line(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return "missing"
        text = (out.stdout or out.stderr).strip()
        return text.splitlines()[0] if text else "unknown"

    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    libs = first_line(
        [
            python,
            "-c",
            "import ssl, sys, uvloop; print(sys.version.split()[0], "
            "'uvloop', uvloop.__version__, ssl.OPENSSL_VERSION)",
        ]
    )
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "nginx": first_line(["nginx", "-v"]),
        "haproxy": first_line(["haproxy", "-v"]),
        "wrk": first_line(["wrk", "-v"]),
        "python": libs,
        "openssl": first_line(["openssl", "version"]),
        "load average": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }


def stream_module() -> Path:
    for candidate in (
        Path("/usr/lib/nginx/modules/ngx_stream_module.so"),
        Path("/usr/share/nginx/modules/ngx_stream_module.so"),
    ):
        if candidate.exists():
            return candidate
    raise SystemExit(
        "nginx's stream module is missing: apt-get install libnginx-mod-stream "
        "(listed in scripts/apt-packages.txt)"
    )


def gateway_available(python: str) -> bool:
    out = subprocess.run(
        [python, "-m", "gateway", "serve", "--help"], capture_output=True, timeout=60, cwd=ROOT
    )
    return out.returncode == 0


class Run:
    """One benchmark run: its temp dir, PKI, origin, and the servers under test."""

    def __init__(self, opts: Options, work: Path) -> None:
        self.opts = opts
        self.work = work
        multi = (os.cpu_count() or 1) >= 2
        pin = opts.pin and multi and opts.workers == 1
        self.cpus = Cpus(proxy="0", load="1") if pin else Cpus(proxy=None, load=None)
        # what the servers are sized for: the limit, but not more than ~3 x 10 000 idle conns
        self.nofile = min(nofile_limit(), 32768)
        self.origin_ports = configs.OriginPorts(
            http=free_port(), tls=free_port(), tls_no_tickets=free_port()
        )
        self.names = gateway_cfg.names_for(self.origin_ports)
        self.pki: Pki = make_pki(work, self.names.domain)
        self.gateway_certs = gateway_cfg.install_cert(work / "gateway-certs", self.pki.proxy)
        self.hosts = wrk.hosts_file(work / "hosts", [self.names.term_host, self.names.pass_host])
        self.script = work / "result.lua"
        self.script.write_text(wrk.LUA_DONE)
        www = work / "www"
        www.mkdir()
        (www / configs.LARGE_PATH.lstrip("/")).write_bytes(os.urandom(configs.LARGE_SIZE))
        self.www = www
        self.origin: Child | None = None
        self.children: list[Child] = []
        self.cells: list[Cell] = []
        self.memory: list[MemoryCell] = []
        self.probes: dict[str, str] = {}
        self.notes: list[str] = []

    # -- servers ------------------------------------------------------------------------

    def start_origin(self) -> None:
        conf = self.work / "origin.conf"
        conf.write_text(
            configs.origin_nginx(
                self.work, self.origin_ports, self.pki.origin, self.www, nofile=self.nofile
            )
        )
        cmd = pinned(
            ["nginx", "-p", str(self.work), "-c", str(conf), "-e", str(self.work / "origin.err")],
            self.cpus.load,
        )
        self.origin = start("origin", cmd, self.work / "origin.log")
        o = self.origin_ports
        _wait(self.origin, [o.http, o.tls, o.tls_no_tickets])

    def start_server(self, name: str, tickets: bool) -> Target:
        tag = f"{name}-{'t' if tickets else 'nt'}"
        w = self.opts.workers
        if name == "direct":
            assert self.origin is not None
            o = self.origin_ports
            port = o.tls if tickets else o.tls_no_tickets
            return Target(name, self.origin.proc.pid, port, o.tls, self.origin)
        if name == "nginx":
            term, pas = free_port(), free_port()
            conf = self.work / f"{tag}.conf"
            conf.write_text(
                configs.nginx_proxy(
                    self.work,
                    names=self.names,
                    term_port=term,
                    pass_port=pas,
                    origin=self.origin_ports,
                    cert=self.pki.proxy,
                    stream_module=stream_module(),
                    workers=w,
                    tickets=tickets,
                    nofile=self.nofile,
                )
            )
            cmd = [
                "nginx",
                "-p",
                str(self.work),
                "-c",
                str(conf),
                "-e",
                str(self.work / f"{tag}.err"),
            ]
        elif name == "haproxy":
            term, pas = free_port(), free_port()
            conf = self.work / f"{tag}.cfg"
            conf.write_text(
                configs.haproxy(
                    names=self.names,
                    term_port=term,
                    pass_port=pas,
                    origin=self.origin_ports,
                    cert=self.pki.proxy,
                    workers=w,
                    tickets=tickets,
                    nofile=self.nofile,
                )
            )
            cmd = ["haproxy", "-db", "-f", str(conf)]
        elif name in ("gateway", "gateway-nosplice"):
            term = pas = free_port()
            conf = self.work / f"{tag}.toml"
            conf.write_text(
                gateway_cfg.config_toml(
                    data_dir=self.work / f"{tag}-data",
                    certs_dir=self.gateway_certs,
                    port=term,
                    workers=w,
                    tickets=tickets,
                    splice=name == "gateway",
                )
            )
            cmd = [self.opts.python, "-m", "gateway", "serve", "--config", str(conf)]
        else:
            raise ValueError(f"unknown server {name!r}")
        child = start(tag, pinned(cmd, self.cpus.proxy), self.work / f"{tag}.log", cwd=ROOT)
        self.children.append(child)
        try:
            _wait(child, sorted({term, pas}), timeout=30)
        except ServerError:
            stop(child)
            raise
        return Target(name, child.proc.pid, term, pas, child)

    def stop_servers(self) -> None:
        for child in self.children:
            stop(child)
        self.children.clear()

    # -- cells --------------------------------------------------------------------------

    def url(self, target: Target, sc: Scenario) -> str:
        if sc.mode == "terminate":
            return f"https://{self.names.term_host}:{target.term_port}{sc.path}"
        return f"https://{self.names.pass_host}:{target.pass_port}{sc.path}"

    def run_wrk(self, url: str, sc: Scenario, duration: float) -> wrk.WrkResult:
        cmd = wrk.wrk_command(
            url,
            script=self.script,
            hosts=self.hosts,
            duration_s=duration,
            connections=sc.connections,
            close=sc.close,
            cpus=self.cpus.load,
        )
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
        if out.returncode != 0:
            raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr.strip()[-500:]}")
        return wrk.parse_result_line(out.stdout)

    def cell(self, target: Target, sc: Scenario, rnd: int) -> None:
        url = self.url(target, sc)
        if self.opts.warmup > 0:
            self.run_wrk(url, sc, self.opts.warmup)
        assert self.origin is not None
        origin_pid = self.origin.proc.pid
        before, origin_before = procfs.cpu_seconds(target.leader), procfs.cpu_seconds(origin_pid)
        busy_before = procfs.cpu_busy_ticks()
        res = self.run_wrk(url, sc, self.opts.duration)
        busy = procfs.busy_fractions(busy_before, procfs.cpu_busy_ticks())
        cpu = procfs.cpu_seconds(target.leader) - before
        origin_cpu = procfs.cpu_seconds(origin_pid) - origin_before
        if not target.child.alive():
            raise ServerError(f"{target.name} died during {sc.key}:\n{target.child.tail()}")
        c = Cell(
            server=target.name,
            scenario=sc.key,
            round=rnd,
            requests=res.requests,
            bytes=res.bytes,
            duration_s=res.duration_s,
            errors=res.errors,
            p99_ms=res.p99_ms,
            cpu_s=cpu,
            origin_cpu_s=origin_cpu,
            machine_busy=busy,
            error_kinds=res.error_kinds,
        )
        self.cells.append(c)
        unit = "µs/MB" if sc.unit == "MB/s" else "µs/req"
        log(
            f"r{rnd} {sc.key:<3} {target.name:<16} {c.throughput:>10.1f} {sc.unit:<5} "
            f"p99 {c.p99_ms:7.2f} ms  cpu {c.cpu_per_unit:8.1f} {unit} "
            f"({c.cpu_share:.2f} cores, origin {origin_cpu / c.duration_s:.2f}, busy "
            f"{'/'.join(f'{b:.2f}' for b in busy)})  errors {c.errors} {c.error_kinds}"
        )

    def memory_cell(self, target: Target, rnd: int) -> None:
        base = procfs.memory(target.leader)
        cmd = pinned(
            [
                self.opts.python,
                "-m",
                "benchmarks.idle",
                "--port",
                str(target.term_port),
                "--sni",
                self.names.term_host,
                "--count",
                str(self.opts.memory_conns),
            ],
            self.cpus.load,
        )
        client = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            start_new_session=True,
        )
        try:
            assert client.stdout is not None and client.stdin is not None
            line = client.stdout.readline().split()
            if len(line) != 3 or line[0] != "READY":
                raise RuntimeError(f"idle client failed: {line}")
            opened, failed = int(line[1]), int(line[2])
            time.sleep(1.0)  # let the server finish its side of the last handshakes
            held = procfs.memory(target.leader)
            client.stdin.close()
            client.wait(timeout=60)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
            if client.stdout is not None:
                client.stdout.close()
        m = MemoryCell(
            server=target.name,
            round=rnd,
            connections=opened,
            failed=failed,
            rss_delta=held.rss - base.rss,
            pss_delta=held.pss - base.pss,
        )
        self.memory.append(m)
        log(
            f"r{rnd} MEM {target.name:<16} {opened} open ({failed} failed): "
            f"PSS +{m.pss_delta / 1e6:.1f} MB, RSS +{m.rss_delta / 1e6:.1f} MB, "
            f"{m.kib_per_conn:.1f} KiB/conn"
        )
        time.sleep(1.0)  # let the server tear the connections down

    # -- the whole run ------------------------------------------------------------------

    def servers_available(self) -> list[str]:
        names = list(self.opts.servers)
        gateways = [n for n in names if n.startswith("gateway")]
        if gateways and not gateway_available(self.opts.python):
            self.notes.append("gateway: `python -m gateway serve` is not available yet (pending)")
            log("gateway serve not available; its column stays pending")
            names = [n for n in names if n not in gateways]
        return names

    def execute(self) -> None:
        self.start_origin()
        names = self.servers_available()
        keys = self.opts.scenarios
        groups = [
            (True, [s for s in keys if SCENARIO_BY_KEY[s].tickets]),
            (False, [s for s in keys if not SCENARIO_BY_KEY[s].tickets]),
        ]
        for tickets, group in groups:
            if not group:
                continue
            targets = self.start_targets(names, tickets)
            try:
                for rnd in range(1, self.opts.rounds + 1):
                    order = targets if rnd % 2 else list(reversed(targets))
                    for key in group:
                        for target in order:
                            self.try_cell(target, SCENARIO_BY_KEY[key], rnd)
            finally:
                self.stop_servers()
        if self.opts.memory:
            self.memory_phase([n for n in names if n != "direct"])

    def memory_phase(self, names: list[str]) -> None:
        """Idle-connection memory, each time on a freshly started server.

        A server that already held thousands of connections keeps its grown heap (allocators
        rarely return memory), so a second measurement on the same process shows almost no
        growth. The direct baseline is left out: it has no proxy, its row would be the
        origin's own memory after all the other cells.
        """
        for rnd in range(1, self.opts.memory_rounds + 1):
            order = names if rnd % 2 else list(reversed(names))
            for name in order:
                targets = self.start_targets([name], tickets=True, quiet=True)
                try:
                    for target in targets:
                        self.try_memory(target, rnd)
                finally:
                    self.stop_servers()

    def start_targets(self, names: list[str], tickets: bool, quiet: bool = False) -> list[Target]:
        targets: list[Target] = []
        for name in names:
            try:
                target = self.start_server(name, tickets)
            except (ServerError, OSError, ValueError) as exc:
                self.notes.append(
                    f"{name} (tickets {'on' if tickets else 'off'}) did not start: "
                    f"{str(exc).splitlines()[0]}"
                )
                log(f"{name} did not start: {exc}")
                continue
            checks = []
            for mode, port, host in (
                ("terminate", target.term_port, self.names.term_host),
                ("passthrough", target.pass_port, self.names.pass_host),
            ):
                try:
                    p = probe(port, host, configs.SMALL_PATH)
                    checks.append(f"{mode} {p.status} {p.body_len} B resumed={p.resumed}")
                except OSError as exc:
                    checks.append(f"{mode} failed: {exc}")
            key = f"{name}, tickets {'on' if tickets else 'off'}"
            if quiet:
                targets.append(target)
                continue
            self.probes[key] = "; ".join(checks)
            log(f"probe {key}: {self.probes[key]}")
            targets.append(target)
        return targets

    def try_cell(self, target: Target, sc: Scenario, rnd: int) -> None:
        if not target.child.alive():
            return
        try:
            self.cell(target, sc, rnd)
        except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
            self.notes.append(f"r{rnd} {sc.key} {target.name}: {str(exc).splitlines()[0]}")
            log(f"r{rnd} {sc.key} {target.name} failed: {exc}")

    def try_memory(self, target: Target, rnd: int) -> None:
        if not target.child.alive():
            return
        try:
            self.memory_cell(target, rnd)
        except (RuntimeError, ValueError, OSError, subprocess.TimeoutExpired) as exc:
            self.notes.append(f"r{rnd} MEM {target.name}: {str(exc).splitlines()[0]}")
            log(f"r{rnd} MEM {target.name} failed: {exc}")

    def close(self) -> None:
        self.stop_servers()
        if self.origin is not None:
            stop(self.origin)


def render(run: Run, info: dict[str, str], started: str, elapsed: float) -> str:
    opts = run.opts
    summaries = report.summarize(run.cells)
    memory = report.summarize_memory(run.memory)
    pin = (
        f"proxies on CPU {run.cpus.proxy}, wrk + origin + idle client on CPU {run.cpus.load}"
        if run.cpus.proxy
        else "none"
    )
    lines = [
        f"Run started {started}, took {elapsed / 60:.1f} min: {opts.rounds} round(s) "
        f"({opts.memory_rounds} for memory), "
        f"{opts.duration:g} s cells after {opts.warmup:g} s warm-up, {opts.workers} worker(s) "
        f"per server, pinning: {pin}.",
        "",
        "| machine | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in info.items()],
        "",
        report.markdown(summaries, memory, list(opts.servers), list(opts.scenarios)),
    ]
    if run.probes:
        lines += ["Route probes (GET /small twice, the second offering the first session):", ""]
        lines += [f"- {k}: {v}" for k, v in run.probes.items()]
        lines.append("")
    if run.notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in run.notes] + [""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> Options:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Gateway vs nginx vs HAProxy vs direct, same run, loopback only.",
    )
    p.add_argument(
        "--scenarios",
        default="S1,S2r,S2f,S3,S4,S5,MEM",
        help="comma-separated subset of S1,S2r,S2f,S3,S4,S5,MEM (default: all)",
    )
    p.add_argument(
        "--servers",
        default=",".join(ALL_SERVERS),
        help="comma-separated subset of nginx,haproxy,gateway,direct; gateway-nosplice adds "
        "the gateway with splice off",
    )
    p.add_argument("--duration", type=float, default=4.0, help="seconds per cell (default 4)")
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per cell")
    p.add_argument("--rounds", type=int, default=3, help="rounds, order reversed in even ones")
    p.add_argument(
        "--memory-rounds", type=int, default=2, help="idle-memory rounds (fresh servers each)"
    )
    p.add_argument("--workers", type=int, default=1, help="workers per server (1 or 2)")
    p.add_argument("--memory-conns", type=int, default=10000, help="idle TLS connections")
    p.add_argument("--no-pin", action="store_true", help="do not pin proxies / load to CPUs")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="Markdown results file")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke check: 1 round, 2 s cells, no warm-up, 2000 idle connections",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    a = p.parse_args(argv)
    keys = tuple(k.strip() for k in a.scenarios.split(",") if k.strip())
    bad = [k for k in keys if k not in SCENARIO_BY_KEY and k != report.MEMORY_KEY]
    if bad:
        p.error(f"unknown scenario(s) {bad}; choose from {[s.key for s in SCENARIOS]} and MEM")
    servers = tuple(s.strip() for s in a.servers.split(",") if s.strip())
    if any(s not in ALL_SERVERS + EXTRA_SERVERS for s in servers):
        p.error(f"--servers: choose from {ALL_SERVERS + EXTRA_SERVERS}")
    if "nginx" not in servers:
        p.error("--servers must include nginx: every ratio is to nginx")
    if a.workers < 1:
        p.error("--workers must be at least 1")
    if a.quick:
        a.duration, a.warmup, a.rounds, a.memory_rounds = 2.0, 0.0, 1, 1
        a.memory_conns = min(a.memory_conns, 2000)
    return Options(
        scenarios=tuple(k for k in keys if k in SCENARIO_BY_KEY),
        servers=servers,
        memory=report.MEMORY_KEY in keys,
        memory_conns=a.memory_conns,
        duration=a.duration,
        warmup=a.warmup,
        rounds=a.rounds,
        memory_rounds=a.memory_rounds,
        workers=a.workers,
        pin=not a.no_pin,
        output=a.output,
        keep=a.keep,
        python=str(ROOT / ".venv" / "bin" / "python")
        if (ROOT / ".venv" / "bin" / "python").exists()
        else sys.executable,
    )


@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="gwc-bench-"))
    path.chmod(0o755)  # nginx workers run as an unprivileged user and read www/ from here
    try:
        yield path
    finally:
        if keep:
            log(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def raise_nofile() -> None:
    """Soft limit up to the hard one; children inherit it (nginx, HAProxy size their tables)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    for tool in ("nginx", "haproxy", "wrk", "taskset", "unshare"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: run scripts/setup.sh (Debian packages)")
    raise_nofile()
    cap = memory_cap(nofile_limit())
    if opts.memory and opts.memory_conns > cap:
        log(f"idle connections capped at {cap}: RLIMIT_NOFILE is {nofile_limit()}")
        opts = dataclasses.replace(opts, memory_conns=cap)
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    t0 = time.monotonic()
    info = machine_info(opts.python)
    with workdir(opts.keep) as work:
        run = Run(opts, work)
        try:
            run.execute()
        finally:
            run.close()
        text = render(run, info, started, time.monotonic() - t0)
    opts.output.parent.mkdir(parents=True, exist_ok=True)
    opts.output.write_text(text)
    raw = {
        "machine": info,
        "options": {k: str(v) for k, v in dataclasses.asdict(opts).items()},
        "cells": [dataclasses.asdict(c) for c in run.cells],
        "memory": [dataclasses.asdict(m) for m in run.memory],
        "probes": run.probes,
        "notes": run.notes,
    }
    opts.output.with_suffix(".json").write_text(json.dumps(raw, indent=1))
    sys.stdout.write(text + "\n")
    log(f"results written to {opts.output} (raw cells: {opts.output.with_suffix('.json')})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
