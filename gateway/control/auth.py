"""Admin authentication: fail-closed tokens and bcrypt htpasswd, with failure rate limits.

Accepted credentials (any one): ``X-Admin-Token: <token>``, ``Authorization: Bearer
<token>``, or ``Authorization: Basic`` with an htpasswd user and password, with any user
name and the token as password (what a browser prompt can send), or with the token as user
name and an empty password (``<token>:``, as upstream's api-auth accepts). Tokens are
compared as SHA-256 digests with :func:`hmac.compare_digest`, so neither content nor length
leaks through timing. Tokens in query strings are deliberately not accepted: URLs end up in
logs and browser history.

Headers are parsed by :func:`parse_credentials`, a pure function that never raises: header
values reach us as ``str`` (aiohttp decodes UTF-8 with ``surrogateescape``), so the raw bytes
are recovered and everything after that is compared as bytes. Undecodable or malformed
values (bad base64, no ``:``, a lone surrogate) are *malformed* credentials: a 401 that
counts against the budget, like a wrong password; a bcrypt hash or password bcrypt cannot
take (longer than 72 bytes is truncated, as Apache's ``htpasswd -B`` did when it hashed it)
never becomes a 500.

Rate limiting (the decision, also in docs/operations.md): every invalid or malformed
credential costs one unit of a budget (``admin.auth_failures_per_minute``) keyed by the
client's *TCP peer address* (the socket's, never ``X-Forwarded-For``; IPv6 clients by their
/64, since one host usually owns a whole /64; all unix-socket clients share one key, the
socket being owner/group-only). Requests without credentials are answered 401 but not
counted: they guess nothing. A client over budget gets 429 without its htpasswd password
being looked at (bcrypt costs ~50 ms of CPU and human passwords are guessable, so the budget
is what bounds guessing), *except* that a correct admin token still passes: the token check
is one SHA-256 and a constant-time compare, the token is at least 16 characters (generate
it with ``openssl rand -hex 32``), so letting it through gives a guesser nothing useful
while an attacker sharing the operator's address (NAT, a jump host) cannot lock the
operator out. htpasswd users in that situation are locked out until the budget refills
(one unit per ``60 / auth_failures_per_minute`` seconds). Because an attacker may own many
addresses (an IPv6 /48 is 65536 /64s), failures are also counted in one node-wide budget,
``GLOBAL_FACTOR`` times the per-address one; past it, password checks stop for everyone
(tokens still pass) until it refills. Failures are logged with the client address and the
reason, never with what was presented.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import ipaddress
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import bcrypt
from aiohttp import web
from aiohttp.typedefs import Middleware

from gateway.config import ConfigError, env_value
from gateway.control.errors import REQUEST_ID, problem_response
from gateway.control.ratelimit import RateLimiter
from gateway.control.settings import AdminSettings

logger = logging.getLogger(__name__)

REALM = 'Basic realm="gateway admin", charset="UTF-8"'
_POSITIVE_CACHE_SECONDS = 60.0
_BCRYPT_HASH = re.compile(r"^\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}$")
_BCRYPT_MAX = 72  # bytes bcrypt looks at; longer passwords were truncated when hashed
GLOBAL_FACTOR = 10  # the node-wide failure budget, in per-address budgets
_EVERYONE = "*"


@dataclass(frozen=True, slots=True)
class Credentials:
    """What the admin API accepts. ``insecure`` means no authentication at all (dev only)."""

    token_digest: bytes | None = None
    htpasswd: tuple[tuple[str, bytes], ...] = ()
    insecure: bool = False

    @property
    def configured(self) -> bool:
        return self.token_digest is not None or bool(self.htpasswd)


def _digest(secret: str | bytes) -> bytes:
    raw = secret.encode("utf-8") if isinstance(secret, str) else secret
    return hashlib.sha256(raw).digest()


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
        if not _BCRYPT_HASH.match(hashed):
            raise ConfigError(
                f"admin.htpasswd_file:{lineno}",
                f"{source}: user {user!r} has a malformed bcrypt hash",
                "re-create the entry with `htpasswd -B`",
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


class Problem(StrEnum):
    """Why credentials were refused (logged and shown in the 401's detail)."""

    MISSING = "missing"  # none sent, or a scheme we do not take: not counted
    MALFORMED = "malformed"  # undecodable or ill-formed: counted
    INVALID = "invalid"  # well-formed but wrong: counted


@dataclass(frozen=True, slots=True)
class TokenCred:
    """``X-Admin-Token`` or ``Bearer``: the raw bytes the client sent."""

    token: bytes


@dataclass(frozen=True, slots=True)
class BasicCred:
    """``Basic``: user and password as sent (bytes; no encoding is assumed)."""

    user: bytes
    password: bytes


@dataclass(frozen=True, slots=True)
class Refused:
    problem: Problem
    why: str  # for the log; never contains what was presented


Presented = TokenCred | BasicCred | Refused


def _raw(value: str) -> bytes | None:
    """The bytes of a header value aiohttp decoded with ``surrogateescape`` (None: not such)."""
    try:
        return value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return None


def parse_credentials(x_admin_token: str | None, authorization: str | None) -> Presented:
    """What the two headers present. Pure and total: any input gives a value, never raises."""
    if x_admin_token is not None:
        raw = _raw(x_admin_token)
        if raw is None:
            return Refused(Problem.MALFORMED, "X-Admin-Token is not a header value")
        return TokenCred(raw.strip(b" \t"))
    if authorization is None:
        return Refused(Problem.MISSING, "no credentials")
    raw = _raw(authorization)
    if raw is None:
        return Refused(Problem.MALFORMED, "Authorization is not a header value")
    scheme, _, value = raw.strip(b" \t").partition(b" ")
    value = value.strip(b" \t")
    scheme = scheme.lower()
    if scheme == b"bearer":
        return TokenCred(value) if value else Refused(Problem.MALFORMED, "empty Bearer token")
    if scheme == b"basic":
        try:
            decoded = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return Refused(Problem.MALFORMED, "Basic value is not base64")
        user, sep, password = decoded.partition(b":")
        if not sep:
            return Refused(Problem.MALFORMED, "Basic value has no ':'")
        return BasicCred(user, password)
    return Refused(Problem.MISSING, "unsupported Authorization scheme")


@dataclass
class Authenticator:
    """Checks presented credentials against :class:`Credentials`; bcrypt runs off the loop."""

    creds: Credentials
    limiter: RateLimiter  # per client address
    everyone: RateLimiter | None = None  # node-wide, key "*" (see the module docstring)
    clock: Callable[[], float] = time.monotonic
    _good: dict[bytes, float] = field(default_factory=dict)

    def over_budget(self, key: str) -> float | None:
        """None if ``key`` may try credentials now, else seconds until it may."""
        waits = []
        if not self.limiter.allowed(key):
            waits.append(self.limiter.retry_after(key))
        if self.everyone is not None and not self.everyone.allowed(_EVERYONE):
            waits.append(self.everyone.retry_after(_EVERYONE))
        return max(waits) if waits else None

    def failed(self, key: str) -> None:
        self.limiter.hit(key)
        if self.everyone is not None:
            self.everyone.hit(_EVERYONE)

    def token_ok(self, presented: Presented) -> bool:
        """True if ``presented`` carries the admin token (cheap: SHA-256, constant time)."""
        if self.creds.token_digest is None:
            return False
        if isinstance(presented, TokenCred):
            candidate = presented.token
        elif isinstance(presented, BasicCred):  # any:<token>, or upstream's <token>:
            candidate = presented.password or presented.user
        else:
            return False
        return hmac.compare_digest(_digest(candidate), self.creds.token_digest)

    async def _htpasswd_ok(self, user: bytes, password: bytes) -> bool:
        hashed = next(
            (h for u, h in self.creds.htpasswd if hmac.compare_digest(u.encode(), user)), None
        )
        if hashed is None:
            return False
        key = hashlib.sha256(b"%s\0%s\0%s" % (user, password, hashed)).digest()
        now = self.clock()
        if self._good.get(key, 0.0) > now:
            return True
        try:
            ok = await asyncio.to_thread(bcrypt.checkpw, password[:_BCRYPT_MAX], hashed)
        except ValueError as exc:  # a hash bcrypt refuses (parse_htpasswd checks the shape)
            logger.error("admin auth: htpasswd entry unusable: %s", type(exc).__name__)
            return False
        if ok:
            if len(self._good) > 1024:
                self._good.clear()
            self._good[key] = now + _POSITIVE_CACHE_SECONDS
        return ok

    async def check(self, presented: Presented) -> Refused | None:
        """None if authenticated, else why not."""
        if self.creds.insecure and not self.creds.configured:
            return None
        if isinstance(presented, Refused):
            return presented
        if self.token_ok(presented):
            return None
        if isinstance(presented, BasicCred) and await self._htpasswd_ok(
            presented.user, presented.password
        ):
            return None
        return Refused(Problem.INVALID, "wrong credentials")


def client_key(request: web.Request) -> str:
    """The rate-limit key of the TCP peer (see :func:`peer_key`)."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return peer_key(peer[0] if isinstance(peer, tuple) and peer else None)


def peer_key(host: object) -> str:
    """``host`` as a rate-limit key: IPv4 as is (also when IPv4-mapped), IPv6 by its /64,
    ``unix`` for a unix-socket peer (no address)."""
    if not isinstance(host, str) or not host:
        return "unix"
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


def auth_middleware(auth: Authenticator, public_paths: frozenset[str]) -> Middleware:
    """aiohttp middleware: everything but ``public_paths`` needs valid credentials.

    Never raises for anything a client sends: every outcome is 401, 429 or the handler's.
    """

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path in public_paths:
            return await handler(request)
        key = client_key(request)
        presented = parse_credentials(
            request.headers.get("X-Admin-Token"), request.headers.get("Authorization")
        )
        wait = auth.over_budget(key)
        if wait is not None:
            if auth.token_ok(presented):  # see the module docstring: no lockout by a neighbour
                return await handler(request)
            retry = max(1, round(wait))
            logger.warning(
                "admin auth: %s over its failure budget (path %s)",
                key,
                request.path,
                extra={"request_id": request.get(REQUEST_ID, "-")},
            )
            return _problem(
                429,
                "rate_limited",
                "too many failed authentication attempts",
                {"Retry-After": str(retry)},
            )
        try:
            refused = await auth.check(presented)
        except Exception as exc:  # fail closed; the type only: messages may quote input
            logger.error("admin auth: credential check failed with %s", type(exc).__name__)
            refused = Refused(Problem.INVALID, f"check failed ({type(exc).__name__})")
        if refused is not None:
            if refused.problem is not Problem.MISSING:
                auth.failed(key)
            logger.warning(
                "admin auth: %s credentials from %s for %s (%s)",
                refused.problem.value,
                key,
                request.path,
                refused.why,
                extra={"request_id": request.get(REQUEST_ID, "-")},
            )
            return _problem(
                401,
                "unauthorized",
                f"{refused.problem.value} credentials: send X-Admin-Token, a Bearer token or "
                "Basic credentials",
                {"WWW-Authenticate": REALM},
            )
        return await handler(request)

    return middleware


def _problem(status: int, code: str, detail: str, headers: dict[str, str]) -> web.Response:
    return problem_response(status, code, detail, headers=headers)
