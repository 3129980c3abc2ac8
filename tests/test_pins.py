"""Pins and their formats: checked against openssl, parsed back, and used by a real curl."""

from __future__ import annotations

import base64
import hashlib
import json
import plistlib
import re
import socketserver
import ssl
import subprocess
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, x25519
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from dualproxy.tls.pins import (
    FORMATS,
    HPKP_MAX_AGE_SECONDS,
    PLACEHOLDER_HOSTNAME,
    PinnedKey,
    PinRole,
    describe_key_algorithm,
    render,
    spki_pin,
    spki_pin_of_certificate,
)

# Generous bounds on helper processes, so that a hung tool fails the test instead of CI.
SUBPROCESS_TIMEOUT_SECONDS = 30
CURL_MAX_TIME_SECONDS = 10
# Bounds the server thread's exit once the test is over.
SERVER_JOIN_TIMEOUT_SECONDS = 10
# How often the test server checks for shutdown; only affects how quickly a test ends.
SERVER_POLL_SECONDS = 0.05
# curl's exit code for CURLE_SSL_PINNEDPUBKEYNOTMATCH (see `man curl`, EXIT CODES).
CURL_EXIT_PIN_MISMATCH = 90

PIN = r"[A-Za-z0-9+/]{43}="
# Kotlin string literal as we write it: `\`, `"` and `$` always escaped.
KOTLIN_STRING = r'"(?:[^"\\$]|\\[\\"$])*"'
# Swift string literal as we write it: only `\` and `"` escaped, so no `\(` interpolation.
SWIFT_STRING = r'"(?:[^"\\]|\\[\\"])*"'


def fake_pin(seed: str) -> str:
    return base64.b64encode(hashlib.sha256(seed.encode()).digest()).decode()


PIN_A = fake_pin("a")
PIN_B = fake_pin("b")
PIN_C = fake_pin("c")


def key(
    name: str,
    pin: str,
    hostnames: tuple[str, ...] = (),
    role: PinRole = "current",
    not_after: datetime | None = None,
) -> PinnedKey:
    return PinnedKey(name, role, pin, "ECDSA P-256", hostnames, not_after)


def unescape(literal: str) -> str:
    """The value of a Kotlin or Swift string literal matched by KOTLIN_/SWIFT_STRING."""
    return re.sub(r"\\(.)", r"\1", literal[1:-1])


# ---- parsers, one per format, each strict about the layout it accepts ----


def parse_curl(text: str) -> list[str]:
    assert re.fullmatch(rf"sha256//{PIN}(;sha256//{PIN})*", text)
    return [entry.removeprefix("sha256//") for entry in text.split(";")]


def parse_hpkp(text: str) -> list[str]:
    match = re.fullmatch(rf'Public-Key-Pins: ((?:pin-sha256="{PIN}"; )+)max-age=(\d+)', text)
    assert match
    assert int(match[2]) == HPKP_MAX_AGE_SECONDS
    return re.findall(rf'pin-sha256="({PIN})"', match[1])


def parse_okhttp(text: str) -> list[tuple[str, str]]:
    """The (host, pin) pairs, in order; every `.add` line must be well-formed."""
    lines = text.splitlines()
    assert "import okhttp3.CertificatePinner" in lines
    start = lines.index("val certificatePinner = CertificatePinner.Builder()")
    assert lines[-1] == "    .build()"
    pairs = []
    for line in lines[start + 1 : -1]:
        match = re.fullmatch(rf'    \.add\(({KOTLIN_STRING}), "sha256/({PIN})"\) // .*', line)
        assert match, line
        pairs.append((unescape(match[1]), match[2]))
    return pairs


