"""CertManager rebuilds: a failing domain's back-off survives edits that do not concern it.

The certbot talks to a real (closed) TCP port as its CA, so each attempt fails fast with
``ca-unreachable`` and the back-off schedule is the real one.
"""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path

from gateway.certs.acme import AcmeClient
from gateway.certs.settings import AcmeSettings, DnsCredential
from gateway.control.certmanager import CertManager
from gateway.control.models import BaseDomain, Topic
from gateway.control.state import OperatorState
from gateway.registry.sqlite import SqliteStore
from tests.helpers.processes import free_port

SECRET = base64.b64encode(b"k" * 32).decode()


def _cred(zone: str, port: int) -> DnsCredential:
    return DnsCredential(
        kind="rfc2136",
        server="127.0.0.1",
        port=port,
        zone=zone,
        tsig_key_name="gw-test",
        tsig_secret_env="GW_TEST_CM_TSIG",
    )


async def _wait_failed(certs: CertManager, domain: str, timeout: float = 10.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = certs.status(domain)
        if st["failures"]:
            return st
        await asyncio.sleep(0.02)
    raise AssertionError(f"{domain} never failed: {certs.status(domain)}")


def test_back_off_survives_unrelated_rebuilds_and_resets_when_its_credential_changes(
    tmp_path: Path,
) -> None:
    dns_port = free_port()
    settings = AcmeSettings(
        enabled=True,
        directory_url=f"https://127.0.0.1:{free_port()}/dir",  # nothing listens: fails fast
        backoff_initial=600.0,
        backoff_max=3600.0,
        jitter=0.0,
        issue_timeout=5.0,
    )
    store = SqliteStore(tmp_path / "registry.sqlite3")
    state = OperatorState(
        store,
        config_domains={"a.test": BaseDomain("a.test", "cred-a", source="config")},
        config_credentials={"cred-a": _cred("a.test", dns_port)},
    )
    acme = AcmeClient(directory_url=settings.directory_url, state_dir=tmp_path / "acme")
    certs = CertManager(
        settings,
        state=state,
        certs_dir=tmp_path / "certs",
        acme=acme,
        on_change=lambda: None,
        env=lambda name: SECRET if name == "GW_TEST_CM_TSIG" else None,
    )
    state.subscribe(Topic.DOMAINS, certs.reconfigure)
    state.subscribe(Topic.DNS, certs.reconfigure)

    async def main() -> None:
        await certs.start()
        try:
            first = await _wait_failed(certs, "a.test")
            assert first["failures"] == 1
            # an unrelated edit: another base domain with its own credential
            state.put_domain(BaseDomain("b.test", "cred-a"), create=True)
            await certs.settled()
            await asyncio.sleep(0.3)  # a reset schedule would have retried by now
            kept = certs.status("a.test")
            assert kept["failures"] == 1, kept
            assert kept["next_check"] == first["next_check"], (kept, first)
            assert "b.test" in (certs.certbot.domains if certs.certbot else [])
            # a change that concerns a.test (the ACME settings) retries it at once
            await certs.set_config({"issue_timeout": 6.0})
            await asyncio.sleep(0.3)
            again = certs.status("a.test")
            assert again["next_check"] != first["next_check"], again
        finally:
            await certs.stop()
            store.close()

    asyncio.run(main())
