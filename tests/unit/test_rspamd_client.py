"""RspamdClient (mailgw/spam/rspamd.py) against a fake rspamd: a twisted.web
resource on 127.0.0.1 that answers as the test says (every action, HTTP 500,
garbage, silence), and a refused port. twisted.trial TestCases: pytest waits
for the Deferreds they return. Timeouts run on a task.Clock, not on the wall."""
from __future__ import annotations

import json
import socket

from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from twisted.web import resource, server

from mailgw.spam import rspamd
from mailgw.spam.rspamd import RspamdClient, RspamdUnavailable, ScanEnvelope

ENVELOPE = ScanEnvelope(sender="friend@good.example", recipients=("alice@example.test", "bob@example.test"),
                        client_ip="192.0.2.1", helo="mail.good.example", client_name="mail.good.example",
                        queue_id="Q1", spf="pass", dkim=(("pass", "good.example"), ("fail", "other.example")),
                        dmarc="pass")
MESSAGE = b"From: friend@good.example\r\nSubject: hi\r\n\r\nhello\r\n"


def reply(action, score=1.0, **extra):
    body = {"is_skipped": False, "score": score, "required_score": 15.0, "action": action,
            "symbols": {"R_SPF_ALLOW": {"name": "R_SPF_ALLOW", "score": -0.2},
                        "BIG": {"name": "BIG", "score": 3.5}}}
    body.update(extra)
    return json.dumps(body).encode()


