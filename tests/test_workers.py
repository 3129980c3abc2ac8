"""`[process] workers`: a supervisor and real worker processes on loopback (serve.supervisor,
serve.worker, cli.worker), asked by real TLS clients. The supervisor runs in the test's
event loop (so the test reads its state); its workers are `python -m dualproxy.cli.worker`
processes, as in production. Every wait is bounded; no assertion is about time."""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Final

import pytest
import trio
import trustme
from helpers.clients import read_until, tls_get, tls_get_async
from helpers.configs import write_config
from helpers.keys import KeyFiles, make_key, reissue
from helpers.rotation import open_canary_window
from helpers.serving import supervising_with_acme
from helpers.smallhttp import exchange
from helpers.upstream_server import UpstreamServer, serve_upstream
from test_reports import body, post_report, trustkit_ios

from dualproxy.acme.challenges import Challenge, probe_http01, probe_tls_alpn, publish
from dualproxy.acme.issuer import challenge_folder
from dualproxy.config.loader import load
from dualproxy.config.names import ListenAddress
from dualproxy.ops import admin, statuspage
from dualproxy.ops.evidence import Evidence
from dualproxy.ops.haltrecord import HaltRecord, parse_record, rotation_id
from dualproxy.ops.tally import from_wire
from dualproxy.serve.control import Channel, ChannelError
from dualproxy.serve.listeners import open_listeners
from dualproxy.serve.server import Server
from dualproxy.serve.sharedhalt import RECORD_FILE
from dualproxy.serve.supervisor import Sharing, Supervisor
from dualproxy.serve.worker import Reporter, serve_worker, worker_server

pytestmark = pytest.mark.e2e

# Bounds of every wait here: generous for a shared, loaded machine; a healthy run takes
# a small fraction of them.
TEST_TIMEOUT: Final = 90.0
WAIT: Final = 30.0


@dataclass
class Setup:
    folder: Path
    ca: trustme.CA
    cafile: Path
    old: KeyFiles
    new: KeyFiles
    config_file: Path

    def write(self, *, rotation: dict[str, Any] | None = None, workers: int = 2) -> None:
        keys = [self.old, self.new] if rotation is not None else [self.old]
        write_config(
            self.config_file, keys, rotation=rotation, extra={"process": {"workers": workers}}
        )

    def supervisor(self, sharing: Sharing = "shared") -> Supervisor:
        return Supervisor(load(self.config_file), sharing=sharing, handle_signals=False)


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    ca = trustme.CA()
    cafile = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    old = make_key(ca, tmp_path / "certs", "k2026a")
    new = make_key(ca, tmp_path / "certs", "k2026b")
    made = Setup(tmp_path, ca, cafile, old, new, tmp_path / "config.toml")
    made.write()
    return made


@asynccontextmanager
async def supervising(supervisor: Supervisor) -> AsyncIterator[int]:
    """The supervisor and its workers for the block; the TLS port. Drained at the end."""
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(supervisor.run)
            yield bound[0][1]
            supervisor.drain()


async def eventually(check: Callable[[], bool], what: str) -> None:
    with trio.move_on_after(WAIT):
        while not check():
            await trio.sleep(0.05)
        return
    pytest.fail(f"not within {WAIT} s: {what}")


def keep_alive_gets(port: int, cafile: Path, count: int) -> list[int]:
    """`count` GETs on one TLS connection (blocking); their statuses."""
    context = ssl.create_default_context(cafile=str(cafile))
    connection = http.client.HTTPSConnection("api.example.com", port, context=context, timeout=20)
    raw = socket.create_connection(("127.0.0.1", port), timeout=20)
    connection.sock = context.wrap_socket(raw, server_hostname="api.example.com")
    statuses = []
    try:
        for _ in range(count):
            connection.request("GET", "/")
            response = connection.getresponse()
            response.read()
            statuses.append(response.status)
    finally:
        connection.close()
    return statuses


async def new_connection_gets(port: int, cafile: Path, count: int) -> list[int]:
    """`count` GETs, each on a new TLS connection; their statuses."""
    statuses = []
    for _ in range(count):
        result = await tls_get_async("127.0.0.1", port, cafile=cafile)
        statuses.append(int(result.response.split(b" ", 2)[1]))
    return statuses


def metric(text: str, name: str) -> float:
    """The sum of every series of `name` in a /metrics body."""
    values = re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    return sum(float(value) for value in values)


# --- the workers serve, and the supervisor shows their sums ------------------------------


