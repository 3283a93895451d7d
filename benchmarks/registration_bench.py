"""Registrations per second with real verification. ``python -m benchmarks.registration_bench``.

One server process runs the real registration RPC (pyOpenSSL TLS site, RA-TLS client
certificates, dcap-qvl quote verification under a simulated root, RTMR3 replay, admission
policy, SQLite registry with address allocation; no WireGuard device, whose per-peer cost is
measured by ``registry_bench --device``). A load generator registers distinct simulated CVMs,
each registration over a new mutual-TLS connection (its RA-TLS client certificate), as CVMs
do, and verifies the server's certificate against the one the bench made.

Load generators (``--client``), both pinned to CPU 1 with the server on CPU 0 when there
are two or more CPUs (``--no-pin`` lets the kernel place them), as ``benchmarks.run`` does:
``python`` (default, the cheaper: ~0.9-1.0 ms CPU per registration) is ``--clients``
processes that each hold every CVM's client context and request bytes, built before the
timed part, and per registration open a TCP connection, make a full TLS handshake and write
the request; ``curl`` (~1.6-1.8 ms: OpenSSL 3 builds a context and decodes the PEM key and
certificates for every connection) is one curl process running all registrations from a
config file, ``--parallel`` at a time, each transfer with its own ``--cert/--key`` and JSON
body, ``Connection: close`` and no TLS session reuse. The earlier client (``http.client``
and a fresh context per registration, 2.0-2.2 ms, unpinned) capped the wall rate on two
shared cores at about 2 / (server + client CPU).

Reported: registrations per second of wall time (``target_300_wall_met``: >= 300/s, issue
"Attested tunnels"), the server's own CPU time per registration (utime+stime from /proc, so
the figure holds whatever else runs); ``per_server_core`` = 1 / that is what one fully busy
server process could do; the load generator's CPU per registration (curl: its rusage,
start-up included; python: the registration loop only); the load average before and after
and how busy each CPU was. Every connection is counted by the server (``TlsSite.stats``) and,
for curl, by curl (``%{num_connects}``): both must equal the registrations, and every
response must be 200, or the run fails (exit status 1 after the JSON).

As in production: addresses in random order (``ip_order = "random"``, the default), log
level info (to a file, as to the journal). ``--rounds 1`` makes every registration a first
one; later rounds are refreshes (same certificate, same key: the address is kept). Every
registration, refresh or not, is verified in full (dcap-qvl, RTMR3 replay, policy).
``--server-pid-file`` lets a profiler attach (``py-spy record -p PID``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import ipaddress
import json
import multiprocessing as mp
import os
import random
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import procfs

APP = "5bb4ff9a3837357f19dc176407a5709c62eb6c56"
PLAN_NET = "10.9.0.0/16"
PATH = "/prpc/RegisterCvm"
SERVER_CPU, CLIENT_CPU = 0, 1  # when pinned


@dataclass(frozen=True, slots=True)
class Cvm:
    """One simulated CVM's files: RA-TLS certificate and key, and its request body (its
    WireGuard public key, kept across refreshes as the guest's cache keeps it)."""

    cert: Path
    key: Path
    body: str


@dataclass(frozen=True, slots=True)
class LoadResult:
    """What a load generator saw: status codes, TCP connects it made, its CPU seconds."""

    statuses: dict[int, int]
    connects: int | None  # None: the generator cannot tell (python: one per request by code)
    cpu_s: float


