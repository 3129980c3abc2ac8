"""`keys new` (a private key, mode 0600, and its pin) and `keys csr` (a certificate signing
request for an existing key, for any ACME client)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from dualproxy.cli.arguments import (
    EXIT_OK,
    AddCommand,
    host_argument,
    key_name_argument,
)
from dualproxy.config.errors import OperatorError
from dualproxy.tls import keygen, keystore, pins
from dualproxy.tls.keygen import DEFAULT_KEY_TYPE, KeyType


def register(command: AddCommand) -> None:
    keys_cmd = command("keys", "make keys and certificate signing requests")
    keys_sub = keys_cmd.add_subparsers(metavar="ACTION", required=True)
    new = keys_sub.add_parser(
        "new",
        help="generate a private key (mode 0600) and print its pin",
        description="Generate a private key (mode 0600, never overwriting) and print its pin.",
    )
    new.add_argument("name", type=key_name_argument, help="key name, e.g. k2027a")
    new.add_argument(
        "--type", choices=KeyType.tokens(), default=DEFAULT_KEY_TYPE.token, help="key type"
    )
    new.add_argument("--dir", type=Path, default=Path("certs"), help="key store folder")
    new.set_defaults(handler=_cmd_keys_new)
    csr = keys_sub.add_parser(
        "csr",
        help="a CSR for an existing key (for any ACME client)",
        description="Write a certificate signing request for an existing key.",
    )
    csr.add_argument("name", type=key_name_argument, help="key name")
    csr.add_argument(
        "--name", dest="hostnames", action="append", required=True, metavar="HOST",
        type=host_argument, help="name to request (repeatable); the first is the subject CN",
    )  # fmt: skip
    csr.add_argument("--dir", type=Path, default=Path("certs"), help="key store folder")
    csr.add_argument("--out", type=Path, help="CSR file (default: DIR/NAME/csr.pem; - for stdout)")
    csr.set_defaults(handler=_cmd_keys_csr)


def _cmd_keys_new(args: argparse.Namespace) -> int:
    key_type = KeyType.from_token(args.type)
    path = args.dir / args.name / "key.pem"
    key = keygen.generate_private_key(key_type)
    # Refuses an existing file (O_EXCL): the pin of a key may already ship in apps.
    keygen.write_private_key(path, key)
    print(f"wrote {path} ({key_type.label}, mode 0600)")
    print(f"pin: sha256/{pins.spki_pin(key.public_key())}")
    print("next: publish this pin in your app as a backup pin now, then get a certificate:")
    print(f"  dualproxy keys csr {args.name} --name api.example.com --dir {args.dir}")
    return EXIT_OK


def _cmd_keys_csr(args: argparse.Namespace) -> int:
    key_path = args.dir / args.name / "key.pem"
    if not key_path.exists() and not key_path.is_symlink():
        raise OperatorError(
            "no such key",
            fix=f"make it first with `dualproxy keys new {args.name} --dir {args.dir}`, or pass"
            " the --dir it is in",
            file=key_path,
        )
    key = keystore.read_private_key(key_path)
    csr = keygen.make_csr(key, args.hostnames)
    pem = csr.public_bytes(serialization.Encoding.PEM)
    pin = pins.spki_pin(key.public_key())
    if args.out is not None and str(args.out) == "-":
        sys.stdout.write(pem.decode("ascii"))
        return EXIT_OK
    out = args.out or args.dir / args.name / "csr.pem"
    try:
        out.write_bytes(pem)
    except OSError as exc:
        raise OperatorError(
            f"cannot write the CSR: {exc.strerror}", fix="pick --out", file=out
        ) from None
    print(f"wrote {out} for {', '.join(args.hostnames)}")
    print(f"pin: sha256/{pin} (unchanged: same key)")
    print("get it signed by any ACME client, e.g.:")
    print(
        f"  certbot certonly --csr {out} --fullchain-path {args.dir / args.name / 'chain.pem'}"
        " --standalone"
    )
    return EXIT_OK
