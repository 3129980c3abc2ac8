"""The `dualproxy` command: check, route, pins and keys, run in-process through `cli.main`;
`check` and `serve` also as the installed console script, in their own processes.

Most tests start from the example config.toml of the repository, copied into tmp_path with
its two key files made there by trustme, so the documented example is what is tested.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from helpers.clients import curl_pinned, read_until, run_client, tls_get, tls_get_async
from helpers.configs import write_config
from helpers.keys import NAMES, KeyFiles, make_key
from helpers.rotation import GRACE_START
from helpers.serving import serving
from helpers.upstream_server import UpstreamServer, serve_upstream

from dualproxy.cli import main as cli
from dualproxy.config.loader import load as load_config
from dualproxy.dev.bench import issue_certificate
from dualproxy.ops import admin
from dualproxy.rotation.policy import canary_bucket
from dualproxy.tls import pins

EXAMPLE_CONFIG: Final = Path(__file__).resolve().parent.parent / "config.toml"
EXAMPLE_LISTEN: Final = 'address = "127.0.0.1:8443"'
EXAMPLE_UPSTREAM: Final = '[upstream]\nurl = "https://my-project.appspot.com"'
# The example's rotation, and instants in each phase of it.
BEFORE: Final = "2026-11-01T00:00:00Z"
DURING: Final = "2026-12-10T00:00:00Z"
AFTER: Final = "2027-02-01T00:00:00Z"
DURING_TIME: Final = datetime(2026, 12, 10, tzinfo=UTC)
# The certificates also carry IP addresses, which mobile pin formats must leave out.
IP_NAMES: Final = ("127.0.0.1", "::1")
EXAMPLE_NAMES: Final = (*NAMES, *IP_NAMES)
# curl's exit code for CURLE_SSL_PINNEDPUBKEYNOTMATCH (see `man curl`, EXIT CODES).
CURL_EXIT_PIN_MISMATCH: Final = 90
# The console script is slower to start than an in-process call; bounded all the same.
SUBPROCESS_TIMEOUT: Final = 60.0


@dataclass(frozen=True)
class Example:
    folder: Path
    config_file: Path
    ca: trustme.CA
    cafile: Path
    old: KeyFiles  # k2026a
    new: KeyFiles  # k2026b

    def edit(self, old: str, new: str) -> None:
        """Change the copied config; the text must be there (the example may have changed)."""
        text = self.config_file.read_text()
        assert old in text
        self.config_file.write_text(text.replace(old, new))


@pytest.fixture
def example(tmp_path: Path, ca: trustme.CA) -> Example:
    """The repository's config.toml, listening on a free port, with its key files made."""
    config_file = tmp_path / "config.toml"
    shutil.copy(EXAMPLE_CONFIG, config_file)
    text = config_file.read_text()
    assert EXAMPLE_LISTEN in text
    assert EXAMPLE_UPSTREAM in text
    # No network here: the example's App Engine upstream is dropped (dualproxy then answers
    # itself); test_example_relays_to_its_upstream puts a local one back.
    text = text.replace(EXAMPLE_LISTEN, 'address = "127.0.0.1:0"').replace(EXAMPLE_UPSTREAM, "")
    config_file.write_text(text)
    cafile = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    old, new = (
        make_key(ca, tmp_path / "certs", n, names=EXAMPLE_NAMES) for n in ("k2026a", "k2026b")
    )
    return Example(tmp_path, config_file, ca, cafile, old, new)


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def issue(
    ca: trustme.CA,
    key: KeyFiles,
    *,
    not_before: datetime,
    not_after: datetime,
    names: tuple[str, ...] = EXAMPLE_NAMES,
) -> None:
    """Replace key's chain with a certificate for the same key and these dates."""
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    private = serialization.load_pem_private_key(key.key.read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    assert isinstance(private, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    cert = issue_certificate(
        ca_cert, ca_key, private.public_key(), names, not_before=not_before, not_after=not_after
    )
    key.chain.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def assert_no_key_material(text: str, *key_files: Path) -> None:
    """No private key block, and no line of any key file's base64 body, appears in `text`."""
    assert "PRIVATE KEY" not in text
    for key_file in key_files:
        body = [line for line in key_file.read_text().splitlines() if not line.startswith("-----")]
        assert body
        for line in body:
            assert line not in text


# --- check -------------------------------------------------------------------------------


def test_check_passes_on_the_example_config(
    example: Example, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "check", "-c", example.config_file, "--at", DURING)
    assert code == cli.EXIT_OK, err
    assert err == ""
    assert f"config: {example.config_file} (ok)" in out
    for key, role in ((example.old, "retiring"), (example.new, "current")):
        assert f"  {key.name} [{role}]" in out
        assert f"sha256/{key.pin}" in out
    assert "algorithm  ECDSA P-256" in out
    assert f"names      {', '.join(EXAMPLE_NAMES)}" in out
    assert "2000-01-01 00:00 .. 3000-01-01 00:00 UTC" in out  # trustme's validity
    assert re.search(
        r"^  2026-12-01 00:00Z \.\. 2027-01-15 00:00Z  grace window: .*<- at$", out, re.M
    )
    assert "warning" not in out
    assert out.rstrip().endswith("check passed")


def test_check_warns_about_a_certificate_expiring_soon(
    example: Example, capsys: pytest.CaptureFixture[str]
) -> None:
    issue(
        example.ca, example.old, not_before=GRACE_START, not_after=DURING_TIME + timedelta(days=7)
    )
    code, out, err = run(capsys, "check", "-c", example.config_file, "--at", DURING)
    assert code == cli.EXIT_OK, err
    warnings = [line for line in out.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2  # expires within 14 days, and before the window ends
    for line in warnings:
        assert line.startswith(f"warning: {example.old.chain}: keys.k2026a.chain: ")
    assert "within 14 days" in warnings[0]
    assert "before the grace window ends" in warnings[1]
    assert out.rstrip().endswith("check passed with 2 warning(s)")


def test_check_fails_on_an_expired_certificate(
    example: Example, capsys: pytest.CaptureFixture[str]
) -> None:
    expired = DURING_TIME - timedelta(days=5)
    issue(example.ca, example.old, not_before=GRACE_START - timedelta(days=90), not_after=expired)
    code, out, err = run(capsys, "check", "-c", example.config_file, "--at", DURING)
    assert code == cli.EXIT_FAILED
    assert f"error: {example.old.chain}: keys.k2026a.chain: the certificate expired at" in err
    assert "dualproxy keys csr k2026a" in err  # what to do
    assert err.rstrip().endswith("check failed: 1 error(s)")
    assert "check passed" not in out
    assert_no_key_material(out + err, example.old.key, example.new.key)


def test_check_fails_when_the_window_outlives_trustme(
    example: Example, capsys: pytest.CaptureFixture[str]
) -> None:
    """Twin of the pass above: the same files, checked after their certificates expired."""
    code, _, err = run(capsys, "check", "-c", example.config_file, "--at", "3000-06-01T00:00:00Z")
    assert code == cli.EXIT_FAILED
    assert f"{example.new.chain}: keys.k2026b.chain: the certificate expired" in err


@pytest.mark.parametrize(
    ("old", "new", "key_path", "advice"),
    [
        ("[listen]\n", '[listen]\ncolour = "blue"\n', "listen.colour", "unknown setting"),
        ('new = "k2026b"', 'new = "k2099"', "rotation.new", "no key named 'k2099'"),
        ("2027-01-15T00:00:00Z", "2026-11-15T00:00:00Z", "rotation.grace_end", "must end after"),
        ('"certs/k2026b/key.pem"', '"certs/k2099/key.pem"', "keys.k2026b.key", "keys new"),
        ("[listen]", "[listen", "", "not valid TOML"),
    ],
)
def test_check_rejects_a_bad_config(
    example: Example,
    capsys: pytest.CaptureFixture[str],
    old: str,
    new: str,
    key_path: str,
    advice: str,
) -> None:
    example.edit(old, new)
    code, out, err = run(capsys, "check", "-c", example.config_file)
    assert code == cli.EXIT_FAILED
    assert out == ""
    assert err.startswith(f"error: {example.config_file}: {key_path}")
    assert advice in err


def test_check_refuses_plain_http_to_a_remote_upstream_unless_allowed(
    example: Example, capsys: pytest.CaptureFixture[str]
) -> None:
    with example.config_file.open("a") as config:
        config.write('\n[upstream]\nurl = "http://api.example.com"\n')
    code, out, err = run(capsys, "check", "-c", example.config_file, "--at", DURING)
    assert code == cli.EXIT_FAILED
    assert out == ""
    assert err.startswith(f"error: {example.config_file}: upstream.url: ")
    assert "plain HTTP to another machine" in err
    assert "allow_plaintext = true" in err
    # The twin: with the opt-in written, check passes and says what it allows.
    example.edit(
        'url = "http://api.example.com"\n',
        'url = "http://api.example.com"\nallow_plaintext = true\n',
    )
    code, out, err = run(capsys, "check", "-c", example.config_file, "--at", DURING)
    assert code == cli.EXIT_OK, err
    assert (
        f"warning: {example.config_file}: upstream.allow_plaintext: requests to"
        " http://api.example.com and its answers cross the network unencrypted"
    ) in out
    assert out.rstrip().endswith("check passed with 1 warning(s)")


def test_check_rejects_a_chain_for_another_key(
    example: Example, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copy(example.new.chain, example.old.chain)
    code, out, err = run(capsys, "check", "-c", example.config_file)
    assert code == cli.EXIT_FAILED
    assert out == ""
    assert err.startswith(f"error: {example.old.chain}: keys.k2026a.chain: the chain belongs to")
    assert "dualproxy keys csr" in err
    assert_no_key_material(err, example.old.key, example.new.key)


def test_check_rejects_a_readable_key(example: Example, capsys: pytest.CaptureFixture[str]) -> None:
    example.old.key.chmod(0o644)
    code, _, err = run(capsys, "check", "-c", example.config_file)
    assert code == cli.EXIT_FAILED
    assert err.startswith(f"error: {example.old.key}: keys.k2026a.key: has mode 0644")
    assert "chmod 600" in err
    assert_no_key_material(err, example.old.key)


def test_check_of_a_missing_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "check", "-c", tmp_path / "nowhere.toml")
    assert code == cli.EXIT_FAILED
    assert err.startswith(f"error: {tmp_path / 'nowhere.toml'}: config file not found")


# --- route -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "identity", "reason", "why"),
    [
        (["--at", BEFORE, "--sni", "k2.api.example.com"], "old", "before-window", "grace_start"),
        (["--at", AFTER, "--sni", "api-legacy.example.com"], "new", "after-window", "grace_end"),
        (["--at", DURING, "--sni", "K2.api.example.com."], "new", "hint-sni", "hints.new.sni"),
        (["--at", DURING, "--sni", "api-legacy.example.com"], "old", "hint-sni", "hints.old.sni"),
        (["--at", DURING, "--alpn", "h2", "dualproxy-k2026b"], "new", "hint-alpn", "hints.new"),
        (["--at", DURING, "--alpn", "h2", "--alpn", "dualproxy-k2026b"], "new", "hint-alpn", ""),
        (["--at", DURING, "--client", "10.1.2.3"], "new", "hint-network", "hints.new.networks"),
        (["--at", DURING, "--client", "::ffff:10.1.2.3"], "new", "hint-network", ""),
        (["--at", DURING, "--client", "192.0.2.1"], "old", "default", "rotation.default"),
        (["--at", DURING, "--sni", "api.example.com", "--alpn", "h2"], "old", "default", ""),
    ],
)
def test_route(
    example: Example,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    identity: str,
    reason: str,
    why: str,
) -> None:
    code, out, err = run(capsys, "route", "-c", example.config_file, *args)
    assert code == cli.EXIT_OK, err
    key = example.old if identity == "old" else example.new
    assert out.startswith(f"key:      {key.name} (ECDSA P-256, sha256/{key.pin})\n")
    assert f"identity: {identity}\n" in out
    assert f"reason:   {reason}\n" in out
    assert why in next(line for line in out.splitlines() if line.startswith("why:"))


def test_route_canary(example: Example, capsys: pytest.CaptureFixture[str]) -> None:
    example.edit("canary_percent = 0", "canary_percent = 50")
    clients = list(ipaddress.IPv4Network("192.0.2.0/24"))
    inside = next(ip for ip in clients if canary_bucket(ip) < 50)
    outside = next(ip for ip in clients if canary_bucket(ip) >= 50)
    for client, reason in ((inside, "canary"), (outside, "default")):
        argv: list[str | Path] = ["route", "-c", example.config_file, "--at", DURING]
        argv += ["--client", str(client)]
        code, out, _ = run(capsys, *argv)
        assert code == cli.EXIT_OK
        assert f"reason:   {reason}\n" in out


def when_safe(example: Example) -> None:
    """The example with close = "when-safe", a deadline and a 5% canary."""
    example.edit("canary_percent = 0 ", "canary_percent = 5 ")
    example.edit('# close = "at-grace-end" ', 'close = "when-safe"\n# ')
    example.edit(
        "# grace_deadline = 2027-02-15T00:00:00Z", "grace_deadline = 2027-02-15T00:00:00Z\n#"
    )


def test_route_says_which_rule_ends_the_window(
    example: Example, capsys: pytest.CaptureFixture[str]
) -> None:
    at = "2027-01-20T00:00:00Z"
    code, out, _ = run(capsys, "route", "-c", example.config_file, "--at", at)
    assert code == cli.EXIT_OK
    assert "reason:   after-window\n" in out
    assert 'rule:     rotation.close = "at-grace-end"' in out
    when_safe(example)
    code, out, _ = run(capsys, "route", "-c", example.config_file, "--at", at)
    assert code == cli.EXIT_OK
    assert "reason:   default\n" in out  # held open, as far as the command line can tell
    assert 'rule:     rotation.close = "when-safe": past grace_end the window goes on' in out
    code, out, _ = run(capsys, "check", "-c", example.config_file, "--at", at)
    assert code == cli.EXIT_OK
    assert re.search(r"when safe \(rotation.close\).*<- at$", out, re.M)
    assert "warning" not in out


def test_check_says_a_setting_is_unused_or_a_rule_has_no_evidence(
    example: Example, capsys: pytest.CaptureFixture[str]
) -> None:
    example.edit("canary_percent = 0 ", "canary_min_sample = 200\ncanary_percent = 0 ")
    code, out, _ = run(capsys, "check", "-c", example.config_file, "--at", DURING)
    assert code == cli.EXIT_OK
    assert "rotation.canary_min_sample: no longer used: the canary halts on a sequential" in out
    example.edit("canary_min_sample = 200\n", "")
    when_safe(example)
    example.edit("canary_percent = 5 ", "canary_percent = 0 ")
    code, out, _ = run(capsys, "check", "-c", example.config_file, "--at", DURING)
    assert code == cli.EXIT_OK
    assert "rotation.canary_percent: is 0, so nothing samples the hint-less clients" in out


def test_check_names_app_versions_that_know_only_the_old_pin(
    example: Example, capsys: pytest.CaptureFixture[str]
) -> None:
    store = example.folder / "reports" / "pin-reports.jsonl"
    store.parent.mkdir()
    record = {
        "received-at": "2026-12-02T10:00:00Z",
        "kind": "trustkit",
        "hostname": "api.example.com",
        "known-pins": [example.old.pin],
        "app-bundle-id": "com.example.app",
        "app-version": "2.3",
        "app-platform": "IOS",
    }
    both = {**record, "app-version": "2.4", "known-pins": [example.old.pin, example.new.pin]}
    store.write_text(f"{json.dumps(record)}\n{json.dumps(record)}\n{json.dumps(both)}\n")
    with example.config_file.open("a") as config:
        config.write('\n[reports]\nstore = "reports/pin-reports.jsonl"\n')
    code, out, _ = run(capsys, "check", "-c", example.config_file, "--at", DURING)
    assert code == cli.EXIT_OK
    assert (
        "reports.store: app versions know only the old key's pins: com.example.app 2.3 (IOS)"
        " (2 reports); they fail from grace_end (2027-01-15 00:00 UTC) on"
    ) in out
    assert "2.4" not in out  # its twin knows the new pin too


def test_route_without_a_rotation(example: Example, capsys: pytest.CaptureFixture[str]) -> None:
    single = example.folder / "single.toml"
    write_config(single, [example.old])
    code, out, _ = run(capsys, "route", "-c", single, "--sni", "k2.api.example.com")
    assert code == cli.EXIT_OK
    assert out.startswith(f"key:      k2026a (ECDSA P-256, sha256/{example.old.pin})\n")
    assert "reason:   single\n" in out
    assert "phase:    single" in out


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--at", "tomorrow"], "is not an ISO 8601 time"),
        (["--at", "2026-12-10T00:00:00"], "has no time zone"),
        (["--client", "10.0.0.300"], "is not an IP address"),
        (["--alpn"], "expected at least one argument"),
        (["--colour"], "unrecognized arguments"),
    ],
)
def test_route_usage_errors(
    example: Example, capsys: pytest.CaptureFixture[str], args: list[str], complaint: str
) -> None:
    code, out, err = run(capsys, "route", "-c", example.config_file, *args)
    assert code == cli.EXIT_USAGE
    assert out == ""
    assert err.startswith("usage: dualproxy")  # argparse reports unknown options at the top
    assert complaint in err


