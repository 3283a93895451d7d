"""wait_for_txt against small real UDP name servers: silent servers vs stale answers.

The servers here are real UDP sockets answering real DNS messages (dnspython), so the
query code path is the production one; they let a test choose what each server says.
"""

from __future__ import annotations

import asyncio
import logging
import time
import typing
from collections.abc import Callable

import dns.flags
import dns.message
import dns.rrset
import pytest

from gateway.certs.dns.base import NameServer
from gateway.certs.dns.propagation import wait_for_txt
from tests.helpers.processes import free_port

NAME = "_acme-challenge.example.test."


class _Responder(asyncio.DatagramProtocol):
    def __init__(self, values: Callable[[], list[str]]) -> None:
        self.values = values
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.DatagramTransport, transport)  # uvloop: no subclass

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        query = dns.message.from_wire(data)
        reply = dns.message.make_response(query)
        reply.flags |= dns.flags.AA
        values = self.values()
        if values:
            reply.answer.append(
                dns.rrset.from_text_list(
                    query.question[0].name, 60, "IN", "TXT", [f'"{v}"' for v in values]
                )
            )
        assert self.transport is not None
        self.transport.sendto(reply.to_wire(), addr)


async def _serve(values: Callable[[], list[str]]) -> tuple[NameServer, asyncio.BaseTransport]:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _Responder(values), local_addr=("127.0.0.1", 0)
    )
    port = transport.get_extra_info("sockname")[1]
    return NameServer("127.0.0.1", port), transport


def test_silent_server_is_dropped_after_skip_time_when_another_shows_the_values(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.certs.dns.propagation")
    silent = NameServer("127.0.0.1", free_port())  # nothing listens: ICMP port unreachable

    async def main() -> list[NameServer]:
        good, transport = await _serve(lambda: ["v1"])
        try:
            now = time.monotonic()
            return await wait_for_txt(
                NAME, {"v1"}, [good, silent], now + 5, poll_interval=0.1, skip_silent=now + 0.3
            )
        finally:
            transport.close()

    start = time.monotonic()
    assert asyncio.run(main()) == []
    assert 0.25 < time.monotonic() - start < 3
    assert str(silent) in caplog.text


def test_server_answering_without_the_values_blocks_until_the_deadline() -> None:
    """A stale answer is what the CA could get: never skipped, whatever skip_silent says."""

    async def main() -> tuple[list[NameServer], NameServer]:
        good, t1 = await _serve(lambda: ["v1"])
        stale, t2 = await _serve(lambda: [])
        try:
            now = time.monotonic()
            lag = await wait_for_txt(
                NAME, {"v1"}, [good, stale], now + 0.8, poll_interval=0.1, skip_silent=now
            )
            return lag, stale
        finally:
            t1.close()
            t2.close()

    lag, stale = asyncio.run(main())
    assert lag == [stale]


def test_silent_servers_are_not_skipped_when_no_server_shows_the_values() -> None:
    silent = NameServer("127.0.0.1", free_port())

    async def main() -> tuple[list[NameServer], NameServer]:
        stale, transport = await _serve(lambda: ["old"])
        try:
            now = time.monotonic()
            lag = await wait_for_txt(
                NAME, {"v1"}, [stale, silent], now + 0.6, poll_interval=0.1, skip_silent=now
            )
            return lag, stale
        finally:
            transport.close()

    lag, stale = asyncio.run(main())
    assert sorted(lag) == sorted([stale, silent])


def test_late_propagation_is_waited_for() -> None:
    """The values appear on the second server only after a while: we wait, then succeed."""
    appear_at = time.monotonic() + 0.4

    async def main() -> list[NameServer]:
        first, t1 = await _serve(lambda: ["v1"])
        second, t2 = await _serve(lambda: ["v1"] if time.monotonic() >= appear_at else [])
        try:
            return await wait_for_txt(
                NAME, {"v1"}, [first, second], time.monotonic() + 5, poll_interval=0.1
            )
        finally:
            t1.close()
            t2.close()

    assert asyncio.run(main()) == []
    assert time.monotonic() >= appear_at
