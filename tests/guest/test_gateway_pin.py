"""The CVM's pin on the gateway's boot chain / OS image, against the real RPC over real TLS.

The threat: a TD whose guest OS was modified writes the gateway's app id into its RTMR3 event
log and so passes an app-id-only check. The simulated TEE forges exactly that: a quote,
signed under the lab PKI, for a TD with the gateway's app id but another boot chain (MRTD,
RTMR0-2) or another ``os-image-hash`` event. Pinned, the CVM refuses it before sending the
request (the impostor's registry stays empty); the genuine gateway is accepted. Unpinned,
the impostor is accepted (today's and upstream's trust) and a WARNING says so, once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.attest.collateral import SimCollateralSource
from gateway.control.registration import Advertised
from gateway.control.rpc_identity import RpcIdentity
from gateway.control.tls_server import TlsCredentials
from gateway.guest.gateway_cache import GatewayKeys, GatewayKeyStore, TeeCertIssuer
from gateway.guest.gateway_client import GatewayClient, GatewayRejected, GatewayTrust
from gateway.guest.gateway_pin import GatewayImagePin, PinError
from gateway.guest.identity import KeyProviderKind
from gateway.guest.keys import app_keys_from_seed
from gateway.guest.register_cmd import UsageError, add_arguments, build
from gateway.registry.service import Registry
from gateway.registry.sqlite import SqliteStore
from gateway.tee.base import RuntimeEvent
from gateway.tee.sim import SimImage, SimTee
from gateway.tee.sim_pki import SimPki
from gateway.tunnel.keys import generate_private_key, public_key
from tests.helpers.gateway_rpc import (
    CA,
    CVM_APP,
    GW_APP,
    PLAN,
    RpcServer,
    kms_server_files,
    make_ca,
    measured_tee,
    serve_rpc,
    write_ca,
)
from tests.helpers.processes import free_port

GENUINE = SimImage.named("gateway-os-1.0")
MODIFIED = SimImage.named("gateway-os-1.0-modified")
GENUINE_HASH = b"\x0a" * 32
ADV = Advertised(public_key(generate_private_key()), "10.0.0.1/24", "192.0.2.1:51820")


def image_json(image: SimImage, name: str = "") -> dict[str, str]:
    return {
        "name": name or image.name,
        "mrtd": image.mr_td.hex(),
        "rtmr0": image.rt_mr0.hex(),
        "rtmr1": image.rt_mr1.hex(),
        "rtmr2": image.rt_mr2.hex(),
    }


def gateway_tee(
    pki: SimPki, state_dir: Path, image: SimImage, os_hash: bytes = GENUINE_HASH
) -> SimTee:
    """A simulated gateway TD: ``image``'s boot chain, GW_APP and ``os_hash`` in RTMR3."""
    tee = SimTee(pki, state_dir, image)
    for name, payload in [
        ("system-preparing", b""),
        ("app-id", bytes.fromhex(GW_APP)),
        ("compose-hash", b"\xc2" * 32),
        ("instance-id", b"\x98" * 20),
        ("boot-mr-done", b""),
        ("os-image-hash", os_hash),
        ("key-provider", b'{"name":"kms","id":"00"}'),
        ("system-ready", b""),
    ]:
        tee.emit_event(RuntimeEvent(name, payload))
    return tee


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> SimPki:
    return SimPki.load_or_create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def client_ca() -> CA:
    return make_ca("CVM client CA")


@pytest.fixture(scope="module")
def keys(pki: SimPki, client_ca: CA, tmp_path_factory: pytest.TempPathFactory) -> GatewayKeys:
    d = tmp_path_factory.mktemp("cvm")
    tee = measured_tee(pki, d / "tee", CVM_APP, b"\x16" * 20)
    return asyncio.run(
        GatewayKeyStore(d / "cache").get_or_create(TeeCertIssuer(tee, client_ca), int(time.time()))
    )


@contextlib.contextmanager
def gateway(
    tmp_path: Path, pki: SimPki, client_ca: CA, tee: SimTee | None = None
) -> Iterator[RpcServer]:
    """The real RPC server; RA-TLS through ``tee``, or KMS-issued when ``tee`` is None."""
    ca_file, _ = write_ca(client_ca, tmp_path / "ca", "client-ca")
    if tee is not None:
        creds = RpcIdentity(tee, tmp_path / "rpc").credentials(ca_file)
    else:
        kms = make_ca("KMS root")
        (tmp_path / "kms-root.pem").write_bytes(kms[0].public_bytes(serialization.Encoding.PEM))
        creds = TlsCredentials(*kms_server_files(tmp_path / "kms", kms, GW_APP), ca_file)
    store = SqliteStore(tmp_path / "registry.sqlite3")
    with serve_rpc(creds, pki, Registry(store, PLAN, clock=time.time), ADV, port=free_port()) as s:
        yield s
    store.close()


