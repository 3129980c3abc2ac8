"""What the server shares with every relayed connection: the drain, and the watch for
clients that leave while the upstream works.

Both are one per server, touched by each connection for a few set or dict operations per
request; the server drives them (`Drain.start` on SIGTERM, `Departures.check` every
DEPARTURE_CHECK_SECONDS) and relay.py's `ClientConnection` registers with them.
"""

from __future__ import annotations

import math
import select
from types import TracebackType
from typing import Final, Protocol

import trio

__all__ = [
    "DEPARTURE_CHECK_SECONDS",
    "Closable",
    "Departures",
    "Drain",
    "IdleWait",
    "Leaver",
    "Parkable",
]


class Leaver(Protocol):
    """What Departures tells about a client that left (a ClientConnection)."""

    def client_left(self) -> None: ...


class Closable(Protocol):
    """What the drain closes: an idle connection's cancel scope, or a parked connection
    (serve.parking), which its `cancel` closes."""

    def cancel(self) -> None: ...


class Parkable(Protocol):
    """A kept-alive connection waiting for its next request in a task of its own, which it
    can give up (a ClientConnection: see serve.parking)."""

    @property
    def idle_since(self) -> float: ...

    def request_park(self) -> None: ...


# How often the clients waiting for an upstream's response are looked at for having left: a
# gone client holds its upstream connection this long at most; a look is one poll(2) for all.
DEPARTURE_CHECK_SECONDS: Final = 1.0
# poll(2)'s word for a peer that closed or reset: POLLRDHUP (Linux) is its FIN, which plain
# readability cannot tell from bytes; elsewhere only a reset or an error shows.
_HUNG_UP: Final = select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0)


class Departures:
    """Clients waiting for an upstream's response head, looked at for having left.

    A response can take the upstream a while (upstream_timeout, 60 s by default), and a client
    that closes meanwhile would otherwise be noticed only when its answer is sent. Like nginx
    (a 499), the exchange then ends at once and its upstream connection is closed, never
    pooled: the upstream sees the close and may stop working for nobody. One per server; its
    `check`, every DEPARTURE_CHECK_SECONDS, looks at every waiting client in one poll(2), so a
    request pays for two dict operations only. A client that closes only its sending side
    counts as gone too (as in nginx), which RFC 9112 §9.6 asks clients not to do.
    """

    def __init__(self) -> None:
        # By the client socket's descriptor (ClientConnection's `client_fd`).
        self.waiting: dict[int, Leaver] = {}

    def check(self) -> int:
        """End the wait of every client that left; how many did."""
        waiting = self.waiting
        if not waiting:
            return 0
        poller = select.poll()
        for fd in waiting:
            poller.register(fd, _HUNG_UP)
        gone = 0
        for fd, events in poller.poll(0):
            if events & _HUNG_UP and (relay := waiting.pop(fd, None)) is not None:
                relay.client_left()
                gone += 1
        return gone


