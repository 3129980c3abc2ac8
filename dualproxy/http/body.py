"""HTTP/1.1 message bodies: reading a body's framing, writing chunked framing.

The relay parses heads with ``heads`` (strictly, once) and uses this module for what follows
a head. It is pure: bytes and values in, values out or ``HttpRefusal`` (errors.py), with the
status of the side that sent the bytes: 400 "malformed request body: ..." for the client's,
502 "invalid response body: ..." for the upstream's (``sender``).

Reading a body (the same contract as h11's readers and ``heads.find_head_end``). A reader
is made for one body from its head's framing (``body_reader``). Its ``read(buffer)`` takes the
connection's receive buffer, a bytearray the caller appends received bytes to, and

1. returns body bytes, removed from the front of ``buffer`` (never empty),
2. returns ``END`` once the body is complete; every byte after it (the next message, or
   something a broken peer sent) stays in ``buffer``, untouched,
3. returns ``None`` when it needs more bytes (it then consumed whatever it could), or
4. raises ``HttpRefusal`` as soon as the bytes cannot be a valid body within the bounds.

``read_eof()`` is called when the peer closed its side: it returns ``END`` for a body that the
close delimits, and raises ``HttpRefusal`` for any body cut short. Readers never raise anything
else, whatever the bytes; a caller loops ``read`` until ``None`` and then receives, so the
buffer holds at most one receive plus one bounded chunk-size or trailer line.

Chunked framing (RFC 9112 §7.1) is read strictly: a chunk size is 1 to ``MAX_CHUNK_SIZE_DIGITS``
hex digits, followed directly by CRLF or by extensions (``;`` and up to the line bound of
visible bytes, spaces and tabs, ignored: we define none); no whitespace before the CRLF, no bare
LF, CRLF right after each chunk's data. Trailer fields are read, checked for shape
(``name: value``, no control characters) and dropped: the relay regenerates framing, and a
recipient may discard trailers (RFC 9110 §6.5.1), so nobody can rely on them passing a proxy.

Writing: ``encode_chunk`` and ``LAST_CHUNK`` write chunked framing; a body of known length goes
as it is. Heads are written by ``heads.request_head`` and ``heads.response_head``.
"""

from __future__ import annotations

import enum
import re
from http import HTTPStatus
from typing import Final, Protocol

from dualproxy.http.errors import Fault, HttpRefusal, snippet
from dualproxy.http.fields import CRLF

__all__ = [
    "END",
    "LAST_CHUNK",
    "MAX_CHUNK_LINE_BYTES",
    "MAX_CHUNK_SIZE_DIGITS",
    "MAX_TRAILER_BYTES",
    "BodyReader",
    "ChunkedReader",
    "CloseDelimitedReader",
    "ContentLengthReader",
    "End",
    "body_reader",
    "encode_chunk",
]

# A chunk-size line with its extensions. Sizes need at most 16 digits; the rest is extensions,
# which nobody sends to an API: 1 KiB leaves room for any that do, and keeps a client from
# parking memory in an endless size line.
MAX_CHUNK_LINE_BYTES: Final = 1024
# 16 hex digits hold any 64-bit size; a longer number cannot be a real chunk, and every peer that
# parses it into a 64-bit integer agrees with us on its value.
MAX_CHUNK_SIZE_DIGITS: Final = 16
# All trailer fields of one body, as the head limit bounds a head: 16 KiB, the default
# max_header_bytes (trailers are dropped, so they only need to be bounded, not kept).
MAX_TRAILER_BYTES: Final = 16 * 1024
# The final chunk, without trailers, and the blank line that ends a chunked body.
LAST_CHUNK: Final = b"0\r\n\r\n"

# RFC 9112 §7.1.1: chunk-ext is a list of ";" name["=" value]; we ignore it, so we only require
# that it holds no control character other than HT (nothing that could end the line early).
_CHUNK_LINE: Final = re.compile(
    rb"([0-9A-Fa-f]{1,%d})(?:;[\t\x20-\x7e\x80-\xff]*)?" % MAX_CHUNK_SIZE_DIGITS
)
# RFC 9112 §7.1.2: a trailer is a field line (RFC 9112 §5).
_TRAILER_LINE: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*")
_HEX_DIGITS: Final = frozenset(b"0123456789abcdefABCDEF")
_CRLF_LENGTH: Final = len(CRLF)


class End(enum.Enum):
    """The type of ``END``: the body is complete."""

    END = enum.auto()


END: Final = End.END


class BodyReader(Protocol):
    """Reads one body from a receive buffer; see the module docstring for the contract."""

    def read(self, buffer: bytearray) -> bytes | End | None: ...

    def read_eof(self) -> End: ...


def body_reader(content_length: int | None, *, chunked: bool, sender: Fault) -> BodyReader:
    """The reader for a body framed by `chunked` or `content_length`, or by the close when the
    head has neither (only a response may: a request without either has no body). `sender`:
    whose body it is, and so whose fault a malformed one."""
    if chunked:
        return ChunkedReader(sender=sender)
    if content_length is not None:
        return ContentLengthReader(content_length, sender=sender)
    return CloseDelimitedReader()


def _refusal(sender: Fault, problem: str) -> HttpRefusal:
    """A body's bytes refused: the client's get 400, the upstream's 502 (a response had
    started: its head came before the body)."""
    if sender == "client":
        return HttpRefusal(
            HTTPStatus.BAD_REQUEST, f"malformed request body: {problem}", fault="client"
        )
    return HttpRefusal(
        HTTPStatus.BAD_GATEWAY,
        f"invalid response body: {problem}",
        fault="upstream",
        before_response=False,
    )


