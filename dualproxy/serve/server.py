"""The TLS front: listeners, the per-connection task, reloads.

Theory of operation. For every accepted connection we

1. **peek**: read raw bytes until `parse_client_hello` returns a hello, bounded by
   MAX_CLIENT_HELLO_BYTES and by the handshake timeout. The peek is advisory: bytes it cannot
   parse still go to OpenSSL (with the default identity), which then decides. Only plain HTTP
   sent to the TLS port is answered here, with a short 400, because a TLS alert would be
   unreadable to the person who typed http:// by mistake;
2. **choose** with the pure `policy.choose` from the hello, the peer address and the clock;
3. **handshake**: feed the peeked bytes to OpenSSL first (`streams.TlsStream`'s prefix), with
   the chosen identity's context. The context comes from the key snapshot current at that
   moment; a reload swaps the snapshot (one attribute assignment) and never touches a
   context already in use, so connections already open keep their material and new
   handshakes get the new one;
4. **serve** HTTP/1.1 on the TLS stream (the reverse-proxy relay, see `respond`);
5. **account**: one log line per connection with peer, SNI, ALPN offered, identity, key,
   reason and outcome. Outcomes tell a client that aborted the handshake after seeing our
   certificate (an alert such as bad_certificate, or a close mid-handshake: what a pinning
   client does when it rejects our key) from one that completed it and left without a request.

The handler owns the connection: whatever happens, its `finally` closes the socket and gives
back the connection slot; after a refusal whose client may still be sending, it first lingers
(`lingering_close`), so that the close does not reset the connection and take the refusal with
it. Every wait is bounded by a named setting (config.Limits) or constant.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import ipaddress
import logging
import math
import re
import signal
import socket
import ssl
import sys
import time
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from typing import Final

import h11
import trio

from dualproxy import config as config_mod
from dualproxy.acme import challenges
from dualproxy.config import Config, ConfigError, ListenAddress
from dualproxy.http.relay import (
    DEPARTURE_CHECK_SECONDS,
    ClientConnection,
    Departures,
    Drain,
    RelaySettings,
)
from dualproxy.http.upstream import UpstreamPool
from dualproxy.ops.evidence import LATENCY_BOUNDS, NONE_LABEL, Evidence, RequestCounters
from dualproxy.pinning import endpoints, manifest, reports
from dualproxy.rotation import policy
from dualproxy.tls import keystore
from dualproxy.tls.clienthello import (
    MAX_CLIENT_HELLO_BYTES,
    ClientHello,
    ClientHelloError,
    parse_client_hello,
)
from dualproxy.tls.clienthello import is_plain_http as looks_like_plain_http
from dualproxy.tls.keystore import KeySnapshot, KeyStoreError
from dualproxy.tls.streams import (
    TcpStream,
    TlsStream,
    discard_until_closed,
    receive_h11_request,
    set_tcp_options,
)

log = logging.getLogger("dualproxy")

# Accept errors that mean "out of resources right now", not "the listener is broken":
# back off and retry, as trio.serve_listeners and nginx do, instead of crashing.
_ACCEPT_CAPACITY_ERRNOS: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
)
# Linux gives an accepted TCP socket the listener's TCP options: set once on the listener,
# TCP_NODELAY and TCP_NOTSENT_LOWAT cost no system calls per connection (elsewhere, per socket).
_ACCEPTED_SOCKETS_INHERIT_OPTIONS: Final = sys.platform == "linux"
# What trio calls a connection's task (in tracebacks and trio's instruments).
_CONNECTION_TASK_NAME: Final = "dualproxy.serve.server.Server._connection_task"
# Clients accepted from the backlog in a row before the accept loop yields: enough to save
# a wait per client under a burst, few enough that the connections just accepted (and every
# other task) run soon.
ACCEPT_BATCH: Final = 16
# How long to pause accepting after such an error: long enough for a handler to free a
# descriptor, short enough not to be noticed by clients waiting in the backlog.
ACCEPT_BACKOFF_SECONDS: Final = 0.1
# How often to look again for an [upstream] to prune while none is configured (a reload may
# add one); idle pools are pruned every half pool_idle_timeout.
IDLE_PRUNE_WITHOUT_UPSTREAM: Final = 30.0
# A close_notify is a courtesy: a client that stops reading must not hold our task.
CLOSE_NOTIFY_TIMEOUT: Final = 1.0
# The lingering close after a refusal whose client may still be sending (`lingering_close`),
# bounded like nginx's (lingering_time 30s, lingering_timeout 5s). In total: long enough for a
# client that sends its whole request before it reads to get to our answer over a slow link;
# beyond it the client has had its chance, and the connection slot goes to someone else.
LINGER_TIME: Final = 30.0
# Between reads: a client that sends nothing for this long after our FIN is no longer sending
# (it read the answer and holds the connection open), so it costs no more than an idle one.
LINGER_TIMEOUT: Final = 5.0
# Discarded in total: what a client can have in flight when it learns of the refusal (both
# ends' socket buffers, up to a few MiB each under Linux's autotuning, and the network's) with
# room to spare, while a refused client cannot make us read an upload for nothing.
LINGER_MAX_BYTES: Final = 16 * 1024 * 1024
# One receive while lingering: raw TLS bytes, never decrypted, so any size will do.
LINGER_RECEIVE_SIZE: Final = 64 * 1024
# Request bodies the placeholder responder reads and discards, in bytes: enough for any
# health-check POST, small enough that nobody can make us read a file upload for nothing.
PLACEHOLDER_MAX_BODY: Final = 64 * 1024
# How long a reading of the wall clock serves the policy (which reads it for every connection),
# in seconds: rotation times are whole seconds and the canary's ramp takes days, so a reading
# this old chooses as a fresh one would, at a fraction of the cost of a datetime per connection.
CLOCK_REUSE_SECONDS: Final = 0.25
# How often `serve` looks at the served manifest's expiry (a warning before it, an error
# after): the warning window is days long, so a minute is prompt and costs nothing.
MANIFEST_EXPIRY_CHECK_INTERVAL: Final = 60.0
# h11's own cap on an incomplete request head; 16 KiB like nginx's large_client_header_buffers.
MAX_REQUEST_HEAD_BYTES: Final = 16 * 1024
# One receive from the TLS stream, which decrypts at most one TLS record (16 KiB) at a time.
RECEIVE_SIZE: Final = 16 * 1024


class Outcome(enum.StrEnum):
    """How a connection ended, as logged and counted."""

    OK = "ok"  # handshake completed and at least one request answered
    NO_REQUEST = "no-request"  # handshake completed, closed without a request
    CLIENT_ABORTED = "client-aborted"  # alert or close from the client during the handshake
    TLS_ERROR = "tls-error"  # the handshake failed on our side (no shared cipher, old version)
    TIMEOUT = "timeout"  # hello or handshake not complete within handshake_timeout
    NO_HELLO = "no-hello"  # closed before a complete ClientHello (port scans, TCP health checks)
    PLAIN_HTTP = "plain-http"  # plain HTTP sent to the TLS port; answered 400
    ACME_CHALLENGE = "acme-challenge"  # an ACME CA validating tls-alpn-01 (see challenges.py)
    SHUTDOWN = "shutdown"  # the server stopped while the connection was open
    INTERNAL_ERROR = "internal-error"  # a bug in dualproxy, logged with its traceback


@dataclass(slots=True)
class ConnectionRecord:
    """What one connection did; logged once, when it ends."""

    peer: str
    peer_ip: policy.IPAddress | None = None  # for the policy and X-Forwarded-For
    hello: ClientHello | None = None
    choice: policy.Choice | None = None
    key: str | None = None
    outcome: Outcome = Outcome.NO_HELLO
    detail: str = ""
    tls_version: str | None = None
    requests: int = 0
    started: float = field(default_factory=trio.current_time)
    # The per-request counts of the key and reason this connection was served, shared with
    # the other connections served them (Evidence.counters_for; taken when the key is chosen).
    counters: RequestCounters = field(default_factory=RequestCounters, repr=False)

    # The relay's Tally: it reports through these, without importing this module.
    def request_received(self) -> None:
        self.requests += 1
        self.outcome = Outcome.OK

    def note(self, detail: str) -> None:
        self.detail = detail

    def response_relayed(self, status: int, upstream_seconds: float) -> None:
        counters = self.counters
        counters.statuses[status // 100] += 1
        counters.latency[bisect_right(LATENCY_BOUNDS, upstream_seconds)] += 1
        counters.latency_sum += upstream_seconds

    def response_generated(self, status: int) -> None:
        self.counters.statuses[status // 100] += 1

    def log_line(self) -> str:
        """`conn` and the fields key=value, in a fixed order, "-" for none.

        One f-string: it is built for every connection. Text that a client controls (SNI,
        ALPN, the detail, which may quote the client's bytes) goes through _log_value; the
        other values are our own vocabulary (enum values, config key and identity names,
        OpenSSL's version names) or our own writing (the peer, from the address accept()
        returned: see _peer_address), which never need quoting.
        """
        hello, choice = self.hello, self.choice
        if hello is not None:
            sni = _log_value(hello.sni)
            # None offered logs "-", as no SNI does.
            alpn = _log_value(b",".join(hello.alpn).decode("ascii", "replace") or None)
        else:
            sni = alpn = "-"
        identity, reason = (choice.identity, choice.reason) if choice is not None else ("-", "-")
        ms = round((trio.current_time() - self.started) * 1000)
        return (
            f"conn peer={self.peer} sni={sni} alpn={alpn} identity={identity}"
            f" key={self.key or '-'} reason={reason} outcome={self.outcome}"
            f" detail={_log_value(self.detail or None)} tls={self.tls_version or '-'}"
            f" requests={self.requests} ms={ms}"
        )


_UNSAFE_LOG_CHARS = re.compile(r"[^\x21-\x7e]|[\"\\=]")


def _log_value(value: object) -> str:
    """Client-controlled text (SNI, ALPN) must not forge log fields or lines."""
    if value is None:
        return "-"
    text = str(value)
    if text and not _UNSAFE_LOG_CHARS.search(text):
        return text
    escaped = text.encode("unicode_escape").decode("ascii").replace('"', '\\"')
    return f'"{escaped}"'


# OpenSSL reports an alert received from the peer with a reason such as
# "SSLV3_ALERT_BAD_CERTIFICATE" or "TLSV1_ALERT_UNKNOWN_CA".
_RECEIVED_ALERT = re.compile(r"^(?:SSLV3|TLSV1|TLSV13)_ALERT_([A-Z0-9_]+)$")


def classify_handshake_failure(exc: BaseException) -> tuple[Outcome, str]:
    """Whose fault a failed server handshake was: the client's (it aborted) or ours."""
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


def utc_now() -> datetime:
    return datetime.now(UTC)


class _ReusedUtcNow:
    """utc_now, read again only once CLOCK_REUSE_SECONDS of the monotonic clock have passed."""

    __slots__ = ("_reading",)

    def __init__(self) -> None:
        # (monotonic time it is good until, the reading) in one attribute: worker threads
        # read it too.
        self._reading = (-math.inf, datetime.now(UTC))

    def __call__(self) -> datetime:
        now = time.monotonic()
        until, reading = self._reading
        if now >= until:
            reading = datetime.now(UTC)
            self._reading = (now + CLOCK_REUSE_SECONDS, reading)
        return reading


def _peer_address(name: object) -> tuple[str, policy.IPAddress | None]:
    """The log text and the address of a peer, from the address accept() returned."""
    if not isinstance(name, tuple) or len(name) < 2:
        return "-", None
    host, port = name[0], name[1]
    # From the packed form: parsing the text costs more, once per connection. The text of an
    # IPv4 address is accept()'s own (inet_ntop, the canonical dotted quad).
    try:
        if len(name) == 2:
            return f"{host}:{port}", ipaddress.IPv4Address(socket.inet_aton(host))
        address = ipaddress.IPv6Address(socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0]))
    except (OSError, TypeError, AttributeError):
        return _log_value(host), None  # escaped: the log line takes the peer text as it is
    return f"[{address}]:{port}", address


