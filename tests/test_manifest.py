"""The signed pin manifest: RFC 8037's own vectors, signing and verifying (each check with the
negative twin that proves it), the CLI (keygen, sign, verify), and `serve` answering it over
real TLS itself, never upstream.

A manifest signed by the CLI is checked by `independent_verify` below, written from RFC 7515
and RFC 8037 with nothing but the `cryptography` Ed25519 API on the raw JWS parts, as an app
would: it shares no code with dualproxy.manifest.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import pytest
import trio
import trustme
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from helpers.configs import make_config, write_config
from helpers.keys import KeyFiles, make_key
from helpers.rotation import Clock, grace_window
from helpers.serving import serving
from helpers.upstream_server import UpstreamServer, serve_upstream
from test_relay import Proxy

from dualproxy.cli import main as cli
from dualproxy.files import write_atomically
from dualproxy.pinning import manifest
from dualproxy.tls.pins import PinnedKey, PinRole

# RFC 8037 appendix A: the Ed25519 key (A.1), its JWK thumbprint (A.3) and the JWS of
# "Example of Ed25519 signing" (A.4).
RFC8037_D: Final = "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A"
RFC8037_X: Final = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
RFC8037_THUMBPRINT: Final = "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
RFC8037_JWS: Final = (
    "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc"
    ".hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg"
)
NOW: Final = datetime(2026, 12, 10, tzinfo=UTC)
PIN_A: Final = base64.b64encode(bytes(32)).decode()
PIN_B: Final = base64.b64encode(bytes([1]) * 32).decode()
MANIFEST_PATH: Final = "/.well-known/dualproxy/pins.json"


# --- an app's verifier, independent of dualproxy.manifest ------------------------------------


def _unb64url(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def independent_verify(
    token: str, public_key: ed25519.Ed25519PublicKey, now: datetime
) -> dict[str, Any]:
    """RFC 7515 §5.2 for one EdDSA signature, as an app does it; raises on any failure."""
    header_b64, payload_b64, signature_b64 = token.strip().split(".")
    header = json.loads(_unb64url(header_b64))
    if header["alg"] != "EdDSA":
        raise ValueError("alg")
    public_key.verify(_unb64url(signature_b64), f"{header_b64}.{payload_b64}".encode("ascii"))
    claims: dict[str, Any] = json.loads(_unb64url(payload_b64))
    if now.timestamp() >= claims["exp"]:
        raise ValueError("expired")
    return claims


def pinned(name: str, role: Any, pin: str) -> PinnedKey:
    return PinnedKey(
        name=name,
        role=role,
        pin=pin,
        algorithm="ECDSA P-256",
        hostnames=("api.example.com",),
        not_after=datetime(2027, 3, 1, tzinfo=UTC),
    )


ROTATION: Final = grace_window()


def signed(
    key: ed25519.Ed25519PrivateKey,
    *,
    issued_at: datetime = NOW,
    valid_for: timedelta = manifest.DEFAULT_VALIDITY,
) -> str:
    payload = manifest.build_payload(
        [pinned("k2026a", "retiring", PIN_A), pinned("k2026b", "current", PIN_B)],
        ROTATION,
        issued_at=issued_at,
        valid_for=valid_for,
    )
    return manifest.sign(payload, key)


# --- RFC 8037 vectors ----------------------------------------------------------------------


def test_the_rfc_8037_key_has_the_rfc_thumbprint() -> None:
    key = ed25519.Ed25519PrivateKey.from_private_bytes(manifest.b64url_decode(RFC8037_D, "d"))
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert manifest.b64url_encode(raw) == RFC8037_X
    assert manifest.public_key_thumbprint(key.public_key()) == RFC8037_THUMBPRINT


def test_the_rfc_8037_signature_is_what_we_sign_and_check() -> None:
    key = ed25519.Ed25519PrivateKey.from_private_bytes(manifest.b64url_decode(RFC8037_D, "d"))
    header, payload, signature = RFC8037_JWS.split(".")
    # Ed25519 is deterministic: our signing of the same input gives the RFC's bytes.
    ours = key.sign(f"{header}.{payload}".encode())
    assert manifest.b64url_encode(ours) == signature
    # The RFC's JWS is no manifest (its payload is text), but its signature checks out.
    with pytest.raises(manifest.ManifestError, match="payload is not JSON"):
        manifest.verify(RFC8037_JWS, key.public_key(), now=NOW)
    other = ed25519.Ed25519PrivateKey.generate().public_key()
    with pytest.raises(manifest.ManifestError, match="does not verify"):
        manifest.verify(RFC8037_JWS, other, now=NOW)


# --- sign and verify -----------------------------------------------------------------------


def test_a_signed_manifest_verifies_with_both_verifiers() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    token = signed(key)
    claims = independent_verify(token, key.public_key(), NOW)
    assert [(p["key"], p["role"], p["pin"]) for p in claims["pins"]] == [
        ("k2026a", "retiring", PIN_A),
        ("k2026b", "current", PIN_B),
    ]
    assert claims["exp"] - claims["iat"] == 7 * 86400
    assert claims["rotation"] == {
        "phase": "during",
        "grace_start": "2026-12-01T00:00:00Z",
        "grace_end": "2027-01-15T00:00:00Z",
    }
    header = json.loads(_unb64url(token.split(".")[0]))
    assert header == {
        "alg": "EdDSA",
        "kid": manifest.public_key_thumbprint(key.public_key()),
        "typ": "dualproxy-pins",
    }
    ours = manifest.verify(token, key.public_key(), now=NOW)
    assert ours.pin_values() == {PIN_A, PIN_B}
    assert ours.hosts == ("api.example.com",)
    assert ours.expires_at == NOW + timedelta(days=7)


def flip(token: str, part: int, index: int) -> str:
    """`token` with one byte of its `part` (0 header, 1 payload, 2 signature) changed."""
    parts = token.split(".")
    raw = bytearray(_unb64url(parts[part]))
    raw[index] ^= 0x01
    parts[part] = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    return ".".join(parts)


@pytest.mark.parametrize(("part", "index"), [(1, 0), (1, -3), (2, 0), (2, 63)])
def test_a_flipped_byte_fails_both_verifiers(part: int, index: int) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    token = flip(signed(key), part, index)
    with pytest.raises(InvalidSignature):
        independent_verify(token, key.public_key(), NOW)
    with pytest.raises(manifest.ManifestError, match="does not verify"):
        manifest.verify(token, key.public_key(), now=NOW)


def test_an_expired_manifest_fails_both_verifiers() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    token = signed(key, valid_for=timedelta(hours=1))
    independent_verify(token, key.public_key(), NOW + timedelta(minutes=59))
    manifest.verify(token, key.public_key(), now=NOW + timedelta(minutes=59))
    later = NOW + timedelta(hours=1)
    with pytest.raises(ValueError, match="expired"):
        independent_verify(token, key.public_key(), later)
    with pytest.raises(manifest.ManifestError, match="expired at"):
        manifest.verify(token, key.public_key(), now=later)


def test_a_wrong_key_fails_both_verifiers() -> None:
    key, other = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    token = signed(key)
    with pytest.raises(InvalidSignature):
        independent_verify(token, other.public_key(), NOW)
    with pytest.raises(manifest.ManifestError, match="signed by another key"):
        manifest.verify(token, other.public_key(), now=NOW)


@pytest.mark.parametrize(
    ("grace_start", "problem"),
    [
        ("2026-12-01T00:00:00", "has no time zone"),
        ("1 December 2026", "is not an ISO 8601 time"),
        (1764547200, "is not an RFC 3339 time"),
    ],
)
def test_a_rotation_time_that_is_not_a_zoned_instant_is_refused(
    grace_start: object, problem: str
) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    payload = manifest.build_payload(
        [pinned("k2026a", "retiring", PIN_A), pinned("k2026b", "current", PIN_B)],
        ROTATION,
        issued_at=NOW,
        valid_for=manifest.DEFAULT_VALIDITY,
    )
    rotation = payload["rotation"]
    assert isinstance(rotation, dict)
    rotation["grace_start"] = grace_start
    with pytest.raises(manifest.ManifestError, match=problem):
        manifest.verify(manifest.sign(payload, key), key.public_key(), now=NOW)


def test_a_manifest_from_the_future_is_refused() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    token = signed(key, issued_at=NOW + timedelta(hours=1))
    with pytest.raises(manifest.ManifestError, match="issued in the future"):
        manifest.verify(token, key.public_key(), now=NOW)
    # Within the clock skew a phone may have, it is accepted.
    manifest.verify(token, key.public_key(), now=NOW + timedelta(minutes=56))


def _reheader(token: str, header: dict[str, Any], key: ed25519.Ed25519PrivateKey) -> str:
    """`token`'s payload under another header, signed properly with `key`."""
    encoded = manifest.b64url_encode(json.dumps(header).encode())
    signing_input = f"{encoded}.{token.split('.')[1]}"
    return f"{signing_input}.{manifest.b64url_encode(key.sign(signing_input.encode()))}"


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        ({"alg": "none"}, "alg is 'none'"),
        ({"alg": "ES256"}, "alg is 'ES256'"),
        ({}, "alg is None"),
        ({"alg": "EdDSA", "crit": ["exp"]}, "critical extensions"),
        ({"alg": "EdDSA", "typ": "JWT"}, "typ is 'JWT'"),
    ],
)
def test_headers_an_app_must_not_trust(header: dict[str, Any], problem: str) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    token = _reheader(signed(key), header, key)
    with pytest.raises(manifest.ManifestError, match=problem):
        manifest.verify(token, key.public_key(), now=NOW)
    # The twin: the same payload under a plain EdDSA header verifies.
    manifest.verify(_reheader(signed(key), {"alg": "EdDSA"}, key), key.public_key(), now=NOW)


