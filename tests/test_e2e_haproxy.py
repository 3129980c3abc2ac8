"""End to end behind a real load balancer: HAProxy (Debian's package) in `mode tcp` with
`send-proxy-v2` and health checks on /readyz, in front of two `dualproxy serve` processes that
share one state folder; clients on distinct loopback addresses (127.0.0.11, 127.0.0.12).

What it shows: each client's own address reaches the upstream (X-Forwarded-For) and the policy
(`dualproxy route --client` predicts the key each client got); SIGTERM on a replica under
continuous traffic fails no request (readiness drops first, HAProxy takes it out, then it
drains); SIGKILL on a replica is noticed by HAProxy's checks and a client's retry succeeds;
through the balancer, a client resumes on one replica the session the other issued, and the
canary one replica halts is halted on both, then resumed on both by either.
Every loop is bounded in count and time."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import pytest
import trio
import trustme
from cryptography import x509
from helpers.clients import CLIENT_TIMEOUT, Resuming, tls_get
from helpers.configs import write_config
from helpers.keys import KeyFiles, make_key
from helpers.pebble import free_port
from helpers.replicas import DUALPROXY, WAIT, Replica, canary_resume, start_all, wait_for
from helpers.upstream_server import UpstreamServer, serve_upstream

from dualproxy.tls.pins import spki_pin_of_certificate

SNI: Final = "api.example.com"
CLIENTS: Final = ("127.0.0.11", "127.0.0.12")
# HAProxy's checks: every 200 ms, down after 2 failures, up after 1 success.
CHECK_INTERVAL_MS: Final = 200
# Longer than HAProxy needs to see the 503 (2 x 200 ms) with a wide margin.
DRAIN_DELAY: Final = 2.0
# Bounds of the traffic loops: requests per client, and seconds.
MAX_REQUESTS: Final = 400
MAX_SECONDS: Final = 60.0
# The replicas look at their state folder's files (the canary's halt record) this often.
POLL_INTERVAL: Final = 0.2
# At most this many clients failing the canary's pin before a replica halts it (a handful do).
MAX_FAILING_CLIENTS: Final = 40
# A client's retries after a failed request, and its pause before the first (then longer):
# as a mobile HTTP stack retries a connection that broke.
RETRIES: Final = 3
RETRY_PAUSE: Final = 0.1


def haproxy() -> str:
    path = shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None
    )
    if path is None:
        if os.environ.get("DUALPROXY_REQUIRE_DEPLOY_TOOLS") == "1":
            pytest.fail("haproxy is required (DUALPROXY_REQUIRE_DEPLOY_TOOLS=1) but not found")
        pytest.skip("haproxy not found (scripts/test installs it)")
    return path


@dataclass
class Balancer:
    """HAProxy in front of the replicas; its stats socket tells each server's state."""

    config: Path
    stats: Path
    port: int
    process: subprocess.Popen[bytes] | None = None

    def state(self) -> dict[str, str]:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.stats))
            sock.sendall(b"show stat\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        rows = [line.split(",") for line in data.decode().splitlines() if line and line[0] != "#"]
        return {row[1]: row[17] for row in rows if row[0] == "replicas" and row[1] != "BACKEND"}


@dataclass
class Fleet:
    replicas: list[Replica]
    balancer: Balancer
    upstream: UpstreamServer
    cafile: Path
    config: Path


def request(port: int, cafile: Path, source: str) -> tuple[str, dict[str, Any]]:
    """One GET on a new connection from `source` through the balancer: the served key's pin
    and the upstream's echo."""
    context = ssl.create_default_context(cafile=str(cafile))
    with (
        socket.create_connection(
            ("127.0.0.1", port), timeout=CLIENT_TIMEOUT, source_address=(source, 0)
        ) as raw,
        context.wrap_socket(raw, server_hostname=SNI) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        pin = spki_pin_of_certificate(x509.load_der_x509_certificate(der))
        tls.sendall(f"GET /who HTTP/1.1\r\nHost: {SNI}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    return pin, json.loads(body)


@dataclass
class Traffic:
    """Clients requesting back to back through the balancer from worker threads, until
    stopped (or MAX_REQUESTS / MAX_SECONDS); with `retry`, a failed request is retried up to
    RETRIES times."""

    port: int
    cafile: Path
    retry: bool = False
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    retried: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self, source: str) -> None:
        started = time.monotonic()
        for _ in range(MAX_REQUESTS):
            if self.stop.is_set() or time.monotonic() - started > MAX_SECONDS:
                return
            for attempt in range(RETRIES + 1 if self.retry else 1):
                try:
                    request(self.port, self.cafile, source)
                except (OSError, AssertionError) as exc:
                    error = repr(exc)
                    if self.retry:
                        self.retried += 1
                        time.sleep(RETRY_PAUSE * (attempt + 1))
                    continue
                self.ok += 1
                break
            else:
                self.failed.append(error)

    @contextmanager
    def running(self) -> Iterator[Traffic]:
        threads = [threading.Thread(target=self.run, args=(source,)) for source in CLIENTS]
        for thread in threads:
            thread.start()
        try:
            yield self
        finally:
            self.stop.set()
            for thread in threads:
                thread.join(MAX_SECONDS + CLIENT_TIMEOUT)


@pytest.fixture
def keys(ca: trustme.CA, tmp_path: Path) -> tuple[KeyFiles, KeyFiles]:
    return make_key(ca, tmp_path, "k1"), make_key(ca, tmp_path, "k2")


@asynccontextmanager
async def fleet(
    keys: tuple[KeyFiles, KeyFiles], cafile: Path, tmp_path: Path, *, canary_percent: float = 0
) -> AsyncIterator[Fleet]:
    """Two replicas sharing one state folder (the canary's halt record, the session-ticket
    keys) behind HAProxy; `canary_percent` of the hint-less clients (CLIENTS[0]) in the
    canary."""
    haproxy_command = haproxy()
    now = datetime.now(UTC)
    rotation = {
        "old": "k1",
        "new": "k2",
        "grace_start": now - timedelta(days=1),
        "grace_end": now + timedelta(days=1),
        "canary_percent": canary_percent,
        "hints": {"new": {"networks": [f"{CLIENTS[1]}/32"]}},
    }
    state = tmp_path / "state"
    state.mkdir()
    async with serve_upstream(UpstreamServer.https(tmp_path)) as upstream:
        replicas = []
        for name in ("r1", "r2"):
            replica = Replica.beside(tmp_path, name)
            write_config(
                replica.config,
                list(keys),
                rotation=rotation,
                listen=f"127.0.0.1:{replica.port}",
                extra={
                    "upstream": upstream.config_table(),
                    "admin": {"address": f"127.0.0.1:{replica.admin}"},
                    "lifecycle": {"drain_delay": DRAIN_DELAY},
                    "state": {"dir": str(state)},
                    "keystore": {"reload_poll_interval": POLL_INTERVAL},
                    "listen": {
                        "address": f"127.0.0.1:{replica.port}",
                        "proxy_protocol": "required",
                        "proxy_protocol_from": ["127.0.0.1/32"],
                    },
                },
            )
            replicas.append(replica)
        balancer = Balancer(tmp_path / "haproxy.cfg", tmp_path / "haproxy.sock", free_port())
        servers = "\n".join(
            f"    server {r.name} 127.0.0.1:{r.port} send-proxy-v2 check port {r.admin}"
            f" inter {CHECK_INTERVAL_MS}ms fall 2 rise 1"
            for r in replicas
        )
        balancer.config.write_text(
            f"""global
    stats socket {balancer.stats} mode 600 level admin
defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    retries 3
    option redispatch
frontend tls
    bind 127.0.0.1:{balancer.port}
    default_backend replicas
backend replicas
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
{servers}
"""
        )
        try:
            await trio.to_thread.run_sync(start_all, replicas)
            with (tmp_path / "haproxy.log").open("wb") as log:
                balancer.process = subprocess.Popen(
                    [haproxy_command, "-db", "-f", str(balancer.config)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                )
            await trio.to_thread.run_sync(
                wait_for,
                lambda: balancer.stats.exists() and set(balancer.state().values()) == {"UP"},
                "HAProxy to see both replicas up",
            )
            yield Fleet(replicas, balancer, upstream, cafile, replicas[0].config)
        finally:
            for replica in replicas:
                replica.stop()
            if balancer.process is not None:
                balancer.process.kill()
                balancer.process.wait()


def route(config: Path, client: str) -> str:
    result = subprocess.run(
        [*DUALPROXY, "route", "-c", str(config), "--sni", SNI, "--client", client],
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
        check=True,
    )
    return result.stdout


def xff(echo: dict[str, Any]) -> list[str]:
    return [value for name, value in echo["headers"] if name.lower() == "x-forwarded-for"]


async def test_each_client_s_own_address_reaches_the_upstream_and_the_policy(
    keys: tuple[KeyFiles, KeyFiles], cafile: Path, tmp_path: Path
) -> None:
    async with fleet(keys, cafile, tmp_path) as f:
        for client, key in zip(CLIENTS, keys, strict=True):
            for _ in range(2):  # round robin: each replica once
                pin, echo = await trio.to_thread.run_sync(request, f.balancer.port, cafile, client)
                assert xff(echo) == [client]  # not HAProxy's 127.0.0.1
                assert pin == key.pin
            predicted = await trio.to_thread.run_sync(route, f.config, client)
            assert f"key:      {key.name} " in predicted, predicted
        served_by = {r.name: (r.log.read_text().count("outcome=ok")) for r in f.replicas}
    assert all(count >= 1 for count in served_by.values()), served_by


async def test_sigterm_on_a_replica_under_traffic_fails_no_request(
    keys: tuple[KeyFiles, KeyFiles], cafile: Path, tmp_path: Path
) -> None:
    async with fleet(keys, cafile, tmp_path) as f:
        first = f.replicas[0]
        traffic = Traffic(f.balancer.port, cafile)

        def scenario() -> None:
            with traffic.running():
                wait_for(lambda: traffic.ok >= 20, "traffic to flow")
                assert first.process is not None
                first.process.send_signal(signal.SIGTERM)
                wait_for(lambda: f.balancer.state()["r1"].startswith("DOWN"), "HAProxy: r1 down")
                assert first.process.wait(WAIT) == 0
                before = traffic.ok
                wait_for(lambda: traffic.ok >= before + 20, "traffic on r2 alone")

        await trio.to_thread.run_sync(scenario)
    assert traffic.failed == []
    log = first.log.read_text()
    assert log.index("leaving:") < log.index("draining:") < log.index("stopped")


async def test_sigkill_on_a_replica_is_taken_out_and_retries_succeed(
    keys: tuple[KeyFiles, KeyFiles], cafile: Path, tmp_path: Path
) -> None:
    async with fleet(keys, cafile, tmp_path) as f:
        traffic = Traffic(f.balancer.port, cafile, retry=True)

        def scenario() -> None:
            with traffic.running():
                wait_for(lambda: traffic.ok >= 20, "traffic to flow")
                assert f.replicas[1].process is not None
                f.replicas[1].process.kill()
                wait_for(lambda: f.balancer.state()["r2"].startswith("DOWN"), "HAProxy: r2 down")
                before = traffic.ok
                wait_for(lambda: traffic.ok >= before + 20, "traffic on r1 alone")

        await trio.to_thread.run_sync(scenario)
    assert traffic.failed == []  # every failure was retried, and the retry succeeded


async def test_replicas_share_session_tickets_and_the_canary_halt_behind_the_balancer(
    keys: tuple[KeyFiles, KeyFiles], cafile: Path, tmp_path: Path
) -> None:
    """Every hint-less client in the canary. A client's reconnects, which the balancer sends
    to one replica then the other, all resume (the ticket keys of the shared state folder).
    Clients that fail the new key's pin, sent until one replica halts its canary: the other
    halts too, naming it, and every client gets the old key from both; `dualproxy canary
    resume` on one replica, and both send the canary the new key again."""
    old, new = keys
    source = CLIENTS[0]
    async with fleet(keys, cafile, tmp_path, canary_percent=100) as f:
        port, replicas = f.balancer.port, f.replicas

        def pins(count: int) -> list[str]:
            return [request(port, cafile, source)[0] for _ in range(count)]

        def halted() -> list[bool]:
            return [bool(r.canary()["halted"]) for r in replicas]

        def settled(sent: int) -> Callable[[], bool]:
            """Whether the replicas counted `sent` canary clients, or one halted."""

            def check() -> bool:
                counted = sum(r.canary()["canary_sample"]["handshakes"] for r in replicas)
                return any(halted()) or counted >= sent

            return check

        def scenario() -> None:
            client = Resuming(cafile)
            resumed = [client.connect_blocking(port, source) for _ in range(6)]
            assert resumed == [False] + [True] * 5
            assert pins(2) == [new.pin] * 2
            # One failing client at a time, each counted before the next: the first replica
            # to halt halts on its own evidence, the other has seen one client fewer.
            before = 6 + 2  # the canary's handshakes so far: the reconnects and pins(2)
            for sent in range(1, MAX_FAILING_CLIENTS + 1):
                tls_get("127.0.0.1", port, cafile=cafile, source=source, request=False)
                wait_for(settled(before + sent), "the client counted")
                if any(halted()):
                    break
            wait_for(lambda: all(halted()), "the other replica to take the halt")
            by = {r.name: r.canary()["halted_by"] for r in replicas}
            first = next(r for r in replicas if by[r.name] is None)
            (other,) = (r for r in replicas if r is not first)
            assert by[other.name].endswith(f" pid {first.pid}")
            assert pins(4) == [old.pin] * 4
            assert "canary resumed" in canary_resume(other)
            wait_for(lambda: not any(halted()), "both replicas to resume")
            assert pins(4) == [new.pin] * 4

        await trio.to_thread.run_sync(scenario)
    assert any("CANARY HALTED by replica" in r.log.read_text() for r in replicas)
