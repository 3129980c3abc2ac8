"""config.toml -> frozen dataclasses, strictly.

Every value an operator writes is checked here, once, before anything listens: an unknown
key, a wrong type, a missing file, a rotation naming a key that does not exist, a window that
ends before it starts. Each rejection is a `ConfigError` naming the file, the key path
(`rotation.grace_end`) and what to do. Misspelled keys are errors, never silently ignored:
a typo in `grace_end` must not quietly become "the window never closes".

The module is pure apart from reading the TOML file and checking that referenced files
exist; it knows nothing about sockets, TLS or trio. Relative paths are relative to the
directory of the config file, so a config can be moved with its certs/ folder.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Final, Literal, TypeVar
from urllib.parse import urlsplit

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Role = Literal["old", "new"]
# The identities the server presents: "single" when no rotation is configured.
IdentityName = Literal["single", "old", "new"]

DEFAULT_CONFIG_FILE: Final = "config.toml"

# Key names become directory names under certs/ and appear in logs and metrics labels.
KEY_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# One DNS label, or a leading "*." wildcard label (RFC 6125 style: one whole left-most label).
_DNS_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
# RFC 1035's limit on a whole name.
_MAX_HOST_NAME: Final = 253
# RFC 9110 field names (tokens) and values (visible characters, spaces and tabs inside).
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(r"[\x21-\x7e\x80-\xff]+(?:[ \t]+[\x21-\x7e\x80-\xff]+)*|")
# The canary's halt rule (policy, evidence). 200 handshakes: with a true pin-failure share
# of 0 the chance of seeing 10 (5 %) failures by accident is nil, while a real pin failure
# (shares of 20 % and more when an app ships without the new pin) shows well before; five
# percentage points stays above the background of clients that connect and leave (browser
# preconnects, health checks) that the old key sees just as much.
DEFAULT_CANARY_MIN_SAMPLE: Final = 200
DEFAULT_CANARY_HALT_MARGIN: Final = 0.05
# ALPN tokens every client offers: hinting on them would route everyone.
_COMMON_ALPN: Final = frozenset({b"http/1.1", b"http/1.0", b"h2", b"h3", b"acme-tls/1"})


class ConfigError(Exception):
    """The operator's configuration is wrong: says where (file, key path) and what to do."""

    def __init__(self, key_path: str, problem: str, *, file: Path | None = None) -> None:
        self.file = file
        self.key_path = key_path
        self.problem = problem
        where = f"{file}: " if file is not None else ""
        super().__init__(f"{where}{key_path}: {problem}" if key_path else f"{where}{problem}")


@dataclass(frozen=True, slots=True)
class ListenAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ListenConfig:
    addresses: tuple[ListenAddress, ...]
    # SO_REUSEPORT: several dualproxy processes (one per core) share one port.
    reuse_port: bool = False


@dataclass(frozen=True, slots=True)
class KeyConfig:
    name: str
    key: Path
    chain: Path
    # Names (SANs) to request from the ACME CA; non-empty makes the key ACME-managed.
    names: tuple[str, ...] = ()


ChallengeType = Literal["tls-alpn-01", "http-01"]
CHALLENGE_TYPES: Final[tuple[ChallengeType, ...]] = ("tls-alpn-01", "http-01")


@dataclass(frozen=True, slots=True)
class AcmeConfig:
    """Certificates for our own keys from an RFC 8555 CA. Each default says why."""

    directory: str  # the CA's directory URL (https)
    account_key: Path  # made (mode 0600) at the first issuance when missing
    email: str | None = None
    challenge: ChallengeType = "tls-alpn-01"
    # Plain-HTTP listener: http-01 answers, and a redirect to https for everything else.
    http_listen: ListenAddress | None = None
    # Trust for the directory's TLS certificate instead of the system store (a test CA).
    ca_file: Path | None = None
    # `serve` renews in the background; false leaves it to `dualproxy acme renew` (a cron job
    # for many replicas sharing one certs folder).
    renew: bool = True
    # Without ACME Renewal Information, renew once this share of the lifetime has passed:
    # two thirds is Let's Encrypt's and certbot's advice (30 days before a 90-day expiry).
    renew_fraction: float = 2 / 3
    # After a failed attempt wait this long, doubling per failure up to retry_max: 15 min
    # keeps well under Let's Encrypt's failed-validation limit (5 per name per hour); 6 h is
    # the ARI default retry interval (RFC 9773 4.3.3), so a long outage costs 4 attempts a day.
    retry_initial: float = 15 * 60
    retry_max: float = 6 * 60 * 60
    # How often `serve` asks the CA again for renewal information (RFC 9773's default
    # Retry-After is 6 h) and looks at the certificates again.
    recheck_interval: float = 6 * 60 * 60
    # A rotation's new key gets a fresh certificate this long before grace_start, so the
    # window never opens on a certificate that is missing or about to be renewed.
    new_key_lead_days: float = 7
    # One whole issuance (order, validation, finalization), beyond which the attempt fails.
    order_timeout: float = 120


@dataclass(frozen=True, slots=True)
class Hints:
    """During the grace window, a client matching any of these gets the hinted identity."""

    sni: tuple[str, ...] = ()  # lowercase, no trailing dot; "*.example.com" wildcards allowed
    alpn: tuple[bytes, ...] = ()
    networks: tuple[IPNetwork, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.sni or self.alpn or self.networks)


