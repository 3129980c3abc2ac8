"""The dev bench's material: a throwaway CA, three keys and six certificates, kept on disk.

Made once, then reused, so a CA installed on a simulator or device stays valid across runs.
Reuse is checked, not assumed: a certificate is re-issued (on the same key, so pins never
change) when it is missing, unreadable, not for its key, for other names, not from the issuer
it should have, or close to expiry. `reset` deletes exactly the files below and nothing else,
so pointing `--dir` at a folder with other keys in it cannot destroy them.

Each certificate stands for one thing a pinning client meets. Three keys, all certified by the
dev CA for the bench's names:
    old      the key apps pin today
    new      the key they move to (its pin ships in apps ahead of time, as the backup pin)
    rogue    a key nobody pins, from the same CA: what a mis-issued certificate looks like
And three certificates that are wrong in exactly one way each, all for **old's key**, so the
pin matches and only the ordinary certificate checks can refuse them (a client that checks
pins *instead of* the chain accepts them, and that is the bug they reveal):
    expired      from the dev CA, for the right names, expired EXPIRED_AGO ago
    wrong-host   from the dev CA, valid, but only for WRONG_HOST
    untrusted    for the right names, valid, from a CA nobody trusts (made and thrown away)

Layout of the dev folder (git-ignored, like all of certs/):
    ca.pem, ca-key.pem                   the dev CA (install ca.pem on a device to trust it)
    old/key.pem, old/chain.pem           and likewise new/ and rogue/
    expired/chain.pem                    and likewise wrong-host/ and untrusted/ (old's key)
    admin-address                        while a bench runs: where `dev switch` finds it
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from dualproxy.config.names import normalize_host
from dualproxy.files import write_atomically
from dualproxy.tls import keygen, keystore
from dualproxy.tls.keygen import PrivateKey
from dualproxy.tls.pins import describe_key_algorithm, spki_pin

__all__ = [
    "CERTIFICATES",
    "DEFAULT_NAMES",
    "HINT_SNI",
    "KEYS",
    "WRONG_HOST",
    "CertificateSpec",
    "DevMaterial",
    "issue_certificate",
    "new_ca",
    "prepare",
]

DEFAULT_NAMES: Final = ("localhost", "127.0.0.1", "::1")
# The SNI name that asks for the new key during the grace window; *.localhost resolves to
# loopback on macOS, systemd-resolved and in curl itself (RFC 6761), so apps can use it as-is.
HINT_SNI: Final = "new.localhost"
# A name no client asks for: .invalid can never resolve (RFC 2606), so it is never right.
WRONG_HOST: Final = "wrong-host.invalid"
# The keys the bench generates and keeps.
KEYS: Final = ("old", "new", "rogue")
# Dev certificates outlive any test session but not a year: a device that trusted the dev CA
# and was forgotten is not shown anything issued by it for long.
CERT_LIFETIME: Final = timedelta(days=365)
# Certificates are re-issued (same key) when this close to expiry at start.
REISSUE_MARGIN: Final = timedelta(days=30)
# Backdating absorbs clock skew between this machine and an emulator or phone.
BACKDATE: Final = timedelta(hours=1)
# The expired certificate ended this long ago: more than any emulator's clock drifts, so it
# is expired for every client, not "valid" on one whose clock is a few days behind.
EXPIRED_AGO: Final = timedelta(days=30)
# Every file the bench owns, relative to its folder: all that reset deletes.
CA_FILE: Final = "ca.pem"
CA_KEY_FILE: Final = "ca-key.pem"
KEY_FILE: Final = "key.pem"
CHAIN_FILE: Final = "chain.pem"
ADMIN_ADDRESS_FILE: Final = "admin-address"


@dataclass(frozen=True, slots=True)
class CertificateSpec:
    """One certificate the bench serves: which key it certifies and how it is (in)valid."""

    name: str  # its folder, and the key name the bench's config gives it
    key: str  # one of KEYS
    issuer: Literal["dev", "untrusted"] = "dev"
    wrong_host: bool = False  # certifies WRONG_HOST only, instead of the bench's names
    expired: bool = False

    @property
    def key_file(self) -> str:
        """Relative to the dev folder."""
        return f"{self.key}/{KEY_FILE}"

    @property
    def chain_file(self) -> str:
        return f"{self.name}/{CHAIN_FILE}"


CERTIFICATES: Final = {
    spec.name: spec
    for spec in (
        CertificateSpec("old", "old"),
        CertificateSpec("new", "new"),
        CertificateSpec("rogue", "rogue"),
        CertificateSpec("expired", "old", expired=True),
        CertificateSpec("wrong-host", "old", wrong_host=True),
        CertificateSpec("untrusted", "old", issuer="untrusted"),
    )
}


@dataclass(frozen=True, slots=True)
class DevMaterial:
    folder: Path  # absolute
    ca_file: Path
    names: tuple[str, ...]  # every name the certificates cover, defaults first
    pins: dict[str, str]  # key name (KEYS) -> its pin
    algorithms: dict[str, str]  # key name (KEYS) -> "ECDSA P-256"
    not_after: dict[str, datetime]  # key name (KEYS) -> when its own certificate expires

    @property
    def admin_address_file(self) -> Path:
        return self.folder / ADMIN_ADDRESS_FILE


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
    """Create or reuse the dev CA and keys; (re)issue certificates as needed.

    Raises OSError when the folder cannot be written, OperatorError when a key in it is unusable.
    """
    folder = folder.absolute()
    now = now or datetime.now(UTC)
    if reset:
        _remove_material(folder)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    names = tuple(dict.fromkeys(_normal_name(n) for n in [*DEFAULT_NAMES, HINT_SNI, *extra_names]))
    ca_cert, ca_key = _ca(folder)
    keys: dict[str, PrivateKey] = {}
    for name in KEYS:
        key_file = folder / name / KEY_FILE
        if not key_file.exists():
            keygen.write_private_key(key_file, keygen.generate_private_key())
        keys[name] = keystore.read_private_key(key_file)
    untrusted: tuple[x509.Certificate, PrivateKey] | None = None
    for spec in CERTIFICATES.values():
        key = keys[spec.key]
        cert_names = (WRONG_HOST,) if spec.wrong_host else names
        chain_file = folder / spec.chain_file
        if not _needs_certificate(chain_file, spec, key, ca_cert, cert_names, now):
            continue
        issuer = (ca_cert, ca_key)
        if spec.issuer == "untrusted":
            untrusted = untrusted or new_ca("dualproxy untrusted CA (nobody trusts it)")
            issuer = untrusted
        not_after = now - EXPIRED_AGO if spec.expired else now + CERT_LIFETIME
        not_before = not_after - CERT_LIFETIME if spec.expired else now - BACKDATE
        cert = issue_certificate(
            *issuer, key.public_key(), cert_names, not_before=not_before, not_after=not_after
        )
        _write_atomically(chain_file, cert.public_bytes(serialization.Encoding.PEM))
    return DevMaterial(
        folder=folder,
        ca_file=folder / CA_FILE,
        names=names,
        pins={name: spki_pin(key.public_key()) for name, key in keys.items()},
        algorithms={name: describe_key_algorithm(key.public_key()) for name, key in keys.items()},
        not_after={
            name: _read_certificate(folder / name / CHAIN_FILE).not_valid_after_utc for name in KEYS
        },
    )


def _read_certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _remove_material(folder: Path) -> None:
    """Delete the bench's own files (and its emptied folders), nothing else."""
    for name in (CA_FILE, CA_KEY_FILE, ADMIN_ADDRESS_FILE):
        (folder / name).unlink(missing_ok=True)
    for sub in dict.fromkeys([*KEYS, *CERTIFICATES]):
        for name in (KEY_FILE, CHAIN_FILE):
            (folder / sub / name).unlink(missing_ok=True)
        if (folder / sub).is_dir() and not any((folder / sub).iterdir()):
            (folder / sub).rmdir()