def parse_trustkit(text: str) -> dict[str, tuple[bool, list[str]]]:
    """host -> (include subdomains, pins); the whole dictionary literal must be accounted for."""
    domain = (
        rf" {{8}}({SWIFT_STRING}): \[\n"
        r" {12}kTSKEnforcePinning: true,\n"
        r" {12}kTSKIncludeSubdomains: (true|false),\n"
        r" {12}kTSKPublicKeyHashes: \[\n"
        rf"((?: {{16}}\"{PIN}\", // .*\n)*)"
        r" {12}\],\n"
        r" {8}\],\n"
    )
    match = re.search(
        r"^let trustKitConfig: \[String: Any\] = \[\n(?:    //.*\n)*"
        r"    kTSKSwizzleNetworkDelegates: false,\n"
        rf"    kTSKPinnedDomains: \[\n((?:{domain})*)    \],\n\]\n"
        r"TrustKit.initSharedInstance\(withConfiguration: trustKitConfig\)\Z",
        text,
        re.MULTILINE,
    )
    assert match, text
    return {
        unescape(host): (include == "true", re.findall(rf'"({PIN})"', pins))
        for host, include, pins in re.findall(domain, match[1])
    }


@dataclass(frozen=True)
class AndroidConfig:
    domains: dict[str, bool]  # name -> includeSubdomains
    expiration: str | None
    pins: list[str]


def parse_android(text: str) -> AndroidConfig:
    root = ET.fromstring(text)
    assert root.tag == "network-security-config"
    (domain_config,) = root
    assert domain_config.tag == "domain-config"
    domains = domain_config.findall("domain")
    (pin_set,) = domain_config.findall("pin-set")
    assert len(domain_config) == len(domains) + 1
    assert all(pin.get("digest") == "SHA-256" for pin in pin_set)
    include = {domain.get("includeSubdomains") for domain in domains}
    assert include <= {"true", "false"}
    return AndroidConfig(
        domains={d.text or "": d.get("includeSubdomains") == "true" for d in domains},
        expiration=pin_set.get("expiration"),
        pins=[pin.text or "" for pin in pin_set],
    )


def parse_ios(text: str) -> dict[str, object]:
    """The fragment as Info.plist would hold it, inside the top-level dictionary."""
    document = f'<plist version="1.0"><dict>{text}</dict></plist>'
    parsed = plistlib.loads(document.encode())
    assert list(parsed) == ["NSAppTransportSecurity"]
    transport = parsed["NSAppTransportSecurity"]
    assert list(transport) == ["NSPinnedDomains"]
    domains: dict[str, object] = transport["NSPinnedDomains"]
    return domains


def ios_domain(pins: list[str], include_subdomains: bool = False) -> dict[str, object]:
    return {
        "NSIncludesSubdomains": include_subdomains,
        "NSPinnedLeafIdentities": [{"SPKI-SHA256-BASE64": pin} for pin in pins],
    }


# ---- pins ----


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def leaves(ca: trustme.CA) -> dict[trustme.KeyType, trustme.LeafCert]:
    return {kind: ca.issue_cert("localhost", key_type=kind) for kind in trustme.KeyType}


def run_tool(command: list[str], stdin: bytes) -> bytes:
    return subprocess.run(
        command, input=stdin, capture_output=True, check=True, timeout=SUBPROCESS_TIMEOUT_SECONDS
    ).stdout


def openssl_pin(cert_pem: bytes) -> str:
    """The pin as the OkHttp and curl documentation compute it, with openssl alone."""
    public_pem = run_tool(["openssl", "x509", "-pubkey", "-noout"], cert_pem)
    der = run_tool(["openssl", "pkey", "-pubin", "-outform", "der"], public_pem)
    digest = run_tool(["openssl", "dgst", "-sha256", "-binary"], der)
    return run_tool(["openssl", "base64", "-A"], digest).decode().strip()


def leaf_certificate(leaf: trustme.LeafCert) -> x509.Certificate:
    return x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())


@pytest.mark.parametrize("kind", list(trustme.KeyType))
def test_pin_matches_openssl(
    leaves: dict[trustme.KeyType, trustme.LeafCert], kind: trustme.KeyType
) -> None:
    leaf = leaves[kind]
    expected = openssl_pin(leaf.cert_chain_pems[0].bytes())
    private_key = load_pem_private_key(leaf.private_key_pem.bytes(), password=None)

    assert spki_pin_of_certificate(leaf_certificate(leaf)) == expected
    assert spki_pin(private_key.public_key()) == expected


