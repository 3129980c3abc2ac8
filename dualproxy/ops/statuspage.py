"""The status page (HTML with inline SVG) and its text twin (`dualproxy status`), both
rendered from one `evidence.Status`. Pure: values in, text out.

The page must read at a glance, and work offline and under a strict CSP: no script, no
external asset, every style and picture inline. From the top:
1. a header: the rotation phase and, when a canary is configured, whether it runs or halted
   (a red banner then, with the resume command);
2. one card per key, old and new side by side: its pin-failure share over the last 24 hours
   (the number that decides), handshakes, pin and expiry;
3. the timeline: each key's certificate validity as a bar, the grace window as a band, and
   "now" as a line;
4. per key, a day of 15-minute buckets: handshakes as bars, pin failures in red on top of
   them (each key on its own scale: the canary's share of traffic is small by design);
5. the counts by key and selection reason.
"""

from __future__ import annotations

import html
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Final

from dualproxy.config.schema import DEFAULT_CANARY_HALT_MARGIN
from dualproxy.ops.evidence import (
    NONE_LABEL,
    CanaryStatus,
    ConnectionCounts,
    KeyStatus,
    Row,
    Sample,
    Status,
    WindowStatus,
    percent,
)
from dualproxy.pinning.reports import OldPinOnlyVersion
from dualproxy.rotation.canary import Breakage

__all__ = ["render_html", "render_text"]

# The page reloads itself this often (seconds): a rollout is watched, not read once.
REFRESH_SECONDS: Final = 30
# Pin-failure report groups shown (most reports first; /status.json has them all), and app
# versions named per group: what fits a glance.
REPORT_GROUPS_SHOWN: Final = 10
REPORT_VERSIONS_SHOWN: Final = 5

_ROLE_COLOURS: Final = {"old": "#4c6ef5", "new": "#0ca678", "single": "#4c6ef5"}
_OTHER_COLOUR: Final = "#868e96"
_FAILURE: Final = "#e03131"
_GRACE: Final = "#fab005"
_INK: Final = "#212529"
_MUTED: Final = "#868e96"

# Timeline geometry, in SVG user units (the picture scales to the page's width).
_TL_WIDTH: Final = 1000
_TL_LABEL: Final = 170  # the key names' column
_TL_ROW: Final = 36
_TL_TOP: Final = 34  # room for the "grace window" and "now" labels
_TL_AXIS: Final = 30
# Day-of-buckets chart geometry.
_DAY_WIDTH: Final = 1000
_DAY_HEIGHT: Final = 120
_DAY_LEFT: Final = 48  # the y-axis labels
_DAY_BOTTOM: Final = 20


