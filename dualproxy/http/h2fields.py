"""An HTTP/2 request's header fields, checked as strictly as an HTTP/1.1 head (RFC 9113 §8).

The HTTP/2 driver (`http.h2`) decodes a stream's HEADERS with the h2 library, with h2's own
header validation off, and hands the fields here: `stream_request_head` refuses what it must
with an `HttpRefusal` (the client's fault, answered on the stream; nothing goes upstream) or
returns the same `RequestHead` an HTTP/1.1 request makes, version b"2", for the exchange to
drive (see the last section of exchange.py's docstring). Pure: values in, values out.

A request is refused by the first rule it breaks, in order (the HTTP/1.1 rules in
heads.py's docstring, carried over to what HTTP/2 makes possible):

- 431 more than ``max_header_count`` fields (the pseudo-headers not counted). The size of
  the whole list is bounded before decoding, by SETTINGS_MAX_HEADER_LIST_SIZE (http.h2).
- 400 an empty name, an uppercase letter in a name (§8.2.1: malformed), a name that is not a
  token or holds an underscore (heads.py: CGI's "-" and "_"), a control character other than
  HT in a value (CR, LF and NUL are named by §8.2.1), whitespace at either end of a value.
- 400 a pseudo-header after a regular field, twice, or unknown (:protocol too: we do not
  offer extended CONNECT, RFC 8441; :status is a response's) (§8.3).
- 400 a connection-specific field (§8.2.2): Connection, Keep-Alive, Proxy-Connection,
  Transfer-Encoding, Upgrade; TE with any value but "trailers".
- 405 CONNECT and TRACE, as over HTTP/1.1 (we tunnel nothing and reflect nothing).
- 400 no :method, :scheme or :path, or an empty one; a method that is not a token; a
  :scheme other than https or http; a :path that is neither origin-form nor "*" (OPTIONS
  only), with a fragment or a byte that is not visible ASCII.
- 400 no authority (neither :authority nor Host), more than one Host, an authority that is
  not host[:port] as heads.py accepts it, or :authority and Host that disagree (§8.3.1:
  they must be the same; a proxy must not pick one).
- 400 Content-Length twice, not a number, or longer than MAX_CONTENT_LENGTH_DIGITS; or not
  the length of the body when the stream already ended (h2 itself ends the connection when
  DATA exceed or fall short of it later: §8.1.1).
- 417 an Expect other than 100-continue.

The head's fields are the regular ones, lowercase, in order; several Cookie fields (HTTP/2
splits cookies, §8.2.3) become one, joined with "; ", where the first was. Framing is decided
from what the driver knows of the body: a Content-Length field, else the body's length when
the stream ended before the exchange started (a request in one read: the upstream gets a
Content-Length), else a chunked body for the upstream.

The fields are read one by one, in order, as the list above says. The usual request (its
four pseudo-headers, then fields that go on as they are) is checked instead with whole-list
operations and does not go through that loop (`_fields_checked_whole`: what it cannot vouch
for is read one by one, which names the first problem); test_h2fields.py holds the two to the
same result on generated field lists (docs/performance.md has the figures).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Sequence
from http import HTTPStatus
from typing import Final

from dualproxy.http.errors import HttpRefusal, snippet
from dualproxy.http.fields import CONTROL, OWS, REQUEST_NAME_CHARS
from dualproxy.http.heads import (
    MAX_CONTENT_LENGTH_DIGITS,
    HeadLimits,
    RequestHead,
    expects_continue,
    is_authority,
)

__all__ = ["CONNECTION_SPECIFIC", "stream_request_head"]

# RFC 9113 §8.2.2: fields an HTTP/2 message must not carry (TE is allowed with "trailers").
CONNECTION_SPECIFIC: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
_PSEUDO_HEADERS: Final = frozenset({b":method", b":scheme", b":authority", b":path"})
_SCHEMES: Final = frozenset({b"https", b"http"})
_REFUSED_METHODS: Final = frozenset({b"CONNECT", b"TRACE"})
_BODY_METHODS: Final = frozenset({b"POST", b"PUT", b"PATCH"})
_UPPERCASE: Final = bytes(range(ord("A"), ord("Z") + 1))
_NAME_DELETE: Final = REQUEST_NAME_CHARS.lower()
# Visible ASCII (RFC 9112 §3.2's request-target bytes), for :path.
_NOT_VISIBLE: Final = bytes([*range(0x21), *range(0x7F, 0x100)])
_TOKEN_DELETE: Final = REQUEST_NAME_CHARS + b"_"
# A control character other than HT and LF (fields.CONTROL without LF: the whole-list check
# joins the values with LF, and counts them).
_CONTROL_BUT_LF: Final = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]")
_NAME: Final = operator.itemgetter(0)
_VALUE: Final = operator.itemgetter(1)
# The regular fields the one-by-one reading sorts out (or refuses).
_SORTED_OUT: Final = CONNECTION_SPECIFIC | {b"te", b"cookie", b"host", b"content-length", b"expect"}
_BAD_REQUEST: Final = HTTPStatus.BAD_REQUEST.value


def stream_request_head(
    fields: Sequence[tuple[bytes, bytes]], limits: HeadLimits, *, body_length: int | None
) -> RequestHead:
    """The RequestHead of an HTTP/2 request with these decoded `fields` (pseudo-headers first);
    `body_length`: the whole body's length when the stream already ended, else None. Raises
    HttpRefusal (the client's fault) for every rule in the module docstring."""
    checked = _fields_checked_whole(fields)
    hosts: list[bytes] = []
    lengths: list[bytes] = []
    expect: list[bytes] = []
    if checked is not None and checked[1]:
        # Pseudo-headers, then regular fields that go on as they are.
        pseudo = checked[0]
        headers = list(fields[4:])
        if len(headers) > limits.max_header_count:
            raise _too_many_fields(limits)
    else:  # a field to sort out (Host, Cookie, Content-Length, ...), or to refuse
        pseudo, headers, hosts, lengths, expect = _fields_read_one_by_one(
            fields, limits, checked=checked is not None
        )
    method = pseudo.get(b":method")
    if not method:
        raise _refusal("no :method")
    if method.translate(None, _TOKEN_DELETE):
        raise _refusal(f"method {snippet(method)} is not a token")
    if method in _REFUSED_METHODS:
        raise HttpRefusal(
            HTTPStatus.METHOD_NOT_ALLOWED, f"method {method.decode()} not allowed", fault="client"
        )
    scheme = pseudo.get(b":scheme")
    if scheme not in _SCHEMES:
        raise _refusal("no :scheme" if scheme is None else f":scheme {snippet(scheme)}")
    target = _target(method, pseudo.get(b":path"))
    host = _authority(pseudo.get(b":authority"), hosts)
    content_length = _content_length(lengths, body_length)
    chunked = False
    if content_length is None and body_length is not None:
        content_length = body_length if body_length or method in _BODY_METHODS else None
    elif content_length is None:
        chunked = True  # DATA follow, of a length nobody announced
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


def _fields_checked_whole(
    fields: Sequence[tuple[bytes, bytes]],
) -> tuple[dict[bytes, bytes], bool] | None:
    """The usual request's fields checked with whole-list operations (one translate for the
    names, one search and a few finds for the values), as `_check_field` checks each: its
    four pseudo-headers first, each once, then regular fields. (The pseudo-headers, whether
    no regular field needs sorting out: Host, Cookie, Content-Length, Expect, TE, a
    connection-specific one.) None for anything else, which the one-by-one reading then
    refuses, naming the first problem as it finds it, or accepts (no :authority, a lone
    empty value, ...)."""
    pseudo = dict(fields[:4])
    if pseudo.keys() != _PSEUDO_HEADERS:
        return None
    names = list(map(_NAME, fields[4:]))
    values = b"\n".join(map(_VALUE, fields))
    if (
        not all(names)
        # An uppercase letter, "_", ":" (a pseudo-header among these), any non-token byte:
        or b"".join(names).translate(None, _NAME_DELETE)
        or _CONTROL_BUT_LF.search(values) is not None
        or values.count(b"\n") != len(fields) - 1  # an LF in a value
        or values[:1] in OWS
        or values[-1:] in OWS
        or b"\n " in values
        or b" \n" in values
        or b"\n\t" in values
        or b"\t\n" in values
    ):
        return None
    return pseudo, _SORTED_OUT.isdisjoint(names)


def _fields_read_one_by_one(
    fields: Sequence[tuple[bytes, bytes]], limits: HeadLimits, *, checked: bool
) -> tuple[dict[bytes, bytes], list[tuple[bytes, bytes]], list[bytes], list[bytes], list[bytes]]:
    """(pseudo-headers, regular fields with the cookies joined, Host values, Content-Length
    values, Expect values), or HttpRefusal for the first rule broken, in order; `checked`:
    every field already passed `_check_field`."""
    pseudo: dict[bytes, bytes] = {}
    headers: list[tuple[bytes, bytes]] = []
    hosts: list[bytes] = []
    lengths: list[bytes] = []
    expect: list[bytes] = []
    cookies: list[bytes] = []
    cookie_at = -1
    for name, value in fields:  # bounded: h2 decoded at most SETTINGS_MAX_HEADER_LIST_SIZE
        if not checked:
            _check_field(name, value)
        if name[:1] == b":":
            if headers or cookies or hosts:
                raise _refusal(f"pseudo-header {snippet(name)} after a regular field")
            if name not in _PSEUDO_HEADERS:
                raise _refusal(f"unknown pseudo-header {snippet(name)}")
            if name in pseudo:
                raise _refusal(f"pseudo-header {snippet(name)} twice")
            pseudo[name] = value
            continue
        if name in CONNECTION_SPECIFIC:
            raise _refusal(f"connection-specific field {name.decode()} in HTTP/2")
        if name == b"te" and value.lower() != b"trailers":
            raise _refusal(f"TE {snippet(value)} (only trailers is allowed in HTTP/2)")
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
        raise _too_many_fields(limits)
    if cookies:
        headers.insert(cookie_at, (b"cookie", b"; ".join(cookies)))
    return pseudo, headers, hosts, lengths, expect


def _too_many_fields(limits: HeadLimits) -> HttpRefusal:
    return HttpRefusal(
        HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
        f"more than {limits.max_header_count} header fields",
        fault="client",
    )


def _check_field(name: bytes, value: bytes) -> None:
    if not name:
        raise _refusal("empty field name")
    bare = name[1:] if name[:1] == b":" else name
    if bare.translate(None, _NAME_DELETE):
        if name.translate(None, _UPPERCASE) != name:
            raise _refusal(f"uppercase in field name {snippet(name)} (HTTP/2 names are lowercase)")
        if b"_" in name:
            raise _refusal(f"underscore in field name {snippet(name)}")
        raise _refusal(f"invalid field name {snippet(name)}")
    if CONTROL.search(value) is not None:
        raise _refusal(f"control character in the value of {snippet(name)}")
    if value and (value[:1] in OWS or value[-1:] in OWS):
        raise _refusal(f"whitespace around the value of {snippet(name)}")


def _target(method: bytes, path: bytes | None) -> bytes:
    if not path:
        raise _refusal("no :path")
    if path.translate(None, _NOT_VISIBLE) != path:
        raise _refusal(":path has a byte that is not visible ASCII")
    if b"#" in path:
        raise _refusal(f"fragment in :path {snippet(path)}")
    if path == b"*":
        if method != b"OPTIONS":
            raise _refusal(":path * is only for OPTIONS")
    elif path[:1] != b"/":
        raise _refusal(f":path {snippet(path)} is not origin-form")
    return path


def _authority(authority: bytes | None, hosts: list[bytes]) -> bytes:
    if len(hosts) > 1:
        raise _refusal("more than one Host field")
    host = hosts[0] if hosts else None
    for value, what in ((authority, ":authority"), (host, "Host")):
        if value is not None and not is_authority(value):
            raise _refusal(f"{what} {snippet(value)} is not host[:port]")
    if authority is None:
        if host is None:
            raise _refusal("neither :authority nor Host")
        return host
    if host is not None and host.lower() != authority.lower():
        raise _refusal(f":authority {snippet(authority)} and Host {snippet(host)} disagree")
    return authority


def _content_length(lengths: list[bytes], body_length: int | None) -> int | None:
    if not lengths:
        return None
    if len(lengths) > 1:
        raise _refusal("more than one Content-Length field")
    value = lengths[0]
    if not value.isdigit():
        raise _refusal(f"Content-Length {snippet(value)} is not a number")
    if len(value) > MAX_CONTENT_LENGTH_DIGITS:
        raise _refusal(f"Content-Length has more than {MAX_CONTENT_LENGTH_DIGITS} digits")
    length = int(value)
    if body_length is not None and body_length != length:
        raise _refusal(f"Content-Length {length} but the body has {body_length} bytes")
    return length


def _refusal(problem: str) -> HttpRefusal:
    return HttpRefusal(_BAD_REQUEST, problem, fault="client")