def test_pins_of_different_keys_differ(leaves: dict[trustme.KeyType, trustme.LeafCert]) -> None:
    ecdsa, rsa = (leaf_certificate(leaves[kind]) for kind in trustme.KeyType)
    assert spki_pin_of_certificate(ecdsa) != spki_pin_of_certificate(rsa)


def self_signed(private_key: ec.EllipticCurvePrivateKey, name: str) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=90))
        .sign(private_key, hashes.SHA256())
    )


def test_pin_survives_renewal_with_the_same_key() -> None:
    private_key = ec.generate_private_key(ec.SECP256R1())
    first = self_signed(private_key, "api.example.org")
    renewed = self_signed(private_key, "api.example.org")

    assert first.fingerprint(hashes.SHA256()) != renewed.fingerprint(hashes.SHA256())
    assert spki_pin_of_certificate(first) == spki_pin_of_certificate(renewed)
    # ... and it is a key pin, not the certificate fingerprint.
    first_fingerprint = base64.b64encode(first.fingerprint(hashes.SHA256())).decode()
    assert spki_pin_of_certificate(first) != first_fingerprint


def test_describe_trustme_keys(leaves: dict[trustme.KeyType, trustme.LeafCert]) -> None:
    described = {
        kind: describe_key_algorithm(leaf_certificate(leaf).public_key())
        for kind, leaf in leaves.items()
    }
    assert described == {trustme.KeyType.ECDSA: "ECDSA P-256", trustme.KeyType.RSA: "RSA 2048"}


@pytest.mark.parametrize(
    ("public_key", "expected"),
    [
        (ec.generate_private_key(ec.SECP384R1()).public_key(), "ECDSA P-384"),
        (ec.generate_private_key(ec.SECP521R1()).public_key(), "ECDSA P-521"),
        (ec.generate_private_key(ec.SECP256K1()).public_key(), "ECDSA secp256k1"),
        (ed25519.Ed25519PrivateKey.generate().public_key(), "Ed25519"),
        (ed448.Ed448PrivateKey.generate().public_key(), "Ed448"),
        (x25519.X25519PrivateKey.generate().public_key(), "X25519"),
    ],
)
def test_describe_key_algorithm(public_key: PublicKeyTypes, expected: str) -> None:
    assert describe_key_algorithm(public_key) == expected


# ---- PinnedKey ----


def test_pinned_key_accepts_a_well_formed_key() -> None:
    expiry = datetime(2026, 5, 1, tzinfo=UTC)
    pinned = PinnedKey("k2026a", "next", PIN_A, "RSA 2048", ("api.example.org",), expiry)
    assert (pinned.name, pinned.role, pinned.pin) == ("k2026a", "next", PIN_A)


@pytest.mark.parametrize(
    ("changes", "complaint"),
    [
        ({"pin": "not base64!"}, "pin"),
        ({"pin": base64.b64encode(b"short").decode()}, "pin"),
        ({"pin": "sha256/" + PIN_A}, "pin"),
        # Non-canonical: the last character carries bits that standard encoders set to zero.
        ({"pin": PIN_A[:-2] + chr(ord(PIN_A[-2]) ^ 1) + "="}, "pin"),
        ({"role": "primary"}, "role"),
        ({"name": ""}, "name"),
        ({"algorithm": ""}, "algorithm"),
        ({"hostnames": ("api.example.org\n.add(",)}, "hostname"),
        ({"hostnames": ("",)}, "hostname"),
        ({"not_after": datetime(2026, 5, 1)}, "time zone"),  # naive: the case under test
    ],
)
def test_pinned_key_rejects(changes: dict[str, object], complaint: str) -> None:
    fields: dict[str, object] = {
        "name": "k1",
        "role": "current",
        "pin": PIN_A,
        "algorithm": "ECDSA P-256",
        "hostnames": (),
        "not_after": None,
    }
    with pytest.raises(ValueError, match=complaint):
        PinnedKey(**(fields | changes))  # type: ignore[arg-type]


# ---- render: every format, parsed back ----

