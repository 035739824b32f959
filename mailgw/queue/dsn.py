"""Delivery status notifications (RFC 3464) for the relay queue.

`build_dsn` makes the whole message, as CRLF bytes ready to spool: a
`multipart/report; report-type=delivery-status` (RFC 6522, formerly 3462)
with

1. a text/plain explanation for people (addresses and remote replies, no
   internals);
2. `message/delivery-status`: the per-message and per-recipient fields;
3. the returned content, chosen by `returned_content`:

   ===================  =========================================================
   DSN kind             third part
   ===================  =========================================================
   failure, RET=FULL    the whole message (message/rfc822)
   failure, no RET      the whole message: RFC 3461 §4.3 leaves it to the MTA,
                        and the whole message is what senders expect (Postfix
                        does the same)
   failure, RET=HDRS    its headers only (text/rfc822-headers)
   delay, success       its headers only, whatever RET says: RFC 3461 §4.3 / §6.2,
                        a DSN without failures returns only the headers
   ===================  =========================================================

   A message larger than `RETURN_LIMIT` (100 KiB) is never returned whole:
   its headers are, even with RET=FULL (RFC 3461 §6.2 allows exactly this:
   "the MTA MAY return only the headers even if the RET parameter specified
   FULL"). We do not cut the body at the limit instead: a truncated MIME body
   is a broken message, and the headers identify the message just as well.

   Returned content is copied byte for byte, never parsed or re-encoded: its
   headers stay intact (folding, DKIM signatures), 8-bit bodies pass through
   (the part is then labelled 8bit and the DSN needs BODY=8BITMIME), and a
   broken original cannot make the DSN fail. Headers with raw UTF-8 (an
   SMTPUTF8 message) make the part message/global or message/global-headers
   (RFC 6532 §3.7, RFC 6533 §6.3). Content that cannot be carried (a line over
   998 octets, which our SMTP server never accepts) falls back to the headers,
   then to nothing.

Who gets a DSN is decided by `should_send`, per recipient (the runner puts
only those recipients into a report, RFC 3461 §5.2.8). The DSN's own envelope
comes from `notice_envelope`: null reverse-path, the original sender as the
only recipient with NOTIFY=NEVER, no RET, no ENVID (RFC 3461 §6.1).

The envelope is a mailgw.queue.envelope.Envelope; each recipient of a report
is a `NoticeRecipient`: the envelope recipient's `address`, `orcpt` and
`notify` (`NoticeRecipient.of`), and what the runner learnt from the attempt
(model.AttemptResult):

* `relay` (str): AttemptResult.relay, "host[ip]:port" of the server that
  answered; gives Remote-MTA (RFC 3461 §6.3 (h)).
* `dsn_relayed` (bool): AttemptResult.dsn_relayed. True means the next hop
  took NOTIFY and reports success itself, so `should_send` refuses a success
  DSN (RFC 3461 §5.2.1 (c)).
* `final_delivery` (bool): True when we put the message into the recipient's
  mailbox ourselves: a success is then Action "delivered" (§5.2.3 (a)).
  Otherwise a success is what the relay queue does, a hand-off to a next hop
  that does not do DSN: Action "relayed" (§5.2.2 (b)).
* `last_attempt` (float): unix time of the last attempt for Last-Attempt-Date
  (default: `now` when there is a result, else the field is left out).
"""
from __future__ import annotations

import ipaddress
import re
import textwrap
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from email.generator import BytesGenerator
from email.message import EmailMessage, Message, MIMEPart
from email.policy import SMTP, SMTPUTF8, compat32
from email.utils import format_datetime
from io import BytesIO

from mailgw.queue import model, policy
from mailgw.queue.envelope import Envelope, EnvelopeClient, EnvelopeRecipient
from mailgw.queue.model import RecipientResult
from mailgw.queue.policy import KIND_DELAY, KIND_FAILURE, KIND_SUCCESS, KINDS

# Larger messages are returned as headers only (RFC 3461 §6.2).
RETURN_LIMIT = 100 * 1024

# RFC 5322 §2.1.1 / RFC 5321 §4.5.3.1.6: at most 998 octets a line; 78 is the
# SHOULD we fold our own fields to.
MAX_LINE = 998
FOLD_AT = 78
# One unbreakable token (an escaped address) must fit a line with its field name.
MAX_TOKEN = 900

SUBJECTS = {
    KIND_FAILURE: "Undelivered Mail Returned to Sender",
    KIND_DELAY: "Delayed Mail (still being retried)",
    KIND_SUCCESS: "Successful Mail Delivery Report",
}

