"""What the config and its keys say, without serving: `check` (validate, show the keys and the
rotation timeline), `route` (which key a client would get, and why) and `pins` (every key's
pin, for apps and curl). The rotation's knowledge is `rotation.explain`'s; this module prints.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from dualproxy.cli.arguments import EXIT_FAILED, EXIT_OK, AddCommand, with_config, with_time
from dualproxy.config.errors import OperatorError, locate
from dualproxy.config.loader import load
from dualproxy.config.schema import Config
from dualproxy.config.times import brief_time, brief_times
from dualproxy.pinning import endpoints, reports
from dualproxy.rotation import checks, explain, policy
from dualproxy.serve.clock import utc_now
from dualproxy.tls import keystore, pins
from dualproxy.tls.clienthello import ClientHello

# What `dualproxy route` pretends the client sent besides the given SNI and ALPN: a current
# browser's TLS 1.3 ClientHello (Chrome's cipher suites, signature schemes and groups), so that
# with an ECDSA and an RSA key the key named is the one such a client gets.
_ROUTE_CIPHERS: Final = (0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F, 0xC02C, 0xC030, 0xCCA9, 0xCCA8)
_ROUTE_SIGALGS: Final = (0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601)
_ROUTE_VERSIONS: Final = (0x0304, 0x0303)
_ROUTE_GROUPS: Final = (0x001D, 0x0017, 0x0018)


def register(command: AddCommand) -> None:
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


def _ip_argument(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None


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
    print(f"\nkeys (at {brief_time(at, zone=' UTC')}):", file=out)
    for key in snapshot.keys.values():
        role = policy.pin_role(config.rotation, key.name, at)
        print(f"  {key.name} [{role}]", file=out)
        print(f"    algorithm  {key.algorithm}", file=out)
        print(f"    pin        sha256/{key.pin}", file=out)
        print(f"    names      {', '.join(key.names) or '(none)'}", file=out)
        valid = " .. ".join(brief_times(key.not_before, key.not_after, zone="")) + " UTC"
        print(f"    valid      {valid}", file=out)
        print(f"    chain      {key.chain_file}", file=out)
    print("", file=out)
    marker = "now" if args.at is None else "at"
    for line in explain.timeline(config.rotation, config.keys, at, marker):
        print(line, file=out)
    limits = config.limits
    print(
        f"\nconnections: at most {limits.max_connections} per process (idle ones are reclaimed"
        f" at the limit), {limits.max_connections_per_client} per client",
        file=out,
    )
    findings = checks.check_config(config)
    findings += checks.check_keys(config, snapshot.keys, at)
    findings += checks.check_acme(config, snapshot.keys, [])
    findings += checks.check_rotation(config)
    findings += checks.check_old_pin_only(config, _old_pin_only(config, snapshot), at)
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


def _old_pin_only(config: Config, snapshot: keystore.KeySnapshot) -> list[tuple[str, int]]:
    """The app versions that the [reports] store says know only the old keys' pins, by name
    with their reports (none without [reports] or a rotation)."""
    if config.reports is None or config.rotation is None:
        return []
    settings = config.reports
    store = reports.ReportStore(
        settings.store, max_bytes=settings.store_max_bytes, keep=settings.store_files
    )
    old_pins, new_pins = endpoints.rotation_pins(snapshot.keys, config.rotation)
    counts = reports.counts_from_store(store)
    return [(v["name"], v["count"]) for v in counts.old_pin_only(old_pins, new_pins)]


# --- route -------------------------------------------------------------------------------


def _cmd_route(args: argparse.Namespace) -> int:
    config = load(args.config)
    snapshot = keystore.load_snapshot(config)
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
    why = explain.explain(
        config.rotation, choice, hello, args.client, missing_peer="no --client given"
    )
    print(f"key:      {key.name} ({key.algorithm}, sha256/{key.pin})")
    others = [k for k in identity.keys if k is not key]
    for other in others:
        print(f"          {other.name} ({other.algorithm}) for clients that cannot take it")
    print(f"identity: {choice.identity}")
    print(f"reason:   {choice.reason}")
    print(f"why:      {why}")
    print(f"phase:    {policy.phase(config.rotation, at)} (at {at:%Y-%m-%d %H:%M:%S} UTC)")
    rule = explain.window_rule(config.rotation, at)
    if rule is not None:
        print(f"rule:     {rule}")
    return EXIT_OK


# --- pins --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _KeyAwaitingCertificate:
    """An ACME-managed key whose chain is still to come: its pin is the key's alone, and its
    names are those the config requests (an explain.PinSource)."""

    pin: str
    algorithm: str
    names: tuple[str, ...]
    not_after: datetime | None = None


def _pin_sources(config: Config) -> dict[str, explain.PinSource]:
    """Every configured key as a pin listing needs it: loaded with its chain, or, for an
    ACME-managed key without a certificate yet, from its key file alone (said on stderr in
    check's words)."""
    waiting = {key.name for key in config.acme_keys() if not key.chain.exists()}
    if not waiting:
        return dict(keystore.load_snapshot(config).keys)
    sources: dict[str, explain.PinSource] = {}
    for name, key_config in config.keys.items():
        if name not in waiting:
            sources[name] = keystore.load_key(key_config, config.keystore)
            continue
        public_key = keystore.read_private_key(
            key_config.key, key_path=f"keys.{name}.key"
        ).public_key()
        sources[name] = _KeyAwaitingCertificate(
            pin=pins.spki_pin(public_key),
            algorithm=pins.describe_key_algorithm(public_key),
            names=key_config.names,
        )
        where = locate("no certificate yet", key_path=f"keys.{name}.chain", file=key_config.chain)
        print(
            f"note: {where}; its pin is the key's and stays the same once `dualproxy acme"
            f" issue {name}` (or serve) gets one",
            file=sys.stderr,
        )
    return sources


def _cmd_pins(args: argparse.Namespace) -> int:
    config = load(args.config)
    sources = _pin_sources(config)
    at = args.at or utc_now()
    try:
        pinned = explain.pinned_keys(config, sources, at)
        rendered = None if args.format is None else pins.render(pinned, args.format)
    except ValueError as exc:  # no keys, or a certificate name no pin format can carry
        raise OperatorError(
            f"cannot render pins: {exc}", key_path="keys", file=config.path
        ) from None
    if rendered is not None:
        print(rendered)
        return EXIT_OK
    for p in pinned:
        expires = f"{p.not_after:%Y-%m-%d}" if p.not_after else "-"
        print(f"{p.name:<16} {p.role:<9} {p.algorithm:<12} until {expires}  sha256/{p.pin}")
    return EXIT_OK
