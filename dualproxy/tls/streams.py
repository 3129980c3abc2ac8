"""The byte streams every connection runs on: TCP (`TcpStream`) and TLS over it (`TlsStream`).

Theory of operation. They implement trio's stream interfaces (`receive_some`, `send_all`,
`aclose`, trio's exceptions) on a non-blocking stdlib socket and trio's I/O waits, and they
exist for speed: on a kept-alive connection each request costs a few socket calls, and
`trio.SocketStream` and `trio.SSLStream`, built for generality (several tasks on one stream,
renegotiation, any transport), cost several times the system calls themselves in Python and
scheduler work. What these classes leave out, and why that is safe here:

- **One task at a time per direction.** Each connection is served by one task; a second
  concurrent receiver (or sender) is refused with `trio.BusyResourceError`, as trio does.
- **Schedule points.** A trio stream operation always yields to the scheduler, even when the
  socket had the bytes ready. Here an operation that had to wait has yielded anyway; one that
  did not checks for cancellation (so a cancelled caller still stops at once) and yields only
  after `YIELD_EVERY` such operations in a row on the stream. So a client and an upstream
  that never make us wait (a pipelining client, a fast body both ways) cannot keep the other
  connections from running for more than a few operations, and a kept-alive request, which
  waits for the client and for the upstream anyway, does not pay for two extra passes through
  the scheduler.
- **A receive right after a send waits first.** trio's streams try the socket first and wait
  when it has nothing; in a request-response protocol the answer to what we just sent is never
  there yet, so that try is a system call and an exception per exchange on each side. Here the
  first receive after a send waits for readability before reading; the rare peer whose bytes
  were already there (pipelining) costs a pass through the scheduler instead.
- **TLS through memory BIOs.** OpenSSL reads and writes memory buffers and we move bytes to
  and from the socket (as trio does): the server reads the ClientHello itself to choose a
  certificate (see server.py), and those bytes are simply the first ones fed to OpenSSL, so
  no read-ahead has to be undone. No renegotiation (the server contexts refuse it); in TLS 1.3
  the server's session tickets wait to go out with the first response, in one send.

Errors are trio's: `trio.BrokenResourceError` (the peer reset, TLS failed, the stream was
broken by a cancelled operation), `trio.ClosedResourceError` (used after `aclose`). A stream
whose operation was cancelled half-way may have sent or consumed part of a record, so it is
marked broken, and only closing it remains. A TLS send that failed because the peer went (a
reset) ends sending only: what the peer sent before it went can still be read. When OpenSSL
fails a connection it writes the alert that says why (protocol_version to a TLS 1.0 client,
record_overflow, bad_record_mac, ...) into our outgoing buffer: it is sent before the stream
breaks, as a server whose OpenSSL writes to the socket itself (nginx) sends it, so that the
peer reports the real reason instead of an unexplained close.
"""

from __future__ import annotations

import contextlib
import enum
import operator
import socket
import ssl
from collections.abc import Callable
from typing import Final, NoReturn, TypeVar

import trio

__all__ = [
    "RECEIVE_SIZE",
    "YIELD_EVERY",
    "TcpStream",
    "TlsStream",
    "discard_until_closed",
    "set_tcp_options",
]

# The default read from a socket: several TLS records (16 KiB of plaintext at most each), or
# what a plain-TCP upstream has sent, at once; far more than a kept-alive request needs.
RECEIVE_SIZE: Final = 64 * 1024
# Operations that found the socket ready, in a row on one stream, between two schedule points.
# Each moves up to RECEIVE_SIZE bytes; 16 of them take well under a millisecond, so no other
# connection waits longer than that for a busy one.
YIELD_EVERY: Final = 16
# Unsent bytes the kernel may hold before the socket stops counting as writable (what
# trio.SocketStream sets too): a client that does not read makes send_all wait early, instead
# of the kernel buffering megabytes for it.
NOTSENT_LOWAT: Final = 16 * 1024

# The most plaintext one TLS record carries (RFC 8446 5.1): a read asks OpenSSL for no more,
# because it allocates what is asked for before it knows what it has.
TLS_RECORD_PLAINTEXT: Final = 16 * 1024

_T = TypeVar("_T")


