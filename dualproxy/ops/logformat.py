"""How log lines are written: `TextFormatter` (the default) and `JsonFormatter`
(`dualproxy serve --log-format json`, one JSON object per line), set up by `setup_logging`.

Text lines are `time level message`, as logging.basicConfig's usual format writes them. In
JSON, every line is {"time", "level", "message"} (and "exception" with a traceback), except
*events*: a message that is a `LogEvent` (the per-connection line, serve.connection's
ConnectionRecord) carries its fields, and becomes an object with `"event"` and one member per
field, so a log pipeline needs no parser of its own:

    {"time": "2026-12-10T12:00:00.123Z", "level": "info", "event": "conn",
     "peer": "203.0.113.7:51234", "sni": "api.example.com", "alpn": ["h2", "http/1.1"],
     "identity": "old", "key": "k2026a", "reason": "default", "outcome": "ok", "detail": null,
     "tls": "TLSv1.3", "requests": 3, "ms": 412}

An event is logged as the message object itself: logging calls `str()` on a message when a
formatter asks for it, so the text format writes the event's text line and nothing is built
that no handler writes; the JSON format reads the fields, never the text.

`log_event` logs one without looking for the caller's source file and line, which logging
otherwise finds by walking the stack for every record: no format of ours shows them, and the
connection line is logged once per connection.
"""

from __future__ import annotations

import abc
import json
import logging
import re
import sys
import time
from datetime import UTC, datetime
from typing import ClassVar, Final

__all__ = [
    "JsonFormatter",
    "LogEvent",
    "TextFormatter",
    "configured_format",
    "log_event",
    "log_value",
    "needs_quoting",
    "setup_logging",
]

# logging.Formatter's default_time_format and default_msec_format, as it writes asctime.
_TIME_FORMAT: Final = "%Y-%m-%d %H:%M:%S"
_MSEC_FORMAT: Final = "%s,%03d"
# What a LogRecord says of its caller when nobody looked (logging's own words for it).
_UNKNOWN_FILE: Final = "(unknown file)"
_UNKNOWN_FUNCTION: Final = "(unknown function)"


class LogEvent(abc.ABC):
    """A log message with fields: `str(event)` is its text line, `log_fields()` its JSON
    members (in the text line's order), `event` its name in JSON.

    Log it as the message itself, with no arguments: `log_event(logger, event)`, or
    `logger.info(event)`. Formatters read it when they write the record, so it must not
    change after it was logged.
    """

    __slots__ = ()
    event: ClassVar[str]

    @abc.abstractmethod
    def log_fields(self) -> dict[str, object]:
        """The event's fields for the JSON format, in the text line's order."""


# What a client-controlled log value may hold as it is: printable ASCII but for the quote, the
# backslash and "=" (which would forge a field).
_UNSAFE_LOG_CHARS: Final = re.compile(r"[^\x21-\x7e]|[\"\\=]")
# Its search: a match when log_value must quote the text (for a caller that inlines the check
# on a per-request path, ops.accesslog).
needs_quoting: Final = _UNSAFE_LOG_CHARS.search


def log_value(value: object) -> str:
    """Client-controlled text (SNI, ALPN, a request's path) for a log line: as it is when that
    is safe, else quoted with the escapes of Python's unicode_escape codec, so that it cannot
    forge log fields or lines; "-" for None."""
    if value is None:
        return "-"
    text = str(value)
    if text and not needs_quoting(text):
        return text
    escaped = text.encode("unicode_escape").decode("ascii").replace('"', '\\"')
    return f'"{escaped}"'


def log_event(logger: logging.Logger, event: LogEvent, level: int = logging.INFO) -> None:
    """`logger.log(level, event)`, without the search for the caller's file and line that
    logging makes for every record (a walk up the stack; see the module docstring)."""
    if logger.isEnabledFor(level):
        record = logger.makeRecord(
            logger.name, level, _UNKNOWN_FILE, 0, event, (), None, _UNKNOWN_FUNCTION
        )
        logger.handle(record)


# The format setup_logging chose, for the lines written beside logging (ops.accesslog).
_configured_format = "text"


def configured_format() -> str:
    """The log format of this process ("text" or "json"), as setup_logging set it."""
    return _configured_format


def setup_logging(log_format: str = "text", level: int = logging.INFO) -> None:
    """Log to stderr in `log_format` ("text", or "json" for one object per line), from `level`
    up; a no-op when logging is set up already (logging.basicConfig's rule)."""
    global _configured_format
    if not logging.getLogger().handlers:
        _configured_format = log_format
    # What no log line of ours shows, so nothing records it (the logging HOWTO's
    # "Optimization"): a log line per connection is part of every connection's cost.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    logging.basicConfig(level=level, handlers=[stderr])


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
        moment = datetime.fromtimestamp(record.created, UTC)
        out: dict[str, object] = {
            "time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
        }
        event = record.msg
        if isinstance(event, LogEvent) and not record.args:
            out["event"] = event.event
            out.update(event.log_fields())
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)
