"""The control plane as ``gateway serve`` runs it, driven only by ``gateway ctl`` subprocesses.

A real pebble CA and knotd (``tests/certs``) back the certificate part: a DNS credential and
a base domain are added through the API, the certbot picks them up without a restart and
issues; ``certificates renew --data '{"force": true}'`` re-issues (a new serial from the CA).
Every resource group is driven at least once, in human and ``--json`` output.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.config import Config
from gateway.control.auth import Credentials
from gateway.control.overlay import read_overlay
from gateway.control.plane import ControlPlane
from gateway.control.settings import AdminSettings
from gateway.control.state import OperatorState
from gateway.registry.service import Registration
from gateway.registry.sqlite import SqliteStore
from gateway.settings import CoreSettings
from gateway.tunnel.keys import generate_private_key, public_key
from tests.certs.conftest import ZONE, stack  # noqa: F401  (the pebble + knotd fixture)
from tests.certs.localstack import LocalStack
from tests.helpers.processes import free_port

TOKEN = "plane-token-" + "p" * 20
CREDS = Credentials(token_digest=hashlib.sha256(TOKEN.encode()).digest())
APP = "f6" * 20


@contextmanager
def running(plane: ControlPlane) -> Iterator[ControlPlane]:
    """Run ``plane`` on a loop in a background thread (ctl runs in subprocesses meanwhile)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(plane.__aenter__(), loop).result(60)
        try:
            yield plane
        finally:
            asyncio.run_coroutine_threadsafe(plane.__aexit__(None, None, None), loop).result(60)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def ctl(target: list[str], *words: str, data: Any = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GATEWAY_ADMIN_TOKEN": TOKEN}
    extra = ["--data", json.dumps(data)] if data is not None else []
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "ctl", *target, *extra, *words],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    return out


