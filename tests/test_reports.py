"""Pin-failure reports: the parser (golden reports of TrustKit, TrustKit-Android and RFC 7469,
each refusal, and Hypothesis: nothing but a report or ReportError comes out), the rate limiter
on a fake clock, the counts and their summary, the bounded store, and the receiver end to end
over real TLS, never reaching the upstream.
"""

from __future__ import annotations

import base64
import copy
import ipaddress
import json
import socket
import ssl
import string
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import pytest
import trio
import trustme
from helpers.clients import CLIENT_TIMEOUT
from helpers.configs import make_config, write_config
from helpers.keys import KeyFiles, make_key
from helpers.rotation import GRACE_END, GRACE_START, Clock
from helpers.serving import serving
from helpers.upstream_server import UpstreamServer, serve_upstream
from hypothesis import given
from hypothesis import strategies as st
from test_relay import Proxy

from dualproxy.cli import main as cli
from dualproxy.ops import admin
from dualproxy.pinning import reports
from dualproxy.pinning.reports import ReportError
from dualproxy.rotation.canary import REPORT_HALT_CLIENTS
from dualproxy.rotation.policy import canary_bucket
from dualproxy.serve.rollout import REVIEW_SECONDS

REPORT_PATH: Final = "/.well-known/dualproxy/pin-report"
PIN_OLD: Final = base64.b64encode(bytes(range(32))).decode()
PIN_NEW: Final = base64.b64encode(bytes(range(32, 64))).decode()
NOW: Final = datetime(2026, 12, 10, 12, 0, tzinfo=UTC)
DURING: Final = datetime(2026, 12, 10, tzinfo=UTC)


def hpkp(pin: str) -> str:
    return f'pin-sha256="{pin}"'


@pytest.fixture(scope="module")
def pem() -> str:
    return trustme.CA().cert_pem.bytes().decode()


def trustkit_ios(
    pem: str, *, version: str = "2.3", pins: tuple[str, ...] = (PIN_OLD,)
) -> dict[str, Any]:
    """A report as TrustKit for iOS (TSKPinFailureReport) writes it."""
    return {
        "app-bundle-id": "com.example.app",
        "app-version": version,
        "app-platform": "IOS",
        "app-platform-version": "18.1.0",
        "app-vendor-id": "7C6F4D9E-1B2A-4C3D-8E9F-0A1B2C3D4E5F",
        "trustkit-version": "3.0.4",
        "date-time": "2026-12-10T11:59:00Z",
        "hostname": "api.example.com",
        "port": 443,
        "noted-hostname": "api.example.com",
        "include-subdomains": False,
        "enforce-pinning": True,
        "validated-certificate-chain": [pem, pem],
        "known-pins": [hpkp(pin) for pin in pins],
        "validation-result": 1,
        "known-pins-expiration-date": "2027-06-01",
    }


def trustkit_android(pem: str) -> dict[str, Any]:
    """As TrustKit-Android (PinningFailureReport.toJson) writes it: a served chain, no
    platform version, an RFC 822 offset in date-time, port 0."""
    return {
        "app-bundle-id": "com.example.app",
        "app-version": "41",
        "app-vendor-id": "b1c2",
        "app-platform": "ANDROID",
        "trustkit-version": "1.1.5",
        "hostname": "api.example.com",
        "port": 0,
        "noted-hostname": "example.com",
        "include-subdomains": True,
        "enforce-pinning": True,
        "validation-result": 1,
        "date-time": "2026-12-10T11:59:00+0000",
        "validated-certificate-chain": [pem],
        "served-certificate-chain": [pem],
        "known-pins": [hpkp(PIN_OLD), hpkp(PIN_NEW)],
    }


def rfc7469(pem: str) -> dict[str, Any]:
    """RFC 7469 §3.1's example, with real certificates."""
    return {
        "date-time": "2014-04-06T13:00:50Z",
        "hostname": "www.example.com",
        "port": 443,
        "effective-expiration-date": "2014-05-01T12:40:50Z",
        "include-subdomains": False,
        "noted-hostname": "example.com",
        "served-certificate-chain": [pem],
        "validated-certificate-chain": [pem],
        "known-pins": [hpkp(PIN_OLD), hpkp(PIN_NEW)],
    }


