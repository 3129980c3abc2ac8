"""The per-request access log: one line per request (an HTTP/1.1 request or an HTTP/2 stream),
written through a buffer as nginx's `access_log ... buffer=64k flush=1s` is.

A line is made when its exchange ends (`AccessLog.exchange`, called through the connection
record) and appended to the buffer; the buffer is written out when it holds BUFFER_BYTES, at
least every FLUSH_SECONDS (`run`, beside the server), at once for a line at WARNING (an
upstream failure: 502, 503, 504), and when the server stops (`close`): a clean stop loses no
line. The target is stderr, with the other log lines (the default), or a file (`[log] access
= PATH`, opened for appending and reopened by `reopen`, which SIGUSR1 calls, for logrotate).

The text line has the other lines' shape (`time level message`, as ops.logformat's
TextFormatter writes them):

    2026-12-10 12:00:00,123 INFO access peer=203.0.113.7:51234 method=GET path=/v1/items?id=1
      proto=HTTP/2 status=200 in=0 out=512 ms=12 upstream_ms=10 key=k2026a reason=default
      ended=-

(one line), in this order; `ended` says why the exchange did not end well (a refusal, a cut,
the client leaving), "-" when it did; `upstream_ms` is "-" for an answer of our own. The path
(the request target as the client sent it: path and query) is bounded to MAX_PATH_CHARS and
escaped as every client-controlled log value is (ops.logformat's `log_value`). In JSON
(`--log-format json`) the same fields are members, numbers as numbers and none as null:
{"time", "level", "event": "access", "peer", "method", "path", ...}.
"""

from __future__ import annotations

import io
import json
import os
import select
import stat
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Final

import trio

from dualproxy.ops.logformat import log_value, needs_quoting

__all__ = [
    "BUFFER_BYTES",
    "FLUSH_SECONDS",
    "MAX_PATH_CHARS",
    "AccessLog",
]

# nginx's access_log buffer=64k flush=1s: a busy server writes 64 KiB at a time (a few hundred
# lines per write instead of one), a quiet one still shows a line within a second.
BUFFER_BYTES: Final = 64 * 1024
FLUSH_SECONDS: Final = 1.0
# A request target longer than this is logged cut, with "..." (the request line may be 8 KiB:
# max_request_line_bytes); 1024 keeps every real API path and query whole.
MAX_PATH_CHARS: Final = 1024
_TIME_FORMAT: Final = "%Y-%m-%d %H:%M:%S"
# The upstream failed the exchange (the statuses we answer for it): a WARNING, written at once.
_UPSTREAM_FAILURES: Final = frozenset({502, 503, 504})
# Looked up rather than made per line. The methods: tokens, which never need quoting (others,
# from an HTTP/2 stream refused for its fields, are escaped); the protocols, by version.
_METHODS: Final = {
    method.encode(): method
    for method in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT")
}
_PROTOCOLS: Final = {b"1.1": "HTTP/1.1", b"1.0": "HTTP/1.0", b"2": "HTTP/2"}
_MILLISECONDS: Final = tuple(f"{ms:03d}" for ms in range(1000))


