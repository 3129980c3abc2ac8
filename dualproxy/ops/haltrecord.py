"""The canary's halt record: what replicas sharing a state folder ([state] dir) agree on about
the canary. Pure: bytes in, values out; serve.sharedhalt reads and writes the file (under its
lock, atomically) and applies what `decide` says to the machine's judge.

The record is one small JSON object, rewritten whole by whoever decides (a judge that halted
on its evidence, an operator's `canary resume`), never edited in place:

    {"version": 1, "generation": 7, "canary": "halted", "why": "new key pin-failure ...",
     "at": "2026-12-06T13:00:50Z", "by": "replica-a pid 4242",
     "rotation": {"old": ["<pin>"], "new": ["<pin>"],
                  "grace_start": "2026-12-01T00:00:00Z", "grace_end": "2027-01-15T00:00:00Z"}}

- `generation` counts every record written to the folder: a writer takes the lock, reads the
  record there and writes the next generation (`next_record`), so that two replicas deciding
  at the same moment write two generations, the later one standing; a replica applies each
  generation once.
- `rotation` names the rotation the decision belongs to by what makes it that rotation: the
  pins of its old and new keys and its grace window (key names are each config's own). A
  record of another rotation (an earlier one's halt) is ignored, and said once: a halt of
  last year's rotation must not stop this year's canary.
- `canary` ("halted" or "resumed"), `why` (a halt's reason, as the judge that halted said
  it), `at` (when it halted or resumed) and `by` (which replica decided) are what the other
  replicas show and log ("halted by replica X").

Nothing in it is secret: pins are public, the reason names counts or an app version.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from dualproxy.config.schema import Rotation
from dualproxy.config.times import format_time, parse_time

__all__ = [
    "MAX_RECORD_BYTES",
    "Action",
    "HaltRecord",
    "RecordError",
    "RotationId",
    "decide",
    "next_record",
    "parse_record",
    "rotation_id",
]

RECORD_VERSION: Final = 1
# A record is a few hundred bytes (a halt's reason is a sentence); a file far larger is not
# one we wrote, and is refused before it is parsed.
MAX_RECORD_BYTES: Final = 64 * 1024
_STATES: Final = {"halted": True, "resumed": False}


class RecordError(ValueError):
    """The bytes are not a record dualproxy wrote; the message says what is wrong with them."""


@dataclass(frozen=True, slots=True)
class RotationId:
    """What makes a rotation that rotation, across replicas and reloads: its keys' pins and its
    grace window (a changed canary_percent or hint is the same rotation)."""

    old: tuple[str, ...]  # the old keys' pins, sorted
    new: tuple[str, ...]
    grace_start: datetime
    grace_end: datetime

    def describe(self) -> str:
        """In words, for a log line: "old PIN, new PIN, window START to END"."""
        return (
            f"old {', '.join(self.old)}, new {', '.join(self.new)}, window"
            f" {format_time(self.grace_start)} to {format_time(self.grace_end)}"
        )


def rotation_id(rotation: Rotation, pins: Mapping[str, str]) -> RotationId:
    """The identity of `rotation`, whose keys' pins `pins` holds by key name. Its window to
    the second, as the record writes times (a config may write fractions of a second)."""
    return RotationId(
        old=tuple(sorted(pins[name] for name in rotation.old)),
        new=tuple(sorted(pins[name] for name in rotation.new)),
        grace_start=rotation.grace_start.replace(microsecond=0),
        grace_end=rotation.grace_end.replace(microsecond=0),
    )


@dataclass(frozen=True, slots=True)
class HaltRecord:
    """One decision about the canary, as the record file holds it (the module docstring)."""

    generation: int  # 1 for the folder's first record
    rotation: RotationId
    halted: bool  # False: resumed
    why: str | None  # a halt's reason; None for a resume
    at: datetime  # aware, UTC, to the second
    by: str  # the replica that decided

    def to_bytes(self) -> bytes:
        """The file's content (what parse_record reads back)."""
        data = {
            "version": RECORD_VERSION,
            "generation": self.generation,
            "canary": "halted" if self.halted else "resumed",
            "why": self.why,
            "at": format_time(self.at),
            "by": self.by,
            "rotation": {
                "old": list(self.rotation.old),
                "new": list(self.rotation.new),
                "grace_start": format_time(self.rotation.grace_start),
                "grace_end": format_time(self.rotation.grace_end),
            },
        }
        return json.dumps(data, indent=1).encode() + b"\n"


