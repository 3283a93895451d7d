from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from gateway.config import ConfigError, parse_config
from gateway.tunnel.wg import Backend


def test_defaults_are_upstreams_plan() -> None:
    cfg = parse_config("")
    plan = cfg.wg.plan()
    assert plan.gateway_ip == IPv4Address("10.0.0.1")
    assert plan.assignable(IPv4Address("10.0.0.2"))
    assert cfg.wg.backend is Backend.AUTO
    assert cfg.registry.backend == "sqlite"


def test_cluster_node_plan_is_accepted() -> None:
    cfg = parse_config(
        "[wg]\nip = '10.8.64.1/16'\nclient_ip_range = '10.8.64.0/18'\n"
        "reserved_net = ['10.8.64.1/32']\nbackend = 'wireguard-go'\n"
    )
    assert cfg.wg.plan().capacity() == 2**14 - 3


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[wg]\nclient_ip_range = '10.1.0.0/25'\n", "not inside the interface network"),
        ("[wg]\nip = '10.0.0.300/24'\n", "not an IPv4 address"),
        ("[wg]\ninterface = 'a-very-long-interface-name'\n", "1-15 bytes"),
        ("[wg]\nbackend = 'bsd'\n", "is not one of"),
        ("[wg]\nendpoint = 'nohost'\n", "host:port"),
        ("[wg]\nrecycle_timeout = 0\n", "positive"),
        ("[registry]\nnode_id = 'a b'\n", "node_id"),
    ],
)
def test_bad_values_name_the_section(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        parse_config(text)
    assert err.value.path.split(".")[0] in ("wg", "registry")
