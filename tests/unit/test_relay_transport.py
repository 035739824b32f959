"""RelayTransport over real sockets on 127.0.0.1 against in-process fake SMTP servers.

The fake resolver hands out documentation addresses (192.0.2.x); `connect`
maps each (address, port) onto a fake server's ephemeral port on 127.0.0.1
and refuses everything else, then uses the transport's own default
connector (TCP, implicit TLS wrapping) for the real connection.
These are twisted.trial TestCases (pytest runs them and waits for the
Deferreds they return); each has a timeout, and the reactor must be clean
afterwards.
"""
from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path

from twisted.internet import defer, error, reactor
from twisted.names import error as dns_error
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from fake_dns import FakeResolver
from fake_smtp_server import FakeSMTPServer
from mailgw import config as config_module
from mailgw.config_types import TLSConfig
from mailgw.interfaces import IRelayTransport
from mailgw.queue.outbound import RelayTransport, default_connect
from mailgw.queue.model import STATUS_BOUNCED, STATUS_DEFERRED, STATUS_SENT, DeliveryRequest, Recipient
from mailgw.tls import ensure_certificate, server_options

HOSTNAME = "mail.example.test"
MX_PORT = 25
MESSAGE = b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: hi\r\n\r\nHello.\r\n"


def free_port() -> int:
    """A port nobody listens on (connections to it are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RelayTransportTests(unittest.TestCase):
    timeout = 20

    def setUp(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="mailgw-relay-"))
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.routes: dict[tuple[str, int], int] = {}
        self.connects: list[tuple[str, int, bool]] = []
        self._real_connect = default_connect(reactor, timeout=5)

    # --- helpers

    def server(self, address: str, port: int = MX_PORT, **kwargs) -> FakeSMTPServer:
        server = FakeSMTPServer(reactor, **kwargs)
        self.routes[(address, port)] = server.start()
        self.addCleanup(server.stop)
        return server

    def refuse(self, address: str, port: int = MX_PORT):
        self.routes[(address, port)] = free_port()

    def connect(self, host, port, factory, tls_options):
        self.connects.append((host, port, tls_options is not None))
        real = self.routes.get((host, port))
        if real is None:
            return defer.fail(error.ConnectionRefusedError(f"{host}:{port} (unmapped in test)"))
        return self._real_connect("127.0.0.1", real, factory, tls_options)

    def certificate(self, name: str):
        directory = self.tmp / name
        tls = TLSConfig(certificate=directory / "cert.pem", private_key=directory / "key.pem", generated=True,
                        min_version="TLSv1.2")
        ensure_certificate(tls, name)
        return server_options(tls), tls.certificate

    def transport(self, resolver=None, **queue) -> RelayTransport:
        queue.setdefault("mx_port", MX_PORT)
        queue.setdefault("reply_timeout", 10)
        queue.setdefault("data_timeout", 10)
        queue.setdefault("connect_timeout", 5)
        # No connection reuse unless a test asks: the reactor must be clean after each test.
        queue.setdefault("connection_cache_time", 0)
        config = config_module.load(None, overrides={
            "server": {"hostname": HOSTNAME, "data_dir": str(self.tmp / "data")}, "queue": queue})
        transport = RelayTransport(config=config, reactor=reactor, resolver=resolver or FakeResolver(),
                                   connect=self.connect, read_message=lambda path: defer.succeed(path.read_bytes()))
        verifyObject(IRelayTransport, transport)
        return transport

    def request(self, *recipients, domain="example.net", message=MESSAGE, sender="alice@example.org",
                notify=None, orcpt=None, envid=None, ret=None) -> DeliveryRequest:
        path = self.tmp / f"msg-{len(list(self.tmp.glob('msg-*')))}"
        path.write_bytes(message)
        recipients = recipients or (f"bob@{domain}",)
        return DeliveryRequest(queue_id="Q0001", domain=domain, sender=sender,
                               recipients=tuple(Recipient(r, notify, orcpt) for r in recipients),
                               message_path=path, size=len(message), body="7BIT", smtputf8=False,
                               envid=envid, ret=ret)

    def mx_resolver(self, extra=None):
        zones = {("example.net", "MX"): [(10, "mx1.example.net")], ("mx1.example.net", "A"): ["192.0.2.1"]}
        zones.update(extra or {})
        return FakeResolver(zones)

    # --- MX delivery

    @defer.inlineCallbacks
    def test_delivered_on_first_try(self):
        server = self.server("192.0.2.1")
        result = yield self.transport(self.mx_resolver(), mx_tls="none").deliver(self.request())
        self.assertEqual([r.status for r in result.results], [STATUS_SENT])
        self.assertEqual(result.results[0].code, 250)
        self.assertEqual(result.relay, "mx1.example.net[192.0.2.1]:25")
        self.assertIsNone(result.tls)
        [transaction] = server.transactions
        self.assertEqual(transaction.mail, "<alice@example.org>")
        self.assertEqual(transaction.rcpts, ["<bob@example.net>"])
        self.assertEqual(transaction.data, MESSAGE)
        self.assertEqual(server.sessions[0].verbs(), ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"])

    @defer.inlineCallbacks
    def test_4xx_at_rcpt_is_deferred(self):
        server = self.server("192.0.2.1", replies={"rcpt": "451 4.7.1 Greylisted, try again"})
        result = yield self.transport(self.mx_resolver(), mx_tls="none").deliver(self.request())
        [r] = result.results
        self.assertEqual((r.status, r.code, r.enhanced, r.text),
                         (STATUS_DEFERRED, 451, "4.7.1", "Greylisted, try again"))
        self.assertEqual(server.transactions, [])
        # PIPELINING: DATA went out with MAIL and RCPT and was refused (no valid recipient).
        self.assertEqual(server.sessions[0].verbs(), ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"])

    @defer.inlineCallbacks
    def test_5xx_at_rcpt_bounces_that_recipient_while_the_other_is_sent(self):
        server = self.server("192.0.2.1", replies={"rcpt:nobody@example.net": "550 5.1.1 No such user"})
        request = self.request("bob@example.net", "nobody@example.net")
        result = yield self.transport(self.mx_resolver(), mx_tls="none").deliver(request)
        self.assertEqual([(r.address, r.status, r.enhanced) for r in result.results],
                         [("bob@example.net", STATUS_SENT, "2.0.0"),
                          ("nobody@example.net", STATUS_BOUNCED, "5.1.1")])
        self.assertEqual(result.results[1].diagnostic, "smtp; 550 5.1.1 No such user")
        [transaction] = server.transactions
        self.assertEqual(transaction.rcpts, ["<bob@example.net>"])

    @defer.inlineCallbacks
    def test_several_recipients_go_in_one_transaction(self):
        server = self.server("192.0.2.1")
        request = self.request("a@example.net", "b@example.net", "c@example.net")
        result = yield self.transport(self.mx_resolver(), mx_tls="none").deliver(request)
        self.assertEqual({r.status for r in result.results}, {STATUS_SENT})
        self.assertEqual(len(server.sessions), 1)
        [transaction] = server.transactions
        self.assertEqual(transaction.rcpts, ["<a@example.net>", "<b@example.net>", "<c@example.net>"])
        self.assertEqual(server.sessions[0].verbs().count("DATA"), 1)

    @defer.inlineCallbacks
    def test_mx_preference_order_and_fallback_when_the_first_refuses(self):
        resolver = FakeResolver({
            ("example.net", "MX"): [(30, "mx3.example.net"), (10, "mx1.example.net"), (20, "mx2.example.net")],
            ("mx1.example.net", "A"): ["192.0.2.1"], ("mx2.example.net", "A"): ["192.0.2.2"],
            ("mx3.example.net", "A"): ["192.0.2.3"]})
        self.refuse("192.0.2.1")
        second = self.server("192.0.2.2")
        third = self.server("192.0.2.3")
        result = yield self.transport(resolver, mx_tls="none").deliver(self.request())
        self.assertEqual(result.results[0].status, STATUS_SENT)
        self.assertEqual(result.relay, "mx2.example.net[192.0.2.2]:25")
        self.assertEqual([c[0] for c in self.connects], ["192.0.2.1", "192.0.2.2"])
        self.assertEqual(len(second.transactions), 1)
        self.assertEqual(third.sessions, [])

    @defer.inlineCallbacks
    def test_greeting_4xx_moves_on_to_the_next_mx(self):
        resolver = FakeResolver({
            ("example.net", "MX"): [(10, "mx1.example.net"), (20, "mx2.example.net")],
            ("mx1.example.net", "A"): ["192.0.2.1"], ("mx2.example.net", "A"): ["192.0.2.2"]})
        first = self.server("192.0.2.1", replies={"greeting": "421 4.3.2 Too busy"})
        second = self.server("192.0.2.2")
        result = yield self.transport(resolver, mx_tls="none").deliver(self.request())
        self.assertEqual(result.results[0].status, STATUS_SENT)
        self.assertEqual(first.transactions, [])
        self.assertEqual(len(second.transactions), 1)

    @defer.inlineCallbacks
    def test_every_mx_failing_defers_with_the_last_reason(self):
        resolver = FakeResolver({
            ("example.net", "MX"): [(10, "mx1.example.net"), (20, "mx2.example.net")],
            ("mx1.example.net", "A"): ["192.0.2.1"], ("mx2.example.net", "A"): ["192.0.2.2"]})
        self.refuse("192.0.2.1")
        self.server("192.0.2.2", replies={"greeting": "554 5.7.1 No service for you"})
        result = yield self.transport(resolver, mx_tls="none").deliver(self.request())
        [r] = result.results
        self.assertEqual((r.status, r.code, r.enhanced), (STATUS_DEFERRED, 554, "4.7.1"))   # a refusing greeting defers (class 4)
        self.assertEqual(result.relay, "mx2.example.net[192.0.2.2]:25")

    @defer.inlineCallbacks
    def test_implicit_mx_when_there_are_no_mx_records(self):
        resolver = FakeResolver({("example.net", "A"): ["192.0.2.10"]})
        server = self.server("192.0.2.10")
        result = yield self.transport(resolver, mx_tls="none").deliver(self.request())
        self.assertEqual(result.results[0].status, STATUS_SENT)
        self.assertEqual(result.relay, "example.net[192.0.2.10]:25")
        self.assertEqual(len(server.transactions), 1)

    @defer.inlineCallbacks
    def test_implicit_mx_without_address_bounces(self):
        resolver = FakeResolver({("example.net", "TXT"): ["x"]})
        result = yield self.transport(resolver, mx_tls="none").deliver(self.request())
        self.assertEqual((result.results[0].status, result.results[0].enhanced), (STATUS_BOUNCED, "5.4.4"))
        self.assertEqual(self.connects, [])

    @defer.inlineCallbacks
    def test_null_mx_bounces(self):
        resolver = FakeResolver({("example.net", "MX"): [(0, ".")]})
        result = yield self.transport(resolver).deliver(self.request("a@example.net", "b@example.net"))
        for r in result.results:
            self.assertEqual((r.status, r.code, r.enhanced, r.text),
                             (STATUS_BOUNCED, 0, "5.1.10", "Recipient address has null MX"))
        self.assertEqual(self.connects, [])
        self.assertIsNone(result.relay)

    @defer.inlineCallbacks
    def test_nxdomain_bounces(self):
        result = yield self.transport(FakeResolver()).deliver(self.request())
        self.assertEqual((result.results[0].status, result.results[0].enhanced), (STATUS_BOUNCED, "5.1.2"))

    @defer.inlineCallbacks
    def test_servfail_defers(self):
        resolver = FakeResolver({("example.net", "MX"): dns_error.DNSServerError})
        result = yield self.transport(resolver).deliver(self.request())
        self.assertEqual((result.results[0].status, result.results[0].enhanced), (STATUS_DEFERRED, "4.4.3"))

    @defer.inlineCallbacks
    def test_mx_address_servfail_defers(self):
        resolver = self.mx_resolver()
        resolver.zones[("mx1.example.net", "A")] = dns_error.DNSServerError
        resolver.zones[("mx1.example.net", "AAAA")] = dns_error.DNSServerError
        result = yield self.transport(resolver).deliver(self.request())
        self.assertEqual((result.results[0].status, result.results[0].enhanced), (STATUS_DEFERRED, "4.4.3"))

    @defer.inlineCallbacks
    def test_address_literal_domain_goes_to_that_address(self):
        server = self.server("192.0.2.77")
        resolver = FakeResolver()
        result = yield self.transport(resolver, mx_tls="none").deliver(
            self.request("bob@[192.0.2.77]", domain="[192.0.2.77]"))
        self.assertEqual(result.results[0].status, STATUS_SENT)
        self.assertEqual(resolver.queries, [])
        self.assertEqual(server.transactions[0].rcpts, ["<bob@[192.0.2.77]>"])

    @defer.inlineCallbacks
    def test_connection_dropped_mid_data_defers(self):
        self.server("192.0.2.1", drop_in_data=True)
        result = yield self.transport(self.mx_resolver(), mx_tls="none").deliver(self.request())
        [r] = result.results
        self.assertEqual((r.status, r.code, r.enhanced), (STATUS_DEFERRED, 0, "4.4.2"))

    @defer.inlineCallbacks
    def test_size_limit_of_the_next_hop_bounces_before_mail(self):
        server = self.server("192.0.2.1", extensions=("SIZE 100", "PIPELINING"))
        message = MESSAGE + b"x" * 200 + b"\r\n"
        result = yield self.transport(self.mx_resolver(), mx_tls="none").deliver(self.request(message=message))
        self.assertEqual((result.results[0].status, result.results[0].enhanced), (STATUS_BOUNCED, "5.3.4"))
        self.assertNotIn("MAIL", server.sessions[0].verbs())

    # --- smuggling

    @defer.inlineCallbacks
    def test_smuggling_dot_lines_at_every_position_arrive_intact(self):
        server = self.server("192.0.2.1")
        evil = (b".\r\nMAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"
                b"SMUGGLED\r\n.\r\n..\r\n.x\r\n")
        message = bytearray(evil)                     # a "." line at offset 0
        for boundary in (16384, 65536, 3 * 65536):
            while len(message) < boundary:
                room = boundary - len(message) - 2
                message += b"y" * min(room, 998) + b"\r\n"
            assert len(message) == boundary          # the next line starts exactly at the boundary
            message += evil
        message = bytes(message)
        result = yield self.transport(self.mx_resolver(), mx_tls="none").deliver(self.request(message=message))
        self.assertEqual(result.results[0].status, STATUS_SENT)
        self.assertEqual(len(server.transactions), 1)
        self.assertEqual(server.transactions[0].data, message)
        self.assertEqual(server.sessions[0].verbs(), ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"])

    # --- DSN parameters

    @defer.inlineCallbacks
    def test_dsn_parameters_only_when_advertised(self):
        with_dsn = self.server("192.0.2.1", extensions=("PIPELINING", "DSN"))
        request = self.request(notify=("FAILURE",), orcpt="rfc822;bob@example.net", envid="Q0001", ret="HDRS")
        result = yield self.transport(self.mx_resolver(), mx_tls="none").deliver(request)
        self.assertTrue(result.dsn_relayed)
        self.assertEqual(with_dsn.transactions[0].mail, "<alice@example.org> RET=HDRS ENVID=Q0001")
        self.assertEqual(with_dsn.transactions[0].rcpts,
                         ["<bob@example.net> NOTIFY=FAILURE ORCPT=rfc822;bob@example.net"])

        without = self.server("192.0.2.2", extensions=("PIPELINING",))
        resolver = self.mx_resolver({("mx1.example.net", "A"): ["192.0.2.2"]})
        result = yield self.transport(resolver, mx_tls="none").deliver(request)
        self.assertFalse(result.dsn_relayed)
        self.assertEqual(without.transactions[0].mail, "<alice@example.org>")
        self.assertEqual(without.transactions[0].rcpts, ["<bob@example.net>"])

    # --- TLS

    @defer.inlineCallbacks
    def test_opportunistic_tls_with_a_self_signed_mx(self):
        options, _ = self.certificate("mx1.example.net")
        server = self.server("192.0.2.1", tls_options=options)
        result = yield self.transport(self.mx_resolver(), mx_tls="opportunistic").deliver(self.request())
        self.assertEqual(result.results[0].status, STATUS_SENT)
        self.assertIn(result.tls, ("TLSv1.2", "TLSv1.3"))
        self.assertTrue(server.transactions[0].tls)

    @defer.inlineCallbacks
    def test_opportunistic_tls_falls_back_to_plaintext_on_tls_failure(self):
        options, _ = self.certificate("mx1.example.net")
        server = self.server("192.0.2.1", tls_options=options, starttls_break="garbage")
        result = yield self.transport(self.mx_resolver(), mx_tls="opportunistic").deliver(self.request())
        self.assertEqual(result.results[0].status, STATUS_SENT)
        self.assertIsNone(result.tls)
        self.assertEqual(len(server.sessions), 2)
        self.assertEqual(server.sessions[0].verbs(), ["EHLO", "STARTTLS"])
        self.assertNotIn("STARTTLS", server.sessions[1].verbs())
        self.assertEqual(len(server.transactions), 1)
        self.assertEqual([c[0] for c in self.connects], ["192.0.2.1", "192.0.2.1"])

    @defer.inlineCallbacks
    def test_starttls_injection_is_harmless_end_to_end(self):
        options, _ = self.certificate("mx1.example.net")
        server = self.server("192.0.2.1", tls_options=options,
                             inject_after_starttls=b"250-evil\r\n250 AUTH PLAIN\r\n")
        result = yield self.transport(self.mx_resolver(), mx_tls="opportunistic").deliver(self.request())
        # 220 and the injected lines leave the server in one write (one loopback segment): the
        # client drops them, the handshake succeeds and the real EHLO answer is read inside TLS.
        self.assertEqual(result.results[0].status, STATUS_SENT)
        self.assertIn(result.tls, ("TLSv1.2", "TLSv1.3"))
        self.assertEqual(len(server.sessions), 1)
        self.assertEqual(len(server.transactions), 1)

    @defer.inlineCallbacks
    def test_smarthost_with_auth_and_required_tls(self):
        options, cert = self.certificate("smarthost.example.test")
        server = self.server("192.0.2.50", 587, name="smarthost.example.test", tls_options=options,
                             users={"relay-user": "relay-pass"})
        resolver = FakeResolver({("smarthost.example.test", "A"): ["192.0.2.50"]})
        transport = self.transport(resolver, smarthost={
            "host": "smarthost.example.test", "port": 587, "tls": "required", "username": "relay-user",
            "password": "relay-pass", "ca_file": str(cert)})
        result = yield transport.deliver(self.request())
        self.assertEqual(result.results[0].status, STATUS_SENT)
        self.assertIn(result.tls, ("TLSv1.2", "TLSv1.3"))
        self.assertEqual(result.relay, "smarthost.example.test[192.0.2.50]:587")
        [transaction] = server.transactions
        self.assertEqual((transaction.tls, transaction.auth), (True, "relay-user"))
        auth = [(tls, line) for tls, line in server.sessions[0].commands if line.upper().startswith("AUTH")]
        self.assertEqual([tls for tls, _ in auth], [True])

    @defer.inlineCallbacks
    def test_smarthost_without_starttls_defers_and_never_sees_credentials(self):
        _, cert = self.certificate("smarthost.example.test")
        server = self.server("192.0.2.50", 587, users={"relay-user": "relay-pass"})     # AUTH, no STARTTLS
        resolver = FakeResolver({("smarthost.example.test", "A"): ["192.0.2.50"]})
        transport = self.transport(resolver, smarthost={
            "host": "smarthost.example.test", "port": 587, "tls": "required", "username": "relay-user",
            "password": "relay-pass", "ca_file": str(cert)})
        result = yield transport.deliver(self.request())
        [r] = result.results
        self.assertEqual((r.status, r.enhanced), (STATUS_DEFERRED, "4.7.4"))
        self.assertIn("TLS required but not available", r.text)
        self.assertEqual(server.sessions[0].verbs(), ["EHLO", "QUIT"])
        self.assertFalse(any("relay-pass" in line or line.upper().startswith("AUTH")
                             for _, line in server.sessions[0].commands))

    @defer.inlineCallbacks
    def test_required_tls_with_a_certificate_for_another_name_defers_and_tries_the_next(self):
        wrong, wrong_cert = self.certificate("other.example.test")
        right, right_cert = self.certificate("mx2.example.net")
        resolver = FakeResolver({
            ("example.net", "MX"): [(10, "mx1.example.net"), (20, "mx2.example.net")],
            ("mx1.example.net", "A"): ["192.0.2.1"], ("mx2.example.net", "A"): ["192.0.2.2"]})
        first = self.server("192.0.2.1", tls_options=wrong)
        self.server("192.0.2.2", tls_options=right)
        transport = self.transport(resolver, mx_tls="required")
        # MX hosts are verified against the platform trust: a self-signed one fails, and is not retried in plaintext.
        result = yield transport.deliver(self.request())
        [r] = result.results
        self.assertEqual((r.status, r.enhanced), (STATUS_DEFERRED, "4.7.5"))
        self.assertEqual(first.transactions, [])
        self.assertEqual([c[0] for c in self.connects], ["192.0.2.1", "192.0.2.2"])
        self.assertEqual(first.sessions[0].verbs(), ["EHLO", "STARTTLS"])

    @defer.inlineCallbacks
    def test_route_with_wrong_certificate_name_defers(self):
        options, cert = self.certificate("other.example.test")
        self.server("192.0.2.60", 587, tls_options=options)
        resolver = FakeResolver({("relay.example.test", "A"): ["192.0.2.60"]})
        transport = self.transport(resolver, routes=[{
            "domain": "example.net", "host": "relay.example.test", "port": 587, "tls": "required",
            "ca_file": str(cert)}])
        result = yield transport.deliver(self.request())
        self.assertEqual((result.results[0].status, result.results[0].enhanced), (STATUS_DEFERRED, "4.7.5"))

    @defer.inlineCallbacks
    def test_route_overrides_mx_and_smarthost_with_implicit_tls(self):
        options, cert = self.certificate("relay.example.test")
        server = self.server("192.0.2.60", 465, name="relay.example.test", tls_options=options, implicit=True)
        resolver = FakeResolver({("relay.example.test", "A"): ["192.0.2.60"]})
        transport = self.transport(resolver, smarthost={"host": "192.0.2.99", "port": 25, "tls": "none"}, routes=[{
            "domain": "example.net", "host": "relay.example.test", "port": 465, "tls": "implicit",
            "ca_file": str(cert)}])
        result = yield transport.deliver(self.request())
        self.assertEqual(result.results[0].status, STATUS_SENT)
        self.assertIn(result.tls, ("TLSv1.2", "TLSv1.3"))
        self.assertEqual(self.connects, [("192.0.2.60", 465, True)])
        self.assertTrue(server.transactions[0].tls)
        self.assertNotIn("STARTTLS", server.sessions[0].verbs())

    @defer.inlineCallbacks
    def test_smarthost_for_other_domains(self):
        server = self.server("192.0.2.99", 2525)
        transport = self.transport(FakeResolver(), smarthost={"host": "192.0.2.99", "port": 2525, "tls": "none"},
                                   routes=[{"domain": "example.org", "host": "192.0.2.98", "tls": "none"}])
        result = yield transport.deliver(self.request())
        self.assertEqual(result.results[0].status, STATUS_SENT)
        self.assertEqual(len(server.transactions), 1)

    @defer.inlineCallbacks
    def test_unreadable_message_defers(self):
        request = self.request()
        request.message_path.unlink()
        transport = self.transport(self.mx_resolver(), mx_tls="none")
        transport._read_message = lambda path: defer.maybeDeferred(path.read_bytes)
        result = yield transport.deliver(request)
        [r] = result.results
        self.assertEqual((r.status, r.enhanced), (STATUS_DEFERRED, "4.3.0"))
        self.assertNotIn(str(request.message_path), r.text)
        self.flushLoggedErrors(FileNotFoundError)

    # --- connection reuse

    @defer.inlineCallbacks
    def test_messages_to_the_same_host_reuse_one_connection_and_close_quits_it(self):
        server = self.server("192.0.2.1")
        transport = self.transport(self.mx_resolver(), mx_tls="none", connection_cache_time=30)
        for recipient in ("a@example.net", "b@example.net", "c@example.net"):
            result = yield transport.deliver(self.request(recipient))
            self.assertEqual(result.results[0].status, STATUS_SENT)
        self.assertEqual(len(server.sessions), 1)
        self.assertEqual([t.rcpts for t in server.transactions],
                         [["<a@example.net>"], ["<b@example.net>"], ["<c@example.net>"]])
        yield transport.close()
        self.assertEqual(server.sessions[0].verbs(), ["EHLO"] + ["MAIL", "RCPT", "DATA"] * 3 + ["QUIT"])

    @defer.inlineCallbacks
    def test_a_cached_connection_the_peer_dropped_costs_nothing_the_message_goes_on_a_new_one(self):
        class Once(dict):
            def get(self, key, default=None):
                return self.pop(key, default)
        server = self.server("192.0.2.1")
        transport = self.transport(self.mx_resolver(), mx_tls="none", connection_cache_time=30)
        first = yield transport.deliver(self.request("a@example.net"))
        server.replies = Once(mail="drop")      # the peer goes away just as we reuse the connection
        second = yield transport.deliver(self.request("b@example.net"))
        self.assertEqual([first.results[0].status, second.results[0].status], [STATUS_SENT, STATUS_SENT])
        self.assertEqual(len(server.sessions), 2)
        self.assertEqual([t.rcpts for t in server.transactions], [["<a@example.net>"], ["<b@example.net>"]])
        yield transport.close()

    @defer.inlineCallbacks
    def test_no_reuse_across_hosts(self):
        first_server = self.server("192.0.2.1")
        other_server = self.server("192.0.2.2")
        resolver = self.mx_resolver({("example.org", "MX"): [(10, "mx2.example.org")],
                                     ("mx2.example.org", "A"): ["192.0.2.2"]})
        transport = self.transport(resolver, mx_tls="none", connection_cache_time=30)
        yield transport.deliver(self.request("a@example.net"))
        yield transport.deliver(self.request("b@example.org", domain="example.org"))
        self.assertEqual([len(first_server.transactions), len(other_server.transactions)], [1, 1])
        yield transport.close()


    # Issue 24: the connect-failure line read `...: connect: 0 4.4.1 ...`, the
    # 0 being the placeholder code of a verdict no server gave.
    @defer.inlineCallbacks
    def test_connect_failure_line_has_no_placeholder_code(self):
        from twisted.logger import formatEvent, globalLogPublisher
        lines = []
        observer = lambda event: lines.append(formatEvent(event))
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        resolver = FakeResolver({("example.net", "MX"): [(10, "mx1.example.net")],
                                 ("mx1.example.net", "A"): ["192.0.2.1"]})
        self.refuse("192.0.2.1")
        result = yield self.transport(resolver, mx_tls="none").deliver(self.request())
        self.assertEqual(result.results[0].status, STATUS_DEFERRED)
        [line] = [text for text in lines if ": connect: " in text]
        self.assertIn(": connect: 4.4.1 ", line)
        self.assertNotIn(" 0 4.4.1", line)

def test_destination_is_the_relay_host_or_the_domain():
    config = config_module.load(None, overrides={"server": {"data_dir": "/nonexistent"}, "queue": {
        "routes": [{"domain": "partner.test", "host": "10.1.2.3", "port": 2525, "tls": "none"}]}})
    transport = RelayTransport(config=config, reactor=None, resolver=None)
    assert transport.destination("Partner.Test") == "[10.1.2.3]:2525"
    assert transport.destination("other.test") == "other.test"
    with_smarthost = config_module.load(None, overrides={"server": {"data_dir": "/nonexistent"}, "queue": {
        "smarthost": {"host": "relay.example.test", "port": 587, "tls": "none"}}})
    transport = RelayTransport(config=with_smarthost, reactor=None, resolver=None)
    assert transport.destination("a.test") == transport.destination("b.test") == "[relay.example.test]:587"

