"""Fail-closed client for the gateway's ``RegisterCvm`` RPC (the CVM side of the tunnel).

Gateway URLs come from ``.sys-config.json``, which the host writes and nobody measures, so
neither the URL nor the server's name is a reason to trust the server. Trust comes from the
certificate the server presents in the TLS handshake, checked before a single byte of the
request is sent:

* **RA-TLS** (our gateway, :mod:`gateway.control.rpc_identity`): the certificate carries an
  attestation bound to its key. We verify it with the attestation core
  (:func:`gateway.attest.ratls.verify_ratls_cert`: key binding, quote report_data, RTMR3
  replay, dcap-qvl under the configured root) and require the app id decoded from the
  replayed events to be one of the pinned gateway app ids. The TLS handshake proved the
  server holds the certificate's key, so the peer *is* that attested TD.
* **KMS-chained** (dstack compatibility, only when a KMS root is configured): no quote, but
  the chain verifies to the KMS root CA (OpenSSL does this during the handshake) and the
  leaf's app-id extension (1.3.6.1.4.1.62397.1.3) is a pinned gateway app id. This is what
  upstream's CVMs accept; it trusts the KMS's issuance rather than a fresh quote.

Optionally (``GatewayTrust.image_pin``, :mod:`gateway.guest.gateway_pin`) the verified
gateway must also run a pinned boot chain / OS image: the app id comes from RTMR3 events
that the gateway's own OS writes, so only MRTD and RTMR0-2 tell a genuine gateway image from
a modified one claiming the same app id. Without a pin the client keeps the app-id check
alone and logs a WARNING once (with the measurements it saw, ready to pin). With a pin,
KMS-chained gateway certificates are refused (no quote, nothing to compare).

Anything else (a plain self-signed or CA-signed certificate, an attested gateway of another
app, a bad quote, a boot chain not pinned) raises :class:`GatewayRejected` and nothing is
sent. Differences from
upstream, on purpose: upstream accepts the server if its hex app id is a *substring* of
``gateway_app_id`` and ``"any"`` disables every check; we compare whole ids (a list
separated by commas or spaces is allowed) and refuse ``"any"``.

Wire format (upstream ``gateway_rpc.proto``, JSON): ``POST {url}/prpc/RegisterCvm?json``
``{"client_public_key": <wg pk b64>, "port_policy": {"ports": [{"port", "pp"}],
"restrict_mode"}}``; answer ``{"wg": {"client_ip", "servers": [{"pk", "ip", "endpoint"}]},
"agent": {...}, "gateways": [...]}``. ``/prpc`` is appended to a URL that lacks it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hmac
import ipaddress
import json
import logging
import os
import re
import ssl
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509

from gateway.attest import ratls
from gateway.attest.collateral import CollateralError, CollateralSource
from gateway.attest.evidence import EvidenceError, VerifiedEvidence
from gateway.attest.tcb import TcbPolicy
from gateway.attest.verifier import presented_quote
from gateway.guest.gateway_cache import GatewayKeys
from gateway.guest.gateway_pin import GatewayImagePin
from gateway.guest.http1 import parse_http_reply
from gateway.protocol.errors import CodecError
from gateway.tunnel.keys import WgKeyError, decode_key

logger = logging.getLogger(__name__)

__all__ = [
    "GatewayClient",
    "GatewayError",
    "GatewayRejected",
    "GatewayTrust",
    "GatewayUnavailable",
    "PortPolicy",
    "RegisterResponse",
    "VerifiedGateway",
    "WgServer",
    "parse_app_ids",
    "rpc_base",
]

MAX_REPLY = 1024 * 1024
_HEX40 = re.compile(r"[0-9a-f]{40}")


class GatewayError(Exception):
    """Registration with one gateway failed; ``url`` says which."""

    def __init__(self, url: str, message: str) -> None:
        super().__init__(f"{url}: {message}")
        self.url = url


class GatewayUnavailable(GatewayError):
    """Could not reach the gateway, or it answered with an error (try another / later)."""


class GatewayRejected(GatewayError):
    """The server is not a verified gateway of the pinned app: nothing was sent to it.

    ``reason`` is a stable code when one applies (the attestation core's
    :class:`~gateway.attest.evidence.RejectReason` values, ``app_not_pinned``, ...)."""

    def __init__(self, url: str, message: str, reason: str = "") -> None:
        super().__init__(url, message)
        self.reason = reason


def parse_app_ids(text: str) -> tuple[bytes, ...]:
    """Pinned gateway app ids: 40 hex digits each (``0x`` optional), comma/space separated.

    Raises ValueError for ``any`` (upstream's "check nothing"), an empty pin or bad hex.
    """
    parts = [p for p in re.split(r"[\s,]+", text.strip().lower()) if p]
    if not parts:
        raise ValueError("no gateway app id is pinned (keys.gateway_app_id is empty)")
    out = []
    for part in parts:
        if part == "any":
            raise ValueError(
                "gateway_app_id 'any' disables gateway verification; this shim refuses it: "
                "pin the gateway's app id"
            )
        hexid = part.removeprefix("0x")
        if not _HEX40.fullmatch(hexid):
            raise ValueError(f"gateway app id {part[:48]!r} is not 20 bytes of hex")
        out.append(bytes.fromhex(hexid))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class GatewayTrust:
    """What makes a server a gateway we register with.

    ``app_ids``: the pinned gateway app id(s). ``collateral`` and ``root_ca_der`` verify
    RA-TLS quotes (``None`` root: Intel's; the simulator's root only when configured);
    ``tcb_policy``: the TCB statuses accepted (``UpToDate`` only unless more are named).
    ``kms_root_pem`` enables dstack-compatible KMS-chained server certificates.
    ``image_pin``: the gateway's boot chain / OS image must also match it (``None``: the
    app id alone, today's and upstream's trust, with a warning).
    """

    app_ids: tuple[bytes, ...]
    collateral: CollateralSource | None
    root_ca_der: bytes | None = None
    tcb_policy: TcbPolicy = field(default_factory=TcbPolicy)
    kms_root_pem: str | None = None
    image_pin: GatewayImagePin | None = None

    def __post_init__(self) -> None:
        if not self.app_ids or any(len(a) != 20 for a in self.app_ids):
            raise ValueError("GatewayTrust needs at least one 20-byte gateway app id")
        if self.collateral is None and self.kms_root_pem is None:
            raise ValueError("GatewayTrust needs collateral (RA-TLS) or a KMS root (dstack)")

    def pinned(self, app_id: bytes) -> bool:
        found = False
        for want in self.app_ids:  # constant time per id; no early exit on the first hit
            found |= hmac.compare_digest(want, app_id)
        return found


@dataclass(frozen=True, slots=True)
class VerifiedGateway:
    """Who answered: the verification method (``ratls`` / ``kms_cert``) and app id."""

    method: str
    app_id: bytes
    evidence: VerifiedEvidence | None = None


@dataclass(frozen=True, slots=True)
class PortPolicy:
    """The app's port policy, reported at registration (upstream ``port_policy``)."""

    ports: tuple[tuple[int, bool], ...] = ()
    restrict_mode: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "ports": [{"port": p, "pp": pp} for p, pp in self.ports],
            "restrict_mode": self.restrict_mode,
        }

    @classmethod
    def from_json(cls, value: Any) -> PortPolicy:
        """From app-compose's ``port_policy``; raises ValueError naming the field."""
        if not isinstance(value, dict):
            raise ValueError("port_policy must be an object")
        ports = []
        raw = value.get("ports", [])
        if not isinstance(raw, list):
            raise ValueError("port_policy.ports must be a list")
        for i, item in enumerate(raw):
            port = item.get("port") if isinstance(item, dict) else None
            pp = item.get("pp", False) if isinstance(item, dict) else None
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                raise ValueError(f"port_policy.ports[{i}].port must be 1-65535")
            if not isinstance(pp, bool):
                raise ValueError(f"port_policy.ports[{i}].pp must be a boolean")
            ports.append((port, pp))
        restrict = value.get("restrict_mode", False)
        if not isinstance(restrict, bool):
            raise ValueError("port_policy.restrict_mode must be a boolean")
        return cls(tuple(ports), restrict)


