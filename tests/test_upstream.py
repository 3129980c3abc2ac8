"""The upstream pool against the test upstream on real loopback sockets, http and https.

Timeouts are proved under trio's MockClock (virtual time: no real waits): with the
`mock_clock` fixture time stands still while connections open, and the test switches
autojump on (`autojump_threshold = 0`) just before the wait that must expire. Each positive
test has its negative twin, often a parameter of the same test.
"""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
import trio.testing
import trustme
from helpers.upstream_server import (
    CHUNK_SIZE,
    Behaviour,
    LocalResolver,
    Raw,
    UpstreamServer,
    closed_port,
    in_turn,
    pattern_bytes,
    serve_upstream,
    unresponsive_port,
)

from dualproxy.config.errors import OperatorError
from dualproxy.config.schema import Limits, UpstreamConfig
from dualproxy.http.body import END
from dualproxy.http.errors import HttpRefusal
from dualproxy.http.heads import MAX_RESPONSE_HEAD_BYTES, ResponseHead
from dualproxy.http.upstream import (
    MAX_INFORMATIONAL_RESPONSES,
    UpstreamConnection,
    UpstreamPool,
    client_context,
)
from dualproxy.tls.streams import TcpStream, TlsStream

# Generous for a real wait that must not expire; the ones that must expire are virtual.
TIMEOUT = 20.0
LIMITS = Limits(upstream_connect_timeout=TIMEOUT, upstream_timeout=TIMEOUT)


class TrackedPool(UpstreamPool):
    """An UpstreamPool that remembers every connection it handed out, to close them all when
    the test ends (an unclosed socket is a ResourceWarning, an error here)."""

    def __init__(self, upstream: UpstreamConfig, limits: Limits) -> None:
        super().__init__(upstream, limits)
        self.handed_out: list[UpstreamConnection] = []

    async def acquire(self, now: float | None = None, *, check: bool = True) -> UpstreamConnection:
        connection = await super().acquire(now, check=check)
        self.handed_out.append(connection)
        return connection


PoolFactory = Callable[..., TrackedPool]


@pytest.fixture
async def pools() -> AsyncIterator[PoolFactory]:
    made: list[TrackedPool] = []

    def make(upstream: UpstreamConfig, limits: Limits = LIMITS) -> TrackedPool:
        made.append(TrackedPool(upstream, limits))
        return made[-1]

    try:
        yield make
    finally:
        for pool in made:
            await pool.aclose()
            for connection in pool.handed_out:
                connection.close()


