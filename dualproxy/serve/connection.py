"""What one connection did: its `ConnectionRecord`, filled in as the connection goes and logged
once, when it ends.

Theory of operation. The server makes a record per accepted connection (its peer from the
address accept() returned: `peer_address`), and each step of the pipeline writes what it
learned: the ClientHello, the policy's choice, the key presented, the TLS version, how it
ended (`tls.outcome.Outcome`) and a detail. The relay reports through it too, as its `Tally`
(requests received, responses relayed or generated), counting each response into the
evidence's `RequestCounters` of the key and reason the connection was served.

When the connection ends the server fixes its duration (`end()`), hands it to the evidence,
and logs it: the record is the log message itself (an `ops.logformat.LogEvent`), so the text
format writes `str(record)`, the `conn` line, and the JSON format its `log_fields()`:

    conn peer=203.0.113.7:51234 sni=api.example.com alpn=h2,http/1.1 identity=old key=k2026a
      reason=default outcome=ok detail=- tls=TLSv1.3 requests=3 ms=412

(one line), the fields in this fixed order, "-" for none. Text a client controls (SNI, ALPN,
the detail, which may quote the client's bytes) is escaped (`log_value`) so that it cannot
forge fields or lines; the rest is our own vocabulary (enum values, config names, OpenSSL's
version names) or our own writing (the peer), which never needs quoting. In JSON, none is
null, as "-" is in text (a value that is "-" itself reads as none in both), ALPN a list,
`requests` and `ms` numbers; every other value is the text line's, unescaped.
"""

from __future__ import annotations

import codecs
import ipaddress
import socket
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import ClassVar, Final

import trio

from dualproxy.config.names import IPAddress
from dualproxy.ops.accesslog import AccessLog
from dualproxy.ops.evidence import LATENCY_BOUNDS, RequestCounters
from dualproxy.ops.logformat import LogEvent, log_value
from dualproxy.rotation import policy
from dualproxy.tls.clienthello import ClientHello
from dualproxy.tls.outcome import Outcome

__all__ = ["ConnectionRecord", "peer_address"]

# What we answer when the upstream failed an exchange (errors.py: the upstream's fault).
_UPSTREAM_FAILURE_STATUSES: Final = frozenset({502, 503, 504})
# What the log line writes for a value that is none.
_NONE_TEXT: Final = "-"