async def test_metrics_totals_equal_the_requests_sent(setup: Setup) -> None:
    """30 one-request connections and one keep-alive connection of 20 requests, spread over
    two workers: the supervisor's /metrics counts exactly 50 requests on 31 connections,
    and still exactly that after further reports (no count twice)."""
    supervisor = setup.supervisor()
    answers = admin.Admin(supervisor)
    async with supervising(supervisor) as port:
        assert metric(answers.scrape().decode(), "dualproxy_requests_total") == 0
        statuses = await new_connection_gets(port, setup.cafile, 30)
        statuses += await trio.to_thread.run_sync(keep_alive_gets, port, setup.cafile, 20)
        assert statuses == [200] * 50

        def counted() -> float:
            return metric(answers.scrape().decode(), "dualproxy_connections_total")

        await eventually(lambda: counted() >= 31, "31 connections counted")
        await trio.sleep(1.0)  # four more report intervals: nothing may be counted twice
        scraped = answers.scrape().decode()
        assert metric(scraped, "dualproxy_connections_total") == 31
        assert metric(scraped, "dualproxy_requests_total") == 50
        assert metric(scraped, "dualproxy_responses_total") == 50
        status = answers.status()
        assert status.active_connections == 0
        assert sum(worker.connections for worker in supervisor.workers) == 31
        assert all(worker.ready for worker in supervisor.workers)
        # The limits hold per worker: the machine admits two workers' worth.
        limits = status.connections
        assert limits is not None
        assert limits.processes == 2
        assert "per process x 2 processes" in statuspage.render_text(status)
        machine = re.search(r'dualproxy_connection_limit\{scope="machine"\} (\S+)', scraped)
        assert machine is not None
        assert float(machine.group(1)) == 2 * limits.max_connections


async def test_a_killed_worker_is_replaced_while_the_others_keep_serving(setup: Setup) -> None:
    """SIGKILL one worker between requests: every request after it still succeeds, from the
    moment it died (the other worker takes the shared listener's clients while the slot
    restarts), the slot gets a new worker, and the other slot's worker is untouched. (A
    request in flight on the killed worker dies with it, as in nginx: not sent here.)"""
    supervisor = setup.supervisor()
    async with supervising(supervisor) as port:
        victim, other = supervisor.workers
        killed, kept = victim.pid, other.pid
        assert killed is not None
        assert await new_connection_gets(port, setup.cafile, 5) == [200] * 5
        os.kill(killed, signal.SIGKILL)
        assert await new_connection_gets(port, setup.cafile, 35) == [200] * 35
        await eventually(lambda: victim.ready and victim.pid != killed, "a new worker in slot 0")
        assert victim.restarts == 1
        assert (other.pid, other.restarts) == (kept, 0)
        assert await new_connection_gets(port, setup.cafile, 10) == [200] * 10


async def test_a_reload_under_traffic_loses_no_request(setup: Setup) -> None:
    """Keep-alive and new-connection traffic at once through two workers while the
    supervisor reloads five times, the certificate renewed before each: every request of
    both kinds gets its 200, and every reload took effect."""
    supervisor = setup.supervisor()
    async with supervising(supervisor) as port:
        kept_alive: list[int] = []
        fresh: list[int] = []

        async def keep_alive() -> None:
            kept_alive.extend(
                await trio.to_thread.run_sync(keep_alive_gets, port, setup.cafile, 300)
            )

        async def new_connections() -> None:
            fresh.extend(await new_connection_gets(port, setup.cafile, 60))

        async with trio.open_nursery() as traffic:
            traffic.start_soon(keep_alive)
            traffic.start_soon(new_connections)
            for _ in range(5):
                renewed = reissue(setup.ca, setup.old)
                tmp = setup.old.chain.with_suffix(".tmp")
                tmp.write_bytes(renewed)
                tmp.replace(setup.old.chain)
                assert await supervisor.reload("test")
                await trio.sleep(0.05)
        assert kept_alive == [200] * 300
        assert fresh == [200] * 60
        assert supervisor.reloads_ok == 5


