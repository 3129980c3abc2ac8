"""ACME challenge responders: tls-alpn-01 (RFC 8737) and http-01 (RFC 8555 8.3).

Theory of operation. Whoever runs an ACME order (`dualproxy serve` renewing in the
background, or `dualproxy acme issue|renew` from another process) *publishes* each pending
challenge as a small JSON file in the challenge folder (`<account key's folder>/challenges`,
mode 0700; one file per challenge, written atomically, removed when the order ends). Every
responder answers from that folder through a `ChallengeBoard`:

- a running `serve` polls it every `keystore.reload_poll_interval` (its own orders refresh it
  at once) and answers on its real listeners: a ClientHello offering ALPN `acme-tls/1` for a
  name with a pending tls-alpn-01 challenge gets the challenge certificate (the board is the
  server's `TlsAlpnResponder`, asked after its peek: see acme.service), and the optional
  plain-HTTP listener answers `/.well-known/acme-challenge/TOKEN` (and redirects everything
  else to https);
- without a running `serve`, the command binds the same addresses itself and answers only
  challenges (`open_responders`).

Before telling the CA to validate, the publisher checks through the real listener that the
answer is actually served (`wait_until_served`), whoever serves it: a CA's failed validations
count against rate limits, a local probe does not. So the CLI needs no channel to the server
and several `serve` processes on one port (SO_REUSEPORT) all answer. The files hold no secret:
a key authorization is a token and the account key's public thumbprint. The challenge
certificate's key is made per challenge by each responder and never leaves its memory.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import socket
import ssl
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dualproxy.config.names import ListenAddress, normalize_host
from dualproxy.config.schema import ChallengeType, ListenConfig
from dualproxy.files import write_atomically
from dualproxy.http.errors import HttpRefusal
from dualproxy.http.smallserver import Answer, Connection, Request
from dualproxy.serve.connection import ConnectionRecord, peer_address
from dualproxy.serve.listeners import accept_loop, open_listeners
from dualproxy.serve.proxied import receive_proxy_header
from dualproxy.tls.clienthello import (
    MAX_CLIENT_HELLO_BYTES,
    ClientHello,
    ClientHelloError,
    parse_client_hello,
)
from dualproxy.tls.outcome import Outcome
from dualproxy.tls.proxy_protocol import expectation
from dualproxy.tls.streams import TcpStream, TlsStream, discard_until_closed

log = logging.getLogger("dualproxy.acme")

ACME_TLS_ALPN: Final = b"acme-tls/1"
# RFC 8737 3: id-pe-acmeIdentifier, whose value is the SHA-256 of the key authorization.
ID_PE_ACME_IDENTIFIER: Final = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")
HTTP01_PREFIX: Final = "/.well-known/acme-challenge/"
# A published challenge older than this is a leftover of a crashed order: ignored. The CA
# gives an order far less (Let's Encrypt's authorizations time out after minutes of polling).
CHALLENGE_MAX_AGE: Final = timedelta(hours=1)
# The challenge certificate lives only while the CA validates; a day absorbs any clock skew.
CHALLENGE_CERT_LIFETIME: Final = timedelta(days=1)
# A validation connection (ClientHello, handshake; or one HTTP request) must finish within
# this: the CA's validators need a few round trips, a stalled client gets no more.
RESPONDER_TIMEOUT: Final = 10.0
# The plain-HTTP listener reads one request head of at most this (no body is ever read):
# a challenge request or a browser's first request is well under 1 KiB, 8 KiB is nginx's
# request-line buffer.
MAX_HTTP_HEAD: Final = 8 * 1024
# Connections the plain-HTTP listener (and the CLI's own responders) serve at once: a CA's
# validators open a handful, browsers a few each; beyond it clients wait in the backlog, so
# a flood on port 80 cannot take the descriptors the TLS port needs.
RESPONDER_MAX_CONNECTIONS: Final = 256
# After answering, what the client may still send is read and discarded (at most this long
# and this much) before the close, so that the close does not reset the connection and take
# the answer with it (what serve.closing.lingering_close does for the TLS port, smaller: nothing
# here reads a body).
HTTP_LINGER_TIME: Final = 2.0
HTTP_LINGER_BYTES: Final = 256 * 1024
# The local check that a published challenge is answered probes every so often...
PROBE_INTERVAL: Final = 0.2
# ... each probe bounded by this.
PROBE_TIMEOUT: Final = 5.0


@dataclass(frozen=True, slots=True)
class Challenge:
    """One pending challenge, as published."""

    kind: ChallengeType
    name: str  # the DNS name being validated (lowercase)
    token: str
    key_authorization: str

    @property
    def digest(self) -> bytes:
        """The tls-alpn-01 acmeIdentifier value."""
        return hashlib.sha256(self.key_authorization.encode("ascii")).digest()

    def file_name(self) -> str:
        ident = f"{self.kind}\0{self.name}\0{self.token}".encode()
        return hashlib.sha256(ident).hexdigest()[:32] + ".json"


class ChallengeError(Exception):
    """A challenge cannot be answered here; says why and what to do."""


# --- tls-alpn-01 -------------------------------------------------------------------------


def challenge_context(challenge: Challenge) -> ssl.SSLContext:
    """A server context that presents the RFC 8737 certificate and negotiates acme-tls/1."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, challenge.name)])
    # DER OCTET STRING holding the 32-byte digest: tag 0x04, length 0x20.
    identifier = x509.UnrecognizedExtension(ID_PE_ACME_IDENTIFIER, b"\x04\x20" + challenge.digest)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CHALLENGE_CERT_LIFETIME)
        .not_valid_after(now + CHALLENGE_CERT_LIFETIME)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(challenge.name)]), False)
        .add_extension(identifier, critical=True)
        .sign(key, hashes.SHA256())
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols([ACME_TLS_ALPN.decode()])
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    # load_cert_chain reads files only; a private temporary folder holds them for a moment.
    with tempfile.TemporaryDirectory(prefix="dualproxy-acme-") as folder:
        cert_file, key_file = Path(folder, "cert.pem"), Path(folder, "key.pem")
        cert_file.write_bytes(cert_pem)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(key_pem)
        context.load_cert_chain(cert_file, key_file)
    return context


