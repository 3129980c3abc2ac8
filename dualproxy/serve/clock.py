"""The policy's clock: the wall clock, read at most every CLOCK_REUSE_SECONDS.

The rotation policy reads the time for every connection (which key a client gets depends on
it), while rotation times are whole seconds and the canary's ramp takes days: a reading a
fraction of a second old chooses as a fresh one would, at a fraction of the cost of a
datetime per connection. Tests and the dev bench give the server a clock of their own.
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from typing import Final

__all__ = ["CLOCK_REUSE_SECONDS", "ReusedUtcNow", "utc_now"]

# How long a reading of the wall clock serves the policy, in seconds (see the docstring).
CLOCK_REUSE_SECONDS: Final = 0.25


def utc_now() -> datetime:
    """The wall clock, in UTC: the server's default clock (read through ReusedUtcNow)."""
    return datetime.now(UTC)


class ReusedUtcNow:
    """utc_now, read again only once CLOCK_REUSE_SECONDS of the monotonic clock have passed."""

    __slots__ = ("_reading",)

    def __init__(self) -> None:
        # (monotonic time it is good until, the reading) in one attribute: worker threads
        # read it too.
        self._reading = (-math.inf, datetime.now(UTC))

    def __call__(self) -> datetime:
        now = time.monotonic()
        until, reading = self._reading
        if now >= until:
            reading = datetime.now(UTC)
            self._reading = (now + CLOCK_REUSE_SECONDS, reading)
        return reading
