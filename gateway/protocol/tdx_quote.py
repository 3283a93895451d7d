"""Intel TDX quote v4: bytes <-> :class:`TdxQuote` (sans-IO, no verification).

Layout (all integers little-endian, offsets absolute from the start of the quote)::

    0    header (48)        version u16 | att_key_type u16 | tee_type u32 | qe_svn u16 |
                            pce_svn u16 | qe_vendor_id[16] | user_data[20]
    48   TD report (584)    tee_tcb_svn[16] mr_seam[48] mr_signer_seam[48] seam_attributes[8]
                            td_attributes[8] xfam[8] mr_td[48] mr_config_id[48] mr_owner[48]
                            mr_owner_config[48] rt_mr0..rt_mr3[48 each] report_data[64]
    632  sig_data_len u32
    636  signature data     quote_signature[64] (r||s over quote[0:632]) |
                            attestation_key[64] (x||y) |
                            cert_data_type u16 (6) | cert_data_size u32 | cert_data
         cert data type 6   qe_report[384] | qe_report_signature[64] |
                            qe_auth_data_len u16 | qe_auth_data | inner_type u16 (5) |
                            inner_size u32 | inner data (PEM chain: PCK leaf, CA, root)
         trailing           real quotes carry zero padding after the signature data; it is
                            kept in ``trailing`` so that ``encode(parse(q)) == q``.

A quote arrives whole (it is a field of a larger message), so :func:`parse_tdx_quote` has two
outcomes: a value or :class:`CodecError` naming the field and offset. Version 5 quotes (TD 1.5
body types) are recognised and refused with a clear message. Nothing here checks signatures:
``gateway.attest.quote`` does that through dcap-qvl.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from gateway.protocol.errors import CodecError

__all__ = [
    "ATT_KEY_TYPE_ECDSA_P256",
    "CERT_DATA_PCK_CHAIN",
    "CERT_DATA_QE_REPORT",
    "HEADER_SIZE",
    "INTEL_QE_VENDOR_ID",
    "QE_REPORT_SIZE",
    "QUOTE_OFFSETS",
    "SIGNED_REGION_SIZE",
    "TD_REPORT_SIZE",
    "TEE_TYPE_TDX",
    "QeCertificationData",
    "QuoteHeader",
    "QuoteSignatureData",
    "TdReport",
    "TdxQuote",
    "encode_header",
    "encode_qe_certification_data",
    "encode_signature_data",
    "encode_td_report",
    "encode_tdx_quote",
    "parse_tdx_quote",
]

QUOTE_VERSION_4 = 4
QUOTE_VERSION_5 = 5
TEE_TYPE_TDX = 0x81
TEE_TYPE_SGX = 0x00
ATT_KEY_TYPE_ECDSA_P256 = 2
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
CERT_DATA_PCK_CHAIN = 5
CERT_DATA_QE_REPORT = 6

HEADER_SIZE = 48
TD_REPORT_SIZE = 584
SIGNED_REGION_SIZE = HEADER_SIZE + TD_REPORT_SIZE  # 632: what the attestation key signs
QE_REPORT_SIZE = 384
ECDSA_SIG_SIZE = 64
ECDSA_KEY_SIZE = 64
MR_SIZE = 48
REPORT_DATA_SIZE = 64
# A quote is a few KiB; anything claiming more than this is refused before slicing.
MAX_CERT_DATA_SIZE = 64 * 1024

# (offset, length) of each TD report field, absolute from the start of a v4 quote.
_TD_REPORT_FIELDS: tuple[tuple[str, int], ...] = (
    ("tee_tcb_svn", 16),
    ("mr_seam", 48),
    ("mr_signer_seam", 48),
    ("seam_attributes", 8),
    ("td_attributes", 8),
    ("xfam", 8),
    ("mr_td", 48),
    ("mr_config_id", 48),
    ("mr_owner", 48),
    ("mr_owner_config", 48),
    ("rt_mr0", 48),
    ("rt_mr1", 48),
    ("rt_mr2", 48),
    ("rt_mr3", 48),
    ("report_data", 64),
)


def _offsets() -> dict[str, tuple[int, int]]:
    table: dict[str, tuple[int, int]] = {
        "version": (0, 2),
        "att_key_type": (2, 2),
        "tee_type": (4, 4),
        "qe_svn": (8, 2),
        "pce_svn": (10, 2),
        "qe_vendor_id": (12, 16),
        "user_data": (28, 20),
    }
    pos = HEADER_SIZE
    for name, size in _TD_REPORT_FIELDS:
        table[name] = (pos, size)
        pos += size
    assert pos == SIGNED_REGION_SIZE
    table["sig_data_len"] = (632, 4)
    table["quote_signature"] = (636, 64)
    table["attestation_key"] = (700, 64)
    table["cert_data_type"] = (764, 2)
    table["cert_data_size"] = (766, 4)
    table["qe_report"] = (770, QE_REPORT_SIZE)
    table["qe_report_signature"] = (1154, 64)
    table["qe_auth_data_len"] = (1218, 2)
    return table


QUOTE_OFFSETS: dict[str, tuple[int, int]] = _offsets()
"""``field -> (offset, length)`` in a v4 quote; fields past ``qe_auth_data_len`` move with it."""

# Offsets inside the 384-byte QE report (an SGX REPORT body).
QE_REPORT_OFFSETS: dict[str, tuple[int, int]] = {
    "cpu_svn": (0, 16),
    "misc_select": (16, 4),
    "attributes": (48, 16),
    "mr_enclave": (64, 32),
    "mr_signer": (128, 32),
    "isv_prod_id": (256, 2),
    "isv_svn": (258, 2),
    "report_data": (320, 64),
}

_HEADER = struct.Struct("<HHIHH16s20s")


@dataclass(frozen=True, slots=True)
class QuoteHeader:
    """The 48-byte quote header."""

    version: int = QUOTE_VERSION_4
    att_key_type: int = ATT_KEY_TYPE_ECDSA_P256
    tee_type: int = TEE_TYPE_TDX
    qe_svn: int = 0
    pce_svn: int = 0
    qe_vendor_id: bytes = INTEL_QE_VENDOR_ID
    user_data: bytes = bytes(20)

    def __post_init__(self) -> None:
        _check_len("qe_vendor_id", self.qe_vendor_id, 16)
        _check_len("user_data", self.user_data, 20)


@dataclass(frozen=True, slots=True)
class TdReport:
    """The TD report body (TDREPORT 1.0, 584 bytes): what the TD attests to."""

    tee_tcb_svn: bytes = bytes(16)
    mr_seam: bytes = bytes(48)
    mr_signer_seam: bytes = bytes(48)
    seam_attributes: bytes = bytes(8)
    td_attributes: bytes = bytes(8)
    xfam: bytes = bytes(8)
    mr_td: bytes = bytes(48)
    mr_config_id: bytes = bytes(48)
    mr_owner: bytes = bytes(48)
    mr_owner_config: bytes = bytes(48)
    rt_mr0: bytes = bytes(48)
    rt_mr1: bytes = bytes(48)
    rt_mr2: bytes = bytes(48)
    rt_mr3: bytes = bytes(48)
    report_data: bytes = bytes(64)

    def __post_init__(self) -> None:
        for name, size in _TD_REPORT_FIELDS:
            _check_len(name, getattr(self, name), size)

    @property
    def rtmrs(self) -> tuple[bytes, bytes, bytes, bytes]:
        """RTMR0..RTMR3."""
        return (self.rt_mr0, self.rt_mr1, self.rt_mr2, self.rt_mr3)

    @property
    def is_debug(self) -> bool:
        """TD_ATTRIBUTES.DEBUG (bit 0): the host can read the TD's memory."""
        return bool(self.td_attributes[0] & 1)