def _write_atomically(path: Path, data: bytes) -> None:
    """A running bench (its file poller) never reads half a chain."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomically(path, data)


def _normal_name(name: str) -> str:
    """Names as a certificate's SANs read back: IP addresses canonical, host names lowercase."""
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return normalize_host(name)


def new_ca(organization: str) -> tuple[x509.Certificate, PrivateKey]:
    """A CA certificate and its key, kept in memory (the caller writes them if it must)."""
    # Only trustme (a declared dependency) is imported lazily: nothing else needs it.
    import trustme

    ca = trustme.CA(organization_name=organization)
    private = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    return x509.load_pem_x509_certificate(ca.cert_pem.bytes()), private


def _ca(folder: Path) -> tuple[x509.Certificate, PrivateKey]:
    """The dev CA, made when it is missing or its two files do not belong together."""
    ca_file, ca_key_file = folder / CA_FILE, folder / CA_KEY_FILE
    if ca_file.exists() and ca_key_file.exists():
        ca_key = keystore.read_private_key(ca_key_file)
        try:
            ca_cert = x509.load_pem_x509_certificate(ca_file.read_bytes())
        except ValueError:
            pass  # not a certificate (truncated, edited): make a new CA
        else:
            if _same_key(ca_cert.public_key(), ca_key):
                return ca_cert, ca_key
    ca_cert, ca_private = new_ca("dualproxy dev CA")
    ca_key_file.unlink(missing_ok=True)  # write_private_key never overwrites a key
    keygen.write_private_key(ca_key_file, ca_private)
    _write_atomically(ca_file, ca_cert.public_bytes(serialization.Encoding.PEM))
    return ca_cert, ca_private


def _spki(key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _same_key(public_key: object, private_key: PrivateKey) -> bool:
    if not isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        return False
    return _spki(public_key) == _spki(private_key.public_key())


def _issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _needs_certificate(
    chain_file: Path,
    spec: CertificateSpec,
    key: PrivateKey,
    ca_cert: x509.Certificate,
    names: Sequence[str],
    now: datetime,
) -> bool:
    if not chain_file.exists():
        return True
    try:
        cert = _read_certificate(chain_file)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return True
    have = {str(n.value) for n in sans}
    # The untrusted certificate must *not* verify with the dev CA (a CA made anew by --reset
    # or a repair would otherwise be the only thing that tells them apart).
    issued_right = _issued_by(cert, ca_cert) == (spec.issuer == "dev")
    if spec.expired:
        dated_right = cert.not_valid_after_utc < now
    else:
        dated_right = (
            cert.not_valid_before_utc <= now and cert.not_valid_after_utc - now >= REISSUE_MARGIN
        )
    fits = _same_key(cert.public_key(), key) and have == set(names) and issued_right
    return not (fits and dated_right)
