"""exchange.py without sockets: every row of the failure and expiry tables, the routing and
size refusals, the upstream request's framing, the body re-framing, 100-continue, the retry
rule, refusal against cut, the keep-alive decision (table-driven, and Hypothesis against the
rule read plainly), the client's response heads, and when a connection lingers."""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass, replace
from http import HTTPStatus
from typing import Any, Final

import h11
import pytest
from helpers.messages import HOST, request
from helpers.profiles import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from dualproxy.config.schema import Limits, UpstreamConfig
from dualproxy.http.body import LAST_CHUNK
from dualproxy.http.errors import HttpRefusal
from dualproxy.http.exchange import (
    ALLOWED_METHODS,
    CLIENT_LEFT,
    REPLAYABLE_METHODS,
    WAIT_BOUNDS,
    ClientSide,
    Cut,
    Exchange,
    Framing,
    ResponseStart,
    Wait,
    client_may_be_sending,
    expired,
    refusal_response,
    response_framing,
    wait_bounds,
)
from dualproxy.http.heads import (
    HeadLimits,
    RequestHead,
    ResponseHead,
    check_request_head,
    check_response_head,
    response_head,
)
from dualproxy.http.local import LocalAnswer, LocalRequest
from dualproxy.http.rewrite import ClientPeer, ForwardingRules

LIMITS: Final = Limits(upstream_timeout=7, max_body_bytes=100)
RULES: Final = ForwardingRules.from_config(
    UpstreamConfig(
        url="https://api.upstream.test", scheme="https", host="api.upstream.test", port=443
    )
)
CLIENT: Final = ClientSide(ClientPeer.of(ipaddress.ip_address("203.0.113.5")))
DEV: Final = ClientSide(None, ((b"x-dualproxy-key", b"k1"),))
# Hypothesis examples per property, as in the other pure modules' tests.
EXAMPLES: Final = 200

# limits.keepalive_requests as the tests' Limits() have it (nginx's keepalive_requests).
KEEPALIVE_REQUESTS: Final = Limits().keepalive_requests


@dataclass(frozen=True)
class Route:
    """A local endpoint as routing sees it: the exchange never asks it to answer."""

    max_body_bytes: int

    async def answer(self, request: LocalRequest) -> LocalAnswer:
        raise AssertionError(f"the exchange answered {request.target!r} itself")


@dataclass(frozen=True)
class Routes:
    """Local endpoints by exact path."""

    by_path: dict[bytes, Route]

    @property
    def max_body_bytes(self) -> int:
        return max(route.max_body_bytes for route in self.by_path.values())

    def find(self, target: bytes) -> Route | None:
        return self.by_path.get(target)


@dataclass(frozen=True)
class Settings:
    limits: Limits = LIMITS
    rules: ForwardingRules = RULES
    local: Routes | None = None


def head(*fields: bytes, line: bytes = b"GET /v1/items HTTP/1.1") -> RequestHead:
    return check_request_head(request(HOST, *fields, line=line), HeadLimits())


def response(
    *fields: bytes, line: bytes = b"HTTP/1.1 200 OK", method: bytes = b"GET"
) -> ResponseHead:
    raw = line + b"\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n"
    return check_response_head(raw, request_method=method)


def exchange(
    request_head: RequestHead | None = None, *, requests: int = 1, client: ClientSide = CLIENT
) -> Exchange:
    """An exchange routed to the upstream."""
    started = Exchange(request_head or head(), client, requests)
    assert started.route(Settings()) is None
    return started


def written(start: ResponseStart) -> bytes:
    """A response head as the HTTP/1.1 driver writes it."""
    status, reason, lines, fields, _, _ = start
    return response_head(status, reason, fields, lines=lines)


# --- waits and what their expiry means ------------------------------------------------------


@pytest.mark.parametrize(
    ("wait", "meaning"),
    [
        (Wait.FIRST_REQUEST, None),
        (Wait.NEXT_REQUEST, None),
        (Wait.CLIENT_HEAD, (408, "request head not complete within the time allowed", "client")),
        (Wait.CLIENT_BODY, (408, "request body stalled longer than allowed", "client")),
        (Wait.CLIENT_SEND, Cut("client did not read for send_timeout", "client")),
        (
            Wait.UPSTREAM_SEND,
            (504, "upstream: upstream did not take the request within 7 s", "upstream"),
        ),
        (Wait.UPSTREAM_HEAD, (504, "upstream: no response head within 7 s", "upstream")),
        (
            Wait.UPSTREAM_BODY,
            Cut("upstream failed mid-response: response body stalled for 7 s", "upstream"),
        ),
    ],
)
def test_what_an_expired_wait_means(wait: Wait, meaning: object) -> None:
    outcome = expired(wait, LIMITS)
    if isinstance(outcome, HttpRefusal):
        assert (outcome.status, outcome.problem, outcome.fault) == meaning
    else:
        assert outcome == meaning


