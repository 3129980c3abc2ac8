"""Session-ticket keys managed by dualproxy (tls.tickets): tickets resume across contexts that
share a ring (a reload, another worker), across a rotation within the decryption window and
not after it, not across a change of served keys; off means none sent; the key file is 0600
and one others may read is refused.

Real handshakes: a Python ssl client and server over a socket pair, TLS 1.2 and TLS 1.3 each
(TLS 1.2 tickets and TLS 1.3 stateless PSK tickets both go through the ring's callback)."""

from __future__ import annotations

import fcntl
import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Final

import pytest
import trio
import trustme
from helpers.clients import CLIENT_TIMEOUT, Resuming
from helpers.configs import make_config
from helpers.keys import KeyFiles, make_key, reissue
from helpers.serving import serving

from dualproxy.config.errors import OperatorError
from dualproxy.config.loader import parse
from dualproxy.config.schema import TICKET_KEY_ROTATION_RANGE, TlsSettings
from dualproxy.tls.tickets import (
    CLOCK_SKEW,
    ROTATION_MIN_SLEEP,
    TicketKey,
    TicketKeys,
    keep_rotating,
    tickets_supported,
)

ROTATION: Final = 3600.0
START: Final = 1_800_000_000.0
PINS: Final = ("pin-of-the-served-key",)
VERSIONS: Final = [
    pytest.param(ssl.TLSVersion.TLSv1_2, id="tls1.2"),
    pytest.param(ssl.TLSVersion.TLSv1_3, id="tls1.3"),
]


class FakeClock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def leaf() -> tuple[trustme.CA, trustme.LeafCert]:
    ca = trustme.CA()
    return ca, ca.issue_cert("api.example.com")


def server_context(leaf: tuple[trustme.CA, trustme.LeafCert]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.num_tickets = 1
    leaf[1].configure_cert(context)
    return context


class Client:
    """A client that keeps its last session (ticket) and offers it on the next connection."""

    def __init__(self, ca: trustme.CA, version: ssl.TLSVersion) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.context.minimum_version = self.context.maximum_version = version
        ca.configure_trust(self.context)
        self.session: ssl.SSLSession | None = None

    def connect(self, server: ssl.SSLContext) -> bool:
        """One connection to `server` with one byte each way; whether it resumed."""
        ours, theirs = socket.socketpair()
        failure: list[BaseException] = []

        def serve() -> None:
            try:
                with server.wrap_socket(theirs, server_side=True) as tls:
                    tls.recv(1)
                    tls.sendall(b"x")  # TLS 1.3: the ticket goes out before this
            except (OSError, ssl.SSLError) as exc:
                failure.append(exc)

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            ours.settimeout(CLIENT_TIMEOUT)
            with self.context.wrap_socket(
                ours, server_hostname="api.example.com", session=self.session
            ) as tls:
                tls.sendall(b"y")
                assert tls.recv(1) == b"x"
                self.session, resumed = tls.session, bool(tls.session_reused)
        finally:
            thread.join(CLIENT_TIMEOUT)
        assert not failure, failure
        return resumed

    def has_ticket(self) -> bool:
        return self.session is not None and self.session.has_ticket


@pytest.fixture(autouse=True)
def _supported() -> None:
    # The set-up's interpreter (Debian 12's python3.11, OpenSSL 3.0) must support it: a
    # test that skipped here would hide the fail-closed path taking over.
    assert tickets_supported() is None


def managed(
    leaf: tuple[trustme.CA, trustme.LeafCert], ring: TicketKeys, pins: tuple[str, ...] = PINS
) -> ssl.SSLContext:
    context = server_context(leaf)
    ring.install(context, pins)
    return context


# --- one ring, several contexts -------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_a_ticket_resumes_under_another_context_of_the_same_ring(
    leaf: tuple[trustme.CA, trustme.LeafCert], version: ssl.TLSVersion
) -> None:
    """Two contexts built apart (as a reload or two workers build them), one ring."""
    ring = TicketKeys(TlsSettings())
    client = Client(leaf[0], version)
    assert not client.connect(managed(leaf, ring))
    assert client.has_ticket()
    for _ in range(3):
        assert client.connect(managed(leaf, ring))


