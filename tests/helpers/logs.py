"""The server's `conn` and `access` log lines, read as a log pipeline would: parsed from the
text alone (never through the code that writes them), and collected from pytest's caplog."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

import pytest
import trio

from helpers.clients import CLIENT_TIMEOUT

# Every field of a `conn` log line, in order.
LOG_FIELDS: Final = (
    "peer",
    "sni",
    "alpn",
    "identity",
    "key",
    "reason",
    "outcome",
    "detail",
    "tls",
    "requests",
    "ms",
)
_LOG_FIELD: Final = r'[a-z]+=(?:"(?:[^"\\]|\\.)*"|[^\s"=\\]+)'
_LOG_LINE: Final = re.compile(rf"conn(?: {_LOG_FIELD})+")


def parse_log_line(line: str) -> dict[str, str]:
    """A `conn` line as {field: value}, quoted values unescaped; fails on anything else."""
    assert _LOG_LINE.fullmatch(line), line
    fields = {}
    for item in re.findall(_LOG_FIELD, line):
        key, _, value = item.partition("=")
        if value.startswith('"'):
            value = value[1:-1].replace('\\"', '"').encode().decode("unicode_escape")
        fields[key] = value
    assert tuple(fields) == LOG_FIELDS, line
    return fields


@dataclass
class ConnLog:
    """The `conn ...` lines the server logged, as parsed fields."""

    caplog: pytest.LogCaptureFixture

    def lines(self) -> list[str]:
        messages = (r.getMessage() for r in self.caplog.records if r.name == "dualproxy")
        return [m for m in messages if m.startswith("conn ")]

    async def wait(self, count: int = 1) -> list[dict[str, str]]:
        """The first `count` lines, once logged (a handler logs after closing its socket)."""
        with trio.fail_after(CLIENT_TIMEOUT):
            while len(self.lines()) < count:
                await trio.sleep(0.01)
        return [parse_log_line(line) for line in self.lines()]

    async def one(self) -> dict[str, str]:
        lines = await self.wait(1)
        assert len(lines) == 1, lines
        return lines[0]


# --- the access log (ops.accesslog): one line per request ----------------------------------

# Every field of an access line, in order.
ACCESS_FIELDS: Final = (
    "peer",
    "method",
    "path",
    "proto",
    "status",
    "in",
    "out",
    "ms",
    "upstream_ms",
    "key",
    "reason",
    "ended",
)
_ACCESS_FIELD: Final = r'[a-z_]+=(?:"(?:[^"\\]|\\.)*"|[^\s"=\\]+)'
_ACCESS_LINE: Final = re.compile(
    rf"(\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d,\d{{3}}) (INFO|WARNING) access((?: {_ACCESS_FIELD})+)"
)


def parse_access_line(line: str) -> dict[str, str]:
    """A text access line as {field: value} (plus "level"), quoted values unescaped."""
    match = _ACCESS_LINE.fullmatch(line)
    assert match, line
    fields = {"level": match.group(2)}
    for item in re.findall(_ACCESS_FIELD, match.group(3)):
        key, _, value = item.partition("=")
        if value.startswith('"'):
            value = value[1:-1].replace('\\"', '"').encode().decode("unicode_escape")
        fields[key] = value
    assert tuple(fields)[1:] == ACCESS_FIELDS, line
    return fields
