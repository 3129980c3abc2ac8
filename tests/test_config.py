"""config.py: the documented example parses to the expected values, and every kind of mistake
is rejected with the key path that names it and a message that says what is wrong."""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Any, Final

import pytest
from helpers.rotation import GRACE_END, GRACE_START

from dualproxy.config.errors import OperatorError
from dualproxy.config.loader import load, parse
from dualproxy.config.names import ListenAddress
from dualproxy.config.schema import (
    AcmeConfig,
    Config,
    Hints,
    KeyConfig,
    KeyStoreSettings,
    Limits,
    ListenConfig,
    ManifestConfig,
    ReportsConfig,
    Rotation,
    StateConfig,
    TlsSettings,
    UpstreamConfig,
)
from dualproxy.config.times import parse_time

EXAMPLE: Final = """
[listen]
address = "127.0.0.1:8443"

[keys.k2026a]
key = "certs/k2026a/key.pem"
chain = "certs/k2026a/chain.pem"

[keys.k2026b]
key = "certs/k2026b/key.pem"
chain = "certs/k2026b/chain.pem"

[rotation]
old = "k2026a"
new = "k2026b"
grace_start = 2026-12-01T00:00:00Z
grace_end   = 2027-01-15T00:00:00Z
default = "old"
canary_percent = 0

[rotation.hints.new]
sni = ["k2.api.example.com"]
alpn = ["dualproxy-k2026b"]
networks = ["10.0.0.0/8"]

[rotation.hints.old]
sni = ["api-legacy.example.com"]
"""
KEY_FILES: Final = (
    "certs/k2026a/key.pem",
    "certs/k2026a/chain.pem",
    "certs/k2026b/key.pem",
    "certs/k2026b/chain.pem",
)

# An edit value that removes the key instead of setting it.
DELETE: Final = object()


# The commented, working example at the repository root.
EXAMPLE_FILE: Final = Path(__file__).resolve().parent.parent / "config.toml"


def commented_tables(*headers: str) -> dict[str, Any]:
    """The tables config.toml documents in comments ("# [acme]"), uncommented and decoded:
    each header's setting lines up to the first line that is no comment (a comment's
    continuation, "#   ...", is not a setting)."""
    lines = EXAMPLE_FILE.read_text().splitlines()
    block = []
    for header in headers:
        for line in lines[lines.index(header) :]:
            if not line.startswith("# "):
                break
            if not line[2:].startswith(" "):
                block.append(line[2:])
    return tomllib.loads("\n".join(block))


def make_files(folder: Path) -> None:
    """Empty key and chain files: config only checks that they exist."""
    for relative in KEY_FILES:
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).touch()


def edited(edits: Mapping[str, object]) -> dict[str, Any]:
    """The example as decoded TOML, with each dotted key set to its value (or deleted)."""
    data: dict[str, Any] = tomllib.loads(EXAMPLE)
    for dotted, value in edits.items():
        *parents, last = dotted.split(".")
        table = data
        for name in parents:
            table = table.setdefault(name, {})
        if value is DELETE:
            del table[last]
        else:
            table[last] = value
    return data


def expected_example(folder: Path, path: Path | None) -> Config:
    def key(name: str) -> KeyConfig:
        return KeyConfig(
            name=name,
            key=folder / f"certs/{name}/key.pem",
            chain=folder / f"certs/{name}/chain.pem",
        )

    return Config(
        listen=ListenConfig(addresses=(ListenAddress("127.0.0.1", 8443),), reuse_port=False),
        keys={"k2026a": key("k2026a"), "k2026b": key("k2026b")},
        rotation=Rotation(
            old=("k2026a",),
            new=("k2026b",),
            grace_start=GRACE_START,
            grace_end=GRACE_END,
            default="old",
            canary_percent=0.0,
            hints_new=Hints(
                sni=("k2.api.example.com",),
                alpn=(b"dualproxy-k2026b",),
                networks=(IPv4Network("10.0.0.0/8"),),
            ),
            hints_old=Hints(sni=("api-legacy.example.com",)),
        ),
        limits=Limits(),
        keystore=KeyStoreSettings(),
        path=path,
        state=StateConfig(dir=folder / "certs/acme"),
    )


# --- the valid example ---------------------------------------------------------------------


def test_example_file_loads_into_the_expected_dataclasses(tmp_path: Path) -> None:
    make_files(tmp_path)
    path = tmp_path / "config.toml"
    path.write_text(EXAMPLE)
    assert load(path) == expected_example(tmp_path, path)


def test_example_data_parses_into_the_expected_dataclasses(tmp_path: Path) -> None:
    make_files(tmp_path)
    assert parse(edited({}), base_dir=tmp_path) == expected_example(tmp_path, None)


def test_times_with_an_offset_become_utc(tmp_path: Path) -> None:
    make_files(tmp_path)
    offset = datetime.fromisoformat("2026-12-01T01:00:00+01:00")
    rotation = parse(edited({"rotation.grace_start": offset}), base_dir=tmp_path).rotation
    assert rotation is not None
    assert rotation.grace_start == GRACE_START
    assert rotation.grace_start.tzinfo is UTC


def test_optional_sections_override_their_defaults(tmp_path: Path) -> None:
    make_files(tmp_path)
    config = parse(
        edited(
            {
                "listen.reuse_port": True,
                "limits": {"handshake_timeout": 5, "max_connections": 10},
                "keystore": {"allow_insecure_key_permissions": True},
            }
        ),
        base_dir=tmp_path,
    )
    assert config.listen.reuse_port
    assert config.limits == Limits(handshake_timeout=5.0, max_connections=10)
    assert config.keystore == KeyStoreSettings(allow_insecure_key_permissions=True)


