"""Shared test material: a trustme CA, key/chain files made at test time, a running server,
and real clients (Python ssl in a worker thread, curl and openssl as subprocesses).

Nothing here is committed key material: every key and certificate is generated per test.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, Final

import pytest
import trio
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from dualproxy import config as config_mod
from dualproxy.config import Config, Rotation
from dualproxy.dev import issue_certificate
from dualproxy.pins import spki_pin_of_certificate
from dualproxy.server import Server

# The rotation window the tests share: keys k2026a (old) and k2026b (new), from the first of
# December 2026 to the 15th of January 2027.
GRACE_START: Final = datetime(2026, 12, 1, tzinfo=UTC)
GRACE_END: Final = datetime(2027, 1, 15, tzinfo=UTC)


def grace_window(**changes: Any) -> Rotation:
    """That window as a Rotation, with `changes` to its other settings."""
    return Rotation(
        old=("k2026a",), new=("k2026b",), grace_start=GRACE_START, grace_end=GRACE_END, **changes
    )


# Every client call in tests is bounded; generous so a loaded 2-core CI box never flakes.
CLIENT_TIMEOUT = 20.0
NAMES = ("api.example.com", "k2.api.example.com", "api-legacy.example.com", "localhost")


def strict_eof(context: ssl.SSLContext) -> ssl.SSLContext:
    """`context`, with a peer's close without close_notify reported as an error (OpenSSL 3's
    default) whatever the interpreter: older CPython 3.10 and 3.11 releases, Debian 12's 3.11.2
    among them, turn that off on every new context, and a test that tells a cut from a clean
    end would then see none."""
    context.options &= ~ssl.OP_IGNORE_UNEXPECTED_EOF
    return context


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def cafile(ca: trustme.CA, tmp_path: Path) -> Path:
    """The test CA's certificate as a file, for clients' --cacert."""
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@dataclass(frozen=True)
class KeyFiles:
    name: str
    key: Path
    chain: Path
    pin: str

    def table(self) -> dict[str, str]:
        """The [keys.NAME] table for config.parse."""
        return {"key": str(self.key), "chain": str(self.chain)}


def make_key(
    ca: trustme.CA,
    folder: Path,
    name: str,
    *,
    key_type: trustme.KeyType = trustme.KeyType.ECDSA,
    names: Sequence[str] = NAMES,
) -> KeyFiles:
    """A key (mode 0600) and its chain from `ca`, in folder/name/."""
    leaf = ca.issue_cert(*names, key_type=key_type)
    directory = folder / name
    directory.mkdir(parents=True, exist_ok=True)
    key_file, chain_file = directory / "key.pem", directory / "chain.pem"
    leaf.private_key_pem.write_to_path(str(key_file))
    key_file.chmod(0o600)
    chain_file.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    return KeyFiles(name, key_file, chain_file, spki_pin_of_certificate(cert))


def reissue(
    ca: trustme.CA,
    key: KeyFiles,
    *,
    names: Sequence[str] = NAMES,
    lifetime: timedelta = timedelta(days=90),
) -> bytes:
    """A renewal: a new certificate for the *same* key, as PEM (the caller writes it)."""
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    private = serialization.load_pem_private_key(key.key.read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    assert isinstance(private, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    now = datetime.now(UTC)
    cert = issue_certificate(
        ca_cert,
        ca_key,
        private.public_key(),
        names,
        not_before=now - timedelta(minutes=5),
        not_after=now + lifetime,
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def make_config(
    keys: Sequence[KeyFiles],
    *,
    rotation: dict[str, Any] | None = None,
    base_dir: Path,
    listen: str = "127.0.0.1:0",
    extra: dict[str, Any] | None = None,
) -> Config:
    data: dict[str, Any] = {
        "listen": {"address": listen},
        "keys": {k.name: k.table() for k in keys},
        **(extra or {}),
    }
    if rotation is not None:
        data["rotation"] = rotation
    return config_mod.parse(data, base_dir=base_dir)


class Clock:
    """A settable wall clock for the policy (trio's own clock is separate)."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Running:
    server: Server
    host: str
    port: int
    records: list[str] = field(default_factory=list)


@asynccontextmanager
async def serving(
    config: Config, *, clock: Callable[[], datetime] | None = None, dev_headers: bool = False
) -> AsyncIterator[Running]:
    """A real server on a loopback port for the duration of the block."""
    kwargs: dict[str, Any] = {"handle_signals": False, "dev_headers": dev_headers}
    if clock is not None:
        kwargs["clock"] = clock
    server = Server(config, **kwargs)
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(server.run)
        host, port = bound[0]
        yield Running(server, host, port)
        nursery.cancel_scope.cancel()


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


# --- config files on disk: config reloads, `dualproxy route`, `dualproxy serve` ---------------


def config_toml(data: dict[str, Any]) -> str:
    """`data`, shaped as config.parse takes it, as the text of a config.toml."""
    import json
    import re

    def key(name: str) -> str:
        return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)

    def value(item: object) -> str:
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, datetime):
            return item.isoformat()  # an aware datetime: a TOML offset date-time
        if isinstance(item, int | float):
            return repr(item)
        if isinstance(item, str):
            return json.dumps(item)  # JSON's string escapes are a subset of TOML's
        if isinstance(item, list | tuple):
            return "[" + ", ".join(value(element) for element in item) + "]"
        raise TypeError(f"no TOML form for {item!r}")

    def table(content: dict[str, Any], name: str) -> list[str]:
        lines = [f"[{name}]"] if name else []
        lines += [f"{key(k)} = {value(v)}" for k, v in content.items() if not isinstance(v, dict)]
        for k, v in content.items():
            if isinstance(v, dict):
                lines += ["", *table(v, f"{name}.{key(k)}" if name else key(k))]
        return lines

    return "\n".join(table(data, "")) + "\n"


def write_config(
    path: Path,
    keys: Sequence[KeyFiles],
    *,
    rotation: dict[str, Any] | None = None,
    listen: str = "127.0.0.1:0",
    extra: dict[str, Any] | None = None,
) -> Config:
    """make_config through a real file, read back with config.load as `dualproxy serve` does.

    The file is replaced in one rename, so a polling server never reads half of it.
    """
    data: dict[str, Any] = {
        "listen": {"address": listen},
        "keys": {k.name: k.table() for k in keys},
        **(extra or {}),
    }
    if rotation is not None:
        data["rotation"] = rotation
    partial = path.with_name(path.name + ".partial")
    partial.write_text(config_toml(data), encoding="utf-8")
    partial.replace(path)
    return config_mod.load(path)


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
