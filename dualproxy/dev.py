"""`dualproxy dev`: a local pinning test bench.

It makes (once, then reuses, so a CA installed on a simulator stays valid) a throwaway CA and
two keys, **old** and **new**, with certificates for localhost, 127.0.0.1, ::1, new.localhost
and any extra names, and serves them through the real server in the middle of a grace window:
clients get old by default and new when they send the hint SNI `new.localhost` or offer the
ALPN token `dualproxy-new`. Every response names the key served and why (`X-Dualproxy-Key`,
`X-Dualproxy-Reason`), which only dev mode does.

Reuse is checked, not assumed: a certificate is re-issued (on the same key, so pins never
change) when it is missing, unreadable, not issued by the current dev CA, not for its key,
for other names, or close to expiry. `--reset` deletes exactly the files below and nothing
else, so pointing `--dir` at a folder with other keys in it cannot destroy them.

Layout of the dev folder (git-ignored, like all of certs/):
    ca.pem, ca-key.pem            the dev CA (install ca.pem on a device to trust it)
    old/key.pem, old/chain.pem    the key apps pin today
    new/key.pem, new/chain.pem    the key they move to
"""

from __future__ import annotations

import ipaddress
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import trio
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from . import config as config_mod
from . import keystore, pins, policy
from .config import Config, Role
from .server import Server, describe_bound

__all__ = [
    "DEFAULT_NAMES",
    "HINT_ALPN",
    "HINT_SNI",
    "DevMaterial",
    "banner",
    "build_config",
    "issue_certificate",
    "prepare",
    "serve",
]

DEFAULT_NAMES: Final = ("localhost", "127.0.0.1", "::1")
HINT_SNI: Final = "new.localhost"
HINT_ALPN: Final = "dualproxy-new"
ROLES: Final[tuple[Role, ...]] = ("old", "new")
# Dev certificates outlive any test session but not a year: a device that trusted the dev CA
# and was forgotten is not shown anything issued by it for long.
CERT_LIFETIME: Final = timedelta(days=365)
# Certificates are re-issued (same key) when this close to expiry at start.
REISSUE_MARGIN: Final = timedelta(days=30)
# Backdating absorbs clock skew between this machine and an emulator or phone.
BACKDATE: Final = timedelta(hours=1)
# The dev window: opened a day ago, closes in a year, so the bench is always "during".
WINDOW_OPENED: Final = timedelta(days=1)
WINDOW_LENGTH: Final = timedelta(days=365)
# Every file the bench owns, relative to its folder: all that --reset deletes.
_CA_FILE: Final = "ca.pem"
_CA_KEY_FILE: Final = "ca-key.pem"
_KEY_FILE: Final = "key.pem"
_CHAIN_FILE: Final = "chain.pem"

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True, slots=True)
class DevMaterial:
    folder: Path  # absolute
    ca_file: Path
    names: tuple[str, ...]  # every name the certificates cover, defaults first


