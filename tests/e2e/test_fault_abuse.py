"""End to end, issue 6 items 1 and 3d: abuse and faults against the real
`twistd mailgw` process, on every listener, with real sockets.

* connection floods: the per-address and per-listener limits refuse the
  excess connection with the protocol's own refusal and close it at once,
  and a freed slot is served again;
* password guessing: failures over SMTP, POP3 and IMAP from one address add
  up to one growing delay, each session is cut after its failures, guesses
  against a user from a new address are slowed too, and the real user,
  logging in from elsewhere meanwhile, gets in at once;
* slow and silent clients (slowloris): cut by the configured timers, the
  socket sees the close in bounded time;
* corruption: a garbage mailbox index or spool entry is logged and worked
  around, and mail keeps flowing.

The unit tests (tests/unit/test_checkers.py, test_smtp_limits.py,
test_*_security.py) pin the same rules with a fake clock; here the point is
that the running service wires them up: real sockets, real TLS, one shared
password checker, real files. Every wait is a socket timeout or bounded
polling with a deadline.
"""
from __future__ import annotations

import base64
import imaplib
import json
import os
import poplib
import socket
import ssl
import threading
import time
import uuid

import pytest

from conftest import LineConnection, tls_client_context
from sink import wait_until_queue_empty

pytestmark = pytest.mark.e2e

ALICE, PASSWORD = "alice@example.test", "secret"
GUESSER = "127.0.0.3"          # an untrusted client guessing passwords / flooding
LEGIT = "127.0.0.4"            # the real user, somewhere else
NEWCOMER = "127.0.0.5"         # another guesser, fresh address
TRUSTED = "127.0.0.2"          # conftest: trusted_networks = ["127.0.0.2/32"]
PROMPTLY = 1.0                 # seconds a close may take when the client cooperates (or on plain TCP)
CLOSE_WITHIN = 4.0             # seconds a close may take when a TLS client ignores our close_notify
IO_TIMEOUT = 10.0

class Conn(LineConnection):
    """A raw client connection (conftest.LineConnection) that also checks how
    the server closes it."""

    def __init__(self, port: int, *, source: str = "127.0.0.1", tls: bool = False):
        self.started = time.monotonic()
        super().__init__(port, source=source, tls=tls, timeout=IO_TIMEOUT)

    def wait_closed(self, within: float = PROMPTLY, *, answer_close_notify: bool = True) -> bytes:
        """Everything until the server closes the TCP connection; fails if it
        is still open after `within` s. On TLS the server's close_notify comes
        first: a polite client answers it, an abusive one does not (and keeps
        its end open); either way the server must close the TCP connection."""
        deadline = time.monotonic() + within
        rest, self.buffer = self.buffer, b""
        sock = self.sock
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"still open {within}s later; got {rest!r}")
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(4096)
            except (socket.timeout, TimeoutError):
                raise AssertionError(f"still open {within}s later; got {rest!r}") from None
            except ConnectionResetError:
                return rest
            if chunk:
                rest += chunk
                continue
            if not isinstance(sock, ssl.SSLSocket):
                return rest                              # FIN
            # TLS close_notify: now the TCP connection must end too.
            if answer_close_notify:
                try:
                    sock = sock.unwrap()
                except (OSError, ValueError):
                    return rest                          # closed meanwhile
            else:
                sock = socket.socket(fileno=os.dup(sock.fileno()))
                self.extra = sock

    def close(self) -> None:
        for sock in (self.sock, getattr(self, "extra", None)):
            try:
                if sock is not None:
                    sock.close()
            except OSError:
                pass


def assert_no_traceback(server) -> None:
    log = server.log_text(every_start=True)
    assert "Traceback" not in log and "Unhandled" not in log, server.log_tail(80)


# -- 1. connection floods ----------------------------------------------------

PER_IP, TOTAL = 3, 4
# listener -> (protocol, implicit TLS)
LISTENERS = {"relay": ("smtp", False), "submission": ("smtp", False), "submissions": ("smtp", True),
             "pop3": ("pop3", False), "pop3s": ("pop3", True), "imap": ("imap", False), "imaps": ("imap", True)}
