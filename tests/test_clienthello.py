"""dualproxy.tls.clienthello: golden hellos from real clients, synthetic ones broken one way
at a time.

Golden hellos are captured at test time: a real client connects to a loopback listener that
reads until the parser returns a hello, then the client is killed. Each one is also fed byte by
byte, re-fragmented into small records, with trailing bytes, and fuzzed with Hypothesis.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final, cast

import pytest
from helpers import hellos
from helpers.clienthello_reference import reference_parse_client_hello
from helpers.hellos import (
    ECDSA_SECP256R1_SHA256,
    GREASE,
    RSA_PKCS1_SHA256,
    RSA_PSS_RSAE_SHA256,
    TLS1_2,
    TLS1_3,
    X25519,
    X25519MLKEM768,
    alpn,
    client_hello,
    extension,
    records,
    server_name,
    supported_groups,
    vector,
)
from helpers.profiles import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from dualproxy.tls.clienthello import (
    EXT_ALPN,
    EXT_SERVER_NAME,
    EXT_SIGNATURE_ALGORITHMS,
    EXT_SUPPORTED_GROUPS,
    EXT_SUPPORTED_VERSIONS,
    HANDSHAKE_HEADER_LEN,
    MAX_CLIENT_HELLO_BYTES,
    MAX_RECORD_PAYLOAD_LEN,
    RECORD_HEADER_LEN,
    ClientHello,
    ClientHelloError,
    is_plain_http,
    parse_client_hello,
)

# A client needs well under a second to start and send its hello; 10 s absorbs a loaded CI box.
CAPTURE_TIMEOUT: Final = 10.0
HOST: Final = "api.example.com"
OUR_ALPN: Final = (b"dualproxy-k2026b", b"http/1.1")
ECDHE_RSA_AES128_GCM_SHA256: Final = 0xC02F
# Hypothesis examples per property and per real client: enough to hit every field of a hello
# (a few hundred bytes) many times while the whole file stays within a few seconds.
EXAMPLES: Final = 60

# A real Python `ssl` client; argv: port, highest TLS version ("TLSv1_2" or "TLSv1_3").
PYTHON_CLIENT: Final = """
import socket, ssl, sys
context = ssl.create_default_context()
context.maximum_version = ssl.TLSVersion[sys.argv[2]]
context.set_alpn_protocols(["dualproxy-k2026b", "http/1.1"])
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10) as sock:
    context.wrap_socket(sock, server_hostname="api.example.com")
