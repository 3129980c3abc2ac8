"""h2.py's driver on trio memory streams: no TLS, no listener, no upstream (every stream is
answered locally, as the placeholder answers them); the client is python-hyper's h2, driven
raw, over a lockstep stream where a client must be seen not to read.

test_h2.py runs the protocol end to end, over TLS; what is here needs the driver's own view:
which streams ended and why (its Tally), when, and which tasks serve them. The clock is a
MockClock that jumps once every task is blocked, so each expiry comes without waiting.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Final

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
import trio
import trio.testing

from dualproxy.config.schema import Limits
from dualproxy.http.h2 import IDLE_STREAM_TASKS, Http2Connection, LocalOnly
from dualproxy.http.lifecycle import Drain
from dualproxy.http.local import Endpoint, LocalAnswer, LocalRequest

SHORT: Final = 5.0
LIMITS: Final = Limits(h2_max_concurrent_streams=40, send_timeout=SHORT, body_timeout=SHORT)
ANSWER: Final = b"x" * 1000
CLIENT_RESET: Final = "client reset the stream"


def request(path: str = "/", method: str = "GET") -> list[tuple[bytes, bytes]]:
    return [
        (b":method", method.encode()),
        (b":scheme", b"https"),
        (b":authority", b"api.example.com"),
        (b":path", path.encode()),
    ]


class _Answer:
    """Answers at once; on /wait once `go` is set, on /hang never."""

    max_body_bytes = 100

    def __init__(self) -> None:
        self.go = trio.Event()

    async def answer(self, request: LocalRequest) -> LocalAnswer:
        if request.target == b"/wait":
            await self.go.wait()
        elif request.target == b"/hang":
            await trio.sleep_forever()
        return LocalAnswer(HTTPStatus.OK, [(b"content-type", b"text/plain")], ANSWER)


class _Routes:
    max_body_bytes = 100

    def __init__(self) -> None:
        self.endpoint = _Answer()

    def find(self, target: bytes) -> Endpoint | None:
        return self.endpoint


@dataclass
class Record:
    """The connection's record, as the driver reports to it: why each stream ended, by path,
    in the order they ended."""

    ended: list[tuple[bytes, int, str | None]] = field(default_factory=list)
    changed: trio.Event = field(default_factory=trio.Event)

    async def wait_ended(self, count: int) -> None:
        with trio.fail_after(60):
            while len(self.ended) < count:
                await self.changed.wait()

    def request_received(self) -> None:
        pass

    def note(self, detail: str) -> None:
        pass

    def response_relayed(self, status: int, upstream_seconds: float) -> None:
        pass

    def response_generated(self, status: int) -> None:
        pass

    def exchange_ended(
        self,
        method: bytes,
        target: bytes,
        version: bytes,
        status: int,
        bytes_in: int,
        bytes_out: int,
        seconds: float,
        upstream_seconds: float | None,
        ended: str | None,
    ) -> None:
        self.ended.append((target, status, ended))
        self.changed.set()
        self.changed = trio.Event()


@dataclass
class Client:
    stream: trio.abc.Stream
    conn: h2.connection.H2Connection
    record: Record
    routes: _Routes
    server_task: trio.lowlevel.Task
    next_id: int = 1
    statuses: dict[int, int] = field(default_factory=dict)
    resets: dict[int, h2.errors.ErrorCodes | int | None] = field(default_factory=dict)

    async def send(self) -> None:
        await self.stream.send_all(self.conn.data_to_send())

    async def receive(self) -> list[h2.events.Event]:
        data = await self.stream.receive_some()
        if not data:
            return []
        events = self.conn.receive_data(data)
        for event in events:
            if isinstance(event, h2.events.ResponseReceived):
                self.statuses[event.stream_id] = int(dict(event.headers)[b":status"])
            elif isinstance(event, h2.events.StreamReset):
                self.resets[event.stream_id] = event.error_code
        return events

    def start(self, path: str = "/", *, end: bool = True, method: str = "GET") -> int:
        stream_id = self.next_id
        self.next_id += 2
        self.conn.send_headers(stream_id, request(path, method), end_stream=end)
        return stream_id

    async def read_all_along(self) -> None:
        """Read what the server sends, and acknowledge it, until either side closes."""
        with contextlib.suppress(trio.ClosedResourceError):
            while await self.receive():
                await self.send()

    async def until_ended(self, count: int) -> None:
        """Until the server's record has `count` streams ended, and the client (reading all
        along) has every answer that went."""
        await self.record.wait_ended(count)
        await trio.testing.wait_all_tasks_blocked()

    def stream_tasks(self) -> int:
        """The server's tasks but its writer: the stream tasks, busy or waiting for one."""
        [nursery] = self.server_task.child_nurseries
        return len(nursery.child_tasks) - 1