def test_every_wait_has_a_meaning_and_a_bound() -> None:
    assert set(WAIT_BOUNDS) == set(Wait)
    for wait in Wait:
        expired(wait, LIMITS)  # none falls through
    assert Cut("client closed while waiting for the upstream's response", "client") == CLIENT_LEFT


def test_each_wait_is_bounded_by_its_own_setting() -> None:
    """Each setting moves exactly the waits it names, and no other (the negative twin)."""
    base = wait_bounds(Limits())
    for name in set(WAIT_BOUNDS.values()):
        change: dict[str, Any] = {name: 1234.5}
        changed = wait_bounds(dataclasses.replace(Limits(), **change))
        for wait in Wait:
            expected = 1234.5 if WAIT_BOUNDS[wait] == name else base[wait]
            assert changed[wait] == expected, (name, wait)


@pytest.mark.parametrize(
    ("request_read", "eof", "buffered", "lingers"),
    [
        (False, False, False, True),  # the rest of the request may still come
        (False, True, False, False),  # the client closed: nothing more comes
        (True, False, False, False),  # read to its end, nothing after it
        (True, False, True, True),  # bytes past it: a pipelined request, or a body unframed
        (True, True, True, False),
    ],
)
def test_when_a_connection_lingers(
    request_read: bool, eof: bool, buffered: bool, lingers: bool
) -> None:
    assert client_may_be_sending(request_read=request_read, eof=eof, buffered=buffered) is lingers


# --- routing and the request ------------------------------------------------------------------


def test_a_local_path_is_answered_locally_within_its_own_cap() -> None:
    routes = Routes({b"/.well-known/pins": Route(max_body_bytes=10)})
    local = Exchange(
        head(b"Content-Length: 10", line=b"POST /.well-known/pins HTTP/1.1"), CLIENT, 1
    )
    assert local.route(Settings(local=routes)) == Route(10)
    over = Exchange(head(b"Content-Length: 11", line=b"POST /.well-known/pins HTTP/1.1"), CLIENT, 1)
    with pytest.raises(HttpRefusal) as refused:
        over.route(Settings(local=routes))
    assert (refused.value.status, refused.value.problem) == (413, "request body above 10 bytes")
    # Twin: the same body to a relayed path is within max_body_bytes (100).
    relayed = Exchange(head(b"Content-Length: 11", line=b"POST /v1/items HTTP/1.1"), CLIENT, 1)
    assert relayed.route(Settings(local=routes)) is None


def test_a_local_cap_above_max_body_bytes_is_held_to_it() -> None:
    routes = Routes({b"/r": Route(max_body_bytes=10_000)})
    with pytest.raises(HttpRefusal, match="above 100 bytes"):
        Exchange(head(b"Content-Length: 101", line=b"POST /r HTTP/1.1"), CLIENT, 1).route(
            Settings(local=routes)
        )


@pytest.mark.parametrize(("length", "refused"), [(100, False), (101, True)])
def test_a_content_length_above_the_cap_is_refused_before_the_body(
    length: int, refused: bool
) -> None:
    started = Exchange(
        head(b"Content-Length: %d" % length, line=b"PUT /v1/items HTTP/1.1"), CLIENT, 1
    )
    if refused:
        with pytest.raises(HttpRefusal) as refusal:
            started.route(Settings())
        assert (refusal.value.status, refusal.value.fault) == (413, "client")
    else:
        assert started.route(Settings()) is None


def test_without_settings_the_request_gets_503() -> None:
    with pytest.raises(HttpRefusal) as refused:
        Exchange(head(), CLIENT, 1).route(None)
    assert (refused.value.status, refused.value.problem) == (
        503,
        "the upstream was just unconfigured",
    )


