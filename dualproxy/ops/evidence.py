"""Rollout evidence: who got which key, which clients look like pin failures, and the canary
that halts itself when they do.

Pure accounting (no sockets, no trio): the server hands every finished connection to
`Evidence.connection_ended`, the relay counts each response into `RequestCounters` through the
connection's record, and the admin listener asks for a `Status` when someone looks. Everything
is counted in plain ints when it happens and turned into metrics, JSON or a page only then,
at scrape time.

Definitions (the README's "Evidence and the admin listener" repeats them):
- A handshake *reached our certificate* when it completed, or when the client aborted it
  (outcome `client-aborted`: an alert such as bad_certificate or unknown_ca, or a close,
  after our first flight, which carries the certificate: the peek had the whole ClientHello).
- A *pin failure* is such a handshake that the client aborted, or a completed one that the
  client closed without sending a request and without anything we refused (outcome
  `no-request`, empty detail): what OkHttp's CertificatePinner and curl's --pinnedpubkey do,
  since they check the key after the handshake and then drop the socket.
- The *pin-failure share* of a key: pin failures / handshakes that reached its certificate.
  It has a background level (browser preconnects, TLS health checks that never send a
  request), which the old and the new key see alike: compare them side by side.

The canary's halt (`CanaryJudge`): with rotation.canary_percent > 0, after every canary
handshake (reason `canary`, the new key) the sequential test of `rotation.canary` compares its
samples with the old key's among the hint-less clients it served (reason `default`, the
canary's control group): once it is sure, at false-halt probability
rotation.canary_false_halt, that the new key fails more than rotation.canary_halt_margin
above the old, the canary halts: policy.choose sends hint-less clients to the default again,
and it stays halted until `resume` (an operator, `dualproxy canary resume`). App versions that
canary clients report failing on the new key (`review_reports`) halt it too. Both samples
count from the process start or the last resume; each machine judges its own, and takes
what another decided through `follow` (a worker its supervisor's; a replica the halt record
of the state folder it shares with others, serve.sharedhalt), which names who (`by`).

The window (`WindowJudge`): with rotation.close = "when-safe", `review_window` (every second,
from the serving layer) estimates what closing would break (`rotation.canary.breakage`) and
applies `rotation.canary.window_verdict`; once it closes, `closed` stays true for that
rotation and policy.choose gives everyone the new key.

Cost. Per request: a list increment for the status class, and for a relayed response one for
its latency bucket and a float addition. Per connection: one dict update; for a handshake that
reached a certificate, a few list operations for its time bucket (15 minutes, a day of them
kept in a ring) and for the canary's samples.

Size. About 700 lines, one vocabulary (Sample, Row, Window, the canary's rule) used three ways:
counted per connection (Evidence, CanaryJudge), read at one instant (Status) and written as
/status.json (Status.to_json); split, each part would import the others' types.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final, Literal, Protocol

from dualproxy.config.schema import CloseRule, Rotation
from dualproxy.config.times import format_time
from dualproxy.ops.tally import RowKey, Tally
from dualproxy.rotation import canary as rules
from dualproxy.rotation.canary import REPORT_HALT_CLIENTS, Breakage, Verdict
from dualproxy.rotation.policy import Choice, Phase, Reason
from dualproxy.tls.outcome import Outcome

if TYPE_CHECKING:
    from collections.abc import Iterable

    from dualproxy.pinning.reports import ReportSummary

__all__ = [
    "BUCKET_SECONDS",
    "LATENCY_BOUNDS",
    "SERIES_BUCKETS",
    "CanaryJudge",
    "CanaryStatus",
    "ConnectionCounts",
    "Evidence",
    "FinishedConnection",
    "KeyFacts",
    "KeyStatus",
    "RequestCounters",
    "Row",
    "Sample",
    "Status",
    "Window",
    "WindowJudge",
    "WindowStatus",
    "percent",
]

log = logging.getLogger("dualproxy")

# The status page's time buckets: 15 minutes shows a rollout's shape within an hour, and a
# day of them (96) is what an operator compares against yesterday's traffic.
BUCKET_SECONDS: Final = 15 * 60
SERIES_BUCKETS: Final = 24 * 60 * 60 // BUCKET_SECONDS
# Upper bounds of the upstream latency histogram, in seconds: prometheus_client's defaults,
# which span an API's fast answers (5 ms) to the slow ones that users notice (10 s).
LATENCY_BOUNDS: Final = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)
# Status codes are three digits (RFC 9110 15), so status // 100 is 1..9.
_STATUS_CLASSES: Final = 10

# Labels for connections that ended before a key was chosen (no hello, plain HTTP, timeout).
NONE_LABEL: Final = "-"
# The members that connection_ended compares, looked up once: reading an attribute of an enum
# class goes through its metaclass's __getattr__ hook, slower than reading a global (3.11).
_CLIENT_ABORTED: Final = Outcome.CLIENT_ABORTED
_NO_REQUEST: Final = Outcome.NO_REQUEST
_CANARY: Final = Reason.CANARY
_DEFAULT: Final = Reason.DEFAULT
# The reasons of a window's other handshakes (hinted, or unparsed and given the default).
_WINDOW_REASONS: Final = frozenset(
    {Reason.HINT_SNI, Reason.HINT_ALPN, Reason.HINT_NETWORK, Reason.UNPARSED}
)
# How often a held window's state is written to the log again (seconds of the policy clock):
# an operator who missed the first warning sees it within the hour, and the log stays short.
WINDOW_HELD_LOG_INTERVAL: Final = 60 * 60
# The error of the breakage bound a "when-safe" window closes on: the chance that, at any
# moment of the window, more clients would fail than the bound says. As the canary's halt.
WINDOW_BOUND_ERROR: Final = 0.01


class FinishedConnection(Protocol):
    """What the accounting reads from a finished connection (serve.connection's
    ConnectionRecord)."""

    @property
    def key(self) -> str | None: ...
    @property
    def choice(self) -> Choice | None: ...
    @property
    def outcome(self) -> Outcome: ...
    @property
    def detail(self) -> str: ...
    @property
    def tls_version(self) -> str | None: ...
    @property
    def requests(self) -> int: ...


class RequestCounters:
    """Per-request counts of the connections served one key for one reason (a connection
    takes its set once, when its key is chosen: Evidence.counters_for): the relay reports
    through the connection's record (ConnectionRecord.response_relayed), which
    increments these directly, without a call deeper: it runs once per response."""

    __slots__ = ("latency", "latency_sum", "statuses")

    def __init__(self) -> None:
        self.statuses = [0] * _STATUS_CLASSES  # index: status // 100
        # index: bisect_right(LATENCY_BOUNDS, seconds); the last is above every bound
        self.latency = [0] * (len(LATENCY_BOUNDS) + 1)
        self.latency_sum = 0.0


@dataclass(frozen=True, slots=True)
class Sample:
    """Handshakes that reached a certificate, and how many of them look like pin failures."""

    completed: int = 0
    aborted: int = 0  # by the client, after our certificate
    no_request: int = 0  # completed, then closed without a request (and nothing refused)

    @property
    def handshakes(self) -> int:
        return self.completed + self.aborted

    @property
    def pin_failures(self) -> int:
        return self.aborted + self.no_request

    @property
    def share(self) -> float | None:
        """Pin failures per handshake; None without handshakes."""
        return self.pin_failures / self.handshakes if self.handshakes else None

    def __add__(self, other: Sample) -> Sample:
        return Sample(
            self.completed + other.completed,
            self.aborted + other.aborted,
            self.no_request + other.no_request,
        )


@dataclass(frozen=True, slots=True)
class Window:
    """Handshakes that reached a key's certificate in a span of time, and its pin failures."""

    handshakes: int = 0
    pin_failures: int = 0

    @property
    def share(self) -> float | None:
        return self.pin_failures / self.handshakes if self.handshakes else None


