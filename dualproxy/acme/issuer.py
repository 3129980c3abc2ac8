"""Certificates for our own keys from an ACME CA (RFC 8555), renewals that keep the key.

Theory of operation. An issuance is one order for one configured key: the CSR is made from
that key (so the key, and every app's pin of it, never changes), each authorization is
proven with the configured challenge (see challenges.py for who answers it and how the CLI
and a running `serve` cooperate), and the chain the CA returns is checked against the key
and written over the key's `chain` file atomically; a running `serve` then reloads it like
any renewed chain (connections already open keep the old one).

The `acme` library (certbot's) speaks the protocol; its calls block, so each runs in a
worker thread, and the whole order runs under `acme.order_timeout`. What it does not do is
written here: tls-alpn-01 (it knows the challenge type no more), ACME Renewal Information
(RFC 9773; its own helper draws the random point itself, our timing is in renewal.py), and
translating its errors into ones that say whose fault a failure is and what to do.

Only one order runs at a time per ACME folder (a lock file), so a background renewal in
`serve` and `dualproxy acme renew` from cron never race for the same key; replicas that share
the folder (and the keys' files) wait for one another, and the one that gets the lock second
takes the chain the first wrote instead of ordering again (`obtain`'s `served`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final, TypeVar, TypeVarTuple

import trio
from acme import challenges as acme_challenges
from acme import client as acme_client
from acme import errors as acme_errors
from acme import messages
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from josepy import b64, jwa
from josepy import errors as jose_errors
from josepy import jwk as jose_jwk

from dualproxy.acme import renewal
from dualproxy.acme.challenges import (
    Challenge,
    ChallengeBoard,
    ChallengeError,
    open_responders,
    publish,
    wait_until_served,
)
from dualproxy.acme.challenges import withdraw as withdraw_challenges
from dualproxy.config.errors import OperatorError
from dualproxy.config.names import ListenAddress
from dualproxy.config.schema import AcmeConfig, ChallengeType, Config, KeyConfig
from dualproxy.files import write_atomically
from dualproxy.pinning.manifest import b64url_encode
from dualproxy.rotation import policy
from dualproxy.tls import keygen, keystore
from dualproxy.tls.keygen import PrivateKey

log = logging.getLogger("dualproxy.acme")

_T = TypeVar("_T")
_Args = TypeVarTuple("_Args")

USER_AGENT: Final = "dualproxy acme-python"
# One HTTP request to the CA: Let's Encrypt answers in well under a second; a minute means
# it is down (certbot's own default is 45 s).
NETWORK_TIMEOUT: Final = 45
# The local check that our own listener answers a published challenge: a running `serve`
# picks the file up within keystore.reload_poll_interval; this much more absorbs a busy box.
SERVED_CHECK_MARGIN: Final = 10.0
# Once our own listener answers, every other process answering from the same folder (the
# workers of a supervisor, replicas sharing the state folder: the CA may reach any of them)
# has it within keystore.reload_poll_interval and one refresh of its board, which reads a few
# small files and signs one certificate per challenge (milliseconds): a second more absorbs
# a loaded machine. A process that still misses it costs one failed validation, retried
# after acme.retry_initial; a longer wait would cost every order, every time.
PICKUP_MARGIN: Final = 1.0
LOCK_FILE: Final = "lock"
# How often a renewal waiting for another process's order looks at the lock again: an order
# takes seconds, and a look costs one system call.
LOCK_POLL_INTERVAL: Final = 1.0
CHALLENGES_FOLDER: Final = "challenges"


class AcmeError(Exception):
    """An issuance failed: the message says whose fault (the CA's answer, our config, the
    network) and what to do; it never carries key material."""


def challenge_folder(acme: AcmeConfig) -> Path:
    return acme.account_key.parent / CHALLENGES_FOLDER


def managed_key(config: Config, name: str) -> KeyConfig:
    """The ACME-managed key `name`; AcmeError naming the config key to fix otherwise."""
    where = f"{config.path}: " if config.path else ""
    if config.acme is None:
        raise AcmeError(f"{where}acme: no [acme] table; add one (see config.toml)")
    key = config.keys.get(name)
    if key is None:
        known = ", ".join(k.name for k in config.acme_keys()) or "none"
        raise AcmeError(f"{where}keys.{name}: no such key; ACME-managed keys: {known}")
    if not key.names:
        raise AcmeError(
            f'{where}keys.{name}.names: missing; add names = ["api.example.com"] to request'
        )
    return key


# --- the protocol, in worker threads --------------------------------------------------------


@dataclass
class _Session:
    client: acme_client.ClientV2
    jwk: jose_jwk.JWK

    def close(self) -> None:
        self.client.net.session.close()


def _account_jwk(acme: AcmeConfig) -> tuple[jose_jwk.JWK, jwa.JWASignature]:
    """The account key (made, mode 0600, when missing) as a JWK and its signing algorithm."""
    path = acme.account_key
    if not path.exists() and not path.is_symlink():
        keygen.write_private_key(path, keygen.generate_private_key())
        log.info("acme: made the account key %s", path)
    key = keystore.read_private_key(path, key_path="acme.account_key")
    if isinstance(key, ec.EllipticCurvePrivateKey):
        algorithms = {256: jwa.ES256, 384: jwa.ES384, 521: jwa.ES512}
        algorithm = algorithms.get(key.curve.key_size)
        if algorithm is None:
            raise AcmeError(f"{path}: acme.account_key: use a P-256, P-384 or RSA key")
        return jose_jwk.JWKEC(key=key), algorithm
    assert isinstance(key, rsa.RSAPrivateKey)
    return jose_jwk.JWKRSA(key=key), jwa.RS256


def _network(
    acme: AcmeConfig, jwk: jose_jwk.JWK | None, alg: jwa.JWASignature
) -> acme_client.ClientNetwork:
    net = acme_client.ClientNetwork(jwk, alg=alg, user_agent=USER_AGENT, timeout=NETWORK_TIMEOUT)
    if acme.ca_file is not None:
        # Passed as each request's `verify` (requests takes a CA file path there too); the
        # session's own setting would lose to REQUESTS_CA_BUNDLE and to this per request.
        net.verify_ssl = str(acme.ca_file)  # type: ignore[assignment]
    return net


def _directory(acme: AcmeConfig, net: acme_client.ClientNetwork) -> messages.Directory:
    """The CA's directory (blocking). An answer that is no ACME directory (a 404, an HTML
    page) is the URL's fault, not a passing CA failure: AcmeError naming acme.directory."""
    try:
        return acme_client.ClientV2.get_directory(acme.directory, net)
    except (acme_errors.ClientError, messages.Error, jose_errors.Error, ValueError) as exc:
        raise AcmeError(
            f"acme.directory: {acme.directory} did not answer with an ACME directory"
            f" ({_answer_summary(exc)}); check the URL (Let's Encrypt's is"
            " https://acme-v02.api.letsencrypt.org/directory, its staging one"
            " https://acme-staging-v02.api.letsencrypt.org/directory)"
        ) from None