@dataclass(frozen=True, slots=True)
class Rotation:
    """Old and new identities and the grace window in which both are served."""

    old: tuple[str, ...]
    new: tuple[str, ...]
    grace_start: datetime  # aware, UTC
    grace_end: datetime  # aware, UTC, after grace_start
    default: Role = "old"
    canary_percent: float = 0.0
    # The canary halts (hint-less clients get the default again) once the new key has served
    # canary_min_sample canary handshakes and its pin-failure share exceeds the old key's by
    # more than canary_halt_margin (a fraction: 0.05 is five percentage points).
    canary_min_sample: int = DEFAULT_CANARY_MIN_SAMPLE
    canary_halt_margin: float = DEFAULT_CANARY_HALT_MARGIN
    hints_new: Hints = field(default_factory=Hints)
    hints_old: Hints = field(default_factory=Hints)

    def keys_of(self, role: Role) -> tuple[str, ...]:
        return self.old if role == "old" else self.new

    def hints_for(self, role: Role) -> Hints:
        return self.hints_old if role == "old" else self.hints_new


@dataclass(frozen=True, slots=True)
class Limits:
    """Sizes and waits that bound what one client can cost us. Each default says why."""

    # TLS handshake, ClientHello peek included. nginx's ssl_handshake_timeout and Envoy's
    # transport_socket_connect_timeout are both 10 s; a real client on a slow mobile link
    # finishes in a few round trips, a slowloris does not.
    handshake_timeout: float = 10.0
    # Request line and headers must be complete within this, however slowly they trickle
    # (nginx client_header_timeout and HAProxy timeout http-request use 10-60 s).
    request_header_timeout: float = 10.0
    # Idle keep-alive connection is closed silently after this (nginx keepalive_timeout 75 s,
    # Caddy idle_timeout 5 min, Envoy idle 1 h; 60 s keeps mobile reuse and bounds idle sockets).
    keepalive_timeout: float = 60.0
    # Concurrent client connections; beyond it we stop accepting and the kernel's backlog
    # holds new ones (HAProxy maxconn behaviour) instead of failing the ones we have.
    max_connections: int = 4096
    # A request body that stalls this long is abandoned with 408 (nginx client_body_timeout
    # 60 s): slow mobile uploads pass, a client that stopped sending does not pin a slot.
    body_timeout: float = 60.0
    # A client that does not read our response for this long is dropped (nginx send_timeout
    # 60 s); with the bounded buffers, this is what frees a slot held by a reader that stalls.
    send_timeout: float = 60.0
    # Upstream TCP connect plus TLS handshake (Envoy connect_timeout 5 s): App Engine answers
    # in tens of milliseconds; five seconds means it is down, and the client hears 502.
    upstream_connect_timeout: float = 5.0
    # Upstream response head, and each later read of its body (nginx proxy_read_timeout 60 s);
    # exceeded before the head: 504.
    upstream_timeout: float = 60.0
    # Request line (414 beyond it): nginx's large_client_header_buffers line is 8 KiB.
    max_request_line_bytes: int = 8 * 1024
    # Whole request head, line and fields (431 beyond it): 16 KiB, nginx/Envoy's order of size.
    max_header_bytes: int = 16 * 1024
    # Header fields per request (431 beyond it): Envoy's max_headers_count default is 100.
    max_header_count: int = 100
    # Request body size (413 beyond it). nginx's client_max_body_size is 1 MiB; API uploads
    # (a photo) need more. Raise it for APIs that take files.
    max_body_bytes: int = 10 * 1024 * 1024
    # SIGTERM: stop accepting, let requests in flight finish this long, then exit (Kubernetes
    # gives 30 s before SIGKILL by default: terminationGracePeriodSeconds).
    shutdown_grace: float = 30.0


