"""Pin-failure reports from apps: parsing, rate limiting, counting and the bounded store.

Apps using TrustKit (iOS) or TrustKit-Android POST a JSON report to the URL they are
configured with when a connection fails their pin check; RFC 7469 §3 defines the report
browsers once sent for HPKP, which some clients still produce. Both are accepted:

- TrustKit (recognised by `app-bundle-id`): `app-bundle-id`, `app-version`, `hostname`,
  `noted-hostname`, `known-pins`, `validation-result` are required; `app-platform`,
  `app-platform-version`, `app-vendor-id`, `trustkit-version`, `date-time`, `port`,
  `include-subdomains`, `enforce-pinning`, `validated-certificate-chain`,
  `served-certificate-chain` (TrustKit-Android) and `known-pins-expiration-date` are optional.
- RFC 7469: `hostname` and `known-pins` are required; `date-time`, `port`,
  `effective-expiration-date`, `include-subdomains`, `noted-hostname`,
  `served-certificate-chain`, `validated-certificate-chain` are optional.

Strict where it matters: every known field has its type and a length bound, a known pin must
read `pin-sha256="BASE64"` with a 32-byte digest, a chain is a short list of PEM
certificates. Fields we do not know are ignored and not stored, so that a newer TrustKit's
reports still count. A rejection is a `ReportError` whose `problem` is short and our own
words: it never quotes the client's bytes.

Counting answers "which app versions still only know the old pin": accepted reports are
grouped by (app, version, platform, known-pins set), a bounded number of groups (client input
chooses the keys, so memory must not grow with it; beyond MAX_GROUPS reports are counted as
`ungrouped`). `summary()` turns the groups into the JSON-able shape documented on it.

The store is JSON Lines, one accepted report per line, size-capped and rotated
(`store`, `store.1`, ... `store.N`): never more than (N + 1) x max_bytes on disk.

Everything here is pure but the store, which does blocking file I/O (callers in trio run it
in a worker thread); clocks are passed in as values.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Final, Literal, TypedDict

from dualproxy.config.times import format_time, parse_time
from dualproxy.rotation.policy import client_id
from dualproxy.tls.pins import is_pin

ReportKind = Literal["trustkit", "rfc7469"]

# Reports counted apart; beyond it, a report whose group is new counts as `ungrouped` (an
# app has a handful of live versions, each knowing one or two pin sets: real traffic makes
# tens of groups, while a client inventing versions must not make us grow).
MAX_GROUPS: Final = 1000
# Bounds on each field (a value above one is refused, not cut): host names by RFC 1035, app
# identifiers and versions by what stores allow with plenty of room.
MAX_TEXT: Final = 255
MAX_PINS: Final = 32  # TrustKit wants at least two; nobody ships dozens
MAX_CHAIN: Final = 10  # certificates in one chain: real chains have 2-4
MAX_PEM: Final = 16 * 1024  # one PEM certificate: an RSA-4096 leaf is about 2.5 KiB
# Addresses the rate limiter remembers; beyond it the least recently seen are forgotten
# (each costs about 200 bytes, so this bounds it to a few MiB).
MAX_TRACKED_CLIENTS: Final = 10_000
# Distinct canary clients remembered per group: enough to show and to halt on (the canary
# halts at rotation.canary.REPORT_HALT_CLIENTS), 8 bytes each.
MAX_CANARY_CLIENTS: Final = 100

_PIN_ENTRY: Final = re.compile(r'pin-sha256="([A-Za-z0-9+/]{43}=)"')
_PEM_CERTIFICATE: Final = re.compile(
    r"\s*-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]+-----END CERTIFICATE-----\s*"
)


class ReportError(Exception):
    """The client sent something that is not a report we accept (answered 400)."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