# RFC 3464 §2.3.3 Action values.
ACTION_FAILED = "failed"
ACTION_DELAYED = "delayed"
ACTION_DELIVERED = "delivered"
ACTION_RELAYED = "relayed"

# RFC 3461 §6.3 (g): 4.0.0 / 5.0.0 when nothing more specific fits;
# RFC 3463 X.4.7: delivery time expired.
STATUS_EXPIRED = "4.4.7"
_DEFAULT_STATUS = {ACTION_FAILED: "5.0.0", ACTION_DELAYED: "4.0.0",
                   ACTION_DELIVERED: "2.0.0", ACTION_RELAYED: "2.0.0"}
_ENHANCED = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")

# Our own parts are folded by us; the returned message is written as it is.
_POLICY = SMTP.clone(refold_source="none")
_POLICY_UTF8 = SMTPUTF8.clone(refold_source="none")   # for a UTF-8 sender address (RFC 6531/6532)

# The session a notice "came from" (the envelope's client; nobody's session).
NOTICE_CLIENT = EnvelopeClient(ip="127.0.0.1", helo=None, tls=False, auth=None, listener="dsn")

_MESSAGE_ID = re.compile(rb"(?im)^message-id:[ \t]*(?:\r\n[ \t]+)?(<[\x21-\x3b\x3d\x3f-\x7e]{1,250}>)")


class _Generator(BytesGenerator):
    # The returned message is attached as raw text: a message/rfc822 part whose
    # payload is a str, the stdlib generator's own path for unparsed message
    # parts (generator.py, "Issue 7970"). Its bytes travel as surrogateescapes,
    # which BytesGenerator._encode refuses; write them back as the bytes they were.
    def _encode(self, s):
        return s.encode("ascii", "surrogateescape")


@dataclass(frozen=True)
class NoticeRecipient:
    """A recipient as a report tells of it (see the module docstring)."""
    address: str
    orcpt: str | None = None
    notify: tuple[str, ...] | None = None
    relay: str | None = None
    dsn_relayed: bool = False
    final_delivery: bool = False
    last_attempt: float | None = None

    @classmethod
    def of(cls, entry: EnvelopeRecipient, **attempt) -> NoticeRecipient:
        return cls(entry.address, entry.orcpt, entry.notify, **attempt)


def should_send(kind: str, envelope: Envelope, recipient: NoticeRecipient) -> bool:
    """Whether `recipient` of `envelope` belongs in a DSN of `kind`."""
    # RFC 3461 §5.2 / RFC 5321 §4.5.5: never a DSN to the null reverse-path
    # (a DSN about a DSN would loop).
    if not envelope.sender:
        return False
    # RFC 3461 §5.2.1 (c): a DSN-capable next hop got NOTIFY and reports success itself.
    if kind == KIND_SUCCESS and recipient.dsn_relayed is True:
        return False
    notify = recipient.notify
    return policy.wants_notice(None if notify is None else tuple(notify), kind)


def notice_envelope(envelope: Envelope, dsn: bytes, *, queue_id: str, now: float,
                    to: list[str] | None = None) -> Envelope:
    """The spool envelope of a DSN about `envelope` (RFC 3461 §6.1), queued
    as `queue_id` at `now`, to the original sender or, when given, to the
    addresses `to` (where resolving the sender led)."""
    sender = envelope.sender
    return Envelope(
        id=queue_id, arrival=now,
        sender="",                                  # §6.1 / RFC 5321 §4.5.5: null reverse-path
        sender_utf8=not sender.isascii(),           # a UTF-8 recipient needs SMTPUTF8 (RFC 6531)
        body="7BIT" if dsn.isascii() else "8BITMIME",   # RFC 6152: 8-bit returned content
        size=len(dsn),
        envid=None,                                 # §6.1: a new ENVID MAY be used; we use none
        ret=None,                                   # §6.1: RET MUST NOT be used
        client=NOTICE_CLIENT,
        # §6.1: the address copied from the original MAIL FROM; NOTIFY MAY be used, but only NEVER.
        recipients=[EnvelopeRecipient(address, orcpt=None, notify=("NEVER",), state=model.PENDING)
                    for address in (to if to is not None else [sender])],
        attempts=0, next_attempt=now, history=[])


