"""How a connection ended: its `Outcome`, and whose fault a failed handshake was.

The vocabulary of the per-connection log line (`outcome=`), of the evidence's counts and of
the metrics' labels. It lives here, below everything that counts or logs connections, because
it is about TLS: whether the client aborted the handshake after seeing our certificate (what a
pinning client does when it rejects our key) or our side failed it.

`Outcome` is a StrEnum: a member is the str it logs, usable as a dict key or a label as is.
"""

from __future__ import annotations

import enum
import errno
import re
import ssl
from typing import Final

import trio

__all__ = ["Outcome", "classify_handshake_failure"]


class Outcome(enum.StrEnum):
    """How a connection ended, as logged and counted."""

    OK = "ok"  # handshake completed and at least one request answered
    # As OK, but the upstream failed at least one of them: we answered 502, 503 or 504
    # (logged at WARNING, with why in the detail).
    UPSTREAM_ERROR = "upstream-error"
    NO_REQUEST = "no-request"  # handshake completed, closed without a request
    CLIENT_ABORTED = "client-aborted"  # alert or close from the client during the handshake
    TLS_ERROR = "tls-error"  # the handshake failed on our side (no shared cipher, old version)
    TIMEOUT = "timeout"  # hello or handshake not complete within handshake_timeout
    NO_HELLO = "no-hello"  # closed before a complete ClientHello (port scans, TCP health checks)
    PLAIN_HTTP = "plain-http"  # plain HTTP sent to the TLS port; answered 400
    # A PROXY protocol header missing, malformed, or from a peer not allowed to send one
    # ([listen] proxy_protocol): closed without an answer, the detail says which.
    PROXY_REFUSED = "proxy-refused"
    # Closed at once: the client already held limits.max_connections_per_client.
    CLIENT_LIMIT = "client-limit"
    ACME_CHALLENGE = "acme-challenge"  # an ACME CA validating tls-alpn-01 (acme.challenges)
    SHUTDOWN = "shutdown"  # the server stopped while the connection was open
    INTERNAL_ERROR = "internal-error"  # a bug in dualproxy, logged with its traceback


# OpenSSL reports an alert received from the peer with a reason such as
# "SSLV3_ALERT_BAD_CERTIFICATE" or "TLSV1_ALERT_UNKNOWN_CA".
_RECEIVED_ALERT: Final = re.compile(r"^(?:SSLV3|TLSV1|TLSV13)_ALERT_([A-Z0-9_]+)$")


def classify_handshake_failure(exc: BaseException) -> tuple[Outcome, str]:
    """Whose fault a failed server handshake was: the client's (it aborted) or ours; with the
    detail to log (the alert's name, "closed", the errno's name or OpenSSL's reason).

    `exc` is what the handshake raised: trio.BrokenResourceError with the cause as its
    __cause__ (as our TLS stream and trio's raise it), or the cause itself.
    """
    cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
    if isinstance(cause, ssl.SSLEOFError) or cause is None:
        return Outcome.CLIENT_ABORTED, "closed"
    if isinstance(cause, ssl.SSLError):
        # OpenSSL sets .reason (maybe to None); an SSLError raised by Python code has none.
        reason = getattr(cause, "reason", None) or ""
        alert = _RECEIVED_ALERT.match(reason)
        if alert:
            return Outcome.CLIENT_ABORTED, alert.group(1).lower()
        if reason == "UNEXPECTED_EOF_WHILE_READING":
            return Outcome.CLIENT_ABORTED, "closed"
        return Outcome.TLS_ERROR, reason.lower() or type(cause).__name__
    if isinstance(cause, OSError):  # reset by the client mid-handshake
        return Outcome.CLIENT_ABORTED, errno.errorcode.get(cause.errno or 0, "reset").lower()
    return Outcome.TLS_ERROR, type(cause).__name__
