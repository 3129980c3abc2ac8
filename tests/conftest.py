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


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def cafile(ca: trustme.CA, tmp_path: Path) -> Path:
    """The test CA's certificate as a file, for clients' --cacert."""
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path
