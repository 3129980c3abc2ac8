"""The evidence rules of a rotation: when the canary halts, and when the grace window may close.

Pure arithmetic on counts (no clock, no I/O): `ops.evidence` counts handshakes and asks these
functions after every canary handshake (the halt) and every second (the window); `policy`
takes their answers as inputs, as it takes the clock. They live in the rotation layer because
they decide the rotation; the evidence only counts.

**The halt: an anytime-valid two-sample test** (`log_e_value`, `halts`). Each handshake that
reaches a certificate is a Bernoulli trial, a pin failure or not (`ops.evidence` defines
both). The canary's handshakes (new key, reason `canary`) fail with probability p, the
control group's (old key, hint-less, reason `default`) with q; a key that apps pin shows the
same background in both (browser preconnects, health checks). The null hypothesis is "the new
key costs at most the margin": H0: p <= q + m (m = `rotation.canary_halt_margin`).

After n canary handshakes with f failures and n0 control handshakes with f0 failures, the
e-value is a mixture likelihood ratio against the best case the null allows:

    E = [ B(f+1/2, n-f+1/2) / B(1/2, 1/2) ] * [ B(f0+1/2, n0-f0+1/2) / B(1/2, 1/2) ]
        / max_{p <= q + m} p^f (1-p)^(n-f) q^f0 (1-q)^(n0-f0)

The numerator is each group's likelihood averaged over a Jeffreys Beta(1/2, 1/2) prior
(Robbins' mixture: for any fixed (p, q) it divided by their likelihood is a nonnegative
martingale with mean 1, whatever the order and mix of canary and control handshakes); the
denominator is the largest likelihood of any (p, q) in H0, so for the true (p, q) in H0,
E_t <= M_t, that martingale. Ville's inequality (1939), P(sup_t M_t >= 1/a) <= a, then gives
the guarantee: **whenever and however often it is checked, a canary whose new key costs at
most the margin halts with probability at most a = `rotation.canary_false_halt`**, over the
whole window, however long (Wasserman, Ramdas and Balakrishnan's "universal inference", 2020,
with a mixture numerator). The canary halts when E >= 1/a. This is the construction of
Lindon, Sanden and Shirikian ("Rapid Regression Detection in Software Deployments through
Sequential Testing", KDD 2022) and Lindon and Malek ("Anytime-Valid Inference for Multinomial
Count Data", NeurIPS 2022): a mixture over the alternative in closed form (Beta functions),
a test that may be looked at after every observation, and two integers per group as its state.

The denominator: when the counts alone satisfy H0 (f/n <= f0/n0 + m) its maximum is the
unconstrained one, which no average exceeds, so E <= 1 and nothing is computed (what every
handshake of a healthy canary costs: two divisions). Otherwise the maximum lies on the line
p = q + m and is found by bisection on the derivative of a concave function of q. Without a
single control handshake (every hint-less client in the canary, or none seen yet) q cannot be
estimated and is taken as 0, as the fixed-sample rule this replaces did: the test then asks
"does the new key fail more than m of canary handshakes", valid while the background stays
below m.

Why the Jeffreys prior: it spends the least on rates near 0 (the control's background of a few
tenths of a percent), where the uniform prior costs a further log(n0)/2. Seeded simulations
(tests/helpers/canary_simulation.py, its figures in the README) give at the defaults (a =
0.01, m = 0.05), with 5% of hint-less clients in the canary and a 0.2% background: a new key
every canary client fails halts after 3-4 canary handshakes; one that 30% fail after a median
of 30 (95% within 66); a healthy canary never halted in the simulated 100,000-handshake
windows, and at the very edge of H0 (p = q + m) the halt rate stays below a. What it assumes:
independent handshakes at rates constant over the window; a background that drifts alike for
both groups is absorbed by the margin.

**The estimate of what closing would break** (`breakage`). The canary is a random sample of
the hint-less clients (chosen by a hash of their address): its failure share above the
control's estimates the share of them that would fail on the new key. Anytime-valid bounds on
each rate (`rate_bounds`: the same Jeffreys mixture, inverted: the rates whose mixture
martingale stays below 1/(error/2)) bound the excess p - q from above. Weighted by the
hint-less clients' share of the window's handshakes, plus the share of handshakes the canary
cannot sample (clients hinted to the old key, hellos we could not parse: counted as all
failing), that is an upper bound on the share of handshakes that would fail if the window
closed now, valid at any moment with probability 1 - error. What it cannot see: clients that
do not connect during the window (an app opened once a month), and a version too rare to be
in the canary yet; reports from apps (`REPORT_HALT_CLIENTS`) cover the second.

**The window** (`window_verdict`). With `rotation.close = "when-safe"`, from grace_end on the
old key stays the default while the upper bound exceeds `rotation.max_breakage` or the canary
is halted (a halted canary no longer samples: its evidence says the new key breaks someone),
and the window closes once the bound is below; at `rotation.grace_deadline` it closes
whatever the evidence. A closed window stays closed (the caller keeps that record).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal

from dualproxy.config.schema import Rotation

__all__ = [
    "JEFFREYS",
    "REPORT_HALT_CLIENTS",
    "Breakage",
    "Verdict",
    "breakage",
    "halts",
    "log_e_value",
    "rate_bounds",
    "window_verdict",
]

# The mixture's prior on each rate: Beta(1/2, 1/2), Jeffreys' (see the module docstring).
JEFFREYS: Final = 0.5
# log B(1/2, 1/2) = log(pi): subtracted once per group.
_LOG_PRIOR_NORM: Final = math.log(math.pi)
# Bisection steps: each halves the interval, so 60 reach a double's resolution on [0, 1].
_BISECTION_STEPS: Final = 60
# Where the search for the likelihood's top on the null's boundary stops: at its top the
# likelihood is flat, so an error e in the rate changes its log by about e squared.
_ROOT_TOLERANCE: Final = 1e-12

# Distinct canary clients (an IPv4 address, an IPv6 /64) whose pin-failure reports name one
# app version that knows no pin of the new key, before that version halts the canary. One
# client can forge reports (they are not authenticated); three addresses in the canary's
# buckets cost a forger three networks, while a real broken version with a handful of users
# in the canary sends three within minutes (TrustKit reports every failing launch, at most
# once a day per device). A halt is the safe direction: it costs the rollout time, not apps.
REPORT_HALT_CLIENTS: Final = 3


def log_e_value(
    canary_trials: int,
    canary_failures: int,
    control_trials: int,
    control_failures: int,
    margin: float,
) -> float:
    """The natural log of the halt test's e-value (the module docstring), at most 0 while the
    counts themselves are inside the null."""
    if canary_trials <= 0 or canary_failures <= 0:
        return 0.0
    share = canary_failures / canary_trials
    if control_trials <= 0:
        # No control: its rate is taken as 0, and H0 is "p <= margin".
        if share <= margin:
            return 0.0
        mixture = _log_mixture(canary_trials, canary_failures)
        return mixture - _log_likelihood(canary_trials, canary_failures, margin)
    if share - control_failures / control_trials <= margin:
        return 0.0
    mixture = _log_mixture(canary_trials, canary_failures) + _log_mixture(
        control_trials, control_failures
    )
    q = _boundary_maximum(canary_trials, canary_failures, control_trials, control_failures, margin)
    best = _log_likelihood(canary_trials, canary_failures, q + margin) + _log_likelihood(
        control_trials, control_failures, q
    )
    return mixture - best


def halts(
    canary_trials: int,
    canary_failures: int,
    control_trials: int,
    control_failures: int,
    *,
    margin: float,
    false_halt: float,
) -> bool:
    """Whether the canary halts on these counts: its e-value reached 1/false_halt."""
    log_e = log_e_value(canary_trials, canary_failures, control_trials, control_failures, margin)
    return log_e >= -math.log(false_halt)


def rate_bounds(trials: int, events: int, error: float) -> tuple[float, float]:
    """Bounds on a Bernoulli rate after `events` in `trials`, valid at every moment at once
    with probability 1 - error: the rates r whose Jeffreys mixture martingale
    B(events+1/2, trials-events+1/2) / B(1/2, 1/2) / (r^events (1-r)^(trials-events)) is
    below 1/error (Robbins 1970). (0, 1) without trials."""
    if trials <= 0:
        return 0.0, 1.0
    # r is inside while its log-likelihood exceeds this level; the likelihood is concave in r
    # with its top at events / trials, so each bound is the one crossing on its side.
    level = math.log(error) + _log_mixture(trials, events)
    share = events / trials
    upper = 1.0
    if events < trials:
        low, high = share, 1.0
        for _ in range(_BISECTION_STEPS):
            middle = (low + high) / 2
            if _log_likelihood(trials, events, middle) > level:
                low = middle
            else:
                high = middle
        upper = high
    lower = 0.0
    if events > 0:
        low, high = 0.0, share
        for _ in range(_BISECTION_STEPS):
            middle = (low + high) / 2
            if _log_likelihood(trials, events, middle) > level:
                high = middle
            else:
                low = middle
        lower = low
    return lower, upper


@dataclass(frozen=True, slots=True)
class Breakage:
    """If the window closed now: the share of handshakes estimated to fail, its upper bound,
    and what they rest on (see the module docstring)."""

    estimate: float | None  # None: no canary handshake to estimate from
    upper: float  # valid at any moment with probability 1 - the error it was built with
    sampled: float  # share of the window's handshakes the canary samples (hint-less clients)
    unsampled: float  # share it cannot sample (hinted to old, unparsed): counted as failing
    handshakes: int  # the window's handshakes it rests on


def breakage(
    canary: tuple[int, int],
    control: tuple[int, int],
    *,
    sampled: int,
    unsampled: int,
    unaffected: int,
    error: float,
) -> Breakage:
    """The estimate from the canary's and the control's (trials, failures) and the window's
    handshakes by who would change key at the close: `sampled` (hint-less: the canary and the
    control), `unsampled` (old now, not sampled), `unaffected` (on the new key already)."""
    total = sampled + unsampled + unaffected
    if total <= 0:
        return Breakage(None, 1.0, 0.0, 0.0, 0)
    sampled_share, unsampled_share = sampled / total, unsampled / total
    (trials, failures), (control_trials, control_failures) = canary, control
    _, canary_upper = rate_bounds(trials, failures, error / 2)
    control_lower, _ = rate_bounds(control_trials, control_failures, error / 2)
    excess_upper = min(1.0, max(0.0, canary_upper - control_lower))
    estimate = None
    if trials > 0:
        control_share = control_failures / control_trials if control_trials else 0.0
        excess = max(0.0, failures / trials - control_share)
        estimate = sampled_share * excess
    upper = min(1.0, sampled_share * excess_upper + unsampled_share)
    return Breakage(estimate, upper, sampled_share, unsampled_share, total)


# --- the window ------------------------------------------------------------------------------

WindowState = Literal["before", "open", "held", "closed", "closed-at-deadline", "over"]


@dataclass(frozen=True, slots=True)
class Verdict:
    """Where the window stands at one instant, and why, in the config's words."""

    state: WindowState
    why: str

    @property
    def serves_old(self) -> bool:
        """Whether the old key is still served (hints, canary and default as in the window)."""
        return self.state in ("before", "open", "held")


