"""The `dualproxy` command: the parser, assembled from one module per command group, and the
one place where a failed command becomes `error: ...` and its exit code.

Exit codes (a contract scripts rely on): 0 ok, 1 the thing checked is wrong (bad config,
unusable key, failed check), 2 usage error (argparse's own code for a bad command line).

Errors go to stderr as `error: FILE: KEY.PATH: problem; what to do`: an `OperatorError`, from
whichever layer found it, is exit 1; a `UsageError` (a command line argparse accepted but the
command cannot use) is exit 2. None of them carries key material: those exceptions are built
not to, and the commands print pins (public) but never a private key.

The groups, in the order `--help` lists their commands: `serve` (serve, status, canary),
`check` (check, route, pins), `rehearse`, `acme`, `manifest`, `reports`, `keys`, `dev`. Each
registers its commands with their handlers; a handler returns the exit code or raises one of
the two errors.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from collections.abc import Callable, Sequence
from typing import Final, NoReturn

import dualproxy
from dualproxy.cli import acme, check, dev, keys, manifest, rehearse, reports, serve
from dualproxy.cli.arguments import EXIT_FAILED, EXIT_OK, EXIT_USAGE, AddCommand, UsageError
from dualproxy.config.errors import OperatorError

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "main"]

# Each group's `register`, in the order `--help` lists the commands.
_GROUPS: Final[tuple[Callable[[AddCommand], None], ...]] = (
    serve.register,
    check.register,
    rehearse.register,
    acme.register,
    manifest.register,
    reports.register,
    keys.register,
    dev.register,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line `argv` (default: sys.argv[1:]); returns the exit code."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except OperatorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse's own error, plus where to look: a missing sub-command otherwise only
        # prints a terse usage line.
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dualproxy",
        description="TLS reverse proxy that keeps pinned apps working across key rotations.",
        epilog="exit codes: 0 ok, 1 the thing checked is wrong, 2 usage error",
    )
    parser.add_argument("--version", action="version", version=f"dualproxy {_version()}")
    commands = parser.add_subparsers(metavar="COMMAND", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = commands.add_parser(
            name, help=help_text, description=help_text
        )
        return sub

    for register in _GROUPS:
        register(command)
    return parser


def _version() -> str:
    """The installed distribution's version (what pip and bug reports name), else the
    package's own (a source tree on PYTHONPATH)."""
    try:
        return importlib.metadata.version("dualproxy")
    except importlib.metadata.PackageNotFoundError:
        return dualproxy.__version__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
