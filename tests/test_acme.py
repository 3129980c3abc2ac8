"""ACME against Pebble: issuance and renewal on the same key, both challenge types validated
for real against dualproxy's own responders, the CLI with and without a running server, and
a running server that takes a renewal while clients keep connecting.

Pebble and pebble-challtestsrv run per test on free ports (tests/pebble.py); every name
resolves to 127.0.0.1 and Pebble validates on the ports the test's dualproxy listens on.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import pytest
import trio
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from helpers.clients import CLIENT_TIMEOUT, read_until
from helpers.configs import config_toml
from helpers.keys import make_key
from helpers.pebble import Pebble, running_pebble
from helpers.replicas import wait_for
from helpers.serving import supervising_with_acme

from dualproxy.acme import issuer as acme
from dualproxy.acme import service
from dualproxy.acme.challenges import (
    HTTP01_PREFIX,
    Challenge,
    ChallengeBoard,
    probe_tls_alpn,
    publish,
)
from dualproxy.cli.main import main
from dualproxy.config.loader import load, parse
from dualproxy.config.schema import Config
from dualproxy.serve.server import Server
from dualproxy.serve.supervisor import Supervisor
from dualproxy.tls import keygen, keystore
from dualproxy.tls.pins import spki_pin, spki_pin_of_certificate

NAMES: Final = ("api.dualproxy.test", "www.dualproxy.test")
# Clients that keep connecting while a renewal happens: at most this many, and the loop
# stops soon after the renewal has been seen.
MAX_CLIENTS: Final = 400
AFTER_RENEWAL: Final = 5
# Bound of each wait here: generous for a shared, loaded machine; a healthy run takes a
# small fraction of it.
WAIT: Final = 30.0


@pytest.fixture
def pebble(tmp_path: Path) -> Iterator[Pebble]:
    with running_pebble(tmp_path / "pebble") as started:
        yield started


@dataclass
class Setup:
    config_file: Path
    key_file: Path
    chain_file: Path
    pin: str
    pebble: Pebble

    def config(self) -> Config:
        return load(self.config_file)


def make_setup(
    folder: Path,
    pebble: Pebble,
    *,
    challenge: str = "tls-alpn-01",
    workers: int = 1,
    **acme_extra: Any,
) -> Setup:
    key_file = folder / "certs/k1/key.pem"
    key = keygen.generate_private_key()
    keygen.write_private_key(key_file, key)
    acme_table: dict[str, Any] = {
        "directory": pebble.directory,
        "email": "ops@dualproxy.test",
        "ca_file": str(pebble.ca_file),
        "challenge": challenge,
        "order_timeout": 30,
        **acme_extra,
    }
    if challenge == "http-01":
        acme_table.setdefault("http_listen", f"127.0.0.1:{pebble.http_port}")
    data = {
        "listen": {"address": f"127.0.0.1:{pebble.tls_port}"},
        "acme": acme_table,
        "keys": {
            "k1": {"key": "certs/k1/key.pem", "chain": "certs/k1/chain.pem", "names": list(NAMES)}
        },
        "keystore": {"reload_poll_interval": 0.2},
    }
    if workers > 1:
        data["process"] = {"workers": workers}
    config_file = folder / "config.toml"
    config_file.write_text(config_toml(data))
    return Setup(
        config_file, key_file, folder / "certs/k1/chain.pem", spki_pin(key.public_key()), pebble
    )


def proven_names(messages: list[str]) -> list[list[str]]:
    """The names each order in `messages` proved with a challenge ("acme: KEY: proving A, B
    with ..."). Not always every name of the key: Pebble 2.4 (Debian's) still reuses a
    valid authorization of an earlier order now and then with PEBBLE_AUTHZREUSE=0 (seen in
    one of 16 orders that followed another), and that name gets no challenge."""
    found = (re.match(r"acme: \S+: proving (.+) with \S+$", m) for m in messages)
    return [match.group(1).split(", ") for match in found if match is not None]


def leaf(chain_file: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(chain_file.read_bytes())


def verified_leaf(port: int, root_pem: bytes, server_name: str = NAMES[0]) -> x509.Certificate:
    """A real TLS client that trusts Pebble's root and checks the host name: the leaf."""
    context = ssl.create_default_context(cadata=root_pem.decode())
    with (
        socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        tls.sendall(f"GET / HTTP/1.1\r\nHost: {server_name}\r\nConnection: close\r\n\r\n".encode())
        response = b""
        while chunk := tls.recv(65536):
            response += chunk
        assert response.startswith(b"HTTP/1.1 200 ")
        return x509.load_der_x509_certificate(der)


# --- the service beside a server, without a CA ---------------------------------------------------


async def test_the_service_answers_beside_a_server_on_the_port_it_bound(
    tmp_path: Path, ca: trustme.CA
) -> None:
    """No CA needed: started before the server, the service binds the plain-HTTP listener and
    registers its board as the server's tls-alpn-01 responder; once the server listens (on a
    port 0 of the config), http-01 is answered and everything else redirected to the port the
    server bound. When the service stops, the server has no responder left."""
    key = make_key(ca, tmp_path / "certs", "k1", names=NAMES)
    acme_table = {
        "directory": "https://ca.invalid/directory",
        "challenge": "http-01",
        "http_listen": "127.0.0.1:0",
        "renew": False,
    }
    config = parse(
        {
            "listen": {"address": "127.0.0.1:0"},
            "acme": acme_table,
            "keys": {"k1": {**key.table(), "names": list(NAMES)}},
        },
        base_dir=tmp_path,
    )
    assert config.acme is not None
    published = Challenge("http-01", NAMES[0], "tok1", "tok1.thumbprint")
    publish(acme.challenge_folder(config.acme), [published], datetime.now(UTC))
    server = Server(config, handle_signals=False)
    async with trio.open_nursery() as nursery:
        http = await nursery.start(service.serve_beside, server)
        assert http is not None
        http_port = http[1]
        assert isinstance(server.tls_alpn_responder, ChallengeBoard)
        [(_, port)] = await nursery.start(server.run)
        answer = await trio.to_thread.run_sync(
            _plain_http, http_port, f"GET {HTTP01_PREFIX}tok1 HTTP/1.1\r\nHost: a\r\n\r\n".encode()
        )
        redirect = await trio.to_thread.run_sync(
            _plain_http, http_port, b"GET /x HTTP/1.1\r\nHost: api.dualproxy.test\r\n\r\n"
        )
        nursery.cancel_scope.cancel()
    assert server.tls_alpn_responder is None
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.endswith(b"\r\n\r\ntok1.thumbprint")
    assert redirect.startswith(b"HTTP/1.1 301 ")
    assert f"location: https://api.dualproxy.test:{port}/x".encode() in redirect.lower()


# --- the CLI on its own (no serve running) ---------------------------------------------------


def test_issue_then_renew_keep_the_key_tls_alpn(tmp_path: Path, pebble: Pebble) -> None:
    setup = make_setup(tmp_path, pebble)
    argv = ["-c", str(setup.config_file)]
    assert main(["acme", "issue", "k1", *argv]) == 0
    first = leaf(setup.chain_file)
    assert spki_pin_of_certificate(first) == setup.pin
    names = first.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(names.get_values_for_type(x509.DNSName)) == sorted(NAMES)
    # The chain written is one the key store serves (leaf first, issuer next).
    loaded = keystore.load_key(setup.config().keys["k1"], setup.config().keystore)
    assert loaded.pin == setup.pin
    assert not list(setup.chain_file.parent.glob(".*.tmp"))  # the atomic write left nothing

    assert main(["acme", "renew", *argv]) == 0  # not due: nothing changes
    assert leaf(setup.chain_file) == first

    assert main(["acme", "renew", "--force", *argv]) == 0
    second = leaf(setup.chain_file)
    assert second.serial_number != first.serial_number
    assert spki_pin_of_certificate(second) == setup.pin  # the pin apps ship is untouched
    assert not list((tmp_path / "certs/acme/challenges").glob("*.json"))  # withdrawn


def test_issue_says_each_slow_step_first(
    tmp_path: Path, pebble: Pebble, caplog: pytest.LogCaptureFixture
) -> None:
    """`acme issue` against a CA that may take a minute: each step is in the log before it
    waits, and each challenge answered is one line naming it."""
    setup = make_setup(tmp_path, pebble)
    with caplog.at_level(logging.INFO, logger="dualproxy"):
        assert main(["acme", "issue", "k1", "-c", str(setup.config_file)]) == 0
    messages = [r.getMessage() for r in caplog.records]
    steps = [
        f"acme: k1: asking {pebble.directory} for a certificate for {', '.join(NAMES)}",
        next(m for m in messages if m.startswith("acme: k1: proving ")),
        "acme: k1: waiting for the CA to validate and issue (at most 30 s)",
        f"acme: k1: new certificate written to {setup.chain_file}",
    ]
    assert sorted(steps[1].removeprefix("acme: k1: proving ").split(" with ")[0].split(", ")) == (
        sorted(NAMES)
    )
    positions = [messages.index(step) for step in steps]
    assert positions == sorted(positions), messages
    for name in NAMES:
        infos = [
            r.getMessage() for r in caplog.records
            if r.levelno == logging.INFO and f"challenge for {name}:" in r.getMessage()
        ]  # fmt: skip
        assert infos, messages
        assert len(infos) == len(set(infos)), messages


def test_a_wrong_directory_url_points_at_acme_directory(
    tmp_path: Path, pebble: Pebble, capsys: pytest.CaptureFixture[str]
) -> None:
    setup = make_setup(tmp_path, pebble)
    wrong = pebble.directory + "-nope"
    setup.config_file.write_text(setup.config_file.read_text().replace(pebble.directory, wrong))
    assert main(["acme", "issue", "k1", "-c", str(setup.config_file)]) == 1
    err = capsys.readouterr().err
    assert f"acme.directory: {wrong} did not answer with an ACME directory (HTTP 404" in err
    assert "check the URL" in err
    assert "try again later" not in err
    assert "Traceback" not in err
    assert not setup.chain_file.exists()


def test_issue_http01(tmp_path: Path, pebble: Pebble) -> None:
    setup = make_setup(tmp_path, pebble, challenge="http-01")
    assert main(["acme", "issue", "k1", "-c", str(setup.config_file)]) == 0
    assert spki_pin_of_certificate(leaf(setup.chain_file)) == setup.pin


def test_validation_failure_names_the_problem_not_a_traceback(
    tmp_path: Path, pebble: Pebble, capsys: pytest.CaptureFixture[str]
) -> None:
    """We answer on our port (the local check passes) but Pebble validates another one, where
    nothing listens: the CA's problem document is what the operator reads."""
    setup = make_setup(tmp_path, pebble)
    text = setup.config_file.read_text().replace(
        f"127.0.0.1:{pebble.tls_port}", f"127.0.0.1:{_free_port()}"
    )
    setup.config_file.write_text(text)
    assert main(["acme", "issue", "k1", "-c", str(setup.config_file)]) == 1
    err = capsys.readouterr().err
    assert "the CA could not validate" in err
    assert "urn:ietf:params:acme:error:" in err
    assert "Traceback" not in err
    assert not setup.chain_file.exists()


def test_issue_refuses_a_key_without_names(tmp_path: Path, pebble: Pebble) -> None:
    setup = make_setup(tmp_path, pebble)
    assert main(["acme", "issue", "k9", "-c", str(setup.config_file)]) == 1


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- with a running server ----------------------------------------------------------------------


@dataclass
class ClientLoop:
    """TLS clients connecting one after the other until told to stop (or MAX_CLIENTS)."""

    port: int
    root_pem: bytes
    serials: list[int] = field(default_factory=list)
    pins: set[str] = field(default_factory=set)
    failures: list[str] = field(default_factory=list)
    stop_after_serial: int | None = None

    async def run(self) -> None:
        after = 0
        while len(self.serials) + len(self.failures) < MAX_CLIENTS:
            try:
                cert = await trio.to_thread.run_sync(verified_leaf, self.port, self.root_pem)
            except (OSError, ssl.SSLError, AssertionError) as exc:
                self.failures.append(repr(exc))
                continue
            self.serials.append(cert.serial_number)
            self.pins.add(spki_pin_of_certificate(cert))
            if self.stop_after_serial is not None and cert.serial_number == self.stop_after_serial:
                after += 1
                if after >= AFTER_RENEWAL:
                    return


@asynccontextmanager
async def serving_with_acme(config: Config) -> AsyncIterator[tuple[Server, list[tuple[str, int]]]]:
    """A server and, beside it, the ACME service, as `dualproxy serve` starts them; the
    server's bound addresses."""
    server = Server(config, handle_signals=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(service.serve_beside, server)
        yield server, await nursery.start(server.run)
        nursery.cancel_scope.cancel()


async def _serve_and_renew(setup: Setup, renew: Any) -> tuple[ClientLoop, Server]:
    """Serve setup's config, run `renew()` while clients connect, wait for the new chain."""
    async with serving_with_acme(setup.config()) as (server, bound):
        loop = ClientLoop(bound[0][1], await trio.to_thread.run_sync(setup.pebble.root_pem))
        first = leaf(setup.chain_file).serial_number
        with trio.fail_after(60):
            async with trio.open_nursery() as clients:
                clients.start_soon(loop.run)
                await renew()
                new = leaf(setup.chain_file).serial_number
                assert new != first
                loop.stop_after_serial = new
        # The negative twin of the challenge hook: acme-tls/1 offered for a name with no
        # pending challenge gets no challenge certificate.
        stray = Challenge("tls-alpn-01", NAMES[0], "token", "token.thumbprint")
        answered = await trio.to_thread.run_sync(probe_tls_alpn, "127.0.0.1", bound[0][1], stray)
        assert not answered
    return loop, server


async def test_cli_issue_while_serving_hands_the_challenge_to_the_server(
    tmp_path: Path, pebble: Pebble, caplog: pytest.LogCaptureFixture
) -> None:
    """serve holds the TLS port: the CLI publishes the challenge, the server answers it on its
    own listener, the chain is written and the server swaps it in; no client fails."""
    setup = make_setup(tmp_path, pebble, renew=False)
    config = setup.config()
    assert await acme.issue_keys(config, list(config.acme_keys())) == [("k1", None)]

    async def cli_issue() -> None:
        argv = ["acme", "issue", "k1", "-c", str(setup.config_file)]
        assert await trio.to_thread.run_sync(main, argv) == 0

    caplog.set_level("DEBUG", logger="dualproxy")
    loop, server = await _serve_and_renew(setup, cli_issue)
    assert loop.failures == []
    assert loop.pins == {setup.pin}
    assert len(set(loop.serials)) == 2  # old chain, then the new one
    assert server.reloads_failed == 0
    # Pebble's validations reached the server's own listener (the CLI could not bind it):
    # the server's board says so once per challenge, with its name; the validation
    # connections' own conn lines are at debug level only.
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    for name in proven_names(infos)[-1]:  # Pebble may still hold one name's authorization
        assert f"acme: tls-alpn-01 challenge for {name}: answered" in "\n".join(infos)
    assert not [m for m in infos if "outcome=acme-challenge" in m]
    assert any(
        "outcome=acme-challenge" in r.getMessage() and r.levelno == logging.DEBUG
        for r in caplog.records
    )


async def test_server_renews_in_the_background_with_clients_connected(tmp_path: Path) -> None:
    """Short-lived certificates (Pebble issues 30 s ones here) and renew_fraction 0.1: the
    running server renews by itself and serves the new chain; no client fails."""
    with running_pebble(tmp_path / "pebble", validity=30) as short_lived:
        setup = make_setup(tmp_path, short_lived, renew_fraction=0.1, retry_initial=1)
        config = setup.config()
        assert await acme.issue_keys(config, list(config.acme_keys())) == [("k1", None)]
        first = leaf(setup.chain_file).serial_number

        async def background_renewal() -> None:
            while leaf(setup.chain_file).serial_number == first:
                await trio.sleep(0.2)

        loop, server = await _serve_and_renew(setup, background_renewal)
    assert loop.failures == []
    assert loop.pins == {setup.pin}
    assert len(set(loop.serials)) >= 2
    assert server.reloads_ok >= 1


async def test_replicas_sharing_the_acme_folder_renew_with_one_order(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two servers on one ACME folder and key files (replicas on a shared state volume), the
    certificate due for both: one order, no error, both serve the new chain on the same key
    (the CA validates at the first's port, which answers the challenge the second may have
    published: every replica reads the shared folder within its poll interval)."""
    caplog.set_level(logging.INFO, logger="dualproxy")
    with running_pebble(tmp_path / "pebble", validity=40) as short_lived:
        # Due 8 s into each certificate's life: both replicas at once.
        setup = make_setup(tmp_path, short_lived, renew_fraction=0.2, retry_initial=1)
        config = setup.config()
        assert await acme.issue_keys(config, list(config.acme_keys())) == [("k1", None)]
        first = leaf(setup.chain_file).serial_number
        # The second replica: the same files, its own port (the CA validates at the first's,
        # which answers the challenge the second publishes in the shared folder).
        other = tmp_path / "replica-b.toml"
        text = setup.config_file.read_text()
        other.write_text(text.replace(f"127.0.0.1:{short_lived.tls_port}", "127.0.0.1:0"))
        async with (
            serving_with_acme(config) as (a, _),
            serving_with_acme(load(other)) as (b, _),
        ):
            with trio.fail_after(60):
                while not all(s.snapshot.keys["k1"].leaf.serial_number != first for s in (a, b)):
                    await trio.sleep(0.1)
            renewed = {s.snapshot.keys["k1"].leaf.serial_number for s in (a, b)}
            messages = [r.getMessage() for r in caplog.records]
    assert len(renewed) == 1  # both serve the same new certificate
    assert renewed != {first}
    assert {spki_pin_of_certificate(s.snapshot.keys["k1"].leaf) for s in (a, b)} == {setup.pin}
    # One order: the other replica took the chain the first wrote (reloaded by its poller,
    # or, when both were due at once, after waiting for the lock), and none failed.
    assert sum(m.startswith("acme: new certificate for k1 written") for m in messages) == 1
    assert not [m for m in messages if "renewing k1 failed" in m]


async def test_a_cancelled_order_withdraws_its_challenges_and_frees_the_lock(
    tmp_path: Path, pebble: Pebble
) -> None:
    """SIGTERM during an order (its serve's nursery cancelled while the challenges are
    published and nobody answers them yet): the challenge files are withdrawn and the lock
    is free for the next order. The twin: while the order runs, both are held."""
    setup = make_setup(tmp_path, pebble)
    config = setup.config()
    assert config.acme is not None
    folder = acme.challenge_folder(config.acme)
    lock = folder.parent / acme.LOCK_FILE
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(acme.obtain, config, config.keys["k1"])
            while not list(folder.glob("*.json")):  # published; nothing answers here
                await trio.sleep(0.02)
            with lock.open("r+") as held, pytest.raises(BlockingIOError):
                fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            nursery.cancel_scope.cancel()
    assert not list(folder.glob("*.json"))
    with lock.open("r+") as free:
        fcntl.flock(free, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert not setup.chain_file.exists()


# --- with workers ([process] workers): the supervisor renews, every worker answers ------------

# Handshakes per look at the workers: reuse_port's hash leaves a worker without any of 16
# new connections once in 2**15 looks, and the look is repeated.
WORKER_BATCH: Final = 16


async def every_worker_serves(
    supervisor: Supervisor, port: int, root_pem: bytes, serial: int
) -> set[str]:
    """Wait until a batch of handshakes all get the certificate `serial` and every worker
    took some of them (so each serves it); the pins they got. Fails after WAIT."""
    with trio.move_on_after(WAIT):
        while True:
            before = [worker.connections for worker in supervisor.workers]
            leaves = [
                await trio.to_thread.run_sync(verified_leaf, port, root_pem)
                for _ in range(WORKER_BATCH)
            ]
            while sum(w.connections for w in supervisor.workers) - sum(before) < WORKER_BATCH:
                await trio.sleep(0.05)  # each worker reports its counts every 0.25 s
            took = [w.connections - b for w, b in zip(supervisor.workers, before, strict=True)]
            if all(took) and {cert.serial_number for cert in leaves} == {serial}:
                return {spki_pin_of_certificate(cert) for cert in leaves}
    pytest.fail(f"not within {WAIT} s: every worker serving serial {serial:X}")


async def wait_for_renewal(chain_file: Path, first: int) -> int:
    """The serial of the chain written over `first`'s, once it is."""
    with trio.fail_after(WAIT):
        while (serial := leaf(chain_file).serial_number) == first:
            await trio.sleep(0.1)
    return serial


def messages_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records]


@pytest.mark.parametrize("challenge", ["tls-alpn-01", "http-01"])
async def test_workers_renew_with_one_order_and_every_worker_serves_it(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    challenge: str,
) -> None:
    """[process] workers = 2 with [acme] and a Pebble certificate due 2 s into its life:
    the supervisor renews it with one order (retry_initial keeps this test to one attempt),
    the CA's validation is answered by whichever worker it reaches (tls-alpn-01 on the TLS
    port's reuse_port sockets; http-01 on the listener the supervisor opened and every
    worker accepts from), and both workers serve the new chain on the same key. The log
    says once that the supervisor renews; no worker orders, or answers as the supervisor."""
    with running_pebble(tmp_path / "pebble", validity=20) as short_lived:
        setup = make_setup(
            tmp_path,
            short_lived,
            challenge=challenge,
            workers=2,
            renew_fraction=0.1,
            retry_initial=3600,
        )
        config = setup.config()
        assert await acme.issue_keys(config, list(config.acme_keys())) == [("k1", None)]
        first = leaf(setup.chain_file).serial_number
        capfd.readouterr()  # the first issuance's own lines
        caplog.clear()
        caplog.set_level(logging.INFO, logger="dualproxy")
        supervisor = Supervisor(config, handle_signals=False)
        async with supervising_with_acme(supervisor) as (port, _):
            renewed = await wait_for_renewal(setup.chain_file, first)
            root = await trio.to_thread.run_sync(short_lived.root_pem)
            pins = await every_worker_serves(supervisor, port, root, renewed)
        messages = messages_of(caplog)
    assert pins == {setup.pin}
    assert sum(m.startswith("acme: k1: asking") for m in messages) == 1, messages
    assert sum(m.startswith("acme: new certificate for k1 written") for m in messages) == 1
    assert not [m for m in messages if "renewing k1 failed" in m]
    assert sum(m.startswith("acme: the supervisor (pid ") for m in messages) == 1
    # The supervisor answered no challenge; the workers answered each of its order's, and
    # placed no order.
    assert not [m for m in messages if f"{challenge} challenge for" in m]
    workers = capfd.readouterr().err
    [proven] = proven_names(messages)
    for name in proven:
        assert f"acme: {challenge} challenge for {name}: answered" in workers, workers
    assert "acme: renewing" not in workers
    assert "asking" not in workers


async def test_a_worker_killed_during_an_order_is_replaced_and_the_renewal_succeeds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGKILL on a worker while the supervisor's order proves the names: the order goes
    on (it lives in the supervisor), the slot gets a new worker, whose board reads the
    pending challenge before it accepts (the CA's connections that reach its sockets
    meanwhile wait in their backlog), the renewal succeeds with one order and both workers,
    the replacement too, serve the new chain."""
    caplog.set_level(logging.INFO, logger="dualproxy")
    with running_pebble(tmp_path / "pebble", validity=20) as short_lived:
        setup = make_setup(tmp_path, short_lived, workers=2, renew_fraction=0.1, retry_initial=3600)
        config = setup.config()
        assert await acme.issue_keys(config, list(config.acme_keys())) == [("k1", None)]
        first = leaf(setup.chain_file).serial_number
        caplog.clear()
        supervisor = Supervisor(config, handle_signals=False)
        async with supervising_with_acme(supervisor) as (port, _):
            with trio.fail_after(WAIT):
                while not any(m.startswith("acme: k1: proving") for m in messages_of(caplog)):
                    await trio.sleep(0.02)
            victim = supervisor.workers[0]
            killed = victim.pid
            assert killed is not None
            os.kill(killed, signal.SIGKILL)
            renewed = await wait_for_renewal(setup.chain_file, first)
            root = await trio.to_thread.run_sync(short_lived.root_pem)
            pins = await every_worker_serves(supervisor, port, root, renewed)
            assert (victim.pid, victim.restarts) != (killed, 0)
        messages = messages_of(caplog)
    assert victim.restarts == 1
    assert pins == {setup.pin}
    assert sum(m.startswith("acme: new certificate for k1 written") for m in messages) == 1
    assert not [m for m in messages if "renewing k1 failed" in m]


def self_signed(key: keygen.PrivateKey, days: int) -> bytes:
    """A certificate for `key` valid for `days` from now, as PEM (a stand-in for a CA's)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, NAMES[0])])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize("renewed_meanwhile", [True, False])
async def test_a_renewal_waits_for_another_process_s_order_and_takes_its_chain(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, renewed_meanwhile: bool
) -> None:
    """A serve's renewal (`served` given) that finds the ACME folder locked waits; when the
    process holding it wrote a newer chain for the key meanwhile, that one is taken and no
    order is placed (the CA here is unreachable: asking it would fail). The negative twin:
    nothing new was written, so it asks the CA itself."""
    caplog.set_level(logging.INFO, logger="dualproxy")
    key = keygen.generate_private_key()
    keygen.write_private_key(tmp_path / "certs/k1/key.pem", key)
    chain = tmp_path / "certs/k1/chain.pem"
    chain.write_bytes(self_signed(key, days=30))
    data = {
        "listen": {"address": "127.0.0.1:0"},
        "acme": {"directory": "https://127.0.0.1:9/dir", "order_timeout": 5},
        "keys": {
            "k1": {"key": "certs/k1/key.pem", "chain": "certs/k1/chain.pem", "names": [NAMES[0]]}
        },
    }
    config = parse(data, base_dir=tmp_path)
    served = leaf(chain)
    lock = acme.challenge_folder(config.acme).parent / acme.LOCK_FILE  # type: ignore[arg-type]
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another replica's order in progress
        async with trio.open_nursery() as nursery:
            results: list[bool | BaseException] = []

            async def renew() -> None:
                try:
                    results.append(await acme.obtain(config, config.keys["k1"], served=served))
                except acme.AcmeError as exc:
                    results.append(exc)

            nursery.start_soon(renew)
            await trio.sleep(0.2)
            assert results == []  # waiting for the lock, not failing
            if renewed_meanwhile:
                chain.write_bytes(self_signed(key, days=60))
            fcntl.flock(held, fcntl.LOCK_UN)
    if renewed_meanwhile:
        assert results == [False]
        assert any("was renewed by another process" in r.getMessage() for r in caplog.records)
    else:
        assert len(results) == 1
        assert isinstance(results[0], acme.AcmeError)  # it asked the CA (unreachable here)
        assert leaf(chain).serial_number == served.serial_number


async def test_http_listener_answers_http01_for_the_cli_and_redirects(
    tmp_path: Path, pebble: Pebble
) -> None:
    setup = make_setup(tmp_path, pebble, challenge="http-01", renew=False)
    config = setup.config()
    assert await acme.issue_keys(config, list(config.acme_keys())) == [("k1", None)]
    async with serving_with_acme(config):
        argv = ["acme", "renew", "--force", "-c", str(setup.config_file)]
        assert await trio.to_thread.run_sync(main, argv) == 0
        redirect = await trio.to_thread.run_sync(
            _plain_http,
            pebble.http_port,
            b"GET /v1/items?a=1 HTTP/1.1\r\nHost: API.dualproxy.test\r\n\r\n",
        )
        unknown = await trio.to_thread.run_sync(
            _plain_http,
            pebble.http_port,
            f"GET {HTTP01_PREFIX}nope HTTP/1.1\r\nHost: a.test\r\n\r\n".encode(),
        )
        oversized = await trio.to_thread.run_sync(
            _plain_http,
            pebble.http_port,
            b"GET / HTTP/1.1\r\nHost: a.test\r\nX: " + b"x" * 20_000 + b"\r\n\r\n",
        )
    location = f"location: https://api.dualproxy.test:{pebble.tls_port}/v1/items?a=1"
    assert redirect.startswith(b"HTTP/1.1 301 ")
    assert location.encode() in redirect.lower()
    assert unknown.startswith(b"HTTP/1.1 404 ")
    assert oversized.startswith(b"HTTP/1.1 400 ")


def _plain_http(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) as sock:
        sock.sendall(request)
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    return response


@dataclass
class ServeRun:
    """A `dualproxy serve --log-format json` process, and what it wrote to stderr."""

    process: subprocess.Popen[bytes]
    output: bytes = b""

    def entries(self) -> list[dict[str, Any]]:
        """Every line it wrote, each a JSON object (the issuance's lines included)."""
        return [json.loads(line) for line in self.output.decode().splitlines()]


@contextmanager
def serve_process(config_file: Path, ready: bytes) -> Iterator[ServeRun]:
    """`dualproxy serve -c config_file --log-format json` for the block, from the moment it
    wrote `ready`; stopped with SIGTERM at the end, its output then whole in `output`."""
    process = subprocess.Popen(
        [sys.executable, "-m", "dualproxy", "serve", "-c", str(config_file),
         "--log-format", "json"],
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    run = ServeRun(process)
    try:
        assert process.stderr is not None
        run.output = read_until(process.stderr, ready, timeout=60)
        yield run
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            _, rest = process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            _, rest = process.communicate()
        run.output += rest


def test_serve_obtains_a_missing_chain_then_serves_it(tmp_path: Path, pebble: Pebble) -> None:
    """`dualproxy serve` with an ACME-managed key that has no chain yet: it gets one (answering
    the challenge itself), then serves it."""
    setup = make_setup(tmp_path, pebble)
    assert not setup.chain_file.exists()
    with serve_process(setup.config_file, b"listening on") as run:
        served = verified_leaf(pebble.tls_port, pebble.root_pem())
        assert spki_pin_of_certificate(served) == setup.pin
        assert served == leaf(setup.chain_file)
    entries = run.entries()
    messages = [e.get("message", "") for e in entries]
    written = [
        m for m in messages if m == f"acme: k1: new certificate written to {setup.chain_file}"
    ]
    assert len(written) == 1, messages
    # Each challenge's answer is one line, with its name; no nameless repeats, no conn lines.
    for name in NAMES:
        answered = [
            m for m in messages if m.startswith(f"acme: tls-alpn-01 challenge for {name}: answered")
        ]
        assert len(answered) == 1, messages
    assert not [
        m for m in messages if m.startswith("acme: answered") or m == "acme: acme-tls/1 answered"
    ]
    assert not [e for e in entries if e.get("outcome") == "acme-challenge"], entries


def test_serve_with_workers_obtains_a_missing_chain_then_takes_the_cli_s_renewal(
    tmp_path: Path, pebble: Pebble
) -> None:
    """`dualproxy serve` with [process] workers = 2 and a managed key without a chain: it
    obtains the chain before any worker starts (answering the challenge itself), then the
    workers serve it, and the log says once that the supervisor renews. `dualproxy acme renew
    --force` meanwhile cannot bind the TLS port: the workers answer its challenges from the
    folder, and the chain it writes reaches every worker through the supervisor's file
    poller (each worker's reload line names the new certificate)."""
    setup = make_setup(tmp_path, pebble, workers=2)
    assert not setup.chain_file.exists()
    with serve_process(setup.config_file, b"workers: pids") as run:
        root = pebble.root_pem()
        served = verified_leaf(pebble.tls_port, root)
        assert served == leaf(setup.chain_file)
        assert spki_pin_of_certificate(served) == setup.pin
        assert main(["acme", "renew", "--force", "-c", str(setup.config_file)]) == 0
        renewed = leaf(setup.chain_file).serial_number
        assert renewed != served.serial_number
        wait_for(
            lambda: (
                {verified_leaf(pebble.tls_port, root).serial_number for _ in range(8)} == {renewed}
            ),
            "the workers serving the chain the CLI wrote",
        )
    assert run.process.returncode == 0
    messages = [entry.get("message", "") for entry in run.entries()]
    assert messages.count("acme: no chain yet for k1; obtaining it") == 1, messages
    renews = [m for m in messages if m.startswith("acme: the supervisor (pid ")]
    assert len(renews) == 1, messages
    assert f"pid {run.process.pid})" in renews[0]
    serial = f"k1: new certificate (serial {renewed:X}"
    for slot in (0, 1):
        assert [m for m in messages if f", worker {slot}: " in m and serial in m], messages
    assert not [m for m in messages if m.startswith("acme: renewing")]  # the CLI renewed


# --- without Pebble ------------------------------------------------------------------------------


def test_check_reports_a_managed_key_without_a_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keygen.write_private_key(tmp_path / "certs/k1/key.pem", keygen.generate_private_key())
    data = {
        "listen": {"address": "127.0.0.1:0"},
        "acme": {"directory": "https://acme.invalid/dir"},
        "keys": {
            "k1": {"key": "certs/k1/key.pem", "chain": "certs/k1/chain.pem", "names": list(NAMES)}
        },
    }
    config_file = tmp_path / "config.toml"
    config_file.write_text(config_toml(data))
    assert main(["check", "-c", str(config_file)]) == 1
    err = capsys.readouterr().err
    assert "keys.k1.chain: no certificate yet" in err
    assert "dualproxy acme issue k1" in err


@pytest.mark.parametrize("output", ["table", "okhttp", "json", "curl"])
def test_pins_of_a_managed_key_without_a_certificate_yet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], ca: trustme.CA, output: str
) -> None:
    """A pin depends on the key alone: `pins` lists a managed key whose chain is still to
    come (with the names it requests), beside a key that has one, and says which is which in
    check's words."""
    key = keygen.generate_private_key()
    keygen.write_private_key(tmp_path / "certs/k1/key.pem", key)
    other = make_key(ca, tmp_path / "certs", "k0")
    data = {
        "listen": {"address": "127.0.0.1:0"},
        "acme": {"directory": "https://acme.invalid/dir"},
        "keys": {
            "k0": other.table(),
            "k1": {"key": "certs/k1/key.pem", "chain": "certs/k1/chain.pem", "names": list(NAMES)},
        },
        "rotation": {
            "old": "k0", "new": "k1", "grace_start": datetime(2026, 12, 1, tzinfo=UTC),
            "grace_end": datetime(2027, 1, 15, tzinfo=UTC),
        },
    }  # fmt: skip
    config_file = tmp_path / "config.toml"
    config_file.write_text(config_toml(data))
    argv = ["pins", "-c", str(config_file), "--at", "2026-11-01T00:00:00Z"]
    if output != "table":
        argv += ["--format", output]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    pin = spki_pin(key.public_key())
    assert pin in out
    assert other.pin in out
    assert err.startswith(
        f"note: {tmp_path / 'certs/k1/chain.pem'}: keys.k1.chain: no certificate yet"
    )
    if output == "table":
        assert re.search(rf"^k1 +next +ECDSA P-256 +until - +sha256/{re.escape(pin)}$", out, re.M)
    if output == "okhttp":
        assert NAMES[0] in out
    # check says the same of that key (and fails: nothing can serve it yet).
    assert main(["check", "-c", str(config_file)]) == 1
    assert "keys.k1.chain: no certificate yet" in capsys.readouterr().err


def test_pins_of_a_missing_unmanaged_chain_stay_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The twin: a key without names is not ACME's to complete; its missing chain is the
    config's error, as at every start."""
    keygen.write_private_key(tmp_path / "certs/k1/key.pem", keygen.generate_private_key())
    data = {
        "listen": {"address": "127.0.0.1:0"},
        "keys": {"k1": {"key": "certs/k1/key.pem", "chain": "certs/k1/chain.pem"}},
    }
    config_file = tmp_path / "config.toml"
    config_file.write_text(config_toml(data))
    assert main(["pins", "-c", str(config_file)]) == 1
    assert "keys.k1.chain: certificate chain file" in capsys.readouterr().err


def _cert_with(serial: int, key_id: bytes) -> x509.Certificate:
    from datetime import UTC, datetime, timedelta

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([])
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.AuthorityKeyIdentifier(key_id, None, None), critical=False)
        .sign(key, hashes.SHA256())
    )


def test_ari_certificate_id_matches_rfc_9773_example() -> None:
    """RFC 9773 section 4.1: keyIdentifier 69:88:5B:..., serial 00:87:65:43:21."""
    key_id = bytes.fromhex("69885B6B87464041E1B37B847BA0AE2CDE01C8D4")
    cert = _cert_with(0x87654321, key_id)
    assert acme.ari_certificate_id(cert) == "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE"
    # The twin: a serial whose top bit is clear gets no leading zero byte.
    assert acme.ari_certificate_id(_cert_with(0x7F, key_id)).endswith(".fw")


@pytest.fixture
def fake_ari(tmp_path: Path) -> Iterator[tuple[str, Path, list[str]]]:
    """An HTTPS server with an ACME directory that offers renewalInfo, and the window it
    suggests for any certificate; yields (directory URL, CA file, paths requested)."""
    import http.server
    import json
    import threading

    import trustme

    ca = trustme.CA()
    ca_file = tmp_path / "ari-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    requested: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requested.append(self.path)
            base = f"https://{self.headers['Host']}"
            body: dict[str, object]
            if self.path == "/dir":
                body = {"newNonce": f"{base}/nonce", "renewalInfo": f"{base}/ari/"}
            else:
                window = {"start": "2027-01-01T00:00:00Z", "end": "2027-01-03T00:00:00Z"}
                body = {"suggestedWindow": window}
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}/dir", ca_file, requested
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_renewal_window_is_fetched_when_the_ca_offers_it(
    fake_ari: tuple[str, Path, list[str]],
) -> None:
    from datetime import UTC, datetime

    from dualproxy.config.schema import AcmeConfig

    directory, ca_file, requested = fake_ari
    settings = AcmeConfig(directory, Path("unused.pem"), ca_file=ca_file)
    key_id = bytes.fromhex("69885B6B87464041E1B37B847BA0AE2CDE01C8D4")
    window = acme.fetch_renewal_window(settings, _cert_with(0x87654321, key_id))
    assert window is not None
    assert window.start == datetime(2027, 1, 1, tzinfo=UTC)
    assert window.end == datetime(2027, 1, 3, tzinfo=UTC)
    assert requested[-1] == "/ari/aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE"


