"""challenges.py without a CA: the challenge folder (publish, read, stale, withdraw), the
board that answers from it, and the plain-HTTP listener's answers (alone, then on a loopback
socket)."""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import pytest
import trio
from helpers import proxy_headers
from helpers.smallhttp import exchange, head_of

from dualproxy.acme.challenges import (
    CHALLENGE_MAX_AGE,
    HTTP01_PREFIX,
    MAX_HTTP_HEAD,
    Challenge,
    ChallengeBoard,
    http_answer,
    publish,
    read_published,
    serve_http,
    withdraw,
)
from dualproxy.config.names import ListenAddress
from dualproxy.config.schema import ListenConfig
from dualproxy.http.smallserver import Request

NOW: Final = datetime(2026, 12, 1, tzinfo=UTC)
TLS: Final = Challenge("tls-alpn-01", "api.example.com", "tok1", "tok1.thumb")
HTTP: Final = Challenge("http-01", "api.example.com", "tok2", "tok2.thumb")


def test_published_challenges_are_read_back_and_withdrawn(tmp_path: Path) -> None:
    folder = tmp_path / "challenges"
    paths = publish(folder, [TLS, HTTP], NOW)
    assert folder.stat().st_mode & 0o777 == 0o700
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in paths)
    assert sorted(read_published(folder, NOW), key=lambda c: c.token) == [TLS, HTTP]
    withdraw(paths)
    assert read_published(folder, NOW) == []
    withdraw(paths)  # twice is fine: the order's cleanup may race a crash's


def test_stale_challenges_are_ignored_then_removed(tmp_path: Path) -> None:
    folder = tmp_path / "challenges"
    [old] = publish(folder, [TLS], NOW - CHALLENGE_MAX_AGE - timedelta(seconds=1))
    assert read_published(folder, NOW) == []
    publish(folder, [HTTP], NOW)
    assert not old.exists()
    assert read_published(folder, NOW) == [HTTP]


def test_unreadable_files_are_skipped(tmp_path: Path) -> None:
    folder = tmp_path / "challenges"
    publish(folder, [HTTP], NOW)
    (folder / "torn.json").write_text('{"type": "http-01", "na')
    (folder / "other.json").write_text(json.dumps({"unrelated": True}))
    assert read_published(folder, NOW) == [HTTP]
    assert read_published(tmp_path / "missing", NOW) == []


def test_board_answers_what_is_published(tmp_path: Path) -> None:
    board = ChallengeBoard(tmp_path / "challenges")
    board.refresh(NOW)
    assert board.tls_alpn_context("api.example.com") is None
    assert board.http01_answer("tok2") is None
    paths = publish(board.folder, [TLS, HTTP], NOW)
    board.refresh(NOW)
    context = board.tls_alpn_context("API.example.com.")  # as SNI may spell it
    assert context is not None
    assert board.tls_alpn_context("other.example.com") is None
    assert board.tls_alpn_context(None) is None
    assert board.http01_answer("tok2") == b"tok2.thumb"
    board.refresh(NOW)
    assert board.tls_alpn_context("api.example.com") is context  # kept, not remade
    withdraw(paths)
    board.refresh(NOW)
    assert board.tls_alpn_context("api.example.com") is None
    assert board.http01_answer("tok2") is None


def request(method: bytes, target: bytes, host: bytes | None = b"api.example.com") -> Request:
    headers = ((b"host", host),) if host is not None else ()
    return Request(method, target, headers)


@pytest.fixture
def board(tmp_path: Path) -> ChallengeBoard:
    board = ChallengeBoard(tmp_path / "challenges")
    publish(board.folder, [HTTP], NOW)
    board.refresh(NOW)
    return board


def test_http01_answer_and_its_unknown_twin(board: ChallengeBoard) -> None:
    answer = http_answer(request(b"GET", f"{HTTP01_PREFIX}tok2".encode()), board, 443)
    assert (answer.status, answer.body) == (200, b"tok2.thumb")
    answer = http_answer(request(b"GET", f"{HTTP01_PREFIX}nope".encode()), board, 443)
    assert answer.status == 404


@pytest.mark.parametrize(
    ("method", "target", "host", "port", "status", "location"),
    [
        (b"GET", b"/a?b=1", b"api.example.com", 443, 301, b"https://api.example.com/a?b=1"),
        (b"HEAD", b"/", b"API.example.com:80", 443, 301, b"https://api.example.com/"),
        (b"POST", b"/upload", b"api.example.com", 8443, 308, b"https://api.example.com:8443/upload"),
        (b"GET", b"/", b"[2001:db8::1]:80", 443, 301, b"https://[2001:db8::1]/"),
        (b"OPTIONS", b"*", b"api.example.com", 443, 308, b"https://api.example.com/"),
    ],
)  # fmt: skip
def test_other_plain_http_is_redirected_to_https(
    board: ChallengeBoard,
    method: bytes,
    target: bytes,
    host: bytes,
    port: int,
    status: int,
    location: bytes,
) -> None:
    answer = http_answer(request(method, target, host), board, port)
    assert (answer.status, answer.body, answer.headers) == (status, b"", ((b"location", location),))


