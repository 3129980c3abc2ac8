"""serve.sharedhalt: the canary's halt record between real servers (constructed in this process,
each with its own judge, sharing one state folder), synced by hand as the file poller syncs
them. What the processes do with it end to end: tests/test_replicas.py."""

from __future__ import annotations

import logging
import re
import stat
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import pytest
import trio
import trustme
from helpers.configs import make_config
from helpers.keys import KeyFiles, make_key
from helpers.rotation import open_canary_window

from dualproxy.config.schema import Config
from dualproxy.ops import admin, statuspage
from dualproxy.ops.haltrecord import HaltRecord, RotationId, parse_record
from dualproxy.serve.server import Server
from dualproxy.serve.sharedhalt import RECORD_FILE

# An app version whose reports halt the canary: three canary clients (REPORT_HALT_CLIENTS).
FAILING: Final = [("2.1", 3)]
WAIT: Final = 30.0


@pytest.fixture
def keys(ca: trustme.CA, tmp_path: Path) -> tuple[KeyFiles, KeyFiles]:
    return make_key(ca, tmp_path / "certs", "k2026a"), make_key(ca, tmp_path / "certs", "k2026b")


def config_for(
    keys: tuple[KeyFiles, KeyFiles], tmp_path: Path, state: str = "state", **extra: Any
) -> Config:
    return make_config(
        list(keys),
        base_dir=tmp_path,
        rotation=open_canary_window(100),
        extra={"state": {"dir": state}, "keystore": {"reload_poll_interval": 3600}, **extra},
    )


def replica(config: Config, name: str) -> Server:
    server = Server(config, handle_signals=False, share_state=True)
    assert server.shared_halt is not None
    server.shared_halt.name = name
    return server


def halt(server: Server) -> None:
    """The canary halts on this server's own evidence (its clients' reports)."""
    judge = server.evidence.canary
    judge.review_reports(server.config.rotation, FAILING, in_window=True)
    assert judge.halted


async def sync(*servers: Server) -> None:
    for server in servers:
        assert server.shared_halt is not None
        await server.shared_halt.sync()


def record(config: Config) -> HaltRecord:
    return parse_record((config.state.dir / RECORD_FILE).read_bytes())


def messages(caplog: pytest.LogCaptureFixture, pattern: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if re.search(pattern, r.getMessage())]


async def test_a_halt_on_one_replica_reaches_the_other_and_a_resume_on_either_clears_it(
    keys: tuple[KeyFiles, KeyFiles], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = config_for(keys, tmp_path)
    a, b = replica(config, "replica-a"), replica(config, "replica-b")
    await sync(a, b)
    assert not (config.state.dir / RECORD_FILE).exists()  # nothing decided, nothing written
    assert not b.evidence.canary.halted

    halt(a)
    await sync(a, b)
    written = record(config)
    assert (written.generation, written.halted, written.by) == (1, True, "replica-a")
    assert written.why == a.evidence.canary.why
    assert stat.S_IMODE((config.state.dir / RECORD_FILE).stat().st_mode) == 0o640
    judge = b.evidence.canary
    assert (judge.halted, judge.why, judge.by) == (True, written.why, "replica-a")
    # Where the halt came from, in each place an operator looks.
    canary = admin.status_of(b).to_json()["canary"]
    assert isinstance(canary, dict)
    assert (canary["halted"], canary["halted_by"]) == (True, "replica-a")
    assert "by replica replica-a (the state folder's halt record)" in statuspage.render_text(
        admin.status_of(b)
    )
    scraped = admin.Admin(b).scrape().decode()
    assert "dualproxy_canary_halted_by_replica 1.0" in scraped
    assert "dualproxy_canary_halted_by_replica 0.0" in admin.Admin(a).scrape().decode()
    assert messages(caplog, r"CANARY HALTED by replica replica-a \(the halt record ")

    # A restart: a new process on the same folder starts halted.
    restarted = replica(config, "replica-b2")
    await sync(restarted)
    assert restarted.evidence.canary.halted

    assert b.evidence.canary.resume()  # `dualproxy canary resume` on replica b
    await sync(b, a, restarted)
    assert (record(config).generation, record(config).halted) == (2, False)
    assert not a.evidence.canary.halted
    assert not restarted.evidence.canary.halted
    assert messages(caplog, r"canary resumed by replica replica-b")
    # Each generation is taken once: more polls change nothing, and say nothing more.
    before = len(caplog.records)
    await sync(a, b, a, b)
    assert len(caplog.records) == before


async def test_a_halt_shared_elsewhere_and_the_own_one_agree(
    keys: tuple[KeyFiles, KeyFiles], tmp_path: Path
) -> None:
    """Two replicas halting on their own evidence at the same moment write two generations
    under the lock (neither lost); each keeps its own reason, as both halted themselves."""
    config = config_for(keys, tmp_path)
    a, b = replica(config, "replica-a"), replica(config, "replica-b")
    halt(a)
    halt(b)
    assert a.shared_halt is not None
    assert b.shared_halt is not None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.shared_halt.sync)
        nursery.start_soon(b.shared_halt.sync)
    assert record(config).generation == 2
    await sync(a, b)
    assert (a.evidence.canary.by, b.evidence.canary.by) == (None, None)
    assert a.evidence.canary.halted
    assert b.evidence.canary.halted


