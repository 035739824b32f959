"""Certificates by ACME (RFC 8555): obtain one for the hostname and the
configured names, renew it at 2/3 of its lifetime, answer the CA's
challenges on our own listeners.

    CertificateManager   the service: checks the certificate at start and on a
                         timer, orders a new one when due, installs it where
                         [tls] certificate/private_key point (the TLS reloader
                         picks it up), retries failures with backoff
    http01_site          twisted.web Site for the `acme-http` listener (port 80):
                         GET /.well-known/acme-challenge/<token> (RFC 8555 §8.3)
    tls_alpn01_factory   TLS protocol factory for the `acme-tls` listener:
                         ALPN "acme-tls/1" and the validation certificate (RFC 8737)

Threads: certbot's `acme` library is synchronous (requests), so a whole order
runs in the thread pool (deferToThreadPool). The thread publishes what the
challenge listeners must answer in a `_ChallengeBoard` (a dict behind a lock)
before it tells the CA to validate, and withdraws it afterwards; the reactor
only looks values up there. Nothing in the thread waits for the reactor, so a
stopping reactor never strands an order thread.

Files, all in the directory of tls_config.certificate (<data_dir>/acme/,
mode 0700), each 0600, each written tmp -> fsync -> rename -> fsync dir:
    key.pem          the certificate's key (a new ECDSA P-256 key per order)
    cert.pem         the chain as the CA sent it, leaf first
    account-key.pem  the ACME account key (ECDSA P-256, ES256), made once
    account.json     {"version": 1, "directory": URL, "uri": account URL,
                      "contact": address}: the account is reused while the
                     directory URL stays the same

Metrics (plain attributes, read by whoever exports them):
    orders    int    orders started (due, forced or retried)
    renewals  int    certificates obtained and installed (the first one too)
    failures  int    orders that failed (the old certificate was kept)
    consecutive_failures  int   failures since the last success (drives the backoff)
    last_error  str | None      one line about the last failure; None after a success
    not_after   float | None    expiry of the installed certificate (Unix time)
    next_attempt float | None   clock time of the next check or retry
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import josepy as jose
import requests
from acme import challenges, client as acme_client, crypto_util, errors as acme_errors, messages
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID, NameOID
from OpenSSL import SSL
from twisted.application import service
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLServerConnectionCreator
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web import http, resource, server
from zope.interface import implementer

from mailgw.config_types import TLSConfig
from mailgw.durable import fsync_directory, write_private, write_private_tmp

log = Logger()

HTTP01 = "http-01"            # RFC 8555 §8.3
TLS_ALPN01 = "tls-alpn-01"    # RFC 8737 §3
CHALLENGE_PREFERENCE = (HTTP01, TLS_ALPN01)   # HTTP-01 first when both listeners exist

RENEW_FRACTION = 2 / 3        # renew once this much of notBefore..notAfter has passed

# RFC 8737 §3: the ALPN protocol name and the id-pe-acmeIdentifier extension.
ACME_TLS_ALPN = b"acme-tls/1"
ACME_IDENTIFIER_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")

# RFC 8555 §8.3: the path; §8.1: tokens are base64url without padding.
HTTP01_PREFIX = b"/.well-known/acme-challenge/"
_TOKEN = re.compile(rb"[A-Za-z0-9_-]{1,256}")

ACCOUNT_FORMAT_VERSION = 1
_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


class AcmeFailure(Exception):
    """An order that failed in an expected way (the CA said no, a challenge
    failed, a timeout): logged as one line, no traceback."""


class _Stopped(Exception):
    """The service stopped while an order was running."""


# Failures that are part of operating against a CA over a network: one log line.
EXPECTED_ERRORS = (AcmeFailure, acme_errors.Error, requests.RequestException, jose.errors.Error, OSError)


def backoff_delay(failures: int, initial: float, maximum: float) -> float:
    """Seconds before the next attempt after `failures` failures in a row (>= 1):
    initial, doubling each time, never more than maximum."""
    if failures < 1:
        return 0.0
    return min(initial * 2.0 ** min(failures - 1, 64), maximum)


# --- what the current certificate needs ------------------------------------------------------------

@dataclass(frozen=True)
class CertificateStatus:
    due: str | None             # why a new certificate is needed now; None: it is not
    renew_at: float | None      # Unix time at 2/3 of its lifetime (None: no usable certificate)
    not_after: float | None     # Unix time it expires
    serial: int | None = None


def certificate_status(pem: bytes | None, names, now: float) -> CertificateStatus:
    """Whether the certificate `pem` (the leaf first) must be replaced at Unix
    time `now`: missing or unreadable, the self-signed placeholder, not covering
    every name in `names`, or past RENEW_FRACTION of its lifetime."""
    if pem is None:
        return CertificateStatus("there is no certificate yet", None, None)
    found = _PEM_CERT.search(pem)
    if not found:
        return CertificateStatus("the certificate file holds no PEM certificate", None, None)
    try:
        leaf = x509.load_pem_x509_certificate(found.group(0))
    except ValueError:
        return CertificateStatus("the certificate file is not valid PEM", None, None)
    not_before = leaf.not_valid_before_utc.timestamp()
    not_after = leaf.not_valid_after_utc.timestamp()
    renew_at = not_before + (not_after - not_before) * RENEW_FRACTION
    if is_self_signed(leaf):
        return CertificateStatus("the certificate is the self-signed placeholder", renew_at, not_after, leaf.serial_number)
    missing = [name for name in names if name.lower() not in dns_names(leaf)]
    if missing:
        return CertificateStatus(f"the certificate does not cover {', '.join(missing)}", renew_at, not_after,
                                 leaf.serial_number)
    if now >= renew_at:
        expiry = datetime.datetime.fromtimestamp(not_after, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
        return CertificateStatus(f"the certificate is past 2/3 of its lifetime (expires {expiry})",
                                 renew_at, not_after, leaf.serial_number)
    return CertificateStatus(None, renew_at, not_after, leaf.serial_number)


def is_self_signed(certificate: x509.Certificate) -> bool:
    """Issued by itself: tls.ensure_certificate's placeholder (no CA issues those)."""
    if certificate.issuer != certificate.subject:
        return False
    try:
        certificate.verify_directly_issued_by(certificate)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