def render_text(status: Status) -> str:
    """The summary `dualproxy status` prints."""
    lines = [
        f"dualproxy status at {_when(status.now)} (counting since {_when(status.started)})",
        f"phase: {_phase_text(status)}",
    ]
    canary = status.canary
    if canary is not None:
        lines.append(f"canary: {_canary_text(canary, status)}")
        if canary.halted:
            lines.append(f"  halted at {_when(canary.halted_at)}{_by(canary)}: {canary.why}")
            if canary.state == "halted":
                lines.append("  resume with: dualproxy canary resume")
        if canary.state != "waiting":
            lines.append(
                f"  sample: new (canary) {_sample_text(canary.canary)};"
                f" old (control) {_sample_text(canary.control)};"
                f" evidence {_evidence_text(canary)}"
            )
    window = status.window
    if window is not None:
        lines.append(f"window: {_window_text(window, status)}")
        lines.append(f"  {_breakage_text(window.estimate)}")
    lines.append("")
    header = (
        f"{'key':<16} {'role':<8} {'24h hs':>8} {'24h fail':>8} {'24h share':>9}"
        f" {'handshakes':>10} {'aborted':>8} {'no-req':>8} {'share':>7} {'requests':>9}"
        "  valid until"
    )
    lines.append(header)
    for key in status.keys:
        total, last = key.total, key.last_24h
        lines.append(
            f"{key.facts.name:<16} {key.facts.role:<8} {last.handshakes:>8}"
            f" {last.pin_failures:>8} {percent(last.share):>9} {total.handshakes:>10}"
            f" {total.aborted:>8} {total.no_request:>8} {percent(total.share):>7}"
            f" {key.requests:>9}  {_day(key.facts.not_after)} ({_left(key, status.now)})"
        )
    lines.append("")
    lines.append("by key and reason (since start):")
    for (key_name, reason), sample, requests in _by_reason(status.rows):
        lines.append(f"  {key_name:<16} {reason:<13} {_sample_text(sample)}, {requests} requests")
    responses = ", ".join(f"{k} {v}" for k, v in sorted(status.responses.items())) or "none"
    lines.append("")
    lines.append(
        f"active connections {status.active_connections}; responses: {responses};"
        f" reloads: {status.reloads_ok} ok, {status.reloads_failed} failed"
    )
    if status.connections is not None:
        lines.append(_limits_text(status.connections))
    reports = status.pin_reports
    if reports is not None:
        lines.append("")
        lines.append(
            f"pin-failure reports from apps: {reports['total']}"
            f" (last {reports['last_seen'] or 'never'}); by the pins they know:"
        )
        for group in reports["by_known_pins"][:REPORT_GROUPS_SHOWN]:
            lines.append(
                f"  {_pins_known(group['labels'])}: {group['count']} from"
                f" {', '.join(group['app_versions'][:REPORT_VERSIONS_SHOWN])}"
            )
        old_only = reports["old_pin_only"]
        if status.rotation is not None:
            lines.append(f"app versions that know only the old key's pins: {_fails_when(status)}")
            for version in old_only[:REPORT_GROUPS_SHOWN]:
                lines.append(f"  {_old_only_text(version)}")
            if not old_only:
                lines.append("  none reported")
    return "\n".join(lines) + "\n"


def _canary_text(canary: CanaryStatus, status: Status) -> str:
    """The canary's state in one line: it runs only during the window."""
    rotation = status.rotation
    rule = (
        f"halts when a sequential test is sure (false-halt probability {canary.false_halt:g})"
        f" that new fails more than old + {canary.margin * 100:g} points"
    )
    if canary.state == "waiting":
        start = _when(rotation.grace_start) if rotation is not None else "-"
        return (
            f"waiting: from grace_start ({start}) {canary.percent:g}% of hint-less clients get"
            f" the new key; it {rule}"
        )
    if canary.state == "over":
        return f"over: the window has closed; it sent {canary.percent:g}% of hint-less clients"
    if canary.state == "halted":
        return f"HALTED: hint-less clients get the default key ({canary.percent:g}% configured)"
    return f"running: {canary.percent:g}% of hint-less clients get the new key; it {rule}"


def _evidence_text(canary: CanaryStatus) -> str:
    return f"e-value {canary.e_value:.3g} (halts at {canary.threshold:g})"


def _window_text(window: WindowStatus, status: Status) -> str:
    """How the window stands, and how it will close."""
    limit = f"{window.max_breakage:.2%}"
    deadline = _when(window.deadline)
    rotation = status.rotation
    end = _when(rotation.grace_end) if rotation is not None else "-"
    if window.close == "at-grace-end":
        return (
            f'close = "at-grace-end": at grace_end ({end}) every client gets the new key,'
            ' whatever the evidence (close = "when-safe" holds it while too many would fail)'
        )
    if window.state in ("before", "open"):
        return (
            f'close = "when-safe": from grace_end ({end}) the old key stays the default while'
            f" more than {limit} of clients would fail on the new key (upper bound), until"
            f" grace_deadline ({deadline}) at the latest"
        )
    if window.state == "held":
        return (
            f"HELD OPEN past grace_end ({end}): {window.why}; re-evaluated every second;"
            f" closes at grace_deadline ({deadline}) at the latest"
        )
    if window.state == "closed":
        return f"closed by the evidence at {_when(window.closed_at)} ({window.why})"
    return f"closed at grace_deadline ({deadline}) whatever the evidence"