@asynccontextmanager
async def connection(*, lockstep: bool = False) -> AsyncIterator[Client]:
    """An Http2Connection served on one end of a stream pair, a client on the other (its
    preface sent and the server's read). `lockstep`: nothing the server sends leaves until the
    client reads it; otherwise what it sends is buffered for the client without limit."""
    pair = trio.testing.lockstep_stream_pair if lockstep else trio.testing.memory_stream_pair
    ours, theirs = pair()
    record = Record()
    routes = _Routes()
    settings = LocalOnly(LIMITS, routes)
    server = Http2Connection(
        theirs,
        peer=None,
        settings=lambda: settings,
        limits=LIMITS,
        drain=Drain(),
        tally=record,
    )
    config = h2.config.H2Configuration(client_side=True, header_encoding=None)
    conn = h2.connection.H2Connection(config=config)
    conn.initiate_connection()
    async with trio.open_nursery() as nursery:
        server_task = await nursery.start(_serve, server)
        client = Client(ours, conn, record, routes, server_task)
        await client.send()
        if not lockstep:
            nursery.start_soon(client.read_all_along)
        yield client
        nursery.cancel_scope.cancel()


async def _serve(
    server: Http2Connection, *, task_status: trio.TaskStatus[trio.lowlevel.Task]
) -> None:
    task_status.started(trio.lowlevel.current_task())
    await server.serve()


# --- what is queued while the client does not read ----------------------------------------


async def test_a_client_that_does_not_read_holds_its_streams_instead_of_queuing_answers() -> None:
    """Our output is backed up: every answered stream waits for it to go and keeps its slot,
    so that what is queued stays within the streams allowed at once."""
    streams = 10
    async with connection(lockstep=True) as client:
        for _ in range(streams):
            client.start()
        await client.send()
        await trio.testing.wait_all_tasks_blocked()
        assert client.record.ended == []  # every one answered, none ended
        async with trio.open_nursery() as reading:
            reading.start_soon(client.read_all_along)
            await client.until_ended(streams)
            reading.cancel_scope.cancel()
        assert [ended for _, _, ended in client.record.ended] == [None] * streams


async def test_a_stream_whose_answer_can_go_ends_before_the_client_reads_it() -> None:
    """The twin: with nothing backed up, an answered stream ends as soon as its answer is
    handed to the writer, its slot free for the next."""
    async with connection() as client:
        client.start()
        await client.send()
        await trio.testing.wait_all_tasks_blocked()
        assert client.record.ended == [(b"/", 200, None)]
    assert client.statuses == {1: 200}


# --- stream tasks: one serves stream after stream --------------------------------------------


async def test_a_stream_task_serves_the_next_stream_once_its_own_ended() -> None:
    async with connection() as client:
        for served in range(1, 4):
            client.start()
            await client.send()
            await client.until_ended(served)
            assert client.stream_tasks() == 1
    assert client.statuses == {1: 200, 3: 200, 5: 200}


async def test_waiting_stream_tasks_are_bounded() -> None:
    """A burst of streams takes a task each; once they ended, IDLE_STREAM_TASKS wait for the
    next streams and the others are gone."""
    burst = IDLE_STREAM_TASKS + 8
    async with connection() as client:
        waiting = [client.start("/wait") for _ in range(burst)]
        await client.send()
        await trio.testing.wait_all_tasks_blocked()
        assert client.stream_tasks() == burst
        client.routes.endpoint.go.set()
        await client.until_ended(burst)
        await trio.testing.wait_all_tasks_blocked()
        assert client.stream_tasks() == IDLE_STREAM_TASKS
    assert [client.statuses[stream_id] for stream_id in waiting] == [200] * burst


