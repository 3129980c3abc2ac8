"""One request and its response as decisions, without I/O: the semantics a relay driver follows.

Theory of operation. A driver owns the sockets, the buffers, the framing and the clock; for
each request it builds an `Exchange` from a checked `RequestHead` and asks it, at each step,
what to do. The exchange keeps the request's state between steps and answers with values:
bytes for the upstream, a `ResponseStart` for the client, or an `HttpRefusal` or `Cut` for
an exchange that cannot go on. It never waits, never reads a clock and imports no trio, so
every rule below is tested without a socket (tests/test_exchange.py). relay.py drives it
over HTTP/1.1.

The steps, in order (the HTTP/1.1 driver's calls in brackets):

1. **route** [`route`]: a request for a path dualproxy answers itself (the pin manifest,
   pin-failure reports: `settings.local`) is answered locally, every other one relayed; a
   Content-Length above the cap (max_body_bytes, or the endpoint's when lower) is refused
   with 413 before a byte of the body is read, and nothing goes upstream; 503 when a reload
   removed the upstream while the request was on its way.
2. **the request upstream** [`upstream_request`]: the head with rewritten fields
   (`rewrite.upstream_request_lines`) and our own framing: chunked when the client's was,
   its Content-Length, or `content-length: 0` for a POST, PUT or PATCH without a body (Google's
   front ends, like many servers, answer 411 otherwise). The upstream side is always
   HTTP/1.1, over the pool.
3. **the body** [`continue_first`, `request_data`, `request_end`]: `Expect: 100-continue` is
   answered with 100 when the driver starts reading the body (RFC 9110 §10.1.1), never
   forwarded; a body of no announced length that grows past the cap gets 413; chunked
   bodies are re-chunked for the upstream, trailers dropped.
4. **the response** [`respond`, or `answer_locally`]: the upstream's head becomes the
   client's (`response_framing` below, `rewrite.client_response_lines`, the added headers),
   with the keep-alive decision: the connection closes after a request with `Connection:
   close` or in HTTP/1.0 (whose keep-alive extension we do not implement), after a body we
   can only end by closing (a body of unknown length to an HTTP/1.0 client), after an answer
   that came before the whole request body went (its rest was never read), while the server
   drains, and after a connection's limits.keepalive_requests-th request; the response
   then says `Connection: close`.

The retry rule [`replayable`, `may_replay`]. A pooled connection may have been
closed by the upstream while it sat idle; that shows as a failure before any response byte
(an upstream_timeout is not such a failure, and is never retried: the upstream may still be
working on the request). Only then, only on a *reused* connection, and only for an
idempotent method (REPLAYABLE_METHODS) sent without a body, the request is sent once more on
another connection. Such a request's first attempt takes an idle connection without the
pool's look at its socket (a system call per request): a closed one fails, and the retry, on
a checked connection, answers. A request whose body bytes went out is never sent again: we
cannot replay a stream, nor know what the upstream did with it.

What each failure means (`upstream_failed`, `expired`, `refusal_response`):

- the client's fault before the response (a bad head, too large, too slow): its 4xx, short
  plain text, `Connection: close`, and the connection ends;
- the upstream's fault before the response head (refused, reset, bad TLS, a malformed or
  smuggling response head, upstream_timeout): 502 or 504 the same way;
- the upstream answered before taking the whole body, then closed or reset the connection
  (a 401 or 413 from a server that does not read what it refuses): its answer, read from what
  it sent before the connection broke, is relayed like any response (EARLY_ANSWER), and the
  connection ends after it. An upstream that answers early but keeps the connection open
  without reading is not told apart: 504 after upstream_timeout;
- after either, when the client may still be sending (`client_may_be_sending`: the request
  was not read to its end, or bytes past it had arrived), the connection ends with a
  *lingering close*: a socket closed with unread bytes sends a TCP reset, which can destroy
  our answer before the client reads it (the server's `lingering_close`);
- anything after the response started (the upstream reset or stalled mid-body, the client
  not reading for send_timeout): a `Cut`, the client connection closed without a final chunk
  and without a TLS close_notify, so the client sees a truncated response, never a
  complete-looking one;
- the client gone: the exchange ends (CLIENT_LEFT while the upstream works on the response
  head, nginx's 499; CLIENT_CLOSED_MID_REQUEST while it sends the request);
- in every case but a cleanly finished exchange the upstream connection is discarded, never
  returned to the pool.

Waits. Each wait of an exchange is a `Wait`, bounded by one named setting (`WAIT_BOUNDS`);
when it expires, `expired` says what that means: a silent close when idle (nobody to
answer), 408 for a request that stalls, 504 for an upstream that does not take the request
or answer it, a cut once the response started or when the client does not read it.

WebSocket (RFC 6455) [`upgrading`, `switch`]. A request whose Connection lists "upgrade"
(`RequestHead.upgrade`) is relayed only for `Upgrade: websocket`, a GET in HTTP/1.1 (RFC
6455 §4.1): the upstream gets our `Connection: upgrade` and `Upgrade: websocket` (the
Sec-WebSocket-* fields pass as any field does), and a 101 from it is relayed as the last HTTP
on the connection, which the driver then turns into a byte tunnel (http.tunnel); any other
answer is relayed as usual. Any other upgrade is refused with 501, and a WebSocket handshake
that is not a GET in HTTP/1.1 with 400: never silently relayed as a plain request.

Driving it from HTTP/2 (issue 18). Framing is the driver's, semantics the exchange's: an
HTTP/2 stream checks its pseudo-headers and fields (the HTTP/2 rules: no connection-specific
fields, lowercase names, :authority against Host) and builds a `RequestHead` from them:
method, target from :path, version b"2", headers as pairs, host from :authority,
content_length from content-length (or None), chunked=True when DATA frames follow without
one (the upstream then gets a chunked body), expect_continue, close=False and forward=None
(so the rewriting filters the pairs; the lines fast path is HTTP/1.1's). Each stream then
drives its own `Exchange` exactly as above: DATA frames are `request_data`, END_STREAM is
`request_end`, a `ResponseStart` becomes a HEADERS frame (`status`, and the fields from
`rewrite.client_response_headers` of the upstream head plus `fields` without the framing
and Connection ones, which HTTP/2 forbids), its body DATA frames whatever `framing` says (no
chunk encoding), `keep_alive` is ignored (the connection's lifetime is the HTTP/2 driver's:
GOAWAY), an `HttpRefusal` becomes a response on the stream (`refusal_response`) and a `Cut`
an RST_STREAM. The upstream side, its pool and the retry rule do not change.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from types import MappingProxyType
from typing import TYPE_CHECKING, Final, Literal, NamedTuple, Protocol

from dualproxy.config.schema import MAX_KEEPALIVE_REQUESTS
from dualproxy.http.body import LAST_CHUNK, encode_chunk
from dualproxy.http.errors import Fault, HttpRefusal, snippet, timeout_problem
from dualproxy.http.heads import RequestHead, ResponseHead, request_head
from dualproxy.http.local import Endpoint, LocalAnswer, LocalRoutes
from dualproxy.http.rewrite import (
    ClientPeer,
    ForwardingRules,
    client_response_lines,
    upstream_request_lines,
)

if TYPE_CHECKING:
    from dualproxy.config.schema import Limits

__all__ = [
    "ALLOWED_METHODS",
    "CLIENT_CLOSED_MID_REQUEST",
    "CLIENT_LEFT",
    "DEADLINE_SLACK",
    "EARLY_ANSWER",
    "MAX_REQUESTS_PER_CONNECTION",
    "REPLAYABLE_METHODS",
    "WAIT_BOUNDS",
    "ClientSide",
    "Cut",
    "Exchange",
    "ExchangeSettings",
    "Framing",
    "ResponseStart",
    "Wait",
    "client_may_be_sending",
    "expired",
    "refusal_response",
    "response_framing",
    "wait_bounds",
]

# What we relay; the answer to CONNECT and TRACE (405) says so (RFC 9110 15.5.6).
ALLOWED_METHODS: Final = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
# Idempotent methods (RFC 9110 9.2.2): sent again on a fresh connection when a reused one
# failed before any response, provided the request had no body (see the retry rule above).
REPLAYABLE_METHODS: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE"})
# The bound of the loops that serve a connection's requests: the most limits.keepalive_requests
# may be (the exchange closes the connection after the configured number).
MAX_REQUESTS_PER_CONNECTION: Final = MAX_KEEPALIVE_REQUESTS
# Methods whose request means a body: without one, the upstream still gets Content-Length: 0.
_BODY_METHODS: Final = frozenset({b"POST", b"PUT", b"PATCH"})
_OK: Final = HTTPStatus.OK.value
_NO_BODY_STATUSES: Final = frozenset({HTTPStatus.NO_CONTENT.value, HTTPStatus.NOT_MODIFIED.value})
_CHUNKED_FIELD: Final = (b"transfer-encoding", b"chunked")
_CLOSE_FIELD: Final = (b"connection", b"close")
_WEBSOCKET: Final = b"websocket"
# What asks the upstream for the switch, and tells the client it happened (RFC 6455 §4).
_UPGRADE_LINES: Final = (b"connection: upgrade", b"upgrade: websocket")
_UPGRADE_FIELDS: Final = ((b"connection", b"upgrade"), (b"upgrade", b"websocket"))

# What the log says of an exchange that ended early without a refusal of ours.
EARLY_ANSWER: Final = "upstream answered before taking the whole request body"
CLIENT_CLOSED_MID_REQUEST: Final = "client closed mid-request"


@dataclass(frozen=True, slots=True)
class Cut:
    """The exchange ends without an answer: the client connection is closed abruptly, so that
    what it got (a response cut short, or nothing) cannot pass for a whole response."""

    problem: str  # for the log
    fault: Fault


# The client closed while the upstream worked on the response head (the server's Departures).
CLIENT_LEFT: Final = Cut("client closed while waiting for the upstream's response", "client")


class Wait(enum.IntEnum):
    """The waits of an exchange, each bounded by one setting (WAIT_BOUNDS); what an expiry
    means is `expired`'s. An IntEnum: `wait_bounds` lists the bounds in this order."""

    FIRST_REQUEST = 0  # a connection's first request, from the end of the TLS handshake
    NEXT_REQUEST = 1  # a kept-alive connection's next request
    CLIENT_HEAD = 2  # the rest of a head, from its first byte (in all, however it trickles)
    CLIENT_BODY = 3  # each read of the request body
    CLIENT_SEND = 4  # each send to the client (and a local endpoint's answer)
    UPSTREAM_SEND = 5  # a connection from the pool, and each send of the request
    UPSTREAM_HEAD = 6  # the response head, once the request went
    UPSTREAM_BODY = 7  # each read of the response body