@pytest.mark.parametrize(
    ("token", "problem"),
    [
        ("", "1 part"),
        ("a.b", "2 part"),
        ("a.b.c.d", "4 part"),
        ("e30.e30.!!", "signature is not base64url"),
        ("e30=.e30.AA", "header is not base64url"),
        ("e31.e30.AA", "not canonical"),
        ("bnVsbA.e30.AA", "header is not a JSON object"),
        ("x" * (manifest.MAX_MANIFEST_BYTES + 1), "larger than"),
    ],
)
def test_malformed_tokens(token: str, problem: str) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(manifest.ManifestError, match=problem):
        manifest.verify(token, key.public_key(), now=NOW)


def test_the_payload_lists_what_an_app_should_trust() -> None:
    keys = [
        pinned("k2026a", "retired", PIN_A),
        pinned("k2026b", "current", PIN_B),
        pinned("spare", "standby", PIN_A),
    ]
    payload = manifest.build_payload(keys, None, issued_at=NOW, valid_for=timedelta(days=1))
    # Retired keys are left out; a standby key (a backup pin) is listed.
    assert [(p["key"], p["role"]) for p in payload["pins"]] == [  # type: ignore[attr-defined]
        ("k2026b", "current"),
        ("spare", "standby"),
    ]
    assert payload["rotation"] is None
    with pytest.raises(ValueError, match="every configured key is retired"):
        manifest.build_payload(keys[:1], None, issued_at=NOW, valid_for=timedelta(days=1))
    with pytest.raises(ValueError, match="outside"):
        manifest.build_payload(keys, None, issued_at=NOW, valid_for=timedelta(days=365))


