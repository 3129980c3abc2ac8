"""Commands of a running server: `serve` (the server and its admin listener), `status` and
`canary resume` (which ask that admin listener).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import socket
import sys
from functools import partial
from pathlib import Path
from typing import Final

import trio

from dualproxy.acme import challenges
from dualproxy.cli.acme import issue_or_fail
from dualproxy.cli.arguments import EXIT_OK, AddCommand, UsageError, with_config
from dualproxy.cli.running import run_until_interrupted
from dualproxy.config.errors import OperatorError
from dualproxy.config.loader import load
from dualproxy.config.names import ListenAddress, admin_address_problem, parse_address
from dualproxy.config.schema import DEFAULT_CONFIG_FILE
from dualproxy.ops import admin
from dualproxy.ops.logformat import setup_logging
from dualproxy.rotation import checks
from dualproxy.serve.listeners import raise_open_file_limit
from dualproxy.serve.server import Server

LOG_FORMATS: Final = ("text", "json")


def register(command: AddCommand) -> None:
    serve = command("serve", "serve TLS with the configured keys and rotation")
    with_config(serve)
    serve.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="text",
        help="text (default): one key=value line per connection; json: one JSON object per line",
    )
    serve.add_argument(
        "--admin",
        type=_listen_address_argument,
        default=None,
        metavar="HOST:PORT",
        help="the admin listener's address instead of the config's [admin] address (one per"
        " process when several share the port with reuse_port)",
    )
    serve.set_defaults(handler=_cmd_serve)

    status = command(
        "status", "who gets which key and how it goes: the admin listener's summary, as text"
    )
    _with_admin_url(status)
    status.add_argument("--json", action="store_true", help="print /status.json instead")
    status.set_defaults(handler=_cmd_status)

    canary = command("canary", "the canary of a running server")
    canary_sub = canary.add_subparsers(metavar="ACTION", required=True)
    resume = canary_sub.add_parser(
        "resume",
        help="run a halted canary again (its samples start from zero)",
        description="Resume the canary that the server halted when the new key's pin-failure"
        " share rose above the old key's; fix the cause first (an app shipped without the new"
        " pin).",
    )
    _with_admin_url(resume)
    resume.set_defaults(handler=_cmd_canary_resume)


def _with_admin_url(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--admin",
        type=_admin_url_argument,
        default=None,
        metavar="URL",
        help="the server's admin listener (default: the config's [admin] address, or"
        f" {admin.DEFAULT_URL} without a config)",
    )
    sub.add_argument(
        "-c",
        "--config",
        type=Path,
        default=None,
        help=f"the server's config file, for its [admin] address (./{DEFAULT_CONFIG_FILE}"
        " when it exists)",
    )


def _listen_address_argument(text: str) -> ListenAddress:
    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _admin_url_argument(text: str) -> tuple[str, int]:
    try:
        return admin.parse_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cmd_serve(args: argparse.Namespace) -> int:
    setup_logging(args.log_format)
    config = load(args.config)
    for finding in checks.check_rotation(config):
        logging.getLogger("dualproxy").warning("%s", finding)
    admin_address = config.admin.address
    if args.admin is not None:
        admin_address = args.admin
        allow = config.admin.allow_non_loopback
        if (problem := admin_address_problem(admin_address, allow_non_loopback=allow)) is not None:
            raise UsageError(f"--admin: {problem}")
    missing = [key for key in config.acme_keys() if not key.chain.exists()]
    if missing:
        # Obtained before serving: the key store serves only keys that have a chain.
        names = ", ".join(key.name for key in missing)
        logging.getLogger("dualproxy").info("acme: no chain yet for %s; obtaining it", names)
        issue_or_fail(config, missing)
    server = Server(config)  # loads the keys: an unusable one stops us here, exit 1
    raise_open_file_limit(config.limits.max_connections)
    with contextlib.ExitStack() as sockets:
        admin_socket = None
        if admin_address is not None:
            try:
                admin_socket = sockets.enter_context(admin.open_socket(admin_address))
            except OSError as exc:
                raise OperatorError(f"{exc.strerror}", file=config.path) from None
        code = run_until_interrupted(partial(_serve, server, admin_socket))
    if code == EXIT_OK:
        logging.getLogger("dualproxy").info("stopped")
    return code


async def _serve(server: Server, admin_socket: socket.socket | None) -> None:
    """The server and, beside it, its admin listener and [acme]'s service, which stop when
    the server does."""
    async with trio.open_nursery() as nursery:
        if admin_socket is not None:
            await nursery.start(admin.serve, admin_socket, server)
        if server.config.acme is not None:
            from dualproxy.acme import service  # the acme library loads only when used

            await nursery.start(service.serve_beside, server)
        await server.run()
        nursery.cancel_scope.cancel()


def _cmd_status(args: argparse.Namespace) -> int:
    path = "/status.json" if args.json else "/status.txt"
    try:
        data = admin.fetch(_admin_address(args), path)
    except admin.AdminError as exc:
        raise OperatorError(str(exc)) from None
    sys.stdout.write(data.decode("utf-8", "replace"))
    return EXIT_OK


def _cmd_canary_resume(args: argparse.Namespace) -> int:
    try:
        text = admin.resume_canary(_admin_address(args))
    except admin.AdminError as exc:
        raise OperatorError(str(exc)) from None
    print(text)
    return EXIT_OK


def _admin_address(args: argparse.Namespace) -> tuple[str, int]:
    """Where the server's admin listener is: --admin, else the config's [admin] address
    (a wildcard address is reached on loopback)."""
    if args.admin is not None:
        address: tuple[str, int] = args.admin
        return address
    path = args.config if args.config is not None else Path(DEFAULT_CONFIG_FILE)
    if args.config is None and not path.is_file():
        return admin.parse_url(admin.DEFAULT_URL)
    listen = load(path).admin.address
    if listen is None:
        raise OperatorError(
            "the admin listener is off ([admin] enabled = false)",
            fix="enable it, or pass --admin URL",
            key_path="admin",
            file=path,
        )
    # A listener on every interface (admin.allow_non_loopback) answers on loopback too.
    return challenges.probe_address(listen)
