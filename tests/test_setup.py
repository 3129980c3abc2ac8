"""scripts/lib.sh, which scripts/dev and scripts/test run on a fresh clone: making the virtual
environment says what it does, step by step (the first run takes a minute or two), and a
later run that has nothing to do says nothing.

Run on a copy of the script with a stand-in interpreter whose `-m venv` makes a `pip` that
takes a few seconds and succeeds (or fails): what is tested is the script's own output and
exit status, not pip.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Final

SCRIPTS: Final = Path(__file__).resolve().parent.parent / "scripts"
# Bounds the whole script run; the stand-in pip takes PIP_SECONDS.
TIMEOUT: Final = 60.0
PIP_SECONDS: Final = 3

FAKE_PYTHON: Final = """#!/usr/bin/env bash
# A stand-in interpreter: -c answers the script's probes, -m venv makes a pip that sleeps.
case "$1" in
    -c) exit 0 ;;
    -m) dir="${@: -1}"; mkdir -p "$dir/bin"
        printf '#!/usr/bin/env bash\\nsleep %s\\nexit %s\\n' "$PIP_SECONDS" "$PIP_EXIT" \\
            > "$dir/bin/pip"
        chmod +x "$dir/bin/pip" ;;
esac
"""


def clone(tmp_path: Path) -> Path:
    root = tmp_path / "clone"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(SCRIPTS / "lib.sh", root / "scripts" / "lib.sh")
    (root / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (root / "constraints.txt").write_text("")
    python = tmp_path / "python3"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return root


def ensure_venv(
    root: Path, tmp_path: Path, *, pip_exit: int = 0
) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHON": str(tmp_path / "python3"),
        "PIP_SECONDS": str(PIP_SECONDS),
        "PIP_EXIT": str(pip_exit),
        "SETUP_PROGRESS_EVERY": "1",
    }
    return subprocess.run(
        ["bash", "-c", f"source {root / 'scripts' / 'lib.sh'} && ensure_venv"],
        capture_output=True, text=True, env=env, timeout=TIMEOUT, check=False,
    )  # fmt: skip


def test_the_first_set_up_says_each_step_and_a_later_run_nothing(tmp_path: Path) -> None:
    root = clone(tmp_path)
    first = ensure_venv(root, tmp_path)
    assert first.returncode == 0, first.stderr
    lines = first.stderr.splitlines()
    assert lines[0].startswith(f"setup: creating {root / '.venv'} (first run")
    assert lines[1].startswith("setup: installing dualproxy and its pinned dependencies")
    assert "a minute or two" in lines[1]
    assert any(line.startswith("setup: still installing (") for line in lines[2:-1]), lines
    assert lines[-1].startswith("setup: .venv ready in ")
    # The twin: nothing changed, nothing to do, nothing said.
    again = ensure_venv(root, tmp_path)
    assert (again.returncode, again.stderr) == (0, "")


def test_a_failed_install_stops_the_script_and_is_redone_next_time(tmp_path: Path) -> None:
    root = clone(tmp_path)
    failed = ensure_venv(root, tmp_path, pip_exit=1)
    assert failed.returncode != 0
    assert ".venv ready" not in failed.stderr
    assert not (root / ".venv" / ".dualproxy-stamp").exists()
    redone = ensure_venv(root, tmp_path)
    assert redone.returncode == 0, redone.stderr
    assert "setup: installing" in redone.stderr
