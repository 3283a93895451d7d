"""Typed operator records: frozen, validated at birth, with their JSON forms.

``from_json`` raises :class:`FieldError` naming the field, so the admin API can answer 400
with it and nothing downstream re-checks. ``revision`` is the store revision (the ETag).
Secrets (DNS credentials) are stored whole and shown only redacted (:func:`redact`).
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
import time
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from gateway.certs.settings import CLOUDFLARE_API, DnsCredential, normalize_domain
from gateway.control.registration import PortPolicy, RpcError
from gateway.registry.records import KvEntry

__all__ = [
    "StateError",
    "Exists",
    "parse_domain",
    "BaseDomain",
    "CustomRoute",
    "Drain",
    "FieldError",
    "InUse",
    "NotFound",
    "PortPolicyOverride",
    "ReadOnly",
    "RevisionMismatch",
    "StoredCredential",
    "Topic",
    "redact",
]

T_DOMAINS = "op_domains"
T_DNS = "op_dns"
T_ROUTES = "op_routes"
T_PORT_POLICY = "op_port_policy"
T_DRAIN = "op_drain"
T_ADMISSION = "op_admission"
POLICY_KEY = "policy"

_CRED_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_APP_ID = re.compile(r"^[0-9A-Za-z][0-9A-Za-z_-]{0,127}$")
_INSTANCE_ID = re.compile(r"^[0-9A-Za-z_.:-]{1,128}$")

Source = Literal["config", "admin"]


# --- errors --------------------------------------------------------------------------------


class StateError(Exception):
    """Base of the errors below; the admin API maps each to one status."""


class FieldError(StateError):
    """A value is invalid (400); ``field`` names it."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


class NotFound(StateError):
    """No such item (404)."""


class Exists(StateError):
    """The item already exists (409)."""


class InUse(StateError):
    """The item is referenced by another one or overlaps it (409)."""


class ReadOnly(StateError):
    """The item comes from the configuration file (409: edit the file instead)."""


class RevisionMismatch(StateError):
    """``If-Match`` named another revision than the stored one (412)."""


# --- helpers -------------------------------------------------------------------------------


def redact(secret: str) -> str:
    """``abcd...wxyz`` for long secrets, ``****`` for short ones (upstream's display form)."""
    return f"{secret[:4]}...{secret[-4:]}" if len(secret) >= 16 else "****"


def _obj(
    value: Any, what: str, allowed: set[str], required: frozenset[str] | set[str] = frozenset()
) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise FieldError(what, "expected a JSON object")
    unknown = set(value) - allowed
    if unknown:
        raise FieldError(
            sorted(unknown)[0], f"unknown field (allowed: {', '.join(sorted(allowed))})"
        )
    for name in sorted(required):
        if name not in value:
            raise FieldError(name, "required")
    return value


def parse_domain(value: Any, what: str = "domain") -> str:
    if not isinstance(value, str):
        raise FieldError(what, "expected a string")
    try:
        return normalize_domain(value)
    except ValueError as exc:
        raise FieldError(what, str(exc)) from None


def _port(value: Any, what: str = "port") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise FieldError(what, "expected an integer port 1-65535")
    return value


def _str(value: Any, what: str, pattern: re.Pattern[str] | None = None, hint: str = "") -> str:
    if not isinstance(value, str) or (pattern is not None and not pattern.match(value)):
        raise FieldError(what, f"expected {hint or 'a string'}")
    return value


# --- records -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BaseDomain:
    """A base domain: apps are ``<app_id>[-<port>][s|g].<domain>``; one wildcard cert each.

    ``port`` is the public port CVMs are told apps are reachable on (upstream ``ZtDomain.port``).
    """

    domain: str
    dns_credential: str
    port: int = 443
    source: Source = "admin"
    revision: int = 0

    @classmethod
    def from_json(cls, obj: Any, domain: str | None = None) -> BaseDomain:
        keys = {"dns_credential", "port"} | ({"domain"} if domain is None else set())
        obj = _obj(
            obj, "body", keys, {"dns_credential"} | ({"domain"} if domain is None else set())
        )
        return cls(
            domain=parse_domain(obj["domain"] if domain is None else domain),
            dns_credential=_str(
                obj["dns_credential"], "dns_credential", _CRED_ID, "a credential id"
            ),
            port=_port(obj.get("port", 443)),
        )

    def value(self) -> dict[str, Any]:
        return {"dns_credential": self.dns_credential, "port": self.port}

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            **self.value(),
            "source": self.source,
            "revision": self.revision,
        }


_CRED_FIELDS = {
    "id",
    "kind",
    "server",
    "port",
    "zone",
    "tsig_key_name",
    "tsig_algorithm",
    "tsig_secret",
    "api_url",
    "api_token",
    "ttl",
    "check_port",
    "check_servers",
}