def test_a_pin_two_listed_keys_share_is_listed_once_under_the_first() -> None:
    """The same key material under two names (a key file configured twice) is one pin."""
    keys = [pinned("k2026b", "current", PIN_B), pinned("k2026b-copy", "standby", PIN_B)]
    payload = manifest.build_payload(keys, None, issued_at=NOW, valid_for=timedelta(days=1))
    assert [(p["key"], p["pin"]) for p in payload["pins"]] == [  # type: ignore[attr-defined]
        ("k2026b", PIN_B)
    ]


def test_durations_and_expiry_status() -> None:
    assert manifest.parse_duration("7d") == timedelta(days=7)
    assert manifest.parse_duration("36h") == timedelta(hours=36)
    assert manifest.parse_duration("90m") == timedelta(minutes=90)
    for bad in ("7", "d", "7w", "-1d", "1.5d", ""):
        with pytest.raises(ValueError, match="not a duration"):
            manifest.parse_duration(bad)
    expires, warn = NOW + timedelta(days=3), timedelta(days=2)
    assert manifest.expiry_status(expires, NOW, warn) == "ok"
    assert manifest.expiry_status(expires, NOW + timedelta(days=1, hours=1), warn) == "soon"
    assert manifest.expiry_status(expires, expires, warn) == "expired"


