"""The dev bench's echo upstream, on memory streams: what it answers and when it closes.
(Through the bench and the public commands it is tested in test_dev.py.)"""

from __future__ import annotations

import hashlib
import json

import h11
import pytest
import trio
import trio.testing

from dualproxy.dev import echo


async def exchange(data: bytes, *, close: bool = True) -> bytes:
    """Send `data` to the echo handler, then (with `close`) end our side; all it answered."""
    client, server = trio.testing.memory_stream_pair()
    received = b""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(echo.handle, server)
        await client.send_all(data)
        if close:
            await client.send_eof()
        while chunk := await client.receive_some(65536):  # ends when the handler closes
            received += chunk
    return received


def responses(data: bytes, count: int) -> list[tuple[h11.Response, bytes]]:
    """Parse the `count` responses the echo sent to `count` GETs or POSTs, as a client would."""
    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(data)
    out: list[tuple[h11.Response, bytes]] = []
    for _ in range(count):
        conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
        response, body = None, b""
        while not isinstance(event := conn.next_event(), h11.EndOfMessage):  # bounded by data
            assert event is not h11.NEED_DATA, f"incomplete response in {data!r}"
            if isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
        assert response is not None
        out.append((response, body))
        if conn.their_state is h11.MUST_CLOSE:
            break
        conn.start_next_cycle()
    return out


def test_describe_keeps_the_fields_as_received() -> None:
    request = h11.Request(
        method="PUT",
        target="/v1/a%20b?x=1",
        headers=[(b"Host", b"up:80"), (b"X-Twice", b"1"), (b"x-twice", b"2"), (b"X-Bin", b"\xe9")],
    )
    description = json.loads(echo.describe(request, 3, "abc"))
    assert description == {
        "upstream": "dualproxy dev echo",
        "method": "PUT",
        "target": "/v1/a%20b?x=1",
        "http_version": "1.1",
        "headers": [["Host", "up:80"], ["X-Twice", "1"], ["x-twice", "2"], ["X-Bin", "\u00e9"]],
        "body_length": 3,
        "body_sha256": "abc",
    }


async def test_answers_each_request_with_its_description_on_one_connection() -> None:
    upload = b"x" * 100_000
    data = (
        b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n"
        b"POST /second HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        + f"{len(upload):x}\r\n".encode()
        + upload
        + b"\r\n0\r\n\r\n"
    )
    answers = responses(await exchange(data), 2)
    assert [r.status_code for r, _ in answers] == [200, 200]
    first, second = (json.loads(body) for _, body in answers)
    assert (first["method"], first["target"], first["body_length"]) == ("GET", "/first", 0)
    assert (second["method"], second["target"]) == ("POST", "/second")
    assert second["body_length"] == len(upload)
    assert second["body_sha256"] == hashlib.sha256(upload).hexdigest()
    assert ["Transfer-Encoding", "chunked"] in second["headers"]


async def test_head_gets_the_fields_without_the_body() -> None:
    data = await exchange(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"content-length: " in head.lower()
    assert rest == b""


async def test_connection_close_is_honoured() -> None:
    # No EOF from us: the handler must end the connection itself after answering.
    data = await exchange(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", close=False)
    assert [r.status_code for r, _ in responses(data, 1)] == [200]


@pytest.mark.parametrize(
    "request_bytes",
    [b"GET / HTTP/1.1\r\n\r\n", b"GET / HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n"],
)
async def test_an_unreadable_request_gets_400_and_the_close(request_bytes: bytes) -> None:
    data = await exchange(request_bytes, close=False)
    assert data.startswith(b"HTTP/1.1 400 ")
    assert b"dualproxy dev echo: bad request" in data


async def test_an_idle_connection_is_closed_after_the_idle_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(echo.handle, server)
        await client.send_all(b"GET / HTTP/1.1\r\nHo")  # and then nothing
        # On the mock clock: open for as long as a slow proxy may take...
        with trio.move_on_after(echo.ECHO_IDLE_TIMEOUT - 1) as still_open:
            await client.receive_some(1024)
        assert still_open.cancelled_caught
        # ...then closed, unanswered.
        assert await client.receive_some(1024) == b""


async def test_serve_accepts_on_its_loopback_socket() -> None:
    sock = echo.open_socket()
    port = sock.getsockname()[1]
    assert sock.getsockname()[0] == "127.0.0.1"
    async with trio.open_nursery() as nursery:
        await nursery.start(echo.serve, sock)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"GET /live HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
        assert json.loads(responses(data, 1)[0][1])["target"] == "/live"
        nursery.cancel_scope.cancel()
