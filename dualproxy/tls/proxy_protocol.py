"""Read a PROXY protocol header (HAProxy's, versions 1 and 2) at the start of a connection,
without doing any I/O.

A load balancer that proxies TCP (HAProxy with `send-proxy-v2`, Google Cloud's TCP proxy, AWS's
NLB) hides the client's address: every connection comes from the balancer. With the PROXY
protocol it writes one header before the client's first byte, naming the connection it
relays; the server reads it before the ClientHello peek and uses its source address as the
client's everywhere (policy, X-Forwarded-For, logs, evidence). The specification is HAProxy's
doc/proxy-protocol.txt (the sections cited below as "spec").

Contract (the same shape as `tls.clienthello.parse_client_hello`): ``parse_proxy_header(data)``
takes every byte received so far on the connection, from its first byte, and either

1. returns a ``ProxyHeader`` once a whole, valid header has arrived; its ``length`` says where
   the relayed connection's own bytes (the ClientHello) start,
2. returns ``None`` while the bytes so far are a valid beginning and more are needed, or
3. raises ``ProxyHeaderError`` as soon as no continuation can make them a valid header.

It keeps no state between calls. ``None`` is only returned while ``len(data)`` is below the
bound of the version being read (MAX_V1_HEADER_BYTES, or 16 + the length a version 2 header
announces, at most MAX_V2_HEADER_BYTES), so a caller that loops until it gets a value or an
error buffers at most that much.

Strictness (spec section 2: "any sequence which does not exactly match the protocol must be
discarded and cause the receiver to abort the connection"): version 1 is one line of exactly
single-spaced fields ending in CRLF, addresses in their canonical form of the announced
family (no leading zeros in IPv4, no zone in IPv6), ports 0 to 65535 without leading zeros;
version 2 needs version nibble 2, command LOCAL or PROXY, a known family and transport, an
address block as long as its family needs and well-formed TLVs after it (each skipped: we
use none). What carries no client address is accepted and says so (``source`` is None): a
LOCAL command (the balancer's own health check), version 1's UNKNOWN, and a version 2 family
or transport other than TCP over IPv4 or IPv6 (spec 2.2: a receiver falls back to the real
endpoints for what it does not implement). The caller then uses the connection's own peer.

Whether a header must come, may come or must not is `expectation`'s answer, from
`[listen] proxy_protocol` and the peers allowed to send one (`proxy_protocol_from`);
`starts_like_proxy_header` tells the optional case from the first bytes: a TLS ClientHello
starts with 0x16, a header with "P" or CR.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import struct
from dataclasses import dataclass
from typing import Final, Literal

from dualproxy.config.names import IPAddress, IPNetwork
from dualproxy.config.schema import ProxyProtocolMode

__all__ = [
    "MAX_V1_HEADER_BYTES",
    "MAX_V2_HEADER_BYTES",
    "V1_PREFIX",
    "V2_SIGNATURE",
    "Expect",
    "ProxyHeader",
    "ProxyHeaderError",
    "expectation",
    "parse_proxy_header",
    "starts_like_proxy_header",
]

# Spec 2.1: the longest version 1 line, "PROXY UNKNOWN <two full IPv6> 65535 65535\r\n".
MAX_V1_HEADER_BYTES: Final = 107
# Spec 2.2: a version 2 header is its 16 fixed bytes and a 16-bit announced length.
V2_FIXED_BYTES: Final = 16
MAX_V2_HEADER_BYTES: Final = V2_FIXED_BYTES + 0xFFFF

V1_PREFIX: Final = b"PROXY "
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
_CRLF: Final = b"\r\n"

# Spec 2.2, byte 13: the version in the high nibble (only 2), the command in the low one.
_V2_VERSION: Final = 0x2
_V2_LOCAL: Final = 0x0
_V2_PROXY: Final = 0x1
# Byte 14: the address family in the high nibble, the transport in the low one.
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_UNSPEC, _STREAM, _DGRAM = 0x0, 0x1, 0x2
# Each family's address block: two addresses, then (for INET families) two 16-bit ports.
_ADDRESS_BLOCK: Final = {_AF_UNSPEC: 0, _AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}
_V2_FIXED: Final = struct.Struct(">12sBBH")
_IPV4_BLOCK: Final = struct.Struct(">4s4sHH")
_IPV6_BLOCK: Final = struct.Struct(">16s16sHH")
# A TLV: its type byte, then a 16-bit length of its value (spec 2.2).
_TLV_HEADER: Final = struct.Struct(">BH")

# Spec 2.1: "exactly 4 integers in the range [0..255] ... Heading zeroes are not permitted";
# ports likewise. IPv6: hexadecimal groups and colons (checked by ipaddress afterwards).
_DECIMAL: Final = r"(?:0|[1-9][0-9]{0,4})"
_OCTET: Final = r"(?:0|[1-9][0-9]?|1[0-9]{2}|2[0-4][0-9]|25[0-5])"
_IPV4_TEXT: Final = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
_IPV6_TEXT: Final = r"[0-9A-Fa-f:.]{2,45}"
_V1_TCP4: Final = re.compile(
    rb"PROXY TCP4 (%b) (%b) (%b) (%b)" % ((_IPV4_TEXT.encode(),) * 2 + (_DECIMAL.encode(),) * 2)
)
_V1_TCP6: Final = re.compile(
    rb"PROXY TCP6 (%b) (%b) (%b) (%b)" % ((_IPV6_TEXT.encode(),) * 2 + (_DECIMAL.encode(),) * 2)
)
# Spec 2.1: after UNKNOWN "the receiver must ignore anything presented before the CRLF".
_V1_UNKNOWN: Final = re.compile(rb"PROXY UNKNOWN(?: [^\r\n]*)?")
_MAX_PORT: Final = 0xFFFF
# Received bytes quoted in an error: enough to recognise them in a log.
_SNIPPET_BYTES: Final = 40


class ProxyHeaderError(ValueError):
    """Bytes that are not a valid PROXY protocol header: the sender's fault (a balancer that
    is misconfigured, or a client that is not a balancer). `problem` says what, for the log;
    it quotes at most a short, escaped snippet of the bytes."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A valid header. `source` and `destination` are None when it carries no client address
    (LOCAL, UNKNOWN, a family or transport we take no address from): the connection's own
    peer stands. `length` is the header's size: the relayed bytes start there."""

    version: Literal[1, 2]
    command: Literal["proxy", "local"]
    source: tuple[IPAddress, int] | None
    destination: tuple[IPAddress, int] | None
    length: int


