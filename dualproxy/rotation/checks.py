"""What `dualproxy check` finds wrong with keys, certificates and the rotation timeline.

Pure: takes the parsed config and the loaded keys (their certificates' names and dates) and
returns findings; it reads no file and no clock. An *error* means clients fail at the given
time `at` (an expired or not-yet-valid certificate is being served); a *warning* means they
will, or some will, unless the operator acts (expiry soon, a certificate that does not last
through the grace window, a hinted name the hinted key's certificate does not cover, names
the new certificate drops).

Every finding says where, as `OperatorError` does: the file and the config key path
(`keys.k2026a.chain`, `rotation.hints.new.sni`), then the problem and what to do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Final, Literal

from dualproxy.config.errors import locate
from dualproxy.config.names import normalize_host
from dualproxy.config.schema import Config, Role, Rotation
from dualproxy.config.times import brief_time
from dualproxy.tls.keystore import LoadedKey

__all__ = [
    "EXPIRY_WARNING",
    "Finding",
    "certificate_covers",
    "check_acme",
    "check_config",
    "check_keys",
    "check_old_pin_only",
    "check_rotation",
]

# Warn this long before a served certificate expires: two weeks leaves time to renew by hand
# after an automated renewal failed (Let's Encrypt's own expiry mails start at 20 days).
EXPIRY_WARNING: Final = timedelta(days=14)

_ROLES: Final[tuple[Role, ...]] = ("old", "new")


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem: how bad, where (file and config key path) and what to do."""

    level: Literal["error", "warning"]
    key_path: str  # "keys.k2026a.chain", "rotation.hints.new.sni"
    message: str
    file: Path | None = None

    def __str__(self) -> str:
        return locate(self.message, key_path=self.key_path, file=self.file)


def _time(moment: datetime) -> str:
    return brief_time(moment, zone=" UTC")


def certificate_covers(cert_names: Sequence[str], host: str) -> bool:
    """Whether a certificate with these SANs passes hostname verification for `host`
    (RFC 6125: a wildcard stands for exactly one whole left-most label, never for "*")."""
    host = normalize_host(host)
    for name in (normalize_host(n) for n in cert_names):
        if name == host:
            return True
        if name.startswith("*.") and "." in host:
            label, rest = host.split(".", 1)
            if label and label != "*" and rest == name[2:]:
                return True
    return False


def check_keys(config: Config, keys: Mapping[str, LoadedKey], at: datetime) -> list[Finding]:
    """Everything wrong, or about to go wrong, at the instant `at` (aware)."""
    findings = _validity(config, keys, at)
    rotation = config.rotation
    if rotation is not None:
        findings += _window(rotation, keys, at)
        findings += _names(rotation, keys, at, config.path)
    return findings


def _validity(config: Config, keys: Mapping[str, LoadedKey], at: datetime) -> list[Finding]:
    """Errors for certificates served now but not valid now; warnings for those served at
    some instant of the next EXPIRY_WARNING that expire within it."""
    findings: list[Finding] = []
    for name, key in keys.items():
        served = _served_from(config, name, at)
        if served is None or served > at + EXPIRY_WARNING:
            continue
        renew = f"renew it on the same key (dualproxy keys csr {name} --name ...) so pins hold"
        if served == at and key.not_before > at:
            problem = f"the certificate is not valid until {_time(key.not_before)}"
            findings.append(_key_finding("error", key, f"{problem}; clients reject it now"))
        elif served == at and key.not_after <= at:
            problem = f"the certificate expired at {_time(key.not_after)}"
            findings.append(_key_finding("error", key, f"{problem}; {renew}"))
        elif served < key.not_after <= at + EXPIRY_WARNING:
            problem = f"the certificate expires at {_time(key.not_after)}"
            window = f"within {EXPIRY_WARNING.days} days, while it is served"
            findings.append(_key_finding("warning", key, f"{problem}, {window}; {renew}"))
    return findings


def check_rotation(config: Config) -> list[Finding]:
    """Settings that load but do not do what their writer may think."""
    rotation = config.rotation
    findings: list[Finding] = []
    if rotation is None:
        return findings
    if rotation.canary_min_sample is not None:
        findings.append(
            Finding(
                "warning",
                "rotation.canary_min_sample",
                "no longer used: the canary halts on a sequential test checked after every"
                " canary handshake (rotation.canary_false_halt, canary_halt_margin); remove it",
                config.path,
            )
        )
    if rotation.close == "when-safe" and rotation.canary_percent <= 0:
        findings.append(
            Finding(
                "warning",
                "rotation.canary_percent",
                'is 0, so nothing samples the hint-less clients that close = "when-safe"'
                " needs evidence about: the window stays open until grace_deadline unless every"
                " client sends a hint; set canary_percent (e.g. 5)",
                config.path,
            )
        )
    return findings


