"""`dualproxy rehearse`: the configured rotation replayed on compressed time against the real
server code on loopback, by a simulated fleet of app versions, before it starts for real.

The server is `serve.server.Server`, as `serve` runs it, with three stand-ins: its clock is the
rehearsal's (it jumps from phase to phase), it listens on a free loopback port and answers
every request itself (no upstream, no ACME, no admin listener), and, when the configured key
files cannot all be read (the example config's are not there), every key is a fresh stand-in
of the same role from a throwaway CA, so pins are the stand-ins' (a fleet names pins by role
or key name, never by value, for that reason). Network hints are played by loopback ranges
that stand in for the configured networks (NEW_NETWORK_STAND_IN, OLD_NETWORK_STAND_IN).

The fleet is a small TOML table (`fleet.toml` beside the config, see `read_fleet`): per app
version, the pins it carries, the hint it sends, whether it fetches the signed manifest,
its share of clients, when it ships and whether it must keep working. Each client is a real
TLS connection from its own loopback address (so the canary buckets clients as it buckets
phones); it checks the served key against its pins and, as OkHttp's CertificatePinner does,
leaves without a request when the key is not pinned (a pin failure), or sends one GET.

The phases (`steps`): before the window; a renewal of every certificate on the same key
(what ACME does; pins must not change); inside the window; with a canary, a drill (clients
pinning only the old key until the canary halts itself, then `canary resume`); grace_end; and
with close = "when-safe", grace_deadline. At each, every version that has shipped connects
its share of the clients; the window's rule is reviewed as a running server reviews it.

What it cannot rehearse: real devices' OS trust stores and caches, clients that never connect
during the window, reports sent by apps (the report halt), and an ACME CA (renewal is
simulated with the throwaway CA).
"""

from __future__ import annotations

import ipaddress
import itertools
import math
import socket
import ssl
import tempfile
import tomllib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Final, Literal

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from dualproxy.config.errors import OperatorError
from dualproxy.config.names import ListenAddress
from dualproxy.config.reader import Table
from dualproxy.config.schema import Config, KeyConfig, ListenConfig, LogConfig, Rotation
from dualproxy.config.times import format_time
from dualproxy.dev import certs
from dualproxy.rotation import policy
from dualproxy.serve import rollout
from dualproxy.serve.server import Server
from dualproxy.tls import keygen, keystore
from dualproxy.tls.pins import spki_pin, spki_pin_of_certificate

__all__ = [
    "CLIENT_RANGE",
    "DEFAULT_CLIENTS",
    "DRILL_MAX",
    "DRILL_RANGE",
    "FLEET_FILE",
    "HINTS",
    "MAX_CLIENTS",
    "Rehearsal",
    "Row",
    "Step",
    "Version",
    "read_fleet",
    "rehearse",
    "steps",
]

# The fleet file read when none is named: beside the config file.
FLEET_FILE: Final = "fleet.toml"
# Clients per phase, shared among the versions by their shares: enough for a 5 % canary to
# see a few dozen clients per phase, few enough that a rehearsal takes seconds.
DEFAULT_CLIENTS: Final = 200
# At most this many per phase: the loopback addresses of one /16, and minutes of handshakes.
MAX_CLIENTS: Final = 20_000
# The canary drill stops after this many clients if the canary has not halted (the halt test
# takes 3-4 canary handshakes when every canary client fails; 20 is the issue's target, so
# at a 5 % canary about 400 clients): then the rehearsal fails.
DRILL_MAX: Final = 2000
# Loopback ranges that play the configured network hints (Linux answers for all of 127/8).
NEW_NETWORK_STAND_IN: Final = ipaddress.IPv4Network("127.200.0.0/16")
OLD_NETWORK_STAND_IN: Final = ipaddress.IPv4Network("127.201.0.0/16")
# Where the other clients come from: one address each, in order.
CLIENT_RANGE: Final = ipaddress.IPv4Network("127.1.0.0/16")
DRILL_RANGE: Final = ipaddress.IPv4Network("127.100.0.0/16")
# One client's connect, handshake and answer, on loopback: generous for a loaded machine.
CLIENT_TIMEOUT: Final = 10.0
# How long after the start of a phase it is played (inside it, not on its edge).
_INTO_PHASE: Final = timedelta(seconds=1)
# "before": this long before grace_start.
_BEFORE: Final = timedelta(days=1)
# The SNI name hint-less clients send when no key names one: any name, the server ignores it.
_DEFAULT_SNI: Final = "api.example.com"
# A response head is read up to this many bytes (the placeholder's is a few hundred).
_RESPONSE_LIMIT: Final = 65536

