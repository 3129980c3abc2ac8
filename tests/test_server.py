"""The TLS front on real loopback sockets: how a ClientHello arrives, the advisory peek,
logged outcomes, timeouts, the connection cap, keep-alive and listeners.

Clients either run in the event loop (`trio.SSLStream` over Python's `ssl`, raw trio streams
that send hand-made bytes) or outside it (Python `ssl` in a worker thread, curl in a
subprocess). Timeout tests use only in-loop clients and a mock clock that jumps when every task
is blocked, so they wait for no real timeout; every other wait is bounded by CLIENT_TIMEOUT.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import h11
import pytest
import trio
import trio.testing
import trustme
from cryptography import x509
from helpers import hellos
from helpers.clients import CLIENT_TIMEOUT, curl_pinned, run_client, tls_get_async
from helpers.configs import make_config
from helpers.h11client import receive_response
from helpers.keys import KeyFiles, make_key
from helpers.logs import ConnLog, parse_log_line
from helpers.rotation import Clock
from helpers.serving import serving

from dualproxy.config.schema import Config, Limits
from dualproxy.http.relay import Drain
from dualproxy.serve import closing, placeholder
from dualproxy.serve import server as server_mod
from dualproxy.serve.clock import CLOCK_REUSE_SECONDS, ReusedUtcNow
from dualproxy.serve.closing import LINGER_TIME, lingering_close
from dualproxy.serve.connection import ConnectionRecord
from dualproxy.tls.clienthello import ClientHello, parse_client_hello
from dualproxy.tls.pins import spki_pin_of_certificate
from dualproxy.tls.streams import TcpStream, TlsStream

NOW: Final = datetime(2026, 6, 1, tzinfo=UTC)
HINTED_SNI: Final = "k2.api.example.com"  # rotating_config hints it to the new key, k2
PLAIN_SNI: Final = "api.example.com"  # no hint: the default (old) key, k1
# More than any answer of the server under test: reading stops there instead of forever.
DRAIN_BYTES: Final = 1 << 20


# --- fixtures and helpers ------------------------------------------------------------------------


@pytest.fixture
def old_key(ca: trustme.CA, tmp_path: Path) -> KeyFiles:
    return make_key(ca, tmp_path, "k1")


@pytest.fixture
def new_key(ca: trustme.CA, tmp_path: Path) -> KeyFiles:
    return make_key(ca, tmp_path, "k2")


def rotation(**hints_new: list[str]) -> dict[str, Any]:
    """k1 (old) -> k2 (new), NOW inside the grace window, default old, the given new hints."""
    return {
        "old": "k1",
        "new": "k2",
        "grace_start": NOW - timedelta(days=1),
        "grace_end": NOW + timedelta(days=1),
        "hints": {"new": hints_new},
    }


def rotating_config(old_key: KeyFiles, new_key: KeyFiles, tmp_path: Path) -> Config:
    """SNI k2.api.example.com gets the new key k2, every other parsed hello the old key k1."""
    return make_config([old_key, new_key], rotation=rotation(sni=[HINTED_SNI]), base_dir=tmp_path)


def single_config(key: KeyFiles, tmp_path: Path, **limits: float) -> Config:
    return make_config([key], base_dir=tmp_path, extra={"limits": limits} if limits else None)


def client_context(cafile: Path, *, check_hostname: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cafile))
    context.check_hostname = check_hostname
    return context


def python_hello(server_name: str = PLAIN_SNI, *, alpn: Sequence[str] = ()) -> bytes:
    """The first flight (the ClientHello records) of a real Python ssl client."""
    context = ssl.create_default_context()
    context.check_hostname = False
    if alpn:
        context.set_alpn_protocols(list(alpn))
    outgoing = ssl.MemoryBIO()
    client = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def pin_of(tls: trio.SSLStream[Any]) -> str:
    der = tls.getpeercert(binary_form=True)
    assert der is not None
    return spki_pin_of_certificate(x509.load_der_x509_certificate(der))


Pause = Callable[[], Awaitable[object]]


class ShapedStream(trio.abc.Stream):
    """A client transport that re-cuts its first send (the ClientHello) and counts what it
    receives: `shape` turns the hello into the chunks sent, with `pause()` after each."""

    def __init__(
        self,
        transport: trio.SocketStream,
        shape: Callable[[bytes], Sequence[bytes]],
        pause: Pause = trio.testing.wait_all_tasks_blocked,
    ) -> None:
        self.transport = transport
        self._shape: Callable[[bytes], Sequence[bytes]] | None = shape
        self._pause = pause
        self.hello_sent = 0  # bytes of the reshaped first send
        self.received = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        shape, self._shape = self._shape, None
        if shape is None:
            await self.transport.send_all(data)
            return
        for chunk in shape(bytes(data)):
            self.hello_sent += len(chunk)
            await self.transport.send_all(chunk)
            await self._pause()

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.transport.receive_some(max_bytes)
        self.received += len(data)
        return data

    async def aclose(self) -> None:
        await self.transport.aclose()


def whole(hello: bytes) -> list[bytes]:
    return [hello]


def byte_by_byte(hello: bytes) -> list[bytes]:
    return [hello[i : i + 1] for i in range(len(hello))]


def refragmented(size: int) -> Callable[[bytes], list[bytes]]:
    """The same handshake message in records of `size` payload bytes, sent whole."""

    def shape(hello: bytes) -> list[bytes]:
        return [hellos.records(hellos.handshake_bytes(hello), size)]

    return shape


@asynccontextmanager
async def tls_client(
    port: int,
    cafile: Path,
    *,
    server_name: str = PLAIN_SNI,
    shape: Callable[[bytes], Sequence[bytes]] = whole,
    context: ssl.SSLContext | None = None,
    host: str = "127.0.0.1",
) -> AsyncIterator[trio.SSLStream[ShapedStream]]:
    """An in-loop Python ssl client, handshake done; strict about close_notify."""
    with trio.fail_after(CLIENT_TIMEOUT):
        transport = ShapedStream(await trio.open_tcp_stream(host, port), shape)
    tls = trio.SSLStream(transport, context or client_context(cafile), server_hostname=server_name)
    try:
        with trio.fail_after(CLIENT_TIMEOUT):
            await tls.do_handshake()
        yield tls
    finally:
        await trio.aclose_forcefully(tls)


def get(path: str = "/", *, close: bool = False) -> h11.Request:
    headers = [("host", PLAIN_SNI)] + ([("connection", "close")] if close else [])
    return h11.Request(method="GET", target=path, headers=headers)


async def exchange(
    stream: trio.abc.Stream, conn: h11.Connection, request: h11.Request
) -> tuple[h11.Response, bytes]:
    """Send one request and read its whole response."""
    for outgoing in (request, h11.EndOfMessage()):
        data = conn.send(outgoing)
        assert data is not None
        await stream.send_all(data)
    with trio.fail_after(CLIENT_TIMEOUT):
        return await receive_response(stream, conn)


async def read_to_eof(stream: trio.abc.ReceiveStream) -> bytes:
    """Everything until the peer closes; a clean close is required of TLS streams."""
    data, clean = await read_until_closed(stream)
    assert clean, f"no close_notify after {data!r}"
    return data


async def read_until_closed(stream: trio.abc.ReceiveStream) -> tuple[bytes, bool]:
    """Everything until the peer closes, and whether it closed cleanly (for TLS: with a
    close_notify; a strict trio.SSLStream raises BrokenResourceError without one)."""
    data = b""
    with trio.fail_after(CLIENT_TIMEOUT):
        try:
            while chunk := await stream.receive_some():
                data += chunk
                assert len(data) < DRAIN_BYTES
        except trio.BrokenResourceError:
            return data, False
    return data, True


async def raw_exchange(port: int, data: bytes, *, eof: bool = False) -> bytes:
    """Send `data` on a plain TCP connection (then a FIN with `eof`); all bytes until EOF."""
    with trio.fail_after(CLIENT_TIMEOUT):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        if eof:
            await stream.send_eof()
        data, clean = await read_until_closed(stream)
        return data if clean else data + b"<reset>"


@pytest.fixture
def conn_log(caplog: pytest.LogCaptureFixture) -> ConnLog:
    caplog.set_level(logging.INFO, logger="dualproxy")
    return ConnLog(caplog)


@pytest.fixture
def mock_clock() -> trio.testing.MockClock:
    """Timeouts without waiting: the clock jumps to the next deadline once every task has
    waited this long in real time. Only in-loop clients may be used with it: a worker thread
    or a subprocess busy for longer would look idle."""
    return trio.testing.MockClock(autojump_threshold=0.05)


# --- ClientHello delivery ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape",
    [whole, byte_by_byte, refragmented(1), refragmented(3), refragmented(100)],
    ids=["whole", "1-byte-writes", "1-byte-records", "3-byte-records", "100-byte-records"],
)
@pytest.mark.parametrize(("sni", "expected"), [(HINTED_SNI, "k2"), (PLAIN_SNI, "k1")])
async def test_hello_routes_by_sni_however_it_is_cut(
    old_key: KeyFiles,
    new_key: KeyFiles,
    cafile: Path,
    tmp_path: Path,
    conn_log: ConnLog,
    monkeypatch: pytest.MonkeyPatch,
    shape: Callable[[bytes], list[bytes]],
    sni: str,
    expected: str,
) -> None:
    seen: list[int] = []  # the buffer sizes the peek handed to the parser
    parse = parse_client_hello

    def spy(data: bytes) -> ClientHello | None:
        seen.append(len(data))
        return parse(data)

    monkeypatch.setattr(server_mod, "parse_client_hello", spy)
    config = rotating_config(old_key, new_key, tmp_path)
    keys = {"k1": old_key, "k2": new_key}
    async with serving(config, clock=Clock(NOW)) as run:
        async with tls_client(run.port, cafile, server_name=sni, shape=shape) as tls:
            assert pin_of(tls) == keys[expected].pin
            hello_sent = tls.transport_stream.hello_sent
            response, body = await exchange(tls, h11.Connection(h11.CLIENT), get())
            assert response.status_code == 200
            assert body.startswith(b"dualproxy:")
        line = await conn_log.one()
    assert (line["sni"], line["key"], line["outcome"], line["requests"]) == (
        sni,
        expected,
        "ok",
        "1",
    )
    assert line["reason"] == ("hint-sni" if expected == "k2" else "default")
    assert seen[-1] == hello_sent  # the hello was parsed from all of it, as sent
    if shape is byte_by_byte:
        # Each byte reached the parser on its own: the peek really was fed in pieces.
        assert seen == list(range(1, hello_sent + 1))


# --- the peek is advisory ------------------------------------------------------------------------


def network_config(old_key: KeyFiles, new_key: KeyFiles, tmp_path: Path) -> Config:
    """Every parsed hello from loopback gets the new key k2; an unparsed one the default k1."""
    return make_config(
        [old_key, new_key],
        rotation=rotation(networks=["127.0.0.0/8", "::1/128"]),
        base_dir=tmp_path,
        extra={"limits": {"handshake_timeout": 300}},
    )


def sslv2_hello(version: int) -> bytes:
    """An SSL 2.0-format CLIENT-HELLO (the compatibility hello of very old clients)."""
    cipher_specs = bytes.fromhex("00c02b00002f")  # ECDHE-ECDSA-AES128-GCM, RSA-AES128-SHA
    challenge = bytes(range(16))
    message = (
        b"\x01"  # SSL2_MT_CLIENT_HELLO
        + version.to_bytes(2)
        + len(cipher_specs).to_bytes(2)
        + (0).to_bytes(2)  # session id length
        + len(challenge).to_bytes(2)
        + cipher_specs
        + challenge
    )
    return (0x8000 | len(message)).to_bytes(2) + message


TLS_ALERT: Final = 21  # record content type of an alert
HANDSHAKE: Final = 22


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(bytes(64), "unparsed", id="zeros"),
        pytest.param(b"hello there\r\n", "unparsed", id="lowercase-text"),
        pytest.param(bytes(range(256)), "unparsed", id="all-bytes"),
        pytest.param(sslv2_hello(0x0002), "unparsed", id="sslv2-hello-ssl2"),
        pytest.param(sslv2_hello(0x0301), "unparsed", id="sslv2-hello-tls1.0"),
        # OpenSSL reads this one, but without extensions no suite can be signed acceptably.
        pytest.param(sslv2_hello(0x0303), "unparsed", id="sslv2-hello-tls1.2"),
        # Parsed (hence routed by the network hint), then refused by OpenSSL.
        pytest.param(
            hellos.records(hellos.client_hello(None, legacy_version=0x0301)),
            "hint-network",
            id="tls1.0-only",
        ),
        pytest.param(
            hellos.records(
                hellos.client_hello([hellos.server_name(PLAIN_SNI.encode())], cipher_suites=[5])
            ),
            "hint-network",
            id="no-shared-cipher",
        ),
    ],
)
async def test_bytes_openssl_refuses_end_as_tls_error(
    old_key: KeyFiles,
    new_key: KeyFiles,
    tmp_path: Path,
    conn_log: ConnLog,
    data: bytes,
    reason: str,
) -> None:
    config = network_config(old_key, new_key, tmp_path)
    async with serving(config, clock=Clock(NOW)) as run:
        answer = await raw_exchange(run.port, data)
        line = await conn_log.one()
    # At most an alert comes back before the close, never a ServerHello; no timeout, no crash.
    assert answer in (b"", b"<reset>") or answer[0] == TLS_ALERT, answer
    assert (line["outcome"], line["reason"]) == ("tls-error", reason)
    assert line["detail"] != "-"


@pytest.mark.parametrize(
    ("server_name", "key", "reason"),
    [
        # A space is no DNS name and our parser refuses it; OpenSSL takes any SNI bytes.
        ("evil host=x", "k1", "unparsed"),
        (PLAIN_SNI, "k2", "hint-network"),
    ],
)
async def test_hello_openssl_accepts_but_the_peek_cannot_parse_gets_the_default(
    old_key: KeyFiles,
    new_key: KeyFiles,
    cafile: Path,
    tmp_path: Path,
    conn_log: ConnLog,
    server_name: str,
    key: str,
    reason: str,
) -> None:
    config = network_config(old_key, new_key, tmp_path)
    context = client_context(cafile, check_hostname=False)
    async with serving(config, clock=Clock(NOW)) as run:
        async with tls_client(run.port, cafile, server_name=server_name, context=context) as tls:
            assert pin_of(tls) == {"k1": old_key, "k2": new_key}[key].pin
            response, _ = await exchange(tls, h11.Connection(h11.CLIENT), get())
            assert response.status_code == 200
        line = await conn_log.one()
    assert (line["key"], line["reason"], line["outcome"]) == (key, reason, "ok")
    if reason == "unparsed":
        assert line["sni"] == "-"
        assert line["detail"].startswith("unparsed hello: host_name b'evil host=x'")
    else:
        assert line["sni"] == PLAIN_SNI
        assert line["detail"] == "-"


# --- plain HTTP on the TLS port ------------------------------------------------------------------

REFUSAL_START: Final = b"HTTP/1.1 400 Bad Request\r\n"


async def send_slowly(stream: trio.SocketStream, data: bytes) -> None:
    """One byte per write, each read by the server before the next (it may close midway)."""
    for i in range(len(data)):
        try:
            await stream.send_all(data[i : i + 1])
        except trio.BrokenResourceError:
            return
        await trio.testing.wait_all_tasks_blocked()


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
        b"POST /upload HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 5\r\n\r\nhello",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # the HTTP/2 preface (h2c prior knowledge)
    ],
    ids=["get", "post", "h2-preface"],
)
@pytest.mark.parametrize("slowly", [False, True], ids=["one-write", "1-byte-writes"])
async def test_plain_http_gets_a_plain_400_and_a_close(
    old_key: KeyFiles, tmp_path: Path, conn_log: ConnLog, request_bytes: bytes, slowly: bool
) -> None:
    # A long handshake timeout: the close must come from the refusal, not from a timeout.
    async with serving(single_config(old_key, tmp_path, handshake_timeout=300)) as run:
        with trio.fail_after(CLIENT_TIMEOUT):
            stream = await trio.open_tcp_stream("127.0.0.1", run.port)
        async with stream:
            if slowly:
                await send_slowly(stream, request_bytes)
            else:
                await stream.send_all(request_bytes)
            answer = await read_to_eof(stream)
        line = await conn_log.one()
    assert answer.startswith(REFUSAL_START), answer
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"\r\nConnection: close\r\n" in head + b"\r\n"
    assert body == b"This port speaks HTTPS; use https:// .\r\n"
    assert f"Content-Length: {len(body)}".encode() in head
    assert (line["outcome"], line["identity"], line["tls"]) == ("plain-http", "-", "-")


async def test_curl_plain_http_to_the_tls_port(
    old_key: KeyFiles, tmp_path: Path, conn_log: ConnLog
) -> None:
    async with serving(single_config(old_key, tmp_path, handshake_timeout=300)) as run:
        argv = ["curl", "-sS", "--max-time", str(CLIENT_TIMEOUT), "-w", "\n%{http_code}"]
        result = await run_client([*argv, f"http://127.0.0.1:{run.port}/"])
        line = await conn_log.one()
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith(b"use https:// .\r\n\n400")
    assert line["outcome"] == "plain-http"


# Sent before reading, like a client uploading a file: far more than the server reads before
# refusing and than both ends' socket buffers hold on loopback, so the server's close finds
# bytes unread; well below server.LINGER_MAX_BYTES.
UPLOAD_BEFORE_READING: Final = 8 * 1024 * 1024
UPLOAD_PIECE: Final = b"u" * (64 * 1024)


async def upload_then_read(stream: trio.abc.Stream, head: bytes) -> tuple[bytes, bool] | None:
    """Send `head` and UPLOAD_BEFORE_READING more bytes, and only then read: what came until
    the server closed and whether it closed cleanly, or None when the upload was reset."""
    try:
        await stream.send_all(head)
        for _ in range(UPLOAD_BEFORE_READING // len(UPLOAD_PIECE)):  # bounded
            await stream.send_all(UPLOAD_PIECE)
    except trio.BrokenResourceError:
        return None
    return await read_until_closed(stream)


PLAIN_UPLOAD: Final = (
    b"POST /upload HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: %d\r\n\r\n"
    % (UPLOAD_BEFORE_READING)
)


@pytest.mark.parametrize("linger", [True, False], ids=["lingers", "twin-without-linger"])
async def test_plain_http_upload_gets_the_whole_400(
    old_key: KeyFiles,
    tmp_path: Path,
    conn_log: ConnLog,
    monkeypatch: pytest.MonkeyPatch,
    linger: bool,
) -> None:
    """A plain-HTTP client still sending when refused reads the whole 400: the server
    half-closes and reads on, where closing at once would reset the answer away (the twin)."""
    if not linger:
        monkeypatch.setattr(closing, "LINGER_TIME", 0)
    async with serving(single_config(old_key, tmp_path, handshake_timeout=300)) as run:
        with trio.fail_after(CLIENT_TIMEOUT):
            stream = await trio.open_tcp_stream("127.0.0.1", run.port)
        async with stream:
            result = await upload_then_read(stream, PLAIN_UPLOAD)
        line = await conn_log.one()
    assert line["outcome"] == "plain-http"
    if linger:
        assert result is not None, "the upload was reset"
        answer, clean = result
        assert clean
        assert answer.startswith(REFUSAL_START), answer
        assert answer.endswith(b"use https:// .\r\n")
    elif result is not None:  # the upload went through; then the answer was cut
        answer, clean = result
        assert not clean
        assert not answer.endswith(b"use https:// .\r\n")


@pytest.mark.parametrize("linger", [True, False], ids=["lingers", "twin-without-linger"])
async def test_placeholder_400_reaches_a_client_still_sending(
    old_key: KeyFiles,
    cafile: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    linger: bool,
) -> None:
    """Without [upstream], a malformed request's 400 reaches a client that goes on sending
    before it reads (the placeholder lingers as the relay does)."""
    if not linger:
        monkeypatch.setattr(closing, "LINGER_TIME", 0)
    bad = b"POST /upload HTTP/1.1\r\nHost: api.example.com\r\nBad Field: x\r\n\r\n"
    async with (
        serving(single_config(old_key, tmp_path)) as run,
        tls_client(run.port, cafile) as tls,
    ):
        result = await upload_then_read(tls, bad)
    if linger:
        assert result is not None, "the upload was reset"
        answer, _ = result  # see test_malformed_request_gets_400_and_a_close on close_notify
        assert answer.startswith(b"HTTP/1.1 400 "), answer
        assert answer.endswith(b"\r\n\r\nbad request\n")
    elif result is not None:
        answer, clean = result
        assert not (clean and answer.endswith(b"bad request\n"))


# --- timeouts (mock clock: in-loop clients only) -------------------------------------------------

TIMEOUT: Final = 5.0  # each limit under test, in mock-clock seconds
WITHIN: Final = TIMEOUT * 0.8  # a pause the limit must tolerate


def timeout_config(key: KeyFiles, tmp_path: Path) -> Config:
    return single_config(
        key,
        tmp_path,
        handshake_timeout=TIMEOUT,
        request_header_timeout=TIMEOUT,
        keepalive_timeout=TIMEOUT,
    )


@pytest.mark.parametrize(
    ("sent", "detail"),
    [("nothing", "hello"), ("half-hello", "hello"), ("hello", "handshake")],
)
async def test_handshake_timeout(
    old_key: KeyFiles,
    tmp_path: Path,
    conn_log: ConnLog,
    mock_clock: trio.testing.MockClock,
    sent: str,
    detail: str,
) -> None:
    hello = python_hello()
    data = {"nothing": b"", "half-hello": hello[: len(hello) // 2], "hello": hello}[sent]
    async with serving(timeout_config(old_key, tmp_path)) as run:
        # The client never finishes; only the server's timeout can end this.
        answer = await raw_exchange(run.port, data)
        line = await conn_log.one()
    assert (line["outcome"], line["detail"]) == ("timeout", detail)
    # Only a hello gets an answer (the server's first flight), never an HTTP response.
    assert (answer[:1] == bytes([HANDSHAKE])) == (sent == "hello")


async def test_slow_handshake_within_the_timeout_completes(
    old_key: KeyFiles,
    cafile: Path,
    tmp_path: Path,
    conn_log: ConnLog,
    mock_clock: trio.testing.MockClock,
) -> None:
    async def pause() -> None:
        await trio.sleep(WITHIN / 2)

    def in_two(hello: bytes) -> list[bytes]:
        return [hello[:10], hello[10:]]

    async with serving(timeout_config(old_key, tmp_path)) as run:
        with trio.fail_after(CLIENT_TIMEOUT):
            stream = ShapedStream(await trio.open_tcp_stream("127.0.0.1", run.port), in_two, pause)
        tls = trio.SSLStream(stream, client_context(cafile), server_hostname=PLAIN_SNI)
        async with tls:
            with trio.fail_after(CLIENT_TIMEOUT):
                await tls.do_handshake()
            assert pin_of(tls) == old_key.pin
            response, _ = await exchange(tls, h11.Connection(h11.CLIENT), get(close=True))
            assert response.status_code == 200
        line = await conn_log.one()
    assert (line["outcome"], line["requests"]) == ("ok", "1")


async def test_request_header_timeout(
    old_key: KeyFiles,
    cafile: Path,
    tmp_path: Path,
    conn_log: ConnLog,
    mock_clock: trio.testing.MockClock,
) -> None:
    async with serving(timeout_config(old_key, tmp_path)) as run:
        async with tls_client(run.port, cafile) as tls:
            # A slow but steady client is served...
            await tls.send_all(b"GET / HTTP/1.1\r\n")
            await trio.sleep(WITHIN)
            await tls.send_all(b"Host: api.example.com\r\n\r\n")
            head = await tls.receive_some()
            assert head.startswith(b"HTTP/1.1 200 ")
        # ...a stalled one is closed once request_header_timeout runs out.
        async with tls_client(run.port, cafile) as tls:
            await tls.send_all(b"GET / HTTP/1.1\r\nHost: api.exa")
            assert await read_to_eof(tls) == b""
        lines = await conn_log.wait(2)
    assert [(x["outcome"], x["requests"]) for x in lines] == [("ok", "1"), ("no-request", "0")]


async def test_keepalive_idle_timeout(
    old_key: KeyFiles,
    cafile: Path,
    tmp_path: Path,
    conn_log: ConnLog,
    mock_clock: trio.testing.MockClock,
) -> None:
    async with serving(timeout_config(old_key, tmp_path)) as run:
        async with tls_client(run.port, cafile) as tls:
            conn = h11.Connection(h11.CLIENT)
            for _ in range(2):  # idle, but not for long enough
                response, _ = await exchange(tls, conn, get())
                assert response.status_code == 200
                conn.start_next_cycle()
                await trio.sleep(WITHIN)
            assert await read_to_eof(tls) == b""  # then idle until the server closes
        line = await conn_log.one()
    assert (line["outcome"], line["requests"]) == ("ok", "2")


# --- outcomes, as logged -------------------------------------------------------------------------

# Alerts an OpenSSL-based client sends when it rejects the certificate it was shown.
CERTIFICATE_ALERTS: Final = frozenset(
    {"unknown_ca", "bad_certificate", "certificate_unknown", "unsupported_certificate"}
)


@pytest.mark.parametrize("trusted", [True, False], ids=["trusting", "distrusting"])
async def test_python_client_that_distrusts_the_certificate_aborts_with_an_alert(
    old_key: KeyFiles, cafile: Path, tmp_path: Path, conn_log: ConnLog, trusted: bool
) -> None:
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    async with serving(single_config(old_key, tmp_path)) as run:
        if trusted:
            result = await tls_get_async(run.host, run.port, cafile=cafile)
            assert result.pin == old_key.pin
        else:
            with pytest.raises(ssl.SSLCertVerificationError):
                await tls_get_async(run.host, run.port, cafile=other_ca)
        line = await conn_log.one()
    assert line["alpn"] == "-"  # none offered
    if trusted:
        assert (line["outcome"], line["detail"], line["requests"]) == ("ok", "-", "1")
    else:
        assert line["outcome"] == "client-aborted"
        assert line["detail"] in CERTIFICATE_ALERTS, line
        assert line["key"] == "k1"  # what the client was shown before it left


@pytest.mark.parametrize("right_pin", [True, False], ids=["right-pin", "wrong-pin"])
async def test_curl_pinning_our_key_or_another(
    old_key: KeyFiles,
    new_key: KeyFiles,
    cafile: Path,
    tmp_path: Path,
    conn_log: ConnLog,
    right_pin: bool,
) -> None:
    pin = old_key.pin if right_pin else new_key.pin  # new_key is not served here
    async with serving(single_config(old_key, tmp_path)) as run:
        result = await run_client(curl_pinned(run.port, cafile=cafile, pin=pin))
        line = await conn_log.one()
    if right_pin:
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(b"dualproxy:")
        assert (line["outcome"], line["requests"]) == ("ok", "1")
    else:
        # curl checks the pin after the handshake (exit 90: CURLE_SSL_PINNEDPUBKEYNOTMATCH).
        assert result.returncode == 90, result.stderr
        assert (line["outcome"], line["requests"]) == ("no-request", "0")
    assert (line["tls"], line["alpn"]) == ("TLSv1.3", "h2,http/1.1")


@pytest.mark.parametrize("send_hello", [True, False], ids=["hello-then-close", "close"])
async def test_client_that_leaves_early(
    old_key: KeyFiles, tmp_path: Path, conn_log: ConnLog, send_hello: bool
) -> None:
    async with serving(single_config(old_key, tmp_path)) as run:
        with trio.fail_after(CLIENT_TIMEOUT):
            stream = await trio.open_tcp_stream("127.0.0.1", run.port)
            if send_hello:
                await stream.send_all(python_hello())
            await stream.aclose()
        line = await conn_log.one()
    if send_hello:
        assert (line["outcome"], line["sni"]) == ("client-aborted", PLAIN_SNI)
        assert line["detail"] in {"closed", "econnreset", "epipe"}
    else:
        assert (line["outcome"], line["detail"]) == ("no-hello", "closed after 0 bytes")


async def test_client_that_leaves_after_half_a_hello(
    old_key: KeyFiles, tmp_path: Path, conn_log: ConnLog
) -> None:
    hello = python_hello()
    async with serving(single_config(old_key, tmp_path)) as run:
        await raw_exchange(run.port, hello[: len(hello) // 2], eof=True)
        line = await conn_log.one()
    assert (line["outcome"], line["detail"]) == (
        "no-hello",
        f"closed after {len(hello) // 2} bytes",
    )


# --- a tls-alpn-01 responder (what ACME registers) ----------------------------------------------


class StandInResponder:
    """A TlsAlpnResponder answering acme-tls/1 with a certificate of its own, as ACME's
    challenge board does."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.asked: list[str | None] = []

    def challenge_context(self, hello: ClientHello) -> ssl.SSLContext | None:
        self.asked.append(hello.sni)
        return self.context if b"acme-tls/1" in hello.alpn else None

    async def answer_challenge(
        self, stream: TcpStream, peeked: bytes, context: ssl.SSLContext
    ) -> str:
        tls = TlsStream(stream, context, server_side=True, prefix=peeked)
        await tls.do_handshake()
        await tls.aclose()
        return "stand-in-answered"


