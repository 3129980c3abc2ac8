"""What the command groups share: the exit codes, `UsageError`, the options several commands
take (-c/--config, --at) and the argparse types more than one group uses.

An argument type checks a value where it is typed: its ValueError or ArgumentTypeError is a
usage error, which argparse reports with the usage line (exit 2).
"""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Final

from dualproxy.config.names import host_name_problem, key_name_problem, normalize_host
from dualproxy.config.schema import DEFAULT_CONFIG_FILE
from dualproxy.config.times import parse_time

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "AddCommand",
    "UsageError",
    "host_argument",
    "key_name_argument",
    "time_argument",
    "with_config",
    "with_time",
]

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1  # the thing checked is wrong: an OperatorError, a failed check
EXIT_USAGE: Final = 2  # argparse's own code for a bad command line

# How a command group adds one command: (name, help) -> its parser.
AddCommand = Callable[[str, str], argparse.ArgumentParser]


class UsageError(Exception):
    """A command line that argparse accepted but the command cannot use (an `--admin` address
    off loopback, a `--listen` the dev bench cannot serve): `error: message`, exit 2.

    Not an OperatorError: the fix is another command line, not a file or a config value, and
    scripts tell the two apart by the exit code (2, as argparse's own usage errors).
    """


def with_config(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "-c",
        "--config",
        type=Path,
        default=Path(DEFAULT_CONFIG_FILE),
        help=f"config file (default: ./{DEFAULT_CONFIG_FILE})",
    )


def with_time(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--at",
        type=time_argument,
        default=None,
        metavar="TIME",
        help="evaluate at this instant instead of now (e.g. 2026-12-15T00:00:00Z)",
    )


def time_argument(text: str) -> datetime:
    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def key_name_argument(text: str) -> str:
    # The rule of [keys.NAME] tables: a key made here can be named in the config, and a name
    # such as "../x" cannot leave --dir.
    if (problem := key_name_problem(text)) is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def host_argument(text: str) -> str:
    """A name a certificate can carry: a DNS name (a leading "*." allowed) or an IP address."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if (problem := host_name_problem(text)) is not None:
        raise argparse.ArgumentTypeError(f"{problem}, nor an IP address")
    return normalize_host(text)