class AccessLog:
    """The buffered access log of one server (see the module docstring)."""

    def __init__(self, path: Path | None, *, json_lines: bool = False) -> None:
        """`path`: the file to append to; None for stderr. `json_lines`: JSON objects."""
        self._path = path
        self._json = json_lines
        self._out: IO[str] = sys.stderr if path is None else _open(path)
        self._whole = _appends_whole(self._out)
        self._lines: list[str] = []
        self._size = 0
        self._second = -1
        self._second_text = ""
        self.lines_written = 0

    def exchange(
        self,
        peer: str,
        method: bytes,
        target: bytes,
        version: bytes,
        status: int,
        bytes_in: int,
        bytes_out: int,
        seconds: float,
        upstream_seconds: float | None,
        key: str | None,
        reason: str | None,
        ended: str | None,
    ) -> None:
        """Log one exchange; `status` 0 when no response went out, `ended` None when it ended
        well. An upstream failure (502, 503, 504) is a WARNING, written at once.

        Called once per request, so the text line is made with as few steps as it takes (the
        method and protocol looked up, the path escaped only when it must be, the time's
        second formatted once per second): it cost 6% of a keep-alive request as first
        written, see docs/performance.md."""
        warning = status in _UPSTREAM_FAILURES
        now = time.time()
        path = target.decode("latin-1")
        if len(path) > MAX_PATH_CHARS:
            path = path[:MAX_PATH_CHARS] + "..."
        proto = _PROTOCOLS.get(version) or "HTTP/" + version.decode("ascii")
        ms = round(seconds * 1000)
        upstream_ms = None if upstream_seconds is None else round(upstream_seconds * 1000)
        if self._json:
            line = _json_line(
                now,
                warning,
                (peer, method.decode("latin-1"), path, proto),
                (status, bytes_in, bytes_out, ms, upstream_ms),
                (key, reason, ended),
            )
        else:
            second = int(now)
            if second != self._second:
                self._second = second
                self._second_text = time.strftime(_TIME_FORMAT, time.localtime(now))
            line = (
                f"{self._second_text},{_MILLISECONDS[int((now - second) * 1000)]}"
                f" {'WARNING' if warning else 'INFO'} access peer={peer}"
                f" method={_METHODS.get(method) or log_value(method.decode('latin-1'))}"
                f" path={path if path and not needs_quoting(path) else log_value(path)}"
                f" proto={proto} status={status or '-'} in={bytes_in} out={bytes_out} ms={ms}"
                f" upstream_ms={'-' if upstream_ms is None else upstream_ms}"
                f" key={key or '-'} reason={reason or '-'}"
                f" ended={'-' if ended is None else log_value(ended)}"
            )
        self._lines.append(line)
        self._size += len(line) + 1
        if warning or self._size >= BUFFER_BYTES:
            self.flush()

    def flush(self) -> None:
        """Write the buffered lines out."""
        if not self._lines:
            return
        lines, self._lines, self._size = self._lines, [], 0
        out = self._out
        try:
            if self._whole:
                out.write("\n".join(lines) + "\n")
                out.flush()
            else:
                for piece in _pieces(lines):
                    out.write(piece)
                    out.flush()
        except (OSError, ValueError):
            return  # a full disk or a closed stderr must not take the server down
        self.lines_written += len(lines)

    def reopen(self) -> None:
        """Write what is buffered, then open the file again (logrotate moved it: SIGUSR1)."""
        self.flush()
        if self._path is None:
            return
        old, self._out = self._out, _open(self._path)
        self._whole = _appends_whole(self._out)
        old.close()

    def close(self) -> None:
        """Write what is buffered and close the file (the server stops)."""
        self.flush()
        if self._path is not None:
            self._out.close()

    async def run(self) -> None:
        """Flush every FLUSH_SECONDS, until cancelled (beside the server)."""
        while True:  # bounded: ends with its nursery
            await trio.sleep(FLUSH_SECONDS)
            self.flush()


def _json_line(
    now: float,
    warning: bool,
    request: tuple[str, str, str, str],
    figures: tuple[int, int, int, int, int | None],
    served: tuple[str | None, str | None, str | None],
) -> str:
    """The JSON line: the text line's fields as members, numbers as numbers, none as null."""
    peer, method, path, proto = request
    status, bytes_in, bytes_out, ms, upstream_ms = figures
    key, reason, ended = served
    return json.dumps(
        {
            "time": datetime.fromtimestamp(now, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": "warning" if warning else "info",
            "event": "access",
            "peer": peer,
            "method": method,
            "path": path,
            "proto": proto,
            "status": status or None,
            "in": bytes_in,
            "out": bytes_out,
            "ms": ms,
            "upstream_ms": upstream_ms,
            "key": key,
            "reason": reason,
            "ended": ended,
        }
    )


def _appends_whole(out: IO[str]) -> bool:
    """Whether one write to `out` lands whole, even with other processes writing to it: a
    regular file opened for appending (O_APPEND: Linux writes each write(2) at the end, in one
    piece). A pipe or a socket (stderr under systemd, a container runtime, a shell) keeps
    only writes of at most PIPE_BUF bytes whole, so that is how the lines go there."""
    try:
        return stat.S_ISREG(os.fstat(out.fileno()).st_mode)
    except (OSError, ValueError, io.UnsupportedOperation):  # no descriptor: a test's capture
        return False


def _pieces(lines: list[str]) -> Iterator[str]:
    """The lines joined into pieces of whole lines of at most PIPE_BUF bytes each (a longer
    line alone), so that each write(2) to a pipe is atomic: the lines of several processes
    (workers) sharing stderr never interleave within a line."""
    piece: list[str] = []
    size = 0
    for line in lines:  # bounded: the buffer's lines
        length = len(line) + 1  # ASCII: every client-controlled value is escaped
        if piece and size + length > select.PIPE_BUF:
            yield "\n".join(piece) + "\n"
            piece, size = [], 0
        piece.append(line)
        size += length
    if piece:
        yield "\n".join(piece) + "\n"


def _open(path: Path) -> IO[str]:
    """The file, for appending, line-buffered off (we write whole buffers)."""
    return path.open("a", encoding="utf-8", errors="backslashreplace")
