"""A process's evidence counts as plain data, the differences between two of them, and their
wire form: how worker processes report to their supervisor (serve.worker, serve.supervisor),
which sums them into one `evidence.Evidence` for the machine.

Pure (no sockets, no trio). A worker takes a `Tally` of its counts a few times a second,
sends the difference from the last one it sent (`minus`; only what changed, usually a handful
of rows), and the supervisor adds it (`Evidence.add`). Differences, not totals: the sums stay
right when a worker dies and its replacement starts from zero, and a message costs what
changed, not what was ever counted. What a worker counted after its last message before it
was killed is lost (at most one report interval's worth); a worker that stops cleanly sends
its last difference first.

The wire form is one JSON object per message (`to_wire`, `from_wire`); `from_wire` checks
every field's shape and raises ValueError naming the first that is wrong, so that a bug in a
worker costs its report, not the supervisor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, TypeVar

from dualproxy.tls.outcome import Outcome

__all__ = ["EMPTY", "RowKey", "SampleCounts", "Tally", "from_wire", "to_wire"]

# One connection's place in the counts: (key, reason, outcome, handshake completed, pin failure).
RowKey = tuple[str, str, Outcome, bool, bool]
# A canary sample: (completed, aborted, no_request), as evidence.Sample holds them.
SampleCounts = tuple[int, int, int]
# Response counts of one (key, reason): per status class, per latency bucket, latency sum.
ResponseCounts = tuple[tuple[int, ...], tuple[int, ...], float]

_NO_SAMPLE: Final[SampleCounts] = (0, 0, 0)


_K = TypeVar("_K")
_V = TypeVar("_V")


def _frozen(items: Mapping[_K, _V] | None = None) -> Mapping[_K, _V]:
    return MappingProxyType(dict(items or {}))


@dataclass(frozen=True, slots=True)
class Tally:
    """Counts of one process, or the difference of two such (see the module docstring)."""

    rows: Mapping[RowKey, tuple[int, int]] = field(default_factory=_frozen)  # connections, requests
    responses: Mapping[tuple[str, str], ResponseCounts] = field(default_factory=_frozen)
    # (key, time bucket number) -> (handshakes that reached its certificate, pin failures)
    buckets: Mapping[tuple[str, int], tuple[int, int]] = field(default_factory=_frozen)
    canary: SampleCounts = _NO_SAMPLE
    control: SampleCounts = _NO_SAMPLE

    @property
    def empty(self) -> bool:
        """Nothing counted (a difference with nothing new)."""
        return not (self.rows or self.responses or self.buckets) and (
            self.canary == self.control == _NO_SAMPLE
        )

    def minus(self, before: Tally) -> Tally:
        """What was counted since `before` (an earlier tally of the same process): only the
        entries that grew. A time bucket `before` no longer has counts whole."""
        rows = {
            k: (v[0] - old[0], v[1] - old[1])
            for k, v in self.rows.items()
            if v != (old := before.rows.get(k, (0, 0)))
        }
        responses = {}
        for k, (statuses, latency, latency_sum) in self.responses.items():
            was = before.responses.get(k)
            if was is None:
                responses[k] = (statuses, latency, latency_sum)
            elif (statuses, latency) != was[:2]:
                responses[k] = (
                    tuple(a - b for a, b in zip(statuses, was[0], strict=True)),
                    tuple(a - b for a, b in zip(latency, was[1], strict=True)),
                    latency_sum - was[2],
                )
        buckets = {
            k: (v[0] - old[0], v[1] - old[1])
            for k, v in self.buckets.items()
            if v != (old := before.buckets.get(k, (0, 0)))
        }
        return Tally(
            _frozen(rows),
            _frozen(responses),
            _frozen(buckets),
            _sample_minus(self.canary, before.canary),
            _sample_minus(self.control, before.control),
        )


EMPTY: Final = Tally()


def _sample_minus(now: SampleCounts, before: SampleCounts) -> SampleCounts:
    return (now[0] - before[0], now[1] - before[1], now[2] - before[2])


def to_wire(tally: Tally) -> dict[str, object]:
    """The JSON-able form of a tally (lists, not tuples or tuple keys)."""
    return {
        "rows": [[*k, *v] for k, v in tally.rows.items()],
        "responses": [
            [*k, list(statuses), list(latency), total]
            for k, (statuses, latency, total) in tally.responses.items()
        ],
        "buckets": [[*k, *v] for k, v in tally.buckets.items()],
        "canary": list(tally.canary),
        "control": list(tally.control),
    }


def from_wire(data: Mapping[str, object]) -> Tally:
    """A tally from its JSON form; ValueError naming the first field that is not shaped as
    `to_wire` writes it."""
    rows: dict[RowKey, tuple[int, int]] = {}
    for item in _list(data, "rows"):
        key, reason, outcome, completed, failure, connections, requests = _fields(item, 7, "rows")
        rows[
            (_str(key), _str(reason), Outcome(_str(outcome)), _bool(completed), _bool(failure))
        ] = (_int(connections), _int(requests))
    responses: dict[tuple[str, str], ResponseCounts] = {}
    for item in _list(data, "responses"):
        key, reason, statuses, latency, total = _fields(item, 5, "responses")
        if not isinstance(total, int | float) or isinstance(total, bool):
            raise ValueError("responses: the latency sum is not a number")
        responses[_str(key), _str(reason)] = (_ints(statuses), _ints(latency), float(total))
    buckets: dict[tuple[str, int], tuple[int, int]] = {}
    for item in _list(data, "buckets"):
        key, bucket, handshakes, failures = _fields(item, 4, "buckets")
        buckets[_str(key), _int(bucket)] = (_int(handshakes), _int(failures))
    return Tally(
        _frozen(rows),
        _frozen(responses),
        _frozen(buckets),
        _sample(data.get("canary")),
        _sample(data.get("control")),
    )


def _list(data: Mapping[str, object], name: str) -> list[object]:
    value = data.get(name, [])
    if not isinstance(value, list):
        raise ValueError(f"{name}: not a list")
    return value


def _fields(item: object, count: int, name: str) -> list[object]:
    if not isinstance(item, list) or len(item) != count:
        raise ValueError(f"{name}: an entry is not a list of {count}")
    return item


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a string")
    return value


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{value!r} is not true or false")
    return value


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{value!r} is not an integer")
    return value


def _ints(value: object) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise ValueError(f"{value!r} is not a list of integers")
    return tuple(_int(item) for item in value)


def _sample(value: object) -> SampleCounts:
    counts = _ints(value if value is not None else [0, 0, 0])
    if len(counts) != 3:
        raise ValueError("a canary sample is not three integers")
    return counts[0], counts[1], counts[2]