# Each accepted spelling, the twin of a rejection below.
@pytest.mark.parametrize(
    ("edits", "read", "expected"),
    [
        pytest.param(
            {"listen.address": ["127.0.0.1:8443", "[::1]:8443", ":443"]},
            lambda c: c.listen.addresses,
            (ListenAddress("127.0.0.1", 8443), ListenAddress("::1", 8443), ListenAddress("", 443)),
            id="address-list-ipv6-every-interface",
        ),
        pytest.param(
            {"listen.address": "[::1]:8443"},
            lambda c: str(c.listen.addresses[0]),
            "[::1]:8443",
            id="ipv6-address-round-trips",
        ),
        pytest.param(
            {"rotation.old": ["k2026a", "k2025"], "keys.k2025": {"key": "k", "chain": "c"}},
            lambda c: c.rotation.old,
            ("k2026a", "k2025"),
            id="old-as-list",
        ),
        pytest.param(
            {"rotation.hints.new.sni": ["*.K2.Example.com.", "xn--bcher-kva.example"]},
            lambda c: c.rotation.hints_new.sni,
            ("*.k2.example.com", "xn--bcher-kva.example"),
            id="sni-wildcard-punycode-normalized",
        ),
        pytest.param(
            {"rotation.hints.new.networks": ["2001:db8::/32", "10.1.2.3"]},
            lambda c: c.rotation.hints_new.networks,
            (IPv6Network("2001:db8::/32"), IPv4Network("10.1.2.3/32")),
            id="networks-ipv6-and-host",
        ),
        pytest.param(
            {"rotation.hints.old.sni": ["*.legacy.example.com", "api.example.com"]},
            lambda c: c.rotation.hints_old.sni,
            ("*.legacy.example.com", "api.example.com"),
            id="wildcard-not-covering-a-new-name",
        ),
        pytest.param(
            {"rotation.canary_percent": 100},
            lambda c: c.rotation.canary_percent,
            100.0,
            id="canary-100",
        ),
        pytest.param(
            {"rotation.default": "new"},
            lambda c: c.rotation.default,
            "new",
            id="default-new-without-canary",
        ),
        pytest.param(
            {},
            lambda c: (
                c.rotation.canary_min_sample,
                c.rotation.canary_halt_margin,
                c.rotation.canary_false_halt,
            ),
            (None, 0.05, 0.01),
            id="canary-halt-defaults",
        ),
        pytest.param(
            {"rotation.canary_false_halt": 0.001, "rotation.canary_halt_margin": 0},
            lambda c: (c.rotation.canary_false_halt, c.rotation.canary_halt_margin),
            (0.001, 0.0),
            id="canary-halt-set",
        ),
        pytest.param(
            {"rotation.canary_min_sample": 200},
            lambda c: c.rotation.canary_min_sample,
            200,
            id="canary-min-sample-still-read",
        ),
        pytest.param(
            {},
            lambda c: (c.rotation.close, c.rotation.grace_deadline, c.rotation.old_served_until),
            ("at-grace-end", None, GRACE_END),
            id="close-at-grace-end-by-default",
        ),
        pytest.param(
            {
                "rotation.close": "when-safe",
                "rotation.grace_deadline": GRACE_END + timedelta(days=31),
            },
            lambda c: (c.rotation.close, c.rotation.max_breakage, c.rotation.old_served_until),
            ("when-safe", 0.005, GRACE_END + timedelta(days=31)),
            id="close-when-safe",
        ),
        pytest.param(
            {
                "rotation.close": "when-safe",
                "rotation.max_breakage": 0.01,
                "rotation.grace_deadline": GRACE_END + timedelta(seconds=1),
            },
            lambda c: (c.rotation.max_breakage, c.rotation.grace_deadline),
            (0.01, GRACE_END + timedelta(seconds=1)),
            id="close-when-safe-set",
        ),
        pytest.param(
            {},
            lambda c: (str(c.admin.address), c.admin.allow_non_loopback),
            ("127.0.0.1:0", False),
            id="admin-default-a-free-loopback-port",
        ),
        pytest.param(
            {"admin.address": "[::1]:0"},
            lambda c: str(c.admin.address),
            "[::1]:0",
            id="admin-ipv6-loopback",
        ),
        pytest.param(
            {"admin.address": "0.0.0.0:9901", "admin.allow_non_loopback": True},
            lambda c: (str(c.admin.address), c.admin.allow_non_loopback),
            ("0.0.0.0:9901", True),
            id="admin-public-when-allowed",
        ),
        pytest.param(
            {"admin.enabled": False},
            lambda c: c.admin.address,
            None,
            id="admin-disabled",
        ),
        pytest.param(
            {"rotation.default": DELETE},
            lambda c: c.rotation.default,
            "old",
            id="default-defaults-to-old",
        ),
        pytest.param(
            {"rotation.grace_end": GRACE_START + timedelta(microseconds=1)},
            lambda c: c.rotation.grace_end,
            GRACE_START + timedelta(microseconds=1),
            id="shortest-window",
        ),
        pytest.param(
            {"rotation.hints": DELETE},
            lambda c: (c.rotation.hints_new, c.rotation.hints_old),
            (Hints(), Hints()),
            id="no-hints",
        ),
    ],
)
def test_accepted(
    tmp_path: Path, edits: Mapping[str, object], read: Callable[[Config], object], expected: object
) -> None:
    assert read(parse(edited(edits), base_dir=tmp_path, check_files=False)) == expected


