"""Certbot end to end: pebble issues short-lived certificates validated through knotd.

Every failure path must leave the served certificate byte-for-byte in place and raise a
typed error; renewals must really re-issue (a new serial from the CA).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import time
from collections.abc import Collection, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.certs import disk
from gateway.certs.acme import AcmeClient, PropagationCheck
from gateway.certs.certbot import Certbot
from gateway.certs.dns.base import CaaRecord, DnsProvider, NameServer
from gateway.certs.dns.propagation import wait_for_txt
from gateway.certs.errors import PROBLEM_CA_UNREACHABLE, CertError, DnsProviderError, IssuanceError
from gateway.certs.settings import AcmeDomain, AcmeSettings
from gateway.tee.base import RuntimeEvent, TeeError
from gateway.util.tasks import spawn
from tests.certs.conftest import CUSTOMER_ZONE, ZONE, rfc2136_provider
from tests.certs.localstack import LocalStack
from tests.certs.util import records_at, run, verify_chain
from tests.helpers.processes import free_port

pytestmark = pytest.mark.slow
PEBBLE_CERT_VALIDITY = 120  # seconds: renewal is tested in real time


class RecordingTee:
    """A TeeBackend test double (the simulated TDX lives in another package, not merged here).

    It returns a recognisable "quote" that embeds report_data, so the test can check that
    exactly the documented binding was asked for; ``fail`` makes it refuse like a broken TEE.
    """

    name = "test"

    def __init__(self) -> None:
        self.asked: list[bytes] = []
        self.fail = False

    def get_quote(self, report_data: bytes) -> bytes:
        if self.fail:
            raise TeeError("configfs-tsm: quote generation failed (test)")
        assert len(report_data) == 64
        self.asked.append(report_data)
        return b"QUOTE" + report_data

    def emit_event(self, event: RuntimeEvent) -> None:
        raise TeeError("not used")

    def runtime_events(self) -> tuple[RuntimeEvent, ...]:
        return ()

    def rtmrs(self) -> tuple[bytes, bytes, bytes, bytes]:
        return (bytes(48), bytes(48), bytes(48), bytes(48))

    def mrtd(self) -> bytes:
        return bytes(48)


def settings(**kw: Any) -> AcmeSettings:
    base = AcmeSettings(
        enabled=True,
        renew_before=30,
        check_interval=60,
        jitter=0,
        backoff_initial=1,
        backoff_max=4,
        issue_timeout=20,
        poll_interval=0.2,
        domains=(AcmeDomain(ZONE, "knot"),),
    )
    return replace(base, **kw)


class Env:
    """One certs dir and one account dir shared by the certbots a test builds."""

    def __init__(self, stack: LocalStack, tmp: Path) -> None:
        self.stack = stack
        self.certs = tmp / "certs"
        self.state = tmp / "acme"
        self.changes = 0

    def on_change(self) -> None:
        self.changes += 1

    def acme(self, directory_url: str | None = None) -> AcmeClient:
        return AcmeClient(
            directory_url=directory_url or self.stack.directory_url,
            state_dir=self.state,
            ca_bundle=self.stack.listener_ca,
            poll_interval=0.2,
        )

    def certbot(
        self,
        *,
        provider: DnsProvider | None = None,
        acme: AcmeClient | None = None,
        tee: RecordingTee | None = None,
        propagation: PropagationCheck | None = None,
        **kw: Any,
    ) -> Certbot:
        return Certbot(
            settings(**kw),
            acme=acme or self.acme(),
            providers={"knot": provider or rfc2136_provider(self.stack)},
            certs_dir=self.certs,
            on_change=self.on_change,
            tee=tee,
            propagation=propagation,
        )

    def snapshot(self) -> tuple[Path, bytes, bytes]:
        found = disk.read_current(self.certs, ZONE)
        assert found is not None
        return found


@pytest.fixture
def env(stack: LocalStack, tmp_path: Path) -> Env:
    return Env(stack, tmp_path)


def test_issues_when_missing_then_waits_until_due(env: Env) -> None:
    bot = env.certbot()
    assert bot.due(ZONE)
    results = run(bot.check_all())
    assert [r.renewed for r in results] == [True]
    assert env.changes == 1
    link = env.certs / ZONE
    assert link.is_symlink()
    path, chain, key = env.snapshot()
    assert path.parent == env.certs / disk.HISTORY_DIR / ZONE
    assert path.name == f"{results[0].serial:x}"
    assert (path / disk.KEY_FILE).stat().st_mode & 0o777 == 0o600
    leaf = x509.load_pem_x509_certificates(chain)[0]
    pub = serialization.load_pem_private_key(key, None).public_key()
    assert pub.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    verify_chain(chain, env.stack.pebble_root_pem(), [f"x.{ZONE}", ZONE])
    meta = json.loads((path / "meta.json").read_text())
    assert meta["serial"] == f"{results[0].serial:x}"
    assert meta["account_uri"].startswith("https://127.0.0.1:")
    # 120 s certificate, 30 s renew_before: not due, nothing re-issued
    again = run(bot.renew_now(ZONE, force=False))
    assert not again.renewed and again.serial == results[0].serial
    assert env.changes == 1
    (status,) = bot.status()
    assert status.failures == 0 and status.serial == results[0].serial
    assert status.next_check > time.time() + 30


def test_renew_now_really_reissues_and_keeps_history(env: Env) -> None:
    bot = env.certbot()
    first = run(bot.renew_now(ZONE))
    second = run(bot.renew_now(ZONE, force=True))
    assert second.renewed and second.serial != first.serial
    assert env.changes == 2
    served = disk.current(env.certs, ZONE)
    assert served is not None and served.serial == second.serial
    assert [h.serial for h in disk.history(env.certs, ZONE)] == [first.serial, second.serial]
    # pruning never removes the served certificate
    disk.prune(env.certs, ZONE, keep=0)
    assert [h.serial for h in disk.history(env.certs, ZONE)] == [second.serial]


def test_run_loop_renews_a_short_lived_certificate(env: Env) -> None:
    first = run(env.certbot().renew_now(ZONE))
    # renew_before (200 s) exceeds the whole validity (120 s): the loop must renew at once,
    # and then not hammer the CA (next check no sooner than backoff_initial)
    bot = env.certbot(renew_before=200, check_interval=0.5, backoff_initial=2)

    async def loop_until_renewed() -> None:
        task = spawn(bot.run(), name="certbot-under-test")
        try:
            deadline = time.monotonic() + 10
            while env.changes < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # a tight loop would re-issue again within this time
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    run(loop_until_renewed())
    assert env.changes == 2
    served = disk.current(env.certs, ZONE)
    assert served is not None and served.serial != first.serial
    verify_chain(env.snapshot()[1], env.stack.pebble_root_pem(), [ZONE])


def test_wrong_tsig_key_keeps_old_cert_and_backs_off(env: Env) -> None:
    run(env.certbot().renew_now(ZONE))
    before = env.snapshot()
    bad = rfc2136_provider(env.stack, secret="AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
    bot = env.certbot(provider=bad)
    t0 = time.time()
    with pytest.raises(DnsProviderError) as err:
        run(bot.renew_now(ZONE))
    assert err.value.rcode in ("BADSIG", "BADKEY")
    (st,) = bot.status()
    assert st.failures == 1 and st.last_error and "BAD" in st.last_error
    assert t0 + 1 <= st.next_check <= time.time() + 1.5  # backoff_initial = 1 s, jitter 0
    with pytest.raises(DnsProviderError):
        run(bot.renew_now(ZONE))
    (st,) = bot.status()
    assert st.failures == 2 and st.next_check >= t0 + 2  # doubled
    assert env.snapshot() == before
    assert env.changes == 1


def test_ca_down_keeps_old_cert(env: Env) -> None:
    run(env.certbot().renew_now(ZONE))
    before = env.snapshot()
    dead = env.acme(f"https://127.0.0.1:{free_port()}/dir")
    with pytest.raises(IssuanceError) as err:
        run(env.certbot(acme=dead).renew_now(ZONE))
    assert err.value.problem == PROBLEM_CA_UNREACHABLE
    assert env.snapshot() == before
    assert env.changes == 1


def test_ca_stopped_then_restarted(env: Env) -> None:
    """The real CA process goes away: typed error, old cert kept; when it is back (a new CA
    that forgot our account, same URL), the account is re-created and issuance resumes."""
    bot = env.certbot()
    first = run(bot.renew_now(ZONE))
    old_uri = bot.account_uri()
    before = env.snapshot()
    env.stack.stop_pebble()
    try:
        with pytest.raises(IssuanceError) as err:
            run(bot.renew_now(ZONE))
        assert err.value.problem == PROBLEM_CA_UNREACHABLE
        assert env.snapshot() == before
    finally:
        env.stack.start_pebble(same_ports=True)
    again = run(bot.renew_now(ZONE))
    assert again.serial != first.serial
    assert bot.account_uri() != old_uri  # the new CA gave the same key a new account
    verify_chain(env.snapshot()[1], env.stack.pebble_root_pem(), [ZONE])
    (st,) = bot.status()
    assert st.failures == 0 and st.last_error is None


def test_invalid_challenge_keeps_old_cert(env: Env) -> None:
    run(env.certbot().renew_now(ZONE))
    before = env.snapshot()
    provider = rfc2136_provider(env.stack)

    async def check_then_replace(
        name: str, values: Collection[str], servers: Sequence[NameServer], deadline: float
    ) -> list[NameServer]:
        lagging = await wait_for_txt(name, values, servers, deadline, poll_interval=0.2)
        for value in values:  # swap the right values for a wrong one behind the CA's back
            await provider.remove_txt(name, value)
        await provider.add_txt(name, "wrong-value")
        return lagging

    bot = env.certbot(provider=provider, propagation=check_then_replace)
    with pytest.raises(IssuanceError) as err:
        run(bot.renew_now(ZONE))
    assert err.value.problem.startswith("urn:ietf:params:acme:error:")
    assert env.snapshot() == before
    run(provider.remove_txt(f"_acme-challenge.{ZONE}", "wrong-value"))
    assert records_at(env.stack.dns_port, f"_acme-challenge.{ZONE}", "TXT") == []


def test_caa_pins_ca_and_account(env: Env) -> None:
    provider = rfc2136_provider(env.stack)
    run(provider.set_caa(ZONE, [CaaRecord(0, "issue", "other-ca.example")]))
    run(provider.add_txt(f"unrelated.{ZONE}", "keep-me"))
    iodef = 'iodef "mailto:security@gwtest.test"'
    from tests.certs.test_rfc2136 import add_raw

    add_raw(env.stack, ZONE, "CAA", f"0 {iodef}")
    try:
        bot = env.certbot(provider=provider, caa=True, caa_issuer="pebble.letsencrypt.org")
        run(bot.renew_now(ZONE))
        uri = bot.account_uri()
        assert uri
        value = f"pebble.letsencrypt.org;validationmethods=dns-01;accounturi={uri}"
        assert records_at(env.stack.dns_port, ZONE, "CAA") == sorted(
            [f"0 {iodef}", f'0 issue "{value}"', f'0 issuewild "{value}"']
        )
        # idempotent: a second issuance leaves the same records
        run(bot.renew_now(ZONE))
        assert len(records_at(env.stack.dns_port, ZONE, "CAA")) == 3
    finally:
        run(provider.set_caa(ZONE, []))
        run(provider.remove_txt(f"unrelated.{ZONE}", "keep-me"))
    assert records_at(env.stack.dns_port, ZONE, "CAA") == [f"0 {iodef}"]


def test_quote_binds_certificate_key_and_account(env: Env) -> None:
    tee = RecordingTee()
    bot = env.certbot(tee=tee, quote_binding=True)
    run(bot.renew_now(ZONE))
    path, chain, _ = env.snapshot()
    spki = (
        x509.load_pem_x509_certificates(chain)[0]
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    want = hashlib.sha512(b"zt-cert:" + spki).digest()
    doc = json.loads((path / "quote.json").read_text())
    assert doc["report_data"] == want.hex()
    assert doc["quote"] == (b"QUOTE" + want).hex()
    assert doc["public_key"] == spki.hex()
    uri = bot.account_uri()
    assert uri is not None
    account_rd = hashlib.sha512(b"acme-account:" + uri.encode()).digest()
    assert want in tee.asked and account_rd in tee.asked
    info = bot.acme_info()
    assert info["account_uri"] == uri
    (hist,) = info["quoted_hist_keys"]
    assert hist["public_key"] == spki.hex()
    assert json.loads(hist["quote"])["report_data"] == want.hex()
    assert json.loads(info["account_quote"])["report_data"] == account_rd.hex()
    # a failing TEE: the new certificate is not installed (fail closed), the old one serves
    before = env.snapshot()
    tee.fail = True
    with pytest.raises(CertError, match="quote"):
        run(bot.renew_now(ZONE))
    assert env.snapshot() == before


def test_on_change_failure_does_not_undo_install(env: Env) -> None:
    def broken() -> None:
        raise RuntimeError("reload failed")

    bot = Certbot(
        settings(),
        acme=env.acme(),
        providers={"knot": rfc2136_provider(env.stack)},
        certs_dir=env.certs,
        on_change=broken,
    )
    result = run(bot.renew_now(ZONE))
    served = disk.current(env.certs, ZONE)
    assert served is not None and served.serial == result.serial


def test_disk_full_while_writing_keeps_old_cert(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection: the second file write fails with ENOSPC (a full disk cannot be made
    on demand here, and root ignores permission bits)."""
    bot = env.certbot()
    run(bot.renew_now(ZONE))
    before = env.snapshot()
    real_write = disk._write
    calls = 0

    def failing_write(path: Path, data: bytes, mode: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data, mode)

    monkeypatch.setattr(disk, "_write", failing_write)
    with pytest.raises(CertError, match="cannot store"):
        run(bot.renew_now(ZONE))
    assert env.snapshot() == before
    assert not list((env.certs / disk.HISTORY_DIR / ZONE).glob(".tmp-*"))  # no debris
    (st,) = bot.status()
    assert st.failures == 1


