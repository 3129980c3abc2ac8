"""One client connection, relayed: HTTP/1.1 from the client to the upstream and back.

Theory of operation. Each request on the client's (TLS) stream goes through, in order:

1. **wait**: before the first byte of a request the connection is idle. The wait is bounded
   (request_header_timeout for the first request, keepalive_timeout for the next ones) and
   registered with the `Drain`, which cancels it when the server shuts down. Either way the
   connection closes silently: no request was started, so there is nobody to answer.
2. **head**: raw bytes are read (RECEIVE_SIZE at a time) until `find_head_end` finds the
   blank line; it raises 414/431 when the head outgrows its limits, and the whole head must
   arrive within request_header_timeout (408), however slowly it trickles: counted from its
   first byte, or for a connection's first request from the end of the TLS handshake.
3. **check**: `check_request_head` refuses, with the status it names, every head a lenient
   parser would let through but that an upstream could read differently (smuggling shapes) or
   that we do not relay (CONNECT, TRACE: 405). A refused request never costs a byte upstream.
4. **size**: a Content-Length above max_body_bytes is refused with 413, still before anything
   goes upstream.
   A request for a path dualproxy answers itself (the pin manifest, pin-failure reports:
   `settings.local`, endpoints.py) stops here: its body is read within the endpoint's cap and
   the answer is sent with the keep-alive rules below (`_answer_locally`). Every other
   request pays one `startswith` against the endpoints' common prefix for it.
5. **relay**: an upstream connection from the pool gets a request with rewritten headers
   (`upstream_request_headers`) and framing we write ourselves, then the body, streamed
   (`Expect: 100-continue` is answered here, when we start reading the body, and never
   forwarded; trailers are dropped). Then the response head, rewritten the same way, and its
   body, streamed back.

Who owns which bytes. The relay reads the client stream into its own buffer as bytes arrive;
the head is cut from its front, checked once (`check_request_head`) and drives the request: no
second parser reads it. Body bytes are taken from the buffer by an `http1` reader for the head's
framing; bytes of a pipelined next request stay in the buffer, where the next cycle's head
search starts. The upstream side is `upstream.UpstreamConnection`, which reads the response the
same way. We write both sides ourselves (`http1`): the request head goes upstream together with
the body bytes that came with it, in one write. Bodies pass through a receive at a time: memory
per connection is about one receive of each side, because `send_all` does not return until the
peer's socket took the bytes (a client that stops reading stops us reading the upstream, and
send_timeout ends it). Toward the client, what the upstream connection already holds
(typically a whole small response: head, body, end) is written together, in one TLS record and
one send; anything that would need another upstream read is preceded by a send, so a streamed
response is never held back.

Waits cost little. A connection runs in one cancel scope whose deadline moves to each wait's
own bound (`_wait`; not pushed back by less than DEADLINE_SLACK, as nginx's lazy timers), and
an expiry is translated by the wait it was in (`_expired`): a silent close when idle, 408,
504, or a cut. The drain cancels the scope while the connection idles; a request that arrived
just as it did is still served, in a new scope (`_Restart`). Nothing yields without I/O to do.

The retry rule. A pooled connection may have been closed by the upstream while it sat idle;
that shows as a failure before any response byte (an upstream_timeout is not such a failure,
and is never retried: the upstream may still be working on the request). Only then, only on
a *reused* connection, and only for an idempotent method (GET, HEAD, OPTIONS, PUT, DELETE)
sent without a body, the request is sent once more on another connection. Such a request's
first attempt takes an idle connection without the pool's look at its socket (a system call
per request): a closed one fails, and the retry, on a checked connection, answers. A request
whose body bytes went out is never sent again: we cannot replay a stream, nor know what the
upstream did with it.

What happens on each failure:
- client's fault before the response (bad head, too large, too slow): its 4xx, short plain
  text, `Connection: close`, and the connection ends;
- upstream's fault before the response head (refused, reset, bad TLS, malformed or smuggling
  response head, upstream_timeout): 502 or 504 the same way;
- the upstream answered before taking the whole body, then closed or reset the connection (a
  401 or 413 from a server that does not read what it refuses): its answer, read from what it
  sent before the connection broke, is relayed like any response, and the connection ends
  after it (the rest of the body was never read). An upstream that answers early but keeps
  the connection open without reading is not told apart: 504 after upstream_timeout;
- after either, when the client may still be sending (the refused request was not read to its
  end, or bytes past it had arrived), the server closes with a *lingering close*
  (`client_may_be_sending`, `server.lingering_close`): a socket closed with unread bytes sends
  a TCP reset, which can destroy our answer before the client reads it, so the server sends
  close_notify and a FIN, then reads and discards until the client closes, within bounds;
- anything after the response head went out (upstream reset or stalled mid-body, client not
  reading for send_timeout): the client connection is cut without a final chunk and without a
  TLS close_notify, so the client sees a truncated response, never a complete-looking one;
- client gone at any point: the upstream connection is discarded; while the upstream works on
  the response head, the client's close is noticed within DEPARTURE_CHECK_SECONDS, not only
  when the answer comes (`Departures`; nginx's 499);
- in every case but a cleanly finished exchange the upstream connection is discarded, never
  returned to the pool.

Keep-alive (RFC 9112 §9.3): the connection closes after a request with `Connection: close` or
in HTTP/1.0 (whose keep-alive extension we do not implement), after a body we could only end by
closing (a body of unknown length to an HTTP/1.0 client), while the server drains and after a
connection's MAX_REQUESTS_PER_CONNECTION-th request; the response then says `Connection: close`.
Logging is per connection (the server's record, through `Tally`), never per request.
"""

