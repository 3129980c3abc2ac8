"""The dev bench's control surface: a small HTTP endpoint on loopback, and the client that
`dualproxy dev switch` uses to talk to it.

Switching the scenario changes what every client of the bench is served, so only this
machine may do it, and not a web page open in its browser:
- the endpoint listens on a loopback address only (`parse_admin_address` refuses any other),
  and answers loopback peers only;
- it answers only requests whose Host names a loopback address or `localhost`: a page that
  rebinds its own DNS name to 127.0.0.1 still sends that name (DNS rebinding);
- it refuses every request carrying an Origin header: browsers send one with every
  cross-origin fetch, and with every form POST or PUT, so no page can switch behind your back.
  `dualproxy dev switch` and curl send none.
Each connection carries one request, bounded in size and time, and ends with our answer.

The API (JSON answers, each with Connection: close):
    GET /scenario        200 {"scenario": "grace", "scenarios": [...]}
    PUT /scenario NAME   200 {"scenario": NAME, "previous": "grace", "text": "..."} where text
                         says what the bench's curl commands get now; 400 for an unknown name,
                         500 when the switch failed (the previous scenario keeps serving)
The running bench writes its address to `admin-address` in its folder, which is where
`dualproxy dev switch` looks for it, and removes it when it stops.

The serve command's admin listener (`admin.py`) is built from the same parts: `Refused`,
`answer_one_request`, `refuse_web_pages` and `peer_is_loopback`.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from http import HTTPStatus
from pathlib import Path
from typing import Final, Protocol

import h11
import trio

from dualproxy.config.names import is_loopback_host
from dualproxy.files import write_atomically
from dualproxy.tls.streams import receive_h11_request

__all__ = [
    "ADMIN_REQUEST_TIMEOUT",
    "DEFAULT_ADMIN_ADDRESS",
    "ControlError",
    "Refused",
    "SwitchError",
    "Switchboard",
    "answer_one_request",
    "format_address",
    "get_scenario",
    "handle",
    "open_socket",
    "parse_admin_address",
    "peer_is_loopback",
    "read_address_file",
    "receive_request",
    "refuse_web_pages",
    "remove_address_file",
    "send_answer",
    "serve",
    "switch",
    "write_address_file",
]

log = logging.getLogger("dualproxy")

# Next to the bench's default port (8443): easy to remember, and free on a developer machine.
DEFAULT_ADMIN_ADDRESS: Final = "127.0.0.1:8444"
# A local client sends its whole request at once; one that has not within this long is not
# one of ours, and must not hold a task.
ADMIN_REQUEST_TIMEOUT: Final = 5.0
# Our client's request head is about 150 bytes; 8 KiB takes any tool's (curl's, a browser's).
ADMIN_MAX_HEAD_BYTES: Final = 8 * 1024
# The body is a scenario name.
ADMIN_MAX_BODY_BYTES: Final = 1024
# One read from the connection.
RECEIVE_SIZE: Final = 4 * 1024
# What `dualproxy dev switch` waits for an answer: a switch loads a few small key files
# (milliseconds); this only bounds a bench that hangs.
CLIENT_TIMEOUT: Final = 10.0


class ControlError(Exception):
    """The switch did not happen: says why and what to do (no bench running, wrong address,
    an answer that is not the bench's)."""


class SwitchError(Exception):
    """The bench refused or failed a switch; the message is the answer's error text."""


class Switchboard(Protocol):
    """What the endpoint controls: the running bench."""

    @property
    def scenario(self) -> str: ...

    @property
    def scenarios(self) -> Sequence[str]: ...

    async def switch(self, name: str) -> str:
        """Serve scenario `name` from the next connection on; returns what to try now.
        Raises SwitchError (unknown name, material that would not load)."""
        ...


# --- addresses ---------------------------------------------------------------------------


def parse_admin_address(text: str) -> tuple[str, int]:
    """HOST:PORT on loopback ("localhost" is 127.0.0.1); ValueError saying what is allowed."""
    host, sep, port_text = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"{text!r} is not HOST:PORT, e.g. {DEFAULT_ADMIN_ADDRESS}")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is None or not address.is_loopback:
        raise ValueError(
            f"{text!r}: the admin endpoint switches what every client of the bench gets, so it"
            " listens on loopback only: use 127.0.0.1:PORT or [::1]:PORT"
        )
    return str(address), int(port_text)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def write_address_file(path: Path, host: str, port: int) -> str:
    """Tell `dualproxy dev switch` where the running bench listens; returns what was written."""
    text = format_address(host, port) + "\n"
    write_atomically(path, text.encode("ascii"))
    return text


