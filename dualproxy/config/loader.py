"""config.toml -> frozen dataclasses, strictly.

Every value an operator writes is checked here, once, before anything listens: an unknown
key, a wrong type, a missing file, a rotation naming a key that does not exist, a window that
ends before it starts. Each rejection is an `OperatorError` naming the file, the key path
(`rotation.grace_end`) and what to do. Misspelled keys are errors, never silently ignored:
a typo in `grace_end` must not quietly become "the window never closes".

The module is pure apart from reading the TOML file and checking that referenced files
exist; it knows nothing about sockets, TLS or trio. Relative paths are relative to the
directory of the config file, so a config can be moved with its certs/ folder.

One `_parse_<table>` function per table of config.toml, in the file's order; the typed
reading of a table is `reader.Table`'s. At about 600 lines it is one table's rules after
another: split further, the rules that relate tables (a rotation naming keys, http_listen
beside listen.address) would be scattered.
"""

from __future__ import annotations

import ipaddress
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Final, Literal
from urllib.parse import urlsplit

from dualproxy.config.errors import OperatorError
from dualproxy.config.names import (
    IPNetwork,
    admin_address_problem,
    host_name_problem,
    is_ip_address,
    is_loopback_host,
    key_name_problem,
    normalize_host,
    parse_address,
)
from dualproxy.config.reader import Table
from dualproxy.config.schema import (
    CHALLENGE_TYPES,
    CLOSE_RULES,
    DEFAULT_CANARY_FALSE_HALT,
    DEFAULT_CANARY_HALT_MARGIN,
    DEFAULT_MAX_BREAKAGE,
    DEFAULT_STATE_DIR,
    LIMIT_RANGES,
    MANAGED_HEADERS,
    MAX_WORKERS,
    STATE_ACCOUNT_KEY_FILE,
    STATE_TICKET_KEY_FILE,
    TICKET_KEY_ROTATION_RANGE,
    AcmeConfig,
    AdminConfig,
    CloseRule,
    Config,
    Hints,
    KeyConfig,
    KeyStoreSettings,
    LifecycleConfig,
    Limits,
    ListenConfig,
    LogConfig,
    ManifestConfig,
    ProcessConfig,
    ProxyProtocolMode,
    ReportsConfig,
    Role,
    Rotation,
    StateConfig,
    TlsSettings,
    UpstreamConfig,
)

# RFC 9110 field names (tokens) and values (visible characters, spaces and tabs inside).
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

_FIELD_VALUE = re.compile(r"[\x21-\x7e\x80-\xff]+(?:[ \t]+[\x21-\x7e\x80-\xff]+)*|")

# ALPN tokens every client offers: hinting on them would route everyone.
_COMMON_ALPN: Final = frozenset({b"http/1.1", b"http/1.0", b"h2", b"h3", b"acme-tls/1"})

# Every key of the tables that have a required one (reader.Table's `known`): a required key
# that is missing beside an unknown one is reported as that key misspelled. A key read but
# not listed here fails every test that reads it, so add a new setting here too.
_ROOT_KEYS: Final = (
    "listen", "acme", "keys", "rotation", "limits", "keystore", "upstream", "admin",
    "manifest", "reports", "lifecycle", "process", "tls", "log", "state",
)  # fmt: skip
_LISTEN_KEYS: Final = ("address", "reuse_port", "proxy_protocol", "proxy_protocol_from")
_PROXY_PROTOCOL_MODES: Final[Mapping[str, ProxyProtocolMode]] = {
    "off": "off", "required": "required", "optional": "optional",
}  # fmt: skip
_KEY_KEYS: Final = ("key", "chain", "names")
_ACME_KEYS: Final = (
    "directory", "email", "account_key", "challenge", "http_listen", "ca_file", "renew",
    "renew_fraction", "retry_initial", "retry_max", "recheck_interval", "new_key_lead_days",
    "order_timeout",
)  # fmt: skip
_ROTATION_KEYS: Final = (
    "old", "new", "grace_start", "grace_end", "default", "canary_percent", "canary_min_sample",
    "canary_halt_margin", "hints", "canary_false_halt", "close", "max_breakage", "grace_deadline",
)  # fmt: skip
_UPSTREAM_KEYS: Final = (
    "url", "ca_file", "host", "headers", "trusted_proxies", "pool_max_idle", "pool_idle_timeout",
    "allow_plaintext",
)  # fmt: skip