class FakeRspamd(resource.Resource):
    """Records each request; `answer` is (code, body) or "hang"."""
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.answer = (200, reply("no action"))
        self.requests = []
        self.hanging = []
        self.channels = []            # one per request: which connection it came on

    def render(self, request):
        self.requests.append((request.method, request.path, request.requestHeaders, request.content.read()))
        self.channels.append(id(request.channel))
        if self.answer == "hang":
            self.hanging.append(request)
            return server.NOT_DONE_YET
        code, body = self.answer
        request.setResponseCode(code)
        return body


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RspamdClientTests(unittest.TestCase):
    timeout = 20

    def setUp(self):
        self.fake = FakeRspamd()
        site = server.Site(self.fake)
        site.noisy = False
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.url = f"http://127.0.0.1:{self.port.getHost().port}"

    def client(self, url=None, **kwargs) -> RspamdClient:
        client = RspamdClient(reactor=reactor, url=url or self.url, controller_url=kwargs.pop("controller", self.url),
                              hostname="mx.example.test", **kwargs)
        self.addCleanup(client.close)
        return client

    @defer.inlineCallbacks
    def test_each_action_is_read_with_score_symbols_and_subject(self):
        client = self.client()
        for action in rspamd.ACTIONS:
            self.fake.answer = (200, reply(action, score=7.5, subject="[SPAM] hi"))
            scan = yield client.check(MESSAGE, ENVELOPE)
            self.assertEqual(scan.action, action)
            self.assertEqual((scan.score, scan.required_score), (7.5, 15.0))
            self.assertEqual(scan.symbols, (("BIG", 3.5), ("R_SPF_ALLOW", -0.2)))
            self.assertEqual(scan.subject, "[SPAM] hi")
            self.assertEqual(scan.is_spam, action in ("add header", "rewrite subject"))
        self.assertEqual(len(self.fake.requests), len(rspamd.ACTIONS))

    @defer.inlineCallbacks
    def test_the_envelope_and_our_results_go_as_request_headers(self):
        yield self.client().check(MESSAGE, ENVELOPE)
        method, path, headers, body = self.fake.requests[0]
        self.assertEqual((method, path, body), (b"POST", b"/checkv2", MESSAGE))
        get = headers.getRawHeaders
        self.assertEqual(get(b"from"), [b"friend@good.example"])
        self.assertEqual(get(b"rcpt"), [b"alice@example.test", b"bob@example.test"])
        self.assertEqual((get(b"ip"), get(b"helo"), get(b"queue-id")),
                         ([b"192.0.2.1"], [b"mail.good.example"], [b"Q1"]))
        self.assertEqual(get(b"mta-name"), [b"mx.example.test"])
        self.assertEqual(json.loads(get(b"spf")[0]), {"result": "pass"})
        self.assertEqual(json.loads(get(b"dkim")[0]), {"results": [{"result": "pass", "domain": "good.example"},
                                                                   {"result": "fail", "domain": "other.example"}]})
        self.assertEqual(json.loads(get(b"dmarc")[0]), {"result": "pass"})
        self.assertIsNone(get(b"user"))

    @defer.inlineCallbacks
    def test_a_null_sender_and_unchecked_results(self):
        envelope = ScanEnvelope(sender="", recipients=("alice@example.test",), client_ip="192.0.2.1",
                                spf="temperror", dkim=(), dmarc=None, user="carol@example.test")
        yield self.client().check(MESSAGE, envelope)
        get = self.fake.requests[0][2].getRawHeaders
        self.assertEqual(get(b"from"), [b"<>"])
        self.assertIsNone(get(b"spf"))                  # a temperror: rspamd checks for itself
        self.assertEqual(json.loads(get(b"dkim")[0]), {"result": "na"})
        self.assertIsNone(get(b"dmarc"))
        self.assertEqual(get(b"hostname"), [b"unknown"])
        self.assertEqual(get(b"user"), [b"carol@example.test"])

    @defer.inlineCallbacks
    def test_rspamds_own_reply_text_is_used_only_when_tame(self):
        client = self.client()
        self.fake.answer = (200, reply("reject", messages={"smtp_message": "Go away, spammer"}))
        scan = yield client.check(MESSAGE, ENVELOPE)
        self.assertEqual(scan.reply_text, "Go away, spammer")
        self.fake.answer = (200, reply("reject", messages={"smtp_message": "bad\r\n250 ok"}))
        scan = yield client.check(MESSAGE, ENVELOPE)
        self.assertIsNone(scan.reply_text)

    @defer.inlineCallbacks
    def _unavailable(self, client, text):
        try:
            yield client.check(MESSAGE, ENVELOPE)
        except RspamdUnavailable as error:
            self.assertIn(text, str(error))
        else:
            self.fail("no RspamdUnavailable")

    def test_http_500_is_unavailable(self):
        self.fake.answer = (500, b"internal error")
        return self._unavailable(self.client(), "HTTP 500")

    def test_garbage_is_unavailable(self):
        self.fake.answer = (200, b"<html>not rspamd</html>")
        return self._unavailable(self.client(), "not JSON")

    def test_an_unknown_action_is_unavailable(self):
        self.fake.answer = (200, reply("delete everything"))
        return self._unavailable(self.client(), "unknown action")

    def test_a_json_list_is_unavailable(self):
        self.fake.answer = (200, b"[1, 2]")
        return self._unavailable(self.client(), "not a JSON object")

    def test_a_huge_response_is_unavailable(self):
        self.fake.answer = (200, b" " * (rspamd.MAX_RESPONSE + 1))
        return self._unavailable(self.client(), "response of")

    def test_a_refused_connection_is_unavailable(self):
        client = self.client(url=f"http://127.0.0.1:{free_port()}")
        d = self._unavailable(client, "")
        return d.addCallback(lambda _: self.assertEqual(client.failures, 1))

    @defer.inlineCallbacks
    def test_silence_is_unavailable_after_the_timeout(self):
        clock = task.Clock()
        client = self.client(timeout=5.0, clock=clock)
        self.fake.answer = "hang"
        d = client.check(MESSAGE, ENVELOPE)
        outcome = []
        d.addBoth(lambda result: outcome.append(result) or result)
        yield _until(lambda: self.fake.hanging)      # the request reached rspamd
        clock.advance(4.9)
        self.assertEqual(outcome, [])
        clock.advance(0.2)
        yield self._unavailable_from(d, "no answer within 5 s")
        self.assertEqual(len(outcome), 1)
        self.assertEqual(len(self.fake.requests), 1)        # a timeout is not retried

    @defer.inlineCallbacks
    def _unavailable_from(self, d, text):
        try:
            yield d
        except RspamdUnavailable as error:
            self.assertIn(text, str(error))
        else:
            self.fail("no RspamdUnavailable")

    @defer.inlineCallbacks
    def test_kept_alive_connections_are_reused(self):
        client = self.client()
        for _ in range(5):
            yield client.check(MESSAGE, ENVELOPE)
        self.assertEqual(len(self.fake.requests), 5)
        # One TCP connection for five sequential scans.
        self.assertEqual(len(set(self.fake.channels)), 1)

    # -- learning --------------------------------------------------------
    @defer.inlineCallbacks
    def test_learn_spam_and_ham_post_to_the_controller_with_password_and_user(self):
        client = self.client(password="s3cret")
        self.fake.answer = (200, b'{"success": true}')
        self.assertEqual((yield client.learn("spam", MESSAGE, user="alice@example.test")), "learned")
        self.assertEqual((yield client.learn("ham", MESSAGE)), "learned")
        (m1, p1, h1, b1), (m2, p2, h2, _) = self.fake.requests
        self.assertEqual((m1, p1, b1, m2, p2), (b"POST", b"/learnspam", MESSAGE, b"POST", b"/learnham"))
        self.assertEqual(h1.getRawHeaders(b"password"), [b"s3cret"])
        self.assertEqual(h1.getRawHeaders(b"deliver-to"), [b"alice@example.test"])
        self.assertIsNone(h2.getRawHeaders(b"deliver-to"))

    @defer.inlineCallbacks
    def test_already_learned_is_known_and_a_refusal_is_unavailable(self):
        client = self.client()
        self.fake.answer = (208, b'{"error": "<x> has been already learned as spam, ignore it"}')
        self.assertEqual((yield client.learn("spam", MESSAGE)), "known")
        # What rspamd 3.4 says.
        self.fake.answer = (404, b'{"error": "<m@x> has been already learned as spam, ignore it"}')
        self.assertEqual((yield client.learn("spam", MESSAGE)), "known")
        self.fake.answer = (404, b'{"error": "not found"}')
        with self.assertRaises(RspamdUnavailable):
            yield client.learn("spam", MESSAGE)
        self.fake.answer = (200, b'{"error": "no statfiles"}')
        with self.assertRaises(RspamdUnavailable):
            yield client.learn("spam", MESSAGE)
        self.fake.answer = (403, b'{"error": "unauthorized"}')
        with self.assertRaises(RspamdUnavailable):
            yield client.learn("ham", MESSAGE)

    def test_learning_without_a_controller_fails_at_once(self):
        client = self.client(controller="")
        d = client.learn("spam", MESSAGE)
        return self.assertFailure(d, RspamdUnavailable)

    @defer.inlineCallbacks
    def test_ping(self):
        self.fake.answer = (200, b"pong\r\n")
        self.assertEqual((yield self.client().ping()), "pong")


