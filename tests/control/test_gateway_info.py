"""The documents the control plane publishes for ``gateway.<base>/app-info`` and ``/acme-info``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gateway.control.gateway_info import (
    ACME_INFO_FIELDS,
    NO_TEE,
    InfoPublisher,
    app_info_document,
    upstream_acme_info,
)
from gateway.proxy.info_file import read_info
from gateway.tee.base import RuntimeEvent, TeeError, replay
from gateway.tee.sim import SimTee

APP_ID = bytes.fromhex("ab" * 20)


def acme() -> dict[str, Any]:
    return {"enabled": True, "directory_url": "https://ca/dir", "account_uri": "https://ca/a/1",
            "quoted_hist_keys": [], "account_quote": "", "account_attestation": ""}  # fmt: skip


def test_acme_info_is_exactly_upstreams_shape() -> None:
    doc = upstream_acme_info(acme())
    assert list(doc) == list(ACME_INFO_FIELDS)  # no admin-only keys, upstream's order


def test_app_info_reads_the_identity_back_from_rtmr3(tmp_path: Path) -> None:
    tee = SimTee.open(tmp_path / "pki", tmp_path / "tee")
    events = [
        RuntimeEvent("app-id", APP_ID),
        RuntimeEvent("compose-hash", b"\x01" * 32),
        RuntimeEvent("instance-id", b"\x02" * 20),
    ]
    for e in events:
        tee.emit_event(e)
    info = app_info_document(tee)
    assert info["app_id"] == APP_ID.hex()
    assert info["compose_hash"] == "01" * 32 and info["instance_id"] == "02" * 20
    tcb = json.loads(info["tcb_info"])
    assert tcb["rtmr3"] == replay(events).hex() == tee.rtmrs()[3].hex()
    assert tcb["mrtd"] == tee.mrtd().hex()
    assert [e["event"] for e in tcb["event_log"]] == ["app-id", "compose-hash", "instance-id"]
    assert info["mr_aggregated"] == tcb["mr_aggregated"]


class BrokenTee:
    name = "broken"

    def rtmrs(self) -> tuple[bytes, ...]:
        raise TeeError("RTMR sysfs is unreadable (test)")

    def runtime_events(self) -> tuple[RuntimeEvent, ...]:
        return ()


def test_publisher_says_why_app_info_is_missing(tmp_path: Path) -> None:
    path = tmp_path / "run" / "proxy" / "gateway-info.json"
    pub = InfoPublisher(path, acme, None)
    assert pub.publish() is True and pub.publish() is False  # unchanged: no rewrite
    info = read_info(path)
    assert set(info.documents) == {"acme-info"} and info.unavailable == {"app-info": NO_TEE}
    broken = InfoPublisher(path, acme, BrokenTee())  # type: ignore[arg-type]
    assert broken.publish() is True
    assert "broken TEE backend failed: RTMR sysfs" in read_info(path).unavailable["app-info"]
    sim = InfoPublisher(path, acme, SimTee.open(tmp_path / "pki", tmp_path / "tee"))
    assert sim.publish() is True
    assert set(read_info(path).documents) == {"acme-info", "app-info"}


def test_publisher_survives_an_unwritable_run_dir(tmp_path: Path) -> None:
    (tmp_path / "run").write_text("not a directory")
    pub = InfoPublisher(tmp_path / "run" / "proxy" / "gateway-info.json", acme, None)
    assert pub.publish() is False  # logged; the gateway keeps running