@pytest.mark.parametrize("reset_first", [True, False])
async def test_a_reset_ends_only_its_stream_in_a_task_that_served_others(
    reset_first: bool,
) -> None:
    """A task that served a stream takes the next: that one's reset ends it (and the task),
    never the task's earlier or later work nor the streams beside it. `reset_first`: reset
    in the read that hands the stream over, before its task ran."""
    async with connection() as client:
        client.start()
        await client.send()
        await client.until_ended(1)  # its task now waits for a stream
        reset = client.start("/hang")
        beside = client.start("/wait")
        if reset_first:
            client.conn.reset_stream(reset)
        await client.send()
        await trio.testing.wait_all_tasks_blocked()
        if not reset_first:
            client.conn.reset_stream(reset)
            await client.send()
        await client.until_ended(2)
        client.routes.endpoint.go.set()
        after = client.start()
        await client.send()
        await client.until_ended(4)
    assert sorted(client.record.ended) == [
        (b"/", 200, None),
        (b"/", 200, None),
        (b"/hang", 0, CLIENT_RESET),
        (b"/wait", 200, None),
    ]
    assert client.statuses.keys() == {1, beside, after}


async def test_an_expired_wait_in_a_task_that_served_others_is_answered_and_others_go_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The deadline of a wait, in the scope a task served earlier streams in: that stream
    gets what the wait's expiry means (a body that stalls: 408; an answer that does not
    come: RST_STREAM), and the connection serves the next."""
    async with connection() as client:
        client.start()
        await client.send()
        await client.until_ended(1)
        stalled = client.start(method="POST", end=False)  # its body never comes
        await client.send()
        await client.until_ended(2)
        hung = client.start("/hang")
        await client.send()
        await client.until_ended(3)
        after = client.start()
        await client.send()
        await client.until_ended(4)
    assert [ended for _, _, ended in client.record.ended] == [
        None,
        "408 request body stalled longer than allowed",
        "client did not read for send_timeout",
        None,
    ]
    assert client.statuses == {1: 200, stalled: 408, after: 200}
    assert client.resets[hung] == h2.errors.ErrorCodes.CANCEL


async def test_the_connection_ending_ends_every_stream_task_with_a_line_each() -> None:
    async with connection() as client:
        client.start()
        await client.send()
        await client.until_ended(1)
        for _ in range(3):
            client.start("/hang")
        await client.send()
        await trio.testing.wait_all_tasks_blocked()
        await client.stream.aclose()
        with trio.fail_after(60):
            while len(client.record.ended) < 4:
                await trio.sleep(0.01)
    assert client.record.ended[1:] == [(b"/hang", 0, "the connection ended first")] * 3


async def test_a_deadline_that_comes_as_a_stream_ends_ends_its_task_not_the_next_stream(
    mock_clock: trio.testing.MockClock,
) -> None:
    """The answer comes, and in the same step the clock passes the deadline of its wait: the
    scope is cancelled once the stream no longer needs it. The task ends; the next stream
    is not handed to it (it would never be served) but to a new task."""
    async with connection() as client:
        client.start("/wait")
        await client.send()
        await trio.testing.wait_all_tasks_blocked()
        client.routes.endpoint.go.set()
        mock_clock.jump(SHORT * 2)
        await trio.testing.wait_all_tasks_blocked()
        assert client.record.ended == [(b"/wait", 200, None)]
        assert client.stream_tasks() == 0
        client.start()
        await client.send()
        await trio.testing.wait_all_tasks_blocked()
    assert client.record.ended == [(b"/wait", 200, None), (b"/", 200, None)]


async def test_a_task_waits_for_its_next_stream_until_its_last_streams_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """It waits with the deadline its scope kept from the last stream's last wait (within
    send_timeout here: an answer sent); then it ends, and the next stream gets a new task."""
    async with connection() as client:
        client.start()
        await client.send()
        await client.until_ended(1)
        await trio.sleep(SHORT / 2)
        assert client.stream_tasks() == 1
        await trio.sleep(SHORT)
        assert client.stream_tasks() == 0
        client.start()
        await client.send()
        await client.until_ended(2)
    assert client.statuses == {1: 200, 3: 200}
