"""Hypothesis profiles: `fast` for every run of the suite, `deep` for a long search by hand.

    scripts/test                                   # fast: what CI runs
    HYPOTHESIS_PROFILE=deep scripts/test -k "hello or head or body or pins or policy"

Both turn Hypothesis's per-example deadline off: a deadline is a timing assertion, and on a
loaded 2-core machine it fails correct code. A property that names its own number of examples
(a parser drawn many more times than a policy) scales it with `examples`.
"""

from __future__ import annotations

import os
from typing import Final

from hypothesis import settings

# Selected with the HYPOTHESIS_PROFILE environment variable; fast when unset.
PROFILE_VARIABLE: Final = "HYPOTHESIS_PROFILE"
# Hypothesis's own default: the whole suite's properties then take seconds, not minutes.
FAST_EXAMPLES: Final = 100
# How many times the fast count a deep run draws: 20x turns a property's few hundred examples
# into thousands, minutes of search for the parsers, which is what a deep run is for.
DEEP_FACTOR: Final = 20

settings.register_profile("fast", max_examples=FAST_EXAMPLES, deadline=None)
settings.register_profile("deep", max_examples=FAST_EXAMPLES * DEEP_FACTOR, deadline=None)


def load() -> None:
    """Load the profile HYPOTHESIS_PROFILE names (conftest does, before any test runs)."""
    settings.load_profile(os.environ.get(PROFILE_VARIABLE, "fast"))


def examples(fast: int) -> int:
    """A property's number of examples: `fast` in the fast profile, DEEP_FACTOR times as many
    in the deep one."""
    return fast * DEEP_FACTOR if settings.get_current_profile_name() == "deep" else fast