def ok(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 0, out.stderr
    return out.stdout


def js(out: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(ok(out))


@pytest.mark.slow
def test_ctl_drives_every_resource_with_real_acme(
    stack: LocalStack,  # noqa: F811
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    port = free_port()
    cfg = Config(
        core=CoreSettings(data_dir=tmp_path / "data"),
        admin=AdminSettings(listen=f"127.0.0.1:{port}"),
        acme=stack.acme_settings(),
    )
    changes: list[float] = []
    plane = ControlPlane(cfg, creds=CREDS, on_cert_change=lambda: changes.append(time.time()))
    url = ["--url", f"http://127.0.0.1:{port}"]
    with running(plane):
        at_start = len(changes)  # the first /acme-info publication reloads the proxy once
        # DNS credential (the TSIG secret goes in, never comes back)
        cred = {
            "id": "knot",
            "kind": "rfc2136",
            "server": "127.0.0.1",
            "port": stack.dns_port,
            "zone": ZONE,
            "tsig_key_name": stack.tsig_name,
            "tsig_secret": stack.tsig_secret,
            "ttl": 10,
            "check_port": stack.dns_port,
        }
        added = ok(ctl(url, "dns-credentials", "add", data=cred))
        assert stack.tsig_secret not in added and "tsig_secret" in added
        listed = ok(ctl(url, "dns-credentials", "list"))
        assert listed.splitlines()[0].split()[:2] == ["ID", "KIND"]
        assert stack.tsig_secret not in listed

        # base domain: the certbot is rebuilt and issues without a restart
        added = js(
            ctl(url, "--json", "domains", "add", data={"domain": ZONE, "dns_credential": "knot"})
        )
        assert added["domain"] == ZONE and added["source"] == "admin"
        assert read_overlay(plane.overlay_file).base_domains == (ZONE,)  # for the workers
        deadline = time.monotonic() + 60
        first: dict[str, Any] = {}
        while time.monotonic() < deadline:
            first = httpx.get(
                f"http://127.0.0.1:{port}/api/v1/certificates/{ZONE}",
                headers={"X-Admin-Token": TOKEN},
            ).json()
            if first["has_cert"]:
                break
            time.sleep(0.3)
        assert first["has_cert"], first
        assert sorted(first["names"]) == sorted([ZONE, f"*.{ZONE}"])
        assert len(changes) > at_start, "the proxy's reload hook was not called"

        # renew: not due -> nothing; force -> a new certificate from the CA
        same = js(ctl(url, "--json", "certificates", "renew", ZONE, data={"force": False}))
        assert same["renewed"] is False and same["serial"] == first["serial"]
        forced = js(ctl(url, "--json", "certificates", "renew", ZONE, data={"force": True}))
        assert forced["renewed"] is True and forced["serial"] != first["serial"]
        history = js(ctl(url, "--json", "certificates", "history", ZONE))
        assert [h["serial"] for h in history] == [forced["serial"], first["serial"]]
        assert history[0]["current"] is True
        table = ok(ctl(url, "certificates", "list"))
        assert ZONE in table and "HAS_CERT" in table.splitlines()[0]
        acme = js(ctl(url, "--json", "acme", "get"))
        assert acme["account_uri"].startswith(stack.directory_url.rsplit("/", 1)[0])
        assert len(acme["quoted_hist_keys"]) == 2

        # instances, apps, drain, port policy
        plane.registry.register(Registration("inst-ctl", APP, public_key(generate_private_key())))
        assert "inst-ctl" in ok(ctl(url, "instances", "list"))
        assert js(ctl(url, "--json", "instances", "drain", "inst-ctl"))["draining"] is True
        assert js(ctl(url, "--json", "apps", "get", APP))["instances"][0]["draining"] is True
        policy = {"ports": [{"port": 8080, "pp": False}], "restrict_mode": True}
        view = js(ctl(url, "--json", "port-policy", "set", "inst-ctl", data=policy))
        assert view["source"] == "admin" and view["effective"] == policy
        assert "admin" in ok(ctl(url, "port-policy", "get", "inst-ctl"))

        # custom-domain route, admission policy, status, metrics, upstream alias
        route = {"domain": "shop.customer.test", "app_id": APP, "port": 8080}
        assert js(ctl(url, "--json", "custom-domains", "add", data=route))["port"] == 8080
        pol = js(ctl(url, "--json", "admission", "set", data={"allow_any_app": True}))
        assert pol["source"] == "admin" and plane.admission_policy().allow_any_app is True
        status = js(ctl(url, "--json", "status", "list"))
        assert status["counters"]["instances_draining"] == 1
        assert status["domains"][0]["domain"] == ZONE
        metrics = ok(ctl(url, "metrics", "get"))
        assert f'gateway_certificate_not_after_timestamp_seconds{{domain="{ZONE}"}}' in metrics
        assert js(ctl(url, "--json", "prpc", "GetMeta")) == {"registered": 1, "online": 0}

        # errors are problem documents, reported by ctl with the API's detail
        out = ctl(url, "domains", "add", data={"domain": ZONE, "dns_credential": "knot"})
        assert out.returncode == 1 and "HTTP 409" in out.stderr and "already exists" in out.stderr
        out = ctl(url, "dns-credentials", "remove", "knot")
        assert out.returncode == 1 and "used by base domain" in out.stderr

    assert "certbot reconfigured" in caplog.text
    assert stack.tsig_secret not in caplog.text  # nor in any log line, at any level

    # a restart keeps what the operator set (the certificate is on disk, state in the store)
    plane2 = ControlPlane(cfg, creds=CREDS)
    with running(plane2):
        assert plane2.admission_policy().allow_any_app is True
        assert [d.domain for d in plane2.state.domains()] == [ZONE]
        assert plane2.certs.status(ZONE)["serial"] == forced["serial"]
        assert set(plane2.state.drained()) == {"inst-ctl"}
    db = cfg.core.data_dir / "registry.sqlite3"  # holds the TSIG secret: owner-only
    assert db.stat().st_mode & 0o777 == 0o600
    assert stack.tsig_secret.encode() in b"".join(
        p.read_bytes() for p in db.parent.glob("registry.sqlite3*")
    )


def test_plane_serves_on_a_unix_socket(tmp_path: Path) -> None:
    sock = tmp_path / "run" / "admin.sock"
    cfg = Config(
        core=CoreSettings(data_dir=tmp_path / "data"),
        admin=AdminSettings(listen=f"unix:{sock}"),
    )
    store = SqliteStore(tmp_path / "shared.sqlite3")  # as the tunnel would hand it over
    with running(ControlPlane(cfg, creds=CREDS, store=store)) as plane:
        assert plane.address == sock and sock.stat().st_mode & 0o777 == 0o660
        out = ctl(["--unix", str(sock)], "domains", "list")
        assert ok(out).strip() == "(none)"
        assert js(ctl(["--unix", str(sock)], "--json", "admission", "get"))["source"] == "config"
        first = ctl(["--unix", str(sock)], "admission", "set", data={"allow_any_app": False})
        tag = [x.split(": ", 1)[1] for x in first.stderr.splitlines() if x.startswith("etag: ")]
        assert first.returncode == 0 and tag, first.stderr
        ok(ctl(["--unix", str(sock)], "--if-match", tag[0], "admission", "set",
               data={"allow_any_app": True}))  # fmt: skip
        stale = ctl(["--unix", str(sock)], "--if-match", tag[0], "admission", "set",
                    data={"allow_any_app": False})  # fmt: skip
        assert stale.returncode == 1 and "HTTP 412" in stale.stderr
    # the plane did not close a store it was given, and wrote into it
    assert OperatorState(store).admission()[1] == "admin"
    store.close()


def test_plane_refuses_to_start_without_admin_credentials(tmp_path: Path) -> None:
    from gateway.config import ConfigError

    cfg = Config(
        core=CoreSettings(data_dir=tmp_path / "data"),
        admin=AdminSettings(listen=f"127.0.0.1:{free_port()}", token_env="GW_TEST_NO_SUCH_VAR"),
    )

    async def start() -> None:
        async with ControlPlane(cfg):
            pass

    with pytest.raises(ConfigError, match="no credentials"):
        asyncio.run(start())
