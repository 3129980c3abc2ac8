"""The admin listener of `dualproxy serve`: the evidence for people and for Prometheus, and
the canary's resume. A local JSON endpoint on `http.smallserver` (one request per connection,
bounded in size and time, Connection: close), answering from a `ServerView`.

    GET  /               the status page (statuspage.render_html)
    GET  /status.json    the same, for programs (evidence.Status.to_json, schema 1)
    GET  /status.txt     the same as text (what `dualproxy status` prints)
    GET  /metrics        Prometheus text format (metrics.py)
    GET  /healthz        200 while the process serves (a liveness probe)
    GET  /readyz         200 while it should get clients, 503 (with why) while it starts or
                         leaves: a load balancer's or Kubernetes' readiness check
    POST /canary/resume  run a halted canary again (`dualproxy canary resume`)

Who may ask. The listener is on loopback unless the config says admin.allow_non_loopback.
On loopback, every request must come from a loopback peer with a loopback Host (no DNS
rebinding) and without an Origin header (no web page), as the dev control endpoint's. On a
listener the operator opened up, each path has its own rule (`ROUTES`, `Allow`): the GETs
answer anyone who can reach it (firewall it) but no web page, while the resume, which changes
what clients are served, still takes only loopback peers and the same checks. A path we do not
have is refused (404) after the readers' rule. The health paths answer anyone who reaches
the listener, with no Host or Origin check (`Allow.PROBES`): a balancer's check names no host
(HAProxy's `option httpchk` is HTTP/1.0) or the listener's address, and they say nothing but
"ok" or why not.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import http.client
import json
import logging
import os
import socket
import stat
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final, Protocol
from urllib.parse import urlsplit

import trio

from dualproxy.config.names import ListenAddress
from dualproxy.config.schema import Config
from dualproxy.files import write_atomically
from dualproxy.http import smallserver
from dualproxy.http.errors import HttpRefusal
from dualproxy.http.smallserver import Answer, Request, json_answer
from dualproxy.ops import metrics, statuspage
from dualproxy.ops.evidence import ConnectionCounts, Evidence, KeyFacts, Status
from dualproxy.pinning.reports import ReportSummary
from dualproxy.rotation import policy
from dualproxy.tls.keystore import KeySnapshot

__all__ = [
    "BIND_RETRY_INTERVAL",
    "DEFAULT_URL",
    "ROUTES",
    "Admin",
    "AdminError",
    "Allow",
    "Asker",
    "Route",
    "ServerView",
    "fetch",
    "open_socket",
    "parse_url",
    "record_path",
    "recorded",
    "recorded_servers",
    "resume_canary",
    "route",
    "runtime_folder",
    "serve",
    "serve_when_possible",
    "status_of",
]

log = logging.getLogger("dualproxy")

DEFAULT_URL: Final = "http://127.0.0.1:9901"
# While the admin listener cannot bind its address, serving goes on and the bind is tried
# again this often, in seconds: a process being replaced frees its port within its drain
# (limits.shutdown_grace, 30 s by default), and a bind attempt costs nothing.
BIND_RETRY_INTERVAL: Final = 5.0
# Hex characters of the config path's SHA-256 in a record's name: 64 bits, no collision
# between the configs of one machine.
RECORD_NAME_CHARS: Final = 16
# Nothing we take has a body: the resume is a bare POST.
MAX_BODY_BYTES: Final = 1024
# What `dualproxy status` and `canary resume` wait for an answer: the status is built in
# milliseconds; this only bounds a server that hangs.
CLIENT_TIMEOUT: Final = 10.0
# An answer we read: the status page and metrics of a server with many keys stay far below.
MAX_ANSWER_BYTES: Final = 16 * 1024 * 1024
# The end of a refusal's message: how to ask instead.
_ADVICE: Final = "use `dualproxy status` or `dualproxy canary resume`, or type the address"


class AdminError(Exception):
    """The admin listener could not be asked, or refused: says why and what to do."""


class ServerView(Protocol):
    """What the admin listener reads from a server (`serve.server.Server` is one): its config
    and keys, its evidence (whose canary the resume acts on), its clock and its counts."""

    @property
    def config(self) -> Config: ...

    @property
    def snapshot(self) -> KeySnapshot: ...

    @property
    def evidence(self) -> Evidence: ...

    @property
    def active_connections(self) -> int: ...

    @property
    def idle_connections(self) -> int: ...

    @property
    def reclaimed_connections(self) -> int: ...

    @property
    def processes(self) -> int:
        """Processes serving clients, each with its own connection limits (the workers)."""
        ...

    @property
    def refused_per_client(self) -> int: ...

    @property
    def reloads_ok(self) -> int: ...

    @property
    def reloads_failed(self) -> int: ...

    def not_ready(self) -> str | None:
        """Why a load balancer should send no clients now (starting, leaving); None when it
        should."""
        ...

    def now(self) -> datetime:
        """The policy's clock."""
        ...

    def report_summary(self) -> ReportSummary | None:
        """The pin-failure reports' counts; None without [reports]."""
        ...