@pytest.mark.parametrize(
    ("fields", "line", "framing"),
    [
        ((), b"GET /v1/items HTTP/1.1", None),
        ((b"Content-Length: 5",), b"POST /v1/items HTTP/1.1", b"content-length: 5"),
        (
            (b"Transfer-Encoding: chunked",),
            b"POST /v1/items HTTP/1.1",
            b"transfer-encoding: chunked",
        ),
        ((), b"POST /v1/items HTTP/1.1", b"content-length: 0"),  # what Google's front ends want
        ((), b"PATCH /v1/items HTTP/1.1", b"content-length: 0"),
        ((), b"DELETE /v1/items HTTP/1.1", None),
    ],
)
def test_the_upstream_request_carries_our_framing(
    fields: tuple[bytes, ...], line: bytes, framing: bytes | None
) -> None:
    sent = exchange(head(*fields, b"Expect: 100-continue", line=line)).upstream_request()
    method, target, _ = line.split(b" ")
    expected = [
        method + b" " + target + b" HTTP/1.1",
        b"host: api.upstream.test",
        b"x-forwarded-for: 203.0.113.5",
        b"x-forwarded-proto: https",
        b"x-forwarded-host: api.example.com",
        *([framing] if framing else []),
    ]
    assert sent == b"\r\n".join(expected) + b"\r\n\r\n"  # and no Expect: we answer it


def test_a_chunked_body_is_chunked_again_and_ends_with_the_last_chunk() -> None:
    started = exchange(head(b"Transfer-Encoding: chunked", line=b"POST / HTTP/1.1"))
    assert (started.has_body, started.request_read) == (True, False)
    assert started.request_data(b"hello") == b"5\r\nhello\r\n"
    assert started.request_end() == LAST_CHUNK
    assert started.request_read


def test_a_body_of_known_length_goes_as_it_is() -> None:
    started = exchange(head(b"Content-Length: 5", line=b"POST / HTTP/1.1"))
    assert started.request_data(b"hello") == b"hello"
    assert started.request_end() == b""


def test_a_local_endpoint_gets_the_body_unframed() -> None:
    started = Exchange(head(b"Transfer-Encoding: chunked", line=b"POST /r HTTP/1.1"), CLIENT, 1)
    started.route(Settings(local=Routes({b"/r": Route(max_body_bytes=10)})))
    assert started.request_data(b"hello") == b"hello"
    assert started.request_end() == b""


def test_a_chunked_body_growing_past_the_cap_gets_413() -> None:
    started = exchange(head(b"Transfer-Encoding: chunked", line=b"POST / HTTP/1.1"))
    started.request_data(b"x" * 60)
    started.request_data(b"x" * 40)  # exactly the cap: still fine
    with pytest.raises(HttpRefusal) as refused:
        started.request_data(b"x")
    assert (refused.value.status, refused.value.problem) == (413, "request body above 100 bytes")


@pytest.mark.parametrize(
    ("line", "fields", "first"),
    [
        (b"POST / HTTP/1.1", (b"Expect: 100-continue", b"Content-Length: 5"), True),
        (b"POST / HTTP/1.1", (b"Content-Length: 5",), False),
        (b"POST / HTTP/1.0", (b"Expect: 100-continue", b"Content-Length: 5"), False),  # ignored
    ],
)
def test_100_continue_is_sent_when_asked_for(
    line: bytes, fields: tuple[bytes, ...], first: bool
) -> None:
    assert exchange(head(*fields, line=line)).continue_first is first


# --- the retry rule, and refusal against cut ----------------------------------------------------


def failure(*, before_response: bool = True, status: int = 502) -> HttpRefusal:
    return HttpRefusal(
        status, "connection lost (reset)", fault="upstream", before_response=before_response
    )


@pytest.mark.parametrize(
    "method", [b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"POST", b"PATCH"]
)
def test_only_idempotent_bodiless_requests_are_replayable(method: bytes) -> None:
    bodiless = exchange(head(line=method + b" / HTTP/1.1"))
    assert bodiless.replayable is (method in REPLAYABLE_METHODS)
    with_body = exchange(head(b"Content-Length: 1", line=method + b" / HTTP/1.1"))
    assert not with_body.replayable


@pytest.mark.parametrize(
    ("attempt", "reused", "before_response", "replayed"),
    [
        (0, True, True, True),  # a pooled connection the upstream had closed: once more
        (1, True, True, False),  # only once
        (0, False, True, False),  # a fresh connection that fails is a real failure
        (0, True, False, False),  # a response had started: never twice
    ],
)
def test_the_retry_rule(attempt: int, reused: bool, before_response: bool, replayed: bool) -> None:
    started = exchange()
    outcome = started.may_replay(
        failure(before_response=before_response), reused=reused, attempt=attempt
    )
    assert outcome is replayed
    not_replayable = exchange(head(line=b"POST / HTTP/1.1"))
    assert not not_replayable.may_replay(failure(), reused=True, attempt=0)


