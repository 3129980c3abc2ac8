"""HTTP/1.1 message heads as bytes, for the tests of the head checks and the rewriting."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

HOST: Final = b"Host: api.example.com"
GET: Final = b"GET /v1/items?page=2 HTTP/1.1"


def request(*fields: bytes, line: bytes = GET) -> bytes:
    """A request head: `line`, the field lines, the blank line."""
    return line + b"\r\n" + b"".join(field + b"\r\n" for field in fields) + b"\r\n"


def response(*fields: bytes, line: bytes = b"HTTP/1.1 200 OK") -> bytes:
    """A response head: `line`, the field lines, the blank line."""
    return request(*fields, line=line)


def plain_close(version: bytes, headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """RFC 9112 §9.3 read plainly: the connection ends after an HTTP/1.0 message, or after one
    with close among the options of any Connection field."""
    return version != b"1.1" or any(
        option.strip(b" \t").lower() == b"close"
        for name, value in headers
        if name == b"connection"
        for option in value.split(b",")
    )