@dataclass(frozen=True, slots=True)
class PinReport:
    """One accepted report, its fields checked; None for an optional field not sent."""

    kind: ReportKind
    hostname: str
    known_pins: tuple[str, ...]  # base64 SHA-256 pins, sorted, each once
    noted_hostname: str | None = None
    port: int | None = None
    date_time: str | None = None  # as sent: TrustKit-Android writes a non-RFC 3339 offset
    include_subdomains: bool | None = None
    enforce_pinning: bool | None = None
    validation_result: int | None = None
    app_bundle_id: str | None = None
    app_version: str | None = None
    app_platform: str | None = None
    app_platform_version: str | None = None
    app_vendor_id: str | None = None
    trustkit_version: str | None = None
    expiration_date: str | None = None  # known-pins-expiration-date / effective-expiration-date
    served_chain: tuple[str, ...] = ()
    validated_chain: tuple[str, ...] = ()

    def record(self, received_at: datetime) -> dict[str, object]:
        """The line the store keeps: every field, and when it arrived."""
        return {
            "received-at": format_time(received_at),
            "kind": self.kind,
            "hostname": self.hostname,
            "port": self.port,
            "noted-hostname": self.noted_hostname,
            "known-pins": list(self.known_pins),
            "date-time": self.date_time,
            "include-subdomains": self.include_subdomains,
            "enforce-pinning": self.enforce_pinning,
            "validation-result": self.validation_result,
            "app-bundle-id": self.app_bundle_id,
            "app-version": self.app_version,
            "app-platform": self.app_platform,
            "app-platform-version": self.app_platform_version,
            "app-vendor-id": self.app_vendor_id,
            "trustkit-version": self.trustkit_version,
            "expiration-date": self.expiration_date,
            "served-certificate-chain": list(self.served_chain),
            "validated-certificate-chain": list(self.validated_chain),
        }

    def log_summary(self) -> str:
        """A bounded, escaped one-line summary for the log (never the report itself)."""
        app = f"{self.app_bundle_id} {self.app_version}" if self.app_bundle_id else None
        return (
            f"kind={self.kind} host={_log_text(self.hostname)} app={_log_text(app)}"
            f" platform={_log_text(self.app_platform)} pins={len(self.known_pins)}"
            f" result={'-' if self.validation_result is None else self.validation_result}"
        )


# --- parsing -------------------------------------------------------------------------------


def is_json_content_type(value: bytes | None) -> bool:
    """Whether a Content-Type names JSON: application/json (TrustKit), application/csp-report
    style `+json` types, with any parameters (charset)."""
    if value is None:
        return False
    media = value.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (
        media.startswith(b"application/") and media.endswith(b"+json")
    )


def parse_report(body: bytes) -> PinReport:
    """The report in `body` (UTF-8 JSON), or ReportError saying briefly what is wrong."""
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_refuse_constant)
    except RecursionError:
        raise ReportError("JSON nested too deeply") from None
    except (UnicodeDecodeError, ValueError):
        raise ReportError("not UTF-8 JSON") from None
    if not isinstance(data, dict):
        raise ReportError("not a JSON object")
    fields = _Fields(data)
    if "app-bundle-id" in data:
        return PinReport(
            kind="trustkit",
            hostname=fields.text("hostname", required=True) or "",
            known_pins=fields.pins(),
            noted_hostname=fields.text("noted-hostname", required=True),
            port=fields.port(),
            date_time=fields.text("date-time", nullable=True),
            include_subdomains=fields.flag("include-subdomains"),
            enforce_pinning=fields.flag("enforce-pinning"),
            validation_result=fields.integer("validation-result", required=True),
            app_bundle_id=fields.text("app-bundle-id", required=True),
            app_version=fields.text("app-version", required=True, empty=True),
            app_platform=fields.text("app-platform"),
            app_platform_version=fields.text("app-platform-version", empty=True),
            app_vendor_id=fields.text("app-vendor-id", empty=True),
            trustkit_version=fields.text("trustkit-version"),
            expiration_date=fields.text("known-pins-expiration-date", nullable=True),
            served_chain=fields.chain("served-certificate-chain"),
            validated_chain=fields.chain("validated-certificate-chain"),
        )
    return PinReport(
        kind="rfc7469",
        hostname=fields.text("hostname", required=True) or "",
        known_pins=fields.pins(),
        noted_hostname=fields.text("noted-hostname"),
        port=fields.port(),
        date_time=fields.text("date-time", nullable=True),
        include_subdomains=fields.flag("include-subdomains"),
        expiration_date=fields.text("effective-expiration-date", nullable=True),
        served_chain=fields.chain("served-certificate-chain"),
        validated_chain=fields.chain("validated-certificate-chain"),
    )


def _refuse_constant(name: str) -> object:
    raise ValueError(name)  # NaN and Infinity are not JSON (RFC 8259)


