"""The dev bench's material: each certificate is what it claims to be (and wrong in exactly
the one way it should be), everything is reused across runs, and repairs keep the keys."""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from dualproxy.config.schema import KeyConfig, KeyStoreSettings
from dualproxy.dev import certs as devcerts
from dualproxy.dev.certs import CERTIFICATES, HINT_SNI, KEYS, WRONG_HOST, DevMaterial
from dualproxy.tls import keystore, pins

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> DevMaterial:
    return devcerts.prepare(tmp_path_factory.mktemp("material") / "dev", ["192.0.2.7"], now=NOW)


def leaf(material: DevMaterial, name: str) -> x509.Certificate:
    chain = material.folder / CERTIFICATES[name].chain_file
    return x509.load_pem_x509_certificate(chain.read_bytes())


def ca(material: DevMaterial) -> x509.Certificate:
    return x509.load_pem_x509_certificate(material.ca_file.read_bytes())


def names(cert: x509.Certificate) -> set[str]:
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(name.value) for name in sans}


def issued_by_dev_ca(material: DevMaterial, cert: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca(material))
    except (InvalidSignature, ValueError):  # ValueError: another issuer's name
        return False
    return True


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_three_keys_private_and_distinct(material: DevMaterial) -> None:
    assert len({material.pins[name] for name in KEYS}) == 3
    for name in (*KEYS, ""):
        key_file = material.folder / name / "key.pem" if name else material.folder / "ca-key.pem"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        if name:
            key = keystore.read_private_key(key_file)
            assert pins.spki_pin(key.public_key()) == material.pins[name]
    assert stat.S_IMODE(material.folder.stat().st_mode) == 0o700


def test_each_certificate_is_wrong_in_exactly_its_one_way(material: DevMaterial) -> None:
    bench_names = {"localhost", "127.0.0.1", "::1", HINT_SNI, "192.0.2.7"}
    for name, spec in CERTIFICATES.items():
        cert = leaf(material, name)
        # The key: old, new and rogue their own; the broken ones old's, so the pin matches.
        assert pins.spki_pin_of_certificate(cert) == material.pins[spec.key], name
        assert names(cert) == ({WRONG_HOST} if name == "wrong-host" else bench_names), name
        assert issued_by_dev_ca(material, cert) == (name != "untrusted"), name
        expired = cert.not_valid_after_utc < NOW
        assert expired == (name == "expired"), name
        assert cert.not_valid_before_utc <= NOW
    assert {spec.key for spec in CERTIFICATES.values() if spec.name not in KEYS} == {"old"}
    assert material.not_after["old"] == leaf(material, "old").not_valid_after_utc
    # Every one of them loads as a served key: the key store refuses none of them.
    for spec in CERTIFICATES.values():
        config = KeyConfig(
            spec.name, material.folder / spec.key_file, material.folder / spec.chain_file
        )
        assert keystore.load_key(config, KeyStoreSettings()).pin == material.pins[spec.key]


def test_a_second_run_reuses_everything(tmp_path: Path) -> None:
    folder = tmp_path / "dev"
    first = devcerts.prepare(folder, now=NOW)
    before = files(folder)
    second = devcerts.prepare(folder, now=NOW + timedelta(days=30))
    assert files(folder) == before
    assert second == first


def test_repairs_reissue_on_the_same_keys(tmp_path: Path) -> None:
    folder = tmp_path / "dev"
    first = devcerts.prepare(folder, now=NOW)
    ca_before = (folder / "ca.pem").read_bytes()
    (folder / "new" / "chain.pem").write_text("truncated")
    (folder / "expired" / "chain.pem").unlink()
    untrusted_before = (folder / "untrusted" / "chain.pem").read_bytes()
    # Close to expiry: every certificate from the dev CA is re-issued, none re-keyed.
    later = NOW + devcerts.CERT_LIFETIME - devcerts.REISSUE_MARGIN + timedelta(days=1)
    again = devcerts.prepare(folder, now=later)
    assert again.pins == first.pins
    assert (folder / "ca.pem").read_bytes() == ca_before
    assert again.not_after["new"] > first.not_after["new"]
    assert leaf(again, "expired").not_valid_after_utc < later
    assert (folder / "untrusted" / "chain.pem").read_bytes() != untrusted_before


def test_a_ca_whose_files_do_not_match_is_replaced(tmp_path: Path) -> None:
    folder = tmp_path / "dev"
    first = devcerts.prepare(folder, now=NOW)
    (folder / "ca.pem").write_text("not a certificate")
    again = devcerts.prepare(folder, now=NOW)
    assert again.pins == first.pins  # the keys (and pins) survive a new CA
    for name in ("old", "new", "rogue", "expired", "wrong-host"):
        assert issued_by_dev_ca(again, leaf(again, name)), name
    assert not issued_by_dev_ca(again, leaf(again, "untrusted"))


def test_reset_deletes_only_the_bench_files(tmp_path: Path) -> None:
    folder = tmp_path / "dev"
    first = devcerts.prepare(folder, now=NOW)
    (folder / "old" / "notes.txt").write_text("mine")
    (folder / "admin-address").write_text("127.0.0.1:8444\n")  # a bench that was killed
    (tmp_path / "other.pem").write_text("not the bench's")
    again = devcerts.prepare(folder, reset=True, now=NOW)
    assert all(again.pins[name] != first.pins[name] for name in KEYS)
    assert (folder / "old" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "other.pem").read_text() == "not the bench's"
    assert not (folder / "admin-address").exists()


def test_names_are_normalized_like_certificate_sans(tmp_path: Path) -> None:
    material = devcerts.prepare(tmp_path / "dev", ["Phone.LAN.", "2001:DB8::0:1"], now=NOW)
    assert material.names[-2:] == ("phone.lan", "2001:db8::1")
    cert = leaf(material, "old")
    assert "2001:db8::1" in names(cert)
    # Asked again with the same names written differently: nothing is re-issued.
    before = files(material.folder)
    devcerts.prepare(tmp_path / "dev", ["phone.lan", "2001:db8::1"], now=NOW)
    assert files(material.folder) == before


def test_no_private_key_in_a_chain_file(material: DevMaterial) -> None:
    for spec in CERTIFICATES.values():
        data = (material.folder / spec.chain_file).read_bytes()
        assert b"PRIVATE KEY" not in data
        assert data.count(b"-----BEGIN CERTIFICATE-----") == 1
