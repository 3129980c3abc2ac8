"""`dualproxy rehearse` (issue 19 item 4): the example config and fleet pass; a plan that breaks
a version that must keep working fails naming it; the canary drill halts; a "when-safe" window
is held at grace_end and closed at grace_deadline; the dev bench's keys; the fleet table's
errors. Real server, real TLS clients on loopback (dev.rehearse)."""

from __future__ import annotations

import ipaddress
import logging
import re
import shutil
from pathlib import Path
from typing import Final

import pytest
import trustme
from helpers.configs import make_config
from helpers.keys import make_key

from dualproxy.cli import main as cli
from dualproxy.config.errors import OperatorError
from dualproxy.config.loader import load as load_config
from dualproxy.dev import rehearse
from dualproxy.dev.rehearse import Rehearsal, Row, read_fleet

REPO: Final = Path(__file__).resolve().parent.parent
# Clients per phase in these tests: every version gets a few, and a 50 % canary sees dozens.
CLIENTS: Final = 40


@pytest.fixture
def example(tmp_path: Path) -> Path:
    """The repository's config.toml and fleet.toml, copied (no key files: stand-ins)."""
    for name in ("config.toml", "fleet.toml"):
        shutil.copy(REPO / name, tmp_path / name)
    return tmp_path / "config.toml"


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


def row(result: Rehearsal, step: str, version: str) -> Row:
    [found] = [r for r in result.rows if r.step == step and r.version.startswith(version)]
    return found


