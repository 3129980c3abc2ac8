"""The responder for a config without [upstream]: every request answered here, through the
small servers' helper (`http.smallserver`, on h11).

Without an upstream, dualproxy answers every request itself with a short fixed response (the
dev bench, TLS and pin testing), or from its local endpoints (the pin manifest, pin-failure
reports: pinning.endpoints) when the config has them. It honours keep-alive, so that clients
behave as they will in front of a real upstream, and the drain: an idle connection closes, a
response says `Connection: close`. A request it cannot read gets a 400 and, because its
client may still be sending, a lingering close (the caller's: `respond` returns True).

Every wait is bounded: the first request by limits.request_header_timeout, the next ones by
limits.keepalive_timeout; the head by MAX_REQUEST_HEAD_BYTES, the body by
PLACEHOLDER_MAX_BODY or the endpoint's own cap (a larger one closes the connection unanswered).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from http import HTTPStatus
from typing import Final

import trio

from dualproxy.config.schema import Limits
from dualproxy.http import smallserver
from dualproxy.http.errors import HttpRefusal
from dualproxy.http.local import Endpoint, LocalAnswer, LocalRequest, LocalRoutes
from dualproxy.http.relay import Drain
from dualproxy.serve.connection import ConnectionRecord
from dualproxy.tls.streams import TlsStream

__all__ = ["MAX_REQUEST_HEAD_BYTES", "PLACEHOLDER_MAX_BODY", "PlaceholderRoutes", "respond"]

# Request bodies the placeholder responder reads and discards, in bytes: enough for any
# health-check POST, small enough that nobody can make us read a file upload for nothing.
PLACEHOLDER_MAX_BODY: Final = 64 * 1024
# A request head, exactly (431 past it); 16 KiB like nginx's large_client_header_buffers.
MAX_REQUEST_HEAD_BYTES: Final = 16 * 1024
_NO_UPSTREAM_ANSWER: Final = b"dualproxy: TLS terminated; no upstream is configured yet.\n"
_TEXT: Final = b"text/plain; charset=utf-8"


async def respond(
    tls: TlsStream,
    record: ConnectionRecord,
    *,
    limits: Limits,
    drain: Drain,
    local: Callable[[], LocalRoutes | None],
    response_headers: Sequence[tuple[bytes, bytes]] = (),
) -> bool:
    """Answer the requests of one connection until it ends (see the module docstring); True
    after a 400, whose client may still be sending.

    `local` gives the server's local endpoints now (a reload may change them between two
    requests); `response_headers` go on every response.
    """
    connection = smallserver.Connection(tls, max_head=MAX_REQUEST_HEAD_BYTES)
    while True:
        # The first request may take the header timeout; later ones may idle for the
        # keep-alive timeout first. The drain (or a reclaim at the connection limit) ends the
        # idle wait; once a request has begun, it has request_header_timeout to arrive whole
        # (it is small: PLACEHOLDER_MAX_BODY).
        wait = limits.keepalive_timeout if record.requests else limits.request_header_timeout
        endpoints_now = local()
        keep = endpoints_now.max_body_bytes if endpoints_now is not None else 0
        request: smallserver.Request | None = None  # stays None when a wait times out
        begun_at = 0.0
        try:
            begun = False
            with drain.idle(wait, reclaimable=bool(record.requests)):
                begun = await connection.wait_for_request()
            if begun:
                begun_at = trio.current_time()
                with trio.move_on_after(limits.request_header_timeout):
                    request = await connection.receive_request(
                        max_body=max(PLACEHOLDER_MAX_BODY, keep), keep_body=keep != 0
                    )
        except HttpRefusal as refused:
            if refused.status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE:
                return False  # a body past what we read: closed unanswered
            record.response_generated(HTTPStatus.BAD_REQUEST)
            refusal = smallserver.Answer(HTTPStatus.BAD_REQUEST, b"bad request\n")
            await connection.send_answer(refusal)
            _log_exchange(record, None, refusal, begun_at, f"{refused.status} {refused.problem}")
            return True
        if request is None:
            return False
        record.request_received()
        endpoint = endpoints_now.find(request.target) if endpoints_now is not None else None
        if endpoint is not None and len(request.body) > endpoint.max_body_bytes:
            answer = smallserver.Answer(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, b"request body too large\n", content_type=_TEXT
            )
        elif endpoint is not None:  # the pin manifest, a pin-failure report
            local_answer = await endpoint.answer(
                LocalRequest(
                    request.method,
                    request.target,
                    list(request.headers),
                    record.peer_ip,
                    request.body,
                )
            )
            answer = smallserver.Answer(
                local_answer.status, local_answer.body, headers=tuple(local_answer.headers)
            )
        else:
            answer = smallserver.Answer(HTTPStatus.OK, _NO_UPSTREAM_ANSWER, content_type=_TEXT)
        record.response_generated(answer.status)
        if response_headers:
            answer = replace(answer, headers=(*answer.headers, *response_headers))
        await connection.send_answer(answer, keep_alive=not drain.draining)
        _log_exchange(record, request, answer, begun_at, None)
        if not connection.start_next_cycle():
            return False


def _log_exchange(
    record: ConnectionRecord,
    request: smallserver.Request | None,
    answer: smallserver.Answer,
    begun_at: float,
    ended: str | None,
) -> None:
    """The exchange's access log line, as the relay writes one (http.settings.Tally): a
    request the placeholder answered is a request like any other in the log."""
    method, target, version, received = b"-", b"-", b"1.1", 0
    if request is not None:
        method, target, version, received = (
            request.method,
            request.target,
            request.version,
            request.body_size,
        )
    record.exchange_ended(
        method,
        target,
        version,
        answer.status,
        received,
        0 if method == b"HEAD" else len(answer.body),
        trio.current_time() - begun_at,
        None,
        ended,
    )


class _NoUpstream:
    """The fixed answer, as a local endpoint."""

    max_body_bytes = PLACEHOLDER_MAX_BODY

    async def answer(self, request: LocalRequest) -> LocalAnswer:
        return LocalAnswer(HTTPStatus.OK, [(b"content-type", _TEXT)], _NO_UPSTREAM_ANSWER)


class PlaceholderRoutes:
    """The placeholder as local routes, for HTTP/2 streams (http.h2.LocalOnly): the server's
    local endpoints (`local()`, now) where they answer, the fixed answer everywhere else."""

    def __init__(self, local: Callable[[], LocalRoutes | None]) -> None:
        self._local = local
        self._fixed = _NoUpstream()

    @property
    def max_body_bytes(self) -> int:
        routes = self._local()
        return max(PLACEHOLDER_MAX_BODY, routes.max_body_bytes if routes is not None else 0)

    def find(self, target: bytes) -> Endpoint | None:
        routes = self._local()
        endpoint = routes.find(target) if routes is not None else None
        return endpoint if endpoint is not None else self._fixed
