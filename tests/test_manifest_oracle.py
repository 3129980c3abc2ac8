"""The pin manifest checked by a well-kept JOSE library, jwcrypto, as the test oracle: every
manifest the CLI signs verifies there (EdDSA over Ed25519, RFC 8037; `kid` the RFC 7638
thumbprint jwcrypto computes itself; the claims a JWT library checks), and a tampered one, or
one checked with another key, does not.

test_manifest.py's `independent_verify` was written by the same team from the same reading of
the RFCs; jwcrypto shares neither code nor reading with us. The RFC 8037 vector passing here
first shows that the oracle is one.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import pytest
import trustme
from cryptography.hazmat.primitives.asymmetric import ed25519
from helpers.configs import write_config
from helpers.keys import make_key
from hypothesis import given, settings
from hypothesis import strategies as st
from jwcrypto import jwk, jws, jwt

from dualproxy.cli import main as cli
from dualproxy.pinning import manifest
from dualproxy.tls.pins import PinnedKey

# RFC 8037 appendix A.1 (the key) and A.4 (its JWS of "Example of Ed25519 signing").
RFC8037_X: Final = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
RFC8037_JWS: Final = (
    "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc"
    ".hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg"
)
# What jwcrypto raises for a token it does not trust: a bad signature, or a token that is
# no longer a JWS once a byte changed (bad base64url, JSON, or header).
REFUSED: Final = (jws.InvalidJWSSignature, jws.InvalidJWSObject, ValueError)


def oracle_key(public_pem: bytes) -> jwk.JWK:
    return jwk.JWK.from_pem(public_pem)


def oracle_verify(token: str, key: jwk.JWK) -> tuple[dict[str, Any], dict[str, Any]]:
    """jwcrypto's verdict on `token`: its protected header and payload; raises when the
    signature does not verify with `key`."""
    signed = jws.JWS()
    signed.deserialize(token.strip())
    signed.verify(key, alg="EdDSA")
    header: dict[str, Any] = signed.jose_header
    payload: dict[str, Any] = json.loads(signed.payload)
    return header, payload


def test_the_oracle_verifies_the_rfc_8037_vector_and_refuses_it_with_another_key() -> None:
    key = jwk.JWK(kty="OKP", crv="Ed25519", x=RFC8037_X)
    signed = jws.JWS()
    signed.deserialize(RFC8037_JWS)
    signed.verify(key, alg="EdDSA")
    assert signed.payload == b"Example of Ed25519 signing"
    other = jwk.JWK.generate(kty="OKP", crv="Ed25519")
    with pytest.raises(jws.InvalidJWSSignature):
        jws.JWS().deserialize(RFC8037_JWS, key=other)


def _config(tmp_path: Path, ca: trustme.CA, *, rotation: bool) -> Path:
    old, new = (make_key(ca, tmp_path / "certs", name) for name in ("k2026a", "k2026b"))
    config_file = tmp_path / "config.toml"
    window = {
        "old": "k2026a",
        "new": "k2026b",
        "grace_start": datetime.now(UTC) - timedelta(days=1),
        "grace_end": datetime.now(UTC) + timedelta(days=30),
    }
    keys = [old, new] if rotation else [old]
    write_config(
        config_file,
        keys,
        rotation=window if rotation else None,
        extra={"manifest": {"file": "certs/pins.jws"}},
    )
    return config_file


@pytest.mark.parametrize(
    ("rotation", "valid_for"),
    [(True, "7d"), (True, "90m"), (False, "36h")],
    ids=["rotation-7d", "rotation-90m", "single-36h"],
)
def test_every_manifest_the_cli_signs_verifies_in_jwcrypto(
    tmp_path: Path,
    ca: trustme.CA,
    capsys: pytest.CaptureFixture[str],
    rotation: bool,
    valid_for: str,
) -> None:
    config_file = _config(tmp_path, ca, rotation=rotation)
    key_file = tmp_path / "signing.pem"
    assert cli.main(["manifest", "keygen", "--out", str(key_file)]) == 0
    assert cli.main(
        ["manifest", "sign", "-c", str(config_file), "--key", str(key_file),
         "--valid-for", valid_for]
    ) == 0  # fmt: skip
    capsys.readouterr()
    token = (tmp_path / "certs" / "pins.jws").read_text()
    key = oracle_key((tmp_path / "signing.pub.pem").read_bytes())

    header, payload = oracle_verify(token, key)
    assert header["alg"] == "EdDSA"
    assert header["typ"] == "dualproxy-pins"
    # The kid is the RFC 7638 thumbprint as jwcrypto computes it, not as we do.
    assert header["kid"] == key.thumbprint()
    assert payload["version"] == 1
    assert {p["key"] for p in payload["pins"]} == ({"k2026a", "k2026b"} if rotation else {"k2026a"})
    # The time claims, as a JWT library checks them (exp in the future, iat not).
    checked = jwt.JWT(jwt=token.strip(), key=key, algs=["EdDSA"], check_claims={"exp": None})
    assert json.loads(checked.claims)["exp"] == payload["exp"]

    # Tampered: any byte of the payload or the signature changed is refused.
    head, body, signature = token.strip().split(".")
    for index in range(0, len(body), max(1, len(body) // 40)):
        changed = body[:index] + ("A" if body[index] != "A" else "B") + body[index + 1 :]
        with pytest.raises(REFUSED):
            oracle_verify(f"{head}.{changed}.{signature}", key)
    for index in range(len(signature) - 1):  # the last character carries padding bits too
        changed = (
            signature[:index] + ("A" if signature[index] != "A" else "B") + signature[index + 1 :]
        )
        with pytest.raises(REFUSED):
            oracle_verify(f"{head}.{body}.{changed}", key)
    # And another key's public half does not verify it.
    other = tmp_path / "other.pem"
    assert cli.main(["manifest", "keygen", "--out", str(other)]) == 0
    capsys.readouterr()
    with pytest.raises(jws.InvalidJWSSignature):
        oracle_verify(token, oracle_key((tmp_path / "other.pub.pem").read_bytes()))


_PIN = st.binary(min_size=32, max_size=32).map(lambda b: base64.b64encode(b).decode())
_NAME = st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True)


@settings(max_examples=40, deadline=None)
@given(
    keys=st.lists(
        st.tuples(_NAME, st.sampled_from(["current", "next", "retiring", "standby"]), _PIN),
        min_size=1,
        max_size=4,
    ),
    hosts=st.lists(st.from_regex(r"[a-z]{1,10}\.example\.com", fullmatch=True), max_size=3),
    minutes=st.integers(min_value=5, max_value=90 * 24 * 60),
)
def test_every_payload_we_sign_verifies_in_jwcrypto(
    keys: list[tuple[str, str, str]], hosts: list[str], minutes: int
) -> None:
    private = ed25519.Ed25519PrivateKey.generate()
    pinned = [
        PinnedKey(
            name=name, role=role, pin=pin, algorithm="ECDSA P-256",  # type: ignore[arg-type]
            hostnames=tuple(hosts), not_after=None,
        )
        for name, role, pin in keys
    ]  # fmt: skip
    issued = datetime(2026, 12, 10, tzinfo=UTC)
    payload = manifest.build_payload(
        pinned, None, issued_at=issued, valid_for=timedelta(minutes=minutes)
    )
    token = manifest.sign(payload, private)
    key = jwk.JWK.from_pyca(private.public_key())
    header, decoded = oracle_verify(token, key)
    assert decoded == payload
    assert header["kid"] == key.thumbprint()
    # The twin: the same token under a fresh key is refused.
    with pytest.raises(jws.InvalidJWSSignature):
        oracle_verify(token, jwk.JWK.generate(kty="OKP", crv="Ed25519"))
