"""The CVM registration RPC: ``POST /prpc/RegisterCvm`` and ``/prpc/Info`` (pRPC, JSON).

Wire shapes follow upstream's ``gateway_rpc.proto`` with JSON field names (snake_case):

    RegisterCvmRequest  {client_public_key: base64 WG key,
                         port_policy?: {ports: [{port: u32, pp: bool}], restrict_mode: bool}}
    RegisterCvmResponse {wg: {client_ip, servers: [{pk, ip: "10.0.0.1/24", endpoint}]},
                         agent: {external_port, internal_port, domain, app_address_ns_prefix},
                         gateways: [{id, uuid, url, last_seen, wg_public_key, wg_ip,
                                     wg_endpoint}]}
    InfoResponse        {base_domain, external_port, app_address_ns_prefix, version}

Transport conventions (upstream ``rocket_helper.rs``): ``POST`` or ``GET``; the method may
carry the legacy ``Tproxy.`` prefix; JSON when ``Content-Type: application/json`` or
``?json`` (protobuf is not supported: such requests get 415 saying so); GET takes the query
string as the payload. Errors are ``{"error": text, "reason": code}``.

Authentication: the TLS client certificate. The listener (:mod:`gateway.control.tls_server`,
pyOpenSSL) asks for one (optional, so that ``Info`` stays public) and accepts any, so the
TLS layer proves only that the client holds the leaf's key; it hands the whole presented
chain (leaf first) to the handler. What admits a CVM is the evidence in that chain,
verified by :func:`gateway.attest.verifier.verify_with_source`: a self-signed RA-TLS
certificate (quote bound to the certificate key, RTMR3 replayed, identity decoded) or a
KMS-signed chain to the configured KMS root carrying app info (dstack compatibility); then
the admission policy. ``client_ca_file``, if set, is an extra TLS-layer requirement. Only
then is the instance registered (:class:`gateway.registry.service.Registry`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.utils import CryptographyDeprecationWarning

from gateway.attest.collateral import CollateralError, CollateralSource
from gateway.attest.evidence import EvidenceError, RejectReason, VerifiedEvidence
from gateway.attest.policy import Verdict
from gateway.attest.policy_settings import AdmissionPolicy
from gateway.attest.verifier import EvidenceResult, TrustAnchors, verify_with_source
from gateway.config import Config
from gateway.control.tls_server import PEER_CERT_CHAIN
from gateway.registry.records import InstanceRecord
from gateway.registry.service import (
    AppMismatch,
    InvalidRegistration,
    KeyInUse,
    PoolExhausted,
    Registration,
    Registry,
    RegistryError,
)
from gateway.tunnel.errors import TunnelError
from gateway.tunnel.keys import WgKeyError, decode_key
from gateway.util.bodies import BodyTooLarge, read_bounded

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_BODY",
    "Advertised",
    "advertised_from_config",
    "PortAttrs",
    "PortPolicy",
    "RegisterCvmRequest",
    "RegistrationService",
    "RpcError",
    "create_rpc_app",
    "evidence_check",
    "load_der_chain",
    "load_kms_root",
    "rpc_ssl_context",
]

MAX_BODY = 64 * 1024
MAX_PORTS = 1024
VERSION = "0.1.0"


class RpcError(Exception):
    """An RPC failure with the HTTP status and a stable ``reason`` code."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


# --- wire models ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PortAttrs:
    port: int
    pp: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"port": self.port, "pp": self.pp}


@dataclass(frozen=True, slots=True)
class PortPolicy:
    """Which ports the app exposes and whether each wants a PROXY header (upstream §2.9)."""

    ports: tuple[PortAttrs, ...] = ()
    restrict_mode: bool = False

    @classmethod
    def from_json(cls, value: Any) -> PortPolicy:
        if not isinstance(value, dict):
            raise RpcError(400, "bad_request", "port_policy must be an object")
        raw_ports = value.get("ports", [])
        restrict = value.get("restrict_mode", False)
        if not isinstance(raw_ports, list) or len(raw_ports) > MAX_PORTS:
            raise RpcError(400, "bad_request", f"port_policy.ports: a list of <= {MAX_PORTS}")
        if not isinstance(restrict, bool):
            raise RpcError(400, "bad_request", "port_policy.restrict_mode must be a boolean")
        ports = []
        for i, item in enumerate(raw_ports):
            port = item.get("port") if isinstance(item, dict) else None
            pp = item.get("pp", False) if isinstance(item, dict) else None
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                raise RpcError(400, "bad_request", f"port_policy.ports[{i}].port: 1-65535")
            if not isinstance(pp, bool):
                raise RpcError(400, "bad_request", f"port_policy.ports[{i}].pp must be boolean")
            ports.append(PortAttrs(port, pp))
        return cls(tuple(ports), restrict)

    def to_json(self) -> dict[str, Any]:
        return {"ports": [p.to_json() for p in self.ports], "restrict_mode": self.restrict_mode}


