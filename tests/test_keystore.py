"""keystore.py: keys and chains load with the right facts, every unusable file is refused with
its key path next to the twin that passes, and real handshakes confirm which certificate
OpenSSL presents (what `Identity.presented_key` predicts) on the contexts we build."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
import re
import socket
import ssl
import stat
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    PrivateKeyTypes,
)
from cryptography.x509.oid import NameOID

from dualproxy.config.errors import OperatorError
from dualproxy.config.names import ListenAddress
from dualproxy.config.schema import Config, KeyConfig, KeyStoreSettings, ListenConfig, Rotation
from dualproxy.tls import keystore
from dualproxy.tls.clienthello import MAX_CLIENT_HELLO_BYTES, ClientHello, parse_client_hello
from dualproxy.tls.keygen import KeyFamily, generate_private_key, make_csr, write_private_key
from dualproxy.tls.keystore import (
    MAX_PEM_FILE_BYTES,
    Identity,
    LoadedKey,
    build_context,
    key_file_permission_problem,
    load_key,
    load_snapshot,
    read_private_key,
)

HOST: Final = "api.example.com"
STRICT: Final = KeyStoreSettings()
LENIENT: Final = KeyStoreSettings(allow_insecure_key_permissions=True)
# Bounds every socket wait, thread join and subprocess, so a bug fails the test instead of
# hanging it; generous for a loaded CI machine, and never asserted on.
IO_TIMEOUT: Final = 10.0
# Someone other than root and other than whoever runs the tests, for uid injection.
OTHER_UID: Final = 4242

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")


# --- material ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Material:
    """A private key's PEM and its chain's PEM, as they would sit in files."""

    key_pem: bytes = dataclasses.field(repr=False)  # keep test reports free of key material
    chain_pem: bytes


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def _from_trustme(leaf: trustme.LeafCert) -> Material:
    return Material(
        leaf.private_key_pem.bytes(), b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
    )


@pytest.fixture(scope="module")
def material(ca: trustme.CA) -> dict[str, Material]:
    """Keys made once per module (RSA generation is the slow part)."""
    p384 = ec.generate_private_key(ec.SECP384R1())
    return {
        "ec": _from_trustme(ca.issue_cert(HOST, "127.0.0.1", key_type=trustme.KeyType.ECDSA)),
        "ec2": _from_trustme(ca.issue_cert(HOST, key_type=trustme.KeyType.ECDSA)),
        "rsa": _from_trustme(ca.issue_cert(HOST, "127.0.0.1", key_type=trustme.KeyType.RSA)),
        "p384": Material(pem_of(p384), pem_chain(issue(p384, p384, subject="p384"))),
    }


def pem_of(
    key: PrivateKeyTypes,
    private_format: serialization.PrivateFormat = serialization.PrivateFormat.PKCS8,
    encryption: serialization.KeySerializationEncryption | None = None,
) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, private_format, encryption or serialization.NoEncryption()
    )


def pem_chain(*certs: x509.Certificate) -> bytes:
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)


def issue(
    key: CertificateIssuerPrivateKeyTypes,
    issuer_key: CertificateIssuerPrivateKeyTypes,
    *,
    subject: str,
    issuer: str | None = None,
    digital_signature: bool = True,
    is_ca: bool = False,
) -> x509.Certificate:
    """A certificate for `key`'s public half, signed by `issuer_key`, naming HOST."""
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer or subject)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(HOST)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=digital_signature,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=is_ca,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    algorithm = None if isinstance(issuer_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(issuer_key, algorithm)


def write(folder: Path, name: str, files: Material, *, mode: int = 0o600) -> KeyConfig:
    """key.pem (with `mode`) and chain.pem under folder/name, as a [keys.NAME] entry."""
    directory = folder / name
    directory.mkdir(exist_ok=True)
    key_file, chain_file = directory / "key.pem", directory / "chain.pem"
    key_file.write_bytes(files.key_pem)
    key_file.chmod(mode)
    chain_file.write_bytes(files.chain_pem)
    return KeyConfig(name=name, key=key_file, chain=chain_file)


def refused(
    config: KeyConfig, *, settings: KeyStoreSettings = STRICT, uid: int | None = None
) -> OperatorError:
    with pytest.raises(OperatorError) as info:
        load_key(config, settings, uid=uid)
    return info.value


def make_config(
    folder: Path,
    keys: Sequence[KeyConfig],
    *,
    old: Sequence[str] = (),
    new: Sequence[str] = (),
) -> Config:
    now = datetime.now(UTC)
    rotation = None
    if old or new:
        rotation = Rotation(
            old=tuple(old),
            new=tuple(new),
            grace_start=now - timedelta(days=1),
            grace_end=now + timedelta(days=30),
        )
    return Config(
        listen=ListenConfig((ListenAddress("127.0.0.1", 0),)),
        keys=MappingProxyType({key.name: key for key in keys}),
        rotation=rotation,
        path=folder / "config.toml",
    )


def identity_of(folder: Path, *files: Material) -> Identity:
    """The single identity serving these keys (named k0, k1, ...)."""
    keys = [write(folder, f"k{i}", each) for i, each in enumerate(files)]
    return load_snapshot(make_config(folder, keys)).identities["single"]


def spki_sha256(cert: x509.Certificate) -> str:
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode("ascii")


# --- no key material in errors or reprs, in any test of this file ------------------------


def key_material(blobs: Iterable[bytes]) -> list[str]:
    """Chunks of the base64 body of every private key PEM block in `blobs`."""
    chunks = []
    for blob in blobs:
        text = blob.decode("ascii", errors="replace")
        for block in re.findall(r"-----BEGIN [A-Z ]*PRIVATE KEY-----(.*?)-----END", text, re.S):
            lines = [line for line in block.splitlines() if line and ":" not in line]
            chunks += [line[:32] for line in lines if len(line) >= 32]
    return chunks


def files_under(folder: Path) -> list[bytes]:
    return [
        path.read_bytes() for path in folder.rglob("*") if not path.is_symlink() and path.is_file()
    ]


def assert_no_key_material(text: str, chunks: Sequence[str]) -> None:
    assert "PRIVATE KEY" not in text
    leaked = [chunk for chunk in chunks if chunk in text]
    assert not leaked, f"{len(leaked)} chunks of key material in {text[:80]!r}..."


@pytest.fixture(autouse=True)
def _key_material_never_shown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The str and repr of every OperatorError raised and LoadedKey built during each test hold
    no key material: none from the files opened for reading (the keystore's reads, watched at
    the os.open it calls), nor from those left in tmp_path."""
    built: list[object] = []
    for cls in (OperatorError, LoadedKey):

        def recording_init(self: object, *args: Any, _init: Any = cls.__init__, **kw: Any) -> None:
            _init(self, *args, **kw)
            built.append(self)

        monkeypatch.setattr(cls, "__init__", recording_init)
    read: list[bytes] = []
    real_open = os.open

    def recording_open(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        fd = real_open(path, flags, mode, **kw)
        if not flags & (os.O_WRONLY | os.O_RDWR):
            status = os.fstat(fd)
            if stat.S_ISREG(status.st_mode) and status.st_size <= MAX_PEM_FILE_BYTES:
                read.append(os.pread(fd, status.st_size, 0))  # leaves the offset where it is
        return fd

    monkeypatch.setattr(os, "open", recording_open)
    yield
    chunks = key_material([*read, *files_under(tmp_path)])
    for thing in built:
        assert_no_key_material(str(thing), chunks)
        assert_no_key_material(repr(thing), chunks)


def test_leak_check_catches_key_material(tmp_path: Path, material: dict[str, Material]) -> None:
    write(tmp_path, "k", material["ec"])
    chunks = key_material(files_under(tmp_path))
    assert chunks
    with pytest.raises(AssertionError):
        assert_no_key_material(repr(material["ec"].key_pem.split(b"\n", 1)[1]), chunks)
    with pytest.raises(AssertionError):
        # The armour line alone, taken from the key generated for this test run.
        assert_no_key_material(material["ec"].key_pem.split(b"\n", 1)[0].decode(), [])


def test_loaded_key_hides_its_private_key_everywhere(
    tmp_path: Path, material: dict[str, Material]
) -> None:
    snapshot = load_snapshot(make_config(tmp_path, [write(tmp_path, "k", material["rsa"])]))
    key = snapshot.keys["k"]
    chunks = key_material(files_under(tmp_path))
    for text in (repr(key), str(key), str(dataclasses.asdict(key)), repr(snapshot)):
        assert_no_key_material(text, chunks)


# --- loading -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("which", "family", "algorithm"),
    [("ec", KeyFamily.EC, "ECDSA P-256"), ("rsa", KeyFamily.RSA, "RSA 2048")],
)
def test_loads_key_and_chain(
    tmp_path: Path, material: dict[str, Material], which: str, family: KeyFamily, algorithm: str
) -> None:
    config = write(tmp_path, "k2026a", material[which])
    key = load_key(config, STRICT)
    leaf = x509.load_pem_x509_certificate(material[which].chain_pem)
    assert key.name == "k2026a"
    assert (key.key_file, key.chain_file) == (config.key, config.chain)
    assert key.family is family
    assert key.algorithm == algorithm
    assert key.pin == spki_sha256(leaf)
    assert key.chain == (leaf,)
    assert key.leaf == leaf
    assert key.names == (HOST, "127.0.0.1")
    assert key.not_after == leaf.not_valid_after_utc
    assert key.not_before == leaf.not_valid_before_utc
    assert key.not_after.utcoffset() == timedelta(0)
    assert key.warnings == ()


def test_loads_p384_key(tmp_path: Path, material: dict[str, Material]) -> None:
    key = load_key(write(tmp_path, "k", material["p384"]), STRICT)
    assert (key.family, key.algorithm, key.names) == (KeyFamily.EC, "ECDSA P-384", (HOST,))


def test_loads_chain_with_intermediate(tmp_path: Path, ca: trustme.CA) -> None:
    intermediate = ca.create_child_ca()
    key = load_key(write(tmp_path, "k", _from_trustme(intermediate.issue_cert(HOST))), STRICT)
    assert len(key.chain) == 2
    assert key.chain[0].issuer == key.chain[1].subject


def test_loads_combined_key_and_chain_file(tmp_path: Path, material: dict[str, Material]) -> None:
    """One 0600 file holding key and chain may serve as both paths."""
    files = material["ec"]
    config = write(tmp_path, "k", Material(files.key_pem + files.chain_pem, b""))
    key = load_key(KeyConfig("k", config.key, config.key), STRICT)
    assert key.pin == spki_sha256(x509.load_pem_x509_certificate(files.chain_pem))


def test_chain_file_holding_a_key_must_be_private(
    tmp_path: Path, material: dict[str, Material]
) -> None:
    files = material["ec"]
    config = write(tmp_path, "k", Material(files.key_pem, files.chain_pem + files.key_pem))
    config.chain.chmod(0o644)
    error = refused(config)
    assert error.key_path == "keys.k.chain"
    assert "0644" in error.problem


# --- refusals, each with the file and the key path ---------------------------------------


@pytest.mark.parametrize("role", ["key", "chain"])
def test_missing_file(tmp_path: Path, material: dict[str, Material], role: str) -> None:
    config = write(tmp_path, "k", material["ec"])
    missing = config.key if role == "key" else config.chain
    missing.unlink()
    error = refused(config)
    assert (error.key_path, error.file) == (f"keys.k.{role}", missing)
    assert "does not exist" in error.problem
    assert str(missing) in str(error)


def test_dangling_symlink(tmp_path: Path, material: dict[str, Material]) -> None:
    config = write(tmp_path, "k", material["ec"])
    config.key.unlink()
    config.key.symlink_to(tmp_path / "gone.pem")
    assert refused(config).key_path == "keys.k.key"


def _der_key(files: Material) -> bytes:
    key = serialization.load_pem_private_key(files.key_pem, None)
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.mark.parametrize(
    ("case", "role", "says"),
    [
        ("key is text", "key", "not a PEM file"),
        ("key is DER", "key", "openssl pkey -inform DER"),
        ("key file holds the chain", "key", "swapped"),
        ("chain is text", "chain", "not a PEM file"),
        ("chain file holds the key", "chain", "swapped"),
        ("chain holds a CSR", "chain", "found CERTIFICATE REQUEST"),
    ],
)
def test_not_the_expected_pem(
    tmp_path: Path, material: dict[str, Material], case: str, role: str, says: str
) -> None:
    files = material["ec"]
    key = serialization.load_pem_private_key(files.key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    csr = make_csr(key, [HOST])
    broken = {
        "key is text": Material(b"hello\n", files.chain_pem),
        "key is DER": Material(_der_key(files), files.chain_pem),
        "key file holds the chain": Material(files.chain_pem, files.chain_pem),
        "chain is text": Material(files.key_pem, b"hello\n"),
        "chain file holds the key": Material(files.key_pem, files.key_pem),
        "chain holds a CSR": Material(files.key_pem, csr.public_bytes(serialization.Encoding.PEM)),
    }[case]
    config = write(tmp_path, "k", broken)
    config.chain.chmod(0o600)  # so "chain file holds the key" fails on content, not mode
    error = refused(config)
    assert error.key_path == f"keys.k.{role}"
    assert says in error.problem


@pytest.mark.parametrize(
    "private_format",
    [serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL],
    ids=["pkcs8", "traditional"],
)
def test_encrypted_key_is_refused_with_how_to_decrypt(
    tmp_path: Path, material: dict[str, Material], private_format: serialization.PrivateFormat
) -> None:
    files = material["ec"]
    key = serialization.load_pem_private_key(files.key_pem, None)
    encrypted = pem_of(key, private_format, serialization.BestAvailableEncryption(b"hunter2"))
    error = refused(write(tmp_path, "k", Material(encrypted, files.chain_pem)))
    assert error.key_path == "keys.k.key"
    assert "passphrase" in error.problem
    assert "openssl pkey -in" in error.fix
    # The twin: the same key, unencrypted, in the same format.
    plain = Material(pem_of(key, private_format), files.chain_pem)
    assert load_key(write(tmp_path, "k", plain), STRICT).family is KeyFamily.EC


@pytest.mark.parametrize(
    ("make_key", "says"),
    [
        (ed25519.Ed25519PrivateKey.generate, "EdDSA"),
        (lambda: ec.generate_private_key(ec.SECP521R1()), "secp521r1"),
        (lambda: ec.generate_private_key(ec.SECP256K1()), "secp256k1"),
        (lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024), "1024-bit"),
    ],
    ids=["ed25519", "p521", "secp256k1", "rsa1024"],
)
def test_refuses_key_types_we_do_not_serve(
    tmp_path: Path, material: dict[str, Material], make_key: Any, says: str
) -> None:
    """The twins that pass: P-256, P-384 and RSA 2048 in the loading tests above."""
    files = Material(pem_of(make_key()), material["ec"].chain_pem)
    error = refused(write(tmp_path, "k", files))
    assert error.key_path == "keys.k.key"
    assert says in error.problem
    assert "dualproxy keys new" in error.problem


def test_chain_of_another_key(tmp_path: Path, material: dict[str, Material]) -> None:
    """The twin that passes: each key with its own chain, in the loading tests."""
    files = Material(material["ec"].key_pem, material["ec2"].chain_pem)
    error = refused(write(tmp_path, "k", files))
    assert error.key_path == "keys.k.chain"
    assert "belongs to a different key" in error.problem
    assert "written before the key" in error.fix
    assert spki_sha256(x509.load_pem_x509_certificate(material["ec2"].chain_pem)) in error.problem


def test_leaf_not_first(tmp_path: Path, ca: trustme.CA) -> None:
    leaf = ca.create_child_ca().issue_cert(HOST)
    reversed_chain = b"".join(blob.bytes() for blob in reversed(leaf.cert_chain_pems))
    error = refused(write(tmp_path, "k", Material(leaf.private_key_pem.bytes(), reversed_chain)))
    assert error.key_path == "keys.k.chain"
    assert "number 2" in error.problem
    assert "leaf first" in error.fix


def test_intermediates_out_of_order(tmp_path: Path, ca: trustme.CA) -> None:
    upper = ca.create_child_ca()
    lower = upper.create_child_ca()
    leaf = lower.issue_cert(HOST)
    leaf_pem, lower_pem, upper_pem = (blob.bytes() for blob in leaf.cert_chain_pems)
    key_pem = leaf.private_key_pem.bytes()
    error = refused(write(tmp_path, "k", Material(key_pem, leaf_pem + upper_pem + lower_pem)))
    assert error.key_path == "keys.k.chain"
    assert "certificate 1" in error.problem
    assert "was not issued by certificate 2" in error.problem
    in_order = load_key(
        write(tmp_path, "k", Material(key_pem, leaf_pem + lower_pem + upper_pem)), STRICT
    )
    assert len(in_order.chain) == 3


def test_intermediate_with_the_right_name_but_another_key(tmp_path: Path) -> None:
    leaf_key, real_ca_key, impostor_key = (
        ec.generate_private_key(ec.SECP256R1()) for _ in range(3)
    )
    leaf = issue(leaf_key, real_ca_key, subject="leaf", issuer="Example CA")
    real = issue(real_ca_key, real_ca_key, subject="Example CA", is_ca=True)
    impostor = issue(impostor_key, impostor_key, subject="Example CA", is_ca=True)
    error = refused(write(tmp_path, "k", Material(pem_of(leaf_key), pem_chain(leaf, impostor))))
    assert error.key_path == "keys.k.chain"
    assert "does not verify" in error.problem
    assert (
        len(
            load_key(
                write(tmp_path, "k", Material(pem_of(leaf_key), pem_chain(leaf, real))), STRICT
            ).chain
        )
        == 2
    )


@pytest.mark.parametrize("digital_signature", [True, False])
def test_leaf_must_allow_signatures(tmp_path: Path, digital_signature: bool) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = issue(key, key, subject="leaf", digital_signature=digital_signature)
    config = write(tmp_path, "k", Material(pem_of(key), pem_chain(cert)))
    if digital_signature:
        assert load_key(config, STRICT).family is KeyFamily.EC
    else:
        error = refused(config)
        assert (error.key_path, "digitalSignature" in error.problem) == ("keys.k.chain", True)


def test_malformed_certificate_extension_is_an_operator_error(tmp_path: Path) -> None:
    # cryptography parses extensions lazily: a garbled one must still be reported as the
    # chain file's problem, not escape later as a bare ValueError.
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "garbled")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(
            x509.UnrecognizedExtension(
                x509.oid.ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"\x04\x03not-der"
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    error = refused(write(tmp_path, "k", Material(pem_of(key), pem_chain(cert))))
    assert error.key_path == "keys.k.chain"
    assert "cannot be parsed" in error.problem


def test_file_too_large(tmp_path: Path, material: dict[str, Material]) -> None:
    files = material["ec"]
    padding = b"\n" * (keystore.MAX_PEM_FILE_BYTES + 1 - len(files.chain_pem))
    error = refused(write(tmp_path, "k", Material(files.key_pem, files.chain_pem + padding)))
    assert error.key_path == "keys.k.chain"
    assert "larger than" in error.problem
    fits = Material(files.key_pem, files.chain_pem + padding[:-1])
    assert load_key(write(tmp_path, "k", fits), STRICT).chain


# --- permissions -------------------------------------------------------------------------

ME: Final = 1000
REG: Final = stat.S_IFREG


@pytest.mark.parametrize(
    ("mode", "owner", "allowed"),
    [
        (REG | 0o600, ME, True),
        (REG | 0o400, ME, True),
        (REG | 0o700, ME, True),
        (REG | 0o640, ME, False),  # group may read
        (REG | 0o604, ME, False),
        (REG | 0o644, ME, False),
        (REG | 0o620, ME, False),  # group may write
        (REG | 0o600, 0, True),  # root-owned
        (REG | 0o640, 0, True),  # root-owned, shared through a group (Kubernetes fsGroup)
        (REG | 0o440, 0, True),
        (REG | 0o660, 0, False),  # group may write
        (REG | 0o650, 0, False),
        (REG | 0o644, 0, False),
        (REG | 0o600, 2000, False),  # someone else's
        (stat.S_IFDIR | 0o700, ME, False),
        (stat.S_IFIFO | 0o600, ME, False),
        (stat.S_IFLNK | 0o600, ME, False),  # lstat's view: the rule wants the target's
    ],
)
def test_key_file_permission_rule(mode: int, owner: int, allowed: bool) -> None:
    assert (key_file_permission_problem(mode, owner, ME) is None) == allowed


def test_key_file_permission_rule_as_root() -> None:
    """When we are root, root-owned is "ours": 0600 and, by the root rule, 0640 pass."""
    assert key_file_permission_problem(REG | 0o640, 0, 0) is None
    assert key_file_permission_problem(REG | 0o644, 0, 0) is not None


@pytest.mark.parametrize(
    ("mode", "allowed"), [(0o600, True), (0o400, True), (0o640, False), (0o644, False)]
)
def test_own_key_file_modes(
    tmp_path: Path, material: dict[str, Material], mode: int, allowed: bool
) -> None:
    config = write(tmp_path, "k", material["ec"], mode=mode)
    owner = config.key.stat().st_uid
    if owner == 0 and mode == 0o640:
        owner = OTHER_UID  # we are root: pretend to be the owner without root's 0640 exception
        os.chown(config.key, owner, -1)
    if allowed:
        assert load_key(config, STRICT, uid=owner).warnings == ()
    else:
        error = refused(config, uid=owner)
        assert error.key_path == "keys.k.key"
        assert f"{mode:04o}" in error.problem
        assert "chmod 600" in error.problem


@needs_root
@pytest.mark.parametrize(
    ("mode", "allowed"),
    [(0o640, True), (0o440, True), (0o600, True), (0o644, False), (0o660, False)],
)
def test_root_owned_key_file_modes(
    tmp_path: Path, material: dict[str, Material], mode: int, allowed: bool
) -> None:
    config = write(tmp_path, "k", material["ec"], mode=mode)
    os.chown(config.key, 0, OTHER_UID)
    if allowed:
        assert load_key(config, STRICT, uid=OTHER_UID).family is KeyFamily.EC
    else:
        assert refused(config, uid=OTHER_UID).key_path == "keys.k.key"


@needs_root
def test_key_file_owned_by_someone_else(tmp_path: Path, material: dict[str, Material]) -> None:
    config = write(tmp_path, "k", material["ec"])
    os.chown(config.key, OTHER_UID, OTHER_UID)
    error = refused(config)  # as ourselves (root): the file belongs to neither us nor root
    assert error.key_path == "keys.k.key"
    assert f"owned by uid {OTHER_UID}" in error.problem
    assert load_key(config, STRICT, uid=OTHER_UID).family is KeyFamily.EC  # as its owner


def test_insecure_permissions_override_warns(tmp_path: Path, material: dict[str, Material]) -> None:
    config = write(tmp_path, "k", material["ec"], mode=0o644)
    assert refused(config).key_path == "keys.k.key"
    key = load_key(config, LENIENT)
    assert len(key.warnings) == 1
    assert str(config.key) in key.warnings[0]
    assert "allow_insecure_key_permissions" in key.warnings[0]
    lenient = dataclasses.replace(make_config(tmp_path, [config]), keystore=LENIENT)
    assert load_snapshot(lenient).warnings == key.warnings


def test_kubernetes_style_symlinks_pass(tmp_path: Path, material: dict[str, Material]) -> None:
    """A Secret volume: key.pem -> ..data/key.pem, ..data -> ..2026_01_01_00_00_00.1/."""
    real = write(tmp_path, "..2026_01_01_00_00_00.1", material["ec"])
    mount = tmp_path / "mount"
    mount.mkdir()
    (mount / "..data").symlink_to(real.key.parent)
    (mount / "key.pem").symlink_to(mount / "..data" / "key.pem")
    (mount / "chain.pem").symlink_to(mount / "..data" / "chain.pem")
    config = KeyConfig("k", mount / "key.pem", mount / "chain.pem")
    assert load_key(config, STRICT).pin == load_key(real, STRICT).pin
    real.key.chmod(0o644)  # the target's mode is what counts
    assert refused(config).key_path == "keys.k.key"


@pytest.mark.parametrize("role", ["key", "chain"])
@pytest.mark.parametrize("target", ["directory", "fifo"])
def test_symlink_to_a_non_regular_file_fails(
    tmp_path: Path, material: dict[str, Material], role: str, target: str
) -> None:
    config = write(tmp_path, "k", material["ec"])
    odd = tmp_path / target
    if target == "directory":
        odd.mkdir()
    else:
        os.mkfifo(odd)  # opening it must not wait for a writer
    link = config.key if role == "key" else config.chain
    link.unlink()
    link.symlink_to(odd)
    error = refused(config, settings=LENIENT)  # the override covers modes, never file types
    assert error.key_path == f"keys.k.{role}"
    assert f"is a {'directory' if target == 'directory' else 'FIFO'}" in error.problem


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_every_descriptor_is_closed(tmp_path: Path, material: dict[str, Material]) -> None:
    good = write(tmp_path, "good", material["ec"])
    fifo_chain = write(tmp_path, "fifo", material["ec"])
    fifo_chain.chain.unlink()
    os.mkfifo(fifo_chain.chain)
    bad_mode = write(tmp_path, "mode", material["ec"], mode=0o644)
    before = _open_fds()
    for _ in range(3):
        build_context([load_key(good, STRICT)])
        refused(fifo_chain)
        refused(bad_mode)
    assert _open_fds() == before


# --- identities --------------------------------------------------------------------------


def test_single_identity_with_two_ec_keys(tmp_path: Path, material: dict[str, Material]) -> None:
    keys = [write(tmp_path, "a", material["ec"]), write(tmp_path, "b", material["ec2"])]
    config = make_config(tmp_path, keys)
    with pytest.raises(OperatorError) as info:
        load_snapshot(config)
    assert (info.value.key_path, info.value.file) == ("keys", config.path)
    assert "'a' and 'b' are both EC keys" in info.value.problem
    assert "[rotation]" in info.value.problem


@pytest.mark.parametrize("role", ["old", "new"])
def test_rotation_identity_with_two_ec_keys(
    tmp_path: Path, material: dict[str, Material], role: str
) -> None:
    keys = [write(tmp_path, name, material[name]) for name in ("ec", "ec2", "rsa")]
    crowded, other = (("ec", "ec2"), ("rsa",))
    old, new = (crowded, other) if role == "old" else (other, crowded)
    with pytest.raises(OperatorError) as info:
        load_snapshot(make_config(tmp_path, keys, old=old, new=new))
    assert info.value.key_path == f"rotation.{role}"
    assert "one EC and one RSA key" in info.value.problem


def test_rotation_snapshot(tmp_path: Path, material: dict[str, Material]) -> None:
    """The twin: one EC key old, an EC and an RSA key new."""
    keys = [write(tmp_path, name, material[name]) for name in ("ec", "ec2", "rsa")]
    snapshot = load_snapshot(make_config(tmp_path, keys, old=["ec"], new=["ec2", "rsa"]))
    assert set(snapshot.keys) == {"ec", "ec2", "rsa"}
    assert set(snapshot.identities) == {"old", "new"}
    assert [k.name for k in snapshot.identities["old"].keys] == ["ec"]
    assert [k.name for k in snapshot.identities["new"].keys] == ["ec2", "rsa"]
    assert snapshot.identities["new"].name == "new"
    assert snapshot.warnings == ()


def test_build_context_needs_keys_of_different_types(
    tmp_path: Path, material: dict[str, Material]
) -> None:
    a, b = (load_key(write(tmp_path, n, material[n]), STRICT) for n in ("ec", "ec2"))
    with pytest.raises(ValueError, match="different key types"):
        build_context([a, b])
    with pytest.raises(ValueError, match="different key types"):
        build_context([])


def test_context_settings(tmp_path: Path, material: dict[str, Material]) -> None:
    context = identity_of(tmp_path, material["ec"], material["rsa"]).context
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    for option in (ssl.OP_CIPHER_SERVER_PREFERENCE, ssl.OP_NO_COMPRESSION, ssl.OP_NO_RENEGOTIATION):
        assert context.options & option
    tls12 = [c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12 == [suite.openssl_name for suite in keystore.TLS12_CIPHER_SUITES]


def test_a_client_close_without_close_notify_stays_an_error_whatever_the_interpreter(
    tmp_path: Path, material: dict[str, Material], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Older CPython 3.10 and 3.11 releases (Debian 12's 3.11.2) set OP_IGNORE_UNEXPECTED_EOF
    on every new context; ours clears it, so a cut client is never read as a clean end."""
    new = ssl.SSLContext.__new__

    def lenient(cls: type[ssl.SSLContext], *args: Any, **kwargs: Any) -> ssl.SSLContext:
        context = new(cls, *args, **kwargs)
        context.options |= ssl.OP_IGNORE_UNEXPECTED_EOF
        return context

    monkeypatch.setattr(ssl.SSLContext, "__new__", lenient)
    assert ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).options & ssl.OP_IGNORE_UNEXPECTED_EOF
    context = identity_of(tmp_path, material["ec"]).context
    assert not context.options & ssl.OP_IGNORE_UNEXPECTED_EOF


