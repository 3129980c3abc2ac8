"""`manifest keygen`, `sign` and `verify`: the signed pin manifest apps fetch from
manifest.path ([manifest] table)."""

from __future__ import annotations

import argparse
import base64
import sys
from datetime import timedelta
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from dualproxy.cli.arguments import EXIT_FAILED, EXIT_OK, AddCommand, with_config, with_time
from dualproxy.config.errors import OperatorError
from dualproxy.config.loader import load
from dualproxy.config.times import brief_time
from dualproxy.files import write_atomically
from dualproxy.pinning import manifest
from dualproxy.rotation import explain, policy
from dualproxy.serve.clock import utc_now
from dualproxy.tls import keystore


def register(command: AddCommand) -> None:
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


def _validity_argument(text: str) -> timedelta:
    try:
        valid_for = manifest.parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    low, high = manifest.MIN_VALIDITY, manifest.MAX_VALIDITY
    if not low <= valid_for <= high:
        raise argparse.ArgumentTypeError(f"{text!r}: use {low} to {high}")
    return valid_for


def _cmd_manifest_keygen(args: argparse.Namespace) -> int:
    key = manifest.write_signing_key(args.out, force=args.force)
    public = key.public_key()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    print(f"wrote {args.out} (Ed25519, mode 0600) and {manifest.public_key_file(args.out)}")
    print(f"kid:        {manifest.public_key_thumbprint(public)}")
    print(f"public key: {base64.b64encode(raw).decode()}  (raw 32 bytes, base64: ship it in apps)")
    print("keep the private key offline if you can; sign with:")
    print(f"  dualproxy manifest sign --key {args.out}")
    return EXIT_OK


def _cmd_manifest_sign(args: argparse.Namespace) -> int:
    config = load(args.config)
    snapshot = keystore.load_snapshot(config)
    if config.manifest is None:
        raise OperatorError(
            "no [manifest] table",
            fix="add one (see config.toml)",
            key_path="manifest",
            file=config.path,
        )
    key = manifest.read_signing_key(args.key)
    now = utc_now()
    try:
        payload = manifest.build_payload(
            explain.pinned_keys(config, snapshot.keys, now),
            config.rotation,
            issued_at=now,
            valid_for=args.valid_for,
        )
    except ValueError as exc:
        raise OperatorError(
            f"cannot sign a manifest: {exc}", key_path="keys", file=config.path
        ) from None
    token = manifest.sign(payload, key)
    out = config.manifest.file
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(out, token.encode("ascii") + b"\n", mode=0o644)
    except OSError as exc:
        raise OperatorError(f"cannot write the manifest: {exc.strerror}", file=out) from None
    signed = manifest.peek(token)
    expires = brief_time(signed.expires_at, zone=" UTC")
    print(f"wrote {out}: {len(signed.pins)} pin(s), expires {expires}")
    for pin in signed.pins:
        print(f"  {pin.key:<16} {pin.role:<9} sha256/{pin.pin}")
    for name, moment in explain.role_changes(config.rotation, now, signed.expires_at):
        print(
            f"note: rotation.{name} ({brief_time(moment, zone=' UTC')}) falls within its"
            " validity: the roles change then; sign again after it"
        )
    return EXIT_OK


def _cmd_manifest_verify(args: argparse.Namespace) -> int:
    at = args.at or utc_now()
    public_key = manifest.read_public_key(args.public_key)
    try:
        token = args.file.read_bytes()
    except OSError as exc:
        raise OperatorError(f"cannot read the manifest: {exc.strerror}", file=args.file) from None
    try:
        verified = manifest.verify(token, public_key, now=at)
    except manifest.ManifestError as exc:
        raise OperatorError(f"not trusted: {exc.message}", file=args.file) from None
    print(f"{args.file}: signature ok (kid {verified.kid or '-'})")
    print(f"  issued   {verified.issued_at:%Y-%m-%d %H:%M:%S} UTC")
    print(f"  expires  {verified.expires_at:%Y-%m-%d %H:%M:%S} UTC")
    print(f"  hosts    {', '.join(verified.hosts) or '(none)'}")
    for pin in verified.pins:
        print(f"  {pin.key:<16} {pin.role:<9} sha256/{pin.pin}")
    if args.config is None:
        return EXIT_OK
    config = load(args.config)
    snapshot = keystore.load_snapshot(config)
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
    roles = {
        key.pin: policy.pin_role(config.rotation, name, at) for name, key in snapshot.keys.items()
    }
    stale = manifest.stale_roles(verified, roles)
    for found in stale:
        level, stream = ("error", sys.stderr) if found.retired else ("warning", sys.stdout)
        print(f"{level}: {found.describe(at)}", file=stream)
    if missing or any(found.retired for found in stale):
        return EXIT_FAILED
    print(f"  every key {config.path} serves now is listed")
    return EXIT_OK
