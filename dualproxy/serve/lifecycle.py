"""A server over time: reloads, the drain, and the tasks that run beside the connections.

Theory of operation.

**Material.** What a server serves from, as one value: the config, its key snapshot (the SSL
contexts), the relay settings (with the upstream pool) and the local endpoints. A reload
loads all of it in a worker thread, all or nothing, and the server swaps it in at once
(`Reloadable.install`): connections already open keep what they started with, the next
handshake gets the new material. A reload never changes the listen addresses (the listeners
stay; a warning says to restart), and keeps the upstream pool unless the upstream or the
pool's own limits changed; a replaced pool closes its idle connections, and those in use
finish their exchange first.

**Reloads** run one at a time (`Reloads`): the file poller, SIGHUP, ACME and the dev bench may
ask together, and two loads in flight could finish out of order and leave the older files'
material in place. A reload that fails (a bad config, an unusable key, or a bug of ours) is
logged and counted, and the previous material keeps serving. Every reload, whoever asked,
compares the watched files' signature (inode, size, mtime, mode) with the one taken *before*
the last reload read them, and records its own: so a file that changes while it loads is seen
at the next poll, and a SIGHUP reload is not followed by the poller's reload of the same
files.

**Only what changed is rebuilt.** A change of the manifest file alone re-reads the manifest
and nothing else. Any other reload reads the config and the keys, then keeps every identity
whose keys are exactly the ones it serves (the same key, the same chain): its SSL context,
and with it the session-ticket key and the tickets issued, stays; a config edit or a manifest
re-sign never turns every client's next connection into a full handshake. (A context that is
rebuilt, a renewal's, takes the server's session-ticket keys, tls.tickets, which outlive
every reload: tickets issued before still resume where the same keys are served.) The log line says
what changed: which files, which keys got a new certificate (its serial) or a new key, which
contexts were rebuilt.

**Stopping** (`Shutdown`): the drain (SIGTERM, `Server.drain`) stops accepting (the listeners
close), closes idle keep-alive connections at once, gives requests in flight
limits.shutdown_grace to finish (with `Connection: close`), then cancels what is left; a
second SIGTERM cancels every connection at once.

**Beside the connections**, each in the server's nursery and each bounded: the file poller,
idle upstream connections pruned, relayed clients that left looked for, the manifest's expiry
looked at, and signals (SIGHUP reloads, SIGTERM drains).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Final, Protocol

import trio

from dualproxy.config.errors import OperatorError
from dualproxy.config.loader import load as load_config
from dualproxy.config.schema import AcmeConfig, Config, ManifestConfig
from dualproxy.config.times import brief_time
from dualproxy.http.relay import DEPARTURE_CHECK_SECONDS, Departures, Drain, RelaySettings
from dualproxy.pinning import endpoints, manifest
from dualproxy.rotation.policy import pin_role
from dualproxy.serve.closing import close_pool
from dualproxy.tls import keystore
from dualproxy.tls.keystore import KeySnapshot

__all__ = [
    "IDLE_PRUNE_WITHOUT_UPSTREAM",
    "MANIFEST_EXPIRY_CHECK_INTERVAL",
    "Controllable",
    "FilesSignature",
    "Loader",
    "ManifestWatch",
    "Material",
    "Reloadable",
    "Reloads",
    "Shutdown",
    "acme_restart_needed",
    "changed_files",
    "describe_changes",
    "files_signature",
    "keep_unchanged",
    "prune_idle_upstream",
    "read_files",
    "watch_departures",
    "watch_signals",
]

log = logging.getLogger("dualproxy")

# How often to look again for an [upstream] to prune while none is configured (a reload may
# add one); idle pools are pruned every half pool_idle_timeout.
IDLE_PRUNE_WITHOUT_UPSTREAM: Final = 30.0
# How often `serve` looks at the served manifest's expiry (a warning before it, an error
# after): the warning window is days long, so a minute is prompt and costs nothing.
MANIFEST_EXPIRY_CHECK_INTERVAL: Final = 60.0

# (path, inode, size, mtime in ns, mode) of each watched file; -1s for one that is missing.
FilesSignature = tuple[tuple[str, int, int, int, int], ...]
# How a reload reads the config file and its keys, given the config served now (blocking: it
# runs in a worker thread). `read_files` unless the server was given another.
Loader = Callable[[Config], tuple[Config, KeySnapshot]]


@dataclass(frozen=True, slots=True)
class Material:
    """What a server serves from; a reload swaps all of it at once."""

    config: Config
    snapshot: KeySnapshot
    relay: RelaySettings | None  # with config.upstream
    local: endpoints.LocalEndpoints | None  # the paths answered here ([manifest], [reports])


class Reloadable(Protocol):
    """A server, as its reloads see it."""

    @property
    def material(self) -> Material:
        """What it serves now."""
        ...

    def install(self, material: Material, why: str) -> None:
        """Serve `material` from now on (and say so in the log)."""
        ...


def read_files(config: Config) -> tuple[Config, KeySnapshot]:
    """The config file `config` was read from, read again (the same config when it was not
    read from a file), and its keys."""
    fresh = load_config(config.path) if config.path is not None else config
    return fresh, keystore.load_snapshot(fresh)


def files_signature(config: Config) -> FilesSignature:
    """The watched files' signature (blocking: a stat per file)."""
    signature = []
    for path in config.watched_files():
        try:
            st = path.stat()
            signature.append((str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode))
        except OSError:
            signature.append((str(path), -1, -1, -1, -1))
    return tuple(signature)


