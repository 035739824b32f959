"""Who may send what to whom: the policy behind the SMTP avatar.

The realm hands the SMTP protocol an `SMTPDelivery` (Twisted's
IMessageDelivery) for each session: anonymous at first, replaced by an
authenticated one after AUTH. The protocol keeps connection state; every
accept/refuse decision about senders and recipients is made here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from datetime import datetime, timezone
from email.utils import format_datetime

from twisted.internet import defer
from twisted.logger import Logger
from twisted.mail import smtp
from zope.interface import implementer

from mailgw.config_types import ROLE_RELAY, Config
from mailgw.errors import MailError, PermanentError
from mailgw.interfaces import ILocalStore, ISpool, IUserDB
from mailgw.smtp import codes
from mailgw.smtp.address import MailFrom, Mailbox, RcptTo


@lru_cache(maxsize=4)
def trace_date(second: int) -> str:
    """RFC 5322 §3.3 date-time for Received:, formatted once per second of
    arrival (format_datetime is a noticeable share of a small message's CPU)."""
    return format_datetime(datetime.fromtimestamp(second, timezone.utc))


def _refuse(reply: codes.Reply) -> MailError:
    return PermanentError(reply.code, reply.enhanced, reply.text) if reply.code >= 500 \
        else MailError(reply.code, reply.enhanced, reply.text)


class Router:
    """Classifies recipients: a local mailbox, a remote address, or unknown."""

    def __init__(self, config: Config, userdb: IUserDB):
        self.config = config
        self.userdb = userdb
        self.local_domains = config.local_domains

    def is_local_domain(self, domain: str) -> bool:
        # Exact match only: no suffix/prefix matching, so "evil-example.test"
        # or "example.test.evil" are never ours.
        return domain in self.local_domains

    def local_mailbox(self, mailbox: Mailbox) -> str | None:
        """The store mailbox for a local-domain recipient, or None if unknown."""
        local = mailbox.local
        # Quoted or non-ASCII local parts never name one of our users (whose
        # names are restricted to [a-z0-9._+-]); "%" and "!" fall out the same way.
        if not local.isascii() or local.startswith('"'):
            return None
        local = local.lower()
        if local == "postmaster":
            # RFC 5321 §4.5.1: postmaster must be accepted for every domain we serve.
            return self.config.postmaster.lower()
        address = f"{local}@{mailbox.domain}"
        if self.userdb.exists(address):
            return address
        delimiter = self.config.recipient_delimiter
        if delimiter and delimiter in local:
            base = f"{local.split(delimiter, 1)[0]}@{mailbox.domain}"
            if self.userdb.exists(base):
                return base
        return None

    def is_trusted(self, client_ip) -> bool:
        return any(client_ip in network for network in self.config.trusted_networks
                   if network.version == client_ip.version)

    def owns(self, user: str, sender: Mailbox) -> bool:
        """May authenticated `user` use `sender` as MAIL FROM?"""
        if self.config.allow_sender_mismatch:
            return True
        if not sender.local.isascii() or sender.local.startswith('"'):
            return False
        local = sender.local.lower()
        delimiter = self.config.recipient_delimiter
        candidates = {f"{local}@{sender.domain}"}
        if delimiter and delimiter in local:
            candidates.add(f"{local.split(delimiter, 1)[0]}@{sender.domain}")
        return user in candidates


@dataclass
class Transaction:
    """One MAIL ... DATA: the envelope as accepted so far."""
    mail_from: MailFrom
    local: dict[str, list[RcptTo]] = field(default_factory=dict)   # mailbox -> RCPTs for it
    remote: list[RcptTo] = field(default_factory=list)

    @property
    def recipient_count(self) -> int:
        return sum(map(len, self.local.values())) + len(self.remote)


@implementer(smtp.IMessage)
class TransactionMessage:
    """The one IMessage per transaction (all recipients fan in here, so the
    body is written once per mailbox, not once per RCPT)."""

    def __init__(self, delivery: "SMTPDelivery", transaction: Transaction):
        self._delivery = delivery
        self._transaction = transaction
        self._parts: list[bytes] = []
        self._body: bytes | None = None
        self._lf = False
        self.queue_id: str | None = None

    # The protocol hands over the whole body at once, in LF form
    # (bodyReceived); the per-line IMessage methods stay for any generic caller.
    def bodyReceived(self, body: bytes, *, lf: bool = False) -> None:
        self._body, self._lf = body, lf

    def lineReceived(self, line: bytes) -> None:
        self._parts.append(line + b"\r\n")

    def eomReceived(self):
        if self._body is None:
            return self._delivery.commit(self._transaction, b"".join(self._parts), self.queue_id)
        return self._delivery.commit(self._transaction, self._body, self.queue_id, lf=self._lf)

    def connectionLost(self) -> None:
        self._parts, self._body = [], None


@implementer(smtp.IMessageDelivery)
class SMTPDelivery:
    """The SMTP avatar: policy for one session and one (possibly no) user."""

    log = Logger()

    def __init__(self, user: str | None, session, *, router: Router, store: ILocalStore,
                 spool: ISpool, clock):
        self.user = user                  # canonical address once authenticated
        self.session = session            # ISessionInfo
        self.router = router
        self.store = store
        self.spool = spool
        self.clock = clock
        self.transaction: Transaction | None = None
        self._message: TransactionMessage | None = None

    # -- IMessageDelivery -------------------------------------------------
    def receivedHeader(self, helo, origin, recipients) -> bytes:
        """RFC 5321 §4.4 trace header, with RFC 3848 "with" keywords."""
        session = self.session
        mail_from: MailFrom = origin
        protocol = "UTF8SMTP" if mail_from.smtputf8 else ("ESMTP" if session.esmtp else "SMTP")
        protocol += ("S" if session.tls else "") + ("A" if self.user else "")
        helo_text = session.helo or "unknown"
        lines = [f"Received: from {helo_text} ([{session.client_text}])"]
        if session.tls_details:
            lines.append(f"\t({session.tls_details})")
        if self.user:
            lines.append(f"\t(Authenticated sender: {self.user})")
        lines.append(f"\tby {self.router.config.hostname} (mailgw) with {protocol} id {session.queue_id}")
        # Naming the recipient is only safe when there is exactly one (RFC 5321 §7.2).
        if len(recipients) == 1:
            lines.append(f"\tfor <{recipients[0].recipient}>")
        lines[-1] += f"; {trace_date(int(self.clock.seconds()))}"
        return "\r\n".join(lines).encode("utf-8")

    def validateFrom(self, helo, origin: MailFrom):
        role = self.session.listener.role
        if role != ROLE_RELAY and not self.user:
            raise _refuse(codes.AUTH_REQUIRED)       # RFC 6409 §4.3
        if self.user:
            if origin.sender is None:
                raise _refuse(codes.NULL_SENDER_NOT_ALLOWED)
            if not self.router.owns(self.user, origin.sender):
                raise _refuse(codes.SENDER_NOT_OWNED)
        self.transaction = Transaction(origin)
        self._message = TransactionMessage(self, self.transaction)
        return origin

    def validateTo(self, user: RcptTo):
        transaction = self.transaction
        recipient = user.recipient
        if recipient.domain == "" or self.router.is_local_domain(recipient.domain):
            mailbox = self.router.local_mailbox(recipient)
            if mailbox is None:
                raise _refuse(codes.UNKNOWN_USER)
            transaction.local.setdefault(mailbox, []).append(user)
        elif self._may_relay():
            transaction.remote.append(user)
        else:
            # A local recipient earlier in the transaction never unlocks this:
            # the decision looks only at this recipient and the client.
            raise _refuse(codes.RELAY_DENIED)
        message = self._message
        return lambda: message

    # -- our own ----------------------------------------------------------
    def _may_relay(self) -> bool:
        return self.user is not None or (
            self.session.listener.role == ROLE_RELAY and self.router.is_trusted(self.session.client_ip))

    def may_normalize_bare_lf(self) -> bool:
        """May a bare LF in this client's DATA count as CRLF? ([smtp] bare_newline;
        Postfix smtpd_forbid_bare_newline = normalize, exclusions = $mynetworks.)"""
        mode = self.router.config.smtp.bare_newline
        if mode == "normalize-trusted":
            return self.user is not None or self.router.is_trusted(self.session.client_ip)
        return mode == "normalize"

    def reset(self) -> None:
        self.transaction = None
        self._message = None

    def commit(self, transaction: Transaction, message: bytes, queue_id: str, *, lf: bool = False):
        """Make the message durable for every recipient; fires with queue_id.

        All or nothing: if any part fails, what was already written for this
        message is removed again and the client is told to retry (4xx), so a
        250 always means every recipient's copy is on disk.
        """
        work = []
        started = self.clock.seconds()
        sender = transaction.mail_from.sender
        if transaction.local:
            # RFC 5321 §4.4: the delivering MTA records the reverse-path as Return-Path.
            work.append(self.store.deliver(sorted(transaction.local), message, lf=lf,
                                           return_path=str(sender) if sender else ""))
        if transaction.remote:
            # The spool keeps the SMTP wire form (docs/spool-format.md).
            wire = message.replace(b"\n", b"\r\n") if lf else message
            work.append(self.spool.enqueue(queue_id, self._envelope(transaction, queue_id, len(wire)), wire))
        done = defer.DeferredList(work, consumeErrors=True)

        def settle(results):
            failures = [result for ok, result in results if not ok]
            if not failures:
                self._log_local(transaction, queue_id, started)
                return queue_id
            for ok, result in results:
                if ok and isinstance(result, list):
                    self.store.discard(result)
                elif ok and isinstance(result, str):
                    self.spool.discard(result)
            return failures[0]          # the first error becomes the reply
        return done.addCallback(settle)

    def _log_local(self, transaction: Transaction, queue_id: str, started: float) -> None:
        # One line per mailbox, in the queue runner's shape (queue/runner.py _log_result).
        delay = self.clock.seconds() - started
        for mailbox in sorted(transaction.local):
            first = str(transaction.local[mailbox][0].recipient)
            orig = f", orig_to=<{first}>" if first != mailbox else ""
            self.log.info("{queue_id}: to=<{to}>{orig}, relay=local, delay={delay:.2f}, dsn=2.0.0, "
                          "status=sent (delivered to maildir)",
                          queue_id=queue_id, to=mailbox, orig=orig, delay=delay)

    def _envelope(self, transaction: Transaction, queue_id: str, size: int) -> dict:
        mail_from = transaction.mail_from
        now = self.clock.seconds()
        return {
            "version": 1,
            "id": queue_id,
            "arrival": now,
            "sender": str(mail_from.sender) if mail_from.sender else "",
            "sender_utf8": mail_from.smtputf8,
            "body": mail_from.body,
            "size": size,
            "envid": mail_from.envid,
            "ret": mail_from.ret,
            "client": {
                "ip": self.session.client_text,
                "helo": self.session.helo,
                "tls": bool(self.session.tls),
                "auth": self.user,
                "listener": self.session.listener.name,
            },
            "recipients": [
                {"address": str(rcpt.recipient), "orcpt": rcpt.orcpt,
                 "notify": list(rcpt.notify) if rcpt.notify else None,
                 "state": "pending", "attempts": 0, "last_reply": None}
                for rcpt in transaction.remote
            ],
            "attempts": 0,
            "next_attempt": now,
            "history": [],
        }
