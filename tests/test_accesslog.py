"""The per-request access log: its lines parsed as a log pipeline would (from the text alone),
for HTTP/1.1 and HTTP/2, text and JSON; its buffering (64 KiB, 1 s, at once for a warning, at
a clean stop); SIGUSR1 reopening the file; and the upstream failures it and the `conn` line
report at WARNING, with the reason, while the client sees a generic body.
"""

from __future__ import annotations

import io
import json
import logging
import re
import select
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from helpers.clients import CLIENT_TIMEOUT
from helpers.configs import make_config, write_config
from helpers.h2client import SNI, h2_client
from helpers.keys import KeyFiles, make_key
from helpers.logs import ACCESS_FIELDS, parse_access_line
from helpers.serving import Running, serving
from helpers.upstream_server import UpstreamServer, closed_port, serve_upstream

from dualproxy.config.errors import OperatorError
from dualproxy.ops.accesslog import BUFFER_BYTES, MAX_PATH_CHARS, AccessLog
from dualproxy.serve.server import Server


def entry(log: AccessLog, **changes: Any) -> None:
    values: dict[str, Any] = {
        "peer": "203.0.113.7:51234",
        "method": b"GET",
        "target": b"/v1/items?id=1",
        "version": b"1.1",
        "status": 200,
        "bytes_in": 0,
        "bytes_out": 512,
        "seconds": 0.012,
        "upstream_seconds": 0.010,
        "key": "k2026a",
        "reason": "default",
        "ended": None,
    }
    values.update(changes)
    log.exchange(**values)


# --- the line and the buffer -----------------------------------------------------------------


