"""The status page: what it says (pure rendering), and that it renders, in headless Chromium
against a running server's admin listener (a screenshot that must not be blank, and the DOM).

Without Chromium the browser tests skip, saying so; scripts/test installs it and sets
DUALPROXY_REQUIRE_CHROMIUM=1, which turns the skip into a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import ssl
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import pytest
import trio
import trustme
from helpers.clients import run_client, tls_get_async
from helpers.configs import make_config
from helpers.keys import KeyFiles, make_key
from helpers.png import colours
from helpers.rotation import GRACE_END, GRACE_START, Clock, grace_window
from helpers.serving import serving
from test_admin import DURING, admin_listener, connections_counted, rotation
from test_evidence import Finished

from dualproxy.config.schema import Rotation
from dualproxy.ops import metrics
from dualproxy.ops.evidence import Evidence, KeyFacts, Status
from dualproxy.ops.statuspage import render_html, render_text
from dualproxy.pinning.reports import ReportSummary
from dualproxy.rotation.policy import Choice, Phase, Reason
from dualproxy.tls.outcome import Outcome

ROTATION: Final = grace_window(canary_percent=10.0)
OLD_COLOUR: Final = (0x4C, 0x6E, 0xF5)
NEW_COLOUR: Final = (0x0C, 0xA6, 0x78)
CHROMIUM_TIMEOUT: Final = 60.0


def status_at(
    evidence: Evidence,
    keys: list[KeyFacts],
    *,
    now: datetime = DURING,
    phase: Phase = "during",
    rotation: Rotation | None = ROTATION,
) -> Status:
    """evidence.status with these keys, two connections open and one reload behind."""
    return evidence.status(
        now=now,
        phase=phase,
        rotation=rotation,
        keys=keys,
        active_connections=2,
        reloads_ok=1,
        reloads_failed=0,
    )


def status(*, halted: bool) -> Status:
    evidence = Evidence(clock=lambda: DURING.timestamp())
    if halted:
        record = Finished(
            "k2026b", Choice("new", Reason.CANARY), Outcome.CLIENT_ABORTED, "unknown_ca"
        )
        for _ in range(3):  # every canary handshake failing: three are enough to halt
            evidence.connection_ended(record, ROTATION)
        assert evidence.canary.halted
    keys = [
        KeyFacts("k2026a", "old", "A" * 43 + "=", "ECDSA P-256", GRACE_START, GRACE_END),
        KeyFacts(
            "k2026b",
            "new",
            "B" * 43 + "=",
            "RSA 2048",
            GRACE_START,
            datetime(2027, 3, 1, tzinfo=UTC),
        ),
    ]
    return status_at(evidence, keys)


def test_pin_failure_reports_show_which_versions_know_which_pins() -> None:
    """With [reports], the page, the text and status.json name the app versions by the pins
    they know; without, none of them has the section."""
    summary: ReportSummary = {
        "total": 3,
        "by_kind": {"trustkit": 3},
        "last_seen": "2026-12-10T12:00:00Z",
        "ungrouped": 0,
        "by_app_version": [],
        "by_known_pins": [
            {
                "pins": ["A" * 43 + "="],
                "labels": ["k2026a (retiring)"],
                "count": 2,
                "last_seen": "2026-12-10T12:00:00Z",
                "app_versions": ["com.example.app 2.3 (IOS)"],
            },
            {
                "pins": ["Z" * 43 + "="],
                "labels": [None],
                "count": 1,
                "last_seen": None,
                "app_versions": ["<b>evil</b> 1 (ANDROID)"],
            },
        ],
        "old_pin_only": [
            {
                "app": "com.example.app",
                "version": "2.3",
                "platform": "IOS",
                "name": "com.example.app 2.3 (IOS)",
                "count": 2,
                "last_seen": "2026-12-10T12:00:00Z",
                "canary_clients": 1,
            }
        ],
    }
    with_reports = replace(status(halted=False), pin_reports=summary)
    page = render_html(with_reports)
    assert 'id="pin-reports"' in page
    assert "<td>k2026a (retiring)</td><td>2</td><td>com.example.app 2.3 (IOS)</td>" in page
    assert "&lt;b&gt;evil&lt;/b&gt;" in page  # app-supplied text is escaped
    text = render_text(with_reports)
    assert "pin-failure reports from apps: 3" in text
    assert "  k2026a (retiring): 2 from com.example.app 2.3 (IOS)" in text
    assert "  a pin of no key of ours: 1 from" in text
    # Which versions know only the retiring key, and when they fail (issue 19, item 2).
    assert "app versions that know only the old key's pins: they fail once the window" in text
    assert "  com.example.app 2.3 (IOS): 2 reports, 1 canary clients" in text
    assert 'id="old-pin-only"' in page
    assert "com.example.app 2.3 (IOS): 2 reports, 1 canary clients" in page
    assert with_reports.to_json()["pin_reports"] == summary
    without = status(halted=False)
    assert 'id="pin-reports"' not in render_html(without)
    assert "pin-failure reports" not in render_text(without)
    assert without.to_json()["pin_reports"] is None


@pytest.mark.parametrize("halted", [True, False], ids=["halted", "running"])
def test_the_page_shows_the_canary_state_keys_and_timeline(halted: bool) -> None:
    page = render_html(status(halted=halted))
    assert page.count("<svg") == 3  # the timeline and one day chart per key
    assert 'class="grace"' in page
    assert 'class="now"' in page
    assert page.count('class="validity"') == 2
    assert ("Canary halted" in page) is halted
    assert ("Canary running" in page) is not halted
    assert ("dualproxy canary resume" in page) is halted
    assert ('class="failures"' in page) is halted  # the abort shows in its time bucket
    assert "<script" not in page
    assert not re.search(r"""(src|href)=["']?https?:""", page)  # nothing external
    text = render_text(status(halted=halted))
    assert ("canary: HALTED" in text) is halted
    assert "k2026b           new" in text