@pytest.mark.parametrize("version", VERSIONS)
def test_a_ticket_does_not_resume_under_another_ring(
    leaf: tuple[trustme.CA, trustme.LeafCert], version: ssl.TLSVersion
) -> None:
    client = Client(leaf[0], version)
    assert not client.connect(managed(leaf, TicketKeys(TlsSettings())))
    assert not client.connect(managed(leaf, TicketKeys(TlsSettings())))


@pytest.mark.parametrize("version", VERSIONS)
def test_openssls_own_keys_do_not_resume_under_another_context(
    leaf: tuple[trustme.CA, trustme.LeafCert], version: ssl.TLSVersion
) -> None:
    """What a reload did before: each context its own random ticket key."""
    client = Client(leaf[0], version)
    first = server_context(leaf)
    assert not client.connect(first)
    assert client.connect(first)
    assert not client.connect(server_context(leaf))


@pytest.mark.parametrize("version", VERSIONS)
def test_a_ticket_does_not_resume_where_other_keys_are_served(
    leaf: tuple[trustme.CA, trustme.LeafCert], version: ssl.TLSVersion
) -> None:
    """A session made while the old key was served must not resume on a context serving the
    new one: the client would keep the old certificate."""
    ring = TicketKeys(TlsSettings())
    client = Client(leaf[0], version)
    assert not client.connect(managed(leaf, ring, ("old-pin",)))
    assert not client.connect(managed(leaf, ring, ("new-pin",)))
    assert client.connect(managed(leaf, ring, ("new-pin",)))


# --- rotation -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_after_a_rotation_a_ticket_resumes_within_the_window_and_not_after(
    leaf: tuple[trustme.CA, trustme.LeafCert], version: ssl.TLSVersion
) -> None:
    clock = FakeClock()
    ring = TicketKeys(TlsSettings(ticket_key_rotation=ROTATION), clock=clock)
    context = managed(leaf, ring)
    client = Client(leaf[0], version)
    assert not client.connect(context)
    issued = client.session
    first_key = ring.valid_keys()[0]

    clock.now = START + ROTATION  # the key that encrypted it now only decrypts
    keys = ring.valid_keys()
    assert [key.created for key in keys] == [START + ROTATION, START]
    assert keys[1] == first_key
    assert client.connect(context)  # and its new ticket is under the new key
    assert client.has_ticket()

    clock.now = START + 2 * ROTATION - 1  # the last second of the first key's window
    client.session = issued
    assert client.connect(context)

    clock.now = START + 2 * ROTATION  # past it: a full handshake
    client.session = issued
    assert not client.connect(context)
    assert first_key not in ring.valid_keys()


def test_at_most_two_keys_are_held_and_rotation_is_on_schedule() -> None:
    clock = FakeClock()
    ring = TicketKeys(TlsSettings(ticket_key_rotation=ROTATION), clock=clock)
    assert [key.created for key in ring.valid_keys()] == [START]
    clock.now = START + ROTATION - 1
    assert not ring.rotate_if_due()
    for step in range(1, 50):
        clock.now = START + step * ROTATION
        assert ring.rotate_if_due()
        assert [key.created for key in ring.valid_keys()] == [clock.now, clock.now - ROTATION]
    clock.now += 10 * ROTATION  # idle for long: the old keys are not kept
    assert [key.created for key in ring.valid_keys()] == [clock.now]
    assert len({key.name for key in ring.valid_keys()}) == len(ring.valid_keys())


def test_the_rotation_range_holds_a_day_of_keys_at_most() -> None:
    _, high = TICKET_KEY_ROTATION_RANGE
    assert 2 * high <= 24 * 3600
    assert TlsSettings().ticket_key_rotation == 12 * 3600  # Caddy's


def test_a_key_shows_no_bytes() -> None:
    ring = TicketKeys(TlsSettings())
    [key] = ring.valid_keys()
    assert key.aes_key.hex() not in repr(key)
    assert key.hmac_key.hex() not in repr(key)
    assert key.name.hex() not in repr(key)
    assert "created" in repr(key)


# --- tickets off ----------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_tickets_off_sends_none(
    leaf: tuple[trustme.CA, trustme.LeafCert], version: ssl.TLSVersion
) -> None:
    ring = TicketKeys(TlsSettings(session_tickets=False))
    context = managed(leaf, ring)
    client = Client(leaf[0], version)
    assert not client.connect(context)
    assert not client.has_ticket()
    if version is ssl.TLSVersion.TLSv1_3:  # TLS 1.2 session ids may resume on one context
        assert not client.connect(context)


