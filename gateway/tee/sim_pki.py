"""A test PKI that issues TDX quotes and collateral dcap-qvl verifies under its own root.

This is the trust anchor of the simulated TDX (``gateway.tee.sim``). It mirrors Intel's
DCAP hierarchy one-to-one, with our own keys::

    Test SGX Root CA ──┬── Test SGX PCK Platform CA ── Test SGX PCK Certificate (SGX ext.)
                       └── Test SGX TCB Signing (signs the TCB info and QE identity JSON)
    root_ca_crl (by root: covers root, platform CA, TCB signer); pck_crl (by platform CA)

The PCK key signs a QE report whose REPORTDATA commits to an attestation key, and that key
signs header ‖ TD report: the same chain a real Intel QE produces. dcap-qvl is never patched
or bypassed; only the root certificate handed to ``verify_with_root_ca`` differs. A gateway
accepts these quotes only when its configuration names this root explicitly.

The PKI is persisted to a directory (``SimPki.load_or_create``) so that a gateway and
several simulated CVMs in separate processes share one root. Keys there are test keys: the
directory must never be mistaken for production material (every subject says "Test").
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import os
import secrets
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import dcap_qvl
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from gateway.protocol.errors import CodecError
from gateway.protocol.tdx_quote import (
    CERT_DATA_PCK_CHAIN,
    CERT_DATA_QE_REPORT,
    QE_REPORT_SIZE,
    QeCertificationData,
    QuoteHeader,
    QuoteSignatureData,
    TdReport,
    encode_header,
    encode_qe_certification_data,
    encode_td_report,
    encode_tdx_quote,
)

__all__ = [
    "DEFAULT_TD_ATTRIBUTES",
    "DEFAULT_XFAM",
    "SimPki",
    "SimPlatform",
    "TD_ATTRIBUTES_DEBUG",
    "Window",
]

SGX_EXTENSION_OID = "1.2.840.113741.1.13.1"
# SEPT_VE_DISABLE (byte 3, bit 4) is required by dcap-qvl; DEBUG is byte 0, bit 0.
DEFAULT_TD_ATTRIBUTES = bytes.fromhex("0000001000000000")
TD_ATTRIBUTES_DEBUG = bytes.fromhex("0100001000000000")
DEFAULT_XFAM = bytes.fromhex("e702060000000000")
# Intel's QE: the hash of its attestation key and this auth data fills REPORTDATA[0:32].
QE_AUTH_DATA = bytes(range(32))
# Intel's TD_QE identity values (attributes 0x11 under mask; ISVPRODID 2).
_QE_ATTRIBUTES = bytes.fromhex("15000000000000000700000000000000")
_QE_ISV_PROD_ID = 2
_TCB_DATE = "2024-03-13T00:00:00Z"

Window = tuple[int, int]
"""(not_before, not_after) as unix seconds: a CRL's thisUpdate/nextUpdate, a JSON's dates."""

_FILES = ("root", "pca", "pck", "tcb")
_DAY = 86400


@dataclass(frozen=True, slots=True)
class SimPlatform:
    """The simulated platform's identity as its PCK certificate and TCB info describe it."""

    fmspc: bytes = bytes.fromhex("00906ED50000")
    cpusvn: bytes = bytes.fromhex("0b0b0202ff0100000000000000000000")
    pcesvn: int = 13
    pceid: bytes = bytes(2)
    ppid: bytes = bytes(16)
    tee_tcb_svn: bytes = bytes.fromhex("07010300000000000000000000000000")
    qe_mrsigner: bytes = bytes(32)
    qe_isvsvn: int = 8

    def to_json(self) -> dict[str, Any]:
        return {
            "fmspc": self.fmspc.hex(),
            "cpusvn": self.cpusvn.hex(),
            "pcesvn": self.pcesvn,
            "pceid": self.pceid.hex(),
            "ppid": self.ppid.hex(),
            "tee_tcb_svn": self.tee_tcb_svn.hex(),
            "qe_mrsigner": self.qe_mrsigner.hex(),
            "qe_isvsvn": self.qe_isvsvn,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SimPlatform:
        return cls(
            fmspc=bytes.fromhex(data["fmspc"]),
            cpusvn=bytes.fromhex(data["cpusvn"]),
            pcesvn=int(data["pcesvn"]),
            pceid=bytes.fromhex(data["pceid"]),
            ppid=bytes.fromhex(data["ppid"]),
            tee_tcb_svn=bytes.fromhex(data["tee_tcb_svn"]),
            qe_mrsigner=bytes.fromhex(data["qe_mrsigner"]),
            qe_isvsvn=int(data["qe_isvsvn"]),
        )

    @classmethod
    def random(cls) -> SimPlatform:
        """A platform with a random PPID and QE signer (FMSPC and SVNs fixed)."""
        return cls(ppid=secrets.token_bytes(16), qe_mrsigner=secrets.token_bytes(32))


# --- DER for the SGX extension (cryptography has no encoder for it) ----------------------


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + content


def _oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    body = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body.extend(reversed(chunk))
    return _der(0x06, bytes(body))


def _int(n: int) -> bytes:
    return _der(0x02, n.to_bytes((n.bit_length() + 8) // 8, "big"))


def _seq(*items: bytes) -> bytes:
    return _der(0x30, b"".join(items))


def _entry(sub: str, value: bytes) -> bytes:
    return _seq(_oid(f"{SGX_EXTENSION_OID}.{sub}"), value)


def sgx_extension_der(platform: SimPlatform) -> bytes:
    """The PCK certificate's SGX extension (standard SGX type, no platform flags)."""
    tcb = [_entry(f"2.{i + 1}", _int(platform.cpusvn[i])) for i in range(16)]
    tcb.append(_entry("2.17", _int(platform.pcesvn)))
    tcb.append(_entry("2.18", _der(0x04, platform.cpusvn)))
    return _seq(
        _entry("1", _der(0x04, platform.ppid)),
        _entry("2", _seq(*tcb)),
        _entry("3", _der(0x04, platform.pceid)),
        _entry("4", _der(0x04, platform.fmspc)),
        _entry("5", _der(0x0A, b"\x00")),
    )


# --- small helpers -------------------------------------------------------------------------


def _utc(ts: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.UTC)


def _rfc3339(ts: int) -> str:
    return _utc(ts).strftime("%Y-%m-%dT%H:%M:%SZ")


def _raw_sig(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA-P256-SHA256 as the 64-byte r‖s DCAP uses everywhere."""
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _raw_pub(key: ec.EllipticCurvePrivateKey) -> bytes:
    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return point[1:]  # drop the 0x04 prefix: DCAP stores x‖y


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "XX"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Gateway Test PKI (not Intel)"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    path_length: int | None,
    not_before: int,
    extra: Sequence[x509.ExtensionType] = (),
) -> x509.Certificate:
    pub = key.public_key()
    issuer_name = issuer.subject if issuer is not None else _name(subject)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_utc(not_before))
        .not_valid_after(_utc(not_before + 3650 * _DAY))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=not ca,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    for ext in extra:
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclass(slots=True)
class _QeCache:
    """The simulated QE's long-lived attestation key and the certification data for it."""

    key: ec.EllipticCurvePrivateKey
    pub: bytes
    cert_data: bytes


@dataclass(eq=False)
class SimPki:
    """The test DCAP hierarchy plus the simulated platform it certifies.

    Build with :meth:`create` (in memory) or :meth:`load_or_create` (shared directory).
    Thread-safe: forging only reads the keys; the QE cache is set once under a lock.
    """

    root_key: ec.EllipticCurvePrivateKey
    root_cert: x509.Certificate
    pca_key: ec.EllipticCurvePrivateKey
    pca_cert: x509.Certificate
    pck_key: ec.EllipticCurvePrivateKey
    pck_cert: x509.Certificate
    tcb_key: ec.EllipticCurvePrivateKey
    tcb_cert: x509.Certificate
    platform: SimPlatform
    _qe: _QeCache | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # --- construction ----------------------------------------------------------------------

    @classmethod
    def create(
        cls, *, not_before: int | None = None, platform: SimPlatform | None = None
    ) -> SimPki:
        """A fresh PKI whose certificates are valid from ``not_before`` (default: a day ago)
        for ten years. Verification times before ``not_before`` fail with CertNotValidYet."""
        start = int(time.time()) - _DAY if not_before is None else not_before
        plat = platform if platform is not None else SimPlatform.random()
        keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(4)]
        root_key, pca_key, pck_key, tcb_key = keys
        root = _issue(
            "Test SGX Root CA", root_key, None, root_key, ca=True, path_length=1, not_before=start
        )
        pca = _issue(
            "Test SGX PCK Platform CA", pca_key, root, root_key, ca=True, path_length=0,
            not_before=start,
        )  # fmt: skip
        sgx_ext = x509.UnrecognizedExtension(
            x509.ObjectIdentifier(SGX_EXTENSION_OID), sgx_extension_der(plat)
        )
        pck = _issue(
            "Test SGX PCK Certificate", pck_key, pca, pca_key, ca=False, path_length=None,
            not_before=start, extra=[sgx_ext],
        )  # fmt: skip
        tcb = _issue(
            "Test SGX TCB Signing", tcb_key, root, root_key, ca=False, path_length=None,
            not_before=start,
        )  # fmt: skip
        return cls(root_key, root, pca_key, pca, pck_key, pck, tcb_key, tcb, plat)

    def save(self, directory: Path) -> None:
        """Write keys (mode 0600), certificates and ``platform.json`` (written last)."""
        directory.mkdir(parents=True, exist_ok=True)
        pairs = (
            ("root", self.root_key, self.root_cert),
            ("pca", self.pca_key, self.pca_cert),
            ("pck", self.pck_key, self.pck_cert),
            ("tcb", self.tcb_key, self.tcb_cert),
        )
        for stem, key, cert in pairs:
            _write_private(
                directory / f"{stem}.key",
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ),
            )
            _write_public(directory / f"{stem}.pem", _pem(cert).encode())
        _write_public(directory / "root.der", self.root_ca_der)
        _write_public(
            directory / "platform.json",
            json.dumps(self.platform.to_json(), indent=2).encode() + b"\n",
        )

    @classmethod
    def load(cls, directory: Path) -> SimPki:
        """Load a PKI saved by :meth:`save`; raises ``FileNotFoundError`` / ``ValueError``."""
        platform = SimPlatform.from_json(json.loads((directory / "platform.json").read_text()))
        keys: dict[str, ec.EllipticCurvePrivateKey] = {}
        certs: dict[str, x509.Certificate] = {}
        for stem in _FILES:
            key = serialization.load_pem_private_key((directory / f"{stem}.key").read_bytes(), None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{directory / (stem + '.key')} is not an EC key")
            keys[stem] = key
            certs[stem] = x509.load_pem_x509_certificate((directory / f"{stem}.pem").read_bytes())
        return cls(
            root_key=keys["root"],
            root_cert=certs["root"],
            pca_key=keys["pca"],
            pca_cert=certs["pca"],
            pck_key=keys["pck"],
            pck_cert=certs["pck"],
            tcb_key=keys["tcb"],
            tcb_cert=certs["tcb"],
            platform=platform,
        )

    @classmethod
    def load_or_create(
        cls, directory: Path, *, not_before: int | None = None, platform: SimPlatform | None = None
    ) -> SimPki:
        """Load the PKI in ``directory``, creating it first if absent.

        An exclusive ``flock`` on ``directory/.lock`` makes concurrent first starts (a
        gateway and CVMs booting together) agree on one root.
        """
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / ".lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if (directory / "platform.json").exists():
                    return cls.load(directory)
                pki = cls.create(not_before=not_before, platform=platform)
                pki.save(directory)
                return pki
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # --- public material -------------------------------------------------------------------

    @property
    def root_ca_der(self) -> bytes:
        """The trust anchor to hand to the verifier (``attest.root_ca`` in the config)."""
        return self.root_cert.public_bytes(serialization.Encoding.DER)

    @property
    def root_ca_pem(self) -> str:
        return _pem(self.root_cert)

    @property
    def not_before(self) -> int:
        """Earliest verification time: the certificates' notBefore."""
        return int(self.root_cert.not_valid_before_utc.timestamp())

    @property
    def pck_chain_pem(self) -> bytes:
        """PCK leaf, platform CA, root: embedded in every quote (cert data type 5)."""
        return (_pem(self.pck_cert) + _pem(self.pca_cert) + _pem(self.root_cert)).encode()

    # --- collateral ------------------------------------------------------------------------

    def collateral(
        self,
        now: int | None = None,
        *,
        crl_window: Window | None = None,
        tcb_info_window: Window | None = None,
        qe_identity_window: Window | None = None,
        revoke_pck: bool = False,
        tcb_status: str = "UpToDate",
        advisory_ids: Iterable[str] = (),
        qe_tcb_status: str = "UpToDate",
    ) -> dcap_qvl.QuoteCollateralV3:
        """Signed collateral for this platform, valid from ``now - 1h`` to ``now + 30d``.

        The keyword overrides exist for negative tests: a CRL or JSON validity window, the
        PCK serial on the PCK CRL, the TCB level's status (``OutOfDate``, ``Revoked`` ...)
        with advisories, and the QE's TCB status.
        """
        t = int(time.time()) if now is None else now
        default: Window = (t - 3600, t + 30 * _DAY)
        crl_w = crl_window or default
        root_crl = self._crl(self.root_key, self.root_cert, crl_w, revoked=())
        pck_crl = self._crl(
            self.pca_key, self.pca_cert, crl_w, revoked=(self.pck_cert,) if revoke_pck else ()
        )
        tcb_info = self._tcb_info(tcb_info_window or default, tcb_status, tuple(advisory_ids))
        qe_identity = self._qe_identity(qe_identity_window or default, qe_tcb_status)
        signer_chain = _pem(self.tcb_cert) + _pem(self.root_cert)
        return dcap_qvl.QuoteCollateralV3(
            pck_crl_issuer_chain=_pem(self.pca_cert) + _pem(self.root_cert),
            root_ca_crl=root_crl,
            pck_crl=pck_crl,
            tcb_info_issuer_chain=signer_chain,
            tcb_info=tcb_info,
            tcb_info_signature=_raw_sig(self.tcb_key, tcb_info.encode()),
            qe_identity_issuer_chain=signer_chain,
            qe_identity=qe_identity,
            qe_identity_signature=_raw_sig(self.tcb_key, qe_identity.encode()),
        )

    def _crl(
        self,
        key: ec.EllipticCurvePrivateKey,
        issuer: x509.Certificate,
        window: Window,
        revoked: Sequence[x509.Certificate],
    ) -> bytes:
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(issuer.subject)
            .last_update(_utc(window[0]))
            .next_update(_utc(window[1]))
            .add_extension(x509.CRLNumber(1), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()),
                critical=False,
            )
        )
        for cert in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(cert.serial_number)
                .revocation_date(_utc(window[0]))
                .build()
            )
        return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)

    def _tcb_info(self, window: Window, status: str, advisories: tuple[str, ...]) -> str:
        p = self.platform
        level: dict[str, Any] = {
            "tcb": {
                "sgxtcbcomponents": [{"svn": b} for b in p.cpusvn],
                "pcesvn": p.pcesvn,
                "tdxtcbcomponents": [{"svn": b} for b in p.tee_tcb_svn],
            },
            "tcbDate": _TCB_DATE,
            "tcbStatus": status,
        }
        if advisories:
            level["advisoryIDs"] = list(advisories)
        module = {
            "mrsigner": "00" * 48,
            "attributes": "0000000000000000",
            "attributesMask": "FFFFFFFFFFFFFFFF",
        }
        module_id = {
            "id": f"TDX_{p.tee_tcb_svn[1]:02X}",
            **module,
            "tcbLevels": [
                {"tcb": {"isvsvn": p.tee_tcb_svn[0]}, "tcbDate": _TCB_DATE, "tcbStatus": "UpToDate"}
            ],
        }
        info = {
            "id": "TDX",
            "version": 3,
            "issueDate": _rfc3339(window[0]),
            "nextUpdate": _rfc3339(window[1]),
            "fmspc": p.fmspc.hex().upper(),
            "pceId": p.pceid.hex().upper(),
            "tcbType": 0,
            "tcbEvaluationDataNumber": 17,
            "tdxModule": module,
            "tdxModuleIdentities": [module_id],
            "tcbLevels": [level],
        }
        return json.dumps(info, separators=(",", ":"))

    def _qe_identity(self, window: Window, status: str) -> str:
        info = {
            "id": "TD_QE",
            "version": 2,
            "issueDate": _rfc3339(window[0]),
            "nextUpdate": _rfc3339(window[1]),
            "tcbEvaluationDataNumber": 17,
            "miscselect": "00000000",
            "miscselectMask": "FFFFFFFF",
            "attributes": "11000000000000000000000000000000",
            "attributesMask": "FBFFFFFFFFFFFFFF0000000000000000",
            "mrsigner": self.platform.qe_mrsigner.hex().upper(),
            "isvprodid": _QE_ISV_PROD_ID,
            "tcbLevels": [
                {
                    "tcb": {"isvsvn": self.platform.qe_isvsvn},
                    "tcbDate": _TCB_DATE,
                    "tcbStatus": status,
                }
            ],
        }
        return json.dumps(info, separators=(",", ":"))

    # --- quotes ----------------------------------------------------------------------------

    def qe_report(self, attestation_pub: bytes) -> bytes:
        """The 384-byte QE report binding ``attestation_pub`` (x‖y) to this platform's QE."""
        report = bytearray(QE_REPORT_SIZE)
        p = self.platform
        report[0:16] = p.cpusvn
        report[48:64] = _QE_ATTRIBUTES
        report[64:96] = hashlib.sha256(b"gateway-sim-qe-mrenclave").digest()
        report[128:160] = p.qe_mrsigner
        report[256:258] = _QE_ISV_PROD_ID.to_bytes(2, "little")
        report[258:260] = p.qe_isvsvn.to_bytes(2, "little")
        report[320:352] = hashlib.sha256(attestation_pub + QE_AUTH_DATA).digest()
        return bytes(report)

    def qe_certification_data(self, attestation_pub: bytes) -> bytes:
        """Cert data type 6 for ``attestation_pub``: QE report, its PCK signature, the chain."""
        qe_report = self.qe_report(attestation_pub)
        return encode_qe_certification_data(
            QeCertificationData(
                qe_report=qe_report,
                qe_report_signature=_raw_sig(self.pck_key, qe_report),
                qe_auth_data=QE_AUTH_DATA,
                inner_type=CERT_DATA_PCK_CHAIN,
                inner_data=self.pck_chain_pem,
            )
        )

    def _attestation(self) -> _QeCache:
        qe = self._qe
        if qe is None:
            with self._lock:
                if self._qe is None:
                    key = ec.generate_private_key(ec.SECP256R1())
                    pub = _raw_pub(key)
                    self._qe = _QeCache(key, pub, self.qe_certification_data(pub))
                qe = self._qe
        return qe

    def header(self) -> QuoteHeader:
        return QuoteHeader(
            qe_svn=self.platform.qe_isvsvn,
            pce_svn=self.platform.pcesvn,
            user_data=self.platform.ppid + bytes(4),
        )

    def forge_quote(
        self,
        report_data: bytes,
        *,
        mr_td: bytes = bytes(48),
        rtmrs: Sequence[bytes] = (bytes(48),) * 4,
        td_attributes: bytes = DEFAULT_TD_ATTRIBUTES,
        xfam: bytes = DEFAULT_XFAM,
        mr_config_id: bytes = bytes(48),
        mr_owner: bytes = bytes(48),
        mr_owner_config: bytes = bytes(48),
        mr_seam: bytes = bytes(48),
        fresh_attestation_key: bool = False,
    ) -> bytes:
        """A TDX v4 quote for a TD with these measurements, signed through the test chain.

        The simulated QE keeps one attestation key per :class:`SimPki` (as a real QE does
        between restarts), so a quote costs one ECDSA signature; ``fresh_attestation_key``
        makes a new key and QE report for this quote alone.
        """
        if len(report_data) != 64:
            raise ValueError("report_data must be 64 bytes")
        if len(rtmrs) != 4:
            raise ValueError("rtmrs must be RTMR0..RTMR3")
        try:
            report = self._td_report(
                report_data, mr_td, rtmrs, td_attributes, xfam, mr_config_id, mr_owner,
                mr_owner_config, mr_seam,
            )  # fmt: skip
        except CodecError as exc:
            raise ValueError(str(exc)) from None
        return self.sign_report(report, fresh_attestation_key=fresh_attestation_key)

    def _td_report(
        self,
        report_data: bytes,
        mr_td: bytes,
        rtmrs: Sequence[bytes],
        td_attributes: bytes,
        xfam: bytes,
        mr_config_id: bytes,
        mr_owner: bytes,
        mr_owner_config: bytes,
        mr_seam: bytes,
    ) -> TdReport:
        return TdReport(
            tee_tcb_svn=self.platform.tee_tcb_svn,
            mr_seam=bytes(mr_seam),
            td_attributes=bytes(td_attributes),
            xfam=bytes(xfam),
            mr_td=bytes(mr_td),
            mr_config_id=bytes(mr_config_id),
            mr_owner=bytes(mr_owner),
            mr_owner_config=bytes(mr_owner_config),
            rt_mr0=bytes(rtmrs[0]),
            rt_mr1=bytes(rtmrs[1]),
            rt_mr2=bytes(rtmrs[2]),
            rt_mr3=bytes(rtmrs[3]),
            report_data=bytes(report_data),
        )

    def sign_report(self, report: TdReport, *, fresh_attestation_key: bool = False) -> bytes:
        """Wrap ``report`` in a header and sign it as the simulated QE would."""
        if fresh_attestation_key:
            key = ec.generate_private_key(ec.SECP256R1())
            qe = _QeCache(key, _raw_pub(key), self.qe_certification_data(_raw_pub(key)))
        else:
            qe = self._attestation()
        signed = encode_header(self.header()) + encode_td_report(report)
        sig = QuoteSignatureData(
            signature=_raw_sig(qe.key, signed),
            attestation_key=qe.pub,
            cert_data_type=CERT_DATA_QE_REPORT,
            cert_data=qe.cert_data,
            qe=None,
        )
        return encode_tdx_quote(signed, sig)

    def with_platform(self, **changes: Any) -> SimPki:
        """A copy whose *claimed* platform differs (the PCK certificate is unchanged).

        Used by negative tests: e.g. a QE signer the QE identity does not list.
        """
        return replace(self, platform=replace(self.platform, **changes), _qe=None)
