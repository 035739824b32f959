"""Local submission: the server's side of `mailgw sendmail` (Postfix's pickup).

The command hands sender, recipients and message to the running server over
the control socket (mailgw.queue.control, `submit`); this object takes them
through the same stages as an SMTP transaction: the addresses are parsed as
SMTP would, each recipient goes through recipient resolution, and the
message is made durable by the targets stage (routing.dispatch) before the
command is told its queue id. Only root and the server's own account can
reach the control socket (mode 0600), so, like Postfix's sendmail, a local
program may send as any sender and to any domain.
"""
from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger

from mailgw.errors import MailError, PermanentError
from mailgw.mailauth.stages import SUBMISSION, Origin
from mailgw.queue.envelope import EnvelopeClient
from mailgw.queue.spool import new_queue_id
from mailgw.routing.dispatch import Dispatcher, Transaction, refusal
from mailgw.smtp import codes
from mailgw.smtp.address import AddressError, MailFrom, parse_mail_from, parse_rcpt_to
from mailgw.smtp.inbound import trace_date

# RFC 3463 §3.6 5.5.1 (invalid command): a submission needs at least one recipient.
# RFC 3463 §3.5 5.3.4: message too big for the system.
NO_RECIPIENTS = (554, "5.5.1", "No recipients")
TOO_BIG = (552, "5.3.4", "Message size exceeds fixed maximum message size")


class LocalSubmission:
    log = Logger()

    def __init__(self, *, router, store, spool, clock, hostname: str, max_size: int, max_recipients: int):
        self.dispatcher = Dispatcher(router=router, store=store, spool=spool, clock=clock)
        self.router = router
        self.clock = clock
        self.hostname = hostname
        self.max_size = max_size
        self.max_recipients = max_recipients

    def submit(self, sender: str, recipients: list[str], message: bytes, *, origin: dict):
        """Fires with the queue id once every target's copy is durable;
        fails with MailError (its code goes back to the command)."""
        try:
            transaction = self._transaction(sender, recipients, message)
        except MailError as error:
            return defer.fail(error)
        queue_id = new_queue_id(self.clock.seconds())
        uid = origin.get("uid")
        login = origin.get("login") or "unknown"
        # RFC 5321 §4.4: every MTA that takes a message adds its trace line;
        # this one names the local account, as Postfix's pickup does.
        who = f"uid {uid}" if uid is not None else "unknown uid"
        received = (f"Received: by {self.hostname} (mailgw sendmail, from {who}, login {_safe(login)})\r\n"
                    f"\tid {queue_id}; {trace_date(int(self.clock.seconds()))}\r\n").encode("ascii")
        client = EnvelopeClient(ip="127.0.0.1", helo=None, tls=False, auth=None, listener="sendmail")
        origin = Origin(SUBMISSION, "127.0.0.1", None, sender)
        d = self.dispatcher.commit(transaction, received + message, queue_id, client=client, origin=origin)

        def accepted(_):
            to = [str(rcpt.recipient) for rcpt in _rcpts(transaction)]
            self.log.info("{queue_id}: accepted client=local uid={uid} login={login} from=<{sender}> "
                          "to={to} size={size}", queue_id=queue_id, uid=uid, login=_safe(login),
                          sender=sender, to=",".join(f"<{a}>" for a in dict.fromkeys(to)), size=len(message))
            return queue_id
        return d.addCallback(accepted)

    def _transaction(self, sender: str, recipients: list[str], message: bytes) -> Transaction:
        if len(message) > self.max_size:
            raise PermanentError(*TOO_BIG)
        if not recipients:
            raise PermanentError(*NO_RECIPIENTS)
        if len(recipients) > self.max_recipients:
            raise refusal(codes.TOO_MANY_RECIPIENTS)
        body = "7BIT" if message.isascii() else "8BITMIME"
        try:
            mail_from = parse_mail_from(f"FROM:<{sender}>")
        except AddressError as error:
            raise PermanentError(error.reply.code, error.reply.enhanced, f"sender <{sender}>: {error.reply.text}")
        utf8 = not (sender.isascii() and all(r.isascii() for r in recipients))
        mail_from = MailFrom(mail_from.sender, len(message), body, utf8, None, None)
        transaction = Transaction(mail_from)
        for address in recipients:
            try:
                rcpt = parse_rcpt_to(f"TO:<{address}>", smtputf8=utf8)
            except AddressError as error:
                raise PermanentError(error.reply.code, error.reply.enhanced, f"<{address}>: {error.reply.text}")
            if rcpt.recipient.domain == "" or self.router.is_local_domain(rcpt.recipient.domain):
                try:
                    self.dispatcher.add_local(transaction, rcpt)
                except MailError as error:
                    raise type(error)(error.code, error.enhanced, f"<{address}>: {error.text}") from None
            else:
                transaction.remote.append(rcpt)
        return transaction


def _rcpts(transaction: Transaction):
    for rcpts in transaction.local.values():
        yield from rcpts
    yield from transaction.remote
    for rcpt, _ in transaction.forwards:
        yield rcpt


def _safe(text: str) -> str:
    """A login name as it may appear in a header or a log line: printable ASCII only."""
    return "".join(c if c.isascii() and c.isprintable() and c not in "()\\" else "?" for c in str(text))[:64]
