"""heads.py: every smuggling shape refused with its status next to the valid twin it was bent
from, the head finder fed whole, byte by byte and with trailing bytes, Hypothesis on
arbitrary and head-shaped bytes, h11 reading every head we accept as we do, golden bytes for
the head writers, and each shortcut of the checks against the plain reading it replaced."""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial
from ipaddress import IPv6Address
from typing import Final

import h11
import pytest
from helpers.messages import GET, HOST, plain_close, request, response
from helpers.profiles import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from dualproxy.config.schema import Limits
from dualproxy.http.errors import HttpRefusal, snippet
from dualproxy.http.fields import REQUEST_AS_IS_DROPPED, RESPONSE_DROPPED
from dualproxy.http.heads import (
    MAX_CONTENT_LENGTH_DIGITS,
    MAX_LEADING_EMPTY_LINES,
    MAX_RESPONSE_HEAD_BYTES,
    HeadLimits,
    RequestHead,
    ResponseHead,
    check_request_head,
    check_response_head,
    find_head_end,
    request_head,
    response_head,
)

LIMITS: Final = HeadLimits()
# Hypothesis examples per property: enough to reach every rule many times while the whole
# file stays within a few seconds.
EXAMPLES: Final = 200


def padded(size: int, *, line: bytes = GET) -> bytes:
    """A valid request head of exactly `size` bytes (one X-Pad field absorbs the rest)."""
    bare = request(HOST, b"X-Pad: ", line=line)
    return request(HOST, b"X-Pad: " + b"p" * (size - len(bare)), line=line)


def many_fields(count: int) -> bytes:
    return request(HOST, *(b"X-F%d: v" % i for i in range(count - 1)))


def long_line(length: int) -> bytes:
    """A request line of exactly `length` bytes."""
    return b"GET /" + b"a" * (length - len(b"GET / HTTP/1.1")) + b" HTTP/1.1"


# --- request heads: smuggling shapes and their valid twins ------------------------------

