"""Upstream's SetCaa, RotateAcmeCredentials and certbot-config RPCs as admin endpoints, against
a real pebble CA and knotd: CAA records land in the zone, a rotated account is a new account at
the CA (or, with ``key_change``, the same account under a new key, which pebble accepts), the
published ``/acme-info`` follows, and runtime settings persist across a restart."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.certs.settings import AcmeDomain, DnsCredential, DnsSettings
from gateway.config import Config
from gateway.control.plane import ControlPlane
from gateway.control.settings import AdminSettings
from gateway.proxy.info_file import read_info
from gateway.settings import CoreSettings
from tests.certs.conftest import ZONE, stack  # noqa: F401  (the pebble + knotd fixture)
from tests.certs.localstack import LocalStack
from tests.certs.util import records_at
from tests.control.test_plane import CREDS, TOKEN, ctl, js, running
from tests.helpers.processes import free_port

pytestmark = pytest.mark.slow
ISSUER = "pebble.letsencrypt.org"


def caa_values(s: LocalStack) -> list[str]:
    return records_at(s.dns_port, ZONE, "CAA")


def pinned(uri: str) -> list[str]:
    value = f'"{ISSUER};validationmethods=dns-01;accounturi={uri}"'
    return sorted([f"0 issue {value}", f"0 issuewild {value}"])


def published_account(plane: ControlPlane) -> str:
    import json

    return str(json.loads(read_info(plane.info_file).documents["acme-info"])["account_uri"])


def test_caa_rotation_and_runtime_config(
    stack: LocalStack,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GW_TEST_ACME_TSIG", stack.tsig_secret)
    port = free_port()
    cfg = Config(
        core=CoreSettings(data_dir=tmp_path / "data"),
        admin=AdminSettings(listen=f"127.0.0.1:{port}"),
        acme=stack.acme_settings(domains=(AcmeDomain(ZONE, "knot"),)),
        dns=DnsSettings(
            credentials={
                "knot": DnsCredential(
                    kind="rfc2136",
                    server="127.0.0.1",
                    port=stack.dns_port,
                    zone=ZONE,
                    tsig_key_name=stack.tsig_name,
                    tsig_secret_env="GW_TEST_ACME_TSIG",
                    ttl=10,
                    check_port=stack.dns_port,
                )
            }
        ),
    )
    changes: list[float] = []
    api = httpx.Client(
        base_url=f"http://127.0.0.1:{port}", headers={"X-Admin-Token": TOKEN}, timeout=60
    )

    def call(method: str, path: str, body: Any = None, **kw: Any) -> httpx.Response:
        return api.request(method, path, json=body, **kw)

    plane = ControlPlane(cfg, creds=CREDS, on_cert_change=lambda: changes.append(time.time()))
    with running(plane), api:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not plane.certs.status(ZONE)["has_cert"]:
            time.sleep(0.3)
        assert plane.certs.status(ZONE)["has_cert"]
        first_uri = call("GET", "/api/v1/acme").json()["account_uri"]
        assert published_account(plane) == first_uri  # republished after the first issuance

        # SetCaa needs the CA's CAA domain; then it pins it and our account on every domain
        r = call("POST", "/api/v1/acme/caa", {})
        assert r.status_code == 409 and r.json()["code"] == "not_configured", r.text
        conf = call("GET", "/api/v1/acme/config")
        assert conf.json()["overrides"] == [] and conf.json()["renew_before"] == 600
        r = call("PUT", "/api/v1/acme/config", {"caa_issuer": ISSUER})
        assert r.status_code == 200 and r.json()["overrides"] == ["caa_issuer"], r.text
        etag = r.headers["ETag"]
        r = call("POST", "/api/v1/acme/caa", {})
        assert r.json() == {"account_uri": first_uri, "domains_updated": [ZONE]}, r.text
        assert caa_values(stack) == pinned(first_uri)

        # rotation as upstream: a new account; CAA (caa on) re-pinned to it; /acme-info follows
        r = call("PUT", "/api/v1/acme/config", {"caa": True}, headers={"If-Match": etag})
        assert r.status_code == 200, r.text
        stale = call("PUT", "/api/v1/acme/config", {"caa": False}, headers={"If-Match": etag})
        assert stale.status_code == 412 and plane.certs.settings.caa is True
        before = len(changes)
        r = call("POST", "/api/v1/acme/rotate-credentials", {})
        assert r.status_code == 200, r.text
        second_uri = r.json()["account_uri"]
        assert second_uri != first_uri and r.json()["domains_updated"] == [ZONE]
        assert caa_values(stack) == pinned(second_uri)
        assert published_account(plane) == second_uri and len(changes) > before
        acme_dir = next((cfg.core.data_dir / "acme").iterdir())
        assert len(list(acme_dir.glob("account-key.pem.*.old"))) == 1  # the old key is kept

        # key_change: the same account under a new key (RFC 8555 keyChange at pebble)
        old_key = (acme_dir / "account-key.pem").read_bytes()
        r = call("POST", "/api/v1/acme/rotate-credentials", {"key_change": True})
        assert r.status_code == 200 and r.json()["account_uri"] == second_uri, r.text
        assert (acme_dir / "account-key.pem").read_bytes() != old_key
        # issuing signs with the new key; had pebble not bound it to the account, newAccount
        # with it would have made a third account (another URI)
        renewed = call("POST", f"/api/v1/certificates/{ZONE}/renew", {"force": True})
        assert renewed.status_code == 200 and renewed.json()["renewed"] is True, renewed.text
        assert call("GET", "/api/v1/acme").json()["account_uri"] == second_uri
        assert len(read_info_keys(plane)) == 2  # both certificates' keys are published

        # runtime schedule: validated like the file, applied by a rebuilt certbot
        old_bot = plane.certs.certbot
        r = call("PUT", "/api/v1/acme/config", {"renew_before": 7200, "check_interval": 900})
        assert r.status_code == 200, r.text
        assert plane.certs.settings.renew_before == 7200.0 and plane.certs.certbot is not old_bot
        for bad, field in (
            ({"renew_before": -1}, "body"),
            ({"check_interval": "soon"}, "check_interval"),
            ({"directory_url": "ftp://ca"}, "body"),
            ({"enabled": False}, "enabled"),
        ):
            r = call("PUT", "/api/v1/acme/config", bad)
            assert r.status_code == 400 and r.json()["field"] == field, (bad, r.text)
        assert plane.certs.settings.renew_before == 7200.0  # unchanged by the failures

        # upstream-named aliases
        got = call("POST", "/prpc/GetCertbotConfig").json()
        assert got == {"renew_interval_secs": 900, "renew_before_expiration_secs": 7200,
                       "renew_timeout_secs": 30, "acme_url": stack.directory_url}  # fmt: skip
        r = call("POST", "/prpc/SetCertbotConfig", {"renew_before_expiration_secs": 3600})
        assert r.status_code == 200 and plane.certs.settings.renew_before == 3600.0
        assert call("POST", "/prpc/SetCaa").json() == {}
        info = call("GET", "/prpc/AcmeInfo").json()
        assert list(info) == ["account_uri", "quoted_hist_keys", "account_quote",
                              "account_attestation"]  # fmt: skip
        assert info["account_uri"] == second_uri
        url = ["--url", f"http://127.0.0.1:{port}"]
        assert js(ctl(url, "--json", "acme", "config"))["check_interval"] == 900

        # another directory URL (the same pebble by name): a new client and account, at once
        other = stack.directory_url.replace("127.0.0.1", "localhost")
        r = call("PUT", "/api/v1/acme/config", {"directory_url": other})
        assert r.status_code == 200 and r.json()["directory_url"] == other, r.text
        renewed = call("POST", f"/api/v1/certificates/{ZONE}/renew", {"force": True})
        assert renewed.status_code == 200 and renewed.json()["renewed"] is True, renewed.text
        now = call("GET", "/api/v1/acme").json()
        assert now["directory_url"] == other and now["account_uri"] not in (first_uri, second_uri)
        assert published_account(plane) == now["account_uri"]

    # a restart applies what was set at runtime
    plane2 = ControlPlane(cfg, creds=CREDS)
    with running(plane2):
        s = plane2.certs.settings
        assert (s.check_interval, s.renew_before, s.caa, s.caa_issuer) == (900, 3600, True, ISSUER)
        assert plane2.certs.directory_url() == s.directory_url != stack.directory_url
        r = httpx.put(
            f"http://127.0.0.1:{port}/api/v1/acme/config",
            json={"renew_before": None, "check_interval": None},
            headers={"X-Admin-Token": TOKEN},
        )
        assert r.json()["overrides"] == ["caa", "caa_issuer", "directory_url"]
        assert plane2.certs.settings.renew_before == 600


def read_info_keys(plane: ControlPlane) -> list[Any]:
    import json

    doc = json.loads(read_info(plane.info_file).documents["acme-info"])
    return list(doc["quoted_hist_keys"])


def test_acme_endpoints_without_acme_answer_409(tmp_path: Path) -> None:
    port = free_port()
    cfg = Config(
        core=CoreSettings(data_dir=tmp_path / "data"),
        admin=AdminSettings(listen=f"127.0.0.1:{port}"),
    )
    with running(ControlPlane(cfg, creds=CREDS)) as plane:
        base = f"http://127.0.0.1:{port}"
        headers = {"X-Admin-Token": TOKEN}
        for path in ("/api/v1/acme/caa", "/api/v1/acme/rotate-credentials", "/prpc/SetCaa"):
            r = httpx.post(base + path, json={}, headers=headers)
            assert r.status_code == 409 and r.json()["code"] == "acme_disabled", (path, r.text)
        r = httpx.post(base + "/api/v1/acme/rotate-credentials", json={"key_change": 1},
                       headers=headers)  # fmt: skip
        assert r.status_code == 400 and r.json()["field"] == "key_change"
        # settings are still stored and shown (they apply once ACME is enabled)
        r = httpx.put(base + "/api/v1/acme/config", json={"jitter": 5}, headers=headers)
        assert r.status_code == 200 and r.json()["enabled"] is False
        assert plane.certs.settings.jitter == 5.0
        info = read_info(plane.info_file)
        assert set(info.documents) == {"acme-info"} and "no TEE" in info.unavailable["app-info"]