def window_verdict(
    rotation: Rotation,
    now: datetime,
    *,
    closed_at: datetime | None,
    estimate: Breakage | None,
    canary_halted: bool,
) -> Verdict:
    """The closing rule (the module docstring) at `now`: `closed_at` is when the rule closed
    this window earlier (None: it has not), `estimate` what closing would break now (None:
    not computed, as on the command line)."""
    end = rotation.grace_end
    if now < rotation.grace_start:
        return Verdict("before", "before rotation.grace_start")
    if now < end:
        return Verdict("open", "inside the grace window")
    if rotation.close == "at-grace-end":
        return Verdict("over", 'rotation.close = "at-grace-end": the window ended at grace_end')
    deadline = rotation.grace_deadline
    assert deadline is not None  # the loader requires it with "when-safe"
    if closed_at is not None:
        return Verdict("closed", "closed when the breakage bound fell within max_breakage")
    if now >= deadline:
        return Verdict("closed-at-deadline", "rotation.grace_deadline passed: closed whatever")
    limit = f"rotation.max_breakage = {rotation.max_breakage:.2%}"
    if canary_halted:
        return Verdict("held", "the canary is halted: the new key breaks some clients")
    if estimate is None:
        return Verdict("held", f"no estimate yet; held until its upper bound is within {limit}")
    if estimate.upper > rotation.max_breakage:
        return Verdict(
            "held",
            f"up to {estimate.upper:.2%} of clients would fail (upper bound), above {limit}",
        )
    return Verdict("closed", f"at most {estimate.upper:.2%} of clients would fail, within {limit}")