def load(path: Path | str, *, check_files: bool = True) -> Config:
    """Read and validate a config file; raises OperatorError. `check_files=False` accepts key,
    chain and CA files that do not exist (yet): for `dualproxy rehearse`, which plays the plan
    with stand-ins."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise OperatorError(
            "config file not found; pass -c PATH or create it (see config.toml)", file=path
        ) from None
    except OSError as exc:
        raise OperatorError(f"cannot read the config file: {exc.strerror}", file=path) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise OperatorError("the config file is not UTF-8 text", file=path) from None
    except tomllib.TOMLDecodeError as exc:
        raise OperatorError(f"not valid TOML: {exc}", file=path) from None
    try:
        return parse(data, base_dir=path.parent.absolute(), path=path, check_files=check_files)
    except OperatorError as exc:
        raise OperatorError(exc.problem, key_path=exc.key_path, file=path, fix=exc.fix) from None


def parse(
    data: Mapping[str, object],
    *,
    base_dir: Path,
    path: Path | None = None,
    check_files: bool = True,
) -> Config:
    """Validate already-decoded TOML; relative paths resolve against `base_dir`."""
    root = Table(data, "", _ROOT_KEYS)
    listen = _parse_listen(root.table("listen", required=True, known=_LISTEN_KEYS))
    state_dir = _parse_state(root.table("state"), base_dir, check_files)
    acme_table = root.table("acme", known=_ACME_KEYS)
    acme = (
        _parse_acme(acme_table, base_dir, check_files, state_dir or base_dir / DEFAULT_STATE_DIR)
        if acme_table is not None
        else None
    )
    # Unnamed, the state folder is where ACME writes already (schema.StateConfig).
    state = StateConfig(
        dir=state_dir or (acme.account_key.parent if acme else base_dir / DEFAULT_STATE_DIR),
        configured=state_dir is not None,
    )
    http_listen = acme.http_listen if acme is not None else None
    # Port 0 (any free port, as tests use) cannot clash.
    if http_listen is not None and http_listen.port and http_listen in listen.addresses:
        raise OperatorError(
            "is also a TLS listen.address; give plain HTTP its own port",
            key_path="acme.http_listen",
        )
    keys = _parse_keys(root.table("keys", required=True), base_dir, check_files, acme)
    rotation_table = root.table("rotation", known=_ROTATION_KEYS)
    rotation = _parse_rotation(rotation_table, keys) if rotation_table is not None else None
    if rotation is None and not keys:
        raise OperatorError("no key is configured; add a [keys.NAME] table", key_path="keys")
    limits = _parse_limits(root.table("limits"))
    keystore = _parse_keystore(root.table("keystore"))
    tls = _parse_tls(root.table("tls"), base_dir, state)
    upstream_table = root.table("upstream", known=_UPSTREAM_KEYS)
    upstream = (
        _parse_upstream(upstream_table, base_dir, check_files)
        if upstream_table is not None
        else None
    )
    admin = _parse_admin(root.table("admin"))
    lifecycle = _parse_lifecycle(root.table("lifecycle"))
    manifest_table = root.table("manifest")
    manifest = _parse_manifest(manifest_table, base_dir) if manifest_table is not None else None
    reports_table = root.table("reports")
    reports = _parse_reports(reports_table, base_dir) if reports_table is not None else None
    if manifest is not None and reports is not None and manifest.path == reports.path:
        raise OperatorError(
            "is also manifest.path; give each its own path", key_path="reports.path"
        )
    process = _parse_process(root.table("process"))
    log = _parse_log(root.table("log"), base_dir)
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
        lifecycle=lifecycle,
        manifest=manifest,
        reports=reports,
        process=process,
        tls=tls,
        log=log,
        state=state,
    )


def _parse_state(table: Table | None, base_dir: Path, check_files: bool) -> Path | None:
    """[state] dir, when the config names it: a folder (made when missing, 0700, by whoever
    writes there first), relative to the config's folder."""
    if table is None:
        return None
    text = table.string("dir", required=True)
    assert text is not None
    if not text.strip():
        raise OperatorError(
            "is empty",
            key_path=table.path("dir"),
            fix="name the folder the replicas share, or remove [state] (its default is the"
            " certs/acme folder beside the config)",
        )
    folder = base_dir / Path(text).expanduser()
    if check_files and folder.exists() and not folder.is_dir():
        raise OperatorError(
            f"{folder} is not a folder",
            key_path=table.path("dir"),
            fix="name a folder (dualproxy makes it when missing), not a file",
        )
    table.done()
    return folder


