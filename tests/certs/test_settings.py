"""The [acme] and [dns] sections: decoding, validation, secrets from env or file only."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.certs.certbot import Certbot, certs_dir_of
from gateway.certs.dns.base import NameServer, parse_server
from gateway.certs.dns.cloudflare import CloudflareProvider
from gateway.certs.dns.factory import build_provider, read_secret
from gateway.certs.dns.rfc2136 import Rfc2136Provider
from gateway.certs.errors import CertError
from gateway.certs.settings import DnsCredential, normalize_domain
from gateway.config import ConfigError, parse_config

SECRET = "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3I="

FULL = """
[core]
data_dir = "{data}"

[acme]
enabled = true
directory_url = "https://127.0.0.1:14000/dir"
renew_before = 864000
caa = true
caa_issuer = "letsencrypt.org"

[[acme.domains]]
base_domain = "*.Apps.Example.COM."
dns = "primary"

[[acme.domains]]
base_domain = "edge.example.net"
dns = "cf"

[dns.credentials.primary]
kind = "rfc2136"
server = "192.0.2.53"
zone = "example.com"
tsig_key_name = "acme-key"
tsig_secret_env = "GWG_TEST_TSIG"
check_servers = ["192.0.2.54", "192.0.2.55:5353"]

[dns.credentials.cf]
kind = "cloudflare"
token_file = "{token}"