# Range each Limits field accepts: (lowest, highest). Zero-length waits would refuse everyone;
# the highs are where a value stops being a limit.
_LIMIT_RANGES: Final[Mapping[str, tuple[float, float]]] = MappingProxyType(
    {
        "handshake_timeout": (0.1, 300),
        "request_header_timeout": (0.1, 300),
        "keepalive_timeout": (0, 3600),
        "max_connections": (1, 1_000_000),
        "body_timeout": (0.1, 3600),
        "send_timeout": (0.1, 3600),
        "upstream_connect_timeout": (0.1, 300),
        "upstream_timeout": (0.1, 3600),
        "max_request_line_bytes": (256, 1024 * 1024),
        "max_header_bytes": (1024, 1024 * 1024),
        "max_header_count": (8, 10_000),
        "max_body_bytes": (0, 1 << 40),
        "shutdown_grace": (0, 3600),
    }
)


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """Where requests go: the API that stays on managed hosting."""

    url: str
    scheme: Literal["https", "http"]
    host: str  # as in the URL, lowercase; IPv6 without brackets
    port: int
    # Extra CA certificates trusted for the upstream, on top of the system store.
    ca_file: Path | None = None
    # "rewrite": Host is the upstream's (what App Engine routes by); "preserve": the client's.
    host_header: Literal["rewrite", "preserve"] = "rewrite"
    # Added to every upstream request, after hop-by-hop stripping (lets the API refuse bypasses).
    headers: tuple[tuple[str, str], ...] = ()
    # Peers whose X-Forwarded-For and Forwarded headers are kept (a load balancer in front).
    trusted_proxies: tuple[IPNetwork, ...] = ()
    # Idle keep-alive connections kept per process; beyond it a released connection closes.
    # 32 covers the burst a 2-core box serves without keeping sockets nobody reuses.
    pool_max_idle: int = 32
    # An idle pooled connection is closed after this, well before the upstream's own idle
    # cut-off (Google's front ends and nginx keep idle connections for about 60 s or more),
    # so we rarely pick one the upstream is about to close.
    pool_idle_timeout: float = 30.0

    @property
    def authority(self) -> str:
        """host[:port] as the Host header wants it (port omitted when it is the default)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ManifestConfig:
    """The signed pin manifest that dualproxy serves itself (see manifest.py)."""

    # What `dualproxy manifest sign` writes and `serve` serves as is (reloaded on change). It
    # may be missing (requests get 404 until it is signed); it is public, not a secret.
    file: Path
    # Answered by dualproxy on its TLS listener, never forwarded: a path under /.well-known/
    # (RFC 8615) cannot collide with the API's own routes.
    path: str = "/.well-known/dualproxy/pins.json"
    # Cache-Control max-age, in seconds: short, so that a re-signed manifest (a new key
    # announced) reaches apps within minutes, while a burst of app launches costs one fetch.
    max_age: int = 300
    # `serve` logs a warning this long before the manifest expires (an error once it has):
    # two days let a failed daily signing job be noticed and fixed before apps refuse it.
    warn_before_days: float = 2.0


@dataclass(frozen=True, slots=True)
class ReportsConfig:
    """The pin-failure report receiver that dualproxy answers itself (see reports.py)."""

    # JSON Lines of accepted reports; rotated to store.1 .. store.<store_files>.
    store: Path
    # Answered by dualproxy, never forwarded; point TrustKit's kTSKReportUris here.
    path: str = "/.well-known/dualproxy/pin-report"
    # A report's body (413 beyond it): a TrustKit report with two chains of three or four
    # PEM certificates is 8-15 KiB; 64 KiB leaves room and stays cheap to read.
    max_body_bytes: int = 64 * 1024
    # Reports per client (an IPv4 address, an IPv6 /64) and minute after a burst; beyond it
    # 429 with Retry-After. TrustKit sends an identical report at most once a day per device,
    # so an honest client stays far below; many phones behind one carrier NAT may not, and
    # the counts are then a lower bound.
    per_minute: float = 6.0
    burst: int = 20
    # Size of the store file before it is rotated, and how many rotated files are kept:
    # 4 MiB holds ten thousand or more reports; the store never exceeds (files + 1) x size.
    store_max_bytes: int = 4 * 1024 * 1024
    store_files: int = 4


@dataclass(frozen=True, slots=True)
class KeyStoreSettings:
    # Refuse private keys that others can read unless the platform cannot set modes
    # (some volume drivers); when set, every load logs a warning.
    allow_insecure_key_permissions: bool = False
    # How often key, chain and config files are checked for changes (SIGHUP reloads at once).
    # Two seconds: a renewal is picked up quickly and a stat() per file is negligible.
    reload_poll_interval: float = 2.0


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The admin listener: /metrics, /status.json, the status page, canary resume."""

    # Loopback by default: the status page names keys and client counts, and the listener
    # takes the canary resume. None: no admin listener.
    address: ListenAddress | None = ListenAddress("127.0.0.1", 9901)
    # A non-loopback address (so that Prometheus can scrape from another host) must be asked
    # for explicitly; canary resume still answers loopback clients only.
    allow_non_loopback: bool = False


@dataclass(frozen=True, slots=True)
class Config:
    listen: ListenConfig
    keys: Mapping[str, KeyConfig]
    rotation: Rotation | None = None
    limits: Limits = field(default_factory=Limits)
    keystore: KeyStoreSettings = field(default_factory=KeyStoreSettings)
    path: Path | None = None  # the file it was read from, when it was
    # None: dualproxy answers every request itself with a short 200 (TLS and pin testing).
    upstream: UpstreamConfig | None = None
    acme: AcmeConfig | None = None
    admin: AdminConfig = field(default_factory=AdminConfig)
    # App-facing endpoints answered by dualproxy itself (None: not served).
    manifest: ManifestConfig | None = None
    reports: ReportsConfig | None = None

    def acme_keys(self) -> tuple[KeyConfig, ...]:
        """The keys whose certificates dualproxy obtains itself ([acme] and `names`)."""
        if self.acme is None:
            return ()
        return tuple(key for key in self.keys.values() if key.names)

    def identities(self) -> dict[IdentityName, tuple[str, ...]]:
        """The key names each served identity holds (one SSLContext per identity)."""
        if self.rotation is None:
            return {"single": tuple(self.keys)}
        return {"old": self.rotation.old, "new": self.rotation.new}

    def key_order(self) -> tuple[str, ...]:
        """Every key's name as listings show them: the rotation's old keys, then its new ones,
        then the rest (standby keys), each in config order."""
        first = self.rotation.old + self.rotation.new if self.rotation is not None else ()
        return (*first, *(name for name in self.keys if name not in first))

    def watched_files(self) -> tuple[Path, ...]:
        """Files whose change triggers a reload."""
        files = [self.path] if self.path is not None else []
        for key in self.keys.values():
            files += [key.key, key.chain]
        if self.manifest is not None:  # re-signed: served from the next poll on
            files.append(self.manifest.file)
        return tuple(files)


