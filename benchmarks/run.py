"""dualproxy versus nginx as TLS-terminating reverse proxies: server CPU per request and per
new connection, measured side by side in the same run.

Theory of operation. On a small machine the load generator, the proxy under test and the
upstream share the cores, so requests per second alone mostly measure who won the scheduler.
What this script compares is what each proxy *costs*: the CPU time the kernel charged to the
proxy's process tree (utime + stime of every process in it, plus cutime + cstime of children
already reaped, from /proc/PID/stat) between just before and just after a load run, divided by
the requests the load generator completed. Both proxies are measured in the same round, in
alternating order, and each figure is reported as the median over rounds, next to the median
of the per-round ratios dualproxy/nginx.

The set-up, all on 127.0.0.1:

    wrk / h2load  --TLS-->  nginx (1 worker)  --HTTP/1.1 keep-alive-->  upstream
    wrk / h2load  --TLS-->  dualproxy         --HTTP/1.1 keep-alive-->  upstream

The upstream is a separate nginx instance answering `return 200` (no file I/O, no logging),
shared by both proxies and accounted separately. Certificates are ECDSA P-256, made with
trustme at run time in a temporary directory. Session resumption is off on both: h2load and
wrk resume whatever a server offers (`probe_load_generators` counts it), so nginx runs with
its session cache and tickets off and dualproxy through serve_without_tickets.py, both with an
OPENSSL_CONF that sends no tickets; `probe_tls` checks that neither resumes.

Four loads per proxy and round (`--loads` picks some):

* keep-alive: `wrk -t1 -c32` for the duration: a handful of TLS handshakes, then requests;
* new connection: `h2load --h1 -H 'Connection: close' -c16 -n N`, N sized by a calibration run
  to last about the duration: one full TLS handshake per request;
* HTTP/2: `h2load -c16 -m10 -n N` (issue 18): 16 connections, 10 streams in flight on each,
  N calibrated likewise (nginx with `http2` on its listener);
* new HTTP/2 connection: `h2load -c16 -n16` run again and again for the duration: one full
  TLS handshake, the HTTP/2 preface and SETTINGS, and one stream per connection.

Two more, opt-in (issue 16), each against servers of its own:

* resumed (`--loads resumed`): the new-connection load against a second pair of servers with
  session tickets on (nginx with `ssl_session_ticket_key` files made at run time, dualproxy as
  shipped, its managed ticket keys); h2load resumes every client's session on its next
  connection, and both servers' own counts must say so (`resumption_problem`). Then, once per
  invocation, the share of reconnects that resume on another worker and after a reload, with
  a Python client against dualproxy with two workers (`measure_resumption_shares`);
* idle (`--loads idle`): the RSS that 1000 idle TLS connections (one request each, kept
  open) add to each server's process tree, on a freshly started pair each round.

The machine may be shared (a test suite running next to us): before each run the script waits
for it to be idle, and a run during which other processes were busy is measured again.

Every process this script starts runs in its own session (process group) and is stopped in a
`finally`: nginx with `nginx -s stop` on its pid file, dualproxy with SIGTERM, then SIGKILL to
the whole group for anything still there. See benchmarks/README.md for how to read the table.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final, Literal

REPO: Final = Path(__file__).resolve().parent.parent
VENV_BIN: Final = Path(sys.executable).parent
DEFAULT_RESULTS_DIR: Final = REPO / "benchmarks" / "results"

# Debian packages providing each tool we run.
DEBIAN_PACKAGES: Final = {"nginx": "nginx", "wrk": "wrk", "h2load": "nghttp2-client"}
# The upstream's answer: distinctive, so a proxy that answers by itself is caught.
UPSTREAM_BODY: Final = "dualproxy-bench upstream ok\n"
# How long a server may take to start listening before we give up on it.
START_TIMEOUT: Final = 15.0
# After a load run ends, the servers finish closing connections and nginx flushes its
# buffered access log (flush=1s below); only then is the "after" CPU sample taken. An idle
# server costs nothing measurable in that time (dualproxy polls its key files every 2 s).
SETTLE_SECONDS: Final = 1.5
# A load generator is killed after LOAD_TIMEOUT_FACTOR * duration + LOAD_GRACE_SECONDS: an
# h2load run sized from a calibration may run slower than calibrated, but not this much.
LOAD_TIMEOUT_FACTOR: Final = 3
LOAD_GRACE_SECONDS: Final = 30.0
# Requests per h2load client in the calibration run that sizes the new-connection runs.
CALIBRATION_REQUESTS_PER_CLIENT: Final = 25
# Given to both proxies as OPENSSL_CONF: no TLS 1.3 session tickets, no TLS 1.2 tickets.
# h2load and wrk resume any session a server offers when they reconnect
# (probe_load_generators shows it), so a server that offers one would be measured on resumed
# handshakes. For nginx this stops the (unusable) stateful tickets OpenSSL 3 still sends with
# ssl_session_tickets off; dualproxy sets num_tickets itself, which this cannot override:
# serve_without_tickets.py does. Debian 12's own openssl.cnf sets no TLS defaults, so
# replacing it for these two processes changes nothing else.
NO_TICKETS_OPENSSL_CONF: Final = """openssl_conf = openssl_init
[openssl_init]
ssl_conf = ssl_sect
[ssl_sect]
system_default = system_default_sect
[system_default_sect]
NumTickets = 0
Options = NoTicket
"""
# Before each run the machine must be this idle (cores busy, summed) over one window; the
# servers between runs use next to nothing, so anything above it is someone else's work.
QUIET_BUSY_CORES: Final = 0.15
QUIET_WINDOW_SECONDS: Final = 1.0
# A run during which processes other than ours used more than this share of the run's wall
# time is flagged as noisy (printed, and in the JSON).
NOISY_FOREIGN_SHARE: Final = 0.10
# Likewise a run during which the hypervisor gave more than this share of the run's wall time
# to other machines (steal, summed over the cores): measured here, rounds with steal above it
# cost both proxies 10-30% more CPU per connection (cold caches, a busy host), rounds below
# it (typically under 3%) agree with each other.
NOISY_STOLEN_SHARE: Final = 0.05
# Targets from the issue, and the naive ~150-line trio+h11 proxy measured the same way.
TARGET_KEEPALIVE_PER_CORE: Final = 0.15
TARGET_NEWCONN_CPU: Final = 2.0
REFERENCE_KEEPALIVE_PER_CORE: Final = 0.11
REFERENCE_NEWCONN_CPU: Final = 2.5
CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")
# Idle upstream connections each proxy keeps (nginx `keepalive`, dualproxy
# `upstream.pool_max_idle`): the HTTP/2 load has 16 x 10 = 160 requests in flight, each on an
# upstream connection of its own; with fewer kept idle, both proxies would be measured opening
# and closing upstream connections. The HTTP/1.1 loads never have more than 32 in flight.
UPSTREAM_POOL_IDLE: Final = 256
# Requests per client connection on both proxies (nginx keepalive_requests, dualproxy
# limits.keepalive_requests): none closes a load generator's connection during a run.
KEEPALIVE_REQUESTS: Final = 10_000_000

ProxyName = Literal["nginx", "dualproxy"]
LoadKind = Literal["keepalive", "newconn", "h2", "h2conn", "resumed", "idle"]
LOADS: Final[tuple[LoadKind, ...]] = ("keepalive", "newconn", "h2", "h2conn", "resumed", "idle")
# What runs without --loads: the opt-in loads cost minutes more, and servers of their own.
DEFAULT_LOADS: Final[tuple[LoadKind, ...]] = ("keepalive", "newconn", "h2", "h2conn")
# Issue 16's targets, as ratios to nginx in the same run: keep-alive requests per CPU-second,
# CPU per new connection, RSS per idle TLS connection; and the share of reconnects that must
# resume on another worker and after a reload.
ISSUE16_KEEPALIVE_PER_CORE: Final = 0.33
ISSUE16_NEWCONN_CPU: Final = 1.5
ISSUE16_IDLE_RSS: Final = 1.2
TARGET_RESUMED_SHARE: Final = 0.99
# The resumed load: h2load's clients each make one full handshake (their first connection)
# and resume on every later one. A run passes when the servers' own counts show at most this
# share of its connections beyond those as full handshakes: a server that resumes "mostly"
# would be measured on a mix and is a failure, not a figure.
RESUMED_FULL_SLACK: Final = 0.01
# The idle load: connections held open per server (the issue's method), and bounds.
IDLE_CONNECTIONS: Final = 1000
# Opening them (a handshake and a request each, one after another) must end within this;
# both servers close a keep-alive connection idle for 60 s (dualproxy's keepalive_timeout,
# nginx's in this script's config), so the first ones must still be open when it ends.
IDLE_OPEN_TIMEOUT: Final = 40.0
# Before the "before" sample: the server finishes writing its first connection's lines.
IDLE_SETTLE_SECONDS: Final = 1.0
# After the last connection's response, before the "after" sample: the servers finish
# writing (dualproxy's access line, nginx's buffered log) and the connections are idle, as
# the load means them: dualproxy parks a kept-alive connection (serve/parking.py) between 1
# and 2 s after its response (PARK_AFTER, PARK_SWEEP), so a sample taken sooner would count
# the last connections opened as busy ones.
IDLE_AFTER_SECONDS: Final = 3.0
# The share measurements: sessions per measurement, and the bound on each one's time.
SHARE_SESSIONS: Final = 200
SHARE_TIMEOUT: Final = 120.0
# A reconnect that should land on the other worker is dropped (before its ClientHello) when
# the kernel gave it to the ticket's worker again; each session gets at most this many tries.
SHARE_LANDING_TRIES: Final = 20
# Issue 18: dualproxy's HTTP/2 requests per CPU-second at least this share of its own HTTP/1.1
# keep-alive figure (HTTP/2 framing, HPACK and flow control in Python cost more per request).
TARGET_H2_VS_KEEPALIVE: Final = 0.6
# h2load runs per calibration of the new-HTTP/2-connection load (each -c clients, -n clients).
CALIBRATION_H2CONN_REPEATS: Final = 5
PROXIES: Final[tuple[ProxyName, ...]] = ("nginx", "dualproxy")


class BenchError(Exception):
    """The benchmark cannot go on: a tool is missing, a server did not start or misbehaves."""


# --- tools -------------------------------------------------------------------------------


def tool_path(name: str) -> str | None:
    """`name` on PATH, or in /usr/sbin (where Debian puts nginx, often off a user's PATH)."""
    found = shutil.which(name)
    if found is None and os.access(f"/usr/sbin/{name}", os.X_OK):
        found = f"/usr/sbin/{name}"
    return found


def ensure_debian_packages() -> None:
    """apt-get install whichever of nginx, wrk, nghttp2-client (h2load) is missing."""
    missing = sorted({pkg for tool, pkg in DEBIAN_PACKAGES.items() if tool_path(tool) is None})
    if not missing:
        return
    sudo: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            raise BenchError(f"missing {', '.join(missing)}: apt-get install them as root")
        sudo = ["sudo"]
    print(f"installing {' '.join(missing)} with apt-get", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*sudo, "apt-get", "update", "-q"], check=True, env=env, timeout=900)
    subprocess.run(
        [*sudo, "apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
        check=True,
        env=env,
        timeout=1800,
    )
    still = [tool for tool in DEBIAN_PACKAGES if tool_path(tool) is None]
    if still:
        raise BenchError(f"apt-get ran but {', '.join(still)} is still not found")


def ensure_py_spy() -> str:
    """py-spy from the venv, pip-installed there when missing (only with --profile)."""
    path = VENV_BIN / "py-spy"
    if not path.exists():
        print("installing py-spy into the venv", flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=True, timeout=600
        )
    return str(path)


def tool_versions() -> dict[str, str]:
    def first_line(cmd: Sequence[str]) -> str:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
        except OSError as exc:
            return f"unavailable: {exc}"
        return (
            (done.stdout + done.stderr).strip().splitlines()[0] if done.stdout + done.stderr else ""
        )

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10, check=False
        )
        return done.stdout.strip()

    nginx = tool_path("nginx") or "nginx"
    return {
        "nginx": first_line([nginx, "-v"]),
        "wrk": first_line(["wrk", "-v"]),
        "h2load": first_line(["h2load", "--version"]),
        "openssl": first_line(["openssl", "version"]),
        "python": sys.version.split()[0],
        # Whose build: the distribution's (optimised) or a source build (see the README).
        "python_interpreter": os.path.realpath(getattr(sys, "_base_executable", sys.executable)),
        "python_openssl": ssl.OPENSSL_VERSION,
        "kernel": platform.release(),
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count()),
        "dualproxy_commit": git("rev-parse", "HEAD"),
        "dualproxy_dirty_files": git("status", "--porcelain", "--", "dualproxy"),
        "relay_module_present": str((REPO / "dualproxy" / "relay.py").exists()),
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


