"""App-facing endpoints that dualproxy answers itself, on its TLS listener, never upstream:
the signed pin manifest (`[manifest]`, see manifest.py) and the pin-failure report receiver
(`[reports]`, see reports.py).

The relay (and, without an [upstream], the server's own responder) asks `LocalEndpoints.find`
for a request whose target starts with `prefix`, the common prefix of the configured paths,
so that every other request pays one `startswith`. The request, the answer and the protocols
the callers see are `http.local`'s (the contract is written there): an endpoint never raises
for anything a client sends, the worst a client gets is a 4xx.

Built with each config (at start and at every reload, in a worker thread: the manifest file
is read here). Report counts, the rate limiter and the store live in a `ReportsState` that a
reload keeps as long as [reports] is unchanged.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Final

import trio

from dualproxy.config.schema import Config, ManifestConfig, ReportsConfig, Rotation
from dualproxy.http.local import Endpoint, LocalAnswer, LocalRequest
from dualproxy.pinning import manifest, reports
from dualproxy.rotation.policy import canary_bucket, client_id, pin_role

if TYPE_CHECKING:
    from dualproxy.tls.keystore import LoadedKey

log = logging.getLogger("dualproxy")

# What every local answer carries: no content sniffing.
_NOSNIFF: Final = (b"x-content-type-options", b"nosniff")
_TEXT: Final = (b"content-type", b"text/plain; charset=utf-8")


def _text_answer(status: HTTPStatus, problem: str, *extra: tuple[bytes, bytes]) -> LocalAnswer:
    body = f"{status.value} {status.phrase}: {problem}\n".encode("ascii", "backslashreplace")
    return LocalAnswer(int(status), [_TEXT, _NOSNIFF, *extra], body)


def _header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for field_name, value in headers:
        if field_name == name:
            return value
    return None


# --- the manifest --------------------------------------------------------------------------


class ManifestEndpoint:
    """GET and HEAD of the signed manifest file, as it was when last (re)loaded."""

    max_body_bytes = 0  # a GET has no body

    def __init__(self, config: ManifestConfig, content: bytes | None) -> None:
        self._content = content
        self._headers: list[tuple[bytes, bytes]] = [
            (b"content-type", manifest.MEDIA_TYPE.encode()),
            (b"cache-control", b"public, max-age=%d" % config.max_age),
            _NOSNIFF,
        ]
        if content is not None:
            self._etag = b'"%s"' % hashlib.sha256(content).hexdigest()[:32].encode()
            self._headers.append((b"etag", self._etag))

    async def answer(self, request: LocalRequest) -> LocalAnswer:
        if request.method not in (b"GET", b"HEAD"):
            return _text_answer(
                HTTPStatus.METHOD_NOT_ALLOWED,
                "the manifest is read with GET",
                (b"allow", b"GET, HEAD"),
            )
        if self._content is None:
            return _text_answer(
                HTTPStatus.NOT_FOUND, "no signed manifest yet (dualproxy manifest sign)"
            )
        if _header(request.headers, b"if-none-match") == self._etag:
            return LocalAnswer(int(HTTPStatus.NOT_MODIFIED), self._headers)
        return LocalAnswer(int(HTTPStatus.OK), self._headers, self._content)


def read_manifest_file(path: Path) -> tuple[bytes | None, str | None]:
    """The manifest file's bytes, or None and why not (missing, unreadable, far too large)."""
    try:
        with path.open("rb") as file:
            content = file.read(manifest.MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        return None, f"{path} does not exist yet; sign one with `dualproxy manifest sign`"
    except OSError as exc:
        return None, f"{path} cannot be read: {exc.strerror}"
    if len(content) > manifest.MAX_MANIFEST_BYTES:
        return None, f"{path} is larger than {manifest.MAX_MANIFEST_BYTES} bytes: not a manifest"
    return content, None


# --- reports -------------------------------------------------------------------------------


class ReportsState:
    """What outlives a reload: counts, the rate limiter, the store."""

    def __init__(self, config: ReportsConfig) -> None:
        """Blocking: reads the store to start from its counts."""
        self.config = config
        self.store = reports.ReportStore(
            config.store, max_bytes=config.store_max_bytes, keep=config.store_files
        )
        self.counts = reports.counts_from_store(self.store)
        self.limiter = reports.RateLimiter(config.per_minute, config.burst)


class ReportEndpoint:
    """POST of a pin-failure report: checked, rate limited, counted, stored; 204. A report
    from a client the canary sends to the new key is counted as such (`canary_client`): the
    canary halts on app versions its clients report failing (ops.evidence)."""

    def __init__(
        self,
        state: ReportsState,
        clock: Callable[[], datetime],
        rotation: Rotation | None = None,
    ) -> None:
        self._state = state
        self._clock = clock
        self._rotation = rotation
        self.max_body_bytes = state.config.max_body_bytes

    async def answer(self, request: LocalRequest) -> LocalAnswer:
        state = self._state
        if request.method != b"POST":
            return _text_answer(
                HTTPStatus.METHOD_NOT_ALLOWED, "reports are sent with POST", (b"allow", b"POST")
            )
        if not reports.is_json_content_type(_header(request.headers, b"content-type")):
            return _text_answer(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send the report as application/json"
            )
        wait = state.limiter.take(reports.client_key(request.peer), trio.current_time())
        if wait > 0:
            retry = str(max(1, math.ceil(wait))).encode()
            return _text_answer(
                HTTPStatus.TOO_MANY_REQUESTS, "too many reports", (b"retry-after", retry)
            )
        try:
            report = reports.parse_report(request.body)
        except reports.ReportError as exc:
            return _text_answer(HTTPStatus.BAD_REQUEST, exc.problem)
        received = self._clock()
        state.counts.add(report, received, canary_client=self._canary_client(request, received))
        try:
            await trio.to_thread.run_sync(state.store.append, report.record(received))
        except OSError as exc:
            # Counted all the same; the app cannot do better than we can about our disk.
            log.warning("pin-report not stored (%s): %s", state.store.path, exc.strerror or exc)
        log.info("pin-report %s", report.log_summary())
        return LocalAnswer(int(HTTPStatus.NO_CONTENT), [_NOSNIFF])

    def _canary_client(self, request: LocalRequest, received: datetime) -> bytes | None:
        """The sender as policy.client_id has it when the canary sends it the new key (its
        address in the canary's buckets, during the window), else None. Its API connections
        are what count, not this report's, which may carry a hint of its own."""
        rotation, peer = self._rotation, request.peer
        if (
            rotation is None
            or peer is None
            or rotation.canary_percent <= 0
            or not rotation.grace_start <= received < rotation.old_served_until
            or canary_bucket(peer) >= rotation.canary_percent
        ):
            return None
        return client_id(peer)


# --- all of them ---------------------------------------------------------------------------


class LocalEndpoints:
    """The endpoints of one config, by path; see the module docstring."""

    def __init__(
        self,
        by_path: dict[bytes, Endpoint],
        *,
        reports_state: ReportsState | None = None,
        manifest_expires: datetime | None = None,
        manifest_problem: str | None = None,
        manifest_claims: manifest.Manifest | None = None,
    ) -> None:
        self._by_path = by_path
        self.prefix = _common_prefix(list(by_path))
        # The largest body any of them reads, for a caller that reads before it looks.
        self.max_body_bytes = max(e.max_body_bytes for e in by_path.values())
        self.reports_state = reports_state
        self.manifest_expires = manifest_expires
        # What the served manifest lists, as signed (not verified: we only serve it).
        self.manifest_claims = manifest_claims
        self.manifest_problem = manifest_problem

    def find(self, target: bytes) -> Endpoint | None:
        """The endpoint for a request target (its query ignored), or None: relay it. A target
        without the endpoints' common prefix, as nearly every relayed one, costs a startswith."""
        if not target.startswith(self.prefix):
            return None
        return self._by_path.get(target.partition(b"?")[0])

    def report_summary(
        self,
        pin_labels: Mapping[str, str] | None = None,
        *,
        old_pins: frozenset[str] = frozenset(),
        new_pins: frozenset[str] = frozenset(),
    ) -> reports.ReportSummary | None:
        """reports.summary of the counts so far (None without [reports])."""
        if self.reports_state is None:
            return None
        return reports.summary(
            self.reports_state.counts, pin_labels, old_pins=old_pins, new_pins=new_pins
        )


def pin_labels(
    keys: Iterable[LoadedKey],
    rotation: Rotation | None,
    now: datetime,
    *,
    window_closed: bool = False,
) -> dict[str, str]:
    """pin -> "key (role)" for `reports.summary` (a key snapshot's keys)."""
    return {
        key.pin: f"{key.name} ({pin_role(rotation, key.name, now, window_closed=window_closed)})"
        for key in keys
    }


def rotation_pins(
    keys: Mapping[str, LoadedKey], rotation: Rotation | None
) -> tuple[frozenset[str], frozenset[str]]:
    """The pins of the rotation's old keys and of its new keys (empty without a rotation)."""
    if rotation is None:
        return frozenset(), frozenset()
    return (
        frozenset(keys[name].pin for name in rotation.old if name in keys),
        frozenset(keys[name].pin for name in rotation.new if name in keys),
    )


def _common_prefix(paths: Sequence[bytes]) -> bytes:
    """The longest prefix all `paths` share, byte by byte (not by path component)."""
    first, last = min(paths), max(paths)  # the sorted extremes differ first
    size = 0
    while size < min(len(first), len(last)) and first[size] == last[size]:
        size += 1
    return first[:size]


def build(
    config: Config, previous: LocalEndpoints | None, clock: Callable[[], datetime]
) -> LocalEndpoints | None:
    """The endpoints `config` asks for (None: none). Blocking (reads the manifest file and, for
    a new [reports], the store): call from a worker thread once the server runs."""
    if config.manifest is None and config.reports is None:
        return None
    by_path: dict[bytes, Endpoint] = {}
    expires = problem = claims = None
    if config.manifest is not None:
        content, problem = read_manifest_file(config.manifest.file)
        if content is not None:
            try:
                claims = manifest.peek(content)
                expires = claims.expires_at
            except manifest.ManifestError as exc:
                problem = f"{config.manifest.file} is served as is, but is no manifest: {exc}"
        by_path[config.manifest.path.encode()] = ManifestEndpoint(config.manifest, content)
    state = None
    if config.reports is not None:
        state = previous.reports_state if previous is not None else None
        if state is None or state.config != config.reports:  # kept only while unchanged
            state = ReportsState(config.reports)
        by_path[config.reports.path.encode()] = ReportEndpoint(state, clock, config.rotation)
    return LocalEndpoints(
        by_path,
        reports_state=state,
        manifest_expires=expires,
        manifest_problem=problem,
        manifest_claims=claims,
    )