@pytest.fixture(params=["http", "https"])
async def upstream(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[UpstreamServer]:
    server = UpstreamServer.https(tmp_path) if request.param == "https" else UpstreamServer.http()
    async with serve_upstream(server):
        yield server


@pytest.fixture
async def https_upstream(tmp_path: Path) -> AsyncIterator[UpstreamServer]:
    async with serve_upstream(UpstreamServer.https(tmp_path)) as server:
        yield server


@pytest.fixture
async def http_upstream() -> AsyncIterator[UpstreamServer]:
    async with serve_upstream(UpstreamServer.http()) as server:
        yield server


def request_event(method: bytes = b"GET", target: bytes = b"/", body: bytes = b"") -> h11.Request:
    headers = [(b"Host", b"localhost"), (b"X-Test", b"Exact Case")]
    if body or method == b"POST":
        headers.append((b"Content-Length", str(len(body)).encode()))
    return h11.Request(method=method, target=target, headers=headers)


def request_head(method: bytes, *, body_size: int) -> bytes:
    """The head of request_event(method, body=...) for a body of `body_size` bytes."""
    conn = h11.Connection(h11.CLIENT)
    event = request_event(method)
    headers = [(name, value) for name, value in event.headers if name != b"content-length"]
    headers.append((b"content-length", str(body_size).encode()))
    return conn.send(h11.Request(method=method, target=b"/", headers=headers)) or b""


def request_bytes(method: bytes = b"GET", target: bytes = b"/", body: bytes = b"") -> bytes:
    """What an h11 client writes for request_event(...) and its body."""
    conn = h11.Connection(h11.CLIENT)
    data = conn.send(request_event(method, target, body)) or b""
    return data + (conn.send(h11.Data(data=body)) or b"") + (conn.send(h11.EndOfMessage()) or b"")


async def send_request(
    connection: UpstreamConnection, method: bytes = b"GET", target: bytes = b"/", body: bytes = b""
) -> None:
    await connection.send_request(request_bytes(method, target, body))


async def read_body(connection: UpstreamConnection, *, timeout: float = TIMEOUT) -> bytes:
    body = bytearray()
    for _ in range(100_000):
        piece = await connection.receive_body(timeout=timeout)
        if piece is END:
            return bytes(body)
        body += piece
    raise AssertionError("the body did not end")


async def exchange(
    connection: UpstreamConnection, method: bytes = b"GET", target: bytes = b"/", body: bytes = b""
) -> tuple[ResponseHead, bytes]:
    """One whole request/response on `connection`."""
    await send_request(connection, method, target, body)
    response = await connection.receive_head(timeout=TIMEOUT, request_method=method)
    return response, await read_body(connection)


def socket_of(connection: UpstreamConnection) -> socket.socket:
    stream = connection.stream
    if isinstance(stream, TlsStream):
        stream = stream.transport_stream
    assert isinstance(stream, TcpStream)
    return stream.socket


async def wait_readable(connection: UpstreamConnection) -> None:
    """Until what the upstream did to an idle connection has reached our socket."""
    with trio.fail_after(TIMEOUT):
        await trio.lowlevel.wait_readable(socket_of(connection))


def raises_upstream(status: int, match: str) -> Any:
    return pytest.raises(HttpRefusal, match=f"^{status} .*{match}")


# --- connecting ------------------------------------------------------------------------------


async def test_exchange_over_verified_tls(
    pools: PoolFactory, https_upstream: UpstreamServer
) -> None:
    pool = pools(https_upstream.config())
    connection = await pool.acquire()
    assert isinstance(connection.stream, TlsStream)
    assert connection.stream.selected_alpn_protocol() == "http/1.1"
    assert connection.stream.version() in ("TLSv1.2", "TLSv1.3")
    assert not connection.reused
    response, body = await exchange(connection, b"POST", b"/api/items?x=1", b"payload")
    assert response.status == 200
    echo = json.loads(body)
    assert echo["method"] == "POST"
    assert echo["target"] == "/api/items?x=1"
    assert ["X-Test", "Exact Case"] in echo["headers"]
    assert echo["body_sha256"] == hashlib.sha256(b"payload").hexdigest()
    # The exact bytes, and the SNI name the certificate was checked against.
    assert https_upstream.received == request_bytes(b"POST", b"/api/items?x=1", b"payload")
    assert https_upstream.server_names == ["localhost"]
    assert pool.connections_opened == 1
    assert connection.response_head is not None
    assert connection.response_head.status == 200


async def test_exchange_over_plain_http(pools: PoolFactory, http_upstream: UpstreamServer) -> None:
    pool = pools(http_upstream.config())
    connection = await pool.acquire()
    assert isinstance(connection.stream, TcpStream)
    # Small requests and response heads go out at once, not after Nagle's delay.
    assert connection.stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    response, body = await exchange(connection)
    assert response.status == 200
    assert json.loads(body)["method"] == "GET"
    assert http_upstream.received == request_bytes()


async def test_certificate_for_another_name_is_refused(pools: PoolFactory, tmp_path: Path) -> None:
    server = UpstreamServer.https(tmp_path, names=("other.example",))
    async with serve_upstream(server):
        pool = pools(server.config())
        with raises_upstream(502, "certificate verify failed for localhost: Hostname mismatch"):
            await pool.acquire()
        await server.connections[0].wait_done()
    assert server.received == b""
    assert server.connections[0].tls_error is not None
    assert pool.connections_opened == 0


@pytest.mark.parametrize("trust", ["another CA", "system store only"])
async def test_certificate_from_an_untrusted_ca_is_refused(
    pools: PoolFactory, tmp_path: Path, trust: str
) -> None:
    server = UpstreamServer.https(tmp_path)
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    async with serve_upstream(server):
        config = server.config(ca_file=other if trust == "another CA" else None)
        with raises_upstream(502, "certificate verify failed for localhost: .*issuer"):
            await pools(config).acquire()
    assert server.received == b""


async def test_host_name_is_checked_against_the_configured_name(
    pools: PoolFactory, tmp_path: Path
) -> None:
    """The name in the URL is what the certificate must hold and what SNI says, whatever the
    address it resolves to; "upstream.test" resolves here thanks to LocalResolver."""
    resolver = LocalResolver()
    trio.socket.set_custom_hostname_resolver(resolver)
    server = UpstreamServer.https(tmp_path, names=("upstream.test",))
    async with serve_upstream(server):
        pool = pools(server.config(host="upstream.test"))
        response, _ = await exchange(await pool.acquire())
        assert response.status == 200
        assert server.server_names == ["upstream.test"]
        # Twin: the same server reached as "localhost" is refused.
        with raises_upstream(502, "certificate verify failed for localhost"):
            await pools(server.config(host="localhost")).acquire()
    assert resolver.asked == [b"upstream.test", b"localhost"]


async def test_unresolvable_name_is_502(
    pools: PoolFactory,
) -> None:
    trio.socket.set_custom_hostname_resolver(LocalResolver())
    pool = pools(UpstreamConfig("http://nowhere.test", "http", "nowhere.test", 80))
    with raises_upstream(502, "cannot resolve nowhere.test"):
        await pool.acquire()


async def test_refused_connection_is_502(
    pools: PoolFactory,
) -> None:
    with closed_port() as port:
        config = UpstreamConfig(f"http://127.0.0.1:{port}", "http", "127.0.0.1", port)
        with raises_upstream(502, f"connection to 127.0.0.1:{port} refused") as caught:
            await pools(config).acquire()
    assert caught.value.before_response


async def test_connect_timeout_is_504(
    pools: PoolFactory, autojump_clock: trio.testing.MockClock
) -> None:
    """A listener whose queue is full drops our SYN: the connect hangs until the timeout."""
    with unresponsive_port() as port:
        config = UpstreamConfig(f"http://127.0.0.1:{port}", "http", "127.0.0.1", port)
        pool = pools(config, Limits(upstream_connect_timeout=5))
        start = trio.current_time()
        with raises_upstream(504, f"no connection to 127.0.0.1:{port} within 5 s"):
            await pool.acquire()
        assert trio.current_time() - start == pytest.approx(5)


async def test_tls_handshake_counts_in_the_connect_timeout(
    pools: PoolFactory, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """TCP connects, the handshake never completes: 504 after upstream_connect_timeout."""
    server = UpstreamServer.https(tmp_path)
    server.silent = True
    async with serve_upstream(server):
        pool = pools(server.config(), Limits(upstream_connect_timeout=5))
        mock_clock.autojump_threshold = 0
        with raises_upstream(504, "no connection to localhost:.* within 5 s"):
            await pool.acquire()
        # Twin: the same server, speaking, within the same timeout.
        mock_clock.autojump_threshold = float("inf")
        server.silent = False
        connection = await pool.acquire()
        assert (await exchange(connection))[0].status == 200


def test_client_context_always_verifies(tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca_file))
    config = UpstreamConfig("https://api.test", "https", "api.test", 443, ca_file=ca_file)
    context = client_context(config)
    assert context.check_hostname
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.minimum_version is ssl.TLSVersion.TLSv1_2
    # Twin: a CA file that is not PEM is the operator's error, named by its key path.
    ca_file.write_text("not a certificate\n")
    with pytest.raises(OperatorError, match=r"^upstream\.ca_file: cannot load"):
        client_context(config)


# --- the response head -----------------------------------------------------------------------


async def test_response_head_timeout_is_504(
    pools: PoolFactory, http_upstream: UpstreamServer, mock_clock: trio.testing.MockClock
) -> None:
    http_upstream.behaviour = Behaviour.HANG_BEFORE_HEAD
    http_upstream.hang = 30
    connection = await pools(http_upstream.config()).acquire()
    await send_request(connection)
    mock_clock.autojump_threshold = 0
    with raises_upstream(504, "no response head within 10 s") as caught:
        await connection.receive_head(timeout=10, request_method=b"GET")
    assert caught.value.before_response
    # The upstream got the whole request: the timeout was the head's, not the connection's.
    assert http_upstream.received == request_bytes()


async def test_slow_response_head_within_the_timeout(
    pools: PoolFactory, http_upstream: UpstreamServer, mock_clock: trio.testing.MockClock
) -> None:
    http_upstream.behaviour = Behaviour.HANG_BEFORE_HEAD
    http_upstream.hang = 9
    connection = await pools(http_upstream.config()).acquire()
    await send_request(connection)
    mock_clock.autojump_threshold = 0
    response = await connection.receive_head(timeout=10, request_method=b"GET")
    assert response.status == 200


@pytest.mark.parametrize("hang", [30, 9])
async def test_body_stall_is_504(
    pools: PoolFactory,
    http_upstream: UpstreamServer,
    mock_clock: trio.testing.MockClock,
    hang: float,
) -> None:
    http_upstream.behaviour = Behaviour.HANG_MID_BODY
    http_upstream.hang = hang
    connection = await pools(http_upstream.config()).acquire()
    await send_request(connection)
    await connection.receive_head(timeout=TIMEOUT, request_method=b"GET")
    mock_clock.autojump_threshold = 0
    if hang < 10:
        assert json.loads(await read_body(connection, timeout=10))["method"] == "GET"
        return
    with raises_upstream(504, "response body stalled for 10 s") as caught:
        await read_body(connection, timeout=10)
    assert not caught.value.before_response


async def test_upstream_not_reading_the_request_is_504(
    pools: PoolFactory,
    mock_clock: trio.testing.MockClock,
) -> None:
    server = UpstreamServer.http()
    server.silent = True  # accepts, never reads
    async with serve_upstream(server):
        pool = pools(server.config(), Limits(upstream_timeout=10))
        connection = await pool.acquire()
        await connection.send_request(request_head(b"POST", body_size=64 << 20))
        mock_clock.autojump_threshold = 0
        chunk = b"x" * (1 << 20)
        with raises_upstream(504, "did not take the request within 10 s"):
            for _ in range(64):  # far more than the socket buffers hold
                await connection.send(chunk)


async def test_interim_responses_are_skipped(pools: PoolFactory, upstream: UpstreamServer) -> None:
    upstream.behaviour = Behaviour.INFORMATIONAL_FIRST
    connection = await pools(upstream.config()).acquire()
    response, body = await exchange(connection)
    assert response.status == 200
    assert json.loads(body)["method"] == "GET"
    assert connection.reusable()


@pytest.mark.parametrize("count", [MAX_INFORMATIONAL_RESPONSES, MAX_INFORMATIONAL_RESPONSES + 1])
async def test_endless_interim_responses_are_502(
    pools: PoolFactory, upstream: UpstreamServer, count: int
) -> None:
    upstream.behaviour = (
        b"HTTP/1.1 103 Early Hints\r\n\r\n" * count + b"HTTP/1.1 204 No Content\r\n\r\n"
    )
    connection = await pools(upstream.config()).acquire()
    await send_request(connection)
    if count <= MAX_INFORMATIONAL_RESPONSES:
        response = await connection.receive_head(timeout=TIMEOUT, request_method=b"GET")
        assert response.status == 204
        return
    with raises_upstream(502, "interim"):
        await connection.receive_head(timeout=TIMEOUT, request_method=b"GET")


WELL_FORMED = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


@pytest.mark.parametrize(
    ("plan", "problem"),
    [
        (Behaviour.CL_AND_TE, "both Content-Length and Transfer-Encoding"),
        (Behaviour.CONFLICTING_CONTENT_LENGTH, "more than one Content-Length"),
        (Behaviour.DUPLICATE_CONTENT_LENGTH, "more than one Content-Length"),
        (Behaviour.HTTP10_CHUNKED, "Transfer-Encoding in an HTTP/1.0"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nX-A: 1\nX-B: 2\r\nContent-Length: 5\r\n\r\nhello",
            "bare LF",
            id="bare-LF",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\nContent-Length: 5\r\n\r\nhello",
            "field",
            id="obs-fold",
        ),
        pytest.param(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n", "101", id="101"),
        pytest.param(
            b"HTTP/2.0 200 OK\r\nContent-Length: 5\r\n\r\nhello", "version", id="HTTP/2.0"
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * MAX_RESPONSE_HEAD_BYTES + b"\r\n\r\n",
            "longer",
            id="head-too-large",
        ),
    ],
    ids=lambda value: value.name if isinstance(value, Behaviour) else "",
)
async def test_malformed_response_heads_are_502(
    pools: PoolFactory, upstream: UpstreamServer, plan: Behaviour | bytes, problem: str
) -> None:
    """Shapes h11 accepts (all but the conflicting lengths, the 101 and the version) but a
    proxy must not: the response's end would be ambiguous. The well-formed twin follows."""
    upstream.behaviour = plan
    pool = pools(upstream.config())
    connection = await pool.acquire()
    await send_request(connection)
    with raises_upstream(502, f"invalid response: .*{problem}") as caught:
        await connection.receive_head(timeout=TIMEOUT, request_method=b"GET")
    assert not caught.value.before_response
    pool.discard(connection)
    upstream.behaviour = WELL_FORMED
    response, body = await exchange(await pool.acquire())
    assert (response.status, body) == (200, b"hello")


@pytest.mark.parametrize("fields", [10, 11])
async def test_response_header_count_is_limits_max_response_header_count(
    pools: PoolFactory, http_upstream: UpstreamServer, fields: int
) -> None:
    extra = b"".join(b"X-%d: v\r\n" % i for i in range(fields - 1))
    http_upstream.behaviour = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n" + extra + b"\r\n"
    pool = pools(http_upstream.config(), replace(LIMITS, max_response_header_count=10))
    connection = await pool.acquire()
    await send_request(connection)
    if fields <= 10:
        response = await connection.receive_head(timeout=TIMEOUT, request_method=b"GET")
        assert len(response.headers) == fields
    else:
        with raises_upstream(502, "more than 10 header fields"):
            await connection.receive_head(timeout=TIMEOUT, request_method=b"GET")
    pool.discard(connection)


@pytest.mark.parametrize("reused", [False, True])
async def test_close_before_response_is_502_before_response(
    pools: PoolFactory, upstream: UpstreamServer, reused: bool
) -> None:
    """What the relay's retry keys on: `reused` and `before_response`."""
    pool = pools(upstream.config())
    if reused:
        connection = await pool.acquire()
        await exchange(connection)
        pool.release(connection)
    upstream.behaviour = Behaviour.CLOSE_BEFORE_RESPONSE
    connection = await pool.acquire()
    assert connection.reused is reused
    await send_request(connection)
    with raises_upstream(502, "closed the connection before the response head") as caught:
        await connection.receive_head(timeout=TIMEOUT, request_method=b"GET")
    assert caught.value.before_response


async def test_reset_mid_body_is_502_after_response(
    pools: PoolFactory, upstream: UpstreamServer
) -> None:
    upstream.behaviour = Behaviour.RESET_MID_RESPONSE
    connection = await pools(upstream.config()).acquire()
    await send_request(connection)
    response = await connection.receive_head(timeout=TIMEOUT, request_method=b"GET")
    assert response.status == 200
    with raises_upstream(502, "connection lost in the response body \\(reset\\)") as caught:
        await read_body(connection)
    assert not caught.value.before_response
    assert not connection.reusable()


@pytest.mark.parametrize(
    ("response", "reusable"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", True),
        (b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok", True),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", False),
        (b"HTTP/1.1 200 OK\r\nConnection: x-a, Close\r\nContent-Length: 2\r\n\r\nok", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", False),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok", False),
    ],
)
async def test_a_response_that_ends_the_connection_makes_it_unusable(
    pools: PoolFactory, upstream: UpstreamServer, response: bytes, reusable: bool
) -> None:
    """RFC 9112 §9.3: after Connection: close, or HTTP/1.0, no second request goes there."""
    upstream.behaviour = response
    connection = await pools(upstream.config()).acquire()
    await send_request(connection)
    await connection.receive_head(timeout=TIMEOUT, request_method=b"GET")
    assert await read_body(connection) == b"ok"
    assert connection.reusable() is reusable


async def test_an_answer_before_the_whole_request_is_read_but_never_reused(
    pools: PoolFactory, upstream: UpstreamServer
) -> None:
    """An upstream that answers without reading the request body, then goes (a reset): the
    send fails, the answer it sent before is still read, and the connection, whose request
    never went whole, is not reused although the answer does not say it closes."""
    upstream.behaviour = Behaviour.ANSWER_BEFORE_BODY
    connection = await pools(upstream.config()).acquire()
    piece, pieces = b"x" * 65536, 1024
    head = b"PUT / HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n"
    await connection.send_request(head % (len(piece) * pieces))
    with raises_upstream(502, "connection lost while sending the request"):
        for _ in range(pieces):  # bounded: 64 MiB; the reset comes long before
            await connection.send(piece)
    response = await connection.receive_head(timeout=TIMEOUT, request_method=b"PUT")
    assert response.status == 413
    assert await read_body(connection) == b"too large"
    assert not connection.reusable()


@pytest.mark.parametrize("close", [True, False])
async def test_body_delimited_by_close(
    pools: PoolFactory, upstream: UpstreamServer, close: bool
) -> None:
    """An HTTP/1.0 body without a length ends at the upstream's close, which we see as EOF;
    a Content-Length body cut short by a close is an error, never a shorter body."""
    if close:
        upstream.behaviour = Raw(b"HTTP/1.0 200 OK\r\n\r\nuntil the end", close=True)
    else:
        upstream.behaviour = Raw(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\ncut", close=True)
    connection = await pools(upstream.config()).acquire()
    await send_request(connection)
    await connection.receive_head(timeout=TIMEOUT, request_method=b"GET")
    if close:
        assert await read_body(connection) == b"until the end"
        assert not connection.reusable()
        return
    with raises_upstream(502, "invalid response body"):
        await read_body(connection)


@pytest.mark.parametrize("chunked", [False, True])
async def test_large_body_streams_in_bounded_pieces(
    pools: PoolFactory, upstream: UpstreamServer, chunked: bool
) -> None:
    upstream.behaviour = Behaviour.LARGE_BODY
    upstream.large_body_size = 3 * CHUNK_SIZE + 123
    upstream.large_body_chunked = chunked
    connection = await pools(upstream.config()).acquire()
    await send_request(connection)
    await connection.receive_head(timeout=TIMEOUT, request_method=b"GET")
    digest, size, pieces = hashlib.sha256(), 0, 0
    for _ in range(100_000):
        piece = await connection.receive_body(timeout=TIMEOUT)
        if piece is END:
            break
        assert len(piece) <= 64 * 1024
        digest.update(piece)
        size += len(piece)
        pieces += 1
    assert size == upstream.large_body_size
    assert digest.digest() == hashlib.sha256(pattern_bytes(size)).digest()
    assert pieces >= 4
    assert connection.reusable()


async def test_head_response_has_no_body(pools: PoolFactory, upstream: UpstreamServer) -> None:
    connection = await pools(upstream.config()).acquire()
    response, body = await exchange(connection, b"HEAD")
    assert response.status == 200
    assert dict(response.headers)[b"content-length"] != b"0"
    assert body == b""
    assert connection.reusable()


# --- the pool --------------------------------------------------------------------------------


@pytest.mark.parametrize("release", [True, False])
async def test_released_connection_is_reused(
    pools: PoolFactory, upstream: UpstreamServer, release: bool
) -> None:
    pool = pools(upstream.config())
    first = await pool.acquire()
    await exchange(first)
    if release:
        pool.release(first)
    else:
        pool.discard(first)
    second = await pool.acquire()
    assert (await exchange(second))[0].status == 200
    if release:
        assert second is first
        assert second.reused
        assert (upstream.accepted, pool.connections_opened, pool.reuses) == (1, 1, 1)
        assert [r.number for r in upstream.requests] == [0, 1]
    else:
        assert not second.reused
        assert (upstream.accepted, pool.connections_opened, pool.reuses) == (2, 2, 0)
    # Both exchanges reached the upstream byte for byte.
    assert upstream.received == request_bytes() * 2


async def test_idle_connections_are_taken_newest_first(
    pools: PoolFactory, http_upstream: UpstreamServer
) -> None:
    pool = pools(http_upstream.config())
    a, b = await pool.acquire(), await pool.acquire()
    for connection in (a, b):
        await exchange(connection)
    pool.release(a)
    pool.release(b)
    assert await pool.acquire() is b
    assert await pool.acquire() is a


@pytest.mark.parametrize("max_idle", [0, 2, 3])
async def test_idle_cap(pools: PoolFactory, http_upstream: UpstreamServer, max_idle: int) -> None:
    pool = pools(http_upstream.config(pool_max_idle=max_idle))
    held = [await pool.acquire() for _ in range(3)]
    for connection in held:
        await exchange(connection)
    for connection in held:
        pool.release(connection)
    assert pool.idle_count == max_idle
    # Over the cap, the oldest idle connections were closed: the upstream sees them end.
    closed = http_upstream.connections[: 3 - max_idle]
    for accepted in closed:
        await accepted.wait_done(TIMEOUT)
    assert not any(a.done.is_set() for a in http_upstream.connections[3 - max_idle :])
    again = [await pool.acquire() for _ in range(3)]
    assert sum(c.reused for c in again) == max_idle
    assert pool.connections_opened == 3 + (3 - max_idle)


@pytest.mark.parametrize("idle_for", [29.0, 31.0])
async def test_idle_timeout(
    pools: PoolFactory,
    http_upstream: UpstreamServer,
    mock_clock: trio.testing.MockClock,
    idle_for: float,
) -> None:
    pool = pools(http_upstream.config(pool_idle_timeout=30))
    connection = await pool.acquire()
    await exchange(connection)
    pool.release(connection)
    mock_clock.jump(idle_for)
    again = await pool.acquire()
    if idle_for < 30:
        assert again is connection
        assert http_upstream.accepted == 1
    else:
        assert again is not connection
        assert not again.reused
        assert http_upstream.accepted == 2
        await http_upstream.connections[0].wait_done(TIMEOUT)  # we closed the expired one


@pytest.mark.parametrize("idle_for", [29.0, 31.0])
async def test_prune_closes_expired_idle_connections(
    pools: PoolFactory,
    http_upstream: UpstreamServer,
    mock_clock: trio.testing.MockClock,
    idle_for: float,
) -> None:
    pool = pools(http_upstream.config(pool_idle_timeout=30))
    connection = await pool.acquire()
    await exchange(connection)
    pool.release(connection)
    mock_clock.jump(idle_for)
    expired = idle_for > 30
    assert pool.prune() == int(expired)
    assert pool.idle_count == int(not expired)


@pytest.mark.parametrize("how", ["close", "close_notify", "stray bytes", "nothing (twin)"], ids=str)
async def test_stale_idle_connection_is_replaced(
    pools: PoolFactory, upstream: UpstreamServer, how: str
) -> None:
    """The upstream ends or spoils a connection while it sits in our pool: the next acquire
    drops it and opens a fresh one, without an error."""
    pool = pools(upstream.config())
    connection = await pool.acquire()
    await exchange(connection)
    pool.release(connection)
    if how == "close":
        assert await upstream.close_idle(notify=False) == 1
    elif how == "close_notify":
        assert await upstream.close_idle(notify=True) == 1
    elif how == "stray bytes":
        assert await upstream.write_idle(WELL_FORMED) == 1
    if how != "nothing (twin)":
        await wait_readable(connection)
    again = await pool.acquire()
    assert (await exchange(again))[0].status == 200
    if how == "nothing (twin)":
        assert again is connection
        assert (pool.stale_dropped, upstream.accepted) == (0, 1)
    else:
        assert again is not connection
        assert (pool.stale_dropped, upstream.accepted) == (1, 2)


async def test_connection_closed_while_held_fails_before_response(
    pools: PoolFactory,
    upstream: UpstreamServer,
) -> None:
    """A stale connection the pool could not catch (closed after the check): the failure
    says no response byte came, which is when the relay may retry."""
    connection = await pools(upstream.config()).acquire()
    await exchange(connection)
    await upstream.close_idle(notify=False)
    with raises_upstream(502, "(before the response head|while sending the request)") as caught:
        await send_request(connection)
        await connection.receive_head(timeout=TIMEOUT, request_method=b"GET")
    assert caught.value.before_response


async def test_send_failure_on_a_used_connection_is_before_response(
    pools: PoolFactory, upstream: UpstreamServer
) -> None:
    """The previous exchange's response does not count: a new request starts afresh."""
    connection = await pools(upstream.config()).acquire()
    await exchange(connection)
    await upstream.close_idle(notify=False)
    await connection.send_request(request_head(b"POST", body_size=100_000))
    chunk = b"x" * 1000
    with raises_upstream(502, "connection lost while sending the request") as caught:
        for _ in range(100):  # the first write draws the RST, a later one fails
            await connection.send(chunk)
            await trio.sleep(0)
    assert caught.value.before_response


@pytest.mark.parametrize("plan", [Behaviour.EXTRA_BYTES_AFTER_BODY, Behaviour.ECHO], ids=str)
async def test_bytes_after_the_body_make_a_connection_unusable(
    pools: PoolFactory, upstream: UpstreamServer, plan: Behaviour
) -> None:
    upstream.behaviour = plan
    pool = pools(upstream.config())
    connection = await pool.acquire()
    response, body = await exchange(connection)
    assert response.status == 200
    if plan is Behaviour.ECHO:
        assert connection.reusable()
        return
    assert body == b"hello"
    assert not connection.reusable()
    pool.release(connection)  # closes it
    assert pool.idle_count == 0
    upstream.behaviour = Behaviour.ECHO
    again = await pool.acquire()
    assert again is not connection
    assert (await exchange(again))[0].status == 200
    await upstream.connections[0].wait_done(TIMEOUT)


@pytest.mark.parametrize(
    "extra",
    [b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled", b""],
    ids=["second-record", "nothing"],
)
async def test_tls_records_after_the_body_make_a_connection_unusable(
    pools: PoolFactory, https_upstream: UpstreamServer, extra: bytes
) -> None:
    """The response fills one TLS record exactly; the stray response is a second record in
    the same write. OpenSSL decrypts one record per read, so the second one waits, still
    encrypted, in trio's buffer, where reusable() must look."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: "
    body_size = 16384 - len(head) - len(b"16350\r\n\r\n")
    response = head + str(body_size).encode() + b"\r\n\r\n" + b"b" * body_size
    assert len(response) == 16384
    https_upstream.behaviour = response + extra
    pool = pools(https_upstream.config())
    connection = await pool.acquire()
    _, body = await exchange(connection)
    assert len(body) == body_size
    assert connection.reusable() is (not extra)
    pool.release(connection)
    https_upstream.behaviour = Behaviour.ECHO
    again = await pool.acquire()
    assert (again is connection) is (not extra)
    assert (await exchange(again))[0].status == 200


@pytest.mark.parametrize("plan", [Behaviour.CONNECTION_CLOSE, Behaviour.ECHO], ids=str)
async def test_connection_close_response_is_not_pooled(
    pools: PoolFactory, upstream: UpstreamServer, plan: Behaviour
) -> None:
    upstream.behaviour = plan
    pool = pools(upstream.config())
    connection = await pool.acquire()
    await exchange(connection)
    pool.release(connection)
    assert pool.idle_count == (0 if plan is Behaviour.CONNECTION_CLOSE else 1)


async def test_unfinished_exchange_is_not_pooled(
    pools: PoolFactory, http_upstream: UpstreamServer
) -> None:
    pool = pools(http_upstream.config())
    connection = await pool.acquire()
    await send_request(connection)
    await connection.receive_head(timeout=TIMEOUT, request_method=b"GET")
    assert not connection.reusable()  # the body was not read
    pool.release(connection)
    assert pool.idle_count == 0
    await http_upstream.connections[0].wait_done(TIMEOUT)
    # Twin: read to the end, and it is pooled; released twice is a bug, and says so.
    connection = await pool.acquire()
    await exchange(connection)
    pool.release(connection)
    assert pool.idle_count == 1
    with pytest.raises(RuntimeError, match="already in the pool"):
        pool.release(connection)


async def test_pool_aclose_closes_idle_connections(
    pools: PoolFactory, upstream: UpstreamServer
) -> None:
    pool = pools(upstream.config())
    idle, held = await pool.acquire(), await pool.acquire()
    await exchange(idle)
    await exchange(held)
    pool.release(idle)
    await pool.aclose()
    assert pool.idle_count == 0
    await upstream.connections[0].wait_done(TIMEOUT)
    # Twin: the connection a caller holds is the caller's; it still works.
    assert (await exchange(held))[0].status == 200
    await held.aclose()
    await upstream.connections[1].wait_done(TIMEOUT)


async def test_connection_aclose_never_raises_even_when_cancelled(
    pools: PoolFactory,
    http_upstream: UpstreamServer,
) -> None:
    connection = await pools(http_upstream.config()).acquire()
    with trio.CancelScope() as scope:
        scope.cancel()
        await connection.aclose()
        await connection.aclose()  # idempotent
    assert not connection.reusable()
    await http_upstream.connections[0].wait_done(TIMEOUT)


# --- the test upstream itself (others rely on it) ---------------------------------------------


async def test_upstream_records_requests_in_turn(
    pools: PoolFactory, http_upstream: UpstreamServer
) -> None:
    http_upstream.behaviour = in_turn(Behaviour.ECHO, Behaviour.CONNECTION_CLOSE)
    pool = pools(http_upstream.config())
    for _ in range(3):
        connection = await pool.acquire()
        await exchange(connection, b"POST", b"/n", b"abc")
        pool.release(connection)
    assert [(r.connection, r.number) for r in http_upstream.requests] == [(0, 0), (0, 1), (1, 0)]
    assert all(r.body == b"abc" and r.complete for r in http_upstream.requests)
    assert http_upstream.requests[0].header(b"x-test") == [b"Exact Case"]


async def test_upstream_slow_read_gets_the_whole_body(
    pools: PoolFactory, http_upstream: UpstreamServer, mock_clock: trio.testing.MockClock
) -> None:
    http_upstream.behaviour = Behaviour.SLOW_READ
    http_upstream.slow_read_size = 1000
    body = pattern_bytes(256 * 1024)
    connection = await pools(http_upstream.config()).acquire()
    mock_clock.autojump_threshold = 0  # the pauses between reads are virtual
    _, echo = await exchange(connection, b"POST", b"/upload", body)
    assert json.loads(echo)["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_upstream_config_points_at_the_server(tmp_path: Path) -> None:
    server = UpstreamServer.https(tmp_path)
    server.port = 4443
    assert server.config() == replace(
        server.config(), url="https://localhost:4443", port=4443, ca_file=server.ca_file
    )
    assert server.config_table() == {
        "url": "https://localhost:4443",
        "ca_file": str(tmp_path / "upstream-ca.pem"),
    }