@pytest.mark.parametrize(
    ("offers_acme", "registered"),
    [(True, True), (False, True), (True, False)],
    ids=["validation", "twin-other-client", "twin-no-responder"],
)
async def test_a_tls_alpn_responder_answers_the_hellos_it_claims_and_no_other(
    ca: trustme.CA,
    old_key: KeyFiles,
    cafile: Path,
    tmp_path: Path,
    conn_log: ConnLog,
    caplog: pytest.LogCaptureFixture,
    offers_acme: bool,
    registered: bool,
) -> None:
    caplog.set_level(logging.DEBUG, logger="dualproxy")
    challenge = ca.issue_cert("challenge.test")
    answering = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    challenge.configure_cert(answering)
    answering.set_alpn_protocols(["acme-tls/1"])
    responder = StandInResponder(answering)
    context = client_context(cafile, check_hostname=False)
    context.set_alpn_protocols(["acme-tls/1"] if offers_acme else ["http/1.1"])
    async with serving(single_config(old_key, tmp_path)) as run:
        if registered:
            run.server.tls_alpn_responder = responder
        async with tls_client(run.port, cafile, context=context) as tls:
            pin = pin_of(tls)
        line = await conn_log.one()
    assert responder.asked == ([PLAIN_SNI] if registered else [])
    if offers_acme and registered:
        leaf = x509.load_pem_x509_certificate(challenge.cert_chain_pems[0].bytes())
        assert pin == spki_pin_of_certificate(leaf) != old_key.pin
        assert (line["outcome"], line["detail"], line["key"]) == (
            "acme-challenge",
            "stand-in-answered",
            "-",
        )
    else:
        assert pin == old_key.pin
        assert (line["outcome"], line["key"]) == ("no-request", "k1")
    # A CA's validation is the responder's to log (once per challenge, named); its conn line
    # is at debug level, every other client's at info.
    [record] = [r for r in caplog.records if r.getMessage().startswith("conn ")]
    assert record.levelno == (logging.DEBUG if offers_acme and registered else logging.INFO)


