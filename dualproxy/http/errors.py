"""The one HTTP error of the package: a refusal, saying what to answer and whose fault it is.

Every layer of `dualproxy.http` that finds an exchange cannot go on raises `HttpRefusal`:
the head checks (`heads`: a malformed request is the client's fault, its status 400, 405,
414, 417, 431, 501 or 505; a malformed response the upstream's, 502), the body readers
(`body`: 400 for a request body, 502 for a response body), the upstream pool (`upstream`: 502
for a connection refused, reset or unverifiable, 504 for a timeout), the exchange
(`exchange`: 413, 408, 503), and the small servers (`smallserver`: a request they do not
answer as asked, the client's fault, with the headers that say what to do instead). Foreign
errors (trio's, ssl's, OSError) become one at the boundary where they happen, with
``raise ... from``. Whether a refusal can still be answered with its status, or
the client connection must be cut because the response already started, is the exchange's
decision (`exchange.Cut`).
"""

from __future__ import annotations

from typing import Final, Literal

__all__ = ["SNIPPET_BYTES", "Fault", "HttpRefusal", "snippet", "timeout_problem"]

# Received bytes quoted in an error: enough to recognise the offending field in a log, too
# short to reflect anything useful back through the plain-text error body.
SNIPPET_BYTES: Final = 40

# Whose fault a refusal is: the client's (a 4xx, or 501/505 for what it asked of us) or the
# upstream's (502, 504; the network's counts as the upstream's).
Fault = Literal["client", "upstream"]


class HttpRefusal(Exception):
    """An exchange that cannot go on: answer `status`, unless the response already started.

    `problem` is short, for the log and the plain-text error body; it quotes at most a
    `snippet` of received bytes and never a secret. `fault` says who caused it.
    `before_response` is False once a byte of the response existed (the upstream's reply had
    started arriving): what the relay's retry of an idempotent request keys on. `headers` go
    on the answer and say what to do instead (a 405's Allow, a 429's Retry-After).
    """

    status: int
    problem: str
    fault: Fault
    before_response: bool
    headers: tuple[tuple[bytes, bytes], ...]

    def __init__(
        self,
        status: int,
        problem: str,
        *,
        fault: Fault,
        before_response: bool = True,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        super().__init__(f"{int(status)} {problem}")
        self.status = int(status)
        self.problem = problem
        self.fault = fault
        self.before_response = before_response
        self.headers = headers


def snippet(data: bytes) -> str:
    """A bounded, escaped quote of received bytes for an error message."""
    quoted = repr(data[:SNIPPET_BYTES])[1:]  # b'...' -> '...'
    return quoted if len(data) <= SNIPPET_BYTES else f"{quoted}..."


def timeout_problem(waiting_for: Literal["send", "head", "body"], timeout: float) -> str:
    """What a wait on the upstream that took longer than `timeout` says (with 504, or in the
    note of a cut mid-body)."""
    if waiting_for == "send":
        return f"upstream did not take the request within {timeout:g} s"
    if waiting_for == "head":
        return f"no response head within {timeout:g} s"
    return f"response body stalled for {timeout:g} s"
