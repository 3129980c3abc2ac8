"""`dualproxy dev`, the pinning test bench, run as a developer runs it: the installed command
in its own process, its banner read from stdout, the curl commands it prints run exactly as
printed (through a shell, as pasted), and scenarios switched with `dualproxy dev switch`.

Each bench listens on 127.0.0.1:0 and puts its admin endpoint on 127.0.0.1:0: the kernel picks
free ports (no race with other tests for a port picked in advance), the banner must report the
port actually bound, and `dev switch` must find the admin endpoint through the bench's folder.

What each printed command gets in each scenario is written down here (MATRIX), apart from the
bench's own prediction printed next to it, which the tests hold against it.
"""

from __future__ import annotations

import hashlib
import http.client
import http.server
import ipaddress
import itertools
import json
import os
import re
import select
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NamedTuple

import pytest
import trio
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from helpers.clients import CLIENT_TIMEOUT, ipv6_loopback, read_until, tls_get

from dualproxy.cli import main as cli
from dualproxy.dev import bench as dev
from dualproxy.dev import control as devcontrol
from dualproxy.dev.bench import HINT_SNI, SCENARIOS
from dualproxy.tls import pins

# Starting takes a Python interpreter, imports and, the first time, key generation; generous
# so a loaded 2-core CI box never flakes. Bounds, not expectations: nothing asserts a duration.
START_TIMEOUT: Final = 60.0
STOP_TIMEOUT: Final = 30.0
BANNER_END: Final = b"Ctrl-C stops."
# curl's exit codes (see `man curl`, EXIT CODES): the certificate did not verify, the key is
# not pinned.
CURL_EXIT_VERIFY: Final = 60
CURL_EXIT_PIN: Final = 90
# OpenSSL's verify results (X509_V_ERR_*), as ssl.SSLCertVerificationError.verify_code.
X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY: Final = 20
X509_V_ERR_CERT_HAS_EXPIRED: Final = 10
X509_V_ERR_HOSTNAME_MISMATCH: Final = 62

LABELS: Final = ("both", "old", "new", "hint", "ca")


class Outcome(NamedTuple):
    exit_code: int
    key: str | None  # the key served (for a pin mismatch: the key curl refused)
    reason: str | None  # X-Dualproxy-Reason, when a response came


def _all(outcome: Outcome) -> dict[str, Outcome]:
    return dict.fromkeys(LABELS, outcome)


# What each printed command (by its label) gets, per scenario.
MATRIX: Final[dict[str, dict[str, Outcome]]] = {
    "old-only": {
        **_all(Outcome(0, "old", "before-window")),
        "new": Outcome(CURL_EXIT_PIN, "old", None),
    },
    "grace": {
        **_all(Outcome(0, "old", "default")),
        "new": Outcome(CURL_EXIT_PIN, "old", None),
        "hint": Outcome(0, "new", "hint-sni"),
    },
    "new-only": {
        **_all(Outcome(0, "new", "after-window")),
        "old": Outcome(CURL_EXIT_PIN, "new", None),
    },
    "rogue": {**_all(Outcome(CURL_EXIT_PIN, "rogue", None)), "ca": Outcome(0, "rogue", "single")},
    "expired": _all(Outcome(CURL_EXIT_VERIFY, None, None)),
    "wrong-host": _all(Outcome(CURL_EXIT_VERIFY, None, None)),
    "untrusted": _all(Outcome(CURL_EXIT_VERIFY, None, None)),
}
# Why Python's ssl refuses each broken certificate: the one thing wrong with it.
VERIFY_CODES: Final = {
    "expired": X509_V_ERR_CERT_HAS_EXPIRED,
    "wrong-host": X509_V_ERR_HOSTNAME_MISMATCH,
    "untrusted": X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY,
}


class Printed(NamedTuple):
    expectation: str  # what the bench says the command gets
    command: str


def printed_commands(text: str) -> dict[str, Printed]:
    """Each `# [label] who -> expectation` line with the command on the next line."""
    found = {}
    for comment, command in itertools.pairwise(text.splitlines()):
        match = re.match(r"\s*# \[([a-z]+)\] .* -> (.*)$", comment)
        if match:
            found[match.group(1)] = Printed(match.group(2), command.strip())
    return found


