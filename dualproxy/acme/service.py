"""ACME beside a running server: its challenges answered on the server's listeners, and its
certificates renewed in the background (`serve_beside`).

Theory of operation. `dualproxy serve` with [acme] starts this service next to its `Server`,
in the same nursery (as it starts the admin listener), before the server listens:

- the challenge board (challenges.ChallengeBoard, refreshed from the challenge folder every
  keystore.reload_poll_interval) becomes the server's `TlsAlpnResponder`: the server's
  handshake path hands it every ClientHello, and a CA validating a pending tls-alpn-01
  challenge gets the challenge certificate; the server itself knows nothing of ACME;
- the plain-HTTP listener (acme.http_listen) is bound here and answers http-01 challenges,
  redirecting everything else to the server's https port;
- once the server listens, each ACME-managed key is renewed when renewal.plan says so: an
  order (issuer.obtain) whose challenges are checked through the server's own listeners, the
  chain written over the key's, and a reload of the server, which serves it to the next
  handshake. A failure is logged and retried later (renewal.retry_delay); the current chain
  keeps serving.

The service stops when its nursery is cancelled, which the caller does when the server's run
ends.
"""

from __future__ import annotations

import logging
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
from dualproxy.config.schema import Config, KeyConfig
from dualproxy.config.times import brief_time
from dualproxy.serve.listeners import bound_address, open_listeners
from dualproxy.serve.server import Server

__all__ = ["serve_beside"]

log = logging.getLogger("dualproxy.acme")

# While renewals are off ([acme] renew = false, or no [acme] after a reload): how often to
# look again, in seconds; a reload may turn them on.
RENEWALS_OFF_RECHECK: Final = 60.0


async def serve_beside(
    server: Server,
    *,
    inherited: Sequence[socket.socket] = (),
    task_status: trio.TaskStatus[tuple[str, int] | None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """What `serve` runs beside `server` for [acme] (see the module docstring). Reports
    readiness once the board answers and the plain-HTTP listener is bound (its bound address,
    or None without acme.http_listen); start it before the server's run(), so that both
    answer from the server's first client on. `inherited`: the http-01 listener's sockets when
    systemd opened them (serve.activation), used instead of acme.http_listen."""
    acme = server.config.acme
    if acme is None:
        raise ValueError("serve_beside: the server's config has no [acme] table")
    board = ChallengeBoard(challenge_folder(acme))
    await board.refresh_async()
    http_listeners = list(inherited)
    if not http_listeners and acme.http_listen is not None:
        http_listeners = await open_listeners([acme.http_listen], server.config.listen.reuse_port)
    try:
        async with trio.open_nursery() as nursery:
            server.tls_alpn_responder = board
            nursery.start_soon(board.watch, server.config.keystore.reload_poll_interval)
            nursery.start_soon(_once_listening, server, board, http_listeners)
            task_status.started(bound_address(http_listeners[0]) if http_listeners else None)
    finally:
        server.tls_alpn_responder = None
        for listener in http_listeners:
            listener.close()


async def _once_listening(
    server: Server, board: ChallengeBoard, http_listeners: Sequence[socket.socket]
) -> None:
    """The https redirect and the renewals need the server's bound TLS address (its config
    may say port 0)."""
    bound = await server.wait_listening()
    tls = ListenAddress(*bound[0])
    http = ListenAddress(*bound_address(http_listeners[0])) if http_listeners else None
    async with trio.open_nursery() as nursery:
        for listener in http_listeners:
            nursery.start_soon(serve_http, listener, board, tls.port, server.config.listen)
        nursery.start_soon(_renew_forever, server, board, _Probes(tls=tls, http=http))


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


async def _renew_forever(server: Server, board: ChallengeBoard, probes: _Probes) -> None:
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
    server: Server,
    config: Config,
    key: KeyConfig,
    memory: _KeyMemory,
    policy: renewal.Policy,
    board: ChallengeBoard,
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
