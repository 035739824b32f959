"""mailgw.acme_certs without a CA: when a certificate is due (placeholder,
names, 2/3 of its lifetime), the schedule and its backoff on a task.Clock,
the files and their modes, the HTTP-01 resource, and the TLS-ALPN-01
handshake (ALPN selection, SNI, the validation certificate) in memory.
The order itself (the acme library against a CA) is tests/e2e/test_acme_pebble.py."""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet import defer, protocol, task
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLClientConnectionCreator
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import implementer

from mailgw import acme_certs
from mailgw.acme_certs import (ACME_IDENTIFIER_OID, ACME_TLS_ALPN, AcmeFailure, CertificateManager, _Installed,
                               backoff_delay, certificate_status, http01_site, install_certificate,
                               load_or_create_account_key, select_acme_alpn, tls_alpn01_certificate,
                               tls_alpn01_factory)
from mailgw.config_types import TLSConfig
from mailgw.tls import ensure_certificate
from threadless import ImmediatePool, ThreadlessClock

NAMES = ("mx.example.test", "mail.example.test")
DAY = 86400.0
START = 1_900_000_000.0          # the clock's "now" (2030), Unix time


# --- helpers -----------------------------------------------------------------------------------------

class HeldPool:
    """Runs a call only when the test says so: an order that is still running."""

    def __init__(self):
        self.calls = []

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        self.calls.append((on_result, f))

    def run_next(self):
        on_result, f = self.calls.pop(0)
        ImmediatePool().callInThreadWithCallback(on_result, f)


class CA:
    def __init__(self):
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "unit test CA")])

    def issue(self, names, not_before: float, lifetime: float):
        """(chain PEM, key PEM, certificate) for `names`, valid from not_before for lifetime seconds."""
        key = ec.generate_private_key(ec.SECP256R1())
        start = datetime.datetime.fromtimestamp(not_before, datetime.timezone.utc)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + datetime.timedelta(seconds=lifetime))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name) for name in names]), critical=False)
            .sign(self.key, hashes.SHA256()))
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return certificate.public_bytes(serialization.Encoding.PEM), key_pem, certificate


def tls_config(tmp_path, names=NAMES) -> TLSConfig:
    acme_dir = tmp_path / "data" / "acme"
    return TLSConfig(certificate=acme_dir / "cert.pem", private_key=acme_dir / "key.pem", generated=True,
                     min_version="TLSv1.2", acme=True, acme_contact="postmaster@example.test",
                     acme_directory="https://acme.example.test/dir", acme_names=names)


def make_manager(tmp_path, *, pool=None, obtain=None, **kwargs):
    clock = task.Clock()
    clock.advance(START)
    tls = tls_config(tmp_path)
    manager = CertificateManager(tls, reactor=ThreadlessClock(), clock=clock, threadpool=pool or ImmediatePool(),
                                 **kwargs)
    if obtain is not None:
        manager._obtain = obtain          # the order: tested against pebble in tests/e2e
    return manager, tls, clock


class FakeOrders:
    """Stands in for the order thread: installs a certificate from `ca` or raises."""

    def __init__(self, manager, ca, lifetime=90 * DAY):
        self.manager, self.ca, self.lifetime = manager, ca, lifetime
        self.fail_with = None
        self.calls = 0

    def __call__(self):
        self.calls += 1
        if self.fail_with is not None:
            raise self.fail_with
        now = self.manager._clock.seconds()
        chain, key_pem, certificate = self.ca.issue(NAMES, now, self.lifetime)
        tls = self.manager.tls_config
        install_certificate(tls.certificate, tls.private_key, key_pem, chain)
        return _Installed(certificate.serial_number, certificate.not_valid_after_utc.timestamp(), NAMES)


def install(tls, ca, names=NAMES, not_before=START, lifetime=90 * DAY):
    chain, key_pem, certificate = ca.issue(names, not_before, lifetime)
    install_certificate(tls.certificate, tls.private_key, key_pem, chain)
    return certificate


# --- backoff arithmetic ----------------------------------------------------------------------------

def test_backoff_doubles_from_the_initial_delay_up_to_the_maximum():
    delays = [backoff_delay(n, 300.0, 86400.0) for n in range(1, 12)]
    assert delays[:6] == [300.0, 600.0, 1200.0, 2400.0, 4800.0, 9600.0]
    assert delays[8] == 76800.0
    assert delays[9:] == [86400.0, 86400.0]
    assert backoff_delay(10_000, 300.0, 86400.0) == 86400.0        # no overflow
    assert backoff_delay(0, 300.0, 86400.0) == 0.0


