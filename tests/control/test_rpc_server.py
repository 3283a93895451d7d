"""The one builder of the registration RPC (``prepare_rpc`` + ``start_rpc``), in process.

With an attested identity (simulated TDX): the listener presents the RA-TLS certificate,
the renewal task started beside it reaches the live listener, the admission policy getter
is read per registration (a change admits the next CVM), ``instrument`` and ``configure``
see every check and the service, and closing the stack stops the listener and the renewal.
With certificate files: that pair is served. Problems surface in ``prepare_rpc``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import ssl
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.attest.policy_settings import AdmissionPolicy
from gateway.attest.ratls import verify_ratls_cert
from gateway.attest.verifier import EvidenceResult
from gateway.config import Config, parse_config
from gateway.control.registration import EvidenceCheck, RegistrationService
from gateway.control.rpc_identity import RpcIdentity, RpcIdentityError, RpcIdentityOptions
from gateway.control.rpc_server import prepare_rpc, start_rpc
from gateway.control.tls_server import TlsServerError
from gateway.registry.factory import build_registry, open_store
from gateway.registry.runtime import Tunnel
from gateway.tee.sim_pki import SimPki
from tests.control.test_registration import APP, make_cvm
from tests.helpers.gateway_rpc import GW_APP, measured_tee, plain_server_files
from tests.helpers.processes import free_port


def _config(tmp: Path, port: int, rpc: str) -> Config:
    pki = SimPki.load_or_create(tmp / "sim" / "pki")
    measured_tee(pki, tmp / "sim" / "tee", GW_APP, b"\x11" * 20)
    (tmp / "root.der").write_bytes(pki.root_ca_der)
    (tmp / "collateral.json").write_text(pki.collateral(int(time.time())).to_json())
    return parse_config(
        f"[core]\ndata_dir = '{tmp / 'data'}'\n"
        f"[attest]\nroot_ca = '{tmp / 'root.der'}'\ncollateral_source = 'file'\n"
        f"collateral_file = '{tmp / 'collateral.json'}'\n"
        f"[rpc]\naddress = '127.0.0.1'\nport = {port}\n{rpc}"
    )


def _tunnel(cfg: Config) -> Tunnel:
    """The tunnel's registry without a WireGuard device (the store records peers)."""
    store = open_store(cfg.registry, cfg.core.data_dir)
    registry = build_registry(store, cfg.wg, cfg.registry, None)
    device: Any = None  # never reached: the registry has no device
    return Tunnel(device, store, registry, "pk" + "A" * 41 + "=")


async def _served_der(port: int) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # RA-TLS: the quote decides
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return bytes(der)