KEYS = (
    key("k2026a", PIN_A, ("api.example.org",), "current", datetime(2026, 5, 1, tzinfo=UTC)),
    key("k2026b", PIN_B, ("api2.example.org",), "next", None),
    # The same key listed again, with a name the parsers must not see.
    key("k2026a-again", PIN_A, ("api.example.org",), "retired", None),
)
HOSTS = ["api.example.org", "api2.example.org"]


def test_formats_are_the_documented_ones() -> None:
    assert FORMATS == ("okhttp", "curl", "android", "trustkit", "ios", "hpkp", "json")


def test_curl() -> None:
    text = render(KEYS, "curl")
    assert "\n" not in text
    assert parse_curl(text) == [PIN_A, PIN_B]


def test_hpkp() -> None:
    assert parse_hpkp(render(KEYS, "hpkp")) == [PIN_A, PIN_B]


def test_okhttp() -> None:
    text = render(KEYS, "okhttp")
    assert parse_okhttp(text) == [(host, pin) for host in HOSTS for pin in (PIN_A, PIN_B)]
    assert "// k2026a (current, ECDSA P-256)" in text
    assert "// k2026b (next, ECDSA P-256)" in text
    assert "k2026a-again" not in text


def test_android() -> None:
    text = render(KEYS, "android")
    parsed = parse_android(text)
    assert parsed == AndroidConfig(
        domains=dict.fromkeys(HOSTS, False), expiration="2026-05-01", pins=[PIN_A, PIN_B]
    )
    assert "<!-- k2026b (next, ECDSA P-256) -->" in text


def test_trustkit() -> None:
    parsed = parse_trustkit(render(KEYS, "trustkit"))
    assert parsed == {host: (False, [PIN_A, PIN_B]) for host in HOSTS}


def test_ios() -> None:
    assert parse_ios(render(KEYS, "ios")) == {host: ios_domain([PIN_A, PIN_B]) for host in HOSTS}


def test_json() -> None:
    assert json.loads(render(KEYS, "json")) == [
        {
            "name": "k2026a",
            "role": "current",
            "pin": PIN_A,
            "algorithm": "ECDSA P-256",
            "hostnames": ["api.example.org"],
            "not_after": "2026-05-01T00:00:00Z",
        },
        {
            "name": "k2026b",
            "role": "next",
            "pin": PIN_B,
            "algorithm": "ECDSA P-256",
            "hostnames": ["api2.example.org"],
            "not_after": None,
        },
    ]


@pytest.mark.parametrize("fmt", ["curl", "hpkp"])
def test_order_is_the_given_order(fmt: str) -> None:
    keys = [key("c", PIN_C), key("a", PIN_A), key("b", PIN_B)]
    parse = parse_curl if fmt == "curl" else parse_hpkp
    assert parse(render(keys, fmt)) == [PIN_C, PIN_A, PIN_B]


def test_unknown_format_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="okhttp, curl, android, trustkit, ios, hpkp, json"):
        render(KEYS, "pem")


@pytest.mark.parametrize("fmt", FORMATS)
def test_no_keys_is_refused(fmt: str) -> None:
    with pytest.raises(ValueError, match="no keys"):
        render([], fmt)


# ---- render: hostnames, expiry, warnings ----


@pytest.mark.parametrize("fmt", ["okhttp", "android", "trustkit", "ios"])
def test_placeholder_host_is_marked(fmt: str) -> None:
    known = render([key("k", PIN_A, ("api.example.org",))], fmt)
    unknown = render([key("k", PIN_A)], fmt)

    assert PLACEHOLDER_HOSTNAME in unknown
    assert "placeholder" in unknown
    assert PLACEHOLDER_HOSTNAME not in known
    assert "placeholder" not in known


def test_wildcard_names() -> None:
    keys = [key("k", PIN_A, ("example.org", "*.example.org", "*.api.example.org"))]

    # OkHttp matches "*.example.org" itself; the others pin the parent with its subdomains.
    assert {host for host, _ in parse_okhttp(render(keys, "okhttp"))} == {
        "*.api.example.org",
        "*.example.org",
        "example.org",
    }
    expected = {"api.example.org": True, "example.org": True}
    assert parse_android(render(keys, "android")).domains == expected
    assert parse_trustkit(render(keys, "trustkit")) == {host: (True, [PIN_A]) for host in expected}
    assert parse_ios(render(keys, "ios")) == {
        host: ios_domain([PIN_A], include_subdomains=True) for host in expected
    }
    assert "also pins the parent domain itself" in render(keys, "android")


