from __future__ import annotations

import base64
import subprocess

import pytest

from gateway.tunnel.keys import (
    WgKeyError,
    decode_key,
    encode_key,
    generate_private_key,
    key_from_hex,
    key_hex,
    public_key,
)


def test_generated_key_matches_wg_pubkey() -> None:
    priv = generate_private_key()
    out = subprocess.run(["wg", "pubkey"], input=priv, capture_output=True, text=True, check=True)
    assert public_key(priv) == out.stdout.strip()


def test_wg_genkey_output_is_accepted() -> None:
    priv = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout
    assert len(decode_key(priv)) == 32
    assert public_key(priv.strip()) != priv.strip()


def test_hex_round_trip() -> None:
    priv = generate_private_key()
    assert key_from_hex(key_hex(priv)) == priv
    assert encode_key(decode_key(priv)) == priv
    assert decode_key("A" * 43 + "=") == bytes(32)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "44 characters"),
        (base64.b64encode(b"x" * 31).decode() + "A", "44 characters"),
        (base64.b64encode(b"x" * 33).decode(), "44 characters"),
        ("!" * 43 + "=", "standard base64"),
        (base64.urlsafe_b64encode(b"\xff" * 32).decode(), "standard base64"),
    ],
)
def test_bad_keys_are_rejected_with_reason(text: str, why: str) -> None:
    with pytest.raises(WgKeyError, match=why):
        decode_key(text)


def test_non_string_is_rejected() -> None:
    with pytest.raises(WgKeyError):
        decode_key(b"x" * 44)  # type: ignore[arg-type]
