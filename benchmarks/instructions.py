"""Instructions per request and per new connection of the served path, counted by callgrind:
a figure that other processes on the machine barely move (run.py's CPU seconds move by 10-20%
on a shared 2-core machine), for A/B comparisons of one change.

What runs: the upstream (a separate nginx, as run.py's), and `dualproxy serve` (through
serve_without_tickets.py: every new connection a full handshake, as run.py's) under
`valgrind --tool=callgrind --instr-atstart=no`. Nothing is counted while the server starts
and warms up; then, per load, instrumentation goes on, callgrind's counters are zeroed,
h2load sends FIRST requests, callgrind dumps, its counters are zeroed again, h2load sends
FIRST + STEP requests, callgrind dumps again, and instrumentation goes off. The figure is
(second dump - first dump) / STEP: what the connections themselves cost (their handshakes,
for the keep-alive loads) is in both dumps and cancels out.

    .venv/bin/python benchmarks/instructions.py                       # all loads
    .venv/bin/python benchmarks/instructions.py --loads keepalive --step 2000
    PYTHONPATH=/path/to/other/checkout .venv/bin/python benchmarks/instructions.py   # A/B

Loads: keepalive (HTTP/1.1, one connection: `h2load --h1 -c1`), h2 (`h2load -c16 -m10`, as
run.py's HTTP/2 load), newconn (`h2load --h1 -c1 -H 'Connection: close'`: one full TLS
handshake and one request per connection). The access log is on (stderr, to a file), as it
is by default. The counts still vary by 1-2% between runs of one tree: how many events one
epoll wait returns depends on timing, and with it the scheduler's work per request. Read only
differences larger than that, and run both trees in turn.

Needs valgrind (callgrind_control), nginx and h2load (installed by run.py; `apt-get install
valgrind` for the first). Every process it starts is stopped at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

from run import (
    BenchError,
    Server,
    dualproxy_toml,
    free_port,
    h2_command,
    h2load_command,
    make_certs,
    nginx_conf,
    start_server,
    upstream_http_block,
    wait_listening,
)

# Under callgrind the interpreter runs some 50 times slower: its start takes this long at most.
VALGRIND_START_TIMEOUT: Final = 180.0
# One h2load run, under callgrind: a bound, never reached by the default counts.
LOAD_TIMEOUT: Final = 600.0
# Requests before any counting: imports done, caches and pools warm.
WARMUP_REQUESTS: Final = 300
LOADS: Final = ("keepalive", "h2", "newconn")
_TOTALS: Final = re.compile(rb"^(?:totals|summary): (\d+)", re.MULTILINE)


def h1_command(port: int, requests: int) -> list[str]:
    """HTTP/1.1 keep-alive on one connection."""
    return ["h2load", "--h1", "-c1", "-t1", f"-n{requests}", f"https://127.0.0.1:{port}/"]


def load_command(load: str, port: int, requests: int) -> list[str]:
    if load == "keepalive":
        return h1_command(port, requests)
    if load == "h2":
        return h2_command(port, 16, 10, requests)
    return h2load_command(port, 1, requests)


def run_h2load(cmd: Sequence[str], requests: int) -> None:
    """Run it; BenchError unless every request succeeded."""
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=LOAD_TIMEOUT, check=False)
    if f"{requests} succeeded" not in result.stdout:
        raise BenchError(f"{' '.join(cmd)} did not succeed:\n{result.stdout}\n{result.stderr}")


def callgrind_control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], capture_output=True, check=True)


def total_of(dump: Path) -> int:
    match = _TOTALS.search(dump.read_bytes())
    if match is None:
        raise BenchError(f"no total in {dump}")
    return int(match.group(1))


def wait_for_dump(folder: Path, count: int) -> Path:
    """The `count`-th dump callgrind writes (`cg.PID.N`), once it is complete."""
    deadline = time.monotonic() + LOAD_TIMEOUT
    while time.monotonic() < deadline:
        dumps = sorted(folder.glob(f"cg.*.{count}"))
        if dumps and _TOTALS.search(dumps[0].read_bytes()):
            return dumps[0]
        time.sleep(0.1)
    raise BenchError(f"callgrind wrote no dump {count} in {folder}")


def measure(pid: int, port: int, load: str, first: int, step: int, folder: Path) -> float:
    """Instructions per request of `load` (see the module docstring)."""
    dumps = len(list(folder.glob("cg.*.*")))
    callgrind_control(pid, "--instr=on")
    callgrind_control(pid, "--zero")  # each dump counts from a zero, never from a dump
    run_h2load(load_command(load, port, first), first)
    callgrind_control(pid, "--dump")
    before = total_of(wait_for_dump(folder, dumps + 1))
    callgrind_control(pid, "--zero")
    run_h2load(load_command(load, port, first + step), first + step)
    callgrind_control(pid, "--dump")
    after = total_of(wait_for_dump(folder, dumps + 2))
    callgrind_control(pid, "--instr=off")
    return (after - before) / step


@contextlib.contextmanager
def servers(tmp: Path) -> Iterator[tuple[Server, Server]]:
    """The upstream nginx and dualproxy under callgrind, both listening; stopped at the end."""
    started: list[Server] = []
    try:
        make_certs(tmp)  # key.pem and chain.pem, which dualproxy_toml names
        upstream_port, port = free_port(), free_port()
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        conf = nginx_conf(tmp, "upstream", upstream_http_block(upstream_port))
        upstream = start_server(
            "upstream", [nginx, "-c", str(conf), "-e", str(tmp / "upstream-error.log")],
            upstream_port, tmp / "upstream.log",
        )  # fmt: skip
        started.append(upstream)
        wait_listening(upstream)
        toml = tmp / "dualproxy.toml"
        toml.write_text(dualproxy_toml(port, upstream_port))
        wrapper = Path(__file__).with_name("serve_without_tickets.py")
        # Without address randomization, and with one hash seed: the same layouts every run.
        setarch = ["setarch", os.uname().machine, "-R"] if shutil.which("setarch") else []
        valgrind = [
            *setarch, "valgrind", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={tmp / 'cg.%p'}",
        ]  # fmt: skip
        os.environ["PYTHONHASHSEED"] = "0"
        server = start_server(
            "dualproxy", [*valgrind, sys.executable, str(wrapper), "serve", "-c", str(toml)],
            port, tmp / "dualproxy.log",
        )  # fmt: skip
        started.append(server)
        deadline = time.monotonic() + VALGRIND_START_TIMEOUT
        while True:
            try:
                wait_listening(server)
                break
            except BenchError:
                if server.process.poll() is not None or time.monotonic() > deadline:
                    raise
        yield upstream, server
    finally:
        for server in reversed(started):
            server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--loads", default=",".join(LOADS), help="comma-separated: " + ", ".join(LOADS)
    )
    parser.add_argument("--first", type=int, default=200, help="requests before the first dump")
    parser.add_argument("--step", type=int, default=1000, help="requests counted")
    args = parser.parse_args(argv)
    loads = [load for load in args.loads.split(",") if load]
    unknown = sorted(set(loads) - set(LOADS))
    if unknown:
        parser.error(f"unknown loads: {', '.join(unknown)}")
    for tool in ("valgrind", "callgrind_control", "h2load"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed (apt-get install valgrind nghttp2-client)")
    import dualproxy  # which tree is measured: PYTHONPATH may point at another checkout

    print(f"dualproxy from {Path(dualproxy.__file__).parent}", flush=True)
    with tempfile.TemporaryDirectory(prefix="dualproxy-instructions-") as name:
        tmp = Path(name)
        with servers(tmp) as (_, server):
            run_h2load(h1_command(server.port, WARMUP_REQUESTS), WARMUP_REQUESTS)
            run_h2load(load_command("h2", server.port, WARMUP_REQUESTS), WARMUP_REQUESTS)
            for load in loads:
                per = measure(server.pid, server.port, load, args.first, args.step, tmp)
                unit = "connection" if load == "newconn" else "request"
                print(f"{load:10} {per / 1000:9.1f}k instructions per {unit}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
