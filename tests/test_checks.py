"""checks.py: what `dualproxy check` reports, as table tests; each finding has its negative twin.

The keys are real (a trustme key and chain loaded by keystore), with their dates and names
replaced per case: check_keys reads only those fields, and dates such as "expired during the
window" cannot be issued by a CA that only signs from now on.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import pytest
import trustme
from helpers.keys import make_key
from helpers.rotation import GRACE_END, GRACE_START

from dualproxy.config.loader import parse
from dualproxy.config.schema import Config, KeyConfig, KeyStoreSettings
from dualproxy.rotation.checks import (
    EXPIRY_WARNING,
    Finding,
    certificate_covers,
    check_acme,
    check_config,
    check_keys,
)
from dualproxy.tls.keystore import LoadedKey, load_key

BEFORE: Final = GRACE_START - timedelta(days=30)
DURING: Final = GRACE_START + timedelta(days=7)
AFTER: Final = GRACE_END + timedelta(days=30)
DAY: Final = timedelta(days=1)
TICK: Final = timedelta(microseconds=1)
# A certificate valid across the whole timeline, with margin beyond EXPIRY_WARNING.
VALID_FROM: Final = datetime(2026, 1, 1, tzinfo=UTC)
VALID_UNTIL: Final = datetime(2027, 6, 1, tzinfo=UTC)

NEW_HINT: Final = "k2.api.example.com"
OLD_HINT: Final = "api-legacy.example.com"
NAMES: Final = ("api.example.com", NEW_HINT, OLD_HINT)
CONFIG_FILE: Final = Path("/etc/dualproxy/config.toml")


def chain_of(name: str) -> Path:
    return CONFIG_FILE.parent / "certs" / name / "chain.pem"


def make_config(*, rotation: bool = True) -> Config:
    """Keys "a" (old) and "b" (new), hints as in the example config; files need not exist."""
    data: dict[str, Any] = {
        "listen": {"address": "127.0.0.1:0"},
        "keys": {n: {"key": f"certs/{n}/key.pem", "chain": f"certs/{n}/chain.pem"} for n in "ab"},
    }
    if rotation:
        data["rotation"] = {
            "old": "a",
            "new": "b",
            "grace_start": GRACE_START,
            "grace_end": GRACE_END,
            "hints": {"new": {"sni": [NEW_HINT]}, "old": {"sni": [OLD_HINT]}},
        }
    return parse(data, base_dir=CONFIG_FILE.parent, path=CONFIG_FILE, check_files=False)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> LoadedKey:
    files = make_key(trustme.CA(), tmp_path_factory.mktemp("keys"), "template")
    return load_key(KeyConfig("template", files.key, files.chain), KeyStoreSettings())


@dataclass(frozen=True)
class Cert:
    """The fields of one key's certificate that a case sets."""

    not_before: datetime = VALID_FROM
    not_after: datetime = VALID_UNTIL
    names: tuple[str, ...] = NAMES


@dataclass(frozen=True)
class Case:
    at: datetime
    old: Cert = field(default_factory=Cert)
    new: Cert = field(default_factory=Cert)
    rotation: bool = True
    # (level, key path, words the message contains), in the order check_keys reports them
    expected: tuple[tuple[str, str, str], ...] = ()


def loaded(template: LoadedKey, name: str, cert: Cert) -> LoadedKey:
    return replace(
        template,
        name=name,
        key_file=chain_of(name).with_name("key.pem"),
        chain_file=chain_of(name),
        not_before=cert.not_before,
        not_after=cert.not_after,
        names=cert.names,
    )


EXPIRED: Final = "expired"
SOON: Final = f"within {EXPIRY_WARNING.days} days"
ENDS: Final = "before the grace window ends"

