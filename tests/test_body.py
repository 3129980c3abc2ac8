"""body.py: body readers fed whole, byte by byte and with trailing bytes (which must stay in
the buffer, untouched); each malformed chunked shape refused next to the valid twin it was bent
from; Hypothesis on chunked round trips and on arbitrary bytes (only the documented outcomes);
golden bytes for the writers, read back by h11 as an independent parser."""

from __future__ import annotations

import contextlib
from typing import Final

import h11
import pytest
from helpers.profiles import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from dualproxy.http.body import (
    END,
    LAST_CHUNK,
    MAX_CHUNK_LINE_BYTES,
    MAX_TRAILER_BYTES,
    BodyReader,
    ChunkedReader,
    CloseDelimitedReader,
    ContentLengthReader,
    body_reader,
    encode_chunk,
)
from dualproxy.http.errors import Fault, HttpRefusal

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
    body, ended, rest = read_all(ContentLengthReader(5, sender="client"), pieces)
    assert (body, ended) == (b"hello", True)
    # Bytewise, the reader ends as soon as its last byte came; the rest was never received.
    assert rest == (b"" if split else NEXT)


def test_an_empty_body_ends_without_a_byte() -> None:
    buffer = bytearray(NEXT)
    assert ContentLengthReader(0, sender="client").read(buffer) is END
    assert buffer == NEXT


def test_a_content_length_body_cut_short_is_an_error_at_eof() -> None:
    reader = ContentLengthReader(5, sender="client")
    assert read_all(reader, [b"hel"]) == (b"hel", False, b"")
    with pytest.raises(HttpRefusal, match="after 3 of 5 bytes"):
        reader.read_eof()
    # Twin: a complete body reads to its end, then EOF is harmless.
    assert read_all(ContentLengthReader(3, sender="client"), [b"hel"], eof=True) == (
        b"hel",
        True,
        b"",
    )


def test_close_delimited_body_ends_at_eof_only() -> None:
    assert read_all(CloseDelimitedReader(), [b"a", b"bc"]) == (b"abc", False, b"")
    assert read_all(CloseDelimitedReader(), [b"a", b"bc"], eof=True) == (b"abc", True, b"")


def test_body_reader_follows_the_framing() -> None:
    assert isinstance(body_reader(None, chunked=True, sender="client"), ChunkedReader)
    assert isinstance(body_reader(7, chunked=False, sender="client"), ContentLengthReader)
    assert isinstance(body_reader(None, chunked=False, sender="upstream"), CloseDelimitedReader)


# --- chunked ----------------------------------------------------------------------------

CHUNKED: Final = b"5\r\nhello\r\n1;name=value\r\n \r\nA\r\n0123456789\r\n0\r\nX-Sum: 1\r\n\r\n"
CHUNKED_BODY: Final = b"hello 0123456789"


@pytest.mark.parametrize("split", [False, True], ids=["whole", "bytewise"])
def test_chunked_golden(split: bool) -> None:
    data = CHUNKED + NEXT
    body, ended, rest = read_all(
        ChunkedReader(sender="client"), bytewise(data) if split else [data]
    )
    assert (body, ended) == (CHUNKED_BODY, True)
    assert rest == (b"" if split else NEXT)


def test_a_chunked_body_cut_short_is_an_error_at_eof() -> None:
    for cut in range(len(CHUNKED)):
        reader = ChunkedReader(sender="client")
        _, ended, _ = read_all(reader, [CHUNKED[:cut]])
        assert not ended
        with pytest.raises(HttpRefusal, match="cut short"):
            reader.read_eof()
    reader = ChunkedReader(sender="client")  # twin: the whole body, then EOF
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
        with pytest.raises(HttpRefusal):
            read_all(ChunkedReader(sender="client"), pieces, eof=True)
        assert read_all(ChunkedReader(sender="client"), [good], eof=True)[1]


def test_chunk_size_lines_and_trailers_are_bounded() -> None:
    line = b"5;" + b"x" * (MAX_CHUNK_LINE_BYTES - 3)  # one byte short of the bound
    assert read_all(ChunkedReader(sender="client"), [line + b"\r\nhello\r\n0\r\n\r\n"])[1]
    with pytest.raises(HttpRefusal, match="chunk size line longer"):
        read_all(ChunkedReader(sender="client"), [line + b"xxx"])  # refused before any CRLF comes
    trailer = b"X-Pad: " + b"p" * 100 + b"\r\n"
    fits = trailer * ((MAX_TRAILER_BYTES - 2) // len(trailer))
    assert read_all(ChunkedReader(sender="client"), [b"0\r\n" + fits + b"\r\n"])[1]
    with pytest.raises(HttpRefusal, match="trailers longer"):
        read_all(ChunkedReader(sender="client"), [b"0\r\n" + fits + trailer * 2 + b"\r\n"])


@pytest.mark.parametrize(
    ("sender", "status", "problem", "before_response"),
    [
        ("client", 400, "malformed request body: malformed chunk size line 'z'", True),
        ("upstream", 502, "invalid response body: malformed chunk size line 'z'", False),
    ],
)
def test_the_sender_says_whose_fault_a_bad_body_is(
    sender: Fault, status: int, problem: str, before_response: bool
) -> None:
    """The same bytes are the client's fault in a request (400) and the upstream's in a
    response (502, once its head had come)."""
    with pytest.raises(HttpRefusal) as refused:
        ChunkedReader(sender=sender).read(bytearray(b"z"))
    assert (refused.value.status, refused.value.problem) == (status, problem)
    assert (refused.value.fault, refused.value.before_response) == (sender, before_response)
    with pytest.raises(HttpRefusal) as cut_short:
        ContentLengthReader(2, sender=sender).read_eof()
    assert (cut_short.value.status, cut_short.value.fault) == (status, sender)


def test_a_bad_size_line_is_refused_at_its_first_byte() -> None:
    buffer = bytearray(b"z")  # no CRLF yet: still no need to wait for one
    with pytest.raises(HttpRefusal, match="malformed chunk size"):
        ChunkedReader(sender="client").read(buffer)


@settings(max_examples=examples(EXAMPLES))
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
    body, ended, rest = read_all(ChunkedReader(sender="client"), pieces)
    assert (body, ended) == (b"".join(chunks), True)
    assert trailing.startswith(rest)  # what came with the end; later receives were not made
    # h11 reads the same bytes as the same body.
    assert h11_body(data) == b"".join(chunks)


@settings(max_examples=examples(EXAMPLES))
@given(
    data=st.binary(max_size=200)
    | st.lists(
        st.sampled_from([b"5", b"0", b"f", b";x", b"\r\n", b"\n", b"\r", b" ", b"hello", b":"]),
        max_size=20,
    ).map(b"".join),
    cut=st.integers(0, 200),
)
def test_arbitrary_bytes_give_only_documented_outcomes(data: bytes, cut: int) -> None:
    """Body pieces, END, None or HttpRefusal: never another exception."""
    for reader in (
        ChunkedReader(sender="client"),
        ContentLengthReader(10, sender="client"),
        CloseDelimitedReader(),
    ):
        with contextlib.suppress(HttpRefusal):
            read_all(reader, [data[:cut], data[cut:]], eof=True)


def test_encode_chunk_writes_nothing_for_no_data() -> None:
    assert encode_chunk(b"") == b""  # an empty chunk would end the body
    assert encode_chunk(b"x" * 26) == b"1a\r\n" + b"x" * 26 + b"\r\n"


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
