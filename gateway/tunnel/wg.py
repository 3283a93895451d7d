"""A WireGuard device the gateway owns: created if missing, configured, peers changed one by one.

Backends (``backend`` in :class:`DeviceSpec`):

* ``kernel``: ``ip link add <name> type wireguard`` in the namespace; controlled with ``wg``
  (:class:`~gateway.tunnel.control.WgToolControl`). The link survives a gateway restart.
* ``wireguard-go``: the userspace daemon, started by us in the namespace with
  ``WG_PROCESS_FOREGROUND=1`` so it stays our child; controlled over its UAPI socket
  (:class:`~gateway.tunnel.control.UapiControl`); stopped by PID on :meth:`WgDevice.close`,
  which removes the interface.
* ``auto``: use an existing device as it is; otherwise try the kernel link and fall back to
  wireguard-go when the kernel has no ``wireguard`` module (the case on this test machine).

Address and link state are set with ``ip -n <netns>``. Peer changes are incremental (one peer
added, changed or removed per call), never a rewrite of the whole configuration. Reading the
state (:meth:`WgDevice.state`) is for timer tasks, never for the connection hot path.
"""

from __future__ import annotations

import contextlib
import enum
import ipaddress
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from gateway.tunnel.commands import OwnedProcess, in_netns, run
from gateway.tunnel.control import (
    UAPI_DIR,
    UapiControl,
    WgControl,
    WgToolControl,
    socket_listening,
    uapi_socket_path,
)
from gateway.tunnel.errors import CommandError, TunnelError
from gateway.tunnel.keys import decode_key
from gateway.tunnel.uapi import DeviceState, PeerConfig, PeerRemoval

logger = logging.getLogger(__name__)

__all__ = ["Backend", "DeviceSpec", "PeerSync", "WgDevice", "link_exists", "max_iface_len"]

#: Linux interface names are at most 15 bytes (IFNAMSIZ - 1).
max_iface_len = 15

#: Peers per request in :meth:`WgDevice.sync_peers`. A new peer without keepalive costs
#: wireguard-go ~0.08 ms of CPU (a keepalive adds a handshake initiation, ~0.14 ms); 10 000
#: peers in one request or in 50 of these take the same ~0.7 s, so the batch only bounds a
#: request's size and time.
SYNC_BATCH = 200


class Backend(enum.StrEnum):
    AUTO = "auto"
    KERNEL = "kernel"
    WIREGUARD_GO = "wireguard-go"


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """Everything needed to bring one device up.

    ``address`` is the interface's own IP/prefix (the gateway's ``/24`` covers its clients);
    ``routes`` are extra networks sent through the device, as ``wg-quick`` adds for peers'
    allowed IPs (a CVM with a ``/32`` address routes the gateway's IP this way).
    """

    name: str
    private_key: str
    listen_port: int | None = None
    address: ipaddress.IPv4Interface | ipaddress.IPv6Interface | None = None
    netns: str | None = None
    routes: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    backend: Backend = Backend.AUTO
    wireguard_go: str = "wireguard-go"
    uapi_dir: Path = UAPI_DIR
    start_timeout: float = 10.0
    control_timeout: float = 30.0

    def __post_init__(self) -> None:
        if not self.name or len(self.name.encode()) > max_iface_len or "/" in self.name:
            raise ValueError(f"interface name {self.name!r} must be 1-15 bytes without '/'")
        decode_key(self.private_key)

    def __repr__(self) -> str:  # the private key stays out of logs and tracebacks
        return f"DeviceSpec(name={self.name!r}, netns={self.netns!r}, backend={self.backend})"


@dataclass(frozen=True, slots=True)
class PeerSync:
    """What :meth:`WgDevice.sync_peers` changed."""

    added: tuple[str, ...]
    updated: tuple[str, ...]
    removed: tuple[str, ...]


def link_exists(name: str, netns: str | None = None) -> bool:
    argv = ["ip", *(["-n", netns] if netns else []), "link", "show", "dev", name]
    return run(argv, check=False).returncode == 0


