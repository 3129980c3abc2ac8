"""Log lines (ops.logformat): the text format as logging writes it, the per-connection event
in JSON with exactly the text line's fields, and `log_event`.

The text line is read back here by the tests' own parser (helpers.logs), never by the code
that writes it: the JSON fields must be what a reader of the text line finds.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Final

import pytest
from helpers.logs import LOG_FIELDS, parse_log_line

from dualproxy.ops.logformat import JsonFormatter, TextFormatter, log_event
from dualproxy.rotation.policy import Choice, Reason
from dualproxy.serve.connection import ConnectionRecord, peer_address
from dualproxy.tls.clienthello import ClientHello
from dualproxy.tls.outcome import Outcome

LOGGER: Final = "dualproxy.test-logformat"


def hello(sni: str | None, *alpn: bytes) -> ClientHello:
    return ClientHello(0x0303, (), sni, alpn, (), (), ())


def finished(**fields: object) -> ConnectionRecord:
    """A record as the server logs it: ended, with these fields set."""
    record = ConnectionRecord(peer="203.0.113.7:4242")
    for name, value in fields.items():
        setattr(record, name, value)
    record.end()
    return record


def text_of(value: object) -> str:
    """A JSON field's value as the text line writes it."""
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(value)
    return str(value)


def escaped_peer() -> ConnectionRecord:
    record = finished(outcome=Outcome.INTERNAL_ERROR)
    record.peer, _ = peer_address(("not an address", 1))  # escaped in the text line
    return record


CASES: Final[dict[str, Callable[[], ConnectionRecord]]] = {
    "typical": lambda: finished(
        hello=hello("api.example.com", b"h2", b"http/1.1"),
        choice=Choice("old", Reason.DEFAULT),
        key="k2026a",
        outcome=Outcome.OK,
        tls_version="TLSv1.3",
        requests=3,
    ),
    # Client-controlled text the text format must quote: quotes, equals, spaces, a newline.
    "client-text": lambda: finished(
        hello=hello('evil"sni=x', b"h2 outcome=ok", b"x\nconn peer=forged"),
        choice=Choice("new", Reason.HINT_SNI),
        key="k2026b",
        outcome=Outcome.CLIENT_ABORTED,
        detail='weird "sni" = \\ \x00 é',
    ),
    "nothing-known": finished,  # no hello, no choice
    "no-sni-no-alpn": lambda: finished(
        hello=hello(None), outcome=Outcome.TIMEOUT, detail="handshake"
    ),
    # An empty SNI is quoted in text, so it is "" in JSON too; a "-" reads as none in both.
    "empty-sni-dash-detail": lambda: finished(hello=hello(""), detail="-"),
    "escaped-peer": escaped_peer,
}


@pytest.mark.parametrize("case", CASES)
async def test_the_json_event_has_exactly_the_text_lines_fields(case: str) -> None:
    record = CASES[case]()
    entry = logging.LogRecord(LOGGER, logging.INFO, __file__, 1, record, (), None)
    text = TextFormatter().format(entry)
    line = parse_log_line(text.split(" INFO ", 1)[1])
    document = json.loads(JsonFormatter().format(entry))
    assert list(document) == ["time", "level", "event", *LOG_FIELDS]  # no "message"
    assert (document["event"], document["level"]) == ("conn", "info")
    assert {name: text_of(document[name]) for name in LOG_FIELDS} == line
    assert isinstance(document["requests"], int)
    assert isinstance(document["ms"], int)
    assert document["alpn"] is None or isinstance(document["alpn"], list)


async def test_client_text_keeps_its_value_in_json() -> None:
    """What the text line quotes is the client's own text in JSON, unescaped; none is null."""
    record = finished(
        hello=hello('evil"sni=x', b"h2 outcome=ok", b"x\nconn peer=forged"),
        detail='weird "sni" = \\ \x00 é',
        requests=3,
    )
    entry = logging.LogRecord(LOGGER, logging.INFO, __file__, 1, record, (), None)
    document = json.loads(JsonFormatter().format(entry))
    assert document["sni"] == 'evil"sni=x'
    assert document["alpn"] == ["h2 outcome=ok", "x\nconn peer=forged"]
    assert document["detail"] == record.detail
    assert document["peer"] == "203.0.113.7:4242"
    assert (document["identity"], document["key"], document["tls"]) == (None, None, None)
    assert document["requests"] == 3
    assert "\n" not in str(record)  # the text line stays one line


def test_other_lines_are_messages_in_json() -> None:
    """The twin: a line that is not an event (even one that reads like a conn line) is a
    message, formatted as text would format it."""
    for message, args in [("reload failed", ()), ("%s", ("conn peer=1.2.3.4:5 sni=x",))]:
        entry = logging.LogRecord(LOGGER, logging.ERROR, __file__, 1, message, args, None)
        document = json.loads(JsonFormatter().format(entry))
        assert document == {
            "time": document["time"],
            "level": "error",
            "message": entry.getMessage(),
        }


async def test_a_record_keeps_its_duration_once_ended() -> None:
    """The line's `ms` is fixed when the connection ends, whenever a handler formats it."""
    record = finished()
    first = str(record)
    assert parse_log_line(first)["ms"] == str(record.ms)
    assert str(record) == first


async def test_log_event_logs_as_logger_info_without_looking_for_the_caller(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger(LOGGER)
    caplog.set_level(logging.INFO, logger=LOGGER)
    record = finished()
    log_event(logger, record)
    logger.info(record)  # the twin: logging's own call, which looks
    ours, theirs = caplog.records
    assert ours.msg is theirs.msg is record
    assert ours.getMessage() == theirs.getMessage() == str(record)
    assert (ours.name, ours.levelno) == (theirs.name, theirs.levelno) == (LOGGER, logging.INFO)
    assert (ours.lineno, ours.funcName) == (0, "(unknown function)")
    assert theirs.funcName == "test_log_event_logs_as_logger_info_without_looking_for_the_caller"
    caplog.clear()
    caplog.set_level(logging.WARNING, logger=LOGGER)
    log_event(logger, record)  # below the level: no record at all
    assert caplog.records == []


@pytest.mark.parametrize("offsets", [(0.0, 0.25, 0.999, 1.0, 61.5, 3600.001)])
def test_text_lines_read_as_loggings_own_format(offsets: tuple[float, ...]) -> None:
    """The time text made once per second is the one logging.Formatter makes for each line."""
    reference = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    ours = TextFormatter()
    start = 1_800_000_000.0
    for offset in (*offsets, *offsets):  # each second again, after others
        entry = logging.LogRecord("dualproxy", logging.INFO, "", 0, "conn peer=-", (), None)
        entry.created = start + offset
        entry.msecs = (entry.created - int(entry.created)) * 1000
        assert ours.format(entry) == reference.format(entry)