# --- which key OpenSSL presents: the model, on constructed hellos ------------------------

TLS12: Final = 0x0303
TLS13: Final = 0x0304
ECDSA_P256_SHA256: Final = 0x0403
ECDSA_P384_SHA384: Final = 0x0503
ECDSA_SHA1: Final = 0x0203
RSA_PSS_RSAE_SHA256: Final = 0x0804
RSA_PKCS1_SHA256: Final = 0x0401
ECDHE_ECDSA_AES128: Final = 0xC02B
ECDHE_ECDSA_AES256: Final = 0xC02C
ECDHE_RSA_AES128: Final = 0xC02F
X25519: Final = 0x001D
SECP256R1: Final = 0x0017
SECP384R1: Final = 0x0018


def hello(
    *,
    versions: tuple[int, ...] = (TLS13, TLS12),
    suites: tuple[int, ...] = (0x1301, ECDHE_ECDSA_AES128, ECDHE_RSA_AES128),
    schemes: tuple[int, ...] = (ECDSA_P256_SHA256, RSA_PSS_RSAE_SHA256, RSA_PKCS1_SHA256),
    groups: tuple[int, ...] = (X25519, SECP256R1),
) -> ClientHello:
    return ClientHello(
        legacy_version=TLS12,
        cipher_suites=suites,
        sni=HOST,
        alpn=(b"http/1.1",),
        signature_algorithms=schemes,
        supported_versions=versions,
        supported_groups=groups,
    )