# --- log lines cannot be forged ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("server_name", "alpn"),
    [
        ('evil"sni=x', ["http/1.1"]),  # printable, so our parser reads it as the SNI
        (PLAIN_SNI, ["h2 outcome=ok", "x\nconn peer=forged"]),
        ("evil host=x outcome=ok", ["http/1.1"]),  # unparsed: only the detail repeats it
    ],
    ids=["quote-and-equals-sni", "spaces-and-newline-alpn", "spaces-sni"],
)
async def test_client_text_is_escaped_in_the_log_line(
    old_key: KeyFiles,
    cafile: Path,
    tmp_path: Path,
    conn_log: ConnLog,
    server_name: str,
    alpn: list[str],
) -> None:
    context = client_context(cafile, check_hostname=False)
    context.set_alpn_protocols(alpn)
    async with serving(single_config(old_key, tmp_path)) as run:
        async with tls_client(run.port, cafile, server_name=server_name, context=context):
            pass
        await conn_log.wait(1)
    [raw] = conn_log.lines()
    line = parse_log_line(raw)  # one line, exactly the expected fields, in order
    assert "\n" not in raw
    assert line["outcome"] == "no-request"
    if " " in server_name:
        assert line["sni"] == "-"
        assert server_name in line["detail"]
    else:
        assert line["sni"] == server_name
        assert line["alpn"] == ",".join(alpn)


