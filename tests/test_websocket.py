"""WebSocket over HTTP/1.1 end to end: a wsproto client through the proxy to a wsproto echo
upstream on loopback, the close handshake, the idle timeout; and the upgrades the proxy
refuses, which leave the upstream untouched.
"""

from __future__ import annotations

import functools
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pytest
import trio
import trio.testing
import trustme
from helpers.clients import CLIENT_TIMEOUT
from helpers.configs import make_config
from helpers.keys import KeyFiles, make_key
from helpers.logs import parse_access_line
from helpers.serving import Running, serving
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import RemoteProtocolError

SNI: Final = "api.example.com"


@dataclass
class EchoUpstream:
    """A plain-HTTP WebSocket server that echoes every message (wsproto, server side);
    `received` keeps every byte it got, `reject` answers handshakes with 403 instead."""

    port: int = 0
    received: bytearray = field(default_factory=bytearray)
    handshakes: list[Request] = field(default_factory=list)
    reject: bool = False
    closed_cleanly: int = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        ws = WSConnection(ConnectionType.SERVER)
        try:
            while True:
                data = await stream.receive_some(65536)
                self.received += data
                ws.receive_data(data or None)
                for event in ws.events():
                    out = self._answer(ws, event)
                    if out:
                        await stream.send_all(out)
                    if isinstance(event, CloseConnection):
                        self.closed_cleanly += 1
                        return
                if not data:
                    return
        except (trio.BrokenResourceError, RemoteProtocolError):
            return  # gone, or not a WebSocket handshake: what came is in `received`
        finally:
            await trio.aclose_forcefully(stream)

    def _answer(self, ws: WSConnection, event: Event) -> bytes:
        if isinstance(event, Request):
            self.handshakes.append(event)
            if self.reject:
                return ws.send(RejectConnection(status_code=403, has_body=False))
            return ws.send(AcceptConnection())
        if isinstance(event, TextMessage | BytesMessage):
            return ws.send(event)  # bounded by the client: each message echoed once
        if isinstance(event, CloseConnection) and ws.state is ConnectionState.REMOTE_CLOSING:
            return ws.send(event.response())  # not to a connection that just went (1006)
        return b""


@asynccontextmanager
async def echo_upstream() -> AsyncIterator[EchoUpstream]:
    upstream = EchoUpstream()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, upstream.handle, 0, host="127.0.0.1")
        )
        upstream.port = listeners[0].socket.getsockname()[1]
        yield upstream
        nursery.cancel_scope.cancel()


@pytest.fixture
def mock_clock() -> trio.testing.MockClock:
    """Timeouts without waiting: the clock jumps to the next deadline once every task has
    been blocked this long in real time (in-loop clients and upstream only)."""
    return trio.testing.MockClock(autojump_threshold=0.05)


@pytest.fixture
def key(ca: trustme.CA, tmp_path: Path) -> KeyFiles:
    return make_key(ca, tmp_path, "k1")


@asynccontextmanager
async def proxied(
    key: KeyFiles, tmp_path: Path, **limits: float
) -> AsyncIterator[tuple[Running, EchoUpstream]]:
    async with echo_upstream() as upstream:
        extra: dict[str, Any] = {
            "upstream": {"url": f"http://127.0.0.1:{upstream.port}"},
            "log": {"access": str(tmp_path / "access.log")},
        }
        if limits:
            extra["limits"] = limits
        async with serving(make_config([key], base_dir=tmp_path, extra=extra)) as run:
            yield run, upstream


class Client:
    """A WebSocket client over TLS to the proxy (wsproto, client side)."""

    def __init__(self, tls: trio.SSLStream[trio.SocketStream]) -> None:
        self.tls = tls
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.closed = False

    async def send(self, event: Event) -> None:
        with trio.fail_after(CLIENT_TIMEOUT):
            await self.tls.send_all(self.ws.send(event))

    async def next_events(self) -> list[Event]:
        with trio.fail_after(CLIENT_TIMEOUT):
            while True:
                try:
                    data = await self.tls.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""
                if not data:
                    self.closed = True
                self.ws.receive_data(bytes(data) or None)
                events = list(self.ws.events())
                if events or self.closed:
                    return events

    async def handshake(self, *, extra: list[tuple[bytes, bytes]] | None = None) -> Event:
        await self.send(Request(host=SNI, target="/chat", extra_headers=extra or []))
        [event, *_] = await self.next_events()
        return event