"""


@dataclass(frozen=True, slots=True)
class RealClient:
    """A command line ("{port}" is replaced) and what its hello must say."""

    argv: tuple[str, ...]
    alpn: tuple[bytes, ...]
    tls13: bool
    ecdsa: bool = True


S_CLIENT: Final = ("openssl", "s_client", "-connect", "127.0.0.1:{port}", "-servername", HOST)
CURL: Final = ("curl", "-sk", "--max-time", "5", "--resolve", f"{HOST}:{{port}}:127.0.0.1")
CLIENTS: Final = {
    "openssl-tls1_2": RealClient(
        (*S_CLIENT, "-alpn", "dualproxy-k2026b,http/1.1", "-tls1_2"), OUR_ALPN, tls13=False
    ),
    "openssl-tls1_3": RealClient(
        (*S_CLIENT, "-alpn", "dualproxy-k2026b,http/1.1", "-tls1_3"), OUR_ALPN, tls13=True
    ),
    "openssl-rsa-only": RealClient(
        (
            *S_CLIENT,
            *("-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256"),
            *("-sigalgs", "RSA-PSS+SHA256:RSA+SHA256"),
        ),
        alpn=(),
        tls13=False,
        ecdsa=False,
    ),
    "curl": RealClient((*CURL, f"https://{HOST}:{{port}}/"), (b"h2", b"http/1.1"), tls13=True),
    "curl-http1.1": RealClient(
        (*CURL, "--http1.1", f"https://{HOST}:{{port}}/"), (b"http/1.1",), tls13=True
    ),
    "python-ssl": RealClient(
        (sys.executable, "-c", PYTHON_CLIENT, "{port}", "TLSv1_3"), OUR_ALPN, tls13=True
    ),
    "python-ssl-tls1_2": RealClient(
        (sys.executable, "-c", PYTHON_CLIENT, "{port}", "TLSv1_2"), OUR_ALPN, tls13=False
    ),
}


@dataclass(frozen=True, slots=True)
class Captured:
    client: RealClient
    wire: bytes  # exactly the bytes the client sent before it waited for us
    hello: ClientHello


def capture_client_hello(argv: Sequence[str]) -> bytes:
    """Run a real client against a loopback listener; the bytes it sent up to its hello's end."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = str(listener.getsockname()[1])
        client = subprocess.Popen(
            [arg.replace("{port}", port) for arg in argv],
            stdin=subprocess.PIPE,  # s_client would otherwise read the test's stdin
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            return _read_client_hello(listener)
        finally:
            client.kill()
            client.communicate(timeout=CAPTURE_TIMEOUT)


def _read_client_hello(listener: socket.socket) -> bytes:
    """Read until the parser returns a hello: bounded in time by the deadline, and in bytes
    because the parser raises rather than return None past MAX_CLIENT_HELLO_BYTES."""
    deadline = time.monotonic() + CAPTURE_TIMEOUT
    listener.settimeout(CAPTURE_TIMEOUT)
    connection, _ = listener.accept()
    with connection:
        wire = b""
        while parse_client_hello(wire) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no complete ClientHello in {CAPTURE_TIMEOUT} s: {wire!r}")
            connection.settimeout(remaining)
            chunk = connection.recv(4096)
            if not chunk:
                raise AssertionError(f"client closed before its ClientHello ended: {wire!r}")
            wire += chunk
        return wire


@pytest.fixture(
    scope="module", params=[pytest.param(name, marks=pytest.mark.e2e, id=name) for name in CLIENTS]
)
def captured(request: pytest.FixtureRequest) -> Captured:
    client = CLIENTS[request.param]
    wire = capture_client_hello(client.argv)
    hello = parse_client_hello(wire)
    assert hello is not None
    return Captured(client, wire, hello)


def outcome(data: bytes) -> ClientHello | ClientHelloError | None:
    """The parse result, with ClientHelloError as a value; any other exception escapes."""
    try:
        result = parse_client_hello(data)
    except ClientHelloError as exc:
        return exc
    if result is None:
        assert len(data) < MAX_CLIENT_HELLO_BYTES, "None past the cap lets a peer grow our buffer"
    return result


# Golden hellos from real clients.


def test_real_client_hello_fields(captured: Captured) -> None:
    hello, client = captured.hello, captured.client
    assert hello.sni == HOST
    assert hello.alpn == client.alpn
    assert hello.offers_tls13 == client.tls13
    if not client.tls13:
        # OpenSSL sends no supported_versions at all when TLS 1.2 is its highest version.
        assert hello.supported_versions == ()
    assert hello.legacy_version == TLS1_2  # frozen at TLS 1.2 even by TLS 1.3 clients
    assert (ECDSA_SECP256R1_SHA256 in hello.signature_algorithms) == client.ecdsa
    assert RSA_PSS_RSAE_SHA256 in hello.signature_algorithms
    assert X25519 in hello.supported_groups
    assert hello.cipher_suites


def test_a_brief_hello_keeps_what_the_log_names_and_drops_the_lists(captured: Captured) -> None:
    """What an idle connection keeps once its certificate is chosen (serve.server)."""
    hello = captured.hello
    brief = hello.brief()
    assert (brief.sni, brief.alpn, brief.legacy_version) == (
        hello.sni,
        hello.alpn,
        hello.legacy_version,
    )
    lists = ("cipher_suites", "signature_algorithms", "supported_versions", "supported_groups")
    assert all(getattr(hello, name) for name in ("cipher_suites", "signature_algorithms"))
    assert [getattr(brief, name) for name in lists] == [(), (), (), ()]


@pytest.mark.e2e
def test_rsa_only_client_offers_no_ecdsa() -> None:
    """The twin of the ECDSA check above, with the exact list the command line asked for."""
    hello = parse_client_hello(capture_client_hello(CLIENTS["openssl-rsa-only"].argv))
    assert hello is not None
    assert hello.signature_algorithms == (RSA_PSS_RSAE_SHA256, RSA_PKCS1_SHA256)
    assert all(scheme & 0xFF != 0x03 for scheme in hello.signature_algorithms)  # 0x03: ECDSA
    assert ECDHE_RSA_AES128_GCM_SHA256 in hello.cipher_suites


def test_real_clients_send_the_hello_in_one_record(captured: Captured) -> None:
    """And nothing after it: so `wire` is exactly the hello, as the tests below assume."""
    assert captured.wire[0] == 22
    assert len(captured.wire) == RECORD_HEADER_LEN + int.from_bytes(captured.wire[3:5])


def test_real_hello_byte_by_byte(captured: Captured) -> None:
    for end in range(len(captured.wire)):
        assert parse_client_hello(captured.wire[:end]) is None
    assert parse_client_hello(captured.wire) == captured.hello


@pytest.mark.parametrize("fragment_size", [1, 7, 100])
def test_real_hello_in_small_records(captured: Captured, fragment_size: int) -> None:
    wire = records(hellos.handshake_bytes(captured.wire), fragment_size)
    assert len(wire) > len(captured.wire)
    assert parse_client_hello(wire) == captured.hello
    assert parse_client_hello(wire[:-1]) is None


@pytest.mark.parametrize(
    "trailing",
    [
        b"\x00",
        b"\x14\x03\x03\x00\x01\x01",  # change_cipher_spec, as TLS 1.3 compatibility mode sends
        b"\x17\x03\x03\x00\x05early",  # application data (0-RTT)
        bytes(MAX_CLIENT_HELLO_BYTES),  # the cap bounds where the hello ends, not the buffer
    ],
    ids=["byte", "ccs", "early-data", "past-cap"],
)
def test_real_hello_with_trailing_data(captured: Captured, trailing: bytes) -> None:
    assert parse_client_hello(captured.wire + trailing) == captured.hello


@settings(max_examples=examples(EXAMPLES))
@given(data=st.data())
def test_every_cut_of_a_refragmented_real_hello_needs_more(
    captured: Captured, data: st.DataObject
) -> None:
    size = data.draw(st.integers(1, 300), label="fragment size")
    wire = records(hellos.handshake_bytes(captured.wire), size)
    end = data.draw(st.integers(0, len(wire) - 1), label="cut")
    assert parse_client_hello(wire[:end]) is None
    assert parse_client_hello(wire) == captured.hello


@settings(max_examples=examples(EXAMPLES))
@given(trailing=st.binary(max_size=64))
def test_random_trailing_bytes_do_not_change_a_real_hello(
    captured: Captured, trailing: bytes
) -> None:
    assert parse_client_hello(captured.wire + trailing) == captured.hello


@settings(max_examples=examples(EXAMPLES))
@given(data=st.data())
def test_corrupted_real_hello_gives_only_documented_outcomes(
    captured: Captured, data: st.DataObject
) -> None:
    wire = bytearray(captured.wire)
    for _ in range(data.draw(st.integers(1, 3), label="corruptions")):
        wire[data.draw(st.integers(0, len(wire) - 1))] = data.draw(st.integers(0, 255))
    end = data.draw(st.integers(0, len(wire)), label="cut")
    assert isinstance(outcome(bytes(wire[:end])), ClientHello | ClientHelloError | None)


# Arbitrary bytes, raw or behind headers that get them past the first checks.
_TLS_PREFIXES: Final = [b"", b"\x16\x03\x01", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"]


@settings(max_examples=examples(300))
@given(prefix=st.sampled_from(_TLS_PREFIXES), tail=st.binary(max_size=600))
def test_arbitrary_bytes_give_only_documented_outcomes(prefix: bytes, tail: bytes) -> None:
    assert isinstance(outcome(prefix + tail), ClientHello | ClientHelloError | None)


@settings(max_examples=examples(300))
@given(body=st.binary(max_size=300), fragment_size=st.integers(1, 64))
def test_arbitrary_hello_bodies_give_only_documented_outcomes(
    body: bytes, fragment_size: int
) -> None:
    """Well-formed records and handshake header around random bytes: fuzzes the body parser."""
    wire = records(hellos.handshake(1, body), fragment_size)
    assert isinstance(outcome(wire), ClientHello | ClientHelloError)


# Synthetic hellos.


def test_post_quantum_sized_hello_whole_and_split() -> None:
    message = hellos.post_quantum_hello()
    assert len(message) > hellos.X25519MLKEM768_SHARE_LEN
    expected = ClientHello(
        legacy_version=TLS1_2,
        cipher_suites=(GREASE, hellos.TLS_AES_128_GCM_SHA256, hellos.ECDHE_ECDSA_AES128_GCM_SHA256),
        sni=HOST,
        alpn=(b"h2", b"http/1.1"),
        signature_algorithms=(ECDSA_SECP256R1_SHA256, RSA_PSS_RSAE_SHA256, RSA_PKCS1_SHA256),
        supported_versions=(GREASE, TLS1_3, TLS1_2),
        supported_groups=(GREASE, X25519MLKEM768, X25519, hellos.SECP256R1),
    )
    for fragment_size in (MAX_RECORD_PAYLOAD_LEN, 1000, 100, 7, 1):
        wire = records(message, fragment_size)
        assert parse_client_hello(wire) == expected
        assert parse_client_hello(wire[:-1]) is None


def test_hello_without_extensions() -> None:
    """Before TLS 1.3 the extensions block is optional: every extension field is empty."""
    hello = parse_client_hello(records(client_hello(None)))
    assert hello == ClientHello(
        legacy_version=TLS1_2,
        cipher_suites=(hellos.TLS_AES_128_GCM_SHA256, hellos.ECDHE_ECDSA_AES128_GCM_SHA256),
        sni=None,
        alpn=(),
        signature_algorithms=(),
        supported_versions=(),
        supported_groups=(),
    )
    assert not hello.offers_tls13


def test_bytes_after_the_hello_in_its_own_record_are_ignored() -> None:
    """The twin of the trailing-data tests above, with the extra bytes inside the last record."""
    message = client_hello(hellos.typical_extensions())
    expected = parse_client_hello(records(message))
    assert expected is not None
    assert parse_client_hello(records(message + bytes(10))) == expected
    assert parse_client_hello(records(message + bytes(10), 7)) == expected


@pytest.mark.parametrize(
    ("versions", "offers_tls13"),
    [((TLS1_3, TLS1_2), True), ((GREASE, TLS1_3), True), ((TLS1_2,), False), ((0x7F1C,), False)],
    ids=["tls1_3", "grease", "tls1_2-only", "tls1_3-draft-28"],
)
def test_offers_tls13(versions: tuple[int, ...], offers_tls13: bool) -> None:
    hello = parse_client_hello(records(client_hello([hellos.supported_versions(*versions)])))
    assert hello is not None
    assert hello.supported_versions == versions
    assert hello.offers_tls13 is offers_tls13


def test_sni_is_kept_as_sent() -> None:
    hello = parse_client_hello(records(client_hello([server_name(b"API.Example.com.")])))
    assert hello is not None
    assert hello.sni == "API.Example.com."


def test_server_name_of_another_type_is_skipped() -> None:
    other_type = vector(b"\x07" + vector(b"opaque", 2), 2)
    hello = parse_client_hello(records(client_hello([extension(0, other_type)])))
    assert hello is not None
    assert hello.sni is None


def test_empty_input_needs_more() -> None:
    assert parse_client_hello(b"") is None


# Each valid hello next to the same hello with one defect.

GOOD_BODY: Final = {
    "legacy_version": TLS1_2.to_bytes(2),
    "random": bytes(32),
    "session_id": vector(bytes(32), 1),
    "cipher_suites": vector(hellos.u16s([hellos.TLS_AES_128_GCM_SHA256]), 2),
    "compression_methods": b"\x01\x00",
    "extensions": vector(b"".join(hellos.typical_extensions()), 2),
}


def wire_from(**parts: bytes) -> bytes:
    """A one-record hello from GOOD_BODY with some parts replaced by raw bytes."""
    unknown = parts.keys() - GOOD_BODY.keys()
    assert not unknown, unknown
    return records(hellos.handshake(1, b"".join({**GOOD_BODY, **parts}.values())))


def with_extensions(*extensions: bytes) -> bytes:
    return wire_from(extensions=vector(b"".join(extensions), 2))


GOOD_MESSAGE: Final = client_hello(hellos.typical_extensions())
GOOD_WIRE: Final = records(GOOD_MESSAGE)
# The hello cut after 50 bytes, so that a record can be put in the middle of it (at byte 55).
FIRST: Final = records(GOOD_MESSAGE[:50])
REST: Final = records(GOOD_MESSAGE[50:])
CCS_RECORD: Final = b"\x14\x03\x03\x00\x01\x01"
# A 12 KB hello: within the cap in 1000-byte records, past it in 10-byte ones (+50% headers).
BIG_MESSAGE: Final = client_hello([hellos.padding(12_000)])


def over_cap_hello(wire_len: int) -> bytes:
    """A one-record hello, padded so that it ends at byte `wire_len` of the connection."""
    unpadded = len(client_hello([*hellos.typical_extensions(), hellos.padding(4)])) - 4
    padded = [*hellos.typical_extensions(), hellos.padding(wire_len - RECORD_HEADER_LEN - unpadded)]
    return records(client_hello(padded))


# name: (a valid hello, the same with one defect, what the error must say)
TWINS: Final[dict[str, tuple[bytes, bytes, str]]] = {
    # Record layer.
    "alert-record": (GOOD_WIRE, records(GOOD_MESSAGE, content_type=21), "content type 21"),
    "record-version": (GOOD_WIRE, records(GOOD_MESSAGE, record_version=0x0201), "major"),
    "ccs-mid-hello": (FIRST + REST, FIRST + CCS_RECORD + REST, "content type 20 at byte 55"),
    "empty-record": (FIRST + REST, FIRST + b"\x16\x03\x01\x00\x00" + REST, "empty"),
    "record-length": (
        b"\x16\x03\x01\x40\x00" + GOOD_MESSAGE,  # the rest of the record need not arrive
        b"\x16\x03\x01\x40\x01" + GOOD_MESSAGE,
        "exceeds 2\\^14",
    ),
    "over-cap": (
        over_cap_hello(MAX_CLIENT_HELLO_BYTES),
        over_cap_hello(MAX_CLIENT_HELLO_BYTES + 1),
        "MAX_CLIENT_HELLO_BYTES",
    ),
    "over-cap-fragmented": (
        records(BIG_MESSAGE, 1000),
        records(BIG_MESSAGE, 10),
        "MAX_CLIENT_HELLO_BYTES",
    ),
    # Handshake message.
    "server-hello": (GOOD_WIRE, records(hellos.handshake(2, GOOD_MESSAGE[4:])), "type 2"),
    "session-id-33": (wire_from(), wire_from(session_id=vector(bytes(33), 1)), "session_id"),
    "suites-odd": (wire_from(), wire_from(cipher_suites=b"\x00\x03\x13\x01\x13"), "u16"),
    "suites-empty": (wire_from(), wire_from(cipher_suites=b"\x00\x00"), "u16"),
    "suites-overlong": (
        wire_from(),
        wire_from(cipher_suites=b"\xff\xff\x13\x01"),
        "cipher_suites overruns",
    ),
    "no-compression": (
        wire_from(),
        wire_from(compression_methods=b"\x00"),
        "compression_methods is empty",
    ),
    "extensions-length-cut": (
        wire_from(extensions=b""),  # no extensions block at all is fine before TLS 1.3
        wire_from(extensions=b"\x00"),
        "extensions length overruns",
    ),
    "bytes-after-extensions": (
        wire_from(),
        wire_from(extensions=GOOD_BODY["extensions"] + b"\x00"),
        "ClientHello has 1 unexpected trailing byte",
    ),
    # Extensions.
    "extension-overlong": (
        with_extensions(alpn(b"h2"), hellos.padding(8)),
        with_extensions(alpn(b"h2"), b"\x00\x15\x00\x05" + bytes(4)),
        "extension 21 overruns",
    ),
    "duplicate-extension": (
        with_extensions(alpn(b"h2"), supported_groups(X25519)),
        with_extensions(alpn(b"h2"), alpn(b"h2")),
        "duplicate extension 16",
    ),
    "alpn-list-overlong": (
        with_extensions(alpn(b"h2")),
        with_extensions(extension(16, b"\x00\x04\x02h2")),
        "extension 16 overruns",
    ),
    "alpn-list-short": (
        with_extensions(alpn(b"h2")),
        with_extensions(extension(16, b"\x00\x03\x02h2\x00")),
        "extension 16 has 1 unexpected trailing byte",
    ),
    "alpn-empty-name": (
        with_extensions(alpn(b"h2")),
        with_extensions(alpn(b"h2", b"")),
        "empty ALPN protocol name",
    ),
    "alpn-empty-list": (
        with_extensions(alpn(b"h2")),
        with_extensions(extension(16, b"\x00\x00")),
        "ALPN protocol list is empty",
    ),
    "sni-non-ascii": (
        with_extensions(server_name(b"bucher.example")),
        with_extensions(server_name("bücher.example".encode())),
        "not printable ASCII",
    ),
    "sni-nul": (
        with_extensions(server_name(b"api.example.com")),
        with_extensions(server_name(b"api.example.com\x00.attacker.example")),
        "not printable ASCII",
    ),
    "sni-empty": (
        with_extensions(server_name(b"a")),
        with_extensions(server_name(b"")),
        "not printable ASCII",
    ),
    "sni-twice": (
        with_extensions(server_name(b"a")),
        with_extensions(extension(0, vector(b"\x00\x00\x01a\x00\x00\x01b", 2))),
        "two host_name entries",
    ),
    "sni-empty-list": (
        with_extensions(server_name(b"a")),
        with_extensions(extension(0, b"\x00\x00")),
        "server_name list is empty",
    ),
    "sigalgs-odd": (
        with_extensions(hellos.signature_algorithms(ECDSA_SECP256R1_SHA256)),
        with_extensions(extension(13, b"\x00\x03\x04\x03\x05")),
        "extension 13 length 3 is not a list of u16",
    ),
    "versions-empty": (
        with_extensions(hellos.supported_versions(TLS1_3)),
        with_extensions(extension(43, b"\x00")),
        "extension 43 length 0 is not a list of u16",
    ),
    "groups-overlong": (
        with_extensions(supported_groups(X25519)),
        with_extensions(extension(10, b"\x00\x02\x00")),
        "extension 10 overruns",
    ),
}


@pytest.mark.parametrize(("valid", "invalid", "error"), TWINS.values(), ids=TWINS.keys())
def test_one_defect_turns_a_hello_into_an_error(valid: bytes, invalid: bytes, error: str) -> None:
    assert isinstance(parse_client_hello(valid), ClientHello)
    with pytest.raises(ClientHelloError, match=error):
        parse_client_hello(invalid)


@pytest.mark.parametrize(
    ("needs_more", "never", "error"),
    [
        (b"\x16", b"\x15", "content type 21"),  # an alert
        (b"\x16\x03", b"\x16\x02", "major byte 2"),
        (b"\x16", b"\x80\x2e\x01\x03\x01", "SSLv2-style"),
        (b"\x16\x03\x01\x40\x00", b"\x16\x03\x01\x40\x01", "exceeds 2\\^14"),
        (b"\x16\x03\x01\x00\x10\x01", b"\x16\x03\x01\x00\x10\x02", "handshake message type 2"),
        # The hello's length alone proves it cannot end within the cap.
        (b"\x16\x03\x01\x40\x00\x01\x00\x3f\xf7", b"\x16\x03\x01\x40\x00\x01\x00\x3f\xf8", "MAX_"),
        (b"\x16", b"G", "content type 71"),  # plain HTTP: its first byte is enough
    ],
    ids=["alert", "version", "sslv2", "record-length", "handshake-type", "cap", "http"],
)
def test_errors_come_from_the_first_bytes(needs_more: bytes, never: bytes, error: str) -> None:
    """No byte after `never` could help, so the parser says so without waiting for more."""
    assert parse_client_hello(needs_more) is None
    with pytest.raises(ClientHelloError, match=error):
        parse_client_hello(never)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n", True),
        (b"POST /v1/items HTTP/1.1\r\n", True),
        (b"OPTIONS * HTTP/1.1\r\n", True),
        (b"BASELINE-CONTROL /x HTTP/1.1\r\n", True),  # the longest registered method
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", True),  # HTTP/2 prior knowledge, in plain text
        (b"GET ", True),  # four bytes suffice
        (b"GET", False),  # not yet: no space
        (b"get / HTTP/1.1\r\n", False),  # methods are case-sensitive
        (b"Get / HTTP/1.1\r\n", False),
        (b"g / HTTP/1.1\r\n", False),
        (b" GET / HTTP/1.1\r\n", False),
        (b"-GET / HTTP/1.1\r\n", False),
        (b"VERYLONGMETHODNAME / HTTP/1.1\r\n", False),  # 18 letters: no registered method
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", False),  # a TLS record
        (b"\x80\x2e\x01\x03\x01", False),  # an SSLv2 hello
        (b"", False),
    ],
)
def test_is_plain_http(data: bytes, expected: bool) -> None:
    assert is_plain_http(data) is expected


