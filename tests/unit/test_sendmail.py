"""`mailgw sendmail` (mailgw/sendmail.py) and the control socket's `submit` request.

The command side runs main() against a real UNIX socket served from a thread
by the real ControlProtocol (fed through a StringTransport, no reactor) with a
fake submitter; every socket operation has a timeout, nothing sleeps. The
server side is driven through StringTransport directly.
"""
from __future__ import annotations

import datetime
import io
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.internet.testing import StringTransport
from twisted.logger import Logger

from mailgw import sendmail
from mailgw.errors import MailError, PermanentError, StorageFull
from mailgw.queue import control
from mailgw.queue.control import ControlFactory

QUEUE_ID = "0000000000000ABC"
NOW = datetime.datetime(2026, 5, 9, 12, 30, 0, tzinfo=datetime.timezone(datetime.timedelta(hours=2)))
TIMEOUT = 10.0   # seconds: the bound on every socket wait in these tests


# -- fakes ---------------------------------------------------------------------------

class FakeSubmitter:
    """Records submissions; answers with `outcome`: a queue id, an exception
    to fail with, or None to hand back a Deferred the test fires."""

    def __init__(self, outcome=QUEUE_ID, max_size=None):
        self.outcome = outcome
        self.max_size = max_size
        self.calls = []
        self.deferreds = []

    def submit(self, sender, recipients, message, *, origin):
        self.calls.append((sender, recipients, message, origin))
        if self.outcome is None:
            d = defer.Deferred()
            self.deferreds.append(d)
            return d
        if isinstance(self.outcome, BaseException):
            return defer.fail(self.outcome)
        return defer.succeed(self.outcome)


class SocketTransport(StringTransport):
    """A StringTransport whose handle is a real socket (for SO_PEERCRED)."""

    def __init__(self, handle):
        super().__init__()
        self.handle = handle

    def getHandle(self):
        return self.handle


class ThreadServer:
    """One control connection at a time on a real UNIX socket, answered by
    the real ControlProtocol with no reactor: what arrives is fed to
    dataReceived, what it writes is sent back, and its loseConnection closes
    the socket without reading further (as Twisted would)."""

    def __init__(self, path: Path, submitter, *, max_size=None, hang_up_after_header=False):
        self.path = path
        self.events = []
        self.factory = ControlFactory(object(), submitter=submitter, max_size=max_size,
                                      log=Logger(observer=self.events.append))
        self.hang_up_after_header = hang_up_after_header
        self.received = b""
        self.error = None
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.listener.settimeout(TIMEOUT)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        try:
            conn, _ = self.listener.accept()
        except OSError as e:
            self.error = e
            return
        with conn:
            conn.settimeout(TIMEOUT)
            if self.hang_up_after_header:
                while b"\n" not in self.received:
                    self.received += conn.recv(65536)
                return                                   # a server that dies mid-request
            transport = SocketTransport(conn)
            protocol = self.factory.buildProtocol(None)
            protocol.makeConnection(transport)
            while True:
                out = transport.value()
                transport.clear()
                if out:
                    conn.sendall(out)
                if transport.disconnecting:
                    return
                data = conn.recv(65536)
                if not data:
                    return
                self.received += data
                protocol.dataReceived(data)

    def close(self):
        self.listener.close()
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive()


@pytest.fixture
def short_dir():
    # AF_UNIX paths are limited to ~107 octets; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="mgw", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Rig:
    def __init__(self, root: Path, monkeypatch):
        self.root = root
        self.data_dir = root / "data"
        self.data_dir.mkdir()
        self.config_path = root / "mailgw.toml"
        self.write_config()
        self.socket_path = control.socket_path(self.data_dir)
        self.server = None
        monkeypatch.delenv("MAILGW_CONFIG", raising=False)

    def write_config(self, max_message_size=100_000):
        self.config_path.write_text(
            "[server]\n"
            'hostname = "mx.example.test"\n'
            f'data_dir = "{self.data_dir}"\n'
            'local_domains = ["example.org", "a-example.net"]\n'
            "[smtp]\n"
            f"max_message_size = {max_message_size}\n")

    def serve(self, submitter=None, **kwargs):
        self.submitter = submitter if submitter is not None else FakeSubmitter()
        self.server = ThreadServer(self.socket_path, self.submitter, **kwargs)
        return self.submitter

    def run(self, *argv, stdin=b"Subject: hi\n\nbody\n", login="cron"):
        self.stderr = io.StringIO()
        status = sendmail.main(["--config", str(self.config_path), *argv], stdin=io.BytesIO(stdin),
                               stderr=self.stderr, now=lambda: NOW, login=login, answer_timeout=TIMEOUT)
        if self.server is not None:
            self.server.close()
            self.server = None
        return status

    def error_line(self) -> str:
        text = self.stderr.getvalue()
        assert text.count("\n") == 1 and text.startswith("mailgw sendmail: "), text
        return text


