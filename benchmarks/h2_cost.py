"""What an HTTP/2 stream costs the driver, in one process, repeatably: relay_cost.py for h2.py.

    client --socketpair, h2 without TLS--> Http2Connection --socketpair, pooled--> upstream

all in one trio run on a clock that stands still, as relay_cost.py (read its docstring): the
client keeps STREAMS requests in flight on a connection as `h2load -m` does, sending the next
batch once every response of the last one has ended; the upstream answers every request with
the same small response. The client is frames written by hand (the HEADERS block, encoded once
by python-hyper's hpack, is all indexed from the second request on) and read by their 9-byte
headers only, so that little of the count is the client's; the server side is the real driver
(h2fields, the exchange, the real pool over socketpairs, the Tally reduced to counters).

    PYTHONHASHSEED=0 setarch "$(uname -m)" -R valgrind --tool=callgrind \\
        --callgrind-out-file=/dev/null .venv/bin/python benchmarks/h2_cost.py --requests 1000
    (and again with --requests 3000: the difference over 2000 is the cost of one request;
    see docs/performance.md)

Kernel work and TLS are not counted (TLS is read and written once per batch, not per stream).
Without valgrind, it prints the wall time per request, which is only a rough guide.
"""

from __future__ import annotations

import argparse
import socket
import struct
import time
from typing import Final

import h2.config
import h2.connection
import h2.settings
import trio
import trio.testing
from relay_cost import PEER, Tally, upstream_behind

from dualproxy.config.schema import Limits
from dualproxy.http.h2 import Http2Connection
from dualproxy.http.lifecycle import Drain
from dualproxy.tls.streams import TcpStream

# A request as a mobile app sends it (relay_cost.py's, in HTTP/2).
REQUEST: Final = [
    (b":method", b"GET"),
    (b":scheme", b"https"),
    (b":authority", b"api.example.com"),
    (b":path", b"/v1/items?page=2"),
    (b"user-agent", b"ExampleApp/4.2 (iPhone; iOS 17.1; Scale/3.00)"),
    (b"accept", b"application/json"),
    (b"accept-language", b"en-GB;q=1.0"),
    (b"accept-encoding", b"br;q=1.0, gzip;q=0.9, deflate;q=0.8"),
    (b"authorization", b"Bearer abcdefghijklmnopqrstuvwxyz0123456789"),
]
# Streams in flight per connection (h2load -m10, as benchmarks/run.py), and requests per
# connection: below MAX_REQUESTS_PER_CONNECTION, a multiple of STREAMS.
STREAMS: Final = 10
CONNECTION_REQUESTS: Final = 500
_HEADERS: Final = 0x1
_DATA: Final = 0x0
_END_STREAM: Final = 0x1
_END_HEADERS: Final = 0x4
_FRAME_HEADER: Final = struct.Struct(">HBBBL")  # length (24 bits as 16 + 8), type, flags, id


class Client:
    """One client connection: its preface and first request through python-hyper's h2 (so
    that the HPACK tables agree), every later request as a HEADERS frame built here."""

    def __init__(self, stream: TcpStream) -> None:
        self.stream = stream
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1}
        )
        self.next_id = 1
        self.block = b""  # the request's HEADERS block once every field is indexed
        self.buffer = bytearray()

    async def start(self) -> None:
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(2**31 - 1 - 65535)
        # The first request goes through h2 (literals, added to both tables); the second's
        # block, all indexed but for what h2 never indexes, is every later request's.
        self.conn.send_headers(self.next_id, REQUEST, end_stream=True)
        self.next_id += 2
        await self.stream.send_all(self.conn.data_to_send())
        await self.responses(1)
        self.conn.send_headers(self.next_id, REQUEST, end_stream=True)
        self.next_id += 2
        frame = self.conn.data_to_send()
        self.block = frame[9:]
        await self.stream.send_all(frame)
        await self.responses(1)

    async def batch(self, count: int) -> None:
        frames = []
        for _ in range(count):
            frames.append(
                _FRAME_HEADER.pack(
                    len(self.block) >> 8,
                    len(self.block) & 0xFF,
                    _HEADERS,
                    _END_STREAM | _END_HEADERS,
                    self.next_id,
                )
            )
            frames.append(self.block)
            self.next_id += 2
        await self.stream.send_all(b"".join(frames))
        await self.responses(count)

    async def responses(self, count: int) -> None:
        """Read frames until `count` streams ended (SETTINGS, their ACK, WINDOW_UPDATE
        frames pass by unread)."""
        buffer = self.buffer
        ended = 0
        while ended < count:
            while len(buffer) >= 9:
                high, low, kind, flags, _ = _FRAME_HEADER.unpack_from(buffer)
                end = 9 + (high << 8 | low)
                if len(buffer) < end:
                    break
                if kind in (_HEADERS, _DATA) and flags & _END_STREAM:
                    ended += 1
                if kind == 0x4 and not flags & 0x1:  # the server's SETTINGS: ACK them
                    await self.stream.send_all(b"\x00\x00\x00\x04\x01\x00\x00\x00\x00")
                del buffer[:end]
            if ended < count:
                data = await self.stream.receive_some()
                if not data:
                    raise RuntimeError("the server closed the connection")
                buffer += data


async def main(requests: int) -> float:
    limits = Limits()
    async with upstream_behind(limits, STREAMS) as settings:
        drain = Drain()
        started = time.perf_counter()
        for first in range(0, requests, CONNECTION_REQUESTS):
            ours, theirs = socket.socketpair()
            client_stream, served = TcpStream(ours), TcpStream(theirs)
            tally = Tally()
            server = Http2Connection(
                served,
                peer=PEER,
                settings=lambda: settings,
                limits=limits,
                drain=drain,
                tally=tally,
            )
            async with trio.open_nursery() as connection:
                connection.start_soon(server.serve)
                client = Client(client_stream)
                await client.start()
                left = min(CONNECTION_REQUESTS, requests - first) - 2
                while left > 0:
                    await client.batch(min(STREAMS, left))
                    left -= STREAMS
                connection.cancel_scope.cancel()
            tally.check(min(CONNECTION_REQUESTS, requests - first))
            client_stream.close()
            served.close()
        elapsed = time.perf_counter() - started
    return elapsed


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    # A clock that stands still (relay_cost.py): the same steps in every run.
    seconds = trio.run(main, args.requests, clock=trio.testing.MockClock())
    print(f"h2: {args.requests} requests, {seconds / args.requests * 1e6:.1f} us each")