Hint = Literal["none", "sni", "alpn", "network", "old-sni", "old-alpn", "old-network"]
HINTS: Final[tuple[Hint, ...]] = (
    "none",
    "sni",
    "alpn",
    "network",
    "old-sni",
    "old-alpn",
    "old-network",
)


@dataclass(frozen=True, slots=True)
class Version:
    """One app version of the fleet (a `[[version]]` table)."""

    name: str
    pins: tuple[str, ...]  # "old", "new" (the rotation's sides), key names; () = unpinned
    hint: Hint = "none"
    manifest: bool = False  # also trusts the pins the signed manifest lists at the time
    share: float = 1.0
    must_work: bool = True
    # In the field from then on: an instant, or "grace_start" (the plan's, whatever it is);
    # None: already there.
    ships: datetime | Literal["grace_start"] | None = None

    def shipped(self, rotation: Rotation, at: datetime) -> bool:
        """Whether the version is in the field at `at`."""
        ships = rotation.grace_start if self.ships == "grace_start" else self.ships
        return ships is None or ships <= at


def read_fleet(path: Path, key_names: Sequence[str]) -> tuple[Version, ...]:
    """The fleet table at `path`; OperatorError naming the key that is wrong."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OperatorError(
            "no fleet table here",
            file=path,
            fix="write one (see fleet.toml beside the example config.toml) or name it with --fleet",
        ) from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise OperatorError(f"cannot read the fleet table: {exc}", file=path) from None
    try:
        return _parse_fleet(data, key_names)
    except OperatorError as exc:
        raise OperatorError(exc.problem, key_path=exc.key_path, file=path, fix=exc.fix) from None


def _parse_fleet(data: Mapping[str, object], key_names: Sequence[str]) -> tuple[Version, ...]:
    unknown = [key for key in data if key != "version"]
    if unknown:
        raise OperatorError(
            f"unknown setting {unknown[0]!r}; the fleet is a list of [[version]] tables",
            key_path=unknown[0],
        )
    tables = data.get("version")
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise OperatorError(
            "missing; add one [[version]] table per app version", key_path="version"
        )
    versions = [
        _parse_version(table, f"version[{index}]", key_names) for index, table in enumerate(tables)
    ]
    names = [version.name for version in versions]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise OperatorError(
                f"{name!r} is named twice; give each version its own name",
                key_path=f"version[{index}].name",
            )
    if sum(version.share for version in versions) <= 0:
        raise OperatorError("every share is 0; give some version clients", key_path="version")
    return tuple(versions)


def _parse_version(raw: Mapping[str, object], prefix: str, key_names: Sequence[str]) -> Version:
    table = Table(raw, prefix)
    name = table.string("name", required=True)
    assert name is not None
    pins = table.strings("pins")
    known = ("old", "new", *key_names)
    for pin in pins:
        if pin not in known:
            raise OperatorError(
                f"{pin!r} is neither a side of the rotation nor a configured key; use one of"
                f" {', '.join(known)}",
                key_path=table.path("pins"),
            )
    hint = table.string("hint") or "none"
    if hint not in HINTS:
        raise OperatorError(
            f"{hint!r} is not a hint; use one of {', '.join(HINTS)}", key_path=table.path("hint")
        )
    manifest = table.boolean("manifest", False)
    share = table.number("share", 1.0, low=0.0, high=1_000_000.0)
    must_work = table.boolean("must_work", True)
    ships: datetime | Literal["grace_start"] | None = None
    if isinstance(raw.get("ships"), str):
        if table.string("ships") != "grace_start":
            raise OperatorError(
                'expected an instant (2026-12-01T00:00:00Z, unquoted) or "grace_start"',
                key_path=table.path("ships"),
            )
        ships = "grace_start"
    elif table.has("ships"):
        ships = table.instant("ships")
    table.done()
    return Version(name, pins, hint, manifest, share, must_work, ships)


# --- the phases ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Step:
    """One phase of the rehearsal: what it is called, when it is played, and what happens first."""

    name: str
    at: datetime
    action: Literal["play", "renew", "drill", "close"] = "play"


def steps(rotation: Rotation) -> tuple[Step, ...]:
    """The phases of `rotation`, in order (the module docstring)."""
    start, end = rotation.grace_start, rotation.grace_end
    before = start - _BEFORE
    during = start + _INTO_PHASE
    out = [
        Step("before", before),
        Step("renewal", before + _INTO_PHASE, "renew"),
        Step("window", during),
    ]
    if rotation.canary_percent > 0:
        out.append(Step("canary drill", during + _INTO_PHASE, "drill"))
        out.append(Step("window (resumed)", during + 2 * _INTO_PHASE))
    out.append(Step("grace_end", end + _INTO_PHASE, "close"))
    if rotation.close == "when-safe" and rotation.grace_deadline is not None:
        out.append(Step("grace_deadline", rotation.grace_deadline + _INTO_PHASE, "close"))
    return tuple(out)


# --- the results -----------------------------------------------------------------------------


@dataclass(slots=True)
class Row:
    """One version's clients in one phase."""

    step: str
    version: str
    attempts: int = 0
    ok: int = 0
    pin_failures: int = 0
    errors: int = 0  # no handshake or no answer: the server's fault, or the machine's
    keys: Counter[str] = field(default_factory=Counter)

    @property
    def failures(self) -> int:
        return self.attempts - self.ok


