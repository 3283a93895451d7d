"""``gateway demo --lab``: the whole system in network namespaces, reachable with curl.

Layout (``gateway.lab.harness``, prefix ``gwd``; see ``docs/lab.md``)::

    gwd<tag>g   gateway namespace: `gateway serve` = proxy workers on 0.0.0.0:8443 + its
                one control child, `gateway control` (registration RPC on 172.30.0.1:8010
                with an RA-TLS identity from simulated TDX, wireguard-go <base>gw, registry
                maintenance; no admin credentials, so its admin API is off, with a warning)
    gwd<tag>c1  CVM namespaces (two instances of ONE app): `gateway guest boot` from a
    gwd<tag>c2  generated host-shared folder (key provider `none`, gateway enabled), the
                lab origin (HTTP :8080) and a TLS origin (:8443, the app's own certificate),
                and `gateway guest agent --register`, which registers with the gateway and
                brings up the CVM's WireGuard interface

A simulated TDX PKI is created on the fly and named explicitly as the gateway's
``attest.root_ca`` (and trusted by the CVMs with ``--trust-sim-root``): nothing here would
be accepted by a production gateway. Every process is started by us and stopped by its PID;
Ctrl-C tears everything down, namespaces included.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from gateway.certs.devca import ensure_dev_ca, ensure_dev_wildcard
from gateway.lab.harness import Lab, cleanup_leftovers
from gateway.tee.base import RuntimeEvent
from gateway.tee.sim import SimTee
from gateway.tee.sim_pki import SimPki
from gateway.tunnel.commands import in_netns

__all__ = ["lab_available", "run_lab"]

PREFIX = "gwd"
BASE = "lab.localhost"
PROXY_PORT = 8443
RPC_PORT = 8010
HTTP_PORT = 8080  # the lab origin in each CVM (gateway.lab.origin)
TLS_PORT = 8443  # the app's own TLS origin in each CVM
GATEWAY_APP = hashlib.sha256(b"gateway lab demo: the gateway's app").hexdigest()[:40]


def lab_available() -> str | None:
    """``None`` when this machine can run the lab, else why not."""
    if os.geteuid() != 0:
        return "not running as root (network namespaces need it)"
    for tool in ("ip", "wg", "wireguard-go", "iptables", "curl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not Path("/dev/net/tun").exists():
        return "/dev/net/tun is missing (wireguard-go needs it)"
    return None


def _start(argv: list[str], log: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    with log.open("ab") as fh:
        procs.append(
            subprocess.Popen(
                argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        )  # fmt: skip


def _stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM by PID (the process group we created for it), then SIGKILL."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def _succeeds(argv: list[str]) -> bool:
    """True if ``argv`` exits 0 (three times in a row, so every worker has the route)."""
    for _ in range(3):
        done = subprocess.run(argv, capture_output=True, timeout=15, check=False)
        if done.returncode != 0:
            return False
    return True


def _wait(
    what: str, pred: Callable[[], bool], procs: list[subprocess.Popen[bytes]], timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{str(proc.args)[:160]} exited early")
        if pred():
            return
        time.sleep(0.1)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


def _gateway_tee(pki: SimPki, sim: Path) -> None:
    """The gateway's own simulated TD, measured as running :data:`GATEWAY_APP`."""
    tee = SimTee(pki, sim / "tee")
    if not tee.runtime_events():
        for name, payload in [
            ("system-preparing", b""),
            ("app-id", bytes.fromhex(GATEWAY_APP)),
            ("compose-hash", hashlib.sha256(b"gateway").digest()),
            ("instance-id", b"\x01" * 20),
            ("boot-mr-done", b""),
            ("system-ready", b""),
        ]:
            tee.emit_event(RuntimeEvent(name, payload))


def _compose() -> bytes:
    """The CVM app's app-compose.json (its SHA-256 prefix is the app id)."""
    doc = {
        "manifest_version": 2,
        "name": "lab-demo-app",
        "runner": "bash",
        "bash_script": "",
        "key_provider": "none",
        "gateway_enabled": True,
        "allowed_envs": [],
        "public_tcbinfo": True,
        "storage_fs": "ext4",
        "port_policy": {
            "restrict_mode": True,
            "ports": [{"port": HTTP_PORT, "pp": False}, {"port": TLS_PORT, "pp": False}],
        },
    }
    return json.dumps(doc, indent=2).encode()