@dataclass
class Bench:
    process: subprocess.Popen[bytes]
    banner: str
    stderr_file: Path
    folder: Path

    def stop(self) -> tuple[int, str, str]:
        """Ctrl-C, as a developer stops it: exit code, the rest of stdout, all of stderr."""
        self.process.send_signal(signal.SIGINT)
        out, _ = self.process.communicate(timeout=STOP_TIMEOUT)
        return self.process.returncode, out.decode(), self.stderr_file.read_text()

    def field(self, pattern: str) -> str:
        match = re.search(pattern, self.banner, re.MULTILINE)
        assert match is not None, f"{pattern!r} not in:\n{self.banner}"
        return match.group(1)

    def pin(self, role: str) -> str:
        return self.field(rf"^  {role} pin +sha256/(\S+)")

    @property
    def port(self) -> int:
        return int(self.field(r"^  URL +https://localhost:(\d+)/"))

    def commands(self) -> dict[str, Printed]:
        return printed_commands(self.banner)


def dualproxy_script() -> Path:
    script = Path(sys.executable).parent / "dualproxy"
    assert script.is_file(), f"install the package into {sys.prefix} (pip install -e .)"
    return script


@contextmanager
def bench(folder: Path, log_dir: Path, *options: str) -> Iterator[Bench]:
    """A running `dualproxy dev --dir folder`; killed on the way out whatever happened."""
    stderr_file = log_dir / f"dev-stderr-{time.monotonic_ns()}.log"
    argv = [str(dualproxy_script()), "dev", "--dir", str(folder), "--listen", "127.0.0.1:0"]
    argv += ["--admin", "127.0.0.1:0", *options]
    # stderr (the connection log) goes to a file: a pipe nobody reads could fill and stall it.
    with stderr_file.open("wb") as stderr:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr)
    try:
        assert process.stdout is not None
        banner = read_until(process.stdout, BANNER_END, timeout=START_TIMEOUT).decode()
        yield Bench(process, banner, stderr_file, folder)
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=STOP_TIMEOUT)
        print(f"dualproxy dev stderr:\n{stderr_file.read_text()}")  # shown when a test fails


def switch(folder: Path, scenario: str) -> subprocess.CompletedProcess[str]:
    """`dualproxy dev switch SCENARIO --dir folder`, as typed in a second terminal."""
    argv = [str(dualproxy_script()), "dev", "switch", scenario, "--dir", str(folder)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=START_TIMEOUT, check=False)


def run_printed(command: str) -> subprocess.CompletedProcess[str]:
    """The command exactly as printed, pasted into a shell."""
    return subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, timeout=CLIENT_TIMEOUT, check=False
    )


class Response(NamedTuple):
    headers: dict[str, str]
    body: str


def response(output: str) -> Response:
    """`curl -i` output (text mode: line ends already normalized): its fields and body. curl
    speaks HTTP/2 when the bench offers it (ALPN h2), HTTP/1.1 when told to."""
    head, _, body = output.partition("\n\n")
    lines = head.splitlines()
    assert lines, "no response"
    assert lines[0].startswith(("HTTP/2 200", "HTTP/1.1 200")), lines[0]
    fields = (line.split(":", 1) for line in lines[1:])
    return Response({name.strip().lower(): value.strip() for name, value in fields}, body)


def echoed(body: str) -> tuple[dict[str, object], dict[str, str]]:
    """The echo upstream's JSON and the header fields it received (lowercased names)."""
    description = json.loads(body)
    assert description["upstream"] == "dualproxy dev echo"
    fields = {name.lower(): value for name, value in description["headers"]}
    return description, fields


def key_pin(path: Path) -> str:
    key = serialization.load_pem_private_key(path.read_bytes(), None)
    return pins.spki_pin(key.public_key())


