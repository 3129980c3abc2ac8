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

from datetime import datetime
from typing import Final, Protocol

import trio

from dualproxy.ops.evidence import Evidence
from dualproxy.pinning import endpoints
from dualproxy.rotation import policy
from dualproxy.serve.lifecycle import Material

__all__ = ["REVIEW_SECONDS", "Reviewed", "review", "review_forever"]

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


def review(server: Reviewed) -> None:
    """Apply the report halt and the closing rule once, now."""
    material = server.material
    rotation = material.config.rotation
    if rotation is None:
        return
    evidence = server.evidence
    now = server.now()
    local = material.local
    state = local.reports_state if local is not None else None
    if state is not None and rotation.canary_percent > 0 and not evidence.canary.halted:
        old_pins, new_pins = endpoints.rotation_pins(material.snapshot.keys, rotation)
        failing = [
            (version["name"], version["canary_clients"])
            for version in state.counts.old_pin_only(old_pins, new_pins)
        ]
        in_window = policy.phase(rotation, now, window_closed=evidence.window.closed) == "during"
        evidence.canary.review_reports(rotation, failing, in_window)
    evidence.review_window(rotation, now)


async def review_forever(server: Reviewed) -> None:
    """`review` every REVIEW_SECONDS, until cancelled."""
    while True:
        await trio.sleep(REVIEW_SECONDS)
        review(server)
