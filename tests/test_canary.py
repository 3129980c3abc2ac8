"""rotation.canary without a server: the halt test's arithmetic and its guarantee, its three
targets in seeded simulations, the breakage bound, and the closing rule on a fake clock."""

from __future__ import annotations

import math
import random
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Final

import pytest
from helpers.canary_simulation import BACKGROUND, simulate
from helpers.rotation import GRACE_END, GRACE_START, grace_window
from hypothesis import given, settings
from hypothesis import strategies as st

from dualproxy.config.schema import DEFAULT_CANARY_FALSE_HALT, DEFAULT_CANARY_HALT_MARGIN
from dualproxy.rotation.canary import (
    Breakage,
    breakage,
    halts,
    log_e_value,
    rate_bounds,
    window_verdict,
)

MARGIN: Final = DEFAULT_CANARY_HALT_MARGIN
DEADLINE: Final = GRACE_END + timedelta(days=30)
WHEN_SAFE: Final = grace_window(
    canary_percent=5.0, close="when-safe", max_breakage=0.005, grace_deadline=DEADLINE
)


def log_mixture(trials: int, events: int) -> float:
    """The Jeffreys mixture by numerical integration (midpoint rule on a fine grid, with the
    substitution r = sin^2(t), which makes the prior's density flat)."""
    steps = 20_000
    total = 0.0
    for index in range(steps):
        t = (index + 0.5) / steps * math.pi / 2
        rate = math.sin(t) ** 2
        total += math.exp(log_likelihood(trials, events, rate))
    return math.log(total / steps)  # the prior on t is uniform on [0, pi/2]


def log_likelihood(trials: int, events: int, rate: float) -> float:
    out = 0.0
    if events:
        out += events * math.log(rate)
    if trials - events:
        out += (trials - events) * math.log1p(-rate)
    return out


# --- the e-value -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("canary", "control"),
    [((40, 12), (400, 1)), ((10, 10), (0, 0)), ((30, 9), (30, 0)), ((200, 30), (1000, 40))],
    ids=["typical", "no-control", "small-control", "large"],
)
def test_the_e_value_is_the_mixture_over_the_null_maximum(
    canary: tuple[int, int], control: tuple[int, int]
) -> None:
    """The closed form against integration and a grid search of the null's likelihood."""
    (n, f), (n0, f0) = canary, control
    mixture = log_mixture(n, f) + (log_mixture(n0, f0) if n0 else 0.0)
    grid = [index / 4000 for index in range(1, 4000)]
    if n0:
        best = max(
            log_likelihood(n, f, q + MARGIN) + log_likelihood(n0, f0, q)
            for q in grid
            if q + MARGIN < 1
        )
    else:
        best = max(log_likelihood(n, f, p) for p in grid if p <= MARGIN)
    assert log_e_value(n, f, n0, f0, MARGIN) == pytest.approx(mixture - best, abs=2e-3)


@pytest.mark.parametrize(
    ("canary", "control"),
    [((100, 5), (1000, 2)), ((100, 7), (100, 2)), ((0, 0), (100, 0)), ((50, 0), (0, 0))],
    ids=["within-margin", "at-margin", "no-canary", "no-failure"],
)
def test_counts_inside_the_null_give_no_evidence(
    canary: tuple[int, int], control: tuple[int, int]
) -> None:
    assert log_e_value(*canary, *control, MARGIN) == 0.0
    assert not halts(*canary, *control, margin=MARGIN, false_halt=DEFAULT_CANARY_FALSE_HALT)


def test_a_clear_failure_halts_and_its_twin_with_the_control_failing_as_much_does_not() -> None:
    assert halts(10, 10, 190, 0, margin=MARGIN, false_halt=0.01)
    assert not halts(10, 10, 190, 190, margin=MARGIN, false_halt=0.01)


def test_a_lower_false_halt_probability_needs_more_evidence() -> None:
    log_e = log_e_value(40, 12, 800, 2, MARGIN)
    assert math.log(100) < log_e < math.log(1e6)
    assert halts(40, 12, 800, 2, margin=MARGIN, false_halt=0.01)
    assert not halts(40, 12, 800, 2, margin=MARGIN, false_halt=1e-6)


def test_without_a_control_group_the_margin_alone_is_the_null() -> None:
    # 8 of 10 failing is far above 5 %: halts; 1 of 10 is not enough evidence yet.
    assert halts(10, 8, 0, 0, margin=MARGIN, false_halt=0.01)
    assert not halts(10, 1, 0, 0, margin=MARGIN, false_halt=0.01)