class Server:
    """One dualproxy server: its listeners, its current key snapshot, its connections."""

    def __init__(
        self,
        config: Config,
        snapshot: KeySnapshot | None = None,
        *,
        clock: Callable[[], datetime] = utc_now,
        dev_headers: bool = False,
        handle_signals: bool = True,
    ) -> None:
        self.config = config
        # Taken before the keys are read, so the file poller sees any change made while they
        # load (with a snapshot passed in, the caller vouches that it is that fresh).
        self._files_seen = self._files_signature()
        self.snapshot = snapshot if snapshot is not None else keystore.load_snapshot(config)
        self._reload_lock = trio.Lock()
        self._clock = _ReusedUtcNow() if clock is utc_now else clock
        self._dev_headers = dev_headers
        self._handle_signals = handle_signals
        self._slots = trio.CapacityLimiter(config.limits.max_connections)
        self.reloads_ok = 0
        self.reloads_failed = 0
        # Who got which key and how it went (the admin listener shows it); the canary's halt.
        self.evidence = Evidence()
        # Responses before a key is chosen (none, today): counted all the same.
        self._unkeyed_counters = self.evidence.counters_for(NONE_LABEL, NONE_LABEL)
        self._drain = Drain()
        self._departures = Departures()  # relayed clients waiting for a response head
        # While run() runs: the scope of the accept loops (drain() cancels it) and that of
        # the connection tasks (the grace deadline and a second SIGTERM act on it).
        self._accepting: trio.CancelScope | None = None
        self._connections: trio.CancelScope | None = None
        # The paths answered here, never upstream ([manifest], [reports]; endpoints.py).
        self._local = endpoints.build(config, None, clock)
        self._manifest_status: tuple[datetime, str] | None = None  # the last one logged
        # What requests are relayed with when config.upstream is set (a bad [upstream] stops
        # us here, as an unusable key does); run() closes the pool's connections when it ends.
        self._relay = (
            RelaySettings.build(config, local=self._local) if config.upstream is not None else None
        )
        # Pending ACME challenges, while run() runs with [acme] (see acme.run_in_server).
        self.acme_board: challenges.ChallengeBoard | None = None

    # --- lifecycle -------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen and serve until cancelled, or until drained (`drain()`, or SIGTERM when
        handling signals), which ends it gracefully.

        Reports the bound (host, port) pairs through task_status once accepting, so tests can
        listen on port 0 without races.
        """
        listeners = await open_listeners(
            self.config.listen.addresses, self.config.listen.reuse_port
        )
        bound = [_sockname(listener) for listener in listeners]
        for warning in self.snapshot.warnings:
            log.warning("%s", warning)
        self._log_manifest_problem()
        self._check_manifest_expiry()
        self._accepting = accepting = trio.CancelScope()
        if self._drain.draining:
            accepting.cancel()
        try:
            async with trio.open_nursery() as services:
                services.start_soon(self._watch_files)
                services.start_soon(self._prune_idle_upstream)
                services.start_soon(self._watch_departures)
                services.start_soon(self._watch_manifest_expiry)
                if self._handle_signals:
                    await services.start(self._watch_signals)
                if self.config.acme is not None:
                    from dualproxy.acme.issuer import (
                        run_in_server,  # the acme library loads only when used
                    )

                    await services.start(run_in_server, self, self._clock, bound)
                async with trio.open_nursery() as connections:
                    self._connections = connections.cancel_scope
                    with accepting:
                        async with trio.open_nursery() as acceptors:
                            for listener in listeners:
                                acceptors.start_soon(self._accept_loop, listener, connections)
                            log.info("listening on %s", describe_bound(bound))
                            task_status.started(bound)
                    # Only drain() gets here: the listeners are closed, and the connections
                    # still open get shutdown_grace to finish (a deadline, not a sleep).
                    grace = self.config.limits.shutdown_grace
                    connections.cancel_scope.deadline = min(
                        connections.cancel_scope.deadline, trio.current_time() + grace
                    )
                if connections.cancel_scope.cancelled_caught:
                    log.warning("drained: cancelled the connections still busy after the grace")
                else:
                    log.info("drained: every connection finished")
                services.cancel_scope.cancel()
        finally:
            for listener in listeners:  # those whose accept loop never started
                _close_listener(listener)
            self._accepting = self._connections = None
            if self._relay is not None:
                await _close_pool(self._relay.pool)

    def now(self) -> datetime:
        """The policy's clock: the wall clock, or the one a test or the dev bench gave."""
        return self._clock()

    @property
    def active_connections(self) -> int:
        """Connections open now (each holds a connection slot)."""
        return self._slots.borrowed_tokens

    def drain(self) -> None:
        """Shut down gracefully, as SIGTERM does: stop accepting (the listeners close, so new
        clients are refused or go to another process on the port), close idle keep-alive
        connections at once, give requests in flight limits.shutdown_grace to finish, their
        responses saying `Connection: close`, then cancel whatever is left; run() returns.
        """
        if self._drain.draining:
            return
        idle = self._drain.idle_connections
        log.info(
            "draining: stopped accepting; closing %d idle connection(s), %d other(s) get"
            " up to %g s to finish",
            idle,
            max(0, self._slots.borrowed_tokens - idle),
            self.config.limits.shutdown_grace,
        )
        self._drain.start()
        if self._accepting is not None:
            self._accepting.cancel()

    def stop_now(self) -> None:
        """Cancel every connection at once (a second SIGTERM during the drain)."""
        self.drain()
        if self._connections is not None:
            self._connections.cancel()

    async def _accept_loop(self, listener: socket.socket, nursery: trio.Nursery) -> None:
        """Accept into `nursery` until cancelled; the listener is closed on the way out.

        Clients already waiting in the backlog are accepted one after the other, up to
        ACCEPT_BATCH, before yielding: a wait (an epoll round trip) per client would cost more
        than the accept itself when connections arrive faster than we take them.
        """
        try:
            while True:
                # Wait for a client before taking a slot: a loop holding a slot while its own
                # listener stays quiet would keep it from the other listeners' clients (with
                # one slot left, forever).
                await trio.lowlevel.wait_readable(listener)
                for _ in range(ACCEPT_BATCH):
                    # A slot is taken before accepting: at max_connections we stop accepting
                    # and new clients wait in the kernel's backlog instead of being cut off.
                    token = object()
                    try:
                        self._slots.acquire_on_behalf_of_nowait(token)
                    except trio.WouldBlock:
                        await self._slots.acquire_on_behalf_of(token)
                    try:
                        sock, address = listener.accept()
                    except BlockingIOError:  # the backlog is empty (or the client gave up)
                        self._slots.release_on_behalf_of(token)
                        break
                    except OSError as exc:
                        self._slots.release_on_behalf_of(token)
                        if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                            raise
                        log.error("accept failed (%s); retrying: raise the open-file limit", exc)
                        await trio.sleep(ACCEPT_BACKOFF_SECONDS)
                        break
                    except BaseException:
                        self._slots.release_on_behalf_of(token)
                        raise
                    # A name given: trio would otherwise format one for every task.
                    nursery.start_soon(
                        self._connection_task, sock, address, token, name=_CONNECTION_TASK_NAME
                    )
                else:  # a full batch: let the connections just accepted run first
                    await trio.lowlevel.checkpoint()
        finally:
            _close_listener(listener)

    async def _connection_task(self, sock: socket.socket, address: object, token: object) -> None:
        record = ConnectionRecord(peer="-", counters=self._unkeyed_counters)
        record.peer, record.peer_ip = _peer_address(address)
        try:
            stream = TcpStream(sock, options_set=_ACCEPTED_SOCKETS_INHERIT_OPTIONS)
        except OSError:  # reset before we could set it up
            sock.close()
            self._slots.release_on_behalf_of(token)
            return
        try:
            await self.handle_connection(stream, record)
        except trio.Cancelled:
            record.outcome = Outcome.SHUTDOWN
            raise
        except Exception:
            # A bug must cost one connection, not the server and every other client with it.
            record.outcome = Outcome.INTERNAL_ERROR
            log.exception("internal error on the connection from %s", record.peer)
        finally:
            # Closed synchronously, without the scheduler round trip of an aclose: usually
            # the TLS stream's aclose closed it already, and closing again is a no-op.
            stream.close()
            self._slots.release_on_behalf_of(token)
            self.evidence.connection_ended(record, self.config.rotation)
            # The line as the message, without arguments: nothing to %-format or inspect.
            log.info(record.log_line())

    # --- one connection ------------------------------------------------------------------

    async def handle_connection(self, stream: TcpStream, record: ConnectionRecord) -> None:
        """Peek, choose, handshake, serve. Fills `record` (its peer already set); the caller
        closes the socket."""
        peer_ip = record.peer_ip
        # One config and its snapshot for the whole handshake, whatever reloads do meanwhile:
        # a reload swaps both at once, and the plan must name identities this snapshot has.
        config, snapshot = self.config, self.snapshot
        with trio.move_on_after(config.limits.handshake_timeout) as handshake_scope:
            peeked = await self._peek(stream, record)
            if peeked is None:
                return
            # An ACME CA validating tls-alpn-01; checked without a wait for everyone else.
            if (
                self.acme_board is not None
                and challenges.wants_challenge(record.hello)
                and await self._answer_acme(stream, peeked, record)
            ):
                return
            record.choice = policy.choose(
                config.rotation,
                record.hello,
                peer_ip,
                self._clock(),
                canary_halted=self.evidence.canary.halted,
            )
            identity = snapshot.identities[record.choice.identity]
            record.key = identity.presented_key(record.hello).name
            record.counters = self.evidence.counters_for(record.key, record.choice.reason.value)
            # https_compatible=False: aclose sends close_notify (RFC 8446 6.1), so a client
            # can tell our end of a response from a truncation. A client that closes without
            # one makes receive_some raise BrokenResourceError, which ends the connection just
            # as a clean close would.
            tls = TlsStream(stream, identity.context, server_side=True, prefix=peeked)
            try:
                await tls.do_handshake()
            except trio.BrokenResourceError as exc:
                record.outcome, record.detail = classify_handshake_failure(exc)
                return
            record.tls_version = tls.version()
        if handshake_scope.cancelled_caught:
            record.outcome = Outcome.TIMEOUT
            record.detail = "handshake" if record.choice else "hello"
            return
        record.outcome = Outcome.NO_REQUEST
        linger = False
        try:
            linger = await self.respond(tls, record)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away; the record already says how far it got
        finally:
            if linger:
                await lingering_close(tls, stream)
            elif tls.close_notify_sent:  # with the last response: nothing left to send
                tls.close()
            else:
                with trio.move_on_after(CLOSE_NOTIFY_TIMEOUT):
                    await tls.aclose()

    async def _peek(self, stream: TcpStream, record: ConnectionRecord) -> bytes | None:
        """Read until the ClientHello is complete or unparseable; the bytes read, or None when
        the connection is already finished (closed, plain HTTP)."""
        buffer = bytearray()
        while True:
            try:
                chunk = await stream.receive_some(max(1, MAX_CLIENT_HELLO_BYTES - len(buffer)))
            except trio.BrokenResourceError:
                chunk = b""
            if not chunk:
                record.outcome = Outcome.NO_HELLO
                record.detail = f"closed after {len(buffer)} bytes"
                return None
            buffer += chunk
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

    async def _answer_acme(
        self, stream: TcpStream, peeked: bytes, record: ConnectionRecord
    ) -> bool:
        """A CA validating a pending tls-alpn-01 challenge gets the challenge certificate
        instead of ours (RFC 8737); True when that is what this connection was."""
        hello, board = record.hello, self.acme_board
        if hello is None or board is None:
            return False
        context = board.tls_alpn_context(hello.sni)
        if context is None:
            return False
        record.outcome = Outcome.ACME_CHALLENGE
        record.detail = await challenges.answer_tls_alpn(stream, peeked, context)
        return True

    async def respond(self, tls: TlsStream, record: ConnectionRecord) -> bool:
        """Serve HTTP/1.1 on the established TLS stream: relay to the upstream when the config
        has one (see relay.py), otherwise answer every request ourselves. True when the
        connection should end with a lingering close (the client may still be sending)."""
        if self._relay is None:
            return await self._respond_placeholder(tls, record)
        relay = ClientConnection(
            tls,
            peer=record.peer_ip,
            settings=self._relay_settings,
            drain=self._drain,
            departures=self._departures,
            client_fd=tls.transport_stream.socket.fileno(),
            tally=record,
            response_headers=self._dev_response_headers(record),
        )
        await relay.serve()
        return relay.client_may_be_sending

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

    async def _respond_placeholder(self, tls: TlsStream, record: ConnectionRecord) -> bool:
        """Without [upstream], dualproxy answers every request itself with a short fixed
        response (the dev bench, TLS and pin testing), honouring keep-alive so that clients
        behave as they will in front of a real upstream, and the drain: an idle connection
        closes, a response says `Connection: close`. True after a 400, which the client may
        still be sending to (see `respond`)."""
        limits = self.config.limits
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES)
        while True:
            # The first request may take the header timeout; later ones may idle for the
            # keep-alive timeout first. The drain ends the wait (the whole request is small).
            wait = limits.keepalive_timeout if record.requests else limits.request_header_timeout
            request: h11.Request | None = None  # stays None when the wait times out
            body = bytearray()
            local = self._local
            with self._drain.idle(wait):
                request = await _receive_request(
                    tls, conn, body, local.max_body_bytes if local is not None else 0
                )
            if request is None or conn.their_state is h11.ERROR:
                # A bad head leaves our side IDLE, a bad body after a good head in
                # SEND_RESPONSE; h11 lets a server answer 400 from either.
                answerable = conn.our_state is h11.IDLE or conn.our_state is h11.SEND_RESPONSE
                if conn.their_state is h11.ERROR and answerable:
                    record.response_generated(400)
                    await _send_simple(tls, conn, 400, b"bad request\n", keep_alive=False)
                    return True
                return False
            record.request_received()
            head_only = request.method == b"HEAD"
            endpoint = local.find(request.target) if local is not None else None
            if endpoint is not None and len(body) > endpoint.max_body_bytes:
                status, reply = 413, b"request body too large\n"
                headers = [(b"content-type", b"text/plain; charset=utf-8")]
            elif endpoint is not None:  # the pin manifest, a pin-failure report
                answer = await endpoint.answer(
                    endpoints.LocalRequest(
                        request.method,
                        request.target,
                        list(request.headers),
                        record.peer_ip,
                        bytes(body),
                    )
                )
                status, reply, headers = answer.status, answer.body, [*answer.headers]
            else:
                status, reply = 200, b"dualproxy: TLS terminated; no upstream is configured yet.\n"
                headers = [(b"content-type", b"text/plain; charset=utf-8")]
            record.response_generated(status)
            headers += self._dev_response_headers(record)
            await _send_simple(
                tls,
                conn,
                status,
                reply,
                extra_headers=headers,
                head_only=head_only,
                keep_alive=not self._drain.draining,
            )
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return False
            conn.start_next_cycle()

    # --- reloads ---------------------------------------------------------------------

    async def reload(self, why: str) -> bool:
        """Re-read the config and key files; swap in new material only if all of it is good.

        Reloads run one at a time (the file poller and SIGHUP may ask together): two loads in
        flight could finish out of order and leave the older files' material in place.
        """
        async with self._reload_lock:
            return await self._reload_now(why)

    async def apply(self, config: Config, why: str) -> bool:
        """Serve `config` from now on, exactly as a reload would serve a changed config file:
        its keys are loaded first, all or nothing, and swapped in together with it; connections
        already open keep their material. How the dev bench switches scenarios live. True when
        it took effect; on failure the previous config and keys keep serving, and the log says
        why. The listen addresses cannot change this way (a reload keeps them too)."""
        async with self._reload_lock:
            # The files the new config names, as they are before its keys are read (as at
            # start): the file poller compares against these, so a switch is not a "change".
            seen = await trio.to_thread.run_sync(self._files_signature, config)
            applied = await self._reload_now(why, config)
            if applied:
                self._files_seen = seen
            return applied

    async def _reload_now(self, why: str, given: Config | None = None) -> bool:
        try:
            if given is None:
                config, snapshot = await trio.to_thread.run_sync(self._load_fresh)
            else:
                config = given
                snapshot = await trio.to_thread.run_sync(keystore.load_snapshot, given)
            relay = await trio.to_thread.run_sync(self._relay_for, config)
            local = await trio.to_thread.run_sync(endpoints.build, config, self._local, self._clock)
        except (ConfigError, KeyStoreError) as exc:
            self.reloads_failed += 1
            log.error("reload (%s) failed, still serving the previous keys: %s", why, exc)
            return False
        except Exception:
            # Our bug, not the operator's. It must not take down a server that is serving
            # good material: the file poller and the signal watcher run in its nursery.
            self.reloads_failed += 1
            log.exception("reload (%s) failed unexpectedly, still serving the previous keys", why)
            return False
        if config.listen != self.config.listen:
            log.warning("listen addresses changed: restart dualproxy to apply (kept the old ones)")
            config = _replace_listen(config, self.config.listen)
        if config.limits.max_connections != self.config.limits.max_connections:
            self._slots.total_tokens = config.limits.max_connections
        if relay is not None and relay.local is not local:
            relay = replace(relay, local=local)
        old_pool = self._relay.pool if self._relay is not None else None
        self.config, self.snapshot, self._relay, self._local = config, snapshot, relay, local
        self.reloads_ok += 1
        for warning in snapshot.warnings:
            log.warning("%s", warning)
        keys = ", ".join(f"{k.name} ({k.pin})" for k in snapshot.keys.values())
        log.info("reloaded (%s): serving %s", why, keys)
        self._log_manifest_problem()
        self._check_manifest_expiry()
        if old_pool is not None and (relay is None or relay.pool is not old_pool):
            # Its idle connections close now; those in use finish their exchange first.
            await _close_pool(old_pool)
            if relay is not None:
                log.info("upstream: now %s", relay.rules.upstream_authority.decode())
        return True

    def _relay_for(self, config: Config) -> RelaySettings | None:
        """Relay settings for a reloaded config: the current pool is kept unless the upstream
        or the pool's own limits changed. Runs in a worker thread (a new pool reads CA files).
        """
        current = self._relay
        if config.upstream is None:
            return None
        old, new = self.config, config
        same_pool = (
            current is not None
            and new.upstream == old.upstream
            and new.limits.upstream_connect_timeout == old.limits.upstream_connect_timeout
            and new.limits.upstream_timeout == old.limits.upstream_timeout
        )
        if same_pool and current is not None and new.limits == old.limits:
            return current
        return RelaySettings.build(config, current.pool if same_pool and current else None)

    def _load_fresh(self) -> tuple[Config, KeySnapshot]:
        config = config_mod.load(self.config.path) if self.config.path is not None else self.config
        return config, keystore.load_snapshot(config)

    def _files_signature(
        self, config: Config | None = None
    ) -> tuple[tuple[str, int, int, int, int], ...]:
        signature = []
        for path in (config or self.config).watched_files():
            try:
                st = path.stat()
                signature.append((str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode))
            except OSError:
                signature.append((str(path), -1, -1, -1, -1))
        return tuple(signature)

    async def _watch_files(self) -> None:
        """Reload when a watched file changes (renewal tools, Kubernetes Secret updates).

        A change that fails to load (a torn write: new chain, old key) is retried when the
        files change again, which is when the writer finishes.

        The signature a reload is compared against is always one taken *before* that reload
        read the files, so a file that changes while we load (the key landing just after its
        chain) is seen as a change at the next poll; the price is at most one reload of files
        already loaded. The first signature was taken before the starting keys were read.
        """
        while True:
            await trio.sleep(self.config.keystore.reload_poll_interval)
            current = await trio.to_thread.run_sync(self._files_signature)
            if current != self._files_seen:
                await self.reload("files changed")
                self._files_seen = current

    def report_summary(self) -> reports.ReportSummary | None:
        """The pin-failure report counts (reports.summary's shape), each known pin named by its
        key and role now, for /status.json and the status page; None without [reports]."""
        local = self._local
        if local is None:
            return None
        keys = self.snapshot.keys.values()
        return local.report_summary(endpoints.pin_labels(keys, self.config.rotation, self._clock()))

    def _log_manifest_problem(self) -> None:
        """At start and after each reload: a manifest that is missing or no manifest."""
        local = self._local
        if local is not None and local.manifest_problem is not None:
            log.warning("manifest: %s", local.manifest_problem)

    def _check_manifest_expiry(self) -> None:
        """Log once per state (per manifest) that the served manifest expires soon, or has:
        apps then refuse it and fall back to the pins they ship with."""
        local, settings = self._local, self.config.manifest
        if local is None or settings is None or local.manifest_expires is None:
            return
        expires = local.manifest_expires
        status = manifest.expiry_status(
            expires, self._clock(), timedelta(days=settings.warn_before_days)
        )
        if self._manifest_status == (expires, status):
            return
        self._manifest_status = (expires, status)
        when = f"{expires:%Y-%m-%d %H:%M} UTC"
        if status == "expired":
            log.error(
                "manifest: %s expired at %s; apps refuse it: run `dualproxy manifest sign`",
                settings.file,
                when,
            )
        elif status == "soon":
            log.warning(
                "manifest: %s expires at %s; sign a new one (`dualproxy manifest sign`)",
                settings.file,
                when,
            )

    async def _watch_manifest_expiry(self) -> None:
        while True:  # run() checked once before it started accepting
            await trio.sleep(MANIFEST_EXPIRY_CHECK_INTERVAL)
            self._check_manifest_expiry()

    async def _prune_idle_upstream(self) -> None:
        """Close pooled upstream connections once they have idled pool_idle_timeout, also when
        no request comes along to notice (the pool prunes itself only when used): a quiet
        server must not sit on sockets the upstream is about to drop."""
        while True:
            upstream = self.config.upstream
            await trio.sleep(
                upstream.pool_idle_timeout / 2 if upstream else IDLE_PRUNE_WITHOUT_UPSTREAM
            )
            if self._relay is not None:
                self._relay.pool.prune()

    async def _watch_departures(self) -> None:
        """End the exchanges of clients that left while the upstream worked (Departures)."""
        while True:
            await trio.sleep(DEPARTURE_CHECK_SECONDS)
            self._departures.check()

    async def _watch_signals(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """SIGHUP reloads, SIGTERM drains (a second one stops at once). Started with
        nursery.start, it reports readiness once the handlers are installed: a SIGHUP before
        that would kill the process."""
        with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGHUP:
                    await self.reload("SIGHUP")
                elif not self._drain.draining:
                    log.info("SIGTERM: stopping, after the requests in flight")
                    self.drain()
                else:
                    log.warning("SIGTERM again: stopping now")
                    self.stop_now()


async def _close_pool(pool: UpstreamPool) -> None:
    """Close a pool's idle connections, also when the server is being cancelled."""
    with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_NOTIFY_TIMEOUT):
        await pool.aclose()


