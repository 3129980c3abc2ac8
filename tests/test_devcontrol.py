"""The dev bench's admin endpoint and its client: on loopback only, for this machine only (not
for a web page in its browser), bounded; the client's errors say what to do.
(Through `dualproxy dev switch` against a real bench it is tested in test_dev.py.)"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing
from helpers.clients import ipv6_loopback
from helpers.smallhttp import exchange

from dualproxy.dev import control as devcontrol
from dualproxy.dev.control import ControlError, SwitchError

SCENARIOS = ("old-only", "grace", "rogue")


class FakeBench:
    """A Switchboard that records what it was asked."""

    def __init__(self) -> None:
        self.scenario = "grace"
        self.scenarios: Sequence[str] = SCENARIOS
        self.asked: list[str] = []
        self.fail = False

    async def switch(self, name: str) -> str:
        self.asked.append(name)
        if name not in SCENARIOS:
            raise SwitchError(f"unknown scenario {name!r}")
        if self.fail:
            raise SwitchError("could not load rogue")
        self.scenario = name
        return f"now {name}"


@asynccontextmanager
async def endpoint(host: str = "127.0.0.1") -> AsyncIterator[tuple[FakeBench, tuple[str, int]]]:
    board = FakeBench()
    sock = devcontrol.open_socket(host, 0)
    address = (host, int(sock.getsockname()[1]))
    async with trio.open_nursery() as nursery:
        await nursery.start(devcontrol.serve, sock, board)
        yield board, address
        nursery.cancel_scope.cancel()


async def raw(address: tuple[str, int], request: bytes) -> tuple[int, dict[str, object], bytes]:
    """Send raw bytes; the status, the JSON answer and the whole response."""
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        await stream.send_all(request)
        data = b""
        while chunk := await stream.receive_some(65536):  # the endpoint closes after answering
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body), data


def put(host: str, name: bytes, *extra: bytes) -> bytes:
    fields = b"".join(field + b"\r\n" for field in extra)
    return (
        b"PUT /scenario HTTP/1.1\r\nHost: " + host.encode() + b"\r\n" + fields
        + b"Content-Length: " + str(len(name)).encode() + b"\r\n\r\n" + name
    )  # fmt: skip


# --- addresses ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1:8444", ("127.0.0.1", 8444)),
        ("127.0.0.2:0", ("127.0.0.2", 0)),
        ("localhost:8444", ("127.0.0.1", 8444)),
        ("[::1]:8444", ("::1", 8444)),
    ],
)
def test_loopback_addresses_are_taken(text: str, address: tuple[str, int]) -> None:
    assert devcontrol.parse_admin_address(text) == address


@pytest.mark.parametrize("text", ["0.0.0.0:8444", "[::]:8444", "192.168.1.2:8444", "api.test:1"])
def test_other_addresses_are_refused_saying_why(text: str) -> None:
    with pytest.raises(ValueError, match=r"listens on loopback only: use 127\.0\.0\.1:PORT"):
        devcontrol.parse_admin_address(text)


@pytest.mark.parametrize("text", ["127.0.0.1", "127.0.0.1:", ":8444", "127.0.0.1:70000", "x"])
def test_malformed_addresses_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="is not HOST:PORT"):
        devcontrol.parse_admin_address(text)


def test_the_address_file_is_removed_only_while_it_is_ours(tmp_path: Path) -> None:
    path = tmp_path / "admin-address"
    written = devcontrol.write_address_file(path, "::1", 8444)
    assert devcontrol.read_address_file(path) == ("::1", 8444)
    path.write_text("127.0.0.1:9999\n")  # another bench on the same folder took over
    devcontrol.remove_address_file(path, written)
    assert devcontrol.read_address_file(path) == ("127.0.0.1", 9999)
    devcontrol.remove_address_file(path, "127.0.0.1:9999\n")
    assert not path.exists()
    devcontrol.remove_address_file(path, written)  # already gone: nothing to do
    with pytest.raises(ControlError, match="does not exist: no dev bench is running"):
        devcontrol.read_address_file(path)
    path.write_text("0.0.0.0:1\n")
    with pytest.raises(ControlError, match="restart the bench"):
        devcontrol.read_address_file(path)


# --- the endpoint ------------------------------------------------------------------------


async def test_get_and_put_through_the_client() -> None:
    async with endpoint() as (board, address):
        assert await trio.to_thread.run_sync(devcontrol.get_scenario, address) == "grace"
        text = await trio.to_thread.run_sync(devcontrol.switch, address, "rogue")
        assert text == "now rogue"
        assert board.scenario == "rogue"
        with pytest.raises(ControlError, match="the dev bench refused: unknown scenario 'nope'"):
            await trio.to_thread.run_sync(devcontrol.switch, address, "nope")
        board.fail = True
        with pytest.raises(ControlError, match="could not load rogue"):
            await trio.to_thread.run_sync(devcontrol.switch, address, "old-only")
    assert board.asked == ["rogue", "nope", "old-only"]


async def test_the_answers() -> None:
    async with endpoint() as (board, address):
        status, answer, data = await raw(address, put("127.0.0.1:1", b"old-only"))
        assert (status, answer) == (
            200,
            {"scenario": "old-only", "previous": "grace", "text": "now old-only"},
        )
        assert b"\r\nconnection: close\r\n" in data.lower()
        status, answer, _ = await raw(address, put("localhost", b"nope"))
        assert status == 400
        assert "unknown scenario 'nope'" in str(answer["error"])
        board.fail = True
        assert (await raw(address, put("localhost", b"rogue")))[0] == 500
        get = b"GET /scenario HTTP/1.1\r\nHost: [::1]:8444\r\n\r\n"
        assert (await raw(address, get))[1] == {
            "scenario": "old-only",
            "scenarios": list(SCENARIOS),
        }
        status, _, data = await raw(address, b"POST /scenario HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert status == 405
        assert b"\r\nallow: get, put\r\n" in data.lower()
        assert (await raw(address, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"))[0] == 404
        assert (await raw(address, put("localhost", b"x" * 2000)))[0] == 413
        assert (await raw(address, b"GET /scenario HTTP/1.1\r\n\r\n"))[0] == 400  # no Host
    assert board.asked == ["old-only", "nope", "rogue"]


async def test_a_head_request_gets_the_head_of_its_answer_and_the_endpoint_serves_on() -> None:
    """A HEAD's answer has no body; sending one anyway used to end the endpoint."""
    async with endpoint() as (board, address):
        head = b"HEAD /scenario HTTP/1.1\r\nHost: localhost\r\n\r\n"
        data = await exchange(*address, head)
        assert data.startswith(b"HTTP/1.1 405 ")
        assert b"\r\nallow: get, put\r\n" in data.lower()
        assert data.endswith(b"\r\n\r\n")  # the head alone
        # Its twin, on the same endpoint: a GET gets the whole answer.
        assert await trio.to_thread.run_sync(devcontrol.get_scenario, address) == "grace"
    assert board.asked == []