class Expect(enum.Enum):
    """What a connection's first bytes must be, by who sent them (`expectation`)."""

    # The connection is the client's own: a header would be a client claiming another
    # address (refused), anything else is its ClientHello.
    NO_HEADER = "no header"
    # A trusted balancer that may or may not send one ("optional"): read it when it comes.
    MAYBE = "maybe"
    # A trusted balancer that must send one ("required"): refused without it.
    HEADER = "header"
    # "required", from a peer outside proxy_protocol_from: refused before a byte is read.
    REFUSE = "refuse"


def expectation(
    mode: ProxyProtocolMode, trusted: tuple[IPNetwork, ...], peer: IPAddress | None
) -> Expect:
    """What a connection from `peer` must start with under `[listen] proxy_protocol = mode`
    and `proxy_protocol_from = trusted`. A peer without an address (a Unix socket) is not
    trusted."""
    if mode == "off":
        return Expect.NO_HEADER
    from_balancer = peer is not None and any(peer in network for network in trusted)
    if not from_balancer:
        return Expect.REFUSE if mode == "required" else Expect.NO_HEADER
    return Expect.HEADER if mode == "required" else Expect.MAYBE


def starts_like_proxy_header(data: bytes) -> bool | None:
    """Whether the connection's first bytes begin a PROXY header (True), cannot (False: a
    TLS record, plain HTTP), or cannot be told yet (None: they are a prefix of a signature)."""
    for signature in (V2_SIGNATURE, V1_PREFIX):
        common = min(len(data), len(signature))
        if data[:common] == signature[:common]:
            return True if common == len(signature) else None
    return False


def parse_proxy_header(data: bytes) -> ProxyHeader | None:
    """The header at the start of `data`, None while more bytes are needed, or
    ProxyHeaderError (see the module docstring)."""
    begins = starts_like_proxy_header(data)
    if begins is None:
        return None
    if not begins:
        raise ProxyHeaderError(f"no PROXY protocol header: {_snippet(data)}")
    if data.startswith(V2_SIGNATURE):
        return _parse_v2(data)
    return _parse_v1(data)