@pytest.mark.parametrize("argv", [[], ["keys"], ["bogus"]])
def test_missing_or_unknown_command_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    code, _, err = run(capsys, *argv)
    assert code == cli.EXIT_USAGE
    assert "usage: dualproxy" in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == cli.EXIT_OK
    assert re.fullmatch(r"dualproxy \d+\.\d+\.\d+\S*\n", capsys.readouterr().out)
    # Its twin: an option that is not it is a usage error.
    assert cli.main(["--verison"]) == cli.EXIT_USAGE


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == cli.EXIT_OK
    assert "exit codes: 0 ok, 1 the thing checked is wrong, 2 usage error" in out


# --- pins --------------------------------------------------------------------------------

MOBILE_FORMATS: Final = ("okhttp", "android", "trustkit", "ios")


@pytest.mark.parametrize("fmt", pins.FORMATS)
def test_pins_in_every_format(
    example: Example, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    code, out, err = run(capsys, "pins", "-c", example.config_file, "--format", fmt, "--at", BEFORE)
    assert code == cli.EXIT_OK, err
    assert out.endswith("\n")
    assert not out.endswith("\n\n")
    for key in (example.old, example.new):
        assert key.pin in out
    if fmt in MOBILE_FORMATS:
        assert "api.example.com" in out
        for ip in IP_NAMES:  # a pinned "domain" must be a host name
            assert ip not in out
    if fmt == "json":
        parsed = json.loads(out)
        assert [(k["name"], k["role"], k["pin"]) for k in parsed] == [
            ("k2026a", "current", example.old.pin),
            ("k2026b", "next", example.new.pin),
        ]
        assert parsed[0]["hostnames"] == list(NAMES)
    if fmt == "curl":
        assert out == f"sha256//{example.old.pin};sha256//{example.new.pin}\n"


def test_pins_table(example: Example, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "pins", "-c", example.config_file, "--at", AFTER)
    assert code == cli.EXIT_OK
    lines = out.splitlines()
    assert len(lines) == 2
    assert lines[0].split() == [
        "k2026a",
        "retired",
        "ECDSA",
        "P-256",
        "until",
        "3000-01-01",
        f"sha256/{example.old.pin}",
    ]
    assert lines[1].split()[:2] == ["k2026b", "current"]


def test_pins_bad_format_is_a_usage_error(
    example: Example, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "pins", "-c", example.config_file, "--format", "pkp")
    assert code == cli.EXIT_USAGE
    assert "invalid choice: 'pkp'" in err


@pytest.mark.e2e
async def test_curl_takes_the_curl_pins_as_they_are(
    example: Example, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, _ = run(capsys, "pins", "-c", example.config_file, "--format", "curl")
    assert code == cli.EXIT_OK
    pinned = out.removesuffix("\n")  # what $(dualproxy pins --format curl) gives a shell
    # The twin: pins from a config that names only some other key.
    other = make_key(example.ca, tmp_path / "other", "k2099", names=EXAMPLE_NAMES)
    other_config = tmp_path / "other.toml"
    write_config(other_config, [other])
    code, wrong_out, err = run(capsys, "pins", "-c", other_config, "--format", "curl")
    assert code == cli.EXIT_OK, err
    wrong = wrong_out.removesuffix("\n")
    assert wrong == f"sha256//{other.pin}"

    async with serving(load_config(example.config_file)) as running:
        for pin_list, expected in ((pinned, 0), (wrong, CURL_EXIT_PIN_MISMATCH)):
            argv = curl_pinned(running.port, cafile=example.cafile, pin="placeholder")
            argv[argv.index("--pinnedpubkey") + 1] = pin_list
            result = await run_client(argv)
            assert result.returncode == expected, result.stderr
            if expected == 0:
                assert b"dualproxy" in result.stdout


async def test_example_relays_to_its_upstream(example: Example, tmp_path: Path) -> None:
    """The example's [upstream] table, pointed at a local HTTPS upstream, relays requests."""
    async with serve_upstream(UpstreamServer.https(tmp_path)) as upstream:
        table = upstream.config_table()
        with example.config_file.open("a") as file:
            file.write(f'\n[upstream]\nurl = "{table["url"]}"\nca_file = "{table["ca_file"]}"\n')
        async with serving(load_config(example.config_file)) as running:
            answer = await tls_get_async(
                running.host, running.port, cafile=example.cafile, server_name="api.example.com"
            )
    assert answer.response.startswith(b"HTTP/1.1 200 ")
    [request] = upstream.requests
    assert request.target == b"/"


# --- keys new ----------------------------------------------------------------------------


def load_private(path: Path) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    return key


def printed_pin(out: str) -> str:
    match = re.search(r"^pin: sha256/(\S+)", out, re.M)
    assert match is not None, out
    return match.group(1)


@pytest.mark.parametrize(
    ("key_type", "algorithm"), [("ecdsa-p256", "ECDSA P-256"), ("rsa-2048", "RSA 2048")]
)
def test_keys_new(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key_type: str, algorithm: str
) -> None:
    store = tmp_path / "certs"
    code, out, err = run(capsys, "keys", "new", "k2027a", "--type", key_type, "--dir", store)
    assert code == cli.EXIT_OK, err
    path = store / "k2027a" / "key.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    key = load_private(path)
    assert pins.describe_key_algorithm(key.public_key()) == algorithm
    assert printed_pin(out) == pins.spki_pin(key.public_key())
    assert f"wrote {path} ({algorithm}, mode 0600)" in out
    assert_no_key_material(out + err, path)


def test_keys_new_never_overwrites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "keys", "new", "k1", "--dir", tmp_path)[0] == cli.EXIT_OK
    path = tmp_path / "k1" / "key.pem"
    before = path.read_bytes()
    code, out, err = run(capsys, "keys", "new", "k1", "--dir", tmp_path)
    assert code == cli.EXIT_FAILED
    assert out == ""
    assert err.startswith(f"error: {path}: already exists; dualproxy never overwrites")
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["keys", "new", "k1", "--type", "ed25519"], "invalid choice: 'ed25519'"),
        (["keys", "new", "../escape"], "key names are letters"),
        (["keys", "new"], "the following arguments are required: name"),
    ],
)
def test_keys_new_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], complaint: str
) -> None:
    code, _, err = run(capsys, *argv, "--dir", tmp_path / "store")
    assert code == cli.EXIT_USAGE
    assert complaint in err
    assert not (tmp_path / "store").exists()
    assert not (tmp_path / "escape").exists()