def load(path: Path | str) -> Config:
    """Read and validate a config file; raises ConfigError."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            "", "config file not found; pass -c PATH or create it (see config.toml)", file=path
        ) from None
    except OSError as exc:
        raise ConfigError("", f"cannot read the config file: {exc.strerror}", file=path) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError("", "the config file is not UTF-8 text", file=path) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"not valid TOML: {exc}", file=path) from None
    try:
        return parse(data, base_dir=path.parent.absolute(), path=path)
    except ConfigError as exc:
        raise ConfigError(exc.key_path, exc.problem, file=path) from None


def parse(
    data: Mapping[str, object],
    *,
    base_dir: Path,
    path: Path | None = None,
    check_files: bool = True,
) -> Config:
    """Validate already-decoded TOML; relative paths resolve against `base_dir`."""
    root = _Table(data, "")
    listen = _parse_listen(root.table("listen", required=True))
    acme_table = root.table("acme")
    acme = _parse_acme(acme_table, base_dir, check_files) if acme_table is not None else None
    http_listen = acme.http_listen if acme is not None else None
    # Port 0 (any free port, as tests use) cannot clash.
    if http_listen is not None and http_listen.port and http_listen in listen.addresses:
        raise ConfigError(
            "acme.http_listen", "is also a TLS listen.address; give plain HTTP its own port"
        )
    keys = _parse_keys(root.table("keys", required=True), base_dir, check_files, acme)
    rotation_table = root.table("rotation")
    rotation = _parse_rotation(rotation_table, keys) if rotation_table is not None else None
    if rotation is None and not keys:
        raise ConfigError("keys", "no key is configured; add a [keys.NAME] table")
    limits = _parse_limits(root.table("limits"))
    keystore = _parse_keystore(root.table("keystore"))
    upstream_table = root.table("upstream")
    upstream = (
        _parse_upstream(upstream_table, base_dir, check_files)
        if upstream_table is not None
        else None
    )
    admin = _parse_admin(root.table("admin"))
    manifest_table = root.table("manifest")
    manifest = _parse_manifest(manifest_table, base_dir) if manifest_table is not None else None
    reports_table = root.table("reports")
    reports = _parse_reports(reports_table, base_dir) if reports_table is not None else None
    if manifest is not None and reports is not None and manifest.path == reports.path:
        raise ConfigError("reports.path", "is also manifest.path; give each its own path")
    root.done()
    return Config(
        listen=listen,
        keys=MappingProxyType(keys),
        rotation=rotation,
        limits=limits,
        keystore=keystore,
        path=path,
        upstream=upstream,
        acme=acme,
        admin=admin,
        manifest=manifest,
        reports=reports,
    )


def parse_time(text: str) -> datetime:
    """An ISO 8601 instant with a zone ("2026-12-01T00:00:00Z"), as UTC; ValueError otherwise."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO 8601 time such as 2026-12-01T00:00:00Z") from None
    if value.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone; add Z (UTC) or an offset such as +01:00")
    return value.astimezone(UTC)


def format_time(moment: datetime) -> str:
    """An instant as RFC 3339 in UTC to the second ("2026-12-01T00:00:00Z"): what parse_time
    reads, and how every document and message of ours writes a time."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def normalize_host(name: str) -> str:
    """Lowercase and strip one trailing dot: how SNI names and hints are compared."""
    return name.lower().removesuffix(".")


# --- parsing helpers -------------------------------------------------------------------

_T = TypeVar("_T")

# difflib ratio above which an unknown key is reported as a likely typo of a known one
# ("grace_ned" vs "grace_end" scores 0.89, unrelated keys of similar length about 0.3-0.5).
_TYPO_SIMILARITY: Final = 0.75


class _Table:
    """A TOML table being read: typed getters, and `done()` rejects keys nobody asked for."""

    def __init__(self, data: Mapping[str, object], prefix: str) -> None:
        self._data = data
        self._prefix = prefix
        self._seen: set[str] = set()

    def path(self, key: str) -> str:
        return f"{self._prefix}.{key}" if self._prefix else key

    def _get(self, key: str, kind: type[_T], kind_name: str, required: bool) -> _T | None:
        self._seen.add(key)
        if key not in self._data:
            if required:
                raise self.missing(key, f"add {kind_name}")
            return None
        value = self._data[key]
        # bool is an int in Python; TOML keeps them apart and so do we.
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise ConfigError(
                self.path(key), f"expected {kind_name}, got {_toml_type(value)} {value!r}"
            )
        return value

    def table(self, key: str, *, required: bool = False) -> _Table | None:
        value = self._get(key, dict, "a table", required)
        return None if value is None else _Table(value, self.path(key))

    def has(self, key: str) -> bool:
        return key in self._data

    def names(self) -> list[str]:
        """Every key present (for tables whose keys are the operator's, like [upstream.headers])."""
        return list(self._data)

    def tables(self) -> list[tuple[str, _Table]]:
        """Every entry, each of which must be a table (like [keys.NAME])."""
        out = []
        for key in self._data:
            sub = self.table(key)
            assert sub is not None
            out.append((key, sub))
        return out

    def string(self, key: str, *, required: bool = False) -> str | None:
        return self._get(key, str, "a string", required)

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key, bool, "true or false", False)
        return default if value is None else value

    def number(self, key: str, default: float, *, low: float, high: float) -> float:
        self._seen.add(key)
        value = self._data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(self.path(key), f"expected a number, got {_toml_type(value)}")
        if not low <= value <= high:
            raise ConfigError(self.path(key), f"{value} is out of range; use {low} to {high}")
        return float(value)

    def integer(self, key: str, default: int, *, low: int, high: int) -> int:
        value = self._get(key, int, "an integer", False)
        value = default if value is None else value
        if not low <= value <= high:
            raise ConfigError(self.path(key), f"{value} is out of range; use {low} to {high}")
        return value

    def strings(self, key: str, *, one_allowed: bool = False) -> tuple[str, ...]:
        """A list of strings (or, with one_allowed, a single string); () when absent."""
        self._seen.add(key)
        if key not in self._data:
            return ()
        value = self._data[key]
        if one_allowed and isinstance(value, str):
            return (value,)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            expected = "a string or a list of strings" if one_allowed else "a list of strings"
            raise ConfigError(self.path(key), f"expected {expected}, got {value!r}")
        return tuple(value)

    def instant(self, key: str) -> datetime:
        self._seen.add(key)
        value = self._data.get(key)
        if value is None:
            raise self.missing(key, "add a TOML datetime like 2026-12-01T00:00:00Z")
        if isinstance(value, str):
            raise ConfigError(
                self.path(key), "write the time unquoted, as a TOML datetime (2026-12-01T00:00:00Z)"
            )
        if not isinstance(value, datetime):
            raise ConfigError(
                self.path(key), f"expected a datetime like 2026-12-01T00:00:00Z, got {value!r}"
            )
        if value.tzinfo is None:
            raise ConfigError(
                self.path(key), "the time has no zone; add Z (UTC) or an offset such as +01:00"
            )
        return value.astimezone(UTC)

    def missing(self, key: str, advice: str) -> ConfigError:
        """The error for a required key that is absent, pointing at a likely misspelling."""
        strangers = [k for k in self._data if k not in self._seen and k != key]
        typo = difflib.get_close_matches(key, strangers, n=1, cutoff=_TYPO_SIMILARITY)
        found = f" (found {typo[0]!r}: misspelled?)" if typo else ""
        return ConfigError(self.path(key), f"missing; {advice}{found}")

    def done(self) -> None:
        unknown = [k for k in self._data if k not in self._seen]
        if unknown:
            known = difflib.get_close_matches(unknown[0], self._seen, n=1, cutoff=_TYPO_SIMILARITY)
            advice = f"did you mean {known[0]!r}?" if known else "check it against config.toml"
            raise ConfigError(self.path(unknown[0]), f"unknown setting; {advice}")


