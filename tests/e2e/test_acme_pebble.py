"""mailgw.acme_certs against pebble, Let's Encrypt's test CA: real orders, real
challenges, the real reactor (trial) and a real thread pool.

Pebble validates HTTP-01 and TLS-ALPN-01 against listeners this test opens
on 127.0.0.1 (`http01_site` and `tls_alpn01_factory`), finding them through a
DNS server that answers 127.0.0.1 for the test names (tests/e2e/pebble_server.py).
Each test has a fresh pebble, data directory and account.
"""
from __future__ import annotations

import shutil
import stat
import tempfile
from pathlib import Path

import pytest
from cryptography import x509
from twisted.internet import defer, protocol, reactor, task
from twisted.logger import capturedLogs
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

from mailgw.acme_certs import CertificateManager, dns_names, http01_site, tls_alpn01_factory
from mailgw.config_types import TLSConfig
from mailgw.tls import ensure_certificate
from pebble_server import PEBBLE, NameServer, Pebble, TestCA

NAMES = ("mx.example.test", "mail.example.test")    # the hostname first
RETRY_FIRST = 3600.0
ORDER_DEADLINE = 60.0     # seconds for one order against pebble (it takes about one)

pytestmark = pytest.mark.skipif(not Path(PEBBLE).exists(), reason="pebble not installed")


class Delegate(protocol.Factory):
    """A listener bound before the manager exists (pebble needs the port first);
    `target` is the real factory once it does."""
    noisy = False
    target = None

    def buildProtocol(self, addr):
        return self.target.buildProtocol(addr) if self.target is not None else None