@pytest.mark.parametrize(
    ("phase", "now", "state", "said"),
    [
        ("before", GRACE_START - timedelta(days=1), "waiting", "canary: waiting: from grace_start"),
        ("during", DURING, "running", "canary: running: 10% of hint-less clients get the new key"),
        ("after", GRACE_END, "over", "canary: over: the window has closed"),
    ],
)
def test_the_canary_is_shown_running_only_during_the_window(
    phase: Phase, now: datetime, state: str, said: str
) -> None:
    """Issue 15, item 11: the page, `dualproxy status` and dualproxy_canary_percent say it runs
    during the window, and only then."""
    evidence = Evidence(clock=lambda: DURING.timestamp())
    keys = [KeyFacts("k2026a", "old", "A" * 43 + "=", "ECDSA P-256", GRACE_START, GRACE_END)]
    shown = status_at(evidence, keys, now=now, phase=phase)
    running = state == "running"
    page, text = render_html(shown), render_text(shown)
    assert ("Canary running" in page) is running
    assert said in text
    assert ("running" in text) is running
    assert shown.to_json()["canary"]["state"] == state  # type: ignore[index]
    families = {family.name: family for family in metrics.families(shown)}
    percent = families["dualproxy_canary_percent"].samples[0].value
    assert percent == (10.0 if running else 0.0)
    states = {s.labels["state"]: s.value for s in families["dualproxy_canary_state"].samples}
    assert states == {name: float(name == state) for name in states}