# --- when a certificate is due ------------------------------------------------------------------

def test_the_self_signed_placeholder_is_due(tmp_path):
    tls = tls_config(tmp_path)
    ensure_certificate(tls, NAMES[0], now=datetime.datetime.fromtimestamp(START, datetime.timezone.utc))
    status = certificate_status(tls.certificate.read_bytes(), NAMES, START)
    assert status.due == "the certificate is the self-signed placeholder"


def test_no_certificate_or_garbage_is_due():
    assert certificate_status(None, NAMES, START).due == "there is no certificate yet"
    assert "no PEM" in certificate_status(b"junk", NAMES, START).due
    broken = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    assert "not valid PEM" in certificate_status(broken, NAMES, START).due


def test_a_certificate_missing_a_configured_name_is_due():
    chain, _, _ = CA().issue(["mx.example.test"], START, 90 * DAY)
    assert certificate_status(chain, NAMES, START).due == "the certificate does not cover mail.example.test"
    # Names compare case-insensitively; more names than configured is fine.
    chain, _, _ = CA().issue(["MX.example.test", "Mail.Example.Test", "extra.example.test"], START, 90 * DAY)
    assert certificate_status(chain, NAMES, START).due is None


def test_a_certificate_is_due_at_two_thirds_of_its_lifetime():
    chain, _, certificate = CA().issue(NAMES, START, 90 * DAY)
    renew_at = START + 60 * DAY
    status = certificate_status(chain, NAMES, START + DAY)
    assert status.due is None
    assert status.renew_at == renew_at
    assert status.not_after == START + 90 * DAY
    assert status.serial == certificate.serial_number
    assert certificate_status(chain, NAMES, renew_at - 1).due is None
    assert "past 2/3 of its lifetime" in certificate_status(chain, NAMES, renew_at).due


# --- the schedule on a Clock ---------------------------------------------------------------------

def test_a_fresh_certificate_is_looked_at_again_at_two_thirds_of_its_lifetime(tmp_path):
    manager, tls, clock = make_manager(tmp_path, check_period=365 * DAY)
    ca = CA()
    install(tls, ca, not_before=START, lifetime=90 * DAY)
    orders = manager._obtain = FakeOrders(manager, ca)
    manager.startService()
    assert (manager.orders, orders.calls) == (0, 0)
    assert manager.next_attempt == START + 60 * DAY
    assert manager.not_after == START + 90 * DAY
    clock.advance(60 * DAY - 1)
    assert orders.calls == 0
    clock.advance(1)
    assert (manager.orders, manager.renewals, orders.calls) == (1, 1, 1)
    # The new certificate starts at the clock's now: the next look is 60 days on.
    assert manager.next_attempt == clock.seconds() + 60 * DAY
    manager.stopService()
    assert clock.getDelayedCalls() == []


def test_the_periodic_check_comes_first_when_renewal_is_far(tmp_path):
    manager, tls, clock = make_manager(tmp_path, check_period=DAY)
    ca = CA()
    install(tls, ca)
    manager._obtain = FakeOrders(manager, ca)
    manager.startService()
    assert manager.next_attempt == START + DAY
    clock.advance(DAY)
    assert manager.orders == 0 and manager.next_attempt == START + 2 * DAY
    manager.stopService()


def test_the_placeholder_is_replaced_at_start_and_on_installed_is_called(tmp_path):
    installed = []
    manager, tls, clock = make_manager(tmp_path, on_installed=lambda: installed.append(tls.certificate.read_bytes()))
    ensure_certificate(tls, NAMES[0])
    manager._obtain = FakeOrders(manager, CA())
    manager.startService()
    assert (manager.orders, manager.renewals, manager.failures) == (1, 1, 0)
    assert installed == [tls.certificate.read_bytes()]
    assert certificate_status(tls.certificate.read_bytes(), NAMES, clock.seconds()).due is None
    manager.stopService()