@dataclass(frozen=True, slots=True)
class WgServer:
    """One gateway node's WireGuard identity from the answer."""

    pk: str
    ip: ipaddress.IPv4Interface
    endpoint: str

    @property
    def endpoint_host(self) -> str:
        host, _, _ = self.endpoint.rpartition(":")
        return host.strip("[]")


@dataclass(frozen=True, slots=True)
class RegisterResponse:
    """The validated answer. ``agent`` and ``gateways`` are kept as sent (upstream's guest
    ignores them too)."""

    client_ip: ipaddress.IPv4Address
    servers: tuple[WgServer, ...]
    agent: dict[str, Any] = field(default_factory=dict)
    gateways: tuple[dict[str, Any], ...] = ()

    @classmethod
    def from_json(cls, doc: Any) -> RegisterResponse:
        """Raises ValueError naming the bad field: a gateway's answer is still input."""
        if not isinstance(doc, dict) or not isinstance(doc.get("wg"), dict):
            raise ValueError("the answer has no 'wg' object")
        wg = doc["wg"]
        try:
            client_ip = ipaddress.IPv4Address(wg.get("client_ip"))
        except ValueError:
            raise ValueError("wg.client_ip is not an IPv4 address") from None
        raw = wg.get("servers")
        if not isinstance(raw, list) or not raw or len(raw) > 64:
            raise ValueError("wg.servers must list 1-64 gateways")
        servers = []
        for i, item in enumerate(raw):
            if not isinstance(item, dict):
                raise ValueError(f"wg.servers[{i}] is not an object")
            pk, ip, endpoint = item.get("pk"), item.get("ip"), item.get("endpoint")
            try:
                if not isinstance(pk, str):
                    raise WgKeyError("not a string")
                decode_key(pk)
            except WgKeyError:
                raise ValueError(f"wg.servers[{i}].pk is not a WireGuard key") from None
            try:
                iface = ipaddress.IPv4Interface(ip)
            except ValueError:
                raise ValueError(f"wg.servers[{i}].ip is not an IPv4 address") from None
            if not isinstance(endpoint, str) or not _valid_endpoint(endpoint):
                raise ValueError(f"wg.servers[{i}].endpoint must be host:port")
            servers.append(WgServer(pk, iface, endpoint))
        agent = doc.get("agent")
        gateways = doc.get("gateways")
        return cls(
            client_ip,
            tuple(servers),
            agent if isinstance(agent, dict) else {},
            tuple(g for g in gateways if isinstance(g, dict)) if isinstance(gateways, list) else (),
        )


