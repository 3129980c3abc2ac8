"""The rotation's evidence rules, applied while a server runs.

Every REVIEW_SECONDS (and once before the server accepts), beside the connections:

- the canary halts on app versions that its clients report failing on the new key
  (`ops.evidence.CanaryJudge.review_reports`, from the pin-failure reports' counts);
- a `close = "when-safe"` window is judged (`ops.evidence.Evidence.review_window`): held open
  past grace_end while closing would break too many clients, closed once it would not.

The halt test on handshakes runs per canary handshake, in the evidence itself; what is here
reads counts that change slowly, so a second is prompt and costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from datetime import datetime
from typing import Final, Protocol

import trio

from dualproxy.ops.evidence import Evidence
from dualproxy.pinning import endpoints
from dualproxy.rotation import policy
from dualproxy.serve.lifecycle import Material

__all__ = ["REVIEW_SECONDS", "Failures", "Reviewed", "canary_failures", "review", "review_forever"]

# App versions reported failing on the new key, by name: the canary clients that reported each.
Failures = Mapping[str, Collection[bytes]]

# How often the window and the reports are looked at: a rotation is days long, and an app
# version reported failing halts the canary within a second of its third canary client.
REVIEW_SECONDS: Final = 1.0


class Reviewed(Protocol):
    """A server, as the review sees it (serve.server.Server)."""

    @property
    def material(self) -> Material: ...

    @property
    def evidence(self) -> Evidence: ...

    def now(self) -> datetime: ...


def canary_failures(material: Material) -> dict[str, frozenset[bytes]]:
    """What this process's report counts say: the canary clients that reported each app
    version failing on the new key (none without a rotation that has a canary, or without
    the reports endpoint)."""
    rotation = material.config.rotation
    local = material.local
    state = local.reports_state if local is not None else None
    if rotation is None or state is None or rotation.canary_percent <= 0:
        return {}
    old_pins, new_pins = endpoints.rotation_pins(material.snapshot.keys, rotation)
    return state.counts.canary_failure_clients(old_pins, new_pins)


def review(server: Reviewed, failures: Failures | None = None) -> None:
    """Apply the report halt and the closing rule once, now. `failures`: the reports'
    evidence when it is not this process's own (a supervisor's: the union of its workers');
    a judge that does not decide (a worker's) halts on none, and a window judge that does
    not decide closes nothing."""
    material = server.material
    rotation = material.config.rotation
    if rotation is None:
        return
    evidence = server.evidence
    now = server.now()
    canary = evidence.canary
    if rotation.canary_percent > 0 and not canary.halted and canary.decides:
        if failures is None:
            failures = canary_failures(material)
        failing = sorted(
            ((name, len(clients)) for name, clients in failures.items()),
            key=lambda version: (-version[1], version[0]),
        )
        in_window = policy.phase(rotation, now, window_closed=evidence.window.closed) == "during"
        canary.review_reports(rotation, failing, in_window)
    evidence.review_window(rotation, now)


async def review_forever(server: Reviewed, failures: Callable[[], Failures] | None = None) -> None:
    """`review` every REVIEW_SECONDS, until cancelled; `failures`: see review."""
    while True:
        await trio.sleep(REVIEW_SECONDS)
        review(server, failures() if failures is not None else None)
