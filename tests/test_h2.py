"""HTTP/2 to clients end to end: real clients (h2 driven raw, curl --http2, httpx) through the
proxy to the HTTP/1.1 test upstream, on loopback.

Every refusal asserts what the client saw and that the upstream received nothing; every
abuse asserts the GOAWAY, and that a well-behaved connection beside it kept working.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import h2.errors
import httpx
import pytest
import trio
import trustme
from helpers.clients import CLIENT_TIMEOUT
from helpers.configs import make_config
from helpers.h2client import SNI, H2Client, h2_client
from helpers.keys import KeyFiles, make_key
from helpers.logs import ConnLog
from helpers.serving import serving
from helpers.upstream_server import (
    Behaviour,
    UpstreamServer,
    closed_port,
    in_turn,
    pattern_bytes,
    serve_upstream,
)
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from dualproxy.http import h2limits
from dualproxy.serve.server import Server

ENHANCE_YOUR_CALM: Final = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
PROTOCOL_ERROR: Final = h2.errors.ErrorCodes.PROTOCOL_ERROR
NO_ERROR: Final = h2.errors.ErrorCodes.NO_ERROR


@pytest.fixture
def key(ca: trustme.CA, tmp_path: Path) -> KeyFiles:
    return make_key(ca, tmp_path, "k1")


@pytest.fixture
async def upstream(tmp_path: Path) -> AsyncIterator[UpstreamServer]:
    async with serve_upstream(UpstreamServer.https(tmp_path)) as server:
        yield server


@dataclass
class Proxy:
    server: Server
    port: int
    cafile: Path

    @asynccontextmanager
    async def client(self, **kwargs: Any) -> AsyncIterator[H2Client]:
        async with h2_client(self.port, self.cafile, **kwargs) as client:
            yield client


@asynccontextmanager
async def proxy(
    key: KeyFiles,
    cafile: Path,
    tmp_path: Path,
    upstream: UpstreamServer | dict[str, Any] | None,
    *,
    dev_headers: bool = False,
    **limits: float,
) -> AsyncIterator[Proxy]:
    extra: dict[str, Any] = {}
    if upstream is not None:
        extra["upstream"] = upstream if isinstance(upstream, dict) else upstream.config_table()
    if limits:
        extra["limits"] = limits
    config = make_config([key], base_dir=tmp_path, extra=extra)
    async with serving(config, dev_headers=dev_headers) as run:
        yield Proxy(run.server, run.port, cafile)


def echo(body: bytes | bytearray) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(bytes(body))
    return data


async def well_behaved(other: H2Client) -> None:
    """A second connection, opened before the first misbehaved and open all along, still gets
    its answer."""
    reply = await other.request("GET", "/still-fine")
    assert reply.status == 200
    assert echo(reply.body)["target"] == "/still-fine"


async def calmed(proxied: Proxy, abuse: Callable[[H2Client], Awaitable[None]]) -> None:
    """`abuse` on one connection ends it with GOAWAY ENHANCE_YOUR_CALM, and a second
    connection, open all along, still gets its answer (well_behaved)."""
    async with proxied.client() as bystander:
        async with proxied.client() as client:
            await abuse(client)
            await client.until_closed()
        assert client.goaway is not None
        assert client.goaway.error_code == ENHANCE_YOUR_CALM
        await well_behaved(bystander)


# --- the happy path ------------------------------------------------------------------------


async def test_streams_are_relayed_with_the_headers_rewritten_as_for_http1(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    async with proxy(key, cafile, tmp_path, upstream) as p, p.client() as client:
        get = await client.request(
            "GET",
            "/items?id=1",
            headers=[("x-forwarded-for", "6.6.6.6"), ("cookie", "a=1"), ("cookie", "b=2")],
        )
        post = await client.request("POST", "/items", body=b'{"name": "x"}')
        head = await client.request("HEAD", "/items")
    assert get.status == post.status == head.status == 200
    got = echo(get.body)
    assert (got["method"], got["target"], got["http_version"]) == ("GET", "/items?id=1", "1.1")
    sent = {name.lower(): value for name, value in got["headers"]}
    # The upstream's Host, our forwarding headers (the client's claim dropped), cookies joined.
    assert sent["host"] == upstream.config_table()["url"].split("//")[1]
    assert sent["x-forwarded-for"] == "127.0.0.1"
    assert sent["x-forwarded-host"] == SNI
    assert sent["cookie"] == "a=1; b=2"
    # A body that came whole goes with its Content-Length, not chunked.
    posted = echo(post.body)
    assert posted["body_sha256"] == hashlib.sha256(b'{"name": "x"}').hexdigest()
    assert {n.lower(): v for n, v in posted["headers"]}["content-length"] == "13"
    # HEAD: the length a GET would get, no body; no hop-by-hop field reaches an HTTP/2 client.
    assert head.body == b""
    assert int(head.header(b"content-length")[0]) > 0
    for reply in (get, post, head):
        assert not {b"connection", b"transfer-encoding", b"keep-alive"} & {
            n for n, _ in reply.headers
        }
    # One connection, one upstream connection: the streams used the pool like requests do.
    assert upstream.accepted == 1


async def test_concurrent_streams_share_one_connection(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    async with proxy(key, cafile, tmp_path, upstream) as p, p.client() as client:
        ids = [client.start_request("GET", f"/n/{n}") for n in range(20)]
        await client.flush()
        replies = [await client.reply(stream_id) for stream_id in ids]
    assert [echo(r.body)["target"] for r in replies] == [f"/n/{n}" for n in range(20)]


async def test_streams_are_counted_per_key_and_reason_as_requests_are(
    key: KeyFiles,
    cafile: Path,
    tmp_path: Path,
    upstream: UpstreamServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The connection's record and the evidence count HTTP/2 streams as HTTP/1.1 requests:
    per key and reason, by status class; a stream refused for its fields counts as its 4xx
    response, not as a request (as a request head that fails its checks)."""
    log = ConnLog(caplog)
    with caplog.at_level(logging.INFO, logger="dualproxy"):
        async with proxy(key, cafile, tmp_path, upstream) as p:
            async with p.client(validate=False) as client:
                for n in range(3):
                    assert (await client.request("GET", f"/{n}")).status == 200
                refused = client.start_request(pseudo=REFUSED["connection"])
                await client.flush()
                assert (await client.reply(refused)).status == 400
            line = await log.one()
            counters = p.server.evidence.counters_for("k1", "single")
    assert (line["alpn"], line["key"], line["outcome"], line["requests"]) == (
        "h2",
        "k1",
        "ok",
        "3",
    )
    assert (counters.statuses[2], counters.statuses[4]) == (3, 1)


