"""The operator's errors: what is wrong, in which file and at which config key, and what to do."""

from __future__ import annotations

from pathlib import Path


class ConfigError(Exception):
    """The operator's configuration is wrong: says where (file, key path) and what to do."""

    def __init__(self, key_path: str, problem: str, *, file: Path | None = None) -> None:
        self.file = file
        self.key_path = key_path
        self.problem = problem
        where = f"{file}: " if file is not None else ""
        super().__init__(f"{where}{key_path}: {problem}" if key_path else f"{where}{problem}")
