"""The admin listener of `dualproxy serve`: the evidence for people and for Prometheus, and
the canary's resume. Built from devcontrol's parts (one request per connection, bounded in
size and time, Connection: close).

    GET  /               the status page (statuspage.render_html)
    GET  /status.json    the same, for programs (evidence.Status.to_json, schema 1)
    GET  /status.txt     the same as text (what `dualproxy status` prints)
    GET  /metrics        Prometheus text format (metrics.py)
    POST /canary/resume  run a halted canary again (`dualproxy canary resume`)

Who may ask. The listener is on loopback unless the config says admin.allow_non_loopback.
On loopback, every request must come from a loopback peer with a loopback Host (no DNS
rebinding) and without an Origin header (no web page), as devcontrol's. On a listener the
operator opened up, the GETs answer anyone who can reach it (firewall it), while the resume,
which changes what clients are served, still takes only loopback peers and the same checks.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

import h11
import trio

from dualproxy.config.names import ListenAddress
from dualproxy.dev.control import (
    Answer,
    Refused,
    answer_one_request,
    peer_is_loopback,
    refuse_web_pages,
)
from dualproxy.dev.control import open_socket as devcontrol_socket
from dualproxy.ops import metrics, statuspage
from dualproxy.ops.evidence import KeyFacts, Status
from dualproxy.rotation import policy

if TYPE_CHECKING:
    from dualproxy.serve.server import Server

__all__ = [
    "DEFAULT_URL",
    "AdminError",
    "fetch",
    "open_socket",
    "parse_url",
    "resume_canary",
    "serve",
    "status_of",
]

log = logging.getLogger("dualproxy")

DEFAULT_URL: Final = "http://127.0.0.1:9901"
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


def status_of(server: Server) -> Status:
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
        phase=policy.phase(rotation, now),
        rotation=rotation,
        keys=keys,
        active_connections=server.active_connections,
        reloads_ok=server.reloads_ok,
        reloads_failed=server.reloads_failed,
        pin_reports=server.report_summary(),
    )


def open_socket(address: ListenAddress) -> socket.socket:
    """The listening socket, bound before the event loop starts (a port in use is reported
    first). Raises OSError naming the setting."""
    try:
        return devcontrol_socket(address.host, address.port)
    except OSError as exc:
        raise OSError(
            exc.errno,
            f"cannot listen on {address} (admin.address): {exc.strerror}; pick another port"
            " or set [admin] enabled = false",
        ) from exc


async def serve(
    sock: socket.socket,
    server: Server,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer on `sock` until cancelled (see the module docstring)."""
    host = str(sock.getsockname()[0]).split("%", 1)[0]
    loopback = ipaddress.ip_address(host).is_loopback
    registry = metrics.registry_for(lambda: status_of(server))
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))

    async def handler(stream: trio.SocketStream) -> None:
        from_loopback = peer_is_loopback(stream)
        if loopback and not from_loopback:  # cannot happen on a loopback listener
            await trio.aclose_forcefully(stream)
            return
        await _handle(stream, server, lambda: metrics.exposition(registry), from_loopback, loopback)

    log.info("admin listener on http://%s/ (status page, /metrics)", _format(sock))
    await trio.serve_listeners(handler, [listener], task_status=task_status)


def _format(sock: socket.socket) -> str:
    name = sock.getsockname()
    return str(ListenAddress(str(name[0]), int(name[1])))


async def _handle(
    stream: trio.abc.Stream,
    server: Server,
    scrape: Callable[[], bytes],
    from_loopback: bool,
    on_loopback: bool,
) -> None:
    async def respond(request: h11.Request, _body: bytes) -> Answer:
        _check_asker(request, on_loopback=on_loopback, from_loopback=from_loopback)
        return _answer(request, server, scrape)

    await answer_one_request(
        stream, max_body=MAX_BODY_BYTES, respond=respond, what="admin listener"
    )


_GET_PATHS: Final = (b"/", b"/status.json", b"/status.txt", b"/metrics")


def _check_asker(request: h11.Request, *, on_loopback: bool, from_loopback: bool) -> None:
    """Who may ask what (see the module docstring); Refused when the asker may not."""
    changes = request.target.startswith(b"/canary/")
    if changes and not from_loopback:
        raise Refused(403, f"only this machine may resume the canary: {_ADVICE}")
    if on_loopback or changes:
        refuse_web_pages(request, _ADVICE)
    elif any(name == b"origin" for name, _ in request.headers):
        # On a listener opened to the network a Host check would refuse the operator's own
        # scraper (it names the host as it likes); a web page's cross-origin read is refused.
        raise Refused(403, "refused a request from a web page (Origin)")


def _answer(request: h11.Request, server: Server, scrape: Callable[[], bytes]) -> Answer:
    target = request.target.split(b"?", 1)[0]
    if target == b"/canary/resume":
        if request.method != b"POST":
            raise Refused(405, "method not allowed: POST /canary/resume", [(b"allow", b"POST")])
        return _resume(server)
    if target not in _GET_PATHS:
        raise Refused(
            404, "not found: GET /, /status.json, /status.txt, /metrics; POST /canary/resume"
        )
    if request.method != b"GET":
        raise Refused(405, "method not allowed: GET", [(b"allow", b"GET")])
    if target == b"/metrics":
        return 200, metrics.CONTENT_TYPE.encode(), scrape(), []
    status = status_of(server)
    if target == b"/status.json":
        body = json.dumps(status.to_json(), indent=2).encode() + b"\n"
        return 200, b"application/json", body, []
    if target == b"/status.txt":
        return 200, b"text/plain; charset=utf-8", statuspage.render_text(status).encode(), []
    page = statuspage.render_html(status).encode()
    # The page has no script and loads nothing: say so, so that an injected one would not run.
    csp = b"default-src 'none'; style-src 'unsafe-inline'; img-src data:"
    return 200, b"text/html; charset=utf-8", page, [(b"content-security-policy", csp)]


def _resume(server: Server) -> Answer:
    judge = server.evidence.canary
    resumed = judge.resume()
    text = (
        "canary resumed: hint-less clients in the canary get the new key again; its samples"
        " start from zero"
        if resumed
        else "the canary was not halted; nothing changed"
    )
    body = json.dumps({"resumed": resumed, "halted": judge.halted, "text": text}, indent=2)
    return 200, b"application/json", body.encode() + b"\n", []


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
