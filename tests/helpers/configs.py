"""Configs for the tests: parsed from a dict, or written as a real config.toml and loaded."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from dualproxy.config.loader import load, parse
from dualproxy.config.schema import Config
from helpers.keys import KeyFiles


def make_config(
    keys: Sequence[KeyFiles],
    *,
    rotation: dict[str, Any] | None = None,
    base_dir: Path,
    listen: str = "127.0.0.1:0",
    extra: dict[str, Any] | None = None,
) -> Config:
    data: dict[str, Any] = {
        "listen": {"address": listen},
        "keys": {k.name: k.table() for k in keys},
        **(extra or {}),
    }
    if rotation is not None:
        data["rotation"] = rotation
    return parse(data, base_dir=base_dir)


# --- config files on disk: config reloads, `dualproxy route`, `dualproxy serve` ---------------


def config_toml(data: dict[str, Any]) -> str:
    """`data`, shaped as config.loader.parse takes it, as the text of a config.toml."""
    import json
    import re

    def key(name: str) -> str:
        return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)

    def value(item: object) -> str:
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, datetime):
            return item.isoformat()  # an aware datetime: a TOML offset date-time
        if isinstance(item, int | float):
            return repr(item)
        if isinstance(item, str):
            return json.dumps(item)  # JSON's string escapes are a subset of TOML's
        if isinstance(item, list | tuple):
            return "[" + ", ".join(value(element) for element in item) + "]"
        raise TypeError(f"no TOML form for {item!r}")

    def table(content: dict[str, Any], name: str) -> list[str]:
        lines = [f"[{name}]"] if name else []
        lines += [f"{key(k)} = {value(v)}" for k, v in content.items() if not isinstance(v, dict)]
        for k, v in content.items():
            if isinstance(v, dict):
                lines += ["", *table(v, f"{name}.{key(k)}" if name else key(k))]
        return lines

    return "\n".join(table(data, "")) + "\n"


def write_config(
    path: Path,
    keys: Sequence[KeyFiles],
    *,
    rotation: dict[str, Any] | None = None,
    listen: str = "127.0.0.1:0",
    extra: dict[str, Any] | None = None,
) -> Config:
    """make_config through a real file, read back with config.loader.load as `dualproxy serve` does.

    The file is replaced in one rename, so a polling server never reads half of it.
    """
    data: dict[str, Any] = {
        "listen": {"address": listen},
        "keys": {k.name: k.table() for k in keys},
        **(extra or {}),
    }
    if rotation is not None:
        data["rotation"] = rotation
    partial = path.with_name(path.name + ".partial")
    partial.write_text(config_toml(data), encoding="utf-8")
    partial.replace(path)
    return load(path)