# --- rejections ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edits", "key_path", "message"),
    [
        pytest.param({"lisen": {}}, "lisen", "unknown setting", id="unknown-top-level"),
        pytest.param(
            {"listen.port": 8443}, "listen.port", "unknown setting", id="unknown-in-listen"
        ),
        pytest.param(
            {"rotation.grace_ned": GRACE_END},
            "rotation.grace_ned",
            "unknown setting; did you mean 'grace_end'?",
            id="grace_ned-next-to-grace_end",
        ),
        # A required key misspelled: the unknown key is named first, with the one it stands for.
        pytest.param(
            {"rotation.grace_end": DELETE, "rotation.grace_ned": GRACE_END},
            "rotation.grace_ned",
            "unknown setting; did you mean 'grace_end'? (grace_end is required",
            id="grace_ned-instead-of-grace_end",
        ),
        pytest.param(
            {"rotation.grace_end": DELETE, "rotation.grace_oops": GRACE_END},
            "rotation.grace_oops",
            "unknown setting; did you mean 'grace_end'?",
            id="grace_oops-instead-of-grace_end",
        ),
        pytest.param(
            {"listen": DELETE, "lsiten": {"address": "127.0.0.1:8443"}},
            "lsiten",
            "unknown setting; did you mean 'listen'?",
            id="lsiten-instead-of-listen",
        ),
        pytest.param(
            {"keys.k2026a.chain": DELETE, "keys.k2026a.chian": "certs/k2026a/chain.pem"},
            "keys.k2026a.chian",
            "unknown setting; did you mean 'chain'?",
            id="chian-instead-of-chain",
        ),
        pytest.param(
            {"upstream": {"ulr": "https://api.example.com"}},
            "upstream.ulr",
            "unknown setting; did you mean 'url'?",
            id="ulr-instead-of-url",
        ),
        # Twins: a legitimate key read after the missing one is no typo of it, and a key
        # unlike the missing one leaves the missing one named.
        pytest.param(
            {"rotation.grace_start": DELETE},
            "rotation.grace_start",
            "missing; add a TOML datetime",
            id="no-grace_start-beside-grace_end",
        ),
        pytest.param(
            {"rotation.grace_end": DELETE, "rotation.zzz": 1},
            "rotation.grace_end",
            "missing; add a TOML datetime",
            id="no-grace_end-beside-an-unrelated-unknown",
        ),
        pytest.param({"listen": DELETE}, "listen", "missing; add a table", id="no-listen"),
        pytest.param(
            {"rotation": DELETE, "keys": {}}, "keys", "no key is configured", id="no-keys"
        ),
        pytest.param(
            {"listen.address": 8443},
            "listen.address",
            "expected a string or a list of strings, got 8443",
            id="port-as-integer",
        ),
        pytest.param(
            {"limits": {"max_connections": "4096"}},
            "limits.max_connections",
            "expected an integer, got a string",
            id="string-for-integer",
        ),
        pytest.param(
            {"limits": {"max_connections": True}},
            "limits.max_connections",
            "expected an integer, got a boolean",
            id="bool-for-integer",
        ),
        pytest.param(
            {"rotation.hints.new.networks": 10},
            "rotation.hints.new.networks",
            "expected a list of strings, got 10",
            id="int-for-list",
        ),
        pytest.param(
            {"rotation.canary_percent": True},
            "rotation.canary_percent",
            "expected a number, got a boolean",
            id="bool-for-number",
        ),
        pytest.param(
            {"listen.reuse_port": "yes"},
            "listen.reuse_port",
            "expected true or false, got a string",
            id="string-for-bool",
        ),
        pytest.param(
            {"keys.k2026a": "certs/k2026a"}, "keys.k2026a", "expected a table", id="key-not-table"
        ),
        pytest.param(
            {"keys.bad name": {"key": "certs/k2026a/key.pem", "chain": "certs/k2026a/chain.pem"}},
            "keys.bad name",
            "key names are letters",
            id="bad-key-name",
        ),
        pytest.param(
            {"keys.k2026a.key": "certs/k2026a"},
            "keys.k2026a.key",
            "certs/k2026a is a directory, not a file; name the PEM file in it",
            id="key-path-is-a-directory",
        ),
        pytest.param(
            {"keys.k2026b.chain": "certs"},
            "keys.k2026b.chain",
            "is a directory, not a file",
            id="chain-path-is-a-directory",
        ),
        pytest.param(
            {"keys.k2026a.key": "certs/k2026a/missing.pem"},
            "keys.k2026a.key",
            "private key file",
            id="missing-key-file",
        ),
        pytest.param(
            {"keys.k2026b.chain": "certs/k2026b/missing.pem"},
            "keys.k2026b.chain",
            "certificate chain file",
            id="missing-chain-file",
        ),
        pytest.param({"keys.k2026a.chain": DELETE}, "keys.k2026a.chain", "missing", id="no-chain"),
        pytest.param(
            {"rotation.new": "k2027"},
            "rotation.new",
            "no key named 'k2027'; the [keys] tables define: k2026a, k2026b",
            id="unknown-key-in-rotation",
        ),
        pytest.param(
            {"rotation.new": ["k2026b", "k2026a"]},
            "rotation.new",
            "'k2026a' is both old and new",
            id="key-both-old-and-new",
        ),
        pytest.param(
            {"rotation.old": ["k2026a", "k2026a"]},
            "rotation.old",
            "listed twice",
            id="key-listed-twice",
        ),
        pytest.param({"rotation.old": []}, "rotation.old", "missing", id="no-old-key"),
        pytest.param(
            {"rotation.grace_end": GRACE_START - timedelta(days=1)},
            "rotation.grace_end",
            "must end after it starts",
            id="end-before-start",
        ),
        pytest.param(
            {"rotation.grace_end": GRACE_START},
            "rotation.grace_end",
            "must end after it starts",
            id="end-equals-start",
        ),
        pytest.param(
            {"rotation.grace_start": "2026-12-01T00:00:00Z"},
            "rotation.grace_start",
            "write the time unquoted",
            id="quoted-datetime",
        ),
        pytest.param(
            {"rotation.grace_start": datetime(2026, 12, 1)},  # naive: the point
            "rotation.grace_start",
            "the time has no zone",
            id="datetime-without-zone",
        ),
        pytest.param(
            {"rotation.grace_start": GRACE_START.date()},
            "rotation.grace_start",
            "expected a datetime",
            id="date-not-datetime",
        ),
        pytest.param(
            {"rotation.default": "newest"},
            "rotation.default",
            '\'newest\' is neither "old" nor "new"',
            id="default-neither",
        ),
        pytest.param(
            {"rotation.default": ""},
            "rotation.default",
            "'' is neither",
            id="default-empty",
        ),
        pytest.param(
            {"rotation.canary_percent": 100.5},
            "rotation.canary_percent",
            "out of range",
            id="canary-above-100",
        ),
        pytest.param(
            {"rotation.canary_percent": -1},
            "rotation.canary_percent",
            "out of range",
            id="canary-negative",
        ),
        pytest.param(
            {"rotation.canary_percent": float("nan")},
            "rotation.canary_percent",
            "out of range",
            id="canary-nan",
        ),
        pytest.param(
            {"rotation.canary_min_sample": 0},
            "rotation.canary_min_sample",
            "out of range",
            id="canary-min-sample-zero",
        ),
        pytest.param(
            {"rotation.canary_min_sample": 10.5},
            "rotation.canary_min_sample",
            "expected an integer",
            id="canary-min-sample-float",
        ),
        pytest.param(
            {"rotation.canary_halt_margin": 1.5},
            "rotation.canary_halt_margin",
            "out of range",
            id="canary-margin-above-1",
        ),
        pytest.param(
            {"rotation.canary_false_halt": 0},
            "rotation.canary_false_halt",
            "out of range",
            id="canary-false-halt-zero",
        ),
        pytest.param(
            {"rotation.canary_false_halt": 0.5},
            "rotation.canary_false_halt",
            "out of range",
            id="canary-false-halt-too-high",
        ),
        pytest.param(
            {"rotation.close": "later"},
            "rotation.close",
            '\'later\' is neither "at-grace-end" nor "when-safe"',
            id="close-unknown",
        ),
        pytest.param(
            {"rotation.close": "when-safe"},
            "rotation.grace_deadline",
            'missing; close = "when-safe" needs a hard end',
            id="when-safe-without-deadline",
        ),
        pytest.param(
            {"rotation.close": "when-safe", "rotation.grace_dedline": GRACE_END},
            "rotation.grace_dedline",
            "unknown setting; did you mean 'grace_deadline'?",
            id="when-safe-deadline-typo",
        ),
        pytest.param(
            {"rotation.close": "when-safe", "rotation.grace_deadline": GRACE_END},
            "rotation.grace_deadline",
            "must be after grace_end",
            id="deadline-not-after-grace-end",
        ),
        pytest.param(
            {"rotation.grace_deadline": GRACE_END + timedelta(days=1)},
            "rotation.grace_deadline",
            'applies to close = "when-safe" only',
            id="deadline-without-when-safe",
        ),
        pytest.param(
            {"rotation.max_breakage": 0.01},
            "rotation.max_breakage",
            'applies to close = "when-safe" only',
            id="max-breakage-without-when-safe",
        ),
        pytest.param(
            {
                "rotation.close": "when-safe",
                "rotation.max_breakage": 1.5,
                "rotation.grace_deadline": GRACE_END + timedelta(days=1),
            },
            "rotation.max_breakage",
            "out of range",
            id="max-breakage-above-1",
        ),
        pytest.param(
            {
                "rotation.close": "when-safe",
                "rotation.default": "new",
                "rotation.grace_deadline": GRACE_END + timedelta(days=1),
            },
            "rotation.close",
            'it needs default = "old"',
            id="when-safe-with-default-new",
        ),
        pytest.param(
            {"rotation.canary_halt_margin": "5%"},
            "rotation.canary_halt_margin",
            "expected a number",
            id="canary-margin-string",
        ),
        pytest.param(
            {"rotation.canary_halt_marign": 0.1},
            "rotation.canary_halt_marign",
            "did you mean 'canary_halt_margin'?",
            id="canary-margin-typo",
        ),
        pytest.param(
            {"admin.address": "0.0.0.0:9901"},
            "admin.address",
            "admin.allow_non_loopback = true",
            id="admin-public-refused",
        ),
        pytest.param(
            {"admin.address": ":9901"},
            "admin.address",
            "is not a loopback address",
            id="admin-every-interface-refused",
        ),
        pytest.param(
            {"admin.address": "127.0.0.1"},
            "admin.address",
            "is not HOST:PORT",
            id="admin-no-port",
        ),
        pytest.param(
            {"admin.adress": "127.0.0.1:1"},
            "admin.adress",
            "did you mean 'address'?",
            id="admin-typo",
        ),
        pytest.param(
            {"rotation.canary_percent": 5, "rotation.default": "new"},
            "rotation.canary_percent",
            "set canary_percent = 0",
            id="canary-with-default-new",
        ),
        pytest.param(
            {"rotation.hints.new.sni": ["a..b"]},
            "rotation.hints.new.sni",
            "'a..b' is not a host name",
            id="sni-empty-label",
        ),
        pytest.param(
            {"rotation.hints.new.sni": ["*."]},
            "rotation.hints.new.sni",
            "'*.' is not a host name",
            id="sni-bare-wildcard",
        ),
        pytest.param(
            {"rotation.hints.new.sni": ["*.com"]},
            "rotation.hints.new.sni",
            "'*.com' is not a host name",
            id="sni-wildcard-on-tld",
        ),
        pytest.param(
            {"rotation.hints.new.sni": ["foo.*.com"]},
            "rotation.hints.new.sni",
            "only as a leading '*.'",
            id="sni-inner-wildcard",
        ),
        pytest.param(
            {"rotation.hints.new.sni": ["bücher.example"]},
            "rotation.hints.new.sni",
            "punycode",
            id="sni-non-ascii",
        ),
        pytest.param(
            # The Kelvin sign lowercases to an ASCII "k": still not what a client can send.
            {"rotation.hints.new.sni": ["\u212a2.api.example.com"]},
            "rotation.hints.new.sni",
            "punycode",
            id="sni-non-ascii-folding-to-ascii",
        ),
        pytest.param(
            {"rotation.hints.new.alpn": ["http/1.1"]},
            "rotation.hints.new.alpn",
            "offered by ordinary clients",
            id="alpn-http1.1",
        ),
        pytest.param(
            {"rotation.hints.new.alpn": [""]},
            "rotation.hints.new.alpn",
            "1-255 printable ASCII bytes",
            id="alpn-empty",
        ),
        pytest.param(
            {"rotation.hints.new.networks": ["10.0.0.1/8"]},
            "rotation.hints.new.networks",
            "has host bits set",
            id="network-host-bits",
        ),
        pytest.param(
            {"rotation.hints.new.networks": ["10.0.0.0/33"]},
            "rotation.hints.new.networks",
            "write a network like",
            id="network-bad-prefix",
        ),
        pytest.param(
            {"rotation.hints.new.nets": ["10.0.0.0/8"]},
            "rotation.hints.new.nets",
            "unknown setting",
            id="unknown-in-hints",
        ),
        pytest.param(
            {"rotation.hints.both": {}},
            "rotation.hints.both",
            "unknown setting",
            id="unknown-hint-role",
        ),
        pytest.param(
            {"rotation.hints.old.sni": ["K2.API.example.com."]},
            "rotation.hints.old.sni",
            "'k2.api.example.com' is hinted for both old and new",
            id="same-sni-both-roles",
        ),
        pytest.param(
            {"rotation.hints.old.sni": ["*.api.example.com"]},
            "rotation.hints.old.sni",
            "match the same host names",
            id="old-wildcard-covers-new-sni",
        ),
        pytest.param(
            {"rotation.hints.old.alpn": ["dualproxy-k2026b"]},
            "rotation.hints.old.alpn",
            "hinted for both old and new",
            id="same-alpn-both-roles",
        ),
        pytest.param(
            {"rotation.hints.old.networks": ["10.1.0.0/16"]},
            "rotation.hints.old.networks",
            "10.1.0.0/16 overlaps 10.0.0.0/8",
            id="overlapping-networks",
        ),
        pytest.param(
            {"listen.address": "8443"},
            "listen.address",
            "'8443' is not HOST:PORT",
            id="address-port-only",
        ),
        pytest.param(
            {"listen.address": "::1:8443"},
            "listen.address",
            "put an IPv6 address in brackets",
            id="address-ipv6-unbracketed",
        ),
        pytest.param(
            {"listen.address": "127.0.0.1:70000"},
            "listen.address",
            "is not HOST:PORT",
            id="address-port-too-large",
        ),
        pytest.param(
            {"listen.address": "127.0.0.1:\u0668\u0664\u0664\u0663"},
            "listen.address",
            "is not HOST:PORT",
            id="address-port-non-ascii-digits",
        ),
        pytest.param(
            {"listen.address": "[::1:8443"},
            "listen.address",
            "brackets",
            id="address-half-bracketed",
        ),
        pytest.param(
            {"listen.address": ["127.0.0.1:8443", "127.0.0.1:8443"]},
            "listen.address",
            "listed twice",
            id="address-twice",
        ),
        pytest.param(
            {"limits": {"handshake_timeout": 0}},
            "limits.handshake_timeout",
            "out of range",
            id="zero-handshake-timeout",
        ),
    ],
)
def test_rejected(tmp_path: Path, edits: Mapping[str, object], key_path: str, message: str) -> None:
    make_files(tmp_path)
    with pytest.raises(OperatorError) as caught:
        parse(edited(edits), base_dir=tmp_path)
    assert caught.value.key_path == key_path
    assert message in caught.value.problem
    assert str(caught.value) == f"{key_path}: {caught.value.problem}"