@dataclass(slots=True)
class Rehearsal:
    """What a rehearsal saw: a row per phase and version, and what the server said."""

    fleet: tuple[Version, ...]
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def broken(self) -> list[str]:
        """The versions that must keep working and failed somewhere, with where."""
        must = {version.name for version in self.fleet if version.must_work}
        out: dict[str, list[str]] = {}
        for row in self.rows:
            if row.version in must and row.failures:
                out.setdefault(row.version, []).append(
                    f"{row.failures} of {row.attempts} at {row.step}"
                )
        return [f"{name}: {', '.join(where)}" for name, where in out.items()]

    def table(self) -> list[str]:
        width = max([len("version"), *(len(row.version) for row in self.rows)])
        step_width = max([len("phase"), *(len(row.step) for row in self.rows)])
        lines = [
            f"{'phase':<{step_width}}  {'version':<{width}}  attempts  ok    pin-failures  keys"
        ]
        for row in self.rows:
            keys = ", ".join(f"{name} {count}" for name, count in sorted(row.keys.items()))
            errors = f" (errors {row.errors})" if row.errors else ""
            lines.append(
                f"{row.step:<{step_width}}  {row.version:<{width}}  {row.attempts:<8}  "
                f"{row.ok:<4}  {row.pin_failures:<12}  {keys or '-'}{errors}"
            )
        return lines


# --- the rehearsal ---------------------------------------------------------------------------


