"""Renewals and config edits reach a running server without dropping anything.

Clients are real (Python ssl and http.client in worker threads, one `dualproxy serve`
subprocess); files are replaced the way renewal tools and Kubernetes replace them, in one
rename. Waits poll the server's counters (`reloads_ok`, `reloads_failed`) or the clients'
progress against a deadline: nothing here sleeps for a fixed time to let something happen.
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal

import pytest
import trio
import trio.testing
import trustme
from cryptography import x509
from helpers.clients import CLIENT_TIMEOUT
from helpers.configs import make_config, write_config
from helpers.keys import KeyFiles, make_key, reissue
from helpers.rotation import Clock
from helpers.serving import Running, serving

from dualproxy.config.names import ListenAddress
from dualproxy.config.schema import AcmeConfig, Config
from dualproxy.serve.lifecycle import acme_restart_needed, read_files
from dualproxy.serve.server import Server
from dualproxy.tls.keystore import KeySnapshot
from dualproxy.tls.pins import spki_pin_of_certificate

SNI: Final = "api.example.com"
# How often the tests look at a counter they wait for, and how long before they give up.
POLL: Final = 0.01
DEADLINE: Final = CLIENT_TIMEOUT
# The file poller's period when a test relies on it (the smallest config.py allows), and a
# period long enough that it never fires when a test triggers reloads itself.
FAST_POLL: Final = {"keystore": {"reload_poll_interval": 0.1}}
NO_POLL: Final = {"keystore": {"reload_poll_interval": 3600}}
# Requests each client makes before the renewal and again after the reload; and a bound on
# the total, in case the test stops waiting for them.
REQUESTS_PER_STAGE: Final = 10
MAX_REQUESTS_PER_CLIENT: Final = 5000
FRESH_CLIENTS: Final = 3


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    with trio.move_on_after(DEADLINE):
        while not condition():
            await trio.sleep(POLL)
        return
    pytest.fail(f"gave up after {DEADLINE} s waiting for {what}")


def replace_file(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write `data` over `path` in one rename, as renewal tools and Kubernetes do."""
    partial = path.with_name(path.name + ".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with open(fd, "wb") as out:
        out.write(data)
    partial.replace(path)


def leaf_of(chain_file: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(chain_file.read_bytes())


@pytest.fixture
def key(ca: trustme.CA, tmp_path: Path) -> KeyFiles:
    return make_key(ca, tmp_path / "certs", "k2026a")


@pytest.fixture
def errors(caplog: pytest.LogCaptureFixture) -> Callable[[], list[str]]:
    """The server's error log lines so far (tracebacks included)."""
    caplog.set_level(logging.INFO, logger="dualproxy")

    def error_lines() -> list[str]:
        traceback = logging.Formatter().formatException
        return [
            r.getMessage() + (f"\n{traceback(r.exc_info)}" if r.exc_info else "")
            for r in caplog.records
            if r.name == "dualproxy" and r.levelno >= logging.ERROR
        ]

    return error_lines


# --- clients -------------------------------------------------------------------------------


Address = tuple[str, int]


class Session:
    """One HTTPS connection on which GETs follow one another (HTTP/1.1 keep-alive)."""

    def __init__(self, address: Address, cafile: Path) -> None:
        context = ssl.create_default_context(cafile=str(cafile))
        raw = socket.create_connection(address, timeout=CLIENT_TIMEOUT)
        # As curl, OkHttp and browsers do. Without it Nagle holds the first request behind
        # the TLS 1.3 Finished until the server's delayed ACK, some 40 ms per connection.
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self._tls = context.wrap_socket(raw, server_hostname=SNI)
        except BaseException:
            raw.close()
            raise
        der = self._tls.getpeercert(binary_form=True)
        assert der is not None
        self.leaf = x509.load_der_x509_certificate(der)
        self._http = http.client.HTTPConnection(*address, timeout=CLIENT_TIMEOUT)
        self._http.sock = self._tls

    def get(self) -> None:
        """One request; raises unless it is answered 200 with dualproxy's body."""
        self._http.request("GET", "/", headers={"Host": SNI})
        response = self._http.getresponse()
        body = response.read()
        if response.status != 200 or not body.startswith(b"dualproxy:"):
            raise AssertionError(f"answered {response.status} {body[:80]!r}")

    def close(self) -> None:
        self._http.close()
        self._tls.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def fetch(address: Address, cafile: Path) -> x509.Certificate:
    """One GET on a fresh connection; the leaf the server presented to it."""
    with Session(address, cafile) as session:
        session.get()
        return session.leaf


async def fetch_async(to: Running | Address, cafile: Path) -> x509.Certificate:
    address = (to.host, to.port) if isinstance(to, Running) else to
    return await trio.to_thread.run_sync(fetch, address, cafile)


@dataclass
class Traffic:
    """Clients making requests back to back from worker threads, until stopped.

    `serials[i]` lists, per successful request of client i, the serial of the leaf its
    connection was handshaken with. Client 0 keeps one connection open throughout; the
    others open a fresh connection per request. Every request is bounded by the client
    timeout and every client by MAX_REQUESTS_PER_CLIENT.
    """

    running: Running
    cafile: Path
    stop: threading.Event = field(default_factory=threading.Event)
    serials: list[list[int]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    async def start(self, nursery: trio.Nursery) -> None:
        address = (self.running.host, self.running.port)
        kept = await trio.to_thread.run_sync(Session, address, self.cafile)
        self.serials = [[] for _ in range(1 + FRESH_CLIENTS)]
        nursery.start_soon(trio.to_thread.run_sync, self._keep_alive, kept, self.serials[0])
        for seen in self.serials[1:]:
            nursery.start_soon(trio.to_thread.run_sync, self._fresh_connections, seen)

    def counts(self) -> list[int]:
        return [len(seen) for seen in self.serials]

    async def wait_for_each(self, counts: list[int], what: str) -> None:
        await wait_until(
            lambda: (
                all(now >= want for now, want in zip(self.counts(), counts, strict=True))
                or bool(self.failures)
            ),
            what,
        )

    def _keep_alive(self, session: Session, seen: list[int]) -> None:
        with session:
            for _ in range(MAX_REQUESTS_PER_CLIENT):
                if self.stop.is_set():
                    return
                try:
                    session.get()
                except Exception as exc:
                    self.failures.append(f"keep-alive request {len(seen) + 1}: {exc!r}")
                    return
                seen.append(session.leaf.serial_number)

    def _fresh_connections(self, seen: list[int]) -> None:
        for _ in range(MAX_REQUESTS_PER_CLIENT):
            if self.stop.is_set():
                return
            try:
                leaf = fetch((self.running.host, self.running.port), self.cafile)
            except Exception as exc:
                self.failures.append(f"fresh connection: {exc!r}")
                continue
            seen.append(leaf.serial_number)


# --- renewal: same key, new certificate ----------------------------------------------------


@pytest.mark.parametrize("trigger", ["reload-call", "file-poller"])
async def test_renewal_reaches_new_handshakes_without_a_failed_request(
    ca: trustme.CA,
    tmp_path: Path,
    cafile: Path,
    key: KeyFiles,
    errors: Callable[[], list[str]],
    trigger: Literal["reload-call", "file-poller"],
) -> None:
    old = leaf_of(key.chain)
    renewal = reissue(ca, key, lifetime=timedelta(days=45))
    new = x509.load_pem_x509_certificate(renewal)
    assert (new.serial_number, new.not_valid_after_utc) != (
        old.serial_number,
        old.not_valid_after_utc,
    )
    config = make_config(
        [key], base_dir=tmp_path, extra=FAST_POLL if trigger == "file-poller" else NO_POLL
    )
    async with serving(config) as running, trio.open_nursery() as clients:
        server = running.server
        polled = trigger == "file-poller"
        traffic = Traffic(running, cafile)
        try:
            await traffic.start(clients)
            await traffic.wait_for_each([REQUESTS_PER_STAGE] * len(traffic.serials), "clients")
            before = traffic.counts()

            replace_file(key.chain, renewal)
            if polled:
                await wait_until(lambda: server.reloads_ok >= 1, "the poller's reload")
            else:
                assert await server.reload("test")
            reloaded = traffic.counts()

            more = [n + REQUESTS_PER_STAGE + 1 for n in reloaded]
            await traffic.wait_for_each(more, "requests after the reload")
        finally:
            traffic.stop.set()

    assert traffic.failures == []
    assert (server.reloads_ok, server.reloads_failed) == (1, 0)
    assert errors() == []
    kept, *fresh = traffic.serials
    # The connection opened before the reload kept its certificate and kept working.
    assert set(kept) == {old.serial_number}
    assert len(kept) > reloaded[0] + REQUESTS_PER_STAGE
    for seen, started, done in zip(fresh, before[1:], reloaded[1:], strict=True):
        # Before the file changed: the old certificate. A request that began after the
        # reload had finished: the new one. (The one in flight at that moment may see either.)
        assert set(seen[:started]) == {old.serial_number}
        assert set(seen[done + 1 :]) == {new.serial_number}
    assert server.snapshot.keys["k2026a"].pin == key.pin == spki_pin_of_certificate(new)
    assert server.snapshot.keys["k2026a"].not_after == new.not_valid_after_utc


# --- torn writes, bad permissions, unexpected failures: the old material keeps serving ------


async def test_torn_write_is_refused_until_the_key_lands(
    ca: trustme.CA,
    tmp_path: Path,
    cafile: Path,
    key: KeyFiles,
    errors: Callable[[], list[str]],
) -> None:
    rotated = make_key(ca, tmp_path / "next", "k2026a")  # a new key pair, its chain
    config = make_config([key], base_dir=tmp_path, extra=NO_POLL)
    async with serving(config) as running:
        server = running.server
        kept = await trio.to_thread.run_sync(Session, (running.host, running.port), cafile)
        with kept:
            previous = server.snapshot
            replace_file(key.chain, rotated.chain.read_bytes())  # the chain is written first
            assert not await server.reload("test")
            assert (server.reloads_ok, server.reloads_failed) == (0, 1)
            assert server.snapshot is previous
            [error] = errors()
            assert str(key.chain) in error
            assert "different key" in error
            assert spki_pin_of_certificate(await fetch_async(running, cafile)) == key.pin
            await trio.to_thread.run_sync(kept.get)

            replace_file(key.key, rotated.key.read_bytes(), mode=0o600)  # then the key
            assert await server.reload("test")
            assert (server.reloads_ok, server.reloads_failed) == (1, 1)
            assert spki_pin_of_certificate(await fetch_async(running, cafile)) == rotated.pin
            await trio.to_thread.run_sync(kept.get)  # opened on the old key, still served
            assert spki_pin_of_certificate(kept.leaf) == key.pin


async def test_poller_retries_when_the_key_lands_while_a_reload_fails(
    ca: trustme.CA,
    tmp_path: Path,
    cafile: Path,
    key: KeyFiles,
) -> None:
    """The writer finishes (key after chain) while the poller is loading the torn pair.

    The failed load must not mark the finished files as seen: the next poll reloads them.
    """
    rotated = make_key(ca, tmp_path / "next", "k2026a")
    config = make_config([key], base_dir=tmp_path, extra=FAST_POLL)
    landed = threading.Event()

    def load_while_the_key_lands(current: Config) -> tuple[Config, KeySnapshot]:
        try:
            return read_files(current)
        finally:
            if not landed.is_set():
                replace_file(key.key, rotated.key.read_bytes(), mode=0o600)
                landed.set()

    async with serving(config, load=load_while_the_key_lands) as running:
        server = running.server
        replace_file(key.chain, rotated.chain.read_bytes())
        await wait_until(lambda: server.reloads_ok >= 1, "a reload of the finished pair")
        assert server.reloads_failed == 1
        assert spki_pin_of_certificate(await fetch_async(running, cafile)) == rotated.pin


async def test_key_readable_by_others_is_refused_on_reload(
    ca: trustme.CA,
    tmp_path: Path,
    cafile: Path,
    key: KeyFiles,
    errors: Callable[[], list[str]],
) -> None:
    old = leaf_of(key.chain)
    config = make_config([key], base_dir=tmp_path, extra=NO_POLL)
    async with serving(config) as running:
        server = running.server
        replace_file(key.chain, reissue(ca, key))
        key.key.chmod(0o644)
        assert not await server.reload("test")
        assert (server.reloads_ok, server.reloads_failed) == (0, 1)
        [error] = errors()
        assert str(key.key) in error
        assert "0644" in error
        assert (await fetch_async(running, cafile)).serial_number == old.serial_number

        key.key.chmod(0o600)
        assert await server.reload("test")
        served = await fetch_async(running, cafile)
        assert served.serial_number == leaf_of(key.chain).serial_number != old.serial_number
        assert spki_pin_of_certificate(served) == key.pin


async def test_unexpected_error_in_a_polled_reload_keeps_the_server_serving(
    tmp_path: Path,
    cafile: Path,
    key: KeyFiles,
    errors: Callable[[], list[str]],
) -> None:
    """A bug in loading (not an operator error) is logged with its traceback; serving goes on."""
    config = make_config([key], base_dir=tmp_path, extra=FAST_POLL)
    broken = True

    def load_with_a_bug(current: Config) -> tuple[Config, KeySnapshot]:
        if broken:
            raise RuntimeError("a bug while loading")
        return read_files(current)

    async with serving(config, load=load_with_a_bug) as running:
        server = running.server
        replace_file(key.chain, key.chain.read_bytes())  # same content, new file: a change
        await wait_until(lambda: server.reloads_failed >= 1, "the poller's failed reload")
        [error] = errors()
        assert "RuntimeError: a bug while loading" in error
        assert spki_pin_of_certificate(await fetch_async(running, cafile)) == key.pin
        broken = False  # and the poller is still polling
        replace_file(key.chain, key.chain.read_bytes())
        await wait_until(lambda: server.reloads_ok >= 1, "the poller's next reload")


async def test_overlapping_reloads_end_with_the_newest_files(
    ca: trustme.CA,
    tmp_path: Path,
    cafile: Path,
    key: KeyFiles,
) -> None:
    """A reload that read the files before a renewal cannot finish after one that read them
    after it (the poller and SIGHUP both reload): reloads run one at a time."""
    config = make_config([key], base_dir=tmp_path, extra=NO_POLL)
    first_read, release_first = threading.Event(), threading.Event()

    def slow_first_load(current: Config) -> tuple[Config, KeySnapshot]:
        loaded = read_files(current)
        if not first_read.is_set():
            first_read.set()
            release_first.wait(DEADLINE)
        return loaded

    async with serving(config, load=slow_first_load) as running:
        server = running.server
        results: list[bool] = []

        async def reload() -> None:
            results.append(await server.reload("test"))

        async with trio.open_nursery() as nursery:
            try:
                nursery.start_soon(reload)
                await wait_until(first_read.is_set, "the first reload to read the files")
                replace_file(key.chain, reissue(ca, key))
                nursery.start_soon(reload)
                # The second reload is queued behind the first (the test cannot tell "will
                # never overlap" from "has not overlapped yet" any other way). Were they not
                # serialized, the second would finish here and the first would then put the
                # older material back.
                await wait_until(
                    lambda: server.reloads.waiting == 1 or bool(results),
                    "the second reload to queue",
                )
            finally:
                release_first.set()
        assert results == [True, True]
        renewed = leaf_of(key.chain)
        assert server.snapshot.keys["k2026a"].leaf.serial_number == renewed.serial_number
        assert (await fetch_async(running, cafile)).serial_number == renewed.serial_number


# --- config file reloads -------------------------------------------------------------------

DURING: Final = datetime(2026, 12, 15, tzinfo=UTC)


def rotation(grace_end: datetime) -> dict[str, Any]:
    return {
        "old": "k2026a",
        "new": "k2026b",
        "grace_start": datetime(2026, 12, 1, tzinfo=UTC),
        "grace_end": grace_end,
    }


async def test_config_reload_follows_the_new_window_and_refuses_a_broken_edit(
    ca: trustme.CA,
    tmp_path: Path,
    cafile: Path,
    errors: Callable[[], list[str]],
) -> None:
    keys = [make_key(ca, tmp_path / "certs", name) for name in ("k2026a", "k2026b")]
    old, new = keys
    config_file = tmp_path / "config.toml"
    config = write_config(
        config_file, keys, rotation=rotation(datetime(2027, 1, 15, tzinfo=UTC)), extra=NO_POLL
    )
    async with serving(config, clock=Clock(DURING)) as running:
        server = running.server
        assert spki_pin_of_certificate(await fetch_async(running, cafile)) == old.pin

        # The window now closed on 2026-12-10: at DURING everyone gets new.
        early_end = datetime(2026, 12, 10, tzinfo=UTC)
        write_config(config_file, keys, rotation=rotation(early_end), extra=NO_POLL)
        assert await server.reload("test")
        assert server.config.rotation is not None
        assert server.config.rotation.grace_end == early_end
        assert spki_pin_of_certificate(await fetch_async(running, cafile)) == new.pin

        text = config_file.read_text()
        config_file.write_text(text.replace("grace_end =", "grace_ends ="))  # a typo
        assert not await server.reload("test")
        assert (server.reloads_ok, server.reloads_failed) == (1, 1)
        [error] = errors()
        assert (
            f"{config_file}: rotation.grace_ends: unknown setting; did you mean 'grace_end'?"
            in error
        )
        assert server.config.rotation.grace_end == early_end
        assert spki_pin_of_certificate(await fetch_async(running, cafile)) == new.pin


async def test_hello_that_arrives_after_a_config_reload_uses_the_material_of_its_accept(
    ca: trustme.CA,
    tmp_path: Path,
    cafile: Path,
) -> None:
    """The reload adds a rotation (identities old/new) while a client that connected before it
    has not yet sent its hello: that connection keeps the config and keys it was accepted
    with (identity single), and the next one follows the new config."""
    keys = [make_key(ca, tmp_path / "certs", name) for name in ("k2026a", "k2026b")]
    old, new = keys
    config_file = tmp_path / "config.toml"
    config = write_config(config_file, [old], extra=NO_POLL)
    after_the_window = Clock(datetime(2027, 2, 1, tzinfo=UTC))
    async with serving(config, clock=after_the_window) as running:
        address = (running.host, running.port)
        raw = await trio.to_thread.run_sync(
            lambda: socket.create_connection(address, timeout=CLIENT_TIMEOUT)
        )
        with raw:
            # Nothing can run until the server has accepted and is waiting for the hello.
            await trio.testing.wait_all_tasks_blocked()
            write_config(
                config_file,
                keys,
                rotation=rotation(datetime(2027, 1, 15, tzinfo=UTC)),
                extra=NO_POLL,
            )
            assert await running.server.reload("test")
            context = ssl.create_default_context(cafile=str(cafile))

            def handshake() -> x509.Certificate:
                with context.wrap_socket(raw, server_hostname=SNI) as tls:
                    der = tls.getpeercert(binary_form=True)
                    assert der is not None
                    return x509.load_der_x509_certificate(der)

            leaf = await trio.to_thread.run_sync(handshake)
        assert spki_pin_of_certificate(leaf) == old.pin
        assert spki_pin_of_certificate(await fetch_async(running, cafile)) == new.pin


async def test_config_reload_keeps_the_listen_addresses(
    tmp_path: Path,
    cafile: Path,
    key: KeyFiles,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Sockets are bound once: a new listen address is reported, not applied."""
    caplog.set_level(logging.INFO, logger="dualproxy")
    config_file = tmp_path / "config.toml"
    config = write_config(config_file, [key], extra=NO_POLL)
    async with serving(config) as running:
        server = running.server
        write_config(
            config_file,
            [key],
            listen="127.0.0.1:9",
            extra={"keystore": {"reload_poll_interval": 1800}, "limits": {"max_connections": 7}},
        )
        assert await server.reload("test")
        assert server.config.listen == config.listen
        assert server.config.keystore.reload_poll_interval == 1800  # the rest does apply
        assert server.config.limits.max_connections == 7
        assert server.config.path == config_file
        assert any("restart dualproxy" in r.getMessage() for r in caplog.records)
        assert spki_pin_of_certificate(await fetch_async(running, cafile)) == key.pin


def test_an_acme_change_that_needs_a_restart_is_named() -> None:
    """What the responders and the http-01 listener were set up with at start (a server's,
    or a supervisor's workers') needs a restart: [acme] added or removed, its http_listen,
    its folder; the twin: every other [acme] setting applies at once (renewals read it at
    each look), and no [acme] before or after is no change."""
    before = AcmeConfig("https://ca.example/dir", Path("/state/account.pem"))
    assert acme_restart_needed(None, None) is None
    assert acme_restart_needed(before, before) is None
    applied = replace(before, renew_fraction=0.5, renew=False, directory="https://other/dir")
    assert acme_restart_needed(before, applied) is None
    assert acme_restart_needed(None, before) == "[acme] added"
    assert acme_restart_needed(before, None) == "[acme] removed"
    moved = replace(before, http_listen=ListenAddress("0.0.0.0", 80))
    assert acme_restart_needed(before, moved) == "acme.http_listen changed"
    elsewhere = replace(before, account_key=Path("/other/account.pem"))
    changed = acme_restart_needed(before, elsewhere)
    assert changed is not None
    assert changed.startswith("the ACME folder")


# --- SIGHUP and SIGTERM: `dualproxy serve` as operators run it ------------------------------


async def read_lines(stream: trio.abc.ReceiveStream, lines: list[str]) -> None:
    pending = b""
    while chunk := await stream.receive_some():
        pending += chunk
        *complete, pending = pending.split(b"\n")
        lines += [line.decode("utf-8", "replace") for line in complete]


async def test_sighup_reloads_and_sigterm_stops_dualproxy_serve(
    ca: trustme.CA, tmp_path: Path, cafile: Path, key: KeyFiles
) -> None:
    config_file = tmp_path / "config.toml"
    write_config(config_file, [key], extra=NO_POLL)
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "dualproxy", "serve", "-c", str(config_file)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    lines: list[str] = []

    def logged(pattern: str) -> re.Match[str] | None:
        return next((m for line in lines if (m := re.search(pattern, line))), None)

    try:
        async with trio.open_nursery() as nursery:
            assert process.stderr is not None
            nursery.start_soon(read_lines, process.stderr, lines)
            await wait_until(
                lambda: bool(logged(r"listening on")) or process.poll() is not None,
                "dualproxy serve to listen",
            )
            found = logged(r"listening on 127\.0\.0\.1:(\d+)")
            assert found is not None, lines
            address = ("127.0.0.1", int(found.group(1)))
            # Once a connection has been served, the signal watcher (started along with the
            # listeners) has installed its handlers: a SIGHUP cannot meet the default action.
            old = await fetch_async(address, cafile)
            assert old.serial_number == leaf_of(key.chain).serial_number

            replace_file(key.chain, reissue(ca, key))
            process.send_signal(signal.SIGHUP)
            await wait_until(lambda: bool(logged(r"reloaded \(SIGHUP")), "the SIGHUP reload")
            renewed = await fetch_async(address, cafile)
            assert renewed.serial_number == leaf_of(key.chain).serial_number != old.serial_number
            assert spki_pin_of_certificate(renewed) == key.pin
            # The reload line says what changed: the file, and the new certificate's serial.
            chain = key.chain.relative_to(tmp_path)
            serial = f"{renewed.serial_number:X}"
            assert logged(
                rf"reloaded \(SIGHUP: changed {re.escape(str(chain))}; {key.name}: new"
                rf" certificate \(serial {serial}, until .*\); TLS contexts rebuilt: single\)"
            ), lines

            process.send_signal(signal.SIGTERM)
            with trio.fail_after(DEADLINE):
                assert await process.wait() == 0, lines
        assert logged(r"SIGTERM: stopping")
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
            if process.stderr is not None:
                await process.stderr.aclose()


async def test_renewal_between_start_and_first_poll_is_picked_up(
    ca: trustme.CA, tmp_path: Path, cafile: Path, key: KeyFiles
) -> None:
    """The poller's baseline is taken before the starting keys are read, so a renewal that
    lands while the server starts is not mistaken for what it already serves."""
    config = make_config([key], base_dir=tmp_path, extra=FAST_POLL)
    server = Server(config, handle_signals=False)  # reads the keys now
    replace_file(key.chain, reissue(ca, key, lifetime=timedelta(days=33)))
    async with trio.open_nursery() as nursery:
        [(host, port), *_] = await nursery.start(server.run)
        await wait_until(lambda: server.reloads_ok >= 1, "the reload of the renewed chain")
        leaf = await fetch_async((host, port), cafile)
        nursery.cancel_scope.cancel()
    assert spki_pin_of_certificate(leaf) == key.pin
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc > timedelta(days=32)


# --- only what changed ------------------------------------------------------------------------


def tls12_client(cafile: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cafile))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


def resumed(
    address: Address, context: ssl.SSLContext, session: ssl.SSLSession | None
) -> tuple[bool | None, ssl.SSLSession | None]:
    """One TLS 1.2 handshake offering `session`: whether the server resumed it, and the
    session to offer next time (TLS 1.2: the ticket is there once the handshake is)."""
    with (
        socket.create_connection(address, timeout=CLIENT_TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname=SNI, session=session) as tls,
    ):
        return tls.session_reused, tls.session


async def test_a_sighup_reload_is_not_followed_by_a_second_from_the_poller(
    ca: trustme.CA, tmp_path: Path, cafile: Path, key: KeyFiles
) -> None:
    config = make_config([key], base_dir=tmp_path, extra=FAST_POLL)
    async with serving(config) as running:
        server = running.server
        replace_file(key.chain, reissue(ca, key))
        assert await server.reload("SIGHUP")
        polls = server.reloads.polls
        await wait_until(lambda: server.reloads.polls >= polls + 3, "three more polls")
        assert (server.reloads_ok, server.reloads_failed) == (1, 0)
        # Its twin: the poller still sees a change nobody reloaded.
        replace_file(key.chain, reissue(ca, key))
        await wait_until(lambda: server.reloads_ok == 2, "the poller's reload")
        polls = server.reloads.polls
        await wait_until(lambda: server.reloads.polls >= polls + 3, "three more polls")
        assert (server.reloads_ok, server.reloads_failed) == (2, 0)


async def test_a_manifest_re_sign_keeps_the_tls_contexts_and_the_sessions(
    ca: trustme.CA,
    tmp_path: Path,
    cafile: Path,
    key: KeyFiles,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A manifest re-sign touches no key: the contexts (their ticket keys) stay, so a client's
    next connection resumes instead of a full handshake. A renewal rebuilds them (twin)."""
    caplog.set_level(logging.INFO, logger="dualproxy")
    manifest_file = tmp_path / "pins.jws"
    manifest_file.write_text("first\n")
    extra = {**FAST_POLL, "manifest": {"file": str(manifest_file)}}
    config_file = tmp_path / "config.toml"
    config = write_config(config_file, [key], extra=extra)
    async with serving(config) as running:
        server = running.server
        snapshot, local = server.snapshot, server.material.local
        address = (running.host, running.port)
        client = tls12_client(cafile)
        reused, session = await trio.to_thread.run_sync(resumed, address, client, None)
        assert not reused

        replace_file(manifest_file, b"second\n")
        await wait_until(lambda: server.reloads_ok == 1, "the poller's reload")
        assert server.material.local is not local  # the new manifest is served...
        assert server.snapshot is snapshot  # ...from the same contexts
        reused, session = await trio.to_thread.run_sync(resumed, address, client, session)
        assert reused
        [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("reloaded")]
        assert line.startswith("reloaded (files changed: changed pins.jws; TLS contexts kept)")

        # A config edit that touches no key keeps them too, and says which setting changed.
        config_file.write_text(config_file.read_text() + "\n[limits]\nbody_timeout = 30\n")
        await wait_until(lambda: server.reloads_ok == 2, "the config's reload")
        assert server.snapshot.identities["single"] is snapshot.identities["single"]
        assert server.config.limits.body_timeout == 30
        last = [r.getMessage() for r in caplog.records if r.getMessage().startswith("reloaded")]
        assert "changed config.toml; settings changed: limits; TLS contexts kept" in last[-1]

        # The twin: a renewed chain is a new context.
        replace_file(key.chain, reissue(ca, key))
        await wait_until(lambda: server.reloads_ok == 3, "the renewal's reload")
        assert server.snapshot.identities["single"] is not snapshot.identities["single"]
        assert server.snapshot.keys["k2026a"].leaf.serial_number == leaf_of(key.chain).serial_number
