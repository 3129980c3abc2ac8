"""Strict checks on HTTP/1.1 message heads, and the header rewriting of a reverse proxy.

h11 is lenient in ways that are harmless for a client and dangerous for an internet-facing
proxy: it unfolds obs-fold lines, merges identical duplicate Content-Length fields, accepts
bare-LF line endings. Those are the shapes of request smuggling: a front end and a back end
disagreeing on where a request ends (RFC 9112 §11.2). So the relay reads each raw head itself
(the bytes up to and including the blank line, found by ``find_head_end``), runs it through
``check_request_head`` or ``check_response_head``, and relays what they return: the head is
parsed once, here, and ``http1`` handles the body framing that follows it.
Everything here is pure: bytes and values in, values out or ``HeadError``.

Finding a head (the same shape as h11's readers and ``clienthello``): ``find_head_end(data,
limits, start=n)`` takes everything buffered so far, from the first byte of the message, and

1. returns the index just past the blank line (CRLF CRLF) once the head is complete (bytes
   after it, a body or the next request, are not looked at),
2. returns ``None`` while the bytes so far may still become a head within the limits, or
3. raises ``HeadError`` as soon as they cannot: a request line longer than
   ``max_request_line_bytes`` (414) or no blank line within ``max_header_bytes`` (431; 502 for a
   response, whose bounds are the fixed ``MAX_RESPONSE_*`` constants).

It keeps no state. ``start`` is ``len(data)`` at the previous call on the same buffer (0 at the
first): that call returned ``None``, so the search resumes 3 bytes before it (a CRLF CRLF may
straddle two reads) and a head trickling in byte by byte costs linear, not quadratic, time.
``None`` is only returned while ``len(data) < max_header_bytes``: a caller looping until it
gets an index or an error buffers at most that much.

A request head is refused, without forwarding a byte, by the first rule it breaks, in order:

- 414 request line longer than ``max_request_line_bytes``; 431 head longer than
  ``max_header_bytes``.
- 400 a line ending other than CRLF (a bare CR or LF anywhere), or a control character other
  than HT (RFC 9112 §2.2, RFC 9110 §5.5: CR, LF and NUL in values are "invalid and dangerous").
  An empty line before the request line is refused too, as h11 does (RFC 9112 §2.2 lets a
  server ignore it; refusing leaves no stray bytes between two pipelined requests).
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
599, a version other than 1.0 and 1.1, a 101 (we never send Upgrade, so never ask for a switch),
more than ``MAX_RESPONSE_FIELDS`` fields or a head longer than ``MAX_RESPONSE_HEAD_BYTES``. No
body follows a response to HEAD or a 1xx, 204 or 304 (RFC 9112 §6.3), whatever its fields say.

Header rewriting (RFC 9110 §7.6.1), both directions: Connection, every field it names,
Keep-Alive, Proxy-Connection, Proxy-Authenticate, Proxy-Authorization, TE, Trailer,
Transfer-Encoding and Upgrade are hop-by-hop and removed, and so is Content-Length. Framing is
the relay's: it writes ``content-length: N`` from ``content_length``, or
``transfer-encoding: chunked`` when ``chunked`` (or as the client's version allows), on each
side's own connection. Requests also lose Expect (dualproxy answers 100-continue itself) and
Host, and get, after the surviving client fields in their order, X-Forwarded-For, -Proto and
-Host; then the operator's added headers, which replace any field of the same name. See
``upstream_request_headers`` for which client forwarding fields survive. The fields that go on
unchanged are relayed as they came, in their sender's case and spacing (every byte of them
passed the checks above): ``client_response_lines`` and ``upstream_request_lines`` give the
same fields as the rewriting functions, as lines, without joining each field anew.

These checks run for every message, so they are written for CPython's speed: whole-head and
whole-list C operations where one does (one split into lines, one translate for the control
characters, one translate for all the field names), one loop over the fields that also sorts
out what goes on as received, rare shapes (absolute-form, framing fields, Expect) left to
helpers, error messages worked out only once a check has failed, and checked heads built as
drafts of their frozen classes (see ``_draft_class``). The tests compare each shortcut with
the plain reading it replaced.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, fields, make_dataclass
from http import HTTPStatus
from typing import Any, Final, Literal

from dualproxy.config.names import IPNetwork
from dualproxy.config.schema import Limits, UpstreamConfig

__all__ = [
    "MAX_CONTENT_LENGTH_DIGITS",
    "MAX_RESPONSE_FIELDS",
    "MAX_RESPONSE_HEAD_BYTES",
    "ClientPeer",
    "ForwardingRules",
    "HeadError",
    "HeadLimits",
    "IPAddress",
    "RequestHead",
    "ResponseHead",
    "check_request_head",
    "check_response_head",
    "client_response_headers",
    "client_response_lines",
    "find_head_end",
    "upstream_request_headers",
    "upstream_request_lines",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Upstream heads are trusted more than clients' but not without bound. 64 KiB is 4x the client
# head limit and Envoy's default cap on header size (max_request_headers_kb 60), room for a
# response with many cookies.
MAX_RESPONSE_HEAD_BYTES: Final = 64 * 1024
# 2x the client field count (Envoy's max_headers_count, 100): CORS, security headers and a few
# Set-Cookie fields fit many times over.
MAX_RESPONSE_FIELDS: Final = 200
# Every 18-digit number is below 2^63, so no recipient parsing into a signed 64-bit integer (or
# Python's int) can overflow or wrap it; 10^18 bytes is an exabyte, beyond any real body.
MAX_CONTENT_LENGTH_DIGITS: Final = 18
# Client bytes quoted in an error: enough to recognise the offending field in a log, too short
# to reflect anything useful back through the plain-text error body.
_SNIPPET_BYTES: Final = 40

_CRLF: Final = b"\r\n"
_HEAD_END: Final = b"\r\n\r\n"
# Their lengths, for the per-read arithmetic of find_head_end.
_CRLF_LENGTH: Final = len(_CRLF)
_HEAD_END_LENGTH: Final = len(_HEAD_END)
_OWS: Final = b" \t"  # RFC 9110 §5.6.3
_SUPPORTED_VERSIONS: Final = frozenset({b"1.1", b"1.0"})
_REFUSED_METHODS: Final = frozenset({b"CONNECT", b"TRACE"})

# Statuses as plain ints: looking up an HTTPStatus member costs more than the check it labels.
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
    into a space: bytes hold only allowed ones when their translation isalpha(). Two C passes,
    faster than a regex, and than a translate that deletes (it builds its table every call)."""
    return bytes(b"a"[0] if byte in allowed else b" "[0] for byte in range(256))