def test_missing_files_are_accepted_without_file_checks(tmp_path: Path) -> None:
    config = parse(edited({}), base_dir=tmp_path, check_files=False)
    assert config.keys["k2026a"].key == tmp_path / "certs/k2026a/key.pem"
    assert not config.keys["k2026a"].key.exists()


# --- load: files and their folder ----------------------------------------------------------


def test_load_names_the_file_and_key_path(tmp_path: Path) -> None:
    make_files(tmp_path)
    path = tmp_path / "config.toml"
    path.write_text(EXAMPLE.replace('default = "old"', 'default = "newest"'))
    with pytest.raises(OperatorError) as caught:
        load(path)
    assert caught.value.file == path
    assert caught.value.key_path == "rotation.default"
    assert str(caught.value).startswith(f"{path}: rotation.default: ")


def test_load_rejects_a_datetime_without_zone_as_written(tmp_path: Path) -> None:
    make_files(tmp_path)
    path = tmp_path / "config.toml"
    path.write_text(EXAMPLE.replace("2027-01-15T00:00:00Z", "2027-01-15T00:00:00"))
    with pytest.raises(OperatorError, match="the time has no zone") as caught:
        load(path)
    assert caught.value.key_path == "rotation.grace_end"


def test_load_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(EXAMPLE.replace("[listen]", "[listen"))
    with pytest.raises(OperatorError, match="not valid TOML") as caught:
        load(path)
    assert caught.value.key_path == ""
    assert str(caught.value).startswith(f"{path}: ")


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.toml"
    with pytest.raises(OperatorError, match="config file not found") as caught:
        load(path)
    assert caught.value.key_path == ""
    assert caught.value.file == path
    assert "nowhere.toml" in str(caught.value)


