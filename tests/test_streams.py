"""ReplayStream: the trio Stream contract, prefix semantics, and a TLS handshake through it."""

from __future__ import annotations

import ssl

import pytest
import trio
import trio.testing
import trustme

from dualproxy.streams import ReplayStream

# Generous bound on one in-memory handshake, so that a regression fails instead of hanging.
HANDSHAKE_TIMEOUT_SECONDS = 10
SERVER_NAME = "proxy.example.org"


async def replay_pair() -> tuple[ReplayStream, ReplayStream]:
    left, right = trio.testing.memory_stream_pair()
    return ReplayStream(left), ReplayStream(right)


async def clogged_replay_pair() -> tuple[ReplayStream, ReplayStream]:
    left, right = trio.testing.lockstep_stream_pair()
    return ReplayStream(left), ReplayStream(right)


async def test_two_way_stream_contract() -> None:
    await trio.testing.check_two_way_stream(replay_pair, clogged_replay_pair)


async def test_prefix_comes_first_split_by_max_bytes_then_transport() -> None:
    near, far = trio.testing.memory_stream_pair()
    stream = ReplayStream(near, b"hello")
    await far.send_all(b"world")

    assert await stream.receive_some(2) == b"he"
    # The rest of the prefix alone: serving the buffer never waits for the network.
    assert await stream.receive_some() == b"llo"
    assert await stream.receive_some() == b"world"


async def test_receive_from_prefix_is_a_checkpoint() -> None:
    near, _far = trio.testing.memory_stream_pair()
    stream = ReplayStream(near, b"ab")

    with trio.testing.assert_checkpoints():
        assert await stream.receive_some(1) == b"a"
    with trio.testing.assert_checkpoints():
        assert await stream.receive_some(None) == b"b"


async def test_receive_without_prefix_reads_the_transport() -> None:
    near, far = trio.testing.memory_stream_pair()
    stream = ReplayStream(near)
    await far.send_all(b"xyz")

    assert await stream.receive_some(2) == b"xy"
    assert stream.transport is near


@pytest.mark.parametrize("prefix", [b"", b"peeked"])
@pytest.mark.parametrize("max_bytes", [0, -1])
async def test_max_bytes_must_be_positive(prefix: bytes, max_bytes: int) -> None:
    near, _far = trio.testing.memory_stream_pair()
    stream = ReplayStream(near, prefix)

    with pytest.raises(ValueError, match="max_bytes"):
        await stream.receive_some(max_bytes)


async def test_max_bytes_must_be_an_integer() -> None:
    near, _far = trio.testing.memory_stream_pair()
    stream = ReplayStream(near, b"peeked")

    with pytest.raises(TypeError):
        await stream.receive_some(1.5)  # type: ignore[arg-type]
    # The refused call consumed nothing.
    assert await stream.receive_some() == b"peeked"


async def test_concurrent_receive_while_serving_prefix_is_busy() -> None:
    near, _far = trio.testing.memory_stream_pair()
    stream = ReplayStream(near, b"peeked")

    with pytest.RaisesGroup(trio.BusyResourceError):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.receive_some, 1)
            nursery.start_soon(stream.receive_some, 1)


async def test_closed_stream_refuses_everything_and_closes_transport() -> None:
    near, _far = trio.testing.memory_stream_pair()
    stream = ReplayStream(near, b"never read")

    await stream.aclose()
    await stream.aclose()

    with pytest.raises(trio.ClosedResourceError):
        await stream.receive_some()
    with pytest.raises(trio.ClosedResourceError):
        await stream.send_all(b"x")
    with pytest.raises(trio.ClosedResourceError):
        await near.receive_some()


async def test_keep_transport_open_leaves_the_transport_to_the_caller() -> None:
    near, far = trio.testing.memory_stream_pair()
    stream = ReplayStream(near, b"never read")
    stream.keep_transport_open()

    await stream.aclose()

    with pytest.raises(trio.ClosedResourceError):
        await stream.receive_some()
    await far.send_all(b"still")
    assert await near.receive_some() == b"still"


async def test_aclose_during_a_prefix_receive_raises_closed() -> None:
    near, _far = trio.testing.memory_stream_pair()
    stream = ReplayStream(near, b"peeked")

    async def receive_expecting_closed() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await stream.receive_some()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive_expecting_closed)
        # Whichever task the scheduler runs first, the receive must not return the prefix.
        await trio.lowlevel.checkpoint()
        await stream.aclose()


@pytest.fixture(scope="module")
def tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A (server, client) context pair trusting a throwaway CA."""
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(SERVER_NAME).configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


async def tls_echo_through_peek(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
    peek_bytes: int | None,
    replay: bool,
    raw_pair: tuple[trio.abc.Stream, trio.abc.Stream] | None = None,
) -> bytes | bytearray:
    """Handshake with the server peeking `peek_bytes` of the hello first; return the echo.

    `raw_pair` is the (client, server) transport, a memory stream pair by default.
    """
    server_context, client_context = contexts
    client_raw, server_raw = raw_pair or trio.testing.memory_stream_pair()
    client = trio.SSLStream(client_raw, client_context, server_hostname=SERVER_NAME)
    echoed: bytes | bytearray = b""

    async def serve() -> None:
        peeked = await server_raw.receive_some(peek_bytes)
        assert peek_bytes is None or len(peeked) == peek_bytes
        transport = ReplayStream(server_raw, peeked) if replay else server_raw
        server = trio.SSLStream(transport, server_context, server_side=True)
        try:
            await server.send_all(await server.receive_some())
        finally:
            await trio.aclose_forcefully(server)

    async def talk() -> None:
        nonlocal echoed
        try:
            await client.send_all(b"ping")
            echoed = await client.receive_some()
        finally:
            await trio.aclose_forcefully(client)

    with trio.fail_after(HANDSHAKE_TIMEOUT_SECONDS):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            nursery.start_soon(talk)
    return echoed


# 1 byte cuts the record header, 5 is exactly the header, 64 cuts the hello body, None reads
# the whole first flight.
@pytest.mark.parametrize("peek_bytes", [1, 5, 64, None])
async def test_tls_handshake_through_replayed_hello(
    tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext], peek_bytes: int | None
) -> None:
    assert await tls_echo_through_peek(tls_contexts, peek_bytes, replay=True) == b"ping"


@pytest.mark.parametrize("peek_bytes", [1, 5, 64])
async def test_tls_handshake_fails_without_replay(
    tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext], peek_bytes: int
) -> None:
    # OpenSSL itself rejects the hello's remains; the client is then cancelled with the nursery.
    openssl_rejected = pytest.RaisesExc(
        trio.BrokenResourceError, check=lambda exc: isinstance(exc.__cause__, ssl.SSLError)
    )
    with pytest.RaisesGroup(openssl_rejected):
        await tls_echo_through_peek(tls_contexts, peek_bytes, replay=False)


async def test_tls_handshake_through_replayed_hello_on_loopback(
    tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    # The production shape: a real SocketStream under the replay, header peeked first.
    async with (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0] as listener:
        client_raw = await trio.testing.open_stream_to_socket_listener(listener)
        server_raw = await listener.accept()
        echoed = await tls_echo_through_peek(
            tls_contexts, 5, replay=True, raw_pair=(client_raw, server_raw)
        )
    assert echoed == b"ping"