@pytest.fixture
def rig(short_dir, monkeypatch):
    rig = Rig(short_dir, monkeypatch)
    yield rig
    if rig.server is not None:
        rig.server.close()


# -- arguments ---------------------------------------------------------------------------

def test_plain_recipients_and_defaults():
    options = sendmail.parse_args(["a@example.org", "b@example.net"])
    assert options.recipients == ["a@example.org", "b@example.net"]
    assert options.dot_ends and not options.extract and options.sender is None and not options.verify


@pytest.mark.parametrize("argv, sender, name", [
    (["-f", "me@x.test", "-F", "Me Myself"], "me@x.test", "Me Myself"),
    (["-fme@x.test", "-FMe"], "me@x.test", "Me"),
    (["-r", "me@x.test"], "me@x.test", None),
    (["-tif", "me@x.test"], "me@x.test", None),     # a cluster ending in an option with a value
])
def test_sender_and_full_name_forms(argv, sender, name):
    options = sendmail.parse_args(argv + ["rcpt@x.test"])
    assert (options.sender, options.full_name, options.recipients) == (sender, name, ["rcpt@x.test"])


@pytest.mark.parametrize("argv", [["-i"], ["-oi"], ["-o", "i"], ["-ti"]])
def test_dot_option_forms(argv):
    assert sendmail.parse_args(argv).dot_ends is False


@pytest.mark.parametrize("ignored", [
    ["-oem"], ["-odi"], ["-odb"], ["-oQ/var/spool/mqueue"], ["-o", "x"], ["-v"], ["-B", "8BITMIME"],
    ["-B7BIT"], ["-N", "delay,failure"], ["-R", "hdrs"], ["-V", "envid1"], ["-bm"], ["-Am"], ["-U"], ["-G"],
    ["-h", "20"], ["-L", "label"], ["-C", "/etc/mail/sendmail.cf"], ["-m"], ["-O", "x=y"], ["-om"], ["-o8"],
])
def test_harmless_postfix_options_are_ignored(ignored):
    options = sendmail.parse_args(ignored + ["a@x.test"])
    assert options.recipients == ["a@x.test"]
    assert options.dot_ends and not options.extract and not options.verify


def test_options_end_at_the_first_recipient_but_config_is_still_seen():
    options = sendmail.parse_args(["a@x.test", "-t", "--config", "/etc/m.toml"])
    assert options.recipients == ["a@x.test", "-t"] and not options.extract
    assert options.config == "/etc/m.toml"
    assert sendmail.parse_args(["--", "-odd@x.test"]).recipients == ["-odd@x.test"]


@pytest.mark.parametrize("argv, message", [
    (["-Z"], "unknown option -Z"),
    (["-tZ"], "unknown option -Z"),
    (["--frobnicate"], "unknown option --frobnicate"),
    (["-f"], "option -f needs a value"),
    (["-bp"], "-bp is not supported"),
    (["-bs"], "-bs is not supported"),
    (["-q"], "option -q needs a value"),
    (["-q1h"], "-q1h is not supported"),
    (["-B", "BINARYMIME"], "-B needs 7BIT or 8BITMIME"),
    (["-bv"], "-bv needs an ADDRESS"),
    (["-t", "-bv", "a@x.test"], "-t cannot be used with -bv"),
    (["--config"], "--config needs a PATH"),
])
def test_usage_errors_exit_64_with_one_line(argv, message):
    stderr = io.StringIO()
    assert sendmail.main(argv, stdin=io.BytesIO(b""), stderr=stderr) == sendmail.EX_USAGE == 64
    text = stderr.getvalue()
    assert text.startswith("mailgw sendmail: ") and text.count("\n") == 1
    assert message in text


