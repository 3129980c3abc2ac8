"""evidence.py without a server: the pin-failure arithmetic, the time buckets on a fake clock,
and the canary's halt rule, each positive case next to the negative one."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Final

import pytest
from helpers.rotation import GRACE_END, GRACE_START, grace_window

from dualproxy.config.schema import IdentityName, Rotation
from dualproxy.ops.evidence import (
    BUCKET_SECONDS,
    SERIES_BUCKETS,
    CanaryJudge,
    Evidence,
    KeyFacts,
    Row,
    Sample,
    Status,
)
from dualproxy.rotation import canary as rules
from dualproxy.rotation.canary import REPORT_HALT_CLIENTS
from dualproxy.rotation.policy import Choice, Phase, Reason
from dualproxy.tls.outcome import Outcome

ROTATION: Final = grace_window(canary_percent=10.0, canary_halt_margin=0.05)
NO_CANARY: Final = replace(ROTATION, canary_percent=0.0)
# A wall-clock instant on a bucket boundary, inside the window.
T0: Final = datetime(2026, 12, 10, tzinfo=UTC).timestamp()


@dataclass
class Finished:
    """A finished connection as the server's ConnectionRecord describes it."""

    key: str | None
    choice: Choice | None
    outcome: Outcome
    detail: str = ""
    tls_version: str | None = None
    requests: int = 0


def ok(key: str, identity: IdentityName, reason: Reason, requests: int = 1) -> Finished:
    return Finished(
        key, Choice(identity, reason), Outcome.OK, tls_version="TLSv1.3", requests=requests
    )


def aborted(key: str, identity: IdentityName, reason: Reason) -> Finished:
    return Finished(key, Choice(identity, reason), Outcome.CLIENT_ABORTED, detail="bad_certificate")


def no_request(key: str, identity: IdentityName, reason: Reason, detail: str = "") -> Finished:
    return Finished(
        key, Choice(identity, reason), Outcome.NO_REQUEST, detail, tls_version="TLSv1.3"
    )


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def facts(name: str, role: str) -> KeyFacts:
    return KeyFacts(name, role, "pin" + name, "ECDSA P-256", GRACE_START, GRACE_END)


def status_of(
    evidence: Evidence,
    rotation: Rotation | None = ROTATION,
    now: datetime = datetime(2026, 12, 10, tzinfo=UTC),
) -> Status:
    return evidence.status(
        now=now,
        phase="during",
        rotation=rotation,
        keys=[facts("k2026a", "old"), facts("k2026b", "new")],
        active_connections=0,
        reloads_ok=0,
        reloads_failed=0,
    )


# --- the share ------------------------------------------------------------------------------


def test_sample_share_counts_aborted_and_quiet_handshakes_over_all_that_reached_the_key() -> None:
    sample = Sample(completed=8, aborted=2, no_request=3)
    assert sample.handshakes == 10
    assert sample.pin_failures == 5
    assert sample.share == 0.5
    assert Sample().share is None  # no handshakes: no share, not zero
    assert sample + Sample(completed=2) == Sample(completed=10, aborted=2, no_request=3)


def test_each_connection_counts_against_its_key_and_reason() -> None:
    evidence = Evidence(clock=FakeClock(T0))
    evidence.connection_ended(ok("k2026a", "old", Reason.DEFAULT, requests=3), ROTATION)
    evidence.connection_ended(aborted("k2026b", "new", Reason.HINT_SNI), ROTATION)
    evidence.connection_ended(no_request("k2026b", "new", Reason.HINT_SNI), ROTATION)
    evidence.connection_ended(ok("k2026b", "new", Reason.HINT_SNI), ROTATION)
    # A refused first request is no pin failure, though no request got through.
    evidence.connection_ended(
        no_request("k2026a", "old", Reason.DEFAULT, detail="400 bad head"), ROTATION
    )
    # Before any key: counted as a connection, never as a handshake.
    evidence.connection_ended(Finished(None, None, Outcome.NO_HELLO), ROTATION)
    status = status_of(evidence)
    old, new = status.keys
    assert old.total == Sample(completed=2, aborted=0, no_request=0)
    assert old.requests == 3
    assert new.total == Sample(completed=2, aborted=1, no_request=1)
    assert new.total.share == pytest.approx(2 / 3)
    # Looked up by the values as plain strings: the members are those strings.
    by_row: dict[tuple[str, str, str], Row] = {(r.key, r.reason, r.outcome): r for r in status.rows}
    assert by_row["k2026b", "hint-sni", "client-aborted"].pin_failure
    assert by_row["k2026b", "hint-sni", "no-request"].pin_failure
    assert not by_row["k2026a", "default", "no-request"].pin_failure
    assert not by_row["k2026a", "default", "ok"].pin_failure
    assert by_row["-", "-", "no-hello"].connections == 1
    assert not by_row["-", "-", "no-hello"].completed
    assert old.last_24h.handshakes == 2
    assert new.last_24h.pin_failures == 2


