"""The signed pin manifest: which pins an app should trust now, signed so that an app that
fetches it at run time can tell it came from us.

Envelope. JWS compact serialization (RFC 7515 §7.1) with EdDSA over Ed25519 (RFC 8037):
`BASE64URL(header) "." BASE64URL(payload) "." BASE64URL(signature)`, the signature taken over
the ASCII of the first two parts. Every platform verifies Ed25519 with its own library
(CryptoKit on iOS 13+, Tink or BouncyCastle on Android), so the app needs no JOSE library:
split on ".", check the header's `alg`, verify, then read the payload. The header is
`{"alg":"EdDSA","kid":THUMBPRINT,"typ":"dualproxy-pins"}`; `kid` is the RFC 7638 thumbprint
of the signing key's JWK, so a manifest signed by another key says so before any signature
check. josepy (installed for ACME) has no EdDSA or OKP support, hence the few lines here.

Payload (UTF-8 JSON, `version` 1): `iat` and `exp` are RFC 7519 NumericDates (seconds since
the epoch, as JWT libraries check them), `hosts` the names the keys' certificates cover,
`rotation` the grace window (RFC 3339 times, and the phase at signing) or null, and `pins`
the keys an app should accept, each with its role at signing time: `current`, `next` (served
from the window on), `retiring` (served during the window only) or `standby` (a configured
backup key the rotation does not name). A key whose window is over (`retired`) is left out:
an app must stop trusting it.

Trust rules an app follows (and `verify` applies): the header's `alg` must be exactly
"EdDSA" (never "none"), the signature must verify with the public key shipped in the app, and
the manifest is stale once `exp` has passed (or when `iat` lies in the future beyond a small
clock skew). Nothing here reads a clock: callers pass the time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final, Literal

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from dualproxy.config.errors import OperatorError
from dualproxy.config.schema import Config, Rotation
from dualproxy.config.times import format_time, parse_time
from dualproxy.files import write_atomically
from dualproxy.rotation.policy import phase
from dualproxy.tls.keystore import key_file_permission_problem
from dualproxy.tls.pins import PinnedKey

# The header's algorithm name for Ed25519 signatures (RFC 8037 §3.1).
ALGORITHM: Final = "EdDSA"
# Explicit typing (RFC 8725 §3.11): a token signed by this key for another purpose cannot
# pass for a manifest. Apps may ignore it; `verify` checks it when present.
MANIFEST_TYPE: Final = "dualproxy-pins"
PAYLOAD_VERSION: Final = 1
# RFC 7515 §9.2.1's media type for the compact serialization, which is what the file holds.
MEDIA_TYPE: Final = "application/jose"
# Default and bounds of `manifest sign --valid-for`. A week: a stale manifest stops being
# trusted within days, while a daily signing job can miss a few runs without breaking apps.
DEFAULT_VALIDITY: Final = timedelta(days=7)
MIN_VALIDITY: Final = timedelta(minutes=5)
# Past three months a manifest outlives the rotation it describes (windows are weeks long).
MAX_VALIDITY: Final = timedelta(days=90)
# Phones' clocks drift; a manifest issued this little "in the future" is still accepted.
CLOCK_SKEW: Final = timedelta(minutes=5)
# A manifest is a few hundred bytes per key; anything this large is not one of ours.
MAX_MANIFEST_BYTES: Final = 64 * 1024

ExpiryStatus = Literal["ok", "soon", "expired"]

_BASE64URL: Final = re.compile(r"[A-Za-z0-9_-]*")
_ROLES_SERVED: Final = frozenset({"current", "next", "retiring", "standby"})


class ManifestError(OperatorError):
    """A manifest that must not be trusted: `problem` says why, in the operator's terms.

    Its own class because its callers tell it apart from other operator errors: `manifest
    verify` says "not trusted", and a served file that is no manifest is a warning on the
    status page, not a reason to refuse a config. (Its signing key files raise OperatorError.)
    """


@dataclass(frozen=True, slots=True)
class ManifestPin:
    key: str
    role: str
    pin: str  # base64 SHA-256 of the SubjectPublicKeyInfo, as in pins.py
    algorithm: str
    not_after: datetime | None


@dataclass(frozen=True, slots=True)
class Manifest:
    """A manifest whose signature verified (or, from `peek`, one merely decoded)."""

    kid: str | None
    issued_at: datetime
    expires_at: datetime
    hosts: tuple[str, ...]
    pins: tuple[ManifestPin, ...]
    grace_start: datetime | None
    grace_end: datetime | None

    def pin_values(self) -> frozenset[str]:
        return frozenset(p.pin for p in self.pins)


# --- base64url, strictly -------------------------------------------------------------------


def b64url_encode(data: bytes) -> str:
    """Base64url without padding (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str, what: str) -> bytes:
    """The bytes of unpadded base64url `text`; ManifestError for anything else, including a
    non-canonical encoding (stray low bits), so one manifest has exactly one spelling."""
    if not _BASE64URL.fullmatch(text) or len(text) % 4 == 1:
        raise ManifestError(f"the {what} is not base64url")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ManifestError(f"the {what} is not base64url") from None
    if b64url_encode(data) != text:
        raise ManifestError(f"the {what} is not canonical base64url")
    return data


