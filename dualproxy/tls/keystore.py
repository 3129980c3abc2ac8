"""Our key pairs and certificate chains: load, validate, and serve them through OpenSSL.
(Making new keys and their CSRs is `keygen`'s.)

Read once, then load exactly what was read. Each key and chain file is opened once; its type,
owner and mode come from fstat on that open descriptor, and its bytes from the same descriptor.
Those bytes are validated with `cryptography`, and those same bytes reach OpenSSL through
in-memory files (memfd), never through the path again: the key file's bytes as they were, the
chain as the certificates we checked (their DER, re-armoured, so OpenSSL cannot read anything
that `cryptography` skipped). Renewal tools and Kubernetes rewrite these files in place, often
key and chain one after the other; opening the path a second time for OpenSSL could serve a
file nobody checked. A torn pair (new chain, old key) fails validation here; the server keeps
its previous snapshot and retries when the files change again.

Key material stays between this module and OpenSSL. No exception, log line or repr carries it:
errors (`OperatorError`) name the file, the config key path and what to do; `LoadedKey` hides
its key bytes from repr, str and `dataclasses.asdict`; the private key never goes to a temporary
file.

One certificate per key type. An OpenSSL context has one certificate slot per key type (a
`keygen.KeyFamily`), so an identity holds at most one EC and one RSA key (a second key of a
family would silently replace the first). With one of each, OpenSSL picks per handshake from
the client's offer; because our contexts prefer the server's order, the pick is predictable,
and `Identity.presented_key` predicts it (the tests check the prediction against real
handshakes).

One module, past 600 lines, on purpose: the read-once rule runs from the `open` of a key file
to OpenSSL's `load_cert_chain` of the same bytes, and the presented-key prediction depends on
the context settings made here; cut in two, each half of either invariant would live apart
from the other.
"""

from __future__ import annotations

import os
import re
import ssl
import stat
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from types import MappingProxyType
from typing import Final, Literal, NamedTuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from dualproxy.config.errors import OperatorError, locate
from dualproxy.config.schema import Config, IdentityName, KeyConfig, KeyStoreSettings
from dualproxy.tls.clienthello import ClientHello
from dualproxy.tls.keygen import DEFAULT_KEY_TYPE, KeyFamily, PrivateKey
from dualproxy.tls.pins import describe_key_algorithm, spki_pin

__all__ = [
    "ALPN_PROTOCOLS",
    "EC_CURVES",
    "MAX_PEM_FILE_BYTES",
    "MIN_RSA_BITS",
    "MOZILLA_INTERMEDIATE_TLS12_CIPHERS",
    "TLS12_CIPHER_SUITES",
    "TLS13_SESSION_TICKETS",
    "CipherSuite",
    "Identity",
    "KeySnapshot",
    "LoadedKey",
    "build_context",
    "key_file_permission_problem",
    "load_key",
    "load_snapshot",
    "read_private_key",
]


class CipherSuite(NamedTuple):
    openssl_name: str
    code: int  # IANA TLS Cipher Suites registry
    family: KeyFamily  # of the certificate it authenticates with


# Mozilla Server Side TLS guidelines 6.0, "intermediate", TLS 1.2 cipher suites in Mozilla's
# order (https://ssl-config.mozilla.org/guidelines/6.0.json): ECDHE key exchange (forward
# secrecy) with AES-GCM or ChaCha20-Poly1305 (AEAD) only. TLS 1.3 keeps OpenSSL's default
# suites, the same three Mozilla lists. The order matters: with server preference, the first
# suite here that the client offers and we hold a usable certificate for wins, so EC keys come
# first for every client that can take them.
TLS12_CIPHER_SUITES: Final = (
    CipherSuite("ECDHE-ECDSA-AES128-GCM-SHA256", 0xC02B, KeyFamily.EC),
    CipherSuite("ECDHE-RSA-AES128-GCM-SHA256", 0xC02F, KeyFamily.RSA),
    CipherSuite("ECDHE-ECDSA-AES256-GCM-SHA384", 0xC02C, KeyFamily.EC),
    CipherSuite("ECDHE-RSA-AES256-GCM-SHA384", 0xC030, KeyFamily.RSA),
    CipherSuite("ECDHE-ECDSA-CHACHA20-POLY1305", 0xCCA9, KeyFamily.EC),
    CipherSuite("ECDHE-RSA-CHACHA20-POLY1305", 0xCCA8, KeyFamily.RSA),
)
MOZILLA_INTERMEDIATE_TLS12_CIPHERS: Final = ":".join(s.openssl_name for s in TLS12_CIPHER_SUITES)

