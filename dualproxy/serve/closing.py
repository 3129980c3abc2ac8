"""How connections end without losing what we sent: the lingering close, and the courtesy
close_notify.

Closing a socket with unread bytes makes the kernel send a TCP reset instead of a FIN, and the
reset can destroy the client's copy of our last response before it reads it: a client that
sends its whole request before reading sees "connection reset", not our 413. So after a
refusal whose client may still be sending, the connection ends as nginx's lingering close
ends it: our FIN, then what the client still sends is read and discarded, within bounds
(LINGER_*), until the client closes. Every other end is a plain close, after a close_notify
that a client which stops reading cannot make us wait for (CLOSE_NOTIFY_TIMEOUT).
"""

from __future__ import annotations

import contextlib
from typing import Final

import trio

from dualproxy.http.upstream import UpstreamPool
from dualproxy.tls.streams import RECEIVE_SIZE, TcpStream, TlsStream, discard_until_closed

__all__ = [
    "CLOSE_NOTIFY_TIMEOUT",
    "LINGER_MAX_BYTES",
    "LINGER_TIME",
    "LINGER_TIMEOUT",
    "close_pool",
    "linger",
    "lingering_close",
]

# A close_notify is a courtesy: a client that stops reading must not hold our task.
CLOSE_NOTIFY_TIMEOUT: Final = 1.0
# The lingering close after a refusal whose client may still be sending (`lingering_close`),
# bounded like nginx's (lingering_time 30s, lingering_timeout 5s). In total: long enough for a
# client that sends its whole request before it reads to get to our answer over a slow link;
# beyond it the client has had its chance, and the connection slot goes to someone else.
LINGER_TIME: Final = 30.0
# Between reads: a client that sends nothing for this long after our FIN is no longer sending
# (it read the answer and holds the connection open), so it costs no more than an idle one.
LINGER_TIMEOUT: Final = 5.0
# Discarded in total: what a client can have in flight when it learns of the refusal (both
# ends' socket buffers, up to a few MiB each under Linux's autotuning, and the network's) with
# room to spare, while a refused client cannot make us read an upload for nothing.
LINGER_MAX_BYTES: Final = 16 * 1024 * 1024


async def lingering_close(tls: TlsStream, stream: TcpStream) -> None:
    """End a connection whose client may still be sending, without losing what we sent.

    close_notify, then our FIN (the client's reads end after the response), then raw bytes
    read and discarded until the client closes, LINGER_TIMEOUT passes without any, or
    LINGER_TIME or LINGER_MAX_BYTES is reached (see the module docstring). The caller closes
    the socket.

    The close_notify (`send_close_notify`, which does not wait for the client's) leaves the
    socket open for the rest. It is not needed for the response (Content-Length and
    `Connection: close` frame it), but without it a client that reads on until the end sees a
    truncation error where a clean close was due.
    """
    with trio.move_on_after(CLOSE_NOTIFY_TIMEOUT), contextlib.suppress(trio.BrokenResourceError):
        await tls.send_close_notify()
    await linger(stream)


async def linger(stream: TcpStream) -> None:
    """Our FIN, then what the client still sends read and discarded, within the LINGER_*
    bounds (the end of `lingering_close`, also for plain TCP). The caller closes the socket."""
    await discard_until_closed(
        stream,
        total=LINGER_TIME,
        idle=LINGER_TIMEOUT,
        max_bytes=LINGER_MAX_BYTES,
        # Raw bytes (TLS records never decrypted): a socket read's usual size.
        receive_size=RECEIVE_SIZE,
    )


async def close_pool(pool: UpstreamPool) -> None:
    """Close a pool's idle upstream connections, also when the server is being cancelled."""
    with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_NOTIFY_TIMEOUT):
        await pool.aclose()