def remove_address_file(path: Path, written: str) -> None:
    """Remove the file if it still says what we wrote (another bench may have taken over)."""
    try:
        if path.read_text(encoding="ascii") == written:
            path.unlink()
    except OSError:
        pass  # already gone


def read_address_file(path: Path) -> tuple[str, int]:
    """Where the bench using that folder listens; ControlError when none is running there."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise ControlError(
            f"{path} does not exist: no dev bench is running with --dir {path.parent};"
            " start one with `dualproxy dev` (or pass the bench's --dir or --admin)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ControlError(f"{path}: cannot read the bench's admin address: {exc}") from None
    try:
        return parse_admin_address(text)
    except ValueError as exc:
        raise ControlError(f"{path}: {exc}; restart the bench to rewrite it") from None


def open_socket(host: str, port: int) -> socket.socket:
    """The endpoint's listening socket, bound before the event loop starts (so a port in use
    is reported before anything else runs). Raises OSError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)


# --- the endpoint ------------------------------------------------------------------------


async def serve(
    sock: socket.socket,
    board: Switchboard,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer on `sock` (from open_socket, on loopback) until cancelled."""
    host = sock.getsockname()[0]
    if not ipaddress.ip_address(str(host).split("%", 1)[0]).is_loopback:
        raise ValueError(f"the admin endpoint must listen on loopback, not on {host}")
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))

    async def handler(stream: trio.SocketStream) -> None:
        if peer_is_loopback(stream):
            await handle(stream, board)
        else:  # cannot happen on a loopback listener; if it does, say nothing
            await trio.aclose_forcefully(stream)

    await trio.serve_listeners(handler, [listener], task_status=task_status)


async def handle(stream: trio.abc.Stream, board: Switchboard) -> None:
    """Answer the one request on `stream` (from a loopback peer), then close it."""

    async def respond(request: h11.Request, body: bytes) -> Answer:
        refuse_web_pages(request, "switch with `dualproxy dev switch SCENARIO`")
        status, answer = await _answer(request, body, board)
        return status, _JSON, json.dumps(answer, indent=2).encode() + b"\n", []

    await answer_one_request(
        stream, max_body=ADMIN_MAX_BODY_BYTES, respond=respond, what="admin endpoint"
    )


# An answer: status, content type, body, and headers besides those send_answer writes.
Answer = tuple[int, bytes, bytes, list[tuple[bytes, bytes]]]
_JSON: Final = b"application/json"


async def answer_one_request(
    stream: trio.abc.Stream,
    *,
    max_body: int,
    respond: Callable[[h11.Request, bytes], Awaitable[Answer]],
    what: str,
) -> None:
    """Read the one request on `stream` (bounded in size and time), send what `respond` makes
    of it, then close: a Refused as its status and {"error": why}, our own bug as a 500 (it
    costs this request, not the server: serve_listeners would end with it)."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=ADMIN_MAX_HEAD_BYTES)
    try:
        request: tuple[h11.Request, bytes] | None = None
        with trio.move_on_after(ADMIN_REQUEST_TIMEOUT):
            request = await receive_request(stream, conn, max_body=max_body)
        if request is None:
            return
        status, content_type, body, extra = await respond(*request)
        await send_answer(stream, conn, status, body, content_type, extra)
    except Refused as refused:
        body = json.dumps({"error": refused.message}, indent=2).encode() + b"\n"
        await send_answer(stream, conn, refused.status, body, _JSON, refused.headers)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client left
    except Exception:
        log.exception("%s: internal error", what)
        body = b'{"error": "internal error: see the log"}\n'
        await send_answer(stream, conn, 500, body, _JSON)
    finally:
        with trio.move_on_after(ADMIN_REQUEST_TIMEOUT):
            await stream.aclose()


class Refused(Exception):
    """The request is not answered as asked: its status and why (the client's fault)."""

    def __init__(
        self, status: int, message: str, headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers  # e.g. a 405's Allow


def peer_is_loopback(stream: trio.SocketStream) -> bool:
    try:
        host = str(stream.socket.getpeername()[0]).split("%", 1)[0]
        address = ipaddress.ip_address(host)
    except (OSError, ValueError):
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


async def receive_request(
    stream: trio.abc.Stream, conn: h11.Connection, *, max_body: int
) -> tuple[h11.Request, bytes]:
    """The request and its body, or Refused; raises BrokenResourceError if the client left."""
    body = bytearray()

    def take(data: bytes) -> None:
        body.extend(data)
        if len(body) > max_body:
            raise Refused(413, f"the request body is too large: at most {max_body} bytes")

    try:
        request = await receive_h11_request(stream, conn, receive_size=RECEIVE_SIZE, on_body=take)
    except h11.RemoteProtocolError as exc:
        raise Refused(exc.error_status_hint, f"cannot read the request: {exc}") from None
    if request is None:
        raise trio.BrokenResourceError("the client closed before its request was complete")
    return request, bytes(body)


def refuse_web_pages(request: h11.Request, advice: str) -> None:
    """Loopback Host, no Origin (see the module docstring for why); else Refused, the message
    ending with `advice` (how to do it instead)."""
    origins = [value for name, value in request.headers if name == b"origin"]
    if origins:
        raise Refused(
            403,
            f"refused a request from a web page (Origin: {origins[0].decode('latin-1')}): {advice}",
        )
    hosts = [value.decode("latin-1") for name, value in request.headers if name == b"host"]
    if len(hosts) != 1 or not _is_loopback_host(hosts[0]):
        raise Refused(
            403,
            f"Host {', '.join(hosts)!r} is not this machine's loopback: the admin endpoint"
            " answers only requests for localhost, 127.0.0.1 or [::1]",
        )


def _is_loopback_host(host: str) -> bool:
    """A Host value naming loopback (localhost, 127.0.0.0/8, [::1]), with or without a port."""
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        port_ok = rest == "" or (rest.startswith(":") and rest[1:].isdigit())
    else:
        name, colon, port = host.partition(":")
        port_ok = not colon or port.isdigit()
    return port_ok and is_loopback_host(name)


async def _answer(
    request: h11.Request, body: bytes, board: Switchboard
) -> tuple[int, dict[str, object]]:
    target = request.target.split(b"?", 1)[0]
    if target != b"/scenario":
        raise Refused(404, "not found: the admin endpoint has GET and PUT /scenario")
    if request.method == b"GET":
        return 200, {"scenario": board.scenario, "scenarios": list(board.scenarios)}
    if request.method != b"PUT":
        raise Refused(
            405,
            "method not allowed: GET /scenario, or PUT /scenario with a name",
            [(b"allow", b"GET, PUT")],
        )
    name = body.decode("utf-8", "replace").strip()
    previous = board.scenario
    try:
        text = await board.switch(name)
    except SwitchError as exc:
        status = 400 if name not in board.scenarios else 500
        raise Refused(status, str(exc)) from None
    return 200, {"scenario": name, "previous": previous, "text": text}


async def send_answer(
    stream: trio.abc.Stream,
    conn: h11.Connection,
    status: int,
    body: bytes,
    content_type: bytes,
    extra_headers: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    """The one response on this connection (then closed), unless one was already sent."""
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *extra_headers,
    ]
    reason = HTTPStatus(status).phrase.encode()
    data = conn.send(h11.Response(status_code=status, headers=headers, reason=reason)) or b""
    data += conn.send(h11.Data(data=body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    # A client that left or stopped reading loses its answer; nothing else depends on it.
    with (
        trio.move_on_after(ADMIN_REQUEST_TIMEOUT),
        contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
    ):
        await stream.send_all(data)


# --- the client (`dualproxy dev switch`) -------------------------------------------------


def switch(address: tuple[str, int], name: str, *, timeout: float = CLIENT_TIMEOUT) -> str:
    """Ask the bench at `address` to serve scenario `name`; the bench's text on what to try.

    Raises ControlError (no bench there, or it refused: the message says why).
    """
    answer = _call(address, "PUT", name.encode(), timeout)
    text = answer.get("text")
    if not isinstance(text, str):
        raise ControlError(f"{format_address(*address)} answered without a text: {answer}")
    return text


def get_scenario(address: tuple[str, int], *, timeout: float = CLIENT_TIMEOUT) -> str:
    """The scenario the bench at `address` serves now; raises ControlError."""
    scenario = _call(address, "GET", None, timeout).get("scenario")
    if not isinstance(scenario, str):
        raise ControlError(f"{format_address(*address)} did not name its scenario")
    return scenario


def _call(
    address: tuple[str, int], method: str, body: bytes | None, timeout: float
) -> dict[str, object]:
    where = format_address(*address)
    connection = http.client.HTTPConnection(*address, timeout=timeout)
    try:
        connection.request(method, "/scenario", body=body, headers={"Host": where})
        response = connection.getresponse()
        data = response.read(ADMIN_MAX_HEAD_BYTES)
    except ConnectionRefusedError:
        raise ControlError(
            f"no dev bench answers at {where}: is `dualproxy dev` running (with this --dir)?"
        ) from None
    except (OSError, http.client.HTTPException) as exc:
        raise ControlError(f"the dev bench at {where} did not answer: {exc}") from None
    finally:
        connection.close()
    try:
        answer = json.loads(data)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise ControlError(f"{where} is not a dev bench's admin endpoint (HTTP {response.status})")
    if response.status != 200:
        raise ControlError(f"the dev bench refused: {answer.get('error', answer)}")
    return answer
