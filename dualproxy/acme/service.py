"""ACME beside a running server: its challenges answered on the server's listeners, and its
certificates renewed in the background.

Theory of operation. `dualproxy serve` with [acme] starts this service next to what serves,
in the same nursery (as it starts the admin listener), before it listens. A single process
(`serve_beside`) does all of it; with workers ([process] workers), each worker answers the
challenges (`answer_beside`) and the supervisor alone renews (`renew_beside`):

- the challenge board (challenges.ChallengeBoard, refreshed from the challenge folder every
  keystore.reload_poll_interval) becomes the server's `TlsAlpnResponder`: the server's
  handshake path hands it every ClientHello, and a CA validating a pending tls-alpn-01
  challenge gets the challenge certificate; the server itself knows nothing of ACME. Each
  worker has its own board on the same folder, as each replica of a shared state folder has;
- the plain-HTTP listener (acme.http_listen, or systemd's) is opened once, by the process
  that owns the listeners, and answers http-01 challenges, redirecting everything else to
  the server's https port. With workers the supervisor hands it to every worker (one socket
  they all accept from: a CA's validations and redirects are a trickle) and closes it with
  the TLS listeners when it drains;
- once the server (or every worker) listens, each ACME-managed key is renewed when
  renewal.plan says so: an order (issuer.obtain) whose challenges are checked through the
  server's own listeners, the chain written over the key's, and a reload (the supervisor's
  checks the files once, then every worker reloads them), which serves it to the next
  handshake. A failure is logged and retried later (renewal.retry_delay); the current chain
  keeps serving.

Why the supervisor renews rather than a worker: it outlives every worker, so a worker that
dies (even mid-order: the others, and its replacement, whose board reads the folder before
it accepts, answer the CA) loses no order and no retry schedule; its reload is the one that
reaches every worker; and it already offers what the renewals read of a server (config,
keys, clock, evidence). It handles no client traffic for this: the CA's connections reach
the workers, and the supervisor only connects out (the CA, its own listeners on loopback).

The service stops when its nursery is cancelled, which the caller does when the server's run
ends: an order in flight is abandoned, its challenges withdrawn, its lock released.
"""

from __future__ import annotations

import logging
import os
import random
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final

import trio

from dualproxy.acme import renewal
from dualproxy.acme.challenges import ChallengeBoard, serve_http
from dualproxy.acme.issuer import (
    AcmeError,
    challenge_folder,
    grace_start_for,
    obtain,
    renewal_window,
    retired,
    validity_of,
)
from dualproxy.config.errors import OperatorError
from dualproxy.config.names import ListenAddress
from dualproxy.config.schema import AcmeConfig, Config, KeyConfig
from dualproxy.config.times import brief_time
from dualproxy.serve.listeners import bound_address, open_listeners
from dualproxy.serve.server import Server
from dualproxy.serve.supervisor import Supervisor

__all__ = ["answer_beside", "renew_beside", "serve_beside"]

log = logging.getLogger("dualproxy.acme")

# While renewals are off ([acme] renew = false, or no [acme] after a reload): how often to
# look again, in seconds; a reload may turn them on.
RENEWALS_OFF_RECHECK: Final = 60.0

# Who renews: a single process's server, or the supervisor of workers.
Renewer = Server | Supervisor


