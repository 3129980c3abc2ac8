"""Listening sockets handed over by systemd (socket activation, sd_listen_fds(3)).

Theory of operation. With a `.socket` unit, systemd opens the listening sockets itself and
passes them to the service when it starts: file descriptors 3, 4, ... and the environment
variables LISTEN_PID (the process they are meant for: a child that inherited the
environment must not take them), LISTEN_FDS (how many) and LISTEN_FDNAMES (their
`FileDescriptorName=`, colon-separated). The sockets belong to systemd, not to the process:
they stay open while the service restarts, so clients that connect meanwhile wait in the
kernel's backlog and are accepted by the next process instead of being refused. That is how
a restart or an upgrade refuses nothing, which a process that opens its own sockets cannot
promise (between its exit and the next bind, connections are refused).

`inherited_listeners` takes them once, at start, and unsets the variables (as
sd_listen_fds(unset_environment=1) does). Sockets named "acme-http" are for the http-01
listener ([acme] http_listen); every other one is a TLS listener, whatever `[listen] address`
says: with socket activation the `.socket` unit says where we listen. Each must be a
listening TCP socket; anything else is the unit's mistake and stops the start, saying so.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Final

from dualproxy.config.errors import OperatorError
from dualproxy.tls.streams import set_tcp_options

__all__ = ["ACME_HTTP_NAME", "FIRST_FD", "Inherited", "inherited_listeners"]

# sd_listen_fds(3): the first passed descriptor is SD_LISTEN_FDS_START, 3.
FIRST_FD: Final = 3
# The FileDescriptorName= of a socket meant for the http-01 listener.
ACME_HTTP_NAME: Final = "acme-http"
_VARIABLES: Final = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


@dataclass(frozen=True, slots=True)
class Inherited:
    """The listening sockets systemd passed: for TLS, and for the http-01 listener."""

    tls: list[socket.socket] = field(default_factory=list)
    acme_http: list[socket.socket] = field(default_factory=list)


def inherited_listeners(
    environ: MutableMapping[str, str] | None = None, pid: int | None = None
) -> Inherited | None:
    """The sockets passed to this process by socket activation, or None when there are none
    (LISTEN_PID unset or another process's). Unsets the variables. OperatorError when they
    are malformed or a descriptor is not a listening TCP socket."""
    env = os.environ if environ is None else environ
    listen_pid = env.get("LISTEN_PID")
    count_text = env.get("LISTEN_FDS")
    names_text = env.get("LISTEN_FDNAMES")
    for name in _VARIABLES:
        env.pop(name, None)
    if listen_pid is None or count_text is None:
        return None
    if listen_pid != str(os.getpid() if pid is None else pid):
        return None  # meant for the process that started us
    if count_text == "0":  # sd_listen_fds: none passed
        return None
    if not count_text.isdigit():
        raise OperatorError(
            f"LISTEN_FDS={count_text!r} is not a number of sockets",
            fix="check the .socket unit that activates dualproxy (ListenStream=)",
        )
    count = int(count_text)
    names = names_text.split(":") if names_text else []
    if len(names) not in (0, count):
        raise OperatorError(
            f"LISTEN_FDNAMES names {len(names)} sockets but LISTEN_FDS says {count}",
            fix="check the .socket unit's FileDescriptorName=",
        )
    inherited = Inherited()
    for index in range(count):
        fd = FIRST_FD + index
        name = names[index] if names else ""
        sock = _listening_socket(fd, name)
        (inherited.acme_http if name == ACME_HTTP_NAME else inherited.tls).append(sock)
    return inherited


def _listening_socket(fd: int, name: str) -> socket.socket:
    """The listening TCP socket at `fd`, non-blocking and with the options accepted sockets
    inherit; OperatorError naming the descriptor otherwise."""
    label = f"descriptor {fd}" + (f" ({name})" if name else "")
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise OperatorError(
            f"socket activation: {label} is not a socket: {exc.strerror}",
            fix="check the .socket unit (ListenStream= for each socket)",
        ) from None
    kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
    listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or kind != socket.SOCK_STREAM:
        sock.detach()  # not ours to close
        raise OperatorError(
            f"socket activation: {label} is not a TCP socket",
            fix="use ListenStream=ADDRESS:PORT in the .socket unit",
        )
    if not listening:
        sock.detach()
        raise OperatorError(
            f"socket activation: {label} is not listening (Accept=yes?)",
            fix="dualproxy accepts its own connections: use Accept=no (the default)",
        )
    set_tcp_options(sock)  # for the sockets accepted from it, as open_listeners does
    sock.setblocking(False)
    return sock