def test_load_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(OperatorError, match="not UTF-8"):
        load(path)


def test_relative_paths_start_at_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "deploy"
    folder.mkdir()
    make_files(folder)
    (folder / "config.toml").write_text(EXAMPLE)
    monkeypatch.chdir(tmp_path)
    config = load("deploy/config.toml")
    assert config.keys["k2026b"].chain == folder / "certs/k2026b/chain.pem"
    assert config.keys["k2026b"].chain.is_absolute()


def test_relative_paths_do_not_start_at_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "deploy"
    folder.mkdir()
    make_files(tmp_path)  # next to the working folder, not next to the config
    (folder / "config.toml").write_text(EXAMPLE)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OperatorError, match="does not exist") as caught:
        load("deploy/config.toml")
    assert caught.value.key_path == "keys.k2026a.key"


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    make_files(elsewhere)
    absolute = elsewhere / "certs/k2026a/key.pem"
    config = parse(
        edited({"keys.k2026a.key": str(absolute)}), base_dir=tmp_path / "x", check_files=False
    )
    assert config.keys["k2026a"].key == absolute


# --- Config methods ------------------------------------------------------------------------


def test_identities_with_rotation_leave_standby_keys_out(tmp_path: Path) -> None:
    config = parse(
        edited({"keys.k2025": {"key": "k", "chain": "c"}}), base_dir=tmp_path, check_files=False
    )
    assert config.identities() == {"old": ("k2026a",), "new": ("k2026b",)}


def test_identities_without_rotation_serve_every_key_as_single(tmp_path: Path) -> None:
    config = parse(edited({"rotation": DELETE}), base_dir=tmp_path, check_files=False)
    assert config.rotation is None
    assert config.identities() == {"single": ("k2026a", "k2026b")}


def test_watched_files_include_the_config_file_when_loaded(tmp_path: Path) -> None:
    make_files(tmp_path)
    path = tmp_path / "config.toml"
    path.write_text(EXAMPLE)
    keys = tuple(tmp_path / relative for relative in KEY_FILES)
    assert load(path).watched_files() == (path, *keys)
    assert parse(edited({}), base_dir=tmp_path).watched_files() == keys


# --- parse_time ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("2026-12-01T00:00:00Z", GRACE_START, id="utc-z"),
        pytest.param("2026-12-01T00:00:00+00:00", GRACE_START, id="utc-offset"),
        pytest.param("2026-12-01T01:00:00+01:00", GRACE_START, id="east-offset"),
        pytest.param("2026-11-30T19:00:00-05:00", GRACE_START, id="west-offset"),
        pytest.param(
            "2026-12-01T00:00:00.250Z", GRACE_START + timedelta(milliseconds=250), id="fraction"
        ),
    ],
)
def test_parse_time(text: str, expected: datetime) -> None:
    value = parse_time(text)
    assert value == expected
    assert value.tzinfo is UTC


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("2026-12-01T00:00:00", "has no time zone", id="no-zone"),
        pytest.param("2026-12-01", "has no time zone", id="date-only"),
        pytest.param("next tuesday", "is not an ISO 8601 time", id="prose"),
        pytest.param("2026-13-01T00:00:00Z", "is not an ISO 8601 time", id="month-13"),
        pytest.param("", "is not an ISO 8601 time", id="empty"),
    ],
)
def test_parse_time_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_time(text)


# --- [upstream] and the proxy limits -------------------------------------------------------

UPSTREAM: Final = "upstream.url"


def test_upstream_defaults_and_authority(tmp_path: Path) -> None:
    make_files(tmp_path)
    upstream = parse(
        edited({UPSTREAM: "https://My-Project.appspot.com"}), base_dir=tmp_path
    ).upstream
    assert upstream == UpstreamConfig(
        url="https://My-Project.appspot.com",
        scheme="https",
        host="my-project.appspot.com",
        port=443,
    )
    assert upstream.authority == "my-project.appspot.com"


def test_upstream_every_setting(tmp_path: Path) -> None:
    make_files(tmp_path)
    (tmp_path / "upstream-ca.pem").touch()
    data = edited(
        {
            UPSTREAM: "http://[::1]:8080",
            "upstream.ca_file": "upstream-ca.pem",
            "upstream.host": "preserve",
            "upstream.headers": {"X-Proxy-Secret": "s3cret value"},
            "upstream.trusted_proxies": ["10.0.0.0/8", "2001:db8::/32"],
            "upstream.pool_max_idle": 0,
            "upstream.pool_idle_timeout": 5,
        }
    )
    upstream = parse(data, base_dir=tmp_path).upstream
    assert upstream is not None
    assert (upstream.scheme, upstream.host, upstream.port) == ("http", "::1", 8080)
    assert upstream.authority == "[::1]:8080"
    assert upstream.ca_file == tmp_path / "upstream-ca.pem"
    assert upstream.host_header == "preserve"
    assert upstream.headers == (("X-Proxy-Secret", "s3cret value"),)
    assert upstream.trusted_proxies == (IPv4Network("10.0.0.0/8"), IPv6Network("2001:db8::/32"))
    assert (upstream.pool_max_idle, upstream.pool_idle_timeout) == (0, 5.0)


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8080", "http://[::1]:8080", "http://localhost:8080", "http://127.0.0.2"],
)
def test_plain_http_to_this_machine_needs_no_opt_in(tmp_path: Path, url: str) -> None:
    make_files(tmp_path)
    upstream = parse(edited({UPSTREAM: url}), base_dir=tmp_path).upstream
    assert upstream is not None
    assert (upstream.scheme, upstream.allow_plaintext, upstream.plaintext_remote) == (
        "http",
        False,
        False,
    )


@pytest.mark.parametrize(
    "url", ["http://example.com", "http://10.1.2.3:8080", "http://[2001:db8::1]", "http://api"]
)
def test_plain_http_to_another_machine_is_refused_unless_allowed(tmp_path: Path, url: str) -> None:
    make_files(tmp_path)
    with pytest.raises(OperatorError) as caught:
        parse(edited({UPSTREAM: url}), base_dir=tmp_path)
    assert caught.value.key_path == UPSTREAM
    assert "plain HTTP to another machine" in caught.value.problem
    assert "allow_plaintext = true" in caught.value.fix
    # The twin: the operator's explicit opt-in is taken, and remembered for `check`.
    upstream = parse(
        edited({UPSTREAM: url, "upstream.allow_plaintext": True}), base_dir=tmp_path
    ).upstream
    assert upstream is not None
    assert (upstream.allow_plaintext, upstream.plaintext_remote) == (True, True)
    # https needs no opt-in, whatever the host.
    secure = parse(edited({UPSTREAM: url.replace("http:", "https:")}), base_dir=tmp_path)
    assert secure.upstream is not None
    assert not secure.upstream.plaintext_remote


def test_no_upstream_means_dualproxy_answers_itself(tmp_path: Path) -> None:
    make_files(tmp_path)
    assert parse(edited({}), base_dir=tmp_path).upstream is None


