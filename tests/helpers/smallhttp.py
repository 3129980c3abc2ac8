"""Requests and reads for the small HTTP servers' tests (http.smallserver and its users)."""

from __future__ import annotations

import trio

from helpers.clients import CLIENT_TIMEOUT


def head_of(size: int, *, host: bytes = b"a") -> bytes:
    """A GET head of exactly `size` bytes, padded in one header field."""
    start, end = b"GET / HTTP/1.1\r\nHost: " + host + b"\r\nX: ", b"\r\n\r\n"
    if size < len(start) + len(end):
        raise ValueError(f"a head takes at least {len(start) + len(end)} bytes")
    return start + b"x" * (size - len(start) - len(end)) + end


async def receive_all(stream: trio.abc.ReceiveStream) -> bytes:
    """Everything `stream` receives until the peer closes."""
    data = b""
    with trio.fail_after(CLIENT_TIMEOUT):  # a guard against a hang, not a measurement
        while chunk := await stream.receive_some():
            data += chunk
    return data


async def exchange(host: str, port: int, request: bytes) -> bytes:
    """Send `request` to a small server on a real socket; everything it answers until it
    closes."""
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(request)
        return await receive_all(stream)