def _cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pid`` so far."""
    st = procfs.parse_stat(Path(f"/proc/{pid}/stat").read_text())
    return st.utime / procfs.CLK_TCK, st.stime / procfs.CLK_TCK


def _pin(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def _server(workdir: Path, port_q: Any, ctl_q: Any, now: int, cpu: int | None) -> None:
    """The RPC server; after the run, ``ctl_q`` brings the number of connections expected
    and the server answers on ``port_q`` with its per-outcome connection counts."""
    _pin(cpu)
    from aiohttp import web

    from gateway.attest.collateral import SimCollateralSource
    from gateway.attest.policy_settings import AdmissionPolicy
    from gateway.attest.verifier import TrustAnchors
    from gateway.control.registration import (
        Advertised,
        RegistrationService,
        create_rpc_app,
        evidence_check,
    )
    from gateway.control.tls_server import TlsCredentials, TlsSite
    from gateway.registry.service import Registry
    from gateway.registry.sqlite import SqliteStore
    from gateway.tee.sim_pki import SimPki
    from gateway.tunnel.ipalloc import AddressPlan
    from gateway.tunnel.keys import generate_private_key, public_key

    pki = SimPki.load_or_create(workdir / "pki")
    plan = AddressPlan(
        ipaddress.IPv4Interface("10.9.0.1/16"),
        ipaddress.IPv4Network(PLAN_NET),
        (ipaddress.IPv4Network("10.9.0.1/32"),),
    )
    store = SqliteStore(workdir / "registry.sqlite3")
    # as build_registry makes it for the default ``ip_order = "random"``
    registry = Registry(store, plan, clock=time.time, rng=random.SystemRandom())
    check = evidence_check(
        source=SimCollateralSource(pki, clock=lambda: now),
        anchors=TrustAnchors(collateral=None, root_ca_der=pki.root_ca_der),
        policy=lambda: AdmissionPolicy(app_ids=(APP,)),
        clock=lambda: now,
    )
    adv = Advertised(public_key(generate_private_key()), "10.9.0.1/16", "192.0.2.1:51820")
    service = RegistrationService(registry, check, adv)

    async def main() -> None:
        runner = web.AppRunner(create_rpc_app(service), access_log=None)
        await runner.setup()
        creds = TlsCredentials(workdir / "server.pem", workdir / "server.key", None)
        site = TlsSite(runner, "127.0.0.1", 0, creds)
        await site.start()
        port_q.put(site.port)
        loop = asyncio.get_running_loop()
        expected = await loop.run_in_executor(None, ctl_q.get)
        # ``stats`` counts a connection when it ends: give the last closes a moment
        deadline = loop.time() + 5
        while sum(site.stats.values()) < expected and loop.time() < deadline:
            await asyncio.sleep(0.01)
        port_q.put(dict(site.stats))

    import uvloop

    from gateway.util.logs import setup_logging

    # as the gateway logs (``[core] log_level = "info"``), to a file standing in for the
    # journal: what a registration costs includes its log line
    log = open(workdir / "server.log", "a")  # noqa: SIM115 - lives as long as the process
    os.dup2(log.fileno(), 2)
    setup_logging(os.environ.get("BENCH_LOG", "info"))
    uvloop.run(main())


def _make_cvms(workdir: Path, count: int, now: int) -> list[tuple[Path, Path]]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from gateway.attest import ratls
    from gateway.tee.base import RuntimeEvent
    from gateway.tee.sim import SimTee
    from gateway.tee.sim_pki import SimPki

    pki = SimPki.load_or_create(workdir / "pki")
    out = []
    for i in range(count):
        d = workdir / f"cvm{i}"
        tee = SimTee(pki, d / "tee")
        for name, payload in [
            ("system-preparing", b""),
            ("app-id", bytes.fromhex(APP)),
            ("compose-hash", b"\xc1" * 32),
            ("instance-id", i.to_bytes(20, "big")),
            ("boot-mr-done", b""),
            ("system-ready", b""),
        ]:
            tee.emit_event(RuntimeEvent(name, payload))
        key = ec.generate_private_key(ec.SECP256R1())
        req = ratls.CertRequest("dstack-guest-agent", client_auth=True)
        cert = ratls.build_ratls_cert(key, tee, req, now=dt.datetime.fromtimestamp(now, dt.UTC))
        (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (d / "key.pem").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        out.append((d / "cert.pem", d / "key.pem"))
    return out


def _bodies(count: int) -> list[str]:
    from gateway.tunnel.keys import generate_private_key, public_key

    return [
        json.dumps({"client_public_key": public_key(generate_private_key())}) for _ in range(count)
    ]


def read_status(sock: socket.socket) -> int:
    """Read one HTTP/1.1 response with a Content-Length; its status (0 if malformed)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return 0
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    if not lines[0].startswith(b"HTTP/1.1 ") or not lines[0][9:12].isdigit():
        return 0
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            return 0
        body += chunk
    return int(lines[0][9:12])


