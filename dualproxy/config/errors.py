"""The operator's error: what is wrong, where (the file and the config key path) and what to do.

One class for every layer: the config loader, the key store, key generation and the command
line raise it, and the command line prints it once, as `error: FILE: KEY.PATH: problem; fix`
with exit code 1. It lives here, in the lowest layer, so that every layer can raise it.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["OperatorError", "locate"]


class OperatorError(Exception):
    """The operator must act: a config value, a key or chain file, a signing key, a service the
    command talks to is wrong or unusable.

    `problem` says what is wrong; `key_path` the config key (`keys.k2026a.chain`, "" when no
    key is at fault); `file` the file; `fix` what to do, when `problem` does not already say
    it. str() is the whole line after `error: `. Never carries key material: raisers put
    names, paths, modes and pins in it, never a key's bytes or a parser's message about them.
    """

    def __init__(
        self, problem: str, *, key_path: str = "", file: Path | None = None, fix: str = ""
    ) -> None:
        self.problem = problem
        self.key_path = key_path
        self.file = file
        self.fix = fix
        super().__init__(locate(self.message, key_path=key_path, file=file))

    @property
    def message(self) -> str:
        """The problem and what to do, without where: for a caller that says where itself."""
        return f"{self.problem}; {self.fix}" if self.fix else self.problem


def locate(text: str, *, key_path: str = "", file: Path | None = None) -> str:
    """`text` preceded by where it applies, `FILE: KEY.PATH: text`, leaving out what is not
    known; the shape of every operator-facing message (errors, check findings, warnings)."""
    where = [str(part) for part in (file, key_path) if part]
    return ": ".join([*where, text])
