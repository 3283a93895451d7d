from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, parse_config
from gateway.proxy.settings import ListenSpec, ProxySettings, parse_listen


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("0.0.0.0:8443", ListenSpec("0.0.0.0", 8443, 8443)),
        ("127.0.0.1:8443-8445", ListenSpec("127.0.0.1", 8443, 8445)),
        ("[::]:443", ListenSpec("::", 443, 443)),
        ("[::1]:1-2", ListenSpec("::1", 1, 2)),
    ],
)
def test_listen_grammar(text: str, spec: ListenSpec) -> None:
    assert parse_listen(text) == spec


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("8443", "expected host:port"),
        ("localhost:8443", "not an IPv4 address"),
        ("[zz]:1", "not an IPv6 address"),
        ("::1:443", "not an IPv4 address"),
        ("0.0.0.0:0", "within 1-65535"),
        ("0.0.0.0:70000", "within 1-65535"),
        ("0.0.0.0:9-8", "reversed"),
        ("0.0.0.0:http", "not a number"),
    ],
)
def test_listen_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_listen(text)


def test_listen_range_ports() -> None:
    assert list(parse_listen("1.2.3.4:10-12").ports()) == [10, 11, 12]


@pytest.mark.parametrize(
    "listen",
    [
        ["0.0.0.0:8443", "0.0.0.0:8443"],
        ["0.0.0.0:8440-8450", "127.0.0.1:8445"],
        ["[::]:443", "[::1]:443"],
        ["127.0.0.1:1-5", "127.0.0.1:5-9"],
    ],
)
def test_overlapping_listeners_rejected(listen: list[str]) -> None:
    with pytest.raises(ValueError, match="overlap"):
        ProxySettings(listen=tuple(listen))


def test_non_overlapping_listeners_accepted() -> None:
    s = ProxySettings(listen=("127.0.0.1:1-5", "127.0.0.2:1-5", "[::1]:1-5", "127.0.0.1:6"))
    assert len(s.listen_specs()) == 4


def test_defaults_are_the_documented_ones() -> None:
    s = ProxySettings()
    assert s.tls_versions == ("1.2", "1.3")
    assert s.timeouts.connect == 5 and s.timeouts.handshake == 5
    assert s.timeouts.idle == 600 and s.timeouts.total == 5 * 3600
    assert s.timeouts.proxy_header == 5 and s.timeouts.drain == 10
    assert not s.inbound_proxy_protocol and not s.insecure_localhost_backend
    assert s.worker_count() >= 1


def test_config_section_decodes_routes() -> None:
    cfg = parse_config(
        """
        [proxy]
        listen = ["127.0.0.1:9443"]
        base_domains = ["example.org"]
        certs_dir = "/tmp/c"
        [proxy.timeouts]
        idle = 3
        [[proxy.routes]]
        app_id = "app"
        backends = ["10.0.0.2", "fd00::2"]
        instance_ids = ["i1", "i2"]
        restrict_mode = true
        ports = [{ port = 80 }, { port = 8080, pp = true }]
        """
    )
    p = cfg.proxy
    assert p.certs_dir == Path("/tmp/c")
    assert p.timeouts.idle == 3.0
    route = p.routes[0]
    assert route.backends == ("10.0.0.2", "fd00::2")
    assert [(r.port, r.pp) for r in route.ports] == [(80, False), (8080, True)]


@pytest.mark.parametrize(
    ("toml", "path", "message"),
    [
        ("[proxy]\nlisen = []\n", "proxy.lisen", "did you mean 'listen'"),
        ("[proxy]\nworkers = -1\n", "proxy", "workers"),
        ("[proxy]\ntls_versions = ['1.1']\n", "proxy", "tls_versions"),
        ("[proxy]\nbase_domains = ['Example.org']\n", "proxy", "lower-case"),
        ("[proxy.timeouts]\nidle = 0\n", "proxy.timeouts", "idle"),
        ("[proxy]\nlisten = ['0.0.0.0:1', '0.0.0.0:1']\n", "proxy", "overlap"),
        ("[[proxy.routes]]\napp_id = 'a'\nbackends = []\n", "proxy.routes[0]", "at least one"),
        ("[[proxy.routes]]\napp_id = 'a-b'\nbackends = ['1.2.3.4']\n", "proxy.routes[0]", "app_id"),
        ("[[proxy.routes]]\napp_id = 'a'\nbackends = ['host']\n", "proxy.routes[0]", "IP address"),
        (
            "[[proxy.routes]]\napp_id = 'a'\nbackends = ['1.2.3.4']\nports = [{port = 0}]\n",
            "proxy.routes[0].ports[0]",
            "1-65535",
        ),
        (
            "[[proxy.routes]]\napp_id = 'a'\nbackends = ['1.2.3.4']\ninstance_ids = ['x', 'y']\n",
            "proxy.routes[0]",
            "one id per backend",
        ),
        (
            "[[proxy.routes]]\napp_id = 'a'\nbackends = ['1.2.3.4']\n"
            "[[proxy.routes]]\napp_id = 'a'\nbackends = ['1.2.3.4']\n",
            "proxy",
            "used twice",
        ),
    ],
)
def test_config_errors_name_the_key(toml: str, path: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(toml)
    assert err.value.path == path
    assert message in str(err.value)