# --- the time buckets -----------------------------------------------------------------------


def test_buckets_fill_in_order_and_roll_over_after_a_day() -> None:
    clock = FakeClock(T0)
    evidence = Evidence(clock=clock)
    evidence.connection_ended(aborted("k2026b", "new", Reason.CANARY), NO_CANARY)
    clock.now += BUCKET_SECONDS
    for _ in range(3):
        evidence.connection_ended(ok("k2026b", "new", Reason.CANARY), NO_CANARY)
    new = status_of(evidence).keys[1]
    assert new.handshakes_series[-2:] == (1, 3)
    assert new.failures_series[-2:] == (1, 0)
    assert sum(new.handshakes_series) == 4
    assert len(new.handshakes_series) == SERIES_BUCKETS

    # 23 h 45 min later the first bucket is the oldest one shown; a bucket later it is gone,
    # also while no connection came to reuse its slot.
    clock.now = T0 + (SERIES_BUCKETS - 1) * BUCKET_SECONDS
    new = status_of(evidence).keys[1]
    assert new.handshakes_series[:2] == (1, 3)
    assert new.last_24h.handshakes == 4
    clock.now += BUCKET_SECONDS
    new = status_of(evidence).keys[1]
    assert new.handshakes_series[0] == 3
    assert new.last_24h.pin_failures == 0
    # A connection in the slot that held the first bucket clears it for every key.
    evidence.connection_ended(ok("k2026a", "old", Reason.DEFAULT), NO_CANARY)
    old, new = status_of(evidence).keys
    assert old.handshakes_series[-1] == 1
    assert new.handshakes_series[-1] == 0
    assert new.total.handshakes == 4  # the totals since start keep everything


def test_series_start_is_the_oldest_bucket_boundary() -> None:
    evidence = Evidence(clock=FakeClock(T0 + 100))
    status = status_of(evidence)
    assert status.series_start.timestamp() == T0 - (SERIES_BUCKETS - 1) * BUCKET_SECONDS
    assert status.keys[0].handshakes_series == (0,) * SERIES_BUCKETS


# --- the canary -----------------------------------------------------------------------------


def feed(judge: CanaryJudge, reason: Reason, sample: Sample, rotation: Rotation) -> None:
    """`sample`'s handshakes through CanaryJudge.observe, one at a time, as the server does."""
    for aborted, quiet, count in (
        (False, False, sample.completed - sample.no_request),
        (False, True, sample.no_request),
        (True, False, sample.aborted),
    ):
        for _ in range(count):
            judge.observe(reason.value, aborted, quiet, rotation)


@pytest.mark.parametrize(
    ("canary", "control", "halts"),
    [
        pytest.param(Sample(aborted=6), Sample(completed=380), True, id="all-fail"),
        pytest.param(Sample(aborted=6), Sample(aborted=380), False, id="old-fails-as-much"),
        pytest.param(
            Sample(completed=80, no_request=24), Sample(completed=1500), True, id="30-percent"
        ),
        pytest.param(
            Sample(completed=200, no_request=8),
            Sample(completed=1000, no_request=4),
            False,
            id="within-margin",
        ),
    ],
)
def test_the_judge_applies_the_sequential_test_after_each_canary_handshake(
    canary: Sample, control: Sample, halts: bool
) -> None:
    """The control group's handshakes first, then the canary's, one at a time: the judge
    halts exactly when rotation.canary.halts first holds on the counts so far."""
    rotation = grace_window(canary_percent=10.0)
    judge = CanaryJudge(clock=lambda: T0)
    feed(judge, Reason.DEFAULT, control, rotation)
    feed(judge, Reason.CANARY, canary, rotation)
    assert judge.halted is halts
    if halts:  # it stopped counting at the halt, which came before the sample was complete
        seen = judge.canary
        assert seen.handshakes <= canary.handshakes
        assert rules.halts(
            seen.handshakes,
            seen.pin_failures,
            judge.control.handshakes,
            judge.control.pin_failures,
            margin=rotation.canary_halt_margin,
            false_halt=rotation.canary_false_halt,
        )
    else:
        assert (judge.canary, judge.control) == (canary, control)


