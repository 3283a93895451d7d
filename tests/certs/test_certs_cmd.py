"""The operator walkthrough, for real: a config file, a secret in the environment, the CLI.

Runs ``python -m gateway certs`` as a child process against pebble + knotd: the first
certificate, a forced renewal, ``acme-info``, a failing renewal that keeps the served
certificate (``status``) and a custom-domain lookup. Each call is a new process (~1 s).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.certs.conftest import CUSTOMER_ZONE, ZONE
from tests.certs.localstack import LocalStack
from tests.certs.util import dns_update, verify_chain

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[2]


def write_config(stack: LocalStack, tmp: Path) -> Path:
    cfg = tmp / "gateway.toml"
    cfg.write_text(
        f"""
[core]
data_dir = "{tmp / "data"}"
log_level = "warning"

[acme]
enabled = true
directory_url = "{stack.directory_url}"
ca_bundle = "{stack.listener_ca}"
contact_email = "ops@{ZONE}"
poll_interval = 0.2
issue_timeout = 30
renew_before = 600  # pebble here issues 1-hour certificates

[[acme.domains]]
base_domain = "{ZONE}"
dns = "knot"

[dns.credentials.knot]
kind = "rfc2136"
server = "127.0.0.1"
port = {stack.dns_port}
zone = "{ZONE}"
tsig_key_name = "{stack.tsig_name}"
tsig_secret_env = "GWG_TSIG_SECRET"
check_port = {stack.dns_port}

[dns.resolver]
nameservers = ["127.0.0.1:{stack.dns_port}"]
timeout = 2.0
"""
    )
    return cfg


def gateway(cfg: Path, *args: str, secret: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "GWG_TSIG_SECRET"}
    if secret is not None:
        env["GWG_TSIG_SECRET"] = secret
    return subprocess.run(
        [sys.executable, "-m", "gateway", "certs", "-c", str(cfg), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )


def test_walkthrough(stack: LocalStack, tmp_path: Path) -> None:
    cfg = write_config(stack, tmp_path)
    # forgot the secret: a clear configuration error naming the variable, nothing issued
    missing = gateway(cfg, "renew", secret=None)
    assert missing.returncode == 2 and "GWG_TSIG_SECRET" in missing.stderr

    first = gateway(cfg, "renew", secret=stack.tsig_secret)
    assert first.returncode == 0, first.stderr
    (result,) = json.loads(first.stdout)
    assert result["renewed"] is True
    served = tmp_path / "data" / "certs" / ZONE
    verify_chain((served / "fullchain.pem").read_bytes(), stack.pebble_root_pem(), [ZONE])
    assert stack.tsig_secret not in first.stdout + first.stderr

    forced = gateway(cfg, "renew", "--force", "--domain", ZONE, secret=stack.tsig_secret)
    assert json.loads(forced.stdout)[0]["serial"] != result["serial"]

    info = json.loads(gateway(cfg, "acme-info", secret=stack.tsig_secret).stdout)
    assert info["account_uri"].startswith("https://127.0.0.1:")
    assert len(info["quoted_hist_keys"]) == 2

    wrong = gateway(cfg, "renew", "--force", secret="A" * 43 + "=")
    assert wrong.returncode == 1
    assert json.loads(wrong.stdout)[0]["rcode"] == "BADSIG"
    status = json.loads(gateway(cfg, "status", secret=stack.tsig_secret).stdout)
    assert status[0]["serial"] == json.loads(forced.stdout)[0]["serial"]  # still served

    dns_update(
        stack.dns_port,
        (stack.tsig_name, stack.tsig_secret),
        CUSTOMER_ZONE,
        add=[(f"_dstack-app-address.cli.{CUSTOMER_ZONE}.", 60, "TXT", '"cliapp:443"')],
    )
    found = gateway(cfg, "resolve", f"cli.{CUSTOMER_ZONE}", secret=None)
    assert found.returncode == 0
    assert json.loads(found.stdout) == {
        "type": "AppAddress",
        "app_id": "cliapp",
        "port": 443,
        "record": f"_dstack-app-address.cli.{CUSTOMER_ZONE}",
    }