# How much later than its deadline a wait may be allowed to end, in seconds, so that a wait
# following another within this long keeps the deadline already set (both drivers' `_bound`;
# see docs/performance.md). So an inactivity timeout may end a wait up to this much early,
# never late; nginx does the same with its timers (NGX_TIMER_LAZY_DELAY, 300 ms).
DEADLINE_SLACK: Final = 0.3
# The setting (a `config.Limits` field) that bounds each wait.
WAIT_BOUNDS: Final[Mapping[Wait, str]] = MappingProxyType(
    {
        Wait.FIRST_REQUEST: "request_header_timeout",
        Wait.NEXT_REQUEST: "keepalive_timeout",
        Wait.CLIENT_HEAD: "request_header_timeout",
        Wait.CLIENT_BODY: "body_timeout",
        Wait.CLIENT_SEND: "send_timeout",
        Wait.UPSTREAM_SEND: "upstream_timeout",
        Wait.UPSTREAM_HEAD: "upstream_timeout",
        Wait.UPSTREAM_BODY: "upstream_timeout",
    }
)


def wait_bounds(limits: Limits) -> tuple[float, ...]:
    """Each wait's timeout in seconds under `limits`, indexed by `Wait`."""
    return tuple(getattr(limits, WAIT_BOUNDS[wait]) for wait in Wait)


