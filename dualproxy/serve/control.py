"""The link between the supervisor and one worker process: JSON objects, one per line, over
a Unix socket pair the supervisor makes and the worker inherits.

Messages are small and few (a reload, the canary's decision, a drain; a worker's counts a few
times a second: ops.tally), so a line of JSON is plenty and readable in strace. Each side
has one reader; senders share the stream through a lock, so two tasks never interleave
their lines. A message is sent whole or not at all as far as the reader can tell: a send
that is cancelled half way would leave a torn line, so every send is shielded and bounded by
SEND_TIMEOUT instead (the peer is our own process, reading all the time).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Mapping
from typing import Final

import trio

__all__ = ["MAX_MESSAGE_BYTES", "SEND_TIMEOUT", "Channel", "ChannelError"]

# The longest line we take: a worker's counts for many keys (rows, a day of 15-minute
# buckets per key) stay under a few hundred kB; anything longer is a bug, not a message.
MAX_MESSAGE_BYTES: Final = 4 * 1024 * 1024
# What one read asks for: a typical message is well under this.
RECEIVE_SIZE: Final = 64 * 1024
# How long a send may wait for the peer to read: both sides read all the time, so only a
# peer that hangs (stopped in a debugger, wedged) makes it wait; the message is then dropped
# (ChannelError) rather than holding up a drain or a reload.
SEND_TIMEOUT: Final = 5.0


class ChannelError(Exception):
    """The peer sent something that is not a message of ours, or does not read (our bug or
    a hung process: the message names which)."""


class Channel:
    """One end of a supervisor-worker link (see the module docstring)."""

    def __init__(self, sock: socket.socket) -> None:
        self._stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        self._buffer = bytearray()
        self._send_lock = trio.Lock()

    async def send(self, message: Mapping[str, object]) -> None:
        """Send one message; ChannelError when the peer does not read within SEND_TIMEOUT,
        trio.BrokenResourceError when it is gone."""
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        with trio.move_on_after(SEND_TIMEOUT, shield=True) as scope:
            async with self._send_lock:
                await self._stream.send_all(data)
        if scope.cancelled_caught:
            raise ChannelError(f"the peer read nothing for {SEND_TIMEOUT:g} s; message dropped")

    async def receive(self) -> dict[str, object] | None:
        """The next message; None when the peer closed its end (or exited). ChannelError for
        a line that is not a JSON object or is longer than MAX_MESSAGE_BYTES."""
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                try:
                    message = json.loads(line)
                except ValueError as exc:
                    raise ChannelError(f"not a JSON message: {exc}") from None
                if not isinstance(message, dict):
                    raise ChannelError("not a JSON object")
                return message
            if len(self._buffer) > MAX_MESSAGE_BYTES:
                raise ChannelError(f"a message longer than {MAX_MESSAGE_BYTES} bytes")
            try:
                chunk = await self._stream.receive_some(RECEIVE_SIZE)
            except trio.BrokenResourceError:
                chunk = b""
            if not chunk:
                return None
            self._buffer += chunk

    async def aclose(self) -> None:
        await self._stream.aclose()