def acme_restart_needed(old: AcmeConfig | None, new: AcmeConfig | None) -> str | None:
    """What a reload changed of [acme] that only a restart applies, in words, or None."""
    if old is None or new is None:
        return None if old is new else f"[acme] {'added' if new is not None else 'removed'}"
    if old.http_listen != new.http_listen:
        return "acme.http_listen changed"
    if old.account_key.parent != new.account_key.parent:
        return "the ACME folder (acme.account_key's: its challenges and lock) changed"
    return None


def changed_files(seen: FilesSignature, now: FilesSignature) -> tuple[Path, ...]:
    """The watched files whose entry differs between two signatures (added, removed,
    replaced, rewritten), in `now`'s order, then those only `seen` had."""
    before = {entry[0]: entry for entry in seen}
    after = {entry[0]: entry for entry in now}
    changed = [path for path, entry in after.items() if before.get(path) != entry]
    changed += [path for path in before if path not in after]
    return tuple(Path(path) for path in changed)


def _signature_for(config: Config, before: FilesSignature) -> FilesSignature:
    """`config`'s watched files as `before` saw them (taken before a reload read them); a
    file `before` did not watch (a path the reloaded config names anew) as it is now."""
    known = {entry[0]: entry for entry in before}
    fresh = files_signature(config)
    return tuple(known.get(entry[0], entry) for entry in fresh)


def keep_unchanged(current: KeySnapshot, loaded: KeySnapshot) -> KeySnapshot:
    """`loaded`, with every identity whose keys equal those `current` serves for it taken
    from `current` (its SSL context, so its session tickets, survive the reload); `current`
    itself when nothing differs at all."""
    identities = {
        name: current.identities[name]
        if name in current.identities and current.identities[name].keys == identity.keys
        else identity
        for name, identity in loaded.identities.items()
    }
    if (
        loaded.keys == current.keys
        and all(identity is current.identities.get(name) for name, identity in identities.items())
        and identities.keys() == current.identities.keys()
    ):
        return current
    return replace(loaded, identities=MappingProxyType(identities))