# HTTP/2 first (http.h2: mobile stacks prefer it, one connection carries every request), then
# HTTP/1.1 (http.relay); OpenSSL picks our first that the client offers. A client that offers
# only other protocols (ALPN hint tokens alone) still connects, without ALPN: HTTP/1.1.
ALPN_PROTOCOLS: Final = ("h2", "http/1.1")

# TLS 1.3 session tickets sent after each handshake (full or resumed). OpenSSL's default is
# two, for browsers that open two connections to a site at once; each ticket costs the server
# a session encoding and an encryption (~70 us of CPU here, a sixth of a whole handshake's
# cost) and ~250 bytes. One keeps resumption for the client that matters to us, an app whose
# HTTP client opens one connection at a time and resumes it after a network change: each
# resumption brings a fresh ticket, so a client that uses each ticket once (RFC 8446 C.4)
# never runs out. A second connection opened at the same moment does a full handshake.
# Not zero: resumption skips the certificate and the signature, which matters on a phone.
TLS13_SESSION_TICKETS: Final = 1


class _Curve(NamedTuple):
    group: int  # supported_groups code point (RFC 8422 §5.1.1)
    tls13_scheme: int  # the one TLS 1.3 signature scheme for keys on this curve (RFC 8446)


# The curves Mozilla's guidelines 6.0 list as certificate_curves. P-521 is left out: Chrome
# does not offer ecdsa_secp521r1_sha512, so such a certificate fails there.
EC_CURVES: Final[Mapping[str, _Curve]] = MappingProxyType(
    {
        "secp256r1": _Curve(group=0x0017, tls13_scheme=0x0403),
        "secp384r1": _Curve(group=0x0018, tls13_scheme=0x0503),
    }
)
# Mozilla's rsa_key_size and the CA/Browser Forum Baseline Requirements (§6.1.5): public CAs
# issue nothing smaller.
MIN_RSA_BITS: Final = 2048

# TLS 1.2 signature schemes that make a certificate usable, as OpenSSL 3 counts them at the
# security level Python's contexts run at (2): any hash from SHA-224 up, since TLS 1.2 does not
# tie the hash to the curve; SHA-1 schemes are below the level and do not count.
_TLS12_SCHEMES: Final[Mapping[KeyFamily, frozenset[int]]] = MappingProxyType(
    {
        KeyFamily.EC: frozenset({0x0303, 0x0403, 0x0503, 0x0603}),  # ecdsa_sha224 .. sha512
        # rsa_pkcs1_sha224 .. rsa_pkcs1_sha512, rsa_pss_rsae_sha256 .. sha512
        KeyFamily.RSA: frozenset({0x0301, 0x0401, 0x0501, 0x0601, 0x0804, 0x0805, 0x0806}),
    }
)

# A chain of a dozen 4096-bit certificates is under 30 KB and a key under 4 KB; a larger file
# is the wrong file, and the cap keeps a misconfigured path (a log, a disk image) out of memory.
MAX_PEM_FILE_BYTES: Final = 1024 * 1024

_PEM_LABEL = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")
_PRIVATE_KEY_LABEL = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")
_ROOT_UID: Final = 0


class _SecretPem:
    """A private key's PEM bytes, which no repr, str or dataclasses.asdict() will show."""

    __slots__ = ("_pem",)

    def __init__(self, pem: bytes) -> None:
        self._pem = pem

    def reveal(self) -> bytes:
        return self._pem

    def __repr__(self) -> str:
        return "<private key redacted>"