def test_two_base_domains_with_their_own_credentials(env: Env) -> None:
    bot = Certbot(
        settings(domains=(AcmeDomain(ZONE, "knot"), AcmeDomain(CUSTOMER_ZONE, "customer"))),
        acme=env.acme(),
        providers={
            "knot": rfc2136_provider(env.stack),
            "customer": rfc2136_provider(env.stack, zone=CUSTOMER_ZONE),
        },
        certs_dir=env.certs,
        on_change=env.on_change,
    )
    results = run(bot.check_all())
    assert sorted(r.domain for r in results if r.renewed) == sorted([ZONE, CUSTOMER_ZONE])
    assert env.changes == 2
    assert disk.served_names(env.certs) == sorted([ZONE, CUSTOMER_ZONE])
    for name in (ZONE, CUSTOMER_ZONE):
        served = disk.current(env.certs, name)
        assert served is not None and sorted(served.names) == sorted([f"*.{name}", name])


def test_unknown_domain_and_credential_are_rejected(env: Env) -> None:
    with pytest.raises(ValueError, match="names no"):
        Certbot(
            settings(),
            acme=env.acme(),
            providers={"other": rfc2136_provider(env.stack)},
            certs_dir=env.certs,
            on_change=env.on_change,
        )
    with pytest.raises(CertError, match="not a configured base domain"):
        run(env.certbot().renew_now("example.org"))