# --- the connection cap --------------------------------------------------------------------------


@pytest.mark.parametrize("max_connections", [2, 3])
async def test_connection_cap_holds_new_clients_in_the_backlog(
    old_key: KeyFiles,
    cafile: Path,
    tmp_path: Path,
    conn_log: ConnLog,
    max_connections: int,
) -> None:
    config = single_config(
        old_key, tmp_path, handshake_timeout=300, max_connections=max_connections
    )
    async with serving(config) as run:
        with trio.fail_after(CLIENT_TIMEOUT):
            idle = [await trio.open_tcp_stream("127.0.0.1", run.port) for _ in range(2)]
        await trio.testing.wait_all_tasks_blocked()  # both accepted, both waiting for a hello
        with trio.fail_after(CLIENT_TIMEOUT):
            transport = ShapedStream(await trio.open_tcp_stream("127.0.0.1", run.port), whole)
        tls = trio.SSLStream(transport, client_context(cafile), server_hostname=PLAIN_SNI)
        handshook = trio.Event()

        async def handshake() -> None:
            with trio.fail_after(CLIENT_TIMEOUT):
                await tls.do_handshake()
            handshook.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(handshake)
            # The hello is sent and the server has done all it will do for now.
            await trio.testing.wait_all_tasks_blocked()
            if max_connections == 2:
                assert not handshook.is_set()
                assert transport.received == 0  # not even a ServerHello
                await idle[0].aclose()  # frees a slot
            with trio.fail_after(CLIENT_TIMEOUT):
                await handshook.wait()
        async with tls:
            response, _ = await exchange(tls, h11.Connection(h11.CLIENT), get(close=True))
            assert response.status_code == 200
        expected = [("no-hello", "0"), ("ok", "1")] if max_connections == 2 else [("ok", "1")]
        lines = await conn_log.wait(len(expected))
        for stream in idle:
            await stream.aclose()
    assert [(x["outcome"], x["requests"]) for x in lines] == expected