def client(
    pki: SimPki, pin: dict[str, object] | None, kms_root: str | None = None
) -> GatewayClient:
    return GatewayClient(
        GatewayTrust(
            (bytes.fromhex(GW_APP),),
            SimCollateralSource(pki),
            pki.root_ca_der,
            kms_root_pem=kms_root,
            image_pin=None if pin is None else GatewayImagePin.from_json(pin),
        )
    )


def register(c: GatewayClient, server: RpcServer, keys: GatewayKeys) -> str:
    _, verified = asyncio.run(c.register(f"https://127.0.0.1:{server.port}", keys))
    return verified.method


def refused(c: GatewayClient, server: RpcServer, keys: GatewayKeys) -> GatewayRejected:
    with pytest.raises(GatewayRejected) as info:
        register(c, server, keys)
    assert server.instances() == []  # refused before the request was sent
    return info.value


BOOT_PIN: dict[str, object] = {"os_images": [image_json(GENUINE)]}
HASH_PIN: dict[str, object] = {"os_image_hashes": [GENUINE_HASH.hex()]}


@pytest.mark.parametrize(
    ("pin", "impostor_image", "impostor_hash", "reason"),
    [
        (BOOT_PIN, MODIFIED, GENUINE_HASH, "measurement_not_allowed"),  # claims the hash too
        (HASH_PIN, GENUINE, b"\x0b" * 32, "os_image_not_allowed"),
        ({**BOOT_PIN, **HASH_PIN}, MODIFIED, GENUINE_HASH, "measurement_not_allowed"),
    ],
    ids=["boot-chain", "os-image-hash", "both"],
)
def test_impostor_with_the_gateway_app_id_is_refused_genuine_accepted(
    pki: SimPki,
    client_ca: CA,
    keys: GatewayKeys,
    tmp_path: Path,
    pin: dict[str, object],
    impostor_image: SimImage,
    impostor_hash: bytes,
    reason: str,
) -> None:
    c = client(pki, pin)
    impostor = gateway_tee(pki, tmp_path / "evil-tee", impostor_image, impostor_hash)
    with gateway(tmp_path / "evil", pki, client_ca, impostor) as server:
        exc = refused(c, server, keys)
    assert exc.reason == reason
    assert "not a pinned gateway image" in str(exc) and GW_APP in str(exc)
    genuine = gateway_tee(pki, tmp_path / "good-tee", GENUINE)
    with gateway(tmp_path / "good", pki, client_ca, genuine) as server:
        assert register(c, server, keys) == "ratls"
        assert len(server.instances()) == 1


def test_without_a_pin_the_app_id_decides_and_a_warning_says_so_once(
    pki: SimPki,
    client_ca: CA,
    keys: GatewayKeys,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    c = client(pki, None)
    impostor = gateway_tee(pki, tmp_path / "evil-tee", MODIFIED)
    with (
        caplog.at_level(logging.WARNING, logger="gateway.guest.gateway_client"),
        gateway(tmp_path / "evil", pki, client_ca, impostor) as server,
    ):
        assert register(c, server, keys) == "ratls"  # today's trust: the app id only
        assert register(c, server, keys) == "ratls"
    warnings = [r.getMessage() for r in caplog.records if "not pinned" in r.getMessage()]
    assert len(warnings) == 1
    assert MODIFIED.mr_td.hex() in warnings[0] and GENUINE_HASH.hex() in warnings[0]


def test_a_pin_refuses_kms_issued_gateway_certificates(
    pki: SimPki, client_ca: CA, keys: GatewayKeys, tmp_path: Path
) -> None:
    with gateway(tmp_path / "kms", pki, client_ca, None) as server:
        kms_root = (tmp_path / "kms" / "kms-root.pem").read_text()
        exc = refused(client(pki, BOOT_PIN, kms_root), server, keys)
        assert register(client(pki, None, kms_root), server, keys) == "kms_cert"  # unpinned
    assert exc.reason == "measurement_not_allowed" and "no quote" in str(exc)


def test_a_debug_gateway_is_refused_under_a_pin(
    pki: SimPki, client_ca: CA, keys: GatewayKeys, tmp_path: Path
) -> None:
    debug = dataclasses.replace(GENUINE, td_attributes=b"\x01" + bytes(7))
    tee = gateway_tee(pki, tmp_path / "dbg-tee", debug)
    with gateway(tmp_path / "dbg", pki, client_ca, tee) as server:
        exc = refused(client(pki, BOOT_PIN), server, keys)
    assert exc.reason == "debug_td"


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({}, "pin nothing"),
        ({"compose_hashes": ["aa" * 32]}, "pin nothing"),
        ({"app_ids": [GW_APP], "os_image_hashes": ["aa" * 32]}, "not accepted here"),
        ({"allow_kms_cert": True, "os_image_hashes": ["aa" * 32]}, "not accepted here"),
        ({"os_image_hashes": ["aa" * 31]}, "31 bytes"),
        ({"os_images": [{"mrtd": "00"}]}, "os_images[0]"),
        ("[", "not JSON"),
        ([], "JSON object"),
    ],
)
def test_bad_pins_are_refused_with_the_key_named(doc: object, message: str) -> None:
    text = doc if isinstance(doc, str) else json.dumps(doc)
    with pytest.raises(PinError) as info:
        GatewayImagePin.from_json(text)
    assert message in str(info.value)