def build_dsn(kind: str, envelope: Envelope, recipients: list[tuple[NoticeRecipient, RecipientResult | None]], *,
              reporting_mta: str, now: float, original: bytes | None,
              will_retry_until: float | None = None, return_limit: int = RETURN_LIMIT) -> bytes:
    """A complete RFC 3464 DSN of `kind` (policy.KIND_*) about `recipients`.

    `recipients` pairs each envelope recipient entry with the last result for
    it (None when there was none, e.g. never attempted). `original` is the
    spooled message (None: not available, no third part). For a delay DSN,
    `will_retry_until` is the end of the lifetime (policy.deadline).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown DSN kind {kind!r}")
    if not recipients:
        raise ValueError("a DSN needs at least one recipient")      # RFC 3464 §2.1
    sender = envelope.sender
    if not sender:
        raise ValueError("no DSN to the null reverse-path")          # RFC 3461 §5.2
    host = _printable(reporting_mta) or "localhost"

    entries = [_Entry(kind, rcpt, result, now) for rcpt, result in recipients]
    status = MIMEPart(policy=_POLICY)
    status["Content-Type"] = "message/delivery-status"
    status["Content-Description"] = "Delivery report"
    status.set_payload(_status_blocks(envelope, host, entries, will_retry_until if kind == KIND_DELAY else None))
    message_id = _MESSAGE_ID.search(_header_section(_crlf(original))) if original else None
    outer_policy = _POLICY if sender.isascii() else _POLICY_UTF8

    for content in returned_content(kind, envelope.ret, original, return_limit):
        text = _human_text(kind, host, entries, will_retry_until, _attachment_note(kind, content, original, return_limit))
        report = MIMEPart(policy=_POLICY)
        # 7bit when it can be; quoted-printable keeps a UTF-8 address 7-bit too.
        report.set_content(text, disposition="inline", cte="7bit" if text.isascii() else "quoted-printable")
        report["Content-Description"] = "Notification"

        message = EmailMessage(policy=outer_policy)
        message["From"] = f"Mail Delivery System <MAILER-DAEMON@{host}>"
        message["To"] = f"<{sender}>"
        message["Subject"] = SUBJECTS[kind]
        message["Date"] = _date(now)
        message["Message-ID"] = f"<{uuid.uuid4().hex}@{host}>"
        if message_id:
            # Threads the report with the message in the sender's mail reader.
            message["In-Reply-To"] = message_id.group(1).decode("ascii")
            message["References"] = message_id.group(1).decode("ascii")
        message["Auto-Submitted"] = "auto-replied"                      # RFC 3834 §5
        message["MIME-Version"] = "1.0"
        # RFC 6522 §3 / RFC 3461 §6.2: report-type=delivery-status.
        message["Content-Type"] = "multipart/report; report-type=delivery-status"
        message.set_payload([report, status] + ([content] if content is not None else []))
        try:
            out = BytesIO()
            _Generator(out, policy=outer_policy).flatten(message)
        except Exception:
            if content is None:
                raise
            continue        # returned content that cannot be carried: take the next fallback
        data = out.getvalue()
        if _fits(data) or content is None:
            return data
    raise AssertionError("unreachable: the last candidate (no returned content) always returns")


def returned_content(kind: str, ret: str | None, original: bytes | None,
                     return_limit: int = RETURN_LIMIT) -> list[MIMEPart | None]:
    """Candidates for the third part, best first, ending with None (no part).

    See the module docstring for the choice; `build_dsn` takes the first one
    that generates cleanly.
    """
    if original is None:
        return [None]
    data = _crlf(original)
    full = kind == KIND_FAILURE and (ret or "FULL").upper() == "FULL" and len(data) <= return_limit
    headers = _header_section(data)
    utf8_headers = not headers.isascii()
    candidates: list[MIMEPart | None] = []
    if full and _fits(data):
        part = MIMEPart(policy=_POLICY)
        part["Content-Type"] = "message/global" if utf8_headers else "message/rfc822"
        part["Content-Description"] = "Undelivered Message"
        if not data.isascii():
            part["Content-Transfer-Encoding"] = "8bit"   # RFC 2046 §5.2.1: 7bit, 8bit or binary only
        part.set_payload(data.decode("ascii", "surrogateescape"))
        candidates.append(part)
    if _fits(headers):
        part = MIMEPart(policy=_POLICY)
        if utf8_headers:
            part["Content-Type"] = "message/global-headers"          # RFC 6533 §6.3
            part["Content-Transfer-Encoding"] = "8bit"
        else:
            part["Content-Type"] = "text/rfc822-headers"             # RFC 6522 §4
        part["Content-Description"] = "Undelivered Message Headers" if kind == KIND_FAILURE else "Message Headers"
        part.set_payload(headers.decode("ascii", "surrogateescape"))
        candidates.append(part)
    candidates.append(None)
    return candidates


def _crlf(data: bytes) -> bytes:
    """CRLF line ends (the spool stores them already; this is for anything else)."""
    return re.sub(rb"\r\n|\r|\n", b"\r\n", data)


def _header_section(data: bytes) -> bytes:
    """The header lines of a CRLF message, each ending in CRLF, without the
    blank line; all of it when there is no blank line."""
    if data.startswith(b"\r\n"):
        return b""
    end = data.find(b"\r\n\r\n")
    if end >= 0:
        return data[:end + 2]
    return data if data.endswith(b"\r\n") or not data else data + b"\r\n"


class _Entry:
    """One recipient's line in the report, sanitized."""

    def __init__(self, kind: str, rcpt: NoticeRecipient, result: RecipientResult | None, now: float):
        self.address = rcpt.address
        self.orcpt = rcpt.orcpt
        self.result = result
        self.relay = _relay_host(rcpt.relay)
        self.expired = kind == KIND_FAILURE and (result is None or result.status != model.STATUS_BOUNCED)
        if kind == KIND_FAILURE:
            self.action = ACTION_FAILED
        elif kind == KIND_DELAY:
            self.action = ACTION_DELAYED
        else:
            self.action = ACTION_DELIVERED if rcpt.final_delivery is True else ACTION_RELAYED
        self.status = self._status(result)
        last = rcpt.last_attempt
        self.last_attempt = last if last is not None else (now if result is not None else None)
        # RFC 3461 §9.2: "smtp; " and the reply, on one (folded) line.
        self.diagnostic = _printable(result.diagnostic) if result is not None and result.code else ""

    def _status(self, result: RecipientResult | None) -> str:
        enhanced = result.enhanced if result is not None and _ENHANCED.fullmatch(result.enhanced or "") else ""
        wanted = {ACTION_FAILED: "5", ACTION_DELAYED: "4"}.get(self.action, "2")
        if self.expired:
            # The last transient problem, as Postfix and sendmail report it; X.4.7 without one.
            return enhanced if enhanced.startswith("4") else STATUS_EXPIRED
        if enhanced.startswith(wanted):
            return enhanced
        return _DEFAULT_STATUS[self.action]