def _answer_summary(exc: Exception) -> str:
    """What the server answered, in a few words: "HTTP 404 Not Found", a problem document's
    detail, or the parser's complaint."""
    if isinstance(exc, messages.Error):
        return _problem(exc)
    response = exc.args[0] if exc.args else None
    if isinstance(response, tuple):  # (response, the deserialization error)
        response = response[0]
    status = getattr(response, "status_code", None)
    if status is not None:
        return f"HTTP {status} {getattr(response, 'reason', '') or ''}".rstrip()
    return f"{type(exc).__name__}: {exc}"[:200]


def _open_session(acme: AcmeConfig) -> _Session:
    """Blocking: the directory, and our account (registered at the first use)."""
    jwk, alg = _account_jwk(acme)
    net = _network(acme, jwk, alg)
    try:
        client = acme_client.ClientV2(_directory(acme, net), net)
        registration = messages.NewRegistration.from_data(
            email=acme.email, terms_of_service_agreed=True
        )
        try:
            client.new_account(registration)
        except acme_errors.ConflictError as exc:  # registered before: the CA names it
            net.account = messages.RegistrationResource(
                uri=exc.location, body=messages.Registration()
            )
    except BaseException:
        net.session.close()
        raise
    return _Session(client, jwk)


def _key_authorization(token: str, jwk: jose_jwk.JWK) -> str:
    thumbprint = jwk.thumbprint(
        hash_function=acme_challenges.KeyAuthorizationChallengeResponse.thumbprint_hash_function
    )
    return f"{token}.{b64.b64encode(thumbprint).decode()}"