def _args(tmp_path: Path, compose_extra: dict[str, object], *extra: str) -> argparse.Namespace:
    boot = tmp_path / "boot"
    shared = boot / ".host-shared"
    shared.mkdir(parents=True)
    compose = {
        "manifest_version": 2,
        "name": "app",
        "runner": "bash",
        "bash_script": "",
        "gateway_enabled": True,
        **compose_extra,
    }
    (shared / "app-compose.json").write_text(json.dumps(compose))
    (shared / ".sys-config.json").write_text(json.dumps({"gateway_urls": ["https://gw:1"]}))
    keys = dataclasses.replace(
        app_keys_from_seed(b"\x07" * 32, KeyProviderKind.NONE), gateway_app_id=GW_APP
    )
    (boot / ".appkeys.json").write_bytes(keys.to_json())
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(
        ["--work-dir", str(tmp_path / "w"), "--boot-dir", str(boot), "--sim-dir",
         str(tmp_path / "sim"), "--trust-sim-root", *extra]
    )  # fmt: skip


def test_the_pin_comes_from_app_compose_and_the_flag_wins(tmp_path: Path) -> None:
    reg = build(_args(tmp_path / "a", {"gateway_image_policy": BOOT_PIN}))
    pin = reg.client.trust.image_pin
    assert pin is not None and pin.policy.os_images[0].mrtd == GENUINE.mr_td.hex()
    (tmp_path / "pin.json").write_text(json.dumps(HASH_PIN))
    flag = build(
        _args(
            tmp_path / "b",
            {"gateway_image_policy": BOOT_PIN},
            "--gateway-image-policy",
            f"@{tmp_path / 'pin.json'}",
        )
    )
    assert flag.client.trust.image_pin is not None
    assert flag.client.trust.image_pin.policy.os_image_hashes == (GENUINE_HASH.hex(),)
    assert build(_args(tmp_path / "c", {})).client.trust.image_pin is None


def test_a_bad_pin_in_app_compose_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="pin nothing"):
        build(_args(tmp_path, {"gateway_image_policy": {"compose_hashes": []}}))


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.text(max_size=8)
    | st.sampled_from(["aa" * 32, "0x" + "bb" * 48, "cc" * 48, "AA" * 32]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)
_keys = st.sampled_from(["os_images", "os_image_hashes", "compose_hashes", "mrtd", "rtmr0", "x"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_keys, _json, max_size=3) | _json)
def test_any_json_gives_a_pin_or_a_pin_error(doc: object) -> None:
    try:
        pin = GatewayImagePin.from_json(json.dumps(doc))
    except PinError:
        return
    assert pin.policy.os_images or pin.policy.os_image_hashes


def test_the_command_exits_2_naming_a_bad_pin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.cli import main

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        code = main(
            ["guest-register", "--work-dir", str(tmp_path / "w"), "--gateway-url", "https://gw:1",
             "--gateway-app-id", GW_APP, "--sim-dir", str(tmp_path / "sim"), "--trust-sim-root",
             "--gateway-image-policy", '{"os_image_hashes": ["zz"]}']
        )  # fmt: skip
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    assert code == 2 and "os_image_hashes[0]" in capsys.readouterr().err
