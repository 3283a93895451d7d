"""The SNI subdomain grammar that routes a connection to an app (dstack's ``parse_dst_info``).

A client reaches an app through a name exactly one label below a gateway base domain::

    sni    = label "." base-domain         ; one label only; deeper names are custom domains
    label  = id [ "-" [ port ] [ flag ] ]  ; split on "-": at most one "-" in the label
    id     = 1*( ALPHA / DIGIT / "_" )     ; app_id or instance_id (hex) or a special name
    port   = 1*DIGIT                       ; 1..65535; leading zeros tolerated (as upstream)
    flag   = "s" / "g"                     ; "g" is stripped first, then "s"; both is an error

=================  =====  ===========  =========================================
label              port   mode         meaning
=================  =====  ===========  =========================================
``<id>``           80     TERMINATE    TLS ends at the gateway, plain TCP to :80
``<id>-8080``      8080   TERMINATE
``<id>-s``         443    PASSTHROUGH  ClientHello replayed to the app's :443
``<id>-8443s``     8443   PASSTHROUGH
``<id>-g``         80     H2           terminate with ALPN ``h2`` only, h2c upstream
``<id>-50051g``    50051  H2
``<id>-``          80     TERMINATE    empty suffix: upstream accepts it, so do we
``myapps``         80     TERMINATE    a trailing ``s`` counts only after ``-``
=================  =====  ===========  =========================================

Errors (:class:`~gateway.protocol.errors.AddressError`, alert ``UNRECOGNIZED_NAME``): empty
label or id; a second ``-`` (``a-b-c``: ids containing ``-`` are unsupported); ``gs`` or ``sg``
(``<id>-443gs`` fails as an invalid port, ``<id>-443sg`` as "both flags"); a port that is not
digits, is 0 or is over 65535; characters outside the id alphabet.

Matching is case-insensitive: the label is lower-cased first. Unlike upstream (which needs a
loaded wildcard certificate to call a parent a base domain, and compares case-sensitively),
:func:`split_sni` keys on the configured base domains. Deviations from upstream, on purpose:
port 0 and a ``+`` sign (Rust's ``u16`` parse accepts ``+80``) are errors here.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Collection
from dataclasses import dataclass

from gateway.protocol.errors import AddressError

__all__ = ["Address", "Mode", "parse_address", "split_sni"]

_ID_RE = re.compile(r"[a-z0-9_]+")
_MAX_LABEL = 63


class Mode(enum.Enum):
    """How the gateway serves the connection."""

    TERMINATE = "terminate"
    PASSTHROUGH = "passthrough"
    H2 = "h2"


@dataclass(frozen=True, slots=True)
class Address:
    """Where a ZT-domain label points: an app or instance id, a port and a mode."""

    id: str
    port: int
    mode: Mode

    def __post_init__(self) -> None:
        if not _ID_RE.fullmatch(self.id) or len(self.id) > _MAX_LABEL:
            raise AddressError(f"address id {self.id!r} must be 1..63 of [a-z0-9_]")
        if not 1 <= self.port <= 0xFFFF:
            raise AddressError(f"address port {self.port} is not 1..65535")
        if not isinstance(self.mode, Mode):
            raise AddressError(f"address mode {self.mode!r} is not a Mode")

    def label(self) -> str:
        """The canonical label for this address (default ports left out)."""
        flag = {Mode.TERMINATE: "", Mode.PASSTHROUGH: "s", Mode.H2: "g"}[self.mode]
        default = 443 if self.mode is Mode.PASSTHROUGH else 80
        if self.port == default:
            return f"{self.id}-{flag}" if flag else self.id
        return f"{self.id}-{self.port}{flag}"


def parse_address(label: str) -> Address:
    """Parse one SNI label by the grammar in this module's docstring.

    Returns the :class:`Address`; raises :class:`AddressError` naming what is wrong.
    """
    if not label:
        raise AddressError("address label is empty")
    if len(label) > _MAX_LABEL:
        raise AddressError(f"address label {label[:20]!r}... is longer than 63 bytes")
    label = label.lower()
    ident, dash, suffix = label.partition("-")
    if not ident:
        raise AddressError(f"address label {label!r}: app id is empty")
    if "-" in suffix:
        raise AddressError(
            f"address label {label!r}: invalid sni format, more than one '-' "
            "(ids containing '-' are not supported)"
        )
    if not _ID_RE.fullmatch(ident):
        raise AddressError(f"address label {label!r}: id {ident!r} has characters outside a-z0-9_")
    if not dash:
        return Address(ident, 80, Mode.TERMINATE)
    port_text = suffix
    h2 = port_text.endswith("g")
    if h2:
        port_text = port_text[:-1]
    tls = port_text.endswith("s")
    if tls:
        port_text = port_text[:-1]
    if h2 and tls:
        raise AddressError(f"address label {label!r}: invalid sni format, `gs` is not allowed")
    mode = Mode.H2 if h2 else Mode.PASSTHROUGH if tls else Mode.TERMINATE
    if not port_text:
        return Address(ident, 443 if tls else 80, mode)
    if not (port_text.isascii() and port_text.isdigit()):
        raise AddressError(f"address label {label!r}: invalid port {port_text!r}")
    port = int(port_text)
    if not 1 <= port <= 0xFFFF:
        raise AddressError(f"address label {label!r}: port {port} is not 1..65535")
    return Address(ident, port, mode)


def split_sni(sni: str, base_domains: Collection[str]) -> tuple[str, str] | None:
    """Split ``sni`` into ``(label, base_domain)`` if it is exactly one label below a base.

    Returns ``None`` otherwise (a custom domain: deeper names, other parents, a base itself).
    Case-insensitive; both results are lower-case, the base as spelled in ``base_domains``
    lower-cased and without a trailing dot. Pass lower-case names (a ``frozenset``) for the fast
    path. Only one base can match, since the base is everything after the first dot.
    """
    label, dot, parent = sni.lower().partition(".")
    if not dot or not label or not parent:
        return None
    if parent in base_domains:
        return label, parent
    for base in base_domains:
        if base.lower().rstrip(".") == parent:
            return label, parent
    return None
