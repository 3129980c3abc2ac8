"""The relay end to end: a real client, the proxy and the test upstream on loopback sockets.

The proxy runs in-process (`serving`), the test upstream (tests/upstream_server.py, HTTPS
with its own CA) in the same event loop. Clients are in-loop `trio.SSLStream`s speaking either
h11 or exact bytes, so timeout tests can run on a MockClock that jumps once every task is
blocked: they assert outcomes, never durations. Every refusal test also asserts what reached
the upstream, usually nothing at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import select
import signal
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import h11
import pytest
import trio
import trio.testing
import trustme
from helpers.clients import CLIENT_TIMEOUT, strict_eof
from helpers.configs import make_config, write_config
from helpers.keys import KeyFiles, make_key
from helpers.serving import serving
from helpers.upstream_server import (
    EARLY_ANSWER,
    Accepted,
    Behaviour,
    UpstreamServer,
    closed_port,
    in_turn,
    pattern_bytes,
    serve_upstream,
)

from dualproxy.config.errors import OperatorError
from dualproxy.http.exchange import ALLOWED_METHODS, DEADLINE_SLACK
from dualproxy.http.relay import DEPARTURE_CHECK_SECONDS, Departures
from dualproxy.serve import closing, parking
from dualproxy.serve import server as server_module
from dualproxy.serve.parking import PARK_AFTER, PARK_SWEEP
from dualproxy.serve.server import Server
from dualproxy.tls.streams import TcpStream, TlsStream

SNI: Final = "api.example.com"
# More than any answer in these tests: a reader stops there instead of running forever.
MAX_READ: Final = 64 * 1024 * 1024
# Short waits for the tests that exercise them; on the MockClock they cost no real time,
# and they stay far below the test upstream's `hang` (80 s) and the clients' CLIENT_TIMEOUT.
SHORT: Final = 5.0


# --- fixtures and helpers ------------------------------------------------------------------------


@pytest.fixture
def key(ca: trustme.CA, tmp_path: Path) -> KeyFiles:
    return make_key(ca, tmp_path, "k1")


@pytest.fixture
async def upstream(tmp_path: Path) -> AsyncIterator[UpstreamServer]:
    async with serve_upstream(UpstreamServer.https(tmp_path)) as server:
        yield server


@pytest.fixture
def mock_clock() -> trio.testing.MockClock:
    """Timeouts without waiting: the clock jumps to the next deadline once every task has
    been blocked this long in real time (in-loop clients only)."""
    return trio.testing.MockClock(autojump_threshold=0.05)


@dataclass
class Reply:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n == name]

    def echo(self) -> dict[str, Any]:
        """What the echoing upstream said it received."""
        data: dict[str, Any] = json.loads(self.body)
        return data


def echoed_headers(echo: dict[str, Any]) -> list[tuple[str, str]]:
    return [(name.lower(), value) for name, value in echo["headers"]]


class Client:
    """An in-loop TLS client of the proxy: h11 requests, or exact bytes."""

    def __init__(self, tls: trio.SSLStream[trio.SocketStream]) -> None:
        self.tls = tls
        self.conn = h11.Connection(h11.CLIENT)

    async def request(
        self,
        method: str = "GET",
        target: str = "/",
        *,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes | None = None,
        chunks: Sequence[bytes] | None = None,
        http_version: str = "1.1",
    ) -> Reply:
        """One request; `body` goes with a Content-Length, `chunks` chunked."""
        fields = [("host", SNI), *headers]
        if body is not None:
            fields.append(("content-length", str(len(body))))
        if chunks is not None:
            fields.append(("transfer-encoding", "chunked"))
        await self.send_event(
            h11.Request(method=method, target=target, headers=fields, http_version=http_version)
        )
        for piece in [body] if body else chunks or []:
            await self.send_event(h11.Data(data=piece))
        await self.send_event(h11.EndOfMessage())
        return await self.response()

    async def send_event(self, event: h11.Event) -> None:
        data = self.conn.send(event)
        if data:
            with trio.fail_after(CLIENT_TIMEOUT):
                await self.tls.send_all(data)

    async def next_event(self) -> h11.Event:
        with trio.fail_after(CLIENT_TIMEOUT):
            while (event := self.conn.next_event()) is h11.NEED_DATA:
                self.conn.receive_data(bytes(await self.tls.receive_some()))
        assert not isinstance(event, type), event  # PAUSED
        return event

    async def response(self) -> Reply:
        """The next final response, whole; the connection is ready for the next request."""
        event = await self.next_event()
        while isinstance(event, h11.InformationalResponse):
            event = await self.next_event()
        assert isinstance(event, h11.Response), event
        body = bytearray()
        while isinstance(part := await self.next_event(), h11.Data):
            body += part.data
        assert isinstance(part, h11.EndOfMessage), part
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return Reply(event.status_code, list(event.headers), bytes(body))

    async def send(self, data: bytes) -> None:
        with trio.fail_after(CLIENT_TIMEOUT):
            await self.tls.send_all(data)

    async def response_to_raw(self, method: str = "GET") -> Reply:
        """The response to a request sent as exact bytes with `send` (h11 is told about it
        so that it can frame the response)."""
        self.conn.send(h11.Request(method=method, target="/", headers=[("host", SNI)]))
        self.conn.send(h11.EndOfMessage())
        return await self.response()

    async def read_until_closed(self) -> tuple[bytes, bool]:
        """Everything until the proxy closes, and whether it closed cleanly (close_notify)."""
        data = bytearray()
        with trio.fail_after(CLIENT_TIMEOUT):
            try:
                while chunk := await self.tls.receive_some():
                    data += chunk
                    assert len(data) < MAX_READ
            except trio.BrokenResourceError:
                return bytes(data), False
        return bytes(data), True


@dataclass
class Proxy:
    server: Server
    port: int
    cafile: Path

    @asynccontextmanager
    async def client(self, *, receive_buffer: int | None = None) -> AsyncIterator[Client]:
        """A connected, handshaken client; `receive_buffer` shrinks its socket's SO_RCVBUF
        (set before connecting, so the TCP window starts small too)."""
        with trio.fail_after(CLIENT_TIMEOUT):
            sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            if receive_buffer is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            await sock.connect(("127.0.0.1", self.port))
            context = strict_eof(ssl.create_default_context(cafile=str(self.cafile)))
            tls = trio.SSLStream(trio.SocketStream(sock), context, server_hostname=SNI)
        try:
            with trio.fail_after(CLIENT_TIMEOUT):
                await tls.do_handshake()
            yield Client(tls)
        finally:
            await trio.aclose_forcefully(tls)


@asynccontextmanager
async def proxy(
    key: KeyFiles,
    cafile: Path,
    tmp_path: Path,
    upstream: UpstreamServer | dict[str, Any],
    **limits: float,
) -> AsyncIterator[Proxy]:
    """The proxy in front of `upstream` (a test upstream, or an [upstream] table)."""
    async with dev_proxy(key, cafile, tmp_path, upstream, False, **limits) as p:
        yield p


@asynccontextmanager
async def dev_proxy(
    key: KeyFiles,
    cafile: Path,
    tmp_path: Path,
    upstream: UpstreamServer | dict[str, Any],
    dev_headers: bool,
    **limits: float,
) -> AsyncIterator[Proxy]:
    """`proxy`, with or without dev mode's response headers."""
    table = upstream if isinstance(upstream, dict) else upstream.config_table()
    extra: dict[str, Any] = {"upstream": table}
    if limits:
        extra["limits"] = limits
    config = make_config([key], base_dir=tmp_path, extra=extra)
    async with serving(config, dev_headers=dev_headers) as run:
        yield Proxy(run.server, run.port, cafile)


# A response read off the raw socket is a Reply like any other.
RawResponse = Reply


def parse_responses(data: bytes, *, bodies: bool = True) -> list[RawResponse]:
    """Responses framed by Content-Length, one after the other (no body when not `bodies`)."""
    responses = []
    while data:
        head, blank, data = data.partition(b"\r\n\r\n")
        assert blank, f"incomplete head {head!r}"
        status_line, *lines = head.split(b"\r\n")
        headers = []
        for line in lines:
            name, _, value = line.partition(b":")
            headers.append((name.strip().lower(), value.strip()))
        length = int(dict(headers).get(b"content-length", b"0")) if bodies else 0
        responses.append(RawResponse(int(status_line.split(b" ")[1]), headers, data[:length]))
        data = data[length:]
    return responses


def upstream_table(upstream: UpstreamServer, **overrides: Any) -> dict[str, Any]:
    return {**upstream.config_table(), **overrides}


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Until `predicate()` holds: checked each time every task is blocked, bounded."""
    with trio.fail_after(CLIENT_TIMEOUT):
        while not predicate():
            await trio.sleep(0.01)


def conn_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, str]]:
    """The server's `conn ...` log lines as {field: value} (unquoted values only)."""
    lines = [r.getMessage() for r in caplog.records if r.name == "dualproxy"]
    return [dict(re.findall(r"(\w+)=(\S+)", m)) for m in lines if m.startswith("conn ")]


async def the_conn_line(caplog: pytest.LogCaptureFixture) -> tuple[str, str]:
    """(outcome, requests) of the one connection the test made, once its line is written."""
    await wait_until(lambda: len(conn_lines(caplog)) == 1)
    [line] = conn_lines(caplog)
    return line["outcome"], line["requests"]


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "dualproxy"]


# --- the happy path ------------------------------------------------------------------------------


