"""The TLS front: the server, and one connection's pipeline.

Theory of operation. For every accepted connection (`listeners.accept_loop`) we

0. behind a load balancer ([listen] proxy_protocol), read its PROXY header (proxied.py): the
   client's address it carries replaces the balancer's for everything below;
1. **peek**: read raw bytes until `parse_client_hello` returns a hello, bounded by
   MAX_CLIENT_HELLO_BYTES and by the handshake timeout. The peek is advisory: bytes it cannot
   parse still go to OpenSSL (with the default identity), which then decides. Only plain HTTP
   sent to the TLS port is answered here, with a short 400, because a TLS alert would be
   unreadable to the person who typed http:// by mistake;
2. **answer a challenge** instead, when a tls-alpn-01 responder is registered (ACME, started
   beside the server: `TlsAlpnResponder`) and the hello is a CA validating one of its
   challenges; everyone else passes without a wait;
3. **choose** with the pure `policy.choose` from the hello, the peer address and the clock;
4. **handshake**: feed the peeked bytes to OpenSSL first (`streams.TlsStream`'s prefix), with
   the chosen identity's context. The context comes from the key snapshot current at that
   moment; a reload swaps the snapshot (see lifecycle.py) and never touches a context already
   in use, so connections already open keep their material and new handshakes get the new
   one;
5. **respond**: HTTP/1.1 on the TLS stream, relayed to the upstream (http.relay) or, without
   one, answered here (placeholder.py);
6. **account**: the connection's record (connection.py) goes to the evidence and to the log,
   one `conn` line per connection. Outcomes (tls.outcome) tell a client that aborted the
   handshake after seeing our certificate (what a pinning client does when it rejects our
   key) from one that completed it and left without a request.

The connection's task owns it: whatever happens, its `finally` closes the socket and gives
back the connection slot; after a refusal whose client may still be sending, it first lingers
(closing.lingering_close), so that the close does not reset the connection and take the
refusal with it. A bug costs one connection (logged with its traceback), never the server.
Every wait is bounded by a named setting (config.Limits) or constant.

What the server does over time (reloads, the drain, file polling, signals) is lifecycle.py's;
where it listens, listeners.py's.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from functools import partial
from typing import Final, Protocol

import trio

from dualproxy.config.errors import OperatorError
from dualproxy.config.schema import Config
from dualproxy.http.h2 import ALPN_H2, Http2Connection, LocalOnly, StreamSettings
from dualproxy.http.relay import ClientConnection, Departures, Drain, RelaySettings
from dualproxy.ops.accesslog import AccessLog
from dualproxy.ops.evidence import NONE_LABEL, Evidence
from dualproxy.ops.logformat import configured_format, log_event
from dualproxy.pinning import endpoints, reports
from dualproxy.rotation import policy
from dualproxy.serve import announce, lifecycle, placeholder, rollout
from dualproxy.serve.admission import Admission
from dualproxy.serve.clock import ReusedUtcNow, utc_now
from dualproxy.serve.closing import CLOSE_NOTIFY_TIMEOUT, close_pool, linger, lingering_close
from dualproxy.serve.connection import ConnectionRecord, peer_address
from dualproxy.serve.lifecycle import Loader, Material, read_files
from dualproxy.serve.listeners import (
    ACCEPTED_SOCKETS_INHERIT_OPTIONS,
    accept_loop,
    bound_address,
    close_listener,
    describe_bound,
    open_listeners,
)
from dualproxy.serve.parking import Parked, ParkingLot
from dualproxy.serve.proxied import receive_proxy_header
from dualproxy.serve.sharedhalt import SharedHalt
from dualproxy.tls import keystore, proxy_protocol
from dualproxy.tls.clienthello import (
    MAX_CLIENT_HELLO_BYTES,
    ClientHello,
    ClientHelloError,
    parse_client_hello,
)
from dualproxy.tls.clienthello import is_plain_http as looks_like_plain_http
from dualproxy.tls.keystore import KeySnapshot
from dualproxy.tls.outcome import Outcome, classify_handshake_failure
from dualproxy.tls.streams import TcpStream, TlsStream
from dualproxy.tls.tickets import TicketKeys, keep_rotating

__all__ = ["Server", "TlsAlpnResponder"]

log = logging.getLogger("dualproxy")

# What trio calls a connection's task (in tracebacks and trio's instruments).
_CONNECTION_TASK_NAME: Final = "dualproxy.serve.server.Server._connection_task"


class TlsAlpnResponder(Protocol):
    """Answers tls-alpn-01 validations (RFC 8737) on the server's TLS port: what the handshake
    path knows of ACME, which registers one (`Server.tls_alpn_responder`) while it runs."""

    def challenge_context(self, hello: ClientHello) -> ssl.SSLContext | None:
        """The context that answers `hello`, when it is a CA validating a pending challenge
        (it offers ALPN acme-tls/1 for a name with one); None for everyone else. Called for
        every ClientHello: no I/O, no wait."""
        ...

    async def answer_challenge(
        self, stream: TcpStream, peeked: bytes, context: ssl.SSLContext
    ) -> str:
        """Complete the validation handshake with `context` (the peeked bytes first) and
        close, within its own time limit; how it ended, for the log's detail."""
        ...


