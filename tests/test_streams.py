"""TcpStream and TlsStream: trio's stream contract, the pacing of schedule points, the peeked
prefix, and how TLS streams end, break and close. All on real sockets (socket pairs)."""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing
import trustme
from helpers.clients import strict_eof

from dualproxy.tls import streams
from dualproxy.tls.streams import TcpStream, TlsStream

# Generous bound on anything here, so that a regression fails instead of hanging.
TIMEOUT_SECONDS = 10
SERVER_NAME = "proxy.example.org"


@pytest.fixture(scope="module")
def tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A (server, client) context pair trusting a throwaway CA."""
    ca = trustme.CA()
    server = strict_eof(ssl.create_default_context(ssl.Purpose.CLIENT_AUTH))
    ca.issue_cert(SERVER_NAME).configure_cert(server)
    client = strict_eof(ssl.create_default_context())
    ca.configure_trust(client)
    return server, client


@pytest.fixture
def yield_every_operation(monkeypatch: pytest.MonkeyPatch) -> None:
    """trio's contract checks want every operation to be a schedule point: with
    YIELD_EVERY = 1 these streams are held to all of trio's rules."""
    monkeypatch.setattr(streams, "YIELD_EVERY", 1)


def tcp_pair() -> tuple[TcpStream, TcpStream]:
    left, right = socket.socketpair()
    return TcpStream(left), TcpStream(right)


async def fill(stream: trio.abc.SendStream) -> None:
    """Send until the peer's buffers are full (nobody reads), then stop."""
    async with trio.open_nursery() as nursery:

        async def send_forever() -> None:
            while True:  # bounded: cancelled once the send blocks
                await stream.send_all(b"x" * 65536)

        nursery.start_soon(send_forever)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()


async def make_tcp_pair() -> tuple[TcpStream, TcpStream]:
    return tcp_pair()


async def make_clogged_tcp_pair() -> tuple[TcpStream, TcpStream]:
    left, right = tcp_pair()
    await fill(left)
    await fill(right)
    return left, right


async def test_tcp_stream_keeps_trios_half_closeable_contract(
    yield_every_operation: None,
) -> None:
    await trio.testing.check_half_closeable_stream(make_tcp_pair, make_clogged_tcp_pair)


async def handshaken(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
    *,
    peek: int = 0,
    https_compatible: bool = False,
) -> tuple[TlsStream, TlsStream]:
    """A (server, client) pair after the handshake; the server first reads `peek` bytes of
    the ClientHello itself and hands them over as the prefix, as server.py does."""
    server_context, client_context = contexts
    server_tcp, client_tcp = tcp_pair()
    client = TlsStream(
        client_tcp,
        client_context,
        server_side=False,
        server_hostname=SERVER_NAME,
        https_compatible=https_compatible,
    )
    server: TlsStream | None = None

    async def serve() -> None:
        nonlocal server
        prefix = b""
        while len(prefix) < peek:  # bounded: peek bytes, TIMEOUT_SECONDS
            prefix += await server_tcp.receive_some(peek - len(prefix))
        server = TlsStream(server_tcp, server_context, server_side=True, prefix=prefix)
        await server.do_handshake()

    with trio.fail_after(TIMEOUT_SECONDS):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            nursery.start_soon(client.do_handshake)
    assert server is not None
    return server, client


@contextlib.asynccontextmanager
async def tls_pair(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext], **options: int | bool
) -> AsyncIterator[tuple[TlsStream, TlsStream]]:
    server, client = await handshaken(contexts, **options)  # type: ignore[arg-type]
    try:
        yield server, client
    finally:
        server.transport_stream.close()
        client.transport_stream.close()


async def test_tls_stream_keeps_trios_two_way_contract(
    tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext], yield_every_operation: None
) -> None:
    async def make() -> tuple[TlsStream, TlsStream]:
        return await handshaken(tls_contexts)

    # No clogged pair: clogging means a send cancelled half-way, which breaks a TLS stream
    # (as it does trio's); waiting on a full socket is the TcpStream's, checked above.
    await trio.testing.check_two_way_stream(make, None)