async def test_a_config_that_fails_validation_reaches_no_worker(
    setup: Setup, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A config that does not validate is refused once, by the supervisor, and no worker
    hears of it (each still serves); the good reload after it reaches both workers, whose
    lines come after nothing of the bad one."""
    supervisor = setup.supervisor()
    async with supervising(supervisor) as port:
        good = setup.config_file.read_text()
        setup.config_file.write_text(good.replace("[listen]", "[listen]\nnonsense = 1"))
        assert not await supervisor.reload("bad one")
        setup.config_file.write_text(good)
        assert await supervisor.reload("good one")
        seen = ""

        def both_reloaded() -> bool:
            nonlocal seen
            seen += capfd.readouterr().err
            return "reloaded (good one, worker 0" in seen and "reloaded (good one, worker 1" in seen

        await eventually(both_reloaded, "both workers' reload lines")
        assert "bad one" not in seen  # no worker read the bad config
        refusals = [r for r in caplog.records if "reload (bad one) failed" in r.getMessage()]
        assert len(refusals) == 1
        assert "listen.nonsense" in refusals[0].getMessage()
        assert supervisor.reloads_failed == 1
        assert await new_connection_gets(port, setup.cafile, 4) == [200] * 4


async def test_the_canary_halt_reaches_every_worker(setup: Setup) -> None:
    """Every hint-less client is in the canary (100 %), and each closes after the handshake
    without a request (what a pinning client that rejects the new key does). No worker
    decides; the supervisor halts on the sums of both workers' samples, and from
    then on every worker serves the old key: the clients that follow all get it. Before
    the halt they got the new one."""
    setup.write(rotation=open_canary_window(100, canary_halt_margin=0.05))
    supervisor = setup.supervisor()
    async with supervising(supervisor) as port:

        def pins(count: int, *, request: bool) -> list[str]:
            return [
                tls_get("127.0.0.1", port, cafile=setup.cafile, request=request).pin
                for _ in range(count)
            ]

        assert await trio.to_thread.run_sync(lambda: pins(4, request=True)) == [setup.new.pin] * 4
        assert not supervisor.evidence.canary.halted

        def fail_until_halted() -> None:
            for _ in range(200):
                if supervisor.evidence.canary.halted:
                    return
                pins(1, request=False)

        await trio.to_thread.run_sync(fail_until_halted)
        await eventually(lambda: supervisor.evidence.canary.halted, "the supervisor halts")

        def all_old() -> bool:
            return pins(20, request=True) == [setup.old.pin] * 20

        halted_everywhere = False
        with trio.move_on_after(WAIT):
            while not (halted_everywhere := await trio.to_thread.run_sync(all_old)):
                await trio.sleep(0.1)
        assert halted_everywhere

        # `dualproxy canary resume` (the admin listener's route) on the supervisor: every
        # worker runs the canary again, so the clients that follow get the new key again.
        assert supervisor.evidence.canary.resume()

        def all_new() -> bool:
            return pins(20, request=True) == [setup.new.pin] * 20

        resumed_everywhere = False
        with trio.move_on_after(WAIT):
            while not (resumed_everywhere := await trio.to_thread.run_sync(all_new)):
                await trio.sleep(0.1)
        assert resumed_everywhere
        assert not supervisor.evidence.canary.halted


async def test_a_halt_in_the_state_folder_reaches_every_worker_and_a_resume_is_written(
    setup: Setup,
) -> None:
    """Another replica halted the canary (its record is in the shared state folder before
    the supervisor starts): every worker serves the old key from its first client, and the
    status names that replica; `canary resume` on this machine is written for the others
    (the next generation, by this supervisor) and every worker sends the canary the new key
    again."""
    state = setup.folder / "state"
    write_config(
        setup.config_file,
        [setup.old, setup.new],
        rotation=open_canary_window(100),
        extra={
            "process": {"workers": 2},
            "state": {"dir": str(state)},
            "keystore": {"reload_poll_interval": 0.2},
        },
    )
    config = load(setup.config_file)
    assert config.rotation is not None
    pins = {setup.old.name: setup.old.pin, setup.new.name: setup.new.pin}
    at = datetime(2026, 12, 6, tzinfo=UTC)
    elsewhere = HaltRecord(
        1, rotation_id(config.rotation, pins), True, "app 2.1 fails", at, "replica-x pid 1"
    )
    state.mkdir()
    (state / RECORD_FILE).write_bytes(elsewhere.to_bytes())
    supervisor = Supervisor(config, sharing="reuse_port", handle_signals=False, share_state=True)
    async with supervising(supervisor) as port:

        def pins_served(count: int) -> list[str]:
            return [tls_get("127.0.0.1", port, cafile=setup.cafile).pin for _ in range(count)]

        assert await trio.to_thread.run_sync(pins_served, 10) == [setup.old.pin] * 10
        canary = admin.status_of(supervisor).to_json()["canary"]
        assert isinstance(canary, dict)
        assert (canary["halted_by"], canary["why"]) == ("replica-x pid 1", "app 2.1 fails")

        assert supervisor.evidence.canary.resume()  # `dualproxy canary resume`

        def resumed() -> bool:
            return pins_served(10) == [setup.new.pin] * 10

        resumed_everywhere = False
        with trio.move_on_after(WAIT):
            while not (resumed_everywhere := await trio.to_thread.run_sync(resumed)):
                await trio.sleep(0.1)
        assert resumed_everywhere
        written = parse_record((state / RECORD_FILE).read_bytes())
        assert (written.generation, written.halted) == (2, False)
        assert written.by.endswith(f" pid {os.getpid()}")


@pytest.mark.parametrize("sharing", ["shared", "reuse_port"])
async def test_workers_share_one_listener_or_reuse_port_sockets(
    setup: Setup, sharing: Sharing
) -> None:
    """Both ways of sharing the port serve every client (which of them the supervisor uses,
    and why, is measured in docs/architecture.md)."""
    supervisor = setup.supervisor(sharing)
    async with supervising(supervisor) as port:
        assert await new_connection_gets(port, setup.cafile, 40) == [200] * 40

        def counted() -> bool:
            return sum(worker.connections for worker in supervisor.workers) == 40

        await eventually(counted, "40 connections counted")


async def test_with_acme_every_worker_answers_the_challenges(
    setup: Setup, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """[acme] with workers (once refused at start): every worker answers the challenges
    published in the ACME folder, as replicas of a state folder do. tls-alpn-01 on each
    worker's TLS socket (the probes spread over both by reuse_port: each worker says once
    that it answered), http-01 on the one listener the supervisor opened and handed to every
    worker, which redirects the rest to the TLS port; the supervisor answers none itself.
    The twin: a name with no pending challenge gets no challenge certificate. No CA here:
    renewals are off, which the supervisor says once."""
    caplog.set_level(logging.INFO, logger="dualproxy")
    names = ["api.example.com"]
    write_config(
        setup.config_file,
        [setup.old],
        extra={
            "process": {"workers": 2},
            "keys": {setup.old.name: {**setup.old.table(), "names": names}},
            "acme": {
                "directory": "https://ca.invalid/directory",
                "challenge": "http-01",
                "http_listen": "127.0.0.1:0",
                "renew": False,
            },
        },
    )
    config = load(setup.config_file)
    assert config.acme is not None
    tls01 = Challenge("tls-alpn-01", names[0], "tok-tls", "tok-tls.thumbprint")
    http01 = Challenge("http-01", names[0], "tok-http", "tok-http.thumbprint")
    publish(challenge_folder(config.acme), [tls01, http01], datetime.now(UTC))
    stray = Challenge("tls-alpn-01", "k2.api.example.com", "tok-no", "tok-no.thumbprint")
    supervisor = Supervisor(config, handle_signals=False)
    with trio.fail_after(TEST_TIMEOUT):
        async with supervising_with_acme(supervisor) as (port, http):
            assert http is not None

            def probes(challenge: Challenge, count: int) -> list[bool]:
                return [probe_tls_alpn("127.0.0.1", port, challenge) for _ in range(count)]

            assert await trio.to_thread.run_sync(probes, tls01, 16) == [True] * 16
            assert await trio.to_thread.run_sync(probes, stray, 4) == [False] * 4
            assert await trio.to_thread.run_sync(probe_http01, "127.0.0.1", http[1], http01)
            redirect = await exchange(
                "127.0.0.1", http[1], b"GET /x HTTP/1.1\r\nHost: api.example.com\r\n\r\n"
            )
            assert await new_connection_gets(port, setup.cafile, 2) == [200, 200]
    assert redirect.startswith(b"HTTP/1.1 301 ")
    assert f"location: https://api.example.com:{port}/x".encode() in redirect.lower()
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("acme: the ")]
    assert said == [
        f"acme: the supervisor (pid {os.getpid()}) places no order ([acme] renew = false);"
        " the workers answer the CA's challenges"
    ]
    # The workers' stderr: each answered tls-alpn-01 (one line each), one of them http-01.
    err = capfd.readouterr().err
    assert err.count(f"acme: tls-alpn-01 challenge for {names[0]}: answered") == 2, err
    assert f"acme: http-01 challenge for {names[0]}: answered" in err, err


# --- `dualproxy serve` as a process: its signals, exit codes and lines stay a single one's ----


def read_line_with(stream: IO[bytes], marker: bytes) -> bytes:
    """What `stream` writes up to the end of the line with `marker` (bounded by WAIT)."""
    data = read_until(stream, marker, timeout=WAIT)
    if b"\n" not in data[data.index(marker) :]:
        data += read_until(stream, b"\n", timeout=WAIT)
    return data


def start_serve(setup: Setup) -> tuple[subprocess.Popen[bytes], bytes, int]:
    """`dualproxy serve` with [process] workers = 2, up to its supervisor's "listening on"
    line (after every worker's); it, what it wrote, its TLS port."""
    script = Path(sys.executable).parent / "dualproxy"
    process = subprocess.Popen(
        [str(script), "serve", "-c", str(setup.config_file)], stderr=subprocess.PIPE
    )
    assert process.stderr is not None
    try:
        started = read_line_with(process.stderr, b" workers: pids ")
    except BaseException:
        process.kill()
        process.communicate(timeout=WAIT)
        raise
    port = re.search(rb"listening on 127\.0\.0\.1:(\d+) \(2 workers", started)
    assert port is not None, started
    return process, started, int(port.group(1))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_serve_with_workers_reloads_once_and_stops_as_one_process(
    setup: Setup, signum: signal.Signals
) -> None:
    """SIGHUP with a config that fails validation: said once, by the supervisor, exit code
    and serving unchanged; SIGTERM (or Ctrl-C) stops the supervisor and both workers with
    exit 0 and the single process's last line."""
    setup.config_file.write_text(setup.config_file.read_text() + "\n[admin]\nenabled = false\n")
    process, started, port = start_serve(setup)
    assert process.stderr is not None
    listed = re.search(rb"workers: pids (\d+), (\d+)\)", started)
    assert listed is not None, started
    pids = [int(pid) for pid in listed.groups()]
    try:
        assert tls_get("127.0.0.1", port, cafile=setup.cafile).response.startswith(b"HTTP/1.1 200")
        good = setup.config_file.read_text()
        setup.config_file.write_text(good + "[nonsense]\n")
        process.send_signal(signal.SIGHUP)
        refused = read_line_with(process.stderr, b"reload (SIGHUP) failed")
        setup.config_file.write_text(good)
        assert tls_get("127.0.0.1", port, cafile=setup.cafile).response.startswith(b"HTTP/1.1 200")
        process.send_signal(signum)
        _, rest = process.communicate(timeout=WAIT)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=WAIT)
    err = (started + refused + rest).decode()
    assert process.returncode == 0, err
    assert err.count("failed, still serving the previous keys") == 1
    assert "nonsense" in err
    assert "Traceback" not in err
    assert err.rstrip().endswith("INFO stopped")
    for pid in pids:  # both workers are gone
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