# id: (valid twin, the same head bent one way, the status and problem it must get).
REQUEST_TWINS: Final[dict[str, tuple[bytes, bytes, int, str]]] = {
    # Content-Length with Transfer-Encoding, in both orders (CL.TE and TE.CL).
    "cl+te": (
        request(HOST, b"Content-Length: 5"),
        request(HOST, b"Content-Length: 5", b"Transfer-Encoding: chunked"),
        400,
        "both Content-Length and Transfer-Encoding",
    ),
    "te+cl": (
        request(HOST, b"Transfer-Encoding: chunked"),
        request(HOST, b"Transfer-Encoding: chunked", b"Content-Length: 5"),
        400,
        "both Content-Length and Transfer-Encoding",
    ),
    "cl-duplicate-identical": (
        request(HOST, b"Content-Length: 5"),
        request(HOST, b"Content-Length: 5", b"Content-Length: 5"),
        400,
        "more than one Content-Length",
    ),
    "cl-list": (
        request(HOST, b"Content-Length: 5"),
        request(HOST, b"Content-Length: 5, 5"),
        400,
        "not a number",
    ),
    "cl-plus": (
        request(HOST, b"Content-Length: 5"),
        request(HOST, b"Content-Length: +5"),
        400,
        "not a number",
    ),
    "cl-minus": (
        request(HOST, b"Content-Length: 0"),
        request(HOST, b"Content-Length: -0"),
        400,
        "not a number",
    ),
    "cl-hex": (
        request(HOST, b"Content-Length: 10"),
        request(HOST, b"Content-Length: 0x10"),
        400,
        "not a number",
    ),
    "cl-empty": (
        request(HOST, b"Content-Length: 0"),
        request(HOST, b"Content-Length:"),
        400,
        "not a number",
    ),
    "cl-digits": (
        request(HOST, b"Content-Length: " + b"9" * 18),
        request(HOST, b"Content-Length: " + b"0" * 19),
        400,
        "more than 18 digits",
    ),
    # OWS (SP, HT) around a value is stripped; other whitespace is not OWS.
    "cl-ows": (
        request(HOST, b"Content-Length: \t 5 \t"),
        request(HOST, b"Content-Length: \x0b5"),
        400,
        "control character",
    ),
    "cl-inner-space": (
        request(HOST, b"Content-Length:  5"),
        request(HOST, b"Content-Length: 5 5"),
        400,
        "not a number",
    ),
    "te-chunked-twice": (
        request(HOST, b"Transfer-Encoding: chunked"),
        request(HOST, b"Transfer-Encoding: chunked, chunked"),
        400,
        "chunked more than once",
    ),
    "te-two-fields": (
        request(HOST, b"Transfer-Encoding: chunked"),
        request(HOST, b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"),
        400,
        "more than one Transfer-Encoding",
    ),
    # chunked last, but a coding we do not implement before it: 501 (RFC 9112 §6.1).
    "te-gzip-chunked": (
        request(HOST, b"Transfer-Encoding: chunked"),
        request(HOST, b"Transfer-Encoding: gzip, chunked"),
        501,
        "only chunked is implemented",
    ),
    # chunked not last: the length cannot be determined, 400 (RFC 9112 §6.3).
    "te-chunked-gzip": (
        request(HOST, b"Transfer-Encoding: chunked"),
        request(HOST, b"Transfer-Encoding: chunked, gzip"),
        400,
        "does not end with chunked",
    ),
    "te-xchunked": (
        request(HOST, b"Transfer-Encoding: chunked"),
        request(HOST, b"Transfer-Encoding: xchunked"),
        400,
        "does not end with chunked",
    ),
    "te-identity": (
        request(HOST, b"Transfer-Encoding: chunked"),
        request(HOST, b"Transfer-Encoding: identity"),
        400,
        "does not end with chunked",
    ),
    "te-parameter": (
        request(HOST, b"Transfer-Encoding: CHUNKED"),
        request(HOST, b"Transfer-Encoding: chunked;x=1"),
        400,
        "malformed Transfer-Encoding",
    ),
    "te-space-before-colon": (
        request(HOST, b"Transfer-Encoding: chunked"),
        request(HOST, b"Transfer-Encoding : chunked"),
        400,
        "whitespace between field name",
    ),
    "te-underscore": (
        request(HOST, b"Transfer-Encoding: chunked"),
        request(HOST, b"Transfer_Encoding: chunked"),
        400,
        "underscore in field name",
    ),
    "te-obs-fold": (
        request(HOST, b"Transfer-Encoding: chunked"),
        request(HOST, b"Transfer-Encoding:", b" chunked"),
        400,
        "obs-fold",
    ),
    "te-http10": (
        request(HOST, b"Transfer-Encoding: chunked"),
        request(HOST, b"Transfer-Encoding: chunked", line=b"POST / HTTP/1.0"),
        400,
        "Transfer-Encoding in an HTTP/1.0",
    ),
    "obs-fold-tab": (request(HOST, b"X-A: a b"), request(HOST, b"X-A: a", b"\tb"), 400, "obs-fold"),
    # RFC 9112 §2.2: whitespace between the start line and the first field line.
    "space-before-first-field": (request(HOST), request(b" " + HOST), 400, "obs-fold"),
    "bare-lf": (
        request(HOST, b"X-A: 1"),
        request(HOST, b"X-A: 1").replace(b"\r\n", b"\n"),
        400,
        "bare LF",
    ),
    "bare-lf-one-line": (
        request(HOST, b"X-A: 1", b"X-B: 2"),
        request(HOST, b"X-A: 1\nX-B: 2"),
        400,
        "bare LF",
    ),
    "bare-cr": (
        request(HOST, b"X-A: 1", b"X-B: 2"),
        request(HOST, b"X-A: 1\rX-B: 2"),
        400,
        "bare CR",
    ),
    "nul-in-value": (
        request(HOST, b"X-A: ab"),
        request(HOST, b"X-A: a\x00b"),
        400,
        "control character",
    ),
    "del-in-value": (
        request(HOST, b"X-A: ab"),
        request(HOST, b"X-A: a\x7fb"),
        400,
        "control character",
    ),
    "control-in-name": (
        request(HOST, b"X-A: ab"),
        request(HOST, b"X-\x01A: ab"),
        400,
        "control character",
    ),
    "empty-field-name": (request(HOST, b"X: v"), request(HOST, b": v"), 400, "invalid field name"),
    "no-colon": (request(HOST, b"X-A: v"), request(HOST, b"X-A v"), 400, "no colon"),
    "name-not-token": (
        request(HOST, b"X-A: v"),
        request(HOST, b"X@A: v"),
        400,
        "invalid field name",
    ),
    "empty-line-inside": (
        request(HOST, b"X-A: v"),
        request(HOST, b"", b"X-A: v"),
        400,
        "empty line inside",
    ),
    # RFC 9112 §2.2: a server SHOULD ignore at least one; Apache ignores up to 10.
    "leading-empty-lines": (
        b"\r\n" * MAX_LEADING_EMPTY_LINES + request(HOST),
        b"\r\n" * (MAX_LEADING_EMPTY_LINES + 1) + request(HOST),
        400,
        "more than 10 empty lines before the request line",
    ),
    "leading-bare-lf": (b"\r\n" + request(HOST), b"\n" + request(HOST), 400, "bare LF"),
    "empty-line-then-bare-lf": (
        b"\r\n" + request(HOST),
        b"\r\n\n" + request(HOST),
        400,
        "bare LF",
    ),
    "missing-host-1.1": (request(HOST), request(b"X-A: v"), 400, "without Host"),
    "two-hosts": (request(HOST), request(HOST, HOST), 400, "more than one Host"),
    "host-empty": (request(HOST), request(b"Host:"), 400, "not host"),
    "host-list": (request(HOST), request(b"Host: api.example.com, evil.example"), 400, "not host"),
    "host-userinfo": (request(HOST), request(b"Host: user@api.example.com"), 400, "not host"),
    "host-space": (request(HOST), request(b"Host: api example.com"), 400, "not host"),
    "host-port-range": (
        request(b"Host: api.example.com:65535"),
        request(b"Host: api.example.com:65536"),
        400,
        "not host",
    ),
    "host-empty-port": (
        request(b"Host: api.example.com:1"),
        request(b"Host: api.example.com:"),
        400,
        "not host",
    ),
    "host-ipv6": (
        request(b"Host: [2001:db8::1]:8443"),
        request(b"Host: [2001:db8:::1]:8443"),
        400,
        "not host",
    ),
    "host-ipv6-unbracketed": (request(b"Host: [::1]"), request(b"Host: ::1"), 400, "not host"),
    "host-percent": (request(b"Host: a.example"), request(b"Host: a%2e.example"), 400, "not host"),
    "star-with-get": (
        request(HOST, line=b"OPTIONS * HTTP/1.1"),
        request(HOST, line=b"GET * HTTP/1.1"),
        400,
        "only for OPTIONS",
    ),
    "authority-form": (
        request(HOST, line=b"GET http://api.example.com:443/ HTTP/1.1"),
        request(HOST, line=b"GET api.example.com:443 HTTP/1.1"),
        400,
        "not origin- or absolute-form",
    ),
    "other-scheme": (
        request(HOST, line=b"GET https://api.example.com/x HTTP/1.1"),
        request(HOST, line=b"GET ftp://api.example.com/x HTTP/1.1"),
        400,
        "not origin- or absolute-form",
    ),
    "absolute-form-bad-authority": (
        request(HOST, line=b"GET http://api.example.com/x HTTP/1.1"),
        request(HOST, line=b"GET http://u@api.example.com/x HTTP/1.1"),
        400,
        "target authority",
    ),
    "fragment": (
        request(HOST, line=b"GET /a?b HTTP/1.1"),
        request(HOST, line=b"GET /a#b HTTP/1.1"),
        400,
        "fragment",
    ),
    "target-not-ascii": (
        request(HOST, line=b"GET /caf%C3%A9 HTTP/1.1"),
        request(HOST, line=b"GET /caf\xc3\xa9 HTTP/1.1"),
        400,
        "not visible ASCII",
    ),
    "connect": (
        request(HOST, line=b"OPTIONS http://api.example.com:443 HTTP/1.1"),
        request(HOST, line=b"CONNECT api.example.com:443 HTTP/1.1"),
        405,
        "CONNECT not allowed",
    ),
    "trace": (
        request(HOST, line=b"GET / HTTP/1.1"),
        request(HOST, line=b"TRACE / HTTP/1.1"),
        405,
        "TRACE not allowed",
    ),
    "http2-line": (request(HOST), request(HOST, line=b"GET / HTTP/2.0"), 505, "HTTP/2.0"),
    "h2-preface": (request(HOST), b"PRI * HTTP/2.0\r\n\r\n", 505, "HTTP/2.0"),
    "http-1.2": (request(HOST), request(HOST, line=b"GET / HTTP/1.2"), 505, "HTTP/1.2"),
    "http-0.9": (
        request(HOST, line=b"GET / HTTP/1.0"),
        request(line=b"GET /"),
        400,
        "not METHOD SP TARGET SP VERSION",
    ),
    "version-lowercase": (
        request(HOST),
        request(HOST, line=b"GET / http/1.1"),
        400,
        "not an HTTP version",
    ),
    "version-two-digits": (
        request(HOST),
        request(HOST, line=b"GET / HTTP/1.10"),
        400,
        "not an HTTP version",
    ),
    "double-space": (
        request(HOST),
        request(HOST, line=b"GET  / HTTP/1.1"),
        400,
        "not METHOD SP TARGET SP VERSION",
    ),
    "tab-separator": (
        request(HOST),
        request(HOST, line=b"GET\t/ HTTP/1.1"),
        400,
        "not METHOD SP TARGET SP VERSION",
    ),
    "trailing-space": (
        request(HOST),
        request(HOST, line=b"GET / HTTP/1.1 "),
        400,
        "not METHOD SP TARGET SP VERSION",
    ),
    "method-not-token": (request(HOST), request(HOST, line=b"G(T / HTTP/1.1"), 400, "not a token"),
    "request-line-too-long": (
        request(HOST, line=long_line(LIMITS.max_request_line_bytes)),
        request(HOST, line=long_line(LIMITS.max_request_line_bytes + 1)),
        414,
        "request line longer than 8192",
    ),
    "too-many-fields": (
        many_fields(LIMITS.max_header_count),
        many_fields(LIMITS.max_header_count + 1),
        431,
        "more than 100 header fields",
    ),
    "head-too-long": (
        padded(LIMITS.max_header_bytes),
        padded(LIMITS.max_header_bytes + 1),
        431,
        "head longer than 16384",
    ),
    "expect-other": (
        request(HOST, b"Expect: 100-continue"),
        request(HOST, b"Expect: something-else"),
        417,
        "unsupported expectation",
    ),
    "expect-list": (
        request(HOST, b"Expect: 100-Continue"),
        request(HOST, b"Expect: 100-continue, x"),
        417,
        "unsupported expectation",
    ),
}


@pytest.mark.parametrize(
    ("valid", "invalid", "status", "problem"), REQUEST_TWINS.values(), ids=REQUEST_TWINS.keys()
)
def test_request_shape_refused_with_status_and_twin_accepted(
    valid: bytes, invalid: bytes, status: int, problem: str
) -> None:
    assert isinstance(check_request_head(valid, LIMITS), RequestHead)
    with pytest.raises(HttpRefusal) as refused:
        check_request_head(invalid, LIMITS)
    assert refused.value.status == status
    assert problem in refused.value.problem


def test_content_length_read() -> None:
    head = check_request_head(request(HOST, b"Content-Length:  \t 0042 "), LIMITS)
    assert (head.content_length, head.chunked) == (42, False)
    assert (b"content-length", b"0042") in head.headers


def test_chunked_read_in_any_case() -> None:
    head = check_request_head(request(HOST, b"transfer-encoding: ChunKed"), LIMITS)
    assert (head.content_length, head.chunked) == (None, True)


def test_no_body_framing() -> None:
    head = check_request_head(request(HOST), LIMITS)
    assert (head.content_length, head.chunked, head.expect_continue) == (None, False, False)


def test_golden_request_head() -> None:
    head = check_request_head(
        request(
            b"Host: api.example.com:8443",
            b"User-Agent: okhttp/4.12.0",
            b"X-Obs-Text: caf\xe9\tau lait ",
            b"Content-Length: 3",
            line=b"POST /v1/items?x=%20 HTTP/1.1",
        ),
        LIMITS,
    )
    assert head == RequestHead(
        method=b"POST",
        target=b"/v1/items?x=%20",
        version=b"1.1",
        headers=(
            (b"host", b"api.example.com:8443"),
            (b"user-agent", b"okhttp/4.12.0"),
            (b"x-obs-text", b"caf\xe9\tau lait"),
            (b"content-length", b"3"),
        ),
        host=b"api.example.com:8443",
        content_length=3,
        chunked=False,
        expect_continue=False,
        close=False,
        forward=(b"User-Agent: okhttp/4.12.0", b"X-Obs-Text: caf\xe9\tau lait "),
    )


def test_method_kept_as_sent() -> None:
    """Methods are case-sensitive: "get" is not GET, and is the upstream's to refuse."""
    assert check_request_head(request(HOST, line=b"get / HTTP/1.1"), LIMITS).method == b"get"


def test_options_star() -> None:
    head = check_request_head(request(HOST, line=b"OPTIONS * HTTP/1.1"), LIMITS)
    assert (head.method, head.target) == (b"OPTIONS", b"*")


@pytest.mark.parametrize(
    ("line", "target", "host"),
    [
        (b"GET http://api.example.com/v1?a=1 HTTP/1.1", b"/v1?a=1", b"api.example.com"),
        (b"GET HTTPS://api.example.com:8443 HTTP/1.1", b"/", b"api.example.com:8443"),
        (b"GET http://api.example.com?a=1 HTTP/1.1", b"/?a=1", b"api.example.com"),
        (b"GET http://[2001:db8::1]/x HTTP/1.1", b"/x", b"[2001:db8::1]"),
        # RFC 9112 §3.2.4: OPTIONS for the whole server, in absolute-form, becomes "*".
        (b"OPTIONS http://api.example.com HTTP/1.1", b"*", b"api.example.com"),
        (b"OPTIONS http://api.example.com/ HTTP/1.1", b"/", b"api.example.com"),
    ],
)
def test_absolute_form_converted_and_host_field_ignored(
    line: bytes, target: bytes, host: bytes
) -> None:
    head = check_request_head(request(b"Host: other.example", line=line), LIMITS)
    assert (head.target, head.host) == (target, host)


def test_absolute_form_still_needs_a_valid_host_field_on_http11() -> None:
    line = b"GET http://api.example.com/ HTTP/1.1"
    for fields in [(), (b"Host: a b",), (HOST, HOST)]:
        with pytest.raises(HttpRefusal) as refused:
            check_request_head(request(*fields, line=line), LIMITS)
        assert refused.value.status == 400


def test_http10_without_host() -> None:
    head = check_request_head(request(line=b"GET / HTTP/1.0"), LIMITS)
    assert (head.version, head.host) == (b"1.0", b"")


def test_http10_with_host() -> None:
    head = check_request_head(request(HOST, line=b"GET / HTTP/1.0"), LIMITS)
    assert head.host == b"api.example.com"


@pytest.mark.parametrize(
    ("fields", "expect_continue"),
    [
        ((b"Expect: 100-continue",), True),
        ((b"Expect: 100-CONTINUE",), True),
        ((b"Expect:",), False),  # an empty list asks for nothing (RFC 9110 §5.6.1)
        ((), False),
    ],
)
def test_expect_continue(fields: tuple[bytes, ...], expect_continue: bool) -> None:
    head = check_request_head(request(HOST, *fields, b"Content-Length: 10"), LIMITS)
    assert head.expect_continue is expect_continue


def test_expect_continue_ignored_on_http10() -> None:
    """RFC 9110 §10.1.1: a server MUST ignore 100-continue in an HTTP/1.0 request."""
    line = b"POST / HTTP/1.0"
    head = check_request_head(request(b"Expect: 100-continue", line=line), LIMITS)
    assert head.expect_continue is False


def test_error_problem_is_bounded_and_escaped() -> None:
    evil = b"\xff\r\n<script>" * 1000
    with pytest.raises(HttpRefusal) as refused:
        check_request_head(request(HOST, b"Content-Length: 5" + evil.replace(b"\r\n", b"")), LIMITS)
    problem = refused.value.problem
    assert len(problem) < 120
    assert problem.isascii()
    assert problem.isprintable()
    assert "\\xff" in problem


def test_limits_from_config() -> None:
    limits = Limits(max_request_line_bytes=1000, max_header_bytes=2000, max_header_count=10)
    assert HeadLimits.from_limits(limits) == HeadLimits(1000, 2000, 10)
    assert HeadLimits.from_limits(Limits()) == HeadLimits()


# --- finding the end of a head ----------------------------------------------------------


def test_head_end_whole_and_with_trailing_bytes() -> None:
    head = request(HOST, b"Content-Length: 5")
    assert find_head_end(head, LIMITS) == len(head)
    assert find_head_end(head + b"hello" + request(HOST), LIMITS) == len(head)
    assert find_head_end(head[:-1], LIMITS) is None
    assert find_head_end(b"", LIMITS) is None


def test_head_end_accepts_a_bytearray() -> None:
    head = request(HOST)
    assert find_head_end(bytearray(head + b"body"), LIMITS) == len(head)


def test_head_end_split_across_reads() -> None:
    """A CRLF CRLF straddling two reads is found when `start` is the previous length."""
    head = request(HOST)
    for cut in range(len(head) - 4, len(head)):
        assert find_head_end(head[:cut], LIMITS) is None
        assert find_head_end(head, LIMITS, start=cut) == len(head)


def test_request_line_too_long_found_as_soon_as_it_shows() -> None:
    """414 is decidable at max+2 bytes without a CRLF, not earlier, and not when it fits."""
    limit = LIMITS.max_request_line_bytes
    line = long_line(limit + 1) + b"\r\n"
    assert find_head_end(line[: limit + 1], LIMITS) is None
    with pytest.raises(HttpRefusal) as refused:
        find_head_end(line[: limit + 2], LIMITS)
    assert refused.value.status == 414
    with pytest.raises(HttpRefusal):
        find_head_end(line[: limit + 2], LIMITS, start=limit + 1)
    fits = long_line(limit) + b"\r\n"
    assert find_head_end(fits, LIMITS) is None
    assert find_head_end(fits + b"Host: a\r\n\r\n", LIMITS) == len(fits) + len(b"Host: a\r\n\r\n")


def test_head_too_long_found_as_soon_as_it_shows() -> None:
    head = padded(LIMITS.max_header_bytes + 1)
    assert find_head_end(head[: LIMITS.max_header_bytes - 1], LIMITS) is None
    with pytest.raises(HttpRefusal) as refused:
        find_head_end(head[: LIMITS.max_header_bytes], LIMITS)
    assert refused.value.status == 431
    with pytest.raises(HttpRefusal):
        find_head_end(head, LIMITS)
    fits = padded(LIMITS.max_header_bytes)
    assert find_head_end(fits + b"body", LIMITS) == LIMITS.max_header_bytes


# Heads with bare-LF line endings, in whole or in part; all but one hold no CRLF CRLF.
BARE_LF_HEADS: Final = {
    "all-lf": request(HOST, b"X-A: 1").replace(b"\r\n", b"\n"),
    "lf-lines-crlf-end": request(HOST).replace(b"\r\n", b"\n")[:-1] + b"\r\n",
    "crlf-lines-lf-end": request(HOST)[:-2] + b"\n",
    "lf-request-line": GET + b"\n" + HOST + b"\r\n\r\n",
    "empty-line-then-lf": b"\r\n" + request(HOST).replace(b"\r\n", b"\n"),
}


@pytest.mark.parametrize("head", BARE_LF_HEADS.values(), ids=BARE_LF_HEADS.keys())
def test_a_bare_lf_head_is_found_at_its_end_and_refused(head: bytes) -> None:
    """Its end is found as a CRLF head's would be (whole, byte by byte, with a body after it),
    so the check refuses it at once, 400, rather than the client waiting for a 408."""
    assert find_head_end(head + b"body", LIMITS) == len(head)
    start = 0
    for end in range(1, len(head)):
        assert find_head_end(head[:end], LIMITS, start=start) is None
        start = end
    assert find_head_end(head, LIMITS, start=start) == len(head)
    with pytest.raises(HttpRefusal, match="bare LF") as refused:
        check_request_head(head, LIMITS)
    assert refused.value.status == 400


def test_a_bare_lf_response_head_is_found_and_refused() -> None:
    head = response(CL).replace(b"\r\n", b"\n")
    assert find_head_end(head + b"hello", LIMITS, response=True) == len(head)
    with pytest.raises(HttpRefusal, match="bare LF") as refused:
        check_response_head(head, request_method=b"GET")
    assert refused.value.status == 502


@pytest.mark.parametrize("empty_lines", [1, 2, MAX_LEADING_EMPTY_LINES])
def test_empty_lines_before_the_request_line_are_ignored(empty_lines: int) -> None:
    head = b"\r\n" * empty_lines + request(HOST, b"X-A: 1")
    assert find_head_end(head + b"body", LIMITS) == len(head)
    start = 0
    for end in range(1, len(head)):
        assert find_head_end(head[:end], LIMITS, start=start) is None
        start = end
    assert find_head_end(head, LIMITS, start=start) == len(head)
    assert check_request_head(head, LIMITS) == check_request_head(request(HOST, b"X-A: 1"), LIMITS)


def test_one_empty_line_too_many_is_refused_as_soon_as_it_arrives() -> None:
    lines = b"\r\n" * (MAX_LEADING_EMPTY_LINES + 1)
    assert find_head_end(lines[:-1], LIMITS) is None
    with pytest.raises(HttpRefusal, match="more than 10 empty lines") as refused:
        find_head_end(lines, LIMITS)
    assert refused.value.status == 400
    with pytest.raises(HttpRefusal):
        find_head_end(lines + request(HOST), LIMITS, start=len(lines) - 1)


def test_a_response_gets_no_empty_lines_ignored() -> None:
    head = b"\r\n" + response(CL)
    assert find_head_end(head, LIMITS, response=True) == len(head)
    with pytest.raises(HttpRefusal, match="malformed status line") as refused:
        check_response_head(head, request_method=b"GET")
    assert refused.value.status == 502


def test_request_line_bound_starts_after_the_empty_lines() -> None:
    limit = LIMITS.max_request_line_bytes
    fits = b"\r\n" * 3 + long_line(limit) + b"\r\n"
    assert find_head_end(fits, LIMITS) is None
    assert check_request_head(fits + HOST + b"\r\n\r\n", LIMITS).method == b"GET"
    too_long = b"\r\n" * 3 + long_line(limit + 1) + b"\r\n"
    with pytest.raises(HttpRefusal) as refused:
        find_head_end(too_long, LIMITS)
    assert refused.value.status == 414


def test_response_head_end_uses_the_response_bound() -> None:
    """A response is not held to the client limits, but to MAX_RESPONSE_HEAD_BYTES, as 502."""
    tiny = HeadLimits(max_request_line_bytes=10, max_header_bytes=20, max_header_count=1)
    head = response(b"Set-Cookie: " + b"c" * 5000)
    assert find_head_end(head, tiny, response=True) == len(head)
    endless = b"HTTP/1.1 200 OK\r\nX: " + b"x" * MAX_RESPONSE_HEAD_BYTES
    assert find_head_end(endless[: MAX_RESPONSE_HEAD_BYTES - 1], tiny, response=True) is None
    with pytest.raises(HttpRefusal) as refused:
        find_head_end(endless, tiny, response=True)
    assert refused.value.status == 502


# --- Hypothesis ---------------------------------------------------------------------------

_NAME_CHARS: Final = "!#$%&'*+-.^`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_WATCHED: Final = {"host", "content-length", "transfer-encoding", "expect"}
_field_names = st.text(_NAME_CHARS, min_size=1, max_size=20).filter(
    lambda name: name.lower() not in _WATCHED
)
# Visible ASCII, obs-text, SP and HT: every byte a field value may hold.
_field_values = st.binary(max_size=40).map(
    lambda raw: bytes(b if 0x20 <= b != 0x7F or b == 0x09 else 0x20 for b in raw)
)
_targets = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="#"), max_size=30
).map(lambda path: b"/" + path.encode())