@dataclass(frozen=True, slots=True)
class LoadedKey:
    """One configured key and its validated chain, as read at one instant."""

    name: str
    key_file: Path
    chain_file: Path
    family: KeyFamily
    algorithm: str  # "ECDSA P-256", "RSA 2048": pins.describe_key_algorithm
    pin: str  # SPKI SHA-256 of the key, base64
    chain: tuple[x509.Certificate, ...]  # leaf first
    names: tuple[str, ...]  # the leaf's DNS and IP SANs
    not_before: datetime  # the leaf's, aware UTC
    not_after: datetime
    _private_key_pem: _SecretPem = field(repr=False, compare=False)
    warnings: tuple[str, ...] = ()  # e.g. an insecure-permissions override in use

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]


@dataclass(frozen=True, slots=True)
class Identity:
    """What the server presents for one identity: its keys in one SSLContext."""

    name: IdentityName
    keys: tuple[LoadedKey, ...]  # at most one per key family
    context: ssl.SSLContext

    def presented_key(self, hello: ClientHello | None) -> LoadedKey:
        """The key OpenSSL will present to the client that sent `hello` (None: not parsed).

        With one key, that key. With an EC and an RSA key: server preference makes OpenSSL
        walk its own order, ECDSA first. TLS 1.3 gets the EC key when the client offers the
        signature scheme of the key's curve. TLS 1.2 gets the key of the first suite in
        TLS12_CIPHER_SUITES that the client offers and whose certificate it can take (an
        ECDSA scheme of any hash and, if it lists groups, the key's curve among them; a hello
        without signature_algorithms allows both). A hello that fits neither gets the RSA key
        (its handshake fails anyway); no hello gets the EC key, as modern clients do.
        Not modelled: signature_algorithms_cert, which Python and OpenSSL clients do not send.
        """
        if len(self.keys) == 1:
            return self.keys[0]
        by_family = {key.family: key for key in self.keys}
        ec_key, rsa_key = by_family[KeyFamily.EC], by_family[KeyFamily.RSA]
        if hello is None or _client_takes_ec_key(hello, ec_key):
            return ec_key
        return rsa_key


@dataclass(frozen=True, slots=True)
class KeySnapshot:
    """Every configured key and one context per served identity, loaded together."""

    keys: Mapping[str, LoadedKey]
    identities: Mapping[IdentityName, Identity]
    warnings: tuple[str, ...]


# --- loading -----------------------------------------------------------------------------


def load_snapshot(config: Config) -> KeySnapshot:
    """Load every configured key and build one context per identity; raises OperatorError."""
    keys = {name: load_key(key_config, config.keystore) for name, key_config in config.keys.items()}
    identities: dict[IdentityName, Identity] = {}
    for identity_name, key_names in config.identities().items():
        members = tuple(keys[name] for name in key_names)
        _check_one_key_per_type(members, identity_name, config.path)
        identities[identity_name] = Identity(identity_name, members, build_context(members))
    return KeySnapshot(
        keys=MappingProxyType(keys),
        identities=MappingProxyType(identities),
        warnings=tuple(warning for key in keys.values() for warning in key.warnings),
    )


def load_key(config: KeyConfig, settings: KeyStoreSettings, *, uid: int | None = None) -> LoadedKey:
    """Read, check and parse one key and its chain; `uid` is who we are (default: our euid)."""
    my_uid = os.geteuid() if uid is None else uid
    key_path, chain_path = f"keys.{config.name}.key", f"keys.{config.name}.chain"
    warnings: list[str] = []

    key_pem, key_status = _read_file(config.key, key_path)
    warnings += _check_private_file(config.key, key_path, key_status, my_uid, settings)
    private_key = _parse_private_key(key_pem, config.key, key_path)

    chain_pem, chain_status = _read_file(config.chain, chain_path)
    if _PRIVATE_KEY_LABEL.search(chain_pem):
        # A combined key-and-chain file is fine, as long as it is as private as a key file.
        warnings += _check_private_file(config.chain, chain_path, chain_status, my_uid, settings)
    chain = _parse_chain(chain_pem, config.chain, chain_path)
    _check_chain(chain, private_key, config.chain, chain_path)

    public_key = private_key.public_key()
    leaf = chain[0]
    return LoadedKey(
        name=config.name,
        key_file=config.key,
        chain_file=config.chain,
        family=KeyFamily.of(private_key),
        algorithm=describe_key_algorithm(public_key),
        pin=spki_pin(public_key),
        chain=chain,
        names=_san_names(leaf),
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        _private_key_pem=_SecretPem(key_pem),
        warnings=tuple(warnings),
    )


