"""Session-ticket keys managed by dualproxy: one ring of keys for every SSL context a server
builds (each identity's, before and after every reload), rotated on a schedule.

Why. A session ticket is the server's encrypted session state, held by the client, which
presents it to resume (TLS 1.2 tickets, RFC 5077; TLS 1.3 stateless PSK tickets, RFC 8446
4.6.1). By default OpenSSL encrypts tickets with a random key per SSL_CTX, kept as long as the
context lives: a reload (a new context) invalidates every ticket, and a context that lives
for months keeps one key for months, so whoever obtains it decrypts every resumed session of
that time (forward secrecy of resumed sessions lasts as long as the ticket key). Here the
keys belong to a `TicketKeys` ring that outlives contexts, so a reload resumes, and the ring
rotates: a new key every `rotation` seconds encrypts new tickets; the previous one still
decrypts (and the ticket is renewed under the current key) until it is `rotation` old as a
previous key, then it is dropped. So at most two keys live, the older at most 2 x rotation
old: with the default of 12 h (Caddy's), a day's keys at most, and a rotation forces no wave
of full handshakes. `keep_rotating`, a task beside the server's connections, rotates when
due (in a worker thread, as it may write the key file); a handshake that needs a key first
rotates itself; keys past their window never decrypt either way. A ticket's own lifetime is
shorter still: OpenSSL's session timeout (7200 s, the lifetime hint it sends) ends it.

The key file (`[tls] ticket_key_file`, optional): the ring is read from it at start and
written to it (atomically, mode 0600) at every rotation, so tickets survive a restart and
processes that share the file share the keys: a process due to rotate first reads the file,
under an flock on a `.lock` file beside it, and adopts a rotation another process made. Keys
carry the time they were made, by the clock of the process that made them: one up to
`CLOCK_SKEW` in this machine's future counts as made now, so replicas whose clocks differ
still agree. A file others may read is refused, as a private key file is. The file and key
bytes never reach a log or an error message.

How OpenSSL is reached. The stdlib `ssl` module has no ticket-key API. OpenSSL 3.0's
`SSL_CTX_set_tlsext_ticket_key_evp_cb` installs a callback that names, encrypts and
authenticates each ticket (what nginx and HAProxy use for their key files); it is called
through ctypes with the `SSL_CTX *` of a Python `SSLContext`:

- The OpenSSL functions are looked up through the `_ssl` extension module's own handle
  (`ctypes.CDLL(_ssl.__file__)`): dlsym on a handle searches the module and the libraries it
  was linked with, so they are those of the very libssl and libcrypto that built the context,
  never a second copy. Its version must equal `ssl.OPENSSL_VERSION_NUMBER` and be 3.x.
- The `SSL_CTX *` is the first field after the object header of CPython's `PySSLContext`
  (`Modules/_ssl.c`: `typedef struct { PyObject_HEAD SSL_CTX *ctx; ...} PySSLContext;`, so
  in every CPython from 3.7 to 3.13): at `id(context) + object.__basicsize__` (the size of
  `PyObject_HEAD` in this build, debug builds included). Only CPython is trusted with it, and
  the pointer is checked against two values the Python object reports of its SSL_CTX (the
  options, and the TLS 1.3 ticket count, set to a probe value first) before anything is
  written through it. Debian 12's python3.11 with OpenSSL 3.0 (the set-up's interpreter)
  passes; the tests run there.
- Anything else (another interpreter, another OpenSSL, a check that fails): `TicketKeys`
  fails closed, tickets off on every context (no resumption, never a key we do not manage),
  said once in the log.

The callback runs inside OpenSSL's handshake, where CPython released the GIL; ctypes takes it
back for the call (as `ssl`'s own SNI callback does). It must not raise: an unexpected error
issues no ticket (or treats the presented one as unknown: a full handshake), logged once.

Which contexts resume which tickets. OpenSSL resumes a session only under the session-id
context it was made under; `install` sets it from the pins of the keys the context serves.
A ticket issued with the old key therefore never resumes on a context that serves the new
key (the client would keep the old certificate, and the evidence would count it as served the
new one), while two contexts serving the same keys (a reload, another worker, another
identity holding the same keys) resume each other's tickets.

TLS 1.2 and TLS 1.3. Both protocol versions' stateless tickets go through the callback.
TLS 1.2 clients may also resume by session id, from OpenSSL's per-context session cache:
that cache is not shared by contexts, so it does not survive a reload (tickets do). With
tickets off, no ticket is sent in either version (`num_tickets = 0`, `OP_NO_TICKET`); TLS 1.2
session ids still resume on the same context, as with nginx's `ssl_session_tickets off`.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import hashlib
import json
import logging
import os
import secrets
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import trio

from dualproxy.config.errors import OperatorError
from dualproxy.config.schema import TlsSettings
from dualproxy.files import locked, write_atomically
from dualproxy.tls.keystore import KeySnapshot, key_file_permission_problem

__all__ = [
    "CLOCK_SKEW",
    "ROTATION_MIN_SLEEP",
    "TICKET_KEY_FILE_MAX_BYTES",
    "TicketKey",
    "TicketKeys",
    "keep_rotating",
    "tickets_supported",
]

log = logging.getLogger("dualproxy.tls")

# A key as OpenSSL's own ticket format wants it: a 16-byte name (which key encrypted a
# ticket; sent in clear in the ticket), a 32-byte HMAC-SHA256 key and a 32-byte AES-256-CBC
# key, 80 bytes in all, the layout of nginx's and HAProxy's 80-byte key files.
_NAME_BYTES: Final = 16
_HMAC_KEY_BYTES: Final = 32
_AES_KEY_BYTES: Final = 32
_KEY_BYTES: Final = _NAME_BYTES + _HMAC_KEY_BYTES + _AES_KEY_BYTES
_IV_BYTES: Final = 16  # AES's block size
# The key file holds two keys in a few hundred bytes of JSON: anything far larger is not ours.
TICKET_KEY_FILE_MAX_BYTES: Final = 64 * 1024
_KEY_FILE_VERSION: Final = 1
# keep_rotating never sleeps less than this, in seconds: a clock that went back, or a sleep
# that woke a moment early, must not turn it into a busy loop.
ROTATION_MIN_SLEEP: Final = 1.0
# Processes on other machines (replicas sharing the key file) stamp their keys with their own
# clocks: a key made up to this many seconds in this machine's future is taken as made now,
# not refused (refusing it, each replica would make a key of its own, and none would resume
# the others' tickets). NTP keeps clocks milliseconds apart; a minute covers a host whose
# sync lapsed. A key further ahead is ignored, as one past its window is.
CLOCK_SKEW: Final = 60.0
# A session-id context is at most 32 bytes (SSL_MAX_SID_CTX_LENGTH): a SHA-256 digest.
_SID_CTX_LABEL: Final = b"dualproxy session-id context v1"
# The TLS 1.3 ticket count set while checking a context pointer (any value Python would not
# have set: it is restored at once).
_PROBE_TICKETS: Final = 7

# SSL_CTX_set_tlsext_ticket_key_evp_cb's return values (OpenSSL 3.0 manual page).
_NO_TICKET: Final = 0  # encrypting: issue none; decrypting: unknown key, full handshake
_TICKET_OK: Final = 1
_TICKET_OK_RENEW: Final = 2  # decrypted with a previous key: issue a new ticket under ours
# OSSL_PARAM data types and the "unmodified" return size (openssl/core.h, params.h).
_OSSL_PARAM_UTF8_STRING: Final = 4
_OSSL_PARAM_OCTET_STRING: Final = 5
_OSSL_PARAM_UNMODIFIED: Final = ctypes.c_size_t(-1).value


@dataclass(frozen=True, slots=True)
class TicketKey:
    """One ticket key and when it began encrypting (Unix seconds). Its bytes stay out of
    repr and comparisons' output."""

    name: bytes = field(repr=False)
    hmac_key: bytes = field(repr=False)
    aes_key: bytes = field(repr=False)
    created: float

    @classmethod
    def generate(cls, now: float) -> TicketKey:
        raw = secrets.token_bytes(_KEY_BYTES)
        return cls.from_bytes(raw, now)

    @classmethod
    def from_bytes(cls, raw: bytes, created: float) -> TicketKey:
        if len(raw) != _KEY_BYTES:
            raise ValueError(f"a ticket key is {_KEY_BYTES} bytes")
        hmac_end = _NAME_BYTES + _HMAC_KEY_BYTES
        return cls(raw[:_NAME_BYTES], raw[_NAME_BYTES:hmac_end], raw[hmac_end:], created)

    def to_bytes(self) -> bytes:
        return self.name + self.hmac_key + self.aes_key


