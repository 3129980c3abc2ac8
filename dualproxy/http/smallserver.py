"""dualproxy's small HTTP/1.1 servers, on h11: the one place that reads their requests and
writes their answers, and the checks of who may ask.

The small servers are the admin listener (`ops.admin`), the dev bench's control endpoint
(`dev.control`), the ACME http-01 listener (`acme.challenges`) and the placeholder that answers
when no upstream is configured (`serve.server`). They answer a few requests from our own tools,
probes and CAs, so they run on h11; the relay, where speed matters, has its own strict codec.

Theory of operation. A `Connection` is h11's server side over one stream:
- `receive_request` reads one request head, exactly bounded: the head must end within
  `max_head` bytes of where the request starts, however the bytes arrive (no read goes past
  what is left of that budget; h11's own cap only bounds the buffer, give or take a read).
  Then the body, as the caller asks: left unread (`max_body=None`: the caller answers from the
  head and closes), or read up to `max_body` bytes, kept or discarded. It returns the `Request`,
  or None when the client closed (or had sent nothing) before a request began, and raises
  `HttpRefusal` for a request it cannot read (malformed: h11's status hint, 400 by default; a head
  past `max_head`: 431; a body past `max_body`: 413; a close in the middle: 400). After a
  refusal the connection carries nothing more: answer it (`can_answer`) and close.
- `send_answer` sends one whole `Answer` in one send: the standard reason phrase,
  Content-Type, Content-Length (none on 204 and 304), `Connection: close` unless kept alive,
  then the answer's own headers; to a HEAD request, the same head without the body.
- `start_next_cycle` readies a kept-alive connection for its next request.
Neither sets a deadline: the caller wraps each wait in its own (`with trio.move_on_after(...)`,
or the placeholder's drain-aware idle scope), as it governs what a wait may cost.

`answer_one_request` is the whole life of a connection to a local JSON endpoint (the admin
listener, the dev control endpoint): one request within LOCAL_REQUEST_TIMEOUT, the answer a
responder makes of it (a `HttpRefusal` as its status and {"error": why}, our own bug as a 500),
`Connection: close`, then the close.

Who may ask, as pieces each server combines as its paths need: `peer_is_loopback` (a peer on
this machine), `host_problem` (the Host header names loopback: a page that rebinds its own DNS
name to 127.0.0.1 still sends that name), `origin_problem` (browsers send Origin with every
cross-origin fetch and with every form POST or PUT; our tools and curl send none), and
`refuse_web_pages` (both, as a refusal that says why).

Every refusal here is the client's fault: it asked for what is not answered, or how it may not.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final

import h11
import trio

from dualproxy.config.names import is_loopback_host
from dualproxy.http.errors import HttpRefusal
from dualproxy.tls.streams import TLS_RECORD_PLAINTEXT

__all__ = [
    "JSON",
    "LOCAL_MAX_HEAD_BYTES",
    "LOCAL_REQUEST_TIMEOUT",
    "Answer",
    "Connection",
    "Handler",
    "Request",
    "address_is_loopback",
    "answer_one_request",
    "host_problem",
    "json_answer",
    "listens_on_loopback",
    "open_socket",
    "origin_problem",
    "peer_is_loopback",
    "refuse_web_pages",
    "serve_socket",
]

log = logging.getLogger("dualproxy")

# A local client (our CLI, curl, a scraper) sends its whole request at once; one that has not
# within this long is not one of ours, and must not hold a task. The answer and the close get
# as long again: a client that does not read them loses them, nothing else does.
LOCAL_REQUEST_TIMEOUT: Final = 5.0
# Our own clients' request heads are about 150 bytes; 8 KiB takes any tool's (curl's, a
# browser's, Prometheus's) and is nginx's request-line buffer.
LOCAL_MAX_HEAD_BYTES: Final = 8 * 1024
# The most one read takes: one TLS record's plaintext, which is what a TLS stream hands over
# per read anyway; a small server's head and body (a scenario name, a pin-failure report) take
# one or a few. A head is read in pieces of at most what is left of its budget.
_MAX_RECEIVE: Final = TLS_RECORD_PLAINTEXT
# Statuses whose answers carry no Content-Length (RFC 9110 8.6, 15.4.5) and no body.
_NO_CONTENT_LENGTH: Final = frozenset({204, 304})

JSON: Final = b"application/json"
# What a local endpoint answers when we failed (its details go to the log).
_INTERNAL_ERROR: Final = b'{"error": "internal error: see the log"}\n'


@dataclass(frozen=True, slots=True)
class Request:
    """One request as a small server sees it. `headers` as h11 gives them: names lowercase,
    in the order sent. `body` is empty when it was not read or not kept; `body_size` counts
    what was read, kept or not (for an access log); `version` as h11 read it."""

    method: bytes
    target: bytes
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""
    body_size: int = 0
    version: bytes = b"1.1"

    @property
    def path(self) -> bytes:
        """The target without its query."""
        return self.target.split(b"?", 1)[0]

    def values(self, name: bytes) -> list[bytes]:
        """Every value of the header `name` (lowercase), in the order sent."""
        return [value for field, value in self.headers if field == name]


@dataclass(frozen=True, slots=True)
class Answer:
    """One whole answer: its status, body, Content-Type (none: not sent) and its other headers
    (a 405's Allow, a redirect's Location). Content-Length and Connection are send_answer's."""

    status: int
    body: bytes = b""
    content_type: bytes | None = None
    headers: tuple[tuple[bytes, bytes], ...] = ()