def _ip(netns: str | None, *args: str) -> None:
    run(["ip", *(["-n", netns] if netns else []), *args])


class WgDevice:
    """One WireGuard interface. Use as a context manager, or call :meth:`open`/:meth:`close`."""

    def __init__(self, spec: DeviceSpec, *, log_dir: Path | None = None) -> None:
        self.spec = spec
        self.log_dir = log_dir
        self.backend: Backend | None = None
        self.process: OwnedProcess | None = None
        self._control: WgControl | None = None

    def __repr__(self) -> str:
        return f"WgDevice({self.spec!r}, backend={self.backend})"

    @property
    def control(self) -> WgControl:
        if self._control is None:
            raise TunnelError(f"WireGuard device {self.spec.name} is not open")
        return self._control

    # --- lifecycle -----------------------------------------------------------------------

    def open(self) -> WgDevice:
        """Create the interface if missing, set key, port, address and bring it up."""
        spec = self.spec
        sock = uapi_socket_path(spec.name, spec.uapi_dir)
        if link_exists(spec.name, spec.netns):
            if socket_listening(sock):
                self.backend = Backend.WIREGUARD_GO
                self._control = UapiControl(sock, timeout=spec.control_timeout)
            elif spec.backend is Backend.WIREGUARD_GO:
                raise TunnelError(
                    f"{spec.name} exists but no userspace daemon answers on {sock}; "
                    "delete the link or choose backend = 'kernel'"
                )
            else:
                self.backend, self._control = Backend.KERNEL, self._tool()
            logger.info("using existing WireGuard interface %s (%s)", spec.name, self.backend)
        elif spec.backend is Backend.KERNEL:
            self._create_kernel()
        elif spec.backend is Backend.WIREGUARD_GO:
            self._start_userspace(sock)
        else:
            try:
                self._create_kernel()
            except CommandError as exc:
                logger.info("kernel WireGuard unavailable (%s); starting wireguard-go", exc.stderr)
                self._start_userspace(sock)
        try:
            self.control.configure(private_key=spec.private_key, listen_port=spec.listen_port)
            if spec.address is not None:
                _ip(spec.netns, "addr", "replace", str(spec.address), "dev", spec.name)
            _ip(spec.netns, "link", "set", "dev", spec.name, "up")
            for net in spec.routes:  # what wg-quick does for peers' allowed IPs
                _ip(spec.netns, "route", "replace", str(net), "dev", spec.name)
        except BaseException:
            self.close()
            raise
        return self

    def _tool(self) -> WgToolControl:
        return WgToolControl(self.spec.name, netns=self.spec.netns)

    def _create_kernel(self) -> None:
        _ip(self.spec.netns, "link", "add", "dev", self.spec.name, "type", "wireguard")
        self.backend, self._control = Backend.KERNEL, self._tool()
        logger.info("created kernel WireGuard interface %s", self.spec.name)

    def _start_userspace(self, sock: Path) -> None:
        spec = self.spec
        if sock.exists():
            if socket_listening(sock):
                raise TunnelError(
                    f"{sock} belongs to another running daemon (interface {spec.name} in another "
                    "namespace?); interface names must be unique on the machine"
                )
            sock.unlink()  # a leftover of a daemon that died; wireguard-go would refuse it
        log = self.log_dir / f"wireguard-go-{spec.name}.log" if self.log_dir else None
        self.process = OwnedProcess(
            in_netns(spec.netns, [spec.wireguard_go, spec.name]),
            log_path=log,
            env={"WG_PROCESS_FOREGROUND": "1", "LOG_LEVEL": "error"},
        )
        control = UapiControl(sock, timeout=spec.control_timeout)
        deadline = time.monotonic() + spec.start_timeout
        while not socket_listening(sock):
            if not self.process.alive():
                tail = self.process.log_tail()
                self.process = None
                raise TunnelError(f"wireguard-go for {spec.name} exited at start: {tail.strip()}")
            if time.monotonic() > deadline:
                self.close()
                raise TunnelError(f"wireguard-go for {spec.name} did not open {sock} in time")
            time.sleep(0.02)
        self.backend, self._control = Backend.WIREGUARD_GO, control
        logger.info("started wireguard-go pid %d for %s", self.process.pid, spec.name)

    def close(self) -> None:
        """Stop our wireguard-go by PID (the interface goes with it). Kernel links stay."""
        proc, self.process = self.process, None
        if proc is not None:
            proc.stop()
            with contextlib.suppress(FileNotFoundError):
                uapi_socket_path(self.spec.name, self.spec.uapi_dir).unlink()
        self._control = None

    def delete(self) -> None:
        """Close and also remove a kernel link (for tests and ``lab down``)."""
        self.close()
        if link_exists(self.spec.name, self.spec.netns):
            _ip(self.spec.netns, "link", "del", "dev", self.spec.name)

    def __enter__(self) -> WgDevice:
        return self.open()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- interface changes after open ------------------------------------------------------

    def set_address(
        self,
        address: ipaddress.IPv4Interface | ipaddress.IPv6Interface,
        routes: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
    ) -> None:
        """Give the interface (another) address and route ``routes`` through it.

        The guest side does this once the gateway has answered with its tunnel address.
        """
        _ip(self.spec.netns, "addr", "replace", str(address), "dev", self.spec.name)
        for net in routes:
            _ip(self.spec.netns, "route", "replace", str(net), "dev", self.spec.name)

    def set_private_key(self, private_key: str) -> None:
        """Rotate the device's own key (existing sessions end; peers must learn the new key)."""
        self.control.configure(private_key=private_key, listen_port=None)

    # --- peers ---------------------------------------------------------------------------

    def set_peer(self, peer: PeerConfig) -> None:
        """Add the peer, or replace its allowed IPs / endpoint / keepalive."""
        self.control.apply([peer])

    def remove_peer(self, public_key: str) -> None:
        """Remove one peer; removing an absent peer is not an error."""
        self.control.apply([PeerRemoval(public_key)])

    def apply(self, changes: Iterable[PeerConfig | PeerRemoval]) -> None:
        """Several changes in one request (a key rotation: remove old, add new)."""
        batch = list(changes)
        if batch:
            self.control.apply(batch)

    def state(self) -> DeviceState:
        """Peers, latest handshakes and counters. Timer tasks only: this is a socket round-trip."""
        return self.control.state()

    def sync_peers(
        self, desired: Mapping[str, PeerConfig], *, current: DeviceState | None = None
    ) -> PeerSync:
        """Make the device's peers exactly ``desired`` (keyed by public key), touching only diffs.

        Used at start-up (restore from the registry) and by the periodic reconcile: peers
        that match are left alone, so live sessions are not disturbed. Peers are added in
        ``desired``'s order (the registry puts the most recently alive first). ``current``:
        a state the caller read already (and knows to be still valid), saving a read.
        """
        state = current if current is not None else self.state()
        current_peers = {p.public_key: p for p in state.peers}
        changes: list[PeerConfig | PeerRemoval] = []
        added: list[str] = []
        updated: list[str] = []
        for key, want in desired.items():
            have = current_peers.get(key)
            if have is None:
                added.append(key)
                changes.append(want)
            elif set(have.allowed_ips) != set(want.allowed_ips) or (
                want.persistent_keepalive is not None
                and have.persistent_keepalive != want.persistent_keepalive
            ):
                updated.append(key)
                changes.append(want)
        removed = [key for key in current_peers if key not in desired]
        changes.extend(PeerRemoval(key) for key in removed)
        for start in range(0, len(changes), SYNC_BATCH):  # bounded request size and time
            self.control.apply(changes[start : start + SYNC_BATCH])
        return PeerSync(tuple(added), tuple(updated), tuple(removed))
