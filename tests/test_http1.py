"""http1.py: body readers fed whole, byte by byte and with trailing bytes (which must stay in
the buffer, untouched); each malformed chunked shape refused next to the valid twin it was bent
from; Hypothesis on chunked round trips and on arbitrary bytes (only the documented outcomes);
golden bytes for the writers, read back by h11 as an independent parser."""

from __future__ import annotations

import contextlib
from typing import Final

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dualproxy.http.http1 import (
    END,
    LAST_CHUNK,
    MAX_CHUNK_LINE_BYTES,
    MAX_TRAILER_BYTES,
    BodyError,
    BodyReader,
    ChunkedReader,
    CloseDelimitedReader,
    ContentLengthReader,
    body_reader,
    encode_chunk,
    request_head,
    response_head,
)

# Hypothesis examples per property: enough to reach every state many times while the whole
# file stays within a few seconds.
EXAMPLES: Final = 200
# After a body: the next pipelined message, which the reader must leave alone.
NEXT: Final = b"GET /next HTTP/1.1\r\n\r\n"


def read_all(
    reader: BodyReader, pieces: list[bytes], *, eof: bool = False
) -> tuple[bytes, bool, bytes]:
    """Feed `pieces` one receive at a time, as the relay does: (body, ended, left over)."""
    buffer = bytearray()
    body = bytearray()
    for piece in [*pieces, None] if eof else pieces:
        if piece is None:
            assert reader.read_eof() is END
            return bytes(body), True, bytes(buffer)
        buffer += piece
        while (out := reader.read(buffer)) is not None:  # bounded: each read consumes or ends
            if out is END:
                return bytes(body), True, bytes(buffer)
            assert out, "a reader never returns empty data"
            body += out
    return bytes(body), False, bytes(buffer)


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


# --- Content-Length ---------------------------------------------------------------------


@pytest.mark.parametrize("split", [False, True], ids=["whole", "bytewise"])
def test_content_length_body_and_trailing_bytes(split: bool) -> None:
    data = b"hello" + NEXT
    pieces = bytewise(data) if split else [data]
    body, ended, rest = read_all(ContentLengthReader(5), pieces)
    assert (body, ended) == (b"hello", True)
    # Bytewise, the reader ends as soon as its last byte came; the rest was never received.
    assert rest == (b"" if split else NEXT)


def test_an_empty_body_ends_without_a_byte() -> None:
    buffer = bytearray(NEXT)
    assert ContentLengthReader(0).read(buffer) is END
    assert buffer == NEXT


def test_a_content_length_body_cut_short_is_an_error_at_eof() -> None:
    reader = ContentLengthReader(5)
    assert read_all(reader, [b"hel"]) == (b"hel", False, b"")
    with pytest.raises(BodyError, match="after 3 of 5 bytes"):
        reader.read_eof()
    # Twin: a complete body reads to its end, then EOF is harmless.
    assert read_all(ContentLengthReader(3), [b"hel"], eof=True) == (b"hel", True, b"")


def test_close_delimited_body_ends_at_eof_only() -> None:
    assert read_all(CloseDelimitedReader(), [b"a", b"bc"]) == (b"abc", False, b"")
    assert read_all(CloseDelimitedReader(), [b"a", b"bc"], eof=True) == (b"abc", True, b"")


def test_body_reader_follows_the_framing() -> None:
    assert isinstance(body_reader(None, chunked=True), ChunkedReader)
    assert isinstance(body_reader(7, chunked=False), ContentLengthReader)
    assert isinstance(body_reader(None, chunked=False), CloseDelimitedReader)


# --- chunked ----------------------------------------------------------------------------

CHUNKED: Final = b"5\r\nhello\r\n1;name=value\r\n \r\nA\r\n0123456789\r\n0\r\nX-Sum: 1\r\n\r\n"
CHUNKED_BODY: Final = b"hello 0123456789"


@pytest.mark.parametrize("split", [False, True], ids=["whole", "bytewise"])
def test_chunked_golden(split: bool) -> None:
    data = CHUNKED + NEXT
    body, ended, rest = read_all(ChunkedReader(), bytewise(data) if split else [data])
    assert (body, ended) == (CHUNKED_BODY, True)
    assert rest == (b"" if split else NEXT)