def test_help_goes_to_stdout(capsys):
    assert sendmail.main(["--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: mailgw sendmail")


# -- reading the message -----------------------------------------------------------------

def read(data: bytes, *, dot_ends=True, limit=10_000) -> bytes:
    return sendmail.read_message(io.BytesIO(data), dot_ends=dot_ends, limit=limit)


def test_a_dot_line_ends_the_message_without_i():
    assert read(b"Subject: x\n\none\n.\nnot read\n") == b"Subject: x\r\n\r\none\r\n"
    assert read(b"one\r\n.\r\nnot read\r\n") == b"one\r\n"
    assert read(b"one\n.") == b"one\r\n"                       # the last line, no newline


def test_with_i_a_dot_line_is_content():
    assert read(b"one\n.\ntwo\n", dot_ends=False) == b"one\r\n.\r\ntwo\r\n"


def test_only_a_lone_dot_ends_it():
    assert read(b"..\n .\n.x\n") == b"..\r\n .\r\n.x\r\n"      # no dot-stuffing: not SMTP


def test_line_ends_are_normalised_to_crlf():
    assert read(b"a\nb\r\nc\n\nd") == b"a\r\nb\r\nc\r\n\r\nd\r\n"
    assert read(b"bare\rcr\n") == b"bare\rcr\r\n"              # a CR inside a line is left alone
    assert read(b"") == b""


def test_a_crlf_cut_by_the_read_size_is_still_one_line_end(monkeypatch):
    monkeypatch.setattr(sendmail, "_READ", 4)
    assert read(b"abc\r\nabcdefg\r\nxyz\r\r\n.\r\n") == b"abc\r\nabcdefg\r\nxyz\r\r\n"
    # A dot that begins a long line is not a dot line.
    assert read(b".abcdefgh\n.\n") == b".abcdefgh\r\n"


def test_a_leading_mbox_from_line_is_dropped():
    assert read(b"From me@x Sat May  9 12:00:00 2026\n>From old\nSubject: x\n\nFrom here on\n") \
        == b"Subject: x\r\n\r\nFrom here on\r\n"


class EndlessInput:
    """stdin that never ends: counts what was taken from it."""

    def __init__(self):
        self.taken = 0

    def readline(self, limit):
        self.taken += limit
        return b"x" * (limit - 1) + b"\n"


def test_too_big_input_is_refused_without_reading_it_all():
    endless = EndlessInput()
    with pytest.raises(sendmail._Exit) as stop:
        sendmail.read_message(endless, dot_ends=False, limit=200_000)
    assert stop.value.status == 65 and "too big" in stop.value.message
    assert endless.taken <= 200_000 + 2 * sendmail._READ


# -- the header section --------------------------------------------------------------------

FOLDED = (b"Subject: a long subject\r\n"
          b"\tfolded with a tab\r\n"
          b"  and spaces\r\n")


def prepare(message: bytes, *, extract=False, sender="cron@example.org", full_name=None):
    return sendmail.prepare(message, extract=extract, sender_address=sender, full_name=full_name,
                            hostname="mx.example.test", now=NOW)


def headers_and_body(message: bytes) -> tuple[list[bytes], bytes]:
    head, _, body = message.partition(b"\r\n\r\n")
    return head.split(b"\r\n"), body


def test_missing_date_message_id_and_from_are_added():
    result = prepare(b"Subject: hi\r\n\r\nbody\r\n")
    lines, body = headers_and_body(result.message)
    assert lines[0] == b"Subject: hi"
    assert lines[1] == b"Date: Sat, 09 May 2026 12:30:00 +0200"
    assert lines[2].startswith(b"Message-ID: <") and lines[2].endswith(b"@mx.example.test>")
    assert lines[3] == b"From: cron@example.org"
    assert body == b"body\r\n"


def test_message_ids_are_unique():
    ids = {headers_and_body(prepare(b"\r\n").message)[0][1] for _ in range(50)}
    assert len(ids) == 50


def test_present_headers_are_not_added_again():
    message = (b"From: Someone <someone@example.org>\r\ndate: Fri, 08 May 2026 10:00:00 +0000\r\n"
               b"MESSAGE-ID: <x@y>\r\n\r\nbody\r\n")
    assert prepare(message).message == message


def test_from_uses_the_full_name():
    lines, _ = headers_and_body(prepare(b"\r\n", full_name="Cron Daemon, Esq.").message)
    assert b'From: "Cron Daemon, Esq." <cron@example.org>' in lines
    lines, _ = headers_and_body(prepare(b"\r\n", full_name="J\xf6rg").message)
    assert b"From: =?utf-8?q?J=C3=B6rg?= <cron@example.org>" in lines or \
        b"From: =?utf-8?b?SsO2cmc=?= <cron@example.org>" in lines


def test_a_full_name_cannot_inject_a_header():
    lines, _ = headers_and_body(prepare(b"\r\n", full_name="x\r\nBcc: victim@example.net").message)
    assert not any(line.startswith(b"Bcc:") for line in lines)
    assert sum(line.startswith(b"From:") for line in lines) == 1


def test_header_folding_is_kept_byte_for_byte():
    message = FOLDED + b"To: a@example.org,\r\n b@example.org\r\n\r\nbody\r\n"
    result = prepare(message, extract=True)
    assert result.message.startswith(message.partition(b"\r\n\r\n")[0] + b"\r\n")
    assert result.header_recipients == ["a@example.org", "b@example.org"]


def test_t_takes_to_cc_and_bcc_and_removes_bcc():
    message = (b"To: Alice <alice@example.org>, bob@example.net\r\n"
               b"Cc: \"Carol, C.\" <carol@example.org>\r\n"
               b"Bcc: dave@example.org,\r\n"
               b"\teve@example.org\r\n"
               b"Subject: hi\r\n"
               b"bcc: frank@example.org\r\n"
               b"\r\n"
               b"Bcc: not-a-header@example.org\r\n")
    result = prepare(message, extract=True)
    assert result.header_recipients == ["alice@example.org", "bob@example.net", "carol@example.org",
                                        "dave@example.org", "eve@example.org", "frank@example.org"]
    lines, body = headers_and_body(result.message)
    assert not any(line.lower().startswith(b"bcc") or b"eve@" in line for line in lines)
    assert lines[:3] == [b"To: Alice <alice@example.org>, bob@example.net",
                         b"Cc: \"Carol, C.\" <carol@example.org>", b"Subject: hi"]
    assert body == b"Bcc: not-a-header@example.org\r\n"        # the body is not parsed


def test_bcc_is_removed_without_t_too_but_not_used():
    result = prepare(b"To: a@example.org\r\nBcc: secret@example.org\r\n\r\nx\r\n")
    assert result.header_recipients == []
    assert b"secret" not in result.message


def test_without_a_header_section_the_body_is_kept_and_headers_put_before_it():
    result = prepare(b"just a line of text\r\nTo: in the body\r\n")
    lines, body = headers_and_body(result.message)
    assert [line.split(b":")[0] for line in lines] == [b"Date", b"Message-ID", b"From"]
    assert body == b"just a line of text\r\nTo: in the body\r\n"


def test_the_body_is_passed_on_untouched():
    body = b"line\r\n\r\n  indented\r\n\xff\xfe binary-ish\r\n.\r\n"
    result = prepare(b"Subject: x\r\n\r\n" + body)
    assert result.message.endswith(b"\r\n\r\n" + body)


def test_group_syntax_and_empty_lists_give_no_recipients():
    result = prepare(b"To: undisclosed-recipients:;\r\nCc: \r\n\r\n", extract=True)
    assert result.header_recipients == []


# -- sending through the control socket (main, real socket, real protocol) -------------------------

def test_a_message_is_queued_silently(rig, capsys):
    submitter = rig.serve()
    status = rig.run("-F", "Cron Daemon", "root", "Bob <bob@Example.NET>, bob@example.net",
                     stdin=b"Subject: report\nX-Long: one\n two\n\nall fine\n.\nignored\n")
    assert status == 0
    assert rig.stderr.getvalue() == "" and capsys.readouterr().out == ""
    ((sender, recipients, message, origin),) = submitter.calls
    assert sender == "cron@example.org"                           # login @ first local domain
    assert recipients == ["root@example.org", "bob@Example.NET"]  # qualified, each once
    assert origin == {"uid": os.getuid(), "login": "cron"}        # uid from SO_PEERCRED
    assert message.startswith(b"Subject: report\r\nX-Long: one\r\n two\r\nDate: Sat, 09 May 2026 12:30:00 +0200\r\n")
    assert b"\r\nFrom: Cron Daemon <cron@example.org>\r\n\r\nall fine\r\n" in message
    assert message.endswith(b"\r\n\r\nall fine\r\n")
    assert b"\n" not in message.replace(b"\r\n", b"")


def test_wire_format_is_one_json_line_then_the_octets(rig):
    rig.serve()
    server = rig.server
    assert rig.run("-f", "<>", "-i", "a@example.org", stdin=b"Subject: x\n\n.\n") == 0
    header, _, octets = server.received.partition(b"\n")
    request = json.loads(header)
    assert request == {"cmd": "submit", "sender": "", "recipients": ["a@example.org"], "size": len(octets),
                       "local_user": "cron", "uid": os.getuid()}
    assert octets.endswith(b"\r\n\r\n.\r\n")                      # -i: the dot is content


def test_t_adds_header_recipients_to_the_arguments(rig):
    submitter = rig.serve()
    stdin = b"To: a@example.org\nCc: b@example.org\nBcc: hidden@example.org\nSubject: x\n\nbody\n"
    assert rig.run("-t", "extra@example.org", "a@example.org", stdin=stdin) == 0
    ((_, recipients, message, _),) = submitter.calls
    assert recipients == ["extra@example.org", "a@example.org", "b@example.org", "hidden@example.org"]
    assert b"hidden" not in message and b"Bcc" not in message


def test_no_recipients_is_a_data_error_and_nothing_is_sent(rig):
    assert rig.run() == 65
    assert "no recipients" in rig.error_line()
    assert rig.run("-t", stdin=b"Subject: no To\n\nx\n") == 65


def test_no_server_socket_is_a_temporary_failure(rig):
    assert rig.run("a@example.org") == 75
    assert "mailgw is not running" in rig.error_line()


def test_a_stale_socket_is_a_temporary_failure(rig):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(rig.socket_path))
    stale.close()
    assert rig.run("a@example.org") == 75
    assert "mailgw is not running" in rig.error_line()


