"""Vacation replies (RFC 5230, RFC 6131): who has had a reply, and the reply.

The interpreter decides whether a message may be answered at all (null
sender, lists, automatic mail, the user's address not in To/Cc); this module
keeps the durable record that limits replies to one per sender per handle
per period, and writes the reply (RFC 3834: Auto-Submitted: auto-replied,
In-Reply-To/References). The reply then goes through local submission
(routing.submit), so it is resolved, DKIM-signed and queued as any message.

Records: <data_dir>/sieve/<domain>/<local>/vacation/<sha256 of handle and
sender> holding the time until which no new reply goes out. The record is
written (and fsynced) before the reply is submitted: after a crash in
between a reply may be missing, never sent twice.
"""
from __future__ import annotations

import hashlib
from email.header import Header
from email.utils import format_datetime, make_msgid
from datetime import datetime, timezone
from pathlib import Path

from mailgw.durable import write_private
from mailgw.store.maildir import split_mailbox_address

RECORDS = "vacation"


class VacationTracker:
    def __init__(self, root: Path):
        self.root = Path(root)

    def _directory(self, user: str) -> Path:
        local, domain = split_mailbox_address(user)     # ValueError if unsafe
        return self.root / domain / local / RECORDS

    def claim(self, user: str, handle: str, sender: str, seconds: int, now: float) -> bool:
        """True, and recorded, when `sender` may get a reply now; False when
        one went out for `handle` within the period."""
        directory = self._directory(user)
        key = hashlib.sha256(f"{handle}\0{sender.lower()}".encode("utf-8", "surrogatepass")).hexdigest()
        path = directory / key
        try:
            until = float(path.read_text().strip())
        except (OSError, ValueError):
            until = 0.0
        if until > now:
            return False
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_private(path, f"{now + seconds:.0f}\n".encode("ascii"))
        return True


def compose(action, user: str, message, *, hostname: str, now: float) -> bytes:
    """The reply to `message` (a SieveMessage) for `action` (interpreter.Vacation)."""
    original_subject = (message.headers("subject") or [""])[0]
    subject = action.subject if action.subject is not None else f"Auto: {original_subject}".strip()
    from_ = action.from_ or user
    lines = [
        f"From: {_header('From', from_)}",
        f"To: <{action.reply_to}>",
        f"Subject: {_header('Subject', subject)}",
        f"Date: {format_datetime(datetime.fromtimestamp(now, timezone.utc))}",
        f"Message-ID: {make_msgid(domain=hostname)}",
        # RFC 3834 §5: marks the reply so that no other responder answers it.
        "Auto-Submitted: auto-replied (vacation)",
        "Precedence: bulk",
    ]
    message_id = (message.raw_headers("message-id") or [""])[0].strip()
    if message_id:
        # RFC 3834 §3.1.5: In-Reply-To and References name the message answered.
        lines.append(f"In-Reply-To: {message_id}")
        lines.append(f"References: {message_id}")
    lines.append("MIME-Version: 1.0")
    if not action.mime:
        lines += ["Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: 8bit", ""]
    # RFC 5230 §4.3 :mime: the reason is a MIME entity, its own headers first.
    body = action.reason.replace("\r\n", "\n").replace("\n", "\r\n")
    if not body.endswith("\r\n"):
        body += "\r\n"
    return ("\r\n".join(lines) + "\r\n" + body).encode("utf-8")


def _header(name: str, value: str) -> str:
    value = value.replace("\r", " ").replace("\n", " ")
    if value.isascii():
        return value
    return Header(value, "utf-8", header_name=name).encode()