@dataclass(frozen=True, slots=True)
class RegisterCvmRequest:
    client_public_key: str
    port_policy: PortPolicy | None = None

    @classmethod
    def from_json(cls, value: Any) -> RegisterCvmRequest:
        if not isinstance(value, dict):
            raise RpcError(400, "bad_request", "the request body must be a JSON object")
        key = value.get("client_public_key")
        if not isinstance(key, str) or not key:
            raise RpcError(400, "bad_request", "client_public_key (base64 WireGuard key) needed")
        try:  # before any attestation work: a bad key costs nothing
            decode_key(key)
        except WgKeyError as exc:
            raise RpcError(400, "invalid_registration", f"client_public_key: {exc}") from None
        policy = value.get("port_policy")
        return cls(key, None if policy is None else PortPolicy.from_json(policy))


@dataclass(frozen=True, slots=True)
class Advertised:
    """What this gateway tells CVMs: its tunnel identity and where apps are published.

    ``wg_ip`` is the interface address with prefix (``10.0.0.1/24``), as upstream sends it.
    """

    wg_public_key: str
    wg_ip: str
    wg_endpoint: str
    url: str = "https://localhost:8010"
    base_domain: str = ""
    external_port: int = 443
    agent_port: int = 8090
    app_address_ns_prefix: str = "_dstack-app-address"
    node_id: int = 0


def advertised_from_config(cfg: Config, wg_public_key: str) -> Advertised:
    """What the RPC tells CVMs about this gateway, from ``[wg]``, ``[rpc]`` and the first
    base domain (``proxy.base_domains``, else ``[[acme.domains]]``; the node replaces it
    with the operator's base domains when it has any). Without one, CVMs get ``""``, as
    upstream sends when it has no base domain."""
    bases = [*cfg.proxy.base_domains, *(d.base_domain for d in cfg.acme.domains)]
    return Advertised(
        wg_public_key=wg_public_key,
        wg_ip=cfg.wg.ip,
        wg_endpoint=cfg.wg.endpoint,
        url=cfg.rpc.url,
        base_domain=bases[0] if bases else "",
    )


def evidence_summary(evidence: VerifiedEvidence, now: float) -> dict[str, Any]:
    """What the registry keeps about an admission: enough to audit, not the raw quote."""
    ident = evidence.identity
    out: dict[str, Any] = {
        "method": evidence.method.value,
        "compose_hash": ident.compose_hash.hex(),
        "os_image_hash": ident.os_image_hash.hex(),
        "tcb_status": evidence.tcb_status,
        "advisory_ids": list(evidence.advisory_ids),
        "mr_aggregated": evidence.mr_aggregated.hex(),
        "verified_at": int(now),
    }
    if evidence.measurements is not None:
        out["mr_td"] = evidence.measurements.mr_td.hex()
        out["rtmr3"] = evidence.measurements.rtmr3.hex()
    return out


# --- the service ---------------------------------------------------------------------------

#: Verifies a DER client certificate chain (leaf first) and applies the admission policy.
EvidenceCheck = Callable[[list[bytes]], Awaitable[EvidenceResult]]