class CanaryJudge:
    """The canary's two samples since the start or the last resume, and its halt."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.halted = False
        self.halted_at: float | None = None
        self.why: str | None = None
        self.halts = 0  # since the process started
        self.resumes = 0  # of a halted canary, since the process started
        # Who halted it when another did (`follow`): a replica's name; None when this judge
        # decided, or the machine's supervisor did.
        self.by: str | None = None
        # False in a worker process: it counts, the supervisor's judge decides on the sums of
        # every worker (`add`) and tells each worker (`follow`): one decision per machine.
        self.decides = True
        # Called (no argument, nothing awaited) when this judge halts or an operator resumes
        # it, not when it follows: what shares the decision with other replicas wakes up.
        self.on_decision: Callable[[], None] | None = None
        # [completed, aborted, no_request] of each sample: plain ints, counted per connection.
        self._canary = [0, 0, 0]
        self._control = [0, 0, 0]

    @property
    def canary(self) -> Sample:
        """The new key's canary handshakes (reason canary)."""
        return Sample(*self._canary)

    @property
    def control(self) -> Sample:
        """The old key's hint-less handshakes (reason default)."""
        return Sample(*self._control)

    def log_e_value(self, rotation: Rotation) -> float:
        """The halt test's evidence now (rotation.canary.log_e_value)."""
        canary, control = self._canary, self._control
        return rules.log_e_value(
            canary[0] + canary[1],
            canary[1] + canary[2],
            control[0] + control[1],
            control[1] + control[2],
            rotation.canary_halt_margin,
        )

    def observe(self, reason: str, aborted: bool, quiet: bool, rotation: Rotation | None) -> None:
        """Count one handshake that reached a certificate (`reason`: a Reason), and apply the
        test after a canary handshake."""
        if self.halted or rotation is None or rotation.canary_percent <= 0:
            return
        if reason == _DEFAULT:
            counts = self._control
        elif reason == _CANARY:
            counts = self._canary
        else:
            return
        counts[1 if aborted else 0] += 1
        counts[2] += quiet
        if counts is self._control or not self.decides:
            return
        control = self._control
        if rules.halts(
            counts[0] + counts[1],
            counts[1] + counts[2],
            control[0] + control[1],
            control[1] + control[2],
            margin=rotation.canary_halt_margin,
            false_halt=rotation.canary_false_halt,
        ):
            canary, control_sample = self.canary, self.control
            self._halt(
                rotation,
                f"new key pin-failure share {percent(canary.share)} over {canary.handshakes}"
                f" canary handshakes vs old key {percent(control_sample.share)} over"
                f" {control_sample.handshakes}: more than"
                f" {rotation.canary_halt_margin * 100:g} points worse, at false-halt"
                f" probability {rotation.canary_false_halt:g}",
            )

    def add(self, canary: Sample, control: Sample, rotation: Rotation | None) -> None:
        """Count handshakes observed elsewhere (the workers' counts, summed by the
        supervisor), and apply the sequential test to the sums."""
        if self.halted or rotation is None or rotation.canary_percent <= 0:
            return
        for counts, sample in ((self._canary, canary), (self._control, control)):
            counts[0] += sample.completed
            counts[1] += sample.aborted
            counts[2] += sample.no_request
        if canary.handshakes and rules.halts(
            self._canary[0] + self._canary[1],
            self._canary[1] + self._canary[2],
            self._control[0] + self._control[1],
            self._control[1] + self._control[2],
            margin=rotation.canary_halt_margin,
            false_halt=rotation.canary_false_halt,
        ):
            summed, control_sample = self.canary, self.control
            self._halt(
                rotation,
                f"new key pin-failure share {percent(summed.share)} over {summed.handshakes}"
                f" canary handshakes vs old key {percent(control_sample.share)} over"
                f" {control_sample.handshakes}: more than"
                f" {rotation.canary_halt_margin * 100:g} points worse, at false-halt"
                f" probability {rotation.canary_false_halt:g}",
            )

    def follow(
        self, halted: bool, why: str | None, halted_at: float | None, by: str | None = None
    ) -> None:
        """Take the decision another judge made (a worker takes its supervisor's, a replica
        another replica's: `by`): halted with its reason, or running again with fresh
        samples. Logs nothing: the caller says whose decision it took."""
        if halted and not self.halted:
            self.halts += 1
        elif not halted and self.halted:
            self.resumes += 1
            self._canary = [0, 0, 0]
            self._control = [0, 0, 0]
        self.halted, self.why, self.halted_at = halted, why, halted_at
        self.by = by if halted else None

    def review_reports(
        self, rotation: Rotation | None, failing: Iterable[tuple[str, int]], in_window: bool
    ) -> None:
        """Halt when canary clients report an app version failing on the new key: `failing`
        holds (app version, distinct canary clients whose reports know no new pin), from
        pinning.reports.ReportCounts.canary_failures."""
        if (
            self.halted
            or not self.decides
            or rotation is None
            or rotation.canary_percent <= 0
            or not in_window
        ):
            return
        for version, clients in failing:
            if clients >= REPORT_HALT_CLIENTS:
                self._halt(
                    rotation,
                    f"app version {version} knows no pin of the new key: {clients} canary"
                    " clients reported its pin failures",
                )
                return

    def _halt(self, rotation: Rotation, why: str) -> None:
        self.halted = True
        self.halted_at = self._clock()
        self.halts += 1
        self.why = why
        self.by = None
        log.error(
            "CANARY HALTED: %s; hint-less clients get the default key (%s) again; resume with"
            " `dualproxy canary resume` once the cause is fixed",
            self.why,
            rotation.default,
        )
        if self.on_decision is not None:
            self.on_decision()

    def resume(self) -> bool:
        """Run the canary again with fresh samples; False when it was not halted."""
        was_halted = self.halted
        self.halted = False
        self.halted_at = None
        self.why = None
        self.by = None
        self._canary = [0, 0, 0]
        self._control = [0, 0, 0]
        if was_halted:
            self.resumes += 1
            log.warning("canary resumed by the operator; samples start from zero")
            if self.on_decision is not None:
                self.on_decision()
        return was_halted


