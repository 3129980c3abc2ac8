"""One worker process under a supervisor (supervisor.py): a `Server` on listening sockets it
inherited, obeying its supervisor's link (control.py) and reporting its counts on it.

Theory of operation. The worker is today's single process minus what the supervisor does
once for the machine: it opens no listener (it serves the sockets it was given), runs no
admin listener, watches no file, and decides nothing about the canary. On its link it

- sends `ready` (the addresses it serves) once its accept loops run;
- sends `tally` every REPORT_INTERVAL when something changed: the difference of its evidence
  since the last one (ops.tally), its open connections, the canary epoch it follows, and the
  canary clients its pin-failure reports have for each app version failing on the new key
  (the supervisor judges the report halt on their union);
- obeys `reload` (the supervisor validated the files first: `Server.reload`, answered with
  `reloaded`), `drain` and `stop` (SIGTERM's drain, a second SIGTERM's stop), and `canary`
  (the machine's decisions: the canary halted or running again, `CanaryJudge.follow`, and a
  "when-safe" window closed or not, `WindowJudge.follow`).

When the link closes (the supervisor died, even by SIGKILL), the worker drains as on
SIGTERM: nobody would restart it or read its counts. It still takes SIGTERM itself (systemd
sends it to every process of the service) and drains. Before it exits it sends its last
counts. SIGINT (its supervisor's Ctrl-C) stops it at once, as it stops a single process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Final

import trio

from dualproxy.config.loader import load
from dualproxy.ops.evidence import Evidence
from dualproxy.ops.tally import EMPTY, Tally, to_wire
from dualproxy.serve import rollout
from dualproxy.serve.control import Channel, ChannelError
from dualproxy.serve.server import Server

__all__ = ["REPORT_INTERVAL", "Reporter", "serve_worker", "worker_server"]

log = logging.getLogger("dualproxy")

# How often a worker sends its counts: the canary's halt must reach every worker within a
# second (issue 16) and the supervisor's judge sees the sums only this late, so a quarter
# second leaves room; four small messages a second cost nothing next to the traffic.
REPORT_INTERVAL: Final = 0.25


class Reporter:
    """What a worker has sent of its counts, and what it sends next."""

    def __init__(self) -> None:
        self._sent: Tally = EMPTY
        self._figures: dict[str, int] = {}
        self._failures: dict[str, list[str]] = {}
        # The supervisor's canary epoch (its resumes) this worker's samples belong to.
        self.epoch = 0

    def next_message(
        self,
        evidence: Evidence,
        connections: Mapping[str, int],
        failures: rollout.Failures | None = None,
    ) -> dict[str, object] | None:
        """The `tally` message with what changed since the last one, or None when nothing
        did. `connections`: the server's connection figures as they are now (`active`,
        `idle`: gauges; `reclaimed`, `refused_per_client`: totals since it started).
        `failures`: the canary clients its report counts have for each app version failing
        on the new key (rollout.canary_failures), sent whole (as hex) when they changed: the
        supervisor's judge halts on the union over every worker."""
        now = evidence.tally()
        delta = now.minus(self._sent)
        figures = dict(connections)
        failing = {
            name: sorted(client.hex() for client in clients)
            for name, clients in (failures or {}).items()
        }
        if delta.empty and figures == self._figures and failing == self._failures:
            return None
        message: dict[str, object] = {"t": "tally", "epoch": self.epoch, **figures}
        if failing != self._failures:
            message["failing"] = failing
        self._sent, self._figures, self._failures = now, figures, failing
        return {**message, **to_wire(delta)}

    def follow_canary(self, evidence: Evidence, message: dict[str, object]) -> None:
        """Take the supervisor's canary decision and its window's; samples counted from here
        on belong to its epoch (a resume starts them from zero)."""
        halted_at = message.get("at")
        why, by = message.get("why"), message.get("by")
        evidence.canary.follow(
            bool(message.get("halted")),
            str(why) if why is not None else None,
            float(halted_at) if isinstance(halted_at, int | float) else None,
            str(by) if by is not None else None,
        )
        closed_at = message.get("window_closed_at")
        evidence.window.follow(
            bool(message.get("window_closed")),
            datetime.fromisoformat(closed_at) if isinstance(closed_at, str) else None,
        )
        epoch = message.get("epoch")
        if isinstance(epoch, int) and epoch != self.epoch:
            self.epoch = epoch
            tally = evidence.tally()
            self._sent = replace(self._sent, canary=tally.canary, control=tally.control)


