"""`dualproxy dev`: the local pinning test bench.

A developer who adds pinning to an app must prove, on a laptop, that it (a) works with the
current pin, (b) fails closed against a key it does not pin, and (c) survives a rotation. The
bench is a realistic endpoint for that:

- its material (devcerts): a dev CA kept across runs, keys old, new and rogue, and expired,
  wrong-host and untrusted certificates;
- the real server (`server.Server`, dev headers on: every response names the key served and
  why) in front of `--upstream` or the built-in echo upstream (`echo`), so the chain
  app -> dualproxy -> upstream is visible;
- scenarios, each one `Config` (`build_config`, pure). Switching is `Server.apply`, the path a
  reload takes: connections already open keep the key they were served, the next connection
  gets the new scenario. `dualproxy dev switch` asks through the admin endpoint (`devcontrol`);
- what to try: curl commands that play an app, exact as printed, each with what it gets in the
  current scenario. `expect` predicts that from the policy the server runs (the tests compare
  the prediction with what curl gets).

Scenarios:
    old-only    before the rotation: everyone gets old (reason before-window)
    grace       in the grace window: old by default; new for SNI new.localhost, ALPN
                dualproxy-new and any --new-network (hint-sni, hint-alpn, hint-network)
    new-only    after the rotation: everyone gets new (after-window)
    rogue, expired, wrong-host, untrusted
                that certificate, to everyone (single); see devcerts for what each is
"""

from __future__ import annotations

import ipaddress
import logging
import shlex
import signal
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final

import trio

from dualproxy.config.loader import parse as parse_config
from dualproxy.config.names import IPAddress, ListenAddress, is_ip_address
from dualproxy.config.schema import Config, Rotation
from dualproxy.dev import control as devcontrol
from dualproxy.dev import echo
from dualproxy.dev.certs import (
    CERTIFICATES,
    DEFAULT_NAMES,
    HINT_SNI,
    WRONG_HOST,
    DevMaterial,
    issue_certificate,
    prepare,
)
from dualproxy.rotation import policy
from dualproxy.serve.clock import utc_now
from dualproxy.serve.listeners import describe_bound, open_listeners
from dualproxy.serve.server import Server
from dualproxy.tls import keystore, pins
from dualproxy.tls.clienthello import ClientHello

__all__ = [
    "CURL_EXIT_PIN_MISMATCH",
    "CURL_EXIT_VERIFY_FAILED",
    "DEFAULT_DIR",
    "DEFAULT_NAMES",
    "DEFAULT_SCENARIO",
    "HINT_ALPN",
    "HINT_SNI",
    "PROBES",
    "SCENARIOS",
    "Bench",
    "BenchSettings",
    "DevMaterial",
    "Expectation",
    "Probe",
    "build_config",
    "expect",
    "issue_certificate",
    "prepare",
]

log = logging.getLogger("dualproxy")

HINT_ALPN: Final = "dualproxy-new"
SCENARIOS: Final = ("old-only", "grace", "new-only", "rogue", "expired", "wrong-host", "untrusted")
DEFAULT_SCENARIO: Final = "grace"
# Where the bench keeps its material unless told otherwise (--dir), relative to where it runs.
DEFAULT_DIR: Final = "certs/dev"
# The scenarios that are phases of one rotation from old to new; the others serve one
# certificate of that name to everyone.
ROTATION_SCENARIOS: Final = ("old-only", "grace", "new-only")
SUMMARIES: Final[Mapping[str, str]] = {
    "old-only": "before the rotation: everyone gets old",
    "grace": "the grace window: old by default, new for the hints",
    "new-only": "after the rotation: everyone gets new",
    "rogue": "a key from the same dev CA that nobody pins (a mis-issued certificate):"
    " pinning apps must refuse it, apps without pins accept it",
    "expired": "old's key (the pin matches) in a certificate that expired:"
    " every app must refuse it",
    "wrong-host": f"old's key (the pin matches) in a valid certificate for {WRONG_HOST} only:"
    " every app must refuse it",
    "untrusted": "old's key (the pin matches) in a certificate from a CA nobody trusts:"
    " every app must refuse it",
}
# The rotation's window, placed around the clock at start: in `grace` it opened this long ago
# (clock skew between the machine and an emulator cannot put "now" before it)...
WINDOW_OPENED: Final = timedelta(days=1)
# ...and it is this long, so a bench left running stays in its phase.
WINDOW_LENGTH: Final = timedelta(days=365)
# curl's exit codes (`man curl`, EXIT CODES): CURLE_PEER_FAILED_VERIFICATION, the certificate
# chain or name did not verify; CURLE_SSL_PINNEDPUBKEYNOTMATCH, the key is not pinned.
CURL_EXIT_VERIFY_FAILED: Final = 60
CURL_EXIT_PIN_MISMATCH: Final = 90


