"""Running a long command (`serve`, `dev`): trio.run until the body returns or Ctrl-C.

Ctrl-C is a request to stop: SIGINT cancels the body's nursery, so connections are torn down
by trio and the process exits 0 without a KeyboardInterrupt traceback. An OSError that ends
the body (a port in use) is printed as `error: ...`, exit 1.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Awaitable, Callable

import trio

from dualproxy.cli.arguments import EXIT_FAILED, EXIT_OK


def run_until_interrupted(
    body: Callable[[], Awaitable[None]], *, report: Callable[[str], None] | None = None
) -> int:
    """trio.run(body) until it returns or Ctrl-C; an OSError (a port in use) is exit 1, its
    message given to `report` (default: `error: ...` on stderr; `serve --log-format json`
    logs it instead, so that its stderr stays JSON)."""
    failed = False
    try:
        trio.run(_cancel_on_sigint, body)
    except* KeyboardInterrupt:
        pass  # Ctrl-C before the handler below was in place: stopping is all it asks for
    except* OSError as group:
        for exc in _leaves(group):
            (report or print_error)(_describe(exc))
        failed = True
    return EXIT_FAILED if failed else EXIT_OK


async def _cancel_on_sigint(body: Callable[[], Awaitable[None]]) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(_watch_sigint, nursery.cancel_scope)
        await body()
        nursery.cancel_scope.cancel()  # body ended by itself (SIGTERM): stop watching


async def _watch_sigint(
    scope: trio.CancelScope, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    with trio.open_signal_receiver(signal.SIGINT) as signals:
        task_status.started()
        async for _ in signals:
            scope.cancel()
            return


def print_error(message: str) -> None:
    """`error: message` on stderr: how a command reports what stopped it."""
    print(f"error: {message}", file=sys.stderr)


def _describe(exc: OSError) -> str:
    """The message without Python's "[Errno 98]" prefix: ours (listeners.open_listeners)
    carry the address, the setting and what to do in strerror already."""
    if exc.errno is not None and exc.strerror and exc.filename is None:
        return exc.strerror
    return str(exc)


def _leaves(group: BaseExceptionGroup[OSError]) -> list[OSError]:
    out: list[OSError] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            out += _leaves(exc)
        else:
            out.append(exc)
    return out