def test_a_4xx_answer_is_a_temporary_failure(rig):
    rig.serve(FakeSubmitter(StorageFull()))
    assert rig.run("a@example.org") == 75
    assert rig.error_line() == "mailgw sendmail: not queued, try again later: 452 4.3.1 Insufficient system storage\n"


def test_a_5xx_answer_is_a_data_error(rig):
    rig.serve(FakeSubmitter(PermanentError(550, "5.1.1", "No such user here")))
    assert rig.run("nobody@example.org") == 65
    assert rig.error_line() == "mailgw sendmail: refused: 550 5.1.1 No such user here\n"


def test_a_server_without_submission_is_unavailable(rig):
    rig.server = ThreadServer(rig.socket_path, None)
    assert rig.run("a@example.org") == 69
    assert "submission not available" in rig.error_line()


def test_a_bug_in_the_server_is_a_temporary_failure_without_details(rig):
    rig.serve(FakeSubmitter(RuntimeError("secret detail")))
    server = rig.server
    assert rig.run("a@example.org") == 75
    line = rig.error_line()
    assert "internal error" in line and "secret" not in line
    assert any(event.get("log_failure") for event in server.events)


def test_a_server_that_hangs_up_without_answering_is_a_temporary_failure(rig):
    rig.server = ThreadServer(rig.socket_path, FakeSubmitter(), hang_up_after_header=True)
    assert rig.run("a@example.org") == 75
    assert "closed the control connection without answering" in rig.error_line()


