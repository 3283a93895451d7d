"""Registrations per second with real verification. ``python -m benchmarks.registration_bench``.

One server process runs the real registration RPC (pyOpenSSL TLS site, RA-TLS client
certificates, dcap-qvl quote verification under a simulated root, RTMR3 replay, admission
policy, SQLite registry with address allocation; no WireGuard device, whose per-peer cost is
measured by ``registry_bench --device``). Client processes register distinct simulated CVMs,
each over a new TLS connection, as CVMs do.

Reported: registrations per second of wall time, and the server's own CPU time per
registration (utime+stime from /proc, so the figure holds even while the clients compete for
the same two cores); ``per_server_core`` = 1 / CPU per registration is what one fully busy
server process could do. Target (issue "Attested tunnels"): >= 300/s in one process. The
clients' CPU per registration is reported too: on two shared cores the wall rate is bounded
by about 2 / (server + client CPU per registration).

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
import http.client
import ipaddress
import json
import multiprocessing as mp
import os
import random
import ssl
import tempfile
import time
from pathlib import Path
from typing import Any

APP = "5bb4ff9a3837357f19dc176407a5709c62eb6c56"
PLAN_NET = "10.9.0.0/16"


def _cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _server(workdir: Path, port_q: Any, now: int) -> None:
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
        await asyncio.Event().wait()

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


def _client(
    port: int, cvms: list[tuple[str, str]], rounds: int, ready_q: Any, go: Any, out_q: Any
) -> None:
    """One load generator: each CVM keeps its WireGuard key (as the guest's cache does), and
    every registration is a new TLS connection with a fresh client context. Reports its own
    CPU for the registrations only (not its start-up)."""
    from gateway.tunnel.keys import generate_private_key, public_key

    bodies = [json.dumps({"client_public_key": public_key(generate_private_key())}) for _ in cvms]
    ready_q.put(None)
    go.wait()
    cpu0 = time.process_time()
    ok = failed = 0
    for _ in range(rounds):
        for (cert, key), body in zip(cvms, bodies, strict=True):
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE  # the bench measures the server, not trust
            ctx.load_cert_chain(cert, key)
            conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
            try:
                conn.request(
                    "POST", "/prpc/RegisterCvm", body, {"Content-Type": "application/json"}
                )
                resp = conn.getresponse()
                resp.read()
                ok += resp.status == 200
                failed += resp.status != 200
            finally:
                conn.close()
    out_q.put((ok, failed, time.process_time() - cpu0))


def _self_signed(workdir: Path) -> None:
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cvms", type=int, default=200, help="distinct CVMs (default 200)")
    ap.add_argument("--rounds", type=int, default=3, help="registrations per CVM (refreshes)")
    ap.add_argument("--clients", type=int, default=4, help="client processes (default 4)")
    ap.add_argument(
        "--server-pid-file",
        type=Path,
        help="write the server's pid here once it listens (to attach a profiler: py-spy)",
    )
    args = ap.parse_args()
    now = int(time.time())
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="gw-regbench-") as tmp:
        workdir = Path(tmp)
        _self_signed(workdir)
        from gateway.tee.sim_pki import SimPki

        SimPki.create(not_before=now - 86400).save(workdir / "pki")
        t0 = time.perf_counter()
        cvms = _make_cvms(workdir, args.cvms, now)
        forge = (time.perf_counter() - t0) / args.cvms
        port_q = ctx.Queue()
        server = ctx.Process(target=_server, args=(workdir, port_q, now), daemon=True)
        server.start()
        try:
            port = port_q.get(timeout=60)
            assert server.pid is not None
            if args.server_pid_file is not None:
                args.server_pid_file.write_text(f"{server.pid}\n")
            shares = [
                [(str(c), str(k)) for c, k in cvms[i :: args.clients]] for i in range(args.clients)
            ]
            ready_q, out_q, go = ctx.Queue(), ctx.Queue(), ctx.Event()
            clients = [
                ctx.Process(target=_client, args=(port, share, args.rounds, ready_q, go, out_q))
                for share in shares
            ]
            for c in clients:
                c.start()
            for _ in clients:  # started and imported: time the registrations only
                ready_q.get(timeout=120)
            cpu0, w0 = _cpu_times(server.pid), time.perf_counter()
            go.set()
            results = [out_q.get(timeout=600) for _ in clients]
            wall, cpu1 = time.perf_counter() - w0, _cpu_times(server.pid)
            user, system = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
            cpu = user + system
            for c in clients:
                c.join(30)
        finally:
            server.terminate()
            server.join(10)
    ok = sum(r[0] for r in results)
    failed = sum(r[1] for r in results)
    client_cpu = sum(r[2] for r in results)
    print(
        json.dumps(
            {
                "registrations": ok,
                "failed": failed,
                "wall_s": round(wall, 3),
                "per_second_wall": round(ok / wall, 1),
                "server_cpu_ms_per_registration": round(cpu / max(ok, 1) * 1000, 3),
                "of_which_system_ms": round(system / max(ok, 1) * 1000, 3),
                "per_server_core": round(ok / cpu, 1) if cpu else None,
                "client_cpu_ms_per_registration": round(client_cpu / max(ok, 1) * 1000, 3),
                "ratls_cert_build_ms": round(forge * 1000, 3),
                "clients": args.clients,
                "cpus": os.cpu_count(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