class TicketKeys:
    """The ring of ticket keys of one server (see the module docstring): the current key,
    which encrypts, and at most one previous key, which still decrypts.

    `clock`: Unix seconds (tests pass a fake one). Thread-safe: reloads build contexts in a
    worker thread while handshakes use the ring."""

    def __init__(self, settings: TlsSettings, *, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self._clock = clock
        self._rotation = settings.ticket_key_rotation
        self._key_path = settings.ticket_key_file_key  # named by the key file's errors
        self._lock = threading.Lock()
        self._keys: list[TicketKey] = []  # newest first
        self._native: dict[bytes, _NativeKey] = {}
        self._callback: object = None
        self._failures_logged = False
        self.rotations = 0  # since the start: new keys made or adopted from the key file
        self.enabled = settings.session_tickets
        if not self.enabled:
            return
        if (problem := tickets_supported()) is not None:
            log.warning(
                "session tickets are off: dualproxy cannot manage their keys here (%s)", problem
            )
            self.enabled = False
            return
        if settings.ticket_key_file is None:
            self._rotate(clock())
            return
        # Its folder (a state folder a first start meets empty) made first, so that the lock
        # beside the file holds from the first start on; a folder that cannot be made is
        # said by the write that fails in it.
        with contextlib.suppress(OSError):
            settings.ticket_key_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with locked(settings.ticket_key_file):
            # The time once the lock is held: a key another process made while this one
            # waited for the lock was made before it, not in its future.
            now = clock()
            self._keys = self._read_file(settings.ticket_key_file, now)
            if not self._current_valid(now):
                self._rotate(now)

    # --- the schedule ------------------------------------------------------------------

    def valid_keys(self) -> tuple[TicketKey, ...]:
        """The keys that decrypt now, newest (the one that encrypts) first; rotates if due."""
        with self._lock:
            self._rotate_if_due_locked(self._clock())
            return tuple(self._keys)

    def rotate_if_due(self) -> bool:
        """Make a new current key if the current one has served its `rotation`; drop keys
        past their decryption window. True if it rotated."""
        with self._lock:
            return self._rotate_if_due_locked(self._clock())

    def seconds_until_rotation(self) -> float:
        """How long until the current key is due to be replaced (0: now)."""
        with self._lock:
            if not self._keys:
                return 0.0
            return max(0.0, self._keys[0].created + self._rotation - self._clock())

    def _rotate_if_due_locked(self, now: float) -> bool:
        if not self.enabled:  # off: no key is ever made
            return False
        rotated = self._rotate_or_adopt(now)
        self.rotations += rotated
        return rotated

    def _rotate_or_adopt(self, now: float) -> bool:
        if self._current_valid(now):
            self._drop_expired(now)
            return False
        path = self.settings.ticket_key_file
        if path is None:
            self._rotate(now)
            return True
        # Another process sharing the file may have rotated already: adopt its keys. Under the
        # file's lock, so that processes due at the same moment make one new key, not one each.
        with locked(path):
            now = max(now, self._clock())  # as in __init__: the time once the lock is held
            try:
                self._keys = self._read_file(path, now)
            except OperatorError as exc:
                log.warning("ticket key file not read, rotating without it: %s", exc)
            if self._current_valid(now):
                self._drop_expired(now)
            else:
                self._rotate(now)
        return True

    def _current_valid(self, now: float) -> bool:
        if not self._keys:
            return False
        created = self._keys[0].created
        return created - CLOCK_SKEW <= now < created + self._rotation

    def _rotate(self, now: float) -> None:
        self._keys.insert(0, TicketKey.generate(now))
        self._drop_expired(now)
        if self.settings.ticket_key_file is not None:
            self._write_file(self.settings.ticket_key_file)

    def _drop_expired(self, now: float) -> None:
        """Keep the current key and the previous one while it is in its window: it encrypted
        for `rotation` from its creation at most, and decrypts for `rotation` after that."""
        keep = self._keys[:1]
        if len(self._keys) > 1 and self._decrypts(self._keys[1], now):
            keep.append(self._keys[1])
        for dropped in self._keys[len(keep) :]:
            self._native.pop(dropped.name, None)
        self._keys = keep

    def _decrypts(self, key: TicketKey, now: float) -> bool:
        return key.created - CLOCK_SKEW <= now < key.created + 2 * self._rotation

    # --- the key file --------------------------------------------------------------------

    def _read_file(self, path: Path, now: float) -> list[TicketKey]:
        """The keys in the file that are not past their window (none if it does not exist)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise OperatorError(
                f"cannot open the session-ticket key file: {exc.strerror}",
                key_path=self._key_path,
                file=path,
                fix="check the path; dualproxy creates the file if it is missing",
            ) from None
        with os.fdopen(fd, "rb") as file:
            status = os.fstat(file.fileno())
            if (
                problem := key_file_permission_problem(status.st_mode, status.st_uid, os.geteuid())
            ) is not None:
                raise OperatorError(
                    f"the session-ticket key file {problem}",
                    key_path=self._key_path,
                    file=path,
                )
            raw = file.read(TICKET_KEY_FILE_MAX_BYTES + 1)
        keys = [key for key in self._parse_file(raw, path) if self._decrypts(key, now)]
        keys.sort(key=lambda key: key.created, reverse=True)
        return keys[:2]

    def _parse_file(self, raw: bytes, path: Path) -> list[TicketKey]:
        def bad(what: str) -> OperatorError:
            return OperatorError(
                f"the session-ticket key file is not one dualproxy wrote ({what})",
                key_path=self._key_path,
                file=path,
                fix="delete it: dualproxy writes a new one (resumed sessions start over)",
            )

        if len(raw) > TICKET_KEY_FILE_MAX_BYTES:
            raise bad(f"longer than {TICKET_KEY_FILE_MAX_BYTES} bytes")
        try:
            data = json.loads(raw)
            if data["version"] != _KEY_FILE_VERSION:
                raise bad(f"version {data['version']!r}, not {_KEY_FILE_VERSION}")
            return [
                TicketKey.from_bytes(
                    base64.b64decode(entry["key"], validate=True), float(entry["created"])
                )
                for entry in data["keys"]
            ]
        except OperatorError:
            raise
        except (ValueError, KeyError, TypeError):
            raise bad("not its JSON shape") from None

    def _write_file(self, path: Path) -> None:
        data = {
            "version": _KEY_FILE_VERSION,
            "keys": [
                {"created": key.created, "key": base64.b64encode(key.to_bytes()).decode()}
                for key in self._keys
            ],
        }
        try:
            write_atomically(path, json.dumps(data).encode(), mode=0o600)
        except OSError as exc:
            # Serving goes on with the keys in memory; only a restart loses them.
            log.warning(
                "session-ticket keys not saved to %s (%s): a restart will start new ones",
                path,
                exc.strerror,
            )

    # --- OpenSSL -------------------------------------------------------------------------

    def install_snapshot(self, snapshot: KeySnapshot) -> None:
        """`install` on every identity's context of `snapshot` (idempotent)."""
        for identity in snapshot.identities.values():
            self.install(identity.context, [key.pin for key in identity.keys])

    def install(self, context: ssl.SSLContext, pins: Iterable[str]) -> None:
        """Make `context` issue and take tickets under this ring's keys, resuming only the
        sessions of contexts that serve the same keys (`pins`); or no tickets at all, if they
        are off or cannot be managed here."""
        if self.enabled:
            try:
                _install(context, self._ticket_callback(), pins)
                return
            except _Unsupported as exc:
                log.warning("session tickets are off: %s", exc)
                with self._lock:
                    self.enabled = False
                    self._keys, self._native = [], {}
        context.options |= ssl.OP_NO_TICKET
        context.num_tickets = 0

    def _ticket_callback(self) -> object:
        if self._callback is None:
            self._callback = _TICKET_KEY_CALLBACK(self._on_ticket)
        return self._callback

    def _on_ticket(
        self, _ssl: int, name: int, iv: int, cipher_ctx: int, mac_ctx: int, encrypt: int
    ) -> int:
        """OpenSSL's ticket key callback: never raises (see the module docstring)."""
        try:
            with self._lock:
                now = self._clock()
                self._rotate_if_due_locked(now)
                if not self._keys:  # turned off since this context took the callback
                    return _NO_TICKET
                if encrypt:
                    key = self._keys[0]
                    native = self._native_key(key)
                    ctypes.memmove(name, key.name, _NAME_BYTES)
                    ctypes.memmove(iv, secrets.token_bytes(_IV_BYTES), _IV_BYTES)
                    if not native.init(cipher_ctx, mac_ctx, iv, encrypt=True):
                        return _NO_TICKET
                    return _TICKET_OK
                wanted = ctypes.string_at(name, _NAME_BYTES)
                for position, key in enumerate(self._keys):
                    if key.name == wanted:
                        if not self._native_key(key).init(cipher_ctx, mac_ctx, iv, encrypt=False):
                            return _NO_TICKET
                        return _TICKET_OK if position == 0 else _TICKET_OK_RENEW
                return _NO_TICKET
        except Exception as exc:  # OpenSSL, our caller, cannot take one
            if not self._failures_logged:
                self._failures_logged = True
                log.error(
                    "session ticket not issued or taken (a bug: %s: %s)", type(exc).__name__, exc
                )
            return _NO_TICKET

    def _native_key(self, key: TicketKey) -> _NativeKey:
        native = self._native.get(key.name)
        if native is None:
            native = self._native[key.name] = _NativeKey(key)
        return native


async def keep_rotating(tickets: TicketKeys) -> None:
    """Rotate `tickets` when due, so that a key past its window leaves memory even when no
    handshake asks for a key (a handshake would rotate first anyway); until cancelled, or at
    once when tickets are off. The rotation runs in a worker thread: it may write the key
    file."""
    while tickets.enabled:
        await trio.sleep(max(tickets.seconds_until_rotation(), ROTATION_MIN_SLEEP))
        await trio.to_thread.run_sync(tickets.rotate_if_due)


# --- ctypes ------------------------------------------------------------------------------


class _Unsupported(Exception):
    """Tickets cannot be managed in this process (the reason, for the log)."""


class _OsslParam(ctypes.Structure):
    _fields_ = [
        ("key", ctypes.c_char_p),
        ("data_type", ctypes.c_uint),
        ("data", ctypes.c_void_p),
        ("data_size", ctypes.c_size_t),
        ("return_size", ctypes.c_size_t),
    ]


# int cb(SSL *s, unsigned char key_name[16], unsigned char iv[EVP_MAX_IV_LENGTH],
#        EVP_CIPHER_CTX *ctx, EVP_MAC_CTX *hctx, int enc)
_TICKET_KEY_CALLBACK: Final = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_int,
)


