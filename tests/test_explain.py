"""rotation/explain.py: why `choose` chose (every reason, in the config's words), the timeline,
every key with its pin role, and the role changes within a period; each with the twin that
shows the words are not said regardless."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Network, ip_address, ip_network
from pathlib import Path
from typing import Any, Final

import pytest
import trustme
from helpers.keys import make_key
from helpers.rotation import GRACE_END, GRACE_START

from dualproxy.config.loader import parse
from dualproxy.config.names import IPAddress
from dualproxy.config.schema import Config, Hints, KeyConfig, KeyStoreSettings, Rotation
from dualproxy.rotation.explain import (
    explain,
    pinned_keys,
    role_changes,
    timeline,
    window_rule,
)
from dualproxy.rotation.policy import Choice, Reason, canary_bucket, choose
from dualproxy.tls.clienthello import ClientHello
from dualproxy.tls.keystore import LoadedKey, load_key

BEFORE: Final = GRACE_START - timedelta(days=1)
DURING: Final = GRACE_START + timedelta(days=7)
AFTER: Final = GRACE_END + timedelta(days=1)

NEW_SNI: Final = "k2.api.example.com"
OLD_SNI: Final = "api-legacy.example.com"
NEW_ALPN: Final = b"dualproxy-k2026b"
NEW_NET: Final = ip_address("10.1.2.3")
MAPPED_NEW_NET: Final = ip_address("::ffff:10.1.2.3")  # as a dual-stack listener reports it
# Unhinted clients (TEST-NET-3), one inside a 10% canary and one outside.
_UNHINTED: Final = list(IPv4Network("203.0.113.0/24"))
IN_CANARY: Final = next(p for p in _UNHINTED if canary_bucket(p) < 10)
OUT_OF_CANARY: Final = next(p for p in _UNHINTED if canary_bucket(p) >= 10)


def rotation(**changes: Any) -> Rotation:
    return replace(
        Rotation(
            old=("k2026a",),
            new=("k2026b",),
            grace_start=GRACE_START,
            grace_end=GRACE_END,
            hints_new=Hints(
                sni=("*.api.example.com",), alpn=(NEW_ALPN,), networks=(ip_network("10.0.0.0/8"),)
            ),
            hints_old=Hints(sni=(OLD_SNI,)),
        ),
        **changes,
    )


PLAN: Final = rotation()


def hello(sni: str | None = "api.example.com", *alpn: bytes) -> ClientHello:
    return ClientHello(
        legacy_version=0x0303,
        cipher_suites=(0x1301,),
        sni=sni,
        alpn=alpn or (b"h2", b"http/1.1"),
        signature_algorithms=(0x0403,),
        supported_versions=(0x0304,),
        supported_groups=(0x001D,),
    )


def why(
    plan: Rotation | None,
    client_hello: ClientHello | None,
    peer: IPAddress | None,
    now: datetime = DURING,
    **options: str,
) -> tuple[Reason, str]:
    """The reason `choose` gives and how `explain` explains it."""
    choice = choose(plan, client_hello, peer, now)
    return choice.reason, explain(plan, choice, client_hello, peer, **options)


# --- explain -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("plan", "client_hello", "peer", "now", "reason", "text"),
    [
        (None, hello(), None, DURING, Reason.SINGLE,
         "no [rotation] in the config: every client gets the configured keys"),
        (PLAN, hello(NEW_SNI), NEW_NET, BEFORE, Reason.BEFORE_WINDOW,
         "before rotation.grace_start (2026-12-01 00:00Z) everyone gets old"),
        (PLAN, hello(OLD_SNI), None, AFTER, Reason.AFTER_WINDOW,
         "from rotation.grace_end (2027-01-15 00:00Z) on everyone gets new"),
        (PLAN, hello("K2.API.example.com."), None, DURING, Reason.HINT_SNI,
         "SNI K2.API.example.com. matches '*.api.example.com' in rotation.hints.new.sni"),
        (PLAN, hello(OLD_SNI), NEW_NET, DURING, Reason.HINT_SNI,
         f"SNI {OLD_SNI} matches '{OLD_SNI}' in rotation.hints.old.sni"),
        (PLAN, hello(None, b"h2", NEW_ALPN), None, DURING, Reason.HINT_ALPN,
         "ALPN dualproxy-k2026b is in rotation.hints.new.alpn"),
        (PLAN, hello(), MAPPED_NEW_NET, DURING, Reason.HINT_NETWORK,
         f"client {MAPPED_NEW_NET} is in rotation.hints.new.networks"),
        (rotation(canary_percent=10.0), hello(), IN_CANARY, DURING, Reason.CANARY,
         f"no hint matched and client {IN_CANARY} is in the canary (bucket"
         f" {canary_bucket(IN_CANARY):.2f} < rotation.canary_percent = 10)"),
        (rotation(canary_percent=10.0), hello(), OUT_OF_CANARY, DURING, Reason.DEFAULT,
         "no hint matched: rotation.default = 'old'"),
        (rotation(default="new"), hello(), None, DURING, Reason.DEFAULT,
         "no hint matched (no client address): rotation.default = 'new'"),
        (PLAN, None, NEW_NET, DURING, Reason.UNPARSED,
         "the ClientHello could not be parsed: rotation.default = 'old'"),
    ],
)  # fmt: skip
def test_explain_names_the_rule_and_its_setting(
    plan: Rotation | None,
    client_hello: ClientHello | None,
    peer: IPAddress | None,
    now: datetime,
    reason: Reason,
    text: str,
) -> None:
    assert why(plan, client_hello, peer, now) == (reason, text)


def test_explain_says_why_the_address_is_missing_in_the_callers_words() -> None:
    assert why(PLAN, hello(), None, missing_peer="no --client given") == (
        Reason.DEFAULT,
        "no hint matched (no --client given): rotation.default = 'old'",
    )
    # The twin: with an address there is nothing to say about it.
    assert why(PLAN, hello(), OUT_OF_CANARY, missing_peer="no --client given") == (
        Reason.DEFAULT,
        "no hint matched: rotation.default = 'old'",
    )


@pytest.mark.parametrize(
    ("choice", "client_hello", "peer"),
    [
        (Choice("new", Reason.HINT_SNI), hello(None), None),
        (Choice("new", Reason.HINT_SNI), hello("api.example.com"), None),
        (Choice("new", Reason.HINT_ALPN), hello(), None),
        (Choice("new", Reason.HINT_NETWORK), hello(), None),
        (Choice("new", Reason.CANARY), hello(), None),
    ],
)
def test_explain_refuses_a_choice_its_inputs_cannot_have_made(
    choice: Choice, client_hello: ClientHello, peer: IPAddress | None
) -> None:
    """The twins of the table above: a choice is explained from the inputs that made it."""
    with pytest.raises(ValueError, match="the choice"):
        explain(PLAN, choice, client_hello, peer)


# --- timeline ----------------------------------------------------------------------------


@pytest.mark.parametrize(("at", "marked"), [(BEFORE, 1), (DURING, 2), (AFTER, 3)])
def test_timeline_marks_the_phase_at(at: datetime, marked: int) -> None:
    lines = timeline(rotation(canary_percent=5.0), ["k2026a", "k2026b"], at, "now")
    assert lines == [
        "rotation timeline:",
        "  until 2026-12-01 00:00Z  everyone gets old (k2026a)" + ("   <- now" * (marked == 1)),
        "  2026-12-01 00:00Z .. 2027-01-15 00:00Z  grace window: new for *.api.example.com,"
        " dualproxy-k2026b, 10.0.0.0/8; old for api-legacy.example.com; others get old"
        " (canary: 5% of them get new)" + ("   <- now" * (marked == 2)),
        "  from 2027-01-15 00:00Z  everyone gets new (k2026b)" + ("   <- now" * (marked == 3)),
    ]


WHEN_SAFE_DEADLINE: Final = GRACE_END + timedelta(days=31)


@pytest.mark.parametrize(
    ("at", "marked"),
    [(DURING, 2), (AFTER, 3), (WHEN_SAFE_DEADLINE, 4)],
    ids=["window", "held-part", "after-deadline"],
)
def test_timeline_of_a_when_safe_window_shows_the_held_part(at: datetime, marked: int) -> None:
    plan = rotation(
        canary_percent=5.0, close="when-safe", max_breakage=0.005, grace_deadline=WHEN_SAFE_DEADLINE
    )
    lines = timeline(plan, ["k2026a", "k2026b"], at, "at")
    assert len(lines) == 5
    assert lines[3].startswith(
        "  2027-01-15 00:00Z .. 2027-02-15 00:00Z  when safe (rotation.close): the window goes"
        " on while more than 0.50% of clients would fail on new"
    )
    assert lines[4].startswith("  from 2027-02-15 00:00Z  everyone gets new (k2026b), whatever")
    assert [index for index, line in enumerate(lines) if line.endswith("<- at")] == [marked]


def test_window_rule_says_how_the_window_ends_once_grace_end_has_passed() -> None:
    plan = rotation(close="when-safe", max_breakage=0.005, grace_deadline=WHEN_SAFE_DEADLINE)
    assert window_rule(plan, DURING) is None
    assert window_rule(rotation(), AFTER) == (
        'rotation.close = "at-grace-end": the window ended at grace_end'
    )
    held = window_rule(plan, AFTER)
    assert held is not None
    assert "goes on while more than 0.50% of clients would fail" in held
    assert "`dualproxy status`" in held
    assert window_rule(plan, WHEN_SAFE_DEADLINE) == (
        'rotation.close = "when-safe": grace_deadline (2027-02-15 00:00Z) has passed'
    )
    assert window_rule(None, AFTER) is None


def test_timeline_and_explanations_show_seconds_when_they_matter() -> None:
    """A 40-second window (a test, a bench) never reads "16:15Z .. 16:15Z"."""
    start = datetime(2026, 12, 10, 16, 15, tzinfo=UTC)
    short = rotation(grace_start=start, grace_end=start + timedelta(seconds=40))
    lines = timeline(short, [], start + timedelta(seconds=10), "now")
    assert lines[1] == "  until 2026-12-10 16:15:00Z  everyone gets old (k2026a)"
    assert lines[2].startswith("  2026-12-10 16:15:00Z .. 2026-12-10 16:15:40Z  grace window")
    assert lines[3] == "  from 2026-12-10 16:15:40Z  everyone gets new (k2026b)"
    after = choose(short, hello(), None, start + timedelta(minutes=1))
    assert explain(short, after, hello(), None) == (
        "from rotation.grace_end (2026-12-10 16:15:40Z) on everyone gets new"
    )
    # The twin: whole minutes stay at minutes (the test above shows the long window's lines).
    whole = rotation(grace_start=start, grace_end=start + timedelta(minutes=2))
    assert timeline(whole, [], start, "now")[3] == (
        "  from 2026-12-10 16:17Z  everyone gets new (k2026b)"
    )


def test_timeline_without_hints_or_rotation() -> None:
    plain = rotation(hints_new=Hints(), hints_old=Hints(), default="new")
    assert timeline(plain, [], DURING, "at")[2] == (
        "  2026-12-01 00:00Z .. 2027-01-15 00:00Z  grace window: no hints; others get new   <- at"
    )
    assert timeline(None, ["k1", "k2"], DURING, "now") == [
        "rotation: none; every client gets k1, k2"
    ]


# --- pinned keys and role changes --------------------------------------------------------


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> LoadedKey:
    files = make_key(trustme.CA(), tmp_path_factory.mktemp("keys"), "template")
    return load_key(KeyConfig("template", files.key, files.chain), KeyStoreSettings())


def config_of(names: list[str], *, with_rotation: bool) -> Config:
    data: dict[str, Any] = {
        "listen": {"address": "127.0.0.1:0"},
        "keys": {n: {"key": f"certs/{n}/key.pem", "chain": f"certs/{n}/chain.pem"} for n in names},
    }
    if with_rotation:
        data["rotation"] = {
            "old": "k2026a", "new": "k2026b", "grace_start": GRACE_START, "grace_end": GRACE_END,
        }  # fmt: skip
    return parse(data, base_dir=Path("/etc/dualproxy"), check_files=False)


def test_pinned_keys_in_listing_order_with_their_roles(template: LoadedKey) -> None:
    # The standby key comes first in the config, last in listings.
    config = config_of(["standby", "k2026b", "k2026a"], with_rotation=True)
    keys = {
        name: replace(template, name=name, names=("api.example.com", "127.0.0.1", "::1"))
        for name in config.keys
    }
    pinned = pinned_keys(config, keys, DURING)
    assert [(p.name, p.role) for p in pinned] == [
        ("k2026a", "retiring"),
        ("k2026b", "current"),
        ("standby", "standby"),
    ]
    first = pinned[0]
    # IP address names are no domain to pin; the rest is the loaded key's.
    assert first.hostnames == ("api.example.com",)
    assert (first.pin, first.algorithm, first.not_after) == (
        template.pin,
        template.algorithm,
        template.not_after,
    )
    # The twins: other instants give other roles, and without a rotation every key is current.
    assert [p.role for p in pinned_keys(config, keys, AFTER)] == ["retired", "current", "standby"]
    single = config_of(["k1"], with_rotation=False)
    assert [p.role for p in pinned_keys(single, {"k1": template}, DURING)] == ["current"]


def test_pinned_keys_refuse_text_no_pin_format_carries(template: LoadedKey) -> None:
    config = config_of(["k1"], with_rotation=False)
    with pytest.raises(ValueError, match="hostname"):
        pinned_keys(config, {"k1": replace(template, names=("bad\nname",))}, DURING)


def test_role_changes_between() -> None:
    start = GRACE_START - timedelta(days=3)
    assert role_changes(PLAN, start, start + timedelta(days=7)) == [("grace_start", GRACE_START)]
    assert role_changes(PLAN, start, GRACE_END + timedelta(days=1)) == [
        ("grace_start", GRACE_START),
        ("grace_end", GRACE_END),
    ]
    # The twins: a period that ends at a boundary, one inside the window, and no rotation.
    assert role_changes(PLAN, start, GRACE_START) == []
    assert role_changes(PLAN, DURING, DURING + timedelta(days=7)) == []
    assert role_changes(None, start, datetime(2030, 1, 1, tzinfo=UTC)) == []
