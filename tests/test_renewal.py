"""renewal.py: when a certificate is renewed, driven by a fake clock (times are values)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import pytest

from dualproxy.acme.renewal import (
    KeyState,
    Plan,
    Policy,
    Reason,
    Urgency,
    Validity,
    Window,
    due_time,
    plan,
    retry_delay,
    wake_time,
)
from dualproxy.config.schema import AcmeConfig

T0: Final = datetime(2026, 12, 1, tzinfo=UTC)
DAY: Final = timedelta(days=1)
POLICY: Final = Policy.from_config(AcmeConfig("https://ca.invalid/dir", Path("account.pem")))
NINETY: Final = Validity(T0, T0 + 90 * DAY)


class FakeClock:
    """Wall time as a value the test moves."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def advance(self, by: timedelta) -> datetime:
        self.now += by
        return self.now


def test_policy_defaults_follow_the_config_defaults() -> None:
    assert POLICY.renew_fraction == pytest.approx(2 / 3)
    assert POLICY.retry_initial == timedelta(minutes=15)
    assert POLICY.retry_max == timedelta(hours=6)
    assert POLICY.new_key_lead == timedelta(days=7)


def test_missing_certificate_is_due_now() -> None:
    due, reason = due_time(KeyState(validity=None), POLICY, T0)
    assert (due, reason) == (T0, Reason.MISSING)
    assert plan(KeyState(validity=None), POLICY, T0).urgency is Urgency.MISSING


def test_without_renewal_information_two_thirds_of_the_lifetime() -> None:
    due, reason = due_time(KeyState(validity=NINETY), POLICY, T0)
    assert due == T0 + 60 * DAY
    assert reason is Reason.LIFETIME


def test_not_due_before_two_thirds_and_due_after() -> None:
    clock = FakeClock(T0)
    state = KeyState(validity=NINETY)
    assert not plan(state, POLICY, clock.advance(59 * DAY)).attempt_now(clock.now)
    assert plan(state, POLICY, clock.advance(DAY)).attempt_now(clock.now)


@pytest.mark.parametrize("point", [0.0, 0.25, 0.5, 0.999])
def test_renewal_information_window_uses_the_drawn_point_inside_it(point: float) -> None:
    window = Window(T0 + 10 * DAY, T0 + 12 * DAY)
    due, reason = due_time(KeyState(validity=NINETY, window=window, point=point), POLICY, T0)
    assert reason is Reason.ARI
    assert window.start <= due < window.end
    assert due == window.start + (window.end - window.start) * point


def test_renewal_information_overrides_the_lifetime_rule_both_ways() -> None:
    early = Window(T0 + DAY, T0 + 2 * DAY)  # a CA asking for early renewal (revocation)
    late = Window(T0 + 70 * DAY, T0 + 71 * DAY)
    assert due_time(KeyState(NINETY, early, 0.5), POLICY, T0)[0] < T0 + 60 * DAY
    assert due_time(KeyState(NINETY, late, 0.5), POLICY, T0)[0] > T0 + 60 * DAY


def test_a_window_in_the_past_is_due_now() -> None:
    window = Window(T0 - 2 * DAY, T0 - DAY)
    assert plan(KeyState(NINETY, window, 0.5), POLICY, T0).attempt_now(T0)


def test_an_empty_window_falls_back_to_the_lifetime_rule() -> None:
    window = Window(T0 + DAY, T0 + DAY)
    assert due_time(KeyState(NINETY, window, 0.5), POLICY, T0)[1] is Reason.LIFETIME


def test_retry_delay_doubles_and_is_capped() -> None:
    delays = [retry_delay(n, POLICY) for n in range(1, 8)]
    assert delays[:4] == [timedelta(minutes=m) for m in (15, 30, 60, 120)]
    assert delays[-1] == POLICY.retry_max
    assert all(a <= b for a, b in itertools.pairwise(delays))
    assert retry_delay(10_000, POLICY) == POLICY.retry_max  # no overflow


def test_failures_push_the_next_attempt_back() -> None:
    clock = FakeClock(T0 + 61 * DAY)  # due since a day
    state = KeyState(NINETY, failures=3, last_attempt=clock.now)
    p = plan(state, POLICY, clock.now)
    assert not p.attempt_now(clock.now)
    assert p.next_attempt == clock.now + timedelta(hours=1)
    assert plan(state, POLICY, clock.advance(timedelta(hours=1))).attempt_now(clock.now)


