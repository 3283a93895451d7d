"""``gateway guest boot|agent|simulate``: the shim's commands.

- ``boot``: run the boot flow once (idempotent; safe to retry) and exit.
- ``agent``: serve the guest agent from a finished boot's work dir.
- ``simulate``: a whole simulated CVM on a laptop: simulated TDX, the lab KMS, a boot from
  the given (or a default) host-shared folder, then the agent on ``--socket``. Point the
  dstack SDK at it with ``DSTACK_SIMULATOR_ENDPOINT=<socket>``; its quotes verify under the
  simulator root written to ``<state-dir>/sim-root-ca.pem``.

Exit codes: 0 success, 1 the boot failed, 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.attest.eventlog import replay_boot_rtmrs
from gateway.guest import ccel, evidence
from gateway.guest.agent import create_agent_app, create_tappd_app
from gateway.guest.boot import Boot, BootError, load_state
from gateway.guest.guestapi import (
    GUEST_API_VSOCK_PORT,
    VsockSite,
    create_guest_api_app,
    vsock_socket,
)
from gateway.guest.hostapi import HostApi
from gateway.guest.identity import AppCompose, KeyProviderKind
from gateway.guest.keys import KeyProvider, LocalKeyProvider, NoneKeyProvider
from gateway.guest.kms_client import KmsKeyProvider, kms_signer_for
from gateway.guest.public import create_public_app
from gateway.guest.registrar import Registrar
from gateway.guest.runner import AppRunner, DockerComposeRunner, LocalProcessRunner
from gateway.guest.service import AgentService, GuestState
from gateway.protocol.attestation import TdxEvent
from gateway.tee.base import TeeBackend
from gateway.tee.sim import SimImage, SimTee
from gateway.tee.sim_pki import SimPki
from gateway.util.logs import setup_logging
from gateway.util.tasks import spawn

__all__ = ["add_arguments", "run"]

logger = logging.getLogger("gateway.guest")

DEFAULT_COMPOSE = {
    "manifest_version": 2,
    "name": "dstack-sim-app",
    "runner": "bash",
    "bash_script": "",
    "key_provider": "kms",
    "allowed_envs": [],
    "public_tcbinfo": True,
    "public_sysinfo": True,
    "storage_fs": "ext4",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    sub = parser.add_subparsers(dest="guest_command", metavar="SUBCOMMAND", required=True)

    def tee_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--tee", choices=["sim", "tdx"], default="sim", help="TEE backend")
        p.add_argument("--sim-dir", type=Path, help="simulated TDX state (pki/ and tee/)")

    boot = sub.add_parser("boot", help="boot once from the host-shared folder")
    boot.add_argument("--host-shared", type=Path, required=True)
    boot.add_argument("--work-dir", type=Path, required=True)
    boot.add_argument("--runner", choices=["docker", "local", "none"], default="docker")
    boot.add_argument(
        "--host-api",
        help="host API URL (vsock://2:PORT/api, http://..., unix:PATH), or 'sys-config' to use "
        "host_api_url from .sys-config.json as dstack does (default: no notifications)",
    )
    tee_args(boot)

    agent = sub.add_parser("agent", help="serve the guest agent after a boot")
    agent.add_argument("--work-dir", type=Path, required=True)
    agent.add_argument("--socket", type=Path, default=Path("/var/run/dstack.sock"))
    agent.add_argument("--tappd-socket", type=Path)
    agent.add_argument("--public-port", type=int, help="public HTTP port (dstack: 8090)")
    agent.add_argument("--public-host", default="0.0.0.0")
    agent.add_argument("--guest-api-socket", type=Path, help="unix socket when vsock is absent")
    agent.add_argument(
        "--runner", choices=["docker", "none"], default="none", help="for ListContainers"
    )
    agent.add_argument(
        "--power-off",
        action="store_true",
        help="Guest API Shutdown powers the VM off (systemctl poweroff), as dstack does; "
        "without it, Shutdown only stops the agent",
    )
    agent.add_argument(
        "--register",
        action="store_true",
        help="also run the gateway registration client (as `gateway guest-register "
        "--boot-dir WORK_DIR`) when app-compose enables the gateway",
    )
    agent.add_argument(
        "--register-opts",
        default="",
        help="extra `gateway guest-register` options as one shell-quoted string, "
        'e.g. "--gateway-app-id HEX --backend wireguard-go"',
    )
    tee_args(agent)

    sim = sub.add_parser("simulate", help="a simulated CVM serving the guest agent on a socket")
    sim.add_argument("--socket", type=Path, required=True)
    sim.add_argument("--host-shared", type=Path, help="host-shared folder (default: a demo app)")
    sim.add_argument("--state-dir", type=Path, help="default: <socket dir>/.dstack-sim")
    sim.add_argument("--tappd-socket", type=Path)
    sim.add_argument("--public-port", type=int)


SIM_IMAGE = "gateway-dstack-sim"


def sim_tee(pki: SimPki, state_dir: Path) -> tuple[SimTee, tuple[TdxEvent, ...]]:
    """A simulated TD whose RTMR0-2 replay from a (simulated) firmware log, as a real
    TD's do from its CCEL; returns the backend and that boot log."""
    boot_log = ccel.sim_firmware_log(SIM_IMAGE)
    r0, r1, r2 = replay_boot_rtmrs(boot_log)
    base = SimImage.named(SIM_IMAGE)
    image = SimImage(name=SIM_IMAGE, mr_td=base.mr_td, rt_mr0=r0, rt_mr1=r1, rt_mr2=r2)
    return SimTee(pki, state_dir, image), boot_log