def _parse_process(table: Table | None) -> ProcessConfig:
    if table is None:
        return ProcessConfig()
    key_path = table.path("workers")
    workers: int | Literal["auto"] = ProcessConfig().workers
    if table.has("workers"):
        value = table.value("workers")
        if value == "auto":
            workers = "auto"
        elif isinstance(value, int) and not isinstance(value, bool):
            if not 1 <= value <= MAX_WORKERS:
                raise OperatorError(
                    f'{value} is out of range; use 1 to {MAX_WORKERS}, or "auto" (one per CPU)',
                    key_path=key_path,
                )
            workers = value
        else:
            raise OperatorError(
                f'expected "auto" or a number of processes, got {value!r}', key_path=key_path
            )
    table.done()
    return ProcessConfig(workers=workers)


def _parse_listen(table: Table | None) -> ListenConfig:
    assert table is not None
    texts = table.strings("address", one_allowed=True)
    if not texts:
        raise table.missing("address", 'add e.g. address = "127.0.0.1:8443"')
    addresses = []
    for text in texts:
        try:
            addresses.append(parse_address(text))
        except ValueError as exc:
            raise OperatorError(str(exc), key_path=table.path("address")) from None
    if len(set(addresses)) != len(addresses):
        raise OperatorError("an address is listed twice", key_path=table.path("address"))
    reuse_port = table.boolean("reuse_port", False)
    mode = table.string("proxy_protocol") or "off"
    if mode not in _PROXY_PROTOCOL_MODES:
        raise OperatorError(
            f"unknown mode {mode!r}; use one of {', '.join(_PROXY_PROTOCOL_MODES)}",
            key_path=table.path("proxy_protocol"),
        )
    trusted = _parse_networks(table, "proxy_protocol_from")
    if mode != "off" and not trusted:
        raise table.missing(
            "proxy_protocol_from",
            "name the load balancers that send the PROXY header (their addresses or"
            ' networks, e.g. proxy_protocol_from = ["10.0.0.0/8"]), so that no client can'
            " write one itself and claim another client's address",
        )
    if mode == "off" and trusted:
        raise OperatorError(
            'has no effect while proxy_protocol = "off"; set proxy_protocol too, or remove it',
            key_path=table.path("proxy_protocol_from"),
        )
    table.done()
    return ListenConfig(
        addresses=tuple(addresses),
        reuse_port=reuse_port,
        proxy_protocol=_PROXY_PROTOCOL_MODES[mode],
        proxy_protocol_from=trusted,
    )


def _parse_networks(table: Table, key: str) -> tuple[IPNetwork, ...]:
    """A list of networks ("10.0.0.0/8", "2001:db8::/32"; an address alone is its /32 or
    /128), each exact: host bits set are refused, as they usually mean a typo."""
    networks = []
    for text in table.strings(key):
        try:
            networks.append(ipaddress.ip_network(text, strict=True))
        except ValueError as exc:
            raise OperatorError(str(exc), key_path=table.path(key)) from None
    return tuple(networks)