class _Fields:
    """Typed, bounded reads of a report object's fields."""

    def __init__(self, data: Mapping[str, object]) -> None:
        self._data = data

    def _get(self, name: str, required: bool) -> object:
        if name not in self._data:
            if required:
                raise ReportError(f"{name} is missing")
            return None
        return self._data[name]

    def text(
        self, name: str, *, required: bool = False, nullable: bool = False, empty: bool = False
    ) -> str | None:
        value = self._get(name, required)
        if value is None:
            if name in self._data and not nullable:  # a null where a string belongs
                raise ReportError(f"{name} is not a string")
            return None
        if not isinstance(value, str):
            raise ReportError(f"{name} is not a string")
        if len(value) > MAX_TEXT or not value.isprintable() or not (value or empty):
            raise ReportError(f"{name} is empty, too long or has control characters")
        return value

    def flag(self, name: str) -> bool | None:
        value = self._get(name, False)
        if value is not None and not isinstance(value, bool):
            raise ReportError(f"{name} is not true or false")
        return value

    def integer(self, name: str, *, required: bool = False, low: int = 0, high: int = 255) -> int:
        value = self._get(name, required)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ReportError(f"{name} is not an integer from {low} to {high}")
        return value

    def port(self) -> int | None:
        if "port" not in self._data:
            return None
        return self.integer("port", high=65535)  # TrustKit sends 0 when it does not know

    def pins(self) -> tuple[str, ...]:
        value = self._get("known-pins", True)
        if not isinstance(value, list) or len(value) > MAX_PINS:
            raise ReportError(f"known-pins is not a list of at most {MAX_PINS} pins")
        pins = set()
        for entry in value:
            match = _PIN_ENTRY.fullmatch(entry) if isinstance(entry, str) else None
            if match is None or not is_pin(match.group(1)):
                raise ReportError('a known-pins entry is not pin-sha256="BASE64"')
            pins.add(match.group(1))
        return tuple(sorted(pins))

    def chain(self, name: str) -> tuple[str, ...]:
        value = self._get(name, False)
        if value is None:
            return ()
        if not isinstance(value, list) or len(value) > MAX_CHAIN:
            raise ReportError(f"{name} is not a list of at most {MAX_CHAIN} certificates")
        for entry in value:
            if not (
                isinstance(entry, str)
                and len(entry) <= MAX_PEM
                and _PEM_CERTIFICATE.fullmatch(entry)
            ):
                raise ReportError(f"{name} holds something other than a PEM certificate")
        return tuple(value)


# --- rate limiting -------------------------------------------------------------------------


def client_key(peer: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> Hashable:
    """Who a report counts against for the rate limit: one client as policy.client_id has it
    (an IPv4 address, an IPv6 /64)."""
    return None if peer is None else client_id(peer)


class RateLimiter:
    """A token bucket per client: `burst` reports at once, then `per_minute` a minute.

    Pure: the caller passes the time (any monotonic clock, in seconds). At most
    `max_clients` buckets are kept; the least recently used one is forgotten first, which can
    only make the limiter more lenient to that client, never block anyone wrongly.
    """

    def __init__(
        self, per_minute: float, burst: int, *, max_clients: int = MAX_TRACKED_CLIENTS
    ) -> None:
        if per_minute <= 0 or burst < 1 or max_clients < 1:
            raise ValueError("per_minute, burst and max_clients must be positive")
        self._rate = per_minute / 60.0  # tokens per second
        self._burst = float(burst)
        self._max_clients = max_clients
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, client: Hashable, now: float) -> float:
        """Spend one token of `client`'s: 0.0 when it had one (the report is accepted),
        otherwise the seconds until it will have one (for Retry-After); nothing is spent."""
        tokens, then = self._buckets.pop(client, (self._burst, now))
        tokens = min(self._burst, tokens + max(0.0, now - then) * self._rate)
        if tokens >= 1.0:
            self._buckets[client] = (tokens - 1.0, now)
            wait = 0.0
        else:
            self._buckets[client] = (tokens, now)
            wait = (1.0 - tokens) / self._rate
        while len(self._buckets) > self._max_clients:
            self._buckets.popitem(last=False)
        return wait


# --- counting ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GroupKey:
    app: str  # bundle id, "" for an RFC 7469 report
    version: str
    platform: str
    known_pins: tuple[str, ...]


