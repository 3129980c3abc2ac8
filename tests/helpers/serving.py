"""A real server on a loopback port, started as `dualproxy serve` starts it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import trio

from dualproxy.config.schema import Config
from dualproxy.serve.lifecycle import Loader
from dualproxy.serve.server import Server
from dualproxy.serve.supervisor import Supervisor


@dataclass
class Running:
    server: Server
    host: str
    port: int
    records: list[str] = field(default_factory=list)


@asynccontextmanager
async def serving(
    config: Config,
    *,
    clock: Callable[[], datetime] | None = None,
    dev_headers: bool = False,
    load: Loader | None = None,
) -> AsyncIterator[Running]:
    """A real server on a loopback port for the duration of the block; `load`, when given, is
    how its reloads read the config and keys (Server's `load`)."""
    kwargs: dict[str, Any] = {"handle_signals": False, "dev_headers": dev_headers}
    if clock is not None:
        kwargs["clock"] = clock
    if load is not None:
        kwargs["load"] = load
    server = Server(config, **kwargs)
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(server.run)
        host, port = bound[0]
        yield Running(server, host, port)
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def supervising_with_acme(
    supervisor: Supervisor,
) -> AsyncIterator[tuple[int, tuple[str, int] | None]]:
    """A supervisor and its workers with [acme]'s service beside it (its renewals; the
    workers answer the challenges), as `dualproxy serve` starts them with [process] workers;
    the TLS port and the http-01 listener's address (None without one). Drained at the end;
    the service stops when the supervisor does."""
    from dualproxy.acme import service

    async with trio.open_nursery() as nursery:

        async def run_then_stop(
            *, task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED
        ) -> None:
            await supervisor.run(task_status=task_status)
            nursery.cancel_scope.cancel()

        http = await nursery.start(service.renew_beside, supervisor)
        bound = await nursery.start(run_then_stop)
        yield bound[0][1], http
        supervisor.drain()
