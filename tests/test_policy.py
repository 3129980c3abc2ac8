"""policy.py: every rule of the per-connection decision, its boundaries and its precedence."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from typing import Final

import pytest
from helpers.rotation import GRACE_END, GRACE_START
from hypothesis import given
from hypothesis import strategies as st

from dualproxy.config.names import IPAddress
from dualproxy.config.schema import Hints, IdentityName, Role, Rotation
from dualproxy.rotation.policy import (
    Choice,
    Phase,
    Reason,
    canary_bucket,
    choose,
    phase,
    pin_role,
    sni_matches,
)
from dualproxy.tls.clienthello import ClientHello
from dualproxy.tls.pins import PinRole

DURING: Final = GRACE_START + timedelta(days=7)
# datetime's resolution: the last instant before a boundary.
TICK: Final = timedelta(microseconds=1)

HINTS_NEW: Final = Hints(
    sni=("k2.api.example.com", "*.k2.example.com"),
    alpn=(b"dualproxy-k2026b",),
    networks=(ip_network("10.0.0.0/8"), ip_network("2001:db8:1::/48")),
)
HINTS_OLD: Final = Hints(
    sni=("api-legacy.example.com",),
    alpn=(b"dualproxy-k2026a",),
    networks=(ip_network("192.0.2.0/24"), ip_network("2001:db8:2::/48")),
)

NEW_SNI: Final = "k2.api.example.com"
OLD_SNI: Final = "api-legacy.example.com"
PLAIN_SNI: Final = "api.example.com"
NEW_ALPN: Final = b"dualproxy-k2026b"
OLD_ALPN: Final = b"dualproxy-k2026a"
BROWSER_ALPN: Final = (b"h2", b"http/1.1")

NEW_NET_V4: Final = ip_address("10.1.2.3")
OLD_NET_V4: Final = ip_address("192.0.2.7")
NEW_NET_V6: Final = ip_address("2001:db8:1::7")
OLD_NET_V6: Final = ip_address("2001:db8:2::7")
NEW_NET_MAPPED: Final = ip_address("::ffff:10.1.2.3")
OLD_NET_MAPPED: Final = ip_address("::ffff:192.0.2.7")
OUTSIDE_V4: Final = ip_address("11.0.0.1")  # just past 10.0.0.0/8
OUTSIDE_V6: Final = ip_address("2001:db8:3::7")

CANARY_PERCENT: Final = 10.0
# Unhinted clients (TEST-NET-3), one inside the first 10% of buckets and one outside.
_UNHINTED: Final = ip_network("203.0.113.0/24")
IN_CANARY: Final = next(p for p in _UNHINTED if canary_bucket(p) < CANARY_PERCENT)
OUT_OF_CANARY: Final = next(p for p in _UNHINTED if canary_bucket(p) >= CANARY_PERCENT)
IN_CANARY_MAPPED: Final = IPv6Address(f"::ffff:{IN_CANARY}")

# Field values of a typical TLS 1.3 hello; only SNI and ALPN matter to the policy.
_TLS1_2_LEGACY_VERSION: Final = 0x0303  # what every TLS 1.3 hello puts in legacy_version
_TLS_AES_128_GCM_SHA256: Final = 0x1301
_ECDSA_SECP256R1_SHA256: Final = 0x0403
_TLS1_3: Final = 0x0304
_X25519: Final = 0x001D


def rotation(*, default: Role = "old", canary_percent: float = 0.0) -> Rotation:
    return Rotation(
        old=("k2026a",),
        new=("k2026b",),
        grace_start=GRACE_START,
        grace_end=GRACE_END,
        default=default,
        canary_percent=canary_percent,
        hints_new=HINTS_NEW,
        hints_old=HINTS_OLD,
    )


def hello(sni: str | None = PLAIN_SNI, *alpn: bytes) -> ClientHello:
    return ClientHello(
        legacy_version=_TLS1_2_LEGACY_VERSION,
        cipher_suites=(_TLS_AES_128_GCM_SHA256,),
        sni=sni,
        alpn=alpn or BROWSER_ALPN,
        signature_algorithms=(_ECDSA_SECP256R1_SHA256,),
        supported_versions=(_TLS1_3,),
        supported_groups=(_X25519,),
    )


# No SNI, no ALPN, no peer address: nothing to match.
BARE_HELLO: Final = replace(hello(None), alpn=())

OLD_DEFAULT: Final = rotation()
NEW_DEFAULT: Final = rotation(default="new")
CANARY: Final = rotation(canary_percent=CANARY_PERCENT)
CANARY_ALL: Final = rotation(canary_percent=100)
# Config rejects a canary with default new; the policy must still not apply it.
CANARY_DEFAULT_NEW: Final = rotation(default="new", canary_percent=CANARY_PERCENT)

BEFORE_START: Final = GRACE_START - TICK
BEFORE_END: Final = GRACE_END - TICK
LONG_AFTER: Final = GRACE_END + timedelta(days=365)


Row = tuple[Rotation | None, ClientHello | None, IPAddress | None, datetime, Choice]


def case(
    case_id: str,
    plan: Rotation | None,
    client_hello: ClientHello | None,
    peer: IPAddress | None,
    now: datetime,
    identity: IdentityName,
    reason: str,
) -> tuple[str, Row]:
    """One row of the table; the reason is written as its log label, which Reason() checks."""
    return case_id, (plan, client_hello, peer, now, Choice(identity, Reason(reason)))


# fmt: off
CHOOSE_CASES: Final = [
    # 1. no rotation
    case("single", None, hello(), OUT_OF_CANARY, DURING, "single", "single"),
    case("single-unparsed", None, None, None, DURING, "single", "single"),
    # 2. outside the window nothing else counts; the window is [grace_start, grace_end)
    case("before-ignores-hints", OLD_DEFAULT, hello(NEW_SNI), NEW_NET_V4, BEFORE_START,
         "old", "before-window"),
    case("before-unparsed", NEW_DEFAULT, None, None, BEFORE_START, "old", "before-window"),
    case("before-ignores-canary", CANARY, hello(), IN_CANARY, BEFORE_START,
         "old", "before-window"),
    case("at-start-is-during", OLD_DEFAULT, hello(), OUT_OF_CANARY, GRACE_START, "old", "default"),
    case("at-start-hints-apply", OLD_DEFAULT, hello(NEW_SNI), None, GRACE_START, "new", "hint-sni"),
    case("before-end-is-during", OLD_DEFAULT, hello(OLD_SNI), None, BEFORE_END, "old", "hint-sni"),
    case("at-end-is-after", OLD_DEFAULT, hello(OLD_SNI), OLD_NET_V4, GRACE_END,
         "new", "after-window"),
    case("after-unparsed", OLD_DEFAULT, None, None, GRACE_END, "new", "after-window"),
    case("long-after", OLD_DEFAULT, hello(None, OLD_ALPN), None, LONG_AFTER, "new", "after-window"),
    # 3. a hello the peek could not parse, in the window
    case("unparsed-default-old", OLD_DEFAULT, None, OUT_OF_CANARY, DURING, "old", "unparsed"),
    case("unparsed-default-new", NEW_DEFAULT, None, OUT_OF_CANARY, DURING, "new", "unparsed"),
    case("unparsed-no-network-hint", OLD_DEFAULT, None, NEW_NET_V4, DURING, "old", "unparsed"),
    case("unparsed-no-canary", CANARY, None, IN_CANARY, DURING, "old", "unparsed"),
    # 4. hints: each signal for each role, and the near misses
    case("sni-new", OLD_DEFAULT, hello(NEW_SNI), None, DURING, "new", "hint-sni"),
    case("sni-old", NEW_DEFAULT, hello(OLD_SNI), None, DURING, "old", "hint-sni"),
    case("sni-case-and-dot", OLD_DEFAULT, hello("K2.API.Example.COM."), None, DURING,
         "new", "hint-sni"),
    case("sni-wildcard", OLD_DEFAULT, hello("eu.k2.example.com"), None, DURING, "new", "hint-sni"),
    case("sni-wildcard-not-bare", OLD_DEFAULT, hello("k2.example.com"), None, DURING,
         "old", "default"),
    case("sni-wildcard-one-label", OLD_DEFAULT, hello("a.eu.k2.example.com"), None, DURING,
         "old", "default"),
    case("alpn-new", OLD_DEFAULT, hello(None, NEW_ALPN), None, DURING, "new", "hint-alpn"),
    case("alpn-old", NEW_DEFAULT, hello(None, OLD_ALPN), None, DURING, "old", "hint-alpn"),
    case("alpn-among-others", OLD_DEFAULT, hello(None, b"h2", NEW_ALPN), None, DURING,
         "new", "hint-alpn"),
    case("alpn-prefix-no-match", OLD_DEFAULT, hello(None, b"dualproxy-k2026"), None, DURING,
         "old", "default"),
    case("network-new-v4", OLD_DEFAULT, hello(), NEW_NET_V4, DURING, "new", "hint-network"),
    case("network-old-v4", NEW_DEFAULT, hello(), OLD_NET_V4, DURING, "old", "hint-network"),
    case("network-new-v6", OLD_DEFAULT, hello(), NEW_NET_V6, DURING, "new", "hint-network"),
    case("network-old-v6", NEW_DEFAULT, hello(), OLD_NET_V6, DURING, "old", "hint-network"),
    case("network-new-mapped", OLD_DEFAULT, hello(), NEW_NET_MAPPED, DURING, "new", "hint-network"),
    case("network-old-mapped", NEW_DEFAULT, hello(), OLD_NET_MAPPED, DURING, "old", "hint-network"),
    case("network-v4-outside", OLD_DEFAULT, hello(), OUTSIDE_V4, DURING, "old", "default"),
    case("network-v6-outside", OLD_DEFAULT, hello(), OUTSIDE_V6, DURING, "old", "default"),
    # 4. precedence: SNI, then ALPN, then network, whatever the roles
    case("old-sni-beats-new-alpn", OLD_DEFAULT, hello(OLD_SNI, NEW_ALPN), NEW_NET_V4, DURING,
         "old", "hint-sni"),
    case("new-sni-beats-old-alpn", NEW_DEFAULT, hello(NEW_SNI, OLD_ALPN), OLD_NET_V4, DURING,
         "new", "hint-sni"),
    case("old-alpn-beats-new-net", OLD_DEFAULT, hello(PLAIN_SNI, OLD_ALPN), NEW_NET_V4, DURING,
         "old", "hint-alpn"),
    case("new-alpn-beats-old-net", NEW_DEFAULT, hello(PLAIN_SNI, NEW_ALPN), OLD_NET_V6, DURING,
         "new", "hint-alpn"),
    case("old-sni-beats-new-net", OLD_DEFAULT, hello(OLD_SNI), NEW_NET_MAPPED, DURING,
         "old", "hint-sni"),
    # 5. the canary
    case("canary-in", CANARY, hello(), IN_CANARY, DURING, "new", "canary"),
    case("canary-out", CANARY, hello(), OUT_OF_CANARY, DURING, "old", "default"),
    case("canary-in-mapped", CANARY, hello(), IN_CANARY_MAPPED, DURING, "new", "canary"),
    case("canary-needs-a-peer", CANARY, hello(), None, DURING, "old", "default"),
    case("canary-100-takes-all", CANARY_ALL, hello(), OUT_OF_CANARY, DURING, "new", "canary"),
    case("canary-0-takes-none", OLD_DEFAULT, hello(), IN_CANARY, DURING, "old", "default"),
    case("no-canary-default-new", CANARY_DEFAULT_NEW, hello(), IN_CANARY, DURING, "new", "default"),
    case("no-canary-old-sni", CANARY, hello(OLD_SNI), IN_CANARY, DURING, "old", "hint-sni"),
    case("no-canary-old-alpn", CANARY, hello(None, OLD_ALPN), IN_CANARY, DURING,
         "old", "hint-alpn"),
    case("hint-over-canary", CANARY, hello(None, NEW_ALPN), IN_CANARY, DURING, "new", "hint-alpn"),
    case("no-canary-old-net", CANARY_ALL, hello(), OLD_NET_V4, DURING, "old", "hint-network"),
    # 6. the default
    case("default-old", OLD_DEFAULT, hello(), OUT_OF_CANARY, DURING, "old", "default"),
    case("default-new", NEW_DEFAULT, hello(), OUT_OF_CANARY, DURING, "new", "default"),
    case("default-bare-hello", OLD_DEFAULT, BARE_HELLO, None, DURING, "old", "default"),
]
# fmt: on


@pytest.mark.parametrize(
    ("plan", "client_hello", "peer", "now", "expected"),
    [row for _, row in CHOOSE_CASES],
    ids=[case_id for case_id, _ in CHOOSE_CASES],
)
def test_choose(
    plan: Rotation | None,
    client_hello: ClientHello | None,
    peer: IPAddress | None,
    now: datetime,
    expected: Choice,
) -> None:
    assert choose(plan, client_hello, peer, now) == expected


@pytest.mark.parametrize(
    ("client_hello", "peer", "expected"),
    [
        pytest.param(hello(), IN_CANARY, Choice("old", Reason.DEFAULT), id="canary-client"),
        pytest.param(hello(), OUT_OF_CANARY, Choice("old", Reason.DEFAULT), id="other-client"),
        pytest.param(hello(NEW_SNI), IN_CANARY, Choice("new", Reason.HINT_SNI), id="hinted-new"),
        pytest.param(
            hello(None, NEW_ALPN), OUT_OF_CANARY, Choice("new", Reason.HINT_ALPN), id="alpn-new"
        ),
        pytest.param(hello(), NEW_NET_V4, Choice("new", Reason.HINT_NETWORK), id="network-new"),
    ],
)
def test_a_halted_canary_sends_nobody_and_leaves_hints_alone(
    client_hello: ClientHello, peer: IPAddress, expected: Choice
) -> None:
    assert choose(CANARY_ALL, client_hello, peer, DURING, canary_halted=True) == expected
    # The twin: the same client, canary running (everyone unhinted is in it at 100%).
    running = choose(CANARY_ALL, client_hello, peer, DURING, canary_halted=False)
    if expected.reason is Reason.DEFAULT:
        assert running == Choice("new", Reason.CANARY)
    else:
        assert running == expected


def test_the_choose_table_covers_every_reason() -> None:
    assert {row[-1].reason for _, row in CHOOSE_CASES} == set(Reason)


# --- phase and pin_role --------------------------------------------------------------------

LONG_BEFORE: Final = GRACE_START - timedelta(days=365)
# The same instant as grace_start, seen from New York: comparisons are by instant.
START_IN_NEW_YORK: Final = GRACE_START.astimezone(timezone(timedelta(hours=-5)))


@pytest.mark.parametrize(
    ("plan", "now", "expected"),
    [
        pytest.param(None, DURING, "single", id="no-rotation"),
        pytest.param(OLD_DEFAULT, LONG_BEFORE, "before", id="long-before"),
        pytest.param(OLD_DEFAULT, BEFORE_START, "before", id="just-before-start"),
        pytest.param(OLD_DEFAULT, GRACE_START, "during", id="at-start"),
        pytest.param(OLD_DEFAULT, START_IN_NEW_YORK, "during", id="at-start-other-zone"),
        pytest.param(OLD_DEFAULT, DURING, "during", id="during"),
        pytest.param(OLD_DEFAULT, BEFORE_END, "during", id="just-before-end"),
        pytest.param(OLD_DEFAULT, GRACE_END, "after", id="at-end"),
        pytest.param(OLD_DEFAULT, LONG_AFTER, "after", id="long-after"),
    ],
)
def test_phase(plan: Rotation | None, now: datetime, expected: Phase) -> None:
    assert phase(plan, now) == expected


TWO_OLD_KEYS: Final = Rotation(
    old=("k2026a-ec", "k2026a-rsa"),
    new=("k2026b",),
    grace_start=GRACE_START,
    grace_end=GRACE_END,
)


@pytest.mark.parametrize(
    ("plan", "key_name", "now", "expected"),
    [
        pytest.param(None, "k2026a", DURING, "current", id="no-rotation"),
        pytest.param(None, "k2025", LONG_AFTER, "current", id="no-rotation-any-key"),
        pytest.param(OLD_DEFAULT, "k2026a", BEFORE_START, "current", id="before-old"),
        pytest.param(OLD_DEFAULT, "k2026b", BEFORE_START, "next", id="before-new"),
        pytest.param(OLD_DEFAULT, "k2026a", GRACE_START, "retiring", id="at-start-old"),
        pytest.param(OLD_DEFAULT, "k2026b", GRACE_START, "current", id="at-start-new"),
        pytest.param(OLD_DEFAULT, "k2026a", BEFORE_END, "retiring", id="before-end-old"),
        pytest.param(OLD_DEFAULT, "k2026a", GRACE_END, "retired", id="at-end-old"),
        pytest.param(OLD_DEFAULT, "k2026b", GRACE_END, "current", id="at-end-new"),
        pytest.param(OLD_DEFAULT, "k2025", BEFORE_START, "standby", id="standby-before"),
        pytest.param(OLD_DEFAULT, "k2025", DURING, "standby", id="standby-during"),
        pytest.param(OLD_DEFAULT, "k2025", GRACE_END, "standby", id="standby-after"),
        pytest.param(TWO_OLD_KEYS, "k2026a-rsa", DURING, "retiring", id="second-old-key"),
        pytest.param(TWO_OLD_KEYS, "k2026a", DURING, "standby", id="prefix-of-a-key"),
    ],
)
def test_pin_role(plan: Rotation | None, key_name: str, now: datetime, expected: PinRole) -> None:
    assert pin_role(plan, key_name, now) == expected


# --- SNI matching --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "sni", "expected"),
    [
        pytest.param("api.example.com", "api.example.com", True, id="exact"),
        pytest.param("api.example.com", "API.Example.COM", True, id="case"),
        pytest.param("api.example.com", "api.example.com.", True, id="trailing-dot"),
        pytest.param("api.example.com", "api.example.com..", False, id="two-trailing-dots"),
        pytest.param("API.example.com.", "api.example.com", True, id="pattern-normalized"),
        pytest.param("api.example.com", "example.com", False, id="parent"),
        pytest.param("api.example.com", "v2.api.example.com", False, id="child"),
        pytest.param("api.example.com", "api.example.co", False, id="other-tld"),
        pytest.param("example.com", "badexample.com", False, id="suffix-not-a-label"),
        pytest.param("*.example.com", "a.example.com", True, id="wildcard"),
        pytest.param("*.example.com", "A.EXAMPLE.COM.", True, id="wildcard-case-and-dot"),
        pytest.param("*.example.com", "example.com", False, id="wildcard-not-bare"),
        pytest.param("*.example.com", "a.b.example.com", False, id="wildcard-one-label-only"),
        pytest.param("*.example.com", ".example.com", False, id="wildcard-empty-label"),
        pytest.param("*.example.com", "a.badexample.com", False, id="wildcard-suffix-not-a-label"),
        pytest.param("*.example.com", "*.example.com", True, id="wildcard-literal-star"),
        # The Kelvin sign lowercases to "k"; a real client cannot send it (SNI is ASCII).
        pytest.param("k.example.com", "\u212a.example.com", False, id="non-ascii-folding"),
        pytest.param("api.example.com", "", False, id="empty"),
    ],
)
def test_sni_matches(pattern: str, sni: str, expected: bool) -> None:
    assert sni_matches(pattern, sni) is expected


# --- the canary bucket ---------------------------------------------------------------------

# 20,000 addresses: the share in a 10% bucket range has a standard deviation of 0.21 points,
# so one point of tolerance is about 5 of them. The hash is deterministic: this never flakes,
# it fails only if the spread is biased.
SPREAD_SAMPLE: Final = 20_000
SPREAD_TOLERANCE: Final = 1.0  # percentage points
DECILE: Final = 10.0


@pytest.mark.parametrize(
    ("first", "step"),
    [(ip_address("100.64.0.0"), 1), (ip_address("2001:db8::"), 1 << 64)],
    ids=["ipv4", "ipv6-prefixes"],
)
def test_canary_spreads_sequential_addresses_uniformly(first: IPAddress, step: int) -> None:
    buckets = [canary_bucket(first + offset * step) for offset in range(SPREAD_SAMPLE)]
    in_canary = 100 * sum(b < CANARY_PERCENT for b in buckets) / SPREAD_SAMPLE
    assert abs(in_canary - CANARY_PERCENT) < SPREAD_TOLERANCE
    for low in range(0, 100, int(DECILE)):
        share = 100 * sum(low <= b < low + DECILE for b in buckets) / SPREAD_SAMPLE
        assert abs(share - DECILE) < SPREAD_TOLERANCE, f"bucket range [{low}, {low + DECILE})"


# The bucket of every address in 2001:db8::/64.
IPV6_BUCKET: Final = 95.25181690987147


# Fixed values: replicas, restarts and releases must all agree, or a rollout would move
# clients in and out of the canary. (hash() would differ per process.)
@pytest.mark.parametrize(
    ("peer", "bucket"),
    [
        pytest.param(ip_address("192.0.2.1"), 29.516479824480214, id="ipv4"),
        pytest.param(ip_address("::ffff:192.0.2.1"), 29.516479824480214, id="mapped-as-ipv4"),
        pytest.param(ip_address("2001:db8::1"), IPV6_BUCKET, id="ipv6"),
    ],
)
def test_canary_bucket_is_the_same_everywhere(peer: IPAddress, bucket: float) -> None:
    assert canary_bucket(peer) == bucket
    assert canary_bucket(peer) == canary_bucket(peer)


@given(st.integers(0, (1 << 64) - 1))
def test_ipv6_client_keeps_its_bucket_across_temporary_addresses(interface_id: int) -> None:
    # RFC 8981 temporary addresses change the low 64 bits; the /64 stays the device's.
    assert canary_bucket(ip_address("2001:db8::") + interface_id) == IPV6_BUCKET


def test_ipv6_clients_in_other_prefixes_get_other_buckets() -> None:
    assert canary_bucket(ip_address("2001:db8:0:1::1")) != IPV6_BUCKET


@given(st.ip_addresses())
def test_canary_bucket_is_a_percentage(peer: IPAddress) -> None:
    assert 0 <= canary_bucket(peer) < 100


@given(st.ip_addresses(v=4))
def test_mapped_ipv4_shares_its_bucket(peer: IPv4Address) -> None:
    assert canary_bucket(IPv6Address(f"::ffff:{peer}")) == canary_bucket(peer)


@given(peer=st.ip_addresses(), percents=st.lists(st.floats(0, 100), min_size=2, max_size=2))
def test_raising_the_canary_only_adds_clients(peer: IPAddress, percents: list[float]) -> None:
    low, high = sorted(percents)
    in_low = choose(rotation(canary_percent=low), hello(), peer, DURING).reason == Reason.CANARY
    in_high = choose(rotation(canary_percent=high), hello(), peer, DURING).reason == Reason.CANARY
    assert in_high or not in_low


# --- any input -----------------------------------------------------------------------------

_U16_MAX: Final = 0xFFFF  # ClientHello code points are 16-bit
_u16s = st.lists(st.integers(0, _U16_MAX), max_size=4).map(tuple)
PLANS: Final = st.none() | st.builds(
    rotation, default=st.sampled_from(["old", "new"]), canary_percent=st.floats(0, 100)
)
HELLOS: Final = st.none() | st.builds(
    ClientHello,
    legacy_version=st.integers(0, _U16_MAX),
    cipher_suites=_u16s,
    sni=st.none()
    | st.sampled_from([NEW_SNI, OLD_SNI, PLAIN_SNI, "EU.k2.example.com."])
    | st.text(max_size=40),
    alpn=st.lists(
        st.sampled_from([NEW_ALPN, OLD_ALPN, *BROWSER_ALPN]) | st.binary(max_size=12), max_size=4
    ).map(tuple),
    signature_algorithms=_u16s,
    supported_versions=_u16s,
    supported_groups=_u16s,
)
PEERS: Final = (
    st.none()
    | st.ip_addresses()
    | st.sampled_from([NEW_NET_V4, OLD_NET_V6, NEW_NET_MAPPED, IN_CANARY, OUT_OF_CANARY])
)
TIMES: Final = st.sampled_from([BEFORE_START, GRACE_START, BEFORE_END, GRACE_END]) | st.datetimes(
    min_value=LONG_BEFORE.replace(tzinfo=None),
    max_value=LONG_AFTER.replace(tzinfo=None),
    timezones=st.just(UTC),
)

REASONS_BY_PHASE: Final[dict[Phase, frozenset[Reason]]] = {
    "single": frozenset({Reason.SINGLE}),
    "before": frozenset({Reason.BEFORE_WINDOW}),
    "during": frozenset(
        {
            Reason.UNPARSED,
            Reason.HINT_SNI,
            Reason.HINT_ALPN,
            Reason.HINT_NETWORK,
            Reason.CANARY,
            Reason.DEFAULT,
        }
    ),
    "after": frozenset({Reason.AFTER_WINDOW}),
}
# Reasons that fix the identity by themselves.
IDENTITY_OF_REASON: Final[dict[Reason, IdentityName]] = {
    Reason.SINGLE: "single",
    Reason.BEFORE_WINDOW: "old",
    Reason.AFTER_WINDOW: "new",
    Reason.CANARY: "new",
}


@given(plan=PLANS, client_hello=HELLOS, peer=PEERS, now=TIMES)
def test_any_choice_is_an_identity_of_the_plan_for_a_reason_of_the_phase(
    plan: Rotation | None, client_hello: ClientHello | None, peer: IPAddress | None, now: datetime
) -> None:
    choice = choose(plan, client_hello, peer, now)
    current = phase(plan, now)
    assert choice.identity in (("single",) if plan is None else ("old", "new"))
    assert choice.reason in REASONS_BY_PHASE[current]
    if choice.reason in IDENTITY_OF_REASON:
        assert choice.identity == IDENTITY_OF_REASON[choice.reason]
    if choice.reason in (Reason.DEFAULT, Reason.UNPARSED):
        assert plan is not None
        assert choice.identity == plan.default
    if choice.reason == Reason.CANARY:
        assert plan is not None
        assert plan.default == "old"
        assert peer is not None
    assert (choice.reason == Reason.UNPARSED) == (current == "during" and client_hello is None)


def test_the_phases_partition_the_reasons() -> None:
    reasons = [reason for group in REASONS_BY_PHASE.values() for reason in group]
    assert sorted(reasons) == sorted(Reason)


# --- a "when-safe" window (issue 19, item 3) ---------------------------------------------------

DEADLINE: Final = GRACE_END + timedelta(days=30)
WHEN_SAFE: Final = replace(CANARY, close="when-safe", max_breakage=0.005, grace_deadline=DEADLINE)


@pytest.mark.parametrize(
    ("now", "closed", "peer", "sni", "expected"),
    [
        (GRACE_END, False, OUT_OF_CANARY, PLAIN_SNI, ("old", "default")),
        (GRACE_END, False, IN_CANARY, PLAIN_SNI, ("new", "canary")),
        (GRACE_END, False, OUT_OF_CANARY, NEW_SNI, ("new", "hint-sni")),
        (DEADLINE - TICK, False, OUT_OF_CANARY, PLAIN_SNI, ("old", "default")),
        (GRACE_END, True, OUT_OF_CANARY, PLAIN_SNI, ("new", "after-window")),
        (DEADLINE, False, OUT_OF_CANARY, PLAIN_SNI, ("new", "after-window")),
    ],
    ids=[
        "held-default-old",
        "held-canary-runs",
        "held-hints-apply",
        "held-until-deadline",
        "closed-by-evidence",
        "deadline-closes",
    ],
)
def test_a_when_safe_window_goes_on_past_grace_end_until_closed_or_the_deadline(
    now: datetime, closed: bool, peer: IPAddress, sni: str, expected: tuple[str, str]
) -> None:
    choice = choose(WHEN_SAFE, hello(sni), peer, now, window_closed=closed)
    assert (choice.identity, choice.reason) == expected
    # Its twin: the same client with close = "at-grace-end" gets new from grace_end on.
    assert choose(CANARY, hello(sni), peer, now).reason == Reason.AFTER_WINDOW
    held = expected[1] != "after-window"
    assert (phase(WHEN_SAFE, now, window_closed=closed) == "during") is held
    assert pin_role(WHEN_SAFE, "k2026a", now, window_closed=closed) == (
        "retiring" if held else "retired"
    )