from __future__ import annotations

import enum
import math
import select
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from types import TracebackType
from typing import TYPE_CHECKING, Final, Literal, Protocol

import trio

from dualproxy.config import ConfigError
from dualproxy.http import body as http1
from dualproxy.http.errors import HttpRefusal, timeout_problem
from dualproxy.http.heads import (
    HeadLimits,
    RequestHead,
    ResponseHead,
    check_request_head,
    find_head_end,
    request_head,
    response_head,
)
from dualproxy.http.rewrite import (
    ClientPeer,
    ForwardingRules,
    client_response_lines,
    upstream_request_lines,
)
from dualproxy.http.upstream import UpstreamConnection, UpstreamPool
from dualproxy.pinning.endpoints import Endpoint, LocalEndpoints, LocalRequest
from dualproxy.rotation.policy import IPAddress
from dualproxy.tls.streams import RECEIVE_SIZE, TlsStream

if TYPE_CHECKING:
    from dualproxy.config import Config, Limits

# What we relay; the answer to CONNECT and TRACE (405) says so (RFC 9110 15.5.6).
ALLOWED_METHODS: Final = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
# Idempotent methods (RFC 9110 9.2.2): sent again on a fresh connection when a reused one
# failed before any response, provided the request had no body (see the retry rule above).
REPLAYABLE_METHODS: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE"})
# Requests served on one client connection, the last one answered with Connection: close
# (nginx's keepalive_requests default): it bounds what one connection's lifetime holds, and
# lets the kernel spread long-lived clients across the processes sharing the port.
MAX_REQUESTS_PER_CONNECTION: Final = 1000
# Methods whose request means a body: without one, the upstream still gets Content-Length: 0,
# because Google's front ends, like many servers, answer 411 to a POST without it.
_BODY_METHODS: Final = frozenset({b"POST", b"PUT", b"PATCH"})
# How much later than its deadline a wait may be allowed to end, in seconds, so that a wait
# following another within this long keeps the deadline already set: moving a trio deadline
# costs more than a fast exchange's socket calls, and an exchange has several waits. So an
# inactivity timeout may end a wait up to this much early, never late; nginx does the same with
# its timers (NGX_TIMER_LAZY_DELAY, 300 ms).
DEADLINE_SLACK: Final = 0.3
# Plain ints: an HTTPStatus member costs an enum lookup at each use, and this is per response.
_OK: Final = int(HTTPStatus.OK)
_NO_BODY_STATUSES: Final = frozenset({int(HTTPStatus.NO_CONTENT), int(HTTPStatus.NOT_MODIFIED)})
# The interim answer to Expect: 100-continue, sent when we start reading the body.
_CONTINUE: Final = response_head(HTTPStatus.CONTINUE, b"Continue", [])


class Tally(Protocol):
    """What the relay reports about its connection (the server's ConnectionRecord)."""

    def request_received(self) -> None:
        """A request head passed the checks."""

    def note(self, detail: str) -> None:
        """Why the connection ended early (logged once, with the connection)."""

    def response_relayed(self, status: int, upstream_seconds: float) -> None:
        """An upstream response head arrived, `upstream_seconds` after the request was sent;
        called once per response, so it must cost a few integer operations at most."""

    def response_generated(self, status: int) -> None:
        """The relay answered the client itself (a refusal: 4xx, 502, 504)."""


# How often the clients waiting for an upstream's response are looked at for having left: a
# gone client holds its upstream connection this long at most; a look is one poll(2) for all.
DEPARTURE_CHECK_SECONDS: Final = 1.0
# poll(2)'s word for a peer that closed or reset: POLLRDHUP (Linux) is its FIN, which plain
# readability cannot tell from bytes; elsewhere only a reset or an error shows.
_HUNG_UP: Final = select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0)