def test_android_expiration_is_the_latest_expiry_in_utc() -> None:
    new_york_winter = timezone(timedelta(hours=-5))
    keys = [
        key("k1", PIN_A, not_after=datetime(2026, 3, 1, tzinfo=UTC)),
        key("k2", PIN_B, not_after=datetime(2026, 5, 1, 20, 0, tzinfo=new_york_winter)),
        key("k3", PIN_C),
    ]
    text = render(keys, "android")
    assert parse_android(text).expiration == "2026-05-02"
    assert "fails open" in text


def test_android_without_known_expiry_has_no_expiration() -> None:
    text = render([key("k", PIN_A)], "android")
    assert parse_android(text).expiration is None
    assert "No certificate expiry is known" in text


def test_json_not_after_is_utc_with_z() -> None:
    plus_two = timezone(timedelta(hours=2))
    keys = [key("k", PIN_A, not_after=datetime(2026, 5, 1, 1, 30, tzinfo=plus_two))]
    assert json.loads(render(keys, "json"))[0]["not_after"] == "2026-04-30T23:30:00Z"


def test_trustkit_warns_about_a_single_pin() -> None:
    # A duplicate is still one pin.
    single = render([key("k1", PIN_A), key("k1-again", PIN_A)], "trustkit")
    pair = render([key("k1", PIN_A), key("k2", PIN_B, role="standby")], "trustkit")

    assert "backup pin" in single
    assert parse_trustkit(single) == {PLACEHOLDER_HOSTNAME: (False, [PIN_A])}
    assert "backup pin" not in pair


# ---- render: hostile text ----

HOSTILE_HOSTNAMES = (
    'evil.example"</domain><pin digest="SHA-256">AAAA</pin><!--',
    '"); val pwned = ("',
    "${System.exit(1)}",
    '\\(exit(0))\\"',
    "a&b<c>]]>d",
    "--> <key>NSPinnedDomains</key> <!--",
    "bücher.example",
    "*.",  # no parent to widen to: kept as the literal name
)
HOSTILE_NAME = 'k1 --> <pin digest="SHA-256">AAAA</pin> <!-- "); exit(1) //'


@pytest.mark.parametrize("hostile", HOSTILE_HOSTNAMES)
def test_hostile_text_is_escaped(hostile: str) -> None:
    keys = [
        PinnedKey(HOSTILE_NAME, "current", PIN_A, "ECDSA P-256", (hostile,), None),
        key("k2", PIN_B, ("api.example.org",)),
    ]
    hosts = sorted([hostile, "api.example.org"])

    assert parse_okhttp(render(keys, "okhttp")) == [
        (host, pin) for host in hosts for pin in (PIN_A, PIN_B)
    ]
    assert parse_android(render(keys, "android")) == AndroidConfig(
        domains=dict.fromkeys(hosts, False), expiration=None, pins=[PIN_A, PIN_B]
    )
    assert parse_trustkit(render(keys, "trustkit")) == {
        host: (False, [PIN_A, PIN_B]) for host in hosts
    }
    assert parse_ios(render(keys, "ios")) == {host: ios_domain([PIN_A, PIN_B]) for host in hosts}
    assert json.loads(render(keys, "json"))[0]["hostnames"] == [hostile]
    assert json.loads(render(keys, "json"))[0]["name"] == HOSTILE_NAME


printable_text = st.text(
    st.characters(categories=("L", "M", "N", "P", "S"), include_characters=" "), min_size=1
).filter(str.isprintable)