@pytest.mark.parametrize(
    "host", ["evil.example:8444", "127.0.0.1.nip.io", "localhost.evil.example", "[::2]", "a:b"]
)
async def test_a_host_other_than_loopback_is_refused(host: str) -> None:
    """DNS rebinding: a page whose own name now resolves to 127.0.0.1 still sends that name."""
    async with endpoint() as (board, address):
        status, answer, _ = await raw(address, put(host, b"rogue"))
    assert status == 403
    assert "is not this machine's loopback" in str(answer["error"])
    assert board.asked == []


async def test_a_request_from_a_web_page_is_refused() -> None:
    """Browsers send Origin with every cross-origin fetch and every form POST or PUT."""
    async with endpoint() as (board, address):
        status, answer, _ = await raw(address, put("localhost", b"rogue", b"Origin: null"))
        assert status == 403
        assert "refused a request from a web page (Origin: null)" in str(answer["error"])
        # The positive twin: the same request without Origin switches.
        assert (await raw(address, put("localhost", b"rogue")))[0] == 200
    assert board.asked == ["rogue"]


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback")
async def test_an_ipv6_loopback_endpoint() -> None:
    async with endpoint("::1") as (board, address):
        assert await trio.to_thread.run_sync(devcontrol.switch, address, "rogue") == "now rogue"
    assert board.scenario == "rogue"


async def test_serve_refuses_a_socket_that_is_not_on_loopback() -> None:
    sock = socket.create_server(("0.0.0.0", 0))
    with sock, pytest.raises(ValueError, match="must listen on loopback"):
        await devcontrol.serve(sock, FakeBench())


async def test_a_client_that_never_finishes_its_request_is_dropped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    board = FakeBench()
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(devcontrol.handle, server, board)
        await client.send_all(b"PUT /scenario HTTP/1.1\r\nHost: localhost\r\nContent-Le")
        assert await client.receive_some(1024) == b""  # closed after LOCAL_REQUEST_TIMEOUT
    assert board.asked == []


async def test_the_client_says_when_no_bench_answers() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        address = ("127.0.0.1", closed.getsockname()[1])
        with pytest.raises(ControlError, match=r"no dev bench answers at 127\.0\.0\.1:"):
            await trio.to_thread.run_sync(devcontrol.switch, address, "rogue")


async def test_the_client_says_when_something_else_answers() -> None:
    async def not_a_bench(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, not_a_bench, 0, host="127.0.0.1"))
        address = listeners[0].socket.getsockname()[:2]
        with pytest.raises(ControlError, match="is not a dev bench's admin endpoint"):
            await trio.to_thread.run_sync(devcontrol.switch, address, "rogue")
        nursery.cancel_scope.cancel()
