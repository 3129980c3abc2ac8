"""At the connection limit (serve.admission): idle keep-alive connections are reclaimed, the
longest idle first, to admit new clients; a connection in the middle of a request is never
touched; with every slot busy, new clients wait in the backlog until one frees; one client
cannot hold more than limits.max_connections_per_client. In-process server, real TLS clients
on loopback; whether a connection was closed is read from its socket (poll), never timed."""

from __future__ import annotations

import logging
import select
import ssl
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, Final

import h11
import pytest
import trio
import trio.testing
import trustme
from helpers.clients import CLIENT_TIMEOUT
from helpers.configs import make_config
from helpers.h11client import receive_response
from helpers.keys import KeyFiles, make_key
from helpers.serving import Running, serving
from prometheus_client.parser import text_string_to_metric_families

from dualproxy.config.schema import Config
from dualproxy.http.lifecycle import Drain
from dualproxy.ops import admin, metrics, statuspage
from dualproxy.serve.admission import LOG_INTERVAL, RECLAIM_BATCH, Admission

SNI: Final = "api.example.com"
MAX_CONNECTIONS: Final = 50
NEW_CLIENTS: Final = 20


@pytest.fixture
def key(ca: trustme.CA, tmp_path: Path) -> KeyFiles:
    return make_key(ca, tmp_path, "k1")


def limited(key: KeyFiles, tmp_path: Path, **limits: Any) -> Config:
    # Idle connections would otherwise stay for the whole test: only a reclaim closes them.
    settings = {"keepalive_timeout": 3600, "request_header_timeout": 300, "body_timeout": 300}
    return make_config([key], base_dir=tmp_path, extra={"limits": {**settings, **limits}})


class Client:
    """One TLS connection to the server (no upstream: the placeholder answers)."""

    def __init__(self, tls: trio.SSLStream[trio.SocketStream]) -> None:
        self.tls = tls
        self.conn = h11.Connection(h11.CLIENT)

    @property
    def fd(self) -> int:
        return self.tls.transport_stream.socket.fileno()

    async def get(self) -> int:
        request = h11.Request(method="GET", target="/", headers=[("host", SNI)])
        with trio.fail_after(CLIENT_TIMEOUT):
            await self.tls.send_all(self.conn.send(request) + self.conn.send(h11.EndOfMessage()))
            response, _ = await receive_response(self.tls, self.conn)
        self.conn.start_next_cycle()
        return response.status_code

    def closed_by_server(self) -> bool:
        """Whether the server closed (its FIN is here); loopback delivers it with the close."""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN | select.POLLRDHUP)
        return any(events & (select.POLLRDHUP | select.POLLHUP) for _, events in poller.poll(0))


@asynccontextmanager
async def connected(port: int, cafile: Path, *, source: str = "127.0.0.1") -> AsyncIterator[Client]:
    sock = trio.socket.socket()
    context = ssl.create_default_context(cafile=str(cafile))
    tls = trio.SSLStream(trio.SocketStream(sock), context, server_hostname=SNI)
    try:
        with trio.fail_after(CLIENT_TIMEOUT):
            await sock.bind((source, 0))
            await sock.connect(("127.0.0.1", port))
            await tls.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(tls)
        raise
    try:
        yield Client(tls)
    finally:
        await trio.aclose_forcefully(tls)


async def start_slow_upload(client: Client) -> None:
    """A request whose body is still coming: the connection is busy, not idle."""
    head = h11.Request(
        method="POST", target="/upload", headers=[("host", SNI), ("content-length", "100")]
    )
    await client.tls.send_all(client.conn.send(head) + client.conn.send(h11.Data(data=b"x" * 10)))


async def finish_slow_upload(client: Client) -> int:
    with trio.fail_after(CLIENT_TIMEOUT):
        data = client.conn.send(h11.Data(data=b"x" * 90)) + client.conn.send(h11.EndOfMessage())
        await client.tls.send_all(data)
        response, _ = await receive_response(client.tls, client.conn)
    return response.status_code


async def settled(run: Running, open_connections: int) -> None:
    """Wait until the server holds exactly `open_connections` (closed ones gone)."""
    with trio.fail_after(CLIENT_TIMEOUT):
        while run.server.active_connections != open_connections:
            await trio.sleep(0.01)