[dns.resolver]
nameservers = ["127.0.0.1:5353"]
timeout = 1.5
"""


def test_full_example_decodes(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("cf-token\n")
    cfg = parse_config(FULL.format(data=tmp_path, token=token))
    assert [d.base_domain for d in cfg.acme.domains] == ["apps.example.com", "edge.example.net"]
    assert cfg.acme.renew_before == 864000.0
    assert cfg.dns.credentials["primary"].zone == "example.com"
    assert cfg.dns.resolver.nameservers == ("127.0.0.1:5353",)
    assert certs_dir_of(cfg) == tmp_path / "certs"


def test_certbot_from_config_reads_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token = tmp_path / "token"
    token.write_text("cf-token\n")
    cfg = parse_config(FULL.format(data=tmp_path, token=token))
    monkeypatch.delenv("GWG_TEST_TSIG", raising=False)
    with pytest.raises(CertError, match="GWG_TEST_TSIG"):
        Certbot.from_config(cfg, on_change=lambda: None)
    monkeypatch.setenv("GWG_TEST_TSIG", SECRET)
    bot = Certbot.from_config(cfg, on_change=lambda: None)
    assert bot.domains == ["apps.example.com", "edge.example.net"]


@pytest.mark.parametrize(
    ("snippet", "path", "message"),
    [
        ("[acme]\ncaa = true\n", "acme", "caa_issuer"),
        ("[acme]\nrenew_before = 0\n", "acme", "positive"),
        ("[acme]\ndirectory_url = 'ftp://x'\n", "acme", "http"),
        ("[[acme.domains]]\nbase_domain = 'nodot'\ndns = 'x'\n", "acme.domains[0]", "valid DNS"),
        (
            "[[acme.domains]]\nbase_domain = 'a.test'\ndns = 'x'\n"
            "[[acme.domains]]\nbase_domain = '*.a.test'\ndns = 'x'\n",
            "acme",
            "twice",
        ),
        (
            "[dns.credentials.x]\nkind = 'rfc2136'\nserver = '1.2.3.4'\n",
            "dns.credentials.x",
            "needs",
        ),
        (
            "[dns.credentials.x]\nkind = 'rfc2136'\nserver = '1.2.3.4'\nzone = 'a.test'\n"
            "tsig_key_name = 'k'\ntsig_secret_env = 'A'\ntsig_secret_file = '/f'\n",
            "dns.credentials.x",
            "exactly one",
        ),
        ("[dns.credentials.x]\nkind = 'cloudflare'\n", "dns.credentials.x", "token"),
        ("[dns.credentials.x]\nkind = 'route53'\n", "dns.credentials.x.kind", "not one of"),
        (
            "[dns.credentials.x]\nkind = 'cloudflare'\ntoken = 'inline'\n",
            "dns.credentials.x.token",
            "unknown",
        ),
        ("[dns.resolver]\ncache_size = 0\n", "dns.resolver", "cache_size"),
        (
            "[dns.credentials.x]\nkind = 'rfc2136'\nserver = 'ns1.example.com'\nzone = 'a.test'\n"
            "tsig_key_name = 'k'\ntsig_secret_env = 'A'\n",
            "dns.credentials.x",
            "IP address",
        ),
        (
            "[dns.credentials.x]\nkind = 'cloudflare'\ntoken_env = 'T'\n"
            "check_servers = ['ns.example.com']\n",
            "dns.credentials.x",
            "bad name server",
        ),
        ("[dns.resolver]\nnameservers = ['1.2.3.4:99999']\n", "dns.resolver", "port"),
        ("[dns.resolver]\nnameservers = ['[::1]:x']\n", "dns.resolver", "bad name server"),
    ],
)
def test_bad_settings_name_the_key(snippet: str, path: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(snippet)
    assert err.value.path == path
    assert message in str(err.value)


def test_unknown_credential_reference(tmp_path: Path) -> None:
    cfg = parse_config(
        f"[core]\ndata_dir = '{tmp_path}'\n[[acme.domains]]\nbase_domain = 'a.test'\ndns = 'nope'\n"
    )
    with pytest.raises(CertError, match="nope"):
        Certbot.from_config(cfg, on_change=lambda: None)


def test_secrets_from_env_or_file_never_in_repr(tmp_path: Path) -> None:
    env = {"TSIG": SECRET, "EMPTY": ""}
    rfc = DnsCredential(
        kind="rfc2136", server="127.0.0.1", zone="a.test", tsig_key_name="k", tsig_secret_env="TSIG"
    )
    p = build_provider("primary", rfc, env.get)
    assert isinstance(p, Rfc2136Provider) and SECRET not in repr(p)
    with pytest.raises(CertError, match="EMPTY"):
        read_secret("EMPTY", "", "x", env.get)
    with pytest.raises(CertError, match="cannot read"):
        read_secret("", str(tmp_path / "missing"), "x", env.get)
    bad = DnsCredential(
        kind="rfc2136", server="127.0.0.1", zone="a.test", tsig_key_name="k", tsig_secret_env="BAD"
    )
    with pytest.raises(CertError, match="unusable TSIG key") as err:
        build_provider("p", bad, {"BAD": "not base64 !!"}.get)
    assert "not base64" not in str(err.value)
    (tmp_path / "tok").write_text("tok-123\n")
    cf = DnsCredential(kind="cloudflare", token_file=str(tmp_path / "tok"))
    cfp = build_provider("cf", cf, env.get)
    assert isinstance(cfp, CloudflareProvider) and "tok-123" not in repr(cfp)


def test_parse_server() -> None:
    assert parse_server("192.0.2.1") == NameServer("192.0.2.1", 53)
    assert parse_server("192.0.2.1:5353") == NameServer("192.0.2.1", 5353)
    assert parse_server("[2001:db8::1]:53") == NameServer("2001:db8::1", 53)
    assert parse_server("2001:db8::1", 5300) == NameServer("2001:db8::1", 5300)
    assert str(NameServer("2001:db8::1", 53)) == "[2001:db8::1]:53"


def test_normalize_domain() -> None:
    assert normalize_domain(" *.Apps.Example.com. ") == "apps.example.com"
    for bad in ("", "com", "-a.test", "a_b.test", "a..test", "x" * 64 + ".test"):
        with pytest.raises(ValueError):
            normalize_domain(bad)


def test_certs_dir_defaults_follow_data_dir_for_acme_and_proxy(tmp_path: Path) -> None:
    from gateway.certs.settings import resolve_certs_dir
    from gateway.config import Config

    assert resolve_certs_dir("", tmp_path) == tmp_path / "certs"
    assert resolve_certs_dir(Path(""), tmp_path) == tmp_path / "certs"
    assert resolve_certs_dir("/srv/c", tmp_path) == Path("/srv/c")
    default = Config()
    assert default.proxy.certs_dir == certs_dir_of(default) == Path("/var/lib/gateway/certs")
    cfg = parse_config(f"[core]\ndata_dir = '{tmp_path}'\n[proxy]\ncerts_dir = ''\n")
    assert cfg.proxy.certs_dir == certs_dir_of(cfg) == tmp_path / "certs"
    assert parse_config(f"[core]\ndata_dir = '{tmp_path}'\n").proxy.certs_dir == tmp_path / "certs"
    explicit = parse_config(
        f"[core]\ndata_dir = '{tmp_path}'\n"
        "[acme]\ncerts_dir = '/srv/a'\n[proxy]\ncerts_dir = '/srv/p'\n"
    )
    assert (certs_dir_of(explicit), explicit.proxy.certs_dir) == (Path("/srv/a"), Path("/srv/p"))
