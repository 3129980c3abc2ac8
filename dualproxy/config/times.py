"""Instants as dualproxy reads and writes them: ISO 8601 / RFC 3339, always UTC."""

from __future__ import annotations

from datetime import UTC, datetime


def parse_time(text: str) -> datetime:
    """An ISO 8601 instant with a zone ("2026-12-01T00:00:00Z"), as UTC; ValueError otherwise."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO 8601 time such as 2026-12-01T00:00:00Z") from None
    if value.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone; add Z (UTC) or an offset such as +01:00")
    return value.astimezone(UTC)


def format_time(moment: datetime) -> str:
    """An instant as RFC 3339 in UTC to the second ("2026-12-01T00:00:00Z"): what parse_time
    reads, and how every document and message of ours writes a time."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def brief_times(*moments: datetime, zone: str = "Z") -> tuple[str, ...]:
    """Instants as people read them side by side: to the minute ("2026-12-01 00:00Z"), or to
    the second ("2026-12-01 16:15:40Z") for all of them when any falls within a minute, so a
    40-second window never reads "16:15Z .. 16:15Z". `zone` follows each time ("Z", " UTC")."""
    utc = [moment.astimezone(UTC) for moment in moments]
    shape = "%Y-%m-%d %H:%M:%S" if any(m.second or m.microsecond for m in utc) else "%Y-%m-%d %H:%M"
    return tuple(m.strftime(shape) + zone for m in utc)


def brief_time(moment: datetime, zone: str = "Z") -> str:
    """One instant as `brief_times` writes it."""
    return brief_times(moment, zone=zone)[0]
