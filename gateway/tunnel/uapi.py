"""The WireGuard cross-platform userspace API (UAPI) text protocol, sans-IO.

Grammar (https://www.wireguard.com/xplatform/, as wireguard-go and ``wg`` speak it over
``/var/run/wireguard/<iface>.sock``)::

    request  = ("get=1" | "set=1" *("\\n" key "=" value)) "\\n\\n"
    response = *(key "=" value "\\n") "errno=" digits "\\n\\n"

Keys are hex on this socket, not base64. A ``set`` names the interface fields first
(``private_key``, ``listen_port``, ``replace_peers``), then one block per peer starting with
``public_key=``; within a block ``remove=true`` drops the peer, ``replace_allowed_ips=true``
followed by ``allowed_ip=`` lines sets its routes. So a single peer is added, changed or removed
without touching the others: that is why the gateway uses this protocol rather than rewriting
the whole configuration per registration.

Three outcomes for :func:`parse_response`: a value, ``None`` (need more bytes) or
:class:`UapiError`. :class:`DeviceState` never holds the private key (it is dropped while
decoding) so that a state can be logged or cached without leaking it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.tunnel.errors import TunnelError
from gateway.tunnel.keys import WgKeyError, key_from_hex, key_hex, public_key

__all__ = [
    "MAX_RESPONSE",
    "DeviceState",
    "Network",
    "PeerConfig",
    "PeerRemoval",
    "PeerState",
    "UapiError",
    "decode_get",
    "encode_get",
    "encode_set",
    "parse_response",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: A ``get`` for 10 000 peers is about 3 MB; anything past this is not a WireGuard daemon.
MAX_RESPONSE = 64 * 1024 * 1024


class UapiError(TunnelError):
    """A UAPI exchange failed: malformed bytes, or the daemon answered ``errno != 0``."""

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """Add a peer or replace its settings (allowed IPs are replaced, not appended)."""

    public_key: str
    allowed_ips: tuple[Network, ...]
    endpoint: str | None = None
    persistent_keepalive: int | None = None

    def __post_init__(self) -> None:
        key_hex(self.public_key)  # raises WgKeyError for anything but a 32-byte key
        if self.endpoint is not None:
            _check_value("endpoint", self.endpoint)
        if self.persistent_keepalive is not None and not 0 <= self.persistent_keepalive <= 65535:
            raise ValueError(f"persistent_keepalive out of range: {self.persistent_keepalive}")


@dataclass(frozen=True, slots=True)
class PeerRemoval:
    """Remove the peer with this public key (no error if it is absent)."""

    public_key: str

    def __post_init__(self) -> None:
        key_hex(self.public_key)


@dataclass(frozen=True, slots=True)
class PeerState:
    """One peer as the device reports it; ``last_handshake`` is unix seconds, None if never."""

    public_key: str
    allowed_ips: tuple[Network, ...]
    endpoint: str | None
    last_handshake: float | None
    rx_bytes: int
    tx_bytes: int
    persistent_keepalive: int


@dataclass(frozen=True, slots=True)
class DeviceState:
    """The device as ``get=1`` reports it, minus the private key."""

    public_key: str | None
    listen_port: int
    peers: tuple[PeerState, ...]

    def peer(self, public_key: str) -> PeerState | None:
        for p in self.peers:
            if p.public_key == public_key:
                return p
        return None


def _check_value(name: str, value: str) -> None:
    if "\n" in value or "=" in value or not value:
        raise ValueError(f"{name} must be a non-empty value without newline or '='")


def encode_get() -> bytes:
    return b"get=1\n\n"


def encode_set(
    *,
    private_key: str | None = None,
    listen_port: int | None = None,
    replace_peers: bool = False,
    peers: Sequence[PeerConfig | PeerRemoval] = (),
) -> bytes:
    """One ``set=1`` request; raises ``ValueError`` (incl. :class:`WgKeyError`) on bad input."""
    lines = ["set=1"]
    if private_key is not None:
        lines.append(f"private_key={key_hex(private_key)}")
    if listen_port is not None:
        if not 0 <= listen_port <= 65535:
            raise ValueError(f"listen_port out of range: {listen_port}")
        lines.append(f"listen_port={listen_port}")
    if replace_peers:
        lines.append("replace_peers=true")
    for change in peers:
        lines.append(f"public_key={key_hex(change.public_key)}")
        if isinstance(change, PeerRemoval):
            lines.append("remove=true")
            continue
        if change.endpoint is not None:
            lines.append(f"endpoint={change.endpoint}")
        if change.persistent_keepalive is not None:
            lines.append(f"persistent_keepalive_interval={change.persistent_keepalive}")
        lines.append("replace_allowed_ips=true")
        lines.extend(f"allowed_ip={net}" for net in change.allowed_ips)
    return ("\n".join(lines) + "\n\n").encode("ascii")


def parse_response(buf: bytes) -> tuple[list[tuple[str, str]], int] | None:
    """Split one response off ``buf``: ``(pairs, bytes consumed)``, ``None`` if incomplete.

    The pairs end with ``("errno", "<n>")``; :func:`check_errno` is applied, so a value means
    the daemon reported success. Raises :class:`UapiError` for malformed bytes or errno != 0.
    """
    end = buf.find(b"\n\n")
    if end < 0:
        if len(buf) > MAX_RESPONSE:
            raise UapiError(f"UAPI response larger than {MAX_RESPONSE} bytes without an end")
        if buf.startswith(b"\n"):
            raise UapiError("UAPI response starts with an empty line")
        return None
    try:
        text = buf[:end].decode("ascii")
    except UnicodeDecodeError as exc:
        raise UapiError(f"UAPI response is not ASCII at offset {exc.start}") from None
    pairs: list[tuple[str, str]] = []
    for number, line in enumerate(text.split("\n"), 1):
        key, sep, value = line.partition("=")
        if not sep or not key:
            raise UapiError(f"UAPI response line {number} is not key=value: {line[:40]!r}")
        pairs.append((key, value))
    last_key, last_value = pairs[-1]
    if last_key != "errno":
        raise UapiError("UAPI response does not end with errno=")
    digits = last_value.removeprefix("-")  # wireguard-go reports errors as -errno
    if not digits.isdigit() or len(digits) > 9:
        raise UapiError(f"UAPI errno is not a number: {last_value[:16]!r}")
    errno = int(last_value)
    if errno != 0:
        raise UapiError(
            f"WireGuard device refused the request (errno={errno}); its log says why",
            errno=abs(errno),
        )
    return pairs, end + 2


def _int(key: str, value: str) -> int:
    if not value.isdigit() or len(value) > 20:
        raise UapiError(f"UAPI field {key} is not a number: {value[:24]!r}")
    return int(value)


def _key(key: str, value: str) -> str:
    try:
        return key_from_hex(value)
    except WgKeyError:
        raise UapiError(f"UAPI field {key} is not a 32-byte hex key") from None


@dataclass(slots=True)
class _PeerBuilder:
    public_key: str
    allowed_ips: list[Network]
    endpoint: str | None = None
    sec: int = 0
    nsec: int = 0
    rx: int = 0
    tx: int = 0
    keepalive: int = 0

    def build(self) -> PeerState:
        seen = self.sec or self.nsec
        return PeerState(
            public_key=self.public_key,
            allowed_ips=tuple(self.allowed_ips),
            endpoint=self.endpoint or None,
            last_handshake=(self.sec + self.nsec / 1e9) if seen else None,
            rx_bytes=self.rx,
            tx_bytes=self.tx,
            persistent_keepalive=self.keepalive,
        )


def decode_get(pairs: Sequence[tuple[str, str]]) -> DeviceState:
    """The pairs of a ``get=1`` response -> :class:`DeviceState`; raises :class:`UapiError`."""
    own_public: str | None = None
    listen_port = 0
    peers: list[PeerState] = []
    cur: _PeerBuilder | None = None
    for key, value in pairs:
        if key == "public_key":
            if cur is not None:
                peers.append(cur.build())
            cur = _PeerBuilder(_key(key, value), [])
        elif cur is None:
            if key == "private_key" and value.strip("0"):
                own_public = public_key(_key(key, value))
            elif key == "listen_port":
                listen_port = _int(key, value)
        elif key == "allowed_ip":
            try:
                cur.allowed_ips.append(ipaddress.ip_network(value, strict=False))
            except ValueError:
                raise UapiError(f"UAPI allowed_ip is not a network: {value[:48]!r}") from None
        elif key == "endpoint":
            cur.endpoint = value
        elif key == "last_handshake_time_sec":
            cur.sec = _int(key, value)
        elif key == "last_handshake_time_nsec":
            cur.nsec = _int(key, value)
        elif key == "rx_bytes":
            cur.rx = _int(key, value)
        elif key == "tx_bytes":
            cur.tx = _int(key, value)
        elif key == "persistent_keepalive_interval":
            cur.keepalive = _int(key, value)
    if cur is not None:
        peers.append(cur.build())
    return DeviceState(public_key=own_public, listen_port=listen_port, peers=tuple(peers))
