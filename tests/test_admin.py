"""Rollout evidence end to end: real clients that reject a key, against a real server with its
admin listener, both on loopback; what they did must show against the key they were served
and the reason it was chosen, in /metrics (read with prometheus_client's own parser), in
/status.json, /status.txt and `dualproxy status`; and the canary must halt under a burst of
pin failures, and not under normal traffic.

Clients: curl with --pinnedpubkey of the other key (it checks the pin after the handshake, so
the server sees a handshake completed and closed without a request), curl trusting another CA
(an alert during the handshake: aborted), a Python ssl client that completes the handshake
and leaves without a request (what OkHttp's CertificatePinner does), and plain requests.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Final

import pytest
import trio
import trustme
from helpers.clients import CLIENT_TIMEOUT, curl_pinned, run_client, tls_get_async
from helpers.configs import make_config, write_config
from helpers.keys import KeyFiles, make_key
from helpers.rotation import GRACE_END, GRACE_START, Clock
from helpers.serving import Running, serving
from helpers.upstream_server import UpstreamServer, serve_upstream
from prometheus_client.parser import text_string_to_metric_families

from dualproxy.cli import main as cli
from dualproxy.config.names import ListenAddress
from dualproxy.http.errors import HttpRefusal
from dualproxy.http.smallserver import Request
from dualproxy.ops import admin
from dualproxy.serve.server import Server

pytestmark = pytest.mark.e2e

DURING: Final = datetime(2026, 12, 10, tzinfo=UTC)
NEW_SNI: Final = "k2.api.example.com"
PLAIN_SNI: Final = "api.example.com"
CURLE_SSL_PINNEDPUBKEYNOTMATCH: Final = 90
CURLE_PEER_FAILED_VERIFICATION: Final = 60
# Clients in the canary tests: a burst where every other client fails halts the canary well
# within this (rotation.canary: a handful when half fail), and normal traffic runs as many.
CANARY_CLIENTS: Final = 15


@pytest.fixture
def keys(ca: trustme.CA, tmp_path: Path) -> dict[str, KeyFiles]:
    return {name: make_key(ca, tmp_path / "certs", name) for name in ("k2026a", "k2026b")}


def rotation(*, canary_percent: float = 0.0) -> dict[str, Any]:
    return {
        "old": "k2026a",
        "new": "k2026b",
        "grace_start": GRACE_START,
        "grace_end": GRACE_END,
        "canary_percent": canary_percent,
        "canary_halt_margin": 0.05,
        "hints": {"new": {"sni": [NEW_SNI]}},
    }


@asynccontextmanager
async def admin_listener(server: Server, host: str = "127.0.0.1") -> AsyncIterator[tuple[str, int]]:
    """The server's admin listener on a free port, for the block; its loopback address."""
    sock = admin.open_socket(ListenAddress(host, 0))
    port = int(sock.getsockname()[1])
    async with trio.open_nursery() as nursery:
        await nursery.start(admin.serve, sock, server)
        yield "127.0.0.1", port
        nursery.cancel_scope.cancel()


async def get(address: tuple[str, int], path: str, method: str = "GET") -> bytes:
    return await trio.to_thread.run_sync(lambda: admin.fetch(address, path, method=method))


async def connections_counted(server: Server, count: int) -> None:
    """Wait until the server has accounted for `count` connections (it does so after the
    client is gone, so a client's return is not enough)."""
    with trio.fail_after(CLIENT_TIMEOUT):
        while True:
            status = admin.status_of(server)
            if sum(row.connections for row in status.rows) >= count:
                return
            await trio.sleep(0.01)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition, by (name, labels), through prometheus_client's parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name, frozenset(sample.labels.items())] = sample.value
    return out