def served_pin(port: int, server_name: str = "localhost") -> str:
    """The pin of the key the bench presents, without verifying anything."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return tls_get("127.0.0.1", port, cafile="", context=context, server_name=server_name).pin


def check_scenario(running: Bench, scenario: str, text: str) -> None:
    """Run every command printed in `text` and hold the result against MATRIX."""
    commands = printed_commands(text)
    assert sorted(commands) == sorted(LABELS), text
    echo_port = int(running.field(r"^  upstream +built-in echo \(http://127\.0\.0\.1:(\d+)\)"))
    for label, (expectation, command) in commands.items():
        want = MATRIX[scenario][label]
        result = run_printed(command)
        where = f"{scenario} [{label}]: {command}\n{result.stderr}"
        assert result.returncode == want.exit_code, where
        if want.exit_code == 0:
            assert expectation == f"works, served {want.key} ({want.reason})", where
            got = response(result.stdout)
            assert got.headers["x-dualproxy-key"] == want.key, where
            assert got.headers["x-dualproxy-reason"] == want.reason, where
            # The chain app -> dualproxy -> echo upstream, as forwarded.
            description, fields = echoed(got.body)
            host = HINT_SNI if label == "hint" else "localhost"
            assert (description["method"], description["target"]) == ("GET", "/")
            assert fields["host"] == f"127.0.0.1:{echo_port}"  # rewritten to the upstream's
            assert fields["x-forwarded-host"] == f"{host}:{running.port}"
            assert fields["x-forwarded-for"] == "127.0.0.1"
            assert fields["x-forwarded-proto"] == "https"
        else:
            assert expectation.startswith(f"fails: curl exit {want.exit_code}, "), where
            assert result.stdout == "", where  # no response reached the client
        if want.exit_code == CURL_EXIT_PIN:
            assert expectation.endswith(f"pin mismatch ({want.key} served)"), where
    if scenario in VERIFY_CODES:
        # Old's key (the pin matches): only the one thing wrong with the certificate refuses it.
        assert served_pin(running.port) == running.pin("old")
        with pytest.raises(ssl.SSLCertVerificationError) as refused:
            tls_get(
                "127.0.0.1", running.port, cafile=running.folder / "ca.pem", server_name="localhost"
            )
        assert refused.value.verify_code == VERIFY_CODES[scenario]
    elif scenario == "rogue":
        assert served_pin(running.port) == running.pin("rogue")


@pytest.mark.e2e
def test_every_scenario_as_printed_switched_live(tmp_path: Path) -> None:
    folder = tmp_path / "dev"
    with bench(folder, tmp_path) as running:
        assert running.port != 0
        assert f"dev CA      {folder / 'ca.pem'}" in running.banner
        for role in ("old", "new", "rogue"):
            assert running.pin(role) == key_pin(folder / role / "key.pem")
        assert f"xcrun simctl keychain booted add-root-cert {folder / 'ca.pem'}" in running.banner
        assert '<certificates src="user" />' in running.banner  # Android debug-overrides
        assert f"adb reverse tcp:{running.port} tcp:{running.port}" in running.banner
        for snippet in (f'"sha256/{running.pin("old")}"', f'"sha256/{running.pin("new")}"'):
            assert snippet in running.banner  # OkHttp pins both
        for platform in ("OkHttp", "network_security_config", "TrustKit", "NSPinnedDomains"):
            assert platform in running.banner
        assert "scenario    grace:" in running.banner
        check_scenario(running, "grace", running.banner)

        # The ALPN hint, which curl cannot send: Python's ssl can.
        hinted = tls_get(
            "127.0.0.1",
            running.port,
            cafile=folder / "ca.pem",
            server_name="localhost",
            alpn=[dev.HINT_ALPN, "http/1.1"],
        )
        assert hinted.pin == running.pin("new")
        assert b"x-dualproxy-reason: hint-alpn" in hinted.response.lower()

        previous = "grace"
        for scenario in [s for s in SCENARIOS if s != "grace"] + ["grace"]:
            switched = switch(folder, scenario)
            assert switched.returncode == 0, switched.stderr
            assert switched.stdout.startswith(f"switched to {scenario} (was {previous})")
            assert f"scenario    {scenario}: " in switched.stdout
            # The same commands as the banner's, each with what it gets now.
            assert {k: v.command for k, v in printed_commands(switched.stdout).items()} == {
                k: v.command for k, v in running.commands().items()
            }
            check_scenario(running, scenario, switched.stdout)
            previous = scenario

        code, out, err = running.stop()
    assert code == 0, err
    assert "Traceback" not in err
    assert "stopped" in out
    assert "reason=hint-sni" in err  # the connection log saw the hinted connection
    assert "reloaded (scenario rogue: rogue added (pin " in err
    assert "files changed" not in err  # a switch is not mistaken for a change on disk


@pytest.mark.e2e
def test_a_switch_reaches_the_next_connection_while_an_open_one_keeps_its_key(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "dev"
    with bench(folder, tmp_path, "--scenario", "old-only") as running:
        context = ssl.create_default_context(cafile=str(folder / "ca.pem"))
        kept = http.client.HTTPSConnection(
            "127.0.0.1", running.port, timeout=CLIENT_TIMEOUT, context=context
        )

        def get() -> tuple[int, str | None, str | None, str]:
            kept.request("GET", "/kept")
            answer = kept.getresponse()
            assert json.loads(answer.read())["target"] == "/kept"
            assert kept.sock is not None
            der = kept.sock.getpeercert(binary_form=True)
            assert der is not None
            pin = pins.spki_pin_of_certificate(x509.load_der_x509_certificate(der))
            key, reason = (
                answer.getheader("x-dualproxy-key"),
                answer.getheader("x-dualproxy-reason"),
            )
            return answer.status, key, reason, pin

        try:
            assert get() == (200, "old", "before-window", running.pin("old"))
            connection = kept.sock
            switched = switch(folder, "new-only")
            assert switched.returncode == 0, switched.stderr
            assert switched.stdout.startswith("switched to new-only (was old-only)")
            # The next connection gets the new scenario...
            fresh = tls_get(
                "127.0.0.1", running.port, cafile=folder / "ca.pem", server_name="localhost"
            )
            assert fresh.pin == running.pin("new")
            assert b"x-dualproxy-key: new" in fresh.response.lower()
            # ...while the connection already open keeps working, on the key it was served.
            assert get() == (200, "old", "before-window", running.pin("old"))
            assert kept.sock is connection  # the same connection, not a new one
        finally:
            kept.close()
        code, _, err = running.stop()
    assert code == 0, err


@pytest.mark.e2e
def test_options_upstream_new_network_and_ipv6(tmp_path: Path) -> None:
    """--upstream relays to another API (here a first bench's echo: its JSON shows what the
    second bench forwarded); --new-network sends a client network to new during grace; the
    second bench listens on ::1 when the machine has it (its printed commands then say so)."""
    v6 = ipv6_loopback()
    host, network = ("::1", "::1/128") if v6 else ("127.0.0.1", "127.0.0.0/8")
    address = f"[{host}]:0" if v6 else f"{host}:0"
    with bench(tmp_path / "a", tmp_path) as first:
        echo = first.field(r"^  upstream +built-in echo \((http://127\.0\.0\.1:\d+)\)")
        options = ["--upstream", echo, "--new-network", network, "--listen", address]
        options += ["--admin", address]
        with bench(tmp_path / "b", tmp_path, *options) as second:
            assert f"  upstream    {echo}\n" in second.banner
            assert f"clients from {network}" in second.banner
            commands = second.commands()
            bracketed = f"[{host}]" if v6 else host
            assert f"localhost:{second.port}:{bracketed}" in shlex.split(commands["both"].command)
            assert commands["both"].expectation == "works, served new (hint-network)"
            both = run_printed(commands["both"].command)
            assert both.returncode == 0, both.stderr
            got = response(both.stdout)
            assert got.headers["x-dualproxy-key"] == "new"
            _, fields = echoed(got.body)
            assert fields["x-forwarded-host"] == f"localhost:{second.port}"
            assert fields["x-forwarded-for"] == host
            assert commands["old"].expectation == "fails: curl exit 90, pin mismatch (new served)"
            assert run_printed(commands["old"].command).returncode == CURL_EXIT_PIN
            switched = switch(tmp_path / "b", "old-only")  # the admin endpoint on ::1 too
            assert switched.returncode == 0, switched.stderr
            assert second.stop()[0] == 0
        assert first.stop()[0] == 0


@contextmanager
def private_https_upstream(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An HTTPS API whose certificate comes from a CA of its own (as a company's internal
    API): its URL and that CA's file. Answers every GET with 200 "private upstream"."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"private upstream"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    ca = trustme.CA()
    ca_file = tmp_path / "upstream-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", ca_file
    finally:
        server.shutdown()
        server.server_close()
        thread.join(STOP_TIMEOUT)


@pytest.mark.e2e
def test_upstream_ca_trusts_an_api_with_a_private_ca(tmp_path: Path) -> None:
    with private_https_upstream(tmp_path) as (url, ca_file):
        options = ["--upstream", url, "--upstream-ca", str(ca_file)]
        with bench(tmp_path / "dev", tmp_path, *options) as running:
            assert f"  upstream    {url}  (trusting {ca_file} too)\n" in running.banner
            relayed = run_printed(running.commands()["ca"].command)
            assert relayed.returncode == 0, relayed.stderr
            # curl takes HTTP/2 when offered, HTTP/1.1 otherwise: the status is what counts.
            assert relayed.stdout.split(None, 2)[1] == "200", relayed.stdout
            assert relayed.stdout.endswith("private upstream")
            assert running.stop()[0] == 0
        # The twin: without it, the API's certificate does not verify, and the client hears 502.
        with bench(tmp_path / "dev", tmp_path, "--upstream", url) as running:
            refused = run_printed(running.commands()["ca"].command)
            assert refused.stdout.split(None, 2)[1] == "502", refused.stdout
            assert running.stop()[0] == 0


def test_upstream_ca_needs_an_https_upstream(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["dev", "--dir", str(tmp_path / "dev"), "--upstream-ca", str(tmp_path / "ca.pem")]
    assert cli.main(argv) == cli.EXIT_USAGE
    assert capsys.readouterr().err.startswith("error: --upstream-ca: trusts an https --upstream")
    missing = [*argv, "--upstream", "https://127.0.0.1:1", "--admin", "127.0.0.1:0"]
    assert cli.main(missing) == cli.EXIT_USAGE
    assert capsys.readouterr().err.startswith("error: --upstream-ca: CA file")


@pytest.mark.e2e
def test_the_echo_upstream_shows_the_request_as_forwarded(tmp_path: Path) -> None:
    with bench(tmp_path / "dev", tmp_path) as running:
        # The printed unpinned command, made into an upload with a path, a query and fields.
        argv = shlex.split(running.commands()["ca"].command)
        url = argv.pop()
        # HTTP/1.1: Connection (and what it names) is HTTP/1.1's; HTTP/2 has none.
        argv += ["--http1.1", "--data-binary", "hello echo", "-H", "X-App: test"]
        argv += ["-H", "Connection: X-Drop"]
        argv += ["-H", "X-Drop: hop-by-hop", f"{url}v1/items?page=2"]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=CLIENT_TIMEOUT)
        assert result.returncode == 0, result.stderr
        description, fields = echoed(response(result.stdout).body)
        assert description["method"] == "POST"
        assert description["target"] == "/v1/items?page=2"
        assert description["body_length"] == len(b"hello echo")
        assert description["body_sha256"] == hashlib.sha256(b"hello echo").hexdigest()
        assert fields["x-app"] == "test"
        assert "x-drop" not in fields  # named by Connection: a hop-by-hop field, not forwarded
        assert running.stop()[0] == 0


@pytest.mark.e2e
def test_the_ca_persists_across_restarts_and_reset_replaces_only_it(tmp_path: Path) -> None:
    folder = tmp_path / "dev"
    folder.mkdir()
    unrelated = folder / "notes.txt"
    unrelated.write_text("not the bench's")
    installed = tmp_path / "installed-ca.pem"  # the copy a simulator keeps

    def start_and_stop(*options: str, trusting: Path | None = None) -> tuple[bytes, ...]:
        with bench(folder, tmp_path, *options) as running:
            material = (
                (folder / "ca.pem").read_bytes(),
                *(running.pin(role).encode() for role in ("old", "new", "rogue")),
            )
            if trusting is not None:  # a client that trusts the CA it installed earlier
                tls_get("127.0.0.1", running.port, cafile=trusting, server_name="localhost")
            assert (folder / "admin-address").is_file()
            code, _, err = running.stop()
        assert code == 0, err
        assert "Traceback" not in err
        assert not (folder / "admin-address").exists()  # removed when it stops
        return material

    first = start_and_stop()
    shutil.copy(folder / "ca.pem", installed)
    # Same CA (a device that trusts it keeps working), same keys, same pins.
    assert start_and_stop(trusting=installed) == first
    chain = (folder / "old" / "chain.pem").read_bytes()
    # A new name (a LAN address a phone can reach) re-issues the certificates on the same keys.
    assert start_and_stop("--name", "192.0.2.10", trusting=installed) == first
    assert (folder / "old" / "chain.pem").read_bytes() != chain
    cert = x509.load_pem_x509_certificate((folder / "old" / "chain.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("192.0.2.10") in sans.get_values_for_type(x509.IPAddress)
    reset = start_and_stop("--reset")
    assert all(new != old for new, old in zip(reset, first, strict=True))
    assert unrelated.read_text() == "not the bench's"
    # The negative twin: the CA installed before the reset is no longer trusted.
    with bench(folder, tmp_path) as running, pytest.raises(ssl.SSLCertVerificationError):
        tls_get("127.0.0.1", running.port, cafile=installed, server_name="localhost")


@pytest.mark.e2e
def test_sigint_stops_cleanly(tmp_path: Path) -> None:
    with bench(tmp_path / "dev", tmp_path) as running:
        code, out, err = running.stop()
    assert code == 0
    assert out.strip() == "stopped"
    assert "Traceback" not in err
    assert "KeyboardInterrupt" not in err


# A helper run as the bench's process: a session leader (start_new_session) that makes the
# pty's slave its controlling terminal (TIOCSCTTY), puts it on stdin, stdout and stderr, and
# becomes `dualproxy dev`: as a shell in a terminal window starts it.
_ON_A_TERMINAL: Final = """
import fcntl, os, sys, termios
fd = int(sys.argv[1])
fcntl.ioctl(fd, termios.TIOCSCTTY, 0)
for target in (0, 1, 2):
    os.dup2(fd, target)