async def lingering_close(tls: TlsStream, stream: TcpStream) -> None:
    """End a connection whose client may still be sending, without losing what we sent.

    Closing a socket with unread bytes makes the kernel send a TCP reset instead of a FIN, and
    the reset can destroy the client's copy of our last response before it reads it (a client
    that sends its whole request before reading sees "connection reset", not our 413). So, as
    nginx's lingering close does: close_notify, then our FIN (the client's reads end after the
    response), then read and discard raw bytes until the client closes, LINGER_TIMEOUT passes
    without any, or LINGER_TIME or LINGER_MAX_BYTES is reached. The caller closes the socket.

    The close_notify (`send_close_notify`, which does not wait for the client's) leaves the
    socket open for the rest. It is not needed for the response
    (Content-Length and `Connection: close` frame it), but without it a client that reads on
    until the end sees a truncation error where a clean close was due.
    """
    with trio.move_on_after(CLOSE_NOTIFY_TIMEOUT), contextlib.suppress(trio.BrokenResourceError):
        await tls.send_close_notify()
    await _linger(stream)


async def _linger(stream: TcpStream) -> None:
    """Our FIN, then what the client still sends read and discarded, within the LINGER_*
    bounds (see lingering_close)."""
    await discard_until_closed(
        stream,
        total=LINGER_TIME,
        idle=LINGER_TIMEOUT,
        max_bytes=LINGER_MAX_BYTES,
        receive_size=LINGER_RECEIVE_SIZE,
    )


