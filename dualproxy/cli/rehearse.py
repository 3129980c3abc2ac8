"""`rehearse`: the configured rotation replayed on compressed time, on loopback, by a
simulated fleet of app versions (dev.rehearse); exit 1 naming each version that must keep
working and failed."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dualproxy.cli.arguments import EXIT_FAILED, EXIT_OK, AddCommand, with_config
from dualproxy.config.errors import OperatorError
from dualproxy.config.loader import load
from dualproxy.dev import bench as dev
from dualproxy.dev import rehearse
from dualproxy.dev.bench import DEFAULT_DIR as DEV_DIR
from dualproxy.serve.clock import utc_now


def register(command: AddCommand) -> None:
    sub = command(
        "rehearse",
        "replay the configured rotation on compressed time against the real server on"
        " loopback, with a simulated fleet of app versions; exit 1 when a version that must"
        " keep working fails",
    )
    with_config(sub)
    sub.add_argument(
        "--fleet",
        type=Path,
        default=None,
        metavar="FILE",
        help=f"the fleet table (default: {rehearse.FLEET_FILE} beside the config)",
    )
    sub.add_argument(
        "--clients",
        type=_clients_argument,
        default=rehearse.DEFAULT_CLIENTS,
        metavar="N",
        help=f"clients per phase, shared by the versions' shares ({rehearse.DEFAULT_CLIENTS})",
    )
    sub.add_argument(
        "--dev",
        action="store_true",
        help="rehearse the dev bench's grace rotation on its keys instead of -c's config",
    )
    sub.add_argument(
        "--dir", type=Path, default=Path(DEV_DIR), help=f"with --dev: the bench's --dir ({DEV_DIR})"
    )
    sub.set_defaults(handler=_cmd_rehearse)


def _clients_argument(text: str) -> int:
    value = int(text)
    if not 1 <= value <= rehearse.MAX_CLIENTS:
        raise argparse.ArgumentTypeError(f"use 1 to {rehearse.MAX_CLIENTS}")
    return value


def _cmd_rehearse(args: argparse.Namespace) -> int:
    # The server's own lines (halts, reloads, one per connection) would drown the table; the
    # level is put back after (an in-process caller keeps its logging).
    logger = logging.getLogger("dualproxy")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        return _rehearse(args)
    finally:
        logger.setLevel(level)


def _rehearse(args: argparse.Namespace) -> int:
    if args.dev:
        now = utc_now()
        try:
            material = dev.prepare(args.dir, now=now)
        except OSError as exc:
            raise OperatorError(
                f"--dir {args.dir}: cannot prepare the dev material: {exc}"
            ) from None
        settings = dev.BenchSettings("127.0.0.1:0", None)
        config = dev.build_config(material, "grace", settings, now)
        fleet_file = args.fleet or Path(rehearse.FLEET_FILE)
    else:
        config = load(args.config, check_files=False)
        fleet_file = args.fleet or args.config.parent / rehearse.FLEET_FILE
    fleet = rehearse.read_fleet(fleet_file, tuple(config.keys))
    print(f"rehearsal of {'the dev bench' if args.dev else args.config} with {fleet_file}:")
    result = rehearse.rehearse(
        config, fleet, clients=args.clients, report=lambda line: print(f"  {line}")
    )
    print("")
    for line in result.table():
        print(line)
    print("")
    for note in result.notes:
        print(note)
    broken = result.broken()
    if broken:
        print("", file=sys.stderr)
        for line in broken:
            print(f"error: version {line} (must keep working)", file=sys.stderr)
        return EXIT_FAILED
    print("every version that must keep working did, in every phase")
    return EXIT_OK