def _toml_type(value: object) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "a table",
        datetime: "a datetime",
    }.get(type(value), type(value).__name__)


def _parse_listen(table: _Table | None) -> ListenConfig:
    assert table is not None
    texts = table.strings("address", one_allowed=True)
    if not texts:
        raise table.missing("address", 'add e.g. address = "127.0.0.1:8443"')
    addresses = []
    for text in texts:
        try:
            addresses.append(parse_address(text))
        except ValueError as exc:
            raise ConfigError(table.path("address"), str(exc)) from None
    if len(set(addresses)) != len(addresses):
        raise ConfigError(table.path("address"), "an address is listed twice")
    reuse_port = table.boolean("reuse_port", False)
    table.done()
    return ListenConfig(addresses=tuple(addresses), reuse_port=reuse_port)


def parse_address(text: str) -> ListenAddress:
    """ "127.0.0.1:8443", "[::1]:8443", "localhost:8443", ":8443" (every interface)."""
    host, sep, port_text = text.rpartition(":")
    # isdigit() alone admits non-ASCII digits ("²", Arabic-Indic) that int() rejects or reads.
    port_ok = port_text.isascii() and port_text.isdigit()
    if not sep or not port_ok or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:8443 or [::1]:8443)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)  # raises ValueError with a clear message
    elif ":" in host:
        raise ValueError(f"{text!r}: put an IPv6 address in brackets, e.g. [::1]:8443")
    return ListenAddress(host=host or "", port=int(port_text))


def _parse_keys(
    table: _Table | None, base_dir: Path, check_files: bool, acme: AcmeConfig | None
) -> dict[str, KeyConfig]:
    assert table is not None
    keys = {}
    for name, entry in table.tables():
        if (problem := key_name_problem(name)) is not None:
            raise ConfigError(table.path(name), problem)
        names = _parse_acme_names(entry, acme)
        paths = {}
        for field_name in ("key", "chain"):
            text = entry.string(field_name, required=True)
            assert text is not None
            file = base_dir / Path(text).expanduser()
            # An ACME-managed key's chain may be missing: dualproxy obtains it.
            may_be_missing = field_name == "chain" and bool(names)
            if check_files and not may_be_missing and not file.is_file():
                what = "private key" if field_name == "key" else "certificate chain"
                advice = f"create it (dualproxy keys new {name})"
                if field_name == "chain":
                    advice = (
                        f"get a certificate for it (dualproxy keys csr {name}), or add names ="
                        ' ["..."] and an [acme] table to have dualproxy obtain it'
                    )
                raise ConfigError(
                    entry.path(field_name),
                    f"{what} file {file} does not exist; {advice}, or fix the path (relative"
                    " paths start at the config's folder)",
                )
            paths[field_name] = file
        entry.done()
        keys[name] = KeyConfig(name=name, key=paths["key"], chain=paths["chain"], names=names)
    if acme is not None and not any(key.names for key in keys.values()):
        raise ConfigError(
            "acme",
            'no key has names to request; add names = ["api.example.com"] to a [keys.NAME]'
            " table, or remove [acme]",
        )
    return keys


