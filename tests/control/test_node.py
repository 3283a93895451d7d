"""``gateway control`` as the whole control node, in a lab: a CVM refused under the file's
admission policy registers right after ``PUT /api/v1/admission-policy`` (no restart), is
reached through the tunnel, and shows in the admin API and ``/metrics``; the base domain
added through the API is what ``Info`` tells CVMs."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from gateway.lab.harness import Lab, cleanup_leftovers
from gateway.tee.sim_pki import SimPki
from gateway.tunnel.commands import in_netns
from tests.control.test_registration import APP, NOW, make_cvm, server_cert
from tests.helpers.gateway_rpc import make_ca
from tests.helpers.lab import require_lab
from tests.helpers.processes import start, stop_by_pid, wait_until

pytestmark = [pytest.mark.netns, pytest.mark.slow]
PREFIX = "gwi"
TOKEN = "node-token-" + "n" * 21


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    require_lab("curl")
    cleanup_leftovers(PREFIX)
    lab = Lab(cvms=1, workdir=tmp_path / "lab", prefix=PREFIX, gateway_device=False)
    lab.up()
    try:
        yield lab
    finally:
        lab.down()


def test_runtime_policy_admits_the_next_registration(lab: Lab, tmp_path: Path) -> None:
    (node,) = lab.nodes
    pki = SimPki.create(not_before=NOW - 86400)
    (tmp_path / "root.der").write_bytes(pki.root_ca_der)
    (tmp_path / "collateral.json").write_text(pki.collateral(NOW).to_json())
    ca = make_ca("lab KMS CA")
    (tmp_path / "ca.pem").write_bytes(ca[0].public_bytes(serialization.Encoding.PEM))
    cert_pem, key_pem = server_cert(ca, str(lab.underlay.ip))
    (tmp_path / "rpc.pem").write_bytes(cert_pem)
    (tmp_path / "rpc.key").write_bytes(key_pem)
    cvm = make_cvm(pki, tmp_path / "cvm", b"\x78" * 20, ca)
    sock = tmp_path / "admin.sock"
    config = tmp_path / "gateway.toml"
    config.write_text(
        f"[core]\ndata_dir = '{tmp_path / 'data'}'\n"
        f"[admin]\nlisten = 'unix:{sock}'\ntoken_env = 'GW_TEST_NODE_TOKEN'\n"
        f"[wg]\ninterface = '{lab.base}nd'\nnetns = ''\nlisten_port = {lab.wg_port}\n"
        f"endpoint = '{lab.endpoint}'\nbackend = 'wireguard-go'\n"
        f"[attest]\nroot_ca = '{tmp_path / 'root.der'}'\ncollateral_source = 'file'\n"
        f"collateral_file = '{tmp_path / 'collateral.json'}'\n"
        "[admission]\napp_ids = []\n"  # the file admits nobody
        f"[rpc]\naddress = '{lab.underlay.ip}'\nport = 8010\ncert_file = '{tmp_path / 'rpc.pem'}'\n"
        f"key_file = '{tmp_path / 'rpc.key'}'\nclient_ca_file = '{tmp_path / 'ca.pem'}'\n"
    )
    env = {**os.environ, "GW_TEST_NODE_TOKEN": TOKEN}
    cmd = in_netns(
        lab.gw_netns, [sys.executable, "-m", "gateway", "control", "--config", str(config)]
    )
    log = tmp_path / "control.log"
    url = f"https://{lab.underlay.ip}:8010/prpc"

    def register() -> tuple[int, dict[str, Any]]:
        out = subprocess.run(
            in_netns(
                node.netns,
                [
                    "curl", "-sS", "-w", "\n%{http_code}", "--cacert", str(tmp_path / "ca.pem"),
                    "--cert", str(cvm.cert), "--key", str(cvm.key),
                    "-H", "Content-Type: application/json",
                    "--data", json.dumps({"client_public_key": node.public_key}),
                    f"{url}/RegisterCvm",
                ],
            ),
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        body, _, code = out.stdout.rpartition("\n")
        assert out.returncode == 0, out.stderr + log.read_text()
        return int(code), json.loads(body)

    proc = start(cmd, log, env=env)
    admin = httpx.Client(
        transport=httpx.HTTPTransport(uds=str(sock)),
        base_url="http://admin",
        headers={"X-Admin-Token": TOKEN},
        timeout=10,
    )
    try:
        wait_until(lambda: b"registration RPC on" in log.read_bytes(), proc, 30, "rpc up", log)
        code, body = register()
        assert code == 403 and body["reason"] == "app_not_allowed", body

        r = admin.put("/api/v1/admission-policy", json={"app_ids": [APP]})
        assert r.status_code == 200 and r.json()["source"] == "admin", r.text
        code, answer = register()  # the same process, the next registration
        assert code == 200, answer
        lab.connect(
            node,
            ipaddress.IPv4Address(answer["wg"]["client_ip"]),
            server_public_key=answer["wg"]["servers"][0]["pk"],
        )
        assert lab.fetch_instance(node) == node.netns

        (inst,) = admin.get("/api/v1/instances").json()
        assert inst["app_id"] == APP and inst["ip"] == answer["wg"]["client_ip"]
        metrics = admin.get("/metrics").text
        assert 'gateway_registration_verifications_total{outcome="accepted"} 1' in metrics
        assert 'gateway_registration_verifications_total{outcome="app_not_allowed"} 1' in metrics
        assert "gateway_registration_verification_seconds_count 2" in metrics

        # a base domain added through the API is what CVMs are told
        cred = {"id": "cf", "kind": "cloudflare", "api_token": "t" * 40}
        assert admin.post("/api/v1/dns-credentials", json=cred).status_code == 201
        dom = {"domain": "apps.node.test", "dns_credential": "cf", "port": 8443}
        assert admin.post("/api/v1/domains", json=dom).status_code == 201
        out = subprocess.run(
            in_netns(node.netns, ["curl", "-sS", "--cacert", str(tmp_path / "ca.pem"),
                                  f"{url}/Info"]),
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        info = json.loads(out.stdout)
        assert (info["base_domain"], info["external_port"]) == ("apps.node.test", 8443)
    finally:
        admin.close()
        assert stop_by_pid(proc, grace=10) == 0, log.read_text()