# --- keys csr ----------------------------------------------------------------------------


def test_keys_csr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "keys", "new", "k1", "--dir", tmp_path)
    key = load_private(tmp_path / "k1" / "key.pem")
    code, out, err = run(
        capsys, "keys", "csr", "k1", "--dir", tmp_path,
        "--name", "API.example.com", "--name", "*.k1.example.com", "--name", "192.0.2.7",
    )  # fmt: skip
    assert code == cli.EXIT_OK, err
    csr_file = tmp_path / "k1" / "csr.pem"
    csr = x509.load_pem_x509_csr(csr_file.read_bytes())
    assert csr.is_signature_valid
    sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["api.example.com", "*.k1.example.com"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("192.0.2.7")]
    cn = csr.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    assert [a.value for a in cn] == ["api.example.com"]
    pin = pins.spki_pin(key.public_key())
    assert pins.spki_pin(csr.public_key()) == pin
    assert printed_pin(out) == pin
    assert f"certbot certonly --csr {csr_file}" in out
    assert_no_key_material(out + err, tmp_path / "k1" / "key.pem")


def test_keys_csr_to_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "keys", "new", "k1", "--dir", tmp_path)
    code, out, _ = run(
        capsys, "keys", "csr", "k1", "--dir", tmp_path, "--name", "a.example.com", "--out", "-"
    )
    assert code == cli.EXIT_OK
    assert out.startswith("-----BEGIN CERTIFICATE REQUEST-----\n")
    assert out.endswith("-----END CERTIFICATE REQUEST-----\n")
    csr = x509.load_pem_x509_csr(out.encode())
    assert pins.spki_pin(csr.public_key()) == pins.spki_pin(
        load_private(tmp_path / "k1" / "key.pem").public_key()
    )
    assert not (tmp_path / "k1" / "csr.pem").exists()