class _Clock:
    """The server's policy clock: the rehearsal moves it."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@dataclass(frozen=True, slots=True)
class _Setup:
    config: Config  # what the server runs
    pins: dict[str, str]  # key name -> pin (the stand-ins' when they stand in)
    stand_ins: Path | None  # the stand-ins' folder, or None: the configured keys
    ca: tuple[x509.Certificate, keygen.PrivateKey] | None


def rehearse(
    config: Config,
    fleet: tuple[Version, ...],
    *,
    clients: int = DEFAULT_CLIENTS,
    report: Callable[[str], None] = lambda line: None,
) -> Rehearsal:
    """Play `fleet` through `config`'s rotation (the module docstring). Blocking: it runs its
    own trio loop; `report` gets progress lines. OperatorError without a rotation."""
    if config.rotation is None:
        raise OperatorError(
            "nothing to rehearse: no [rotation]",
            file=config.path,
            fix="add a [rotation] table (see the example config.toml)",
        )
    _check_loopback()
    with tempfile.TemporaryDirectory(prefix="dualproxy-rehearse-") as folder:
        setup = _setup(config, Path(folder))
        if setup.stand_ins is not None:
            report(
                "the configured key files cannot all be read: playing with stand-in keys of the"
                " same roles (pins are theirs)"
            )
        return trio.run(_rehearse, setup, fleet, clients, report)


def _check_loopback() -> None:
    """Each client connects from its own address of 127/8, which Linux answers for; macOS
    answers 127.0.0.1 alone, and every client would fail for a reason no plan has."""
    for network in (CLIENT_RANGE, DRILL_RANGE, NEW_NETWORK_STAND_IN, OLD_NETWORK_STAND_IN):
        address = str(network[1])
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((address, 0))
            except OSError as exc:
                raise OperatorError(
                    f"cannot use the loopback address {address} ({exc.strerror}): the"
                    " rehearsal plays each client from its own address of"
                    f" {network}, which Linux answers for",
                    fix="run it on Linux (a container will do), or make the addresses"
                    " local (macOS: sudo ifconfig lo0 alias ADDRESS for each)",
                ) from None


def _setup(config: Config, folder: Path) -> _Setup:
    """The config the rehearsal serves: a loopback port, no upstream/ACME/endpoints, network
    hints played by loopback ranges, no access log (its report says what the fleet got), and
    the configured keys or stand-ins."""
    rotation = config.rotation
    assert rotation is not None
    hints_new = replace(
        rotation.hints_new,
        networks=(NEW_NETWORK_STAND_IN,) if rotation.hints_new.networks else (),
    )
    hints_old = replace(
        rotation.hints_old,
        networks=(OLD_NETWORK_STAND_IN,) if rotation.hints_old.networks else (),
    )
    served = replace(
        config,
        listen=ListenConfig((ListenAddress("127.0.0.1", 0),)),
        rotation=replace(rotation, hints_new=hints_new, hints_old=hints_old),
        upstream=None,
        acme=None,
        manifest=None,
        reports=None,
        log=LogConfig(access=False),
    )
    try:
        snapshot = keystore.load_snapshot(served)
    except OperatorError:
        snapshot = None
    if snapshot is not None:
        pins = {name: key.pin for name, key in snapshot.keys.items()}
        return _Setup(served, pins, None, None)
    ca = certs.new_ca("dualproxy rehearsal CA (thrown away)")
    names = _certificate_names(rotation)
    keys: dict[str, KeyConfig] = {}
    pins = {}
    families: dict[tuple[str, ...], int] = {}
    for name in config.keys:
        side = rotation.old if name in rotation.old else rotation.new
        # Two keys on one side are one EC and one RSA key (keystore's rule): alternate.
        index = families.get(side, 0)
        families[side] = index + 1
        key_type = keygen.KeyType.ECDSA_P256 if index % 2 == 0 else keygen.KeyType.RSA_2048
        private = keygen.generate_private_key(key_type)
        key_file, chain_file = folder / name / "key.pem", folder / name / "chain.pem"
        keygen.write_private_key(key_file, private)
        _write_certificate(chain_file, ca, private, names)
        keys[name] = KeyConfig(name, key_file, chain_file)
        pins[name] = spki_pin(private.public_key())
    return _Setup(replace(served, keys=keys), pins, folder, ca)


def _certificate_names(rotation: Rotation) -> tuple[str, ...]:
    names = [_DEFAULT_SNI]
    for hints in (rotation.hints_new, rotation.hints_old):
        names += [_concrete(name) for name in hints.sni]
    return tuple(dict.fromkeys(names))


def _concrete(sni: str) -> str:
    """A name a client can send for an SNI hint ("*.example.com" matches "app.example.com")."""
    return "app" + sni[1:] if sni.startswith("*.") else sni


def _write_certificate(
    path: Path,
    ca: tuple[x509.Certificate, keygen.PrivateKey],
    private: keygen.PrivateKey,
    names: Sequence[str],
) -> None:
    now = datetime.now().astimezone()
    cert = certs.issue_certificate(
        *ca,
        private.public_key(),
        names,
        not_before=now - certs.BACKDATE,
        not_after=now + certs.CERT_LIFETIME,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


async def _rehearse(
    setup: _Setup, fleet: tuple[Version, ...], clients: int, report: Callable[[str], None]
) -> Rehearsal:
    config = setup.config
    rotation = config.rotation
    assert rotation is not None
    plan = steps(rotation)
    clock = _Clock(plan[0].at)
    server = Server(config, clock=clock, handle_signals=False)
    result = Rehearsal(fleet)
    # One address per client, in order; past the range's end (many clients over many phases)
    # they come round again, as a returning client does.
    sources = itertools.cycle(_addresses(CLIENT_RANGE))
    halts_noted = 0
    async with trio.open_nursery() as nursery:
        [(host, port), *_] = await nursery.start(server.run)
        for step in plan:
            clock.now = step.at
            report(f"{step.name} ({format_time(step.at)})")
            if step.action == "renew":
                result.notes.append(await _renew(server, setup))
            elif step.action == "drill":
                result.notes.append(await _drill(server, setup, (host, port)))
                continue
            rows = {
                version.name: Row(step.name, version.name)
                for version in fleet
                if version.shipped(rotation, step.at)
            }
            for version in _schedule([v for v in fleet if v.name in rows], clients):
                row = rows[version.name]
                source = (
                    _network_source(version, row.attempts)
                    if version.hint.endswith("network")
                    else next(sources)
                )
                await _one_client(server, setup, (host, port), version, source, row)
                if step.action == "close":
                    rollout.review(server)
            result.rows += rows.values()
            if step.action == "close":
                rollout.review(server)
                result.notes.append(_window_note(server, step, rotation))
            judge = server.evidence.canary
            if judge.halted and judge.halts > halts_noted:
                # Sticky, as in production: hint-less clients get the default from here on.
                halts_noted = judge.halts
                result.notes.append(f"{step.name}: the canary halted itself: {judge.why}")
        nursery.cancel_scope.cancel()
    return result


def _schedule(shipped: Sequence[Version], clients: int) -> list[Version]:
    """The order the versions' clients connect in: each version's share of `clients` (of the
    whole fleet's shares), spread evenly through the phase as a real mix of clients is, so the
    canary sees them interleaved and not one version after another."""
    total = sum(version.share for version in shipped)
    slots: list[tuple[float, int, Version]] = []
    for order, version in enumerate(shipped):
        count = math.ceil(clients * version.share / total) if version.share > 0 else 0
        slots += [((index + 0.5) / count, order, version) for index in range(count)]
    return [version for _, _, version in sorted(slots, key=lambda slot: slot[:2])]


def _addresses(network: ipaddress.IPv4Network) -> Iterator[str]:
    for address in network.hosts():
        if address.packed[3] not in (0, 255):
            yield str(address)


def _network_source(version: Version, index: int) -> str:
    network = OLD_NETWORK_STAND_IN if version.hint.startswith("old-") else NEW_NETWORK_STAND_IN
    return str(network[1 + index % (network.num_addresses - 2)])


async def _renew(server: Server, setup: _Setup) -> str:
    """Every certificate issued again on its key (what ACME does), applied as a reload is."""
    if setup.ca is None:
        # The configured keys: their chains are the operator's; a reload of the same files.
        applied = await server.apply(server.config, "rehearsal: renewal (same files)")
        return f"renewal: reloaded the configured chains ({'ok' if applied else 'FAILED'})"
    rotation = setup.config.rotation
    assert rotation is not None
    for key in setup.config.keys.values():
        private = keystore.read_private_key(key.key)
        _write_certificate(key.chain, setup.ca, private, _certificate_names(rotation))
    applied = await server.apply(server.config, "rehearsal: renewal")
    same = all(server.snapshot.keys[name].pin == pin for name, pin in setup.pins.items())
    return (
        f"renewal: every certificate issued again on its key and reloaded"
        f" ({'ok' if applied else 'FAILED'}); pins {'unchanged' if same else 'CHANGED'}"
    )


async def _drill(server: Server, setup: _Setup, address: tuple[str, int]) -> str:
    """Clients pinning only the old key, from the canary's buckets, until it halts; then the
    operator's `canary resume`."""
    rotation = setup.config.rotation
    assert rotation is not None
    old_only = Version("drill (old pin only)", ("old",), must_work=False)
    row = Row("canary drill", old_only.name)
    judge = server.evidence.canary
    before = ""
    if judge.halted:  # by the fleet: the operator resumes, then the drill halts it again
        before = f"(the fleet had halted it: {judge.why}; resumed first) "
        judge.resume()
    for source in _addresses(DRILL_RANGE):
        if judge.halted or row.attempts >= DRILL_MAX:
            break
        if policy.canary_bucket(ipaddress.ip_address(source)) >= rotation.canary_percent:
            continue
        await _one_client(server, setup, address, old_only, source, row)
    if not judge.halted:
        return (
            f"canary drill: {before}NOT halted after {row.attempts} canary clients failing on new"
        )
    handshakes, why = judge.canary.handshakes, judge.why
    judge.resume()
    return (
        f"canary drill: {before}halted after {row.attempts} old-pin-only canary clients, at"
        f" {handshakes} canary handshakes in all ({why}); resumed (`dualproxy canary resume`)"
    )


def _window_note(server: Server, step: Step, rotation: Rotation) -> str:
    verdict = server.evidence.window.verdict
    phase = policy.phase(rotation, step.at, window_closed=server.evidence.window.closed)
    if rotation.close != "when-safe" or verdict is None:
        return f"{step.name}: the window is {'over' if phase == 'after' else 'open'}"
    return f"{step.name}: window {verdict.state}: {verdict.why}"


def _trusted(version: Version, setup: _Setup, at: datetime, closed: bool) -> frozenset[str]:
    rotation = setup.config.rotation
    assert rotation is not None
    pins: set[str] = set()
    for pin in version.pins:
        names = rotation.keys_of(pin) if pin in ("old", "new") else (pin,)  # type: ignore[arg-type]
        pins.update(setup.pins[name] for name in names)
    if version.manifest:
        # What a manifest signed at `at` lists: every key but the retired and the standby.
        for name, pin in setup.pins.items():
            if policy.pin_role(rotation, name, at, window_closed=closed) in (
                "current",
                "next",
                "retiring",
            ):
                pins.add(pin)
    return frozenset(pins)


def _hello(version: Version, rotation: Rotation) -> tuple[str, list[str]]:
    """The SNI name and ALPN tokens the version sends."""
    hints = rotation.hints_old if version.hint.startswith("old-") else rotation.hints_new
    sni, alpn = _DEFAULT_SNI, ["http/1.1"]
    if version.hint.endswith("sni") and hints.sni:
        sni = _concrete(hints.sni[0])
    if version.hint.endswith("alpn") and hints.alpn:
        alpn = [hints.alpn[0].decode("ascii"), "http/1.1"]
    return sni, alpn


async def _one_client(
    server: Server,
    setup: _Setup,
    address: tuple[str, int],
    version: Version,
    source: str,
    row: Row,
) -> None:
    rotation = setup.config.rotation
    assert rotation is not None
    at = server.now()
    trusted = _trusted(version, setup, at, server.evidence.window.closed)
    sni, alpn = _hello(version, rotation)
    row.attempts += 1
    outcome = await trio.to_thread.run_sync(
        _connect, address, source, sni, alpn, trusted, bool(version.pins or version.manifest)
    )
    with trio.fail_after(CLIENT_TIMEOUT):
        # The server has counted it before the next client comes (the canary's halt is
        # checked per handshake, in order). The server has no event for "connection closed":
        # a millisecond's poll, a few per client.
        while server.active_connections:  # noqa: ASYNC110
            await trio.sleep(0.001)
    if outcome is None:
        row.errors += 1
        return
    pin, used = outcome
    names = [name for name, key_pin in setup.pins.items() if key_pin == pin]
    row.keys[names[0] if names else "unknown"] += 1
    if used:
        row.ok += 1
    else:
        row.pin_failures += 1


def _connect(
    address: tuple[str, int],
    source: str,
    sni: str,
    alpn: list[str],
    trusted: frozenset[str],
    pinned: bool,
) -> tuple[str, bool] | None:
    """One app's connection: the served key's pin and whether the app used it; None when no
    handshake or no answer came (blocking: a worker thread)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # The rehearsal is about pins: the chain is the stand-ins' CA's or the operator's, and
    # `check` verifies chains and names.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(alpn)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as raw:
            raw.settimeout(CLIENT_TIMEOUT)
            # As phones' stacks do: no Nagle wait for the request after the handshake.
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.bind((source, 0))
            raw.connect(address)
            with context.wrap_socket(raw, server_hostname=sni) as tls:
                der = tls.getpeercert(binary_form=True)
                if der is None:
                    return None
                pin = spki_pin_of_certificate(x509.load_der_x509_certificate(der))
                if pinned and pin not in trusted:
                    return pin, False
                tls.sendall(f"GET / HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n".encode())
                answer = tls.recv(_RESPONSE_LIMIT)
                return pin, answer.startswith(b"HTTP/1.1 200 ")
    except (OSError, ssl.SSLError):
        return None