# --- keys ----------------------------------------------------------------------------------


def public_key_thumbprint(public_key: ed25519.Ed25519PublicKey) -> str:
    """The RFC 7638 JWK thumbprint (SHA-256, base64url) of the key's OKP JWK (RFC 8037 §2)."""
    x = b64url_encode(public_key.public_bytes(Encoding.Raw, PublicFormat.Raw))
    # The required members in lexicographic order, no whitespace (RFC 7638 §3.2).
    canonical = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": x}, separators=(",", ":"))
    return b64url_encode(hashlib.sha256(canonical.encode("ascii")).digest())


# --- building and signing ------------------------------------------------------------------


def build_payload(
    keys: Sequence[PinnedKey],
    rotation: Rotation | None,
    *,
    issued_at: datetime,
    valid_for: timedelta,
) -> dict[str, object]:
    """The manifest's claims for `keys` (roles as `policy.pin_role` gave them at
    `issued_at`); retired keys are left out, see the module docstring."""
    if not MIN_VALIDITY <= valid_for <= MAX_VALIDITY:
        raise ValueError(f"a validity of {valid_for} is outside {MIN_VALIDITY}..{MAX_VALIDITY}")
    listed = [key for key in keys if key.role in _ROLES_SERVED]
    if not listed:
        raise ValueError("no key to list: every configured key is retired")
    issued = int(issued_at.timestamp())
    window = None
    if rotation is not None:
        window = {
            "phase": phase(rotation, issued_at),
            "grace_start": format_time(rotation.grace_start),
            "grace_end": format_time(rotation.grace_end),
        }
    seen: set[str] = set()
    pins = []
    for key in listed:
        if key.pin in seen:
            continue
        seen.add(key.pin)
        pins.append(
            {
                "key": key.name,
                "role": key.role,
                "pin": key.pin,
                "algorithm": key.algorithm,
                "not_after": format_time(key.not_after) if key.not_after else None,
            }
        )
    return {
        "version": PAYLOAD_VERSION,
        "iat": issued,
        "exp": issued + int(valid_for.total_seconds()),
        "hosts": sorted({name for key in listed for name in key.hostnames}),
        "rotation": window,
        "pins": pins,
    }


def sign(payload: Mapping[str, object], private_key: ed25519.Ed25519PrivateKey) -> str:
    """`payload` as a JWS compact serialization signed with `private_key` (EdDSA)."""
    header = {
        "alg": ALGORITHM,
        "kid": public_key_thumbprint(private_key.public_key()),
        "typ": MANIFEST_TYPE,
    }
    signing_input = f"{_json_part(header)}.{_json_part(payload)}"
    signature = private_key.sign(signing_input.encode("ascii"))
    return f"{signing_input}.{b64url_encode(signature)}"


def _json_part(value: Mapping[str, object]) -> str:
    return b64url_encode(json.dumps(value, separators=(",", ":"), sort_keys=True).encode())


# --- reading and verifying -----------------------------------------------------------------


def verify(token: str | bytes, public_key: ed25519.Ed25519PublicKey, *, now: datetime) -> Manifest:
    """The manifest in `token` if it is one an app may trust at `now`: EdDSA header, a
    signature by `public_key`, `iat` not in the future, `exp` not passed. ManifestError says
    which check failed."""
    header, payload, signing_input, signature = _split(token)
    if header.get("alg") != ALGORITHM:
        raise ManifestError(f"the header's alg is {header.get('alg')!r}, not {ALGORITHM!r}")
    if header.get("typ", MANIFEST_TYPE) != MANIFEST_TYPE:
        raise ManifestError(f"the header's typ is {header.get('typ')!r}, not {MANIFEST_TYPE!r}")
    kid = header.get("kid")
    expected_kid = public_key_thumbprint(public_key)
    if kid is not None and kid != expected_kid:
        raise ManifestError(
            f"signed by another key (kid {kid!r}; this public key's is {expected_kid!r})"
        )
    try:
        public_key.verify(signature, signing_input)
    except InvalidSignature:
        raise ManifestError("the signature does not verify with this public key") from None
    manifest = _claims(payload, kid if isinstance(kid, str) else None)
    if manifest.issued_at > now + CLOCK_SKEW:
        raise ManifestError(f"issued in the future ({format_time(manifest.issued_at)})")
    if now >= manifest.expires_at:
        raise ManifestError(f"expired at {format_time(manifest.expires_at)}")
    return manifest


