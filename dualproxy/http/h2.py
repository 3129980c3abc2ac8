"""One client connection over HTTP/2 (RFC 9113): the trio driver of the sans-IO exchange.

Theory of operation. python-hyper's h2 holds the connection's state (frames, HPACK, flow
control, stream states) and `Http2Connection` moves its bytes and drives, for each stream, the
same `exchange.Exchange` an HTTP/1.1 request drives (exchange.py's docstring, last section):
the stream's fields are checked by `h2fields.stream_request_head` (h2's own header validation
is off: a malformed request gets a 400 on its stream, not the whole connection torn down),
and the upstream side, its pool and the retry rule are HTTP/1.1's, unchanged.

Tasks, all in the connection's nursery:

- the **reader** (`serve` itself) reads the TLS stream, feeds h2, and handles its events:
  a new stream goes to a stream task (after every event of the same read is handled, so a
  request that came whole starts with its whole body known); DATA go to their stream's
  buffer; a reset cancels the stream's scope; every frame that costs us work for nothing is
  charged to the `h2limits.FloodGuard`, whose verdict ends the connection with GOAWAY
  ENHANCE_YOUR_CALM. It never waits on a send: what h2 queued is handed to the writer.
- the **writer** sends what h2 queued, in order, each send within send_timeout (a client
  that does not read at all for that long loses the connection: its streams could not go
  on anyway). Only the writer sends, so a stream's cancellation never cuts a TLS record.
- a **stream task** per stream in flight, the exchange's driver: route, relay (request body
  from the stream's buffer, response body into DATA frames as flow control allows) or
  answer locally, or refuse. It waits for the writer to drain what it queued before queuing
  more; once its whole response is queued the stream ends at once, unless our output is
  backed up (the writer is in a send it had to wait for) or the connection is ending
  (`_hand_over`). The task then waits for the connection's next stream, in the same cancel
  scope (a task started and a scope entered per stream cost more than the stream's waits);
  a stream whose scope is cancelled (its reset, an expired wait) ends its task with it, and
  at most IDLE_STREAM_TASKS tasks wait (`_stream_task`).

Bounded buffers. A request body is taken from the client no faster than the stream task
hands it to the upstream: we acknowledge DATA (WINDOW_UPDATE) only once forwarded, so a
stream buffers at most STREAM_WINDOW bytes and the connection CONNECTION_WINDOW. A response
body goes out no faster than the client's windows open and the writer drains: a client that
stops reading one stream stalls that stream (its task waits for a window, then is cut with
RST_STREAM after send_timeout), not the connection, and the upstream connection is not read
further than one receive ahead.

Waits, as `exchange.Wait` says: each wait of a stream is bounded by its setting and an
expiry means what `exchange.expired` says (408, 504, a cut: RST_STREAM). A stream is served
in one cancel scope (its task's), which the client's reset cancels and whose deadline each
wait moves to its own bound (`_bound`, lazily, as relay.py does per connection: a scope per
wait costs more than the rest of the wait). The connection waits for its first stream for
request_header_timeout, between streams for keepalive_timeout, then says GOAWAY and closes.

Ending. GOAWAY (NO_ERROR, the last stream we took) on the drain, after
limits.keepalive_requests streams and when idle: streams in flight finish, new ones are
refused (REFUSED_STREAM: the client may retry them elsewhere), the connection closes when the
last one ends. A protocol error found by h2 (content-length against DATA, a CONTINUATION
flood, an oversized header list) ends it with the GOAWAY h2 wrote. Nothing here logs: the
record (`Tally`) counts requests and responses and keeps the reason the connection ended.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final, Protocol

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio
from hyperframe.frame import GoAwayFrame

from dualproxy.config.names import IPAddress
from dualproxy.http.body import END
from dualproxy.http.errors import HttpRefusal
from dualproxy.http.exchange import (
    DEADLINE_SLACK,
    EARLY_ANSWER,
    ClientSide,
    Cut,
    Exchange,
    Framing,
    ResponseStart,
    Wait,
    expired,
    refusal_response,
    wait_bounds,
)
from dualproxy.http.h2fields import stream_request_head
from dualproxy.http.h2limits import FloodGuard
from dualproxy.http.heads import HeadLimits, ResponseHead
from dualproxy.http.lifecycle import Drain
from dualproxy.http.local import Endpoint, LocalRequest, LocalRoutes
from dualproxy.http.rewrite import ClientPeer, ForwardingRules, client_response_headers
from dualproxy.http.upstream import UpstreamConnection, UpstreamPool
from dualproxy.tls.streams import RECEIVE_SIZE

if TYPE_CHECKING:
    from dualproxy.config.schema import Limits
    from dualproxy.http.settings import Tally

__all__ = [
    "ALPN_H2",
    "CONNECTION_WINDOW",
    "GOAWAY_SEND_TIMEOUT",
    "IDLE_STREAM_TASKS",
    "STREAM_WINDOW",
    "Http2Connection",
    "LocalOnly",
]

# The ALPN protocol ID of HTTP/2 over TLS (RFC 9113 §3.2).
ALPN_H2: Final = "h2"
# Request body bytes a stream may have sent and we not yet forwarded (SETTINGS_INITIAL_
# WINDOW_SIZE): 64 KiB, nginx's http2_body_preread_size and the protocol's own default order
# of size (65535); an upload goes as fast as the upstream takes it, a window at a time.
STREAM_WINDOW: Final = 64 * 1024
# The same for the whole connection: 1 MiB, Envoy's initial_connection_window_size, so that
# sixteen streams can upload at full window at once and a client buffers at most this with us.
CONNECTION_WINDOW: Final = 1024 * 1024
# The window the protocol starts a connection with, before our WINDOW_UPDATE (RFC 9113 §6.9.2).
_PROTOCOL_WINDOW: Final = 65535
# Stream tasks that wait for the connection's next stream once theirs ended, rather than end:
# handing a stream to a waiting task costs about half of starting one (docs/performance.md).
# A waiting task holds a few KiB; 16 cover the streams an app or a browser has in flight at
# once on a connection (and h2load's -m10), and bound what an idle connection keeps.
IDLE_STREAM_TASKS: Final = 16
# How long we try to get a GOAWAY out before closing a connection we end (a client that does
# not read may not hold the close up): the server's close_notify wait, as closing.py's.
GOAWAY_SEND_TIMEOUT: Final = 1.0

_NO_ERROR: Final = h2.errors.ErrorCodes.NO_ERROR
_CANCEL: Final = h2.errors.ErrorCodes.CANCEL
_INTERNAL_ERROR: Final = h2.errors.ErrorCodes.INTERNAL_ERROR
_REFUSED_STREAM: Final = h2.errors.ErrorCodes.REFUSED_STREAM
_ENHANCE_YOUR_CALM: Final = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
# Fields HTTP/2 does not carry (RFC 9113 §8.2.2) among those the exchange adds to a response.
_NOT_IN_H2: Final = frozenset({b"connection", b"transfer-encoding"})
_CONTINUE_HEADERS: Final = ((b":status", b"100"),)
# Why a stream's exchange ended, for the access log, when the client reset it first.
_CLIENT_RESET: Final = "client reset the stream"


class LocalOnly:
    """Exchange settings that answer every request locally (`routes`): how a server without an
    upstream (the placeholder) serves HTTP/2 streams."""

    __slots__ = ("bounds", "head_limits", "limits", "local", "rules")

    def __init__(self, limits: Limits, routes: LocalRoutes) -> None:
        self.limits = limits
        self.bounds = wait_bounds(limits)
        self.head_limits = HeadLimits.from_limits(limits)
        self.local: LocalRoutes | None = routes
        self.rules = ForwardingRules(b"", "rewrite", (), ())


class StreamSettings(Protocol):
    """What a stream is served with: the relay's RelaySettings, or LocalOnly."""

    @property
    def limits(self) -> Limits: ...
    @property
    def bounds(self) -> tuple[float, ...]: ...
    @property
    def head_limits(self) -> HeadLimits: ...
    @property
    def rules(self) -> ForwardingRules: ...
    @property
    def local(self) -> LocalRoutes | None: ...


