"""Issue 19 end to end: the sequential canary and a `close = "when-safe"` window, with real TLS
clients on loopback playing pinned apps.

Each client connects from its own loopback address (Linux answers for all of 127/8), so the
canary buckets them as it buckets phones; it handshakes, checks the served key against the
pins it carries and, as OkHttp's CertificatePinner does, leaves without a request when the
key is not pinned. The policy's clock is a `Clock` the test moves; the window review runs on
its own, every second of real time.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

import pytest
import trio
import trustme
from cryptography import x509
from helpers.clients import CLIENT_TIMEOUT
from helpers.configs import make_config
from helpers.keys import KeyFiles, make_key
from helpers.rotation import GRACE_END, GRACE_START, Clock
from helpers.serving import Running, serving

from dualproxy.ops import admin
from dualproxy.ops.statuspage import render_text
from dualproxy.rotation.policy import canary_bucket
from dualproxy.serve.rollout import REVIEW_SECONDS
from dualproxy.tls.pins import spki_pin_of_certificate

pytestmark = pytest.mark.e2e

DURING: Final = GRACE_START + timedelta(days=10)
DEADLINE: Final = GRACE_END + timedelta(days=30)
CANARY_PERCENT: Final = 50.0
# Bounds on the clients a test runs: the halt target is 20 canary handshakes (about 40
# clients at 50 %), and closing on a 30 % bound needs about 30 healthy canary handshakes.
MAX_CLIENTS: Final = 200
# Waiting for the window review, which runs every REVIEW_SECONDS.
REVIEW_WAIT: Final = 5 * REVIEW_SECONDS


def sources(in_canary: bool | None = None) -> Iterator[str]:
    """Loopback client addresses, in order; only those in (or out of) the canary if asked."""
    for address in ipaddress.IPv4Network("127.0.0.0/16").hosts():
        if address.packed[3] == 0:
            continue
        if in_canary is None or (canary_bucket(address) < CANARY_PERCENT) is in_canary:
            yield str(address)


def app(host: str, port: int, cafile: Path, source: str, pins: frozenset[str]) -> tuple[str, bool]:
    """A pinned app's connection: the served key's pin, and whether the app used it (pinned:
    one GET, answered) or left without a request (not pinned)."""
    context = ssl.create_default_context(cafile=str(cafile))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as raw:
        raw.settimeout(CLIENT_TIMEOUT)
        raw.bind((source, 0))
        raw.connect((host, port))
        with context.wrap_socket(raw, server_hostname="api.example.com") as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            pin = spki_pin_of_certificate(x509.load_der_x509_certificate(der))
            if pin not in pins:
                return pin, False
            tls.sendall(b"GET / HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200 ")
            return pin, True


async def app_async(
    run: Running, cafile: Path, source: str, pins: frozenset[str]
) -> tuple[str, bool]:
    return await trio.to_thread.run_sync(app, run.host, run.port, cafile, source, pins)


async def counted(run: Running, connections: int) -> None:
    """Wait until the server has accounted for `connections` (it does after the client left)."""
    with trio.fail_after(CLIENT_TIMEOUT):
        while sum(row.connections for row in admin.status_of(run.server).rows) < connections:
            await trio.sleep(0.01)


@pytest.fixture
def keys(ca: trustme.CA, tmp_path: Path) -> dict[str, KeyFiles]:
    return {name: make_key(ca, tmp_path / "certs", name) for name in ("k2026a", "k2026b")}


def plan(**changes: Any) -> dict[str, Any]:
    return {
        "old": "k2026a",
        "new": "k2026b",
        "grace_start": GRACE_START,
        "grace_end": GRACE_END,
        "canary_percent": CANARY_PERCENT,
        **changes,
    }


async def fail_until_halted(
    run: Running, cafile: Path, fleet: Iterator[str], pins: frozenset[str]
) -> int:
    """Clients carrying `pins` from `fleet` until the canary halts; the clients that ran."""
    served = 0
    while not run.server.evidence.canary.halted and served < MAX_CLIENTS:
        await app_async(run, cafile, next(fleet), pins)
        served += 1
        await counted(run, served)
    return served


@pytest.mark.parametrize("broken", [True, False], ids=["broken-new-key", "pinned-new-key"])
async def test_a_broken_new_key_halts_the_canary_within_20_canary_handshakes(
    keys: dict[str, KeyFiles], cafile: Path, tmp_path: Path, broken: bool
) -> None:
    old, new = keys["k2026a"], keys["k2026b"]
    config = make_config([old, new], rotation=plan(), base_dir=tmp_path)
    # Broken: the fleet pins only the old key. Its twin: the fleet pins both.
    pins = frozenset({old.pin} if broken else {old.pin, new.pin})
    fleet = sources()
    async with serving(config, clock=Clock(DURING)) as run:
        served = await fail_until_halted(run, cafile, fleet, pins) if broken else 0
        if not broken:
            for served in range(1, 81):  # as many clients as a slow halt would take
                pin, used = await app_async(run, cafile, next(fleet), pins)
                assert used
                await counted(run, served)
        judge = run.server.evidence.canary
        canary_handshakes = judge.canary.handshakes
        # The next client in the canary's buckets: the old key again after a halt.
        pin, used = await app_async(run, cafile, next(sources(in_canary=True)), pins)
    if broken:
        assert judge.halted
        assert canary_handshakes <= 20
        assert judge.canary.pin_failures == canary_handshakes  # every one of them failed
        assert served < MAX_CLIENTS
        assert (pin, used) == (old.pin, True)
    else:
        assert not judge.halted
        assert canary_handshakes >= 30
        assert (pin, used) == (new.pin, True)


async def test_a_when_safe_window_is_held_past_grace_end_and_closes_once_old_only_apps_are_gone(
    keys: dict[str, KeyFiles], cafile: Path, tmp_path: Path
) -> None:
    old, new = keys["k2026a"], keys["k2026b"]
    # A 30 % bound: what a few dozen loopback clients can prove (0.5 % needs thousands).
    rotation = plan(close="when-safe", max_breakage=0.3, grace_deadline=DEADLINE)
    config = make_config([old, new], rotation=rotation, base_dir=tmp_path)
    old_only, both = frozenset({old.pin}), frozenset({old.pin, new.pin})
    clock = Clock(DURING)
    fleet = sources()
    outside = sources(in_canary=False)
    async with serving(config, clock=clock) as run:
        # An app version without the backup pin is in the field: the canary halts on it.
        served = await fail_until_halted(run, cafile, fleet, old_only)
        assert run.server.evidence.canary.halted
        # grace_end passes: the window is held open, the old key stays the default.
        clock.now = GRACE_END + timedelta(hours=1)
        with trio.fail_after(REVIEW_WAIT):
            while run.server.evidence.window.verdict is None:
                await trio.sleep(0.05)
        assert run.server.evidence.window.verdict.state == "held"
        pin, used = await app_async(run, cafile, next(outside), old_only)
        assert (pin, used) == (old.pin, True)
        served += 1
        text = render_text(admin.status_of(run.server))
        assert "window: HELD OPEN past grace_end" in text
        # The old-only version is gone (everyone updated): the operator resumes the canary
        # and the fleet, now pinning both keys, proves it safe.
        run.server.evidence.canary.resume()
        while not run.server.evidence.window.closed and served < MAX_CLIENTS:
            pin, used = await app_async(run, cafile, next(fleet), both)
            assert used
            served += 1
            await counted(run, served)
            if served % 10 == 0:  # let a review see the counts
                await trio.sleep(REVIEW_SECONDS)
        assert run.server.evidence.window.closed
        closed_after = served
        # Closed: every client gets the new key, and the window stays closed.
        pin, used = await app_async(run, cafile, next(outside), both)
        assert (pin, used) == (new.pin, True)
        status = admin.status_of(run.server)
    assert closed_after < MAX_CLIENTS
    assert status.phase == "after"
    assert status.window is not None
    assert status.window.state == "closed"
    assert status.canary is not None
    assert status.canary.state == "over"


async def test_a_when_safe_window_closes_at_its_deadline_whatever_the_evidence(
    keys: dict[str, KeyFiles], cafile: Path, tmp_path: Path
) -> None:
    old, new = keys["k2026a"], keys["k2026b"]
    rotation = plan(close="when-safe", max_breakage=0.3, grace_deadline=DEADLINE)
    config = make_config([old, new], rotation=rotation, base_dir=tmp_path)
    old_only = frozenset({old.pin})
    clock = Clock(DURING)
    async with serving(config, clock=clock) as run:
        await fail_until_halted(run, cafile, sources(), old_only)
        clock.now = DEADLINE - timedelta(seconds=1)
        held = await app_async(run, cafile, next(sources(in_canary=False)), old_only)
        clock.now = DEADLINE
        after = await app_async(run, cafile, next(sources(in_canary=False)), old_only)
        with trio.fail_after(REVIEW_WAIT):
            while (verdict := run.server.evidence.window.verdict) is None or (
                verdict.state != "closed-at-deadline"
            ):
                await trio.sleep(0.05)
    assert held == (old.pin, True)
    assert after == (new.pin, False)  # the old-only app breaks: the deadline is hard
