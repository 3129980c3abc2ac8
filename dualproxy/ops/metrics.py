"""The evidence as Prometheus metrics, built at scrape time.

Nothing here runs per request or per connection: `EvidenceCollector.collect` asks for one
`evidence.Status` when Prometheus scrapes and turns it into metric families, which
prometheus_client writes in its exposition format. The registry is our own (not the global
one), so a test process can run several servers and each exposes only its own counts.

The names, labels and meanings are listed in the README ("Evidence and the admin listener").
Labels: `key` is a [keys.NAME] name ("-" for connections that ended before a key was chosen),
`reason` a policy.Reason value ("-" likewise), `outcome` a tls.outcome.Outcome value.
"""

from __future__ import annotations

import typing
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Final

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from dualproxy.ops.evidence import LATENCY_BOUNDS, NONE_LABEL, CanaryState, Sample, Status
from dualproxy.rotation.policy import Phase
from dualproxy.tls.outcome import Outcome

__all__ = ["CONTENT_TYPE", "EvidenceCollector", "exposition", "families", "registry_for"]

CONTENT_TYPE: Final = CONTENT_TYPE_LATEST
_PHASES: Final = typing.get_args(Phase)
_CANARY_STATES: Final = typing.get_args(CanaryState)
# App versions exported as labels of dualproxy_pin_reports_old_pin_only: their names come from
# clients, so the series are bounded to the versions that matter (the most reports first).
OLD_ONLY_VERSIONS_EXPORTED: Final = 20
# The histogram's bucket labels: LATENCY_BOUNDS as Prometheus writes them, then +Inf.
_LATENCY_LABELS: Final = (*(repr(bound) for bound in LATENCY_BOUNDS), "+Inf")


class EvidenceCollector(Collector):
    """A prometheus_client collector over a server's evidence (see the module docstring)."""

    def __init__(self, source: Callable[[], Status]) -> None:
        self._source = source

    def collect(self) -> Iterable[Metric]:
        return families(self._source())


