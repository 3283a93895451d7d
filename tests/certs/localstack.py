"""A real ACME CA (Debian ``pebble``) and a real authoritative DNS server (``knotd``) on loopback.

knotd serves the test zones and accepts RFC 2136 updates signed with a random TSIG key; pebble
sends every DNS-01 lookup to that knotd (``-dnsserver``), so a challenge passes only if our
provider really published the record. Both run in their own session in a temp directory and
are stopped by PID. Pebble regenerates its root at every start: fetch it with
:meth:`LocalStack.pebble_root_pem` after start, never cache it.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.query
import dns.rcode
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.certs.settings import AcmeSettings
from tests.helpers.processes import start, stop_by_pid, wait_until

TSIG_NAME = "gwg-acme-key"


def binaries_present() -> bool:
    return bool(shutil.which("pebble") and shutil.which("knotd"))


def _free_tcp_udp_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 (knot and pebble's lookups need both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind(("127.0.0.1", 0))
            port = int(t.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free TCP+UDP port")


def _mini_ca(workdir: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a ``localhost``/127.0.0.1 leaf for pebble's own HTTPS listener."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gwg test listener CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    import ipaddress

    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem, cert_pem, key_pem = (
        workdir / "listener-ca.pem",
        workdir / "listener.pem",
        workdir / "listener-key.pem",
    )
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_pem.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_pem, cert_pem, key_pem


def _soa_answers(port: int, zone: str) -> bool:
    try:
        r = dns.query.udp(dns.message.make_query(zone, "SOA"), "127.0.0.1", port=port, timeout=0.3)
    except (dns.exception.DNSException, OSError):
        return False
    return r.rcode() == dns.rcode.NOERROR


class LocalStack:
    """knotd (zones ``zones``) + pebble resolving through it; start() then stop() (by PID)."""

    def __init__(
        self,
        workdir: Path,
        zones: Sequence[str],
        *,
        cert_validity: int = 3600,
        pebble_env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir.resolve()
        self.zones = tuple(zones)
        self.cert_validity = cert_validity
        self.pebble_env = dict(pebble_env or {})
        self.tsig_name = TSIG_NAME
        self.tsig_secret = base64.b64encode(secrets.token_bytes(32)).decode()
        self.dns_port = 0
        self.acme_port = 0
        self.mgmt_port = 0
        self.listener_ca = self.workdir / "listener-ca.pem"
        self._knot: subprocess.Popen[bytes] | None = None
        self._pebble: subprocess.Popen[bytes] | None = None

    @property
    def directory_url(self) -> str:
        return f"https://127.0.0.1:{self.acme_port}/dir"

    # --- knot ------------------------------------------------------------------------------

    def acme_settings(self, **changes: Any) -> AcmeSettings:
        """``[acme]`` enabled against this pebble, with schedules short enough for tests
        (no jitter, 1-4 s back-off, 30 s per issuance); ``changes`` override any field."""
        return dataclasses.replace(
            AcmeSettings(
                enabled=True,
                directory_url=self.directory_url,
                ca_bundle=str(self.listener_ca),
                renew_before=600,
                check_interval=600,
                jitter=0,
                backoff_initial=1,
                backoff_max=4,
                issue_timeout=30,
                poll_interval=0.2,
            ),
            **changes,
        )

    def _write_knot(self) -> Path:
        kdir = self.workdir / "knot"
        for sub in ("run", "db", "zones"):
            (kdir / sub).mkdir(parents=True, exist_ok=True)
        for zone in self.zones:
            (kdir / "zones" / f"{zone}.zone").write_text(
                f"$ORIGIN {zone}.\n$TTL 60\n"
                f"@   IN SOA ns1.{zone}. hostmaster.{zone}. 1 60 60 3600 1\n"
                f"@   IN NS  ns1.{zone}.\nns1 IN A   127.0.0.1\n@   IN A   127.0.0.1\n"
            )
        zone_lines = "".join(f"  - domain: {z}\n    acl: gw_update\n" for z in self.zones)
        conf = kdir / "knot.conf"
        conf.write_text(
            f'server:\n    rundir: "{kdir}/run"\n    listen: 127.0.0.1@{self.dns_port}\n'
            f'database:\n    storage: "{kdir}/db"\n'
            "log:\n  - target: stderr\n    any: info\n"
            f"key:\n  - id: {self.tsig_name}\n    algorithm: hmac-sha256\n"
            f"    secret: {self.tsig_secret}\n"
            f"acl:\n  - id: gw_update\n    key: {self.tsig_name}\n    action: update\n"
            f'template:\n  - id: default\n    storage: "{kdir}/zones"\n    file: "%s.zone"\n'
            "    zonefile-sync: -1\n    zonefile-load: whole\n    journal-content: none\n"
            "    semantic-checks: off\n"
            f"zone:\n{zone_lines}"
        )
        return conf

    def _start_knot(self) -> None:
        log = self.workdir / "knot.log"
        for _attempt in range(3):
            self.dns_port = _free_tcp_udp_port()
            conf = self._write_knot()
            proc = start(["knotd", "-c", str(conf)], log)
            try:
                wait_until(
                    lambda: _soa_answers(self.dns_port, self.zones[0]), proc, 10, "knotd SOA", log
                )
            except Exception:
                stop_by_pid(proc)
                continue  # port raced with someone else: pick another
            self._knot = proc
            return
        raise RuntimeError(f"knotd did not start, see {log}:\n{log.read_text()[-3000:]}")

    # --- pebble ----------------------------------------------------------------------------

    def _dir_answers(self) -> bool:
        ctx = ssl.create_default_context(cafile=str(self.listener_ca))
        try:
            with urllib.request.urlopen(self.directory_url, context=ctx, timeout=0.5) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def start_pebble(self, *, same_ports: bool = False) -> None:
        """(Re)start pebble; a restart means a new root and a CA that forgot every account."""
        log = self.workdir / "pebble.log"
        if not (same_ports and self.acme_port):
            self.acme_port, self.mgmt_port = _free_tcp_udp_port(), _free_tcp_udp_port()
        _, cert, key = (
            _mini_ca(self.workdir)
            if not self.listener_ca.exists()
            else (
                self.listener_ca,
                self.workdir / "listener.pem",
                self.workdir / "listener-key.pem",
            )
        )
        cfg = self.workdir / "pebble-config.json"
        cfg.write_text(
            json.dumps(
                {
                    "pebble": {
                        "listenAddress": f"127.0.0.1:{self.acme_port}",
                        "managementListenAddress": f"127.0.0.1:{self.mgmt_port}",
                        "certificate": str(cert),
                        "privateKey": str(key),
                        "httpPort": 5002,
                        "tlsPort": 5001,
                        "ocspResponderURL": "",
                        "externalAccountBindingRequired": False,
                        "certificateValidityPeriod": self.cert_validity,
                    }
                }
            )
        )
        env = dict(os.environ)
        env.update(PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT="0", PEBBLE_AUTHZREUSE="0")
        env.update(self.pebble_env)
        cmd = ["pebble", "-config", str(cfg), "-dnsserver", f"127.0.0.1:{self.dns_port}"]
        proc = start([*cmd, "-strict=false"], log, env=env, cwd=self.workdir)
        try:
            wait_until(self._dir_answers, proc, 20, "pebble /dir", log)
        except Exception:
            stop_by_pid(proc)
            raise
        self._pebble = proc

    def stop_pebble(self) -> None:
        if self._pebble is not None:
            stop_by_pid(self._pebble)
            self._pebble = None

    def pebble_root_pem(self) -> bytes:
        """The root that signed this pebble run's intermediates (management API /roots/0)."""
        ctx = ssl.create_default_context(cafile=str(self.listener_ca))
        url = f"https://127.0.0.1:{self.mgmt_port}/roots/0"
        with urllib.request.urlopen(url, context=ctx, timeout=5) as r:
            return bytes(r.read())

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._start_knot()
        try:
            self.start_pebble()
        except Exception:
            self.stop()
            raise

    def start_dns(self) -> None:
        """Start only knotd (for tests that need authoritative DNS but no ACME CA)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._start_knot()

    def stop(self) -> None:
        self.stop_pebble()
        if self._knot is not None:
            stop_by_pid(self._knot)
            self._knot = None


@contextlib.contextmanager
def local_stack(
    workdir: Path,
    zones: Sequence[str],
    *,
    cert_validity: int = 3600,
    pebble_env: dict[str, str] | None = None,
) -> Iterator[LocalStack]:
    stack = LocalStack(workdir, zones, cert_validity=cert_validity, pebble_env=pebble_env)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()
