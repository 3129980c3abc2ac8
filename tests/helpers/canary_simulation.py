"""Seeded simulations of the canary's halt test (dualproxy.rotation.canary), for its targets.

A window is a stream of handshakes that reached a certificate: every `canary_every`-th one is a
canary handshake (new key), the others the control group's (old key, hint-less), each a pin
failure with its group's rate, independently. The test is asked exactly as the server asks
it: after every canary handshake, on the counts so far. Failures are drawn as geometric gaps
between them (what a Bernoulli stream is), so a 100,000-handshake window costs one call per
canary handshake and a few random numbers, not 100,000 draws.

Run as a script, it prints the figures the README quotes:

    .venv/bin/python tests/helpers/canary_simulation.py
"""

from __future__ import annotations

import math
import random
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from dualproxy.config.schema import DEFAULT_CANARY_FALSE_HALT, DEFAULT_CANARY_HALT_MARGIN
from dualproxy.rotation.canary import halts

# The scenario: 5 % of hint-less clients in the canary, a 0.2 % background of
# connections that leave without a request on either key.
CANARY_EVERY = 20
BACKGROUND = 0.002


def _gaps(rng: random.Random, rate: float) -> Iterator[int]:
    """Indices of the failures in a Bernoulli(rate) stream: geometric gaps."""
    if rate <= 0.0:
        return
    index = -1
    log_miss = math.log1p(-rate) if rate < 1.0 else -math.inf
    while True:
        skip = 0 if rate >= 1.0 else int(math.log(1.0 - rng.random()) / log_miss)
        index += 1 + skip
        yield index


def one_window(
    rng: random.Random,
    *,
    handshakes: int,
    canary_rate: float,
    control_rate: float = BACKGROUND,
    canary_every: int = CANARY_EVERY,
    margin: float = DEFAULT_CANARY_HALT_MARGIN,
    false_halt: float = DEFAULT_CANARY_FALSE_HALT,
) -> int | None:
    """The number of canary handshakes after which the canary halted, None if it never did."""
    canary_total = handshakes // canary_every
    canary_failures = _gaps(rng, canary_rate)
    next_failure = next(canary_failures, canary_total)
    control_failures = _gaps(rng, control_rate)
    next_control = next(control_failures, handshakes)
    failed = control_failed = 0
    for index in range(canary_total):
        # Handshake index * canary_every is this canary handshake; the control handshakes
        # before it are the others.
        control_seen = index * canary_every - index
        while next_control < control_seen:
            control_failed += 1
            next_control = next(control_failures, handshakes)
        if index == next_failure:
            failed += 1
            next_failure = next(canary_failures, canary_total)
        if halts(
            index + 1, failed, control_seen, control_failed, margin=margin, false_halt=false_halt
        ):
            return index + 1
    return None


@dataclass(frozen=True)
class Figures:
    """How many of `windows` halted, and after how many canary handshakes."""

    windows: int
    halted: int
    median: int | None
    p95: int | None
    worst: int | None

    @property
    def halt_rate(self) -> float:
        return self.halted / self.windows

    def __str__(self) -> str:
        if not self.halted:
            return f"halted in 0 of {self.windows} windows"
        return (
            f"halted in {self.halted} of {self.windows} windows ({self.halt_rate:.1%}); canary"
            f" handshakes to the halt: median {self.median}, 95% within {self.p95}, worst"
            f" {self.worst}"
        )


def simulate(seed: int, windows: int, **window: float | int) -> Figures:
    """`windows` seeded windows of `one_window(**window)`."""
    rng = random.Random(seed)
    found = sorted(
        n
        for n in (one_window(rng, **window) for _ in range(windows))  # type: ignore[arg-type]
        if n is not None
    )
    if not found:
        return Figures(windows, 0, None, None, None)
    return Figures(
        windows,
        len(found),
        found[len(found) // 2],
        found[min(len(found) - 1, math.ceil(len(found) * 0.95) - 1)],
        found[-1],
    )


SCENARIOS: Sequence[tuple[str, dict[str, float | int]]] = (
    ("every canary client fails", {"handshakes": 20_000, "canary_rate": 1.0}),
    (
        "30% of canary clients fail (plus the background)",
        {"handshakes": 20_000, "canary_rate": 0.3 + 0.7 * BACKGROUND},
    ),
    ("healthy: new fails as old does", {"handshakes": 100_000, "canary_rate": BACKGROUND}),
    (
        "edge of the null: new fails exactly the margin more",
        {"handshakes": 20_000, "canary_rate": BACKGROUND + DEFAULT_CANARY_HALT_MARGIN},
    ),
)


def main(argv: Sequence[str]) -> int:
    windows = int(argv[1]) if len(argv) > 1 else 1000
    print(
        f"canary halt test at the defaults (false_halt {DEFAULT_CANARY_FALSE_HALT},"
        f" margin {DEFAULT_CANARY_HALT_MARGIN}), 1 handshake in {CANARY_EVERY} in the canary,"
        f" background {BACKGROUND:.1%}, seed 1, {windows} windows each:"
    )
    for name, window in SCENARIOS:
        print(f"  {name} ({window['handshakes']:,} handshakes): {simulate(1, windows, **window)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