def test_the_example_config_and_fleet_rehearse_cleanly(
    example: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["rehearse", "-c", str(example), "--clients", str(CLIENTS)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert err == ""
    assert "every version that must keep working did, in every phase" in out
    assert "stand-in keys" in out
    assert "pins unchanged" in out
    # The version accepted as lost (must_work = false) is shown failing at grace_end...
    assert re.search(r"grace_end\s+4\.0 \(old pin only\)\s+\d+\s+0\s+\d+\s+k2026b", out)
    # ...and the new-pin-only version is not in the field before grace_start.
    assert not re.search(r"^before\s+5\.0", out, re.MULTILINE)


def test_a_new_pin_only_version_shipped_before_grace_start_fails_the_rehearsal(
    example: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edit(example.parent / "fleet.toml", 'ships = "grace_start"', "ships = 2026-11-01T00:00:00Z")
    code = cli.main(["rehearse", "-c", str(example), "--clients", str(CLIENTS)])
    _, err = capsys.readouterr()
    assert code == 1
    assert "error: version 5.0 (new pin, SNI hint):" in err
    assert " at before" in err
    assert "must keep working" in err
    assert "4.1" not in err


def test_a_version_without_a_backup_pin_that_must_work_fails_at_grace_end(
    example: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edit(example.parent / "fleet.toml", "share = 0.05\nmust_work = false", "share = 0.05")
    code = cli.main(["rehearse", "-c", str(example), "--clients", str(CLIENTS)])
    _, err = capsys.readouterr()
    assert code == 1
    assert re.search(r"error: version 4\.0 \(old pin only\): \d+ of \d+ at grace_end", err)
    assert "at before" not in err


def test_the_canary_drill_halts_and_a_when_safe_window_is_held_then_closed_at_the_deadline(
    example: Path,
) -> None:
    edit(example, "canary_percent = 0 ", "canary_percent = 50 ")
    edit(example, '# close = "at-grace-end" ', 'close = "when-safe" ')
    edit(example, "# grace_deadline = ", "grace_deadline = ")
    config = load_config(example, check_files=False)
    fleet = read_fleet(example.parent / "fleet.toml", tuple(config.keys))
    result = rehearse.rehearse(config, fleet, clients=CLIENTS)
    notes = "\n".join(result.notes)
    assert re.search(r"canary drill: halted after \d+ old-pin-only canary clients", notes)
    assert "grace_end: window held" in notes
    assert "grace_deadline: window closed-at-deadline" in notes
    # Held at grace_end: the old-pin-only version still works for hint-less clients outside
    # the canary; at the deadline it fails whatever the evidence.
    held, closed = row(result, "grace_end", "4.0"), row(result, "grace_deadline", "4.0")
    assert held.keys["k2026a"] > 0
    assert closed.pin_failures == closed.attempts > 0
    assert closed.keys == {"k2026b": closed.attempts}
    # In the window the canary sends some hint-less clients to the new key (the fleet's
    # old-pin-only version may halt it: then the drill resumes it first).
    window = (
        row(result, "window", "4.1").keys["k2026b"] + row(result, "window", "4.0").keys["k2026b"]
    )
    assert window > 0
    assert result.broken() == []


def test_an_at_grace_end_window_has_no_drill_and_closes_at_grace_end(example: Path) -> None:
    config = load_config(example, check_files=False)
    fleet = read_fleet(example.parent / "fleet.toml", tuple(config.keys))
    result = rehearse.rehearse(config, fleet, clients=CLIENTS)
    assert [step.name for step in rehearse.steps(config.rotation)] == [  # type: ignore[arg-type]
        "before",
        "renewal",
        "window",
        "grace_end",
    ]
    assert "grace_end: the window is over" in result.notes
    assert row(result, "grace_end", "4.1").keys == {
        "k2026b": row(result, "grace_end", "4.1").attempts
    }


def test_hints_by_sni_alpn_and_network_reach_their_side(example: Path, tmp_path: Path) -> None:
    fleet_file = tmp_path / "hints.toml"
    fleet_file.write_text(
        "".join(
            f'[[version]]\nname = "{hint}"\npins = ["{side}"]\nhint = "{hint}"\n'
            f'ships = "grace_start"\nmust_work = false\n'
            for hint, side in (
                ("sni", "new"),
                ("alpn", "new"),
                ("network", "new"),
                ("old-sni", "old"),
                ("none", "old"),
            )
        )
    )
    config = load_config(example, check_files=False)
    result = rehearse.rehearse(config, read_fleet(fleet_file, tuple(config.keys)), clients=25)
    for hint in ("sni", "alpn", "network"):
        window = row(result, "window", hint)
        assert window.keys == {"k2026b": window.attempts}
        assert window.ok == window.attempts
    for hint in ("old-sni", "none"):
        window = row(result, "window", hint)
        assert window.keys == {"k2026a": window.attempts}
        assert row(result, "grace_end", hint).pin_failures == window.attempts


def test_the_dev_bench_keys_rehearse_with_the_example_fleet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(
        [
            "rehearse",
            "--dev",
            "--dir",
            str(tmp_path / "dev"),
            "--fleet",
            str(REPO / "fleet.toml"),
            "--clients",
            str(CLIENTS),
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "stand-in" not in out  # the bench's own keys
    assert re.search(r"window\s+5\.0 \(new pin, SNI hint\)\s+\d+\s+\d+\s+0\s+new", out)


def test_a_config_without_rotation_has_nothing_to_rehearse(tmp_path: Path) -> None:
    key = make_key(trustme.CA(), tmp_path / "certs", "k1")
    with pytest.raises(OperatorError, match="nothing to rehearse"):
        rehearse.rehearse(make_config([key], base_dir=tmp_path), ())


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('[[version]]\nname = "a"\npins = ["k9"]\n', r"version\[0\]\.pins: 'k9' is neither"),
        ('[[version]]\nname = "a"\nhint = "dns"\n', r"version\[0\]\.hint: 'dns' is not a hint"),
        (
            '[[version]]\nname = "a"\n[[version]]\nname = "a"\n',
            r"version\[1\]\.name: 'a' is named twice",
        ),
        ('[[version]]\nname = "a"\nships = "soon"\n', r"version\[0\]\.ships: expected an instant"),
        ('[[version]]\nname = "a"\nshare = 0\n', r"every share is 0"),
        (
            '[[version]]\nname = "a"\nmust_wrok = true\n',
            r"version\[0\]\.must_wrok: unknown setting; did you mean 'must_work'",
        ),
        ('[[versions]]\nname = "a"\n', r"unknown setting 'versions'"),
        ("", r"version: missing"),
    ],
    ids=["pin", "hint", "twice", "ships", "no-share", "typo", "top-level", "empty"],
)
def test_fleet_table_errors_name_the_key(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    with pytest.raises(OperatorError, match=problem) as caught:
        read_fleet(path, ("k2026a", "k2026b"))
    assert str(path) in str(caught.value)


def test_a_valid_fleet_table_reads(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(
        '[[version]]\nname = "a"\npins = ["k2026a", "new"]\nhint = "alpn"\nmanifest = true\n'
        "share = 0.3\nmust_work = false\nships = 2026-12-02T00:00:00Z\n"
    )
    [version] = read_fleet(path, ("k2026a", "k2026b"))
    assert version.pins == ("k2026a", "new")
    assert (version.hint, version.manifest, version.share, version.must_work) == (
        "alpn",
        True,
        0.3,
        False,
    )


def test_a_missing_fleet_table_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(OperatorError, match="no fleet table here") as caught:
        read_fleet(tmp_path / "fleet.toml", ())
    assert "--fleet" in str(caught.value)


def test_the_command_leaves_the_callers_log_level_as_it_found_it(example: Path) -> None:
    logger = logging.getLogger("dualproxy")
    before = logger.level
    assert cli.main(["rehearse", "-c", str(example), "--clients", "10"]) == 0
    assert logger.level == before


def test_a_machine_without_the_loopback_addresses_is_told_so_before_anything_runs(
    example: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """macOS answers only 127.0.0.1: every client would fail for a reason no plan has. Here a
    documentation range (RFC 5737), local nowhere, stands for that."""
    config = load_config(example, check_files=False)
    fleet = read_fleet(example.parent / "fleet.toml", tuple(config.keys))
    monkeypatch.setattr(rehearse, "CLIENT_RANGE", ipaddress.IPv4Network("192.0.2.0/24"))
    with pytest.raises(
        OperatorError, match=r"cannot use the loopback address 192\.0\.2\.1"
    ) as caught:
        rehearse.rehearse(config, fleet, clients=CLIENTS)
    assert "run it on Linux" in str(caught.value)


def test_more_clients_than_addresses_come_round_again(
    example: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many clients over many phases outnumber the range: addresses are reused, as a
    returning client reuses its own (six addresses here, 10 clients a phase)."""
    config = load_config(example, check_files=False)
    fleet = read_fleet(example.parent / "fleet.toml", tuple(config.keys))
    monkeypatch.setattr(rehearse, "CLIENT_RANGE", ipaddress.IPv4Network("127.1.0.0/29"))
    result = rehearse.rehearse(config, fleet, clients=10)
    assert sum(row.attempts for row in result.rows) > 6
    assert all(row.errors == 0 for row in result.rows)
    assert result.broken() == []
