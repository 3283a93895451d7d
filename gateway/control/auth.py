"""Admin authentication: fail-closed tokens and bcrypt htpasswd, with failure rate limits.

Accepted credentials (any one): ``X-Admin-Token: <token>``, ``Authorization: Bearer
<token>``, or ``Authorization: Basic`` with an htpasswd user and password (or any user name
with the token as password, which is what a browser prompt can send). Tokens are compared as
SHA-256 digests with :func:`hmac.compare_digest`, so neither content nor length leaks through
timing. Tokens in query strings are deliberately not accepted: URLs end up in logs and
browser history.

Each failed attempt costs one unit of the client's budget; a client over budget gets 429
before its credentials are even looked at, so guessing is bounded. Failures are logged with
the client address and the reason, never with what was presented.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import bcrypt
from aiohttp import web
from aiohttp.typedefs import Middleware

from gateway.config import ConfigError, env_value
from gateway.control.errors import problem_response
from gateway.control.ratelimit import RateLimiter
from gateway.control.settings import AdminSettings

logger = logging.getLogger(__name__)

REALM = 'Basic realm="gateway admin", charset="UTF-8"'
_POSITIVE_CACHE_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class Credentials:
    """What the admin API accepts. ``insecure`` means no authentication at all (dev only)."""

    token_digest: bytes | None = None
    htpasswd: tuple[tuple[str, bytes], ...] = ()
    insecure: bool = False

    @property
    def configured(self) -> bool:
        return self.token_digest is not None or bool(self.htpasswd)


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


def parse_htpasswd(text: str, source: str = "htpasswd") -> tuple[tuple[str, bytes], ...]:
    """Parse ``user:bcrypt-hash`` lines; only bcrypt (``$2a$``/``$2b$``/``$2y$``) is accepted."""
    entries: list[tuple[str, bytes]] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user:
            raise ConfigError(f"admin.htpasswd_file:{lineno}", f"{source}: expected user:hash")
        if not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            raise ConfigError(
                f"admin.htpasswd_file:{lineno}",
                f"{source}: user {user!r} does not use a bcrypt hash",
                "create entries with `htpasswd -B` (bcrypt)",
            )
        # Python's bcrypt accepts $2b$; $2y$ is the same algorithm under Apache's name.
        entries.append((user, hashed.replace("$2y$", "$2b$", 1).encode()))
    return tuple(entries)


def load_credentials(settings: AdminSettings) -> Credentials:
    """Resolve the configured credentials, refusing to run open unless told to."""
    token: str | None = env_value(settings.token_env) if settings.token_env else None
    if settings.token_file is not None:
        try:
            token = settings.token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                "admin.token_file", f"cannot read {settings.token_file}: {exc.strerror}"
            ) from None
    if token is not None and len(token) < 16:
        raise ConfigError(
            "admin",
            "the admin token is shorter than 16 characters",
            "generate one with `openssl rand -hex 32`",
        )
    htpasswd: tuple[tuple[str, bytes], ...] = ()
    if settings.htpasswd_file is not None:
        path = Path(settings.htpasswd_file)
        try:
            htpasswd = parse_htpasswd(path.read_text(encoding="utf-8"), str(path))
        except OSError as exc:
            raise ConfigError(
                "admin.htpasswd_file", f"cannot read {path}: {exc.strerror}"
            ) from None
    creds = Credentials(
        token_digest=_digest(token) if token else None,
        htpasswd=htpasswd,
        insecure=settings.insecure_no_auth,
    )
    if not creds.configured and not creds.insecure:
        raise ConfigError(
            "admin",
            "the admin API has no credentials",
            f"set the {settings.token_env} environment variable, admin.token_file or "
            "admin.htpasswd_file (or admin.insecure_no_auth = true for development only)",
        )
    return creds


@dataclass
class Authenticator:
    """Checks requests against :class:`Credentials`; bcrypt runs off the event loop."""

    creds: Credentials
    limiter: RateLimiter
    clock: Callable[[], float] = time.monotonic
    _good: dict[bytes, float] = field(default_factory=dict)

    def _token_ok(self, presented: str) -> bool:
        if self.creds.token_digest is None:
            return False
        return hmac.compare_digest(_digest(presented), self.creds.token_digest)

    async def _basic_ok(self, user: str, password: str) -> bool:
        if self._token_ok(password):
            return True
        hashed = next((h for u, h in self.creds.htpasswd if hmac.compare_digest(u, user)), None)
        if hashed is None:
            return False
        key = hashlib.sha256(b"%s\0%s\0%s" % (user.encode(), password.encode(), hashed)).digest()
        now = self.clock()
        if self._good.get(key, 0.0) > now:
            return True
        ok = await asyncio.to_thread(bcrypt.checkpw, password.encode("utf-8"), hashed)
        if ok:
            if len(self._good) > 1024:
                self._good.clear()
            self._good[key] = now + _POSITIVE_CACHE_SECONDS
        return ok

    async def check(self, request: web.Request) -> str | None:
        """None if authenticated, else the reason (``missing`` or ``invalid``)."""
        if self.creds.insecure and not self.creds.configured:
            return None
        token = request.headers.get("X-Admin-Token")
        if token is not None:
            return None if self._token_ok(token) else "invalid"
        auth = request.headers.get("Authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer":
            return None if self._token_ok(value.strip()) else "invalid"
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return "invalid"
            user, _, password = decoded.partition(":")
            return None if await self._basic_ok(user, password) else "invalid"
        return "missing"


def client_key(request: web.Request) -> str:
    return request.remote or "unix"


def auth_middleware(auth: Authenticator, public_paths: frozenset[str]) -> Middleware:
    """aiohttp middleware: everything but ``public_paths`` needs valid credentials."""

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path in public_paths:
            return await handler(request)
        key = client_key(request)
        if not auth.limiter.allowed(key):
            retry = max(1, round(auth.limiter.retry_after(key)))
            logger.warning("admin auth: %s over its failure budget (path %s)", key, request.path)
            return _problem(
                429,
                "rate_limited",
                "too many failed authentication attempts",
                {"Retry-After": str(retry)},
            )
        reason = await auth.check(request)
        if reason is not None:
            auth.limiter.hit(key)
            logger.warning("admin auth: %s credentials from %s for %s", reason, key, request.path)
            return _problem(
                401,
                "unauthorized",
                f"{reason} credentials: send X-Admin-Token, a Bearer token or Basic credentials",
                {"WWW-Authenticate": REALM},
            )
        return await handler(request)

    return middleware


def _problem(status: int, code: str, detail: str, headers: dict[str, str]) -> web.Response:
    return problem_response(status, code, detail, headers=headers)