@dataclass(frozen=True, slots=True)
class QeCertificationData:
    """Certification data type 6: the QE report that vouches for the attestation key."""

    qe_report: bytes
    qe_report_signature: bytes
    qe_auth_data: bytes
    inner_type: int = CERT_DATA_PCK_CHAIN
    inner_data: bytes = b""

    def __post_init__(self) -> None:
        _check_len("qe_report", self.qe_report, QE_REPORT_SIZE)
        _check_len("qe_report_signature", self.qe_report_signature, ECDSA_SIG_SIZE)
        if len(self.qe_auth_data) > 0xFFFF:
            raise CodecError("qe_auth_data is longer than 65535 bytes")

    @property
    def pck_chain_pem(self) -> bytes | None:
        """The PEM chain (PCK leaf first) when the inner data is type 5, else ``None``."""
        if self.inner_type != CERT_DATA_PCK_CHAIN:
            return None
        return self.inner_data.rstrip(b"\x00")


@dataclass(frozen=True, slots=True)
class QuoteSignatureData:
    """ECDSA-P256 quote signature data (v4)."""

    signature: bytes
    attestation_key: bytes
    cert_data_type: int
    cert_data: bytes
    qe: QeCertificationData | None

    def __post_init__(self) -> None:
        _check_len("quote_signature", self.signature, ECDSA_SIG_SIZE)
        _check_len("attestation_key", self.attestation_key, ECDSA_KEY_SIZE)