# --- helpers ---------------------------------------------------------------------------------


def _log_mixture(trials: int, events: int) -> float:
    """log of B(events + 1/2, trials - events + 1/2) / B(1/2, 1/2): the Jeffreys mixture of
    the likelihood of `events` in `trials`."""
    a, b = events + JEFFREYS, trials - events + JEFFREYS
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b) - _LOG_PRIOR_NORM


def _log_likelihood(trials: int, events: int, rate: float) -> float:
    """log of rate^events (1 - rate)^(trials - events); 0 * log 0 is 0, a log of 0 -inf."""
    out = 0.0
    if events:
        out += events * math.log(rate) if rate > 0.0 else -math.inf
    if trials - events:
        out += (trials - events) * math.log1p(-rate) if rate < 1.0 else -math.inf
    return out


def _boundary_maximum(
    trials: int, failures: int, control_trials: int, control_failures: int, margin: float
) -> float:
    """The control rate q in [0, 1 - margin] maximising the likelihood of both groups on the
    line p = q + margin: the root of its derivative in q, which decreases (a sum of concave
    logs). Newton's method inside a bracket that bisection keeps when a step would leave it:
    a handful of steps where bisection alone takes sixty."""
    successes, control_successes = trials - failures, control_trials - control_failures
    low, high = 0.0, 1.0 - margin
    # Start from the pooled share moved onto the line: close to the root for small margins.
    q = (failures + control_failures) / (trials + control_trials) - margin / 2
    if not low < q < high:
        q = high / 2
    for _ in range(_BISECTION_STEPS):
        p = q + margin
        slope = curvature = 0.0
        if failures:
            slope += failures / p
            curvature -= failures / (p * p)
        if successes:
            slope -= successes / (1.0 - p)
            curvature -= successes / ((1.0 - p) * (1.0 - p))
        if control_failures:
            slope += control_failures / q if q > 0.0 else math.inf
            curvature -= control_failures / (q * q) if q > 0.0 else math.inf
        if control_successes:
            slope -= control_successes / (1.0 - q)
            curvature -= control_successes / ((1.0 - q) * (1.0 - q))
        if slope > 0:
            low = q
        else:
            high = q
        step = q - slope / curvature if math.isfinite(slope) and curvature < 0 else math.nan
        following = step if low < step < high else (low + high) / 2
        if abs(following - q) <= _ROOT_TOLERANCE or high - low <= _ROOT_TOLERANCE:
            return following
        q = following
    return q
