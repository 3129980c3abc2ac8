"""`dev` (the local pinning test bench: a dev CA, old, new and rogue keys, broken certificates
and scenarios) and `dev switch` (another scenario for a running bench, without a restart)."""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
from functools import partial
from pathlib import Path
from typing import Final

from dualproxy.cli.arguments import EXIT_OK, AddCommand, UsageError, host_argument
from dualproxy.cli.running import run_until_interrupted
from dualproxy.config.errors import OperatorError
from dualproxy.config.names import ListenAddress
from dualproxy.dev import bench as dev
from dualproxy.dev import certs as devcerts
from dualproxy.dev import control as devcontrol
from dualproxy.dev import echo
from dualproxy.dev.bench import DEFAULT_DIR as DEV_DIR
from dualproxy.dev.bench import SCENARIOS as DEV_SCENARIOS
from dualproxy.dev.control import DEFAULT_ADMIN_ADDRESS
from dualproxy.ops.logformat import setup_logging
from dualproxy.serve.clock import utc_now

# Which command-line option a problem in the bench's generated config comes from.
_DEV_OPTIONS: Final = (
    ("listen", "--listen"),
    ("upstream.ca_file", "--upstream-ca"),
    ("upstream", "--upstream"),
    ("rotation.hints.new.networks", "--new-network"),
)


def register(command: AddCommand) -> None:
    dev_cmd = command(
        "dev",
        "local pinning test bench: a dev CA, old, new and rogue keys, broken certificates, and"
        " scenarios you switch live",
    )
    dev_cmd.add_argument(
        "--dir", type=Path, default=Path(DEV_DIR), help=f"where dev material lives ({DEV_DIR})"
    )
    dev_cmd.add_argument("--listen", default="127.0.0.1:8443", help="HOST:PORT to serve on")
    dev_cmd.add_argument(
        "--name", action="append", default=[], metavar="HOST", type=host_argument,
        help="extra name for the certificates, e.g. a LAN IP a phone can reach (repeatable)",
    )  # fmt: skip
    dev_cmd.add_argument(
        "--reset", action="store_true", help="replace the dev CA and keys (only those files)"
    )
    dev_cmd.add_argument(
        "--scenario",
        choices=DEV_SCENARIOS,
        default=dev.DEFAULT_SCENARIO,
        help=f"what to serve at start ({dev.DEFAULT_SCENARIO}); switch later with `dev switch`",
    )
    dev_cmd.add_argument(
        "--upstream",
        metavar="URL",
        help="relay to this API (http:// or https://) instead of the built-in echo upstream",
    )
    dev_cmd.add_argument(
        "--upstream-ca",
        type=Path,
        metavar="FILE",
        help="with an https --upstream: also trust the CA certificates in FILE (PEM), for an"
        " API with a private or test CA",
    )
    dev_cmd.add_argument(
        "--new-network",
        action="append",
        default=[],
        metavar="CIDR",
        help="in the grace scenario, clients from this network get new (repeatable)",
    )
    dev_cmd.add_argument(
        "--admin", type=_admin_argument, default=None, metavar="HOST:PORT",
        help=f"the admin endpoint `dev switch` talks to; loopback only ({DEFAULT_ADMIN_ADDRESS})",
    )  # fmt: skip
    dev_cmd.set_defaults(handler=_cmd_dev)
    dev_actions = dev_cmd.add_subparsers(metavar="ACTION")
    switch = dev_actions.add_parser(
        "switch",
        help="switch a running bench to another scenario, without a restart",
        description="Switch the running bench (found through DIR/admin-address) to SCENARIO: "
        "connections already open keep their key, the next one gets the new scenario.",
    )
    switch.add_argument("scenario", choices=DEV_SCENARIOS, metavar="SCENARIO",
                        help=f"one of: {', '.join(DEV_SCENARIOS)}")  # fmt: skip
    # SUPPRESS: `dualproxy dev --dir X switch S` keeps the X given before the action.
    switch.add_argument(
        "--dir", type=Path, default=argparse.SUPPRESS, help=f"the bench's --dir ({DEV_DIR})"
    )
    switch.add_argument(
        "--admin", type=_admin_argument, default=argparse.SUPPRESS, metavar="HOST:PORT",
        help="the bench's admin endpoint (default: read from DIR/admin-address)",
    )  # fmt: skip
    switch.set_defaults(handler=_cmd_dev_switch)


def _admin_argument(text: str) -> tuple[str, int]:
    try:
        return devcontrol.parse_admin_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cmd_dev(args: argparse.Namespace) -> int:
    if args.upstream_ca is not None and not (args.upstream or "").startswith("https://"):
        raise UsageError(
            "--upstream-ca: trusts an https --upstream's CA; give --upstream https://..."
        )
    setup_logging()
    now = utc_now()
    try:
        material = dev.prepare(args.dir, args.name, reset=args.reset, now=now)
    except OSError as exc:
        raise OperatorError(f"--dir {args.dir}: cannot prepare the dev material: {exc}") from None
    # Bound before the event loop starts: the echo's URL goes into every scenario's config,
    # and a port in use is reported before anything runs.
    with contextlib.ExitStack() as sockets:
        if args.upstream is None:
            echo_socket = sockets.enter_context(echo.open_socket())
            upstream = f"http://127.0.0.1:{echo_socket.getsockname()[1]}"
        else:
            echo_socket, upstream = None, args.upstream
        settings = dev.BenchSettings(
            args.listen, upstream, tuple(args.new_network), upstream_ca=args.upstream_ca
        )
        try:
            bench = dev.Bench(material, settings, args.scenario, command=_command_name(), now=now)
        except OperatorError as exc:
            for prefix, option in _DEV_OPTIONS:
                if exc.key_path.startswith(prefix):
                    raise UsageError(f"{option}: {exc.message}") from None
            raise
        try:
            admin = args.admin or devcontrol.parse_admin_address(DEFAULT_ADMIN_ADDRESS)
            admin_socket = sockets.enter_context(devcontrol.open_socket(*admin))
        except OSError as exc:
            where = str(ListenAddress(*admin))
            raise OperatorError(
                f"--admin: cannot listen on {where}: {exc.strerror}",
                fix="is another bench running? Stop it, or pick another port with --admin"
                " 127.0.0.1:PORT",
            ) from None
        code = run_until_interrupted(partial(bench.run, admin_socket, echo_socket))
    with contextlib.suppress(OSError):  # the terminal may be gone (SIGHUP)
        print("\nstopped", flush=True)
    return code


def _cmd_dev_switch(args: argparse.Namespace) -> int:
    folder: Path = getattr(args, "dir", Path(DEV_DIR))
    try:
        address = args.admin or devcontrol.read_address_file(folder / devcerts.ADMIN_ADDRESS_FILE)
        previous = devcontrol.get_scenario(address)
        text = devcontrol.switch(address, args.scenario)
    except devcontrol.ControlError as exc:
        raise OperatorError(str(exc)) from None
    print(f"switched to {args.scenario} (was {previous}); the next connection gets it")
    print(text)
    return EXIT_OK


def _command_name() -> str:
    """How the user runs this command, for the commands we print: `dualproxy` when that is on
    PATH and is us, otherwise the path it was started by (`.venv/bin/dualproxy`)."""
    script = Path(sys.argv[0])
    if script.name != "dualproxy":
        return f"{Path(sys.executable).name} -m dualproxy"
    found = shutil.which("dualproxy")
    if found is not None and Path(found).resolve() == script.resolve():
        return "dualproxy"
    try:
        return str(script.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(script.absolute())
