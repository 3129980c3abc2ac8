"""rewrite.py: the header rewriting tables for both directions, the forwarding rules from the
configuration, and the fields as lines (as received) against the fields as pairs: the same
meaning."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from typing import Final

import pytest
from helpers.messages import GET, HOST, plain_close, request, response
from helpers.profiles import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from dualproxy.config.names import IPAddress
from dualproxy.config.schema import UpstreamConfig
from dualproxy.http.fields import FORWARDING_CLAIMS, REQUEST_DROPPED, RESPONSE_DROPPED
from dualproxy.http.heads import HeadLimits, check_request_head, check_response_head
from dualproxy.http.rewrite import (
    ClientPeer,
    ForwardingRules,
    client_response_headers,
    client_response_lines,
    upstream_request_headers,
    upstream_request_lines,
)

LIMITS: Final = HeadLimits()
UPSTREAM: Final = b"my-project.appspot.com"
CL: Final = b"Content-Length: 5"
TE: Final = b"Transfer-Encoding: chunked"
# Hypothesis examples per property, as in test_heads.
EXAMPLES: Final = 200


# --- header rewriting ---------------------------------------------------------------------

CLIENT: Final = ip_address("203.0.113.5")
PROXY_V4: Final = ip_address("10.0.0.2")
PROXY_V6: Final = ip_address("2001:db8:1::2")
RULES: Final = ForwardingRules(
    upstream_authority=UPSTREAM,
    host_header="rewrite",
    added_headers=(),
    trusted_proxies=(ip_network("10.0.0.0/8"), ip_network("2001:db8:1::/48")),
)
HOP_BY_HOP: Final = [
    b"Connection: keep-alive",
    b"Keep-Alive: timeout=5",
    b"Proxy-Connection: keep-alive",
    b"Proxy-Authorization: Basic eDp5",
    b"Proxy-Authenticate: Basic",
    b"TE: trailers",
    b"Trailer: X-Checksum",
    b"Transfer-Encoding: chunked",
    b"Upgrade: websocket",
    b"Content-Length: 5",
]


def forward(
    *fields: bytes,
    peer: IPAddress | None = CLIENT,
    rules: ForwardingRules = RULES,
    line: bytes = GET,
) -> list[tuple[bytes, bytes]]:
    return upstream_request_headers(
        check_request_head(request(*fields, line=line), LIMITS),
        peer=ClientPeer.of(peer) if peer is not None else None,
        rules=rules,
    )


def values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [value for field_name, value in headers if field_name == name]


@pytest.mark.parametrize(
    "field", [*HOP_BY_HOP, b"Expect: 100-continue"], ids=lambda f: f.split(b":")[0].decode()
)
def test_hop_by_hop_request_fields_stripped(field: bytes) -> None:
    headers = forward(HOST, b"Accept: */*", field)
    assert [name for name, _ in headers][:2] == [b"host", b"accept"]
    assert field.split(b":")[0].lower() not in {name for name, _ in headers}


@pytest.mark.parametrize("field", HOP_BY_HOP, ids=lambda f: f.split(b":")[0].decode())
def test_hop_by_hop_response_fields_stripped(field: bytes) -> None:
    head = check_response_head(response(field, b"Vary: Accept"), request_method=b"GET")
    assert client_response_headers(head) == [(b"vary", b"Accept")]


def test_connection_named_fields_stripped_both_ways() -> None:
    fields = (
        b"Connection: close, X-Hop",
        b"X-Keep: 1",
        b"x-hop: 2",
        b"Connection: x-other",
        b"X-Other: 3",
    )
    assert forward(HOST, *fields)[1:2] == [(b"x-keep", b"1")]
    head = check_response_head(response(*fields), request_method=b"GET")
    assert client_response_headers(head) == [(b"x-keep", b"1")]


def test_connection_cannot_strip_what_we_add() -> None:
    """Our X-Forwarded-* and the operator's headers are added after the client's are filtered."""
    rules = replace(RULES, added_headers=((b"x-proxy-key", b"k"),))
    headers = forward(HOST, b"Connection: x-forwarded-for, x-proxy-key, host", rules=rules)
    assert values(headers, b"x-forwarded-for") == [b"203.0.113.5"]
    assert values(headers, b"x-proxy-key") == [b"k"]
    assert values(headers, b"host") == [UPSTREAM]


def test_golden_rewrite_order() -> None:
    rules = replace(RULES, added_headers=((b"x-proxy-key", b"k"), (b"accept", b"application/json")))
    headers = forward(
        HOST,
        b"Accept: */*",
        b"User-Agent: app/1.0",
        b"Connection: keep-alive",
        b"Authorization: Bearer t",
        b"X-Forwarded-For: 6.6.6.6",
        b"Content-Length: 2",
        rules=rules,
    )
    assert headers == [
        (b"host", UPSTREAM),
        (b"user-agent", b"app/1.0"),
        (b"authorization", b"Bearer t"),
        (b"x-forwarded-for", b"203.0.113.5"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", b"api.example.com"),
        (b"x-proxy-key", b"k"),
        (b"accept", b"application/json"),
    ]


@pytest.mark.parametrize(
    ("peer", "client_fields", "expected"),
    [
        (CLIENT, (), [b"203.0.113.5"]),
        (CLIENT, (b"X-Forwarded-For: 1.2.3.4",), [b"203.0.113.5"]),  # a lie from anyone
        (PROXY_V4, (), [b"10.0.0.2"]),
        (PROXY_V4, (b"X-Forwarded-For: 1.2.3.4",), [b"1.2.3.4, 10.0.0.2"]),
        (
            PROXY_V4,
            (b"X-Forwarded-For: 1.2.3.4, 5.6.7.8", b"X-Forwarded-For: 9.9.9.9"),
            [b"1.2.3.4, 5.6.7.8, 9.9.9.9, 10.0.0.2"],
        ),
        (ip_address("2001:db8:2::5"), (b"X-Forwarded-For: 1.2.3.4",), [b"2001:db8:2::5"]),
        (PROXY_V6, (b"X-Forwarded-For: 1.2.3.4",), [b"1.2.3.4, 2001:db8:1::2"]),
        # IPv4-mapped IPv6 peers (dual-stack sockets) are shown and trusted as IPv4.
        (IPv6Address("::ffff:203.0.113.5"), (b"X-Forwarded-For: 1.2.3.4",), [b"203.0.113.5"]),
        (IPv6Address("::ffff:10.0.0.2"), (b"X-Forwarded-For: 1.2.3.4",), [b"1.2.3.4, 10.0.0.2"]),
        # An IPv4 peer is never inside an IPv6 network, nor the other way round.
        (IPv4Address("32.1.13.184"), (b"X-Forwarded-For: 1.2.3.4",), [b"32.1.13.184"]),
        (None, (b"X-Forwarded-For: 1.2.3.4",), []),
    ],
    ids=[
        "v4-untrusted", "v4-untrusted-lies", "v4-trusted-alone", "v4-trusted-appends",
        "v4-trusted-joins-fields", "v6-untrusted", "v6-trusted", "mapped-untrusted",
        "mapped-trusted", "v4-not-in-v6-network", "no-peer",
    ],
)  # fmt: skip
def test_x_forwarded_for(
    peer: IPAddress | None, client_fields: tuple[bytes, ...], expected: list[bytes]
) -> None:
    assert values(forward(HOST, *client_fields, peer=peer), b"x-forwarded-for") == expected


@pytest.mark.parametrize(
    ("peer", "field", "name", "expected"),
    [
        (CLIENT, b"X-Forwarded-Proto: http", b"x-forwarded-proto", [b"https"]),
        (PROXY_V4, b"X-Forwarded-Proto: http", b"x-forwarded-proto", [b"http"]),
        (PROXY_V4, b"X-Other: 1", b"x-forwarded-proto", [b"https"]),
        (CLIENT, b"X-Forwarded-Host: evil.example", b"x-forwarded-host", [b"api.example.com"]),
        (PROXY_V4, b"X-Forwarded-Host: www.example", b"x-forwarded-host", [b"www.example"]),
        (PROXY_V4, b"X-Other: 1", b"x-forwarded-host", [b"api.example.com"]),
        (CLIENT, b"Forwarded: for=1.2.3.4", b"forwarded", []),
        (None, b"Forwarded: for=1.2.3.4", b"forwarded", []),
        (PROXY_V4, b"Forwarded: for=1.2.3.4", b"forwarded", [b"for=1.2.3.4"]),
        (CLIENT, b"X-Real-IP: 1.2.3.4", b"x-real-ip", []),
        (PROXY_V4, b"X-Real-IP: 1.2.3.4", b"x-real-ip", [b"1.2.3.4"]),
        (CLIENT, b"True-Client-IP: 1.2.3.4", b"true-client-ip", []),
        (CLIENT, b"CF-Connecting-IP: 1.2.3.4", b"cf-connecting-ip", []),
    ],
    ids=[
        "proto-untrusted-replaced", "proto-trusted-kept", "proto-trusted-added",
        "host-untrusted-replaced", "host-trusted-kept", "host-trusted-added",
        "forwarded-untrusted-dropped", "forwarded-no-peer-dropped", "forwarded-trusted-kept",
        "real-ip-untrusted-dropped", "real-ip-trusted-kept", "true-client-ip-untrusted-dropped",
        "cf-connecting-ip-untrusted-dropped",
    ],
)  # fmt: skip
def test_forwarding_claims(
    peer: IPAddress | None, field: bytes, name: bytes, expected: list[bytes]
) -> None:
    assert values(forward(HOST, field, peer=peer), name) == expected


ABSOLUTE: Final = b"GET http://abs.example:80/ HTTP/1.1"


@pytest.mark.parametrize(
    ("mode", "fields", "line", "host", "forwarded_host"),
    [
        ("rewrite", (HOST,), GET, UPSTREAM, [b"api.example.com"]),
        ("preserve", (HOST,), GET, b"api.example.com", [b"api.example.com"]),
        ("preserve", (HOST,), ABSOLUTE, b"abs.example:80", [b"abs.example:80"]),
        ("preserve", (), b"GET / HTTP/1.0", UPSTREAM, []),  # the client named no host
        ("rewrite", (), b"GET / HTTP/1.0", UPSTREAM, []),
    ],
    ids=["rewrite", "preserve", "preserve-absolute-form", "preserve-1.0-no-host", "rewrite-1.0"],
)  # fmt: skip
def test_host(
    mode: str, fields: tuple[bytes, ...], line: bytes, host: bytes, forwarded_host: list[bytes]
) -> None:
    rules = replace(RULES, host_header="preserve" if mode == "preserve" else "rewrite")
    headers = forward(*fields, line=line, rules=rules)
    assert headers[0] == (b"host", host)
    assert values(headers, b"host") == [host]
    assert values(headers, b"x-forwarded-host") == forwarded_host


def test_added_headers_replace_client_and_our_fields() -> None:
    rules = replace(
        RULES,
        added_headers=((b"x-api-key", b"operator"), (b"x-forwarded-proto", b"wss")),
    )
    headers = forward(
        HOST, b"X-Api-Key: client", b"X-Forwarded-Proto: http", peer=PROXY_V4, rules=rules
    )
    assert values(headers, b"x-api-key") == [b"operator"]
    assert values(headers, b"x-forwarded-proto") == [b"wss"]
    assert headers[-2:] == [(b"x-api-key", b"operator"), (b"x-forwarded-proto", b"wss")]


def test_set_cookie_order_and_everything_else_kept() -> None:
    head = check_response_head(
        response(
            b"Set-Cookie: a=1; Secure",
            b"Content-Type: text/plain",
            b"Set-Cookie: b=2",
            b"Connection: keep-alive",
            b"Set-Cookie: c=3",
            CL,
        ),
        request_method=b"GET",
    )
    assert client_response_headers(head) == [
        (b"set-cookie", b"a=1; Secure"),
        (b"content-type", b"text/plain"),
        (b"set-cookie", b"b=2"),
        (b"set-cookie", b"c=3"),
    ]


@pytest.mark.parametrize(
    "fields",
    [
        (CL, b"Connection: keep-alive"),
        (TE, b"Expect: 100-continue", b"Connection: close, X-Hop", b"X-Hop: 1"),
        (b"Connection: content-length", CL),
    ],
)
def test_no_framing_field_survives(fields: tuple[bytes, ...]) -> None:
    for peer in (CLIENT, PROXY_V4, None):
        headers = forward(HOST, b"Accept: */*", *fields, peer=peer)
        assert {name for name, _ in headers}.isdisjoint(
            {b"content-length", b"transfer-encoding", b"connection", b"expect", b"x-hop"}
        )


# --- rules from the configuration ----------------------------------------------------------


UPSTREAM_CONFIG: Final = UpstreamConfig(
    url="https://[2001:db8::1]:8443",
    scheme="https",
    host="2001:db8::1",
    port=8443,
    host_header="preserve",
    headers=(("X-Proxy-Key", "s\xe9cret"),),
    trusted_proxies=(ip_network("10.0.0.0/8"),),
)


def test_rules_from_config() -> None:
    rules = ForwardingRules.from_config(UPSTREAM_CONFIG)
    assert rules == ForwardingRules(
        upstream_authority=b"[2001:db8::1]:8443",
        host_header="preserve",
        added_headers=((b"x-proxy-key", b"s\xe9cret"),),
        trusted_proxies=(ip_network("10.0.0.0/8"),),
    )


@pytest.mark.parametrize(
    "added",
    [
        (b"host", b"a"),
        (b"content-length", b"0"),
        (b"transfer-encoding", b"chunked"),
        (b"connection", b"close"),
        (b"expect", b"100-continue"),
        (b"x_api_key", b"a"),  # would pose as x-api-key behind a CGI-style upstream
        (b"X-Upper", b"a"),
        (b"x-a", b"a\r\nx-b: b"),
        (b"x-a", b" padded"),
    ],
)
def test_rules_refuse_headers_we_could_not_add(added: tuple[bytes, bytes]) -> None:
    with pytest.raises(ValueError, match=r"upstream\.headers"):
        replace(RULES, added_headers=(added,))


def test_rules_refuse_a_value_outside_latin1() -> None:
    upstream = replace(UPSTREAM_CONFIG, headers=(("X-Price", "5 \u20ac"),))
    with pytest.raises(ValueError, match="Latin-1"):
        ForwardingRules.from_config(upstream)


def test_rules_refuse_non_ascii_upstream_host() -> None:
    upstream = UpstreamConfig(
        url="https://b\xfccher.example", scheme="https", host="b\xfccher.example", port=443
    )
    with pytest.raises(ValueError, match="punycode"):
        ForwardingRules.from_config(upstream)


def _reference_connection_options(headers: tuple[tuple[bytes, bytes], ...]) -> frozenset[bytes]:
    return frozenset(
        option.strip(b" \t").lower()
        for name, value in headers
        if name == b"connection"
        for option in value.split(b",")
    )


_CONNECTION_VALUES: Final = [
    b"keep-alive", b"Keep-Alive", b"close", b"CLOSE", b" close", b"close, x-a", b"x-a",
    b"keep-alive, close", b"te", b"closed", b"",
]  # fmt: skip


@settings(max_examples=examples(EXAMPLES))
@given(
    connection=st.lists(st.sampled_from(_CONNECTION_VALUES), max_size=2),
    others=st.lists(
        st.sampled_from([b"x-a", b"close", b"keep-alive", b"closed", b"vary", b"te"]), max_size=4
    ),
    peer=st.none() | st.ip_addresses(),
)
def test_hop_by_hop_filter_as_before(
    connection: list[bytes], others: list[bytes], peer: IPAddress | None
) -> None:
    """The usual Connection values' options come from a table, the rest are parsed: the fields
    forwarded either way are the ones the plain filter keeps. X-Forwarded-For is the peer as
    str() writes it."""
    client = ClientPeer.of(peer) if peer is not None else None
    if isinstance(peer, IPv6Address) and peer.ipv4_mapped is not None:
        peer = peer.ipv4_mapped  # as ClientPeer does: shown and trusted as IPv4
    fields = [b"Connection: " + value for value in connection] + [b"%b: 1" % n for n in others]
    head = check_response_head(response(*fields), request_method=b"GET")
    named = _reference_connection_options(head.headers)
    dropped = RESPONSE_DROPPED | named
    assert client_response_headers(head) == [f for f in head.headers if f[0] not in dropped]
    request_head = check_request_head(request(HOST, *fields), LIMITS)
    forwarded = upstream_request_headers(request_head, peer=client, rules=RULES)
    dropped = REQUEST_DROPPED | FORWARDING_CLAIMS | named
    if peer is not None and any(peer in network for network in RULES.trusted_proxies):
        dropped -= FORWARDING_CLAIMS  # a trusted proxy's claims stay
    kept = [f for f in request_head.headers if f[0] not in dropped]
    assert forwarded[1 : 1 + len(kept)] == kept
    expected = [] if peer is None else [str(peer).encode()]
    assert values(forwarded, b"x-forwarded-for") == expected


def _normalized(lines: Sequence[bytes]) -> list[tuple[bytes, bytes]]:
    """Field lines as (lowercase name, value without OWS): what they mean."""
    return [
        (name.lower(), value.strip(b" \t"))
        for name, _, value in (line.partition(b":") for line in lines)
    ]


_SPELLINGS: Final = [
    b"X-A: 1", b"x-a:1", b"X-A:\t 2 ", b"Vary: Accept", b"VARY:  x", b"Set-Cookie: a=1",
    b"Set-Cookie: b=2", b"X-Forwarded-For: 192.0.2.9", b"Forwarded: for=x", b"Keep-Alive: 5",
    b"TE: trailers", b"Upgrade: h2c", b"Expect: 100-continue", b"X-Real-IP: 192.0.2.1",
]  # fmt: skip
# What the relay never passes on in a response (RFC 9110 §7.6.1 and Content-Length), spelled
# out here rather than taken from the module under test.
_DROPPED_BY_US: Final = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
        b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
        b"content-length",
    }
)  # fmt: skip
_LINE_RULES: Final = [
    RULES,
    replace(RULES, trusted_proxies=()),
    replace(RULES, trusted_proxies=(), host_header="preserve"),
    replace(RULES, trusted_proxies=(), added_headers=((b"x-a", b"ours"),)),
]


@settings(max_examples=examples(EXAMPLES * 2))
@given(
    connection=st.lists(st.sampled_from(_CONNECTION_VALUES), max_size=2),
    fields=st.lists(st.sampled_from(_SPELLINGS), max_size=6),
    version=st.sampled_from([b"1.1", b"1.0"]),
    peer=st.none() | st.sampled_from([CLIENT, PROXY_V4, PROXY_V6, ip_address("::ffff:10.0.0.3")]),
    rules=st.sampled_from(_LINE_RULES),
)
def test_lines_as_received_mean_what_the_fields_say(
    connection: list[bytes],
    fields: list[bytes],
    version: bytes,
    peer: IPAddress | None,
    rules: ForwardingRules,
) -> None:
    """The fast path relays the client's and the upstream's field lines as they came: they
    mean exactly the fields the general rewriting selects, in the same order; and a head's
    `close` is the plain reading of its fields (_plain_close)."""
    lines = [b"Connection: " + value for value in connection] + fields
    client = ClientPeer.of(peer) if peer is not None else None
    request_head = check_request_head(request(HOST, *lines, line=b"GET / HTTP/" + version), LIMITS)
    as_lines = upstream_request_lines(request_head, peer=client, rules=rules)
    assert _normalized(as_lines) == upstream_request_headers(request_head, peer=client, rules=rules)
    assert request_head.close is plain_close(version, request_head.headers)
    response_head = check_response_head(
        response(*lines, line=b"HTTP/" + version + b" 200 OK"), request_method=b"GET"
    )
    relayed = client_response_lines(response_head)
    assert _normalized(relayed) == client_response_headers(response_head)
    assert response_head.close is plain_close(version, response_head.headers)
    if response_head.forward is not None:  # the usual case: passed on byte for byte
        assert list(relayed) == [
            line for line in lines if line.partition(b":")[0].lower() not in _DROPPED_BY_US
        ]
