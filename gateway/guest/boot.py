"""``guest boot``: from the host-shared folder to a running, measured app.

Order (dstack v0.5.11, ``dstack-util setup`` then ``app-compose.sh``):

1. read and validate the host-shared folder (only app-compose is trusted);
2. measure: ``system-preparing, app-id, compose-hash, instance-id, boot-mr-done``;
3. ``boot.progress "requesting app keys"``; get keys from the key provider; for the KMS,
   ``os-image-hash``; check the ``key_provider_id`` pin; ``key-provider``; write
   ``.appkeys.json``;
4. ``storage-fs``; notify ``instance.info``; ``system-ready``;
5. decrypt ``.encrypted-env`` (only ``allowed_envs``), write ``.decrypted-env`` and
   ``.decrypted-env.json`` (both or neither);
6. run ``pre_launch_script``, start the app, ``boot.progress "done"``.

Idempotent on retry within one boot: every event is emitted through :meth:`Boot._emit`,
which skips an event already at that position in RTMR3's log and refuses one that differs
(a different app was measured: reboot); the instance seed and keys are reused from the work
dir; finished steps are recorded in ``boot-state.json`` and not repeated. Any failure sends
``boot.error`` and raises :class:`BootError`; files are written atomically (temp + rename),
so nothing is left half-written.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.guest import envcrypt, hostshared, identity
from gateway.guest.files import write_atomic
from gateway.guest.hostapi import HostApi
from gateway.guest.identity import AppCompose, InstanceInfo, KeyProviderKind
from gateway.guest.keys import AppKeys, KeyProvider, KeyProviderError, KeyRequest
from gateway.guest.runner import AppRunner, RunnerError
from gateway.guest.service import GuestState
from gateway.protocol.errors import CodecError
from gateway.protocol.tdx_quote import parse_tdx_quote
from gateway.tee.base import RuntimeEvent, TeeBackend, TeeError

__all__ = ["Boot", "BootError", "BootResult", "load_state"]

logger = logging.getLogger(__name__)

HOST_SHARED_COPY = ".host-shared"
APPKEYS = ".appkeys.json"
STATE = "boot-state.json"
GUEST_STATE = "guest-state.json"


class BootError(RuntimeError):
    """The boot failed at ``step``; the message says why and what to do."""

    def __init__(self, step: str, message: str) -> None:
        self.step = step
        super().__init__(f"boot failed at {step}: {message}")


@dataclass(frozen=True, slots=True)
class BootResult:
    """What the agent needs after a boot (also saved as ``guest-state.json``)."""

    state: GuestState
    app_id: bytes
    instance_id: bytes
    env: Mapping[str, str]
    skipped_envs: tuple[str, ...] = field(default=())


@dataclass
class Boot:
    """One boot of one CVM. Dependencies are passed in; nothing reads globals."""

    host_shared: Path
    work_dir: Path
    tee: TeeBackend
    key_provider: Callable[[AppCompose], KeyProvider]
    runner: AppRunner | None = None
    host_api: HostApi | None = None
    host_api_from_sys_config: bool = False  # dstack: notify host_api_url from .sys-config.json
    rng: Callable[[int], bytes] = os.urandom
    _cursor: int = 0
    _done: set[str] = field(default_factory=set)

    # --- helpers --------------------------------------------------------------------------

    def _emit(self, event: RuntimeEvent) -> None:
        existing = self.tee.runtime_events()
        if self._cursor < len(existing):
            if existing[self._cursor] != event:
                raise BootError(
                    "measure",
                    f"RTMR3 already holds {existing[self._cursor].name!r} at position "
                    f"{self._cursor} where this boot measures {event.name!r}: this CVM was "
                    "measured for another boot; reboot it",
                )
            logger.info("event %s already measured (retry)", event.name)
        else:
            try:
                self.tee.emit_event(event)
            except TeeError as exc:
                raise BootError("measure", f"cannot extend RTMR3: {exc}") from None
            logger.info("measured %s (%d bytes)", event.name, len(event.payload))
        self._cursor += 1

    async def _progress(self, text: str) -> None:
        logger.info("boot progress: %s", text)
        if self.host_api is not None:
            await self.host_api.notify("boot.progress", text)

    def _load_done(self) -> dict[str, object]:
        try:
            doc = json.loads((self.work_dir / STATE).read_bytes())
        except FileNotFoundError:
            return {}
        except json.JSONDecodeError:
            raise BootError("state", f"{self.work_dir / STATE} is corrupt; remove it") from None
        self._done = set(doc.get("done", []))
        return dict(doc)

    def _mark(self, step: str, **extra: object) -> None:
        self._done.add(step)
        doc = self._load_state_doc()
        doc["done"] = sorted(self._done)
        doc.update(extra)
        write_atomic(self.work_dir / STATE, json.dumps(doc).encode())

    def _load_state_doc(self) -> dict[str, object]:
        try:
            return dict(json.loads((self.work_dir / STATE).read_bytes()))
        except FileNotFoundError:
            return {}

    # --- the flow -------------------------------------------------------------------------

    async def run(self) -> BootResult:
        try:
            return await self._run()
        except BootError as exc:
            logger.error("%s", exc)
            if self.host_api is not None:
                await self.host_api.notify("boot.error", str(exc))
            raise

    async def _run(self) -> BootResult:
        self.work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        state = self._load_done()
        self._cursor = 0

        # 1. host-shared
        try:
            shared = hostshared.read_host_shared(self.host_shared)
            compose = AppCompose.parse(shared.app_compose)
            info = InstanceInfo.parse(shared.instance_info)
        except (hostshared.HostSharedError, identity.ComposeError) as exc:
            raise BootError("host-shared", str(exc)) from None
        url = shared.sys_config.host_api_url
        if self.host_api is None and self.host_api_from_sys_config and url:
            if url.startswith("vsock://"):  # the host is hostile: it may only name a vsock port
                self.host_api = HostApi(url)
            else:
                logger.warning("ignoring host_api_url %r: only vsock:// is accepted", url[:80])
        logger.info(
            "host-shared read: %s; app %r, key provider %s",
            ", ".join(shared.files),
            compose.name,
            compose.key_provider.value,
        )
        copy = self.work_dir / HOST_SHARED_COPY
        copy.mkdir(exist_ok=True, mode=0o700)
        write_atomic(copy / hostshared.APP_COMPOSE, shared.app_compose, 0o644)
        write_atomic(copy / ".sys-config.json", shared.sys_config_raw, 0o644)
        if shared.user_config:  # opaque to the shim; apps read it as upstream's user_config
            write_atomic(copy / ".user-config", shared.user_config, 0o644)
            link = self.work_dir / "user_config"
            if not link.is_symlink():
                link.symlink_to(Path(HOST_SHARED_COPY) / ".user-config")

        # 2. measure the identity
        seed_hex = state.get("instance_id_seed")
        seed = bytes.fromhex(seed_hex) if isinstance(seed_hex, str) else self.rng(20)
        seed, instance_id = identity.instance_id_for(compose, info, seed)
        self._mark("host-shared", instance_id_seed=seed.hex())
        app_id = identity.app_id_for(compose, info)
        for event in identity.boot_events_measure(app_id, compose.hash, instance_id):
            self._emit(event)
        logger.info("app_id %s, compose_hash %s", app_id.hex(), compose.hash.hex())

        # 3. keys
        keys = await self._keys(compose, shared, app_id)
        if keys.provider is KeyProviderKind.KMS:
            self._emit(RuntimeEvent("os-image-hash", keys.os_image_hash))
        self._check_mr_config_id(compose, app_id, keys)
        if compose.key_provider_id and compose.key_provider_id != keys.provider_id:
            raise BootError(
                "keys",
                "the key provider's id does not match key_provider_id pinned in app-compose "
                "(a different KMS answered); check kms_urls",
            )
        self._emit(
            RuntimeEvent(
                "key-provider", identity.key_provider_payload(keys.provider, keys.provider_id)
            )
        )
        write_atomic(self.work_dir / APPKEYS, keys.to_json())

        # 4. storage, instance info, ready
        self._emit(RuntimeEvent("storage-fs", compose.storage_fs.encode()))
        if self.host_api is not None and "instance-info" not in self._done:
            notify_info = InstanceInfo(
                instance_id_seed=seed, instance_id=instance_id, app_id=app_id
            )
            await self.host_api.notify("instance.info", notify_info.to_json().decode())
        self._mark("instance-info")
        self._emit(RuntimeEvent("system-ready", b""))

        # 5. env
        parsed = self._env(compose, shared.encrypted_env, keys, copy)

        # 6. app
        result = BootResult(
            state=GuestState(
                compose=compose,
                keys=keys,
                vm_config=shared.sys_config.vm_config,
                os_image_hash=keys.os_image_hash or shared.sys_config.os_image_hash,
            ),
            app_id=app_id,
            instance_id=instance_id,
            env=parsed.env,
            skipped_envs=parsed.skipped,
        )
        write_atomic(self.work_dir / GUEST_STATE, _state_json(result.state))
        if compose.docker_compose_file is not None:
            write_atomic(
                self.work_dir / "docker-compose.yaml", compose.docker_compose_file.encode(), 0o644
            )
        if self.runner is not None:
            await self._start_app(compose, parsed.env)
        await self._progress("done")
        return result

    def _check_mr_config_id(self, compose: AppCompose, app_id: bytes, keys: AppKeys) -> None:
        """The VMM may bind the TD to its app with MRCONFIGID; all zeros means unbound."""
        try:
            report = parse_tdx_quote(self.tee.get_quote(bytes(64))).report
        except (TeeError, CodecError) as exc:
            raise BootError("verify", f"cannot read MRCONFIGID from a quote: {exc}") from None
        try:
            identity.check_mr_config_id(
                report.mr_config_id, compose.hash, app_id, keys.provider, keys.provider_id
            )
        except identity.ComposeError as exc:
            raise BootError("verify", str(exc)) from None

    async def _keys(
        self, compose: AppCompose, shared: hostshared.HostShared, app_id: bytes
    ) -> AppKeys:
        path = self.work_dir / APPKEYS
        if path.exists():
            logger.info("reusing the app keys obtained earlier in this boot")
            try:
                keys = AppKeys.from_json(path.read_bytes())
            except (ValueError, KeyError) as exc:
                raise BootError("keys", f"{path} is corrupt ({exc}); remove it") from None
            if keys.provider is not compose.key_provider:
                raise BootError("keys", f"{path} is for another key provider; remove it")
            return keys
        await self._progress("requesting app keys")
        provider = self.key_provider(compose)
        try:
            keys = await provider.get_app_keys(
                KeyRequest(
                    app_id=app_id, compose=compose, sys_config=shared.sys_config, tee=self.tee
                )
            )
        except KeyProviderError as exc:
            raise BootError("keys", str(exc)) from None
        if not keys.disk_crypt_key:
            raise BootError("keys", "the key provider returned no disk key")
        return keys

    def _env(
        self, compose: AppCompose, blob: bytes, keys: AppKeys, out_dir: Path
    ) -> envcrypt.ParsedEnv:
        if blob and not keys.env_crypt_key:
            logger.warning(
                ".encrypted-env is present but key provider %s gives no env key: ignored",
                keys.provider.value,
            )
        if blob and keys.env_crypt_key:
            try:
                parsed = envcrypt.filter_env(
                    envcrypt.decrypt_env(keys.env_crypt_key, blob), compose.allowed_envs
                )
            except envcrypt.EnvError as exc:
                raise BootError("env", str(exc)) from None
        else:
            parsed = envcrypt.ParsedEnv(env={}, skipped=())
        for name in parsed.skipped:
            logger.warning("env %r is not in allowed_envs: dropped", name[:64])
        logger.info("env: %d variables (%s)", len(parsed.env), ", ".join(parsed.env))
        # both files or neither: write temporaries first, then rename both
        files = {
            ".decrypted-env": envcrypt.render_env_file(parsed.env).encode(),
            ".decrypted-env.json": envcrypt.render_env_json(parsed.env),
        }
        tmps = []
        try:
            for name, data in files.items():
                tmp = out_dir / f".{name}.tmp"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
                tmps.append((tmp, out_dir / name))
            for tmp, final in tmps:
                os.replace(tmp, final)
        finally:
            for tmp, _ in tmps:
                tmp.unlink(missing_ok=True)
        return parsed

    async def _start_app(self, compose: AppCompose, env: Mapping[str, str]) -> None:
        assert self.runner is not None
        try:
            if "pre-launch" not in self._done:
                if compose.pre_launch_script:
                    await self._progress("pre-launch")
                await self.runner.pre_launch(compose, env, self.work_dir)
                self._mark("pre-launch")
            await self._progress("starting containers")
            await self.runner.start(compose, env, self.work_dir)
        except RunnerError as exc:
            raise BootError("app", str(exc)) from None


def _state_json(state: GuestState) -> bytes:
    return json.dumps(
        {
            "vm_config": state.vm_config,
            "os_image_hash": state.os_image_hash.hex(),
            "cloud_vendor": state.cloud_vendor,
            "cloud_product": state.cloud_product,
        }
    ).encode()


def load_state(work_dir: Path) -> GuestState:
    """The state a finished boot left in ``work_dir`` (for ``guest agent``)."""
    try:
        compose = AppCompose.parse(
            (work_dir / HOST_SHARED_COPY / hostshared.APP_COMPOSE).read_bytes()
        )
        keys = AppKeys.from_json((work_dir / APPKEYS).read_bytes())
        doc = json.loads((work_dir / GUEST_STATE).read_bytes())
    except FileNotFoundError as exc:
        raise BootError("agent", f"{exc.filename} is missing: run 'guest boot' first") from None
    except (ValueError, KeyError) as exc:
        raise BootError("agent", f"the boot state in {work_dir} is corrupt: {exc}") from None
    return GuestState(
        compose=compose,
        keys=keys,
        vm_config=str(doc.get("vm_config", "")),
        os_image_hash=bytes.fromhex(str(doc.get("os_image_hash", ""))),
        cloud_vendor=str(doc.get("cloud_vendor", "")),
        cloud_product=str(doc.get("cloud_product", "")),
    )


def kms_root_spki(keys: AppKeys) -> bytes:
    """SPKI DER of the KMS root CA (the ``key-provider`` id for KMS)."""
    cert = x509.load_pem_x509_certificate(keys.ca_cert.encode())
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
