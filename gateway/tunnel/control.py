"""Talking to a WireGuard device: the UAPI socket (userspace) or the ``wg`` tool (kernel).

Both implement :class:`WgControl`, which changes single peers incrementally and reads the
device state (latest handshakes, transfer counters). The state read is for timer tasks only;
nothing here belongs on the connection hot path.

* :class:`UapiControl` speaks the text protocol of :mod:`gateway.tunnel.uapi` over
  ``/var/run/wireguard/<iface>.sock`` (wireguard-go, or any userspace implementation). The
  socket is a file, so it works from any network namespace.
* :class:`WgToolControl` runs ``wg set`` / ``wg show <iface> dump`` inside the device's
  namespace. ``wg`` itself speaks netlink to kernel devices (and UAPI to userspace ones), so
  this is the kernel path without adding a netlink dependency; it is one process per change,
  which is fine at registration rates.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from gateway.tunnel.commands import run
from gateway.tunnel.errors import TunnelError
from gateway.tunnel.keys import WgKeyError, decode_key, public_key
from gateway.tunnel.uapi import (
    MAX_RESPONSE,
    DeviceState,
    Network,
    PeerConfig,
    PeerRemoval,
    PeerState,
    UapiError,
    decode_get,
    encode_get,
    encode_set,
    parse_response,
)

__all__ = [
    "UAPI_DIR",
    "UapiControl",
    "WgControl",
    "WgToolControl",
    "socket_listening",
    "uapi_socket_path",
]

UAPI_DIR = Path("/var/run/wireguard")


def uapi_socket_path(iface: str, directory: Path = UAPI_DIR) -> Path:
    return directory / f"{iface}.sock"


def socket_listening(path: Path) -> bool:
    """True if a process listens on the unix socket ``path`` (connect succeeds).

    Deliberately not a UAPI request: a daemon busy with a large ``set`` answers late but is
    alive, and deleting its socket file makes wireguard-go shut its device down. Only a
    refused connection (nobody listening) marks a socket file as a leftover.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        try:
            sock.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError:
            return True  # e.g. a full backlog: someone is there
    return True


class WgControl(Protocol):
    """What the gateway needs from a WireGuard device, whatever implements it."""

    def configure(self, *, private_key: str | None, listen_port: int | None) -> None: ...

    def apply(
        self, changes: Sequence[PeerConfig | PeerRemoval], *, replace_peers: bool = False
    ) -> None: ...

    def state(self) -> DeviceState: ...