def _tee(args: argparse.Namespace, default_dir: Path) -> tuple[TeeBackend, tuple[TdxEvent, ...]]:
    if args.tee == "tdx":
        from gateway.tee.tdx import TdxTee

        return TdxTee(), evidence.read_boot_log(evidence.CCEL_PATH)
    sim_dir = args.sim_dir or default_dir
    return sim_tee(SimPki.load_or_create(sim_dir / "pki"), sim_dir / "tee")


def _provider(compose: AppCompose, kms_urls: tuple[str, ...] | None = None) -> KeyProvider:
    if compose.key_provider is KeyProviderKind.KMS:
        return KmsKeyProvider(urls=kms_urls)
    if compose.key_provider is KeyProviderKind.NONE:
        return NoneKeyProvider()
    return LocalKeyProvider()


def _runner(kind: str) -> AppRunner | None:
    if kind == "docker":
        return DockerComposeRunner()
    if kind == "local":
        return LocalProcessRunner()
    return None


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)  # handlers only set a flag
    return stop


async def _serve(
    svc: AgentService,
    runner: AppRunner | None,
    stop: asyncio.Event,
    *,
    socket_path: Path,
    tappd_socket: Path | None,
    public: tuple[str, int] | None,
    guest_api_socket: Path | None,
    use_vsock: bool = True,
    on_ready: Callable[[], None] = lambda: None,
    extra: list[web.AppRunner] | None = None,
    power_off: bool = False,
) -> None:
    runners: list[web.AppRunner] = list(extra or [])

    async def shutdown() -> None:
        logger.info("shutdown requested through the guest API")
        stop.set()
        if power_off:  # dstack: "shutdown.progress powering off", then systemctl poweroff
            proc = await asyncio.create_subprocess_exec("systemctl", "poweroff")
            await proc.wait()

    async def start(app: web.Application, make: Callable[[web.AppRunner], web.BaseSite]) -> None:
        r = web.AppRunner(app, access_log=None)
        await r.setup()
        runners.append(r)
        await make(r).start()

    def unix(path: Path) -> Callable[[web.AppRunner], web.BaseSite]:
        with contextlib.suppress(FileNotFoundError):
            if path.is_socket():
                path.unlink()
        path.parent.mkdir(parents=True, exist_ok=True)
        return lambda r: web.UnixSite(r, str(path))

    try:
        await start(create_agent_app(svc), unix(socket_path))
        os.chmod(socket_path, 0o777)  # any process in the CVM may ask, as upstream
        if tappd_socket is not None:
            await start(create_tappd_app(svc), unix(tappd_socket))
            os.chmod(tappd_socket, 0o777)
        if public is not None:
            host, port = public
            await start(create_public_app(svc, runner), lambda r: web.TCPSite(r, host, port))
        guest_api = create_guest_api_app(svc, runner, shutdown)
        if guest_api_socket is not None:  # explicit (the lab): a unix socket
            await start(guest_api, unix(guest_api_socket))
        elif use_vsock and (vsock := vsock_socket()) is not None:
            await start(guest_api, lambda r: VsockSite(r, vsock))
            logger.info("guest API on vsock port %d", GUEST_API_VSOCK_PORT)
        else:
            logger.warning("no vsock here and no --guest-api-socket: the Guest API is off")
        spawn(svc.refresh_app_cert(), name="guest-app-cert")
        logger.info("guest agent serving on %s", socket_path)
        on_ready()
        await stop.wait()
    finally:
        for r in reversed(runners):
            await r.cleanup()
        if runner is not None:
            await runner.stop()