class Departures:
    """Clients waiting for an upstream's response head, looked at for having left.

    A response can take the upstream a while (upstream_timeout, 60 s by default), and a client
    that closes meanwhile would otherwise be noticed only when its answer is sent. Like nginx
    (a 499), the exchange then ends at once and its upstream connection is closed, never
    pooled: the upstream sees the close and may stop working for nobody. One per server; its
    `check`, every DEPARTURE_CHECK_SECONDS, looks at every waiting client in one poll(2), so a
    request pays for two dict operations only. A client that closes only its sending side
    counts as gone too (as in nginx), which RFC 9112 §9.6 asks clients not to do.
    """

    def __init__(self) -> None:
        self.waiting: dict[int, ClientConnection] = {}  # by the client socket's descriptor

    def check(self) -> int:
        """End the wait of every client that left; how many did."""
        waiting = self.waiting
        if not waiting:
            return 0
        poller = select.poll()
        for fd in waiting:
            poller.register(fd, _HUNG_UP)
        gone = 0
        for fd, events in poller.poll(0):
            if events & _HUNG_UP and (relay := waiting.pop(fd, None)) is not None:
                relay.client_left()
                gone += 1
        return gone


class Drain:
    """Graceful shutdown as relays see it; one per server, shared by all its connections.

    Once `start()` is called, connections waiting for a request (idle keep-alive ones, and
    new ones that have not sent a byte yet) close at once, and busy ones finish their
    exchange with `Connection: close` on the response.
    """

    def __init__(self) -> None:
        self.draining = False
        self._idle: set[trio.CancelScope] = set()

    def start(self) -> None:
        self.draining = True
        for scope in self._idle:
            scope.cancel()

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    def enter_idle(self, scope: trio.CancelScope) -> None:
        """`scope` waits for a request: the drain cancels it (at once, if it has started)."""
        if self.draining:
            scope.cancel()
        self._idle.add(scope)

    def leave_idle(self, scope: trio.CancelScope) -> None:
        self._idle.discard(scope)

    def idle(self, timeout: float) -> IdleWait:
        """A cancel scope for waiting on a quiet connection: it ends after `timeout`, or as
        soon as the drain starts (at once, when it already has)."""
        return IdleWait(self, trio.CancelScope(deadline=trio.current_time() + timeout))


class IdleWait:
    """`Drain.idle`'s context manager: its scope is cancelled by the drain while entered.

    A class rather than a generator context manager: every kept-alive request waits in one,
    and a generator's resumption costs more than the rest of the wait's bookkeeping.
    """

    __slots__ = ("_drain", "_scope")

    def __init__(self, drain: Drain, scope: trio.CancelScope) -> None:
        self._drain = drain
        self._scope = scope

    def __enter__(self) -> trio.CancelScope:
        self._drain.enter_idle(self._scope)
        return self._scope.__enter__()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        try:
            return self._scope.__exit__(exc_type, exc, traceback)
        finally:
            self._drain.leave_idle(self._scope)


@dataclass(frozen=True, slots=True)
class RelaySettings:
    """What requests are relayed with; the server builds a new one when a reload changes it,
    and each request uses the one current when its head arrived."""

    limits: Limits
    head_limits: HeadLimits
    rules: ForwardingRules
    pool: UpstreamPool
    # Paths dualproxy answers itself (the pin manifest, pin-failure reports), never relayed.
    local: LocalEndpoints | None = None

    @classmethod
    def build(
        cls,
        config: Config,
        pool: UpstreamPool | None = None,
        local: LocalEndpoints | None = None,
    ) -> RelaySettings:
        """Settings for `config` (which has an upstream), with `pool` or a new one.

        Raises ConfigError for an [upstream] that cannot be served: an added header that
        dualproxy manages itself, an unusable ca_file. A new pool loads the system's CA store:
        call this from a worker thread once the server runs.
        """
        upstream = config.upstream
        assert upstream is not None
        try:
            rules = ForwardingRules.from_config(upstream)
            if pool is None:
                pool = UpstreamPool(upstream, config.limits)
        except ValueError as exc:
            raise ConfigError("", str(exc), file=config.path) from None
        except ConfigError as exc:
            raise ConfigError(exc.key_path, exc.problem, file=config.path) from None
        return cls(
            limits=config.limits,
            head_limits=HeadLimits.from_limits(config.limits),
            rules=rules,
            pool=pool,
            local=local,
        )


class _Cut(Exception):
    """The response cannot be completed (or even started): close the client connection
    abruptly, so that what it got cannot pass for a whole response."""


class _ClientGone(Exception):
    """The client closed its side mid-request."""


class _Restart(Exception):
    """The connection's scope was cancelled just after an idle wait returned a request: the
    request is served in a new scope (a cancelled scope cannot be used again)."""


class _Phase(enum.Enum):
    """The wait the connection's cancel scope currently bounds (see `ClientConnection._wait`)."""

    IDLE = enum.auto()  # request_header_timeout or keepalive_timeout, or the drain: silent close
    CLIENT_HEAD = enum.auto()  # the rest of a head, request_header_timeout in all: 408
    CLIENT_BODY = enum.auto()  # body_timeout: 408
    CLIENT_SEND = enum.auto()  # send_timeout: cut
    UPSTREAM_SEND = enum.auto()  # upstream_timeout: 504 (or the stale retry)
    UPSTREAM_HEAD = enum.auto()  # upstream_timeout: 504 (or the stale retry)
    UPSTREAM_BODY = enum.auto()  # upstream_timeout: cut