# --- CPU accounting ----------------------------------------------------------------------


def _stat(pid: int) -> tuple[int, int, int] | None:
    """(parent pid, user ticks, system ticks) of one process: utime + cutime, stime + cstime
    (cutime and cstime cover its children already reaped, gone from /proc); None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) is in parentheses and may hold spaces or ")"; field n
    # (1-based, proc(5)) is at index n - 3 after the last ")".
    fields = text[text.rindex(")") + 2 :].split()
    ppid = int(fields[4 - 3])
    utime, stime, cutime, cstime = (int(x) for x in fields[14 - 3 : 17 - 3 + 1])
    return ppid, utime + cutime, stime + cstime


def machine_seconds() -> tuple[float, float]:
    """(busy, stolen): CPU seconds since boot that all cores spent running something, and
    that the hypervisor gave to someone else (/proc/stat, first line)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (
            int(x) for x in f.readline().split()[1:9]
        )
    # Guest time is counted in user already. With tick-based accounting (no
    # IRQ_TIME_ACCOUNTING) a tick in a softirq is also charged to the task it interrupted.
    return (user + nice + system + irq + softirq) / CLOCK_TICKS, steal / CLOCK_TICKS


def children_cpu_seconds() -> float:
    """CPU seconds of this script's children that have been waited for (the load runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def own_cpu_seconds() -> float:
    """CPU seconds of this script itself (the idle load's and the share measurements' client;
    next to nothing while a load generator runs)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def wait_for_quiet(timeout: float) -> float:
    """Wait until the machine is nearly idle (other work, such as a test suite, would compete
    with the run); gives up after `timeout`. Returns the busy share of the last second."""
    if timeout <= 0:
        return 0.0
    deadline = time.monotonic() + timeout
    while True:
        before = machine_seconds()[0]
        time.sleep(QUIET_WINDOW_SECONDS)
        busy = (machine_seconds()[0] - before) / QUIET_WINDOW_SECONDS
        if busy <= QUIET_BUSY_CORES or time.monotonic() >= deadline:
            return busy


def tree_cpu_seconds(root: int) -> tuple[float, float]:
    """(user, system) CPU seconds charged so far to `root` and every live descendant (threads
    included: /proc/PID/stat sums a process's threads), plus the children each of them reaped.
    System time is the kernel working for the process: system calls, and the TCP work done
    in its context."""
    stats: dict[int, tuple[int, int, int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            stats[int(entry.name)] = stat
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    user = system = 0
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            user += stats[pid][1]
            system += stats[pid][2]
            todo += children.get(pid, [])
    return user / CLOCK_TICKS, system / CLOCK_TICKS


# --- servers -----------------------------------------------------------------------------

# Where serve_counting_sessions.py writes its counts (its ENVIRONMENT; not imported: importing
# it would import dualproxy into this script and patch its supervisor).
SESSION_STATS_ENVIRONMENT: Final = "DUALPROXY_BENCH_SESSION_STATS"


def free_port() -> int:
    """A free port below the kernel's ephemeral range. One inside it (what binding port 0
    gives) may be taken as a source port by the thousands of connections h2load opens per
    second, ours or another benchmark's, between now and the server binding it."""
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    candidates = list(range(max(1024, low - 12000), low))
    random.shuffle(candidates)
    for port in candidates:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise BenchError("no free port below the ephemeral range")


@dataclass
class Server:
    """A process we started, in its own process group, and how to stop it politely."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    stop_command: list[str] | None = None  # nginx -s stop; None: SIGTERM
    # nginx: its access log (one line per request), where the run reads what it saw.
    access_log: Path | None = None
    # dualproxy through serve_counting_sessions.py: the folder of its processes' counts.
    session_stats: Path | None = None

    @property
    def view_log(self) -> Path:
        """The log the run reads to count what the server saw."""
        return self.access_log if self.access_log is not None else self.log

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                if self.stop_command is not None:
                    subprocess.run(self.stop_command, capture_output=True, timeout=10, check=False)
                else:
                    self.process.send_signal(signal.SIGTERM)
                self.process.wait(timeout=10)
            except (subprocess.TimeoutExpired, OSError):
                pass
        # Whatever is left in its group (an nginx worker whose master died, say) goes now.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


def start_server(
    name: str,
    cmd: Sequence[str],
    port: int,
    log: Path,
    *,
    stop_command: list[str] | None = None,
    openssl_conf: Path | None = None,
    extra_env: dict[str, str] | None = None,
) -> Server:
    env = dict(os.environ) | (extra_env or {})
    if openssl_conf is not None:
        env["OPENSSL_CONF"] = str(openssl_conf)
    with log.open("ab") as out:
        process = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True, env=env
        )
    return Server(name=name, port=port, process=process, log=log, stop_command=stop_command)


def wait_listening(server: Server) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise BenchError(f"{server.name} exited at start:\n{server.log_tail()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", server.port), 1):
            if server.process.poll() is None:
                return
        time.sleep(0.05)
    raise BenchError(f"{server.name} did not listen on port {server.port}:\n{server.log_tail()}")


def nginx_conf(directory: Path, name: str, events_and_http: str, workers: int = 1) -> Path:
    """An nginx config running in the foreground (so its master is our child) in `directory`,
    with `workers` worker processes."""
    temp = directory / f"{name}-temp"
    temp.mkdir()
    # As root, nginx would run its worker as nobody, who cannot enter our 0700 directory.
    user = "user root;\n" if os.geteuid() == 0 else ""
    text = (
        f"{user}daemon off;\nmaster_process on;\nworker_processes {workers};\n"
        f"pid {directory}/{name}.pid;\nerror_log {directory}/{name}-error.log warn;\n"
        f"worker_rlimit_nofile 65536;\nevents {{ worker_connections 8192; }}\n"
        f"http {{\n"
        f"    client_body_temp_path {temp}/client;\n    proxy_temp_path {temp}/proxy;\n"
        f"    fastcgi_temp_path {temp}/fastcgi;\n    uwsgi_temp_path {temp}/uwsgi;\n"
        f"    scgi_temp_path {temp}/scgi;\n"
        f"{events_and_http}}}\n"
    )
    path = directory / f"{name}.conf"
    path.write_text(text)
    return path


def upstream_http_block(port: int) -> str:
    # No cap on requests per connection and a long idle time: neither proxy should ever
    # pay for reconnecting to the upstream during a run.
    return f"""    access_log off;
    keepalive_requests {KEEPALIVE_REQUESTS};
    keepalive_timeout 300s;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            default_type text/plain;
            return 200 "{UPSTREAM_BODY.strip()}\\n";
        }}
    }}
"""


def nginx_proxy_http_block(
    port: int, upstream_port: int, certs: CertFiles, log: Path, ticket_keys: Sequence[Path] = ()
) -> str:
    """nginx as the proxy; `ticket_keys`: session tickets on, encrypted with the first key
    file and decrypted with any (the resumed load), else off."""
    # keepalive_requests: nginx closes a client connection after 1000 requests by default, as
    # dualproxy does (limits.keepalive_requests): both are raised, so that wrk never reconnects
    # (a TLS handshake) and h2load's HTTP/2 clients, which do not reconnect, run to the end.
    # The access log records resumption and requests per connection: the run checks both.
    fields = "$connection $connection_requests $ssl_session_reused $ssl_protocol $status"
    tickets = "ssl_session_tickets off;"
    if ticket_keys:
        tickets = "ssl_session_tickets on;" + "".join(
            f"\n        ssl_session_ticket_key {path};" for path in ticket_keys
        )
    return f"""    log_format bench '{fields}';
    access_log {log} bench buffer=64k flush=1s;
    keepalive_requests {KEEPALIVE_REQUESTS};
    keepalive_timeout 60s;
    upstream backend {{
        server 127.0.0.1:{upstream_port};
        keepalive {UPSTREAM_POOL_IDLE};
        keepalive_requests {KEEPALIVE_REQUESTS};
        keepalive_timeout 30s;
    }}
    server {{
        # http2: for the HTTP/2 loads (wrk and h2load --h1 still get HTTP/1.1).
        listen 127.0.0.1:{port} ssl http2 backlog=4096;
        ssl_certificate {certs.chain};
        ssl_certificate_key {certs.key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache off;
        {tickets}
        # Server order, as dualproxy's context has (it needs it to predict the certificate):
        # both then pick TLS_AES_256_GCM_SHA384, whatever order h2load or wrk offer.
        ssl_prefer_server_ciphers on;
        # The headers dualproxy's forwarding adds; Host becomes the upstream's (both rewrite).
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto https;
            proxy_set_header X-Forwarded-Host $host;
        }}
    }}
"""


def dualproxy_toml(port: int, upstream_port: int | None, workers: int = 1) -> str:
    """dualproxy's config; without an upstream it answers every request itself; `workers`
    above 1: a supervisor and that many worker processes ([process] workers)."""
    text = f"""# Generated by benchmarks/run.py.
[listen]
address = "127.0.0.1:{port}"

[keys.bench]
key = "key.pem"
chain = "chain.pem"

# As nginx's keepalive_requests below: no load generator's connection is closed after 1000
# requests (wrk would reconnect, i.e. handshake, and h2load would not reconnect at all).
[limits]
keepalive_requests = {KEEPALIVE_REQUESTS}
"""
    if upstream_port is not None:
        text += f'\n[upstream]\nurl = "http://127.0.0.1:{upstream_port}"\n'
        text += f"pool_max_idle = {UPSTREAM_POOL_IDLE}\n"
    if workers != 1:
        text += f"\n[process]\nworkers = {workers}\n"
    return text


@dataclass(frozen=True)
class CertFiles:
    ca: Path
    key: Path
    chain: Path
    ca_key: Path  # to renew the leaf (the reload share measurement)


def _write_secret(path: Path, data: bytes) -> None:
    """Write `data` to a new file only we may read (created 0600 before any byte lands)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def make_certs(directory: Path) -> CertFiles:
    """An ECDSA P-256 CA and server certificate for 127.0.0.1 and localhost (trustme)."""
    import trustme

    ca = trustme.CA(key_type=trustme.KeyType.ECDSA)
    leaf = ca.issue_cert("127.0.0.1", "localhost", key_type=trustme.KeyType.ECDSA)
    files = CertFiles(
        ca=directory / "ca.pem",
        key=directory / "key.pem",
        chain=directory / "chain.pem",
        ca_key=directory / "ca-key.pem",
    )
    ca.cert_pem.write_to_path(str(files.ca))
    # dualproxy refuses a private key others can read.
    _write_secret(files.key, leaf.private_key_pem.bytes())
    _write_secret(files.ca_key, ca.private_key_pem.bytes())
    files.chain.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    return files