def test_failures_keep_the_certificate_and_back_off_until_a_success(tmp_path):
    manager, tls, clock = make_manager(tmp_path, retry_initial=300.0, retry_max=1000.0)
    ensure_certificate(tls, NAMES[0])
    placeholder = tls.certificate.read_bytes(), tls.private_key.read_bytes()
    orders = manager._obtain = FakeOrders(manager, CA())
    orders.fail_with = AcmeFailure("mx.example.test: http-01 challenge failed: unauthorized: wrong answer")
    with capturedLogs() as events:
        manager.startService()
    assert (manager.orders, manager.failures, manager.consecutive_failures) == (1, 1, 1)
    assert manager.last_error == "mx.example.test: http-01 challenge failed: unauthorized: wrong answer"
    assert (tls.certificate.read_bytes(), tls.private_key.read_bytes()) == placeholder
    [line] = [event for event in events if event.get("log_level").name == "error"]
    assert "log_failure" not in line                    # an expected failure: one line, no traceback
    delays = []
    for _ in range(4):
        delays.append(manager.next_attempt - clock.seconds())
        clock.advance(delays[-1])
    assert delays == [300.0, 600.0, 1000.0, 1000.0]
    assert manager.failures == 5
    orders.fail_with = None
    clock.advance(manager.next_attempt - clock.seconds())
    assert (manager.renewals, manager.consecutive_failures, manager.last_error) == (1, 0, None)
    assert manager.next_attempt - clock.seconds() == min(60 * DAY, manager.check_period)
    manager.stopService()


def test_an_unexpected_error_is_logged_with_its_traceback_and_retried(tmp_path):
    manager, tls, clock = make_manager(tmp_path)
    ensure_certificate(tls, NAMES[0])
    orders = manager._obtain = FakeOrders(manager, CA())
    orders.fail_with = ZeroDivisionError("a bug")
    with capturedLogs() as events:
        manager.startService()
    assert [event for event in events if "log_failure" in event]
    assert manager.failures == 1 and manager.last_error == "a bug"
    assert manager.next_attempt == clock.seconds() + 300.0
    manager.stopService()


def test_renew_now_orders_a_fresh_certificate_and_a_failed_one_is_retried_forced(tmp_path):
    manager, tls, clock = make_manager(tmp_path)
    ca = CA()
    first = install(tls, ca)
    orders = manager._obtain = FakeOrders(manager, ca)
    manager.startService()
    assert orders.calls == 0
    results = []
    manager.renew_now().addCallback(results.append)
    assert results == [True] and orders.calls == 1
    assert x509.load_pem_x509_certificate(tls.certificate.read_bytes()).serial_number != first.serial_number
    orders.fail_with = AcmeFailure("no")
    manager.renew_now().addCallback(results.append)
    assert results == [True, False]
    # The certificate is not due, but the retry still orders: the renewal was asked for.
    clock.advance(300.0)
    assert orders.calls == 3
    orders.fail_with = None
    clock.advance(600.0)
    assert orders.calls == 4 and manager.renewals == 2
    clock.advance(manager.next_attempt - clock.seconds())    # not forced any more: only a look
    assert orders.calls == 4
    manager.stopService()


def test_renew_now_during_an_order_waits_for_it(tmp_path):
    pool = HeldPool()
    manager, tls, clock = make_manager(tmp_path, pool=pool)
    ensure_certificate(tls, NAMES[0])
    manager._obtain = FakeOrders(manager, CA())
    manager.startService()
    assert manager.orders == 1 and len(pool.calls) == 1
    results = []
    manager.renew_now().addCallback(results.append)
    manager.renew_now().addCallback(results.append)
    assert manager.orders == 1 and results == []
    pool.run_next()
    assert results == [True, True] and pool.calls == []
    manager.stopService()


def test_an_order_ended_by_stopping_is_not_a_failure(tmp_path):
    pool = HeldPool()
    manager, tls, clock = make_manager(tmp_path, pool=pool)
    ensure_certificate(tls, NAMES[0])

    def obtain():
        manager._step()               # what the order thread does between steps
    manager._obtain = obtain
    manager.startService()
    manager.stopService()
    pool.run_next()
    assert (manager.failures, manager.renewals) == (0, 0)
    assert manager.next_attempt is None and clock.getDelayedCalls() == []


def test_the_constructor_refuses_what_it_cannot_do(tmp_path):
    with pytest.raises(ValueError, match="dns-01"):
        make_manager(tmp_path, challenges=("dns-01",))
    with pytest.raises(ValueError, match="none given"):
        make_manager(tmp_path, challenges=())
    with pytest.raises(ValueError, match="acme_names"):
        CertificateManager(tls_config(tmp_path, names=()), reactor=ThreadlessClock(), clock=task.Clock(),
                           threadpool=ImmediatePool())


