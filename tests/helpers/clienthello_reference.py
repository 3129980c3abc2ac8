"""REFERENCE ORACLE, tests only: `parse_client_hello` as it was before the fast parser.

This is the reader-object implementation of dualproxy/tls/clienthello.py at commit 662ec12, kept
verbatim (only its imports and the name of its entry point differ) so that tests can check
that the current parser gives the same outcome (the result, or the error's type and message)
on every input they generate. Do not import it outside tests, and do not "fix" it: a change of
behaviour belongs in dualproxy/tls/clienthello.py and its tests, made deliberately.
"""

from __future__ import annotations

import struct
from typing import Final

from dualproxy.tls.clienthello import (
    CONTENT_TYPE_HANDSHAKE,
    EXT_ALPN,
    EXT_SERVER_NAME,
    EXT_SIGNATURE_ALGORITHMS,
    EXT_SUPPORTED_GROUPS,
    EXT_SUPPORTED_VERSIONS,
    HANDSHAKE_CLIENT_HELLO,
    HANDSHAKE_HEADER_LEN,
    MAX_CLIENT_HELLO_BYTES,
    MAX_RECORD_PAYLOAD_LEN,
    MAX_SESSION_ID_LEN,
    RANDOM_LEN,
    RECORD_HEADER_LEN,
    RECORD_VERSION_MAJOR,
    SERVER_NAME_TYPE_HOST_NAME,
    ClientHello,
    ClientHelloError,
)

# The size of a cipher suite, named group, signature scheme or protocol version.
_U16_LEN: Final = 2


def reference_parse_client_hello(data: bytes) -> ClientHello | None:
    """The old `parse_client_hello`, same contract (see dualproxy/tls/clienthello.py)."""
    message = _reassemble(data)
    if message is None:
        return None
    return _parse_body(_Reader(message, "ClientHello", start=HANDSHAKE_HEADER_LEN))


def _reassemble(data: bytes) -> bytes | None:
    """The whole handshake message (header included), None if incomplete, or raise."""
    view = memoryview(data)
    head = bytearray()  # the handshake header, collected across records
    fragments: list[memoryview] = []  # handshake bytes, one slice per record, never copied
    received = 0  # handshake bytes in `fragments`
    message_len: int | None = None  # header + body, once the header is known
    pos = 0  # start of the current record
    while True:
        _check_cap(pos, received, message_len)
        _check_record_header(view[pos : pos + RECORD_HEADER_LEN], pos)
        if len(data) < pos + RECORD_HEADER_LEN:
            return None
        length = int.from_bytes(view[pos + 3 : pos + RECORD_HEADER_LEN])  # the last 2 bytes
        if length == 0:
            raise ClientHelloError(f"empty handshake record at byte {pos}")
        if length > MAX_RECORD_PAYLOAD_LEN:
            raise ClientHelloError(f"record length {length} at byte {pos} exceeds 2^14")
        fragment = view[pos + RECORD_HEADER_LEN : pos + RECORD_HEADER_LEN + length]
        if message_len is None:
            head += fragment[: HANDSHAKE_HEADER_LEN - len(head)]
            message_len = _check_handshake_header(head)
            _check_cap(pos, received, message_len)
        fragments.append(fragment)
        received += len(fragment)
        if message_len is not None and received >= message_len:
            fragments[-1] = fragment[: len(fragment) - (received - message_len)]
            return b"".join(fragments)
        if len(fragment) < length:
            return None
        pos += RECORD_HEADER_LEN + length


def _check_cap(pos: int, received: int, message_len: int | None) -> None:
    """Raise if the hello cannot end within MAX_CLIENT_HELLO_BYTES of the connection's start.

    The missing handshake bytes come after the record header at `pos` at the earliest.
    """
    missing = (HANDSHAKE_HEADER_LEN if message_len is None else message_len) - received
    if pos + RECORD_HEADER_LEN + missing > MAX_CLIENT_HELLO_BYTES:
        raise ClientHelloError(
            f"ClientHello needs more than MAX_CLIENT_HELLO_BYTES ({MAX_CLIENT_HELLO_BYTES})"
        )


def _check_record_header(header: memoryview, pos: int) -> None:
    """Validate the bytes of a record header seen so far, so that garbage fails early."""
    if len(header) >= 1 and header[0] != CONTENT_TYPE_HANDSHAKE:
        if pos == 0 and header[0] & 0x80:
            # An SSL 2.0 record header (2-byte form, high bit set): the SSLv2-compatible hello
            # of very old clients. It cannot carry extensions, so there is nothing to read.
            raise ClientHelloError("SSLv2-style ClientHello")
        raise ClientHelloError(f"record content type {header[0]} at byte {pos}, expected 22")
    if len(header) >= 2 and header[1] != RECORD_VERSION_MAJOR:
        raise ClientHelloError(f"record version major byte {header[1]} at byte {pos}")


def _check_handshake_header(head: bytearray) -> int | None:
    """The handshake message length (header included), None until all 4 bytes are known."""
    if head and head[0] != HANDSHAKE_CLIENT_HELLO:
        raise ClientHelloError(f"handshake message type {head[0]}, expected client_hello (1)")
    if len(head) < HANDSHAKE_HEADER_LEN:
        return None
    return HANDSHAKE_HEADER_LEN + int.from_bytes(head[1:4])