def value(
    parsed: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return parsed.get((name, frozenset(labels.items())), 0.0)


async def okhttp_style(running: Running, cafile: Path, **kwargs: Any) -> None:
    """Handshake, check, leave without a request (OkHttp's CertificatePinner)."""
    await tls_get_async(running.host, running.port, cafile=cafile, request=False, **kwargs)


# --- every signal against the right key and reason -------------------------------------------


async def test_each_signal_counts_against_the_key_and_reason_that_got_it(
    keys: dict[str, KeyFiles],
    ca: trustme.CA,
    cafile: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    old, new = keys["k2026a"], keys["k2026b"]
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    async with serve_upstream(UpstreamServer.http()) as upstream:
        config = make_config(
            [old, new],
            rotation=rotation(),
            base_dir=tmp_path,
            extra={"upstream": upstream.config_table("127.0.0.1")},
        )
        async with serving(config, clock=Clock(DURING)) as run, admin_listener(run.server) as at:
            # An app updated to ask for new (SNI hint) but pinning only old: curl exit 90,
            # after a completed handshake, without a request.
            wrong_pin = curl_pinned(run.port, cafile=cafile, pin=old.pin, server_name=NEW_SNI)
            result = await run_client(wrong_pin)
            assert result.returncode == CURLE_SSL_PINNEDPUBKEYNOTMATCH, result.stderr
            # Its twin pins new: it works, and counts as no failure.
            result = await run_client(
                curl_pinned(run.port, cafile=cafile, pin=new.pin, server_name=NEW_SNI)
            )
            assert result.returncode == 0, result.stderr
            # A client that does not trust our CA: an alert mid-handshake, against old.
            distrust = curl_pinned(run.port, cafile=other_ca, pin=old.pin)
            result = await run_client(distrust)
            assert result.returncode == CURLE_PEER_FAILED_VERIFICATION, result.stderr
            # OkHttp-style: the handshake, then nothing, against old (default).
            await okhttp_style(run, cafile, server_name=PLAIN_SNI)
            # Normal traffic, twice, against old.
            for _ in range(2):
                answer = await tls_get_async(run.host, run.port, cafile=cafile)
                assert answer.pin == old.pin
                assert answer.response.startswith(b"HTTP/1.1 200 ")
            # A request the relay refuses (405) on a completed handshake: no request got
            # through, yet it is no pin failure, and its status class is counted.
            trace = [*curl_pinned(run.port, cafile=cafile, pin=old.pin), "-X", "TRACE"]
            result = await run_client(trace)
            assert (result.returncode, b"405" in result.stdout) == (0, True), result.stdout
            await connections_counted(run.server, 7)

            exposition = (await get(at, "/metrics")).decode()
            document = json.loads(await get(at, "/status.json"))
            text = (await get(at, "/status.txt")).decode()
            code = await trio.to_thread.run_sync(
                lambda: cli.main(["status", "--admin", f"http://{at[0]}:{at[1]}"])
            )
    parsed = samples(exposition)
    handshakes, failures = "dualproxy_handshakes_total", "dualproxy_pin_failures_total"
    assert value(parsed, handshakes, key="k2026b", reason="hint-sni", result="completed") == 2
    assert value(parsed, failures, key="k2026b", reason="hint-sni", kind="no_request") == 1
    assert value(parsed, handshakes, key="k2026a", reason="default", result="completed") == 4
    assert value(parsed, handshakes, key="k2026a", reason="default", result="aborted") == 1
    assert value(parsed, failures, key="k2026a", reason="default", kind="aborted") == 1
    assert value(parsed, failures, key="k2026a", reason="default", kind="no_request") == 1
    # The twins: what worked is not counted as a failure anywhere else.
    assert value(parsed, failures, key="k2026b", reason="hint-sni", kind="aborted") == 0
    connections = "dualproxy_connections_total"
    assert value(parsed, connections, key="k2026a", reason="default", outcome="ok") == 2
    assert value(parsed, connections, key="k2026a", reason="default", outcome="no-request") == 2
    assert value(parsed, connections, key="k2026b", reason="hint-sni", outcome="ok") == 1
    assert value(parsed, "dualproxy_requests_total", key="k2026a", reason="default") == 2
    # Both curl and Python got a 200 relayed from the upstream, each against the key its
    # connection was served; the latency histograms have them; the TRACE's 405 is old's.
    responses, latency = "dualproxy_responses_total", "dualproxy_upstream_response_seconds"
    assert value(parsed, responses, key="k2026a", reason="default", code_class="2xx") == 2
    assert value(parsed, responses, key="k2026b", reason="hint-sni", code_class="2xx") == 1
    assert value(parsed, responses, key="k2026a", reason="default", code_class="4xx") == 1
    assert value(parsed, responses, key="k2026b", reason="hint-sni", code_class="4xx") == 0
    assert value(parsed, f"{latency}_count", key="k2026a", reason="default") == 2
    assert value(parsed, f"{latency}_count", key="k2026b", reason="hint-sni") == 1
    assert value(parsed, f"{latency}_bucket", key="k2026a", reason="default", le="+Inf") == 2
    share = "dualproxy_pin_failure_share"
    assert value(parsed, share, key="k2026a", window="since_start") == pytest.approx(2 / 5)
    assert value(parsed, share, key="k2026b", window="24h") == pytest.approx(1 / 2)
    assert value(parsed, "dualproxy_rotation_phase", phase="during") == 1
    assert value(parsed, "dualproxy_rotation_phase", phase="after") == 0
    assert value(parsed, "dualproxy_reloads_total", result="ok") == 0
    assert ("dualproxy_active_connections", frozenset()) in parsed
    not_after = value(
        parsed, "dualproxy_certificate_not_after_timestamp_seconds", key="k2026b", role="new"
    )
    assert not_after > DURING.timestamp()
    assert ("dualproxy_canary_halted", frozenset()) not in parsed  # no canary configured

    # /status.json, schema 1: the same counts, per key, old and new side by side.
    assert document["schema"] == 1
    assert document["phase"] == "during"
    assert document["rotation"]["grace_end"] == "2027-01-15T00:00:00Z"
    by_name = {key["name"]: key for key in document["keys"]}
    assert [by_name[n]["role"] for n in ("k2026a", "k2026b")] == ["old", "new"]
    assert by_name["k2026a"]["total"] == {
        "handshakes": 5,
        "completed": 4,
        "aborted": 1,
        "no_request": 1,
        "pin_failures": 2,
        "pin_failure_share": 0.4,
    }
    assert by_name["k2026b"]["last_24h"]["pin_failures"] == 1
    assert by_name["k2026b"]["pin"] == f"sha256/{new.pin}"
    assert sum(by_name["k2026a"]["series"]["handshakes"]) == 5
    assert len(by_name["k2026a"]["series"]["handshakes"]) == document["series"]["buckets"]
    assert document["responses"] == {"2xx": 3, "4xx": 1}
    assert [
        (row["key"], row["reason"], row["responses"], sum(row["upstream_latency"]["counts"]))
        for row in document["responses_by_key"]
    ] == [("k2026a", "default", {"2xx": 2, "4xx": 1}, 2), ("k2026b", "hint-sni", {"2xx": 1}, 1)]
    assert document["canary"] is None

    # The text summary, as served and as `dualproxy status` prints it.
    assert code == cli.EXIT_OK
    printed = capsys.readouterr().out
    assert printed == text
    assert "phase: grace window 2026-12-01 00:00:00Z to 2027-01-15 00:00:00Z" in text
    lines = {
        line.split()[0]: line.split() for line in text.splitlines() if line.startswith("k2026")
    }
    assert lines["k2026a"][1:6] == ["old", "5", "2", "40.0%", "5"]
    assert lines["k2026b"][1:6] == ["new", "2", "1", "50.0%", "2"]


# --- the canary -------------------------------------------------------------------------------


@pytest.mark.parametrize("burst", [True, False], ids=["failure-burst", "normal-traffic"])
async def test_the_canary_halts_under_a_failure_burst_and_not_under_normal_traffic(
    keys: dict[str, KeyFiles],
    cafile: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    burst: bool,
) -> None:
    old, new = keys["k2026a"], keys["k2026b"]
    # Every hint-less client is in the canary (100%): loopback clients are few.
    config = make_config([old, new], rotation=rotation(canary_percent=100), base_dir=tmp_path)
    async with serving(config, clock=Clock(DURING)) as run, admin_listener(run.server) as at:
        served = 0
        for _ in range(CANARY_CLIENTS):
            if burst and served % 2 == 0:
                await okhttp_style(run, cafile)
            else:
                answer = await tls_get_async(run.host, run.port, cafile=cafile)
                assert answer.response.startswith(b"HTTP/1.1 200 ")
            served += 1
            await connections_counted(run.server, served)
            if run.server.evidence.canary.halted:
                break
        # The next hint-less client: old again after a halt, still new without one.
        after = await tls_get_async(run.host, run.port, cafile=cafile)
        # Hinted clients are unaffected either way.
        hinted = await tls_get_async(run.host, run.port, cafile=cafile, server_name=NEW_SNI)
        assert hinted.pin == new.pin
        await connections_counted(run.server, served + 2)
        parsed = samples((await get(at, "/metrics")).decode())
        document = json.loads(await get(at, "/status.json"))
        page = (await get(at, "/")).decode()
        if burst:
            # A web page cannot resume it, nor can a GET.
            with pytest.raises(admin.AdminError, match="405"):
                await get(at, "/canary/resume")
            resumed = await trio.to_thread.run_sync(
                lambda: cli.main(["canary", "resume", "--admin", f"{at[0]}:{at[1]}"])
            )
            assert resumed == cli.EXIT_OK
            assert not run.server.evidence.canary.halted
            again = await tls_get_async(run.host, run.port, cafile=cafile)
            assert again.pin == new.pin
    canary = document["canary"]
    if burst:
        assert after.pin == old.pin
        assert canary["halted"] is True
        assert canary["state"] == "halted"
        assert canary["canary_sample"]["handshakes"] == served < CANARY_CLIENTS
        assert canary["canary_sample"]["pin_failure_share"] > 0.05
        assert canary["e_value"] >= canary["halt_threshold"] == 100
        assert "CANARY HALTED" in caplog.text
        assert value(parsed, "dualproxy_canary_halted") == 1
        assert value(parsed, "dualproxy_canary_halts_total") == 1
        assert "Canary halted" in page
        assert "dualproxy canary resume" in page
        # The client the halt sent back to old was a default, not a canary, choice.
        connections = "dualproxy_connections_total"
        assert value(parsed, connections, key="k2026a", reason="default", outcome="ok") == 1
    else:
        assert after.pin == new.pin
        assert canary["halted"] is False
        assert canary["state"] == "running"
        assert canary["canary_sample"]["handshakes"] == CANARY_CLIENTS + 1
        assert canary["canary_sample"]["pin_failures"] == 0
        assert "CANARY HALTED" not in caplog.text
        assert value(parsed, "dualproxy_canary_halted") == 0
        assert "Canary running" in page


# --- who may ask --------------------------------------------------------------------------------


async def test_web_pages_and_foreign_hosts_are_refused(
    keys: dict[str, KeyFiles], tmp_path: Path
) -> None:
    config = make_config(
        list(keys.values()), rotation=rotation(canary_percent=5), base_dir=tmp_path
    )
    async with serving(config, clock=Clock(DURING)) as run, admin_listener(run.server) as at:
        assert b"<svg" in await get(at, "/")
        for headers in (
            {"Origin": "https://evil.example"},  # a page's fetch
            {"Host": "evil.example"},  # a page that rebound its name to 127.0.0.1
        ):
            for method, path in (("POST", "/canary/resume"), ("GET", "/status.json")):
                status = await trio.to_thread.run_sync(raw_request, at, method, path, headers)
                assert status == 403, (method, path, headers)
        assert await trio.to_thread.run_sync(lambda: raw_request(at, "GET", "/nope", {})) == 404
        assert await trio.to_thread.run_sync(lambda: raw_request(at, "PUT", "/", {})) == 405


async def test_a_listener_opened_to_the_network_answers_any_host_but_no_web_page(
    keys: dict[str, KeyFiles], tmp_path: Path
) -> None:
    """With admin.allow_non_loopback, a scraper may name the host as it likes; a page's
    cross-origin read is still refused, and the resume still takes only this machine's
    requests, with the loopback checks."""
    config = make_config(
        list(keys.values()),
        rotation=rotation(canary_percent=5),
        base_dir=tmp_path,
        extra={"admin": {"address": "0.0.0.0:0", "allow_non_loopback": True}},
    )
    async with (
        serving(config, clock=Clock(DURING)) as run,
        admin_listener(run.server, "0.0.0.0") as at,
    ):
        for method, path, headers, expected in (
            ("GET", "/metrics", {"Host": "dualproxy-1.internal:9901"}, 200),
            ("GET", "/status.json", {"Origin": "https://evil.example"}, 403),
            ("POST", "/canary/resume", {"Host": "dualproxy-1.internal:9901"}, 403),
            ("POST", "/canary/resume", {}, 200),
        ):
            status = await trio.to_thread.run_sync(raw_request, at, method, path, headers)
            assert status == expected, (method, path, headers)


@pytest.mark.parametrize(
    ("method", "target", "headers", "on_loopback", "from_loopback", "refused"),
    [
        # Opened to the network: only this machine may resume, whatever it names.
        ("POST", "/canary/resume", [("host", "localhost")], False, False, True),
        ("POST", "/canary/resume", [("host", "localhost")], False, True, False),
        # Any Host may read, no web page may.
        ("GET", "/metrics", [("host", "dualproxy-1.internal")], False, False, False),
        (
            "GET",
            "/metrics",
            [("host", "x"), ("origin", "https://evil.example")],
            False,
            False,
            True,
        ),
        # On loopback: the loopback Host is required.
        ("GET", "/metrics", [("host", "dualproxy-1.internal")], True, True, True),
    ],
)
def test_who_may_ask_what(
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    on_loopback: bool,
    from_loopback: bool,
    refused: bool,
) -> None:
    """The rules alone: a peer off this machine is what a loopback test client cannot be."""
    request = Request(
        method.encode(), target.encode(), tuple((n.encode(), v.encode()) for n, v in headers)
    )
    asker = admin.Asker(from_loopback=from_loopback, on_loopback=on_loopback)
    if refused:
        with pytest.raises(HttpRefusal) as caught:
            admin.route(request, asker)
        assert caught.value.status == 403
    else:
        assert admin.route(request, asker) is admin.ROUTES[request.path]


@pytest.mark.parametrize(
    ("method", "target", "allow"), [("PUT", "/metrics", b"GET"), ("GET", "/canary/resume", b"POST")]
)
def test_a_wrong_method_is_answered_with_what_is_allowed(
    method: str, target: str, allow: bytes
) -> None:
    request = Request(method.encode(), target.encode(), ((b"host", b"localhost"),))
    asker = admin.Asker(from_loopback=True, on_loopback=True)
    with pytest.raises(HttpRefusal) as caught:  # refused before the server is looked at
        admin.route(request, asker)
    assert caught.value.status == 405
    assert list(caught.value.headers) == [(b"allow", allow)]


def test_a_path_we_do_not_have_is_refused_after_the_readers_rule() -> None:
    """Its 404 names every route; a web page gets the readers' 403 instead, also on an opened
    listener, where a peer off this machine may otherwise ask."""
    opened = admin.Asker(from_loopback=False, on_loopback=False)
    for headers, status in (((), 404), (((b"origin", b"https://evil.example"),), 403)):
        with pytest.raises(HttpRefusal) as caught:
            admin.route(Request(b"GET", b"/nope", headers), opened)
        assert caught.value.status == status
    assert caught.value.problem == "refused a request from a web page (Origin)"
    with pytest.raises(HttpRefusal) as caught:
        admin.route(Request(b"POST", b"/nope", ((b"host", b"localhost"),)), opened)
    assert caught.value.problem == (
        "not found: GET /, /status.json, /status.txt, /metrics, /healthz, /readyz;"
        " POST /canary/resume"
    )


async def test_a_head_request_is_refused_and_the_listener_serves_on(
    keys: dict[str, KeyFiles], tmp_path: Path
) -> None:
    """A HEAD's answer has no body; sending one anyway used to end the listener, and serve."""
    config = make_config(list(keys.values()), rotation=rotation(), base_dir=tmp_path)
    async with serving(config, clock=Clock(DURING)) as run, admin_listener(run.server) as at:
        assert await trio.to_thread.run_sync(raw_request, at, "HEAD", "/metrics", {}) == 405
        assert await trio.to_thread.run_sync(raw_request, at, "GET", "/metrics", {}) == 200


def raw_request(address: tuple[str, int], method: str, path: str, headers: dict[str, str]) -> int:
    import http.client

    connection = http.client.HTTPConnection(*address, timeout=CLIENT_TIMEOUT)
    try:
        connection.request(method, path, headers={"Host": f"{address[0]}:{address[1]}", **headers})
        return connection.getresponse().status
    finally:
        connection.close()


def test_status_without_a_server_says_where_it_looked(capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        code = cli.main(["status", "--admin", f"http://127.0.0.1:{port}"])
    assert code == cli.EXIT_FAILED
    assert f"nothing answers at http://127.0.0.1:{port}/" in capsys.readouterr().err


async def test_status_finds_the_admin_listener_through_the_config(
    keys: dict[str, KeyFiles], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_file = tmp_path / "config.toml"
    config = write_config(config_file, list(keys.values()), rotation=rotation(canary_percent=5))
    async with serving(config, clock=Clock(DURING)) as run, admin_listener(run.server) as at:
        # The config names the port the listener got (a real one names it from the start).
        write_config(
            config_file,
            list(keys.values()),
            rotation=rotation(canary_percent=5),
            extra={"admin": {"address": f"127.0.0.1:{at[1]}"}},
        )
        code = await trio.to_thread.run_sync(cli.main, ["status", "-c", str(config_file)])
        resumed = await trio.to_thread.run_sync(
            cli.main, ["canary", "resume", "-c", str(config_file)]
        )
    assert (code, resumed) == (cli.EXIT_OK, cli.EXIT_OK)
    out = capsys.readouterr().out
    assert "canary: running: 5% of hint-less clients get the new key" in out
    assert "the canary was not halted; nothing changed" in out
    # Its twin: a config whose admin listener is off says so.
    write_config(
        config_file, list(keys.values()), rotation=rotation(), extra={"admin": {"enabled": False}}
    )
    assert cli.main(["status", "-c", str(config_file)]) == cli.EXIT_FAILED
    assert "the admin listener is off" in capsys.readouterr().err


def test_status_usage_error_for_a_bad_url(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["status", "--admin", "https://127.0.0.1:9901"]) == cli.EXIT_USAGE
    assert "is not an admin URL" in capsys.readouterr().err


# --- the record `dualproxy status` finds a server by ---------------------------------------


async def test_a_served_listener_is_recorded_for_its_config_and_removed_at_the_end(
    keys: dict[str, KeyFiles], tmp_path: Path, runtime_folder: Path
) -> None:
    config_file = tmp_path / "config.toml"
    config = write_config(config_file, list(keys.values()), rotation=rotation())
    assert admin.runtime_folder() == runtime_folder
    async with serving(config, clock=Clock(DURING)) as run, trio.open_nursery() as nursery:
        bound = await nursery.start(
            partial(admin.serve_when_possible, record_for=config_file),
            ListenAddress("127.0.0.1", 0),
            run.server,
        )
        assert bound is not None
        assert bound[1] != 0
        assert admin.recorded(config_file) == bound
        assert admin.recorded(tmp_path / "other.toml") is None  # one record per config
        assert admin.recorded_servers() == [(bound, str(config_file.absolute()))]
        assert (await get(bound, "/status.json")).startswith(b"{")
        nursery.cancel_scope.cancel()
    assert admin.recorded(config_file) is None
    assert list(runtime_folder.iterdir()) == []


async def test_a_record_in_a_folder_others_can_write_is_not_trusted(
    keys: dict[str, KeyFiles],
    tmp_path: Path,
    runtime_folder: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The twin: a shared folder could hold another user's forged address."""
    runtime_folder.mkdir(mode=0o700)
    runtime_folder.chmod(0o777)
    config_file = tmp_path / "config.toml"
    config = write_config(config_file, list(keys.values()), rotation=rotation())
    async with serving(config, clock=Clock(DURING)) as run, trio.open_nursery() as nursery:
        bound = await nursery.start(
            partial(admin.serve_when_possible, record_for=config_file),
            ListenAddress("127.0.0.1", 0),
            run.server,
        )
        assert bound is not None  # the listener serves all the same
        assert admin.recorded(config_file) is None
        assert admin.recorded_servers() == []
        nursery.cancel_scope.cancel()
    assert any("not recorded for `dualproxy status`" in r.getMessage() for r in caplog.records)
