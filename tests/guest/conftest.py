"""Fixtures for the guest tests: a TEE backend, a booted guest state, an agent on a socket."""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from aiohttp import web

from gateway.attest.quote import VerifiedQuote, verify_quote
from gateway.guest import identity, kdf
from gateway.guest.identity import AppCompose, InstanceInfo, KeyProviderKind
from gateway.guest.keys import AppKeys, app_keys_from_seed
from gateway.guest.service import AgentService, GuestState
from gateway.tee.base import RuntimeEvent
from gateway.tee.sim import SimTee
from gateway.tee.sim_pki import SimPki

DATA = Path(__file__).resolve().parents[1] / "data"
VECTORS = json.loads((DATA / "guest" / "signature_chain.json").read_text())
KMS_ROOT_SCALAR = b"KMS-root-test-key-do-not-use!!!\x01"


@pytest.fixture(scope="session")
def sim_pki(tmp_path_factory: pytest.TempPathFactory) -> SimPki:
    """One simulated-TDX PKI for the session (its root is what verifiers trust)."""
    return SimPki.load_or_create(tmp_path_factory.mktemp("sim-pki"))


def verify(quote: bytes, pki: SimPki) -> VerifiedQuote:
    """Verify a quote with dcap-qvl under the simulator's root (as a relying party would)."""
    now = int(time.time())
    return verify_quote(quote, pki.collateral(now), root_ca_der=pki.root_ca_der, now=now)


COMPOSE = json.dumps(
    {
        "manifest_version": 2,
        "name": "sdk-test-app",
        "runner": "docker-compose",
        "docker_compose_file": "services: {}",
        "key_provider": "kms",
        "allowed_envs": ["API_KEY"],
        "public_tcbinfo": False,
    }
).encode()


def kms_like_keys() -> AppKeys:
    """App keys as the KMS of the upstream vectors would issue for their app id."""
    app_id = bytes.fromhex(VECTORS["app_id"])
    root = kdf.k256_key(KMS_ROOT_SCALAR)
    app_scalar = kdf.derive_key(KMS_ROOT_SCALAR, [app_id, b"app-key"])
    base = app_keys_from_seed(hashlib.sha256(b"test seed").digest(), KeyProviderKind.KMS)
    sig = kdf.kms_issued_signature(root, app_id, kdf.compressed_k256_pub(kdf.k256_key(app_scalar)))
    return AppKeys(
        disk_crypt_key=base.disk_crypt_key,
        env_crypt_key=b"\x07" * 32,
        k256_key=app_scalar,
        k256_signature=sig,
        gateway_app_id="any",
        ca_cert=base.ca_cert,
        ca_key=base.ca_key,
        provider=KeyProviderKind.KMS,
        provider_id=b"\x30\x59",
    )


@pytest.fixture
def tee(sim_pki: SimPki, tmp_path: Path) -> SimTee:
    return SimTee(sim_pki, tmp_path / "tee")


@pytest.fixture
def service(tee: SimTee) -> AgentService:
    compose = AppCompose.parse(COMPOSE)
    app_id = bytes.fromhex(VECTORS["app_id"])
    info = InstanceInfo(instance_id_seed=b"\x05" * 20, app_id=app_id)
    _, instance_id = identity.instance_id_for(compose, info, b"\x00" * 20)
    for ev in identity.boot_events_measure(app_id, compose.hash, instance_id):
        tee.emit_event(ev)
    keys = kms_like_keys()
    tee.emit_event(
        RuntimeEvent("key-provider", identity.key_provider_payload(keys.provider, keys.provider_id))
    )
    tee.emit_event(RuntimeEvent("storage-fs", b"ext4"))
    tee.emit_event(RuntimeEvent("system-ready", b""))
    state = GuestState(
        compose=compose,
        keys=keys,
        vm_config='{"os_image_hash":"aa","cpu_count":1}',
        os_image_hash=b"\xaa",
    )
    return AgentService(state, tee)


@contextmanager
def serve_unix(app: web.Application, path: Path) -> Iterator[None]:
    """Run ``app`` on a unix socket in a thread with its own event loop."""
    with _serve(app, lambda runner: web.UnixSite(runner, str(path))):
        yield


@contextmanager
def serve_tcp(
    app: web.Application, port: int, ssl_context: ssl.SSLContext | None = None
) -> Iterator[None]:
    """Run ``app`` on 127.0.0.1:``port`` (TLS if a context is given) in a thread."""
    with _serve(app, lambda r: web.TCPSite(r, "127.0.0.1", port, ssl_context=ssl_context)):
        yield


@contextmanager
def _serve(app: web.Application, site: Callable[[web.AppRunner], web.BaseSite]) -> Iterator[None]:
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    runner = web.AppRunner(app)

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(site(runner).start())
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=run, name="test server", daemon=True)
    thread.start()
    assert ready.wait(10), "server did not start"
    try:
        yield
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
