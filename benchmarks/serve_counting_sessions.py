"""`dualproxy serve ...` as shipped, with the server side's count of resumed TLS sessions
written to a file, for the benchmark only.

dualproxy counts no resumption of its own: its connection line and `/metrics` say nothing
about it. OpenSSL does, per SSL_CTX (`SSL_CTX_sess_accept_good`, `SSL_CTX_sess_hits`: TLS
1.2 session ids and tickets, and TLS 1.3 tickets, each counted by the server that accepted
the handshake), and the stdlib reads them with `SSLContext.session_stats()`. This wrapper
remembers every SSLContext the process makes (a weak reference, taken when the context is
made: per reload, never per connection) and a daemon thread writes, every `INTERVAL`
seconds when they changed and once more at exit, the sums over them to
`$DUALPROXY_BENCH_SESSION_STATS/<pid>.json`:

    {"pid": 1234, "accept": 10, "accept_good": 10, "hits": 9, ...}

A context that is freed (a reload that rebuilt it, once its last connection ended) keeps
the counts last seen of it in the sums, so they only grow. Nothing on a connection's path
changes: the thread's cost is a few `session_stats()` calls and a small file write, about
0.2 ms (timeit, three contexts), at most four times a second: under 1 ms of CPU a second,
under 0.2% of what dualproxy spends during a measured run.

With `[process] workers` the supervisor starts its workers through this wrapper too (its
`worker_command` is patched to run `serve_counting_sessions.py worker ...`, as
serve_without_tickets.py does; each wrapper stands alone, so that it can be copied beside
another tree), each writing its own file; the supervisor's own contexts count nothing.

Usage: DUALPROXY_BENCH_SESSION_STATS=DIR python benchmarks/serve_counting_sessions.py serve -c FILE
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import ssl
import sys
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from dualproxy.cli import worker
from dualproxy.cli.main import main
from dualproxy.serve.supervisor import Supervisor

ENVIRONMENT: Final = "DUALPROXY_BENCH_SESSION_STATS"
# How often the counts are written: run.py lets the servers settle 1.5 s after a load before
# it reads them, and the share measurements wait for them; a quarter second leaves room.
INTERVAL: Final = 0.25

_live: weakref.WeakValueDictionary[int, ssl.SSLContext] = weakref.WeakValueDictionary()
_last_seen: dict[int, dict[str, int]] = {}
_serials = itertools.count()
_lock = threading.Lock()
_original_new = ssl.SSLContext.__new__


def _remembering_new(cls: type[ssl.SSLContext], *args: Any, **kwargs: Any) -> ssl.SSLContext:
    context = _original_new(cls, *args, **kwargs)
    with _lock:
        _live[next(_serials)] = context
    return context


def totals() -> dict[str, int]:
    """OpenSSL's session counters summed over every context this process made."""
    with _lock:
        live = list(_live.items())
    for serial, context in live:
        _last_seen[serial] = context.session_stats()
    summed: dict[str, int] = {}
    for stats in _last_seen.values():
        for name, value in stats.items():
            summed[name] = summed.get(name, 0) + value
    return summed


def _write(folder: Path, counts: dict[str, int]) -> None:
    path = folder / f"{os.getpid()}.json"
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"pid": os.getpid(), **counts}))
    temporary.replace(path)


def _keep_writing(folder: Path, stop: threading.Event) -> None:
    written: dict[str, int] | None = None
    while not stop.wait(INTERVAL):
        counts = totals()
        if counts != written:
            _write(folder, counts)
            written = counts


def start(folder: Path) -> None:
    """Count from now on, writing to `folder` until the process exits."""
    setattr(ssl.SSLContext, "__new__", _remembering_new)  # noqa: B010
    stop = threading.Event()
    thread = threading.Thread(
        target=_keep_writing, args=(folder, stop), name="session-stats", daemon=True
    )
    thread.start()

    def last_write() -> None:
        stop.set()
        thread.join(1)
        _write(folder, totals())

    atexit.register(last_write)


_worker_command = Supervisor.worker_command


def _worker_through_this_wrapper(
    self: Supervisor, slot: int, listeners: Sequence[int], control: int
) -> list[str]:
    command = _worker_command(self, slot, listeners, control)
    module = command.index("-m")
    return [*command[:module], __file__, "worker", *command[module + 2 :]]


setattr(Supervisor, "worker_command", _worker_through_this_wrapper)  # noqa: B010

if __name__ == "__main__":
    start(Path(os.environ[ENVIRONMENT]))
    if sys.argv[1:2] == ["worker"]:
        sys.exit(worker.main(sys.argv[2:]))
    sys.exit(main(sys.argv[1:]))