def test_fragmented_over_cap_hello_fails_before_the_cap_is_buffered() -> None:
    """1-byte records cost 6 wire bytes per hello byte: the record headers alone show it."""
    wire = records(BIG_MESSAGE, 1)
    with pytest.raises(ClientHelloError, match="MAX_CLIENT_HELLO_BYTES"):
        parse_client_hello(wire[: MAX_CLIENT_HELLO_BYTES - 1])


def test_is_plain_http_never_matches_a_real_hello(captured: Captured) -> None:
    assert not is_plain_http(captured.wire)


# Equivalence with the reference: the reader-object parser this module replaced, kept verbatim
# in tests/clienthello_reference.py. Same outcome on every input: the same ClientHello (field
# types included, hence the repr), None, or a ClientHelloError with the same message.

Comparable = tuple[str, object, str] | None


def comparable(parse: Callable[[bytes], ClientHello | None], data: bytes) -> Comparable:
    try:
        result = parse(data)
    except ClientHelloError as exc:
        return ("error", type(exc), str(exc))
    return None if result is None else ("hello", result, repr(result))


def assert_same_as_reference(data: bytes) -> None:
    expected = comparable(reference_parse_client_hello, data)
    assert comparable(parse_client_hello, data) == expected, data


def _byte_changes(byte: int) -> set[int]:
    """The values a single-byte change tries: one less and one more (a length one shorter or
    longer), and the extremes."""
    return {(byte - 1) % 256, (byte + 1) % 256, 0x00, 0xFF} - {byte}