def test_never_a_tight_loop_even_when_always_due() -> None:
    """A renewal loop (plan, attempt when due, sleep until wake_time) on a certificate that
    is due again at once after each renewal (a one-second lifetime, an ARI window in the
    past): the attempts are still retry_initial apart, success or failure."""
    clock = FakeClock(T0)
    for failures in (0, 1):
        state = KeyState(Validity(T0, T0 + timedelta(seconds=1)), Window(T0, T0 + DAY), 0.0)
        attempts = []
        for _ in range(50):
            p = plan(state, POLICY, clock.now)
            if p.attempt_now(clock.now):
                attempts.append(clock.now)
                state = KeyState(state.validity, state.window, 0.0, None, failures, clock.now)
                p = plan(state, POLICY, clock.now)
            clock.now = wake_time([p], POLICY, clock.now)
        gaps = [b - a for a, b in itertools.pairwise(attempts)]
        assert len(gaps) > 10
        assert min(gaps) >= POLICY.retry_initial


def test_wake_time_is_the_earliest_attempt_or_the_recheck() -> None:
    soon = Plan(T0 + DAY, Reason.LIFETIME, T0 + DAY, Urgency.OK)
    later = Plan(T0 + 30 * DAY, Reason.LIFETIME, T0 + 30 * DAY, Urgency.OK)
    assert wake_time([later, soon], POLICY, T0) == T0 + POLICY.recheck_interval
    now = T0 + DAY - timedelta(minutes=1)
    assert wake_time([later, soon], POLICY, now) == T0 + DAY
    assert wake_time([soon], POLICY, T0 + 2 * DAY) == T0 + 2 * DAY  # past: now, never earlier


def test_urgency_warns_as_expiry_nears() -> None:
    state = KeyState(NINETY)
    assert plan(state, POLICY, T0 + 70 * DAY).urgency is Urgency.OK
    assert plan(state, POLICY, T0 + 80 * DAY).urgency is Urgency.SOON
    assert plan(state, POLICY, T0 + 90 * DAY).urgency is Urgency.EXPIRED


# --- the rotation's new key ---------------------------------------------------------------

GRACE: Final = T0 + 100 * DAY


def test_new_key_due_before_the_window_is_renewed_lead_ahead_of_it() -> None:
    # Issued at T0 + 50 days: due at T0 + 110, after the window opens (T0 + 100): left alone.
    fresh = Validity(T0 + 50 * DAY, T0 + 140 * DAY)
    assert due_time(KeyState(fresh, grace_start=GRACE), POLICY, T0)[1] is Reason.LIFETIME
    # Issued at T0: due at T0 + 60, before the window: normal rule, which comes first.
    assert due_time(KeyState(NINETY, grace_start=GRACE), POLICY, T0)[0] == T0 + 60 * DAY
    # Issued at T0 - 20: due at T0 + 40 (lifetime); and with a window suggested late,
    # due at GRACE - 1 day: renewed at the lead instead.
    old = Validity(T0 - 20 * DAY, T0 + 70 * DAY)
    late = Window(GRACE - DAY, GRACE)
    due, reason = due_time(KeyState(old, late, 0.0, grace_start=GRACE), POLICY, T0)
    assert (due, reason) == (GRACE - POLICY.new_key_lead, Reason.NEW_KEY_LEAD)


def test_new_key_lead_applies_once_however_short_the_lifetime() -> None:
    lead_start = GRACE - POLICY.new_key_lead
    # Six-day certificate issued just after the lead began (notBefore backdated an hour):
    short = Validity(lead_start - timedelta(hours=1), lead_start + 5 * DAY)
    due, reason = due_time(KeyState(short, grace_start=GRACE), POLICY, lead_start)
    assert reason is Reason.LIFETIME
    assert due > lead_start


def test_lead_does_not_apply_once_the_window_is_open() -> None:
    old = Validity(GRACE - 80 * DAY, GRACE + 10 * DAY)
    state = KeyState(old, grace_start=GRACE)
    assert due_time(state, POLICY, GRACE + DAY)[1] is Reason.LIFETIME
