"""Random host input never raises anything but our own errors (hypothesis)."""

from __future__ import annotations

import json

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.guest import envcrypt, evidence
from gateway.guest.hostshared import HostSharedError, SysConfig
from gateway.guest.identity import AppCompose, ComposeError, InstanceInfo
from gateway.protocol.errors import CodecError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)
COMPOSE_KEYS = [
    "manifest_version", "name", "runner", "key_provider", "kms_enabled", "allowed_envs",
    "init_script", "storage_fs", "key_provider_id", "event_log_version", "features",
    "public_tcbinfo", "no_instance_id", "pre_launch_script",
]  # fmt: skip


@settings(max_examples=80, deadline=None)
@given(doc=st.dictionaries(st.sampled_from(COMPOSE_KEYS), json_values, max_size=10))
@example(doc={"manifest_version": "3", "name": "a", "runner": "bash", "init_script": ["x"]})
@example(doc={"manifest_version": "\u00b2", "name": "a", "runner": "bash"})
def test_compose_fields_only_raise_compose_error(doc: dict[str, object]) -> None:
    try:
        AppCompose.parse(json.dumps(doc).encode())
    except ComposeError:
        pass


@settings(max_examples=80, deadline=None)
@given(raw=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_random_documents_only_raise_our_errors(raw: bytes) -> None:
    for parse, errors in (
        (AppCompose.parse, ComposeError),
        (InstanceInfo.parse, ComposeError),
        (SysConfig.parse, HostSharedError),
    ):
        try:
            parse(raw)
        except errors:
            pass


@settings(max_examples=80, deadline=None)
@given(
    doc=st.dictionaries(
        st.sampled_from(["instance_id_seed", "instance_id", "app_id", "x"]), json_values
    )
)
def test_instance_info_fields(doc: dict[str, object]) -> None:
    try:
        info = InstanceInfo.parse(json.dumps(doc).encode())
    except ComposeError:
        return
    assert all(len(v) in (0, 20) for v in (info.app_id, info.instance_id, info.instance_id_seed))
    assert InstanceInfo.parse(info.to_json()) == info


@settings(max_examples=80, deadline=None)
@given(
    doc=st.dictionaries(
        st.sampled_from(["kms_urls", "gateway_urls", "vm_config", "host_api_url", "tproxy_urls"]),
        json_values | st.lists(st.text(max_size=30), max_size=3),
    )
)
def test_sys_config_fields(doc: dict[str, object]) -> None:
    try:
        SysConfig.parse(json.dumps(doc).encode())
    except HostSharedError:
        pass


@settings(max_examples=80, deadline=None)
@given(entries=st.lists(json_values, max_size=5), allowed=st.lists(st.text(max_size=5), max_size=3))
def test_env_plaintext_only_raises_env_error(entries: list[object], allowed: list[str]) -> None:
    try:
        parsed = envcrypt.filter_env(json.dumps({"env": entries}).encode(), allowed)
    except envcrypt.EnvError:
        return
    assert set(parsed.env) <= set(allowed)


@settings(max_examples=80, deadline=None)
@given(data=st.binary(max_size=40))
@example(data=b"\x04\x81\x01a")
@example(data=b"\x04\x85")
def test_octet_string_reader(data: bytes) -> None:
    try:
        out = evidence.read_der_octet_string(data)
    except CodecError:
        return
    assert data.endswith(out)


@pytest.mark.parametrize("content", [b"", b"x" * 127, b"y" * 128, b"z" * 70000])
def test_octet_string_round_trip(content: bytes) -> None:
    from gateway.guest.certs import der_octet_string

    assert evidence.read_der_octet_string(der_octet_string(content)) == content


def test_deeply_nested_json_is_refused_cleanly() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(ComposeError):
        AppCompose.parse(deep)
    with pytest.raises(ComposeError):
        InstanceInfo.parse(deep)
    with pytest.raises(HostSharedError):
        SysConfig.parse(deep)
    with pytest.raises(envcrypt.EnvError):
        envcrypt.filter_env(b'{"env": ' + deep + b"}", [])
