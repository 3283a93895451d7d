"""AcmeClient against a real pebble CA validating through a real knotd (RFC 2136 + TSIG)."""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Sequence
from pathlib import Path

import pytest
from cryptography import x509

from gateway.certs.acme import AcmeClient
from gateway.certs.dns.base import NameServer
from gateway.certs.dns.propagation import wait_for_txt
from gateway.certs.errors import (
    PROBLEM_CA_UNREACHABLE,
    PROBLEM_DNS_PROPAGATION,
    PROBLEM_TIMEOUT,
    DnsProviderError,
    IssuanceError,
)
from tests.certs.conftest import ZONE, rfc2136_provider
from tests.certs.localstack import LocalStack, binaries_present, local_stack
from tests.certs.util import records_at, run, verify_chain
from tests.helpers.processes import free_port

pytestmark = pytest.mark.slow
CHALLENGE = f"_acme-challenge.{ZONE}"


def client(stack: LocalStack, state: Path, **kw: float) -> AcmeClient:
    return AcmeClient(
        directory_url=stack.directory_url,
        state_dir=state,
        contact_email="ops@gwtest.test",
        ca_bundle=stack.listener_ca,
        poll_interval=0.2,
        **kw,  # type: ignore[arg-type]
    )


def test_issues_wildcard_and_apex_chaining_to_pebble_root(
    stack: LocalStack, tmp_path: Path
) -> None:
    acme = client(stack, tmp_path)
    start = time.monotonic()
    cert = run(acme.issue(ZONE, rfc2136_provider(stack), time.monotonic() + 30))
    elapsed = time.monotonic() - start
    assert sorted(cert.names) == sorted([f"*.{ZONE}", ZONE])
    leaf = x509.load_pem_x509_certificates(cert.fullchain_pem)[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(san.get_values_for_type(x509.DNSName)) == sorted([f"*.{ZONE}", ZONE])
    assert len(x509.load_pem_x509_certificates(cert.fullchain_pem)) >= 2  # leaf + intermediate
    verify_chain(cert.fullchain_pem, stack.pebble_root_pem(), [f"app.{ZONE}", ZONE])
    # the challenge records are gone again
    assert records_at(stack.dns_port, CHALLENGE, "TXT") == []
    assert elapsed < 5, elapsed


def test_account_is_reused_across_runs(stack: LocalStack, tmp_path: Path) -> None:
    first = client(stack, tmp_path)
    uri = run(first.account_uri(time.monotonic() + 10))
    key_file = next(tmp_path.glob("*/account-key.pem"))
    key_before = key_file.read_bytes()
    assert key_file.stat().st_mode & 0o777 == 0o600
    # a second process (new object) with the same state dir finds the same account
    second = client(stack, tmp_path)
    assert second.stored_account_uri() == uri
    run(second.issue(ZONE, rfc2136_provider(stack), time.monotonic() + 30))
    assert second.stored_account_uri() == uri
    assert key_file.read_bytes() == key_before
    # another state dir means another key, hence another account
    other = client(stack, tmp_path / "other")
    assert run(other.account_uri(time.monotonic() + 10)) != uri


def test_wrong_tsig_key_is_a_typed_dns_error(stack: LocalStack, tmp_path: Path) -> None:
    bad = rfc2136_provider(stack, secret="AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
    with pytest.raises(DnsProviderError) as err:
        run(client(stack, tmp_path).issue(ZONE, bad, time.monotonic() + 30))
    assert err.value.zone == ZONE
    assert err.value.rcode in ("BADSIG", "BADKEY", "NOTAUTH")
    assert records_at(stack.dns_port, CHALLENGE, "TXT") == []


def test_ca_down_is_ca_unreachable(stack: LocalStack, tmp_path: Path) -> None:
    acme = AcmeClient(
        directory_url=f"https://127.0.0.1:{free_port()}/dir",
        state_dir=tmp_path,
        ca_bundle=stack.listener_ca,
    )
    with pytest.raises(IssuanceError) as err:
        run(acme.issue(ZONE, rfc2136_provider(stack), time.monotonic() + 10))
    assert err.value.problem == PROBLEM_CA_UNREACHABLE
    assert err.value.domain == ZONE


def test_ca_rejects_challenge_when_txt_disappears(stack: LocalStack, tmp_path: Path) -> None:
    """The TXT is removed after our propagation check: pebble finds nothing and says so."""
    provider = rfc2136_provider(stack)

    async def check_then_remove(
        name: str, values: Collection[str], servers: Sequence[NameServer], deadline: float
    ) -> list[NameServer]:
        lagging = await wait_for_txt(name, values, servers, deadline, poll_interval=0.2)
        for value in values:
            await provider.remove_txt(name, value)
        return lagging

    with pytest.raises(IssuanceError) as err:
        run(
            client(stack, tmp_path).issue(
                ZONE, provider, time.monotonic() + 30, propagation=check_then_remove
            )
        )
    assert err.value.problem.startswith("urn:ietf:params:acme:error:"), err.value.problem
    assert err.value.problem.endswith(("unauthorized", "incorrectResponse", "dns"))
    assert records_at(stack.dns_port, CHALLENGE, "TXT") == []


def test_propagation_deadline_with_a_dead_name_server(stack: LocalStack, tmp_path: Path) -> None:
    """A listed authoritative server that never answers makes us stop before asking the CA."""
    dead = NameServer("127.0.0.1", free_port())
    provider = rfc2136_provider(stack)
    provider._check_servers = (dead,)  # as if configured in check_servers
    start = time.monotonic()
    with pytest.raises(IssuanceError) as err:
        run(client(stack, tmp_path).issue(ZONE, provider, time.monotonic() + 1.5))
    assert err.value.problem == PROBLEM_DNS_PROPAGATION
    assert str(dead) in err.value.detail
    assert time.monotonic() - start < 4
    assert records_at(stack.dns_port, CHALLENGE, "TXT") == []


def test_deadline_already_passed(stack: LocalStack, tmp_path: Path) -> None:
    with pytest.raises(IssuanceError) as err:
        run(client(stack, tmp_path).issue(ZONE, rfc2136_provider(stack), time.monotonic() - 1))
    assert err.value.problem == PROBLEM_TIMEOUT


@pytest.mark.skipif(not binaries_present(), reason="pebble/knotd not installed")
def test_bad_nonces_are_retried(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """pebble rejecting 30 % of valid nonces: the library alone retries once, we retry more."""
    caplog.set_level(logging.DEBUG, logger="gateway.certs.acme")
    with local_stack(
        tmp_path / "stack", [ZONE], pebble_env={"PEBBLE_WFE_NONCEREJECT": "30"}
    ) as noisy:
        acme = client(noisy, tmp_path / "state")
        for _ in range(2):
            cert = run(acme.issue(ZONE, rfc2136_provider(noisy), time.monotonic() + 30))
            assert ZONE in cert.names
        log = (noisy.workdir / "pebble.log").read_text()
        assert "Configured to reject 30% of good nonces" in log
    # ~24 signed POSTs at 30 %: retries did happen (P(none) ~ 0.02 %) and all were absorbed
    assert any("retrying after badNonce" in r.getMessage() for r in caplog.records)


def test_silent_secondary_is_skipped_after_propagation_wait(
    stack: LocalStack, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A dead secondary does not block issuance for good: after ``propagation_wait`` it is
    skipped (with a warning naming it) because the primary shows the values."""
    caplog.set_level(logging.WARNING, logger="gateway.certs.dns.propagation")
    dead = NameServer("127.0.0.1", free_port())
    provider = rfc2136_provider(stack)
    provider._check_servers = (dead,)
    start = time.monotonic()
    cert = run(
        client(stack, tmp_path, propagation_wait=0.3).issue(ZONE, provider, time.monotonic() + 30)
    )
    assert sorted(cert.names) == sorted([f"*.{ZONE}", ZONE])
    assert time.monotonic() - start < 10
    assert any(str(dead) in r.getMessage() for r in caplog.records), caplog.text
    assert records_at(stack.dns_port, CHALLENGE, "TXT") == []
