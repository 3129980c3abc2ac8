"""The micro-measurements behind docs/performance.md ("HTTP"): each trick of the relay's hot
path against the plain form it replaced, in nanoseconds per operation (best of 5 rounds of
timeit). Figures move with the machine and the interpreter: compare within one run.

    .venv/bin/python benchmarks/http_micro.py
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import re
import socket
import timeit
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, make_dataclass
from http import HTTPStatus
from typing import Any, NamedTuple

import trio

from dualproxy.http.exchange import Framing
from dualproxy.http.fields import connection_options
from dualproxy.http.heads import HeadLimits, check_request_head, check_response_head
from dualproxy.http.rewrite import client_response_headers, client_response_lines
from dualproxy.tls.streams import TlsStream

NUMBER = 200_000


@dataclass(frozen=True, slots=True)
class FrozenHead:
    method: bytes
    target: bytes
    version: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    host: bytes
    content_length: int | None
    chunked: bool
    expect_continue: bool
    close: bool = field(default=False, compare=False)
    forward: tuple[bytes, ...] | None = field(default=None, compare=False)


_Draft: Any = make_dataclass(
    "_Draft", [(f.name, f.type) for f in fields(FrozenHead)], slots=True, eq=False, repr=False
)


class TupleHead(NamedTuple):
    method: bytes
    target: bytes
    version: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    host: bytes
    content_length: int | None
    chunked: bool
    expect_continue: bool
    close: bool = False
    forward: tuple[bytes, ...] | None = None


ARGS: tuple[Any, ...] = (
    b"GET", b"/", b"1.1", ((b"host", b"a"),), b"a", None, False, False, False, ()
)  # fmt: skip


def draft_swap() -> object:
    head = _Draft(*ARGS)
    head.__class__ = FrozenHead
    return head


class IdleLike:
    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@contextlib.contextmanager
def idle_generator() -> Iterator[None]:
    yield


def with_class() -> None:
    with IdleLike():
        pass


def with_generator() -> None:
    with idle_generator():
        pass


class StartTuple(NamedTuple):
    status: int
    reason: bytes
    lines: tuple[bytes, ...]
    fields: list[tuple[bytes, bytes]]
    framing: Framing
    keep_alive: bool


AUTHORITY = re.compile(rb"(?:\[([0-9A-Fa-f:.]+)\]|[A-Za-z0-9\-._~]+)(?::([0-9]{1,5}))?")


@functools.lru_cache(maxsize=256)
def cached_authority(value: bytes) -> bool:
    return AUTHORITY.fullmatch(value) is not None


def ns(operation: Callable[[], object]) -> float:
    return min(timeit.repeat(operation, number=NUMBER, repeat=5)) / NUMBER * 1e9


def main() -> None:
    rows: list[tuple[str, Callable[[], object]]] = [
        ("head: frozen dataclass constructor", lambda: FrozenHead(*ARGS)),
        ("head: draft + __class__ swap (before)", draft_swap),
        ("head: NamedTuple constructor (now)", lambda: TupleHead(*ARGS)),
        ("check_request_head, 7 fields (now)", lambda: check_request_head(REQUEST, LIMITS)),
        (
            "response start: NamedTuple",
            lambda: StartTuple(200, b"OK", (), [], Framing.LENGTH, True),
        ),
        ("response start: plain tuple (now)", lambda: (200, b"OK", (), [], Framing.LENGTH, True)),
        ("Connection: keep-alive, from the table", lambda: connection_options([b"keep-alive"])),
        ("Connection: keep-alive, parsed", lambda: parsed_options([b"keep-alive"])),
        ("Host check: regex", lambda: AUTHORITY.fullmatch(b"api.example.com") is not None),
        ("Host check: remembered (lru_cache)", lambda: cached_authority(b"api.example.com")),
        ("response fields: lines as received", lambda: client_response_lines(RESPONSE)),
        (
            "response fields: pairs joined",
            lambda: [b": ".join(f) for f in client_response_headers(RESPONSE)],
        ),
        ("context manager: class (IdleWait)", with_class),
        ("context manager: @contextmanager", with_generator),
        ("status: int constant", lambda: OK),
        ("status: HTTPStatus.OK", lambda: HTTPStatus.OK),
        ("peer text: inet_ntoa", lambda: socket.inet_ntoa(PEER.packed)),
        ("peer text: str(IPv4Address)", lambda: str(PEER)),
        ("isinstance(stream, TlsStream)", lambda: isinstance(STREAM, TlsStream)),
    ]
    for name, operation in rows:
        print(f"{name:42s} {ns(operation):7.0f} ns")
    trio.run(clock_rows)


async def clock_rows() -> None:
    now = trio.lowlevel.current_clock().current_time
    scope = trio.CancelScope(deadline=trio.current_time() + 60)
    with scope:
        for name, operation in [
            ("clock: trio.current_time()", trio.current_time),
            ("clock: current_clock().current_time", now),
            ("deadline: set scope.deadline", lambda: setattr(scope, "deadline", now() + 60)),
            ("deadline: compare with a mirrored float", lambda: now() + 60 > DEADLINE),
        ]:
            print(f"{name:42s} {ns(operation):7.0f} ns")


def parsed_options(values: list[bytes]) -> frozenset[bytes]:
    return frozenset(o.strip(b" \t").lower() for v in values for o in v.split(b","))


OK = int(HTTPStatus.OK)
DEADLINE = 1e9
PEER = ipaddress.IPv4Address("203.0.113.5")
STREAM = object()
LIMITS = HeadLimits()
REQUEST = (
    b"GET /v1/items?page=2 HTTP/1.1\r\nHost: api.example.com\r\n"
    b"User-Agent: ExampleApp/4.2 (iPhone; iOS 17.1; Scale/3.00)\r\nAccept: application/json\r\n"
    b"Accept-Language: en-GB;q=1.0\r\nAccept-Encoding: br;q=1.0, gzip;q=0.9, deflate;q=0.8\r\n"
    b"Authorization: Bearer abcdefghijklmnopqrstuvwxyz0123456789\r\nConnection: keep-alive\r\n\r\n"
)

RESPONSE = check_response_head(
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: application/json\r\n"
    b"Cache-Control: no-store\r\nSet-Cookie: a=1\r\nContent-Length: 2\r\n\r\n",
    request_method=b"GET",
)

if __name__ == "__main__":
    main()