def describe_changes(current: Material, new: Material, files: tuple[Path, ...]) -> str:
    """What a reload changed, in words for its log line: the files, the config's tables,
    each key's new certificate (serial, expiry) or new key (pin), the contexts rebuilt."""
    parts: list[str] = []
    base = current.config.path.parent if current.config.path is not None else None
    if files:
        parts.append("changed " + ", ".join(_short_path(f, base) for f in files))
    old_config, new_config = current.config, new.config
    if old_config.path is not None and old_config.path in files:
        tables = [
            name
            for name in _CONFIG_TABLES
            if getattr(old_config, name) != getattr(new_config, name)
        ]
        parts.append(f"settings changed: {', '.join(tables)}" if tables else "no setting changed")
    old_keys, new_keys = current.snapshot.keys, new.snapshot.keys
    for name, key in new_keys.items():
        before = old_keys.get(name)
        until = brief_time(key.not_after, zone=" UTC")
        serial = f"{key.leaf.serial_number:X}"
        if before is None:
            parts.append(f"{name} added (pin {key.pin}, serial {serial}, until {until})")
        elif before.pin != key.pin:
            parts.append(f"{name}: new key (pin {key.pin}, serial {serial}, until {until})")
        elif before.chain != key.chain:
            parts.append(f"{name}: new certificate (serial {serial}, until {until})")
    parts += [f"{name} removed" for name in old_keys if name not in new_keys]
    if new.snapshot is current.snapshot:
        parts.append("TLS contexts kept")
    else:
        rebuilt = [
            str(name)
            for name, identity in new.snapshot.identities.items()
            if current.snapshot.identities.get(name) is not identity
        ]
        parts.append(
            f"TLS contexts rebuilt: {', '.join(rebuilt)}" if rebuilt else "TLS contexts kept"
        )
    return "; ".join(parts) if parts else "nothing changed"


# Config's fields that are tables of config.toml, in the file's order: what a reload names.
_CONFIG_TABLES: Final = (
    "listen", "keys", "rotation", "upstream", "acme", "manifest", "reports", "limits",
    "keystore", "admin", "lifecycle", "process", "tls", "log", "state",
)  # fmt: skip


def _short_path(path: Path, base: Path | None) -> str:
    if base is not None:
        try:
            return str(path.relative_to(base.absolute()))
        except ValueError:
            pass
    return str(path)


def _relay_for(current: Material, config: Config) -> RelaySettings | None:
    """Relay settings for a reloaded config: the current pool is kept unless the upstream or
    the pool's own limits changed (blocking: a new pool reads CA files)."""
    relay = current.relay
    if config.upstream is None:
        return None
    old, new = current.config, config
    same_pool = (
        relay is not None
        and new.upstream == old.upstream
        and new.limits.upstream_connect_timeout == old.limits.upstream_connect_timeout
        and new.limits.upstream_timeout == old.limits.upstream_timeout
        and new.limits.max_response_header_count == old.limits.max_response_header_count
    )
    if same_pool and relay is not None and new.limits == old.limits:
        return relay
    return RelaySettings.build(config, relay.pool if same_pool and relay else None)


