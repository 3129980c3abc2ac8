"""The server: one connection's pipeline, its record, listeners, lifecycle, placeholder.

Layer 7: trio and sockets; imports every layer below it. Services that run beside a server
(ACME renewals, the admin listener, the dev bench) live above it and reach in through its
public interface; the handshake path knows ACME only as a `server.TlsAlpnResponder`.

- `server`: Server (run, the accept wiring) and one connection: peek, choose, handshake, respond;
- `connection`: ConnectionRecord, what one connection did, and its `conn` log line;
- `listeners`: opening listening sockets, the one accept loop, the open-file limit;
- `lifecycle`: reloads (one at a time), the drain, file polling and the other periodic tasks,
  signals;
- `placeholder`: the responder without [upstream];
- `closing`: the lingering close, close_notify and pool close bounds;
- `clock`: the policy's clock.
"""
