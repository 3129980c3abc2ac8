"""Pebble, Let's Encrypt's ACME test server, and pebble-challtestsrv (its test DNS server),
started on free loopback ports for the ACME integration tests.

Pebble validates for real: every name resolves (through challtestsrv) to 127.0.0.1, and it
connects to `http_port` for http-01 and `tls_port` for tls-alpn-01: the ports the test's
dualproxy listens on. Its directory's own TLS certificate comes from a trustme CA made here.

Where Pebble is not installed the tests skip, unless DUALPROXY_REQUIRE_PEBBLE=1 (set by
scripts/test, which installs it) turns the skip into a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest
import trustme

# Debian installs them in /usr/bin; some builds keep Go binaries elsewhere.
_SEARCH = ("/usr/bin", "/usr/local/bin", "/usr/lib/go/bin", os.path.expanduser("~/go/bin"))
# Pebble starts in well under a second; this is for a loaded CI box.
START_TIMEOUT = 20.0


def find(command: str) -> str | None:
    found = shutil.which(command)
    if found is not None:
        return found
    for folder in _SEARCH:
        candidate = Path(folder, command)
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def require_pebble() -> tuple[str, str]:
    """The two binaries, or skip (fail with DUALPROXY_REQUIRE_PEBBLE=1)."""
    pebble, challtestsrv = find("pebble"), find("pebble-challtestsrv")
    if pebble is None or challtestsrv is None:
        message = (
            "Pebble (ACME test server) is not installed: apt-get install pebble, or run"
            " scripts/test, which installs it"
        )
        if os.environ.get("DUALPROXY_REQUIRE_PEBBLE") == "1":
            pytest.fail(message + " (DUALPROXY_REQUIRE_PEBBLE=1 makes this a failure)")
        pytest.skip(message)
    return pebble, challtestsrv


# Ports free_ports handed out in this test run, and how many probes it may make per port.
_GIVEN: set[int] = set()
_PROBES_PER_PORT: Final = 20


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` free ports, none handed out before in this test run: the probes stay bound
    until all are chosen (one at a time, the kernel may hand the same port out twice, as it
    once did to Pebble's management interface and its DNS server), and a port given to an
    earlier caller (a replica's TLS port, while another's admin port is being chosen) is
    passed over."""
    with ExitStack() as probes:
        ports: list[int] = []
        for _ in range(count * _PROBES_PER_PORT):  # bounded: a few repeats at most
            if len(ports) == count:
                break
            probe = probes.enter_context(socket.socket())
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
            if port not in _GIVEN:
                ports.append(port)
        if len(ports) < count:
            raise RuntimeError(f"no {count} fresh ports after {count * _PROBES_PER_PORT} probes")
        _GIVEN.update(ports)
        return ports


@dataclass(frozen=True)
class Pebble:
    directory: str
    ca_file: Path  # trust for the directory's TLS certificate
    management: str  # https URL of the management interface (roots, intermediates)
    http_port: int  # where Pebble validates http-01
    tls_port: int  # where Pebble validates tls-alpn-01

    def root_pem(self) -> bytes:
        """The root that Pebble's certificates chain to (made anew at each start)."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        with urllib.request.urlopen(f"{self.management}/roots/0", context=context) as answer:
            data: bytes = answer.read()
            return data


@contextmanager
def running_pebble(folder: Path, *, validity: int | None = None) -> Iterator[Pebble]:
    """Pebble for the duration of the block; `validity`: its certificates' lifetime (s)."""
    pebble_bin, challtestsrv_bin = require_pebble()
    folder.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    server_cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_file, key_file, ca_file = folder / "cert.pem", folder / "key.pem", folder / "ca.pem"
    server_cert.cert_chain_pems[0].write_to_path(str(cert_file))
    server_cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    names = ("acme", "manage", "dns", "dnsmanage", "http", "tls")
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    config = {
        "pebble": {
            "listenAddress": f"127.0.0.1:{ports['acme']}",
            "managementListenAddress": f"127.0.0.1:{ports['manage']}",
            "certificate": str(cert_file),
            "privateKey": str(key_file),
            "httpPort": ports["http"],
            "tlsPort": ports["tls"],
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }
    }
    if validity is not None:
        config["pebble"]["certificateValidityPeriod"] = validity
    config_file = folder / "pebble.json"
    config_file.write_text(json.dumps(config))
    env = {
        **os.environ,
        "PEBBLE_VA_NOSLEEP": "1",  # validate at once instead of after a random sleep
        "PEBBLE_WFE_NONCEREJECT": "0",  # no random badNonce rejections
        "PEBBLE_AUTHZREUSE": "0",  # every order validates anew: challenges are really tested
        "PEBBLE_VA_ALWAYS_VALID": "0",  # every test validates for real: it costs milliseconds
    }
    log = (folder / "pebble.log").open("wb")
    dns = subprocess.Popen(
        [
            challtestsrv_bin,
            "-defaultIPv4",
            "127.0.0.1",
            "-defaultIPv6",
            "",
            "-dns01",
            f"127.0.0.1:{ports['dns']}",
            "-management",
            f"127.0.0.1:{ports['dnsmanage']}",
            "-http01",
            "",
            "-https01",
            "",
            "-tlsalpn01",
            "",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    pebble = subprocess.Popen(
        [pebble_bin, "-config", str(config_file), "-dnsserver", f"127.0.0.1:{ports['dns']}"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        result = Pebble(
            directory=f"https://127.0.0.1:{ports['acme']}/dir",
            ca_file=ca_file,
            management=f"https://127.0.0.1:{ports['manage']}",
            http_port=ports["http"],
            tls_port=ports["tls"],
        )
        _wait_ready(result, pebble, folder / "pebble.log")
        yield result
    finally:
        for process in (pebble, dns):
            process.terminate()
        for process in (pebble, dns):
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()


def _wait_ready(pebble: Pebble, process: subprocess.Popen[bytes], log: Path) -> None:
    context = ssl.create_default_context(cafile=str(pebble.ca_file))
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"pebble exited ({process.returncode}): {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(pebble.directory, context=context, timeout=2):
                return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"pebble did not answer within {START_TIMEOUT} s: {log.read_text()[-2000:]}")