def _window_id(rotation: Rotation) -> tuple[object, ...]:
    """What makes a window the same one across reloads (a changed max_breakage does not)."""
    return (rotation.old, rotation.new, rotation.grace_start, rotation.grace_end)


class WindowJudge:
    """A "when-safe" window's record: whether and when the evidence closed it, and the last
    verdict (see the module docstring). `closed` is read for every connection."""

    def __init__(self) -> None:
        self.closed = False
        self.closed_at: datetime | None = None
        # False in a worker process: the supervisor judges the window on every worker's sums
        # and tells each worker (`follow`), as it does the canary's halt.
        self.decides = True
        self.verdict: Verdict | None = None
        self.estimate: Breakage | None = None
        self._window: tuple[object, ...] | None = None
        self._held_logged: datetime | None = None

    def follow(self, closed: bool, closed_at: datetime | None) -> None:
        """Take the machine's decision (a worker: its supervisor's judge closed the window)."""
        self.closed, self.closed_at = closed, closed_at

    def review(
        self, rotation: Rotation | None, now: datetime, estimate: Breakage, canary_halted: bool
    ) -> Verdict | None:
        """Apply the closing rule at `now` and log what changed; None without a rotation, or
        in a process that follows another's decision."""
        if rotation is None or not self.decides:
            return None
        if self._window != _window_id(rotation):  # another rotation: its own record
            self._window = _window_id(rotation)
            self.closed, self.closed_at, self._held_logged = False, None, None
        verdict = rules.window_verdict(
            rotation,
            now,
            closed_at=self.closed_at,
            estimate=estimate,
            canary_halted=canary_halted,
        )
        previous = self.verdict.state if self.verdict is not None else None
        self.verdict, self.estimate = verdict, estimate
        if verdict.state == "held":
            if self._held_logged is None or (
                (now - self._held_logged).total_seconds() >= WINDOW_HELD_LOG_INTERVAL
            ):
                self._held_logged = now
                log.warning(
                    "grace window held open past grace_end (%s): %s; the old key stays the"
                    " default until it is safe, at the latest until grace_deadline (%s)",
                    format_time(rotation.grace_end),
                    verdict.why,
                    format_time(rotation.old_served_until),
                )
        elif verdict.state == "closed" and not self.closed:
            self.closed, self.closed_at = True, now
            log.warning(
                "grace window closed by the evidence: %s; every client gets the new key now",
                verdict.why,
            )
        elif verdict.state == "closed-at-deadline" and previous != "closed-at-deadline":
            log.warning(
                "grace window closed at grace_deadline (%s) whatever the evidence: up to %s of"
                " clients may fail on the new key (rotation.max_breakage %s)",
                format_time(rotation.old_served_until),
                f"{estimate.upper:.2%}",
                f"{rotation.max_breakage:.2%}",
            )
        return verdict