class Server:
    """One dualproxy server: its listeners, its current material (config, keys, relay), its
    connections."""

    def __init__(
        self,
        config: Config,
        snapshot: KeySnapshot | None = None,
        *,
        clock: Callable[[], datetime] = utc_now,
        dev_headers: bool = False,
        handle_signals: bool = True,
        load: Loader = read_files,
        watch_files: bool = True,
        share_state: bool = False,
    ) -> None:
        """`snapshot`: the config's keys, when the caller loaded them already (and vouches
        that they are as fresh as the files); `load`: how reloads read the config file and
        its keys (lifecycle.read_files); `watch_files`: reload when they change (a worker
        process leaves that to its supervisor, which checks them once for every worker);
        `share_state`: share the canary's halt with the replicas of the state folder
        (sharedhalt.py; `dualproxy serve` does, a rehearsal or the dev bench must not),
        read at start and with each look of the file poller."""
        self.config = config
        # Taken before the keys are read, so the file poller sees any change made while they
        # load (with a snapshot passed in, the caller vouches that it is that fresh).
        files_seen = lifecycle.files_signature(config)
        self.snapshot = snapshot if snapshot is not None else keystore.load_snapshot(config)
        # One ring of session-ticket keys for every context, this snapshot's and every later
        # one's: a reload resumes the sessions of the previous contexts (tls.tickets).
        self.tickets = TicketKeys(config.tls)
        self.tickets.install_snapshot(self.snapshot)
        self._clock = ReusedUtcNow() if clock is utc_now else clock
        self._dev_headers = dev_headers
        self._handle_signals = handle_signals
        self._watch_files = watch_files
        self._slots = trio.CapacityLimiter(config.limits.max_connections)
        # Who got which key and how it went (the admin listener shows it); the canary's halt.
        self.evidence = Evidence()
        # Responses before a key is chosen (none, today): counted all the same.
        self._unkeyed_counters = self.evidence.counters_for(NONE_LABEL, NONE_LABEL)
        self._drain = Drain()
        self._departures = Departures()  # relayed clients waiting for a response head
        # Kept-alive connections idle without a task (parking.py).
        self._lot = ParkingLot(self._drain, self._resume_connection, self._abandon_connection)
        self._shutdown = lifecycle.Shutdown(self._drain, self._slots)
        # The reclaim at max_connections and the per-client limit (admission.py).
        self._admission = Admission(self._drain)
        self._listening = trio.Event()
        self._bound: list[tuple[str, int]] = []
        # The tasks beside the connections while run() runs (the drain delay is one of them).
        self._services: trio.Nursery | None = None
        # SIGTERM with [lifecycle] drain_delay: not ready any more, still serving (see drain).
        self._leaving = False
        # The paths answered here, never upstream ([manifest], [reports]; endpoints.py).
        self._local = endpoints.build(config, None, clock)
        self._manifest = lifecycle.ManifestWatch(lambda: self.evidence.window.closed)
        # What requests are relayed with when config.upstream is set (a bad [upstream] stops
        # us here, as an unusable key does); run() closes the pool's connections when it ends.
        self._relay = (
            RelaySettings.build(config, local=self._local) if config.upstream is not None else None
        )
        self.reloads = lifecycle.Reloads(self, load, self._clock, files_seen=files_seen)
        # The canary's halt record in the state folder, and the poller woken to share a halt
        # or a resume at once.
        self.shared_halt = SharedHalt(self) if share_state else None
        if self.shared_halt is not None:
            self.evidence.canary.on_decision = self.reloads.poll_soon
        # Answers tls-alpn-01 validations on our listeners while ACME runs beside us.
        self.tls_alpn_responder: TlsAlpnResponder | None = None
        # One line per request ([log] access; ops.accesslog), flushed beside the server.
        self.access_log = _open_access_log(config)

    # --- what it serves --------------------------------------------------------------

    @property
    def material(self) -> Material:
        """What the server serves now (a reload swaps it whole: `install`)."""
        return Material(self.config, self.snapshot, self._relay, self._local)

    def install(self, material: Material, why: str) -> None:
        """Serve `material` from now on: the next handshake gets it, connections already open
        keep theirs. How a reload ends (lifecycle.Reloads); says so in the log."""
        config, snapshot = material.config, material.snapshot
        if config.limits.max_connections != self.config.limits.max_connections:
            self._slots.total_tokens = config.limits.max_connections
        self.tickets.install_snapshot(snapshot)
        # One config and its snapshot together: a handshake reads both at once.
        self.config, self.snapshot = config, snapshot
        self._relay, self._local = material.relay, material.local
        for warning in snapshot.warnings:
            log.warning("%s", warning)
        keys = ", ".join(f"{k.name} ({k.pin})" for k in snapshot.keys.values())
        log.info("reloaded (%s): serving %s", why, keys)
        self._manifest.announce(material, self._clock())

    def now(self) -> datetime:
        """The policy's clock: the wall clock, or the one a test or the dev bench gave."""
        return self._clock()

    @property
    def active_connections(self) -> int:
        """Connections open now (each holds a connection slot)."""
        return self._slots.borrowed_tokens

    @property
    def processes(self) -> int:
        """Processes serving clients, each with its own connection limits."""
        return 1

    @property
    def idle_connections(self) -> int:
        """Connections open now that wait for a request (reclaimable at the limit)."""
        return self._drain.idle_connections

    @property
    def parked_connections(self) -> int:
        """Idle connections among those that wait without a task (parking.py)."""
        return len(self._lot)

    @property
    def reclaimed_connections(self) -> int:
        """Idle connections closed at max_connections to admit new clients, since the start."""
        return self._admission.reclaimed

    @property
    def refused_per_client(self) -> int:
        """Connections closed at once for their client's max_connections_per_client."""
        return self._admission.refused

    def _at_limit(self, waiting: bool) -> None:
        self._admission.at_limit(self.config.limits.max_connections, waiting)

    @property
    def reloads_ok(self) -> int:
        """Reloads that took effect since the start (the status page shows them)."""
        return self.reloads.ok

    @property
    def reloads_failed(self) -> int:
        """Reloads that failed, the previous material still serving."""
        return self.reloads.failed

    def report_summary(self) -> reports.ReportSummary | None:
        """The pin-failure report counts (reports.summary's shape), each known pin named by its
        key and role now, for /status.json and the status page; None without [reports]."""
        local = self._local
        if local is None:
            return None
        keys, rotation = self.snapshot.keys, self.config.rotation
        closed = self.evidence.window.closed
        labels = endpoints.pin_labels(keys.values(), rotation, self._clock(), window_closed=closed)
        old_pins, new_pins = endpoints.rotation_pins(keys, rotation)
        return local.report_summary(labels, old_pins=old_pins, new_pins=new_pins)

    # --- lifecycle ---------------------------------------------------------------------

    async def run(
        self,
        listeners: Sequence[socket.socket] | None = None,
        *,
        task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen and serve until cancelled, or until drained (`drain()`, or SIGTERM when
        handling signals), which ends it gracefully.

        `listeners`: listening sockets to serve (for example handed over by another process),
        which the server then owns and closes; by default it opens the configured addresses.
        Reports the bound (host, port) pairs through task_status once accepting, so tests can
        listen on port 0 without races.
        """
        if listeners is None:
            listen = self.config.listen
            listeners = await open_listeners(listen.addresses, listen.reuse_port)
        elif not listeners:
            raise ValueError("Server.run: no listener to serve")
        try:
            bound = [bound_address(listener) for listener in listeners]
            for warning in self.snapshot.warnings:
                log.warning("%s", warning)
            self._manifest.announce(self.material, self._clock())
            if self.shared_halt is not None:  # a halt outlives a restart
                await self.shared_halt.sync()
            rollout.review(self)  # a restart inside a held window says so before serving
            self._shutdown.accepting = accepting = trio.CancelScope()
            if self._drain.draining:
                accepting.cancel()
            async with trio.open_nursery() as services:
                self._services = services
                if self._watch_files:
                    shared = self.shared_halt.sync if self.shared_halt is not None else None
                    services.start_soon(self.reloads.watch_files, shared)
                services.start_soon(lifecycle.prune_idle_upstream, self)
                services.start_soon(lifecycle.watch_departures, self._departures)
                services.start_soon(self._manifest.watch, self, self._clock)
                services.start_soon(rollout.review_forever, self)
                services.start_soon(
                    announce.watch_window, self, self._clock, lambda: self.evidence.window.closed
                )
                services.start_soon(keep_rotating, self.tickets)
                services.start_soon(self._lot.sweep_forever)
                if self.access_log is not None:
                    services.start_soon(self.access_log.run)
                if self._handle_signals:
                    await services.start(lifecycle.watch_signals, self)
                await self._serve(listeners, bound, task_status)
                services.cancel_scope.cancel()
        finally:
            self._services = None
            for listener in listeners:  # those whose accept loop never started
                close_listener(listener)
            self._shutdown.accepting = self._shutdown.connections = None
            if self.access_log is not None:  # a clean stop loses no line
                self.access_log.close()
            if self._relay is not None:
                await close_pool(self._relay.pool)

    async def _serve(
        self,
        listeners: Sequence[socket.socket],
        bound: list[tuple[str, int]],
        task_status: trio.TaskStatus[list[tuple[str, int]]],
    ) -> None:
        """The accept loops, then (drained) the grace for the connections still open."""
        accepting = self._shutdown.accepting
        assert accepting is not None
        try:
            async with trio.open_nursery() as connections:
                self._shutdown.connections = connections.cancel_scope
                self._lot.nursery = connections
                with accepting:
                    async with trio.open_nursery() as acceptors:
                        for listener in listeners:
                            acceptors.start_soon(
                                partial(accept_loop, at_limit=self._at_limit),
                                listener,
                                self._slots,
                                connections,
                                self._connection_task,
                                name=_CONNECTION_TASK_NAME,
                            )
                        log.info("listening on %s", describe_bound(bound))
                        self._bound = bound
                        self._listening.set()
                        task_status.started(bound)
                # Only drain() gets here: the listeners are closed, and the connections still
                # open get shutdown_grace to finish (a deadline, not a sleep).
                grace = self.config.limits.shutdown_grace
                connections.cancel_scope.deadline = min(
                    connections.cancel_scope.deadline, trio.current_time() + grace
                )
        finally:
            self._lot.nursery = None
            self._lot.close()
        if connections.cancel_scope.cancelled_caught:
            log.warning("drained: cancelled the connections still busy after the grace")
        else:
            log.info("drained: every connection finished")

    async def wait_listening(self) -> list[tuple[str, int]]:
        """Wait until run() accepts clients; the (host, port) pairs it listens on."""
        await self._listening.wait()
        return self._bound

    @property
    def draining(self) -> bool:
        """Whether the server is leaving: the drain delay or the drain has started (it ends
        with run())."""
        return self._leaving or self._shutdown.draining

    def not_ready(self) -> str | None:
        """Why a load balancer should not send us clients now (what /readyz answers 503
        with), or None when it should: the keys are loaded (this object exists) and the
        listeners accept, and the server is not leaving."""
        if self.draining:
            return "draining: this server is stopping"
        if not self._listening.is_set():
            return "starting: the listeners are not open yet"
        return None

    def drain(self) -> None:
        """Shut down gracefully, as SIGTERM does. With [lifecycle] drain_delay, first only
        answer /readyz with 503 for that long while serving as before, so that a load
        balancer takes us out before we stop accepting. Then stop accepting (the listeners
        close, so new clients are refused or go to another process on the port), close idle
        keep-alive connections at once, give requests in flight limits.shutdown_grace to
        finish, their responses saying `Connection: close`, then cancel whatever is left;
        run() returns.
        """
        delay = self.config.lifecycle.drain_delay
        if self._leaving or self._shutdown.draining:
            return
        if delay > 0 and self._services is not None:
            self._leaving = True
            log.info(
                "leaving: /readyz answers 503 from now on; serving on for %g s"
                " ([lifecycle] drain_delay) so that the load balancer stops sending, then"
                " draining",
                delay,
            )
            self._services.start_soon(self._drain_after, delay)
            return
        self._shutdown.drain(self.config.limits.shutdown_grace)

    async def _drain_after(self, delay: float) -> None:
        await trio.sleep(delay)
        self._shutdown.drain(self.config.limits.shutdown_grace)

    def stop_now(self) -> None:
        """Cancel every connection at once (a second SIGTERM during the drain)."""
        self._shutdown.stop_now(self.config.limits.shutdown_grace)

    def reopen_logs(self) -> None:
        """Reopen the access log file (SIGUSR1, after logrotate moved it)."""
        if self.access_log is None:
            return
        try:
            self.access_log.reopen()
        except OSError as exc:
            log.error(
                "log.access: cannot reopen %s (%s); still writing to the old file",
                self.config.log.access_path,
                exc.strerror,
            )
            return
        log.info("log.access: reopened %s", self.config.log.access_path or "stderr")

    async def reload(self, why: str) -> bool:
        """Re-read the config and key files; swap in new material only if all of it is good
        (lifecycle.Reloads: one at a time, the previous material serving on failure). True
        when it took effect."""
        return await self.reloads.reload(why)

    async def apply(self, config: Config, why: str) -> bool:
        """Serve `config` from now on, exactly as a reload would serve a changed config file:
        its keys are loaded first, all or nothing, and swapped in together with it; connections
        already open keep their material. How the dev bench switches scenarios live. True when
        it took effect; on failure the previous config and keys keep serving, and the log says
        why. The listen addresses cannot change this way (a reload keeps them too)."""
        return await self.reloads.apply(config, why)

    # --- one connection ------------------------------------------------------------------

    async def _connection_task(self, sock: socket.socket, address: object, token: object) -> None:
        """listeners.accept_loop's handler: owns the socket and the slot (`token`)."""
        record = ConnectionRecord(peer="-", counters=self._unkeyed_counters, access=self.access_log)
        record.peer, record.peer_ip = peer_address(address)
        try:
            stream = TcpStream(sock, options_set=ACCEPTED_SOCKETS_INHERIT_OPTIONS)
        except OSError:  # reset before we could set it up
            sock.close()
            self._slots.release_on_behalf_of(token)
            return
        await self._own(record, stream, token, partial(self.handle_connection, stream, record))

    async def _resume_connection(self, parked: Parked, serve: bool) -> None:
        """The parking lot's handler: a parked connection's new task, which serves it on (its
        next request, or the client's close) or, not `serve`, closes it."""
        stream = parked.tls.transport_stream
        await self._own(
            parked.record,
            stream,
            parked.token,
            partial(self._serve_on, parked.relay, parked.tls, stream, serve=serve),
        )

    async def _own(
        self,
        record: ConnectionRecord,
        stream: TcpStream,
        token: object,
        serve: Callable[[], Awaitable[ClientConnection | None]],
    ) -> None:
        """Run `serve` as the connection's owner: whatever happens, close the socket and give
        back the slot after it; unless it returns a relay that parked, which the parking lot
        then owns."""
        parked: ClientConnection | None = None
        try:
            parked = await serve()
        except trio.Cancelled:
            record.outcome = Outcome.SHUTDOWN
            raise
        except Exception:
            # A bug must cost one connection, not the server and every other client with it.
            record.outcome = Outcome.INTERNAL_ERROR
            log.exception("internal error on the connection from %s", record.peer)
        finally:
            if parked is None or not self._lot.park(parked, record, token):
                self._finish(record, stream, token)

    def _abandon_connection(self, parked: Parked) -> None:
        """A parked connection the server stops without a task for it (the grace ran out)."""
        parked.record.outcome = Outcome.SHUTDOWN
        self._finish(parked.record, parked.tls.transport_stream, parked.token)

    def _finish(self, record: ConnectionRecord, stream: TcpStream, token: object) -> None:
        """A connection ended: its socket closed, its slot back, its record counted and
        logged."""
        # Closed synchronously, without the scheduler round trip of an aclose: usually the
        # TLS stream's aclose closed it already, and closing again is a no-op.
        stream.close()
        self._slots.release_on_behalf_of(token)
        if record.client is not None:
            self._admission.release(record.client)
        record.end()
        self.evidence.connection_ended(record, self.config.rotation)
        # A CA's validation connections are logged by the challenge board, once per challenge
        # and with its name; their conn lines only at debug level. An exchange the upstream
        # failed (a 502, 503 or 504 of ours) is a warning.
        level = logging.INFO
        if record.outcome is Outcome.ACME_CHALLENGE:
            level = logging.DEBUG
        elif record.outcome is Outcome.UPSTREAM_ERROR:
            level = logging.WARNING
        log_event(log, record, level)

    async def handle_connection(
        self, stream: TcpStream, record: ConnectionRecord
    ) -> ClientConnection | None:
        """Peek, choose, handshake, serve. Fills `record` (its peer already set); the caller
        closes the socket, unless this returns the connection's relay, which parked (see
        parking.py): the caller then parks it."""
        peer_ip = record.peer_ip
        # One config and its snapshot for the whole handshake, whatever reloads do meanwhile:
        # a reload swaps both at once, and the plan must name identities this snapshot has.
        config, snapshot = self.config, self.snapshot
        received = b""
        if config.listen.proxy_protocol != "off":
            listen = config.listen
            expect = proxy_protocol.expectation(
                listen.proxy_protocol, listen.proxy_protocol_from, peer_ip
            )
            after: bytes | None = None
            with trio.move_on_after(config.limits.proxy_header_timeout):
                after = await receive_proxy_header(stream, expect, record)
                if after is None:
                    return None
                received, peer_ip = after, record.peer_ip
            if after is None:  # the timeout
                record.outcome, record.detail = Outcome.PROXY_REFUSED, "PROXY header timeout"
                return None
        limit = config.limits.max_connections_per_client
        record.client = self._admission.admit(peer_ip, limit, record.peer)
        if record.client is None:
            record.outcome = Outcome.CLIENT_LIMIT
            record.detail = f"the client holds limits.max_connections_per_client ({limit})"
            return None
        with trio.move_on_after(config.limits.handshake_timeout) as handshake_scope:
            peeked = await self._peek(stream, record, received)
            if peeked is None:
                return None
            # An ACME CA validating tls-alpn-01 gets the challenge certificate instead of ours
            # (RFC 8737); checked without a wait for everyone else.
            responder = self.tls_alpn_responder
            if responder is not None and record.hello is not None:
                context = responder.challenge_context(record.hello)
                if context is not None:
                    record.outcome = Outcome.ACME_CHALLENGE
                    record.detail = await responder.answer_challenge(stream, peeked, context)
                    return None
            evidence = self.evidence
            record.choice = policy.choose(
                config.rotation,
                record.hello,
                peer_ip,
                self._clock(),
                canary_halted=evidence.canary.halted,
                window_closed=evidence.window.closed,
            )
            identity = snapshot.identities[record.choice.identity]
            record.key = identity.presented_key(record.hello).name
            if record.hello is not None:  # chosen: only what the log line names stays
                record.hello = record.hello.brief()
            record.counters = self.evidence.counters_for(record.key, record.choice.reason)
            # https_compatible=False: aclose sends close_notify (RFC 8446 6.1), so a client
            # can tell our end of a response from a truncation. A client that closes without
            # one makes receive_some raise BrokenResourceError, which ends the connection just
            # as a clean close would.
            tls = TlsStream(stream, identity.context, server_side=True, prefix=peeked)
            try:
                await tls.do_handshake()
            except trio.BrokenResourceError as exc:
                record.outcome, record.detail = classify_handshake_failure(exc)
                return None
            record.tls_version = tls.version()
        if handshake_scope.cancelled_caught:
            record.outcome = Outcome.TIMEOUT
            record.detail = "handshake" if record.choice else "hello"
            return None
        record.outcome = Outcome.NO_REQUEST
        if self._relay is not None and tls.selected_alpn_protocol() != ALPN_H2:
            return await self._serve_on(self._client_connection(tls, record), tls, stream)
        linger_after = False
        try:
            linger_after = await self.respond(tls, record)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away; the record already says how far it got
        finally:
            await _close(tls, stream, linger_after=linger_after)
        return None

    async def _serve_on(
        self, relay: ClientConnection, tls: TlsStream, stream: TcpStream, *, serve: bool = True
    ) -> ClientConnection | None:
        """Relay the connection's requests (HTTP/1.1), then close it; or, if it parked,
        return the relay, the connection open. `serve` False: only close it (a parked
        connection whose keep-alive wait ended)."""
        linger_after = parked = False
        try:
            if serve:
                await relay.serve()
                if relay.parked:
                    parked = True
                    return relay
                linger_after = relay.client_may_be_sending
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away; the record already says how far it got
        finally:
            if not parked:
                await _close(tls, stream, linger_after=linger_after)
        return None

    async def _peek(
        self, stream: TcpStream, record: ConnectionRecord, received: bytes = b""
    ) -> bytes | None:
        """Read until the ClientHello is complete or unparseable; the bytes read (after the
        `received` ones: what the PROXY header's reader read past it), or None when the
        connection is already finished (closed, plain HTTP)."""
        buffer = bytearray(received)
        read = not received  # what came with a PROXY header is parsed before reading more
        while True:
            if read:
                try:
                    chunk = await stream.receive_some(max(1, MAX_CLIENT_HELLO_BYTES - len(buffer)))
                except trio.BrokenResourceError:
                    chunk = b""
                if not chunk:
                    record.outcome = Outcome.NO_HELLO
                    record.detail = f"closed after {len(buffer)} bytes"
                    return None
                buffer += chunk
            read = True
            data = bytes(buffer)
            # Checked on every read, not only the first: a request may arrive a byte at a time.
            if looks_like_plain_http(data):
                record.outcome = Outcome.PLAIN_HTTP
                await _send_plain_http_refusal(stream)
                return None
            try:
                hello = parse_client_hello(data)
            except ClientHelloError as exc:
                if looks_like_plain_http(data + b" "):
                    # So far a method token cut short (b"GE"): the next bytes tell.
                    continue
                record.detail = f"unparsed hello: {exc}"
                return data
            if hello is not None:
                record.hello = hello
                return data

    async def respond(self, tls: TlsStream, record: ConnectionRecord) -> bool:
        """Serve HTTP/2, as ALPN chose, on the established TLS stream, relayed to the
        upstream when the config has one (h2.py); or HTTP/1.1 without one, every request
        answered here (placeholder.py). (HTTP/1.1 relayed goes through `_serve_on`: it may
        park.) True when the connection should end with a lingering close (the client may
        still be sending)."""
        if tls.selected_alpn_protocol() == ALPN_H2:
            return await self._respond_h2(tls, record)
        return await placeholder.respond(
            tls,
            record,
            limits=self.config.limits,
            drain=self._drain,
            local=self._local_endpoints,
            response_headers=self._dev_response_headers(record),
        )

    def _client_connection(self, tls: TlsStream, record: ConnectionRecord) -> ClientConnection:
        """The HTTP/1.1 relay of one client connection."""
        return ClientConnection(
            tls,
            peer=record.peer_ip,
            settings=self._relay_settings,
            drain=self._drain,
            departures=self._departures,
            client_fd=tls.transport_stream.socket.fileno(),
            tally=record,
            response_headers=self._dev_response_headers(record),
            upstream_detail=self._dev_headers,
        )

    async def _respond_h2(self, tls: TlsStream, record: ConnectionRecord) -> bool:
        """Serve the connection's HTTP/2 streams (http.h2): relayed, or without an upstream
        answered as the placeholder answers HTTP/1.1 requests."""
        config = self.config
        settings: Callable[[], StreamSettings | None] = self._relay_settings
        if self._relay is None:
            placeholder_settings = LocalOnly(
                config.limits, placeholder.PlaceholderRoutes(self._local_endpoints)
            )
            settings = lambda: placeholder_settings  # noqa: E731
        connection = Http2Connection(
            tls,
            peer=record.peer_ip,
            settings=settings,
            limits=config.limits,
            drain=self._drain,
            tally=record,
            response_headers=self._dev_response_headers(record),
            upstream_detail=self._dev_headers,
        )
        await connection.serve()
        return connection.client_may_be_sending

    def _dev_response_headers(self, record: ConnectionRecord) -> list[tuple[bytes, bytes]]:
        """In dev mode only: the key served on this connection and why it was chosen."""
        if not self._dev_headers or record.choice is None or record.key is None:
            return []
        return [
            (b"x-dualproxy-key", record.key.encode()),
            (b"x-dualproxy-reason", str(record.choice.reason).encode()),
        ]

    def _relay_settings(self) -> RelaySettings | None:
        return self._relay

    def _local_endpoints(self) -> endpoints.LocalEndpoints | None:
        return self._local


def _open_access_log(config: Config) -> AccessLog | None:
    """The access log [log] asks for, in the process's log format; None when it is off.
    OperatorError for a file we cannot append to."""
    settings = config.log
    if not settings.access:
        return None
    try:
        return AccessLog(settings.access_path, json_lines=configured_format() == "json")
    except OSError as exc:
        raise OperatorError(
            f"cannot open {settings.access_path} for appending: {exc.strerror}",
            key_path="log.access",
            file=config.path,
            fix='point it at a writable file, or write "stderr" or "off"',
        ) from None


_PLAIN_HTTP_REFUSAL: Final = (
    b"HTTP/1.1 400 Bad Request\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Connection: close\r\n"
    b"Content-Length: 40\r\n"
    b"\r\n"
    b"This port speaks HTTPS; use https:// .\r\n"
)


async def _close(tls: TlsStream, stream: TcpStream, *, linger_after: bool) -> None:
    """End a connection whose handshake completed: a lingering close after a refusal whose
    client may still be sending, else with our close_notify (unless it went with the last
    response)."""
    if linger_after:
        await lingering_close(tls, stream)
    elif tls.close_notify_sent:  # with the last response: nothing left to send
        tls.close()
    else:
        with trio.move_on_after(CLOSE_NOTIFY_TIMEOUT):
            await tls.aclose()


async def _send_plain_http_refusal(stream: TcpStream) -> None:
    """Answer plain HTTP on the TLS port with 400, then linger: the client is likely to have
    sent more of its request than we read, and closing on it would reset the answer away."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        with trio.move_on_after(CLOSE_NOTIFY_TIMEOUT) as sending:
            await stream.send_all(_PLAIN_HTTP_REFUSAL)
        if not sending.cancelled_caught:  # else it does not read: nothing to linger for
            await linger(stream)