def _config(lab: Lab, d: Path, app_id: str, client_ca: Path) -> Path:
    config = d / "gateway.toml"
    config.write_text(
        f"[core]\ndata_dir = '{d / 'gw-data'}'\n"
        f"[proxy]\nlisten = ['0.0.0.0:{PROXY_PORT}']\nworkers = 1\nbase_domains = ['{BASE}']\n"
        f"certs_dir = '{d / 'certs'}'\ninsecure_localhost_backend = false\n"
        "[proxy.timeouts]\ndrain = 2.0\n"
        f"[wg]\ninterface = '{lab.base}gw'\nlisten_port = {lab.wg_port}\n"
        f"endpoint = '{lab.endpoint}'\nbackend = 'wireguard-go'\nhandshake_poll_interval = 1.0\n"
        f"[attest]\nroot_ca = '{d / 'sim-root.der'}'\ncollateral_source = 'file'\n"
        f"collateral_file = '{d / 'collateral.json'}'\ncache_dir = '{d / 'collateral'}'\n"
        f"[admission]\napp_ids = ['{app_id}']\n"
        f"[rpc]\naddress = '{lab.underlay.ip}'\nport = {RPC_PORT}\n"
        f"client_ca_file = '{client_ca}'\nurl = 'https://{lab.underlay.ip}:{RPC_PORT}'\n"
        f"[rpc_identity]\ntee = 'sim'\nsim_dir = '{d / 'gw-sim'}'\n"
    )
    return config