# --- the CLI -------------------------------------------------------------------------------


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_keygen_writes_a_private_key_0600_and_its_public_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "signing" / "manifest-signing.pem"
    code, stdout, _ = run(capsys, "manifest", "keygen", "--out", out)
    assert code == 0
    public_file = tmp_path / "signing" / "manifest-signing.pub.pem"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    private = manifest.read_signing_key(out)
    public = manifest.read_public_key(public_file)
    assert public.public_bytes_raw() == private.public_key().public_bytes_raw()
    assert manifest.public_key_thumbprint(public) in stdout
    assert "PRIVATE" not in stdout
    # Never replaced without --force: apps may ship its public key.
    before = out.read_bytes()
    code, _, err = run(capsys, "manifest", "keygen", "--out", out)
    assert code == 1
    assert "already exists" in err
    assert out.read_bytes() == before
    code, _, _ = run(capsys, "manifest", "keygen", "--out", out, "--force")
    assert code == 0
    assert out.read_bytes() != before
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_sign_refuses_a_signing_key_others_can_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], ca: trustme.CA
) -> None:
    config_file = _config_file(tmp_path, ca)
    out = tmp_path / "signing.pem"
    assert run(capsys, "manifest", "keygen", "--out", out)[0] == 0
    out.chmod(0o644)
    code, _, err = run(capsys, "manifest", "sign", "-c", config_file, "--key", out)
    assert code == 1
    assert "mode 0644" in err
    out.chmod(0o600)
    assert run(capsys, "manifest", "sign", "-c", config_file, "--key", out)[0] == 0


def _config_file(tmp_path: Path, ca: trustme.CA, *, rotation: bool = True) -> Path:
    old, new = (make_key(ca, tmp_path / "certs", name) for name in ("k2026a", "k2026b"))
    config_file = tmp_path / "config.toml"
    window = {
        "old": "k2026a",
        "new": "k2026b",
        # Around now, whenever the test runs: both keys are served.
        "grace_start": datetime.now(UTC) - timedelta(days=1),
        "grace_end": datetime.now(UTC) + timedelta(days=30),
    }
    write_config(
        config_file,
        [old, new],
        rotation=window if rotation else None,
        extra={"manifest": {"file": "certs/pins.jws"}},
    )
    return config_file