def _answer(
    client: acme_client.ClientV2, challb: messages.ChallengeBody, challenge: Challenge
) -> None:
    """Tell the CA to validate: POST an empty JSON object to the challenge (RFC 8555 7.5.1).

    Not the library's answer_challenge, which insists on a Link "up" header that the RFC
    does not require (Pebble 2.4 sends none). The library's HTTP-01 response is the object
    that serializes to `{}` (it drops the key authorization), whatever the challenge type:
    the library has no class for tls-alpn-01, and an object without fields would be sent as
    an empty body, which means POST-as-GET.
    """
    ready = acme_challenges.HTTP01Response(key_authorization=challenge.key_authorization)
    client.net.post(challb.uri, ready, new_nonce_url=client.directory["newNonce"])


def _pick_challenges(
    order: messages.OrderResource, kind: ChallengeType, jwk: jose_jwk.JWK
) -> list[tuple[messages.ChallengeBody, Challenge]]:
    """For each authorization still pending, the challenge of our type."""
    picked = []
    for authz in order.authorizations:
        if authz.body.status == messages.STATUS_VALID:
            continue  # proven recently for this account: the CA reuses it
        name = str(authz.body.identifier.value).lower()
        for challb in authz.body.challenges:
            if challb.chall.to_partial_json().get("type") == kind or challb.typ == kind:
                token = str(challb.chall.to_partial_json()["token"])
                challenge = Challenge(kind, name, token, _key_authorization(token, jwk))
                picked.append((challb, challenge))
                break
        else:
            offered = ", ".join(str(c.typ) for c in authz.body.challenges)
            raise AcmeError(
                f"the CA offers no {kind} challenge for {name} (it offers {offered}); set"
                " acme.challenge to one of those that dualproxy answers"
            )
    return picked


# --- one issuance ------------------------------------------------------------------------------


async def obtain(
    config: Config,
    key: KeyConfig,
    *,
    board: ChallengeBoard | None = None,
    tls_probe: ListenAddress | None = None,
    http_probe: ListenAddress | None = None,
    served: x509.Certificate | None = None,
) -> bool:
    """Get a new chain for `key` (same key) and write it over the key's chain file. True when
    we ordered it; False when another process renewed it meanwhile (see `served`).

    `board`: the running server's own challenge board, refreshed at once after publishing
    (other responders pick the files up by polling). `tls_probe`, `http_probe`: where our
    listeners are, when not at the configured addresses (a server bound to port 0).
    `served`: the certificate a running server renews (replicas sharing the ACME folder may
    all find it due at once): another process's order is waited for (up to
    acme.order_timeout) instead of failing, and when the chain file then holds a newer
    certificate for the key than `served`, that one is taken and no order is placed: one
    order per renewal across the replicas. AcmeError on any failure.
    """
    acme = config.acme
    assert acme is not None
    assert key.names
    folder = challenge_folder(acme)
    wait = acme.order_timeout if served is not None else None
    async with _order_lock(folder.parent, wait=wait):
        private_key = keystore.read_private_key(key.key, key_path=f"keys.{key.name}.key")
        if served is not None and _renewed_since(key, served, private_key) is not None:
            log.info(
                "acme: %s was renewed by another process sharing %s; serving its chain",
                key.name,
                folder.parent,
            )
            return False
        csr = keygen.make_csr(private_key, key.names)
        csr_pem = csr.public_bytes(serialization.Encoding.PEM)
        try:
            with trio.fail_after(acme.order_timeout):
                probes = (
                    tls_probe or config.listen.addresses[0],
                    http_probe or acme.http_listen,
                )
                chain_pem = await _run_order(config, acme, key, csr_pem, folder, board, probes)
        except trio.TooSlowError:
            raise AcmeError(
                f"no certificate for {key.name} within acme.order_timeout ({acme.order_timeout:g}"
                " s); is the CA slow or unreachable? Try again later"
            ) from None
        except ChallengeError as exc:
            raise AcmeError(str(exc)) from None
        except OSError as exc:  # the challenge folder
            raise AcmeError(
                f"cannot publish the challenge in {folder}: {exc.strerror or exc}; check that"
                " folder's permissions"
            ) from None
    _check_issued(chain_pem, private_key.public_key(), key)
    try:
        await trio.to_thread.run_sync(_write_chain, key.chain, chain_pem)
    except OSError as exc:
        raise AcmeError(
            f"{key.chain}: keys.{key.name}.chain: cannot write the new chain: {exc.strerror};"
            " the certificate is issued but not saved: fix the folder's permissions and run"
            f" `dualproxy acme issue {key.name}` again"
        ) from None
    return True


