"""The canary's halt, shared by every replica that shares the state folder ([state] dir).

Theory of operation. The record (ops.haltrecord: what it holds, and the pure decisions) is
one file in the state folder, `canary-halt.json`, rewritten whole (files.write_atomically:
a temporary file, fsynced, renamed) under an flock on `canary-halt.json.lock`
(files.locked), and read without the lock (a rename is atomic: a reader sees one record or
the next). Mode 0640: nothing in it is secret (pins, counts, a replica's name), and an
operators' group may read it where the folder lets them; nobody else needs to.

`SharedHalt.sync` runs once before the server accepts (a halt outlives a restart), then
after every look of the file poller (lifecycle.Reloads.watch_files, every
keystore.reload_poll_interval: no loop of its own), and at once when this machine's judge
decides (it wakes the poller: `CanaryJudge.on_decision`). Each time:

1. If this machine's judge changed since the last sync (it halted on its own evidence, or
   `dualproxy canary resume` resumed it), the decision is written: under the lock, the
   record there is read and the next generation written (ops.haltrecord.next_record). Two
   replicas deciding at once write two generations; the later stands, and both apply it.
2. Otherwise the record is read and `haltrecord.decide` says what to do: a halt or a resume
   another replica wrote is taken by the judge (`CanaryJudge.follow`, naming that replica,
   so that the log, /status.json and the status page say "halted by replica X"); a record
   of another rotation is ignored and said once; one already seen changes nothing.

With workers, the supervisor does this for the machine (its judge tells the workers); a
worker never reads the record. Whatever goes wrong with the file (unreadable, not a record
dualproxy wrote, a folder it may not write) is logged once, with whose fault and what to do,
and serving goes on: a record that cannot be read is ignored; a decision that cannot be
written stays this server's own and is tried again at each poll.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Protocol

import trio

from dualproxy.files import locked, write_atomically
from dualproxy.ops import haltrecord
from dualproxy.ops.evidence import CanaryJudge, Evidence
from dualproxy.ops.haltrecord import Action, HaltRecord, RecordError, RotationId
from dualproxy.serve.lifecycle import Material

__all__ = ["RECORD_FILE", "RECORD_MODE", "SharedHalt", "record_path", "replica_name"]

log = logging.getLogger("dualproxy")

RECORD_FILE: Final = "canary-halt.json"
RECORD_MODE: Final = 0o640


def record_path(state_dir: Path) -> Path:
    """Where the halt record of the replicas sharing `state_dir` is."""
    return state_dir / RECORD_FILE


def replica_name() -> str:
    """How this process names itself in the records it writes: the host (a pod's name on
    Kubernetes) and the process id, which tell replicas apart also on one machine."""
    return f"{socket.gethostname()} pid {os.getpid()}"


class Sharing(Protocol):
    """A server, as the shared halt sees it (serve.server.Server, serve.supervisor.Supervisor)."""

    @property
    def material(self) -> Material: ...

    @property
    def evidence(self) -> Evidence: ...


# The judge's state, as compared between syncs: (halted, halts, resumes).
_JudgeState = tuple[bool, int, int]


def _state_of(judge: CanaryJudge) -> _JudgeState:
    return judge.halted, judge.halts, judge.resumes


@dataclass(frozen=True, slots=True)
class _Outcome:
    """What one look at the record found (the blocking part's answer)."""

    record: HaltRecord | None = None  # the record read, or written
    problem: str | None = None  # why the record could not be read or written


class SharedHalt:
    """The machine's side of the halt record (the module docstring). One per serving
    process that judges: a single server, or a supervisor."""

    def __init__(self, server: Sharing, *, name: str | None = None) -> None:
        self._server = server
        self.name = name if name is not None else replica_name()
        self._seen: int | None = None  # the generation last read or written here
        self._known = _state_of(server.evidence.canary)  # the judge after the last sync
        self._said: str | None = None  # the last problem or stale record logged (said once)
        self.syncs = 0  # completed (tests wait for them)

    async def sync(self) -> None:
        """Share what this machine's judge decided, or take what another replica decided
        (the module docstring). Never raises: the canary's record must not stop a server."""
        try:
            await self._sync()
        except Exception:  # our bug, not the operator's: logged, and serving goes on
            log.exception("canary halt record: sync failed unexpectedly; tried again next poll")
        self.syncs += 1

    async def _sync(self) -> None:
        material = self._server.material
        judge = self._server.evidence.canary
        path = record_path(material.config.state.dir)
        rotation = _rotation_of(material)
        before = _state_of(judge)
        if before != self._known and rotation is not None:
            decision = _Decision(
                rotation, judge.halted, judge.why, _instant(judge.halted_at), self.name
            )
            outcome = await trio.to_thread.run_sync(_write, path, decision, self._seen or 0)
            self._written(path, outcome, before)
        else:
            self._known = before  # nothing to share without a rotation
            outcome = await trio.to_thread.run_sync(_read, path)
            if _state_of(judge) == before:  # else it decided meanwhile: shared next time
                self._read(path, outcome, rotation, judge)

    def _written(self, path: Path, outcome: _Outcome, shared: _JudgeState) -> None:
        if outcome.problem is not None:
            # Kept unshared: the next sync tries again (self._known is left behind).
            self._say_once(
                logging.ERROR,
                f"canary decision not shared: cannot write {path} ({outcome.problem}); the"
                " other replicas keep their own canary and a restart forgets it. Make"
                " [state] dir a folder this user may write (state.dir)",
            )
            return
        record = outcome.record
        assert record is not None
        self._seen, self._known, self._said = record.generation, shared, None
        what = "halt" if record.halted else "resume"
        log.info(
            "canary %s shared with the replicas of %s (generation %d)",
            what,
            path.parent,
            record.generation,
        )

    def _read(
        self, path: Path, outcome: _Outcome, rotation: RotationId | None, judge: CanaryJudge
    ) -> None:
        if outcome.problem is not None:
            self._say_once(
                logging.WARNING,
                f"canary halt record {path} ignored: {outcome.problem}. Delete it (the next"
                " halt or resume writes a new one) or fix its permissions; meanwhile this"
                " replica's canary follows its own evidence",
            )
            return
        self._said = None
        record = outcome.record
        action = haltrecord.decide(record, rotation=rotation, seen=self._seen, halted=judge.halted)
        if record is None or action is Action.SEEN:
            return
        self._seen = record.generation
        if action is Action.STALE:
            serving = rotation.describe() if rotation is not None else "no rotation"
            self._say_once(
                logging.INFO,
                f"canary halt record {path} (generation {record.generation}, by"
                f" {record.by}) is another rotation's ({record.rotation.describe()}; this"
                f" server serves {serving}): ignored until a halt or resume of this one"
                " replaces it",
            )
            return
        if action is Action.FOLLOW:
            judge.follow(record.halted, record.why, record.at.timestamp(), by=record.by)
            _log_followed(record, path, self._server.material)
        self._known = _state_of(judge)

    def _say_once(self, level: int, message: str) -> None:
        if message != self._said:
            self._said = message
            log.log(level, "%s", message)


def _log_followed(record: HaltRecord, path: Path, material: Material) -> None:
    if record.halted:
        rotation = material.config.rotation
        default = rotation.default if rotation is not None else "old"
        log.error(
            "CANARY HALTED by replica %s (the halt record %s): %s; hint-less clients get the"
            " default key (%s) again; resume with `dualproxy canary resume` on any replica"
            " once the cause is fixed",
            record.by,
            path,
            record.why,
            default,
        )
    else:
        log.warning(
            "canary resumed by replica %s (the halt record %s); samples start from zero",
            record.by,
            path,
        )


def _rotation_of(material: Material) -> RotationId | None:
    rotation = material.config.rotation
    if rotation is None:
        return None
    pins = {name: key.pin for name, key in material.snapshot.keys.items()}
    return haltrecord.rotation_id(rotation, pins)


def _instant(halted_at: float | None) -> datetime:
    """When the judge halted, or now (a resume)."""
    return datetime.fromtimestamp(halted_at, UTC) if halted_at is not None else datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class _Decision:
    """This machine's judge's state, to be written."""

    rotation: RotationId
    halted: bool
    why: str | None
    at: datetime
    by: str


def _read(path: Path) -> _Outcome:
    """Blocking: the record in `path` (none when missing), or why it cannot be read."""
    try:
        return _Outcome(record=_parse(path))
    except _Unusable as exc:
        return _Outcome(problem=str(exc))


def _write(path: Path, decision: _Decision, seen: int) -> _Outcome:
    """Blocking: under the record's lock, the next generation after the record there (or
    `seen`) with `decision`; the record written, or why it could not be."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with locked(path):
            try:
                current = _parse(path)
            except _Unusable:
                current = None  # replaced: the reader that met it said so
            record = haltrecord.next_record(
                current,
                seen=seen,
                rotation=decision.rotation,
                halted=decision.halted,
                why=decision.why,
                at=decision.at,
                by=decision.by,
            )
            write_atomically(path, record.to_bytes(), mode=RECORD_MODE)
    except OSError as exc:
        return _Outcome(problem=exc.strerror or str(exc))
    return _Outcome(record=record)


class _Unusable(Exception):
    """The record file exists but is no record we can use (the message says why)."""


def _parse(path: Path) -> HaltRecord | None:
    try:
        with path.open("rb") as file:
            data = file.read(haltrecord.MAX_RECORD_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _Unusable(f"cannot read it: {exc.strerror}") from None
    try:
        return haltrecord.parse_record(data)
    except RecordError as exc:
        raise _Unusable(f"it is not a record dualproxy wrote ({exc})") from None