@dataclass(slots=True)
class _Group:
    count: int = 0
    last_seen: datetime | None = None
    # Distinct clients (policy.client_id) that sent it while in the canary; at most
    # MAX_CANARY_CLIENTS are remembered.
    canary_clients: set[bytes] = field(default_factory=set)


@dataclass(slots=True)
class ReportCounts:
    """Accepted reports, grouped (see the module docstring); bounded by `max_groups`."""

    max_groups: int = MAX_GROUPS
    total: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    ungrouped: int = 0
    last_seen: datetime | None = None
    _groups: dict[GroupKey, _Group] = field(default_factory=dict)

    def add(
        self, report: PinReport, received_at: datetime, *, canary_client: bytes | None = None
    ) -> None:
        """Count `report`; `canary_client`: the sender (policy.client_id) when it is a client
        the canary sends to the new key."""
        self.total += 1
        self.by_kind[report.kind] = self.by_kind.get(report.kind, 0) + 1
        if self.last_seen is None or received_at > self.last_seen:
            self.last_seen = received_at
        key = GroupKey(
            app=report.app_bundle_id or "",
            version=report.app_version or "",
            platform=report.app_platform or "",
            known_pins=report.known_pins,
        )
        group = self._groups.get(key)
        if group is None:
            if len(self._groups) >= self.max_groups:
                self.ungrouped += 1
                return
            group = self._groups[key] = _Group()
        group.count += 1
        if group.last_seen is None or received_at > group.last_seen:
            group.last_seen = received_at
        if canary_client is not None and len(group.canary_clients) < MAX_CANARY_CLIENTS:
            group.canary_clients.add(canary_client)

    def groups(self) -> Iterator[tuple[GroupKey, int, datetime | None]]:
        """Each group's key, count and last report."""
        for key, group in self._groups.items():
            yield key, group.count, group.last_seen

    def canary_failure_clients(
        self, old_pins: frozenset[str], new_pins: frozenset[str]
    ) -> dict[str, frozenset[bytes]]:
        """The canary clients (policy.client_id) that reported each app version of
        `old_pin_only` failing, by its name, for the versions that have any: what a worker
        sends its supervisor, whose judge sees the union over every worker."""
        return {
            version["name"]: clients
            for version, clients in self._old_pin_only(old_pins, new_pins)
            if clients
        }

    def old_pin_only(
        self, old_pins: frozenset[str], new_pins: frozenset[str]
    ) -> list[OldPinOnlyVersion]:
        """The app versions whose reports know a pin of the old keys and none of the new: they
        fail on the new key. Most reports first."""
        found = [version for version, _ in self._old_pin_only(old_pins, new_pins)]
        return sorted(found, key=lambda e: (-e["count"], e["name"]))

    def _old_pin_only(
        self, old_pins: frozenset[str], new_pins: frozenset[str]
    ) -> list[tuple[OldPinOnlyVersion, frozenset[bytes]]]:
        """Each version of `old_pin_only`, with its canary clients."""
        versions: dict[tuple[str, str, str], tuple[int, datetime | None, set[bytes]]] = {}
        for key, group in self._groups.items():
            pins = set(key.known_pins)
            if pins.isdisjoint(old_pins) or not pins.isdisjoint(new_pins):
                continue
            name = (key.app, key.version, key.platform)
            count, last, clients = versions.get(name, (0, None, set()))
            seen = [moment for moment in (last, group.last_seen) if moment is not None]
            versions[name] = (
                count + group.count,
                max(seen) if seen else None,
                clients | group.canary_clients,
            )
        return [
            (
                OldPinOnlyVersion(
                    app=app,
                    version=version,
                    platform=platform,
                    name=version_name(app, version, platform),
                    count=count,
                    last_seen=format_time(last) if last else None,
                    canary_clients=len(clients),
                ),
                frozenset(clients),
            )
            for (app, version, platform), (count, last, clients) in versions.items()
        ]


class AppVersionSummary(TypedDict):
    app: str  # bundle id; "" for RFC 7469 reports
    version: str
    platform: str  # "IOS", "ANDROID", ...; "" when not sent
    count: int
    last_seen: str | None  # RFC 3339, UTC
    known_pins: list[list[str]]  # each pin set this version reported, pins sorted


class PinSetSummary(TypedDict):
    pins: list[str]  # base64 SHA-256 pins, sorted
    labels: list[str | None]  # pin_labels' name for each pin, None for a pin we do not know
    count: int
    last_seen: str | None
    app_versions: list[str]  # "com.example.app 2.3 (IOS)", "(no app)" for RFC 7469