def _parse_keys(
    table: Table | None, base_dir: Path, check_files: bool, acme: AcmeConfig | None
) -> dict[str, KeyConfig]:
    assert table is not None
    keys = {}
    for name, entry in table.tables(known=_KEY_KEYS):
        if (problem := key_name_problem(name)) is not None:
            raise OperatorError(problem, key_path=table.path(name))
        names = _parse_acme_names(entry, acme)
        paths = {}
        for field_name in ("key", "chain"):
            text = entry.string(field_name, required=True)
            assert text is not None
            file = base_dir / Path(text).expanduser()
            # An ACME-managed key's chain may be missing: dualproxy obtains it.
            may_be_missing = field_name == "chain" and bool(names)
            if check_files and (problem := _not_a_file_problem(file)) is not None:
                raise OperatorError(problem, key_path=entry.path(field_name))
            if check_files and not may_be_missing and not file.is_file():
                what = "private key" if field_name == "key" else "certificate chain"
                advice = f"create it (dualproxy keys new {name})"
                if field_name == "chain":
                    advice = (
                        f"get a certificate for it (dualproxy keys csr {name}), or add names ="
                        ' ["..."] and an [acme] table to have dualproxy obtain it'
                    )
                raise OperatorError(
                    f"{what} file {file} does not exist; {advice}, or fix the path (relative"
                    " paths start at the config's folder)",
                    key_path=entry.path(field_name),
                )
            paths[field_name] = file
        entry.done()
        keys[name] = KeyConfig(name=name, key=paths["key"], chain=paths["chain"], names=names)
    if acme is not None and not any(key.names for key in keys.values()):
        raise OperatorError(
            'no key has names to request; add names = ["api.example.com"] to a [keys.NAME]'
            " table, or remove [acme]",
            key_path="acme",
        )
    return keys


def _not_a_file_problem(path: Path) -> str | None:
    """Why a path that should name a file names something else that exists (a directory, a
    FIFO), or None: "does not exist" would send the operator looking in the wrong place."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None  # missing (or unreadable): the callers' own messages say what to do
    if stat.S_ISDIR(mode):
        return f"{path} is a directory, not a file; name the PEM file in it"
    if not stat.S_ISREG(mode):
        return f"{path} is not a regular file (a FIFO, socket or device); name the PEM file"
    return None


def _parse_acme_names(entry: Table, acme: AcmeConfig | None) -> tuple[str, ...]:
    """A key's `names`: DNS names the ACME challenges dualproxy answers can prove."""
    texts = entry.strings("names")
    key_path = entry.path("names")
    if entry.has("names") and not texts:
        raise OperatorError("is empty; list the names to request, or remove it", key_path=key_path)
    if texts and acme is None:
        raise OperatorError(
            "names are requested from an ACME CA; add an [acme] table (see config.toml),"
            " or remove names",
            key_path=key_path,
        )
    names: list[str] = []
    for text in texts:
        if is_ip_address(text):
            raise OperatorError(
                f"{text!r}: dualproxy requests DNS names only; use a host name", key_path=key_path
            )
        if (problem := host_name_problem(text)) is not None:
            raise OperatorError(problem, key_path=key_path)
        name = normalize_host(text)
        if name.startswith("*."):
            raise OperatorError(
                f"{text!r}: a wildcard needs the dns-01 challenge, which dualproxy does not"
                " answer; list each name",
                key_path=key_path,
            )
        if name in names:
            raise OperatorError(f"{text!r} is listed twice", key_path=key_path)
        names.append(name)
    return tuple(names)