@st.composite
def valid_requests(draw: st.DrawFn) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """A valid request head, and the (lowercase name, stripped value) fields it holds."""
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"M-SEARCH"]))
    version = draw(st.sampled_from([b"1.1", b"1.0"]))
    fields = [(b"Host", b"api.example.com")]
    fields += [
        (name.encode(), value)
        for name, value in draw(st.lists(st.tuples(_field_names, _field_values), max_size=8))
    ]
    line = method + b" " + draw(_targets) + b" HTTP/" + version
    head = request(*(name + b":" + value for name, value in fields), line=line)
    return head, [(name.lower(), value.strip(b" \t")) for name, value in fields]


# Pieces of heads, valid and not, so that random strings of them reach deep into the checks.
_FRAGMENTS: Final = [
    b"\r\n", b"\r\n\r\n", b"\n", b"\r", b" ", b"\t", b":", b",", b"\x00", b"_", b"#", b"*",
    b"GET", b"OPTIONS", b"CONNECT", b"/", b"http://", b"[::1]", b"@", b"HTTP/1.1", b"HTTP/1.0",
    b"HTTP/2.0", b"HTTP/1.1 200 OK", b"Host", b"Content-Length", b"Transfer-Encoding",
    b"chunked", b"gzip", b"5", b"+", b"Expect", b"100-continue", b"Connection", b"\xff",
]  # fmt: skip
_head_shaped = st.lists(st.sampled_from(_FRAGMENTS) | st.binary(max_size=4), max_size=40).map(
    b"".join
)