@dataclass
class RegistrationService:
    """Decode, verify, admit, register, answer. Handlers only translate HTTP to this."""

    registry: Registry
    check: EvidenceCheck
    advertised: Advertised
    clock: Callable[[], float] = time.time
    # Called (never awaited) for an instance left without a port policy: see
    # gateway.control.policy_fetch.PortPolicyFetcher.schedule. None: the policy stays unknown.
    policy_fetch: Callable[[InstanceRecord], object] | None = None
    _admitted: int = field(default=0, init=False)

    async def register(self, chain: list[bytes], req: RegisterCvmRequest) -> dict[str, Any]:
        if not chain:
            raise RpcError(
                401, "no_evidence", "RegisterCvm needs an RA-TLS client certificate (mutual TLS)"
            )
        try:
            result = await self.check(chain)
        except CollateralError as exc:  # not the CVM's fault: let it retry
            raise RpcError(503, "collateral_unavailable", f"try again later: {exc}") from None
        verdict, evidence = result.verdict, result.evidence
        if not verdict.accepted or evidence is None:
            reason = verdict.reason.value if verdict.reason else "refused"
            who = evidence.identity.app_id.hex() if evidence is not None else "unknown app"
            logger.warning("registration refused (%s) for %s: %s", reason, who, verdict.detail)
            raise RpcError(403, reason, f"attestation refused: {verdict.detail}")
        ident = evidence.identity
        if not ident.instance_id:
            raise RpcError(403, "no_instance_id", "apps without an instance id cannot register")
        try:
            registration = Registration(
                instance_id=ident.instance_id.hex(),
                app_id=ident.app_id.hex(),
                public_key=req.client_public_key,
                port_policy=None if req.port_policy is None else req.port_policy.to_json(),
                evidence=evidence_summary(evidence, self.clock()),
            )
            record = await asyncio.to_thread(self.registry.register, registration)
        except InvalidRegistration as exc:
            raise RpcError(400, exc.code, str(exc)) from None
        except (KeyInUse, AppMismatch) as exc:
            raise RpcError(409, exc.code, str(exc)) from None
        except PoolExhausted as exc:
            raise RpcError(503, "pool_exhausted", str(exc)) from None
        except (RegistryError, TunnelError) as exc:
            logger.error("registration of %s failed: %s", ident.instance_id.hex(), exc)
            raise RpcError(503, "unavailable", f"registration failed, try again: {exc}") from None
        self._admitted += 1
        if record.port_policy is None and self.policy_fetch is not None:
            self.policy_fetch(record)  # starts a background task; the answer does not wait
        return self.response(str(record.ip))

    def response(self, client_ip: str) -> dict[str, Any]:
        adv = self.advertised
        return {
            "wg": {
                "client_ip": client_ip,
                "servers": [
                    {"pk": adv.wg_public_key, "ip": adv.wg_ip, "endpoint": adv.wg_endpoint}
                ],
            },
            "agent": {
                "external_port": adv.external_port,
                "internal_port": adv.agent_port,
                "domain": adv.base_domain,
                "app_address_ns_prefix": adv.app_address_ns_prefix,
            },
            "gateways": [
                {
                    "id": adv.node_id,
                    "uuid": "",
                    "url": adv.url,
                    "last_seen": int(self.clock()),
                    "wg_public_key": adv.wg_public_key,
                    "wg_ip": adv.wg_ip,
                    "wg_endpoint": adv.wg_endpoint,
                }
            ],
        }

    def info(self) -> dict[str, Any]:
        adv = self.advertised
        return {
            "base_domain": adv.base_domain,
            "external_port": adv.external_port,
            "app_address_ns_prefix": adv.app_address_ns_prefix,
            "version": VERSION,
        }


# --- HTTP ----------------------------------------------------------------------------------

SERVICE_KEY = web.AppKey("registration_service", RegistrationService)


def _error(exc: RpcError) -> web.Response:
    return web.json_response({"error": exc.message, "reason": exc.reason}, status=exc.status)


async def _payload(request: web.Request) -> Any:
    """The request's JSON payload by pRPC rules (GET: the query string)."""
    if request.method == "GET":
        args: dict[str, Any] = {k: v for k, v in request.query.items() if k != "json"}
        if "port_policy" in args:
            try:
                args["port_policy"] = json.loads(args["port_policy"])
            except ValueError:
                raise RpcError(400, "bad_request", "port_policy must be JSON") from None
        return args
    if request.content_type != "application/json" and "json" not in request.query:
        raise RpcError(
            415,
            "unsupported_encoding",
            "only JSON is supported: send Content-Type: application/json or add ?json",
        )
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise RpcError(413, "too_large", f"request body over {MAX_BODY} bytes")
    try:  # to its end: a client may send the headers and the body in separate writes
        body = await read_bounded(request.content, MAX_BODY)
    except BodyTooLarge:
        raise RpcError(413, "too_large", f"request body over {MAX_BODY} bytes") from None
    if not body.strip():
        return {}
    try:
        return json.loads(body)
    except ValueError as exc:
        raise RpcError(400, "bad_request", f"request body is not JSON: {exc}") from None


