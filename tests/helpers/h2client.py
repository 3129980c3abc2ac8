"""An in-loop HTTP/2 client of the proxy, driven raw with python-hyper's h2: well-behaved
requests, and the hostile frames the abuse tests send (h2's client side, or bytes built with
hyperframe where h2 would refuse to send them).

    async with h2_client(port, cafile) as client:
        reply = await client.request("GET", "/items")
        assert reply.status == 200
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import trio

from helpers.clients import CLIENT_TIMEOUT

SNI: Final = "api.example.com"
FRAME_HEADER: Final = 9  # bytes before every frame's payload (RFC 9113 §4.1)


@dataclass
class H2Reply:
    """One stream's outcome as the client saw it."""

    stream_id: int
    status: int | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    ended: bool = False
    reset: int | None = None  # the RST_STREAM error code, when the server reset it
    informational: list[int] = field(default_factory=list)

    def header(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n == name]

    @property
    def done(self) -> bool:
        return self.ended or self.reset is not None


class H2Client:
    """An HTTP/2 connection to the proxy (see the module docstring)."""

    def __init__(self, tls: trio.SSLStream[trio.SocketStream], *, validate: bool = True) -> None:
        self.tls = tls
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=validate,
            normalize_outbound_headers=validate,
        )
        self.conn = h2.connection.H2Connection(config=config)
        self.replies: dict[int, H2Reply] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.closed = False
        self.pings_acked = 0
        self._buffer = b""

    async def start(self) -> None:
        self.conn.initiate_connection()
        await self.flush()

    async def flush(self) -> None:
        """Send what h2 queued; a server that closed the connection leaves `closed` set."""
        data = self.conn.data_to_send()
        if data and not self.closed:
            try:
                with trio.fail_after(CLIENT_TIMEOUT):
                    await self.tls.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.closed = True

    async def send_raw(self, data: bytes) -> None:
        """Bytes as they are, after what h2 has queued."""
        await self.flush()
        try:
            with trio.fail_after(CLIENT_TIMEOUT):
                await self.tls.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.closed = True

    def start_request(
        self,
        method: str = "GET",
        path: str = "/",
        *,
        headers: Sequence[tuple[str | bytes, str | bytes]] = (),
        end: bool = True,
        authority: str = SNI,
        pseudo: Sequence[tuple[str | bytes, str | bytes]] | None = None,
    ) -> int:
        """Queue a request's HEADERS; its stream ID."""
        stream_id = self.conn.get_next_available_stream_id()
        fields = (
            list(pseudo)
            if pseudo is not None
            else [
                (":method", method),
                (":scheme", "https"),
                (":authority", authority),
                (":path", path),
            ]
        )
        fields += list(headers)
        encoded = [(_b(n), _b(v)) for n, v in fields]
        self.conn.send_headers(stream_id, encoded, end_stream=end)
        self.replies[stream_id] = H2Reply(stream_id)
        return stream_id

    async def request(
        self,
        method: str = "GET",
        path: str = "/",
        *,
        headers: Sequence[tuple[str | bytes, str | bytes]] = (),
        body: bytes | None = None,
        chunk: int = 16384,
    ) -> H2Reply:
        """One whole request, its body sent as flow control allows; the whole reply."""
        stream_id = self.start_request(method, path, headers=headers, end=body is None)
        if body is not None:  # the HEADERS go with the first DATA, in one write
            await self.send_body(stream_id, body, chunk=chunk)
        await self.flush()
        return await self.reply(stream_id)

    async def send_body(self, stream_id: int, body: bytes, *, chunk: int = 16384) -> None:
        view = memoryview(body)
        with trio.fail_after(CLIENT_TIMEOUT):
            while view:
                window = min(self.conn.local_flow_control_window(stream_id), chunk)
                if window <= 0:
                    await self.receive()
                    if self.replies[stream_id].done:
                        return
                    continue
                view, piece = view[window:], bytes(view[:window])
                self.conn.send_data(stream_id, piece, end_stream=not view)
                if view:
                    await self.flush()
            if not body:
                self.conn.end_stream(stream_id)
            await self.flush()

    async def reply(self, stream_id: int) -> H2Reply:
        with trio.fail_after(CLIENT_TIMEOUT):
            while not self.replies[stream_id].done and not self.closed:
                await self.receive()
        return self.replies[stream_id]

    async def receive(self) -> list[h2.events.Event]:
        """One read's events, handled; [] once the server closed."""
        try:
            data = await self.tls.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            self.closed = True
            return []
        self._buffer += data
        events: list[h2.events.Event] = []
        # Fed a frame at a time: h2's client side stops at a GOAWAY, where a real client
        # (nghttp2, OkHttp) goes on with the streams up to its last_stream_id; so does this
        # one, after a graceful (NO_ERROR) GOAWAY.
        while len(self._buffer) >= FRAME_HEADER:
            size = FRAME_HEADER + int.from_bytes(self._buffer[:3], "big")
            if len(self._buffer) < size:
                break
            frame, self._buffer = bytes(self._buffer[:size]), self._buffer[size:]
            try:
                got = self.conn.receive_data(frame)
            except h2.exceptions.ProtocolError:
                self.closed = True
                return events
            for event in got:
                self._handle(event)
                if isinstance(event, h2.events.ConnectionTerminated) and event.error_code == 0:
                    self.conn.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN
            events += got
        await self.flush()
        return events

    async def until_closed(self) -> None:
        """Read (and acknowledge) until the server closes the connection."""
        with trio.fail_after(CLIENT_TIMEOUT):
            while not self.closed:
                await self.receive()

    def _handle(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            reply = self.replies[event.stream_id or 0]
            headers = list(event.headers or [])
            reply.status = int(dict(headers)[b":status"])
            reply.headers = [(n, v) for n, v in headers if not n.startswith(b":")]
        elif isinstance(event, h2.events.InformationalResponseReceived):
            status = dict(event.headers or [])[b":status"]
            self.replies[event.stream_id or 0].informational.append(int(status))
        elif isinstance(event, h2.events.DataReceived):
            stream_id = event.stream_id or 0
            self.replies[stream_id].body += event.data or b""
            if event.flow_controlled_length:
                self.conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            self.replies[event.stream_id or 0].ended = True
        elif isinstance(event, h2.events.StreamReset):
            if (reset := self.replies.get(event.stream_id or 0)) is not None:
                reset.reset = int(event.error_code or 0)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = event
        elif isinstance(event, h2.events.PingAckReceived):
            self.pings_acked += 1


def _b(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value


@asynccontextmanager
async def h2_client(
    port: int, cafile: Path, *, validate: bool = True, **settings: Any
) -> AsyncIterator[H2Client]:
    """A connected HTTP/2 client (ALPN h2 checked); `validate=False` lets h2 send what a
    well-behaved client would not; `settings`: local SETTINGS values by h2's names."""
    with trio.fail_after(CLIENT_TIMEOUT):
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        await sock.connect(("127.0.0.1", port))
        context = ssl.create_default_context(cafile=str(cafile))
        context.set_alpn_protocols(["h2"])
        tls = trio.SSLStream(trio.SocketStream(sock), context, server_hostname=SNI)
        await tls.do_handshake()
    assert tls.selected_alpn_protocol() == "h2"
    client = H2Client(tls, validate=validate)
    if settings:
        client.conn.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                getattr(h2.settings.SettingCodes, k.upper()): v for k, v in settings.items()
            },
        )
    try:
        await client.start()
        yield client
    finally:
        await trio.aclose_forcefully(tls)
