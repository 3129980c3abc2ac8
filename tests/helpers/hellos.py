"""Build TLS ClientHellos byte by byte, and cut them into records, for tests.

Builders return handshake messages (header included); `records()` puts one on the wire. Every
length is computed, so a test that needs a malformed hello builds a good one from parts and
breaks exactly one thing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

from dualproxy.tls.clienthello import (
    CONTENT_TYPE_HANDSHAKE,
    EXT_ALPN,
    EXT_SERVER_NAME,
    EXT_SIGNATURE_ALGORITHMS,
    EXT_SUPPORTED_GROUPS,
    EXT_SUPPORTED_VERSIONS,
    HANDSHAKE_CLIENT_HELLO,
    MAX_RECORD_PAYLOAD_LEN,
    RECORD_HEADER_LEN,
    SERVER_NAME_TYPE_HOST_NAME,
)

# Extension types only the builders use.
EXT_PADDING: Final = 21  # RFC 7685
EXT_KEY_SHARE: Final = 51  # RFC 8446 §4.2.8

# Code points the tests name (IANA TLS registries).
TLS1_2: Final = 0x0303
TLS1_3: Final = 0x0304
TLS_AES_128_GCM_SHA256: Final = 0x1301
ECDHE_ECDSA_AES128_GCM_SHA256: Final = 0xC02B
ECDSA_SECP256R1_SHA256: Final = 0x0403
RSA_PSS_RSAE_SHA256: Final = 0x0804
RSA_PKCS1_SHA256: Final = 0x0401
X25519: Final = 0x001D
SECP256R1: Final = 0x0017
X25519MLKEM768: Final = 0x11EC  # draft-ietf-tls-ecdhe-mlkem
# RFC 8701 GREASE values: clients mix such reserved values in to keep servers tolerant.
GREASE: Final = 0x0A0A
GREASE_2: Final = 0x1A1A

# X25519MLKEM768 client share: an ML-KEM-768 encapsulation key (1184) then an X25519 key (32).
X25519MLKEM768_SHARE_LEN: Final = 1184 + 32
# The record version OpenSSL, curl and browsers put on the first ClientHello record.
INITIAL_RECORD_VERSION: Final = 0x0301


def vector(data: bytes, length_size: int) -> bytes:
    """`data` behind a big-endian length prefix of `length_size` bytes."""
    return len(data).to_bytes(length_size) + data


def u16s(values: Iterable[int]) -> bytes:
    return b"".join(value.to_bytes(2) for value in values)


def extension(ext_type: int, data: bytes) -> bytes:
    return ext_type.to_bytes(2) + vector(data, 2)


def server_name(host_name: bytes) -> bytes:
    return extension(
        EXT_SERVER_NAME, vector(SERVER_NAME_TYPE_HOST_NAME.to_bytes(1) + vector(host_name, 2), 2)
    )


def alpn(*protocols: bytes) -> bytes:
    return extension(EXT_ALPN, vector(b"".join(vector(p, 1) for p in protocols), 2))


def signature_algorithms(*schemes: int) -> bytes:
    return extension(EXT_SIGNATURE_ALGORITHMS, vector(u16s(schemes), 2))


def supported_versions(*versions: int) -> bytes:
    return extension(EXT_SUPPORTED_VERSIONS, vector(u16s(versions), 1))


def supported_groups(*groups: int) -> bytes:
    return extension(EXT_SUPPORTED_GROUPS, vector(u16s(groups), 2))


def key_share(*shares: tuple[int, int]) -> bytes:
    """A key_share extension with (group, share length) entries; the shares are filler bytes."""
    entries = b"".join(group.to_bytes(2) + vector(b"\x42" * size, 2) for group, size in shares)
    return extension(EXT_KEY_SHARE, vector(entries, 2))


def padding(size: int) -> bytes:
    """A padding extension of `size` bytes in all (4 of them header)."""
    return extension(EXT_PADDING, bytes(size - 4))


def client_hello(
    extensions: Sequence[bytes] | None,
    *,
    legacy_version: int = TLS1_2,
    cipher_suites: Sequence[int] = (TLS_AES_128_GCM_SHA256, ECDHE_ECDSA_AES128_GCM_SHA256),
    session_id: bytes = bytes(32),
) -> bytes:
    """A ClientHello handshake message; `extensions=None` omits the block (pre-TLS-1.3 style)."""
    body = (
        legacy_version.to_bytes(2)
        + bytes(range(32))  # random
        + vector(session_id, 1)
        + vector(u16s(cipher_suites), 2)
        + vector(b"\x00", 1)  # compression_methods: null only
    )
    if extensions is not None:
        body += vector(b"".join(extensions), 2)
    return handshake(HANDSHAKE_CLIENT_HELLO, body)


def handshake(msg_type: int, body: bytes) -> bytes:
    return msg_type.to_bytes(1) + vector(body, 3)


def typical_extensions(host_name: bytes = b"api.example.com") -> list[bytes]:
    """What a TLS 1.3 client with SNI and ALPN sends, in OpenSSL's order."""
    return [
        server_name(host_name),
        supported_groups(X25519, SECP256R1),
        alpn(b"h2", b"http/1.1"),
        signature_algorithms(ECDSA_SECP256R1_SHA256, RSA_PSS_RSAE_SHA256, RSA_PKCS1_SHA256),
        supported_versions(TLS1_3, TLS1_2),
        key_share((X25519, 32)),
    ]