def body(report: dict[str, Any]) -> bytes:
    return json.dumps(report).encode()


# --- parsing -------------------------------------------------------------------------------


def test_a_trustkit_report_is_read_whole(pem: str) -> None:
    report = reports.parse_report(body(trustkit_ios(pem, pins=(PIN_NEW, PIN_OLD, PIN_NEW))))
    assert report.kind == "trustkit"
    assert (report.app_bundle_id, report.app_version, report.app_platform) == (
        "com.example.app",
        "2.3",
        "IOS",
    )
    assert report.known_pins == tuple(sorted((PIN_OLD, PIN_NEW)))  # a set, sorted
    assert report.validation_result == 1
    assert report.expiration_date == "2027-06-01"
    assert report.validated_chain == (pem, pem)
    record = report.record(NOW)
    assert record["received-at"] == "2026-12-10T12:00:00Z"
    assert record["app-vendor-id"] == "7C6F4D9E-1B2A-4C3D-8E9F-0A1B2C3D4E5F"


def test_a_trustkit_android_report_is_read(pem: str) -> None:
    report = reports.parse_report(body(trustkit_android(pem)))
    assert report.kind == "trustkit"
    assert (report.app_platform, report.port, report.date_time) == (
        "ANDROID",
        0,
        "2026-12-10T11:59:00+0000",
    )
    assert report.served_chain == (pem,)
    assert report.app_platform_version is None


def test_an_rfc_7469_report_is_read(pem: str) -> None:
    report = reports.parse_report(body(rfc7469(pem)))
    assert report.kind == "rfc7469"
    assert report.hostname == "www.example.com"
    assert report.noted_hostname == "example.com"
    assert report.expiration_date == "2014-05-01T12:40:50Z"
    assert report.app_bundle_id is None


def test_unknown_fields_are_ignored_and_not_stored(pem: str) -> None:
    data = {**trustkit_ios(pem), "new-field-from-trustkit-4": {"nested": [1, 2]}}
    record = reports.parse_report(body(data)).record(NOW)
    assert "new-field-from-trustkit-4" not in record
    assert "new-field-from-trustkit-4" not in json.dumps(record)


def _without(report: dict[str, Any], name: str) -> dict[str, Any]:
    return {k: v for k, v in report.items() if k != name}


def _with(report: dict[str, Any], name: str, value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(report)
    changed[name] = value
    return changed


def non_canonical(pin: str) -> str:
    """`pin` with a padding bit of its last base64 character set: it decodes to the same
    digest, but is not how base64 writes it."""
    alphabet = string.ascii_uppercase + string.ascii_lowercase + string.digits + "+/"
    last = alphabet.index(pin[-2])
    assert base64.b64decode(pin[:-2] + alphabet[last ^ 1] + "=") == base64.b64decode(pin)
    return pin[:-2] + alphabet[last ^ 1] + "="


REFUSALS: Final = [
    (lambda r: _without(r, "hostname"), "hostname is missing"),
    (lambda r: _without(r, "known-pins"), "known-pins is missing"),
    (lambda r: _without(r, "app-version"), "app-version is missing"),
    (lambda r: _without(r, "validation-result"), "validation-result is missing"),
    (lambda r: _with(r, "hostname", 42), "hostname is not a string"),
    (lambda r: _with(r, "hostname", None), "hostname is not a string"),
    (lambda r: _with(r, "hostname", ""), "hostname is empty"),
    (lambda r: _with(r, "hostname", "a" * 256), "too long"),
    (lambda r: _with(r, "app-version", "2.3\n"), "control characters"),
    (lambda r: _with(r, "port", 70000), "port is not an integer"),
    (lambda r: _with(r, "port", "443"), "port is not an integer"),
    (lambda r: _with(r, "port", True), "port is not an integer"),
    (lambda r: _with(r, "validation-result", 1.5), "validation-result is not an integer"),
    (lambda r: _with(r, "include-subdomains", 1), "not true or false"),
    (lambda r: _with(r, "known-pins", hpkp(PIN_OLD)), "not a list"),
    (lambda r: _with(r, "known-pins", [PIN_OLD]), "pin-sha256"),
    (lambda r: _with(r, "known-pins", ['pin-sha1="AAAA"']), "pin-sha256"),
    (lambda r: _with(r, "known-pins", [hpkp(PIN_OLD[:-4] + "AA==")]), "pin-sha256"),
    # The same digest, with a padding bit set: one key must never count as two pins.
    (lambda r: _with(r, "known-pins", [hpkp(non_canonical(PIN_OLD))]), "pin-sha256"),
    (lambda r: _with(r, "known-pins", [hpkp(PIN_OLD)] * 33), "at most 32"),
    (lambda r: _with(r, "validated-certificate-chain", ["not a certificate"]), "PEM"),
    (lambda r: _with(r, "validated-certificate-chain", "pem"), "not a list"),
]


@pytest.mark.parametrize(("change", "problem"), REFUSALS)
def test_a_report_that_breaks_the_schema_is_refused(pem: str, change: Any, problem: str) -> None:
    with pytest.raises(ReportError, match=problem):
        reports.parse_report(body(change(trustkit_ios(pem))))
    reports.parse_report(body(trustkit_ios(pem)))  # the twin, unchanged, is accepted


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"", "not UTF-8 JSON"),
        (b"\xff\xfe{}", "not UTF-8 JSON"),
        (b"{", "not UTF-8 JSON"),
        (b"[]", "not a JSON object"),
        (b'{"hostname": "h", "known-pins": [], "port": NaN}', "not UTF-8 JSON"),
        (b"[" * 100_000, "nested too deeply"),
        (b'{"known-pins": []}', "hostname is missing"),
    ],
)
def test_what_is_not_a_report(data: bytes, problem: str) -> None:
    with pytest.raises(ReportError, match=problem):
        reports.parse_report(data)


