"""What the relay costs per request, in one process, repeatably: for A/B comparisons of code.

`benchmarks/run.py` measures dualproxy as users run it (TLS, wrk, nginx next to it), and its
figures move with everything else the machine does. This script takes TLS, the load generator
and the scheduler out of the picture, so that a change to the relay's Python can be weighed
in CPU instructions, which `valgrind --tool=callgrind` counts the same on a busy machine:

    client --socketpair, plain HTTP/1.1--> ClientConnection --socketpair, pooled--> upstream

all in one trio run on a clock that stands still: the client sends a request, reads the whole
response, sends the next; the upstream answers every request with the same small response (as
the nginx upstream of benchmarks/run.py does). The pool is the real one, its connections
socketpairs (the script replaces `upstream._connect`): a Unix socket's send is readable at the
other end when it returns, so every run takes the same steps. Kernel work is not counted by
callgrind; the client's and the upstream's Python is, but it is the same on both sides of an
A/B, so differences are the relay's (and the pool's).

    PYTHONHASHSEED=0 setarch "$(uname -m)" -R valgrind --tool=callgrind \\
        --callgrind-out-file=/dev/null .venv/bin/python benchmarks/relay_cost.py --requests 1000
    (and again with --requests 3000: the difference over 2000 is the cost of one request,
    start-up and warm-up cancelled out; a fixed hash seed and no address randomisation make
    repeat runs agree; see docs/performance.md)

`--mode connection` opens a new client connection (a new ClientConnection) per request, each
`Connection: close`: what a connection costs the relay beyond its request, TLS aside.
Without valgrind, it prints the wall time per request, which is only a rough guide.
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

import trio
import trio.testing

from dualproxy.config.schema import Limits, UpstreamConfig
from dualproxy.http import upstream as upstream_module
from dualproxy.http.relay import ClientConnection, Drain, RelaySettings
from dualproxy.http.upstream import UpstreamPool
from dualproxy.tls.streams import TcpStream

try:
    from dualproxy.http.heads import HeadLimits
    from dualproxy.http.rewrite import ForwardingRules
except ImportError:  # before the split of forwarding.py: for A/B runs against older commits
    from dualproxy.http.forwarding import (  # type: ignore[no-redef,attr-defined,import-not-found,unused-ignore]
        ForwardingRules,
        HeadLimits,
    )

# A request as a mobile app sends it: a few more fields than wrk's.
REQUEST: Final = (
    b"GET /v1/items?page=2 HTTP/1.1\r\n"
    b"Host: api.example.com\r\n"
    b"User-Agent: ExampleApp/4.2 (iPhone; iOS 17.1; Scale/3.00)\r\n"
    b"Accept: application/json\r\n"
    b"Accept-Language: en-GB;q=1.0\r\n"
    b"Accept-Encoding: br;q=1.0, gzip;q=0.9, deflate;q=0.8\r\n"
    b"Authorization: Bearer abcdefghijklmnopqrstuvwxyz0123456789\r\n"
    b"\r\n"
)
CLOSING_REQUEST: Final = REQUEST[:-2] + b"Connection: close\r\n\r\n"
BODY: Final = b"dualproxy-bench upstream ok"
RESPONSE: Final = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: text/plain\r\n"
    b"Content-Length: %d\r\n\r\n%b" % (len(BODY), BODY)
)
PEER: Final = ipaddress.ip_address("192.0.2.7")
# Requests per keep-alive connection: many, as wrk's, and below MAX_REQUESTS_PER_CONNECTION.
KEEPALIVE_REQUESTS: Final = 500


class Tally:
    """The server's ConnectionRecord, reduced to what the relay calls."""

    def __init__(self) -> None:
        self.requests = 0
        self.statuses = [0] * 6
        self.detail = ""

    def request_received(self) -> None:
        self.requests += 1

    def note(self, detail: str) -> None:
        self.detail = detail

    def response_relayed(self, status: int, upstream_seconds: float) -> None:
        self.statuses[status // 100] += 1

    def response_generated(self, status: int) -> None:
        self.statuses[status // 100] += 1

    def exchange_ended(self, *fields: object) -> None:
        """The access log's line: not this benchmark's (the whole-path one counts it)."""

    def check(self, requests: int) -> None:
        """Raise unless `requests` responses were all 200s."""
        if self.statuses[2] != requests:
            raise RuntimeError(f"not every response was a 200: {self.statuses} {self.detail}")


async def upstream(connections: trio.MemoryReceiveChannel[TcpStream]) -> None:
    """Answer every request on every connection with RESPONSE (bodiless requests only)."""

    async def serve(stream: TcpStream) -> None:
        buffer = b""
        while data := await stream.receive_some(65536):
            buffer += data
            while (end := buffer.find(b"\r\n\r\n")) >= 0:
                buffer = buffer[end + 4 :]
                await stream.send_all(RESPONSE)

    async with trio.open_nursery() as nursery:
        async for stream in connections:
            nursery.start_soon(serve, stream)


async def response(stream: TcpStream, buffer: bytearray) -> None:
    """Read one RESPONSE (its length is known) from `stream`."""
    while len(buffer) < len(RESPONSE):
        data = await stream.receive_some()
        if not data:
            raise RuntimeError(f"relay closed; got {bytes(buffer)!r}")
        buffer += data
    if not buffer.startswith(b"HTTP/1.1 200 OK"):
        raise RuntimeError(f"unexpected response {bytes(buffer)!r}")
    del buffer[: buffer.index(BODY) + len(BODY)]


def relay_for(settings: RelaySettings, stream: TcpStream, drain: Drain) -> ClientConnection:
    return ClientConnection(
        stream, peer=PEER, settings=lambda: settings, drain=drain, tally=Tally()
    )


@asynccontextmanager
async def upstream_behind(limits: Limits, capacity: int) -> AsyncIterator[RelaySettings]:
    """The relay's settings for the block, its pool's connections socketpairs to `upstream`
    (at most `capacity` of them opening at once)."""
    opened, accepted = trio.open_memory_channel[TcpStream](capacity)

    async def connect(host: str, port: int) -> TcpStream:
        ours, theirs = socket.socketpair()
        await opened.send(TcpStream(theirs))
        return TcpStream(ours)

    upstream_module._connect = connect
    async with trio.open_nursery() as nursery:
        nursery.start_soon(upstream, accepted)
        config = UpstreamConfig(
            url="http://upstream.test", scheme="http", host="upstream.test", port=80
        )
        yield RelaySettings(
            limits=limits,
            head_limits=HeadLimits.from_limits(limits),
            rules=ForwardingRules.from_config(config),
            pool=UpstreamPool(config, limits),
        )
        nursery.cancel_scope.cancel()


async def main(requests: int, mode: str) -> float:
    async with upstream_behind(Limits(), 1) as settings:
        drain = Drain()
        # Keep-alive connections carry KEEPALIVE_REQUESTS each (below the relay's cap), a
        # new connection one request.
        per_connection = KEEPALIVE_REQUESTS if mode == "keepalive" else 1
        request = REQUEST if mode == "keepalive" else CLOSING_REQUEST
        started = time.perf_counter()
        for first in range(0, requests, per_connection):
            ours, theirs = socket.socketpair()
            client, served = TcpStream(ours), TcpStream(theirs)
            async with trio.open_nursery() as connection:
                connection.start_soon(relay_for(settings, served, drain).serve)
                buffer = bytearray()
                for _ in range(min(per_connection, requests - first)):
                    await client.send_all(request)
                    await response(client, buffer)
                client.close()
            served.close()
        elapsed = time.perf_counter() - started
    return elapsed


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--mode", choices=["keepalive", "connection"], default="keepalive")
    args = parser.parse_args()
    # A clock that stands still: no wait expires, and every deadline decision is the same in
    # every run, however slowly valgrind runs it.
    seconds = trio.run(main, args.requests, args.mode, clock=trio.testing.MockClock())
    print(f"{args.mode}: {args.requests} requests, {seconds / args.requests * 1e6:.1f} us each")