class OldPinOnlyVersion(TypedDict):
    """An app version whose reports know a pin of the rotation's old keys and none of its new
    keys: it fails once it gets the new key."""

    app: str
    version: str
    platform: str
    name: str  # "com.example.app 2.3 (IOS)"
    count: int  # its reports with such pins
    last_seen: str | None
    canary_clients: int  # distinct clients that sent them while in the canary


class ReportSummary(TypedDict):
    total: int  # reports accepted (read from the store at start, and since)
    by_kind: dict[str, int]  # "trustkit", "rfc7469"
    last_seen: str | None
    ungrouped: int  # counted in total only: they came past MAX_GROUPS groups
    by_app_version: list[AppVersionSummary]  # most reports first
    by_known_pins: list[PinSetSummary]  # most reports first
    # With a rotation: the versions that know only the old keys' pins, most reports first.
    old_pin_only: list[OldPinOnlyVersion]


def version_name(app: str, version: str, platform: str) -> str:
    """An app version as the summaries name it: "com.example.app 2.3 (IOS)", "(no app)"."""
    name = " ".join(part for part in (app, version) if part) or "(no app)"
    return f"{name} ({platform})" if platform else name


def summary(
    counts: ReportCounts,
    pin_labels: Mapping[str, str] | None = None,
    *,
    old_pins: frozenset[str] = frozenset(),
    new_pins: frozenset[str] = frozenset(),
) -> ReportSummary:
    """The counts as JSON-able data (`json.dumps` takes it as is), for /status.json, the
    status page and `dualproxy reports summary`; its shape is `ReportSummary`:

    ```
    {"total": 12, "by_kind": {"rfc7469": 1, "trustkit": 11},
     "last_seen": "2026-12-02T10:00:00Z", "ungrouped": 0,
     "by_app_version": [{"app": "com.example.app", "version": "2.3", "platform": "IOS",
                         "count": 7, "last_seen": "...", "known_pins": [["PIN_A"]]}, ...],
     "by_known_pins": [{"pins": ["PIN_A"], "labels": ["k2026a (retiring)"], "count": 7,
                        "last_seen": "...", "app_versions": ["com.example.app 2.3 (IOS)"]}, ...]}
    ```
    `pin_labels` names the pins we know (pin -> "key (role)"): a pin set whose labels are all
    the old key's answers "which app versions still only know the old pin", and with the
    rotation's `old_pins` and `new_pins`, `old_pin_only` lists those versions
    (`ReportCounts.old_pin_only`).
    """
    labels = pin_labels or {}
    apps: dict[tuple[str, str, str], AppVersionSummary] = {}
    pin_sets: dict[tuple[str, ...], PinSetSummary] = {}
    for key, count, last in counts.groups():
        seen = format_time(last) if last else None
        app = apps.setdefault(
            (key.app, key.version, key.platform),
            AppVersionSummary(
                app=key.app,
                version=key.version,
                platform=key.platform,
                count=0,
                last_seen=None,
                known_pins=[],
            ),
        )
        app["count"] += count
        app["last_seen"] = _later(app["last_seen"], seen)
        app["known_pins"].append(list(key.known_pins))
        pin_set = pin_sets.setdefault(
            key.known_pins,
            PinSetSummary(
                pins=list(key.known_pins),
                labels=[labels.get(pin) for pin in key.known_pins],
                count=0,
                last_seen=None,
                app_versions=[],
            ),
        )
        pin_set["count"] += count
        pin_set["last_seen"] = _later(pin_set["last_seen"], seen)
        pin_set["app_versions"].append(version_name(key.app, key.version, key.platform))
    # Most reports first; equal counts in a stable order.
    return ReportSummary(
        total=counts.total,
        by_kind=dict(sorted(counts.by_kind.items())),
        last_seen=format_time(counts.last_seen) if counts.last_seen else None,
        ungrouped=counts.ungrouped,
        by_app_version=sorted(
            apps.values(), key=lambda e: (-e["count"], e["app"], e["version"], e["platform"])
        ),
        by_known_pins=sorted(pin_sets.values(), key=lambda e: (-e["count"], e["pins"])),
        old_pin_only=counts.old_pin_only(old_pins, new_pins) if old_pins else [],
    )


