"""relay.py's driver on trio memory streams: no TLS, no listener, no server.

The client is a memory stream (a lockstep one where a client must be seen not to read); the
upstream is a pool whose connections are socketpairs, their other end played by the test. The
clock is a MockClock that jumps once every task is blocked, so each expiry is reached without
waiting: the tests assert what the client and the upstream saw and what the connection's
record says, never durations. test_relay.py runs the same flows end to end, over TLS.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Final

import h11
import pytest
import trio
import trio.testing
from helpers.h11client import receive_response

from dualproxy.config.schema import Limits, UpstreamConfig
from dualproxy.http.errors import HttpRefusal
from dualproxy.http.exchange import CLIENT_CLOSED_MID_REQUEST, EARLY_ANSWER
from dualproxy.http.heads import HeadLimits
from dualproxy.http.relay import ClientConnection, Departures, Drain, RelaySettings
from dualproxy.http.rewrite import ForwardingRules
from dualproxy.http.upstream import UpstreamConnection, UpstreamPool
from dualproxy.tls.streams import TcpStream

# Short bounds for the waits the tests expire; on the MockClock they cost no real time.
SHORT: Final = 5.0
LIMITS: Final = Limits(
    request_header_timeout=SHORT,
    keepalive_timeout=SHORT,
    body_timeout=SHORT,
    send_timeout=SHORT,
    upstream_timeout=SHORT,
    max_body_bytes=100,
)
UPSTREAM: Final = UpstreamConfig(
    url="http://upstream.test", scheme="http", host="upstream.test", port=80
)
PEER: Final = ipaddress.ip_address("203.0.113.5")
GET: Final = b"GET /a HTTP/1.1\r\nHost: api.example.com\r\n\r\n"
OK: Final = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.fixture
def mock_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0.05)


@dataclass
class Record:
    """The connection's record, as the relay reports to it (the server's ConnectionRecord)."""

    requests: int = 0
    detail: str = ""
    relayed: list[int] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    # (method, target, status, bytes in, bytes out, why it ended) of each exchange ended.
    exchanges: list[tuple[bytes, bytes, int, int, int, str | None]] = field(default_factory=list)

    def request_received(self) -> None:
        self.requests += 1

    def note(self, detail: str) -> None:
        self.detail = detail

    def response_relayed(self, status: int, upstream_seconds: float) -> None:
        self.relayed.append(status)

    def response_generated(self, status: int) -> None:
        self.generated.append(status)

    def exchange_ended(
        self,
        method: bytes,
        target: bytes,
        version: bytes,
        status: int,
        bytes_in: int,
        bytes_out: int,
        seconds: float,
        upstream_seconds: float | None,
        ended: str | None,
    ) -> None:
        self.exchanges.append((method, target, status, bytes_in, bytes_out, ended))


class ScriptedPool(UpstreamPool):
    """An upstream pool whose new connections are socketpairs: the other end of each comes
    out of `accepted`, for the test to play the upstream on. `refuse` makes acquire fail as a
    refused connection does; `hang` makes it never return."""

    def __init__(self) -> None:
        super().__init__(UPSTREAM, LIMITS)
        self.idle: list[UpstreamConnection] = []
        self.opened = 0
        self.refuse = False
        self.hang = False
        self._opening, self.accepted = trio.open_memory_channel[TcpStream](math.inf)

    async def acquire(self, now: float | None = None, *, check: bool = True) -> UpstreamConnection:
        await trio.lowlevel.checkpoint()
        if self.hang:
            await trio.sleep_forever()
        if self.refuse:
            raise HttpRefusal(502, "connection to upstream.test refused", fault="upstream")
        if self.idle:
            connection = self.idle.pop()
            connection.reused = True
            return connection
        ours, theirs = socket.socketpair()
        self.opened += 1
        self._opening.send_nowait(TcpStream(theirs))
        tcp = TcpStream(ours)
        return UpstreamConnection(tcp, tcp, LIMITS.upstream_timeout)

    def release(self, connection: UpstreamConnection, now: float | None = None) -> None:
        if connection.reusable():
            self.idle.append(connection)
        else:
            connection.close()

    def discard(self, connection: UpstreamConnection) -> None:
        connection.close()


async def read_request(stream: TcpStream, buffer: bytearray) -> bytes:
    """The next request head and its Content-Length body, as the upstream received them
    (b"" when the proxy closed the connection)."""
    while (end := buffer.find(b"\r\n\r\n")) < 0:
        data = await stream.receive_some()
        if not data:
            return b""
        buffer += data
    head = bytes(buffer[: end + 4])
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    while len(buffer) < end + 4 + length:
        data = await stream.receive_some()
        if not data:
            break
        buffer += data
    request = bytes(buffer[: end + 4 + length])
    del buffer[: end + 4 + length]
    return request


@dataclass
class Relay:
    """One ClientConnection being served, and what the test sees of it."""

    client: trio.abc.HalfCloseableStream
    connection: ClientConnection
    record: Record
    pool: ScriptedPool
    served: trio.Event  # serve() returned
    upstream_saw: list[bytes] = field(default_factory=list)  # the requests, in order
    unread: bytes = b""  # what the client received past the last response

    async def response(self, method: str = "GET") -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """The next final response, read by h11 as a client would."""
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method=method, target="/", headers=[("host", "a")]))
        conn.send(h11.EndOfMessage())
        if self.unread:  # what came with the previous response
            conn.receive_data(self.unread)
        response, body = await receive_response(self.client, conn)
        self.unread = conn.trailing_data[0]
        return response.status_code, list(response.headers), body

    async def rest(self) -> bytes:
        """Everything the client still receives until the relay closes."""
        data = bytearray(self.unread)
        while chunk := await self.client.receive_some(65536):
            data += chunk
        return bytes(data)


Upstream = Callable[[TcpStream, list[bytes]], Awaitable[None]]


def answering(*responses: bytes) -> Upstream:
    """An upstream that answers each request on a connection with the next of `responses`
    (until the proxy closes the connection)."""

    async def play(stream: TcpStream, saw: list[bytes]) -> None:
        buffer = bytearray()
        for answer in responses:
            request = await read_request(stream, buffer)
            if not request:
                return
            saw.append(request)
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(answer)

    return play


@asynccontextmanager
async def relaying(
    upstream: Upstream | None = None,
    *,
    pair: Callable[
        [], tuple[trio.abc.HalfCloseableStream, trio.abc.HalfCloseableStream]
    ] = trio.testing.memory_stream_pair,
    departures: Departures | None = None,
    client_fd: int = -1,
) -> AsyncIterator[Relay]:
    """A ClientConnection serving the server end of a memory stream pair; the upstream plays
    `upstream` on every connection the pool opens."""
    client, server = pair()
    pool = ScriptedPool()
    settings = RelaySettings(
        limits=LIMITS,
        head_limits=HeadLimits.from_limits(LIMITS),
        rules=ForwardingRules.from_config(UPSTREAM),
        pool=pool,
    )
    record = Record()
    connection = ClientConnection(
        server,
        peer=PEER,
        settings=lambda: settings,
        drain=Drain(),
        tally=record,
        departures=departures,
        client_fd=client_fd,
    )
    relay = Relay(client, connection, record, pool, trio.Event())

    async def serve() -> None:
        try:
            await connection.serve()
        finally:
            relay.served.set()
            await trio.aclose_forcefully(server)  # as the server closes after serve()

    async def play(stream: TcpStream) -> None:
        try:
            if upstream is not None:
                await upstream(stream, relay.upstream_saw)
        finally:
            stream.close()

    async def play_upstream() -> None:
        async with trio.open_nursery() as nursery:
            async for stream in pool.accepted:
                nursery.start_soon(play, stream)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            nursery.start_soon(play_upstream)
            yield relay
            await relay.served.wait()
            nursery.cancel_scope.cancel()
    finally:
        for idle in pool.idle:
            idle.close()


def header(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [value for field_name, value in headers if field_name == name]


# --- keep-alive and pipelining --------------------------------------------------------------


async def test_kept_alive_requests_share_the_connection_and_the_upstream_one(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with relaying(answering(OK, OK)) as relay:
        for _ in range(2):
            await relay.client.send_all(GET)
            status, headers, body = await relay.response()
            assert (status, body, header(headers, b"connection")) == (200, b"ok", [])
        await relay.client.send_eof()
        assert await relay.rest() == b""
    assert relay.pool.opened == 1  # the second request reused the upstream connection
    assert (relay.record.requests, relay.record.relayed, relay.record.detail) == (2, [200, 200], "")
    assert not relay.connection.client_may_be_sending


async def test_pipelined_requests_are_answered_in_order(mock_clock: trio.testing.MockClock) -> None:
    answers = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n2",
    )
    async with relaying(answering(*answers)) as relay:
        second = GET.replace(b"/a", b"/b")
        await relay.client.send_all(GET + second)
        assert (await relay.response())[2] == b"1"
        assert (await relay.response())[2] == b"2"
        await relay.client.send_eof()
    assert [request.split(b" ")[1] for request in relay.upstream_saw] == [b"/a", b"/b"]


async def test_connection_close_gets_one_answer_then_the_close(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with relaying(answering(OK)) as relay:
        await relay.client.send_all(GET.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
        status, headers, _ = await relay.response()
        assert (status, header(headers, b"connection")) == (200, [b"close"])
        assert await relay.rest() == b""


# --- refusals and the lingering close ---------------------------------------------------------


async def test_a_refusal_whose_request_is_unread_lingers(
    mock_clock: trio.testing.MockClock,
) -> None:
    """413 for a body above max_body_bytes, before it is read: the client may still be sending
    it, so the connection ends with a lingering close; nothing went upstream."""
    async with relaying(answering(OK)) as relay:
        await relay.client.send_all(
            b"POST /a HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 1000\r\n\r\n"
        )
        status, headers, body = await relay.response()
        assert (status, header(headers, b"connection")) == (413, [b"close"])
        assert body == b"413 Request Entity Too Large: request body above 100 bytes\n"
    assert relay.connection.client_may_be_sending
    assert relay.pool.opened == 0
    assert (relay.record.detail, relay.record.generated) == (
        "413 request body above 100 bytes",
        [413],
    )


async def test_a_refusal_of_a_request_read_to_its_end_does_not_linger(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with relaying() as relay:
        relay.pool.refuse = True
        await relay.client.send_all(GET)
        status, _, body = await relay.response()
        assert (status, body) == (502, b"502 Bad Gateway\n")  # the detail is for the log
    assert not relay.connection.client_may_be_sending
    assert relay.record.detail == "502 upstream: connection to upstream.test refused"
    problem = "502 upstream: connection to upstream.test refused"
    assert relay.record.exchanges == [(b"GET", b"/a", 502, 0, len(body), problem)]


async def test_a_bad_head_is_refused_with_its_status(mock_clock: trio.testing.MockClock) -> None:
    async with relaying() as relay:
        await relay.client.send_all(b"GET /a HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
        status, _, _ = await relay.response()
        assert status == 400
    assert relay.record.detail == "400 more than one Host field"
    assert relay.pool.opened == 0


@pytest.mark.parametrize(
    "head",
    [
        b"GET /a HTTP/1.1\nHost: api.example.com\n\n",
        b"GET /a HTTP/1.1\nHost: api.example.com\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: api.example.com\r\n\n",
    ],
    ids=["lf", "lf-lines-crlf-end", "crlf-lines-lf-end"],
)
async def test_a_bare_lf_head_is_refused_at_once_not_after_the_header_timeout(
    mock_clock: trio.testing.MockClock, head: bytes
) -> None:
    """The head has no CRLF CRLF: its end is found all the same and the head refused, 400,
    while the client waits for the answer (a 408 would mean the relay waited for more)."""
    async with relaying(answering(OK)) as relay:
        await relay.client.send_all(head)
        status, _, body = await relay.response()
        assert (status, body) == (
            400,
            b"400 Bad Request: bare LF in head (line endings must be CRLF)\n",
        )
    assert relay.pool.opened == 0
    assert relay.record.detail == "400 bare LF in head (line endings must be CRLF)"


@pytest.mark.parametrize("empty_lines", [1, 10])
@pytest.mark.parametrize("byte_by_byte", [False, True])
async def test_empty_lines_before_a_request_are_ignored(
    mock_clock: trio.testing.MockClock, empty_lines: int, byte_by_byte: bool
) -> None:
    """RFC 9112 §2.2, as nginx, HAProxy and Apache: also between two kept-alive requests (a
    client that ends a body with an extra CRLF); the upstream sees the requests alone."""
    async with relaying(answering(OK, OK)) as relay:
        data = b"\r\n" * empty_lines + GET
        for piece in [data[i : i + 1] for i in range(len(data))] if byte_by_byte else [data]:
            await relay.client.send_all(piece)
        assert (await relay.response())[:1] == (200,)
        await relay.client.send_all(b"\r\n" * empty_lines + GET)
        assert (await relay.response())[:1] == (200,)
        await relay.client.send_eof()
    assert [request.split(b"\r\n")[0] for request in relay.upstream_saw] == [b"GET /a HTTP/1.1"] * 2
    assert relay.record.requests == 2


async def test_one_empty_line_too_many_is_refused(mock_clock: trio.testing.MockClock) -> None:
    async with relaying(answering(OK)) as relay:
        await relay.client.send_all(b"\r\n" * 11 + GET)
        status, _, _ = await relay.response()
        assert status == 400
    assert relay.record.detail == "400 more than 10 empty lines before the request line"
    assert relay.pool.opened == 0


# --- bodies: 100-continue, early answers, cuts ------------------------------------------------


@pytest.mark.parametrize("expect", [True, False])
async def test_100_continue_is_sent_before_the_body_is_read(
    mock_clock: trio.testing.MockClock, expect: bool
) -> None:
    async with relaying(answering(OK)) as relay:
        fields = b"Expect: 100-continue\r\n" if expect else b""
        await relay.client.send_all(
            b"POST /a HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 5\r\n" + fields + b"\r\n"
        )
        if expect:
            assert await relay.client.receive_some(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        await relay.client.send_all(b"hello")
        status, _, _ = await relay.response()
        assert status == 200
        await relay.client.send_eof()
    [request] = relay.upstream_saw
    assert request.endswith(b"\r\ncontent-length: 5\r\n\r\nhello")
    assert b"expect" not in request.lower()


async def test_an_upstream_that_answers_before_taking_the_body_is_relayed_then_the_close(
    mock_clock: trio.testing.MockClock,
) -> None:
    async def refuse_early(stream: TcpStream, saw: list[bytes]) -> None:
        buffer = bytearray()
        while b"\r\n\r\n" not in buffer:
            buffer += await stream.receive_some()
        saw.append(bytes(buffer))
        await stream.send_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
        stream.close()  # without reading the rest

    async with relaying(refuse_early) as relay:
        await relay.client.send_all(
            b"POST /a HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 90\r\n\r\nabc"
        )
        await trio.testing.wait_all_tasks_blocked()
        await relay.client.send_all(b"d" * 40)  # the upstream is gone: this send fails
        status, headers, _ = await relay.response()
        assert (status, header(headers, b"connection")) == (401, [b"close"])
        assert await relay.rest() == b""
    assert relay.record.detail == EARLY_ANSWER
    assert relay.connection.client_may_be_sending  # the rest of the body may still come


async def test_an_upstream_that_fails_mid_body_gets_the_client_cut(
    mock_clock: trio.testing.MockClock,
) -> None:
    async def cut_short(stream: TcpStream, saw: list[bytes]) -> None:
        saw.append(await read_request(stream, bytearray()))
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        stream.close()

    async with relaying(cut_short) as relay:
        await relay.client.send_all(GET)
        received = await relay.rest()
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")
    assert received.endswith(b"\r\n\r\nabc")
    assert relay.record.detail == (
        "upstream failed mid-response: invalid response body: body ended after 3 of 10 bytes"
    )


async def test_a_client_gone_mid_request_ends_the_exchange_quietly(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with relaying(answering(OK)) as relay:
        await relay.client.send_all(
            b"POST /a HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 9\r\n\r\nabc"
        )
        await relay.client.send_eof()
        assert await relay.rest() == b""
    assert relay.record.detail == CLIENT_CLOSED_MID_REQUEST


# --- each wait, expired -----------------------------------------------------------------------


async def test_a_connection_that_sends_nothing_is_closed_silently(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with relaying() as relay:
        assert await relay.rest() == b""
    assert (relay.record.requests, relay.record.detail) == (0, "")


async def test_an_idle_kept_alive_connection_is_closed_silently(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with relaying(answering(OK)) as relay:
        await relay.client.send_all(GET)
        assert (await relay.response())[0] == 200
        assert await relay.rest() == b""  # after keepalive_timeout
    assert (relay.record.requests, relay.record.detail) == (1, "")


@pytest.mark.parametrize(
    ("sent", "detail"),
    [
        (
            b"GET /a HTTP/1.1\r\nHost: api.exa",
            "408 request head not complete within the time allowed",
        ),
        (
            b"POST /a HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 9\r\n\r\nabc",
            "408 request body stalled longer than allowed",
        ),
    ],
    ids=["head", "body"],
)
async def test_a_client_that_stalls_gets_408(
    mock_clock: trio.testing.MockClock, sent: bytes, detail: str
) -> None:
    async def reading(stream: TcpStream, saw: list[bytes]) -> None:
        saw.append(await stream.receive_some())
        await trio.sleep_forever()

    async with relaying(reading) as relay:
        await relay.client.send_all(sent)
        status, headers, _ = await relay.response()
        assert (status, header(headers, b"connection")) == (408, [b"close"])
    assert relay.record.detail == detail


async def test_a_client_that_does_not_read_is_cut(mock_clock: trio.testing.MockClock) -> None:
    """A lockstep stream: each send waits for the client to receive it, which it never does."""
    async with relaying(answering(OK), pair=trio.testing.lockstep_stream_pair) as relay:
        await relay.client.send_all(GET)
        await relay.served.wait()
    assert relay.record.detail == "client did not read for send_timeout"


@pytest.mark.parametrize("waiting_for", ["send", "head"])
async def test_an_upstream_that_does_not_take_or_answer_the_request_gets_504(
    mock_clock: trio.testing.MockClock, waiting_for: str
) -> None:
    async def silent(stream: TcpStream, saw: list[bytes]) -> None:
        saw.append(await read_request(stream, bytearray()))
        await trio.sleep_forever()

    async with relaying(silent) as relay:
        relay.pool.hang = waiting_for == "send"
        await relay.client.send_all(GET)
        status, _, body = await relay.response()
    problem = (
        "upstream did not take the request within 5 s"
        if waiting_for == "send"
        else "no response head within 5 s"
    )
    assert (status, body) == (504, b"504 Gateway Timeout\n")
    assert relay.record.detail == f"504 upstream: {problem}"


async def test_an_upstream_that_stalls_mid_body_gets_the_client_cut(
    mock_clock: trio.testing.MockClock,
) -> None:
    async def stalling(stream: TcpStream, saw: list[bytes]) -> None:
        saw.append(await read_request(stream, bytearray()))
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await trio.sleep_forever()

    async with relaying(stalling) as relay:
        await relay.client.send_all(GET)
        received = await relay.rest()
    assert received.endswith(b"\r\n\r\nabc")
    assert relay.record.detail == "upstream failed mid-response: response body stalled for 5 s"


async def test_a_client_that_left_while_the_upstream_works_ends_the_exchange(
    mock_clock: trio.testing.MockClock,
) -> None:
    """The server's Departures looks at the client's descriptor; here the test plays it."""
    closed = trio.Event()

    async def slow(stream: TcpStream, saw: list[bytes]) -> None:
        buffer = bytearray()
        saw.append(await read_request(stream, buffer))
        assert await read_request(stream, buffer) == b""  # the proxy closed: not pooled
        closed.set()

    departures = Departures()
    async with relaying(slow, departures=departures, client_fd=1000) as relay:
        await relay.client.send_all(GET)
        while 1000 not in departures.waiting:
            await trio.testing.wait_all_tasks_blocked()
        departures.waiting.pop(1000).client_left()
        assert await relay.rest() == b""
        await closed.wait()
    assert relay.record.detail == "client closed while waiting for the upstream's response"


async def test_without_a_descriptor_nobody_looks_for_departures(
    mock_clock: trio.testing.MockClock,
) -> None:
    departures = Departures()
    async with relaying(answering(OK), departures=departures) as relay:
        await relay.client.send_all(GET)
        assert (await relay.response())[0] == 200
        assert departures.waiting == {}
        await relay.client.send_eof()
