"""Health and drain for load balancers: /healthz and /readyz on the admin listener (their own
allow rule: a balancer's check names no host), and [lifecycle] drain_delay (on SIGTERM,
/readyz turns 503 while the server still serves, then the drain)."""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trustme
from helpers.clients import CLIENT_TIMEOUT
from helpers.configs import make_config
from helpers.keys import KeyFiles, make_key
from helpers.serving import serving

from dualproxy.config.errors import OperatorError
from dualproxy.config.names import ListenAddress
from dualproxy.config.schema import Config
from dualproxy.http.smallserver import Request
from dualproxy.ops import admin
from dualproxy.serve.server import Server


@pytest.fixture
def key(ca: trustme.CA, tmp_path: Path) -> KeyFiles:
    return make_key(ca, tmp_path, "k1")


def config_with(key: KeyFiles, tmp_path: Path, **tables: dict[str, Any]) -> Config:
    return make_config([key], base_dir=tmp_path, extra=tables)


@asynccontextmanager
async def admin_listener(server: Server) -> AsyncIterator[tuple[str, int]]:
    sock = admin.open_socket(ListenAddress("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    async with trio.open_nursery() as nursery:
        await nursery.start(admin.serve, sock, server)
        yield "127.0.0.1", port
        nursery.cancel_scope.cancel()


async def raw(address: tuple[str, int], request: bytes) -> tuple[int, bytes]:
    """Send exact bytes (a balancer's check); the status and body of the answer."""
    with trio.fail_after(CLIENT_TIMEOUT):
        async with await trio.open_tcp_stream(*address) as stream:
            await stream.send_all(request)
            data = bytearray()
            while chunk := await stream.receive_some():
                data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


HAPROXY_CHECK = b"GET /readyz HTTP/1.0\r\n\r\n"  # `option httpchk GET /readyz`: no Host


async def test_a_balancer_s_check_is_answered_without_host_or_with_any(
    key: KeyFiles, tmp_path: Path
) -> None:
    async with serving(config_with(key, tmp_path)) as run, admin_listener(run.server) as at:
        assert await raw(at, HAPROXY_CHECK) == (200, b"ready\n")
        assert await raw(at, b"GET /healthz HTTP/1.0\r\n\r\n") == (200, b"ok\n")
        kube = b"GET /readyz HTTP/1.1\r\nHost: 10.1.2.3:9901\r\nUser-Agent: kube-probe/1.31\r\n\r\n"
        assert (await raw(at, kube))[0] == 200
        # The negative twin: what tells more than "ready" keeps the loopback rule.
        assert (await raw(at, b"GET /status.json HTTP/1.0\r\n\r\n"))[0] == 403
        assert (await raw(at, b"POST /readyz HTTP/1.0\r\n\r\n"))[0] == 405


async def test_readyz_says_not_ready_before_the_listeners_open(
    key: KeyFiles, tmp_path: Path
) -> None:
    server = Server(config_with(key, tmp_path), handle_signals=False)
    asker = admin.Asker(from_loopback=False, on_loopback=False)
    answer = admin.Admin(server).answer(Request(b"GET", b"/readyz", ()), asker)
    assert answer.status == 503
    assert b"starting" in answer.body
    # Alive all the same: the process answers.
    assert admin.Admin(server).answer(Request(b"GET", b"/healthz", ()), asker).status == 200


async def tls_request(port: int, cafile: Path) -> bytes:
    """One GET over a new TLS connection; the response's status line."""
    with trio.fail_after(CLIENT_TIMEOUT):
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        context = ssl.create_default_context(cafile=str(cafile))
        tls = trio.SSLStream(tcp, context, server_hostname="api.example.com")
        await tls.send_all(b"GET / HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n")
        data = bytearray()
        try:
            while chunk := await tls.receive_some():
                data += chunk
        except trio.BrokenResourceError:
            pass
        await trio.aclose_forcefully(tls)
    return bytes(data).split(b"\r\n", 1)[0]


async def test_sigterm_with_drain_delay_turns_readyz_first_then_drains(
    key: KeyFiles,
    cafile: Path,
    tmp_path: Path,
    mock_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The clock stands still (pytest-trio's mock_clock) until the test moves it: what the
    server does during the delay is seen without a race against it."""
    caplog.set_level(logging.INFO, logger="dualproxy")
    config = config_with(key, tmp_path, lifecycle={"drain_delay": 10})
    async with serving(config) as run, admin_listener(run.server) as at:
        assert await raw(at, HAPROXY_CHECK) == (200, b"ready\n")
        run.server.drain()  # what SIGTERM does
        status, body = await raw(at, HAPROXY_CHECK)
        assert (status, body) == (503, b"not ready: draining: this server is stopping\n")
        # Still accepting and serving: the balancer has not seen the 503 yet.
        assert await tls_request(run.port, cafile) == b"HTTP/1.1 200 OK"
        mock_clock.jump(10)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(
            OSError, match="all attempts to connect"
        ):  # the listeners closed: the drain began
            await trio.open_tcp_stream("127.0.0.1", run.port)
    messages = [r.getMessage() for r in caplog.records if r.name == "dualproxy"]
    leaving = next(i for i, m in enumerate(messages) if m.startswith("leaving:"))
    draining = next(i for i, m in enumerate(messages) if m.startswith("draining:"))
    assert leaving < draining


async def test_without_drain_delay_sigterm_drains_at_once(
    key: KeyFiles, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """The negative twin (the default, 0): no waiting, the listeners close now."""
    async with serving(config_with(key, tmp_path)) as run, admin_listener(run.server) as at:
        run.server.drain()
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(OSError, match="all attempts to connect"):
            await trio.open_tcp_stream("127.0.0.1", run.port)
        assert (await raw(at, HAPROXY_CHECK))[0] == 503


async def test_a_second_sigterm_during_the_delay_stops_at_once(
    key: KeyFiles, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    config = config_with(key, tmp_path, lifecycle={"drain_delay": 10})
    async with serving(config) as run:
        run.server.drain()
        assert run.server.draining
        run.server.stop_now()
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(OSError, match="all attempts to connect"):
            await trio.open_tcp_stream("127.0.0.1", run.port)


@pytest.mark.parametrize("value", [-1, 601, "5"])
def test_drain_delay_is_checked(key: KeyFiles, tmp_path: Path, value: object) -> None:
    with pytest.raises(OperatorError) as error:
        config_with(key, tmp_path, lifecycle={"drain_delay": value})
    assert "lifecycle.drain_delay" in str(error.value)
