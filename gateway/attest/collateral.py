"""Where verification collateral comes from: a file, a PCCS/PCS (cached), or the simulator.

Collateral (TCB info, QE identity, their signer chain, the root and PCK CRLs) is per
platform family (FMSPC) and PCK CA, and it expires: Intel re-issues it about monthly and
every piece carries a ``nextUpdate``. dcap-qvl refuses expired collateral, so a verifier
must refetch in time. :class:`PccsCollateralSource` keys an on-disk cache by FMSPC and CA
and refetches when the earliest ``nextUpdate`` is within ``refresh_margin`` seconds.

PCCS v4 endpoints used (Intel PCS serves the same paths, except ``rootcacrl``, for which
the root certificate's CRL distribution point is fetched instead)::

    GET {base}/sgx/certification/v4/pckcrl?ca={platform|processor}&encoding=der
        body: CRL (DER; hex or PEM tolerated)   header SGX-PCK-CRL-Issuer-Chain
    GET {base}/sgx/certification/v4/rootcacrl   body: CRL (hex from PCCS, or DER)
    GET {base}/tdx/certification/v4/tcb?fmspc={FMSPC}
        body: {"tcbInfo": {...}, "signature": hex}   header TCB-Info-Issuer-Chain
    GET {base}/tdx/certification/v4/qe/identity?update=standard
        body: {"enclaveIdentity": {...}, "signature": hex}
        header SGX-Enclave-Identity-Issuer-Chain

The signed JSON is kept byte-for-byte as served (its signature covers those exact bytes),
so it is cut out of the response text rather than re-serialised.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import unquote

import dcap_qvl
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.attest.intel_root import INTEL_ROOT_CA_CRL_URL
from gateway.attest.quote import QuoteVerificationError, load_collateral_json
from gateway.attest.settings import AttestSettings

if TYPE_CHECKING:
    import aiohttp

    from gateway.tee.sim_pki import SimPki

__all__ = [
    "CollateralError",
    "CollateralSource",
    "FileCollateralSource",
    "PccsCollateralSource",
    "SimCollateralSource",
    "collateral_expiry",
    "collateral_source_from_settings",
    "load_collateral_file",
    "quote_collateral_key",
]

logger = logging.getLogger(__name__)


class CollateralError(Exception):
    """Collateral could not be obtained; the message says from where and what to check."""


class CollateralSource(Protocol):
    """Gives the collateral to verify ``quote`` with (awaitable: it may fetch)."""

    async def get(self, quote: bytes) -> dcap_qvl.QuoteCollateralV3: ...


def load_collateral_file(path: Path) -> dcap_qvl.QuoteCollateralV3:
    """Collateral JSON from a file (dcap-qvl's ``to_json`` format)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CollateralError(f"cannot read collateral file {path}: {exc}") from None
    try:
        return load_collateral_json(text)
    except QuoteVerificationError as exc:
        raise CollateralError(f"{path}: {exc.message}") from None


def _parse_time(text: str) -> int:
    value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return int(value.timestamp())


def collateral_expiry(col: dcap_qvl.QuoteCollateralV3) -> int:
    """The earliest ``nextUpdate`` among TCB info, QE identity and both CRLs (unix time)."""
    try:
        times = [
            _parse_time(json.loads(col.tcb_info)["nextUpdate"]),
            _parse_time(json.loads(col.qe_identity)["nextUpdate"]),
        ]
        for der in (bytes(col.root_ca_crl), bytes(col.pck_crl)):
            nu = x509.load_der_x509_crl(der).next_update_utc
            if nu is None:
                raise ValueError("a CRL without nextUpdate")
            times.append(int(nu.timestamp()))
    except (ValueError, KeyError, TypeError) as exc:
        raise CollateralError(f"collateral is unreadable: {exc}") from None
    return min(times)


def quote_collateral_key(quote: bytes) -> tuple[str, str]:
    """(FMSPC upper-case hex, PCK CA ``platform``/``processor``) read from the quote's PCK
    certificate: the key collateral is issued (and cached) under."""
    try:
        parsed = dcap_qvl.parse_quote(bytes(quote))
        fmspc = str(parsed.fmspc()).upper()
        ca = str(parsed.ca())
    except (ValueError, TypeError) as exc:
        raise CollateralError(f"cannot read FMSPC/CA from the quote: {exc}") from None
    if not re.fullmatch(r"[0-9A-F]{12}", fmspc) or ca not in ("platform", "processor"):
        raise CollateralError(f"unexpected FMSPC {fmspc!r} / CA {ca!r} in the quote")
    return fmspc, ca


@dataclass(frozen=True, slots=True)
class FileCollateralSource:
    """Offline: the same collateral file for every quote (re-read on each call, so an
    operator can replace it without a restart)."""

    path: Path

    async def get(self, quote: bytes) -> dcap_qvl.QuoteCollateralV3:
        return load_collateral_file(self.path)


class SimCollateralSource:
    """The simulated PKI's collateral, regenerated before it expires (the sim's PCCS)."""

    def __init__(
        self, pki: SimPki, *, clock: Callable[[], float] = time.time, margin: int = 3600
    ) -> None:
        self._pki = pki
        self._clock = clock
        self._margin = margin
        self._cached: tuple[int, dcap_qvl.QuoteCollateralV3] | None = None

    async def get(self, quote: bytes) -> dcap_qvl.QuoteCollateralV3:
        now = int(self._clock())
        if self._cached is None or self._cached[0] - self._margin <= now:
            col = self._pki.collateral(now)
            self._cached = (collateral_expiry(col), col)
        return self._cached[1]


# --- PCCS ----------------------------------------------------------------------------------

_WS = re.compile(r"[ \t\n\r]*")


def raw_json_members(text: str) -> dict[str, str]:
    """The members of a top-level JSON object as their exact source text.

    Signatures over TCB info and QE identity cover the served bytes; re-serialising would
    change them. Raises :class:`CollateralError` when ``text`` is not a JSON object.
    """
    decoder = json.JSONDecoder()
    out: dict[str, str] = {}
    try:
        i = _WS.match(text, 0).end()  # type: ignore[union-attr]
        if text[i] != "{":
            raise ValueError("not an object")
        i = _WS.match(text, i + 1).end()  # type: ignore[union-attr]
        if text[i] == "}":
            return out
        while True:
            if text[i] != '"':
                raise ValueError(f"expected a key at {i}")
            key, i = json.decoder.scanstring(text, i + 1)  # type: ignore[attr-defined]
            i = _WS.match(text, i).end()  # type: ignore[union-attr]
            if text[i] != ":":
                raise ValueError(f"expected ':' at {i}")
            i = _WS.match(text, i + 1).end()  # type: ignore[union-attr]
            _, end = decoder.raw_decode(text, i)
            out[key] = text[i:end]
            i = _WS.match(text, end).end()  # type: ignore[union-attr]
            if text[i] == "}":
                return out
            if text[i] != ",":
                raise ValueError(f"expected ',' at {i}")
            i = _WS.match(text, i + 1).end()  # type: ignore[union-attr]
    except (ValueError, IndexError) as exc:
        raise CollateralError(f"PCCS answered with malformed JSON: {exc}") from None


def _crl_der(body: bytes) -> bytes:
    """A CRL as DER from PCCS/PCS answers (DER, hex text or PEM)."""
    stripped = body.strip()
    if stripped.startswith(b"-----BEGIN"):
        return x509.load_pem_x509_crl(stripped).public_bytes(serialization.Encoding.DER)
    if stripped and re.fullmatch(rb"[0-9a-fA-F]+", stripped):
        return bytes.fromhex(stripped.decode())
    return body


MIN_REFETCH_INTERVAL = 300
"""Seconds between fetches for one key while a still-valid cached copy exists."""


class PccsCollateralSource:
    """Collateral from a PCCS (or Intel's PCS), cached on disk per FMSPC and CA.

    A cached entry is used until ``refresh_margin`` seconds before its earliest
    ``nextUpdate``; then it is refetched. If the refetch fails while the cached entry has
    not actually expired, the cached one is used and the failure logged. Concurrent calls
    for one key share one fetch, and a key is refetched at most every
    :data:`MIN_REFETCH_INTERVAL` seconds while its cached copy is still valid.
    """

    def __init__(
        self,
        base_url: str,
        cache_dir: Path,
        *,
        timeout: float = 30.0,
        refresh_margin: int = 3600,
        clock: Callable[[], float] = time.time,
    ) -> None:
        base = base_url.rstrip("/")
        for suffix in ("/sgx/certification/v4", "/tdx/certification/v4"):
            base = base.removesuffix(suffix)
        self._base = base
        self._dir = cache_dir
        self._timeout = timeout
        self._margin = refresh_margin
        self._clock = clock
        self._memory: dict[tuple[str, str], tuple[int, dcap_qvl.QuoteCollateralV3]] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._fetched_at: dict[tuple[str, str], int] = {}
        self.fetches = 0  # how many times the PCCS was asked (tests, metrics)

    def cache_path(self, fmspc: str, ca: str) -> Path:
        """The cache file for ``fmspc`` and ``ca`` from this PCCS."""
        return self._path((fmspc.upper(), ca))

    def _path(self, key: tuple[str, str]) -> Path:
        # Keyed by the PCCS too: collateral of one service (e.g. one simulated PKI's PCCS)
        # must never be served for another's quotes.
        source = hashlib.sha256(self._base.encode()).hexdigest()[:12]
        return self._dir / f"{source}-{key[0]}-{key[1]}.json"

    def _load_disk(self, key: tuple[str, str]) -> tuple[int, dcap_qvl.QuoteCollateralV3] | None:
        path = self._path(key)
        if not path.exists():
            return None
        try:
            col = load_collateral_file(path)
            return collateral_expiry(col), col
        except CollateralError as exc:
            logger.warning("attest: ignoring unreadable collateral cache %s: %s", path, exc)
            return None

    def _store_disk(self, key: tuple[str, str], col: dcap_qvl.QuoteCollateralV3) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(col.to_json(), encoding="utf-8")
        os.replace(tmp, path)

    async def get(self, quote: bytes) -> dcap_qvl.QuoteCollateralV3:
        key = quote_collateral_key(quote)
        return await self.get_for(*key)

    async def get_for(self, fmspc: str, ca: str) -> dcap_qvl.QuoteCollateralV3:
        key = (fmspc.upper(), ca)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            now = int(self._clock())
            entry = self._memory.get(key) or self._load_disk(key)
            if entry is not None and entry[0] - self._margin > now:
                self._memory[key] = entry
                return entry[1]
            recently = now - self._fetched_at.get(key, -MIN_REFETCH_INTERVAL) < MIN_REFETCH_INTERVAL
            if entry is not None and entry[0] > now and recently:
                return entry[1]  # the PCCS itself serves near-expiry data: do not hammer it
            self._fetched_at[key] = now
            try:
                col = await self._fetch(*key)
            except CollateralError as exc:
                if entry is not None and entry[0] > now:
                    logger.warning(
                        "attest: collateral refresh for %s failed (%s); using the cached "
                        "copy valid until %d",
                        key[0],
                        exc,
                        entry[0],
                    )
                    return entry[1]
                raise
            expiry = collateral_expiry(col)
            if expiry <= now:
                raise CollateralError(
                    f"{self._base} served collateral for FMSPC {key[0]} that expired at "
                    f"{expiry}; check the PCCS's own refresh"
                )
            self._store_disk(key, col)
            self._memory[key] = (expiry, col)
            return col

    async def _fetch(self, fmspc: str, ca: str) -> dcap_qvl.QuoteCollateralV3:
        import aiohttp  # imported on first fetch: keeps `gateway attest` start-up light

        self.fetches += 1
        timeout = aiohttp.ClientTimeout(total=self._timeout)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as http:
                pck_crl, pck_hdr = await self._get(
                    http,
                    f"{self._base}/sgx/certification/v4/pckcrl?ca={ca}&encoding=der",
                    "SGX-PCK-CRL-Issuer-Chain",
                )
                tcb_body, tcb_chain = await self._get(
                    http,
                    f"{self._base}/tdx/certification/v4/tcb?fmspc={fmspc}",
                    "TCB-Info-Issuer-Chain",
                    "SGX-TCB-Info-Issuer-Chain",
                )
                qe_body, qe_chain = await self._get(
                    http,
                    f"{self._base}/tdx/certification/v4/qe/identity?update=standard",
                    "SGX-Enclave-Identity-Issuer-Chain",
                )
                root_crl = await self._root_crl(http, qe_chain)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise CollateralError(
                f"fetching collateral from {self._base} failed: {exc!r}"
            ) from None
        tcb = raw_json_members(tcb_body.decode("utf-8", "replace"))
        qe = raw_json_members(qe_body.decode("utf-8", "replace"))
        try:
            return dcap_qvl.QuoteCollateralV3(
                pck_crl_issuer_chain=pck_hdr,
                root_ca_crl=root_crl,
                pck_crl=_crl_der(pck_crl),
                tcb_info_issuer_chain=tcb_chain,
                tcb_info=tcb["tcbInfo"],
                tcb_info_signature=bytes.fromhex(json.loads(tcb["signature"])),
                qe_identity_issuer_chain=qe_chain,
                qe_identity=qe["enclaveIdentity"],
                qe_identity_signature=bytes.fromhex(json.loads(qe["signature"])),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise CollateralError(
                f"{self._base} answered with incomplete collateral: {exc}"
            ) from None

    async def _get(self, http: aiohttp.ClientSession, url: str, *headers: str) -> tuple[bytes, str]:
        async with http.get(url) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise CollateralError(f"GET {url} answered {resp.status}")
            for name in headers:
                if name in resp.headers:
                    return body, unquote(resp.headers[name])
            raise CollateralError(f"GET {url} lacks the {headers[0]} header")

    async def _root_crl(self, http: aiohttp.ClientSession, chain_pem: str) -> bytes:
        async with http.get(f"{self._base}/sgx/certification/v4/rootcacrl") as resp:
            if resp.status == 200:
                return _crl_der(await resp.read())
        # Intel's PCS has no rootcacrl endpoint: use the root's CRL distribution point.
        url = _crl_distribution_point(chain_pem)
        async with http.get(url) as resp:
            if resp.status != 200:
                raise CollateralError(f"GET {url} (root CA CRL) answered {resp.status}")
            return _crl_der(await resp.read())


def _crl_distribution_point(chain_pem: str) -> str:
    """The CRL URL of the last (root) certificate in ``chain_pem``; Intel's as fallback."""
    try:
        root = x509.load_pem_x509_certificates(chain_pem.encode())[-1]
        cdp = root.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except (ValueError, IndexError, x509.ExtensionNotFound):
        return INTEL_ROOT_CA_CRL_URL
    for point in cdp:
        for name in point.full_name or ():
            if isinstance(name, x509.UniformResourceIdentifier):
                return str(name.value)
    return INTEL_ROOT_CA_CRL_URL


def collateral_source_from_settings(
    settings: AttestSettings, *, clock: Callable[[], float] = time.time
) -> CollateralSource:
    """The source ``[attest]`` names (``file`` or ``pccs``)."""
    if settings.collateral_source == "file":
        return FileCollateralSource(Path(settings.collateral_file))
    return PccsCollateralSource(
        settings.pccs_url,
        settings.cache_dir,
        timeout=settings.fetch_timeout,
        refresh_margin=settings.refresh_margin,
        clock=clock,
    )
