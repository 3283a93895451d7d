from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from gateway.certs.devca import ensure_dev_ca, issue_wildcard, write_cert_dir
from gateway.certs.store import CertStore, load_snapshot
from gateway.certs.tls import ALPN_H1, ALPN_H2

V = ("1.2", "1.3")


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    ca = ensure_dev_ca(tmp_path / "ca")
    ca_cert, _ = ca.load()
    d = tmp_path / "certs"
    for name, names in (
        ("wild", ["*.example.test", "example.test"]),
        ("exact", ["api.other.test"]),
    ):
        cert, key = issue_wildcard(ca, names)
        write_cert_dir(d, name, [cert, ca_cert], key)
    return d


@pytest.mark.parametrize(
    ("sni", "source"),
    [
        ("example.test", "wild"),
        ("app.example.test", "wild"),
        ("app-8080s.example.test", "wild"),
        ("api.other.test", "exact"),
        ("a.b.example.test", None),  # one level only
        ("other.test", None),
        ("x.api.other.test", None),
        ("test", None),
    ],
)
def test_lookup_exact_then_one_level_wildcard(certs: Path, sni: str, source: str | None) -> None:
    snap = load_snapshot(certs, V)
    entry = snap.lookup(sni)
    assert (entry.source.name if entry else None) == source


def test_entry_contexts_offer_alpn_per_mode(certs: Path) -> None:
    entry = load_snapshot(certs, V).lookup("a.example.test")
    assert entry is not None
    assert entry.context(ALPN_H2) is entry.h2
    assert entry.context(ALPN_H1) is entry.h1
    assert entry.h1.minimum_version == ssl.TLSVersion.TLSv1_2
    assert entry.h1.maximum_version == ssl.TLSVersion.TLSv1_3
    only13 = load_snapshot(certs, ("1.3",)).lookup("a.example.test")
    assert only13 is not None and only13.h1.minimum_version == ssl.TLSVersion.TLSv1_3


def test_bad_directories_are_skipped(certs: Path, caplog: pytest.LogCaptureFixture) -> None:
    (certs / "broken").mkdir()
    (certs / "broken" / "fullchain.pem").write_text("not a cert")
    (certs / ".tmp-writer").mkdir()  # a writer's unfinished directory is ignored silently
    snap = load_snapshot(certs, V)
    assert snap.lookup("a.example.test") is not None
    assert "broken" in caplog.text


def test_missing_dir_is_empty(tmp_path: Path) -> None:
    assert len(load_snapshot(tmp_path / "nope", V)) == 0


def test_reload_swaps_and_keeps_old_when_empty(certs: Path, tmp_path: Path) -> None:
    store = CertStore(certs, V)
    old = store.snapshot
    assert len(old) == 2
    ca = ensure_dev_ca(tmp_path / "ca")
    cert, key = issue_wildcard(ca, ["*.new.test"])
    write_cert_dir(certs, "new", [cert, ca.load()[0]], key)
    new = store.reload()
    assert new is store.snapshot and new is not old
    assert new.lookup("x.new.test") is not None
    assert old.lookup("x.new.test") is None  # the old snapshot never changes
    for d in certs.iterdir():
        for f in d.iterdir():
            f.unlink()
        d.rmdir()
    assert store.reload() is new  # everything vanished: keep serving the last good set


def test_later_expiry_wins_for_the_same_name(tmp_path: Path) -> None:
    ca = ensure_dev_ca(tmp_path / "ca")
    d = tmp_path / "certs"
    short, k1 = issue_wildcard(ca, ["*.x.test"], days=10)
    long, k2 = issue_wildcard(ca, ["*.x.test"], days=100)
    write_cert_dir(d, "a-long", [long], k2)
    write_cert_dir(d, "b-short", [short], k1)
    entry = load_snapshot(d, V).lookup("y.x.test")
    assert entry is not None and entry.source.name == "a-long"


def test_session_ticket_count_is_applied(certs: Path) -> None:
    for count in (0, 1, 2):
        entry = load_snapshot(certs, V, tickets=count).lookup("a.example.test")
        assert entry is not None
        assert entry.h1.num_tickets == count and entry.h2.num_tickets == count
        assert bool(entry.h1.options & ssl.OP_NO_TICKET) == (count == 0)
