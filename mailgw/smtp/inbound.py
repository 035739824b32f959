"""Who may send what to whom: the policy behind the SMTP avatar.

The realm hands the SMTP protocol an `SMTPDelivery` (Twisted's
IMessageDelivery) for each session: anonymous at first, replaced by an
authenticated one after AUTH. The protocol keeps connection state; every
accept/refuse decision about senders and recipients is made here, with the
policy, resolution and targets stages shared with the other entry paths
(mailgw.routing.dispatch).
"""
from __future__ import annotations

from functools import lru_cache
from datetime import datetime, timezone
from email.utils import format_datetime

from twisted.logger import Logger
from twisted.mail import smtp
from zope.interface import implementer

from mailgw.config_types import ROLE_RELAY
from mailgw.interfaces import ILocalStore, ISpool
from mailgw.mailauth.stages import INBOUND, SUBMISSION, TRUSTED_RELAY, Origin
from mailgw.routing.dispatch import Dispatcher, Router, Transaction, refusal  # noqa: F401 (Router: re-exported)
from mailgw.smtp import codes
from mailgw.smtp.address import MailFrom, RcptTo


@lru_cache(maxsize=4)
def trace_date(second: int) -> str:
    """RFC 5322 §3.3 date-time for Received:, formatted once per second of
    arrival (format_datetime is a noticeable share of a small message's CPU)."""
    return format_datetime(datetime.fromtimestamp(second, timezone.utc))


_refuse = refusal


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
        self.dispatcher = Dispatcher(router=router, store=store, spool=spool, clock=clock)
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
        # Postfix's form: the client's name only when forward-confirmed, else "unknown".
        name = getattr(session, "client_name", None)
        if name is None:
            lines = [f"Received: from {helo_text} ([{session.client_text}])"]
        else:
            lines = [f"Received: from {helo_text} ({name} [{session.client_text}])"]
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
            self.dispatcher.add_local(transaction, user)     # MailError: the reply
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
        """The message of this session's transaction, to every target (routing.dispatch)."""
        session = self.session
        return self.dispatcher.commit(transaction, message, queue_id, lf=lf, client={
            "ip": session.client_text,
            "helo": session.helo,
            "tls": bool(session.tls),
            "auth": self.user,
            "listener": session.listener.name,
        }, user=self.user, origin=Origin(self._origin_kind(), session.client_text, session.helo,
                                         str(transaction.mail_from.sender or ""), self.user,
                                         client_name=session.client_name))

    def _origin_kind(self) -> str:
        """Which checks and modifiers the message gets (mailgw.mailauth.stages)."""
        if self.user is not None:
            return SUBMISSION
        if self.router.is_trusted(self.session.client_ip):
            return TRUSTED_RELAY
        return INBOUND

