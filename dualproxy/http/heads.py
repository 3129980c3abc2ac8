"""HTTP/1.1 message heads: found in a receive buffer, checked strictly, written.

h11 is lenient in ways that are harmless for a client and dangerous for an internet-facing
proxy: it unfolds obs-fold lines, merges identical duplicate Content-Length fields, accepts
bare-LF line endings. Those are the shapes of request smuggling: a front end and a back end
disagreeing on where a request ends (RFC 9112 §11.2). So the relay reads each raw head itself
(the bytes up to and including the blank line, found by ``find_head_end``), runs it through
``check_request_head`` or ``check_response_head``, and relays what they return: the head is
parsed once, here; ``body`` handles the framing that follows it and ``rewrite`` the fields
that go on. Everything here is pure: bytes and values in, values out or ``HttpRefusal``
(errors.py): the client's fault for a request, with the status to answer; the upstream's for
a response, always 502, its problem starting "invalid response: ".

Finding a head (the same shape as h11's readers and ``clienthello``): ``find_head_end(data,
limits, start=n)`` takes everything buffered so far, from the first byte of the message, and

1. returns the index just past the blank line (CRLF CRLF) once the head is complete (bytes
   after it, a body or the next request, are not looked at); a head whose lines end in bare
   LF ends at the first LF LF or LF CR LF instead, so that the check refuses it (400) as soon
   as it is here rather than after request_header_timeout (408),
2. returns ``None`` while the bytes so far may still become a head within the limits, or
3. raises ``HttpRefusal`` as soon as they cannot: a request line longer than
   ``max_request_line_bytes`` (414) or no blank line within ``max_header_bytes`` (431; 502 for a
   response, whose bounds are the fixed ``MAX_RESPONSE_*`` constants).

A request may follow up to ``MAX_LEADING_EMPTY_LINES`` empty lines (CRLF), which are ignored
(RFC 9112 §2.2): the head that ``find_head_end`` delimits and ``check_request_head`` reads
starts with them; one more is refused (400) as soon as it arrives.

It keeps no state. ``start`` is ``len(data)`` at the previous call on the same buffer (0 at the
first): that call returned ``None``, so the search resumes 3 bytes before it (a CRLF CRLF may
straddle two reads) and a head trickling in byte by byte costs linear, not quadratic, time.
``None`` is only returned while ``len(data) < max_header_bytes``: a caller looping until it
gets an index or an error buffers at most that much.

A request head is refused, without forwarding a byte, by the first rule it breaks, in order:

- 414 request line longer than ``max_request_line_bytes``; 431 head longer than
  ``max_header_bytes``.
- 400 more than ``MAX_LEADING_EMPTY_LINES`` empty lines before the request line (fewer are
  ignored, RFC 9112 §2.2, as nginx, HAProxy and Apache do).
- 400 a line ending other than CRLF (a bare CR or LF anywhere), or a control character other
  than HT (RFC 9112 §2.2, RFC 9110 §5.5: CR, LF and NUL in values are "invalid and dangerous").
  RFC 9112 §2.2 lets a recipient accept a bare LF; a proxy must not, since the server behind
  it may not (the smuggling shape of two parsers disagreeing on where a line ends).
- 431 more than ``max_header_count`` field lines.
- 400 a request line that is not ``method SP request-target SP HTTP-version`` with single
  spaces (RFC 9112 §3), a method that is not a token, a target with a non-visible character.
  505 a well-formed version other than HTTP/1.1 and HTTP/1.0 (HTTP/2.0, HTTP/1.2, ...).
- 400 a field line that is not ``field-name ":" OWS field-value OWS`` (RFC 9112 §5): obs-fold
  (a line starting with SP or HT, §5.2), whitespace before the colon (§5.1), a name that is not a
  token or that holds an underscore. Underscores are tokens, but CGI and WSGI map "-" and "_" to
  the same variable, so X_Forwarded_For could pose as X-Forwarded-For behind us; we refuse
  rather than drop, since a silently dropped field tells an attacker our parser differs.
- 405 CONNECT and TRACE: we tunnel nothing and reflect nothing (the relay adds Allow).
- 400 a target with a fragment ("#" is in no request-target form, RFC 9112 §3.2), "*" with a
  method other than OPTIONS (§3.2.4), authority-form (§3.2.3, CONNECT only), or anything else
  that is neither origin-form nor absolute-form. Absolute-form
  ``http(s)://authority[/path][?query]`` (§3.2.2) is converted: the target becomes its path and
  query ("/" when empty, "*" for OPTIONS with neither, §3.2.4), and its authority replaces the
  Host field's value, which is then ignored (§3.2.2), though still checked as below.
- 400 HTTP/1.1 without Host, more than one Host field, or a Host that is not an authority
  (§3.2). HTTP/1.0 may omit Host (``host`` is then b""). We accept an authority as host
  [":" port] where host is a reg-name of unreserved characters (letters, digits, "-._~"), or an
  IPv6 literal in brackets, and port is 1 to 5 digits up to 65535: RFC 3986 also allows
  percent-encoding and sub-delims (",;=!$&'()*+") in a reg-name, which no client sends to an
  API and which would reach the upstream's logs and X-Forwarded-Host readers unfiltered.
- 400 Content-Length that is not 1 to ``MAX_CONTENT_LENGTH_DIGITS`` digits (a list "5, 5", a
  sign, anything else), or that appears twice, even with equal values (RFC 9110 §8.6 lets a
  recipient merge those; we refuse: it is the duplicate-CL smuggling shape).
- Transfer-Encoding (RFC 9112 §6.1): 400 together with Content-Length (allowed by §6.1, and
  the CL.TE / TE.CL shape), in an HTTP/1.0 request, in two fields, malformed, with chunked not
  last (§6.3 says 400: the body's length cannot be determined) or chunked twice. 501 when
  chunked is last but other codings precede it ("gzip, chunked"): framing is clear, the coding
  is one we do not implement (§6.1 says 501). Only exactly "chunked" (any case) is accepted.
- 417 an Expect value other than 100-continue (RFC 9110 §10.1.1). 100-continue sets
  ``expect_continue``, except in HTTP/1.0 where the server must ignore it.

A response head (the upstream's fault, always 502) is refused for the same line, field,
Content-Length and Transfer-Encoding rules (names may hold underscores: the CGI concern is the
request's), a status line other than ``HTTP/1.x SP 3DIGIT [SP reason]`` with a code from 100 to
599, a version other than 1.0 and 1.1, a 101 unless the request asked for an upgrade,
more than ``max_fields`` fields (``limits.max_response_header_count``) or a head longer than
``MAX_RESPONSE_HEAD_BYTES``. No
body follows a response to HEAD or a 1xx, 204 or 304 (RFC 9112 §6.3), whatever its fields say.

Writing: ``request_head`` and ``response_head`` serialize a head as given, names and values
already checked (they contain no CR, LF or NUL), the fields that go on unchanged as the lines
they came in.

The checks run for every message: how they are written for CPython (whole-head C operations,
one loop over the fields) and why heads are NamedTuples is in docs/performance.md ("HTTP");
tests/test_heads.py compares each shortcut with the plain reading it replaced. The module is
a little over 600 lines because this docstring lists every rule, next to the code that
enforces it.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final, NamedTuple

from dualproxy.config.schema import Limits
from dualproxy.http.errors import HttpRefusal, snippet
from dualproxy.http.fields import (
    CONTROL,
    CRLF,
    FIELD_SEPARATOR,
    OWS,
    REQUEST_AS_IS_DROPPED,
    REQUEST_NAME_CHARS,
    RESPONSE_DROPPED,
    TCHARS,
    connection_options,
)

__all__ = [
    "AUTHORITY_CACHE_SIZE",
    "MAX_CONTENT_LENGTH_DIGITS",
    "MAX_LEADING_EMPTY_LINES",
    "MAX_RESPONSE_HEAD_BYTES",
    "HeadLimits",
    "RequestHead",
    "ResponseHead",
    "check_request_head",
    "check_response_head",
    "expects_continue",
    "find_head_end",
    "is_authority",
    "request_head",
    "response_head",
]

# Upstream heads are trusted more than clients' but not without bound. 64 KiB is 4x the client
# head limit and Envoy's default cap on header size (max_request_headers_kb 60), room for a
# response with many cookies.
MAX_RESPONSE_HEAD_BYTES: Final = 64 * 1024
# Every 18-digit number is below 2^63, so no recipient parsing into a signed 64-bit integer (or
# Python's int) can overflow or wrap it; 10^18 bytes is an exabyte, beyond any real body.
MAX_CONTENT_LENGTH_DIGITS: Final = 18
# Empty lines (CRLF) ignored before a request line. RFC 9112 §2.2: a server SHOULD ignore at
# least one (clients of old sent a CRLF after a POST body, which then leads the next pipelined
# request). Apache httpd ignores up to 10 (DEFAULT_LIMIT_BLANK_LINES); nginx and HAProxy skip
# any number within their head buffer. More than a few is not a robust client but noise: 400.
MAX_LEADING_EMPTY_LINES: Final = 10
# Authorities whose check is remembered (see _is_authority): more names than an API is
# reached by, few enough (bytes up to a head's size each) to bound the memory.
AUTHORITY_CACHE_SIZE: Final = 256

_HEAD_END: Final = b"\r\n\r\n"
_CRLF_LENGTH: Final = len(CRLF)
_HEAD_END_LENGTH: Final = len(_HEAD_END)
_LF: Final = b"\n"
# Where a head with bare-LF line endings ends (see find_head_end): a line's LF followed by an
# empty line, bare or not. Neither occurs in a head whose every line ends in CRLF, except as
# part of its CRLF CRLF, which is looked for first.
_BARE_LF_HEAD_ENDS: Final = (b"\n\n", b"\n\r\n")
_MAX_LEADING_CRLF_BYTES: Final = MAX_LEADING_EMPTY_LINES * _CRLF_LENGTH
# The response field count check_response_head allows unless told otherwise: the setting's
# default (reasons at Limits.max_response_header_count).
_DEFAULT_RESPONSE_FIELDS: Final = Limits().max_response_header_count
_SUPPORTED_VERSIONS: Final = frozenset({b"1.1", b"1.0"})
_REFUSED_METHODS: Final = frozenset({b"CONNECT", b"TRACE"})
_CHUNKED: Final = b"chunked"
_CONTINUE: Final = b"100-continue"
_CLOSE: Final = b"close"

_BAD_REQUEST: Final = HTTPStatus.BAD_REQUEST.value
_METHOD_NOT_ALLOWED: Final = HTTPStatus.METHOD_NOT_ALLOWED.value
_URI_TOO_LONG: Final = HTTPStatus.REQUEST_URI_TOO_LONG.value
_EXPECTATION_FAILED: Final = HTTPStatus.EXPECTATION_FAILED.value
_FIELDS_TOO_LARGE: Final = HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE.value
_NOT_IMPLEMENTED: Final = HTTPStatus.NOT_IMPLEMENTED.value
_BAD_GATEWAY: Final = HTTPStatus.BAD_GATEWAY.value
_VERSION_NOT_SUPPORTED: Final = HTTPStatus.HTTP_VERSION_NOT_SUPPORTED.value
_SWITCHING_PROTOCOLS: Final = HTTPStatus.SWITCHING_PROTOCOLS.value
_OK: Final = HTTPStatus.OK.value
_NO_CONTENT: Final = HTTPStatus.NO_CONTENT.value
_NOT_MODIFIED: Final = HTTPStatus.NOT_MODIFIED.value


def _letter_table(allowed: bytes) -> bytes:
    """A bytes.translate table that turns the `allowed` bytes into letters and every other byte
    into a space: bytes hold only allowed ones when their translation isalpha()."""
    return bytes(b"a"[0] if byte in allowed else b" "[0] for byte in range(256))


# Field names are checked with a _letter_table, all the names of a head at once.
_TCHAR_TABLE: Final = _letter_table(TCHARS)
_REQUEST_NAME_TABLE: Final = _letter_table(REQUEST_NAME_CHARS)
_TOKEN: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# RFC 9112 §3; the target is visible ASCII (RFC 3986 URIs have no other bytes).
_REQUEST_LINE: Final = re.compile(
    rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21-\x7e]+) HTTP/([0-9]\.[0-9])"
)
_HTTP_VERSION: Final = re.compile(rb"HTTP/[0-9]\.[0-9]")
# RFC 9112 §4. The reason phrase is optional and only passed on; its bytes were checked with the
# head (no control characters).
_STATUS_LINE: Final = re.compile(rb"HTTP/([0-9]\.[0-9]) ([1-5][0-9][0-9])(?: (.*))?")
# Control characters, HT excepted (RFC 9110 §5.5). A head is checked with bytes.translate:
# deleting them all must remove exactly two bytes per CRLF, so no other control character and
# no bare CR or LF is left.
_CONTROLS: Final = bytes([*range(0x09), *range(0x0A, 0x20), 0x7F])
# "#" starts a fragment, in no request-target form (RFC 9112 §3.2); as an int, `in` looks for
# one byte.
_FRAGMENT: Final = ord("#")
# RFC 9112 §3.2.2, scheme case-insensitive (RFC 3986 §3.1); the rest starts with "/", "?" or ends.
_ABSOLUTE_FORM: Final = re.compile(rb"[Hh][Tt][Tt][Pp][Ss]?://([^/?]*)(.*)")
# RFC 3986 §3.2.2 narrowed as the module docstring says: group 1 is an IPv6 literal's address.
_AUTHORITY: Final = re.compile(rb"(?:\[([0-9A-Fa-f:.]+)\]|[A-Za-z0-9\-._~]+)(?::([0-9]{1,5}))?")
_MAX_PORT: Final = 65535

_Fields = tuple[tuple[bytes, bytes], ...]  # (lowercase name, value without OWS), in order


@dataclass(frozen=True, slots=True)
class HeadLimits:
    """Bounds on a client's request head; the defaults are `Limits`' (reasons there)."""

    max_request_line_bytes: int = 8 * 1024
    max_header_bytes: int = 16 * 1024
    max_header_count: int = 100

    @classmethod
    def from_limits(cls, limits: Limits) -> HeadLimits:
        return cls(
            max_request_line_bytes=limits.max_request_line_bytes,
            max_header_bytes=limits.max_header_bytes,
            max_header_count=limits.max_header_count,
        )


# What a checked head carries besides its fields, found in the same pass over them:
# - `close`: the connection ends after this message (RFC 9112 §9.3): HTTP/1.0 (whose
#   keep-alive extension we do not implement, as h11 does not), or a Connection option close;
# - `forward`: the field lines that go on as received, in order (every field but those the
#   relay drops or writes itself; for a request also the forwarding claims, which only a
#   trusted proxy's keep), or None when a Connection option names another field to drop, or
#   for a head that did not arrive as HTTP/1.1 lines (rewrite then filters `headers`).


class RequestHead(NamedTuple):
    """A request head that passed every check (or, from another framing, the same checks)."""

    method: bytes  # as sent (case-sensitive, RFC 9110 §9.1)
    target: bytes  # origin-form path and query to forward, or b"*" (OPTIONS)
    version: bytes  # b"1.1" or b"1.0" (b"2" from an HTTP/2 stream: see exchange)
    headers: _Fields  # (lowercased name, value without OWS), in order
    host: bytes  # the authority the client addressed (Host, or absolute-form's); b"" if none
    content_length: int | None
    chunked: bool
    expect_continue: bool
    close: bool = False  # see above
    forward: tuple[bytes, ...] | None = None  # see above
    # The protocol an Upgrade field asks for, when Connection lists "upgrade" (RFC 9110 §7.8);
    # b"" for none. The exchange relays a WebSocket upgrade and refuses every other.
    upgrade: bytes = b""


class ResponseHead(NamedTuple):
    """A response head that passed every check.

    `content_length` and `chunked` say how the body that follows is framed. No body follows a
    response to HEAD or a 1xx, 204 or 304 (RFC 9112 §6.3): `chunked` is then False, and
    `content_length` is None for 1xx and 204 (which must not carry it, RFC 9110 §8.6) but kept
    for HEAD and 304, where it is the representation's length for the relay to pass on.
    """

    version: bytes  # b"1.1" or b"1.0"
    status: int
    headers: _Fields  # (lowercased name, value without OWS), in order
    content_length: int | None
    chunked: bool
    reason: bytes = b""  # the reason phrase, relayed as it came (RFC 9112 §4: clients ignore it)
    close: bool = False  # as RequestHead's
    forward: tuple[bytes, ...] | None = None  # as RequestHead's


def find_head_end(
    data: bytes | bytearray, limits: HeadLimits, *, response: bool = False, start: int = 0
) -> int | None:
    """Index just past the blank line ending the head at the start of `data`; None when more
    bytes are needed. Raises HttpRefusal once the bytes show the head cannot fit (see the
    module docstring). `start`: len(data) at the previous call that returned None on this
    buffer. For a response, `limits` is not consulted: the fixed MAX_RESPONSE_HEAD_BYTES
    applies, the same bound check_response_head enforces.
    """
    size = len(data)
    if not size:  # what a connection asks before each message: nothing to look at yet
        return None
    if response:
        max_head, too_large = MAX_RESPONSE_HEAD_BYTES, _BAD_GATEWAY
    else:
        max_head, too_large = limits.max_header_bytes, _FIELDS_TOO_LARGE
        # Decidable once max+2 bytes (the line and its CRLF) follow the empty lines before it;
        # decided once per head.
        line_bound = limits.max_request_line_bytes + _CRLF_LENGTH
        if line_bound <= size and start < line_bound + _MAX_LEADING_CRLF_BYTES:
            _check_request_line_length(data, limits, line_bound)
    resume = start - _HEAD_END_LENGTH + 1  # a CRLF CRLF may straddle two reads
    if resume < 0:
        resume = 0
    end = data.find(_HEAD_END, resume, max_head)
    if end >= _MAX_LEADING_CRLF_BYTES:  # the usual head: its end is past any empty lines
        return end + _HEAD_END_LENGTH
    if size - resume > 1:  # room for an end in what is new
        end = _rare_head_end(data, end, resume, max_head, response=response)
        if end >= 0:
            return end
    if size >= max_head:
        what = "response head" if response else "request head"
        raise _refusal(too_large, f"{what} longer than {max_head} bytes")
    return None


def _rare_head_end(
    data: bytes | bytearray, end: int, resume: int, max_head: int, *, response: bool
) -> int:
    """find_head_end's cases off the usual path, given where it found a CRLF CRLF (`end`, -1
    for none) searching from `resume`: the index just past the head's end, or -1.

    - A CRLF CRLF this early may belong to empty lines before a request line (ignored, or
      refused beyond MAX_LEADING_EMPTY_LINES): the search restarts after them.
    - No CRLF CRLF: a head whose lines end in bare LF ends at the first LF LF or LF CR LF,
      found so that the check refuses it at once (400; 502 for a response).
    """
    if not response and data[:1] == b"\r":
        first = _leading_empty_lines(data)  # raises beyond the maximum
        if resume < first:
            resume = first
            if end >= 0:
                end = data.find(_HEAD_END, resume, max_head)
    if end >= 0:
        return end + _HEAD_END_LENGTH
    for head_end in _BARE_LF_HEAD_ENDS:  # bounded: two patterns
        found = data.find(head_end, resume, max_head)
        if found >= 0 and (end < 0 or found + len(head_end) < end):
            end = found + len(head_end)
    return end


def _check_request_line_length(
    data: bytes | bytearray, limits: HeadLimits, line_bound: int
) -> None:
    """Refuse (414) a request line that has no line end within its bound, counted after any
    empty lines before it, once that many bytes are here."""
    first = _leading_empty_lines(data) if data[:1] == b"\r" else 0
    if first + line_bound <= len(data) and data.find(_LF, first, first + line_bound) < 0:
        raise _line_too_long(limits)


def check_request_head(head: bytes, limits: HeadLimits) -> RequestHead:
    """Check a client's request head (the bytes find_head_end delimited) against every rule in
    the module docstring; raises HttpRefusal (the client's fault) with the status to answer."""
    if head.find(CRLF) > limits.max_request_line_bytes:
        raise _line_too_long(limits)
    if len(head) > limits.max_header_bytes:
        raise _refusal(
            _FIELDS_TOO_LARGE, f"request head longer than {limits.max_header_bytes} bytes"
        )
    lines = _split_lines(head, _BAD_REQUEST)
    if not lines[0]:  # rarely: empty lines before the request line, ignored (one level deep)
        return check_request_head(head[_leading_empty_lines(head) :], limits)
    if len(lines) - 1 > limits.max_header_count:
        raise _refusal(_FIELDS_TOO_LARGE, f"more than {limits.max_header_count} header fields")
    match = _REQUEST_LINE.fullmatch(lines[0])
    if match is None:
        raise _refusal(_BAD_REQUEST, _request_line_problem(lines[0]))
    method, target, version = match.groups()
    if version not in _SUPPORTED_VERSIONS:
        raise _refusal(_VERSION_NOT_SUPPORTED, f"HTTP/{version.decode()}")
    headers, watched, kept, connection = _fields(
        lines, _REQUEST_NAME_TABLE, REQUEST_AS_IS_DROPPED, _BAD_REQUEST
    )
    if method in _REFUSED_METHODS:
        raise _refusal(_METHOD_NOT_ALLOWED, f"method {method.decode()} not allowed")
    authority = None
    if target[:1] != b"/" or _FRAGMENT in target:  # not plain origin-form, the usual target
        target, authority = _origin_form(method, target)
    hosts = watched.get(b"host", ())
    if len(hosts) > 1:
        raise _refusal(_BAD_REQUEST, "more than one Host field")
    if hosts:
        _check_authority(hosts[0], "Host")
    elif version == b"1.1":
        raise _refusal(_BAD_REQUEST, "HTTP/1.1 request without Host")
    content_length, chunked = None, False
    if b"content-length" in watched or b"transfer-encoding" in watched:
        content_length, chunked = _framing(watched, version, _BAD_REQUEST)
    expect_continue = b"expect" in watched and _expects_continue(watched[b"expect"])
    close, forward = _extras(version, kept, connection, REQUEST_AS_IS_DROPPED)
    upgrade = b""
    if b"upgrade" in watched and b"upgrade" in connection_options(connection):
        upgrade = b",".join(watched[b"upgrade"])
    return RequestHead(
        method,
        target,
        version,
        headers,
        authority if authority is not None else hosts[0] if hosts else b"",  # host
        content_length,
        chunked,
        expect_continue and version == b"1.1",
        close,
        forward,
        upgrade,
    )


def check_response_head(
    head: bytes,
    *,
    request_method: bytes,
    max_fields: int = _DEFAULT_RESPONSE_FIELDS,
    upgrading: bool = False,
) -> ResponseHead:
    """Check the upstream's response head to a `request_method` request, with at most
    `max_fields` header fields (limits.max_response_header_count); raises HttpRefusal(502,
    the upstream's fault) for anything but a well-formed, unambiguously framed head.
    `upgrading`: the request asked for an upgrade, so a 101 may answer it."""
    if len(head) > MAX_RESPONSE_HEAD_BYTES:
        raise _refusal(_BAD_GATEWAY, f"response head longer than {MAX_RESPONSE_HEAD_BYTES} bytes")
    lines = _split_lines(head, _BAD_GATEWAY)
    if len(lines) - 1 > max_fields:
        problem = f"response has more than {max_fields} header fields"
        raise _refusal(_BAD_GATEWAY, f"{problem} (limits.max_response_header_count)")
    match = _STATUS_LINE.fullmatch(lines[0])
    if match is None:
        raise _refusal(_BAD_GATEWAY, f"malformed status line {snippet(lines[0])}")
    version, code, reason = match.groups(b"")  # b"": no reason phrase
    status = int(code)
    if version not in _SUPPORTED_VERSIONS:
        raise _refusal(_BAD_GATEWAY, f"response version HTTP/{version.decode()}")
    if status == _SWITCHING_PROTOCOLS and not upgrading:
        raise _refusal(_BAD_GATEWAY, "101 Switching Protocols, but we did not ask for an upgrade")
    headers, watched, kept, connection = _fields(
        lines, _TCHAR_TABLE, RESPONSE_DROPPED, _BAD_GATEWAY
    )
    content_length, chunked = _framing(watched, version, _BAD_GATEWAY)
    if status < _OK or status == _NO_CONTENT:
        content_length, chunked = None, False
    elif status == _NOT_MODIFIED or request_method == b"HEAD":
        chunked = False
    close, forward = _extras(version, kept, connection, RESPONSE_DROPPED)
    return ResponseHead(version, status, headers, content_length, chunked, reason, close, forward)


def request_head(
    method: bytes,
    target: bytes,
    headers: Iterable[tuple[bytes, bytes]],
    *,
    lines: Iterable[bytes] = (),
) -> bytes:
    """An HTTP/1.1 request head: request line, the field `lines` as given, the `headers` in
    order, blank line."""
    return _head(b"%b %b HTTP/1.1" % (method, target), lines, headers)


def response_head(
    status: int,
    reason: bytes,
    headers: Iterable[tuple[bytes, bytes]],
    *,
    lines: Iterable[bytes] = (),
) -> bytes:
    """An HTTP/1.1 response head: status line, the field `lines` as given (the upstream's,
    as received), the `headers` in order, blank line."""
    return _head(b"HTTP/1.1 %d %b" % (status, reason), lines, headers)


# --- helpers -----------------------------------------------------------------------------


def _refusal(status: int, problem: str) -> HttpRefusal:
    """A head refused with `status`: 502 is always a response's, the upstream's fault (no
    byte of a response arrives before its head is complete, but the head did)."""
    if status == _BAD_GATEWAY:
        return HttpRefusal(
            status, f"invalid response: {problem}", fault="upstream", before_response=False
        )
    return HttpRefusal(status, problem, fault="client")


def _head(
    start_line: bytes, lines: Iterable[bytes], headers: Iterable[tuple[bytes, bytes]]
) -> bytes:
    out = [start_line]
    out += lines
    out += map(FIELD_SEPARATOR.join, headers)  # "name: value"
    out.append(CRLF)
    return CRLF.join(out)


def _extras(
    version: bytes, kept: list[bytes], connection: list[bytes], dropped: frozenset[bytes]
) -> tuple[bool, tuple[bytes, ...] | None]:
    """(close, forward) for a head, as the comment above RequestHead says."""
    if not connection:
        return version != b"1.1", tuple(kept)
    options = connection_options(connection)
    close = version != b"1.1" or _CLOSE in options
    return close, tuple(kept) if options <= dropped else None


def _split_lines(head: bytes, status: int) -> list[bytes]:
    """The head's lines without their CRLFs, after the byte checks every line shares."""
    lines = head.split(CRLF)
    # The split counts the CRLFs (len(lines) - 1 of them: CRLF cannot overlap itself), each
    # two of the bytes translate deletes.
    if len(head) - len(head.translate(None, _CONTROLS)) != 2 * (len(lines) - 1):
        raise _refusal(status, _control_problem(head))
    if not head.endswith(_HEAD_END):
        raise _refusal(status, "head does not end with an empty line (CRLF CRLF)")
    # The final CRLF CRLF leaves two empty pieces; no CRLF straddles it (a CR just before it
    # is followed by its CR), so the rest splits as it would alone.
    del lines[-2:]
    return lines


def _fields(
    lines: list[bytes], name_table: bytes, dropped: frozenset[bytes], status: int
) -> tuple[_Fields, dict[bytes, list[bytes]], list[bytes], list[bytes]]:
    """All field lines as (lowercase name, value); the values of the fields named in `dropped`
    (the watched ones among them); the field lines not in `dropped`, as received; and the
    Connection values.

    `name_table`: the _letter_table of the bytes a field name may hold. One loop splits,
    lowercases and strips every line and sorts it by name; one translate then checks all the
    names. It checks the lowercase names: lower() changes only A-Z, which are
    allowed in both cases. Values are stripped of all whitespace: after _split_lines, SP and HT
    are the only whitespace left (RFC 9110 §5.5 strips OWS). Every watched name is in
    `dropped` (the relay writes framing, Host and Expect itself), so a field that is passed on
    as received is looked at once.
    """
    headers = []
    names = []
    kept = []
    connection = []
    special: dict[bytes, list[bytes]] = {}
    for index in range(1, len(lines)):  # bounded: the head's lines
        line = lines[index]
        name, colon, value = line.partition(b":")
        if not (name and colon):
            raise _refusal(status, _field_lines_problem(lines, name_table))
        name = name.lower()
        value = value.strip()
        headers.append((name, value))
        names.append(name)
        if name not in dropped:
            kept.append(line)
        elif name == b"connection":
            connection.append(value)
        else:
            special.setdefault(name, []).append(value)
    joined = b"".join(names)
    if joined and not joined.translate(name_table).isalpha():
        raise _refusal(status, _field_lines_problem(lines, name_table))
    return tuple(headers), special, kept, connection


def _framing(
    watched: dict[bytes, list[bytes]], version: bytes, status: int
) -> tuple[int | None, bool]:
    """(content_length, chunked) from the Content-Length and Transfer-Encoding values."""
    lengths = watched.get(b"content-length", ())
    codings = watched.get(b"transfer-encoding", ())
    if len(lengths) > 1:
        raise _refusal(status, "more than one Content-Length field")
    if lengths and codings:
        raise _refusal(status, "both Content-Length and Transfer-Encoding")
    if lengths:
        value = lengths[0]
        if not value.isdigit():  # bytes.isdigit: one or more ASCII digits, as [0-9]+
            raise _refusal(status, f"Content-Length {snippet(value)} is not a number")
        if len(value) > MAX_CONTENT_LENGTH_DIGITS:
            raise _refusal(
                status, f"Content-Length has more than {MAX_CONTENT_LENGTH_DIGITS} digits"
            )
        return int(value), False
    if not codings:
        return None, False
    if version == b"1.0":
        raise _refusal(status, "Transfer-Encoding in an HTTP/1.0 message")
    if len(codings) > 1:
        raise _refusal(status, "more than one Transfer-Encoding field")
    if codings[0].lower() != _CHUNKED:
        _refuse_coding(codings[0], status)
    return None, True


def _refuse_coding(value: bytes, status: int) -> None:
    """Raise the error for a Transfer-Encoding other than exactly chunked."""
    codings = [coding.strip(OWS).lower() for coding in value.split(b",")]
    if not all(_TOKEN.fullmatch(coding) for coding in codings):
        problem = f"malformed Transfer-Encoding {snippet(value)}"
    elif codings[-1] != _CHUNKED:
        problem = f"Transfer-Encoding {snippet(value)} does not end with chunked"
    elif codings.count(_CHUNKED) > 1:
        problem = "Transfer-Encoding applies chunked more than once"
    else:
        if status == _BAD_REQUEST:
            status = _NOT_IMPLEMENTED
        problem = f"Transfer-Encoding {snippet(value)}: only chunked is implemented"
    raise _refusal(status, problem)


def _origin_form(method: bytes, target: bytes) -> tuple[bytes, bytes | None]:
    """(the target to forward, the absolute-form authority or None)."""
    if _FRAGMENT in target:
        raise _refusal(_BAD_REQUEST, f"fragment in request target {snippet(target)}")
    if target.startswith(b"/"):
        return target, None
    if target == b"*":
        if method != b"OPTIONS":
            raise _refusal(_BAD_REQUEST, "request target * is only for OPTIONS")
        return target, None
    match = _ABSOLUTE_FORM.fullmatch(target)
    if match is None:
        raise _refusal(
            _BAD_REQUEST, f"request target {snippet(target)} is not origin- or absolute-form"
        )
    authority, rest = match.groups()
    _check_authority(authority, "request target authority")
    if not rest:
        rest = b"*" if method == b"OPTIONS" else b"/"
    elif rest.startswith(b"?"):
        rest = b"/" + rest
    return rest, authority


def _check_authority(value: bytes, what: str) -> None:
    if not _is_authority(value):
        raise _refusal(_BAD_REQUEST, f"{what} {snippet(value)} is not host[:port]")


# Remembered: a client sends the same Host with every request, and an API has few names.
@functools.lru_cache(maxsize=AUTHORITY_CACHE_SIZE)
def _is_authority(value: bytes) -> bool:
    match = _AUTHORITY.fullmatch(value)
    if match is None:
        return False
    if match.lastindex is None:  # a reg-name without port, the usual Host
        return True
    ipv6, port = match.groups()
    return (ipv6 is None or _is_ipv6(ipv6)) and (port is None or int(port) <= _MAX_PORT)


def _is_ipv6(address: bytes) -> bool:
    try:
        ipaddress.IPv6Address(address.decode("ascii"))
    except ValueError:
        return False
    return True


def _expects_continue(values: Sequence[bytes]) -> bool:
    """Whether Expect asks for 100-continue; HttpRefusal(417) for any other expectation."""
    expectations = [e.strip(OWS).lower() for value in values for e in value.split(b",")]
    for expectation in expectations:
        if expectation and expectation != _CONTINUE:
            raise _refusal(_EXPECTATION_FAILED, f"unsupported expectation {snippet(expectation)}")
    return _CONTINUE in expectations


def _request_line_problem(line: bytes) -> str:
    parts = line.split(b" ")
    if len(parts) != 3 or not all(parts):
        return f"request line {snippet(line)} is not METHOD SP TARGET SP VERSION"
    method, _, version = parts
    if _TOKEN.fullmatch(method) is None:
        return f"method {snippet(method)} is not a token"
    if _HTTP_VERSION.fullmatch(version) is None:
        return f"{snippet(version)} is not an HTTP version"
    return "request target has a byte that is not visible ASCII"


def _leading_empty_lines(data: bytes | bytearray) -> int:
    """How many bytes of empty lines (CRLF) start `data`, at most MAX_LEADING_EMPTY_LINES of
    them; HttpRefusal(400) once one more is there."""
    skipped = 0
    while data.startswith(CRLF, skipped):  # bounded: raises past the maximum
        if skipped == _MAX_LEADING_CRLF_BYTES:
            raise _refusal(
                _BAD_REQUEST,
                f"more than {MAX_LEADING_EMPTY_LINES} empty lines before the request line",
            )
        skipped += _CRLF_LENGTH
    return skipped


def _line_too_long(limits: HeadLimits) -> HttpRefusal:
    return _refusal(
        _URI_TOO_LONG, f"request line longer than {limits.max_request_line_bytes} bytes"
    )


def _control_problem(head: bytes) -> str:
    """What is wrong in a head that failed the control character check."""
    pairs = head.count(CRLF)
    if head.count(b"\n") > pairs:
        return "bare LF in head (line endings must be CRLF)"
    if head.count(b"\r") > pairs:
        return "bare CR in head"
    control = CONTROL.search(head.replace(CRLF, b""))
    assert control is not None
    return f"control character {snippet(control[0])} in head"


def _field_lines_problem(lines: list[bytes], name_table: bytes) -> str:
    """What is wrong with the first field line that _fields refused."""
    name, colon, _ = next(
        (name, colon, value)
        for name, colon, value in [line.partition(b":") for line in lines[1:]]
        if not (name and colon) or not name.translate(name_table).isalpha()
    )
    if not (name or colon):
        return "empty line inside the head"
    if name[:1] in (b" ", b"\t"):
        return "obs-fold (a field line starting with whitespace)"
    if not colon:
        return f"field line {snippet(name)} has no colon"
    if name.rstrip(OWS) != name:
        return f"whitespace between field name {snippet(name.rstrip(OWS))} and colon"
    if b"_" in name and name.translate(_TCHAR_TABLE).isalpha():
        return f"underscore in field name {snippet(name)}"
    return f"invalid field name {snippet(name)}"


# The authority and Expect rules above, for a head that arrives in another framing (an HTTP/2
# stream's fields: http.h2fields).
is_authority = _is_authority
expects_continue = _expects_continue