@dataclass(slots=True)
class ConnectionRecord(LogEvent):
    """What one connection did; logged once, when it ends (see the module docstring)."""

    event: ClassVar[str] = "conn"

    peer: str  # log text: see peer_address
    peer_ip: IPAddress | None = None  # for the policy and X-Forwarded-For
    # The client's id while counted against max_connections_per_client (serve.admission).
    client: bytes | None = None
    hello: ClientHello | None = None
    choice: policy.Choice | None = None
    key: str | None = None
    outcome: Outcome = Outcome.NO_HELLO
    detail: str = ""
    tls_version: str | None = None
    requests: int = 0
    started: float = field(default_factory=trio.current_time)
    ended: float | None = None  # set by end()
    # The per-request counts of the key and reason this connection was served, shared with
    # the other connections served them (Evidence.counters_for; taken when the key is chosen).
    counters: RequestCounters = field(default_factory=RequestCounters, repr=False)
    # Where each exchange is logged (the server's; None: no access log).
    access: AccessLog | None = field(default=None, repr=False)
    # Exchanges we answered 502, 503 or 504: the upstream failed them.
    upstream_failures: int = 0

    # The relay's Tally: it reports through these, without importing this module.
    def request_received(self) -> None:
        self.requests += 1
        self.outcome = Outcome.OK

    def note(self, detail: str) -> None:
        self.detail = detail

    def response_relayed(self, status: int, upstream_seconds: float) -> None:
        counters = self.counters
        counters.statuses[status // 100] += 1
        counters.latency[bisect_right(LATENCY_BOUNDS, upstream_seconds)] += 1
        counters.latency_sum += upstream_seconds

    def response_generated(self, status: int) -> None:
        self.counters.statuses[status // 100] += 1
        if status in _UPSTREAM_FAILURE_STATUSES:
            self.upstream_failures += 1

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
        access = self.access
        if access is not None:
            choice = self.choice
            access.exchange(
                self.peer,
                method,
                target,
                version,
                status,
                bytes_in,
                bytes_out,
                seconds,
                upstream_seconds,
                self.key,
                choice.reason if choice is not None else None,
                ended,
            )

    def end(self) -> None:
        """The connection is over: its duration (`ms`) is fixed from now on. One whose
        upstream failed an exchange ends as upstream-error, not ok (and is logged at WARNING),
        its detail saying why (the last failure's, with how many there were)."""
        self.ended = trio.current_time()
        if self.upstream_failures and self.outcome is Outcome.OK:
            self.outcome = Outcome.UPSTREAM_ERROR
            if self.upstream_failures > 1:
                self.detail = f"{self.upstream_failures} exchanges failed, the last: {self.detail}"

    @property
    def ms(self) -> int:
        """How long the connection lasted, in whole milliseconds (so far, before `end()`)."""
        ended = self.ended if self.ended is not None else trio.current_time()
        return round((ended - self.started) * 1000)

    def __str__(self) -> str:
        """The `conn` line. One f-string: it is built for every connection logged."""
        hello, choice = self.hello, self.choice
        if hello is not None:
            sni = log_value(hello.sni)
            # None offered logs "-", as no SNI does.
            alpn = log_value(b",".join(hello.alpn).decode("ascii", "replace") or None)
        else:
            sni = alpn = _NONE_TEXT
        identity, reason = (choice.identity, choice.reason) if choice is not None else ("-", "-")
        return (
            f"conn peer={self.peer} sni={sni} alpn={alpn} identity={identity}"
            f" key={self.key or '-'} reason={reason} outcome={self.outcome}"
            f" detail={log_value(self.detail or None)} tls={self.tls_version or '-'}"
            f" requests={self.requests} ms={self.ms}"
        )

    def log_fields(self) -> dict[str, object]:
        """The `conn` line's fields for the JSON log (see the module docstring)."""
        hello, choice = self.hello, self.choice
        sni: str | None = None
        alpn: list[str] | None = None
        if hello is not None:
            # An empty SNI is quoted in text (""), not none; an empty ALPN list is none.
            sni = hello.sni if hello.sni != _NONE_TEXT else None
            offered = _unless_none_text(b",".join(hello.alpn).decode("ascii", "replace"))
            alpn = offered.split(",") if offered is not None else None
        peer: str | None = self.peer
        if self.peer.startswith('"'):  # escaped by peer_address: the text it escaped
            peer = codecs.decode(self.peer[1:-1], "unicode_escape")
        elif self.peer == _NONE_TEXT:
            peer = None
        return {
            "peer": peer,
            "sni": sni,
            "alpn": alpn,
            "identity": _unless_none_text(choice.identity) if choice is not None else None,
            "key": _unless_none_text(self.key),
            "reason": choice.reason if choice is not None else None,
            "outcome": self.outcome,
            "detail": _unless_none_text(self.detail),
            "tls": _unless_none_text(self.tls_version),
            "requests": self.requests,
            "ms": self.ms,
        }


def _unless_none_text(value: str | None) -> str | None:
    """A JSON field's value: None for what the text line writes as "-" (none, "" or "-")."""
    return value if value and value != _NONE_TEXT else None


def peer_address(name: object) -> tuple[str, IPAddress | None]:
    """The log text and the address of a peer, from the address accept() returned."""
    if not isinstance(name, tuple) or len(name) < 2:
        return _NONE_TEXT, None
    host, port = name[0], name[1]
    # From the packed form: parsing the text costs more, once per connection. The text of an
    # IPv4 address is accept()'s own (inet_ntop, the canonical dotted quad).
    try:
        if len(name) == 2:
            return f"{host}:{port}", ipaddress.IPv4Address(socket.inet_aton(host))
        address = ipaddress.IPv6Address(socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0]))
    except (OSError, TypeError, AttributeError):
        return log_value(host), None  # escaped: the log line takes the peer text as it is
    return f"[{address}]:{port}", address