def peek(token: str | bytes) -> Manifest:
    """The manifest's claims, decoded WITHOUT checking the signature or the time: for the
    server's expiry warnings about the file it serves, never for trusting one."""
    header, payload, _, _ = _split(token)
    kid = header.get("kid")
    return _claims(payload, kid if isinstance(kid, str) else None)


def expiry_status(expires_at: datetime, now: datetime, warn_before: timedelta) -> ExpiryStatus:
    """Whether a manifest expiring at `expires_at` needs re-signing soon, or already did."""
    if now >= expires_at:
        return "expired"
    if now >= expires_at - warn_before:
        return "soon"
    return "ok"


def parse_duration(text: str) -> timedelta:
    """ "7d", "36h", "90m", "600s" as a timedelta; ValueError otherwise."""
    match = re.fullmatch(r"([0-9]{1,6})([dhms])", text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a duration such as 7d, 36h, 90m or 600s")
    unit = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}[match.group(2)]
    return timedelta(**{unit: int(match.group(1))})


def _split(token: str | bytes) -> tuple[dict[str, object], bytes, bytes, bytes]:
    """Header (a JSON object), payload bytes, signing input and signature of a compact JWS."""
    if isinstance(token, bytes):
        if len(token) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"larger than {MAX_MANIFEST_BYTES} bytes: not a manifest")
        try:
            token = token.decode("ascii")
        except UnicodeDecodeError:
            raise ManifestError("not a JWS compact serialization (non-ASCII bytes)") from None
    token = token.strip()  # a trailing newline from an editor or `echo` is harmless
    if len(token) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"larger than {MAX_MANIFEST_BYTES} bytes: not a manifest")
    parts = token.split(".")
    if len(parts) != 3:
        raise ManifestError(
            f"not a JWS compact serialization: {len(parts)} part(s) where three are expected"
        )
    header_text, payload_text, signature_text = parts
    header = _json_object(b64url_decode(header_text, "header"), "header")
    if "crit" in header:  # RFC 7515 §4.1.11: extensions we do not know must be refused
        raise ManifestError("the header names critical extensions (crit), which we do not know")
    payload = b64url_decode(payload_text, "payload")
    signature = b64url_decode(signature_text, "signature")
    return header, payload, f"{header_text}.{payload_text}".encode("ascii"), signature


def _json_object(data: bytes, what: str) -> dict[str, object]:
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ManifestError(f"the {what} is not JSON") from None
    if not isinstance(value, dict):
        raise ManifestError(f"the {what} is not a JSON object")
    return value


def _claims(payload: bytes, kid: str | None) -> Manifest:
    claims = _json_object(payload, "payload")
    if claims.get("version") != PAYLOAD_VERSION:
        raise ManifestError(f"payload version {claims.get('version')!r}, not {PAYLOAD_VERSION}")
    issued_at = _numeric_date(claims, "iat")
    expires_at = _numeric_date(claims, "exp")
    hosts = claims.get("hosts")
    if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
        raise ManifestError("the payload's hosts is not a list of names")
    raw_pins = claims.get("pins")
    if not isinstance(raw_pins, list) or not raw_pins:
        raise ManifestError("the payload lists no pins")
    pins = tuple(_pin(item) for item in raw_pins)
    window = claims.get("rotation")
    start = end = None
    if window is not None:
        if not isinstance(window, dict):
            raise ManifestError("the payload's rotation is not an object")
        start, end = _instant(window.get("grace_start")), _instant(window.get("grace_end"))
    return Manifest(
        kid=kid,
        issued_at=issued_at,
        expires_at=expires_at,
        hosts=tuple(hosts),
        pins=pins,
        grace_start=start,
        grace_end=end,
    )


def _numeric_date(claims: Mapping[str, object], name: str) -> datetime:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 40:
        raise ManifestError(f"the payload's {name} is not a NumericDate (seconds since 1970)")
    return datetime.fromtimestamp(value, UTC)


def _pin(item: object) -> ManifestPin:
    if not isinstance(item, dict):
        raise ManifestError("a pins entry is not an object")
    texts = {name: item.get(name) for name in ("key", "role", "pin", "algorithm")}
    if not all(isinstance(value, str) for value in texts.values()):
        raise ManifestError("a pins entry lacks key, role, pin or algorithm")
    return ManifestPin(
        key=str(texts["key"]),
        role=str(texts["role"]),
        pin=str(texts["pin"]),
        algorithm=str(texts["algorithm"]),
        not_after=_instant(item.get("not_after")) if item.get("not_after") is not None else None,
    )