# --- which challenge -------------------------------------------------------------------------------

class Challenge:
    def __init__(self, kind):
        self.chall = acme_certs.challenges.UnrecognizedChallenge({"type": kind, "token": "abc"})


class Authorization:
    def __init__(self, *kinds):
        identifier = type("Identifier", (), {"value": "mx.example.test"})()
        self.body = type("Body", (), {"challenges": [Challenge(kind) for kind in kinds], "identifier": identifier})()


def test_http01_is_preferred_when_both_listeners_exist(tmp_path):
    manager, _, _ = make_manager(tmp_path, challenges=("tls-alpn-01", "http-01"))
    assert manager.challenge_types == ("http-01", "tls-alpn-01")
    assert manager._choose(Authorization("dns-01", "tls-alpn-01", "http-01"))[1] == "http-01"
    assert manager._choose(Authorization("dns-01", "tls-alpn-01"))[1] == "tls-alpn-01"


def test_an_authorization_without_a_challenge_we_answer_fails_clearly(tmp_path):
    manager, _, _ = make_manager(tmp_path, challenges=("tls-alpn-01",))
    with pytest.raises(AcmeFailure, match="offers dns-01, http-01, we answer tls-alpn-01"):
        manager._choose(Authorization("http-01", "dns-01"))


# --- files -----------------------------------------------------------------------------------------

def test_key_and_chain_are_written_0600_atomically(tmp_path):
    tls = tls_config(tmp_path)
    tls.certificate.parent.mkdir(parents=True)
    stale = tls.certificate.with_name("cert.pem.tmp")
    stale.write_bytes(b"half a certificate from a crash")
    os.chmod(stale, 0o644)
    install_certificate(tls.certificate, tls.private_key, b"KEY", b"CHAIN")
    assert tls.private_key.read_bytes() == b"KEY" and tls.certificate.read_bytes() == b"CHAIN"
    for path in (tls.certificate, tls.private_key):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tls.certificate.parent.iterdir()) == ["cert.pem", "key.pem"]


def test_install_makes_the_directory_0700(tmp_path):
    tls = tls_config(tmp_path)
    install_certificate(tls.certificate, tls.private_key, b"KEY", b"CHAIN")
    assert stat.S_IMODE(tls.certificate.parent.stat().st_mode) == 0o700


def test_the_account_key_is_made_once_0600_and_reused(tmp_path):
    path = tmp_path / "acme" / "account-key.pem"
    key = load_or_create_account_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = load_or_create_account_key(path)
    assert again.private_numbers() == key.private_numbers()


def test_the_saved_account_is_used_only_for_its_directory(tmp_path):
    manager, tls, _ = make_manager(tmp_path)
    account = acme_certs._Account.__new__(acme_certs._Account)    # without the network part
    account.manager = manager
    assert account._saved() is None
    record = {"version": 1, "directory": tls.acme_directory, "uri": "https://acme.example.test/acct/1"}
    manager.account_path.parent.mkdir(parents=True)
    manager.account_path.write_text(json.dumps(record))
    assert account._saved() == "https://acme.example.test/acct/1"
    manager.account_path.write_text(json.dumps(dict(record, directory="https://other.example/dir")))
    assert account._saved() is None
    manager.account_path.write_text("{not json")
    assert account._saved() is None


# --- HTTP-01 -----------------------------------------------------------------------------------------

def render(site, path: bytes, method: bytes = b"GET"):
    request = DummyRequest(path.lstrip(b"/").split(b"/"))
    request.method = method
    request.path = path
    body = site.resource.render(request)
    return request.responseCode or 200, request.responseHeaders.getRawHeaders(b"content-type")[0], body


def test_http01_answers_the_key_authorization_of_a_published_token(tmp_path):
    manager, _, _ = make_manager(tmp_path)
    site = http01_site(manager)
    token = "Xy_-0123456789abcdefghij"
    manager.board.put_http(token, f"{token}.thumbprint")
    path = b"/.well-known/acme-challenge/" + token.encode()
    assert render(site, path) == (200, b"application/octet-stream", f"{token}.thumbprint".encode())
    assert render(site, path, b"HEAD")[0] == 200
    manager.board.drop_http(token)
    assert render(site, path)[0] == 404