TLS12_ONLY: Final = ()  # no supported_versions extension: a TLS 1.2 client


@pytest.mark.parametrize(
    ("client", "expected"),
    [
        (None, "ec"),
        (hello(), "ec"),
        (hello(schemes=(RSA_PSS_RSAE_SHA256,)), "rsa"),
        (hello(schemes=(RSA_PSS_RSAE_SHA256, ECDSA_P256_SHA256)), "ec"),  # our order, not theirs
        (hello(schemes=(ECDSA_P384_SHA384, RSA_PSS_RSAE_SHA256)), "rsa"),  # 1.3: curve-bound
        (hello(schemes=(RSA_PKCS1_SHA256,)), "rsa"),  # no 1.3 scheme fits: fails, RSA by rule
        (hello(groups=(SECP384R1,)), "ec"),  # 1.3: groups do not constrain the certificate
        (hello(versions=TLS12_ONLY), "ec"),
        (hello(versions=TLS12_ONLY, schemes=(ECDSA_P384_SHA384, RSA_PKCS1_SHA256)), "ec"),
        (hello(versions=TLS12_ONLY, schemes=(ECDSA_SHA1, RSA_PKCS1_SHA256)), "rsa"),
        (hello(versions=TLS12_ONLY, schemes=()), "ec"),  # no extension: SHA-1 defaults, both
        (hello(versions=TLS12_ONLY, schemes=(), suites=(ECDHE_RSA_AES128,)), "rsa"),
        (hello(versions=TLS12_ONLY, groups=(SECP384R1,)), "rsa"),  # P-256 not among groups
        (hello(versions=TLS12_ONLY, groups=()), "ec"),  # no extension: any curve
        (hello(versions=TLS12_ONLY, suites=(ECDHE_RSA_AES128, ECDHE_ECDSA_AES128)), "ec"),
        (hello(versions=TLS12_ONLY, suites=(ECDHE_ECDSA_AES256, ECDHE_RSA_AES128)), "rsa"),
        (hello(versions=TLS12_ONLY, suites=(0x009C,)), "rsa"),  # nothing we serve
    ],
)
def test_presented_key_model(
    tmp_path: Path, material: dict[str, Material], client: ClientHello | None, expected: str
) -> None:
    identity = identity_of(tmp_path, material["ec"], material["rsa"])
    assert identity.presented_key(client).family == expected


