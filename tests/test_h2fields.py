"""h2fields.py: an HTTP/2 request's fields into a RequestHead. Every refusal of the module's
list next to the accepted twin it was bent from, golden heads, and the whole-list shortcut
of the checks held to the field-by-field reading it stands in for (kept below as the
reference), on generated field lists valid and not: the same head, or the same refusal.

test_h2.py sends the same refusals over a real connection and asserts what the client saw and
that nothing went upstream."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

import pytest
from helpers.profiles import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from dualproxy.http import h2fields
from dualproxy.http.errors import HttpRefusal, snippet
from dualproxy.http.h2fields import stream_request_head
from dualproxy.http.heads import HeadLimits, RequestHead, expects_continue

LIMITS: Final = HeadLimits()
EXAMPLES: Final = 300

Fields = list[tuple[bytes, bytes]]
BASE: Final[Fields] = [
    (b":method", b"GET"),
    (b":scheme", b"https"),
    (b":authority", b"api.example.com"),
    (b":path", b"/v1/items?x=1"),
]


def head(fields: Sequence[tuple[bytes, bytes]], body_length: int | None = 0) -> RequestHead:
    return stream_request_head(fields, LIMITS, body_length=body_length)


def refusal(fields: Sequence[tuple[bytes, bytes]], body_length: int | None = 0) -> HttpRefusal:
    with pytest.raises(HttpRefusal) as caught:
        head(fields, body_length)
    assert caught.value.fault == "client"
    return caught.value


# --- golden heads ----------------------------------------------------------------------------


def test_golden_head() -> None:
    fields = [*BASE, (b"user-agent", b"app/1.0"), (b"accept", b"*/*")]
    assert head(fields) == RequestHead(
        b"GET",
        b"/v1/items?x=1",
        b"2",
        ((b"user-agent", b"app/1.0"), (b"accept", b"*/*")),
        b"api.example.com",
        None,
        False,
        False,
    )


def test_golden_head_with_fields_to_sort_out() -> None:
    fields = [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":path", b"/upload"),
        (b"host", b"API.example.com"),
        (b"cookie", b"a=1"),
        (b"content-length", b"5"),
        (b"expect", b"100-continue"),
        (b"cookie", b"b=2"),
        (b"te", b"Trailers"),
    ]
    assert head(fields, body_length=None) == RequestHead(
        b"POST",
        b"/upload",
        b"2",
        (
            (b"host", b"API.example.com"),
            (b"cookie", b"a=1; b=2"),  # where the first was (RFC 9113 §8.2.3)
            (b"content-length", b"5"),
            (b"expect", b"100-continue"),
            (b"te", b"Trailers"),
        ),
        b"API.example.com",
        5,
        False,
        True,
    )


@pytest.mark.parametrize(
    ("method", "body_length", "content_length", "chunked"),
    [
        (b"GET", 0, None, False),  # ended with its HEADERS, nothing announced
        (b"POST", 0, 0, False),  # an empty body that the upstream must be told of
        (b"POST", 7, 7, False),  # the whole body came before the exchange started
        (b"POST", None, None, True),  # DATA follow, of a length nobody announced
    ],
)
def test_framing_from_what_is_known_of_the_body(
    method: bytes, body_length: int | None, content_length: int | None, chunked: bool
) -> None:
    fields = [(b":method", method), *BASE[1:]]
    request = head(fields, body_length)
    assert (request.content_length, request.chunked) == (content_length, chunked)


# --- every refusal next to its accepted twin ------------------------------------------------

# name: (refused fields, its twin that is accepted, the status, the problem's start).
REFUSED: Final[dict[str, tuple[Fields, Fields, int, str]]] = {
    "empty name": ([*BASE, (b"", b"1")], [*BASE, (b"a", b"1")], 400, "empty field name"),
    "uppercase": ([*BASE, (b"X-Token", b"1")], [*BASE, (b"x-token", b"1")], 400, "uppercase"),
    "uppercase pseudo": (
        [(b":Method", b"GET"), *BASE[1:]],
        BASE,
        400,
        "uppercase",
    ),
    "underscore": ([*BASE, (b"x_token", b"1")], [*BASE, (b"x-token", b"1")], 400, "underscore"),
    "not a token": ([*BASE, (b"x(a)", b"1")], [*BASE, (b"x-a", b"1")], 400, "invalid field"),
    "colon inside": ([*BASE, (b"x:a", b"1")], [*BASE, (b"x-a", b"1")], 400, "invalid field"),
    "cr in value": ([*BASE, (b"x-a", b"1\r2")], [*BASE, (b"x-a", b"1\t2")], 400, "control"),
    "lf in value": ([*BASE, (b"x-a", b"1\n2")], [*BASE, (b"x-a", b"1 2")], 400, "control"),
    "nul in value": ([*BASE, (b"x-a", b"1\x002")], [*BASE, (b"x-a", b"12")], 400, "control"),
    "del in value": ([*BASE, (b"x-a", b"\x7f")], [*BASE, (b"x-a", b"~")], 400, "control"),
    "control in :path": (
        [*BASE[:3], (b":path", b"/a\rb")],
        [*BASE[:3], (b":path", b"/ab")],
        400,
        "control",
    ),
    "space before value": ([*BASE, (b"x-a", b" 1")], [*BASE, (b"x-a", b"1")], 400, "whitespace"),
    "tab after value": ([*BASE, (b"x-a", b"1\t")], [*BASE, (b"x-a", b"1")], 400, "whitespace"),
    "space around pseudo": (
        [(b":method", b" GET"), *BASE[1:]],
        BASE,
        400,
        "whitespace",
    ),
    "pseudo after field": (
        [*BASE[:3], (b"x-a", b"1"), BASE[3]],
        [*BASE, (b"x-a", b"1")],
        400,
        "pseudo-header ':path' after",
    ),
    "pseudo twice": ([*BASE, (b":path", b"/b")], BASE, 400, "pseudo-header ':path' twice"),
    ":protocol": ([*BASE, (b":protocol", b"websocket")], BASE, 400, "unknown pseudo-header"),
    ":status": ([*BASE, (b":status", b"200")], BASE, 400, "unknown pseudo-header"),
    "connection": (
        [*BASE, (b"connection", b"keep-alive")],
        BASE,
        400,
        "connection-specific field connection",
    ),
    "keep-alive": ([*BASE, (b"keep-alive", b"5")], BASE, 400, "connection-specific"),
    "proxy-connection": ([*BASE, (b"proxy-connection", b"x")], BASE, 400, "connection-specific"),
    "transfer-encoding": (
        [*BASE, (b"transfer-encoding", b"chunked")],
        BASE,
        400,
        "connection-specific",
    ),
    "upgrade": ([*BASE, (b"upgrade", b"websocket")], BASE, 400, "connection-specific"),
    "te gzip": ([*BASE, (b"te", b"gzip")], [*BASE, (b"te", b"trailers")], 400, "TE "),
    "too many fields": (
        [*BASE, *[(b"x-f%d" % i, b"v") for i in range(LIMITS.max_header_count + 1)]],
        [*BASE, *[(b"x-f%d" % i, b"v") for i in range(LIMITS.max_header_count)]],
        431,
        "more than",
    ),
    "too many cookies": (
        [*BASE, *[(b"cookie", b"c%d=1" % i) for i in range(LIMITS.max_header_count + 1)]],
        [*BASE, *[(b"cookie", b"c%d=1" % i) for i in range(LIMITS.max_header_count)]],
        431,
        "more than",
    ),
    "connect": ([(b":method", b"CONNECT"), *BASE[1:]], BASE, 405, "method CONNECT"),
    "trace": ([(b":method", b"TRACE"), *BASE[1:]], BASE, 405, "method TRACE"),
    "no :method": (BASE[1:], BASE, 400, "no :method"),
    "empty :method": ([(b":method", b""), *BASE[1:]], BASE, 400, "no :method"),
    "method not a token": ([(b":method", b"G(T"), *BASE[1:]], BASE, 400, "method"),
    "no :scheme": ([BASE[0], *BASE[2:]], BASE, 400, "no :scheme"),
    ":scheme ftp": ([BASE[0], (b":scheme", b"ftp"), *BASE[2:]], BASE, 400, ":scheme"),
    "no :path": (BASE[:3], BASE, 400, "no :path"),
    "fragment": ([*BASE[:3], (b":path", b"/a#b")], BASE, 400, "fragment"),
    "not origin-form": ([*BASE[:3], (b":path", b"a")], BASE, 400, ":path"),
    "star not options": (
        [*BASE[:3], (b":path", b"*")],
        [(b":method", b"OPTIONS"), *BASE[1:3], (b":path", b"*")],
        400,
        ":path * is only",
    ),
    "non-ascii path": ([*BASE[:3], (b":path", b"/\xe9")], BASE, 400, ":path has a byte"),
    "no authority": (
        [*BASE[:2], BASE[3]],
        [*BASE[:2], BASE[3], (b"host", b"api.example.com")],
        400,
        "neither",
    ),
    "two hosts": (
        [*BASE, (b"host", b"api.example.com"), (b"host", b"api.example.com")],
        [*BASE, (b"host", b"API.example.com")],
        400,
        "more than one Host",
    ),
    "authority and host disagree": (
        [*BASE, (b"host", b"evil.example")],
        [*BASE, (b"host", b"api.example.com")],
        400,
        ":authority",
    ),
    "bad authority": ([*BASE[:2], (b":authority", b"a b"), BASE[3]], BASE, 400, ":authority"),
    "two content-lengths": (
        [*BASE, (b"content-length", b"0"), (b"content-length", b"0")],
        [*BASE, (b"content-length", b"0")],
        400,
        "more than one Content-Length",
    ),
    "content-length not a number": (
        [*BASE, (b"content-length", b"+5")],
        [*BASE, (b"content-length", b"0")],
        400,
        "Content-Length",
    ),
    "content-length against the body": (
        [*BASE, (b"content-length", b"5")],
        [*BASE, (b"content-length", b"0")],
        400,
        "Content-Length 5 but the body has 0",
    ),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_with_its_status_and_the_twin_accepted(name: str) -> None:
    refused, twin, status, problem = REFUSED[name]
    failure = refusal(refused)
    assert (failure.status, failure.problem[: len(problem)]) == (status, problem)
    assert isinstance(head(twin), RequestHead)


def test_an_expect_other_than_continue_gets_417() -> None:
    assert refusal([*BASE, (b"expect", b"later")]).status == 417
    assert head([*BASE, (b"expect", b"100-continue")]).expect_continue


def test_the_first_rule_broken_is_the_one_named() -> None:
    """In the order of the fields: a bad value before an uppercase name, and the reverse."""
    assert "control" in refusal([*BASE, (b"x-a", b"\r"), (b"X-B", b"1")]).problem
    assert "uppercase" in refusal([*BASE, (b"X-B", b"1"), (b"x-a", b"\r")]).problem


# --- the whole-list shortcut against the field-by-field reading -----------------------------
# The reading as it was written first, field by field: the reference the shortcut is held to.

_REF_CONTROLS: Final = bytes([*range(0x09), *range(0x0A, 0x20), 0x7F])
_REF_NAME_CHARS: Final = b"!#$%&'*+-.^`|~0123456789abcdefghijklmnopqrstuvwxyz"
_REF_UPPERCASE: Final = bytes(range(ord("A"), ord("Z") + 1))


def _ref_refusal(problem: str) -> HttpRefusal:
    return HttpRefusal(400, problem, fault="client")


def _ref_check_field(name: bytes, value: bytes) -> None:
    if not name:
        raise _ref_refusal("empty field name")
    bare = name[1:] if name[:1] == b":" else name
    if bare.translate(None, _REF_NAME_CHARS):
        if name.translate(None, _REF_UPPERCASE) != name:
            raise _ref_refusal(
                f"uppercase in field name {snippet(name)} (HTTP/2 names are lowercase)"
            )
        if b"_" in name:
            raise _ref_refusal(f"underscore in field name {snippet(name)}")
        raise _ref_refusal(f"invalid field name {snippet(name)}")
    if any(byte in _REF_CONTROLS for byte in value):
        raise _ref_refusal(f"control character in the value of {snippet(name)}")
    if value and (value[:1] in b" \t" or value[-1:] in b" \t"):
        raise _ref_refusal(f"whitespace around the value of {snippet(name)}")


def _reference_head(
    fields: Sequence[tuple[bytes, bytes]], limits: HeadLimits, body_length: int | None
) -> RequestHead:
    pseudo: dict[bytes, bytes] = {}
    headers: list[tuple[bytes, bytes]] = []
    hosts: list[bytes] = []
    lengths: list[bytes] = []
    expect: list[bytes] = []
    cookies: list[bytes] = []
    cookie_at = -1
    for name, value in fields:
        _ref_check_field(name, value)
        if name[:1] == b":":
            if headers or cookies or hosts:
                raise _ref_refusal(f"pseudo-header {snippet(name)} after a regular field")
            if name not in {b":method", b":scheme", b":authority", b":path"}:
                raise _ref_refusal(f"unknown pseudo-header {snippet(name)}")
            if name in pseudo:
                raise _ref_refusal(f"pseudo-header {snippet(name)} twice")
            pseudo[name] = value
            continue
        if name in {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding"}:
            raise _ref_refusal(f"connection-specific field {name.decode()} in HTTP/2")
        if name == b"upgrade":
            raise _ref_refusal(f"connection-specific field {name.decode()} in HTTP/2")
        if name == b"te" and value.lower() != b"trailers":
            raise _ref_refusal(f"TE {snippet(value)} (only trailers is allowed in HTTP/2)")
        if name == b"cookie":
            if cookie_at < 0:
                cookie_at = len(headers)
            cookies.append(value)
            continue
        if name == b"host":
            hosts.append(value)
        elif name == b"content-length":
            lengths.append(value)
        elif name == b"expect":
            expect.append(value)
        headers.append((name, value))
    if len(headers) + len(cookies) > limits.max_header_count:
        raise HttpRefusal(431, f"more than {limits.max_header_count} header fields", fault="client")
    if cookies:
        headers.insert(cookie_at, (b"cookie", b"; ".join(cookies)))
    # What follows the fields is not part of the shortcut: the module's own helpers.
    method = pseudo.get(b":method")
    if not method:
        raise _ref_refusal("no :method")
    if method.translate(None, _REF_NAME_CHARS.upper() + _REF_NAME_CHARS + b"_"):
        raise _ref_refusal(f"method {snippet(method)} is not a token")
    if method in {b"CONNECT", b"TRACE"}:
        raise HttpRefusal(405, f"method {method.decode()} not allowed", fault="client")
    scheme = pseudo.get(b":scheme")
    if scheme not in {b"https", b"http"}:
        raise _ref_refusal("no :scheme" if scheme is None else f":scheme {snippet(scheme)}")
    target = h2fields._target(method, pseudo.get(b":path"))
    host = h2fields._authority(pseudo.get(b":authority"), hosts)
    content_length = h2fields._content_length(lengths, body_length)
    chunked = False
    if content_length is None and body_length is not None:
        content_length = (
            body_length if body_length or method in {b"POST", b"PUT", b"PATCH"} else None
        )
    elif content_length is None:
        chunked = True
    return RequestHead(
        method,
        target,
        b"2",
        tuple(headers),
        host,
        content_length,
        chunked,
        bool(expect) and expects_continue(expect),
    )


def _outcome(read: Callable[[], RequestHead]) -> object:
    try:
        return read()
    except HttpRefusal as exc:
        return ("HttpRefusal", exc.status, exc.problem, exc.fault)


# Pieces that reach every rule: pseudo-headers known and not, names of every kind (watched
# ones, uppercase, underscore, a colon, non-token bytes, empty), and value bytes a field may
# hold and may not (CR, LF, NUL, DEL, whitespace at an edge, the joining byte LF itself).
_NAMES: Final = [
    b":method", b":scheme", b":authority", b":path", b":protocol", b":Path", b":",
    b"host", b"cookie", b"content-length", b"expect", b"te", b"connection", b"upgrade",
    b"user-agent", b"x-a", b"X-A", b"x_a", b"x:a", b"a b", b"\xe9", b"", b"x\na", b"x\t",
]  # fmt: skip
_VALUES: Final = [
    b"", b" ", b"\t", b"GET", b"POST", b"https", b"/", b"/p?q", b"api.example.com",
    b"API.example.com:443", b"5", b"0", b"100-continue", b"trailers", b"a=1", b"v a l",
    b"caf\xe9", b"\r", b"\n", b"\x00", b"\x7f", b"\x0b", b"\r\n", b"x\ny", b" x", b"x ",
]  # fmt: skip
_BASE_START: Final = st.permutations(BASE) | st.sampled_from([BASE[:3], [BASE[0], *BASE[2:]], []])
_field_lists = st.tuples(
    _BASE_START,
    st.lists(
        st.tuples(
            st.sampled_from(_NAMES),
            st.lists(st.sampled_from(_VALUES), max_size=3).map(b"".join),
        ),
        max_size=6,
    ),
    st.booleans(),
).map(lambda parts: [*parts[1], *parts[0]] if parts[2] else [*parts[0], *parts[1]])


@settings(max_examples=examples(EXAMPLES))
@given(
    fields=_field_lists,
    body_length=st.sampled_from([None, 0, 5]),
    max_fields=st.sampled_from([2, 100]),
)
def test_fields_read_as_field_by_field(
    fields: Fields, body_length: int | None, max_fields: int
) -> None:
    """The whole-list checks and the shortcut past the one-by-one loop agree with the
    field-by-field reading: the same head, or the same refusal (the first rule broken)."""
    limits = HeadLimits(max_header_count=max_fields)
    assert _outcome(
        lambda: stream_request_head(fields, limits, body_length=body_length)
    ) == _outcome(lambda: _reference_head(fields, limits, body_length))