async def _boot(args: argparse.Namespace) -> int:
    tee, _ = _tee(args, args.work_dir / "sim")
    boot = Boot(
        host_shared=args.host_shared,
        work_dir=args.work_dir,
        tee=tee,
        key_provider=_provider,
        runner=_runner(args.runner),
        host_api=HostApi(args.host_api)
        if args.host_api and args.host_api != "sys-config"
        else None,
        host_api_from_sys_config=args.host_api == "sys-config",
    )
    try:
        result = await boot.run()
    except BootError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    logger.info("boot done: app %s instance %s", result.app_id.hex(), result.instance_id.hex())
    return 0


def _registrar(args: argparse.Namespace) -> Registrar | None:
    """The registration client for ``agent --register`` (``None``: gateway not enabled).

    Built exactly as ``gateway guest-register --boot-dir WORK_DIR`` would be (URLs, pinned
    gateway app id, port policy and keys from the finished boot), with the agent's TEE, its
    status and cache under ``WORK_DIR/gateway``; ``--register-opts`` adds or overrides flags.
    """
    from gateway.guest import register_cmd

    parser = argparse.ArgumentParser(prog="gateway guest agent --register-opts")
    register_cmd.add_arguments(parser)
    argv = ["--work-dir", str(args.work_dir / "gateway"), "--boot-dir", str(args.work_dir)]
    argv += ["--tee", args.tee]
    if args.tee == "sim":
        argv += ["--sim-dir", str(args.sim_dir or args.work_dir / "sim")]
    argv += shlex.split(args.register_opts)
    try:
        return register_cmd.build(parser.parse_args(argv))
    except register_cmd.Disabled as exc:
        logger.info("%s", exc)
        return None


async def _agent(args: argparse.Namespace) -> int:
    try:
        state = load_state(args.work_dir)
    except BootError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    registrar = None
    if args.register:
        from gateway.guest.register_cmd import UsageError

        try:
            registrar = _registrar(args)
        except (UsageError, OSError, ValueError) as exc:
            sys.stderr.write(f"error: --register: {exc}\n")
            return 2
    if registrar is not None:
        registrar.start()  # in the background: the agent never waits for a gateway
    try:
        return await _serve_agent(args, state)
    finally:
        if registrar is not None:
            await registrar.close()


async def _serve_agent(args: argparse.Namespace, state: GuestState) -> int:
    tee, boot_log = _tee(args, args.work_dir / "sim")
    stop = _stop_event()
    svc = AgentService(
        state, tee, kms_signer=kms_signer_for(state.keys, state.vm_config), boot_log=boot_log
    )
    await _serve(
        svc,
        _runner(args.runner),
        stop,
        socket_path=args.socket,
        tappd_socket=args.tappd_socket,
        public=(args.public_host, args.public_port) if args.public_port else None,
        guest_api_socket=args.guest_api_socket,
        power_off=args.power_off,
    )
    return 0