@pytest.mark.parametrize("which", ["ec", "rsa"])
def test_one_key_is_always_presented(
    tmp_path: Path, material: dict[str, Material], which: str
) -> None:
    identity = identity_of(tmp_path, material[which])
    for client in (None, hello(), hello(schemes=(RSA_PSS_RSAE_SHA256,)), hello(versions=())):
        assert identity.presented_key(client) is identity.keys[0]


# --- real handshakes ---------------------------------------------------------------------


@dataclasses.dataclass
class Served:
    """What the one-connection server saw: the parsed ClientHello and the handshake result."""

    hello: ClientHello | None = None
    version: str | None = None
    alpn: str | None = None
    error: Exception | None = None


def peek_client_hello(conn: socket.socket) -> ClientHello:
    """The ClientHello, left unread in the socket for the TLS handshake that follows."""
    deadline = time.monotonic() + IO_TIMEOUT
    while time.monotonic() < deadline:
        data = conn.recv(MAX_CLIENT_HELLO_BYTES, socket.MSG_PEEK)
        if not data:
            raise ConnectionError("closed before sending a ClientHello")
        parsed = parse_client_hello(data)
        if parsed is not None:
            return parsed
        time.sleep(0.01)  # MSG_PEEK returns at once while the rest is in flight
    raise TimeoutError("no complete ClientHello")


