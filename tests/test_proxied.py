"""The PROXY protocol on the TLS listener ([listen] proxy_protocol): the client's address from
a balancer's header reaches the policy, X-Forwarded-For and the log; a header that is
missing, malformed or from a peer not allowed to send one closes that connection only, before
anything reaches the upstream. Real TLS clients on loopback, headers written by
helpers.proxy_headers (independently of the parser)."""

from __future__ import annotations

import ipaddress
import json
import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import h11
import pytest
import trio
import trustme
from helpers.clients import CLIENT_TIMEOUT
from helpers.configs import make_config
from helpers.h11client import receive_response
from helpers.keys import KeyFiles, make_key
from helpers.logs import ConnLog
from helpers.proxy_headers import v1, v2
from helpers.rotation import Clock
from helpers.serving import Running, serving
from helpers.upstream_server import UpstreamServer, serve_upstream

from dualproxy.config.errors import OperatorError
from dualproxy.config.schema import Config
from dualproxy.tls.proxy_protocol import Expect, expectation

SNI: Final = "api.example.com"
NOW: Final = datetime(2026, 12, 10, tzinfo=UTC)
CLIENT: Final = "203.0.113.7"
CLIENT6: Final = "2001:db8::7"


@pytest.fixture
def keys(ca: trustme.CA, tmp_path: Path) -> tuple[KeyFiles, KeyFiles]:
    return make_key(ca, tmp_path, "k1"), make_key(ca, tmp_path, "k2")


@pytest.fixture
async def upstream(tmp_path: Path) -> AsyncIterator[UpstreamServer]:
    async with serve_upstream(UpstreamServer.https(tmp_path)) as server:
        yield server


@pytest.fixture
def conn_log(caplog: pytest.LogCaptureFixture) -> ConnLog:
    caplog.set_level(logging.INFO, logger="dualproxy")
    return ConnLog(caplog)


def proxied_config(
    keys: tuple[KeyFiles, KeyFiles],
    tmp_path: Path,
    upstream: UpstreamServer,
    *,
    mode: str = "required",
    trusted: tuple[str, ...] = ("127.0.0.1/32",),
    **limits: float,
) -> Config:
    """k1 (old) and k2 (new) in their grace window; clients from 198.51.100.0/24 get k2 by the
    network hint, every other client k1."""
    rotation = {
        "old": "k1",
        "new": "k2",
        "grace_start": NOW - timedelta(days=1),
        "grace_end": NOW + timedelta(days=1),
        "hints": {"new": {"networks": ["198.51.100.0/24"]}},
    }
    listen: dict[str, Any] = {"address": "127.0.0.1:0"}
    if mode != "off":
        listen |= {"proxy_protocol": mode, "proxy_protocol_from": list(trusted)}
    extra: dict[str, Any] = {"upstream": upstream.config_table(), "listen": listen}
    if limits:
        extra["limits"] = limits
    return make_config(list(keys), rotation=rotation, base_dir=tmp_path, extra=extra)


@asynccontextmanager
async def running(config: Config) -> AsyncIterator[Running]:
    async with serving(config, clock=Clock(NOW), dev_headers=True) as run:
        yield run


async def request_through(
    port: int, cafile: Path, header: bytes, *, source: str = "127.0.0.1"
) -> tuple[h11.Response, dict[str, Any]]:
    """As a balancer relaying a client: connect from `source`, write `header`, then the
    client's TLS and one GET; the response and the echoing upstream's JSON."""
    with trio.fail_after(CLIENT_TIMEOUT):
        sock = trio.socket.socket()
        await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", port))
        tcp = trio.SocketStream(sock)
        await tcp.send_all(header)
        context = ssl.create_default_context(cafile=str(cafile))
        tls = trio.SSLStream(tcp, context, server_hostname=SNI)
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(method="GET", target="/who", headers=[("host", SNI)])
        await tls.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
        response, body = await receive_response(tls, conn)
        await trio.aclose_forcefully(tls)
    return response, json.loads(body)


async def refused(port: int, data: bytes, *, source: str = "127.0.0.1") -> bytes:
    """Send `data` from `source`; everything the server sends back before it closes."""
    received = bytearray()
    with trio.fail_after(CLIENT_TIMEOUT):
        sock = trio.socket.socket()
        await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", port))
        async with trio.SocketStream(sock) as tcp:
            await tcp.send_all(data)
            try:
                while chunk := await tcp.receive_some():
                    received += chunk
            except trio.BrokenResourceError:
                pass
    return bytes(received)