# 1 byte cuts the record header, 5 is exactly the header, 64 cuts the hello body.
@pytest.mark.parametrize("peek", [0, 1, 5, 64])
async def test_openssl_sees_the_peeked_hello_first(
    tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext], peek: int
) -> None:
    async with tls_pair(tls_contexts, peek=peek) as (server, client):
        await client.send_all(b"ping")
        assert await server.receive_some() == b"ping"
        await server.send_all(b"pong")
        assert await client.receive_some() == b"pong"
        assert server.version() == client.version() == "TLSv1.3"


async def test_a_hello_missing_its_peeked_bytes_fails_the_handshake(
    tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_context, client_context = tls_contexts
    server_tcp, client_tcp = tcp_pair()
    client = TlsStream(client_tcp, client_context, server_side=False, server_hostname=SERVER_NAME)
    with trio.fail_after(TIMEOUT_SECONDS):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            await server_tcp.receive_some(5)  # read, and then not handed over
            server = TlsStream(server_tcp, server_context, server_side=True)
            with pytest.raises(trio.BrokenResourceError) as info:
                await server.do_handshake()
            assert isinstance(info.value.__cause__, ssl.SSLError)
            nursery.cancel_scope.cancel()
    server_tcp.close()
    client_tcp.close()


# What a TLS 1.0 client sends first: a ClientHello record whose version OpenSSL refuses under
# our TLS 1.2 minimum (the record is OpenSSL's own client's, cut to what the server reads).
def old_protocol_hello(version: ssl.TLSVersion) -> bytes:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    context.minimum_version = context.maximum_version = version
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    with contextlib.suppress(ssl.SSLWantReadError):
        context.wrap_bio(incoming, outgoing).do_handshake()
    return outgoing.read()


@pytest.mark.parametrize(
    ("sent", "alert"),
    [
        # An oversized record: its header says 2^14 + 2049 bytes, more than any TLS record.
        pytest.param(b"\x16\x03\x01" + (2**14 + 2049).to_bytes(2) + b"\x01", 22, id="overflow"),
        # A plaintext record of 2^14 + 1 bytes, one more than RFC 8446 5.1 allows.
        pytest.param(
            b"\x16\x03\x01" + (2**14 + 1).to_bytes(2) + bytes(2**14 + 1), 22, id="long-record"
        ),
    ],
)
@pytest.mark.parametrize("as_prefix", [True, False], ids=["peeked", "read"])
async def test_a_failed_handshake_sends_the_alert_openssl_wrote(
    tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext], sent: bytes, alert: int, as_prefix: bool
) -> None:
    """The peer gets the fatal alert (level 2) that says why, then the close; not just a
    close (nginx sends these too: its OpenSSL writes to the socket itself)."""
    server_context, _ = tls_contexts
    server_tcp, client_tcp = tcp_pair()
    server = TlsStream(
        server_tcp, server_context, server_side=True, prefix=sent if as_prefix else b""
    )
    with trio.fail_after(TIMEOUT_SECONDS):
        if not as_prefix:
            await client_tcp.send_all(sent)
        with pytest.raises(trio.BrokenResourceError):
            await server.do_handshake()
        server.close()
        received = b""
        while chunk := await client_tcp.receive_some():
            received += chunk
    client_tcp.close()
    assert (received[0], received[3:]) == (21, bytes([0, 2, 2, alert]))  # alert, fatal


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize("version", ["TLSv1", "TLSv1_1"])
async def test_an_old_protocol_version_gets_the_protocol_version_alert(version: str) -> None:
    # TLS 1.2 at least, as every server context of ours (keystore.build_context); the version
    # is refused before a certificate is needed.
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.minimum_version = ssl.TLSVersion.TLSv1_2
    hello = old_protocol_hello(getattr(ssl.TLSVersion, version))
    server_tcp, client_tcp = tcp_pair()
    server = TlsStream(server_tcp, server_context, server_side=True, prefix=hello)
    with trio.fail_after(TIMEOUT_SECONDS):
        with pytest.raises(trio.BrokenResourceError, match="UNSUPPORTED_PROTOCOL"):
            await server.do_handshake()
        server.close()
        received = b""
        while chunk := await client_tcp.receive_some():
            received += chunk
    client_tcp.close()
    assert (received[0], received[3:]) == (21, bytes([0, 2, 2, 70]))  # fatal protocol_version


