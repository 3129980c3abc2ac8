"""http.smallserver, the small servers' one request reader and answer writer, on trio memory
streams: every request whole, byte by byte and in pieces, with what may follow it; each bound
and each refusal beside the accepted twin that shows it is not blanket. Then who may ask, and
the listening socket on real loopback.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Final

import pytest
import trio
import trio.testing
from helpers.clients import CLIENT_TIMEOUT, ipv6_loopback
from helpers.smallhttp import exchange, head_of, receive_all

from dualproxy.http import smallserver
from dualproxy.http.errors import HttpRefusal
from dualproxy.http.smallserver import (
    LOCAL_MAX_HEAD_BYTES,
    Answer,
    Connection,
    Request,
    answer_one_request,
)

MAX_HEAD: Final = 256
POST: Final = b"POST /report?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\nhello world"
POST_HEAD_SIZE: Final = POST.index(b"\r\n\r\n") + 4
EXPECTED: Final = Request(
    b"POST", b"/report?x=1", ((b"host", b"a"), (b"content-length", b"11")), b"hello world", 11
)
# Whole; byte by byte; in pieces that end neither on a line nor on the head.
PIECES: Final = [None, 1, 7]


async def deliver(stream: trio.abc.SendStream, data: bytes, piece: int | None) -> None:
    """`data` in pieces of `piece` bytes (None: at once), each once the reader has taken the
    one before, so the reader sees them apart."""
    step = piece or max(len(data), 1)
    for start in range(0, len(data), step):
        await stream.send_all(data[start : start + step])
        await trio.testing.wait_all_tasks_blocked()


async def read(
    data: bytes,
    piece: int | None = None,
    *,
    close: bool = False,
    max_head: int = MAX_HEAD,
    max_body: int | None = 1024,
    keep_body: bool = True,
) -> Request | HttpRefusal | None:
    """What receive_request makes of `data` so delivered (then the client's close, if
    `close`): the request, None, or the refusal."""
    client, server = trio.testing.memory_stream_pair()
    connection = Connection(server, max_head=max_head)
    outcome: Request | HttpRefusal | None = None

    async def reader() -> None:
        nonlocal outcome
        try:
            outcome = await connection.receive_request(max_body=max_body, keep_body=keep_body)
        except HttpRefusal as refused:
            outcome = refused

    with trio.fail_after(CLIENT_TIMEOUT):  # a guard against a hang, not a measurement
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await deliver(client, data, piece)
            if close:
                await client.send_eof()
    return outcome


# --- reading -----------------------------------------------------------------------------


@pytest.mark.parametrize("piece", PIECES)
async def test_a_request_is_read_however_it_arrives(piece: int | None) -> None:
    assert await read(POST, piece) == EXPECTED


@pytest.mark.parametrize("piece", PIECES)
async def test_what_follows_the_request_is_not_taken_for_it(piece: int | None) -> None:
    pipelined = POST + b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"
    assert await read(pipelined, piece) == EXPECTED


async def test_the_path_is_the_target_without_its_query() -> None:
    request = await read(POST)
    assert isinstance(request, Request)
    assert (request.path, request.values(b"host"), request.values(b"origin")) == (
        b"/report",
        [b"a"],
        [],
    )


@pytest.mark.parametrize("piece", PIECES)
async def test_without_max_body_the_request_is_returned_at_its_head(piece: int | None) -> None:
    """The body is left unread, and counts for nothing: a 1 MiB one stays the client's."""
    big = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1048576\r\n\r\n" + b"x" * 100
    request = await read(big, piece, max_body=None)
    assert request == Request(b"POST", b"/", ((b"host", b"a"), (b"content-length", b"1048576")))


async def test_a_body_not_kept_is_read_and_dropped() -> None:
    """Its size is still counted (for the access log)."""
    assert await read(POST, keep_body=False) == Request(
        EXPECTED.method, EXPECTED.target, EXPECTED.headers, body_size=11
    )