REQUEST_REFUSALS: Final = {
    ("HttpRefusal", status) for status in (400, 405, 414, 417, 431, 501, 505)
}


def _outcome(check: Callable[[], object]) -> object:
    """What `check` returns, or ("HttpRefusal", status) when it raises HttpRefusal; any other
    exception fails the test."""
    try:
        return check()
    except HttpRefusal as exc:
        return ("HttpRefusal", exc.status)


@settings(max_examples=examples(EXAMPLES))
@given(data=st.binary(max_size=300) | _head_shaped)
def test_arbitrary_bytes_give_a_head_or_head_error(data: bytes) -> None:
    for candidate in (data, data + b"\r\n\r\n"):
        request_outcome = _outcome(partial(check_request_head, candidate, LIMITS))
        assert isinstance(request_outcome, RequestHead) or request_outcome in REQUEST_REFUSALS
        check_response = partial(check_response_head, candidate, request_method=b"GET")
        response_outcome = _outcome(check_response)
        assert isinstance(response_outcome, ResponseHead) or response_outcome == (
            "HttpRefusal",
            502,
        )


@settings(max_examples=examples(EXAMPLES))
@given(data=_head_shaped, chunks=st.lists(st.integers(1, 16), min_size=1))
def test_incremental_finding_agrees_with_one_call(data: bytes, chunks: list[int]) -> None:
    """Fed in reads of any size with the `start` hint, the finder answers as it would on the
    whole prefix: same index, same error, at the same read."""
    tiny = HeadLimits(max_request_line_bytes=20, max_header_bytes=60, max_header_count=5)
    start = 0
    for size in [*chunks, len(data)]:
        prefix = data[: start + size]
        got = _outcome(partial(find_head_end, prefix, tiny, start=start))
        assert got == _outcome(partial(find_head_end, prefix, tiny))
        if got is not None:
            return
        start = len(prefix)


