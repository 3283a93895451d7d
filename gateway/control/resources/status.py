"""The status document (``GET /api/v1/status``) and upstream-compatible ``/prpc`` aliases.

Status composes: ``node`` (id, version, uptime), ``connections`` (open client connections),
``accel`` (the data plane's acceleration modes, as upstream's ``ProxyAccelStatus``),
``counters`` (flat numbers the dashboard shows as tiles), ``proxy`` (the data plane's full
counters), ``instances``, ``apps`` and ``domains`` (tables for the dashboard).

Connections are counted by the proxy workers per app (``app_open``, which also backs the
per-app limit) and per backend address (``upstream_open``). An instance row shows its own
``connections`` (those relayed to its tunnel address) and its app's ``app_connections``;
upstream's per-host ``num_connections`` in ``/prpc/Status`` is the instance's own, and the
app's total is in the extra ``app_num_connections`` field.

Our admin API is REST-style JSON under ``/api/v1``, not pRPC. For scripts written against
upstream, the most used admin RPCs answer at ``/prpc/<Method>`` (GET or POST) with upstream's
field names: ``Status``, ``GetMeta``, ``ListZtDomains``, ``RenewCert``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from gateway.certs.errors import CertError
from gateway.control.admin import StatusFn, json_response
from gateway.control.certmanager import AcmeDisabled, CertManager
from gateway.control.errors import ApiError
from gateway.control.resources.common import BOOL, INT, array, obj
from gateway.control.routes import Endpoint
from gateway.control.state import OperatorState
from gateway.registry.service import Registry

ONLINE_WINDOW = 300.0
Counters = Callable[[], Mapping[str, Any]]


def status_document(
    *,
    node: Mapping[str, Any],
    registry: Registry,
    state: OperatorState,
    certs: CertManager,
    counters: Counters = dict,
    accel: Counters = dict,
    clock: Callable[[], float] = time.time,
) -> StatusFn:
    """The ``status`` callable for :func:`gateway.control.admin.create_admin_app`."""
    started = clock()

    def status() -> dict[str, Any]:
        now = clock()
        proxy = dict(counters())
        drained = set(state.drained())
        records = registry.store.list_instances()
        app_open = _counts(proxy, "app_open")
        upstream_open = _counts(proxy, "upstream_open")
        instances = [
            {
                "instance_id": r.instance_id,
                "app_id": r.app_id,
                "ip": str(r.ip),
                "online": r.last_handshake is not None and now - r.last_handshake < ONLINE_WINDOW,
                "draining": r.instance_id in drained,
                "last_handshake": r.last_handshake,
                "connections": upstream_open.get(str(r.ip), 0),
                "app_connections": app_open.get(r.app_id, 0),
            }
            for r in records
        ]
        apps: dict[str, dict[str, Any]] = {}
        for r in records:
            a = apps.setdefault(
                r.app_id,
                {
                    "app_id": r.app_id,
                    "instances": 0,
                    "online": 0,
                    "connections": app_open.get(r.app_id, 0),
                },
            )
            a["instances"] += 1
            a["online"] += 1 if r.last_handshake and now - r.last_handshake < ONLINE_WINDOW else 0
        for app_id, n in app_open.items():  # e.g. a custom-domain route to a removed app
            apps.setdefault(app_id, {"app_id": app_id, "instances": 0, "online": 0})
            apps[app_id]["connections"] = n
        domains = []
        for d in state.domains():
            st = certs.status(d.domain)
            not_after = st["not_after"]
            domains.append(
                {
                    "domain": d.domain,
                    "port": d.port,
                    "serial": st["serial"],
                    "not_after": time.strftime("%Y-%m-%d %H:%M", time.gmtime(not_after))
                    if not_after
                    else None,
                    "days_left": round((not_after - now) / 86400, 1) if not_after else None,
                    "failures": st["failures"],
                }
            )
        tiles: dict[str, Any] = {
            "instances_registered": len(records),
            "instances_online": sum(1 for i in instances if i["online"]),
            "instances_draining": sum(1 for i in instances if i["draining"]),
            "base_domains": len(domains),
        }
        tiles.update(
            {k: v for k, v in proxy.items() if isinstance(v, int) and not isinstance(v, bool)}
        )
        failures = proxy.get("tls_failures")
        if isinstance(failures, dict):
            tiles["tls_handshake_failures"] = sum(int(v) for v in failures.values())
        return {
            "node": {**node, "uptime_s": round(now - started)},
            "connections": int(proxy.get("open", 0)),
            "accel": dict(accel()),
            "counters": tiles,
            "proxy": proxy,
            "instances": instances,
            "apps": sorted(apps.values(), key=lambda a: (-a["connections"], a["app_id"])),
            "domains": domains,
        }

    return status


def _counts(proxy: Mapping[str, Any], key: str) -> dict[str, int]:
    raw = proxy.get(key)
    if not isinstance(raw, Mapping):
        return {}
    return {str(k): int(v) for k, v in raw.items() if isinstance(v, int) and v > 0}


def prpc_endpoints(status: StatusFn, state: OperatorState, certs: CertManager) -> list[Endpoint]:
    """Upstream-shaped aliases of the most used admin RPCs."""

    async def prpc_status(_: web.Request) -> web.Response:
        s = status()
        node = s["node"]
        return json_response(
            {
                "id": node.get("id"),
                "url": node.get("url", ""),
                "uuid": node.get("uuid", ""),
                "num_connections": s["connections"],
                "hosts": [
                    {
                        "instance_id": i["instance_id"],
                        "ip": i["ip"],
                        "app_id": i["app_id"],
                        "base_domain": s["domains"][0]["domain"] if s["domains"] else "",
                        "latest_handshake": int(i["last_handshake"] or 0),
                        "num_connections": i["connections"],
                        "app_num_connections": i["app_connections"],
                    }
                    for i in s["instances"]
                ],
                "accel": s["accel"],
            }
        )

    async def get_meta(_: web.Request) -> web.Response:
        c = status()["counters"]
        return json_response(
            {"registered": c["instances_registered"], "online": c["instances_online"]}
        )

    async def list_zt_domains(_: web.Request) -> web.Response:
        out = []
        for d in state.domains():
            st = certs.status(d.domain)
            out.append(
                {
                    "config": {"domain": d.domain, "dns_cred_id": d.dns_credential, "port": d.port},
                    "cert_status": {
                        "has_cert": st["has_cert"],
                        "not_after": int(st["not_after"] or 0),
                        "issued_by": "",
                        "issued_at": int(st["not_before"] or 0),
                        "loaded_in_memory": st["has_cert"],
                    },
                }
            )
        return json_response({"domains": out})

    async def renew_cert(_: web.Request) -> web.Response:
        renewed = False
        try:
            for d in state.domains():
                renewed = (await certs.renew(d.domain, force=False)).renewed or renewed
        except AcmeDisabled as exc:
            raise ApiError(409, "acme_disabled", str(exc)) from None
        except CertError as exc:
            raise ApiError(502, "issuance_failed", str(exc)) from None
        return json_response({"renewed": renewed})

    out: list[Endpoint] = []
    schema_status = obj(
        {"id": {}, "num_connections": INT, "hosts": array(obj({}, extra=True))}, extra=True
    )
    for name, handler, summary, schema in (
        ("Status", prpc_status, "Upstream Status (hosts, connections)", schema_status),
        (
            "GetMeta",
            get_meta,
            "Upstream GetMeta (registered, online)",
            obj({"registered": INT, "online": INT}),
        ),
        (
            "ListZtDomains",
            list_zt_domains,
            "Upstream ListZtDomains",
            obj({"domains": array(obj({}, extra=True))}),
        ),
        (
            "RenewCert",
            renew_cert,
            "Upstream RenewCert (renew due certificates)",
            obj({"renewed": BOOL}),
        ),
    ):
        for method in ("GET", "POST"):
            out.append(
                Endpoint(
                    method,
                    f"/prpc/{name}",
                    handler,
                    summary,
                    "prpc",
                    response=schema,
                    action=f"{name}" if method == "POST" else f"{name}-get",
                )
            )
    return out
