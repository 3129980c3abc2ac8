"""ops.tally and Evidence's several-process side, without processes: what workers send is the
difference of their counts, and what the supervisor adds up equals what one process that saw
every connection would have counted; the canary judges the sums. Also [process] workers."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import pytest
from helpers.rotation import grace_window
from hypothesis import given
from hypothesis import strategies as st

from dualproxy.config.errors import OperatorError
from dualproxy.config.loader import parse
from dualproxy.config.schema import MAX_WORKERS, ProcessConfig, available_cpus
from dualproxy.ops.evidence import (
    BUCKET_SECONDS,
    SERIES_BUCKETS,
    Evidence,
    KeyFacts,
    Status,
)
from dualproxy.ops.tally import EMPTY, Tally, from_wire, to_wire
from dualproxy.rotation.policy import Choice, Reason
from dualproxy.tls.outcome import Outcome

ROTATION: Final = grace_window(canary_percent=50.0, canary_halt_margin=0.05)
# Canary samples are compared in their own tests: a judge that halts stops counting them, at
# the connection (one process) or at the report (the supervisor).
NO_CANARY: Final = grace_window(canary_percent=0.0)
T0: Final = datetime(2026, 12, 10, tzinfo=UTC).timestamp()


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Finished:
    key: str | None
    choice: Choice | None
    outcome: Outcome
    detail: str = ""
    tls_version: str | None = None
    requests: int = 0


# One kind of connection per index: what the Hypothesis tests draw from.
KINDS: Final = (
    Finished(
        "k2026a", Choice("old", Reason.DEFAULT), Outcome.OK, tls_version="TLSv1.3", requests=3
    ),
    Finished("k2026b", Choice("new", Reason.CANARY), Outcome.NO_REQUEST, tls_version="TLSv1.3"),
    Finished(
        "k2026b", Choice("new", Reason.CANARY), Outcome.CLIENT_ABORTED, detail="bad_certificate"
    ),
    Finished("k2026a", Choice("old", Reason.DEFAULT), Outcome.NO_REQUEST, tls_version="TLSv1.3"),
    Finished(None, None, Outcome.NO_HELLO, detail="closed after 0 bytes"),
)


def facts(name: str, role: str) -> KeyFacts:
    return KeyFacts(
        name, role, "pin" + name, "ECDSA P-256", ROTATION.grace_start, ROTATION.grace_end
    )


def status_of(evidence: Evidence) -> Status:
    return evidence.status(
        now=datetime(2026, 12, 10, tzinfo=UTC),
        phase="during",
        rotation=ROTATION,
        keys=[facts("k2026a", "old"), facts("k2026b", "new")],
        active_connections=0,
        reloads_ok=0,
        reloads_failed=0,
    )


def worker_evidence(clock: FakeClock) -> Evidence:
    evidence = Evidence(clock=clock)
    evidence.canary.decides = False
    return evidence


def comparable(status: Status) -> tuple[object, ...]:
    """What the surfaces show of a status, its start time aside (each process has its own)."""
    return (status.rows, status.response_rows, status.keys, status.canary)


# --- sums ---------------------------------------------------------------------------------------


@given(
    st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, len(KINDS) - 1), st.integers(0, 3)),
        max_size=60,
    )
)
def test_the_sum_of_the_workers_differences_is_what_one_process_counts(
    events: list[tuple[int, int, int]],
) -> None:
    """Three workers count connections (and responses) over time buckets and report the
    difference since their last report at random moments; the supervisor's sum equals one
    process that counted every connection itself."""
    clock = FakeClock(T0)
    workers = [worker_evidence(clock) for _ in range(3)]
    sent = [EMPTY] * 3
    supervisor, alone = Evidence(clock=clock), Evidence(clock=clock)
    for worker, kind, buckets_later in events:
        clock.now += buckets_later * BUCKET_SECONDS / 2
        record = KINDS[kind]
        for evidence in (workers[worker], alone):
            if record.key is not None and record.choice is not None:
                counters = evidence.counters_for(record.key, record.choice.reason)
                counters.statuses[2] += record.requests
            evidence.connection_ended(record, NO_CANARY)
        if kind % 2:  # a report now and then: through the wire form, as the link carries it
            now = workers[worker].tally()
            supervisor.add(from_wire(to_wire(now.minus(sent[worker]))), NO_CANARY)
            sent[worker] = now
    for worker, evidence in enumerate(workers):
        supervisor.add(evidence.tally().minus(sent[worker]), NO_CANARY)
    assert comparable(status_of(supervisor)) == comparable(status_of(alone))


def test_a_difference_holds_only_what_changed() -> None:
    clock = FakeClock(T0)
    evidence = worker_evidence(clock)
    evidence.connection_ended(KINDS[0], ROTATION)
    first = evidence.tally()
    assert not first.empty
    assert evidence.tally().minus(first).empty  # nothing new: nothing to send
    evidence.connection_ended(KINDS[0], ROTATION)
    delta = evidence.tally().minus(first)
    assert list(delta.rows.values()) == [(1, 3)]
    assert list(delta.buckets.values()) == [(1, 0)]


def test_a_bucket_a_day_old_is_not_added_over_the_current_one() -> None:
    """A difference for a time bucket whose ring slot now holds a newer one is dropped; the
    same bucket still current is added."""
    clock = FakeClock(T0 + SERIES_BUCKETS * BUCKET_SECONDS)
    supervisor = Evidence(clock=clock)
    supervisor.connection_ended(KINDS[0], ROTATION)
    now_bucket = int(clock.now // BUCKET_SECONDS)
    stale = Tally(buckets={("k2026a", now_bucket - SERIES_BUCKETS): (5, 5)})
    supervisor.add(stale, ROTATION)
    current = Tally(buckets={("k2026a", now_bucket): (2, 1)})
    supervisor.add(current, ROTATION)
    key = status_of(supervisor).keys[0]
    assert key.last_24h.handshakes == 3
    assert key.last_24h.pin_failures == 1


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"rows": "x"}, "rows: not a list"),
        ({"rows": [["k", "default", "ok", True]]}, "not a list of 7"),
        ({"rows": [["k", "default", "nonsense", True, False, 1, 1]]}, "nonsense"),
        ({"rows": [["k", "default", "ok", 1, False, 1, 1]]}, "not true or false"),
        ({"buckets": [["k", 1, 2, "3"]]}, "not an integer"),
        ({"responses": [["k", "r", [1], [1], "x"]]}, "not a number"),
        ({"canary": [1, 2]}, "three integers"),
    ],
)
def test_a_malformed_report_is_refused_naming_the_field(data: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        from_wire(data)


def test_a_well_formed_report_reads_back_as_it_was_written() -> None:
    evidence = worker_evidence(FakeClock(T0))
    for record in KINDS:
        evidence.connection_ended(record, ROTATION)
    evidence.counters_for("k2026a", Reason.DEFAULT).latency_sum = 1.5
    tally = evidence.tally()
    assert from_wire(to_wire(tally)) == tally


# --- the canary judges the sums ------------------------------------------------------------------


def canary_failures(evidence: Evidence, count: int, failures: int) -> None:
    """`count` canary handshakes, the last `failures` of them pin failures, and as many
    sound ones in the control group."""
    sound = Finished(
        "k2026b", Choice("new", Reason.CANARY), Outcome.OK, tls_version="TLSv1.3", requests=1
    )
    for index in range(count):
        canary = KINDS[1] if index >= count - failures else sound
        evidence.connection_ended(canary, ROTATION)
        evidence.connection_ended(KINDS[0], ROTATION)


@pytest.mark.parametrize("failures", [8, 0], ids=["pin-failures", "sound"])
def test_the_canary_halts_on_sums_that_no_single_worker_would_halt_on(failures: int) -> None:
    """Two workers each see 20 canary handshakes, 8 of them pin failures (40 %, the control
    group none): too few for the sequential test to be sure, so one process with those
    counts does not halt (nor would a worker: they never decide); the supervisor's judge
    sees 40 and 16 and halts. With no failures, the sums do not halt either."""
    clock = FakeClock(T0)
    workers = [worker_evidence(clock) for _ in range(2)]
    supervisor, one_process = Evidence(clock=clock), Evidence(clock=clock)
    for evidence in (*workers, one_process):
        canary_failures(evidence, 20, failures)
    assert not one_process.canary.halted
    assert not any(worker.canary.halted for worker in workers)
    for worker in workers:
        supervisor.add(worker.tally(), ROTATION)
    assert supervisor.canary.canary.handshakes == 40
    assert supervisor.canary.halted is bool(failures)


def test_a_worker_never_halts_by_itself_but_follows_the_supervisor() -> None:
    clock = FakeClock(T0)
    worker = worker_evidence(clock)
    canary_failures(worker, 400, 400)
    assert not worker.canary.halted  # counted, not judged
    assert worker.canary.canary.handshakes == 400
    worker.canary.follow(True, "why", T0)
    assert (worker.canary.halted, worker.canary.why, worker.canary.halts) == (True, "why", 1)
    worker.canary.follow(False, None, None)  # resumed by the operator, on the supervisor
    assert not worker.canary.halted
    assert worker.canary.resumes == 1
    assert worker.canary.canary.handshakes == 0  # fresh samples, as after a resume


# --- [process] workers ---------------------------------------------------------------------------


def config_with(process: object, tmp_path: Path) -> ProcessConfig:
    key = tmp_path / "key.pem"
    data = {
        "listen": {"address": "127.0.0.1:0"},
        "keys": {"k": {"key": str(key), "chain": str(key)}},
        "process": process,
    }
    return parse(data, base_dir=tmp_path, check_files=False).process


@pytest.mark.parametrize(
    ("workers", "count"), [(1, 1), (2, 2), (MAX_WORKERS, MAX_WORKERS), ("auto", available_cpus())]
)
def test_process_workers_takes_a_number_or_auto(
    tmp_path: Path, workers: object, count: int
) -> None:
    assert config_with({"workers": workers}, tmp_path).worker_count() == count


def test_process_workers_defaults_to_one_process(tmp_path: Path) -> None:
    assert config_with({}, tmp_path).worker_count() == 1
    assert available_cpus() >= 1


@pytest.mark.parametrize(
    ("workers", "problem"),
    [
        (0, "0 is out of range; use 1 to 512"),
        (MAX_WORKERS + 1, "out of range"),
        ("many", "expected \"auto\" or a number of processes, got 'many'"),
        (True, 'expected "auto" or a number'),
        (2.5, 'expected "auto" or a number'),
    ],
)
def test_process_workers_refuses_what_is_not_a_count(
    tmp_path: Path, workers: object, problem: str
) -> None:
    with pytest.raises(OperatorError, match=problem) as caught:
        config_with({"workers": workers}, tmp_path)
    assert caught.value.key_path == "process.workers"


def test_process_refuses_an_unknown_setting(tmp_path: Path) -> None:
    with pytest.raises(OperatorError) as caught:
        config_with({"worker": 2}, tmp_path)
    assert caught.value.key_path == "process.worker"