@pytest.mark.parametrize("path", [b"/", b"/.well-known/acme-challenge/", b"/.well-known/acme-challenge/unknown",
                                  b"/.well-known/acme-challenge/a/b", b"/.well-known/acme-challenge/..%2f",
                                  b"/index.html"])
def test_http01_is_404_for_everything_else(tmp_path, path):
    manager, _, _ = make_manager(tmp_path)
    manager.board.put_http("known", "known.thumbprint")
    assert render(http01_site(manager), path)[0] == 404


def test_http01_refuses_other_methods_and_closes_each_connection(tmp_path):
    manager, _, _ = make_manager(tmp_path)
    manager.board.put_http("tok", "tok.thumb")
    assert render(http01_site(manager), b"/.well-known/acme-challenge/tok", b"POST")[0] == 404
    site = http01_site(manager)
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"GET /.well-known/acme-challenge/tok HTTP/1.1\r\nHost: mx.example.test\r\n\r\n")
    reply = transport.value()
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert b"\r\nconnection: close\r\n" in reply.lower()
    assert reply.endswith(b"\r\n\r\ntok.thumb")
    assert transport.disconnecting
    channel.connectionLost(None)


# --- TLS-ALPN-01 -------------------------------------------------------------------------------------

def test_only_the_acme_alpn_protocol_is_selected():
    assert select_acme_alpn(None, [b"h2", ACME_TLS_ALPN]) == ACME_TLS_ALPN
    with pytest.raises(SSL.Error):
        select_acme_alpn(None, [b"h2", b"http/1.1"])
    with pytest.raises(SSL.Error):
        select_acme_alpn(None, [])


def test_the_validation_certificate_follows_rfc_8737():
    certificate, key = tls_alpn01_certificate("mx.example.test", "token.thumbprint")
    extension = certificate.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
    assert extension.critical
    assert extension.value.value == b"\x04\x20" + hashlib.sha256(b"token.thumbprint").digest()
    assert acme_certs.dns_names(certificate) == {"mx.example.test"}
    assert certificate.public_key().public_numbers() == key.public_key().public_numbers()


def handshake(server: SSL.Connection, client: SSL.Connection, rounds: int = 20) -> None:
    """Drive both ends over memory BIOs until both are done (or one raises SSL.Error)."""
    server.set_accept_state()
    client.set_connect_state()
    done = {"client": False, "server": False}
    for _ in range(rounds):
        for side, connection, peer in (("client", client, server), ("server", server, client)):
            if not done[side]:
                try:
                    connection.do_handshake()
                    done[side] = True
                except SSL.WantReadError:
                    pass
            try:
                data = connection.bio_read(65536)
            except SSL.WantReadError:
                data = b""
            if data:
                peer.bio_write(data)
        if all(done.values()):
            return
    raise AssertionError("handshake did not finish")


def client_connection(name: bytes | None, protocols):
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    if protocols:
        context.set_alpn_protos(protocols)
    connection = SSL.Connection(context, None)
    if name:
        connection.set_tlsext_host_name(name)
    return connection


@pytest.fixture
def validation(tmp_path):
    manager, _, _ = make_manager(tmp_path, challenges=("tls-alpn-01",))
    certificate, key = tls_alpn01_certificate("mx.example.test", "token.thumbprint")
    manager.board.put_tls("mx.example.test", acme_certs._validation_context(certificate, key))
    creator = acme_certs._ValidationConnections(manager.board)      # what tls_alpn01_factory wraps
    return manager, creator, certificate


def test_the_validation_certificate_is_served_for_its_name_with_acme_alpn(validation):
    _, creator, certificate = validation
    server = creator.serverConnectionForTLS(None)
    client = client_connection(b"MX.example.test", [ACME_TLS_ALPN])
    handshake(server, client)
    assert client.get_alpn_proto_negotiated() == ACME_TLS_ALPN
    assert client.get_peer_certificate(as_cryptography=True) == certificate


@pytest.mark.parametrize("name, protocols", [
    (b"mx.example.test", [b"h2", b"http/1.1"]),   # another ALPN: fatal alert in the handshake
    (b"other.example.test", [ACME_TLS_ALPN]),     # no validation waiting for this name: no certificate
    (None, [ACME_TLS_ALPN]),                      # no SNI
])
def test_other_handshakes_fail(validation, name, protocols):
    _, creator, _ = validation
    with pytest.raises(SSL.Error):
        handshake(creator.serverConnectionForTLS(None), client_connection(name, protocols))