GREETING = {"smtp": b"220 ", "pop3": b"+OK ", "imap": b"* OK "}
REFUSAL = {"smtp": b"421 4.7.0 Too many connections", "pop3": b"-ERR [SYS/TEMP] Too many connections",
           "imap": b"* BYE [UNAVAILABLE] Too many connections"}


@pytest.fixture(scope="module")
def limited(e2e, users_template, tmp_path_factory):
    """One server with max_connections_per_ip = 3 and max_connections = 4 on every listener."""
    limits = f"max_connections = {TOTAL}\nmax_connections_per_ip = {PER_IP}\n"
    server = e2e.MailServer(tmp_path_factory.mktemp("limits"), users_template=users_template,
                            extra=f"[pop3]\n{limits}\n[imap]\n{limits}",
                            smtp={"max_connections": TOTAL, "max_connections_per_ip": PER_IP})
    server.start()
    yield server
    server.forget()


def served(listener: str, port: int, source: str) -> Conn:
    protocol, implicit = LISTENERS[listener]
    conn = Conn(port, source=source, tls=implicit)
    greeting = conn.line()
    assert greeting.startswith(GREETING[protocol]), (listener, source, greeting)
    return conn


def refused(listener: str, port: int, source: str) -> None:
    """The connection gets the protocol's refusal and is closed promptly."""
    protocol, implicit = LISTENERS[listener]
    conn = Conn(port, source=source, tls=implicit)
    try:
        first = conn.line()
        assert first.startswith(REFUSAL[protocol]), (listener, source, first)
        assert conn.wait_closed() == b""                   # and nothing after the refusal
    finally:
        conn.close()


def served_soon(listener: str, port: int, source: str, within: float = 5.0) -> Conn:
    """A slot freed by a client's close is given out again (the server hears
    of the close asynchronously: poll with a deadline)."""
    protocol, implicit = LISTENERS[listener]
    deadline = time.monotonic() + within
    while True:
        conn = Conn(port, source=source, tls=implicit)
        first = conn.line()
        if first.startswith(GREETING[protocol]):
            return conn
        assert first.startswith(REFUSAL[protocol]), first
        conn.close()
        assert time.monotonic() < deadline, f"{listener}: slot not freed within {within}s"
        time.sleep(0.05)


@pytest.mark.parametrize("listener", list(LISTENERS))
def test_connection_flood_is_refused_with_the_protocols_reply_and_closed_not_left_hanging(limited, listener):
    port = limited.ports[listener]
    held: list[Conn] = []
    try:
        # Per address: 127.0.0.1 is not in trusted_networks, so not exempt on relay either.
        held += [served(listener, port, "127.0.0.1") for _ in range(PER_IP)]
        refused(listener, port, "127.0.0.1")
        # In total: a fourth client from another address fills the listener...
        held.append(served(listener, port, GUESSER))
        # ...and a fifth address, with no connection of its own, is refused.
        refused(listener, port, LEGIT)
        # Closing connections frees their slots: first for the other address, then for 127.0.0.1.
        held.pop(0).close()
        held.append(served_soon(listener, port, LEGIT))
        refused(listener, port, "127.0.0.1")               # the listener is full again
        held.pop(0).close()
        held.append(served_soon(listener, port, "127.0.0.1"))
    finally:
        for conn in held:
            conn.close()
    limited.wait_for_log(f"connection limit: refusing 127.0.0.1 on {listener}")
    limited.wait_for_log(f"connection limit: refusing {LEGIT} on {listener}")
    assert_no_traceback(limited)


# -- 2. password guessing across protocols ----------------------------------------

FAILURE_DELAY = 0.3          # [smtp] auth_failure_delay: the n-th failure waits 0.3 * 2**(n-1) s


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


def smtp_auth(server, source: str, password: str) -> tuple[Conn, bytes, float]:
    """Submission, STARTTLS, AUTH PLAIN: (connection, reply, seconds the reply took)."""
    conn = Conn(server.ports["submission"], source=source)
    assert conn.line().startswith(b"220 ")
    conn.send(b"EHLO client.example.net\r\n")
    conn.lines_until(b"250 ")
    assert conn.command(b"STARTTLS").startswith(b"220 ")
    conn.start_tls()
    conn.send(b"EHLO client.example.net\r\n")
    assert any(b"AUTH" in line for line in conn.lines_until(b"250 "))
    started = time.monotonic()
    reply = conn.command(b"AUTH PLAIN " + b64(f"\0{ALICE}\0{password}"))
    return conn, reply, time.monotonic() - started


