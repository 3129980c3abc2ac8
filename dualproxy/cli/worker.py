"""The entry point of one worker process: `python -m dualproxy.cli.worker`, started by the
supervisor of `dualproxy serve` ([process] workers above 1; serve.supervisor) with the
listening sockets and its link as inherited descriptors. With [acme] it answers the CA's
challenges beside its server (acme.service.answer_beside): tls-alpn-01 on the TLS port,
http-01 on the listener its supervisor opened; the supervisor alone renews. Not a command
for people: it is not listed among `dualproxy`'s commands, and it refuses to run without
those descriptors.

Exit codes are `serve`'s: 0 once drained or stopped, 1 when the config or a key cannot be
used (the supervisor logs that the worker exited, and starts another after its backoff).
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import trio

from dualproxy.cli.arguments import EXIT_FAILED, EXIT_USAGE
from dualproxy.cli.running import run_until_interrupted
from dualproxy.cli.serve import LOG_FORMATS
from dualproxy.config.errors import OperatorError
from dualproxy.ops.logformat import setup_logging
from dualproxy.serve.server import Server
from dualproxy.serve.worker import serve_worker, worker_server

log = logging.getLogger("dualproxy")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dualproxy.cli.worker",
        description="One worker of `dualproxy serve` ([process] workers); started by its"
        " supervisor, never by hand.",
    )
    parser.add_argument("-c", "--config", type=Path, required=True)
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="text")
    parser.add_argument("--slot", type=int, default=0, help="which worker (for the log)")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--listen-fd", type=int, action="append", required=True)
    parser.add_argument(
        "--acme-http-fd",
        type=int,
        action="append",
        default=[],
        help="the http-01 listener ([acme] http_listen) every worker serves",
    )
    parser.add_argument(
        "--ticket-key-file",
        type=Path,
        default=None,
        help="the session-ticket key file the workers share (the supervisor's, when the"
        " config names none)",
    )
    parser.add_argument(
        "--canary-halted",
        action="store_true",
        help="the machine's canary is halted: serve no canary client from the first",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.log_format)
    try:
        control = socket.socket(fileno=args.control_fd)
        listeners = [socket.socket(fileno=fd) for fd in args.listen_fd]
        acme_http = [socket.socket(fileno=fd) for fd in args.acme_http_fd]
    except OSError as exc:
        log.error("worker: not started by a dualproxy supervisor (%s)", exc.strerror)
        return EXIT_USAGE
    for listener in [*listeners, *acme_http]:
        listener.setblocking(False)
    try:
        server = worker_server(
            args.config, ticket_key_file=args.ticket_key_file, canary_halted=args.canary_halted
        )
    except OperatorError as exc:
        log.error("worker %d: %s", args.slot, exc)
        return EXIT_FAILED
    return run_until_interrupted(partial(_work, server, listeners, control, args.slot, acme_http))


async def _work(
    server: Server,
    listeners: Sequence[socket.socket],
    control: socket.socket,
    slot: int,
    acme_http: Sequence[socket.socket],
) -> None:
    """serve_worker and, with [acme], the challenges answered beside it (its supervisor
    places the orders): the board reads the challenge folder before the worker accepts, so a
    worker that replaces one mid-order answers the CA from its first client."""
    if server.config.acme is None:
        await serve_worker(server, listeners, control, slot)
        return
    from dualproxy.acme import service  # the acme library loads only when used

    async with trio.open_nursery() as nursery:
        await nursery.start(service.answer_beside, server, acme_http)
        await serve_worker(server, listeners, control, slot)
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    sys.exit(main())