def test_a_held_window_is_visible_everywhere() -> None:
    """Issue 19, item 3: the estimate and the hold on the page, in `dualproxy status`, in
    /status.json and in the metrics; an "at-grace-end" window has none of it."""
    deadline = GRACE_END + timedelta(days=30)
    when_safe = replace(ROTATION, close="when-safe", max_breakage=0.005, grace_deadline=deadline)
    evidence = Evidence(clock=lambda: DURING.timestamp())
    for _ in range(40):
        record = Finished("k2026a", Choice("old", Reason.DEFAULT), Outcome.OK, "", "TLSv1.3", 1)
        evidence.connection_ended(record, when_safe)
    evidence.review_window(when_safe, GRACE_END)
    keys = [KeyFacts("k2026a", "old", "A" * 43 + "=", "ECDSA P-256", GRACE_START, deadline)]
    held = status_at(evidence, keys, now=GRACE_END, phase="during", rotation=when_safe)
    text, page = render_text(held), render_html(held)
    assert "window: HELD OPEN past grace_end (2027-01-15 00:00:00Z)" in text
    assert "if the window closed now: no canary handshake to estimate from, at most" in text
    assert "clients that never connect are not seen" in text
    assert 'class="banner window held"' in page
    document = held.to_json()
    window = document["window"]
    assert isinstance(window, dict)
    assert window["state"] == "held"
    assert window["breakage"]["upper"] == 1.0
    assert document["rotation"]["grace_deadline"] == "2027-02-14T00:00:00Z"  # type: ignore[index]
    families = {family.name: family for family in metrics.families(held)}
    assert families["dualproxy_window_held"].samples[0].value == 1.0
    assert families["dualproxy_window_breakage_upper"].samples[0].value == 1.0
    assert "dualproxy_rotation_grace_deadline_timestamp_seconds" in families
    plain = status_at(evidence, keys, now=GRACE_END, phase="after")
    assert plain.window is None
    assert "window:" not in render_text(plain)
    assert "dualproxy_window_held" not in {family.name for family in metrics.families(plain)}


def test_an_at_grace_end_window_shows_what_grace_end_will_break_while_it_is_open() -> None:
    """Issue 19, item 3: with close = "at-grace-end" the estimate is shown during the window
    (the operator learns before grace_end, not after); the twin: before and after, none."""
    evidence = Evidence(clock=lambda: DURING.timestamp())
    for key, choice, outcome in (
        ("k2026a", Choice("old", Reason.DEFAULT), Outcome.OK),
        ("k2026b", Choice("new", Reason.CANARY), Outcome.NO_REQUEST),
        ("k2026b", Choice("new", Reason.CANARY), Outcome.OK),
    ):
        record = Finished(key, choice, outcome, "", "TLSv1.3", 1)
        evidence.connection_ended(record, ROTATION)
    keys = [KeyFacts("k2026a", "old", "A" * 43 + "=", "ECDSA P-256", GRACE_START, GRACE_END)]
    during = status_at(evidence, keys)
    text, page = render_text(during), render_html(during)
    assert (
        'window: close = "at-grace-end": at grace_end (2027-01-15 00:00:00Z) every client' in text
    )
    assert "if the window closed now: estimated 50.00%" in text  # 1 of 2 canary, 0 of 1 old
    assert 'class="banner window"' in page
    assert during.window is not None
    assert during.window.estimate.estimate == pytest.approx(0.5)
    families = {family.name: family for family in metrics.families(during)}
    assert families["dualproxy_window_held"].samples[0].value == 0.0
    assert families["dualproxy_window_breakage_estimate"].samples[0].value == pytest.approx(0.5)
    assert "dualproxy_window_max_breakage" not in families
    for phase, now in (("before", GRACE_START - timedelta(days=1)), ("after", GRACE_END)):
        outside = status_at(evidence, keys, now=now, phase=phase)  # type: ignore[arg-type]
        assert outside.window is None
        assert "window:" not in render_text(outside)


def test_a_single_key_page_has_no_grace_window_and_no_canary() -> None:
    evidence = Evidence(clock=lambda: DURING.timestamp())
    keys = [KeyFacts("k1", "single", "A" * 43 + "=", "ECDSA P-256", GRACE_START, GRACE_END)]
    single = status_at(evidence, keys, phase="single", rotation=None)
    page = render_html(single)
    assert page.count("<svg") == 2
    assert 'class="grace"' not in page
    assert "Canary" not in page
    assert "no rotation configured" in page
    assert "no rotation configured" in render_text(single)


