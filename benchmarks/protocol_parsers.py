"""Cost of the sans-IO parsers on the connection-setup path (not a test; numbers for docs).

Run: ``.venv/bin/python -m benchmarks.protocol_parsers``. Each figure is the best of several
repeats (least disturbed by the other work on a shared machine), in microseconds per call.
The one-byte-feed rows show that HelloSniffer is O(n): the cost per byte stays flat as the
hello grows, because it never rescans what it has already read.
"""

from __future__ import annotations

import timeit
from collections.abc import Callable

from gateway.protocol.address import parse_address, split_sni
from gateway.protocol.clienthello import HelloSniffer, parse_client_hello
from gateway.protocol.hello_builder import build_client_hello
from gateway.protocol.proxy_header import ProxyHeader, encode_proxy_header, parse_proxy_header
from tests.protocol.capture import read_hex


def best_us(fn: Callable[[], object], number: int, repeat: int = 5) -> float:
    """Best-of-``repeat`` microseconds per call."""
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def feed_pieces(data: bytes, size: int, limit: int) -> Callable[[], object]:
    pieces = [data[i : i + size] for i in range(0, len(data), size)]

    def run() -> object:
        sniffer = HelloSniffer(limit)
        result = None
        for piece in pieces:
            result = sniffer.feed(piece)
        assert result is not None
        return result

    return run


def main() -> int:
    curl = read_hex("curl")
    rows: list[tuple[str, float]] = []
    rows.append(("parse_client_hello, curl 517 B", best_us(lambda: parse_client_hello(curl), 2000)))
    rows.append(
        (
            "HelloSniffer.feed, curl 517 B in one piece",
            best_us(feed_pieces(curl, 1 << 20, 65536), 2000),
        )
    )
    for size in (2048, 8192, 16384, 32768):
        hello = build_client_hello("app-8443s.gw.example", ("h2",), padding=size - 120)
        n = len(hello)
        one = best_us(feed_pieces(hello, 1, 65536), 3 if size > 8192 else 10, repeat=3)
        rows.append((f"HelloSniffer 1-byte feeds, {n} B hello (per byte {one / n:.3f})", one))
        if size == 16384:
            rows.append(
                (
                    f"HelloSniffer 1448-byte feeds, {n} B",
                    best_us(feed_pieces(hello, 1448, 65536), 200),
                )
            )
            rows.append(
                (f"parse_client_hello, {n} B", best_us(lambda h=hello: parse_client_hello(h), 500))
            )
    v1 = b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 443\r\n"
    v2 = encode_proxy_header(ProxyHeader.for_connection(("203.0.113.7", 56324), ("192.0.2.1", 443)))
    rows.append(("parse_proxy_header v1 TCP4", best_us(lambda: parse_proxy_header(v1), 5000)))
    rows.append(("parse_proxy_header v2 INET", best_us(lambda: parse_proxy_header(v2), 5000)))
    header = ProxyHeader.for_connection(("203.0.113.7", 56324), ("192.0.2.1", 443))
    rows.append(
        (
            "ProxyHeader.for_connection + encode v2",
            best_us(
                lambda: encode_proxy_header(
                    ProxyHeader.for_connection(("203.0.113.7", 56324), ("192.0.2.1", 443))
                ),
                5000,
            ),
        )
    )
    rows.append(
        (
            "encode_proxy_header v2 (prebuilt header)",
            best_us(lambda: encode_proxy_header(header), 5000),
        )
    )
    bases = frozenset({"gw.example.com"})
    rows.append(
        (
            "split_sni + parse_address",
            best_us(
                lambda: parse_address(split_sni("0123456789abcdef-8443s.gw.example.com", bases)[0]),  # type: ignore[index]
                20000,
            ),
        )
    )
    width = max(len(name) for name, _ in rows)
    for name, us in rows:
        print(f"{name:<{width}}  {us:10.2f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