class _LibSsl:
    """The OpenSSL functions we call, from the libraries the `_ssl` module uses."""

    def __init__(self) -> None:
        import _ssl  # the extension module: its handle reaches its libssl and libcrypto

        lib = ctypes.CDLL(_ssl.__file__)
        self.version_num = lib.OpenSSL_version_num
        self.version_num.restype, self.version_num.argtypes = ctypes.c_ulong, []
        self.get_options = lib.SSL_CTX_get_options
        self.get_options.restype, self.get_options.argtypes = ctypes.c_uint64, [ctypes.c_void_p]
        self.get_num_tickets = lib.SSL_CTX_get_num_tickets
        self.get_num_tickets.restype = ctypes.c_size_t
        self.get_num_tickets.argtypes = [ctypes.c_void_p]
        self.set_ticket_callback = lib.SSL_CTX_set_tlsext_ticket_key_evp_cb
        self.set_ticket_callback.restype = ctypes.c_int
        self.set_ticket_callback.argtypes = [ctypes.c_void_p, _TICKET_KEY_CALLBACK]
        self.set_sid_ctx = lib.SSL_CTX_set_session_id_context
        self.set_sid_ctx.restype = ctypes.c_int
        self.set_sid_ctx.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint]
        self.aes_256_cbc = lib.EVP_aes_256_cbc
        self.aes_256_cbc.restype, self.aes_256_cbc.argtypes = ctypes.c_void_p, []
        init_args = [ctypes.c_void_p] * 5
        self.encrypt_init = lib.EVP_EncryptInit_ex
        self.encrypt_init.restype, self.encrypt_init.argtypes = ctypes.c_int, init_args
        self.decrypt_init = lib.EVP_DecryptInit_ex
        self.decrypt_init.restype, self.decrypt_init.argtypes = ctypes.c_int, init_args
        self.mac_set_params = lib.EVP_MAC_CTX_set_params
        self.mac_set_params.restype = ctypes.c_int
        self.mac_set_params.argtypes = [ctypes.c_void_p, ctypes.POINTER(_OsslParam)]
        self.cipher: int = self.aes_256_cbc()


