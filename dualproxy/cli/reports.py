"""`reports summary`: the pin-failure reports received at reports.path, counted by app version
and by the pins the apps know."""

from __future__ import annotations

import argparse
import json

from dualproxy.cli.arguments import EXIT_OK, AddCommand, with_config
from dualproxy.config.errors import OperatorError
from dualproxy.config.loader import load
from dualproxy.pinning import endpoints, reports
from dualproxy.serve.clock import utc_now
from dualproxy.tls import keystore


def register(command: AddCommand) -> None:
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


def _cmd_reports_summary(args: argparse.Namespace) -> int:
    config = load(args.config)
    if config.reports is None:
        raise OperatorError(
            "no [reports] table",
            fix="add one (see config.toml)",
            key_path="reports",
            file=config.path,
        )
    settings = config.reports
    labels: dict[str, str] = {}
    try:
        snapshot = keystore.load_snapshot(config)
    except OperatorError:
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
