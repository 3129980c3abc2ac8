"""How `[process] workers` spreads connections over its workers: one listening socket shared
by every worker, or one SO_REUSEPORT socket per worker (serve.supervisor's `sharing`).

A supervisor with two workers runs in this process (it counts per worker: WorkerState), and
a bounded loopback load of TLS clients runs against it, for each way of sharing:

    python benchmarks/worker_spread.py new 1000 16 3      # 1000 connections, 16 at a time
    python benchmarks/worker_spread.py keepalive 32 50 3  # 32 at once, 50 requests each

Prints each worker's count per run (connections, or requests for keepalive) and the smaller
worker's share. Certificates are made with trustme at run time; the workers' log lines go to
stderr (redirect it). docs/architecture.md quotes the figures that chose the default.
"""

from __future__ import annotations

import logging
import re
import ssl
import sys
import tempfile
from pathlib import Path

import trio
import trustme

from dualproxy.config.loader import load
from dualproxy.serve.supervisor import Sharing, Supervisor

SHARINGS: tuple[Sharing, ...] = ("shared", "reuse_port")


def write_setup(folder: Path) -> tuple[Path, ssl.SSLContext]:
    ca = trustme.CA()
    leaf = ca.issue_cert("api.example.com")
    leaf.private_key_pem.write_to_path(str(folder / "key.pem"))
    (folder / "key.pem").chmod(0o600)
    (folder / "chain.pem").write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    config = folder / "config.toml"
    config.write_text(
        '[listen]\naddress = "127.0.0.1:0"\n\n[keys.k]\nkey = "key.pem"\nchain = "chain.pem"\n'
        "\n[process]\nworkers = 2\n\n[admin]\nenabled = false\n"
    )
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return config, context


async def get(stream: trio.SSLStream[trio.SocketStream], close: bool) -> None:
    """One GET on `stream` and its whole response (the placeholder's, with Content-Length)."""
    head = b"GET / HTTP/1.1\r\nHost: api.example.com\r\n"
    await stream.send_all(head + (b"Connection: close\r\n" if close else b"") + b"\r\n")
    data = b""
    while True:
        if b"\r\n\r\n" in data:
            fields, body = data.split(b"\r\n\r\n", 1)
            length = re.search(rb"(?i)content-length: *(\d+)", fields)
            if length and len(body) >= int(length.group(1)):
                break
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        data += chunk
    if not data.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"unexpected answer: {data[:100]!r}")


async def client(port: int, context: ssl.SSLContext, requests: int) -> None:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, context, server_hostname="api.example.com")
    for index in range(requests):
        await get(stream, close=index == requests - 1)
    await stream.aclose()


async def limited_client(limiter: trio.CapacityLimiter, port: int, context: ssl.SSLContext) -> None:
    async with limiter:
        await client(port, context, 1)


async def main(mode: str, count: int, per: int, runs: int) -> None:
    config_file, context = write_setup(Path(tempfile.mkdtemp()))
    for sharing in SHARINGS:
        shares = []
        for run in range(runs):
            supervisor = Supervisor(load(config_file), sharing=sharing, handle_signals=False)
            async with trio.open_nursery() as nursery:
                port = (await nursery.start(supervisor.run))[0][1]
                if mode == "new":  # `count` connections of one request, `per` at a time
                    limiter, connections = trio.CapacityLimiter(per), count
                    async with trio.open_nursery() as load_:
                        for _ in range(count):
                            load_.start_soon(limited_client, limiter, port, context)
                else:  # `count` connections at once, `per` requests each
                    connections = count
                    async with trio.open_nursery() as load_:
                        for _ in range(count):
                            load_.start_soon(client, port, context, per)
                with trio.fail_after(30):
                    # The workers' reports arrive every quarter second: nothing to wait on.
                    while sum(w.connections for w in supervisor.workers) < connections:  # noqa: ASYNC110
                        await trio.sleep(0.05)
                field = "connections" if mode == "new" else "requests"
                counts = [getattr(worker, field) for worker in supervisor.workers]
                shares.append(min(counts) / sum(counts))
                print(f"{sharing:10} run {run}: {field} per worker {counts}", flush=True)
                supervisor.drain()
        listed = ", ".join(f"{share:.3f}" for share in shares)
        print(f"{sharing:10} the smaller worker's share per run: {listed}", flush=True)


if __name__ == "__main__":
    logging.disable(logging.INFO)
    mode, count, per, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    if mode not in ("new", "keepalive") or min(count, per, runs) < 1 or count > 10_000:
        sys.exit(__doc__)
    trio.run(main, mode, count, per, runs)