# RFC 9110 §5.6.2 tchar. Field names are checked with a _letter_table, all the names of a head
# at once; requests leave out "_".
_TCHARS: Final = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_REQUEST_NAME_CHARS: Final = _TCHARS.replace(b"_", b"")
_TCHAR_TABLE: Final = _letter_table(_TCHARS)
_REQUEST_NAME_TABLE: Final = _letter_table(_REQUEST_NAME_CHARS)
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
# no bare CR or LF is left; one C pass instead of a regex alternation.
_CONTROLS: Final = bytes([*range(0x09), *range(0x0A, 0x20), 0x7F])
_CONTROL: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# "#" starts a fragment, in no request-target form (RFC 9112 §3.2). An int: `in` then looks for
# one byte (memchr), where a bytes operand costs a buffer-protocol substring search.
_FRAGMENT: Final = ord("#")
# RFC 9112 §3.2.2, scheme case-insensitive (RFC 3986 §3.1); the rest starts with "/", "?" or ends.
_ABSOLUTE_FORM: Final = re.compile(rb"[Hh][Tt][Tt][Pp][Ss]?://([^/?]*)(.*)")
# RFC 3986 §3.2.2 narrowed as the module docstring says: group 1 is an IPv6 literal's address.
_AUTHORITY: Final = re.compile(rb"(?:\[([0-9A-Fa-f:.]+)\]|[A-Za-z0-9\-._~]+)(?::([0-9]{1,5}))?")
_MAX_PORT: Final = 65535
# Authorities whose check is remembered (see _is_authority): more names than an API is
# reached by, few enough (bytes up to a head's size each) to bound the memory.
AUTHORITY_CACHE_SIZE: Final = 256

_CHUNKED: Final = b"chunked"
_CONTINUE: Final = b"100-continue"

# Fields the checks read; every other field is only collected.