def xff(echo: dict[str, Any]) -> list[str]:
    return [value for name, value in echo["headers"] if name.lower() == "x-forwarded-for"]


def served_key(response: h11.Response) -> str:
    return dict(response.headers)[b"x-dualproxy-key"].decode()


# --- the client's address, everywhere ------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "client", "key"),
    [
        (v1(CLIENT, "192.0.2.1", 51234, 443), CLIENT, "k1"),
        (v2(source=CLIENT), CLIENT, "k1"),
        (v1("198.51.100.9", "192.0.2.1", 40000, 443), "198.51.100.9", "k2"),
        (v2(source="198.51.100.9"), "198.51.100.9", "k2"),
        (v2(source=CLIENT6, destination="2001:db8::1"), CLIENT6, "k1"),
    ],
    ids=["v1", "v2", "v1-network-hint", "v2-network-hint", "v2-ipv6"],
)
async def test_the_header_s_address_is_the_client_s_for_policy_upstream_and_log(
    keys: tuple[KeyFiles, KeyFiles],
    cafile: Path,
    tmp_path: Path,
    upstream: UpstreamServer,
    conn_log: ConnLog,
    header: bytes,
    client: str,
    key: str,
) -> None:
    async with running(proxied_config(keys, tmp_path, upstream)) as run:
        response, echo = await request_through(run.port, cafile, header)
        line = await conn_log.one()
    assert response.status_code == 200
    assert xff(echo) == [client]  # not the balancer's 127.0.0.1
    assert served_key(response) == key  # the network hint saw the client's address
    assert line["peer"].rsplit(":", 1)[0].strip("[]") == client
    assert (line["outcome"], line["key"]) == ("ok", key)


