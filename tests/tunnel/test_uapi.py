from __future__ import annotations

import ipaddress

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from gateway.tunnel.keys import generate_private_key, key_hex, public_key
from gateway.tunnel.uapi import (
    PeerConfig,
    PeerRemoval,
    UapiError,
    decode_get,
    encode_get,
    encode_set,
    parse_response,
)

PRIV = generate_private_key()
PUB = public_key(PRIV)
PEER = public_key(generate_private_key())
PEER2 = public_key(generate_private_key())

# A get=1 answer as wireguard-go writes it (field order from device/uapi.go).
GET_RESPONSE = (
    f"private_key={key_hex(PRIV)}\n"
    "listen_port=51820\n"
    f"public_key={key_hex(PEER)}\n"
    f"preshared_key={'0' * 64}\n"
    "protocol_version=1\n"
    "endpoint=192.0.2.2:41000\n"
    "last_handshake_time_sec=1700000000\n"
    "last_handshake_time_nsec=500000000\n"
    "tx_bytes=380\n"
    "rx_bytes=180\n"
    "persistent_keepalive_interval=25\n"
    "allowed_ip=10.0.0.2/32\n"
    f"public_key={key_hex(PEER2)}\n"
    "protocol_version=1\n"
    "last_handshake_time_sec=0\n"
    "last_handshake_time_nsec=0\n"
    "tx_bytes=0\n"
    "rx_bytes=0\n"
    "persistent_keepalive_interval=0\n"
    "errno=0\n\n"
).encode()


def test_get_request() -> None:
    assert encode_get() == b"get=1\n\n"


def test_set_adds_one_peer_without_touching_others() -> None:
    req = encode_set(
        peers=[PeerConfig(PEER, (ipaddress.ip_network("10.0.0.2/32"),), persistent_keepalive=25)]
    ).decode()
    assert req == (
        f"set=1\npublic_key={key_hex(PEER)}\npersistent_keepalive_interval=25\n"
        "replace_allowed_ips=true\nallowed_ip=10.0.0.2/32\n\n"
    )
    assert "replace_peers" not in req


def test_set_interface_and_removal() -> None:
    req = encode_set(private_key=PRIV, listen_port=51820, peers=[PeerRemoval(PEER)]).decode()
    assert req == (
        f"set=1\nprivate_key={key_hex(PRIV)}\nlisten_port=51820\n"
        f"public_key={key_hex(PEER)}\nremove=true\n\n"
    )


@pytest.mark.parametrize("endpoint", ["a\nb:1", "x=y:1", ""])
def test_injection_in_values_is_refused(endpoint: str) -> None:
    with pytest.raises(ValueError):
        PeerConfig(PEER, (), endpoint=endpoint)


def test_decode_get() -> None:
    parsed = parse_response(GET_RESPONSE)
    assert parsed is not None
    pairs, used = parsed
    assert used == len(GET_RESPONSE)
    state = decode_get(pairs)
    assert state.public_key == PUB
    assert state.listen_port == 51820
    first = state.peer(PEER)
    assert first is not None
    assert first.last_handshake == 1700000000.5
    assert (first.rx_bytes, first.tx_bytes, first.persistent_keepalive) == (180, 380, 25)
    assert first.allowed_ips == (ipaddress.ip_network("10.0.0.2/32"),)
    assert first.endpoint == "192.0.2.2:41000"
    second = state.peer(PEER2)
    assert second is not None and second.last_handshake is None and second.endpoint is None
    assert PRIV not in repr(state) and key_hex(PRIV) not in repr(state)


@pytest.mark.parametrize("raw", [b"errno=22\n\n", b"errno=-22\n\n"])
def test_errno_is_an_error(raw: bytes) -> None:
    """wireguard-go writes failures as negative errno values (ipcErrorInvalid = -EINVAL)."""
    with pytest.raises(UapiError) as err:
        parse_response(raw)
    assert err.value.errno == 22


@pytest.mark.parametrize(
    "raw", [b"junk\n\n", b"listen_port=1\n\n", b"errno=x\n\n", b"\n\n", b"\xff=1\nerrno=0\n\n"]
)
def test_malformed_is_our_error(raw: bytes) -> None:
    with pytest.raises(UapiError):
        parse_response(raw)


@given(cuts=st.lists(st.integers(1, len(GET_RESPONSE) - 1), max_size=6))
def test_result_does_not_depend_on_splits(cuts: list[int]) -> None:
    """Feeding a growing buffer: None until complete, then the same value."""
    points = sorted(set(cuts))
    for point in points:
        assert parse_response(GET_RESPONSE[:point]) is None
    assert parse_response(GET_RESPONSE) == parse_response(GET_RESPONSE + b"extra")


@given(tail=st.binary(max_size=200), cut=st.integers(0, len(GET_RESPONSE)))
@example(tail=b"\n\n", cut=0)
@example(tail=b"=\n\n", cut=0)
@example(tail=b"allowed_ip=zz\nerrno=0\n\n", cut=0)
def test_mutation_only_raises_our_error(tail: bytes, cut: int) -> None:
    raw = GET_RESPONSE[:cut] + tail
    try:
        parsed = parse_response(raw)
        if parsed is not None:
            decode_get(parsed[0])
    except UapiError:
        pass


@given(
    port=st.integers(0, 65535),
    keepalive=st.one_of(st.none(), st.integers(0, 65535)),
    host=st.integers(0, 2**32 - 1),
)
def test_encoded_peer_decodes_back(port: int, keepalive: int | None, host: int) -> None:
    """encode_set's peer block, echoed as a get answer, decodes to the same peer."""
    net = ipaddress.ip_network(f"{ipaddress.IPv4Address(host)}/32")
    peer = PeerConfig(PEER, (net,), endpoint=f"192.0.2.9:{port}", persistent_keepalive=keepalive)
    body = encode_set(listen_port=port, peers=[peer]).decode().removeprefix("set=1\n")
    body = body.replace("replace_allowed_ips=true\n", "").rstrip("\n") + "\nerrno=0\n\n"
    parsed = parse_response(body.encode())
    assert parsed is not None
    state = decode_get(parsed[0])
    (got,) = state.peers
    assert state.listen_port == port
    assert got.public_key == PEER and got.allowed_ips == (net,)
    assert got.endpoint == peer.endpoint
    assert got.persistent_keepalive == (keepalive or 0)
