"""Running `dualproxy serve` through a benchmark wrapper script, workers included.

A wrapper (serve_without_tickets.py, serve_counting_sessions.py) changes something in the
process before it runs `dualproxy.cli.main` unchanged. With `[process] workers`, the
supervisor starts each worker as `python -m dualproxy.cli.worker ...`, which would bypass the
wrapper: `route_workers_through` makes it start `python <wrapper> worker ...` instead, and
`main` runs the worker's entry point for that first argument, `dualproxy` otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

from dualproxy.cli import worker
from dualproxy.cli.main import main as dualproxy_main
from dualproxy.serve.supervisor import Supervisor

__all__ = ["main", "route_workers_through"]


def route_workers_through(script: str) -> None:
    """Make every Supervisor start its workers through `script` (a wrapper's `__file__`)."""
    worker_command = Supervisor.worker_command

    def through_script(
        self: Supervisor, slot: int, listeners: Sequence[int], control: int
    ) -> list[str]:
        command = worker_command(self, slot, listeners, control)
        module = command.index("-m")
        return [*command[:module], script, "worker", *command[module + 2 :]]

    setattr(Supervisor, "worker_command", through_script)  # noqa: B010


def main(argv: Sequence[str]) -> int:
    """`worker ...`: one worker (as its supervisor asked); anything else: `dualproxy ...`."""
    if argv[:1] == ["worker"]:
        return worker.main(argv[1:])
    return dualproxy_main(list(argv))