class _Stream:
    """One request stream as the connection sees it."""

    __slots__ = (
        "bounds",
        "bytes_out",
        "data",
        "deadline",
        "ended",
        "exchange",
        "fields",
        "id",
        "limits",
        "opened",
        "reset",
        "responded",
        "scope",
        "status",
        "unacked",
        "upstream_seconds",
        "wait",
        "wake",
        "window",
    )

    def __init__(
        self, stream_id: int, fields: Sequence[tuple[bytes, bytes]], ended: bool, opened: float
    ) -> None:
        self.id = stream_id
        self.opened = opened  # when its HEADERS arrived
        # For its access log line: the status and body bytes sent, the upstream's time.
        self.status = 0
        self.bytes_out = 0
        self.upstream_seconds: float | None = None
        self.fields = fields
        self.data = bytearray()  # request body received and not yet forwarded
        self.unacked = 0  # its flow-controlled length, to acknowledge once forwarded
        self.ended = ended  # END_STREAM received
        self.reset = False  # the client reset it
        self.responded = False  # our response ended (END_STREAM sent)
        self.exchange: Exchange | None = None
        # The cancel scope it is served in (its task's, once it has one): a reset cancels it,
        # and `_bound` moves its deadline to each wait's own and records which wait it is
        # (`wait`), so that an expiry is answered as that wait's (exchange.expired), as
        # relay.py does per connection.
        self.scope: trio.CancelScope | None = None
        self.deadline = math.inf  # the scope's, mirrored
        self.wait = Wait.UPSTREAM_SEND
        self.limits: Limits | None = None  # what the stream is served with, once it started
        self.bounds: tuple[float, ...] = ()  # their wait_bounds
        self.wake: trio.Event | None = None  # set when body bytes or the end arrive
        self.window: trio.Event | None = None  # set when its send window may have opened


