"""The responder for a config without [upstream]: every request answered here, on h11.

Without an upstream, dualproxy answers every request itself with a short fixed response (the
dev bench, TLS and pin testing), or from its local endpoints (the pin manifest, pin-failure
reports: pinning.endpoints) when the config has them. It honours keep-alive, so that clients
behave as they will in front of a real upstream, and the drain: an idle connection closes, a
response says `Connection: close`. A request it cannot read gets a 400 and, because its
client may still be sending, a lingering close (the caller's: `respond` returns True).

Every wait is bounded: the first request by limits.request_header_timeout, the next ones by
limits.keepalive_timeout; the head by h11's cap (MAX_REQUEST_HEAD_BYTES), the body by
PLACEHOLDER_MAX_BODY or the endpoint's own cap.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from http import HTTPStatus
from typing import Final

import h11

from dualproxy.config.schema import Limits
from dualproxy.http.relay import Drain
from dualproxy.pinning import endpoints
from dualproxy.serve.connection import ConnectionRecord
from dualproxy.tls.streams import TLS_RECORD_PLAINTEXT, TlsStream, receive_h11_request

__all__ = ["MAX_REQUEST_HEAD_BYTES", "PLACEHOLDER_MAX_BODY", "respond"]

# Request bodies the placeholder responder reads and discards, in bytes: enough for any
# health-check POST, small enough that nobody can make us read a file upload for nothing.
PLACEHOLDER_MAX_BODY: Final = 64 * 1024
# h11's own cap on an incomplete request head; 16 KiB like nginx's large_client_header_buffers.
MAX_REQUEST_HEAD_BYTES: Final = 16 * 1024
_NO_UPSTREAM_ANSWER: Final = b"dualproxy: TLS terminated; no upstream is configured yet.\n"


async def respond(
    tls: TlsStream,
    record: ConnectionRecord,
    *,
    limits: Limits,
    drain: Drain,
    local: Callable[[], endpoints.LocalEndpoints | None],
    response_headers: Sequence[tuple[bytes, bytes]] = (),
) -> bool:
    """Answer the requests of one connection until it ends (see the module docstring); True
    after a 400, whose client may still be sending.

    `local` gives the server's local endpoints now (a reload may change them between two
    requests); `response_headers` go on every response.
    """
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES)
    while True:
        # The first request may take the header timeout; later ones may idle for the
        # keep-alive timeout first. The drain ends the wait (the whole request is small).
        wait = limits.keepalive_timeout if record.requests else limits.request_header_timeout
        request: h11.Request | None = None  # stays None when the wait times out
        body = bytearray()
        endpoints_now = local()
        with drain.idle(wait):
            request = await _receive_request(
                tls, conn, body, endpoints_now.max_body_bytes if endpoints_now is not None else 0
            )
        if request is None or conn.their_state is h11.ERROR:
            # A bad head leaves our side IDLE, a bad body after a good head in
            # SEND_RESPONSE; h11 lets a server answer 400 from either.
            answerable = conn.our_state is h11.IDLE or conn.our_state is h11.SEND_RESPONSE
            if conn.their_state is h11.ERROR and answerable:
                record.response_generated(400)
                await _send_simple(tls, conn, 400, b"bad request\n", keep_alive=False)
                return True
            return False
        record.request_received()
        head_only = request.method == b"HEAD"
        endpoint = endpoints_now.find(request.target) if endpoints_now is not None else None
        if endpoint is not None and len(body) > endpoint.max_body_bytes:
            status, reply = 413, b"request body too large\n"
            headers = [(b"content-type", b"text/plain; charset=utf-8")]
        elif endpoint is not None:  # the pin manifest, a pin-failure report
            answer = await endpoint.answer(
                endpoints.LocalRequest(
                    request.method,
                    request.target,
                    list(request.headers),
                    record.peer_ip,
                    bytes(body),
                )
            )
            status, reply, headers = answer.status, answer.body, [*answer.headers]
        else:
            status, reply = 200, _NO_UPSTREAM_ANSWER
            headers = [(b"content-type", b"text/plain; charset=utf-8")]
        record.response_generated(status)
        headers += response_headers
        await _send_simple(
            tls,
            conn,
            status,
            reply,
            extra_headers=headers,
            head_only=head_only,
            keep_alive=not drain.draining,
        )
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return False
        conn.start_next_cycle()


async def _receive_request(
    tls: TlsStream, conn: h11.Connection, kept: bytearray, keep: int
) -> h11.Request | None:
    """The next request, its body read (bounded) and, when `keep` (a local endpoint's cap) is
    not 0, kept in `kept`, otherwise discarded; None when the client closed, sent too large a
    body or something h11 rejects (their_state is then ERROR)."""
    cap = max(PLACEHOLDER_MAX_BODY, keep)
    received = 0

    def take(data: bytes) -> None:
        nonlocal received
        received += len(data)
        if received > cap:
            raise _BodyTooLarge
        if keep:
            kept.extend(data)

    try:
        # A TLS stream's read returns one record's plaintext at most.
        return await receive_h11_request(tls, conn, receive_size=TLS_RECORD_PLAINTEXT, on_body=take)
    except (h11.RemoteProtocolError, _BodyTooLarge):
        return None


class _BodyTooLarge(Exception):
    """A request body past what the placeholder reads."""


async def _send_simple(
    tls: TlsStream,
    conn: h11.Connection,
    status: int,
    body: bytes,
    *,
    extra_headers: Sequence[tuple[bytes, bytes]] = (),
    keep_alive: bool = True,
    head_only: bool = False,
) -> None:
    """One whole response; `head_only` (for HEAD) sends the GET headers without the body,
    which h11 would refuse to send as too much data for a response to HEAD.

    Sent with one send_all: one TLS record and one send(2) instead of one per h11 event;
    on a connection that carries one request, each send is a sizeable part of its cost."""
    # A 204 or 304 carries no Content-Length (RFC 9110 §8.6, §15.4.5).
    headers = [] if status in (204, 304) else [(b"content-length", str(len(body)).encode())]
    headers += extra_headers
    if not keep_alive:
        headers.append((b"connection", b"close"))
    reason = HTTPStatus(status).phrase.encode()
    events: list[h11.Response | h11.Data | h11.EndOfMessage] = [
        h11.Response(status_code=status, headers=headers, reason=reason)
    ]
    if not head_only:
        events.append(h11.Data(data=body))
    events.append(h11.EndOfMessage())
    chunks = []
    for event in events:
        data = conn.send(event)
        assert data is not None
        chunks.append(data)
    await tls.send_all(b"".join(chunks))