def _status_blocks(envelope: Envelope, host: str, entries: list[_Entry],
                   will_retry_until: float | None) -> list[Message]:
    """RFC 3464 §2.2 per-message fields, then one §2.3 group per recipient."""
    per_message = _block()
    if envelope.envid is not None:
        # RFC 3461 §6.3 (a): the ENVID, xtext-decoded (the envelope stores it decoded).
        _field(per_message, "Original-Envelope-Id", _printable(envelope.envid))
    _field(per_message, "Reporting-MTA", f"dns; {host}")                  # RFC 3461 §6.3 (b)
    if envelope.arrival is not None:
        _field(per_message, "Arrival-Date", _date(envelope.arrival))      # RFC 3464 §2.2.5
    blocks = [per_message]
    for entry in entries:
        block = _block()
        if entry.orcpt:
            # RFC 3461 §6.3 (d): from ORCPT, only when it was given.
            addr_type, _, address = entry.orcpt.partition(";")
            _field(block, "Original-Recipient", f"{_printable(addr_type) or 'rfc822'}; {_printable(address)}")
        _field(block, "Final-Recipient", _typed_address(entry.address))    # RFC 3461 §6.3 (e)
        _field(block, "Action", entry.action)                               # RFC 3464 §2.3.3
        _field(block, "Status", entry.status)                               # RFC 3464 §2.3.4
        if entry.relay:
            _field(block, "Remote-MTA", f"dns; {entry.relay}")              # RFC 3461 §6.3 (h)
        if entry.diagnostic:
            _field(block, "Diagnostic-Code", entry.diagnostic)              # RFC 3461 §6.3 (i), §9.2
        if entry.last_attempt is not None:
            _field(block, "Last-Attempt-Date", _date(entry.last_attempt))   # RFC 3464 §2.3.7
        if will_retry_until is not None:
            _field(block, "Will-Retry-Until", _date(will_retry_until))      # RFC 3464 §2.3.9
        blocks.append(block)
    return blocks


