"""The rotation window the tests share, and a settable wall clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Final

from dualproxy.config.schema import Rotation

# The rotation window the tests share: keys k2026a (old) and k2026b (new), from the first of
# December 2026 to the 15th of January 2027.
GRACE_START: Final = datetime(2026, 12, 1, tzinfo=UTC)
GRACE_END: Final = datetime(2027, 1, 15, tzinfo=UTC)


def grace_window(**changes: Any) -> Rotation:
    """That window as a Rotation, with `changes` to its other settings."""
    return Rotation(
        old=("k2026a",), new=("k2026b",), grace_start=GRACE_START, grace_end=GRACE_END, **changes
    )


def open_canary_window(canary_percent: float = 100, **changes: Any) -> dict[str, Any]:
    """A [rotation] table (as config.loader.parse takes it) from k2026a to k2026b whose window
    is open now, from a day ago for thirty days, with `canary_percent` of the hint-less
    clients in the canary, and `changes` to its other settings."""
    now = datetime.now(UTC)
    return {
        "old": "k2026a",
        "new": "k2026b",
        "grace_start": now - timedelta(days=1),
        "grace_end": now + timedelta(days=30),
        "canary_percent": canary_percent,
        **changes,
    }


class Clock:
    """A settable wall clock for the policy (trio's own clock is separate)."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now
