"""A key rotation as clients see it: real loopback sockets, real clients, trustme keys.

Each case starts a server whose policy clock (`Clock`) sits before, inside or after the grace
window and proves which key a client got three ways: the leaf's SPKI pin as Python ssl saw
it, `curl --pinnedpubkey` accepting the expected pin (exit 0) while refusing the other key's
pin (exit 90), and the server's own `conn ...` log line naming the key and the reason. The
table pairs every hinted client with the plain client of the same phase, which gets the
other key in the window and the same key outside it.
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

import pytest
import trio
import trustme
from cryptography import x509
from helpers.clients import CLIENT_TIMEOUT, curl_pinned, run_client, tls_get_async
from helpers.configs import make_config, write_config
from helpers.keys import KeyFiles, make_key
from helpers.rotation import GRACE_END, GRACE_START, Clock
from helpers.serving import Running, serving

from dualproxy.cli import main as cli
from dualproxy.tls.pins import spki_pin_of_certificate

pytestmark = pytest.mark.e2e

Phase = Literal["before", "during", "after"]
Family = Literal["ipv4", "ipv6"]

AT: Final[dict[Phase, datetime]] = {
    "before": datetime(2026, 11, 20, tzinfo=UTC),
    "during": datetime(2026, 12, 15, tzinfo=UTC),
    "after": datetime(2027, 2, 1, tzinfo=UTC),
}
NEW_SNI: Final = "k2.api.example.com"
OLD_SNI: Final = "api-legacy.example.com"
PLAIN_SNI: Final = "api.example.com"
NEW_ALPN: Final = "dualproxy-k2026b"
HINTED_SOURCE: Final = "127.0.0.2"  # Linux loopback answers for all of 127/8

KEY_OF_ROLE: Final = {"old": "k2026a", "new": "k2026b"}

# curl's exit status when the server's key does not match --pinnedpubkey.
CURLE_SSL_PINNEDPUBKEYNOTMATCH: Final = 90


def rotation(old: str | Sequence[str], new: str, *, networks: Sequence[str]) -> dict[str, Any]:
    """The issue's rotation: k2026a -> k2026b with SNI, ALPN and network hints."""
    return {
        "old": old if isinstance(old, str) else list(old),
        "new": new,
        "grace_start": GRACE_START,
        "grace_end": GRACE_END,
        "hints": {
            "new": {"sni": [NEW_SNI], "alpn": [NEW_ALPN], "networks": list(networks)},
            "old": {"sni": [OLD_SNI]},
        },
    }


@pytest.fixture
def keys(ca: trustme.CA, tmp_path: Path) -> dict[str, KeyFiles]:
    return {name: make_key(ca, tmp_path / "certs", name) for name in ("k2026a", "k2026b")}


def listen_on(family: Family) -> str:
    """A loopback listen address of the family; skips IPv6 where the machine has no ::1."""
    if family == "ipv4":
        return "127.0.0.1:0"
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback (::1) on this machine: {exc}")
    return "[::1]:0"


# --- what the server says it did -----------------------------------------------------------

_LOG_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


