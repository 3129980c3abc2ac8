"""How a reverse proxy rewrites header fields, both ways (RFC 9110 §7.6.1).

Connection, every field it names, Keep-Alive, Proxy-Connection, Proxy-Authenticate,
Proxy-Authorization, TE, Trailer, Transfer-Encoding and Upgrade are hop-by-hop and removed,
and so is Content-Length (`fields`). Framing is the exchange's: it writes ``content-length: N``
from ``content_length``, or ``transfer-encoding: chunked`` when ``chunked`` (or as the client's
version allows), on each side's own connection. Requests also lose Expect (dualproxy answers
100-continue itself) and Host, and get, after the surviving client fields in their order,
X-Forwarded-For, -Proto and -Host; then the operator's added headers, which replace any field
of the same name. See ``upstream_request_headers`` for which client forwarding fields
survive.

Two forms of the same fields: ``upstream_request_headers`` and ``client_response_headers``
give (lowercase name, value) pairs, the form any framing can write (HTTP/2 needs it);
``upstream_request_lines`` and ``client_response_lines`` give the same fields as HTTP/1.1
lines, those that go on unchanged as they came, in their sender's case and spacing (every
byte of them passed the head checks), from the head's ``forward``. The tests hold the two
forms to the same meaning. Pure: values in, values out.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from dualproxy.config.names import IPAddress, IPNetwork
from dualproxy.config.schema import UpstreamConfig
from dualproxy.http.fields import (
    CONTROL,
    FIELD_SEPARATOR,
    FORWARDING_CLAIMS,
    OWS,
    REQUEST_DROPPED,
    REQUEST_NAME_CHARS,
    RESPONSE_DROPPED,
    connection_options,
)
from dualproxy.http.heads import RequestHead, ResponseHead

__all__ = [
    "ClientPeer",
    "ForwardingRules",
    "client_response_headers",
    "client_response_lines",
    "upstream_request_headers",
    "upstream_request_lines",
]

# An operator's added header must not change framing, routing or hop-by-hop semantics.
_NOT_ADDABLE: Final = REQUEST_DROPPED


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
                or name.translate(None, REQUEST_NAME_CHARS)
                or name != name.lower()
                or CONTROL.search(value) is not None
                or value != value.strip(OWS)
            ):
                raise ValueError(
                    f"upstream.headers: {name!r}: {value!r} is not a lowercase header name"
                    " (no underscore) and a value without control characters or edge spaces"
                )
        added = frozenset(name for name, _ in self.added_headers)
        object.__setattr__(self, "_added_names", added)
        object.__setattr__(self, "_dropped", REQUEST_DROPPED | FORWARDING_CLAIMS | added)
        object.__setattr__(self, "_dropped_if_trusted", REQUEST_DROPPED | added)

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
    trusted_proxies), and its X-Forwarded-For text, written once."""

    address: IPAddress
    text: bytes

    @classmethod
    def of(cls, address: IPAddress) -> ClientPeer:
        if isinstance(address, ipaddress.IPv6Address):
            if address.ipv4_mapped is None:
                return cls(address, str(address).encode("ascii"))
            address = address.ipv4_mapped
        # The dotted quad, as str(address) writes it (faster: docs/performance.md).
        return cls(address, b"%d.%d.%d.%d" % tuple(address.packed))


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
    return _forwardable(head.headers, RESPONSE_DROPPED)


def client_response_lines(head: ResponseHead) -> Sequence[bytes]:
    """client_response_headers' fields as lines: as the upstream sent them (its case and
    spacing: they passed every check), unless a Connection option names a field to drop."""
    if head.forward is not None:
        return head.forward
    return [FIELD_SEPARATOR.join(field) for field in client_response_headers(head)]


def upstream_request_lines(
    head: RequestHead, *, peer: ClientPeer | None, rules: ForwardingRules
) -> list[bytes]:
    """upstream_request_headers' fields as lines, the client's as it sent them (unless a
    Connection option names a field to drop). Without trusted proxies or added headers (the
    usual configuration) they are made here directly; the rest goes the general way."""
    if head.forward is None or rules.trusted_proxies or rules.added_headers:
        fields = upstream_request_headers(head, peer=peer, rules=rules)
        return [FIELD_SEPARATOR.join(field) for field in fields]
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


# --- helpers -----------------------------------------------------------------------------


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
        named = connection_options(connection)
        if not named <= dropped:
            kept = [field for field in kept if field[0] not in named]
    return kept