# --- keep-alive and the placeholder responder ----------------------------------------------------

PLACEHOLDER: Final = b"dualproxy: TLS terminated; no upstream is configured yet.\n"


async def test_several_requests_over_one_connection(
    old_key: KeyFiles, cafile: Path, tmp_path: Path, conn_log: ConnLog
) -> None:
    requests = [
        get("/a"),
        h11.Request(method="HEAD", target="/b", headers=[("host", PLAIN_SNI)]),
        h11.Request(
            method="POST", target="/c", headers=[("host", PLAIN_SNI), ("content-length", "0")]
        ),
        get("/d", close=True),
    ]
    async with serving(single_config(old_key, tmp_path)) as run:
        async with tls_client(run.port, cafile) as tls:
            conn = h11.Connection(h11.CLIENT)
            for request in requests:
                response, body = await exchange(tls, conn, request)
                assert response.status_code == 200
                # HEAD: the length a GET would get, and no body.
                assert dict(response.headers)[b"content-length"] == str(len(PLACEHOLDER)).encode()
                assert body == (b"" if request.method == b"HEAD" else PLACEHOLDER)
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
            assert conn.their_state is h11.MUST_CLOSE
            assert await read_to_eof(tls) == b""
        line = await conn_log.one()
    assert (line["outcome"], line["requests"]) == ("ok", "4")