# --- one worker in this process, the test as its supervisor (serve.worker, serve.control) ------


@asynccontextmanager
async def one_worker(setup: Setup) -> AsyncIterator[tuple[Channel, Server, int]]:
    """serve_worker on a listener of its own, its link's other end as the test's Channel;
    the link's first message (ready) read; the TLS port."""
    server = worker_server(setup.config_file)
    listeners = await open_listeners([ListenAddress("127.0.0.1", 0)], False)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    link = Channel(ours)
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_worker, server, listeners, theirs, 3)
            ready = await link.receive()
            assert ready is not None
            assert ready["t"] == "ready"
            assert ready["pid"] == os.getpid()
            bound = ready["bound"]
            assert isinstance(bound, list)
            yield link, server, int(bound[0][1])
    await link.aclose()


async def next_of(link: Channel, kind: str) -> dict[str, object]:
    """The next message of `kind` on `link` (tallies skipped unless asked for)."""
    while True:
        message = await link.receive()
        assert message is not None, f"the link closed before a {kind!r} message"
        if message["t"] == kind:
            return message


async def test_a_worker_reports_what_it_counted_and_obeys_its_link(setup: Setup) -> None:
    """Its counts arrive as a difference (one connection, one request, nothing twice); it
    follows the canary's decision, reloads when told (answering whether it took), and drains
    when told, sending its last counts before the link closes."""
    async with one_worker(setup) as (link, server, port):
        assert await new_connection_gets(port, setup.cafile, 1) == [200]
        tally = from_wire(await next_of(link, "tally"))
        assert sum(rows[0] for rows in tally.rows.values()) == 1
        assert sum(rows[1] for rows in tally.rows.values()) == 1

        await link.send({"t": "canary", "halted": True, "why": "test", "at": 1.0, "epoch": 0})
        await eventually(lambda: server.evidence.canary.halted, "the worker follows the halt")
        assert server.evidence.canary.why == "test"

        await link.send({"t": "reload", "why": "SIGHUP"})
        assert (await next_of(link, "reloaded"))["ok"] is True
        assert server.reloads_ok == 1

        assert await new_connection_gets(port, setup.cafile, 2) == [200, 200]
        await link.send({"t": "drain"})
        counted = 0
        while (message := await link.receive()) is not None:
            if message["t"] == "tally":
                counted += sum(rows[0] for rows in from_wire(message).rows.values())
        assert counted == 2  # the two since the first report, not the first again


