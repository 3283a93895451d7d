"""TLS terminated by pyOpenSSL in front of an aiohttp server, exposing the client's chain.

Why not the stdlib: Python 3.11's ``ssl`` has no verify callback, so a server either refuses
a self-signed client certificate or does not ask for one, and ``getpeercert`` shows only the
leaf. The registration RPC needs both: a CVM's self-signed RA-TLS certificate must get
through the handshake (its quote, not a CA, vouches for it), and a KMS-signed chain must
reach the verifier with its intermediates.

How: one :class:`TlsProtocol` per TCP connection drives an ``OpenSSL.SSL.Connection`` over
memory BIOs (nothing blocks the loop; OpenSSL never sees the socket). The handshake runs
under a deadline. Only after it succeeds is aiohttp's handler protocol (``runner.server()``)
created; it talks to a small :class:`_AppTransport` whose ``write`` encrypts and whose
``get_extra_info("peer_cert_chain")`` is the presented chain, leaf first, as DER. Garbage,
truncated or slow handshakes therefore never reach aiohttp; they end in an alert or a close.

The verify callback accepts any certificate, so the TLS layer proves only that the client
holds the key of the leaf it presented; the evidence in that certificate decides (see
:mod:`gateway.control.registration`). With ``client_ca_file`` the callback instead keeps
OpenSSL's verdict against that CA: an optional, extra TLS-layer requirement.

Back-pressure runs both ways: a full socket buffer pauses the handler's writes, and a
handler that pauses reading stops both decryption and the socket. Certificates are reloaded
by swapping the context (:meth:`TlsSite.reload`): new handshakes use it, open connections
keep theirs.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from aiohttp import web
from OpenSSL import SSL, crypto

logger = logging.getLogger(__name__)

__all__ = [
    "HANDSHAKE_TIMEOUT",
    "PEER_CERT_CHAIN",
    "TlsCredentials",
    "TlsProtocol",
    "TlsServerError",
    "TlsSite",
    "server_context",
]

#: ``transport.get_extra_info`` key: the client's certificates, leaf first, DER ([] if none).
PEER_CERT_CHAIN = "peer_cert_chain"
HANDSHAKE_TIMEOUT = 10.0
_CHUNK = 64 * 1024


class TlsServerError(OSError):
    """The certificate, key or client CA could not be loaded; the message names the file.

    An ``OSError``, as ``ssl.SSLError`` is, so the commands' handlers of certificate-loading
    failures (``gateway rpc``, ``gateway control``) report it without a traceback."""


@dataclass(frozen=True, slots=True)
class TlsCredentials:
    """What a context is built from: our certificate chain and key (PEM files), and an
    optional CA that client certificates must additionally chain to."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None


def _accept_any(conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
    """Possession of the key is all TLS proves; the evidence is judged after the handshake."""
    return True


def _keep_openssl_verdict(
    conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int
) -> bool:
    return bool(ok)


def _why(path: Path, exc: Exception) -> str:
    if not path.is_file():
        return "no such file"
    return _describe(exc) if isinstance(exc, SSL.Error) else str(exc)


def server_context(creds: TlsCredentials) -> SSL.Context:
    """A TLS 1.2+ server context that asks for (but does not require) a client certificate.

    Raises :class:`TlsServerError` naming the file that failed to load.
    """
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_RENEGOTIATION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_TICKET)
    # No resumption: CVMs open one connection per registration with a fresh TLS client, so
    # tickets were never used, yet each of the two TLS 1.3 tickets OpenSSL sends carries
    # the whole client chain (an RA-TLS leaf is ~7 KB): +10 KB on the wire and ~0.1 ms of
    # server CPU per registration. With OP_NO_TICKET and the cache off, OpenSSL still
    # sends TLS 1.3's small stateful ticket, which never matches: a full handshake each time,
    # so every connection proves possession of the key it presents.
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    try:
        ctx.use_certificate_chain_file(str(creds.cert_file))
    except (SSL.Error, OSError) as exc:
        raise TlsServerError(
            f"cannot load the certificate {creds.cert_file}: {_why(creds.cert_file, exc)}"
        ) from None
    try:
        ctx.use_privatekey_file(str(creds.key_file))
        ctx.check_privatekey()
    except (SSL.Error, OSError) as exc:
        raise TlsServerError(
            f"cannot load the key {creds.key_file} (or it does not match the certificate): "
            f"{_why(creds.key_file, exc)}"
        ) from None
    if creds.client_ca_file is None:
        ctx.set_verify(SSL.VERIFY_PEER, _accept_any)
    else:
        try:
            ctx.load_verify_locations(str(creds.client_ca_file))
            ctx.load_client_ca(str(creds.client_ca_file).encode())  # named in the request
        except (SSL.Error, OSError) as exc:
            raise TlsServerError(
                f"cannot load the client CA {creds.client_ca_file}: "
                f"{_why(creds.client_ca_file, exc)}"
            ) from None
        ctx.set_verify(SSL.VERIFY_PEER, _keep_openssl_verdict)
    ctx.set_session_id(b"gateway-rpc")
    return ctx