@pytest.mark.parametrize(
    ("edits", "key_path", "message"),
    [
        pytest.param({UPSTREAM: "ftp://x.example"}, UPSTREAM, "not an http(s) URL", id="scheme"),
        pytest.param({UPSTREAM: "https://"}, UPSTREAM, "not an http(s) URL", id="no-host"),
        pytest.param({UPSTREAM: "https://x.example/api"}, UPSTREAM, "only the scheme", id="path"),
        pytest.param({UPSTREAM: "https://x.example/?a=1"}, UPSTREAM, "only the scheme", id="query"),
        pytest.param({UPSTREAM: "https://u:p@x.example"}, UPSTREAM, "only the scheme", id="user"),
        pytest.param({UPSTREAM: "https://x.example:99999"}, UPSTREAM, "invalid port", id="port"),
        pytest.param({"upstream.ca_file": "x.pem"}, "upstream.url", "missing", id="no-url"),
        pytest.param(
            {UPSTREAM: "https://x.example", "upstream.ca_file": "nope.pem"},
            "upstream.ca_file",
            "does not exist",
            id="missing-ca-file",
        ),
        pytest.param(
            {UPSTREAM: "https://x.example", "upstream.host": "keep"},
            "upstream.host",
            "neither",
            id="host-mode",
        ),
        pytest.param(
            {UPSTREAM: "https://x.example", "upstream.headers": {"X Bad": "v"}},
            "upstream.headers.X Bad",
            "not a valid HTTP header",
            id="header-name",
        ),
        pytest.param(
            {UPSTREAM: "https://x.example", "upstream.headers": {"X-Ok": "a\r\nInjected: 1"}},
            "upstream.headers.X-Ok",
            "not a valid HTTP header",
            id="header-value-crlf",
        ),
        pytest.param(
            {UPSTREAM: "https://x.example", "upstream.trusted_proxies": ["10.0.0.1/8"]},
            "upstream.trusted_proxies",
            "host bits set",
            id="trusted-host-bits",
        ),
        pytest.param(
            {UPSTREAM: "https://x.example", "upstream.timeout": 5},
            "upstream.timeout",
            "unknown setting",
            id="unknown-upstream-key",
        ),
        pytest.param(
            {"limits": {"max_header_count": 2}},
            "limits.max_header_count",
            "out of range",
            id="header-count-too-low",
        ),
        pytest.param(
            {"limits": {"max_response_header_count": 7}},
            "limits.max_response_header_count",
            "out of range",
            id="response-header-count-too-low",
        ),
        pytest.param(
            {"limits": {"max_body_bytes": 1.5}},
            "limits.max_body_bytes",
            "expected an integer",
            id="body-size-not-integer",
        ),
        pytest.param(
            {"limits": {"upstream_timeout": "60s"}},
            "limits.upstream_timeout",
            "expected a number",
            id="timeout-with-unit",
        ),
    ],
)
def test_upstream_and_limits_rejected(
    tmp_path: Path, edits: Mapping[str, object], key_path: str, message: str
) -> None:
    make_files(tmp_path)
    with pytest.raises(OperatorError) as caught:
        parse(edited(edits), base_dir=tmp_path)
    assert (caught.value.key_path, message in caught.value.problem) == (key_path, True), (
        caught.value
    )


def test_every_limit_is_settable(tmp_path: Path) -> None:
    make_files(tmp_path)
    values = {
        "body_timeout": 30,
        "send_timeout": 31,
        "upstream_connect_timeout": 2,
        "upstream_timeout": 32,
        "max_request_line_bytes": 4096,
        "max_header_bytes": 8192,
        "max_header_count": 50,
        "max_response_header_count": 60,
        "max_body_bytes": 1024,
        "shutdown_grace": 0,
    }
    limits = parse(edited({"limits": values}), base_dir=tmp_path).limits
    assert {name: getattr(limits, name) for name in values} == values
    assert limits.handshake_timeout == Limits().handshake_timeout


@pytest.mark.parametrize("name", ["Connection", "Host", "Content-Length", "Transfer-Encoding"])
def test_upstream_headers_dualproxy_manages_are_refused(tmp_path: Path, name: str) -> None:
    make_files(tmp_path)
    data = edited({UPSTREAM: "https://x.example", "upstream.headers": {name: "v"}})
    with pytest.raises(OperatorError) as caught:
        parse(data, base_dir=tmp_path)
    assert caught.value.key_path == "upstream.headers"
    assert "cannot be added" in caught.value.problem


def test_upstream_header_with_an_underscore_is_refused(tmp_path: Path) -> None:
    make_files(tmp_path)
    data = edited({UPSTREAM: "https://x.example", "upstream.headers": {"X_Proxy_Secret": "v"}})
    with pytest.raises(OperatorError) as caught:
        parse(data, base_dir=tmp_path)
    assert caught.value.key_path == "upstream.headers.X_Proxy_Secret"
    assert "underscore" in caught.value.problem


@pytest.mark.parametrize(
    ("url", "refused"),
    [("https://bücher.example", True), ("https://xn--bcher-kva.example", False)],
)
def test_upstream_host_is_written_in_punycode(tmp_path: Path, url: str, refused: bool) -> None:
    make_files(tmp_path)
    data = edited({UPSTREAM: url})
    if not refused:
        upstream = parse(data, base_dir=tmp_path).upstream
        assert upstream is not None
        assert upstream.host == "xn--bcher-kva.example"
        return
    with pytest.raises(OperatorError) as caught:
        parse(data, base_dir=tmp_path)
    assert (caught.value.key_path, "punycode" in caught.value.problem) == ("upstream.url", True)


def test_upstream_header_dualproxy_does_not_manage_is_accepted(tmp_path: Path) -> None:
    make_files(tmp_path)
    data = edited({UPSTREAM: "https://x.example", "upstream.headers": {"X-Proxy-Secret": "v"}})
    upstream = parse(data, base_dir=tmp_path).upstream
    assert upstream is not None
    assert upstream.headers == (("X-Proxy-Secret", "v"),)


# --- [acme] and keys.NAME.names --------------------------------------------------------------

ACME: Final = {"directory": "https://acme.example/dir", "email": "ops@example.com"}


def acme_data(acme: Mapping[str, object], names: object = ("api.example.com",)) -> dict[str, Any]:
    data = edited({"keys.k2026a.names": list(names) if isinstance(names, tuple) else names})
    data["acme"] = dict(acme)
    return data


def test_acme_defaults_and_managed_keys(tmp_path: Path) -> None:
    make_files(tmp_path)
    config = parse(acme_data(ACME), base_dir=tmp_path)
    acme = config.acme
    assert acme is not None
    assert acme == AcmeConfig(
        directory="https://acme.example/dir",
        account_key=tmp_path / "certs/acme/account.pem",
        email="ops@example.com",
    )
    assert [k.name for k in config.acme_keys()] == ["k2026a"]
    assert config.keys["k2026a"].names == ("api.example.com",)
    assert config.keys["k2026b"].names == ()