def dns_names(certificate: x509.Certificate) -> set[str]:
    """The dNSName entries of the subjectAltName, lower case."""
    try:
        extension = certificate.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    except x509.ExtensionNotFound:
        return set()
    return {name.lower() for name in extension.value.get_values_for_type(x509.DNSName)}


# --- files ------------------------------------------------------------------------------------------

def install_certificate(certificate_path: Path, key_path: Path, key_pem: bytes, chain_pem: bytes) -> None:
    """Write the key, then the chain, each 0600 and atomically (blocking).
    Both are complete on disk before either is renamed into place, and the
    two renames follow each other, so a reader sees a mismatched pair only
    between two system calls (and the reloader retries on a mismatch)."""
    directory = certificate_path.parent
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_tmp = write_private_tmp(key_path, key_pem)
    certificate_tmp = write_private_tmp(certificate_path, chain_pem)
    os.replace(key_tmp, key_path)
    os.replace(certificate_tmp, certificate_path)
    fsync_directory(directory)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def load_or_create_account_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The ACME account key at `path`, made (ECDSA P-256, 0600) when there is none."""
    data = _read(path)
    if data is not None:
        key = serialization.load_pem_private_key(data, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise AcmeFailure(f"{path}: the account key is not an ECDSA key")
        return key
    key = ec.generate_private_key(ec.SECP256R1())
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_private(path, _key_pem(key))
    return key


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


# --- challenges -------------------------------------------------------------------------------------

class _ChallengeBoard:
    """What the challenge listeners answer: written by the order thread,
    read by the reactor thread, a lock around every access."""

    def __init__(self):
        self._lock = threading.Lock()
        self._http: dict[str, bytes] = {}               # token -> key authorization
        self._tls: dict[str, SSL.Context] = {}           # DNS name -> context with its validation certificate

    def put_http(self, token: str, key_authorization: str) -> None:
        with self._lock:
            self._http[token] = key_authorization.encode("ascii")

    def drop_http(self, token: str) -> None:
        with self._lock:
            self._http.pop(token, None)

    def http(self, token: str) -> bytes | None:
        with self._lock:
            return self._http.get(token)

    def put_tls(self, name: str, context: SSL.Context) -> None:
        with self._lock:
            self._tls[name.lower()] = context

    def drop_tls(self, name: str) -> None:
        with self._lock:
            self._tls.pop(name.lower(), None)

    def tls(self, name: str) -> SSL.Context | None:
        with self._lock:
            return self._tls.get(name.lower())


class _NoAcmeProtocol(SSL.Error):
    """The client did not offer ALPN "acme-tls/1": the handshake fails."""


def select_acme_alpn(connection, offered: list[bytes]) -> bytes:
    """RFC 8737 §3: only "acme-tls/1" is negotiated; anything else is a fatal
    alert (pyOpenSSL turns an exception here into SSL_TLSEXT_ERR_ALERT_FATAL)."""
    if ACME_TLS_ALPN in offered:
        return ACME_TLS_ALPN
    # The args of an OpenSSL error queue, which twisted.protocols.tls reads: [(library, function, reason)].
    raise _NoAcmeProtocol([("SSL routines", "select_acme_alpn", "no application protocol: acme-tls/1 not offered")])


def tls_alpn01_certificate(name: str, key_authorization: str, *, now: datetime.datetime | None = None):
    """(certificate, key): RFC 8737 §3's self-signed validation certificate for
    `name`: subjectAltName dNSName = name, and the critical id-pe-acmeIdentifier
    extension whose value is the DER OCTET STRING of SHA-256(key authorization)."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ACME TLS-ALPN-01 validation")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        # Authorization ::= OCTET STRING (SIZE (32)): tag 0x04, length 0x20, the digest.
        .add_extension(x509.UnrecognizedExtension(ACME_IDENTIFIER_OID, b"\x04\x20" + digest), critical=True)
        .sign(key, hashes.SHA256())
    )
    return certificate, key


