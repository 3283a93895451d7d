"""The file that carries ``/app-info`` and ``/acme-info`` from the control plane to the workers.

The proxy workers are separate processes that never talk to the control plane; they serve
``gateway.<base>/app-info`` and ``/acme-info`` (:mod:`gateway.proxy.endpoints`) from one
JSON file the control plane rewrites whenever either document changes (at start, after a
certificate install or renewal, after an ACME account change)::

    {"version": 1,
     "documents":   {"acme-info": {...}, "app-info": {...}},
     "unavailable": {"app-info": "why it is missing"}}

It lives in the proxy's run directory, ``<core.data_dir>/run/proxy/gateway-info.json``
(where the workers also write their counters, so a worker finds it from the directory it is
given). Writes are atomic (temp file, fsync, rename, mode 0644): a reader sees the old or the
new file, never a mix. The documents are public by design (upstream serves them to anyone),
so nothing secret may be put here. A worker reads it at start and on every ``SIGHUP``; a
missing file means "not published yet" (503), a corrupt one keeps what the worker had.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from gateway.proxy.endpoints import GatewayInfo
from gateway.proxy.stats import stats_dir_of

__all__ = ["DOCUMENTS", "INFO_FILE", "info_path", "load_info", "read_info", "write_info"]

logger = logging.getLogger(__name__)

VERSION = 1
INFO_FILE = "gateway-info.json"
DOCUMENTS = ("app-info", "acme-info")
_MAX_SIZE = 16 << 20  # a bound for a worker's read; real documents are a few KiB


def info_path(data_dir: Path) -> Path:
    """Where the control plane publishes the documents: in the workers' stats directory
    (:func:`gateway.proxy.stats.stats_dir_of`), where they look."""
    return stats_dir_of(data_dir) / INFO_FILE


def encode(documents: Mapping[str, Any], unavailable: Mapping[str, str]) -> bytes:
    unknown = (set(documents) | set(unavailable)) - set(DOCUMENTS)
    if unknown:
        raise ValueError(f"unknown gateway documents {sorted(unknown)}; known: {DOCUMENTS}")
    doc = {
        "version": VERSION,
        "documents": dict(documents),
        "unavailable": {k: v for k, v in unavailable.items() if k not in documents},
    }
    # not sorted: upstream's field order is kept (documents are built the same way each time)
    return json.dumps(doc, separators=(",", ":")).encode()


def write_info(
    path: Path, documents: Mapping[str, Any], unavailable: Mapping[str, str] = MappingProxyType({})
) -> bool:
    """Atomically replace ``path``; False (and no write, no reload needed) if unchanged."""
    data = encode(documents, unavailable)
    try:
        if path.read_bytes() == data:
            return False
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.fchmod(fd, 0o644)  # whatever the umask: workers may run as another user
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return True


def read_info(path: Path) -> GatewayInfo:
    """The documents at ``path`` (empty if there is no file yet); ValueError if corrupt."""
    try:
        with path.open("rb") as f:
            raw = f.read(_MAX_SIZE + 1)
    except FileNotFoundError:
        return GatewayInfo()
    if len(raw) > _MAX_SIZE:
        raise ValueError(f"{path} is larger than {_MAX_SIZE} bytes")
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        raise ValueError(f"{path}: expected a version {VERSION} gateway-info document")
    documents, unavailable = doc.get("documents", {}), doc.get("unavailable", {})
    if not isinstance(documents, dict) or not isinstance(unavailable, dict):
        raise ValueError(f"{path}: documents and unavailable must be objects")
    return GatewayInfo(
        documents=MappingProxyType(
            {
                name: json.dumps(value, separators=(",", ":")).encode()
                for name, value in documents.items()
                if name in DOCUMENTS
            }
        ),
        unavailable=MappingProxyType(
            {k: str(v) for k, v in unavailable.items() if k in DOCUMENTS and k not in documents}
        ),
    )


def load_info(path: Path | None, current: GatewayInfo | None = None) -> GatewayInfo:
    """For the workers: :func:`read_info`, keeping ``current`` (logged) if the file is bad."""
    if path is None:
        return current or GatewayInfo()
    try:
        return read_info(path)
    except (OSError, ValueError) as exc:  # a bad file must not take a worker down
        logger.error("gateway info not reloaded, keeping the previous documents: %s", exc)
        return current or GatewayInfo()
