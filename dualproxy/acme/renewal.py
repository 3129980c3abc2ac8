"""When to renew a certificate: a pure function of the certificate, the CA's renewal
information, the attempts so far and the clock.

No I/O and no clock of its own: `now` is always an argument, and so is the random point
inside a renewal window (drawn once by the caller), so that tests drive it with a fake clock.

The rules, in order:

1. No certificate yet: due now.
2. The CA offers ACME Renewal Information (RFC 9773): due at a point chosen uniformly at
   random inside its suggested window (section 4.2: spreading renewals over the window is
   what lets a CA ask every client to renew early after a mass revocation); a window
   already past means due now.
3. Otherwise: due once `renew_fraction` of the lifetime has passed (two thirds by default).
4. A rotation's new key whose window has not opened yet: a certificate that would fall due
   by `grace_start` is renewed `new_key_lead` before it instead, unless it was issued inside
   that lead already (which is what makes the rule stop after one renewal, however short
   the lifetime).
5. Never a tight loop: after an attempt, the next one waits at least `retry_initial`; after
   `n` failures in a row it waits `retry_initial * 2**(n-1)`, capped at `retry_max`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from dualproxy.config.schema import AcmeConfig

# Warn as expiry nears from this long before it (Let's Encrypt's own reminder mails began 20
# days ahead; `dualproxy check` warns at 14): renewal should have happened long before.
EXPIRY_WARNING: Final = timedelta(days=14)
# CAs backdate notBefore to absorb client clock skew (Let's Encrypt by an hour, some by up to
# a day); a certificate issued at the start of the new key's lead must count as issued in it.
NOT_BEFORE_SLACK: Final = timedelta(days=1)


@dataclass(frozen=True, slots=True)
class Policy:
    renew_fraction: float
    retry_initial: timedelta
    retry_max: timedelta
    recheck_interval: timedelta
    new_key_lead: timedelta
    expiry_warning: timedelta = EXPIRY_WARNING

    @classmethod
    def from_config(cls, acme: AcmeConfig) -> Policy:
        return cls(
            renew_fraction=acme.renew_fraction,
            retry_initial=timedelta(seconds=acme.retry_initial),
            retry_max=timedelta(seconds=acme.retry_max),
            recheck_interval=timedelta(seconds=acme.recheck_interval),
            new_key_lead=timedelta(days=acme.new_key_lead_days),
        )


@dataclass(frozen=True, slots=True)
class Validity:
    """The served leaf certificate's validity period (aware datetimes)."""

    not_before: datetime
    not_after: datetime


@dataclass(frozen=True, slots=True)
class Window:
    """A renewal window suggested by the CA (RFC 9773 `suggestedWindow`)."""

    start: datetime
    end: datetime


@dataclass(frozen=True, slots=True)
class KeyState:
    """What is known about one ACME-managed key at one instant."""

    validity: Validity | None  # None: no certificate yet
    window: Window | None = None  # the CA's suggestion, when it offers renewal information
    point: float = 0.5  # where inside the window, drawn uniformly from [0, 1) by the caller
    grace_start: datetime | None = None  # set for a rotation's new key
    failures: int = 0  # failed attempts in a row
    last_attempt: datetime | None = None


class Reason(enum.StrEnum):
    MISSING = "no certificate yet"
    ARI = "inside the CA's renewal window"
    LIFETIME = "past the renewal share of its lifetime"
    NEW_KEY_LEAD = "ahead of the grace window"


class Urgency(enum.StrEnum):
    OK = "ok"
    SOON = "expires soon"  # within Policy.expiry_warning
    EXPIRED = "expired"
    MISSING = "missing"


@dataclass(frozen=True, slots=True)
class Plan:
    due: datetime  # when the certificate falls due (in the past: due now)
    reason: Reason
    next_attempt: datetime  # `due`, pushed back by the retry rules
    urgency: Urgency

    def attempt_now(self, now: datetime) -> bool:
        return self.next_attempt <= now


def due_time(state: KeyState, policy: Policy, now: datetime) -> tuple[datetime, Reason]:
    """When the certificate falls due, and by which rule (rules 1-4 above)."""
    validity = state.validity
    if validity is None:
        return now, Reason.MISSING
    if state.window is not None and state.window.end > state.window.start:
        span = state.window.end - state.window.start
        due, reason = state.window.start + span * min(max(state.point, 0.0), 1.0), Reason.ARI
    else:
        lifetime = validity.not_after - validity.not_before
        due, reason = validity.not_before + lifetime * policy.renew_fraction, Reason.LIFETIME
    grace_start = state.grace_start
    if grace_start is not None and now < grace_start and due <= grace_start:
        lead_start = grace_start - policy.new_key_lead
        if validity.not_before + NOT_BEFORE_SLACK < lead_start < due:
            return lead_start, Reason.NEW_KEY_LEAD
    return due, reason


def retry_delay(failures: int, policy: Policy) -> timedelta:
    """The wait after `failures` failed attempts in a row (at least one): doubling, capped."""
    exponent = min(max(failures, 1) - 1, 32)  # 2**32 first waits exceed any cap
    delay: timedelta = policy.retry_initial * (2**exponent)
    return min(delay, policy.retry_max)


def plan(state: KeyState, policy: Policy, now: datetime) -> Plan:
    """When to attempt the next renewal of one key, and how urgent it is."""
    due, reason = due_time(state, policy, now)
    attempt = due
    if state.last_attempt is not None:
        wait = retry_delay(state.failures, policy) if state.failures else policy.retry_initial
        attempt = max(attempt, state.last_attempt + wait)
    return Plan(due=due, reason=reason, next_attempt=attempt, urgency=urgency(state, policy, now))


def urgency(state: KeyState, policy: Policy, now: datetime) -> Urgency:
    if state.validity is None:
        return Urgency.MISSING
    if state.validity.not_after <= now:
        return Urgency.EXPIRED
    if state.validity.not_after - now <= policy.expiry_warning:
        return Urgency.SOON
    return Urgency.OK


def wake_time(plans: list[Plan], policy: Policy, now: datetime) -> datetime:
    """When a renewal loop looks again: the earliest attempt, and at least every
    recheck_interval (renewal information can change: RFC 9773 4.3.2)."""
    wake = now + policy.recheck_interval
    for p in plans:
        wake = min(wake, p.next_attempt)
    return max(wake, now)