@dataclass(frozen=True, slots=True)
class BenchSettings:
    """The bench's command line, as far as its configs depend on it."""

    listen: str  # HOST:PORT
    upstream: str | None  # URL; None: dualproxy's own placeholder answers (tests)
    new_networks: tuple[str, ...] = ()  # grace: clients from these networks get new
    # Extra trust for an https upstream with a private or test CA (upstream.ca_file).
    upstream_ca: Path | None = None


def build_config(
    material: DevMaterial, scenario: str, settings: BenchSettings, now: datetime
) -> Config:
    """The config that serves `scenario`. Raises OperatorError with the key path of what the
    command line got wrong (listen.address, upstream.url, rotation.hints.new.networks)."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; one of {', '.join(SCENARIOS)}")
    data: dict[str, Any] = {"listen": {"address": settings.listen}}
    if settings.upstream is not None:
        # The developer typed the URL on the command line of a bench that never serves
        # production: http:// to a dev server on the LAN is what they asked for.
        data["upstream"] = {"url": settings.upstream, "allow_plaintext": True}
        if settings.upstream_ca is not None:
            data["upstream"]["ca_file"] = str(settings.upstream_ca.absolute())
    if scenario in ROTATION_SCENARIOS:
        data["keys"] = {name: _key_table(name) for name in ("old", "new")}
        if scenario == "old-only":
            start = now + WINDOW_LENGTH
        elif scenario == "grace":
            start = now - WINDOW_OPENED
        else:
            start = now - WINDOW_OPENED - WINDOW_LENGTH
        hints = {"sni": [HINT_SNI], "alpn": [HINT_ALPN], "networks": list(settings.new_networks)}
        data["rotation"] = {
            "old": "old",
            "new": "new",
            "grace_start": start,
            "grace_end": start + WINDOW_LENGTH,
            "default": "old",
            "hints": {"new": hints},
        }
    else:
        data["keys"] = {scenario: _key_table(scenario)}
    return parse_config(data, base_dir=material.folder)


def _key_table(name: str) -> dict[str, str]:
    spec = CERTIFICATES[name]
    return {"key": spec.key_file, "chain": spec.chain_file}


# --- what to try, and what it gets ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Probe:
    """One curl command that plays an app."""

    label: str  # how the output and the tests name it
    app: str  # who it plays
    pinned: tuple[str, ...]  # the keys (devcerts.KEYS) whose pins it pins; () pins nothing
    host: str  # the name it asks for (its SNI)


PROBES: Final = (
    Probe("both", "an app pinning old + new (the backup-pin practice)", ("old", "new"),
          "localhost"),
    Probe("old", "an app pinning only old (no backup pin)", ("old",), "localhost"),
    Probe("new", "an app pinning only new", ("new",), "localhost"),
    Probe("hint", f"an updated app asking for new (SNI {HINT_SNI}), pinning old + new",
          ("old", "new"), HINT_SNI),
    Probe("ca", "no pinning, only the dev CA", (), "localhost"),
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Expectation:
    """What a probe gets: curl's exit code, the key served and why, what went wrong."""

    exit_code: int
    key: str
    reason: str
    problem: str = ""  # empty when it works

    def __str__(self) -> str:
        if self.exit_code == 0:
            return f"works, served {self.key} ({self.reason})"
        return f"fails: curl exit {self.exit_code}, {self.problem}"


