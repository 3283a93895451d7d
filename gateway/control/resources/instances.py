"""Instances, apps, drain and port-policy overrides (``/api/v1/instances``, ``/api/v1/apps``).

* ``GET /instances``: every registered CVM, with ``online`` (a WireGuard handshake within
  :data:`ONLINE_WINDOW` seconds, upstream's ``GetMeta`` rule) and ``draining``.
* ``DELETE /instances/{id}``: remove it now (record, address, WireGuard peer).
* ``POST|DELETE /instances/{id}/drain``: stop / resume routing *new* connections to it;
  connections already open are not touched. Persisted, so a restart keeps draining.
* ``GET|PUT|DELETE /instances/{id}/port-policy``: the effective policy and where it comes
  from (``admin`` override, else what the ``instance`` reported, else ``none`` = denied),
  as upstream's ``GetInstancePortPolicy`` answers.
* ``GET /apps``: instances grouped by app id.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from gateway.control.admin import json_response, read_json
from gateway.control.errors import ApiError
from gateway.control.models import PortPolicyOverride
from gateway.control.resources.common import (
    BOOL,
    INT,
    NULLABLE_NUM,
    PORT_POLICY,
    STR,
    array,
    guarded,
    if_match,
    obj,
    with_etag,
)
from gateway.control.routes import Endpoint
from gateway.control.state import OperatorState
from gateway.registry.records import InstanceRecord
from gateway.registry.service import Registry

ONLINE_WINDOW = 300.0

INSTANCE = obj(
    {
        "instance_id": STR,
        "app_id": STR,
        "ip": STR,
        "registered_at": {"type": "number"},
        "last_seen": {"type": "number"},
        "last_handshake": NULLABLE_NUM,
        "online": BOOL,
        "draining": BOOL,
        "port_policy_source": {"enum": ["admin", "instance", "none"]},
    },
    ("instance_id", "app_id", "ip", "online", "draining"),
    extra=True,
)
DETAIL = obj(
    {
        **INSTANCE["properties"],
        "public_key": STR,
        "evidence": {"type": "object"},
        "handshakes": array(obj({"node_id": STR, "handshake_at": {"type": "number"}}, extra=True)),
        "drain_since": NULLABLE_NUM,
    },
    ("instance_id", "app_id", "ip"),
    extra=True,
)
APP = obj(
    {"app_id": STR, "instances": INT, "online": INT, "draining": INT, "instance_ids": array(STR)},
    ("app_id", "instances"),
)
NULLABLE_POLICY = {"oneOf": [PORT_POLICY, {"type": "null"}]}
POLICY_VIEW = obj(
    {
        "instance_id": STR,
        "effective": NULLABLE_POLICY,
        "source": {"enum": ["admin", "instance", "none"]},
        "instance_reported": NULLABLE_POLICY,
        "admin_override": NULLABLE_POLICY,
        "revision": INT,
    },
    ("instance_id", "effective", "source"),
)
DRAIN = obj({"instance_id": STR, "draining": BOOL, "since": NULLABLE_NUM}, ("draining",))
REMOVED = obj({"deleted": STR, "id": STR})


def instance_endpoints(
    state: OperatorState, registry: Registry, clock: Callable[[], float] = time.time
) -> list[Endpoint]:
    store = registry.store

    def summary(r: InstanceRecord, drained: set[str], overrides: set[str]) -> dict[str, Any]:
        source = _policy_source(r.instance_id in overrides, r.port_policy is not None)
        return {
            "instance_id": r.instance_id,
            "app_id": r.app_id,
            "ip": str(r.ip),
            "registered_at": r.registered_at,
            "last_seen": r.last_seen,
            "last_handshake": r.last_handshake,
            "online": _online(r, clock()),
            "draining": r.instance_id in drained,
            "port_policy_source": source,
        }

    def listing() -> list[dict[str, Any]]:
        drained = set(state.drained())
        overrides = {o.instance_id for o in state.port_policy_overrides()}
        return [summary(r, drained, overrides) for r in store.list_instances()]

    def get_record(instance_id: str) -> InstanceRecord:
        record = store.get_instance(instance_id)
        if record is None:
            raise ApiError(404, "not_found", f"no instance {instance_id!r} is registered")
        return record

    async def list_instances(_: web.Request) -> web.Response:
        return json_response(listing())

    async def get_instance(request: web.Request) -> web.Response:
        r = get_record(request.match_info["instance_id"])
        drains = state.drained()
        out = summary(
            r, set(drains), {r.instance_id} if state.port_policy_override(r.instance_id) else set()
        )
        out.update(
            public_key=r.public_key,
            evidence=dict(r.evidence),
            handshakes=[
                {"node_id": h.node_id, "handshake_at": h.handshake_at, "endpoint": h.endpoint}
                for h in store.handshakes(r.instance_id)
            ],
            drain_since=drains[r.instance_id].since if r.instance_id in drains else None,
        )
        return with_etag(out, r.revision)

    async def remove_instance(request: web.Request) -> web.Response:
        instance_id = request.match_info["instance_id"]
        if not await asyncio.to_thread(registry.unregister, instance_id):  # device I/O
            raise ApiError(404, "not_found", f"no instance {instance_id!r} is registered")
        state.set_drain(instance_id, False)
        return json_response({"deleted": "instance", "id": instance_id})

    async def drain(request: web.Request) -> web.Response:
        r = get_record(request.match_info["instance_id"])
        d = state.set_drain(r.instance_id, True)
        return json_response(
            {"instance_id": r.instance_id, "draining": True, "since": d.since if d else None}
        )

    async def undrain(request: web.Request) -> web.Response:
        instance_id = request.match_info["instance_id"]
        state.set_drain(instance_id, False)
        return json_response({"instance_id": instance_id, "draining": False, "since": None})

    def policy_view(r: InstanceRecord) -> dict[str, Any]:
        override = state.port_policy_override(r.instance_id)
        reported = dict(r.port_policy) if r.port_policy is not None else None
        admin = override.policy.to_json() if override else None
        return {
            "instance_id": r.instance_id,
            "effective": admin if admin is not None else reported,
            "source": _policy_source(admin is not None, reported is not None),
            "instance_reported": reported,
            "admin_override": admin,
            "revision": override.revision if override else 0,
        }

    async def get_policy(request: web.Request) -> web.Response:
        view = policy_view(get_record(request.match_info["instance_id"]))
        return with_etag(view, view["revision"])

    async def set_policy(request: web.Request) -> web.Response:
        expect = if_match(request)
        r = get_record(request.match_info["instance_id"])
        override = PortPolicyOverride.from_json(r.instance_id, await read_json(request))
        state.put_port_policy(override, expect)
        view = policy_view(r)
        return with_etag(view, view["revision"])

    async def clear_policy(request: web.Request) -> web.Response:
        r = get_record(request.match_info["instance_id"])
        state.delete_port_policy(r.instance_id, if_match(request))
        return json_response(policy_view(r))

    async def list_apps(_: web.Request) -> web.Response:
        apps: dict[str, dict[str, Any]] = {}
        for inst in listing():
            app = apps.setdefault(
                inst["app_id"],
                {
                    "app_id": inst["app_id"],
                    "instances": 0,
                    "online": 0,
                    "draining": 0,
                    "instance_ids": [],
                },
            )
            app["instances"] += 1
            app["online"] += int(inst["online"])
            app["draining"] += int(inst["draining"])
            app["instance_ids"].append(inst["instance_id"])
        return json_response(sorted(apps.values(), key=lambda a: a["app_id"]))

    async def get_app(request: web.Request) -> web.Response:
        app_id = request.match_info["app_id"]
        members = [i for i in listing() if i["app_id"] == app_id]
        if not members:
            raise ApiError(404, "not_found", f"no instance of app {app_id!r} is registered")
        return json_response({"app_id": app_id, "instances": members})

    base, item = "/api/v1/instances", "/api/v1/instances/{instance_id}"
    tag = "instances"
    return [
        Endpoint(
            "GET",
            base,
            guarded(list_instances),
            "List registered instances",
            tag,
            response=array(INSTANCE),
        ),
        Endpoint(
            "GET",
            item,
            guarded(get_instance),
            "One instance, with evidence summary",
            tag,
            response=DETAIL,
        ),
        Endpoint(
            "DELETE",
            item,
            guarded(remove_instance),
            "Remove an instance now (record, address, WireGuard peer)",
            tag,
            response=REMOVED,
        ),
        Endpoint(
            "POST",
            item + "/drain",
            guarded(drain),
            "Drain: no new connections to this instance (open ones continue)",
            tag,
            response=DRAIN,
            action="drain",
        ),
        Endpoint(
            "DELETE",
            item + "/drain",
            guarded(undrain),
            "Stop draining: route new connections to it again",
            tag,
            response=DRAIN,
            action="undrain",
        ),
        Endpoint(
            "GET",
            item + "/port-policy",
            guarded(get_policy),
            "Effective port policy and its source",
            "port-policy",
            response=POLICY_VIEW,
            action="get",
        ),
        Endpoint(
            "PUT",
            item + "/port-policy",
            guarded(set_policy),
            "Set an admin port-policy override",
            "port-policy",
            request=PORT_POLICY,
            response=POLICY_VIEW,
            action="set",
        ),
        Endpoint(
            "DELETE",
            item + "/port-policy",
            guarded(clear_policy),
            "Clear the admin override (the instance's own policy applies)",
            "port-policy",
            response=POLICY_VIEW,
            action="clear",
        ),
        Endpoint(
            "GET",
            "/api/v1/apps",
            guarded(list_apps),
            "Apps and their instance counts",
            "apps",
            response=array(APP),
        ),
        Endpoint(
            "GET",
            "/api/v1/apps/{app_id}",
            guarded(get_app),
            "One app's instances",
            "apps",
            response=obj({"app_id": STR, "instances": array(INSTANCE)}, ("app_id",)),
        ),
    ]


def _online(r: InstanceRecord, now: float) -> bool:
    return r.last_handshake is not None and now - r.last_handshake < ONLINE_WINDOW


def _policy_source(overridden: bool, reported: bool) -> str:
    """Upstream's ``GetInstancePortPolicy.source``: the override wins; none means denied."""
    return "admin" if overridden else "instance" if reported else "none"
