"""Encrypted env: upstream's vector, the real SDK's encryptor, filtering and escaping."""

from __future__ import annotations

import json
import os

import pytest
from dstack_sdk import EnvVar, encrypt_env_vars_sync
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.guest import envcrypt
from gateway.guest.envcrypt import EnvError

KEY = os.urandom(32)


def test_decrypt_upstream_vector() -> None:
    """dstack-util crypto.rs dh_decrypt test vector."""
    sk = bytes.fromhex("7c282bf94b35dc47801dc953bfa0896fc2bd313381d3e8eca4e42f6536d2a96f")
    ct = bytes.fromhex(
        "0bd18749612f4c8b9dd583c7d6a646b90abd34e3c731a7708d0caf9039095641e1f0948e775f0b73"
        "51788db7f246d51806954626dcccb6a60d64665ca3715c6bef75616cab476d27bba04080361200d6"
        "a58cec"
    )
    assert envcrypt.decrypt_env(sk, ct) == b'[{"key":"","value":""}]'


def test_sdk_encrypted_env_decrypts_and_filters() -> None:
    pub = envcrypt.env_public_key(KEY).hex()
    blob = bytes.fromhex(
        encrypt_env_vars_sync(
            [EnvVar("API_KEY", "s3cret value"), EnvVar("EVIL", "x"), EnvVar("DB", "a$b")], pub
        )
    )
    parsed = envcrypt.filter_env(envcrypt.decrypt_env(KEY, blob), ["API_KEY", "DB"])
    assert dict(parsed.env) == {"API_KEY": "s3cret value", "DB": "a$b"}
    assert parsed.skipped == ("EVIL",)
    assert envcrypt.render_env_file(parsed.env) == 'API_KEY="s3cret value"\nDB="a\\$b"\n'
    assert envcrypt.render_env_json(parsed.env) == b'{"API_KEY":"s3cret value","DB":"a$b"}'


def test_our_encryptor_matches_the_sdk_format() -> None:
    pub = envcrypt.env_public_key(KEY)
    blob = envcrypt.encrypt_env(pub, [("A", "1")])
    assert json.loads(envcrypt.decrypt_env(KEY, blob)) == {"env": [{"key": "A", "value": "1"}]}


def test_wrong_key_and_tampering_are_refused() -> None:
    blob = envcrypt.encrypt_env(envcrypt.env_public_key(KEY), [("A", "1")])
    with pytest.raises(EnvError, match="does not decrypt"):
        envcrypt.decrypt_env(os.urandom(32), blob)
    tampered = bytearray(blob)
    tampered[50] ^= 1
    with pytest.raises(EnvError, match="tampered"):
        envcrypt.decrypt_env(KEY, bytes(tampered))
    with pytest.raises(EnvError, match="truncated"):
        envcrypt.decrypt_env(KEY, blob[:59])
    with pytest.raises(EnvError, match="low-order"):
        envcrypt.decrypt_env(KEY, bytes(32) + blob[32:])


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        (b"not json", "not JSON"),
        (b'{"env": {}}', "must be"),
        (b"[]", "must be"),
        (b'{"env": [1]}', "not an object"),
        (b'{"env": [{"key": "A", "value": 1}]}', "strings"),
        (b'{"env": [{"key": "1A", "value": ""}]}', "not a valid name"),
        (b'{"env": [{"key": "A-B", "value": ""}]}', "not a valid name"),
    ],
)
def test_bad_plaintext_is_refused(doc: bytes, reason: str) -> None:
    with pytest.raises(EnvError, match=reason):
        envcrypt.filter_env(doc, ["A", "1A", "A-B"])


def test_size_limits() -> None:
    too_many = json.dumps({"env": [{"key": "A", "value": ""}] * 1025}).encode()
    with pytest.raises(EnvError, match="entries"):
        envcrypt.filter_env(too_many, ["A"])
    big = json.dumps({"env": [{"key": "A", "value": "x" * (128 * 1024 + 1)}]}).encode()
    with pytest.raises(EnvError, match="larger"):
        envcrypt.filter_env(big, ["A"])
    long_name = "A" * 256
    doc = json.dumps({"env": [{"key": long_name, "value": ""}]}).encode()
    with pytest.raises(EnvError, match="longer"):
        envcrypt.filter_env(doc, [long_name])
    names = [f"K{i}" for i in range(9)]
    total = json.dumps({"env": [{"key": n, "value": "x" * (120 * 1024)} for n in names]}).encode()
    with pytest.raises(EnvError, match="in total"):
        envcrypt.filter_env(total, names)


def test_disallowed_names_are_skipped_even_if_invalid() -> None:
    doc = json.dumps(
        {
            "env": [
                {"key": "bad name", "value": ""},
                {"key": "A", "value": "1"},
                {"key": "A", "value": "2"},
            ]
        }
    ).encode()
    parsed = envcrypt.filter_env(doc, ["A"])
    assert dict(parsed.env) == {"A": "2"}
    assert parsed.skipped == ("bad name",)


@settings(max_examples=50, deadline=None)
@given(blob=st.binary(max_size=200))
def test_random_blobs_only_raise_env_error(blob: bytes) -> None:
    with pytest.raises(EnvError):
        envcrypt.decrypt_env(KEY, blob)


@pytest.mark.parametrize(
    ("value", "line"),
    [
        ("plain", "K=plain"),
        ("two words", 'K="two words"'),
        ("a\nb", 'K="a\\nb"'),
        ('say "hi"', 'K="say \\"hi\\""'),
        ("`cmd`", 'K="\\`cmd\\`"'),
        ("back\\slash", 'K="back\\slash"'),
        ("it's", 'K="it\'s"'),
    ],
)
def test_env_file_escaping(value: str, line: str) -> None:
    assert envcrypt.render_env_file({"K": value}) == line + "\n"


def test_sdk_async_encryptor_too() -> None:
    import asyncio

    from dstack_sdk import encrypt_env_vars

    pub = envcrypt.env_public_key(KEY).hex()
    blob = bytes.fromhex(asyncio.run(encrypt_env_vars([EnvVar("A", "x y")], "0x" + pub)))
    assert dict(envcrypt.filter_env(envcrypt.decrypt_env(KEY, blob), ["A"]).env) == {"A": "x y"}