def _validation_context(certificate, key) -> SSL.Context:
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)     # RFC 8737 §4: TLS 1.2 or higher
    context.use_certificate(certificate)
    context.use_privatekey(key)
    context.set_alpn_select_callback(select_acme_alpn)
    return context


class _TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
    """The acme library no longer knows tls-alpn-01; the response body is `{}`
    as for every challenge (RFC 8555 §7.5.1). Not registered in the library."""
    typ = TLS_ALPN01


def _challenge_type(challenge_body) -> str:
    chall = challenge_body.chall
    if isinstance(chall, challenges.UnrecognizedChallenge):
        return str(chall.jobj.get("type", ""))
    return str(getattr(chall, "typ", ""))


def _thumbprint(account_key: jose.JWK) -> str:
    # RFC 8555 §8.1: keyAuthorization = token || '.' || base64url(Thumbprint(accountKey)), RFC 7638 SHA-256.
    return jose.b64encode(account_key.thumbprint(hash_function=hashes.SHA256)).decode()


# --- the service ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Installed:
    serial: int
    not_after: float
    names: tuple[str, ...]


class CertificateManager(service.Service):
    """Obtains and renews the [tls] certificate by ACME.

    tls_config    TLSConfig with acme on: certificate/private_key in <data_dir>/acme/,
                  acme_contact, acme_directory, acme_names (hostname first), acme_ca_file
    reactor       for deferToThreadPool (callFromThread)
    clock         IReactorTime: seconds() and callLater() for checks and retries
    threadpool    a started pool; one order holds one of its threads for up to
                  order_timeout seconds (a pool of its own, or the reactor's)
    on_installed  called (no arguments, in the reactor thread) after a new
                  certificate is on disk
    challenges    the types our listeners can answer: "http-01" (an acme-http
                  listener), "tls-alpn-01" (an acme-tls listener); HTTP-01 first
    retry_initial, retry_max   backoff after failures: retry_initial seconds,
                  doubling per failure in a row, at most retry_max
    check_period  seconds between checks of a certificate that is not due
    order_timeout seconds an order may take (authorizations and finalization)
    """

    def __init__(self, tls_config: TLSConfig, *, reactor, clock, threadpool, on_installed=None,
                 challenges=(HTTP01,), retry_initial: float = 300.0, retry_max: float = 86400.0,
                 check_period: float = 12 * 3600.0, order_timeout: float = 120.0):
        unknown = [kind for kind in challenges if kind not in CHALLENGE_PREFERENCE]
        if unknown or not challenges:
            raise ValueError(f"challenges: {', '.join(unknown) or 'none given'}; "
                             f"expected some of {', '.join(CHALLENGE_PREFERENCE)}")
        if not tls_config.acme_names:
            raise ValueError("tls.acme_names is empty: no name to order a certificate for")
        self.tls_config = tls_config
        self.names = tuple(name.lower() for name in tls_config.acme_names)
        self.challenge_types = tuple(kind for kind in CHALLENGE_PREFERENCE if kind in challenges)
        self.directory_path = tls_config.certificate.parent
        self.account_key_path = self.directory_path / "account-key.pem"
        self.account_path = self.directory_path / "account.json"
        self._reactor = reactor
        self._clock = clock
        self._threadpool = threadpool
        self._on_installed = on_installed
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.check_period = check_period
        self.order_timeout = order_timeout
        self.board = _ChallengeBoard()
        self.orders = 0
        self.renewals = 0
        self.failures = 0
        self.consecutive_failures = 0
        self.last_error: str | None = None
        self.not_after: float | None = None
        self.next_attempt: float | None = None
        self._timer = None
        self._forced = False            # a renew_now() not yet satisfied: retries force too
        self._busy: defer.Deferred | None = None   # the running order
        self._waiters: list[defer.Deferred] = []   # renew_now() callers waiting for it
        self._stopping = threading.Event()

    # -- the service

    def startService(self):
        super().startService()
        self._stopping.clear()
        self._check()

    def stopService(self):
        self._stopping.set()            # an order in its thread gives up at its next step
        self._cancel_timer()
        return super().stopService()

    def renew_now(self) -> defer.Deferred:
        """Order a certificate now, whatever the age of the current one. Fires
        with True when one was installed, False when the order failed (see
        last_error; a retry with backoff is scheduled, still forced). While an
        order is running, fires when that one ends."""
        if self._busy is not None:
            return self._waiter()
        self._forced = True
        return self._start("a renewal was asked for")

    # -- scheduling

    def _check(self) -> None:
        self._timer = None
        self.next_attempt = None
        if self._busy is not None or not self.running:
            return
        status = self._status()
        self.not_after = status.not_after
        if self._forced:
            self._start("a renewal was asked for (retry)")
        elif status.due:
            self._start(status.due)
        else:
            self._schedule(min(status.renew_at - self._clock.seconds(), self.check_period))

    def _schedule(self, delay: float) -> None:
        self._cancel_timer()
        if not self.running:
            return
        delay = max(0.0, delay)
        self.next_attempt = self._clock.seconds() + delay
        self._timer = self._clock.callLater(delay, self._check)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.next_attempt = None

    def _waiter(self) -> defer.Deferred:
        waiter = defer.Deferred()
        self._waiters.append(waiter)
        return waiter

    def _start(self, reason: str) -> defer.Deferred:
        self._cancel_timer()
        self.orders += 1
        log.info("acme: ordering a certificate for {names}: {reason}", names=", ".join(self.names), reason=reason)
        self._waiters = []
        result = self._waiter()
        self._busy = deferToThreadPool(self._reactor, self._threadpool, self._obtain)
        self._busy.addCallbacks(self._succeeded, self._failed)
        return result

    def _finish(self, outcome: bool, next_delay: float | None) -> None:
        """The order is over: schedule the next look, then tell the renew_now() callers."""
        waiters, self._waiters, self._busy = self._waiters, [], None
        if next_delay is not None:
            self._schedule(next_delay)
        for waiter in waiters:
            waiter.callback(outcome)

    def _succeeded(self, installed: _Installed) -> None:
        self.renewals += 1
        self.consecutive_failures = 0
        self.last_error = None
        self.not_after = installed.not_after
        self._forced = False
        expiry = datetime.datetime.fromtimestamp(installed.not_after, datetime.timezone.utc)
        log.info("acme: installed a certificate for {names} (serial {serial:x}, valid until {expiry}) at {path}",
                 names=", ".join(installed.names), serial=installed.serial,
                 expiry=expiry.strftime("%Y-%m-%d %H:%M:%SZ"), path=str(self.tls_config.certificate))
        if self._on_installed is not None:
            try:
                self._on_installed()
            except Exception:
                log.failure("acme: on_installed failed")
        self._finish(True, self._delay_after_install())

    def _status(self) -> CertificateStatus:
        try:
            pem = _read(self.tls_config.certificate)
        except OSError as error:     # EACCES and the like: order one, the install reports what is wrong
            return CertificateStatus(f"the certificate cannot be read: {error.strerror}", None, None)
        return certificate_status(pem, self.names, self._clock.seconds())

    def _delay_after_install(self) -> float:
        status = self._status()
        if status.due or status.renew_at is None:
            # Installed but due at once (a CA issuing very short lifetimes): back off, do not spin.
            return backoff_delay(1, self.retry_initial, self.retry_max)
        return min(status.renew_at - self._clock.seconds(), self.check_period)

    def _failed(self, failure) -> None:
        if failure.check(_Stopped):
            self._finish(False, None)
            return
        self.failures += 1
        self.consecutive_failures += 1
        delay = backoff_delay(self.consecutive_failures, self.retry_initial, self.retry_max)
        error = " ".join(str(failure.value).split()) or failure.type.__name__
        self.last_error = error
        if failure.check(*EXPECTED_ERRORS):
            log.error("acme: certificate order for {names} failed: {error}; keeping the current certificate; "
                      "next attempt in {delay:.0f}s (failure {count} in a row)",
                      names=", ".join(self.names), error=error, delay=delay, count=self.consecutive_failures)
        else:
            log.failure("acme: certificate order for {names} failed unexpectedly; keeping the current certificate; "
                        "next attempt in {delay:.0f}s (failure {count} in a row)", failure,
                        names=", ".join(self.names), delay=delay, count=self.consecutive_failures)
        self._finish(False, delay)

    # -- the order, in a pool thread

    def _obtain(self) -> _Installed:
        deadline = time.monotonic() + self.order_timeout
        account = _Account(self)
        key = ec.generate_private_key(ec.SECP256R1())   # a new key per order
        key_pem = _key_pem(key)
        csr_pem = crypto_util.make_csr(key_pem, list(self.names))
        order = account.new_order(csr_pem)
        published: list[tuple[str, str]] = []
        try:
            waiting = []
            for authorization in order.authorizations:
                name = authorization.body.identifier.value
                status = authorization.body.status
                if status == messages.STATUS_VALID:
                    continue                 # RFC 8555 §7.1.3: reused, nothing to prove
                if status != messages.STATUS_PENDING:
                    raise AcmeFailure(f"{name}: the authorization is {status}")
                challenge, kind = self._choose(authorization)
                response = self._publish(kind, challenge, name, account.key, published)
                self._step()
                account.client.answer_challenge(challenge, response)
                waiting.append((authorization, kind))
            for authorization, kind in waiting:
                self._wait_valid(account.client, authorization, kind, deadline)
            self._step()
            remaining = max(1.0, deadline - time.monotonic())
            order = account.client.finalize_order(
                order, datetime.datetime.now() + datetime.timedelta(seconds=remaining))
        finally:
            for kind, handle in published:
                if kind == HTTP01:
                    self.board.drop_http(handle)
                else:
                    self.board.drop_tls(handle)
        chain_pem = order.fullchain_pem.encode("ascii")
        installed = self._checked_chain(chain_pem, key)
        install_certificate(self.tls_config.certificate, self.tls_config.private_key, key_pem, chain_pem)
        return installed

    def _step(self) -> None:
        if self._stopping.is_set():
            raise _Stopped()

    def _choose(self, authorization):
        offered = {_challenge_type(challenge): challenge for challenge in authorization.body.challenges}
        for kind in self.challenge_types:
            if kind in offered:
                return offered[kind], kind
        name = authorization.body.identifier.value
        raise AcmeFailure(f"{name}: the CA offers {', '.join(sorted(offered)) or 'no challenges'}, "
                          f"we answer {', '.join(self.challenge_types)}")

    def _publish(self, kind: str, challenge, name: str, account_key: jose.JWK, published: list):
        """Put the answer on the board before the CA is told to look (RFC 8555 §7.5.1)."""
        if kind == HTTP01:
            token = challenge.chall.encode("token")
            self.board.put_http(token, challenge.chall.key_authorization(account_key))
            published.append((HTTP01, token))
            return challenge.chall.response(account_key)
        token = str(challenge.chall.jobj.get("token", ""))
        if not _TOKEN.fullmatch(token.encode("ascii", "replace")):
            raise AcmeFailure(f"{name}: tls-alpn-01 challenge without a usable token")
        key_authorization = f"{token}.{_thumbprint(account_key)}"
        certificate, key = tls_alpn01_certificate(name, key_authorization)
        self.board.put_tls(name, _validation_context(certificate, key))
        published.append((TLS_ALPN01, name))
        return _TLSALPN01Response(key_authorization=key_authorization)

    def _wait_valid(self, client, authorization, kind: str, deadline: float) -> None:
        name = authorization.body.identifier.value
        pause = 0.2
        while True:
            authorization, _ = client.poll(authorization)
            status = authorization.body.status
            if status == messages.STATUS_VALID:
                return
            if status not in (messages.STATUS_PENDING, messages.STATUS_PROCESSING):
                problems = [challenge.error for challenge in authorization.body.challenges
                            if challenge.error is not None]
                detail = "; ".join(_problem_text(problem) for problem in problems) or f"authorization {status}"
                raise AcmeFailure(f"{name}: {kind} challenge failed: {detail}")
            if time.monotonic() + pause > deadline:
                raise AcmeFailure(f"{name}: {kind} challenge not validated within {self.order_timeout:.0f}s")
            if self._stopping.wait(pause):
                raise _Stopped()
            pause = min(pause * 2, 2.0)

    def _checked_chain(self, chain_pem: bytes, key) -> _Installed:
        """The CA's chain must start with a certificate for our key and names."""
        pems = _PEM_CERT.findall(chain_pem)
        if not pems:
            raise AcmeFailure("the CA sent no PEM certificate")
        leaf = x509.load_pem_x509_certificate(pems[0])
        ours = key.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
        theirs = leaf.public_key().public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
        if ours != theirs:
            raise AcmeFailure("the CA's certificate is not for the key we sent")
        missing = [name for name in self.names if name not in dns_names(leaf)]
        if missing:
            raise AcmeFailure(f"the CA's certificate does not cover {', '.join(missing)}")
        return _Installed(leaf.serial_number, leaf.not_valid_after_utc.timestamp(), self.names)