def assert_every_small_change_same_as_reference(wire: bytes) -> None:
    """Every prefix of `wire`, and `wire` with any one byte changed to a nearby or extreme
    value: each length field made one shorter or longer, each type and version altered."""
    for end in range(len(wire) + 1):
        assert_same_as_reference(wire[:end])
    for pos, byte in enumerate(wire):
        for value in _byte_changes(byte):
            assert_same_as_reference(wire[:pos] + bytes([value]) + wire[pos + 1 :])


# The shapes the benchmark times, and a few more: one or several records, with and without
# extensions, a hello split inside its 4-byte handshake header.
SMALL_CHANGE_SHAPES: Final = {
    "typical": GOOD_WIRE,
    "post-quantum": records(hellos.post_quantum_hello()),
    "post-quantum-2-records": hellos.records_cut_at(hellos.post_quantum_hello(), [700]),
    "split-in-header": hellos.records_cut_at(GOOD_MESSAGE, [2, 60]),
    "no-extensions": records(client_hello(None)),
    "session-id-0": records(client_hello(hellos.typical_extensions(), session_id=b"")),
    "ccs-after": GOOD_WIRE + CCS_RECORD,
}


@pytest.mark.parametrize("wire", SMALL_CHANGE_SHAPES.values(), ids=SMALL_CHANGE_SHAPES.keys())
def test_every_small_change_of_a_synthetic_hello_same_as_reference(wire: bytes) -> None:
    assert_every_small_change_same_as_reference(wire)