_libssl: _LibSsl | None = None
_libssl_problem: str | None = None
_libssl_lock = threading.Lock()


def tickets_supported() -> str | None:
    """Why dualproxy cannot manage ticket keys in this process, or None if it can."""
    return _load_libssl()[1]


def _load_libssl() -> tuple[_LibSsl | None, str | None]:
    global _libssl, _libssl_problem  # loaded once per process
    with _libssl_lock:
        if _libssl is None and _libssl_problem is None:
            _libssl, _libssl_problem = _find_libssl()
        return _libssl, _libssl_problem


def _find_libssl() -> tuple[_LibSsl | None, str | None]:
    if sys.implementation.name != "cpython":
        return None, f"{sys.implementation.name} is not CPython, whose SSLContext layout we know"
    if not (3, 7) <= sys.version_info[:2] <= (3, 13):
        return None, f"Python {sys.version_info[0]}.{sys.version_info[1]} is not one we checked"
    pointer_end = object.__basicsize__ + ctypes.sizeof(ctypes.c_void_p)
    if ssl.SSLContext.__basicsize__ < pointer_end:
        return None, "this Python's SSLContext is smaller than the layout we know"
    try:
        lib = _LibSsl()
    except (ImportError, OSError, AttributeError) as exc:
        return None, f"OpenSSL's ticket functions not found ({exc})"
    linked = lib.version_num()
    if linked != ssl.OPENSSL_VERSION_NUMBER or not 0x3000_0000 <= linked < 0x4000_0000:
        return None, f"the ssl module's OpenSSL ({ssl.OPENSSL_VERSION}) is not OpenSSL 3"
    return lib, None


