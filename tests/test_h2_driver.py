"""h2.py's driver on trio memory streams: no TLS, no listener, no upstream (every stream is
answered locally, as the placeholder answers them); the client is python-hyper's h2, driven
raw over a lockstep stream, so that a client that does not read is seen not to read.

test_h2.py runs the protocol end to end, over TLS; what is here is what needs the driver's
own view: which streams ended, and when.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Final

import h2.config
import h2.connection
import h2.events
import trio
import trio.testing

from dualproxy.config.schema import Limits
from dualproxy.http.h2 import Http2Connection, LocalOnly
from dualproxy.http.lifecycle import Drain
from dualproxy.http.local import Endpoint, LocalAnswer, LocalRequest

LIMITS: Final = Limits(h2_max_concurrent_streams=10)
REQUEST: Final = [
    (b":method", b"GET"),
    (b":scheme", b"https"),
    (b":authority", b"api.example.com"),
    (b":path", b"/"),
]
ANSWER: Final = b"x" * 1000


class _Answer:
    max_body_bytes = 0

    async def answer(self, request: LocalRequest) -> LocalAnswer:
        return LocalAnswer(HTTPStatus.OK, [(b"content-type", b"text/plain")], ANSWER)


class _Routes:
    max_body_bytes = 0

    def find(self, target: bytes) -> Endpoint | None:
        return _Answer()


@dataclass
class Record:
    """The connection's record, as the driver reports to it: why each stream ended."""

    ended: list[str | None] = field(default_factory=list)

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
        self.ended.append(ended)


@dataclass
class Client:
    stream: trio.abc.Stream
    conn: h2.connection.H2Connection
    record: Record

    async def send(self) -> None:
        await self.stream.send_all(self.conn.data_to_send())

    async def receive(self) -> list[h2.events.Event]:
        return self.conn.receive_data(await self.stream.receive_some())


@asynccontextmanager
async def connection(*, lockstep: bool) -> AsyncIterator[Client]:
    """An Http2Connection served on one end of a stream pair, a client on the other (its
    preface sent). `lockstep`: nothing the server sends leaves until the client reads it;
    otherwise what it sends is buffered for the client without limit."""
    pair = trio.testing.lockstep_stream_pair if lockstep else trio.testing.memory_stream_pair
    ours, theirs = pair()
    record = Record()
    settings = LocalOnly(LIMITS, _Routes())
    server = Http2Connection(
        theirs,
        peer=None,
        settings=lambda: settings,
        limits=LIMITS,
        drain=Drain(),
        tally=record,
    )
    config = h2.config.H2Configuration(client_side=True, header_encoding=None)
    client = Client(ours, h2.connection.H2Connection(config=config), record)
    client.conn.initiate_connection()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve)
        await client.send()
        yield client
        nursery.cancel_scope.cancel()


async def test_a_client_that_does_not_read_holds_its_streams_instead_of_queuing_answers() -> None:
    """Our output is backed up: every answered stream waits for it to go and keeps its slot,
    so that what is queued stays within the streams allowed at once."""
    streams = LIMITS.h2_max_concurrent_streams
    async with connection(lockstep=True) as client:
        for stream_id in range(1, 2 * streams, 2):
            client.conn.send_headers(stream_id, REQUEST, end_stream=True)
        await client.send()
        await trio.testing.wait_all_tasks_blocked()
        assert client.record.ended == []  # every one answered, none ended
        answered: set[int] = set()
        with trio.fail_after(5):
            while len(answered) < streams:
                for event in await client.receive():
                    if isinstance(event, h2.events.StreamEnded):
                        answered.add(event.stream_id)
                await client.send()  # its SETTINGS ACK and WINDOW_UPDATEs
        await trio.testing.wait_all_tasks_blocked()
        assert client.record.ended == [None] * streams


async def test_a_stream_whose_answer_can_go_ends_before_the_client_reads_it() -> None:
    """The twin: with nothing backed up, an answered stream ends as soon as its answer is
    handed to the writer, its slot free for the next."""
    async with connection(lockstep=False) as client:
        client.conn.send_headers(1, REQUEST, end_stream=True)
        await client.send()
        await trio.testing.wait_all_tasks_blocked()
        assert client.record.ended == [None]
        events = await client.receive()
    assert any(isinstance(event, h2.events.StreamEnded) for event in events)