def _replace_listen(config: Config, listen: config_mod.ListenConfig) -> Config:
    # replace(), not Config(...): a field added to Config later must not be dropped here.
    return replace(config, listen=listen)


async def _receive_request(
    tls: TlsStream, conn: h11.Connection, kept: bytearray, keep: int
) -> h11.Request | None:
    """The next request, its body read (bounded) and, when `keep` (a local endpoint's cap) is
    not 0, kept in `kept`, otherwise discarded; None when the client closed, sent too large a
    body or something h11 rejects (their_state is then ERROR)."""
    cap = max(PLACEHOLDER_MAX_BODY, keep)
    received = 0

    def take(data: bytes) -> None:
        nonlocal received
        received += len(data)
        if received > cap:
            raise _BodyTooLarge
        if keep:
            kept.extend(data)

    try:
        return await receive_h11_request(tls, conn, receive_size=RECEIVE_SIZE, on_body=take)
    except (h11.RemoteProtocolError, _BodyTooLarge):
        return None


class _BodyTooLarge(Exception):
    """A request body past what the placeholder reads."""


async def _send_simple(
    tls: TlsStream,
    conn: h11.Connection,
    status: int,
    body: bytes,
    *,
    extra_headers: Sequence[tuple[bytes, bytes]] = (),
    keep_alive: bool = True,
    head_only: bool = False,
) -> None:
    """One whole response; `head_only` (for HEAD) sends the GET headers without the body,
    which h11 would refuse to send as too much data for a response to HEAD.

    Sent with one send_all: one TLS record and one send(2) instead of one per h11 event;
    on a connection that carries one request, each send is a sizeable part of its cost."""
    # A 204 or 304 carries no Content-Length (RFC 9110 §8.6, §15.4.5).
    headers = [] if status in (204, 304) else [(b"content-length", str(len(body)).encode())]
    headers += extra_headers
    if not keep_alive:
        headers.append((b"connection", b"close"))
    reason = HTTPStatus(status).phrase.encode()
    events: list[h11.Response | h11.Data | h11.EndOfMessage] = [
        h11.Response(status_code=status, headers=headers, reason=reason)
    ]
    if not head_only:
        events.append(h11.Data(data=body))
    events.append(h11.EndOfMessage())
    chunks = []
    for event in events:
        data = conn.send(event)
        assert data is not None
        chunks.append(data)
    await tls.send_all(b"".join(chunks))