def test_the_canary_halts_under_a_burst_and_stays_halted_until_resumed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    evidence = Evidence(clock=FakeClock(T0))
    for _ in range(200):
        evidence.connection_ended(ok("k2026a", "old", Reason.DEFAULT), ROTATION)
    with caplog.at_level(logging.ERROR, logger="dualproxy"):
        for _ in range(20):
            evidence.connection_ended(aborted("k2026b", "new", Reason.CANARY), ROTATION)
    assert evidence.canary.halted
    assert evidence.canary.canary.handshakes <= 5  # all failing: a handful suffices
    assert "CANARY HALTED" in caplog.text
    assert "100.0%" in caplog.text
    assert "false-halt probability 0.01" in caplog.text
    canary = status_of(evidence).canary
    assert canary is not None
    assert canary.halted
    assert canary.state == "halted"
    assert canary.sending == 0.0
    assert canary.e_value >= canary.threshold == 100
    assert canary.halts == 1
    assert canary.halted_at == datetime.fromtimestamp(T0, UTC)
    # Good traffic afterwards does not undo it: only the operator does.
    for _ in range(50):
        evidence.connection_ended(ok("k2026b", "new", Reason.CANARY), ROTATION)
    assert evidence.canary.halted
    assert evidence.canary.resume()
    assert not evidence.canary.halted
    assert evidence.canary.canary == Sample()  # fresh samples after the resume
    assert not evidence.canary.resume()  # nothing to resume


def test_canary_clients_reporting_a_version_that_knows_no_new_pin_halt_it() -> None:
    """REPORT_HALT_CLIENTS distinct canary clients halt it; one fewer, or outside the window,
    or without a canary, does not."""
    judge = CanaryJudge(clock=lambda: T0)
    judge.review_reports(ROTATION, [("app 1.0 (IOS)", REPORT_HALT_CLIENTS - 1)], True)
    assert not judge.halted
    judge.review_reports(ROTATION, [("app 1.0 (IOS)", REPORT_HALT_CLIENTS)], False)
    assert not judge.halted
    judge.review_reports(NO_CANARY, [("app 1.0 (IOS)", REPORT_HALT_CLIENTS)], True)
    assert not judge.halted
    judge.review_reports(ROTATION, [("app 1.0 (IOS)", REPORT_HALT_CLIENTS)], True)
    assert judge.halted
    assert judge.why is not None
    assert "app version app 1.0 (IOS) knows no pin of the new key" in judge.why


def test_the_canary_keeps_running_when_new_fails_no_more_than_old() -> None:
    evidence = Evidence(clock=FakeClock(T0))
    # A background of quiet handshakes on both keys (preconnects), alike: no halt.
    for index in range(100):
        quiet = index % 10 == 0
        for record in (
            no_request("k2026a", "old", Reason.DEFAULT)
            if quiet
            else ok("k2026a", "old", Reason.DEFAULT),
            no_request("k2026b", "new", Reason.CANARY)
            if quiet
            else ok("k2026b", "new", Reason.CANARY),
        ):
            evidence.connection_ended(record, ROTATION)
    assert evidence.canary.canary == Sample(completed=100, no_request=10)
    assert not evidence.canary.halted


def test_no_canary_configured_means_no_judgement() -> None:
    evidence = Evidence(clock=FakeClock(T0))
    for _ in range(50):
        evidence.connection_ended(aborted("k2026b", "new", Reason.CANARY), NO_CANARY)
    assert not evidence.canary.halted
    assert status_of(evidence, NO_CANARY).canary is None