def _parse_acme_names(entry: _Table, acme: AcmeConfig | None) -> tuple[str, ...]:
    """A key's `names`: DNS names the ACME challenges dualproxy answers can prove."""
    texts = entry.strings("names")
    key_path = entry.path("names")
    if entry.has("names") and not texts:
        raise ConfigError(key_path, "is empty; list the names to request, or remove it")
    if texts and acme is None:
        raise ConfigError(
            key_path,
            "names are requested from an ACME CA; add an [acme] table (see config.toml),"
            " or remove names",
        )
    names: list[str] = []
    for text in texts:
        if _is_ip(text):
            raise ConfigError(
                key_path, f"{text!r}: dualproxy requests DNS names only; use a host name"
            )
        if (problem := host_name_problem(text)) is not None:
            raise ConfigError(key_path, problem)
        name = normalize_host(text)
        if name.startswith("*."):
            raise ConfigError(
                key_path,
                f"{text!r}: a wildcard needs the dns-01 challenge, which dualproxy does not"
                " answer; list each name",
            )
        if name in names:
            raise ConfigError(key_path, f"{text!r} is listed twice")
        names.append(name)
    return tuple(names)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _parse_acme(table: _Table, base_dir: Path, check_files: bool) -> AcmeConfig:
    directory = table.string("directory", required=True)
    assert directory is not None
    parts = urlsplit(directory)
    if parts.scheme != "https" or not parts.hostname:
        raise ConfigError(
            table.path("directory"),
            f"{directory!r} is not an https URL like"
            " https://acme-v02.api.letsencrypt.org/directory",
        )
    email = table.string("email")
    if email is not None and not re.fullmatch(r"[^@\s:,]+@[^@\s:,]+\.[^@\s:,]+", email):
        raise ConfigError(table.path("email"), f"{email!r} is not an email address")
    account_text = table.string("account_key") or "certs/acme/account.pem"
    account_key = base_dir / Path(account_text).expanduser()
    challenge = table.string("challenge") or "tls-alpn-01"
    if challenge not in CHALLENGE_TYPES:
        raise ConfigError(
            table.path("challenge"), f'{challenge!r} is neither "tls-alpn-01" nor "http-01"'
        )
    http_listen = None
    if (http_text := table.string("http_listen")) is not None:
        try:
            http_listen = parse_address(http_text)
        except ValueError as exc:
            raise ConfigError(table.path("http_listen"), str(exc)) from None
    if challenge == "http-01" and http_listen is None:
        raise table.missing(
            "http_listen",
            'the http-01 challenge is answered on plain HTTP: add http_listen = "0.0.0.0:80"'
            ' (the CA connects to port 80), or use challenge = "tls-alpn-01"',
        )
    ca_file = None
    if (ca_text := table.string("ca_file")) is not None:
        ca_file = base_dir / Path(ca_text).expanduser()
        if check_files and not ca_file.is_file():
            raise ConfigError(table.path("ca_file"), f"CA file {ca_file} does not exist")
    d = AcmeConfig(directory="", account_key=Path())
    renew = table.boolean("renew", d.renew)
    renew_fraction = table.number("renew_fraction", d.renew_fraction, low=0.1, high=0.95)
    # One second at least: never a tight loop, whatever the config says.
    retry_initial = table.number("retry_initial", d.retry_initial, low=1, high=86400)
    retry_max = table.number("retry_max", d.retry_max, low=1, high=7 * 86400)
    if retry_max < retry_initial:
        raise ConfigError(
            table.path("retry_max"), "must be at least retry_initial (the first wait)"
        )
    recheck = table.number("recheck_interval", d.recheck_interval, low=1, high=7 * 86400)
    lead = table.number("new_key_lead_days", d.new_key_lead_days, low=0, high=365)
    order_timeout = table.number("order_timeout", d.order_timeout, low=5, high=3600)
    table.done()
    return AcmeConfig(
        directory=directory,
        account_key=account_key,
        email=email,
        challenge="http-01" if challenge == "http-01" else "tls-alpn-01",
        http_listen=http_listen,
        ca_file=ca_file,
        renew=renew,
        renew_fraction=renew_fraction,
        retry_initial=retry_initial,
        retry_max=retry_max,
        recheck_interval=recheck,
        new_key_lead_days=lead,
        order_timeout=order_timeout,
    )


def _parse_rotation(table: _Table, keys: Mapping[str, KeyConfig]) -> Rotation:
    roles: dict[Role, tuple[str, ...]] = {}
    for role in ("old", "new"):
        names = table.strings(role, one_allowed=True)
        if not names:
            raise table.missing(role, "name one key, or a list of keys")
        for name in names:
            if name not in keys:
                known = ", ".join(sorted(keys)) or "none"
                raise ConfigError(
                    table.path(role), f"no key named {name!r}; the [keys] tables define: {known}"
                )
        if len(set(names)) != len(names):
            raise ConfigError(table.path(role), "a key is listed twice")
        roles[role] = names
    shared = set(roles["old"]) & set(roles["new"])
    if shared:
        raise ConfigError(
            table.path("new"),
            f"key {sorted(shared)[0]!r} is both old and new; a rotation moves to a different key",
        )
    start = table.instant("grace_start")
    end = table.instant("grace_end")
    if not start < end:
        raise ConfigError(
            table.path("grace_end"), "the grace window must end after it starts (grace_start)"
        )
    default = table.string("default")
    default = "old" if default is None else default
    if default not in ("old", "new"):
        raise ConfigError(table.path("default"), f'{default!r} is neither "old" nor "new"')
    canary = table.number("canary_percent", 0.0, low=0.0, high=100.0)
    if canary and default == "new":
        raise ConfigError(
            table.path("canary_percent"),
            'the canary sends a share of default clients to the new key; with default = "new"'
            ' they all get it already: set canary_percent = 0 or default = "old"',
        )
    min_sample = table.integer(
        "canary_min_sample", DEFAULT_CANARY_MIN_SAMPLE, low=1, high=1_000_000_000
    )
    margin = table.number("canary_halt_margin", DEFAULT_CANARY_HALT_MARGIN, low=0.0, high=1.0)
    hints = table.table("hints")
    hints_new = hints_old = Hints()
    if hints is not None:
        hints_new = _parse_hints(hints.table("new"))
        hints_old = _parse_hints(hints.table("old"))
        hints.done()
        _check_hints_disjoint(hints_new, hints_old, table.path("hints"))
    table.done()
    return Rotation(
        old=roles["old"],
        new=roles["new"],
        grace_start=start,
        grace_end=end,
        default="old" if default == "old" else "new",
        canary_percent=canary,
        canary_min_sample=min_sample,
        canary_halt_margin=margin,
        hints_new=hints_new,
        hints_old=hints_old,
    )