def check_old_pin_only(
    config: Config, versions: Sequence[tuple[str, int]], at: datetime
) -> list[Finding]:
    """A warning naming the app versions whose pin-failure reports know only the old keys'
    pins (`versions`: name and reports, from the [reports] store): they fail on the new key."""
    rotation = config.rotation
    if rotation is None or not versions:
        return []
    named = ", ".join(f"{name} ({count} reports)" for name, count in versions)
    if at >= rotation.old_served_until:
        when = "they fail now, as the old key is no longer served"
    elif rotation.close == "when-safe":
        when = (
            f"they fail once the window closes (from {_time(rotation.grace_end)} when it is"
            f" safe, {_time(rotation.old_served_until)} at the latest)"
        )
    else:
        when = f"they fail from grace_end ({_time(rotation.grace_end)}) on"
    return [
        Finding(
            "warning",
            "reports.store",
            f"app versions know only the old key's pins: {named}; {when}: ship the new pin"
            " (a backup pin, or the signed manifest) in an update",
            config.reports.store if config.reports is not None else config.path,
        )
    ]


def _window(rotation: Rotation, keys: Mapping[str, LoadedKey], at: datetime) -> list[Finding]:
    """Warnings for certificates that do not cover the part of the timeline they serve."""
    findings: list[Finding] = []
    served_until = rotation.old_served_until
    if at >= served_until:
        return findings  # the old keys are retired; _validity covers the new ones
    end = _time(rotation.grace_end)
    for name in rotation.old:
        key = keys[name]
        if at < key.not_after < served_until:
            if rotation.close == "when-safe":
                until = (
                    f"the grace window may be held open (until grace_deadline,"
                    f" {_time(served_until)})"
                )
                earlier = "or bring rotation.grace_deadline forward"
            else:
                until = f"the grace window ends ({end})"
                earlier = "or end the window earlier (rotation.grace_end)"
            findings.append(
                _key_finding(
                    "warning",
                    key,
                    f"the old key's certificate expires at {_time(key.not_after)}, before"
                    f" {until}; apps that pin only the old key fail from then on: renew it on"
                    f" the same key, {earlier}",
                )
            )
    for name in rotation.new:
        key = keys[name]
        if at < rotation.grace_start < key.not_before:
            findings.append(
                _key_finding(
                    "warning",
                    key,
                    f"the new key's certificate is valid only from {_time(key.not_before)},"
                    f" after the grace window opens ({_time(rotation.grace_start)}); get it"
                    " re-issued now, or open the window later (rotation.grace_start)",
                )
            )
        if key.not_after < rotation.grace_end and key.not_after > max(at, rotation.grace_start):
            findings.append(
                _key_finding(
                    "warning",
                    key,
                    f"the new key's certificate expires at {_time(key.not_after)}, before the"
                    f" grace window ends ({end}); renew it on the same key",
                )
            )
        elif key.not_after <= rotation.grace_start and at < rotation.grace_start:
            findings.append(
                _key_finding(
                    "warning",
                    key,
                    f"the new key's certificate expires at {_time(key.not_after)}, before the"
                    f" grace window opens ({_time(rotation.grace_start)}); renew it on the same"
                    " key before then",
                )
            )
    return findings


def _names(
    rotation: Rotation, keys: Mapping[str, LoadedKey], at: datetime, config_file: Path | None
) -> list[Finding]:
    """Warnings for names some clients use that the certificate they get does not cover."""
    findings: list[Finding] = []
    if at < rotation.old_served_until:  # hints matter while the window can still open or last
        for role in _ROLES:
            names = [n for k in rotation.keys_of(role) for n in keys[k].names]
            for sni in rotation.hints_for(role).sni:
                if not certificate_covers(names, sni):
                    findings.append(
                        Finding(
                            "warning",
                            f"rotation.hints.{role}.sni",
                            f"clients sending {sni} get the {role} key, whose certificate does"
                            " not cover that name, so their hostname check fails; add the name"
                            " to that certificate or drop the hint",
                            config_file,
                        )
                    )
    old_names = {normalize_host(n) for k in rotation.old for n in keys[k].names}
    new_names = {normalize_host(n) for k in rotation.new for n in keys[k].names}
    # A name the new certificate covers by a wildcard is not lost.
    missing = sorted(n for n in old_names - new_names if not certificate_covers(list(new_names), n))
    if missing:
        findings.append(
            Finding(
                "warning",
                "rotation.new",
                f"the new key's certificate lacks names the old one covers: {', '.join(missing)};"
                " clients using them fail once they get the new key: add them to the new"
                " certificate",
                config_file,
            )
        )
    return findings