# RFC 9110 §7.6.1 (Connection, Proxy-Connection, Keep-Alive, TE, Transfer-Encoding, Upgrade),
# §11.7 (Proxy-* credentials are for the proxy they reach: us), and Trailer, hop-by-hop in
# RFC 2616 §13.5.1: it announces fields of the chunked framing that the relay regenerates.
_HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Never forwarded as received: framing is regenerated by the relay on each side, Expect
# is answered by the relay, Host is chosen by the rules.
_RESPONSE_DROPPED: Final = _HOP_BY_HOP | {b"content-length"}
_REQUEST_DROPPED: Final = _RESPONSE_DROPPED | {b"expect", b"host"}
# What a client may claim about earlier hops; believed only from a trusted proxy. Besides
# the standard ones, the client-address headers CDNs and nginx set (X-Real-IP, True-Client-IP,
# CF-Connecting-IP, X-Client-IP): an API that trusts one must not get it from the client.
_FORWARDING_CLAIMS: Final = frozenset(
    {
        b"forwarded",
        b"x-forwarded-for",
        b"x-forwarded-host",
        b"x-forwarded-proto",
        b"x-real-ip",
        b"true-client-ip",
        b"cf-connecting-ip",
        b"x-client-ip",
    }
)
# The options of the Connection values nearly every message has, parsed once: any other value
# is split and parsed per message.
_USUAL_CONNECTION_OPTIONS: Final = {
    b"keep-alive": frozenset({b"keep-alive"}),
    b"close": frozenset({b"close"}),
}
# The client fields that never go on as received: what the relay drops, and the forwarding
# claims (a trusted proxy's are kept, by upstream_request_headers' own filter).
_REQUEST_AS_IS_DROPPED: Final = _REQUEST_DROPPED | _FORWARDING_CLAIMS
_CLOSE: Final = b"close"
_FIELD_SEPARATOR: Final = b": "
# An operator's added header must not change framing, routing or hop-by-hop semantics.
_NOT_ADDABLE: Final = _REQUEST_DROPPED


class HeadError(Exception):
    """A message head we refuse. For a request: the client's fault, `status` is what we answer
    (400, 405, 414, 417, 431, 501, 505). For a response: the upstream's fault, status 502.

    `problem` is short, for the log and the plain-text error body; it quotes at most a short,
    escaped snippet of the received bytes.
    """

    status: int
    problem: str

    def __init__(self, status: int, problem: str) -> None:
        super().__init__(f"{int(status)} {problem}")
        self.status = int(status)
        self.problem = problem


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


@dataclass(frozen=True, slots=True)
class RequestHead:
    """A request head that passed every check."""

    method: bytes  # as sent (case-sensitive, RFC 9110 §9.1)
    target: bytes  # origin-form path and query to forward, or b"*" (OPTIONS)
    version: bytes  # b"1.1" or b"1.0"
    headers: tuple[tuple[bytes, bytes], ...]  # (lowercased name, value without OWS), in order
    host: bytes  # the authority the client addressed (Host, or absolute-form's); b"" if none
    content_length: int | None
    chunked: bool
    expect_continue: bool
    # Derived from `version` and `headers` (so not compared): see _HeadExtras.
    close: bool = field(default=False, compare=False, repr=False)
    forward: tuple[bytes, ...] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """A response head that passed every check.

    `content_length` and `chunked` say how the body that follows is framed. No body follows a
    response to HEAD or a 1xx, 204 or 304 (RFC 9112 §6.3): `chunked` is then False, and
    `content_length` is None for 1xx and 204 (which must not carry it, RFC 9110 §8.6) but kept
    for HEAD and 304, where it is the representation's length for the relay to pass on.
    """

    version: bytes  # b"1.1" or b"1.0"
    status: int
    headers: tuple[tuple[bytes, bytes], ...]  # (lowercased name, value without OWS), in order
    content_length: int | None
    chunked: bool
    reason: bytes = b""  # the reason phrase, relayed as it came (RFC 9112 §4: clients ignore it)
    # Derived from `version` and `headers` (so not compared): see _HeadExtras.
    close: bool = field(default=False, compare=False, repr=False)
    forward: tuple[bytes, ...] | None = field(default=None, compare=False, repr=False)


_Fields = tuple[tuple[bytes, bytes], ...]
# What a checked head carries besides its fields, found in the same pass over them (each
# message's relay would otherwise walk them again, and join each field anew):
# - `close`: the connection ends after this message (RFC 9112 §9.3): HTTP/1.0 (whose
#   keep-alive extension we do not implement, as h11 does not), or a Connection option close;
# - `forward`: the field lines that go on as received, in order (every field but those the
#   relay drops or writes itself; for a request also the forwarding claims, which only a
#   trusted proxy's keep), or None when a Connection option names another field to drop (the
#   relay then filters `headers`, see _forwardable).


