"""TDX quotes that bind certificate keys and the ACME account, and the ``/acme-info`` document.

Bindings (the same as dstack's, so its ``ct_monitor`` can check ours):

* certificate key: ``report_data = SHA512(b"zt-cert:" || SubjectPublicKeyInfo DER)``
* ACME account:    ``report_data = SHA512(b"acme-account:" || account URI as UTF-8)``

SHA-512 gives exactly the 64 bytes of TDX report_data. A verifier recomputes the hash from
the certificate it sees in CT logs (or the account URI pinned in CAA) and compares it with
the report_data of a quote it has verified, which proves the key was created inside this TD.

The ``/acme-info`` document follows dstack's ``AcmeInfoResponse`` JSON (bytes as hex):
``{"account_uri", "quoted_hist_keys": [{"public_key", "quote", "attestation"}],
"account_quote", "account_attestation"}``; ``quote`` fields hold our quote document as a JSON
string, ``{"quote": hex, "report_data": hex, "binding": ..., "tee": ..., "generated_at": ...}``
("" when no quote was taken), and ``attestation`` is "" (we have no separate attestation).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.certs import disk
from gateway.tee.base import TeeBackend

__all__ = [
    "ACCOUNT_QUOTE_FILE",
    "QUOTE_FILE",
    "account_report_data",
    "acme_info",
    "cert_report_data",
    "make_quote_document",
]

QUOTE_FILE = "quote.json"
ACCOUNT_QUOTE_FILE = ".acme-account-quote.json"
CERT_TAG = b"zt-cert:"
ACCOUNT_TAG = b"acme-account:"


def cert_report_data(spki_der: bytes) -> bytes:
    """The 64-byte report_data binding a certificate public key."""
    return hashlib.sha512(CERT_TAG + spki_der).digest()


def account_report_data(account_uri: str) -> bytes:
    """The 64-byte report_data binding the ACME account URI."""
    return hashlib.sha512(ACCOUNT_TAG + account_uri.encode("utf-8")).digest()


async def make_quote_document(
    tee: TeeBackend, report_data: bytes, binding: str, subject: dict[str, str]
) -> bytes:
    """Ask the TEE (in a thread: quote generation blocks) and return the JSON document."""
    quote = await asyncio.to_thread(tee.get_quote, report_data)
    doc = {
        "binding": binding,
        "tee": tee.name,
        "report_data": report_data.hex(),
        "quote": quote.hex(),
        "generated_at": int(time.time()),
        **subject,
    }
    return json.dumps(doc, sort_keys=True).encode()


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def acme_info(certs_dir: Path, names: list[str], account_uri: str | None) -> dict[str, Any]:
    """The ``/acme-info`` JSON document: account and every historical certificate key."""
    hist_keys: list[dict[str, str]] = []
    for name in names:
        for entry in disk.history(certs_dir, name):
            chain = (entry.path / disk.CHAIN_FILE).read_bytes()
            spki = (
                x509.load_pem_x509_certificate(chain)
                .public_key()
                .public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            )
            quote = read_json(entry.path / QUOTE_FILE)
            hist_keys.append(
                {
                    "public_key": spki.hex(),
                    "quote": json.dumps(quote, sort_keys=True) if quote else "",
                    "attestation": "",
                }
            )
    account = read_json(certs_dir / ACCOUNT_QUOTE_FILE)
    account_quote = ""
    if account and account_uri and account.get("account_uri") == account_uri:
        account_quote = json.dumps(account, sort_keys=True)
    return {
        "account_uri": account_uri or "",
        "quoted_hist_keys": hist_keys,
        "account_quote": account_quote,
        "account_attestation": "",
    }