def status_of(server: ServerView) -> Status:
    """The server's evidence now, with its keys' facts and the rotation's phase."""
    config, snapshot = server.config, server.snapshot
    rotation = config.rotation
    now = server.now()
    identities = config.identities()  # "single", or "old" and "new"; a key in none: standby
    keys = []
    for name in config.key_order():
        key = snapshot.keys[name]  # the snapshot holds every configured key
        role = next((ident for ident, names in identities.items() if name in names), "standby")
        keys.append(KeyFacts(name, role, key.pin, key.algorithm, key.not_before, key.not_after))
    return server.evidence.status(
        now=now,
        phase=policy.phase(rotation, now, window_closed=server.evidence.window.closed),
        rotation=rotation,
        keys=keys,
        active_connections=server.active_connections,
        reloads_ok=server.reloads_ok,
        reloads_failed=server.reloads_failed,
        pin_reports=server.report_summary(),
        connections=ConnectionCounts(
            max_connections=config.limits.max_connections,
            max_per_client=config.limits.max_connections_per_client,
            open=server.active_connections,
            idle=server.idle_connections,
            reclaimed=server.reclaimed_connections,
            refused_per_client=server.refused_per_client,
            processes=server.processes,
        ),
    )


# --- who may ask what ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Asker:
    """Where a request comes from, as the allow rules see it."""

    from_loopback: bool  # the peer is on this machine
    on_loopback: bool  # the listener is on loopback (else opened: admin.allow_non_loopback)


class Allow(enum.Enum):
    """Who may ask for a path. On a loopback listener every rule takes only this machine's
    requests with a loopback Host and no Origin; they differ on a listener opened up."""

    # Loopback peers only, with those checks, wherever the listener is: what changes what
    # clients are served.
    THIS_MACHINE = "this machine"
    # Anyone who can reach an opened listener (the operator firewalls it; a scraper names the
    # host as it likes, so no Host check), but no web page: what only reads.
    READERS = "readers"
    # Anyone who reaches the listener, whatever Host and Origin say: a balancer's or
    # Kubernetes' health check, on paths that tell nothing but whether to send clients.
    PROBES = "probes"

    def check(self, request: Request, asker: Asker, does: str) -> None:
        """HttpRefusal (403, saying why) unless `asker` may send `request`, which `does` what
        the message names ("resume the canary")."""
        if self is Allow.PROBES:
            return
        if self is Allow.THIS_MACHINE and not asker.from_loopback:
            raise HttpRefusal(403, f"only this machine may {does}: {_ADVICE}", fault="client")
        if asker.on_loopback or self is Allow.THIS_MACHINE:
            smallserver.refuse_web_pages(request, _ADVICE)
        elif smallserver.origin_problem(request) is not None:
            # On a listener opened to the network a Host check would refuse the operator's
            # own scraper; a web page's cross-origin read is refused.
            raise HttpRefusal(403, "refused a request from a web page (Origin)", fault="client")


@dataclass(frozen=True, slots=True)
class Route:
    """What one path answers: to which method, for whom, doing what, and how."""

    method: bytes
    allow: Allow
    does: str  # for a refusal: "only this machine may <does>"
    answer: Callable[[Admin], Answer]