def post_quantum_hello() -> bytes:
    """A Chrome-like hello: GREASE, and an X25519MLKEM768 share next to an X25519 one."""
    return client_hello(
        [
            extension(GREASE, b""),
            server_name(b"api.example.com"),
            supported_groups(GREASE, X25519MLKEM768, X25519, SECP256R1),
            alpn(b"h2", b"http/1.1"),
            signature_algorithms(ECDSA_SECP256R1_SHA256, RSA_PSS_RSAE_SHA256, RSA_PKCS1_SHA256),
            supported_versions(GREASE, TLS1_3, TLS1_2),
            key_share((GREASE, 1), (X25519MLKEM768, X25519MLKEM768_SHARE_LEN), (X25519, 32)),
            extension(GREASE_2, b"\x00"),  # Chrome puts one GREASE extension first, one last
        ],
        cipher_suites=(GREASE, TLS_AES_128_GCM_SHA256, ECDHE_ECDSA_AES128_GCM_SHA256),
    )


def records(
    message: bytes,
    fragment_size: int = MAX_RECORD_PAYLOAD_LEN,
    *,
    content_type: int = CONTENT_TYPE_HANDSHAKE,
    record_version: int = INITIAL_RECORD_VERSION,
) -> bytes:
    """`message` cut into records of `fragment_size` payload bytes (the last may be shorter)."""
    return b"".join(
        content_type.to_bytes(1)
        + record_version.to_bytes(2)
        + vector(message[i : i + fragment_size], 2)
        for i in range(0, len(message), fragment_size)
    )


def records_cut_at(
    message: bytes, cuts: Iterable[int], *, record_version: int = INITIAL_RECORD_VERSION
) -> bytes:
    """`message` in handshake records of uneven sizes: one ends at each offset in `cuts` that
    falls strictly inside `message`, and the last at its end."""
    ends = sorted({cut for cut in cuts if 0 < cut < len(message)} | {len(message)})
    starts = [0, *ends[:-1]]
    return b"".join(
        CONTENT_TYPE_HANDSHAKE.to_bytes(1) + record_version.to_bytes(2) + vector(message[a:b], 2)
        for a, b in zip(starts, ends, strict=True)
    )


def handshake_bytes(wire: bytes) -> bytes:
    """The concatenated payloads of the complete handshake records in `wire`.

    Deliberately simpler than the parser: it trusts the lengths, so tests can re-fragment a
    captured hello without relying on the code under test.
    """
    payloads = []
    pos = 0
    while pos + RECORD_HEADER_LEN <= len(wire):
        length = int.from_bytes(wire[pos + 3 : pos + RECORD_HEADER_LEN])
        assert wire[pos] == CONTENT_TYPE_HANDSHAKE
        payloads.append(wire[pos + RECORD_HEADER_LEN : pos + RECORD_HEADER_LEN + length])
        pos += RECORD_HEADER_LEN + length
    return b"".join(payloads)