@pytest.mark.parametrize("host", [None, b"evil\\name", b"a b"])
def test_no_redirect_without_a_plausible_host(board: ChallengeBoard, host: bytes | None) -> None:
    answer = http_answer(request(b"GET", b"/", host), board, 443)
    assert answer.status == 400
    assert answer.headers == ()


# --- the plain-HTTP listener on a socket ------------------------------------------------------


@asynccontextmanager
async def http_listener(
    board: ChallengeBoard, proxy: ListenConfig | None = None
) -> AsyncIterator[int]:
    """serve_http on a loopback port, redirecting to https on 8443, for the block."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        sock.setblocking(False)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_http, sock, board, 8443, proxy)
            yield int(sock.getsockname()[1])
            nursery.cancel_scope.cancel()


def challenge_request(method: bytes, token: str) -> bytes:
    return method + f" {HTTP01_PREFIX}{token} HTTP/1.1\r\nHost: api.example.com\r\n\r\n".encode()


async def test_the_listener_answers_a_head_with_the_head_and_serves_on(
    board: ChallengeBoard,
) -> None:
    """A HEAD's answer has no body; sending one anyway used to end the listener."""
    async with http_listener(board) as port:
        answers = [
            await exchange("127.0.0.1", port, challenge_request(method, token))
            for method, token in ((b"HEAD", "nope"), (b"HEAD", "tok2"), (b"GET", "tok2"))
        ]
    unknown, head, get = answers
    assert unknown.startswith(b"HTTP/1.1 404 ")
    assert unknown.endswith(b"\r\n\r\n")  # the head alone
    assert head == get.removesuffix(b"tok2.thumb")
    assert get.startswith(b"HTTP/1.1 200 ")
    assert b"\r\ncontent-length: 10\r\n" in head


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (head_of(MAX_HTTP_HEAD, host=b"api.example.com"), b"301"),
        (head_of(MAX_HTTP_HEAD + 1, host=b"api.example.com"), b"400"),
        (b"GET / HTTP/1.1\r\nHost: api.example.com\r\nbad header\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n", b"301"),
    ],
    ids=["head-at-the-bound", "head-past-the-bound", "malformed", "well-formed"],
)
async def test_the_listener_refuses_what_it_cannot_read_with_400(
    board: ChallengeBoard, request_bytes: bytes, status: bytes
) -> None:
    async with http_listener(board) as port:
        answer = await exchange("127.0.0.1", port, request_bytes)
    assert answer.startswith(b"HTTP/1.1 " + status + b" ")
    if status == b"400":
        assert answer.endswith(b"\r\n\r\nbad request\n")
    else:
        assert b"\r\nlocation: https://api.example.com:8443/\r\n" in answer


# --- behind a balancer that sends the PROXY protocol ----------------------------------------------

BEHIND_A_BALANCER: Final = ListenConfig(
    addresses=(ListenAddress("127.0.0.1", 0),),
    proxy_protocol="required",
    proxy_protocol_from=(ipaddress.ip_network("127.0.0.1/32"),),
)


@pytest.mark.parametrize(
    ("header", "answered"),
    [
        (proxy_headers.v2(source="203.0.113.7"), True),
        (proxy_headers.v1("203.0.113.7", "192.0.2.1", 1234, 80), True),
        (proxy_headers.v2(command=0x0), True),  # LOCAL: the balancer's own check
        (b"", False),  # required, and missing
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", False),  # malformed (bare LF)
    ],
    ids=["v2", "v1", "local", "missing", "malformed"],
)
async def test_the_listener_reads_the_proxy_header_when_the_tls_port_does(
    board: ChallengeBoard,
    header: bytes,
    answered: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dualproxy.acme")
    async with http_listener(board, BEHIND_A_BALANCER) as port:
        answer = await exchange("127.0.0.1", port, header + challenge_request(b"GET", "tok2"))
    if answered:
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert answer.endswith(b"tok2.thumb")
    else:
        assert answer == b""
        assert "http-01 listener: closed a connection from 127.0.0.1" in caplog.text


async def test_without_the_protocol_a_header_is_a_bad_request(board: ChallengeBoard) -> None:
    """The negative twin: off, the header's bytes are the request's, which is malformed."""
    async with http_listener(board) as port:
        header = proxy_headers.v1("203.0.113.7", "192.0.2.1", 1234, 80)
        answer = await exchange("127.0.0.1", port, header + challenge_request(b"GET", "tok2"))
    assert answer.startswith(b"HTTP/1.1 400 ")