def test_a_chunked_body_cut_short_is_an_error_at_eof() -> None:
    for cut in range(len(CHUNKED)):
        reader = ChunkedReader()
        _, ended, _ = read_all(reader, [CHUNKED[:cut]])
        assert not ended
        with pytest.raises(BodyError, match="cut short"):
            reader.read_eof()
    reader = ChunkedReader()  # twin: the whole body, then EOF
    assert read_all(reader, [CHUNKED], eof=True) == (CHUNKED_BODY, True, b"")


@pytest.mark.parametrize(
    ("bad", "good"),
    [
        (b"5 \r\nhello\r\n0\r\n\r\n", b"5\r\nhello\r\n0\r\n\r\n"),  # whitespace after the size
        (b" 5\r\nhello\r\n0\r\n\r\n", b"5\r\nhello\r\n0\r\n\r\n"),  # whitespace before it
        (b"+5\r\nhello\r\n0\r\n\r\n", b"5\r\nhello\r\n0\r\n\r\n"),  # a sign
        (b"0x5\r\nhello\r\n0\r\n\r\n", b"05\r\nhello\r\n0\r\n\r\n"),  # a prefix
        (b"\r\nhello\r\n0\r\n\r\n", b"5\r\nhello\r\n0\r\n\r\n"),  # no size
        (b"5\nhello\r\n0\r\n\r\n", b"5\r\nhello\r\n0\r\n\r\n"),  # bare LF
        (b"5\r\nhello\n0\r\n\r\n", b"5\r\nhello\r\n0\r\n\r\n"),  # bare LF after the data
        (b"5\r\nhelloX\r\n0\r\n\r\n", b"5\r\nhello\r\n0\r\n\r\n"),  # more data than the size
        (b"5;a\x00b\r\nhello\r\n0\r\n\r\n", b"5;a b\r\nhello\r\n0\r\n\r\n"),  # NUL in an extension
        (b"5;a\rb\r\nhello\r\n0\r\n\r\n", b"5;a\tb\r\nhello\r\n0\r\n\r\n"),  # bare CR in one
        (b"1" * 17 + b"\r\n", b"0" * 15 + b"5\r\nhello\r\n0\r\n\r\n"),  # 17 digits (16 is fine)
        (b"5\r\nhello\r\n0\r\nX Sum: 1\r\n\r\n", b"5\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n"),
        (b"5\r\nhello\r\n0\r\nX-Sum\r\n\r\n", b"5\r\nhello\r\n0\r\nX-Sum:\r\n\r\n"),
        (b"5\r\nhello\r\n0\r\nX-Sum: \x01\r\n\r\n", b"5\r\nhello\r\n0\r\nX-Sum: \t\r\n\r\n"),
    ],
)
def test_malformed_chunked_framing_is_refused(bad: bytes, good: bytes) -> None:
    for pieces in ([bad], bytewise(bad)):
        with pytest.raises(BodyError):
            read_all(ChunkedReader(), pieces, eof=True)
        assert read_all(ChunkedReader(), [good], eof=True)[1]