def read_private_key(path: Path, *, key_path: str = "") -> PrivateKey:
    """One private key file, with load_key's checks (permissions strict); for `dualproxy keys
    csr` and the dev bench, which need the key itself."""
    pem, status = _read_file(path, key_path)
    _check_private_file(path, key_path, status, os.geteuid(), KeyStoreSettings())
    return _parse_private_key(pem, path, key_path)


def key_file_permission_problem(mode: int, owner_uid: int, my_uid: int) -> str | None:
    """Why a private key file with this st_mode and owner is unsafe for us, or None if fine.

    The OpenSSH/PostgreSQL rule: a regular file, owned by us with no group or other bits, or
    owned by root with at most group read (0640, for a root-managed file shared through a group,
    as Kubernetes does with defaultMode 0440 and fsGroup).
    """
    if not stat.S_ISREG(mode):
        return f"is {_file_kind(mode)}, not a regular file"
    permissions = stat.S_IMODE(mode)
    if owner_uid == my_uid and not permissions & 0o077:
        return None
    if owner_uid == _ROOT_UID and not permissions & 0o037:
        return None
    if owner_uid not in (my_uid, _ROOT_UID):
        return (
            f"is owned by uid {owner_uid}, neither the user dualproxy runs as (uid {my_uid})"
            " nor root; chown it to that user"
        )
    allowed = "0640 or stricter (owned by root)" if owner_uid == _ROOT_UID else "0600 or stricter"
    return (
        f"has mode {permissions:04o}, which lets other users read or change the private key"
        f" (allowed: {allowed}); run chmod 600 on it (Kubernetes Secret volumes: defaultMode"
        " 0400, or 0440 with fsGroup)"
    )