def test_too_big_input_is_a_data_error_before_connecting(rig):
    rig.write_config(max_message_size=2000)
    assert rig.run("a@example.org", stdin=b"Subject: x\n\n" + b"y" * 3000 + b"\n") == 65
    assert "message too big" in rig.error_line()


def test_the_server_refuses_a_big_message_before_reading_it(rig):
    # The command's limit (config) is above the server's: the server answers
    # the header at once and hangs up; the command still reads that answer,
    # although its octets could not all be written.
    rig.write_config(max_message_size=8_000_000)
    submitter = rig.serve(max_size=1024)
    server = rig.server
    status = rig.run("a@example.org", stdin=b"Subject: x\n\n" + b"y" * 4_000_000 + b"\n")
    assert status == 65
    assert "refused: 552 5.3.4 message too big" in rig.error_line()
    assert submitter.calls == []
    assert len(server.received) < 4_000_000


def test_bad_config_exits_78(rig):
    rig.config_path.write_text("[server]\nno_such_key = 1\n")
    assert rig.run("a@example.org") == 78
    assert "configuration error" in rig.error_line()


def test_bv_calls_resolve(rig, monkeypatch):
    import types
    calls = []
    fake = types.ModuleType("mailgw.routing.admin")
    fake.resolve_main = lambda argv: calls.append(argv) or 0
    monkeypatch.setitem(sys.modules, "mailgw.routing.admin", fake)
    assert rig.run("-bv", "root", "a@example.org") == 0
    assert calls == [["--config", str(rig.config_path), "root", "a@example.org"]]
    fake.resolve_main = lambda argv: 1
    assert rig.run("-bv", "nobody") == 65