@pytest.mark.parametrize("piece", PIECES)
async def test_a_close_before_any_request_is_none(piece: int | None) -> None:
    assert await read(b"", piece, close=True) is None
    # Its twin: the same close after a whole request still gives the request.
    assert await read(POST, piece, close=True) == EXPECTED


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: a\r\nbad header\r\n\r\n",  # what h11 rejects
        b"GET / HTTP/1.1\r\nHost: a\r\n",  # closed mid-head
        POST[:-3],  # closed mid-body
    ],
    ids=["malformed", "closed-mid-head", "closed-mid-body"],
)
@pytest.mark.parametrize("piece", PIECES)
async def test_what_cannot_be_read_is_refused_with_400(data: bytes, piece: int | None) -> None:
    refused = await read(data, piece, close=True)
    assert isinstance(refused, HttpRefusal)
    assert refused.status == 400
    assert refused.problem.startswith("cannot read the request: ")


@pytest.mark.parametrize("piece", PIECES)
async def test_a_head_of_max_head_bytes_is_read_and_one_more_is_refused_with_431(
    piece: int | None,
) -> None:
    """Exact however the bytes arrive, and whatever follows the head."""
    assert isinstance(await read(head_of(MAX_HEAD) + b"GET /", piece), Request)
    refused = await read(head_of(MAX_HEAD + 1), piece)
    assert isinstance(refused, HttpRefusal)
    assert (refused.status, refused.problem) == (
        431,
        f"cannot read the request: its head is larger than {MAX_HEAD} bytes",
    )


async def test_the_head_bound_counts_what_was_sent_with_the_last_request() -> None:
    """A kept-alive connection's next head is bounded as the first: the bytes that came with
    the last request count."""
    for size, accepted in ((MAX_HEAD, True), (MAX_HEAD + 1, False)):
        client, server = trio.testing.memory_stream_pair()
        connection = Connection(server, max_head=MAX_HEAD)
        await client.send_all(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n" + head_of(size)[:100])
        assert await connection.receive_request(max_body=0) is not None
        await connection.send_answer(Answer(204), keep_alive=True)
        assert connection.start_next_cycle()
        await client.send_all(head_of(size)[100:])
        if accepted:
            assert await connection.receive_request(max_body=0) is not None
        else:
            with pytest.raises(HttpRefusal, match="larger than"):
                await connection.receive_request(max_body=0)


@pytest.mark.parametrize("piece", PIECES)
async def test_a_body_of_max_body_bytes_is_read_and_one_more_is_refused_with_413(
    piece: int | None,
) -> None:
    assert await read(POST, piece, max_body=11) == EXPECTED
    refused = await read(POST, piece, max_body=10)
    assert isinstance(refused, HttpRefusal)
    assert (refused.status, refused.problem) == (
        413,
        "the request body is too large: at most 10 bytes",
    )


# --- answering ---------------------------------------------------------------------------

GET: Final = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
HEAD: Final = b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n"
ANSWER: Final = Answer(200, b"hello", content_type=b"text/plain", headers=((b"x-a", b"b"),))
ANSWER_HEAD: Final = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\nconnection: close\r\n"
    b"x-a: b\r\n\r\n"
)


async def answered(request: bytes, answer: Answer, *, keep_alive: bool = False) -> bytes:
    """What the client receives when `request` is answered with `answer` (then closed)."""
    client, server = trio.testing.memory_stream_pair()
    connection = Connection(server, max_head=MAX_HEAD)
    await client.send_all(request)
    assert await connection.receive_request(max_body=0) is not None
    await connection.send_answer(answer, keep_alive=keep_alive)
    await server.aclose()
    return await receive_all(client)


async def test_an_answer_is_sent_whole_in_one_send() -> None:
    assert await answered(GET, ANSWER) == ANSWER_HEAD + b"hello"


async def test_a_head_request_gets_the_same_head_without_the_body() -> None:
    """h11 would refuse the body (a HEAD answer has none), which used to cost the server."""
    assert await answered(HEAD, ANSWER) == ANSWER_HEAD


async def test_a_204_has_no_content_length_a_200_has() -> None:
    assert await answered(GET, Answer(204)) == (
        b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n"
    )
    assert await answered(GET, Answer(200)) == (
        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    )