def _read_file(path: Path, key_path: str) -> tuple[bytes, os.stat_result]:
    """The file's bytes and the status of the very file they came from; one open, one read."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then refuses it.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise OperatorError(
            "does not exist (or is a symlink to nothing)",
            fix="fix the path in the config or restore the file",
            key_path=key_path,
            file=path,
        ) from None
    except OSError as exc:
        raise OperatorError(
            f"cannot be opened: {exc.strerror}",
            fix="make it readable by the user dualproxy runs as",
            key_path=key_path,
            file=path,
        ) from None
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise OperatorError(
                f"is {_file_kind(status.st_mode)} (after following symlinks), not a regular file",
                fix="point it at the PEM file itself",
                key_path=key_path,
                file=path,
            )
        with open(fd, "rb", closefd=False) as reader:
            data = reader.read(MAX_PEM_FILE_BYTES + 1)
    except OSError as exc:
        raise OperatorError(
            f"cannot be read: {exc.strerror}", key_path=key_path, file=path
        ) from None
    finally:
        os.close(fd)
    if len(data) > MAX_PEM_FILE_BYTES:
        raise OperatorError(
            f"is larger than {MAX_PEM_FILE_BYTES} bytes, far more than any key or chain",
            fix="check the path",
            key_path=key_path,
            file=path,
        )
    return data, status


def _file_kind(mode: int) -> str:
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISLNK, "a symbolic link (the rule wants the status of its target)"),
    )
    return next((kind for test, kind in kinds if test(mode)), "a special file")


def _check_private_file(
    path: Path, key_path: str, status: os.stat_result, my_uid: int, settings: KeyStoreSettings
) -> list[str]:
    """Refuse a key file others can reach, or return the warning when the override is on."""
    problem = key_file_permission_problem(status.st_mode, status.st_uid, my_uid)
    if problem is None:
        return []
    if settings.allow_insecure_key_permissions:
        override = "loaded anyway because keystore.allow_insecure_key_permissions = true"
        return [locate(f"{problem}; {override}", key_path=key_path, file=path)]
    raise OperatorError(
        f"{problem}. Only if the storage cannot keep file modes, set"
        " keystore.allow_insecure_key_permissions = true",
        key_path=key_path,
        file=path,
    )


def _parse_private_key(pem: bytes, path: Path, key_path: str) -> PrivateKey:
    labels = {label.decode("ascii") for label in _PEM_LABEL.findall(pem)}
    encrypted = "ENCRYPTED PRIVATE KEY" in labels or b"Proc-Type: 4,ENCRYPTED" in pem
    if encrypted:
        raise OperatorError(
            "the private key is encrypted with a passphrase, which dualproxy does not handle"
            " (a server cannot type it at every restart)",
            fix=_DECRYPT_ADVICE.format(file=path),
            key_path=key_path,
            file=path,
        )
    if not any(label.endswith("PRIVATE KEY") for label in labels):
        raise OperatorError(
            _no_pem_problem(pem, labels, wanted="key"), key_path=key_path, file=path
        )
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # from None: the parser's message is not ours to vouch for, and the bytes are secret.
        raise OperatorError(
            "holds a private key block that cannot be parsed",
            fix=f"write it as PKCS#8 PEM with `openssl pkey -in {path} -out NEW_FILE` (umask 077"
            " first)",
            key_path=key_path,
            file=path,
        ) from None
    return _check_key_type(key, path, key_path)


_DECRYPT_ADVICE: Final = (
    "decrypt it into a new file with `(umask 077; openssl pkey -in {file} -out {file}.plain)`"
    " and point the key path there"
)


def _no_pem_problem(data: bytes, labels: set[str], *, wanted: Literal["key", "chain"]) -> str:
    """Why a file holds no usable key or certificate, saying what it seems to hold instead."""
    if wanted == "key" and "CERTIFICATE" in labels:
        return "holds a certificate but no private key; are the key and chain paths swapped?"
    if wanted == "chain" and any(label.endswith("PRIVATE KEY") for label in labels):
        return "holds a private key but no certificate; are the key and chain paths swapped?"
    if labels:
        return f"holds no {wanted} block; found {', '.join(sorted(labels))}"
    if data.startswith(b"\x30"):  # an ASN.1 SEQUENCE: binary DER
        convert = "pkey" if wanted == "key" else "x509"
        return f"is binary DER, not PEM; convert it with `openssl {convert} -inform DER`"
    return "is not a PEM file (no -----BEGIN ...----- line)"


def _check_key_type(key: object, path: Path, key_path: str) -> PrivateKey:
    """Only the key types and sizes that every mobile TLS stack and public CA accept."""
    generate = f"generate an {DEFAULT_KEY_TYPE.label} key with `dualproxy keys new NAME`"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.name in EC_CURVES:
            return key
        problem = f"is an EC key on {key.curve.name}; use P-256 or P-384 ({generate})"
    elif isinstance(key, rsa.RSAPrivateKey):
        if key.key_size >= MIN_RSA_BITS:
            return key
        problem = f"is a {key.key_size}-bit RSA key; use at least {MIN_RSA_BITS} bits ({generate})"
    elif isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        problem = (
            "is an EdDSA key; public CAs do not issue certificates for it and mobile TLS stacks"
            f" do not accept them: {generate}"
        )
    else:
        problem = f"is a {type(key).__name__}; dualproxy serves EC and RSA keys: {generate}"
    raise OperatorError(problem, key_path=key_path, file=path)


def _parse_chain(pem: bytes, path: Path, key_path: str) -> tuple[x509.Certificate, ...]:
    labels = {label.decode("ascii") for label in _PEM_LABEL.findall(pem)}
    if "CERTIFICATE" not in labels:
        raise OperatorError(
            _no_pem_problem(pem, labels, wanted="chain"), key_path=key_path, file=path
        )
    try:
        chain = tuple(x509.load_pem_x509_certificates(pem))
        for cert in chain:
            # cryptography parses extensions and keys lazily; a malformed one would surface
            # later as a bare ValueError, far from the file that holds it.
            _ = cert.extensions, cert.public_key()
        return chain
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise OperatorError(
            f"holds a certificate block that cannot be parsed ({exc})",
            fix="fetch the chain again",
            key_path=key_path,
            file=path,
        ) from exc


def _check_chain(
    chain: tuple[x509.Certificate, ...], key: PrivateKey, path: Path, key_path: str
) -> None:
    """The leaf is this key's certificate, fit for TLS, and each certificate's issuer is next."""
    ours = _spki(key.public_key())
    if _spki(chain[0].public_key()) != ours:
        position = next(
            (i for i, cert in enumerate(chain) if _spki(cert.public_key()) == ours), None
        )
        if position is not None:
            raise OperatorError(
                f"the certificate for this key is number {position + 1} in the file",
                fix="put it first (leaf first, then intermediates)",
                key_path=key_path,
                file=path,
            )
        raise OperatorError(
            f"the chain belongs to a different key (its leaf has pin"
            f" {spki_pin(chain[0].public_key())}, the key has {spki_pin(key.public_key())})",
            fix="was the chain written before the key? Re-issue the certificate for this key"
            " (dualproxy keys csr NAME) or point the key path at the key it was issued for",
            key_path=key_path,
            file=path,
        )
    _check_key_usage(chain[0], path, key_path)
    for position, (cert, issuer) in enumerate(pairwise(chain), start=1):
        if cert.issuer != issuer.subject:
            raise OperatorError(
                f"certificate {position} ({cert.subject.rfc4514_string()}) was not issued by"
                f" certificate {position + 1} ({issuer.subject.rfc4514_string()})",
                fix="write the leaf first, then intermediates, each followed by its issuer (as"
                " ACME clients write fullchain.pem)",
                key_path=key_path,
                file=path,
            )
        try:
            cert.verify_directly_issued_by(issuer)
        except (InvalidSignature, ValueError, TypeError):
            raise OperatorError(
                f"certificate {position} names certificate {position + 1} as its issuer, but"
                " its signature does not verify with that certificate's key (an intermediate"
                " of the same name from another CA key?)",
                fix="download the chain again",
                key_path=key_path,
                file=path,
            ) from None


def _check_key_usage(leaf: x509.Certificate, path: Path, key_path: str) -> None:
    """ECDHE handshakes sign with the key. A certificate that may not sign is silently skipped
    by OpenSSL in TLS 1.2 (another one is presented, or none), and sent but rejected by clients
    in TLS 1.3; either way the operator should hear it now."""
    try:
        usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not usage.digital_signature:
        raise OperatorError(
            "the certificate's key usage lacks digitalSignature, which every ECDHE handshake needs",
            fix="have it re-issued as a TLS server certificate",
            key_path=key_path,
            file=path,
        )


def _san_names(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(
        str(name.value) for name in sans if isinstance(name, x509.DNSName | x509.IPAddress)
    )


def _spki(public_key: CertificatePublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _check_one_key_per_type(
    keys: Sequence[LoadedKey], identity: IdentityName, config_file: Path | None
) -> None:
    clash = _same_type_pair(keys)
    if clash is None:
        return
    first, second = clash
    kind = first.family.upper()
    why = (
        "OpenSSL keeps one certificate per key type, so one would silently replace the other;"
        " an identity holds at most one EC and one RSA key"
    )
    if identity == "single":
        raise OperatorError(
            f"{first.name!r} and {second.name!r} are both {kind} keys and, without a"
            f" [rotation], are served together; {why}. Remove one, or add a [rotation] that"
            " serves them as old and new",
            key_path="keys",
            file=config_file,
        )
    raise OperatorError(
        f"{first.name!r} and {second.name!r} are both {kind} keys; {why}. List only one of them",
        key_path=f"rotation.{identity}",
        file=config_file,
    )


def _same_type_pair(keys: Sequence[LoadedKey]) -> tuple[LoadedKey, LoadedKey] | None:
    seen: dict[KeyFamily, LoadedKey] = {}
    for key in keys:
        if key.family in seen:
            return seen[key.family], key
        seen[key.family] = key
    return None


# --- contexts ----------------------------------------------------------------------------


def build_context(keys: Sequence[LoadedKey]) -> ssl.SSLContext:
    """A TLS server context holding each key's chain (at most one key per key family)."""
    if not keys or _same_type_pair(keys) is not None:
        raise ValueError("build_context needs one to two keys, of different key types")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # Replaces Python's default cipher string but keeps its security level (2), which the
    # prediction in Identity.presented_key relies on.
    context.set_ciphers(MOZILLA_INTERMEDIATE_TLS12_CIPHERS)
    context.set_alpn_protocols(list(ALPN_PROTOCOLS))
    # OP_CIPHER_SERVER_PREFERENCE (Python sets it on server contexts already; we do not rely
    # on that) decides which certificate a client gets when we hold an EC and an RSA one. In
    # TLS 1.2 the cipher suite names the certificate type, and with this option OpenSSL walks
    # our suite order (ECDSA first) instead of the client's; in TLS 1.3 it walks its own
    # signature-scheme order (ECDSA first) instead of the client's. Without it, a client that
    # merely lists RSA first would get the RSA certificate, and presented_key could not know.
    # Mozilla leaves server order off because all its suites are strong; we need it for this.
    context.options |= (
        ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    )
    context.num_tickets = TLS13_SESSION_TICKETS
    # A client's close without close_notify must stay an error, so that a cut is told from the
    # end of its stream: some interpreters (CPython 3.10 to 3.11.2, as Debian 12 ships) set
    # this option on every new context.
    context.options &= ~ssl.OP_IGNORE_UNEXPECTED_EOF
    for key in keys:
        _load_chain(context, key)
    return context