def _parse_acme(table: Table, base_dir: Path, check_files: bool, state_dir: Path) -> AcmeConfig:
    directory = table.string("directory", required=True)
    assert directory is not None
    parts = urlsplit(directory)
    if parts.scheme != "https" or not parts.hostname:
        raise OperatorError(
            f"{directory!r} is not an https URL like"
            " https://acme-v02.api.letsencrypt.org/directory",
            key_path=table.path("directory"),
        )
    email = table.string("email")
    if email is not None and not re.fullmatch(r"[^@\s:,]+@[^@\s:,]+\.[^@\s:,]+", email):
        raise OperatorError(f"{email!r} is not an email address", key_path=table.path("email"))
    # The account's folder holds its challenges and order lock (acme.issuer): the state
    # folder's, unless account_key names another file.
    account_text = table.string("account_key")
    account_key = (
        base_dir / Path(account_text).expanduser()
        if account_text
        else state_dir / STATE_ACCOUNT_KEY_FILE
    )
    challenge = table.string("challenge") or "tls-alpn-01"
    if challenge not in CHALLENGE_TYPES:
        raise OperatorError(
            f'{challenge!r} is neither "tls-alpn-01" nor "http-01"',
            key_path=table.path("challenge"),
        )
    http_listen = None
    if (http_text := table.string("http_listen")) is not None:
        try:
            http_listen = parse_address(http_text)
        except ValueError as exc:
            raise OperatorError(str(exc), key_path=table.path("http_listen")) from None
    if challenge == "http-01" and http_listen is None:
        raise table.missing(
            "http_listen",
            'the http-01 challenge is answered on plain HTTP: add http_listen = "0.0.0.0:80"'
            ' (the CA connects to port 80), or use challenge = "tls-alpn-01"',
        )
    ca_file = None
    if (ca_text := table.string("ca_file")) is not None:
        ca_file = base_dir / Path(ca_text).expanduser()
        if check_files and (problem := _not_a_file_problem(ca_file)) is not None:
            raise OperatorError(problem, key_path=table.path("ca_file"))
        if check_files and not ca_file.is_file():
            raise OperatorError(f"CA file {ca_file} does not exist", key_path=table.path("ca_file"))
    d = AcmeConfig(directory="", account_key=Path())
    renew = table.boolean("renew", d.renew)
    renew_fraction = table.number("renew_fraction", d.renew_fraction, low=0.1, high=0.95)
    # One second at least: never a tight loop, whatever the config says.
    retry_initial = table.number("retry_initial", d.retry_initial, low=1, high=86400)
    retry_max = table.number("retry_max", d.retry_max, low=1, high=7 * 86400)
    if retry_max < retry_initial:
        raise OperatorError(
            "must be at least retry_initial (the first wait)", key_path=table.path("retry_max")
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


def _parse_rotation(table: Table, keys: Mapping[str, KeyConfig]) -> Rotation:
    roles: dict[Role, tuple[str, ...]] = {}
    for role in ("old", "new"):
        names = table.strings(role, one_allowed=True)
        if not names:
            raise table.missing(role, "name one key, or a list of keys")
        for name in names:
            if name not in keys:
                known = ", ".join(sorted(keys)) or "none"
                raise OperatorError(
                    f"no key named {name!r}; the [keys] tables define: {known}",
                    key_path=table.path(role),
                )
        if len(set(names)) != len(names):
            raise OperatorError("a key is listed twice", key_path=table.path(role))
        roles[role] = names
    shared = set(roles["old"]) & set(roles["new"])
    if shared:
        raise OperatorError(
            f"key {sorted(shared)[0]!r} is both old and new; a rotation moves to a different key",
            key_path=table.path("new"),
        )
    start = table.instant("grace_start")
    end = table.instant("grace_end")
    if not start < end:
        raise OperatorError(
            "the grace window must end after it starts (grace_start)",
            key_path=table.path("grace_end"),
        )
    default = table.string("default")
    default = "old" if default is None else default
    if default not in ("old", "new"):
        raise OperatorError(
            f'{default!r} is neither "old" nor "new"', key_path=table.path("default")
        )
    canary = table.number("canary_percent", 0.0, low=0.0, high=100.0)
    if canary and default == "new":
        raise OperatorError(
            'the canary sends a share of default clients to the new key; with default = "new"'
            ' they all get it already: set canary_percent = 0 or default = "old"',
            key_path=table.path("canary_percent"),
        )
    margin = table.number("canary_halt_margin", DEFAULT_CANARY_HALT_MARGIN, low=0.0, high=1.0)
    false_halt, min_sample = _parse_canary_test(table)
    close, max_breakage, deadline = _parse_close_rule(table, end, default)
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
        canary_halt_margin=margin,
        hints_new=hints_new,
        hints_old=hints_old,
        canary_false_halt=false_halt,
        canary_min_sample=min_sample,
        close=close,
        max_breakage=max_breakage,
        grace_deadline=deadline,
    )


def _parse_canary_test(table: Table) -> tuple[float, int | None]:
    """The canary's sequential test: canary_false_halt; canary_min_sample, which it replaced,
    is still read (a config that sets it keeps loading; `check` and `serve` say it is unused)."""
    # Below one in a million the test needs ever longer evidence for nothing; above 0.2 a
    # halt says little.
    false_halt = table.number("canary_false_halt", DEFAULT_CANARY_FALSE_HALT, low=1e-6, high=0.2)
    min_sample = None
    if table.has("canary_min_sample"):
        min_sample = table.integer("canary_min_sample", 1, low=1, high=1_000_000_000)
    return false_halt, min_sample


