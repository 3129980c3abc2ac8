"""Reading a decoded TOML table strictly: typed getters that say which key is wrong and how,
and `done()`, which rejects every key nobody asked for (a typo is an error, never ignored).
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Mapping
from datetime import UTC, datetime
from typing import Final, TypeVar

from dualproxy.config.errors import OperatorError

_T = TypeVar("_T")

# difflib ratio above which an unknown key is reported as a likely typo of a known one
# ("grace_ned" vs "grace_end" scores 0.89, unrelated keys of similar length about 0.3-0.5).
_TYPO_SIMILARITY: Final = 0.75
# The same, when a required key is missing and the table holds an unknown key: that key is
# most likely the required one misspelled, so a weaker likeness suffices ("grace_oops" vs
# "grace_end" scores 0.63, "lsiten" vs "listen" 0.67).
_MISSING_TYPO_SIMILARITY: Final = 0.5


class Table:
    """A TOML table being read: typed getters, and `done()` rejects keys nobody asked for.

    `known`, when given, is every key the table's reader may ask for: a required key that is
    missing is then reported as the unknown key beside it, the likely misspelling ("unknown
    setting; did you mean 'grace_end'?"), rather than as missing. Reading a key not in
    `known` is a bug of ours (AssertionError at `done()`), so the list cannot go stale.
    """

    def __init__(
        self, data: Mapping[str, object], prefix: str, known: Collection[str] | None = None
    ) -> None:
        self._data = data
        self._prefix = prefix
        self._seen: set[str] = set()
        self._known = frozenset(known) if known is not None else None

    def path(self, key: str) -> str:
        return f"{self._prefix}.{key}" if self._prefix else key

    def _get(self, key: str, kind: type[_T], kind_name: str, required: bool) -> _T | None:
        self._seen.add(key)
        if key not in self._data:
            if required:
                raise self.missing(key, f"add {kind_name}")
            return None
        value = self._data[key]
        # bool is an int in Python; TOML keeps them apart and so do we.
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise OperatorError(
                f"expected {kind_name}, got {_toml_type(value)} {value!r}", key_path=self.path(key)
            )
        return value

    def table(
        self, key: str, *, required: bool = False, known: Collection[str] | None = None
    ) -> Table | None:
        value = self._get(key, dict, "a table", required)
        return None if value is None else Table(value, self.path(key), known)

    def has(self, key: str) -> bool:
        return key in self._data

    def value(self, key: str) -> object:
        """A present key's value as TOML gave it, for a setting of several types (a number or
        a word); the caller checks it."""
        self._seen.add(key)
        return self._data[key]

    def names(self) -> list[str]:
        """Every key present (for tables whose keys are the operator's, like [upstream.headers])."""
        return list(self._data)

    def tables(self, *, known: Collection[str] | None = None) -> list[tuple[str, Table]]:
        """Every entry, each of which must be a table (like [keys.NAME]), each reading
        `known` keys."""
        out = []
        for key in self._data:
            sub = self.table(key, known=known)
            assert sub is not None
            out.append((key, sub))
        return out

    def string(self, key: str, *, required: bool = False) -> str | None:
        return self._get(key, str, "a string", required)

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key, bool, "true or false", False)
        return default if value is None else value

    def number(self, key: str, default: float, *, low: float, high: float) -> float:
        self._seen.add(key)
        value = self._data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise OperatorError(
                f"expected a number, got {_toml_type(value)}", key_path=self.path(key)
            )
        if not low <= value <= high:
            raise OperatorError(
                f"{value} is out of range; use {low} to {high}", key_path=self.path(key)
            )
        return float(value)

    def integer(self, key: str, default: int, *, low: int, high: int) -> int:
        value = self._get(key, int, "an integer", False)
        value = default if value is None else value
        if not low <= value <= high:
            raise OperatorError(
                f"{value} is out of range; use {low} to {high}", key_path=self.path(key)
            )
        return value

    def strings(self, key: str, *, one_allowed: bool = False) -> tuple[str, ...]:
        """A list of strings (or, with one_allowed, a single string); () when absent."""
        self._seen.add(key)
        if key not in self._data:
            return ()
        value = self._data[key]
        if one_allowed and isinstance(value, str):
            return (value,)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            expected = "a string or a list of strings" if one_allowed else "a list of strings"
            raise OperatorError(f"expected {expected}, got {value!r}", key_path=self.path(key))
        return tuple(value)

    def instant(self, key: str) -> datetime:
        self._seen.add(key)
        value = self._data.get(key)
        if value is None:
            raise self.missing(key, "add a TOML datetime like 2026-12-01T00:00:00Z")
        if isinstance(value, str):
            raise OperatorError(
                "write the time unquoted, as a TOML datetime (2026-12-01T00:00:00Z)",
                key_path=self.path(key),
            )
        if not isinstance(value, datetime):
            raise OperatorError(
                f"expected a datetime like 2026-12-01T00:00:00Z, got {value!r}",
                key_path=self.path(key),
            )
        if value.tzinfo is None:
            raise OperatorError(
                "the time has no zone; add Z (UTC) or an offset such as +01:00",
                key_path=self.path(key),
            )
        return value.astimezone(UTC)

    def missing(self, key: str, advice: str) -> OperatorError:
        """The error for a required key that is absent, pointing at a likely misspelling:
        with `known` keys, an unknown key first (see the class docstring)."""
        if self._known is not None:
            unknown = [k for k in self._data if k not in self._known]
            typo = difflib.get_close_matches(key, unknown, n=1, cutoff=_MISSING_TYPO_SIMILARITY)
            if typo:
                return OperatorError(
                    f"unknown setting; did you mean {key!r}? ({key} is required: {advice})",
                    key_path=self.path(typo[0]),
                )
        strangers = [k for k in self._data if k not in self._seen and k != key]
        typo = difflib.get_close_matches(key, strangers, n=1, cutoff=_TYPO_SIMILARITY)
        found = f" (found {typo[0]!r}: misspelled?)" if typo else ""
        return OperatorError(f"missing; {advice}{found}", key_path=self.path(key))

    def done(self) -> None:
        assert self._known is None or self._seen <= self._known, (
            f"{self._prefix}: read {sorted(self._seen - self._known)}, not in its known keys"
        )
        unknown = [k for k in self._data if k not in self._seen]
        if unknown:
            raise self._unknown(unknown[0])

    def _unknown(self, key: str) -> OperatorError:
        candidates = self._known if self._known is not None else self._seen
        known = difflib.get_close_matches(key, candidates, n=1, cutoff=_TYPO_SIMILARITY)
        advice = f"did you mean {known[0]!r}?" if known else "check it against config.toml"
        return OperatorError(f"unknown setting; {advice}", key_path=self.path(key))


def _toml_type(value: object) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "a table",
        datetime: "a datetime",
    }.get(type(value), type(value).__name__)