def error_response(status: int, problem: str, *, head_only: bool = False) -> bytes:
    """A short plain-text response that closes the connection; `head_only` for HEAD."""
    phrase = HTTPStatus(status).phrase
    body = f"{status} {phrase}: {problem}\n".encode("ascii", "backslashreplace")
    head = (
        f"HTTP/1.1 {status} {phrase}\r\n"
        "content-type: text/plain; charset=utf-8\r\n"
        "x-content-type-options: nosniff\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n"
    ).encode()
    if status == HTTPStatus.METHOD_NOT_ALLOWED:
        head += b"allow: " + ALLOWED_METHODS + b"\r\n"
    return head + b"\r\n" + (b"" if head_only else body)


def _too_large(cap: int) -> HttpRefusal:
    return HttpRefusal(
        HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body above {cap} bytes", fault="client"
    )


def _upstream_refusal(failure: HttpRefusal) -> HttpRefusal:
    """The client's answer to an upstream that failed before the response: its status."""
    return HttpRefusal(failure.status, f"upstream: {failure.problem}", fault="upstream")


class Framing(enum.Enum):
    """How a response's body goes to the client."""

    NONE = enum.auto()  # no body: HEAD, 1xx, 204, 304
    LENGTH = enum.auto()  # Content-Length
    CHUNKED = enum.auto()  # Transfer-Encoding: chunked
    CLOSE = enum.auto()  # ended by our close: an HTTP/1.0 client and a body of unknown length


def response_framing(
    head: ResponseHead, request_method: bytes, client_version: bytes
) -> tuple[list[tuple[bytes, bytes]], Framing]:
    """The framing field of our response, from the upstream's (which forwarding strips), and
    how the body goes.

    A body of known length keeps its Content-Length; a chunked one, or one the upstream ends by
    closing, goes out chunked, or to an HTTP/1.0 client (which cannot read chunks) ended by our
    close. Responses without a body (1xx, 204, 304, any answer to HEAD) keep the Content-Length
    they had: it tells what a GET would get; for the same reason a HEAD response without one
    says chunked to an HTTP/1.1 client, as the GET's would (RFC 9110 §9.3.2).
    """
    status = head.status
    no_body_status = status < _OK or status in _NO_BODY_STATUSES
    no_body = no_body_status or request_method == b"HEAD"
    if head.content_length is not None:
        length = [(b"content-length", str(head.content_length).encode())]
        return length, Framing.NONE if no_body else Framing.LENGTH
    if no_body_status:
        return [], Framing.NONE
    if client_version != b"1.1":
        return [], Framing.NONE if no_body else Framing.CLOSE
    return [(b"transfer-encoding", b"chunked")], Framing.NONE if no_body else Framing.CHUNKED


