"""The configuration's shape: one frozen dataclass per table of config.toml, each default with
the reason for its value. `loader` builds them from a file, checking every value.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Final, Literal

from dualproxy.config.names import IPNetwork, ListenAddress, is_loopback_host

Role = Literal["old", "new"]

# The identities the server presents: "single" when no rotation is configured.
IdentityName = Literal["single", "old", "new"]

DEFAULT_CONFIG_FILE: Final = "config.toml"

# Header fields an operator may not add to upstream requests ([upstream.headers]): the
# hop-by-hop ones (RFC 9110 §7.6.1: Connection, Keep-Alive, Proxy-Connection, TE, Transfer-
# Encoding, Upgrade; Proxy-Authenticate and Proxy-Authorization, §11.7; Trailer) and those
# dualproxy writes itself on each hop: framing (Content-Length), Expect and Host. Lowercase.
MANAGED_HEADERS: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "expect",
        "host",
    }
)

# The canary's halt rule (rotation.canary, evidence). The margin: five percentage points
# stays above the background of clients that connect and leave (browser preconnects, health
# checks) that the old key sees just as much, while an app shipped without the new pin fails
# far more (shares of 20 % and more).
DEFAULT_CANARY_HALT_MARGIN: Final = 0.05
# The sequential test's false-halt probability over a whole window, however often it looks:
# one rotation in a hundred halts without cause at most, and a halt costs time (a resume),
# never an app. Lower costs little: log(1/a) grows slowly (0.001 needs about seven more
# canary handshakes than 0.01 when 30 % of them fail).
DEFAULT_CANARY_FALSE_HALT: Final = 0.01

CloseRule = Literal["at-grace-end", "when-safe"]
CLOSE_RULES: Final[tuple[CloseRule, ...]] = ("at-grace-end", "when-safe")
# With close = "when-safe", the window ends once at most this share of handshakes would fail
# on the new key (an upper bound: rotation.canary). Half a percent is within the background of
# pin-failure-like connections many APIs see anyway (0.2-1 %), so what closing adds is lost
# in it; a lower value needs more canary handshakes to prove (the bound shrinks about as
# log(n)/n: some 2,000 canary handshakes for 0.5 % with 5 % of clients in the canary).
DEFAULT_MAX_BREAKAGE: Final = 0.005


ProxyProtocolMode = Literal["off", "required", "optional"]


@dataclass(frozen=True, slots=True)
class ListenConfig:
    addresses: tuple[ListenAddress, ...]
    # SO_REUSEPORT: several dualproxy processes (one per core) share one port.
    reuse_port: bool = False
    # The PROXY protocol (HAProxy's, v1 and v2) from a load balancer that proxies TCP, so that
    # the client's own address is used everywhere: "off" (no header is read), "required"
    # (every connection starts with one; a peer outside proxy_protocol_from is refused), or
    # "optional" (the balancer's connections may carry one; anyone else's must not).
    proxy_protocol: ProxyProtocolMode = "off"
    # The balancers allowed to send a header: required unless off, so that no client can
    # claim another's address by writing a header itself.
    proxy_protocol_from: tuple[IPNetwork, ...] = ()


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
    # The canary halts (hint-less clients get the default again) once a sequential test is
    # sure, at false-halt probability canary_false_halt, that the new key's pin-failure share
    # exceeds the old key's by more than canary_halt_margin (a fraction: 0.05 is five points).
    canary_halt_margin: float = DEFAULT_CANARY_HALT_MARGIN
    canary_false_halt: float = DEFAULT_CANARY_FALSE_HALT
    # Read from old configs and unused (the sequential test replaced the fixed sample); None
    # when the config does not set it.
    canary_min_sample: int | None = None
    hints_new: Hints = field(default_factory=Hints)
    hints_old: Hints = field(default_factory=Hints)
    # "at-grace-end": every client gets new from grace_end on. "when-safe": from grace_end the
    # old key stays the default while more than max_breakage of handshakes would fail on the
    # new key (the canary's estimate, an upper bound), until grace_deadline at the latest.
    close: CloseRule = "at-grace-end"
    max_breakage: float = DEFAULT_MAX_BREAKAGE
    grace_deadline: datetime | None = None  # aware, UTC, after grace_end; set for "when-safe"

    def keys_of(self, role: Role) -> tuple[str, ...]:
        return self.old if role == "old" else self.new

    @property
    def old_served_until(self) -> datetime:
        """The latest instant the old key may still be served: grace_end, or with
        close = "when-safe" grace_deadline (the evidence may close the window earlier)."""
        if self.close == "when-safe" and self.grace_deadline is not None:
            return self.grace_deadline
        return self.grace_end

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
    # Concurrent connections of one client (an IPv4 address or an IPv6 /64; behind a balancer
    # with the PROXY protocol, the client it names): beyond it a new one is closed at once, so
    # one client cannot take every slot (HAProxy and Envoy have such limits). An app holds a
    # few (OkHttp keeps 5 idle, browsers 6 per host); a carrier-grade NAT puts hundreds of
    # phones behind one IPv4 address, so a quarter of max_connections stays far above them
    # while a flood from one address stops there.
    max_connections_per_client: int = 1024
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
    # Header fields per upstream response (502 beyond it): HAProxy stops at 101
    # (tune.http.maxhdr) and Envoy at 100 (a cluster's max_headers_count). An API response has
    # a dozen or two; hundreds are a broken or hostile upstream, each field a copy we make.
    max_response_header_count: int = 100
    # Request body size (413 beyond it). nginx's client_max_body_size is 1 MiB; API uploads
    # (a photo) need more. Raise it for APIs that take files.
    max_body_bytes: int = 10 * 1024 * 1024
    # SIGTERM: stop accepting, let requests in flight finish this long, then exit (Kubernetes
    # gives 30 s before SIGKILL by default: terminationGracePeriodSeconds).
    shutdown_grace: float = 30.0
    # HTTP/2 streams one client connection may have in flight (SETTINGS_MAX_CONCURRENT_STREAMS;
    # a client that opens more once it acknowledged the setting gets GOAWAY PROTOCOL_ERROR,
    # before that the stream is refused with REFUSED_STREAM): 100, Envoy's and nginx's order
    # (nginx http2_max_concurrent_streams 128), RFC 9113's recommended minimum.
    h2_max_concurrent_streams: int = 100
    # Requests (HTTP/2 streams) one client connection may carry; the last is answered with
    # `Connection: close` (HTTP/1.1) or followed by GOAWAY (HTTP/2): nginx's keepalive_requests
    # default. It bounds what one connection's lifetime holds, and lets the kernel spread
    # long-lived clients across the processes sharing the port; raise it for clients that keep
    # one connection for hours (a benchmark's load generator, which may not reconnect).
    keepalive_requests: int = 1000
    # A WebSocket tunnel that moves no byte either way for this long is closed: HAProxy's
    # `timeout tunnel` as its documentation sets it (1 h). Apps ping far more often (OkHttp's
    # pingInterval, URLSession's sendPing: seconds to a minute); a dead peer frees its slot.
    websocket_idle_timeout: float = 3600.0
    # A PROXY protocol header ([listen] proxy_protocol) must be complete within this: the
    # balancer writes it with the connection's first packet, so a few seconds only bound a
    # peer that is not the balancer it claims to be (HAProxy's spec allows at most 16 + 65535
    # bytes; HAProxy itself waits at most `timeout client`).
    proxy_header_timeout: float = 3.0


# The most requests one connection may carry, whatever keepalive_requests says: what the
# relay's loops count to (nginx takes up to 2^32).
MAX_KEEPALIVE_REQUESTS: Final = 1 << 32

# Range each Limits field accepts: (lowest, highest). Zero-length waits would refuse everyone;
# the highs are where a value stops being a limit.
LIMIT_RANGES: Final[Mapping[str, tuple[float, float]]] = MappingProxyType(
    {
        "handshake_timeout": (0.1, 300),
        "request_header_timeout": (0.1, 300),
        "keepalive_timeout": (0, 3600),
        "max_connections": (1, 1_000_000),
        "max_connections_per_client": (1, 1_000_000),
        "body_timeout": (0.1, 3600),
        "send_timeout": (0.1, 3600),
        "upstream_connect_timeout": (0.1, 300),
        "upstream_timeout": (0.1, 3600),
        "max_request_line_bytes": (256, 1024 * 1024),
        "max_header_bytes": (1024, 1024 * 1024),
        "max_header_count": (8, 10_000),
        "max_response_header_count": (8, 10_000),
        "max_body_bytes": (0, 1 << 40),
        "shutdown_grace": (0, 3600),
        "h2_max_concurrent_streams": (1, 1000),
        "keepalive_requests": (1, MAX_KEEPALIVE_REQUESTS),
        "websocket_idle_timeout": (1, 86400),
        "proxy_header_timeout": (0.1, 60),
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
    # Plain http:// to an upstream that is not on this machine: the requests (with the
    # clients' credentials) and the answers cross the network unencrypted, so it is refused
    # unless the operator says so (a sidecar on a pod network, a private link they trust).
    allow_plaintext: bool = False

    @property
    def plaintext_remote(self) -> bool:
        """Whether requests go unencrypted to another machine (http:// to a non-loopback
        host): only with allow_plaintext."""
        return self.scheme == "http" and not is_loopback_host(self.host)

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


# Session-ticket key rotation (tls.tickets), seconds: Caddy rotates every 12 h; a key then
# decrypts for as long again, so the two keys held span a day at most (the bound forward
# secrecy of resumed sessions gets). The highest value keeps that bound; below a minute,
# each rotation would cost more key writes than it gains.
DEFAULT_TICKET_KEY_ROTATION: Final = 12 * 3600.0
TICKET_KEY_ROTATION_RANGE: Final = (60.0, 12 * 3600.0)


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """[tls]: the session tickets of resumed handshakes (tls.tickets)."""

    # Resumption skips the certificate and the signature: a phone reconnecting after a network
    # change saves a round trip of bytes and the server most of a handshake's CPU. Off: no
    # ticket is issued (TLS 1.2 session ids still resume within one process's contexts).
    session_tickets: bool = True
    ticket_key_rotation: float = DEFAULT_TICKET_KEY_ROTATION
    # Where the keys are kept (0600) so that tickets survive a restart and processes sharing
    # the file share keys; None: in memory only, new keys at each start. An explicit
    # [state] dir makes it STATE_TICKET_KEY_FILE there by default (StateConfig).
    ticket_key_file: Path | None = None
    # The config key that chose ticket_key_file, named by the errors about that file:
    # "state.dir" when the file is the state folder's default.
    ticket_key_file_key: str = "tls.ticket_key_file"


# The state folder when the config names none, relative to the config's folder: the folder
# the ACME account key has always defaulted to (certs/acme/account.pem), which holds its
# challenges and order lock too. So a config without [state] keeps every file where it was,
# and the one folder dualproxy already writes beside its config is the one it keeps writing.
DEFAULT_STATE_DIR: Final = Path("certs/acme")
# The files dualproxy keeps in the state folder by default (StateConfig).
STATE_ACCOUNT_KEY_FILE: Final = "account.pem"
STATE_TICKET_KEY_FILE: Final = "ticket-keys"


@dataclass(frozen=True, slots=True)
class StateConfig:
    """[state]: the folder where what replicas must agree on lives (docs/deploy.md, "More
    than one replica"): the ACME account, challenges and order lock, the canary's halt record
    (serve.sharedhalt), and with an explicit dir the session-ticket keys. Replicas that mount
    the same folder act as one; a single server keeps its canary halt there across restarts.

    `dir` when the config names none: the folder of [acme] account_key when that is set
    (where dualproxy already writes its challenges, so a folder it may write), else
    DEFAULT_STATE_DIR beside the config. Named ([state] dir): the ACME account key defaults
    to STATE_ACCOUNT_KEY_FILE in it (its challenges and lock beside it), unless [acme]
    account_key names another; and with session tickets on and no [tls] ticket_key_file,
    the ticket keys are kept in STATE_TICKET_KEY_FILE there. Only then: naming the folder
    says "these processes share it", which is when keys on disk pay for themselves; a
    server that never asked keeps its ticket keys in memory (forward secrecy bounded by the
    rotation, never in a backup of the disk) as before."""

    dir: Path = DEFAULT_STATE_DIR
    # Whether the config names it ([state] dir).
    configured: bool = False


# The admin listener's address unless the config names one: loopback (see AdminConfig), on a
# port the kernel picks at each start (port 0). A fixed default port (it was Envoy's 9901)
# made a second instance on the machine, or a new process started before the old one exits,
# fail to start; a free port cannot collide. `serve` records the port it got where `dualproxy
# status` looks (ops.admin's runtime record). A scraper (Prometheus) needs a fixed port: name it.
DEFAULT_ADMIN_ADDRESS: Final = ListenAddress("127.0.0.1", 0)


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The admin listener: /metrics, /status.json, the status page, canary resume."""

    # Loopback by default: the status page names keys and client counts, and the listener
    # takes the canary resume. Port 0: a free port, recorded for `dualproxy status`. None: no
    # admin listener. An address that cannot be bound never stops the TLS front: `serve`
    # logs why and tries again (ops.admin.BIND_RETRY_INTERVAL).
    address: ListenAddress | None = DEFAULT_ADMIN_ADDRESS
    # A non-loopback address (so that Prometheus can scrape from another host) must be asked
    # for explicitly; canary resume still answers loopback clients only.
    allow_non_loopback: bool = False


# The most worker processes `[process] workers` may ask for: beyond a machine's cores they
# only add memory and scheduling; 512 leaves room for the largest hosts (nginx caps its
# worker_processes at the CPUs it finds, HAProxy its threads at 4096), and stops a typo
# (workers = 40000) from forking the machine to its knees.
MAX_WORKERS: Final = 512


@dataclass(frozen=True, slots=True)
class ProcessConfig:
    """How many processes serve ([process]): one (today's single process, no supervisor), or
    a supervisor and that many workers (serve.supervisor)."""

    # 1 by default: one process, as before this setting existed; "auto" (what nginx's
    # `worker_processes auto` does) is one worker per CPU this process may run on.
    workers: int | Literal["auto"] = 1

    def worker_count(self) -> int:
        """The number of workers: "auto" resolved to the CPUs this process may run on."""
        if self.workers == "auto":
            return available_cpus()
        return self.workers


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which taskset, cgroups' cpusets
    and container runtimes narrow), not the machine's count; at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity API on this platform (macOS)
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True, slots=True)
class LogConfig:
    """Where the per-request access log goes (ops.accesslog)."""

    # True: one line per request; "off" turns it off (nginx's access_log off).
    access: bool = True
    # The file it is appended to, reopened on SIGUSR1 (logrotate); None: stderr, with the
    # other log lines.
    access_path: Path | None = None


@dataclass(frozen=True, slots=True)
class LifecycleConfig:
    """How a server leaves: what a load balancer needs to take it out first."""

    # On SIGTERM, /readyz answers 503 for this long while the server still accepts and
    # serves, so that a balancer's health checks take it out before its listeners close;
    # then the drain (limits.shutdown_grace). 0 (the default without a balancer): the drain
    # starts at once. Set it to the balancer's check interval times its fall count (HAProxy
    # `inter 2s fall 2`: 4 s and a margin; a Kubernetes readiness probe: periodSeconds times
    # failureThreshold).
    drain_delay: float = 0.0


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
    lifecycle: LifecycleConfig = field(default_factory=LifecycleConfig)
    # App-facing endpoints answered by dualproxy itself (None: not served).
    manifest: ManifestConfig | None = None
    reports: ReportsConfig | None = None
    process: ProcessConfig = field(default_factory=ProcessConfig)
    tls: TlsSettings = field(default_factory=TlsSettings)
    log: LogConfig = field(default_factory=LogConfig)
    state: StateConfig = field(default_factory=StateConfig)

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