def _problem_text(problem) -> str:
    code = problem.code or str(problem.typ)
    return " ".join(f"{code}: {problem.detail or problem.description or ''}".split())


class _Account:
    """The ACME client with our account (in the order thread): the key from
    account-key.pem, the account URL from account.json when it is for the
    same directory, else registered (RFC 8555 §7.3) and saved."""

    def __init__(self, manager: CertificateManager):
        self.manager = manager
        tls = manager.tls_config
        private = load_or_create_account_key(manager.account_key_path)
        self.key = jose.JWKEC(key=private)
        verify = str(tls.acme_ca_file) if tls.acme_ca_file else True    # else the system store
        self.net = acme_client.ClientNetwork(self.key, alg=jose.ES256, verify_ssl=verify,
                                             user_agent="mailgw (acme-python)", timeout=30)
        directory = acme_client.ClientV2.get_directory(tls.acme_directory, self.net)
        self.client = acme_client.ClientV2(directory, self.net)
        saved = self._saved()
        if saved:
            self.net.account = messages.RegistrationResource(uri=saved, body=messages.Registration())
            self.from_file = True
        else:
            self._register()
            self.from_file = False

    def _saved(self) -> str | None:
        data = _read(self.manager.account_path)
        if data is None:
            return None
        try:
            record = json.loads(data)
        except ValueError:
            return None
        if (not isinstance(record, dict) or record.get("version") != ACCOUNT_FORMAT_VERSION
                or record.get("directory") != self.manager.tls_config.acme_directory):
            return None
        uri = record.get("uri")
        return uri if isinstance(uri, str) and uri.startswith("https://") else None

    def _register(self) -> None:
        tls = self.manager.tls_config
        # Setting tls.acme = true is the operator's agreement to the CA's terms (RFC 8555 §7.3).
        registration = messages.NewRegistration.from_data(email=tls.acme_contact, terms_of_service_agreed=True)
        try:
            account = self.client.new_account(registration)
            uri = account.uri
        except acme_errors.ConflictError as existing:     # this key has an account already: §7.3.1
            uri = existing.location
            self.net.account = messages.RegistrationResource(uri=uri, body=messages.Registration())
        record = {"version": ACCOUNT_FORMAT_VERSION, "directory": tls.acme_directory, "uri": uri,
                  "contact": tls.acme_contact}
        write_private(self.manager.account_path, json.dumps(record, indent=2).encode() + b"\n")
        log.info("acme: using account {uri} at {directory}", uri=uri, directory=tls.acme_directory)

    def new_order(self, csr_pem: bytes):
        try:
            return self.client.new_order(csr_pem)
        except messages.Error as error:
            # The CA forgot the saved account (a test CA restarted, an account deactivated): register again.
            if not self.from_file or error.code not in ("accountDoesNotExist", "unauthorized"):
                raise
        self.net.account = None
        self._register()
        self.from_file = False
        return self.client.new_order(csr_pem)