class PebbleTests(unittest.TestCase):
    timeout = 120

    def setUp(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="mailgw-acme-"))
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.pool = ThreadPool(minthreads=0, maxthreads=2, name="acme-test")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.http_factory, self.tls_factory = Delegate(), Delegate()
        self.http = reactor.listenTCP(0, self.http_factory, interface="127.0.0.1")
        self.addCleanup(self._stop_listening, self.http)
        self.tls = reactor.listenTCP(0, self.tls_factory, interface="127.0.0.1")
        self.addCleanup(self._stop_listening, self.tls)
        self.ca = TestCA(self.tmp / "ca")
        self.dns = NameServer(self.tmp / "dns", NAMES)
        self.addCleanup(self.dns.stop)
        self.pebble = Pebble(self.tmp / "pebble", self.ca, http_port=self.http.getHost().port,
                             tls_port=self.tls.getHost().port, dns_port=self.dns.port).start()
        self.addCleanup(self.pebble.stop)
        self.installed = []

    @staticmethod
    def _stop_listening(port):
        return port.stopListening() if port.connected else None

    def make_manager(self, challenge="http-01"):
        acme_dir = self.tmp / "data" / "acme"
        # What config_sections makes with acme = true (and tap.py's ensure_certificate at start).
        tls = TLSConfig(certificate=acme_dir / "cert.pem", private_key=acme_dir / "key.pem", generated=True,
                        min_version="TLSv1.2", acme=True, acme_contact="postmaster@example.test",
                        acme_directory=self.pebble.directory_url, acme_names=NAMES,
                        acme_ca_file=self.ca.ca_path)
        ensure_certificate(tls, NAMES[0])
        manager = CertificateManager(tls, reactor=reactor, clock=reactor, threadpool=self.pool,
                                     on_installed=lambda: self.installed.append(tls.certificate.read_bytes()),
                                     challenges=(challenge,), retry_initial=RETRY_FIRST)
        self.http_factory.target = http01_site(manager)
        self.tls_factory.target = tls_alpn01_factory(manager)
        self.addCleanup(manager.stopService)
        return manager, tls

    def bounded(self, deferred):
        return deferred.addTimeout(ORDER_DEADLINE, reactor)

    @defer.inlineCallbacks
    def first_certificate(self, challenge="http-01"):
        manager, tls = self.make_manager(challenge)
        placeholder = tls.certificate.read_bytes()
        manager.startService()             # the placeholder is due: an order starts at once
        self.assertEqual(manager.orders, 1)
        ok = yield self.bounded(manager.renew_now())     # joins the running order
        self.assertTrue(ok, manager.last_error)
        self.assertNotEqual(tls.certificate.read_bytes(), placeholder)
        return manager, tls

    def assert_acme_certificate(self, tls):
        for path in (tls.certificate, tls.private_key, tls.certificate.parent / "account.json",
                     tls.certificate.parent / "account-key.pem"):
            self.assertTrue(path.exists(), path)
            self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600, path)
        chain = x509.load_pem_x509_certificates(tls.certificate.read_bytes())
        leaf = chain[0]
        self.assertEqual(dns_names(leaf), set(NAMES))
        # leaf <- intermediate (in the chain) <- this run's root (pebble's management API)
        root = x509.load_pem_x509_certificate(self.pebble.root_pem())
        self.assertGreaterEqual(len(chain), 2)
        leaf.verify_directly_issued_by(chain[1])
        chain[-1].verify_directly_issued_by(root)
        return leaf

    @defer.inlineCallbacks
    def test_first_certificate_by_http01(self):
        with capturedLogs() as events:
            manager, tls = yield self.first_certificate()
        self.assertEqual(len([event for event in events if "using account" in event.get("log_format", "")]), 1)
        leaf = self.assert_acme_certificate(tls)
        self.assertEqual((manager.orders, manager.renewals, manager.failures), (1, 1, 0))
        self.assertEqual(self.installed, [tls.certificate.read_bytes()])
        self.assertIsNone(manager.last_error)
        self.assertEqual(manager.not_after, leaf.not_valid_after_utc.timestamp())
        # The next look is due at 2/3 of the lifetime, or at the periodic check before it.
        lifetime = leaf.not_valid_after_utc.timestamp() - leaf.not_valid_before_utc.timestamp()
        renew_at = leaf.not_valid_before_utc.timestamp() + lifetime * 2 / 3
        self.assertLessEqual(manager.next_attempt, min(renew_at, reactor.seconds() + manager.check_period) + 1)
        self.assertGreater(manager.next_attempt, reactor.seconds() + 60)

    @defer.inlineCallbacks
    def test_forced_renewal_gives_a_new_certificate_on_the_same_account(self):
        manager, tls = yield self.first_certificate()
        first = self.assert_acme_certificate(tls)
        account_key = (tls.certificate.parent / "account-key.pem").read_bytes()
        account = (tls.certificate.parent / "account.json").read_bytes()
        first_key = tls.private_key.read_bytes()
        with capturedLogs() as events:
            self.assertTrue((yield self.bounded(manager.renew_now())), manager.last_error)
        # The saved account was used: no new registration (that logs "acme: using account ...").
        self.assertEqual([event for event in events if "using account" in event.get("log_format", "")], [])
        second = self.assert_acme_certificate(tls)
        self.assertNotEqual(first.serial_number, second.serial_number)
        self.assertNotEqual(first_key, tls.private_key.read_bytes())     # a new key per order
        self.assertEqual(account_key, (tls.certificate.parent / "account-key.pem").read_bytes())
        self.assertEqual(account, (tls.certificate.parent / "account.json").read_bytes())
        self.assertEqual((manager.orders, manager.renewals, manager.failures), (2, 2, 0))
        self.assertEqual(len(self.installed), 2)

    @defer.inlineCallbacks
    def test_a_failed_challenge_keeps_the_old_certificate_and_backs_off(self):
        manager, tls = yield self.first_certificate()
        before = tls.certificate.read_bytes(), tls.private_key.read_bytes()
        yield self.http.stopListening()      # pebble's HTTP-01 request is refused
        asked = reactor.seconds()
        self.assertFalse((yield self.bounded(manager.renew_now())))
        self.assertEqual((tls.certificate.read_bytes(), tls.private_key.read_bytes()), before)
        self.assertEqual((manager.orders, manager.renewals, manager.failures), (2, 1, 1))
        self.assertEqual(manager.consecutive_failures, 1)
        self.assertIn("http-01 challenge failed", manager.last_error)
        self.assertGreaterEqual(manager.next_attempt, asked + RETRY_FIRST)
        self.assertLessEqual(manager.next_attempt, reactor.seconds() + RETRY_FIRST)
        self.assertEqual(len(self.installed), 1)
        yield task.deferLater(reactor, 0, lambda: None)

    @defer.inlineCallbacks
    def test_first_certificate_by_tls_alpn01(self):
        yield self.http.stopListening()      # only TLS-ALPN-01 can succeed
        manager, tls = yield self.first_certificate("tls-alpn-01")
        self.assert_acme_certificate(tls)
        self.assertEqual((manager.orders, manager.renewals, manager.failures), (1, 1, 0))