async def test_without_the_protocol_the_balancer_s_address_stands(
    keys: tuple[KeyFiles, KeyFiles], cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    """The negative twin: off (the default), the peer is the connection's own."""
    async with running(proxied_config(keys, tmp_path, upstream, mode="off")) as run:
        response, echo = await request_through(run.port, cafile, b"")
    assert response.status_code == 200
    assert xff(echo) == ["127.0.0.1"]


async def test_a_local_command_keeps_the_balancer_s_address(
    keys: tuple[KeyFiles, KeyFiles], cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    """LOCAL: the balancer's own connection (a health check) is served as itself."""
    async with running(proxied_config(keys, tmp_path, upstream)) as run:
        response, echo = await request_through(run.port, cafile, v2(command=0x0))
    assert response.status_code == 200
    assert xff(echo) == ["127.0.0.1"]


@pytest.mark.parametrize("with_header", [True, False], ids=["header", "no-header"])
async def test_optional_takes_a_trusted_balancer_s_header_when_it_comes(
    keys: tuple[KeyFiles, KeyFiles],
    cafile: Path,
    tmp_path: Path,
    upstream: UpstreamServer,
    with_header: bool,
) -> None:
    config = proxied_config(keys, tmp_path, upstream, mode="optional")
    async with running(config) as run:
        header = v2(source=CLIENT) if with_header else b""
        response, echo = await request_through(run.port, cafile, header)
    assert response.status_code == 200
    assert xff(echo) == [CLIENT if with_header else "127.0.0.1"]


# --- refusals: that connection only, nothing upstream --------------------------------------------

REFUSALS: Final = {
    # A header from a peer outside proxy_protocol_from (127.0.0.2 is not 127.0.0.1/32).
    "untrusted-peer-v2": ("required", "127.0.0.2", v2(source=CLIENT)),
    "untrusted-peer-v1": ("required", "127.0.0.2", v1(CLIENT, "192.0.2.1", 1, 443)),
    "untrusted-peer-optional": ("optional", "127.0.0.2", v2(source=CLIENT)),
    # Required, and the balancer sent a bare ClientHello (or plain HTTP).
    "missing": ("required", "127.0.0.1", b"\x16\x03\x01\x00\x05hello"),
    "missing-plain-http": ("required", "127.0.0.1", b"GET / HTTP/1.1\r\n\r\n"),
    # Malformed, version 1.
    "v1-double-space": ("required", "127.0.0.1", b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n"),
    "v1-bad-family": ("required", "127.0.0.1", b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n"),
    "v1-leading-zero": ("required", "127.0.0.1", b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n"),
    "v1-port-too-big": ("required", "127.0.0.1", b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n"),
    "v1-family-mismatch": ("required", "127.0.0.1", b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n"),
    "v1-bare-lf": ("required", "127.0.0.1", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"),
    "v1-too-long": ("required", "127.0.0.1", b"PROXY TCP4 " + b"1" * 120),
    # Malformed, version 2.
    "v2-version-1": ("required", "127.0.0.1", v2(version=0x1)),
    "v2-command-3": ("required", "127.0.0.1", v2(command=0x3)),
    "v2-short-address": ("required", "127.0.0.1", v2(address_block=b"\x01\x02\x03")),
    # A TLV announcing 5 bytes where 2 follow.
    "v2-bad-tlv": ("required", "127.0.0.1", v2(address_block=bytes(12) + b"\x01\x00\x05h2")),
}


@pytest.mark.parametrize("case", list(REFUSALS))
async def test_a_bad_header_closes_that_connection_only(
    keys: tuple[KeyFiles, KeyFiles],
    cafile: Path,
    tmp_path: Path,
    upstream: UpstreamServer,
    conn_log: ConnLog,
    case: str,
) -> None:
    mode, source, data = REFUSALS[case]
    async with running(proxied_config(keys, tmp_path, upstream, mode=mode)) as run:
        answered = await refused(run.port, data, source=source)
        line = (await conn_log.wait(1))[0]
        # The next connection, from the balancer with a good header, is served.
        response, echo = await request_through(run.port, cafile, v2(source=CLIENT))
    assert answered == b""  # closed unanswered: no TLS alert, no HTTP
    assert line["outcome"] == "proxy-refused", line
    assert line["detail"] != "-"
    assert response.status_code == 200
    assert xff(echo) == [CLIENT]
    assert len(upstream.requests) == 1  # only the good connection's request


async def test_a_header_that_never_completes_is_closed_after_its_timeout(
    keys: tuple[KeyFiles, KeyFiles], tmp_path: Path, upstream: UpstreamServer, conn_log: ConnLog
) -> None:
    config = proxied_config(keys, tmp_path, upstream, proxy_header_timeout=0.2)
    async with running(config) as run:
        answered = await refused(run.port, b"PROXY TCP4 203.0.113.7 ")
        line = await conn_log.one()
    assert answered == b""
    assert (line["outcome"], line["detail"]) == ("proxy-refused", "PROXY header timeout")


# --- who must send one: the pure rule ----------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "peer", "expected"),
    [
        ("off", "127.0.0.1", Expect.NO_HEADER),
        ("off", "10.0.0.1", Expect.NO_HEADER),
        ("required", "127.0.0.1", Expect.HEADER),
        ("required", "10.0.0.1", Expect.REFUSE),
        ("optional", "127.0.0.1", Expect.MAYBE),
        ("optional", "10.0.0.1", Expect.NO_HEADER),
        ("required", None, Expect.REFUSE),
    ],
)
def test_expectation_by_mode_and_peer(mode: Any, peer: str | None, expected: Expect) -> None:
    trusted = (ipaddress.ip_network("127.0.0.0/8"),)
    address = ipaddress.ip_address(peer) if peer is not None else None
    assert expectation(mode, trusted, address) is expected


# --- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ({"proxy_protocol": "required"}, "proxy_protocol_from"),
        ({"proxy_protocol": "optional", "proxy_protocol_from": []}, "proxy_protocol_from"),
        ({"proxy_protocol": "always", "proxy_protocol_from": ["10.0.0.0/8"]}, "unknown mode"),
        ({"proxy_protocol_from": ["10.0.0.0/8"]}, "no effect"),
        ({"proxy_protocol": "required", "proxy_protocol_from": ["10.0.0.1/8"]}, "host bits"),
    ],
)
def test_proxy_protocol_settings_are_checked(
    keys: tuple[KeyFiles, KeyFiles], tmp_path: Path, listen: dict[str, Any], message: str
) -> None:
    with pytest.raises(OperatorError) as error:
        make_config(
            [keys[0]], base_dir=tmp_path, extra={"listen": {"address": "127.0.0.1:0", **listen}}
        )
    assert message in str(error.value)
    assert "listen.proxy_protocol" in str(error.value)


def test_proxy_protocol_settings_are_read(keys: tuple[KeyFiles, KeyFiles], tmp_path: Path) -> None:
    listen = {
        "address": "127.0.0.1:0",
        "proxy_protocol": "optional",
        "proxy_protocol_from": ["10.0.0.0/8", "2001:db8::/32"],
    }
    config = make_config([keys[0]], base_dir=tmp_path, extra={"listen": listen})
    assert config.listen.proxy_protocol == "optional"
    assert [str(n) for n in config.listen.proxy_protocol_from] == ["10.0.0.0/8", "2001:db8::/32"]
    assert make_config([keys[0]], base_dir=tmp_path).listen.proxy_protocol == "off"
