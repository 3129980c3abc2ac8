"""A client's reading of one whole HTTP/1.1 response, with h11: what tests of our servers use
to see what a real client would."""

from __future__ import annotations

import h11
import trio

# One read from the stream under test: any size works, this one is a TLS record's plaintext
# and more, so a response of a few records arrives in a few reads.
RECEIVE_SIZE = 65536


async def receive_response(
    stream: trio.abc.ReceiveStream, conn: h11.Connection
) -> tuple[h11.Response, bytes]:
    """The next final response on `conn` (a client connection whose request was sent), and its
    body; what came after it stays in `conn.trailing_data`."""
    response: h11.Response | None = None
    body = bytearray()
    while True:  # bounded by the caller's timeout and the response's framing
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(RECEIVE_SIZE)))
        elif isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert response is not None
            return response, bytes(body)
        else:
            raise AssertionError(f"unexpected {event!r}")
