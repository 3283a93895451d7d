"""``docs/operations.md``'s walkthrough, run as written, against pebble and knot.

The shell blocks the doc marks ``<!-- walkthrough:step NAME -->`` are extracted, the
placeholders its table lists (directories, ports, the ACME directory, the DNS server and
TSIG key, the app's host and ports, a CVM's ids) replaced, and each block run with bash in
order, sharing exported variables. ``gateway serve`` runs as a real process (started and
stopped by PID, not by the shell); ``gateway ctl``, ``curl`` and ``openssl`` are the real
programs. After each step the test checks what the doc promises: the node reports ready,
the credential is stored with its secret redacted, the base domain gets a certificate from
the ACME CA (pebble) that the proxy serves for the names under it, a custom domain routes
to the app by its ``_dstack-app-address`` TXT record in knot and another by a static route,
the dashboard and metrics answer, a registered CVM is drained, re-opened and removed, and
the ACME account is rotated and pinned in CAA records.

Then what an operator relies on when renewal fails: a forced renewal with the DNS update
refused (a wrong TSIG secret) and with the CA stopped fails with an error naming the cause,
and the proxy still serves the old certificate (checked over TLS with openssl).

Not run as commands: step 1's ``scripts/setup.sh`` (it installs the Debian packages and the
environment this test already runs in) and step 4 (DNS delegation: knot is the delegated
server; the test adds the records pointing at the gateway). The CVM is registered by
writing the registry record the registration RPC would, pointing at the origin on 127.0.0.1
(the RPC itself is covered by tests/e2e/test_serve_control.py).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import secrets
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import pytest
from cryptography import x509

from gateway.certs.devca import ensure_dev_ca, issue_wildcard, write_cert_dir
from gateway.registry.records import InstanceRecord
from gateway.registry.sqlite import SqliteStore
from tests.certs.localstack import LocalStack, binaries_present, local_stack
from tests.certs.util import dns_update
from tests.helpers.gateway import Origin
from tests.helpers.processes import free_port, start, stop_by_pid, wait_listening, wait_until

pytestmark = pytest.mark.slow

DOC = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
STEP = re.compile(
    r"^[ \t]*<!-- walkthrough:step (\S+) -->\n([ \t]*)```sh\n(.*?)\n\2```", re.M | re.S
)
BASE = "apps.example.com"
ZONES = ["example.com", "example.org"]
APP_ID_HEX = "a1" * 20
CVM_APP, CVM_INSTANCE = "c1" * 20, "c2" * 20


def doc_steps(text: str) -> dict[str, str]:
    """The marked blocks, by name, in document order, with the list indentation removed."""
    steps: dict[str, str] = {}
    for match in STEP.finditer(text):
        name, body = match.group(1), textwrap.dedent(match.group(3))
        assert name not in steps, f"step {name!r} marked twice in {DOC}"
        steps[name] = body
    return steps


@dataclass
class Walk:
    """Runs the doc's steps one after another in bash, carrying exported variables along."""

    root: Path
    stack: LocalStack
    origin: Origin
    app_ca: Path
    pebble_root: Path
    proxy_port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    gateway: subprocess.Popen[bytes] | None = None
    unused: set[str] | None = None  # placeholders not yet found in any step

    @property
    def etc(self) -> Path:
        return self.root / "etc"

    @property
    def data(self) -> Path:
        return self.root / "var"

    @property
    def log(self) -> Path:
        return self.root / "gateway.log"

    def substitute(self, body: str) -> str:
        """Replace the placeholders the doc's table lists (``unused`` tracks the ones not
        met yet: the test fails if the doc drops one, so the table stays true)."""
        tsig = self.root / "tsig.secret"
        tsig.write_text(self.stack.tsig_secret + "\n")
        pairs = [
            ("/etc/gateway", str(self.etc)),
            ("/var/lib/gateway", str(self.data)),
            ("/run/secrets/tsig", str(tsig)),
            ("127.0.0.1:8001", f"127.0.0.1:{self.admin_port}"),
            ("0.0.0.0:443", f"127.0.0.1:{self.proxy_port}"),
            (
                "https://acme-staging-v02.api.letsencrypt.org/directory",
                self.stack.directory_url,
            ),
            ('ca_bundle = ""', f'ca_bundle = "{self.stack.listener_ca}"'),
            ("192.0.2.53:53", f"127.0.0.1:{self.stack.dns_port}"),
            ("192.0.2.53", "127.0.0.1"),
            ('"port": 53', f'"port": {self.stack.dns_port}'),
            ('"check_port": 53', f'"check_port": {self.stack.dns_port}'),
            ('"acme-key"', f'"{self.stack.tsig_name}"'),
            ("192.0.2.10", "127.0.0.1"),
            ("<40 hex>", APP_ID_HEX),
            ("<app_id>-8080.", f"{CVM_APP}-{self.origin.http}."),
            ('"port": 8080', f'"port": {self.origin.http}'),
            ("<instance_id>", CVM_INSTANCE),
            ("demo-8080.", f"demo-{self.origin.http}."),
            ('"port": 8443', f'"port": {self.origin.tls}'),
        ]
        if self.unused is None:
            self.unused = {old for old, _ in pairs}
        for old, new in pairs:
            if old in body:
                self.unused.discard(old)
            body = body.replace(old, new)
        # `gateway ctl`'s default --url is the doc's admin listener; ours is on another port
        body = body.replace(
            "gateway ctl ", f"gateway ctl --url http://127.0.0.1:{self.admin_port} "
        )
        # curl reaches the names on our proxy port and trusts the CA that signs each name:
        # pebble for the base domain, the app's own CA for passed-through custom domains
        lines = []
        for line in body.splitlines():
            host = re.match(r"curl -sS https://([^/:]+)/", line)
            if host:
                ca = self.pebble_root if host.group(1).endswith(BASE) else self.app_ca
                opts = f"--cacert {ca} --connect-to ::127.0.0.1:{self.proxy_port} --max-time 10"
                line = line.replace("curl -sS ", f"curl -sS {opts} ", 1)
            lines.append(line)
        return "\n".join(lines)

    def env(self) -> dict[str, str]:
        bindir = str(Path(sys.executable).parent)
        env = {k: v for k, v in os.environ.items() if k != "GATEWAY_ADMIN_TOKEN"}
        return {**env, "PATH": f"{bindir}:{env.get('PATH', '/usr/bin:/bin')}"}

    def bash(self, script: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``script`` with the variables earlier steps exported; export them on."""
        state = self.root / "exports.sh"
        full = (
            f"set -euo pipefail\ncd {self.root}\n"
            f"if [ -f {state} ]; then . {state}; fi\n"
            f"{script}\nexport -p > {state}\n"
        )
        done = subprocess.run(
            ["bash", "-c", full], env=self.env(), capture_output=True, text=True, timeout=60
        )
        if check:
            assert done.returncode == 0, (
                f"{script}\n-> {done.returncode}\n{done.stdout}\n{done.stderr}"
            )
        return done

    def step(self, name: str, steps: dict[str, str]) -> str:
        """Run the doc's step ``name``; its ``gateway serve`` line is started as a process."""
        body = self.substitute(steps[name])
        serve = [line for line in body.splitlines() if line.startswith("gateway serve ")]
        script = "\n".join(line for line in body.splitlines() if line not in serve)
        out = self.bash(script).stdout
        for line in serve:
            cmd = line.split("#", 1)[0].split()
            assert self.gateway is None, "the walkthrough starts gateway serve twice"
            self.gateway = start(
                [sys.executable, "-m", "gateway", *cmd[1:]], self.log, env=self.bash_env()
            )
            wait_listening(self.gateway, "127.0.0.1", self.proxy_port, timeout=20, log=self.log)
            wait_listening(self.gateway, "127.0.0.1", self.admin_port, timeout=20, log=self.log)
        return out

    def bash_env(self) -> dict[str, str]:
        """The environment of the operator's shell (GATEWAY_ADMIN_TOKEN exported by step 2)."""
        dump = self.bash("env -0", check=True).stdout
        return dict(item.split("=", 1) for item in dump.split("\0") if "=" in item)

    def ctl_json(self, words: str, check: bool = True) -> tuple[int, Any, str]:
        """``gateway ctl --json WORDS`` (a shell-quoted string) in the operator's shell."""
        done = self.bash(
            f"gateway ctl --url http://127.0.0.1:{self.admin_port} --json {words}",
            check=check,
        )
        return (
            done.returncode,
            json.loads(done.stdout) if done.stdout.strip() else None,
            done.stderr,
        )

    def fetch(self, name: str) -> str | None:
        """``GET /`` on ``name`` through the proxy (pebble's root), or None if refused."""
        done = subprocess.run(
            ["curl", "-sS", "--max-time", "5", "--cacert", str(self.pebble_root),
             "--connect-to", f"::127.0.0.1:{self.proxy_port}", f"https://{name}/"],
            capture_output=True, text=True, timeout=15,
        )  # fmt: skip
        return done.stdout if done.returncode == 0 else None

    def served_cert(self, name: str) -> x509.Certificate:
        """The certificate the proxy presents for ``name``, verified against pebble's root."""
        done = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{self.proxy_port}",
             "-servername", name, "-CAfile", str(self.pebble_root), "-verify_return_error"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=15,
        )  # fmt: skip
        assert done.returncode == 0 and "Verify return code: 0 (ok)" in done.stdout, (
            done.stdout[-2000:] + done.stderr[-2000:]
        )
        return x509.load_pem_x509_certificate(done.stdout.encode())