def test_an_upstream_failure_is_refused_before_the_response_and_cut_after() -> None:
    started = exchange()
    before = started.upstream_failed(failure(status=504))
    assert isinstance(before, HttpRefusal)
    assert (before.status, before.problem, before.fault) == (
        504,
        "upstream: connection lost (reset)",
        "upstream",
    )
    started.respond(response(b"Content-Length: 5"), draining=False)
    after = started.upstream_failed(failure(before_response=False))
    assert after == Cut("upstream failed mid-response: connection lost (reset)", "upstream")


# --- the response ---------------------------------------------------------------------------


def test_golden_relayed_response_head() -> None:
    upstream = response(b"Content-Type: application/json", b"Set-Cookie: a=1", b"Content-Length: 2")
    start = exchange(client=DEV).respond(upstream, draining=False)
    assert start[4:] == (Framing.LENGTH, True)
    assert written(start) == (
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Type: application/json\r\n"
        b"Set-Cookie: a=1\r\n"
        b"content-length: 2\r\n"
        b"x-dualproxy-key: k1\r\n"
        b"\r\n"
    )


@pytest.mark.parametrize(
    ("request_fields", "line", "requests", "draining", "body_read", "upstream_fields", "closes"),
    [
        ((), b"GET / HTTP/1.1", 1, False, True, (b"Content-Length: 2",), False),
        ((b"Connection: close",), b"GET / HTTP/1.1", 1, False, True, (b"Content-Length: 2",), True),
        ((), b"GET / HTTP/1.0", 1, False, True, (b"Content-Length: 2",), True),
        ((), b"GET / HTTP/1.1", 1, True, True, (b"Content-Length: 2",), True),  # the drain
        (
            (),
            b"GET / HTTP/1.1",
            KEEPALIVE_REQUESTS - 1,
            False,
            True,
            (b"Content-Length: 2",),
            False,
        ),
        (
            (),
            b"GET / HTTP/1.1",
            KEEPALIVE_REQUESTS,
            False,
            True,
            (b"Content-Length: 2",),
            True,
        ),
        # An early answer: the rest of the request body was never read.
        (
            (b"Content-Length: 9",),
            b"POST / HTTP/1.1",
            1,
            False,
            False,
            (b"Content-Length: 2",),
            True,
        ),
        (
            (b"Content-Length: 9",),
            b"POST / HTTP/1.1",
            1,
            False,
            True,
            (b"Content-Length: 2",),
            False,
        ),
        # A body ended by the upstream's close goes to an HTTP/1.0 client ended by ours.
        ((), b"GET / HTTP/1.0", 1, False, True, (), True),
        ((), b"GET / HTTP/1.1", 1, False, True, (), False),  # chunked to an HTTP/1.1 client
    ],
)
def test_the_keep_alive_decision(
    request_fields: tuple[bytes, ...],
    line: bytes,
    requests: int,
    draining: bool,
    body_read: bool,
    upstream_fields: tuple[bytes, ...],
    closes: bool,
) -> None:
    started = exchange(head(*request_fields, line=line), requests=requests)
    if body_read and started.has_body:
        started.request_end()
    _, _, _, fields, _, keep_alive = started.respond(response(*upstream_fields), draining=draining)
    assert keep_alive is not closes
    assert ((b"connection", b"close") in fields) is closes
    assert started.response_started


@pytest.mark.parametrize(("requests", "closes"), [(2, False), (3, True)])
def test_limits_keepalive_requests_closes_after_that_many(requests: int, closes: bool) -> None:
    """The operator's keepalive_requests (3 here), not a fixed number, ends the connection;
    a local endpoint's answer counts as a request too."""
    started = Exchange(head(), CLIENT, requests)
    assert started.route(Settings(limits=replace(LIMITS, keepalive_requests=3))) is None
    *_, keep_alive = started.respond(response(b"Content-Length: 2"), draining=False)
    assert keep_alive is not closes
    local = Exchange(head(line=b"GET /local HTTP/1.1"), CLIENT, requests)
    routes = Routes({b"/local": Route(max_body_bytes=0)})
    endpoint = local.route(Settings(limits=replace(LIMITS, keepalive_requests=3), local=routes))
    assert endpoint is not None
    (*_, local_keep_alive), _ = local.answer_locally(LocalAnswer(200, [], b"ok"), draining=False)
    assert local_keep_alive is not closes