def test_bv_without_the_resolver_says_so(rig, monkeypatch):
    monkeypatch.setitem(sys.modules, "mailgw.routing.admin", None)   # import raises ImportError
    assert rig.run("-bv", "root") == 69
    assert "-bv is not available" in rig.error_line()


# -- the server side: `submit` through ControlProtocol ------------------------------------------------

class Connection:
    def __init__(self, submitter=None, *, max_size=None):
        self.events = []
        self.submitter = submitter
        self.factory = ControlFactory(FakeRunner(), submitter=submitter, max_size=max_size,
                                      log=Logger(observer=self.events.append))
        self.protocol = self.factory.buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes):
        self.protocol.dataReceived(data)

    def answers(self):
        data = self.transport.value()
        self.transport.clear()
        assert data == b"" or data.endswith(b"\n")
        for line in data.split(b"\n")[:-1]:
            assert b"Traceback" not in line
            line.decode("ascii")
        return [json.loads(line) for line in data.split(b"\n")[:-1]]


class FakeRunner:
    def __init__(self):
        self.flushed = []

    def snapshot(self):
        return []

    def flush(self, ids=None):
        self.flushed.append(ids)
        return []


def submit_header(size, **extra):
    request = {"cmd": "submit", "sender": "cron@example.org", "recipients": ["a@example.org"], "size": size,
               "local_user": "cron", "uid": 1000, **extra}
    return json.dumps(request).encode() + b"\n"


MESSAGE = b"Subject: x\r\n\r\nline one\r\n{\"cmd\": \"list\"}\r\n"


def test_submit_framing_split_across_many_reads():
    connection = Connection(FakeSubmitter())
    stream = submit_header(len(MESSAGE)) + MESSAGE + b'{"cmd": "list"}\n'
    for octet in range(len(stream)):
        connection.send(stream[octet:octet + 1])
    assert connection.answers() == [{"ok": True, "result": {"queue_id": QUEUE_ID}},
                                    {"ok": True, "result": []}]
    ((sender, recipients, message, origin),) = connection.submitter.calls
    assert (sender, recipients, message) == ("cron@example.org", ["a@example.org"], MESSAGE)
    assert origin == {"uid": None, "login": "cron"}       # StringTransport: no peer credentials
    assert not connection.transport.disconnecting


def test_submit_in_one_chunk_with_requests_around_it():
    connection = Connection(FakeSubmitter())
    connection.send(b'{"cmd": "list"}\n' + submit_header(len(MESSAGE)) + MESSAGE
                    + submit_header(0) + b'{"cmd": "list"}\n')
    answers = connection.answers()
    assert [a["ok"] for a in answers] == [True, True, True, True]
    assert [call[2] for call in connection.submitter.calls] == [MESSAGE, b""]