def _later(a: str | None, b: str | None) -> str | None:
    """The later of two RFC 3339 UTC times (in one format, they compare as text)."""
    if a is None or b is None:
        return a or b
    return max(a, b)


# --- the store -----------------------------------------------------------------------------


class ReportStore:
    """Accepted reports as JSON Lines in `path`, rotated when it would outgrow `max_bytes`:
    path -> path.1 -> ... -> path.<keep>, the oldest dropped. Blocking I/O: call from a
    worker thread. Safe across threads of one process; processes sharing one store (several
    `serve` on a reuse_port) never tear a line (each is one O_APPEND write) but may rotate
    twice at once, dropping a rotated file early: give each its own store for exact bounds.
    """

    def __init__(self, path: Path, *, max_bytes: int, keep: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self._lock = threading.Lock()

    def files(self) -> list[Path]:
        """The store's files, oldest first (those that exist)."""
        candidates = [self._rotated(n) for n in range(self.keep, 0, -1)] + [self.path]
        return [path for path in candidates if path.is_file()]

    def append(self, record: Mapping[str, object]) -> None:
        """Add one record as a line; OSError when the disk refuses."""
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"
        if len(line) > self.max_bytes:
            raise OSError(f"a record of {len(line)} bytes does not fit the store's max_bytes")
        with self._lock:
            self.path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            try:
                size = self.path.stat().st_size
            except FileNotFoundError:
                size = 0
            if size + len(line) > self.max_bytes:
                self._rotate()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)

    def read(self) -> Iterator[dict[str, object]]:
        """Every stored record, oldest first; lines that are not ours are skipped."""
        for path in self.files():
            try:
                with path.open("rb") as lines:
                    for line in lines:
                        try:
                            record = json.loads(line)
                        except ValueError:
                            continue
                        if isinstance(record, dict):
                            yield record
            except OSError:
                continue

    def _rotate(self) -> None:
        if self.keep == 0:
            self.path.unlink(missing_ok=True)
            return
        self._rotated(self.keep).unlink(missing_ok=True)
        for n in range(self.keep - 1, 0, -1):
            source = self._rotated(n)
            if source.exists():
                source.replace(self._rotated(n + 1))
        if self.path.exists():
            self.path.replace(self._rotated(1))

    def _rotated(self, n: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{n}")


def counts_from_store(store: ReportStore, *, max_groups: int = MAX_GROUPS) -> ReportCounts:
    """Counts of the reports a store holds (a server's starting counts, `reports summary`)."""
    counts = ReportCounts(max_groups=max_groups)
    for record in store.read():
        loaded = _from_record(record)
        if loaded is not None:
            counts.add(*loaded)
    return counts


def _from_record(record: Mapping[str, object]) -> tuple[PinReport, datetime] | None:
    """A stored record back as a report and its arrival, or None if it is not one."""
    try:
        received = parse_time(str(record["received-at"]))
        pins = record["known-pins"]
        kind = record["kind"]
        if kind not in ("trustkit", "rfc7469") or not isinstance(pins, list):
            return None

        def text(name: str) -> str | None:
            value = record.get(name)
            return value if isinstance(value, str) else None

        report = PinReport(
            kind="trustkit" if kind == "trustkit" else "rfc7469",
            hostname=text("hostname") or "",
            known_pins=tuple(sorted(str(pin) for pin in pins)),
            app_bundle_id=text("app-bundle-id"),
            app_version=text("app-version"),
            app_platform=text("app-platform"),
        )
    except (KeyError, ValueError, TypeError):
        return None
    return report, received


# --- helpers -------------------------------------------------------------------------------

_UNSAFE_LOG_CHARS: Final = re.compile(r"[^\x21-\x7e]|[\"\\=]")
# Longest client-chosen value a log line quotes: enough for a bundle id and version.
_LOG_TEXT_MAX: Final = 80


def _log_text(value: str | None) -> str:
    """Client-chosen text, cut and escaped so that it cannot forge fields or lines."""
    if value is None:
        return "-"
    text = value[:_LOG_TEXT_MAX] + ("..." if len(value) > _LOG_TEXT_MAX else "")
    if text and not _UNSAFE_LOG_CHARS.search(text):
        return text
    escaped = text.encode("unicode_escape").decode("ascii").replace('"', '\\"')
    return f'"{escaped}"'