def _until(condition, limit: int = 200):
    """Fires once `condition()` is true, checking once per reactor turn (bounded)."""
    d = defer.Deferred()

    def check(left):
        if condition():
            d.callback(None)
        elif left == 0:
            d.errback(AssertionError("condition never held"))
        else:
            reactor.callLater(0.01, check, left - 1)
    check(limit)
    return d


def test_ip_literals_are_connected_to_without_a_name_lookup():
    from twisted.internet import endpoints
    from twisted.web.client import URI

    from mailgw.spam.rspamd import _Endpoints

    factory = _Endpoints(reactor, 5.0)
    assert isinstance(factory.endpointForURI(URI.fromBytes(b"http://127.0.0.1:11333/checkv2")),
                      endpoints.TCP4ClientEndpoint)
    assert isinstance(factory.endpointForURI(URI.fromBytes(b"http://[::1]:11333/checkv2")),
                      endpoints.TCP6ClientEndpoint)
    assert isinstance(factory.endpointForURI(URI.fromBytes(b"http://rspamd.example.test:11333/")),
                      endpoints.HostnameEndpoint)
    tls = factory.endpointForURI(URI.fromBytes(b"https://127.0.0.1:11334/learnspam"))
    assert not isinstance(tls, (endpoints.TCP4ClientEndpoint, endpoints.HostnameEndpoint))   # wrapped in TLS
