"""``python -m gateway.guest.register_cmd``: the CVM's gateway registration as a service.

Runs :class:`gateway.guest.registrar.Registrar` until SIGTERM/SIGINT (``--once``: one
registration, exit 0 on success, 1 on failure). Inputs, as in a dstack CVM:

* gateway URLs: ``--gateway-url`` (repeatable) or ``gateway_urls`` of ``--sys-config``
  (untrusted: the gateway's attestation is what is trusted);
* the pinned gateway app id: ``--gateway-app-id`` or ``gateway_app_id`` of ``--appkeys``
  (``.appkeys.json`` written by ``gateway guest boot``);
* optionally, the gateway's pinned boot chain / OS image: ``--gateway-image-policy`` (JSON,
  or ``@file``) or ``gateway_image_policy`` of app-compose (with ``--boot-dir``), in the
  admission policy's vocabulary (:mod:`gateway.guest.gateway_pin`). app-compose is the
  place because it is measured (its hash is in RTMR3 and the CVM's own attestation), as
  the pinned app id from the KMS is trusted; ``.sys-config.json`` is written by the host
  and is never read for it;
* the TEE backend (``--tee sim|tdx``; sim state in ``--sim-dir``, as ``gateway guest``);
* how quotes are verified: ``--trust-sim-root`` (the simulator's root and collateral from
  ``--sim-dir``, lab only), ``--collateral-file`` or ``--pccs-url``;
* who signs the client certificate: ``--client-ca-cert/--client-ca-key`` (a local CA the
  gateway's ``client_ca_file`` names), ``--kms`` (the KMS in ``--appkeys``, dstack's
  SignCert), or nothing (self-signed);
* ``--kms-root``: also accept KMS-chained gateway certificates (dstack compatibility).

Exit codes: 0 stopped cleanly (or ``--once`` registered), 1 ``--once`` failed, 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.attest.collateral import (
    CollateralSource,
    FileCollateralSource,
    PccsCollateralSource,
    SimCollateralSource,
)
from gateway.attest.tcb import TcbPolicy
from gateway.guest.gateway_cache import (
    CertIssuer,
    GatewayKeyStore,
    KmsCertIssuer,
    TeeCertIssuer,
)
from gateway.guest.gateway_client import GatewayClient, GatewayTrust, PortPolicy, parse_app_ids
from gateway.guest.gateway_pin import GatewayImagePin, PinError
from gateway.guest.hostshared import HostSharedError, SysConfig
from gateway.guest.registrar import Action, Registrar, RegistrarSettings
from gateway.guest.wgconfig import DEFAULT_CONFIG, DEFAULT_IFACE, LISTEN_PORT, Tunnel
from gateway.guest.wgfilter import FilterBackend
from gateway.tee.base import TeeBackend
from gateway.tee.sim_pki import SimPki
from gateway.tunnel.wg import Backend
from gateway.util.logs import setup_logging
from gateway.util.tasks import spawn

__all__ = ["add_arguments", "build", "run"]

logger = logging.getLogger("gateway.guest.register")


class UsageError(Exception):
    pass


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--work-dir", type=Path, required=True, help="cache and status files")
    p.add_argument(
        "--boot-dir",
        type=Path,
        help="a finished `gateway guest boot` work dir: URLs, pin, port policy, keys from it",
    )
    p.add_argument(
        "--dstack-compat",
        action="store_true",
        help="with --boot-dir and a KMS: also accept KMS-chained gateway certificates",
    )
    p.add_argument("--gateway-url", action="append", default=[], help="repeatable, in order")
    p.add_argument("--sys-config", type=Path, help=".sys-config.json (gateway_urls)")
    p.add_argument("--gateway-app-id", help="pinned gateway app id(s), hex")
    p.add_argument("--appkeys", type=Path, help=".appkeys.json (gateway_app_id, KMS)")
    p.add_argument(
        "--gateway-image-policy",
        help="pin the gateway's boot chain / OS image: JSON or @file, "
        '{"os_images": [{"mrtd","rtmr0","rtmr1","rtmr2"}], "os_image_hashes": [...]}',
    )
    p.add_argument("--tee", choices=["sim", "tdx"], default="sim")
    p.add_argument("--sim-dir", type=Path, help="simulated TDX state (pki/ and tee/)")
    p.add_argument("--trust-sim-root", action="store_true", help="lab: trust the sim's root")
    p.add_argument("--collateral-file", type=Path)
    p.add_argument("--pccs-url")
    p.add_argument("--client-ca-cert", type=Path)
    p.add_argument("--client-ca-key", type=Path)
    p.add_argument("--kms", action="store_true", help="client cert from the KMS (SignCert)")
    p.add_argument("--kms-root", type=Path, help="accept KMS-chained gateway certs too")
    p.add_argument(
        "--allow-tcb-status",
        action="append",
        default=[],
        help="a TCB status accepted for the gateway besides UpToDate (repeatable)",
    )
    p.add_argument("--port-policy", help='JSON, e.g. {"ports":[{"port":443,"pp":false}]}')
    p.add_argument("--interface", default=DEFAULT_IFACE)
    p.add_argument("--wg-config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--listen-port", type=int, default=LISTEN_PORT)
    p.add_argument("--backend", choices=[b.value for b in Backend], default="auto")
    p.add_argument("--firewall", choices=[b.value for b in FilterBackend], default="auto")
    p.add_argument("--poll-interval", type=float, default=10.0)
    p.add_argument("--refresh-interval", type=float, default=180.0)
    p.add_argument("--handshake-timeout", type=float, default=180.0)
    p.add_argument("--retry-initial", type=float, default=30.0)
    p.add_argument("--retry-max", type=float, default=120.0)
    p.add_argument("--once", action="store_true", help="register once and exit")


def _tee(args: argparse.Namespace) -> TeeBackend:
    if args.tee == "tdx":
        from gateway.tee.tdx import TdxTee

        return TdxTee()
    if args.sim_dir is None:
        raise UsageError("--tee sim needs --sim-dir (the CVM's simulated TDX state)")
    from gateway.guest.cli import sim_tee  # the same simulated TD as `gateway guest boot`

    return sim_tee(SimPki.load_or_create(args.sim_dir / "pki"), args.sim_dir / "tee")[0]


def _collateral(args: argparse.Namespace) -> tuple[CollateralSource | None, bytes | None]:
    if args.trust_sim_root:
        if args.sim_dir is None:
            raise UsageError("--trust-sim-root needs --sim-dir")
        pki = SimPki.load_or_create(args.sim_dir / "pki")
        return SimCollateralSource(pki), pki.root_ca_der
    if args.collateral_file is not None:
        return FileCollateralSource(args.collateral_file), None
    if args.pccs_url:
        return PccsCollateralSource(args.pccs_url, args.work_dir / "collateral"), None
    return None, None


def _issuer(args: argparse.Namespace, tee: TeeBackend, appkeys: dict[str, object]) -> CertIssuer:
    if args.boot_dir is not None and args.client_ca_cert is None and not args.kms:
        from gateway.guest.keys import AppKeys

        keys = AppKeys.from_json(args.appkeys.read_bytes())
        if not keys.ca_key:  # keys from a KMS: it signs (dstack's way)
            args.kms = True
        else:  # the app CA of a non-KMS provider signs locally
            return TeeCertIssuer(tee, (keys.signing_ca_cert(), keys.ca_private_key()))
    if args.kms:
        from gateway.guest.keys import AppKeys
        from gateway.guest.kms_client import kms_signer_for

        if args.appkeys is None:
            raise UsageError("--kms needs --appkeys")
        vm_config = getattr(args, "vm_config", "")
        signer = kms_signer_for(AppKeys.from_json(args.appkeys.read_bytes()), vm_config)
        if signer is None:
            raise UsageError("--kms: these app keys did not come from a KMS")
        return KmsCertIssuer(tee, signer, vm_config)
    if (args.client_ca_cert is None) != (args.client_ca_key is None):
        raise UsageError("--client-ca-cert and --client-ca-key go together")
    if args.client_ca_cert is not None:
        cert = x509.load_pem_x509_certificate(args.client_ca_cert.read_bytes())
        key = serialization.load_pem_private_key(args.client_ca_key.read_bytes(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise UsageError("--client-ca-key must be an EC key")
        return TeeCertIssuer(tee, (cert, key))
    return TeeCertIssuer(tee)


class Disabled(Exception):
    """app-compose does not enable the gateway: nothing to do (upstream skips too)."""


def _from_boot(args: argparse.Namespace) -> None:
    """Fill the arguments a finished boot knows (explicit flags win)."""
    from gateway.guest.identity import AppCompose, ComposeError

    shared = args.boot_dir / ".host-shared"
    try:
        compose = AppCompose.parse((shared / "app-compose.json").read_bytes())
    except (OSError, ComposeError) as exc:
        raise UsageError(f"--boot-dir: {exc}") from None
    if not compose.gateway_enabled:
        raise Disabled("gateway_enabled is false in app-compose: not registering")
    if args.sys_config is None and not args.gateway_url:
        args.sys_config = shared / ".sys-config.json"
    if args.appkeys is None:
        args.appkeys = args.boot_dir / ".appkeys.json"
    if args.port_policy is None:
        args.port_policy = json.dumps(compose.extra.get("port_policy") or {"ports": []})
    pin = compose.extra.get("gateway_image_policy")
    if args.gateway_image_policy is None and pin is not None:
        args.gateway_image_policy = json.dumps(pin)
    if not (args.trust_sim_root or args.collateral_file or args.pccs_url):
        try:
            args.pccs_url = SysConfig.parse(args.sys_config.read_bytes()).pccs_url or None
        except (OSError, HostSharedError, AttributeError):
            pass


def _image_pin(text: str | None) -> GatewayImagePin | None:
    """``--gateway-image-policy`` (JSON or ``@file``) as a pin; ``None`` when unset."""
    if text is None or not text.strip():
        return None
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text()
        except OSError as exc:
            raise UsageError(f"--gateway-image-policy: {exc}") from None
    try:
        pin = GatewayImagePin.from_json(text)
    except PinError as exc:
        raise UsageError(f"gateway image policy: {exc}") from None
    logger.info("the gateway must run a pinned image: %s", pin.describe())
    if not pin.hardware_rooted:
        logger.warning(
            "the gateway pin lists OS image hashes but no os_images: the hash is read from "
            "the gateway's own event log, so a modified image can claim it; pin os_images "
            "(MRTD + RTMR0-2) to resist that"
        )
    return pin


def build(args: argparse.Namespace) -> Registrar:
    """The registrar the arguments describe; raises UsageError with what to fix."""
    if args.boot_dir is not None:
        _from_boot(args)
    urls = list(args.gateway_url)
    appkeys: dict[str, object] = {}
    if args.appkeys is not None:
        try:
            appkeys = json.loads(args.appkeys.read_bytes())
        except (OSError, ValueError) as exc:
            raise UsageError(f"--appkeys: {exc}") from None
    if args.boot_dir is not None and args.dstack_compat and args.kms_root is None:
        if "Kms" in str(appkeys.get("key_provider", "")) and appkeys.get("ca_cert"):
            args.kms_root_pem = str(appkeys["ca_cert"])
    if args.sys_config is not None:
        try:
            sys_config = SysConfig.parse(args.sys_config.read_bytes())
            urls += sys_config.gateway_urls
            args.vm_config = sys_config.vm_config
        except (OSError, HostSharedError) as exc:
            raise UsageError(f"--sys-config: {exc}") from None
    if not urls:
        raise UsageError("no gateway URLs: pass --gateway-url or --sys-config")
    pin = args.gateway_app_id or str(appkeys.get("gateway_app_id") or "")
    try:
        app_ids = parse_app_ids(pin)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    collateral, root = _collateral(args)
    kms_root = args.kms_root.read_text() if args.kms_root is not None else None
    kms_root = kms_root or getattr(args, "kms_root_pem", None)
    if collateral is None and kms_root is None:
        raise UsageError(
            "nothing to verify the gateway with: --trust-sim-root, --collateral-file, "
            "--pccs-url or --kms-root"
        )
    try:
        tcb = TcbPolicy.from_names(args.allow_tcb_status)
    except ValueError as exc:
        raise UsageError(f"--allow-tcb-status: {exc}") from None
    image_pin = _image_pin(args.gateway_image_policy)
    tee = _tee(args)
    policy = None
    if args.port_policy:
        try:
            policy = PortPolicy.from_json(json.loads(args.port_policy))
        except ValueError as exc:
            raise UsageError(f"--port-policy: {exc}") from None
    if len(args.interface.encode()) > 15:
        raise UsageError("--interface: at most 15 bytes")
    settings = RegistrarSettings(
        poll_interval=args.poll_interval,
        refresh_interval=args.refresh_interval,
        handshake_timeout=args.handshake_timeout,
        retry_initial=args.retry_initial,
        retry_max=args.retry_max,
    )
    args.work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return Registrar(
        urls=tuple(urls),
        client=GatewayClient(
            GatewayTrust(
                app_ids,
                collateral,
                root,
                tcb_policy=tcb,
                kms_root_pem=kms_root,
                image_pin=image_pin,
            ),
            tmp_dir=str(args.work_dir),
        ),
        keystore=GatewayKeyStore(args.work_dir),
        issuer=_issuer(args, tee, appkeys),
        tunnel=Tunnel(
            config_path=args.wg_config,
            iface=args.interface,
            listen_port=args.listen_port,
            backend=Backend(args.backend),
            firewall=FilterBackend(args.firewall),
            log_dir=args.work_dir,
        ),
        port_policy=policy,
        settings=settings,
        status_dir=args.work_dir,
    )


async def _serve(registrar: Registrar, once: bool) -> int:
    if once:
        ok = await registrar.refresh(force=True)
        registrar.write_status(Action.REGISTER)
        return 0 if ok else 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    task = registrar.start()
    waiter = spawn(stop.wait(), name="registrar-signal")
    await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    await registrar.close()
    with contextlib.suppress(asyncio.CancelledError):
        if task.done() and task.exception() is not None:
            logger.error("registrar stopped: %s", task.exception())
            return 1
    return 0


def run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    try:
        registrar = build(args)
    except Disabled as exc:
        logger.info("%s", exc)
        return 0
    except (UsageError, OSError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    return asyncio.run(_serve(registrar, args.once))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.guest.register_cmd")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
