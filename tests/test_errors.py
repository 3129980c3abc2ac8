"""config/errors.py: the operator's error says what is wrong, where and what to do, in one line
shaped `FILE: KEY.PATH: problem; fix`, each part left out when it is not known."""

from __future__ import annotations

from pathlib import Path

import pytest

from dualproxy.config.errors import OperatorError, locate
from dualproxy.pinning.manifest import ManifestError

FILE = Path("/etc/dualproxy/config.toml")


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (
            OperatorError("is empty", key_path="keys.a.names", file=FILE, fix="list names"),
            f"{FILE}: keys.a.names: is empty; list names",
        ),
        (OperatorError("is empty", key_path="keys.a.names"), "keys.a.names: is empty"),
        (OperatorError("not found", file=FILE), f"{FILE}: not found"),
        (OperatorError("admin unreachable", fix="start it"), "admin unreachable; start it"),
        (OperatorError("3 of 3 certificate(s) not obtained"), "3 of 3 certificate(s) not obtained"),
    ],
)
def test_the_line_an_operator_reads(error: OperatorError, line: str) -> None:
    assert str(error) == line
    assert error.args == (line,)


def test_the_parts_stay_apart() -> None:
    error = OperatorError("is empty", key_path="keys.a.names", file=FILE, fix="list names")
    assert (error.problem, error.key_path, error.file, error.fix) == (
        "is empty",
        "keys.a.names",
        FILE,
        "list names",
    )
    # What a caller that says where itself shows (the dev bench names its option instead).
    assert error.message == "is empty; list names"
    assert OperatorError("is empty", file=FILE).message == "is empty"


def test_locate_is_the_shape_of_findings_and_warnings_too() -> None:
    assert locate("expires soon", key_path="keys.a.chain", file=FILE) == (
        f"{FILE}: keys.a.chain: expires soon"
    )
    assert locate("expires soon") == "expires soon"


def test_a_manifest_error_is_an_operator_error_callers_can_tell_apart() -> None:
    error = ManifestError("expired at 2026-12-01T00:00:00Z")
    assert isinstance(error, OperatorError)
    assert str(error) == error.problem == "expired at 2026-12-01T00:00:00Z"
    assert not isinstance(OperatorError("expired"), ManifestError)
