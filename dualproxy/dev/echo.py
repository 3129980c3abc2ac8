"""The dev bench's built-in upstream: it answers every request with JSON describing the request
exactly as it arrived, so the whole chain app -> dualproxy -> upstream is visible from the app.

What the JSON shows is what dualproxy forwarded: the Host it rewrote, the X-Forwarded-* fields
it added, the client's fields that survived (hop-by-hop ones are gone), in their order and with
their case, and the body's length and SHA-256 (not the body: uploads can be large).

    {"upstream": "dualproxy dev echo", "method": "GET", "target": "/v1/me?x=1",
     "http_version": "1.1", "headers": [["Host", "127.0.0.1:40123"], ...],
     "body_length": 0, "body_sha256": "e3b0c4..."}

Plain HTTP/1.1 with keep-alive, on a loopback port the kernel picks: it is only ever dualproxy's
upstream. `describe` is pure; `handle` serves one connection; `serve` accepts.
"""

from __future__ import annotations

import hashlib
import json
import socket
from http import HTTPStatus
from typing import Final

import h11
import trio

from dualproxy.tls.streams import RECEIVE_SIZE

__all__ = ["ECHO_IDLE_TIMEOUT", "describe", "handle", "open_socket", "serve"]

# An idle keep-alive connection is closed after this. Longer than dualproxy's pool keeps an
# idle upstream connection (upstream.pool_idle_timeout, 30 s by default), so the proxy always
# closes first and never picks a connection we are about to drop. It also bounds each wait
# for the rest of a request.
ECHO_IDLE_TIMEOUT: Final = 120.0
# Request heads up to this size are read: above anything dualproxy forwards (its own limit,
# limits.max_header_bytes, goes up to 1 MiB, plus the X-Forwarded-* fields it adds).
ECHO_MAX_HEAD_BYTES: Final = 2 * 1024 * 1024
# How long a goodbye (our close) may take when the proxy stopped reading.
CLOSE_TIMEOUT: Final = 1.0
NAME: Final = "dualproxy dev echo"


def describe(request: h11.Request, body_length: int, body_sha256: str) -> bytes:
    """The JSON answer to `request` (whose body had that length and digest): indented for
    people reading curl's output, one header field per line."""
    # latin-1 maps every byte to one character: nothing a client sent is lost or refused.
    fields = {
        "upstream": NAME,
        "method": request.method.decode("latin-1"),
        "target": request.target.decode("latin-1"),
        "http_version": request.http_version.decode("latin-1"),
    }
    headers = [
        json.dumps([name.decode("latin-1"), value.decode("latin-1")])
        for name, value in request.headers.raw_items()
    ]
    lines = [f"  {json.dumps(key)}: {json.dumps(value)}," for key, value in fields.items()]
    lines += ['  "headers": [', ",\n".join(f"    {header}" for header in headers), "  ],"]
    lines += [f'  "body_length": {body_length},', f'  "body_sha256": {json.dumps(body_sha256)}']
    return ("{\n" + "\n".join(line for line in lines if line) + "\n}\n").encode()


async def handle(stream: trio.abc.Stream) -> None:
    """Serve one connection until the client closes it, errs, or idles ECHO_IDLE_TIMEOUT."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=ECHO_MAX_HEAD_BYTES)
    try:
        while True:
            request: h11.Request | None = None
            complete = False
            length, digest = 0, hashlib.sha256()
            with trio.move_on_after(ECHO_IDLE_TIMEOUT):
                while True:  # one request; bounded by the timeout around it
                    try:
                        event = conn.next_event()
                    except h11.RemoteProtocolError as exc:
                        await _refuse(stream, conn, exc)
                        return
                    if event is h11.NEED_DATA:
                        conn.receive_data(bytes(await stream.receive_some(RECEIVE_SIZE)))
                    elif isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.Data):
                        length += len(event.data)
                        digest.update(event.data)
                    elif isinstance(event, h11.EndOfMessage):
                        complete = True
                        break
                    else:  # ConnectionClosed, or PAUSED (cannot happen before EndOfMessage)
                        return
            if not complete or request is None:
                return  # timed out
            body = describe(request, length, digest.hexdigest())
            head_only = request.method == b"HEAD"
            response = h11.Response(
                status_code=200,
                reason=b"OK",
                headers=[
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            )
            data = conn.send(response) or b""
            if not head_only:
                data += conn.send(h11.Data(data=body)) or b""
            data += conn.send(h11.EndOfMessage()) or b""
            await stream.send_all(data)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return  # Connection: close from the client
            conn.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the proxy went away: nothing to answer
    finally:
        with trio.move_on_after(CLOSE_TIMEOUT):
            await stream.aclose()


async def _refuse(
    stream: trio.abc.Stream, conn: h11.Connection, exc: h11.RemoteProtocolError
) -> None:
    """A 400 naming what h11 could not read (dualproxy never forwards such a request)."""
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    body = f"{NAME}: bad request: {exc}\n".encode()
    response = h11.Response(
        status_code=exc.error_status_hint,
        reason=HTTPStatus(exc.error_status_hint).phrase.encode(),
        headers=[
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ],
    )
    await stream.send_all(
        (conn.send(response) or b"")
        + (conn.send(h11.Data(data=body)) or b"")
        + (conn.send(h11.EndOfMessage()) or b"")
    )


def open_socket(host: str = "127.0.0.1") -> socket.socket:
    """A listening socket on a free loopback port, made before the event loop starts, so the
    bench knows its upstream URL while it builds its config. Raises OSError."""
    return socket.create_server((host, 0))


async def serve(
    sock: socket.socket,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept on `sock` (from open_socket) until cancelled; reports once accepting."""
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    await trio.serve_listeners(handle, [listener], task_status=task_status)
