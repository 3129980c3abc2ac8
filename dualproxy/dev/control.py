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
Each connection carries one request, bounded in size and time (`smallserver.answer_one_request`),
and ends with our answer.

The API (JSON answers, each with Connection: close):
    GET /scenario        200 {"scenario": "grace", "scenarios": [...]}
    PUT /scenario NAME   200 {"scenario": NAME, "previous": "grace", "text": "..."} where text
                         says what the bench's curl commands get now; 400 for an unknown name,
                         500 when the switch failed (the previous scenario keeps serving)
The running bench writes its address to `admin-address` in its folder, which is where
`dualproxy dev switch` looks for it, and removes it when it stops.

The reading, answering and who-may-ask checks are `http.smallserver`'s, which the serve
command's admin listener (`ops.admin`) shares.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Final, Protocol

import trio

from dualproxy.config.names import ListenAddress
from dualproxy.files import write_atomically
from dualproxy.http.errors import HttpRefusal
from dualproxy.http.smallserver import (
    Answer,
    Request,
    answer_one_request,
    json_answer,
    listens_on_loopback,
    open_socket,
    refuse_web_pages,
    serve_socket,
)

__all__ = [
    "DEFAULT_ADMIN_ADDRESS",
    "ControlError",
    "SwitchError",
    "Switchboard",
    "get_scenario",
    "handle",
    "open_socket",
    "parse_admin_address",
    "read_address_file",
    "remove_address_file",
    "serve",
    "switch",
    "write_address_file",
]

# Next to the bench's default port (8443): easy to remember, and free on a developer machine.
DEFAULT_ADMIN_ADDRESS: Final = "127.0.0.1:8444"
# The body is a scenario name.
ADMIN_MAX_BODY_BYTES: Final = 1024
# What `dualproxy dev switch` waits for an answer: a switch loads a few small key files
# (milliseconds); this only bounds a bench that hangs.
CLIENT_TIMEOUT: Final = 10.0
# An answer the client reads: ours are a few hundred bytes of JSON.
MAX_ANSWER_BYTES: Final = 8 * 1024


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


def write_address_file(path: Path, host: str, port: int) -> str:
    """Tell `dualproxy dev switch` where the running bench listens; returns what was written."""
    text = str(ListenAddress(host, port)) + "\n"
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


# --- the endpoint ------------------------------------------------------------------------


async def serve(
    sock: socket.socket,
    board: Switchboard,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer on `sock` (from open_socket, on loopback) until cancelled."""
    if not listens_on_loopback(sock):
        host = sock.getsockname()[0]
        raise ValueError(f"the admin endpoint must listen on loopback, not on {host}")

    async def handler(stream: trio.SocketStream) -> None:
        await handle(stream, board)

    await serve_socket(sock, handler, task_status=task_status)


async def handle(stream: trio.abc.Stream, board: Switchboard) -> None:
    """Answer the one request on `stream` (from a loopback peer), then close it."""

    async def respond(request: Request) -> Answer:
        refuse_web_pages(request, "switch with `dualproxy dev switch SCENARIO`")
        status, answer = await _answer(request, board)
        return json_answer(status, answer)

    await answer_one_request(stream, respond, max_body=ADMIN_MAX_BODY_BYTES, what="admin endpoint")


async def _answer(request: Request, board: Switchboard) -> tuple[int, dict[str, object]]:
    if request.path != b"/scenario":
        raise HttpRefusal(
            404, "not found: the admin endpoint has GET and PUT /scenario", fault="client"
        )
    if request.method == b"GET":
        return 200, {"scenario": board.scenario, "scenarios": list(board.scenarios)}
    if request.method != b"PUT":
        raise HttpRefusal(
            405,
            "method not allowed: GET /scenario, or PUT /scenario with a name",
            fault="client",
            headers=((b"allow", b"GET, PUT"),),
        )
    name = request.body.decode("utf-8", "replace").strip()
    previous = board.scenario
    try:
        text = await board.switch(name)
    except SwitchError as exc:
        status = 400 if name not in board.scenarios else 500
        raise HttpRefusal(status, str(exc), fault="client") from None
    return 200, {"scenario": name, "previous": previous, "text": text}


# --- the client (`dualproxy dev switch`) -------------------------------------------------


def switch(address: tuple[str, int], name: str, *, timeout: float = CLIENT_TIMEOUT) -> str:
    """Ask the bench at `address` to serve scenario `name`; the bench's text on what to try.

    Raises ControlError (no bench there, or it refused: the message says why).
    """
    answer = _call(address, "PUT", name.encode(), timeout)
    text = answer.get("text")
    if not isinstance(text, str):
        raise ControlError(f"{ListenAddress(*address)} answered without a text: {answer}")
    return text


def get_scenario(address: tuple[str, int], *, timeout: float = CLIENT_TIMEOUT) -> str:
    """The scenario the bench at `address` serves now; raises ControlError."""
    scenario = _call(address, "GET", None, timeout).get("scenario")
    if not isinstance(scenario, str):
        raise ControlError(f"{ListenAddress(*address)} did not name its scenario")
    return scenario


def _call(
    address: tuple[str, int], method: str, body: bytes | None, timeout: float
) -> dict[str, object]:
    where = str(ListenAddress(*address))
    connection = http.client.HTTPConnection(*address, timeout=timeout)
    try:
        connection.request(method, "/scenario", body=body, headers={"Host": where})
        response = connection.getresponse()
        data = response.read(MAX_ANSWER_BYTES)
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