def _instant(value: object) -> datetime:
    """A time in the manifest, read as the config reads one (config.parse_time)."""
    if not isinstance(value, str):
        raise ManifestError(f"{value!r} is not an RFC 3339 time")
    try:
        return parse_time(value)
    except ValueError as exc:
        raise ManifestError(str(exc)) from None


# --- key files (the only I/O here: for the CLI) ---------------------------------------------


def public_key_file(private_key_file: Path) -> Path:
    """Where keygen puts the public key: manifest-signing.pem -> manifest-signing.pub.pem."""
    return private_key_file.with_name(f"{private_key_file.stem}.pub.pem")


def write_signing_key(path: Path, *, force: bool = False) -> ed25519.Ed25519PrivateKey:
    """A new Ed25519 signing key at `path` (PKCS#8 PEM, mode 0600) and its public key next to
    it (SubjectPublicKeyInfo PEM). Refuses to replace either unless `force`: apps may ship the
    public key. OperatorError when it cannot."""
    public_path = public_key_file(path)
    if not force:
        for existing in (path, public_path):
            if existing.exists() or existing.is_symlink():
                raise OperatorError(
                    f"{existing} already exists; apps may ship its public key. Pick another"
                    " --out, or pass --force to replace it"
                )
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    public_pem = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomically(path, private_pem, mode=0o600)
        write_atomically(public_path, public_pem, mode=0o644)
    except OSError as exc:
        raise OperatorError(f"cannot write the key: {exc.strerror}", file=path) from None
    return key


def read_signing_key(path: Path) -> ed25519.Ed25519PrivateKey:
    """The Ed25519 private key in `path`, which only its owner may read (as TLS keys)."""
    try:
        status = path.stat()
        pem = path.read_bytes()
    except OSError as exc:
        raise OperatorError(f"cannot read the signing key: {exc.strerror}", file=path) from None
    problem = key_file_permission_problem(status.st_mode, status.st_uid, os.geteuid())
    if problem is not None:
        raise OperatorError(f"the signing key {problem}", file=path)
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise OperatorError(
            "not an unencrypted PEM private key",
            fix="make one with `dualproxy manifest keygen --out FILE`",
            file=path,
        ) from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise OperatorError(
            "not an Ed25519 key",
            fix="make one with `dualproxy manifest keygen --out FILE`",
            file=path,
        )
    return key


def read_public_key(path: Path) -> ed25519.Ed25519PublicKey:
    """The Ed25519 public key in a SubjectPublicKeyInfo PEM file (what keygen writes)."""
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise OperatorError(f"cannot read the public key: {exc.strerror}", file=path) from None
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise OperatorError("not a PEM public key (BEGIN PUBLIC KEY)", file=path) from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise OperatorError("not an Ed25519 public key", file=path)
    return key


@dataclass(frozen=True, slots=True)
class StaleRole:
    """A pin the manifest lists with a role its key no longer has: `retired` means apps that
    trust the manifest keep trusting a key that is served to nobody (sign again)."""

    pin: ManifestPin
    now: str  # the key's role at the time asked (policy.pin_role): "retired", "current", ...

    @property
    def retired(self) -> bool:
        return self.now == "retired"

    def describe(self, moment: datetime) -> str:
        listed = f"lists key {self.pin.key} (sha256/{self.pin.pin}) as {self.pin.role}"
        if self.retired:
            return (
                f"{listed}, but it is retired at {format_time(moment)} (its window is over):"
                " apps that trust the manifest keep trusting a key no longer served; sign it"
                " again (`dualproxy manifest sign`)"
            )
        return f"{listed}; it is {self.now} at {format_time(moment)}: sign it again"


def stale_roles(listed: Manifest, roles_now: Mapping[str, str]) -> list[StaleRole]:
    """The listed pins whose key's role at some instant (`roles_now`: pin -> role, as
    policy.pin_role gives it) differs from the role the manifest gives them."""
    return [
        StaleRole(pin, roles_now[pin.pin])
        for pin in listed.pins
        if pin.pin in roles_now and roles_now[pin.pin] != pin.role
    ]


def served_key_names(config: Config, now: datetime) -> tuple[str, ...]:
    """The keys some client may be served at `now`: all of them without a rotation, old
    before the window, both during it, new after it."""
    rotation = config.rotation
    if rotation is None:
        return tuple(config.keys)
    window = phase(rotation, now)
    if window == "before":
        return rotation.old
    if window == "after":
        return rotation.new
    return rotation.old + rotation.new