async def test_a_worker_whose_supervisor_is_gone_drains(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    """The link closes (the supervisor died): the worker drains and its serve ends; a message
    it does not know before that is logged and ignored, not obeyed."""
    async with one_worker(setup) as (link, server, port):
        await link.send({"t": "nonsense"})
        await link.send({"t": "canary", "halted": False, "why": None, "at": None, "epoch": 2})
        await eventually(
            lambda: any("unknown message" in r.getMessage() for r in caplog.records), "logged"
        )
        assert not server.draining
        assert await new_connection_gets(port, setup.cafile, 1) == [200]
        await link.aclose()
    assert server.draining
    assert any("the supervisor is gone" in r.getMessage() for r in caplog.records)


async def test_a_link_refuses_what_is_not_a_message() -> None:
    """A line that is not a JSON object is refused (ChannelError); a JSON object is a
    message; a closed link reads as None."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    link = Channel(ours)
    theirs.sendall(b'{"t": "ok"}\n[1, 2]\nnot json\n')
    assert await link.receive() == {"t": "ok"}
    with pytest.raises(ChannelError, match="not a JSON object"):
        await link.receive()
    with pytest.raises(ChannelError, match="not a JSON message"):
        await link.receive()
    theirs.close()
    assert await link.receive() is None
    await link.aclose()


async def test_the_drain_refuses_new_clients_as_a_single_process_does(setup: Setup) -> None:
    """While a worker still drains (a client in the middle of its hello keeps it busy), the
    port already refuses new clients (the supervisor closed its copies of the listeners
    too), as a single process's drain does, rather than leaving them in a backlog nobody
    will accept from. Before the drain, clients connect."""
    supervisor = setup.supervisor()
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(supervisor.run)
            port = bound[0][1]
            assert await new_connection_gets(port, setup.cafile, 2) == [200, 200]
            busy = socket.create_connection(("127.0.0.1", port), timeout=5)
            busy.sendall(b"\x16\x03\x01")  # a hello cut short: in flight until it times out
            await eventually(lambda: supervisor.active_connections == 1, "the client counted")
            supervisor.drain()

            def refused() -> bool:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=5).close()
                except ConnectionRefusedError:
                    return True
                return False

            await eventually(refused, "new clients refused")
            assert supervisor.active_connections >= 1  # still draining
            busy.close()


async def test_a_drain_before_the_workers_serve_stops_them(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGTERM while the workers are still starting: each drains as soon as it serves, and
    the supervisor returns without announcing that it listens."""
    caplog.set_level(logging.INFO, logger="dualproxy")
    supervisor = setup.supervisor()
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(supervisor.run)
            await eventually(lambda: all(w.pid for w in supervisor.workers), "workers spawned")
            assert not any(worker.ready for worker in supervisor.workers)
            supervisor.drain()
    assert not any("workers: pids" in record.getMessage() for record in caplog.records)
    assert any("every worker finished" in record.getMessage() for record in caplog.records)


async def test_canary_clients_reports_on_any_worker_halt_the_machine_s_canary(
    setup: Setup,
) -> None:
    """Three canary clients (every hint-less client is one, at 100 %) report app 1.0 knowing
    only the old pin, wherever their reports land: no worker decides, and the supervisor's
    judge halts on the union of what its workers' reports say; from then on every worker
    serves the old key. The report halt of a single process (test_reports), machine-wide."""
    write_config(
        setup.config_file,
        [setup.old, setup.new],
        rotation=open_canary_window(100),
        extra={"process": {"workers": 2}, "reports": {"store": str(setup.folder / "reports")}},
    )
    supervisor = setup.supervisor("reuse_port")
    report = body(trustkit_ios(setup.old.chain.read_text(), version="1.0", pins=(setup.old.pin,)))
    async with supervising(supervisor) as port:
        assert not supervisor.evidence.canary.halted
        for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
            answer = await trio.to_thread.run_sync(post_report, port, setup.cafile, source, report)
            assert answer.startswith(b"HTTP/1.1 204 ")
        await eventually(lambda: supervisor.evidence.canary.halted, "the supervisor halts")
        assert supervisor.evidence.canary.why == (
            "app version com.example.app 1.0 (IOS) knows no pin of the new key: 3 canary"
            " clients reported its pin failures"
        )
        assert {name: len(clients) for name, clients in supervisor.canary_failures().items()} == {
            "com.example.app 1.0 (IOS)": 3
        }

        def all_old() -> bool:
            pins = [tls_get("127.0.0.1", port, cafile=setup.cafile).pin for _ in range(10)]
            return pins == [setup.old.pin] * 10

        halted_everywhere = False
        with trio.move_on_after(WAIT):
            while not (halted_everywhere := await trio.to_thread.run_sync(all_old)):
                await trio.sleep(0.1)
        assert halted_everywhere


def test_a_worker_sends_its_report_failures_when_they_change() -> None:
    """Whole, as hex, and only when they changed (Reporter.next_message)."""
    reporter = Reporter()
    evidence = Evidence()
    figures = {"active": 0}
    first = reporter.next_message(evidence, figures, {"app 1.0": frozenset({b"\x01"})})
    assert first is not None
    assert first["failing"] == {"app 1.0": ["01"]}
    assert reporter.next_message(evidence, figures, {"app 1.0": frozenset({b"\x01"})}) is None
    grown = reporter.next_message(evidence, figures, {"app 1.0": frozenset({b"\x01", b"\x02"})})
    assert grown is not None
    assert grown["failing"] == {"app 1.0": ["01", "02"]}


async def test_the_pin_failure_reports_of_every_worker_are_summed(setup: Setup) -> None:
    """Apps post six pin-failure reports, which land on both workers: the supervisor's
    summary (status page, /status.json) counts all six, not those of one worker; before
    any, it counts none."""
    write_config(
        setup.config_file,
        [setup.old],
        extra={"process": {"workers": 2}, "reports": {"store": str(setup.folder / "reports")}},
    )
    supervisor = setup.supervisor()
    pem = setup.old.chain.read_text()
    report = json.dumps(
        {
            "date-time": "2026-12-06T13:00:50Z",
            "hostname": "api.example.com",
            "port": 443,
            "effective-expiration-date": "2027-05-01T12:40:50Z",
            "include-subdomains": False,
            "noted-hostname": "api.example.com",
            "served-certificate-chain": [pem],
            "validated-certificate-chain": [pem],
            "known-pins": [f'pin-sha256="{setup.old.pin}"'],
        }
    ).encode()

    def post(port: int) -> int:
        context = ssl.create_default_context(cafile=str(setup.cafile))
        raw = socket.create_connection(("127.0.0.1", port), timeout=20)
        connection = http.client.HTTPSConnection("api.example.com", port, context=context)
        connection.sock = context.wrap_socket(raw, server_hostname="api.example.com")
        try:
            connection.request(
                "POST",
                "/.well-known/dualproxy/pin-report",
                body=report,
                headers={"Content-Type": "application/json"},
            )
            response = connection.getresponse()
            response.read()
            return response.status
        finally:
            connection.close()

    async with supervising(supervisor) as port:
        summary = supervisor.report_summary()
        assert summary is not None
        assert summary["total"] == 0
        statuses = [await trio.to_thread.run_sync(post, port) for _ in range(6)]
        assert statuses == [204] * 6
        summary = supervisor.report_summary()
        assert summary is not None
        assert summary["total"] == 6


async def test_readyz_follows_the_supervisor_starting_serving_and_leaving(setup: Setup) -> None:
    """The admin listener's /readyz (Supervisor.not_ready): not ready while the workers start,
    ready once every worker serves, not ready from the drain on."""
    supervisor = setup.supervisor()
    assert supervisor.not_ready() == "starting: the listeners are not open yet"
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.run)
            assert supervisor.not_ready() is None
            supervisor.drain()
            assert supervisor.not_ready() == "draining: this server is stopping"