async def serve_beside(
    server: Server,
    *,
    inherited: Sequence[socket.socket] = (),
    task_status: trio.TaskStatus[tuple[str, int] | None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """What a single-process `serve` runs beside `server` for [acme]: the answers and the
    renewals (see the module docstring). Reports readiness once the board answers and the
    plain-HTTP listener is bound (its bound address, or None without acme.http_listen); start
    it before the server's run(), so that both answer from the server's first client on.
    `inherited`: the http-01 listener's sockets when systemd opened them (serve.activation),
    used instead of acme.http_listen."""
    http_listeners = await _open_http_listeners(server.config, inherited)
    try:
        async with trio.open_nursery() as nursery:
            board = await nursery.start(answer_beside, server, http_listeners)
            nursery.start_soon(_renew_once_listening, server, board, http_listeners)
            task_status.started(_first_bound(http_listeners))
    finally:
        for listener in http_listeners:
            listener.close()


async def answer_beside(
    server: Server,
    http_listeners: Sequence[socket.socket],
    *,
    task_status: trio.TaskStatus[ChallengeBoard] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer the challenges published in the [acme] challenge folder on `server`'s
    listeners: tls-alpn-01 on its TLS port (its board as its responder), http-01 and the https
    redirect on `http_listeners` once it listens. Reports the board once it has read the
    folder: start it before the server's run(), so that its first client is answered (a
    worker started while an order is pending answers the CA at once)."""
    board = ChallengeBoard(challenge_folder(_acme_of(server.config)))
    await board.refresh_async()
    try:
        async with trio.open_nursery() as nursery:
            server.tls_alpn_responder = board
            nursery.start_soon(board.watch, server.config.keystore.reload_poll_interval)
            nursery.start_soon(_serve_http_once_listening, server, board, http_listeners)
            task_status.started(board)
    finally:
        server.tls_alpn_responder = None


async def renew_beside(
    supervisor: Supervisor,
    *,
    inherited: Sequence[socket.socket] = (),
    task_status: trio.TaskStatus[tuple[str, int] | None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """What the supervisor of workers runs beside them for [acme]: the renewals, which only
    it places; its workers answer the challenges (`answer_beside`, cli.worker). Opens the
    plain-HTTP listener (or takes systemd's, `inherited`) and hands it to the supervisor,
    whose workers serve it; reports its bound address (None without one). Start it before
    the supervisor's run()."""
    http_listeners = await _open_http_listeners(supervisor.config, inherited)
    supervisor.acme_http = list(http_listeners)
    try:
        task_status.started(_first_bound(http_listeners))
        await _renew_once_listening(supervisor, None, http_listeners)
    finally:
        for listener in http_listeners:  # the supervisor closed them already when it ran
            listener.close()


async def _open_http_listeners(
    config: Config, inherited: Sequence[socket.socket]
) -> list[socket.socket]:
    """The http-01 listener: systemd's sockets when it passed some, else acme.http_listen
    opened (with [listen] reuse_port, as the TLS port), else none."""
    http_listen = _acme_of(config).http_listen
    if inherited or http_listen is None:
        return list(inherited)
    return await open_listeners([http_listen], config.listen.reuse_port)


def _acme_of(config: Config) -> AcmeConfig:
    if config.acme is None:
        raise ValueError("acme.service: the config has no [acme] table")
    return config.acme


def _first_bound(listeners: Sequence[socket.socket]) -> tuple[str, int] | None:
    return bound_address(listeners[0]) if listeners else None


async def _serve_http_once_listening(
    server: Server, board: ChallengeBoard, http_listeners: Sequence[socket.socket]
) -> None:
    """The https redirect needs the server's bound TLS port (its config may say port 0)."""
    if not http_listeners:
        return
    bound = await server.wait_listening()
    async with trio.open_nursery() as nursery:
        for listener in http_listeners:
            nursery.start_soon(serve_http, listener, board, bound[0][1], server.config.listen)


async def _renew_once_listening(
    renewer: Renewer, board: ChallengeBoard | None, http_listeners: Sequence[socket.socket]
) -> None:
    """The renewals check their challenges through the bound listeners (the config may say
    port 0), so they start once those serve. `board`: the renewer's own, refreshed at once
    when it publishes (the supervisor has none: its workers' boards poll the folder)."""
    bound = await renewer.wait_listening()
    probes = _Probes(
        tls=ListenAddress(*bound[0]),
        http=ListenAddress(*bound_address(http_listeners[0])) if http_listeners else None,
    )
    if isinstance(renewer, Supervisor):  # which process of the machine orders, once
        acme = renewer.config.acme
        renews = acme is not None and acme.renew
        log.info(
            "acme: the supervisor (pid %d) %s; the workers answer the CA's challenges",
            os.getpid(),
            "renews the certificates" if renews else "places no order ([acme] renew = false)",
        )
    await _renew_forever(renewer, board, probes)


@dataclass
class _KeyMemory:
    point: float
    failures: int = 0
    last_attempt: datetime | None = None
    window: renewal.Window | None = None
    window_checked: datetime | None = None


@dataclass(frozen=True)
class _Probes:
    """Where this server's own listeners are bound (its config may say port 0)."""

    tls: ListenAddress
    http: ListenAddress | None


async def _renew_forever(server: Renewer, board: ChallengeBoard | None, probes: _Probes) -> None:
    clock: Callable[[], datetime] = server.now
    memory: dict[str, _KeyMemory] = {}
    while True:
        config = server.config
        acme = config.acme
        if acme is None or not acme.renew:
            await trio.sleep(RENEWALS_OFF_RECHECK)  # a reload may turn it on
            continue
        policy = renewal.Policy.from_config(acme)
        plans = []
        for key in config.acme_keys():
            if retired(config, key.name, clock(), window_closed=server.evidence.window.closed):
                continue
            state = memory.setdefault(key.name, _KeyMemory(point=random.random()))
            plan = await _renew_one(server, config, key, state, policy, board, clock, probes)
            plans.append(plan)
        now = clock()
        wake = renewal.wake_time(plans, policy, now)
        await trio.sleep(max((wake - now).total_seconds(), 0.0))


async def _renew_one(
    server: Renewer,
    config: Config,
    key: KeyConfig,
    memory: _KeyMemory,
    policy: renewal.Policy,
    board: ChallengeBoard | None,
    clock: Callable[[], datetime],
    probes: _Probes,
) -> renewal.Plan:
    acme = config.acme
    assert acme is not None
    loaded = server.snapshot.keys.get(key.name)
    leaf = loaded.leaf if loaded is not None else None
    now = clock()
    if leaf is not None and (
        memory.window_checked is None or now >= memory.window_checked + policy.recheck_interval
    ):
        memory.window = await renewal_window(acme, leaf)
        memory.window_checked = now
    state = renewal.KeyState(
        validity=validity_of(leaf),
        window=memory.window,
        point=memory.point,
        grace_start=grace_start_for(config, key.name),
        failures=memory.failures,
        last_attempt=memory.last_attempt,
    )
    plan = renewal.plan(state, policy, now)
    if plan.urgency is renewal.Urgency.EXPIRED:
        log.error("acme: the certificate of %s has EXPIRED; clients fail now", key.name)
    elif plan.urgency is renewal.Urgency.SOON and leaf is not None:
        log.warning(
            "acme: the certificate of %s expires at %s; renewal has not succeeded yet",
            key.name,
            brief_time(leaf.not_valid_after_utc, zone=" UTC"),
        )
    if not plan.attempt_now(now):
        return plan
    log.info("acme: renewing %s (%s)", key.name, plan.reason)
    memory.last_attempt = now
    try:
        ordered = await obtain(
            config, key, board=board, tls_probe=probes.tls, http_probe=probes.http, served=leaf
        )
    except Exception as exc:
        # AcmeError and OperatorError say what to do; anything else is our bug, with its
        # traceback. Either way the current chain keeps serving and a retry is scheduled.
        if not isinstance(exc, AcmeError | OperatorError):
            log.exception("acme: renewing %s failed unexpectedly", key.name)
        memory.failures += 1
        retry = now + renewal.retry_delay(memory.failures, policy)
        log.error(
            "acme: renewing %s failed (attempt %d; still serving the current chain; next"
            " try at %s): %s",
            key.name,
            memory.failures,
            f"{retry:%Y-%m-%d %H:%M:%S} UTC",
            exc,
        )
    else:
        memory.failures = 0
        memory.window_checked = None  # a new certificate has its own window
        if ordered:
            log.info("acme: new certificate for %s written to %s", key.name, key.chain)
        await server.reload(f"acme: new certificate for {key.name}")
        loaded = server.snapshot.keys.get(key.name)
        leaf = loaded.leaf if loaded is not None else leaf
    now = clock()
    return renewal.plan(
        renewal.KeyState(
            validity=validity_of(leaf),
            window=memory.window,
            point=memory.point,
            grace_start=state.grace_start,
            failures=memory.failures,
            last_attempt=memory.last_attempt,
        ),
        policy,
        now,
    )
