"""serve/announce.py: the summary a server logs once it serves, and the lines when the grace
window opens and closes (the watcher, on trio's MockClock: a 40-second window without a wait).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import pytest
import trio
import trio.testing
import trustme
from helpers.configs import make_config
from helpers.keys import KeyFiles, make_key

from dualproxy.config.schema import Config
from dualproxy.serve import announce
from dualproxy.tls import keystore

BASE: Final = datetime(2026, 12, 10, 16, 15, tzinfo=UTC)


@pytest.fixture
def mock_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


@pytest.fixture
def keys(ca: trustme.CA, tmp_path: Path) -> list[KeyFiles]:
    return [make_key(ca, tmp_path / "certs", name) for name in ("k2026a", "k2026b")]


def rotated(keys: list[KeyFiles], tmp_path: Path, start: datetime, end: datetime) -> Config:
    return make_config(
        keys,
        base_dir=tmp_path,
        rotation={
            "old": "k2026a", "new": "k2026b", "grace_start": start, "grace_end": end,
            "hints": {"new": {"sni": ["k2.api.example.com"]}},
        },
        extra={"upstream": {"url": "https://api.example.com"}},
    )  # fmt: skip


def test_the_summary_names_keys_phase_upstream_and_every_listener(
    keys: list[KeyFiles], tmp_path: Path
) -> None:
    config = rotated(keys, tmp_path, BASE, BASE + timedelta(seconds=40))
    snapshot = keystore.load_snapshot(config)
    lines = announce.summary(
        config,
        snapshot,
        BASE + timedelta(seconds=10),
        tls=[("127.0.0.1", 8443)],
        http01=("0.0.0.0", 80),
        admin="http://127.0.0.1:9901/",
    )
    old, new = snapshot.keys["k2026a"], snapshot.keys["k2026b"]
    assert lines[0] == (
        f"keys: k2026a (retiring, ECDSA P-256, sha256/{old.pin}, until 3000-01-01 00:00Z);"
        f" k2026b (current, ECDSA P-256, sha256/{new.pin}, until 3000-01-01 00:00Z)"
    )
    assert lines[1] == (
        "rotation: grace window open: until 2026-12-10 16:15:40Z, hinted clients get their"
        " side, others get old"
    )
    assert lines[2] == "upstream: https://api.example.com"
    assert lines[3] == (
        "listeners: TLS 127.0.0.1:8443; http-01 and redirects http://0.0.0.0:80/;"
        " admin http://127.0.0.1:9901/"
    )
    # The twin: no rotation, no upstream, no other listener.
    plain = make_config(keys[:1], base_dir=tmp_path)
    lines = announce.summary(plain, keystore.load_snapshot(plain), BASE, tls=[("::1", 443)])
    assert lines[1:] == [
        "rotation: none; every client gets the configured keys",
        "upstream: none: dualproxy answers every request itself",
        "listeners: TLS [::1]:443",
    ]


def test_phase_changes_in_words(keys: list[KeyFiles], tmp_path: Path) -> None:
    rotation = rotated(keys, tmp_path, BASE, BASE + timedelta(seconds=40)).rotation
    during, after = BASE + timedelta(seconds=1), BASE + timedelta(seconds=41)
    assert announce.phase_change(rotation, "before", during) == (
        "grace window opened (rotation.grace_start 2026-12-10 16:15:00Z): until"
        " 2026-12-10 16:15:40Z, hinted clients get their side, others get old"
    )
    assert announce.phase_change(rotation, "during", after) == (
        "grace window closed (rotation.grace_end 2026-12-10 16:15:40Z): everyone gets new"
        " (k2026b); old (k2026a) is retired"
    )
    assert announce.phase_change(rotation, "during", during) is None
    assert announce.phase_change(None, "single", during) is None


@dataclass
class Served:
    config: Config


async def test_the_watcher_logs_the_window_opening_and_closing_once_each(
    keys: list[KeyFiles],
    tmp_path: Path,
    mock_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dualproxy")
    start = trio.current_time()

    def clock() -> datetime:
        return BASE + timedelta(seconds=trio.current_time() - start)

    served = Served(
        rotated(keys, tmp_path, BASE + timedelta(seconds=10), BASE + timedelta(seconds=50))
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(announce.watch_window, served, clock)
        await trio.sleep(30)
        opened = [r.getMessage() for r in caplog.records]
        await trio.sleep(60)
        # A reload that moves the window back before now is said too.
        served.config = replace(served.config, rotation=rotated(
            keys, tmp_path, clock() + timedelta(hours=1), clock() + timedelta(hours=2)
        ).rotation)  # fmt: skip
        await trio.sleep(announce.WINDOW_CHECK_INTERVAL + 1)
        nursery.cancel_scope.cancel()
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" (")[0] for line in opened] == ["grace window opened"]
    assert [line.split(" (")[0] for line in lines] == [
        "grace window opened",
        "grace window closed",
        "grace window not open yet",
    ]


async def test_the_watcher_is_quiet_without_a_change(
    keys: list[KeyFiles],
    tmp_path: Path,
    mock_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dualproxy")
    served = Served(rotated(keys, tmp_path, BASE - timedelta(days=1), BASE + timedelta(days=1)))
    with trio.move_on_after(3 * announce.WINDOW_CHECK_INTERVAL):
        await announce.watch_window(served, lambda: BASE)
    assert caplog.records == []


def test_a_when_safe_window_is_announced_closed_by_the_evidence_or_at_its_deadline(
    keys: list[KeyFiles], tmp_path: Path
) -> None:
    """Issue 19 item 3 with the start-up lines: past grace_end a held window is still open (no
    line), the evidence's close and the deadline each say which closed it."""
    plain = rotated(keys, tmp_path, BASE, BASE + timedelta(seconds=40)).rotation
    assert plain is not None
    deadline = BASE + timedelta(seconds=100)
    rotation = replace(
        plain, default="old", close="when-safe", max_breakage=0.005, grace_deadline=deadline
    )
    held = BASE + timedelta(seconds=41)
    assert announce.phase_change(rotation, "during", held) is None
    assert announce.phase_change(rotation, "during", held, window_closed=True) == (
        "grace window closed by the evidence (rotation.close = when-safe): everyone gets new"
        " (k2026b); old (k2026a) is retired"
    )
    assert announce.phase_change(rotation, "during", deadline) == (
        "grace window closed at rotation.grace_deadline 2026-12-10 16:16:40Z: everyone gets new"
        " (k2026b); old (k2026a) is retired"
    )
    snapshot_config = replace(
        rotated(keys, tmp_path, BASE, BASE + timedelta(seconds=40)), rotation=rotation
    )
    lines = announce.summary(
        snapshot_config, keystore.load_snapshot(snapshot_config), held, tls=[("127.0.0.1", 8443)]
    )
    assert lines[1] == (
        "rotation: grace window held open past grace_end (2026-12-10 16:15:40Z) until it is safe"
        ' to close (rotation.close = "when-safe"), at the latest until 2026-12-10 16:16:40Z:'
        " hinted clients get their side, others get old"
    )