class UapiControl:
    """A UAPI client: one short connection per request, with a deadline."""

    __slots__ = ("path", "timeout")

    def __init__(self, path: Path, *, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout

    def _exchange(self, request: bytes) -> list[tuple[str, str]]:
        deadline = time.monotonic() + self.timeout
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(str(self.path))
                sock.sendall(request)
                buf = bytearray()
                scanned = 0  # the terminator is searched only in new bytes: no O(n^2) rescans
                while buf.find(b"\n\n", max(0, scanned - 1)) < 0 and not buf.startswith(b"\n"):
                    scanned = len(buf)
                    if time.monotonic() > deadline:
                        raise UapiError(f"no complete UAPI answer from {self.path} in time")
                    chunk = sock.recv(262144)
                    if not chunk:
                        raise UapiError(f"{self.path} closed the connection mid-answer")
                    buf += chunk
                    if len(buf) > MAX_RESPONSE:
                        raise UapiError(
                            f"UAPI answer from {self.path} exceeds {MAX_RESPONSE} bytes"
                        )
                parsed = parse_response(bytes(buf))
                if parsed is None:  # unreachable: the terminator is in buf
                    raise UapiError(f"incomplete UAPI answer from {self.path}")
                return parsed[0]
        except FileNotFoundError:
            raise TunnelError(
                f"no WireGuard UAPI socket at {self.path}: is the device running?"
            ) from None
        except OSError as exc:
            raise TunnelError(f"UAPI socket {self.path}: {exc.strerror or exc}") from None

    def configure(self, *, private_key: str | None, listen_port: int | None) -> None:
        self._exchange(encode_set(private_key=private_key, listen_port=listen_port))

    def apply(
        self, changes: Sequence[PeerConfig | PeerRemoval], *, replace_peers: bool = False
    ) -> None:
        self._exchange(encode_set(peers=changes, replace_peers=replace_peers))

    def state(self) -> DeviceState:
        return decode_get(self._exchange(encode_get()))


class WgToolControl:
    """The ``wg`` command inside ``netns``: works for kernel and userspace devices."""

    __slots__ = ("iface", "netns", "wg")

    def __init__(self, iface: str, *, netns: str | None = None, wg: str = "wg") -> None:
        self.iface = iface
        self.netns = netns
        self.wg = wg

    def configure(self, *, private_key: str | None, listen_port: int | None) -> None:
        argv = [self.wg, "set", self.iface]
        if listen_port is not None:
            argv += ["listen-port", str(listen_port)]
        if private_key is not None:
            decode_key(private_key)
            argv += ["private-key", "/dev/stdin"]  # never on the command line
        if len(argv) > 3:
            run(argv, netns=self.netns, input_text=(private_key or "") + "\n")

    def apply(
        self, changes: Sequence[PeerConfig | PeerRemoval], *, replace_peers: bool = False
    ) -> None:
        if replace_peers:
            keep = {c.public_key for c in changes if isinstance(c, PeerConfig)}
            stale = [
                PeerRemoval(p.public_key) for p in self.state().peers if p.public_key not in keep
            ]
            changes = [*stale, *changes]
        if not changes:
            return
        argv = [self.wg, "set", self.iface]
        for change in changes:
            argv += ["peer", change.public_key]
            if isinstance(change, PeerRemoval):
                argv.append("remove")
                continue
            argv += ["allowed-ips", ",".join(str(n) for n in change.allowed_ips)]
            if change.endpoint is not None:
                argv += ["endpoint", change.endpoint]
            if change.persistent_keepalive is not None:
                argv += ["persistent-keepalive", str(change.persistent_keepalive or "off")]
        run(argv, netns=self.netns)

    def state(self) -> DeviceState:
        out = run([self.wg, "show", self.iface, "dump"], netns=self.netns).stdout
        return parse_dump(out)


def parse_dump(text: str) -> DeviceState:
    """``wg show <iface> dump`` -> :class:`DeviceState`; raises :class:`UapiError`.

    Line 1: private-key public-key listen-port fwmark; then one line per peer: public-key
    preshared-key endpoint allowed-ips latest-handshake rx tx persistent-keepalive (tabs;
    ``(none)`` / ``off`` / ``0`` for unset).
    """
    lines = [line for line in text.splitlines() if line]
    if not lines:
        raise UapiError("empty output from wg show dump")
    head = lines[0].split("\t")
    if len(head) != 4:
        raise UapiError("wg show dump: interface line does not have 4 fields")
    try:
        own = public_key(head[0]) if head[0] != "(none)" else None
        peers = []
        for line in lines[1:]:
            f = line.split("\t")
            if len(f) != 8:
                raise UapiError("wg show dump: peer line does not have 8 fields")
            decode_key(f[0])
            nets: list[Network] = (
                [ipaddress.ip_network(n, strict=False) for n in f[3].split(",")]
                if f[3] != "(none)"
                else []
            )
            peers.append(
                PeerState(
                    public_key=f[0],
                    allowed_ips=tuple(nets),
                    endpoint=None if f[2] == "(none)" else f[2],
                    last_handshake=float(f[4]) or None,
                    rx_bytes=int(f[5]),
                    tx_bytes=int(f[6]),
                    persistent_keepalive=0 if f[7] == "off" else int(f[7]),
                )
            )
        return DeviceState(public_key=own, listen_port=int(head[2]), peers=tuple(peers))
    except (WgKeyError, ValueError) as exc:
        raise UapiError(f"wg show dump: {exc}") from None