class Reloads:
    """A server's reloads: one at a time, counted, and the file poller (see the module
    docstring)."""

    def __init__(
        self,
        server: Reloadable,
        load: Loader,
        clock: Callable[[], datetime],
        *,
        files_seen: FilesSignature,
    ) -> None:
        self._server = server
        self._load = load
        self._clock = clock
        self._lock = trio.Lock()
        # The signature the file poller compares with: taken before the files it describes
        # were read (for the first, before the server read its keys).
        self._files_seen = files_seen
        self.ok = 0
        self.failed = 0
        self.polls = 0  # the file poller's looks at the files (tests wait for them)
        self._poll_now = trio.Event()  # set: the next poll is due at once (`poll_soon`)

    @property
    def waiting(self) -> int:
        """Reloads waiting for the one in progress to finish."""
        return self._lock.statistics().tasks_waiting

    async def reload(self, why: str, *, only_if_changed: bool = False) -> bool:
        """Re-read what changed of the config, key and manifest files; swap in new material
        only if all of it is good. True when it took effect. `only_if_changed` (the file
        poller): nothing happens, False, when no watched file changed since the last reload
        read them (a SIGHUP reload got there first)."""
        async with self._lock:
            config = self._server.material.config
            before = await trio.to_thread.run_sync(files_signature, config)
            files = changed_files(self._files_seen, before)
            if only_if_changed and not files:
                return False
            try:
                manifest_file = config.manifest.file if config.manifest is not None else None
                if files and set(files) <= {manifest_file}:
                    return await self._reload_manifest(why, files)
                return await self._reload_now(why, files=files)
            finally:
                # What was read, as it was before it was read (also after a failure: the
                # poller then waits for the files to change again, which is when a writer
                # finishes). The config may name files anew: those as they are now.
                new_config = self._server.material.config
                self._files_seen = await trio.to_thread.run_sync(_signature_for, new_config, before)

    async def apply(self, config: Config, why: str) -> bool:
        """Serve `config` from now on, as a reload would serve a changed config file (see
        Server.apply)."""
        async with self._lock:
            # The files the new config names, as they are before its keys are read (as at
            # start): the file poller compares against these, so a switch is not a "change".
            seen = await trio.to_thread.run_sync(files_signature, config)
            applied = await self._reload_now(why, config)
            if applied:
                self._files_seen = seen
            return applied

    def poll_soon(self) -> None:
        """Make the file poller's next look (and `watch_files`'s `also`) happen now rather than
        at the end of its interval: something to share was decided (sharedhalt.py)."""
        self._poll_now.set()

    async def watch_files(self, also: Callable[[], Awaitable[None]] | None = None) -> None:
        """Reload when a watched file changes (renewal tools, Kubernetes Secret updates); with
        `also`, run it after each look too: what else is polled at the same interval (the
        state folder's canary halt record, sharedhalt.py).

        A change that fails to load (a torn write: new chain, old key) is retried when the
        files change again, which is when the writer finishes. The signature a reload is
        compared against is always one taken *before* that reload read the files, so a file
        that changes while we load (the key landing just after its chain) is seen as a change
        at the next poll; the price is at most one reload of files already loaded.
        """
        while True:
            config = self._server.material.config
            with trio.move_on_after(config.keystore.reload_poll_interval):
                await self._poll_now.wait()
            self._poll_now = trio.Event()
            current = await trio.to_thread.run_sync(files_signature, self._server.material.config)
            self.polls += 1
            if current != self._files_seen:
                await self.reload("files changed", only_if_changed=True)
            if also is not None:
                await also()

    async def _reload_manifest(self, why: str, files: tuple[Path, ...]) -> bool:
        """Only the manifest file changed: re-read it, keep everything else (the TLS
        contexts above all)."""
        current = self._server.material
        try:
            local = await trio.to_thread.run_sync(
                endpoints.build, current.config, current.local, self._clock
            )
        except Exception:
            self.failed += 1
            log.exception("reload (%s) failed unexpectedly, still serving the previous one", why)
            return False
        relay = current.relay
        if relay is not None and relay.local is not local:
            relay = replace(relay, local=local)
        material = replace(current, relay=relay, local=local)
        self.ok += 1
        self._server.install(material, f"{why}: {describe_changes(current, material, files)}")
        return True

    async def _reload_now(
        self, why: str, given: Config | None = None, *, files: tuple[Path, ...] = ()
    ) -> bool:
        current = self._server.material
        try:
            material = await trio.to_thread.run_sync(self._prepare, current, given)
        except OperatorError as exc:
            self.failed += 1
            log.error("reload (%s) failed, still serving the previous keys: %s", why, exc)
            return False
        except Exception:
            # Our bug, not the operator's. It must not take down a server that is serving
            # good material: the file poller and the signal watcher run in its nursery.
            self.failed += 1
            log.exception("reload (%s) failed unexpectedly, still serving the previous keys", why)
            return False
        if material.config.listen != current.config.listen:
            log.warning("listen addresses changed: restart dualproxy to apply (kept the old ones)")
            # replace(), not Config(...): a field added to Config later must not be dropped.
            kept = replace(material.config, listen=current.config.listen)
            material = replace(material, config=kept)
        if material.config.log != current.config.log:
            # The access log is opened once, by the server (reopened in place on SIGUSR1).
            log.warning("log.access changed: restart dualproxy to apply (kept the old one)")
            material = replace(material, config=replace(material.config, log=current.config.log))
        if (changed := acme_restart_needed(current.config.acme, material.config.acme)) is not None:
            log.warning(
                "%s: restart dualproxy to apply (the challenge responders and the http-01"
                " listener are set up at start; renewals follow the other [acme] settings"
                " at once)",
                changed,
            )
        old_pool = current.relay.pool if current.relay is not None else None
        self.ok += 1
        self._server.install(material, f"{why}: {describe_changes(current, material, files)}")
        relay = material.relay
        if old_pool is not None and (relay is None or relay.pool is not old_pool):
            # Its idle connections close now; those in use finish their exchange first.
            await close_pool(old_pool)
            if relay is not None:
                log.info("upstream: now %s", relay.rules.upstream_authority.decode())
        return True

    def _prepare(self, current: Material, given: Config | None) -> Material:
        """The new material (blocking: a worker thread): `given`'s keys, or the files'."""
        if given is None:
            config, snapshot = self._load(current.config)
        else:
            config, snapshot = given, keystore.load_snapshot(given)
        snapshot = keep_unchanged(current.snapshot, snapshot)
        relay = _relay_for(current, config)
        local = endpoints.build(config, current.local, self._clock)
        if relay is not None and relay.local is not local:
            relay = replace(relay, local=local)
        return Material(config, snapshot, relay, local)