CASES: Final[dict[str, Case]] = {
    # Nothing to report, in every phase.
    "all good before the window": Case(BEFORE),
    "all good during the window": Case(DURING),
    "all good after the window": Case(AFTER),
    "all good without a rotation": Case(DURING, rotation=False),
    # A served certificate that expired is an error; one no longer served is not.
    "old key expired while served": Case(
        DURING,
        old=Cert(not_after=DURING - DAY),
        expected=(("error", "keys.a.chain", EXPIRED),),
    ),
    "old key expired after it was retired": Case(AFTER, old=Cert(not_after=GRACE_END + DAY)),
    "expired exactly now": Case(
        AFTER, new=Cert(not_after=AFTER), expected=(("error", "keys.b.chain", EXPIRED),)
    ),
    "expired key without a rotation": Case(
        DURING,
        old=Cert(not_after=DURING - DAY),
        rotation=False,
        expected=(("error", "keys.a.chain", EXPIRED),),
    ),
    # A served certificate that is not valid yet is an error; before the window it is not.
    "new key not yet valid while served": Case(
        DURING,
        new=Cert(not_before=DURING + DAY),
        expected=(("error", "keys.b.chain", "not valid until"),),
    ),
    "new key not yet valid, nor served": Case(BEFORE, new=Cert(not_before=BEFORE + DAY)),
    # Expiry within EXPIRY_WARNING of a served certificate warns; a day more does not.
    "expires within 14 days": Case(
        AFTER,
        new=Cert(not_after=AFTER + EXPIRY_WARNING),
        expected=(("warning", "keys.b.chain", SOON),),
    ),
    "expires just after 14 days": Case(AFTER, new=Cert(not_after=AFTER + EXPIRY_WARNING + TICK)),
    "expires within 14 days of being served": Case(
        GRACE_START - 3 * DAY,
        new=Cert(not_after=GRACE_START + 10 * DAY),
        expected=(("warning", "keys.b.chain", SOON), ("warning", "keys.b.chain", ENDS)),
    ),
    "expires later than 14 days from now, before being served": Case(
        BEFORE,
        new=Cert(not_after=GRACE_START + 10 * DAY),
        expected=(("warning", "keys.b.chain", ENDS),),
    ),
    "expires soon and before the window opens": Case(
        GRACE_START - 3 * DAY,
        new=Cert(not_after=GRACE_START - DAY),
        expected=(("warning", "keys.b.chain", "before the grace window opens"),),
    ),
    # The old key must last until the window closes, while it can still be served.
    "old key expires before grace_end": Case(
        BEFORE,
        old=Cert(not_after=GRACE_END - DAY),
        expected=(("warning", "keys.a.chain", ENDS),),
    ),
    "old key lasts through grace_end": Case(BEFORE, old=Cert(not_after=GRACE_END + DAY)),
    "old key expires before grace_end, soon": Case(
        DURING,
        old=Cert(not_after=DURING + 10 * DAY),
        expected=(("warning", "keys.a.chain", SOON), ("warning", "keys.a.chain", ENDS)),
    ),
    # The new key must be valid when the window opens and last until it closes.
    "new key valid only after grace_start": Case(
        BEFORE,
        new=Cert(not_before=GRACE_START + DAY),
        expected=(("warning", "keys.b.chain", "after the grace window opens"),),
    ),
    "new key valid from grace_start": Case(BEFORE, new=Cert(not_before=GRACE_START)),
    "new key expires before grace_end": Case(
        BEFORE,
        new=Cert(not_after=GRACE_END - DAY),
        expected=(("warning", "keys.b.chain", ENDS),),
    ),
    # A hinted SNI name must be on the hinted key's certificate.
    "new hint not covered": Case(
        DURING,
        old=Cert(names=("api.example.com", OLD_HINT)),
        new=Cert(names=("api.example.com", OLD_HINT)),
        expected=(("warning", "rotation.hints.new.sni", NEW_HINT),),
    ),
    "new hint covered by a wildcard": Case(
        DURING,
        old=Cert(names=("api.example.com", OLD_HINT)),
        new=Cert(names=("api.example.com", OLD_HINT, "*.api.example.com")),
    ),
    "old hint not covered": Case(
        BEFORE,
        old=Cert(names=("api.example.com", NEW_HINT)),
        new=Cert(names=("api.example.com", NEW_HINT)),
        expected=(("warning", "rotation.hints.old.sni", OLD_HINT),),
    ),
    "old hint not covered, after the window": Case(
        AFTER,
        old=Cert(names=("api.example.com", NEW_HINT)),
        new=Cert(names=("api.example.com", NEW_HINT)),
    ),
    # Names the old certificate covers and the new one lacks break their clients.
    "names lost": Case(
        DURING,
        old=Cert(names=(*NAMES, "www.example.com")),
        expected=(("warning", "rotation.new", "www.example.com"),),
    ),
    "names kept by a wildcard": Case(
        DURING,
        old=Cert(names=(*NAMES, "www.example.com")),
        new=Cert(names=(*NAMES, "*.example.com")),
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_check_keys(template: LoadedKey, case: Case) -> None:
    config = make_config(rotation=case.rotation)
    keys = {"a": loaded(template, "a", case.old), "b": loaded(template, "b", case.new)}
    findings = check_keys(config, keys, case.at)
    got = [(f.level, f.key_path) for f in findings]
    assert got == [(level, key_path) for level, key_path, _ in case.expected], findings
    for finding, (_, _, words) in zip(findings, case.expected, strict=True):
        assert words in finding.message


def test_findings_name_the_file_and_key_path(template: LoadedKey) -> None:
    config = make_config()
    old = loaded(template, "a", Cert(not_after=DURING - DAY, names=("api.example.com",)))
    keys = {"a": old, "b": loaded(template, "b", Cert(names=("api.example.com",)))}
    by_path = {f.key_path: str(f) for f in check_keys(config, keys, DURING)}
    assert by_path["keys.a.chain"].startswith(f"{chain_of('a')}: keys.a.chain: ")
    assert "dualproxy keys csr a" in by_path["keys.a.chain"]  # what to do
    assert by_path["rotation.hints.new.sni"].startswith(f"{CONFIG_FILE}: rotation.hints.new.sni: ")
    assert str(Finding("warning", "", "no place")) == "no place"


@pytest.mark.parametrize(
    ("cert_names", "host", "expected"),
    [
        (("api.example.com",), "api.example.com", True),
        (("API.Example.com.",), "api.example.COM", True),  # case and one trailing dot ignored
        (("other.example.com",), "api.example.com", False),
        ((), "api.example.com", False),
        (("*.example.com",), "api.example.com", True),
        (("*.example.com",), "a.b.example.com", False),  # one label only
        (("*.example.com",), "example.com", False),  # not the parent
        (("*.example.com",), ".example.com", False),  # not an empty label
        (("*.example.com",), "*.example.com", True),  # a wildcard hint needs a wildcard cert
        (("api.example.com",), "*.example.com", False),
        (("*.api.example.com", "api.example.com"), "k2.api.example.com", True),
        (("127.0.0.1",), "127.0.0.1", True),
    ],
)
def test_certificate_covers(cert_names: tuple[str, ...], host: str, expected: bool) -> None:
    assert certificate_covers(cert_names, host) is expected


# --- ACME-managed keys ------------------------------------------------------------------------


def acme_config(old_names: list[str], new_names: list[str]) -> Config:
    data: dict[str, Any] = {
        "listen": {"address": "127.0.0.1:0"},
        "acme": {"directory": "https://acme.example/dir"},
        "keys": {
            "a": {"key": "certs/a/key.pem", "chain": "certs/a/chain.pem", "names": old_names},
            "b": {"key": "certs/b/key.pem", "chain": "certs/b/chain.pem", "names": new_names},
        },
        "rotation": {"old": "a", "new": "b", "grace_start": GRACE_START, "grace_end": GRACE_END},
    }
    return parse(data, base_dir=CONFIG_FILE.parent, path=CONFIG_FILE, check_files=False)


def test_check_acme_reports_keys_without_a_certificate() -> None:
    config = acme_config(list(NAMES), list(NAMES))
    findings = check_acme(config, {}, ["b"])
    assert [(f.level, f.key_path) for f in findings] == [("error", "keys.b.chain")]
    assert "dualproxy acme issue b" in findings[0].message
    assert check_acme(config, {}, []) == []  # the twin: nothing missing, nothing reported


def test_check_acme_reports_names_that_differ_between_old_and_new() -> None:
    config = acme_config(["api.example.com", "x.example.com"], ["api.example.com", "y.example.com"])
    findings = check_acme(config, {}, [])
    assert [(f.level, f.key_path) for f in findings] == [
        ("warning", "keys.b.names"),
        ("warning", "keys.a.names"),
    ]
    assert "x.example.com" in findings[0].message
    assert "y.example.com" in findings[1].message


def test_check_acme_reports_a_certificate_whose_names_are_not_the_configured_ones(
    template: LoadedKey,
) -> None:
    config = acme_config(["api.example.com"], ["api.example.com"])
    keys = {"a": loaded(template, "a", Cert(names=("api.example.com",)))}
    assert check_acme(config, keys, []) == []
    keys["b"] = loaded(template, "b", Cert(names=("other.example.com",)))
    findings = check_acme(config, keys, [])
    assert [(f.level, f.key_path) for f in findings] == [("warning", "keys.b.chain")]
    assert "asks for api.example.com" in findings[0].message


# --- the config itself -------------------------------------------------------------------


def hinted(new: dict[str, Any], old: dict[str, Any] | None = None) -> Config:
    data: dict[str, Any] = {
        "listen": {"address": "127.0.0.1:0"},
        "keys": {n: {"key": f"certs/{n}/key.pem", "chain": f"certs/{n}/chain.pem"} for n in "ab"},
        "rotation": {
            "old": "a", "new": "b", "grace_start": GRACE_START, "grace_end": GRACE_END,
            "hints": {"new": new, **({"old": old} if old is not None else {})},
        },
    }  # fmt: skip
    return parse(data, base_dir=CONFIG_FILE.parent, path=CONFIG_FILE, check_files=False)


def test_check_config_warns_when_the_only_hint_is_one_mobile_stacks_cannot_send() -> None:
    [finding] = check_config(hinted({"alpn": ["dualproxy-b"]}))
    assert finding.level == "warning"
    assert finding.key_path == "rotation.hints.new.alpn"
    assert finding.file == CONFIG_FILE
    assert "OkHttp, URLSession/Alamofire, Flutter and React Native" in finding.message
    assert "add an SNI alias (hints.new.sni" in finding.message
    [old_side] = check_config(hinted({"sni": [NEW_HINT]}, {"alpn": ["dualproxy-a"]}))
    assert old_side.key_path == "rotation.hints.old.alpn"


@pytest.mark.parametrize(
    "new",
    [
        {"sni": [NEW_HINT]},
        {"sni": [NEW_HINT], "alpn": ["dualproxy-b"]},
        {"networks": ["10.0.0.0/8"], "alpn": ["dualproxy-b"]},
        {},
    ],
    ids=["sni", "sni-and-alpn", "network-and-alpn", "no-hints"],
)
def test_check_config_is_quiet_when_apps_have_a_hint_they_can_send(new: dict[str, Any]) -> None:
    assert check_config(hinted(new)) == []
    assert check_config(make_config(rotation=False)) == []
