"""``wg show <iface> dump`` parsing (the kernel path's state read)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from gateway.tunnel.control import parse_dump
from gateway.tunnel.keys import generate_private_key, public_key
from gateway.tunnel.uapi import UapiError

PRIV = generate_private_key()
PEER = public_key(generate_private_key())
# as `wg show wg0 dump` prints it (tabs; "(none)"/"off" for unset)
DUMP = (
    f"{PRIV}\t{public_key(PRIV)}\t51820\toff\n"
    f"{PEER}\t(none)\t172.30.0.10:41000\t10.0.0.2/32\t1700000000\t180\t380\t25\n"
    f"{public_key(generate_private_key())}\t(none)\t(none)\t(none)\t0\t0\t0\toff\n"
)


def test_parse_dump() -> None:
    state = parse_dump(DUMP)
    assert state.public_key == public_key(PRIV) and state.listen_port == 51820
    first, second = state.peers
    assert first.public_key == PEER and first.endpoint == "172.30.0.10:41000"
    assert first.allowed_ips == (ipaddress.ip_network("10.0.0.2/32"),)
    assert (first.last_handshake, first.rx_bytes, first.tx_bytes) == (1700000000.0, 180, 380)
    assert first.persistent_keepalive == 25
    assert second.last_handshake is None and second.allowed_ips == () and second.endpoint is None
    assert PRIV not in repr(state)


@pytest.mark.parametrize("text", ["", "a\tb\n", DUMP.replace("51820", "x")])
def test_bad_dump_is_our_error(text: str) -> None:
    with pytest.raises(UapiError):
        parse_dump(text)


@given(tail=st.text(max_size=120), cut=st.integers(0, len(DUMP)))
@example(tail="\tx", cut=len(DUMP) - 1)
def test_mutated_dump_only_raises_our_error(tail: str, cut: int) -> None:
    try:
        parse_dump(DUMP[:cut] + tail)
    except UapiError:
        pass