@contextmanager
def serving(context: ssl.SSLContext) -> Iterator[tuple[tuple[str, int], Served]]:
    """Serve one TLS connection on loopback from a thread; read `Served` after the block.

    After its handshake the server sends a line and closes, so the client, reading to the end,
    never closes first with the server's session tickets unread.
    """
    served = Served()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(IO_TIMEOUT)

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                with conn:
                    conn.settimeout(IO_TIMEOUT)
                    served.hello = peek_client_hello(conn)
                    with context.wrap_socket(conn, server_side=True) as tls:
                        served.version = tls.version()
                        served.alpn = tls.selected_alpn_protocol()
                        tls.sendall(b"done\n")
            except Exception as exc:  # reported to the test through `served`
                served.error = exc

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            host, port = listener.getsockname()[:2]
            yield (host, port), served
        finally:
            thread.join(IO_TIMEOUT)
    assert not thread.is_alive()


def python_client(
    address: tuple[str, int], context: ssl.SSLContext
) -> tuple[x509.Certificate, str | None]:
    """The leaf the server presented and the ALPN protocol it selected."""
    with (
        socket.create_connection(address, timeout=IO_TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname=HOST) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        selected = tls.selected_alpn_protocol()
        while tls.recv(1024):
            pass
    assert der is not None
    return x509.load_der_x509_certificate(der), selected


def s_client(address: tuple[str, int], *options: str) -> x509.Certificate | None:
    """The leaf `openssl s_client` printed, or None if the handshake failed before it.

    -ign_eof keeps it reading until the server closes. Its exit status is 1 even then (the
    server closes without close_notify), so the printed certificate is what tells.
    """
    host, port = address
    result = subprocess.run(
        ["openssl", "s_client", "-connect", f"{host}:{port}", "-servername", HOST, "-ign_eof",
         *options],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=IO_TIMEOUT,  # run() kills the child on expiry
        check=False,
    )  # fmt: skip
    found = re.search(
        r"Server certificate\n(-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----)",
        result.stdout,
        re.S,
    )
    if found is None:
        return None
    return x509.load_pem_x509_certificate(found.group(1).encode("ascii"))


def key_type_of(cert: x509.Certificate) -> KeyFamily:
    return (
        KeyFamily.EC if isinstance(cert.public_key(), ec.EllipticCurvePublicKey) else KeyFamily.RSA
    )


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.mark.e2e
def test_default_python_client_gets_the_ecdsa_leaf(
    tmp_path: Path, ca: trustme.CA, material: dict[str, Material]
) -> None:
    identity = identity_of(tmp_path, material["ec"], material["rsa"])
    with serving(identity.context) as (address, served):
        leaf, _ = python_client(address, trusting(ca))
    assert served.error is None
    assert served.version == "TLSv1.3"
    assert key_type_of(leaf) == "ec"
    assert served.hello is not None
    assert identity.presented_key(served.hello).leaf == leaf


@pytest.mark.e2e
def test_a_tls13_handshake_sends_one_session_ticket(
    tmp_path: Path, material: dict[str, Material]
) -> None:
    identity = identity_of(tmp_path, material["ec"])
    with serving(identity.context) as ((host, port), served):
        result = subprocess.run(
            ["openssl", "s_client", "-connect", f"{host}:{port}", "-servername", HOST,
             "-tls1_3", "-ign_eof"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=IO_TIMEOUT,
            check=False,
        )  # fmt: skip
    assert served.error is None
    assert served.version == "TLSv1.3"
    tickets = result.stdout.count("Post-Handshake New Session Ticket arrived")
    assert tickets == keystore.TLS13_SESSION_TICKETS == 1


@pytest.mark.e2e
def test_a_client_resumes_with_its_ticket_and_gets_a_new_one(
    tmp_path: Path, ca: trustme.CA, material: dict[str, Material]
) -> None:
    identity = identity_of(tmp_path, material["ec"])
    client = trusting(ca)
    sessions: list[ssl.SSLSession | None] = [None]
    reused = []
    for _ in range(3):  # full, resumed with the first ticket, resumed with the second
        with (
            serving(identity.context) as (address, served),
            socket.create_connection(address, timeout=IO_TIMEOUT) as raw,
            client.wrap_socket(raw, server_hostname=HOST, session=sessions[-1]) as tls,
        ):
            while tls.recv(1024):  # the ticket arrives before the server's line
                pass
            reused.append(tls.session_reused)
            sessions.append(tls.session)
        assert served.error is None
    assert reused == [False, True, True]
    assert sessions[1] is not None
    assert sessions[2] is not None
    assert sessions[1].id != sessions[2].id  # each ticket used once (RFC 8446 C.4)


@pytest.mark.e2e
def test_tls12_rsa_only_python_client_gets_the_rsa_leaf(
    tmp_path: Path, ca: trustme.CA, material: dict[str, Material]
) -> None:
    identity = identity_of(tmp_path, material["ec"], material["rsa"])
    client = trusting(ca)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    client.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256")
    with serving(identity.context) as (address, served):
        leaf, _ = python_client(address, client)
    assert served.version == "TLSv1.2"
    assert key_type_of(leaf) == "rsa"
    assert served.hello is not None
    assert identity.presented_key(served.hello).leaf == leaf


# (EC key, s_client options, expected key type). Each row is a fact about OpenSSL's choice
# with server preference; the test checks that OpenSSL still does it and that the model agrees.
S_CLIENT_CASES: Final = [
    ("ec", (), "ec"),
    ("ec", ("-tls1_3", "-sigalgs", "rsa_pss_rsae_sha256:rsa_pkcs1_sha256"), "rsa"),
    ("ec", ("-tls1_3", "-sigalgs", "rsa_pss_rsae_sha256:ecdsa_secp256r1_sha256"), "ec"),
    ("ec", ("-tls1_3", "-sigalgs", "ecdsa_secp384r1_sha384:rsa_pss_rsae_sha256"), "rsa"),
    ("ec", ("-tls1_3", "-groups", "secp384r1"), "ec"),
    ("ec", ("-tls1_2",), "ec"),
    ("ec", ("-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256"), "rsa"),
    (
        "ec",
        ("-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES128-GCM-SHA256"),
        "ec",
    ),
    (
        "ec",
        ("-tls1_2", "-cipher", "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES128-GCM-SHA256"),
        "rsa",
    ),
    ("ec", ("-tls1_2", "-sigalgs", "ecdsa_secp384r1_sha384:rsa_pkcs1_sha256"), "ec"),
    ("ec", ("-tls1_2", "-sigalgs", "ECDSA+SHA1:RSA+SHA256"), "rsa"),
    ("ec", ("-tls1_2", "-sigalgs", "rsa_pss_rsae_sha256:rsa_pkcs1_sha256"), "rsa"),
    ("ec", ("-tls1_2", "-groups", "secp384r1"), "rsa"),
    ("p384", (), "ec"),
    ("p384", ("-tls1_3", "-sigalgs", "ecdsa_secp256r1_sha256:rsa_pss_rsae_sha256"), "rsa"),
    ("p384", ("-tls1_2", "-sigalgs", "ecdsa_secp256r1_sha256:rsa_pkcs1_sha256"), "ec"),
    ("p384", ("-tls1_2", "-groups", "X25519:secp256r1"), "rsa"),
]


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("ec_key", "options", "expected"),
    S_CLIENT_CASES,
    ids=[" ".join((c[0], *c[1])) for c in S_CLIENT_CASES],
)
def test_openssl_presents_the_predicted_leaf(
    tmp_path: Path,
    material: dict[str, Material],
    ec_key: str,
    options: tuple[str, ...],
    expected: str,
) -> None:
    identity = identity_of(tmp_path, material[ec_key], material["rsa"])
    with serving(identity.context) as (address, served):
        leaf = s_client(address, *options)
    assert served.error is None
    assert leaf is not None
    assert key_type_of(leaf) == expected
    assert served.hello is not None
    assert identity.presented_key(served.hello).leaf == leaf


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("offer", "selected"),
    [
        (["dualproxy-k2026b", "http/1.1"], "http/1.1"),
        (["h2", "http/1.1"], "h2"),
        (["http/1.1", "h2"], "h2"),  # ours first: HTTP/2 when the client has it
        (["dualproxy-k2026b"], None),  # a hint token alone: no ALPN, HTTP/1.1
    ],
)
def test_alpn_selects_h2_then_http11(
    tmp_path: Path,
    ca: trustme.CA,
    material: dict[str, Material],
    offer: list[str],
    selected: str | None,
) -> None:
    identity = identity_of(tmp_path, material["ec"])
    client = trusting(ca)
    client.set_alpn_protocols(offer)
    with serving(identity.context) as (address, served):
        _, client_selected = python_client(address, client)
    assert (served.alpn, client_selected) == (selected, selected)