def _parse_close_rule(
    table: Table, grace_end: datetime, default: str
) -> tuple[CloseRule, float, datetime | None]:
    """close, max_breakage and grace_deadline: how the window ends (schema.Rotation)."""
    close = table.string("close") or "at-grace-end"
    if close not in CLOSE_RULES:
        raise OperatorError(
            f'{close!r} is neither "at-grace-end" nor "when-safe"', key_path=table.path("close")
        )
    if close == "at-grace-end":
        for name in ("max_breakage", "grace_deadline"):
            if table.has(name):
                raise OperatorError(
                    'applies to close = "when-safe" only; remove it, or set close = "when-safe"',
                    key_path=table.path(name),
                )
        return "at-grace-end", DEFAULT_MAX_BREAKAGE, None
    if default != "old":
        raise OperatorError(
            'close = "when-safe" keeps the old key the default until it is safe; it needs'
            ' default = "old"',
            key_path=table.path("close"),
        )
    max_breakage = table.number("max_breakage", DEFAULT_MAX_BREAKAGE, low=0.0, high=1.0)
    if not table.has("grace_deadline"):
        raise table.missing(
            "grace_deadline",
            'close = "when-safe" needs a hard end: add e.g. grace_deadline ='
            " 2027-02-15T00:00:00Z (after grace_end), when the window closes whatever the"
            " evidence",
        )
    deadline = table.instant("grace_deadline")
    if not grace_end < deadline:
        raise OperatorError(
            "must be after grace_end (the window may be held open from grace_end until then)",
            key_path=table.path("grace_deadline"),
        )
    return "when-safe", max_breakage, deadline


def _parse_hints(table: Table | None) -> Hints:
    if table is None:
        return Hints()
    sni = tuple(_parse_sni_pattern(table.path("sni"), s) for s in table.strings("sni"))
    alpn = tuple(_parse_alpn_token(table.path("alpn"), a) for a in table.strings("alpn"))
    networks = []
    for text in table.strings("networks"):
        try:
            networks.append(ipaddress.ip_network(text, strict=True))
        except ValueError as exc:
            raise OperatorError(
                f"{exc} (write a network like 10.0.0.0/8 or 2001:db8::/32)",
                key_path=table.path("networks"),
            ) from None
    table.done()
    return Hints(sni=sni, alpn=alpn, networks=tuple(networks))


def _parse_sni_pattern(key_path: str, text: str) -> str:
    problem = host_name_problem(text)
    if problem is not None:
        raise OperatorError(problem, key_path=key_path)
    return normalize_host(text)


def _parse_alpn_token(key_path: str, text: str) -> bytes:
    token = text.encode("utf-8")
    if not 1 <= len(token) <= 255 or not text.isascii() or not text.isprintable():
        raise OperatorError(
            f"{text!r}: an ALPN token is 1-255 printable ASCII bytes", key_path=key_path
        )
    if token in _COMMON_ALPN:
        raise OperatorError(
            f"{text!r} is offered by ordinary clients, so it cannot tell apps apart; pick a"
            " dedicated token such as dualproxy-k2026b",
            key_path=key_path,
        )
    return token


def _check_hints_disjoint(new: Hints, old: Hints, prefix: str) -> None:
    for kind in ("sni", "alpn"):
        both = set(getattr(new, kind)) & set(getattr(old, kind))
        if both:
            raise OperatorError(
                f"{sorted(both)[0]!r} is hinted for both old and new; keep it in one of them",
                key_path=f"{prefix}.old.{kind}",
            )
    # Equal names were caught above; a wildcard can still cover a name hinted the other way.
    for new_sni in new.sni:
        for old_sni in old.sni:
            if _sni_patterns_overlap(new_sni, old_sni):
                raise OperatorError(
                    f"{old_sni!r} and {new_sni!r} in hints.new.sni match the same host names;"
                    " a client sending one would be ambiguous",
                    key_path=f"{prefix}.old.sni",
                )
    for a in new.networks:
        for b in old.networks:
            if a.version == b.version and a.overlaps(b):
                raise OperatorError(
                    f"{b} overlaps {a} in hints.new.networks; a client in both would be ambiguous",
                    key_path=f"{prefix}.old.networks",
                )


