"""The PROXY protocol on a listener (`[listen] proxy_protocol`): a connection's first bytes,
before the ClientHello peek.

Theory of operation. A load balancer that proxies TCP writes one header at the start of each
connection naming the client's address (HAProxy's PROXY protocol, v1 or v2; the parser is the
pure `tls.proxy_protocol`). `receive_proxy_header` reads it, bounded in bytes (the parser
needs at most 16 + 65535 bytes for version 2, 107 for version 1) and in time (the caller's
limits.proxy_header_timeout), and then the client's address replaces the balancer's in the
connection's record: the policy's network hints and canary bucket, X-Forwarded-For, the
report rate limit, the log and the evidence all see the client. Bytes read past the header
are the start of the ClientHello: they are handed to the peek.

Who may send one is `tls.proxy_protocol.expectation`'s: a header from a peer outside
`proxy_protocol_from`, no header from a balancer that must send one, or a malformed header
closes that connection at once, without a byte sent back (there is no one to answer: the
balancer relays a TLS client that would not read plain text), logged as
`outcome=proxy-refused` with the reason. A LOCAL command (the balancer's own health check)
keeps the balancer's address.
"""

from __future__ import annotations

from typing import Final

import trio

from dualproxy.serve.connection import ConnectionRecord
from dualproxy.tls.outcome import Outcome
from dualproxy.tls.proxy_protocol import (
    Expect,
    ProxyHeaderError,
    parse_proxy_header,
    starts_like_proxy_header,
)
from dualproxy.tls.streams import TcpStream

__all__ = ["receive_proxy_header"]

# One read: a version 1 header and a ClientHello's first record fit; a long version 2 header
# (TLVs) takes a few reads.
_READ_BYTES: Final = 16 * 1024


async def receive_proxy_header(
    stream: TcpStream, expect: Expect, record: ConnectionRecord
) -> bytes | None:
    """Read the connection's PROXY header as `expect` says, and set `record`'s peer to the
    address it carries. The bytes read after it (the ClientHello's start, maybe empty), or
    None when the connection is refused or closed (`record` says why). The caller bounds the
    time."""
    if expect is Expect.REFUSE:
        _refuse(record, "a peer outside proxy_protocol_from (PROXY protocol required)")
        return None
    buffer = bytearray()
    while True:
        try:
            chunk = await stream.receive_some(_READ_BYTES)
        except trio.BrokenResourceError:
            chunk = b""
        if not chunk:
            record.outcome = Outcome.NO_HELLO
            record.detail = f"closed after {len(buffer)} bytes"
            return None
        buffer += chunk
        data = bytes(buffer)
        begins = starts_like_proxy_header(data)
        if begins is None:
            continue
        if not begins:
            if expect is Expect.HEADER:
                _refuse(record, "no PROXY protocol header from the balancer")
                return None
            return data  # the peer's own ClientHello
        if expect is Expect.NO_HEADER:
            _refuse(record, "a PROXY header from a peer outside proxy_protocol_from")
            return None
        try:
            header = parse_proxy_header(data)
        except ProxyHeaderError as exc:
            _refuse(record, f"malformed PROXY header: {exc.problem}")
            return None
        if header is None:
            continue
        if header.source is not None:
            address, port = header.source
            record.peer_ip = address
            record.peer = f"{address}:{port}" if address.version == 4 else f"[{address}]:{port}"
        return data[header.length :]


def _refuse(record: ConnectionRecord, why: str) -> None:
    record.outcome = Outcome.PROXY_REFUSED
    record.detail = why