@pytest.fixture
def walk(tmp_path: Path) -> Iterator[Walk]:
    if not binaries_present():
        pytest.skip("pebble and knotd are not installed (apt-get install pebble knot)")
    dev = ensure_dev_ca(tmp_path / "app-ca")
    ca_cert, _ = dev.load()
    leaf, key = issue_wildcard(dev, ["shop.example.org", "www.example.org"])
    write_cert_dir(tmp_path / "app-certs", "app", [leaf, ca_cert], key)
    cert = tmp_path / "app-certs" / "app"
    olog = tmp_path / "origin.log"
    cmd = [sys.executable, "-m", "gateway.proxy.origin", "--http", "0", "--tls", "0"]
    cmd += ["--cert", str(cert / "fullchain.pem"), "--key", str(cert / "privkey.pem")]
    with local_stack(tmp_path / "acme", ZONES, cert_validity=90 * 86400) as stack:
        origin_proc: subprocess.Popen[bytes] = start(cmd, olog)
        walk = None
        try:
            wait_until(lambda: b"{" in olog.read_bytes(), origin_proc, 10, "origin", olog)
            ports = json.loads(olog.read_text().splitlines()[0])
            origin = Origin(origin_proc, ports["http"], ports["tls"], olog)
            pebble_root = tmp_path / "pebble-root.pem"
            pebble_root.write_bytes(stack.pebble_root_pem())
            walk = Walk(tmp_path, stack, origin, dev.cert_path, pebble_root)
            yield walk
        finally:
            if walk is not None and walk.gateway is not None:
                stop_by_pid(walk.gateway, grace=10)
            stop_by_pid(origin_proc)