@given(st.binary(max_size=300))
def test_any_bytes_give_a_report_or_a_report_error(data: bytes) -> None:
    try:
        reports.parse_report(data)
    except ReportError as exc:
        problem = exc.problem
    else:
        return
    assert len(problem) < 100  # short, and our own words


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


@given(st.dictionaries(st.sampled_from(list(trustkit_ios("x"))), _json, max_size=8))
def test_any_json_object_gives_a_report_or_a_report_error(fields: dict[str, Any]) -> None:
    try:
        report = reports.parse_report(json.dumps(fields).encode())
    except ReportError:
        return
    json.dumps(report.record(NOW))  # an accepted report can always be stored


def test_content_types() -> None:
    for good in (
        b"application/json",
        b"Application/JSON; charset=utf-8",
        b"application/reports+json",
    ):
        assert reports.is_json_content_type(good)
    for bad in (None, b"text/plain", b"application/x-www-form-urlencoded", b"json", b""):
        assert not reports.is_json_content_type(bad)


def test_the_log_summary_is_bounded_and_escaped(pem: str) -> None:
    data = _with(trustkit_ios(pem), "app-bundle-id", 'com.x" forged=1 ' + "y" * 200)
    line = reports.parse_report(body(data)).log_summary()
    # The client's text is one quoted value, its quote escaped, cut at 80 characters.
    assert 'app="com.x\\" forged=1 yyy' in line
    assert "y" * 100 not in line
    assert len(line) < 300
    assert pem[30:60] not in line


# --- rate limiting -------------------------------------------------------------------------