@pytest.mark.parametrize(
    ("grace_days", "validity_days"),
    [(1, 2), (14, 90), (45, 90), (400, 800), (30, 365_000)],
    ids=["a-day", "two-weeks", "usual", "long", "trustme-millennium"],
)
def test_the_timeline_axis_stays_readable(grace_days: int, validity_days: int) -> None:
    start = datetime(2026, 12, 1, tzinfo=UTC)
    plan = replace(ROTATION, grace_start=start, grace_end=start + timedelta(days=grace_days))
    until = start + timedelta(days=validity_days)
    keys = [KeyFacts("k2026a", "old", "A" * 43 + "=", "ECDSA P-256", start, until)]
    evidence = Evidence(clock=lambda: DURING.timestamp())
    page = render_html(status_at(evidence, keys, now=start + timedelta(hours=12), rotation=plan))
    timeline = page[page.index('id="timeline"') : page.index("</figure>")]
    labels = re.findall(r'text-anchor="middle">([^<]+)</text>', timeline)
    assert 3 <= len(labels) - 1 <= 10, labels  # the ticks, and the "grace window" label
    assert f"until {until:%Y-%m-%d}" in timeline  # a bar running off the edge keeps its end


# --- in a browser -----------------------------------------------------------------------------


@pytest.fixture
def chromium() -> str:
    """The browser; a sync fixture, so that a skip keeps its message."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("DUALPROXY_REQUIRE_CHROMIUM") == "1":
            pytest.fail("chromium is required (DUALPROXY_REQUIRE_CHROMIUM=1) but not on PATH")
        pytest.skip(
            "chromium is not installed (scripts/test installs it: apt-get install chromium)"
        )
    return found


def browser_argv(binary: str, profile: Path) -> list[str]:
    return [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1200,900",
    ]


@pytest.fixture
def keys(ca: trustme.CA, tmp_path: Path) -> dict[str, KeyFiles]:
    return {name: make_key(ca, tmp_path / "certs", name) for name in ("k2026a", "k2026b")}


@pytest.mark.e2e
async def test_the_status_page_renders_in_headless_chromium(
    keys: dict[str, KeyFiles], cafile: Path, tmp_path: Path, chromium: str
) -> None:
    binary = chromium
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    config = make_config(
        list(keys.values()), rotation=rotation(canary_percent=5), base_dir=tmp_path
    )
    async with serving(config, clock=Clock(DURING)) as run, admin_listener(run.server) as at:
        # Some traffic on both keys, and a pin failure: the page has bars to draw.
        await tls_get_async(run.host, run.port, cafile=cafile)
        await tls_get_async(run.host, run.port, cafile=cafile, server_name="k2.api.example.com")
        with pytest.raises(ssl.SSLCertVerificationError):
            await tls_get_async(run.host, run.port, cafile=other_ca)
        await connections_counted(run.server, 3)
        url = f"http://{at[0]}:{at[1]}/"
        screenshot = tmp_path / "status.png"
        shot = await run_client(
            [*browser_argv(binary, tmp_path / "profile-1"), f"--screenshot={screenshot}", url],
            timeout=CHROMIUM_TIMEOUT,
        )
        dom = await run_client(
            [*browser_argv(binary, tmp_path / "profile-2"), "--dump-dom", url],
            timeout=CHROMIUM_TIMEOUT,
        )
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout.decode()
    # The browser parsed what we sent into the elements we meant.
    assert html.count("<svg") == 3, html[:2000]
    assert 'class="grace"' in html
    assert "k2026a" in html
    assert "k2026b" in html
    assert "Canary running" in html
    # Not blank: text, bars and both keys' colours were painted, and the failure's red.
    painted = await trio.to_thread.run_sync(colours, screenshot.read_bytes())
    assert len(painted) > 50, painted.most_common(5)
    for colour in (OLD_COLOUR, NEW_COLOUR):  # the cards' top borders, at least
        assert painted[colour] > 100, (colour, painted.most_common(10))
    assert 'class="failures"' in html  # the pin failure's red bar (below the fold)