async def test_pipelined_requests_are_answered_in_order(
    old_key: KeyFiles, cafile: Path, tmp_path: Path, conn_log: ConnLog
) -> None:
    one = b"GET /1 HTTP/1.1\r\nHost: api.example.com\r\n\r\n"
    last = b"GET /2 HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n"
    async with serving(single_config(old_key, tmp_path)) as run:
        async with tls_client(run.port, cafile) as tls:
            await tls.send_all(one + last)  # one write, two requests
            answer = await read_to_eof(tls)
        line = await conn_log.one()
    assert answer.count(b"HTTP/1.1 200 ") == 2
    assert (line["outcome"], line["requests"]) == ("ok", "2")


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(b"NOT A REQUEST\r\n\r\n", id="bad-request-line"),
        pytest.param(b"GET / HTTP/1.1\r\nHost api.example.com\r\n\r\n", id="bad-header-line"),
        pytest.param(b"GET / HTTP/1.1\r\n\r\n", id="no-host"),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: api.example.com\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            id="bad-chunk-after-a-good-head",
        ),
        pytest.param(
            b"GET / HTTP/1.1\r\nHost: api.example.com\r\nX-Big: "
            # h11 checks its cap only while the head is incomplete, after each TLS record.
            + b"a" * (2 * placeholder.MAX_REQUEST_HEAD_BYTES)
            + b"\r\n\r\n",
            id="head-too-large",
        ),
    ],
)
@pytest.mark.parametrize("after_a_good_one", [False, True], ids=["first", "second"])
async def test_malformed_request_gets_400_and_a_close(
    old_key: KeyFiles,
    cafile: Path,
    tmp_path: Path,
    conn_log: ConnLog,
    request_bytes: bytes,
    after_a_good_one: bool,
) -> None:
    async with serving(single_config(old_key, tmp_path)) as run:
        async with tls_client(run.port, cafile) as tls:
            if after_a_good_one:
                response, _ = await exchange(tls, h11.Connection(h11.CLIENT), get())
                assert response.status_code == 200
            await tls.send_all(request_bytes)
            answer, clean = await read_until_closed(tls)
        line = await conn_log.one()
    # With request bytes still unread, the second SSL_shutdown of Python's unwrap() reads
    # them and fails (APPLICATION_DATA_AFTER_CLOSE_NOTIFY), and trio drops our close_notify
    # with it; the response is complete all the same (it has a Content-Length).
    assert clean or len(request_bytes) > placeholder.MAX_REQUEST_HEAD_BYTES
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert b"\r\nconnection: close\r\n" in answer.lower()
    assert answer.endswith(b"\r\n\r\nbad request\n")
    good = int(after_a_good_one)
    assert (line["outcome"], line["requests"]) == (("ok" if good else "no-request"), str(good))