def _python_client(
    port: int,
    ca: str,
    cvms: list[tuple[str, str, str]],
    rounds: int,
    cpu: int | None,
    ready_q: Any,
    go: Any,
    out_q: Any,
) -> None:
    """One Python load generator: every registration is a new TCP connection and a full
    TLS handshake (no session reuse) verifying the server. Each CVM's client context (its
    certificate and key) and request are built before the timed part, as a guest agent holds
    them; the request is written as bytes and the response read up to its Content-Length
    (``http.client`` cost ~0.3 ms more per registration). Reports its own CPU for the
    registrations only (not its start-up)."""
    _pin(cpu)
    prepared = []
    for cert, key, body in cvms:
        ctx = ssl.create_default_context(cafile=ca)
        ctx.load_cert_chain(cert, key)
        request = (
            f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n{body}"
        ).encode()
        prepared.append((ctx, request))
    ready_q.put(None)
    go.wait()
    cpu0 = time.process_time()
    statuses: dict[int, int] = {}
    for _ in range(rounds):
        for ctx, request in prepared:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
                    # as http.client and curl do: else Nagle holds the request behind the
                    # handshake's last flight until the server's delayed ACK (~40 ms)
                    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
                        conn.sendall(request)
                        status = read_status(conn)
            except (OSError, ValueError):
                status = 0  # no HTTP status: TLS or connection error
            statuses[status] = statuses.get(status, 0) + 1
    out_q.put((statuses, time.process_time() - cpu0))


def _run_python(
    port: int,
    ca: Path,
    cvms: Sequence[Cvm],
    rounds: int,
    clients: int,
    cpu: int | None,
    on_start: Callable[[], None],
) -> tuple[LoadResult, float]:
    """``clients`` processes, CVMs dealt round-robin; returns the result and the wall time
    from the start signal to the last report."""
    ctx = mp.get_context("spawn")
    shares = [[(str(c.cert), str(c.key), c.body) for c in cvms[i::clients]] for i in range(clients)]
    ready_q, out_q, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [
        ctx.Process(
            target=_python_client, args=(port, str(ca), share, rounds, cpu, ready_q, go, out_q)
        )
        for share in shares
    ]
    for p in procs:
        p.start()
    try:
        for _ in procs:  # started and imported: time the registrations only
            ready_q.get(timeout=120)
        on_start()
        w0 = time.perf_counter()
        go.set()
        reports = [out_q.get(timeout=600) for _ in procs]
        wall = time.perf_counter() - w0
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    statuses: dict[int, int] = {}
    for got, _ in reports:
        for code, n in got.items():
            statuses[code] = statuses.get(code, 0) + n
    return LoadResult(statuses, None, sum(r[1] for r in reports)), wall


def _quote(value: str) -> str:
    """A curl config file string (double-quoted, backslash escapes)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def curl_config(url: str, ca: Path, cvms: Sequence[Cvm], rounds: int) -> str:
    """One transfer per registration, separated by ``next`` (which resets every per-transfer
    option, so each block repeats them). ``Connection: close`` and ``no-sessionid`` make each
    registration a new TCP connection with a full handshake, as a CVM's is."""
    blocks = []
    for _ in range(rounds):
        for c in cvms:
            blocks.append(
                "\n".join(
                    [
                        f"url = {_quote(url)}",
                        f"cacert = {_quote(str(ca))}",
                        f"cert = {_quote(str(c.cert))}",
                        f"key = {_quote(str(c.key))}",
                        "http1.1",
                        "no-sessionid",
                        'header = "Content-Type: application/json"',
                        'header = "Connection: close"',
                        f"data-binary = {_quote(c.body)}",
                        'output = "/dev/null"',
                        'write-out = "%{http_code} %{num_connects}\\n"',
                        "silent",
                    ]
                )
            )
    return "\nnext\n".join(blocks) + "\n"