def _extras(
    version: bytes, kept: list[bytes], connection: list[bytes], dropped: frozenset[bytes]
) -> tuple[bool, tuple[bytes, ...] | None]:
    """(close, forward) for a head, as the comment above says."""
    if not connection:
        return version != b"1.1", tuple(kept)
    options = _connection_options(connection)
    close = version != b"1.1" or _CLOSE in options
    return close, tuple(kept) if options <= dropped else None


def _draft_class(frozen: type) -> Callable[..., Any]:
    """A mutable twin of the frozen slots dataclass `frozen`, to build its instances fast.

    A frozen dataclass's __init__ sets each field through object.__setattr__ (its own
    __setattr__ refuses): a call per field, which made building a head cost a third of its
    checks. The twin's __init__ stores the same fields (positionally, in order) in the same
    __slots__ directly; the checks fill one, then give it the frozen class: Python allows
    __class__ assignment between classes with the same __slots__ (Reference, "3.3.2.4.
    __slots__"). The object is then a `frozen` like any other (equal, hashable, frozen), and no
    draft ever leaves the module.
    """
    return make_dataclass(
        f"_{frozen.__name__}Draft",
        [(f.name, f.type) for f in fields(frozen)],
        slots=True,
        eq=False,
        repr=False,
        match_args=False,
    )


_REQUEST_DRAFT: Final = _draft_class(RequestHead)
_RESPONSE_DRAFT: Final = _draft_class(ResponseHead)


def find_head_end(
    data: bytes | bytearray, limits: HeadLimits, *, response: bool = False, start: int = 0
) -> int | None:
    """Index just past the blank line ending the head at the start of `data`; None when more
    bytes are needed. Raises HeadError once the bytes show the head cannot fit (see the module
    docstring). `start`: len(data) at the previous call that returned None on this buffer.
    For a response, `limits` is not consulted: the fixed MAX_RESPONSE_HEAD_BYTES applies, the
    same bound check_response_head enforces.
    """
    if response:
        max_head, too_large = MAX_RESPONSE_HEAD_BYTES, _BAD_GATEWAY
    else:
        max_head, too_large = limits.max_header_bytes, _FIELDS_TOO_LARGE
        # Decidable once max+2 bytes are here (the line and its CRLF); decided once per head.
        line_bound = limits.max_request_line_bytes + _CRLF_LENGTH
        if start < line_bound <= len(data) and data.find(_CRLF, 0, line_bound) < 0:
            raise _line_too_long(limits)
    resume = start - _HEAD_END_LENGTH + 1  # a CRLF CRLF may straddle two reads
    end = data.find(_HEAD_END, resume if resume > 0 else 0, max_head)
    if end >= 0:
        return end + _HEAD_END_LENGTH
    if len(data) >= max_head:
        what = "response head" if response else "request head"
        raise HeadError(too_large, f"{what} longer than {max_head} bytes")
    return None


def check_request_head(head: bytes, limits: HeadLimits) -> RequestHead:
    """Check a client's request head (the bytes find_head_end delimited) against every rule in
    the module docstring; raises HeadError with the status to answer."""
    if head.find(_CRLF) > limits.max_request_line_bytes:
        raise _line_too_long(limits)
    if len(head) > limits.max_header_bytes:
        raise HeadError(
            _FIELDS_TOO_LARGE, f"request head longer than {limits.max_header_bytes} bytes"
        )
    lines = _split_lines(head, _BAD_REQUEST)
    if len(lines) - 1 > limits.max_header_count:
        raise HeadError(_FIELDS_TOO_LARGE, f"more than {limits.max_header_count} header fields")
    match = _REQUEST_LINE.fullmatch(lines[0])
    if match is None:
        raise HeadError(_BAD_REQUEST, _request_line_problem(lines[0]))
    method, target, version = match.groups()
    if version not in _SUPPORTED_VERSIONS:
        raise HeadError(_VERSION_NOT_SUPPORTED, f"HTTP/{version.decode()}")
    headers, watched, kept, connection = _fields(
        lines, _REQUEST_NAME_TABLE, _REQUEST_AS_IS_DROPPED, _BAD_REQUEST
    )
    if method in _REFUSED_METHODS:
        raise HeadError(_METHOD_NOT_ALLOWED, f"method {method.decode()} not allowed")
    authority = None
    if target[:1] != b"/" or _FRAGMENT in target:  # not plain origin-form, the usual target
        target, authority = _origin_form(method, target)
    hosts = watched.get(b"host", ())
    if len(hosts) > 1:
        raise HeadError(_BAD_REQUEST, "more than one Host field")
    if hosts:
        _check_authority(hosts[0], "Host")
    elif version == b"1.1":
        raise HeadError(_BAD_REQUEST, "HTTP/1.1 request without Host")
    content_length, chunked = None, False
    if b"content-length" in watched or b"transfer-encoding" in watched:
        content_length, chunked = _framing(watched, version, _BAD_REQUEST)
    expect_continue = b"expect" in watched and _expects_continue(watched[b"expect"])
    close, forward = _extras(version, kept, connection, _REQUEST_AS_IS_DROPPED)
    checked: RequestHead = _REQUEST_DRAFT(
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
    )
    checked.__class__ = RequestHead  # see _draft_class
    return checked


