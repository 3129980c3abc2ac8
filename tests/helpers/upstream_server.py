"""A local test upstream that records the exact bytes it receives and misbehaves on command.

A trio + h11 HTTP/1.1 server on 127.0.0.1, plain HTTP or HTTPS (a trustme certificate for
"upstream.test" and "localhost", its CA written to a file for `UpstreamConfig.ca_file`).

    upstream = UpstreamServer.https(tmp_path)      # or UpstreamServer.http()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(upstream.run)   # also upstream.port
        pool = UpstreamPool(upstream.config(), Limits())
        ...
        nursery.cancel_scope.cancel()

or the same in one block: `async with serve_upstream(UpstreamServer.http()) as upstream:`.
`upstream.config()` is an UpstreamConfig (https://localhost:PORT, ca_file set) and
`upstream.config_table()` the [upstream] table for a config.toml. "upstream.test" resolves
only where `LocalResolver` is installed (in-process tests); "localhost" resolves everywhere.

What it records: `upstream.connections` has one `Accepted` per accepted TCP connection, in
order, with `received`, the exact (decrypted) bytes that arrived on it, `requests`, the
requests h11 parsed from them (`ReceivedRequest`: method, target, headers with their case,
body), `sent` (response bytes written) and `tls_error` (a handshake the client refused).
`upstream.received` joins every connection's bytes: a request the proxy refused must leave it
b"". `upstream.accepted` counts connections (pool reuse), `upstream.server_names` the SNI of
each handshake.

What it does: by default (`Behaviour.ECHO`) it answers every request with 200 and a JSON
description of the request as received (method, target, http_version, headers, body_length,
body_sha256, connection, request), keeping the connection alive. Set `upstream.behaviour` to

- another `Behaviour` (see the enum: closes, resets, hangs, large or malformed responses);
- raw response bytes, or `Raw(data, close=True)`: written as they are, then the connection
  serves on as if the response had been a normal one (or closes, with `close`);
- a callable picking one of those per `ReceivedRequest`; `in_turn(a, b, ...)` gives the n-th
  request of the server the n-th plan, the last one repeating.

Knobs are attributes: `hang`, `large_body_size`, `large_body_chunked`, `slow_read_size`,
`slow_read_delay`, `idle_timeout` (close idle keep-alive connections after it), `silent`
(accept, then never read or write: TLS handshakes and requests hang). Between requests,
`wait_idle()` waits until every open connection waits for its next request, `close_idle()`
closes those (with or without close_notify) and `write_idle()` writes them stray bytes:
stale-pool tests without a timer. `closed_port()` (connect refused) and `unresponsive_port()`
(connect hangs) cover connection failures.

Waits: every one is bounded by `timeout` (90 s: longer than the proxy's default
upstream_timeout of 60 s, so under a MockClock the proxy's timers fire first); `hang` (80 s)
outlasts that default too: keep a test's proxy timeouts below both. Under MockClock autojump,
open connections first or use 127.0.0.1: resolving "localhost" runs in a thread, and the
clock jumps while it does. The server stops when its nursery is cancelled.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal, NoReturn

import h11
import trio
import trustme

from dualproxy.config.schema import UpstreamConfig

DEFAULT_NAMES: Final = ("upstream.test", "localhost")
# Bounds every wait of the server (a read, a send, an idle keep-alive connection).
DEFAULT_TIMEOUT: Final = 90.0
# HANG_* behaviours wait this long: past the proxy's default upstream_timeout (60 s).
DEFAULT_HANG: Final = 80.0
RECEIVE_SIZE: Final = 64 * 1024
# LARGE_BODY writes its body in sends of this size; `sent` grows by one chunk at a time.
CHUNK_SIZE: Final = 64 * 1024
# The bytes of LARGE_BODY bodies: every byte value in turn, so a lost or repeated chunk shows.
PATTERN: Final = bytes(range(256)) * (CHUNK_SIZE // 256)
# How long a graceful close waits for close_notify to go out before closing the socket anyway.
CLOSE_TIMEOUT: Final = 5.0


def pattern_bytes(size: int) -> bytes:
    """The first `size` bytes of a LARGE_BODY body."""
    whole, rest = divmod(size, len(PATTERN))
    return PATTERN * whole + PATTERN[:rest]


class Behaviour(enum.Enum):
    """What the upstream does with one request (after reading its head)."""

    ECHO = "echo"  # read the body, answer 200 + JSON description, keep-alive
    CONNECTION_CLOSE = "connection-close"  # ECHO with `Connection: close`, then close (FIN)
    INFORMATIONAL_FIRST = "informational-first"  # a 103 Early Hints, then ECHO
    CLOSE_BEFORE_RESPONSE = "close-before-response"  # read the request, close: not a byte back
    RESET_MID_RESPONSE = "reset-mid-response"  # head + half the body, then RST (SO_LINGER 0)
    HANG_BEFORE_HEAD = "hang-before-head"  # read the request, wait `hang` s, then ECHO
    HANG_MID_BODY = "hang-mid-body"  # ECHO's head and half its body, wait `hang` s, the rest
    LARGE_BODY = "large-body"  # 200 with `large_body_size` bytes of PATTERN, in CHUNK_SIZE sends
    # Read the body `slow_read_size` bytes per `slow_read_delay` s, then ECHO (the read that
    # got the head may have taken up to RECEIVE_SIZE of the body with it).
    SLOW_READ = "slow-read"
    # Answer EARLY_ANSWER (a 413 that does not say it closes) once the head is read, and close
    # without reading the body: the unread bytes make the close a reset.
    ANSWER_BEFORE_BODY = "answer-before-body"
    # Raw responses (RAW_RESPONSES below), written as they are:
    CL_AND_TE = "cl-and-te"
    CONFLICTING_CONTENT_LENGTH = "conflicting-content-length"
    DUPLICATE_CONTENT_LENGTH = "duplicate-content-length"  # the same value twice: h11 accepts
    EXTRA_BYTES_AFTER_BODY = "extra-bytes-after-body"  # a second, unsolicited response follows
    HTTP10_CHUNKED = "http10-chunked"


EARLY_ANSWER: Final = b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 9\r\n\r\ntoo large"
RAW_RESPONSES: Final[Mapping[Behaviour, bytes]] = MappingProxyType(
    {
        Behaviour.CL_AND_TE: (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n"
        ),
        Behaviour.CONFLICTING_CONTENT_LENGTH: (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello"
        ),
        Behaviour.DUPLICATE_CONTENT_LENGTH: (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello"
        ),
        Behaviour.EXTRA_BYTES_AFTER_BODY: (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
            b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled"
        ),
        Behaviour.HTTP10_CHUNKED: (
            b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        ),
    }
)


@dataclass(frozen=True)
class Raw:
    """Write `data` as the response; then close (FIN) when `close`, else serve on."""

    data: bytes
    close: bool = False


# What the upstream does with a request: a behaviour, raw response bytes (as Raw(data)).
Plan = Behaviour | bytes | Raw


@dataclass(eq=False)
class ReceivedRequest:
    """One request as the upstream parsed it; `body` is filled once it has been read."""

    index: int  # among all requests this server received, from 0
    connection: int  # Accepted.index of its connection
    number: int  # among the requests on its connection, from 0
    method: bytes
    target: bytes
    http_version: bytes
    headers: list[tuple[bytes, bytes]]  # names with their original case, in order
    body: bytes = b""
    complete: bool = False  # the whole body arrived

    def header(self, name: bytes) -> list[bytes]:
        """Every value of the header `name` (any case), in order."""
        return [v for n, v in self.headers if n.lower() == name.lower()]


@dataclass(eq=False)
class Accepted:
    """One accepted TCP connection and what happened on it."""

    index: int
    received: bytearray = field(default_factory=bytearray)  # exact bytes (after TLS)
    requests: list[ReceivedRequest] = field(default_factory=list)
    sent: int = 0  # response bytes written (before TLS)
    tls_error: str | None = None  # the handshake failed (e.g. the client refused our cert)
    protocol_error: str | None = None  # h11 refused what the client sent
    idle: bool = False  # waiting for the first byte of the next request
    done: trio.Event = field(default_factory=trio.Event)  # the server closed its socket
    stream: trio.abc.Stream | None = None  # after the handshake, for write_idle
    _idle_scope: trio.CancelScope | None = None
    _notify: bool = True

    async def wait_done(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        with trio.fail_after(timeout):
            await self.done.wait()


def in_turn(*plans: Plan) -> Callable[[ReceivedRequest], Plan]:
    """A chooser giving the n-th request the n-th plan (the last one repeats)."""
    if not plans:
        raise ValueError("in_turn needs at least one plan")
    return lambda request: plans[min(request.index, len(plans) - 1)]


class _Closed(Exception):
    """The connection is finished (closed by either side); the handler just returns."""


class UpstreamServer:
    """The test upstream; see the module docstring."""

    def __init__(self, *, context: ssl.SSLContext | None = None, ca_file: Path | None = None):
        self.context = context
        self.ca_file = ca_file
        # The SNI name of each TLS handshake, in order (None: the client sent none).
        self.server_names: list[str | None] = []
        if context is not None:
            context.sni_callback = self._note_server_name
        self.port = 0
        self.connections: list[Accepted] = []
        self.behaviour: Plan | Callable[[ReceivedRequest], Plan] = Behaviour.ECHO
        self.timeout = DEFAULT_TIMEOUT
        self.hang = DEFAULT_HANG
        self.large_body_size = 1024 * 1024
        self.large_body_chunked = False
        self.slow_read_size = 1024
        self.slow_read_delay = 0.01
        # Close a keep-alive connection idle this long (seconds; with close_notify on TLS).
        self.idle_timeout: float | None = None
        # Accept connections and never read or write: a TLS handshake or request hangs.
        self.silent = False
        self._requests = 0
        self._changed = trio.Event()  # set and replaced when a connection goes idle or ends

    @classmethod
    def http(cls) -> UpstreamServer:
        return cls()

    @classmethod
    def https(
        cls,
        directory: Path,
        *,
        ca: trustme.CA | None = None,
        names: Sequence[str] = DEFAULT_NAMES,
        key_type: trustme.KeyType = trustme.KeyType.ECDSA,
    ) -> UpstreamServer:
        """HTTPS with a certificate for `names` from `ca` (a new one by default); the CA
        certificate is written to directory/upstream-ca.pem (`ca_file`)."""
        ca = ca or trustme.CA()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.set_alpn_protocols(["http/1.1"])
        ca.issue_cert(*names, key_type=key_type).configure_cert(context)
        ca_file = directory / "upstream-ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        return cls(context=context, ca_file=ca_file)

    # --- what tests read and call ----------------------------------------------------------

    @property
    def scheme(self) -> str:
        return "https" if self.context is not None else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://localhost:{self.port}"

    @property
    def accepted(self) -> int:
        return len(self.connections)

    @property
    def received(self) -> bytes:
        """Every byte received on every connection, in connection order."""
        return b"".join(bytes(c.received) for c in self.connections)

    @property
    def requests(self) -> list[ReceivedRequest]:
        return [r for c in self.connections for r in c.requests]

    def config(self, host: str = "localhost", **overrides: Any) -> UpstreamConfig:
        """An UpstreamConfig for this server (`host` must resolve to 127.0.0.1)."""
        values: dict[str, Any] = {
            "url": f"{self.scheme}://{host}:{self.port}",
            "scheme": self.scheme,
            "host": host,
            "port": self.port,
            "ca_file": self.ca_file,
        }
        values.update(overrides)
        return UpstreamConfig(**values)

    def config_table(self, host: str = "localhost") -> dict[str, str]:
        """The [upstream] table for a config.toml (helpers.configs.make_config's `extra`)."""
        table = {"url": f"{self.scheme}://{host}:{self.port}"}
        if self.ca_file is not None:
            table["ca_file"] = str(self.ca_file)
        return table

    async def wait_idle(self) -> None:
        """Wait until every open connection waits for its next request (responses written)."""
        with trio.fail_after(self.timeout):
            while not all(c.idle or c.done.is_set() for c in self.connections):
                await self._changed.wait()

    async def close_idle(self, *, notify: bool = True) -> int:
        """Once every open connection is idle (`wait_idle`), close them all (with close_notify
        on TLS when `notify`); returns how many, once they are closed."""
        await self.wait_idle()
        idle = [c for c in self.connections if c.idle and c._idle_scope is not None]
        for accepted in idle:
            assert accepted._idle_scope is not None
            accepted._notify = notify
            accepted._idle_scope.cancel()
        for accepted in idle:
            await accepted.wait_done(self.timeout)
        return len(idle)

    async def write_idle(self, data: bytes) -> int:
        """Once every open connection is idle, write `data` to each, unsolicited."""
        await self.wait_idle()
        idle = [c for c in self.connections if c.idle and c.stream is not None]
        for accepted in idle:
            assert accepted.stream is not None
            with trio.fail_after(self.timeout):
                await accepted.stream.send_all(data)
        return len(idle)

    def _notify_change(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _note_server_name(
        self, _object: ssl.SSLObject, name: str | None, _context: ssl.SSLContext
    ) -> None:
        self.server_names.append(name)

    # --- serving -----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve on 127.0.0.1, port 0, until cancelled; reports the port."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = int(listeners[0].socket.getsockname()[1])
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, tcp: trio.SocketStream) -> None:
        accepted = Accepted(index=len(self.connections))
        self.connections.append(accepted)
        try:
            if self.silent:
                await trio.sleep(self.timeout)
                return
            stream: trio.abc.Stream = tcp
            if self.context is not None:
                tls = trio.SSLStream(tcp, self.context, server_side=True)
                try:
                    with trio.fail_after(self.timeout):
                        await tls.do_handshake()
                except (trio.BrokenResourceError, trio.TooSlowError) as exc:
                    accepted.tls_error = _describe(exc)
                    return
                stream = tls
            accepted.stream = stream
            await _Session(self, accepted, stream, tcp).serve()
        except (_Closed, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            pass
        finally:
            accepted.idle = False
            tcp.socket.close()
            accepted.done.set()
            self._notify_change()

    def _plan(self, request: ReceivedRequest) -> Plan:
        behaviour = self.behaviour
        if isinstance(behaviour, Behaviour | bytes | Raw):
            return behaviour
        return behaviour(request)

    def _next_index(self) -> int:
        self._requests += 1
        return self._requests - 1


class _Session:
    """One connection's request loop."""

    def __init__(
        self,
        server: UpstreamServer,
        accepted: Accepted,
        stream: trio.abc.Stream,
        tcp: trio.SocketStream,
    ) -> None:
        self.server = server
        self.accepted = accepted
        self.stream = stream
        self.tcp = tcp
        self.conn = h11.Connection(h11.SERVER)

    async def serve(self) -> None:
        for number in range(1_000_000):  # bounded: no test sends a million requests
            if not self.conn.trailing_data[0] and not await self._wait_for_request():
                return
            request = await self._receive_request(number)
            if request is None:
                return
            plan = self.server._plan(request)
            if plan is Behaviour.ANSWER_BEFORE_BODY:
                await self._send_raw(EARLY_ANSWER)
                return  # _handle closes the socket, the body unread
            if isinstance(plan, bytes):
                plan = Raw(plan)
            elif isinstance(plan, Behaviour) and plan in RAW_RESPONSES:
                plan = Raw(RAW_RESPONSES[plan])
            if isinstance(plan, Raw):
                await self._read_body(request)
                await self._send_raw(plan.data)
                if plan.close:
                    await self._close_gracefully()
                    return
                # Whatever we wrote, carry on as a keep-alive server would.
                self.conn = h11.Connection(h11.SERVER)
                continue
            await self._respond(request, plan)
            if self.conn.our_state is not h11.DONE or self.conn.their_state is not h11.DONE:
                await self._close_gracefully()
                return
            self.conn.start_next_cycle()

    async def _respond(self, request: ReceivedRequest, plan: Behaviour) -> None:
        server = self.server
        if plan is Behaviour.SLOW_READ:
            await self._read_body(request, size=server.slow_read_size, delay=server.slow_read_delay)
        else:
            await self._read_body(request)
        if plan is Behaviour.CLOSE_BEFORE_RESPONSE:
            raise _Closed
        if plan is Behaviour.HANG_BEFORE_HEAD:
            await trio.sleep(server.hang)
        if plan is Behaviour.LARGE_BODY:
            await self._send_large_body(request)
            return
        body = _echo_body(request)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        if plan is Behaviour.CONNECTION_CLOSE:
            headers.append((b"connection", b"close"))
        events: list[h11.Event] = []
        if plan is Behaviour.INFORMATIONAL_FIRST:
            hint = (b"link", b"</style.css>; rel=preload")
            events.append(h11.InformationalResponse(status_code=103, headers=[hint]))
        events.append(h11.Response(status_code=200, headers=headers, reason=b"OK"))
        if request.method == b"HEAD":
            await self._send(*events, h11.EndOfMessage())
            return
        half = len(body) // 2
        if plan is Behaviour.RESET_MID_RESPONSE:
            await self._send(*events, h11.Data(data=body[:half]))
            self._reset()
        if plan is Behaviour.HANG_MID_BODY:
            await self._send(*events, h11.Data(data=body[:half]))
            await trio.sleep(server.hang)
            await self._send(h11.Data(data=body[half:]), h11.EndOfMessage())
            return
        # The whole response in one write, as most servers manage for a small one.
        await self._send(*events, h11.Data(data=body), h11.EndOfMessage())

    async def _send_large_body(self, request: ReceivedRequest) -> None:
        size = self.server.large_body_size
        headers = [(b"content-type", b"application/octet-stream")]
        if self.server.large_body_chunked:
            headers.append((b"transfer-encoding", b"chunked"))
        else:
            headers.append((b"content-length", str(size).encode()))
        await self._send(h11.Response(status_code=200, headers=headers))
        if request.method != b"HEAD":
            # Every chunk starts at a multiple of len(PATTERN): it is PATTERN, or its start.
            for start in range(0, size, CHUNK_SIZE):
                await self._send(h11.Data(data=PATTERN[: min(CHUNK_SIZE, size - start)]))
        await self._send(h11.EndOfMessage())

    # --- reading -------------------------------------------------------------------------

    async def _wait_for_request(self) -> bool:
        """Wait, idle, for the first bytes of the next request; False when the connection
        is finished (client closed, idle timeout, close_idle)."""
        accepted, server = self.accepted, self.server
        limit = server.idle_timeout if server.idle_timeout is not None else server.timeout
        data: bytes | bytearray = b""
        accepted.idle = True
        server._notify_change()
        with trio.move_on_after(limit) as scope:
            accepted._idle_scope = scope
            data = await self.stream.receive_some(RECEIVE_SIZE)
        accepted.idle = False
        accepted._idle_scope = None
        if scope.cancelled_caught:
            await self._close_gracefully(notify=accepted._notify)
            return False
        if not data:
            return False
        accepted.received += data
        self.conn.receive_data(bytes(data))
        return True

    async def _next_event(self, size: int = RECEIVE_SIZE, delay: float = 0.0) -> h11.Event:
        """The next h11 event, reading (and recording) as needed."""
        for _ in range(1_000_000):  # bounded: each round reads at least one byte or ends
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                self.accepted.protocol_error = str(exc)
                if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    headers = [(b"content-length", b"0"), (b"connection", b"close")]
                    status = exc.error_status_hint
                    await self._send(h11.Response(status_code=status, headers=headers))
                    await self._send(h11.EndOfMessage())
                raise _Closed from exc
            if event is not h11.NEED_DATA:
                assert not isinstance(event, type)  # h11.PAUSED: not for a server mid-request
                return event
            if delay:
                await trio.sleep(delay)
            with trio.fail_after(self.server.timeout):
                data = await self.stream.receive_some(size)
            self.accepted.received += data
            self.conn.receive_data(bytes(data))
        raise _Closed

    async def _receive_request(self, number: int) -> ReceivedRequest | None:
        event = await self._next_event()
        if not isinstance(event, h11.Request):
            return None  # ConnectionClosed
        request = ReceivedRequest(
            index=self.server._next_index(),
            connection=self.accepted.index,
            number=number,
            method=event.method,
            target=event.target,
            http_version=event.http_version,
            headers=[(bytes(n), bytes(v)) for n, v in event.headers.raw_items()],
        )
        self.accepted.requests.append(request)
        return request

    async def _read_body(
        self, request: ReceivedRequest, *, size: int = RECEIVE_SIZE, delay: float = 0.0
    ) -> None:
        if self.conn.they_are_waiting_for_100_continue:
            await self._send(h11.InformationalResponse(status_code=100, headers=[]))
        body = bytearray()
        for _ in range(1_000_000):  # bounded: every event consumes input
            event = await self._next_event(size, delay)
            if isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                request.body, request.complete = bytes(body), True
                return
            else:  # ConnectionClosed mid-body
                request.body = bytes(body)
                raise _Closed
        raise _Closed

    # --- writing -------------------------------------------------------------------------

    async def _send(self, *events: h11.Event) -> None:
        """`events` in one write."""
        data = b"".join(self.conn.send(event) or b"" for event in events)
        if data:
            with trio.fail_after(self.server.timeout):
                await self.stream.send_all(data)
            self.accepted.sent += len(data)

    async def _send_raw(self, data: bytes) -> None:
        with trio.fail_after(self.server.timeout):
            await self.stream.send_all(data)
        self.accepted.sent += len(data)

    def _reset(self) -> NoReturn:
        """Abort with a TCP RST: SO_LINGER on with a zero timeout, then close."""
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.tcp.socket.close()
        raise _Closed

    async def _close_gracefully(self, *, notify: bool = True) -> None:
        """Close as a well-behaved server does: close_notify first on TLS (when `notify`)."""
        if notify and isinstance(self.stream, trio.SSLStream):
            with trio.move_on_after(CLOSE_TIMEOUT):
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self.stream.aclose()
        self.tcp.socket.close()


def _echo_body(request: ReceivedRequest) -> bytes:
    description = {
        "method": request.method.decode("latin-1"),
        "target": request.target.decode("latin-1"),
        "http_version": request.http_version.decode("latin-1"),
        "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in request.headers],
        "body_length": len(request.body),
        "body_sha256": hashlib.sha256(request.body).hexdigest(),
        "connection": request.connection,
        "request": request.number,
    }
    return json.dumps(description).encode()


def _describe(exc: BaseException) -> str:
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    if isinstance(cause, ssl.SSLError):
        return cause.reason or type(cause).__name__
    return type(cause).__name__


@asynccontextmanager
async def serve_upstream(server: UpstreamServer) -> AsyncIterator[UpstreamServer]:
    """`server` running on a loopback port for the duration of the block."""
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        yield server
        nursery.cancel_scope.cancel()


# What trio.abc.HostnameResolver.getaddrinfo returns, per address.
_AddressInfo = (
    tuple[Literal[socket.AddressFamily.AF_INET], socket.SocketKind, int, str, tuple[str, int]]
    | tuple[
        Literal[socket.AddressFamily.AF_INET6],
        socket.SocketKind,
        int,
        str,
        tuple[str, int, int, int] | tuple[int, bytes],
    ]
)


class LocalResolver(trio.abc.HostnameResolver):
    """Resolves `names` to 127.0.0.1 and nothing else (EAI_NONAME): install it in a test's
    trio run with `trio.socket.set_custom_hostname_resolver(LocalResolver())` to reach the
    test upstream as "upstream.test" (numeric hosts never reach a resolver)."""

    def __init__(self, names: Sequence[str] = DEFAULT_NAMES) -> None:
        self.names = frozenset(name.encode("ascii") for name in names)
        self.asked: list[bytes] = []

    async def getaddrinfo(
        self,
        host: bytes | None,
        port: bytes | str | int | None,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list[_AddressInfo]:
        await trio.lowlevel.checkpoint()
        self.asked.append(host or b"")
        if host not in self.names or family not in (0, socket.AF_INET):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        number = int(port) if port is not None else 0
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", number))]

    async def getnameinfo(
        self, sockaddr: tuple[str, int] | tuple[str, int, int, int], flags: int
    ) -> tuple[str, str]:
        raise NotImplementedError


@contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port nobody listens on: connecting is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    yield port


@contextmanager
def unresponsive_port() -> Iterator[int]:
    """A loopback port whose listen queue is full: a connect hangs (the SYN is dropped).

    The listener has a backlog of 0, which holds one connection; one client fills it.
    """
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        filler.connect(listener.getsockname())
        yield int(listener.getsockname()[1])