def test_walkthrough_as_written(walk: Walk) -> None:
    steps = doc_steps(DOC.read_text())
    assert list(steps) == [
        *("dirs", "token", "config", "ready", "credential", "domain", "served", "admission"),
        *("custom", "daily", "drain", "undrain", "remove", "acme"),
    ]

    walk.step("dirs", steps)
    assert walk.etc.is_dir() and walk.data.is_dir()

    walk.step("token", steps)
    token_file = walk.etc / "admin.token"
    token = token_file.read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{64}", token) and token_file.stat().st_mode & 0o777 == 0o600
    assert walk.bash_env()["GATEWAY_ADMIN_TOKEN"] == token

    out = walk.step("config", steps)
    assert walk.gateway is not None
    assert str(walk.data) in out  # `config check` printed the resolved file

    def ready() -> bool:
        doc = json.loads(walk.step("ready", steps))
        assert set(doc) == {"ready", "not_ready", "checks"}, doc
        return bool(doc["ready"]) and doc["not_ready"] == []

    wait_until(ready, walk.gateway, 15, "/ready", walk.log)

    # step 4 (no commands): knot is the server the zone is delegated to; the names point
    # at the gateway (our curl and openssl connect to its port whatever they resolve to)
    dns_update(
        walk.stack.dns_port,
        (walk.stack.tsig_name, walk.stack.tsig_secret),
        "example.com",
        add=[(f"{BASE}.", 60, "A", "127.0.0.1"), (f"*.{BASE}.", 60, "A", "127.0.0.1")],
    )
    out = walk.step("credential", steps)
    secret = walk.stack.tsig_secret
    assert "primary" in out and secret not in out
    assert f"{secret[:4]}...{secret[-4:]}" in out  # redacted on read, as the doc says

    out = walk.step("domain", steps)
    assert BASE in out

    def has_cert() -> bool:
        _, doc, _ = walk.ctl_json(f"certificates get {BASE}")
        assert isinstance(doc, dict)
        return bool(doc["has_cert"])

    wait_until(has_cert, walk.gateway, 40, "the base domain's certificate", walk.log)
    _, cert_doc, _ = walk.ctl_json(f"certificates get {BASE}")
    assert isinstance(cert_doc, dict) and cert_doc["last_error"] in (None, ""), cert_doc

    # the proxy serves pebble's certificate on any name under the base (workers reload on
    # SIGHUP; wait for the overlay and certificate to reach both workers)
    def served_ok() -> bool:
        try:
            return walk.served_cert(f"gateway.{BASE}").serial_number == int(
                str(cert_doc["serial"]), 16
            )
        except AssertionError:
            return False

    wait_until(served_ok, walk.gateway, 15, "the certificate on the proxy", walk.log)
    served = walk.served_cert(f"demo-{walk.origin.http}.{BASE}")  # the app's name
    assert served.serial_number == int(str(cert_doc["serial"]), 16)
    sans = served.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(sans.get_values_for_type(x509.DNSName)) == sorted([BASE, f"*.{BASE}"])
    assert (walk.data / "certs" / BASE / "fullchain.pem").exists()  # certs follow data_dir
    out = walk.step("served", steps)
    index, _ = json.JSONDecoder().raw_decode(out, out.index('{"type"'))  # curl adds no newline
    assert index["type"] == "dstack gateway", out
    assert f"Hello from the demo app</h1><p>port {walk.origin.http}, plain TCP" in out, out

    walk.step("admission", steps)
    _, policy, _ = walk.ctl_json("admission get")
    assert isinstance(policy, dict) and APP_ID_HEX not in json.dumps(policy)  # reset at the end

    # the domain's owner publishes the TXT record in their zone (knot here)
    dns_update(
        walk.stack.dns_port,
        (walk.stack.tsig_name, walk.stack.tsig_secret),
        "example.org",
        add=[("_dstack-app-address.shop.example.org.", 60, "TXT", f'"demo:{walk.origin.tls}"')],
    )
    out = walk.step("custom", steps)
    # both curls reached the app's TLS port (passthrough; curl verified the app's own CA)
    assert out.count(f"port {walk.origin.tls}, TLS") == 2, out
    _, routes, _ = walk.ctl_json("custom-domains list")
    assert [r["domain"] for r in routes] == ["www.example.org"]

    out = walk.step("daily", steps)
    assert f'gateway_certificate_present{{domain="{BASE}"}} 1' in out, out
    assert "<title>gateway dashboard" in out
    assert token not in walk.log.read_text() and secret not in walk.log.read_text()

    cvm_instances(walk)
    acme_account(walk, steps)
    assert walk.unused == set(), "placeholders the doc no longer uses"

    renewal_failures_keep_serving(walk, int(str(cert_doc["serial"]), 16))


