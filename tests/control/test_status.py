"""The status document, ``/prpc/Status`` and ``/metrics`` fed by the proxy's per-app counts.

A real SQLite registry with registered instances and a real admin app on loopback; the
proxy counters are the ``read_stats`` shape (written by real workers in the e2e tests).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path
from typing import Any

from gateway.certs.settings import AcmeSettings
from gateway.control.auth import Credentials
from gateway.control.auth_webhook import WebhookOutcome, WebhookStats
from gateway.control.certmanager import CertManager
from gateway.control.plane import build_admin_app
from gateway.control.state import OperatorState
from gateway.registry.service import Registration, Registry
from gateway.registry.sqlite import SqliteStore
from gateway.tunnel.keys import generate_private_key, public_key
from gateway.tunnel.settings import WgSettings
from tests.control.test_admin import serve
from tests.control.test_collectors import samples

TOKEN = "status-token-" + "s" * 20
SOLO, PAIR = "a1" * 20, "b2" * 20
COUNTERS: dict[str, Any] = {
    "open": 5,
    "tls_handshakes": 9,
    "tls_failures": {"timeout": 2},
    "app_open": {SOLO: 2, PAIR: 3},
    "upstream_open": {},  # filled in below with the instances' addresses
}


def test_connections_per_app_in_status_prpc_and_metrics(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "r.sqlite3")
    registry = Registry(store, WgSettings().plan(), clock=time.time)
    ips = {}
    for iid, app_id in (("solo-1", SOLO), ("pair-1", PAIR), ("pair-2", PAIR)):
        rec = registry.register(Registration(iid, app_id, public_key(generate_private_key())))
        ips[iid] = str(rec.ip)
    # as the workers count them: per backend address (pair-1 has none open)
    COUNTERS["upstream_open"] = {ips["solo-1"]: 2, ips["pair-2"]: 3, "192.0.2.9": 1}
    state = OperatorState(store)
    certs = CertManager(
        AcmeSettings(), state=state, certs_dir=tmp_path / "c", acme=None, on_change=lambda: None
    )
    webhook = WebhookStats()
    webhook.outcomes[WebhookOutcome.DENIED] += 3  # as AuthWebhook counts its answers
    app = build_admin_app(
        creds=Credentials(token_digest=hashlib.sha256(TOKEN.encode()).digest()),
        state=state,
        registry=registry,
        certs=certs,
        node={"id": "n"},
        counters=lambda: COUNTERS,
        webhook=webhook,
    )

    async def main() -> None:
        async with serve(app) as client:
            h = {"X-Admin-Token": TOKEN}
            s = (await client.get("/api/v1/status", headers=h)).json()
            rows = {i["instance_id"]: i for i in s["instances"]}
            assert rows["solo-1"]["app_connections"] == 2
            assert rows["pair-2"]["app_connections"] == 3
            # each instance's own connections (a static backend's count belongs to no row)
            assert [rows[i]["connections"] for i in ("solo-1", "pair-1", "pair-2")] == [2, 0, 3]
            assert s["apps"] == [
                {"app_id": PAIR, "instances": 2, "online": 0, "connections": 3},
                {"app_id": SOLO, "instances": 1, "online": 0, "connections": 2},
            ]
            assert s["counters"]["tls_handshakes"] == 9
            assert s["counters"]["tls_handshake_failures"] == 2
            hosts = (await client.post("/prpc/Status", headers=h)).json()["hosts"]
            by_id = {x["instance_id"]: x for x in hosts}
            # upstream's per-host figure is the instance's own; the app's total beside it
            assert by_id["solo-1"]["num_connections"] == 2
            assert by_id["pair-1"]["num_connections"] == 0
            assert by_id["pair-2"]["num_connections"] == 3
            assert by_id["pair-1"]["app_num_connections"] == 3
            text = (await client.get("/metrics", headers=h)).text
            assert samples(text, "gateway_app_connections_open")[(("app_id", SOLO),)] == 2
            assert samples(text, "gateway_tls_handshake_failures_total") == {
                (("reason", "timeout"),): 2
            }
            assert (
                samples(text, "gateway_registration_webhook_total")[
                    (("outcome", WebhookOutcome.DENIED.value),)
                ]
                == 3
            )

    try:
        asyncio.run(main())
    finally:
        store.close()