def worker_server(
    config_file: Path, *, ticket_key_file: Path | None = None, canary_halted: bool = False
) -> Server:
    """A worker's server for the config in `config_file`: no file poller, a canary judge
    that counts and follows; `ticket_key_file`: the session-ticket key file the workers
    share when the config names none (the supervisor's); `canary_halted`: the machine's
    canary is halted (the supervisor's canary message says why once the worker serves).
    OperatorError when the config or a key cannot be used (the supervisor checked them
    moments ago: the files changed since)."""
    config = load(config_file)
    if ticket_key_file is not None and config.tls.ticket_key_file is None:
        config = replace(config, tls=replace(config.tls, ticket_key_file=ticket_key_file))
    server = Server(config, watch_files=False)
    server.evidence.canary.decides = False
    server.evidence.window.decides = False
    if canary_halted:
        server.evidence.canary.follow(True, None, None)
    return server


async def serve_worker(
    server: Server, listeners: Sequence[socket.socket], control: socket.socket, slot: int
) -> None:
    """Serve `listeners` until drained (or cancelled), obeying the supervisor on `control`
    (see the module docstring); `slot` names the worker in its log lines."""
    channel = Channel(control)
    reporter = Reporter()
    try:
        async with trio.open_nursery() as nursery:

            async def serve_then_stop(
                *, task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED
            ) -> None:
                await server.run(listeners, task_status=task_status)
                nursery.cancel_scope.cancel()

            bound = await nursery.start(serve_then_stop)
            await channel.send({"t": "ready", "pid": os.getpid(), "bound": bound})
            nursery.start_soon(_obey, server, channel, reporter, slot)
            nursery.start_soon(_report, server, channel, reporter)
    finally:
        # The counts since the last report: a worker that stops cleanly loses none.
        message = reporter.next_message(server.evidence, connection_figures(server, active=0))
        if message is not None:
            # A supervisor that is gone cannot count them.
            with contextlib.suppress(
                ChannelError, trio.BrokenResourceError, trio.ClosedResourceError
            ):
                await channel.send(message)
        with trio.CancelScope(shield=True):
            await channel.aclose()


def connection_figures(server: Server, *, active: int | None = None) -> dict[str, int]:
    """What a worker reports of its connections besides the evidence (`active` instead of
    the server's own: 0 once it stopped)."""
    return {
        "active": server.active_connections if active is None else active,
        "idle": server.idle_connections if active is None else 0,
        "reclaimed": server.reclaimed_connections,
        "refused_per_client": server.refused_per_client,
    }


async def _report(server: Server, channel: Channel, reporter: Reporter) -> None:
    while True:
        await trio.sleep(REPORT_INTERVAL)
        failures = rollout.canary_failures(server.material)
        message = reporter.next_message(server.evidence, connection_figures(server), failures)
        if message is not None:
            await _send(channel, message)


async def _send(channel: Channel, message: dict[str, object]) -> None:
    try:
        await channel.send(message)
    except ChannelError as exc:
        log.warning("worker: %s", exc)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the supervisor is gone: _obey sees the link close and drains


async def _obey(server: Server, channel: Channel, reporter: Reporter, slot: int) -> None:
    while True:
        try:
            message = await channel.receive()
        except ChannelError as exc:
            log.error("worker: the supervisor's link is broken (%s); draining", exc)
            message = None
        if message is None:
            if not server.draining:
                log.warning("worker: the supervisor is gone; stopping after the requests in flight")
                server.drain()
            return
        kind = message.get("t")
        if kind == "reload":
            why = message.get("why")
            # The supervisor said it once; each worker's line says which worker it is.
            ok = await server.reload(f"{why or 'supervisor'}, worker {slot}")
            await _send(channel, {"t": "reloaded", "ok": ok})
        elif kind == "drain":
            server.drain()
        elif kind == "stop":
            server.stop_now()
        elif kind == "canary":
            reporter.follow_canary(server.evidence, message)
        else:
            log.error("worker: ignored an unknown message from the supervisor: %r", kind)
