"""``gateway rpc`` as a real process in the gateway namespace; a CVM registers over the lab
network with curl and its self-signed RA-TLS certificate (no client CA configured) and is
then reached through the tunnel, also after the gateway process restarts (peers restored
without re-registration); a KMS-chained CVM (dstack) registers against ``kms_root_file``."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from gateway.control.registration import load_kms_root
from gateway.lab.harness import Lab
from gateway.tee.sim_pki import SimPki
from gateway.tunnel.commands import in_netns
from gateway.tunnel.control import socket_listening, uapi_socket_path
from gateway.tunnel.keys import generate_private_key, public_key
from tests.control.test_registration import (
    APP,
    NOW,
    make_cvm,
    make_intermediate,
    make_kms_cvm,
    server_cert,
)
from tests.helpers.gateway_rpc import make_ca
from tests.helpers.lab import lab_env, make_lab, pytest_runtest_makereport
from tests.helpers.processes import start, stop_by_pid, wait_until

__all__ = ["lab_env", "make_lab", "pytest_runtest_makereport"]


def test_kms_root_file(tmp_path: Path) -> None:
    assert load_kms_root("") is None
    root = make_ca("KMS root")
    (tmp_path / "root.pem").write_bytes(root[0].public_bytes(serialization.Encoding.PEM))
    assert load_kms_root(str(tmp_path / "root.pem")) == root[0]
    (tmp_path / "junk.pem").write_text("junk")
    for bad in ("junk.pem", "missing.pem"):
        with pytest.raises(ValueError, match=f"rpc.kms_root_file .*{bad}"):
            load_kms_root(str(tmp_path / bad))


@pytest.mark.netns
@pytest.mark.slow
def test_cvm_registers_over_the_lab_network(make_lab: Callable[..., Lab], tmp_path: Path) -> None:
    lab = make_lab(cvms=1, gateway_device=False)
    (node,) = lab.nodes
    pki = SimPki.create(not_before=NOW - 86400)
    (tmp_path / "root.der").write_bytes(pki.root_ca_der)
    (tmp_path / "collateral.json").write_text(pki.collateral(NOW).to_json())
    ca = make_ca("lab KMS CA")
    (tmp_path / "ca.pem").write_bytes(ca[0].public_bytes(serialization.Encoding.PEM))
    cert_pem, key_pem = server_cert(ca, str(lab.underlay.ip))
    (tmp_path / "rpc.pem").write_bytes(cert_pem)
    (tmp_path / "rpc.key").write_bytes(key_pem)
    cvm = make_cvm(pki, tmp_path / "cvm", b"\x77" * 20, None)  # self-signed RA-TLS
    kms_root = make_ca("lab KMS root")
    (tmp_path / "kms-root.pem").write_bytes(kms_root[0].public_bytes(serialization.Encoding.PEM))
    kms_cvm = make_kms_cvm(
        tmp_path / "kms-cvm", make_intermediate(kms_root, "app CA"), b"\x78" * 20
    )
    iface = f"{lab.base}rp"
    config = tmp_path / "gateway.toml"
    config.write_text(
        f"[core]\ndata_dir = '{tmp_path / 'data'}'\n"
        f"[wg]\ninterface = '{iface}'\nnetns = ''\nlisten_port = {lab.wg_port}\n"
        f"endpoint = '{lab.endpoint}'\nbackend = 'wireguard-go'\n"
        f"[attest]\nroot_ca = '{tmp_path / 'root.der'}'\ncollateral_source = 'file'\n"
        f"collateral_file = '{tmp_path / 'collateral.json'}'\n"
        f"[admission]\napp_ids = ['{APP}']\nallow_kms_cert = true\n"
        f"[rpc]\naddress = '{lab.underlay.ip}'\nport = 8010\ncert_file = '{tmp_path / 'rpc.pem'}'\n"
        f"key_file = '{tmp_path / 'rpc.key'}'\n"  # no client CA: the evidence decides
        f"kms_root_file = '{tmp_path / 'kms-root.pem'}'\n"
    )
    cmd = in_netns(lab.gw_netns, [sys.executable, "-m", "gateway", "rpc", "--config", str(config)])
    url = f"https://{lab.underlay.ip}:8010/prpc/RegisterCvm"

    def launch(log: Path) -> subprocess.Popen[bytes]:
        proc = start(cmd, log)
        wait_until(lambda: b"registration RPC on" in log.read_bytes(), proc, 20, "rpc up", log)
        return proc

    log1 = tmp_path / "rpc1.log"
    proc = launch(log1)
    try:
        out = subprocess.run(
            in_netns(
                node.netns,
                [
                    "curl", "-sS", "--fail-with-body", "--cacert", str(tmp_path / "ca.pem"),
                    "--cert", str(cvm.cert), "--key", str(cvm.key),
                    "-H", "Content-Type: application/json",
                    "--data", json.dumps({"client_public_key": node.public_key}), url,
                ],
            ),
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr + log1.read_text()
        answer = json.loads(out.stdout)
        (server,) = answer["wg"]["servers"]
        assert server["endpoint"] == lab.endpoint and server["ip"] == "10.0.0.1/24"
        lab.connect(
            node, ipaddress.IPv4Address(answer["wg"]["client_ip"]), server_public_key=server["pk"]
        )
        assert lab.fetch_instance(node) == node.netns
        # dstack compatibility: a KMS-issued chain (leaf + app CA, no quote) registers too
        kms = subprocess.run(
            in_netns(
                node.netns,
                [
                    "curl", "-sS", "--fail-with-body", "--cacert", str(tmp_path / "ca.pem"),
                    "--cert", str(kms_cvm.cert), "--key", str(kms_cvm.key),
                    "-H", "Content-Type: application/json",
                    "--data", json.dumps({"client_public_key": public_key(generate_private_key())}),
                    url,
                ],
            ),
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert kms.returncode == 0, kms.stdout + kms.stderr + log1.read_text()
        assert json.loads(kms.stdout)["wg"]["client_ip"] != answer["wg"]["client_ip"]
    finally:
        assert stop_by_pid(proc, grace=10) == 0, log1.read_text()
    assert not socket_listening(uapi_socket_path(iface))
    assert lab.fetch_instance(node, timeout=1) is None

    log2 = tmp_path / "rpc2.log"
    proc = launch(log2)  # same data dir: key, registry; peers restored at start
    try:
        deadline = time.monotonic() + 15
        while lab.fetch_instance(node, timeout=1) != node.netns:
            assert time.monotonic() < deadline, "no traffic after restart\n" + log2.read_text()
            time.sleep(0.1)
        assert "peers restored: 2 added (1 with endpoint hints)" in log2.read_text()
    finally:
        assert stop_by_pid(proc, grace=10) == 0, log2.read_text()
