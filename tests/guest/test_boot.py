"""Full lab boots: a simulated CVM boots from a host-shared folder against the lab KMS."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from dstack_sdk import EnvVar, encrypt_env_vars_sync

from gateway.attest import ratls
from gateway.attest.quote import QuoteVerifier
from gateway.guest import certs, kdf
from gateway.guest.boot import Boot, BootError, load_state
from gateway.guest.identity import AppCompose, KeyProviderKind
from gateway.guest.keccak import keccak256
from gateway.guest.keys import KeyProvider, LocalKeyProvider, NoneKeyProvider
from gateway.guest.kms_client import KmsKeyProvider, kms_signer_for
from gateway.guest.kms_lab import KmsRoot, LabKms, create_kms_app, kms_ssl_context
from gateway.guest.runner import LocalProcessRunner
from gateway.guest.service import AgentService
from gateway.tee.base import replay
from gateway.tee.sim import SimTee
from gateway.tee.sim_pki import SimPki
from tests.helpers.processes import free_port, wait_until

from .conftest import serve_tcp

APP_SCRIPT = 'echo "token=$API_KEY other=${OTHER:-unset}" > app-out.txt; exec sleep 30'


@pytest.fixture(scope="module")
def kms_root() -> KmsRoot:
    return KmsRoot.create()


@pytest.fixture
def lab_kms(kms_root: KmsRoot, sim_pki: SimPki) -> Iterator[tuple[LabKms, str]]:
    kms = LabKms(
        root=kms_root,
        verifier=QuoteVerifier(root_ca_der=sim_pki.root_ca_der),
        collateral=lambda quote: sim_pki.collateral(int(time.time())),
    )
    port = free_port()
    with serve_tcp(create_kms_app(kms), port, kms_ssl_context(kms)):
        yield kms, f"https://127.0.0.1:{port}"


def compose_doc(**kw: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "manifest_version": 2,
        "name": "lab-app",
        "runner": "bash",
        "bash_script": APP_SCRIPT,
        "pre_launch_script": "echo pre > pre-launch-ran.txt",
        "key_provider": "kms",
        "allowed_envs": ["API_KEY"],
        "storage_fs": "ext4",
    }
    doc.update(kw)
    return doc


def make_shared(tmp_path: Path, kms_url: str, compose: dict[str, object]) -> Path:
    d = tmp_path / "host-shared"
    d.mkdir(parents=True, exist_ok=True)
    (d / "app-compose.json").write_text(json.dumps(compose, indent=4))
    (d / ".sys-config.json").write_text(
        json.dumps(
            {
                "kms_urls": [kms_url],
                "gateway_urls": [],
                "host_api_url": "",
                "vm_config": json.dumps({"os_image_hash": "ab" * 32, "cpu_count": 2}),
            }
        )
    )
    return d


def providers(kind: KeyProviderKind) -> KeyProvider:
    table: dict[KeyProviderKind, KeyProvider] = {
        KeyProviderKind.KMS: KmsKeyProvider(timeout=10),
        KeyProviderKind.NONE: NoneKeyProvider(),
        KeyProviderKind.LOCAL: LocalKeyProvider(),
    }
    return table[kind]


def app_id_of(shared: Path) -> bytes:
    return AppCompose.parse((shared / "app-compose.json").read_bytes()).hash[:20]


def encrypt_for(kms: LabKms, app_id: bytes, env: list[EnvVar]) -> bytes:
    pub = kms.env_pubkey(app_id, int(time.time()))["public_key"]
    return bytes.fromhex(encrypt_env_vars_sync(env, pub))


@pytest.fixture
def runner() -> Iterator[LocalProcessRunner]:
    r = LocalProcessRunner(pre_launch_timeout=10)
    yield r
    asyncio.run(r.stop())


def boot(shared: Path, work: Path, tee: SimTee, runner: LocalProcessRunner | None) -> Boot:
    return Boot(
        host_shared=shared,
        work_dir=work,
        tee=tee,
        key_provider=lambda c: providers(c.key_provider),
        runner=runner,
    )


@pytest.mark.slow
def test_full_lab_boot(
    tmp_path: Path,
    lab_kms: tuple[LabKms, str],
    tee: SimTee,
    runner: LocalProcessRunner,
    sim_pki: SimPki,
) -> None:
    kms, url = lab_kms
    shared = make_shared(tmp_path, url, compose_doc())
    app_id = app_id_of(shared)
    (shared / ".encrypted-env").write_bytes(
        encrypt_for(kms, app_id, [EnvVar("API_KEY", "s3cret"), EnvVar("OTHER", "nope")])
    )
    work = tmp_path / "work"
    result = asyncio.run(boot(shared, work, tee, runner).run())

    names = [e.name for e in tee.runtime_events()]
    assert names == [
        "system-preparing", "app-id", "compose-hash", "instance-id", "boot-mr-done",
        "os-image-hash", "key-provider", "storage-fs", "system-ready",
    ]  # fmt: skip
    assert replay(tee.runtime_events()) == tee.rtmrs()[3]
    events = {e.name: e.payload for e in tee.runtime_events()}
    assert events["app-id"] == app_id == result.app_id
    assert events["os-image-hash"] == bytes.fromhex("ab" * 32)
    assert json.loads(events["key-provider"]) == {"name": "kms", "id": kms.root.spki.hex()}
    assert events["storage-fs"] == b"ext4"
    # keys are the KMS's derivation for this app
    assert result.state.keys.env_crypt_key == kms.env_crypt_key(app_id)
    app_pub = kdf.compressed_k256_pub(kdf.k256_key(result.state.keys.k256_key))
    signer = kdf.recover_k256_pub(
        keccak256(b"dstack-kms-issued:" + app_id + app_pub), result.state.keys.k256_signature
    )
    assert signer == kms.root.k256_pub
    # env: only allowed names, written like upstream
    assert dict(result.env) == {"API_KEY": "s3cret"} and result.skipped_envs == ("OTHER",)
    assert (work / ".host-shared" / ".decrypted-env").read_text() == "API_KEY=s3cret\n"
    assert (work / ".host-shared" / ".decrypted-env.json").read_bytes() == b'{"API_KEY":"s3cret"}'
    assert oct((work / ".appkeys.json").stat().st_mode)[-3:] == "600"
    # pre-launch ran, then the app started with the env
    assert (work / "pre-launch-ran.txt").read_text() == "pre\n"
    out = work / "app-out.txt"
    wait_until(lambda: out.exists() and out.read_text().strip() != "", None, 10, "app output")
    assert out.read_text() == "token=s3cret other=unset\n"
    # the agent serves from the saved state; GetTlsKey chains to the KMS root
    state = load_state(work)
    svc = AgentService(state, tee, kms_signer=kms_signer_for(state.keys, state.vm_config))
    got = asyncio.run(
        svc.get_tls_key(
            certs.LeafRequest(subject="app", alt_names=("app.test",), usage_server_auth=True),
            usage_ra_tls=True,
            with_app_info=True,
        )
    )
    leaf, app_ca, root = (
        x509.load_pem_x509_certificate(p.encode()) for p in got["certificate_chain"]
    )
    leaf.verify_directly_issued_by(app_ca)  # signed by the KMS through SignCert
    app_ca.verify_directly_issued_by(root)
    assert root == kms.root.ca_cert
    app_id_ext = leaf.extensions.get_extension_for_oid(certs.OID_APP_ID).value
    assert isinstance(app_id_ext, x509.UnrecognizedExtension)
    assert app_id_ext.value == certs.der_octet_string(app_id)
    key = serialization.load_pem_private_key(got["key"].encode(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert leaf.public_key() == key.public_key()
    # the RA-TLS leaf verifies with the attestation core, as a gateway would check it
    now = int(time.time())
    verified = ratls.verify_ratls_cert(
        leaf, collateral=sim_pki.collateral(now), root_ca_der=sim_pki.root_ca_der, now=now
    )
    assert verified.identity.app_id == app_id
    assert (
        verified.identity.compose_hash
        == AppCompose.parse((shared / "app-compose.json").read_bytes()).hash
    )

    # a retry in the same boot is a no-op: same events, app not started twice
    pid = (work / "app.pid").read_text()
    again = asyncio.run(boot(shared, work, tee, runner).run())
    assert [e.name for e in tee.runtime_events()] == names
    assert again.instance_id == result.instance_id
    assert (work / "app.pid").read_text() == pid


def test_kms_env_pubkey_over_https(lab_kms: tuple[LabKms, str]) -> None:
    kms, url = lab_kms
    app_id = b"\x42" * 20
    with httpx.Client(verify=False) as http:
        r = http.post(f"{url}/prpc/GetAppEnvEncryptPubKey?json", json={"app_id": app_id.hex()})
    doc = r.json()
    pub = bytes.fromhex(doc["public_key"])
    msg = b"dstack-env-encrypt-pubkey:" + app_id + doc["timestamp"].to_bytes(8, "big") + pub
    assert kdf.recover_k256_pub(keccak256(msg), bytes.fromhex(doc["signature_v1"])) == (
        kms.root.k256_pub
    )


@pytest.mark.parametrize("problem", ["wrong-key", "tampered", "truncated"])
def test_bad_env_fails_boot_and_writes_nothing(
    tmp_path: Path, lab_kms: tuple[LabKms, str], tee: SimTee, problem: str
) -> None:
    kms, url = lab_kms
    shared = make_shared(tmp_path, url, compose_doc())
    app_id = app_id_of(shared)
    blob = encrypt_for(
        kms, app_id if problem != "wrong-key" else b"\x01" * 20, [EnvVar("API_KEY", "v")]
    )
    if problem == "tampered":
        blob = blob[:-1] + bytes([blob[-1] ^ 1])
    if problem == "truncated":
        blob = blob[:40]
    (shared / ".encrypted-env").write_bytes(blob)
    work = tmp_path / "work"
    with pytest.raises(BootError, match="boot failed at env") as err:
        asyncio.run(boot(shared, work, tee, None).run())
    assert ("truncated" if problem == "truncated" else "does not decrypt") in str(err.value)
    assert not list((work / ".host-shared").glob("*decrypted-env*"))


def test_key_provider_id_pin(tmp_path: Path, lab_kms: tuple[LabKms, str], tee: SimTee) -> None:
    _, url = lab_kms
    shared = make_shared(tmp_path, url, compose_doc(key_provider_id="30" * 10))
    with pytest.raises(BootError, match="key_provider_id"):
        asyncio.run(boot(shared, tmp_path / "work", tee, None).run())


def test_kms_refuses_quotes_from_another_root(
    tmp_path: Path, kms_root: KmsRoot, sim_pki: SimPki, tee: SimTee
) -> None:
    other = SimPki.load_or_create(tmp_path / "other-pki")
    kms = LabKms(
        root=kms_root,
        verifier=QuoteVerifier(root_ca_der=other.root_ca_der),
        collateral=lambda quote: other.collateral(int(time.time())),
    )
    port = free_port()
    with serve_tcp(create_kms_app(kms), port, kms_ssl_context(kms)):
        shared = make_shared(tmp_path, f"https://127.0.0.1:{port}", compose_doc())
        with pytest.raises(BootError, match=r"attestation rejected \(quote_invalid\)"):
            asyncio.run(boot(shared, tmp_path / "work", tee, None).run())


def test_none_provider_boot(tmp_path: Path, tee: SimTee) -> None:
    shared = make_shared(tmp_path, "https://unused", compose_doc(key_provider="none"))
    (shared / ".encrypted-env").write_bytes(os.urandom(100))  # ignored without an env key
    (shared / ".user-config").write_bytes(b"opaque")
    result = asyncio.run(boot(shared, tmp_path / "work", tee, None).run())
    assert (tmp_path / "work" / "user_config").read_bytes() == b"opaque"
    names = [e.name for e in tee.runtime_events()]
    assert "os-image-hash" not in names and names[-1] == "system-ready"
    assert json.loads(dict((e.name, e.payload) for e in tee.runtime_events())["key-provider"]) == {
        "name": "none",
        "id": "",
    }
    assert result.env == {} and result.state.keys.env_crypt_key == b""


def test_local_provider_is_refused_clearly(tmp_path: Path, tee: SimTee) -> None:
    shared = make_shared(tmp_path, "https://unused", compose_doc(key_provider="local"))
    with pytest.raises(BootError, match="SGX sealing"):
        asyncio.run(boot(shared, tmp_path / "work", tee, None).run())


def test_boot_refuses_a_tee_measured_for_another_app(tmp_path: Path, tee: SimTee) -> None:
    first = make_shared(tmp_path / "a", "https://unused", compose_doc(key_provider="none"))
    asyncio.run(boot(first, tmp_path / "w1", tee, None).run())
    second = make_shared(
        tmp_path / "b", "https://unused", compose_doc(key_provider="none", name="other")
    )
    with pytest.raises(BootError, match="measured for another boot"):
        asyncio.run(boot(second, tmp_path / "w2", tee, None).run())


def test_hostile_host_shared_fails_boot(tmp_path: Path, tee: SimTee) -> None:
    shared = make_shared(tmp_path, "https://unused", compose_doc(key_provider="none"))
    os.symlink("/etc/hostname", shared / ".encrypted-env")
    with pytest.raises(BootError, match="host-shared .*symlink"):
        asyncio.run(boot(shared, tmp_path / "work", tee, None).run())
    assert tee.runtime_events() == ()  # nothing measured before the inputs were valid


def test_mr_config_id_binds_the_td_to_its_app(tmp_path: Path, sim_pki: SimPki) -> None:
    from gateway.tee.sim import SimImage

    shared = make_shared(tmp_path, "https://unused", compose_doc(key_provider="none"))
    compose_hash = AppCompose.parse((shared / "app-compose.json").read_bytes()).hash
    good = SimTee(
        sim_pki,
        tmp_path / "tee1",
        SimImage.named("x", mr_config_id=b"\x01" + compose_hash + bytes(15)),
    )
    asyncio.run(boot(shared, tmp_path / "w1", good, None).run())
    other = SimTee(
        sim_pki, tmp_path / "tee2", SimImage.named("x", mr_config_id=b"\x01" + bytes(47))
    )
    with pytest.raises(BootError, match="boot failed at verify: MRCONFIGID does not match"):
        asyncio.run(boot(shared, tmp_path / "w2", other, None).run())
    assert "key-provider" not in [e.name for e in other.runtime_events()]