@pytest.mark.e2e
@pytest.mark.parametrize(("version", "accepted"), [("-tls1_1", False), ("-tls1_2", True)])
def test_tls11_is_refused(
    tmp_path: Path, material: dict[str, Material], version: str, accepted: bool
) -> None:
    identity = identity_of(tmp_path, material["ec"])
    with serving(identity.context) as (address, served):
        # SECLEVEL=0: without it the client itself refuses to offer TLS 1.1.
        leaf = s_client(address, version, "-cipher", "DEFAULT@SECLEVEL=0")
    if accepted:
        assert (leaf is not None, served.version) == (True, "TLSv1.2")
    else:
        assert leaf is None
        assert isinstance(served.error, ssl.SSLError)
        assert served.error.reason == "UNSUPPORTED_PROTOCOL"


@pytest.mark.e2e
def test_serves_what_was_validated_even_after_the_files_change(
    tmp_path: Path, ca: trustme.CA, material: dict[str, Material]
) -> None:
    config = write(tmp_path, "k", material["ec"])
    key = load_key(config, STRICT)
    write(tmp_path, "k", material["ec2"])  # a renewal tool rewrites both files in place
    with serving(build_context([key])) as (address, served):
        leaf, _ = python_client(address, trusting(ca))
    assert (served.error, leaf) == (None, key.leaf)
    fresh = load_key(config, STRICT)  # the twin: loading again serves the new files
    assert fresh.leaf != key.leaf
    with serving(build_context([fresh])) as (address, _served):
        assert python_client(address, trusting(ca))[0] == fresh.leaf


