"""`dualproxy serve ...` with TLS session tickets off, for the benchmark only.

nginx is measured with `ssl_session_tickets off` and no session cache, so every connection is
a full handshake. h2load and wrk resume any session a server offers (run.py's probe counts it),
so dualproxy must offer none too, or its new-connection figure would be one of resumed
handshakes. dualproxy sets `SSLContext.num_tickets` itself (one ticket per handshake, see
keystore.py), which the OPENSSL_CONF run.py passes (NumTickets = 0) cannot override; this
wrapper makes every assignment to `num_tickets` store 0 instead, and changes nothing else.
run.py's TLS probe then checks the outcome: no ticket received, no resumption.

With `[process] workers`, the supervisor starts its workers through this wrapper too (its
`worker_command` is patched to run `serve_without_tickets.py worker ...`), so that no worker
sends a ticket either.

Usage: python benchmarks/serve_without_tickets.py serve -c dualproxy.toml
"""

from __future__ import annotations

import inspect
import ssl
import sys
from collections.abc import Sequence

from dualproxy.cli import worker
from dualproxy.cli.main import main
from dualproxy.serve.supervisor import Supervisor

# The C-level attribute of _ssl._SSLContext that ssl.SSLContext inherits.
_NUM_TICKETS = inspect.getattr_static(ssl.SSLContext, "num_tickets")


def _get(context: ssl.SSLContext) -> int:
    value: int = _NUM_TICKETS.__get__(context, ssl.SSLContext)
    return value


def _set_zero(context: ssl.SSLContext, value: int) -> None:
    _NUM_TICKETS.__set__(context, 0)


# setattr, not an assignment: typeshed declares num_tickets a plain int attribute.
setattr(ssl.SSLContext, "num_tickets", property(_get, _set_zero))  # noqa: B010

_worker_command = Supervisor.worker_command


def _worker_through_this_wrapper(
    self: Supervisor, slot: int, listeners: Sequence[int], control: int
) -> list[str]:
    command = _worker_command(self, slot, listeners, control)
    module = command.index("-m")
    return [*command[:module], __file__, "worker", *command[module + 2 :]]


setattr(Supervisor, "worker_command", _worker_through_this_wrapper)  # noqa: B010

if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        sys.exit(worker.main(sys.argv[2:]))
    sys.exit(main(sys.argv[1:]))