def _receive_size(max_bytes: int | None) -> int:
    """A receive's max_bytes, checked as trio's streams do (default RECEIVE_SIZE)."""
    if max_bytes is None:
        return RECEIVE_SIZE
    if operator.index(max_bytes) < 1:
        raise ValueError("max_bytes must be >= 1")
    return max_bytes


def set_tcp_options(sock: socket.socket) -> None:
    """TCP_NODELAY (each send is a whole response or request, never worth delaying) and
    TCP_NOTSENT_LOWAT (see NOTSENT_LOWAT) on a TCP socket."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if hasattr(socket, "TCP_NOTSENT_LOWAT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)


class TcpStream(trio.abc.HalfCloseableStream):
    """A connected stdlib socket as a trio stream; the socket is made non-blocking, and TCP
    ones get `set_tcp_options`."""

    __slots__ = (
        "_answer_due",
        "_closed",
        "_eof_sent",
        "_receiving",
        "_sending",
        "_unyielded",
        "operations",
        "socket",
    )

    def __init__(self, sock: socket.socket, *, options_set: bool = False) -> None:
        """`options_set`: the socket already has TCP_NODELAY and TCP_NOTSENT_LOWAT (accepted
        from a listener that has them: Linux copies them to each accepted socket)."""
        sock.setblocking(False)
        if not options_set and sock.family in (socket.AF_INET, socket.AF_INET6):
            set_tcp_options(sock)
        self.socket = sock
        self._closed = False
        self._eof_sent = False
        self._receiving = False
        self._sending = False
        self._unyielded = 0  # operations since this stream last yielded (see YIELD_EVERY)
        self.operations = 0  # sends and receives so far (a TLS stream tells its own by it)
        # The last operation was a send: see receive_some.
        self._answer_due = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Up to `max_bytes` (default RECEIVE_SIZE) bytes; b"" once the peer closed."""
        if type(max_bytes) is not int or max_bytes < 1:  # not the usual positive int
            max_bytes = _receive_size(max_bytes)
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._receiving = True
        try:
            # After a send, wait before reading (see the module docstring).
            waited = self._answer_due and not self._closed
            if waited:
                self._answer_due = False
                await trio.lowlevel.wait_readable(self.socket)
            else:
                await trio.lowlevel.checkpoint_if_cancelled()
            while True:  # bounded: each round waits for readability, or returns
                if self._closed:
                    raise trio.ClosedResourceError("this stream was closed")
                try:
                    data = self.socket.recv(max_bytes)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(self.socket)
                    waited = True
                    continue
                except OSError as exc:
                    raise trio.BrokenResourceError(f"receive failed: {exc}") from exc
                break
            self.operations += 1
            if waited:
                self._unyielded = 0
            else:
                await self.pace()
            return data
        finally:
            self._receiving = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send every byte of `data`, waiting while the peer's window is full."""
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            if self._closed or self._eof_sent:
                raise trio.ClosedResourceError("this stream was closed for sending")
            waited = False
            total = len(data)
            sent = 0
            view: memoryview | None = None
            while sent < total:  # bounded: each round sends bytes or waits to
                if self._closed:
                    raise trio.ClosedResourceError("this stream was closed")
                try:
                    if view is None:
                        sent = self.socket.send(data)
                        if sent < total:
                            view = memoryview(data).cast("B")
                    else:
                        sent += self.socket.send(view[sent:])
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(self.socket)
                    waited = True
                except OSError as exc:
                    raise trio.BrokenResourceError(f"send failed: {exc}") from exc
            self.operations += 1
            self._answer_due = True
            if waited:
                self._unyielded = 0
            else:
                await self.pace()
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        """Half-close: the peer reads an end of stream, and may still send to us; sending
        after it raises ClosedResourceError, another send_eof does nothing."""
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        if self._closed:
            raise trio.ClosedResourceError("this stream was closed")
        await trio.lowlevel.checkpoint()
        if self._eof_sent:
            return
        self._eof_sent = True
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise trio.BrokenResourceError(f"half-close failed: {exc}") from exc

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        if self._closed:
            raise trio.ClosedResourceError("this stream was closed")
        self._sending = True
        try:
            await trio.lowlevel.wait_writable(self.socket)
        finally:
            self._sending = False

    def close(self) -> None:
        """Close the socket now; idempotent. A task in an operation on this stream gets
        ClosedResourceError.

        trio is told (notify_closing) only when such a task exists: usually the one task that
        uses the stream is the one closing it, and the closed descriptor leaves the epoll set
        by itself, so the notice would cost an epoll_ctl for nothing."""
        if not self._closed:
            self._closed = True
            if (self._receiving or self._sending) and self.socket.fileno() >= 0:
                trio.lowlevel.notify_closing(self.socket)
            self.socket.close()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    async def pace(self) -> None:
        """Count an operation on this connection that did not wait; yield at every
        YIELD_EVERY-th (see the module docstring)."""
        self._unyielded += 1
        if self._unyielded >= YIELD_EVERY:
            self._unyielded = 0
            # Shielded: the operation's bytes are already sent or taken; a cancellation is
            # seen by the next operation's check instead of losing them.
            await trio.lowlevel.cancel_shielded_checkpoint()


