"""Socket activation (serve.activation): `dualproxy serve` serves the listening sockets systemd
passes, and since they outlive the process, a restart refuses no connection. The activation
itself is tests/helpers/activate.py (systemd's protocol, sd_listen_fds(3)); the server is the
real `dualproxy serve` process."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

import pytest
import trustme
from helpers import activate
from helpers.clients import CLIENT_TIMEOUT, read_until, tls_get
from helpers.configs import write_config
from helpers.keys import KeyFiles, make_key

from dualproxy.config.errors import OperatorError
from dualproxy.serve.activation import inherited_listeners

ACTIVATE: Final = activate.__file__
SERVE: Final = (sys.executable, "-m", "dualproxy", "serve")
# The config's own address: with socket activation it is not where the server listens.
UNUSED_ADDRESS: Final = "127.0.0.1:1"


@pytest.fixture
def key(ca: trustme.CA, tmp_path: Path) -> KeyFiles:
    return make_key(ca, tmp_path, "k1")


@pytest.fixture
def config_file(key: KeyFiles, tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    write_config(path, [key], listen=UNUSED_ADDRESS)
    return path


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """The listening socket systemd's .socket unit would hold: it outlives every process."""
    sock = socket.create_server(("127.0.0.1", 0), backlog=64)
    yield sock
    sock.close()


@contextmanager
def activated(config_file: Path, *fds: str) -> Iterator[subprocess.Popen[bytes]]:
    """`dualproxy serve` started with `fds` (descriptors of this process, "FD" or "FD=NAME")
    as its activated sockets; stopped with SIGTERM at the end of the block."""
    fd_numbers = [int(spec.partition("=")[0]) for spec in fds]
    process = subprocess.Popen(
        [sys.executable, ACTIVATE, *fds, "--", *SERVE, "-c", str(config_file)],
        pass_fds=fd_numbers,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(CLIENT_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        assert process.stderr is not None
        process.stderr.close()


def get(port: int, cafile: Path) -> bytes:
    return tls_get("127.0.0.1", port, cafile=cafile).response.split(b"\r\n", 1)[0]


def test_serve_uses_the_sockets_systemd_passes(
    config_file: Path, listener: socket.socket, cafile: Path
) -> None:
    port = listener.getsockname()[1]
    with activated(config_file, f"{listener.fileno()}=https") as process:
        assert process.stderr is not None
        logged = read_until(process.stderr, b"listening on", timeout=CLIENT_TIMEOUT)
        assert b"socket activation: serving the 1 socket(s) systemd passed" in logged
        assert get(port, cafile) == b"HTTP/1.1 200 OK"
    assert process.returncode == 0


def test_a_restart_refuses_no_connection(
    config_file: Path, listener: socket.socket, cafile: Path
) -> None:
    """Between one process's exit and the next one's start, clients connect all the same (the
    kernel queues them on the socket systemd holds) and the next process serves them."""
    port = listener.getsockname()[1]
    with activated(config_file, str(listener.fileno())) as first:
        assert first.stderr is not None
        read_until(first.stderr, b"listening on", timeout=CLIENT_TIMEOUT)
        assert get(port, cafile) == b"HTTP/1.1 200 OK"
        first.send_signal(signal.SIGTERM)
        assert first.wait(CLIENT_TIMEOUT) == 0
    # No process serves now: these clients connect (no refusal) and wait in the backlog.
    waiting = [socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT)]
    waiting += [socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT)]
    try:
        with activated(config_file, str(listener.fileno())) as second:
            assert second.stderr is not None
            read_until(second.stderr, b"listening on", timeout=CLIENT_TIMEOUT)
            for raw in waiting:
                context = ssl.create_default_context(cafile=str(cafile))
                with context.wrap_socket(raw, server_hostname="api.example.com") as tls:
                    tls.sendall(
                        b"GET / HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n"
                    )
                    assert tls.recv(65536).startswith(b"HTTP/1.1 200 OK")
    finally:
        for raw in waiting:
            raw.close()


def test_without_activation_a_stopped_server_refuses(
    key: KeyFiles, tmp_path: Path, cafile: Path
) -> None:
    """The negative twin: a process that opened its own socket takes it along when it exits."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config_file = tmp_path / "own.toml"
    write_config(config_file, [key], listen=f"127.0.0.1:{port}")
    with activated(config_file) as process:  # no descriptor: no activation
        assert process.stderr is not None
        read_until(process.stderr, b"listening on", timeout=CLIENT_TIMEOUT)
        assert get(port, cafile) == b"HTTP/1.1 200 OK"
        process.send_signal(signal.SIGTERM)
        assert process.wait(CLIENT_TIMEOUT) == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT)


@pytest.mark.parametrize(
    ("kind", "message"),
    [("udp", b"is not a TCP socket"), ("connected", b"is not listening")],
)
def test_a_descriptor_that_is_no_listening_tcp_socket_stops_the_start(
    config_file: Path, kind: str, message: bytes
) -> None:
    kind_of = socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM
    with (
        socket.socket(socket.AF_INET, kind_of) as sock,
        activated(config_file, str(sock.fileno())) as process,
    ):
        assert process.wait(CLIENT_TIMEOUT) == 1
        assert process.stderr is not None
        error = process.stderr.read()
    assert message in error
    assert b"socket activation: descriptor 3" in error


def test_variables_meant_for_another_process_are_ignored_and_removed() -> None:
    environ = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "https", "PATH": "/bin"}
    assert inherited_listeners(environ, pid=os.getpid()) is None
    assert environ == {"PATH": "/bin"}  # a child we start must not take them either
    assert inherited_listeners({}, pid=os.getpid()) is None
    assert inherited_listeners({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}) is None


@pytest.mark.parametrize(
    ("count", "names", "message"),
    [("x", None, "is not a number"), ("-1", None, "is not a number"), ("2", "a", "names 1")],
)
def test_malformed_variables_are_the_unit_s_mistake(
    count: str, names: str | None, message: str
) -> None:
    environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": count}
    if names is not None:
        environ["LISTEN_FDNAMES"] = names
    with pytest.raises(OperatorError) as error:
        inherited_listeners(environ)
    assert message in str(error.value)
    assert ".socket unit" in str(error.value)
