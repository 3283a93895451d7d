"""Compose hash, app id, instance id and the boot event order."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from gateway.guest import identity
from gateway.guest.identity import AppCompose, ComposeError, InstanceInfo, KeyProviderKind
from gateway.tee.base import RuntimeEvent

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "dstack-simulator" / "app-compose.json"


def test_fixture_compose_hash_and_fields() -> None:
    raw = FIXTURE.read_bytes()
    compose = AppCompose.parse(raw)
    assert identity.compose_hash(raw).hex() == (
        "65b4e574f16973956908b6359920593c3b7d9f36f38e81a47f996a0c0d5435bb"
    )
    assert compose.key_provider is KeyProviderKind.KMS
    assert compose.gateway_enabled and compose.public_logs and compose.public_sysinfo
    assert compose.storage_fs == "ext4"
    assert compose.pre_launch_script and compose.pre_launch_script.startswith("docker run")
    assert identity.app_id_for(compose, InstanceInfo()) == compose.hash[:20]


def test_hash_is_over_exact_bytes_not_reserialised() -> None:
    a = b'{"manifest_version":2,"name":"x","runner":"bash"}'
    b = b'{\n    "manifest_version": 2, "name": "x", "runner": "bash"\n}'
    assert AppCompose.parse(a).hash != AppCompose.parse(b).hash


def _compose(**kw: object) -> AppCompose:
    doc = {"manifest_version": 2, "name": "app", "runner": "docker-compose", **kw}
    return AppCompose.parse(json.dumps(doc).encode())


def test_key_provider_precedence() -> None:
    assert _compose().key_provider is KeyProviderKind.NONE
    assert _compose(kms_enabled=True).key_provider is KeyProviderKind.KMS
    assert _compose(local_key_provider_enabled=True).key_provider is KeyProviderKind.LOCAL
    assert _compose(kms_enabled=True, key_provider="none").key_provider is KeyProviderKind.NONE


def test_app_id_from_instance_info_only_with_kms() -> None:
    host_app_id = bytes(range(20))
    info = InstanceInfo(app_id=host_app_id)
    assert identity.app_id_for(_compose(key_provider="kms"), info) == host_app_id
    plain = _compose()
    assert identity.app_id_for(plain, info) == plain.hash[:20]


def test_instance_id_rules() -> None:
    seed = bytes(range(1, 21))
    fresh = bytes(20)
    kms = _compose(key_provider="kms")
    got_seed, iid = identity.instance_id_for(kms, InstanceInfo(instance_id_seed=seed), fresh)
    assert got_seed == seed
    assert iid == hashlib.sha256(seed + kms.hash[:20]).digest()[:20]
    # none provider: a fresh seed every boot, whatever the host says
    none = _compose()
    got_seed, _ = identity.instance_id_for(none, InstanceInfo(instance_id_seed=seed), fresh)
    assert got_seed == fresh
    _, iid = identity.instance_id_for(_compose(no_instance_id=True), InstanceInfo(), fresh)
    assert iid == b""


def test_instance_info_round_trip_and_key_order() -> None:
    info = InstanceInfo(instance_id_seed=b"\x01" * 20, instance_id=b"\x02" * 20, app_id=b"")
    text = info.to_json()
    assert text.startswith(b'{"instance_id_seed":"0101')
    assert list(json.loads(text)) == ["instance_id_seed", "instance_id", "app_id"]
    assert InstanceInfo.parse(text) == info


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{", "not valid JSON"),
        (b"[]", "object"),
        (b'{"app_id": 5}', "hex string"),
        (b'{"app_id": "zz"}', "not hex"),
        (b'{"app_id": "0102"}', "20 bytes"),
    ],
)
def test_hostile_instance_info_is_refused(raw: bytes, reason: str) -> None:
    with pytest.raises(ComposeError, match=reason):
        InstanceInfo.parse(raw)


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        (b"\xff", "UTF-8"),
        (b"{", "JSON"),
        (b"[]", "object"),
        (b'{"manifest_version": 9, "name": "a", "runner": "bash"}', "newer"),
        (b'{"manifest_version": 2, "runner": "bash"}', "required"),
        (b'{"manifest_version": 2, "name": "a", "runner": "b", "key_provider": "x"}', "none/kms"),
        (b'{"manifest_version": 2, "name": "a", "runner": "b", "allowed_envs": "A"}', "list"),
        (b'{"manifest_version": 2, "name": "a", "runner": "b", "event_log_version": 2}', "2"),
    ],
)
def test_invalid_compose_is_refused(doc: bytes, reason: str) -> None:
    with pytest.raises(ComposeError, match=reason):
        AppCompose.parse(doc)


def test_boot_event_order_and_digest() -> None:
    """v0.5.x order; the system-preparing digest is the one in the fixture (§3.2)."""
    assert RuntimeEvent("system-preparing", b"").digest().hex() == (
        "f9974020ef507068183313d0ca808e0d1ca9b2d1ad0c61f5784e7157c362c06536f5dd"
        "acdad4451693f48fcc72fff624"
    )
    events = identity.boot_events_measure(b"\x01" * 20, b"\x02" * 32, b"\x03" * 20)
    assert [e.name for e in events] == [
        "system-preparing",
        "app-id",
        "compose-hash",
        "instance-id",
        "boot-mr-done",
    ]
    assert identity.key_provider_payload(KeyProviderKind.LOCAL, b"\xab") == (
        b'{"name":"local-sgx","id":"ab"}'
    )


def test_our_events_reproduce_the_fixture_attestation() -> None:
    """dstack's simulator fixture: our event builders give its payloads and digests, and the
    replay reaches the RTMR3 in its quote (guest-formats §3.5)."""
    from gateway.protocol.attestation import decode_attestation
    from gateway.protocol.tdx_quote import parse_tdx_quote
    from gateway.tee.base import replay

    att = decode_attestation((FIXTURE.parent / "attestation.bin").read_bytes())
    theirs = [RuntimeEvent(e.name, e.payload) for e in att.runtime_events]
    by_name = {e.name: e.payload for e in theirs}
    kp = json.loads(by_name["key-provider"])
    ours = identity.boot_events_measure(
        by_name["app-id"], by_name["compose-hash"], by_name["instance-id"]
    ) + [
        RuntimeEvent("os-image-hash", by_name["os-image-hash"]),
        RuntimeEvent(
            "key-provider",
            identity.key_provider_payload(KeyProviderKind.KMS, bytes.fromhex(kp["id"])),
        ),
        RuntimeEvent("storage-fs", b"zfs"),
        RuntimeEvent("system-ready", b""),
    ]
    assert ours == theirs
    rtmr3 = replay(ours)
    assert rtmr3.hex().startswith("f28a1490ee924e93")
    assert parse_tdx_quote(att.quote).report.rt_mr3 == rtmr3


def test_mr_config_id_of_the_fixture_matches_its_compose_hash() -> None:
    from gateway.protocol.attestation import decode_attestation
    from gateway.protocol.tdx_quote import parse_tdx_quote

    att = decode_attestation((FIXTURE.parent / "attestation.bin").read_bytes())
    mr = parse_tdx_quote(att.quote).report.mr_config_id
    by_name = {e.name: e.payload for e in att.runtime_events}
    kp_id = bytes.fromhex(json.loads(by_name["key-provider"])["id"])
    identity.check_mr_config_id(
        mr, by_name["compose-hash"], by_name["app-id"], KeyProviderKind.KMS, kp_id
    )
    with pytest.raises(ComposeError, match="does not match"):
        identity.check_mr_config_id(mr, bytes(32), by_name["app-id"], KeyProviderKind.KMS, kp_id)


def test_mr_config_id_versions() -> None:
    from gateway.guest.keccak import keccak256

    ch, app = b"\x01" * 32, b"\x02" * 20
    identity.check_mr_config_id(bytes(48), ch, app, KeyProviderKind.NONE, b"")  # unbound
    v2 = b"\x02" + keccak256(ch + app + b"\x02" + b"pk") + bytes(15)
    identity.check_mr_config_id(v2, ch, app, KeyProviderKind.KMS, b"pk")
    with pytest.raises(ComposeError, match="does not match"):
        identity.check_mr_config_id(v2, ch, app, KeyProviderKind.NONE, b"pk")
    with pytest.raises(ComposeError, match="version 3"):
        identity.check_mr_config_id(b"\x03" + bytes(47), ch, app, KeyProviderKind.KMS, b"")