class Shutdown:
    """How a server stops: the drain, or at once (see the module docstring). `run()` hands it
    the scope of its accept loops and that of its connections while it runs."""

    def __init__(self, drain: Drain, slots: trio.CapacityLimiter) -> None:
        self._drain = drain
        self._slots = slots
        self.accepting: trio.CancelScope | None = None  # the drain cancels it
        self.connections: trio.CancelScope | None = None  # the grace deadline, stop_now

    @property
    def draining(self) -> bool:
        return self._drain.draining

    def drain(self, grace: float) -> None:
        """Stop accepting, close idle connections, let the others finish within `grace`."""
        if self._drain.draining:
            return
        idle = self._drain.idle_connections
        log.info(
            "draining: stopped accepting; closing %d idle connection(s), %d other(s) get"
            " up to %g s to finish",
            idle,
            max(0, self._slots.borrowed_tokens - idle),
            grace,
        )
        self._drain.start()
        if self.accepting is not None:
            self.accepting.cancel()

    def stop_now(self, grace: float) -> None:
        """Drain, and cancel every connection at once."""
        self.drain(grace)
        if self.connections is not None:
            self.connections.cancel()


class ManifestWatch:
    """Says in the log that the served manifest is missing, expires soon or has expired:
    apps then refuse it and fall back to the pins they ship with; and that it lists a key in
    a role the key no longer has (a retired key after its window: apps keep trusting it).
    Once per state (and per manifest), at start, after each reload and every
    MANIFEST_EXPIRY_CHECK_INTERVAL."""

    def __init__(self, window_closed: Callable[[], bool] = lambda: False) -> None:
        self._logged: tuple[datetime, str] | None = None  # the last expiry state logged
        self._stale_logged: object = None  # the last stale roles logged
        # Whether the evidence closed a "when-safe" window (the pin roles depend on it).
        self._window_closed = window_closed

    def announce(self, material: Material, now: datetime) -> None:
        """At start and after each reload: a manifest that is missing, and its expiry."""
        local = material.local
        if local is not None and local.manifest_problem is not None:
            log.warning("manifest: %s", local.manifest_problem)
        self.check_expiry(material, now)
        self.check_roles(material, now)

    def check_roles(self, material: Material, now: datetime) -> None:
        """Warn, once per manifest and state, when the served manifest lists a key in a role
        it no longer has (a retired old key still listed after the window)."""
        local, settings = material.local, material.config.manifest
        claims = local.manifest_claims if local is not None else None
        if claims is None or settings is None:
            return
        rotation, closed = material.config.rotation, self._window_closed()
        roles = {
            key.pin: pin_role(rotation, name, now, window_closed=closed)
            for name, key in material.snapshot.keys.items()
        }
        stale = manifest.stale_roles(claims, roles)
        state = (claims.issued_at, tuple(stale))
        if state == self._stale_logged:
            return
        self._stale_logged = state
        for found in stale:
            log.warning("manifest: %s %s", settings.file, found.describe(now))

    def check_expiry(self, material: Material, now: datetime) -> None:
        local, settings = material.local, material.config.manifest
        if local is None or settings is None or local.manifest_expires is None:
            return
        expires = local.manifest_expires
        status = manifest.expiry_status(expires, now, timedelta(days=settings.warn_before_days))
        if self._logged == (expires, status):
            return
        self._logged = (expires, status)
        _log_expiry(settings, brief_time(expires, zone=" UTC"), status)

    async def watch(self, served: Reloadable, clock: Callable[[], datetime]) -> None:
        while True:  # the server checked once before it started accepting
            await trio.sleep(MANIFEST_EXPIRY_CHECK_INTERVAL)
            self.check_expiry(served.material, clock())
            self.check_roles(served.material, clock())