@pytest.mark.parametrize("version", VERSIONS)
def test_tickets_on_sends_one(
    leaf: tuple[trustme.CA, trustme.LeafCert], version: ssl.TLSVersion
) -> None:
    client = Client(leaf[0], version)
    assert not client.connect(managed(leaf, TicketKeys(TlsSettings(session_tickets=True))))
    assert client.has_ticket()


# --- the key file ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_the_key_file_is_0600_and_carries_the_keys_across_a_restart(
    leaf: tuple[trustme.CA, trustme.LeafCert], tmp_path: Path, version: ssl.TLSVersion
) -> None:
    path = tmp_path / "ticket.keys"
    settings = TlsSettings(ticket_key_file=path)
    client = Client(leaf[0], version)
    assert not client.connect(managed(leaf, TicketKeys(settings)))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert client.connect(managed(leaf, TicketKeys(settings)))  # a new process, same file


def test_the_key_file_follows_a_rotation(tmp_path: Path) -> None:
    path = tmp_path / "ticket.keys"
    clock = FakeClock()
    settings = TlsSettings(ticket_key_rotation=ROTATION, ticket_key_file=path)
    ring = TicketKeys(settings, clock=clock)
    clock.now += ROTATION
    assert ring.rotate_if_due()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert TicketKeys(settings, clock=clock).valid_keys() == ring.valid_keys()
    # A second process sharing the file adopts a rotation the first made, not one of its own.
    other = TicketKeys(settings, clock=clock)
    clock.now += ROTATION
    assert ring.rotate_if_due()
    assert other.rotate_if_due()
    assert other.valid_keys() == ring.valid_keys()


def test_keys_past_their_window_in_the_file_are_not_used(tmp_path: Path) -> None:
    path = tmp_path / "ticket.keys"
    clock = FakeClock()
    settings = TlsSettings(ticket_key_rotation=ROTATION, ticket_key_file=path)
    old = TicketKeys(settings, clock=clock).valid_keys()
    clock.now += 2 * ROTATION
    assert not set(TicketKeys(settings, clock=clock).valid_keys()) & set(old)


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o660, 0o666])
def test_a_key_file_others_may_read_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "ticket.keys"
    TicketKeys(TlsSettings(ticket_key_file=path))
    path.chmod(mode)
    with pytest.raises(OperatorError, match="chmod 600") as refused:
        TicketKeys(TlsSettings(ticket_key_file=path))
    assert refused.value.key_path == "tls.ticket_key_file"
    assert refused.value.file == path


def test_the_state_folder_s_key_file_is_0600_and_its_errors_name_state_dir(
    tmp_path: Path, key: KeyFiles
) -> None:
    """[state] dir named and no ticket_key_file: the keys live in ticket-keys there (the
    folder made when missing), 0600 as a named file is; one others may read is refused
    naming state.dir, the setting that put it there."""
    config = make_config([key], base_dir=tmp_path, extra={"state": {"dir": "state"}})
    path = tmp_path / "state" / "ticket-keys"
    TicketKeys(config.tls)  # the folder made (0700) at the first start
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    path.chmod(0o644)
    with pytest.raises(OperatorError, match="chmod 600") as refused:
        TicketKeys(config.tls)
    assert refused.value.key_path == "state.dir"
    assert refused.value.file == path


def test_a_key_file_dualproxy_did_not_write_is_refused_without_its_bytes(tmp_path: Path) -> None:
    path = tmp_path / "ticket.keys"
    secret = "c2VjcmV0LWJ5dGVzLW5vdC1vdXJz"
    path.write_text(f'{{"version": 1, "keys": [{{"created": 1, "key": "{secret}"}}]}}')
    path.chmod(0o600)
    with pytest.raises(OperatorError, match="not one dualproxy wrote") as refused:
        TicketKeys(TlsSettings(ticket_key_file=path))
    assert secret not in str(refused.value)
    assert "delete it" in (refused.value.fix or "")


# --- the config and the server --------------------------------------------------------------


def test_the_tls_table_is_read(tmp_path: Path, key: KeyFiles) -> None:
    tls = {"session_tickets": False, "ticket_key_rotation": 600, "ticket_key_file": "t.keys"}
    config = make_config([key], base_dir=tmp_path, extra={"tls": tls})
    assert config.tls == TlsSettings(False, 600.0, tmp_path / "t.keys")
    assert make_config([key], base_dir=tmp_path).tls == TlsSettings()


