"""New keys: the key types dualproxy knows, making a private key, writing it to a file of its
own (mode 0600, never over an existing one), and certificate signing requests for it.

The key types are named once, here. `KeyType` is a key dualproxy makes (`keys new --type`, the
ACME account and certificate keys, the dev bench): its command-line token, its name for
people and its family. `KeyFamily` is what OpenSSL and TLS tell apart: an identity holds one
certificate per family, and each TLS 1.2 cipher suite authenticates with one family. The
command line's choices, the key store's one-key-per-family rule and its cipher-suite order
all derive from these two; `pins.describe_key_algorithm` names any key, including sizes and
curves we do not make, and agrees with `KeyType.label` for the ones we do (a test checks).

The private key's bytes go from `cryptography` to the new file and nowhere else: no error
raised here carries them.
"""

from __future__ import annotations

import enum
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Final, assert_never

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificatePublicKeyTypes,
    PrivateKeyTypes,
)
from cryptography.x509.oid import NameOID

from dualproxy.config.errors import OperatorError

__all__ = [
    "DEFAULT_KEY_TYPE",
    "RSA_PUBLIC_EXPONENT",
    "KeyFamily",
    "KeyType",
    "PrivateKey",
    "generate_private_key",
    "make_csr",
    "write_private_key",
]

# The private keys dualproxy serves, reads and makes.
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

# F4: the public exponent every RSA implementation expects (cryptography's documented choice).
RSA_PUBLIC_EXPONENT: Final = 65537
# The Baseline Requirements' minimum (§6.1.5): the smallest RSA key every public CA issues
# for, and the fastest to sign with. The key store refuses less (keystore.MIN_RSA_BITS).
_RSA_BITS: Final = 2048

# RFC 5280 Appendix A, ub-common-name: longer names can only go in the SANs.
_MAX_COMMON_NAME_LEN: Final = 64


class KeyFamily(enum.StrEnum):
    """A certificate's key family: OpenSSL keeps one certificate per family in a context,
    and a TLS 1.2 cipher suite names the family it authenticates with."""

    EC = "ec"
    RSA = "rsa"

    @classmethod
    def of(cls, key: PrivateKeyTypes | CertificatePublicKeyTypes) -> KeyFamily:
        """The family of a private or public key; ValueError for a key of neither."""
        if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
            return cls.EC
        if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
            return cls.RSA
        raise ValueError(f"a {type(key).__name__} is neither an EC nor an RSA key")


class KeyType(enum.Enum):
    """A key type dualproxy makes: ones every mobile TLS stack and public CA accept."""

    #            command-line token  for people     family
    ECDSA_P256 = ("ecdsa-p256", "ECDSA P-256", KeyFamily.EC)
    RSA_2048 = ("rsa-2048", "RSA 2048", KeyFamily.RSA)

    def __init__(self, token: str, label: str, family: KeyFamily) -> None:
        self.token = token  # `dualproxy keys new --type TOKEN`
        self.label = label  # as pins.describe_key_algorithm names such a key
        self.family = family

    @classmethod
    def tokens(cls) -> tuple[str, ...]:
        return tuple(key_type.token for key_type in cls)

    @classmethod
    def from_token(cls, token: str) -> KeyType:
        """The key type named `token`; ValueError for a token that names none."""
        for key_type in cls:
            if key_type.token == token:
                return key_type
        raise ValueError(f"{token!r} is not a key type; use one of {', '.join(cls.tokens())}")


# Smallest and fastest of those every client takes: what `keys new`, ACME and the bench make.
DEFAULT_KEY_TYPE: Final = KeyType.ECDSA_P256


def generate_private_key(key_type: KeyType = DEFAULT_KEY_TYPE) -> PrivateKey:
    """A fresh key of `key_type`."""
    match key_type:
        case KeyType.ECDSA_P256:
            return ec.generate_private_key(ec.SECP256R1())
        case KeyType.RSA_2048:
            return rsa.generate_private_key(public_exponent=RSA_PUBLIC_EXPONENT, key_size=_RSA_BITS)
        case _:
            assert_never(key_type)


def write_private_key(path: Path, key: PrivateKey) -> None:
    """Write `key` as PKCS#8 PEM to a new file, mode 0600 (its folder made 0700 if missing).

    Never overwrites: the pin of an existing key may already ship in apps. OperatorError
    when the file exists or cannot be written (a torn file is removed).
    """
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:  # a file where the folder should be: not "the key exists"
        raise OperatorError(f"cannot create the key file: {exc.strerror}", file=path) from None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise OperatorError(
            "already exists; dualproxy never overwrites a private key (apps may pin it)."
            " Pick another name, or move the file away if you really mean to replace it",
            file=path,
        ) from None
    except OSError as exc:
        raise OperatorError(f"cannot create the key file: {exc.strerror}", file=path) from None
    try:
        try:
            view = memoryview(pem)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)  # its pin gets published next: the key must survive a crash
        finally:
            os.close(fd)
    except OSError as exc:
        path.unlink(missing_ok=True)  # a torn key file would block the retry (O_EXCL)
        raise OperatorError(f"cannot write the key file: {exc.strerror}", file=path) from None


def make_csr(key: PrivateKey, names: Sequence[str]) -> x509.CertificateSigningRequest:
    """A CSR for `key`: SANs = names (IP literals as IP addresses), CN = the first name."""
    if not names:
        raise ValueError("a certificate request needs at least one name")
    subject = []
    if len(names[0]) <= _MAX_COMMON_NAME_LEN:
        subject.append(x509.NameAttribute(NameOID.COMMON_NAME, names[0]))
    sans = x509.SubjectAlternativeName([_general_name(name) for name in names])
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name(subject))
        .add_extension(sans, critical=False)
    )
    return builder.sign(key, hashes.SHA256())


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)