def _parse_v1(data: bytes) -> ProxyHeader | None:
    window = data[:MAX_V1_HEADER_BYTES]
    end = window.find(_CRLF)
    if end < 0:
        # Spec 2.1: "must not tolerate a single CR or LF character to end the line". A CR as
        # the last byte so far may still be followed by its LF.
        if b"\n" in window or b"\r" in window[:-1]:
            raise ProxyHeaderError("version 1 line not ended by CRLF")
        if len(data) >= MAX_V1_HEADER_BYTES:
            raise ProxyHeaderError(f"version 1 line longer than {MAX_V1_HEADER_BYTES} bytes")
        return None
    line, length = data[:end], end + len(_CRLF)
    source: tuple[IPAddress, int] | None
    destination: tuple[IPAddress, int] | None
    if (match := _V1_TCP4.fullmatch(line)) is not None:
        source, destination = _v1_endpoints(match, ipaddress.IPv4Address)
    elif (match := _V1_TCP6.fullmatch(line)) is not None:
        source, destination = _v1_endpoints(match, ipaddress.IPv6Address)
    elif _V1_UNKNOWN.fullmatch(line) is not None:
        source = destination = None
    else:
        raise ProxyHeaderError(f"malformed version 1 line {_snippet(line)}")
    return ProxyHeader(1, "proxy", source, destination, length)


def _v1_endpoints(
    match: re.Match[bytes], family: type[ipaddress.IPv4Address] | type[ipaddress.IPv6Address]
) -> tuple[tuple[IPAddress, int], tuple[IPAddress, int]]:
    source_text, destination_text, source_port, destination_port = match.groups()
    ports = []
    for port in (source_port, destination_port):
        if int(port) > _MAX_PORT:
            raise ProxyHeaderError(f"port {port.decode()} out of range")
        ports.append(int(port))
    addresses = []
    for text in (source_text, destination_text):
        try:
            addresses.append(family(text.decode("ascii")))
        except ValueError:
            raise ProxyHeaderError(f"{_snippet(text)} is not an address of its family") from None
    return (addresses[0], ports[0]), (addresses[1], ports[1])


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) < V2_FIXED_BYTES:
        return None
    _, version_command, family_transport, announced = _V2_FIXED.unpack_from(data)
    version, command = version_command >> 4, version_command & 0xF
    family, transport = family_transport >> 4, family_transport & 0xF
    if version != _V2_VERSION:
        raise ProxyHeaderError(f"version 2 signature with version nibble {version}")
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise ProxyHeaderError(f"unknown command {command} (only LOCAL 0 and PROXY 1)")
    if family not in _ADDRESS_BLOCK or transport not in (_UNSPEC, _STREAM, _DGRAM):
        raise ProxyHeaderError(f"unknown address family or transport 0x{family_transport:02x}")
    length = V2_FIXED_BYTES + announced
    if len(data) < length:
        return None
    block = data[V2_FIXED_BYTES:length]
    needed = _ADDRESS_BLOCK[family]
    if len(block) < needed:
        raise ProxyHeaderError(
            f"address block of {len(block)} bytes, family 0x{family:x} needs {needed}"
        )
    _check_tlvs(block[needed:])
    source: tuple[IPAddress, int] | None = None
    destination: tuple[IPAddress, int] | None = None
    if command == _V2_PROXY and transport == _STREAM:
        if family == _AF_INET:
            raw_source, raw_destination, source_port, destination_port = _IPV4_BLOCK.unpack_from(
                block
            )
            source = (ipaddress.IPv4Address(raw_source), source_port)
            destination = (ipaddress.IPv4Address(raw_destination), destination_port)
        elif family == _AF_INET6:
            raw_source, raw_destination, source_port, destination_port = _IPV6_BLOCK.unpack_from(
                block
            )
            source = (ipaddress.IPv6Address(raw_source), source_port)
            destination = (ipaddress.IPv6Address(raw_destination), destination_port)
    return ProxyHeader(2, "local" if command == _V2_LOCAL else "proxy", source, destination, length)


def _check_tlvs(tlvs: bytes) -> None:
    """Each TLV after the address block must fit in it (spec 2.2); their values are ignored."""
    offset = 0
    while offset < len(tlvs):  # bounded: each round consumes at least a TLV header
        if len(tlvs) - offset < _TLV_HEADER.size:
            raise ProxyHeaderError("truncated TLV header after the addresses")
        _, size = _TLV_HEADER.unpack_from(tlvs, offset)
        offset += _TLV_HEADER.size + size
        if offset > len(tlvs):
            raise ProxyHeaderError("TLV longer than the header announces")


def _snippet(data: bytes) -> str:
    quoted = repr(data[:_SNIPPET_BYTES])[1:]
    return quoted if len(data) <= _SNIPPET_BYTES else f"{quoted}..."
