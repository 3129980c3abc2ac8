"""Pooled, verified connections to the upstream: the trio edge towards the API we front.

Theory of operation. A connection is TCP (`streams.TcpStream`, with TCP_NODELAY) plus,
for https, a TLS client handshake that verifies the upstream's certificate against the system
store and `upstream.ca_file`, always checks the host name, requires TLS 1.2 or later, offers
ALPN http/1.1 only and sends `upstream.host` as SNI. Connecting and handshaking together get
`limits.upstream_connect_timeout`. It carries one exchange at a time: the relay `acquire`s,
sends the request (`send_request` with the head, then `send` for more body bytes), reads
`receive_head` and then `buffered_body`/`receive_body` until `body.END`, and `release`s (or
`discard`s on any failure).

Response heads are read raw up to the blank line (`heads.find_head_end`) and checked by
`heads.check_response_head`, which refuses the shapes that make a proxy and its client
disagree on where a response ends (CL with TE, a duplicate Content-Length, HTTP/1.0 with
chunked). The checked head drives the body: a `body` reader for its framing (none after HEAD,
1xx, 204 and 304; by Content-Length, chunked, or until the close), on the connection's own
receive buffer. Interim 1xx responses are read and dropped.

Pool invariants. A connection is in the idle pool only when

1. nobody holds it: `acquire` takes it out, `release` puts it back;
2. its last response was read to its end, and allows another on the connection (HTTP/1.1,
   no `Connection: close`, a body not ended by the close; RFC 9112 §9.3);
3. nothing more came from the upstream: no byte after the framed response in our buffer,
   no TLS record read from the socket but not yet decrypted, and, checked again at `acquire`
   because time passes, a socket that is not readable. An idle socket turns readable for an
   EOF, a reset, a close_notify or stray bytes (a second response smuggled after the first):
   none is a connection to write a request into, so it is dropped and the next one tried.
   That look costs a poll(2) per request, so `acquire(check=False)` skips it for a request
   the relay may send again on a fresh connection (a stale connection then fails before any
   response byte, which is its retry rule); what such an exchange reads is checked as ever;
4. it has been idle for less than `upstream.pool_idle_timeout`: expired ones are closed when
   `acquire`, `release` or `prune` find them.

Idle connections are taken newest first (LIFO): the most recently used one is the most likely
still open at the upstream, and the oldest ones age out. With `pool_max_idle` reached, a
released connection displaces the oldest idle one.

Who closes what: the pool closes the connections it holds (expired, stale, displaced, all of
them at `aclose`); a caller holding one closes it by `discard`, and `release` closes one that
cannot be reused. Closing is always forceful and never raises: the socket is closed at once,
without a close_notify, which the framing of the last response already made unnecessary.

Errors. Everything the upstream does wrong surfaces as an `HttpRefusal` whose fault is the
upstream's: translated here from OSError, ssl errors and trio's stream errors with
``raise ... from``, or raised as such by the head checks and the body readers: 502 for
refused, reset, unverifiable TLS or an invalid response, 504 for a timeout. `before_response`
says that not one byte of a response arrived, which with `reused` is what the relay's retry of
an idempotent request on a fresh connection keys on. A caller that bounds the waits with its
own cancel scope (``timeout=None``, ``bounded=False``) reports an expiry with `timeout_error`,
so the 504 reads the same.
"""

from __future__ import annotations

import select
import socket
import ssl
from collections import deque
from http import HTTPStatus
from typing import Final, Literal

import trio

from dualproxy.config.errors import OperatorError
from dualproxy.config.schema import Limits, UpstreamConfig
from dualproxy.http import body
from dualproxy.http.errors import HttpRefusal, timeout_problem
from dualproxy.http.heads import (
    HeadLimits,
    ResponseHead,
    check_response_head,
    find_head_end,
)
from dualproxy.tls.streams import RECEIVE_SIZE, TcpStream, TlsStream