@dataclass(frozen=True, slots=True)
class TdxQuote:
    """A parsed TDX v4 quote. ``signed_region`` is exactly what the attestation key signs."""

    header: QuoteHeader
    report: TdReport
    signed_region: bytes
    signature_data: QuoteSignatureData
    trailing: bytes = b""

    @property
    def version(self) -> int:
        return self.header.version


def _check_len(name: str, value: bytes, size: int) -> None:
    if not isinstance(value, bytes) or len(value) != size:
        raise CodecError(f"{name} must be {size} bytes")


# --- encoding ------------------------------------------------------------------------------


def encode_header(header: QuoteHeader) -> bytes:
    """The 48-byte header."""
    try:
        return _HEADER.pack(
            header.version,
            header.att_key_type,
            header.tee_type,
            header.qe_svn,
            header.pce_svn,
            header.qe_vendor_id,
            header.user_data,
        )
    except struct.error as exc:
        raise CodecError(f"header field out of range: {exc}") from None


def encode_td_report(report: TdReport) -> bytes:
    """The 584-byte TD report body."""
    return b"".join(getattr(report, name) for name, _ in _TD_REPORT_FIELDS)


def encode_qe_certification_data(qe: QeCertificationData) -> bytes:
    """Certification data type 6 (without its own type/size prefix)."""
    return b"".join(
        (
            qe.qe_report,
            qe.qe_report_signature,
            struct.pack("<H", len(qe.qe_auth_data)),
            qe.qe_auth_data,
            struct.pack("<HI", qe.inner_type, len(qe.inner_data)),
            qe.inner_data,
        )
    )


def encode_signature_data(sig: QuoteSignatureData) -> bytes:
    """The signature data that follows ``sig_data_len``."""
    return b"".join(
        (
            sig.signature,
            sig.attestation_key,
            struct.pack("<HI", sig.cert_data_type, len(sig.cert_data)),
            sig.cert_data,
        )
    )


def encode_tdx_quote(signed_region: bytes, sig: QuoteSignatureData, trailing: bytes = b"") -> bytes:
    """A whole quote from the signed 632 bytes and the signature data."""
    if len(signed_region) != SIGNED_REGION_SIZE:
        raise CodecError(f"signed region must be {SIGNED_REGION_SIZE} bytes")
    body = encode_signature_data(sig)
    return b"".join((signed_region, struct.pack("<I", len(body)), body, trailing))


# --- parsing -------------------------------------------------------------------------------


