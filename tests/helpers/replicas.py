"""`dualproxy serve` processes as replicas on loopback: started, asked (their admin listener),
restarted and stopped as an operator or a load balancer would; every wait bounded."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pytest

from helpers.pebble import free_port

DUALPROXY: Final = (sys.executable, "-m", "dualproxy")
# Bound of every wait here: generous for a shared, loaded machine; a healthy run takes a
# small fraction of it.
WAIT: Final = 30.0
# How often a wait looks again.
LOOK_INTERVAL: Final = 0.05


def wait_for(condition: Callable[[], object], what: str) -> None:
    """Until `condition()` is true, at most WAIT seconds (blocking)."""
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {WAIT} s waiting for {what}")
        time.sleep(LOOK_INTERVAL)


@dataclass
class Replica:
    """One `dualproxy serve -c config` with its TLS port and admin port fixed in its config,
    its stderr in `log` (appended to across restarts)."""

    name: str
    config: Path
    port: int
    admin: int
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @classmethod
    def beside(cls, folder: Path, name: str) -> Replica:
        """A replica whose config (NAME.toml, for the caller to write) and log are in
        `folder`, on two free loopback ports."""
        config, log = folder / f"{name}.toml", folder / f"{name}.log"
        return cls(name, config, free_port(), free_port(), log)

    def start(self) -> None:
        with self.log.open("ab") as log:  # the child keeps its own copy
            self.process = subprocess.Popen(
                [*DUALPROXY, "serve", "-c", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/readyz", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def status(self) -> dict[str, Any]:
        """Its /status.json."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/status.json", timeout=5) as r:
            data: dict[str, Any] = json.load(r)
        return data

    def canary(self) -> dict[str, Any]:
        """Its /status.json's canary."""
        canary: dict[str, Any] = self.status()["canary"]
        return canary

    def terminate(self) -> int:
        """SIGTERM, as systemd or Kubernetes stops it; its exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(WAIT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def start_all(replicas: list[Replica]) -> None:
    """Start every replica at once and wait until each is ready (its /readyz)."""
    for replica in replicas:
        replica.start()
    wait_for(lambda: all(r.ready() for r in replicas), "every replica ready")


def canary_resume(replica: Replica) -> str:
    """`dualproxy canary resume` asking `replica`'s admin listener; what it printed."""
    result = subprocess.run(
        [*DUALPROXY, "canary", "resume", "--admin", f"http://127.0.0.1:{replica.admin}"],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=True,
    )
    return result.stdout
