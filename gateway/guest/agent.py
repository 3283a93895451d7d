"""The guest agent's HTTP faces: dstack.sock (``/<Method>``) and tappd.sock (legacy).

Compatible with the PyPI ``dstack-sdk`` 0.5.x: the SDK POSTs compact JSON with
``Content-Type: application/json`` to ``/<Method>`` (``/prpc/Tappd.<Method>`` for the
deprecated Tappd client) and parses the replies with strict pydantic models. Handlers only
decode arguments and call :class:`~gateway.guest.service.AgentService`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

from gateway.guest import certs, kdf, prpc
from gateway.guest.prpc import Args, Method, RpcError
from gateway.guest.service import AgentService

__all__ = ["SERVICE_KEY", "create_agent_app", "create_tappd_app", "dstack_methods"]

SERVICE_KEY = web.AppKey("guest_agent_service", AgentService)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _leaf_request(args: Args, subject_default: str = "") -> certs.LeafRequest:
    return certs.LeafRequest(
        subject=prpc.get_str(args, "subject", subject_default),
        alt_names=prpc.get_str_list(args, "alt_names"),
        usage_server_auth=prpc.get_bool(args, "usage_server_auth", False),
        usage_client_auth=prpc.get_bool(args, "usage_client_auth", False),
        not_before=prpc.get_int(args, "not_before"),
        not_after=prpc.get_int(args, "not_after"),
    )


def dstack_methods(svc: AgentService) -> dict[str, Method]:
    """The DstackGuest service (dstack.sock)."""

    async def get_key(a: Args) -> object:
        return svc.get_key(
            prpc.get_str(a, "path"), prpc.get_str(a, "purpose"), prpc.get_str(a, "algorithm")
        )

    async def get_quote(a: Args) -> object:
        return await svc.get_quote(prpc.get_bytes(a, "report_data", 1024))

    async def attest(a: Args) -> object:
        return await svc.attest(prpc.get_bytes(a, "report_data", 1024))

    async def info(a: Args) -> object:
        return svc.info()

    async def emit_event(a: Args) -> object:
        await svc.emit_event(prpc.get_str(a, "event"), prpc.get_bytes(a, "payload"))
        return None

    async def get_tls_key(a: Args) -> object:
        return await svc.get_tls_key(
            _leaf_request(a),
            usage_ra_tls=prpc.get_bool(a, "usage_ra_tls"),
            with_app_info=prpc.get_bool(a, "with_app_info"),
        )

    async def sign(a: Args) -> object:
        return svc.sign(prpc.get_str(a, "algorithm"), prpc.get_bytes(a, "data"))

    async def verify(a: Args) -> object:
        valid = svc.verify(
            prpc.get_str(a, "algorithm"),
            prpc.get_bytes(a, "data"),
            prpc.get_bytes(a, "signature"),
            prpc.get_bytes(a, "public_key"),
        )
        return {"valid": valid}

    async def version(a: Args) -> object:
        return svc.version()

    return {
        "GetKey": get_key,
        "GetQuote": get_quote,
        "Attest": attest,
        "Info": info,
        "EmitEvent": emit_event,
        "GetTlsKey": get_tls_key,
        "Sign": sign,
        "Verify": verify,
        "Version": version,
    }


def tappd_methods(svc: AgentService) -> dict[str, Method]:
    """The legacy Tappd service (tappd.sock)."""

    async def tdx_quote(a: Args) -> object:
        return await svc.tdx_quote(
            prpc.get_bytes(a, "report_data", 1024),
            prpc.get_str(a, "hash_algorithm"),
            prpc.get_str(a, "prefix"),
        )

    async def raw_quote(a: Args) -> object:
        return await svc.tdx_quote(prpc.get_bytes(a, "report_data", 1024), "raw", "")

    async def derive_key(a: Args) -> object:
        path = prpc.get_str(a, "path")
        if prpc.get_bool(a, "random_seed"):
            key = None
        else:
            key = kdf.derive_p256(svc.state.keys.k256_key, [path.encode()])
        return await svc.get_tls_key(
            _leaf_request(a, subject_default=path),
            usage_ra_tls=prpc.get_bool(a, "usage_ra_tls"),
            with_app_info=False,
            key=key,
        )

    async def derive_k256_key(a: Args) -> object:
        return svc.derive_k256_key(prpc.get_str(a, "path"), prpc.get_str(a, "purpose"))

    async def info(a: Args) -> object:
        return svc.info()

    async def version(a: Args) -> object:
        return svc.version()

    return {
        "TdxQuote": tdx_quote,
        "RawQuote": raw_quote,
        "DeriveKey": derive_key,
        "DeriveK256Key": derive_k256_key,
        "Info": info,
        "Version": version,
    }


def _route(methods: Mapping[str, Method], strip: str = "") -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        name = request.match_info["method"]
        if strip and name.startswith(strip):
            name = name[len(strip) :]
        return await prpc.dispatch(request, methods, name)

    return handler


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except RpcError as exc:
        return prpc.error_response(str(exc), exc.status)


def create_agent_app(svc: AgentService) -> web.Application:
    """The dstack.sock app: ``POST|GET /<Method>``."""
    app = web.Application(middlewares=[_errors], client_max_size=prpc.MAX_BODY)
    app[SERVICE_KEY] = svc
    handler = _route(dstack_methods(svc))
    app.router.add_routes([web.post("/{method}", handler), web.get("/{method}", handler)])
    return app


def create_tappd_app(svc: AgentService) -> web.Application:
    """The tappd.sock app: ``/prpc/<Method>`` or ``/prpc/Tappd.<Method>``."""
    app = web.Application(middlewares=[_errors], client_max_size=prpc.MAX_BODY)
    app[SERVICE_KEY] = svc
    handler = _route(tappd_methods(svc), strip="Tappd.")
    app.router.add_routes([web.post("/prpc/{method}", handler), web.get("/prpc/{method}", handler)])
    return app