@dataclass(frozen=True, slots=True)
class StoredCredential:
    """A DNS credential managed through the API. ``secret`` is the TSIG secret or API token.

    :meth:`to_json` never includes the secret, only :func:`redact` of it; :meth:`settings`
    gives the config-shaped :class:`DnsCredential` (validated the same way as the file's),
    whose secret the certificate manager supplies from here, never from the environment.
    """

    id: str
    kind: Literal["rfc2136", "cloudflare"]
    secret: str = field(repr=False)
    server: str = ""
    port: int = 53
    zone: str = ""
    tsig_key_name: str = ""
    tsig_algorithm: Literal["hmac-sha256", "hmac-sha384", "hmac-sha512"] = "hmac-sha256"
    api_url: str = CLOUDFLARE_API
    ttl: int = 60
    check_port: int = 53
    check_servers: tuple[str, ...] = ()
    created_at: float = 0.0
    updated_at: float = 0.0
    revision: int = 0

    def __post_init__(self) -> None:
        try:
            self.settings()
        except ValueError as exc:
            raise FieldError("body", str(exc)) from None

    @property
    def secret_ref(self) -> str:
        """The placeholder "environment variable" name the provider factory resolves."""
        return f"stored-dns-secret:{self.id}"

    def settings(self) -> DnsCredential:
        if self.kind == "rfc2136":
            return DnsCredential(
                kind="rfc2136",
                server=self.server,
                port=self.port,
                zone=self.zone,
                tsig_key_name=self.tsig_key_name,
                tsig_algorithm=self.tsig_algorithm,
                tsig_secret_env=self.secret_ref,
                ttl=self.ttl,
                check_port=self.check_port,
                check_servers=self.check_servers,
            )
        return DnsCredential(
            kind="cloudflare",
            api_url=self.api_url,
            token_env=self.secret_ref,
            ttl=self.ttl,
            check_port=self.check_port,
            check_servers=self.check_servers,
        )

    @classmethod
    def from_json(
        cls, obj: Any, *, cred_id: str | None = None, previous: StoredCredential | None = None
    ) -> StoredCredential:
        """Validate a create (``cred_id`` None: the body names it) or an update body.

        On update the secret may be omitted to keep ``previous``'s.
        """
        obj = _obj(obj, "body", _CRED_FIELDS - ({"id"} if cred_id is not None else set()))
        ident = _str(
            obj.get("id") if cred_id is None else cred_id,
            "id",
            _CRED_ID,
            "an id of [a-z0-9_-], at most 63 characters",
        )
        kind = obj.get("kind", previous.kind if previous else None)
        if kind not in ("rfc2136", "cloudflare"):
            raise FieldError("kind", "expected 'rfc2136' or 'cloudflare'")
        secret_field = "tsig_secret" if kind == "rfc2136" else "api_token"
        other = "api_token" if kind == "rfc2136" else "tsig_secret"
        if other in obj:
            raise FieldError(other, f"not used by a {kind} credential (send {secret_field})")
        secret = obj.get(secret_field)
        if secret is None:
            if previous is None or previous.kind != kind:
                raise FieldError(secret_field, "required")
            secret = previous.secret
        secret = _str(secret, secret_field).strip()
        if len(secret) < 8:
            raise FieldError(secret_field, "too short to be a real secret")
        if kind == "rfc2136":
            try:
                base64.b64decode(secret, validate=True)
            except (binascii.Error, ValueError):  # ValueError: non-ASCII text
                raise FieldError(
                    "tsig_secret", "expected base64 (as in a knot/BIND key file)"
                ) from None
        kwargs: dict[str, Any] = {}
        for name in ("server", "zone", "tsig_key_name", "tsig_algorithm", "api_url"):
            if name in obj:
                kwargs[name] = _str(obj[name], name)
        for name in ("port", "check_port"):
            if name in obj:
                kwargs[name] = _port(obj[name], name)
        if "ttl" in obj:
            ttl = obj["ttl"]
            if isinstance(ttl, bool) or not isinstance(ttl, int) or not 1 <= ttl <= 86400:
                raise FieldError("ttl", "expected seconds, 1-86400")
            kwargs["ttl"] = ttl
        if "check_servers" in obj:
            servers = obj["check_servers"]
            if not isinstance(servers, list) or not all(isinstance(s, str) for s in servers):
                raise FieldError("check_servers", 'expected a list of "ip" or "ip:port"')
            kwargs["check_servers"] = tuple(servers)
        if kwargs.get("tsig_algorithm", "hmac-sha256") not in (
            "hmac-sha256",
            "hmac-sha384",
            "hmac-sha512",
        ):
            raise FieldError("tsig_algorithm", "expected hmac-sha256, hmac-sha384 or hmac-sha512")
        now = time.time()
        return cls(
            id=ident,
            kind=kind,
            secret=secret,
            created_at=previous.created_at if previous else now,
            updated_at=now,
            **kwargs,
        )

    def stored(self) -> dict[str, Any]:
        """The stored value (with the secret: the store is the gateway's own state)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name not in ("id", "revision"):
                value = getattr(self, f.name)
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_stored(cls, entry: KvEntry) -> StoredCredential:
        value = dict(entry.value)
        value["check_servers"] = tuple(value.get("check_servers", ()))
        return cls(id=entry.key, revision=entry.revision, **value)

    def to_json(self) -> dict[str, Any]:
        """The API form: the secret only as :func:`redact` shows it."""
        out: dict[str, Any] = {"id": self.id, "kind": self.kind, "source": "admin"}
        if self.kind == "rfc2136":
            out.update(
                server=self.server,
                port=self.port,
                zone=self.zone,
                tsig_key_name=self.tsig_key_name,
                tsig_algorithm=self.tsig_algorithm,
                tsig_secret=redact(self.secret),
            )
        else:
            out.update(api_url=self.api_url, api_token=redact(self.secret))
        out.update(
            ttl=self.ttl,
            check_port=self.check_port,
            check_servers=list(self.check_servers),
            created_at=self.created_at,
            updated_at=self.updated_at,
            revision=self.revision,
        )
        return out


def config_credential_json(cred_id: str, cred: DnsCredential) -> dict[str, Any]:
    """A credential from the configuration file: where its secret is read, never the secret."""
    out: dict[str, Any] = {"id": cred_id, "kind": cred.kind, "source": "config"}
    if cred.kind == "rfc2136":
        out.update(
            server=cred.server,
            port=cred.port,
            zone=cred.zone,
            tsig_key_name=cred.tsig_key_name,
            tsig_algorithm=cred.tsig_algorithm,
            tsig_secret=f"env:{cred.tsig_secret_env}"
            if cred.tsig_secret_env
            else f"file:{cred.tsig_secret_file}",
        )
    else:
        out.update(
            api_url=cred.api_url,
            api_token=f"env:{cred.token_env}" if cred.token_env else f"file:{cred.token_file}",
        )
    out.update(
        ttl=cred.ttl, check_port=cred.check_port, check_servers=list(cred.check_servers), revision=0
    )
    return out


@dataclass(frozen=True, slots=True)
class CustomRoute:
    """A static custom-domain route: ``domain`` goes to ``app_id`` (app or instance) on ``port``.

    The alternative to the ``_dstack-app-address.<domain>`` TXT record, checked first.
    """

    domain: str
    app_id: str
    port: int
    revision: int = 0

    @classmethod
    def from_json(cls, obj: Any, domain: str | None = None) -> CustomRoute:
        keys = {"app_id", "port"} | ({"domain"} if domain is None else set())
        obj = _obj(obj, "body", keys, keys)
        return cls(
            domain=parse_domain(obj["domain"] if domain is None else domain),
            app_id=_str(obj["app_id"], "app_id", _APP_ID, "an app or instance id (hex)"),
            port=_port(obj["port"]),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "app_id": self.app_id,
            "port": self.port,
            "revision": self.revision,
        }


@dataclass(frozen=True, slots=True)
class PortPolicyOverride:
    """An admin port policy for one instance; it wins over what the instance reported."""

    instance_id: str
    policy: PortPolicy
    revision: int = 0

    @classmethod
    def from_json(cls, instance_id: str, obj: Any) -> PortPolicyOverride:
        ports = _obj(obj, "body", {"ports", "restrict_mode"}).get("ports")
        for i, item in enumerate(ports if isinstance(ports, list) else ()):
            if isinstance(item, dict):  # strict, as documented; the RPC's parser stays lenient
                _obj(item, f"ports[{i}]", {"port", "pp"})
        try:
            policy = PortPolicy.from_json(obj)
        except RpcError as exc:
            name = exc.message.split(" ", 1)[0].split(":", 1)[0].removeprefix("port_policy.")
            raise FieldError(name, exc.message.removeprefix("port_policy.")) from None
        return cls(_str(instance_id, "instance_id", _INSTANCE_ID, "an instance id"), policy)


@dataclass(frozen=True, slots=True)
class Drain:
    instance_id: str
    since: float
    revision: int = 0


class Topic(enum.StrEnum):
    DOMAINS = "domains"
    DNS = "dns"
    ROUTES = "routes"
    PORT_POLICY = "port_policy"
    DRAIN = "drain"
    ADMISSION = "admission"