def cvm_instances(walk: Walk) -> None:
    """The drain / undrain / port-policy / remove steps, for a CVM the test registers by
    writing the registry record the registration RPC would (its WireGuard address is the
    origin's 127.0.0.1); the workers find it by polling the registry."""
    steps = doc_steps(DOC.read_text())
    now = time.time()
    store = SqliteStore(walk.data / "registry.sqlite3")
    try:
        store.put_instance(
            InstanceRecord(
                instance_id=CVM_INSTANCE, app_id=CVM_APP, public_key="A" * 43 + "=",
                ip=ipaddress.IPv4Address("127.0.0.1"), registered_at=now, last_seen=now,
                last_handshake=now,
                port_policy={"restrict_mode": True, "ports": [{"port": walk.origin.http}]},
            ),
            expect_revision=0,
        )  # fmt: skip
    finally:
        store.close()
    name = f"{CVM_APP}-{walk.origin.http}.{BASE}"

    def reachable() -> bool:
        return all(walk.fetch(name) is not None for _ in range(4))  # both workers

    def unreachable() -> bool:
        return all(walk.fetch(name) is None for _ in range(4))

    assert walk.gateway is not None
    wait_until(reachable, walk.gateway, 10, "the CVM's route in the workers", walk.log)
    out = walk.step("drain", steps)
    assert CVM_INSTANCE in out and f"port {walk.origin.http}, plain TCP" in out, out
    wait_until(unreachable, walk.gateway, 10, "the drain in the workers", walk.log)
    out = walk.step("undrain", steps)
    assert re.search(r"^source\s+admin$", out, re.M), out  # `port-policy get`, after `set`
    wait_until(reachable, walk.gateway, 10, "the undrain in the workers", walk.log)
    out = walk.step("remove", steps)
    assert out.count(CVM_INSTANCE) == 1, out  # in remove's answer, not in the list after it
    wait_until(unreachable, walk.gateway, 10, "the removal in the workers", walk.log)


