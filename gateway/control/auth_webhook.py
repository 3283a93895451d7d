"""The registration webhook: an operator's service gets the last word on admitting a CVM.

Upstream dstack-gateway's ``[core.auth]`` (``main_service/auth_client.rs``): after the CVM's
evidence is verified it ``POST``\\ s the CVM's ``AppInfo`` as JSON to a URL, and admits the CVM
only on a 2xx answer. Ours, ``[auth_webhook]`` (:mod:`gateway.control.auth_webhook_settings`),
wraps the registration RPC's :data:`~gateway.control.registration.EvidenceCheck`, so the
registration module is unchanged and the webhook is asked only about CVMs that the
attestation core *and* the admission policy already accept (a refused CVM costs the
operator's service nothing, and the service never sees unverified claims).

The request body, field names and order as upstream (all hex strings, lowercase)::

    {"app_id", "compose_hash", "instance_id", "device_id", "mr_system", "mr_aggregated",
     "os_image_hash", "key_provider_info", "init_script_hashes": null}

``device_id`` is ``""`` and ``init_script_hashes`` is ``null``: our verified identity
carries neither (upstream derives ``device_id`` from the PCK's PPID; ``null`` is upstream's
"the evidence did not bind this field"). ``key_provider_info`` is the hex of the
``key-provider`` event payload (``{"name":..,"id":..}``), as upstream's ``hex_bytes``.
For a KMS-signed chain ``mr_system``/``mr_aggregated`` are the KMS's claims.

The answer, decided by its status alone (the body is never trusted):

* 2xx: admitted.
* 5xx, 429, no answer (refused, reset, TLS failure) or no answer within ``timeout``:
  *fail closed, retryable*: the RPC answers 503 ``webhook_unavailable`` and the CVM's
  registrar retries (upstream answers an error too; it does not distinguish).
* anything else (3xx, 4xx): refused, 403 ``webhook_denied``. Redirects are not followed:
  following one would send the CVM's identity and the bearer token to a place the operator
  did not configure, and a moved service is a configuration error that retrying cannot fix.

For a refusal at most :data:`EXCERPT_BYTES` of the body are read and a sanitized excerpt
(printable characters, at most :data:`EXCERPT_CHARS`) is put in the detail; the rest is
never read (the connection is dropped instead), so an answer's size costs nothing.
The optional bearer token is sent as ``Authorization: Bearer``; it is kept out of reprs,
logs and error details. One ``aiohttp.ClientSession`` is shared by all registrations
(keep-alive) and closed by :meth:`AuthWebhook.close`.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import logging
import re
import ssl
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from gateway.attest.evidence import RejectReason, VerifiedEvidence
from gateway.attest.policy import Verdict
from gateway.attest.verifier import EvidenceResult
from gateway.config import ConfigError, env_value
from gateway.control.auth_webhook_settings import AuthWebhookSettings
from gateway.control.metrics import Family, Sample
from gateway.control.registration import EvidenceCheck, RpcError

logger = logging.getLogger(__name__)

__all__ = [
    "EXCERPT_BYTES",
    "EXCERPT_CHARS",
    "AppInfo",
    "AuthWebhook",
    "WebhookOutcome",
    "WebhookStats",
    "WebhookTarget",
    "WebhookUnavailable",
    "app_info_from_evidence",
    "load_webhook_target",
    "sanitize_excerpt",
]

#: Bytes of a refusal's body read for its excerpt; the rest is never read.
EXCERPT_BYTES = 1024
#: Characters of that excerpt put in the refusal's detail (which reaches the CVM).
EXCERPT_CHARS = 160

_TOKEN = re.compile(r"[\x21-\x7e]+")  # visible ASCII: nothing that could split a header


@dataclass(frozen=True, slots=True)
class AppInfo:
    """Upstream's ``AppInfo`` as JSON (``dstack-attest`` ``attestation.rs``): hex strings."""

    app_id: str
    compose_hash: str
    instance_id: str
    device_id: str
    mr_system: str
    mr_aggregated: str
    os_image_hash: str
    key_provider_info: str
    init_script_hashes: tuple[str, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        """The request body, keys in upstream's order."""
        return {
            "app_id": self.app_id,
            "compose_hash": self.compose_hash,
            "instance_id": self.instance_id,
            "device_id": self.device_id,
            "mr_system": self.mr_system,
            "mr_aggregated": self.mr_aggregated,
            "os_image_hash": self.os_image_hash,
            "key_provider_info": self.key_provider_info,
            "init_script_hashes": None
            if self.init_script_hashes is None
            else list(self.init_script_hashes),
        }


def app_info_from_evidence(evidence: VerifiedEvidence) -> AppInfo:
    """What upstream would send for this verified CVM (see the module docstring for the two
    fields our identity does not carry)."""
    ident = evidence.identity
    return AppInfo(
        app_id=ident.app_id.hex(),
        compose_hash=ident.compose_hash.hex(),
        instance_id=ident.instance_id.hex(),
        device_id="",
        mr_system=evidence.mr_system.hex(),
        mr_aggregated=evidence.mr_aggregated.hex(),
        os_image_hash=ident.os_image_hash.hex(),
        key_provider_info=ident.key_provider_payload.hex(),
        init_script_hashes=None,
    )


def sanitize_excerpt(body: bytes, limit: int = EXCERPT_CHARS) -> str:
    """A body's start made safe to show and log: printable characters only (others become
    ``?``), whitespace runs collapsed to one space, at most ``limit`` characters (``...``
    marks a cut)."""
    text = body.decode("utf-8", errors="replace")
    text = "".join(c if c.isprintable() or c.isspace() else "?" for c in text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class WebhookOutcome(enum.StrEnum):
    ALLOWED = "allowed"
    DENIED = "denied"
    UNAVAILABLE = "unavailable"


@dataclass
class WebhookStats:
    """Webhook answers by outcome (a ``/metrics`` collector, as in ``collectors.py``)."""

    outcomes: Counter[str] = field(default_factory=Counter)

    def collect(self) -> Iterable[Family]:
        return [
            Family(
                "gateway_registration_webhook_total",
                "counter",
                "Registration webhook answers: allowed (2xx), denied, unavailable (fail closed)",
                [Sample({"outcome": o.value}, self.outcomes[o.value]) for o in WebhookOutcome],
            )
        ]


class WebhookUnavailable(Exception):
    """No usable answer (unreachable, timeout, 5xx, 429): refuse for now, the CVM retries."""


@dataclass(frozen=True, slots=True)
class WebhookTarget:
    """Where and how to ask, resolved at start-up (token and CA read, checked)."""

    url: str
    timeout: float
    token: str | None = field(default=None, repr=False)
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False)

    @property
    def safe_url(self) -> str:
        """The URL for logs: without its query string (which may carry a key)."""
        parts = urlsplit(self.url)
        return parts._replace(query="", fragment="").geturl()


def _read_token(settings: AuthWebhookSettings) -> str | None:
    if settings.token_file:
        try:
            token = Path(settings.token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeError) as exc:
            raise ConfigError(
                "auth_webhook.token_file", f"cannot read {settings.token_file}: {exc}"
            ) from None
        where = f"auth_webhook.token_file {settings.token_file}"
        key = "auth_webhook.token_file"
    elif settings.token_env:
        token = (env_value(settings.token_env) or "").strip()
        where = f"environment variable {settings.token_env}"
        key = "auth_webhook.token_env"
    else:
        return None
    if not token:
        raise ConfigError(key, f"{where} is empty or unset", "set it, or remove the setting")
    if not _TOKEN.fullmatch(token):
        raise ConfigError(key, f"{where}: the token must be visible ASCII without spaces")
    return token


def load_webhook_target(settings: AuthWebhookSettings) -> WebhookTarget | None:
    """The webhook to ask, or ``None`` when disabled. Raises :class:`ConfigError` (token or
    CA unreadable or invalid) so that a misconfigured gateway does not start."""
    if not settings.enabled:
        return None
    ctx: ssl.SSLContext | None = None
    if settings.ca_file:
        try:
            ctx = ssl.create_default_context(cafile=settings.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                "auth_webhook.ca_file", f"{settings.ca_file}: not a readable PEM CA bundle: {exc}"
            ) from None
    token = _read_token(settings)
    target = WebhookTarget(settings.url, settings.timeout, token, ctx)
    host = urlsplit(settings.url).hostname or ""
    if token and urlsplit(settings.url).scheme == "http" and not _loopback(host):
        logger.warning("auth_webhook: the bearer token goes over plain http to %s; use https", host)
    return target


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AuthWebhook:
    """Asks the webhook about one CVM at a time over one shared session (see the module)."""

    __slots__ = ("_target", "_session", "stats")

    def __init__(self, target: WebhookTarget, stats: WebhookStats | None = None) -> None:
        self._target = target
        self._session: aiohttp.ClientSession | None = None
        self.stats = stats if stats is not None else WebhookStats()

    def __repr__(self) -> str:  # never the token
        return f"AuthWebhook({self._target.safe_url!r})"

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:  # created on the loop that uses it
            connector = aiohttp.TCPConnector(ssl=self._target.ssl_context or True)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self._target.timeout),
                trust_env=False,  # no proxy from the environment: the URL is the URL
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def ask(self, info: AppInfo) -> Verdict | None:
        """``None`` when the webhook admits ``info``, else the refusal (``webhook_denied``).

        Raises :class:`WebhookUnavailable` when there is no usable answer.
        """
        target = self._target
        headers = {"Content-Type": "application/json"}
        if target.token is not None:
            headers["Authorization"] = f"Bearer {target.token}"
        body = json.dumps(info.to_json(), separators=(",", ":")).encode()
        try:
            async with self._client().post(
                target.url, data=body, headers=headers, allow_redirects=False
            ) as resp:
                status = resp.status
                if 200 <= status < 300:
                    self.stats.outcomes[WebhookOutcome.ALLOWED] += 1
                    logger.debug("auth_webhook admitted app %s (%d)", info.app_id, status)
                    return None
                excerpt = await _excerpt(resp)
        except TimeoutError:
            cause = f"no answer within {target.timeout:g} s"
            raise self._unavailable(cause, cause) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise self._unavailable("not reachable", f"{type(exc).__name__}: {exc}") from None
        if status >= 500 or status == 429:
            said = f' "{excerpt}"' if excerpt else ""
            raise self._unavailable(f"it answered {status}", f"it answered {status}{said}")
        self.stats.outcomes[WebhookOutcome.DENIED] += 1
        note = " (redirects are not followed)" if 300 <= status < 400 else ""
        detail = f"the registration webhook answered {status}{note}"
        if excerpt:
            detail += f': "{excerpt}"'
        return Verdict.reject(RejectReason.WEBHOOK_DENIED, detail)

    def _unavailable(self, public: str, cause: str) -> WebhookUnavailable:
        """Count and log (``cause``, for the operator); ``public`` goes to the CVM."""
        self.stats.outcomes[WebhookOutcome.UNAVAILABLE] += 1
        logger.warning(
            "auth_webhook %s unavailable (registration refused for now): %s",
            self._target.safe_url,
            cause,
        )
        return WebhookUnavailable(public)

    def wrap(self, check: EvidenceCheck) -> EvidenceCheck:
        """``check``, then the webhook for what ``check`` accepted.

        A refusal is an ordinary verdict (the RPC answers 403 ``webhook_denied``); no
        usable answer raises ``RpcError(503, "webhook_unavailable")``, which the RPC
        handler returns as it is, so the CVM retries.
        """

        async def checked(chain: list[bytes]) -> EvidenceResult:
            result = await check(chain)
            evidence = result.evidence
            if not result.verdict.accepted or evidence is None:
                return result
            try:
                refusal = await self.ask(app_info_from_evidence(evidence))
            except WebhookUnavailable as exc:
                raise RpcError(
                    503,
                    "webhook_unavailable",
                    f"the registration webhook is unavailable ({exc}); try again later",
                ) from None
            return result if refusal is None else EvidenceResult(refusal, evidence)

        return checked


async def _excerpt(resp: aiohttp.ClientResponse) -> str:
    """A refusal's body excerpt: at most :data:`EXCERPT_BYTES` read, whatever arrives in
    time (the status already decided; a slow or endless body only shortens the excerpt)."""
    chunks: list[bytes] = []
    size = 0
    try:
        while size < EXCERPT_BYTES:
            chunk = await resp.content.read(EXCERPT_BYTES - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except (TimeoutError, aiohttp.ClientError, OSError):
        pass
    if not resp.content.at_eof():
        resp.close()  # drop the connection rather than read the rest
    return sanitize_excerpt(b"".join(chunks))