def _load_chain(context: ssl.SSLContext, key: LoadedKey) -> None:
    chain_pem = b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in key.chain)
    key_path = f"keys.{key.name}"

    def refuse_passphrase() -> bytes:
        # Never let OpenSSL prompt on the terminal. The bytes we pass were checked to be
        # unencrypted; only the fallback below, reading the path again, can get here.
        raise OperatorError(
            "changed to an encrypted key while loading",
            key_path=f"{key_path}.key",
            file=key.key_file,
        )

    try:
        if _memory_files_work():
            with (
                _memory_file(chain_pem) as chain_file,
                _memory_file(key._private_key_pem.reveal()) as key_file,
            ):
                context.load_cert_chain(chain_file, key_file, password=refuse_passphrase)
        else:
            # No memfd (macOS, or a sandbox forbids it): never spill the private key into a
            # temporary file. The chain is public, so it goes through one and OpenSSL still gets
            # exactly the certificates we checked; the key is read from its path again, and
            # load_cert_chain re-verifies that it matches the leaf, so a key that changed in
            # between can only be the same key, or fail here.
            with tempfile.NamedTemporaryFile(suffix=".pem") as chain_copy:
                chain_copy.write(chain_pem)
                chain_copy.flush()
                context.load_cert_chain(chain_copy.name, key.key_file, password=refuse_passphrase)
    except ssl.SSLError as exc:
        raise OperatorError(
            f"OpenSSL refused this key and chain ({exc.reason or exc})",
            fix="if a renewal is rewriting the files, the next reload retries",
            key_path=key_path,
            file=key.key_file,
        ) from exc