# Interim responses (100 Continue, 103 Early Hints) read and dropped before the final one.
# Servers send one or two; more is a broken upstream, refused even within the head timeout.
MAX_INFORMATIONAL_RESPONSES: Final = 8
# find_head_end applies MAX_RESPONSE_HEAD_BYTES to responses; its HeadLimits are for requests.
_RESPONSE_LIMITS: Final = HeadLimits()
_BAD_GATEWAY: Final = int(HTTPStatus.BAD_GATEWAY)
_GATEWAY_TIMEOUT: Final = int(HTTPStatus.GATEWAY_TIMEOUT)
_OK: Final = int(HTTPStatus.OK)
_SWITCHING_PROTOCOLS: Final = int(HTTPStatus.SWITCHING_PROTOCOLS)
_NO_CONTENT: Final = int(HTTPStatus.NO_CONTENT)
_NOT_MODIFIED: Final = int(HTTPStatus.NOT_MODIFIED)


def _failure(status: int, problem: str, *, before_response: bool = True) -> HttpRefusal:
    """What the upstream did wrong, as the refusal it means: `problem` names the upstream host
    and never a secret."""
    return HttpRefusal(status, problem, fault="upstream", before_response=before_response)


class UpstreamConnection:
    """One connection to the upstream and the state of its current exchange; see the module
    docstring."""

    __slots__ = (
        "_buffer",
        "_closed",
        "_complete",
        "_eof",
        "_idle_since",
        "_keep_alive",
        "_max_fields",
        "_pooled",
        "_reader",
        "_send_failed",
        "_send_timeout",
        "_started",
        "_tcp",
        "response_head",
        "reused",
        "stream",
    )

    def __init__(
        self,
        stream: TcpStream | TlsStream,
        tcp: TcpStream,
        send_timeout: float,
        max_fields: int = Limits().max_response_header_count,
    ):
        self.stream = stream  # TLS over `tcp` (https), or `tcp` itself (http)
        self.reused = False  # taken from the idle pool: the relay's stale-retry candidate
        # The final response head of the current exchange, as check_response_head read it.
        self.response_head: ResponseHead | None = None
        self._tcp = tcp
        self._send_timeout = send_timeout
        self._max_fields = max_fields  # limits.max_response_header_count
        self._buffer = bytearray()  # received and not yet consumed: a head, then its body
        self._reader: body.BodyReader | None = None  # the current response's body framing
        self._started = False  # a byte of the current response has arrived
        self._complete = False  # the current response was read to its end
        self._keep_alive = False  # the current response lets the connection carry another
        self._eof = False  # the upstream closed its side
        self._idle_since = 0.0
        self._pooled = False
        self._closed = False
        # A send broke: a response may still be read (see the relay's early answer), but the
        # connection carries nothing more.
        self._send_failed = False

    async def send_request(self, data: bytes, *, bounded: bool = True) -> None:
        """Start an exchange: send a request head (and any body bytes that go with it).

        Errors as `send`."""
        self._started = False
        self._complete = False
        self.response_head = None
        self._reader = None
        await self.send(data, bounded=bounded)

    async def send(self, data: bytes, *, bounded: bool = True) -> None:
        """Send request bytes: 504 when the upstream does not take them within the
        upstream_timeout, 502 when the connection breaks. `bounded=False` leaves the wait to
        a cancel scope of the caller's (which then reports an expiry with `timeout_error`)."""
        try:
            if bounded:
                with trio.fail_after(self._send_timeout):
                    await self.stream.send_all(data)
            else:
                await self.stream.send_all(data)
        except trio.TooSlowError as exc:
            raise self.timeout_error("send", self._send_timeout) from exc
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._send_failed = True
            raise _failure(
                _BAD_GATEWAY,
                f"connection lost while sending the request ({_cause(exc)})",
                before_response=not self._started,
            ) from exc

    def timeout_error(
        self, waiting_for: Literal["send", "head", "body"], timeout: float
    ) -> HttpRefusal:
        """The error (504) for a wait on this connection that took longer than `timeout`."""
        return _failure(
            _GATEWAY_TIMEOUT,
            timeout_problem(waiting_for, timeout),
            before_response=not self._started,
        )

    # The timeouts are parameters (ASYNC109) because expiring is the upstream's failure, 504,
    # and says which wait expired; the caller's own deadlines still apply on top. None: the
    # caller's cancel scope bounds the wait (and reports it with `timeout_error`).
    async def receive_head(
        self,
        *,
        timeout: float | None,  # noqa: ASYNC109
        request_method: bytes,
        upgrading: bool = False,
    ) -> ResponseHead:
        """The final response head, interim 1xx ones skipped; the whole wait is `timeout`.

        The head is checked by heads.check_response_head (and kept as `response_head`);
        body bytes read along with it stay buffered for `buffered_body`/`receive_body`.
        `upgrading`: the request asked for an upgrade, and a 101 is final: what follows it is
        the new protocol's (`tunnel`).
        """
        try:
            if timeout is None:
                return await self._receive_head(request_method, upgrading)
            with trio.fail_after(timeout):
                return await self._receive_head(request_method, upgrading)
        except trio.TooSlowError as exc:
            assert timeout is not None
            raise self.timeout_error("head", timeout) from exc
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _failure(
                _BAD_GATEWAY,
                f"connection lost before the response head ({_cause(exc)})",
                before_response=not self._started,
            ) from exc

    async def _receive_head(self, request_method: bytes, upgrading: bool) -> ResponseHead:
        for _ in range(MAX_INFORMATIONAL_RESPONSES + 1):
            head = check_response_head(
                await self._read_head(),
                request_method=request_method,
                max_fields=self._max_fields,
                upgrading=upgrading,
            )
            if head.status == _SWITCHING_PROTOCOLS:  # only when upgrading: the last HTTP
                self._keep_alive = False
                self.response_head = head
                return head
            if head.status < _OK:  # interim: no body, the final head follows
                continue
            no_body = request_method == b"HEAD" or head.status in (_NO_CONTENT, _NOT_MODIFIED)
            self._reader = body.body_reader(
                0 if no_body else head.content_length, chunked=head.chunked, sender="upstream"
            )
            # A body ended by the close leaves nothing to reuse either.
            self._keep_alive = not head.close and (
                no_body or head.chunked or head.content_length is not None
            )
            self.response_head = head
            return head
        raise _failure(
            _BAD_GATEWAY,
            f"more than {MAX_INFORMATIONAL_RESPONSES} interim (1xx) responses",
            before_response=False,
        )

    async def _read_head(self) -> bytes:
        """Raw bytes up to and including the blank line ending the next response head."""
        buffer = self._buffer
        searched = 0
        # Bounded: find_head_end raises once MAX_RESPONSE_HEAD_BYTES arrived without an end,
        # and every round adds at least one byte or raises.
        while True:
            end = find_head_end(buffer, _RESPONSE_LIMITS, response=True, start=searched)
            if end is not None:
                head = bytes(buffer[:end])
                del buffer[:end]
                return head
            searched = len(buffer)
            data = await self.stream.receive_some(RECEIVE_SIZE) if not self._eof else b""
            if not data:
                self._eof = True
                raise _failure(
                    _BAD_GATEWAY,
                    "upstream closed the connection before the response head"
                    if not self._started
                    else "upstream closed the connection in the middle of the response head",
                    before_response=not self._started,
                )
            self._started = True
            buffer += data

    def buffered_body(self) -> bytes | body.End | None:
        """The next piece of the response body, or its end, from bytes already received;
        None when a read is needed. HttpRefusal (502) for an invalid body."""
        reader = self._reader
        assert reader is not None, "no response head received"
        piece = reader.read(self._buffer)
        if piece is body.END:
            self._complete = True
        return piece

    async def receive_body(
        self,
        *,
        timeout: float | None,  # noqa: ASYNC109
    ) -> bytes | body.End:
        """The next piece of the response body, or its end; `timeout` bounds each read."""
        # Bounded: each round either returns or reads (an EOF ends the body or raises).
        while True:
            piece = self.buffered_body()
            if piece is not None:
                return piece
            assert self._reader is not None
            if self._eof:
                end = self._reader.read_eof()
                self._complete = True
                return end
            try:
                if timeout is None:
                    data = await self.stream.receive_some(RECEIVE_SIZE)
                else:
                    with trio.fail_after(timeout):
                        data = await self.stream.receive_some(RECEIVE_SIZE)
            except trio.TooSlowError as exc:
                assert timeout is not None
                raise self.timeout_error("body", timeout) from exc
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise _failure(
                    _BAD_GATEWAY,
                    f"connection lost in the response body ({_cause(exc)})",
                    before_response=False,
                ) from exc
            if data:
                self._buffer += data
            else:
                self._eof = True

    def tunnel(self) -> tuple[TcpStream | TlsStream, bytes]:
        """After a 101: the stream, now the new protocol's, and its bytes already received
        (the connection is never pooled again)."""
        self._keep_alive = False
        data = bytes(self._buffer)
        self._buffer.clear()
        return self.stream, data

    def reusable(self) -> bool:
        """Whether this connection may carry another exchange: the response read to its end,
        the upstream keeping the connection open, every send of the request taken, and nothing
        received past the end of the response (bytes there mean a broken upstream)."""
        if self._closed or self._send_failed or not self._complete or not self._keep_alive:
            return False
        if self._buffer or self._eof:
            return False
        return not (isinstance(self.stream, TlsStream) and self.stream.pending())

    def close(self) -> None:
        """Close the socket now (no close_notify); idempotent, never raises."""
        if not self._closed:
            self._closed = True
            self._tcp.close()

    async def aclose(self) -> None:
        """Close forcefully, as `close`; a checkpoint that never raises, not even Cancelled."""
        self.close()
        await trio.lowlevel.cancel_shielded_checkpoint()

    def _looks_alive(self, poller: select.poll) -> bool:
        """True when the idle socket has nothing to read: no EOF, reset or unsolicited bytes."""
        if self._closed:
            return False
        fd = self._tcp.socket.fileno()
        poller.register(fd, select.POLLIN)
        try:
            return not poller.poll(0)
        finally:
            poller.unregister(fd)