@pytest.mark.parametrize(
    ("tls", "problem"),
    [
        ({"ticket_key_rotation": 59}, "ticket_key_rotation"),
        ({"ticket_key_rotation": 12 * 3600 + 1}, "ticket_key_rotation"),
        ({"session_ticket": True}, "session_ticket"),
    ],
)
def test_a_bad_tls_table_is_refused(
    tmp_path: Path, key: KeyFiles, tls: dict[str, object], problem: str
) -> None:
    with pytest.raises(OperatorError) as refused:
        parse(
            {"listen": {"address": "127.0.0.1:0"}, "keys": {key.name: key.table()}, "tls": tls},
            base_dir=tmp_path,
        )
    assert problem in str(refused.value)


@pytest.fixture
def key(ca: trustme.CA, tmp_path: Path) -> KeyFiles:
    return make_key(ca, tmp_path, "k1")


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_ticket_resumes_after_a_reload(
    ca: trustme.CA, cafile: Path, tmp_path: Path, version: ssl.TLSVersion, key: KeyFiles
) -> None:
    """A renewal (same key, new certificate) builds new contexts: the ring they share keeps
    the tickets good."""
    config = make_config(
        [key], base_dir=tmp_path, extra={"keystore": {"reload_poll_interval": 3600}}
    )
    client = Resuming(cafile, version)
    async with serving(config) as running:
        assert not await client.connect(running.port)
        before = running.server.snapshot
        key.chain.write_bytes(reissue(ca, key))
        assert await running.server.reload("test")
        assert running.server.snapshot is not before
        assert await client.connect(running.port)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("shared_file", [True, False], ids=["key-file", "no-key-file"])
async def test_two_servers_sharing_a_key_file_resume_each_others_tickets(
    cafile: Path, tmp_path: Path, version: ssl.TLSVersion, key: KeyFiles, shared_file: bool
) -> None:
    """As two workers (or replicas, or a restart) would: every reconnect, to either server,
    resumes; without the shared file, a ticket resumes only where it was issued."""
    tls = {"ticket_key_file": str(tmp_path / "ticket.keys")} if shared_file else {}
    config = make_config([key], base_dir=tmp_path, extra={"tls": tls})
    client = Resuming(cafile, version)
    async with serving(config) as first, serving(config) as second:
        assert not await client.connect(first.port)
        resumed = [await client.connect(port) for port in [second.port, first.port] * 5]
    assert resumed == [True] * 10 if shared_file else not any(resumed)


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_server_with_tickets_off_sends_none(
    cafile: Path, tmp_path: Path, version: ssl.TLSVersion, key: KeyFiles
) -> None:
    config = make_config([key], base_dir=tmp_path, extra={"tls": {"session_tickets": False}})
    client = Resuming(cafile, version)
    async with serving(config) as running:
        await client.connect(running.port)
        assert client.session is not None
        assert not client.session.has_ticket
        if version is ssl.TLSVersion.TLSv1_3:  # TLS 1.2 may resume by session id
            assert not await client.connect(running.port)


def test_keys_in_memory_only_leave_no_file(tmp_path: Path) -> None:
    TicketKeys(TlsSettings())
    assert list(tmp_path.iterdir()) == []


# --- failing closed -------------------------------------------------------------------------

FAIL_CLOSED_SCRIPT: Final = """
import logging, ssl, sys
sys.implementation.name = "otherpython"  # what tls.tickets will not reach OpenSSL through
from dualproxy.config.schema import TlsSettings
from dualproxy.tls.tickets import TicketKeys, tickets_supported
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
print("supported:", tickets_supported())
ring = TicketKeys(TlsSettings())
for _ in range(3):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ring.install(context, ["pin"])
    print("tickets:", context.num_tickets, bool(context.options & ssl.OP_NO_TICKET))
print("enabled:", ring.enabled)
"""


def test_where_keys_cannot_be_managed_tickets_are_off_and_said_once() -> None:
    """Another interpreter (here: one that says it is not CPython): no ticket under a key we
    do not manage, one warning, serving goes on."""
    result = subprocess.run(
        [sys.executable, "-c", FAIL_CLOSED_SCRIPT],
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
        check=True,
    )
    assert "supported: otherpython is not CPython" in result.stdout
    assert result.stdout.count("tickets: 0 True") == 3
    assert "enabled: False" in result.stdout
    assert result.stderr.count("session tickets are off") == 1, result.stderr


