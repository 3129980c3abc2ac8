"""Public-key pins, and the formats mobile and command-line clients read them in.

A pin is base64(SHA-256(DER SubjectPublicKeyInfo)): the value OkHttp, TrustKit, Android's
network security config, iOS NSPinnedDomains, HPKP and `curl --pinnedpubkey` all compare.
It names a key, not a certificate, which is why pins survive renewals that keep the key.

Rules every format follows:
- Keys are rendered in the given order; a pin listed twice is rendered once, first wins.
- The hostnames pinned are the sorted union of all keys' hostnames. With none known, the
  placeholder "api.example.com" is used and a comment says so.
- Every value from a certificate or the config is escaped for the target syntax, and
  `PinnedKey` refuses text no syntax can carry (empty strings, control characters), so no
  name can end a comment or a string early.
- OkHttp understands a wildcard name such as "*.example.com" itself. Android, TrustKit and
  iOS only know "this domain and its subdomains", so there a wildcard becomes its parent
  domain with subdomains included, which also pins the parent itself; a comment says so.

HPKP (RFC 7469) is deprecated: Chrome and Firefox removed it. Some HTTP clients and
libraries still parse the header, which is why it remains a format here.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Literal, get_args
from xml.sax.saxutils import escape as xml_escape

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from dualproxy.config.times import format_time

PinRole = Literal["current", "next", "retiring", "retired", "standby"]
_ROLES: Final[tuple[str, ...]] = get_args(PinRole)

# Stands in for the API host when no certificate names are known; example.com is reserved
# for documentation (RFC 2606), so a forgotten placeholder can never pin a real site.
PLACEHOLDER_HOSTNAME: Final = "api.example.com"

# RFC 7469 section 4.1 names 60 days as a reasonable maximum max-age: long enough to protect
# clients that reconnect rarely, short enough that a pinning mistake heals on its own.
HPKP_MAX_AGE_SECONDS: Final = 60 * 24 * 60 * 60

# The customary names of the NIST curves TLS uses; cryptography reports SECG names.
_NIST_CURVE_NAMES: Final[dict[str, str]] = {
    "secp256r1": "P-256",
    "secp384r1": "P-384",
    "secp521r1": "P-521",
}


def spki_pin(public_key: PublicKeyTypes) -> str:
    """Return base64(SHA-256(DER SubjectPublicKeyInfo)) of `public_key`."""
    spki = public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode("ascii")


def spki_pin_of_certificate(cert: x509.Certificate) -> str:
    """Return the pin of the key `cert` certifies."""
    return spki_pin(cert.public_key())


def describe_key_algorithm(public_key: PublicKeyTypes) -> str:
    """Name the key's algorithm and size for people, e.g. "ECDSA P-256" or "RSA 2048".

    Types without a size or curve are named after their cryptography class ("X25519").
    """
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"RSA {public_key.key_size}"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        curve = public_key.curve.name
        return f"ECDSA {_NIST_CURVE_NAMES.get(curve, curve)}"
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(public_key, ed448.Ed448PublicKey):
        return "Ed448"
    return type(public_key).__name__.removesuffix("PublicKey")


def _check_text(what: str, value: str) -> None:
    if not value or not value.isprintable():
        raise ValueError(f"{what} {value!r} must be non-empty text without control characters")


def is_pin(pin: str) -> bool:
    """Whether `pin` is a SHA-256 pin in canonical base64 (no \"sha256/\" prefix)."""
    try:
        digest = base64.b64decode(pin, validate=True)
    except ValueError:  # binascii.Error, or non-ASCII text
        return False
    # Canonical encoding only, so that equal keys always have equal pin strings.
    return len(digest) == hashlib.sha256().digest_size and base64.b64encode(digest) == pin.encode()


@dataclass(frozen=True, slots=True)
class PinnedKey:
    """One key as the pin formats show it."""

    name: str  # our key name from config, e.g. "k2026a"
    role: PinRole
    pin: str  # base64, no "sha256/" prefix
    algorithm: str  # e.g. "ECDSA P-256", "RSA 2048"
    hostnames: tuple[str, ...]  # DNS names the key's certificate covers (may be empty)
    not_after: datetime | None  # certificate expiry (aware) if a certificate exists

    def __post_init__(self) -> None:
        _check_text("key name", self.name)
        if self.role not in _ROLES:
            raise ValueError(f"key {self.name!r}: role {self.role!r} is not one of {_ROLES}")
        if not is_pin(self.pin):
            raise ValueError(f"key {self.name!r}: pin is not base64 of a SHA-256 digest")
        _check_text(f"key {self.name!r}: algorithm", self.algorithm)
        for hostname in self.hostnames:
            _check_text(f"key {self.name!r}: hostname", hostname)
        if self.not_after is not None and self.not_after.utcoffset() is None:
            raise ValueError(f"key {self.name!r}: not_after must carry a time zone")


@dataclass(frozen=True, slots=True)
class _Domain:
    """A name as platforms without wildcard syntax pin it."""

    name: str
    include_subdomains: bool


_NO_HOSTNAMES_NOTE: Final = (
    f"{PLACEHOLDER_HOSTNAME} is a placeholder: no certificate names are known. "
    "Replace it with your API host."
)
_WILDCARD_NOTE: Final = (
    "Wildcard certificate names are pinned as their parent domain with subdomains included, "
    "which also pins the parent domain itself."
)
_TRUSTKIT_ONE_PIN_NOTE: Final = (
    "TrustKit refuses a configuration with fewer than two pins: "
    "add a backup pin (a standby key) before shipping."
)


def _label(key: PinnedKey) -> str:
    return f"{key.name} ({key.role}, {key.algorithm})"


def _hostnames_or_placeholder(hostnames: tuple[str, ...]) -> tuple[tuple[str, ...], list[str]]:
    if hostnames:
        return hostnames, []
    return (PLACEHOLDER_HOSTNAME,), [_NO_HOSTNAMES_NOTE]


def _domains(hostnames: tuple[str, ...]) -> tuple[list[_Domain], list[str]]:
    """The pinned domains for platforms without wildcards, and notes for the reader."""
    names, notes = _hostnames_or_placeholder(hostnames)
    include: dict[str, bool] = {}
    for name in names:
        if name.startswith("*.") and len(name) > len("*."):
            include[name[len("*.") :]] = True
        else:
            include.setdefault(name, False)
    if any(include.values()):
        notes.append(_WILDCARD_NOTE)
    return [_Domain(name, include[name]) for name in sorted(include)], notes


def _xml_comment(text: str) -> str:
    # "--" may not appear inside an XML comment.
    return "<!-- " + re.sub("-(?=-)", "- ", text) + " -->"


def _bool_literal(value: bool) -> str:
    # Android's attributes, plist's <true/> tags and Swift all spell booleans this way.
    return "true" if value else "false"


def _kotlin_string(text: str) -> str:
    # "$" starts a string template in Kotlin.
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$")
    return f'"{escaped}"'


def _swift_string(text: str) -> str:
    # Escaping the backslash also disarms "\(" interpolation.
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _render_curl(keys: Sequence[PinnedKey], hostnames: tuple[str, ...]) -> str:
    return ";".join(f"sha256//{key.pin}" for key in keys)


def _render_okhttp(keys: Sequence[PinnedKey], hostnames: tuple[str, ...]) -> str:
    names, notes = _hostnames_or_placeholder(hostnames)
    lines = ["// OkHttp certificate pins generated by dualproxy."]
    lines += [f"// {note}" for note in notes]
    lines += [
        "// Use with OkHttpClient.Builder().certificatePinner(certificatePinner).build().",
        "import okhttp3.CertificatePinner",
        "",
        "val certificatePinner = CertificatePinner.Builder()",
    ]
    lines += [
        f"    .add({_kotlin_string(name)}, {_kotlin_string('sha256/' + key.pin)}) // {_label(key)}"
        for name in names
        for key in keys
    ]
    lines.append("    .build()")
    return "\n".join(lines)


def _render_android(keys: Sequence[PinnedKey], hostnames: tuple[str, ...]) -> str:
    domains, notes = _domains(hostnames)
    lines = [
        '<?xml version="1.0" encoding="utf-8"?>',
        _xml_comment(
            "res/xml/network_security_config.xml, generated by dualproxy. Reference it from "
            'AndroidManifest.xml: <application android:networkSecurityConfig="@xml/'
            'network_security_config">.'
        ),
        "<network-security-config>",
        "    <domain-config>",
    ]
    lines += [f"        {_xml_comment(note)}" for note in notes]
    lines += [
        f'        <domain includeSubdomains="{_bool_literal(domain.include_subdomains)}">'
        f"{xml_escape(domain.name)}</domain>"
        for domain in domains
    ]
    expiries = [key.not_after for key in keys if key.not_after is not None]
    if expiries:
        expiration = max(expiries).astimezone(UTC).date().isoformat()
        lines += [
            "        "
            + _xml_comment(
                "Android stops enforcing these pins on the expiration date, so an app that is "
                "never updated fails open instead of failing forever once these keys are "
                "gone. It is the latest certificate expiry among the keys; move it forward "
                "when renewals keep the keys."
            ),
            f'        <pin-set expiration="{expiration}">',
        ]
    else:
        lines += [
            "        "
            + _xml_comment(
                "No certificate expiry is known: consider an expiration attribute "
                "(YYYY-MM-DD), after which Android stops enforcing the pins, so that an "
                "app that is never updated fails open instead of failing forever."
            ),
            "        <pin-set>",
        ]
    for key in keys:
        lines += [
            f"            {_xml_comment(_label(key))}",
            f'            <pin digest="SHA-256">{key.pin}</pin>',
        ]
    lines += ["        </pin-set>", "    </domain-config>", "</network-security-config>"]
    return "\n".join(lines)


def _render_trustkit(keys: Sequence[PinnedKey], hostnames: tuple[str, ...]) -> str:
    domains, notes = _domains(hostnames)
    if len(keys) < 2:
        notes.insert(0, _TRUSTKIT_ONE_PIN_NOTE)
    lines = ["// TrustKit configuration generated by dualproxy."]
    lines += [f"// {note}" for note in notes]
    lines += [
        "let trustKitConfig: [String: Any] = [",
        "    // false: call TSKPinningValidator from your URLSession delegate yourself;",
        "    // true lets TrustKit swizzle NSURLSession delegates to do it.",
        "    kTSKSwizzleNetworkDelegates: false,",
        "    kTSKPinnedDomains: [",
    ]
    for domain in domains:
        lines += [
            f"        {_swift_string(domain.name)}: [",
            "            kTSKEnforcePinning: true,",
            f"            kTSKIncludeSubdomains: {_bool_literal(domain.include_subdomains)},",
            "            kTSKPublicKeyHashes: [",
        ]
        lines += [f"                {_swift_string(key.pin)}, // {_label(key)}" for key in keys]
        lines += ["            ],", "        ],"]
    lines += ["    ],", "]", "TrustKit.initSharedInstance(withConfiguration: trustKitConfig)"]
    return "\n".join(lines)


def _render_ios(keys: Sequence[PinnedKey], hostnames: tuple[str, ...]) -> str:
    domains, notes = _domains(hostnames)
    lines = [_xml_comment("Info.plist fragment generated by dualproxy (iOS 14 or later).")]
    lines += [_xml_comment(note) for note in notes]
    lines += [
        "<key>NSAppTransportSecurity</key>",
        "<dict>",
        "    <key>NSPinnedDomains</key>",
        "    <dict>",
    ]
    for domain in domains:
        lines += [
            f"        <key>{xml_escape(domain.name)}</key>",
            "        <dict>",
            "            <key>NSIncludesSubdomains</key>",
            f"            <{_bool_literal(domain.include_subdomains)}/>",
            "            <key>NSPinnedLeafIdentities</key>",
            "            <array>",
        ]
        for key in keys:
            lines += [
                f"                {_xml_comment(_label(key))}",
                "                <dict>",
                "                    <key>SPKI-SHA256-BASE64</key>",
                f"                    <string>{key.pin}</string>",
                "                </dict>",
            ]
        lines += ["            </array>", "        </dict>"]
    lines += ["    </dict>", "</dict>"]
    return "\n".join(lines)


def _render_hpkp(keys: Sequence[PinnedKey], hostnames: tuple[str, ...]) -> str:
    pins = "; ".join(f'pin-sha256="{key.pin}"' for key in keys)
    return f"Public-Key-Pins: {pins}; max-age={HPKP_MAX_AGE_SECONDS}"


def _iso_utc(moment: datetime | None) -> str | None:
    return format_time(moment) if moment is not None else None


def _render_json(keys: Sequence[PinnedKey], hostnames: tuple[str, ...]) -> str:
    return json.dumps(
        [
            {
                "name": key.name,
                "role": key.role,
                "pin": key.pin,
                "algorithm": key.algorithm,
                "hostnames": list(key.hostnames),
                "not_after": _iso_utc(key.not_after),
            }
            for key in keys
        ],
        indent=2,
    )


_RENDERERS: Final[dict[str, Callable[[Sequence[PinnedKey], tuple[str, ...]], str]]] = {
    "okhttp": _render_okhttp,
    "curl": _render_curl,
    "android": _render_android,
    "trustkit": _render_trustkit,
    "ios": _render_ios,
    "hpkp": _render_hpkp,
    "json": _render_json,
}
FORMATS: Final[tuple[str, ...]] = tuple(_RENDERERS)


def render(keys: Sequence[PinnedKey], fmt: str) -> str:
    """Render the pins of `keys` in format `fmt` (one of FORMATS), without a final newline.

    Raises ValueError for an unknown format or when there is no key to pin.
    """
    renderer = _RENDERERS.get(fmt)
    if renderer is None:
        raise ValueError(f"unknown pin format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if not keys:
        raise ValueError("no keys to pin")
    first_by_pin: dict[str, PinnedKey] = {}
    for key in keys:
        first_by_pin.setdefault(key.pin, key)
    hostnames = tuple(sorted({name for key in keys for name in key.hostnames}))
    return renderer(list(first_by_pin.values()), hostnames)