def issue_certificate(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    names: Sequence[str],
    *,
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    """A server certificate for an existing key: renewing never changes the key (or its pin)."""
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    return builder.sign(ca_key, hashes.SHA256())


def prepare(
    folder: Path,
    extra_names: Sequence[str] = (),
    *,
    reset: bool = False,
    now: datetime | None = None,
) -> DevMaterial:
    """Create or reuse the dev CA and the old/new keys; (re)issue certificates as needed.

    Raises OSError when the folder cannot be written, KeyStoreError when a key in it is unusable.
    """
    folder = folder.absolute()
    now = now or datetime.now(UTC)
    if reset:
        _remove_material(folder)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    names = tuple(dict.fromkeys(_normal_name(n) for n in [*DEFAULT_NAMES, HINT_SNI, *extra_names]))
    ca_cert, ca_key = _ca(folder)
    for role in ROLES:
        key_file, chain_file = folder / role / _KEY_FILE, folder / role / _CHAIN_FILE
        if not key_file.exists():
            keystore.write_private_key(key_file, keystore.generate_private_key("ecdsa-p256"))
        key = keystore.read_private_key(key_file)
        if _needs_certificate(chain_file, key, ca_cert, names, now):
            cert = issue_certificate(
                ca_cert,
                ca_key,
                key.public_key(),
                names,
                not_before=now - BACKDATE,
                not_after=now + CERT_LIFETIME,
            )
            chain_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return DevMaterial(folder=folder, ca_file=folder / _CA_FILE, names=names)


def _remove_material(folder: Path) -> None:
    """Delete the bench's own files (and its emptied role folders), nothing else."""
    for name in (_CA_FILE, _CA_KEY_FILE):
        (folder / name).unlink(missing_ok=True)
    for role in ROLES:
        for name in (_KEY_FILE, _CHAIN_FILE):
            (folder / role / name).unlink(missing_ok=True)
        if (folder / role).is_dir() and not any((folder / role).iterdir()):
            (folder / role).rmdir()


def _normal_name(name: str) -> str:
    """Names as a certificate's SANs read back: IP addresses canonical, host names lowercase."""
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return config_mod.normalize_host(name)


def _ca(folder: Path) -> tuple[x509.Certificate, PrivateKey]:
    """The dev CA, made when it is missing or its two files do not belong together."""
    ca_file, ca_key_file = folder / _CA_FILE, folder / _CA_KEY_FILE
    if ca_file.exists() and ca_key_file.exists():
        ca_key = keystore.read_private_key(ca_key_file)
        try:
            ca_cert = x509.load_pem_x509_certificate(ca_file.read_bytes())
        except ValueError:
            pass  # not a certificate (truncated, edited): make a new CA
        else:
            if _same_key(ca_cert.public_key(), ca_key):
                return ca_cert, ca_key
    # Only trustme (a declared dependency) is imported lazily: nothing else needs it.
    import trustme

    ca = trustme.CA(organization_name="dualproxy dev CA")
    ca_private = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    assert isinstance(ca_private, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    ca_key_file.unlink(missing_ok=True)  # write_private_key never overwrites a key
    keystore.write_private_key(ca_key_file, ca_private)
    ca_file.write_bytes(ca.cert_pem.bytes())
    return x509.load_pem_x509_certificate(ca.cert_pem.bytes()), ca_private


def _same_key(public_key: object, private_key: PrivateKey) -> bool:
    def spki(key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey) -> bytes:
        return key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    if not isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        return False
    return spki(public_key) == spki(private_key.public_key())


def _needs_certificate(
    chain_file: Path,
    key: PrivateKey,
    ca_cert: x509.Certificate,
    names: Sequence[str],
    now: datetime,
) -> bool:
    if not chain_file.exists():
        return True
    try:
        cert = x509.load_pem_x509_certificate(chain_file.read_bytes())
        cert.verify_directly_issued_by(ca_cert)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return True
    have = {str(n.value) for n in sans}
    return (
        not _same_key(cert.public_key(), key)
        or have != set(names)
        or cert.not_valid_after_utc - now < REISSUE_MARGIN
    )


def build_config(material: DevMaterial, listen: str, now: datetime) -> Config:
    """The bench's config: in a grace window from a day ago, hints on HINT_SNI and HINT_ALPN.

    Raises ConfigError (key path listen.address) when `listen` is not HOST:PORT.
    """
    data = {
        "listen": {"address": listen},
        "keys": {
            role: {"key": f"{role}/{_KEY_FILE}", "chain": f"{role}/{_CHAIN_FILE}"} for role in ROLES
        },
        "rotation": {
            "old": "old",
            "new": "new",
            "grace_start": now - WINDOW_OPENED,
            "grace_end": now + WINDOW_LENGTH,
            "default": "old",
            "hints": {"new": {"sni": [HINT_SNI], "alpn": [HINT_ALPN]}},
        },
    }
    return config_mod.parse(data, base_dir=material.folder)


def banner(
    server: Server, material: DevMaterial, bound: Sequence[tuple[str, int]], now: datetime
) -> str:
    """What the developer needs on start: URLs, the CA, the pins, commands to try.

    The curl commands are exact: shell-quoted, absolute paths, and `--resolve` pins each name
    to the address actually bound, so they work as printed whatever `localhost` resolves to.
    """
    keys = server.snapshot.keys
    old, new = keys["old"].pin, keys["new"].pin
    host, port = _connect_address(bound)
    ca = str(material.ca_file)

    def curl(pin_list: str, name: str) -> str:
        address = f"[{host}]" if ":" in host else host
        return shlex.join([
            "curl", "-i", "--cacert", ca, "--pinnedpubkey", pin_list,
            "--resolve", f"{name}:{port}:{address}", f"https://{name}:{port}/",
        ])  # fmt: skip

    extra = [name for name in material.names if name not in (*DEFAULT_NAMES, HINT_SNI)]
    if all(ipaddress.ip_address(h).is_loopback for h, _ in bound):
        others = [
            f"  note        {name} is in the certificates, but other devices cannot reach"
            f" {describe_bound(bound)}: add --listen 0.0.0.0:{port} for them"
            for name in extra
        ]
    else:
        others = [f"  URL         https://{_url_host(name)}:{port}/" for name in extra]
    lines = [
        "dualproxy dev: pinning test bench",
        f"  listening   {describe_bound(bound)}",
        f"  URL         https://localhost:{port}/",
        *others,
        f"  dev CA      {ca}  (trust it on a simulator or device to test against this bench)",
        f"  old pin     sha256/{old}",
        f"  new pin     sha256/{new}",
        f"  scenario    grace: old by default; new for SNI {HINT_SNI} or ALPN {HINT_ALPN}",
        "  headers     X-Dualproxy-Key and X-Dualproxy-Reason name the key served and why",
        "",
        "try:",
        "  # (a) the current pin works: the app pins old and is served old",
        f"  {curl(f'sha256//{old}', 'localhost')}",
        "  # (b) a key the app does not pin is refused: it pins only new, is served old (exit 90)",
        f"  {curl(f'sha256//{new}', 'localhost')}",
        "  # (c) an app that pins old and new survives the rotation: served new, pin accepted",
        f"  {curl(f'sha256//{old};sha256//{new}', HINT_SNI)}",
        "",
        "OkHttp pins for old + new (the backup-pin practice):",
    ]
    both = [
        pins.PinnedKey(
            name=role,
            role=policy.pin_role(server.config.rotation, role, now),
            pin=keys[role].pin,
            algorithm=keys[role].algorithm,
            hostnames=("localhost",),
            not_after=keys[role].not_after,
        )
        for role in ROLES
    ]
    lines += ["  " + line if line else "" for line in pins.render(both, "okhttp").splitlines()]
    lines += ["", "Ctrl-C stops."]
    return "\n".join(lines)


def _connect_address(bound: Sequence[tuple[str, int]]) -> tuple[str, int]:
    """Where a local client reaches the bench: a wildcard bind is reached on loopback."""
    host, port = bound[0]
    if _is_wildcard(host):
        host = "::1" if ":" in host else "127.0.0.1"
    return host, port


def _is_wildcard(host: str) -> bool:
    return ipaddress.ip_address(host).is_unspecified


def _url_host(name: str) -> str:
    return f"[{name}]" if ":" in name else name


async def serve(server: Server, material: DevMaterial) -> None:
    """Serve the bench until cancelled (or SIGTERM); print the banner once listening."""
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(server.run)
        print(banner(server, material, bound, datetime.now(UTC)), flush=True)