# --- HTTP-01: the acme-http listener ----------------------------------------------------------------

class HTTP01Resource(resource.Resource):
    """RFC 8555 §8.3: GET /.well-known/acme-challenge/<token> answers the key
    authorization; every other request is 404 (nothing else lives on port 80)."""

    isLeaf = True

    def __init__(self, board: _ChallengeBoard):
        super().__init__()
        self._board = board

    def render(self, request):
        value = None
        if request.method in (b"GET", b"HEAD") and request.path.startswith(HTTP01_PREFIX):
            token = request.path[len(HTTP01_PREFIX):]
            if _TOKEN.fullmatch(token):
                value = self._board.http(token.decode("ascii"))
        if value is None:
            request.setResponseCode(http.NOT_FOUND)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"not found\n"
        request.setHeader(b"content-type", b"application/octet-stream")
        return value


class _OneRequestChannel(http.HTTPChannel):
    """One request per connection: a validation server asks once and goes; nothing stays open."""

    def checkPersistence(self, request, version):
        request.responseHeaders.setRawHeaders(b"connection", [b"close"])
        return False


def http01_site(manager: CertificateManager) -> server.Site:
    """The Site for the `acme-http` listener."""
    site = server.Site(HTTP01Resource(manager.board), timeout=30)
    site.protocol = _OneRequestChannel
    site.noisy = False
    site.displayTracebacks = False
    return site