def test_where_keys_can_be_managed_tickets_are_on() -> None:
    script = FAIL_CLOSED_SCRIPT.replace('sys.implementation.name = "otherpython"', "")
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
        check=True,
    )
    assert "supported: None" in result.stdout
    assert result.stdout.count("tickets: 2 False") == 3  # OpenSSL's count, left as it was
    assert "session tickets are off" not in result.stderr


async def test_keys_are_rotated_on_schedule_without_a_handshake() -> None:
    """keep_rotating (a task beside the server's connections) replaces the key when due and
    drops the one past its window, with no handshake asking (real time: the shortest sleep
    is ROTATION_MIN_SLEEP; the outcome, not the timing, is asserted)."""
    ring = TicketKeys(TlsSettings(ticket_key_rotation=ROTATION_MIN_SLEEP / 2))
    assert ring.seconds_until_rotation() <= ROTATION_MIN_SLEEP / 2
    [first] = ring.valid_keys()
    held: list[int] = []
    with trio.fail_after(CLIENT_TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_rotating, ring)
            while ring.rotations < 3:
                await trio.sleep(ROTATION_MIN_SLEEP / 10)
                held.append(len(ring.valid_keys()))
            nursery.cancel_scope.cancel()
    assert first not in ring.valid_keys()
    assert max(held) <= 2


async def test_with_tickets_off_nothing_is_rotated() -> None:
    ring = TicketKeys(TlsSettings(session_tickets=False))
    with trio.fail_after(CLIENT_TIMEOUT):
        await keep_rotating(ring)  # returns at once
    assert ring.rotations == 0
    assert ring.valid_keys() == ()


def test_a_process_due_to_rotate_waits_for_the_key_file_and_adopts_what_it_holds(
    tmp_path: Path,
) -> None:
    """Processes sharing a key file (workers, replicas) starting or rotating at once: while
    one holds the file's lock, another waits, then adopts the key the first wrote instead of
    making its own (which the first would not know), though that key was made after the
    second began to wait (it once judged the key by the time it started waiting, found it
    made in its future, and made its own: replicas started together then resumed nothing
    of each other's)."""
    path, elsewhere = tmp_path / "ticket.keys", tmp_path / "elsewhere.keys"
    lock = os.open(tmp_path / "ticket.keys.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)  # as the process writing the file holds it
    adopted: list[tuple[TicketKey, ...]] = []
    clock = FakeClock()  # START when the second starts waiting
    second = threading.Thread(
        target=lambda: adopted.append(
            TicketKeys(TlsSettings(ticket_key_file=path), clock=clock).valid_keys()
        )
    )
    second.start()
    try:
        second.join(0.5)  # it waits for the lock (or, were there none, is done long before)
        made = START + CLOCK_SKEW + 1  # the first makes its key while the second waits
        first = TicketKeys(TlsSettings(ticket_key_file=elsewhere), clock=lambda: made)
        first_keys = first.valid_keys()
        clock.now = made
        path.write_bytes(elsewhere.read_bytes())
        path.chmod(0o600)
    finally:
        os.close(lock)
    second.join(CLIENT_TIMEOUT)
    assert adopted == [first_keys]
    assert stat.S_IMODE((tmp_path / "ticket.keys.lock").stat().st_mode) == 0o600


def test_replicas_whose_clocks_differ_adopt_each_other_s_keys(tmp_path: Path) -> None:
    """Replicas on other machines share the key file: a key stamped by a clock up to
    CLOCK_SKEW ahead of this one's is adopted (as made now, rotated on its own schedule),
    one further ahead is not trusted."""
    path = tmp_path / "ticket.keys"
    settings = TlsSettings(ticket_key_rotation=ROTATION, ticket_key_file=path)
    ahead = FakeClock()
    ahead.now = START + CLOCK_SKEW
    made_ahead = TicketKeys(settings, clock=ahead).valid_keys()
    behind = FakeClock()
    assert TicketKeys(settings, clock=behind).valid_keys() == made_ahead
    # Further ahead than that: this replica makes its own key, and the file takes it.
    path.unlink()
    ahead.now = START + CLOCK_SKEW + 1
    made_further = TicketKeys(settings, clock=ahead).valid_keys()
    own = TicketKeys(settings, clock=behind).valid_keys()
    assert [key.created for key in own] == [START]
    assert not set(own) & set(made_further)
