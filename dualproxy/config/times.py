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
