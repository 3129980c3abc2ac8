"""How a connection ended (tls.outcome): whose fault a failed handshake was, from what the
handshake raised, without a server or a socket."""

from __future__ import annotations

import errno
import json
import ssl

import pytest
import trio

from dualproxy.tls.outcome import Outcome, classify_handshake_failure


def _ssl_error(reason: str | None, kind: type[ssl.SSLError] = ssl.SSLError) -> ssl.SSLError:
    exc = kind(1, f"[SSL: {reason}]")
    if reason is not None:
        exc.reason = reason
    return exc


def _describe(value: object) -> str:
    if isinstance(value, tuple):
        return str(value[0])
    assert isinstance(value, BaseException)
    wrapped = isinstance(value, trio.BrokenResourceError)
    cause = value.__cause__ if wrapped else value
    name = getattr(cause, "reason", None) or type(cause).__name__
    return f"broken-{name}" if wrapped else name


def _broken(cause: BaseException | None) -> trio.BrokenResourceError:
    exc = trio.BrokenResourceError()
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        # The client sent an alert: it aborted, and the alert names why.
        (_broken(_ssl_error("TLSV1_ALERT_UNKNOWN_CA")), (Outcome.CLIENT_ABORTED, "unknown_ca")),
        (
            _broken(_ssl_error("SSLV3_ALERT_BAD_CERTIFICATE")),
            (Outcome.CLIENT_ABORTED, "bad_certificate"),
        ),
        (
            _broken(_ssl_error("SSLV3_ALERT_CERTIFICATE_UNKNOWN")),
            (Outcome.CLIENT_ABORTED, "certificate_unknown"),
        ),
        (
            _broken(_ssl_error("TLSV13_ALERT_CERTIFICATE_REQUIRED")),
            (Outcome.CLIENT_ABORTED, "certificate_required"),
        ),
        # The client closed or reset mid-handshake.
        (
            _broken(_ssl_error("UNEXPECTED_EOF_WHILE_READING")),
            (Outcome.CLIENT_ABORTED, "closed"),
        ),
        (_broken(_ssl_error(None, ssl.SSLEOFError)), (Outcome.CLIENT_ABORTED, "closed")),
        (_broken(None), (Outcome.CLIENT_ABORTED, "closed")),
        (
            _broken(ConnectionResetError(errno.ECONNRESET, "reset")),
            (Outcome.CLIENT_ABORTED, "econnreset"),
        ),
        (_broken(BrokenPipeError(errno.EPIPE, "pipe")), (Outcome.CLIENT_ABORTED, "epipe")),
        (_broken(OSError("no errno")), (Outcome.CLIENT_ABORTED, "reset")),
        # OpenSSL refused the client: our side ended it.
        (_broken(_ssl_error("NO_SHARED_CIPHER")), (Outcome.TLS_ERROR, "no_shared_cipher")),
        (_broken(_ssl_error("WRONG_VERSION_NUMBER")), (Outcome.TLS_ERROR, "wrong_version_number")),
        # Not an alert: "ALERT" elsewhere in the reason does not make it one.
        (_broken(_ssl_error("TLSV1_ALERTX")), (Outcome.TLS_ERROR, "tlsv1_alertx")),
        (_broken(_ssl_error(None)), (Outcome.TLS_ERROR, "SSLError")),
        (_broken(_ssl_error("")), (Outcome.TLS_ERROR, "SSLError")),
        (_broken(ValueError("odd")), (Outcome.TLS_ERROR, "ValueError")),
        # Unwrapped exceptions are classified the same way.
        (_ssl_error("TLSV1_ALERT_UNKNOWN_CA"), (Outcome.CLIENT_ABORTED, "unknown_ca")),
        (ssl.SSLEOFError(), (Outcome.CLIENT_ABORTED, "closed")),
    ],
    ids=lambda value: _describe(value),
)
def test_classify_handshake_failure(exc: BaseException, expected: tuple[Outcome, str]) -> None:
    assert classify_handshake_failure(exc) == expected


def test_an_outcome_is_the_str_it_logs() -> None:
    """The evidence keys its counts by Outcome members and the metrics label them: a member
    must be its value wherever a str is (equal, same hash, formatted, in JSON)."""
    counts: dict[str, int] = {Outcome.CLIENT_ABORTED: 1}
    assert counts["client-aborted"] == 1
    assert f"{Outcome.NO_REQUEST}" == str(Outcome.NO_REQUEST) == "no-request"
    assert json.dumps([Outcome.OK]) == '["ok"]'
    # Its twin: another outcome's value is not it.
    other: str = "no-request"
    assert other != Outcome.OK
    assert "ok" not in counts
