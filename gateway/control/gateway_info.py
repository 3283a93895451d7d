"""What the control plane publishes for ``gateway.<base>/app-info`` and ``/acme-info``.

Upstream's gateway answers these on its proxy port: ``/app-info`` is the gateway CVM's own
guest-agent ``Info()`` and ``/acme-info`` is ``AcmeInfoResponse`` (the ACME account URI and
every historical certificate key with its quote; dstack's ``ct_monitor`` reads it). Our
workers cannot ask the control plane per request, so :class:`InfoPublisher` renders both
documents and writes them to the file of :mod:`gateway.proxy.info_file`; the caller then
signals the workers (they re-read it on ``SIGHUP``, which a certificate change sends anyway).

``app-info`` is built from the gateway's own TEE backend (``[rpc_identity] tee``) exactly as
our guest agent's ``Info`` builds it, reading the identity back from the runtime events in
RTMR3, so it never claims what the quote does not back. Without a TEE there is no app info:
the file says why, and the workers answer 503 with that reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.attest import eventlog
from gateway.guest import evidence
from gateway.proxy.info_file import write_info
from gateway.tee.base import TeeBackend, TeeError

__all__ = ["ACME_INFO_FIELDS", "InfoPublisher", "app_info_document", "upstream_acme_info"]

logger = logging.getLogger(__name__)

#: ``AcmeInfoResponse``'s fields, in upstream's order (``gateway_rpc.proto``)
ACME_INFO_FIELDS = ("account_uri", "quoted_hist_keys", "account_quote", "account_attestation")
NO_TEE = (
    "no TEE backend is configured for this gateway (set [rpc_identity] tee = 'tdx' in a CVM, "
    "or 'sim' in the lab)"
)
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def upstream_acme_info(info: dict[str, Any]) -> dict[str, Any]:
    """Exactly upstream's ``AcmeInfoResponse`` JSON (our admin view adds more keys)."""
    return {name: info[name] for name in ACME_INFO_FIELDS}


def app_info_document(tee: TeeBackend) -> dict[str, Any]:
    """The gateway's own ``Info()`` (the guest agent's shape; no app compose or certificate:
    the gateway is not a dstack app with a compose file of its own here)."""
    ident = eventlog.decode_app_identity(evidence.runtime_events(tee))
    rtmrs = tee.rtmrs()
    mrtd = tee.mrtd()
    aggregated = eventlog.mr_aggregated(mrtd, rtmrs, bytes(48), bytes(48), bytes(48)).hex()
    tcb_info = {
        "app_compose": "",
        "compose_hash": ident.compose_hash.hex(),
        "device_id": _EMPTY_SHA256,
        "event_log": [e.to_json() for e in evidence.event_log(tee)],
        "mr_aggregated": aggregated,
        "mrtd": mrtd.hex(),
        "os_image_hash": ident.os_image_hash.hex(),
        "rtmr0": rtmrs[0].hex(),
        "rtmr1": rtmrs[1].hex(),
        "rtmr2": rtmrs[2].hex(),
        "rtmr3": rtmrs[3].hex(),
    }
    return {
        "app_id": ident.app_id.hex(),
        "instance_id": ident.instance_id.hex(),
        "app_cert": "",
        "tcb_info": json.dumps(tcb_info, indent=2, sort_keys=True),
        "app_name": "dstack-gateway",
        "device_id": _EMPTY_SHA256,
        "mr_aggregated": aggregated,
        "os_image_hash": ident.os_image_hash.hex(),
        "key_provider_info": ident.key_provider_payload.decode("utf-8", "replace"),
        "compose_hash": ident.compose_hash.hex(),
        "vm_config": "",
        "cloud_vendor": "",
        "cloud_product": "",
    }


class InfoPublisher:
    """Renders both documents and rewrites the file when they changed."""

    def __init__(
        self, path: Path, acme_info: Callable[[], dict[str, Any]], tee: TeeBackend | None
    ) -> None:
        self.path = path
        self._acme_info = acme_info
        self._tee = tee

    def documents(self) -> tuple[dict[str, Any], dict[str, str]]:
        """(documents, reasons for the missing ones)."""
        docs: dict[str, Any] = {"acme-info": upstream_acme_info(self._acme_info())}
        missing: dict[str, str] = {}
        if self._tee is None:
            missing["app-info"] = NO_TEE
        else:
            try:
                docs["app-info"] = app_info_document(self._tee)
            except (TeeError, OSError) as exc:
                missing["app-info"] = f"the {self._tee.name} TEE backend failed: {exc}"
        return docs, missing

    def publish(self) -> bool:
        """Write the file if a document changed; True if written. Never raises for I/O: the
        gateway keeps serving (with the previous documents) and the error is logged."""
        try:
            docs, missing = self.documents()
            return write_info(self.path, docs, missing)
        except OSError as exc:
            logger.error("cannot publish /acme-info and /app-info to %s: %s", self.path, exc)
            return False