SIZE: Final = 8 * 1024 * 1024


async def test_eight_mib_each_way_arrives_intact(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    body = pattern_bytes(SIZE)
    upstream.large_body_size = SIZE
    upstream.behaviour = Behaviour.LARGE_BODY
    async with proxy(key, cafile, tmp_path, upstream) as p, p.client() as client:
        down = await client.request("GET", "/large")
        upstream.behaviour = Behaviour.ECHO
        up = await client.request("POST", "/upload", body=body)
    assert down.status == 200
    assert hashlib.sha256(down.body).hexdigest() == hashlib.sha256(pattern_bytes(SIZE)).hexdigest()
    assert up.status == 200
    assert echo(up.body)["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert echo(up.body)["body_length"] == SIZE


def run_curl(args: list[str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["curl", "--silent", "--show-error", "--max-time", str(CLIENT_TIMEOUT), *args],
        capture_output=True,
        timeout=CLIENT_TIMEOUT + 5,
        check=False,
    )


@pytest.mark.e2e
async def test_curl_negotiates_h2_and_moves_eight_mib_both_ways(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    upload = tmp_path / "upload.bin"
    upload.write_bytes(pattern_bytes(SIZE))
    async with proxy(key, cafile, tmp_path, upstream) as p:
        base = [
            "--http2",
            "--cacert",
            str(cafile),
            "--resolve",
            f"{SNI}:{p.port}:127.0.0.1",
            "--verbose",
        ]
        result = await trio.to_thread.run_sync(
            run_curl, [*base, "--data-binary", f"@{upload}", f"https://{SNI}:{p.port}/up"]
        )
        upstream.large_body_size = SIZE
        upstream.behaviour = Behaviour.LARGE_BODY
        down = await trio.to_thread.run_sync(
            run_curl,
            [*base, "--output", str(tmp_path / "down.bin"), f"https://{SNI}:{p.port}/down"],
        )
    assert result.returncode == 0, result.stderr
    assert b"ALPN: server accepted h2" in result.stderr
    assert echo(result.stdout)["body_sha256"] == hashlib.sha256(upload.read_bytes()).hexdigest()
    assert down.returncode == 0, down.stderr
    got = (tmp_path / "down.bin").read_bytes()
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(pattern_bytes(SIZE)).hexdigest()


H2LOAD_REQUESTS: Final = 200


@pytest.mark.e2e
async def test_h2load_through_dualproxy_gets_every_response(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    """nghttp2's load generator (what the benchmark drives): h2 negotiated, 4 connections of
    10 concurrent streams, every request answered by the upstream, none failed."""
    h2load = shutil.which("h2load")
    assert h2load is not None, "h2load is installed by scripts/test (nghttp2-client)"
    async with proxy(key, cafile, tmp_path, upstream) as p:
        command = [h2load, "-n", str(H2LOAD_REQUESTS), "-c", "4", "-m", "10"]
        result = await trio.to_thread.run_sync(
            lambda: subprocess.run(
                [*command, f"https://127.0.0.1:{p.port}/load"],
                capture_output=True,
                text=True,
                timeout=CLIENT_TIMEOUT * 3,
                check=False,
            )
        )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Application protocol: h2" in result.stdout
    total = H2LOAD_REQUESTS
    assert (
        f"requests: {total} total, {total} started, {total} done, {total} succeeded, 0 failed,"
        in result.stdout
    )
    assert "status codes: 200 2xx" in result.stdout
    assert len(upstream.requests) == H2LOAD_REQUESTS


@pytest.mark.e2e
async def test_curl_without_h2_still_gets_http1(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    async with proxy(key, cafile, tmp_path, upstream) as p:
        result = await trio.to_thread.run_sync(
            run_curl,
            [
                "--http1.1",
                "--cacert",
                str(cafile),
                "--resolve",
                f"{SNI}:{p.port}:127.0.0.1",
                "--verbose",
                f"https://{SNI}:{p.port}/one",
            ],
        )
    assert result.returncode == 0, result.stderr
    assert b"ALPN: server accepted http/1.1" in result.stderr
    assert echo(result.stdout)["target"] == "/one"


@pytest.mark.e2e
async def test_httpx_with_http2(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    async with proxy(key, cafile, tmp_path, upstream) as p:

        def fetch() -> tuple[str, int, dict[str, Any]]:
            context = ssl.create_default_context(cafile=str(cafile))
            with httpx.Client(http2=True, verify=context) as client:
                response = client.post(
                    f"https://127.0.0.1:{p.port}/x",
                    content=b"hello",
                    headers={"host": SNI},
                    extensions={"sni_hostname": SNI},
                )
                return response.http_version, response.status_code, response.json()

        version, status, got = await trio.to_thread.run_sync(fetch)
    assert (version, status) == ("HTTP/2", 200)
    assert got["body_sha256"] == hashlib.sha256(b"hello").hexdigest()


async def test_without_upstream_the_placeholder_answers_streams(
    key: KeyFiles, cafile: Path, tmp_path: Path
) -> None:
    async with proxy(key, cafile, tmp_path, None) as p, p.client() as client:
        reply = await client.request("GET", "/")
    assert reply.status == 200
    assert b"no upstream is configured" in reply.body


# --- failures: generic bodies, cuts ----------------------------------------------------------


@pytest.mark.parametrize("dev_headers", [False, True])
async def test_a_502_body_names_the_upstream_only_in_dev_mode(
    key: KeyFiles, cafile: Path, tmp_path: Path, dev_headers: bool
) -> None:
    with closed_port() as port:
        table = {"url": f"http://127.0.0.1:{port}"}
        async with (
            proxy(key, cafile, tmp_path, table, dev_headers=dev_headers) as p,
            p.client() as client,
        ):
            reply = await client.request("GET", "/")
    assert reply.status == 502
    if dev_headers:
        assert b"127.0.0.1" in reply.body
    else:
        assert bytes(reply.body) == b"502 Bad Gateway\n"


async def test_an_upstream_that_fails_mid_body_resets_the_stream(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    upstream.behaviour = Behaviour.RESET_MID_RESPONSE
    async with proxy(key, cafile, tmp_path, upstream) as p, p.client() as client:
        reply = await client.request("GET", "/")
        assert reply.status == 200
        assert reply.reset == h2.errors.ErrorCodes.INTERNAL_ERROR
        upstream.behaviour = Behaviour.ECHO
        again = await client.request("GET", "/after")  # the connection goes on
    assert again.status == 200


async def test_an_upstream_that_sends_no_head_gets_504_on_the_stream(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    upstream.behaviour = in_turn(Behaviour.HANG_BEFORE_HEAD, Behaviour.ECHO)
    upstream.hang = 30
    async with (
        proxy(key, cafile, tmp_path, upstream, upstream_timeout=0.5) as p,
        p.client() as client,
    ):
        reply = await client.request("GET", "/")
        again = await client.request("GET", "/after")  # the connection goes on
    assert reply.status == 504
    assert bytes(reply.body) == b"504 Gateway Timeout\n"
    assert again.status == 200
    assert upstream.accepted == 2  # the hung upstream connection was not pooled


async def test_an_upstream_that_stalls_mid_body_resets_the_stream(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    upstream.behaviour = in_turn(Behaviour.HANG_MID_BODY, Behaviour.ECHO)
    upstream.hang = 30
    async with (
        proxy(key, cafile, tmp_path, upstream, upstream_timeout=0.5) as p,
        p.client() as client,
    ):
        reply = await client.request("GET", "/")
        again = await client.request("GET", "/after")
    assert reply.status == 200
    assert reply.reset == h2.errors.ErrorCodes.INTERNAL_ERROR
    assert again.status == 200


# --- the refusal table: 400 on the stream, nothing upstream ----------------------------------

BASE: Final = [(":method", "GET"), (":scheme", "https"), (":authority", SNI), (":path", "/")]

REFUSED: Final = {
    "connection": [*BASE, ("connection", "keep-alive")],
    "keep-alive": [*BASE, ("keep-alive", "5")],
    "proxy-connection": [*BASE, ("proxy-connection", "close")],
    "transfer-encoding": [*BASE, ("transfer-encoding", "chunked")],
    "upgrade": [*BASE, ("upgrade", "websocket")],
    "te gzip": [*BASE, ("te", "gzip")],
    "uppercase": [*BASE, ("X-Token", "1")],
    "underscore": [*BASE, ("x_token", "1")],
    "cr in value": [*BASE, ("x-a", "1\r2")],
    "lf in value": [*BASE, ("x-a", "1\n2")],
    "nul in value": [*BASE, ("x-a", "1\x002")],
    "space around value": [*BASE, ("x-a", " 1")],
    "no :path": BASE[:3],
    "no :method": BASE[1:],
    "twice :path": [*BASE, (":path", "/b")],
    "pseudo after field": [*BASE[:3], ("x-a", "1"), (":path", "/")],
    ":protocol": [*BASE, (":protocol", "websocket")],
    "authority and host disagree": [*BASE, ("host", "evil.example")],
    "no authority": [BASE[0], BASE[1], BASE[3]],
    "two content-lengths": [*BASE, ("content-length", "0"), ("content-length", "0")],
    "fragment": [*BASE[:3], (":path", "/a#b")],
}


@pytest.mark.parametrize("name", sorted(REFUSED))
async def test_malformed_requests_get_400_and_nothing_goes_upstream(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer, name: str
) -> None:
    async with proxy(key, cafile, tmp_path, upstream) as p, p.client() as bystander:
        async with p.client(validate=False) as client:
            stream_id = client.start_request(pseudo=REFUSED[name])
            await client.flush()
            reply = await client.reply(stream_id)
            assert reply.status == 400, (reply, bytes(reply.body))
            # The stream failed, the connection did not.
            fine = await client.request("GET", "/next")
            assert fine.status == 200
        await well_behaved(bystander)
    assert [r.target for r in upstream.requests] == [b"/next", b"/still-fine"]


ACCEPTED: Final = {
    "te trailers": [*BASE, ("te", "trailers")],
    "authority and host agree": [*BASE, ("host", SNI.upper())],
    "host alone": [BASE[0], BASE[1], BASE[3], ("host", SNI)],
    "options *": [(":method", "OPTIONS"), BASE[1], BASE[2], (":path", "*")],
}


@pytest.mark.parametrize("name", sorted(ACCEPTED))
async def test_the_accepted_twins_reach_the_upstream(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer, name: str
) -> None:
    async with proxy(key, cafile, tmp_path, upstream) as p, p.client(validate=False) as client:
        stream_id = client.start_request(pseudo=ACCEPTED[name])
        await client.flush()
        reply = await client.reply(stream_id)
    assert reply.status == 200
    assert len(upstream.requests) == 1
    assert "te" not in {n.lower() for n, _ in echo(reply.body)["headers"]}


async def test_connect_and_trace_get_405(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    async with proxy(key, cafile, tmp_path, upstream) as p, p.client(validate=False) as client:
        trace = await client.request("TRACE", "/")
        stream_id = client.start_request(pseudo=[(":method", "CONNECT"), (":authority", SNI)])
        await client.flush()
        connect = await client.reply(stream_id)
    assert trace.status == connect.status == 405
    assert upstream.received == b""


async def test_data_beyond_content_length_ends_the_connection_and_nothing_goes_upstream(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    async with proxy(key, cafile, tmp_path, upstream) as p, p.client() as bystander:
        async with p.client(validate=False) as client:
            stream_id = client.start_request(
                "POST", "/", headers=[("content-length", "3")], end=False
            )
            client.conn.send_data(stream_id, b"12345", end_stream=True)
            await client.flush()
            await client.until_closed()
        assert client.goaway is not None
        assert client.goaway.error_code == PROTOCOL_ERROR
        await well_behaved(bystander)
    assert [r.target for r in upstream.requests] == [b"/still-fine"]


async def test_a_body_that_matches_its_content_length_goes_upstream(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    async with proxy(key, cafile, tmp_path, upstream) as p, p.client() as client:
        reply = await client.request("POST", "/", headers=[("content-length", "5")], body=b"12345")
    assert reply.status == 200
    assert echo(reply.body)["body_length"] == 5


async def test_a_stalled_body_gets_408(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    async with proxy(key, cafile, tmp_path, upstream, body_timeout=0.5) as p, p.client() as client:
        stream_id = client.start_request("POST", "/", end=False)
        client.conn.send_data(stream_id, b"part")
        await client.flush()
        reply = await client.reply(stream_id)
    assert reply.status == 408


async def test_expect_100_continue_is_answered_before_the_body(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    async with proxy(key, cafile, tmp_path, upstream) as p, p.client() as client:
        stream_id = client.start_request(
            "PUT", "/", headers=[("expect", "100-continue")], end=False
        )
        await client.flush()
        with trio.fail_after(CLIENT_TIMEOUT):
            while not client.replies[stream_id].informational:
                await client.receive()
        await client.send_body(stream_id, b"body")
        reply = await client.reply(stream_id)
    assert reply.informational == [100]
    assert reply.status == 200
    assert "expect" not in {n.lower() for n, _ in echo(reply.body)["headers"]}


# --- abuse: each ends its connection, not the others ----------------------------------------


async def test_rapid_reset_is_stopped_with_enhance_your_calm(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    upstream.behaviour = Behaviour.HANG_BEFORE_HEAD
    async with proxy(key, cafile, tmp_path, upstream) as p, p.client() as bystander:
        async with p.client() as client:
            for _ in range(h2limits.RESET_BURST * 3):  # bounded: past the burst
                stream_id = client.start_request("GET", "/")
                client.conn.reset_stream(stream_id)
                if client.closed:
                    break
                await client.flush()
            await client.until_closed()
        assert client.goaway is not None
        assert client.goaway.error_code == ENHANCE_YOUR_CALM
        upstream.behaviour = Behaviour.ECHO
        await well_behaved(bystander)


async def test_a_few_resets_are_tolerated(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    async with proxy(key, cafile, tmp_path, upstream) as p, p.client() as client:
        for _ in range(10):
            client.conn.reset_stream(client.start_request("GET", "/"))
        await client.flush()
        reply = await client.request("GET", "/after")
    assert reply.status == 200
    assert client.goaway is None


def frames(*items: Any) -> bytes:
    return b"".join(item.serialize() for item in items)


async def test_continuation_flood_ends_the_connection(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    async with proxy(key, cafile, tmp_path, upstream) as p, p.client() as bystander:
        async with p.client() as client:
            headers = HeadersFrame(1)
            headers.data = client.conn.encoder.encode(BASE)
            flood = [ContinuationFrame(1, data=b"") for _ in range(200)]  # h2 allows 64
            await client.send_raw(frames(headers, *flood))
            await client.until_closed()
        assert client.goaway is not None
        assert client.goaway.error_code == PROTOCOL_ERROR
        await well_behaved(bystander)
    assert [r.target for r in upstream.requests] == [b"/still-fine"]


async def test_hpack_bomb_is_refused_while_decoding(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    async with proxy(key, cafile, tmp_path, upstream) as p, p.client() as bystander:
        async with p.client() as client:
            # One 4000-byte field into the dynamic table, then referenced again and again: a
            # few bytes on the wire, far past the header list size once decoded.
            block = client.conn.encoder.encode([*BASE, ("x-big", "a" * 4000)])
            index = bytes([0x80 | 62])  # the newest dynamic entry
            headers = HeadersFrame(3, flags=["END_STREAM", "END_HEADERS"])
            headers.data = client.conn.encoder.encode(BASE) + index * 100
            first = HeadersFrame(1, flags=["END_STREAM", "END_HEADERS"])
            first.data = block
            await client.send_raw(frames(first, headers))
            await client.until_closed()
        assert client.goaway is not None
        assert client.goaway.error_code in (ENHANCE_YOUR_CALM, PROTOCOL_ERROR)
        await well_behaved(bystander)


async def test_a_header_list_within_the_limit_passes(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    async with proxy(key, cafile, tmp_path, upstream) as p, p.client() as client:
        reply = await client.request("GET", "/", headers=[("x-big", "a" * 4000)])
    assert reply.status == 200


@pytest.mark.parametrize(
    "flood",
    [
        pytest.param(lambda: PingFrame(0, opaque_data=b"12345678"), id="ping"),
        pytest.param(lambda: SettingsFrame(0), id="settings"),
    ],
)
async def test_control_frames_unread_end_the_connection(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer, flood: Any
) -> None:
    async def abuse(client: H2Client) -> None:
        # Sent at once, more than we answer while our output does not drain.
        await client.send_raw(
            frames(*[flood() for _ in range(h2limits.MAX_OWED_CONTROL_FRAMES + 100)])
        )

    async with proxy(key, cafile, tmp_path, upstream) as p:
        await calmed(p, abuse)


async def test_pings_that_are_read_are_answered(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    async with proxy(key, cafile, tmp_path, upstream) as p, p.client() as client:
        for _ in range(20):
            client.conn.ping(b"12345678")
            await client.flush()
            await client.receive()
        reply = await client.request("GET", "/")
    assert reply.status == 200
    assert client.pings_acked >= 1
    assert client.goaway is None


async def test_empty_data_frames_end_the_connection(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    async def abuse(client: H2Client) -> None:
        stream_id = client.start_request("POST", "/", end=False)
        await client.flush()
        await client.send_raw(frames(*[DataFrame(stream_id, data=b"") for _ in range(10)]))

    async with proxy(key, cafile, tmp_path, upstream) as p:
        await calmed(p, abuse)


async def test_priority_flood_ends_the_connection(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    async def abuse(client: H2Client) -> None:
        count = h2limits.PRIORITY_FRAMES_PER_STREAM * 2 + 10
        await client.send_raw(
            frames(*[PriorityFrame(1 + 2 * n, depends_on=0) for n in range(count)])
        )

    async with proxy(key, cafile, tmp_path, upstream) as p:
        await calmed(p, abuse)


async def test_window_update_trickle_ends_the_connection(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    async def abuse(client: H2Client) -> None:
        count = h2limits.WINDOW_UPDATES_PER_DATA_FRAME * 2 + 10
        await client.send_raw(
            frames(*[WindowUpdateFrame(0, window_increment=1) for _ in range(count)])
        )

    async with proxy(key, cafile, tmp_path, upstream) as p:
        await calmed(p, abuse)


async def test_streams_beyond_the_advertised_limit_end_the_connection(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    upstream.behaviour = Behaviour.HANG_BEFORE_HEAD
    async with (
        proxy(key, cafile, tmp_path, upstream, h2_max_concurrent_streams=2) as p,
        p.client() as bystander,
    ):
        async with p.client() as client:
            for n in range(3):
                client.start_request("GET", f"/{n}")
            await client.flush()
            await client.until_closed()
        assert client.goaway is not None
        assert client.goaway.error_code == PROTOCOL_ERROR
        assert client.conn.remote_settings.max_concurrent_streams == 2
        upstream.behaviour = Behaviour.ECHO
        await well_behaved(bystander)
    assert [r.target for r in upstream.requests] == [b"/still-fine"]


async def test_streams_up_to_the_limit_run_at_once(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    upstream.behaviour = Behaviour.HANG_BEFORE_HEAD
    upstream.hang = 0.5
    async with (
        proxy(key, cafile, tmp_path, upstream, h2_max_concurrent_streams=2) as p,
        p.client() as client,
    ):
        ids = [client.start_request("GET", f"/{n}") for n in range(2)]
        await client.flush()
        replies = [await client.reply(stream_id) for stream_id in ids]
    assert [r.status for r in replies] == [200, 200]


async def test_a_client_that_does_not_read_its_stream_stalls_only_that_stream(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    upstream.large_body_size = 1024 * 1024
    upstream.behaviour = Behaviour.LARGE_BODY
    async with proxy(key, cafile, tmp_path, upstream, send_timeout=1) as p, p.client() as bystander:
        # A stream window of 0: the response cannot move; it is cut after send_timeout.
        async with p.client(initial_window_size=0) as client:
            stalled = client.start_request("GET", "/big")
            await client.flush()
            upstream.behaviour = Behaviour.ECHO
            client.conn.increment_flow_control_window(1 << 20)  # the connection's window
            await client.flush()
            reply = await client.reply(stalled)
            assert reply.reset == h2.errors.ErrorCodes.CANCEL
        await well_behaved(bystander)


async def test_an_idle_connection_gets_goaway_then_closes(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    async with (
        proxy(key, cafile, tmp_path, upstream, keepalive_timeout=0.5) as p,
        p.client() as client,
    ):
        assert (await client.request("GET", "/")).status == 200
        await client.until_closed()
    assert client.goaway is not None
    assert client.goaway.error_code == NO_ERROR


async def test_at_the_connection_limit_idle_connections_are_reclaimed_with_goaway(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    """A new client at limits.max_connections takes the slot of an idle HTTP/2 connection
    (GOAWAY NO_ERROR, then closed), never that of one with a stream in flight: that one's
    stream finishes, and only then is the connection reclaimed."""
    upstream.behaviour = Behaviour.HANG_BEFORE_HEAD
    upstream.hang = 1.0
    async with (
        proxy(
            key,
            cafile,
            tmp_path,
            upstream,
            max_connections=2,
            keepalive_timeout=3600,
            request_header_timeout=300,
        ) as p,
        p.client() as idle,
        p.client() as busy,
    ):
        upstream.behaviour = Behaviour.ECHO
        assert (await idle.request("GET", "/idle")).status == 200
        upstream.behaviour = Behaviour.HANG_BEFORE_HEAD
        in_flight = busy.start_request("GET", "/busy")
        await busy.flush()
        with trio.fail_after(CLIENT_TIMEOUT):
            while len(upstream.requests) < 2:
                await trio.sleep(0.01)
        upstream.behaviour = Behaviour.ECHO
        async with p.client() as newcomer:  # admitted once a slot frees
            await idle.until_closed()
            reply = await busy.reply(in_flight)
            assert (await newcomer.request("GET", "/new")).status == 200
    assert idle.goaway is not None
    assert idle.goaway.error_code == NO_ERROR
    assert reply.status == 200
    assert echo(reply.body)["target"] == "/busy"


async def test_the_drain_says_goaway_and_lets_streams_in_flight_finish(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    upstream.behaviour = Behaviour.HANG_BEFORE_HEAD
    upstream.hang = 1.0
    async with proxy(key, cafile, tmp_path, upstream) as p, p.client() as client:
        in_flight = client.start_request("GET", "/in-flight")
        await client.flush()
        with trio.fail_after(CLIENT_TIMEOUT):
            while not upstream.requests:
                await trio.sleep(0.01)
        p.server.drain()
        reply = await client.reply(in_flight)
        await client.until_closed()
    assert client.goaway is not None
    assert client.goaway.error_code == NO_ERROR
    assert client.goaway.last_stream_id == in_flight
    assert reply.status == 200
    assert echo(reply.body)["target"] == "/in-flight"