def _human_text(kind: str, host: str, entries: list[_Entry], will_retry_until: float | None, note: str) -> str:
    if kind == KIND_FAILURE:
        intro = "Your message could not be delivered to one or more recipients."
    elif kind == KIND_DELAY:
        until = f" until {_date(will_retry_until)}" if will_retry_until is not None else ""
        intro = ("Your message has not been delivered yet to the recipients below. "
                 f"The mail system will keep trying{until}; you do not need to send it again.")
    else:
        intro = "Your message was delivered to the recipients below."
        if any(entry.action == ACTION_RELAYED for entry in entries):
            intro += (' Where it says "relayed", it was handed to a mail server that does not '
                      "send delivery reports: no further report will come from there.")
    lines = [f"This is the mail system at {host}.", ""]
    lines += _wrap(f"{intro} {note}".strip())
    lines.append("")
    for entry in entries:
        if kind == KIND_FAILURE:
            what = "delivery time expired, gave up" if entry.expired else "delivery failed"
        elif kind == KIND_DELAY:
            what = "delayed, still trying"
        else:
            what = entry.action
        via = f" (at {entry.relay})" if entry.relay else ""
        lines += _wrap(f"<{_safe_text(entry.address)}>: {what}{via}")
        result = entry.result
        if result is not None:
            said = _safe_text(f"{result.code} {result.enhanced} {result.text}" if result.code else result.text)
            if said:
                lines += _wrap(("The mail server said: " if result.code else "") + said, indent="    ")
        lines.append("")
    return "\n".join(lines)


def _attachment_note(kind: str, content: MIMEPart | None, original: bytes | None, return_limit: int) -> str:
    if content is None:
        return ""
    if content.get_content_maintype() == "message" and not content.get_content_subtype().endswith("headers"):
        return "It is attached below."
    if kind == KIND_FAILURE and original is not None and len(original) > return_limit:
        return "It was too large to return in full; its headers are attached below."
    return "The headers of your message are attached below."


def _wrap(text: str, indent: str = "") -> list[str]:
    # Long words (a long address) are split: this part is for people and
    # must keep within 998 octets a line all the same.
    return textwrap.wrap(text, 76, initial_indent=indent, subsequent_indent=indent,
                         break_long_words=True, break_on_hyphens=False) or [indent]


def _block() -> Message:
    # compat32 stores header values as given: we fold them ourselves (below),
    # and nothing decodes or re-encodes a remote reply on the way out.
    return Message(policy=compat32)


def _field(block: Message, name: str, value: str) -> None:
    block[name] = _fold(name, value)


def _fold(name: str, value: str) -> str:
    """Fold at spaces to FOLD_AT columns where possible (RFC 5322 §2.2.3)."""
    words = [word[:MAX_TOKEN] for word in value.split(" ") if word]
    lines: list[str] = []
    current = ""
    width = len(name) + 2
    for word in words:
        if current and width + len(current) + 1 + len(word) > FOLD_AT:
            lines.append(current)
            current, width = word, 1
        else:
            current = f"{current} {word}" if current else word
    lines.append(current)
    return "\n ".join(lines)


def _typed_address(address: str) -> str:
    """`rfc822; addr`, or `utf-8; ` with the RFC 6533 §3 utf-8-addr-xtext form
    (\\x{HEX} for non-ASCII) so that the field stays 7-bit."""
    if all(0x20 <= ord(c) <= 0x7E for c in address):
        return f"rfc822; {address}"
    escaped = "".join(c if 0x21 <= ord(c) <= 0x7E and c not in "+=\\" else f"\\x{{{ord(c):02X}}}"
                      for c in address)
    return f"utf-8; {escaped}"


def _printable(text: str) -> str:
    """One line of printable ASCII: controls (CR, LF) become spaces, other
    characters \\x{HEX}; nothing from outside can start a field of its own."""
    text = "".join(c if 0x20 <= ord(c) <= 0x7E else (" " if ord(c) < 0x20 or ord(c) == 0x7F else f"\\x{{{ord(c):02X}}}")
                   for c in str(text))
    return " ".join(text.split())


def _safe_text(text: str) -> str:
    """For the human-readable part: UTF-8 is fine there, control characters are not."""
    return " ".join("".join(c if c.isprintable() else " " for c in str(text)).split())


def _relay_host(relay) -> str:
    """"host[ip]:port" (AttemptResult.relay) -> "host"; an address alone
    becomes a domain-literal "[ip]" (RFC 3461 §9.3)."""
    if not relay:
        return ""
    match = re.fullmatch(r"([^\[\]\s]*?)(?:\[([^\]\s]+)\])?(?::[0-9]+)?", str(relay))
    name, ip = match.groups() if match else (str(relay), None)
    if name and not _is_ip(name):
        return _printable(name)
    address = ip or name
    return f"[{_printable(address)}]" if address else ""


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _fits(data: bytes) -> bool:
    """No line longer than 998 octets (RFC 5322 §2.1.1)."""
    return all(len(line) <= MAX_LINE for line in data.split(b"\r\n"))


def _date(timestamp: float) -> str:
    """RFC 5322 §3.3 date-time in UTC (English names whatever the locale)."""
    return format_datetime(datetime.fromtimestamp(timestamp, timezone.utc))
