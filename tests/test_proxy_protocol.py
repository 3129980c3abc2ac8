"""tls.proxy_protocol: PROXY protocol v1 and v2 headers, golden, byte by byte, refused one
rule at a time, cut at every byte with random bytes after, and drawn by Hypothesis.

The headers are written by tests/helpers/proxy_headers.py from the spec, not by the parser's
code; HAProxy itself sends them in the end-to-end tests of the listener.
"""

from __future__ import annotations

import ipaddress
import random
from typing import Final

import pytest
from helpers.profiles import examples
from helpers.proxy_headers import v1, v2
from hypothesis import given, settings
from hypothesis import strategies as st

from dualproxy.tls.proxy_protocol import (
    MAX_V1_HEADER_BYTES,
    MAX_V2_HEADER_BYTES,
    ProxyHeader,
    ProxyHeaderError,
    parse_proxy_header,
    starts_like_proxy_header,
)

# What follows a header on a real connection: the start of a TLS ClientHello record.
CLIENT_HELLO_START: Final = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
EXAMPLES: Final = 200
SEED: Final = 20261207


def address(text: str, port: int) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    return ipaddress.ip_address(text), port


GOLDEN: Final = [
    pytest.param(
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",  # the spec's own example
        ProxyHeader(1, "proxy", address("192.168.0.1", 56324), address("192.168.0.11", 443), 47),
        id="v1-tcp4-spec-example",
    ),
    pytest.param(
        v1("2001:db8::7", "2001:db8::1", 51234, 443),
        ProxyHeader(1, "proxy", address("2001:db8::7", 51234), address("2001:db8::1", 443), 46),
        id="v1-tcp6",
    ),
    pytest.param(
        b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
        ProxyHeader(
            1,
            "proxy",
            address("255.255.255.255", 65535),
            address("255.255.255.255", 65535),
            56,
        ),
        id="v1-tcp4-longest",
    ),
    pytest.param(b"PROXY UNKNOWN\r\n", ProxyHeader(1, "proxy", None, None, 15), id="v1-unknown"),
    pytest.param(
        b"PROXY UNKNOWN ffff:f::f:ffff ffff:f::f:ffff 65535 65535\r\n",
        ProxyHeader(1, "proxy", None, None, 57),
        id="v1-unknown-with-addresses",
    ),
    pytest.param(
        v2(),
        ProxyHeader(2, "proxy", address("203.0.113.7", 51234), address("192.0.2.1", 443), 28),
        id="v2-tcp4",
    ),
    pytest.param(
        v2(source="2001:db8::7", destination="2001:db8::1"),
        ProxyHeader(2, "proxy", address("2001:db8::7", 51234), address("2001:db8::1", 443), 52),
        id="v2-tcp6",
    ),
    pytest.param(
        v2(tlvs=[(0x01, b"h2"), (0x02, b"api.example.com"), (0x04, b"")]),
        ProxyHeader(2, "proxy", address("203.0.113.7", 51234), address("192.0.2.1", 443), 54),
        id="v2-tcp4-with-tlvs",
    ),
    pytest.param(
        v2(command=0x0, family_transport=0x00, address_block=b""),
        ProxyHeader(2, "local", None, None, 16),
        id="v2-local-health-check",
    ),
    pytest.param(
        v2(command=0x0),  # LOCAL with addresses: they are skipped, not used
        ProxyHeader(2, "local", None, None, 28),
        id="v2-local-with-addresses",
    ),
    pytest.param(
        v2(family_transport=0x00, address_block=b""),
        ProxyHeader(2, "proxy", None, None, 16),
        id="v2-proxy-unspec",
    ),
    pytest.param(
        v2(family_transport=0x12),  # UDP: not ours to take an address from
        ProxyHeader(2, "proxy", None, None, 28),
        id="v2-udp-falls-back",
    ),
    pytest.param(
        v2(family_transport=0x31, address_block=bytes(216)),
        ProxyHeader(2, "proxy", None, None, 232),
        id="v2-unix-falls-back",
    ),
]