class UpstreamPool:
    """Connections to one upstream, opened on demand and kept idle for reuse."""

    def __init__(self, upstream: UpstreamConfig, limits: Limits) -> None:
        self._upstream = upstream
        self._limits = limits
        self._context = client_context(upstream) if upstream.scheme == "https" else None
        self._where = upstream.authority  # for problems: host, and the port unless default
        self._idle: deque[UpstreamConnection] = deque()  # oldest left, newest right
        self._poller = select.poll()
        # Stats for tests and metrics.
        self.connections_opened = 0
        self.reuses = 0
        self.stale_dropped = 0  # idle connections found closed or readable at acquire

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    async def acquire(self, now: float | None = None, *, check: bool = True) -> UpstreamConnection:
        """An idle connection still open at the upstream (newest first), else a new one;
        HttpRefusal when a new one cannot be made (502, or 504 past the connect timeout).
        `now`: trio's clock, when the caller has just read it. `check=False` skips the look
        at the idle connection's socket (a poll(2)) for a request that may be sent again
        anyway should the connection turn out closed (the relay's retry rule)."""
        # No checkpoint on the way to an idle connection: it is handed over in the same step
        # as it leaves the pool (nothing can cancel us in between), and the caller's send is
        # the next checkpoint. Opening one checkpoints, as all I/O does.
        idle = self._idle
        if now is None:
            now = trio.current_time()
        expired_before = now - self._upstream.pool_idle_timeout
        while idle:  # bounded by pool_max_idle
            connection = idle.pop()
            connection._pooled = False
            if connection._idle_since < expired_before:
                connection.close()
                self._close_idle()  # all older still
                break
            if check and not connection._looks_alive(self._poller):
                self.stale_dropped += 1
                connection.close()
                continue
            connection.reused = True
            self.reuses += 1
            return connection
        return await self._open()

    def release(self, connection: UpstreamConnection, now: float | None = None) -> None:
        """Return a connection after a complete exchange: pooled when `reusable()` and
        `pool_max_idle` allows, closed otherwise. `now` as for `acquire` (its idle time is
        counted from then)."""
        if connection._pooled:
            raise RuntimeError("this upstream connection is already in the pool")
        max_idle = self._upstream.pool_max_idle
        if max_idle == 0 or not connection.reusable():
            connection.close()
            return
        if now is None:
            now = trio.current_time()
        self.prune(now)
        idle = self._idle
        if len(idle) >= max_idle:
            idle.popleft().close()
        connection._idle_since = now
        connection._pooled = True
        idle.append(connection)

    def discard(self, connection: UpstreamConnection) -> None:
        """Close a connection that is not coming back (failed, or not reusable)."""
        connection.close()

    def prune(self, now: float | None = None) -> int:
        """Close idle connections older than pool_idle_timeout; returns how many."""
        now = trio.current_time() if now is None else now
        expired_before = now - self._upstream.pool_idle_timeout
        idle = self._idle
        closed = 0
        while idle and idle[0]._idle_since < expired_before:
            idle.popleft().close()
            closed += 1
        return closed

    async def aclose(self) -> None:
        """Close every idle connection (those held by callers are theirs to close)."""
        self._close_idle()
        await trio.lowlevel.cancel_shielded_checkpoint()

    def _close_idle(self) -> None:
        while self._idle:
            self._idle.pop().close()

    async def _open(self) -> UpstreamConnection:
        upstream = self._upstream
        timeout = self._limits.upstream_connect_timeout
        try:
            with trio.fail_after(timeout):
                tcp = await _connect(upstream.host, upstream.port)
                try:
                    stream = await self._handshake(tcp)
                except BaseException:
                    tcp.close()
                    raise
        except trio.TooSlowError as exc:
            raise _failure(
                _GATEWAY_TIMEOUT, f"no connection to {self._where} within {timeout:g} s"
            ) from exc
        except trio.BrokenResourceError as exc:  # the TLS handshake failed
            raise _failure(_BAD_GATEWAY, _tls_problem(exc, upstream.host)) from exc
        except OSError as exc:  # resolving or connecting
            raise _failure(_BAD_GATEWAY, _connect_problem(exc, self._where)) from exc
        self.connections_opened += 1
        limits = self._limits
        return UpstreamConnection(
            stream, tcp, limits.upstream_timeout, limits.max_response_header_count
        )

    async def _handshake(self, tcp: TcpStream) -> TcpStream | TlsStream:
        if self._context is None:
            return tcp
        # https_compatible: an upstream closing without close_notify (common) reads as a
        # plain EOF. Truncation cannot pass for a whole response: a body framed by
        # Content-Length or chunks is read to its end, and one cut short fails (body).
        tls = TlsStream(
            tcp,
            self._context,
            server_side=False,
            server_hostname=self._upstream.host,
            https_compatible=True,
        )
        await tls.do_handshake()
        return tls


