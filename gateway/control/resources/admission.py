"""The admission policy (``/api/v1/admission-policy``): which CVMs may register, at runtime.

``PUT`` takes the policy document (:meth:`AdmissionPolicy.from_json`: unknown keys and bad
hex are refused with the field named), stores it and swaps it in: the next registration is
judged by it, without a restart; it survives restarts. ``DELETE`` forgets the runtime policy
so the configuration file's ``[admission]`` applies again. ``source`` says which is in force.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.attest.policy_settings import TCB_STATUSES, AdmissionPolicy, PolicyError
from gateway.control.admin import json_response, read_json
from gateway.control.errors import ApiError
from gateway.control.resources.common import (
    BOOL,
    INT,
    STR,
    array,
    guarded,
    if_match,
    obj,
    with_etag,
)
from gateway.control.routes import Endpoint
from gateway.control.state import OperatorState

HEX = {"type": "string", "pattern": "^(0x)?[0-9a-fA-F]+$"}
OS_IMAGE = obj(
    {"name": STR, "mrtd": HEX, "rtmr0": HEX, "rtmr1": HEX, "rtmr2": HEX},
    ("mrtd", "rtmr0", "rtmr1", "rtmr2"),
)
POLICY = obj(
    {
        "allow_any_app": BOOL,
        "app_ids": array(HEX),
        "compose_hashes": array(HEX),
        "os_image_hashes": array(HEX),
        "os_images": array(OS_IMAGE),
        "allowed_tcb_statuses": array({"enum": list(TCB_STATUSES)}),
        "allow_kms_cert": BOOL,
    }
)
VIEW = obj(
    {
        "policy": POLICY,
        "source": {"enum": ["config", "admin"]},
        "revision": INT,
        "tcb_statuses": array(STR),
    },
    ("policy", "source", "revision"),
)


def admission_endpoints(state: OperatorState) -> list[Endpoint]:
    def view() -> dict[str, Any]:
        policy, source, revision = state.admission()
        return {
            "policy": policy.to_json(),
            "source": source,
            "revision": revision,
            "tcb_statuses": list(TCB_STATUSES),
        }

    async def get_policy(_: web.Request) -> web.Response:
        data = view()
        return with_etag(data, data["revision"])

    async def put_policy(request: web.Request) -> web.Response:
        expect = if_match(request)
        try:
            policy = AdmissionPolicy.from_json(await read_json(request))
        except PolicyError as exc:
            name = str(exc).split(":", 1)[0]
            raise ApiError(400, "invalid_field", str(exc), field=name) from None
        state.set_admission_policy(policy, expect)
        data = view()
        return with_etag(data, data["revision"])

    async def reset_policy(request: web.Request) -> web.Response:
        state.reset_admission_policy(if_match(request))
        return json_response(view())

    path, tag = "/api/v1/admission-policy", "admission"
    return [
        Endpoint(
            "GET",
            path,
            guarded(get_policy),
            "The admission policy in force",
            tag,
            response=VIEW,
            action="get",
        ),
        Endpoint(
            "PUT",
            path,
            guarded(put_policy),
            "Replace the admission policy (persisted)",
            tag,
            request=POLICY,
            response=VIEW,
            action="set",
        ),
        Endpoint(
            "DELETE",
            path,
            guarded(reset_policy),
            "Drop the runtime policy; the configuration file's applies",
            tag,
            response=VIEW,
            action="reset",
        ),
    ]