# One connection's place in the counts: (key, reason, outcome, handshake completed, pin failure).
_RowKey = RowKey


@dataclass(frozen=True, slots=True)
class Row:
    """Connections that ended alike, and the requests they carried."""

    key: str
    reason: str  # a Reason, or NONE_LABEL
    outcome: Outcome
    completed: bool
    pin_failure: bool
    connections: int
    requests: int

    @property
    def sample(self) -> Sample:
        """These connections as handshake evidence: aborted after our certificate, or
        completed (a pin failure too when nothing followed); neither otherwise."""
        if self.outcome == Outcome.CLIENT_ABORTED:
            return Sample(aborted=self.connections)
        if self.completed:
            quiet = self.connections if self.pin_failure else 0
            return Sample(completed=self.connections, no_request=quiet)
        return Sample()


@dataclass(frozen=True, slots=True)
class KeyFacts:
    """What the key snapshot says about a key (the admin listener's glue builds these)."""

    name: str
    role: str  # "old", "new", "single" or "standby" (configured, served by no identity)
    pin: str
    algorithm: str
    not_before: datetime
    not_after: datetime


@dataclass(frozen=True, slots=True)
class KeyStatus:
    facts: KeyFacts
    total: Sample  # since the process started
    last_24h: Window
    requests: int
    # per time bucket, oldest first, the last one being the current (partial) bucket
    handshakes_series: tuple[int, ...]
    failures_series: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class CanaryStatus:
    percent: float  # configured
    # "waiting" (before the window), "running", "halted", "over" (the window closed)
    state: CanaryState
    margin: float
    false_halt: float
    log_e_value: float  # the test's evidence; it halts at log(1 / false_halt)
    halted: bool
    halted_at: datetime | None
    why: str | None
    halts: int
    canary: Sample
    control: Sample
    # The replica whose halt this server took from the state folder's record (None: its own
    # evidence, or not halted).
    halted_by: str | None = None

    @property
    def sending(self) -> float:
        """The share of hint-less clients it sends to the new key now: the configured one
        while it runs, 0 otherwise."""
        return self.percent if self.state == "running" else 0.0

    @property
    def e_value(self) -> float:
        return math.exp(min(self.log_e_value, _MAX_LOG_E))

    @property
    def threshold(self) -> float:
        return 1 / self.false_halt


CanaryState = Literal["waiting", "running", "halted", "over"]
# e-values shown are capped here (exp would overflow a double past about 709).
_MAX_LOG_E: Final = 700.0


