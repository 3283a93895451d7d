"""The SNI subdomain grammar: upstream's vectors (proxy.rs tests, reference 3.3) and ours."""

from __future__ import annotations

import re
from collections.abc import Collection

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.protocol.address import Address, Mode, parse_address, split_sni
from gateway.protocol.errors import AddressError, TlsAlert

T, P, H = Mode.TERMINATE, Mode.PASSTHROUGH, Mode.H2

# upstream proxy.rs test_parse_destination, then the reference 3.3 table rows
UPSTREAM = [
    ("myapp", "myapp", 80, T),
    ("myapp-8080", "myapp", 8080, T),
    ("myapp-443s", "myapp", 443, P),
    ("myapp-8443s", "myapp", 8443, P),
    ("myapps", "myapps", 80, T),
    ("myapp-s", "myapp", 443, P),
    ("myapp-g", "myapp", 80, H),
    ("myapp-50051g", "myapp", 50051, H),
]


@pytest.mark.parametrize(("label", "ident", "port", "mode"), UPSTREAM)
def test_parse_address_upstream_vectors(label: str, ident: str, port: int, mode: Mode) -> None:
    assert parse_address(label) == Address(ident, port, mode)


# our own rows: case, leading zeros, empty suffix, special ids, the id alphabet
OURS = [
    ("MyApp-S", "myapp", 443, P),
    ("ABCDEF0123-8443S", "abcdef0123", 8443, P),
    ("myapp-", "myapp", 80, T),  # upstream: empty port, no flag -> defaults
    ("myapp-0080", "myapp", 80, T),  # upstream parses u16 with leading zeros
    ("myapp-65535g", "myapp", 65535, H),
    ("myapp-1", "myapp", 1, T),
    ("gateway", "gateway", 80, T),  # special ids are routing's business, not the grammar's
    ("localhost-8080s", "localhost", 8080, P),
    ("my_app", "my_app", 80, T),
    ("s", "s", 80, T),
    ("g-s", "g", 443, P),
    ("a" * 63, "a" * 63, 80, T),
]


@pytest.mark.parametrize(("label", "ident", "port", "mode"), OURS)
def test_parse_address_our_vectors(label: str, ident: str, port: int, mode: Mode) -> None:
    assert parse_address(label) == Address(ident, port, mode)


ERRORS = [
    ("", "empty"),
    ("-8080", "app id is empty"),
    ("-", "app id is empty"),
    ("a-b-c", "more than one '-'"),
    ("my-app-s", "more than one '-'"),
    ("myapp--s", "more than one '-'"),
    ("myapp-443gs", "invalid port '443g'"),  # upstream: strip g fails, strip s, "443g" not u16
    ("myapp-443sg", "`gs` is not allowed"),
    ("myapp-gs", "invalid port 'g'"),
    ("myapp-sg", "`gs` is not allowed"),
    ("myapp-0", "port 0"),
    ("myapp-0s", "port 0"),
    ("myapp-65536", "port 65536"),
    ("myapp-99999999999999999999", "port"),
    ("myapp-+80", "invalid port"),  # Rust's u16 parse would take "+80"; the grammar says DIGIT
    ("myapp-8o8o", "invalid port"),
    ("myapp-٣", "invalid port"),  # a non-ASCII digit
    ("myapp-443x", "invalid port"),
    ("my.app", "outside a-z0-9_"),
    ("my app", "outside a-z0-9_"),
    ("é", "outside a-z0-9_"),
    ("a" * 64, "longer than 63"),
]


@pytest.mark.parametrize(("label", "message"), ERRORS)
def test_parse_address_rejects(label: str, message: str) -> None:
    with pytest.raises(AddressError, match=re.escape(message)) as info:
        parse_address(label)
    assert info.value.alert is TlsAlert.UNRECOGNIZED_NAME


@pytest.mark.parametrize(
    ("address", "label"),
    [
        (Address("app", 80, T), "app"),
        (Address("app", 8080, T), "app-8080"),
        (Address("app", 443, P), "app-s"),
        (Address("app", 80, P), "app-80s"),
        (Address("app", 443, T), "app-443"),
        (Address("app", 80, H), "app-g"),
        (Address("app", 50051, H), "app-50051g"),
    ],
)
def test_address_label_is_canonical(address: Address, label: str) -> None:
    assert address.label() == label
    assert parse_address(label) == address


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (("App", 80, T), "a-z0-9_"),
        (("a-b", 80, T), "a-z0-9_"),
        (("", 80, T), "a-z0-9_"),
        (("app", 0, T), "port 0"),
        (("app", 70000, T), "port 70000"),
        (("app", 80, "terminate"), "not a Mode"),
    ],
)
def test_address_is_valid_from_birth(fields: tuple[object, ...], message: str) -> None:
    with pytest.raises(AddressError, match=re.escape(message)):
        Address(*fields)  # type: ignore[arg-type]


BASES = frozenset({"gw.example.com", "example.org"})


@pytest.mark.parametrize(
    ("sni", "bases", "expected"),
    [
        ("app-8443s.gw.example.com", BASES, ("app-8443s", "gw.example.com")),
        ("APP.GW.Example.COM", BASES, ("app", "gw.example.com")),
        ("app.example.org", BASES, ("app", "example.org")),
        ("x.app.gw.example.com", BASES, None),  # two labels below: a custom domain (upstream too)
        ("gw.example.com", BASES, None),  # a base itself is not below itself
        ("app.example.com", BASES, None),
        ("example", BASES, None),
        ("app.other.net", BASES, None),
        (".gw.example.com", BASES, None),
        ("app.", BASES, None),
        ("app.gw.example.com", ["GW.Example.com."], ("app", "gw.example.com")),  # spelled oddly
        ("app.gw.example.com", [], None),
        # nested bases: the base is everything after the first dot, so only one can match
        ("x.a.example.com", ["example.com", "a.example.com"], ("x", "a.example.com")),
        ("a.example.com", ["example.com", "a.example.com"], ("a", "example.com")),
    ],
)
def test_split_sni(sni: str, bases: Collection[str], expected: tuple[str, str] | None) -> None:
    assert split_sni(sni, bases) == expected


@settings(max_examples=200, deadline=None)
@given(
    ident=st.from_regex(r"[a-z0-9_]{1,20}", fullmatch=True),
    port=st.integers(1, 65535),
    mode=st.sampled_from(Mode),
)
def test_address_label_round_trip(ident: str, port: int, mode: Mode) -> None:
    address = Address(ident, port, mode)
    assert parse_address(address.label()) == address
    assert parse_address(address.label().upper()) == address


@settings(max_examples=300, deadline=None)
@example(label="a-٣")
@example(label="a-" + "9" * 5000)
@given(
    label=st.one_of(
        st.text(max_size=70), st.from_regex(r"[a-z0-9]{1,8}-[0-9sg+]{0,8}", fullmatch=True)
    )
)
def test_parse_address_raises_only_address_error(label: str) -> None:
    try:
        address = parse_address(label)
    except AddressError:
        return
    assert parse_address(address.label()) == address  # anything accepted has a canonical form


@settings(max_examples=200, deadline=None)
@given(sni=st.text(max_size=40), bases=st.lists(st.text(max_size=15), max_size=3))
def test_split_sni_never_raises(sni: str, bases: list[str]) -> None:
    result = split_sni(sni, bases)
    if result is not None:
        label, base = result
        assert f"{label}.{base}" == sni.lower() and "." not in label