class FailingWorkers(Supervisor):
    """Workers that exit at once with code 3, as one whose config broke would exit 1."""

    def worker_command(self, slot: int, listeners: Sequence[int], control: int) -> list[str]:
        return [sys.executable, "-c", "raise SystemExit(3)"]


async def test_a_worker_that_cannot_start_stops_the_start(setup: Setup) -> None:
    """A worker that exits before the first of them served stops the supervisor (serve's
    exit 1, with the reason), rather than restarting workers that cannot start; the twin,
    a worker killed after serving, is restarted (test_a_killed_worker_is_replaced...)."""
    supervisor = FailingWorkers(load(setup.config_file), handle_signals=False)
    with pytest.RaisesGroup(
        pytest.RaisesExc(OSError, match="exited with code 3 before it served"),
        flatten_subgroups=True,
    ):
        with trio.fail_after(TEST_TIMEOUT):
            await supervisor.run()


class BreakingWorkers(Supervisor):
    """Slot 0's replacements cannot start (exit 3): its files broke after the start."""

    def worker_command(self, slot: int, listeners: Sequence[int], control: int) -> list[str]:
        if slot == 0 and self.workers[0].restarts:
            return [sys.executable, "-c", "raise SystemExit(3)"]
        return super().worker_command(slot, listeners, control)