def test_sign_then_verify_with_the_cli_and_independently(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], ca: trustme.CA
) -> None:
    config_file = _config_file(tmp_path, ca)
    key_file, public_file = tmp_path / "signing.pem", tmp_path / "signing.pub.pem"
    assert run(capsys, "manifest", "keygen", "--out", key_file)[0] == 0
    code, stdout, _ = run(
        capsys, "manifest", "sign", "-c", config_file, "--key", key_file, "--valid-for", "2d"
    )
    assert code == 0, stdout
    written = tmp_path / "certs" / "pins.jws"
    token = written.read_text()
    public = manifest.read_public_key(public_file)
    claims = independent_verify(token, public, datetime.now(UTC))
    assert {p["key"]: p["role"] for p in claims["pins"]} == {
        "k2026a": "retiring",
        "k2026b": "current",
    }
    assert claims["exp"] - claims["iat"] == 2 * 86400

    code, stdout, err = run(
        capsys, "manifest", "verify", written, "--public-key", public_file, "-c", config_file
    )
    assert (code, err) == (0, "")
    assert "signature ok" in stdout
    assert "every key" in stdout

    # Expired: verified two days and a minute later.
    later = (datetime.now(UTC) + timedelta(days=2, minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    code, _, err = run(
        capsys, "manifest", "verify", written, "--public-key", public_file, "--at", later
    )
    assert code == 1
    assert "expired at" in err
    # Another key's public half.
    other = tmp_path / "other.pem"
    assert run(capsys, "manifest", "keygen", "--out", other)[0] == 0
    code, _, err = run(
        capsys, "manifest", "verify", written, "--public-key", tmp_path / "other.pub.pem"
    )
    assert code == 1
    assert "signed by another key" in err
    # One flipped byte.
    flipped = tmp_path / "flipped.jws"
    flipped.write_text(flip(token.strip(), 1, 5))
    code, _, err = run(capsys, "manifest", "verify", flipped, "--public-key", public_file)
    assert code == 1
    assert "does not verify" in err


def test_verify_with_a_config_fails_when_the_served_pin_is_not_listed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], ca: trustme.CA
) -> None:
    config_file = _config_file(tmp_path, ca)
    key_file, public_file = tmp_path / "signing.pem", tmp_path / "signing.pub.pem"
    assert run(capsys, "manifest", "keygen", "--out", key_file)[0] == 0
    assert run(capsys, "manifest", "sign", "-c", config_file, "--key", key_file)[0] == 0
    # A third key (RSA, next to the new ECDSA one), served during the window, that the
    # manifest does not know.
    third = make_key(ca, tmp_path / "certs", "k2026c", key_type=trustme.KeyType.RSA)
    text = config_file.read_text().replace('new = "k2026b"', 'new = ["k2026b", "k2026c"]')
    text += f'\n[keys.k2026c]\nkey = "{third.key}"\nchain = "{third.chain}"\n'
    config_file.write_text(text)
    code, _, err = run(
        capsys,
        "manifest", "verify", tmp_path / "certs" / "pins.jws",
        "--public-key", public_file, "-c", config_file,
    )  # fmt: skip
    assert code == 1
    assert "key k2026c" in err
    assert "served now but not in the manifest" in err


def test_sign_needs_a_manifest_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], ca: trustme.CA
) -> None:
    key = make_key(ca, tmp_path / "certs", "k1")
    config_file = tmp_path / "config.toml"
    write_config(config_file, [key])
    assert run(capsys, "manifest", "keygen", "--out", tmp_path / "s.pem")[0] == 0
    code, _, err = run(capsys, "manifest", "sign", "-c", config_file, "--key", tmp_path / "s.pem")
    assert code == 1
    assert "no [manifest] table" in err


def test_bad_validity_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for bad in ("forever", "365d", "1m"):
        code, _, _ = run(capsys, "manifest", "sign", "--key", tmp_path / "k", "--valid-for", bad)
        assert code == 2


# --- serve ---------------------------------------------------------------------------------


@asynccontextmanager
async def local_proxy(
    key: KeyFiles, cafile: Path, tmp_path: Path, extra: dict[str, Any]
) -> AsyncIterator[Proxy]:
    """The server with `extra` config tables ([upstream], [manifest], [reports])."""
    config = make_config([key], base_dir=tmp_path, extra=extra)
    async with serving(config) as run_:
        yield Proxy(run_.server, run_.port, cafile)