def _parse_hints(table: _Table | None) -> Hints:
    if table is None:
        return Hints()
    sni = tuple(_parse_sni_pattern(table.path("sni"), s) for s in table.strings("sni"))
    alpn = tuple(_parse_alpn_token(table.path("alpn"), a) for a in table.strings("alpn"))
    networks = []
    for text in table.strings("networks"):
        try:
            networks.append(ipaddress.ip_network(text, strict=True))
        except ValueError as exc:
            raise ConfigError(
                table.path("networks"), f"{exc} (write a network like 10.0.0.0/8 or 2001:db8::/32)"
            ) from None
    table.done()
    return Hints(sni=sni, alpn=alpn, networks=tuple(networks))


def host_name_problem(text: str) -> str | None:
    """Why `text` is not a DNS name a certificate or SNI can carry (a leading "*." allowed);
    None when it is one."""
    # Checked before lowercasing could hide it: the Kelvin sign "\u212a" lowercases to "k".
    if not text.isascii():
        return f"{text!r}: write internationalized names in punycode (xn--)"
    name = normalize_host(text)
    labels = name.split(".")
    wildcard = labels[0] == "*"
    if wildcard:
        labels = labels[1:]
    if (
        len(name) > _MAX_HOST_NAME
        or len(labels) < (2 if wildcard else 1)
        or not all(_DNS_LABEL.fullmatch(x) for x in labels)
    ):
        return f"{text!r} is not a host name (a wildcard is allowed only as a leading '*.')"
    return None


def key_name_problem(name: str) -> str | None:
    """Why `name` cannot name a key (it becomes a folder under certs/); None when it can."""
    if KEY_NAME.fullmatch(name):
        return None
    return (
        f"{name!r}: key names are letters, digits, '.', '_' and '-' (at most 64), starting with"
        " a letter or digit"
    )


def _parse_sni_pattern(key_path: str, text: str) -> str:
    problem = host_name_problem(text)
    if problem is not None:
        raise ConfigError(key_path, problem)
    return normalize_host(text)


def _parse_alpn_token(key_path: str, text: str) -> bytes:
    token = text.encode("utf-8")
    if not 1 <= len(token) <= 255 or not text.isascii() or not text.isprintable():
        raise ConfigError(key_path, f"{text!r}: an ALPN token is 1-255 printable ASCII bytes")
    if token in _COMMON_ALPN:
        raise ConfigError(
            key_path,
            f"{text!r} is offered by ordinary clients, so it cannot tell apps apart; pick a"
            " dedicated token such as dualproxy-k2026b",
        )
    return token


def _check_hints_disjoint(new: Hints, old: Hints, prefix: str) -> None:
    for kind in ("sni", "alpn"):
        both = set(getattr(new, kind)) & set(getattr(old, kind))
        if both:
            raise ConfigError(
                f"{prefix}.old.{kind}",
                f"{sorted(both)[0]!r} is hinted for both old and new; keep it in one of them",
            )
    # Equal names were caught above; a wildcard can still cover a name hinted the other way.
    for new_sni in new.sni:
        for old_sni in old.sni:
            if _sni_patterns_overlap(new_sni, old_sni):
                raise ConfigError(
                    f"{prefix}.old.sni",
                    f"{old_sni!r} and {new_sni!r} in hints.new.sni match the same host names;"
                    " a client sending one would be ambiguous",
                )
    for a in new.networks:
        for b in old.networks:
            if a.version == b.version and a.overlaps(b):
                raise ConfigError(
                    f"{prefix}.old.networks",
                    f"{b} overlaps {a} in hints.new.networks; a client in both would be ambiguous",
                )


def _sni_patterns_overlap(a: str, b: str) -> bool:
    """Whether one host name matches both (normalized) patterns: "*.x.com" names every "h.x.com"."""
    if a.startswith("*.") == b.startswith("*."):
        return a == b
    wildcard, name = (a, b) if a.startswith("*.") else (b, a)
    return name.partition(".")[2] == wildcard[2:]


def _parse_limits(table: _Table | None) -> Limits:
    if table is None:
        return Limits()
    defaults = Limits()
    values: dict[str, float | int] = {}
    for name, (low, high) in _LIMIT_RANGES.items():
        default = getattr(defaults, name)
        if isinstance(default, int):
            values[name] = table.integer(name, default, low=int(low), high=int(high))
        else:
            values[name] = table.number(name, default, low=low, high=high)
    table.done()
    return Limits(**values)  # type: ignore[arg-type]