def pop3_login(server, source: str, password: str) -> tuple[Conn, bytes, float]:
    conn = Conn(server.ports["pop3"], source=source)
    assert conn.line().startswith(b"+OK ")
    assert conn.command(b"STLS").startswith(b"+OK")
    conn.start_tls()
    assert conn.command(f"USER {ALICE}".encode()).startswith(b"+OK")
    started = time.monotonic()
    reply = conn.command(f"PASS {password}".encode())
    return conn, reply, time.monotonic() - started


def imap_login(server, source: str, password: str) -> tuple[Conn, bytes, float]:
    conn = Conn(server.ports["imap"], source=source)
    assert conn.line().startswith(b"* OK ")
    conn.send(b"a STARTTLS\r\n")
    assert conn.lines_until(b"a ")[-1].startswith(b"a OK")
    conn.start_tls()
    started = time.monotonic()
    conn.send(f'b LOGIN {ALICE} "{password}"\r\n'.encode())
    reply = conn.lines_until(b"b ")[-1]
    return conn, reply, time.monotonic() - started


def test_password_guessing_over_smtp_pop3_and_imap_adds_up_and_never_locks_out_the_real_user(make_server):
    server = make_server(extra="[pop3]\nmax_auth_failures = 1\n\n[imap]\nmax_auth_failures = 1\n",
                         smtp={"auth_failure_delay": FAILURE_DELAY, "max_auth_failures": 1}).start()
    expected = [FAILURE_DELAY * 2 ** n for n in range(4)]       # 0.3, 0.6, 1.2, 2.4

    # One address guesses alice's password over each protocol in turn. Every
    # session is cut after its (one allowed) failure: the temporary refusal.
    conn, reply, smtp_took = smtp_auth(server, GUESSER, "guess-1")
    assert reply.startswith(b"535 5.7.8"), reply
    assert conn.wait_closed().startswith(b"421 4.7.0 Too many failed authentications")
    conn.close()
    conn, reply, pop3_took = pop3_login(server, GUESSER, "guess-2")
    assert reply.startswith(b"-ERR [AUTH]"), reply
    assert conn.wait_closed().startswith(b"-ERR [AUTH] Too many authentication failures")
    conn.close()
    conn, reply, imap_took = imap_login(server, GUESSER, "guess-3")
    assert reply.startswith(b"b NO [AUTHENTICATIONFAILED]"), reply
    assert conn.wait_closed().startswith(b"* BYE Too many failed logins")
    conn.close()
    took = [smtp_took, pop3_took, imap_took]
    # The delay doubles across protocols: one counter for the address. (Each
    # answer also includes one argon2 verification, ~0.1-0.5 s, hence no upper
    # bound tighter than that.)
    for n, (actual, minimum) in enumerate(zip(took, expected), 1):
        assert minimum <= actual < minimum + 3.0, (n, took)
    assert took[0] < took[1] < took[2], took

    # A guess from a fresh address is held back by alice's own counter (the
    # 4th failure against her: 2.4 s). While it waits, alice logs in from
    # elsewhere over all three protocols, without any delay.
    guess: dict = {}

    def newcomer_guesses():
        conn, reply, seconds = imap_login(server, NEWCOMER, "guess-4")
        guess.update(reply=reply, took=seconds, answered=time.monotonic())
        conn.close()

    thread = threading.Thread(target=newcomer_guesses, daemon=True)
    thread.start()
    server.wait_for_log(f"authentication failed for '{ALICE}' from {NEWCOMER}")
    conn, reply, imap_ok = imap_login(server, LEGIT, PASSWORD)
    assert reply.startswith(b"b OK"), reply
    conn.command(b"c LOGOUT")
    conn.close()
    conn, reply, pop3_ok = pop3_login(server, LEGIT, PASSWORD)
    assert reply.startswith(b"+OK"), reply
    conn.command(b"QUIT")
    conn.close()
    conn, reply, smtp_ok = smtp_auth(server, LEGIT, PASSWORD)
    assert reply.startswith(b"235 "), reply
    conn.command(b"QUIT")
    conn.close()
    legit_done = time.monotonic()
    thread.join(IO_TIMEOUT)
    assert not thread.is_alive()
    assert guess["reply"].startswith(b"b NO [AUTHENTICATIONFAILED]")
    assert guess["took"] >= FAILURE_DELAY * 2 ** 3, guess       # alice's 4th failure, whoever guesses
    assert legit_done < guess["answered"], \
        f"the real user waited for the guesser ({imap_ok:.2f}/{pop3_ok:.2f}/{smtp_ok:.2f} s, guess {guess})"

    log = server.log_text()
    assert f"AUTH failed user='{ALICE}' client=[{GUESSER}]" in log
    assert f"pop3 login failed user='{ALICE}' client=[{GUESSER}]" in log
    assert f"IMAP login failed user='{ALICE}' client=[{GUESSER}]" in log
    assert log.count(f"authentication failed for '{ALICE}' from {GUESSER}") == 3
    assert f"authenticated {ALICE} from {LEGIT}" in log
    assert not any(f"guess-{n}" in log for n in range(1, 5)), "a password reached the log"
    assert_no_traceback(server)


