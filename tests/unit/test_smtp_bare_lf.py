"""Bare LF in DATA ([smtp] bare_newline), smuggling with it, and ASCII-only replies.

RFC 5321 §2.3.8 allows only CRLF; curl -T, smtplib.sendmail() with bytes and
many appliances send LF. Like Postfix's smtpd_forbid_bare_newline = normalize
with exclusions $mynetworks, trusted and authenticated clients get their LF
taken as CRLF, everyone else is refused; a bare CR is refused from all, and
only CRLF "." CRLF ends the data.
"""
from __future__ import annotations

import ast
import smtplib
from pathlib import Path

import pytest

from mailgw import config as config_module
from mailgw.config import ConfigError
from mailgw.errors import MailError
from mailgw.smtp import codes, server as server_module
from smtp_harness import Session

TRUSTED = "10.1.1.1"          # in the harness's trusted_networks
UNTRUSTED = "192.0.2.10"
REFUSED = "554 5.6.0 Message refused: bare CR or LF in message (RFC 5321 section 2.3.8)"


def start_data(s: Session, rcpt="alice@example.test", sender="x@elsewhere.test"):
    s.ehlo()
    assert s.last(f"MAIL FROM:<{sender}>").startswith("250 ")
    assert s.last(f"RCPT TO:<{rcpt}>").startswith("250 ")
    assert s.last("DATA").startswith("354 ")


def stored_body(s: Session) -> bytes:
    """The one stored message (wire form, CRLF), without our Received: header."""
    assert len(s.store.delivered) == 1, s.store.delivered
    message = s.store.delivered[0][1]
    assert b"\n" not in message.replace(b"\r\n", b""), "bare LF kept"
    _, _, rest = message.partition(b"; ")          # Received: ends with "; date"
    return rest.split(b"\r\n", 1)[1]


def authenticated(role="submissions", client=UNTRUSTED) -> Session:
    s = Session(role=role, client=client, tls=True, starttls=False)
    s.ehlo()
    assert s.login().startswith("235 ")
    return s


# -- who may send bare LF ---------------------------------------------------------
def test_trusted_network_client_bare_lf_is_normalized():
    s = Session(client=TRUSTED)
    start_data(s)
    assert s.send(b"Subject: lf\n\nline one\nline two\r\n.\r\n") == ["250 2.0.0 Ok: queued as Q000000000000001"]
    assert stored_body(s) == b"Subject: lf\r\n\r\nline one\r\nline two\r\n"


@pytest.mark.parametrize("role", ["submissions", "relay"])
def test_authenticated_client_bare_lf_is_normalized_and_relayed_as_crlf(role):
    # submissions (465) always authenticates; on relay (25) AUTH from an untrusted address does it.
    s = authenticated(role)
    start_data(s, rcpt="carol@remote.test", sender="alice@example.test")
    assert s.send(b"Subject: lf\n\nbody\n\r\n.\r\n")[0].startswith("250 2.0.0")
    (_, envelope, wire), = s.spool.queued
    assert wire.endswith(b"\r\nSubject: lf\r\n\r\nbody\r\n\r\n")
    assert b"\n" not in wire.replace(b"\r\n", b""), "bare LF passed on"
    assert envelope["size"] == len(wire)


def test_untrusted_unauthenticated_client_bare_lf_still_refused():
    s = Session(client=UNTRUSTED)
    start_data(s)
    assert s.send(b"Subject: lf\n\nbody\r\n.\r\n") == [REFUSED]
    assert s.store.delivered == []


@pytest.mark.parametrize("client", [TRUSTED, UNTRUSTED])
@pytest.mark.parametrize("mode", ["normalize-trusted", "normalize"])
def test_bare_cr_refused_whatever_the_setting(client, mode):
    s = Session(client=client, smtp={"bare_newline": mode})
    start_data(s)
    assert s.send(b"Subject: cr\r\n\r\nbody\rmore\r\n.\r\n") == [REFUSED]
    assert s.store.delivered == []


def test_reject_mode_refuses_trusted_and_authenticated_too():
    s = Session(client=TRUSTED, smtp={"bare_newline": "reject"})
    start_data(s)
    assert s.send(b"a\nb\r\n.\r\n") == [REFUSED]


def test_normalize_mode_accepts_everyone():
    s = Session(client=UNTRUSTED, smtp={"bare_newline": "normalize"})
    start_data(s)
    assert s.send(b"a\nb\r\n.\r\n")[0].startswith("250 2.0.0")
    assert stored_body(s) == b"a\r\nb\r\n"