def _ssl_ctx(context: ssl.SSLContext, lib: _LibSsl) -> int:
    """The SSL_CTX * of `context` (see the module docstring), checked."""
    pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    if not pointer:
        raise _Unsupported("the SSLContext holds no SSL_CTX where CPython keeps it")
    saved = context.num_tickets
    context.num_tickets = _PROBE_TICKETS
    try:
        if lib.get_num_tickets(pointer) != _PROBE_TICKETS or lib.get_options(pointer) != int(
            context.options
        ):
            raise _Unsupported("the SSLContext's SSL_CTX is not where CPython keeps it")
    finally:
        context.num_tickets = saved
    return pointer


def _install(context: ssl.SSLContext, callback: object, pins: Iterable[str]) -> None:
    lib, problem = _load_libssl()
    if lib is None:
        raise _Unsupported(problem or "OpenSSL not reachable")
    pointer = _ssl_ctx(context, lib)
    sid_ctx = hashlib.sha256(_SID_CTX_LABEL + "\n".join(sorted(pins)).encode()).digest()
    if lib.set_sid_ctx(pointer, sid_ctx, len(sid_ctx)) != 1:
        raise _Unsupported("OpenSSL refused the session-id context")
    if lib.set_ticket_callback(pointer, callback) != 1:
        raise _Unsupported("OpenSSL refused the ticket key callback")
    # The callback must live as long as the SSL_CTX that calls it: the context keeps it.
    context._dualproxy_ticket_callback = callback  # type: ignore[attr-defined]
    context.options &= ~ssl.OP_NO_TICKET