def test_an_address_that_keeps_guessing_is_refused_for_a_while_on_every_protocol_and_no_one_else_is(make_server):
    server = make_server(smtp={"auth_lockout_failures": 3, "auth_lockout_time": 600.0}).start()
    locked, elsewhere = "127.0.0.8", "127.0.0.9"
    conn = Conn(server.ports["imap"], source=locked)
    assert conn.line().startswith(b"* OK ")
    conn.send(b"a STARTTLS\r\n")
    assert conn.lines_until(b"a ")[-1].startswith(b"a OK")
    conn.start_tls()
    for n in range(3):
        conn.send(f'g{n} LOGIN {ALICE} "guess-{n}"\r\n'.encode())
        assert conn.lines_until(f"g{n} ".encode())[-1].startswith(f"g{n} NO [AUTHENTICATIONFAILED]".encode())
    conn.close()
    # Now even the right password from that address is refused, with a temporary error.
    refusal = b"Too many failed logins from your address"
    for attempt_login, source, expected in [
            (imap_login, locked, b"b NO [UNAVAILABLE] " + refusal),
            (pop3_login, locked, b"-ERR [SYS/TEMP] " + refusal),
            (smtp_auth, locked, b"454 4.7.0 " + refusal),
            (imap_login, elsewhere, b"b OK")]:          # the user herself, elsewhere: not affected
        conn, reply, _ = attempt_login(server, source, PASSWORD)
        assert reply.startswith(expected), (attempt_login.__name__, reply)
        conn.close()
    log = server.log_text()
    assert f"{locked}: 3 failed logins in a row, refusing its logins for 600 s" in log
    assert log.count(f"login for '{ALICE}' from {locked} refused: locked out") == 3
    assert not any(f"guess-{n}" in log for n in range(3)) and PASSWORD not in log
    assert_no_traceback(server)


# -- 3. slow and silent clients --------------------------------------------------

SMTP_TIMEOUTS = {"command_timeout": 1.0, "data_timeout": 1.0, "session_timeout": 2.5}
POP3_TIMEOUTS = "[pop3]\ncommand_timeout = 1.0\nsession_timeout = 2.5\n"
IMAP_TIMEOUTS = "[imap]\nidle_timeout = 1.0\nlogin_timeout = 1.5\nsession_timeout = 2.5\n"
TRICKLE_PACE = 0.1          # seconds between two bytes of a trickling client