def test_every_small_change_of_a_real_hello_same_as_reference(captured: Captured) -> None:
    assert_every_small_change_same_as_reference(captured.wire)


@pytest.mark.parametrize(
    ("valid", "invalid"), [twin[:2] for twin in TWINS.values()], ids=TWINS.keys()
)
def test_twins_same_as_reference(valid: bytes, invalid: bytes) -> None:
    """The hand-made cases above, the cap among them, give the reference's exact messages."""
    assert_same_as_reference(valid)
    assert_same_as_reference(invalid)


@pytest.mark.parametrize("wire", SMALL_CHANGE_SHAPES.values(), ids=SMALL_CHANGE_SHAPES.keys())
def test_other_buffer_types_same_as_reference(wire: bytes) -> None:
    """The annotation says bytes, but the reference read any buffer: so does the parser."""
    for end in (len(wire) - 1, len(wire)):
        for buffer in (bytearray(wire[:end]), memoryview(wire[:end])):
            expected = comparable(reference_parse_client_hello, cast(bytes, buffer))
            assert comparable(parse_client_hello, cast(bytes, buffer)) == expected


# Code points that draws pick from: the extension types the parser reads, and others.
_EXTENSION_TYPES: Final = [
    EXT_SERVER_NAME,
    EXT_SUPPORTED_GROUPS,
    EXT_SIGNATURE_ALGORITHMS,
    EXT_ALPN,
    EXT_SUPPORTED_VERSIONS,
    hellos.EXT_KEY_SHARE,
    hellos.EXT_PADDING,
    GREASE,
]
# The legacy_version of SSL 3.0-era TLS 1.0 clients, next to TLS 1.2's.
TLS1_0: Final = 0x0301
# Generated hellos stay small (a few hundred bytes) so that many fit in a test's time; lists
# of up to 6 code points, bodies of a dozen bytes and up to 8 extensions exercise every loop.
MAX_LIST_ITEMS: Final = 6
MAX_EXTENSIONS: Final = 8
# One past legacy_session_id's maximum of 32, so that the "longer than 32" error is drawn too.
MAX_DRAWN_SESSION_ID: Final = 34
# More examples than the per-client properties: the whole message structure is drawn here.
EQUIVALENCE_EXAMPLES: Final = 500
_u16: Final = st.integers(0, 0xFFFF)
_u16_lists: Final = st.lists(_u16, max_size=MAX_LIST_ITEMS)