async def test_requests_reach_the_upstream_and_answers_come_back(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    async with proxy(key, cafile, tmp_path, upstream) as p, p.client() as client:
        get = await client.request("GET", "/items?id=1")
        post = await client.request("POST", "/items", body=b'{"name": "x"}')
        head = await client.request("HEAD", "/items")
    assert get.status == post.status == head.status == 200
    assert (get.echo()["method"], get.echo()["target"]) == ("GET", "/items?id=1")
    assert post.echo()["body_sha256"] == hashlib.sha256(b'{"name": "x"}').hexdigest()
    # HEAD: the length a GET would get, and no body.
    assert head.body == b""
    assert int(head.header(b"content-length")[0]) > 0
    # One client connection, one upstream connection, three exchanges on it.
    assert upstream.accepted == 1
    assert [r.number for r in upstream.requests] == [0, 1, 2]


@pytest.mark.parametrize("dev_headers", [False, True])
async def test_only_dev_mode_names_the_key_served_on_relayed_responses(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer, dev_headers: bool
) -> None:
    async with (
        dev_proxy(key, cafile, tmp_path, upstream, dev_headers) as p,
        p.client() as client,
    ):
        reply = await client.request("GET", "/")
    assert reply.status == 200
    expected = [key.name.encode()] if dev_headers else []
    assert reply.header(b"x-dualproxy-key") == expected
    assert reply.header(b"x-dualproxy-reason") == ([b"single"] if dev_headers else [])
    # Added for the client only: the upstream never sees them.
    assert upstream.requests[0].header(b"x-dualproxy-key") == []


# --- strictness: refused before a byte goes upstream ---------------------------------------------

# Small head limits, so every refusal below fits in one TLS record the proxy reads whole
# (refusals with request bytes still unread, and the lingering close, are tested below).
HEAD_LIMITS: Final = {
    "max_request_line_bytes": 512,
    "max_header_bytes": 2048,
    "max_header_count": 16,
    "max_body_bytes": 1000,
}


def req(*lines: str, body: bytes = b"") -> bytes:
    """A request from its lines (CRLF added) and body; the tests below break one rule each."""
    return "".join(line + "\r\n" for line in lines).encode("latin-1") + b"\r\n" + body


HOST: Final = f"Host: {SNI}"
GOOD_REQUEST: Final = req("GET /first HTTP/1.1", HOST)

SMUGGLING: Final = [
    # Framing: the shapes where a front end and a back end disagree on where a body ends.
    ("cl-and-te", req("POST / HTTP/1.1", HOST, "Content-Length: 5",
                      "Transfer-Encoding: chunked", body=b"0\r\n\r\n"), 400),
    ("te-and-cl", req("POST / HTTP/1.1", HOST, "Transfer-Encoding: chunked",
                      "Content-Length: 5", body=b"0\r\n\r\n"), 400),
    ("duplicate-cl-same-value", req("POST / HTTP/1.1", HOST, "Content-Length: 5",
                                    "Content-Length: 5", body=b"hello"), 400),
    ("duplicate-cl-other-value", req("POST / HTTP/1.1", HOST, "Content-Length: 5",
                                     "Content-Length: 6", body=b"hello!"), 400),
    ("cl-list", req("POST / HTTP/1.1", HOST, "Content-Length: 5, 5", body=b"hello"), 400),
    ("cl-signed", req("POST / HTTP/1.1", HOST, "Content-Length: +5", body=b"hello"), 400),
    ("cl-negative", req("POST / HTTP/1.1", HOST, "Content-Length: -1"), 400),
    ("cl-hex", req("POST / HTTP/1.1", HOST, "Content-Length: 0x5", body=b"hello"), 400),
    ("te-identity", req("POST / HTTP/1.1", HOST, "Transfer-Encoding: identity"), 400),
    ("te-chunked-not-last", req("POST / HTTP/1.1", HOST, "Transfer-Encoding: chunked, gzip",
                                body=b"0\r\n\r\n"), 400),
    ("te-other-coding-first", req("POST / HTTP/1.1", HOST, "Transfer-Encoding: gzip, chunked",
                                  body=b"0\r\n\r\n"), 501),
    ("te-chunked-twice", req("POST / HTTP/1.1", HOST, "Transfer-Encoding: chunked, chunked",
                             body=b"0\r\n\r\n"), 400),
    ("te-two-fields", req("POST / HTTP/1.1", HOST, "Transfer-Encoding: chunked",
                          "Transfer-Encoding: chunked", body=b"0\r\n\r\n"), 400),
    ("te-lookalike", req("POST / HTTP/1.1", HOST, "Transfer-Encoding: xchunked",
                         body=b"0\r\n\r\n"), 400),
    ("te-in-http10", req("POST / HTTP/1.0", HOST, "Transfer-Encoding: chunked",
                         body=b"0\r\n\r\n"), 400),
    ("te-space-before-colon", req("POST / HTTP/1.1", HOST, "Transfer-Encoding : chunked",
                                  body=b"0\r\n\r\n"), 400),
    ("te-obs-fold", req("POST / HTTP/1.1", HOST, "Transfer-Encoding:", " chunked",
                        body=b"0\r\n\r\n"), 400),
    # Lines and fields.
    ("obs-fold", req("GET / HTTP/1.1", HOST, "X-Long: a", "\tb"), 400),
    ("bare-lf", b"GET / HTTP/1.1\r\n" + HOST.encode() + b"\nX-A: 1\r\n\r\n", 400),
    ("bare-cr", req("GET / HTTP/1.1", HOST, "X-A: 1\r2"), 400),
    ("nul-in-value", req("GET / HTTP/1.1", HOST, "X-A: 1\x002"), 400),
    ("underscore-in-name", req("GET / HTTP/1.1", HOST, "X_Forwarded_For: 10.0.0.1"), 400),
    ("space-in-name", req("GET / HTTP/1.1", HOST, "X A: 1"), 400),
    ("no-colon", req("GET / HTTP/1.1", HOST, "X-A 1"), 400),
    # A head whose every line ends in a bare LF has no CRLF CRLF: refused when it is here,
    # not after request_header_timeout (408).
    ("bare-lf-head", b"GET / HTTP/1.1\n" + HOST.encode() + b"\n\n", 400),
    ("bare-lf-head-crlf-end", b"GET / HTTP/1.1\n" + HOST.encode() + b"\n\r\n", 400),
    ("bare-lf-end", b"GET / HTTP/1.1\r\n" + HOST.encode() + b"\r\n\n", 400),
    # Up to 10 are ignored (RFC 9112 §2.2; Apache's limit), one more is not.
    ("eleven-leading-empty-lines", b"\r\n" * 11 + GOOD_REQUEST, 400),
    # The request line.
    ("two-spaces", req("GET  / HTTP/1.1", HOST), 400),
    ("http-0.9", b"GET /\r\n\r\n", 400),
    ("lowercase-version", req("GET / http/1.1", HOST), 400),
    ("http-2.0", req("GET / HTTP/2.0", HOST), 505),
    ("http-1.2", req("GET / HTTP/1.2", HOST), 505),
    ("method-not-a-token", req("GE(T / HTTP/1.1", HOST), 400),
    ("connect", req("CONNECT api.example.com:443 HTTP/1.1", HOST), 405),
    ("trace", req("TRACE / HTTP/1.1", HOST), 405),
    # Targets and Host.
    ("fragment", req("GET /a#b HTTP/1.1", HOST), 400),
    ("authority-form", req("GET api.example.com:443 HTTP/1.1", HOST), 400),
    ("asterisk-with-get", req("GET * HTTP/1.1", HOST), 400),
    ("no-host", req("GET / HTTP/1.1"), 400),
    ("two-hosts", req("GET / HTTP/1.1", HOST, "Host: evil.example"), 400),
    ("host-with-userinfo", req("GET / HTTP/1.1", "Host: user@api.example.com"), 400),
    ("host-with-space", req("GET / HTTP/1.1", "Host: api.example.com evil"), 400),
    ("host-port-too-big", req("GET / HTTP/1.1", "Host: api.example.com:65536"), 400),
    # Expectations, sizes.
    ("unknown-expectation", req("POST / HTTP/1.1", HOST, "Expect: 200-ok",
                                "Content-Length: 0"), 417),
    ("request-line-too-long", req("GET /" + "a" * 600 + " HTTP/1.1", HOST), 414),
    ("head-too-large", req("GET / HTTP/1.1", HOST, "X-Big: " + "a" * 2100), 431),
    ("too-many-fields", req("GET / HTTP/1.1", HOST, *(f"X-{i}: {i}" for i in range(20))), 431),
    ("content-length-above-max-body", req("POST / HTTP/1.1", HOST, "Content-Length: 1001"), 413),
]  # fmt: skip


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [pytest.param(data, status, id=name) for name, data, status in SMUGGLING],
)
@pytest.mark.parametrize("position", ["alone", "pipelined-after-a-good-one"])
async def test_smuggling_shapes_are_refused_before_the_upstream(
    key: KeyFiles,
    cafile: Path,
    tmp_path: Path,
    upstream: UpstreamServer,
    request_bytes: bytes,
    status: int,
    position: str,
) -> None:
    pipelined = position != "alone"
    async with proxy(key, cafile, tmp_path, upstream, **HEAD_LIMITS) as p, p.client() as client:
        await client.send((GOOD_REQUEST if pipelined else b"") + request_bytes)
        answer, _ = await client.read_until_closed()
    *good, refusal = parse_responses(answer)
    assert refusal.status == status, answer
    assert refusal.header(b"connection") == [b"close"]
    assert refusal.header(b"content-type") == [b"text/plain; charset=utf-8"]
    assert refusal.body.startswith(str(status).encode())
    allow = refusal.header(b"allow")
    assert allow == ([ALLOWED_METHODS] if status == 405 else [])
    if pipelined:
        assert [r.status for r in good] == [200]
        assert [r.target for r in upstream.requests] == [b"/first"]
        assert upstream.received.count(b" HTTP/1.1\r\n") == 1  # nothing of the second
    else:
        assert good == []
        assert upstream.received == b""
        assert upstream.accepted == 0


