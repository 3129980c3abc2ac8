"""Idle-then-churn: what new clients get when idle keep-alive connections fill the limit.

Phones keep idle connections open, so a front proxy for mobile apps spends most of its
connection slots on connections doing nothing. This load first opens IDLE connections to the
proxy (a TLS handshake and one request each, then kept open and quiet), as many as the
proxy's connection limit, then measures new clients: CHURN connections, each a TLS handshake
and one request with `Connection: close`, from a few concurrent clients; per server it reports
new connections per second, how many got their response, and the slowest one. nginx runs with
`worker_connections` equal to dualproxy's `limits.max_connections` (nginx counts its upstream
and listening sockets there too) and reuses idle connections at its limit; dualproxy reclaims
the longest-idle ones (serve.admission).

    .venv/bin/python benchmarks/idle_churn.py [--limit 1000] [--churn 300]
    .venv/bin/python benchmarks/idle_churn.py --dualproxy-python /other/tree/.venv/bin/python

Bounded: every connection has CLIENT_TIMEOUT, the whole run MAX_SECONDS per server.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import Final

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
# run.py is this folder's library of servers and certificates.
from run import (
    UPSTREAM_BODY,
    BenchError,
    CertFiles,
    Server,
    ensure_debian_packages,
    free_port,
    make_certs,
    start_server,
    tool_path,
    upstream_http_block,
    wait_listening,
)

# A client that gets no response within this is counted as failed (dualproxy without the
# reclaim kept such clients in the backlog until idle connections timed out: 60 s).
CLIENT_TIMEOUT: Final = 10.0
MAX_SECONDS: Final = 120.0
# Concurrent new clients during the churn; connections opened at once while filling.
CHURN_CLIENTS: Final = 4
FILL_CONCURRENCY: Final = 50


def nginx_config(directory: Path, port: int, upstream: int, certs: CertFiles, limit: int) -> Path:
    user = "user root;\n" if os.geteuid() == 0 else ""
    temp = directory / "nginx-temp"
    temp.mkdir()
    text = f"""{user}daemon off;