async def test_a_kept_alive_connection_reads_the_next_request() -> None:
    client, server = trio.testing.memory_stream_pair()
    connection = Connection(server, max_head=MAX_HEAD)
    await client.send_all(GET + b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert await connection.receive_request(max_body=0) is not None
    await connection.send_answer(Answer(200, b"1"), keep_alive=True)
    assert connection.start_next_cycle()
    second = await connection.receive_request(max_body=0)
    assert second is not None
    assert second.target == b"/2"
    await connection.send_answer(Answer(200, b"2"))  # the last: Connection: close
    assert not connection.start_next_cycle()
    await server.aclose()
    assert await receive_all(client) == (
        b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n1"
        b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\nconnection: close\r\n\r\n2"
    )


async def test_a_client_that_asks_to_close_is_not_kept_alive() -> None:
    client, server = trio.testing.memory_stream_pair()
    connection = Connection(server, max_head=MAX_HEAD)
    await client.send_all(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert await connection.receive_request(max_body=0) is not None
    await connection.send_answer(Answer(200), keep_alive=True)
    assert not connection.start_next_cycle()
    await server.aclose()
    assert b"\r\nconnection: close\r\n" in (await receive_all(client)).lower()


async def test_an_unread_body_leaves_the_connection_unfit_for_another_request() -> None:
    client, server = trio.testing.memory_stream_pair()
    connection = Connection(server, max_head=MAX_HEAD)
    await client.send_all(POST)
    assert await connection.receive_request() is not None  # the body is left unread
    assert connection.can_answer
    await connection.send_answer(Answer(308), keep_alive=True)
    assert not connection.can_answer
    assert not connection.start_next_cycle()


# --- a local endpoint's one request --------------------------------------------------------


async def one_request(
    request: bytes, respond: Callable[[Request], Awaitable[Answer]]
) -> tuple[bytes, dict[str, object] | None]:
    """The raw answer to `request` from answer_one_request, and its JSON if it has one."""
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: answer_one_request(server, respond, max_body=10, what="test"))
        await client.send_all(request)
        data = await receive_all(client)
    head, _, body = data.partition(b"\r\n\r\n")
    return head, json.loads(body) if body else None


async def scenario(request: Request) -> Answer:
    if request.path != b"/":
        raise HttpRefusal(405, "use /", fault="client", headers=((b"allow", b"GET"),))
    return smallserver.json_answer(200, {"body": request.body.decode()})


async def test_one_request_is_answered_and_closed() -> None:
    head, document = await one_request(
        b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi", scenario
    )
    assert head.startswith(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n")
    assert b"\r\nconnection: close" in head
    assert document == {"body": "hi"}


async def test_a_refusal_is_its_status_headers_and_error() -> None:
    head, document = await one_request(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n", scenario)
    assert head.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")
    assert head.endswith(b"\r\nallow: GET")
    assert document == {"error": "use /"}
    # The reader's own refusals are answered the same way.
    too_long = b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\nhello world"
    head, document = await one_request(too_long, scenario)
    assert head.startswith(b"HTTP/1.1 413 ")
    assert document == {"error": "the request body is too large: at most 10 bytes"}


async def test_our_own_bug_is_a_logged_500_not_the_end_of_the_server(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(request: Request) -> Answer:
        raise RuntimeError("bug")

    with caplog.at_level(logging.ERROR, logger="dualproxy"):
        head, document = await one_request(GET, broken)
    assert head.startswith(b"HTTP/1.1 500 ")
    assert document == {"error": "internal error: see the log"}
    assert "test: internal error" in caplog.text
    # Its twin: a responder that works logs nothing.
    caplog.clear()
    await one_request(GET, scenario)
    assert caplog.text == ""


@pytest.mark.parametrize("complete", [False, True], ids=["unfinished", "finished"])
async def test_a_client_that_never_finishes_its_request_is_closed_unanswered(
    autojump_clock: trio.testing.MockClock, complete: bool
) -> None:
    asked: list[Request] = []

    async def respond(request: Request) -> Answer:
        asked.append(request)
        return Answer(204)

    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: answer_one_request(server, respond, max_body=10, what="test"))
        await client.send_all(GET if complete else GET[:-2])
        data = await receive_all(client)  # the clock jumps past LOCAL_REQUEST_TIMEOUT
    assert (data.startswith(b"HTTP/1.1 204 "), len(asked)) == (complete, int(complete))
    if not complete:
        assert data == b""


async def test_a_local_head_is_bounded_by_local_max_head_bytes() -> None:
    head, _ = await one_request(head_of(LOCAL_MAX_HEAD_BYTES), scenario)
    assert head.startswith(b"HTTP/1.1 200 ")
    head, document = await one_request(head_of(LOCAL_MAX_HEAD_BYTES + 1), scenario)
    assert head.startswith(b"HTTP/1.1 431 ")
    assert document == {
        "error": f"cannot read the request: its head is larger than {LOCAL_MAX_HEAD_BYTES} bytes"
    }


async def test_a_client_that_leaves_costs_nothing_but_its_answer() -> None:
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(GET)
    await client.aclose()
    await answer_one_request(server, scenario, max_body=10, what="test")  # no exception


# --- who may ask ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.3.2.1", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("fe80::1%eth0", False),
        ("2001:db8::1", False),
        ("localhost", False),  # a name is not an address
        ("", False),
    ],
)
def test_address_is_loopback(address: str, loopback: bool) -> None:
    assert smallserver.address_is_loopback(address) is loopback


def asked(*headers: tuple[bytes, bytes]) -> Request:
    return Request(b"GET", b"/", headers)


@pytest.mark.parametrize(
    ("hosts", "accepted"),
    [
        ([b"localhost"], True),
        ([b"localhost:8444"], True),
        ([b"127.0.0.1"], True),
        ([b"127.0.0.2:1"], True),
        ([b"[::1]"], True),
        ([b"[::1]:8444"], True),
        ([b"evil.example:8444"], False),
        ([b"127.0.0.1.nip.io"], False),
        ([b"localhost.evil.example"], False),
        ([b"[::2]"], False),
        ([b"localhost:http"], False),
        ([b"[::1]x"], False),
        ([b"a:b"], False),
        ([], False),
        ([b"localhost", b"localhost"], False),
    ],
)
def test_only_a_loopback_host_passes(hosts: list[bytes], accepted: bool) -> None:
    problem = smallserver.host_problem(asked(*((b"host", host) for host in hosts)))
    if accepted:
        assert problem is None
    else:
        assert problem is not None
        assert "is not this machine's loopback" in problem


def test_a_request_from_a_web_page_is_refused_saying_what_to_do() -> None:
    host = (b"host", b"localhost")
    assert smallserver.origin_problem(asked(host)) is None
    page = asked(host, (b"origin", b"null"))
    assert smallserver.origin_problem(page) == "refused a request from a web page (Origin: null)"
    with pytest.raises(HttpRefusal) as caught:
        smallserver.refuse_web_pages(page, "do it this way")
    assert (caught.value.status, caught.value.problem) == (
        403,
        "refused a request from a web page (Origin: null): do it this way",
    )
    with pytest.raises(HttpRefusal, match="is not this machine's loopback") as caught:
        smallserver.refuse_web_pages(asked((b"host", b"evil.example")), "do it this way")
    assert caught.value.status == 403
    smallserver.refuse_web_pages(asked(host), "do it this way")  # the twin: no refusal


# --- listening ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        pytest.param(
            "::1", marks=pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback")
        ),
    ],
)
async def test_a_socket_served_on_loopback_answers_its_peers(host: str) -> None:
    sock = smallserver.open_socket(host, 0)
    assert smallserver.listens_on_loopback(sock)
    peers: list[bool] = []

    async def handle(stream: trio.SocketStream) -> None:
        peers.append(smallserver.peer_is_loopback(stream))
        await answer_one_request(stream, scenario, max_body=10, what="test")

    async with trio.open_nursery() as nursery:
        await nursery.start(smallserver.serve_socket, sock, handle)
        answer = await exchange(host, sock.getsockname()[1], GET)
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
        nursery.cancel_scope.cancel()
    assert peers == [True]


def test_a_socket_on_every_interface_is_not_on_loopback() -> None:
    with socket.create_server(("0.0.0.0", 0)) as sock:
        assert not smallserver.listens_on_loopback(sock)