def parse_record(data: bytes) -> HaltRecord:
    """The record in `data`; RecordError saying what is wrong when it is not one dualproxy
    wrote (too long, not JSON, another version, a field missing or of the wrong type)."""
    if len(data) > MAX_RECORD_BYTES:
        raise RecordError(f"longer than {MAX_RECORD_BYTES} bytes")
    try:
        fields = json.loads(data)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; so is bad JSON
        raise RecordError("not JSON") from None
    if not isinstance(fields, dict):
        raise RecordError("not a JSON object")
    version = fields.get("version")
    if version != RECORD_VERSION:
        raise RecordError(f"version {version!r}, not {RECORD_VERSION}")
    generation = fields.get("generation")
    if type(generation) is not int or generation < 1:
        raise RecordError("its generation is not a whole number from 1")
    state = fields.get("canary")
    if not isinstance(state, str) or state not in _STATES:
        raise RecordError('its canary is neither "halted" nor "resumed"')
    why, by = fields.get("why"), fields.get("by")
    if not (why is None or isinstance(why, str)) or not isinstance(by, str):
        raise RecordError("its why or by is not text")
    rotation = fields.get("rotation")
    if not isinstance(rotation, dict):
        raise RecordError("it names no rotation")
    return HaltRecord(
        generation=generation,
        rotation=RotationId(
            old=_pins(rotation.get("old"), "its rotation's old"),
            new=_pins(rotation.get("new"), "its rotation's new"),
            grace_start=_time(rotation.get("grace_start"), "its rotation's grace_start"),
            grace_end=_time(rotation.get("grace_end"), "its rotation's grace_end"),
        ),
        halted=_STATES[state],
        why=why,
        at=_time(fields.get("at"), "its at"),
        by=by,
    )


def _pins(value: object, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(p, str) for p in value):
        raise RecordError(f"{what} is not a list of pins")
    return tuple(sorted(value))


def _time(value: object, what: str) -> datetime:
    if not isinstance(value, str):
        raise RecordError(f"{what} is not a time")
    try:
        return parse_time(value)
    except ValueError:
        raise RecordError(f"{what} is not an RFC 3339 time") from None


def next_record(
    current: HaltRecord | None,
    *,
    seen: int,
    rotation: RotationId,
    halted: bool,
    why: str | None,
    at: datetime,
    by: str,
) -> HaltRecord:
    """The record that replaces `current` (None: no record, or one that could not be read)
    with this decision: the generation after both `current`'s and `seen` (the highest this
    replica read or wrote), so that every replica takes it as news."""
    base = max(current.generation if current is not None else 0, seen)
    return HaltRecord(
        generation=base + 1,
        rotation=rotation,
        halted=halted,
        why=why if halted else None,
        at=at,
        by=by,
    )


class Action(enum.Enum):
    """What a replica does with the record it read (`decide`)."""

    NONE = "none"  # no record
    SEEN = "seen"  # this generation was read (or written) here before: nothing new
    STALE = "stale"  # another rotation's: ignored, said once
    AGREE = "agree"  # this rotation's, and the judge is in that state already
    FOLLOW = "follow"  # this rotation's, and the judge is not in its state: take it


def decide(
    record: HaltRecord | None, *, rotation: RotationId | None, seen: int | None, halted: bool
) -> Action:
    """What to do with `record`, given this server's rotation (None: it serves none), the
    generation it last read or wrote (`seen`; None before the first) and whether its judge is
    halted now. A generation other than `seen` is news, also a lower one: the folder's record
    was deleted and written again from 1."""
    if record is None:
        return Action.NONE
    if record.generation == seen:
        return Action.SEEN
    if record.rotation != rotation:
        return Action.STALE
    if record.halted == halted:
        return Action.AGREE
    return Action.FOLLOW