@pytest.mark.parametrize(("data", "expected"), GOLDEN)
def test_golden_headers_whole_and_with_the_connection_after(
    data: bytes, expected: ProxyHeader
) -> None:
    assert expected.length == len(data)
    assert parse_proxy_header(data) == expected
    assert parse_proxy_header(data + CLIENT_HELLO_START) == expected


@pytest.mark.parametrize(("data", "expected"), GOLDEN)
def test_golden_headers_byte_by_byte(data: bytes, expected: ProxyHeader) -> None:
    for cut in range(len(data)):
        assert parse_proxy_header(data[:cut]) is None, cut
    assert parse_proxy_header(data) == expected


REFUSED: Final = [
    pytest.param(b"\x16\x03\x01\x02\x00", "no PROXY protocol header", id="a-tls-record"),
    pytest.param(b"GET / HTTP/1.1\r\n", "no PROXY protocol header", id="plain-http"),
    pytest.param(b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "no PROXY", id="v1-lowercase"),
    pytest.param(b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "malformed", id="v1-two-spaces"),
    pytest.param(b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "malformed", id="v1-family"),
    pytest.param(b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "malformed", id="v1-leading-zero"),
    pytest.param(b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "malformed", id="v1-octet-range"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "malformed", id="v1-port-zero-led"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "out of range", id="v1-port-range"),
    pytest.param(b"PROXY TCP4 ::1 ::1 1 2\r\n", "malformed", id="v1-tcp4-with-ipv6"),
    pytest.param(b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n", "not an address", id="v1-tcp6-ipv4"),
    pytest.param(b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "malformed", id="v1-ipv6-zone"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "CRLF", id="v1-bare-lf"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX", "CRLF", id="v1-bare-cr"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "malformed", id="v1-trailing-space"),
    pytest.param(b"PROXY UNKNOWN" + b"x" * 100, "longer than 107", id="v1-no-crlf-in-107"),
    pytest.param(v2(version=0x1), "version nibble 1", id="v2-version-1"),
    pytest.param(v2(command=0x2), "unknown command 2", id="v2-command"),
    pytest.param(v2(family_transport=0x41), "unknown address family", id="v2-family"),
    pytest.param(v2(family_transport=0x13), "unknown address family", id="v2-transport"),
    pytest.param(v2(address_block=bytes(11)), "needs 12", id="v2-short-ipv4-block"),
    pytest.param(
        v2(source="::1", destination="::1", address_block=bytes(35)), "needs 36", id="v2-v6"
    ),
    pytest.param(v2(address_block=bytes(12) + b"\x01\x00"), "truncated TLV", id="v2-tlv-head"),
    pytest.param(v2(address_block=bytes(12) + b"\x01\x00\x05ab"), "TLV longer", id="v2-tlv-long"),
]


@pytest.mark.parametrize(("data", "problem"), REFUSED)
def test_refusals_say_what_is_wrong(data: bytes, problem: str) -> None:
    with pytest.raises(ProxyHeaderError, match=problem):
        parse_proxy_header(data)


def test_a_107_byte_v1_line_is_accepted_and_108_is_not() -> None:
    """The twin of the length refusal: the spec's longest line is read."""
    longest = b"PROXY UNKNOWN " + b"f" * (MAX_V1_HEADER_BYTES - len("PROXY UNKNOWN \r\n")) + b"\r\n"
    assert len(longest) == MAX_V1_HEADER_BYTES
    header = parse_proxy_header(longest)
    assert header is not None
    assert header.length == MAX_V1_HEADER_BYTES
    with pytest.raises(ProxyHeaderError, match="longer than"):
        parse_proxy_header(longest[:-2] + b"f\r\n")


def test_a_v2_header_of_the_largest_announced_length_is_read() -> None:
    padding = [(0x04, bytes(0xFFFF - 12 - 3))]  # one NOOP TLV fills the 16-bit length
    data = v2(tlvs=padding)
    assert len(data) == MAX_V2_HEADER_BYTES
    assert parse_proxy_header(data[:-1]) is None
    header = parse_proxy_header(data)
    assert header is not None
    assert header.length == MAX_V2_HEADER_BYTES


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", None),
        (b"\r\n\r\n\x00", None),
        (b"PRO", None),
        (b"PROXY ", True),
        (b"\r\n\r\n\x00\r\nQUIT\n", True),
        (b"\x16\x03\x01", False),
        (b"GET /", False),
        (b"PROXYX", False),
        (b"\r\n\r\n\x01", False),
    ],
)
def test_starts_like_proxy_header(data: bytes, expected: bool | None) -> None:
    assert starts_like_proxy_header(data) is expected