def test_acme_every_setting(tmp_path: Path) -> None:
    make_files(tmp_path)
    (tmp_path / "ca.pem").touch()
    settings = {
        **ACME,
        "account_key": "acct.pem",
        "challenge": "http-01",
        "http_listen": "0.0.0.0:80",
        "ca_file": "ca.pem",
        "renew": False,
        "renew_fraction": 0.5,
        "retry_initial": 60,
        "retry_max": 3600,
        "recheck_interval": 600,
        "new_key_lead_days": 14,
        "order_timeout": 60,
    }
    acme = parse(acme_data(settings), base_dir=tmp_path).acme
    assert acme == AcmeConfig(
        directory="https://acme.example/dir",
        account_key=tmp_path / "acct.pem",
        email="ops@example.com",
        challenge="http-01",
        http_listen=ListenAddress("0.0.0.0", 80),
        ca_file=tmp_path / "ca.pem",
        renew=False,
        renew_fraction=0.5,
        retry_initial=60,
        retry_max=3600,
        recheck_interval=600,
        new_key_lead_days=14,
        order_timeout=60,
    )


def test_acme_managed_key_may_lack_its_chain(tmp_path: Path) -> None:
    make_files(tmp_path)
    (tmp_path / "certs/k2026a/chain.pem").unlink()
    assert parse(acme_data(ACME), base_dir=tmp_path).keys["k2026a"].names


def test_unmanaged_key_still_needs_its_chain(tmp_path: Path) -> None:
    make_files(tmp_path)
    (tmp_path / "certs/k2026b/chain.pem").unlink()
    with pytest.raises(OperatorError) as caught:
        parse(acme_data(ACME), base_dir=tmp_path)
    assert caught.value.key_path == "keys.k2026b.chain"
    assert "names" in caught.value.problem


@pytest.mark.parametrize(
    ("acme", "names", "key_path", "message"),
    [
        pytest.param({}, ("a.example",), "acme.directory", "missing", id="no-directory"),
        pytest.param(
            {"directory": "http://acme.example/dir"}, ("a.example",), "acme.directory",
            "https URL", id="directory-not-https",
        ),
        pytest.param(
            {**ACME, "email": "not-an-address"}, ("a.example",), "acme.email",
            "not an email", id="bad-email",
        ),
        pytest.param(
            {**ACME, "challenge": "dns-01"}, ("a.example",), "acme.challenge",
            "neither", id="unknown-challenge",
        ),
        pytest.param(
            {**ACME, "challenge": "http-01"}, ("a.example",), "acme.http_listen",
            "add http_listen", id="http-01-without-listener",
        ),
        pytest.param(
            {**ACME, "http_listen": "80"}, ("a.example",), "acme.http_listen",
            "HOST:PORT", id="bad-http-listen",
        ),
        pytest.param(
            {**ACME, "http_listen": "127.0.0.1:8443"}, ("a.example",), "acme.http_listen",
            "own port", id="http-listen-is-tls-listen",
        ),
        pytest.param(
            {**ACME, "ca_file": "nope.pem"}, ("a.example",), "acme.ca_file",
            "does not exist", id="missing-ca-file",
        ),
        pytest.param(
            {**ACME, "renew_fraction": 1.0}, ("a.example",), "acme.renew_fraction",
            "out of range", id="renew-fraction-at-expiry",
        ),
        pytest.param(
            {**ACME, "retry_initial": 0}, ("a.example",), "acme.retry_initial",
            "out of range", id="retry-zero-tight-loop",
        ),
        pytest.param(
            {**ACME, "retry_initial": 600, "retry_max": 60}, ("a.example",), "acme.retry_max",
            "at least retry_initial", id="retry-max-below-initial",
        ),
        pytest.param(
            {**ACME, "renw": True}, ("a.example",), "acme.renw", "did you mean 'renew'",
            id="acme-typo",
        ),
        pytest.param(ACME, ["*.example.com"], "keys.k2026a.names", "dns-01", id="wildcard"),
        pytest.param(ACME, ["192.0.2.1"], "keys.k2026a.names", "DNS names", id="ip"),
        pytest.param(ACME, ["bad_name!"], "keys.k2026a.names", "not a host", id="bad-name"),
        pytest.param(ACME, ["a.example", "A.example."], "keys.k2026a.names", "twice", id="dup"),
        pytest.param(ACME, [], "keys.k2026a.names", "is empty", id="empty-names"),
        pytest.param(ACME, "a.example", "keys.k2026a.names", "list of strings", id="not-list"),
    ],
)  # fmt: skip
def test_acme_rejected(
    tmp_path: Path, acme: Mapping[str, object], names: object, key_path: str, message: str
) -> None:
    make_files(tmp_path)
    with pytest.raises(OperatorError) as caught:
        parse(acme_data(acme, names), base_dir=tmp_path)
    assert caught.value.key_path == key_path
    assert message in caught.value.problem


def test_names_without_acme_are_rejected(tmp_path: Path) -> None:
    make_files(tmp_path)
    with pytest.raises(OperatorError) as caught:
        parse(edited({"keys.k2026a.names": ["api.example.com"]}), base_dir=tmp_path)
    assert caught.value.key_path == "keys.k2026a.names"
    assert "add an [acme] table" in caught.value.problem


def test_acme_without_any_names_is_rejected(tmp_path: Path) -> None:
    make_files(tmp_path)
    data = edited({})
    data["acme"] = dict(ACME)
    with pytest.raises(OperatorError) as caught:
        parse(data, base_dir=tmp_path)
    assert caught.value.key_path == "acme"
    assert "no key has names" in caught.value.problem


def test_the_commented_acme_example_in_config_toml_parses(tmp_path: Path) -> None:
    """config.toml documents [acme] and names in comments; uncommented, they are valid."""
    text = EXAMPLE_FILE.read_text()
    lines = text.splitlines()
    data = tomllib.loads(text)
    data.update(commented_tables("# [acme]"))
    names_line = next(line[2:] for line in lines if line.startswith("# names = "))
    data["keys"]["k2026a"].update(tomllib.loads(names_line))
    config = parse(data, base_dir=tmp_path, check_files=False)
    assert config.acme is not None
    assert config.acme.directory == "https://acme-v02.api.letsencrypt.org/directory"
    assert [k.name for k in config.acme_keys()] == ["k2026a"]


# --- [manifest] and [reports] --------------------------------------------------------------


def test_manifest_and_reports_defaults(tmp_path: Path) -> None:
    make_files(tmp_path)
    config = parse(edited({"manifest": {}, "reports": {}}), base_dir=tmp_path)
    assert config.manifest == ManifestConfig(file=tmp_path / "certs/pins.jws")
    assert config.manifest.path == "/.well-known/dualproxy/pins.json"
    assert config.reports == ReportsConfig(store=tmp_path / "reports/pin-reports.jsonl")
    assert config.reports.path == "/.well-known/dualproxy/pin-report"
    # The manifest may not exist yet (it is signed later); a change to it is a reload.
    assert not config.manifest.file.exists()
    assert config.manifest.file in config.watched_files()
    without = parse(edited({}), base_dir=tmp_path)
    assert (without.manifest, without.reports) == (None, None)


