"""The rotation told to people and apps: why `policy.choose` chose an identity, the rotation's
timeline, every key with its pin role, and the moments those roles change.

Pure, as `policy` is: values in, text or values out, no file and no clock. The commands print
what these return (`route` the explanation, `check` the timeline, `pins` and `manifest sign`
the pinned keys and role changes); the words are the config's own (`rotation.hints.new.sni`),
so that an operator finds the setting that decided.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Final, Protocol, TypeVar

from dualproxy.config.names import IPAddress, is_ip_address
from dualproxy.config.schema import Config, Role, Rotation
from dualproxy.config.times import brief_time, brief_times
from dualproxy.rotation.policy import (
    Choice,
    Phase,
    Reason,
    canary_bucket,
    phase,
    pin_role,
    sni_matches,
)
from dualproxy.tls.clienthello import ClientHello
from dualproxy.tls.pins import PinnedKey

__all__ = ["PinSource", "explain", "pinned_keys", "role_changes", "timeline", "window_rule"]

_PHASES: Final[tuple[Phase, ...]] = ("before", "during", "after")

_T = TypeVar("_T")


def explain(
    rotation: Rotation | None,
    choice: Choice,
    hello: ClientHello | None,
    peer: IPAddress | None,
    *,
    missing_peer: str = "no client address",
) -> str:
    """The rule of `policy.choose` that decided `choice`, in the config's own terms.

    `choice` is what `choose` returned for this rotation, hello and peer (ValueError when they
    do not fit it); `missing_peer` says in the caller's words why `peer` is None.
    """
    reason = choice.reason
    if rotation is None or reason is Reason.SINGLE:
        return "no [rotation] in the config: every client gets the configured keys"
    role: Role = "new" if choice.identity == "new" else "old"
    start, end = brief_times(rotation.grace_start, rotation.grace_end)
    default = f"rotation.default = {rotation.default!r}"
    if reason is Reason.BEFORE_WINDOW:
        return f"before rotation.grace_start ({start}) everyone gets old"
    if reason is Reason.AFTER_WINDOW:
        return f"from rotation.grace_end ({end}) on everyone gets new"
    if reason is Reason.UNPARSED or hello is None:
        return f"the ClientHello could not be parsed: {default}"
    if reason is Reason.HINT_SNI:
        sni = hello.sni
        patterns = rotation.hints_for(role).sni
        pattern = _first(p for p in patterns if sni is not None and sni_matches(p, sni))
        return f"SNI {sni} matches {pattern!r} in rotation.hints.{role}.sni"
    if reason is Reason.HINT_ALPN:
        hinted = rotation.hints_for(role).alpn
        token = _first(a for a in hello.alpn if a in hinted)
        return f"ALPN {token.decode(errors='backslashreplace')} is in rotation.hints.{role}.alpn"
    if reason is Reason.HINT_NETWORK:
        return f"client {_known(peer)} is in rotation.hints.{role}.networks"
    if reason is Reason.CANARY:
        client = _known(peer)
        return (
            f"no hint matched and client {client} is in the canary (bucket"
            f" {canary_bucket(client):.2f} < rotation.canary_percent ="
            f" {rotation.canary_percent:g})"
        )
    hints = "no hint matched" + ("" if peer is not None else f" ({missing_peer})")
    return f"{hints}: {default}"


def timeline(
    rotation: Rotation | None, key_names: Iterable[str], at: datetime, marker: str
) -> list[str]:
    """The rotation's three phases as lines, the one `at` falls in marked `<- marker`; without
    a rotation, one line naming the keys every client gets."""
    if rotation is None:
        return [f"rotation: none; every client gets {', '.join(key_names)}"]
    now = phase(rotation, at)
    mark = {p: (f"   <- {marker}" if p == now else "") for p in _PHASES}
    hints = []
    for role in ("new", "old"):
        h = rotation.hints_for(role)
        parts = [*h.sni, *(a.decode() for a in h.alpn), *(str(n) for n in h.networks)]
        if parts:
            hints.append(f"{role} for {', '.join(parts)}")
    during = "; ".join(hints) or "no hints"
    during += f"; others get {rotation.default}"
    if rotation.canary_percent:
        during += f" (canary: {rotation.canary_percent:g}% of them get new)"
    start, end, deadline = brief_times(
        rotation.grace_start, rotation.grace_end, rotation.old_served_until
    )
    old, new = ", ".join(rotation.old), ", ".join(rotation.new)
    lines = [
        "rotation timeline:",
        f"  until {start}  everyone gets old ({old}){mark['before']}",
    ]
    if rotation.close == "when-safe":
        held = at >= rotation.grace_end and now == "during"
        lines += [
            f"  {start} .. {end}  grace window: {during}{mark['during'] if not held else ''}",
            f"  {end} .. {deadline}  when safe (rotation.close): the window goes on while more"
            f" than {rotation.max_breakage:.2%} of clients would fail on new (the canary's"
            f" upper bound); it closes once within that{mark['during'] if held else ''}",
            f"  from {deadline}  everyone gets new ({new}), whatever the evidence{mark['after']}",
        ]
    else:
        lines += [
            f"  {start} .. {end}  grace window: {during}{mark['during']}",
            f"  from {end}  everyone gets new ({new}){mark['after']}",
        ]
    return lines


def window_rule(rotation: Rotation | None, at: datetime) -> str | None:
    """How the window ends, when `at` is past grace_end (what `route` adds): None before."""
    if rotation is None or at < rotation.grace_end:
        return None
    if rotation.close == "at-grace-end":
        return 'rotation.close = "at-grace-end": the window ended at grace_end'
    deadline = brief_time(rotation.old_served_until)
    if at >= rotation.old_served_until:
        return f'rotation.close = "when-safe": grace_deadline ({deadline}) has passed'
    return (
        'rotation.close = "when-safe": past grace_end the window goes on while more than'
        f" {rotation.max_breakage:.2%} of clients would fail on the new key, until"
        f" grace_deadline ({deadline}); shown as still open: whether a running server closed it"
        " is in `dualproxy status` (once closed, every client gets new)"
    )


class PinSource(Protocol):
    """What a pin listing needs of a key: a loaded one (`LoadedKey`), or one whose
    certificate is still to come (its pin depends on the key alone)."""

    @property
    def pin(self) -> str: ...

    @property
    def algorithm(self) -> str: ...

    @property
    def names(self) -> tuple[str, ...]: ...

    @property
    def not_after(self) -> datetime | None: ...


def pinned_keys(config: Config, keys: Mapping[str, PinSource], at: datetime) -> list[PinnedKey]:
    """Every configured key with its pin role at `at`, in `Config.key_order`: what the pin
    formats and the manifest list. ValueError for a certificate name no pin format can carry."""
    return [
        PinnedKey(
            name=name,
            role=pin_role(config.rotation, name, at),
            pin=key.pin,
            algorithm=key.algorithm,
            # Mobile pin formats take host names; an IP address SAN is no domain to pin.
            hostnames=tuple(n for n in key.names if not is_ip_address(n)),
            not_after=key.not_after,
        )
        for name in config.key_order()
        for key in [keys[name]]
    ]


def role_changes(
    rotation: Rotation | None, after: datetime, before: datetime
) -> list[tuple[str, datetime]]:
    """The rotation's boundaries strictly between `after` and `before`, as (config key,
    instant): the moments every pin role changes, e.g. within a manifest's validity."""
    if rotation is None:
        return []
    bounds = (("grace_start", rotation.grace_start), ("grace_end", rotation.grace_end))
    return [(name, moment) for name, moment in bounds if after < moment < before]


def _first(candidates: Iterable[_T]) -> _T:
    for candidate in candidates:
        return candidate
    raise ValueError("the choice does not fit the hello it is explained with")


def _known(peer: IPAddress | None) -> IPAddress:
    if peer is None:
        raise ValueError("the choice needs a client address, and there is none")
    return peer
