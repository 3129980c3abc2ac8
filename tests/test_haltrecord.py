"""ops.haltrecord: the canary's halt record, pure. A record round-trips; every field that is not
what dualproxy writes is refused with RecordError, one field at a time, each beside the twin
it is not; a record cut at every byte, with random bytes after, and any bytes Hypothesis
draws, give a record or RecordError and nothing else; and `decide` and `next_record` apply
the generation and the rotation as the module says.

The reading and writing of the file, and what a replica does with the decision, are
tests/test_sharedhalt.py's (on real servers) and tests/test_replicas.py's (processes)."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import pytest
from helpers.profiles import examples
from helpers.rotation import GRACE_END, GRACE_START, grace_window
from hypothesis import given, settings
from hypothesis import strategies as st

from dualproxy.ops.haltrecord import (
    MAX_RECORD_BYTES,
    Action,
    HaltRecord,
    RecordError,
    RotationId,
    decide,
    next_record,
    parse_record,
    rotation_id,
)

PINS: Final = {"k2026a": "OLDPIN=", "k2026b": "NEWPIN=", "k2025": "OLDERPIN="}
ROTATION: Final = rotation_id(grace_window(), PINS)
AT: Final = datetime(2026, 12, 6, 13, 0, 50, tzinfo=UTC)
HALT: Final = HaltRecord(
    generation=3,
    rotation=ROTATION,
    halted=True,
    why="new key pin-failure share 100.0% over 4 canary handshakes",
    at=AT,
    by="replica-a pid 4242",
)
EXAMPLES: Final = 100


def fields(record: HaltRecord = HALT) -> dict[str, Any]:
    """`record` as its file's JSON object, to edit."""
    data: dict[str, Any] = json.loads(record.to_bytes())
    return data


def encoded(data: object) -> bytes:
    return json.dumps(data).encode()


# --- the file's content ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "record",
    [HALT, HaltRecord(4, ROTATION, False, None, AT, "replica-b pid 7")],
    ids=["halted", "resumed"],
)
def test_a_record_round_trips(record: HaltRecord) -> None:
    data = record.to_bytes()
    assert parse_record(data) == record
    assert len(data) < 1024  # a few hundred bytes: far below MAX_RECORD_BYTES


def test_the_file_says_what_it_holds_in_words() -> None:
    """Pins, times to the second, "halted": what an operator reading it needs, no more."""
    assert fields() == {
        "version": 1,
        "generation": 3,
        "canary": "halted",
        "why": HALT.why,
        "at": "2026-12-06T13:00:50Z",
        "by": "replica-a pid 4242",
        "rotation": {
            "old": ["OLDPIN="],
            "new": ["NEWPIN="],
            "grace_start": "2026-12-01T00:00:00Z",
            "grace_end": "2027-01-15T00:00:00Z",
        },
    }


def edit(path: str, value: object) -> bytes:
    """The halt record with the field at dotted `path` set to `value` (... deletes it)."""
    data = fields()
    *parents, last = path.split(".")
    table = data
    for name in parents:
        table = table[name]
    if value is ...:
        del table[last]
    else:
        table[last] = value
    return encoded(data)


