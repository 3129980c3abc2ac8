"""The `dualproxy` command.

Exit codes (a contract scripts rely on): 0 ok, 1 the thing checked is wrong (bad config,
unusable key, failed check), 2 usage error (argparse's own code for a bad command line).

Errors go to stderr as `error: FILE: KEY.PATH: problem; what to do`, the shape `ConfigError`
and `KeyStoreError` already have. None of them carries key material: those exceptions are
built not to, and this module prints pins (public) but never a private key.

Long-running commands (`serve`, `dev`) take Ctrl-C as a request to stop: SIGINT cancels the
server's nursery, so connections are torn down by trio and the process exits 0 without a
KeyboardInterrupt traceback.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ipaddress
import json
import logging
import shutil
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Final, NoReturn, TextIO, TypeVar

import trio
from cryptography.hazmat.primitives import serialization

from dualproxy.acme import challenges, renewal
from dualproxy.config.errors import ConfigError
from dualproxy.config.loader import load
from dualproxy.config.names import (
    ListenAddress,
    admin_address_problem,
    host_name_problem,
    key_name_problem,
    normalize_host,
    parse_address,
)
from dualproxy.config.schema import DEFAULT_CONFIG_FILE, Config, KeyConfig, Role
from dualproxy.config.times import parse_time
from dualproxy.dev import bench as dev
from dualproxy.dev import certs as devcerts
from dualproxy.dev import control as devcontrol
from dualproxy.dev import echo
from dualproxy.dev.bench import DEFAULT_DIR as DEV_DIR
from dualproxy.dev.bench import SCENARIOS as DEV_SCENARIOS
from dualproxy.dev.control import DEFAULT_ADMIN_ADDRESS
from dualproxy.files import write_atomically
from dualproxy.ops import admin
from dualproxy.ops.logformat import setup_logging
from dualproxy.pinning import endpoints, manifest, reports
from dualproxy.rotation import checks, policy
from dualproxy.serve.clock import utc_now
from dualproxy.serve.listeners import raise_open_file_limit
from dualproxy.serve.server import Server
from dualproxy.tls import keystore, pins
from dualproxy.tls.clienthello import ClientHello
from dualproxy.tls.keystore import KeySnapshot, KeyStoreError

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2

# What `dualproxy route` pretends the client sent besides the given SNI and ALPN: a current
# browser's TLS 1.3 ClientHello (Chrome's cipher suites, signature schemes and groups), so that
# with an ECDSA and an RSA key the key named is the one such a client gets.
_ROUTE_CIPHERS: Final = (0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F, 0xC02C, 0xC030, 0xCCA9, 0xCCA8)
_ROUTE_SIGALGS: Final = (0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601)
_ROUTE_VERSIONS: Final = (0x0304, 0x0303)
_ROUTE_GROUPS: Final = (0x001D, 0x0017, 0x0018)


KEY_TYPES: Final = ("ecdsa-p256", "rsa-2048")

_R = TypeVar("_R")


class CommandError(Exception):
    """Stop the command: print `error: message` and exit with `code`."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


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
    except (ConfigError, KeyStoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except CommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code


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
    commands = parser.add_subparsers(metavar="COMMAND", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = commands.add_parser(
            name, help=help_text, description=help_text
        )
        return sub

    def with_config(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "-c",
            "--config",
            type=Path,
            default=Path(DEFAULT_CONFIG_FILE),
            help=f"config file (default: ./{DEFAULT_CONFIG_FILE})",
        )

    def with_admin_url(sub: argparse.ArgumentParser) -> None:
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

    def with_time(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--at",
            type=_time_argument,
            default=None,
            metavar="TIME",
            help="evaluate at this instant instead of now (e.g. 2026-12-15T00:00:00Z)",
        )

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
    with_admin_url(status)
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
    with_admin_url(resume)
    resume.set_defaults(handler=_cmd_canary_resume)

    check = command("check", "validate config, keys and chains; show the rotation timeline")
    with_config(check)
    with_time(check)
    check.set_defaults(handler=_cmd_check)

    route = command("route", "dry run: which key a client would get, and why")
    with_config(route)
    with_time(route)
    route.add_argument("--sni", metavar="NAME", help="server name the client sends")
    route.add_argument(
        "--alpn", action="extend", nargs="+", default=[], metavar="PROTOCOL",
        help="ALPN tokens the client offers (several, or the flag repeated)",
    )  # fmt: skip
    route.add_argument(
        "--client", type=_ip_argument, metavar="IP", help="client IP address (for network hints)"
    )
    route.set_defaults(handler=_cmd_route)

    pins_cmd = command("pins", "pins of every configured key, for apps and curl")
    with_config(pins_cmd)
    with_time(pins_cmd)
    pins_cmd.add_argument(
        "--format",
        choices=pins.FORMATS,
        default=None,
        help="output for a platform (default: a table); curl's works as --pinnedpubkey as-is",
    )
    pins_cmd.set_defaults(handler=_cmd_pins)

    acme_cmd = command("acme", "certificates for our own keys from an ACME CA ([acme] table)")
    acme_sub = acme_cmd.add_subparsers(metavar="ACTION", required=True)
    issue = acme_sub.add_parser(
        "issue",
        help="get a certificate for KEY now (same key: its pin does not change)",
        description="Get a certificate for an ACME-managed key from the [acme] CA and write"
        " its chain file atomically. A running `serve` answers the challenges and picks the"
        " chain up; without one, this command answers them on the configured ports.",
    )
    issue.add_argument("key", type=_key_name_argument, help="key name ([keys.NAME] with names)")
    with_config(issue)
    issue.set_defaults(handler=_cmd_acme_issue)
    renew = acme_sub.add_parser(
        "renew",
        help="renew every ACME-managed key whose certificate is due",
        description="Renew every ACME-managed key whose certificate is due (ACME Renewal"
        " Information when the CA offers it, else two thirds of the lifetime; a rotation's new"
        " key ahead of its window). For a cron job; `serve` also renews by itself.",
    )
    renew.add_argument("--force", action="store_true", help="renew every ACME-managed key now")
    with_config(renew)
    renew.set_defaults(handler=_cmd_acme_renew)

    manifest_cmd = command(
        "manifest", "the signed pin manifest apps fetch from manifest.path ([manifest] table)"
    )
    manifest_sub = manifest_cmd.add_subparsers(metavar="ACTION", required=True)
    keygen = manifest_sub.add_parser(
        "keygen",
        help="make an Ed25519 signing key (mode 0600) and its public key (FILE.pub.pem)",
        description="Make an Ed25519 manifest signing key, separate from every TLS key (keep"
        " it offline if you can), and write its public key next to it as NAME.pub.pem: that"
        " is what apps ship to verify the manifest.",
    )
    keygen.add_argument("--out", type=Path, required=True, metavar="FILE", help="key file")
    keygen.add_argument(
        "--force", action="store_true", help="replace an existing key (apps may ship its pair)"
    )
    keygen.set_defaults(handler=_cmd_manifest_keygen)
    sign = manifest_sub.add_parser(
        "sign",
        help="sign the pins of the configured keys into manifest.file",
        description="Write manifest.file: the pins of the keys the rotation names (and"
        " standby keys) with their roles, the window, issued-at and expires-at, signed as a"
        " JWS (EdDSA). A running serve serves the new file from its next poll on.",
    )
    with_config(sign)
    sign.add_argument("--key", type=Path, required=True, metavar="FILE", help="signing key")
    sign.add_argument(
        "--valid-for", type=_validity_argument, default=manifest.DEFAULT_VALIDITY,
        metavar="DURATION", help="how long apps may trust it: 7d (default), 36h, 90m",
    )  # fmt: skip
    sign.set_defaults(handler=_cmd_manifest_sign)
    verify = manifest_sub.add_parser(
        "verify",
        help="check a manifest as an app does (signature, expiry; with -c, the served pin)",
        description="Check FILE as an app should: the EdDSA signature with the public key, and"
        " that it has not expired; with -c, also that the pin of every key served now is"
        " listed.",
    )
    verify.add_argument("file", type=Path, metavar="FILE", help="the signed manifest")
    verify.add_argument(
        "--public-key", type=Path, required=True, metavar="PUB", help="the .pub.pem keygen wrote"
    )
    verify.add_argument("-c", "--config", type=Path, default=None, help="check against it")
    with_time(verify)
    verify.set_defaults(handler=_cmd_manifest_verify)

    reports_cmd = command("reports", "pin-failure reports received at reports.path")
    reports_sub = reports_cmd.add_subparsers(metavar="ACTION", required=True)
    summary = reports_sub.add_parser(
        "summary",
        help="count the stored reports by app version and known pins",
        description="Count the reports in reports.store by app version and by the pins the"
        " app knows: which app versions still only know the old pin.",
    )
    with_config(summary)
    summary.add_argument("--json", action="store_true", help="the summary as JSON")
    summary.set_defaults(handler=_cmd_reports_summary)

    keys_cmd = command("keys", "make keys and certificate signing requests")
    keys_sub = keys_cmd.add_subparsers(metavar="ACTION", required=True)
    new = keys_sub.add_parser(
        "new",
        help="generate a private key (mode 0600) and print its pin",
        description="Generate a private key (mode 0600, never overwriting) and print its pin.",
    )
    new.add_argument("name", type=_key_name_argument, help="key name, e.g. k2027a")
    new.add_argument("--type", choices=KEY_TYPES, default="ecdsa-p256", help="key type")
    new.add_argument("--dir", type=Path, default=Path("certs"), help="key store folder")
    new.set_defaults(handler=_cmd_keys_new)
    csr = keys_sub.add_parser(
        "csr",
        help="a CSR for an existing key (for any ACME client)",
        description="Write a certificate signing request for an existing key.",
    )
    csr.add_argument("name", type=_key_name_argument, help="key name")
    csr.add_argument(
        "--name", dest="hostnames", action="append", required=True, metavar="HOST",
        type=_host_argument, help="name to request (repeatable); the first is the subject CN",
    )  # fmt: skip
    csr.add_argument("--dir", type=Path, default=Path("certs"), help="key store folder")
    csr.add_argument("--out", type=Path, help="CSR file (default: DIR/NAME/csr.pem; - for stdout)")
    csr.set_defaults(handler=_cmd_keys_csr)

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
        "--name", action="append", default=[], metavar="HOST", type=_host_argument,
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
    return parser


# --- argument types (a ValueError or ArgumentTypeError here is a usage error, exit 2) -----


def _time_argument(text: str) -> datetime:
    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _validity_argument(text: str) -> timedelta:
    try:
        valid_for = manifest.parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    low, high = manifest.MIN_VALIDITY, manifest.MAX_VALIDITY
    if not low <= valid_for <= high:
        raise argparse.ArgumentTypeError(f"{text!r}: use {low} to {high}")
    return valid_for


def _ip_argument(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None


def _key_name_argument(text: str) -> str:
    # The rule of [keys.NAME] tables: a key made here can be named in the config, and a name
    # such as "../x" cannot leave --dir.
    if (problem := key_name_problem(text)) is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def _host_argument(text: str) -> str:
    """A name a certificate can carry: a DNS name (a leading "*." allowed) or an IP address."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if (problem := host_name_problem(text)) is not None:
        raise argparse.ArgumentTypeError(f"{problem}, nor an IP address")
    return normalize_host(text)


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


def _admin_argument(text: str) -> tuple[str, int]:
    try:
        return devcontrol.parse_admin_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _load(args: argparse.Namespace) -> tuple[Config, KeySnapshot]:
    config = load(args.config)
    return config, keystore.load_snapshot(config)


# --- serve -------------------------------------------------------------------------------


def _cmd_serve(args: argparse.Namespace) -> int:
    setup_logging(args.log_format)
    config = load(args.config)
    admin_address = config.admin.address
    if args.admin is not None:
        admin_address = args.admin
        allow = config.admin.allow_non_loopback
        if (problem := admin_address_problem(admin_address, allow_non_loopback=allow)) is not None:
            raise CommandError(f"--admin: {problem}", EXIT_USAGE)
    missing = [key for key in config.acme_keys() if not key.chain.exists()]
    if missing:
        # Obtained before serving: the key store serves only keys that have a chain.
        names = ", ".join(key.name for key in missing)
        logging.getLogger("dualproxy").info("acme: no chain yet for %s; obtaining it", names)
        _issue_or_fail(config, missing)
    server = Server(config)  # loads the keys: an unusable one stops us here, exit 1
    raise_open_file_limit(config.limits.max_connections)
    with contextlib.ExitStack() as sockets:
        admin_socket = None
        if admin_address is not None:
            try:
                admin_socket = sockets.enter_context(admin.open_socket(admin_address))
            except OSError as exc:
                raise CommandError(f"{config.path}: {exc.strerror}") from None
        code = _run_until_interrupted(partial(_serve, server, admin_socket))
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
        raise CommandError(str(exc)) from None
    sys.stdout.write(data.decode("utf-8", "replace"))
    return EXIT_OK


def _cmd_canary_resume(args: argparse.Namespace) -> int:
    try:
        text = admin.resume_canary(_admin_address(args))
    except admin.AdminError as exc:
        raise CommandError(str(exc)) from None
    print(text)
    return EXIT_OK


LOG_FORMATS: Final = ("text", "json")


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
        raise CommandError(
            f"{path}: admin: the admin listener is off ([admin] enabled = false); enable it,"
            " or pass --admin URL"
        )
    # A listener on every interface (admin.allow_non_loopback) answers on loopback too.
    return challenges.probe_address(listen)


def _run_until_interrupted(body: Callable[[], Awaitable[None]]) -> int:
    """trio.run(body) until it returns or Ctrl-C; an OSError (a port in use) is exit 1."""
    failed = False
    try:
        trio.run(_cancel_on_sigint, body)
    except* KeyboardInterrupt:
        pass  # Ctrl-C before the handler below was in place: stopping is all it asks for
    except* OSError as group:
        for exc in _leaves(group):
            print(f"error: {exc}", file=sys.stderr)
        failed = True
    return EXIT_FAILED if failed else EXIT_OK


async def _cancel_on_sigint(body: Callable[[], Awaitable[None]]) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(_watch_sigint, nursery.cancel_scope)
        await body()
        nursery.cancel_scope.cancel()  # body ended by itself (SIGTERM): stop watching


async def _watch_sigint(
    scope: trio.CancelScope, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    with trio.open_signal_receiver(signal.SIGINT) as signals:
        task_status.started()
        async for _ in signals:
            scope.cancel()
            return


def _leaves(group: BaseExceptionGroup[OSError]) -> list[OSError]:
    out: list[OSError] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            out += _leaves(exc)
        else:
            out.append(exc)
    return out


# --- acme --------------------------------------------------------------------------------
# The acme module (and with it the acme library, requests and pyOpenSSL: a third of a second
# to import) loads only for the commands that use it.


def _issue_or_fail(config: Config, keys: list[KeyConfig]) -> None:
    from dualproxy.acme import issuer as acme

    results = _run_acme(partial(acme.issue_keys, config, keys))
    failed = [(name, error) for name, error in results if error is not None]
    for name, error in results:
        if error is None:
            key = config.keys[name]
            print(f"{name}: new certificate written to {key.chain}")
    for name, error in failed:
        print(f"error: {name}: {error}", file=sys.stderr)
    if failed:
        raise CommandError(f"{len(failed)} of {len(results)} certificate(s) not obtained")


def _run_acme(body: Callable[[], Awaitable[_R]]) -> _R:
    from dualproxy.acme import issuer as acme

    try:
        return trio.run(body)
    except OSError as exc:  # binding the challenge port
        raise CommandError(f"{exc}") from None
    except acme.AcmeError as exc:
        raise CommandError(str(exc)) from None


def _cmd_acme_issue(args: argparse.Namespace) -> int:
    from dualproxy.acme import issuer as acme

    setup_logging(level=logging.WARNING)
    config = load(args.config)
    try:
        key = acme.managed_key(config, args.key)
    except acme.AcmeError as exc:
        raise CommandError(str(exc)) from None
    _issue_or_fail(config, [key])
    _print_pin(config, key)
    return EXIT_OK


def _print_pin(config: Config, key: KeyConfig) -> None:
    loaded = keystore.load_key(key, config.keystore)
    print(f"  pin sha256/{loaded.pin} (unchanged: same key)")
    print(f"  valid until {loaded.not_after:%Y-%m-%d %H:%M} UTC, names {', '.join(loaded.names)}")


def _cmd_acme_renew(args: argparse.Namespace) -> int:
    from dualproxy.acme import issuer as acme

    setup_logging(level=logging.WARNING)
    config = load(args.config)
    if config.acme is None:
        raise CommandError(f"{config.path}: acme: no [acme] table; add one (see config.toml)")
    now = utc_now()
    plans = _run_acme(partial(acme.due_keys, config, now, force=args.force))
    due = [key for key, plan in plans if plan.attempt_now(now)]
    for key, plan in plans:
        if plan.urgency in (renewal.Urgency.SOON, renewal.Urgency.EXPIRED):
            print(f"warning: {key.name}: the certificate {plan.urgency}", file=sys.stderr)
        if not plan.attempt_now(now):
            print(f"{key.name}: not due until {plan.due:%Y-%m-%d %H:%M} UTC ({plan.reason})")
    if due:
        _issue_or_fail(config, due)
    return EXIT_OK


# --- check -------------------------------------------------------------------------------


def _cmd_check(args: argparse.Namespace) -> int:
    config = load(args.config)
    at = args.at or utc_now()
    out = sys.stdout
    missing = [key.name for key in config.acme_keys() if not key.chain.exists()]
    if missing:
        # Nothing can be served before those exist: report what can be checked, and fail.
        print(f"config: {config.path} (ok)", file=out)
        for finding in checks.check_acme(config, {}, missing):
            stream = sys.stderr if finding.level == "error" else out
            print(f"{finding.level}: {finding}", file=stream)
        print(f"check failed: {len(missing)} key(s) without a certificate", file=sys.stderr)
        return EXIT_FAILED
    snapshot = keystore.load_snapshot(config)
    print(f"config: {config.path} (ok)", file=out)
    for warning in snapshot.warnings:
        print(f"warning: {warning}", file=out)
    print(f"\nkeys (at {at:%Y-%m-%d %H:%M} UTC):", file=out)
    for key in snapshot.keys.values():
        role = policy.pin_role(config.rotation, key.name, at)
        print(f"  {key.name} [{role}]", file=out)
        print(f"    algorithm  {key.algorithm}", file=out)
        print(f"    pin        sha256/{key.pin}", file=out)
        print(f"    names      {', '.join(key.names) or '(none)'}", file=out)
        valid = f"{key.not_before:%Y-%m-%d %H:%M} .. {key.not_after:%Y-%m-%d %H:%M} UTC"
        print(f"    valid      {valid}", file=out)
        print(f"    chain      {key.chain_file}", file=out)
    print("", file=out)
    _print_timeline(config, at, "now" if args.at is None else "at", out)
    findings = checks.check_keys(config, snapshot.keys, at)
    findings += checks.check_acme(config, snapshot.keys, [])
    if findings:
        print("", file=out)
    for finding in findings:
        # Errors also reach a CI log that discards the report on stdout.
        stream = sys.stderr if finding.level == "error" else out
        print(f"{finding.level}: {finding}", file=stream)
    errors = sum(f.level == "error" for f in findings)
    if errors:
        print(f"check failed: {errors} error(s)", file=sys.stderr)
        return EXIT_FAILED
    warnings = len(findings) + len(snapshot.warnings)
    print(f"\ncheck passed{f' with {warnings} warning(s)' if warnings else ''}", file=out)
    return EXIT_OK


def _print_timeline(config: Config, at: datetime, marker: str, out: TextIO) -> None:
    rotation = config.rotation
    if rotation is None:
        print(f"rotation: none; every client gets {', '.join(config.keys)}", file=out)
        return
    phase = policy.phase(rotation, at)
    mark = {p: (f"   <- {marker}" if p == phase else "") for p in ("before", "during", "after")}
    hints = []
    for role in ("new", "old"):
        h = rotation.hints_for(role)
        parts = [*h.sni, *(a.decode() for a in h.alpn), *(str(n) for n in h.networks)]
        if parts:
            hints.append(f"{role} for {', '.join(parts)}")
    during = "; ".join(hints) or "no hints"
    during += f"; others get {rotation.default}"
    if rotation.canary_percent:
        during += f" (canary: {rotation.canary_percent:g}% of them get new)"
    start, end = (f"{t:%Y-%m-%d %H:%M}Z" for t in (rotation.grace_start, rotation.grace_end))
    old, new = ", ".join(rotation.old), ", ".join(rotation.new)
    print("rotation timeline:", file=out)
    print(f"  until {start}  everyone gets old ({old}){mark['before']}", file=out)
    print(f"  {start} .. {end}  grace window: {during}{mark['during']}", file=out)
    print(f"  from {end}  everyone gets new ({new}){mark['after']}", file=out)


# --- route -------------------------------------------------------------------------------


def _cmd_route(args: argparse.Namespace) -> int:
    config, snapshot = _load(args)
    at = args.at or utc_now()
    hello = ClientHello(
        legacy_version=0x0303,
        cipher_suites=_ROUTE_CIPHERS,
        sni=args.sni,
        alpn=tuple(a.encode() for a in args.alpn),
        signature_algorithms=_ROUTE_SIGALGS,
        supported_versions=_ROUTE_VERSIONS,
        supported_groups=_ROUTE_GROUPS,
    )
    choice = policy.choose(config.rotation, hello, args.client, at)
    identity = snapshot.identities[choice.identity]
    key = identity.presented_key(hello)
    print(f"key:      {key.name} ({key.algorithm}, sha256/{key.pin})")
    others = [k for k in identity.keys if k is not key]
    for other in others:
        print(f"          {other.name} ({other.algorithm}) for clients that cannot take it")
    print(f"identity: {choice.identity}")
    print(f"reason:   {choice.reason}")
    print(f"why:      {_explain(config, choice, args, at)}")
    print(f"phase:    {policy.phase(config.rotation, at)} (at {at:%Y-%m-%d %H:%M:%S} UTC)")
    return EXIT_OK


def _explain(config: Config, choice: policy.Choice, args: argparse.Namespace, at: datetime) -> str:
    """The rule of policy.choose that decided, in the config's own terms."""
    rotation = config.rotation
    reason = choice.reason
    if rotation is None or reason is policy.Reason.SINGLE:
        return "no [rotation] in the config: every client gets the configured keys"
    role: Role = "new" if choice.identity == "new" else "old"
    start, end = (f"{t:%Y-%m-%d %H:%M}Z" for t in (rotation.grace_start, rotation.grace_end))
    if reason is policy.Reason.BEFORE_WINDOW:
        return f"before rotation.grace_start ({start}) everyone gets old"
    if reason is policy.Reason.AFTER_WINDOW:
        return f"from rotation.grace_end ({end}) on everyone gets new"
    if reason is policy.Reason.HINT_SNI:
        pattern = next(p for p in rotation.hints_for(role).sni if policy.sni_matches(p, args.sni))
        return f"SNI {args.sni} matches {pattern!r} in rotation.hints.{role}.sni"
    if reason is policy.Reason.HINT_ALPN:
        hinted = {a.decode() for a in rotation.hints_for(role).alpn}
        token = next(a for a in args.alpn if a in hinted)
        return f"ALPN {token} is in rotation.hints.{role}.alpn"
    if reason is policy.Reason.HINT_NETWORK:
        return f"client {args.client} is in rotation.hints.{role}.networks"
    if reason is policy.Reason.CANARY:
        bucket = policy.canary_bucket(args.client)
        return (
            f"no hint matched and client {args.client} is in the canary (bucket {bucket:.2f}"
            f" < rotation.canary_percent = {rotation.canary_percent:g})"
        )
    hints = "no hint matched" + ("" if args.client else " (no --client given)")
    return f"{hints}: rotation.default = {rotation.default!r}"


# --- pins --------------------------------------------------------------------------------


def _pinned_keys(config: Config, snapshot: KeySnapshot, at: datetime) -> list[pins.PinnedKey]:
    """Every configured key with its role at `at`: the rotation's old, then new, then the rest.
    ValueError for a certificate name no pin format can carry."""
    return [
        pins.PinnedKey(
            name=name,
            role=policy.pin_role(config.rotation, name, at),
            pin=key.pin,
            algorithm=key.algorithm,
            # Mobile pin formats take host names; an IP address SAN is no domain to pin.
            hostnames=tuple(n for n in key.names if not dev.is_ip(n)),
            not_after=key.not_after,
        )
        for name in config.key_order()
        for key in [snapshot.keys[name]]
    ]


def _cmd_pins(args: argparse.Namespace) -> int:
    config, snapshot = _load(args)
    at = args.at or utc_now()
    try:
        pinned = _pinned_keys(config, snapshot, at)
        rendered = None if args.format is None else pins.render(pinned, args.format)
    except ValueError as exc:  # no keys, or a certificate name no pin format can carry
        raise CommandError(f"{config.path}: keys: cannot render pins: {exc}") from None
    if rendered is not None:
        print(rendered)
        return EXIT_OK
    for p in pinned:
        expires = f"{p.not_after:%Y-%m-%d}" if p.not_after else "-"
        print(f"{p.name:<16} {p.role:<9} {p.algorithm:<12} until {expires}  sha256/{p.pin}")
    return EXIT_OK


# --- manifest ----------------------------------------------------------------------------


def _cmd_manifest_keygen(args: argparse.Namespace) -> int:
    try:
        key = manifest.write_signing_key(args.out, force=args.force)
    except manifest.ManifestError as exc:
        raise CommandError(str(exc)) from None
    public = key.public_key()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    print(f"wrote {args.out} (Ed25519, mode 0600) and {manifest.public_key_file(args.out)}")
    print(f"kid:        {manifest.public_key_thumbprint(public)}")
    print(f"public key: {base64.b64encode(raw).decode()}  (raw 32 bytes, base64: ship it in apps)")
    print("keep the private key offline if you can; sign with:")
    print(f"  dualproxy manifest sign --key {args.out}")
    return EXIT_OK


def _cmd_manifest_sign(args: argparse.Namespace) -> int:
    config, snapshot = _load(args)
    if config.manifest is None:
        raise CommandError(
            f"{config.path}: manifest: no [manifest] table; add one (see config.toml)"
        )
    try:
        key = manifest.read_signing_key(args.key)
    except manifest.ManifestError as exc:
        raise CommandError(str(exc)) from None
    now = utc_now()
    try:
        payload = manifest.build_payload(
            _pinned_keys(config, snapshot, now),
            config.rotation,
            issued_at=now,
            valid_for=args.valid_for,
        )
    except ValueError as exc:
        raise CommandError(f"{config.path}: keys: cannot sign a manifest: {exc}") from None
    token = manifest.sign(payload, key)
    out = config.manifest.file
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(out, token.encode("ascii") + b"\n", mode=0o644)
    except OSError as exc:
        raise CommandError(f"{out}: cannot write the manifest: {exc.strerror}") from None
    signed = manifest.peek(token)
    print(f"wrote {out}: {len(signed.pins)} pin(s), expires {signed.expires_at:%Y-%m-%d %H:%M} UTC")
    for pin in signed.pins:
        print(f"  {pin.key:<16} {pin.role:<9} sha256/{pin.pin}")
    rotation = config.rotation
    if rotation is not None:
        for name, moment in (
            ("grace_start", rotation.grace_start),
            ("grace_end", rotation.grace_end),
        ):
            if now < moment < signed.expires_at:
                print(
                    f"note: rotation.{name} ({moment:%Y-%m-%d %H:%M} UTC) falls within its"
                    " validity: the roles change then; sign again after it"
                )
    return EXIT_OK


def _cmd_manifest_verify(args: argparse.Namespace) -> int:
    at = args.at or utc_now()
    try:
        public_key = manifest.read_public_key(args.public_key)
        token = args.file.read_bytes()
    except manifest.ManifestError as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:
        raise CommandError(f"{args.file}: cannot read the manifest: {exc.strerror}") from None
    try:
        verified = manifest.verify(token, public_key, now=at)
    except manifest.ManifestError as exc:
        raise CommandError(f"{args.file}: not trusted: {exc.problem}") from None
    print(f"{args.file}: signature ok (kid {verified.kid or '-'})")
    print(f"  issued   {verified.issued_at:%Y-%m-%d %H:%M:%S} UTC")
    print(f"  expires  {verified.expires_at:%Y-%m-%d %H:%M:%S} UTC")
    print(f"  hosts    {', '.join(verified.hosts) or '(none)'}")
    for pin in verified.pins:
        print(f"  {pin.key:<16} {pin.role:<9} sha256/{pin.pin}")
    if args.config is None:
        return EXIT_OK
    config, snapshot = _load(args)
    listed = verified.pin_values()
    missing = [
        name
        for name in manifest.served_key_names(config, at)
        if snapshot.keys[name].pin not in listed
    ]
    for name in missing:
        print(
            f"error: key {name} (sha256/{snapshot.keys[name].pin}) is served now but not in"
            " the manifest: apps that trust only the manifest would refuse it; sign it again",
            file=sys.stderr,
        )
    if missing:
        return EXIT_FAILED
    print(f"  every key {config.path} serves now is listed")
    return EXIT_OK


# --- reports -----------------------------------------------------------------------------


def _cmd_reports_summary(args: argparse.Namespace) -> int:
    config = load(args.config)
    if config.reports is None:
        raise CommandError(f"{config.path}: reports: no [reports] table; add one (see config.toml)")
    settings = config.reports
    labels: dict[str, str] = {}
    try:
        snapshot = keystore.load_snapshot(config)
    except KeyStoreError:
        pass  # the counts do not need the keys, only their names for the pins
    else:
        labels = endpoints.pin_labels(snapshot.keys.values(), config.rotation, utc_now())
    # As a serve starts from its store (the rate limiter it also makes is not used here).
    data = reports.summary(endpoints.ReportsState(settings).counts, labels)
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    print(f"{data['total']} report(s) in {settings.store}, last {data['last_seen'] or '-'}")
    for entry in data["by_app_version"]:
        app = f"{entry['app']} {entry['version']}".strip() or "(no app: RFC 7469)"
        known = "; ".join(
            ", ".join(labels.get(pin, pin[:12] + "...") for pin in pin_set)
            for pin_set in entry["known_pins"]
        )
        print(f"  {entry['count']:>6}  {app} {entry['platform']}  knows: {known}")
    return EXIT_OK


# --- keys --------------------------------------------------------------------------------


def _cmd_keys_new(args: argparse.Namespace) -> int:
    path = args.dir / args.name / "key.pem"
    key = keystore.generate_private_key(args.type)
    # Refuses an existing file (O_EXCL): the pin of a key may already ship in apps.
    keystore.write_private_key(path, key)
    public_key = key.public_key()
    print(f"wrote {path} ({pins.describe_key_algorithm(public_key)}, mode 0600)")
    print(f"pin: sha256/{pins.spki_pin(public_key)}")
    print("next: publish this pin in your app as a backup pin now, then get a certificate:")
    print(f"  dualproxy keys csr {args.name} --name api.example.com --dir {args.dir}")
    return EXIT_OK


def _cmd_keys_csr(args: argparse.Namespace) -> int:
    key_path = args.dir / args.name / "key.pem"
    if not key_path.exists() and not key_path.is_symlink():
        raise CommandError(
            f"{key_path}: no such key; make it first with"
            f" `dualproxy keys new {args.name} --dir {args.dir}`, or pass the --dir it is in"
        )
    key = keystore.read_private_key(key_path)
    csr = keystore.make_csr(key, args.hostnames)
    pem = csr.public_bytes(serialization.Encoding.PEM)
    pin = pins.spki_pin(key.public_key())
    if args.out is not None and str(args.out) == "-":
        sys.stdout.write(pem.decode("ascii"))
        return EXIT_OK
    out = args.out or args.dir / args.name / "csr.pem"
    try:
        out.write_bytes(pem)
    except OSError as exc:
        raise CommandError(f"{out}: cannot write the CSR: {exc.strerror}; pick --out") from None
    print(f"wrote {out} for {', '.join(args.hostnames)}")
    print(f"pin: sha256/{pin} (unchanged: same key)")
    print("get it signed by any ACME client, e.g.:")
    print(
        f"  certbot certonly --csr {out} --fullchain-path {args.dir / args.name / 'chain.pem'}"
        " --standalone"
    )
    return EXIT_OK


# --- dev ---------------------------------------------------------------------------------


def _cmd_dev(args: argparse.Namespace) -> int:
    setup_logging()
    now = utc_now()
    try:
        material = dev.prepare(args.dir, args.name, reset=args.reset, now=now)
    except OSError as exc:
        raise CommandError(f"--dir {args.dir}: cannot prepare the dev material: {exc}") from None
    # Bound before the event loop starts: the echo's URL goes into every scenario's config,
    # and a port in use is reported before anything runs.
    with contextlib.ExitStack() as sockets:
        if args.upstream is None:
            echo_socket = sockets.enter_context(echo.open_socket())
            upstream = f"http://127.0.0.1:{echo_socket.getsockname()[1]}"
        else:
            echo_socket, upstream = None, args.upstream
        settings = dev.BenchSettings(args.listen, upstream, tuple(args.new_network))
        try:
            bench = dev.Bench(material, settings, args.scenario, command=_command_name(), now=now)
        except ConfigError as exc:
            for prefix, option in _DEV_OPTIONS:
                if exc.key_path.startswith(prefix):
                    raise CommandError(f"{option}: {exc.problem}", EXIT_USAGE) from None
            raise
        try:
            admin = args.admin or devcontrol.parse_admin_address(DEFAULT_ADMIN_ADDRESS)
            admin_socket = sockets.enter_context(devcontrol.open_socket(*admin))
        except OSError as exc:
            where = devcontrol.format_address(*admin)
            raise CommandError(
                f"--admin: cannot listen on {where}: {exc.strerror}; is another bench running?"
                " Stop it, or pick another port with --admin 127.0.0.1:PORT"
            ) from None
        code = _run_until_interrupted(partial(bench.run, admin_socket, echo_socket))
    print("\nstopped", flush=True)
    return code


# Which command-line option a problem in the bench's generated config comes from.
_DEV_OPTIONS: Final = (
    ("listen", "--listen"),
    ("upstream", "--upstream"),
    ("rotation.hints.new.networks", "--new-network"),
)


def _cmd_dev_switch(args: argparse.Namespace) -> int:
    folder: Path = getattr(args, "dir", Path(DEV_DIR))
    try:
        address = args.admin or devcontrol.read_address_file(folder / devcerts.ADMIN_ADDRESS_FILE)
        previous = devcontrol.get_scenario(address)
        text = devcontrol.switch(address, args.scenario)
    except devcontrol.ControlError as exc:
        raise CommandError(str(exc)) from None
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