def _server_name_entries(entries: list[tuple[int, bytes]]) -> bytes:
    """A server_name extension with any (name type, name) entries, host_name or not."""
    names = b"".join(name_type.to_bytes(1) + vector(name, 2) for name_type, name in entries)
    return extension(EXT_SERVER_NAME, vector(names, 2))


def _prefixed_extension(
    ext_type: int, length_size: int, items: bytes, skew: int, after: bytes
) -> bytes:
    """An extension holding `items` behind a `length_size`-byte length that is `skew` off (as
    far as it stays representable), then the bytes `after`."""
    length = min(max(len(items) + skew, 0), 2 ** (8 * length_size) - 1)
    return extension(ext_type, length.to_bytes(length_size) + items + after)


# An extension's type and length, 2 bytes each, before its body.
EXTENSION_HEADER_LEN: Final = 4
# Extensions whose body is one list behind a length of this many bytes (the rest are opaque
# here): versions<2..254> has a 1-byte length, the others a 2-byte one.
LIST_LENGTH_SIZES: Final = {
    EXT_SERVER_NAME: 2,
    EXT_SUPPORTED_GROUPS: 2,
    EXT_SIGNATURE_ALGORITHMS: 2,
    EXT_ALPN: 2,
    EXT_SUPPORTED_VERSIONS: 1,
}