def test_keys_csr_for_a_missing_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "keys", "csr", "k9", "--dir", tmp_path, "--name", "a.example.com")
    assert code == cli.EXIT_FAILED
    assert out == ""
    assert err.startswith(f"error: {tmp_path / 'k9' / 'key.pem'}: no such key")
    assert f"dualproxy keys new k9 --dir {tmp_path}" in err


def test_keys_csr_for_a_readable_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "keys", "new", "k1", "--dir", tmp_path)
    key_file = tmp_path / "k1" / "key.pem"
    key_file.chmod(0o644)
    code, _, err = run(capsys, "keys", "csr", "k1", "--dir", tmp_path, "--name", "a.example.com")
    assert code == cli.EXIT_FAILED
    assert err.startswith(f"error: {key_file}: has mode 0644")
    assert_no_key_material(err, key_file)


def test_keys_csr_to_a_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "keys", "new", "k1", "--dir", tmp_path)
    out_file = tmp_path / "no" / "such" / "csr.pem"
    code, _, err = run(
        capsys, "keys", "csr", "k1", "--dir", tmp_path, "--name", "a.example.com", "--out", out_file
    )
    assert code == cli.EXIT_FAILED
    assert err.startswith(f"error: {out_file}: cannot write the CSR")


@pytest.mark.parametrize(
    ("names", "complaint"),
    [
        ([], "the following arguments are required: --name"),
        (["--name", "not a host"], "is not a host name"),
        (["--name", "a.*.example.com"], "is not a host name"),
        (["--name", "*.com."], "is not a host name"),
        (["--name", "bücher.example"], "punycode"),
    ],
)
def test_keys_csr_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], names: list[str], complaint: str
) -> None:
    code, _, err = run(capsys, "keys", "csr", "k1", "--dir", tmp_path, *names)
    assert code == cli.EXIT_USAGE
    assert complaint in err