def _renewed_since(
    key: KeyConfig, served: x509.Certificate, private_key: PrivateKey
) -> x509.Certificate | None:
    """The leaf of the key's chain file when it is a later certificate for the same key than
    `served` (another process renewed it); None otherwise (unreadable, or the same)."""
    try:
        leaf = x509.load_pem_x509_certificate(key.chain.read_bytes())
    except (OSError, ValueError):
        return None
    same_key = leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    later = leaf.not_valid_after_utc > served.not_valid_after_utc
    return leaf if same_key and later and leaf.serial_number != served.serial_number else None


async def _run_order(
    config: Config,
    acme: AcmeConfig,
    key: KeyConfig,
    csr_pem: bytes,
    folder: Path,
    board: ChallengeBoard | None,
    probes: tuple[ListenAddress, ListenAddress | None],
) -> bytes:
    """One order, each slow step said in the log first (a CA may take a minute, a hung one
    until acme.order_timeout): who is asked, what is proven, what is awaited."""
    log.info(
        "acme: %s: asking %s for a certificate for %s",
        key.name,
        acme.directory,
        ", ".join(key.names),
    )
    session = await _blocking(_open_session, acme)
    try:
        order = await _blocking(session.client.new_order, csr_pem)
        picked = _pick_challenges(order, acme.challenge, session.jwk)
        challenges = [challenge for _, challenge in picked]
        if challenges:
            log.info(
                "acme: %s: proving %s with %s",
                key.name,
                ", ".join(c.name for c in challenges),
                acme.challenge,
            )
        else:
            log.info("acme: %s: the CA still holds valid authorizations; no challenge", key.name)
        now = datetime.now(UTC)
        paths = await trio.to_thread.run_sync(publish, folder, challenges, now)
        try:
            if board is not None:
                await board.refresh_async()
            timeout = config.keystore.reload_poll_interval + SERVED_CHECK_MARGIN
            await wait_until_served(challenges, *probes, timeout)
            if challenges:
                # The other processes answering from the folder (workers, replicas behind a
                # load balancer), which the CA may reach instead of the one we probed, read
                # it within their poll interval: let them.
                await trio.sleep(config.keystore.reload_poll_interval + PICKUP_MARGIN)
            for challb, challenge in picked:
                await _blocking(_answer, session.client, challb, challenge)
            log.info(
                "acme: %s: waiting for the CA to validate and issue (at most %g s)",
                key.name,
                acme.order_timeout,
            )
            # The library compares its deadline with naive local time.
            deadline = datetime.now() + timedelta(seconds=acme.order_timeout)
            order = await _blocking(session.client.poll_and_finalize, order, deadline)
        finally:
            # Shielded: a cancelled order (SIGTERM) withdraws its challenges too.
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(withdraw_challenges, paths)
                if board is not None:
                    await board.refresh_async()
    finally:
        session.close()
    if not order.fullchain_pem:
        raise AcmeError("the CA finalized the order without a certificate; try again later")
    return str(order.fullchain_pem).encode("ascii")


async def _blocking(function: Callable[[*_Args], _T], *args: *_Args) -> _T:
    """One blocking call to the CA in a worker thread, its errors translated. Abandoned when
    cancelled (a shutting-down server does not wait for the CA); the thread ends on its own
    with the request's timeout, and nothing it returns is used."""
    try:
        return await trio.to_thread.run_sync(function, *args, abandon_on_cancel=True)
    except (AcmeError, OperatorError):
        raise
    except messages.Error as exc:
        raise AcmeError(f"the CA refused: {_problem(exc)}") from None
    except acme_errors.ValidationError as exc:
        raise AcmeError(_validation_problem(exc)) from None
    except acme_errors.IssuanceError as exc:
        raise AcmeError(f"the CA would not issue: {_problem(exc.error)}") from None
    except acme_errors.TimeoutError:
        raise AcmeError(
            "the CA did not finish validating or issuing in time; try again later"
        ) from None
    except acme_errors.Error as exc:
        raise AcmeError(f"the CA's answer was not understood ({exc}); try again later") from None
    except OSError as exc:  # requests' errors are OSErrors: DNS, refused, TLS, timeouts
        raise AcmeError(
            f"cannot reach the CA ({type(exc).__name__}: {exc}); check acme.directory,"
            " acme.ca_file and the network"
        ) from None