@settings(max_examples=examples(EXAMPLES))
@given(
    method=st.sampled_from([b"GET", b"HEAD", b"POST"]),
    version=st.sampled_from([b"1.1", b"1.0"]),
    close=st.booleans(),
    body=st.sampled_from([None, b"Content-Length: 3", b"Transfer-Encoding: chunked"]),
    body_read=st.booleans(),
    requests=st.sampled_from([1, 2, KEEPALIVE_REQUESTS - 1, KEEPALIVE_REQUESTS]),
    draining=st.booleans(),
    status=st.sampled_from([100, 200, 204, 304, 404]),
    framing=st.sampled_from([None, b"Content-Length: 7", b"Transfer-Encoding: chunked"]),
)
def test_responses_follow_the_rules_read_plainly(
    method: bytes,
    version: bytes,
    close: bool,
    body: bytes | None,
    body_read: bool,
    requests: int,
    draining: bool,
    status: int,
    framing: bytes | None,
) -> None:
    """RFC 9112 §6.3 and §9.3, and our own reasons to close, read plainly: the framing the
    client is told of and the body it gets, and whether the connection stays open."""
    if version == b"1.0" and body == b"Transfer-Encoding: chunked":
        body = b"Content-Length: 3"  # an HTTP/1.0 request cannot be chunked
    fields = [f for f in (body, b"Connection: close" if close else None) if f is not None]
    started = exchange(head(*fields, line=method + b" / HTTP/" + version), requests=requests)
    if body_read:
        started.request_end()
    upstream = response(
        *([framing] if framing else []), line=b"HTTP/1.1 %d Reason" % status, method=method
    )
    _, _, _, out, how, keep_alive = started.respond(upstream, draining=draining)
    no_body = method == b"HEAD" or status < 200 or status in (204, 304)
    length = framing == b"Content-Length: 7" and status not in (100, 204)
    if no_body:
        assert how is Framing.NONE
    elif length:
        assert how is Framing.LENGTH
    else:
        assert how is (Framing.CHUNKED if version == b"1.1" else Framing.CLOSE)
    names = [name for name, _ in out]
    assert names.count(b"content-length") == (1 if length else 0)
    chunked_field = not length and status >= 200 and status not in (204, 304) and version == b"1.1"
    assert names.count(b"transfer-encoding") == (1 if chunked_field else 0)
    unread = body is not None and not body_read
    reasons_to_close = [
        close,
        version == b"1.0",
        unread,
        draining,
        requests >= KEEPALIVE_REQUESTS,
        how is Framing.CLOSE,
    ]
    assert keep_alive is not any(reasons_to_close)
    assert ((b"connection", b"close") in out) is not keep_alive
    # h11, an independent reader, frames what we wrote as we said.
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method=method, target="/", headers=[("host", "a")]))
    client.receive_data(written((status, b"Reason", (), out, how, keep_alive)))
    event = client.next_event()
    assert isinstance(event, h11.Response | h11.InformationalResponse)


def test_a_local_answer_is_framed_by_its_length() -> None:
    started = Exchange(head(line=b"GET /r HTTP/1.1"), DEV, 1)
    started.route(Settings(local=Routes({b"/r": Route(0)})))
    start, body = started.answer_locally(
        LocalAnswer(200, [(b"content-type", b"application/json")], b"{}"), draining=False
    )
    assert (written(start) + body, start[4:]) == (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-dualproxy-key: k1\r\n"
        b"content-length: 2\r\n\r\n{}",
        (Framing.LENGTH, True),
    )


@pytest.mark.parametrize(
    ("method", "status", "draining", "fields", "body", "keep_alive"),
    [
        (b"HEAD", 200, False, [(b"content-length", b"2")], b"", True),  # no body to HEAD
        (b"GET", 304, False, [], b"", True),  # nor with 304 (and no length either)
        (b"GET", 200, True, [(b"content-length", b"2"), (b"connection", b"close")], b"{}", False),
    ],
)
def test_local_answers_follow_the_same_rules(
    method: bytes,
    status: int,
    draining: bool,
    fields: list[tuple[bytes, bytes]],
    body: bytes,
    keep_alive: bool,
) -> None:
    started = Exchange(head(line=method + b" /r HTTP/1.1"), CLIENT, 1)
    started.route(Settings(local=Routes({b"/r": Route(0)})))
    start, sent = started.answer_locally(LocalAnswer(status, [], b"{}"), draining=draining)
    assert (start[3], sent, start[5]) == (fields, body, keep_alive)