@settings(max_examples=300)
@given(
    n=st.integers(1, 5000),
    f_share=st.floats(0, 1),
    n0=st.integers(0, 5000),
    f0_share=st.floats(0, 1),
    margin=st.sampled_from([0.0, 0.01, 0.05, 0.3]),
    q=st.floats(0.0, 1.0),
    p_share=st.floats(0.0, 1.0),
)
def test_the_e_value_never_exceeds_the_mixture_ratio_at_any_null_point(
    n: int, f_share: float, n0: int, f0_share: float, margin: float, q: float, p_share: float
) -> None:
    """What makes it anytime-valid: E <= mixture / likelihood(p, q) for every (p, q) in H0,
    and that ratio is a martingale under (p, q) (Ville's inequality then bounds E)."""
    f, f0 = round(f_share * n), round(f0_share * n0)
    if n0 == 0:
        q = 0.0  # without a control, H0 is p <= margin
    p = p_share * min(1.0, q + margin)
    mixture_ratio = log_mixture_exact(n, f) + log_mixture_exact(n0, f0)
    null_likelihood = safe_log_likelihood(n, f, p) + safe_log_likelihood(n0, f0, q)
    assert log_e_value(n, f, n0, f0, margin) <= max(0.0, mixture_ratio - null_likelihood) + 1e-6


def log_mixture_exact(trials: int, events: int) -> float:
    a, b = events + 0.5, trials - events + 0.5
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b) - math.log(math.pi)


def safe_log_likelihood(trials: int, events: int, rate: float) -> float:
    if (events and rate <= 0.0) or (trials - events and rate >= 1.0):
        return -math.inf
    return log_likelihood(trials, events, rate) if 0 < rate < 1 else 0.0


# --- the targets: seeded simulations -----------------------------------------------------------
# (tests/helpers/canary_simulation.py prints the same figures for 1,000 windows each)


def test_target_every_canary_client_failing_halts_within_20_canary_handshakes() -> None:
    figures = simulate(1, 300, handshakes=20_000, canary_rate=1.0)
    print(f"\nevery canary client fails: {figures}")
    assert figures.halted == figures.windows
    assert figures.worst is not None
    assert figures.worst <= 20


def test_target_30_percent_failing_halts_within_80_canary_handshakes() -> None:
    figures = simulate(1, 300, handshakes=20_000, canary_rate=0.3 + 0.7 * BACKGROUND)
    print(f"\n30% of canary clients fail: {figures}")
    assert figures.halted == figures.windows
    assert figures.median is not None
    assert figures.median <= 40
    assert figures.p95 is not None
    assert figures.p95 <= 80


def test_target_a_healthy_canary_halts_falsely_in_under_1_percent_of_windows() -> None:
    figures = simulate(1, 500, handshakes=100_000, canary_rate=BACKGROUND)
    print(f"\nhealthy canary: {figures}")
    assert figures.halt_rate < 0.01


def test_at_the_edge_of_the_null_the_halt_rate_stays_below_the_false_halt_probability() -> None:
    """The twin of the targets: a new key that costs exactly the margin more is inside H0,
    the hardest case for the guarantee."""
    figures = simulate(2, 300, handshakes=20_000, canary_rate=BACKGROUND + MARGIN)
    print(f"\nedge of the null: {figures}")
    assert figures.halt_rate <= DEFAULT_CANARY_FALSE_HALT


def test_half_the_clients_in_the_canary_still_halts_a_broken_key_within_20() -> None:
    figures = simulate(3, 200, handshakes=4_000, canary_rate=1.0, canary_every=2)
    assert figures.worst is not None
    assert figures.worst <= 20


# --- the rate bounds ---------------------------------------------------------------------------


def test_rate_bounds_are_where_the_mixture_martingale_reaches_one_over_the_error() -> None:
    lower, upper = rate_bounds(1000, 20, 0.01)
    assert lower < 0.02 < upper
    for rate in (lower, upper):
        ratio = log_mixture_exact(1000, 20) - log_likelihood(1000, 20, rate)
        assert ratio == pytest.approx(math.log(100), abs=1e-6)
    # Inside, the martingale is below 1/error; just outside, above.
    inside = log_mixture_exact(1000, 20) - log_likelihood(1000, 20, upper * 0.99)
    assert inside < math.log(100)


@pytest.mark.parametrize(
    ("trials", "events", "expected"),
    [(0, 0, (0.0, 1.0)), (10, 0, (0.0, None)), (10, 10, (None, 1.0))],
    ids=["no-trials", "no-events", "all-events"],
)
def test_rate_bounds_at_the_edges(
    trials: int, events: int, expected: tuple[float | None, float | None]
) -> None:
    bounds = rate_bounds(trials, events, 0.01)
    for got, want in zip(bounds, expected, strict=True):
        if want is not None:
            assert got == want
        else:
            assert 0.0 < got < 1.0


