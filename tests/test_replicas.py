"""Two `dualproxy serve` processes on loopback that share one state folder ([state] dir), as
replicas behind a balancer share one volume; real TLS clients ask each directly. What they
agree on through it: the canary's halt (one halts, the other follows within its poll
interval; a restart comes back halted; `dualproxy canary resume` on either resumes both) and
the session-ticket keys (a ticket one issued resumes on the other). Behind HAProxy:
tests/test_e2e_haproxy.py. Every wait is bounded; no assertion is about time."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import pytest
import trustme
from helpers.clients import Resuming, tls_get
from helpers.configs import write_config
from helpers.keys import KeyFiles, make_key
from helpers.replicas import Replica, canary_resume, start_all, wait_for
from helpers.rotation import open_canary_window

pytestmark = pytest.mark.e2e

# The replicas look at their files, the halt record among them, this often: short, so that
# the test waits little (the default is 2 s).
POLL_INTERVAL: Final = 0.2
# At most this many clients failing the new key's pin before the canary halts (3-4 do).
MAX_FAILING_CLIENTS: Final = 40


@pytest.fixture
def keys(ca: trustme.CA, tmp_path: Path) -> tuple[KeyFiles, KeyFiles]:
    return make_key(ca, tmp_path / "certs", "k2026a"), make_key(ca, tmp_path / "certs", "k2026b")


@contextmanager
def replicas(
    keys: tuple[KeyFiles, KeyFiles], tmp_path: Path, *, state: str | None, canary: bool
) -> Iterator[tuple[Replica, Replica]]:
    """Two replicas, each with its own config file (its ports) in one folder, with the state
    folder `state` named in both (None: the default, which only the halt record uses);
    with `canary`, a rotation whose canary takes every hint-less client."""
    rotation = open_canary_window(100) if canary else None
    extra: dict[str, Any] = {"keystore": {"reload_poll_interval": POLL_INTERVAL}}
    if state is not None:
        extra["state"] = {"dir": state}
    pair = []
    for name in ("a", "b"):
        replica = Replica.beside(tmp_path, name)
        write_config(
            replica.config,
            list(keys) if canary else [keys[0]],
            rotation=rotation,
            listen=f"127.0.0.1:{replica.port}",
            extra={**extra, "admin": {"address": f"127.0.0.1:{replica.admin}"}},
        )
        pair.append(replica)
    a, b = pair
    try:
        start_all(pair)
        yield a, b
    finally:
        a.stop()
        b.stop()


def pin(replica: Replica, cafile: Path, *, request: bool = True) -> str:
    """The pin of the key a new client of `replica` gets (with a GET, or leaving after the
    handshake as a pinning client that refuses the key does)."""
    return tls_get("127.0.0.1", replica.port, cafile=cafile, request=request).pin


def test_a_halt_on_one_replica_reaches_the_other_survives_a_restart_and_a_resume_clears_it(
    keys: tuple[KeyFiles, KeyFiles], cafile: Path, tmp_path: Path
) -> None:
    old, new = keys
    with replicas(keys, tmp_path, state="state", canary=True) as (a, b):
        assert pin(b, cafile) == new.pin  # the canary runs on b
        for _ in range(MAX_FAILING_CLIENTS):  # a's clients fail the new key's pin
            if a.canary()["halted"]:
                break
            pin(a, cafile, request=False)
        wait_for(lambda: a.canary()["halted"], "a to halt its canary")
        assert a.canary()["halted_by"] is None  # its own evidence

        wait_for(lambda: b.canary()["halted"], "b to take a's halt")
        canary = b.canary()
        assert canary["halted_by"].endswith(f" pid {a.pid}")
        assert canary["why"] == a.canary()["why"]
        assert pin(b, cafile) == old.pin  # b's canary sends nobody to the new key now

        assert b.terminate() == 0
        b.start()  # b restarts: halted before it serves anyone
        wait_for(b.ready, "b to serve again")
        assert b.canary()["halted"]
        assert pin(b, cafile) == old.pin

        assert "canary resumed" in canary_resume(b)
        wait_for(lambda: not a.canary()["halted"], "a to take b's resume")
        assert pin(a, cafile) == new.pin
        assert pin(b, cafile) == new.pin
        resumed_by = f" pid {b.pid}"  # the restarted b
    record = json.loads((tmp_path / "state" / "canary-halt.json").read_text())
    assert (record["canary"], record["generation"]) == ("resumed", 2)
    assert record["by"].endswith(resumed_by)
    a_log = a.log.read_text()
    assert f"canary resumed by replica {record['by']}" in a_log
    assert "Traceback" not in a_log + b.log.read_text()


@pytest.mark.parametrize("state", ["state", None], ids=["state-dir-named", "no-state-dir"])
def test_a_session_ticket_issued_by_one_replica_resumes_on_the_other(
    keys: tuple[KeyFiles, KeyFiles], cafile: Path, tmp_path: Path, state: str | None
) -> None:
    """With [state] dir named, the replicas keep their ticket keys in it: every reconnect,
    to either replica, resumes. Without, each keeps its keys in memory, and a ticket resumes
    only where it was issued."""
    with replicas(keys, tmp_path, state=state, canary=False) as (a, b):
        client = Resuming(cafile)
        first = client.connect_blocking(a.port)
        resumed = [client.connect_blocking(replica.port) for replica in [b, a] * 3]
    assert not first
    assert resumed == [True] * 6 if state is not None else not any(resumed)
    if state is not None:
        assert (tmp_path / state / "ticket-keys").is_file()