class ConnLog:
    """The server's `conn ...` lines, one per connection, taken in order as clients finish."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level(logging.INFO, logger="dualproxy")
        self._caplog = caplog
        self._taken = 0

    def _lines(self) -> list[str]:
        return [
            r.getMessage()[len("conn ") :]
            for r in self._caplog.records
            if r.name == "dualproxy" and r.getMessage().startswith("conn ")
        ]

    async def next(self) -> dict[str, str]:
        """The line of the one connection made since the last call.

        The server logs when its handler has closed the socket, which may be just after the
        client saw the end of the response: poll, with a deadline.
        """
        with trio.fail_after(CLIENT_TIMEOUT):
            while len(lines := self._lines()) <= self._taken:
                await trio.sleep(0.01)
        assert len(lines) == self._taken + 1, lines[self._taken :]
        self._taken += 1
        return dict(_LOG_FIELD.findall(lines[-1]))


# --- clients -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Client:
    sni: str = PLAIN_SNI
    alpn: tuple[str, ...] | None = None
    source: str | None = None


CLIENTS: Final[dict[str, Client]] = {
    "plain": Client(),
    "new-sni": Client(sni=NEW_SNI),
    "old-sni": Client(sni=OLD_SNI),
    "alpn": Client(alpn=(NEW_ALPN, "http/1.1")),
    "network": Client(source=HINTED_SOURCE),
}

# (phase, client) -> (role, reason): the acceptance table of the issue.
EXPECTED: Final[dict[tuple[Phase, str], tuple[str, str]]] = {
    ("during", "plain"): ("old", "default"),
    ("during", "new-sni"): ("new", "hint-sni"),
    ("during", "old-sni"): ("old", "hint-sni"),
    ("during", "alpn"): ("new", "hint-alpn"),
    ("during", "network"): ("new", "hint-network"),
    **{("before", name): ("old", "before-window") for name in CLIENTS},
    **{("after", name): ("new", "after-window") for name in CLIENTS},
}


async def curl_twins(
    running: Running,
    cafile: Path,
    log: ConnLog,
    *,
    right: str,
    wrong: str,
    server_name: str = PLAIN_SNI,
    options: Sequence[str] = (),
) -> list[dict[str, str]]:
    """curl --pinnedpubkey with the pin it should see succeeds; with the other pin, exit 90.

    Returns the server's log lines of the two connections, in that order.
    """
    host = f"[{running.host}]" if ":" in running.host else running.host
    records = []
    for pin, expected in ((right, 0), (wrong, CURLE_SSL_PINNEDPUBKEYNOTMATCH)):
        argv = [
            *curl_pinned(running.port, cafile=cafile, pin=pin, server_name=server_name, host=host),
            *options,
        ]
        result = await run_client(argv)
        assert result.returncode == expected, (argv, result.stderr)
        if expected == 0:
            assert b"dualproxy: TLS terminated" in result.stdout
        records.append(await log.next())
    assert records[1]["outcome"] != "ok"  # the refusing client never sent its request
    return records


@dataclass(frozen=True)
class SClient:
    leaf: x509.Certificate
    output: str


async def s_client(
    running: Running, cafile: Path, *options: str, server_name: str = PLAIN_SNI
) -> SClient:
    """One GET through `openssl s_client -showcerts`; the leaf it printed, and its output."""
    host = f"[{running.host}]" if ":" in running.host else running.host
    request = f"GET / HTTP/1.1\r\nHost: {server_name}\r\nConnection: close\r\n\r\n"
    argv = [
        "openssl", "s_client", "-connect", f"{host}:{running.port}",
        "-servername", server_name, "-CAfile", str(cafile), "-verify_return_error",
        "-showcerts", "-ign_eof", *options,
    ]  # fmt: skip
    result = await run_client(argv, stdin=request.encode())
    output = result.stdout.decode("utf-8", "replace")
    # -showcerts prints the chain leaf first; -ign_eof reads on until the server closes.
    found = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", output, re.S)
    assert found is not None, (argv, result.stderr)
    assert "Verify return code: 0 (ok)" in output
    assert "HTTP/1.1 200" in output
    return SClient(x509.load_pem_x509_certificate(found.group(0).encode("ascii")), output)


# --- the grace window ----------------------------------------------------------------------


def window_cases() -> list[Any]:
    cases = []
    for family in ("ipv4", "ipv6"):
        for (phase, name), (role, reason) in EXPECTED.items():
            if family == "ipv6" and CLIENTS[name].source is not None:
                continue  # ::1 is the only IPv6 loopback address: see test_ipv6_network_hint
            if family == "ipv6" and phase != "during" and name != "new-sni":
                continue  # outside the window, one hinted client per family is enough
            cases.append(
                pytest.param(family, phase, name, role, reason, id=f"{family}-{phase}-{name}")
            )
    return cases


@pytest.mark.parametrize(("family", "phase", "client_name", "role", "reason"), window_cases())
async def test_each_client_gets_the_key_of_its_phase_and_hints(
    tmp_path: Path,
    cafile: Path,
    keys: dict[str, KeyFiles],
    caplog: pytest.LogCaptureFixture,
    family: Family,
    phase: Phase,
    client_name: str,
    role: str,
    reason: str,
) -> None:
    client = CLIENTS[client_name]
    config = make_config(
        list(keys.values()),
        rotation=rotation("k2026a", "k2026b", networks=[f"{HINTED_SOURCE}/32"]),
        base_dir=tmp_path,
        listen=listen_on(family),
    )
    expected = keys[KEY_OF_ROLE[role]]
    other = keys[KEY_OF_ROLE["old" if role == "new" else "new"]]
    assert expected.pin != other.pin
    log = ConnLog(caplog)
    async with serving(config, clock=Clock(AT[phase])) as running:
        seen = await tls_get_async(
            running.host, running.port, cafile=cafile, server_name=client.sni,
            alpn=client.alpn, source=client.source,
        )  # fmt: skip
        assert seen.pin == expected.pin
        assert seen.response.startswith(b"HTTP/1.1 200 ")
        assert seen.alpn == ("http/1.1" if client.alpn else None)
        record = await log.next()
        assert (record["identity"], record["key"], record["reason"]) == (
            role, expected.name, reason)  # fmt: skip
        assert record["outcome"] == "ok"

        if client.alpn is None:
            options = ["--interface", client.source] if client.source else []
            for record in await curl_twins(
                running, cafile, log, right=expected.pin, wrong=other.pin,
                server_name=client.sni, options=options,
            ):  # fmt: skip
                assert (record["key"], record["reason"]) == (expected.name, reason)
        else:
            # curl cannot offer a custom ALPN token; openssl s_client can. Its twin offers
            # only http/1.1, which is no hint: it gets what a plain client gets in this phase.
            hinted = await s_client(running, cafile, "-alpn", ",".join(client.alpn))
            assert spki_pin_of_certificate(hinted.leaf) == expected.pin
            assert "ALPN protocol: http/1.1" in hinted.output
            assert (await log.next())["reason"] == reason
            plain_role, plain_reason = EXPECTED[phase, "plain"]
            plain = await s_client(running, cafile, "-alpn", "http/1.1")
            assert spki_pin_of_certificate(plain.leaf) == keys[KEY_OF_ROLE[plain_role]].pin
            assert "ALPN protocol: http/1.1" in plain.output
            assert (await log.next())["reason"] == plain_reason


@pytest.mark.parametrize(
    ("networks", "role", "reason"),
    [(["::1/128"], "new", "hint-network"), (["::2/128"], "old", "default")],
    ids=["hinted", "not-hinted"],
)
async def test_ipv6_network_hint(
    tmp_path: Path,
    cafile: Path,
    keys: dict[str, KeyFiles],
    caplog: pytest.LogCaptureFixture,
    networks: list[str],
    role: str,
    reason: str,
) -> None:
    """A client on ::1 is hinted by an IPv6 network that holds it, and only by that."""
    config = make_config(
        list(keys.values()),
        rotation=rotation("k2026a", "k2026b", networks=networks),
        base_dir=tmp_path,
        listen=listen_on("ipv6"),
    )
    expected = keys[KEY_OF_ROLE[role]]
    other = keys[KEY_OF_ROLE["old" if role == "new" else "new"]]
    log = ConnLog(caplog)
    async with serving(config, clock=Clock(AT["during"])) as running:
        seen = await tls_get_async(running.host, running.port, cafile=cafile)
        assert seen.pin == expected.pin
        record = await log.next()
        assert (record["key"], record["reason"]) == (expected.name, reason)
        assert record["peer"].startswith("[::1]:")
        for record in await curl_twins(running, cafile, log, right=expected.pin, wrong=other.pin):
            assert (record["key"], record["reason"]) == (expected.name, reason)


# --- an identity with an ECDSA and an RSA key ----------------------------------------------


def rsa_only_tls12(cafile: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cafile))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256")
    return context


# What each client is told to do to take only an RSA certificate (None: its defaults).
RSA_ONLY_OPTIONS: Final[dict[str, tuple[str, ...]]] = {
    "curl": ("--tls-max", "1.2", "--ciphers", "ECDHE-RSA-AES128-GCM-SHA256"),
    "openssl": ("-tls1_3", "-sigalgs", "rsa_pss_rsae_sha256:rsa_pkcs1_sha256"),
}
DEFAULT_OPTIONS: Final[dict[str, tuple[str, ...]]] = {"curl": (), "openssl": ("-tls1_3",)}

# (client, RSA only?, the key it must get, TLS version): each RSA row has its default twin.
KEY_TYPE_CASES: Final = [
    ("python", False, "ec", "TLSv1.3"),
    ("python", True, "rsa", "TLSv1.2"),
    ("curl", False, "ec", "TLSv1.3"),
    ("curl", True, "rsa", "TLSv1.2"),
    ("openssl", False, "ec", "TLSv1.3"),
    ("openssl", True, "rsa", "TLSv1.3"),
]


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
@pytest.mark.parametrize(
    ("client", "rsa_only", "key_type", "version"),
    KEY_TYPE_CASES,
    ids=[f"{c[0]}-{'rsa-only' if c[1] else 'default'}-{c[3]}" for c in KEY_TYPE_CASES],
)
async def test_old_identity_serves_ecdsa_or_rsa_by_what_the_client_takes(
    ca: trustme.CA,
    tmp_path: Path,
    cafile: Path,
    caplog: pytest.LogCaptureFixture,
    family: Family,
    client: str,
    rsa_only: bool,
    key_type: str,
    version: str,
) -> None:
    certs = tmp_path / "certs"
    ec_key = make_key(ca, certs, "k2026a-ec")
    rsa_key = make_key(ca, certs, "k2026a-rsa", key_type=trustme.KeyType.RSA)
    new_key = make_key(ca, certs, "k2026b")
    config = make_config(
        [ec_key, rsa_key, new_key],
        rotation=rotation(["k2026a-ec", "k2026a-rsa"], "k2026b", networks=[]),
        base_dir=tmp_path,
        listen=listen_on(family),
    )
    expected, other = (rsa_key, ec_key) if key_type == "rsa" else (ec_key, rsa_key)
    log = ConnLog(caplog)
    async with serving(config, clock=Clock(AT["during"])) as running:
        options = (RSA_ONLY_OPTIONS if rsa_only else DEFAULT_OPTIONS).get(client, ())
        if client == "python":
            context = rsa_only_tls12(cafile) if rsa_only else None
            seen = await tls_get_async(running.host, running.port, cafile=cafile, context=context)
            assert (seen.pin, seen.version) == (expected.pin, version)
            records = [await log.next()]
        elif client == "curl":
            records = await curl_twins(
                running, cafile, log, right=expected.pin, wrong=other.pin, options=options
            )
        else:
            printed = await s_client(running, cafile, *options)
            assert spki_pin_of_certificate(printed.leaf) == expected.pin
            assert f"Protocol  : {version}" in printed.output
            records = [await log.next()]
    # The server's accounting names the key OpenSSL really presented, for every connection
    # (curl's wrong-pin twin included: it saw the same key and refused it).
    for record in records:
        assert (record["identity"], record["key"], record["reason"]) == (
            "old", expected.name, "default")  # fmt: skip
        assert record["tls"] == version
    assert records[0]["outcome"] == "ok"


# --- `dualproxy route` agrees with the server ----------------------------------------------


@pytest.mark.parametrize(
    ("source", "identity", "key", "reason"),
    [(HINTED_SOURCE, "new", "k2026b", "hint-network"), ("127.0.0.1", "old", "k2026a", "default")],
    ids=["hinted-network", "default"],
)
async def test_route_agrees_with_the_server(
    tmp_path: Path,
    cafile: Path,
    keys: dict[str, KeyFiles],
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    source: str,
    identity: str,
    key: str,
    reason: str,
) -> None:
    config_file = tmp_path / "config.toml"
    config = write_config(
        config_file,
        list(keys.values()),
        rotation=rotation("k2026a", "k2026b", networks=[f"{HINTED_SOURCE}/32"]),
    )
    log = ConnLog(caplog)
    async with serving(config, clock=Clock(AT["during"])) as running:
        seen = await tls_get_async(running.host, running.port, cafile=cafile, source=source)
        served = await log.next()
    assert seen.pin == keys[key].pin
    at = AT["during"].isoformat()
    argv = ["route", "-c", str(config_file), "--at", at, "--sni", PLAIN_SNI, "--client", source]
    assert cli.main(argv) == 0
    routed = dict(re.findall(r"^(\w+):\s+(.*)$", capsys.readouterr().out, re.M))
    assert (routed["identity"], routed["reason"]) == (identity, reason)
    assert routed["key"].split()[0] == key  # "key:      k2026b (ECDSA P-256, sha256/PIN)"
    assert f"sha256/{seen.pin}" in routed["key"]
    assert (served["identity"], served["key"], served["reason"]) == (identity, key, reason)