def test_rate_bounds_cover_the_true_rate_at_every_moment_in_nearly_every_run() -> None:
    rng = random.Random(5)
    rate, error, runs, misses = 0.01, 0.05, 200, 0
    for _ in range(runs):
        events = 0
        for trials in range(1, 2001):
            events += rng.random() < rate
            if trials % 50 == 0:
                lower, upper = rate_bounds(trials, events, error)
                if not lower <= rate <= upper:
                    misses += 1
                    break
    assert misses / runs <= error


# --- the breakage estimate ---------------------------------------------------------------------


def test_breakage_weighs_the_canarys_excess_by_the_hint_less_share() -> None:
    estimate = breakage(
        (1000, 52), (19000, 38), sampled=20000, unsampled=0, unaffected=20000, error=0.01
    )
    assert estimate.sampled == 0.5
    assert estimate.estimate == pytest.approx(0.5 * (0.052 - 0.002))
    canary_upper = rate_bounds(1000, 52, 0.005)[1]
    control_lower = rate_bounds(19000, 38, 0.005)[0]
    assert estimate.upper == pytest.approx(0.5 * (canary_upper - control_lower))
    assert estimate.estimate is not None
    assert estimate.upper > estimate.estimate


def test_breakage_counts_clients_the_canary_cannot_sample_as_failing() -> None:
    healthy = breakage(
        (20000, 40), (20000, 40), sampled=40000, unsampled=0, unaffected=0, error=0.01
    )
    with_unsampled = breakage(
        (20000, 40), (20000, 40), sampled=38000, unsampled=2000, unaffected=0, error=0.01
    )
    assert healthy.upper < 0.005
    assert with_unsampled.unsampled == 0.05
    assert with_unsampled.upper > 0.05


def test_breakage_without_evidence_is_bounded_by_everything_that_would_change_key() -> None:
    assert breakage((0, 0), (0, 0), sampled=0, unsampled=0, unaffected=0, error=0.01) == (
        Breakage(None, 1.0, 0.0, 0.0, 0)
    )
    no_canary = breakage((0, 0), (500, 1), sampled=500, unsampled=0, unaffected=500, error=0.01)
    assert no_canary.estimate is None
    assert no_canary.upper == pytest.approx(0.5, abs=0.01)


# --- the closing rule, on a fake clock ------------------------------------------------------


SAFE: Final = Breakage(0.0001, 0.003, 0.9, 0.0, 100_000)
UNSAFE: Final = Breakage(0.01, 0.02, 0.9, 0.0, 100_000)


@pytest.mark.parametrize(
    ("now", "closed_at", "estimate", "halted", "state"),
    [
        (GRACE_START - timedelta(seconds=1), None, UNSAFE, False, "before"),
        (GRACE_START, None, UNSAFE, False, "open"),
        (GRACE_END - timedelta(seconds=1), None, SAFE, False, "open"),
        (GRACE_END, None, UNSAFE, False, "held"),
        (GRACE_END, None, SAFE, False, "closed"),
        (GRACE_END, None, SAFE, True, "held"),
        (GRACE_END, None, None, False, "held"),
        (GRACE_END + timedelta(days=1), GRACE_END, UNSAFE, False, "closed"),
        (DEADLINE - timedelta(seconds=1), None, UNSAFE, False, "held"),
        (DEADLINE, None, UNSAFE, False, "closed-at-deadline"),
        (DEADLINE, None, UNSAFE, True, "closed-at-deadline"),
    ],
    ids=[
        "before",
        "opens",
        "open-whatever-the-evidence",
        "held-at-grace-end",
        "closes-when-safe",
        "held-while-halted",
        "held-without-estimate",
        "closed-stays-closed",
        "held-until-deadline",
        "deadline-closes",
        "deadline-closes-even-halted",
    ],
)
def test_the_window_verdict(
    now: datetime, closed_at: datetime | None, estimate: Breakage | None, halted: bool, state: str
) -> None:
    verdict = window_verdict(
        WHEN_SAFE, now, closed_at=closed_at, estimate=estimate, canary_halted=halted
    )
    assert verdict.state == state
    assert verdict.serves_old is (state in ("before", "open", "held"))
    assert verdict.why


def test_at_grace_end_the_window_ends_whatever_the_evidence() -> None:
    rotation = replace(WHEN_SAFE, close="at-grace-end", grace_deadline=None)
    verdict = window_verdict(
        rotation, GRACE_END, closed_at=None, estimate=UNSAFE, canary_halted=True
    )
    assert verdict.state == "over"
    assert "at-grace-end" in verdict.why