def trickle_until_closed(conn: Conn, payload: bytes, within: float) -> bytes:
    """Send one byte every TRICKLE_PACE s, never a line end, until the server
    says something; then read until it closes."""
    deadline = time.monotonic() + within
    payload = payload.replace(b"\r", b"").replace(b"\n", b"")
    sent = 0
    while True:
        assert time.monotonic() < deadline, f"still open after {within}s of trickling"
        try:
            conn.send(payload[sent % len(payload):][:1])
        except OSError:
            return b""                      # reset meanwhile
        sent += 1
        conn.sock.settimeout(TRICKLE_PACE)
        try:
            chunk = conn.sock.recv(4096)
        except (socket.timeout, TimeoutError):
            continue
        except ConnectionResetError:
            return b""
        if not chunk:
            return b""
        conn.buffer += chunk
        return conn.wait_closed(deadline - time.monotonic(), answer_close_notify=False)


def smtp_in_data(conn: Conn) -> None:
    assert conn.line().startswith(b"220 ")
    conn.send(b"EHLO client.example.net\r\n")
    conn.lines_until(b"250 ")
    assert conn.command(b"MAIL FROM:<slow@elsewhere.test>").startswith(b"250 ")
    assert conn.command(f"RCPT TO:<{ALICE}>".encode()).startswith(b"250 ")
    assert conn.command(b"DATA").startswith(b"354 ")
    conn.send(b"Subject: slow\r\n\r\nhalf a line")


def test_silent_and_byte_at_a_time_clients_are_cut_off_by_the_timers(make_server):
    server = make_server(extra=POP3_TIMEOUTS + "\n" + IMAP_TIMEOUTS, smtp=SMTP_TIMEOUTS).start()
    ports = server.ports
    results: dict[str, tuple[bytes, float] | BaseException] = {}

    def greeted(port: int, greeting: bytes, tls: bool = False) -> Conn:
        conn = Conn(port, tls=tls)
        assert conn.line().startswith(greeting)
        return conn

    def imap_logged_in() -> Conn:
        conn = Conn(ports["imaps"], tls=True)
        assert conn.line().startswith(b"* OK ")
        conn.send(f"a LOGIN {ALICE} {PASSWORD}\r\n".encode())
        assert conn.lines_until(b"a ")[-1].startswith(b"a OK")
        return conn

    def smtp_data() -> Conn:
        conn = Conn(ports["relay"])
        smtp_in_data(conn)
        return conn

    # name: (open the session, trickle payload or None for silence)
    clients = {
        "smtp silent": (lambda: greeted(ports["relay"], b"220 "), None),
        "smtps silent": (lambda: greeted(ports["submissions"], b"220 ", tls=True), None),
        "smtp trickle": (lambda: greeted(ports["relay"], b"220 "), b"EHLO slowloris.example.net"),
        "smtp silent in DATA": (smtp_data, None),
        "smtp trickle in DATA": (smtp_data, b"more and more text "),
        "pop3 silent": (lambda: greeted(ports["pop3"], b"+OK "), None),
        "pop3s silent": (lambda: greeted(ports["pop3s"], b"+OK ", tls=True), None),
        "pop3 trickle": (lambda: greeted(ports["pop3"], b"+OK "), b"USER alice@example.test"),
        "imap silent": (lambda: greeted(ports["imap"], b"* OK "), None),
        "imap trickle before login": (lambda: greeted(ports["imap"], b"* OK "), b"a LOGIN alice secret"),
        "imap trickle after login": (imap_logged_in, b"b SELECT INBOX"),
    }

    def run(name, open_session, payload):
        try:
            conn = open_session()
            try:
                if payload is None:
                    said = conn.wait_closed(10.0, answer_close_notify=False)
                else:
                    said = trickle_until_closed(conn, payload, within=10.0)
                results[name] = (said, time.monotonic() - conn.started)
            finally:
                conn.close()
        except BaseException as error:       # reported below, in the test's thread
            results[name] = error

    threads = [threading.Thread(target=run, args=(name, *spec), daemon=True) for name, spec in clients.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(15.0)
    assert not any(thread.is_alive() for thread in threads)

    # name: (what the server says before closing, the timer that must have fired)
    expected = {
        "smtp silent": (b"421 4.4.2 Timeout", 1.0),
        "smtps silent": (b"421 4.4.2 Timeout", 1.0),
        "smtp trickle": (b"421 4.4.2 Session time limit exceeded", 2.5),
        "smtp silent in DATA": (b"421 4.4.2 Timeout", 1.0),
        "smtp trickle in DATA": (b"421 4.4.2 Session time limit exceeded", 2.5),
        "pop3 silent": (b"-ERR Disconnected for inactivity", 1.0),
        "pop3s silent": (b"-ERR Disconnected for inactivity", 1.0),
        "pop3 trickle": (b"-ERR Session time limit exceeded", 2.5),
        "imap silent": (b"* BYE Autologout", 1.0),
        "imap trickle before login": (b"* BYE Login timeout", 1.5),
        "imap trickle after login": (b"* BYE Session time limit exceeded", 2.5),
    }
    problems = []
    for name, (said, timer) in expected.items():
        result = results.get(name)
        if isinstance(result, BaseException) or result is None:
            problems.append(f"{name}: {result!r}")
            continue
        text, elapsed = result
        # The trickling clients outlive the 1 s inactivity timers: each byte counts
        # as activity, only the session / login limit stops them.
        if not (text.startswith(said) and timer - 0.2 <= elapsed <= timer + CLOSE_WITHIN):
            problems.append(f"{name}: said {text!r} after {elapsed:.2f}s, expected {said!r} after ~{timer}s")
    assert not problems, "\n".join(problems)
    assert_no_traceback(server)


# -- 4. corruption keeps mail flowing ----------------------------------------------------

def deliver(server, mark: str) -> None:
    client = server.smtp("relay")
    client.sendmail("someone@elsewhere.test", [ALICE],
                    f"Subject: {mark}\r\nX-Test-Marker: {mark}\r\n\r\nhello\r\n".encode())
    client.quit()


def imap_view(server) -> tuple[int, dict[str, tuple[int, bytes]]]:
    """(UIDVALIDITY, {marker: (uid, flags)}) of alice's INBOX, over IMAPS."""
    client = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=tls_client_context(), timeout=IO_TIMEOUT)
    try:
        client.login(ALICE, PASSWORD)
        typ, _ = client.select("INBOX")
        assert typ == "OK"
        uidvalidity = int(client.response("UIDVALIDITY")[1][0])
        typ, data = client.uid("FETCH", "1:*", "(UID FLAGS BODY.PEEK[HEADER.FIELDS (X-TEST-MARKER)])")
        assert typ == "OK"
        view = {}
        for item in data:
            if not isinstance(item, tuple):
                continue
            meta, header = item
            mark = header.split(b":", 1)[1].strip().decode()
            uid = int(meta.split(b"UID ", 1)[1].split()[0].rstrip(b")"))
            # \Recent belongs to a session, not to the message: leave it out.
            flags = meta.split(b"FLAGS (", 1)[1].split(b")", 1)[0].replace(b"\\Recent", b"").strip()
            view[mark] = (uid, flags)
        client.logout()
        return uidvalidity, view
    except BaseException:
        client.shutdown()
        raise