def check_acme(
    config: Config, keys: Mapping[str, LoadedKey], missing: Sequence[str]
) -> list[Finding]:
    """ACME-managed keys: those without a certificate yet (`missing`, their chain files
    absent), names that differ between a rotation's old and new keys, and certificates whose
    names are not the ones configured (the next renewal changes them)."""
    findings: list[Finding] = []
    for name in missing:
        key = config.keys[name]
        findings.append(
            Finding(
                "error",
                f"keys.{name}.chain",
                f"no certificate yet; get one with `dualproxy acme issue {name}` (a running"
                " serve answers the challenge), or start `dualproxy serve`, which gets it first",
                key.chain,
            )
        )
    rotation = config.rotation
    if rotation is not None:
        old = {n for k in rotation.old for n in config.keys[k].names}
        new = {n for k in rotation.new for n in config.keys[k].names}
        lost = sorted(n for n in old - new if not certificate_covers(list(new), n))
        if old and new and lost:
            findings.append(
                Finding(
                    "warning",
                    f"keys.{rotation.new[0]}.names",
                    f"the new key does not request {', '.join(lost)}, which the old key does;"
                    " clients using those names fail once they get the new key: add them",
                    config.path,
                )
            )
        added = sorted(n for n in new - old if not certificate_covers(list(old), n))
        if old and new and added:
            findings.append(
                Finding(
                    "warning",
                    f"keys.{rotation.old[0]}.names",
                    f"the old key does not request {', '.join(added)}, which the new key does;"
                    " clients using them before they get the new key fail: add them to the old",
                    config.path,
                )
            )
    for key_config in config.acme_keys():
        loaded = keys.get(key_config.name)
        if loaded is None:
            continue
        have = {normalize_host(n) for n in loaded.names}
        if have != set(key_config.names):
            findings.append(
                _key_finding(
                    "warning",
                    loaded,
                    f"the certificate covers {', '.join(sorted(have)) or 'no name'}, the config"
                    f" asks for {', '.join(key_config.names)} (keys.{key_config.name}.names);"
                    f" `dualproxy acme issue {key_config.name}` gets a matching one",
                )
            )
    return findings


def _key_finding(level: Literal["error", "warning"], key: LoadedKey, message: str) -> Finding:
    return Finding(level, f"keys.{key.name}.chain", message, key.chain_file)


def _served_from(config: Config, name: str, at: datetime) -> datetime | None:
    """The first instant from `at` on at which some client may be served key `name`, if any."""
    rotation = config.rotation
    if rotation is None:
        return at
    if name in rotation.old:
        return at if at < rotation.old_served_until else None
    if name in rotation.new:
        return max(at, rotation.grace_start)
    return None  # a standby key: configured, never served


def check_config(config: Config) -> list[Finding]:
    """What the config itself allows that an operator should hear about at every check: an
    upstream reached in plain HTTP over the network (upstream.allow_plaintext), a side of the
    rotation hinted only by an ALPN token, which common mobile stacks cannot send."""
    findings: list[Finding] = []
    rotation = config.rotation
    for role in _ROLES:
        hints = rotation.hints_for(role) if rotation is not None else None
        if hints is not None and hints.alpn and not hints.sni and not hints.networks:
            findings.append(
                Finding(
                    "warning",
                    f"rotation.hints.{role}.alpn",
                    f"the only hint for {role} is an ALPN token, which OkHttp, URLSession/"
                    "Alamofire, Flutter and React Native apps cannot send: only custom"
                    f" clients will get {role} by it; add an SNI alias (hints.{role}.sni: a"
                    " second host name for the API, used by the updated app) (README: Which"
                    " hints real apps can send)",
                    config.path,
                )
            )
    upstream = config.upstream
    if upstream is not None and upstream.plaintext_remote:
        findings.append(
            Finding(
                "warning",
                "upstream.allow_plaintext",
                f"requests to {upstream.url} and its answers cross the network unencrypted"
                " (plain HTTP to another machine, allowed by allow_plaintext = true); use"
                " https:// unless that network is yours alone",
                config.path,
            )
        )
    return findings