class _NativeKey:
    """One key's bytes as OpenSSL takes them, kept for the key's lifetime in the ring."""

    def __init__(self, key: TicketKey) -> None:
        lib, _ = _load_libssl()
        assert lib is not None
        self._lib = lib
        self._aes = ctypes.create_string_buffer(key.aes_key, _AES_KEY_BYTES)
        self._hmac = ctypes.create_string_buffer(key.hmac_key, _HMAC_KEY_BYTES)
        self._digest = ctypes.create_string_buffer(b"SHA256")
        self._params = (_OsslParam * 3)(
            _OsslParam(
                b"key",
                _OSSL_PARAM_OCTET_STRING,
                ctypes.addressof(self._hmac),
                _HMAC_KEY_BYTES,
                _OSSL_PARAM_UNMODIFIED,
            ),
            _OsslParam(
                b"digest",
                _OSSL_PARAM_UTF8_STRING,
                ctypes.addressof(self._digest),
                len(b"SHA256"),
                _OSSL_PARAM_UNMODIFIED,
            ),
            _OsslParam(None, 0, None, 0, 0),
        )

    def init(self, cipher_ctx: int, mac_ctx: int, iv: int, *, encrypt: bool) -> bool:
        lib = self._lib
        init = lib.encrypt_init if encrypt else lib.decrypt_init
        if init(cipher_ctx, lib.cipher, None, ctypes.addressof(self._aes), iv) != 1:
            return False
        return bool(lib.mac_set_params(mac_ctx, self._params) == 1)