def route(request: Request, asker: Asker) -> Route:
    """The route that answers `request` from `asker`; HttpRefusal when none does: 403 (see
    Allow), 404 (no such path), 405 (another method; with Allow)."""
    found = ROUTES.get(request.path)
    if found is None:
        # After the readers' rule: what a web page cannot read, it cannot probe for either.
        Allow.READERS.check(request, asker, "ask")
        raise HttpRefusal(404, f"not found: {_usage()}", fault="client")
    found.allow.check(request, asker, found.does)
    if request.method != found.method:
        usage = f"{found.method.decode()} {request.path.decode()}"
        raise HttpRefusal(
            405, f"method not allowed: {usage}", fault="client", headers=((b"allow", found.method),)
        )
    return found


def _usage() -> str:
    """Every route, by method: "GET /, /metrics; POST /canary/resume"."""
    paths: dict[bytes, list[str]] = {}
    for path, found in ROUTES.items():
        paths.setdefault(found.method, []).append(path.decode())
    return "; ".join(f"{method.decode()} {', '.join(each)}" for method, each in paths.items())


# --- the answers ---------------------------------------------------------------------------


class Admin:
    """The admin listener's answers for one server."""

    def __init__(self, server: ServerView) -> None:
        self.server = server
        self._registry = metrics.registry_for(lambda: status_of(server))

    def answer(self, request: Request, asker: Asker) -> Answer:
        """What `request` from `asker` gets; HttpRefusal when it is not answered (see `route`)."""
        return route(request, asker).answer(self)

    def status(self) -> Status:
        return status_of(self.server)

    def scrape(self) -> bytes:
        """The metrics, in Prometheus text format."""
        return metrics.exposition(self._registry)


def _page(admin: Admin) -> Answer:
    page = statuspage.render_html(admin.status()).encode()
    # The page has no script and loads nothing: say so, so that an injected one would not run.
    csp = b"default-src 'none'; style-src 'unsafe-inline'; img-src data:"
    return Answer(
        200,
        page,
        content_type=b"text/html; charset=utf-8",
        headers=((b"content-security-policy", csp),),
    )


def _status_json(admin: Admin) -> Answer:
    return json_answer(200, admin.status().to_json())


def _status_text(admin: Admin) -> Answer:
    text = statuspage.render_text(admin.status()).encode()
    return Answer(200, text, content_type=b"text/plain; charset=utf-8")


def _metrics(admin: Admin) -> Answer:
    return Answer(200, admin.scrape(), content_type=metrics.CONTENT_TYPE.encode())


_TEXT: Final = b"text/plain; charset=utf-8"


def _healthz(admin: Admin) -> Answer:
    # Answered by the process's event loop: a process that hangs does not answer at all.
    return Answer(200, b"ok\n", content_type=_TEXT)


def _readyz(admin: Admin) -> Answer:
    why = admin.server.not_ready()
    if why is None:
        return Answer(200, b"ready\n", content_type=_TEXT)
    return Answer(503, f"not ready: {why}\n".encode(), content_type=_TEXT)


def _resume(admin: Admin) -> Answer:
    judge = admin.server.evidence.canary
    resumed = judge.resume()
    text = (
        "canary resumed: hint-less clients in the canary get the new key again; its samples"
        " start from zero"
        if resumed
        else "the canary was not halted; nothing changed"
    )
    return json_answer(200, {"resumed": resumed, "halted": judge.halted, "text": text})


# Path -> what answers it and who may ask (see Allow); the 404 lists them in this order.
ROUTES: Final[Mapping[bytes, Route]] = {
    b"/": Route(b"GET", Allow.READERS, "read the status page", _page),
    b"/status.json": Route(b"GET", Allow.READERS, "read the status", _status_json),
    b"/status.txt": Route(b"GET", Allow.READERS, "read the status", _status_text),
    b"/metrics": Route(b"GET", Allow.READERS, "read the metrics", _metrics),
    b"/healthz": Route(b"GET", Allow.PROBES, "check the health", _healthz),
    b"/readyz": Route(b"GET", Allow.PROBES, "check the readiness", _readyz),
    b"/canary/resume": Route(b"POST", Allow.THIS_MACHINE, "resume the canary", _resume),
}


