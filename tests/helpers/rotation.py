"""The rotation window the tests share, and a settable wall clock."""

from __future__ import annotations

from datetime import UTC, datetime
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


class Clock:
    """A settable wall clock for the policy (trio's own clock is separate)."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now