# Each refusal beside its accepted twin: the same field, a value dualproxy writes.
@pytest.mark.parametrize(
    ("path", "refused", "accepted", "message"),
    [
        ("version", 2, 1, "version 2, not 1"),
        ("version", ..., 1, "version None"),
        ("generation", 0, 1, "generation"),
        ("generation", True, 2, "generation"),
        ("generation", "3", 3, "generation"),
        ("canary", "paused", "resumed", "neither"),
        ("canary", ..., "halted", "neither"),
        ("why", 7, None, "why or by"),
        ("by", None, "replica-c", "why or by"),
        ("at", "yesterday", "2026-12-06T13:00:50+01:00", "its at is not an RFC 3339"),
        ("at", "2026-12-06T13:00:50", "2026-12-06T13:00:50Z", "its at is not an RFC 3339"),
        ("at", 1765000000, "2026-12-06T13:00:50Z", "its at is not a time"),
        ("rotation", "k2026a to k2026b", fields()["rotation"], "names no rotation"),
        ("rotation.old", [], ["A=", "B="], "old is not a list of pins"),
        ("rotation.new", "NEWPIN=", ["NEWPIN="], "new is not a list of pins"),
        ("rotation.new", [1], ["NEWPIN="], "new is not a list of pins"),
        ("rotation.grace_end", ..., "2027-01-15T00:00:00Z", "grace_end is not a time"),
    ],
)
def test_a_field_dualproxy_does_not_write_is_refused(
    path: str, refused: object, accepted: object, message: str
) -> None:
    with pytest.raises(RecordError, match=message):
        parse_record(edit(path, refused))
    assert isinstance(parse_record(edit(path, accepted)), HaltRecord)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not JSON"),
        (b"\xff\xfe{}", "not JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "longer than"),
        (b"[" * 30_000 + b"]" * 30_000, "not JSON"),  # deeper than the parser recurses
        (b'["a record"]', "not a JSON object"),
        (b"null", "not a JSON object"),
        (HALT.to_bytes() + b" " * MAX_RECORD_BYTES, "longer than"),
    ],
    ids=["empty", "not-utf8", "too-long", "too-deep", "a-list", "null", "padded"],
)
def test_what_is_no_json_object_is_refused(data: bytes, message: str) -> None:
    with pytest.raises(RecordError, match=message):
        parse_record(data)


def test_a_record_up_to_the_limit_is_read() -> None:
    """The twin of "padded": spaces up to MAX_RECORD_BYTES in all still make a record."""
    data = HALT.to_bytes()
    assert parse_record(data + b" " * (MAX_RECORD_BYTES - len(data))) == HALT


def test_a_record_cut_at_any_byte_with_random_bytes_after_is_refused() -> None:
    """A torn or overwritten file (the writer renames, so this takes a writer that did not):
    every cut before the closing brace, followed by random bytes or by nothing, is refused
    (after it only the newline is cut: still the whole record)."""
    data = HALT.to_bytes()
    rng = random.Random(17)
    assert parse_record(data[: data.rindex(b"}") + 1]) == HALT
    for cut in range(data.rindex(b"}")):
        for tail in (b"", rng.randbytes(rng.randrange(1, 16))):
            try:
                parse_record(data[:cut] + tail)
            except RecordError:
                continue
            pytest.fail(f"cut at {cut} with {tail!r} was taken")


@settings(max_examples=examples(EXAMPLES * 5))
@given(st.binary(max_size=400))
def test_any_bytes_give_a_record_or_record_error(data: bytes) -> None:
    try:
        record = parse_record(data)
    except RecordError:
        return
    assert parse_record(record.to_bytes()) == record


@settings(max_examples=examples(EXAMPLES))
@given(
    generation=st.integers(1, 2**63),
    halted=st.booleans(),
    why=st.text(max_size=200),
    by=st.text(max_size=80),
    pins=st.lists(st.text(min_size=1, max_size=44), min_size=1, max_size=3),
)
def test_every_record_dualproxy_writes_is_read_back(
    generation: int, halted: bool, why: str, by: str, pins: list[str]
) -> None:
    rotation = RotationId(tuple(sorted(pins)), ("NEW=",), GRACE_START, GRACE_END)
    record = HaltRecord(generation, rotation, halted, why if halted else None, AT, by)
    assert parse_record(record.to_bytes()) == record


# --- which rotation ---------------------------------------------------------------------------


