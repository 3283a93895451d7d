"""The gateway-info file: atomic, world-readable, unchanged documents are not rewritten, and a
bad file never costs a worker the documents it has."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gateway.proxy.endpoints import GatewayInfo, respond
from gateway.proxy.info_file import info_path, load_info, read_info, write_info

ACME = {"account_uri": "https://ca/acct/1", "quoted_hist_keys": [], "account_quote": "",
        "account_attestation": ""}  # fmt: skip


def test_round_trip_mode_and_no_rewrite_when_unchanged(tmp_path: Path) -> None:
    path = info_path(tmp_path)
    assert path == tmp_path / "run" / "proxy" / "gateway-info.json"
    old = os.umask(0o077)  # a strict umask must not hide the file from the workers
    try:
        assert write_info(path, {"acme-info": ACME}, {"app-info": "no TEE"}) is True
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    inode = path.stat().st_ino
    assert write_info(path, {"acme-info": ACME}, {"app-info": "no TEE"}) is False
    assert path.stat().st_ino == inode  # not replaced
    info = read_info(path)
    assert json.loads(info.documents["acme-info"]) == ACME
    assert info.unavailable == {"app-info": "no TEE"}
    out = respond(b"GET /acme-info HTTP/1.1\r\n\r\n", info)
    assert out is not None and json.loads(out.partition(b"\r\n\r\n")[2]) == ACME
    # a new account: replaced atomically (a new inode), no temp file left behind
    assert write_info(path, {"acme-info": {**ACME, "account_uri": "u2"}, "app-info": {}}) is True
    assert path.stat().st_ino != inode
    assert sorted(p.name for p in path.parent.iterdir()) == ["gateway-info.json"]
    assert read_info(path).unavailable == {}


def test_missing_file_is_empty_and_bad_files_keep_the_current_documents(tmp_path: Path) -> None:
    path = tmp_path / "gateway-info.json"
    assert read_info(path) == GatewayInfo()
    current = GatewayInfo({"acme-info": b"{}"})
    for bad in (b"{not json", b'{"version": 2}', b"[]", b'{"version":1,"documents":[]}'):
        path.write_bytes(bad)
        with pytest.raises(ValueError):
            read_info(path)
        assert load_info(path, current) is current
    assert load_info(None, current) is current
    assert load_info(None) == GatewayInfo()


def test_unknown_documents_are_refused_on_write_and_ignored_on_read(tmp_path: Path) -> None:
    path = tmp_path / "i.json"
    with pytest.raises(ValueError, match="unknown gateway documents"):
        write_info(path, {"secrets": {}})
    path.write_text(json.dumps({"version": 1, "documents": {"other": 1, "app-info": {"a": 1}}}))
    assert set(read_info(path).documents) == {"app-info"}


def test_a_worker_reads_the_file_in_its_stats_dir_at_start_and_on_reload(tmp_path: Path) -> None:
    import asyncio

    from gateway.certs.store import CertStore
    from gateway.proxy.listeners import Worker
    from gateway.proxy.routes import StaticRoutes
    from gateway.proxy.settings import ProxySettings
    from gateway.proxy.stats import WorkerState

    stats = tmp_path / "run" / "proxy"
    write_info(info_path(tmp_path), {"acme-info": ACME})
    settings = ProxySettings(listen=("127.0.0.1:1",), workers=1, certs_dir=tmp_path / "certs")
    loop = asyncio.new_event_loop()
    try:
        worker = Worker(
            loop, settings, CertStore(settings.certs_dir, settings.tls_versions),
            StaticRoutes([]), WorkerState(), stats_dir=stats,
        )  # fmt: skip
        assert json.loads(worker.info.documents["acme-info"]) == ACME
        write_info(info_path(tmp_path), {"acme-info": {**ACME, "account_uri": "u2"}})
        assert json.loads(worker.info.documents["acme-info"])["account_uri"] == ACME["account_uri"]
        worker.reload()  # what SIGHUP runs
        assert json.loads(worker.info.documents["acme-info"])["account_uri"] == "u2"
        info_path(tmp_path).write_text("{torn")
        worker.reload()  # a bad file: the documents stay
        assert json.loads(worker.info.documents["acme-info"])["account_uri"] == "u2"
        given = GatewayInfo({"app-info": b"{}"})  # documents handed in: no file is read
        fixed = Worker(
            loop, settings, CertStore(settings.certs_dir, settings.tls_versions),
            StaticRoutes([]), WorkerState(), stats_dir=stats, info=given,
        )  # fmt: skip
        fixed.reload()
        assert fixed.info is given
    finally:
        loop.close()