@pytest.fixture
async def upstream(tmp_path: Path) -> AsyncIterator[UpstreamServer]:
    async with serve_upstream(UpstreamServer.https(tmp_path)) as server:
        yield server


def _write_manifest(path: Path, key: ed25519.Ed25519PrivateKey, **kwargs: Any) -> str:
    token = signed(key, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, token.encode() + b"\n", mode=0o644)
    return token


@pytest.mark.e2e
async def test_serve_answers_the_manifest_itself_over_tls(
    tmp_path: Path, ca: trustme.CA, cafile: Path, upstream: UpstreamServer
) -> None:
    key = make_key(ca, tmp_path / "certs", "k1")
    signing = ed25519.Ed25519PrivateKey.generate()
    token = _write_manifest(tmp_path / "pins.jws", signing, issued_at=datetime.now(UTC))
    table = {"upstream": upstream.config_table(), "manifest": {"file": str(tmp_path / "pins.jws")}}
    async with local_proxy(key, cafile, tmp_path, table) as p, p.client() as client:
        got = await client.request("GET", MANIFEST_PATH)
        query = await client.request("GET", MANIFEST_PATH + "?app=2.3")
        head = await client.request("HEAD", MANIFEST_PATH)
        etag = got.header(b"etag")[0].decode()
        cached = await client.request("GET", MANIFEST_PATH, headers=[("if-none-match", etag)])
        relayed = await client.request("GET", "/.well-known/dualproxy/other")
        # A body where none is read: 413, and the connection closes (as every refusal).
        post = await client.request("POST", MANIFEST_PATH, body=b"{}")
    assert got.status == query.status == 200
    assert got.header(b"content-type") == [b"application/jose"]
    assert got.header(b"cache-control") == [b"public, max-age=300"]
    assert got.body.decode().strip() == token
    independent_verify(got.body.decode(), signing.public_key(), datetime.now(UTC))
    assert head.status == 200
    assert head.body == b""
    assert head.header(b"content-length") == [str(len(got.body)).encode()]
    assert cached.status == 304
    assert cached.body == b""
    assert post.status == 413
    assert post.header(b"connection") == [b"close"]
    assert relayed.status == 200
    # Only the path that is not the manifest's reached the upstream.
    assert [r.target for r in upstream.requests] == [b"/.well-known/dualproxy/other"]


@pytest.mark.e2e
async def test_serve_answers_405_to_other_methods_and_keeps_the_connection(
    tmp_path: Path, ca: trustme.CA, cafile: Path, upstream: UpstreamServer
) -> None:
    key = make_key(ca, tmp_path / "certs", "k1")
    table = {
        "upstream": upstream.config_table(),
        "manifest": {"file": str(tmp_path / "missing.jws")},
    }
    async with local_proxy(key, cafile, tmp_path, table) as p, p.client() as client:
        missing = await client.request("GET", MANIFEST_PATH)
        delete = await client.request("DELETE", MANIFEST_PATH)
        closing = await client.request("GET", MANIFEST_PATH, headers=[("connection", "close")])
        data, clean = await client.read_until_closed()
    assert missing.status == 404
    assert b"manifest sign" in missing.body
    assert delete.status == 405
    assert delete.header(b"allow") == [b"GET, HEAD"]
    assert closing.header(b"connection") == [b"close"]
    assert (data, clean) == (b"", True)
    assert upstream.requests == []