# --- the installed command ---------------------------------------------------------------


def test_installed_console_script_runs_check(example: Example) -> None:
    script = Path(sys.executable).parent / "dualproxy"
    assert script.is_file()
    assert os.access(script, os.X_OK)
    ok = subprocess.run(
        [script, "check", "-c", example.config_file, "--at", DURING],
        capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, check=False,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert f"sha256/{example.old.pin}" in ok.stdout
    assert ok.stdout.rstrip().endswith("check passed")
    # Its twin: the same command on a chain that is not the key's exits 1 with the reason.
    shutil.copy(example.new.chain, example.old.chain)
    failed = subprocess.run(
        [script, "check", "-c", example.config_file],
        capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, check=False,
    )  # fmt: skip
    assert failed.returncode == 1
    assert f"{example.old.chain}: keys.k2026a.chain:" in failed.stderr
    assert "Traceback" not in failed.stderr


def start_serve(example: Example, *options: str) -> tuple[subprocess.Popen[bytes], bytes, int]:
    """`dualproxy serve` on the example, as a process: it, its stderr up to the end of the
    "listening on" line, and the port it listens on."""
    script = Path(sys.executable).parent / "dualproxy"
    process = subprocess.Popen(
        [str(script), "serve", "-c", str(example.config_file), *options],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stderr is not None
        started = read_until(process.stderr, b"listening on ", timeout=SUBPROCESS_TIMEOUT)
        if not re.search(rb"listening on .*\n", started):  # the rest of that line
            started += read_until(process.stderr, b"\n", timeout=SUBPROCESS_TIMEOUT)
        port = re.search(rb"listening on 127\.0\.0\.1:(\d+)", started)
        assert port is not None, started
    except BaseException:
        process.kill()
        process.communicate(timeout=SUBPROCESS_TIMEOUT)
        raise
    return process, started, int(port.group(1))


@pytest.mark.e2e
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_serve_answers_then_stops_cleanly(example: Example, signum: signal.Signals) -> None:
    """Ctrl-C and SIGTERM both stop `dualproxy serve` with exit 0 and no traceback."""
    process, started, port = start_serve(example)
    try:
        # A full request first: the server is serving, not merely bound, when the signal comes.
        answer = tls_get("127.0.0.1", port, cafile=example.cafile)
        assert answer.pin in (example.old.pin, example.new.pin)
        assert answer.response.startswith(b"HTTP/1.1 200 ")
        process.send_signal(signum)
        _, rest = process.communicate(timeout=SUBPROCESS_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=SUBPROCESS_TIMEOUT)
    err = (started + rest).decode()
    assert process.returncode == 0, err
    assert "Traceback" not in err
    assert err.rstrip().endswith("INFO stopped")


@pytest.mark.e2e
def test_serve_json_logs_and_its_admin_listener_answer_status(
    example: Example, capsys: pytest.CaptureFixture[str]
) -> None:
    """`serve --log-format json` writes one JSON object per line, the connection's fields
    included; `dualproxy status` reads the running server's admin listener, which only the
    --admin override starts (the config's is off)."""
    example.edit("[admin]\n", "[admin]\nenabled = false\n")
    process, started, port = start_serve(example, "--log-format", "json", "--admin", "127.0.0.1:0")
    try:
        listener = re.search(rb"admin listener on (http://127\.0\.0\.1:(\d+))/", started)
        assert listener is not None, started
        assert int(listener.group(2)) not in (0, 80, 9901), started  # a free port, as asked
        answer = tls_get("127.0.0.1", port, cafile=example.cafile)
        assert answer.response.startswith(b"HTTP/1.1 200 ")
        code = cli.main(["status", "--admin", listener.group(1).decode()])
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=SUBPROCESS_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=SUBPROCESS_TIMEOUT)
    assert process.returncode == 0
    entries = [json.loads(line) for line in (started + rest).decode().splitlines()]
    conns = [e for e in entries if e.get("event") == "conn"]
    # The status command's own connection is to the admin listener: one TLS client only.
    assert len(conns) == 1, entries
    assert conns[0]["key"] == answer_key(example, answer.pin)
    assert (conns[0]["outcome"], conns[0]["requests"], conns[0]["alpn"]) == ("ok", 1, None)
    assert entries[-1]["message"] == "stopped"
    assert code == cli.EXIT_OK
    printed = capsys.readouterr().out
    assert printed.startswith("dualproxy status at ")
    assert re.search(rf"^{answer_key(example, answer.pin)} .* 1 +0 +0\.0%", printed, re.M), printed


@pytest.mark.e2e
def test_serve_says_what_it_serves_once_it_listens(example: Example) -> None:
    """The start-up summary: every key with its role and pin, the phase, the upstream and
    every listener, the admin listener's bound port included."""
    process, started, port = start_serve(example)
    try:
        assert process.stderr is not None
        if b"listeners: " not in started:
            started += read_until(process.stderr, b"listeners: ", timeout=SUBPROCESS_TIMEOUT)
        if not re.search(rb"listeners: .*\n", started):  # the rest of that line
            started += read_until(process.stderr, b"\n", timeout=SUBPROCESS_TIMEOUT)
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=SUBPROCESS_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=SUBPROCESS_TIMEOUT)
    text = started.decode()
    keys = re.search(r"INFO keys: (.*)$", text, re.M)
    assert keys is not None, text
    assert "k2026a (" in keys.group(1)
    assert f"sha256/{example.old.pin}" in keys.group(1)
    assert f"sha256/{example.new.pin}" in keys.group(1)
    assert re.search(r"INFO rotation: (before the grace window|grace window open|after)", text)
    assert "INFO upstream: none: dualproxy answers every request itself" in text
    listeners = re.search(
        r"INFO listeners: TLS 127\.0\.0\.1:(\d+); admin http://127\.0\.0\.1:(\d+)/", text
    )
    assert listeners is not None, text
    assert int(listeners.group(1)) == port
    assert int(listeners.group(2)) not in (0, port)


