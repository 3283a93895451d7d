"""Registry at scale: 10 000 instances. ``python -m benchmarks.registry_bench [--device]``.

Measures, on a fresh SQLite store in a temporary directory:

* insert: N registrations through :class:`Registry` (key check, address choice, CAS write);
* memory: Python heap peak while inserting and held by all N records loaded (tracemalloc),
  the database size and the process's max RSS;
* lookups: by instance id, by public key, by address (random keys, per operation);
* reopen/restore: open the file again and build the desired peer set (target < 10 s);
* handshake poll: :meth:`Registry.observe` on a 10 000-peer state, all changed / none (every
  instance then has an endpoint hint in TEST-NET-1, 192.0.2.0/24, unroutable in the lab);
* ``--device`` (root, wireguard-go), in a lab namespace of ``--prefix``:

  - ``device_restore``: :meth:`Registry.restore` of those N peers into a fresh wireguard-go,
    without greeting: every peer present with its address (what the start-up waits for);
    ``device_greet``: then the greeting pass, endpoint + keepalive for every hinted peer
    (a handshake initiation each; sends fail at once, no route); each with wall time,
    wireguard-go's CPU (utime + stime from /proc) and ours;
  - the state read back (the handshake timer's cost) and a no-op reconcile;
  - ``restart_*``: a real restart. A child process (``--restart-child``) runs
    :func:`~gateway.registry.runtime.open_tunnel` on the same database and a new device,
    then reads the peers back with a UAPI ``get`` and checks they are exactly the stored set
    (key and address). Reported from the child's spawn (interpreter start and imports
    included) and from the call of ``open_tunnel``, with both processes' CPU and the load
    average before and after (the machine is shared).

Prints one JSON object; numbers are seconds unless the key says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

from gateway.registry.service import Registration, Registry
from gateway.registry.sqlite import SqliteStore
from gateway.tunnel.ipalloc import AddressPlan
from gateway.tunnel.keys import generate_private_key, public_key
from gateway.tunnel.uapi import DeviceState, PeerState

# One cluster node's plan (upstream deploy docs): 16 382 usable addresses.
PLAN = AddressPlan(
    IPv4Interface("10.8.0.1/16"), IPv4Network("10.8.0.0/18"), (IPv4Network("10.8.0.1/32"),)
)


def _timed(fn: Any, *args: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def bench(count: int, workdir: Path, device: bool, prefix: str) -> dict[str, Any]:
    rng = random.Random(7)
    keys = [public_key(generate_private_key()) for _ in range(count)]
    db = workdir / "registry.sqlite3"
    out: dict[str, Any] = {"instances": count}

    store = SqliteStore(db)
    registry = Registry(store, PLAN, clock=time.time, rng=random.Random(1))
    tracemalloc.start()
    start = time.perf_counter()
    for n, key in enumerate(keys):
        registry.register(
            Registration(f"inst{n:05d}", f"app{n % 50}", key, {"ports": [{"port": 443}]})
        )
    out["insert_total"] = round(time.perf_counter() - start, 3)
    out["insert_per_op_ms"] = round(out["insert_total"] / count * 1000, 3)
    out["insert_heap_peak_mib"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 2)
    tracemalloc.stop()
    out["db_size_mib"] = round(
        sum(p.stat().st_size for p in workdir.glob("registry.sqlite3*")) / 2**20, 2
    )

    samples = [rng.randrange(count) for _ in range(2000)]
    tracemalloc.start()
    records = store.list_instances()
    out["all_records_heap_mib"] = round(tracemalloc.get_traced_memory()[0] / 2**20, 2)
    tracemalloc.stop()
    t_id = _timed(lambda: [store.get_instance(f"inst{n:05d}") for n in samples])[0]
    t_key = _timed(lambda: [store.find_instance_by_key(keys[n]) for n in samples])[0]
    t_ip = _timed(lambda: [store.ip_holder(records[n].ip) for n in samples])[0]
    out["lookup_by_id_us"] = round(t_id / len(samples) * 1e6, 1)
    out["lookup_by_key_us"] = round(t_key / len(samples) * 1e6, 1)
    out["lookup_by_ip_us"] = round(t_ip / len(samples) * 1e6, 1)
    before = {r.instance_id: r for r in records}
    store.close()

    start = time.perf_counter()
    store = SqliteStore(db)
    registry = Registry(store, PLAN, clock=time.time)
    peers = registry.desired_peers()
    out["reopen_restore"] = round(time.perf_counter() - start, 3)
    assert {r.instance_id: r for r in store.list_instances()} == before, "state differs"
    assert len(peers) == count

    # the handshake poll: every peer shook hands (first poll), then nothing changed
    state = DeviceState(
        None,
        51820,
        tuple(
            PeerState(r.public_key, (), _endpoint(n), time.time() - n % 120, 1, 1, 25)
            for n, r in enumerate(before.values())
        ),
    )
    t, newer = _timed(registry.observe, state)
    out["observe_all_changed"] = round(t, 3)
    assert newer == count
    out["observe_unchanged"] = round(_timed(registry.observe, state)[0], 4)

    if device:
        out.update(_device_bench(registry, workdir, prefix))
    store.close()
    out["max_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def _endpoint(n: int) -> str:
    """A synthetic CVM endpoint in TEST-NET-1: no route in a lab namespace, so sends fail fast.

    (An address on the lab's own link would be worse than useless: greeting absent
    neighbours blocks wireguard-go's sends until ARP gives up, see docs/tunnel.md.)
    """
    return f"192.0.2.{n % 250 + 1}:{9182 + n // 250}"


def _cpu(pid: int) -> float:
    """utime + stime of ``pid`` in seconds (/proc/<pid>/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _measure(fn: Any, pid: int) -> tuple[dict[str, float], Any]:
    """Run ``fn()``: wall time, wireguard-go's CPU (``pid``) and this process's CPU."""
    wg0, py0, t0 = _cpu(pid), time.process_time(), time.perf_counter()
    result = fn()
    wall, wg1, py1 = time.perf_counter() - t0, _cpu(pid), time.process_time()
    return {
        "wall": round(wall, 3),
        "wg_cpu": round(wg1 - wg0, 2),
        "our_cpu": round(py1 - py0, 2),
    }, (result)


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _device_bench(registry: Registry, workdir: Path, prefix: str) -> dict[str, Any]:
    from gateway.lab.harness import Lab, cleanup_leftovers

    cleanup_leftovers(prefix)
    out: dict[str, Any] = {"load_before_device": _load()}
    with Lab(cvms=0, workdir=workdir / "lab", prefix=prefix, wg_address=PLAN.interface) as lab:
        gw = lab.gateway
        assert gw is not None and gw.process is not None
        pid = gw.process.pid
        registry.device = gw
        m, result = _measure(lambda: registry.restore(greet=False), pid)
        out["device_restore"] = m
        out["device_peers_added"] = len(result.added)
        m, greeted = _measure(lambda: registry.greet(result.added), pid)
        out["device_greet"] = m
        out["device_greeted"] = greeted
        m, state = _measure(gw.state, pid)
        out["device_state_read"] = m
        out["device_state_peers"] = len(state.peers)
        assert _peer_set(state) == _stored_set(registry), "device differs from the store"
        m, again = _measure(registry.restore, pid)
        out["device_resync_noop"] = m
        assert not (again.added or again.updated or again.removed)
        status = Path(f"/proc/{pid}/status").read_text()
        rss = next(line for line in status.splitlines() if line.startswith("VmRSS"))
        out["wireguard_go_rss_mib"] = round(int(rss.split()[1]) / 1024, 1)
        gw.close()
        lab.gateway = None
        out.update(_restart(registry, lab, workdir))
    out["load_after_device"] = _load()
    return out


def _peer_set(state: DeviceState) -> set[tuple[str, tuple[str, ...]]]:
    return {(p.public_key, tuple(sorted(map(str, p.allowed_ips)))) for p in state.peers}


def _stored_set(registry: Registry) -> set[tuple[str, tuple[str, ...]]]:
    return {(r.public_key, (f"{r.ip}/32",)) for r in registry.store.list_instances()}


def _restart(registry: Registry, lab: Any, workdir: Path) -> dict[str, Any]:
    """Spawn ``--restart-child`` on the same database; its timings, seen from here."""
    data = workdir / "restart"
    data.mkdir()
    config = data / "gateway.toml"
    db = workdir / "registry.sqlite3"
    config.write_text(
        f"[core]\ndata_dir = '{data}'\n"
        f"[wg]\ninterface = '{lab.base}rt'\nnetns = '{lab.gw_netns}'\nbackend = 'wireguard-go'\n"
        f"ip = '{PLAN.interface}'\nclient_ip_range = '{PLAN.client_range}'\n"
        f"reserved_net = {[str(n) for n in PLAN.reserved]!r}\n"
        f"[registry]\npath = '{db}'\n"
    )
    expected = data / "expected.json"
    expected.write_text(json.dumps(sorted(_stored_set(registry))))
    load = _load()
    spawned = time.time()
    child = subprocess.run(
        [sys.executable, "-m", "benchmarks.registry_bench", "--restart-child", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if child.returncode != 0:
        raise RuntimeError(f"restart child failed:\n{child.stderr[-3000:]}")
    got = json.loads(child.stdout)
    return {
        "restart_spawn_to_all_peers": round(got["verified_at"] - spawned, 3),
        "restart_open_tunnel_to_all_peers": round(got["verified_at"] - got["open_at"], 3),
        "restart_open_tunnel_to_entered": round(got["entered_at"] - got["open_at"], 3),
        "restart_peers_verified": got["peers"],
        "restart_wg_cpu": got["wg_cpu"],
        "restart_our_cpu": got["our_cpu"],
        "restart_load_before_after": [load, _load()],
    }


def restart_child(config_path: Path) -> None:
    """A restarted gateway's tunnel runtime: open_tunnel, then read all peers back and check.

    Prints the wall-clock instants (``time.time``) and CPU the parent reports.
    """
    from gateway.config import load_config
    from gateway.registry.runtime import open_tunnel

    cfg = load_config(config_path)
    want = {
        (k, tuple(n)) for k, n in json.loads((config_path.parent / "expected.json").read_text())
    }

    async def run() -> dict[str, Any]:
        open_at = time.time()
        async with open_tunnel(cfg) as tunnel:
            entered_at = time.time()
            state = await asyncio.to_thread(tunnel.device.state)
            verified_at = time.time()
            got = _peer_set(state)
            if got != want:
                raise SystemExit(f"restored set differs: {len(got)} peers, {len(want)} stored")
            assert tunnel.device.process is not None
            return {
                "open_at": open_at,
                "entered_at": entered_at,
                "verified_at": verified_at,
                "peers": len(state.peers),
                "wg_cpu": round(_cpu(tunnel.device.process.pid), 2),
                "our_cpu": round(time.process_time(), 2),
            }

    print(json.dumps(asyncio.run(run())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--device", action="store_true", help="also restore into wireguard-go")
    parser.add_argument("--prefix", default="gwb", help="lab name prefix (3 characters)")
    parser.add_argument("--restart-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.restart_child is not None:
        restart_child(args.restart_child)
        return
    with tempfile.TemporaryDirectory(prefix="registry-bench-") as tmp:
        result = bench(args.count, Path(tmp), args.device, args.prefix)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