def test_the_rate_limit_allows_a_burst_then_one_per_interval() -> None:
    limiter = reports.RateLimiter(per_minute=6, burst=3)
    a, b = "198.51.100.1", "198.51.100.2"
    assert [limiter.take(a, 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take(a, 0.0) == pytest.approx(10.0)  # one token every 10 s
    assert limiter.take(a, 5.0) == pytest.approx(5.0)  # a refusal spends nothing
    assert limiter.take(b, 5.0) == 0.0  # another client has its own bucket
    assert limiter.take(a, 10.0) == 0.0
    assert limiter.take(a, 10.0) > 0
    # A long pause refills up to the burst, not beyond.
    assert [limiter.take(a, 10_000.0) for _ in range(4)] == [0.0, 0.0, 0.0, pytest.approx(10.0)]


def test_the_rate_limiter_remembers_a_bounded_number_of_clients() -> None:
    limiter = reports.RateLimiter(per_minute=1, burst=1, max_clients=100)
    for n in range(1000):
        limiter.take(n, 0.0)
    assert len(limiter) == 100
    assert limiter.take(999, 0.0) > 0  # the most recent are the ones kept


def test_clients_are_addresses_and_ipv6_slash_64s() -> None:
    v6 = ipaddress.IPv6Address
    assert reports.client_key(v6("2001:db8:1:2::1")) == reports.client_key(
        v6("2001:db8:1:2:ffff::9")
    )
    assert reports.client_key(v6("2001:db8:1:2::1")) != reports.client_key(v6("2001:db8:1:3::1"))
    mapped = reports.client_key(v6("::ffff:198.51.100.7"))
    assert mapped == reports.client_key(ipaddress.IPv4Address("198.51.100.7"))


# --- counting ------------------------------------------------------------------------------


def test_counts_answer_which_versions_only_know_the_old_pin(pem: str) -> None:
    counts = reports.ReportCounts()
    for minute, data in enumerate(
        [
            trustkit_ios(pem, version="2.3", pins=(PIN_OLD,)),
            trustkit_ios(pem, version="2.3", pins=(PIN_OLD,)),
            trustkit_ios(pem, version="2.4", pins=(PIN_OLD, PIN_NEW)),
            rfc7469(pem),
        ]
    ):
        counts.add(reports.parse_report(body(data)), NOW + timedelta(minutes=minute))
    labels = {PIN_OLD: "k2026a (retiring)", PIN_NEW: "k2026b (current)"}
    summary = reports.summary(counts, labels)
    json.dumps(summary)  # JSON-able as it is
    assert summary["total"] == 4
    assert summary["by_kind"] == {"rfc7469": 1, "trustkit": 3}
    assert summary["last_seen"] == "2026-12-10T12:03:00Z"
    assert summary["ungrouped"] == 0
    by_version = summary["by_app_version"]
    assert [(e["app"], e["version"], e["count"], e["known_pins"]) for e in by_version] == [
        ("com.example.app", "2.3", 2, [[PIN_OLD]]),
        ("", "", 1, [sorted([PIN_OLD, PIN_NEW])]),
        ("com.example.app", "2.4", 1, [sorted([PIN_OLD, PIN_NEW])]),
    ]
    by_pins = summary["by_known_pins"]
    assert by_pins[0] == {
        "pins": [PIN_OLD],
        "labels": ["k2026a (retiring)"],
        "count": 2,
        "last_seen": "2026-12-10T12:01:00Z",
        "app_versions": ["com.example.app 2.3 (IOS)"],
    }
    assert by_pins[1]["count"] == 2
    assert sorted(by_pins[1]["app_versions"]) == ["(no app)", "com.example.app 2.4 (IOS)"]


def test_counts_are_bounded(pem: str) -> None:
    counts = reports.ReportCounts(max_groups=10)
    for n in range(25):
        counts.add(reports.parse_report(body(trustkit_ios(pem, version=f"1.{n}"))), NOW)
    summary = reports.summary(counts)
    assert summary["total"] == 25
    assert summary["ungrouped"] == 15
    assert len(summary["by_app_version"]) == 10
    # A group already known still counts once the bound is reached.
    counts.add(reports.parse_report(body(trustkit_ios(pem, version="1.0"))), NOW)
    assert reports.summary(counts)["ungrouped"] == 15


# --- the store -----------------------------------------------------------------------------


def test_the_store_rotates_and_stays_bounded(tmp_path: Path) -> None:
    store = reports.ReportStore(tmp_path / "r" / "pin-reports.jsonl", max_bytes=1000, keep=2)
    for n in range(200):
        store.append({"n": n, "padding": "x" * 50})
    files = sorted(p.name for p in (tmp_path / "r").iterdir())
    assert files == ["pin-reports.jsonl", "pin-reports.jsonl.1", "pin-reports.jsonl.2"]
    assert all((tmp_path / "r" / name).stat().st_size <= 1000 for name in files)
    kept = [int(str(record["n"])) for record in store.read()]
    assert kept == list(range(kept[0], 200))  # oldest first, the newest all there
    line = len(json.dumps({"n": 100, "padding": "x" * 50}, separators=(",", ":"))) + 1
    per_file = 1000 // line
    assert 2 * per_file < len(kept) <= 3 * per_file  # two full rotated files and the current


def test_the_store_refuses_a_record_larger_than_a_file(tmp_path: Path) -> None:
    store = reports.ReportStore(tmp_path / "r.jsonl", max_bytes=100, keep=1)
    with pytest.raises(OSError, match="does not fit"):
        store.append({"x": "y" * 200})
    store.append({"x": "small"})
    assert list(store.read()) == [{"x": "small"}]


def test_counts_come_back_from_the_store(tmp_path: Path, pem: str) -> None:
    store = reports.ReportStore(tmp_path / "r.jsonl", max_bytes=1 << 20, keep=1)
    for version in ("2.3", "2.3", "2.4"):
        store.append(reports.parse_report(body(trustkit_ios(pem, version=version))).record(NOW))
    with (tmp_path / "r.jsonl").open("a") as file:
        file.write("not json\n[1]\n")  # lines that are not ours are skipped
    summary = reports.summary(reports.counts_from_store(store))
    assert summary["total"] == 3
    assert [(e["version"], e["count"]) for e in summary["by_app_version"]] == [
        ("2.3", 2),
        ("2.4", 1),
    ]


# --- end to end ----------------------------------------------------------------------------


@pytest.fixture
async def upstream(tmp_path: Path) -> AsyncIterator[UpstreamServer]:
    async with serve_upstream(UpstreamServer.https(tmp_path)) as server:
        yield server


JSON: Final = [("content-type", "application/json")]


@pytest.mark.e2e
async def test_reports_in_both_formats_are_accepted_counted_and_stored(
    tmp_path: Path, ca: trustme.CA, cafile: Path, upstream: UpstreamServer, pem: str
) -> None:
    key = make_key(ca, tmp_path / "certs", "k1")
    store = tmp_path / "reports" / "pins.jsonl"
    extra = {"upstream": upstream.config_table(), "reports": {"store": str(store)}}
    config = make_config([key], base_dir=tmp_path, extra=extra)
    async with serving(config) as run_:
        p = Proxy(run_.server, run_.port, cafile)
        async with p.client() as client:
            ios = await client.request(
                "POST", REPORT_PATH, headers=JSON, body=body(trustkit_ios(pem, pins=(key.pin,)))
            )
            android = await client.request(
                "POST", REPORT_PATH, headers=JSON, body=body(trustkit_android(pem))
            )
            hpkp_report = await client.request(
                "POST", REPORT_PATH, headers=[("content-type", "application/json; charset=utf-8")],
                chunks=[body(rfc7469(pem))[:100], body(rfc7469(pem))[100:]],
            )  # fmt: skip
            relayed = await client.request("GET", "/api")
        summary = run_.server.report_summary()
        shown = admin.status_of(run_.server).to_json()["pin_reports"]
    assert [ios.status, android.status, hpkp_report.status] == [204, 204, 204]
    assert ios.body == b""
    assert ios.header(b"content-length") == []
    assert relayed.status == 200
    assert [r.target for r in upstream.requests] == [b"/api"]
    assert summary is not None
    assert shown == summary  # what /status.json, `dualproxy status` and the page show
    assert summary["total"] == 3
    assert summary["by_kind"] == {"rfc7469": 1, "trustkit": 2}
    # Our key's pin is named by the key and its role; the other pins are not ours.
    labels = {tuple(e["pins"]): e["labels"] for e in summary["by_known_pins"]}
    assert labels == {(key.pin,): ["k1 (current)"], (PIN_OLD, PIN_NEW): [None, None]}
    platforms = sorted(e["platform"] for e in summary["by_app_version"])
    assert platforms == ["", "ANDROID", "IOS"]
    lines = [json.loads(line) for line in store.read_text().splitlines()]
    assert [line["kind"] for line in lines] == ["trustkit", "trustkit", "rfc7469"]


@pytest.mark.e2e
async def test_bad_reports_are_refused_with_4xx_and_never_relayed(
    tmp_path: Path, ca: trustme.CA, cafile: Path, upstream: UpstreamServer, pem: str
) -> None:
    key = make_key(ca, tmp_path / "certs", "k1")
    store = tmp_path / "pins.jsonl"
    extra = {
        "upstream": upstream.config_table(),
        "reports": {"store": str(store), "max_body_bytes": 4096},
    }
    config = make_config([key], base_dir=tmp_path, extra=extra)
    async with serving(config) as run_:
        p = Proxy(run_.server, run_.port, cafile)
        async with p.client() as client:
            get = await client.request("GET", REPORT_PATH)
            text = await client.request(
                "POST", REPORT_PATH, headers=[("content-type", "text/plain")], body=b"{}"
            )
            bad = await client.request("POST", REPORT_PATH, headers=JSON, body=b'{"hostname": 1}')
            no_type = await client.request("POST", REPORT_PATH, body=b"{}")
            still_open = await client.request("GET", "/after")
        async with p.client() as client:
            big = await client.request("POST", REPORT_PATH, headers=JSON, body=b" " * 5000)
        async with p.client() as client:
            chunked = await client.request(
                "POST", REPORT_PATH, headers=JSON, chunks=[b" " * 3000, b" " * 3000]
            )
    assert get.status == 405
    assert get.header(b"allow") == [b"POST"]
    assert text.status == no_type.status == 415
    assert bad.status == 400
    assert b"hostname is not a string" in bad.body
    assert still_open.status == 200  # 405, 415 and 400 keep the connection
    assert big.status == chunked.status == 413
    assert big.header(b"connection") == [b"close"]
    assert [r.target for r in upstream.requests] == [b"/after"]
    assert not store.exists()


@pytest.mark.e2e
async def test_the_rate_limit_holds_over_tls(
    tmp_path: Path, ca: trustme.CA, cafile: Path, upstream: UpstreamServer, pem: str
) -> None:
    key = make_key(ca, tmp_path / "certs", "k1")
    extra = {
        "upstream": upstream.config_table(),
        "reports": {"store": str(tmp_path / "r.jsonl"), "burst": 2, "per_minute": 1},
    }
    config = make_config([key], base_dir=tmp_path, extra=extra)
    async with serving(config) as run_:
        p = Proxy(run_.server, run_.port, cafile)
        async with p.client() as client:
            answers = [
                await client.request(
                    "POST", REPORT_PATH, headers=JSON, body=body(trustkit_ios(pem))
                )
                for _ in range(4)
            ]
        summary = run_.server.report_summary()
    assert [a.status for a in answers] == [204, 204, 429, 429]
    retry_after = int(answers[2].header(b"retry-after")[0])
    assert 1 <= retry_after <= 60
    assert summary is not None
    assert summary["total"] == 2
    assert upstream.requests == []


@pytest.mark.e2e
async def test_reports_without_an_upstream(
    tmp_path: Path, ca: trustme.CA, cafile: Path, pem: str
) -> None:
    key = make_key(ca, tmp_path / "certs", "k1")
    extra = {"reports": {"store": str(tmp_path / "r.jsonl"), "max_body_bytes": 4096}}
    config = make_config([key], base_dir=tmp_path, extra=extra)
    async with serving(config) as run_:
        p = Proxy(run_.server, run_.port, cafile)
        async with p.client() as client:
            good = await client.request("POST", REPORT_PATH, headers=JSON, body=body(rfc7469(pem)))
            bad = await client.request("POST", REPORT_PATH, headers=JSON, body=b"[]")
            big = await client.request("POST", REPORT_PATH, headers=JSON, body=b" " * 5000)
            other = await client.request("GET", "/")
    assert good.status == 204
    assert bad.status == 400
    assert big.status == 413
    assert other.status == 200
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 1


def test_reports_summary_command(
    tmp_path: Path, ca: trustme.CA, capsys: pytest.CaptureFixture[str], pem: str
) -> None:
    key: KeyFiles = make_key(ca, tmp_path / "certs", "k1")
    config_file = tmp_path / "config.toml"
    write_config(config_file, [key], extra={"reports": {"store": "r.jsonl"}})
    store = reports.ReportStore(tmp_path / "r.jsonl", max_bytes=1 << 20, keep=1)
    report = reports.parse_report(body(trustkit_ios(pem, pins=(key.pin,))))
    store.append(report.record(NOW))
    assert cli.main(["reports", "summary", "-c", str(config_file), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["total"] == 1
    assert data["by_known_pins"][0]["labels"] == ["k1 (current)"]
    assert cli.main(["reports", "summary", "-c", str(config_file)]) == 0
    out = capsys.readouterr().out
    assert "com.example.app 2.3 IOS  knows: k1 (current)" in out


# --- the canary's reports (issue 19, item 2) -------------------------------------------------


def test_old_pin_only_versions_and_their_canary_clients(pem: str) -> None:
    counts = reports.ReportCounts()
    old_only = reports.parse_report(body(trustkit_ios(pem, version="2.3", pins=(PIN_OLD,))))
    both = reports.parse_report(body(trustkit_ios(pem, version="2.4", pins=(PIN_OLD, PIN_NEW))))
    for client in (b"a", b"b", b"b", None):
        counts.add(old_only, NOW, canary_client=client)
    counts.add(both, NOW, canary_client=b"c")
    found = counts.old_pin_only(frozenset({PIN_OLD}), frozenset({PIN_NEW}))
    assert found == [
        {
            "app": "com.example.app",
            "version": "2.3",
            "platform": "IOS",
            "name": "com.example.app 2.3 (IOS)",
            "count": 4,
            "last_seen": "2026-12-10T12:00:00Z",
            "canary_clients": 2,
        }
    ]
    # Without the rotation's pins there is nothing to tell apart.
    assert counts.old_pin_only(frozenset(), frozenset({PIN_NEW})) == []
    summary = reports.summary(counts, old_pins=frozenset({PIN_OLD}), new_pins=frozenset({PIN_NEW}))
    assert summary["old_pin_only"] == found
    assert reports.summary(counts)["old_pin_only"] == []


def post_report(port: int, cafile: Path, source: str, data: bytes) -> bytes:
    """One report POSTed over TLS from `source` (a loopback address), as an app sends it."""
    context = ssl.create_default_context(cafile=str(cafile))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as raw:
        raw.settimeout(CLIENT_TIMEOUT)
        raw.bind((source, 0))
        raw.connect(("127.0.0.1", port))
        with context.wrap_socket(raw, server_hostname="api.example.com") as tls:
            head = (
                f"POST {REPORT_PATH} HTTP/1.1\r\nHost: api.example.com\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                "Connection: close\r\n\r\n"
            )
            tls.sendall(head.encode() + data)
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
            return answer


@pytest.mark.e2e
@pytest.mark.parametrize("in_canary", [True, False], ids=["canary-clients", "other-clients"])
async def test_canary_clients_reporting_a_version_without_the_new_pin_halt_the_canary(
    tmp_path: Path, ca: trustme.CA, cafile: Path, pem: str, in_canary: bool
) -> None:
    """Three canary clients report app 1.0 knowing only the old pin: the canary halts
    within a review. The twin: the same reports from clients outside the canary."""
    old, new = (make_key(ca, tmp_path / "certs", name) for name in ("k2026a", "k2026b"))
    window = {
        "old": "k2026a", "new": "k2026b", "grace_start": GRACE_START, "grace_end": GRACE_END,
        "canary_percent": 50,
    }  # fmt: skip
    config = make_config(
        [old, new],
        rotation=window,
        base_dir=tmp_path,
        extra={"reports": {"store": str(tmp_path / "r.jsonl")}},
    )
    sources = [
        str(address)
        for address in ipaddress.IPv4Network("127.0.0.0/24").hosts()
        if (canary_bucket(address) < 50) is in_canary
    ][:REPORT_HALT_CLIENTS]
    report = body(trustkit_ios(pem, version="1.0", pins=(old.pin,)))
    async with serving(config, clock=Clock(DURING)) as run_:
        for source in sources:
            answer = await trio.to_thread.run_sync(post_report, run_.port, cafile, source, report)
            assert answer.startswith(b"HTTP/1.1 204 ")
        with trio.move_on_after(3 * REVIEW_SECONDS):  # bounded: a review runs every second
            while not run_.server.evidence.canary.halted:
                await trio.sleep(0.05)
        halted = run_.server.evidence.canary.halted
        summary = run_.server.report_summary()
    assert halted is in_canary
    assert summary is not None
    version = summary["old_pin_only"][0]
    assert (version["name"], version["count"]) == ("com.example.app 1.0 (IOS)", 3)
    assert version["canary_clients"] == (3 if in_canary else 0)
    if in_canary:
        why = run_.server.evidence.canary.why
        assert why is not None
        assert "com.example.app 1.0 (IOS) knows no pin of the new key" in why