# -- SMTP smuggling: for a client whose LF counts, LF "." LF is still not the end --------
@pytest.mark.parametrize("fake_end", [b"\n.\n", b"\r\n.\n", b"\n.\r\n"], ids=repr)
def test_smtp_smuggling_lf_dot_lf_never_ends_data_for_trusted_client(fake_end):
    s = Session(client=TRUSTED)
    start_data(s)
    # Nothing is answered at the fake end: the server is still in DATA.
    assert s.send(b"Subject: first\r\n\r\nbody" + fake_end) == []
    smuggled = (b"MAIL FROM:<spoof@example.test>\r\nRCPT TO:<victim@elsewhere.test>\r\nDATA\r\n"
                b"Subject: smuggled\r\n\r\nSMUGGLED\r\n.\r\n")
    # One reply for the one message the client really sent, and no second transaction.
    assert s.send(smuggled) == ["250 2.0.0 Ok: queued as Q000000000000001"]
    assert s.spool.queued == []
    body = stored_body(s)
    assert b"\r\nMAIL FROM:<spoof@example.test>\r\n" in body and body.endswith(b"SMUGGLED\r\n")
    # The lone "." line is unstuffed like any leading dot: nothing in the store could end DATA on relay.
    assert b"\r\n.\r\n" not in body
    assert s.last("NOOP") == "250 2.0.0 Ok"


# -- what real clients send ---------------------------------------------------------------
def test_what_curl_sends_is_stored_canonically():
    # curl 7.88 `-T file smtp://...` with an LF file (captured on the wire): no dot
    # stuffing after a bare LF, CRLF "." CRLF at the end. Leading dots are removed
    # as after any line end (Postfix's normalize does the same); curl --crlf avoids that.
    s = Session(client=TRUSTED)
    start_data(s)
    assert s.send(b"Subject: t\n\n.dot line\n.\nlast\r\n.\r\n")[0].startswith("250 2.0.0")
    assert stored_body(s) == b"Subject: t\r\n\r\ndot line\r\n\r\nlast\r\n"


def test_what_smtplib_sendmail_with_bytes_sends_round_trips():
    # smtplib.SMTP.data(): _fix_eols only for str; bytes keep their LF, dots are
    # stuffed after every LF, then CRLF (if missing) and ".\r\n".
    message = b"Subject: t\n\n.dot line\n..two\nlast\n"
    wire = smtplib._quote_periods(message)
    if wire[-2:] != b"\r\n":
        wire += b"\r\n"
    wire += b".\r\n"
    s = Session(client=TRUSTED)
    start_data(s)
    assert s.send(wire)[0].startswith("250 2.0.0")
    # smtplib's own CRLF after the last LF is an empty last line.
    assert stored_body(s) == message.replace(b"\n", b"\r\n") + b"\r\n"


def test_long_lf_line_still_refused():
    s = Session(client=TRUSTED)
    start_data(s)
    assert s.send(b"a\n" + b"X" * 1000 + b"\nb\r\n.\r\n")[0].startswith("554 5.6.0 Message refused: line longer")


# -- configuration ------------------------------------------------------------------------
def test_bare_newline_default_and_validation():
    assert config_module.load(None).smtp.bare_newline == "normalize-trusted"
    assert config_module.load(None, overrides={"smtp": {"bare_newline": "reject"}}).smtp.bare_newline == "reject"
    with pytest.raises(ConfigError) as error:
        config_module.load(None, overrides={"smtp": {"bare_newline": "yes"}})
    assert "smtp.bare_newline: must be one of reject, normalize-trusted, normalize" in str(error.value)


def test_bare_newline_documented_in_the_embedded_config():
    root = Path(__file__).parent.parent.parent
    embedded = (root / "mailgw" / "default.toml").read_text(encoding="utf-8")
    assert (root / "etc" / "mailgw.toml").read_text(encoding="utf-8") == embedded
    assert '\nbare_newline = "normalize-trusted"\n' in embedded


# -- RFC 5321 §2.4: replies are ASCII ---------------------------------------------------
def test_every_named_reply_is_ascii():
    replies = {name: value for name, value in vars(codes).items() if isinstance(value, codes.Reply)}
    assert len(replies) > 40
    offending = {name: reply.text for name, reply in replies.items() if not reply.text.isascii()}
    assert offending == {}


def test_every_reply_text_written_in_server_py_is_ascii():
    """String literals handed to the reply paths of server.py (reply texts
    written there rather than in codes.py)."""
    tree = ast.parse(Path(server_module.__file__).read_text(encoding="utf-8"))
    reply_calls = {"_send_line", "with_text", "Reply", "reply", "_close_with", "_auth_failed"}
    texts = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in reply_calls:
                texts += [c.value for arg in node.args for c in ast.walk(arg)
                          if isinstance(c, ast.Constant) and isinstance(c.value, str)]
    assert len(texts) > 10
    assert [text for text in texts if not text.isascii()] == []


def test_a_non_ascii_error_text_is_sent_as_ascii():
    s = Session()
    start_data(s)
    s.store.fail_with = MailError(451, "4.3.0", "Stockage indisponible \u00a7 r\u00e9essayez")
    s.server.dataReceived(b"body\r\n.\r\n")
    wire = s.transport.value()
    assert wire.isascii() and wire.startswith(b"451 4.3.0 Stockage indisponible ? r?essayez")