@pytest.mark.e2e
def test_without_memfd_the_key_is_read_again_and_checked(
    tmp_path: Path, ca: trustme.CA, material: dict[str, Material], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(os, "memfd_create")  # as on macOS, or in a sandbox that forbids it
    config = write(tmp_path, "k", material["ec"])
    key = load_key(config, STRICT)
    # Same key, other encoding (PKCS#8 instead of traditional): still this key, still served.
    private = serialization.load_pem_private_key(material["ec"].key_pem, None)
    config.key.write_bytes(pem_of(private))
    with serving(build_context([key])) as (address, served):
        assert python_client(address, trusting(ca))[0] == key.leaf
    assert served.error is None
    # Another key: OpenSSL's own key/leaf check refuses it.
    config.key.write_bytes(material["ec2"].key_pem)
    with pytest.raises(OperatorError) as info:
        build_context([key])
    assert info.value.key_path == "keys.k"
    # An encrypted key: refused, never a passphrase prompt on the terminal.
    encrypted = serialization.BestAvailableEncryption(b"hunter2")
    config.key.write_bytes(pem_of(private, encryption=encrypted))
    with pytest.raises(OperatorError) as info:
        build_context([key])
    assert (info.value.key_path, "encrypted" in info.value.problem) == ("keys.k.key", True)


# --- one private key, for keys csr, ACME and the dev bench -------------------------------


def test_read_private_key_applies_the_permission_rule(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    key = generate_private_key()
    write_private_key(path, key)
    assert read_private_key(path).private_numbers() == key.private_numbers()  # the twin: 0600
    path.chmod(0o644)
    with pytest.raises(OperatorError, match="0644"):
        read_private_key(path)