def pop3_uidl(server) -> list[bytes]:
    client = poplib.POP3_SSL("127.0.0.1", server.ports["pop3s"], context=tls_client_context(), timeout=IO_TIMEOUT)
    try:
        client.user(ALICE)
        client.pass_(PASSWORD)
        return sorted(line.split()[1] for line in client.uidl()[1])
    finally:
        client.quit()


def test_garbage_mailbox_index_is_logged_and_rebuilt_with_the_same_uids(make_server):
    server = make_server().start()
    index = server.mailbox(ALICE) / "mailgw-index"
    marks = [uuid.uuid4().hex for _ in range(3)]
    for mark in marks:
        deliver(server, mark)
    _, first = imap_view(server)
    client = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=tls_client_context(), timeout=IO_TIMEOUT)
    client.login(ALICE, PASSWORD)
    client.select("INBOX")
    # By UID: new/ is taken in name order, not necessarily arrival order.
    assert client.uid("STORE", str(first[marks[1]][0]), "+FLAGS", "(\\Flagged)")[0] == "OK"
    client.logout()
    uidvalidity, before = imap_view(server)
    assert set(before) == set(marks) and b"\\Flagged" in before[marks[1]][1]
    cur = {name for name in os.listdir(server.mailbox(ALICE) / "cur")}
    assert {int(name.split(",U=")[1].split(":")[0]) for name in cur} == {uid for uid, _ in before.values()}
    assert index.read_bytes().startswith(b"mailgw-index 1 ")

    # While the server runs: the index becomes garbage.
    index.write_bytes(b"\x00\xff garbage \x89PNG\r\n" * 40)
    again, after = imap_view(server)
    assert again == uidvalidity and after == before           # same UIDs, flags kept (they are in the names)
    server.wait_for_log("index corrupt")
    assert index.read_bytes().startswith(b"mailgw-index 1 "), "the index was not rewritten"
    late = uuid.uuid4().hex
    deliver(server, late)
    again, after = imap_view(server)
    assert again == uidvalidity and {m: after[m] for m in marks} == before
    assert after[late][0] > max(uid for uid, _ in before.values())
    uidl = pop3_uidl(server)

    # While it is stopped: a torn index (header intact, the checksum fails), then a restart.
    server.stop()
    data = index.read_bytes()
    index.write_bytes(data[: len(data) * 2 // 3])
    server.start()
    again, restarted = imap_view(server)
    assert again == uidvalidity and restarted == after
    assert "index corrupt" in server.log_text()
    assert pop3_uidl(server) == uidl
    newest = uuid.uuid4().hex
    deliver(server, newest)
    _, final = imap_view(server)
    assert final[newest][0] > after[late][0] and {m: final[m] for m in after} == after
    assert_no_traceback(server)


def test_garbage_spool_entries_are_set_aside_at_start_and_queued_mail_still_goes_out(make_server, sink):
    # The smarthost is unreachable (port 1) at first: the relayed message stays queued.
    server = make_server(extra="[queue]\nretry_schedule = [1]\n").start()
    mark = uuid.uuid4().hex
    client = server.smtp("relay", source=TRUSTED)
    client.ehlo()
    queue_id = server.send(client, "sender@elsewhere.test", ["far@remote.test"],
                           server.build_message(mark, to="far@remote.test"))
    client.quit()
    server.wait_for_log(f"{queue_id}: to=<far@remote.test>")      # one failed attempt
    server.stop()

    active = server.queue_active
    assert sorted(os.listdir(active)) == [f"{queue_id}.env", f"{queue_id}.msg"]
    envelope = json.loads((active / f"{queue_id}.env").read_text())
    garbage = {
        "0000000000000001.env": b"\x00\xff{not json at all",                         # binary garbage
        "0000000000000001.msg": b"Subject: orphan\r\n\r\nbody\r\n",
        "0000000000000002.env": json.dumps({**envelope, "id": "0000000000000002", "version": 99}).encode(),
        "0000000000000002.msg": (active / f"{queue_id}.msg").read_bytes(),
        "0000000000000003.env": json.dumps({**envelope, "id": "0000000000000003"}).encode(),  # no .msg
        "leftover.tmp": b"what is this",
    }
    for name, data in garbage.items():
        (active / name).write_bytes(data)
    (active / "0000000000000004.env").mkdir()                                       # unreadable as a file

    # Restart with the smarthost reachable.
    text = server.config_path.read_text()
    unreachable = '[queue.smarthost]\nhost = "127.0.0.1"\nport = 1\n'
    assert unreachable in text
    server.config_path.write_text(text.replace(
        unreachable, f'[queue.smarthost]\nhost = "127.0.0.1"\nport = {sink.controller.port}\n'))
    server.start()
    sink.wait_for(1)
    (mail_from, rcpt_tos, content), = sink.messages
    assert rcpt_tos == ["far@remote.test"] and f"X-Test-Marker: {mark}".encode() in content
    wait_until_queue_empty(server)

    corrupt = server.data_dir / "queue" / "corrupt"
    assert os.listdir(active) == []
    assert sorted(os.listdir(corrupt)) == sorted([*garbage, "0000000000000004.env"])
    for name, data in garbage.items():
        assert (corrupt / name).read_bytes() == data, name               # set aside untouched
    log = server.log_text()
    for stem in ("0000000000000001", "0000000000000002", "0000000000000003", "0000000000000004"):
        assert f"'{stem}.env'] is corrupt" in log, stem
    assert "'leftover.tmp'] is corrupt (not a queue file)" in log
    assert_no_traceback(server)