def renew_certificate(certs: CertFiles) -> None:
    """A renewal that keeps the key: a new leaf certificate (new serial and validity) for
    the same public key, signed by the same CA, replacing the chain file atomically."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtensionOID

    ca_key = serialization.load_pem_private_key(certs.ca_key.read_bytes(), password=None)
    leaf_key = serialization.load_pem_private_key(certs.key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    assert isinstance(leaf_key, ec.EllipticCurvePrivateKey)
    old_chain = x509.load_pem_x509_certificates(certs.chain.read_bytes())
    old = old_chain[0]
    ca = x509.load_pem_x509_certificate(certs.ca.read_bytes())
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(old.subject)
        .issuer_name(ca.subject)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=90))
    )
    for extension in old.extensions:
        if extension.oid != ExtensionOID.AUTHORITY_KEY_IDENTIFIER:
            builder = builder.add_extension(extension.value, extension.critical)
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
    )
    leaf = builder.sign(ca_key, hashes.SHA256())
    fresh = certs.chain.with_name(certs.chain.name + ".new")
    fresh.write_bytes(
        b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in [leaf, *old_chain[1:]])
    )
    fresh.replace(certs.chain)


# nginx's ssl_session_ticket_key file: 80 bytes (a 16-byte name, 32-byte AES-256 and
# 32-byte HMAC-SHA256 keys), as dualproxy's own keys are (tls.tickets).
TICKET_KEY_FILE_BYTES: Final = 80


def make_ticket_key_files(directory: Path, count: int = 2) -> list[Path]:
    """`count` random ticket-key files for nginx, 0600: the first encrypts new tickets, the
    others only decrypt (a rotated ring, as dualproxy holds its current and previous key)."""
    directory.mkdir(mode=0o700)
    paths = [directory / f"ticket-{n}.key" for n in range(count)]
    for path in paths:
        _write_secret(path, os.urandom(TICKET_KEY_FILE_BYTES))
    return paths


# --- checks ------------------------------------------------------------------------------


@dataclass
class TlsProbe:
    """What a Python client sees: the certificate, the protocol, and whether resuming works."""

    status_line: str
    body: str
    certificate_key: str
    protocol: str
    cipher: str
    ticket_received: bool
    resumed_on_reconnect: bool


def client_socket(port: int) -> socket.socket:
    """A TCP connection to 127.0.0.1:`port` for our Python clients, with TCP_NODELAY as
    curl, h2load and wrk set it: without it, the request written after the handshake waits
    for the server's delayed ACK of the client's Finished (40 ms) when the server sends no
    ticket in between."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _https_get(
    port: int, context: ssl.SSLContext, session: ssl.SSLSession | None
) -> tuple[bytes, ssl.SSLSocket]:
    raw = client_socket(port)
    tls = context.wrap_socket(raw, server_hostname="127.0.0.1", session=session)
    tls.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    response = bytearray()
    while chunk := tls.recv(65536):
        response += chunk
    return bytes(response), tls


def probe_tls(port: int, certs: CertFiles) -> TlsProbe:
    """One request with certificate verification, then a reconnect offering the session: tells
    whether the server hands out resumable sessions (TLS 1.3 tickets) at all."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    context = ssl.create_default_context(cafile=str(certs.ca))
    response, tls = _https_get(port, context, None)
    with tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        public_key = x509.load_der_x509_certificate(der).public_key()
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            key = f"ECDSA {public_key.curve.name}"
        else:
            key = type(public_key).__name__
        cipher = tls.cipher()
        session = tls.session
        protocol = tls.version() or "?"
    ticket = session is not None and session.has_ticket
    _, again = _https_get(port, context, session)
    with again:
        resumed = bool(again.session_reused)
    head, _, body = response.partition(b"\r\n\r\n")
    return TlsProbe(
        status_line=head.split(b"\r\n", 1)[0].decode("latin-1"),
        body=body.decode("utf-8", "replace"),
        certificate_key=key,
        protocol=protocol,
        cipher=cipher[0] if cipher else "?",
        ticket_received=ticket,
        resumed_on_reconnect=resumed,
    )


def curl_body(port: int, certs: CertFiles) -> str:
    done = subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            str(certs.ca),
            f"https://127.0.0.1:{port}/",
        ],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"curl through port {port} failed: {done.stderr.strip()}")
    return done.stdout


class _ResumptionCounter:
    """A tiny blocking HTTPS server with dualproxy's own TLS context that answers every
    request with Connection: close and counts full and resumed handshakes: run a load
    generator against it to see whether that client would resume sessions dualproxy issues."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.full = 0
        self.resumed = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> _ResumptionCounter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            raw.settimeout(2)
            try:
                with self.context.wrap_socket(raw, server_side=True) as tls:
                    if tls.session_reused:
                        self.resumed += 1
                    else:
                        self.full += 1
                    head = b""
                    while b"\r\n\r\n" not in head and (chunk := tls.recv(4096)):
                        head += chunk
                    tls.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"
                    )
            except (OSError, ssl.SSLError):
                raw.close()


def probe_load_generators(dualproxy_toml_path: Path) -> dict[str, dict[str, int]]:
    """Full and resumed handshakes h2load and wrk make when every response closes the
    connection, against a server holding the very SSLContext dualproxy builds (which issues
    TLS 1.3 tickets): proves whether the new-connection figures include any resumption."""
    sys.path.insert(0, str(REPO))
    from dualproxy.config.loader import load
    from dualproxy.tls import keystore

    snapshot = keystore.load_snapshot(load(dualproxy_toml_path))
    context = snapshot.identities["single"].context
    results: dict[str, dict[str, int]] = {}
    for name in ("h2load", "wrk"):
        with _ResumptionCounter(context) as counter:
            # The same commands as the measured runs, smaller: 200 requests, or one second.
            if name == "h2load":
                cmd = h2load_command(counter.port, 4, 200)
            else:
                cmd = wrk_command(counter.port, 4, 1)
            subprocess.run(cmd, capture_output=True, timeout=60, check=False)
        results[name] = {"full_handshakes": counter.full, "resumed_handshakes": counter.resumed}
    return results


# --- load --------------------------------------------------------------------------------


@dataclass
class LoadResult:
    requests: int  # completed with a 2xx
    seconds: float
    errors: int
    tls: str = ""
    latency_ms: dict[str, float] = field(default_factory=dict)
    output: str = ""

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


_UNITS: Final = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _seconds(value: str, unit: str) -> float:
    return float(value) * _UNITS[unit]


def wrk_command(port: int, connections: int, duration: float) -> list[str]:
    return [
        "wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--timeout", "5s", "--latency",
        f"https://127.0.0.1:{port}/",
    ]  # fmt: skip


def h2load_command(port: int, connections: int, requests: int) -> list[str]:
    # A request count, not -D: h2load 1.52's timing mode never ends when the server closes
    # every connection (it spins until killed). The count is sized from a calibration run so
    # that a run lasts about --duration, and run_load bounds it in time regardless.
    return [
        "h2load", "--h1", "-H", "Connection: close", f"-c{connections}", "-t1", f"-n{requests}",
        f"https://127.0.0.1:{port}/",
    ]  # fmt: skip


def h2_command(port: int, connections: int, streams: int, requests: int) -> list[str]:
    """HTTP/2: `connections` clients with `streams` requests in flight each (-n: see above)."""
    return [
        "h2load", f"-c{connections}", f"-m{streams}", "-t1", f"-n{requests}",
        f"https://127.0.0.1:{port}/",
    ]  # fmt: skip


def parse_wrk(output: str) -> LoadResult:
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h),", output)
    if done is None:
        raise BenchError(f"wrk printed no summary:\n{output}")
    requests, seconds = int(done.group(1)), _seconds(done.group(2), done.group(3))
    errors = 0
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", output):
        errors += int(m.group(1))
    if m := re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    ):
        errors += sum(int(x) for x in m.groups())
    latency = {
        f"p{p}": _seconds(v, u)
        for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)", output, re.MULTILINE)
    }
    return LoadResult(
        requests=requests - errors,
        seconds=seconds,
        errors=errors,
        latency_ms={k: round(v * 1000, 3) for k, v in latency.items()},
        output=output,
    )


def parse_h2load(output: str) -> LoadResult:
    done = re.search(r"finished in ([\d.]+)(us|ms|s|m|h),", output)
    counts = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed,"
        r" (\d+) errored, (\d+) timeout",
        output,
    )
    status = re.search(r"status codes: (\d+) 2xx", output)
    if done is None or counts is None or status is None:
        raise BenchError(f"h2load printed no summary:\n{output}")
    tls = " ".join(
        m.group(1).strip()
        for key in ("TLS Protocol", "Cipher", "Server Temp Key")
        if (m := re.search(rf"{key}: (.*)", output))
    )
    ok = int(status.group(1))
    return LoadResult(
        requests=ok,
        seconds=_seconds(done.group(1), done.group(2)),
        errors=int(counts.group(5))
        + int(counts.group(6))
        + int(counts.group(7))
        + (int(counts.group(4)) - ok),
        tls=tls,
        output=output,
    )


def run_load(cmd: Sequence[str], duration: float, parse: Callable[[str], LoadResult]) -> LoadResult:
    """Run a load generator to completion, killing it if it overruns `duration` by far."""
    try:
        done = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=LOAD_TIMEOUT_FACTOR * duration + LOAD_GRACE_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"{' '.join(cmd)} overran its time and was killed") from None
    if done.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return parse(done.stdout)


def run_repeated(cmd: Sequence[str], times: int, duration: float) -> LoadResult:
    """Run h2load `cmd` `times` times in a row (each a batch of new connections), as one
    result; bounded like run_load, over all of them."""
    deadline = time.monotonic() + LOAD_TIMEOUT_FACTOR * duration + LOAD_GRACE_SECONDS
    total = LoadResult(requests=0, seconds=0.0, errors=0)
    started = time.monotonic()
    for _ in range(times):
        left = deadline - time.monotonic()
        if left <= 0:
            raise BenchError(f"{' '.join(cmd)} x{times} overran its time")
        one = run_load(cmd, max(left - LOAD_GRACE_SECONDS, 0.1) / LOAD_TIMEOUT_FACTOR, parse_h2load)
        total.requests += one.requests
        total.errors += one.errors
        total.tls = total.tls or one.tls
    total.seconds = time.monotonic() - started
    return total


# --- what the servers saw ----------------------------------------------------------------


def read_from(path: Path, offset: int) -> str:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read().decode("utf-8", "replace")


def server_view(proxy: ProxyName, text: str) -> dict[str, int]:
    """Connections, requests and resumed sessions from the proxy's own log for one run."""
    if proxy == "nginx":
        # log_format bench: connection serial, its request number, r or ., protocol, status
        # (499, "client closed request", is wrk stopping with requests in flight.)
        rows = [line.split() for line in text.splitlines() if line.strip()]
        statuses = Counter(row[4] for row in rows if not row[4].startswith("2"))
        return {
            "connections": len({row[0] for row in rows}),
            "requests": len(rows),
            "resumed_requests": sum(1 for row in rows if row[2] == "r"),
            "resumed_connections": len({row[0] for row in rows if row[2] == "r"}),
        } | {f"status_{code}": n for code, n in sorted(statuses.items())}
    # dualproxy: one "conn ... outcome=X ... requests=N" line per connection when it ends.
    lines = [line for line in text.splitlines() if " conn " in line]
    outcomes = Counter(m.group(1) for line in lines if (m := re.search(r" outcome=(\S+)", line)))
    view = {
        "connections": len(lines),
        "requests": sum(
            int(m.group(1)) for line in lines if (m := re.search(r" requests=(\d+)", line))
        ),
    }
    view |= {f"outcome_{name}": count for name, count in sorted(outcomes.items())}
    return view