class _Reader:
    """Bounds-checked cursor: every short read is a :class:`CodecError` naming the field."""

    __slots__ = ("data", "pos", "end")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def take(self, n: int, field: str) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise CodecError(
                f"quote truncated in {field} at offset {self.pos}: need {n} bytes, "
                f"have {max(self.end - self.pos, 0)}"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u16(self, field: str) -> int:
        value: int = struct.unpack("<H", self.take(2, field))[0]
        return value

    def u32(self, field: str) -> int:
        value: int = struct.unpack("<I", self.take(4, field))[0]
        return value


def _parse_header(data: bytes) -> QuoteHeader:
    if len(data) < HEADER_SIZE:
        raise CodecError(f"quote truncated in header: {len(data)} of {HEADER_SIZE} bytes")
    version, akt, tee, qe_svn, pce_svn, vendor, user = _HEADER.unpack_from(data, 0)
    if version == QUOTE_VERSION_5:
        raise CodecError("TDX quote version 5 (TD 1.5 body) is not supported; expected version 4")
    if version != QUOTE_VERSION_4:
        raise CodecError(f"unsupported quote version {version} at offset 0; expected 4")
    if tee != TEE_TYPE_TDX:
        kind = "an SGX quote" if tee == TEE_TYPE_SGX else f"tee_type {tee:#x}"
        raise CodecError(f"not a TDX quote: {kind} at offset 4 (expected {TEE_TYPE_TDX:#x})")
    if akt != ATT_KEY_TYPE_ECDSA_P256:
        raise CodecError(f"attestation key type {akt} at offset 2 is not ECDSA-P256 (2)")
    return QuoteHeader(version, akt, tee, qe_svn, pce_svn, vendor, user)


def _parse_td_report(body: bytes) -> TdReport:
    values: dict[str, bytes] = {}
    pos = 0
    for name, size in _TD_REPORT_FIELDS:
        values[name] = body[pos : pos + size]
        pos += size
    return TdReport(**values)


def _parse_qe_cert_data(data: bytes, base: int) -> QeCertificationData:
    r = _Reader(data)
    qe_report = r.take(QE_REPORT_SIZE, "qe_report")
    qe_sig = r.take(ECDSA_SIG_SIZE, "qe_report_signature")
    auth_len = r.u16("qe_auth_data_len")
    auth = r.take(auth_len, "qe_auth_data")
    inner_type = r.u16("inner cert_data_type")
    inner_size = r.u32("inner cert_data_size")
    inner = r.take(inner_size, "inner cert_data")
    if r.pos != len(data):
        raise CodecError(
            f"{len(data) - r.pos} unexpected bytes after the PCK chain at offset {base + r.pos}"
        )
    return QeCertificationData(qe_report, qe_sig, auth, inner_type, inner)


def parse_tdx_quote(data: bytes) -> TdxQuote:
    """Parse a whole TDX v4 quote.

    Returns a :class:`TdxQuote`; raises :class:`CodecError` (naming the field and offset) for
    a truncated or malformed quote, a version-5 quote, or a non-TDX quote. Signatures are not
    checked here.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CodecError(f"a quote is bytes, not {type(data).__name__}")
    data = bytes(data)
    header = _parse_header(data)
    r = _Reader(data, HEADER_SIZE)
    report = _parse_td_report(r.take(TD_REPORT_SIZE, "td_report"))
    sig_len = r.u32("sig_data_len")
    if sig_len > len(data) - r.pos:
        raise CodecError(
            f"sig_data_len {sig_len} at offset 632 exceeds the {len(data) - r.pos} bytes left"
        )
    sig_end = r.pos + sig_len
    s = _Reader(data, r.pos, sig_end)
    signature = s.take(ECDSA_SIG_SIZE, "quote_signature")
    att_key = s.take(ECDSA_KEY_SIZE, "attestation_key")
    cd_type = s.u16("cert_data_type")
    cd_size = s.u32("cert_data_size")
    if cd_size > MAX_CERT_DATA_SIZE:
        raise CodecError(f"cert_data_size {cd_size} at offset 766 is implausibly large")
    cd_start = s.pos
    cert_data = s.take(cd_size, "cert_data")
    if s.pos != sig_end:
        raise CodecError(
            f"sig_data_len {sig_len} disagrees with the signature data ({s.pos - 636} bytes)"
        )
    qe = _parse_qe_cert_data(cert_data, cd_start) if cd_type == CERT_DATA_QE_REPORT else None
    if qe is None:
        raise CodecError(
            f"cert_data_type {cd_type} at offset 764 is not {CERT_DATA_QE_REPORT} (QE report)"
        )
    return TdxQuote(
        header=header,
        report=report,
        signed_region=data[:SIGNED_REGION_SIZE],
        signature_data=QuoteSignatureData(signature, att_key, cd_type, cert_data, qe),
        trailing=data[sig_end:],
    )