def _sni_patterns_overlap(a: str, b: str) -> bool:
    """Whether one host name matches both (normalized) patterns: "*.x.com" names every "h.x.com"."""
    if a.startswith("*.") == b.startswith("*."):
        return a == b
    wildcard, name = (a, b) if a.startswith("*.") else (b, a)
    return name.partition(".")[2] == wildcard[2:]


def _parse_limits(table: Table | None) -> Limits:
    if table is None:
        return Limits()
    defaults = Limits()
    values: dict[str, float | int] = {}
    for name, (low, high) in LIMIT_RANGES.items():
        default = getattr(defaults, name)
        if isinstance(default, int):
            values[name] = table.integer(name, default, low=int(low), high=int(high))
        else:
            values[name] = table.number(name, default, low=low, high=high)
    table.done()
    return Limits(**values)  # type: ignore[arg-type]


def _parse_upstream(table: Table, base_dir: Path, check_files: bool) -> UpstreamConfig:
    url = table.string("url", required=True)
    assert url is not None
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise OperatorError(
            f"{url!r} is not an http(s) URL like https://my-project.appspot.com",
            key_path=table.path("url"),
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise OperatorError(
            "give only the scheme, host and port: requests keep their own path and query",
            key_path=table.path("url"),
        )
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise OperatorError(f"{url!r} has an invalid port", key_path=table.path("url")) from None
    ca_file = None
    if (ca_text := table.string("ca_file")) is not None:
        ca_file = base_dir / Path(ca_text).expanduser()
        if check_files and (problem := _not_a_file_problem(ca_file)) is not None:
            raise OperatorError(problem, key_path=table.path("ca_file"))
        if check_files and not ca_file.is_file():
            raise OperatorError(f"CA file {ca_file} does not exist", key_path=table.path("ca_file"))
    host_header = table.string("host") or "rewrite"
    if host_header not in ("rewrite", "preserve"):
        raise OperatorError(
            f'{host_header!r} is neither "rewrite" nor "preserve"', key_path=table.path("host")
        )
    headers = []
    if (extra := table.table("headers")) is not None:
        for name in extra.names():
            value = extra.string(name, required=True)
            assert value is not None
            if not _TOKEN.fullmatch(name) or not _FIELD_VALUE.fullmatch(value):
                raise OperatorError(
                    "not a valid HTTP header name and value (no CR, LF or NUL)",
                    key_path=extra.path(name),
                )
            if name.lower() in MANAGED_HEADERS:
                raise OperatorError(
                    f"{name.lower()} is managed by dualproxy (hop-by-hop, framing or Host) and"
                    " cannot be added",
                    key_path=table.path("headers"),
                )
            if "_" in name:
                # Underscores are tokens, but CGI and WSGI read "-" and "_" alike: the relay
                # refuses them from clients, so it does not send them either.
                raise OperatorError(
                    "an underscore in a header name; use '-' instead", key_path=extra.path(name)
                )
            headers.append((name, value))
        extra.done()
    if not parts.hostname.isascii():
        raise OperatorError(
            f"write the host {parts.hostname!r} in punycode (xn--...)", key_path=table.path("url")
        )
    trusted = _parse_networks(table, "trusted_proxies")
    defaults = UpstreamConfig(url="", scheme="https", host="", port=0)
    pool_max_idle = table.integer("pool_max_idle", defaults.pool_max_idle, low=0, high=10_000)
    pool_idle_timeout = table.number(
        "pool_idle_timeout", defaults.pool_idle_timeout, low=0.1, high=3600
    )
    allow_plaintext = table.boolean("allow_plaintext", defaults.allow_plaintext)
    table.done()
    if parts.scheme == "http" and not is_loopback_host(parts.hostname) and not allow_plaintext:
        raise OperatorError(
            f"{url!r} is plain HTTP to another machine: requests, with the clients' credentials,"
            " and answers would cross the network unencrypted",
            fix="use https:// (verified), or, if that network is yours and trusted (a sidecar,"
            " a private link), add allow_plaintext = true to [upstream]",
            key_path=table.path("url"),
        )
    upstream = UpstreamConfig(
        url=url,
        scheme="https" if parts.scheme == "https" else "http",
        host=parts.hostname.lower(),
        port=port,
        ca_file=ca_file,
        host_header="preserve" if host_header == "preserve" else "rewrite",
        headers=tuple(headers),
        trusted_proxies=trusted,
        pool_max_idle=pool_max_idle,
        pool_idle_timeout=pool_idle_timeout,
        allow_plaintext=allow_plaintext,
    )
    return upstream


def _parse_admin(table: Table | None) -> AdminConfig:
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
            raise OperatorError(str(exc), key_path=table.path("address")) from None
    table.done()
    if not enabled:
        return AdminConfig(address=None, allow_non_loopback=allow)
    assert address is not None
    if (problem := admin_address_problem(address, allow_non_loopback=allow)) is not None:
        raise OperatorError(problem, key_path=table.path("address"))
    return AdminConfig(address=address, allow_non_loopback=allow)


def _parse_log(table: Table | None, base_dir: Path) -> LogConfig:
    if table is None:
        return LogConfig()
    access = table.string("access")
    table.done()
    if access is None or access == "stderr":
        return LogConfig()
    if access == "off":
        return LogConfig(access=False)
    if not access.strip():
        raise OperatorError(
            "is empty", key_path=table.path("access"), fix='write a file path, "stderr" or "off"'
        )
    return LogConfig(access_path=(base_dir / access).absolute())


def _parse_lifecycle(table: Table | None) -> LifecycleConfig:
    if table is None:
        return LifecycleConfig()
    defaults = LifecycleConfig()
    settings = LifecycleConfig(
        drain_delay=table.number("drain_delay", defaults.drain_delay, low=0, high=600),
    )
    table.done()
    return settings


def _parse_keystore(table: Table | None) -> KeyStoreSettings:
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


def _parse_tls(table: Table | None, base_dir: Path, state: StateConfig) -> TlsSettings:
    d = TlsSettings()
    settings = d
    if table is not None:
        low, high = TICKET_KEY_ROTATION_RANGE
        key_file = table.string("ticket_key_file")
        settings = TlsSettings(
            session_tickets=table.boolean("session_tickets", d.session_tickets),
            ticket_key_rotation=table.number(
                "ticket_key_rotation", d.ticket_key_rotation, low=low, high=high
            ),
            ticket_key_file=base_dir / Path(key_file).expanduser() if key_file else None,
        )
        table.done()
    if state.configured and settings.session_tickets and settings.ticket_key_file is None:
        # Replicas named the folder they share: they share the ticket keys in it, so a client
        # resumes on any of them (schema.StateConfig says why only then).
        return replace(
            settings,
            ticket_key_file=state.dir / STATE_TICKET_KEY_FILE,
            ticket_key_file_key="state.dir",
        )
    return settings


# An origin-form path of unreserved and sub-delimiter characters (RFC 3986 pchar without
# percent-encoding, which clients may spell differently): compared byte for byte.
_LOCAL_PATH: Final = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@/-]*")


def _parse_local_path(table: Table, default: str) -> str:
    """The path of an endpoint dualproxy answers itself instead of the upstream."""
    path = table.string("path") or default
    if not _LOCAL_PATH.fullmatch(path) or path == "/":
        raise OperatorError(
            f"{path!r} is not a path like {default!r} (no query, no %-escapes, not / alone:"
            " requests to it never reach the upstream)",
            key_path=table.path("path"),
        )
    return path


def _parse_manifest(table: Table, base_dir: Path) -> ManifestConfig:
    d = ManifestConfig(file=Path())
    path = _parse_local_path(table, d.path)
    file = base_dir / Path(table.string("file") or "certs/pins.jws").expanduser()
    max_age = table.integer("max_age", d.max_age, low=0, high=86400)
    warn = table.number("warn_before_days", d.warn_before_days, low=0, high=90)
    table.done()
    return ManifestConfig(file=file, path=path, max_age=max_age, warn_before_days=warn)


def _parse_reports(table: Table, base_dir: Path) -> ReportsConfig:
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