def test_submit_answers_in_order_and_reads_nothing_more_meanwhile():
    submitter = FakeSubmitter(outcome=None)
    connection = Connection(submitter)
    connection.send(submit_header(len(MESSAGE)) + MESSAGE)
    assert connection.answers() == []
    assert connection.transport.producerState == "paused"     # one message in memory per connection
    submitter.deferreds[0].callback("0000000000000XYZ")
    assert connection.answers() == [{"ok": True, "result": {"queue_id": "0000000000000XYZ"}}]
    assert connection.transport.producerState == "producing"


def test_an_oversize_submit_is_refused_before_reading_and_closed():
    connection = Connection(FakeSubmitter(), max_size=1000)
    connection.send(submit_header(1001))
    assert connection.answers() == [{"ok": False, "error": "message too big: 1001 octets, the limit is 1000",
                                     "code": 552, "enhanced": "5.3.4"}]
    assert connection.transport.disconnecting
    connection.send(b"x" * 1001 + b'{"cmd": "list"}\n')   # what was on its way is ignored
    assert connection.answers() == []
    assert connection.submitter.calls == []


def test_the_size_limit_defaults_to_the_submitters():
    connection = Connection(FakeSubmitter(max_size=10))
    connection.send(submit_header(11))
    assert connection.answers()[0]["code"] == 552


def test_a_mail_error_from_the_submitter_goes_back_with_its_codes():
    connection = Connection(FakeSubmitter(MailError(550, "5.7.1", "Sender not allowed")))
    connection.send(submit_header(len(MESSAGE)) + MESSAGE)
    assert connection.answers() == [{"ok": False, "error": "Sender not allowed", "code": 550, "enhanced": "5.7.1"}]
    assert not connection.transport.disconnecting


def test_an_unexpected_exception_is_logged_and_answered_generically():
    connection = Connection(FakeSubmitter(ZeroDivisionError("secret")))
    connection.send(submit_header(len(MESSAGE)) + MESSAGE)
    (answer,) = connection.answers()
    assert answer == {"ok": False, "error": "internal error (see the server log)", "code": 451, "enhanced": "4.3.0"}
    failures = [event for event in connection.events if event.get("log_failure")]
    assert failures and failures[0]["log_failure"].check(ZeroDivisionError)


def test_a_submitter_that_raises_synchronously_is_handled_too():
    class Raising:
        def submit(self, sender, recipients, message, *, origin):
            raise PermanentError(554, "5.5.1", "No recipients")
    connection = Connection(Raising())
    connection.send(submit_header(2) + b"\r\n")
    assert connection.answers() == [{"ok": False, "error": "No recipients", "code": 554, "enhanced": "5.5.1"}]


def test_without_a_submitter_submit_is_not_available():
    connection = Connection(None)
    connection.send(b'{"cmd": "list"}\n' + submit_header(len(MESSAGE)) + MESSAGE)
    assert connection.answers() == [{"ok": True, "result": []}, {"ok": False, "error": "submission not available"}]
    assert connection.transport.disconnecting


@pytest.mark.parametrize("bad", [
    {"size": -1}, {"size": "10"}, {"size": True}, {"size": None}, {"sender": None}, {"recipients": "a@x"},
    {"recipients": [1]}, {"local_user": 5},
])
def test_malformed_submit_headers_are_refused_and_closed(bad):
    connection = Connection(FakeSubmitter())
    connection.send(submit_header(**{"size": 10, **bad}))
    (answer,) = connection.answers()
    assert answer["ok"] is False and answer["error"].startswith("bad request")
    assert connection.transport.disconnecting
    assert connection.submitter.calls == []


def test_a_connection_lost_mid_message_submits_nothing():
    connection = Connection(FakeSubmitter())
    connection.send(submit_header(len(MESSAGE)) + MESSAGE[:5])
    connection.protocol.connectionLost(None)
    assert connection.submitter.calls == []


def test_peer_uid_comes_from_so_peercred():
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        assert control.peer_uid(SocketTransport(left)) == os.getuid()
    assert control.peer_uid(StringTransport()) is None


def test_control_service_passes_the_submitter_on():
    submitter = FakeSubmitter(max_size=1234)
    service = control.control_service(None, "/nonexistent/control.sock", FakeRunner(), submitter)
    assert service.factory.submitter is submitter and service.factory.max_size == 1234
    assert control.control_service(None, "/x", FakeRunner()).factory.submitter is None