def _breakage_text(estimate: Breakage) -> str:
    if estimate.estimate is None:
        shown = "no canary handshake to estimate from"
    else:
        shown = f"estimated {estimate.estimate:.2%}"
    return (
        f"if the window closed now: {shown}, at most {estimate.upper:.2%} of handshakes would"
        f" fail on the new key (the canary samples {estimate.sampled:.1%} of the window's"
        f" {estimate.handshakes} handshakes; {estimate.unsampled:.1%}, hinted to old or"
        " unparsed, are counted as failing; clients that never connect are not seen)"
    )


def _fails_when(status: Status) -> str:
    rotation = status.rotation
    if status.phase == "after":
        return "they fail now (the old key is no longer served)"
    end = _when(rotation.grace_end) if rotation is not None else "-"
    if rotation is not None and rotation.close == "when-safe":
        return f"they fail once the window closes (from {end}, when it is safe)"
    return f"they fail once the window closes ({end})"


def _old_only_text(version: OldPinOnlyVersion) -> str:
    canary = f", {version['canary_clients']} canary clients" if version["canary_clients"] else ""
    return (
        f"{version['name']}: {version['count']} reports{canary}"
        f" (last {version['last_seen'] or '-'})"
    )


def _pins_known(labels: Sequence[str | None]) -> str:
    """The pins a report group's app knows, named by our key and role where they are ours."""
    return " + ".join(label or "a pin of no key of ours" for label in labels) or "no pins"


def _reports_html(status: Status) -> str:
    """The pin-failure reports section: which app versions still know only which pins."""
    reports = status.pin_reports
    if reports is None:
        return ""
    rows = "".join(
        f"<tr><td>{_e(_pins_known(group['labels']))}</td><td>{group['count']}</td>"
        f"<td>{_e(', '.join(group['app_versions'][:REPORT_VERSIONS_SHOWN]))}</td>"
        f"<td>{_e(group['last_seen'] or '-')}</td></tr>"
        for group in reports["by_known_pins"][:REPORT_GROUPS_SHOWN]
    )
    empty = '<tr><td colspan="4" class="muted">no reports yet</td></tr>'
    old_only = ""
    if status.rotation is not None:
        items = "".join(
            f"<li>{_e(_old_only_text(version))}</li>"
            for version in reports["old_pin_only"][:REPORT_GROUPS_SHOWN]
        )
        none = '<li class="muted">none reported</li>'
        old_only = (
            '<p id="old-pin-only"><strong>App versions that know only the old key&#39;s pins'
            f"</strong>: {_e(_fails_when(status))}.</p><ul>{items or none}</ul>"
        )
    return f"""<h2>Pin-failure reports from apps</h2>
<p class="muted">{reports["total"]} reports (TrustKit, RFC 7469), grouped by the pins the
app knows: the app versions that know only the retiring key's pin are the ones that fail
once it is gone.</p>
<table class="panel" id="pin-reports">
<thead><tr><th>pins the app knows</th><th>reports</th><th>app versions</th>
<th>last seen</th></tr></thead>
<tbody>{rows or empty}</tbody>
</table>
{old_only}"""


def _limits_text(counts: ConnectionCounts) -> str:
    """The connection limits and how close the server is to them, in one line."""
    per = f" per process x {counts.processes} processes" if counts.processes > 1 else ""
    return (
        f"connections: {counts.open} open of limits.max_connections {counts.max_connections}"
        f"{per} ({counts.idle} idle); {counts.reclaimed} idle reclaimed at the limit;"
        f" {counts.refused_per_client} refused for max_connections_per_client"
        f" {counts.max_per_client} (limits per process)"
    )