def peer_chain(request: web.Request) -> list[bytes]:
    """The client's certificate chain (DER, leaf first) from the TLS handshake, or [].

    :class:`gateway.control.tls_server.TlsSite` gives the whole chain; a stdlib ``ssl``
    listener (still accepted, e.g. by tools) only the leaf.
    """
    transport = request.transport
    if transport is None:
        return []
    chain = transport.get_extra_info(PEER_CERT_CHAIN)
    if chain is not None:
        return list(chain)
    ssl_obj = transport.get_extra_info("ssl_object")
    if ssl_obj is None:
        return []
    der = ssl_obj.getpeercert(binary_form=True)
    return [der] if der else []


async def register_cvm(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    try:
        req = RegisterCvmRequest.from_json(await _payload(request))
        return web.json_response(await service.register(peer_chain(request), req))
    except RpcError as exc:
        return _error(exc)


async def info(request: web.Request) -> web.Response:
    return web.json_response(request.app[SERVICE_KEY].info())


async def health(request: web.Request) -> web.Response:
    return web.Response(text="OK")


def create_rpc_app(service: RegistrationService) -> web.Application:
    """The main RPC app (serve it with :class:`gateway.control.tls_server.TlsSite`)."""
    app = web.Application(client_max_size=MAX_BODY)
    app[SERVICE_KEY] = service
    routes = [web.get("/health", health)]
    for name, handler in (("RegisterCvm", register_cvm), ("Info", info)):
        for path in (f"/prpc/{name}", f"/prpc/Tproxy.{name}"):
            routes += [web.post(path, handler), web.get(path, handler)]
    app.router.add_routes(routes)
    return app


def rpc_ssl_context(cert_file: Path, key_file: Path, client_ca_file: Path | None) -> ssl.SSLContext:
    """A stdlib context for the RPC app, for callers that cannot use ``TlsSite``.

    Limited by Python's ``ssl``: without ``client_ca_file`` no client certificate is asked
    for (RegisterCvm answers 401), with it only certificates chaining to it get through and
    only the leaf reaches the handler. The gateway itself serves with
    :class:`gateway.control.tls_server.TlsSite`, which has neither limit.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    if client_ca_file is not None:
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.load_verify_locations(cafile=str(client_ca_file))
    return ctx


def load_kms_root(path: str) -> x509.Certificate | None:
    """``[rpc] kms_root_file`` (PEM), or ``None`` when unset (KMS-signed chains refused)."""
    if not path:
        return None
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"rpc.kms_root_file {path}: not a readable PEM certificate: {exc}"
        ) from None


def load_der_chain(chain: list[bytes]) -> list[x509.Certificate]:
    """Parse a presented chain; a certificate OpenSSL took but cryptography refuses (or only
    warns about) is malformed evidence, not a server error."""
    certs = []
    for i, der in enumerate(chain):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", CryptographyDeprecationWarning)
                certs.append(x509.load_der_x509_certificate(der))
        except (ValueError, x509.InvalidVersion, CryptographyDeprecationWarning) as exc:
            raise EvidenceError(
                RejectReason.MALFORMED, f"client certificate {i} does not parse: {exc}"
            ) from None
    return certs


def evidence_check(
    *,
    source: CollateralSource,
    anchors: TrustAnchors,
    policy: Callable[[], AdmissionPolicy],
    clock: Callable[[], float] = time.time,
) -> EvidenceCheck:
    """The attestation core as an :data:`EvidenceCheck`.

    ``policy`` is called per registration, so a policy swapped by the admin API applies to
    the next registration without restarting anything.
    """

    async def check(chain: list[bytes]) -> EvidenceResult:
        try:
            certs = load_der_chain(chain)
        except EvidenceError as exc:
            return EvidenceResult(Verdict.from_error(exc), None)
        return await verify_with_source(
            source=source, anchors=anchors, policy=policy(), now=int(clock()), cert=certs
        )

    return check
