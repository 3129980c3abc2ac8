"""Which identity (certificate) one connection is served, and why.

`choose` is a pure function of the rotation plan, the peeked ClientHello, the client address
and the clock, so replicas that share a config and a clock agree without talking. It follows
these rules, first match wins:

1. No rotation configured: the only identity, `single`.
2. The grace window is half-open, [grace_start, grace_end). Before it everyone gets old
   (`before-window`); from grace_end on everyone gets new (`after-window`), whatever the hello
   says and whether or not it could be parsed. With rotation.close = "when-safe" the window
   goes on past grace_end, as if grace_end had not come, until the evidence closes it
   (`window_closed`, decided by `canary.window_verdict` and an input here like the clock)
   or grace_deadline comes.
3. In the window, a hello the peek could not parse (None) gets the default identity
   (`unparsed`): the peek is advisory and must not decide on guesses.
4. In the window, the signals are checked in the order SNI, ALPN, network. For each signal a
   match against hints_new gives new and a match against hints_old gives old (config keeps the
   two disjoint per signal), so an old SNI hint beats a new ALPN hint. Reasons: `hint-sni`,
   `hint-alpn`, `hint-network`.
   - SNI: case-insensitive, one trailing dot ignored; `*.example.com` matches exactly one more
     left-most label, as certificate wildcards do (RFC 6125 section 6.4.3).
   - ALPN: any offered token equal to a hinted one.
   - network: the client address in a hinted network; an IPv4-mapped IPv6 address (what a
     dual-stack listener reports for an IPv4 client) counts as its IPv4 address. An unknown
     address matches no network.
5. The canary: with default old, a client whose `canary_bucket` (a hash of its address,
   mapped IPv4 as IPv4, IPv6 by its /64) is below `canary_percent` gets new (`canary`). An
   unknown address is never in the canary. Raising the percentage only adds clients. A halted
   canary (`canary_halted`, decided by `evidence.CanaryJudge` from what clients did, and an
   input here like the clock) sends no one: those clients get the default again.
6. Otherwise the default identity (`default`).
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal

from dualproxy.config.names import IPAddress, normalize_host
from dualproxy.config.schema import Hints, IdentityName, Role, Rotation
from dualproxy.tls.clienthello import ClientHello
from dualproxy.tls.pins import PinRole

__all__ = [
    "Choice",
    "Phase",
    "Reason",
    "canary_bucket",
    "choose",
    "client_id",
    "phase",
    "pin_role",
    "sni_matches",
]

Phase = Literal["single", "before", "during", "after"]

# The canary bucket is read from the first 8 bytes of a SHA-256 of the address, keeping as
# many bits as a double's mantissa holds: the scaling in canary_bucket is then exact, and its
# largest result, (2**53 - 1) / 2**53 * 100, rounds to below 100.
_HASH_BYTES: Final = 8
_BUCKET_BITS: Final = 53

# One IPv6 client is one /64: mobile networks give each device its own /64 (3GPP, RFC 6177)
# and the device picks its addresses inside it.
_IPV6_CLIENT_PREFIX_BYTES: Final = 8

_ROLES: Final[tuple[Role, ...]] = ("new", "old")  # hints are disjoint: the order is free

_PIN_ROLES: Final[Mapping[tuple[Phase, Role], PinRole]] = {
    ("before", "old"): "current",
    ("before", "new"): "next",
    ("during", "old"): "retiring",
    ("during", "new"): "current",
    ("after", "old"): "retired",
    ("after", "new"): "current",
}


class Reason(enum.StrEnum):
    """Why a connection got its identity; a log field and a metrics label."""

    SINGLE = "single"
    BEFORE_WINDOW = "before-window"
    AFTER_WINDOW = "after-window"
    HINT_SNI = "hint-sni"
    HINT_ALPN = "hint-alpn"
    HINT_NETWORK = "hint-network"
    CANARY = "canary"
    DEFAULT = "default"
    UNPARSED = "unparsed"


@dataclass(frozen=True, slots=True)
class Choice:
    """The identity a connection is served, and why."""

    identity: IdentityName
    reason: Reason


def phase(rotation: Rotation | None, now: datetime, *, window_closed: bool = False) -> Phase:
    """Where `now` (an aware datetime) falls relative to the grace window (rule 2):
    `window_closed` says that the evidence closed a "when-safe" window (a running server's
    record; without it, as on the command line, a "when-safe" window lasts until
    grace_deadline)."""
    if rotation is None:
        return "single"
    if now < rotation.grace_start:
        return "before"
    if now < rotation.grace_end:
        return "during"
    if rotation.close == "when-safe" and not window_closed and now < rotation.old_served_until:
        return "during"
    return "after"


def choose(
    rotation: Rotation | None,
    hello: ClientHello | None,
    peer: IPAddress | None,
    now: datetime,
    *,
    canary_halted: bool = False,
    window_closed: bool = False,
) -> Choice:
    """The identity to present to this connection, by the rules in the module docstring."""
    if rotation is None:
        return Choice("single", Reason.SINGLE)
    window = phase(rotation, now, window_closed=window_closed)
    if window == "before":
        return Choice("old", Reason.BEFORE_WINDOW)
    if window == "after":
        return Choice("new", Reason.AFTER_WINDOW)
    if hello is None:
        return Choice(rotation.default, Reason.UNPARSED)
    for reason, matches in _SIGNALS:
        for role in _ROLES:
            if matches(rotation.hints_for(role), hello, peer):
                return Choice(role, reason)
    if (
        rotation.default == "old"
        and rotation.canary_percent > 0
        and not canary_halted
        and peer is not None
        and canary_bucket(peer) < rotation.canary_percent
    ):
        return Choice("new", Reason.CANARY)
    return Choice(rotation.default, Reason.DEFAULT)


def sni_matches(pattern: str, sni: str) -> bool:
    """Whether the SNI name `sni` is named by the hint `pattern` (rule 4)."""
    # RFC 6066 host names are ASCII; lowercasing other text can fold it into ASCII ("\u212a").
    if not sni.isascii():
        return False
    pattern = normalize_host(pattern)
    name = normalize_host(sni)
    if pattern.startswith("*."):
        label, _, parent = name.partition(".")
        return bool(label) and parent == pattern[2:]
    return name == pattern


def canary_bucket(peer: IPAddress) -> float:
    """The client's place in [0, 100), the same in every process and on every machine."""
    # Not hash(): it is salted per process. A mapped IPv4 client is bucketed as itself.
    # An IPv6 client is bucketed by its /64: phones rotate temporary addresses within their
    # prefix (RFC 8981) every day or so, and must not hop between keys when they do.
    digest = hashlib.sha256(client_id(peer)).digest()
    bits = int.from_bytes(digest[:_HASH_BYTES], "big") >> (_HASH_BYTES * 8 - _BUCKET_BITS)
    return bits * 100 / (1 << _BUCKET_BITS)


