"""End to end: custom domains routed by DNS TXT through a real ``gateway serve`` and knotd.

knotd (only knotd, no pebble) is authoritative for ``custom.test``; the records are added with
signed RFC 2136 updates. The gateway asks it through ``[dns.resolver] nameservers``. The
origin's TLS port holds a certificate for the custom names (which the gateway does not have),
so a verified handshake proves passthrough; ``secure.custom.test`` has a certificate in the
gateway's ``certs_dir``, so it is terminated.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType

import pytest
from cryptography import x509

from gateway.certs.devca import ensure_dev_ca, issue_wildcard, write_cert_dir
from gateway.control.overlay import Overlay, RouteTarget, overlay_path, write_overlay
from gateway.protocol.hello_builder import build_client_hello
from gateway.proxy.stats import read_stats
from tests.certs.localstack import LocalStack, binaries_present
from tests.certs.util import dns_update
from tests.helpers.gateway import (
    Gateway,
    Origin,
    get,
    make_certs,
    recv_alert,
    run_gateway,
    tls_connect,
    write_config,
)
from tests.helpers.processes import free_port, start, stop_by_pid, wait_until

pytestmark = pytest.mark.slow

ZONE = "custom.test"
ALERT_UNRECOGNIZED_NAME = bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 112])
ALERT_HANDSHAKE_FAILURE = bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 40])


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("customdom")


@pytest.fixture(scope="module")
def knot(root: Path) -> Iterator[LocalStack]:
    if not binaries_present():
        pytest.skip("knotd is not installed (apt-get install knot)")
    stack = LocalStack(root / "dns", [ZONE])
    stack.start_dns()
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def ca(root: Path) -> Path:
    """The dev CA; ``*.gw.test`` and ``secure.custom.test`` in the gateway's certs_dir, and a
    certificate for the passthrough names that only the origin holds."""
    ca_pem, certs_dir = make_certs(root)
    dev = ensure_dev_ca(root / "ca")
    ca_cert, _ = dev.load()
    leaf, key = issue_wildcard(dev, ["secure.custom.test"])
    write_cert_dir(certs_dir, "secure.custom.test", [leaf, ca_cert], key)
    leaf, key = issue_wildcard(dev, ["app.custom.test", "*.wild.custom.test", "op.custom.test"])
    write_cert_dir(root / "origin-certs", "app", [leaf, ca_cert], key)
    return ca_pem


@pytest.fixture(scope="module")
def origin(root: Path, ca: Path) -> Iterator[Origin]:
    log = root / "origin.log"
    cert = root / "origin-certs" / "app"
    cmd = [sys.executable, "-m", "gateway.proxy.origin", "--http", "0", "--tls", "0"]
    cmd += ["--cert", str(cert / "fullchain.pem"), "--key", str(cert / "privkey.pem")]
    proc: subprocess.Popen[bytes] = start(cmd, log)
    try:
        wait_until(lambda: log.exists() and b"{" in log.read_bytes(), proc, 10, "origin", log)
        ports = json.loads(log.read_text().splitlines()[0])
        yield Origin(proc, ports["http"], ports["tls"], log)
    finally:
        stop_by_pid(proc)


def put(knot: LocalStack, name: str, value: str) -> None:
    dns_update(
        knot.dns_port,
        (knot.tsig_name, knot.tsig_secret),
        ZONE,
        delete=[(name, "TXT")],
        add=[(name, 60, "TXT", f'"{value}"')],
    )


@pytest.fixture(scope="module")
def gw(root: Path, origin: Origin, knot: LocalStack) -> Iterator[Gateway]:
    put(knot, f"_dstack-app-address.app.{ZONE}.", f"app:{origin.tls}")
    put(knot, f"_dstack-app-address.secure.{ZONE}.", f"app:{origin.http}")
    put(knot, f"_dstack-app-address-wildcard.wild.{ZONE}.", f"inst1:{origin.tls}")
    put(knot, f"_dstack-app-address.denied.{ZONE}.", f"locked:{origin.tls}")
    put(knot, f"_dstack-app-address.junk.{ZONE}.", "not an address")
    extra = f'[dns.resolver]\nnameservers = ["127.0.0.1:{knot.dns_port}"]\n'
    with run_gateway(write_config(root, "custom", origin, extra)) as g:
        yield g


def peer_names(sock: ssl.SSLSocket) -> list[str]:
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    san = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    return list(san.value.get_values_for_type(x509.DNSName))


def test_passthrough_to_the_apps_own_tls(gw: Gateway, origin: Origin, ca: Path) -> None:
    for _ in range(4):  # the first ones resolve, later ones may hit a worker's cache
        with tls_connect(gw.port, f"app.{ZONE}", ca) as s:
            # the origin's certificate: the gateway holds none for this name
            assert peer_names(s)[:2] == ["app.custom.test", "*.wild.custom.test"]
            head, body = get(s, "/", f"app.{ZONE}")
            assert head.startswith(b"HTTP/1.1 200")
            assert f"port {origin.tls}, TLS".encode() in body


def test_curl_passthrough(gw: Gateway, ca: Path) -> None:
    url = f"https://app.{ZONE}:{gw.port}/health"
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--cacert", str(ca)]
        + ["--resolve", f"app.{ZONE}:{gw.port}:127.0.0.1", url],
        capture_output=True,
        timeout=15,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"ok"


def test_terminate_when_the_operator_has_a_certificate(
    gw: Gateway, origin: Origin, ca: Path
) -> None:
    with tls_connect(gw.port, f"secure.{ZONE}", ca, alpn=["h2", "http/1.1"]) as s:
        assert peer_names(s) == ["secure.custom.test"]  # the gateway's certificate
        assert s.selected_alpn_protocol() == "http/1.1"
        head, body = get(s, "/", f"secure.{ZONE}")
        assert head.startswith(b"HTTP/1.1 200")
        assert f"port {origin.http}, plain TCP".encode() in body


def test_wildcard_fallback(gw: Gateway, origin: Origin, ca: Path) -> None:
    for name in (f"anything.wild.{ZONE}", f"other.wild.{ZONE}"):
        with tls_connect(gw.port, name, ca) as s:
            head, body = get(s, "/", name)
            assert f"port {origin.tls}, TLS".encode() in body
    # one level only: a.b.wild has neither its own record nor a wildcard at b.wild
    hello = build_client_hello(f"a.b.wild.{ZONE}")
    assert recv_alert(gw.port, hello) == ALERT_UNRECOGNIZED_NAME


def test_nxdomain_gets_unrecognized_name(gw: Gateway, ca: Path) -> None:
    assert recv_alert(gw.port, build_client_hello(f"nothing.{ZONE}")) == ALERT_UNRECOGNIZED_NAME
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        tls_connect(gw.port, f"nothing2.{ZONE}", ca)
    # a name in no zone knot serves: REFUSED -> also a miss, never a hang
    assert recv_alert(gw.port, build_client_hello("shop.example.org")) == ALERT_UNRECOGNIZED_NAME


def test_malformed_record_gets_unrecognized_name(gw: Gateway) -> None:
    assert recv_alert(gw.port, build_client_hello(f"junk.{ZONE}")) == ALERT_UNRECOGNIZED_NAME


def test_port_denied_by_policy_is_refused(gw: Gateway) -> None:
    assert recv_alert(gw.port, build_client_hello(f"denied.{ZONE}")) == ALERT_HANDSHAKE_FAILURE


def test_reasons_are_counted_and_logged(gw: Gateway, ca: Path) -> None:
    for name in (f"nothing.{ZONE}", f"junk.{ZONE}", f"denied.{ZONE}"):
        recv_alert(gw.port, build_client_hello(name))
    for name in (f"secure.{ZONE}", f"app.{ZONE}"):
        with tls_connect(gw.port, name, ca) as s:
            get(s, "/health", name)
    want = {"custom_not_found", "custom_malformed", "port_denied"}

    def counted() -> bool:
        errors = read_stats(gw.data_dir / "run" / "proxy")["errors"]
        return want <= set(errors)

    wait_until(counted, gw.proc, 5, "reasons in the worker stats", gw.log)
    lines = [f"reason={r}" for r in want]
    lines += [f"sni=secure.{ZONE} mode=terminate", f"sni=app.{ZONE} mode=passthrough"]
    wait_until(
        lambda: all(line in gw.log_text() for line in lines), gw.proc, 5, "access log", gw.log
    )


def _fetches(port: int, name: str, ca: Path) -> bool:
    try:  # a TLS client against a plain port would wait for an answer: keep it short
        with tls_connect(port, name, ca, timeout=1) as s:
            return get(s, "/health", name)[1] == b"ok"
    except (ssl.SSLError, OSError):
        return False


def test_installing_a_certificate_switches_to_terminate(
    gw: Gateway, root: Path, origin: Origin, knot: LocalStack, ca: Path
) -> None:
    name = f"late.{ZONE}"
    put(knot, f"_dstack-app-address.{name}.", f"app:{origin.http}")
    # no certificate yet: passed through, to a port that speaks no TLS
    assert not _fetches(gw.port, name, ca)
    wait_until(
        lambda: f"sni={name} mode=passthrough" in gw.log_text(), gw.proc, 5, "passthrough", gw.log
    )
    # the operator installs a certificate for the name and sends SIGHUP: now terminated
    dev = ensure_dev_ca(root / "ca")
    leaf, key = issue_wildcard(dev, [name])
    write_cert_dir(root / "certs", name, [leaf, dev.load()[0]], key)
    os.kill(gw.proc.pid, signal.SIGHUP)
    wait_until(lambda: _fetches(gw.port, name, ca), gw.proc, 10, "terminated after SIGHUP", gw.log)


def test_operator_route_comes_before_dns(gw: Gateway, origin: Origin, ca: Path) -> None:
    """A route set through the control plane (its overlay file + SIGHUP) needs no TXT."""
    name = f"op.{ZONE}"
    assert recv_alert(gw.port, build_client_hello(name)) == ALERT_UNRECOGNIZED_NAME  # no TXT
    routes = MappingProxyType({name: RouteTarget("app", origin.tls)})
    write_overlay(overlay_path(gw.data_dir), Overlay(revision=1, routes=routes))
    os.kill(gw.proc.pid, signal.SIGHUP)
    wait_until(lambda: _fetches(gw.port, name, ca), gw.proc, 10, "operator route", gw.log)
    with tls_connect(gw.port, name, ca) as s:
        assert f"port {origin.tls}, TLS".encode() in get(s, "/", name)[1]  # passed through


def test_resolver_timeout_alerts_within_the_handshake_timeout(
    root: Path, origin: Origin, ca: Path
) -> None:
    dead = free_port()  # nothing listens: queries go unanswered
    extra = f'[dns.resolver]\nnameservers = ["127.0.0.1:{dead}"]\ntimeout = 5.0\n'
    with run_gateway(write_config(root, "deadns", origin, extra)) as g:
        t0 = time.monotonic()
        assert recv_alert(g.port, build_client_hello(f"app.{ZONE}")) == ALERT_UNRECOGNIZED_NAME
        took = time.monotonic() - t0
        assert 0.8 <= took < 2.0, took  # handshake = 1.0 s in the test config
        # while a lookup hangs, base-domain names are served by the same workers
        with socket.create_connection(("127.0.0.1", g.port), timeout=5) as pending:
            pending.sendall(build_client_hello(f"other.{ZONE}"))
            t0 = time.monotonic()
            for _ in range(4):
                with tls_connect(g.port, f"app-{origin.http}.gw.test", ca) as s:
                    assert b"plain TCP" in get(s, "/")[1]
            assert time.monotonic() - t0 < 0.8
            assert pending.recv(100) == ALERT_UNRECOGNIZED_NAME
        wait_until(
            lambda: "reason=custom_timeout" in g.log_text(), g.proc, 5, "timeout logged", g.log
        )
