"""PROXY protocol headers as a balancer writes them (HAProxy's doc/proxy-protocol.txt), written
independently of dualproxy.tls.proxy_protocol so that the tests check it against the spec."""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v1(source: str, destination: str, source_port: int, destination_port: int) -> bytes:
    """A version 1 line for TCP over the addresses' family."""
    family = "TCP6" if ":" in source else "TCP4"
    return f"PROXY {family} {source} {destination} {source_port} {destination_port}\r\n".encode()


def v2(
    *,
    command: int = 0x1,
    family_transport: int | None = None,
    source: str = "203.0.113.7",
    destination: str = "192.0.2.1",
    source_port: int = 51234,
    destination_port: int = 443,
    tlvs: Sequence[tuple[int, bytes]] = (),
    address_block: bytes | None = None,
    version: int = 0x2,
) -> bytes:
    """A version 2 header: TCP over the addresses' family unless `family_transport` says
    otherwise; `address_block` replaces the one the addresses make."""
    src = ipaddress.ip_address(source)
    dst = ipaddress.ip_address(destination)
    if family_transport is None:
        family_transport = 0x21 if src.version == 6 else 0x11
    if address_block is None:
        address_block = src.packed + dst.packed + struct.pack(">HH", source_port, destination_port)
    body = address_block + b"".join(
        struct.pack(">BH", kind, len(value)) + value for kind, value in tlvs
    )
    return (
        V2_SIGNATURE
        + bytes([(version << 4) | command, family_transport])
        + struct.pack(">H", len(body))
        + body
    )