@asynccontextmanager
async def client(port: int, cafile: Path) -> AsyncIterator[Client]:
    with trio.fail_after(CLIENT_TIMEOUT):
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        await sock.connect(("127.0.0.1", port))
        context = ssl.create_default_context(cafile=str(cafile))
        context.set_alpn_protocols(["http/1.1"])
        tls = trio.SSLStream(trio.SocketStream(sock), context, server_hostname=SNI)
        await tls.do_handshake()
    try:
        yield Client(tls)
    finally:
        await trio.aclose_forcefully(tls)


async def test_messages_echo_through_and_the_close_handshake_passes(
    key: KeyFiles, cafile: Path, tmp_path: Path
) -> None:
    async with proxied(key, tmp_path) as (run, upstream), client(run.port, cafile) as ws:
        assert isinstance(await ws.handshake(), AcceptConnection)
        await ws.send(TextMessage(data="hello"))
        [echo] = await ws.next_events()
        assert isinstance(echo, TextMessage)
        assert echo.data == "hello"
        big = bytes(range(256)) * 4096  # 1 MiB, many receives each way
        await ws.send(BytesMessage(data=big))
        got = bytearray()
        while len(got) < len(big):  # bounded: the echo of one message, then the timeout
            for event in await ws.next_events():
                assert isinstance(event, BytesMessage)
                got += event.data
        assert bytes(got) == big
        await ws.send(CloseConnection(code=1000, reason="bye"))
        events = await ws.next_events()
        assert any(isinstance(e, CloseConnection) and e.code == 1000 for e in events)
        while not ws.closed:  # the upstream closes, so do we
            await ws.next_events()
    [request] = upstream.handshakes
    assert request.target == "/chat"
    assert upstream.closed_cleanly == 1
    # One access line: the handshake's status and the bytes each way.
    [line] = [
        parse_access_line(line) for line in (tmp_path / "access.log").read_text().splitlines()
    ]
    assert (line["method"], line["path"], line["status"]) == ("GET", "/chat", "101")
    assert int(line["in"]) > len(big)
    assert int(line["out"]) > len(big)
    assert line["ended"] in ("websocket closed by the upstream", "websocket closed by the client")


async def test_an_idle_websocket_is_closed(
    key: KeyFiles, cafile: Path, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    async with (
        proxied(key, tmp_path, websocket_idle_timeout=5) as (run, _),
        client(run.port, cafile) as ws,
    ):
        assert isinstance(await ws.handshake(), AcceptConnection)
        await ws.send(TextMessage(data="once"))
        await ws.next_events()
        while not ws.closed:  # bounded: the proxy's idle timeout, on the mock clock
            await ws.next_events()
    [line] = [
        parse_access_line(line) for line in (tmp_path / "access.log").read_text().splitlines()
    ]
    assert (line["status"], line["ended"]) == ("101", "websocket idle for 5 s")


async def test_an_upstream_that_declines_the_upgrade_is_relayed_as_a_response(
    key: KeyFiles, cafile: Path, tmp_path: Path
) -> None:
    async with proxied(key, tmp_path) as (run, upstream), client(run.port, cafile) as ws:
        upstream.reject = True
        event = await ws.handshake()
    assert isinstance(event, RejectConnection)
    assert event.status_code == 403


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n", b"501"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: foo/1\r\n\r\n", b"501"),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
            b"Content-Length: 0\r\n\r\n",
            b"400",
        ),
        (
            b"GET / HTTP/1.0\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            b"400",
        ),
    ],
    ids=["h2c", "other", "post", "http10"],
)
async def test_other_upgrades_are_refused_and_nothing_goes_upstream(
    key: KeyFiles, cafile: Path, tmp_path: Path, request_bytes: bytes, status: bytes
) -> None:
    async with proxied(key, tmp_path) as (run, upstream), client(run.port, cafile) as ws:
        await ws.tls.send_all(request_bytes)
        answer = bytearray()
        with trio.fail_after(CLIENT_TIMEOUT):
            while b"\r\n\r\n" not in answer:
                answer += await ws.tls.receive_some(65536)
    assert answer.startswith(b"HTTP/1.1 " + status), bytes(answer)
    assert upstream.received == b""


async def test_an_upgrade_header_without_connection_upgrade_is_a_plain_request(
    key: KeyFiles, cafile: Path, tmp_path: Path
) -> None:
    """Upgrade alone asks nothing (RFC 9110 §7.8: Connection must list it): it is
    hop-by-hop and dropped, and the request relayed as it is."""
    async with proxied(key, tmp_path) as (run, upstream), client(run.port, cafile) as ws:
        await ws.tls.send_all(b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n")
        with trio.fail_after(CLIENT_TIMEOUT):
            while b"\r\n\r\n" not in upstream.received:
                await trio.sleep(0.01)
    assert b"upgrade" not in bytes(upstream.received).lower()