def _parse_body(body: _Reader) -> ClientHello:
    """ClientHello body, RFC 8446 §4.1.2 (extensions optional before TLS 1.3, RFC 5246 §7.4.1.2)."""
    legacy_version = body.uint(2, "legacy_version")
    body.skip(RANDOM_LEN, "random")
    if body.vector(1, "legacy_session_id").remaining > MAX_SESSION_ID_LEN:
        raise ClientHelloError("legacy_session_id longer than 32 bytes")
    cipher_suites = body.vector(2, "cipher_suites").uint16s()
    if body.vector(1, "legacy_compression_methods").remaining == 0:
        raise ClientHelloError("legacy_compression_methods is empty")
    extensions = _split_extensions(body.vector(2, "extensions")) if body.remaining else {}
    body.expect_end()

    server_name = extensions.get(EXT_SERVER_NAME)
    alpn = extensions.get(EXT_ALPN)
    return ClientHello(
        legacy_version=legacy_version,
        cipher_suites=cipher_suites,
        sni=None if server_name is None else _parse_server_name(server_name),
        alpn=() if alpn is None else _parse_alpn(alpn),
        signature_algorithms=_u16_list(extensions, EXT_SIGNATURE_ALGORITHMS, length_size=2),
        # versions<2..254>: the only one of these lists with a one-byte length.
        supported_versions=_u16_list(extensions, EXT_SUPPORTED_VERSIONS, length_size=1),
        supported_groups=_u16_list(extensions, EXT_SUPPORTED_GROUPS, length_size=2),
    )


def _split_extensions(block: _Reader) -> dict[int, _Reader]:
    """Extension bodies by type; RFC 8446 §4.2 forbids two of one type."""
    extensions: dict[int, _Reader] = {}
    while block.remaining:
        ext_type = block.uint(2, "extension type")
        if ext_type in extensions:
            raise ClientHelloError(f"duplicate extension {ext_type}")
        extensions[ext_type] = block.vector(2, f"extension {ext_type}")
    return extensions


def _u16_list(
    extensions: dict[int, _Reader], ext_type: int, *, length_size: int
) -> tuple[int, ...]:
    """An extension that is one nonempty list of 2-byte code points; () when it is absent."""
    extension = extensions.get(ext_type)
    return () if extension is None else extension.whole_vector(length_size).uint16s()


def _parse_server_name(extension: _Reader) -> str | None:
    """The host_name of a server_name extension (RFC 6066 §3); other name types are skipped."""
    names = extension.whole_vector(2)
    if not names.remaining:
        raise ClientHelloError("server_name list is empty")
    host_name: str | None = None
    while names.remaining:
        name_type = names.uint(1, "server_name type")
        name = names.vector(2, "server_name").rest()
        if name_type != SERVER_NAME_TYPE_HOST_NAME:
            continue
        if host_name is not None:
            raise ClientHelloError("two host_name entries in server_name")  # RFC 6066 §3
        # Printable ASCII only: what a DNS name can hold, and safe to log verbatim.
        if not name or not all(0x21 <= byte <= 0x7E for byte in name):
            raise ClientHelloError(f"host_name {name!r} is not printable ASCII")
        host_name = name.decode("ascii")
    return host_name


def _parse_alpn(extension: _Reader) -> tuple[bytes, ...]:
    """ProtocolName protocol_name_list<2..2^16-1>, each name opaque<1..2^8-1> (RFC 7301 §3.1)."""
    names = extension.whole_vector(2)
    protocols: list[bytes] = []
    while names.remaining:
        protocol = names.vector(1, "ALPN protocol name").rest()
        if not protocol:
            raise ClientHelloError("empty ALPN protocol name")
        protocols.append(protocol)
    if not protocols:
        raise ClientHelloError("ALPN protocol list is empty")
    return tuple(protocols)


class _Reader:
    """A cursor over bytes[start:end]; every read checks that it stays within end."""

    __slots__ = ("_data", "_end", "_pos", "_what")

    def __init__(self, data: bytes, what: str, start: int = 0, end: int | None = None) -> None:
        self._data = data
        self._what = what
        self._pos = start
        self._end = len(data) if end is None else end

    @property
    def remaining(self) -> int:
        return self._end - self._pos

    def skip(self, count: int, what: str) -> None:
        if count > self._end - self._pos:
            raise ClientHelloError(f"{what} overruns {self._what}")
        self._pos += count

    # uint and vector run ~100 times per hello, on every connection: they check bounds inline
    # rather than through skip() and `remaining`.

    def uint(self, size: int, what: str) -> int:
        start = self._pos
        end = start + size
        if end > self._end:
            raise ClientHelloError(f"{what} overruns {self._what}")
        self._pos = end
        return int.from_bytes(self._data[start:end])

    def vector(self, length_size: int, what: str) -> _Reader:
        """A vector with a `length_size`-byte length prefix; the cursor moves past it."""
        start = self._pos + length_size
        if start > self._end:
            raise ClientHelloError(f"{what} length overruns {self._what}")
        end = start + int.from_bytes(self._data[self._pos : start])
        if end > self._end:
            raise ClientHelloError(f"{what} overruns {self._what}")
        self._pos = end
        return _Reader(self._data, what, start, end)

    def whole_vector(self, length_size: int) -> _Reader:
        """The one vector that must fill all of what is left, e.g. an extension's body."""
        vector = self.vector(length_size, self._what)
        self.expect_end()
        return vector

    def rest(self) -> bytes:
        start, self._pos = self._pos, self._end
        return self._data[start : self._end]

    def uint16s(self) -> tuple[int, ...]:
        """The rest as a nonempty list of 2-byte values (suites, groups, schemes, versions)."""
        if self.remaining % _U16_LEN or not self.remaining:
            raise ClientHelloError(f"{self._what} length {self.remaining} is not a list of u16")
        count = self.remaining // _U16_LEN
        values = struct.unpack_from(f">{count}H", self._data, self._pos)  # big-endian u16s
        self._pos = self._end
        return values

    def expect_end(self) -> None:
        if self.remaining:
            raise ClientHelloError(f"{self._what} has {self.remaining} unexpected trailing byte(s)")