def wants_challenge(hello: ClientHello | None) -> bool:
    """Whether a ClientHello comes from a CA validating tls-alpn-01 (it offers acme-tls/1)."""
    return hello is not None and ACME_TLS_ALPN in hello.alpn


async def answer_tls_alpn(stream: TcpStream, peeked: bytes, context: ssl.SSLContext) -> str:
    """Complete a validation handshake with the challenge certificate, then close (RFC 8737
    3: no application data follows). Returns how it ended, for the log."""
    tls = TlsStream(stream, context, server_side=True, prefix=peeked)
    try:
        with trio.fail_after(RESPONDER_TIMEOUT):
            await tls.do_handshake()
            await tls.aclose()
    except trio.TooSlowError:
        return "timed out"
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return "aborted"
    return "answered"


# --- the board ---------------------------------------------------------------------------


class ChallengeBoard:
    """The challenges pending in one folder, ready to answer.

    `refresh` (blocking: it reads files and makes keys) replaces the lookup tables in one
    assignment each, so the trio side reads them without a lock.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._tls: Mapping[str, ssl.SSLContext] = {}
        self._http: Mapping[str, bytes] = {}
        self._seen: dict[str, tuple[Challenge, ssl.SSLContext | None]] = {}
        # (challenge file, how it ended) already logged at info: a CA validates one challenge
        # from several vantage points, and our own probe checks it first; one line each.
        self._logged: set[tuple[str, str]] = set()

    def tls_alpn_context(self, sni: str | None) -> ssl.SSLContext | None:
        if sni is None:
            return None
        return self._tls.get(normalize_host(sni))

    # The server's TlsAlpnResponder (serve.server): how the board answers on its TLS port.

    def challenge_context(self, hello: ClientHello) -> ssl.SSLContext | None:
        """The challenge certificate's context when `hello` is a CA validating a pending
        tls-alpn-01 challenge (it offers acme-tls/1 for the challenge's name); else None."""
        if not wants_challenge(hello):
            return None
        return self.tls_alpn_context(hello.sni)

    async def answer_challenge(
        self, stream: TcpStream, peeked: bytes, context: ssl.SSLContext
    ) -> str:
        """`answer_tls_alpn`: the validation handshake, then the close; how it ended (logged
        once per challenge and outcome, with the challenge's name)."""
        how = await answer_tls_alpn(stream, peeked, context)
        challenge = next((c for c, ctx in self._seen.values() if ctx is context), None)
        if challenge is not None:
            self._note(challenge, how)
        return how

    def http01_answer(self, token: str) -> bytes | None:
        answer = self._http.get(token)
        if answer is not None:
            challenge = next(
                (c for c, _ in self._seen.values() if c.kind == "http-01" and c.token == token),
                None,
            )
            if challenge is not None:
                self._note(challenge, "answered")
        return answer

    def _note(self, challenge: Challenge, how: str) -> None:
        """One info line per challenge and outcome, naming it; repeats at debug level."""
        seen = (challenge.file_name(), how)
        level = logging.DEBUG if seen in self._logged else logging.INFO
        self._logged.add(seen)
        log.log(
            level,
            "acme: %s challenge for %s: %s%s",
            challenge.kind,
            challenge.name,
            how,
            "" if level == logging.DEBUG else " (further validations of it: debug level)",
        )

    def refresh(self, now: datetime | None = None) -> None:
        now = now or datetime.now(UTC)
        found: dict[str, tuple[Challenge, ssl.SSLContext | None]] = {}
        for challenge in read_published(self.folder, now):
            name = challenge.file_name()
            known = self._seen.get(name)
            if known is not None and known[0] == challenge:
                found[name] = known
            elif challenge.kind == "tls-alpn-01":
                found[name] = (challenge, challenge_context(challenge))
            else:
                found[name] = (challenge, None)
        self._seen = found
        self._logged = {seen for seen in self._logged if seen[0] in found}
        self._tls = {c.name: ctx for c, ctx in found.values() if ctx is not None}
        self._http = {
            c.token: c.key_authorization.encode("ascii")
            for c, _ in found.values()
            if c.kind == "http-01"
        }

    async def watch(self, interval: float) -> None:
        """Refresh every `interval` seconds, forever."""
        while True:
            await self.refresh_async()
            await trio.sleep(interval)

    async def refresh_async(self) -> None:
        try:
            await trio.to_thread.run_sync(self.refresh)
        except OSError as exc:
            log.error("acme: cannot read the challenge folder %s: %s", self.folder, exc)


def read_published(folder: Path, now: datetime) -> list[Challenge]:
    """The challenges published in `folder` and not yet stale; unreadable files are skipped."""
    out: list[Challenge] = []
    try:
        entries = list(folder.glob("*.json"))
    except OSError:
        return out
    for path in entries:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            published = datetime.fromisoformat(data["published"])
            challenge = Challenge(
                kind="http-01" if data["type"] == "http-01" else "tls-alpn-01",
                name=normalize_host(str(data["name"])),
                token=str(data["token"]),
                key_authorization=str(data["key_authorization"]),
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being written or removed right now, or not ours
        if now - published <= CHALLENGE_MAX_AGE:
            out.append(challenge)
    return out


def publish(folder: Path, challenges: Sequence[Challenge], now: datetime) -> list[Path]:
    """Write one file per challenge (atomically, mode 0600); stale leftovers are removed."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    for old in folder.glob("*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            published = datetime.fromisoformat(json.loads(old.read_text())["published"])
            if now - published > CHALLENGE_MAX_AGE:
                old.unlink()
    paths = []
    for challenge in challenges:
        body = {
            "type": challenge.kind,
            "name": challenge.name,
            "token": challenge.token,
            "key_authorization": challenge.key_authorization,
            "published": now.isoformat(),
        }
        path = folder / challenge.file_name()
        write_atomically(path, json.dumps(body).encode(), mode=0o600)
        paths.append(path)
    return paths


def withdraw(paths: Sequence[Path]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# --- probing our own answer --------------------------------------------------------------


def probe_address(address: ListenAddress) -> tuple[str, int]:
    """Where to connect to reach a listener bound to `address` from this machine."""
    host = address.host
    if host in ("", "0.0.0.0"):  # noqa: S104 - we connect to it, we do not bind it
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, address.port


def probe_tls_alpn(host: str, port: int, challenge: Challenge) -> bool:
    """Blocking: whether `host:port` presents this challenge's certificate over acme-tls/1."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the challenge certificate is self-signed by design
    context.set_alpn_protocols([ACME_TLS_ALPN.decode()])
    try:
        with (
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT) as raw,
            context.wrap_socket(raw, server_hostname=challenge.name) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
            if der is None or tls.selected_alpn_protocol() != ACME_TLS_ALPN.decode():
                return False
    except (OSError, ssl.SSLError):
        return False
    cert = x509.load_der_x509_certificate(der)
    try:
        value = cert.extensions.get_extension_for_oid(ID_PE_ACME_IDENTIFIER).value
    except x509.ExtensionNotFound:
        return False
    return isinstance(value, x509.UnrecognizedExtension) and value.value == (
        b"\x04\x20" + challenge.digest
    )


def probe_http01(host: str, port: int, challenge: Challenge) -> bool:
    """Blocking: whether `host:port` answers this challenge's http-01 request."""
    request = (
        f"GET {HTTP01_PREFIX}{challenge.token} HTTP/1.1\r\nHost: {challenge.name}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT) as sock:
            sock.sendall(request)
            response = b""
            while len(response) < MAX_HTTP_HEAD and (chunk := sock.recv(4096)):
                response += chunk
    except OSError:
        return False
    head, _, body = response.partition(b"\r\n\r\n")
    return head.startswith(b"HTTP/1.1 200 ") and body == challenge.key_authorization.encode()


async def wait_until_served(
    challenges: Sequence[Challenge],
    tls_address: ListenAddress,
    http_address: ListenAddress | None,
    within: float,
) -> None:
    """Return once every challenge is answered through the listener the CA will reach;
    ChallengeError when that does not happen within `within` seconds."""
    for challenge in challenges:
        if challenge.kind == "tls-alpn-01":
            host, port = probe_address(tls_address)
            probe, where = probe_tls_alpn, f"listen.address {tls_address}"
        else:
            assert http_address is not None
            host, port = probe_address(http_address)
            probe, where = probe_http01, f"acme.http_listen {http_address}"
        with trio.move_on_after(within):
            # Polling: the answer appears in another process (a serve's folder poll).
            while not await trio.to_thread.run_sync(probe, host, port, challenge):  # noqa: ASYNC110
                await trio.sleep(PROBE_INTERVAL)
            continue
        raise ChallengeError(
            f"the {challenge.kind} challenge for {challenge.name} is not answered on {where}"
            f" within {within:g} s: the process holding that port is not a `dualproxy serve`"
            " with this [acme] config (it answers challenges published in"
            " the challenge folder). Stop it, or run the command where serve runs"
        )


# --- listeners of our own (no `serve` running) ---------------------------------------------


async def serve_http(
    listener: socket.socket,
    board: ChallengeBoard,
    https_port: int | None,
    proxy: ListenConfig | None = None,
) -> None:
    """The plain-HTTP listener: http-01 answers, a redirect to https for everything else.
    `proxy`: the [listen] settings whose PROXY protocol rule this listener follows too (the
    balancer that fronts the TLS port fronts this one)."""
    await _accept_forever(
        listener, lambda sock, address: _http_connection(sock, address, board, https_port, proxy)
    )


async def _accept_forever(
    listener: socket.socket, handle: Callable[[socket.socket, object], Awaitable[None]]
) -> None:
    """The server's accept loop (serve.listeners.accept_loop) into per-connection tasks, at
    most RESPONDER_MAX_CONNECTIONS at once (beyond it clients wait in the backlog); each task
    closes its socket."""
    slots = trio.CapacityLimiter(RESPONDER_MAX_CONNECTIONS)

    async def run(sock: socket.socket, address: object, token: object) -> None:
        try:
            await handle(sock, address)
        finally:
            slots.release_on_behalf_of(token)

    async with trio.open_nursery() as nursery:
        await accept_loop(listener, slots, nursery, run)


async def _http_connection(
    sock: socket.socket,
    address: object,
    board: ChallengeBoard,
    https_port: int | None,
    proxy: ListenConfig | None,
) -> None:
    stream = TcpStream(sock)
    try:
        with trio.move_on_after(RESPONDER_TIMEOUT):
            received = b""
            if proxy is not None and proxy.proxy_protocol != "off":
                record = ConnectionRecord(peer="-")
                record.peer, record.peer_ip = peer_address(address)
                expect = expectation(
                    proxy.proxy_protocol, proxy.proxy_protocol_from, record.peer_ip
                )
                after = await receive_proxy_header(stream, expect, record)
                if after is None:
                    if record.outcome is Outcome.PROXY_REFUSED:
                        log.info(
                            "http-01 listener: closed a connection from %s: %s",
                            record.peer,
                            record.detail,
                        )
                    return
                received = after
            connection = Connection(stream, max_head=MAX_HTTP_HEAD, received=received)
            try:
                request = await connection.receive_request()  # its body is never read
            except HttpRefusal:
                answer = _BAD_REQUEST
            else:
                if request is None:  # closed before a request
                    return
                answer = http_answer(request, board, https_port)
            await connection.send_answer(answer)
        await discard_until_closed(
            stream,
            total=HTTP_LINGER_TIME,
            idle=HTTP_LINGER_TIME,
            max_bytes=HTTP_LINGER_BYTES,
            receive_size=MAX_HTTP_HEAD,
        )
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        stream.close()


_BAD_REQUEST: Final = Answer(400, b"bad request\n")


def http_answer(request: Request, board: ChallengeBoard, https_port: int | None) -> Answer:
    """What the plain-HTTP listener answers `request` with."""
    target = request.target.decode("ascii", "replace")
    if target.startswith(HTTP01_PREFIX) and request.method in (b"GET", b"HEAD"):
        answer = board.http01_answer(target[len(HTTP01_PREFIX) :])
        if answer is not None:
            return Answer(200, answer, content_type=b"application/octet-stream")
        return Answer(404, b"no such challenge\n", content_type=b"text/plain")
    host = _host_of(request)
    if host is None or https_port is None:
        return Answer(400, b"this port redirects to https; send a Host header\n")
    authority = host if https_port == 443 else f"{host}:{https_port}"
    location = f"https://{authority}{target if target.startswith('/') else '/'}"
    # 308 keeps the method and body (RFC 9110 15.4.9); for GET and HEAD 301 is the same and
    # understood by every client.
    status = 301 if request.method in (b"GET", b"HEAD") else 308
    return Answer(status, headers=((b"location", location.encode("ascii")),))


def _host_of(request: Request) -> str | None:
    """The Host header's name, without its port, when it is a plausible host name."""
    for name, value in request.headers:
        if name == b"host":
            text = value.decode("ascii", "replace")
            if text.startswith("["):
                host = text.split("]", 1)[0] + "]"
            else:
                host = text.rsplit(":", 1)[0] if text.count(":") == 1 else text
            ok = host and all(c.isalnum() or c in ".-[]:" for c in host)
            return host.lower() if ok else None
    return None


async def serve_tls_alpn_only(listener: socket.socket, board: ChallengeBoard) -> None:
    """A TLS listener that answers acme-tls/1 challenges and closes everything else (what
    the CLI runs on the TLS port while no `serve` holds it)."""
    await _accept_forever(listener, lambda sock, _address: _tls_alpn_connection(sock, board))


async def _tls_alpn_connection(sock: socket.socket, board: ChallengeBoard) -> None:
    stream = TcpStream(sock)
    try:
        with trio.move_on_after(RESPONDER_TIMEOUT):
            buffer = bytearray()
            while len(buffer) < MAX_CLIENT_HELLO_BYTES:
                chunk = await stream.receive_some(MAX_CLIENT_HELLO_BYTES - len(buffer))
                if not chunk:
                    return
                buffer += chunk
                try:
                    hello = parse_client_hello(bytes(buffer))
                except ClientHelloError:
                    return
                if hello is None:
                    continue
                context = board.challenge_context(hello)
                if context is not None:
                    await board.answer_challenge(stream, bytes(buffer), context)
                return
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        stream.close()


@contextlib.asynccontextmanager
async def open_responders(
    kind: ChallengeType,
    tls_addresses: Sequence[ListenAddress],
    http_address: ListenAddress | None,
    board: ChallengeBoard,
) -> AsyncIterator[bool]:
    """Answer `kind` challenges on the configured addresses for the duration of the block,
    if we can bind them. Yields False when they are taken (a `serve` holds them, which then
    answers from the same folder: `wait_until_served` tells)."""
    addresses = list(tls_addresses) if kind == "tls-alpn-01" else [http_address]
    listeners: list[socket.socket] | None = None
    try:
        listeners = await open_listeners([a for a in addresses if a is not None], False)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
    if listeners is None:
        yield False
        return
    try:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                if kind == "tls-alpn-01":
                    nursery.start_soon(serve_tls_alpn_only, listener, board)
                else:
                    nursery.start_soon(serve_http, listener, board, None)
            yield True
            nursery.cancel_scope.cancel()
    finally:
        for listener in listeners:
            listener.close()