def outcome(data: bytes) -> ProxyHeader | str | None:
    """What the parser makes of `data`: a header, None, or an error (and nothing else)."""
    try:
        return parse_proxy_header(data)
    except ProxyHeaderError:
        return "error"


@pytest.mark.parametrize(("data", "expected"), GOLDEN)
def test_cut_at_every_byte_then_random_bytes(data: bytes, expected: ProxyHeader) -> None:
    """mitmproxy's fuzz shape: a header cut anywhere and followed by random bytes gives only
    the documented outcomes, and a whole header followed by anything is read the same."""
    rng = random.Random(SEED)
    for cut in range(len(data) + 1):
        for _ in range(3):
            tail = rng.randbytes(rng.randrange(0, 64))
            result = outcome(data[:cut] + tail)
            if cut == len(data):
                assert result == expected
            elif result is None:
                assert len(data[:cut] + tail) < max(len(data), MAX_V1_HEADER_BYTES)


@settings(max_examples=examples(EXAMPLES))
@given(
    source=st.ip_addresses(),
    destination_port=st.integers(0, 0xFFFF),
    source_port=st.integers(0, 0xFFFF),
    tlvs=st.lists(st.tuples(st.integers(0, 0xFF), st.binary(max_size=40)), max_size=4),
    trailing=st.binary(max_size=32),
)
def test_v2_round_trip(
    source: ipaddress.IPv4Address | ipaddress.IPv6Address,
    destination_port: int,
    source_port: int,
    tlvs: list[tuple[int, bytes]],
    trailing: bytes,
) -> None:
    destination = "192.0.2.1" if source.version == 4 else "2001:db8::1"
    data = v2(
        source=str(source),
        destination=destination,
        source_port=source_port,
        destination_port=destination_port,
        tlvs=tlvs,
    )
    header = parse_proxy_header(data + trailing)
    assert header == ProxyHeader(
        2,
        "proxy",
        (source, source_port),
        (ipaddress.ip_address(destination), destination_port),
        len(data),
    )


@settings(max_examples=examples(EXAMPLES))
@given(source=st.ip_addresses(), ports=st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)))
def test_v1_round_trip(
    source: ipaddress.IPv4Address | ipaddress.IPv6Address, ports: tuple[int, int]
) -> None:
    destination = "192.0.2.1" if source.version == 4 else "2001:db8::1"
    data = v1(str(source), destination, *ports)
    header = parse_proxy_header(data + CLIENT_HELLO_START)
    assert header is not None
    assert (header.source, header.destination, header.length) == (
        (source, ports[0]),
        (ipaddress.ip_address(destination), ports[1]),
        len(data),
    )


@settings(max_examples=examples(EXAMPLES * 5))
@given(st.binary(max_size=200))
def test_any_bytes_give_a_documented_outcome(data: bytes) -> None:
    result = outcome(data)
    if isinstance(result, ProxyHeader):
        assert result.length <= len(data)
    elif result is None:
        assert len(data) < MAX_V2_HEADER_BYTES
