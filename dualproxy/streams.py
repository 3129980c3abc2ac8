"""The replay stream: hands bytes the server already read back to the TLS layer.

Theory of operation: to choose a certificate per connection, the server reads the client's
first TLS record(s) itself, parses the ClientHello (SNI, ALPN, signature algorithms) and only
then builds `trio.SSLStream` with the chosen `ssl.SSLContext`. OpenSSL must still see the
hello from its first byte, and TCP cannot un-read, so `ReplayStream` sits between
`SSLStream` and the socket: `receive_some` returns the already-read bytes first, then reads
from the socket; sends pass straight through. Serving the prefix never mixes it with fresh
transport data in one chunk, so a read from the buffer never waits on the network.

The prefix is exactly what the caller has read, so its size is bounded by the caller's
ClientHello peek limit; this module never reads ahead and adds no buffer of its own.
"""

from __future__ import annotations

import operator

import trio


class ReplayStream(trio.abc.Stream):
    """A stream that yields `prefix` first, then reads from `transport`.

    Sends go straight to `transport`, and closing this stream closes `transport`, unless
    `keep_transport_open` was called.

    Deliberately not a `trio.abc.HalfCloseableStream`, even over a `SocketStream`: its one
    consumer, `trio.SSLStream`, never calls `send_eof` (TLS ends with close_notify, not a
    half-close), and a class that is half-closeable only for some transports would make
    `isinstance` checks lie about the others.
    """

    def __init__(
        self, transport: trio.abc.Stream, prefix: bytes | bytearray | memoryview = b""
    ) -> None:
        self._transport = transport
        # A private copy (the caller may reuse its buffer), viewed so that consuming it in
        # small reads copies each byte only once more.
        self._prefix = memoryview(bytes(prefix))
        self._closed = False
        self._receiving = False
        self._keep_transport_open = False

    @property
    def transport(self) -> trio.abc.Stream:
        """The stream read after the prefix, and written to directly."""
        return self._transport

    def keep_transport_open(self) -> None:
        """Make `aclose` leave the transport open, for the caller to close: the server's
        lingering close lets `SSLStream.aclose` send its close_notify through this stream, then
        half-closes and drains the socket itself."""
        self._keep_transport_open = True

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """Return the next bytes of the prefix, or once it is used up, of the transport."""
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._receiving = True
        try:
            if max_bytes is not None:
                max_bytes = operator.index(max_bytes)
                if max_bytes < 1:
                    raise ValueError("max_bytes must be >= 1")
            if not self._prefix:
                # The transport checkpoints and reports its own closed state.
                return await self._transport.receive_some(max_bytes)
            await trio.lowlevel.checkpoint()
            # Checked after the checkpoint, so that an aclose() before or during it wins.
            if self._closed:
                raise trio.ClosedResourceError("this stream was closed")
            size = len(self._prefix) if max_bytes is None else max_bytes
            chunk = bytes(self._prefix[:size])
            self._prefix = self._prefix[size:]
            return chunk
        finally:
            self._receiving = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send `data` on the transport."""
        await self._transport.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until the transport might accept data without blocking."""
        await self._transport.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        """Close this stream and (see `keep_transport_open`) the transport; calling it again
        is harmless."""
        self._closed = True
        if self._keep_transport_open:
            await trio.lowlevel.checkpoint()
            return
        await self._transport.aclose()