@settings(max_examples=examples(EXAMPLES))
@given(case=valid_requests(), trailing=st.binary(max_size=20))
def test_valid_head_found_byte_by_byte_then_accepted(
    case: tuple[bytes, list[tuple[bytes, bytes]]], trailing: bytes
) -> None:
    head, fields = case
    start = 0
    for end in range(1, len(head)):
        assert find_head_end(head[:end], LIMITS, start=start) is None
        start = end
    assert find_head_end(head, LIMITS, start=start) == len(head)
    assert find_head_end(head + trailing, LIMITS) == len(head)
    assert find_head_end(head + trailing, LIMITS, start=len(head) - 1) == len(head)
    assert list(check_request_head(head, LIMITS).headers) == fields


@settings(max_examples=examples(EXAMPLES))
@given(case=valid_requests())
def test_h11_reads_what_we_accept_as_we_do(case: tuple[bytes, list[tuple[bytes, bytes]]]) -> None:
    """The relay hands h11 the bytes we checked: it must see the same request in them."""
    ours = check_request_head(case[0], LIMITS)
    server = h11.Connection(h11.SERVER)
    server.receive_data(case[0])
    event = server.next_event()
    assert isinstance(event, h11.Request)
    assert (event.method, event.target, list(event.headers)) == (
        ours.method,
        ours.target,
        list(ours.headers),
    )


# --- response heads -----------------------------------------------------------------------

CL: Final = b"Content-Length: 5"
TE: Final = b"Transfer-Encoding: chunked"