def read_session_stats(folder: Path) -> dict[int, dict[str, int]]:
    """Each dualproxy process's OpenSSL session counts (serve_counting_sessions.py), by pid."""
    stats: dict[int, dict[str, int]] = {}
    for path in folder.glob("*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            data = json.loads(path.read_text())
            stats[int(data["pid"])] = {str(k): int(v) for k, v in data.items() if k != "pid"}
    return stats


@dataclass(frozen=True)
class SessionCounts:
    """Handshakes a server completed and how many of them resumed a session, by its own
    count (OpenSSL's accept_good and hits, summed over processes and contexts)."""

    handshakes: int
    resumed: int

    @classmethod
    def of(cls, stats: dict[int, dict[str, int]]) -> SessionCounts:
        return cls(
            handshakes=sum(one.get("accept_good", 0) for one in stats.values()),
            resumed=sum(one.get("hits", 0) for one in stats.values()),
        )

    def minus(self, before: SessionCounts) -> SessionCounts:
        return SessionCounts(self.handshakes - before.handshakes, self.resumed - before.resumed)


def resumption_problem(connections: int, resumed: int, clients: int) -> str | None:
    """What is wrong, in words, with a resumed run in which the server counted `connections`
    TLS connections, `resumed` of them resumed, from `clients` h2load clients (each of which
    makes one full handshake, its first); None when nearly every connection resumed."""
    if connections <= 0:
        return "the server counted no TLS connection"
    full = connections - resumed
    allowed = clients + RESUMED_FULL_SLACK * connections
    if full > allowed:
        return (
            f"{full} of {connections} connections were full handshakes, where at most"
            f" {allowed:.0f} may be (one per h2load client, plus {RESUMED_FULL_SLACK:.0%})"
        )
    return None


def resumed_connections(view: dict[str, int]) -> tuple[int, int]:
    """(TLS connections, of which resumed) in a server's view of a run: nginx's from its
    access log ($ssl_session_reused per connection), dualproxy's from OpenSSL's counts."""
    if "tls_handshakes" in view:
        return view["tls_handshakes"], view["tls_resumed"]
    return view.get("connections", 0), view.get("resumed_connections", 0)


# --- one measured run --------------------------------------------------------------------


@dataclass
class Run:
    proxy: ProxyName
    kind: LoadKind
    round: int
    requests: int
    seconds: float
    errors: int
    server_cpu_s: float  # user + system
    server_system_cpu_s: float  # of which in the kernel
    upstream_cpu_s: float
    load_generator_cpu_s: float
    # CPU the machine spent outside our servers and load generator during the run.
    foreign_cpu_s: float
    # CPU time the hypervisor gave to other machines (steal): a busy host.
    stolen_cpu_s: float
    server_view: dict[str, int]
    tls: str
    latency_ms: dict[str, float]
    # The idle load: kB of the server's process tree (summed over its processes) before the
    # connections were opened and once they were all open and idle.
    rss_before_kb: int = 0
    rss_after_kb: int = 0
    pss_before_kb: int = 0
    pss_after_kb: int = 0

    @property
    def noisy(self) -> bool:
        return (
            self.foreign_cpu_s > NOISY_FOREIGN_SHARE * self.seconds
            or self.stolen_cpu_s > NOISY_STOLEN_SHARE * self.seconds
        )

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms_per_request(self) -> float:
        return 1000 * self.server_cpu_s / self.requests if self.requests else float("nan")

    @property
    def kernel_share(self) -> float:
        return self.server_system_cpu_s / self.server_cpu_s if self.server_cpu_s else float("nan")

    @property
    def requests_per_cpu_second(self) -> float:
        return self.requests / self.server_cpu_s if self.server_cpu_s else float("nan")

    @property
    def resumed_share(self) -> float:
        """Of the TLS connections the server counted, the share it resumed."""
        connections, resumed = resumed_connections(self.server_view)
        return resumed / connections if connections else float("nan")

    @property
    def rss_kb_per_connection(self) -> float:
        """The idle load: RSS the server's tree grew by, per connection held open."""
        if not self.requests:
            return float("nan")
        return (self.rss_after_kb - self.rss_before_kb) / self.requests

    @property
    def pss_kb_per_connection(self) -> float:
        if not self.requests:
            return float("nan")
        return (self.pss_after_kb - self.pss_before_kb) / self.requests

    def as_json(self) -> dict[str, object]:
        figures: dict[str, object] = {
            "noisy": self.noisy,
            "requests_per_second": round(self.rate, 1),
            "cpu_ms_per_request": round(self.cpu_ms_per_request, 4),
            "requests_per_cpu_second": round(self.requests_per_cpu_second, 1),
        }
        if self.kind == "resumed":
            figures["resumed_share"] = round(self.resumed_share, 5)
        if self.kind == "idle":
            figures["rss_kb_per_connection"] = round(self.rss_kb_per_connection, 2)
            figures["pss_kb_per_connection"] = round(self.pss_kb_per_connection, 2)
        return asdict(self) | figures


@dataclass
class Bench:
    servers: dict[str, Server]
    args: argparse.Namespace
    taskset_load: list[str]
    # h2load -n per proxy, sized by calibrate() so that a run lasts about --duration.
    newconn_requests: dict[str, int] = field(default_factory=dict)
    # The same for the resumed load (its own servers, resuming: faster).
    resumed_requests: dict[str, int] = field(default_factory=dict)
    # The same for the HTTP/2 load, and the h2load repeats of the new-HTTP/2-connection load.
    h2_requests: dict[str, int] = field(default_factory=dict)
    h2conn_repeats: dict[str, int] = field(default_factory=dict)

    def calibrate(self, proxy: ProxyName, duration: float, kind: LoadKind = "newconn") -> Run:
        """A short h2load run (also a warm-up) that sizes this proxy's new-connection runs
        (or, with kind "resumed", its resumed runs)."""
        sizes = self.resumed_requests if kind == "resumed" else self.newconn_requests
        clients = self.args.newconn_connections
        sizes[proxy] = clients * CALIBRATION_REQUESTS_PER_CLIENT
        run = self.measure(proxy, kind, -1, duration)
        per_client = max(4, round(run.rate * duration / clients))
        sizes[proxy] = per_client * clients
        return run

    def calibrate_h2(self, proxy: ProxyName, duration: float) -> None:
        """Short runs (also warm-ups) that size this proxy's HTTP/2 runs to last `duration`."""
        clients = self.args.h2_connections
        if "h2" in self.args.loads:
            self.h2_requests[proxy] = clients * CALIBRATION_REQUESTS_PER_CLIENT * 20
            run = self.measure(proxy, "h2", -1, duration)
            self.h2_requests[proxy] = clients * max(20, round(run.rate * duration / clients))
        if "h2conn" in self.args.loads:
            self.h2conn_repeats[proxy] = CALIBRATION_H2CONN_REPEATS
            run = self.measure(proxy, "h2conn", -1, duration)
            self.h2conn_repeats[proxy] = max(2, round(run.rate * duration / clients))

    def measure(self, proxy: ProxyName, kind: LoadKind, round_: int, duration: float) -> Run:
        # The resumed load runs against the pair with session tickets on.
        server = self.servers[f"{proxy}-tickets" if kind == "resumed" else proxy]
        log = server.view_log
        offset = log.stat().st_size
        clients = self.args.h2_connections
        repeats = 1
        if kind == "keepalive":
            cmd = wrk_command(server.port, self.args.keepalive_connections, duration)
            parse = parse_wrk
        elif kind in ("newconn", "resumed"):
            sizes = self.resumed_requests if kind == "resumed" else self.newconn_requests
            cmd = h2load_command(server.port, self.args.newconn_connections, sizes[proxy])
            parse = parse_h2load
        elif kind == "h2":
            requests = self.h2_requests[proxy]
            cmd = h2_command(server.port, clients, self.args.h2_streams, requests)
            parse = parse_h2load
        else:  # h2conn: one stream per new connection
            cmd = h2_command(server.port, clients, 1, clients)
            repeats = self.h2conn_repeats[proxy]
        sessions0 = self._session_counts(server)

        def load() -> LoadResult:
            if kind == "h2conn":
                return run_repeated([*self.taskset_load, *cmd], repeats, duration)
            return run_load([*self.taskset_load, *cmd], duration, parse)

        run = self.sampled(server.name, proxy, kind, round_, load)
        run.server_view = server_view(proxy, read_from(log, offset))
        if server.session_stats is not None:
            sessions = self._session_counts(server).minus(sessions0)
            run.server_view |= {
                "tls_handshakes": sessions.handshakes,
                "tls_resumed": sessions.resumed,
            }
        if kind == "resumed":
            connections, resumed = resumed_connections(run.server_view)
            problem = resumption_problem(connections, resumed, self.args.newconn_connections)
            if problem is not None:
                raise BenchError(
                    f"{server.name} did not resume as the resumed load needs: {problem}"
                    f" (server saw {run.server_view})"
                )
        return run

    def _session_counts(self, server: Server) -> SessionCounts:
        if server.session_stats is None:
            return SessionCounts(0, 0)
        return SessionCounts.of(read_session_stats(server.session_stats))

    def sampled(
        self,
        name: str,
        proxy: ProxyName,
        kind: LoadKind,
        round_: int,
        load: Callable[[], LoadResult],
    ) -> Run:
        """Run `load` between two samples of every server's CPU and the machine's, after
        waiting for the machine to be quiet; `name` is the server measured. The load
        generator's CPU is that of this script's children plus its own (the idle load's client
        is this script)."""
        wait_for_quiet(self.args.quiet_timeout)
        ours0 = {n: tree_cpu_seconds(s.pid) for n, s in self.servers.items()}
        (busy0, steal0), load0 = machine_seconds(), children_cpu_seconds() + own_cpu_seconds()
        result = load()
        time.sleep(SETTLE_SECONDS)
        (busy1, steal1), load1 = machine_seconds(), children_cpu_seconds() + own_cpu_seconds()
        ours1 = {n: tree_cpu_seconds(s.pid) for n, s in self.servers.items() if n in ours0}
        ours = {n: sum(ours1[n]) - sum(ours0[n]) for n in ours1}
        server_system = ours1[name][1] - ours0[name][1]
        for s in self.servers.values():
            if s.process.poll() is not None:
                raise BenchError(f"{s.name} died during the run:\n{s.log_tail()}")
        return Run(
            proxy=proxy,
            kind=kind,
            round=round_,
            requests=result.requests,
            seconds=round(result.seconds, 3),
            errors=result.errors,
            server_cpu_s=round(ours[name], 3),
            server_system_cpu_s=round(server_system, 3),
            upstream_cpu_s=round(ours["upstream"], 3),
            load_generator_cpu_s=round(load1 - load0, 3),
            foreign_cpu_s=round(busy1 - busy0 - sum(ours.values()) - (load1 - load0), 3),
            stolen_cpu_s=round(steal1 - steal0, 3),
            server_view={},
            tls=result.tls,
            latency_ms=result.latency_ms,
        )


# --- idle connections: RSS per connection ------------------------------------------------


def status_kb(text: str, name: str) -> int:
    """A "Name:   123 kB" line's value from /proc/PID/status or smaps_rollup text (0 if absent)."""
    match = re.search(rf"^{re.escape(name)}:\s+(\d+) kB$", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


def tree_pids(root: int) -> list[int]:
    """`root` and every live descendant."""
    parents: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            parents.setdefault(stat[0], []).append(int(entry.name))
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo += parents.get(pid, [])
    return pids


def tree_memory_kb(root: int) -> tuple[int, int]:
    """(RSS, PSS) in kB of `root`'s process tree, summed over its processes. RSS counts a
    page shared by two processes (nginx's master and worker, dualproxy's workers) twice,
    PSS shares it out; a difference of two samples is what the tree grew by either way."""
    rss = pss = 0
    for pid in tree_pids(root):
        with contextlib.suppress(OSError):
            rss += status_kb(Path(f"/proc/{pid}/status").read_text(), "VmRSS")
            pss += status_kb(Path(f"/proc/{pid}/smaps_rollup").read_text(), "Pss")
    return rss, pss


def response_complete(data: bytes) -> bool | None:
    """Whether `data` holds a whole HTTP/1.1 response (Content-Length or chunked framing):
    True, False (need more), or None when its framing is neither (it then ends at close)."""
    head_end = data.find(b"\r\n\r\n")
    if head_end < 0:
        return False
    head = data[:head_end].lower()
    length = re.search(rb"\r\ncontent-length: *(\d+)", head)
    if length is not None:
        return len(data) - head_end - 4 >= int(length.group(1))
    if re.search(rb"\r\ntransfer-encoding: *chunked", head):
        return data.endswith(b"\r\n0\r\n\r\n")
    return None


def _get_keeping_open(tls: ssl.SSLSocket) -> bytes:
    """One keep-alive GET on `tls` and its whole response; the connection stays open."""
    tls.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    data = b""
    while not response_complete(data):
        chunk = tls.recv(65536)
        if not chunk:
            raise BenchError(f"the server closed a keep-alive connection: {data[:200]!r}")
        data += chunk
    return data


def open_idle_connections(
    port: int, context: ssl.SSLContext, count: int, held: list[ssl.SSLSocket]
) -> LoadResult:
    """Open `count` TLS connections one after another, one keep-alive request each, and keep
    them (appended to `held`, which the caller closes); bounded by IDLE_OPEN_TIMEOUT."""
    started = time.monotonic()
    deadline = started + IDLE_OPEN_TIMEOUT
    errors = 0
    for _ in range(count):
        if time.monotonic() > deadline:
            raise BenchError(
                f"opening {count} idle connections took over {IDLE_OPEN_TIMEOUT:g} s"
                f" ({len(held)} open): the first ones may have timed out"
            )
        raw = client_socket(port)
        try:
            tls = context.wrap_socket(raw, server_hostname="127.0.0.1")
        except (OSError, ssl.SSLError):
            raw.close()
            errors += 1
            continue
        held.append(tls)
        response = _get_keeping_open(tls)
        if not response.startswith(b"HTTP/1.1 200"):
            errors += 1
    return LoadResult(
        requests=len(held) - errors, seconds=time.monotonic() - started, errors=errors
    )


def raise_open_files_limit(wanted: int) -> None:
    """This script holds the idle load's connections: let it have `wanted` descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        top = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (top, hard))


def measure_idle(lab: Lab, bench: Bench, proxy: ProxyName, round_: int) -> Run:
    """RSS per idle TLS connection: a fresh server (configured as the lab's), one request
    on a first connection (closed), then `--idle-connections` connections of one request
    each, kept open; the RSS of its process tree before and after, over the count."""
    name = f"{proxy}-idle-{next(lab.serials)}"
    if proxy == "nginx":
        server = lab.start_nginx(name)
    else:
        how: DualproxyRun = "shipped" if lab.args.dualproxy_default_tls else "no-tickets"
        server = lab.start_dualproxy(name, how)
    held: list[ssl.SSLSocket] = []
    try:
        wait_listening(server)
        context = ssl.create_default_context(cafile=str(lab.certs.ca))
        _, first = _https_get(server.port, context, None)
        first.close()
        time.sleep(IDLE_SETTLE_SECONDS)
        before = tree_memory_kb(server.pid)
        after = (0, 0)

        def load() -> LoadResult:
            nonlocal after
            result = open_idle_connections(server.port, context, lab.args.idle_connections, held)
            time.sleep(IDLE_AFTER_SECONDS)
            after = tree_memory_kb(server.pid)
            return result

        run = bench.sampled(name, proxy, "idle", round_, load)
    finally:
        for tls in held:
            with contextlib.suppress(OSError):
                tls.close()
        if proxy == "dualproxy":
            # Its connection lines (the view's counts) are written as the connections end.
            wait_for_log(server.log, " conn ", len(held) + 1)
        lab.stop(name)
    run.rss_before_kb, run.pss_before_kb = before
    run.rss_after_kb, run.pss_after_kb = after
    run.server_view = server_view(proxy, server.view_log.read_text(errors="replace"))
    return run


def wait_for_log(log: Path, text: str, count: int) -> None:
    """Wait until `log` holds `count` lines with `text`, five seconds at most."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if log.read_text(errors="replace").count(text) >= count:
                return
        time.sleep(0.1)


# --- resumption across workers and reloads ----------------------------------------------


@dataclass
class ShareResult:
    """One share measurement: reconnects offering a session, and how many the server
    resumed by its own count (OpenSSL's), with what the clients saw beside it."""

    name: str
    sessions: int  # sessions obtained (each a full handshake)
    reconnects: int  # handshakes the server completed in the reconnect phase
    resumed: int  # of which it resumed (its count)
    client_resumed: int  # reconnects whose client saw session_reused
    detail: str = ""
    per_worker: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def share(self) -> float:
        return self.resumed / self.reconnects if self.reconnects else float("nan")

    def line(self) -> str:
        verdict = "MET" if self.share >= TARGET_RESUMED_SHARE else "NOT MET"
        return (
            f"  {self.name}: {self.resumed} of {self.reconnects} reconnects resumed"
            f" ({self.share:.1%}; the clients saw {self.client_resumed}); target"
            f" >= {TARGET_RESUMED_SHARE:.0%}: {verdict}{'; ' + self.detail if self.detail else ''}"
        )


def socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets process `pid` holds."""
    inodes: set[int] = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    return inodes


class Workers:
    """Which of a supervisor's workers took a connection: the one that holds a socket it did
    not hold before the connection was made (the share instance has no other traffic and no
    upstream, so a worker's new socket is the client's). The kernel chooses the worker (one
    SO_REUSEPORT socket each) when the TCP handshake completes, before any TLS byte."""

    def __init__(self, supervisor: int, count: int) -> None:
        self.supervisor = supervisor
        deadline = time.monotonic() + START_TIMEOUT
        while len(self.pids()) < count:
            if time.monotonic() > deadline:
                raise BenchError(f"dualproxy's supervisor did not start {count} workers")
            time.sleep(0.05)

    def pids(self) -> list[int]:
        return [pid for pid in tree_pids(self.supervisor) if pid != self.supervisor]

    def connect(self, port: int) -> tuple[socket.socket, int]:
        """A TCP connection to `port`, and the pid of the worker that accepted it."""
        before = {pid: socket_inodes(pid) for pid in self.pids()}
        raw = client_socket(port)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for pid, known in before.items():
                if socket_inodes(pid) - known:
                    return raw, pid
            time.sleep(0.001)
        raw.close()
        raise BenchError("no worker accepted a connection within 5 s")


def _handshake_and_get(
    raw: socket.socket, context: ssl.SSLContext, session: ssl.SSLSession | None
) -> tuple[ssl.SSLSession, bool]:
    """TLS on `raw` offering `session`, one GET with Connection: close, its whole response:
    (the session to offer next time, whether this one resumed)."""
    with context.wrap_socket(raw, server_hostname="127.0.0.1", session=session) as tls:
        tls.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        while tls.recv(65536):
            pass
        # The TLS 1.3 ticket came before the response (streams.py sends them together).
        fresh = tls.session
        reused = bool(tls.session_reused)
    if fresh is None or not fresh.has_ticket:
        raise BenchError("dualproxy sent no session ticket: no resumption to measure")
    return fresh, reused


def _wait_for_counts(server: Server, before: SessionCounts, handshakes: int) -> SessionCounts:
    """The server's counts once they include `handshakes` more than `before` (each process
    writes them every quarter second), or as they are after a few seconds."""
    assert server.session_stats is not None
    deadline = time.monotonic() + 5
    while True:
        now = SessionCounts.of(read_session_stats(server.session_stats)).minus(before)
        if now.handshakes >= handshakes or time.monotonic() > deadline:
            return now
        time.sleep(0.1)


def _per_worker(server: Server, before: dict[int, dict[str, int]]) -> dict[str, dict[str, int]]:
    assert server.session_stats is not None
    after = read_session_stats(server.session_stats)
    out: dict[str, dict[str, int]] = {}
    for pid, counts in sorted(after.items()):
        old = before.get(pid, {})
        handshakes = counts.get("accept_good", 0) - old.get("accept_good", 0)
        if handshakes:
            out[str(pid)] = {
                "handshakes": handshakes,
                "resumed": counts.get("hits", 0) - old.get("hits", 0),
            }
    return out


def share_across_workers(
    server: Server, workers: Workers, context: ssl.SSLContext, sessions: int, deadline: float
) -> ShareResult:
    """Sessions from full handshakes, each noting the worker that issued its ticket; then
    each is offered on a connection that landed on another worker (a connection that landed
    on the same one is closed before its ClientHello and made again)."""
    assert server.session_stats is not None
    start = SessionCounts.of(read_session_stats(server.session_stats))
    issued: list[tuple[ssl.SSLSession, int]] = []
    for _ in range(sessions):
        raw, pid = workers.connect(server.port)
        issued.append((_handshake_and_get(raw, context, None)[0], pid))
    _wait_for_counts(server, start, sessions)
    stats0 = read_session_stats(server.session_stats)
    before = SessionCounts.of(stats0)
    reconnects = client_resumed = dropped = 0
    for session, issuer in issued:
        if time.monotonic() > deadline:
            raise BenchError(f"the share across workers overran {SHARE_TIMEOUT:g} s")
        for _ in range(SHARE_LANDING_TRIES):
            raw, pid = workers.connect(server.port)
            if pid != issuer:
                break
            raw.close()
            dropped += 1
        else:
            raise BenchError(f"{SHARE_LANDING_TRIES} connections in a row landed on one worker")
        client_resumed += _handshake_and_get(raw, context, session)[1]
        reconnects += 1
    counts = _wait_for_counts(server, before, reconnects)
    return ShareResult(
        name=f"across workers ({len(workers.pids())} workers; each ticket offered to a worker"
        " that did not issue it)",
        sessions=sessions,
        reconnects=counts.handshakes,
        resumed=counts.resumed,
        client_resumed=client_resumed,
        detail=f"{dropped} connections landed on the issuing worker and were made again",
        per_worker=_per_worker(server, stats0),
    )


def share_across_reload(
    lab: Lab,
    server: Server,
    certs: CertFiles,
    context: ssl.SSLContext,
    sessions: int,
    deadline: float,
    *,
    renew: bool,
) -> ShareResult:
    """Sessions from full handshakes; SIGHUP (after a certificate renewal that keeps the
    key, with `renew`: the TLS contexts are rebuilt); each session offered again."""
    assert server.session_stats is not None
    start = SessionCounts.of(read_session_stats(server.session_stats))
    issued = []
    for _ in range(sessions):
        raw = client_socket(server.port)
        issued.append(_handshake_and_get(raw, context, None)[0])
    _wait_for_counts(server, start, sessions)
    offset = server.log.stat().st_size
    if renew:
        renew_certificate(certs)
    server.process.send_signal(signal.SIGHUP)
    reload_lines = wait_for_reload(server, offset, lab.args.share_workers)
    rebuilt = all("contexts rebuilt" in line for line in reload_lines)
    if renew and not rebuilt:
        raise BenchError(f"the renewal did not rebuild every TLS context: {reload_lines}")
    stats0 = read_session_stats(server.session_stats)
    before = SessionCounts.of(stats0)
    client_resumed = 0
    for session in issued:
        if time.monotonic() > deadline:
            raise BenchError(f"the share across a reload overran {SHARE_TIMEOUT:g} s")
        raw = client_socket(server.port)
        client_resumed += _handshake_and_get(raw, context, session)[1]
    counts = _wait_for_counts(server, before, len(issued))
    what = "a certificate renewal, same key: TLS contexts rebuilt" if renew else "files unchanged"
    return ShareResult(
        name=f"across a reload (SIGHUP, {what})",
        sessions=sessions,
        reconnects=counts.handshakes,
        resumed=counts.resumed,
        client_resumed=client_resumed,
        detail=f"reload lines: {len(reload_lines)}",
        per_worker=_per_worker(server, stats0),
    )


def wait_for_reload(server: Server, offset: int, workers: int) -> list[str]:
    """The log lines of a SIGHUP reload: the supervisor's and each worker's (or the single
    process's); BenchError when one failed or they do not come within START_TIMEOUT."""
    wanted = workers if workers > 1 else 1
    pattern = "reloaded (SIGHUP, worker" if workers > 1 else "reloaded (SIGHUP"
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        lines = read_from(server.log, offset).splitlines()
        if failed := [line for line in lines if "reload (" in line and "failed" in line]:
            raise BenchError(f"dualproxy's reload failed: {failed[0]}")
        done = [line for line in lines if pattern in line]
        if len(done) >= wanted:
            return done
        if time.monotonic() > deadline:
            raise BenchError(f"dualproxy did not log its reload: {lines[-5:]}")
        time.sleep(0.05)


def measure_resumption_shares(lab: Lab) -> list[ShareResult]:
    """The shares of reconnects that resume on another worker and after a reload, against
    a dualproxy of its own (`--share-workers` workers, its managed ticket keys, no upstream:
    it answers by itself) with certificates of its own (the renewal rewrites them)."""
    folder = lab.tmp / "shares"
    folder.mkdir()
    for path in (lab.certs.key, lab.certs.ca_key):
        _write_secret(folder / path.name, path.read_bytes())
    shutil.copy(lab.certs.chain, folder / lab.certs.chain.name)
    certs = CertFiles(
        ca=lab.certs.ca,
        key=folder / lab.certs.key.name,
        chain=folder / lab.certs.chain.name,
        ca_key=folder / lab.certs.ca_key.name,
    )
    workers = lab.args.share_workers
    server = lab.start_dualproxy(
        "dualproxy-shares", "counting", workers=workers, folder=folder, upstream=False
    )
    sessions = lab.args.share_sessions
    try:
        wait_listening(server)
        context = ssl.create_default_context(cafile=str(lab.certs.ca))
        results = []
        if workers > 1:
            deadline = time.monotonic() + SHARE_TIMEOUT
            pool = Workers(server.pid, workers)
            results.append(share_across_workers(server, pool, context, sessions, deadline))
        for renew in (False, True):
            deadline = time.monotonic() + SHARE_TIMEOUT
            results.append(
                share_across_reload(lab, server, certs, context, sessions, deadline, renew=renew)
            )
    finally:
        lab.stop(server.name)
    return results


# --- summary -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Figure:
    label: str
    kind: LoadKind
    value: Callable[[Run], float]
    fmt: str
    target: str = ""
    # The target's bound on the ratio dualproxy/nginx: at least (True) or at most it.
    bound: float | None = None
    at_least: bool = False

    def met(self, ratio: float) -> bool | None:
        """Whether `ratio` meets this figure's target; None when it has none."""
        return None if self.bound is None else meets(ratio, self.bound, self.at_least)


def meets(ratio: float, bound: float, at_least: bool) -> bool:
    """Whether a ratio dualproxy/nginx meets a target: at least `bound`, or at most it."""
    return ratio >= bound if at_least else ratio <= bound


FIGURES: Final = (
    Figure("requests/s", "keepalive", lambda r: r.rate, "{:,.0f}"),
    Figure("server CPU s", "keepalive", lambda r: r.server_cpu_s, "{:.2f}"),
    Figure("  of which kernel", "keepalive", lambda r: r.kernel_share, "{:.0%}"),
    Figure("CPU-ms / request", "keepalive", lambda r: r.cpu_ms_per_request, "{:.4f}"),
    Figure(
        "requests / CPU-second",
        "keepalive",
        lambda r: r.requests_per_cpu_second,
        "{:,.0f}",
        f">= {TARGET_KEEPALIVE_PER_CORE:g}x (naive: {REFERENCE_KEEPALIVE_PER_CORE:g}x)",
        TARGET_KEEPALIVE_PER_CORE,
        at_least=True,
    ),
    Figure("connections/s", "newconn", lambda r: r.rate, "{:,.0f}"),
    Figure("server CPU s", "newconn", lambda r: r.server_cpu_s, "{:.2f}"),
    Figure("  of which kernel", "newconn", lambda r: r.kernel_share, "{:.0%}"),
    Figure(
        "CPU-ms / new connection",
        "newconn",
        lambda r: r.cpu_ms_per_request,
        "{:.4f}",
        f"<= {TARGET_NEWCONN_CPU:g}x (naive: {REFERENCE_NEWCONN_CPU:g}x)",
        TARGET_NEWCONN_CPU,
    ),
    Figure("connections / CPU-second", "newconn", lambda r: r.requests_per_cpu_second, "{:,.0f}"),
    Figure("requests/s", "h2", lambda r: r.rate, "{:,.0f}"),
    Figure("server CPU s", "h2", lambda r: r.server_cpu_s, "{:.2f}"),
    Figure("CPU-ms / request", "h2", lambda r: r.cpu_ms_per_request, "{:.4f}"),
    Figure("requests / CPU-second", "h2", lambda r: r.requests_per_cpu_second, "{:,.0f}"),
    Figure("connections/s", "h2conn", lambda r: r.rate, "{:,.0f}"),
    Figure("CPU-ms / new connection", "h2conn", lambda r: r.cpu_ms_per_request, "{:.4f}"),
    Figure("connections/s", "resumed", lambda r: r.rate, "{:,.0f}"),
    Figure("server CPU s", "resumed", lambda r: r.server_cpu_s, "{:.2f}"),
    Figure("  of which kernel", "resumed", lambda r: r.kernel_share, "{:.0%}"),
    Figure("resumed (server's count)", "resumed", lambda r: r.resumed_share, "{:.2%}"),
    Figure("CPU-ms / resumed connection", "resumed", lambda r: r.cpu_ms_per_request, "{:.4f}"),
    Figure("connections / CPU-second", "resumed", lambda r: r.requests_per_cpu_second, "{:,.0f}"),
    Figure("RSS before, MB", "idle", lambda r: r.rss_before_kb / 1024, "{:.1f}"),
    Figure("RSS with them open, MB", "idle", lambda r: r.rss_after_kb / 1024, "{:.1f}"),
    Figure(
        "kB RSS / idle connection",
        "idle",
        lambda r: r.rss_kb_per_connection,
        "{:.1f}",
        f"<= {ISSUE16_IDLE_RSS:g}x (issue 16)",
        ISSUE16_IDLE_RSS,
    ),
    Figure("kB PSS / idle connection", "idle", lambda r: r.pss_kb_per_connection, "{:.1f}"),
    Figure("CPU-ms / connection opened", "idle", lambda r: r.cpu_ms_per_request, "{:.4f}"),
)
# Issue 16's targets over figures of the table: (kind, label, bound, at least?).
ISSUE16_TARGETS: Final = (
    ("keepalive", "requests / CPU-second", ISSUE16_KEEPALIVE_PER_CORE, True),
    ("newconn", "CPU-ms / new connection", ISSUE16_NEWCONN_CPU, False),
    ("idle", "kB RSS / idle connection", ISSUE16_IDLE_RSS, False),
)


def summarize(runs: Sequence[Run], rounds: int) -> list[dict[str, object]]:
    """Per figure: each proxy's median over rounds, and the median of per-round ratios (the
    figures of the loads that ran)."""
    rows: list[dict[str, object]] = []
    for fig in FIGURES:
        per_proxy = {
            p: [fig.value(r) for r in runs if r.proxy == p and r.kind == fig.kind] for p in PROXIES
        }
        if not all(per_proxy.values()):
            continue
        ratios = []
        for n in range(rounds):
            pair = {r.proxy: fig.value(r) for r in runs if r.round == n and r.kind == fig.kind}
            if len(pair) == 2 and pair["nginx"]:
                ratios.append(pair["dualproxy"] / pair["nginx"])
        rows.append(
            {
                "kind": fig.kind,
                "figure": fig.label,
                "label": fig.label,
                "nginx": statistics.median(per_proxy["nginx"]),
                "dualproxy": statistics.median(per_proxy["dualproxy"]),
                "ratio_median": statistics.median(ratios) if ratios else None,
                "ratio_per_round": [round(x, 4) for x in ratios],
                "target": fig.target,
            }
        )
    return rows


def issue16_lines(rows: Sequence[dict[str, object]]) -> list[str]:
    """Issue 16's targets against the table's ratios, for the loads that ran."""
    lines = []
    for kind, label, bound, at_least in ISSUE16_TARGETS:
        row = next((r for r in rows if r["kind"] == kind and r["label"] == label), None)
        ratio = row["ratio_median"] if row is not None else None
        if not isinstance(ratio, float):
            continue
        sign = ">=" if at_least else "<="
        lines.append(
            f"  {kind} {label}: {ratio:.3f}x, target {sign} {bound:g}x:"
            f" {'MET' if meets(ratio, bound, at_least) else 'NOT MET'}"
        )
    if not lines:
        return []
    return ["issue 16 targets (dualproxy/nginx, medians of per-round ratios):", *lines]


def h2_vs_keepalive(runs: Sequence[Run], rounds: int) -> list[float]:
    """Per round: dualproxy's HTTP/2 requests per CPU-second over its own HTTP/1.1 keep-alive
    figure (the issue's 0.6 target)."""
    ratios = []
    for n in range(rounds):
        own = {r.kind: r for r in runs if r.round == n and r.proxy == "dualproxy"}
        if "h2" in own and "keepalive" in own and own["keepalive"].requests_per_cpu_second:
            h2, h1 = own["h2"], own["keepalive"]
            ratios.append(h2.requests_per_cpu_second / h1.requests_per_cpu_second)
    return ratios


def format_table(rows: Sequence[dict[str, object]], args: argparse.Namespace) -> str:
    titles = {
        "h2": (
            f"HTTP/2: h2load -c{args.h2_connections} -m{args.h2_streams}, about {args.duration:g} s"
        ),
        "h2conn": (
            f"new HTTP/2 connection, one stream each: h2load -c{args.h2_connections}"
            f" -n{args.h2_connections}, repeated for about {args.duration:g} s"
        ),
        "keepalive": f"keep-alive: wrk -t1 -c{args.keepalive_connections}, {args.duration:g} s",
        "newconn": (
            f"new TLS connection per request: h2load --h1 -H 'Connection: close'"
            f" -c{args.newconn_connections}, {args.duration:g} s"
        ),
        "resumed": (
            f"resumed TLS connection per request (tickets on): the same h2load"
            f" -c{args.newconn_connections}, {args.duration:g} s"
        ),
        "idle": (
            f"{args.idle_connections} idle TLS connections, one request each (fresh servers;"
            " RSS summed over the process tree)"
        ),
    }
    out = [f"{'':28}{'nginx':>12}{'dualproxy':>12}{'ratio':>9}  target (dualproxy/nginx)"]
    kind = None
    figures: dict[tuple[str, str], Figure] = {(fig.kind, fig.label): fig for fig in FIGURES}
    for row in rows:
        fig = figures[str(row["kind"]), str(row["label"])]
        if row["kind"] != kind:
            kind = row["kind"]
            out.append(titles[fig.kind])
        ratio = row["ratio_median"]
        verdict = ""
        if fig.target and isinstance(ratio, float):
            verdict = f"{fig.target}: {'MET' if fig.met(ratio) else 'NOT MET'}"
        nginx, dualproxy = fig.fmt.format(row["nginx"]), fig.fmt.format(row["dualproxy"])
        shown = f"{ratio:.3f}x" if isinstance(ratio, float) else "-"
        out.append(f"  {fig.label:26}{nginx:>12}{dualproxy:>12}{shown:>9}  {verdict}")
    return "\n".join(out)


# --- profile -----------------------------------------------------------------------------

# Layers, by the file of a sample's innermost Python frame (py-spy's short file names). py-spy
# samples Python stacks only, so time in C is charged to the Python frame that called it: the
# self time of ssl.py's SSLObject methods is OpenSSL's (handshake, record crypto), that of
# trio's socket wrapper is the send/recv system calls (the kernel's TCP loopback work).
_CATEGORIES: Final = (
    ("OpenSSL, via ssl.py (handshake, record encryption)", re.compile(r"\(ssl\.py:")),
    ("socket system calls, via trio/_socket.py", re.compile(r"\(trio/_socket\.py:")),
    ("trio SSLStream", re.compile(r"\(trio/_ssl\.py:")),
    ("h11", re.compile(r"\(h11/")),
    ("dualproxy's own Python", re.compile(r"\(dualproxy/")),
    ("logging", re.compile(r"\(logging/")),
    ("trio: scheduler, cancel scopes, checkpoints", re.compile(r"\(trio/")),
    ("other (stdlib)", re.compile(r"")),
)


# py-spy leaves idle threads out, but takes trio's cached worker thread, parked in a lock wait
# between jobs, for busy (its /proc CPU time stays 0 meanwhile): those samples are dropped.
_IDLE_LEAF: Final = re.compile(r"^WorkerThread\._work \(trio/_core/_thread_cache\.py:")


def profile_report(raw: Path, top: int = 20) -> str:
    """A top table from py-spy's collapsed stacks ("frame;frame;... count" per line)."""
    self_samples: Counter[str] = Counter()
    total_samples: Counter[str] = Counter()
    categories: Counter[str] = Counter()
    total = idle = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        if _IDLE_LEAF.search(frames[-1]):
            idle += count
            continue
        total += count
        self_samples[frames[-1]] += count
        for frame in set(frames):
            total_samples[frame] += count
        category = next(name for name, pattern in _CATEGORIES if pattern.search(frames[-1]))
        categories[category] += count
    if not total:
        return "no samples"

    out = [
        f"{total} samples on CPU ({idle} more of trio's idle worker thread left out)",
        "",
        "self time by layer:",
    ]
    out += [f"  {100 * n / total:5.1f}%  {name}" for name, n in categories.most_common()]
    out += ["", f"top {top} functions by self time:"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in self_samples.most_common(top)]
    out += ["", f"top {top} functions by inclusive time:"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in total_samples.most_common(top)]
    return "\n".join(out)


def profile_dualproxy(bench: Bench, py_spy: str, out_dir: Path, duration: float) -> dict[str, str]:
    """py-spy on dualproxy during a keep-alive and a new-connection run: an SVG flame graph
    and a top table for each (two passes each: py-spy writes one format per recording).

    py-spy pauses the process for each sample (without that, --nonblocking, a third of the
    stacks came out torn), which slows it slightly: these runs are not measured."""
    server = bench.servers["dualproxy"]
    reports: dict[str, str] = {}
    for kind in ("keepalive", "newconn"):
        for fmt, suffix in (("flamegraph", "svg"), ("raw", "txt")):
            output = out_dir / f"profile-{kind}.{suffix}"
            if kind == "keepalive":
                cmd = wrk_command(server.port, bench.args.keepalive_connections, duration + 2)
            else:
                requests = (
                    bench.newconn_requests["dualproxy"] * (duration + 2) / bench.args.duration
                )
                cmd = h2load_command(server.port, bench.args.newconn_connections, round(requests))
            load = subprocess.Popen(
                [*bench.taskset_load, *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            try:
                time.sleep(1)  # sample the steady state, not the first connections
                record = [py_spy, "record", "--pid", str(server.pid), "--duration", f"{duration:g}"]
                record += ["--rate", "200", "--function", "--format", fmt, "--output", str(output)]
                spy = subprocess.run(
                    record,
                    capture_output=True,
                    text=True,
                    timeout=duration + 60,
                    check=False,
                )
                if spy.returncode != 0:
                    raise BenchError(f"py-spy failed: {spy.stderr.strip()}")
            finally:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    load.wait(timeout=duration + LOAD_GRACE_SECONDS)
                if load.poll() is None:
                    load.kill()
                    load.wait()
        report = profile_report(out_dir / f"profile-{kind}.txt")
        (out_dir / f"profile-{kind}.top.txt").write_text(report + "\n")
        reports[kind] = report
    return reports


# --- main --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="dualproxy vs nginx: server CPU per request and per new TLS connection"
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds (medians over them)")
    parser.add_argument("--duration", type=float, default=10, help="seconds per load run")
    parser.add_argument("--warmup", type=float, default=2, help="seconds of unmeasured load first")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes of both proxies: nginx's worker_processes, dualproxy's [process]"
        " workers (1: a single dualproxy process, no supervisor)",
    )
    parser.add_argument("--keepalive-connections", type=int, default=32, help="wrk -c")
    parser.add_argument("--newconn-connections", type=int, default=16, help="h2load -c")
    parser.add_argument("--h2-connections", type=int, default=16, help="h2load -c (HTTP/2)")
    parser.add_argument("--h2-streams", type=int, default=10, help="h2load -m (HTTP/2)")
    parser.add_argument(
        "--loads",
        type=lambda text: LOADS if text == "all" else tuple(text.split(",")),
        default=DEFAULT_LOADS,
        help=f"which loads, comma-separated, from {','.join(LOADS)}, or all (default:"
        f" {','.join(DEFAULT_LOADS)}; resumed and idle are slower, and start servers of their"
        " own)",
    )
    parser.add_argument(
        "--idle-connections",
        type=int,
        default=IDLE_CONNECTIONS,
        help="connections the idle load holds open per server",
    )
    parser.add_argument(
        "--share-sessions",
        type=int,
        default=SHARE_SESSIONS,
        help="sessions per resumption-share measurement (with the resumed load)",
    )
    parser.add_argument(
        "--share-workers",
        type=int,
        default=2,
        help="dualproxy's workers for the resumption-share measurements",
    )
    parser.add_argument(
        "--pin-cpus",
        action="store_true",
        help="taskset: proxies on the last CPU, load generator and upstream on the others",
    )
    parser.add_argument("--profile", action="store_true", help="py-spy dualproxy afterwards")
    parser.add_argument(
        "--quiet-timeout",
        type=float,
        default=10,
        help="seconds to wait, before each run, for the machine to be idle (0: do not wait)",
    )
    parser.add_argument(
        "--noisy-retries",
        type=int,
        default=1,
        help="measure a run again, at most this often, when other processes were busy during it",
    )
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR)
    parser.add_argument(
        "--no-install", action="store_true", help="do not apt-get/pip install missing tools"
    )
    parser.add_argument(
        "--require-proxy",
        action="store_true",
        help="fail unless dualproxy relays to the upstream (not its placeholder answer)",
    )
    parser.add_argument(
        "--dualproxy-default-tls",
        action="store_true",
        help="run dualproxy without the no-tickets OpenSSL config: h2load then resumes sessions",
    )
    parser.add_argument(
        "--placeholder",
        action="store_true",
        help="give dualproxy no [upstream]: it answers itself (TLS front and HTTP handling)",
    )
    parser.add_argument("--keep-tmp", action="store_true", help="keep configs, certs and logs")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.duration <= 0:
        parser.error("--rounds must be >= 1 and --duration > 0")
    if unknown := set(args.loads) - set(LOADS):
        parser.error(f"--loads: unknown {', '.join(sorted(unknown))}; choose from {LOADS}")
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    if not 1 <= args.idle_connections <= 10_000:
        parser.error("--idle-connections must be between 1 and 10000")
    if not 1 <= args.share_sessions <= 5_000 or not 1 <= args.share_workers <= 16:
        parser.error("--share-sessions must be 1-5000 and --share-workers 1-16")
    if args.placeholder and args.require_proxy:
        parser.error("--placeholder and --require-proxy contradict each other")
    return args


# How a dualproxy runs: "no-tickets" through serve_without_tickets.py with the no-tickets
# OpenSSL config (the full-handshake loads), "shipped" as `dualproxy` itself
# (--dualproxy-default-tls), "counting" through serve_counting_sessions.py: as shipped (its
# managed ticket keys), with its OpenSSL session counts written out (the resumed load).
DualproxyRun = Literal["no-tickets", "shipped", "counting"]


@dataclass
class Lab:
    """The servers, their files and ports, for one invocation; starts more on demand (the
    resumed load's pair, the idle load's fresh ones), each put into `servers` as it starts so
    that the caller stops it whatever fails."""

    args: argparse.Namespace
    tmp: Path
    certs: CertFiles
    servers: dict[str, Server]
    no_tickets: Path  # the OpenSSL config that sends no tickets
    taskset_proxy: list[str]
    taskset_load: list[str]
    upstream_port: int = 0
    # Numbers the servers started afresh (the idle load's), whose files must not collide.
    serials: Iterator[int] = field(default_factory=itertools.count)

    @property
    def dualproxy_toml(self) -> Path:
        return self.tmp / "dualproxy.toml"

    def _start_nginx(
        self,
        name: str,
        block: str,
        workers: int,
        port: int,
        *,
        access_log: Path | None = None,
        no_tickets: bool = False,
    ) -> Server:
        nginx = tool_path("nginx")
        assert nginx is not None
        conf = nginx_conf(self.tmp, name, block, workers)
        log = self.tmp / f"{name}-error.log"
        base = [nginx, "-p", str(self.tmp), "-e", str(log), "-c", str(conf)]
        taskset = self.taskset_load if name == "upstream" else self.taskset_proxy
        server = start_server(
            name,
            [*taskset, *base],
            port,
            self.tmp / f"{name}-stderr.log",
            stop_command=[*base, "-s", "stop"],
            openssl_conf=self.no_tickets if no_tickets else None,
        )
        server.access_log = access_log
        self.servers[name] = server
        return server

    def start_upstream(self) -> Server:
        self.upstream_port = free_port()
        block = upstream_http_block(self.upstream_port)
        return self._start_nginx("upstream", block, 1, self.upstream_port)

    def start_nginx(self, name: str, *, tickets: bool = False) -> Server:
        """nginx as the proxy, --workers workers; `tickets`: session tickets on, with two
        ticket-key files made now (else no tickets, and the no-tickets OpenSSL config)."""
        port = free_port()
        access_log = self.tmp / f"{name}-access.log"
        access_log.touch()
        keys = make_ticket_key_files(self.tmp / f"{name}-keys") if tickets else []
        block = nginx_proxy_http_block(port, self.upstream_port, self.certs, access_log, keys)
        return self._start_nginx(
            name, block, self.args.workers, port, access_log=access_log, no_tickets=not tickets
        )

    def start_dualproxy(
        self,
        name: str,
        run: DualproxyRun,
        workers: int | None = None,
        *,
        folder: Path | None = None,
        upstream: bool = True,
    ) -> Server:
        """dualproxy with its own config file `<name>.toml` in `folder` (the lab's by default;
        the key and chain files are read from there), relaying to the upstream unless
        --placeholder or not `upstream`, --workers processes unless `workers` says."""
        port = free_port()
        upstream_port = None if self.args.placeholder or not upstream else self.upstream_port
        toml = (folder or self.tmp) / f"{name}.toml"
        toml.write_text(dualproxy_toml(port, upstream_port, workers or self.args.workers))
        here = Path(__file__).parent
        env: dict[str, str] = {}
        stats: Path | None = None
        if run == "shipped":
            command = [str(VENV_BIN / "dualproxy")]
        elif run == "no-tickets":
            command = [sys.executable, str(here / "serve_without_tickets.py")]
        else:
            command = [sys.executable, str(here / "serve_counting_sessions.py")]
            stats = self.tmp / f"{name}-sessions"
            stats.mkdir()
            env[SESSION_STATS_ENVIRONMENT] = str(stats)
        server = start_server(
            name,
            [*self.taskset_proxy, *command, "serve", "-c", str(toml)],
            port,
            self.tmp / f"{name}.log",
            openssl_conf=self.no_tickets if run == "no-tickets" else None,
            extra_env=env,
        )
        server.session_stats = stats
        self.servers[name] = server
        return server

    def stop(self, name: str) -> None:
        """Stop one server this lab started, then forget it (so that an interrupt while it
        stops leaves it to the caller's final stop)."""
        self.servers[name].stop()
        del self.servers[name]


def start_lab(args: argparse.Namespace, tmp: Path, servers: dict[str, Server]) -> Lab:
    """Certificates, configs, then upstream, nginx and dualproxy (and the resumed load's
    nginx-tickets and dualproxy-tickets), each listening when it returns. `servers` is filled
    as they start, so the caller can stop them whatever fails."""
    taskset_proxy: list[str] = []
    taskset_load: list[str] = []
    cpus = sorted(os.sched_getaffinity(0))
    if args.pin_cpus and len(cpus) > args.workers:
        # The proxies on the last --workers CPUs, everything else on the others.
        taskset_proxy = ["taskset", "-c", ",".join(map(str, cpus[-args.workers :]))]
        taskset_load = ["taskset", "-c", ",".join(map(str, cpus[: -args.workers]))]
    no_tickets = tmp / "openssl-no-tickets.cnf"
    no_tickets.write_text(NO_TICKETS_OPENSSL_CONF)
    lab = Lab(args, tmp, make_certs(tmp), servers, no_tickets, taskset_proxy, taskset_load)
    lab.start_upstream()
    lab.start_nginx("nginx")
    lab.start_dualproxy("dualproxy", "shipped" if args.dualproxy_default_tls else "no-tickets")
    if "resumed" in args.loads:
        lab.start_nginx("nginx-tickets", tickets=True)
        lab.start_dualproxy("dualproxy-tickets", "counting")
    for server in servers.values():
        wait_listening(server)
    return lab


def check_lab(lab: Lab, args: argparse.Namespace) -> tuple[str, dict[str, object]]:
    """Each proxy relays (curl gets the upstream's body), presents ECDSA P-256, and what it
    does about resumption; whether the load generators resume. Returns dualproxy's mode."""
    checks: dict[str, object] = {}
    modes: dict[str, str] = {}
    probes: dict[str, TlsProbe] = {}
    for proxy in PROXIES:
        port = lab.servers[proxy].port
        body = curl_body(port, lab.certs)
        probe = probes[proxy] = probe_tls(port, lab.certs)
        modes[proxy] = "proxy" if body == UPSTREAM_BODY else "placeholder"
        checks[proxy] = {"curl_body": body, "tls_probe": asdict(probe)}
        print(
            f"{proxy}: curl got {body.strip()!r} ({modes[proxy]}); {probe.certificate_key},"
            f" {probe.protocol} {probe.cipher}; ticket received: {probe.ticket_received},"
            f" resumed on reconnect: {probe.resumed_on_reconnect}",
            flush=True,
        )
    if modes["nginx"] != "proxy":
        raise BenchError(f"nginx did not return the upstream's body: {checks['nginx']}")
    for proxy in PROXIES:
        allowed = proxy == "dualproxy" and args.dualproxy_default_tls
        if probes[proxy].resumed_on_reconnect and not allowed:
            raise BenchError(
                f"{proxy} resumed a TLS session although resumption should be off: its"
                " new-connection figure would not be one of full handshakes"
            )
    if modes["dualproxy"] != "proxy":
        why = "as asked (--placeholder)" if args.placeholder else "(no relay yet?)"
        message = (
            f"dualproxy answered by itself {why}: its figures measure its TLS front and HTTP"
            " handling, without the upstream hop"
        )
        if args.require_proxy:
            raise BenchError(message)
        print(f"WARNING: {message}", flush=True)
    generators = probe_load_generators(lab.dualproxy_toml)
    checks["load_generators_vs_default_dualproxy_context"] = generators
    print(f"load generators vs dualproxy's default TLS context: {generators}", flush=True)
    return modes["dualproxy"], checks


def measure_rounds(lab: Lab, bench: Bench, args: argparse.Namespace) -> list[Run]:
    print("warm-up and calibration", flush=True)
    for proxy in PROXIES:
        bench.measure(proxy, "keepalive", -1, args.warmup)
        if "newconn" in args.loads:
            bench.calibrate(proxy, args.duration)
        bench.calibrate_h2(proxy, args.duration)
        if "resumed" in args.loads:
            bench.calibrate(proxy, args.duration, "resumed")
    print(
        f"h2load -n per run: {bench.newconn_requests}, HTTP/2: {bench.h2_requests};"
        f" new HTTP/2 connection batches: {bench.h2conn_repeats};"
        f" resumed: {bench.resumed_requests}",
        flush=True,
    )
    runs: list[Run] = []
    kinds: tuple[LoadKind, ...] = tuple(kind for kind in LOADS if kind in args.loads)
    for n in range(args.rounds):
        # Alternate who goes first, so a drift (thermal, a neighbour) hits both alike.
        for proxy in PROXIES if n % 2 == 0 else PROXIES[::-1]:
            for kind in kinds:
                for attempt in range(1 + args.noisy_retries):
                    if kind == "idle":
                        run = measure_idle(lab, bench, proxy, n)
                        what = (
                            f"  RSS {run.rss_before_kb / 1024:.1f} -> {run.rss_after_kb / 1024:.1f}"
                            f" MB, {run.rss_kb_per_connection:.1f} kB/conn"
                        )
                    else:
                        run = bench.measure(proxy, kind, n, args.duration)
                        what = ""
                    print(
                        f"round {n + 1}/{args.rounds} {proxy:9} {kind:9} {run.rate:9,.0f} req/s"
                        f"  server CPU {run.server_cpu_s:5.2f} s"
                        f"  {run.cpu_ms_per_request:.4f} ms/req  errors {run.errors}{what}"
                        f"  others' CPU {run.foreign_cpu_s:.2f} s  stolen {run.stolen_cpu_s:.2f} s"
                        f"{' NOISY' if run.noisy else ''}  server saw {run.server_view}",
                        flush=True,
                    )
                    if not run.noisy:
                        break
                    if attempt < args.noisy_retries:
                        print("  (noisy: measured again)", flush=True)
                runs.append(run)
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.no_install:
        ensure_debian_packages()
    for tool, package in DEBIAN_PACKAGES.items():
        if tool_path(tool) is None:
            raise BenchError(f"{tool} not found: apt-get install {package}")
    py_spy = ensure_py_spy() if args.profile and not args.no_install else str(VENV_BIN / "py-spy")
    started = datetime.now(UTC)
    out_dir = args.results_dir / started.strftime("%Y%m%dT%H%M%SZ")
    out_dir.mkdir(parents=True, exist_ok=True)
    if "idle" in args.loads:
        # This script holds the idle load's connections (and h2load's run beside it).
        raise_open_files_limit(args.idle_connections + 1024)
    tmp = Path(tempfile.mkdtemp(prefix="dualproxy-bench-"))
    servers: dict[str, Server] = {}
    try:
        lab = start_lab(args, tmp, servers)
        mode, checks = check_lab(lab, args)
        bench = Bench(lab.servers, args, lab.taskset_load)
        runs = measure_rounds(lab, bench, args)
        shares: list[ShareResult] = []
        if "resumed" in args.loads:
            print("resumption shares (dualproxy, a Python client)", flush=True)
            shares = measure_resumption_shares(lab)
        rows = summarize(runs, args.rounds)
        h2_ratios = h2_vs_keepalive(runs, args.rounds)
        tls = {p: next((r.tls for r in runs if r.proxy == p and r.tls), "") for p in PROXIES}
        noisy = sum(1 for r in runs if r.noisy)
        table = (
            f"dualproxy mode: {mode}; TLS as h2load saw it: nginx {tls['nginx']} |"
            f" dualproxy {tls['dualproxy']}\n"
            f"noisy runs (other processes busy > {NOISY_FOREIGN_SHARE:.0%} of the time, or"
            f" the hypervisor's steal > {NOISY_STOLEN_SHARE:.0%}): {noisy} of {len(runs)}\n"
            f"medians of {args.rounds} rounds; ratio = median of the per-round dualproxy/nginx;"
            " server CPU = utime+stime of the server's process tree\n" + format_table(rows, args)
        )
        if h2_ratios:
            ratio = statistics.median(h2_ratios)
            verdict = "MET" if ratio >= TARGET_H2_VS_KEEPALIVE else "NOT MET"
            table += (
                f"\ndualproxy HTTP/2 / its own HTTP/1.1 keep-alive, requests per CPU-second:"
                f" {ratio:.3f}x (per round {[round(x, 3) for x in h2_ratios]});"
                f" target >= {TARGET_H2_VS_KEEPALIVE:g}x: {verdict}"
            )
        if shares:
            table += (
                f"\nsessions resumed by dualproxy ({args.share_sessions} sessions each, the"
                " server's count):\n" + "\n".join(share.line() for share in shares)
            )
        if targets := issue16_lines(rows):
            table += "\n" + "\n".join(targets)
        print("\n" + table, flush=True)
        profiles: dict[str, str] = {}
        if args.profile:
            print("\nprofiling dualproxy with py-spy", flush=True)
            profiles = profile_dualproxy(bench, py_spy, out_dir, min(args.duration, 10))
            for kind, report in profiles.items():
                print(f"\n--- py-spy, {kind} ---\n{report}", flush=True)
        result = {
            "started": started.isoformat(),
            "command": [sys.executable, *sys.argv],
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "environment": tool_versions(),
            "pinning": {"proxies": lab.taskset_proxy, "load_and_upstream": lab.taskset_load},
            "dualproxy_mode": mode,
            "checks": checks,
            "summary": rows,
            "h2_vs_own_keepalive_per_round": h2_ratios,
            "resumption_shares": [asdict(s) | {"share": s.share} for s in shares],
            "runs": [r.as_json() for r in runs],
            "table": table,
            "profiles": profiles,
        }
        (out_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
        (out_dir / "table.txt").write_text(table + "\n")
        print(f"\nresults: {out_dir}", flush=True)
    finally:
        for server in reversed(servers.values()):
            server.stop()
        if args.keep_tmp:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _interrupt(signum: int, frame: object) -> None:
    # SIGTERM (timeout(1), a CI runner) would end Python without running any finally, leaving
    # the servers behind: unwind as for Ctrl-C instead, so every process gets stopped.
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