async def test_the_positive_twins_of_the_smuggling_table_are_relayed(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    """What the table refuses differs by one rule from what this relays."""
    accepted = [
        req("POST / HTTP/1.1", HOST, "Content-Length: 5", body=b"hello"),
        req("POST / HTTP/1.1", HOST, "Transfer-Encoding: Chunked", body=b"5\r\nhello\r\n0\r\n\r\n"),
        req("GET / HTTP/1.1", HOST, "X-Long: a\tb"),
        req("GET / HTTP/1.1", HOST, "X-Forwarded-Proto-Ish: 1"),
        req("GET /a?b=c HTTP/1.1", HOST),
        req("GET https://api.example.com/abs?q=1 HTTP/1.1", HOST),
        req("OPTIONS * HTTP/1.1", HOST),
        req("GET / HTTP/1.1", "Host: api.example.com:8443"),
        req("POST / HTTP/1.1", HOST, "Expect: 100-continue", "Content-Length: 0"),
        req("GET /" + "a" * 400 + " HTTP/1.1", HOST),
        req("GET / HTTP/1.1", HOST, *(f"X-{i}: {i}" for i in range(15))),
        req("POST / HTTP/1.1", HOST, "Content-Length: 1000", body=b"x" * 1000),
        req("DELETE /x HTTP/1.1", HOST),
        b"\r\n" + req("GET / HTTP/1.1", HOST),  # RFC 9112 §2.2: ignored
        b"\r\n" * 10 + req("GET / HTTP/1.1", HOST),
    ]
    async with proxy(key, cafile, tmp_path, upstream, **HEAD_LIMITS) as p, p.client() as client:
        for request_bytes in accepted:
            await client.send(request_bytes)
            reply = await client.response_to_raw()
            assert reply.status == 200, request_bytes
    assert len(upstream.requests) == len(accepted)
    absolute = upstream.requests[5]
    assert (absolute.target, absolute.header(b"host")) == (
        b"/abs?q=1",
        [b"localhost:%d" % upstream.port],
    )


# --- header rewriting, both directions ----------------------------------------------------------


async def test_request_headers_are_rewritten_for_the_upstream(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    table = upstream_table(upstream, headers={"X-Proxy-Secret": "s3cret"})
    async with proxy(key, cafile, tmp_path, table) as p, p.client() as client:
        reply = await client.request(
            "POST",
            "/upload",
            headers=[
                ("User-Agent", "app/1.0"),
                ("Connection", "keep-alive, X-Hop"),
                ("X-Hop", "named by Connection"),
                ("Keep-Alive", "timeout=5"),
                ("TE", "trailers"),
                ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
                ("Proxy-Connection", "keep-alive"),
                ("X-Forwarded-For", "6.6.6.6"),
                ("X-Forwarded-Host", "evil.example"),
                ("X-Forwarded-Proto", "http"),
                ("Forwarded", "for=6.6.6.6"),
                ("X-Proxy-Secret", "forged"),
                ("Cookie", "a=1"),
                ("Accept", "application/json"),
            ],
            chunks=[b"hello ", b"world"],
        )
    assert reply.status == 200
    echo = reply.echo()
    assert echo["body_sha256"] == hashlib.sha256(b"hello world").hexdigest()
    assert echoed_headers(echo) == [
        ("host", f"localhost:{upstream.port}"),
        ("user-agent", "app/1.0"),
        ("cookie", "a=1"),
        ("accept", "application/json"),
        ("x-forwarded-for", "127.0.0.1"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", SNI),
        ("x-proxy-secret", "s3cret"),
        ("transfer-encoding", "chunked"),  # our framing
    ]


RESPONSE_WITH_HOP_BY_HOP: Final = (
    b"HTTP/1.1 201 Created\r\n"
    b"Content-Type: text/plain\r\n"
    b"Connection: X-Internal\r\n"
    b"X-Internal: upstream only\r\n"
    b"Keep-Alive: timeout=5\r\n"
    b"Proxy-Authenticate: Basic\r\n"
    b"Trailer: X-Checksum\r\n"
    b"Upgrade: h2c\r\n"
    b"Set-Cookie: a=1\r\n"
    b"Set-Cookie: b=2\r\n"
    b"X-Kept: yes\r\n"
    b"Content-Length: 2\r\n"
    b"\r\n"
    b"ok"
)


async def test_response_headers_are_rewritten_for_the_client(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    upstream.behaviour = RESPONSE_WITH_HOP_BY_HOP
    async with proxy(key, cafile, tmp_path, upstream) as p, p.client() as client:
        reply = await client.request()
    assert (reply.status, reply.body) == (201, b"ok")
    assert reply.headers == [
        (b"content-type", b"text/plain"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
        (b"x-kept", b"yes"),
        (b"content-length", b"2"),
    ]


async def test_expect_100_continue_is_answered_by_the_proxy(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    body = b"x" * 5000
    async with proxy(key, cafile, tmp_path, upstream) as p, p.client() as client:
        await client.send_event(
            h11.Request(
                method="PUT",
                target="/blob",
                headers=[
                    ("host", SNI),
                    ("expect", "100-continue"),
                    ("content-length", str(len(body))),
                ],
            )
        )
        # Nothing of the body is sent before the proxy says to go on.
        interim = await client.next_event()
        assert isinstance(interim, h11.InformationalResponse)
        assert interim.status_code == 100
        await client.send_event(h11.Data(data=body))
        await client.send_event(h11.EndOfMessage())
        reply = await client.response()
    assert reply.status == 200
    assert reply.echo()["body_length"] == len(body)
    [received] = upstream.requests
    assert received.header(b"expect") == []


async def test_expect_100_continue_with_a_body_too_large_gets_413_and_no_100(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    async with (
        proxy(key, cafile, tmp_path, upstream, max_body_bytes=1000) as p,
        p.client() as client,
    ):
        await client.send(
            req("PUT /blob HTTP/1.1", HOST, "Expect: 100-continue", "Content-Length: 1001")
        )
        answer, _ = await client.read_until_closed()
    assert [r.status for r in parse_responses(answer)] == [413]
    assert upstream.received == b""


# --- keep-alive, pipelining, HTTP/1.0 ------------------------------------------------------------


async def test_pipelined_requests_are_answered_in_order(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    requests = (
        req("GET /1 HTTP/1.1", HOST)
        + req("POST /2 HTTP/1.1", HOST, "Content-Length: 3", body=b"abc")
        + req("GET /3 HTTP/1.1", HOST, "Connection: close")
    )
    async with proxy(key, cafile, tmp_path, upstream) as p, p.client() as client:
        await client.send(requests)  # one write, three requests
        answer, clean = await client.read_until_closed()
    responses = parse_responses(answer)
    assert [json.loads(r.body)["target"] for r in responses] == ["/1", "/2", "/3"]
    assert responses[-1].header(b"connection") == [b"close"]
    assert clean


async def test_connection_close_and_http10_clients_get_one_response_then_a_close(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    upstream.behaviour = Behaviour.LARGE_BODY
    upstream.large_body_size = 3000
    upstream.large_body_chunked = True
    async with proxy(key, cafile, tmp_path, upstream) as p:
        async with p.client() as client:
            # HTTP/1.0 may omit Host; a chunked upstream body reaches it delimited by the close.
            await client.send(b"GET /old HTTP/1.0\r\n\r\n")
            answer, clean = await client.read_until_closed()
        async with p.client() as client:
            reply = await client.request(headers=[("connection", "close")])
            rest, _ = await client.read_until_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"transfer-encoding" not in head.lower()
    assert body == pattern_bytes(3000)
    assert clean
    assert reply.status == 200
    assert reply.header(b"connection") == [b"close"]
    assert rest == b""
    assert upstream.requests[0].header(b"host") == [f"localhost:{upstream.port}".encode()]


async def test_request_trailers_are_dropped(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    chunked = b"5\r\nhello\r\n0\r\nX-Checksum: abc\r\n\r\n"
    async with proxy(key, cafile, tmp_path, upstream) as p, p.client() as client:
        await client.send(req("POST / HTTP/1.1", HOST, "Transfer-Encoding: chunked", body=chunked))
        reply = await client.response_to_raw("POST")
    assert reply.status == 200
    assert reply.echo()["body_length"] == 5
    assert b"hello" in upstream.received
    assert b"x-checksum" not in upstream.received.lower()


async def test_upstream_connections_are_reused_across_client_connections(
    key: KeyFiles,
    cafile: Path,
    tmp_path: Path,
    upstream: UpstreamServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dualproxy")
    async with proxy(key, cafile, tmp_path, upstream) as p:
        for count in (1, 3):
            async with p.client() as client:
                for _ in range(count):
                    assert (await client.request()).status == 200
        await wait_until(lambda: len(conn_lines(caplog)) == 2)
    assert upstream.accepted == 1
    assert [(r.connection, r.number) for r in upstream.requests] == [(0, i) for i in range(4)]
    # Each client connection is counted with its requests.
    assert [(x["outcome"], x["requests"]) for x in conn_lines(caplog)] == [("ok", "1"), ("ok", "3")]


# --- timeouts (on the MockClock) -----------------------------------------------------------------


async def test_a_request_head_trickling_past_the_header_timeout_gets_408(
    key: KeyFiles,
    cafile: Path,
    tmp_path: Path,
    upstream: UpstreamServer,
    mock_clock: trio.testing.MockClock,
) -> None:
    lines = [f"X-Slow-{i}: {i}\r\n".encode() for i in range(int(SHORT) * 4)]
    async with proxy(key, cafile, tmp_path, upstream, request_header_timeout=SHORT) as p:
        # Within the timeout, however slowly: served.
        async with p.client() as client:
            await client.send(b"GET / HTTP/1.1\r\n")
            for line in [HOST.encode() + b"\r\n", *lines[:3]]:
                await trio.sleep(SHORT / 5)
                await client.send(line)
            await client.send(b"\r\n")
            assert (await client.response_to_raw()).status == 200
        # A line a second keeps bytes coming, but the head is never done in time: 408.
        async with p.client() as client:
            await client.send(b"GET / HTTP/1.1\r\n")

            async def trickle() -> None:
                for line in lines:
                    await trio.sleep(1)
                    try:
                        await client.send(line)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return

            async with trio.open_nursery() as nursery:
                nursery.start_soon(trickle)
                answer, _ = await client.read_until_closed()
                nursery.cancel_scope.cancel()
    assert [r.status for r in parse_responses(answer)] == [408]
    assert len(upstream.requests) == 1


async def test_an_idle_keepalive_connection_is_closed_silently(
    key: KeyFiles,
    cafile: Path,
    tmp_path: Path,
    upstream: UpstreamServer,
    mock_clock: trio.testing.MockClock,
) -> None:
    async with (
        proxy(key, cafile, tmp_path, upstream, keepalive_timeout=SHORT) as p,
        p.client() as client,
    ):
        for _ in range(2):  # idle, but not for long enough
            assert (await client.request()).status == 200
            await trio.sleep(SHORT / 2)
        answer, clean = await client.read_until_closed()  # then idle until closed
    assert (answer, clean) == (b"", True)


async def test_a_request_body_that_stalls_gets_408_and_the_upstream_connection_is_dropped(
    key: KeyFiles,
    cafile: Path,
    tmp_path: Path,
    upstream: UpstreamServer,
    mock_clock: trio.testing.MockClock,
) -> None:
    async with proxy(key, cafile, tmp_path, upstream, body_timeout=SHORT) as p:
        async with p.client() as client:
            await client.send(req("POST / HTTP/1.1", HOST, "Content-Length: 10", body=b"12345"))
            answer, _ = await client.read_until_closed()
        await upstream.connections[0].wait_done()
    assert [r.status for r in parse_responses(answer)] == [408]
    [received] = upstream.requests
    assert upstream.received.endswith(b"\r\n\r\n12345")  # the body as far as it came
    assert not received.complete


async def test_an_upstream_that_sends_no_head_gets_504(
    key: KeyFiles,
    cafile: Path,
    tmp_path: Path,
    upstream: UpstreamServer,
    mock_clock: trio.testing.MockClock,
) -> None:
    upstream.behaviour = in_turn(Behaviour.HANG_BEFORE_HEAD, Behaviour.ECHO)
    async with proxy(key, cafile, tmp_path, upstream, upstream_timeout=SHORT) as p:
        async with p.client() as client:
            await client.send(GOOD_REQUEST)
            answer, _ = await client.read_until_closed()
        async with p.client() as client:  # the hung connection was not pooled
            assert (await client.request()).status == 200
    assert [r.status for r in parse_responses(answer)] == [504]
    assert upstream.accepted == 2


async def test_an_upstream_that_stalls_between_body_chunks_gets_the_client_cut(
    key: KeyFiles,
    cafile: Path,
    tmp_path: Path,
    upstream: UpstreamServer,
    mock_clock: trio.testing.MockClock,
) -> None:
    upstream.behaviour = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    async with (
        proxy(key, cafile, tmp_path, upstream, upstream_timeout=SHORT) as p,
        p.client() as client,
    ):
        await client.send(GOOD_REQUEST)
        answer, clean = await client.read_until_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"transfer-encoding: chunked" in head.lower()
    # The chunk that came, and no final chunk, no close_notify: unmistakably cut short.
    assert body == b"5\r\nhello\r\n"
    assert not clean


# --- upstream faults -----------------------------------------------------------------------------


async def test_a_refused_upstream_connection_gets_502(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    with closed_port() as port:
        table = upstream_table(upstream, url=f"https://localhost:{port}")
        async with proxy(key, cafile, tmp_path, table) as p, p.client() as client:
            await client.send(GOOD_REQUEST)
            answer, _ = await client.read_until_closed()
    [refusal] = parse_responses(answer)
    assert refusal.status == 502
    assert refusal.body == b"502 Bad Gateway\n"  # nothing of the upstream: that is the log's


@pytest.mark.parametrize("mismatch", ["unknown-ca", "wrong-name"])
async def test_an_upstream_certificate_we_cannot_verify_gets_502(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer, mismatch: str
) -> None:
    if mismatch == "unknown-ca":
        other = tmp_path / "other-ca.pem"
        trustme.CA().cert_pem.write_to_path(str(other))
        table = upstream_table(upstream, ca_file=str(other))
    else:  # the certificate names upstream.test and localhost, not 127.0.0.1
        table = upstream.config_table(host="127.0.0.1")
    async with proxy(key, cafile, tmp_path, table) as p, p.client() as client:
        await client.send(GOOD_REQUEST)
        answer, _ = await client.read_until_closed()
    [refusal] = parse_responses(answer)
    assert refusal.status == 502
    assert refusal.body == b"502 Bad Gateway\n"
    assert upstream.received == b""


@pytest.mark.parametrize(
    "behaviour",
    [
        Behaviour.CL_AND_TE,
        Behaviour.CONFLICTING_CONTENT_LENGTH,
        Behaviour.DUPLICATE_CONTENT_LENGTH,
        Behaviour.HTTP10_CHUNKED,
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Folded: a\r\n b\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX-A: 1\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n",
        b"SMTP ready\r\n\r\n",
    ],
    ids=["cl-and-te", "conflicting-cl", "duplicate-cl", "http10-chunked", "obs-fold", "bare-lf",
         "unasked-101", "not-http"],
)  # fmt: skip
async def test_an_ambiguous_or_malformed_response_head_gets_502_and_the_connection_dropped(
    key: KeyFiles,
    cafile: Path,
    tmp_path: Path,
    upstream: UpstreamServer,
    behaviour: Behaviour | bytes,
) -> None:
    upstream.behaviour = in_turn(behaviour, Behaviour.ECHO)
    async with proxy(key, cafile, tmp_path, upstream) as p:
        async with p.client() as client:
            await client.send(GOOD_REQUEST)
            answer, _ = await client.read_until_closed()
        async with p.client() as client:
            after = await client.request()
    assert [r.status for r in parse_responses(answer)] == [502]
    assert after.status == 200
    assert after.echo()["connection"] == 1  # a new connection, not the one that misbehaved


async def test_bytes_after_a_response_body_are_never_relayed_and_the_connection_is_dropped(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    upstream.behaviour = in_turn(Behaviour.EXTRA_BYTES_AFTER_BODY, Behaviour.ECHO)
    async with proxy(key, cafile, tmp_path, upstream) as p, p.client() as client:
        first = await client.request()
        second = await client.request()
    assert (first.status, first.body) == (200, b"hello")
    assert second.status == 200
    assert second.echo()["connection"] == 1
    assert upstream.accepted == 2


async def test_an_upstream_reset_mid_response_cuts_the_client_connection(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    upstream.behaviour = Behaviour.RESET_MID_RESPONSE
    async with proxy(key, cafile, tmp_path, upstream) as p, p.client() as client:
        await client.send(GOOD_REQUEST)
        answer, clean = await client.read_until_closed()
    [partial] = parse_responses(answer)
    assert partial.status == 200
    assert 0 < len(partial.body) < int(partial.header(b"content-length")[0])
    assert not clean


async def test_an_upstream_close_mid_chunked_body_gets_no_false_final_chunk(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    upstream.behaviour = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    async with proxy(key, cafile, tmp_path, upstream) as p, p.client() as client:
        await client.send(GOOD_REQUEST)
        head = bytearray()
        with trio.fail_after(CLIENT_TIMEOUT):
            while b"hello" not in head:
                head += await client.tls.receive_some()
        await wait_until(lambda: any(c.idle for c in upstream.connections))
        await upstream.close_idle(notify=False)  # the upstream's FIN, mid-body
        rest, clean = await client.read_until_closed()
    assert head.endswith(b"\r\n\r\n5\r\nhello\r\n")
    assert rest == b""
    assert not clean


async def test_interim_responses_from_the_upstream_are_not_relayed(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    upstream.behaviour = Behaviour.INFORMATIONAL_FIRST
    async with proxy(key, cafile, tmp_path, upstream) as p, p.client() as client:
        await client.send(GOOD_REQUEST)
        reply = await client.response_to_raw()
        await client.send(req("GET / HTTP/1.1", HOST, "Connection: close"))
        rest, _ = await client.read_until_closed()
    assert reply.status == 200
    assert b"103" not in rest.split(b"\r\n", 1)[0]
    assert parse_responses(rest)[0].status == 200


async def test_an_upstream_that_does_not_finish_the_handshake_gets_504(
    key: KeyFiles,
    cafile: Path,
    tmp_path: Path,
    upstream: UpstreamServer,
    mock_clock: trio.testing.MockClock,
) -> None:
    upstream.silent = True
    async with (
        proxy(key, cafile, tmp_path, upstream, upstream_connect_timeout=SHORT) as p,
        p.client() as client,
    ):
        await client.send(GOOD_REQUEST)
        answer, _ = await client.read_until_closed()
    assert [r.status for r in parse_responses(answer)] == [504]


async def test_a_request_after_a_long_idle_still_gets_its_504_when_connecting_times_out(
    key: KeyFiles,
    cafile: Path,
    tmp_path: Path,
    upstream: UpstreamServer,
    mock_clock: trio.testing.MockClock,
) -> None:
    """The request's own bounds apply from its head on: a kept-alive connection that idled
    nearly keepalive_timeout is not closed silently, as if still idle, while the pool opens an
    upstream connection for it (the idle wait's deadline must not outlive the wait)."""
    upstream.silent = True  # accepts, never finishes the TLS handshake
    async with (
        proxy(
            key,
            cafile,
            tmp_path,
            {**upstream.config_table(), "pool_max_idle": 0},  # each request connects anew
            keepalive_timeout=SHORT,
            upstream_connect_timeout=SHORT,
        ) as p,
        p.client() as client,
    ):
        upstream.silent = False
        assert (await client.request()).status == 200
        upstream.silent = True
        await trio.sleep(SHORT * 0.9)  # idle, but not for long enough
        await client.send(GOOD_REQUEST)
        answer, _ = await client.read_until_closed()
    assert [r.status for r in parse_responses(answer)] == [504]


async def test_what_the_upstream_sent_reaches_the_client_before_the_upstream_sends_more(
    key: KeyFiles,
    cafile: Path,
    tmp_path: Path,
    upstream: UpstreamServer,
    mock_clock: trio.testing.MockClock,
) -> None:
    """Small responses go out in one write, but nothing is held back waiting for more."""
    upstream.behaviour = Behaviour.HANG_MID_BODY  # the head and half the body, a pause, the rest
    upstream.hang = SHORT
    async with (
        proxy(key, cafile, tmp_path, upstream, upstream_timeout=SHORT * 3) as p,
        p.client() as client,
    ):
        await client.send(GOOD_REQUEST)
        received = bytearray()
        with trio.fail_after(CLIENT_TIMEOUT):
            while len(received.partition(b"\r\n\r\n")[2]) == 0:
                received += await client.tls.receive_some()
            # What the upstream had sent when the first part reached us...
            [connection] = upstream.connections
            sent_then = connection.sent
            head = bytes(received).partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
            [response] = parse_responses(head, bodies=False)
            length = int(response.header(b"content-length")[0])
            while len(received.partition(b"\r\n\r\n")[2]) < length:
                received += await client.tls.receive_some()
    # ...was not all of it: the proxy passed on the head and the first half during the pause.
    assert connection.sent > sent_then
    assert json.loads(received.partition(b"\r\n\r\n")[2])["target"] == "/first"


# --- bodies streamed, memory bounded ------------------------------------------------------------

BIG: Final = 8 * 1024 * 1024


async def test_a_large_upload_is_streamed_to_the_upstream(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    body = pattern_bytes(BIG)
    half = BIG // 2
    async with (
        proxy(key, cafile, tmp_path, upstream, max_body_bytes=BIG) as p,
        p.client() as client,
    ):
        head = req("PUT /big HTTP/1.1", HOST, f"Content-Length: {BIG}")
        await client.send(head + body[:half])
        # Streamed, not buffered: the upstream gets bytes before the client has sent all.
        await wait_until(lambda: len(upstream.received) > half // 2)
        await client.send(body[half:])
        reply = await client.response_to_raw("PUT")
        chunked = await client.request("POST", "/big", chunks=[body[:half], body[half:]])
    for answer in (reply, chunked):
        assert answer.status == 200
        assert answer.echo()["body_sha256"] == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_large_download_is_streamed_to_the_client(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer, chunked: bool
) -> None:
    upstream.behaviour = Behaviour.LARGE_BODY
    upstream.large_body_size = BIG
    upstream.large_body_chunked = chunked
    async with proxy(key, cafile, tmp_path, upstream) as p, p.client() as client:
        reply = await client.request()
    assert reply.status == 200
    assert hashlib.sha256(reply.body).digest() == hashlib.sha256(pattern_bytes(BIG)).digest()
    assert reply.header(b"transfer-encoding" if chunked else b"content-length") == (
        [b"chunked"] if chunked else [str(BIG).encode()]
    )


async def test_a_client_that_stops_reading_stops_the_upstream_too(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    """Backpressure end to end: the proxy holds one chunk, not the body."""
    size = 64 * 1024 * 1024
    upstream.behaviour = Behaviour.LARGE_BODY
    upstream.large_body_size = size
    async with (
        proxy(key, cafile, tmp_path, upstream) as p,
        p.client(receive_buffer=64 * 1024) as client,
    ):
        await client.send(GOOD_REQUEST)
        with trio.fail_after(CLIENT_TIMEOUT):
            first = await client.tls.receive_some()
        assert first.startswith(b"HTTP/1.1 200 ")
        # Every task blocked: the upstream in send_all, the proxy in send_all to us.
        await trio.testing.wait_all_tasks_blocked(cushion=0.2)
        sent = upstream.connections[0].sent
        # What left the upstream is what the kernels' socket buffers hold (a few MiB
        # each way), far from the body: the proxy did not read ahead into memory.
        assert sent < size // 4
        # And the stream resumes where it stopped.
        more = bytearray(first)
        with trio.fail_after(CLIENT_TIMEOUT):
            while len(more) < 1024 * 1024:
                more += await client.tls.receive_some()
    body = bytes(more).partition(b"\r\n\r\n")[2]
    assert body == pattern_bytes(len(body))


# --- the stale-connection retry ------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "PUT", "DELETE"])
async def test_an_idempotent_request_without_body_is_retried_once_when_a_reused_connection_fails(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer, method: str
) -> None:
    upstream.behaviour = in_turn(Behaviour.ECHO, Behaviour.CLOSE_BEFORE_RESPONSE, Behaviour.ECHO)
    async with proxy(key, cafile, tmp_path, upstream) as p, p.client() as client:
        assert (await client.request("GET", "/warm")).status == 200
        reply = await client.request(method, "/again")
    assert reply.status == 200
    sent = [(r.connection, r.method.decode(), r.target) for r in upstream.requests]
    assert sent == [(0, "GET", b"/warm"), (0, method, b"/again"), (1, method, b"/again")]


@pytest.mark.parametrize(
    ("method", "body"),
    [("POST", b"data"), ("POST", None), ("PATCH", b"data"), ("PUT", b"data"), ("DELETE", b"x")],
)
async def test_a_request_that_is_not_replayable_is_never_sent_twice(
    key: KeyFiles,
    cafile: Path,
    tmp_path: Path,
    upstream: UpstreamServer,
    method: str,
    body: bytes | None,
) -> None:
    upstream.behaviour = in_turn(Behaviour.ECHO, Behaviour.CLOSE_BEFORE_RESPONSE, Behaviour.ECHO)
    async with proxy(key, cafile, tmp_path, upstream) as p, p.client() as client:
        assert (await client.request("GET", "/warm")).status == 200
        await client.send_event(
            h11.Request(
                method=method,
                target="/once",
                headers=[("host", SNI), ("content-length", str(len(body or b"")))],
            )
        )
        if body:
            await client.send_event(h11.Data(data=body))
        await client.send_event(h11.EndOfMessage())
        answer, _ = await client.read_until_closed()
    assert [r.status for r in parse_responses(answer)] == [502]
    assert [(r.connection, r.target) for r in upstream.requests] == [(0, b"/warm"), (0, b"/once")]


async def test_a_fresh_connection_that_fails_is_not_retried(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    upstream.behaviour = Behaviour.CLOSE_BEFORE_RESPONSE
    async with proxy(key, cafile, tmp_path, upstream) as p, p.client() as client:
        await client.send(GOOD_REQUEST)
        answer, _ = await client.read_until_closed()
    assert [r.status for r in parse_responses(answer)] == [502]
    assert (upstream.accepted, len(upstream.requests)) == (1, 1)


async def test_connections_the_upstream_closed_while_idle_are_not_used(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    async with proxy(key, cafile, tmp_path, upstream) as p, p.client() as client:
        assert (await client.request()).status == 200
        assert await upstream.close_idle() == 1
        reply = await client.request("POST", "/after", body=b"not replayable, still fine")
    assert reply.status == 200
    assert reply.echo()["connection"] == 1
    assert [r.connection for r in upstream.requests] == [0, 1]


@pytest.mark.parametrize("notify", [False, True], ids=["close", "close_notify"])
async def test_a_replayable_request_on_a_connection_closed_while_idle_is_answered(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer, notify: bool
) -> None:
    """A GET's first attempt takes the idle connection without looking at its socket; closed
    by the upstream meanwhile, it fails before any response byte and the GET goes again on a
    fresh connection, once."""
    async with proxy(key, cafile, tmp_path, upstream) as p, p.client() as client:
        assert (await client.request()).status == 200
        assert await upstream.close_idle(notify=notify) == 1
        reply = await client.request("GET", "/after")
        again = await client.request("GET", "/then")
    assert (reply.status, again.status) == (200, 200)
    assert [(r.connection, r.target) for r in upstream.requests] == [
        (0, b"/"),
        (1, b"/after"),
        (1, b"/then"),
    ]


# --- request body limits -------------------------------------------------------------------------


async def test_a_chunked_body_growing_past_the_limit_gets_413_and_the_connection_dropped(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    chunks = b"400\r\n" + b"a" * 1024 + b"\r\n"  # 1 KiB chunks; the limit is 1000 bytes
    async with proxy(key, cafile, tmp_path, upstream, max_body_bytes=1000) as p:
        async with p.client() as client:
            await client.send(req("POST / HTTP/1.1", HOST, "Transfer-Encoding: chunked") + chunks)
            answer, _ = await client.read_until_closed()
        await upstream.connections[0].wait_done()
    assert [r.status for r in parse_responses(answer)] == [413]
    # The head goes upstream with the first body bytes, so nothing at all may have left; what
    # did, if anything, is no complete request.
    assert not any(received.complete for received in upstream.requests)


async def test_a_bad_chunk_after_a_good_head_gets_400_and_the_connection_dropped(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    async with proxy(key, cafile, tmp_path, upstream) as p:
        async with p.client() as client:
            await client.send(
                req("POST / HTTP/1.1", HOST, "Transfer-Encoding: chunked", body=b"zz\r\nhi\r\n")
            )
            answer, _ = await client.read_until_closed()
        await upstream.connections[0].wait_done()
    assert [r.status for r in parse_responses(answer)] == [400]
    assert not any(received.complete for received in upstream.requests)


# --- the lingering close after a refusal ---------------------------------------------------------

MiB: Final = 1024 * 1024
# Written after a refused head before the client reads, like a client uploading a file: far
# more than the proxy reads with the head and than both ends' socket buffers hold on loopback,
# so the proxy's close finds bytes unread; well below server.LINGER_MAX_BYTES.
SENT_BEFORE_READING: Final = 8 * MiB
BODY_PIECE: Final = b"b" * (64 * 1024)

REFUSED_UPLOADS: Final = [
    ("content-length-above-max-body",
     req("POST /upload HTTP/1.1", HOST, f"Content-Length: {50 * MiB}"), 413),
    ("bad-chunk-mid-body",
     req("POST /upload HTTP/1.1", HOST, "Transfer-Encoding: chunked", body=b"zz\r\n"), 400),
    ("bad-head-followed-by-a-body",
     req("POST /upload HTTP/1.1", HOST, f"Content-Length: {50 * MiB}",
         "Transfer-Encoding: chunked"), 400),
]  # fmt: skip


async def upload_then_read(client: Client, head: bytes) -> tuple[bytes, bool] | None:
    """Send `head` and SENT_BEFORE_READING body bytes, and only then read: what came until
    the proxy closed and whether it closed cleanly, or None when the upload was reset."""
    try:
        await client.send(head)
        for _ in range(SENT_BEFORE_READING // len(BODY_PIECE)):  # bounded
            await client.send(BODY_PIECE)
    except trio.BrokenResourceError:
        return None
    return await client.read_until_closed()


@pytest.mark.parametrize("scheme", ["https", "http"])
async def test_an_upstream_answer_before_the_whole_body_reaches_the_client(
    key: KeyFiles,
    cafile: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    scheme: str,
) -> None:
    """The upstream answers 413 once it has the head and goes, the body unread (a reset):
    the client gets that answer, not a 502, and the broken connection is not pooled."""
    caplog.set_level(logging.INFO, logger="dualproxy")
    server = UpstreamServer.https(tmp_path) if scheme == "https" else UpstreamServer.http()
    server.behaviour = in_turn(Behaviour.ANSWER_BEFORE_BODY, Behaviour.ECHO)
    more_than_sent = 2 * SENT_BEFORE_READING  # the body never ends: only the upstream can
    async with (
        serve_upstream(server),
        proxy(key, cafile, tmp_path, server, max_body_bytes=more_than_sent) as p,
    ):
        async with p.client() as client:
            head = req("PUT /big HTTP/1.1", HOST, f"Content-Length: {more_than_sent}")
            result = await upload_then_read(client, head)
        async with p.client() as client:
            assert (await client.request()).status == 200
        await wait_until(lambda: len(conn_lines(caplog)) == 2)
    assert result is not None, "the upload was reset"
    answer, clean = result
    [reply] = parse_responses(answer)
    assert (reply.status, reply.body) == (413, EARLY_ANSWER.rpartition(b"\r\n\r\n")[2])
    assert reply.header(b"connection") == [b"close"]
    assert clean  # close_notify, then the end of the stream, though the body was unread
    assert server.accepted == 2  # the second request did not get the broken connection
    first, _ = (m for m in messages(caplog) if m.startswith("conn "))
    assert 'detail="upstream answered before taking the whole request body"' in first


@pytest.mark.parametrize(
    ("head", "status"),
    [pytest.param(head, status, id=name) for name, head, status in REFUSED_UPLOADS],
)
async def test_a_client_still_uploading_when_refused_gets_the_whole_refusal(
    key: KeyFiles,
    cafile: Path,
    tmp_path: Path,
    upstream: UpstreamServer,
    caplog: pytest.LogCaptureFixture,
    head: bytes,
    status: int,
) -> None:
    caplog.set_level(logging.INFO, logger="dualproxy")
    async with proxy(key, cafile, tmp_path, upstream) as p:
        async with p.client() as client:
            result = await upload_then_read(client, head)
        await wait_until(lambda: bool(conn_lines(caplog)))
    assert result is not None, "the upload was reset"
    answer, clean = result
    [refusal] = parse_responses(answer)
    assert refusal.status == status
    assert refusal.header(b"connection") == [b"close"]
    assert clean  # close_notify, then the end of the stream: no reset
    assert upstream.received == b""
    [line] = conn_lines(caplog)
    assert line["detail"] == f'"{status}'  # the record still says why it ended


@pytest.mark.parametrize(
    ("head", "status"),
    [pytest.param(head, status, id=name) for name, head, status in REFUSED_UPLOADS],
)
async def test_without_the_lingering_close_the_same_upload_is_reset(
    key: KeyFiles,
    cafile: Path,
    tmp_path: Path,
    upstream: UpstreamServer,
    monkeypatch: pytest.MonkeyPatch,
    head: bytes,
    status: int,
) -> None:
    """The negative twin: what the test above shows is the lingering close's doing."""
    monkeypatch.setattr(closing, "LINGER_TIME", 0)
    async with proxy(key, cafile, tmp_path, upstream) as p, p.client() as client:
        result = await upload_then_read(client, head)
    if result is not None:  # the upload went through; then the answer was cut
        answer, clean = result
        assert not clean
        assert f" {status} ".encode() not in answer


async def test_only_a_refusal_with_the_request_unread_lingers(
    key: KeyFiles,
    cafile: Path,
    tmp_path: Path,
    upstream: UpstreamServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A cleanly finished exchange, or a refusal after the whole request was read, closes at
    once; only a request left unread costs a lingering close."""
    lingered: list[bool] = []
    real = closing.lingering_close

    async def spy(tls: TlsStream, stream: TcpStream) -> None:
        lingered.append(True)
        await real(tls, stream)

    monkeypatch.setattr(server_module, "lingering_close", spy)
    async with proxy(key, cafile, tmp_path, upstream, max_body_bytes=1000) as p:
        async with p.client() as client:
            reply = await client.request("POST", body=b"x" * 10, headers=[("connection", "close")])
            assert reply.status == 200
            # The proxy chose how to close before the client sees the end.
            await client.read_until_closed()
        assert lingered == []
        async with p.client() as client:
            await client.send(req("POST / HTTP/1.1", HOST, "Content-Length: 5", body=b"hello"))
            await client.send(req("POST / HTTP/1.1", HOST, "Content-Length: 1001"))
            answer, _ = await client.read_until_closed()
        assert [r.status for r in parse_responses(answer)] == [200, 413]
        assert lingered == [True]
    with closed_port() as port:
        table = upstream_table(upstream, url=f"https://localhost:{port}")
        async with proxy(key, cafile, tmp_path, table) as p, p.client() as client:
            await client.send(GOOD_REQUEST)  # no body: read whole with its head
            answer, _ = await client.read_until_closed()
    assert [r.status for r in parse_responses(answer)] == [502]
    assert lingered == [True]


# --- graceful shutdown ---------------------------------------------------------------------------


async def test_drain_finishes_requests_in_flight_and_closes_idle_connections(
    key: KeyFiles,
    cafile: Path,
    tmp_path: Path,
    upstream: UpstreamServer,
    mock_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dualproxy")
    upstream.behaviour = in_turn(Behaviour.ECHO, Behaviour.HANG_BEFORE_HEAD)
    upstream.hang = SHORT / 2  # the slow request, well within the grace period
    limits = {"shutdown_grace": SHORT * 2, "upstream_timeout": SHORT}
    async with proxy(key, cafile, tmp_path, upstream, **limits) as p:
        async with p.client() as idle, p.client() as busy:
            assert (await idle.request()).status == 200
            await busy.send(GOOD_REQUEST)
            await wait_until(lambda: len(upstream.requests) == 2)  # the slow one is upstream
            p.server.drain()
            # The idle connection is closed at once, cleanly...
            assert await idle.read_until_closed() == (b"", True)
            # ...the busy one gets its answer, saying the connection closes, then the close.
            answer, clean = await busy.read_until_closed()
        # New connections are refused: the listener is closed.
        with (
            trio.socket.socket() as sock,
            trio.fail_after(CLIENT_TIMEOUT),
            pytest.raises(ConnectionRefusedError),
        ):
            await sock.connect(("127.0.0.1", p.port))
        await wait_until(lambda: "drained: every connection finished" in messages(caplog))
    [response] = parse_responses(answer)
    assert response.status == 200
    assert response.header(b"connection") == [b"close"]
    assert clean
    assert any(m.startswith("draining: stopped accepting") for m in messages(caplog))


async def test_a_request_that_arrives_as_the_drain_starts_is_served(
    key: KeyFiles,
    cafile: Path,
    tmp_path: Path,
    upstream: UpstreamServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The race the drain must not lose a request to: the idle wait had already returned the
    request when the drain cancelled it."""
    real_receive = TlsStream.receive_some
    drain_on_next_receive: list[Server] = []

    async def receive_then_drain(self: TlsStream, max_bytes: int | None = None) -> bytes:
        data = await real_receive(self, max_bytes)
        if drain_on_next_receive and data:
            drain_on_next_receive.pop().drain()  # no checkpoint between the two
        return data

    monkeypatch.setattr(TlsStream, "receive_some", receive_then_drain)
    async with proxy(key, cafile, tmp_path, upstream) as p, p.client() as client:
        assert (await client.request("GET", "/first")).status == 200
        drain_on_next_receive.append(p.server)
        await client.send(req("GET /second HTTP/1.1", HOST))
        answer, clean = await client.read_until_closed()
    [response] = parse_responses(answer)
    assert response.status == 200
    assert response.header(b"connection") == [b"close"]
    assert clean
    assert [r.target for r in upstream.requests] == [b"/first", b"/second"]


class Waiting:
    """Stands in for a ClientConnection waiting for a response head: notes client_left()."""

    def __init__(self) -> None:
        self.left = False

    def client_left(self) -> None:
        self.left = True


def test_departures_end_only_the_waits_of_clients_that_left() -> None:
    """A client that sends more (a pipelined request) is still there; one that closed or
    half-closed is gone. Checked with socket pairs, no server."""
    pairs = [socket.socketpair() for _ in range(4)]
    quiet, pipelining, closed, half_closed = relays = [Waiting() for _ in pairs]
    departures = Departures()
    try:
        for (ours, _), relay in zip(pairs, relays, strict=True):
            departures.waiting[ours.fileno()] = relay
        pairs[1][1].sendall(b"GET /next HTTP/1.1\r\n")
        pairs[2][1].close()
        pairs[3][1].shutdown(socket.SHUT_WR)
        assert departures.check() == 2
        assert (quiet.left, pipelining.left) == (False, False)
        assert (closed.left, half_closed.left) == (True, True)
        assert set(departures.waiting) == {pairs[0][0].fileno(), pairs[1][0].fileno()}
        assert departures.check() == 0  # nobody else left
    finally:
        for pair in pairs:
            for end in pair:
                end.close()


def closed_by_the_proxy(accepted: Accepted) -> bool:
    """Whether the proxy closed its end of this upstream connection (the upstream's socket
    reads an end of stream: poll(2)'s POLLRDHUP), without reading from it."""
    stream = accepted.stream
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    assert isinstance(stream, trio.SocketStream)
    poller = select.poll()
    poller.register(stream.socket.fileno(), select.POLLRDHUP)
    return bool(poller.poll(0))


@pytest.mark.parametrize("how", ["close", "reset", "half-close"])
async def test_a_client_gone_while_the_upstream_works_closes_the_upstream_connection(
    key: KeyFiles,
    cafile: Path,
    tmp_path: Path,
    upstream: UpstreamServer,
    caplog: pytest.LogCaptureFixture,
    how: str,
) -> None:
    """Like nginx's 499: the exchange ends within DEPARTURE_CHECK_SECONDS of the client's
    close, and its upstream connection is closed, not when the upstream answers (in 80 s,
    within the 85 s upstream_timeout). On the real clock: a second per case."""
    caplog.set_level(logging.INFO, logger="dualproxy")
    upstream.behaviour = Behaviour.HANG_BEFORE_HEAD
    async with proxy(key, cafile, tmp_path, upstream, upstream_timeout=upstream.hang + 5) as p:
        async with p.client() as client:
            await client.send(GOOD_REQUEST)
            await wait_until(lambda: len(upstream.requests) == 1)
            sock = client.tls.transport_stream.socket
            if how == "reset":  # SO_LINGER 0: the close sends a reset
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            if how == "half-close":  # still reading, no longer sending
                sock.shutdown(socket.SHUT_WR)
            else:
                sock.close()
            await wait_until(lambda: bool(conn_lines(caplog)))
        [accepted] = upstream.connections
        assert closed_by_the_proxy(accepted)
        assert accepted.sent == 0  # the upstream had not answered
    [line] = conn_lines(caplog)
    assert int(line["ms"]) <= (DEPARTURE_CHECK_SECONDS + 1) * 1000
    [text] = (m for m in messages(caplog) if m.startswith("conn "))
    assert 'detail="client closed while waiting for the upstream\'s response"' in text


async def test_drain_cancels_what_is_still_busy_after_the_grace_period(
    key: KeyFiles,
    cafile: Path,
    tmp_path: Path,
    upstream: UpstreamServer,
    mock_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dualproxy")
    upstream.behaviour = Behaviour.HANG_BEFORE_HEAD  # 80 s, past everything below
    limits = {"shutdown_grace": SHORT, "upstream_timeout": SHORT * 3}
    async with proxy(key, cafile, tmp_path, upstream, **limits) as p:
        async with p.client() as busy:
            await busy.send(GOOD_REQUEST)
            await wait_until(lambda: len(upstream.requests) == 1)
            p.server.drain()
            answer, _ = await busy.read_until_closed()
        cancelled = "drained: cancelled the connections still busy after the grace"
        await wait_until(lambda: cancelled in messages(caplog))
    assert answer == b""  # cancelled: no response at all, rather than a false one
    assert [x["outcome"] for x in conn_lines(caplog)] == ["shutdown"]


async def test_a_connection_that_arrives_during_the_drain_is_closed_before_its_request(
    key: KeyFiles,
    cafile: Path,
    tmp_path: Path,
    upstream: UpstreamServer,
    mock_clock: trio.testing.MockClock,
) -> None:
    upstream.behaviour = in_turn(Behaviour.HANG_BEFORE_HEAD, Behaviour.ECHO)
    upstream.hang = SHORT / 2
    limits = {"shutdown_grace": SHORT * 2, "upstream_timeout": SHORT}
    async with proxy(key, cafile, tmp_path, upstream, **limits) as p, p.client() as busy:
        await busy.send(GOOD_REQUEST)  # keeps the server draining for a while
        await wait_until(lambda: len(upstream.requests) == 1)
        # Handshaken just before the listener closes; its request comes after.
        async with p.client() as late:
            p.server.drain()
            await trio.testing.wait_all_tasks_blocked()
            with contextlib.suppress(trio.BrokenResourceError):
                await late.send(GOOD_REQUEST)
            assert await late.read_until_closed() == (b"", True)
        answer, _ = await busy.read_until_closed()
    assert [r.status for r in parse_responses(answer)] == [200]
    assert len(upstream.requests) == 1


async def test_sigterm_drains_and_a_second_sigterm_stops_at_once(
    key: KeyFiles,
    cafile: Path,
    tmp_path: Path,
    upstream: UpstreamServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The signal path itself: SIGTERM drains (the idle client is closed, the busy one is
    given the grace), a second SIGTERM cancels what is left, and run() returns."""
    caplog.set_level(logging.INFO, logger="dualproxy")
    upstream.behaviour = in_turn(Behaviour.ECHO, Behaviour.HANG_BEFORE_HEAD)
    extra = {"upstream": upstream.config_table(), "limits": {"shutdown_grace": 3600}}
    server = Server(make_config([key], base_dir=tmp_path, extra=extra))
    async with trio.open_nursery() as nursery:
        [(_, port)] = await nursery.start(server.run)
        p = Proxy(server, port, cafile)
        async with p.client() as idle, p.client() as busy:
            assert (await idle.request()).status == 200
            await busy.send(GOOD_REQUEST)
            await wait_until(lambda: len(upstream.requests) == 2)
            signal.raise_signal(signal.SIGTERM)
            assert await idle.read_until_closed() == (b"", True)
            # The hung request would have an hour; the second signal ends it now.
            signal.raise_signal(signal.SIGTERM)
            answer, _ = await busy.read_until_closed()
    assert answer == b""
    assert "SIGTERM: stopping, after the requests in flight" in messages(caplog)
    assert "SIGTERM again: stopping now" in messages(caplog)
    assert "drained: cancelled the connections still busy after the grace" in messages(caplog)


# --- parking: idle keep-alive connections without a task ----------------------------------------


def connection_tasks() -> int:
    """The server's tasks that hold a client connection (a new one's, or a resumed one's)."""
    names = {"_connection_task", "_resume_connection"}
    root = trio.lowlevel.current_root_task()
    assert root is not None
    tasks, count = [root], 0
    while tasks:  # bounded: the task tree
        task = tasks.pop()
        code = getattr(task.coro, "cr_code", None)
        count += code is not None and code.co_name in names
        tasks += [child for nursery in task.child_nurseries for child in nursery.child_tasks]
    return count


async def idle_until_parked(p: Proxy, count: int = 1) -> None:
    """Idle (the mock clock jumps) until `count` connections are parked."""
    with trio.fail_after(PARK_AFTER + PARK_SWEEP * 2):
        while p.server.parked_connections < count:
            await trio.sleep(PARK_SWEEP / 4)


async def test_an_idle_connection_parks_without_a_task_and_is_served_on_when_it_returns(
    key: KeyFiles,
    cafile: Path,
    tmp_path: Path,
    upstream: UpstreamServer,
    mock_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dualproxy")
    async with proxy(key, cafile, tmp_path, upstream, keepalive_timeout=SHORT * 4) as p:
        async with p.client() as client:
            assert (await client.request("GET", "/first")).status == 200
            assert connection_tasks() == 1
            await idle_until_parked(p)
            assert connection_tasks() == 0  # nothing but its objects holds it now
            second = await client.request("GET", "/second")
            assert p.server.parked_connections == 0
            await idle_until_parked(p)  # and again: a connection parks as often as it idles
            third = await client.request("POST", "/third", body=b"x" * 1000)
        line = await the_conn_line(caplog)
    assert (second.status, second.echo()["target"]) == (200, "/second")
    assert third.echo()["body_sha256"] == hashlib.sha256(b"x" * 1000).hexdigest()
    # One connection (one handshake, one conn line) served the three; the upstream connection
    # was reused from the pool.
    assert line == ("ok", "3")
    assert upstream.accepted == 1


async def test_among_many_idle_connections_a_kept_alive_one_parks_as_soon_as_it_waits(
    key: KeyFiles,
    cafile: Path,
    tmp_path: Path,
    upstream: UpstreamServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """From PARK_AT_ONCE idle connections on (here 1: the other client's), no wait for the
    sweep: PARK_AFTER is an hour here, so only parking at once can park."""
    caplog.set_level(logging.INFO, logger="dualproxy")
    monkeypatch.setattr(parking, "PARK_AT_ONCE", 1)
    monkeypatch.setattr(parking, "PARK_AFTER", 3600)
    async with proxy(key, cafile, tmp_path, upstream) as p, p.client() as other:
        assert (await other.request()).status == 200  # none idle yet: it keeps its task
        async with p.client() as client:
            assert (await client.request()).status == 200  # one idle: it parks at once
            await wait_until(lambda: p.server.parked_connections == 1)
            assert connection_tasks() == 1  # the other's
            for number in range(3):  # parks after each request, and is served on each time
                reply = await client.request("GET", f"/again/{number}")
                assert reply.echo()["target"] == f"/again/{number}"
                await wait_until(lambda: p.server.parked_connections == 1)
        line = await the_conn_line(caplog)
    assert line == ("ok", "4")


async def test_a_parked_connection_closes_at_its_keepalive_timeout_as_an_idle_one_does(
    key: KeyFiles,
    cafile: Path,
    tmp_path: Path,
    upstream: UpstreamServer,
    mock_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Parked, the keep-alive wait keeps its deadline: counted from the last response, neither
    cut short nor pushed back by parking (or by a wake-up that brought no request)."""
    caplog.set_level(logging.INFO, logger="dualproxy")
    async with (
        proxy(key, cafile, tmp_path, upstream, keepalive_timeout=SHORT) as p,
        p.client() as client,
    ):
        assert (await client.request()).status == 200
        idle_from = trio.current_time()
        await idle_until_parked(p)
        await trio.sleep(SHORT * 0.8 - (trio.current_time() - idle_from))
        assert (await client.request()).status == 200  # still open, served
        idle_from = trio.current_time()
        await idle_until_parked(p)
        with trio.fail_after(SHORT + DEADLINE_SLACK - (trio.current_time() - idle_from)):
            answer, clean = await client.read_until_closed()
    assert (answer, clean) == (b"", True)  # quietly, with a close_notify
    assert await the_conn_line(caplog) == ("ok", "2")


async def test_a_client_that_closes_while_parked_is_logged_once_and_gives_back_its_slot(
    key: KeyFiles,
    cafile: Path,
    tmp_path: Path,
    upstream: UpstreamServer,
    mock_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dualproxy")
    async with proxy(key, cafile, tmp_path, upstream, keepalive_timeout=SHORT * 4) as p:
        async with p.client() as client:
            assert (await client.request()).status == 200
            await idle_until_parked(p)
        await wait_until(lambda: p.server.active_connections == 0)
        line = await the_conn_line(caplog)
    assert p.server.parked_connections == 0
    assert line == ("ok", "1")


async def test_the_drain_closes_parked_connections_at_once(
    key: KeyFiles,
    cafile: Path,
    tmp_path: Path,
    upstream: UpstreamServer,
    mock_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dualproxy")
    limits = {"keepalive_timeout": SHORT * 4, "shutdown_grace": SHORT * 8}
    async with proxy(key, cafile, tmp_path, upstream, **limits) as p:
        async with p.client() as first, p.client() as second:
            for client in (first, second):
                assert (await client.request()).status == 200
            await idle_until_parked(p, 2)
            drained_at = trio.current_time()
            p.server.drain()
            for client in (first, second):
                assert await client.read_until_closed() == (b"", True)
            assert trio.current_time() - drained_at < SHORT  # at once, not after the grace
        await wait_until(lambda: "drained: every connection finished" in messages(caplog))
    assert [x["outcome"] for x in conn_lines(caplog)] == ["ok", "ok"]


async def test_parked_connections_of_a_cancelled_server_are_closed_and_logged_as_shutdown(
    key: KeyFiles,
    cafile: Path,
    tmp_path: Path,
    upstream: UpstreamServer,
    mock_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A server cancelled outright (its run's nursery, as the end of the grace does) cancels
    every connection task: parked connections, which have none, are closed and logged all
    the same."""
    caplog.set_level(logging.INFO, logger="dualproxy")
    async with contextlib.AsyncExitStack() as stack:
        async with proxy(key, cafile, tmp_path, upstream, keepalive_timeout=SHORT * 4) as p:
            client = await stack.enter_async_context(p.client())
            assert (await client.request()).status == 200
            await idle_until_parked(p)
        # The server is gone; its client is still connected.
        assert await client.read_until_closed() == (b"", False)  # closed, no close_notify
        line = await the_conn_line(caplog)
    assert line == ("shutdown", "1")
    assert p.server.parked_connections == 0


# --- reloads -------------------------------------------------------------------------------------


async def test_a_reload_that_changes_the_upstream_moves_new_requests_and_closes_the_old_pool(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    (tmp_path / "other").mkdir()
    async with serve_upstream(UpstreamServer.https(tmp_path / "other")) as other:
        path = tmp_path / "config.toml"
        config = write_config(path, [key], extra={"upstream": upstream.config_table()})
        async with serving(config) as run:
            p = Proxy(run.server, run.port, cafile)
            async with p.client() as client:
                assert (await client.request()).status == 200
                write_config(path, [key], extra={"upstream": other.config_table()})
                assert await run.server.reload("test")
                # The old pool's idle connection is closed; this connection's next request
                # goes to the new upstream.
                await upstream.connections[0].wait_done()
                assert (await client.request()).status == 200
    assert (upstream.accepted, len(upstream.requests)) == (1, 1)
    assert (other.accepted, len(other.requests)) == (1, 1)


async def test_a_reload_that_changes_the_response_header_count_limit_applies_it(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(20))
    upstream.behaviour = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n" + fields + b"\r\n"
    path = tmp_path / "config.toml"
    config = write_config(path, [key], extra={"upstream": upstream.config_table()})
    async with serving(config) as run:
        p = Proxy(run.server, run.port, cafile)
        async with p.client() as client:
            assert (await client.request()).status == 200  # 21 fields: the default allows 100
        limits = {"max_response_header_count": 10}
        write_config(path, [key], extra={"upstream": upstream.config_table(), "limits": limits})
        assert await run.server.reload("test")
        async with p.client() as client:
            assert (await client.request()).status == 502


async def test_a_quiet_server_closes_upstream_connections_that_idled_too_long(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    # The pool prunes itself only when used; with no further request, the server's pruning
    # task must close the idle connection before the upstream's own idle cut-off would.
    table = upstream_table(upstream, pool_idle_timeout=0.2)
    config = make_config([key], base_dir=tmp_path, extra={"upstream": table})
    async with serving(config) as run:
        async with Proxy(run.server, run.port, cafile).client() as client:
            assert (await client.request()).status == 200
        relay = run.server.material.relay
        assert relay is not None
        with trio.fail_after(CLIENT_TIMEOUT):
            await upstream.connections[0].wait_done()
        assert relay.pool.idle_count == 0
    assert upstream.accepted == 1


async def test_an_upstream_section_that_cannot_be_served_stops_the_server_before_it_listens(
    key: KeyFiles, tmp_path: Path, upstream: UpstreamServer
) -> None:
    not_pem = tmp_path / "not-a-ca.pem"  # exists, so the config loads; the pool cannot use it
    not_pem.write_text("not a certificate\n")
    config = make_config([key], base_dir=tmp_path, extra={"upstream": upstream_table(upstream)})
    bad = make_config(
        [key], base_dir=tmp_path, extra={"upstream": upstream_table(upstream, ca_file=str(not_pem))}
    )
    Server(config)
    with pytest.raises(OperatorError, match=r"upstream\.ca_file: cannot load .*not-a-ca\.pem"):
        Server(bad)


async def test_a_reload_with_an_upstream_that_cannot_be_served_keeps_the_previous_one(
    key: KeyFiles,
    cafile: Path,
    tmp_path: Path,
    upstream: UpstreamServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    not_pem = tmp_path / "not-a-ca.pem"
    not_pem.write_text("not a certificate\n")
    path = tmp_path / "config.toml"
    config = write_config(path, [key], extra={"upstream": upstream.config_table()})
    async with serving(config) as run:
        bad = upstream_table(upstream, ca_file=str(not_pem), url="https://upstream.test:1")
        write_config(path, [key], extra={"upstream": bad})
        assert not await run.server.reload("test")
        async with Proxy(run.server, run.port, cafile).client() as client:
            assert (await client.request()).status == 200
    assert any("reload (test) failed" in m and "upstream.ca_file" in m for m in messages(caplog))
    assert len(upstream.requests) == 1


async def test_a_reload_that_removes_the_upstream_answers_503_then_the_placeholder_serves(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    path = tmp_path / "config.toml"
    config = write_config(path, [key], extra={"upstream": upstream.config_table()})
    async with serving(config) as run:
        p = Proxy(run.server, run.port, cafile)
        async with p.client() as client:
            assert (await client.request()).status == 200
            await trio.testing.wait_all_tasks_blocked()  # waiting for the next request
            write_config(path, [key])
            assert await run.server.reload("test")
            await client.send(GOOD_REQUEST)
            answer, _ = await client.read_until_closed()
        async with p.client() as client:
            placeholder = await client.request()
    assert [r.status for r in parse_responses(answer)] == [503]
    assert placeholder.status == 200
    assert placeholder.body.startswith(b"dualproxy: TLS terminated")
    assert len(upstream.requests) == 1