def test_chunk_size_lines_and_trailers_are_bounded() -> None:
    line = b"5;" + b"x" * (MAX_CHUNK_LINE_BYTES - 3)  # one byte short of the bound
    assert read_all(ChunkedReader(), [line + b"\r\nhello\r\n0\r\n\r\n"])[1]
    with pytest.raises(BodyError, match="chunk size line longer"):
        read_all(ChunkedReader(), [line + b"xxx"])  # refused before any CRLF comes
    trailer = b"X-Pad: " + b"p" * 100 + b"\r\n"
    fits = trailer * ((MAX_TRAILER_BYTES - 2) // len(trailer))
    assert read_all(ChunkedReader(), [b"0\r\n" + fits + b"\r\n"])[1]
    with pytest.raises(BodyError, match="trailers longer"):
        read_all(ChunkedReader(), [b"0\r\n" + fits + trailer * 2 + b"\r\n"])


def test_a_bad_size_line_is_refused_at_its_first_byte() -> None:
    buffer = bytearray(b"z")  # no CRLF yet: still no need to wait for one
    with pytest.raises(BodyError, match="malformed chunk size"):
        ChunkedReader().read(buffer)


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    chunks=st.lists(st.binary(min_size=1, max_size=300), max_size=8),
    cuts=st.lists(st.integers(1, 64), max_size=30),
    trailing=st.binary(max_size=20),
)
def test_chunked_round_trip(chunks: list[bytes], cuts: list[int], trailing: bytes) -> None:
    """What encode_chunk and LAST_CHUNK write, the reader reads back, however it is cut, and
    bytes after the body stay in the buffer."""
    data = b"".join(encode_chunk(chunk) for chunk in chunks) + LAST_CHUNK + trailing
    pieces, start = [], 0
    for cut in cuts:
        pieces.append(data[start : start + cut])
        start += cut
    pieces.append(data[start:])
    body, ended, rest = read_all(ChunkedReader(), pieces)
    assert (body, ended) == (b"".join(chunks), True)
    assert trailing.startswith(rest)  # what came with the end; later receives were not made
    # h11 reads the same bytes as the same body.
    assert h11_body(data) == b"".join(chunks)


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    data=st.binary(max_size=200)
    | st.lists(
        st.sampled_from([b"5", b"0", b"f", b";x", b"\r\n", b"\n", b"\r", b" ", b"hello", b":"]),
        max_size=20,
    ).map(b"".join),
    cut=st.integers(0, 200),
)
def test_arbitrary_bytes_give_only_documented_outcomes(data: bytes, cut: int) -> None:
    """Body pieces, END, None or BodyError: never another exception."""
    for reader in (ChunkedReader(), ContentLengthReader(10), CloseDelimitedReader()):
        with contextlib.suppress(BodyError):
            read_all(reader, [data[:cut], data[cut:]], eof=True)


def test_encode_chunk_writes_nothing_for_no_data() -> None:
    assert encode_chunk(b"") == b""  # an empty chunk would end the body
    assert encode_chunk(b"x" * 26) == b"1a\r\n" + b"x" * 26 + b"\r\n"


# --- heads and keep-alive -----------------------------------------------------------------


def test_request_head_golden() -> None:
    head = request_head(b"POST", b"/a?b=1", [(b"host", b"api.test"), (b"content-length", b"2")])
    assert head == b"POST /a?b=1 HTTP/1.1\r\nhost: api.test\r\ncontent-length: 2\r\n\r\n"
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head + b"ok")
    request = conn.next_event()
    assert isinstance(request, h11.Request)
    assert (request.method, request.target) == (b"POST", b"/a?b=1")
    assert list(request.headers) == [(b"host", b"api.test"), (b"content-length", b"2")]


def test_response_head_golden() -> None:
    head = response_head(404, b"Not Found", [(b"content-length", b"0")])
    assert head == b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
    assert response_head(200, b"", []) == b"HTTP/1.1 200 \r\n\r\n"  # the reason is optional
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "a")]))
    conn.receive_data(head)
    response = conn.next_event()
    assert isinstance(response, h11.Response)
    assert (response.status_code, response.reason) == (404, b"Not Found")


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    headers=st.lists(
        st.tuples(st.binary(min_size=1, max_size=8), st.binary(max_size=8)), max_size=5
    ),
    reason=st.binary(max_size=8),
)
def test_heads_written_field_by_field(headers: list[tuple[bytes, bytes]], reason: bytes) -> None:
    """Fields joined in C write the bytes one %-format per line wrote."""
    fields = b"".join(b"%b: %b\r\n" % field for field in headers)
    assert request_head(b"GET", b"/x", headers) == b"GET /x HTTP/1.1\r\n" + fields + b"\r\n"
    assert response_head(200, reason, headers) == b"HTTP/1.1 200 %b\r\n%b\r\n" % (reason, fields)


def h11_body(chunked: bytes) -> bytes:
    """The body h11 reads from a chunked response body."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "a")]))
    conn.receive_data(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunked)
    body = bytearray()
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return bytes(body)
        else:
            assert isinstance(event, h11.Response), event