def test_serve_on_a_port_in_use_says_what_to_do(
    example: Example, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        listen = '"127.0.0.1:0"          # or a list'
        example.edit(listen, listen.replace(":0", f":{port}"))
        code = cli.main(["serve", "-c", str(example.config_file)])
    assert code == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert f"error: cannot listen on 127.0.0.1:{port} (listen.address): " in err
    assert "another process listens there" in err
    assert "choose another port with listen.address" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_serve_that_cannot_start_keeps_its_log_format(example: Example, log_format: str) -> None:
    """--log-format json: even the error that stops the start is a JSON line (a log pipeline
    must not meet a plain-text line); in text, it is the usual `error: ...`."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        listen = '"127.0.0.1:0"          # or a list'
        example.edit(listen, listen.replace(":0", f":{port}"))
        script = Path(sys.executable).parent / "dualproxy"
        failed = subprocess.run(
            [script, "serve", "-c", example.config_file, "--log-format", log_format],
            capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, check=False,
        )  # fmt: skip
    assert failed.returncode == cli.EXIT_FAILED
    lines = failed.stderr.splitlines()
    assert lines
    if log_format == "json":
        entries = [json.loads(line) for line in lines]
        assert entries[-1]["level"] == "error"
        assert entries[-1]["message"].startswith(f"cannot listen on 127.0.0.1:{port}")
    else:
        assert lines[-1].startswith(f"error: cannot listen on 127.0.0.1:{port}")
    # And a config error, before anything else is set up.
    example.config_file.write_text("[listen\n")
    broken = subprocess.run(
        [script, "serve", "-c", example.config_file, "--log-format", log_format],
        capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, check=False,
    )  # fmt: skip
    assert broken.returncode == cli.EXIT_FAILED
    if log_format == "json":
        [entry] = [json.loads(line) for line in broken.stderr.splitlines()]
        assert entry["level"] == "error"
        assert "not valid TOML" in entry["message"]
    else:
        assert broken.stderr.startswith(f"error: {example.config_file}: not valid TOML")


def second_example(example: Example) -> Path:
    """A second config beside the example's, with the same keys, in its own folder."""
    folder = example.folder / "second"
    folder.mkdir()
    shutil.copytree(example.folder / "certs", folder / "certs")
    shutil.copy(example.config_file, folder / "config.toml")
    return folder / "config.toml"


def status_json(config_file: Path) -> dict[str, object]:
    script = Path(sys.executable).parent / "dualproxy"
    asked = subprocess.run(
        [script, "status", "-c", config_file, "--json"],
        capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, check=False,
    )  # fmt: skip
    assert asked.returncode == 0, asked.stderr
    answer: dict[str, object] = json.loads(asked.stdout)
    return answer


def connections_in(status: dict[str, object]) -> int:
    rows = status["connections"]
    assert isinstance(rows, list)
    return sum(int(row["connections"]) for row in rows)


@pytest.mark.e2e
def test_two_instances_on_one_machine_each_with_its_admin_listener(
    example: Example,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Without an [admin] address every serve takes a free port: a second instance starts
    beside the first (no collision), and `dualproxy status -c` finds each one's own."""
    other = second_example(example)
    first, _, first_port = start_serve(example)
    second = None
    try:
        second_example_ = Example(
            other.parent, other, example.ca, example.cafile, example.old, example.new
        )
        second, _, second_port = start_serve(second_example_)
        # Both serve TLS: the first gets two clients, the second one; each status is its own.
        for port in (first_port, first_port, second_port):
            answer = tls_get("127.0.0.1", port, cafile=example.cafile)
            assert answer.response.startswith(b"HTTP/1.1 200")
        assert connections_in(status_json(example.config_file)) == 2
        assert connections_in(status_json(other)) == 1
        # Without -c and without ./config.toml: two servers run, which one is meant?
        empty = tmp_path / "elsewhere"
        empty.mkdir()
        monkeypatch.chdir(empty)
        assert cli.main(["status"]) == cli.EXIT_FAILED
        err = capsys.readouterr().err
        assert "2 servers are running" in err
        assert str(example.config_file) in err
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=SUBPROCESS_TIMEOUT) == 0
        # The twin: once only one runs, it is the one.
        assert cli.main(["status", "--json"]) == cli.EXIT_OK
        assert connections_in(json.loads(capsys.readouterr().out)) == 2
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
            if process is not None:
                process.communicate(timeout=SUBPROCESS_TIMEOUT)


@pytest.mark.e2e
def test_an_admin_address_in_use_never_stops_the_tls_front(example: Example) -> None:
    """The admin address is held by another process (the one being replaced): serve starts,
    serves TLS, says why the admin listener is missing, and takes the port once it is free."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        admin_port = taken.getsockname()[1]
        example.edit("[admin]\n", f'[admin]\naddress = "127.0.0.1:{admin_port}"\n')
        process, started, port = start_serve(example)
        try:
            assert process.stderr is not None
            if b"serving TLS without the admin listener" not in started:
                started += read_until(
                    process.stderr, b"serving TLS without the admin listener",
                    timeout=SUBPROCESS_TIMEOUT,
                )  # fmt: skip
            assert f"cannot listen on 127.0.0.1:{admin_port} (admin.address)".encode() in started
            answer = tls_get("127.0.0.1", port, cafile=example.cafile)
            assert answer.response.startswith(b"HTTP/1.1 200 ")
            taken.close()  # the old process exits
            read_until(process.stderr, b"is free now", timeout=SUBPROCESS_TIMEOUT)
            status = status_json(example.config_file)
            assert connections_in(status) == 1
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            _, rest = process.communicate(timeout=SUBPROCESS_TIMEOUT)
    assert process.returncode == 0
    assert b"Traceback" not in started + rest


def answer_key(example: Example, pin: str) -> str:
    """The example's key with this pin (KeyError for any other pin)."""
    return {example.old.pin: "k2026a", example.new.pin: "k2026b"}[pin]


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("http://127.0.0.1:9901", ("127.0.0.1", 9901)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("http://[::1]:9901/", ("::1", 9901)),
        ("http://localhost", ("localhost", 80)),
    ],
)
def test_admin_urls(text: str, address: tuple[str, int]) -> None:
    assert admin.parse_url(text) == address


def test_serve_admin_override_stays_on_loopback(
    example: Example, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["serve", "-c", str(example.config_file), "--admin", "0.0.0.0:9901"])
    assert code == cli.EXIT_USAGE
    assert "admin.allow_non_loopback = true" in capsys.readouterr().err
