"""Keys and chains made with trustme at test time, in the key store's layout."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from dualproxy.dev.bench import issue_certificate
from dualproxy.tls.pins import spki_pin_of_certificate

NAMES = ("api.example.com", "k2.api.example.com", "api-legacy.example.com", "localhost")


@dataclass(frozen=True)
class KeyFiles:
    name: str
    key: Path
    chain: Path
    pin: str

    def table(self) -> dict[str, str]:
        """The [keys.NAME] table for config.parse."""
        return {"key": str(self.key), "chain": str(self.chain)}


def make_key(
    ca: trustme.CA,
    folder: Path,
    name: str,
    *,
    key_type: trustme.KeyType = trustme.KeyType.ECDSA,
    names: Sequence[str] = NAMES,
) -> KeyFiles:
    """A key (mode 0600) and its chain from `ca`, in folder/name/."""
    leaf = ca.issue_cert(*names, key_type=key_type)
    directory = folder / name
    directory.mkdir(parents=True, exist_ok=True)
    key_file, chain_file = directory / "key.pem", directory / "chain.pem"
    leaf.private_key_pem.write_to_path(str(key_file))
    key_file.chmod(0o600)
    chain_file.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    return KeyFiles(name, key_file, chain_file, spki_pin_of_certificate(cert))


def reissue(
    ca: trustme.CA,
    key: KeyFiles,
    *,
    names: Sequence[str] = NAMES,
    lifetime: timedelta = timedelta(days=90),
) -> bytes:
    """A renewal: a new certificate for the *same* key, as PEM (the caller writes it)."""
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    private = serialization.load_pem_private_key(key.key.read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    assert isinstance(private, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    now = datetime.now(UTC)
    cert = issue_certificate(
        ca_cert,
        ca_key,
        private.public_key(),
        names,
        not_before=now - timedelta(minutes=5),
        not_after=now + lifetime,
    )
    return cert.public_bytes(serialization.Encoding.PEM)