def test_a_retired_old_key_is_not_renewed(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    data = {
        "listen": {"address": "127.0.0.1:0"},
        "acme": {"directory": "https://acme.invalid/dir"},
        "keys": {
            n: {"key": f"{n}/key.pem", "chain": f"{n}/chain.pem", "names": list(NAMES)}
            for n in ("a", "b")
        },
        "rotation": {
            "old": "a",
            "new": "b",
            "grace_start": datetime(2026, 12, 1, tzinfo=UTC),
            "grace_end": datetime(2027, 1, 1, tzinfo=UTC),
        },
    }
    config = parse(data, base_dir=tmp_path, check_files=False)
    during, after = datetime(2026, 12, 15, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)
    assert not acme.retired(config, "a", during)
    assert acme.retired(config, "a", after)
    assert not acme.retired(config, "b", after)


def test_missing_pebble_skips_unless_required(monkeypatch: pytest.MonkeyPatch) -> None:
    from helpers import pebble as pebble_module

    monkeypatch.setattr(pebble_module, "find", lambda command: None)
    monkeypatch.delenv("DUALPROXY_REQUIRE_PEBBLE", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install pebble"):
        pebble_module.require_pebble()
    monkeypatch.setenv("DUALPROXY_REQUIRE_PEBBLE", "1")
    with pytest.raises(pytest.fail.Exception, match="DUALPROXY_REQUIRE_PEBBLE=1"):
        pebble_module.require_pebble()


def test_a_when_safe_old_key_is_renewed_while_it_may_still_be_served(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    end, deadline = datetime(2027, 1, 1, tzinfo=UTC), datetime(2027, 2, 1, tzinfo=UTC)
    data = {
        "listen": {"address": "127.0.0.1:0"},
        "acme": {"directory": "https://acme.invalid/dir"},
        "keys": {
            n: {"key": f"{n}/key.pem", "chain": f"{n}/chain.pem", "names": list(NAMES)}
            for n in ("a", "b")
        },
        "rotation": {
            "old": "a",
            "new": "b",
            "grace_start": datetime(2026, 12, 1, tzinfo=UTC),
            "grace_end": end,
            "canary_percent": 5,
            "close": "when-safe",
            "grace_deadline": deadline,
        },
    }
    config = parse(data, base_dir=tmp_path, check_files=False)
    assert not acme.retired(config, "a", end)  # held open: it may still be served
    assert acme.retired(config, "a", end, window_closed=True)  # the evidence closed it
    assert acme.retired(config, "a", deadline)