def client_id(peer: IPAddress) -> bytes:
    """One client, as the canary buckets it and the report receiver rate-limits it: an IPv4
    address (a mapped one as itself), or an IPv6 /64."""
    address = _unmapped(peer)
    return address.packed if address.version == 4 else address.packed[:_IPV6_CLIENT_PREFIX_BYTES]


def pin_role(
    rotation: Rotation | None, key_name: str, now: datetime, *, window_closed: bool = False
) -> PinRole:
    """What an app should do with the pin of `key_name` at `now` (for `dualproxy pins`);
    `window_closed` as for `phase`."""
    if rotation is None:
        return "current"
    for role in _ROLES:
        if key_name in rotation.keys_of(role):
            return _PIN_ROLES[phase(rotation, now, window_closed=window_closed), role]
    return "standby"


# --- helpers -----------------------------------------------------------------------------


def _unmapped(peer: IPAddress) -> IPAddress:
    """The IPv4 address inside an IPv4-mapped IPv6 address (::ffff:a.b.c.d), else `peer`."""
    if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped is not None:
        return peer.ipv4_mapped
    return peer


# The rule 4 signals, each (hints, hello, peer) -> matched, in the order they are checked.


def _sni_hinted(hints: Hints, hello: ClientHello, peer: IPAddress | None) -> bool:
    sni = hello.sni
    return sni is not None and any(sni_matches(pattern, sni) for pattern in hints.sni)


def _alpn_hinted(hints: Hints, hello: ClientHello, peer: IPAddress | None) -> bool:
    return not set(hints.alpn).isdisjoint(hello.alpn)


def _network_hinted(hints: Hints, hello: ClientHello, peer: IPAddress | None) -> bool:
    if peer is None:
        return False
    address = _unmapped(peer)
    # `in` is False, not an error, across IP versions.
    return any(address in network for network in hints.networks)


_Signal = Callable[[Hints, ClientHello, IPAddress | None], bool]
_SIGNALS: Final[tuple[tuple[Reason, _Signal], ...]] = (
    (Reason.HINT_SNI, _sni_hinted),
    (Reason.HINT_ALPN, _alpn_hinted),
    (Reason.HINT_NETWORK, _network_hinted),
)
