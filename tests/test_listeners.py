"""Listeners (serve.listeners): binding the configured addresses, the options accepted sockets
inherit, the one accept loop (its slots, its pause when descriptors run out), and a server
serving listeners it was given."""

from __future__ import annotations

import errno
import logging
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme
from helpers.clients import CLIENT_TIMEOUT, ipv6_loopback, tls_get_async
from helpers.configs import make_config
from helpers.keys import KeyFiles, make_key
from helpers.logs import ConnLog

from dualproxy.config.names import ListenAddress
from dualproxy.config.schema import Config
from dualproxy.serve import listeners as listeners_mod
from dualproxy.serve.listeners import accept_loop, bound_address, describe_bound, open_listeners
from dualproxy.serve.server import Server
from dualproxy.tls import streams as streams_mod
from dualproxy.tls.streams import TcpStream


@pytest.fixture
def old_key(ca: trustme.CA, tmp_path: Path) -> KeyFiles:
    return make_key(ca, tmp_path, "k1")


@pytest.fixture
def conn_log(caplog: pytest.LogCaptureFixture) -> ConnLog:
    caplog.set_level(logging.INFO, logger="dualproxy")
    return ConnLog(caplog)


@asynccontextmanager
async def serving_all(config: Config) -> AsyncIterator[list[tuple[str, int]]]:
    """Like helpers.serving's `serving`, reporting every bound address."""
    server = Server(config, handle_signals=False)
    async with trio.open_nursery() as nursery:
        yield await nursery.start(server.run)
        nursery.cancel_scope.cancel()


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback")
@pytest.mark.parametrize("max_connections", [1, 100])
async def test_every_listen_address_serves(
    old_key: KeyFiles, cafile: Path, tmp_path: Path, conn_log: ConnLog, max_connections: int
) -> None:
    config = make_config(
        [old_key],
        base_dir=tmp_path,
        extra={
            "listen": {"address": ["127.0.0.1:0", "[::1]:0"]},
            "limits": {"max_connections": max_connections},
        },
    )
    async with serving_all(config) as bound:
        assert [host for host, _ in bound] == ["127.0.0.1", "::1"]
        # Each address twice in a row: with one slot, a listener that held it while idle
        # would starve the other one's clients, whichever listener took it first.
        for host, port in [bound[0], bound[0], bound[1], bound[1]]:
            result = await tls_get_async(host, port, cafile=cafile)
            assert result.pin == old_key.pin
        lines = await conn_log.wait(4)
    peers = [x["peer"].rpartition(":")[0] for x in lines]
    assert peers == ["127.0.0.1", "127.0.0.1", "[::1]", "[::1]"]
    assert {x["outcome"] for x in lines} == {"ok"}


@pytest.mark.skipif(sys.platform != "linux", reason="Linux copies the listener's options")
async def test_accepted_sockets_get_nodelay_and_a_small_unsent_buffer() -> None:
    """Set on the listener, inherited by every accepted socket (no call per connection)."""
    [listener] = await open_listeners([ListenAddress("127.0.0.1", 0)], False)
    try:
        with socket.create_connection(listener.getsockname()[:2]):
            await trio.lowlevel.wait_readable(listener)
            accepted, _ = listener.accept()
            with accepted:
                stream = TcpStream(accepted, options_set=True)
                assert stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                lowat = stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)
                assert lowat == streams_mod.NOTSENT_LOWAT
    finally:
        listener.close()


@pytest.mark.parametrize("reuse_port", [True, False])
async def test_reuse_port_lets_a_second_server_bind_the_same_port(reuse_port: bool) -> None:
    first = await open_listeners([ListenAddress("127.0.0.1", 0)], reuse_port)
    port = first[0].getsockname()[1]
    try:
        if reuse_port:
            second = await open_listeners([ListenAddress("127.0.0.1", port)], reuse_port)
            assert second[0].getsockname()[1] == port
            second[0].close()
        else:
            with pytest.raises(OSError, match=rf"127\.0\.0\.1:{port} \(listen\.address\)") as info:
                await open_listeners([ListenAddress("127.0.0.1", port)], reuse_port)
            assert info.value.errno == errno.EADDRINUSE
    finally:
        first[0].close()


def open_fds() -> int:
    return len(list(Path("/proc/self/fd").iterdir()))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