def expect(
    config: Config,
    probe: Probe,
    peer: IPAddress,
    pin_of: Mapping[str, str],
    now: datetime,
) -> Expectation:
    """What `probe`, run from `peer`, gets from a bench serving `config` (pure)."""
    # What decides here is the SNI and the client address; curl offers h2 and http/1.1.
    hello = ClientHello(
        legacy_version=0x0303,
        cipher_suites=(),
        sni=probe.host,
        alpn=(b"h2", b"http/1.1"),
        signature_algorithms=(),
        supported_versions=(),
        supported_groups=(),
    )
    choice = policy.choose(config.rotation, hello, peer, now)
    key = config.identities()[choice.identity][0]  # each identity of the bench has one key
    spec, reason = CERTIFICATES[key], str(choice.reason)
    problem = ""
    if spec.expired:
        problem = "the certificate has expired"
    elif spec.wrong_host:
        problem = f"the certificate is for {WRONG_HOST}, not {probe.host}"
    elif spec.issuer != "dev":
        problem = "the certificate's CA is not trusted"
    if problem:  # curl checks the chain and name in the handshake, before the pin
        return Expectation(CURL_EXIT_VERIFY_FAILED, key, reason, problem)
    if probe.pinned and pin_of[spec.key] not in {pin_of[name] for name in probe.pinned}:
        problem = f"pin mismatch ({key} served)"
        return Expectation(CURL_EXIT_PIN_MISMATCH, key, reason, problem)
    return Expectation(0, key, reason)


def curl_command(probe: Probe, material: DevMaterial, host: str, port: int) -> str:
    """The probe as a shell command: quoted, absolute paths, and `--resolve` sends its name to
    the address bound, so it works as printed whatever `localhost` resolves to."""
    argv = ["curl", "-sS", "-i", "--cacert", str(material.ca_file)]
    if probe.pinned:
        pin_list = ";".join(f"sha256//{material.pins[name]}" for name in probe.pinned)
        argv += ["--pinnedpubkey", pin_list]
    address = f"[{host}]" if ":" in host else host
    argv += [
        "--resolve",
        f"{probe.host}:{port}:{address}",
        f"https://{_url_host(probe.host)}:{port}/",
    ]
    return shlex.join(argv)


def pin_snippets(material: DevMaterial, rotation: Rotation | None, now: datetime) -> str:
    """Old + new pins for OkHttp, Android, TrustKit and iOS, for the bench's host names."""
    hostnames = tuple(
        name for name in material.names if not is_ip_address(name) and name != HINT_SNI
    )
    both = [
        pins.PinnedKey(
            name=name,
            role=policy.pin_role(rotation, name, now) if rotation else "current",
            pin=material.pins[name],
            algorithm=material.algorithms[name],
            hostnames=hostnames,
            not_after=material.not_after[name],
        )
        for name in ("old", "new")
    ]
    sections = [
        ("OkHttp (Kotlin):", pins.render(both, "okhttp")),
        (
            "Android res/xml/network_security_config.xml (debug-overrides: debug builds also"
            " trust user CAs, such as the dev CA; the pins stay enforced):",
            _with_debug_overrides(pins.render(both, "android")),
        ),
        ("TrustKit (iOS):", pins.render(both, "trustkit")),
        ("iOS Info.plist (NSPinnedDomains, iOS 14+):", pins.render(both, "ios")),
    ]
    lines: list[str] = []
    for title, snippet in sections:
        lines += [f"  {title}", *(f"    {line}" if line else "" for line in snippet.splitlines())]
    return "\n".join(lines)


_DEBUG_OVERRIDES: Final = """\
    <debug-overrides>
        <trust-anchors>
            <certificates src="user" />
        </trust-anchors>
    </debug-overrides>
</network-security-config>"""


def _with_debug_overrides(android: str) -> str:
    closing = "</network-security-config>"
    assert android.endswith(closing), "pins.render(android) ends with the closing tag"
    return android.removesuffix(closing) + _DEBUG_OVERRIDES


def _url_host(name: str) -> str:
    return f"[{name}]" if ":" in name else name


# --- the running bench -----------------------------------------------------------------------


