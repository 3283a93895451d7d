"""Operator state on a real SQLite store: validation, revisions, persistence, notifications."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.attest.policy_settings import AdmissionPolicy
from gateway.certs.settings import DnsCredential
from gateway.control.models import (
    BaseDomain,
    CustomRoute,
    Exists,
    FieldError,
    InUse,
    NotFound,
    PortPolicyOverride,
    ReadOnly,
    RevisionMismatch,
    StoredCredential,
    Topic,
    redact,
)
from gateway.control.state import OperatorState
from gateway.registry.sqlite import SqliteStore

SECRET = base64.b64encode(b"k" * 32).decode()
APP = "ab" * 20


def cred(cred_id: str = "knot", secret: str = SECRET) -> StoredCredential:
    return StoredCredential.from_json(
        {
            "id": cred_id,
            "kind": "rfc2136",
            "server": "127.0.0.1",
            "zone": "example.test",
            "tsig_key_name": "gw-key",
            "tsig_secret": secret,
        }
    )


@pytest.mark.parametrize(
    "raw,want",
    [
        ("  Apps.Example.COM. ", "apps.example.com"),
        ("*.apps.example.com", "apps.example.com"),
        ("a-b.example.com", "a-b.example.com"),
    ],
)
def test_domains_are_normalised_like_upstream(raw: str, want: str) -> None:
    assert BaseDomain.from_json({"domain": raw, "dns_credential": "knot"}).domain == want


@pytest.mark.parametrize(
    "body,field",
    [
        ({"domain": "-bad-.example.com", "dns_credential": "knot"}, "domain"),
        ({"domain": "localhost", "dns_credential": "knot"}, "domain"),
        ({"domain": "a..b.com", "dns_credential": "knot"}, "domain"),
        ({"domain": "x.example.com", "dns_credential": "Bad Id"}, "dns_credential"),
        ({"domain": "x.example.com", "dns_credential": "knot", "port": 0}, "port"),
        ({"domain": "x.example.com", "dns_credential": "knot", "port": True}, "port"),
        ({"domain": "x.example.com"}, "dns_credential"),
        ({"domain": "x.example.com", "dns_credential": "knot", "extra": 1}, "extra"),
    ],
)
def test_domain_validation_names_the_field(body: dict[str, object], field: str) -> None:
    with pytest.raises(FieldError) as err:
        BaseDomain.from_json(body)
    assert err.value.field == field


def test_credential_validation_and_redaction() -> None:
    c = cred()
    shown = c.to_json()
    assert shown["tsig_secret"] == f"{SECRET[:4]}...{SECRET[-4:]}"
    assert SECRET not in repr(c) and SECRET not in str(shown)
    assert redact("short") == "****"
    with pytest.raises(FieldError, match="tsig_secret: expected base64"):
        cred(secret="not base64 !!!")
    with pytest.raises(FieldError, match="primary's IP address"):
        StoredCredential.from_json(
            {
                "id": "x",
                "kind": "rfc2136",
                "server": "ns.example",
                "zone": "e.test",
                "tsig_key_name": "k",
                "tsig_secret": SECRET,
            }
        )
    with pytest.raises(FieldError) as err:
        StoredCredential.from_json({"id": "cf", "kind": "cloudflare", "tsig_secret": SECRET})
    assert err.value.field == "tsig_secret"
    cf = StoredCredential.from_json({"id": "cf", "kind": "cloudflare", "api_token": "t" * 40})
    assert cf.settings().token_env == cf.secret_ref
    # an update without the secret keeps it
    updated = StoredCredential.from_json({"ttl": 30}, cred_id="cf", previous=cf)
    assert updated.secret == cf.secret and updated.ttl == 30


def test_revisions_conflicts_and_config_entries(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "r.sqlite3") as store:
        state = OperatorState(
            store,
            config_domains={"cfg.test": BaseDomain("cfg.test", "file-cred", source="config")},
            config_credentials={
                "file-cred": DnsCredential(kind="cloudflare", token_env="GW_TEST_CF_TOKEN")
            },
        )
        with pytest.raises(FieldError, match="no DNS credential 'knot'"):
            state.put_domain(BaseDomain("apps.test", "knot"), create=True)
        state.put_credential(cred(), create=True)
        with pytest.raises(Exists):
            state.put_credential(cred(), create=True)
        d = state.put_domain(BaseDomain("apps.test", "knot"), create=True)
        assert d.revision > 0
        with pytest.raises(RevisionMismatch):
            state.put_domain(
                BaseDomain("apps.test", "knot", 8443), create=False, expect=d.revision + 5
            )
        d2 = state.put_domain(
            BaseDomain("apps.test", "knot", 8443), create=False, expect=d.revision
        )
        assert d2.port == 8443 and d2.revision > d.revision
        with pytest.raises(ReadOnly):
            state.delete_domain("cfg.test")
        with pytest.raises(InUse, match="apps.test"):
            state.delete_credential("knot")
        with pytest.raises(InUse, match="under base domain"):
            state.put_route(CustomRoute("shop.apps.test", APP, 443), create=True)
        with pytest.raises(NotFound):
            state.delete_route("nothing.example.com")
        assert [x.domain for x in state.domains()] == ["apps.test", "cfg.test"]
        assert {c["id"]: c["source"] for c in state.credentials_json()} == {
            "file-cred": "config",
            "knot": "admin",
        }
        assert state.credential_json("file-cred")["api_token"] == "env:GW_TEST_CF_TOKEN"


def test_policy_change_is_persisted_and_notified(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite3"
    config_policy = AdmissionPolicy(app_ids=(APP,))
    seen: list[AdmissionPolicy] = []
    with SqliteStore(path) as store:
        state = OperatorState(store, config_policy=config_policy)
        state.subscribe(Topic.ADMISSION, lambda: seen.append(state.admission_policy()))
        assert state.admission() == (config_policy, "config", 0)
        new = AdmissionPolicy(allow_any_app=True, allowed_tcb_statuses=("UpToDate", "OutOfDate"))
        rev = state.set_admission_policy(new)
        assert seen == [new] and state.admission_policy() is new
        with pytest.raises(RevisionMismatch):
            state.set_admission_policy(config_policy, expect=rev - 1)
    with SqliteStore(path) as store:  # a restart: the runtime policy is still in force
        state = OperatorState(store, config_policy=config_policy)
        assert state.admission() == (new, "admin", rev)
        state.reset_admission_policy()
        assert state.admission() == (config_policy, "config", 0)


def test_subscriber_failure_does_not_undo_the_write(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with SqliteStore(tmp_path / "r.sqlite3") as store:
        state = OperatorState(store)

        def broken() -> None:
            raise RuntimeError("subscriber bug")

        state.subscribe(Topic.ROUTES, broken)
        state.put_route(CustomRoute("shop.example.com", APP, 443), create=True)
        assert state.route("SHOP.example.com.").app_id == APP
        assert "subscriber of routes changes failed" in caplog.text


def test_port_policy_override_validation() -> None:
    o = PortPolicyOverride.from_json(
        "inst1", {"ports": [{"port": 80, "pp": True}], "restrict_mode": True}
    )
    assert o.policy.to_json() == {"ports": [{"port": 80, "pp": True}], "restrict_mode": True}
    with pytest.raises(FieldError) as err:
        PortPolicyOverride.from_json("inst1", {"ports": [{"port": 70000}]})
    assert err.value.field == "ports[0].port"
    with pytest.raises(FieldError) as err:
        PortPolicyOverride.from_json("inst1", {"restrict": True})
    assert err.value.field == "restrict"


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
_keys = st.sampled_from(
    ["domain", "dns_credential", "port", "app_id", "id", "kind", "server", "zone",
     "tsig_key_name", "tsig_secret", "api_token", "ttl", "check_servers", "ports",
     "restrict_mode", "tsig_algorithm", "check_port"]
)  # fmt: skip
_bodies = _json | st.dictionaries(_keys, _json, max_size=8)


@settings(max_examples=300, deadline=None)
@given(body=_bodies)
def test_decoders_raise_only_field_errors(body: object) -> None:
    """Whatever JSON a client sends, the decoders answer a value or a FieldError (a 400)."""
    for decode in (
        BaseDomain.from_json,
        CustomRoute.from_json,
        StoredCredential.from_json,
        lambda b: PortPolicyOverride.from_json("inst", b),
        lambda b: StoredCredential.from_json(b, cred_id="c", previous=cred("c")),
    ):
        try:
            decode(body)
        except FieldError:
            pass


def test_base_domain_over_existing_custom_routes_is_refused(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "r.sqlite3") as store:
        state = OperatorState(store)
        state.put_credential(cred(), create=True)
        state.put_route(CustomRoute("shop.customer.example", APP, 443), create=True)
        with pytest.raises(InUse, match="shop.customer.example"):
            state.put_domain(BaseDomain("customer.example", "knot"), create=True)
        state.delete_route("shop.customer.example")
        assert state.put_domain(BaseDomain("customer.example", "knot"), create=True).revision


def test_non_ascii_tsig_secret_is_a_field_error() -> None:
    """Found by the property above: base64 of non-ASCII text raised a bare ValueError (500)."""
    body = {"kind": "rfc2136", "tsig_secret": "0000000\x80"}
    with pytest.raises(FieldError) as err:
        StoredCredential.from_json(body, cred_id="c", previous=cred("c"))
    assert err.value.field == "tsig_secret"
