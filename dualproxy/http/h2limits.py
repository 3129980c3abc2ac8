"""What an HTTP/2 client may make us do for nothing, counted: the abuse limits of one connection.

HTTP/2 lets a client ask for work that has no request behind it: open and reset streams
(Rapid Reset, CVE-2023-44487), make us answer PING and SETTINGS while it does not read
(CVE-2019-9512, -9515), send frames with nothing in them (CVE-2019-9518), shuffle priorities
(CVE-2019-9513), or trickle WINDOW_UPDATEs that each let a few bytes out (CVE-2019-9511).
The HTTP/2 driver (`http.h2`) charges every such frame here; a charge that passes a limit
returns the problem, and the driver ends the connection with GOAWAY ENHANCE_YOUR_CALM (RFC
9113 §5.4.1), which hurts that client's connection and nobody else's. The other bounds are
elsewhere and say so: the header list (SETTINGS_MAX_HEADER_LIST_SIZE, which h2 enforces while
decoding: the HPACK bomb), CONTINUATION frames (h2 refuses more than 64 in a row, with GOAWAY
PROTOCOL_ERROR: CVE-2024-27316), concurrent streams, buffers and timeouts (http.h2).

Each limit is a count (per stream opened, per DATA frame sent, since our output last drained)
rather than a rate, except the resets, which a legitimate client does send now and then (a
screen closed, a request cancelled): a token bucket there, as nghttp2's. Pure: the driver
passes the clock.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "MAX_CONSECUTIVE_EMPTY_FRAMES",
    "MAX_OWED_CONTROL_FRAMES",
    "PRIORITY_FRAMES_PER_STREAM",
    "RESET_BURST",
    "RESET_RATE",
    "WINDOW_UPDATES_PER_DATA_FRAME",
    "FloodGuard",
]

# Streams a client may reset (or have refused) before we answer them: a burst of 100, every
# stream it may have in flight cancelled at once (a screen closed: h2_max_concurrent_streams'
# default), then 33 a second, nghttp2's stream reset rate (1.57.0, October 2023, its answer to
# Rapid Reset; its burst of 1000 is a whole connection's worth of streams here). An app that
# cancels requests now and then never comes near; a Rapid Reset client (thousands a second)
# is stopped within its first hundred or so, having cost us no upstream request: a stream
# reset in the read that opened it never starts.
RESET_BURST: Final = 100
RESET_RATE: Final = 33.0
# Answers we owe (PING and SETTINGS acknowledgements, RST_STREAMs) while our output has not
# drained: Envoy's max_outbound_control_frames (1000). A client that sends PINGs and does not
# read our ACKs is stopped here, with bounded memory (CVE-2019-9512, -9515).
MAX_OWED_CONTROL_FRAMES: Final = 1000
# Frames in a row that carry nothing (an empty DATA frame without END_STREAM): Envoy's
# max_consecutive_inbound_frames_with_empty_payload (1) (CVE-2019-9518).
MAX_CONSECUTIVE_EMPTY_FRAMES: Final = 1
# PRIORITY frames per stream opened (plus one stream's worth): Envoy's
# max_inbound_priority_frames_per_stream (100). We ignore priorities (RFC 9113 §5.3 lets a
# server), so they cost little, but a flood of them is still work for nothing (CVE-2019-9513).
PRIORITY_FRAMES_PER_STREAM: Final = 100
# WINDOW_UPDATE frames per DATA frame we sent (plus a start of as many): Envoy's
# max_inbound_window_update_frames_per_data_frame_sent (10) (CVE-2019-9511's trickle).
WINDOW_UPDATES_PER_DATA_FRAME: Final = 10


class FloodGuard:
    """One connection's counts; each `charge_*` returns None, or the problem that ends it."""

    __slots__ = (
        "_data_sent",
        "_empty",
        "_owed",
        "_priorities",
        "_reset_at",
        "_reset_tokens",
        "_streams",
        "_window_updates",
    )

    def __init__(self, now: float) -> None:
        self._reset_tokens = float(RESET_BURST)
        self._reset_at = now
        self._owed = 0
        self._empty = 0
        self._streams = 0
        self._priorities = 0
        self._data_sent = 0
        self._window_updates = 0

    def stream_opened(self) -> None:
        self._streams += 1
        self._empty = 0

    def charge_reset(self, now: float) -> str | None:
        """A stream the client reset before we answered it, or one we refused (too many at
        once): a token from the bucket."""
        tokens = self._reset_tokens + (now - self._reset_at) * RESET_RATE
        self._reset_at = now
        if tokens < 1:
            self._reset_tokens = tokens
            return (
                f"more than {RESET_BURST} streams reset or refused, then {RESET_RATE:g} a"
                " second (Rapid Reset)"
            )
        self._reset_tokens = min(tokens - 1, float(RESET_BURST))
        return None

    def charge_owed(self, frames: int = 1) -> str | None:
        """Control frames we must answer (PING and SETTINGS ACKs, a RST_STREAM)."""
        self._owed += frames
        if self._owed > MAX_OWED_CONTROL_FRAMES:
            return (
                f"more than {MAX_OWED_CONTROL_FRAMES} control frames to answer while our"
                " output does not drain"
            )
        return None

    def output_drained(self) -> None:
        """Everything queued went out: the answers owed were delivered."""
        self._owed = 0

    def charge_empty(self) -> str | None:
        """A frame that carried nothing and ended nothing."""
        self._empty += 1
        if self._empty > MAX_CONSECUTIVE_EMPTY_FRAMES:
            return f"more than {MAX_CONSECUTIVE_EMPTY_FRAMES} empty frames in a row"
        return None

    def useful_frame(self) -> None:
        """A frame that carried data or headers."""
        self._empty = 0

    def charge_priority(self) -> str | None:
        self._priorities += 1
        if self._priorities > PRIORITY_FRAMES_PER_STREAM * (self._streams + 1):
            return f"more than {PRIORITY_FRAMES_PER_STREAM} PRIORITY frames per stream"
        return None

    def data_sent(self, frames: int = 1) -> None:
        self._data_sent += frames

    def charge_window_update(self) -> str | None:
        self._window_updates += 1
        if self._window_updates > WINDOW_UPDATES_PER_DATA_FRAME * (self._data_sent + 1):
            return f"more than {WINDOW_UPDATES_PER_DATA_FRAME} WINDOW_UPDATE frames per DATA frame"
        return None