def _prepare_host_shared(src: Path | None, dst: Path, kms_url: str) -> None:
    """Copy the developer's folder (or a demo app); point the sys-config at the lab KMS."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    sys_config: dict[str, object] = {}
    if src is not None:
        for name in ("app-compose.json", ".instance_info", ".encrypted-env", ".user-config"):
            if (src / name).is_file() and not (src / name).is_symlink():
                shutil.copyfile(src / name, dst / name)
        if (src / ".sys-config.json").is_file():
            with contextlib.suppress(json.JSONDecodeError, RecursionError):
                loaded = json.loads((src / ".sys-config.json").read_text())
                sys_config = loaded if isinstance(loaded, dict) else {}
    if not (dst / "app-compose.json").exists():
        (dst / "app-compose.json").write_text(json.dumps(DEFAULT_COMPOSE, indent=4))
    sys_config["kms_urls"] = [kms_url]  # unmeasured by design: the simulator's own KMS
    sys_config.setdefault("gateway_urls", [])
    sys_config.setdefault(
        "vm_config", json.dumps({"os_image_hash": "00" * 32, "cpu_count": os.cpu_count() or 1})
    )
    (dst / ".sys-config.json").write_text(json.dumps(sys_config))


async def _simulate(args: argparse.Namespace) -> int:
    from gateway.attest.quote import QuoteVerifier
    from gateway.guest import envcrypt
    from gateway.guest.kms_lab import KmsRoot, LabKms, create_kms_app, kms_ssl_context
    from gateway.tee.sim_pccs import create_sim_pccs_app

    state = args.state_dir or args.socket.parent / ".dstack-sim"
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    pki = SimPki.load_or_create(state / "pki")
    (state / "sim-root-ca.pem").write_text(pki.root_ca_pem)
    for stale in ("tee", "work"):  # every start is a fresh boot of the simulated CVM
        if (state / stale).exists():
            shutil.rmtree(state / stale)
    tee, boot_log = sim_tee(pki, state / "tee")
    kms = LabKms(
        root=KmsRoot.load_or_create(state / "kms"),  # stable: the app's keys survive restarts
        verifier=QuoteVerifier(root_ca_der=pki.root_ca_der),
        collateral=lambda quote: pki.collateral(int(time.time())),
    )
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    kms_url = f"https://127.0.0.1:{listener.getsockname()[1]}"
    kms_runner = web.AppRunner(create_kms_app(kms), access_log=None)
    await kms_runner.setup()
    await web.SockSite(kms_runner, listener, ssl_context=kms_ssl_context(kms)).start()
    logger.info("lab KMS on %s", kms_url)
    # a PCCS for the simulated PKI, so that anyone can verify this CVM's quotes
    pccs_sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    pccs_sock.bind(("127.0.0.1", 0))
    pccs_sock.listen(64)
    pccs_url = f"http://127.0.0.1:{pccs_sock.getsockname()[1]}"
    pccs_runner = web.AppRunner(create_sim_pccs_app(pki), access_log=None)
    await pccs_runner.setup()
    await web.SockSite(pccs_runner, pccs_sock).start()
    (state / "pccs-url.txt").write_text(pccs_url + "\n")
    logger.info(
        "quotes verify with: gateway attest verify --quote FILE --root-ca %s --pccs-url %s "
        "--cache-dir %s",
        state / "sim-root-ca.pem",
        pccs_url,
        state / "collateral-cache",  # per PKI: collateral of another sim root must not be reused
    )

    shared = state / "host-shared"
    _prepare_host_shared(args.host_shared, shared, kms_url)
    try:
        compose = AppCompose.parse((shared / "app-compose.json").read_bytes())
    except ValueError as exc:
        await kms_runner.cleanup()
        await pccs_runner.cleanup()
        sys.stderr.write(f"error: {exc}\n")
        return 1
    runner: AppRunner | None = None
    if compose.runner == "bash" and compose.bash_script:
        runner = LocalProcessRunner()
    elif compose.runner == "bash":
        logger.info("app not started: app-compose has no bash_script")
    else:
        logger.info(
            "app not started: runner %r needs docker (the simulator runs bash apps)", compose.runner
        )
    boot = Boot(
        host_shared=shared, work_dir=state / "work", tee=tee, key_provider=_provider, runner=runner
    )
    try:
        result = await boot.run()
    except BootError as exc:
        await kms_runner.cleanup()
        await pccs_runner.cleanup()
        sys.stderr.write(f"error: {exc}\n")
        return 1
    pub = envcrypt.env_public_key(kms.env_crypt_key(result.app_id)).hex()
    logger.info("app %s: encrypt .encrypted-env to %s", result.app_id.hex(), pub)
    (state / "env-encrypt-pubkey.txt").write_text(pub + "\n")

    def ready() -> None:
        sys.stdout.write(f"dstack simulator ready: DSTACK_SIMULATOR_ENDPOINT={args.socket}\n")
        sys.stdout.flush()

    signer = kms_signer_for(result.state.keys, result.state.vm_config)
    await _serve(
        AgentService(result.state, tee, kms_signer=signer, boot_log=boot_log),
        runner,
        _stop_event(),
        socket_path=args.socket,
        tappd_socket=args.tappd_socket,
        public=("127.0.0.1", args.public_port) if args.public_port else None,
        guest_api_socket=state / "guest-api.sock",
        use_vsock=False,  # a laptop simulator keeps to its own unix sockets
        on_ready=ready,
        extra=[kms_runner, pccs_runner],
    )
    return 0


def run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    command: Callable[[argparse.Namespace], Coroutine[Any, Any, int]] = {
        "boot": _boot,
        "agent": _agent,
        "simulate": _simulate,
    }[args.guest_command]
    import uvloop

    return uvloop.run(command(args))
