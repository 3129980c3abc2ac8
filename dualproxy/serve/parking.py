"""Kept-alive connections that idle without a task: the parking lot.

Why. A connection is served by one trio task, and while it waits for its next request the
task holds its whole stack: a dozen suspended coroutine frames (server, relay, TLS stream,
socket, trio's I/O wait), the task itself and its cancel scopes, about 7 kB of Python objects
per connection on top of what OpenSSL keeps for it. Most connections a front proxy holds are
idle (a phone keeps its connection open between API calls; nginx's keepalive_timeout is 75 s
for that), so those bytes are most of its memory per client. nginx holds an idle connection as
a few structs and an epoll registration; here, a kept-alive HTTP/1.1 connection idle for
PARK_AFTER seconds does the same: its task ends and what is left is its objects (the TLS
stream, the relay with its empty buffer, the connection's record), registered with the lot.

How.

- **Parking.** Every PARK_SWEEP seconds `sweep_forever` asks the connections that have waited
  for a request since PARK_AFTER ago (`Drain.to_park`, the longest idle first) to give up
  their task (`ClientConnection.request_park`): the wait is cancelled, `serve` returns with
  `parked` set, and the server's task hands the connection to `park` instead of closing it.
  Connections that are not idle that long never park, so a busy kept-alive connection pays
  nothing: the sweep touches only idle ones, once. From PARK_AT_ONCE idle connections on
  (`Drain.crowded`), a kept-alive connection parks as soon as its wait begins instead.
- **Waiting.** The lot registers the socket for readability in an epoll set of its own, and
  one task (`_run`, alive while anything is parked) waits for that set's descriptor to become
  readable in trio's loop, and for the earliest keep-alive deadline of the parked connections.
- **Resuming.** A parked socket that becomes readable (the next request, or the client's
  close) leaves the lot and gets a new task (`resume(parked, True)`): the relay's `serve`
  goes on with the same wait and deadline, as if the task had never ended. A connection whose
  keep-alive deadline passes, or that the drain or a reclaim at the connection limit closes
  (the drain calls `cancel`), gets a task that only closes it (`resume(parked, False)`),
  quietly, as the in-task wait would have. Either way the server's connection task code runs
  as for any connection: the conn line, the slot, the evidence.
- **Stopping.** The drain closes the parked connections with the idle ones. A lot whose task
  is cancelled (the grace ran out) closes what is still parked at once (`abandon`).

HTTP/1.1 relayed connections park; HTTP/2 connections and the placeholder's (no upstream)
keep their task while idle.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import select
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from dualproxy.http.lifecycle import Drain
from dualproxy.http.relay import ClientConnection
from dualproxy.serve.connection import ConnectionRecord
from dualproxy.tls.streams import TlsStream

__all__ = ["PARK_AFTER", "PARK_AT_ONCE", "PARK_SWEEP", "Parked", "ParkingLot"]

log = logging.getLogger("dualproxy.serve")

# A kept-alive connection that has waited this long (seconds) for its next request gives up
# its task. A client that comes back sooner (a busy connection, a page's burst of requests)
# pays nothing; one that idles longer pays one task start and two epoll registrations when
# it comes back, and holds some 7 kB less for as long as it idles.
PARK_AFTER: Final = 1.0
# How often idle connections are looked at for parking: a connection parks between
# PARK_AFTER and PARK_AFTER + PARK_SWEEP after its last response.
PARK_SWEEP: Final = 1.0
# From this many idle connections on (a server holding many phones between their calls), a
# kept-alive connection parks as soon as it begins to wait. Memory is then what idle
# connections cost, and a burst of them must not first grow the heap by a task's stack
# each: CPython keeps the freed frames' memory, so the peak would stay in the RSS. A server
# this busy with idle clients pays one task start per request on those connections; a
# server with fewer idle connections (32 busy keep-alive clients, say) pays nothing.
PARK_AT_ONCE: Final = 100
# epoll events that resume a parked connection: bytes, or the client's close or reset.
_READY: Final = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR


class Parked:
    """One parked connection: what its task held that outlives the task. The drain's entry
    for it (`cancel` closes it)."""

    __slots__ = ("_lot", "deadline", "fd", "record", "relay", "tls", "token")

    def __init__(
        self,
        lot: ParkingLot,
        relay: ClientConnection,
        tls: TlsStream,
        record: ConnectionRecord,
        token: object,
    ) -> None:
        self._lot = lot
        self.relay = relay
        self.tls = tls
        self.record = record
        self.token = token  # the connection slot's
        self.fd = tls.transport_stream.socket.fileno()
        self.deadline = relay.parked_until

    def cancel(self) -> None:
        """Close it (the drain, a reclaim): in a task of its own, as its keep-alive timeout
        would."""
        self._lot.release(self, serve=False)


class ParkingLot:
    """The parked connections of one server (see the module docstring). `resume(parked,
    serve)` is the server's task for a connection leaving the lot: serve it on (True) or
    close it (False); it is started in `nursery`, the server's connection nursery, as are
    the lot's own tasks."""

    def __init__(
        self,
        drain: Drain,
        resume: Callable[[Parked, bool], Awaitable[None]],
        abandon: Callable[[Parked], None],
    ) -> None:
        self._drain = drain
        drain.park_at_once = PARK_AT_ONCE
        self._resume = resume
        self._abandon = abandon
        self.nursery: trio.Nursery | None = None  # set while the server accepts
        self._epoll: select.epoll | None = None  # made at the first park
        self._parked: dict[int, Parked] = {}  # by socket descriptor
        self._deadlines: list[tuple[float, int, Parked]] = []  # a heap, stale entries left
        self._order = itertools.count()  # ties in the heap never compare Parked objects
        self._running = False
        self._wait: trio.CancelScope | None = None  # _run's current wait
        self.parked_total = 0  # connections parked so far

    def __len__(self) -> int:
        return len(self._parked)

    async def sweep_forever(self) -> None:
        """Ask the connections idle for PARK_AFTER to park, every PARK_SWEEP; until
        cancelled."""
        while True:
            await trio.sleep(PARK_SWEEP)
            if self.nursery is None:  # not accepting: nothing could take them back
                continue
            for relay in self._drain.to_park(trio.current_time() - PARK_AFTER):
                relay.request_park()

    def park(self, relay: ClientConnection, record: ConnectionRecord, token: object) -> bool:
        """Take the connection whose `serve` just returned `parked`; False when it cannot
        (the server stops, or the kernel refused the registration): the caller then closes
        it."""
        tls = relay.tls_stream
        assert tls is not None
        if self.nursery is None:
            return False
        try:
            if self._epoll is None:
                self._epoll = select.epoll()
            parked = Parked(self, relay, tls, record, token)
            self._epoll.register(parked.fd, _READY)
        except OSError as exc:  # out of memory or descriptors: this connection ends
            log.warning("closing an idle connection that could not be parked: %s", exc)
            return False
        self._parked[parked.fd] = parked
        self.parked_total += 1
        heapq.heappush(self._deadlines, (parked.deadline, next(self._order), parked))
        if not self._running:
            self._running = True
            self.nursery.start_soon(self._run)
        elif self._wait is not None and parked.deadline < self._wait.deadline:
            self._wait.deadline = parked.deadline
        self._drain.enter_parked(parked)  # last: a drain under way closes it at once
        return True

    def release(self, parked: Parked, *, serve: bool) -> None:
        """Give `parked` a task again (see the module docstring); a no-op if it left."""
        if self._parked.get(parked.fd) is not parked:
            return
        del self._parked[parked.fd]
        assert self._epoll is not None
        assert self.nursery is not None
        self._epoll.unregister(parked.fd)
        self._drain.leave_parked(parked)
        self.nursery.start_soon(self._resume, parked, serve)
        if not self._parked and self._wait is not None:  # the last: _run may end now
            self._wait.cancel()

    async def _run(self) -> None:
        """Wait for parked sockets to become readable and for their deadlines; while any
        connection is parked."""
        epoll = self._epoll
        assert epoll is not None
        try:
            while self._parked:  # bounded: each round releases, or waits for an event
                with trio.move_on_at(self._next_deadline()) as self._wait:
                    await trio.lowlevel.wait_readable(epoll.fileno())
                self._wait = None
                for fd, _ in epoll.poll(0, max(1, len(self._parked))):
                    parked = self._parked.get(fd)
                    if parked is not None:
                        self.release(parked, serve=True)
                now = trio.current_time()
                while self._deadlines and self._deadlines[0][0] <= now:
                    self.release(heapq.heappop(self._deadlines)[2], serve=False)
        finally:
            self._running = False
            self._wait = None
            for parked in list(self._parked.values()):  # cancelled: nobody will serve them
                del self._parked[parked.fd]
                epoll.unregister(parked.fd)
                self._drain.leave_parked(parked)
                self._abandon(parked)
            self._deadlines.clear()  # what is left is stale: nothing is parked

    def _next_deadline(self) -> float:
        """The earliest deadline of a connection still parked (stale heap entries dropped)."""
        heap = self._deadlines
        while heap and self._parked.get(heap[0][2].fd) is not heap[0][2]:
            heapq.heappop(heap)
        return heap[0][0] if heap else float("inf")

    def close(self) -> None:
        """Release the epoll set (the server stopped; a later park makes another)."""
        if self._epoll is not None and not self._parked:
            self._epoll.close()
            self._epoll = None