class ClientConnection:
    """Serves one client connection until it ends; see the module docstring."""

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
    ) -> None:
        self._stream = stream
        # The stream as TLS, for a last response that carries our close_notify (an ABC's
        # isinstance check costs more than once per connection).
        self._tls = stream if isinstance(stream, TlsStream) else None
        # Where this client waits for a response head to be looked at (see Departures): the
        # server's, by its socket's descriptor; a dict nobody looks at without one.
        self._departures: dict[int, ClientConnection] = (
            departures.waiting if departures is not None and self._tls is not None else {}
        )
        self._fd = self._tls.transport_stream.socket.fileno() if self._tls is not None else -1
        self._client_left = False  # Departures saw the client go while it waited
        self._peer = ClientPeer.of(peer) if peer is not None else None
        self._settings = settings
        self._drain = drain
        self._tally = tally
        # Added to every relayed response (dev mode names the key served and why).
        self._response_headers = list(response_headers)
        self._buffer = bytearray()  # received from the client and not yet consumed
        self._eof = False  # the client closed its side
        self._requests = 0
        self._request_read = False  # the current request's head and body were read to the end
        # Set when the connection ended on a refusal, or on an upstream's early answer, that
        # the caller should close with a lingering close: see `serve`.
        self.client_may_be_sending = False
        self._keep_alive = False  # the exchange just finished leaves the connection open
        # The connection's one cancel scope (made by `serve`): `_wait` moves its deadline to
        # each wait's own and records which wait it is, so that an expiry is answered as that
        # wait's (`_expired`).
        self._scope: trio.CancelScope
        self._deadline = math.inf  # the scope's, mirrored: its property costs more
        self._phase = _Phase.IDLE
        # trio's clock, read directly: several times per request, and trio.current_time()
        # is three calls deep.
        self._now = trio.lowlevel.current_clock().current_time
        self._read_at = 0.0  # when `_wait` last read the clock
        self._limits: Limits | None = None  # the current request's
        self._head_method: bytes | None = None  # the current request's, once its head is read

    async def serve(self) -> None:
        """Relay requests until the client leaves, asks to close, or something fails.

        The caller closes the stream (with a close_notify) afterwards, except after a cut,
        which closes it here at once; when `client_may_be_sending` is then set, with a
        lingering close (see the module docstring). Raises trio.BrokenResourceError and
        trio.ClosedResourceError when the client disappears.
        """
        failure: HttpRefusal | _Cut | None = None
        # Bounded: each round but the last serves a request (see _Restart).
        for _ in range(MAX_REQUESTS_PER_CONNECTION):
            # Made with the deadline of the wait that comes first, for the next request's head,
            # which then keeps it (DEADLINE_SLACK): entering a scope registers its deadline
            # anyway, and moving it afterwards would cost as much again.
            self._deadline = self._idle_deadline()
            self._scope = trio.CancelScope(deadline=self._deadline)
            try:
                with self._scope:
                    failure = await self._serve_requests()
            except _Restart:
                continue
            if self._scope.cancelled_caught:
                failure = self._expired()
            break
        if isinstance(failure, HttpRefusal):
            self._tally.note(f"{failure.status} {failure.problem}")
            self._tally.response_generated(failure.status)
            assert self._limits is not None
            await self._refuse(failure, self._limits, head_only=self._head_method == b"HEAD")
        elif isinstance(failure, _Cut):
            self._tally.note(str(failure))
            await trio.aclose_forcefully(self._stream)

    async def _serve_requests(self) -> HttpRefusal | _Cut | None:
        """The requests in turn, within the connection's scope; how the last one failed."""
        for _ in range(MAX_REQUESTS_PER_CONNECTION):
            settings = self._settings()
            if settings is None:  # a reload removed [upstream]: new connections get the rest
                return None
            self._limits = settings.limits
            self._head_method = None
            self._keep_alive = False
            self._request_read = False
            try:
                try:
                    head = await self._receive_head(settings)
                    if head is None:
                        return None
                    self._head_method = head.method
                    self._request_read = not (head.chunked or head.content_length)
                    self._requests += 1
                    self._tally.request_received()
                    # A reload may have come while the connection idled: the request goes
                    # where the config says now.
                    current = self._settings()
                    if current is None:
                        raise HttpRefusal(
                            HTTPStatus.SERVICE_UNAVAILABLE,
                            "the upstream was just unconfigured",
                            fault="upstream",
                        )
                    settings = current
                    self._limits = settings.limits
                    local = settings.local
                    if local is not None and (endpoint := local.find(head.target)) is not None:
                        await self._answer_locally(endpoint, head, settings.limits)
                    else:
                        await self._exchange(head, settings)
                except _ClientGone:
                    self._tally.note("client closed mid-request")
                    return None
            except (HttpRefusal, _Cut) as exc:
                return exc
            if not self._keep_alive:
                return None
        return None

    # --- the request ---------------------------------------------------------------------

    async def _receive_head(self, settings: RelaySettings) -> RequestHead | None:
        """Read and check the next request head; None when the connection ends quietly."""
        limits = settings.limits
        buffer = self._buffer
        if not buffer:
            if self._eof or self._drain.draining:
                return None
            # The first request's wait counts towards its header timeout; a kept-alive
            # connection may idle longer, and its next head's clock starts at its first byte.
            first = self._requests == 0
            waited_from = self._wait(_Phase.IDLE, self._idle_timeout(limits))
            self._drain.enter_idle(self._scope)
            try:
                chunk = await self._stream.receive_some(RECEIVE_SIZE)
            finally:
                self._drain.leave_idle(self._scope)
            if not chunk:  # closed by the client
                return None
            buffer += chunk
            now = self._now()
            if self._drain.draining or now >= self._deadline:
                # The drain (or the deadline) came just as the request did and may have
                # cancelled the scope already: the request is served, in a fresh one.
                raise _Restart
            started = waited_from if first else now
        else:  # a pipelined request, already here
            started = self._now()
        head_limits = settings.head_limits
        end = find_head_end(buffer, head_limits)
        if end is None:  # the head is still coming (usually it came whole, in one read)
            end = await self._receive_rest_of_head(head_limits, started, limits)
            if end is None:
                return None
        head = bytes(buffer[:end])
        del buffer[:end]  # what follows is the body, or a pipelined next request
        return check_request_head(head, head_limits)

    async def _receive_rest_of_head(
        self, head_limits: HeadLimits, started: float, limits: Limits
    ) -> int | None:
        """Read into the buffer until the head is complete: its end, or None when the client
        closed mid-head (nobody left to answer). 408 after request_header_timeout in all."""
        buffer = self._buffer
        searched = len(buffer)  # find_head_end resumes where the previous call left off
        self._phase = _Phase.CLIENT_HEAD
        self._set_deadline(started + limits.request_header_timeout)  # exactly: a total
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

    async def _exchange(self, head: RequestHead, settings: RelaySettings) -> None:
        """Relay one checked request and its response."""
        limits = settings.limits
        if head.content_length is not None and head.content_length > limits.max_body_bytes:
            raise _too_large(limits.max_body_bytes)
        has_body = head.chunked or bool(head.content_length)
        lines = upstream_request_lines(head, peer=self._peer, rules=settings.rules)
        if head.chunked:
            lines.append(b"transfer-encoding: chunked")
        elif head.content_length is not None:
            lines.append(b"content-length: %d" % head.content_length)
        elif head.method in _BODY_METHODS:
            lines.append(b"content-length: 0")
        request = request_head(head.method, head.target, (), lines=lines)

        pool = settings.pool
        # Without a body, the client's side is done before we go upstream, and the request
        # may be sent twice.
        replayable = not has_body and head.method in REPLAYABLE_METHODS
        for attempt in range(2):  # the second only for the stale-connection retry
            # Before the pool may connect (within its connect_timeout): the deadline of the
            # wait for this request must not expire as if the connection still idled.
            now = self._wait(_Phase.UPSTREAM_SEND, limits.upstream_timeout)
            try:
                # A first attempt that may be retried skips the pool's look at the socket:
                # a connection found closed by then costs the retry, on a checked one.
                upstream = await pool.acquire(now, check=not (replayable and attempt == 0))
            except HttpRefusal as exc:
                raise _upstream_refusal(exc) from exc
            try:
                early = None
                if has_body:
                    early = await self._forward_body(upstream, request, head, limits)
                else:
                    await upstream.send_request(request, bounded=False)
                sent = self._wait(_Phase.UPSTREAM_HEAD, limits.upstream_timeout)
                if early is not None:
                    response = early
                else:
                    self._departures[self._fd] = self
                    try:
                        response = await upstream.receive_head(
                            timeout=None, request_method=head.method
                        )
                    finally:
                        self._departures.pop(self._fd, None)
                self._tally.response_relayed(response.status, self._now() - sent)
                # _respond raises no UpstreamError, and releases or discards the upstream
                # connection itself.
                await self._respond(upstream, response, head, settings)
                return
            except HttpRefusal as exc:
                pool.discard(upstream)
                if exc.fault != "upstream":
                    raise
                stale = exc.before_response and upstream.reused
                if stale and replayable and attempt == 0:
                    continue
                raise _upstream_refusal(exc) from exc
            except BaseException:
                pool.discard(upstream)  # closing twice is harmless
                raise

    async def _forward_body(
        self, upstream: UpstreamConnection, request: bytes, head: RequestHead, limits: Limits
    ) -> ResponseHead | None:
        """Send the request head and stream the client's body after it (see _stream_body).
        None once all of it went; the upstream's response when the upstream broke the
        connection before taking it all, having answered first (an answer that needs no body:
        401, 413). Its error when it had not."""
        try:
            await self._stream_body(upstream, request, head, limits)
        except HttpRefusal as failure:
            if failure.fault != "upstream":
                raise
            # What it sent before it went is still in our socket: the response, if any.
            self._wait(_Phase.UPSTREAM_HEAD, limits.upstream_timeout)
            try:
                response = await upstream.receive_head(timeout=None, request_method=head.method)
            except HttpRefusal:
                raise failure from None
            self._tally.note("upstream answered before taking the whole request body")
            return response
        return None

    async def _stream_body(
        self, upstream: UpstreamConnection, request: bytes, head: RequestHead, limits: Limits
    ) -> None:
        """Send the request head and stream the client's body after it (trailers dropped);
        what the client already sent goes with the head, in one write."""
        reader = await self._body_reader(head, limits)
        chunked = head.chunked
        out = [request]
        first = True
        received = 0
        while True:  # bounded: max_body_bytes, and body_timeout for each read
            piece = self._body_piece(reader)
            if piece is None:
                if out:
                    await self._send_upstream(upstream, out, first, limits)
                    out, first = [], False
                await self._receive_body_bytes(limits)
                continue
            if piece is http1.END:
                self._request_read = True
                if chunked:
                    out.append(http1.LAST_CHUNK)
                if out:
                    await self._send_upstream(upstream, out, first, limits)
                return
            received += len(piece)
            if received > limits.max_body_bytes:  # a chunked body that kept growing
                raise _too_large(limits.max_body_bytes)
            out.append(http1.encode_chunk(piece) if chunked else piece)

    async def _body_reader(self, head: RequestHead, limits: Limits) -> http1.BodyReader:
        """The reader for the request's body, once 100 Continue went out if it was asked for
        (we are about to read the body, RFC 9110 §10.1.1)."""
        if head.expect_continue:
            self._wait(_Phase.CLIENT_SEND, limits.send_timeout)
            await self._stream.send_all(_CONTINUE)
        return http1.body_reader(head.content_length, chunked=head.chunked, sender="client")

    def _body_piece(self, reader: http1.BodyReader) -> bytes | http1.End | None:
        """The next piece of the body from the buffer (None: receive more first); 400 for a
        malformed one."""
        return reader.read(self._buffer)

    async def _receive_body_bytes(self, limits: Limits) -> None:
        """More of the body into the buffer, within body_timeout; _ClientGone when the client
        closed though the body's framing says more is coming."""
        self._wait(_Phase.CLIENT_BODY, limits.body_timeout)
        chunk = await self._stream.receive_some(RECEIVE_SIZE)
        if not chunk:
            self._eof = True
            raise _ClientGone
        self._buffer += chunk

    async def _send_upstream(
        self, upstream: UpstreamConnection, out: list[bytes], first: bool, limits: Limits
    ) -> None:
        self._wait(_Phase.UPSTREAM_SEND, limits.upstream_timeout)
        data = b"".join(out) if len(out) > 1 else out[0]
        if first:
            await upstream.send_request(data, bounded=False)
        else:
            await upstream.send(data, bounded=False)

    # --- requests dualproxy answers itself ------------------------------------------------

    async def _answer_locally(self, endpoint: Endpoint, head: RequestHead, limits: Limits) -> None:
        """Answer a request for a local endpoint (endpoints.py) here, never upstream: its body
        read within the endpoint's cap (413 above it, before reading), the answer sent with
        the keep-alive rules of a relayed response."""
        cap = min(endpoint.max_body_bytes, limits.max_body_bytes)
        if head.content_length is not None and head.content_length > cap:
            raise _too_large(cap)
        body = b""
        if head.chunked or head.content_length:
            body = await self._read_body(head, cap, limits)
        peer = self._peer.address if self._peer is not None else None
        request = LocalRequest(head.method, head.target, head.headers, peer, body)
        # Bounded like a send: the endpoint may write to disk in a worker thread.
        self._wait(_Phase.CLIENT_SEND, limits.send_timeout)
        answer = await endpoint.answer(request)
        keep_alive = not (
            self._drain.draining or self._requests >= MAX_REQUESTS_PER_CONNECTION or head.close
        )
        self._tally.response_generated(answer.status)
        headers = [*answer.headers, *self._response_headers]
        if answer.status not in _NO_BODY_STATUSES:
            headers.append((b"content-length", str(len(answer.body)).encode()))
        if not keep_alive:
            headers.append((b"connection", b"close"))
        data = response_head(answer.status, HTTPStatus(answer.status).phrase.encode(), headers)
        if head.method != b"HEAD" and answer.status not in _NO_BODY_STATUSES:
            data += answer.body
        await self._send_client([data], limits, last=not keep_alive)
        self._keep_alive = keep_alive

    async def _read_body(self, head: RequestHead, cap: int, limits: Limits) -> bytes:
        """The request's whole body (trailers dropped); 413 once it grows past `cap`."""
        reader = await self._body_reader(head, limits)
        body = bytearray()
        while True:  # bounded: cap, and body_timeout for each read
            piece = self._body_piece(reader)
            if piece is None:
                await self._receive_body_bytes(limits)
                continue
            if piece is http1.END:
                self._request_read = True
                return bytes(body)
            body += piece
            if len(body) > cap:
                raise _too_large(cap)

    # --- the response --------------------------------------------------------------------

    async def _respond(
        self,
        upstream: UpstreamConnection,
        response: ResponseHead,
        head: RequestHead,
        settings: RelaySettings,
    ) -> None:
        """Send the upstream's response to the client, within the exchange's cancel scope;
        the upstream connection goes back to the pool only when both sides finished cleanly.
        Raises _Cut for anything that goes wrong, never UpstreamError."""
        limits = settings.limits
        finished = False
        try:
            framing, body = response_framing(response, head.method, head.version)
            headers = framing + self._response_headers
            # An answer that came before the whole request body went upstream (_forward_body)
            # leaves the rest of it unread: the connection ends after the response, with a
            # lingering close, as the client may still be sending it.
            body_unread = not self._request_read
            if body_unread:
                self.client_may_be_sending = not self._eof
            keep_alive = not (
                body_unread
                or body is Framing.CLOSE
                or self._drain.draining
                or self._requests >= MAX_REQUESTS_PER_CONNECTION
                or head.close
            )
            if not keep_alive:
                headers.append((b"connection", b"close"))
            chunked = body is Framing.CHUNKED
            # Bytes for the client are collected while the upstream's next piece is already
            # buffered, and sent before any read that may wait: a typical API response (head
            # and body in one upstream read) costs one TLS record and one send, and the head
            # of a slow or streamed body is never held back.
            out = [
                response_head(
                    response.status,
                    response.reason,
                    headers,
                    lines=client_response_lines(response),
                )
            ]
            pending = len(out[0])
            while True:  # bounded: the upstream's framing, upstream_timeout per read
                try:
                    piece = upstream.buffered_body()
                except HttpRefusal:
                    piece = None  # receive_body reports it, after what came is sent
                if piece is None:
                    if out:
                        await self._send_client(out, limits)
                        out, pending = [], 0
                    self._wait(_Phase.UPSTREAM_BODY, limits.upstream_timeout)
                    piece = await upstream.receive_body(timeout=None)
                if piece is http1.END:
                    break
                out.append(http1.encode_chunk(piece) if chunked else piece)
                pending += len(piece)
                if pending >= RECEIVE_SIZE:
                    await self._send_client(out, limits)
                    out, pending = [], 0
            if chunked:  # the upstream's trailers are dropped
                out.append(http1.LAST_CHUNK)
            if out:
                await self._send_client(out, limits, last=not keep_alive)
            finished = True
            self._keep_alive = keep_alive
        except HttpRefusal as exc:
            raise _Cut(f"upstream failed mid-response: {exc.problem}") from exc
        finally:
            if finished:  # pooled again if reusable() (nothing past the response), else closed
                settings.pool.release(upstream, self._read_at)
            else:
                settings.pool.discard(upstream)

    async def _send_client(self, out: list[bytes], limits: Limits, *, last: bool = False) -> None:
        """Send to the client; `last`: the connection's final bytes, its TLS close_notify
        going with them."""
        self._wait(_Phase.CLIENT_SEND, limits.send_timeout)
        data = b"".join(out) if len(out) > 1 else out[0]
        if last and self._tls is not None:
            await self._tls.send_all(data, then_close_notify=True)
        else:
            await self._stream.send_all(data)

    # --- waits ---------------------------------------------------------------------------

    def _wait(self, phase: _Phase, timeout: float) -> float:
        """Bound the next wait by `timeout`, moving the connection scope's deadline: far
        cheaper than a cancel scope per wait, of which a request has several. A deadline is
        not pushed back by less than DEADLINE_SLACK (see there). Returns the time it read."""
        self._phase = phase
        self._read_at = now = self._now()
        deadline = now + timeout
        current = self._deadline
        if deadline < current or deadline - current > DEADLINE_SLACK:
            self._set_deadline(deadline)
        return now

    def _idle_timeout(self, limits: Limits) -> float:
        """How long the connection may wait for the next request's first byte."""
        return limits.request_header_timeout if self._requests == 0 else limits.keepalive_timeout

    def _idle_deadline(self) -> float:
        """When that wait would end, were it to start now."""
        settings = self._settings()
        return math.inf if settings is None else self._now() + self._idle_timeout(settings.limits)

    def _set_deadline(self, deadline: float) -> None:
        self._scope.deadline = self._deadline = deadline

    def client_left(self) -> None:
        """The client closed while it waited for the upstream's response head (Departures):
        that wait ends now, and with it the connection."""
        self._client_left = True
        self._scope.cancel()

    def _expired(self) -> HttpRefusal | _Cut | None:
        """What it means that the connection's scope ended, by the wait it was in (None:
        close quietly)."""
        if self._client_left:
            return _Cut("client closed while waiting for the upstream's response")
        phase = self._phase
        limits = self._limits
        assert limits is not None
        if phase is _Phase.IDLE:  # no request started: nobody to answer (or the drain)
            return None
        if phase is _Phase.CLIENT_HEAD:
            return HttpRefusal(
                HTTPStatus.REQUEST_TIMEOUT,
                "request head not complete within the time allowed",
                fault="client",
            )
        if phase is _Phase.CLIENT_BODY:
            return HttpRefusal(
                HTTPStatus.REQUEST_TIMEOUT,
                "request body stalled longer than allowed",
                fault="client",
            )
        if phase is _Phase.CLIENT_SEND:
            return _Cut("client did not read for send_timeout")
        if phase is _Phase.UPSTREAM_BODY:
            problem = timeout_problem("body", limits.upstream_timeout)
            return _Cut(f"upstream failed mid-response: {problem}")
        waiting_for: Literal["send", "head"] = "send" if phase is _Phase.UPSTREAM_SEND else "head"
        problem = timeout_problem(waiting_for, limits.upstream_timeout)
        return HttpRefusal(HTTPStatus.GATEWAY_TIMEOUT, f"upstream: {problem}", fault="upstream")

    async def _send(self, data: bytes, limits: Limits) -> None:
        """Send to the client; one that does not take the bytes within send_timeout is cut."""
        with trio.move_on_after(limits.send_timeout) as scope:
            await self._stream.send_all(data)
        if scope.cancelled_caught:
            raise _Cut("client did not read for send_timeout")

    async def _refuse(self, refusal: HttpRefusal, limits: Limits, *, head_only: bool) -> None:
        try:
            await self._send(
                error_response(refusal.status, refusal.problem, head_only=head_only), limits
            )
        except _Cut:
            await trio.aclose_forcefully(self._stream)
            return
        # Bytes already past the request (pipelined, or a body we did not trust the head to
        # frame) say that more may be on the way, as nginx's lingering_close judges it.
        self.client_may_be_sending = not self._eof and (
            not self._request_read or bool(self._buffer)
        )