class Drain:
    """Graceful shutdown as relays see it, and the idle connections it closes; one per server,
    shared by all its connections.

    Once `start()` is called, connections waiting for a request (idle keep-alive ones, and
    new ones that have not sent a byte yet) close at once, and busy ones finish their
    exchange with `Connection: close` on the response.

    At the connection limit, `reclaim(n)` closes the n connections that have waited longest for
    a request (nginx's "reusing connections"), so that new clients get their slots: the idle
    connections are kept in the order they began to wait (a dict keeps insertion order), a
    connection in the middle of a request is never among them. While `starved` (a client waits
    for a slot and none was idle), a connection that becomes idle is reclaimed at once.

    Parked connections (serve.parking: kept-alive ones idle long enough to have given up their
    task) are idle connections too, kept apart in the order they parked: they have idled
    longest, so a reclaim takes them first, and the drain closes them with the rest.
    """

    def __init__(self) -> None:
        self.draining = False
        # Scopes of the connections waiting for a request in their task (the drain closes
        # them all), and of those among them that have served one (keep-alive: reclaimable),
        # the longest idle first, each with the connection if it may park (else None). A new
        # connection waiting for its first request is not reclaimed: its client has only
        # just been admitted.
        self._idle: set[Closable] = set()
        self._reclaimable: dict[Closable, Parkable | None] = {}
        self._parked: dict[Closable, None] = {}  # parked connections, in the order they parked
        self.reclaimed = 0  # connections closed by a reclaim so far
        self.starved = False  # a client waits for a slot: the next idle connection gives it
        # Idle connections from which on a kept-alive connection parks as soon as it begins
        # to wait, not after a while (serve.parking sets it; without a parking lot, never).
        self.park_at_once = math.inf

    def start(self) -> None:
        self.draining = True
        for scope in self._idle:
            scope.cancel()
        parked, self._parked = list(self._parked), {}
        for entry in parked:
            entry.cancel()

    @property
    def idle_connections(self) -> int:
        return len(self._idle) + len(self._parked)

    @property
    def crowded(self) -> bool:
        """Whether so many connections idle that a kept-alive one should park at once."""
        return len(self._idle) + len(self._parked) >= self.park_at_once

    def enter_idle(
        self, scope: Closable, *, reclaimable: bool = False, parkable: Parkable | None = None
    ) -> None:
        """`scope` waits for a request: the drain cancels it (at once, if it has started).
        `reclaimable` (it has served a request, a keep-alive connection): a reclaim may cancel
        it too (at once, while a client waits for a slot); `parkable`: the connection, which
        `to_park` may name once it has idled long enough."""
        if self.draining:
            scope.cancel()
        elif reclaimable and self.starved:
            scope.cancel()
            self.reclaimed += 1
            return
        self._idle.add(scope)
        if reclaimable:
            self._reclaimable[scope] = parkable

    def leave_idle(self, scope: Closable) -> None:
        self._idle.discard(scope)
        self._reclaimable.pop(scope, None)

    def enter_parked(self, parked: Closable) -> None:
        """A kept-alive connection parked: closed (`cancel`) by the drain and by reclaims, at
        once if either is under way."""
        if self.draining:
            parked.cancel()
        elif self.starved:
            parked.cancel()
            self.reclaimed += 1
        else:
            self._parked[parked] = None

    def leave_parked(self, parked: Closable) -> None:
        self._parked.pop(parked, None)

    def to_park(self, idle_before: float) -> list[Parkable]:
        """The connections that may park and have waited for a request since before
        `idle_before` (trio's clock), the longest idle first."""
        due = []
        for parkable in self._reclaimable.values():  # bounded: the idle connections
            if parkable is None:
                continue
            if parkable.idle_since >= idle_before:  # the rest began to wait later still
                break
            due.append(parkable)
        return due

    def reclaim(self, count: int) -> int:
        """Close up to `count` of the longest-idle keep-alive connections (parked ones first;
        the waits of the others are cancelled; each closes quietly, as at its keep-alive
        timeout); how many."""
        parked = [entry for entry, _ in zip(self._parked, range(count), strict=False)]
        for entry in parked:
            del self._parked[entry]
            entry.cancel()
        reclaimable = self._reclaimable
        oldest = [scope for scope, _ in zip(reclaimable, range(count - len(parked)), strict=False)]
        for scope in oldest:
            del reclaimable[scope]
            self._idle.discard(scope)
            scope.cancel()
        self.reclaimed += len(parked) + len(oldest)
        return len(parked) + len(oldest)

    def idle(self, timeout: float, *, reclaimable: bool = False) -> IdleWait:
        """A cancel scope for waiting on a quiet connection: it ends after `timeout`, or as
        soon as the drain starts (at once, when it already has), or, `reclaimable`, a
        reclaim at the connection limit."""
        scope = trio.CancelScope(deadline=trio.current_time() + timeout)
        return IdleWait(self, scope, reclaimable)


class IdleWait:
    """`Drain.idle`'s context manager: its scope is cancelled by the drain while entered."""

    __slots__ = ("_drain", "_reclaimable", "_scope")

    def __init__(self, drain: Drain, scope: trio.CancelScope, reclaimable: bool) -> None:
        self._drain = drain
        self._scope = scope
        self._reclaimable = reclaimable

    def __enter__(self) -> trio.CancelScope:
        self._drain.enter_idle(self._scope, reclaimable=self._reclaimable)
        return self._scope.__enter__()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        try:
            return self._scope.__exit__(exc_type, exc, traceback)
        finally:
            self._drain.leave_idle(self._scope)
