"""Commands of a running server: `serve` (the server and its admin listener), `status` and
`canary resume` (which ask that admin listener).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Final

import trio

from dualproxy.acme import challenges
from dualproxy.cli.acme import issue_or_fail
from dualproxy.cli.arguments import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    AddCommand,
    UsageError,
    with_config,
)
from dualproxy.cli.running import print_error, run_until_interrupted
from dualproxy.config.errors import OperatorError
from dualproxy.config.loader import load
from dualproxy.config.names import ListenAddress, admin_address_problem, parse_address
from dualproxy.config.schema import DEFAULT_CONFIG_FILE, Config
from dualproxy.ops import admin
from dualproxy.ops.logformat import setup_logging
from dualproxy.rotation import checks
from dualproxy.serve import activation, announce
from dualproxy.serve.listeners import raise_open_file_limit
from dualproxy.serve.server import Server
from dualproxy.serve.supervisor import Supervisor

LOG_FORMATS: Final = ("text", "json")

log = logging.getLogger("dualproxy")


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
        " pin). Replicas sharing its state folder ([state] dir) resume too, within their poll"
        " interval.",
    )
    _with_admin_url(resume)
    resume.set_defaults(handler=_cmd_canary_resume)


def _with_admin_url(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--admin",
        type=_admin_url_argument,
        default=None,
        metavar="URL",
        help="the server's admin listener (default: the one the server started with -c CONFIG"
        " recorded, else the config's [admin] address; without a config, the only server"
        " running)",
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
    if args.log_format != "json":
        return _serve_command(args, print_error)
    # Every line on stderr is one JSON object, the error that stops the start included.
    try:
        return _serve_command(args, _log_error)
    except UsageError as exc:
        _log_error(str(exc))
        return EXIT_USAGE
    except OperatorError as exc:
        _log_error(str(exc))
        return EXIT_FAILED


def _log_error(message: str) -> None:
    log.error("%s", message)


def _serve_command(args: argparse.Namespace, report: Callable[[str], None]) -> int:
    config = load(args.config)
    for finding in checks.check_rotation(config):
        logging.getLogger("dualproxy").warning("%s", finding)
    admin_address = config.admin.address
    if args.admin is not None:
        admin_address = args.admin
        allow = config.admin.allow_non_loopback
        if (problem := admin_address_problem(admin_address, allow_non_loopback=allow)) is not None:
            raise UsageError(f"--admin: {problem}")
    # Taken (and the variables unset) before anything else could start a child process.
    inherited = activation.inherited_listeners()
    missing = [key for key in config.acme_keys() if not key.chain.exists()]
    if missing:
        # Obtained before serving (by this process, on the configured ports, before any
        # worker starts): the key store serves only keys that have a chain.
        names = ", ".join(key.name for key in missing)
        log.info("acme: no chain yet for %s; obtaining it", names)
        issue_or_fail(config, missing)
    if config.process.worker_count() > 1:
        return _supervise(config, admin_address, args.log_format, report, inherited)
    server = Server(config, share_state=True)  # loads the keys: an unusable one stops us, exit 1
    raise_open_file_limit(config.limits.max_connections)
    body = partial(_serve, server, admin_address, config.path, inherited)
    code = run_until_interrupted(body, report=report)
    if code == EXIT_OK:
        log.info("stopped")
    return code


def _supervise(
    config: Config,
    admin_address: ListenAddress | None,
    log_format: str,
    report: Callable[[str], None],
    inherited: activation.Inherited | None,
) -> int:
    """[process] workers above 1: a supervisor and its workers (serve.supervisor), with the
    admin listener (and [acme]'s renewals) in the supervisor; socket activation's sockets are
    shared by the workers."""
    supervisor = Supervisor(config, log_format=log_format, share_state=True)  # keys: exit 1
    raise_open_file_limit(config.limits.max_connections)
    body = partial(_serve, supervisor, admin_address, config.path, inherited)
    code = run_until_interrupted(body, report=report)
    if code == EXIT_OK:
        log.info("stopped")
    return code


async def _serve(
    server: Server | Supervisor,
    admin_address: ListenAddress | None,
    config_file: Path | None,
    inherited: activation.Inherited | None,
) -> None:
    """The server and, beside it, its admin listener (which never stops it: see
    admin.serve_when_possible) and [acme]'s service, which stop when the server does.
    `inherited`: the listening sockets systemd passed (socket activation), served instead of
    the configured addresses."""
    async with trio.open_nursery() as nursery:
        admin_at = None
        if admin_address is not None:
            bound = await nursery.start(
                partial(admin.serve_when_possible, record_for=config_file),
                admin_address,
                server,
            )
            admin_at = (
                f"http://{ListenAddress(*bound)}/"
                if bound is not None
                else f"{admin_address} not listening yet (see above)"
            )
        http01 = None
        if server.config.acme is not None:
            from dualproxy.acme import service  # the acme library loads only when used

            acme_http = inherited.acme_http if inherited is not None else []
            if isinstance(server, Server):  # it answers the challenges and renews
                beside = partial(service.serve_beside, server, inherited=acme_http)
            else:  # it renews; its workers answer
                beside = partial(service.renew_beside, server, inherited=acme_http)
            http01 = await nursery.start(beside)
        nursery.start_soon(_announce, server, http01, admin_at)
        if inherited is not None and inherited.tls:
            log.info(
                "socket activation: serving the %d socket(s) systemd passed", len(inherited.tls)
            )
            await server.run(inherited.tls)
        else:
            await server.run()
        nursery.cancel_scope.cancel()


async def _announce(
    server: Server | Supervisor, http01: tuple[str, int] | None, admin_at: str | None
) -> None:
    """Once the server listens: what it serves and where, in a few lines (announce.summary)."""
    tls = await server.wait_listening()
    lines = announce.summary(
        server.config, server.snapshot, server.now(), tls=tls, http01=http01, admin=admin_at
    )
    for line in lines:
        log.info("%s", line)


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
    """Where the server's admin listener is: --admin; else what the server started with the
    config recorded (admin.recorded: the port it got, whatever the config says); else the
    config's fixed [admin] address (a wildcard address is reached on loopback). Without -c
    and ./config.toml, the one running server that recorded its listener."""
    if args.admin is not None:
        address: tuple[str, int] = args.admin
        return address
    path = args.config if args.config is not None else Path(DEFAULT_CONFIG_FILE)
    if args.config is None and not path.is_file():
        return _the_only_recorded_server()
    listen = load(path).admin.address
    if listen is None:
        raise OperatorError(
            "the admin listener is off ([admin] enabled = false)",
            fix="enable it, or pass --admin URL",
            key_path="admin",
            file=path,
        )
    found = admin.recorded(path)
    if found is not None:
        return found
    if listen.port == 0:
        raise OperatorError(
            f"no running `dualproxy serve -c {path}` recorded its admin listener in"
            f" {admin.runtime_folder()}",
            fix="is it running, as this user? Pass --admin URL to ask a listener directly",
            file=path,
        )
    # A listener on every interface (admin.allow_non_loopback) answers on loopback too.
    return challenges.probe_address(listen)


def _the_only_recorded_server() -> tuple[str, int]:
    servers = admin.recorded_servers()
    if len(servers) == 1:
        return servers[0][0]
    if not servers:
        raise OperatorError(
            f"no ./{DEFAULT_CONFIG_FILE} here, and no running `dualproxy serve` recorded its"
            f" admin listener in {admin.runtime_folder()}",
            fix="pass -c CONFIG (the server's), or --admin URL",
        )
    listed = "; ".join(f"{config} (http://{ListenAddress(*at)}/)" for at, config in servers)
    raise OperatorError(
        f"{len(servers)} servers are running: {listed}",
        fix="pass -c CONFIG to choose one, or --admin URL",
    )