_PLAIN_HTTP_REFUSAL: Final = (
    b"HTTP/1.1 400 Bad Request\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Connection: close\r\n"
    b"Content-Length: 40\r\n"
    b"\r\n"
    b"This port speaks HTTPS; use https:// .\r\n"
)


async def _send_plain_http_refusal(stream: TcpStream) -> None:
    """Answer plain HTTP on the TLS port with 400, then linger: the client is likely to have
    sent more of its request than we read, and closing on it would reset the answer away."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        with trio.move_on_after(CLOSE_NOTIFY_TIMEOUT) as sending:
            await stream.send_all(_PLAIN_HTTP_REFUSAL)
        if not sending.cancelled_caught:  # else it does not read: nothing to linger for
            await _linger(stream)


def _sockname(listener: socket.socket) -> tuple[str, int]:
    name = listener.getsockname()
    return str(name[0]), int(name[1])


def _close_listener(listener: socket.socket) -> None:
    if listener.fileno() >= 0:
        trio.lowlevel.notify_closing(listener)
    listener.close()


async def open_listeners(
    addresses: Sequence[ListenAddress], reuse_port: bool
) -> list[socket.socket]:
    """Bind every configured address (non-blocking listening sockets); with reuse_port,
    several processes may share them."""
    listeners: list[socket.socket] = []
    try:
        for address in addresses:
            infos = await trio.socket.getaddrinfo(
                address.host or None,
                address.port,
                type=socket.SOCK_STREAM,
                flags=socket.AI_PASSIVE,
            )
            for family, kind, proto, _, sockaddr in _unique(infos):
                sock = socket.socket(family, kind, proto)
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if reuse_port:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                    if _ACCEPTED_SOCKETS_INHERIT_OPTIONS:
                        set_tcp_options(sock)  # for the sockets accepted from it
                    if family == socket.AF_INET6:
                        # One socket per family, as trio.open_tcp_listeners does.
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    sock.bind(sockaddr)  # numeric: getaddrinfo resolved it
                    sock.listen(socket.SOMAXCONN)
                    sock.setblocking(False)
                except OSError as exc:
                    sock.close()
                    raise OSError(
                        exc.errno, f"cannot listen on {address} (listen.address): {exc.strerror}"
                    ) from exc
                listeners.append(sock)
    except BaseException:
        for listener in listeners:
            listener.close()
        raise
    return listeners


_AddrInfo = tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[object, ...]]


def _unique(infos: Sequence[_AddrInfo]) -> list[_AddrInfo]:
    """getaddrinfo lists an address once per protocol; bind each (family, address) once."""
    seen: set[tuple[object, ...]] = set()
    out: list[_AddrInfo] = []
    for info in infos:
        key = (info[0], info[4])
        if key not in seen:
            seen.add(key)
            out.append(info)
    return out


def raise_open_file_limit(max_connections: int) -> None:
    """Lift the soft RLIMIT_NOFILE to the hard limit, as Go and nginx do, and warn when even
    that cannot hold max_connections (each client may also need an upstream socket)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    needed = 2 * max_connections + 64
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning(
            "open-file limit %d is below the %d that limits.max_connections = %d may need;"
            " raise it (ulimit -n, LimitNOFILE=) or lower max_connections",
            soft,
            needed,
            max_connections,
        )


def describe_bound(bound: Sequence[tuple[str, int]]) -> str:
    return ", ".join(str(ListenAddress(host, port)) for host, port in bound)