class RecordedStream:
    """Stands in for the TLS stream: hands out `incoming`, then the end; records each
    send_all."""

    def __init__(self, incoming: bytes) -> None:
        self.incoming = [incoming]
        self.sends: list[bytes] = []

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        return self.incoming.pop(0) if self.incoming else b""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        self.sends.append(bytes(data))


@pytest.mark.parametrize("method", [b"GET", b"HEAD"])
async def test_a_placeholder_response_is_one_send(method: bytes) -> None:
    """Head, body and end of message go out in one TLS record and one send(2); a HEAD gets
    the GET's head without the body."""
    headers = [("host", "x"), ("connection", "close")]
    stream = RecordedStream(method + b" / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    record = ConnectionRecord(peer="-")
    linger = await placeholder.respond(
        stream,  # type: ignore[arg-type]
        record,
        limits=Limits(),
        drain=Drain(),
        local=lambda: None,
    )
    assert not linger
    assert record.requests == 1
    [sent] = stream.sends
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method=method, target="/", headers=headers))
    client.send(h11.EndOfMessage())
    client.receive_data(sent)
    response = client.next_event()
    assert isinstance(response, h11.Response)
    assert response.status_code == 200
    assert (b"connection", b"close") in response.headers
    received = b""
    while not isinstance(event := client.next_event(), h11.EndOfMessage):
        assert isinstance(event, h11.Data)
        received += event.data
    if method == b"HEAD":
        assert received == b""
    else:
        assert received.startswith(b"dualproxy: TLS terminated")
        assert (b"content-length", str(len(received)).encode()) in response.headers


# --- the lingering close (end to end after refusals: test_relay.py) ----------------------------