async def test_taken_port_fails_naming_the_setting_and_closes_what_was_bound(
    old_key: KeyFiles, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        before = open_fds()
        addresses = [ListenAddress("127.0.0.1", 0), ListenAddress("127.0.0.1", port)]
        with pytest.raises(OSError, match=r"\(listen\.address\)") as info:
            await open_listeners(addresses, False)
        assert info.value.errno == errno.EADDRINUSE
        assert open_fds() == before  # the first address, bound, was closed again
        # The same through the server, before it reports readiness.
        config = make_config([old_key], base_dir=tmp_path, listen=f"127.0.0.1:{port}")
        server = Server(config, handle_signals=False)
        with pytest.raises(OSError, match=rf"cannot listen on 127\.0\.0\.1:{port} \(listen"):
            await server.run()


def test_bound_addresses_read_as_the_config_writes_them() -> None:
    assert describe_bound([("127.0.0.1", 8443), ("::1", 8443)]) == "127.0.0.1:8443, [::1]:8443"


async def test_a_server_serves_the_listeners_it_is_given_and_closes_them(
    old_key: KeyFiles, cafile: Path, tmp_path: Path
) -> None:
    """Listeners handed to run() (as another process may hand them over) are served instead of
    the configured addresses, and closed when the server stops."""
    given = await open_listeners([ListenAddress("127.0.0.1", 0)], False)
    bound = bound_address(given[0])
    with socket.socket() as taken:  # the configured address: a server binding it would fail
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        config = make_config([old_key], base_dir=tmp_path, listen=listen)
        server = Server(config, handle_signals=False)
        async with trio.open_nursery() as nursery:
            assert await nursery.start(server.run, given) == [bound]
            assert await server.wait_listening() == [bound]
            result = await tls_get_async(*bound, cafile=cafile)
            assert result.pin == old_key.pin
            nursery.cancel_scope.cancel()
    assert given[0].fileno() == -1


class FailingOnce:
    """A listener whose next accept() fails with `error` before it accepts again."""

    def __init__(self, sock: socket.socket, error: int) -> None:
        self.sock = sock
        self.error: int | None = error

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self) -> tuple[socket.socket, object]:
        if self.error is not None:
            error, self.error = self.error, None
            raise OSError(error, "as if")
        return self.sock.accept()

    def close(self) -> None:
        self.sock.close()


async def test_the_accept_loop_pauses_when_descriptors_run_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """EMFILE (no descriptor for the client) is logged and retried after a pause, as nginx
    does; the client waiting in the backlog is then served, and the slot given back."""
    [sock] = await open_listeners([ListenAddress("127.0.0.1", 0)], False)
    listener = FailingOnce(sock, errno.EMFILE)
    slots = trio.CapacityLimiter(1)
    served: list[object] = []

    async def handler(client: socket.socket, address: object, token: object) -> None:
        client.close()
        served.append(address)
        slots.release_on_behalf_of(token)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept_loop, listener, slots, nursery, handler)  # type: ignore[arg-type]
        with socket.create_connection(bound_address(sock)), trio.fail_after(CLIENT_TIMEOUT):
            while not served:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert "accept failed" in caplog.text
    assert "raise the open-file limit" in caplog.text
    assert slots.borrowed_tokens == 0
    assert sock.fileno() == -1  # the loop closes its listener on the way out


async def test_the_accept_loop_stops_on_an_error_that_is_not_about_resources() -> None:
    """The twin: a broken listener is not retried forever; the slot is given back."""
    [sock] = await open_listeners([ListenAddress("127.0.0.1", 0)], False)
    listener = FailingOnce(sock, errno.EINVAL)
    slots = trio.CapacityLimiter(1)

    async def handler(client: socket.socket, address: object, token: object) -> None:
        raise AssertionError("nothing is accepted")

    with socket.create_connection(bound_address(sock)):
        async with trio.open_nursery() as nursery:
            with pytest.raises(OSError, match="as if") as info:
                await accept_loop(listener, slots, nursery, handler)  # type: ignore[arg-type]
    assert info.value.errno == errno.EINVAL
    assert slots.borrowed_tokens == 0
    assert sock.fileno() == -1


async def test_a_full_batch_of_waiting_clients_yields_before_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Clients waiting in the backlog are accepted ACCEPT_BATCH at a time: all are served."""
    monkeypatch.setattr(listeners_mod, "ACCEPT_BATCH", 2)
    [sock] = await open_listeners([ListenAddress("127.0.0.1", 0)], False)
    slots = trio.CapacityLimiter(10)
    served: list[object] = []

    async def handler(client: socket.socket, address: object, token: object) -> None:
        client.close()
        served.append(address)
        slots.release_on_behalf_of(token)

    clients = [socket.create_connection(bound_address(sock)) for _ in range(5)]
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept_loop, sock, slots, nursery, handler)
            with trio.fail_after(CLIENT_TIMEOUT):
                while len(served) < len(clients):
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    finally:
        for client in clients:
            client.close()
    assert len(served) == 5