def test_a_withdrawn_validation_is_not_served(validation):
    manager, creator, _ = validation
    manager.board.drop_tls("mx.example.test")
    with pytest.raises(SSL.Error):
        handshake(creator.serverConnectionForTLS(None), client_connection(b"mx.example.test", [ACME_TLS_ALPN]))


class ProbeTransport(StringTransport):
    def __init__(self, negotiated):
        super().__init__()
        self.negotiatedProtocol = negotiated
        self.aborted = False

    def abortConnection(self):
        self.aborted = True


@pytest.mark.parametrize("negotiated, aborted", [(ACME_TLS_ALPN, False), (None, True)])
def test_the_probe_closes_after_the_handshake(negotiated, aborted):
    clock = task.Clock()
    probe = acme_certs._ValidationProbe(clock, 10.0)
    transport = ProbeTransport(negotiated)
    probe.makeConnection(transport)
    probe.handshakeCompleted()
    assert (transport.disconnecting, transport.aborted) == (not aborted, aborted)
    probe.connectionLost(None)
    assert clock.getDelayedCalls() == []


def test_the_probe_drops_a_silent_connection():
    clock = task.Clock()
    probe = acme_certs._ValidationProbe(clock, 10.0)
    transport = ProbeTransport(None)
    probe.makeConnection(transport)
    clock.advance(10.0)
    assert transport.aborted


def test_deferreds_of_renew_now_are_plain(tmp_path):
    # renew_now never errbacks: an admin command may ignore its Deferred without "Unhandled error".
    manager, tls, _ = make_manager(tmp_path)
    ensure_certificate(tls, NAMES[0])
    orders = manager._obtain = FakeOrders(manager, CA())
    orders.fail_with = AcmeFailure("no")
    manager.startService()
    d = manager.renew_now()
    assert isinstance(d, defer.Deferred) and d.called and d.result is False
    manager.stopService()


@implementer(IOpenSSLClientConnectionCreator)
class ClientCreator:
    def __init__(self, name, protocols):
        self.name, self.protocols = name, protocols

    def clientConnectionForTLS(self, tls_protocol):
        return client_connection(self.name, self.protocols)


@implementer(IHandshakeListener)
class ClientProbe(protocol.Protocol):
    handshake_done = False
    lost = None
    peer = None

    def handshakeCompleted(self):
        self.handshake_done = True
        self.peer = self.transport.getPeerCertificate().to_cryptography()

    def connectionLost(self, reason):
        self.lost = reason


@pytest.mark.parametrize("protocols, completes", [([ACME_TLS_ALPN], True), ([b"h2"], False)])
def test_the_listener_factory_completes_the_handshake_then_closes(validation, protocols, completes):
    manager, _, certificate = validation
    server_factory = tls_alpn01_factory(manager)
    client_probe = ClientProbe()
    client_factory = TLSMemoryBIOFactory(ClientCreator(b"mx.example.test", protocols), True,
                                         protocol.Factory.forProtocol(lambda: client_probe))
    _, _, pump = iosim.connectedServerAndClient(
        lambda: server_factory.buildProtocol(None), lambda: client_factory.buildProtocol(None), greet=False)
    pump.flush()
    assert client_probe.handshake_done is completes
    assert client_probe.lost is not None             # closed by the server either way
    if completes:
        assert client_probe.peer == certificate


def test_a_client_without_alpn_is_cut_off_after_the_handshake(validation):
    # No ALPN extension at all: OpenSSL never calls the ALPN callback, so the
    # handshake completes with the validation certificate; the probe aborts at once.
    manager, _, _ = validation
    server_factory = tls_alpn01_factory(manager)
    server_protocols = []

    def server():
        built = server_factory.buildProtocol(None)
        server_protocols.append(built)
        return built
    client_probe = ClientProbe()
    client_factory = TLSMemoryBIOFactory(ClientCreator(b"mx.example.test", None), True,
                                         protocol.Factory.forProtocol(lambda: client_probe))
    _, _, pump = iosim.connectedServerAndClient(server, lambda: client_factory.buildProtocol(None), greet=False)
    pump.flush()
    assert client_probe.lost is not None
    assert server_protocols[0].transport.disconnected or server_protocols[0].transport.disconnecting