# id: (valid twin, the same head bent one way, the problem); every bent one is a 502.
RESPONSE_TWINS: Final[dict[str, tuple[bytes, bytes, str]]] = {
    "bare-lf": (response(CL), response(CL).replace(b"\r\n", b"\n"), "bare LF"),
    "bare-cr": (response(CL, b"X: 1"), response(CL + b"\rX: 1"), "bare CR"),
    "nul": (response(b"X: ab"), response(b"X: a\x00b"), "control character"),
    "status-two-digits": (response(CL), response(CL, line=b"HTTP/1.1 20 OK"), "status line"),
    "status-missing": (response(CL), response(CL, line=b"HTTP/1.1 OK"), "status line"),
    "status-double-space": (response(CL), response(CL, line=b"HTTP/1.1  200 OK"), "status line"),
    "status-600": (
        response(CL, line=b"HTTP/1.1 599 X"),
        response(CL, line=b"HTTP/1.1 600 X"),
        "status line",
    ),
    "status-099": (
        response(line=b"HTTP/1.1 100 Continue"),
        response(line=b"HTTP/1.1 099 X"),
        "status line",
    ),
    "version-2": (response(CL), response(CL, line=b"HTTP/2.0 200 OK"), "version HTTP/2.0"),
    "version-lowercase": (response(CL), response(CL, line=b"http/1.1 200 OK"), "status line"),
    "switching-protocols": (
        response(line=b"HTTP/1.1 103 Early Hints"),
        response(b"Upgrade: websocket", line=b"HTTP/1.1 101 Switching Protocols"),
        "101",
    ),
    "obs-fold": (response(b"X: a b"), response(b"X: a", b" b"), "obs-fold"),
    "space-before-colon": (response(CL), response(b"Content-Length : 5"), "whitespace between"),
    "name-not-token": (response(b"X-A: 1"), response(b"X(A: 1"), "invalid field name"),
    "cl+te": (response(CL), response(CL, TE), "both Content-Length"),
    "te+cl": (response(TE), response(TE, CL), "both Content-Length"),
    "cl-duplicate-identical": (response(CL), response(CL, CL), "more than one Content-Length"),
    "cl-list": (response(CL), response(b"Content-Length: 5, 5"), "not a number"),
    "cl-plus": (response(CL), response(b"Content-Length: +5"), "not a number"),
    "cl-digits": (
        response(b"Content-Length: " + b"1" * 18),
        response(b"Content-Length: " + b"1" * 19),
        "more than 18 digits",
    ),
    "te-gzip": (response(TE), response(b"Transfer-Encoding: gzip"), "does not end with chunked"),
    "te-gzip-chunked": (
        response(TE),
        response(b"Transfer-Encoding: gzip, chunked"),
        "only chunked",
    ),
    "te-two-fields": (response(TE), response(TE, TE), "more than one Transfer-Encoding"),
    "te-http10": (
        response(CL, line=b"HTTP/1.0 200 OK"),
        response(TE, line=b"HTTP/1.0 200 OK"),
        "HTTP/1.0",
    ),
    # HAProxy's (101) and Envoy's (100) cap, not twice theirs: limits.max_response_header_count.
    "too-many-fields": (
        response(*(b"X-%d: v" % i for i in range(100))),
        response(*(b"X-%d: v" % i for i in range(101))),
        "more than 100 header fields (limits.max_response_header_count)",
    ),
    "too-long": (
        response(b"X: " + b"x" * (MAX_RESPONSE_HEAD_BYTES - len(response(b"X: ")))),
        response(b"X: " + b"x" * (MAX_RESPONSE_HEAD_BYTES - len(response(b"X: ")) + 1)),
        "longer than 65536",
    ),
}


@pytest.mark.parametrize(
    ("valid", "invalid", "problem"), RESPONSE_TWINS.values(), ids=RESPONSE_TWINS.keys()
)
def test_response_shape_refused_with_502_and_twin_accepted(
    valid: bytes, invalid: bytes, problem: str
) -> None:
    assert isinstance(check_response_head(valid, request_method=b"GET"), ResponseHead)
    with pytest.raises(HttpRefusal) as refused:
        check_response_head(invalid, request_method=b"GET")
    assert refused.value.status == 502
    assert problem in refused.value.problem
    client = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD_BYTES)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "a")]))
    client.receive_data(valid)
    assert isinstance(client.next_event(), h11.Response | h11.InformationalResponse)


@pytest.mark.parametrize("max_fields", [8, 100, 500])
def test_response_field_count_is_the_named_limit(max_fields: int) -> None:
    fields = [b"X-%d: v" % i for i in range(max_fields + 1)]
    head = check_response_head(response(*fields[:-1]), request_method=b"GET", max_fields=max_fields)
    assert len(head.headers) == max_fields
    with pytest.raises(HttpRefusal, match=f"more than {max_fields} header fields") as refused:
        check_response_head(response(*fields), request_method=b"GET", max_fields=max_fields)
    assert (refused.value.status, refused.value.fault) == (502, "upstream")


def test_response_field_count_defaults_to_the_setting() -> None:
    assert Limits().max_response_header_count == 100  # HAProxy 101, Envoy 100
    fields = [b"X-%d: v" % i for i in range(Limits().max_response_header_count + 1)]
    check_response_head(response(*fields[:-1]), request_method=b"GET")
    with pytest.raises(HttpRefusal):
        check_response_head(response(*fields), request_method=b"GET")


@pytest.mark.parametrize(
    ("head", "method", "expected"),
    [
        (response(CL), b"GET", (200, 5, False)),
        (response(TE), b"POST", (200, None, True)),
        (response(), b"GET", (200, None, False)),  # read until close (h11's business)
        (response(CL, line=b"HTTP/1.0 200 OK"), b"GET", (200, 5, False)),
        # No body follows (RFC 9112 §6.3). HEAD and 304 keep the length for the relay to pass
        # on; 1xx and 204 must not carry one (RFC 9110 §8.6), so it is not reported.
        (response(b"Content-Length: 1234"), b"HEAD", (200, 1234, False)),
        (response(TE), b"HEAD", (200, None, False)),
        (response(CL, line=b"HTTP/1.1 304 Not Modified"), b"GET", (304, 5, False)),
        (
            response(b"Content-Length: 0", line=b"HTTP/1.1 204 No Content"),
            b"GET",
            (204, None, False),
        ),
        (response(TE, line=b"HTTP/1.1 204 No Content"), b"DELETE", (204, None, False)),
        (response(line=b"HTTP/1.1 100 Continue"), b"POST", (100, None, False)),
    ],
)
def test_response_framing(
    head: bytes, method: bytes, expected: tuple[int, int | None, bool]
) -> None:
    parsed = check_response_head(head, request_method=method)
    assert (parsed.status, parsed.content_length, parsed.chunked) == expected


def test_golden_response_head() -> None:
    head = response(
        b"Content-Type: application/json",
        b"X_Legacy_Header: ok",  # underscores are refused from clients, not from the upstream
        b"Set-Cookie: a=1",
        b"Set-Cookie: b=2 ",
        CL,
        line=b"HTTP/1.1 201",  # the reason phrase is optional
    )
    assert check_response_head(head, request_method=b"POST") == ResponseHead(
        version=b"1.1",
        status=201,
        headers=(
            (b"content-type", b"application/json"),
            (b"x_legacy_header", b"ok"),
            (b"set-cookie", b"a=1"),
            (b"set-cookie", b"b=2"),
            (b"content-length", b"5"),
        ),
        content_length=5,
        chunked=False,
        close=False,
        forward=(
            b"Content-Type: application/json",
            b"X_Legacy_Header: ok",
            b"Set-Cookie: a=1",
            b"Set-Cookie: b=2 ",
        ),
    )


# --- writing heads -------------------------------------------------------------------------


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


@settings(max_examples=examples(EXAMPLES))
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


# --- the fast paths against the straightforward reading -----------------------------------
# The checks are written for speed: whole-head and whole-list C operations, the usual
# Connection values parsed once. Each shortcut is compared here with the plain, line-by-line
# reading it replaced (kept below as the reference), on generated heads valid and not: the
# same result, or the same error.

_REF_CONTROLS: Final = bytes([*range(0x09), *range(0x0A, 0x20), 0x7F])
_REF_TCHARS: Final = (
    b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)
_REF_REQUEST_NAME_CHARS: Final = _REF_TCHARS.replace(b"_", b"")


def _reference_control_problem(head: bytes) -> str:
    pairs = head.count(b"\r\n")
    if head.count(b"\n") > pairs:
        return "bare LF in head (line endings must be CRLF)"
    if head.count(b"\r") > pairs:
        return "bare CR in head"
    control = next(bytes([b]) for b in head.replace(b"\r\n", b"") if b in _REF_CONTROLS)
    return f"control character {snippet(control)} in head"