def acme_account(walk: Walk, steps: dict[str, str]) -> None:
    """The schedule is applied, the account rotated at the CA, and CAA published in knot."""
    _, before, _ = walk.ctl_json("acme get")
    out = walk.step("acme", steps)
    _, after, _ = walk.ctl_json("acme get")
    assert after["account_uri"] and after["account_uri"] != before["account_uri"], out
    _, config, _ = walk.ctl_json("acme config")
    assert (config["check_interval"], config["renew_before"]) == (1800, 864000), config
    assert config["caa"] is True and config["caa_issuer"] == "letsencrypt.org", config
    answer = dns.query.udp(
        dns.message.make_query(BASE, "CAA"), "127.0.0.1", port=walk.stack.dns_port, timeout=3
    )
    caa = sorted(rd.to_text() for rrset in answer.answer for rd in rrset)
    pin = f'"letsencrypt.org;validationmethods=dns-01;accounturi={after["account_uri"]}"'
    assert caa == [f"0 issue {pin}", f"0 issuewild {pin}"], caa


def renewal_failures_keep_serving(walk: Walk, serial: int) -> None:
    """A refused DNS update, then a stopped CA: a forced renewal (the doc's command) fails
    with an error that names the cause, and the proxy keeps serving the old certificate.

    The CA is stopped before the right secret is restored: restoring it rebuilds the certbot,
    and nothing may renew behind the test's back while the CA is still up.
    """
    renew = f"certificates renew {BASE} --data '{{\"force\": true}}'"
    cred = (
        '{"kind": "rfc2136", "server": "127.0.0.1", "port": %d, "check_port": %d, '
        '"zone": "example.com", "tsig_key_name": "%s", "tsig_secret": "%s"}'
    )
    port, name = walk.stack.dns_port, walk.stack.tsig_name
    wrong = base64.b64encode(secrets.token_bytes(32)).decode()
    walk.ctl_json(f"dns-credentials set primary --data '{cred % (port, port, name, wrong)}'")
    rc, out, err = walk.ctl_json(renew, check=False)
    assert rc == 1 and out is None, (rc, out, err)
    assert "error: HTTP 502:" in err and "BADSIG" in err and "TSIG key" in err, err
    assert walk.served_cert(f"gateway.{BASE}").serial_number == serial

    walk.stack.stop_pebble()
    right = walk.stack.tsig_secret
    walk.ctl_json(f"dns-credentials set primary --data '{cred % (port, port, name, right)}'")
    rc, out, err = walk.ctl_json(renew, check=False)
    assert rc == 1 and out is None, (rc, out, err)
    assert "error: HTTP 502:" in err and "ca-unreachable" in err, err
    assert walk.served_cert(f"demo-{walk.origin.http}.{BASE}").serial_number == serial
    _, doc, _ = walk.ctl_json(f"certificates get {BASE}")
    assert doc["has_cert"] and "ca-unreachable" in doc["last_error"], doc
    assert int(str(doc["serial"]), 16) == serial
    _, history, _ = walk.ctl_json(f"certificates history {BASE}")
    assert [(int(c["serial"], 16), c["current"]) for c in history] == [(serial, True)], history
