"""A switched connection (WebSocket, after the upstream's 101): bytes both ways until one side
closes or both go quiet.

After the 101 the client connection and the upstream connection carry the new protocol, which
is not ours to read: `relay_tunnel` copies each side's bytes to the other as they come (what
either had already sent along with the handshake first), one receive at a time, so memory is
one RECEIVE_SIZE per direction and a side that stops reading stops the other side's reads. The
WebSocket close handshake is in-band (close frames), so it passes through; the tunnel ends
when either side closes its connection (the other is then closed too) or when no byte moved
either way for `idle_timeout` (limits.websocket_idle_timeout: a tunnel that pings stays open,
a dead one does not hold a connection slot forever), and reports the bytes each way and how
it ended, for the access log.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import trio

from dualproxy.tls.streams import RECEIVE_SIZE

__all__ = ["CLIENT_CLOSED", "UPSTREAM_CLOSED", "TunnelResult", "relay_tunnel"]

CLIENT_CLOSED: Final = "client"
UPSTREAM_CLOSED: Final = "upstream"


@dataclass(frozen=True, slots=True)
class TunnelResult:
    bytes_up: int  # client to upstream
    bytes_down: int  # upstream to client
    closed_by: str | None  # CLIENT_CLOSED or UPSTREAM_CLOSED; None: the idle timeout ended it

    def ending(self, idle_timeout: float) -> str:
        """How it ended, for the log."""
        if self.closed_by is None:
            return f"websocket idle for {idle_timeout:g} s"
        return f"websocket closed by the {self.closed_by}"


async def relay_tunnel(
    client: trio.abc.Stream,
    client_pending: bytes,
    upstream: trio.abc.Stream,
    upstream_pending: bytes,
    *,
    idle_timeout: float,
) -> TunnelResult:
    """Copy bytes both ways (see the module docstring); the caller closes both streams."""
    counts = [0, 0]
    closed_by: list[str] = []
    with trio.CancelScope(deadline=trio.current_time() + idle_timeout) as scope:

        async def pump(
            source: trio.abc.Stream, sink: trio.abc.Stream, first: bytes, index: int
        ) -> None:
            names = (CLIENT_CLOSED, UPSTREAM_CLOSED)
            data: bytes | bytearray = first
            while True:  # bounded: ends when a side closes, or with the scope
                if data:
                    try:
                        await sink.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        closed_by.append(names[1 - index])  # the side we sent to went
                        scope.cancel()
                        return
                    counts[index] += len(data)
                    scope.deadline = trio.current_time() + idle_timeout
                try:
                    data = await source.receive_some(RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    closed_by.append(names[index])
                    scope.cancel()
                    return
                scope.deadline = trio.current_time() + idle_timeout

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, client, upstream, client_pending, 0)
            nursery.start_soon(pump, upstream, client, upstream_pending, 1)
    return TunnelResult(counts[0], counts[1], closed_by[0] if closed_by else None)