@dataclass(frozen=True, slots=True)
class WindowStatus:
    """How the window closes and what closing would break, at one instant: a "when-safe"
    window from start to end, an "at-grace-end" one while it is open (its operator learns
    before grace_end how many clients it will cost, not after)."""

    max_breakage: float
    deadline: datetime  # grace_deadline ("when-safe"); grace_end ("at-grace-end")
    state: str  # rotation.canary.Verdict.state
    why: str
    estimate: Breakage
    closed_at: datetime | None
    close: CloseRule = "when-safe"


@dataclass(frozen=True, slots=True)
class ResponseRow:
    """Responses and upstream latency of the connections served one key for one reason."""

    key: str
    reason: str
    responses: Mapping[str, int]  # "2xx": count
    latency_counts: tuple[int, ...]  # per LATENCY_BOUNDS bucket, then above the last
    latency_sum: float


@dataclass(frozen=True, slots=True)
class ConnectionCounts:
    """The connection limits of one server process and how close it is to them."""

    max_connections: int  # limits.max_connections
    max_per_client: int  # limits.max_connections_per_client
    open: int  # client connections open now
    idle: int  # of them, waiting for a request (reclaimed first at the limit)
    reclaimed: int  # idle connections closed at the limit to admit new clients, since start
    refused_per_client: int  # connections closed at once: their client held max_per_client
    # Processes that each hold those limits (the workers; 1 without): the machine admits
    # max_connections times this many.
    processes: int = 1

    def to_json(self) -> dict[str, int]:
        return {
            "processes": self.processes,
            "max_connections": self.max_connections,
            "max_connections_per_client": self.max_per_client,
            "open": self.open,
            "idle": self.idle,
            "reclaimed": self.reclaimed,
            "refused_per_client": self.refused_per_client,
        }


@dataclass(frozen=True, slots=True)
class Status:
    """Everything the surfaces show, at one instant."""

    now: datetime  # the policy's clock
    started: datetime
    phase: Phase
    rotation: Rotation | None
    keys: tuple[KeyStatus, ...]
    rows: tuple[Row, ...]
    response_rows: tuple[ResponseRow, ...]  # responses and upstream latency, per key and reason
    active_connections: int
    reloads_ok: int
    reloads_failed: int
    canary: CanaryStatus | None
    bucket_seconds: int
    series_start: datetime  # the start of the oldest bucket in the series
    # The connection limits and how close the server is to them (None: not a server's status).
    connections: ConnectionCounts | None
    # What apps reported about failed pins ([reports]; reports.ReportSummary), None without.
    pin_reports: ReportSummary | None = None
    # A "when-safe" window's close rule and estimate; None for close = "at-grace-end".
    window: WindowStatus | None = None

    @property
    def responses(self) -> dict[str, int]:
        """ "2xx": count, over every key."""
        total: dict[str, int] = {}
        for row in self.response_rows:
            for code_class, count in row.responses.items():
                total[code_class] = total.get(code_class, 0) + count
        return total

    @property
    def latency_counts(self) -> tuple[int, ...]:
        """Upstream latencies per LATENCY_BOUNDS bucket, then above the last, over every key."""
        counts = [0] * (len(LATENCY_BOUNDS) + 1)
        for row in self.response_rows:
            counts = [a + b for a, b in zip(counts, row.latency_counts, strict=True)]
        return tuple(counts)

    @property
    def latency_sum(self) -> float:
        return sum(row.latency_sum for row in self.response_rows)

    def to_json(self) -> dict[str, object]:
        """The /status.json document (schema 1; see the README)."""
        rotation = self.rotation
        return {
            "schema": 1,
            "now": format_time(self.now),
            "started": format_time(self.started),
            "phase": self.phase,
            "rotation": None
            if rotation is None
            else {
                "old": list(rotation.old),
                "new": list(rotation.new),
                "grace_start": format_time(rotation.grace_start),
                "grace_end": format_time(rotation.grace_end),
                "default": rotation.default,
                "canary_percent": rotation.canary_percent,
                "close": rotation.close,
                "max_breakage": rotation.max_breakage if rotation.close == "when-safe" else None,
                "grace_deadline": format_time(rotation.grace_deadline)
                if rotation.grace_deadline is not None
                else None,
            },
            "canary": None if self.canary is None else _canary_json(self.canary),
            "window": None if self.window is None else _window_json(self.window),
            "keys": [_key_json(k) for k in self.keys],
            "connections": [
                {
                    "key": r.key,
                    "reason": r.reason,
                    "outcome": r.outcome,
                    "handshake_completed": r.completed,
                    "pin_failure": r.pin_failure,
                    "connections": r.connections,
                    "requests": r.requests,
                }
                for r in self.rows
            ],
            "responses": dict(self.responses),
            "upstream_latency": {
                "bounds": list(LATENCY_BOUNDS),
                "counts": list(self.latency_counts),
                "sum": self.latency_sum,
            },
            "responses_by_key": [
                {
                    "key": r.key,
                    "reason": r.reason,
                    "responses": dict(r.responses),
                    "upstream_latency": {"counts": list(r.latency_counts), "sum": r.latency_sum},
                }
                for r in self.response_rows
            ],
            "active_connections": self.active_connections,
            "connection_limits": (
                self.connections.to_json() if self.connections is not None else None
            ),
            "reloads": {"ok": self.reloads_ok, "failed": self.reloads_failed},
            "series": {
                "bucket_seconds": self.bucket_seconds,
                "start": format_time(self.series_start),
                "buckets": SERIES_BUCKETS,
            },
            "pin_reports": self.pin_reports,
        }