async def test_idle_connections_are_reclaimed_longest_idle_first_for_new_clients(
    key: KeyFiles, cafile: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dualproxy")
    config = limited(key, tmp_path, max_connections=MAX_CONNECTIONS)
    async with serving(config) as run, AsyncExitStack() as stack:
        uploading = await stack.enter_async_context(connected(run.port, cafile))
        await start_slow_upload(uploading)
        # A new connection that has not sent its first request yet: not reclaimable.
        fresh = await stack.enter_async_context(connected(run.port, cafile))
        idle = []
        for _ in range(MAX_CONNECTIONS - 2):  # every other slot: idle after one request each
            client = await stack.enter_async_context(connected(run.port, cafile))
            assert await client.get() == 200
            idle.append(client)
        assert run.server.active_connections == MAX_CONNECTIONS
        newcomers = []
        for _ in range(NEW_CLIENTS):  # each would wait an hour for a keep-alive timeout
            client = await stack.enter_async_context(connected(run.port, cafile))
            assert await client.get() == 200
            newcomers.append(client)
        reclaimed = run.server.reclaimed_connections
        await settled(run, MAX_CONNECTIONS - reclaimed + NEW_CLIENTS)
        closed = [i for i, client in enumerate(idle) if client.closed_by_server()]
        # The longest idle went, in whole batches, and no more than the newcomers needed.
        assert closed == list(range(reclaimed))
        assert NEW_CLIENTS <= reclaimed <= NEW_CLIENTS + RECLAIM_BATCH
        assert not any(client.closed_by_server() for client in newcomers)
        # The upload in the middle of its body was not touched, and finishes; the new
        # connection that has not sent its first request was not touched either.
        assert not uploading.closed_by_server()
        assert not fresh.closed_by_server()
        assert await fresh.get() == 200
        assert await finish_slow_upload(uploading) == 200
        status = admin.status_of(run.server)
    assert status.connections is not None
    assert status.connections.reclaimed == reclaimed
    lines = [r.getMessage() for r in caplog.records if "idle keep-alive" in r.getMessage()]
    assert len(lines) == 1  # once per LOG_INTERVAL, with the counts
    assert f"at limits.max_connections ({MAX_CONNECTIONS}): closed " in lines[0]
    scraped = metrics.exposition(metrics.registry_for(lambda: status)).decode()
    samples = {s.name: s.value for f in text_string_to_metric_families(scraped) for s in f.samples}
    assert samples["dualproxy_connections_reclaimed_total"] == reclaimed
    assert "idle reclaimed at the limit" in statuspage.render_text(status)


async def test_with_every_slot_busy_a_new_client_waits_until_one_frees(
    key: KeyFiles, cafile: Path, tmp_path: Path
) -> None:
    """Nothing idle: nothing is reclaimed; the new client is served once a connection is done
    with its request (it becomes idle, and a waiting client takes its slot at once)."""
    config = limited(key, tmp_path, max_connections=5)
    async with serving(config) as run, AsyncExitStack() as stack:
        busy = [await stack.enter_async_context(connected(run.port, cafile)) for _ in range(5)]
        for client in busy:
            await start_slow_upload(client)
        served = trio.Event()
        statuses: list[int] = []

        async def newcomer() -> None:
            async with connected(run.port, cafile) as client:
                statuses.append(await client.get())
                served.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(newcomer)
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            assert not served.is_set()  # waiting in the backlog: every slot is busy
            assert run.server.reclaimed_connections == 0
            assert all(not client.closed_by_server() for client in busy)
            assert await finish_slow_upload(busy[0]) == 200  # done: idle now
        assert statuses == [200]
        assert run.server.reclaimed_connections == 1
        for client in busy[1:]:  # still in the middle of their uploads
            assert await finish_slow_upload(client) == 200


async def test_one_client_cannot_hold_more_than_its_limit(
    key: KeyFiles, cafile: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dualproxy")
    config = limited(key, tmp_path, max_connections_per_client=4)
    async with serving(config) as run, AsyncExitStack() as stack:
        flood = [await stack.enter_async_context(connected(run.port, cafile)) for _ in range(4)]
        for _ in range(3):  # the fifth, sixth and seventh are closed before the handshake
            with pytest.raises((trio.BrokenResourceError, ssl.SSLError, OSError)):
                async with connected(run.port, cafile):
                    pass
        other = await stack.enter_async_context(connected(run.port, cafile, source="127.0.0.2"))
        assert await other.get() == 200  # another client: unaffected
        assert all([await client.get() == 200 for client in flood])  # the four still served
        status = admin.status_of(run.server)
    assert run.server.refused_per_client == 3
    messages = [r.getMessage() for r in caplog.records]
    refusals = [m for m in messages if m.startswith("client ")]
    assert len(refusals) == 1  # once per interval per client
    assert refusals[0].startswith("client 127.0.0.1 holds limits.max_connections_per_client (4)")
    outcomes = [m for m in messages if m.startswith("conn ")]
    assert sum("outcome=client-limit" in line for line in outcomes) == 3
    assert status.connections is not None
    assert status.connections.refused_per_client == 3


# --- the admission's own rules -------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_client_is_an_address_or_an_ipv6_slash_64(caplog: pytest.LogCaptureFixture) -> None:
    import ipaddress

    admission = Admission(Drain(), clock=FakeClock())
    one = ipaddress.ip_address("2001:db8:1:2::1")
    same_64 = ipaddress.ip_address("2001:db8:1:2:ffff::9")
    other_64 = ipaddress.ip_address("2001:db8:1:3::1")
    held = [admission.admit(one, 2, "[2001:db8:1:2::1]:1"), admission.admit(same_64, 2, "x")]
    assert None not in held
    assert admission.admit(same_64, 2, "[2001:db8:1:2:ffff::9]:2") is None
    assert admission.admit(other_64, 2, "[2001:db8:1:3::1]:3") is not None
    client = held[0]
    assert client is not None
    admission.release(client)
    assert admission.open_for(one) == 1
    assert admission.admit(one, 2, "x") is not None  # a slot of its own freed


def test_refusals_are_logged_once_per_interval_per_client(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import ipaddress

    caplog.set_level(logging.WARNING, logger="dualproxy")
    clock = FakeClock()
    admission = Admission(Drain(), clock=clock)
    peer = ipaddress.ip_address("203.0.113.7")
    assert admission.admit(peer, 1, "203.0.113.7:1") is not None
    for _ in range(5):
        assert admission.admit(peer, 1, "203.0.113.7:2") is None
    clock.now += LOG_INTERVAL
    assert admission.admit(peer, 1, "203.0.113.7:3") is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[1].endswith("(and 4 more since the last such line)")
    assert admission.refused == 6


class Entry:
    """A drain entry (a cancel scope, or a parked connection) that notes its closing."""

    def __init__(self, name: str, closed: list[str]) -> None:
        self.name = name
        self._closed = closed

    def cancel(self) -> None:
        self._closed.append(self.name)


class Idler:
    """A connection that may park: what Drain.to_park reads of it."""

    def __init__(self, idle_since: float) -> None:
        self.idle_since = idle_since
        self.asked = False

    def request_park(self) -> None:
        self.asked = True


def test_the_drain_names_the_connections_idle_long_enough_to_park_longest_idle_first() -> None:
    drain, closed = Drain(), list[str]()
    idlers = [Idler(since) for since in (1.0, 2.0, 3.0)]
    for number, idler in enumerate(idlers):
        drain.enter_idle(Entry(f"relay{number}", closed), reclaimable=True, parkable=idler)
    drain.enter_idle(Entry("h2", closed), reclaimable=True)  # idle, but cannot park
    drain.enter_idle(Entry("first-request", closed))  # not kept-alive: never parks
    assert drain.to_park(idle_before=2.5) == idlers[:2]
    assert drain.to_park(idle_before=1.0) == []
    assert closed == []


def test_parked_connections_are_reclaimed_first_and_drained_with_the_idle_ones() -> None:
    drain, closed = Drain(), list[str]()
    waiting = Entry("waiting", closed)
    drain.enter_idle(waiting, reclaimable=True)
    parked = [Entry(f"parked{number}", closed) for number in range(2)]
    for entry in parked:
        drain.enter_parked(entry)
    assert drain.idle_connections == 3
    assert drain.reclaim(2) == 2
    assert closed == ["parked0", "parked1"]  # they have idled longest
    assert drain.reclaim(2) == 1
    assert closed[2:] == ["waiting"]
    assert drain.reclaimed == 3
    # The drain closes those parked since, and any that parks after it began, at once.
    drain.enter_parked(Entry("late", closed))
    drain.leave_parked(parked[0])  # gone already: no-op
    drain.start()
    drain.enter_parked(Entry("later", closed))
    assert closed[3:] == ["late", "later"]
    assert drain.idle_connections == 0


def test_a_connection_that_parks_while_a_client_waits_for_a_slot_is_reclaimed_at_once() -> None:
    drain, closed = Drain(), list[str]()
    drain.starved = True
    drain.enter_parked(Entry("parked", closed))
    assert (closed, drain.reclaimed, drain.idle_connections) == (["parked"], 1, 0)
