"""One client connection, relayed over HTTP/1.1: the trio driver of the sans-IO exchange.

Theory of operation. `ClientConnection.serve` reads requests from the client's (TLS) stream
and relays each to the upstream pool, one at a time; what each request means (routing,
rewriting, framing decisions, 100-continue, early answers, the retry rule, refusals and cuts,
keep-alive) is `exchange.Exchange`'s, and what is here is how: bytes, buffers, sockets,
deadlines and cancellation. For each request, in order:

1. **wait** for its first byte (`Wait.FIRST_REQUEST` or `Wait.NEXT_REQUEST`), registered with
   the `Drain`, which cancels the wait when the server shuts down;
2. **the head**: raw bytes are read (RECEIVE_SIZE at a time) until `heads.find_head_end` finds
   the blank line, within request_header_timeout in all however slowly they trickle
   (`Wait.CLIENT_HEAD`, counted from the head's first byte, or for a connection's first
   request from the end of the TLS handshake); `heads.check_request_head` refuses what it must
   with the status it names, before a byte goes upstream;
3. the exchange **routes** it: answered here (`_answer_locally`) or relayed (`_relay`): an
   upstream connection from the pool gets the exchange's request head, together with the body
   bytes that came with it in one write, then the rest of the body, streamed (`body` readers
   on our buffer, re-framed by the exchange); then the response head, written from the
   exchange's `ResponseStart`, and its body, streamed back.

Who owns which bytes. The relay reads the client stream into its own buffer as bytes arrive;
the head is cut from its front, checked once and drives the request: no second parser reads
it. Body bytes are taken from the buffer by a `body` reader for the head's framing; bytes of a
pipelined next request stay in the buffer, where the next cycle's head search starts. The
upstream side is `upstream.UpstreamConnection`, which reads the response the same way.
Bodies pass through a receive at a time: memory per connection is about one receive of each
side, because `send_all` does not return until the peer's socket took the bytes (a client that
stops reading stops us reading the upstream, and send_timeout ends it). Toward the client,
what the upstream connection already holds (typically a whole small response: head, body,
end) is written together, in one TLS record and one send; anything that would need another
upstream read is preceded by a send, so a streamed response is never held back.

Waits. A connection runs in one cancel scope whose deadline each wait moves to its own bound
(`_bound(Wait.X)`, the `exchange.WAIT_BOUNDS` setting; not pushed back by less than
DEADLINE_SLACK), and records which wait it is, so that an expiry means what `exchange.expired`
says for that wait: a silent close when idle, 408, 504, or a cut. The drain cancels the scope
while the connection idles; a request that arrived just as it did is still served, in a new
scope (`_Restart`). Nothing yields without I/O to do. While the upstream works on a response
head, the client's close is noticed within DEPARTURE_CHECK_SECONDS, not only when the answer
comes (`Departures`; nginx's 499).

How a connection ends: quietly (the client left, asked to close, or the connection idled),
after a refusal of ours (`exchange.refusal_response`, then the caller's close, a *lingering*
one when `client_may_be_sending`), or cut (closed here at once, without close_notify).
Each exchange is reported through the `Tally` (settings.py) as it ends, for the access log;
the connection's own line is the server's record.

One module of some 650 lines: `ClientConnection` is one class whose methods share the
connection's buffer, cancel scope and current exchange; what could leave did (the exchange's
rules to exchange.py, the drain and the departure watch to lifecycle.py, the settings and
the Tally to settings.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from http import HTTPStatus
from typing import TYPE_CHECKING, Final

import trio

from dualproxy.config.names import IPAddress
from dualproxy.http.body import END, LAST_CHUNK, BodyReader, body_reader, encode_chunk
from dualproxy.http.errors import HttpRefusal
from dualproxy.http.exchange import (
    CLIENT_CLOSED_MID_REQUEST,
    CLIENT_LEFT,
    DEADLINE_SLACK,
    EARLY_ANSWER,
    MAX_REQUESTS_PER_CONNECTION,
    ClientSide,
    Cut,
    Exchange,
    Framing,
    Wait,
    client_may_be_sending,
    expired,
    refusal_response,
)
from dualproxy.http.heads import (
    HeadLimits,
    RequestHead,
    ResponseHead,
    check_request_head,
    find_head_end,
    response_head,
)
from dualproxy.http.lifecycle import DEPARTURE_CHECK_SECONDS, Departures, Drain, Leaver
from dualproxy.http.local import Endpoint, LocalRequest
from dualproxy.http.rewrite import ClientPeer
from dualproxy.http.settings import RelaySettings, Tally
from dualproxy.http.tunnel import TunnelResult, relay_tunnel
from dualproxy.http.upstream import UpstreamConnection
from dualproxy.tls.streams import RECEIVE_SIZE, TlsStream

if TYPE_CHECKING:
    from dualproxy.config.schema import Limits

# What the server uses: the connection, its settings and record, and (from lifecycle) what
# all connections share.
__all__ = [
    "DEPARTURE_CHECK_SECONDS",
    "ClientConnection",
    "Departures",
    "Drain",
    "RelaySettings",
    "Tally",
]

# The interim answer to Expect: 100-continue, sent when we start reading the body.
_CONTINUE: Final = response_head(HTTPStatus.CONTINUE, b"Continue", [])


class _ClientGone(Exception):
    """The client closed its side mid-request."""


class _Restart(Exception):
    """The connection's scope was cancelled just after an idle wait returned a request: the
    request is served in a new scope (a cancelled scope cannot be used again)."""


class _Park(Exception):
    """The connection parks as soon as it is idle (the server holds many idle connections:
    `Drain.crowded`)."""


class ClientConnection:
    """Serves one client connection until it ends; see the module docstring. Slotted: a
    parked connection (serve.parking) is mostly this object, which a dict would double."""

    __slots__ = (
        "_bounds",
        "_buffer",
        "_bytes_out",
        "_client",
        "_client_left",
        "_deadline",
        "_departures",
        "_drain",
        "_eof",
        "_exchange",
        "_fd",
        "_head_at",
        "_idle_until",
        "_keep_alive",
        "_limits",
        "_now",
        "_park_requested",
        "_read_at",
        "_request_read",
        "_requests",
        "_scope",
        "_settings",
        "_status",
        "_stream",
        "_tally",
        "_tls",
        "_tunneled",
        "_upstream_seconds",
        "_wait",
        "client_may_be_sending",
        "idle_since",
        "parked",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        peer: IPAddress | None,
        settings: Callable[[], RelaySettings | None],
        drain: Drain,
        tally: Tally,
        response_headers: Sequence[tuple[bytes, bytes]] = (),
        departures: Departures | None = None,
        client_fd: int = -1,
        upstream_detail: bool = False,
    ) -> None:
        """`departures` and `client_fd` (the client socket's descriptor): where this client
        waits to be looked at for having left while the upstream works (see Departures);
        without both, nobody looks (a stream without a socket of its own).
        `upstream_detail`: a 502/504 body says what failed (dev mode), else it is generic."""
        self._stream = stream
        # The stream as TLS, for a last response that carries our close_notify.
        self._tls = stream if isinstance(stream, TlsStream) else None
        self._departures: dict[int, Leaver] = (
            departures.waiting if departures is not None and client_fd >= 0 else {}
        )
        self._fd = client_fd
        self._client_left = False  # Departures saw the client go while it waited
        self._client = ClientSide(
            ClientPeer.of(peer) if peer is not None else None,
            tuple(response_headers),
            upstream_detail,
        )
        self._settings = settings
        self._drain = drain
        self._tally = tally
        self._buffer = bytearray()  # received from the client and not yet consumed
        self._eof = False  # the client closed its side
        self._requests = 0
        self._request_read = False  # the current request's head and body were read to the end
        # Set when the connection ended on a refusal, or on an upstream's early answer, that
        # the caller should close with a lingering close: see `serve`.
        self.client_may_be_sending = False
        self._keep_alive = False  # the exchange just finished leaves the connection open
        # The connection's one cancel scope (made by `serve`): `_bound` moves its deadline to
        # each wait's own and records which wait it is, so that an expiry is answered as that
        # wait's (exchange.expired).
        self._scope: trio.CancelScope
        self._deadline = math.inf  # the scope's, mirrored
        self._wait = Wait.FIRST_REQUEST
        self._now = trio.lowlevel.current_clock().current_time
        self._read_at = 0.0  # when `_bound` last read the clock
        self._limits: Limits | None = None  # the current request's
        self._bounds: tuple[float, ...] = ()  # their wait_bounds
        self._exchange: Exchange | None = None  # the current request's, once its head is read
        # The current exchange, for its access log line (Tally.exchange_ended): when its head
        # started, the status and body bytes sent, the upstream's time to the response head.
        self._head_at = 0.0
        self._status = self._bytes_out = 0
        self._upstream_seconds: float | None = None
        self._tunneled: TunnelResult | None = None  # a WebSocket's, once it ended
        # Parking (serve.parking): when the current kept-alive wait began; whether the
        # parking lot asked for the task to be given up; set by `serve` when it was (the
        # caller then parks the connection); the parked wait's deadline, which a resumed
        # `serve` keeps (0: none).
        self.idle_since = 0.0
        self._park_requested = False
        self.parked = False
        self._idle_until = 0.0

    async def serve(self) -> None:
        """Relay requests until the client leaves, asks to close, or something fails.

        The caller closes the stream (with a close_notify) afterwards, except after a cut,
        which closes it here at once; when `client_may_be_sending` is then set, with a
        lingering close (see the module docstring). Raises trio.BrokenResourceError and
        trio.ClosedResourceError when the client disappears.

        Or, when the parking lot asked for it (`request_park`) while the connection waited for
        its next request, or at the start of that wait when the server holds many idle
        connections (`Drain.crowded`), it returns with `parked` set, the stream open: the
        caller parks it, and a later `serve` (in another task) goes on with that wait.
        """
        ending: HttpRefusal | Cut | None = None
        self.parked = False
        # Bounded: each round but the last serves a request (see _Restart).
        for _ in range(MAX_REQUESTS_PER_CONNECTION):
            # Made with the deadline of the wait that comes first, for the next request's head,
            # which then keeps it (DEADLINE_SLACK).
            self._deadline = self._idle_until or self._idle_deadline()
            self._scope = trio.CancelScope(deadline=self._deadline)
            self._park_requested = False
            try:
                with self._scope:
                    ending = await self._serve_requests()
            except _Restart:
                continue
            except _Park:
                self.parked = True
                self._exchange = None
                return
            if self._scope.cancelled_caught:
                if self._park_requested and self._now() < self._deadline:
                    assert self._tls is not None  # request_park says so
                    if self._tls.pending():  # bytes came as the wait was cancelled
                        continue
                    self.parked = True
                    self._idle_until = self._deadline
                    self._exchange = None  # the last request's, no longer needed
                    return
                ending = self._expired()
            break
        if isinstance(ending, HttpRefusal):
            problem = f"{ending.status} {ending.problem}"
            self._tally.note(problem)
            self._tally.response_generated(ending.status)
            self._status = ending.status
            await self._refuse(ending)
            self._log_exchange(problem)
        elif isinstance(ending, Cut):
            self._tally.note(ending.problem)
            self._log_exchange(ending.problem)
            await trio.aclose_forcefully(self._stream)

    async def _serve_requests(self) -> HttpRefusal | Cut | None:
        """The requests in turn, within the connection's scope; how the last one failed."""
        for _ in range(MAX_REQUESTS_PER_CONNECTION):
            settings = self._settings()
            if settings is None:  # a reload removed [upstream]: new connections get the rest
                return None
            self._limits, self._bounds = settings.limits, settings.bounds
            self._exchange = None
            self._keep_alive = False
            self._request_read = False
            self._status = self._bytes_out = 0
            self._upstream_seconds = None
            try:
                head = await self._receive_head(settings)
                if head is None:
                    return None
                self._request_read = not (head.chunked or head.content_length)
                self._requests += 1
                self._tally.request_received()
                exchange = self._exchange = Exchange(head, self._client, self._requests)
                # A reload may have come while the connection idled: the request goes where
                # the config says now.
                current = self._settings()
                if current is not None:
                    self._limits, self._bounds = current.limits, current.bounds
                endpoint = exchange.route(current)
                assert current is not None  # route refused the request otherwise
                if endpoint is not None:
                    await self._answer_locally(exchange, endpoint)
                elif (cut := await self._relay(exchange, current)) is not None:
                    return cut
                self._log_exchange(None)
            except HttpRefusal as refusal:
                return refusal
            except _ClientGone:
                self._tally.note(CLIENT_CLOSED_MID_REQUEST)
                self._log_exchange(CLIENT_CLOSED_MID_REQUEST)
                return None
            if not self._keep_alive:
                return None
        return None

    # --- the request ---------------------------------------------------------------------

    async def _receive_head(self, settings: RelaySettings) -> RequestHead | None:
        """Read and check the next request head; None when the connection ends quietly."""
        buffer = self._buffer
        if not buffer:
            if self._eof or self._drain.draining:
                return None
            # The first request's wait counts towards its header timeout; a kept-alive
            # connection may idle longer, and its next head's clock starts at its first byte.
            first = self._requests == 0
            if self._idle_until:  # resumed from the parking lot: the wait goes on, as bound
                self._wait, self._idle_until = Wait.NEXT_REQUEST, 0.0
                waited_from = self._now()
            else:
                waited_from = self.idle_since = self._bound(self._idle_wait())
                if (
                    not first
                    and self._tls is not None
                    and self._drain.crowded
                    and not self._tls.pending()
                ):
                    self._idle_until = self._deadline  # the wait, as bound, goes on parked
                    raise _Park
            self._drain.enter_idle(
                self._scope,
                reclaimable=not first,
                parkable=self if self._tls is not None and not first else None,
            )
            try:
                chunk = await self._stream.receive_some(RECEIVE_SIZE)
            finally:
                self._drain.leave_idle(self._scope)
            if not chunk:  # closed by the client
                return None
            buffer += chunk
            now = self._now()
            if self._scope.cancel_called or self._drain.draining or now >= self._deadline:
                # The drain, a reclaim at the connection limit, or the deadline came just as
                # the request did and may have cancelled the scope already: the request is
                # served, in a fresh one.
                raise _Restart
            started = waited_from if first else now
        else:  # a pipelined request, already here
            started = self._now()
        head_limits = settings.head_limits
        end = find_head_end(buffer, head_limits)
        if end is None:  # the head is still coming (usually it came whole, in one read)
            end = await self._receive_rest_of_head(head_limits, started)
            if end is None:
                return None
        head = bytes(buffer[:end])
        del buffer[:end]  # what follows is the body, or a pipelined next request
        self._head_at = started
        return check_request_head(head, head_limits)

    async def _receive_rest_of_head(self, head_limits: HeadLimits, started: float) -> int | None:
        """Read into the buffer until the head is complete: its end, or None when the client
        closed mid-head (nobody left to answer). 408 after request_header_timeout in all."""
        buffer = self._buffer
        searched = len(buffer)  # find_head_end resumes where the previous call left off
        self._bound_from(Wait.CLIENT_HEAD, started)
        while True:  # bounded: find_head_end raises at max_header_bytes; and the deadline
            chunk = await self._stream.receive_some(RECEIVE_SIZE)
            if not chunk:
                self._eof = True
                return None
            buffer += chunk
            end = find_head_end(buffer, head_limits, start=searched)
            if end is not None:
                return end
            searched = len(buffer)

    async def _relay(self, exchange: Exchange, settings: RelaySettings) -> Cut | None:
        """Relay one routed request and its response; the cut that ended it, if one did."""
        request = exchange.upstream_request()
        method = exchange.head.method
        pool = settings.pool
        for attempt in range(2):  # the second only for the stale-connection retry
            # Before the pool may connect (within its connect_timeout): the deadline of the
            # wait for this request must not expire as if the connection still idled.
            now = self._bound(Wait.UPSTREAM_SEND)
            try:
                # The first attempt of a request that may be sent again takes an idle
                # connection without the pool's look at it (the retry rule).
                check = attempt > 0 or not exchange.replayable
                upstream = await pool.acquire(now, check=check)
            except HttpRefusal as failure:
                return _cut_or_raise(exchange.upstream_failed(failure), failure)
            try:
                early = None
                if exchange.has_body:
                    early = await self._forward_body(upstream, request, exchange)
                else:
                    await upstream.send_request(request, bounded=False)
                sent = self._bound(Wait.UPSTREAM_HEAD)
                if early is not None:
                    response = early
                else:
                    self._departures[self._fd] = self
                    try:
                        response = await upstream.receive_head(
                            timeout=None, request_method=method, upgrading=exchange.upgrading
                        )
                    finally:
                        self._departures.pop(self._fd, None)
                upstream_seconds = self._upstream_seconds = self._now() - sent
                self._tally.response_relayed(response.status, upstream_seconds)
                if response.status == HTTPStatus.SWITCHING_PROTOCOLS:  # asked for: upgrading
                    await self._tunnel(upstream, response, exchange, settings)
                    return None
                # _respond releases or discards the upstream connection itself.
                return await self._respond(upstream, response, exchange, settings)
            except HttpRefusal as failure:
                pool.discard(upstream)
                if failure.fault != "upstream":
                    raise
                if exchange.may_replay(failure, reused=upstream.reused, attempt=attempt):
                    continue
                return _cut_or_raise(exchange.upstream_failed(failure), failure)
            except BaseException:
                pool.discard(upstream)  # closing twice is harmless
                raise
        raise AssertionError("unreachable: the second attempt is never replayed")

    async def _forward_body(
        self, upstream: UpstreamConnection, request: bytes, exchange: Exchange
    ) -> ResponseHead | None:
        """Send the request head and stream the client's body after it (see _stream_body).
        None once all of it went; the upstream's response when the upstream broke the
        connection before taking it all, having answered first (an answer that needs no body:
        401, 413). Its failure when it had not."""
        try:
            await self._stream_body(upstream, request, exchange)
        except HttpRefusal as failure:
            if failure.fault != "upstream":
                raise
            # What it sent before it went is still in our socket: the response, if any.
            self._bound(Wait.UPSTREAM_HEAD)
            try:
                response = await upstream.receive_head(
                    timeout=None, request_method=exchange.head.method
                )
            except HttpRefusal:
                raise failure from None
            self._tally.note(EARLY_ANSWER)
            return response
        return None

    async def _stream_body(
        self, upstream: UpstreamConnection, request: bytes, exchange: Exchange
    ) -> None:
        """Send the request head and stream the client's body after it, as the exchange
        frames it; what the client already sent goes with the head, in one write."""
        reader = await self._body_reader(exchange)
        buffer = self._buffer
        out = [request]
        first = True
        while True:  # bounded: the exchange's cap, and body_timeout for each read
            piece = reader.read(buffer)
            if piece is None:
                if out:
                    await self._send_upstream(upstream, out, first)
                    out, first = [], False
                await self._receive_body_bytes()
                continue
            if piece is END:
                self._request_read = True
                if end := exchange.request_end():
                    out.append(end)
                if out:
                    await self._send_upstream(upstream, out, first)
                return
            out.append(exchange.request_data(piece))

    async def _body_reader(self, exchange: Exchange) -> BodyReader:
        """The reader for the request's body, once 100 Continue went out if it was asked for
        (we are about to read the body, RFC 9110 §10.1.1)."""
        if exchange.continue_first:
            self._bound(Wait.CLIENT_SEND)
            await self._stream.send_all(_CONTINUE)
        head = exchange.head
        return body_reader(head.content_length, chunked=head.chunked, sender="client")

    async def _receive_body_bytes(self) -> None:
        """More of the body into the buffer, within body_timeout; _ClientGone when the client
        closed though the body's framing says more is coming."""
        self._bound(Wait.CLIENT_BODY)
        chunk = await self._stream.receive_some(RECEIVE_SIZE)
        if not chunk:
            self._eof = True
            raise _ClientGone
        self._buffer += chunk

    async def _send_upstream(
        self, upstream: UpstreamConnection, out: list[bytes], first: bool
    ) -> None:
        self._bound(Wait.UPSTREAM_SEND)
        data = b"".join(out) if len(out) > 1 else out[0]
        if first:
            await upstream.send_request(data, bounded=False)
        else:
            await upstream.send(data, bounded=False)

    # --- requests dualproxy answers itself ------------------------------------------------

    async def _answer_locally(self, exchange: Exchange, endpoint: Endpoint) -> None:
        """Answer a request for a local endpoint (http.local) here, never upstream: its body
        read within the exchange's cap, the answer sent as the exchange says."""
        content = b""
        if exchange.has_body:
            content = await self._read_body(exchange)
        head = exchange.head
        peer = self._client.peer
        request = LocalRequest(
            head.method, head.target, head.headers, peer.address if peer else None, content
        )
        # Bounded like a send: the endpoint may write to disk in a worker thread.
        self._bound(Wait.CLIENT_SEND)
        answer = await endpoint.answer(request)
        self._tally.response_generated(answer.status)
        start, content = exchange.answer_locally(answer, draining=self._drain.draining)
        self._status, self._bytes_out = answer.status, len(content)
        status, reason, lines, fields, _, keep_alive = start
        data = response_head(status, reason, fields, lines=lines) + content
        await self._send_client([data], last=not keep_alive)
        self._keep_alive = keep_alive

    async def _read_body(self, exchange: Exchange) -> bytes:
        """The request's whole body (trailers dropped); 413 once it grows past the cap."""
        reader = await self._body_reader(exchange)
        buffer = self._buffer
        content = bytearray()
        while True:  # bounded: the exchange's cap, and body_timeout for each read
            piece = reader.read(buffer)
            if piece is None:
                await self._receive_body_bytes()
                continue
            if piece is END:
                self._request_read = True
                exchange.request_end()
                return bytes(content)
            content += exchange.request_data(piece)

    # --- the response --------------------------------------------------------------------

    async def _respond(
        self,
        upstream: UpstreamConnection,
        response: ResponseHead,
        exchange: Exchange,
        settings: RelaySettings,
    ) -> Cut | None:
        """Send the upstream's response to the client, within the exchange's cancel scope;
        the upstream connection goes back to the pool only when both sides finished cleanly.
        Returns the cut for an upstream that fails now; raises no HttpRefusal."""
        finished = False
        try:
            start = exchange.respond(response, draining=self._drain.draining)
            status, reason, lines, fields, framing, keep_alive = start
            self._status = status
            if not exchange.request_read:  # an early answer: the client may still be sending
                self.client_may_be_sending = client_may_be_sending(
                    request_read=False, eof=self._eof, buffered=bool(self._buffer)
                )
            chunked = framing is Framing.CHUNKED
            # Bytes for the client are collected while the upstream's next piece is already
            # buffered, and sent before any read that may wait: a typical API response (head
            # and body in one upstream read) costs one TLS record and one send, and the head
            # of a slow or streamed body is never held back.
            out = [response_head(status, reason, fields, lines=lines)]
            pending = len(out[0])
            while True:  # bounded: the upstream's framing, upstream_timeout per read
                try:
                    piece = upstream.buffered_body()
                except HttpRefusal:
                    piece = None  # receive_body reports it, after what came is sent
                if piece is None:
                    if out:
                        await self._send_client(out)
                        out, pending = [], 0
                    self._bound(Wait.UPSTREAM_BODY)
                    piece = await upstream.receive_body(timeout=None)
                if piece is END:
                    break
                out.append(encode_chunk(piece) if chunked else piece)
                pending += len(piece)
                self._bytes_out += len(piece)
                if pending >= RECEIVE_SIZE:
                    await self._send_client(out)
                    out, pending = [], 0
            if chunked:  # the upstream's trailers are dropped
                out.append(LAST_CHUNK)
            if out:
                await self._send_client(out, last=not keep_alive)
            finished = True
            self._keep_alive = keep_alive
        except HttpRefusal as failure:
            return _cut_or_raise(exchange.upstream_failed(failure), failure)
        finally:
            if finished:  # pooled again if reusable() (nothing past the response), else closed
                settings.pool.release(upstream, self._read_at)
            else:
                settings.pool.discard(upstream)
        return None

    async def _tunnel(
        self,
        upstream: UpstreamConnection,
        response: ResponseHead,
        exchange: Exchange,
        settings: RelaySettings,
    ) -> None:
        """The upstream switched to WebSocket: its 101 to the client, then bytes both ways
        (http.tunnel, bounded by its own idle timeout) until either side closes."""
        try:
            status, reason, lines, fields, _, _ = exchange.switch(response)
            self._status = status
            await self._send_client([response_head(status, reason, fields, lines=lines)])
            stream, pending = upstream.tunnel()
            client_pending = bytes(self._buffer)
            self._buffer.clear()
            self._set_deadline(math.inf)
            self._tunneled = await relay_tunnel(
                self._stream,
                client_pending,
                stream,
                pending,
                idle_timeout=settings.limits.websocket_idle_timeout,
            )
        finally:
            settings.pool.discard(upstream)
        self._keep_alive = False

    async def _send_client(self, out: list[bytes], *, last: bool = False) -> None:
        """Send to the client; `last`: the connection's final bytes, its TLS close_notify
        going with them."""
        self._bound(Wait.CLIENT_SEND)
        data = b"".join(out) if len(out) > 1 else out[0]
        if last and self._tls is not None:
            await self._tls.send_all(data, then_close_notify=True)
        else:
            await self._stream.send_all(data)

    # --- waits ---------------------------------------------------------------------------

    def _bound(self, wait: Wait) -> float:
        """Bound `wait`, about to start, by its timeout from now, moving the connection
        scope's deadline (not pushed back by less than DEADLINE_SLACK); the time it read."""
        self._wait = wait
        self._read_at = now = self._now()
        deadline = now + self._bounds[wait]
        current = self._deadline
        if deadline < current or deadline - current > DEADLINE_SLACK:
            self._set_deadline(deadline)
        return now

    def _bound_from(self, wait: Wait, started: float) -> None:
        """Bound `wait` by its timeout from `started`, exactly: a total, however many reads."""
        self._wait = wait
        self._set_deadline(started + self._bounds[wait])

    def _idle_wait(self) -> Wait:
        """The wait for the next request's first byte."""
        return Wait.FIRST_REQUEST if self._requests == 0 else Wait.NEXT_REQUEST

    def _idle_deadline(self) -> float:
        """When that wait would end, were it to start now."""
        settings = self._settings()
        return math.inf if settings is None else self._now() + settings.bounds[self._idle_wait()]

    def _set_deadline(self, deadline: float) -> None:
        self._scope.deadline = self._deadline = deadline

    @property
    def tls_stream(self) -> TlsStream | None:
        """The client's stream, when it is TLS (only such connections park)."""
        return self._tls

    @property
    def parked_until(self) -> float:
        """When the wait that parked ends (its keep-alive deadline, trio's clock)."""
        return self._idle_until

    def request_park(self) -> None:
        """The parking lot's request, while the connection waits for its next request (the
        drain names it then: `Drain.to_park`): end that wait, and `serve` with it, so that
        the connection idles without a task."""
        self._park_requested = True
        self._scope.cancel()

    def client_left(self) -> None:
        """The client closed while it waited for the upstream's response head (Departures):
        that wait ends now, and with it the connection."""
        self._client_left = True
        self._scope.cancel()

    def _expired(self) -> HttpRefusal | Cut | None:
        """What it means that the connection's scope ended, by the wait it was in (None:
        close quietly)."""
        if self._client_left:
            return CLIENT_LEFT
        assert self._limits is not None
        return expired(self._wait, self._limits)

    def _log_exchange(self, ended: str | None) -> None:
        """The current exchange is over: its line for the access log (through the Tally)."""
        exchange = self._exchange
        method, target, version, received = b"-", b"-", b"1.1", 0
        if exchange is not None:
            head = exchange.head
            method, target, version, received = (
                head.method,
                head.target,
                head.version,
                exchange.received,
            )
        if (tunneled := self._tunneled) is not None:  # a WebSocket: its bytes, how it ended
            self._tunneled = None
            received, self._bytes_out = tunneled.bytes_up, tunneled.bytes_down
            assert self._limits is not None
            ended = ended or tunneled.ending(self._limits.websocket_idle_timeout)
        self._tally.exchange_ended(
            method,
            target,
            version,
            self._status,
            received,
            self._bytes_out,
            self._now() - self._head_at,
            self._upstream_seconds,
            ended,
        )

    # --- refusing ------------------------------------------------------------------------

    async def _refuse(self, refusal: HttpRefusal) -> None:
        """Answer `refusal` (nothing of a response went yet); a client that does not take it
        within send_timeout is cut."""
        limits = self._limits
        assert limits is not None
        exchange = self._exchange
        head_only = exchange is not None and exchange.head.method == b"HEAD"
        (status, reason, lines, fields, _, _), content = refusal_response(
            refusal, head_only=head_only, upstream_detail=self._client.upstream_detail
        )
        data = response_head(status, reason, fields, lines=lines) + content
        self._bytes_out = len(content)
        with trio.move_on_after(limits.send_timeout) as scope:
            await self._stream.send_all(data)
        if scope.cancelled_caught:
            await trio.aclose_forcefully(self._stream)
            return
        self.client_may_be_sending = client_may_be_sending(
            request_read=self._request_read, eof=self._eof, buffered=bool(self._buffer)
        )


def _cut_or_raise(ending: HttpRefusal | Cut, failure: HttpRefusal) -> Cut:
    """What the exchange made of the upstream's `failure`: a cut, returned, or a refusal,
    raised."""
    if isinstance(ending, Cut):
        return ending
    raise ending from failure