def _reference_lines(head: bytes, status: int) -> list[bytes]:
    if len(head) - len(head.translate(None, _REF_CONTROLS)) != 2 * head.count(b"\r\n"):
        raise _reference_refusal(status, _reference_control_problem(head))
    if not head.endswith(b"\r\n\r\n"):
        raise _reference_refusal(status, "head does not end with an empty line (CRLF CRLF)")
    return head[:-4].split(b"\r\n")


def _reference_refusal(status: int, problem: str) -> HttpRefusal:
    """As the checks word it: a response's problem says it is the response that is invalid."""
    if status == 502:
        return HttpRefusal(status, f"invalid response: {problem}", fault="upstream")
    return HttpRefusal(status, problem, fault="client")


def _reference_field_problem(name: bytes, colon: bytes) -> str:
    if not (name or colon):
        return "empty line inside the head"
    if name[:1] in (b" ", b"\t"):
        return "obs-fold (a field line starting with whitespace)"
    if not colon:
        return f"field line {snippet(name)} has no colon"
    bare = name.rstrip(b" \t")
    if bare != name:
        return f"whitespace between field name {snippet(bare)} and colon"
    if b"_" in name and not name.translate(None, _REF_TCHARS):
        return f"underscore in field name {snippet(name)}"
    return f"invalid field name {snippet(name)}"


def _reference_fields(
    lines: list[bytes], name_chars: bytes, dropped: frozenset[bytes], status: int
) -> tuple[tuple[tuple[bytes, bytes], ...], list[bytes], list[bytes]]:
    """(fields, the lines not in `dropped` as received, the Connection values)."""
    parts = [line.partition(b":") for line in lines[1:]]
    for name, colon, _ in parts:
        if not (name and colon) or name.translate(None, name_chars):
            raise _reference_refusal(status, _reference_field_problem(name, colon))
    headers = tuple((name.lower(), value.strip(b" \t")) for name, _, value in parts)
    kept = [line for line, (name, _) in zip(lines[1:], headers, strict=True) if name not in dropped]
    connection = [value for name, value in headers if name == b"connection"]
    return headers, kept, connection


def _problem(check: Callable[[], object]) -> object:
    """What `check` returns, or its HttpRefusal's status and problem."""
    try:
        return check()
    except HttpRefusal as exc:
        return ("HttpRefusal", exc.status, exc.problem)


def _reference_read(
    head: bytes,
    check: Callable[[bytes], RequestHead | ResponseHead],
    name_chars: bytes,
    dropped: frozenset[bytes],
    status: int,
) -> object:
    """What `check` should make of `head`, read plainly: the line and field errors of the
    line-by-line reading; else, for what follows the fields (framing, Host, Expect: their
    values are all it reads), what `check` makes of the same fields written plainly, as
    "name: value", with `forward` as the lines of `head` they came from."""
    try:
        lines = _reference_lines(head, status)
        headers, kept, connection = _reference_fields(lines, name_chars, dropped, status)
    except HttpRefusal as exc:
        return ("HttpRefusal", exc.status, exc.problem)
    plain = b"".join([lines[0], b"\r\n", *(n + b": " + v + b"\r\n" for n, v in headers), b"\r\n"])
    outcome = _problem(partial(check, plain))
    if not isinstance(outcome, RequestHead | ResponseHead):
        return outcome
    assert outcome.headers == headers
    options = {o.strip(b" \t").lower() for v in connection for o in v.split(b",")}
    return outcome._replace(forward=tuple(kept) if options <= dropped else None)


# Field-line pieces that reach every rule: names of every kind (watched ones in odd cases,
# underscores, spaces, separators, obs-text), OWS runs, the bytes a value may hold, and the
# ones a head may not (bare CR and LF, NUL, VT, FF: whitespace to bytes.strip()).
_NAME_PIECES: Final = [
    b"Host", b"content-LENGTH", b"Transfer-Encoding", b"expect", b"X-A", b"x_b", b"a",
    b"", b" ", b"\t", b"(", b"\xe9", b":", b"Connection",
]  # fmt: skip
_VALUE_PIECES: Final = [
    b"", b" ", b"\t", b"  \t", b"5", b"v a l", b"caf\xe9", b":", b"a:b", b"\r", b"\n", b"\x00",
    b"\x0b", b"\x0c", b"\x7f", b"\r\n", b"chunked", b"close", b"100-continue", b"api:80",
]  # fmt: skip
_field_lines = st.lists(
    st.tuples(
        st.lists(st.sampled_from(_NAME_PIECES), max_size=3).map(b"".join),
        st.sampled_from([b":", b"", b" :", b"::"]),
        st.lists(st.sampled_from(_VALUE_PIECES), max_size=5).map(b"".join),
    ).map(b"".join),
    max_size=8,
)


@settings(max_examples=examples(EXAMPLES * 5))
@given(fields=_field_lines, tail=st.sampled_from([b"\r\n\r\n", b"\r\n", b"\n\n", b""]))
def test_fields_read_as_line_by_line(fields: list[bytes], tail: bytes) -> None:
    """One split and translate for the head, one loop and translate for the fields (values
    stripped with strip(): the byte checks leave no whitespace but SP and HT), agree with the
    line-by-line reading, requests and responses alike: the fields, the lines kept as they
    came, what the Connection values mean, the framing, Host and Expect values read from the
    fields, and errors."""
    request_line = b"\r\n".join([b"GET / HTTP/1.1", *fields]) + tail
    check_request = partial(check_request_head, limits=LIMITS)
    assert _problem(partial(check_request, request_line)) == _reference_read(
        request_line, check_request, _REF_REQUEST_NAME_CHARS, REQUEST_AS_IS_DROPPED, 400
    )
    status_line = b"\r\n".join([b"HTTP/1.1 200 OK", *fields]) + tail
    check_response = partial(check_response_head, request_method=b"GET")
    assert _problem(partial(check_response, status_line)) == _reference_read(
        status_line, check_response, _REF_TCHARS, RESPONSE_DROPPED, 502
    )


@settings(max_examples=examples(EXAMPLES))
@given(
    value=st.lists(
        st.sampled_from([b"0", b"7", b"1" * 9, b"+", b"-", b" ", b",", b"\xb2", b"\xd9\xa1", b"x"]),
        max_size=4,
    ).map(b"".join)
)
def test_content_length_is_ascii_digits(value: bytes) -> None:
    """bytes.isdigit takes exactly what the regex [0-9]+ did (no sign, no non-ASCII digit)."""
    head = request(HOST, b"Content-Length:" + value)
    outcome = _outcome(partial(check_request_head, head, LIMITS))
    digits = value.strip(b" \t")
    if re.fullmatch(rb"[0-9]+", digits) and len(digits) <= MAX_CONTENT_LENGTH_DIGITS:
        assert isinstance(outcome, RequestHead)
        assert outcome.content_length == int(digits)
    else:
        assert outcome == ("HttpRefusal", 400)