class _IdleTask:
    """A stream task waiting for its next stream (Http2Connection._stream_task), in its
    cancel scope, which the stream it is given is served in (its deadline mirrored)."""

    __slots__ = ("_given", "_scope", "_stream")

    def __init__(self, scope: trio.CancelScope) -> None:
        self._scope = scope
        self._given = trio.Event()
        self._stream: _Stream | None = None

    @property
    def usable(self) -> bool:
        """False once its scope was cancelled: the task ends instead of taking a stream."""
        return not self._scope.cancel_called

    def give(self, stream: _Stream) -> None:
        stream.scope = self._scope
        stream.deadline = self._scope.deadline
        self._stream = stream
        self._given.set()

    async def wait_stream(self) -> _Stream:
        await self._given.wait()
        assert self._stream is not None
        return self._stream


class _StreamCut(Exception):
    """A stream ends with RST_STREAM (a `Cut`)."""

    def __init__(self, cut: Cut) -> None:
        super().__init__(cut.problem)
        self.cut = cut


class Http2Connection:
    """Serves one HTTP/2 client connection until it ends; see the module docstring."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        peer: IPAddress | None,
        settings: Callable[[], StreamSettings | None],
        limits: Limits,
        drain: Drain,
        tally: Tally,
        response_headers: Sequence[tuple[bytes, bytes]] = (),
        upstream_detail: bool = False,
    ) -> None:
        """`settings`: what each new stream is served with (the server's current relay
        settings); `limits`: the connection's own (windows, stream count, timeouts);
        `upstream_detail`: a 502/504 body says what failed (dev mode), else it is generic."""
        self._stream = stream
        self._settings = settings
        self._limits = limits
        self._bounds = wait_bounds(limits)  # for streams served without settings
        self._drain = drain
        self._tally = tally
        self._client = ClientSide(
            ClientPeer.of(peer) if peer is not None else None,
            tuple(response_headers),
            upstream_detail,
        )
        self._now = trio.lowlevel.current_clock().current_time
        self._guard = FloodGuard(self._now())
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_inbound_headers=False,  # h2fields checks, and answers on the stream
            normalize_inbound_headers=False,  # h2fields joins the cookies
            validate_outbound_headers=False,  # our fields passed the upstream head checks
            normalize_outbound_headers=False,
        )
        self._h2 = h2.connection.H2Connection(config=config)
        self._h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: limits.h2_max_concurrent_streams,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_bytes,
            },
        )
        # In force from the first HEADERS on, not only once the client acknowledged SETTINGS:
        # the HPACK bomb is bounded while decoding (h2 raises, GOAWAY ENHANCE_YOUR_CALM).
        self._h2.decoder.max_header_list_size = limits.max_header_bytes
        self._streams: dict[int, _Stream] = {}  # those with a task running
        self._idle_tasks: list[_IdleTask] = []  # stream tasks waiting for their next stream
        self._started = 0  # streams taken (their tasks started)
        self._last_taken = 0  # the highest stream ID taken
        self._goaway = False  # our graceful GOAWAY went (or is queued): no new streams
        self._closing: str | None = None  # why the connection ends now
        self._raw_out = bytearray()  # frames we wrote ourselves (the graceful GOAWAY)
        self._wake_writer = trio.Event()
        self._drained = trio.Event()
        self._writing = False  # the writer is in a send (our output is backed up)
        self._nursery: trio.Nursery | None = None
        self._read_scope = trio.CancelScope()  # the reader's current wait
        self._reading = False  # the reader waits in it (registered with the drain)
        # Set when the connection ended on an error of the client's while it may still be
        # sending: the caller then closes with a lingering close, so that our GOAWAY is not
        # lost to the reset that closing on unread bytes sends.
        self.client_may_be_sending = False

    # --- the connection ---------------------------------------------------------------

    async def serve(self) -> None:
        """Serve streams until the connection ends (see the module docstring). Raises
        trio.BrokenResourceError and trio.ClosedResourceError when the client disappears."""
        self._h2.initiate_connection()
        self._h2.increment_flow_control_window(CONNECTION_WINDOW - _PROTOCOL_WINDOW)
        self._wake_writer.set()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._write)
            try:
                await self._read()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client went: its streams are cancelled below
            finally:
                with trio.move_on_after(GOAWAY_SEND_TIMEOUT):  # a GOAWAY, if one is queued
                    await self._wait_drained()
                nursery.cancel_scope.cancel()
        if self._closing is not None:
            self._tally.note(self._closing)

    async def _read(self) -> None:
        """Read and handle frames until the connection ends."""
        h2conn = self._h2
        stream = self._stream
        while self._closing is None:  # bounded: each round reads, or the connection ends
            if self._goaway and not self._streams:
                return
            idle = not self._streams
            scope = self._read_scope = trio.CancelScope(
                deadline=self._idle_deadline() if idle else math.inf
            )
            data = None
            with scope:
                if not self._goaway:
                    # Between streams, once one was served, it is an idle keep-alive
                    # connection: a reclaim at the connection limit may end it (GOAWAY).
                    self._drain.enter_idle(scope, reclaimable=idle and self._started > 0)
                self._reading = True
                try:
                    data = await stream.receive_some(RECEIVE_SIZE)
                finally:
                    self._reading = False
                    self._drain.leave_idle(scope)
            if data is None:  # the drain, a reclaim, or the idle wait ran out
                self._say_goaway()
                continue
            if not data:
                return  # the client closed
            try:
                events = h2conn.receive_data(data)
            except h2.exceptions.ProtocolError as exc:  # h2 queued its GOAWAY
                self._closing = f"HTTP/2 protocol error: {exc}"
                self.client_may_be_sending = True
                return
            new: list[_Stream] = []
            for event in events:
                problem = self._handle(event, new)
                if problem is not None:
                    self._end_connection(_ENHANCE_YOUR_CALM, problem)
                    return
            for taken in new:
                self._start_stream(taken)
            self._wake_writer.set()

    def _idle_deadline(self) -> float:
        limits = self._limits
        wait = limits.request_header_timeout if not self._started else limits.keepalive_timeout
        return self._now() + wait

    def _handle(self, event: h2.events.Event, new: list[_Stream]) -> str | None:
        """Handle one of h2's events; the problem that ends the connection, if one does."""
        guard = self._guard
        if isinstance(event, h2.events.DataReceived):
            return self._data_received(event)
        if isinstance(event, h2.events.RequestReceived):
            guard.useful_frame()
            stream_id = event.stream_id
            ended = event.stream_ended is not None
            if self._goaway or len(self._streams) >= self._limits.h2_max_concurrent_streams:
                self._reset(stream_id, _REFUSED_STREAM)
                return guard.charge_reset(self._now()) if not self._goaway else None
            guard.stream_opened()
            taken = _Stream(stream_id, event.headers, ended, self._now())
            self._streams[stream_id] = taken
            new.append(taken)
            return None
        if isinstance(event, h2.events.StreamEnded | h2.events.TrailersReceived):
            ended_stream = self._streams.get(event.stream_id)
            if ended_stream is not None:  # trailers are dropped, as over HTTP/1.1
                ended_stream.ended = True
                _set(ended_stream.wake)
            return None
        if isinstance(event, h2.events.WindowUpdated):
            if event.stream_id:
                window_stream = self._streams.get(event.stream_id)
                if window_stream is not None:
                    _set(window_stream.window)
            else:
                self._open_windows()
            return guard.charge_window_update()
        if isinstance(event, h2.events.StreamReset):
            reset = self._streams.get(event.stream_id)
            if reset is None or reset.responded:
                return None
            reset.reset = True
            if reset.scope is not None:  # else it has not started: it will not (_start_stream)
                reset.scope.cancel()
            return guard.charge_reset(self._now())
        if isinstance(event, h2.events.PingReceived):
            return guard.charge_owed()
        if isinstance(event, h2.events.RemoteSettingsChanged):
            self._open_windows()  # SETTINGS_INITIAL_WINDOW_SIZE may have grown
            return guard.charge_owed()
        if isinstance(event, h2.events.PriorityUpdated):
            return guard.charge_priority()
        if isinstance(event, h2.events.ConnectionTerminated):
            self._goaway = True  # the client's GOAWAY: finish what runs, take nothing new
        return None

    def _data_received(self, event: h2.events.DataReceived) -> str | None:
        data = event.data or b""
        length = event.flow_controlled_length or 0
        receiving = self._streams.get(event.stream_id or 0)
        if receiving is None or receiving.reset:
            # A stream we no longer read: its bytes still count against the connection window.
            if length:
                self._acknowledge(event.stream_id or 0, length)
        else:
            receiving.data += data
            receiving.unacked += length
            _set(receiving.wake)
        if data or event.stream_ended is not None:
            self._guard.useful_frame()
            return None
        return self._guard.charge_empty()

    def _open_windows(self) -> None:
        for stream in self._streams.values():
            _set(stream.window)

    def _start_stream(self, stream: _Stream) -> None:
        assert self._nursery is not None
        self._started += 1
        self._last_taken = stream.id
        if stream.reset:  # reset in the read that opened it: nothing to do, no task
            del self._streams[stream.id]
            self._stream_gone()
            self._log_stream(stream, _CLIENT_RESET)
        elif (idle := self._idle_task()) is not None:
            idle.give(stream)
            # The deadline its task's scope kept from the last stream's last wait (if still
            # near enough) bounds its first: the connection's settings until its own are read.
            stream.bounds = self._bounds
            self._bound(stream, Wait.UPSTREAM_SEND)
        else:
            stream.scope = trio.CancelScope()
            self._nursery.start_soon(self._stream_task, stream)
        if self._started >= self._limits.keepalive_requests:
            self._say_goaway()  # as an HTTP/1.1 connection's last request says close

    def _idle_task(self) -> _IdleTask | None:
        """A stream task waiting for a stream, if one is (not one whose scope was cancelled
        meanwhile, which ends: see _stream_task)."""
        while self._idle_tasks:  # bounded: IDLE_STREAM_TASKS
            idle = self._idle_tasks.pop()
            if idle.usable:
                return idle
        return None

    def _say_goaway(self) -> None:
        """Queue our graceful GOAWAY (once): streams up to the last one taken finish."""
        if self._goaway:
            return
        self._goaway = True
        frame = GoAwayFrame(0)
        frame.last_stream_id = self._last_taken
        frame.error_code = _NO_ERROR
        self._raw_out += frame.serialize()
        self._wake_writer.set()

    def _end_connection(self, code: h2.errors.ErrorCodes, problem: str) -> None:
        """End the connection now: GOAWAY with `code`, whatever is in flight."""
        self._closing = problem
        self.client_may_be_sending = True
        with contextlib.suppress(h2.exceptions.ProtocolError):  # h2 closed it already
            self._h2.close_connection(error_code=code, last_stream_id=self._last_taken)
        self._wake_writer.set()

    # --- the writer -------------------------------------------------------------------

    async def _write(self) -> None:
        """Send what h2 queued (and our own frames), in order; see the module docstring. A
        client that does not read for send_timeout, or is gone, ends the connection."""
        h2conn = self._h2
        stream = self._stream
        send_timeout = self._limits.send_timeout
        while True:  # bounded: ends with the connection's nursery
            await self._wake_writer.wait()
            self._wake_writer = trio.Event()
            while True:  # bounded: each round sends what was queued before it
                data = h2conn.data_to_send()
                if self._raw_out:
                    data += self._raw_out
                    self._raw_out.clear()
                if not data:
                    break
                with trio.move_on_after(send_timeout) as sending:
                    self._writing = True
                    try:
                        await stream.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        self._closing = self._closing or "client closed the connection"
                        sending.cancel()
                    finally:
                        self._writing = False
                if sending.cancelled_caught:
                    self._closing = self._closing or "client did not read for send_timeout"
                    assert self._nursery is not None
                    self._nursery.cancel_scope.cancel()
                    return
            self._guard.output_drained()
            drained, self._drained = self._drained, trio.Event()
            drained.set()

    async def _wait_drained(self) -> None:
        """Hand what is queued to the writer and wait until it went."""
        drained = self._drained
        self._wake_writer.set()
        await drained.wait()

    # --- one stream -------------------------------------------------------------------

    async def _stream_task(self, stream: _Stream) -> None:
        """Serve `stream`, then the streams the reader hands this task while it waits among
        the idle ones (at most IDLE_STREAM_TASKS wait; the others end), all in one cancel
        scope until it is cancelled for one of them (its reset, or the deadline of its wait),
        which ends the task once that stream is answered: starting a task and entering a scope
        per stream would cost more than the rest of its waits (docs/performance.md)."""
        current: _Stream | None = stream
        scope = stream.scope
        assert scope is not None  # given with it
        try:
            with scope:
                while current is not None:  # bounded: limits.keepalive_requests in all
                    await self._serve_stream(current)
                    current = None
                    if self._goaway or len(self._idle_tasks) >= IDLE_STREAM_TASKS:
                        return
                    # It waits with the deadline of the last stream's last wait (moving it
                    # would cost more than the wait): when that comes first, the task ends.
                    idle = _IdleTask(scope)
                    self._idle_tasks.append(idle)
                    current = await idle.wait_stream()
            # The scope was cancelled for `current` (its reset, or its wait's deadline); or,
            # with `current` None, by the deadline it kept while it waited for a stream: the
            # task ends (its _IdleTask is not usable).
            if current is not None:
                await self._serve_cancelled(current)
                current = None
        finally:
            if current is not None:  # the connection ends: its nursery was cancelled
                self._stream_over(
                    current, _CLIENT_RESET if current.reset else "the connection ended first"
                )

    async def _serve_stream(self, stream: _Stream) -> None:
        """Drive one stream's exchange in its task's cancel scope; a cancellation of the
        scope goes to the task (`_serve_cancelled`)."""
        ending = await self._exchange(stream)
        problem = None
        if ending is not None and not stream.reset:
            problem = await self._end_badly(stream, ending)
        self._stream_over(stream, problem)

    async def _serve_cancelled(self, stream: _Stream) -> None:
        """The stream's scope was cancelled: by its reset (nothing to answer), or by the
        deadline of the wait it was in (what that means, answered: `_expired`)."""
        problem = _CLIENT_RESET
        if not stream.reset:
            problem = await self._end_badly(stream, self._expired(stream))
        self._stream_over(stream, problem)

    def _stream_over(self, stream: _Stream, problem: str | None) -> None:
        """The stream's exchange is over (`problem`: why, when not well): it leaves, its
        unforwarded body frees the connection window, a stream we did not end is reset, and
        its line goes to the access log."""
        del self._streams[stream.id]
        self._stream_gone()
        if stream.unacked:  # what it sent and we did not forward frees the connection window
            self._acknowledge(stream.id, stream.unacked)
            stream.unacked = 0
        if not stream.responded and not stream.reset:
            self._reset(stream.id, _CANCEL)  # cancelled (the connection ends), or a bug
        self._wake_writer.set()
        self._log_stream(stream, problem)

    async def _end_badly(self, stream: _Stream, ending: HttpRefusal | Cut) -> str:
        """A refusal answered on the stream, or RST_STREAM for a cut; the problem, for the
        stream's log line."""
        if isinstance(ending, Cut):
            self._tally.note(ending.problem)
            self._reset(stream.id, _INTERNAL_ERROR if ending.fault == "upstream" else _CANCEL)
            return ending.problem
        # In a scope of its own (the exchange's may have expired), which a reset cancels too;
        # a client that does not take the answer within send_timeout gets RST_STREAM instead
        # (the stream task's end, since the answer did not end the stream).
        scope = stream.scope = trio.CancelScope()
        stream.deadline = math.inf
        with scope, contextlib.suppress(_StreamCut):  # the stream closed meanwhile
            await self._refuse(stream, ending)
        return f"{ending.status} {ending.problem}"

    def _expired(self, stream: _Stream) -> HttpRefusal | Cut:
        """What it means that the stream's scope ended on its deadline, by the wait it was in:
        exchange.expired's answer, a cut once the response started."""
        assert stream.limits is not None  # bounds are set once limits are
        ending = expired(stream.wait, stream.limits)
        assert ending is not None  # a stream's waits are never a connection's idle ones
        exchange = stream.exchange
        if isinstance(ending, HttpRefusal) and exchange is not None and exchange.response_started:
            return Cut(ending.problem, ending.fault)
        return ending

    def _bound(self, stream: _Stream, wait: Wait) -> float:
        """Bound `wait`, about to start, by its timeout from now, moving the stream scope's
        deadline (not pushed back by less than DEADLINE_SLACK: relay.py's `_bound`); the
        time it read."""
        stream.wait = wait
        now = self._now()
        deadline = now + stream.bounds[wait]
        current = stream.deadline
        if deadline < current or deadline - current > DEADLINE_SLACK:
            scope = stream.scope
            assert scope is not None  # a stream waits only once started
            scope.deadline = stream.deadline = deadline
        return now

    def _log_stream(self, stream: _Stream, ended: str | None) -> None:
        """The stream's exchange is over: its line for the access log (through the Tally)."""
        exchange = stream.exchange
        if exchange is not None:
            head = exchange.head
            method, target, received = head.method, head.target, exchange.received
        else:  # refused before its head was made (or reset first): what it said, if anything
            pseudo = dict(field for field in stream.fields if field[0][:1] == b":")
            method, target = pseudo.get(b":method", b"-"), pseudo.get(b":path", b"-")
            received = 0
        self._tally.exchange_ended(
            method,
            target,
            b"2",
            stream.status,
            received,
            stream.bytes_out,
            self._now() - stream.opened,
            stream.upstream_seconds,
            ended,
        )

    def _stream_gone(self) -> None:
        """A stream ended: when it was the last, the reader waits as an idle connection does
        (or, after our GOAWAY, stops)."""
        if not self._streams:
            if self._goaway:
                self._read_scope.cancel()
            else:
                scope = self._read_scope
                scope.deadline = self._idle_deadline()
                if self._reading:  # the reader waits: as an idle keep-alive connection now
                    self._drain.leave_idle(scope)
                    self._drain.enter_idle(scope, reclaimable=True)

    async def _exchange(self, stream: _Stream) -> HttpRefusal | Cut | None:
        """The stream's request and its response; how it ended, when not well (an expired
        wait ends it by cancelling its scope: `_expired`)."""
        exchange = None
        try:
            current = self._settings()
            if current is not None:
                limits, stream.bounds, head_limits = (
                    current.limits,
                    current.bounds,
                    current.head_limits,
                )
            else:
                limits, stream.bounds = self._limits, self._bounds
                head_limits = HeadLimits.from_limits(limits)
            stream.limits = limits
            head = stream_request_head(
                stream.fields, head_limits, body_length=len(stream.data) if stream.ended else None
            )
            self._tally.request_received()
            exchange = stream.exchange = Exchange(head, self._client, 1)
            endpoint = exchange.route(current)
            if endpoint is not None:
                await self._answer_locally(stream, exchange, endpoint)
                return None
            pool = getattr(current, "pool", None)
            assert current is not None  # route refused the request otherwise
            assert pool is not None  # LocalOnly answers every request locally
            return await self._relay(stream, exchange, pool)
        except HttpRefusal as refusal:
            if exchange is not None and exchange.response_started:
                return Cut(refusal.problem, refusal.fault)
            return refusal
        except _StreamCut as cut:
            return cut.cut

    # --- the request --------------------------------------------------------------------

    def _take(self, stream: _Stream) -> bytes:
        """The body bytes received and not yet taken (b"" for none), acknowledged: the client
        may send that much more."""
        if not stream.data:
            return b""
        piece = bytes(stream.data)
        stream.data.clear()
        self._acknowledge(stream.id, stream.unacked)
        stream.unacked = 0
        return piece

    async def _wait_body(self, stream: _Stream) -> None:
        """Until more of the body, or its end, arrived: 408 after body_timeout."""
        if stream.data or stream.ended:  # it came while we sent the previous piece upstream
            return
        stream.wake = wake = trio.Event()
        self._bound(stream, Wait.CLIENT_BODY)
        await wake.wait()

    async def _continue(self, stream: _Stream, exchange: Exchange) -> None:
        """100 Continue, when asked for, before the body is read (RFC 9110 §10.1.1)."""
        if exchange.continue_first and not stream.ended:
            self._send_headers(stream, _CONTINUE_HEADERS, end=False)
            await self._wait_sent(stream)

    async def _read_body(self, stream: _Stream, exchange: Exchange) -> bytes:
        await self._continue(stream, exchange)
        content = bytearray()
        while True:  # bounded: the exchange's cap, and body_timeout for each wait
            if piece := self._take(stream):
                content += exchange.request_data(piece)
            elif stream.ended:
                exchange.request_end()
                return bytes(content)
            else:
                await self._wait_body(stream)

    async def _relay(
        self, stream: _Stream, exchange: Exchange, pool: UpstreamPool
    ) -> HttpRefusal | Cut | None:
        """Relay one routed request and its response (relay.py's `_relay`, over a stream)."""
        request = exchange.upstream_request()
        method = exchange.head.method
        for attempt in range(2):  # the second only for the stale-connection retry
            check = attempt > 0 or not exchange.replayable
            now = self._bound(stream, Wait.UPSTREAM_SEND)
            try:
                upstream = await pool.acquire(now, check=check)
            except HttpRefusal as failure:
                return exchange.upstream_failed(failure)
            finished = False
            try:
                early = None
                if exchange.has_body:
                    early = await self._forward_body(stream, upstream, request, exchange)
                else:
                    await upstream.send_request(request, bounded=False)
                sent = self._bound(stream, Wait.UPSTREAM_HEAD)
                response = early or await upstream.receive_head(timeout=None, request_method=method)
                upstream_seconds = stream.upstream_seconds = self._now() - sent
                self._tally.response_relayed(response.status, upstream_seconds)
                ending = await self._respond(stream, upstream, response, exchange)
                finished = ending is None
                return ending
            except HttpRefusal as failure:
                if failure.fault != "upstream":
                    raise
                if not exchange.response_started and exchange.may_replay(
                    failure, reused=upstream.reused, attempt=attempt
                ):
                    continue
                return exchange.upstream_failed(failure)
            finally:
                if finished:
                    pool.release(upstream, self._now())
                else:
                    pool.discard(upstream)
        raise AssertionError("unreachable: the second attempt is never replayed")

    async def _forward_body(
        self, stream: _Stream, upstream: UpstreamConnection, request: bytes, exchange: Exchange
    ) -> ResponseHead | None:
        """Send the request head and stream the body after it; None once all of it went, or
        the upstream's early answer (relay.py's `_forward_body`)."""
        await self._continue(stream, exchange)
        out = [request]
        first = True
        try:
            while True:  # bounded: the exchange's cap, and body_timeout for each wait
                if piece := self._take(stream):
                    out.append(exchange.request_data(piece))
                    self._wake_writer.set()  # the WINDOW_UPDATE
                    continue
                if stream.ended:
                    if end := exchange.request_end():
                        out.append(end)
                    await self._send_upstream(stream, upstream, out, first)
                    return None
                if out:
                    await self._send_upstream(stream, upstream, out, first)
                    out, first = [], False
                await self._wait_body(stream)
        except HttpRefusal as failure:
            if failure.fault != "upstream":
                raise
            self._bound(stream, Wait.UPSTREAM_HEAD)
            try:
                response = await upstream.receive_head(
                    timeout=None, request_method=exchange.head.method
                )
            except HttpRefusal:
                raise failure from None
            self._tally.note(EARLY_ANSWER)
            return response

    async def _send_upstream(
        self, stream: _Stream, upstream: UpstreamConnection, out: list[bytes], first: bool
    ) -> None:
        self._bound(stream, Wait.UPSTREAM_SEND)
        data = b"".join(out) if len(out) > 1 else out[0]
        if first:
            await upstream.send_request(data, bounded=False)
        else:
            await upstream.send(data, bounded=False)

    # --- the response -------------------------------------------------------------------

    async def _respond(
        self,
        stream: _Stream,
        upstream: UpstreamConnection,
        response: ResponseHead,
        exchange: Exchange,
    ) -> Cut | None:
        """The upstream's response on the stream: HEADERS, then DATA as the windows allow."""
        status, _, _, fields, framing, _ = exchange.respond(response, draining=False)
        headers = [(b":status", b"%d" % status), *client_response_headers(response)]
        headers += [field for field in fields if field[0] not in _NOT_IN_H2]
        no_body = framing is Framing.NONE
        stream.status = status
        try:
            piece = upstream.buffered_body()
            if piece is END:  # no body, or an empty one: the HEADERS end the stream
                self._send_headers(stream, headers, end=True)
            else:
                self._send_headers(stream, headers, end=False)
                # The last piece read, held back so that the DATA frame that carries it ends
                # the stream too (one frame fewer than an empty DATA with END_STREAM).
                held: bytes | None = None
                while (
                    piece is not END
                ):  # bounded: the upstream's framing, upstream_timeout per read
                    if piece is None:
                        if held is not None:
                            await self._send_data(stream, held)
                            held = None
                        await self._wait_sent(stream)
                        self._bound(stream, Wait.UPSTREAM_BODY)
                        piece = await upstream.receive_body(timeout=None)
                        continue
                    assert isinstance(piece, bytes)
                    if piece and not no_body:
                        if held is not None:
                            await self._send_data(stream, held)
                        held = piece
                    piece = upstream.buffered_body()
                if held is not None:
                    await self._send_data(stream, held, end=True)
                else:
                    self._end_stream(stream)
            await self._hand_over(stream)
        except HttpRefusal as failure:
            ending = exchange.upstream_failed(failure)
            assert isinstance(ending, Cut)
            return ending
        return None

    async def _answer_locally(
        self, stream: _Stream, exchange: Exchange, endpoint: Endpoint
    ) -> None:
        content = b""
        if exchange.has_body:
            content = await self._read_body(stream, exchange)
        head = exchange.head
        peer = self._client.peer
        request = LocalRequest(
            head.method, head.target, head.headers, peer.address if peer else None, content
        )
        # Bounded like a send: the endpoint may write to disk in a worker thread.
        self._bound(stream, Wait.CLIENT_SEND)
        answer = await endpoint.answer(request)
        self._tally.response_generated(answer.status)
        start, body = exchange.answer_locally(answer, draining=False)
        await self._send_whole(stream, start, body)

    async def _refuse(self, stream: _Stream, refusal: HttpRefusal) -> None:
        """Answer `refusal` on the stream (its response had not started); a body the client
        may still be sending is then declined with RST_STREAM NO_ERROR (RFC 9113 §8.1)."""
        self._tally.note(f"{refusal.status} {refusal.problem}")
        self._tally.response_generated(refusal.status)
        exchange = stream.exchange
        head_only = exchange is not None and exchange.head.method == b"HEAD"
        start, body = refusal_response(
            refusal, head_only=head_only, upstream_detail=self._client.upstream_detail
        )
        await self._send_whole(stream, start, body)
        if not stream.ended:
            self._reset(stream.id, _NO_ERROR)

    async def _send_whole(self, stream: _Stream, start: ResponseStart, body: bytes) -> None:
        status, _, _, fields, _, _ = start
        stream.status = status
        headers = [(b":status", b"%d" % status)]
        headers += [field for field in fields if field[0] not in _NOT_IN_H2]
        self._send_headers(stream, headers, end=not body)
        if body:
            await self._send_data(stream, body, end=True)
        await self._hand_over(stream)

    # --- frames out -----------------------------------------------------------------------

    def _send_headers(
        self, stream: _Stream, headers: Sequence[tuple[bytes, bytes]], *, end: bool
    ) -> None:
        try:
            self._h2.send_headers(stream.id, headers, end_stream=end)
        except h2.exceptions.ProtocolError as exc:  # the stream or connection closed meanwhile
            raise _StreamCut(Cut(f"stream closed: {exc}", "client")) from None
        if end:
            stream.responded = True

    def _end_stream(self, stream: _Stream) -> None:
        try:
            self._h2.end_stream(stream.id)
        except h2.exceptions.ProtocolError as exc:
            raise _StreamCut(Cut(f"stream closed: {exc}", "client")) from None
        stream.responded = True

    async def _send_data(self, stream: _Stream, data: bytes, *, end: bool = False) -> None:
        """Queue `data` as DATA frames as the windows allow, waiting for the writer between
        frames; a window that stays shut for send_timeout cuts the stream. `end`: the last
        frame ends the stream."""
        h2conn = self._h2
        while data:  # bounded: each round sends at least a byte, or waits within a bound
            try:
                window = h2conn.local_flow_control_window(stream.id)
            except h2.exceptions.ProtocolError as exc:
                raise _StreamCut(Cut(f"stream closed: {exc}", "client")) from None
            if window <= 0:
                stream.window = opened = trio.Event()
                self._bound(stream, Wait.CLIENT_SEND)
                await opened.wait()
                continue
            size = min(window, h2conn.max_outbound_frame_size, len(data))
            last = end and size == len(data)
            try:
                h2conn.send_data(stream.id, data[:size], end_stream=last)
            except h2.exceptions.ProtocolError as exc:
                raise _StreamCut(Cut(f"stream closed: {exc}", "client")) from None
            self._guard.data_sent()
            stream.bytes_out += size
            stream.responded = last
            data = data[size:]
            if data:
                await self._wait_sent(stream)

    async def _wait_sent(self, stream: _Stream) -> None:
        """Hand what is queued to the writer and wait until it went (the writer's own
        send_timeout bounds it; the stream's deadline says so too)."""
        self._bound(stream, Wait.CLIENT_SEND)
        await self._wait_drained()

    async def _hand_over(self, stream: _Stream) -> None:
        """The stream's response is queued whole: the writer sends it. The stream waits for
        that only while our output is backed up (the writer is in a send it had to wait for:
        a client that does not read then holds every stream that ends, which keeps what is
        queued within a frame and a head per stream allowed at once) or the connection is
        ending (GOAWAY: its last responses get send_timeout, not GOAWAY_SEND_TIMEOUT)."""
        if self._writing or self._goaway:
            await self._wait_sent(stream)
        else:
            self._wake_writer.set()

    def _reset(self, stream_id: int, code: h2.errors.ErrorCodes) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):  # closed already: nothing to do
            self._h2.reset_stream(stream_id, error_code=code)
        self._wake_writer.set()

    def _acknowledge(self, stream_id: int, length: int) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):  # the connection is closing
            self._h2.acknowledge_received_data(length, stream_id)


def _set(event: trio.Event | None) -> None:
    if event is not None:
        event.set()