def test_a_text_line_has_every_field_in_order(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(path)
    entry(log)
    entry(log, version=b"2", status=0, upstream_seconds=None, ended="client reset the stream")
    log.close()
    first, second = (parse_access_line(line) for line in path.read_text().splitlines())
    assert first == {
        "level": "INFO",
        "peer": "203.0.113.7:51234",
        "method": "GET",
        "path": "/v1/items?id=1",
        "proto": "HTTP/1.1",
        "status": "200",
        "in": "0",
        "out": "512",
        "ms": "12",
        "upstream_ms": "10",
        "key": "k2026a",
        "reason": "default",
        "ended": "-",
    }
    assert (second["proto"], second["status"], second["upstream_ms"]) == ("HTTP/2", "-", "-")
    assert second["ended"] == "client reset the stream"


def test_a_json_line_has_the_same_fields_typed(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(path, json_lines=True)
    entry(log, status=502, upstream_seconds=None, ended="502 upstream: refused")
    log.close()
    [line] = path.read_text().splitlines()
    got = json.loads(line)
    assert list(got) == ["time", "level", "event", *ACCESS_FIELDS]
    assert (got["level"], got["event"], got["status"], got["upstream_ms"]) == (
        "warning",
        "access",
        502,
        None,
    )
    assert got["ended"] == "502 upstream: refused"


@pytest.mark.parametrize(
    "target",
    [b"/a b", b"/x\r\nINFO forged=1", b'/q"=\\', "/caf\u00e9".encode("latin-1"), b"/" * 5000],
)
def test_a_path_cannot_forge_fields_and_is_bounded(tmp_path: Path, target: bytes) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(path)
    entry(log, target=target)
    log.close()
    [line] = path.read_text().splitlines()
    logged = parse_access_line(line)["path"]
    expected = target.decode("latin-1")
    if len(expected) > MAX_PATH_CHARS:
        expected = expected[:MAX_PATH_CHARS] + "..."
    assert logged == expected


def test_lines_wait_in_the_buffer_until_it_fills_or_a_flush(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(path)
    entry(log)
    assert path.read_text() == ""  # buffered, as nginx's buffer=64k
    log.flush()
    assert len(path.read_text().splitlines()) == 1
    # A full buffer is written without waiting for the flush.
    written = 1
    while log.lines_written == written:  # bounded: 64 KiB of ~200-byte lines
        entry(log)
    assert len(path.read_text().splitlines()) == log.lines_written
    assert path.stat().st_size >= BUFFER_BYTES
    log.close()


def test_a_warning_is_written_at_once(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(path)
    entry(log)
    entry(log, status=504, ended="504 upstream: no response head within 60 s")
    lines = path.read_text().splitlines()
    assert [parse_access_line(line)["level"] for line in lines] == ["INFO", "WARNING"]
    log.close()


async def test_the_buffer_is_flushed_every_second(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(path)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(log.run)
        entry(log)
        await trio.sleep(0.5)
        assert path.read_text() == ""
        await trio.sleep(0.6)
        assert len(path.read_text().splitlines()) == 1
        nursery.cancel_scope.cancel()
    log.close()


class _Recording(io.StringIO):
    """A stderr without a descriptor (as a pipe is, to the rule): each write kept."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def test_on_a_pipe_each_write_is_whole_lines_within_pipe_buf(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Workers share stderr (a pipe or socket under systemd and containers): a write of at
    most PIPE_BUF bytes is atomic there, so no line of one worker lands inside another's."""
    recording = _Recording()
    monkeypatch.setattr(sys, "stderr", recording)
    log = AccessLog(None)
    for index in range(1000):  # some 170 KiB: more than one buffer, many pieces
        entry(log, target=b"/v1/items?id=%d" % index)
    log.flush()
    assert len(recording.writes) > 1
    for piece in recording.writes:
        assert len(piece.encode()) <= select.PIPE_BUF
        assert piece.endswith("\n")
    lines = "".join(recording.writes).splitlines()
    assert [parse_access_line(line)["path"] for line in lines] == [
        f"/v1/items?id={index}" for index in range(1000)
    ]


def test_on_a_regular_file_the_buffer_goes_in_one_write(tmp_path: Path) -> None:
    """O_APPEND: each write(2) lands whole at the end of the file, however long."""
    path = tmp_path / "access.log"
    log = AccessLog(path)
    writes: list[str] = []
    write = log._out.write

    def recording(text: str) -> int:
        writes.append(text)
        return write(text)

    log._out.write = recording  # type: ignore[method-assign]
    for index in range(100):
        entry(log, target=b"/%d" % index)
    log.close()
    assert len(writes) == 1
    assert len(path.read_text().splitlines()) == 100


def test_reopen_starts_a_new_file_after_a_rotation(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(path)
    entry(log, target=b"/before")
    path.rename(tmp_path / "access.log.1")  # logrotate
    log.reopen()  # what SIGUSR1 does
    entry(log, target=b"/after")
    log.close()
    assert [
        parse_access_line(line)["path"]
        for line in (tmp_path / "access.log.1").read_text().splitlines()
    ] == ["/before"]
    assert [parse_access_line(line)["path"] for line in path.read_text().splitlines()] == ["/after"]


# --- the server's lines ----------------------------------------------------------------------


@pytest.fixture
def key(ca: trustme.CA, tmp_path: Path) -> KeyFiles:
    return make_key(ca, tmp_path, "k1")


@pytest.fixture
async def upstream(tmp_path: Path) -> AsyncIterator[UpstreamServer]:
    async with serve_upstream(UpstreamServer.https(tmp_path)) as server:
        yield server


@asynccontextmanager
async def proxy_logging(
    key: KeyFiles, tmp_path: Path, upstream: dict[str, Any]
) -> AsyncIterator[tuple[Running, Path]]:
    path = tmp_path / "access.log"
    config = make_config(
        [key], base_dir=tmp_path, extra={"upstream": upstream, "log": {"access": str(path)}}
    )
    async with serving(config) as run:
        yield run, path


async def test_both_protocols_are_logged_one_line_per_request(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    async with proxy_logging(key, tmp_path, upstream.config_table()) as (run, path):
        async with h2_client(run.port, cafile) as client:
            await client.request("GET", "/h2/one")
            await client.request("POST", "/h2/two", body=b"12345")
        result = await trio.to_thread.run_sync(
            lambda: subprocess.run(
                [
                    "curl",
                    "-sS",
                    "--http1.1",
                    "--cacert",
                    str(cafile),
                    "--resolve",
                    f"{SNI}:{run.port}:127.0.0.1",
                    f"https://{SNI}:{run.port}/h1",
                ],
                capture_output=True,
                timeout=CLIENT_TIMEOUT,
                check=False,
            )
        )
        assert result.returncode == 0, result.stderr
        assert run.server.access_log is not None
        run.server.access_log.flush()
        lines = [parse_access_line(line) for line in path.read_text().splitlines()]
    by_path = {line["path"]: line for line in lines}
    assert set(by_path) == {"/h2/one", "/h2/two", "/h1"}
    assert by_path["/h2/one"]["proto"] == by_path["/h2/two"]["proto"] == "HTTP/2"
    assert by_path["/h1"]["proto"] == "HTTP/1.1"
    assert by_path["/h2/two"]["method"] == "POST"
    assert by_path["/h2/two"]["in"] == "5"
    for line in lines:
        assert (line["status"], line["key"], line["reason"], line["ended"]) == (
            "200",
            "k1",
            "single",
            "-",
        )
        assert int(line["out"]) > 0
        assert line["upstream_ms"] != "-"


async def test_requests_the_placeholder_answers_are_logged_as_any_other(
    key: KeyFiles, cafile: Path, tmp_path: Path
) -> None:
    """Without [upstream] the server answers itself (HTTP/1.1 through http.smallserver, HTTP/2
    through its local routes): each request still gets its line, with no upstream time."""
    path = tmp_path / "access.log"
    config = make_config([key], base_dir=tmp_path, extra={"log": {"access": str(path)}})
    async with serving(config) as run:
        async with h2_client(run.port, cafile) as client:
            await client.request("GET", "/h2")

        def curl(*args: str) -> None:
            target = f"https://{SNI}:{run.port}"
            urls = [f"{target}/h1", f"{target}/h1/again"]
            resolve = ["--resolve", f"{SNI}:{run.port}:127.0.0.1"]
            result = subprocess.run(
                ["curl", "-sS", "--http1.1", "--cacert", str(cafile), *resolve, *args, *urls],
                capture_output=True,
                timeout=CLIENT_TIMEOUT,
                check=False,
            )
            assert result.returncode == 0, result.stderr

        await trio.to_thread.run_sync(curl, "-d", "12345")  # two POSTs on one connection
        await trio.to_thread.run_sync(curl, "-I")  # two HEADs
        assert run.server.access_log is not None
        run.server.access_log.flush()
        lines = [parse_access_line(line) for line in path.read_text().splitlines()]
    assert [(line["method"], line["path"], line["proto"]) for line in lines] == [
        ("GET", "/h2", "HTTP/2"),
        ("POST", "/h1", "HTTP/1.1"),
        ("POST", "/h1/again", "HTTP/1.1"),
        ("HEAD", "/h1", "HTTP/1.1"),
        ("HEAD", "/h1/again", "HTTP/1.1"),
    ]
    for line in lines:
        assert (line["status"], line["upstream_ms"], line["key"], line["ended"]) == (
            "200",
            "-",
            "k1",
            "-",
        )
    assert [line["in"] for line in lines] == ["0", "5", "5", "0", "0"]
    assert [int(line["out"]) > 0 for line in lines] == [True, True, True, False, False]


async def test_a_502_is_a_warning_with_its_reason_and_a_generic_body(
    key: KeyFiles, cafile: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dualproxy")
    with closed_port() as port:
        table = {"url": f"http://127.0.0.1:{port}"}
        async with proxy_logging(key, tmp_path, table) as (run, path):
            async with h2_client(run.port, cafile) as client:
                reply = await client.request("GET", "/down")
            # Written at once: a warning does not wait for the flush.
            [line] = [parse_access_line(line) for line in path.read_text().splitlines()]
            with trio.fail_after(CLIENT_TIMEOUT):
                while not [r for r in caplog.records if r.getMessage().startswith("conn ")]:
                    await trio.sleep(0.01)
    assert (reply.status, bytes(reply.body)) == (502, b"502 Bad Gateway\n")
    assert (line["level"], line["status"]) == ("WARNING", "502")
    assert line["ended"].startswith(f"502 upstream: connection to 127.0.0.1:{port} refused")
    [conn] = [r for r in caplog.records if r.getMessage().startswith("conn ")]
    assert conn.levelno == logging.WARNING
    assert "outcome=upstream-error" in conn.getMessage()
    assert "refused" in conn.getMessage()


async def test_a_good_connection_stays_an_info_ok_line(
    key: KeyFiles,
    cafile: Path,
    tmp_path: Path,
    upstream: UpstreamServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dualproxy")
    async with proxy_logging(key, tmp_path, upstream.config_table()) as (run, _):
        async with h2_client(run.port, cafile) as client:
            assert (await client.request("GET", "/")).status == 200
        with trio.fail_after(CLIENT_TIMEOUT):
            while not [r for r in caplog.records if r.getMessage().startswith("conn ")]:
                await trio.sleep(0.01)
    [conn] = [r for r in caplog.records if r.getMessage().startswith("conn ")]
    assert conn.levelno == logging.INFO
    assert "outcome=ok" in conn.getMessage()


# --- `dualproxy serve`: JSON, SIGUSR1, a clean stop ---------------------------------------


async def read_lines(stream: trio.abc.ReceiveStream, lines: list[str]) -> None:
    pending = b""
    while chunk := await stream.receive_some():
        pending += chunk
        *complete, pending = pending.split(b"\n")
        lines += [line.decode("utf-8", "replace") for line in complete]


def curl(port: int, cafile: Path, target: str, *options: str) -> None:
    result = subprocess.run(
        [
            "curl",
            "-sS",
            *options,
            "--cacert",
            str(cafile),
            "--resolve",
            f"{SNI}:{port}:127.0.0.1",
            f"https://{SNI}:{port}{target}",
        ],
        capture_output=True,
        timeout=CLIENT_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.e2e
async def test_serve_writes_json_lines_reopens_on_sigusr1_and_loses_none_on_stop(
    key: KeyFiles, cafile: Path, tmp_path: Path, upstream: UpstreamServer
) -> None:
    path = tmp_path / "access.log"
    config_file = tmp_path / "config.toml"
    write_config(
        config_file,
        [key],
        extra={
            "upstream": upstream.config_table(),
            "log": {"access": str(path)},
            "admin": {"enabled": False},
        },
    )
    process = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "dualproxy",
            "serve",
            "--log-format",
            "json",
            "-c",
            str(config_file),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    lines: list[str] = []
    try:
        async with trio.open_nursery() as nursery:
            assert process.stderr is not None
            nursery.start_soon(read_lines, process.stderr, lines)
            with trio.fail_after(CLIENT_TIMEOUT):
                while not any("listening on" in line for line in lines):
                    assert process.poll() is None, lines
                    await trio.sleep(0.05)
            port = int(
                re.findall(
                    r"127\.0\.0\.1:(\d+)", next(line for line in lines if "listening" in line)
                )[0]
            )
            await trio.to_thread.run_sync(curl, port, cafile, "/first", "--http2")
            # logrotate: move the file, then SIGUSR1; the server writes a new one.
            rotated = tmp_path / "access.log.1"
            with trio.fail_after(CLIENT_TIMEOUT):
                while not path.exists() or not path.read_text():  # flushed within a second
                    await trio.sleep(0.05)
            path.rename(rotated)
            process.send_signal(signal.SIGUSR1)
            with trio.fail_after(CLIENT_TIMEOUT):
                while not any("reopened" in line for line in lines):
                    await trio.sleep(0.05)
            await trio.to_thread.run_sync(curl, port, cafile, "/second", "--http1.1")
            # SIGTERM at once: the line still buffered is written as the server stops.
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(CLIENT_TIMEOUT):
                assert await process.wait() == 0, lines
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
            if process.stderr is not None:
                await process.stderr.aclose()
    [before] = [json.loads(line) for line in rotated.read_text().splitlines()]
    [after] = [json.loads(line) for line in path.read_text().splitlines()]
    assert (before["event"], before["path"], before["proto"], before["status"]) == (
        "access",
        "/first",
        "HTTP/2",
        200,
    )
    assert (after["path"], after["proto"]) == ("/second", "HTTP/1.1")
    # The other lines stay JSON on stderr.
    assert all(json.loads(line) for line in lines if line)


@pytest.mark.parametrize("moved", [False, True])
async def test_a_reload_keeps_the_access_log_and_says_when_it_moved(
    key: KeyFiles, tmp_path: Path, caplog: pytest.LogCaptureFixture, moved: bool
) -> None:
    """The file is the server's from its start: a reload that names another one says to
    restart (as for the listen address) and keeps logging where it did; one that does not
    says nothing of it."""
    first, second = tmp_path / "access.log", tmp_path / "moved.log"
    config_file = tmp_path / "config.toml"
    config = write_config(config_file, [key], extra={"log": {"access": str(first)}})
    async with serving(config) as run:
        target = second if moved else first
        write_config(config_file, [key], extra={"log": {"access": str(target)}})
        with caplog.at_level(logging.WARNING, logger="dualproxy"):
            assert await run.server.reload("test")
        assert run.server.config.log.access_path == first
    assert ("log.access changed: restart dualproxy to apply" in caplog.text) is moved
    assert not second.exists()


# --- [log] access: what the operator may write -----------------------------------------------


@pytest.mark.parametrize(
    ("value", "on", "path"),
    [("stderr", True, None), ("off", False, None), ("logs/access.log", True, "logs/access.log")],
)
def test_log_access_takes_stderr_off_or_a_path(
    key: KeyFiles, tmp_path: Path, value: str, on: bool, path: str | None
) -> None:
    config = make_config([key], base_dir=tmp_path, extra={"log": {"access": value}})
    assert config.log.access is on
    assert config.log.access_path == (tmp_path / path if path else None)
    if path:
        (tmp_path / path).parent.mkdir()
    server = Server(config, handle_signals=False)
    assert (server.access_log is not None) is on
    if server.access_log is not None:
        server.access_log.close()


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"access": ""}, "log.access: is empty"),
        ({"acces": "stderr"}, "log.acces: unknown setting"),
        ({"access": 5}, "log.access"),
    ],
    ids=["empty", "misspelled", "not-text"],
)
def test_log_access_refuses_what_it_cannot_use(
    key: KeyFiles, tmp_path: Path, table: dict[str, Any], message: str
) -> None:
    with pytest.raises(OperatorError) as refused:
        make_config([key], base_dir=tmp_path, extra={"log": table})
    assert message in str(refused.value)


def test_an_access_log_file_that_cannot_be_opened_names_the_setting(
    key: KeyFiles, tmp_path: Path
) -> None:
    """Checked when the server starts, before it listens: whose fault and what to do."""
    config = make_config(
        [key], base_dir=tmp_path, extra={"log": {"access": "missing-dir/access.log"}}
    )
    with pytest.raises(OperatorError) as refused:
        Server(config, handle_signals=False)
    text = str(refused.value)
    assert "log.access" in text
    assert "missing-dir/access.log" in text
    assert 'write "stderr" or "off"' in text or "writable" in text
