"""evidence.py without a server: the pin-failure arithmetic, the time buckets on a fake clock,
and the canary's halt rule, each positive case next to the negative one."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import UTC, datetime
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
    should_halt,
)
from dualproxy.rotation.policy import Choice, Reason
from dualproxy.tls.outcome import Outcome

ROTATION: Final = grace_window(canary_percent=10.0, canary_min_sample=20, canary_halt_margin=0.05)
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


def status_of(evidence: Evidence, rotation: Rotation | None = ROTATION) -> Status:
    return evidence.status(
        now=datetime(2026, 12, 10, tzinfo=UTC),
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


@pytest.mark.parametrize(
    ("canary", "control", "halts"),
    [
        pytest.param(Sample(completed=199, aborted=1), Sample(), False, id="below-min-sample"),
        pytest.param(Sample(completed=190, aborted=10), Sample(), False, id="at-margin"),
        pytest.param(Sample(completed=189, aborted=11), Sample(), True, id="over-margin"),
        pytest.param(
            Sample(completed=180, no_request=5, aborted=20),
            Sample(completed=100, no_request=10),
            False,
            id="old-fails-as-much",
        ),
        pytest.param(
            Sample(completed=140, no_request=20, aborted=60),
            Sample(completed=100, no_request=10),
            True,
            id="new-fails-more",
        ),
        pytest.param(
            Sample(completed=176, aborted=24),
            Sample(completed=90, aborted=10),
            False,
            id="old-aborts-as-much",
        ),
    ],
)
def test_the_halt_rule(canary: Sample, control: Sample, halts: bool) -> None:
    """The rule on its samples, and as the server applies it: one handshake at a time
    through CanaryJudge.observe (the old key's first, then the canary's)."""
    assert should_halt(canary, control, min_sample=200, margin=0.05) is halts
    rotation = grace_window(canary_percent=10.0, canary_min_sample=200, canary_halt_margin=0.05)
    judge = CanaryJudge(clock=lambda: T0)
    for reason, sample in ((Reason.DEFAULT, control), (Reason.CANARY, canary)):
        for aborted, quiet, count in (
            (False, False, sample.completed - sample.no_request),
            (False, True, sample.no_request),
            (True, False, sample.aborted),
        ):
            for _ in range(count):
                judge.observe(reason.value, aborted, quiet, rotation)
    assert (judge.canary, judge.control) == (canary, control)
    assert judge.halted is halts


def test_the_canary_halts_under_a_burst_and_stays_halted_until_resumed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    evidence = Evidence(clock=FakeClock(T0))
    for _ in range(10):
        evidence.connection_ended(ok("k2026a", "old", Reason.DEFAULT), ROTATION)
    for _ in range(ROTATION.canary_min_sample - 1):
        evidence.connection_ended(aborted("k2026b", "new", Reason.CANARY), ROTATION)
    assert not evidence.canary.halted  # not before the minimum sample
    with caplog.at_level(logging.ERROR, logger="dualproxy"):
        evidence.connection_ended(aborted("k2026b", "new", Reason.CANARY), ROTATION)
    assert evidence.canary.halted
    assert "CANARY HALTED" in caplog.text
    assert "100.0%" in caplog.text
    canary = status_of(evidence).canary
    assert canary is not None
    assert canary.halted
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