def test_a_rotation_is_its_keys_pins_and_window_not_its_names_or_canary() -> None:
    """Another config naming the same keys otherwise, or sending another share to the canary,
    is the same rotation; another window or another new key is another rotation."""
    renamed = replace(grace_window(), old=("legacy",), new=("fresh",))
    same = rotation_id(renamed, {"legacy": "OLDPIN=", "fresh": "NEWPIN="})
    assert same == ROTATION == rotation_id(grace_window(canary_percent=5), PINS)
    later = replace(grace_window(), grace_end=GRACE_END + timedelta(days=1))
    assert rotation_id(later, PINS) != ROTATION
    other_key = rotation_id(grace_window(), {**PINS, "k2026b": "OTHERPIN="})
    assert other_key != ROTATION
    assert "NEWPIN=" in ROTATION.describe()
    assert "2027-01-15T00:00:00Z" in ROTATION.describe()


def test_a_window_written_to_the_fraction_of_a_second_is_the_record_s_window() -> None:
    """The record writes times to the second: a config's fractions are not another window."""
    fraction = replace(grace_window(), grace_start=GRACE_START + timedelta(microseconds=250))
    record = replace(HALT, rotation=rotation_id(fraction, PINS))
    assert parse_record(record.to_bytes()).rotation == rotation_id(fraction, PINS) == ROTATION


def test_several_old_keys_are_named_in_one_order() -> None:
    two = replace(grace_window(), old=("k2026a", "k2025"))
    assert rotation_id(two, PINS).old == ("OLDERPIN=", "OLDPIN=")


# --- decide and next_record --------------------------------------------------------------------

OTHER_ROTATION: Final = RotationId(("NEWPIN=",), ("NEXTPIN=",), GRACE_END, GRACE_END + timedelta(1))


@pytest.mark.parametrize(
    ("record", "rotation", "seen", "halted", "action"),
    [
        (None, ROTATION, None, False, Action.NONE),
        (HALT, ROTATION, None, False, Action.FOLLOW),  # a start: the halt outlives a restart
        (HALT, ROTATION, 2, False, Action.FOLLOW),
        (HALT, ROTATION, 3, False, Action.SEEN),  # applied (or written) here before
        (HALT, ROTATION, 7, False, Action.FOLLOW),  # the folder's record started over
        (HALT, ROTATION, 2, True, Action.AGREE),  # halted by its own evidence as well
        (HALT, OTHER_ROTATION, 2, False, Action.STALE),
        (HALT, None, 2, False, Action.STALE),  # no rotation served here
        (HALT, OTHER_ROTATION, 3, False, Action.SEEN),  # said once, then seen
        (HaltRecord(4, ROTATION, False, None, AT, "b"), ROTATION, 3, True, Action.FOLLOW),
        (HaltRecord(4, ROTATION, False, None, AT, "b"), ROTATION, 3, False, Action.AGREE),
    ],
    ids=[
        "no-record",
        "halt-at-start",
        "halt-news",
        "halt-seen",
        "lower-generation",
        "halt-agreed",
        "another-rotation",
        "no-rotation",
        "stale-seen",
        "resume-news",
        "resume-agreed",
    ],
)
def test_decide(
    record: HaltRecord | None,
    rotation: RotationId | None,
    seen: int | None,
    halted: bool,
    action: Action,
) -> None:
    assert decide(record, rotation=rotation, seen=seen, halted=halted) is action


@pytest.mark.parametrize(
    ("current", "seen", "generation"),
    [(None, 0, 1), (HALT, 0, 4), (HALT, 9, 10), (None, 5, 6)],
    ids=["first", "after-the-record", "after-what-this-replica-saw", "after-an-unreadable-one"],
)
def test_the_next_record_s_generation_is_news_to_everyone(
    current: HaltRecord | None, seen: int, generation: int
) -> None:
    record = next_record(
        current, seen=seen, rotation=ROTATION, halted=True, why="w", at=AT, by="me"
    )
    assert record == HaltRecord(generation, ROTATION, True, "w", AT, "me")
    resumed = next_record(
        record, seen=seen, rotation=ROTATION, halted=False, why="w", at=AT, by="me"
    )
    assert (resumed.generation, resumed.halted, resumed.why) == (generation + 1, False, None)