def run_lab(data: Path, cvms: int = 2, prefix: str = PREFIX) -> int:
    """Build the lab, print curl commands, wait for Ctrl-C, tear down. Returns the exit code."""
    cleanup_leftovers(prefix)
    d = data / "lab"
    if d.exists():
        shutil.rmtree(d)  # a fresh lab every run (instance ids, keys, registry)
    d.mkdir(parents=True)
    pki = SimPki.load_or_create(d / "pki")
    (d / "gw-sim").mkdir()
    (d / "gw-sim" / "pki").symlink_to(d / "pki")
    _gateway_tee(pki, d / "gw-sim")
    (d / "sim-root.der").write_bytes(pki.root_ca_der)
    (d / "collateral.json").write_text(pki.collateral(int(time.time())).to_json())
    client_ca = ensure_dev_ca(d / "client-ca", "lab CVM client CA")
    gw_ca, _ = ensure_dev_wildcard(data / "ca", d / "certs", BASE)
    app_ca, app_certs = ensure_dev_wildcard(d / "app-ca", d / "app-certs", BASE)
    compose = _compose()
    app_id = hashlib.sha256(compose).hexdigest()[:40]
    py = sys.executable
    procs: list[subprocess.Popen[bytes]] = []
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    print(f"lab demo: building namespaces ({prefix}...), logs in {d}", flush=True)
    try:
        with Lab(cvms=cvms, workdir=d / "lab", prefix=prefix, gateway_device=False) as lab:
            try:
                config = _config(lab, d, app_id, client_ca.cert_path)
                serve_log = d / "serve.log"
                argv = [py, "-m", "gateway", "serve", "--config", str(config)]
                _start(in_netns(lab.gw_netns, argv), serve_log, procs)
                _wait(
                    "the gateway (proxy + registration RPC)",
                    lambda: b"registration RPC on" in serve_log.read_bytes(),
                    procs,
                    60,
                )
                works = []
                for node in lab.nodes:
                    work, shared, sim = (
                        d / f"cvm{node.index}" / n for n in ("work", "shared", "sim")
                    )
                    for p in (work, shared, sim):
                        p.mkdir(parents=True)
                    (sim / "pki").symlink_to(d / "pki")
                    (shared / "app-compose.json").write_bytes(compose)
                    vm = json.dumps({"os_image_hash": "00" * 32, "cpu_count": 1})
                    sys_config = {
                        "gateway_urls": [f"https://{lab.underlay.ip}:{RPC_PORT}"],
                        "kms_urls": [],
                        "vm_config": vm,
                    }
                    (shared / ".sys-config.json").write_text(json.dumps(sys_config))
                    tee = ["--tee", "sim", "--sim-dir", str(sim)]
                    boot = [py, "-m", "gateway", "guest", "boot", "--host-shared", str(shared)]
                    boot += ["--work-dir", str(work), "--runner", "none", *tee]
                    done = subprocess.run(
                        in_netns(node.netns, boot), capture_output=True, text=True, timeout=60
                    )
                    if done.returncode != 0:
                        raise RuntimeError(
                            f"guest boot in {node.netns} failed: {done.stderr[-800:]}"
                        )
                    origin = [py, "-m", "gateway.proxy.origin", "--host", "0.0.0.0", "--http", "0"]
                    origin += ["--tls", str(TLS_PORT), "--cert", str(app_certs / "fullchain.pem")]
                    origin += ["--key", str(app_certs / "privkey.pem")]
                    _start(in_netns(node.netns, origin), d / f"tls-origin{node.index}.log", procs)
                    opts = (
                        f"--gateway-app-id {GATEWAY_APP} --trust-sim-root "
                        f"--client-ca-cert {client_ca.cert_path} "
                        f"--client-ca-key {client_ca.key_path} "
                        f"--interface {lab.base}x{node.index} --wg-config {work / 'wg0.conf'} "
                        "--backend wireguard-go --firewall iptables --poll-interval 1 "
                        "--retry-initial 1 --retry-max 5"
                    )
                    agent = [py, "-m", "gateway", "guest", "agent", "--work-dir", str(work)]
                    agent += ["--socket", str(work / "dstack.sock"), "--register"]
                    agent += ["--register-opts", opts, *tee]
                    _start(in_netns(node.netns, agent), d / f"agent{node.index}.log", procs)
                    works.append(work)

                def registered() -> bool:
                    for work in works:
                        try:
                            doc = json.loads(
                                (work / "gateway" / "registrar-status.json").read_text()
                            )
                        except (OSError, ValueError):
                            return False
                        if not doc.get("configured"):
                            return False
                    return True

                _wait("the CVMs' registration", registered, procs, 60)
                cacert = gw_ca.cert_path
                ns = lab.gw_netns
                lines = [
                    "",
                    f"Lab up: gateway namespace {ns}, CVMs {', '.join(n.netns for n in lab.nodes)}"
                    f" (app {app_id}). Try (Ctrl-C tears everything down):",
                    "",
                ]
                for label, what, ca in (
                    (
                        f"{app_id}-{HTTP_PORT}",
                        "TLS terminated by the gateway, HTTP to a CVM",
                        cacert,
                    ),
                    (
                        f"{app_id}-{TLS_PORT}s",
                        "TLS passed through to the app (its own certificate)",
                        app_ca.cert_path,
                    ),
                ):
                    name = f"{label}.{BASE}"
                    argv = [
                        "ip", "netns", "exec", ns, "curl", "-sS", "-o", "/dev/null",
                        "--max-time", "5", "--cacert", str(ca),
                        "--resolve", f"{name}:{PROXY_PORT}:127.0.0.1",
                        f"https://{name}:{PROXY_PORT}/",
                    ]  # fmt: skip
                    # registered is not yet routable: the workers pick the instance up from
                    # the registry once its first WireGuard handshake is recorded
                    _wait(f"{name} to answer through the gateway",
                          functools.partial(_succeeds, argv), procs, 60)  # fmt: skip
                    lines.append(f"  # {what}")
                    lines.append(
                        f"  ip netns exec {ns} curl --cacert {ca} "
                        f"--resolve {name}:{PROXY_PORT}:127.0.0.1 https://{name}:{PROXY_PORT}/"
                    )
                print("\n".join(lines) + "\n", flush=True)
                while not stop:
                    for proc in procs:
                        if proc.poll() is not None:
                            print(f"error: {proc.args!r} exited; tearing down", file=sys.stderr)
                            return 1
                    time.sleep(0.2)
                print("lab demo: tearing down", flush=True)
                return 0
            finally:  # before the namespaces go: agents take their interfaces down, serve its child
                for proc in reversed(procs):
                    _stop(proc)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        print(f"error: lab demo: {exc} (logs in {d})", file=sys.stderr)
        return 1
    finally:
        for s, h in old.items():
            signal.signal(s, h)
