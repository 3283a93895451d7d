"""Registry at scale: 10 000 instances. ``python -m benchmarks.registry_bench [--device]``.

Measures, on a fresh SQLite store in a temporary directory:

* insert: N registrations through :class:`Registry` (key check, address choice, CAS write);
* memory: Python heap peak while inserting and held by all N records loaded (tracemalloc),
  the database size and the process's max RSS;
* lookups: by instance id, by public key, by address (random keys, per operation);
* reopen/restore: open the file again and build the desired peer set (target < 10 s);
* handshake poll: :meth:`Registry.observe` on a 10 000-peer state, all changed / none;
* ``--device`` (root, wireguard-go): apply those N peers to a fresh wireguard-go device in
  a lab namespace, read its state back (the handshake timer's cost) and record it.

Prints one JSON object; numbers are seconds unless the key says otherwise.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
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


def bench(count: int, workdir: Path, device: bool) -> dict[str, Any]:
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
            PeerState(r.public_key, (), "172.30.0.10:9182", time.time() - n % 120, 1, 1, 25)
            for n, r in enumerate(before.values())
        ),
    )
    t, newer = _timed(registry.observe, state)
    out["observe_all_changed"] = round(t, 3)
    assert newer == count
    out["observe_unchanged"] = round(_timed(registry.observe, state)[0], 4)

    if device:
        out.update(_device_bench(registry, workdir))
    store.close()
    out["max_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def _device_bench(registry: Registry, workdir: Path) -> dict[str, Any]:
    from gateway.lab.harness import Lab, cleanup_leftovers

    cleanup_leftovers("gwh")
    out: dict[str, Any] = {}
    with Lab(cvms=0, workdir=workdir / "lab", wg_address=PLAN.interface) as lab:
        assert lab.gateway is not None
        registry.device = lab.gateway
        # endpoint hints off: the synthetic endpoints are not on the lab's link, and greeting
        # absent neighbours blocks wireguard-go until ARP gives up (see docs/tunnel.md)
        t, result = _timed(lambda: registry.restore(hint_max_age=0))
        out["device_restore"] = round(t, 3)
        out["device_peers_added"] = len(result.added)
        t, state = _timed(lab.gateway.state)
        out["device_state_read"] = round(t, 3)
        out["device_state_peers"] = len(state.peers)
        t, again = _timed(lambda: registry.restore(hint_max_age=0))
        out["device_resync_noop"] = round(t, 3)
        assert not (again.added or again.updated or again.removed)
        if lab.gateway.process is not None:
            status = Path(f"/proc/{lab.gateway.process.pid}/status").read_text()
            rss = next(line for line in status.splitlines() if line.startswith("VmRSS"))
            out["wireguard_go_rss_mib"] = round(int(rss.split()[1]) / 1024, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--device", action="store_true", help="also restore into wireguard-go")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="registry-bench-") as tmp:
        result = bench(args.count, Path(tmp), args.device)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