async def test_an_alert_for_a_peer_that_left_is_dropped(
    tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    """The peer sent half a record and left: the alert cannot be sent, and the handshake fails
    as it would without one (no OSError from the send escapes)."""
    server_context, _ = tls_contexts
    server_tcp, client_tcp = tcp_pair()
    server = TlsStream(server_tcp, server_context, server_side=True, prefix=b"\x16\x03\x01")
    client_tcp.close()
    with trio.fail_after(TIMEOUT_SECONDS), pytest.raises(trio.BrokenResourceError) as failed:
        await server.do_handshake()
    assert isinstance(failed.value.__cause__, ssl.SSLError)
    server.close()


# --- schedule points --------------------------------------------------------------------------


async def test_operations_that_find_the_socket_ready_still_yield_every_few() -> None:
    left, right = tcp_pair()
    rounds = 4 * streams.YIELD_EVERY
    await right.send_all(b"x" * rounds)  # all there before the reads start
    others_ran = 0

    async def other() -> None:
        nonlocal others_ran
        while True:  # bounded: cancelled below
            others_ran += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        await trio.lowlevel.checkpoint()  # `other` is running
        before = others_ran
        for _ in range(rounds):
            assert await left.receive_some(1) == b"x"
        ran = others_ran - before
        nursery.cancel_scope.cancel()
    # Not at every read (that is the saving), but at least every YIELD_EVERY (the other
    # task may miss the last one: the scheduler picks the order of a batch at random).
    assert rounds // streams.YIELD_EVERY - 1 <= ran < rounds // 2
    left.close()
    right.close()


@pytest.mark.parametrize("operation", ["receive", "send"])
async def test_a_cancelled_caller_stops_even_when_the_socket_is_ready(operation: str) -> None:
    left, right = tcp_pair()
    await right.send_all(b"ready")
    with trio.CancelScope() as scope:
        scope.cancel()
        if operation == "receive":
            await left.receive_some()
        else:
            await left.send_all(b"data")
    assert scope.cancelled_caught
    # Nothing was taken or sent: the bytes are still there, the peer got nothing.
    assert await left.receive_some() == b"ready"
    with pytest.raises(BlockingIOError):
        right.socket.recv(10)
    left.close()
    right.close()


class CountingSocket(socket.socket):
    """A socket that counts its recv calls, failed ones included."""

    recvs = 0

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        self.recvs += 1
        return super().recv(bufsize, flags)


def counting_pair() -> tuple[TcpStream, TcpStream, CountingSocket]:
    left, right = socket.socketpair()
    counted = CountingSocket(left.family, left.type, left.proto, fileno=left.detach())
    return TcpStream(counted), TcpStream(right), counted


async def test_a_receive_after_a_send_waits_before_it_reads() -> None:
    """The answer to what was just sent is not there yet: no recv is tried (and fails) first."""
    left, right, counted = counting_pair()
    answer = b""

    async def ask() -> None:
        nonlocal answer
        await left.send_all(b"question")
        answer = await left.receive_some()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask)
        await trio.testing.wait_all_tasks_blocked()
        assert await right.receive_some() == b"question"
        await right.send_all(b"answer")
    assert (answer, counted.recvs) == (b"answer", 1)
    left.close()
    right.close()


async def test_a_receive_after_a_send_still_reads_what_came_early_and_can_be_cancelled() -> None:
    left, right, _ = counting_pair()
    await right.send_all(b"pipelined")  # there before we even send
    await left.send_all(b"question")
    assert await left.receive_some() == b"pipelined"
    await left.send_all(b"again")
    with trio.move_on_after(0.01) as scope:  # nothing to read: the wait is cancelled
        await left.receive_some()
    assert scope.cancelled_caught
    await right.send_all(b"late")
    assert await left.receive_some() == b"late"  # nothing lost, the stream still works
    left.close()
    right.close()


@pytest.mark.parametrize("operation", ["receive", "send"])
async def test_closing_wakes_a_task_waiting_in_an_operation(operation: str) -> None:
    left, right = tcp_pair()
    if operation == "send":
        await fill(left)
    failed: list[BaseException] = []

    async def wait() -> None:
        try:
            if operation == "receive":
                await left.receive_some()
            else:
                await left.send_all(b"x" * 65536)
        except trio.ClosedResourceError as exc:
            failed.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        left.close()
    assert len(failed) == 1
    right.close()