def check_response_head(head: bytes, *, request_method: bytes) -> ResponseHead:
    """Check the upstream's response head to a `request_method` request; raises
    HeadError(502) for anything but a well-formed, unambiguously framed head."""
    if len(head) > MAX_RESPONSE_HEAD_BYTES:
        raise HeadError(_BAD_GATEWAY, f"response head longer than {MAX_RESPONSE_HEAD_BYTES} bytes")
    lines = _split_lines(head, _BAD_GATEWAY)
    if len(lines) - 1 > MAX_RESPONSE_FIELDS:
        raise HeadError(_BAD_GATEWAY, f"response has more than {MAX_RESPONSE_FIELDS} fields")
    match = _STATUS_LINE.fullmatch(lines[0])
    if match is None:
        raise HeadError(_BAD_GATEWAY, f"malformed status line {_snippet(lines[0])}")
    version, code, reason = match.groups(b"")  # b"": no reason phrase
    status = int(code)
    if version not in _SUPPORTED_VERSIONS:
        raise HeadError(_BAD_GATEWAY, f"response version HTTP/{version.decode()}")
    if status == _SWITCHING_PROTOCOLS:
        raise HeadError(_BAD_GATEWAY, "101 Switching Protocols, but we never ask for an upgrade")
    headers, watched, kept, connection = _fields(
        lines, _TCHAR_TABLE, _RESPONSE_DROPPED, _BAD_GATEWAY
    )
    content_length, chunked = _framing(watched, version, _BAD_GATEWAY)
    if status < _OK or status == _NO_CONTENT:
        content_length, chunked = None, False
    elif status == _NOT_MODIFIED or request_method == b"HEAD":
        chunked = False
    close, forward = _extras(version, kept, connection, _RESPONSE_DROPPED)
    checked: ResponseHead = _RESPONSE_DRAFT(
        version, status, headers, content_length, chunked, reason, close, forward
    )
    checked.__class__ = ResponseHead  # see _draft_class
    return checked