def parse_write_out(text: str) -> tuple[dict[int, int], int]:
    """Status counts and total new connections from curl's ``%{http_code} %{num_connects}``
    lines (curl writes ``000`` when a transfer got no HTTP response)."""
    statuses: dict[int, int] = {}
    connects = 0
    for line in text.splitlines():
        code, conns = line.split()
        statuses[int(code)] = statuses.get(int(code), 0) + 1
        connects += int(conns)
    return statuses, connects


def _run_curl(
    port: int,
    ca: Path,
    cvms: Sequence[Cvm],
    rounds: int,
    parallel: int,
    cpu: int | None,
    workdir: Path,
    on_start: Callable[[], None],
) -> tuple[LoadResult, float]:
    """One curl process for all registrations; its CPU is its rusage (start-up and reading
    the config included), its wall time from spawn to exit."""
    curl = shutil.which("curl")
    if curl is None:
        raise SystemExit("curl not found: install it or use --client python")
    conf = workdir / "curl.conf"
    conf.write_text(curl_config(f"https://127.0.0.1:{port}{PATH}", ca, cvms, rounds))
    cmd = [curl, "--parallel", "--parallel-immediate", "--parallel-max", str(parallel)]
    cmd += ["--config", str(conf)]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu), *cmd]  # taskset execs curl: same pid, same rusage
    out, err = workdir / "curl.out", workdir / "curl.err"
    with out.open("wb") as fo, err.open("wb") as fe:
        on_start()
        w0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - w0
    proc.returncode = os.waitstatus_to_exitcode(status)
    statuses, connects = parse_write_out(out.read_text())
    if proc.returncode != 0:
        print(f"curl exited {proc.returncode}: {err.read_text()[-2000:]}", file=sys.stderr)
        statuses[0] = statuses.get(0, 0) + max(0, len(cvms) * rounds - sum(statuses.values()))
    return LoadResult(statuses, connects, usage.ru_utime + usage.ru_stime), wall


def verdict(expected: int, result: LoadResult, tls: dict[str, int]) -> bool:
    """Did every registration succeed, each on a connection of its own? All responses 200,
    and the server saw exactly ``expected`` connections, all of them completing the
    handshake (so none was reused for a second registration, none refused); curl's own count
    of new connections must agree."""
    return (
        result.statuses.get(200, 0) == expected
        and sum(result.statuses.values()) == expected
        and tls.get("established", 0) == expected
        and sum(tls.values()) == expected
        and (result.connects is None or result.connects == expected)
    )


