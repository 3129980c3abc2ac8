"""`dualproxy dev`, the pinning test bench, run as a developer runs it: the installed command
in its own process, its banner read from stdout, and the curl commands it prints run exactly
as printed.

Each bench listens on 127.0.0.1:0: the kernel picks a free port (no race with other tests
for a port picked in advance) and the banner must then report the port actually bound.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest
from conftest import CLIENT_TIMEOUT, read_until
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from dualproxy import cli, pins
from dualproxy.dev import HINT_SNI

# Starting takes a Python interpreter, imports and, the first time, key generation; generous
# so a loaded 2-core CI box never flakes. Bounds, not expectations: nothing asserts a duration.
START_TIMEOUT: Final = 60.0
STOP_TIMEOUT: Final = 30.0
BANNER_END: Final = b"Ctrl-C stops."
# curl's exit code for CURLE_SSL_PINNEDPUBKEYNOTMATCH (see `man curl`, EXIT CODES).
CURL_EXIT_PIN_MISMATCH: Final = 90


@dataclass
class Bench:
    process: subprocess.Popen[bytes]
    banner: str
    stderr_file: Path

    def stop(self) -> tuple[int, str, str]:
        """Ctrl-C, as a developer stops it: exit code, the rest of stdout, all of stderr."""
        self.process.send_signal(signal.SIGINT)
        out, _ = self.process.communicate(timeout=STOP_TIMEOUT)
        return self.process.returncode, out.decode(), self.stderr_file.read_text()

    def pin(self, role: str) -> str:
        match = re.search(rf"^  {role} pin +sha256/(\S+)$", self.banner, re.MULTILINE)
        assert match is not None, self.banner
        return match.group(1)

    def commands(self) -> dict[str, str]:
        """The curl command under each "# (x)" comment, as printed."""
        lines = self.banner.splitlines()
        found = {}
        for comment, command in itertools.pairwise(lines):
            label = re.match(r"\s*# \(([a-z])\)", comment)
            if label:
                found[label.group(1)] = command.strip()
        return found


def dualproxy_script() -> Path:
    script = Path(sys.executable).parent / "dualproxy"
    assert script.is_file(), f"install the package into {sys.prefix} (pip install -e .)"
    return script


@contextmanager
def bench(folder: Path, log_dir: Path, *options: str) -> Iterator[Bench]:
    """A running `dualproxy dev --dir folder`; killed on the way out whatever happened."""
    stderr_file = log_dir / f"dev-stderr-{time.monotonic_ns()}.log"
    argv = [str(dualproxy_script()), "dev", "--dir", str(folder), "--listen", "127.0.0.1:0"]
    argv += options
    # stderr (the connection log) goes to a file: a pipe nobody reads could fill and stall it.
    with stderr_file.open("wb") as stderr:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr)
    try:
        assert process.stdout is not None
        banner = read_until(process.stdout, BANNER_END, timeout=START_TIMEOUT).decode()
        yield Bench(process, banner, stderr_file)
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=STOP_TIMEOUT)
        print(f"dualproxy dev stderr:\n{stderr_file.read_text()}")  # shown when a test fails


def run_printed(command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        shlex.split(command), capture_output=True, text=True, timeout=CLIENT_TIMEOUT, check=False
    )


def headers(response: str) -> dict[str, str]:
    """The header fields of `curl -i` output (text mode: line ends already normalized)."""
    lines = response.splitlines()
    assert lines, "no response"
    head = lines[1 : lines.index("")] if "" in lines else lines[1:]
    fields = (line.split(":", 1) for line in head)
    return {name.strip().lower(): value.strip() for name, value in fields}


def key_pin(path: Path) -> str:
    key = serialization.load_pem_private_key(path.read_bytes(), None)
    return pins.spki_pin(key.public_key())


@pytest.mark.e2e
def test_the_printed_commands_work_as_printed(tmp_path: Path) -> None:
    folder = tmp_path / "dev"
    with bench(folder, tmp_path) as running:
        port_match = re.search(r"^  listening   127\.0\.0\.1:(\d+)$", running.banner, re.M)
        assert port_match is not None, running.banner
        port = int(port_match.group(1))
        assert port != 0
        assert f"dev CA      {folder / 'ca.pem'}" in running.banner
        old, new = running.pin("old"), running.pin("new")
        assert old == key_pin(folder / "old" / "key.pem")
        assert new == key_pin(folder / "new" / "key.pem")
        assert f'"sha256/{old}"' in running.banner  # the OkHttp snippet pins both
        assert f'"sha256/{new}"' in running.banner

        commands = running.commands()
        assert sorted(commands) == ["a", "b", "c"]
        for command in commands.values():
            assert f":{port}/" in command
            assert shlex.split(command)[0] == "curl"

        current = run_printed(commands["a"])  # (a) the current pin works
        assert current.returncode == 0, current.stderr
        assert headers(current.stdout)["x-dualproxy-key"] == "old"
        assert headers(current.stdout)["x-dualproxy-reason"] == "default"

        unpinned = run_printed(commands["b"])  # (b) a key the app does not pin is refused
        assert unpinned.returncode == CURL_EXIT_PIN_MISMATCH, unpinned.stderr
        assert unpinned.stdout == ""

        both = run_printed(commands["c"])  # (c) pins old and new, gets new: still works
        assert both.returncode == 0, both.stderr
        assert headers(both.stdout)["x-dualproxy-key"] == "new"
        assert headers(both.stdout)["x-dualproxy-reason"] == "hint-sni"
        assert HINT_SNI in commands["c"]

        code, out, err = running.stop()
    assert code == 0, err
    assert "Traceback" not in err
    assert "stopped" in out
    assert "reason=hint-sni" in err  # the connection log saw the hinted connection


@pytest.mark.e2e
def test_material_persists_and_reset_replaces_only_it(tmp_path: Path) -> None:
    folder = tmp_path / "dev"
    folder.mkdir()
    unrelated = folder / "notes.txt"
    unrelated.write_text("not the bench's")

    def start_and_stop(*options: str) -> tuple[bytes, str, str]:
        with bench(folder, tmp_path, *options) as running:
            material = (folder / "ca.pem").read_bytes(), running.pin("old"), running.pin("new")
            code, _, err = running.stop()
        assert code == 0, err
        assert "Traceback" not in err
        return material

    first = start_and_stop()
    assert start_and_stop() == first  # same CA (a device that trusts it keeps working), same keys
    chain = (folder / "old" / "chain.pem").read_bytes()
    # A new name (a LAN address a phone can reach) re-issues the certificates on the same keys.
    assert start_and_stop("--name", "192.0.2.10") == first
    assert (folder / "old" / "chain.pem").read_bytes() != chain
    cert = x509.load_pem_x509_certificate((folder / "old" / "chain.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("192.0.2.10") in sans.get_values_for_type(x509.IPAddress)
    ca, old, new = start_and_stop("--reset")
    assert ca != first[0]
    assert old != first[1]
    assert new != first[2]
    assert unrelated.read_text() == "not the bench's"


@pytest.mark.e2e
def test_sigint_stops_cleanly(tmp_path: Path) -> None:
    with bench(tmp_path / "dev", tmp_path) as running:
        code, out, err = running.stop()
    assert code == 0
    assert out.strip() == "stopped"
    assert "Traceback" not in err
    assert "KeyboardInterrupt" not in err


def test_a_bad_listen_address_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["dev", "--dir", str(tmp_path / "dev"), "--listen", "localhost"])
    assert code == cli.EXIT_USAGE
    assert capsys.readouterr().err.startswith("error: --listen: 'localhost' is not HOST:PORT")


def test_a_port_in_use_fails_with_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = cli.main(["dev", "--dir", str(tmp_path / "dev"), "--listen", f"127.0.0.1:{port}"])
    assert code == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err
    assert "Traceback" not in err