async def _connect(host: str, port: int) -> TcpStream:
    """A TCP connection to the upstream: trio resolves the name (in a thread) and tries its
    addresses happy-eyeballs style; the socket it connected is then ours."""
    connected = await trio.open_tcp_stream(host, port)
    family, kind, proto = (
        connected.socket.family,
        connected.socket.type,
        connected.socket.proto,
    )
    return TcpStream(socket.socket(family, kind, proto, fileno=connected.socket.detach()))


def client_context(upstream: UpstreamConfig) -> ssl.SSLContext:
    """The TLS client context for the upstream: system trust plus `ca_file`, host name always
    checked, TLS 1.2 or later, ALPN http/1.1. Raises OperatorError when ca_file is unusable."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if upstream.ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(upstream.ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise OperatorError(
                f"cannot load {upstream.ca_file} as PEM CA certificates: {exc}",
                key_path="upstream.ca_file",
            ) from exc
    # create_default_context set both already; stated so that no later edit can weaken them.
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    return context


def _cause(exc: BaseException) -> str:
    """A short name for what broke a stream: 'reset', 'closed', an ssl reason."""
    cause = exc.__cause__
    if isinstance(exc, trio.ClosedResourceError):
        return "closed locally"
    if isinstance(cause, ssl.SSLError):
        return str(cause.reason or type(cause).__name__).lower()
    if isinstance(cause, ConnectionResetError):
        return "reset"
    if isinstance(cause, OSError):
        return cause.strerror or type(cause).__name__
    return "closed" if cause is None else type(cause).__name__


def _tls_problem(exc: trio.BrokenResourceError, host: str) -> str:
    cause = exc.__cause__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"certificate verify failed for {host}: {cause.verify_message}"
    return f"TLS handshake with {host} failed: {_cause(exc)}"


def _connect_problem(exc: OSError, where: str) -> str:
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve {where}: {exc.strerror}"
    # trio.open_tcp_stream raises one OSError for all addresses, caused by a group of the
    # errors of each attempt.
    group = exc.__cause__
    errors = (
        [e for e in group.exceptions if isinstance(e, OSError)]
        if isinstance(group, BaseExceptionGroup)
        else [exc]
    ) or [exc]
    if all(isinstance(e, ConnectionRefusedError) for e in errors):
        return f"connection to {where} refused"
    reasons = sorted({e.strerror or str(e) for e in errors})
    return f"cannot connect to {where}: {'; '.join(reasons)}"