@given(
    hostnames=st.lists(printable_text.filter(lambda h: not h.startswith("*.")), max_size=4),
    name=printable_text,
)
def test_any_printable_text_round_trips(hostnames: list[str], name: str) -> None:
    keys = [
        PinnedKey(name, "current", PIN_A, "ECDSA P-256", tuple(hostnames), None),
        key("k2", PIN_B),
    ]
    hosts = sorted(set(hostnames)) or [PLACEHOLDER_HOSTNAME]

    assert parse_okhttp(render(keys, "okhttp")) == [
        (host, pin) for host in hosts for pin in (PIN_A, PIN_B)
    ]
    assert parse_android(render(keys, "android")).domains == dict.fromkeys(hosts, False)
    assert parse_android(render(keys, "android")).pins == [PIN_A, PIN_B]
    assert parse_trustkit(render(keys, "trustkit")) == {
        host: (False, [PIN_A, PIN_B]) for host in hosts
    }
    assert parse_ios(render(keys, "ios")) == {host: ios_domain([PIN_A, PIN_B]) for host in hosts}
    assert json.loads(render(keys, "json"))[0]["name"] == name


# ---- end to end: the curl format with a real curl ----

RESPONSE_BODY = b"pinned ok"


class _Responder(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        while self.rfile.readline().strip():  # request line and headers
            pass
        self.wfile.write(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\n"
            + f"Content-Length: {len(RESPONSE_BODY)}\r\n\r\n".encode()
            + RESPONSE_BODY
        )


class _TLSServer(socketserver.TCPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        # A client that rejects our pin hangs up mid-request: the outcome under test.
        pass


@dataclass(frozen=True)
class Served:
    port: int
    ca_file: Path
    certificate: x509.Certificate


@pytest.fixture
def https_server(
    ca: trustme.CA, leaves: dict[trustme.KeyType, trustme.LeafCert], tmp_path: Path
) -> Iterator[Served]:
    """A stdlib TLS server on 127.0.0.1 presenting the ECDSA "localhost" certificate."""
    leaf = leaves[trustme.KeyType.ECDSA]
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with _TLSServer(("127.0.0.1", 0), _Responder) as server:
        server.socket = context.wrap_socket(server.socket, server_side=True)
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": SERVER_POLL_SECONDS}
        )
        thread.start()
        try:
            yield Served(server.server_address[1], ca_file, leaf_certificate(leaf))
        finally:
            server.shutdown()
            thread.join(SERVER_JOIN_TIMEOUT_SECONDS)
    assert not thread.is_alive()


def curl_pinned(served: Served, pinned: str) -> subprocess.CompletedProcess[bytes]:
    url = f"https://localhost:{served.port}/"
    return subprocess.run(
        [
            "curl",
            "--disable",  # ignore any ~/.curlrc
            "--silent",
            "--show-error",
            "--noproxy",
            "*",
            "--max-time",
            str(CURL_MAX_TIME_SECONDS),
            "--cacert",
            str(served.ca_file),
            "--resolve",
            f"localhost:{served.port}:127.0.0.1",
            "--pinnedpubkey",
            pinned,
            url,
        ],
        capture_output=True,
        timeout=CURL_MAX_TIME_SECONDS + SUBPROCESS_TIMEOUT_SECONDS,
    )


@pytest.mark.e2e
def test_curl_accepts_the_rendered_pins(
    https_server: Served, leaves: dict[trustme.KeyType, trustme.LeafCert]
) -> None:
    other = leaf_certificate(leaves[trustme.KeyType.RSA])
    keys = [
        key("old", spki_pin_of_certificate(other), role="retiring"),
        key("served", spki_pin_of_certificate(https_server.certificate), role="current"),
    ]
    result = curl_pinned(https_server, render(keys, "curl"))

    assert (result.returncode, result.stdout) == (0, RESPONSE_BODY), result.stderr


@pytest.mark.e2e
def test_curl_refuses_when_the_served_key_is_not_pinned(
    https_server: Served, leaves: dict[trustme.KeyType, trustme.LeafCert]
) -> None:
    other = leaf_certificate(leaves[trustme.KeyType.RSA])
    keys = [key("other", spki_pin_of_certificate(other)), key("fake", PIN_A, role="next")]
    result = curl_pinned(https_server, render(keys, "curl"))

    assert result.returncode == CURL_EXIT_PIN_MISMATCH, result.stderr
    assert result.stdout == b""
