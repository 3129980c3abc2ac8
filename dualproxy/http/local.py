"""Requests dualproxy answers itself on its TLS listener, as HTTP sees them: what such a
request carries (`LocalRequest`), what its answer is (`LocalAnswer`), and the `Endpoint` and
`LocalRoutes` protocols that `pinning.endpoints` (the pin manifest, pin-failure reports)
implements. Defined here so that the relay, the exchange and the placeholder route and
answer them without importing the layer above, which knows what the paths mean.

A caller asks `LocalRoutes.find(target)` for each request; a found endpoint gets the request
with its body already read, within `max_body_bytes` (the caller refuses a larger one with 413
before reading it), and returns a whole answer that the caller frames and sends with its own
keep-alive rules. An endpoint never raises for anything a client sends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from dualproxy.config.names import IPAddress

__all__ = ["Endpoint", "LocalAnswer", "LocalRequest", "LocalRoutes"]


@dataclass(frozen=True, slots=True)
class LocalRequest:
    method: bytes
    target: bytes
    headers: Sequence[tuple[bytes, bytes]]  # lowercase names
    peer: IPAddress | None
    body: bytes


@dataclass(frozen=True, slots=True)
class LocalAnswer:
    """A whole response: the caller adds framing (Content-Length) and Connection."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""


class Endpoint(Protocol):
    """One path dualproxy answers itself."""

    @property
    def max_body_bytes(self) -> int:
        """The largest request body it reads (413 beyond it)."""

    async def answer(self, request: LocalRequest) -> LocalAnswer:
        """The answer to `request`; never raises for what a client sent."""


class LocalRoutes(Protocol):
    """The paths dualproxy answers itself, by request target."""

    @property
    def max_body_bytes(self) -> int:
        """The largest body any of them reads, for a caller that reads before it looks."""

    def find(self, target: bytes) -> Endpoint | None:
        """The endpoint for a request target (its query ignored), or None: relay it."""