master_process on;
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/nginx-error.log warn;
worker_rlimit_nofile 65536;
events {{ worker_connections {limit}; }}
http {{
    client_body_temp_path {temp}/client;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    access_log off;
    keepalive_timeout 60s;
    upstream backend {{ server 127.0.0.1:{upstream}; keepalive 8; }}
    server {{
        listen 127.0.0.1:{port} ssl backlog=4096;
        ssl_certificate {certs.chain};
        ssl_certificate_key {certs.key};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""
    path = directory / "nginx.conf"
    path.write_text(text)
    return path


def dualproxy_config(directory: Path, port: int, upstream: int, limit: int) -> Path:
    path = directory / "dualproxy.toml"
    path.write_text(
        f"""[listen]
address = "127.0.0.1:{port}"

[keys.bench]
key = "key.pem"
chain = "chain.pem"

[upstream]
url = "http://127.0.0.1:{upstream}"

[limits]
max_connections = {limit}
keepalive_timeout = 60

[admin]
enabled = false
"""
    )
    return path


REQUEST: Final = b"GET / HTTP/1.1\r\nHost: localhost\r\n%s\r\n"


async def one_request(
    port: int, context: ssl.SSLContext, *, close: bool
) -> trio.SSLStream[trio.SocketStream]:
    """A new TLS connection and one GET; the stream (open unless `close`)."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(tcp, context, server_hostname="localhost")
    await tls.send_all(REQUEST % (b"Connection: close\r\n" if close else b""))
    data = b""
    while UPSTREAM_BODY.encode() not in data:
        chunk = await tls.receive_some(65536)
        if not chunk:
            raise OSError("closed before the response")
        data += chunk
    if not data.startswith(b"HTTP/1.1 200"):
        raise OSError(f"unexpected response {data[:40]!r}")
    return tls


async def measure(port: int, certs: CertFiles, idle: int, churn: int) -> dict[str, float]:
    context = ssl.create_default_context(cafile=str(certs.ca))
    held: list[trio.SSLStream[trio.SocketStream]] = []
    fill_failures = 0
    limiter = trio.CapacityLimiter(FILL_CONCURRENCY)

    async def fill_one() -> None:
        nonlocal fill_failures
        async with limiter:
            try:
                with trio.fail_after(CLIENT_TIMEOUT):
                    held.append(await one_request(port, context, close=False))
            except (OSError, trio.TooSlowError, trio.BrokenResourceError):
                fill_failures += 1

    with trio.fail_after(MAX_SECONDS):
        async with trio.open_nursery() as nursery:
            for _ in range(idle):
                nursery.start_soon(fill_one)
    ok = failed = 0
    slowest = 0.0
    started = time.monotonic()

    async def churner(count: int) -> None:
        nonlocal ok, failed, slowest
        for _ in range(count):
            began = time.monotonic()
            try:
                with trio.fail_after(CLIENT_TIMEOUT):
                    tls = await one_request(port, context, close=True)
                await trio.aclose_forcefully(tls)
                ok += 1
            except (OSError, trio.TooSlowError, trio.BrokenResourceError):
                failed += 1
            slowest = max(slowest, time.monotonic() - began)

    with trio.move_on_after(MAX_SECONDS):
        async with trio.open_nursery() as nursery:
            for _ in range(CHURN_CLIENTS):
                nursery.start_soon(churner, churn // CHURN_CLIENTS)
    elapsed = time.monotonic() - started
    for tls in held:
        await trio.aclose_forcefully(tls)
    return {
        "idle_held": len(held),
        "idle_failed": fill_failures,
        "new_ok": ok,
        "new_failed": failed,
        "new_per_second": ok / elapsed if elapsed else 0.0,
        "slowest_seconds": slowest,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--limit", type=int, default=1000, help="max_connections and worker_connections"
    )
    parser.add_argument("--churn", type=int, default=300, help="new connections measured")
    parser.add_argument(
        "--dualproxy-python",
        default=sys.executable,
        help="the interpreter (of a virtual environment) whose dualproxy runs: A/B another tree",
    )
    parser.add_argument("--only", choices=("nginx", "dualproxy"), default=None)
    args = parser.parse_args()
    ensure_debian_packages()
    nginx = tool_path("nginx")
    if nginx is None:
        raise BenchError("nginx not found")
    servers: list[Server] = []
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="dualproxy-idle-churn-") as tmp_text:
        tmp = Path(tmp_text)
        # Not from a checkout: `python -m dualproxy` would import the current folder's package
        # instead of the interpreter's (--dualproxy-python).
        os.chdir(tmp)
        certs = make_certs(tmp)
        try:
            upstream_port = free_port()
            conf = tmp / "upstream.conf"
            conf.write_text(
                f"daemon off;\nworker_processes 1;\npid {tmp}/up.pid;\n"
                f"error_log {tmp}/up-error.log warn;\nevents {{ worker_connections 4096; }}\n"
                f"http {{\n{upstream_http_block(upstream_port)}}}\n"
            )
            command = [nginx, "-p", str(tmp), "-c", str(conf)]
            upstream = start_server("upstream", command, upstream_port, tmp / "up.log")
            servers.append(upstream)
            wait_listening(upstream)
            for name in ("nginx", "dualproxy"):
                if args.only not in (None, name):
                    continue
                port = free_port()
                if name == "nginx":
                    conf = nginx_config(tmp, port, upstream_port, certs, args.limit)
                    cmd = [nginx, "-p", str(tmp), "-c", str(conf)]
                else:
                    conf = dualproxy_config(tmp, port, upstream_port, args.limit)
                    cmd = [args.dualproxy_python, "-m", "dualproxy", "serve", "-c", str(conf)]
                server = start_server(name, cmd, port, tmp / f"{name}.log")
                servers.append(server)
                wait_listening(server)
                results[name] = trio.run(measure, port, certs, args.limit, args.churn)
                server.stop()
        finally:
            for server in servers:
                server.stop()
    for name, figures in results.items():
        print(
            f"{name:<10} idle held {figures['idle_held']:.0f}"
            f" (failed {figures['idle_failed']:.0f});"
            f" new connections: {figures['new_ok']:.0f} ok, {figures['new_failed']:.0f} failed,"
            f" {figures['new_per_second']:.1f}/s, slowest {figures['slowest_seconds']:.2f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
