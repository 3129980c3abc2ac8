"""What a server says about itself in the log, beyond its connections: a summary when it has
started (keys and pins, the rotation's phase, the upstream, every listener) and a line when
the grace window opens or closes.

The summary's words are pure functions of the material (`summary`); `watch_window` is a task
beside the connections that sleeps until the next boundary of the window (at most
WINDOW_CHECK_INTERVAL, so that a reload that moves the window, or a clock that jumps, is
noticed) and logs each change of phase once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Final, Protocol

import trio

from dualproxy.config.names import ListenAddress
from dualproxy.config.schema import Config, Rotation
from dualproxy.config.times import brief_time, brief_times
from dualproxy.rotation.policy import Phase, phase, pin_role
from dualproxy.tls.keystore import KeySnapshot

__all__ = ["WINDOW_CHECK_INTERVAL", "Listening", "phase_change", "summary", "watch_window"]

log = logging.getLogger("dualproxy")

# The window watcher looks again at least this often, in seconds: a reload may move the
# window, and a wall clock that jumps (NTP, a suspended VM) is seen within a minute.
WINDOW_CHECK_INTERVAL: Final = 60.0
# Never sleep less than this, in seconds: the policy's clock is read at most every quarter
# second (serve.clock), so a boundary may look a moment away a little longer.
WINDOW_MIN_SLEEP: Final = 0.05


class Listening(Protocol):
    """A server, as the window watcher sees it."""

    @property
    def config(self) -> Config: ...


def summary(
    config: Config,
    snapshot: KeySnapshot,
    now: datetime,
    *,
    tls: Sequence[tuple[str, int]],
    http01: tuple[str, int] | None = None,
    admin: str | None = None,
) -> list[str]:
    """The lines a server logs once it serves: every key (role now, algorithm, pin, expiry),
    the rotation's phase, the upstream, and every listener it opened (`admin`: the admin
    listener's URL, or why it does not listen)."""
    keys = []
    for name in config.key_order():
        key = snapshot.keys[name]
        role = pin_role(config.rotation, name, now)
        until = brief_time(key.not_after)
        keys.append(f"{name} ({role}, {key.algorithm}, sha256/{key.pin}, until {until})")
    upstream = config.upstream
    relay = "none: dualproxy answers every request itself" if upstream is None else upstream.url
    listeners = ["TLS " + ", ".join(str(ListenAddress(*a)) for a in tls)]
    if http01 is not None:
        listeners.append(f"http-01 and redirects http://{ListenAddress(*http01)}/")
    if admin is not None:
        listeners.append(f"admin {admin}")
    return [
        f"keys: {'; '.join(keys)}",
        f"rotation: {_phase_words(config.rotation, now)}",
        f"upstream: {relay}",
        f"listeners: {'; '.join(listeners)}",
    ]


def phase_change(
    rotation: Rotation | None, was: Phase, now: datetime, *, window_closed: bool = False
) -> str | None:
    """The log line for the window's phase at `now` after `was`, or None when it is the same
    (`window_closed`: the evidence closed a "when-safe" window, policy.phase)."""
    current = phase(rotation, now, window_closed=window_closed)
    if current == was or rotation is None:
        return None
    start, end, deadline = brief_times(
        rotation.grace_start, rotation.grace_end, rotation.old_served_until
    )
    old, new = ", ".join(rotation.old), ", ".join(rotation.new)
    if current == "during":
        return f"grace window opened (rotation.grace_start {start}): {_during(rotation, end)}"
    if current == "after" and rotation.close == "when-safe":
        how = (
            "by the evidence (rotation.close = when-safe)"
            if now < rotation.old_served_until
            else f"at rotation.grace_deadline {deadline}"
        )
        return f"grace window closed {how}: everyone gets new ({new}); old ({old}) is retired"
    if current == "after":
        return (
            f"grace window closed (rotation.grace_end {end}): everyone gets new ({new});"
            f" old ({old}) is retired"
        )
    return f"grace window not open yet (a reload moved it): everyone gets old ({old}) until {start}"


async def watch_window(
    served: Listening,
    clock: Callable[[], datetime],
    window_closed: Callable[[], bool] = lambda: False,
) -> None:
    """Log each change of the window's phase (see the module docstring); forever.
    `window_closed`: whether the evidence closed a "when-safe" window (seen within
    WINDOW_CHECK_INTERVAL; the evidence logs the moment itself)."""
    was = phase(served.config.rotation, clock(), window_closed=window_closed())
    while True:
        rotation = served.config.rotation
        now = clock()
        closed = window_closed()
        line = phase_change(rotation, was, now, window_closed=closed)
        if line is not None:
            log.info("%s", line)
        was = phase(rotation, now, window_closed=closed)
        wait = WINDOW_CHECK_INTERVAL
        if rotation is not None:
            for boundary in (rotation.grace_start, rotation.grace_end, rotation.old_served_until):
                if boundary > now:
                    wait = min(wait, (boundary - now).total_seconds())
                    break
        await trio.sleep(max(wait, WINDOW_MIN_SLEEP))


def _phase_words(rotation: Rotation | None, now: datetime) -> str:
    if rotation is None:
        return "none; every client gets the configured keys"
    start, end = brief_times(rotation.grace_start, rotation.grace_end)
    current = phase(rotation, now)
    old, new = ", ".join(rotation.old), ", ".join(rotation.new)
    if current == "before":
        return f"before the grace window ({start} .. {end}): everyone gets old ({old})"
    if current == "during" and now >= rotation.grace_end:
        deadline = brief_time(rotation.old_served_until)
        return (
            f"grace window held open past grace_end ({end}) until it is safe to close"
            f' (rotation.close = "when-safe"), at the latest until {deadline}: hinted clients'
            f" get their side, others get {rotation.default}"
        )
    if current == "during":
        return f"grace window open: {_during(rotation, end)}"
    return f"after the grace window (closed {end}): everyone gets new ({new})"


def _during(rotation: Rotation, end: str) -> str:
    hinted = bool(rotation.hints_new) or bool(rotation.hints_old)
    others = f"others get {rotation.default}"
    if rotation.canary_percent:
        others += f" (canary: {rotation.canary_percent:g}% of them get new)"
    hints = "hinted clients get their side, " if hinted else ""
    return f"until {end}, {hints}{others}"