async def test_a_worker_that_keeps_dying_is_restarted_ever_more_slowly(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    """After serving, slot 0's worker is killed and its replacements exit at once: each
    death is logged with the wait before the next try, doubling (0.1, 0.2, 0.4 s, ... up to
    30 s), while the other worker keeps serving every client."""
    supervisor = BreakingWorkers(load(setup.config_file), handle_signals=False)
    async with supervising(supervisor) as port:
        victim = supervisor.workers[0]
        assert victim.pid is not None
        os.kill(victim.pid, signal.SIGKILL)
        await eventually(lambda: victim.restarts >= 4, "four deaths in a row")
        assert await new_connection_gets(port, setup.cafile, 10) == [200] * 10
    waits = [
        float(found.group(1))
        for record in caplog.records
        if (found := re.search(r"worker 0 .*starting another in (\S+) s", record.getMessage()))
    ]
    assert waits[:4] == [0.1, 0.2, 0.4, 0.8]
    assert "exited with code 3" in caplog.text
    assert supervisor.workers[1].restarts == 0


def resumed_reconnects(port: int, cafile: Path, count: int) -> list[bool]:
    """`count` connections, each offering the session (ticket) the previous one got, each
    with one GET (blocking); whether each resumed."""
    context = ssl.create_default_context(cafile=str(cafile))
    session: ssl.SSLSession | None = None
    resumed = []
    for _ in range(count):
        raw = socket.create_connection(("127.0.0.1", port), timeout=20)
        with context.wrap_socket(raw, server_hostname="api.example.com", session=session) as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n")
            while tls.recv(65536):  # the response, and the tickets sent before it
                pass
            resumed.append(bool(tls.session_reused))
            session = tls.session
    return resumed


async def test_a_ticket_issued_by_one_worker_resumes_on_the_other(setup: Setup) -> None:
    """Without a [tls] ticket_key_file, the supervisor gives the workers one of its own: the
    reconnects, spread over both workers by their reuse_port sockets, all resume (the
    first is a full handshake)."""
    supervisor = setup.supervisor("reuse_port")
    async with supervising(supervisor) as port:
        resumed = await trio.to_thread.run_sync(resumed_reconnects, port, setup.cafile, 24)

        def counted() -> bool:
            return sum(worker.connections for worker in supervisor.workers) == 24

        await eventually(counted, "24 connections counted")
        per_worker = [worker.connections for worker in supervisor.workers]
    assert resumed == [False] + [True] * 23
    assert all(per_worker), per_worker  # both workers took reconnects


async def test_sigusr1_makes_every_worker_reopen_the_access_log(setup: Setup) -> None:
    """logrotate renames the access log, then sends SIGUSR1 to the supervisor (reopen_logs):
    from then on every worker writes to a new file at the configured path, none to the
    renamed one (requests spread over both workers by their reuse_port sockets; relayed,
    as the placeholder writes no access line)."""
    access = setup.folder / "access.log"
    async with serve_upstream(UpstreamServer.https(setup.folder)) as upstream:
        write_config(
            setup.config_file,
            [setup.old],
            extra={
                "process": {"workers": 2},
                "log": {"access": str(access)},
                "upstream": upstream.config_table(),
            },
        )
        await reopened_by_every_worker(setup, access)


async def reopened_by_every_worker(setup: Setup, access: Path) -> None:
    supervisor = setup.supervisor("reuse_port")
    async with supervising(supervisor) as port:
        assert await new_connection_gets(port, setup.cafile, 10) == [200] * 10

        def lines(path: Path) -> int:
            return len(path.read_text().splitlines()) if path.exists() else 0

        await eventually(lambda: lines(access) == 10, "10 access lines")
        rotated = access.with_name("access.log.1")
        access.rename(rotated)
        supervisor.reopen_logs()
        await eventually(access.exists, "a new access log")
        assert await new_connection_gets(port, setup.cafile, 20) == [200] * 20

        def counted() -> bool:
            return sum(worker.connections for worker in supervisor.workers) == 30

        await eventually(counted, "30 connections counted")
        await eventually(lambda: lines(access) == 20, "20 access lines in the new file")
        per_worker = [worker.connections for worker in supervisor.workers]
    assert lines(rotated) == 10
    assert all(per_worker), per_worker