def _server_cert(workdir: Path) -> Path:
    """A self-signed server certificate for 127.0.0.1 (IP SAN): the clients trust exactly it
    (``cacert``), so the server is verified as a CVM verifies the gateway."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench-rpc")])
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=7))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (workdir / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (workdir / "server.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return workdir / "server.pem"


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--cvms", type=int, default=200, help="distinct CVMs (default 200)")
    ap.add_argument("--rounds", type=int, default=3, help="registrations per CVM (refreshes)")
    ap.add_argument(
        "--client",
        choices=("python", "curl"),
        default="python",
        help="load generator (default python: the cheaper per registration; curl: one process)",
    )
    ap.add_argument(
        "--parallel", type=int, default=16, help="curl: registrations in flight (default 16)"
    )
    ap.add_argument("--clients", type=int, default=4, help="python: client processes (default 4)")
    ap.add_argument(
        "--no-pin",
        action="store_true",
        help="do not pin the server to CPU 0 and the load generator to CPU 1",
    )
    ap.add_argument(
        "--server-pid-file",
        type=Path,
        help="write the server's pid here once it listens (to attach a profiler: py-spy)",
    )
    return ap.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """One measurement; the dict printed as JSON."""
    now = int(time.time())
    pin = not args.no_pin and len(os.sched_getaffinity(0)) >= 2
    server_cpu, client_cpu = (SERVER_CPU, CLIENT_CPU) if pin else (None, None)
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="gw-regbench-") as tmp:
        workdir = Path(tmp)
        ca = _server_cert(workdir)
        from gateway.tee.sim_pki import SimPki

        SimPki.create(not_before=now - 86400).save(workdir / "pki")
        t0 = time.perf_counter()
        made = _make_cvms(workdir, args.cvms, now)
        forge = (time.perf_counter() - t0) / args.cvms
        cvms = [Cvm(c, k, b) for (c, k), b in zip(made, _bodies(args.cvms), strict=True)]
        port_q, ctl_q = ctx.Queue(), ctx.Queue()
        server = ctx.Process(
            target=_server, args=(workdir, port_q, ctl_q, now, server_cpu), daemon=True
        )
        server.start()
        try:
            port = port_q.get(timeout=60)
            assert server.pid is not None
            if args.server_pid_file is not None:
                args.server_pid_file.write_text(f"{server.pid}\n")
            marks: dict[str, Any] = {}
            pid = server.pid

            def on_start() -> None:
                """Sampled when the timed part starts (load generators are ready)."""
                marks.update(load=os.getloadavg(), busy=procfs.cpu_busy_ticks())
                marks["cpu"] = _cpu_times(pid)

            if args.client == "curl":
                result, wall = _run_curl(
                    port, ca, cvms, args.rounds, args.parallel, client_cpu, workdir, on_start
                )
            else:
                result, wall = _run_python(
                    port, ca, cvms, args.rounds, args.clients, client_cpu, on_start
                )
            cpu1, busy1, load1 = _cpu_times(server.pid), procfs.cpu_busy_ticks(), os.getloadavg()
            ctl_q.put(args.cvms * args.rounds)
            tls = port_q.get(timeout=30)
        finally:
            server.terminate()
            server.join(10)
    load0, busy0, cpu0 = marks["load"], marks["busy"], marks["cpu"]
    user, system = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    cpu = user + system
    expected = args.cvms * args.rounds
    ok = result.statuses.get(200, 0)
    passed = verdict(expected, result, tls)
    per_wall = ok / wall
    busy = procfs.busy_fractions(busy0, busy1)
    return {
        "client": args.client,
        "registrations": expected,
        "ok_200": ok,
        "statuses": {str(k): v for k, v in sorted(result.statuses.items())},
        "server_tls_connections": tls,
        "client_connects": result.connects,
        "passed": passed,
        "wall_s": round(wall, 3),
        "per_second_wall": round(per_wall, 1),
        "target_300_wall_met": passed and per_wall >= 300,
        "server_cpu_ms_per_registration": round(cpu / max(ok, 1) * 1000, 3),
        "of_which_system_ms": round(system / max(ok, 1) * 1000, 3),
        "per_server_core": round(ok / cpu, 1) if cpu else None,
        "client_cpu_ms_per_registration": round(result.cpu_s / max(ok, 1) * 1000, 3),
        "cpu_busy": [round(f, 2) for f in busy],
        # how much of the pinned CPUs other processes (other users of the machine) took
        "cpu_busy_others": (
            [
                round(busy[SERVER_CPU] - cpu / wall, 2),
                round(busy[CLIENT_CPU] - result.cpu_s / wall, 2),
            ]
            if pin and len(busy) > CLIENT_CPU
            else None
        ),
        "loadavg_before": [round(x, 2) for x in load0],
        "loadavg_after": [round(x, 2) for x in load1],
        "pinned": {"server": server_cpu, "client": client_cpu} if pin else None,
        "parallel": args.parallel if args.client == "curl" else args.clients,
        "ratls_cert_build_ms": round(forge * 1000, 3),
        "cpus": os.cpu_count(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    out = run(_parse_args(argv))
    print(json.dumps(out, indent=2))
    return 0 if out["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
