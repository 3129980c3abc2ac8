"""Who gets a connection slot when they run short: idle connections reclaimed at the limit,
and the limit per client.

Theory of operation. `limits.max_connections` slots are taken before accepting
(listeners.accept_loop). Phones keep idle keep-alive connections open, so at the limit most
slots are usually held by connections doing nothing; waiting for their keep-alive timeout
(60 s) would keep new clients in the kernel's backlog that long. So when the accept loop finds
no slot for a client that waits, `Admission.at_limit` closes the longest-idle connections,
RECLAIM_BATCH at a time (`http.lifecycle.Drain.reclaim`: keep-alive connections between
requests; one in the middle of a request, or a new one before its first, is never among
them), as nginx does ("worker_connections are not enough, reusing
connections"); when none is idle, new clients wait in the backlog as before, and the first
connection to become idle meanwhile is closed for them. It says so in the log at most once
per LOG_INTERVAL, with the counts since the last line.

One client (an IPv4 address, or an IPv6 /64: `rotation.policy.client_id`, the canary's and
the report limiter's unit; behind a balancer, the address its PROXY header carries) may hold
at most `limits.max_connections_per_client` connections (HAProxy and Envoy have such a
limit); a connection beyond it is closed at once, before the handshake (outcome
`client-limit`), logged at most once per LOG_INTERVAL per client. Other clients are
unaffected.

Both limits hold per process: with workers, each worker admits its own max_connections and
max_connections_per_client.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final

from dualproxy.config.names import IPAddress
from dualproxy.http.lifecycle import Drain
from dualproxy.rotation.policy import client_id

__all__ = ["LOG_INTERVAL", "RECLAIM_BATCH", "Admission"]

log = logging.getLogger("dualproxy")

# Idle connections closed each time a client finds no slot: one accept batch's worth
# (listeners.ACCEPT_BATCH), so a burst of new clients is admitted in step with its arrival
# and a single client does not empty the whole idle set.
RECLAIM_BATCH: Final = 16
# At most one log line per this many seconds about reclaimed connections, and per client
# about its refused ones: a flood must not flood the log.
LOG_INTERVAL: Final = 60.0
# Clients whose last refusal line is remembered (to log them once per interval): beyond it the
# oldest are forgotten, so a flood from many addresses cannot grow the table.
_MAX_LOGGED_CLIENTS: Final = 4096


class Admission:
    """The per-client counts and the reclaim at the limit, for one server process."""

    def __init__(self, drain: Drain, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._drain = drain
        self._clock = clock
        self._open: dict[bytes, int] = {}  # connections per client id, while open
        self.refused = 0  # connections closed at once for their client's limit, since start
        self._reclaimed_logged = 0  # drain.reclaimed when the last line was written
        self._reclaim_logged_at = -LOG_INTERVAL
        self._refusals_logged_at: dict[bytes, float] = {}
        self._refused_unlogged: dict[bytes, int] = {}

    @property
    def reclaimed(self) -> int:
        """Idle connections closed at the limit, since start."""
        return self._drain.reclaimed

    def at_limit(self, max_connections: int, waiting: bool) -> None:
        """Every slot is taken and a client waits (`waiting`): reclaim the longest-idle
        connections, or, with none idle, the next one to become idle; `waiting` False: the
        client got its slot."""
        drain = self._drain
        if not waiting:
            drain.starved = False
            self._log_reclaimed(max_connections)
            return
        if drain.draining:
            return
        if not drain.reclaim(RECLAIM_BATCH):
            drain.starved = True

    def _log_reclaimed(self, max_connections: int) -> None:
        if self._drain.reclaimed == self._reclaimed_logged:
            return
        now = self._clock()
        if now - self._reclaim_logged_at >= LOG_INTERVAL:
            count = self._drain.reclaimed - self._reclaimed_logged
            log.warning(
                "at limits.max_connections (%d): closed %d idle keep-alive connection(s) to"
                " admit new clients since the last such line (%d idle left); raise"
                " max_connections if this repeats",
                max_connections,
                count,
                self._drain.idle_connections,
            )
            self._reclaim_logged_at = now
            self._reclaimed_logged = self._drain.reclaimed

    def admit(self, peer: IPAddress | None, limit: int, peer_text: str) -> bytes | None:
        """Count a new connection from `peer` against its client's limit: the client's id to
        `release` when it ends, or None when it is refused (counted and logged)."""
        if peer is None:  # not an IP peer: nothing to count it by
            return b""
        client = client_id(peer)
        held = self._open.get(client, 0)
        if held >= limit:
            self.refused += 1
            self._log_refusal(client, peer_text, limit)
            return None
        self._open[client] = held + 1
        return client

    def release(self, client: bytes) -> None:
        """A connection `admit` counted has ended."""
        if not client:
            return
        held = self._open[client] - 1
        if held:
            self._open[client] = held
        else:
            del self._open[client]

    def open_for(self, peer: IPAddress) -> int:
        """Connections open now from `peer`'s client."""
        return self._open.get(client_id(peer), 0)

    def _log_refusal(self, client: bytes, peer_text: str, limit: int) -> None:
        now = self._clock()
        last = self._refusals_logged_at.get(client)
        if last is not None and now - last < LOG_INTERVAL:
            self._refused_unlogged[client] = self._refused_unlogged.get(client, 0) + 1
            return
        more = self._refused_unlogged.pop(client, 0)
        log.warning(
            "client %s holds limits.max_connections_per_client (%d) connections: closed a new"
            " one at once%s",
            peer_text.rsplit(":", 1)[0],
            limit,
            f" (and {more} more since the last such line)" if more else "",
        )
        self._refusals_logged_at.pop(client, None)
        self._refusals_logged_at[client] = now
        while len(self._refusals_logged_at) > _MAX_LOGGED_CLIENTS:
            oldest = next(iter(self._refusals_logged_at))
            del self._refusals_logged_at[oldest]
            self._refused_unlogged.pop(oldest, None)