def cut_at_every_level(extensions: list[bytes]) -> Iterator[bytes]:
    """Hellos with these extensions cut short at every byte of every level, each enclosing
    length consistent with the cut, so that each field in turn is the one that overruns: the
    body, the extensions block, each extension's body, and each list inside one."""
    body = client_hello(extensions)[HANDSHAKE_HEADER_LEN:]
    for end in range(len(body) + 1):
        yield records(hellos.handshake(1, body[:end]))
    block = b"".join(extensions)
    for end in range(len(block) + 1):
        yield records(client_hello([block[:end]]))
    for index, whole in enumerate(extensions):
        ext_type = int.from_bytes(whole[:2])
        ext_body = whole[EXTENSION_HEADER_LEN:]
        cuts = [extension(ext_type, ext_body[:end]) for end in range(len(ext_body) + 1)]
        if ext_type in LIST_LENGTH_SIZES:
            size = LIST_LENGTH_SIZES[ext_type]
            items = ext_body[size:]
            cuts += [extension(ext_type, vector(items[:end], size)) for end in range(len(items))]
        for cut in cuts:
            yield records(client_hello([*extensions[:index], cut, *extensions[index + 1 :]]))


CUT_EXTENSIONS: Final = {
    "typical": hellos.typical_extensions(),
    "grease-first": [extension(GREASE, b""), *hellos.typical_extensions()],
    # Other name types before and after the host_name; whole, it has two host_names: an error.
    "sni-entries": [
        _server_name_entries([(1, b"other"), (0, b"a"), (2, b"x"), (0, b"b")]),
        alpn(b"h2"),
    ],
    "duplicate": [alpn(b"h2"), supported_groups(X25519), alpn(b"h2")],
}