class Bench:
    """A bench: every scenario's config, the server, the scenario it serves now."""

    def __init__(
        self,
        material: DevMaterial,
        settings: BenchSettings,
        scenario: str = DEFAULT_SCENARIO,
        *,
        command: str = "dualproxy",
        handle_signals: bool = True,
        now: datetime | None = None,
    ) -> None:
        """Builds and loads every scenario's config (a problem shows now, not at a switch);
        raises OperatorError (a bad command line, or an unusable key)."""
        now = now or utc_now()
        self.material, self.settings, self.command = material, settings, command
        self.configs = {name: build_config(material, name, settings, now) for name in SCENARIOS}
        for name, config in self.configs.items():
            if name != scenario:
                keystore.load_snapshot(config)
        # The bench's own signals (`watch_signals`): SIGHUP stops it, it never reloads.
        self.server = Server(self.configs[scenario], dev_headers=True, handle_signals=False)
        self._handle_signals = handle_signals
        self._scenario = scenario
        self._switching = trio.Lock()
        self.bound: list[tuple[str, int]] = []  # where it listens, once running
        self.admin: tuple[str, int] | None = None
        self.echo_port: int | None = None

    @property
    def scenario(self) -> str:
        return self._scenario

    @property
    def scenarios(self) -> Sequence[str]:
        return SCENARIOS

    async def switch(self, name: str) -> str:
        """Serve `name` from the next connection on; returns what the probes get now."""
        if name not in SCENARIOS:
            raise devcontrol.SwitchError(
                f"unknown scenario {name!r}; one of: {', '.join(SCENARIOS)}"
            )
        async with self._switching:  # the scenario we name is the one the server applied
            if not await self.server.apply(self.configs[name], f"scenario {name}"):
                raise devcontrol.SwitchError(
                    f"could not switch to {name} (the bench's log says why);"
                    f" still serving {self._scenario}"
                )
            previous, self._scenario = self._scenario, name
        print(f"scenario: {name} (was {previous})", flush=True)
        return self.scenario_text()

    def connect_address(self) -> tuple[str, int]:
        """Where a local client reaches the bench: a wildcard bind is reached on loopback."""
        host, port = self.bound[0]
        if ipaddress.ip_address(host).is_unspecified:
            host = "::1" if ":" in host else "127.0.0.1"
        return host, port

    def scenario_text(self) -> str:
        """The scenario, and every probe as a command with what it gets now."""
        host, port = self.connect_address()
        config, now = self.configs[self._scenario], utc_now()
        summary = SUMMARIES[self._scenario]
        if self._scenario == "grace":
            hints = [f"SNI {HINT_SNI}", f"ALPN {HINT_ALPN}"]
            hints += [f"clients from {network}" for network in self.settings.new_networks]
            summary = f"{summary} ({', '.join(hints)})"
        lines = [f"scenario    {self._scenario}: {summary}"]
        for probe in PROBES:
            expectation = expect(config, probe, ipaddress.ip_address(host), self.material.pins, now)
            lines += [
                f"  # [{probe.label}] {probe.app} -> {expectation}",
                f"  {curl_command(probe, self.material, host, port)}",
            ]
        return "\n".join(lines)

    def banner(self) -> str:
        """What the developer needs on start: where, what to trust, the pins, what to try."""
        material, port = self.material, self.connect_address()[1]
        ca = shlex.quote(str(material.ca_file))
        extra = [name for name in material.names if name not in (*DEFAULT_NAMES, HINT_SNI)]
        if all(ipaddress.ip_address(h).is_loopback for h, _ in self.bound):
            others = [
                f"  note        {name} is in the certificates, but other devices cannot reach"
                f" {describe_bound(self.bound)}: add --listen 0.0.0.0:{port} for them"
                for name in extra
            ]
        else:
            others = [f"  URL         https://{_url_host(name)}:{port}/" for name in extra]
        if self.echo_port is not None:
            upstream = (
                f"built-in echo (http://127.0.0.1:{self.echo_port}): answers JSON describing"
                " the request it received"
            )
        else:
            upstream = self.settings.upstream or "none: dualproxy answers itself"
            if self.settings.upstream_ca is not None:
                upstream += f"  (trusting {self.settings.upstream_ca.absolute()} too)"
        switch = f"{self.command} dev switch SCENARIO"
        if material.folder != Path(DEFAULT_DIR).absolute():
            switch += f" --dir {shlex.quote(str(material.folder))}"
        admin = str(ListenAddress(*self.admin)) if self.admin else "-"
        rotation = self.configs[self._scenario].rotation or self.configs["old-only"].rotation
        lines = [
            "dualproxy dev: local pinning test bench",
            f"  URL         https://localhost:{port}/  (listening on {describe_bound(self.bound)})",
            *others,
            f"  upstream    {upstream}",
            f"  dev CA      {material.ca_file}  (kept across runs; --reset makes a new one)",
            f"  old pin     sha256/{material.pins['old']}  the key apps pin today",
            f"  new pin     sha256/{material.pins['new']}  the key they move to (the backup pin)",
            f"  rogue pin   sha256/{material.pins['rogue']}  same dev CA, pinned by nobody",
            "  headers     X-Dualproxy-Key and X-Dualproxy-Reason name the key served and why",
            f"  switch      {switch}  (admin endpoint http://{admin}/scenario, localhost only)",
            f"              SCENARIO: {' '.join(SCENARIOS)}",
            "",
            "Trust the dev CA (once: it is kept across runs):",
            f"  iOS simulator     xcrun simctl keychain booted add-root-cert {ca}",
            f"  Android emulator  adb push {ca} /sdcard/Download/dualproxy-dev-ca.pem",
            "                    then Settings > Security > Encryption & credentials > Install a"
            " certificate > CA certificate;",
            "                    debug builds trust it with the debug-overrides in the Android"
            " snippet below;",
            f"                    adb reverse tcp:{port} tcp:{port}  (the app then reaches"
            f" https://localhost:{port}/)",
            "",
            *(self._hint_lines(port) if self._scenario == "grace" else []),
            "Try it: curl plays your app. Run the same commands again after each switch.",
            self.scenario_text(),
            "",
            "Pins for old + new in your app (the backup-pin practice):",
            pin_snippets(material, rotation, utc_now()),
            "",
            "Ctrl-C stops.",
        ]
        return "\n".join(lines)

    def _hint_lines(self, port: int) -> list[str]:
        """How an updated app asks for new in `grace`: the SNI alias first, the one hint every
        mobile stack can send, and how a simulator or emulator reaches that name."""
        lines = [
            f"Ask for new from your app (the SNI alias, which every app stack can send): point the"
            f" updated build at https://{HINT_SNI}:{port}/",
            f"  iOS simulator     it resolves names as the Mac does: add `127.0.0.1 {HINT_SNI}`"
            " to the Mac's /etc/hosts (once, with sudo)",
            f"  Android emulator  after the adb reverse above, give OkHttp a Dns that maps"
            f" {HINT_SNI} to 127.0.0.1 in debug builds:",
            f'                    .dns {{ host -> if (host == "{HINT_SNI}")'
            ' listOf(InetAddress.getByName("127.0.0.1")) else Dns.SYSTEM.lookup(host) }',
            f"  ALPN {HINT_ALPN}     custom clients only (OkHttp, URLSession, Flutter and React"
            " Native cannot send a custom token)",
        ]
        if self.settings.new_networks:
            networks = ", ".join(self.settings.new_networks)
            lines.append(f"  --new-network     test devices in {networks}")
        return [*lines, ""]

    async def run(self, admin_socket: socket.socket, echo_socket: socket.socket | None) -> None:
        """Serve until cancelled (Ctrl-C) or drained (SIGTERM); the banner once listening."""
        address_file, written = self.material.admin_address_file, ""
        try:
            async with trio.open_nursery() as nursery:
                if self._handle_signals:
                    await nursery.start(self.watch_signals, nursery.cancel_scope)
                if echo_socket is not None:
                    self.echo_port = int(echo_socket.getsockname()[1])
                    await nursery.start(echo.serve, echo_socket)
                self.bound = await nursery.start(self._serve, nursery.cancel_scope)
                # Last: a switch needs the bound address for the commands it answers with.
                host, admin_port = admin_socket.getsockname()[:2]
                self.admin = (str(host), int(admin_port))
                await nursery.start(devcontrol.serve, admin_socket, self)
                written = devcontrol.write_address_file(address_file, *self.admin)
                print(self.banner(), flush=True)
        finally:
            if written:
                devcontrol.remove_address_file(address_file, written)

    async def watch_signals(
        self,
        everything: trio.CancelScope,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """SIGTERM drains, as `serve`'s (a second one stops at once). SIGHUP stops the bench:
        it is what closing its terminal sends, and a bench left running without one would
        hold its ports with nobody to stop it (switching is `dev switch`, never a reload)."""
        with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGHUP:
                    # Logged, not printed: the terminal that would show it may be gone.
                    log.info("SIGHUP (its terminal closed?): stopping the bench")
                    everything.cancel()
                    return
                if not self.server.draining:
                    log.info("SIGTERM: stopping, after the requests in flight")
                    self.server.drain()
                else:
                    log.warning("SIGTERM again: stopping now")
                    self.server.stop_now()

    async def _serve(
        self,
        everything: trio.CancelScope,
        *,
        task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        listen = self.server.config.listen
        # Opened here rather than by the server, so that a port in use names the option the
        # developer typed (--listen), not a config key they never wrote.
        listeners = await open_listeners(listen.addresses, listen.reuse_port, setting="--listen")
        await self.server.run(listeners, task_status=task_status)
        everything.cancel()  # drained (SIGTERM): the echo and admin endpoint stop too