# --- the listener ----------------------------------------------------------------------------


async def serve_when_possible(
    address: ListenAddress,
    server: ServerView,
    *,
    record_for: Path | None = None,
    task_status: trio.TaskStatus[tuple[str, int] | None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The admin listener at `address`, which must never stop the TLS front: an address that
    cannot be bound (a previous process still holds it) is logged, serving goes on without
    it, and the bind is tried again every BIND_RETRY_INTERVAL until it succeeds. Reports the
    bound address, or None when the first bind failed. With `record_for` (the config file),
    the bound address is recorded where `dualproxy status` finds it (`record_path`)."""
    failures = 0
    while True:
        try:
            sock = open_socket(address)
        except OSError as exc:
            failures += 1
            if failures == 1:
                task_status.started(None)
                log.error(
                    "%s; serving TLS without the admin listener, trying again every %g s",
                    exc.strerror,
                    BIND_RETRY_INTERVAL,
                )
            await trio.sleep(BIND_RETRY_INTERVAL)
            continue
        break
    bound = _bound(sock)
    if failures:
        log.info("admin listener: %s is free now", address)
    written = ""
    record = record_path(record_for) if record_for is not None else None
    try:
        if record is not None:
            written = _write_record(record, bound, record_for)
        if not failures:
            task_status.started(bound)
        await serve(sock, server)
    finally:
        if record is not None and written:
            _remove_record(record, written)


def _bound(sock: socket.socket) -> tuple[str, int]:
    host, port = sock.getsockname()[:2]
    return str(host), int(port)


# --- where `dualproxy status` finds a server's admin listener --------------------------------


def runtime_folder() -> Path:
    """Where running servers record their admin listener's address: $XDG_RUNTIME_DIR/dualproxy
    (per user, cleared at logout or boot), else dualproxy-UID in the temporary folder. Only we
    may write there: `_private_folder` refuses one another user could."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base:
        return Path(base) / "dualproxy"
    return Path(tempfile.gettempdir()) / f"dualproxy-{os.geteuid()}"


def record_path(config_file: Path) -> Path:
    """The record of the server started with `config_file` (one per config: two instances
    with different configs never share one)."""
    key = hashlib.sha256(str(config_file.absolute()).encode()).hexdigest()[:RECORD_NAME_CHARS]
    return runtime_folder() / f"admin-{key}.json"


def _private_folder(folder: Path) -> str | None:
    """Make `folder` (mode 0700) or check it: why it cannot be trusted, or None."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        status = folder.lstat()
    except OSError as exc:
        return f"{folder}: {exc.strerror}"
    if not stat.S_ISDIR(status.st_mode):
        return f"{folder} is not a folder"
    if status.st_uid != os.geteuid() or stat.S_IMODE(status.st_mode) & 0o077:
        return (
            f"{folder} is not ours alone (owner uid {status.st_uid}, mode"
            f" {stat.S_IMODE(status.st_mode):04o}); remove it"
        )
    return None


def _write_record(path: Path, bound: tuple[str, int], config_file: Path | None) -> str:
    problem = _private_folder(path.parent)
    if problem is not None:
        log.warning("admin listener: not recorded for `dualproxy status` (%s)", problem)
        return ""
    text = json.dumps(
        {
            "address": str(ListenAddress(*bound)),
            "pid": os.getpid(),
            "config": str(config_file.absolute()) if config_file is not None else None,
        }
    )
    try:
        write_atomically(path, text.encode(), mode=0o600)
    except OSError as exc:
        log.warning("admin listener: not recorded for `dualproxy status` (%s)", exc)
        return ""
    return text


def _remove_record(path: Path, written: str) -> None:
    """Remove the record if it is still ours (a newer process may have written its own)."""
    with contextlib.suppress(OSError):
        if path.read_text() == written:
            path.unlink()


def recorded(config_file: Path) -> tuple[str, int] | None:
    """The admin address a running server started with `config_file` recorded, or None (no
    record, or its process has ended)."""
    found = _read_record(record_path(config_file))
    return found[0] if found is not None else None


def recorded_servers() -> list[tuple[tuple[str, int], str]]:
    """Every running server's recorded admin address, with its config file."""
    folder = runtime_folder()
    if _private_folder(folder) is not None:
        return []
    out = []
    for path in sorted(folder.glob("admin-*.json")):
        found = _read_record(path)
        if found is not None:
            out.append(found)
    return out


def _read_record(path: Path) -> tuple[tuple[str, int], str] | None:
    if _private_folder(path.parent) is not None:
        return None
    try:
        data = json.loads(path.read_text())
        pid, address = int(data["pid"]), parse_url(str(data["address"]))
        config = str(data.get("config") or "")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None  # left behind by a process that was killed
    except PermissionError:
        pass  # alive, as another user: not ours to question
    return address, config


def open_socket(address: ListenAddress) -> socket.socket:
    """The listening socket, bound before the event loop starts (a port in use is reported
    first). Raises OSError naming the setting."""
    try:
        return smallserver.open_socket(address.host, address.port)
    except OSError as exc:
        raise OSError(
            exc.errno,
            f"cannot listen on {address} (admin.address): {exc.strerror}; pick another port"
            " or set [admin] enabled = false",
        ) from exc


async def serve(
    sock: socket.socket,
    server: ServerView,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer on `sock` until cancelled (see the module docstring)."""
    on_loopback = smallserver.listens_on_loopback(sock)
    admin = Admin(server)

    async def handle(stream: trio.SocketStream) -> None:
        asker = Asker(from_loopback=smallserver.peer_is_loopback(stream), on_loopback=on_loopback)

        async def respond(request: Request) -> Answer:
            return admin.answer(request, asker)

        await smallserver.answer_one_request(
            stream, respond, max_body=MAX_BODY_BYTES, what="admin listener"
        )

    log.info("admin listener on http://%s/ (status page, /metrics)", _format(sock))
    await smallserver.serve_socket(sock, handle, task_status=task_status)


def _format(sock: socket.socket) -> str:
    name = sock.getsockname()
    return str(ListenAddress(str(name[0]), int(name[1])))


# --- the client: `dualproxy status`, `dualproxy canary resume` ------------------------------


def parse_url(text: str) -> tuple[str, int]:
    """http://HOST:PORT (or HOST:PORT) of an admin listener; ValueError otherwise."""
    url = text if "://" in text else f"http://{text}"
    parts = urlsplit(url)
    try:
        port = 80 if parts.port is None else parts.port
    except ValueError:
        raise ValueError(f"{text!r} has an invalid port") from None
    if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
        raise ValueError(f"{text!r} is not an admin URL like {DEFAULT_URL}")
    return parts.hostname, port


def fetch(address: tuple[str, int], path: str, *, method: str = "GET") -> bytes:
    """One request to the admin listener; its body on 200, else AdminError with its error."""
    host, port = address
    where = str(ListenAddress(host, port))
    connection = http.client.HTTPConnection(host, port, timeout=CLIENT_TIMEOUT)
    try:
        connection.request(method, path, headers={"Host": where})
        response = connection.getresponse()
        data = response.read(MAX_ANSWER_BYTES)
    except ConnectionRefusedError:
        raise AdminError(
            f"nothing answers at http://{where}/: is `dualproxy serve` running, with its admin"
            " listener there? (see [admin] address; pass --admin URL)"
        ) from None
    except (OSError, http.client.HTTPException) as exc:
        raise AdminError(f"the admin listener at http://{where}/ did not answer: {exc}") from None
    finally:
        connection.close()
    if response.status != 200:
        try:
            problem = json.loads(data).get("error")
        except (ValueError, AttributeError):
            problem = None
        raise AdminError(
            f"http://{where}{path} answered {response.status}: {problem or data[:200]!r}"
        )
    return data


def resume_canary(address: tuple[str, int]) -> str:
    """Ask the server to resume its canary; the server's text on what happened."""
    data = fetch(address, "/canary/resume", method="POST")
    try:
        text = json.loads(data)["text"]
    except (ValueError, KeyError, TypeError):
        raise AdminError(f"not an answer from dualproxy's admin listener: {data[:200]!r}") from None
    return str(text)