@pytest.mark.parametrize("head_only", [False, True])
def test_golden_refusal(head_only: bool) -> None:
    start, body = refusal_response(
        HttpRefusal(431, "more than 100 header fields", fault="client"), head_only=head_only
    )
    text = b"431 Request Header Fields Too Large: more than 100 header fields\n"
    assert written(start) + body == (
        b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
        b"content-type: text/plain; charset=utf-8\r\n"
        b"x-content-type-options: nosniff\r\n"
        b"content-length: %d\r\n"
        b"connection: close\r\n"
        b"\r\n%b" % (len(text), b"" if head_only else text)
    )
    assert start[5] is False


def test_only_a_405_names_the_methods_we_relay() -> None:
    start, _ = refusal_response(
        HttpRefusal(405, "method TRACE not allowed", fault="client"), head_only=False
    )
    assert start[3][-1] == (b"allow", ALLOWED_METHODS)
    start, _ = refusal_response(HttpRefusal(400, "bad", fault="client"), head_only=False)
    assert b"allow" not in [name for name, _ in start[3]]


def test_a_refusal_quotes_no_more_than_ascii() -> None:
    _, body = refusal_response(
        HttpRefusal(502, "upstream: caf\u00e9", fault="upstream"),
        head_only=False,
        upstream_detail=True,
    )
    assert body == b"502 Bad Gateway: upstream: caf\\xe9\n"


@pytest.mark.parametrize("status", [502, 503, 504])
def test_an_upstream_failure_shows_the_public_only_its_status(status: int) -> None:
    refusal = HttpRefusal(status, "upstream: connection to 10.0.0.7:8080 refused", fault="upstream")
    (_, _, _, fields, _, _), body = refusal_response(refusal, head_only=False)
    phrase = HTTPStatus(status).phrase
    assert body == f"{status} {phrase}\n".encode()
    assert (b"content-length", b"%d" % len(body)) in fields
    # Dev mode keeps the detail, where it helps.
    _, detailed = refusal_response(refusal, head_only=False, upstream_detail=True)
    assert b"10.0.0.7:8080 refused" in detailed


def test_a_client_refusal_still_says_what_was_wrong() -> None:
    _, body = refusal_response(
        HttpRefusal(400, "more than one Host field", fault="client"), head_only=False
    )
    assert body == b"400 Bad Request: more than one Host field\n"


CL: Final = [(b"content-length", b"5")]
TE: Final = [(b"transfer-encoding", b"chunked")]


@pytest.mark.parametrize(
    ("status", "length", "chunked", "method", "version", "fields", "framing"),
    [
        (200, 5, False, b"GET", b"1.1", CL, Framing.LENGTH),
        (200, 5, False, b"GET", b"1.0", CL, Framing.LENGTH),
        (200, None, True, b"GET", b"1.1", TE, Framing.CHUNKED),
        (200, None, False, b"GET", b"1.1", TE, Framing.CHUNKED),  # the upstream's close ends it
        (200, None, True, b"GET", b"1.0", [], Framing.CLOSE),  # no chunks for HTTP/1.0
        (200, None, False, b"GET", b"1.0", [], Framing.CLOSE),
        # No body, but the framing fields a GET would get.
        (200, 5, False, b"HEAD", b"1.1", CL, Framing.NONE),
        (200, None, False, b"HEAD", b"1.1", TE, Framing.NONE),
        (200, None, False, b"HEAD", b"1.0", [], Framing.NONE),
        (304, 5, False, b"GET", b"1.1", CL, Framing.NONE),
        (304, None, False, b"GET", b"1.1", [], Framing.NONE),
        (204, None, False, b"DELETE", b"1.1", [], Framing.NONE),
    ],
)
def test_response_framing_table(
    status: int,
    length: int | None,
    chunked: bool,
    method: bytes,
    version: bytes,
    fields: list[tuple[bytes, bytes]],
    framing: Framing,
) -> None:
    head = ResponseHead(
        version=b"1.1", status=status, headers=(), content_length=length, chunked=chunked
    )
    assert response_framing(head, method, version) == (fields, framing)