def _reference_authority_ok(value: bytes) -> bool:
    match = re.fullmatch(rb"(?:\[([0-9A-Fa-f:.]+)\]|[A-Za-z0-9\-._~]+)(?::([0-9]{1,5}))?", value)
    if match is None:
        return False
    if match[1] is not None:
        try:
            IPv6Address(match[1].decode("ascii"))
        except ValueError:
            return False
    return match[2] is None or int(match[2]) <= 65535


# Pieces of authorities: reg-name bytes, IPv6 literals, ports in and out of range, and bytes
# no authority we accept holds.
_AUTHORITY_PIECES: Final = [
    b"api", b".", b"-", b"_", b"~", b"[", b"]", b"::1", b"fe80::", b"1.2.3.4", b":", b"80",
    b"65535", b"65536", b"99999", b"123456", b"%", b"@", b"x:y",
]  # fmt: skip


_authorities = st.tuples(
    st.sampled_from([b"api.example.com", b"127.0.0.1", b"[::1]", b"[1:2]", b"[::1", b"a_b", b""]),
    st.sampled_from([b"", b":", b":0", b":80", b":65535", b":65536", b":99999", b":123456"]),
).map(b"".join) | st.lists(st.sampled_from(_AUTHORITY_PIECES), max_size=5).map(b"".join)


@settings(max_examples=examples(EXAMPLES))
@given(host=_authorities)
def test_host_authority_as_before(host: bytes) -> None:
    outcome = _problem(partial(check_request_head, request(b"Host: " + host), LIMITS))
    value = host.strip(b" \t")
    if _reference_authority_ok(value):
        assert isinstance(outcome, RequestHead)
    else:
        assert outcome == (
            "HttpRefusal",
            400,
            f"Host {snippet(value)} is not host[:port]",
        )


def _reference_target(method: bytes, target: bytes, host: bytes) -> tuple[bytes, bytes] | str:
    """(target to forward, host) for a request target, by RFC 9112 §3.2 read plainly; the
    problem of a target that is in no form we take."""
    if b"#" in target:
        return f"fragment in request target {snippet(target)}"
    if target.startswith(b"/"):
        return target, host
    if target == b"*":
        return (target, host) if method == b"OPTIONS" else "request target * is only for OPTIONS"
    match = re.fullmatch(rb"(?i:https?)://([^/?]*)(.*)", target)
    if match is None:
        return f"request target {snippet(target)} is not origin- or absolute-form"
    authority, rest = match.groups()
    if not _reference_authority_ok(authority):
        return f"request target authority {snippet(authority)} is not host[:port]"
    if not rest:
        rest = b"*" if method == b"OPTIONS" else b"/"
    elif rest.startswith(b"?"):
        rest = b"/" + rest
    return rest, authority


@settings(max_examples=examples(EXAMPLES))
@given(
    method=st.sampled_from([b"GET", b"OPTIONS"]),
    target=st.lists(
        st.sampled_from([b"/", b"#", b"*", b"?", b"a", b"http://", b"HTTPS://h", b"h:1"]),
        max_size=4,
    ).map(b"".join),
)
def test_targets_as_the_plain_reading_says(method: bytes, target: bytes) -> None:
    """check_request_head looks no further at a target starting with "/" and without "#", the
    usual one: every form still means what the plain reading says (origin-form unchanged and
    the Host field's authority; absolute-form converted; anything else refused)."""
    if not target:
        return  # no request line at all: not a target's business
    outcome = _problem(
        partial(
            check_request_head, request(HOST, line=method + b" " + target + b" HTTP/1.1"), LIMITS
        )
    )
    expected = _reference_target(method, target, b"api.example.com")
    if isinstance(expected, str):
        assert outcome == ("HttpRefusal", 400, expected)
    else:
        assert isinstance(outcome, RequestHead)
        assert (outcome.target, outcome.host) == expected


@pytest.mark.parametrize(
    ("version", "fields", "close"),
    [
        (b"1.1", [], False),
        (b"1.1", [b"Connection: keep-alive"], False),
        (b"1.1", [b"Connection: close"], True),
        (b"1.1", [b"Connection: Upgrade, CLOSE "], True),
        (b"1.1", [b"Connection: x-a", b"Connection: close"], True),
        (b"1.1", [b"X-Connection: close"], False),
        (b"1.1", [b"Connection: closed"], False),
        (b"1.0", [], True),
        (b"1.0", [b"Connection: keep-alive"], True),
    ],
)
def test_a_head_says_whether_the_connection_closes_after_it(
    version: bytes, fields: list[bytes], close: bool
) -> None:
    checked_request = check_request_head(
        request(HOST, *fields, line=b"GET / HTTP/" + version), LIMITS
    )
    checked_response = check_response_head(
        response(*fields, line=b"HTTP/" + version + b" 200 OK"), request_method=b"GET"
    )
    assert (checked_request.close, checked_response.close) == (close, close)


# Connection values around close: options in any case, OWS, lists, look-alikes.
_CLOSE_VALUES: Final = [
    b"close", b"Close", b" CLOSE\t", b"keep-alive", b"closed", b"x-close", b"close, te",
    b"te,close", b"te , close ", b"", b",", b"clo se", b"upgrade",
]  # fmt: skip


@settings(max_examples=examples(EXAMPLES))
@given(
    version=st.sampled_from([b"1.1", b"1.0"]),
    fields=st.lists(
        st.tuples(
            st.sampled_from([b"Connection", b"X-Connection"]), st.sampled_from(_CLOSE_VALUES)
        ),
        max_size=3,
    ),
)
def test_close_is_any_option_close(version: bytes, fields: list[tuple[bytes, bytes]]) -> None:
    """The usual values from a table, one search before any split: the same answer as the
    plain reading, for requests and responses."""
    lines = [name + b":" + value for name, value in fields]
    checked_request = check_request_head(
        request(HOST, *lines, line=b"GET / HTTP/" + version), LIMITS
    )
    assert checked_request.close is plain_close(version, checked_request.headers)
    checked_response = check_response_head(
        response(*lines, line=b"HTTP/" + version + b" 200 OK"), request_method=b"GET"
    )
    assert checked_response.close is plain_close(version, checked_response.headers)


def test_heads_are_immutable_values() -> None:
    """A checked head is its class in every respect, as if built by its constructor, and
    cannot be changed."""
    checked = check_request_head(request(HOST, b"Content-Length: 2"), LIMITS)
    built = RequestHead(
        method=b"GET",
        target=b"/v1/items?page=2",
        version=b"1.1",
        headers=((b"host", b"api.example.com"), (b"content-length", b"2")),
        host=b"api.example.com",
        content_length=2,
        chunked=False,
        expect_continue=False,
        close=False,
        forward=(),
    )
    response_checked = check_response_head(response(CL), request_method=b"GET")
    response_built = ResponseHead(
        b"1.1", 200, ((b"content-length", b"5"),), 5, False, b"OK", forward=()
    )
    for head, twin in ((checked, built), (response_checked, response_built)):
        assert type(head) is type(twin)
        assert (head, hash(head), repr(head)) == (twin, hash(twin), repr(twin))
        assert head._replace() == twin
        with pytest.raises(AttributeError):
            head.headers = ()  # type: ignore[misc]