@dataclass(frozen=True, slots=True)
class ForwardingRules:
    """How request headers are rewritten for the upstream (see upstream_request_headers)."""

    upstream_authority: bytes  # what Host becomes in "rewrite" mode (UpstreamConfig.authority)
    host_header: Literal["rewrite", "preserve"]
    added_headers: tuple[tuple[bytes, bytes], ...]  # (lowercase name, value), sent last
    trusted_proxies: tuple[IPNetwork, ...]
    # Derived in __post_init__: the added names, and the client fields dropped from a peer
    # we do not trust and from one we do.
    _added_names: frozenset[bytes] = field(init=False, repr=False, compare=False)
    _dropped: frozenset[bytes] = field(init=False, repr=False, compare=False)
    _dropped_if_trusted: frozenset[bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Raises ValueError (the operator's fault) for an added header we could not send."""
        for name, value in self.added_headers:
            if name in _NOT_ADDABLE:
                raise ValueError(
                    f"upstream.headers: {name.decode()} is managed by dualproxy (hop-by-hop,"
                    " framing or Host) and cannot be added"
                )
            if (
                not name
                or name.translate(None, _REQUEST_NAME_CHARS)
                or name != name.lower()
                or _CONTROL.search(value) is not None
                or value != value.strip(_OWS)
            ):
                raise ValueError(
                    f"upstream.headers: {name!r}: {value!r} is not a lowercase header name"
                    " (no underscore) and a value without control characters or edge spaces"
                )
        added = frozenset(name for name, _ in self.added_headers)
        object.__setattr__(self, "_added_names", added)
        object.__setattr__(self, "_dropped", _REQUEST_DROPPED | _FORWARDING_CLAIMS | added)
        object.__setattr__(self, "_dropped_if_trusted", _REQUEST_DROPPED | added)

    @classmethod
    def from_config(cls, upstream: UpstreamConfig) -> ForwardingRules:
        """Raises ValueError for a non-ASCII upstream host or an added header we cannot send."""
        try:
            authority = upstream.authority.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError(
                f"upstream.url: write the host {upstream.host!r} in punycode (xn--...)"
            ) from None
        try:
            # Latin-1: the 0x80-0xFF range config accepts becomes obs-text bytes (RFC 9110 §5.5).
            added = tuple(
                (name.lower().encode("ascii"), value.encode("latin-1"))
                for name, value in upstream.headers
            )
        except UnicodeEncodeError:
            raise ValueError("upstream.headers: names must be ASCII, values Latin-1") from None
        return cls(
            upstream_authority=authority,
            host_header=upstream.host_header,
            added_headers=added,
            trusted_proxies=upstream.trusted_proxies,
        )


@dataclass(frozen=True, slots=True)
class ClientPeer:
    """A client's address as the header rewriting uses it, made once per connection: an
    IPv4-mapped IPv6 address as its IPv4 address (how it is shown and matched against
    trusted_proxies), and its X-Forwarded-For text (formatting an IPv6 address costs more
    than the rest of a request's rewriting)."""

    address: IPAddress
    text: bytes

    @classmethod
    def of(cls, address: IPAddress) -> ClientPeer:
        if isinstance(address, ipaddress.IPv6Address):
            if address.ipv4_mapped is None:
                return cls(address, str(address).encode("ascii"))
            address = address.ipv4_mapped
        # inet_ntoa writes str(address) (the dotted quad) in C, at a fraction of the cost.
        return cls(address, socket.inet_ntoa(address.packed).encode("ascii"))


def upstream_request_headers(
    head: RequestHead, *, peer: ClientPeer | None, rules: ForwardingRules
) -> list[tuple[bytes, bytes]]:
    """The header fields to send upstream for `head`, received from `peer`.

    In order: Host (the upstream's authority in "rewrite" mode, the client's in "preserve"
    mode, the upstream's when the client named none); the client's fields minus hop-by-hop ones,
    Content-Length, Expect and Host; X-Forwarded-For, -Proto and -Host; the added headers.

    A peer in `trusted_proxies` (as `ClientPeer.address`: IPv4-mapped counts as IPv4) is a
    proxy in front of us: its X-Forwarded-For fields are joined and the peer appended; its
    X-Forwarded-Proto, X-Forwarded-Host and Forwarded fields are kept, and X-Forwarded-Proto
    (https) and X-Forwarded-Host (`head.host`) are added only when it sent none. From any
    other peer those four fields are dropped and ours replace them: X-Forwarded-For is the peer
    alone. With no peer (`None`: the address is unknown) there is no X-Forwarded-For at all.
    The relay adds the framing fields (content-length or transfer-encoding) itself.
    """
    trusted = False
    if peer is not None:
        for network in rules.trusted_proxies:  # usually none
            if peer.address in network:
                trusted = True
                break
    kept = _forwardable(head.headers, rules._dropped_if_trusted if trusted else rules._dropped)
    forwarded_for: list[bytes] = []
    sent: Collection[bytes] = ()
    if trusted:
        forwarded_for = [value for name, value in kept if name == b"x-forwarded-for"]
        kept = [field for field in kept if field[0] != b"x-forwarded-for"]
        sent = {name for name, _ in kept}
    preserve = rules.host_header == "preserve" and head.host
    out = [(b"host", head.host if preserve else rules.upstream_authority)]
    out += kept
    ours = []
    if peer is not None:
        forwarded_for.append(peer.text)
    if forwarded_for:
        ours.append((b"x-forwarded-for", b", ".join(forwarded_for)))
    if b"x-forwarded-proto" not in sent:
        ours.append((b"x-forwarded-proto", b"https"))
    if b"x-forwarded-host" not in sent and head.host:
        ours.append((b"x-forwarded-host", head.host))
    if rules._added_names:  # an added header replaces ours
        ours = [field for field in ours if field[0] not in rules._added_names]
    out += ours
    out += rules.added_headers
    return out


def client_response_headers(head: ResponseHead) -> list[tuple[bytes, bytes]]:
    """The upstream's fields to send the client: all but hop-by-hop ones and Content-Length, in
    order (Set-Cookie fields stay separate). The relay adds the framing fields itself."""
    return _forwardable(head.headers, _RESPONSE_DROPPED)


def client_response_lines(head: ResponseHead) -> Sequence[bytes]:
    """client_response_headers' fields as lines: as the upstream sent them (its case and
    spacing: they passed every check), unless a Connection option names a field to drop."""
    if head.forward is not None:
        return head.forward
    return [_FIELD_SEPARATOR.join(field) for field in client_response_headers(head)]


def upstream_request_lines(
    head: RequestHead, *, peer: ClientPeer | None, rules: ForwardingRules
) -> list[bytes]:
    """upstream_request_headers' fields as lines, the client's as it sent them (unless a
    Connection option names a field to drop). Without trusted proxies or added headers (the
    usual configuration) they are made here directly; the rest goes the general way."""
    if head.forward is None or rules.trusted_proxies or rules.added_headers:
        fields = upstream_request_headers(head, peer=peer, rules=rules)
        return [_FIELD_SEPARATOR.join(field) for field in fields]
    # As upstream_request_headers for a peer we do not trust: its claims are not in `forward`.
    preserve = rules.host_header == "preserve" and head.host
    lines = [b"host: " + (head.host if preserve else rules.upstream_authority)]
    lines += head.forward
    if peer is not None:
        lines.append(b"x-forwarded-for: " + peer.text)
    lines.append(b"x-forwarded-proto: https")
    if head.host:
        lines.append(b"x-forwarded-host: " + head.host)
    return lines


# --- helpers -----------------------------------------------------------------------------


def _split_lines(head: bytes, status: int) -> list[bytes]:
    """The head's lines without their CRLFs, after the byte checks every line shares."""
    lines = head.split(_CRLF)
    # The split counts the CRLFs (len(lines) - 1 of them: CRLF cannot overlap itself), each
    # two of the bytes translate deletes.
    if len(head) - len(head.translate(None, _CONTROLS)) != 2 * (len(lines) - 1):
        raise HeadError(status, _control_problem(head))
    if not head.endswith(_HEAD_END):
        raise HeadError(status, "head does not end with an empty line (CRLF CRLF)")
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

    `name_table`: the _letter_table of the bytes a field name may hold. This runs for every
    field of every message, so it does per field only what cannot be done for all at once:
    one loop splits, lowercases and strips every line and sorts it by name; one translate then
    checks all the names. It checks the lowercase names: lower() changes only A-Z, which are
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
            raise HeadError(status, _field_lines_problem(lines, name_table))
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
        raise HeadError(status, _field_lines_problem(lines, name_table))
    return tuple(headers), special, kept, connection


def _framing(
    watched: dict[bytes, list[bytes]], version: bytes, status: int
) -> tuple[int | None, bool]:
    """(content_length, chunked) from the Content-Length and Transfer-Encoding values."""
    lengths = watched.get(b"content-length", ())
    codings = watched.get(b"transfer-encoding", ())
    if len(lengths) > 1:
        raise HeadError(status, "more than one Content-Length field")
    if lengths and codings:
        raise HeadError(status, "both Content-Length and Transfer-Encoding")
    if lengths:
        value = lengths[0]
        if not value.isdigit():  # bytes.isdigit: one or more ASCII digits, as [0-9]+
            raise HeadError(status, f"Content-Length {_snippet(value)} is not a number")
        if len(value) > MAX_CONTENT_LENGTH_DIGITS:
            raise HeadError(
                status, f"Content-Length has more than {MAX_CONTENT_LENGTH_DIGITS} digits"
            )
        return int(value), False
    if not codings:
        return None, False
    if version == b"1.0":
        raise HeadError(status, "Transfer-Encoding in an HTTP/1.0 message")
    if len(codings) > 1:
        raise HeadError(status, "more than one Transfer-Encoding field")
    if codings[0].lower() != _CHUNKED:
        _refuse_coding(codings[0], status)
    return None, True


def _refuse_coding(value: bytes, status: int) -> None:
    """Raise the error for a Transfer-Encoding other than exactly chunked."""
    codings = [coding.strip(_OWS).lower() for coding in value.split(b",")]
    if not all(_TOKEN.fullmatch(coding) for coding in codings):
        problem = f"malformed Transfer-Encoding {_snippet(value)}"
    elif codings[-1] != _CHUNKED:
        problem = f"Transfer-Encoding {_snippet(value)} does not end with chunked"
    elif codings.count(_CHUNKED) > 1:
        problem = "Transfer-Encoding applies chunked more than once"
    else:
        if status == _BAD_REQUEST:
            status = _NOT_IMPLEMENTED
        problem = f"Transfer-Encoding {_snippet(value)}: only chunked is implemented"
    raise HeadError(status, problem)


def _origin_form(method: bytes, target: bytes) -> tuple[bytes, bytes | None]:
    """(the target to forward, the absolute-form authority or None)."""
    if _FRAGMENT in target:
        raise HeadError(_BAD_REQUEST, f"fragment in request target {_snippet(target)}")
    if target.startswith(b"/"):
        return target, None
    if target == b"*":
        if method != b"OPTIONS":
            raise HeadError(_BAD_REQUEST, "request target * is only for OPTIONS")
        return target, None
    match = _ABSOLUTE_FORM.fullmatch(target)
    if match is None:
        raise HeadError(
            _BAD_REQUEST, f"request target {_snippet(target)} is not origin- or absolute-form"
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
        raise HeadError(_BAD_REQUEST, f"{what} {_snippet(value)} is not host[:port]")


# A client sends the same Host with every request, and an API has few names: remembered, the
# answer costs a lookup instead of a regex match. Bounded, so varied names only cost misses.
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
    """Whether Expect asks for 100-continue; HeadError(417) for any other expectation."""
    expectations = [e.strip(_OWS).lower() for value in values for e in value.split(b",")]
    for expectation in expectations:
        if expectation and expectation != _CONTINUE:
            raise HeadError(_EXPECTATION_FAILED, f"unsupported expectation {_snippet(expectation)}")
    return _CONTINUE in expectations


def _forwardable(
    headers: tuple[tuple[bytes, bytes], ...], dropped: frozenset[bytes]
) -> list[tuple[bytes, bytes]]:
    """The fields, in order, but those named in `dropped` or listed by a Connection field
    (RFC 9110 §7.6.1). Connection is hop-by-hop, in every `dropped`: one pass filters and
    collects its values, and the options are parsed only when there are some; the kept fields
    are filtered again only when an option names one (usually they name keep-alive or close).
    """
    kept = []
    connection = []
    for header in headers:
        name = header[0]
        if name not in dropped:
            kept.append(header)
        elif name == b"connection":
            connection.append(header[1])
    if connection:
        named = _connection_options(connection)
        if not named <= dropped:
            kept = [field for field in kept if field[0] not in named]
    return kept


def _connection_options(values: list[bytes]) -> frozenset[bytes]:
    """The field names that Connection fields with `values` list, lowercase."""
    if len(values) == 1:
        usual = _USUAL_CONNECTION_OPTIONS.get(values[0].lower())
        if usual is not None:
            return usual
    return frozenset(
        [option.strip(_OWS).lower() for value in values for option in value.split(b",")]
    )


def _request_line_problem(line: bytes) -> str:
    parts = line.split(b" ")
    if len(parts) != 3 or not all(parts):
        return f"request line {_snippet(line)} is not METHOD SP TARGET SP VERSION"
    method, _, version = parts
    if _TOKEN.fullmatch(method) is None:
        return f"method {_snippet(method)} is not a token"
    if _HTTP_VERSION.fullmatch(version) is None:
        return f"{_snippet(version)} is not an HTTP version"
    return "request target has a byte that is not visible ASCII"


def _line_too_long(limits: HeadLimits) -> HeadError:
    return HeadError(
        _URI_TOO_LONG, f"request line longer than {limits.max_request_line_bytes} bytes"
    )


def _control_problem(head: bytes) -> str:
    """What is wrong in a head that failed the control character check."""
    pairs = head.count(_CRLF)
    if head.count(b"\n") > pairs:
        return "bare LF in head (line endings must be CRLF)"
    if head.count(b"\r") > pairs:
        return "bare CR in head"
    control = _CONTROL.search(head.replace(_CRLF, b""))
    assert control is not None
    return f"control character {_snippet(control[0])} in head"


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
        return f"field line {_snippet(name)} has no colon"
    if name.rstrip(_OWS) != name:
        return f"whitespace between field name {_snippet(name.rstrip(_OWS))} and colon"
    if b"_" in name and name.translate(_TCHAR_TABLE).isalpha():
        return f"underscore in field name {_snippet(name)}"
    return f"invalid field name {_snippet(name)}"


def _snippet(data: bytes) -> str:
    """A bounded, escaped quote of received bytes for an error message."""
    quoted = repr(data[:_SNIPPET_BYTES])[1:]  # b'...' -> '...'
    return quoted if len(data) <= _SNIPPET_BYTES else f"{quoted}..."