def render_html(status: Status) -> str:
    """The whole status page."""
    canary = status.canary
    banner = ""
    if canary is not None and canary.state == "halted":
        banner = (
            '<div class="banner halted"><strong>Canary halted</strong>'
            f" at {_e(_when(canary.halted_at))}{_e(_by(canary))}: {_e(canary.why or '')}."
            " Hint-less clients get the default key again; hinted clients are unaffected."
            " Resume with <code>dualproxy canary resume</code>.</div>"
        )
    elif canary is not None and canary.state == "running":
        banner = (
            f'<div class="banner running"><strong>Canary running</strong>: {canary.percent:g}%'
            f" of hint-less clients get the new key. New {_e(_sample_text(canary.canary))};"
            f" old {_e(_sample_text(canary.control))}; evidence {_e(_evidence_text(canary))}."
            " It halts itself once a sequential test is sure (false-halt probability"
            f" {canary.false_halt:g}) that new fails more than old by over"
            f" {canary.margin * 100:g} points.</div>"
        )
    elif canary is not None:
        banner = f'<div class="banner idle">Canary {_e(_canary_text(canary, status))}.</div>'
    window = status.window
    if window is not None:
        held = " held" if window.state == "held" else ""
        banner += (
            f'<div class="banner window{held}" id="window"><strong>Window</strong>:'
            f" {_e(_window_text(window, status))}. {_e(_breakage_text(window.estimate))}.</div>"
        )
    cards = "".join(_card(key, status) for key in status.keys)
    days = "".join(_day_chart(key, status) for key in status.keys)
    rows = "".join(
        f"<tr><td>{_e(k)}</td><td>{_e(r)}</td><td>{s.handshakes}</td><td>{s.aborted}</td>"
        f"<td>{s.no_request}</td><td>{_e(percent(s.share))}</td><td>{requests}</td></tr>"
        for (k, r), s, requests in _by_reason(status.rows)
    )
    responses = " · ".join(f"{_e(k)} {v}" for k, v in sorted(status.responses.items()))
    limits = f"{_e(_limits_text(status.connections))}<br>" if status.connections else ""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<title>dualproxy: {_e(_phase_short(status))}</title>