# --- how TLS streams end ----------------------------------------------------------------------


async def test_close_notify_reads_as_the_end(
    tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    async with tls_pair(tls_contexts) as (server, client):
        await server.send_all(b"last")
        await server.aclose()
        assert await client.receive_some() == b"last"
        assert await client.receive_some() == b""
        with pytest.raises(trio.ClosedResourceError):
            await server.receive_some()


@pytest.mark.parametrize("https_compatible", [False, True])
async def test_a_close_without_close_notify(
    tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext], https_compatible: bool
) -> None:
    """A truncation on the client side (strict); a plain end towards an upstream
    (https_compatible), where the framing of the response tells a truncation instead."""
    async with tls_pair(tls_contexts, https_compatible=https_compatible) as (server, client):
        await server.send_all(b"data")
        server.transport_stream.close()  # no close_notify
        assert await client.receive_some() == b"data"
        if https_compatible:
            assert await client.receive_some() == b""
        else:
            with pytest.raises(trio.BrokenResourceError):
                await client.receive_some()


async def test_the_last_response_carries_the_close_notify_in_the_same_send(
    tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    async with tls_pair(tls_contexts) as (server, client):
        sends = server.transport_stream.operations
        await server.send_all(b"last response", then_close_notify=True)
        assert server.transport_stream.operations == sends + 1  # one send for both
        assert server.close_notify_sent
        assert await client.receive_some() == b"last response"
        assert await client.receive_some() == b""  # the close_notify: a clean end
        with pytest.raises(trio.ClosedResourceError):
            await server.send_all(b"more")
        # Closing has nothing left to send: the socket just closes.
        server.close()
        assert server.transport_stream.socket.fileno() == -1
        with pytest.raises(trio.ClosedResourceError):
            await server.receive_some()


async def test_send_close_notify_leaves_the_socket_open(
    tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    async with tls_pair(tls_contexts) as (server, client):
        await server.send_close_notify()
        assert await client.receive_some() == b""
        # TLS 1.3: our close_notify ends our side only; the client may still send.
        await client.send_all(b"late")
        assert await server.transport_stream.receive_some()  # raw bytes, still readable


async def test_tls13_session_tickets_go_out_with_the_first_response(
    tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    async with tls_pair(tls_contexts) as (server, client):
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(BlockingIOError):  # the handshake left nothing unsent to read
            client.transport_stream.socket.recv(1, socket.MSG_PEEK)
        await server.send_all(b"response")
        assert await client.receive_some() == b"response"


async def test_pending_counts_records_received_and_not_yet_read(
    tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    async with tls_pair(tls_contexts) as (server, client):
        assert not client.pending()
        await server.send_all(b"a" * 100)
        await server.send_all(b"b" * 100)  # two records
        assert await client.receive_some(10) == b"a" * 10
        assert client.pending()  # the rest of the first record, decrypted or not
        assert await client.receive_some() == b"a" * 90
        while client.pending():  # bounded: 100 bytes
            assert set(await client.receive_some()) == {ord("b")}


# --- breaking and busy ------------------------------------------------------------------------


async def test_a_send_cancelled_half_way_breaks_the_stream(
    tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    async with tls_pair(tls_contexts) as (server, _client):
        with trio.move_on_after(0.2):  # nobody reads: the send blocks part-way
            await server.send_all(b"x" * (8 * 1024 * 1024))
        with pytest.raises(trio.BrokenResourceError):
            await server.send_all(b"more")
        await server.aclose()  # closing a broken stream just closes the socket
        assert server.transport_stream.socket.fileno() == -1


@pytest.mark.parametrize("side", ["receive", "send"])
async def test_a_second_task_on_the_same_direction_is_refused(
    tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext], side: str
) -> None:
    async with tls_pair(tls_contexts) as (server, _client):

        async def operation() -> None:
            if side == "receive":
                await server.receive_some()  # nothing comes
            else:
                await server.send_all(b"x" * (8 * 1024 * 1024))  # nobody reads

        async with trio.open_nursery() as nursery:
            nursery.start_soon(operation)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await operation()
            nursery.cancel_scope.cancel()