def _problem(error: messages.Error) -> str:
    """An RFC 7807 problem document in one line: type, detail, per-name subproblems."""
    text = f"{error.typ}: {error.detail or error.title or error.description or 'no detail'}"
    for sub in error.subproblems or ():
        name = sub.identifier.value if sub.identifier else "?"
        text += f"; {name}: {sub.typ}: {sub.detail}"
    return text


def _validation_problem(exc: acme_errors.ValidationError) -> str:
    parts = []
    for authz in exc.failed_authzrs:
        for challb in authz.body.challenges:
            if challb.error is not None:
                parts.append(f"{authz.body.identifier.value}: {_problem(challb.error)}")
    return (
        "the CA could not validate "
        + "; ".join(parts)
        + ". Check that the name resolves to this machine and that the CA reaches the"
        " challenge port (443 for tls-alpn-01, 80 for http-01)"
    )


def _check_issued(chain_pem: bytes, public_key: object, key: KeyConfig) -> None:
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
    except ValueError as exc:
        raise AcmeError(f"the CA returned a chain that cannot be parsed ({exc})") from None
    leaf = chain[0].public_key()
    ours = public_key
    assert isinstance(ours, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_bytes(serialization.Encoding.DER, spki) != ours.public_bytes(
        serialization.Encoding.DER, spki
    ):
        raise AcmeError(
            f"the CA returned a certificate for another key than {key.name}'s; not written"
        )


def _write_chain(path: Path, chain_pem: bytes) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomically(path, chain_pem, mode=0o644)


def _open_lock(folder: Path) -> int:
    """The lock file's descriptor (the folder made when missing); AcmeError saying why not."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        return os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise AcmeError(
            f"{folder}: cannot create the ACME state folder or its lock: {exc.strerror}; it is"
            " the folder of acme.account_key: fix its permissions or pick another"
        ) from None


@contextlib.asynccontextmanager
async def _order_lock(folder: Path, *, wait: float | None = None) -> AsyncIterator[None]:
    """One order at a time per ACME folder, across processes and replicas that share it
    (flock, released on exit even when the process dies). Held by another: AcmeError at once,
    or with `wait`, looked at again every LOCK_POLL_INTERVAL for up to `wait` seconds."""
    fd = _open_lock(folder)
    try:
        deadline = trio.current_time() + (wait or 0.0)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if wait is None or trio.current_time() >= deadline:
                    raise AcmeError(
                        "another dualproxy process is getting a certificate now"
                        f" ({folder / LOCK_FILE} is locked); try again in a minute"
                    ) from None
                await trio.sleep(LOCK_POLL_INTERVAL)
        yield
    finally:
        os.close(fd)


# --- renewal information (RFC 9773) -----------------------------------------------------------


def ari_certificate_id(cert: x509.Certificate) -> str:
    """RFC 9773 4.1: base64url(AKI keyIdentifier) "." base64url(DER serial number bytes)."""
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    if aki.key_identifier is None:
        raise ValueError("the certificate's AuthorityKeyIdentifier has no keyIdentifier")
    serial = cert.serial_number
    serial_bytes = serial.to_bytes((serial.bit_length() + 8) // 8, "big")
    return f"{b64url_encode(aki.key_identifier)}.{b64url_encode(serial_bytes)}"


def fetch_renewal_window(acme: AcmeConfig, cert: x509.Certificate) -> renewal.Window | None:
    """Blocking: the CA's suggested renewal window for `cert`, None when the CA offers no
    renewal information. Raises AcmeError-worthy exceptions (see `renewal_window`)."""
    net = _network(acme, None, jwa.RS256)
    try:
        directory = _directory(acme, net)
        try:
            base = directory["renewalInfo"]
        except KeyError:
            return None
        response = net.get(f"{base.rstrip('/')}/{ari_certificate_id(cert)}")
        info = messages.RenewalInfo.from_json(response.json())
        window = info.suggested_window
        return renewal.Window(window.start.astimezone(UTC), window.end.astimezone(UTC))
    finally:
        net.session.close()


async def renewal_window(acme: AcmeConfig, cert: x509.Certificate) -> renewal.Window | None:
    """The CA's renewal window, or None when it offers none or cannot be asked now (logged:
    the lifetime rule applies meanwhile)."""
    try:
        return await _blocking(fetch_renewal_window, acme, cert)
    except (AcmeError, ValueError, jose_errors.Error) as exc:
        log.warning("acme: no renewal information now (%s); using the lifetime rule", exc)
        return None


# --- which keys, when -------------------------------------------------------------------------


def read_leaf(key: KeyConfig) -> x509.Certificate | None:
    """The leaf of a key's chain file, None when there is none yet (or it is unreadable:
    obtaining a new one is then the fix)."""
    try:
        return x509.load_pem_x509_certificate(key.chain.read_bytes())
    except (OSError, ValueError):
        return None


def validity_of(cert: x509.Certificate | None) -> renewal.Validity | None:
    if cert is None:
        return None
    return renewal.Validity(cert.not_valid_before_utc, cert.not_valid_after_utc)


def retired(config: Config, name: str, now: datetime, *, window_closed: bool = False) -> bool:
    """A rotation's old key once its window is over is served to nobody: renewing it would only
    spend the CA's rate limits (`dualproxy acme issue` still can). A `close = "when-safe"`
    window is over once the evidence closed it (`window_closed`, a running server's record) or
    at grace_deadline: until then the old key may still be served, and is kept renewed."""
    rotation = config.rotation
    return (
        rotation is not None
        and name in rotation.old
        and policy.phase(rotation, now, window_closed=window_closed) == "after"
    )


def grace_start_for(config: Config, name: str) -> datetime | None:
    rotation = config.rotation
    return rotation.grace_start if rotation is not None and name in rotation.new else None


@contextlib.asynccontextmanager
async def responders_for(config: Config) -> AsyncIterator[ChallengeBoard | None]:
    """Answer challenges ourselves on the configured ports when no `serve` holds them."""
    acme = config.acme
    assert acme is not None
    board = ChallengeBoard(challenge_folder(acme))
    async with open_responders(
        acme.challenge, config.listen.addresses, acme.http_listen, board
    ) as bound:
        if not bound:
            log.info("acme: the challenge port is taken (a running serve?); it answers")
            yield None
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(board.watch, 0.2)
            yield board
            nursery.cancel_scope.cancel()


async def issue_keys(config: Config, keys: list[KeyConfig]) -> list[tuple[str, str | None]]:
    """Obtain chains for `keys` one after the other, answering challenges ourselves when we can
    bind the ports. Returns (key name, error or None) per key."""
    results: list[tuple[str, str | None]] = []
    async with responders_for(config) as board:
        for key in keys:
            try:
                await obtain(config, key, board=board)
            except (AcmeError, OperatorError) as exc:
                results.append((key.name, str(exc)))
            else:
                results.append((key.name, None))
    return results


async def due_keys(
    config: Config, now: datetime, *, force: bool = False
) -> list[tuple[KeyConfig, renewal.Plan]]:
    """Every ACME-managed key with its renewal plan; with `force` every one is due now."""
    acme = config.acme
    assert acme is not None
    policy = renewal.Policy.from_config(acme)
    out = []
    for key in config.acme_keys():
        if retired(config, key.name, now) and not force:
            continue
        leaf = await trio.to_thread.run_sync(read_leaf, key)
        window = await renewal_window(acme, leaf) if leaf is not None else None
        state = renewal.KeyState(
            validity=validity_of(leaf),
            window=window,
            point=random.random(),
            grace_start=grace_start_for(config, key.name),
        )
        plan = renewal.plan(state, policy, now)
        if force:
            plan = renewal.Plan(now, plan.reason, now, plan.urgency)
        out.append((key, plan))
    return out
