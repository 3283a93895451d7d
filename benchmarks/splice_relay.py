"""Micro-benchmark: CPU per MB of a loopback TCP relay with recv/send, recv_into/send, splice.

    .venv/bin/python -m benchmarks.splice_relay [--mib 1024] [--cpu 0]

A sender process streams ``--mib`` MiB to the relay, which forwards them to a sink process;
only the relay's own CPU (getrusage of this process) is reported. It isolates what the
passthrough relay (S4) pays per byte, without an event loop: ``recv`` + ``send`` copies every
byte into and out of user space; ``os.splice`` through a pipe keeps them in the kernel.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import resource
import socket
import sys
import time

CHUNK = 65536
F_SETPIPE_SZ = 1031


def _sender(port: int, total: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as s:
        buf = b"x" * CHUNK
        sent = 0
        while sent < total:
            sent += s.send(buf)
    os._exit(0)


def _sink(listener: socket.socket) -> None:
    conn, _ = listener.accept()
    buf = bytearray(1 << 20)
    while conn.recv_into(buf):
        pass
    os._exit(0)


def relay(mode: str, total: int) -> tuple[float, int]:
    """(relay CPU µs per MB, bytes moved) for one mode."""
    src_l = socket.create_server(("127.0.0.1", 0))
    dst_l = socket.create_server(("127.0.0.1", 0))
    if os.fork() == 0:
        _sink(dst_l)
    out = socket.create_connection(dst_l.getsockname())
    if os.fork() == 0:
        _sender(src_l.getsockname()[1], total)
    inc, _ = src_l.accept()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    moved = 0
    if mode == "recv":
        while data := inc.recv(CHUNK):
            out.sendall(data)
            moved += len(data)
    elif mode == "recv_into":
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := inc.recv_into(buf):
            out.sendall(view[:n])
            moved += n
    else:
        r, w = os.pipe()
        fcntl.fcntl(w, F_SETPIPE_SZ, 1 << 20)
        while n := os.splice(inc.fileno(), w, 1 << 20):
            left = n
            while left:
                left -= os.splice(r, out.fileno(), left)
            moved += n
        os.close(r)
        os.close(w)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    for s in (out, inc, src_l, dst_l):
        s.close()
    os.wait()
    os.wait()
    return cpu * 1e6 / (moved / 1e6), moved


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.splice_relay", description=__doc__)
    p.add_argument("--mib", type=int, default=1024)
    p.add_argument("--cpu", type=int, default=None, help="pin relay, sender and sink here")
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args(argv)
    if a.cpu is not None:
        os.sched_setaffinity(0, {a.cpu})
    for rnd in range(a.rounds):
        for mode in ("recv", "recv_into", "splice"):
            t0 = time.monotonic()
            per_mb, moved = relay(mode, a.mib << 20)
            sys.stdout.write(
                f"round {rnd + 1} {mode:<9} {moved / 1e6:7.0f} MB  relay CPU {per_mb:6.0f} µs/MB"
                f"  wall {time.monotonic() - t0:.2f} s\n"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