<style>{_CSS}</style>
</head>
<body>
<header>
<h1>dualproxy</h1>
<span class="phase phase-{_e(status.phase)}">{_e(_phase_short(status))}</span>
<span class="muted">{_e(_when(status.now))} · counting since {_e(_when(status.started))}</span>
</header>
{banner}
<p class="lead">{_e(_phase_text(status))}</p>
<section class="cards">{cards}</section>
<h2>Timeline</h2>
<figure class="panel" id="timeline">{_timeline(status)}</figure>
<h2>Last 24 hours</h2>
<p class="muted">Handshakes per {status.bucket_seconds // 60} minutes; pin failures in red
(aborted by the client after our certificate, or closed without a request).</p>
{days}
<h2>By key and reason</h2>
<table class="panel">
<thead><tr><th>key</th><th>reason</th><th>handshakes</th><th>aborted</th><th>no request</th>
<th>pin-failure share</th><th>requests</th></tr></thead>
<tbody>{rows or '<tr><td colspan="7" class="muted">no connections yet</td></tr>'}</tbody>
</table>
{_reports_html(status)}
<footer class="muted">{limits}active connections {status.active_connections} ·
responses {responses or "none yet"} · reloads {status.reloads_ok} ok,
{status.reloads_failed} failed · <a href="/status.json">status.json</a> ·
<a href="/metrics">metrics</a></footer>
</body>
</html>
"""


_CSS: Final = """
:root { color-scheme: light; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  color: #212529; background: #f4f5f7; margin: 0; padding: 24px 32px; }
header { display: flex; align-items: baseline; gap: 14px; flex-wrap: wrap; }
h1 { font-size: 22px; margin: 0; }
h2 { font-size: 16px; margin: 28px 0 8px; }
.muted { color: #868e96; font-size: 13px; }
.lead { margin: 10px 0 16px; }
.phase { padding: 2px 10px; border-radius: 999px; font-weight: 600; font-size: 13px;
  background: #e7f5ff; color: #1864ab; }
.phase-during { background: #fff3bf; color: #8d6e00; }
.phase-after { background: #e6fcf5; color: #087f5b; }
.banner { border-radius: 8px; padding: 12px 16px; margin: 16px 0; }
.banner.halted { background: #fff5f5; border: 2px solid #e03131; color: #c92a2a; }
.banner.running { background: #e6fcf5; border: 1px solid #63e6be; color: #087f5b; }
.banner.idle, .banner.window { background: #f8f9fa; border: 1px solid #dee2e6; color: #495057; }
.banner.window.held { background: #fff9db; border: 2px solid #fab005; color: #8d6e00; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(300px, 1fr)); gap: 16px; }
.card, .panel { background: #fff; border-radius: 10px; box-shadow: 0 1px 3px rgba(0,0,0,.08);
  padding: 16px 18px; margin: 0; }
.card { border-top: 5px solid var(--role); }
.card h3 { margin: 0 0 6px; font-size: 17px; display: flex; gap: 8px; align-items: center; }
.role { font-size: 12px; font-weight: 600; color: #fff; background: var(--role);
  border-radius: 999px; padding: 1px 8px; }
.big { font-size: 34px; font-weight: 700; margin: 4px 0 0; }
.big.bad { color: #e03131; }
.big.good { color: #2b8a3e; }
.pin { font: 12px ui-monospace, SFMono-Regular, Menlo, monospace; color: #495057;
  word-break: break-all; }
dl { display: grid; grid-template-columns: auto 1fr; gap: 2px 12px; margin: 10px 0 0;
  font-size: 14px; }
dt { color: #868e96; }
dd { margin: 0; }
svg { width: 100%; height: auto; display: block; }
table { border-collapse: collapse; width: 100%; font-size: 14px; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid #e9ecef; }
th { color: #868e96; font-weight: 600; }
footer { margin-top: 24px; }
.day { margin-bottom: 12px; }
.day h3 { font-size: 14px; margin: 0 0 4px; }
"""


def _card(key: KeyStatus, status: Status) -> str:
    facts = key.facts
    last, total = key.last_24h, key.total
    share = last.share
    # Coloured by the canary's margin (the config's default without a canary).
    margin = status.canary.margin if status.canary is not None else DEFAULT_CANARY_HALT_MARGIN
    quality = "" if share is None else ("bad" if share > margin else "good")
    return (
        f'<article class="card" style="--role: {_colour(facts.role)}">'
        f'<h3>{_e(facts.name)} <span class="role">{_e(facts.role)}</span></h3>'
        f'<div class="muted">pin-failure share, last 24 h</div>'
        f'<div class="big {quality}">{_e(percent(share))}</div>'
        f'<div class="muted">{last.pin_failures} of {last.handshakes} handshakes</div>'
        "<dl>"
        f"<dt>since start</dt><dd>{_count(total.handshakes, 'handshake')} ·"
        f" {total.aborted} aborted · {total.no_request} without a request ·"
        f" {_e(percent(total.share))}</dd>"
        f"<dt>requests</dt><dd>{key.requests}</dd>"
        f"<dt>valid</dt><dd>{_e(_day(facts.not_before))} to {_e(_day(facts.not_after))}"
        f" ({_e(_left(key, status.now))})</dd>"
        f"<dt>key</dt><dd>{_e(facts.algorithm)}</dd>"
        "</dl>"
        f'<div class="pin">sha256/{_e(facts.pin)}</div>'
        "</article>"
    )


def _timeline(status: Status) -> str:
    """Each key's validity, the grace window and now, on one time axis."""
    keys = status.keys
    rotation = status.rotation
    first, last = _view(status)
    span = (last - first).total_seconds()
    plot = _TL_WIDTH - _TL_LABEL - 10
    height = _TL_TOP + _TL_ROW * max(1, len(keys)) + _TL_AXIS

    def x(moment: datetime) -> float:
        """The abscissa of `moment`, clipped to the picture (a bar may run past its edge)."""
        moment = min(max(moment, first), last)
        return _TL_LABEL + (moment - first).total_seconds() / span * plot

    bottom = _TL_TOP + _TL_ROW * max(1, len(keys))
    parts = [
        f'<svg viewBox="0 0 {_TL_WIDTH} {height}" role="img"'
        ' aria-label="certificate validity, grace window and now">',
        f'<rect x="{_TL_LABEL}" y="{_TL_TOP}" width="{plot}" height="{bottom - _TL_TOP}"'
        ' fill="#f8f9fa"/>',
    ]
    for tick, label in _ticks(first, last):
        tx = x(tick)
        parts.append(
            f'<line x1="{tx:.1f}" y1="{_TL_TOP}" x2="{tx:.1f}" y2="{bottom}" stroke="#e9ecef"/>'
            f'<text x="{tx:.1f}" y="{bottom + 18}" font-size="12" fill="{_MUTED}"'
            f' text-anchor="middle">{_e(label)}</text>'
        )
    if rotation is not None:
        gx, gend = x(rotation.grace_start), x(rotation.grace_end)
        parts.append(
            f'<rect class="grace" x="{gx:.1f}" y="{_TL_TOP - 4}" width="{gend - gx:.1f}"'
            f' height="{bottom - _TL_TOP + 4}" fill="{_GRACE}" fill-opacity="0.22"'
            f' stroke="{_GRACE}"/>'
            f'<text x="{(gx + gend) / 2:.1f}" y="{_TL_TOP - 10}" font-size="12"'
            f' fill="#8d6e00" text-anchor="middle" font-weight="600">grace window</text>'
        )
    for index, key in enumerate(keys):
        facts = key.facts
        top = _TL_TOP + index * _TL_ROW + 8
        bx, bend = x(facts.not_before), x(facts.not_after)
        expired = facts.not_after <= status.now
        parts.append(
            f'<text x="8" y="{top + 15}" font-size="14" font-weight="600" fill="{_INK}">'
            f"{_e(facts.name)}</text>"
            f'<text x="{_TL_LABEL - 10}" y="{top + 15}" font-size="12" fill="{_MUTED}"'
            f' text-anchor="end">{_e(facts.role)}</text>'
            f'<rect class="validity" x="{bx:.1f}" y="{top}" width="{max(bend - bx, 2):.1f}"'
            f' height="{_TL_ROW - 16}" rx="5" fill="{_colour(facts.role)}"'
            f' fill-opacity="{0.35 if expired else 0.85}">'
            f"<title>{_e(facts.name)}: {_e(_day(facts.not_before))} to"
            f" {_e(_day(facts.not_after))}</title></rect>"
            f'<text x="{bend - 6:.1f}" y="{top + 14}" font-size="11" fill="#fff"'
            f' text-anchor="end">until {_e(_day(facts.not_after))}</text>'
        )
    nx = x(status.now)
    parts.append(
        f'<line class="now" x1="{nx:.1f}" y1="{_TL_TOP - 6}" x2="{nx:.1f}" y2="{bottom}"'
        f' stroke="{_INK}" stroke-width="2" stroke-dasharray="4 3"/>'
        f'<text x="{nx + 4:.1f}" y="{_TL_TOP - 10 if rotation is None else bottom - 4}"'
        f' font-size="12" font-weight="700" fill="{_INK}">now</text>'
        "</svg>"
    )
    return "".join(parts)


def _day_chart(key: KeyStatus, status: Status) -> str:
    """A day of time buckets for one key: handshakes, with pin failures in red."""
    handshakes, failures = key.handshakes_series, key.failures_series
    count = len(handshakes)
    top = max(handshakes, default=0) or 1
    plot_w = _DAY_WIDTH - _DAY_LEFT - 4
    plot_h = _DAY_HEIGHT - _DAY_BOTTOM - 8
    width = plot_w / count
    colour = _colour(key.facts.role)
    parts = [
        f'<svg viewBox="0 0 {_DAY_WIDTH} {_DAY_HEIGHT}" role="img"'
        f' aria-label="handshakes and pin failures of {_e(key.facts.name)}, last 24 hours">',
        f'<line x1="{_DAY_LEFT}" y1="{8 + plot_h}" x2="{_DAY_WIDTH - 4}" y2="{8 + plot_h}"'
        ' stroke="#ced4da"/>',
        f'<text x="{_DAY_LEFT - 6}" y="16" font-size="11" fill="{_MUTED}"'
        f' text-anchor="end">{top}</text>',
        f'<text x="{_DAY_LEFT - 6}" y="{8 + plot_h}" font-size="11" fill="{_MUTED}"'
        ' text-anchor="end">0</text>',
    ]
    step = timedelta(seconds=status.bucket_seconds)
    for index, (shakes, failed) in enumerate(zip(handshakes, failures, strict=True)):
        if not shakes:
            continue
        bx = _DAY_LEFT + index * width
        h = shakes / top * plot_h
        fh = failed / top * plot_h
        start = status.series_start + index * step
        parts.append(
            f"<g><title>{_e(f'{start:%H:%M}')}-{_e(f'{start + step:%H:%M}')} UTC: {shakes}"
            f" handshakes, {failed} pin failures</title>"
            f'<rect x="{bx + 0.5:.1f}" y="{8 + plot_h - h:.1f}" width="{width - 1:.1f}"'
            f' height="{h:.1f}" fill="{colour}" fill-opacity="0.75"/>'
        )
        if failed:
            parts.append(
                f'<rect class="failures" x="{bx + 0.5:.1f}" y="{8 + plot_h - fh:.1f}"'
                f' width="{width - 1:.1f}" height="{fh:.1f}" fill="{_FAILURE}"/>'
            )
        parts.append("</g>")
    for hours in (24, 18, 12, 6, 0):
        lx = _DAY_LEFT + plot_w * (1 - hours / 24)
        label = "now" if hours == 0 else f"-{hours} h"
        anchor = "end" if hours == 0 else "start" if hours == 24 else "middle"
        parts.append(
            f'<text x="{lx:.1f}" y="{_DAY_HEIGHT - 4}" font-size="11" fill="{_MUTED}"'
            f' text-anchor="{anchor}">{label}</text>'
        )
    parts.append("</svg>")
    last = key.last_24h
    return (
        f'<figure class="panel day"><h3>{_e(key.facts.name)} ({_e(key.facts.role)}):'
        f" {_count(last.handshakes, 'handshake')},"
        f" {_count(last.pin_failures, 'pin failure')}, share {_e(percent(last.share))}</h3>"
        f"{''.join(parts)}</figure>"
    )


def _view(status: Status) -> tuple[datetime, datetime]:
    """The span the timeline shows: the grace window and now, with room around them, and the
    certificates' ends as long as they fall within a year of that (a bar that goes on
    further runs off the edge, its label still giving its end)."""
    focus = [status.now]
    if status.rotation is not None:
        focus += [status.rotation.grace_start, status.rotation.grace_end]
    first, last = min(focus) - _VIEW_ROOM, max(focus) + _VIEW_ROOM
    for key in status.keys:
        for moment in (key.facts.not_before, key.facts.not_after):
            if first - _VIEW_REACH <= moment < first:
                first = moment
            elif last < moment <= last + _VIEW_REACH:
                last = moment
    pad = (last - first) * 0.03
    return first - pad, last + pad


# Around the grace window and now, and how far beyond that a certificate's end is still shown.
_VIEW_ROOM: Final = timedelta(days=14)
_VIEW_REACH: Final = timedelta(days=365)
# Axis steps, finest first: (days, months) apart; the first that gives at most _MAX_TICKS wins.
_TICK_STEPS: Final = ((1, 0), (2, 0), (7, 0), (14, 0), (0, 1), (0, 2), (0, 3), (0, 6), (0, 12))
_MAX_TICKS: Final = 10


def _ticks(first: datetime, last: datetime) -> list[tuple[datetime, str]]:
    """Axis ticks at day or month starts, at most _MAX_TICKS (the view spans at most about
    two and a half years, see _view)."""
    days = (last - first).total_seconds() / 86400
    for step_days, step_months in _TICK_STEPS:
        if step_days and days / step_days <= _MAX_TICKS:
            moment = datetime(first.year, first.month, first.day, tzinfo=UTC) + timedelta(days=1)
            out = []
            while moment < last:
                out.append((moment, f"{moment:%b} {moment.day}"))
                moment += timedelta(days=step_days)
            return out
        if step_months and days / (30.4 * step_months) <= _MAX_TICKS:
            break
    out = []
    year, month = first.year, first.month
    while True:
        month += 1
        if month > 12:
            year, month = year + 1, 1
        moment = datetime(year, month, 1, tzinfo=UTC)
        if moment >= last:
            return out
        if (month - 1) % step_months == 0:
            label = f"{moment:%b %Y}" if month == 1 or not out else f"{moment:%b}"
            out.append((moment, label))


def _by_reason(rows: Sequence[Row]) -> list[tuple[tuple[str, str], Sample, int]]:
    """Handshake samples and requests per (key, reason), keys that were served only."""
    samples: dict[tuple[str, str], Sample] = defaultdict(Sample)
    requests: dict[tuple[str, str], int] = defaultdict(int)
    for row in rows:
        if row.key == NONE_LABEL:
            continue
        pair = (row.key, row.reason)
        requests[pair] += row.requests
        samples[pair] += row.sample
    return [(pair, samples[pair], requests[pair]) for pair in sorted(samples)]


def _phase_short(status: Status) -> str:
    return {
        "single": "single key",
        "before": "before the grace window",
        "during": "grace window",
        "after": "after the grace window",
    }[status.phase]


def _phase_text(status: Status) -> str:
    rotation = status.rotation
    if rotation is None:
        return "no rotation configured: every client gets the configured keys"
    start, end = _when(rotation.grace_start), _when(rotation.grace_end)
    old, new = ", ".join(rotation.old), ", ".join(rotation.new)
    if status.phase == "before":
        return f"everyone gets old ({old}) until {start}; then the grace window until {end}"
    if status.phase == "after":
        return f"everyone gets new ({new}) since {end}"
    return (
        f"grace window {start} to {end}: old ({old}) and new ({new}) side by side,"
        f" hint-less clients get {rotation.default}"
    )


def _sample_text(sample: Sample) -> str:
    return (
        f"{_count(sample.handshakes, 'handshake')}, {_count(sample.pin_failures, 'pin failure')}"
        f" ({percent(sample.share)})"
    )


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _colour(role: str) -> str:
    return _ROLE_COLOURS.get(role, _OTHER_COLOUR)


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else f"{moment.astimezone(UTC):%Y-%m-%d %H:%M:%S}Z"


def _by(canary: CanaryStatus) -> str:
    """Who halted it, when another replica did (" by replica X (the state folder's record)");
    nothing when this server's own evidence did."""
    if canary.halted_by is None:
        return ""
    return f" by replica {canary.halted_by} (the state folder's halt record)"


def _day(moment: datetime) -> str:
    return f"{moment.astimezone(UTC):%Y-%m-%d}"


def _left(key: KeyStatus, now: datetime) -> str:
    days = (key.facts.not_after - now).total_seconds() / 86400
    if days < 0:
        return "expired"
    return f"{days:.0f} days left" if days >= 2 else f"{days * 24:.0f} hours left"


def _e(text: str) -> str:
    return html.escape(text, quote=True)