os.execv(sys.argv[2], sys.argv[2:])
"""


@pytest.mark.e2e
def test_closing_its_terminal_stops_the_bench(tmp_path: Path) -> None:
    """Closing the terminal window sends SIGHUP: the bench stops and frees its ports, instead
    of staying on them, orphaned."""
    master, slave = os.openpty()
    argv = [str(dualproxy_script()), "dev", "--dir", str(tmp_path / "dev")]
    argv += ["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"]
    process = subprocess.Popen(
        [sys.executable, "-c", _ON_A_TERMINAL, str(slave), *argv],
        start_new_session=True, pass_fds=(slave,), stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    os.close(slave)
    try:
        screen = b""
        deadline = time.monotonic() + START_TIMEOUT
        while BANNER_END not in screen and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                screen += os.read(master, 65536)
        assert BANNER_END in screen, screen.decode(errors="replace")
        port = int(re.search(rb"https://localhost:(\d+)/", screen).group(1))  # type: ignore[union-attr]
        assert served_pin(port)  # serving
        os.close(master)  # the terminal window closes: the kernel hangs up on the session
        master = -1
        assert process.wait(timeout=STOP_TIMEOUT) == 0
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT).close()
    finally:
        if master >= 0:
            os.close(master)
        if process.poll() is None:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)


# --- usage and operator errors, in-process --------------------------------------------------


def test_a_bad_listen_address_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["dev", "--dir", str(tmp_path / "dev"), "--listen", "localhost"])
    assert code == cli.EXIT_USAGE
    assert capsys.readouterr().err.startswith("error: --listen: 'localhost' is not HOST:PORT")


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--upstream", "ftp://example.com", "error: --upstream: 'ftp://example.com' is not"),
        ("--new-network", "10.0.0.1/8", "error: --new-network: 10.0.0.1/8 has host bits set"),
    ],
)
def test_bad_bench_options_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, value: str, message: str
) -> None:
    argv = ["dev", "--dir", str(tmp_path / "dev"), "--admin", "127.0.0.1:0", option, value]
    assert cli.main(argv) == cli.EXIT_USAGE
    assert capsys.readouterr().err.startswith(message)


@pytest.mark.parametrize("address", ["0.0.0.0:8444", "192.0.2.1:8444", "[::]:8444", "api:1"])
def test_the_admin_endpoint_listens_on_loopback_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], address: str
) -> None:
    assert cli.main(["dev", "--dir", str(tmp_path / "dev"), "--admin", address]) == cli.EXIT_USAGE
    assert "listens on loopback only" in capsys.readouterr().err


def test_ports_in_use_fail_with_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        base = ["dev", "--dir", str(tmp_path / "dev")]
        code = cli.main([*base, "--listen", f"127.0.0.1:{port}", "--admin", "127.0.0.1:0"])
        assert code == cli.EXIT_FAILED
        err = capsys.readouterr().err
        # The option typed, not a config key the developer never wrote, and what to do.
        assert f"error: cannot listen on 127.0.0.1:{port} (--listen): " in err
        assert "listen.address" not in err
        assert f"(a dualproxy still running? `ss -ltnp 'sport = :{port}'` names it)" in err
        assert "choose another port with --listen" in err
        assert "Traceback" not in err
        code = cli.main([*base, "--listen", "127.0.0.1:0", "--admin", f"127.0.0.1:{port}"])
        assert code == cli.EXIT_FAILED
        err = capsys.readouterr().err
        assert f"error: --admin: cannot listen on 127.0.0.1:{port}" in err
        assert "another bench" in err


def test_switch_without_a_running_bench(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["dev", "switch", "rogue", "--dir", str(tmp_path)])
    assert code == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert f"{tmp_path / 'admin-address'} does not exist: no dev bench is running" in err
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, never listening: connections are refused
        code = cli.main(["dev", "switch", "rogue", "--admin", f"127.0.0.1:{port}"])
    assert code == cli.EXIT_FAILED
    assert f"no dev bench answers at 127.0.0.1:{port}" in capsys.readouterr().err


def test_switch_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["dev", "switch", "nope"]) == cli.EXIT_USAGE
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    assert cli.main(["dev", "switch", "grace", "--admin", "0.0.0.0:1"]) == cli.EXIT_USAGE
    assert "loopback only" in capsys.readouterr().err


# --- the bench in-process: a switch that cannot load keeps the scenario serving ---------------


async def test_a_failed_switch_keeps_serving_the_current_scenario(tmp_path: Path) -> None:
    material = dev.prepare(tmp_path / "dev")
    settings = dev.BenchSettings("127.0.0.1:0", None)
    bench_ = dev.Bench(material, settings, "old-only", handle_signals=False)
    ca = material.ca_file

    async def pin_served() -> str:
        return (await trio.to_thread.run_sync(
            lambda: tls_get(host, port, cafile=ca, server_name="localhost", request=False)
        )).pin  # fmt: skip

    async with trio.open_nursery() as nursery:
        bound = await nursery.start(bench_.server.run)
        bench_.bound = bound
        host, port = bound[0]
        assert await pin_served() == material.pins["old"]
        assert "served new (after-window)" in await bench_.switch("new-only")
        assert await pin_served() == material.pins["new"]
        (material.folder / "rogue" / "chain.pem").unlink()  # rogue can no longer load
        with pytest.raises(devcontrol.SwitchError, match="could not switch to rogue"):
            await bench_.switch("rogue")
        assert bench_.scenario == "new-only"
        assert await pin_served() == material.pins["new"]
        with pytest.raises(devcontrol.SwitchError, match="unknown scenario 'nope'"):
            await bench_.switch("nope")
        nursery.cancel_scope.cancel()


def test_the_grace_banner_shows_the_sni_alias_first(tmp_path: Path) -> None:
    """The hint every app stack can send, with how a simulator and an emulator reach its name;
    ALPN after it, for custom clients."""
    material = dev.prepare(tmp_path / "dev")
    settings = dev.BenchSettings("127.0.0.1:0", None, ("10.0.2.0/24",))
    grace = dev.Bench(material, settings, "grace", handle_signals=False)
    grace.bound = [("127.0.0.1", 8443)]
    banner = grace.banner()
    alias = banner.index(f"point the updated build at https://{HINT_SNI}:8443/")
    assert alias < banner.index("/etc/hosts") < banner.index("InetAddress.getByName")
    assert alias < banner.index(f"ALPN {dev.HINT_ALPN}     custom clients only")
    assert "--new-network     test devices in 10.0.2.0/24" in banner
    assert alias < banner.index("Try it: curl plays your app.")
    # The twin: outside the grace window there is nothing to ask for.
    before = dev.Bench(material, settings, "old-only", handle_signals=False)
    before.bound = [("127.0.0.1", 8443)]
    assert "point the updated build at" not in before.banner()