@dataclass
class LingerPair:
    """A handshaken TLS connection over a socket pair: the server's end as
    `handle_connection` has it, and a client."""

    tls: TlsStream
    socket_stream: TcpStream
    raw: socket.socket  # the server's socket, for synchronous looks into its buffer
    client: trio.SSLStream[trio.SocketStream]

    def unread(self) -> bytes | None:
        """What waits in our receive buffer: b"" after the client's close, None for nothing."""
        try:
            return self.raw.recv(1 << 20, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None


@pytest.fixture
async def linger_pair(ca: trustme.CA) -> AsyncIterator[LingerPair]:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(PLAIN_SNI).configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    raw, raw_client = socket.socketpair()
    theirs = trio.socket.from_stdlib_socket(raw_client)
    socket_stream = TcpStream(raw)
    tls = TlsStream(socket_stream, server_context, server_side=True)
    client = trio.SSLStream(trio.SocketStream(theirs), client_context, server_hostname=PLAIN_SNI)
    with trio.fail_after(CLIENT_TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tls.do_handshake)
            nursery.start_soon(client.do_handshake)
    try:
        yield LingerPair(tls, socket_stream, raw, client)
    finally:
        socket_stream.close()
        theirs.close()


async def test_lingering_close_ends_our_side_and_reads_until_the_client_closes(
    linger_pair: LingerPair,
) -> None:
    pair = linger_pair
    with trio.fail_after(CLIENT_TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lingering_close, pair.tls, pair.socket_stream)
            await pair.client.send_all(b"body bytes still coming" * 1000)
            assert await pair.client.receive_some() == b""  # close_notify
            # Then the end of the stream, from our SHUT_WR: the socket itself is still open.
            assert await pair.client.transport_stream.receive_some() == b""
            await pair.client.send_all(b"and more")  # TLS 1.3: our close ends our side only
            await pair.client.transport_stream.aclose()
    assert pair.unread() == b""  # everything read, up to the close


async def test_lingering_close_gives_up_on_a_quiet_client(
    linger_pair: LingerPair, mock_clock: trio.testing.MockClock
) -> None:
    """The client reads our end and keeps the connection open: LINGER_TIMEOUT ends the wait."""
    pair = linger_pair
    with trio.fail_after(LINGER_TIME / 2):  # on the mock clock: not a real wait
        await lingering_close(pair.tls, pair.socket_stream)
        assert await pair.client.receive_some() == b""


async def test_lingering_close_stops_reading_at_its_byte_limit(
    linger_pair: LingerPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(closing, "LINGER_MAX_BYTES", 64 * 1024)
    pair = linger_pair
    with trio.fail_after(CLIENT_TIMEOUT):
        async with trio.open_nursery() as nursery:

            async def send_until_refused() -> None:
                with contextlib.suppress(trio.BrokenResourceError):
                    for _ in range(64):  # bounded: 4 MiB, more than the socket pair buffers
                        await pair.client.send_all(b"x" * (64 * 1024))

            nursery.start_soon(send_until_refused)
            await lingering_close(pair.tls, pair.socket_stream)
            # The client never closed: what it sent past the limit is still unread.
            assert pair.unread()
            pair.socket_stream.close()  # as _connection_task does; the sender stops


# --- shutdown and crashes ------------------------------------------------------------------------


async def test_connections_open_at_shutdown_are_logged(
    old_key: KeyFiles, cafile: Path, tmp_path: Path, conn_log: ConnLog
) -> None:
    async with AsyncExitStack() as clients:  # the clients outlive the server
        async with serving(single_config(old_key, tmp_path)) as run:
            with trio.fail_after(CLIENT_TIMEOUT):
                await clients.enter_async_context(await trio.open_tcp_stream("127.0.0.1", run.port))
            tls = await clients.enter_async_context(tls_client(run.port, cafile))
            response, _ = await exchange(tls, h11.Connection(h11.CLIENT), get())
            assert response.status_code == 200
            await trio.testing.wait_all_tasks_blocked()
            assert conn_log.lines() == []  # both still open
        lines = [parse_log_line(line) for line in conn_log.lines()]
    assert sorted((x["outcome"], x["requests"]) for x in lines) == [
        ("shutdown", "0"),
        ("shutdown", "1"),
    ]


async def test_a_bug_costs_one_connection_not_the_server(
    old_key: KeyFiles,
    cafile: Path,
    tmp_path: Path,
    conn_log: ConnLog,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with serving(single_config(old_key, tmp_path)) as run:
        respond = run.server.respond
        calls = 0

        async def first_call_fails(tls: TlsStream, record: Any) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("a bug")
            await respond(tls, record)

        monkeypatch.setattr(run.server, "respond", first_call_fails)
        async with tls_client(run.port, cafile) as tls:
            answer, _ = await read_until_closed(tls)
            assert answer == b""  # no response, only the close
        async with tls_client(run.port, cafile) as tls:  # the server is still serving
            response, _ = await exchange(tls, h11.Connection(h11.CLIENT), get())
            assert response.status_code == 200
        lines = await conn_log.wait(2)
    assert [x["outcome"] for x in lines] == ["internal-error", "ok"]
    [failure] = [r for r in conn_log.caplog.records if r.levelno == logging.ERROR]
    assert failure.exc_info is not None
    assert str(failure.exc_info[1]) == "a bug"


async def test_a_reload_during_a_handshake_does_not_mix_configs(
    old_key: KeyFiles, new_key: KeyFiles, cafile: Path, tmp_path: Path, conn_log: ConnLog
) -> None:
    """A connection uses the config and keys current when it was accepted, together."""
    rotating = rotating_config(old_key, new_key, tmp_path)
    hello = python_hello(HINTED_SNI)
    async with serving(single_config(old_key, tmp_path), clock=Clock(NOW)) as run:
        with trio.fail_after(CLIENT_TIMEOUT):
            stream = await trio.open_tcp_stream("127.0.0.1", run.port)
        async with stream:
            await stream.send_all(hello[:10])
            await trio.testing.wait_all_tasks_blocked()
            # A reload (config and keys swapped at once) between two reads of this peek.
            assert await run.server.apply(rotating, "test")
            await stream.send_all(hello[10:])
            with trio.fail_after(CLIENT_TIMEOUT):
                answer = await stream.receive_some()
            assert answer[:1] == bytes([HANDSHAKE])  # a ServerHello; then we leave
        async with tls_client(run.port, cafile, server_name=HINTED_SNI) as tls:
            assert pin_of(tls) == new_key.pin  # the next connection gets the new config
        lines = await conn_log.wait(2)
    assert [(x["identity"], x["key"], x["outcome"]) for x in lines] == [
        ("single", "k1", "client-aborted"),
        ("new", "k2", "no-request"),
    ]


# --- the policy's clock ----------------------------------------------------------------------


def test_the_wall_clock_reading_is_reused_for_a_moment_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The policy's default clock reads the wall clock once per CLOCK_REUSE_SECONDS."""
    monotonic = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: monotonic[0])
    clock = ReusedUtcNow()
    first = clock()
    assert abs((first - datetime.now(UTC)).total_seconds()) < 5
    monotonic[0] += CLOCK_REUSE_SECONDS / 2
    assert clock() is first
    monotonic[0] += CLOCK_REUSE_SECONDS
    assert clock() is not first
