"""keygen.py: the key types, named once (token, label, family) and in agreement with what the
key store and the pin formats say of such a key; private key files (0600, never overwritten);
certificate signing requests."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Final

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from dualproxy.config.errors import OperatorError
from dualproxy.tls.keygen import (
    DEFAULT_KEY_TYPE,
    KeyFamily,
    KeyType,
    PrivateKey,
    generate_private_key,
    make_csr,
    write_private_key,
)
from dualproxy.tls.keystore import TLS12_CIPHER_SUITES
from dualproxy.tls.pins import describe_key_algorithm

HOST: Final = "api.example.com"


def load_private(path: Path) -> PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    return key


# --- key types ---------------------------------------------------------------------------


def test_the_key_types_and_their_tokens() -> None:
    """What `keys new --type` offers, and what people read; a change here changes the CLI."""
    assert KeyType.tokens() == ("ecdsa-p256", "rsa-2048")
    assert [(t.label, t.family) for t in KeyType] == [
        ("ECDSA P-256", KeyFamily.EC),
        ("RSA 2048", KeyFamily.RSA),
    ]
    assert DEFAULT_KEY_TYPE is KeyType.ECDSA_P256


@pytest.mark.parametrize("key_type", list(KeyType))
def test_a_generated_key_is_what_its_type_says(key_type: KeyType) -> None:
    key = generate_private_key(key_type)
    assert describe_key_algorithm(key.public_key()) == key_type.label
    assert KeyFamily.of(key) is KeyFamily.of(key.public_key()) is key_type.family
    assert KeyType.from_token(key_type.token) is key_type


def test_an_unknown_token_names_no_key_type() -> None:
    """The twin of the round trip above."""
    with pytest.raises(ValueError, match="'ed25519' is not a key type; use one of ecdsa-p256"):
        KeyType.from_token("ed25519")


def test_key_families() -> None:
    """Every family serves some cipher suite; a key of neither family has none."""
    assert {suite.family for suite in TLS12_CIPHER_SUITES} == set(KeyFamily)
    assert str(KeyFamily.EC) == "ec"  # as logs and messages show it ("both EC keys")
    assert KeyFamily.of(ec.generate_private_key(ec.SECP384R1())) is KeyFamily.EC
    with pytest.raises(ValueError, match="neither an EC nor an RSA key"):
        KeyFamily.of(ed25519.Ed25519PrivateKey.generate())


# --- private key files -------------------------------------------------------------------


@pytest.mark.parametrize("key_type", list(KeyType))
def test_write_private_key(tmp_path: Path, key_type: KeyType) -> None:
    key = generate_private_key(key_type)
    path = tmp_path / "certs" / "k2026b" / "key.pem"
    write_private_key(path, key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    again = load_private(path)
    assert describe_key_algorithm(again.public_key()) == key_type.label
    assert again.private_numbers() == key.private_numbers()


def test_write_private_key_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    write_private_key(path, generate_private_key())
    before = path.read_bytes()
    with pytest.raises(OperatorError) as info:
        write_private_key(path, generate_private_key())
    assert (info.value.file, info.value.key_path) == (path, "")
    assert "never overwrites" in info.value.problem
    assert path.read_bytes() == before
    body = [line for line in before.decode().splitlines() if not line.startswith("-----")]
    assert not [line for line in body if line in str(info.value)]  # no key material


@pytest.mark.parametrize("below", [Path("key.pem"), Path("sub/key.pem")])
def test_write_private_key_where_a_file_is_in_the_way(tmp_path: Path, below: Path) -> None:
    """A file where its folder should be: the key cannot be created, and is not said to exist."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    path = blocker / below
    with pytest.raises(OperatorError) as info:
        write_private_key(path, generate_private_key())
    assert info.value.file == path
    assert str(info.value).startswith(f"{path}: cannot create the key file: ")


# --- certificate signing requests --------------------------------------------------------


def test_make_csr() -> None:
    key = generate_private_key()
    names = [HOST, "www.example.com", "127.0.0.1", "::1"]
    csr = make_csr(key, names)
    assert csr.is_signature_valid
    assert csr.public_key() == key.public_key()
    common_name = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert [attribute.value for attribute in common_name] == [HOST]
    sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == [HOST, "www.example.com"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]


def test_make_csr_long_first_name_goes_in_the_sans_only() -> None:
    long_name = "a" * 60 + ".example.com"
    csr = make_csr(generate_private_key(), [long_name])
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME) == []
    sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == [long_name]
    with pytest.raises(ValueError, match="at least one name"):
        make_csr(generate_private_key(), [])
