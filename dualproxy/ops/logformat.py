"""How log lines are written: `TextFormatter` (the default) and `JsonFormatter`
(`dualproxy serve --log-format json`, one JSON object per line).

Text lines are `time level message`, as logging.basicConfig's usual format writes them. In
JSON, the per-connection line (`conn peer=... key=...`, see server.ConnectionRecord.log_line)
becomes an object with `"event": "conn"` and one member per field, so a log pipeline needs no
parser of its own:

    {"time": "2026-12-10T12:00:00.123Z", "level": "info", "event": "conn",
     "peer": "203.0.113.7:51234", "sni": "api.example.com", "alpn": ["h2", "http/1.1"],
     "identity": "old", "key": "k2026a", "reason": "default", "outcome": "ok", "detail": null,
     "tls": "TLSv1.3", "requests": 3, "ms": 412}

Every other line is {"time", "level", "message"} (and "exception" with a traceback).

The fields are read back from the text line rather than taken from the record: the line is
built once per connection anyway, and this keeps the per-connection path exactly as it is.
The text format makes that exact: values are bare tokens, or quoted with the escapes of
Python's unicode_escape codec (server._log_value), which `codecs.decode` reverses.
"""

from __future__ import annotations

import codecs
import json
import logging
import re
import time
from datetime import UTC, datetime
from typing import Final

__all__ = ["JsonFormatter", "TextFormatter", "conn_fields"]

_FIELD: Final = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')
_INTEGERS: Final = frozenset({"requests", "ms"})
# logging.Formatter's default_time_format and default_msec_format, as it writes asctime.
_TIME_FORMAT: Final = "%Y-%m-%d %H:%M:%S"
_MSEC_FORMAT: Final = "%s,%03d"


def conn_fields(line: str) -> dict[str, object] | None:
    """The fields of a `conn ...` line, typed (None for "-", ints, ALPN as a list); None
    for any other line."""
    if not line.startswith("conn "):
        return None
    fields: dict[str, object] = {}
    for name, raw in _FIELD.findall(line[len("conn ") :]):
        value: str | None
        if raw.startswith('"') and raw.endswith('"') and len(raw) >= 2:
            value = codecs.decode(raw[1:-1], "unicode_escape")
        else:
            value = None if raw == "-" else raw
        if value is not None and name in _INTEGERS and value.lstrip("-").isdigit():
            fields[name] = int(value)
        elif value is not None and name == "alpn":
            fields[name] = value.split(",")
        else:
            fields[name] = value
    return fields


class TextFormatter(logging.Formatter):
    """`%(asctime)s %(levelname)s %(message)s`, written as logging.Formatter writes it, with
    the date and time text made once per second instead of once per line: there is a line per
    connection, and strftime is a good part of its cost."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(message)s")
        # (second, its text) in one attribute: a line logged from a worker thread reads both
        # from the same assignment.
        self._second_text: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        cached, text = self._second_text
        if second != cached:
            text = time.strftime(_TIME_FORMAT, self.converter(record.created))
            self._second_text = (second, text)
        return _MSEC_FORMAT % (text, record.msecs)


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        moment = datetime.fromtimestamp(record.created, UTC)
        out: dict[str, object] = {
            "time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
        }
        fields = conn_fields(message)
        if fields is not None:
            out["event"] = "conn"
            out.update(fields)
        else:
            out["message"] = message
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)
