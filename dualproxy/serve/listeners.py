"""Listening sockets and the accept loop every listener of ours runs.

Theory of operation. `open_listeners` binds every configured address (one socket per address
family, non-blocking, SO_REUSEADDR, SO_REUSEPORT when asked so that several processes share a
port); on Linux it also sets the TCP options every accepted socket needs (TCP_NODELAY,
TCP_NOTSENT_LOWAT) once on the listener, which accepted sockets inherit, so a connection costs
no setsockopt call. A bind that fails names the setting and closes what was bound.

`accept_loop` is the one accept loop: it takes clients from one listener into tasks of a
nursery, each holding a slot of a `trio.CapacityLimiter`. A slot is taken before accepting, so
at the limit clients wait in the kernel's backlog instead of being accepted and cut off; a
listener waits for a client before it takes a slot, so that a quiet listener never holds one
the others need. Clients already waiting are accepted in a row (ACCEPT_BATCH) before the loop
yields. Running out of descriptors or memory pauses accepting briefly (logged) instead of
stopping the server, as trio.serve_listeners and nginx do. The loop does not care where the
listener came from: opened here, or handed over by another process.
"""

from __future__ import annotations

import errno
import logging
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import trio

from dualproxy.config.names import ListenAddress
from dualproxy.tls.streams import set_tcp_options

__all__ = [
    "ACCEPTED_SOCKETS_INHERIT_OPTIONS",
    "ACCEPT_BACKOFF_SECONDS",
    "ACCEPT_BATCH",
    "accept_loop",
    "bind_hint",
    "bound_address",
    "close_listener",
    "describe_bound",
    "open_listeners",
    "raise_open_file_limit",
]

log = logging.getLogger("dualproxy")

# Accept errors that mean "out of resources right now", not "the listener is broken":
# back off and retry, as trio.serve_listeners and nginx do, instead of crashing.
_ACCEPT_CAPACITY_ERRNOS: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
)
# Linux gives an accepted TCP socket the listener's TCP options: set once on the listener,
# TCP_NODELAY and TCP_NOTSENT_LOWAT cost no system calls per connection (elsewhere, per socket).
ACCEPTED_SOCKETS_INHERIT_OPTIONS: Final = sys.platform == "linux"
# Clients accepted from the backlog in a row before the accept loop yields: enough to save
# a wait per client under a burst, few enough that the connections just accepted (and every
# other task) run soon.
ACCEPT_BATCH: Final = 16
# How long to pause accepting after such an error: long enough for a handler to free a
# descriptor, short enough not to be noticed by clients waiting in the backlog.
ACCEPT_BACKOFF_SECONDS: Final = 0.1

# What the accept loop starts for each client: handler(socket, address, token). The handler
# owns the socket (closes it) and the slot: it releases `token` from the loop's limiter.
Handler = Callable[[socket.socket, object, object], Awaitable[None]]


async def open_listeners(
    addresses: Sequence[ListenAddress], reuse_port: bool, *, setting: str = "listen.address"
) -> list[socket.socket]:
    """Bind every configured address (non-blocking listening sockets); with reuse_port,
    several processes may share them. OSError naming the address, the `setting` it comes
    from (a config key, or the command-line option that set it) and what to do when one
    cannot be bound; those already bound are closed then."""
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
                    if ACCEPTED_SOCKETS_INHERIT_OPTIONS:
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
                        exc.errno,
                        f"cannot listen on {address} ({setting}): {exc.strerror}"
                        + bind_hint(exc.errno, address.port, setting),
                    ) from exc
                listeners.append(sock)
    except BaseException:
        for listener in listeners:
            listener.close()
        raise
    return listeners


def bind_hint(error: int | None, port: int, setting: str) -> str:
    """What to do when binding `port` failed with `error` (an errno), as "; ..." or ""."""
    if error == errno.EADDRINUSE:
        return (
            f"; another process listens there (a dualproxy still running? `ss -ltnp 'sport ="
            f" :{port}'` names it): stop it, or choose another port with {setting}"
        )
    if error == errno.EACCES and 0 < port < 1024:
        return (
            f"; ports below 1024 need root or the CAP_NET_BIND_SERVICE capability (systemd:"
            f" AmbientCapabilities=CAP_NET_BIND_SERVICE), or choose a port above 1023 with"
            f" {setting}"
        )
    if error == errno.EADDRNOTAVAIL:
        return f"; no interface of this machine has that address: fix {setting}"
    return ""


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


def bound_address(listener: socket.socket) -> tuple[str, int]:
    """The (host, port) a listener is bound to: its configured port may have been 0."""
    name = listener.getsockname()
    return str(name[0]), int(name[1])


def describe_bound(bound: Sequence[tuple[str, int]]) -> str:
    """Bound addresses as the log and the CLI write them: "127.0.0.1:8443, [::1]:8443"."""
    return ", ".join(str(ListenAddress(host, port)) for host, port in bound)


def close_listener(listener: socket.socket) -> None:
    """Close a listener that an accept loop may be waiting on (it wakes up and ends)."""
    if listener.fileno() >= 0:
        trio.lowlevel.notify_closing(listener)
    listener.close()


async def accept_loop(
    listener: socket.socket,
    slots: trio.CapacityLimiter,
    nursery: trio.Nursery,
    handler: Handler,
    *,
    name: str | None = None,
    at_limit: Callable[[bool], object] | None = None,
) -> None:
    """Accept clients into `handler` tasks in `nursery` until cancelled, each holding a slot
    of `slots` (see the module docstring); the listener is closed on the way out.

    `name` names the tasks (trio otherwise formats one for every task). `at_limit(True)` is
    called when a client waits and every slot is taken, before waiting for one, and
    `at_limit(False)` once a slot is taken (the server reclaims idle connections meanwhile:
    serve.admission).
    """
    try:
        while True:
            # Wait for a client before taking a slot: a loop holding a slot while its own
            # listener stays quiet would keep it from the other listeners' clients (with
            # one slot left, forever).
            await trio.lowlevel.wait_readable(listener)
            for accepted in range(ACCEPT_BATCH):
                # A slot is taken before accepting: at the limit we stop accepting and new
                # clients wait in the kernel's backlog instead of being cut off.
                token = object()
                try:
                    slots.acquire_on_behalf_of_nowait(token)
                except trio.WouldBlock:
                    if accepted:  # maybe nobody waits now: look again before reclaiming
                        break
                    if at_limit is None:
                        await slots.acquire_on_behalf_of(token)
                    else:
                        at_limit(True)  # a client waits (the listener was readable)
                        try:
                            await slots.acquire_on_behalf_of(token)
                        finally:
                            at_limit(False)
                try:
                    sock, address = listener.accept()
                except BlockingIOError:  # the backlog is empty (or the client gave up)
                    slots.release_on_behalf_of(token)
                    break
                except OSError as exc:
                    slots.release_on_behalf_of(token)
                    if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                        raise
                    log.error("accept failed (%s); retrying: raise the open-file limit", exc)
                    await trio.sleep(ACCEPT_BACKOFF_SECONDS)
                    break
                except BaseException:
                    slots.release_on_behalf_of(token)
                    raise
                nursery.start_soon(handler, sock, address, token, name=name)
            else:  # a full batch: let the connections just accepted run first
                await trio.lowlevel.checkpoint()
    finally:
        close_listener(listener)


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