@pytest.mark.parametrize("extensions", CUT_EXTENSIONS.values(), ids=CUT_EXTENSIONS.keys())
def test_hellos_cut_at_every_level_same_as_reference(extensions: list[bytes]) -> None:
    for wire in cut_at_every_level(extensions):
        assert_same_as_reference(wire)


# Host names: valid, empty, with a space or non-ASCII, and ones that repeat.
_names: Final = st.sampled_from([b"api.example.com", b"", b"a b", b"\xc3\xbc", b"x", b"\x00"])
# Extensions well formed or not, often of the types the parser reads, with odd contents:
# non-ASCII or empty names, empty lists, GREASE, unknown types with arbitrary bodies.
_extensions: Final = st.one_of(
    st.builds(server_name, _names),
    st.builds(
        _server_name_entries,
        st.lists(
            st.tuples(st.sampled_from([0, 1, 255]), _names | st.binary(max_size=8)), max_size=3
        ),
    ),
    st.lists(st.binary(max_size=4), max_size=3).map(lambda names: alpn(*names)),
    _u16_lists.map(lambda values: hellos.signature_algorithms(*values)),
    _u16_lists.map(lambda values: hellos.supported_versions(*values)),
    _u16_lists.map(lambda values: supported_groups(*values)),
    st.lists(st.tuples(_u16, st.integers(0, 40)), max_size=3).map(
        lambda shares: hellos.key_share(*shares)
    ),
    st.integers(4, 40).map(hellos.padding),
    st.builds(extension, st.sampled_from(_EXTENSION_TYPES) | _u16, st.binary(max_size=12)),
    # A list behind a 1- or 2-byte length that is off by up to 2, or with bytes after it.
    st.builds(
        _prefixed_extension,
        st.sampled_from(_EXTENSION_TYPES),
        st.sampled_from([1, 2]),
        st.binary(max_size=9),
        st.integers(-2, 2),
        st.binary(max_size=2),
    ),
)


@st.composite
def generated_messages(draw: st.DrawFn) -> bytes:
    """A ClientHello handshake message from the builders: fields valid or not, extensions
    absent, few or many, of distinct types or (less often) not."""
    distinct = st.lists(_extensions, max_size=MAX_EXTENSIONS, unique_by=lambda ext: ext[:2])
    any_types = st.lists(_extensions, max_size=MAX_EXTENSIONS // 2)  # duplicates likely
    extensions = draw(st.none() | distinct | distinct | any_types, label="extensions")
    return client_hello(
        extensions,
        legacy_version=draw(st.sampled_from([TLS1_2, TLS1_0]) | _u16, label="legacy_version"),
        cipher_suites=draw(
            st.lists(_u16, min_size=1, max_size=MAX_LIST_ITEMS), label="cipher_suites"
        ),
        session_id=draw(st.binary(max_size=MAX_DRAWN_SESSION_ID), label="session_id"),
    )


@st.composite
def mutated_wires(draw: st.DrawFn, message: bytes) -> bytes:
    """`message` cut into records at random offsets, then changed up to 3 times: byte flips,
    small changes to any byte (every length field is one), inserted or deleted bytes,
    other records, trailing bytes, truncation."""
    cuts = draw(st.lists(st.integers(0, max(len(message), 1)), max_size=4), label="cuts")
    wire = bytearray(hellos.records_cut_at(message, cuts))
    for _ in range(draw(st.integers(0, 3), label="changes")):
        pos = draw(st.integers(0, len(wire)), label="position")
        change = draw(st.sampled_from(["flip", "nudge", "insert", "delete", "record", "cut"]))
        if change == "flip" and pos < len(wire):
            wire[pos] = draw(st.integers(0, 255))
        elif change == "nudge" and pos < len(wire):
            wire[pos] = (wire[pos] + draw(st.integers(-3, 3))) % 256
        elif change == "insert":
            wire[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif change == "delete":
            del wire[pos : pos + draw(st.integers(1, 4))]
        elif change == "record":
            wire[pos:pos] = draw(st.sampled_from([CCS_RECORD, b"\x16\x03\x01\x00\x00"]))
        elif change == "cut":
            del wire[pos:]
    return bytes(wire) + draw(st.binary(max_size=8), label="trailing")


@settings(max_examples=examples(EQUIVALENCE_EXAMPLES))
@given(data=st.data())
def test_generated_hellos_same_as_reference(data: st.DataObject) -> None:
    message = data.draw(generated_messages(), label="message")
    assert_same_as_reference(data.draw(mutated_wires(message), label="wire"))


@settings(max_examples=examples(EXAMPLES))
@given(data=st.data())
def test_mutated_real_hellos_same_as_reference(captured: Captured, data: st.DataObject) -> None:
    message = hellos.handshake_bytes(captured.wire)
    assert_same_as_reference(data.draw(mutated_wires(message), label="wire"))
