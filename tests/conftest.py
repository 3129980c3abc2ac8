"""Fixtures shared by every test module: a trustme CA and its certificate as a file.

Helpers (keys, configs, a running server, real clients) live in the `helpers` package; the
Hypothesis profile (fast, or deep with HYPOTHESIS_PROFILE=deep) is loaded here, before any test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme
from helpers import profiles

profiles.load()


@pytest.fixture(autouse=True)
def runtime_folder(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Where servers record their admin listener (ops.admin.runtime_folder) for `dualproxy
    status`: a folder of each test's own (servers started as processes inherit it), never
    the machine's, which other runs of the suite share."""
    folder = tmp_path_factory.mktemp("run")
    folder.chmod(0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(folder))
    return folder / "dualproxy"


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def cafile(ca: trustme.CA, tmp_path: Path) -> Path:
    """The test CA's certificate as a file, for clients' --cacert."""
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path