# --- TLS-ALPN-01: the acme-tls listener -------------------------------------------------------------

@implementer(IOpenSSLServerConnectionCreator)
class _ValidationConnections:
    """A connection starts without a certificate; the SNI callback switches it to
    the validation context for that name when an order is waiting for it. No
    SNI, an unknown name, or no ALPN "acme-tls/1": the handshake fails."""

    def __init__(self, board: _ChallengeBoard):
        self._board = board
        self._context = SSL.Context(SSL.TLS_SERVER_METHOD)
        self._context.set_min_proto_version(SSL.TLS1_2_VERSION)
        self._context.set_tlsext_servername_callback(self._servername)
        self._context.set_alpn_select_callback(select_acme_alpn)

    def _servername(self, connection) -> None:
        name = connection.get_servername()
        if not name:
            return
        context = self._board.tls(name.decode("ascii", "replace"))
        if context is not None:
            connection.set_context(context)

    def serverConnectionForTLS(self, tls_protocol):
        return SSL.Connection(self._context, None)


@implementer(IHandshakeListener)
class _ValidationProbe(protocol.Protocol):
    """The CA's side of RFC 8737 ends with the handshake: close then. A
    client that completed it without negotiating acme-tls/1 (it sent no ALPN
    at all, so the ALPN callback never ran) is cut off at once."""

    def __init__(self, clock, timeout: float):
        self._clock = clock
        self._timeout = timeout
        self._timer = None

    def connectionMade(self):
        self._timer = self._clock.callLater(self._timeout, self.transport.abortConnection)

    def handshakeCompleted(self):
        if getattr(self.transport, "negotiatedProtocol", None) == ACME_TLS_ALPN:
            self.transport.loseConnection()
        else:
            self.transport.abortConnection()

    def dataReceived(self, data):
        self.transport.abortConnection()     # nothing is spoken on acme-tls/1

    def connectionLost(self, reason):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class _ValidationProbeFactory(protocol.Factory):
    noisy = False

    def __init__(self, clock, timeout: float):
        self._clock = clock
        self._timeout = timeout

    def buildProtocol(self, addr):
        return _ValidationProbe(self._clock, self._timeout)


def tls_alpn01_factory(manager: CertificateManager, *, handshake_timeout: float = 10.0) -> TLSMemoryBIOFactory:
    """The protocol factory for the `acme-tls` listener (plain TCP port: TLS is done here)."""
    factory = TLSMemoryBIOFactory(_ValidationConnections(manager.board), False,
                                  _ValidationProbeFactory(manager._clock, handshake_timeout))
    factory.noisy = False
    return factory