def json_answer(
    status: int, document: object, headers: tuple[tuple[bytes, bytes], ...] = ()
) -> Answer:
    """`document` as indented JSON and a newline, as the local endpoints answer."""
    body = json.dumps(document, indent=2).encode() + b"\n"
    return Answer(status, body, content_type=JSON, headers=headers)


# --- one connection ----------------------------------------------------------------------


class Connection:
    """h11's server side over `stream`, for one small server's client (see the module
    docstring). One task uses it at a time."""

    def __init__(self, stream: trio.abc.Stream, *, max_head: int, received: bytes = b"") -> None:
        """`received`: the connection's first bytes, already read from `stream` (what came
        after a PROXY protocol header); they count against the head's size as any other."""
        self.stream = stream
        self._max_head = max_head
        # h11's cap on an incomplete event: past the head, it bounds a chunked body's lines.
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head)
        if received:
            self._h11.receive_data(received)
        self._head_only = False  # the request being answered is a HEAD

    async def wait_for_request(self) -> bool:
        """Wait until the next request has begun (its first bytes are here: True) or the
        client closed (False), reading nothing more than that: a server that calls it as its
        idle wait and `receive_request` after it tells an idle connection from one in the
        middle of a request."""
        if self._h11.trailing_data[0]:  # pipelined, or what came after a PROXY header
            return True
        data = await self.stream.receive_some(_MAX_RECEIVE)
        self._h11.receive_data(bytes(data))  # b"": the client closed
        return bool(data)

    async def receive_request(
        self, *, max_body: int | None = None, keep_body: bool = True
    ) -> Request | None:
        """The next request: None when the client closed before one began; HttpRefusal when it
        cannot be read. `max_body=None`: returned at its head, the body left unread;
        otherwise read up to `max_body` bytes (past it: 413) and, with `keep_body`, kept."""
        conn = self._h11
        # Bytes the client sent after the last request are the start of this one.
        received = len(conn.trailing_data[0])
        head: h11.Request | None = None
        body = bytearray()
        body_size = 0
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise HttpRefusal(
                    exc.error_status_hint, f"cannot read the request: {exc}", fault="client"
                ) from None
            if event is h11.NEED_DATA:
                if head is None:
                    if received >= self._max_head:
                        raise HttpRefusal(
                            431,
                            "cannot read the request: its head is larger than"
                            f" {self._max_head} bytes",
                            fault="client",
                        )
                    size = min(self._max_head - received, _MAX_RECEIVE)
                else:
                    size = _MAX_RECEIVE
                data = await self.stream.receive_some(size)
                received += len(data)
                conn.receive_data(bytes(data))  # b"": the client closed
            elif isinstance(event, h11.Request):
                head = event
                self._head_only = event.method == b"HEAD"
                if max_body is None:
                    return _request(head, b"", 0)
            elif isinstance(event, h11.Data):
                assert max_body is not None  # without it, the head was returned
                body_size += len(event.data)
                if body_size > max_body:
                    raise HttpRefusal(
                        413,
                        f"the request body is too large: at most {max_body} bytes",
                        fault="client",
                    )
                if keep_body:
                    body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None  # h11 ends only a message it began
                return _request(head, bytes(body), body_size)
            else:  # ConnectionClosed; or PAUSED, which start_next_cycle prevents
                return None

    @property
    def can_answer(self) -> bool:
        """Whether an answer may still be sent: none has begun on this request."""
        return self._h11.our_state in (h11.IDLE, h11.SEND_RESPONSE)

    async def send_answer(self, answer: Answer, *, keep_alive: bool = False) -> None:
        """The whole answer in one send (one TLS record, one send(2), instead of one per h11
        event); to a HEAD request, its head only. `keep_alive`: no `Connection: close` (h11
        adds it anyway when the client asked to close)."""
        headers: list[tuple[bytes, bytes]] = []
        if answer.content_type is not None:
            headers.append((b"content-type", answer.content_type))
        if answer.status not in _NO_CONTENT_LENGTH:
            headers.append((b"content-length", str(len(answer.body)).encode()))
        if not keep_alive:
            headers.append((b"connection", b"close"))
        headers += answer.headers
        reason = HTTPStatus(answer.status).phrase.encode()
        conn = self._h11
        data = conn.send(h11.Response(status_code=answer.status, headers=headers, reason=reason))
        assert data is not None  # h11 returns None only for ConnectionClosed
        if answer.body and not self._head_only:
            data += conn.send(h11.Data(data=answer.body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        await self.stream.send_all(data)

    def start_next_cycle(self) -> bool:
        """Ready for the client's next request: True when this one and its answer are complete
        and both sides keep the connection alive; False when it must close."""
        conn = self._h11
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return False
        conn.start_next_cycle()
        self._head_only = False
        return True


def _request(head: h11.Request, body: bytes, body_size: int) -> Request:
    return Request(
        head.method, head.target, tuple(head.headers), body, body_size, head.http_version
    )


# --- a local JSON endpoint's connection ----------------------------------------------------


async def answer_one_request(
    stream: trio.abc.Stream,
    respond: Callable[[Request], Awaitable[Answer]],
    *,
    max_body: int,
    what: str,
) -> None:
    """Read the one request on `stream` (LOCAL_MAX_HEAD_BYTES, `max_body`, within
    LOCAL_REQUEST_TIMEOUT), send what `respond` makes of it, then close: a HttpRefusal as its
    status and {"error": why}, our own bug as a 500 logged as `what`'s (it costs this request,
    not the server: serve_listeners would end with it). A client that sends no whole request
    in time, or leaves, is closed without an answer."""
    connection = Connection(stream, max_head=LOCAL_MAX_HEAD_BYTES)
    try:
        request: Request | None = None
        with trio.move_on_after(LOCAL_REQUEST_TIMEOUT):
            request = await connection.receive_request(max_body=max_body)
        if request is None:
            return
        await _send_last(connection, await respond(request))
    except HttpRefusal as refused:
        error = json_answer(refused.status, {"error": refused.problem}, refused.headers)
        await _send_last(connection, error)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client left
    except Exception:
        log.exception("%s: internal error", what)
        await _send_last(connection, Answer(500, _INTERNAL_ERROR, content_type=JSON))
    finally:
        with trio.move_on_after(LOCAL_REQUEST_TIMEOUT):
            await stream.aclose()


async def _send_last(connection: Connection, answer: Answer) -> None:
    """The connection's answer, unless one has begun; a client that left or does not read
    loses it, nothing else depends on it."""
    if not connection.can_answer:
        return
    with (
        trio.move_on_after(LOCAL_REQUEST_TIMEOUT),
        contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
    ):
        await connection.send_answer(answer)


# --- who may ask ---------------------------------------------------------------------------


def address_is_loopback(host: str) -> bool:
    """Whether an address as the socket API gives it ("127.0.0.1", "::1", "::ffff:127.0.0.1",
    with or without a "%zone") is loopback; anything else, a name included, is not."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def peer_is_loopback(stream: trio.SocketStream) -> bool:
    """Whether the client on `stream` is on this machine."""
    try:
        return address_is_loopback(str(stream.socket.getpeername()[0]))
    except (OSError, IndexError):  # gone already, or not an IP socket
        return False


def listens_on_loopback(sock: socket.socket) -> bool:
    """Whether a listening socket is bound to a loopback address (only this machine reaches
    it)."""
    return address_is_loopback(str(sock.getsockname()[0]))


def host_problem(request: Request) -> str | None:
    """What is wrong with the request's Host for an endpoint of this machine only: it must be
    one Host naming loopback (DNS rebinding, see the module docstring); None when it does."""
    hosts = [value.decode("latin-1") for value in request.values(b"host")]
    if len(hosts) == 1 and _is_loopback_host(hosts[0]):
        return None
    return (
        f"Host {', '.join(hosts)!r} is not this machine's loopback: the admin endpoint"
        " answers only requests for localhost, 127.0.0.1 or [::1]"
    )


def origin_problem(request: Request) -> str | None:
    """What is wrong with a request sent by a web page (it carries Origin); None otherwise."""
    origins = request.values(b"origin")
    if not origins:
        return None
    return f"refused a request from a web page (Origin: {origins[0].decode('latin-1')})"


def refuse_web_pages(request: Request, advice: str) -> None:
    """HttpRefusal (403) unless the request has no Origin and a loopback Host; the message says
    why and, for a web page, ends with `advice` (how to ask instead)."""
    if (problem := origin_problem(request)) is not None:
        raise HttpRefusal(403, f"{problem}: {advice}", fault="client")
    if (problem := host_problem(request)) is not None:
        raise HttpRefusal(403, problem, fault="client")


def _is_loopback_host(host: str) -> bool:
    """A Host value naming loopback (localhost, 127.0.0.0/8, [::1]), with or without a port."""
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        port_ok = rest == "" or (rest.startswith(":") and rest[1:].isdigit())
    else:
        name, colon, port = host.partition(":")
        port_ok = not colon or port.isdigit()
    return port_ok and is_loopback_host(name)


# --- listening -----------------------------------------------------------------------------

Handler = Callable[[trio.SocketStream], Awaitable[None]]


def open_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on `host` (IPv4 or IPv6), to bind before the event loop starts
    (so a port in use is reported before anything else runs). Raises OSError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)


async def serve_socket(
    sock: socket.socket,
    handle: Handler,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Hand each connection on `sock` to `handle`, in its own task, until cancelled; reports
    the listener once accepting. On a loopback listener a peer that is not on this machine
    (which cannot happen) is closed unheard."""
    on_loopback = listens_on_loopback(sock)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))

    async def handler(stream: trio.SocketStream) -> None:
        if on_loopback and not peer_is_loopback(stream):
            await trio.aclose_forcefully(stream)
            return
        await handle(stream)

    await trio.serve_listeners(handler, [listener], task_status=task_status)