def registry_for(source: Callable[[], Status]) -> CollectorRegistry:
    """A private registry holding only the evidence collector."""
    # auto_describe=False: registering would otherwise collect once, to learn the names.
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EvidenceCollector(source))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The /metrics body (Prometheus text format 0.0.4)."""
    return generate_latest(registry)


def _connection_limits(status: Status) -> list[Metric]:
    """The connection limits and how close the server is to them (serve.admission)."""
    counts = status.connections
    if counts is None:
        return []
    limit = GaugeMetricFamily(
        "dualproxy_connection_limit",
        "The configured connection limits: per process (max_connections), for the machine"
        " (times the worker processes) and per client.",
        labels=["scope"],
    )
    limit.add_metric(["process"], counts.max_connections)
    limit.add_metric(["machine"], counts.max_connections * counts.processes)
    limit.add_metric(["client"], counts.max_per_client)
    return [
        limit,
        GaugeMetricFamily(
            "dualproxy_idle_connections",
            "Client connections open now that wait for a request (reclaimed first at the limit).",
            value=counts.idle,
        ),
        CounterMetricFamily(
            "dualproxy_connections_reclaimed",
            "Idle connections closed at max_connections to admit new clients.",
            value=counts.reclaimed,
        ),
    ]


def families(status: Status) -> list[Metric]:
    """Every metric family, from one status."""
    connections = CounterMetricFamily(
        "dualproxy_connections",
        "Connections ended, by the key served, why it was chosen, and how they ended.",
        labels=["key", "reason", "outcome"],
    )
    handshakes = CounterMetricFamily(
        "dualproxy_handshakes",
        "TLS handshakes that reached our certificate: completed, or aborted by the client.",
        labels=["key", "reason", "result"],
    )
    failures = CounterMetricFamily(
        "dualproxy_pin_failures",
        "Handshakes that look like a pin failure: aborted by the client after our"
        " certificate, or completed and closed without a request.",
        labels=["key", "reason", "kind"],
    )
    requests = CounterMetricFamily(
        "dualproxy_requests",
        "Requests received, by the key their connection was served.",
        labels=["key", "reason"],
    )
    by_outcome: dict[tuple[str, str, str], int] = defaultdict(int)
    by_result: dict[tuple[str, str, str], int] = defaultdict(int)
    by_kind: dict[tuple[str, str, str], int] = defaultdict(int)
    by_reason: dict[tuple[str, str], int] = defaultdict(int)
    for row in status.rows:
        by_outcome[row.key, row.reason, row.outcome] += row.connections
        if row.key != NONE_LABEL:
            by_reason[row.key, row.reason] += row.requests
        aborted = row.outcome == Outcome.CLIENT_ABORTED
        if row.completed or aborted:
            result = "completed" if row.completed else "aborted"
            by_result[row.key, row.reason, result] += row.connections
        if row.pin_failure:
            kind = "aborted" if aborted else "no_request"
            by_kind[row.key, row.reason, kind] += row.connections
    for labels, value in by_outcome.items():
        connections.add_metric(list(labels), value)
    for labels, value in by_result.items():
        handshakes.add_metric(list(labels), value)
    for labels, value in by_kind.items():
        failures.add_metric(list(labels), value)
    for pair, value in by_reason.items():
        requests.add_metric(list(pair), value)

    share = GaugeMetricFamily(
        "dualproxy_pin_failure_share",
        "Pin failures per handshake that reached the key's certificate (absent without any),"
        " since the process started or over the last 24 hours.",
        labels=["key", "window"],
    )
    not_after = GaugeMetricFamily(
        "dualproxy_certificate_not_after_timestamp_seconds",
        "When the key's certificate expires (Unix time).",
        labels=["key", "role"],
    )
    not_before = GaugeMetricFamily(
        "dualproxy_certificate_not_before_timestamp_seconds",
        "When the key's certificate became valid (Unix time).",
        labels=["key", "role"],
    )
    for key in status.keys:
        name, role = key.facts.name, key.facts.role
        for window, ratio in (("since_start", key.total.share), ("24h", key.last_24h.share)):
            if ratio is not None:
                share.add_metric([name, window], ratio)
        not_after.add_metric([name, role], key.facts.not_after.timestamp())
        not_before.add_metric([name, role], key.facts.not_before.timestamp())

    responses = CounterMetricFamily(
        "dualproxy_responses",
        "Responses sent to clients, relayed or our own (refusals, 502, 504), by the key their"
        " connection was served, why it was chosen, and status class.",
        labels=["key", "reason", "code_class"],
    )
    latency = HistogramMetricFamily(
        "dualproxy_upstream_response_seconds",
        "From the request sent upstream to the upstream's response head, by the key the"
        " client's connection was served and why it was chosen.",
        labels=["key", "reason"],
    )
    for answered in status.response_rows:
        key_reason = [answered.key, answered.reason]
        for code_class, count in sorted(answered.responses.items()):
            responses.add_metric([*key_reason, code_class], count)
        cumulative: list[tuple[str, float]] = []
        running = 0
        for label, count in zip(_LATENCY_LABELS, answered.latency_counts, strict=True):
            running += count
            cumulative.append((label, running))
        latency.add_metric(key_reason, cumulative, sum_value=answered.latency_sum)

    phase = GaugeMetricFamily(
        "dualproxy_rotation_phase",
        "1 for the rotation's current phase: single (no rotation), before, during or after"
        " the grace window.",
        labels=["phase"],
    )
    for name in _PHASES:
        phase.add_metric([name], 1.0 if status.phase == name else 0.0)
    out: list[Metric] = [
        connections,
        handshakes,
        failures,
        requests,
        share,
        responses,
        latency,
        GaugeMetricFamily(
            "dualproxy_active_connections",
            "Client connections open now.",
            value=status.active_connections,
        ),
        *_connection_limits(status),
        not_after,
        not_before,
        phase,
    ]
    reloads = CounterMetricFamily(
        "dualproxy_reloads", "Reloads of the config and key files.", labels=["result"]
    )
    reloads.add_metric(["ok"], status.reloads_ok)
    reloads.add_metric(["failed"], status.reloads_failed)
    out.append(reloads)
    if status.rotation is not None:
        edges = [("start", status.rotation.grace_start), ("end", status.rotation.grace_end)]
        if status.rotation.grace_deadline is not None:
            edges.append(("deadline", status.rotation.grace_deadline))
        for edge, moment in edges:
            out.append(
                GaugeMetricFamily(
                    f"dualproxy_rotation_grace_{edge}_timestamp_seconds",
                    f"The grace window's {edge} (Unix time).",
                    value=moment.timestamp(),
                )
            )
    canary = status.canary
    if canary is not None:
        state = GaugeMetricFamily(
            "dualproxy_canary_state",
            "1 for the canary's state: waiting (before the window), running, halted, over"
            " (the window closed).",
            labels=["state"],
        )
        for name in _CANARY_STATES:
            state.add_metric([name], 1.0 if canary.state == name else 0.0)
        out += [
            GaugeMetricFamily(
                "dualproxy_canary_percent",
                "Share of hint-less clients the canary sends to the new key now: the"
                " configured share while it runs, 0 before and after the window and while"
                " halted.",
                value=canary.sending,
            ),
            state,
            GaugeMetricFamily(
                "dualproxy_canary_e_value",
                "The halt test's evidence against 'the new key costs at most the margin'; the"
                " canary halts once it reaches dualproxy_canary_halt_threshold.",
                value=canary.e_value,
            ),
            GaugeMetricFamily(
                "dualproxy_canary_halt_threshold",
                "1 / rotation.canary_false_halt: the e-value at which the canary halts.",
                value=canary.threshold,
            ),
            GaugeMetricFamily(
                "dualproxy_canary_halted",
                "1 while the canary is halted (until `dualproxy canary resume`).",
                value=1.0 if canary.halted else 0.0,
            ),
            GaugeMetricFamily(
                "dualproxy_canary_halted_by_replica",
                "1 while the canary is halted by another replica's decision, taken from the"
                " state folder's halt record ([state] dir); 0 while it is halted by this"
                " server's own evidence, or runs.",
                value=1.0 if canary.halted_by is not None else 0.0,
            ),
            CounterMetricFamily(
                "dualproxy_canary_halts",
                "Times the canary halted itself since the process started.",
                value=canary.halts,
            ),
        ]
        sample_handshakes = GaugeMetricFamily(
            "dualproxy_canary_sample_handshakes",
            "The halt rule's samples since the start or the last resume: canary (new key,"
            " reason canary) and control (old key, reason default).",
            labels=["group"],
        )
        sample_failures = GaugeMetricFamily(
            "dualproxy_canary_sample_pin_failures",
            "Pin failures in the halt rule's samples.",
            labels=["group"],
        )
        groups: tuple[tuple[str, Sample], ...] = (
            ("canary", canary.canary),
            ("control", canary.control),
        )
        for group, sample in groups:
            sample_handshakes.add_metric([group], sample.handshakes)
            sample_failures.add_metric([group], sample.pin_failures)
        out += [sample_handshakes, sample_failures]
    out += _window_families(status)
    return out


def _window_families(status: Status) -> list[Metric]:
    """The window's estimate (a "when-safe" window's from start to end, an "at-grace-end"
    one's while open) and hold, and the app versions that know only the old key's pins
    (from pin-failure reports)."""
    out: list[Metric] = []
    window = status.window
    if window is not None:
        estimate = window.estimate
        out += [
            GaugeMetricFamily(
                "dualproxy_window_held",
                "1 while a close = when-safe window is held open past grace_end.",
                value=1.0 if window.state == "held" else 0.0,
            ),
            GaugeMetricFamily(
                "dualproxy_window_breakage_upper",
                "Upper bound on the share of handshakes that would fail if the window closed"
                " now (valid at any moment with probability 0.99).",
                value=estimate.upper,
            ),
        ]
        if window.close == "when-safe":
            out.append(
                GaugeMetricFamily(
                    "dualproxy_window_max_breakage",
                    "rotation.max_breakage: the window closes once the upper bound is within it.",
                    value=window.max_breakage,
                )
            )
        if estimate.estimate is not None:
            out.append(
                GaugeMetricFamily(
                    "dualproxy_window_breakage_estimate",
                    "Estimated share of handshakes that would fail if the window closed now.",
                    value=estimate.estimate,
                )
            )
    reports = status.pin_reports
    if reports is not None and status.rotation is not None:
        versions = reports["old_pin_only"]
        out.append(
            GaugeMetricFamily(
                "dualproxy_pin_reports_old_pin_only_versions",
                "App versions whose pin-failure reports know only the old keys' pins.",
                value=len(versions),
            )
        )
        reported = GaugeMetricFamily(
            "dualproxy_pin_reports_old_pin_only",
            "Pin-failure reports of an app version that knows only the old keys' pins (the"
            f" {OLD_ONLY_VERSIONS_EXPORTED} with most reports: labels are the apps' own).",
            labels=["app", "version", "platform"],
        )
        for version in versions[:OLD_ONLY_VERSIONS_EXPORTED]:
            reported.add_metric(
                [version["app"], version["version"], version["platform"]], version["count"]
            )
        out.append(reported)
    return out