def test_hinted_clients_do_not_count_for_the_canary() -> None:
    evidence = Evidence(clock=FakeClock(T0))
    for _ in range(50):
        evidence.connection_ended(aborted("k2026b", "new", Reason.HINT_SNI), ROTATION)
    assert evidence.canary.canary == Sample()
    assert not evidence.canary.halted


def test_status_json_has_the_documented_fields() -> None:
    evidence = Evidence(clock=FakeClock(T0))
    evidence.connection_ended(ok("k2026a", "old", Reason.DEFAULT), ROTATION)
    document = status_of(evidence).to_json()
    assert document["schema"] == 1
    assert document["phase"] == "during"
    keys = document["keys"]
    assert isinstance(keys, list)
    assert [k["name"] for k in keys] == ["k2026a", "k2026b"]
    assert keys[0]["total"]["handshakes"] == 1
    assert keys[0]["not_after"] == "2027-01-15T00:00:00Z"
    assert keys[1]["total"]["pin_failure_share"] is None
    canary = document["canary"]
    assert isinstance(canary, dict)
    assert canary["halted"] is False
    assert canary["state"] == "running"
    assert canary["false_halt"] == 0.01
    assert canary["e_value"] == 1.0
    assert canary["halt_threshold"] == 100
    # close = "at-grace-end": while open, what grace_end will break (issue 19 item 3).
    window = document["window"]
    assert isinstance(window, dict)
    assert (window["close"], window["state"]) == ("at-grace-end", "open")
    assert window["max_breakage"] is None
    assert window["grace_deadline"] is None
    assert window["breakage"]["handshakes"] == 1


# --- the canary runs only during the window (issue 15, item 11) -----------------------------


@pytest.mark.parametrize(
    ("phase", "state", "sending"),
    [("before", "waiting", 0.0), ("during", "running", 10.0), ("after", "over", 0.0)],
)
def test_the_canary_is_running_only_during_the_window(
    phase: Phase, state: str, sending: float
) -> None:
    evidence = Evidence(clock=FakeClock(T0))
    status = evidence.status(
        now=datetime(2026, 12, 10, tzinfo=UTC),
        phase=phase,
        rotation=ROTATION,
        keys=[facts("k2026a", "old"), facts("k2026b", "new")],
        active_connections=0,
        reloads_ok=0,
        reloads_failed=0,
    )
    assert status.canary is not None
    assert (status.canary.state, status.canary.sending) == (state, sending)
    assert status.canary.percent == 10.0  # the configured share, shown as such


# --- a "when-safe" window ---------------------------------------------------------------------

DEADLINE: Final = GRACE_END + timedelta(days=30)
WHEN_SAFE: Final = grace_window(
    canary_percent=10.0, close="when-safe", max_breakage=0.005, grace_deadline=DEADLINE
)


def state_at(evidence: Evidence, rotation: Rotation | None, now: datetime) -> str | None:
    """The state the window review finds (None: nothing to review)."""
    verdict = evidence.review_window(rotation, now)
    return None if verdict is None else verdict.state


def healthy(evidence: Evidence, rotation: Rotation, canary: int) -> None:
    for _ in range(canary):
        evidence.connection_ended(ok("k2026b", "new", Reason.CANARY), rotation)
        for _ in range(9):
            evidence.connection_ended(ok("k2026a", "old", Reason.DEFAULT), rotation)