def test_manifest_and_reports_every_setting(tmp_path: Path) -> None:
    make_files(tmp_path)
    data = edited(
        {
            "manifest": {
                "path": "/pins",
                "file": "/srv/pins.jws",
                "max_age": 60,
                "warn_before_days": 3,
            },
            "reports": {
                "path": "/report",
                "store": "r.jsonl",
                "max_body_bytes": 8192,
                "per_minute": 2,
                "burst": 5,
                "store_max_bytes": 1 << 20,
                "store_files": 2,
            },
        }
    )
    config = parse(data, base_dir=tmp_path)
    assert config.manifest == ManifestConfig(
        file=Path("/srv/pins.jws"), path="/pins", max_age=60, warn_before_days=3.0
    )
    assert config.reports == ReportsConfig(
        store=tmp_path / "r.jsonl",
        path="/report",
        max_body_bytes=8192,
        per_minute=2.0,
        burst=5,
        store_max_bytes=1 << 20,
        store_files=2,
    )


@pytest.mark.parametrize(
    ("edits", "key_path", "message"),
    [
        ({"manifest": {"path": "pins.json"}}, "manifest.path", "is not a path like"),
        ({"manifest": {"path": "/"}}, "manifest.path", "not / alone"),
        ({"manifest": {"path": "/pins?x=1"}}, "manifest.path", "no query"),
        ({"manifest": {"path": "/pins%20x"}}, "manifest.path", "no %-escapes"),
        ({"manifest": {"max_age": -1}}, "manifest.max_age", "out of range"),
        ({"manifest": {"fiel": "x"}}, "manifest.fiel", "did you mean 'file'?"),
        ({"reports": {"max_body_bytes": 10}}, "reports.max_body_bytes", "out of range"),
        ({"reports": {"per_minute": 0}}, "reports.per_minute", "out of range"),
        ({"reports": {"burst": 0}}, "reports.burst", "out of range"),
        ({"reports": {"store_max_bytes": 1000}}, "reports.store_max_bytes", "out of range"),
        ({"reports": {"stor": "x"}}, "reports.stor", "did you mean 'store'?"),
        (
            {"manifest": {"path": "/x"}, "reports": {"path": "/x"}},
            "reports.path",
            "is also manifest.path",
        ),
    ],
)
def test_manifest_and_reports_rejected(
    tmp_path: Path, edits: Mapping[str, object], key_path: str, message: str
) -> None:
    make_files(tmp_path)
    with pytest.raises(OperatorError) as caught:
        parse(edited(edits), base_dir=tmp_path)
    assert caught.value.key_path == key_path
    assert message in caught.value.problem


def test_the_commented_manifest_and_reports_examples_in_config_toml_parse(tmp_path: Path) -> None:
    """config.toml documents [manifest] and [reports] in comments; uncommented, they are valid
    and say what the defaults say."""
    make_files(tmp_path)
    data = edited({})
    data.update(commented_tables("# [manifest]", "# [reports]"))
    config = parse(data, base_dir=tmp_path)
    assert config.manifest == ManifestConfig(file=tmp_path / "certs/pins.jws")
    assert config.reports == ReportsConfig(store=tmp_path / "reports/pin-reports.jsonl")


# --- [state] -------------------------------------------------------------------------------


def test_without_state_the_folder_is_the_acme_account_s(tmp_path: Path) -> None:
    """Unnamed, the state folder is certs/acme beside the config (where the ACME account has
    always defaulted to), or the folder of an account_key the config names; ticket keys stay
    in memory. Its twin names the folder: test_a_named_state_folder_..."""
    make_files(tmp_path)
    config = parse(edited({}), base_dir=tmp_path)
    assert config.state == StateConfig(dir=tmp_path / "certs/acme", configured=False)
    assert config.tls == TlsSettings()
    acme = parse(acme_data(ACME), base_dir=tmp_path)
    assert acme.acme is not None
    assert acme.state.dir == acme.acme.account_key.parent == tmp_path / "certs/acme"
    named_key = parse(acme_data({**ACME, "account_key": "keys/acct.pem"}), base_dir=tmp_path)
    assert named_key.state == StateConfig(dir=tmp_path / "keys", configured=False)


@pytest.mark.parametrize(
    ("written", "folder"),
    [("shared", "shared"), ("~/shared/", "home/shared"), ("/srv/dualproxy", "/srv/dualproxy")],
    ids=["relative", "home", "absolute"],
)
def test_a_named_state_folder_holds_the_acme_account_and_the_ticket_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, written: str, folder: str
) -> None:
    """A relative dir starts at the config's folder (~ is the home folder); the ACME account
    key, and so its challenges and order lock, default to it; so do the ticket keys (0600,
    the errors about them naming state.dir)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    make_files(tmp_path)
    data = acme_data(ACME)
    data["state"] = {"dir": written}
    config = parse(data, base_dir=tmp_path)
    expected = tmp_path / folder
    assert config.state == StateConfig(dir=expected, configured=True)
    assert config.acme is not None
    assert config.acme.account_key == expected / "account.pem"
    assert config.tls == TlsSettings(
        ticket_key_file=expected / "ticket-keys", ticket_key_file_key="state.dir"
    )


@pytest.mark.parametrize(
    ("tables", "account_key", "ticket_key_file"),
    [
        ({"acme": {"account_key": "acct.pem"}}, "acct.pem", "state/ticket-keys"),
        ({"tls": {"ticket_key_file": "t.keys"}}, "state/account.pem", "t.keys"),
        ({"tls": {"session_tickets": False}}, "state/account.pem", None),
    ],
    ids=["account-key-named", "ticket-key-file-named", "tickets-off"],
)
def test_what_the_config_names_wins_over_the_state_folder(
    tmp_path: Path,
    tables: dict[str, dict[str, object]],
    account_key: str,
    ticket_key_file: str | None,
) -> None:
    make_files(tmp_path)
    data = acme_data(ACME)
    data["state"] = {"dir": "state"}
    for table, settings in tables.items():
        data.setdefault(table, {}).update(settings)
    config = parse(data, base_dir=tmp_path)
    assert config.state.dir == tmp_path / "state"
    assert config.acme is not None
    assert config.acme.account_key == tmp_path / account_key
    expected = tmp_path / ticket_key_file if ticket_key_file is not None else None
    assert config.tls.ticket_key_file == expected
    named = "tls.ticket_key_file" if "tls" in tables else "state.dir"
    assert config.tls.ticket_key_file_key == named


@pytest.mark.parametrize(
    ("state", "key_path", "message"),
    [
        ({}, "state.dir", "missing"),
        ({"dir": ""}, "state.dir", "is empty"),
        ({"dir": 7}, "state.dir", "expected a string"),
        ({"dir": "certs/k2026a/key.pem"}, "state.dir", "is not a folder"),
        ({"dir": "s", "dri": "s"}, "state.dri", "unknown setting"),
    ],
    ids=["no-dir", "empty", "not-text", "a-file", "unknown-key"],
)
def test_a_bad_state_table_is_refused(
    tmp_path: Path, state: dict[str, object], key_path: str, message: str
) -> None:
    make_files(tmp_path)
    with pytest.raises(OperatorError) as caught:
        parse(edited({"state": state}), base_dir=tmp_path)
    assert caught.value.key_path == key_path
    assert message in caught.value.problem


def test_the_commented_state_example_in_config_toml_parses(tmp_path: Path) -> None:
    make_files(tmp_path)
    data = edited({})
    data.update(commented_tables("# [state]"))
    config = parse(data, base_dir=tmp_path)
    assert config.state == StateConfig(dir=tmp_path / "state", configured=True)