def _valid_endpoint(text: str) -> bool:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        return False
    # no whitespace or config syntax: the value is written into a WireGuard config file
    return len(text) <= 255 and re.fullmatch(r"[A-Za-z0-9.\-\[\]:]+", host) is not None


def rpc_base(url: str) -> str:
    """``url`` with ``/prpc`` appended unless already there (upstream's rule)."""
    url = url.rstrip("/")
    return url if url.endswith("/prpc") else f"{url}/prpc"


def _http_exchange_request(host: str, port: int, target: str, body: bytes) -> bytes:
    head = (
        f"POST {target} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


class GatewayClient:
    """Registers this CVM with one gateway URL at a time (see the module docstring)."""

    def __init__(
        self,
        trust: GatewayTrust,
        *,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
        tmp_dir: str | None = None,
    ) -> None:
        self.trust = trust
        self.timeout = timeout
        self.clock = clock
        self.tmp_dir = tmp_dir
        self._warned_unpinned = False

    # --- TLS contexts --------------------------------------------------------------------

    def _context(self, keys: GatewayKeys, *, kms: bool) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = False  # trust is the attestation (or the KMS chain), not a name
        if kms:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cadata=self.trust.kms_root_pem)
        else:
            ctx.verify_mode = ssl.CERT_NONE  # the quote in the certificate is checked instead
        # ssl loads credentials from files only: a private temp file, removed at once
        fd, path = tempfile.mkstemp(prefix=".gw-client-", suffix=".pem", dir=self.tmp_dir)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(keys.client_key + keys.client_cert)
            ctx.load_cert_chain(path)
        finally:
            os.unlink(path)
        return ctx

    # --- verifying the server ------------------------------------------------------------

    async def verify_ratls(self, url: str, cert: x509.Certificate) -> VerifiedGateway:
        """Verify an RA-TLS server certificate and the pinned app id; raises GatewayRejected."""
        now = int(self.clock())
        if not cert.not_valid_before_utc <= dt.datetime.fromtimestamp(now, dt.UTC):
            raise GatewayRejected(url, "the gateway's certificate is not valid yet")
        if cert.not_valid_after_utc < dt.datetime.fromtimestamp(now, dt.UTC):
            raise GatewayRejected(url, "the gateway's certificate has expired")
        if self.trust.collateral is None:
            raise GatewayRejected(url, "RA-TLS server certificates are not enabled (no collateral)")
        quote = presented_quote(cert=cert)
        if quote is None:
            raise GatewayRejected(url, "the gateway's certificate carries no readable quote")
        try:
            collateral = await self.trust.collateral.get(quote)
        except CollateralError as exc:
            raise GatewayUnavailable(url, f"no collateral to verify the gateway: {exc}") from None
        try:
            evidence = await asyncio.to_thread(
                ratls.verify_ratls_cert,
                cert,
                collateral=collateral,
                root_ca_der=self.trust.root_ca_der,
                now=now,
                tcb_policy=self.trust.tcb_policy,
            )
        except EvidenceError as exc:
            raise GatewayRejected(
                url,
                f"the gateway's attestation does not verify ({exc.reason.value}): {exc}",
                exc.reason.value,
            ) from None
        app_id = evidence.identity.app_id
        if not self.trust.pinned(app_id):
            raise GatewayRejected(
                url,
                f"attested, but app {app_id.hex()} is not the pinned gateway app",
                "app_not_pinned",
            )
        self._check_image(url, evidence)
        return VerifiedGateway("ratls", app_id, evidence)

    def _check_image(self, url: str, evidence: VerifiedEvidence) -> None:
        """The boot-chain pin, or (no pin) one warning with what would have been pinned."""
        pin = self.trust.image_pin
        app = evidence.identity.app_id.hex()
        if pin is None:
            if not self._warned_unpinned:
                self._warned_unpinned = True
                m = evidence.measurements
                seen = (
                    f"mrtd {m.mr_td.hex()}, rtmr0 {m.rtmr0.hex()}, rtmr1 {m.rtmr1.hex()}, "
                    f"rtmr2 {m.rtmr2.hex()}"
                    if m is not None
                    else "no measurements"
                )
                logger.warning(
                    "gateway %s (app %s) is trusted by its app id alone: its OS image is not "
                    "pinned, so a modified image claiming this app id would be trusted too; "
                    "pin it (gateway_image_policy in app-compose or --gateway-image-policy). "
                    "Seen: os_image_hash %s, %s",
                    url,
                    app,
                    evidence.identity.os_image_hash.hex() or "(none)",
                    seen,
                )
            return
        verdict = pin.check(evidence)
        if not verdict.accepted:
            reason = verdict.reason.value if verdict.reason else "refused"
            raise GatewayRejected(
                url,
                f"attested gateway app {app}, but not a pinned gateway image ({reason}): "
                f"{verdict.detail}",
                reason,
            )

    def verify_kms(self, url: str, cert: x509.Certificate) -> VerifiedGateway:
        """The chain was verified by OpenSSL against the KMS root; check the app-id ext."""
        try:
            app_id = ratls.read_extension(cert, ratls.OID_APP_ID)
        except CodecError as exc:
            raise GatewayRejected(url, f"bad app-id extension: {exc}") from None
        if app_id is None:
            raise GatewayRejected(url, "the KMS-issued certificate has no app-id extension")
        if not self.trust.pinned(app_id):
            raise GatewayRejected(
                url,
                f"KMS-issued for app {app_id.hex()}, not the pinned gateway app",
                "app_not_pinned",
            )
        if self.trust.image_pin is not None:
            verdict = self.trust.image_pin.refuses_kms_certificates()
            raise GatewayRejected(
                url,
                verdict.detail,
                verdict.reason.value if verdict.reason else "measurement_not_allowed",
            )
        return VerifiedGateway("kms_cert", app_id)

    # --- the exchange --------------------------------------------------------------------

    async def _open(
        self, url: str, host: str, port: int, ctx: ssl.SSLContext
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, x509.Certificate]:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=ctx, server_hostname=host),
                self.timeout,
            )
        except ssl.SSLCertVerificationError as exc:
            raise GatewayRejected(url, f"TLS: {exc.verify_message or exc}") from None
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            raise GatewayUnavailable(url, f"cannot connect: {exc or type(exc).__name__}") from None
        ssl_obj = writer.get_extra_info("ssl_object")
        der = ssl_obj.getpeercert(binary_form=True) if ssl_obj is not None else None
        if not der:
            await _close(writer)
            raise GatewayRejected(url, "the server presented no certificate")
        return reader, writer, x509.load_der_x509_certificate(der)

    async def register(
        self, url: str, keys: GatewayKeys, port_policy: PortPolicy | None = None
    ) -> tuple[RegisterResponse, VerifiedGateway]:
        """Verify the gateway at ``url``, then ``RegisterCvm``. Raises GatewayError."""
        base = rpc_base(url)
        parts = urlsplit(base)
        if parts.scheme != "https" or not parts.hostname:
            raise GatewayRejected(url, "gateway URLs must be https://")
        host, port = parts.hostname, parts.port or 443
        reader, writer, cert = await self._open(url, host, port, self._context(keys, kms=False))
        try:
            if ratls.read_extension(cert, ratls.OID_ATTESTATION) is not None or (
                ratls.read_extension(cert, ratls.OID_QUOTE) is not None
            ):
                verified = await self.verify_ratls(url, cert)
            elif self.trust.kms_root_pem is not None:
                await _close(writer)  # reconnect letting OpenSSL verify the chain to the KMS root
                ctx = self._context(keys, kms=True)
                reader, writer, cert = await self._open(url, host, port, ctx)
                verified = self.verify_kms(url, cert)
            else:
                raise GatewayRejected(
                    url, "the server's certificate is not attested (no RA-TLS quote)"
                )
        except CodecError as exc:
            await _close(writer)
            raise GatewayRejected(url, f"malformed certificate extension: {exc}") from None
        except BaseException:
            await _close(writer)
            raise
        body: dict[str, Any] = {"client_public_key": keys.wg_pk}
        if port_policy is not None:
            body["port_policy"] = port_policy.to_json()
        data = json.dumps(body, separators=(",", ":")).encode()
        try:
            raw = await asyncio.wait_for(
                self._exchange(reader, writer, host, port, f"{parts.path}/RegisterCvm?json", data),
                self.timeout,
            )
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            raise GatewayUnavailable(url, f"RegisterCvm: {exc or type(exc).__name__}") from None
        try:
            status, payload = parse_http_reply(raw)
        except ValueError as exc:
            raise GatewayUnavailable(url, f"RegisterCvm: {exc}") from None
        if status != 200:
            text = payload.decode("utf-8", "replace")[:300]
            raise GatewayUnavailable(url, f"RegisterCvm answered HTTP {status}: {text}")
        try:
            answer = RegisterResponse.from_json(json.loads(payload))
        except (ValueError, RecursionError) as exc:
            raise GatewayUnavailable(url, f"RegisterCvm answer: {exc}") from None
        logger.info(
            "registered with %s (%s, app %s): tunnel address %s",
            url,
            verified.method,
            verified.app_id.hex(),
            answer.client_ip,
        )
        return answer, verified

    async def _exchange(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        host: str,
        port: int,
        target: str,
        body: bytes,
    ) -> bytes:
        try:
            writer.write(_http_exchange_request(host, port, target, body))
            await writer.drain()
            raw = b""
            while chunk := await reader.read(65536):
                raw += chunk
                if len(raw) > MAX_REPLY:
                    raise OSError(f"reply larger than {MAX_REPLY} bytes")
            return raw
        finally:
            await _close(writer)


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close and wait (bounded), so no socket outlives the call."""
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), 2.0)