def other_rotation_record(generation: int) -> bytes:
    start = datetime(2025, 1, 1, tzinfo=UTC)
    rotation = RotationId(("OLD=",), ("NEW=",), start, start + timedelta(days=30))
    at = datetime(2025, 1, 2, tzinfo=UTC)
    return HaltRecord(generation, rotation, True, "last year", at, "gone pid 1").to_bytes()


async def test_another_rotation_s_record_is_ignored_and_said_once(
    keys: tuple[KeyFiles, KeyFiles], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Last rotation's halt stops nothing now; said once, at INFO. Its twin, this rotation's
    halt, is taken (test_a_halt_on_one_replica_...)."""
    caplog.set_level(logging.INFO, logger="dualproxy")
    config = config_for(keys, tmp_path)
    config.state.dir.mkdir()
    (config.state.dir / RECORD_FILE).write_bytes(other_rotation_record(5))
    b = replica(config, "replica-b")
    await sync(b, b, b)
    assert not b.evidence.canary.halted
    said = messages(caplog, "is another rotation's")
    assert len(said) == 1
    assert "generation 5, by gone pid 1" in said[0]
    # A halt of this rotation replaces it, with the generation after it.
    halt(b)
    await sync(b)
    assert (record(config).generation, record(config).by) == (6, "replica-b")


@pytest.mark.parametrize(
    ("spoil", "problem"),
    [
        (lambda path: path.write_bytes(b'{"version": 1, "generation": "many"}'), "generation"),
        (lambda path: path.write_bytes(b"\x00" * 10), "not JSON"),
        (lambda path: path.mkdir(), "cannot read it"),
    ],
    ids=["not-our-shape", "not-json", "a-folder"],
)
async def test_a_record_that_cannot_be_used_is_said_once_and_ignored(
    keys: tuple[KeyFiles, KeyFiles],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    spoil: Callable[[Path], Any],
    problem: str,
) -> None:
    """Whose fault and what to do, once however many polls meet it; the replica serves on its
    own evidence; the next halt (of a replica that can write there) is shared again."""
    config = config_for(keys, tmp_path)
    config.state.dir.mkdir()
    path = config.state.dir / RECORD_FILE
    spoil(path)
    b = replica(config, "replica-b")
    await sync(b, b, b)
    said = messages(caplog, "canary halt record .* ignored")
    assert len(said) == 1, said
    assert problem in said[0]
    assert "Delete it" in said[0]
    assert not b.evidence.canary.halted
    if path.is_dir():
        path.rmdir()
    a = replica(config, "replica-a")
    halt(a)
    await sync(a, b)
    assert b.evidence.canary.by == "replica-a"


async def test_a_halt_that_cannot_be_written_is_said_once_and_tried_again(
    keys: tuple[KeyFiles, KeyFiles], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A state folder that cannot be made (a file is in the way: refused even to root): the
    halt stays this replica's own, the error (naming state.dir) is said once over several
    polls, and once the folder can be made the next poll shares it. (The ticket keys, which
    would stop the start there, are kept elsewhere.)"""
    (tmp_path / "blocker").write_text("a file, not a folder")
    tickets = {"ticket_key_file": "ticket.keys"}
    config = config_for(keys, tmp_path, state="blocker/state", tls=tickets)
    a = replica(config, "replica-a")
    halt(a)
    await sync(a, a, a)
    said = messages(caplog, "canary decision not shared")
    assert len(said) == 1, said
    assert "state.dir" in said[0]
    assert a.evidence.canary.halted
    (tmp_path / "blocker").unlink()
    await sync(a)
    assert record(config).by == "replica-a"


async def test_a_halt_wakes_the_file_poller_and_is_shared_at_once(
    keys: tuple[KeyFiles, KeyFiles], tmp_path: Path
) -> None:
    """A running server polls every hour here (reload_poll_interval 3600), yet its halt is
    in the record at once: the judge wakes the poller. Before the halt, no poll ran."""
    config = config_for(keys, tmp_path)
    a = replica(config, "replica-a")
    assert a.shared_halt is not None
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            syncs = a.shared_halt.syncs  # the one before serving
            await trio.sleep(0.2)
            assert (a.shared_halt.syncs, a.reloads.polls) == (syncs, 0)
            halt(a)
            while not (config.state.dir / RECORD_FILE).exists():
                await trio.sleep(0.02)
            nursery.cancel_scope.cancel()
    assert record(config).by == "replica-a"
    assert a.reloads.polls == 1