class ContentLengthReader:
    """A body of exactly `length` bytes (0 for a message without a body)."""

    __slots__ = ("_length", "_remaining", "_sender")

    def __init__(self, length: int, *, sender: Fault) -> None:
        self._length = length
        self._remaining = length
        self._sender: Fault = sender

    def read(self, buffer: bytearray) -> bytes | End | None:
        remaining = self._remaining
        if remaining == 0:
            return END
        if not buffer:
            return None
        data = _take(buffer, remaining)
        self._remaining = remaining - len(data)
        return data

    def read_eof(self) -> End:
        if self._remaining:
            received = self._length - self._remaining
            raise _refusal(self._sender, f"body ended after {received} of {self._length} bytes")
        return END


class CloseDelimitedReader:
    """A body that the sender ends by closing the connection (an HTTP/1.0-style response)."""

    __slots__ = ()

    def read(self, buffer: bytearray) -> bytes | End | None:
        if not buffer:
            return None
        data = bytes(buffer)
        buffer.clear()
        return data

    def read_eof(self) -> End:
        return END


class _Chunked(enum.Enum):
    SIZE = enum.auto()  # at a chunk-size line
    DATA = enum.auto()  # inside a chunk's data (_remaining bytes left)
    DATA_END = enum.auto()  # at the CRLF after a chunk's data
    TRAILERS = enum.auto()  # after the last chunk: trailer lines, then a blank line
    DONE = enum.auto()


class ChunkedReader:
    """A chunked body (RFC 9112 §7.1), read strictly; trailers are checked and dropped."""

    __slots__ = ("_remaining", "_sender", "_state", "_trailer_bytes")

    def __init__(self, *, sender: Fault) -> None:
        self._sender: Fault = sender
        self._state = _Chunked.SIZE
        self._remaining = 0
        self._trailer_bytes = 0

    def read(self, buffer: bytearray) -> bytes | End | None:
        # Bounded: every round consumes a line or a CRLF, or returns.
        while True:
            state = self._state
            if state is _Chunked.DATA:
                if not buffer:
                    return None
                data = _take(buffer, self._remaining)
                self._remaining -= len(data)
                if self._remaining == 0:
                    self._state = _Chunked.DATA_END
                return data
            if state is _Chunked.SIZE:
                line = self._line(buffer, MAX_CHUNK_LINE_BYTES)
                if line is None:
                    return None
                match = _CHUNK_LINE.fullmatch(line)
                if match is None:
                    raise _refusal(self._sender, f"malformed chunk size line {snippet(line)}")
                size = int(match[1], 16)
                if size:
                    self._remaining = size
                    self._state = _Chunked.DATA
                else:
                    self._state = _Chunked.TRAILERS
            elif state is _Chunked.DATA_END:
                if len(buffer) < _CRLF_LENGTH:
                    if buffer and buffer[0] != CRLF[0]:
                        raise _refusal(self._sender, "chunk data not followed by CRLF")
                    return None
                if buffer[:2] != CRLF:
                    raise _refusal(self._sender, "chunk data not followed by CRLF")
                del buffer[:2]
                self._state = _Chunked.SIZE
            elif state is _Chunked.TRAILERS:
                line = self._line(buffer, MAX_TRAILER_BYTES - self._trailer_bytes)
                if line is None:
                    return None
                self._trailer_bytes += len(line) + _CRLF_LENGTH
                if not line:
                    self._state = _Chunked.DONE
                    return END
                if _TRAILER_LINE.fullmatch(line) is None:
                    raise _refusal(self._sender, f"malformed trailer field {snippet(line)}")
            else:
                return END

    def _line(self, buffer: bytearray, limit: int) -> bytes | None:
        """The next line without its CRLF, consumed; None while it may still end within
        `limit` bytes."""
        end = buffer.find(CRLF, 0, limit + _CRLF_LENGTH)
        if end < 0:
            sizing = self._state is _Chunked.SIZE
            if len(buffer) >= limit + _CRLF_LENGTH:
                raise _refusal(
                    self._sender,
                    f"chunk size line longer than {MAX_CHUNK_LINE_BYTES} bytes"
                    if sizing
                    else f"trailers longer than {MAX_TRAILER_BYTES} bytes",
                )
            if sizing and buffer and buffer[0] not in _HEX_DIGITS:
                raise _refusal(self._sender, f"malformed chunk size line {snippet(bytes(buffer))}")
            return None
        line = bytes(buffer[:end])
        del buffer[: end + _CRLF_LENGTH]
        return line

    def read_eof(self) -> End:
        if self._state is _Chunked.DONE:
            return END
        raise _refusal(self._sender, "chunked body cut short (no last chunk)")


def encode_chunk(data: bytes) -> bytes:
    """`data` as one chunk; nothing for empty data (an empty chunk would end the body)."""
    if not data:
        return b""
    return b"%x\r\n%b\r\n" % (len(data), data)


def _take(buffer: bytearray, limit: int) -> bytes:
    """Up to `limit` bytes from the front of `buffer`, removed from it (body data is handed
    on as bytes: the buffer keeps being reused for what follows)."""
    if len(buffer) <= limit:
        data = bytes(buffer)
        buffer.clear()
    else:
        data = bytes(buffer[:limit])
        del buffer[:limit]
    return data
