"""`acme issue` and `acme renew`: certificates for our own keys from the [acme] CA; and
`issue_or_fail`, which `serve` also uses for keys that have no chain yet.

The issuer (and with it the acme library, requests and pyOpenSSL: a third of a second to
import) loads only for the commands that use it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TypeVar

import trio

from dualproxy.acme import renewal
from dualproxy.cli.arguments import EXIT_OK, AddCommand, key_name_argument, with_config
from dualproxy.config.errors import OperatorError
from dualproxy.config.loader import load
from dualproxy.config.schema import Config, KeyConfig
from dualproxy.config.times import brief_time
from dualproxy.ops.logformat import setup_logging
from dualproxy.serve.clock import utc_now
from dualproxy.tls import keystore

_R = TypeVar("_R")

log = logging.getLogger("dualproxy.acme")


def register(command: AddCommand) -> None:
    acme_cmd = command("acme", "certificates for our own keys from an ACME CA ([acme] table)")
    acme_sub = acme_cmd.add_subparsers(metavar="ACTION", required=True)
    issue = acme_sub.add_parser(
        "issue",
        help="get a certificate for KEY now (same key: its pin does not change)",
        description="Get a certificate for an ACME-managed key from the [acme] CA and write"
        " its chain file atomically. A running `serve` answers the challenges and picks the"
        " chain up; without one, this command answers them on the configured ports.",
    )
    issue.add_argument("key", type=key_name_argument, help="key name ([keys.NAME] with names)")
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


def issue_or_fail(config: Config, keys: list[KeyConfig]) -> list[str]:
    """Obtain chains for `keys`, each result in the log (never printed: `serve` calls this
    with its log in JSON); the names obtained. OperatorError naming each failure."""
    from dualproxy.acme import issuer as acme

    results = _run_acme(partial(acme.issue_keys, config, keys))
    failed = [(name, error) for name, error in results if error is not None]
    for name, error in results:
        if error is None:
            log.info("acme: %s: new certificate written to %s", name, config.keys[name].chain)
    if failed:
        reasons = "; ".join(f"{name}: {error}" for name, error in failed)
        raise OperatorError(
            f"{len(failed)} of {len(results)} certificate(s) not obtained: {reasons}"
        )
    return [name for name, _ in results]


def _run_acme(body: Callable[[], Awaitable[_R]]) -> _R:
    from dualproxy.acme import issuer as acme

    try:
        return trio.run(body)
    except OSError as exc:  # binding the challenge port
        raise OperatorError(f"{exc}") from None
    except acme.AcmeError as exc:
        raise OperatorError(str(exc)) from None


def _cmd_acme_issue(args: argparse.Namespace) -> int:
    from dualproxy.acme import issuer as acme

    setup_logging()  # the order's progress, step by step, on stderr
    config = load(args.config)
    try:
        key = acme.managed_key(config, args.key)
    except acme.AcmeError as exc:
        raise OperatorError(str(exc)) from None
    issue_or_fail(config, [key])
    print(f"{key.name}: new certificate written to {key.chain}")
    _print_pin(config, key)
    return EXIT_OK


def _print_pin(config: Config, key: KeyConfig) -> None:
    loaded = keystore.load_key(key, config.keystore)
    print(f"  pin sha256/{loaded.pin} (unchanged: same key)")
    until = brief_time(loaded.not_after, zone=" UTC")
    print(f"  valid until {until}, names {', '.join(loaded.names)}")


def _cmd_acme_renew(args: argparse.Namespace) -> int:
    from dualproxy.acme import issuer as acme

    setup_logging()  # the progress of each order, step by step, on stderr
    config = load(args.config)
    if config.acme is None:
        raise OperatorError(
            "no [acme] table", fix="add one (see config.toml)", key_path="acme", file=config.path
        )
    now = utc_now()
    plans = _run_acme(partial(acme.due_keys, config, now, force=args.force))
    due = [key for key, plan in plans if plan.attempt_now(now)]
    for key, plan in plans:
        if plan.urgency in (renewal.Urgency.SOON, renewal.Urgency.EXPIRED):
            print(f"warning: {key.name}: the certificate {plan.urgency}", file=sys.stderr)
        if not plan.attempt_now(now):
            print(f"{key.name}: not due until {brief_time(plan.due, zone=' UTC')} ({plan.reason})")
    if due:
        for name in issue_or_fail(config, due):
            print(f"{name}: new certificate written to {config.keys[name].chain}")
    return EXIT_OK