def expired(wait: Wait, limits: Limits) -> HttpRefusal | Cut | None:
    """What it means that `wait` outlasted its bound: the refusal to answer, the cut, or None
    for a silent close."""
    if wait is Wait.FIRST_REQUEST or wait is Wait.NEXT_REQUEST:
        return None  # no request started: nobody to answer (or the drain)
    if wait is Wait.CLIENT_HEAD:
        return HttpRefusal(
            HTTPStatus.REQUEST_TIMEOUT,
            "request head not complete within the time allowed",
            fault="client",
        )
    if wait is Wait.CLIENT_BODY:
        return HttpRefusal(
            HTTPStatus.REQUEST_TIMEOUT, "request body stalled longer than allowed", fault="client"
        )
    if wait is Wait.CLIENT_SEND:
        return Cut("client did not read for send_timeout", "client")
    if wait is Wait.UPSTREAM_BODY:
        problem = timeout_problem("body", limits.upstream_timeout)
        return Cut(f"upstream failed mid-response: {problem}", "upstream")
    waiting_for: Literal["send", "head"] = "send" if wait is Wait.UPSTREAM_SEND else "head"
    problem = timeout_problem(waiting_for, limits.upstream_timeout)
    return HttpRefusal(HTTPStatus.GATEWAY_TIMEOUT, f"upstream: {problem}", fault="upstream")