class _Timeline:
    """One key's handshakes and pin failures per time bucket, in a ring of a day."""

    __slots__ = ("failures", "handshakes")

    def __init__(self) -> None:
        self.handshakes = [0] * SERIES_BUCKETS
        self.failures = [0] * SERIES_BUCKETS


class Evidence:
    """A server's counts since it started; see the module docstring."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        bucket_seconds: int = BUCKET_SECONDS,
    ) -> None:
        self._clock = clock
        self._bucket_seconds = bucket_seconds
        self.started = clock()
        self._request_counters: dict[tuple[str, str], RequestCounters] = {}
        self.canary = CanaryJudge(clock)
        self.window = WindowJudge()
        self._rows: dict[_RowKey, list[int]] = {}  # [connections, requests]
        self._timelines: dict[str, _Timeline] = {}
        # The bucket number each ring slot holds now; a slot is cleared when time reuses it.
        self._slot_bucket = [-1] * SERIES_BUCKETS

    def counters_for(self, key: str, reason: str) -> RequestCounters:
        """The per-request counts of connections served `key` for `reason`; a connection
        takes them once, so that counting a response costs no lookup. Bounded: keys and
        reasons come from the config and the policy."""
        counters = self._request_counters.get((key, reason))
        if counters is None:
            counters = self._request_counters[key, reason] = RequestCounters()
        return counters

    def connection_ended(self, record: FinishedConnection, rotation: Rotation | None) -> None:
        """Count a finished connection; `rotation` is the config's current (for the canary)."""
        # The enum members as they are: a StrEnum member is a str (hashed and compared by
        # str's own C code), equal to its value as a key or a label.
        key = record.key or NONE_LABEL
        choice = record.choice
        reason: str = choice.reason if choice is not None else NONE_LABEL
        outcome = record.outcome
        completed = record.tls_version is not None
        aborted = outcome is _CLIENT_ABORTED
        quiet = outcome is _NO_REQUEST and not record.detail
        row_key = (key, reason, outcome, completed, aborted or quiet)
        row = self._rows.get(row_key)
        if row is None:
            row = self._rows[row_key] = [0, 0]
        row[0] += 1
        row[1] += record.requests
        if record.key is None or not (completed or aborted):
            return
        failure = aborted or quiet
        bucket = int(self._clock() // self._bucket_seconds)
        slot = bucket % SERIES_BUCKETS
        if self._slot_bucket[slot] != bucket:
            self._slot_bucket[slot] = bucket
            for stale in self._timelines.values():
                stale.handshakes[slot] = stale.failures[slot] = 0
        timeline = self._timelines.get(key)
        if timeline is None:
            timeline = self._timelines[key] = _Timeline()
        timeline.handshakes[slot] += 1
        timeline.failures[slot] += failure
        if reason is _CANARY or reason is _DEFAULT:
            self.canary.observe(reason, aborted, quiet, rotation)

    # --- several processes ------------------------------------------------------------

    def tally(self) -> Tally:
        """Every count so far as plain data (a worker's, diffed and sent to its supervisor:
        serve.worker); a few microseconds per key, never per request."""
        rows = {k: (counts[0], counts[1]) for k, counts in self._rows.items()}
        responses = {
            k: (tuple(c.statuses), tuple(c.latency), c.latency_sum)
            for k, c in self._request_counters.items()
        }
        buckets: dict[tuple[str, int], tuple[int, int]] = {}
        for key, timeline in self._timelines.items():
            for slot, bucket in enumerate(self._slot_bucket):
                if bucket >= 0 and (timeline.handshakes[slot] or timeline.failures[slot]):
                    buckets[key, bucket] = (timeline.handshakes[slot], timeline.failures[slot])
        canary, control = self.canary.canary, self.canary.control
        return Tally(
            rows,
            responses,
            buckets,
            (canary.completed, canary.aborted, canary.no_request),
            (control.completed, control.aborted, control.no_request),
        )

    def add(self, tally: Tally, rotation: Rotation | None) -> None:
        """Add counts made elsewhere (a worker's, as a difference of two tallies) to these,
        the canary's samples included (its rule then judges the sums)."""
        for row_key, (connections, requests) in tally.rows.items():
            row = self._rows.get(row_key)
            if row is None:
                row = self._rows[row_key] = [0, 0]
            row[0] += connections
            row[1] += requests
        for (key, reason), (statuses, latency, latency_sum) in tally.responses.items():
            counters = self.counters_for(key, reason)
            for index, count in enumerate(statuses[: len(counters.statuses)]):
                counters.statuses[index] += count
            for index, count in enumerate(latency[: len(counters.latency)]):
                counters.latency[index] += count
            counters.latency_sum += latency_sum
        for (key, bucket), (handshakes, failures) in tally.buckets.items():
            slot = bucket % SERIES_BUCKETS
            held = self._slot_bucket[slot]
            if held > bucket:
                continue  # a day old: the ring holds a newer bucket there
            if held != bucket:
                self._slot_bucket[slot] = bucket
                for stale in self._timelines.values():
                    stale.handshakes[slot] = stale.failures[slot] = 0
            timeline = self._timelines.get(key)
            if timeline is None:
                timeline = self._timelines[key] = _Timeline()
            timeline.handshakes[slot] += handshakes
            timeline.failures[slot] += failures
        self.canary.add(Sample(*tally.canary), Sample(*tally.control), rotation)

    # --- the window ----------------------------------------------------------------------

    def breakage(self, rotation: Rotation) -> Breakage:
        """What closing the window now would break (rotation.canary.breakage): the canary's
        samples, and the handshakes since the start by who would change key at the close."""
        sampled = unsampled = unaffected = 0
        for (key, reason, outcome, completed, _), counts in self._rows.items():
            if not (completed or outcome is _CLIENT_ABORTED):
                continue
            if reason in (_DEFAULT, _CANARY):
                sampled += counts[0]
            elif reason in _WINDOW_REASONS:
                # Hinted (or unparsed) clients on the old key change key at the close, unseen.
                if key in rotation.old or reason == Reason.UNPARSED:
                    unsampled += counts[0]
                else:
                    unaffected += counts[0]
        canary, control = self.canary.canary, self.canary.control
        return rules.breakage(
            (canary.handshakes, canary.pin_failures),
            (control.handshakes, control.pin_failures),
            sampled=sampled,
            unsampled=unsampled,
            unaffected=unaffected,
            error=WINDOW_BOUND_ERROR,
        )

    def review_window(self, rotation: Rotation | None, now: datetime) -> Verdict | None:
        """Apply a "when-safe" window's closing rule at `now` (the policy's clock): what the
        serving layer calls every second. None without such a window."""
        if rotation is None or rotation.close != "when-safe" or now < rotation.grace_end:
            return None
        return self.window.review(rotation, now, self.breakage(rotation), self.canary.halted)

    # --- reading -----------------------------------------------------------------------

    def status(
        self,
        *,
        now: datetime,
        phase: Phase,
        rotation: Rotation | None,
        keys: Sequence[KeyFacts],
        active_connections: int,
        reloads_ok: int,
        reloads_failed: int,
        pin_reports: ReportSummary | None = None,
        connections: ConnectionCounts | None = None,
    ) -> Status:
        """A consistent picture of the counts (called at scrape time, never per request).

        `now` and `phase` are the policy's (the server's clock); the time buckets follow this
        object's own clock, the same in production.
        """
        wall = self._clock()
        rows = tuple(
            Row(k[0], k[1], k[2], k[3], k[4], counts[0], counts[1])
            for k, counts in sorted(self._rows.items())
        )
        last_bucket = int(wall // self._bucket_seconds)
        first_bucket = last_bucket - SERIES_BUCKETS + 1
        statuses: list[KeyStatus] = []
        for facts in keys:
            total, requests = _total(rows, facts.name)
            handshakes, failures = self._series(facts.name, first_bucket)
            statuses.append(
                KeyStatus(
                    facts=facts,
                    total=total,
                    last_24h=Window(sum(handshakes), sum(failures)),
                    requests=requests,
                    handshakes_series=handshakes,
                    failures_series=failures,
                )
            )
        response_rows = tuple(
            ResponseRow(
                key,
                reason,
                _classes(counters.statuses),
                tuple(counters.latency),
                counters.latency_sum,
            )
            for (key, reason), counters in sorted(self._request_counters.items())
            if any(counters.statuses)
        )
        canary = None
        if rotation is not None and (rotation.canary_percent > 0 or self.canary.halts):
            judge = self.canary
            state: CanaryState = (
                "waiting"
                if phase == "before"
                else "over"
                if phase == "after"
                else "halted"
                if judge.halted
                else "running"
            )
            canary = CanaryStatus(
                percent=rotation.canary_percent,
                state=state,
                margin=rotation.canary_halt_margin,
                false_halt=rotation.canary_false_halt,
                log_e_value=judge.log_e_value(rotation),
                halted=judge.halted,
                halted_at=_utc(judge.halted_at) if judge.halted_at is not None else None,
                why=judge.why,
                halts=judge.halts,
                canary=judge.canary,
                control=judge.control,
                halted_by=judge.by if judge.halted else None,
            )
        window = None
        if rotation is not None and (rotation.close == "when-safe" or phase == "during"):
            judge_window = self.window
            estimate = self.breakage(rotation)
            verdict = rules.window_verdict(
                rotation,
                now,
                closed_at=judge_window.closed_at if judge_window.closed else None,
                estimate=estimate,
                canary_halted=self.canary.halted,
            )
            window = WindowStatus(
                max_breakage=rotation.max_breakage,
                deadline=rotation.old_served_until,
                state=verdict.state,
                why=verdict.why,
                estimate=estimate,
                closed_at=judge_window.closed_at,
                close=rotation.close,
            )
        return Status(
            now=now,
            started=_utc(self.started),
            phase=phase,
            rotation=rotation,
            keys=tuple(statuses),
            rows=rows,
            response_rows=response_rows,
            active_connections=active_connections,
            connections=connections,
            reloads_ok=reloads_ok,
            reloads_failed=reloads_failed,
            canary=canary,
            bucket_seconds=self._bucket_seconds,
            series_start=_utc(first_bucket * self._bucket_seconds),
            pin_reports=pin_reports,
            window=window,
        )

    def _series(self, key: str, first_bucket: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        timeline = self._timelines.get(key)
        if timeline is None:
            empty = (0,) * SERIES_BUCKETS
            return empty, empty
        handshakes: list[int] = []
        failures: list[int] = []
        for bucket in range(first_bucket, first_bucket + SERIES_BUCKETS):
            slot = bucket % SERIES_BUCKETS
            current = self._slot_bucket[slot] == bucket  # else a slot from a day ago, or none
            handshakes.append(timeline.handshakes[slot] if current else 0)
            failures.append(timeline.failures[slot] if current else 0)
        return tuple(handshakes), tuple(failures)


def _total(rows: Sequence[Row], key: str) -> tuple[Sample, int]:
    mine = [row for row in rows if row.key == key]
    return sum((row.sample for row in mine), Sample()), sum(row.requests for row in mine)


def _classes(statuses: Sequence[int]) -> dict[str, int]:
    """{"2xx": count, ...} for the classes with responses."""
    return {f"{index}xx": count for index, count in enumerate(statuses) if count}


def percent(share: float | None) -> str:
    """A pin-failure share as people read it: "12.5%", "-" without handshakes."""
    return "-" if share is None else f"{share * 100:.1f}%"


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def _sample_json(sample: Sample) -> dict[str, object]:
    return {
        "handshakes": sample.handshakes,
        "completed": sample.completed,
        "aborted": sample.aborted,
        "no_request": sample.no_request,
        "pin_failures": sample.pin_failures,
        "pin_failure_share": sample.share,
    }


def _key_json(status: KeyStatus) -> dict[str, object]:
    facts = status.facts
    last = status.last_24h
    return {
        "name": facts.name,
        "role": facts.role,
        "pin": f"sha256/{facts.pin}",
        "algorithm": facts.algorithm,
        "not_before": format_time(facts.not_before),
        "not_after": format_time(facts.not_after),
        "total": _sample_json(status.total),
        "last_24h": {
            "handshakes": last.handshakes,
            "pin_failures": last.pin_failures,
            "pin_failure_share": last.share,
        },
        "requests": status.requests,
        "series": {
            "handshakes": list(status.handshakes_series),
            "pin_failures": list(status.failures_series),
        },
    }


def _canary_json(canary: CanaryStatus) -> dict[str, object]:
    return {
        "percent": canary.percent,
        "state": canary.state,
        "sending_percent": canary.sending,
        "min_sample": None,  # replaced by the sequential test (false_halt, e_value)
        "halt_margin": canary.margin,
        "false_halt": canary.false_halt,
        "e_value": canary.e_value,
        "halt_threshold": canary.threshold,
        "halted": canary.halted,
        "halted_at": format_time(canary.halted_at) if canary.halted_at is not None else None,
        "why": canary.why,
        "halted_by": canary.halted_by,
        "halts": canary.halts,
        "canary_sample": _sample_json(canary.canary),
        "control_sample": _sample_json(canary.control),
    }


def _breakage_json(estimate: Breakage) -> dict[str, object]:
    return {
        "estimate": estimate.estimate,
        "upper": estimate.upper,
        "sampled_share": estimate.sampled,
        "unsampled_share": estimate.unsampled,
        "handshakes": estimate.handshakes,
    }


def _window_json(window: WindowStatus) -> dict[str, object]:
    when_safe = window.close == "when-safe"
    return {
        "close": window.close,
        "state": window.state,
        "why": window.why,
        "max_breakage": window.max_breakage if when_safe else None,
        "grace_deadline": format_time(window.deadline) if when_safe else None,
        "closed_at": format_time(window.closed_at) if window.closed_at is not None else None,
        "breakage": _breakage_json(window.estimate),
    }