async def discard_until_closed(
    stream: TcpStream, *, total: float, idle: float, max_bytes: int, receive_size: int
) -> None:
    """Half-close `stream`, then read and discard what the peer still sends until it closes,
    `idle` seconds pass without a byte, `total` seconds pass or `max_bytes` were read.

    The end of a lingering close: a socket closed with unread bytes sends a TCP reset instead of
    a FIN, and the reset can destroy the peer's copy of our last answer before it reads it. The
    caller closes the socket afterwards. A reset from the peer ends it as its close does.
    """
    with trio.move_on_after(total), contextlib.suppress(trio.BrokenResourceError):
        await stream.send_eof()
        discarded = 0
        while discarded < max_bytes:  # bounded, and by `total`
            chunk = b""
            with trio.move_on_after(idle):
                chunk = await stream.receive_some(receive_size)
            if not chunk:  # closed by the peer (nothing is left unread), or quiet
                break
            discarded += len(chunk)


class _State(enum.Enum):
    OK = enum.auto()
    BROKEN = enum.auto()
    CLOSED = enum.auto()


class TlsStream(trio.abc.Stream):
    """TLS over a `TcpStream`, with OpenSSL working on memory buffers.

    `prefix`: bytes already read from the socket that OpenSSL must see first (the server's
    peeked ClientHello). `https_compatible` (for the upstream side): a peer that closes without
    a close_notify reads as a plain end of stream, and aclose sends none either; without it
    (the client side) such a close is BrokenResourceError, so a truncation can be told apart.
    """

    def __init__(
        self,
        transport: TcpStream,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        prefix: bytes | bytearray = b"",
        https_compatible: bool = False,
    ) -> None:
        self.transport_stream = transport
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(
            self._incoming, self._outgoing, server_side=server_side, server_hostname=server_hostname
        )
        if prefix:
            self._incoming.write(prefix)
        self._https_compatible = https_compatible
        self._state = _State.OK
        # A send failed because the peer went (reset, closed): nothing more can be sent, but
        # what it sent before stays readable (an HTTP server may answer a request, 413 or 401,
        # without reading its body, then close).
        self._send_failed = False
        self._handshook = False
        self._ended = False  # the peer ended the stream: reads return b"" from now on
        self._close_notify_sent = False  # we ended ours: sends are refused from now on
        self._hold_outgoing = False  # TLS 1.3 tickets wait for the first response (see above)
        self._receiving = False
        self._sending = False

    # --- what the handshake settled ------------------------------------------------------

    def version(self) -> str | None:
        return self._ssl.version()

    def selected_alpn_protocol(self) -> str | None:
        return self._ssl.selected_alpn_protocol()

    def pending(self) -> bool:
        """Bytes received and not yet returned: decrypted, or records not yet decrypted."""
        return bool(self._ssl.pending() or self._incoming.pending)

    # --- operations -----------------------------------------------------------------------

    async def do_handshake(self) -> None:
        """Run the handshake (idempotent); BrokenResourceError when it fails."""
        self._check_state()
        if self._handshook:
            await trio.lowlevel.checkpoint()
            return
        await self._call(self._ssl.do_handshake, flush=False)
        self._handshook = True
        # A TLS 1.3 server's last handshake bytes are session tickets: they go out with the
        # first response, one send instead of two.
        self._hold_outgoing = self._ssl.server_side and self._ssl.version() == "TLSv1.3"
        if not self._hold_outgoing:
            await self._flush()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Up to `max_bytes` decrypted bytes; b"" after the peer's close_notify (or, with
        https_compatible, its plain close)."""
        max_bytes = _receive_size(max_bytes)
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._receiving = True
        try:
            if not self._handshook:
                await self.do_handshake()
            else:
                self._check_state()
            transport = self.transport_stream
            before = transport.operations
            if self._ended:
                await trio.lowlevel.checkpoint_if_cancelled()
                data = b""
            else:
                if not self._incoming.pending and not self._ssl.pending():
                    # Nothing received that OpenSSL has not read: it would only ask for more.
                    # (The transport's receive checks for cancellation first, as we would.)
                    await self._receive_records()
                else:
                    await trio.lowlevel.checkpoint_if_cancelled()
                size = min(max_bytes, TLS_RECORD_PLAINTEXT)
                try:
                    # Usually the records just received hold the bytes: read them here, and
                    # go through _call's loop only when OpenSSL wants more.
                    # What reading made OpenSSL write (a KeyUpdate's answer) goes now, unless
                    # another task is sending (HTTP/2 sends while it receives): its send, or
                    # the next, takes it.
                    flush = not self._sending
                    try:
                        data = self._ssl.read(size)
                    except ssl.SSLWantReadError:
                        data = await self._call(
                            self._ssl.read, size, flush=flush, reading=not flush
                        )
                    except (ssl.SSLError, ssl.CertificateError) as exc:
                        await self._fail(exc)
                    else:
                        if flush and self._outgoing.pending and not self._hold_outgoing:
                            await self._flush()
                except _CleanEnd:
                    self._ended = True
                    data = b""
            if transport.operations == before:  # served from records already received
                await transport.pace()
            return data
        finally:
            self._receiving = False

    async def send_all(
        self, data: bytes | bytearray | memoryview, *, then_close_notify: bool = False
    ) -> None:
        """Encrypt and send every byte of `data`; `then_close_notify`: and our close_notify
        after it, in the same send (a response that ends the connection costs one send, not
        two); nothing may be sent after it, and aclose then only closes the socket."""
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            if not self._handshook:
                await self.do_handshake()
            else:
                self._check_state()
            if self._close_notify_sent:
                raise trio.ClosedResourceError("our close_notify was sent: nothing may follow")
            if self._send_failed:
                raise trio.BrokenResourceError("an earlier send on this TLS stream failed")
            if not data and not self._outgoing.pending and not then_close_notify:
                await trio.lowlevel.checkpoint_if_cancelled()
                await self.transport_stream.pace()
                return
            try:
                if data:
                    self._ssl.write(data)  # into the memory BIO: never wants a read or write
                if then_close_notify:
                    self._write_close_notify()
            except ssl.SSLError as exc:
                self._state = _State.BROKEN
                raise trio.BrokenResourceError(f"TLS error: {exc}") from exc
            await self._flush()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._check_state()
        self._sending = True
        try:
            await self.transport_stream.wait_send_all_might_not_block()
        finally:
            self._sending = False

    async def send_close_notify(self) -> None:
        """Send our close_notify (without waiting for the peer's) and leave the socket open:
        for a lingering close, which half-closes and drains it afterwards."""
        if (
            self._state is not _State.OK
            or not self._handshook
            or self._close_notify_sent
            or self._send_failed
        ):
            await trio.lowlevel.checkpoint()
            return
        try:
            self._write_close_notify()
        except ssl.SSLError:
            self._state = _State.BROKEN
            await trio.lowlevel.checkpoint()
            return
        await self._flush()

    def _write_close_notify(self) -> None:
        """Put our close_notify in the outgoing buffer (SSLError: broken).

        Records received and not read yet are dropped first: nothing reads them after our
        close_notify, and OpenSSL, looking for the peer's close_notify after writing ours,
        would take their application data for an error (a client still sending a body we
        answered without reading)."""
        self._close_notify_sent = True
        if self._incoming.pending:
            self._incoming.read()
        with contextlib.suppress(ssl.SSLWantReadError):  # the peer's: not waited for
            self._ssl.unwrap()

    @property
    def close_notify_sent(self) -> bool:
        """Whether our close_notify went out (closing then has nothing left to send)."""
        return self._close_notify_sent

    def close(self) -> None:
        """Close the socket now, without sending anything more; idempotent."""
        self._state = _State.CLOSED
        self.transport_stream.close()

    async def aclose(self) -> None:
        """Send a close_notify (unless https_compatible, or broken) and close the socket.
        The socket is closed even when sending fails or is cancelled."""
        if self._state is _State.CLOSED:
            await trio.lowlevel.checkpoint()
            return
        try:
            if self._state is _State.OK and not self._https_compatible:
                with contextlib.suppress(trio.BrokenResourceError):
                    await self.send_close_notify()
        finally:
            self._state = _State.CLOSED
            self.transport_stream.close()
        await trio.lowlevel.checkpoint()

    # --- moving bytes ---------------------------------------------------------------------

    def _check_state(self) -> None:
        if self._state is _State.CLOSED:
            raise trio.ClosedResourceError("this stream was closed")
        if self._state is _State.BROKEN:
            raise trio.BrokenResourceError("this TLS stream broke earlier")

    async def _call(
        self, operation: Callable[..., _T], *args: object, flush: bool = True, reading: bool = False
    ) -> _T:
        """Run an OpenSSL operation, feeding it socket bytes until it completes.

        A receive cancelled while it waits has consumed nothing, so the stream stays usable
        (an idle connection's close still gets its close_notify); a send cancelled half-way
        breaks it (see _flush). `reading` while another task sends (HTTP/2 receives and sends
        at once): what OpenSSL wrote stays for that send or the next (only a handshake needs
        its bytes to go before it reads)."""
        while True:  # bounded: each round completes, or reads from the socket
            try:
                result = operation(*args)
            except ssl.SSLWantReadError:
                if self._outgoing.pending and not self._hold_outgoing and not reading:
                    await self._flush()
                await self._receive_records()
                continue
            except (ssl.SSLError, ssl.CertificateError) as exc:
                await self._fail(exc)
            if flush and self._outgoing.pending and not self._hold_outgoing:
                await self._flush()
            return result

    async def _fail(self, exc: ssl.SSLError | ssl.CertificateError) -> NoReturn:
        """Raise what an OpenSSL error means: _CleanEnd for the peer's end of the stream,
        else BrokenResourceError (and the stream is broken), after sending the alert OpenSSL
        wrote for it, if any (see the module docstring). The alert is a few bytes into a socket
        that has sent nothing since its last flush; a peer that went makes it fail, which is
        then ignored. The caller's deadline bounds it, as every send."""
        if isinstance(exc, ssl.SSLZeroReturnError) or (self._https_compatible and _is_eof(exc)):
            raise _CleanEnd from None
        self._state = _State.BROKEN
        if self._outgoing.pending and not self._send_failed:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self.transport_stream.send_all(self._outgoing.read())
        raise trio.BrokenResourceError(f"TLS error: {exc}") from exc

    async def _receive_records(self) -> None:
        """Feed OpenSSL what the socket has next (its end, as an EOF)."""
        try:
            data = await self.transport_stream.receive_some(RECEIVE_SIZE)
        except trio.BrokenResourceError:
            self._state = _State.BROKEN
            raise
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()

    async def _flush(self) -> None:
        """Send what OpenSSL wrote; a send cancelled half-way breaks the stream, one that failed
        (the peer went) ends sending only."""
        if not self._outgoing.pending:
            return
        self._hold_outgoing = False
        try:
            await self.transport_stream.send_all(self._outgoing.read())
        except trio.BrokenResourceError:
            # The peer went: reading what it sent before may still succeed (see _send_failed).
            self._send_failed = True
            raise
        except BaseException:
            if self._state is _State.OK:
                self._state = _State.BROKEN
            raise


class _CleanEnd(Exception):
    """The peer ended the TLS stream cleanly (or, https_compatible, closed the socket)."""


def _is_eof(exc: BaseException) -> bool:
    """A TCP close without close_notify (stringly too: OpenSSL 3 reports some of them as a
    generic SSLError, as trio and AnyIO note)."""
    return isinstance(exc, ssl.SSLEOFError | ssl.SSLSyscallError) or (
        "UNEXPECTED_EOF_WHILE_READING" in str(getattr(exc, "strerror", "") or "")
    )