def test_a_when_safe_window_is_held_while_unsafe_closes_once_safe_and_stays_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dualproxy")
    evidence = Evidence(clock=FakeClock(T0))
    assert state_at(evidence, WHEN_SAFE, GRACE_END - timedelta(seconds=1)) is None
    # Old-pin-only clients in the canary: it halts, and the window is held past grace_end.
    healthy(evidence, WHEN_SAFE, 20)
    for _ in range(10):
        evidence.connection_ended(aborted("k2026b", "new", Reason.CANARY), WHEN_SAFE)
    assert evidence.canary.halted
    verdict = evidence.review_window(WHEN_SAFE, GRACE_END)
    assert verdict is not None
    assert verdict.state == "held"
    assert not evidence.window.closed
    assert "grace window held open past grace_end" in caplog.text
    window = status_of(evidence, WHEN_SAFE, GRACE_END).window
    assert window is not None
    assert window.state == "held"
    before = status_of(evidence, WHEN_SAFE).window
    assert before is not None
    assert before.state == "open"
    # Once they are gone: the operator resumes, the canary is healthy, and it closes.
    evidence.canary.resume()
    healthy(evidence, WHEN_SAFE, 1500)
    assert evidence.breakage(WHEN_SAFE).upper > WHEN_SAFE.max_breakage  # not yet
    assert state_at(evidence, WHEN_SAFE, GRACE_END + timedelta(hours=1)) == "held"
    healthy(evidence, WHEN_SAFE, 3000)
    verdict = evidence.review_window(WHEN_SAFE, GRACE_END + timedelta(hours=2))
    assert verdict is not None
    assert verdict.state == "closed"
    assert evidence.window.closed
    assert evidence.window.closed_at == GRACE_END + timedelta(hours=2)
    assert "grace window closed by the evidence" in caplog.text
    # Closed stays closed, whatever comes next.
    for _ in range(50):
        evidence.connection_ended(aborted("k2026b", "new", Reason.CANARY), WHEN_SAFE)
    assert state_at(evidence, WHEN_SAFE, GRACE_END + timedelta(hours=3)) == "closed"
    assert evidence.window.closed
    # A reload that keeps the window (another max_breakage) keeps the record; another
    # rotation starts its own.
    assert state_at(evidence, replace(WHEN_SAFE, max_breakage=0.0), GRACE_END) == "closed"
    later = replace(WHEN_SAFE, grace_end=GRACE_END + timedelta(days=1))
    state_at(evidence, later, GRACE_END + timedelta(days=1))
    assert not evidence.window.closed


def test_a_when_safe_window_closes_at_its_deadline_whatever_the_evidence(
    caplog: pytest.LogCaptureFixture,
) -> None:
    evidence = Evidence(clock=FakeClock(T0))
    for _ in range(10):
        evidence.connection_ended(aborted("k2026b", "new", Reason.CANARY), WHEN_SAFE)
    assert state_at(evidence, WHEN_SAFE, DEADLINE - timedelta(seconds=1)) == "held"
    with caplog.at_level(logging.WARNING, logger="dualproxy"):
        verdict = evidence.review_window(WHEN_SAFE, DEADLINE)
    assert verdict is not None
    assert verdict.state == "closed-at-deadline"
    assert "closed at grace_deadline" in caplog.text
    assert not evidence.window.closed  # the clock closed it, not the evidence


def test_a_window_judge_that_follows_closes_only_when_told() -> None:
    """A worker's: the evidence that would close the window (its twin above closes it) is
    not judged here; the supervisor's decision is taken as it comes."""
    evidence = Evidence(clock=FakeClock(T0))
    evidence.window.decides = False
    healthy(evidence, WHEN_SAFE, 10)
    assert evidence.review_window(WHEN_SAFE, GRACE_END + timedelta(hours=1)) is None
    assert not evidence.window.closed
    closed_at = GRACE_END + timedelta(hours=2)
    evidence.window.follow(True, closed_at)
    assert (evidence.window.closed, evidence.window.closed_at) == (True, closed_at)


def test_an_at_grace_end_window_is_not_reviewed() -> None:
    evidence = Evidence(clock=FakeClock(T0))
    assert state_at(evidence, ROTATION, GRACE_END + timedelta(days=1)) is None
    assert state_at(evidence, None, GRACE_END) is None


def test_the_breakage_counts_hinted_old_clients_as_unsampled_and_hinted_new_as_unaffected() -> None:
    evidence = Evidence(clock=FakeClock(T0))
    healthy(evidence, WHEN_SAFE, 10)  # 100 sampled
    for _ in range(50):
        evidence.connection_ended(ok("k2026a", "old", Reason.HINT_SNI), WHEN_SAFE)
        evidence.connection_ended(ok("k2026b", "new", Reason.HINT_ALPN), WHEN_SAFE)
    evidence.connection_ended(ok("k2026a", "old", Reason.BEFORE_WINDOW), WHEN_SAFE)  # not counted
    estimate = evidence.breakage(WHEN_SAFE)
    assert estimate.handshakes == 200
    assert (estimate.sampled, estimate.unsampled) == (0.5, 0.25)
    assert estimate.upper >= 0.25
