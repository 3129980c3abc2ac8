"""Real clients: Python ssl in a worker thread, curl and openssl as subprocesses."""

from __future__ import annotations

import socket
import ssl
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
import trio
from cryptography import x509

from dualproxy.tls.pins import spki_pin_of_certificate

# Every client call in tests is bounded; generous so a loaded 2-core CI box never flakes.
CLIENT_TIMEOUT = 20.0


def strict_eof(context: ssl.SSLContext) -> ssl.SSLContext:
    """`context`, with a peer's close without close_notify reported as an error (OpenSSL 3's
    default) whatever the interpreter: older CPython 3.10 and 3.11 releases, Debian 12's 3.11.2
    among them, turn that off on every new context, and a test that tells a cut from a clean
    end would then see none."""
    context.options &= ~ssl.OP_IGNORE_UNEXPECTED_EOF
    return context


@dataclass(frozen=True)
class TLSResult:
    pin: str  # SPKI pin of the leaf the server presented
    alpn: str | None
    version: str | None
    response: bytes  # the raw HTTP response to one GET (b"" when not requested)


def tls_get(
    host: str,
    port: int,
    *,
    cafile: Path | str,
    server_name: str = "api.example.com",
    alpn: Sequence[str] | None = None,
    source: str | None = None,
    context: ssl.SSLContext | None = None,
    request: bool = True,
) -> TLSResult:
    """Blocking Python ssl client: handshake, note the leaf's pin, optionally GET /."""
    ctx = context or ssl.create_default_context(cafile=str(cafile))
    if alpn is not None:
        ctx.set_alpn_protocols(list(alpn))
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as raw:
        raw.settimeout(CLIENT_TIMEOUT)
        if source is not None:
            raw.bind((source, 0))
        raw.connect((host, port))
        with ctx.wrap_socket(raw, server_hostname=server_name) as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            pin = spki_pin_of_certificate(x509.load_der_x509_certificate(der))
            response = b""
            if request:
                tls.sendall(
                    f"GET / HTTP/1.1\r\nHost: {server_name}\r\nConnection: close\r\n\r\n".encode()
                )
                while chunk := tls.recv(65536):
                    response += chunk
            return TLSResult(pin, tls.selected_alpn_protocol(), tls.version(), response)


class Resuming:
    """A client that offers its last session (its ticket) on every new connection: whether a
    server, or another replica of it, resumes what one issued."""

    def __init__(self, cafile: Path, version: ssl.TLSVersion | None = None) -> None:
        self.context = ssl.create_default_context(cafile=str(cafile))
        if version is not None:
            self.context.minimum_version = self.context.maximum_version = version
        self.session: ssl.SSLSession | None = None

    async def connect(self, port: int) -> bool:
        """One GET on a new connection; whether it resumed."""
        return await trio.to_thread.run_sync(self.connect_blocking, port)

    def connect_blocking(self, port: int, source: str | None = None) -> bool:
        """`connect`, blocking; from the local address `source` when given."""
        with (
            socket.create_connection(
                ("127.0.0.1", port),
                CLIENT_TIMEOUT,
                source_address=(source, 0) if source is not None else None,
            ) as raw,
            self.context.wrap_socket(
                raw, server_hostname="api.example.com", session=self.session
            ) as tls,
        ):
            tls.sendall(b"GET / HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n")
            while tls.recv(65536):  # the response, and the tickets sent before it
                pass
            self.session = tls.session
            return bool(tls.session_reused)


async def tls_get_async(host: str, port: int, **kwargs: Any) -> TLSResult:
    """tls_get in a worker thread, so the in-process server keeps running."""
    return await trio.to_thread.run_sync(lambda: tls_get(host, port, **kwargs))


async def run_client(
    argv: Sequence[str], *, timeout: float = CLIENT_TIMEOUT, stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    """Run curl/openssl without blocking the event loop; output captured, never raises on exit."""
    with trio.fail_after(timeout):
        result = await trio.run_process(
            list(argv), stdin=stdin, capture_stdout=True, capture_stderr=True, check=False
        )
    return result


def curl_pinned(
    port: int,
    *,
    cafile: Path,
    pin: str,
    server_name: str = "api.example.com",
    host: str = "127.0.0.1",
) -> list[str]:
    """curl GET with --pinnedpubkey, resolving `server_name` to the test server."""
    return [
        "curl",
        "-sS",
        "--max-time",
        str(CLIENT_TIMEOUT),
        "--cacert",
        str(cafile),
        "--pinnedpubkey",
        f"sha256//{pin}",
        "--resolve",
        f"{server_name}:{port}:{host}",
        f"https://{server_name}:{port}/",
    ]


# --- the `dualproxy` command as a process: `dualproxy dev`, `dualproxy serve` -------------------


def read_until(stream: IO[bytes], marker: bytes, *, timeout: float) -> bytes:
    """What a subprocess writes to its `stream` pipe, up to the first chunk completing `marker`.

    Fails the test when the pipe closes first (the process exited) or `timeout` seconds pass;
    the caller still owns the process (kill it in a `finally`).
    """
    import os
    import selectors
    import time

    fd = stream.fileno()
    data = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while marker not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"{marker!r} not written within {timeout} s; got {data!r}")
            if not selector.select(remaining):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                pytest.fail(f"the pipe closed (process exited?) before {marker!r}: {data!r}")
            data += chunk
    return data


def ipv6_loopback() -> bool:
    """Whether this machine can bind ::1 (some containers have no IPv6 loopback)."""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True
