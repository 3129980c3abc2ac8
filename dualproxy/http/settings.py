"""What an HTTP driver of the exchange (relay.py for HTTP/1.1, h2.py for HTTP/2) is given and
reports to: `RelaySettings`, what requests are relayed with, and `Tally`, what the driver
reports about its connection (the server's ConnectionRecord, through this protocol so that
this layer does not import the one above).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from dualproxy.config.errors import OperatorError
from dualproxy.http.exchange import wait_bounds
from dualproxy.http.heads import HeadLimits
from dualproxy.http.local import LocalRoutes
from dualproxy.http.rewrite import ForwardingRules
from dualproxy.http.upstream import UpstreamPool

if TYPE_CHECKING:
    from dualproxy.config.schema import Config, Limits

__all__ = ["RelaySettings", "Tally"]


class Tally(Protocol):
    """What the relay reports about its connection (the server's ConnectionRecord)."""

    def request_received(self) -> None:
        """A request head passed the checks."""

    def note(self, detail: str) -> None:
        """Why the connection ended early (logged once, with the connection)."""

    def response_relayed(self, status: int, upstream_seconds: float) -> None:
        """An upstream response head arrived, `upstream_seconds` after the request was sent;
        called once per response, so it must cost a few integer operations at most."""

    def response_generated(self, status: int) -> None:
        """The relay answered the client itself (a refusal: 4xx, 502, 504)."""

    def exchange_ended(
        self,
        method: bytes,
        target: bytes,
        version: bytes,
        status: int,
        bytes_in: int,
        bytes_out: int,
        seconds: float,
        upstream_seconds: float | None,
        ended: str | None,
    ) -> None:
        """An exchange is over (the access log's line): `status` 0 when no response went out,
        `bytes_in` and `bytes_out` the bodies' bytes, `seconds` from its head to its end,
        `upstream_seconds` from the request sent to the response head (None: answered here),
        `ended` why it did not end well (None when it did)."""


@dataclass(frozen=True, slots=True)
class RelaySettings:
    """What requests are relayed with; the server builds a new one when a reload changes it,
    and each request uses the one current when its head arrived."""

    limits: Limits
    head_limits: HeadLimits
    rules: ForwardingRules
    pool: UpstreamPool
    # Paths dualproxy answers itself (the pin manifest, pin-failure reports), never relayed.
    local: LocalRoutes | None = None
    # Each wait's timeout, indexed by exchange.Wait (exchange.wait_bounds of `limits`).
    bounds: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "bounds", wait_bounds(self.limits))

    @classmethod
    def build(
        cls,
        config: Config,
        pool: UpstreamPool | None = None,
        local: LocalRoutes | None = None,
    ) -> RelaySettings:
        """Settings for `config` (which has an upstream), with `pool` or a new one.

        Raises OperatorError for an [upstream] that cannot be served: an added header that
        dualproxy manages itself, an unusable ca_file. A new pool loads the system's CA store:
        call this from a worker thread once the server runs.
        """
        upstream = config.upstream
        assert upstream is not None
        try:
            rules = ForwardingRules.from_config(upstream)
            if pool is None:
                pool = UpstreamPool(upstream, config.limits)
        except ValueError as exc:
            raise OperatorError(str(exc), file=config.path) from None
        except OperatorError as exc:
            raise OperatorError(
                exc.problem, key_path=exc.key_path, file=config.path, fix=exc.fix
            ) from None
        return cls(
            limits=config.limits,
            head_limits=HeadLimits.from_limits(config.limits),
            rules=rules,
            pool=pool,
            local=local,
        )
