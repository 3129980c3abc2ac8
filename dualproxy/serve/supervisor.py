"""The supervisor of `dualproxy serve` with `[process] workers` above 1: one process that owns
what the machine has once, and N worker processes (worker.py) that serve.

Theory of operation.

**What it owns.** The listening sockets (opened once, before any worker; handed to each
worker as inherited descriptors and never closed while serving, so a worker that dies or
drains loses no client waiting in the backlog: the others take them); the admin listener
(ops.admin, the same routes as a single process's, answering from the sums); the machine's
evidence (an `Evidence` every worker's counts are added to, ops.tally) and with it the
one canary decision; the reloads (the files are read and checked here, once); and, with
managed session-ticket keys (issue 16 item 2), the key set every worker must share: the
seam is `Supervisor.worker_command`, where the key file (or a descriptor) is handed over.
With [acme], the http-01 listener too (one socket every worker accepts from, `acme_http`,
handed over by the ACME service that runs beside the supervisor: acme.service.renew_beside,
which places every order of the machine; each worker answers the challenges from the shared
folder). It never handles client traffic: it only connects out, to the CA and, to check
that a challenge is answered, to its own listeners on loopback.

**Workers** are `python -m dualproxy.cli.worker` processes (spawned, never forked from this
trio process), each in its own session so that a terminal's signals reach the supervisor
only, with the listeners and one end of a socket pair (control.py) as inherited descriptors.
A worker that exits without being asked to is logged and started again after a backoff
(RESTART_BACKOFF_INITIAL, doubling up to RESTART_BACKOFF_MAX, back to the start once a worker
has served RESTART_BACKOFF_RESET); the others keep serving meanwhile. A worker that exits
before the first of them ever served stops the start (exit 1): the same error would stop a
single process.

**Listeners: one SO_REUSEPORT socket per address and worker**, all opened here: the kernel
spreads new connections over the sockets by a hash of their addresses. Measured on loopback
(docs/architecture.md, "Processes"), one socket shared by every worker spread 32 keep-alive
connections opened at once as badly as 32 to 0 (the first worker to wake accepts the whole
burst: ACCEPT_BATCH at a time), where reuse_port's spread stayed within 44-50 %. The
supervisor keeps every worker's socket open, so a worker that dies loses no client waiting in
its backlog: its replacement takes them (they wait the restart, well under a second); a
worker that cannot start gives its slot's sockets up, and the others take every new client
until one of that slot serves again (`_keep`). On the
drain the supervisor closes its copies at once, as a single process closes its listener, so
that new clients are refused (and retried elsewhere) rather than left waiting. The `sharing`
argument keeps the shared socket, for that measurement.

**Signals** are those of a single process: SIGHUP reloads (lifecycle.watch_signals calls
`reload`: the config and key files are read and checked once, here; a bad one is logged once
and reaches no worker; a good one is announced once, then each worker reloads it), SIGTERM
drains every worker (a second one stops them at once), SIGINT stops at once. The file poller
runs here only: a changed file is checked once, then reaches the workers as a reload.

**The canary**: workers count but do not decide; their samples reach the supervisor's judge
within REPORT_INTERVAL (worker.py), which decides on the sums; every CANARY_SYNC_INTERVAL the
supervisor compares its judge's state with what it last told the workers and tells them
(halted, or resumed by `dualproxy canary resume` on the admin listener). A resume starts a
new epoch: samples counted before it, still in flight, are not added to the new ones. With
`share_state` (serve's), the judge's decisions are shared with the replicas of the state
folder, and theirs taken (sharedhalt.py), the record read before the first worker starts;
a worker started while the canary is halted starts halted (`--canary-halted`), so that no
canary client gets the new key before its link says why.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Literal

import trio

from dualproxy.config.schema import Config
from dualproxy.http.relay import RelaySettings
from dualproxy.ops.evidence import Evidence
from dualproxy.ops.tally import from_wire
from dualproxy.pinning import endpoints, reports
from dualproxy.serve import lifecycle, rollout
from dualproxy.serve.clock import utc_now
from dualproxy.serve.closing import close_pool
from dualproxy.serve.control import Channel, ChannelError
from dualproxy.serve.lifecycle import Loader, Material, read_files
from dualproxy.serve.listeners import bound_address, describe_bound, open_listeners
from dualproxy.serve.sharedhalt import SharedHalt
from dualproxy.tls import keystore
from dualproxy.tls.keystore import KeySnapshot
from dualproxy.tls.streams import set_tcp_options

__all__ = [
    "CANARY_SYNC_INTERVAL",
    "RESTART_BACKOFF_INITIAL",
    "RESTART_BACKOFF_MAX",
    "RESTART_BACKOFF_RESET",
    "WORKER_STOP_TIMEOUT",
    "Sharing",
    "Supervisor",
    "WorkerState",
]

log = logging.getLogger("dualproxy")

# A worker that died is started again after this long, doubled at each death in a row up to
# RESTART_BACKOFF_MAX: the first restart is at once for a human (systemd's RestartSec
# default), and a worker that cannot start (its files broke meanwhile) is tried every half
# minute instead of in a tight loop that floods the log.
RESTART_BACKOFF_INITIAL: Final = 0.1
RESTART_BACKOFF_MAX: Final = 30.0
# A worker that served this long before it died starts the backoff from the beginning: its
# death is news, not the next failure of a worker that cannot start.
RESTART_BACKOFF_RESET: Final = 60.0
# How often the supervisor compares its canary judge with what it told the workers: a halt
# then reaches every worker within REPORT_INTERVAL (worker.py) plus this, well under the
# second the issue allows; a comparison of three attributes costs nothing.
CANARY_SYNC_INTERVAL: Final = 0.1
# How long a worker asked to stop at once (Ctrl-C) may take before it is killed: it cancels
# its connections, which takes milliseconds; only a hung worker reaches this.
WORKER_STOP_TIMEOUT: Final = 5.0

# How workers share the listening sockets (see the module docstring): "shared", one socket
# per address for all of them; "reuse_port", one SO_REUSEPORT socket per address per worker.
Sharing = Literal["shared", "reuse_port"]


# The workers' shared ticket-key file, in the supervisor's private folder.
TICKET_KEY_FILE_NAME: Final = "ticket-keys"
# Where that folder goes: memory-backed when the system has it, so the keys stay off disk.
_MEMORY_FOLDER: Final = Path("/dev/shm")  # noqa: S108 (mkdtemp makes a fresh 0700 folder)


def private_ticket_folder() -> Path:
    """A new folder only we may enter (0700), for the workers' shared ticket keys: in
    /dev/shm when it is there (never written to disk), else the temporary folder."""
    parent = _MEMORY_FOLDER if os.access(_MEMORY_FOLDER, os.W_OK | os.X_OK) else None
    return Path(tempfile.mkdtemp(prefix="dualproxy-tickets-", dir=parent))


@dataclass(slots=True)
class WorkerState:
    """One worker slot, as the supervisor knows it (the status and tests read it)."""

    slot: int
    pid: int | None = None
    ready: bool = False
    active: int = 0  # open connections, as last reported
    idle: int = 0  # of which waiting for a request
    # Totals since the worker started, as last reported, and those of the slot's workers
    # that exited (so that the machine's totals never go down).
    reclaimed: int = 0
    refused_per_client: int = 0
    retired_reclaimed: int = 0
    retired_refused_per_client: int = 0
    connections: int = 0  # ended since the slot's first worker started (its reports)
    requests: int = 0
    restarts: int = 0
    epoch: int = -1  # the canary epoch last sent to this worker
    # The canary clients its pin-failure reports have for each app version failing on the
    # new key, as last reported; and those of the slot's workers that exited.
    failures: dict[str, frozenset[bytes]] = field(default_factory=dict)
    retired_failures: dict[str, frozenset[bytes]] = field(default_factory=dict)
    outbox: trio.MemorySendChannel[dict[str, object]] | None = field(default=None, repr=False)


class Supervisor:
    """The supervisor (see the module docstring). Offers what the admin listener reads of a
    server (ops.admin.ServerView), what reloads and signals act on, and `run`."""

    def __init__(
        self,
        config: Config,
        *,
        workers: int | None = None,
        log_format: str = "text",
        sharing: Sharing = "reuse_port",
        clock: Callable[[], datetime] = utc_now,
        load: Loader = read_files,
        handle_signals: bool = True,
        share_state: bool = False,
    ) -> None:
        """Checks the config's keys (OperatorError, as a single process's start does).
        `workers`: how many (default: the config's [process] workers); `handle_signals`:
        SIGHUP and SIGTERM as a single process takes them (tests call reload and drain);
        `share_state`: the machine's canary halt shared with the replicas of the state
        folder (sharedhalt.py), as a single server's."""
        files_seen = lifecycle.files_signature(config)
        snapshot = keystore.load_snapshot(config)
        self._clock = clock
        local = endpoints.build(config, None, clock)
        relay = RelaySettings.build(config, local=local) if config.upstream is not None else None
        self._material = Material(config, snapshot, relay, local)
        self._log_format = log_format
        self._sharing: Sharing = sharing
        self._handle_signals = handle_signals
        count = workers if workers is not None else config.process.worker_count()
        self.workers = [WorkerState(slot) for slot in range(count)]
        # One set of session-ticket keys for every worker (issue 16 item 2), so a client that
        # reconnects to another worker resumes: the operator's [tls] ticket_key_file, or else
        # one in a private folder of ours, kept for as long as we run (tls.tickets: the
        # workers share it under its lock, as replicas share the operator's).
        self._ticket_folder: Path | None = None
        tls = config.tls
        if tls.session_tickets and tls.ticket_key_file is None and count > 1:
            self._ticket_folder = private_ticket_folder()
        self.evidence = Evidence()
        self.reloads = lifecycle.Reloads(self, load, clock, files_seen=files_seen)
        self.shared_halt = SharedHalt(self) if share_state else None
        if self.shared_halt is not None:
            self.evidence.canary.on_decision = self.reloads.poll_soon
        self._draining = False
        self._stopping_now = False
        self._serving = False  # a worker served once: from then on a death is restarted
        self._listening = trio.Event()
        self._drain_started = trio.Event()  # wakes a slot waiting to restart its worker
        self._all_ready = trio.Event()
        self._bound: list[tuple[str, int]] = []
        # (halted, resumes, window closed): what the workers were last told.
        self._canary_told = (False, 0, False)
        self._listener_sets: list[list[socket.socket]] = []  # per worker slot, while running
        self._own_sockets = False  # a reuse_port socket per slot (not shared, not inherited)
        self._shapes: list[_Shape] = []  # of the first slot's sockets, for fresh ones
        # The http-01 listener ([acme] http_listen, or systemd's), handed over before run()
        # by the ACME service (acme.service.renew_beside): one socket every worker inherits
        # and serves; ours to close, with the TLS listeners.
        self.acme_http: list[socket.socket] = []

    # --- what the admin listener, the reloads and the announcement read ----------------

    @property
    def material(self) -> Material:
        return self._material

    @property
    def config(self) -> Config:
        return self._material.config

    @property
    def snapshot(self) -> KeySnapshot:
        return self._material.snapshot

    @property
    def active_connections(self) -> int:
        return sum(worker.active for worker in self.workers)

    @property
    def processes(self) -> int:
        """Processes serving clients, each with its own connection limits."""
        return len(self.workers)

    @property
    def idle_connections(self) -> int:
        return sum(worker.idle for worker in self.workers)

    @property
    def reclaimed_connections(self) -> int:
        return sum(worker.reclaimed + worker.retired_reclaimed for worker in self.workers)

    @property
    def refused_per_client(self) -> int:
        return sum(
            worker.refused_per_client + worker.retired_refused_per_client for worker in self.workers
        )

    @property
    def reloads_ok(self) -> int:
        return self.reloads.ok

    @property
    def reloads_failed(self) -> int:
        return self.reloads.failed

    def now(self) -> datetime:
        return self._clock()

    def report_summary(self) -> reports.ReportSummary | None:
        """The apps' pin-failure reports that every worker accepted: read from the store
        they all append to (the supervisor receives none itself), when someone looks.
        Blocking, in the supervisor's loop, which serves no client: a store is at most
        [reports] store_files + 1 files of store_max_bytes."""
        local = self._material.local
        if local is None or local.reports_state is None:
            return None
        state = local.reports_state
        counts = reports.counts_from_store(state.store, max_groups=state.counts.max_groups)
        keys = self.snapshot.keys.values()
        labels = endpoints.pin_labels(keys, self.config.rotation, self.now())
        return reports.summary(counts, labels)

    def canary_failures(self) -> dict[str, frozenset[bytes]]:
        """The canary clients every worker's pin-failure reports have for each app version
        failing on the new key (rollout.review's evidence for the report halt): the union,
        so that a client counts once whichever worker took its reports."""
        return _union(
            [failures for w in self.workers for failures in (w.failures, w.retired_failures)]
        )

    async def wait_listening(self) -> list[tuple[str, int]]:
        """Wait until every worker serves; the (host, port) pairs they listen on."""
        await self._listening.wait()
        return self._bound

    # --- reloads and signals -----------------------------------------------------------

    def install(self, material: Material, why: str) -> None:
        """A reload checked `material` (lifecycle.Reloads): say so once, then have every
        worker reload the same files."""
        current = self._material.config
        config = material.config
        if config.process != current.process:
            log.warning(
                "[process] changed: restart dualproxy to apply (kept %d workers)",
                len(self.workers),
            )
            material = replace(material, config=replace(config, process=current.process))
        if config.rotation != current.rotation:  # another rotation's failures are not its own
            for worker in self.workers:
                worker.retired_failures = {}
        self._material = material
        for warning in material.snapshot.warnings:
            log.warning("%s", warning)
        keys = ", ".join(f"{k.name} ({k.pin})" for k in material.snapshot.keys.values())
        log.info("reloaded (%s): serving %s", why, keys)
        self._tell_all({"t": "reload", "why": why.split(":", 1)[0]})

    async def reload(self, why: str) -> bool:
        """Read and check the files once; only when all is good, every worker reloads."""
        return await self.reloads.reload(why)

    @property
    def draining(self) -> bool:
        return self._draining

    def not_ready(self) -> str | None:
        """Why a load balancer should not send clients now (the admin listener's /readyz),
        or None: as a single process's (Server.not_ready). The workers' own [lifecycle]
        drain_delay keeps them serving meanwhile."""
        if self._draining:
            return "draining: this server is stopping"
        if not self._listening.is_set():
            return "starting: the listeners are not open yet"
        return None

    def drain(self) -> None:
        """SIGTERM: every worker drains as a single process does (with [lifecycle]
        drain_delay, first serving on for that long while /readyz answers 503; then it
        stops accepting and finishes its requests within limits.shutdown_grace); run()
        returns once all have exited."""
        if self._draining:
            return
        self._draining = True
        self._drain_started.set()
        self._all_ready.set()  # a drain before every worker served: run() stops waiting
        self._tell_all({"t": "drain"})
        # New clients are refused from now on, as by a single process's drain; those already
        # waiting in a backlog are taken by its worker before it closes its copy.
        self._close_listeners()

    def stop_now(self) -> None:
        """A second SIGTERM: every worker cancels its connections at once."""
        self.drain()
        self._stopping_now = True
        self._tell_all({"t": "stop"})

    def reopen_logs(self) -> None:
        """SIGUSR1 (logrotate's postrotate): each worker that serves reopens its own access
        log file, as a single process does on SIGUSR1 (its handler is installed before it
        serves); the supervisor writes none."""
        for worker in self.workers:
            if worker.pid is not None and worker.ready:
                with contextlib.suppress(ProcessLookupError):  # it exited meanwhile
                    os.kill(worker.pid, signal.SIGUSR1)

    def _close_listeners(self) -> None:
        for listeners in [*self._listener_sets, self.acme_http]:
            for sock in listeners:
                sock.close()

    def _tell_all(self, message: dict[str, object]) -> None:
        for worker in self.workers:
            if worker.outbox is not None:
                worker.outbox.send_nowait(message)

    # --- running -----------------------------------------------------------------------

    def worker_command(self, slot: int, listeners: Sequence[int], control: int) -> list[str]:
        """The command line of a worker: this interpreter, the config file, the inherited
        descriptors (the TLS listeners, the link, the http-01 listener), the ticket-key file
        the workers share when the config names none, and whether the machine's canary is
        halted (a halt read from the state folder at start, or a worker restarted after a
        halt, serves no canary client meanwhile)."""
        path = self.config.path
        assert path is not None  # `serve` always reads a file
        command = [sys.executable, "-m", "dualproxy.cli.worker", "-c", str(path)]
        command += ["--log-format", self._log_format, "--slot", str(slot)]
        command += ["--control-fd", str(control)]
        for fd in listeners:
            command += ["--listen-fd", str(fd)]
        for sock in self.acme_http:
            command += ["--acme-http-fd", str(sock.fileno())]
        if self._ticket_folder is not None:
            command += ["--ticket-key-file", str(self._ticket_folder / TICKET_KEY_FILE_NAME)]
        if self.evidence.canary.halted:
            # From its first client: the link tells it why only once it serves.
            command += ["--canary-halted"]
        return command

    async def run(
        self,
        listeners: Sequence[socket.socket] | None = None,
        *,
        task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Open the listeners, start the workers, keep them running until drained (SIGTERM,
        `drain()`) or cancelled; the admin listener is the caller's (cli.serve).

        `listeners`: listening sockets to serve instead (socket activation's), which the
        supervisor then owns and closes; every worker shares them (they were not opened
        with a socket per worker)."""
        listen = self.config.listen
        reuse_port = listeners is None and (listen.reuse_port or self._sharing == "reuse_port")
        if listeners is not None:
            first = list(listeners)
        else:
            first = await open_listeners(listen.addresses, reuse_port)
        self._listener_sets = sets = [first]
        try:
            for _ in self.workers[1:]:
                sets.append([_twin(_shape(s)) for s in first] if reuse_port else first)
            self._own_sockets = reuse_port
            self._shapes = [_shape(s) for s in first]
            self._bound = [bound_address(s) for s in first]
            shared = self.shared_halt.sync if self.shared_halt is not None else None
            if shared is not None:  # before any worker: each starts with the machine's halt
                await shared()
            async with trio.open_nursery() as nursery:
                if self._handle_signals:
                    await nursery.start(lifecycle.watch_signals, self)
                nursery.start_soon(self.reloads.watch_files, shared)
                nursery.start_soon(self._sync_canary)
                # The machine's report halt and window rule, on every worker's evidence.
                nursery.start_soon(rollout.review_forever, self, self.canary_failures)
                async with trio.open_nursery() as keepers:
                    for worker in self.workers:
                        keepers.start_soon(self._keep, worker)
                    await self._all_ready.wait()  # or a drain that came first
                    self._serving = True
                    if not self._draining:
                        pids = ", ".join(str(worker.pid) for worker in self.workers)
                        log.info(
                            "listening on %s (%d workers: pids %s)",
                            describe_bound(self._bound),
                            len(self.workers),
                            pids,
                        )
                    self._listening.set()
                    task_status.started(self._bound)
                nursery.cancel_scope.cancel()
        finally:
            self._close_listeners()
            if self._ticket_folder is not None:  # the keys leave with us
                shutil.rmtree(self._ticket_folder, ignore_errors=True)
            relay = self._material.relay
            if relay is not None:
                await close_pool(relay.pool)
        if self._stopping_now:
            log.warning("drained: cancelled the connections still busy after the grace")
        else:
            log.info("drained: every worker finished")

    async def _keep(self, worker: WorkerState) -> None:
        """Run `worker`'s slot: start a worker, wait for it, start another after it dies
        (with backoff) until the supervisor drains.

        A worker that served keeps its slot's sockets when it dies: its replacement takes
        the clients waiting in their backlog. One that dies before it served (it cannot
        start) gives them up: closed, they leave the reuse_port group and every new client
        goes to the other workers until a worker of this slot serves again (on fresh
        sockets), instead of waiting in a backlog nobody accepts from."""
        failures = 0
        while not self._draining:
            started = trio.current_time()
            listeners = self._listener_sets[worker.slot]
            if self._own_sockets and any(sock.fileno() < 0 for sock in listeners):
                listeners = [_twin(shape) for shape in self._shapes]
                self._listener_sets[worker.slot] = listeners
            how, served = await self._run_one(worker, listeners)
            if self._draining:
                return
            if not served and self._own_sockets:
                for sock in listeners:
                    sock.close()
            if not self._serving:
                raise OSError(
                    f"worker {worker.slot} {how} before it served (its error is above);"
                    " not starting"
                )
            if trio.current_time() - started >= RESTART_BACKOFF_RESET:
                failures = 0
            delay = min(RESTART_BACKOFF_MAX, RESTART_BACKOFF_INITIAL * 2**failures)
            failures += 1
            worker.restarts += 1
            log.error(
                "worker %d (pid %s) %s; the others keep serving; starting another in %g s",
                worker.slot,
                worker.pid,
                how,
                delay,
            )
            with trio.move_on_after(delay):
                await self._drain_started.wait()

    async def _run_one(
        self, worker: WorkerState, listeners: Sequence[socket.socket]
    ) -> tuple[str, bool]:
        """One worker process, from its start to its exit; how it ended, in words, and
        whether it served (it said it was ready)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = [sock.fileno() for sock in listeners]
        command = self.worker_command(worker.slot, fds, theirs.fileno())
        acme_http = [sock.fileno() for sock in self.acme_http]
        try:
            process = await trio.lowlevel.open_process(
                command, pass_fds=(*fds, *acme_http, theirs.fileno()), start_new_session=True
            )
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        worker.pid, worker.ready, worker.active, worker.epoch = process.pid, False, 0, -1
        channel = Channel(ours)
        outbox, inbox = trio.open_memory_channel[dict[str, object]](float("inf"))
        worker.outbox = outbox
        if self._draining:
            outbox.send_nowait({"t": "stop" if self._stopping_now else "drain"})
        try:
            async with trio.open_nursery() as link:
                link.start_soon(self._speak_to, worker, channel, inbox)
                # Until the worker closes its end (it exited): its last counts come first.
                await self._listen_to(worker, channel)
                await process.wait()
                link.cancel_scope.cancel()
        finally:
            served = worker.ready
            worker.outbox = None
            worker.ready, worker.active, worker.idle = False, 0, 0
            worker.retired_reclaimed += worker.reclaimed
            worker.retired_refused_per_client += worker.refused_per_client
            worker.reclaimed = worker.refused_per_client = 0
            worker.retired_failures = _union([worker.retired_failures, worker.failures])
            worker.failures = {}
            with trio.CancelScope(shield=True):
                if process.returncode is None:
                    await _stop(process)
                await channel.aclose()
        return _describe_exit(process.returncode), served

    async def _listen_to(self, worker: WorkerState, channel: Channel) -> None:
        while True:
            try:
                message = await channel.receive()
            except ChannelError as exc:
                log.error("worker %d: %s; its counts are lost", worker.slot, exc)
                return
            if message is None:
                return
            kind = message.get("t")
            if kind == "tally":
                self._count(worker, message)
            elif kind == "ready":
                worker.ready = True
                self._tell_canary(worker)
                if all(each.ready for each in self.workers):
                    self._all_ready.set()
            elif kind == "reloaded" and not message.get("ok"):
                log.error(
                    "worker %d did not take the reload (see its error above); it serves the"
                    " previous files",
                    worker.slot,
                )

    async def _speak_to(
        self,
        worker: WorkerState,
        channel: Channel,
        inbox: trio.MemoryReceiveChannel[dict[str, object]],
    ) -> None:
        async for message in inbox:
            try:
                await channel.send(message)
            except ChannelError as exc:
                log.error("worker %d: %s", worker.slot, exc)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return  # it exited: _run_one sees it

    def _count(self, worker: WorkerState, message: dict[str, object]) -> None:
        try:
            delta = from_wire(message)
        except ValueError as exc:
            log.error("worker %d sent counts we cannot read (%s); dropped", worker.slot, exc)
            return
        for figure in ("active", "idle", "reclaimed", "refused_per_client"):
            value = message.get(figure)
            if isinstance(value, int):
                setattr(worker, figure, value)
        if "failing" in message:
            try:
                worker.failures = _failures_from_wire(message["failing"])
            except ValueError as exc:
                log.error("worker %d sent report failures we cannot read (%s)", worker.slot, exc)
        if message.get("epoch") != self.evidence.canary.resumes:
            # Counted before a resume the worker had not heard of yet: not the new samples.
            delta = replace(delta, canary=(0, 0, 0), control=(0, 0, 0))
        worker.connections += sum(counts[0] for counts in delta.rows.values())
        worker.requests += sum(counts[1] for counts in delta.rows.values())
        self.evidence.add(delta, self.config.rotation)

    def _tell_canary(self, worker: WorkerState) -> None:
        judge, window = self.evidence.canary, self.evidence.window
        if worker.outbox is None:
            return
        worker.outbox.send_nowait(
            {
                "t": "canary",
                "halted": judge.halted,
                "why": judge.why,
                "at": judge.halted_at,
                "by": judge.by,
                "epoch": judge.resumes,
                "window_closed": window.closed,
                "window_closed_at": (
                    window.closed_at.isoformat() if window.closed_at is not None else None
                ),
            }
        )
        worker.epoch = judge.resumes

    async def _sync_canary(self) -> None:
        """Tell every worker what the judge decided, when it changed (module docstring)."""
        judge = self.evidence.canary
        while True:
            await trio.sleep(CANARY_SYNC_INTERVAL)
            state = (judge.halted, judge.resumes, self.evidence.window.closed)
            if state != self._canary_told:
                self._canary_told = state
                for worker in self.workers:
                    if worker.ready:
                        self._tell_canary(worker)


# What a listening socket was opened as: (family, type, protocol, bound address).
_Shape = tuple[socket.AddressFamily, socket.SocketKind, int, tuple[Any, ...]]


def _shape(listener: socket.socket) -> _Shape:
    return listener.family, listener.type, listener.proto, listener.getsockname()


def _twin(shape: _Shape) -> socket.socket:
    """Another SO_REUSEPORT socket on the address of a listener of this `shape` (the port it
    got, when the config said 0)."""
    family, kind, proto, address = shape
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        set_tcp_options(sock)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def _stop(process: trio.Process) -> None:
    """Stop a worker at once (SIGINT: it cancels its connections, as Ctrl-C stops a single
    process); killed after WORKER_STOP_TIMEOUT."""
    try:
        process.send_signal(signal.SIGINT)
    except ProcessLookupError:
        return
    with trio.move_on_after(WORKER_STOP_TIMEOUT):
        await process.wait()
        return
    log.error("worker pid %d did not stop within %g s; killed", process.pid, WORKER_STOP_TIMEOUT)
    process.kill()
    await process.wait()


def _describe_exit(code: int | None) -> str:
    """How a worker ended, in words: "exited with code 1", "was killed by SIGKILL"."""
    if code is None:
        return "was lost"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with code {code}"


def _union(maps: Sequence[dict[str, frozenset[bytes]]]) -> dict[str, frozenset[bytes]]:
    union: dict[str, frozenset[bytes]] = {}
    for failures in maps:
        for name, clients in failures.items():
            union[name] = union.get(name, frozenset()) | clients
    return union


def _failures_from_wire(value: object) -> dict[str, frozenset[bytes]]:
    """A worker's `failing` (Reporter.next_message): {version name: [client id as hex]},
    bounded as its report counts are; ValueError for anything else."""
    if not isinstance(value, dict) or len(value) > reports.MAX_GROUPS:
        raise ValueError("not a map of app versions")
    failures: dict[str, frozenset[bytes]] = {}
    for name, clients in value.items():
        if (
            not isinstance(name, str)
            or not isinstance(clients, list)
            or len(clients) > reports.MAX_CANARY_CLIENTS
            or not all(isinstance(client, str) for client in clients)
        ):
            raise ValueError("not lists of client ids by app version")
        failures[name] = frozenset(bytes.fromhex(client) for client in clients)
    return failures
