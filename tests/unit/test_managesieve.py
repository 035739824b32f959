"""ManageSieve (RFC 5804) over StringTransport with a Clock and a real ScriptStore."""
from __future__ import annotations

import base64

import pytest
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address

from mailgw.config_types import ListenerConfig
from mailgw.managesieve.server import ManageSieveFactory
from mailgw.realm import MailRealm
from mailgw.sieve.interpreter import SUPPORTED_EXTENSIONS, compile_script
from mailgw.sieve.scripts import ScriptStore
from mailgw.smtp.inbound import Router
from twisted.internet import defer, task
from zope.interface.verify import verifyObject

from mailgw.interfaces import ISieveAccount
from pop3_harness import ALICE, TLSStringTransport, make_config
from smtp_harness import FakeChecker, FakeSpool, FakeStore, FakeUserDB

GOOD = 'require "fileinto";\r\nif header :contains "subject" "x" { fileinto "X"; }\r\n'
PLAIN = base64.b64encode(f"\0{ALICE}\0secret".encode()).decode()
WRONG = base64.b64encode(f"\0{ALICE}\0wrong".encode()).decode()


class Client:
    def __init__(self, tmp_path, *, plaintext=False, starttls=True, max_script_size=4096, max_scripts=3,
                 run_in_thread=None):
        self.clock = task.Clock()
        config = make_config(pop3={"allow_plaintext_auth": True} if plaintext else None)
        userdb = FakeUserDB()
        realm = MailRealm(router=Router(config, userdb), store=FakeStore(), spool=FakeSpool(), clock=self.clock)
        portal = Portal(realm, [FakeChecker(userdb)])
        self.scripts = ScriptStore(tmp_path / "sieve", check=compile_script,
                                   max_script_size=max_script_size, max_scripts=max_scripts)
        listener = ListenerConfig(role="managesieve", endpoint="tcp:0", name="managesieve")
        self.factory = ManageSieveFactory(config=config, listener=listener, portal=portal, clock=self.clock,
                                          scripts=self.scripts, tls_context=object() if starttls else None,
                                          run_in_thread=run_in_thread)
        peer = IPv4Address("TCP", "192.0.2.10", 40000)
        self.transport = TLSStringTransport(peerAddress=peer)
        self.server = self.factory.buildProtocol(peer)
        self.server.makeConnection(self.transport)

    def raw(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def read(self) -> list[str]:
        lines = self.raw().decode("utf-8").split("\r\n")
        if lines and lines[-1] == "":
            lines.pop()
        return lines

    def send(self, data) -> list[str]:
        self.server.dataReceived(data.encode("utf-8") if isinstance(data, str) else data)
        return self.read()

    def cmd(self, line: str) -> list[str]:
        return self.send(line + "\r\n")

    def login(self):
        if not self.server.session.tls:
            self.cmd("STARTTLS")
        assert self.cmd(f'AUTHENTICATE "PLAIN" "{PLAIN}"')[-1].startswith("OK")

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting


@pytest.fixture
def client(tmp_path):
    c = Client(tmp_path)
    c.greeting = c.read()
    return c


@pytest.fixture
def user(client):
    client.login()
    return client


def test_greeting_capabilities(client):
    caps = client.greeting
    assert caps[0] == '"IMPLEMENTATION" "mailgw"'
    assert '"SASL" ""' in caps                       # no PLAIN before TLS
    assert f'"SIEVE" "{" ".join(SUPPORTED_EXTENSIONS)}"' in caps
    assert '"STARTTLS"' in caps
    assert '"VERSION" "1.0"' in caps
    assert '"MAXREDIRECTS" "4"' in caps
    assert caps[-1] == "OK"
    assert client.cmd("CAPABILITY") == caps


def test_plaintext_allowed_lists_plain(tmp_path):
    c = Client(tmp_path, plaintext=True, starttls=False)
    caps = c.read()
    assert '"SASL" "PLAIN"' in caps and '"STARTTLS"' not in caps


def test_auth_refused_before_tls(client):
    reply = client.cmd(f'AUTHENTICATE "PLAIN" "{PLAIN}"')
    assert reply[-1].startswith("NO (ENCRYPT-NEEDED)")
    assert client.cmd("LISTSCRIPTS")[-1].startswith("NO")


def test_starttls_resends_capabilities(client):
    lines = client.cmd("STARTTLS")
    assert lines[0].startswith("OK")
    assert client.transport.tls_started
    assert '"SASL" "PLAIN"' in lines and '"STARTTLS"' not in lines
    assert lines[-1] == "OK"


def test_starttls_discards_pipelined_input(client):
    lines = client.send("STARTTLS\r\nLOGOUT\r\n")
    assert lines[-1] == "OK" and not client.closed


def test_authenticate_initial_response(client):
    client.cmd("STARTTLS")
    assert client.cmd(f'AUTHENTICATE "PLAIN" "{PLAIN}"')[-1].startswith("OK")
    assert client.server.user == ALICE


def test_authenticate_failure(client):
    client.cmd("STARTTLS")
    assert client.cmd(f'AUTHENTICATE "PLAIN" "{WRONG}"')[-1].startswith("NO")
    assert client.server.user is None
    assert client.cmd("LISTSCRIPTS")[-1].startswith("NO")


def test_authenticate_continuation_quoted_and_literal(client):
    client.cmd("STARTTLS")
    assert client.cmd('AUTHENTICATE "PLAIN"') == ['""']
    assert client.cmd(f'"{WRONG}"')[-1].startswith("NO")
    assert client.cmd('AUTHENTICATE "PLAIN"') == ['""']
    assert client.send(f"{{{len(PLAIN)}+}}\r\n{PLAIN}\r\n")[-1].startswith("OK")
    assert client.server.user == ALICE


def test_authenticate_continuation_cancel(client):
    client.cmd("STARTTLS")
    client.cmd('AUTHENTICATE "PLAIN"')
    assert client.cmd('"*"')[-1].startswith("NO")
    assert client.server.user is None


def test_authenticate_initial_response_literal(client):
    client.cmd("STARTTLS")
    assert client.send(f'AUTHENTICATE "PLAIN" {{{len(PLAIN)}+}}\r\n{PLAIN}\r\n')[-1].startswith("OK")


def test_putscript_literal_and_getscript(user):
    data = GOOD.encode()
    assert user.send(b'PUTSCRIPT "main" {%d+}\r\n%s\r\n' % (len(data), data)) == ["OK"]
    assert user.scripts.get(ALICE, "main") == GOOD
    assert user.raw() == b""
    user.server.dataReceived(b'GETSCRIPT "main"\r\n')
    assert user.raw() == b"{%d}\r\n%s\r\nOK\r\n" % (len(data), data)


def test_putscript_sync_literal_no_continuation(user):
    data = GOOD.encode()
    user.server.dataReceived(b'PUTSCRIPT "main" {%d}\r\n' % len(data))
    assert user.raw() == b""          # RFC 5804 §1.4: no continuation from the server
    assert user.send(data + b"\r\n") == ["OK"]


def test_putscript_quoted(user):
    assert user.cmd('PUTSCRIPT "q" "keep;"') == ["OK"]
    assert user.scripts.get(ALICE, "q") == "keep;"
    assert user.cmd('PUTSCRIPT "esc" "if header :is \\"x\\" \\"a\\\\b\\" { keep; }"') == ["OK"]
    assert user.scripts.get(ALICE, "esc") == 'if header :is "x" "a\\b" { keep; }'


def test_putscript_syntax_error(user):
    data = b"keep;\r\nfoo bar baz"
    reply = user.send(b'PUTSCRIPT "bad" {%d+}\r\n%s\r\n' % (len(data), data))
    assert reply[-1].startswith('NO "line 2, column ')
    assert user.cmd('GETSCRIPT "bad"')[-1].startswith("NO (NONEXISTENT)")


def test_checkscript(user):
    assert user.cmd('CHECKSCRIPT "keep;"') == ["OK"]
    reply = user.cmd('CHECKSCRIPT "fileinto \\"x\\";"')
    assert reply[-1].startswith('NO "line 1, column')
    assert user.scripts.list(ALICE) == []


def test_havespace(user):
    assert user.cmd('HAVESPACE "a" 100') == ["OK"]
    assert user.cmd('HAVESPACE "a" 999999')[-1].startswith("NO (QUOTA/MAXSIZE)")
    for name in ("a", "b", "c"):
        assert user.cmd(f'PUTSCRIPT "{name}" "keep;"') == ["OK"]
    assert user.cmd('HAVESPACE "d" 10')[-1].startswith("NO (QUOTA/MAXSCRIPTS)")
    assert user.cmd('PUTSCRIPT "d" "keep;"')[-1].startswith("NO (QUOTA/MAXSCRIPTS)")
    assert user.cmd('HAVESPACE "a" x')[-1].startswith("NO")


def test_listscripts_setactive(user):
    user.cmd('PUTSCRIPT "one" "keep;"')
    user.cmd('PUTSCRIPT "two" "discard;"')
    assert user.cmd('SETACTIVE "two"') == ["OK"]
    assert user.cmd("LISTSCRIPTS") == ['"one"', '"two" ACTIVE', "OK"]
    assert user.cmd('SETACTIVE "nope"')[-1].startswith("NO (NONEXISTENT)")
    assert user.cmd('SETACTIVE ""') == ["OK"]
    assert user.cmd("LISTSCRIPTS") == ['"one"', '"two"', "OK"]


def test_deletescript(user):
    user.cmd('PUTSCRIPT "one" "keep;"')
    user.cmd('SETACTIVE "one"')
    assert user.cmd('DELETESCRIPT "one"')[-1].startswith("NO (ACTIVE)")
    assert user.cmd('DELETESCRIPT "nope"')[-1].startswith("NO (NONEXISTENT)")
    user.cmd('SETACTIVE ""')
    assert user.cmd('DELETESCRIPT "one"') == ["OK"]
    assert user.cmd("LISTSCRIPTS") == ["OK"]


def test_renamescript(user):
    user.cmd('PUTSCRIPT "one" "keep;"')
    user.cmd('PUTSCRIPT "two" "keep;"')
    assert user.cmd('RENAMESCRIPT "one" "two"')[-1].startswith("NO (ALREADYEXISTS)")
    assert user.cmd('RENAMESCRIPT "nope" "x"')[-1].startswith("NO (NONEXISTENT)")
    assert user.cmd('RENAMESCRIPT "one" "three"') == ["OK"]
    assert user.cmd("LISTSCRIPTS") == ['"three"', '"two"', "OK"]


def test_noop_with_tag(client):
    assert client.cmd("NOOP") == ['OK "Done"']
    client.server.dataReceived(b'NOOP "STARTTLS-SYNC-42"\r\n')
    assert client.raw() == b'OK (TAG {16}\r\nSTARTTLS-SYNC-42) "Done"\r\n'


def test_unauthenticate(user):
    assert user.cmd("UNAUTHENTICATE") == ["OK"]
    assert user.server.user is None
    assert user.cmd("LISTSCRIPTS")[-1].startswith("NO")
    assert user.cmd("UNAUTHENTICATE")[-1].startswith("NO")


def test_logout(client):
    assert client.cmd("LOGOUT")[-1].startswith("OK")
    assert client.closed


def test_line_too_long(client):
    limit = client.server.line_limit()
    reply = client.send("NOOP " + "x" * (limit + 10))
    assert reply == ['NO "Line too long"']
    assert client.cmd(" tail") == []                  # the rest of that line is dropped
    assert client.cmd("NOOP") == ['OK "Done"']


def test_oversized_literal(user):
    size = user.scripts.max_script_size + 100000
    user.server.dataReceived(b'PUTSCRIPT "big" {%d+}\r\n' % size)
    for _ in range(size // 10000):
        user.server.dataReceived(b"x" * 10000)
    assert len(user.server._literal) == 0 and len(user.server._buffer) == 0     # nothing kept
    user.server.dataReceived(b"x" * (size % 10000))
    assert user.send(b"\r\n")[-1].startswith("NO (QUOTA/MAXSIZE)")
    assert user.scripts.list(ALICE) == []
    assert user.cmd("NOOP") == ['OK "Done"']


def test_unknown_command(client):
    assert client.cmd("FROBNICATE")[-1].startswith("NO")
    assert client.cmd('"quoted"')[-1].startswith("NO")
    assert client.cmd('PUTSCRIPT "a" "b"')[-1].startswith("NO")      # not authenticated


def test_too_many_errors_closes(client):
    for _ in range(client.factory.limits.max_errors):
        client.cmd("FROBNICATE")
    assert client.closed


def test_idle_timeout(client):
    client.clock.advance(client.factory.limits.command_timeout + 1)
    assert client.read()[-1].startswith("BYE")
    assert client.closed


def test_realm_sieve_avatar():
    realm = MailRealm(router=None, store=None, spool=None, clock=None)
    interface, avatar, logout = realm.requestAvatar("Alice@Example.TEST", None, ISieveAccount)
    assert interface is ISieveAccount and avatar.address == "alice@example.test"
    verifyObject(ISieveAccount, avatar)
    logout()


def test_too_many_auth_failures_close(client):
    client.cmd("STARTTLS")
    for _ in range(client.factory.limits.max_auth_failures):
        reply = client.cmd(f'AUTHENTICATE "PLAIN" "{WRONG}"')
    assert reply[-1].startswith("BYE")
    assert client.closed


def test_store_calls_go_through_run_in_thread_in_order(tmp_path):
    calls, held = [], []

    def run_in_thread(fn, *args):
        calls.append((fn.__name__, args))
        d = defer.Deferred()
        held.append((d, fn, args))
        return d

    c = Client(tmp_path, run_in_thread=run_in_thread)
    c.read()
    c.login()
    c.server.dataReceived(b'PUTSCRIPT "a" "keep;"\r\nLISTSCRIPTS\r\n')
    assert c.read() == [] and calls == [("put", (ALICE, "a", "keep;"))]
    d, fn, args = held.pop()
    d.callback(fn(*args))
    assert c.read() == ["OK"]                      # LISTSCRIPTS now waits in the pool
    d, fn, args = held.pop()
    d.callback(fn(*args))
    assert c.read() == ['"a"', "OK"]