async def test_serve_reloads_a_re_signed_manifest_and_warns_before_expiry(
    tmp_path: Path,
    ca: trustme.CA,
    cafile: Path,
    upstream: UpstreamServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    key = make_key(ca, tmp_path / "certs", "k1")
    signing = ed25519.Ed25519PrivateKey.generate()
    file = tmp_path / "pins.jws"
    # Signed a day ago for 36 hours: within the two-day warning.
    old = _write_manifest(
        file,
        signing,
        issued_at=datetime.now(UTC) - timedelta(days=1),
        valid_for=timedelta(hours=36),
    )
    config_file = tmp_path / "config.toml"
    config = write_config(
        config_file,
        [key],
        extra={
            "upstream": upstream.config_table(),
            "manifest": {"file": str(file)},
            "keystore": {"reload_poll_interval": 0.1},
        },
    )
    async with serving(config) as run_:
        assert any("expires at" in r.getMessage() for r in caplog.records)
        p = Proxy(run_.server, run_.port, cafile)
        async with p.client() as client:
            first = await client.request("GET", MANIFEST_PATH)
        fresh = _write_manifest(file, signing, issued_at=datetime.now(UTC))

        async def served() -> bytes:
            async with p.client() as client:
                return (await client.request("GET", MANIFEST_PATH)).body

        for _ in range(100):  # bounded: the poll runs every 0.1 s
            if (await served()).decode().strip() == fresh:
                break
            await trio.sleep(0.1)
        assert (await served()).decode().strip() == fresh
    assert first.body.decode().strip() == old  # the first file's, until it changed
    assert old != fresh
    assert upstream.requests == []


@pytest.mark.e2e
async def test_serve_answers_the_manifest_without_an_upstream(
    tmp_path: Path, ca: trustme.CA, cafile: Path
) -> None:
    key = make_key(ca, tmp_path / "certs", "k1")
    signing = ed25519.Ed25519PrivateKey.generate()
    token = _write_manifest(tmp_path / "pins.jws", signing, issued_at=datetime.now(UTC))
    config = make_config(
        [key], base_dir=tmp_path, extra={"manifest": {"file": str(tmp_path / "pins.jws")}}
    )
    async with serving(config) as run_:
        p = Proxy(run_.server, run_.port, cafile)
        async with p.client() as client:
            got = await client.request("GET", MANIFEST_PATH)
            other = await client.request("GET", "/")
            put = await client.request("PUT", MANIFEST_PATH)
    assert got.status == 200
    assert got.header(b"content-type") == [b"application/jose"]
    assert got.body.decode().strip() == token
    assert other.status == 200
    assert b"no upstream" in other.body
    assert put.status == 405


async def test_serve_logs_an_error_for_an_expired_manifest_and_still_serves_it(
    tmp_path: Path, ca: trustme.CA, cafile: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = make_key(ca, tmp_path / "certs", "k1")
    signing = ed25519.Ed25519PrivateKey.generate()
    token = _write_manifest(
        tmp_path / "pins.jws",
        signing,
        issued_at=datetime.now(UTC) - timedelta(days=10),
        valid_for=timedelta(days=1),
    )
    extra = {"manifest": {"file": str(tmp_path / "pins.jws")}}
    async with local_proxy(key, cafile, tmp_path, extra) as p, p.client() as client:
        got = await client.request("GET", MANIFEST_PATH)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("expired at" in message for message in errors)
    # Served as is: the app, not the server, refuses it.
    assert got.body.decode().strip() == token


# --- a manifest signed before the window, checked after it (issue 15, item 14) ----------------


def _config_before_a_window(tmp_path: Path, ca: trustme.CA) -> tuple[Path, list[KeyFiles]]:
    """Both keys, a rotation whose window opens in a day and closes in two, and [manifest]."""
    keys = [make_key(ca, tmp_path / "certs", name) for name in ("k2026a", "k2026b")]
    config_file = tmp_path / "config.toml"
    now = datetime.now(UTC).replace(microsecond=0)
    window = {
        "old": "k2026a",
        "new": "k2026b",
        "grace_start": now + timedelta(days=1),
        "grace_end": now + timedelta(days=2),
    }
    write_config(config_file, keys, rotation=window, extra={"manifest": {"file": "certs/pins.jws"}})
    return config_file, keys


def test_verify_after_grace_end_fails_a_manifest_listing_the_retired_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], ca: trustme.CA
) -> None:
    config_file, _ = _config_before_a_window(tmp_path, ca)
    key_file, public_file = tmp_path / "signing.pem", tmp_path / "signing.pub.pem"
    assert run(capsys, "manifest", "keygen", "--out", key_file)[0] == 0
    argv: list[str | Path] = [
        "manifest", "sign", "-c", config_file, "--key", key_file, "--valid-for", "7d",
    ]  # fmt: skip
    assert run(capsys, *argv)[0] == 0  # before the window: k2026a current, k2026b next
    verify: list[str | Path] = [
        "manifest", "verify", tmp_path / "certs" / "pins.jws", "--public-key", public_file,
        "-c", config_file, "--at",
    ]  # fmt: skip

    def at(days: float) -> str:
        return (datetime.now(UTC) + timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%SZ")

    # Inside the window the roles moved on: said, but every listed key is still served.
    code, out, err = run(capsys, *verify, at(1.5))
    assert (code, err) == (0, "")
    assert "warning: lists key k2026a" in out
    assert "as current; it is retiring at" in out
    # After grace_end the old key is retired: apps would keep trusting it. Fails.
    code, out, err = run(capsys, *verify, at(3))
    assert code == 1
    assert "error: lists key k2026a" in err
    assert "as current, but it is retired at" in err
    assert "sign it again" in err
    # Its twin: a manifest signed after grace_end leaves the retired key out, and passes.
    resigned = tmp_path / "resigned.toml"
    now = datetime.now(UTC)
    text = config_file.read_text()
    for name, moment in (("grace_start", now - timedelta(days=2)), ("grace_end", now)):
        text = re.sub(rf"^{name} = .*$", f"{name} = {moment.isoformat()}", text, flags=re.M)
    resigned.write_text(text)
    assert run(capsys, "manifest", "sign", "-c", resigned, "--key", key_file)[0] == 0
    code, out, err = run(capsys, *verify[:-2], resigned, "--at", at(0.1))
    assert (code, err) == (0, ""), out
    assert "every key" in out


async def test_serve_warns_when_its_manifest_lists_a_retired_key(
    tmp_path: Path, ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    keys = [make_key(ca, tmp_path / "certs", name) for name in ("k2026a", "k2026b")]
    signing = ed25519.Ed25519PrivateKey.generate()
    file = tmp_path / "pins.jws"
    pinned_keys = [
        manifest_pin(keys[0], "current"),
        manifest_pin(keys[1], "next"),
    ]
    token = manifest.sign(
        manifest.build_payload(
            pinned_keys, ROTATION, issued_at=datetime.now(UTC), valid_for=timedelta(days=7)
        ),
        signing,
    )
    write_atomically(file, token.encode() + b"\n", mode=0o644)
    window = {
        "old": "k2026a",
        "new": "k2026b",
        "grace_start": ROTATION.grace_start,
        "grace_end": ROTATION.grace_end,
    }
    config = make_config(
        keys, rotation=window, base_dir=tmp_path, extra={"manifest": {"file": str(file)}}
    )
    caplog.set_level(logging.WARNING, logger="dualproxy")
    day_before = ROTATION.grace_end - timedelta(days=1)
    for now, warned in ((day_before, False), (ROTATION.grace_end, True)):
        caplog.clear()
        async with serving(config, clock=Clock(now)):
            pass
        retired = [r for r in caplog.records if "as current, but it is retired" in r.getMessage()]
        assert bool(retired) is warned, now


def manifest_pin(key: KeyFiles, role: PinRole) -> PinnedKey:
    return PinnedKey(
        name=key.name,
        role=role,
        pin=key.pin,
        algorithm="ECDSA P-256",
        hostnames=("api.example.com",),
        not_after=None,
    )