def test_attested_rpc_policy_per_registration_renewal_and_shutdown(tmp_path: Path) -> None:
    port = free_port()
    cfg = _config(tmp_path, port, f"[rpc_identity]\ntee = 'sim'\nsim_dir = '{tmp_path / 'sim'}'\n")
    plan = prepare_rpc(cfg)  # issues the RA-TLS certificate through the sim TEE
    assert plan.identity is not None and plan.creds.cert_file == plan.identity.cert_file
    clock = [time.time()]
    fast = RpcIdentity(
        plan.identity.tee,
        plan.identity.directory,
        RpcIdentityOptions(check_interval=0.05),
        clock=lambda: clock[0],
    )
    plan = dataclasses.replace(plan, identity=fast)
    cvm = make_cvm(SimPki.load(tmp_path / "sim" / "pki"), tmp_path / "cvm", b"\x22" * 20, None)
    policy = [AdmissionPolicy(app_ids=())]
    checks: list[int] = []
    configured: list[RegistrationService] = []

    def instrument(check: EvidenceCheck) -> EvidenceCheck:
        async def counted(chain: list[bytes]) -> EvidenceResult:
            checks.append(1)
            return await check(chain)

        return counted

    client_ctx = ssl.create_default_context()
    client_ctx.check_hostname, client_ctx.verify_mode = False, ssl.CERT_NONE
    client_ctx.load_cert_chain(cvm.cert, cvm.key)

    async def register(client: httpx.AsyncClient) -> tuple[int, dict[str, Any]]:
        r = await client.post("/prpc/RegisterCvm", json={"client_public_key": "B" * 43 + "="})
        return r.status_code, json.loads(r.content)

    async def scenario() -> None:
        tunnel = _tunnel(cfg)
        try:
            async with AsyncExitStack() as stack:
                site = await start_rpc(
                    cfg,
                    plan,
                    tunnel,
                    stack,
                    policy=lambda: policy[0],
                    instrument=instrument,
                    configure=configured.append,
                )
                assert site.port == port and len(configured) == 1
                # CVMs registering without a port policy get it fetched from their agent
                assert configured[0].policy_fetch is not None
                first = await _served_der(port)
                assert first == x509.load_pem_x509_certificate(
                    fast.cert_file.read_bytes()
                ).public_bytes(serialization.Encoding.DER)
                pki = SimPki.load(tmp_path / "sim" / "pki")
                evidence = verify_ratls_cert(  # what a CVM checks: the quote binds the key
                    first,
                    collateral=pki.collateral(int(time.time())),
                    root_ca_der=pki.root_ca_der,
                    now=int(time.time()),
                )
                assert evidence.identity.app_id.hex() == GW_APP
                url = f"https://127.0.0.1:{port}"
                async with httpx.AsyncClient(base_url=url, verify=client_ctx) as client:
                    code, body = await register(client)
                    assert (code, body["reason"]) == (403, "app_not_allowed"), body
                    policy[0] = AdmissionPolicy(app_ids=(APP,))  # read per registration
                    code, body = await register(client)
                    assert code == 200 and body["wg"]["client_ip"], body
                assert len(checks) == 2
                assert [i.app_id for i in tunnel.store.list_instances()] == [APP]
                clock[0] += 7 * 86400  # due for renewal: the task re-issues and reloads
                deadline = time.monotonic() + 10
                while (renewed := await _served_der(port)) == first:
                    assert time.monotonic() < deadline, "the renewal did not reach the listener"
                    await asyncio.sleep(0.05)
                assert renewed != first
            with pytest.raises(OSError):  # the stack closed: the listener is gone
                await _served_der(port)
            renewal = [t for t in asyncio.all_tasks() if t.get_name() == "rpc-identity"]
            assert not renewal, "the renewal task outlived the stack"
        finally:
            tunnel.store.close()

    asyncio.run(scenario())


def test_certificate_files_are_served_as_they_are(tmp_path: Path) -> None:
    cert, key = plain_server_files(tmp_path / "files")
    port = free_port()
    cfg = _config(tmp_path, port, f"cert_file = '{cert}'\nkey_file = '{key}'\n")
    plan = prepare_rpc(cfg)
    assert plan.identity is None and plan.creds.cert_file == cert

    async def scenario() -> bytes:
        tunnel = _tunnel(cfg)
        try:
            async with AsyncExitStack() as stack:
                await start_rpc(cfg, plan, tunnel, stack, policy=AdmissionPolicy)
                return await _served_der(port)
        finally:
            tunnel.store.close()

    served = x509.load_der_x509_certificate(asyncio.run(scenario()))
    assert served == x509.load_pem_x509_certificate(cert.read_bytes())


def test_problems_surface_before_anything_runs(tmp_path: Path) -> None:
    cert, _ = plain_server_files(tmp_path / "files")
    _, other_key = plain_server_files(tmp_path / "other")
    cfg = _config(tmp_path, 1, f"cert_file = '{cert}'\nkey_file = '{other_key}'\n")
    with pytest.raises(TlsServerError):  # a key that does not match the certificate
        prepare_rpc(cfg)
    cfg = _config(tmp_path, 1, "")
    with pytest.raises(RpcIdentityError, match="needs a certificate"):
        prepare_rpc(cfg)