def client_may_be_sending(*, request_read: bool, eof: bool, buffered: bool) -> bool:
    """Whether a connection that ends now should linger (see the module docstring): the
    client has not closed, and the request was not read to its end or bytes past it came
    (pipelined, or a body we did not trust the head to frame), as nginx's lingering_close
    judges it."""
    return not eof and (not request_read or buffered)


class Framing(enum.Enum):
    """How a response's body goes to the client."""

    NONE = enum.auto()  # no body: HEAD, 1xx, 204, 304
    LENGTH = enum.auto()  # Content-Length
    CHUNKED = enum.auto()  # Transfer-Encoding: chunked
    CLOSE = enum.auto()  # ended by our close: an HTTP/1.0 client and a body of unknown length


def response_framing(
    head: ResponseHead, request_method: bytes, client_version: bytes
) -> tuple[list[tuple[bytes, bytes]], Framing]:
    """The framing field of our response, from the upstream's (which the rewriting strips),
    and how the body goes.

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
    return [_CHUNKED_FIELD], Framing.NONE if no_body else Framing.CHUNKED


# A response head for the client, as decisions; the driver writes it in its framing:
# (status, reason, lines, fields, framing, keep_alive). On the wire, `lines` (the fields that
# go on as they came: the upstream's, rewritten) come first, then `fields` (framing, the
# added headers, Connection: close); `keep_alive`: the connection may carry another request
# after this response. A plain tuple: one is made per response (docs/performance.md).
ResponseStart = tuple[int, bytes, Sequence[bytes], list[tuple[bytes, bytes]], Framing, bool]


def refusal_response(
    refusal: HttpRefusal, *, head_only: bool, upstream_detail: bool = False
) -> tuple[ResponseStart, bytes]:
    """Our answer to a refused exchange, and its body: short plain text, closing the
    connection; `head_only` for a HEAD request (the body is then b"").

    The body says what the client did wrong; of the upstream's failures (502, 503, 504) it
    says only the status, since the problem names upstream addresses, certificate details
    and timeouts that are none of the public's business (the log has them), unless
    `upstream_detail` (dev mode, where it helps)."""
    status = refusal.status
    phrase = HTTPStatus(status).phrase
    if refusal.fault == "upstream" and not upstream_detail:
        body = f"{status} {phrase}\n".encode("ascii")
    else:
        body = f"{status} {phrase}: {refusal.problem}\n".encode("ascii", "backslashreplace")
    fields = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"x-content-type-options", b"nosniff"),
        (b"content-length", b"%d" % len(body)),
        _CLOSE_FIELD,
    ]
    if status == HTTPStatus.METHOD_NOT_ALLOWED:
        fields.append((b"allow", ALLOWED_METHODS))
    start = (status, phrase.encode(), (), fields, Framing.LENGTH, False)
    return start, b"" if head_only else body


class ClientSide(NamedTuple):
    """What every exchange on one client connection shares."""

    peer: ClientPeer | None  # for X-Forwarded-For; None when the address is unknown
    # Added to every response (dev mode names the key served and why).
    response_headers: tuple[tuple[bytes, bytes], ...] = ()
    # A 502/504 body says what failed upstream (dev mode): see refusal_response.
    upstream_detail: bool = False


class ExchangeSettings(Protocol):
    """What an exchange is decided with (the relay's RelaySettings, current when its head
    arrived)."""

    @property
    def limits(self) -> Limits: ...
    @property
    def rules(self) -> ForwardingRules: ...
    @property
    def local(self) -> LocalRoutes | None: ...


class Exchange:
    """One request and its response; see the module docstring for the steps and the rules.

    Attributes the driver reads: `head`; `has_body` (a body follows the head);
    `continue_first` (send 100 Continue before reading the body); `replayable` (the request
    may be sent twice: its first attempt may take an idle connection unchecked, see the retry
    rule); `request_read` (the whole body was taken, `request_end`); `response_started` (a
    ResponseStart went out: a failure from now on is a cut).
    """

    __slots__ = (
        "_cap",
        "_chunked",
        "_client",
        "_limits",
        "_received",
        "_requests",
        "_rules",
        "continue_first",
        "has_body",
        "head",
        "replayable",
        "request_read",
        "response_started",
        "upgrading",
    )

    _limits: Limits
    _rules: ForwardingRules

    def __init__(self, head: RequestHead, client: ClientSide, requests: int) -> None:
        """`requests`: how many the connection received, this one included."""
        self.head = head
        self._client = client
        self._requests = requests
        self.has_body = head.chunked or bool(head.content_length)
        self.request_read = not self.has_body
        self.continue_first = head.expect_continue
        # Without a body, the client's side is done before we go upstream, and the request
        # may be sent twice.
        self.replayable = not self.has_body and head.method in REPLAYABLE_METHODS
        self.response_started = False
        self.upgrading = False  # a WebSocket handshake, relayed (set by `route`)
        self._chunked = head.chunked
        self._received = 0
        self._cap = 0

    @property
    def received(self) -> int:
        """The request body's bytes taken so far (`request_data`)."""
        return self._received

    def route(self, settings: ExchangeSettings | None) -> Endpoint | None:
        """The local endpoint that answers this request, or None to relay it; raises
        HttpRefusal for a request refused before its body: 503 without an upstream (a reload
        removed it), 413 for a Content-Length above the cap."""
        if settings is None:  # no upstream to blame but the missing one: its side's fault
            raise HttpRefusal(
                HTTPStatus.SERVICE_UNAVAILABLE,
                "the upstream was just unconfigured",
                fault="upstream",
            )
        limits = self._limits = settings.limits
        self._rules = settings.rules
        if self.head.upgrade:
            self.upgrading = _websocket_handshake(self.head)
        local = settings.local
        endpoint = local.find(self.head.target) if local is not None else None
        cap = limits.max_body_bytes
        if endpoint is not None:
            cap = min(endpoint.max_body_bytes, cap)
            self._chunked = False  # the body is ours to read, not to re-frame
        self._cap = cap
        length = self.head.content_length
        if length is not None and length > cap:
            raise _too_large(cap)
        return endpoint

    def upstream_request(self) -> bytes:
        """The request head for the upstream: rewritten fields, our framing."""
        head = self.head
        lines = upstream_request_lines(head, peer=self._client.peer, rules=self._rules)
        if self.upgrading:
            lines += _UPGRADE_LINES
        if head.chunked:
            lines.append(b"transfer-encoding: chunked")
        elif head.content_length is not None:
            lines.append(b"content-length: %d" % head.content_length)
        elif head.method in _BODY_METHODS:
            lines.append(b"content-length: 0")
        return request_head(head.method, head.target, (), lines=lines)

    def request_data(self, data: bytes) -> bytes:
        """A piece of the request body as it goes on (re-chunked for a chunked one); 413 once
        the body grows past the cap."""
        received = self._received = self._received + len(data)
        if received > self._cap:  # a chunked body that kept growing
            raise _too_large(self._cap)
        return encode_chunk(data) if self._chunked else data

    def request_end(self) -> bytes:
        """The request body is complete: what ends it for the upstream (b"" but for the last
        chunk of a chunked one; the client's trailers are dropped)."""
        self.request_read = True
        return LAST_CHUNK if self._chunked else b""

    def may_replay(self, failure: HttpRefusal, *, reused: bool, attempt: int) -> bool:
        """Whether to send the request again, on another connection, after `failure` (the
        upstream's) on `attempt`: see the retry rule."""
        return attempt == 0 and self.replayable and reused and failure.before_response

    def upstream_failed(self, failure: HttpRefusal) -> HttpRefusal | Cut:
        """What the upstream's `failure` means to the client: its status, before the response
        started; a cut once it did."""
        if self.response_started:
            return Cut(f"upstream failed mid-response: {failure.problem}", "upstream")
        return HttpRefusal(failure.status, f"upstream: {failure.problem}", fault="upstream")

    def respond(self, response: ResponseHead, *, draining: bool) -> ResponseStart:
        """The client's response head for the upstream's `response`."""
        head = self.head
        fields, framing = response_framing(response, head.method, head.version)
        fields += self._client.response_headers
        keep_alive = not (
            not self.request_read  # an early answer: the rest of the body was never read
            or framing is Framing.CLOSE
            or draining
            or self._requests >= self._limits.keepalive_requests
            or head.close
        )
        if not keep_alive:
            fields.append(_CLOSE_FIELD)
        self.response_started = True
        lines = client_response_lines(response)
        return response.status, response.reason, lines, fields, framing, keep_alive

    def switch(self, response: ResponseHead) -> ResponseStart:
        """The client's 101 for the upstream's: the connection's last HTTP (see WebSocket)."""
        fields = [*_UPGRADE_FIELDS, *self._client.response_headers]
        self.response_started = True
        lines = client_response_lines(response)
        return response.status, response.reason, lines, fields, Framing.NONE, False

    def answer_locally(self, answer: LocalAnswer, *, draining: bool) -> tuple[ResponseStart, bytes]:
        """The client's response for a local endpoint's `answer`, and its body."""
        head = self.head
        keep_alive = not (
            draining or self._requests >= self._limits.keepalive_requests or head.close
        )
        status = answer.status
        fields = [*answer.headers, *self._client.response_headers]
        no_body = status in _NO_BODY_STATUSES
        if not no_body:
            fields.append((b"content-length", b"%d" % len(answer.body)))
        if not keep_alive:
            fields.append(_CLOSE_FIELD)
        self.response_started = True
        framing = Framing.NONE if no_body or head.method == b"HEAD" else Framing.LENGTH
        reason = HTTPStatus(status).phrase.encode()
        start = status, reason, (), fields, framing, keep_alive
        return start, b"" if framing is Framing.NONE else answer.body


def _websocket_handshake(head: RequestHead) -> bool:
    """True for a WebSocket handshake we relay; HttpRefusal for any other upgrade."""
    protocol = head.upgrade
    if protocol.lower() != _WEBSOCKET:
        raise HttpRefusal(
            HTTPStatus.NOT_IMPLEMENTED,
            f"upgrade to {snippet(protocol)} is not supported (only websocket is relayed)",
            fault="client",
        )
    if head.method != b"GET" or head.version != b"1.1":
        raise HttpRefusal(
            HTTPStatus.BAD_REQUEST,
            "a WebSocket handshake is a GET in HTTP/1.1 (RFC 6455 section 4.1)",
            fault="client",
        )
    return True


def _too_large(cap: int) -> HttpRefusal:
    return HttpRefusal(
        HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body above {cap} bytes", fault="client"
    )