def _parse_upstream(table: _Table, base_dir: Path, check_files: bool) -> UpstreamConfig:
    url = table.string("url", required=True)
    assert url is not None
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigError(
            table.path("url"), f"{url!r} is not an http(s) URL like https://my-project.appspot.com"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ConfigError(
            table.path("url"),
            "give only the scheme, host and port: requests keep their own path and query",
        )
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ConfigError(table.path("url"), f"{url!r} has an invalid port") from None
    ca_file = None
    if (ca_text := table.string("ca_file")) is not None:
        ca_file = base_dir / Path(ca_text).expanduser()
        if check_files and not ca_file.is_file():
            raise ConfigError(table.path("ca_file"), f"CA file {ca_file} does not exist")
    host_header = table.string("host") or "rewrite"
    if host_header not in ("rewrite", "preserve"):
        raise ConfigError(
            table.path("host"), f'{host_header!r} is neither "rewrite" nor "preserve"'
        )
    headers = []
    if (extra := table.table("headers")) is not None:
        for name in extra.names():
            value = extra.string(name, required=True)
            assert value is not None
            if not _TOKEN.fullmatch(name) or not _FIELD_VALUE.fullmatch(value):
                raise ConfigError(
                    extra.path(name), "not a valid HTTP header name and value (no CR, LF or NUL)"
                )
            headers.append((name, value))
        extra.done()
    trusted = []
    for text in table.strings("trusted_proxies"):
        try:
            trusted.append(ipaddress.ip_network(text, strict=True))
        except ValueError as exc:
            raise ConfigError(table.path("trusted_proxies"), str(exc)) from None
    defaults = UpstreamConfig(url="", scheme="https", host="", port=0)
    pool_max_idle = table.integer("pool_max_idle", defaults.pool_max_idle, low=0, high=10_000)
    pool_idle_timeout = table.number(
        "pool_idle_timeout", defaults.pool_idle_timeout, low=0.1, high=3600
    )
    table.done()
    upstream = UpstreamConfig(
        url=url,
        scheme="https" if parts.scheme == "https" else "http",
        host=parts.hostname.lower(),
        port=port,
        ca_file=ca_file,
        host_header="preserve" if host_header == "preserve" else "rewrite",
        headers=tuple(headers),
        trusted_proxies=tuple(trusted),
        pool_max_idle=pool_max_idle,
        pool_idle_timeout=pool_idle_timeout,
    )
    # The forwarding rules know which headers dualproxy manages itself (hop-by-hop, framing,
    # Host); asking them now turns a header we could never send into a config error.
    from dualproxy.http.rewrite import ForwardingRules  # here: rewrite imports this module

    try:
        ForwardingRules.from_config(upstream)
    except ValueError as exc:
        key_path, _, problem = str(exc).partition(": ")
        raise ConfigError(key_path, problem) from None
    return upstream


def _parse_admin(table: _Table | None) -> AdminConfig:
    if table is None:
        return AdminConfig()
    allow = table.boolean("allow_non_loopback", False)
    text = table.string("address")
    enabled = table.boolean("enabled", True)
    address = AdminConfig().address
    if text is not None:
        try:
            address = parse_address(text)
        except ValueError as exc:
            raise ConfigError(table.path("address"), str(exc)) from None
    table.done()
    if not enabled:
        return AdminConfig(address=None, allow_non_loopback=allow)
    assert address is not None
    if (problem := admin_address_problem(address, allow_non_loopback=allow)) is not None:
        raise ConfigError(table.path("address"), problem)
    return AdminConfig(address=address, allow_non_loopback=allow)


def admin_address_problem(address: ListenAddress, *, allow_non_loopback: bool) -> str | None:
    """Why the admin listener may not listen at `address`, or None: the config's address and
    `serve --admin` alike."""
    if allow_non_loopback or is_loopback_host(address.host):
        return None
    return (
        f"{address} is not a loopback address; the admin listener shows which clients get"
        " which key and takes the canary resume, so it listens on 127.0.0.1 or [::1] unless"
        " admin.allow_non_loopback = true (then firewall it)"
    )


def is_loopback_host(host: str) -> bool:
    """Whether a listen host ("127.0.0.1", "::1", "localhost") is loopback; "" (every
    interface) and other names are not."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_keystore(table: _Table | None) -> KeyStoreSettings:
    if table is None:
        return KeyStoreSettings()
    d = KeyStoreSettings()
    settings = KeyStoreSettings(
        allow_insecure_key_permissions=table.boolean(
            "allow_insecure_key_permissions", d.allow_insecure_key_permissions
        ),
        reload_poll_interval=table.number(
            "reload_poll_interval", d.reload_poll_interval, low=0.1, high=3600
        ),
    )
    table.done()
    return settings


# An origin-form path of unreserved and sub-delimiter characters (RFC 3986 pchar without
# percent-encoding, which clients may spell differently): compared byte for byte.
_LOCAL_PATH: Final = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@/-]*")


def _parse_local_path(table: _Table, default: str) -> str:
    """The path of an endpoint dualproxy answers itself instead of the upstream."""
    path = table.string("path") or default
    if not _LOCAL_PATH.fullmatch(path) or path == "/":
        raise ConfigError(
            table.path("path"),
            f"{path!r} is not a path like {default!r} (no query, no %-escapes, not / alone:"
            " requests to it never reach the upstream)",
        )
    return path


def _parse_manifest(table: _Table, base_dir: Path) -> ManifestConfig:
    d = ManifestConfig(file=Path())
    path = _parse_local_path(table, d.path)
    file = base_dir / Path(table.string("file") or "certs/pins.jws").expanduser()
    max_age = table.integer("max_age", d.max_age, low=0, high=86400)
    warn = table.number("warn_before_days", d.warn_before_days, low=0, high=90)
    table.done()
    return ManifestConfig(file=file, path=path, max_age=max_age, warn_before_days=warn)


def _parse_reports(table: _Table, base_dir: Path) -> ReportsConfig:
    d = ReportsConfig(store=Path())
    path = _parse_local_path(table, d.path)
    store = base_dir / Path(table.string("store") or "reports/pin-reports.jsonl").expanduser()
    # Below 1 KiB no real report fits; above 1 MiB it is no longer a report.
    max_body = table.integer("max_body_bytes", d.max_body_bytes, low=1024, high=1024 * 1024)
    per_minute = table.number("per_minute", d.per_minute, low=0.01, high=6000)
    burst = table.integer("burst", d.burst, low=1, high=10_000)
    # At least one report of the largest size per file, so that any report can be stored.
    store_max = table.integer("store_max_bytes", d.store_max_bytes, low=2 * max_body, high=1 << 34)
    store_files = table.integer("store_files", d.store_files, low=0, high=100)
    table.done()
    return ReportsConfig(
        store=store,
        path=path,
        max_body_bytes=max_body,
        per_minute=per_minute,
        burst=burst,
        store_max_bytes=store_max,
        store_files=store_files,
    )
