"""Read the TLS ClientHello at the start of a connection, without doing any I/O.

The server peeks at the hello to choose which certificate to present, then replays the same
bytes into OpenSSL. The peek is advisory: when it fails, the server uses its default identity
and OpenSSL decides, so this parser may be strict without ever breaking a client that OpenSSL
would accept with that default.

Contract (the same shape as h11's readers): ``parse_client_hello(data)`` takes every byte
received so far on the connection, from its first byte, and either

1. returns a ``ClientHello`` once the whole hello has arrived (bytes after it are ignored),
2. returns ``None`` when the bytes so far are a valid beginning and more are needed, or
3. raises ``ClientHelloError`` when no continuation can make these bytes a hello we can read.

It keeps no state between calls; the caller keeps the buffer and calls again when it grows.
``None`` is only ever returned while ``len(data) < MAX_CLIENT_HELLO_BYTES``, so a caller that
loops until it gets a value or an error buffers at most that many bytes.

Theory of the record layer (RFC 8446 §5.1, RFC 5246 §6.2.1): the ClientHello is one handshake
message (a 4-byte header: type, then a 3-byte body length) carried in one or more records of
content type 22. Each record has a 5-byte header (content type, a version whose major byte is 3,
a 2-byte payload length) and a payload of 1 to 2^14 bytes; a record may end anywhere inside the
message, even inside its 4-byte header. Nothing but handshake records may come before the hello
is complete. The handshake header's length tells when it is complete, and the record headers
alone tell whether enough bytes have arrived, so an incomplete hello costs one step per record
header (one, for every real client) and no copy. The body is parsed only once all of it is
here: in place when it came in one record (as from every real client: a hello is far smaller
than a record), else from one copy that joins the fragments.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Final

__all__ = [
    "MAX_CLIENT_HELLO_BYTES",
    "ClientHello",
    "ClientHelloError",
    "is_plain_http",
    "parse_client_hello",
]

# Real hellos are 200 bytes to 2 KiB; a post-quantum key share (X25519MLKEM768, 1216 bytes)
# is most of the 2 KiB. 16 KiB leaves 8x headroom, equals the largest record payload (2^14),
# and bounds what an unauthenticated connection can make us buffer. A larger hello is not
# lost: the peek gives up and OpenSSL still sees every byte.
MAX_CLIENT_HELLO_BYTES: Final = 16 * 1024

# Record layer, RFC 8446 §5.1.
RECORD_HEADER_LEN: Final = 5
MAX_RECORD_PAYLOAD_LEN: Final = 2**14  # TLSPlaintext.length "MUST NOT exceed 2^14 bytes"
CONTENT_TYPE_HANDSHAKE: Final = 22
RECORD_VERSION_MAJOR: Final = 3  # SSL 3.0 to TLS 1.3 all put 0x03 here

# Handshake layer, RFC 8446 §4.
HANDSHAKE_HEADER_LEN: Final = 4
HANDSHAKE_CLIENT_HELLO: Final = 1
RANDOM_LEN: Final = 32
MAX_SESSION_ID_LEN: Final = 32  # legacy_session_id<0..32>

# Extension types this module reads.
EXT_SERVER_NAME: Final = 0  # RFC 6066 §3
EXT_SUPPORTED_GROUPS: Final = 10  # RFC 8422 §5.1.1 (RFC 8446 §4.2.7)
EXT_SIGNATURE_ALGORITHMS: Final = 13  # RFC 8446 §4.2.3
EXT_ALPN: Final = 16  # application_layer_protocol_negotiation, RFC 7301 §3.1
EXT_SUPPORTED_VERSIONS: Final = 43  # RFC 8446 §4.2.1

SERVER_NAME_TYPE_HOST_NAME: Final = 0  # RFC 6066 §3, NameType.host_name
TLS1_3: Final = 0x0304  # RFC 8446 §4.2.1

# The size of a cipher suite, named group, signature scheme or protocol version.
_U16_LEN: Final = 2
# Where the body starts when the first record holds the whole handshake header.
_FIRST_BODY_START: Final = RECORD_HEADER_LEN + HANDSHAKE_HEADER_LEN
# An extension's header: its type, then its body's length (2 bytes each, big-endian).
_EXTENSION_HEADER: Final = struct.Struct(">HH")
_EXTENSION_HEADER_LEN: Final = _EXTENSION_HEADER.size
# The bytes a host_name may hold: printable ASCII (what a DNS name can hold, and safe to log
# verbatim). A space is not one of them.
_HOST_NAME_BYTES: Final = bytes(range(0x21, 0x7F))

# The start of a request line: method SP (RFC 9112 §3). Methods are case-sensitive tokens, and
# every registered one is uppercase letters and "-" (IANA HTTP Method Registry; the longest,
# BASELINE-CONTROL, has 16). A TLS record starts with 0x16, which is not a letter.
_HTTP_REQUEST_START: Final = re.compile(rb"[A-Z][A-Z-]{0,15} ")


class ClientHelloError(ValueError):
    """These bytes can never become a ClientHello we can read (client's fault, or a protocol we
    do not inspect)."""


@dataclass(frozen=True, slots=True)
class ClientHello:
    """The fields of a ClientHello that choosing a certificate may depend on.

    Values are as the client sent them, in its order, GREASE values (RFC 8701) included.
    """

    legacy_version: int  # client_version: 0x0303 even from TLS 1.3 clients (RFC 8446 §4.1.2)
    cipher_suites: tuple[int, ...]
    sni: str | None  # the host_name as sent: printable ASCII, not lowercased; None when absent
    alpn: tuple[bytes, ...]  # () when absent
    signature_algorithms: tuple[int, ...]  # () when absent
    supported_versions: tuple[int, ...]  # () when absent, as from every TLS 1.2-only client
    supported_groups: tuple[int, ...]  # () when absent

    @property
    def offers_tls13(self) -> bool:
        """The client can speak TLS 1.3 (only the supported_versions extension can say so)."""
        return TLS1_3 in self.supported_versions

    def brief(self) -> ClientHello:
        """What a connection keeps once its certificate is chosen: the SNI and ALPN its log
        line names. The lists the choice read (some 2 kB of Python ints per hello, held for
        as long as a keep-alive connection idles) go."""
        return ClientHello(self.legacy_version, (), self.sni, self.alpn, (), (), ())


def parse_client_hello(data: bytes) -> ClientHello | None:
    """`data` is everything received so far on the connection, from its first byte.

    Returns the ClientHello once complete, None when more bytes are needed, raises
    ClientHelloError when the bytes can never be a readable ClientHello (not a TLS handshake
    record, SSLv2-style hello, wrong handshake type, malformed lengths, duplicate extensions,
    more than MAX_CLIENT_HELLO_BYTES needed, ...).
    """
    # Fast path: the first record holds the whole hello, as from every real client. Its 9
    # header bytes are read in place, and the body is parsed where it lies. Any other start (a
    # hello in several records, a short or malformed header, a hello past the cap) goes to
    # _reassemble, which gives the same answer for these bytes, only slower. Other buffers than
    # bytes go there too: a slice of one would not be bytes.
    if (
        isinstance(data, bytes)
        and len(data) >= _FIRST_BODY_START
        and data[0] == CONTENT_TYPE_HANDSHAKE
        and data[1] == RECORD_VERSION_MAJOR
        and data[RECORD_HEADER_LEN] == HANDSHAKE_CLIENT_HELLO
    ):
        record_len = data[3] << 8 | data[4]  # the record header's last 2 bytes
        # The handshake header's last 3 bytes give the body's length, hence the hello's end.
        end = _FIRST_BODY_START + (data[6] << 16 | data[7] << 8 | data[8])
        if (
            end - RECORD_HEADER_LEN <= record_len <= MAX_RECORD_PAYLOAD_LEN
            and end <= MAX_CLIENT_HELLO_BYTES
        ):
            return None if len(data) < end else _parse_body(data, _FIRST_BODY_START, end)
    message = _reassemble(data)
    if message is None:
        return None
    return _parse_body(message, HANDSHAKE_HEADER_LEN, len(message))


def is_plain_http(data: bytes) -> bool:
    """True when the first bytes look like a plain-text HTTP request (e.g. b"GET / HTTP/1.1")
    sent to the TLS port, so the server can answer a short plain-text 400 instead of a TLS alert.

    Decided by the first 17 bytes at most: an uppercase method token and a space. With fewer
    bytes and no space yet, the answer is False. The HTTP/2 preface (b"PRI * HTTP/2.0") counts:
    RFC 9113 §3.4 made it look like an HTTP/1.1 request on purpose.
    """
    return _HTTP_REQUEST_START.match(data) is not None


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
        payload = pos + RECORD_HEADER_LEN  # where the record's payload starts
        if (
            len(data) < payload
            or view[pos] != CONTENT_TYPE_HANDSHAKE
            or view[pos + 1] != RECORD_VERSION_MAJOR
        ):
            # The header is cut short or wrong: raise if it is wrong so far, else wait.
            _check_record_header(view[pos:payload], pos)
            return None
        length = view[pos + 3] << 8 | view[pos + 4]  # the header's last 2 bytes
        if length == 0:
            raise ClientHelloError(f"empty handshake record at byte {pos}")
        if length > MAX_RECORD_PAYLOAD_LEN:
            raise ClientHelloError(f"record length {length} at byte {pos} exceeds 2^14")
        fragment = view[payload : payload + length]
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
        pos = payload + length


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


# The body parsers read in place: `data` is the buffer, and positions in it bound each vector
# (start inclusive, end exclusive). Each length is checked against the end of the vector that
# holds it before anything it covers is read, so an index never passes the end of its vector.
# Error messages name the field, then the vector it overruns ("<field> overruns <vector>").


def _parse_body(data: bytes, pos: int, end: int) -> ClientHello:
    """ClientHello body in data[pos:end], RFC 8446 §4.1.2 (extensions optional before TLS 1.3,
    RFC 5246 §7.4.1.2). Fields this module does not return are checked, not copied."""
    if pos + 2 > end:
        raise ClientHelloError("legacy_version overruns ClientHello")
    legacy_version = data[pos] << 8 | data[pos + 1]
    pos += 2 + RANDOM_LEN
    if pos > end:
        raise ClientHelloError("random overruns ClientHello")
    # legacy_session_id<0..32>
    if pos >= end:
        raise ClientHelloError("legacy_session_id length overruns ClientHello")
    session_id_len = data[pos]
    pos += 1 + session_id_len
    if pos > end:
        raise ClientHelloError("legacy_session_id overruns ClientHello")
    if session_id_len > MAX_SESSION_ID_LEN:
        raise ClientHelloError("legacy_session_id longer than 32 bytes")
    # cipher_suites<2..2^16-2>
    if pos + 2 > end:
        raise ClientHelloError("cipher_suites length overruns ClientHello")
    suites_start = pos + 2
    pos = suites_start + (data[pos] << 8 | data[pos + 1])
    if pos > end:
        raise ClientHelloError("cipher_suites overruns ClientHello")
    suites_size = pos - suites_start
    if suites_size % _U16_LEN or not suites_size:
        raise _not_u16s("cipher_suites", suites_size)
    cipher_suites = struct.unpack_from(f">{suites_size // _U16_LEN}H", data, suites_start)
    # legacy_compression_methods<1..2^8-1>
    if pos >= end:
        raise ClientHelloError("legacy_compression_methods length overruns ClientHello")
    methods_len = data[pos]
    pos += 1 + methods_len
    if pos > end:
        raise ClientHelloError("legacy_compression_methods overruns ClientHello")
    if not methods_len:
        raise ClientHelloError("legacy_compression_methods is empty")
    extensions = _split_extensions(data, pos, end) if pos < end else {}

    server_name = extensions.get(EXT_SERVER_NAME)
    alpn = extensions.get(EXT_ALPN)
    return ClientHello(
        legacy_version=legacy_version,
        cipher_suites=cipher_suites,
        sni=None if server_name is None else _parse_server_name(data, server_name),
        alpn=() if alpn is None else _parse_alpn(data, alpn),
        signature_algorithms=_u16_list(data, extensions, EXT_SIGNATURE_ALGORITHMS, length_size=2),
        # versions<2..254>: the only one of these lists with a one-byte length.
        supported_versions=_u16_list(data, extensions, EXT_SUPPORTED_VERSIONS, length_size=1),
        supported_groups=_u16_list(data, extensions, EXT_SUPPORTED_GROUPS, length_size=2),
    )


def _split_extensions(data: bytes, pos: int, end: int) -> dict[int, int]:
    """The extensions block at data[pos:], which must end the body at `end`: by extension type,
    where its 2-byte length is (its body follows). RFC 8446 §4.2 forbids two of one type."""
    if pos + 2 > end:
        raise ClientHelloError("extensions length overruns ClientHello")
    block_end = pos + 2 + (data[pos] << 8 | data[pos + 1])
    if block_end > end:
        raise ClientHelloError("extensions overruns ClientHello")
    pos += 2
    extensions: dict[int, int] = {}
    while pos < block_end:
        if pos + _EXTENSION_HEADER_LEN > block_end:
            # The header is cut short. Fail as a field-by-field read would: on a cut type,
            # else on a duplicate type, else on a cut length.
            if pos + 2 > block_end:
                raise ClientHelloError("extension type overruns extensions")
            ext_type = data[pos] << 8 | data[pos + 1]
            if ext_type in extensions:
                raise ClientHelloError(f"duplicate extension {ext_type}")
            raise ClientHelloError(f"extension {ext_type} length overruns extensions")
        ext_type, body_len = _EXTENSION_HEADER.unpack_from(data, pos)
        if ext_type in extensions:
            raise ClientHelloError(f"duplicate extension {ext_type}")
        extensions[ext_type] = pos + 2  # where its length is
        pos += _EXTENSION_HEADER_LEN + body_len
        if pos > block_end:
            raise ClientHelloError(f"extension {ext_type} overruns extensions")
    if block_end < end:
        raise ClientHelloError(f"ClientHello has {end - block_end} unexpected trailing byte(s)")
    return extensions


def _extension_list(data: bytes, at: int, length_size: int, ext_type: int) -> tuple[int, int]:
    """The start and end of the one vector, behind a `length_size`-byte length, that must fill
    the body of the extension whose 2-byte length is at data[at] (as `_split_extensions` found
    it, within bounds)."""
    body_start = at + 2
    body_end = body_start + (data[at] << 8 | data[at + 1])
    start = body_start + length_size
    if start > body_end:
        raise ClientHelloError(f"extension {ext_type} length overruns extension {ext_type}")
    if length_size == 1:
        end = start + data[body_start]
    else:
        end = start + (data[body_start] << 8 | data[body_start + 1])
    if end > body_end:
        raise ClientHelloError(f"extension {ext_type} overruns extension {ext_type}")
    if end < body_end:
        raise ClientHelloError(
            f"extension {ext_type} has {body_end - end} unexpected trailing byte(s)"
        )
    return start, end


def _u16_list(
    data: bytes, extensions: dict[int, int], ext_type: int, *, length_size: int
) -> tuple[int, ...]:
    """An extension that is one nonempty list of 2-byte code points; () when it is absent."""
    at = extensions.get(ext_type)
    if at is None:
        return ()
    start, end = _extension_list(data, at, length_size, ext_type)
    size = end - start
    if size % _U16_LEN or not size:
        raise _not_u16s(f"extension {ext_type}", size)
    return struct.unpack_from(f">{size // _U16_LEN}H", data, start)  # big-endian u16s


def _not_u16s(what: str, size: int) -> ClientHelloError:
    """The error for a list of 2-byte values (suites, groups, schemes, versions) that is empty
    or has an odd number of bytes."""
    return ClientHelloError(f"{what} length {size} is not a list of u16")


def _parse_server_name(data: bytes, at: int) -> str | None:
    """The host_name of a server_name extension (RFC 6066 §3); other name types are skipped."""
    pos, end = _extension_list(data, at, 2, EXT_SERVER_NAME)
    if pos == end:
        raise ClientHelloError("server_name list is empty")
    host_name: str | None = None
    while pos < end:
        # ServerName: a 1-byte NameType (within bounds, as pos < end), then a name behind a
        # 2-byte length.
        name_type = data[pos]
        name_start = pos + 3
        if name_start > end:
            raise ClientHelloError(f"server_name length overruns extension {EXT_SERVER_NAME}")
        pos = name_start + (data[pos + 1] << 8 | data[pos + 2])
        if pos > end:
            raise ClientHelloError(f"server_name overruns extension {EXT_SERVER_NAME}")
        if name_type != SERVER_NAME_TYPE_HOST_NAME:
            continue
        if host_name is not None:
            raise ClientHelloError("two host_name entries in server_name")  # RFC 6066 §3
        name = data[name_start:pos]
        # Deleting every allowed byte leaves the others.
        if not name or name.translate(None, _HOST_NAME_BYTES):
            raise ClientHelloError(f"host_name {name!r} is not printable ASCII")
        host_name = name.decode("ascii")
    return host_name


def _parse_alpn(data: bytes, at: int) -> tuple[bytes, ...]:
    """ProtocolName protocol_name_list<2..2^16-1>, each name opaque<1..2^8-1> (RFC 7301 §3.1)."""
    pos, end = _extension_list(data, at, 2, EXT_ALPN)
    protocols: list[bytes] = []
    while pos < end:
        # A name behind a 1-byte length (within bounds, as pos < end).
        name_start = pos + 1
        pos = name_start + data[pos]
        if pos > end:
            raise ClientHelloError(f"ALPN protocol name overruns extension {EXT_ALPN}")
        if pos == name_start:
            raise ClientHelloError("empty ALPN protocol name")
        protocols.append(data[name_start:pos])
    if not protocols:
        raise ClientHelloError("ALPN protocol list is empty")
    return tuple(protocols)
