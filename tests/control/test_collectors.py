"""Collectors fed by real traffic: RegisterCvm outcomes over real TLS, the proxy's counters.

The registration test reuses the RPC harness of ``test_registration`` (simulated TDX CVMs
with RA-TLS client certificates, a real SQLite registry) and wraps its app with
:func:`count_registrations`, as ``gateway/control/node.py`` does; it then reads the
``/metrics`` text the admin API would serve.
"""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import tests.control.test_registration as reg
from gateway.control.collectors import RegistrationStats, count_registrations, proxy_collector
from gateway.control.metrics import render
from gateway.control.registration import Advertised, create_rpc_app
from gateway.registry.service import Registry
from gateway.registry.sqlite import SqliteStore
from gateway.tee.sim_pki import SimPki
from gateway.tunnel.ipalloc import AddressPlan
from gateway.tunnel.keys import generate_private_key, public_key


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """``name``'s samples from exposition ``text``, parsed by the reference parser."""
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_registrations_are_counted_by_final_outcome(
    pki: SimPki, kms_ca: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stats = RegistrationStats()
    monkeypatch.setattr(
        reg, "create_rpc_app", lambda s: count_registrations(create_rpc_app(s), stats)
    )
    # a pool of one client address (10.0.0.2), so the second CVM finds none
    plan = AddressPlan(
        ipaddress.IPv4Interface("10.0.0.1/24"),
        ipaddress.IPv4Network("10.0.0.0/30"),
        (ipaddress.IPv4Network("10.0.0.1/32"),),
    )
    store = SqliteStore(tmp_path / "registry.sqlite3")
    registry = Registry(store, plan, clock=time.time)
    adv = Advertised(public_key(generate_private_key()), "10.0.0.1/24", "192.0.2.1:51820")
    try:
        with reg.serve(tmp_path, pki, kms_ca, registry, adv) as rpc:
            cvms = [
                reg.make_cvm(pki, tmp_path / f"c{i}", bytes([0x60 + i]) * 20, kms_ca)
                for i in range(2)
            ]
            shared = {"client_public_key": public_key(generate_private_key())}
            assert rpc.post(cvms[0], shared)[0] == 200
            assert rpc.post(cvms[0], shared)[0] == 200  # a refresh keeps its address
            assert rpc.post(cvms[1], shared)[1]["reason"] == "key_in_use"
            other = {"client_public_key": public_key(generate_private_key())}
            assert rpc.post(cvms[1], other)[1]["reason"] == "pool_exhausted"
            stranger = reg.make_cvm(pki, tmp_path / "s", b"\x70" * 20, kms_ca, app="00" * 20)
            assert rpc.post(stranger, other)[1]["reason"] == "app_not_allowed"
            assert rpc.post(None, other)[1]["reason"] == "no_evidence"
            assert rpc.post(cvms[0], b"{nope")[1]["reason"] == "bad_request"
            assert rpc.post(None, {}, path="/prpc/Info")[0] == 200  # not a registration
    finally:
        store.close()
    got = samples(render(stats.collect()), "gateway_registrations_total")
    assert got == {
        (("outcome", "accepted"), ("reason", "ok")): 2,
        (("outcome", "rejected"), ("reason", "key_in_use")): 1,
        (("outcome", "rejected"), ("reason", "pool_exhausted")): 1,
        (("outcome", "rejected"), ("reason", "app_not_allowed")): 1,
        (("outcome", "rejected"), ("reason", "no_evidence")): 1,
        (("outcome", "rejected"), ("reason", "bad_request")): 1,
    }


def test_proxy_collector_exposes_tls_and_per_app_connections() -> None:
    counters = {
        "open": 3,
        "tls_handshakes": 7,
        "tls_resumed": 2,
        "tls_failures": {"timeout": 1, "tlsv1_alert_unknown_ca": 2},
        "app_open": {"app-a": 2, "app-b": 1, "gone": 0},
    }
    text = render(proxy_collector(lambda: counters)())
    assert samples(text, "gateway_tls_handshakes_total") == {(): 7}
    assert samples(text, "gateway_tls_resumed_handshakes_total") == {(): 2}
    assert samples(text, "gateway_tls_handshake_failures_total") == {
        (("reason", "timeout"),): 1,
        (("reason", "tlsv1_alert_unknown_ca"),): 2,
    }
    assert samples(text, "gateway_app_connections_open") == {
        (("app_id", "app-a"),): 2,
        (("app_id", "app-b"),): 1,
    }


pki = reg.pki
kms_ca = reg.kms_ca