def _memory_files_work() -> bool:
    """memfd_create exists and /proc shows its descriptors as paths OpenSSL can open.

    Asked at every context build (a start or a reload, never per connection): one syscall,
    and a process that loses memfd (a sandbox tightened, a test) falls back at once."""
    if not hasattr(os, "memfd_create") or not os.path.isdir("/proc/self/fd"):
        return False
    try:
        os.close(os.memfd_create("dualproxy-probe", os.MFD_CLOEXEC))
    except OSError:
        return False
    return True


@contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    """A path whose contents are `data`, held in memory only, valid inside the block."""
    fd = os.memfd_create("dualproxy-pem", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        # Opening /proc/self/fd/N gives OpenSSL its own description of the file, at offset 0.
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _client_takes_ec_key(hello: ClientHello, ec_key: LoadedKey) -> bool:
    public_key = ec_key.leaf.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    curve = EC_CURVES[public_key.curve.name]
    if hello.offers_tls13:
        return curve.tls13_scheme in hello.signature_algorithms
    offered = set(hello.signature_algorithms)
    usable = {
        family: not offered or bool(offered & schemes) for family, schemes in _TLS12_SCHEMES.items()
    }
    # TLS 1.2 (RFC 8422 §5.1.1): an ECDSA certificate's curve must be among the client's groups.
    usable[KeyFamily.EC] &= not hello.supported_groups or curve.group in hello.supported_groups
    for suite in TLS12_CIPHER_SUITES:
        if suite.code in hello.cipher_suites and usable[suite.family]:
            return suite.family is KeyFamily.EC
    return False