def _der(cert: crypto.X509) -> bytes:
    return crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)


def _peer_chain(conn: SSL.Connection) -> list[bytes]:
    """The presented chain, leaf first. A server's ``SSL_get_peer_cert_chain`` omits the
    leaf, so it is put in front (and not duplicated if a library version includes it)."""
    leaf = conn.get_peer_certificate()
    if leaf is None:
        return []
    chain = [_der(leaf)]
    for cert in conn.get_peer_cert_chain() or []:
        der = _der(cert)
        if der != chain[0] or len(chain) > 1:
            chain.append(der)
    return chain


class _AppTransport(asyncio.Transport):
    """What aiohttp's handler sees: plaintext in, plaintext out, through the TLS protocol."""

    def __init__(self, tls: TlsProtocol) -> None:
        super().__init__()
        self._tls = tls

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._tls.extra_info(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._tls.app_write(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        self._tls.app_write(b"".join(bytes(d) for d in list_of_data))

    def can_write_eof(self) -> bool:
        return False

    def is_closing(self) -> bool:
        return self._tls.closing

    def close(self) -> None:
        self._tls.app_close()

    def abort(self) -> None:
        self._tls.abort()

    def is_reading(self) -> bool:
        return not self._tls.app_paused

    def pause_reading(self) -> None:
        self._tls.app_pause_reading()

    def resume_reading(self) -> None:
        self._tls.app_resume_reading()

    def get_write_buffer_size(self) -> int:
        return self._tls.write_buffer_size()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._tls.set_write_buffer_limits(high, low)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._tls.app = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._tls.app is not None
        return self._tls.app


class TlsProtocol(asyncio.Protocol):
    """One TLS connection: handshake under a deadline, then relay plaintext to ``factory()``.

    ``context`` is read when the connection is made, so a reloaded context applies to new
    connections only. ``on_done`` is told when the connection ends (the site's bookkeeping).
    """

    def __init__(
        self,
        context: Callable[[], SSL.Context],
        factory: Callable[[], asyncio.Protocol],
        *,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        on_done: Callable[[TlsProtocol], None] | None = None,
    ) -> None:
        self._context = context
        self._factory = factory
        self._handshake_timeout = handshake_timeout
        self._on_done = on_done
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._conn: SSL.Connection | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._extra: dict[str, Any] = {}
        self.app: asyncio.Protocol | None = None
        self.closing = False
        self.app_paused = False
        self._write_paused = False
        self._lost = False
        # TLS 1.3 sends its post-handshake session ticket after the client's Finished; it
        # rides along with the first response instead of costing a socket write of its own
        self._hold_output = False
        # how the connection went, counted by TlsSite.stats: "handshaking" (closed by the
        # peer mid-handshake), "refused" (TLS error in the handshake), "timeout",
        # "established"; ``reason`` is the detail of the last failure
        self.outcome = "handshaking"
        self.reason = ""

    # --- asyncio.Protocol (the TCP side) ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport implements asyncio.Transport without subclassing it, so no
        # isinstance check here (it failed every connection under uvloop).
        self._transport = cast(asyncio.Transport, transport)
        transport = self._transport
        try:
            conn = SSL.Connection(self._context(), None)
        except SSL.Error as exc:  # pragma: no cover - out of memory and the like
            logger.error("cannot start a TLS connection: %s", exc)
            transport.abort()
            return
        conn.set_accept_state()
        self._conn = conn
        self._timer = self._loop.call_later(self._handshake_timeout, self._handshake_expired)

    def data_received(self, data: bytes) -> None:
        conn = self._conn
        if conn is None or self._lost or self.closing:
            return
        try:
            conn.bio_write(data)
        except SSL.Error as exc:
            self._fail(f"TLS input refused: {exc}")
            return
        if self.app is None:
            self._handshake()
        else:
            self._pump_read()

    def eof_received(self) -> bool | None:
        # A TCP FIN without close_notify: treat like a close from the peer.
        if self.app is not None and not self.closing:
            self.app.eof_received()
        return None  # asyncio closes the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self.closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.app is not None:
            self.app.connection_lost(exc)
        if self._on_done is not None:
            self._on_done(self)

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.app is not None:
            self.app.pause_writing()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.app is not None:
            self.app.resume_writing()

    # --- handshake -------------------------------------------------------------------------

    def _handshake(self) -> None:
        assert self._conn is not None and self._transport is not None
        conn = self._conn
        try:
            conn.do_handshake()
        except SSL.WantReadError:
            self._flush()
            return
        except SSL.Error as exc:
            self._flush()  # the alert, if OpenSSL wrote one
            self.outcome = "refused"
            self._fail(f"TLS handshake failed: {_describe(exc)}")
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if conn.get_protocol_version_name() == "TLSv1.3":
            # Only the (never used, see server_context) ticket is pending: the client needs
            # nothing more to finish, so it goes out with the first response or the close.
            self._hold_output = True
        else:
            self._flush()  # TLS 1.2: the server's Finished, which the client waits for
        transport = self._transport
        self._extra = {
            PEER_CERT_CHAIN: _peer_chain(conn),
            "sslcontext": conn.get_context(),
            "ssl_object": None,  # not a stdlib SSLObject: use peer_cert_chain
            "tls_version": conn.get_protocol_version_name(),
            "cipher": conn.get_cipher_name(),
            "alpn_protocol": None,
        }
        self.outcome = "established"
        app = self._factory()
        self.app = app
        app.connection_made(_AppTransport(self))
        if self._write_paused:  # the handshake's flights already filled the buffer
            app.pause_writing()
        if not self._lost and transport is not None and not transport.is_closing():
            self._pump_read()  # application data that came with the last flight

    def _handshake_expired(self) -> None:
        self._timer = None
        if self.app is None and not self._lost:
            self.outcome = "timeout"
            self._fail(f"TLS handshake not finished within {self._handshake_timeout:g}s")
            if self._transport is not None:
                self._transport.abort()  # a client that stopped reading cannot hold it open

    # --- data pumps ------------------------------------------------------------------------

    def _pump_read(self) -> None:
        conn = self._conn
        assert conn is not None
        while self.app is not None and not self.app_paused and not self.closing:
            try:
                chunk = conn.recv(_CHUNK)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:  # close_notify from the peer
                self._flush()
                self.app.eof_received()
                self.app_close()
                return
            except SSL.Error as exc:
                self._flush()
                self._fail(f"TLS record error: {_describe(exc)}")
                return
            if not chunk:
                break
            self.app.data_received(chunk)
        if not self._hold_output:
            self._flush()  # what reading produced (a KeyUpdate answer, say)

    def _flush(self) -> None:
        """Move whatever OpenSSL produced (records, alerts) to the socket."""
        self._hold_output = False
        conn, transport = self._conn, self._transport
        if conn is None or transport is None or transport.is_closing():
            return
        out = []
        while True:
            try:
                data = conn.bio_read(_CHUNK)
            except SSL.WantReadError:
                break
            except SSL.Error:
                break
            if not data:
                break
            out.append(data)
            if len(data) < _CHUNK:
                break  # a memory BIO hands out all it has: drained (no WantReadError to raise)
        if out:
            transport.write(b"".join(out))

    # --- called by _AppTransport -----------------------------------------------------------

    def extra_info(self, name: str, default: Any) -> Any:
        if name in self._extra:
            return self._extra[name]
        if self._transport is None:
            return default
        return self._transport.get_extra_info(name, default)

    def app_write(self, data: bytes) -> None:
        if self.closing or self._conn is None or not data:
            return
        view = memoryview(data)
        try:
            while view:
                sent = self._conn.send(view[:_CHUNK].tobytes())
                view = view[sent:]
        except SSL.Error as exc:
            self._fail(f"TLS write failed: {_describe(exc)}")
            return
        self._flush()

    def app_close(self) -> None:
        """Send close_notify, then close the socket once the buffer drains."""
        if self.closing:
            return
        self.closing = True
        if self._conn is not None:
            try:
                self._conn.shutdown()
            except SSL.Error:
                pass
            self._flush()
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        self.closing = True
        if self._transport is not None:
            self._transport.abort()

    def app_pause_reading(self) -> None:
        if not self.app_paused:
            self.app_paused = True
            if self._transport is not None and not self._transport.is_closing():
                self._transport.pause_reading()

    def app_resume_reading(self) -> None:
        if self.app_paused:
            self.app_paused = False
            if self._transport is not None and not self._transport.is_closing():
                self._transport.resume_reading()
            self._loop.call_soon(self._resume_pump)

    def _resume_pump(self) -> None:
        if self.app is not None and not self._lost and not self.closing:
            self._pump_read()  # records decrypted-but-undelivered while paused

    def write_buffer_size(self) -> int:
        return 0 if self._transport is None else self._transport.get_write_buffer_size()

    def set_write_buffer_limits(self, high: int | None, low: int | None) -> None:
        if self._transport is not None:
            self._transport.set_write_buffer_limits(high, low)

    def _fail(self, why: str) -> None:
        self.reason = why
        peer = self._transport.get_extra_info("peername") if self._transport else None
        # debug: a port scan must not flood the log; tests read ``outcome``
        logger.debug("TLS connection from %s closed: %s", peer, why)
        self.closing = True
        if self._transport is not None:
            self._transport.close()  # flushes the alert already written


def _describe(exc: SSL.Error) -> str:
    """OpenSSL's error queue as one line (``SysCallError`` carries errno, text instead)."""
    if isinstance(exc, SSL.SysCallError):
        return f"connection error {exc.args}"
    parts = []
    for entry in exc.args[0] if exc.args and isinstance(exc.args[0], list) else []:
        if isinstance(entry, tuple) and entry:
            parts.append(str(entry[-1]))
    return ", ".join(parts) or repr(exc)


class TlsSite(web.BaseSite):
    """An aiohttp site on ``host:port`` whose TLS is :class:`TlsProtocol`.

    ``runner.cleanup()`` stops it like any site; connections still handshaking are aborted
    then too (aiohttp only knows those that finished). ``stats`` counts ended connections
    by :attr:`TlsProtocol.outcome` (for metrics and tests).
    """

    __slots__ = (
        "_host",
        "_port",
        "_creds",
        "_ctx",
        "_handshake_timeout",
        "_pending",
        "_listener",
        "stats",
    )

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        creds: TlsCredentials,
        *,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        backlog: int = 128,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._creds = creds
        self._ctx = server_context(creds)
        self._handshake_timeout = handshake_timeout
        self._pending: set[TlsProtocol] = set()
        self._listener: asyncio.Server | None = None
        self.stats: Counter[str] = Counter()

    @property
    def name(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"https://{host}:{self._port}"

    @property
    def context(self) -> SSL.Context:
        return self._ctx

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        if self._listener is not None and self._listener.sockets:
            return int(self._listener.sockets[0].getsockname()[1])
        return self._port

    def reload(self) -> None:
        """Re-read the certificate and key (after renewal): new handshakes present them.

        Raises :class:`TlsServerError` and keeps the old context if the files are bad.
        """
        self._ctx = server_context(self._creds)

    def _protocol(self) -> TlsProtocol:
        server = self._runner.server
        assert server is not None
        proto = TlsProtocol(
            lambda: self._ctx,
            server,
            handshake_timeout=self._handshake_timeout,
            on_done=self._ended,
        )
        self._pending.add(proto)
        return proto

    def _ended(self, proto: TlsProtocol) -> None:
        self._pending.discard(proto)
        self.stats[proto.outcome] += 1

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(
            self._protocol, self._host, self._port, backlog=self._backlog, reuse_address=True
        )
        self._server = self._listener

    async def stop(self) -> None:
        await super().stop()
        for proto in list(self._pending):
            if proto.app is None:
                proto.abort()