def _log_expiry(settings: ManifestConfig, when: str, status: str) -> None:
    if status == "expired":
        log.error(
            "manifest: %s expired at %s; apps refuse it: run `dualproxy manifest sign`",
            settings.file,
            when,
        )
    elif status == "soon":
        log.warning(
            "manifest: %s expires at %s; sign a new one (`dualproxy manifest sign`)",
            settings.file,
            when,
        )


async def prune_idle_upstream(served: Reloadable) -> None:
    """Close pooled upstream connections once they have idled pool_idle_timeout, also when
    no request comes along to notice (the pool prunes itself only when used): a quiet
    server must not sit on sockets the upstream is about to drop."""
    while True:
        upstream = served.material.config.upstream
        await trio.sleep(
            upstream.pool_idle_timeout / 2 if upstream else IDLE_PRUNE_WITHOUT_UPSTREAM
        )
        relay = served.material.relay
        if relay is not None:
            relay.pool.prune()


async def watch_departures(departures: Departures) -> None:
    """End the exchanges of clients that left while the upstream worked (Departures)."""
    while True:
        await trio.sleep(DEPARTURE_CHECK_SECONDS)
        departures.check()


class Controllable(Protocol):
    """A server, as the signals see it."""

    @property
    def draining(self) -> bool: ...

    async def reload(self, why: str) -> bool: ...

    def drain(self) -> None: ...

    def stop_now(self) -> None: ...

    def reopen_logs(self) -> None: ...


async def watch_signals(
    server: Controllable, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """SIGHUP reloads, SIGTERM drains (a second one stops at once), SIGUSR1 reopens the
    access log file (logrotate's postrotate). Started with nursery.start, it reports
    readiness once the handlers are installed: a SIGHUP before that would kill the process."""
    with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGUSR1) as signals:
        task_status.started()
        async for signum in signals:
            if signum == signal.SIGHUP:
                await server.reload("SIGHUP")
            elif signum == signal.SIGUSR1:
                server.reopen_logs()
            elif not server.draining:
                log.info("SIGTERM: stopping, after the requests in flight")
                server.drain()
            else:
                log.warning("SIGTERM again: stopping now")
                server.stop_now()
