"""The targets stage: after resolution, every accepted message is made
durable for each of its targets, the same way for every entry path.

    listener -> policy (Router) -> resolution (routing.resolver)
             -> checks / modifiers (later stages) -> targets (this module)

`Router` is the policy the SMTP avatar, the queue runner and the local
submission (`mailgw sendmail`) share; `Transaction` the envelope being
built; `Dispatcher.add_local` files a resolved recipient into it and
`Dispatcher.commit` writes the message: local targets into their Maildirs
(folder included), direct remote recipients into the spool with the
original sender, forwards into the spool with an SRS sender.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from email.parser import HeaderParser
from email.policy import compat32
from email.utils import getaddresses

from twisted.internet import defer
from twisted.logger import Logger

from mailgw.config_types import Config
from mailgw.errors import MailError, PermanentError
from mailgw.interfaces import IUserDB
from mailgw.queue.envelope import Envelope, EnvelopeClient, EnvelopeRecipient
from mailgw.queue.spool import new_queue_id
from mailgw.routing.resolver import LocalTarget, Resolver
from mailgw.smtp import codes
from mailgw.smtp.address import MailFrom, Mailbox, RcptTo


def refusal(reply: codes.Reply) -> MailError:
    return PermanentError(reply.code, reply.enhanced, reply.text) if reply.code >= 500 \
        else MailError(reply.code, reply.enhanced, reply.text)


class Router:
    """Session policy around the recipient-resolution stage: which domains
    are ours, which clients are trusted, who may send as what, who is over
    quota. The answers about addresses come from `resolver`
    (mailgw.routing.resolver), the one every path shares."""

    def __init__(self, config: Config, userdb: IUserDB, resolver: Resolver | None = None, *,
                 quota=None, srs=None, stages=None):
        self.config = config
        self.userdb = userdb
        self.resolver = resolver if resolver is not None else Resolver.static(config, userdb)
        self.quota = quota                # IQuota or None (no limits)
        self.srs = srs                    # SRS or None: forwards keep their sender
        self.sieve = None                 # mailgw.sieve.delivery.SieveStage or None (no filters)
        # routing.submit.LocalSubmission (the class), given by whoever builds the
        # router: Sieve vacation replies enter through it, as `mailgw sendmail` does.
        self.local_submission = None
        # The checks and modifiers stages (mailgw.mailauth.stages.AuthenticationStage);
        # None: messages go from resolution straight to their targets.
        self.stages = stages

    @property
    def local_domains(self):
        return self.resolver.local_domains

    def is_local_domain(self, domain: str) -> bool:
        return self.resolver.is_ours(domain)

    def resolve(self, mailbox: Mailbox):
        """Final targets of a recipient in one of our domains (MailError if none)."""
        return self.resolver.resolve(str(mailbox))

    def over_quota(self, mailbox: str) -> bool:
        return self.quota is not None and self.quota.over(mailbox)

    def is_trusted(self, client_ip) -> bool:
        return any(client_ip in network for network in self.config.trusted_networks
                   if network.version == client_ip.version)

    def owns(self, user: str, sender: Mailbox | str) -> bool:
        """May authenticated `user` use `sender` as MAIL FROM or header From:?"""
        if self.config.allow_sender_mismatch:
            return True
        return self.resolver.owns(user, str(sender))

    def forward_sender(self, sender: str) -> str:
        """The envelope sender of a forward to another domain: SRS0 in our
        domain, so the receiver's SPF check of us passes. The null sender and
        our own domains' senders stay as they are."""
        if self.srs is None or not sender or self.is_local_domain(sender.rpartition("@")[2]):
            return sender
        try:
            return self.srs.forward(sender)
        except ValueError:
            return sender


@dataclass
class Transaction:
    """One MAIL ... DATA: the envelope as accepted so far."""
    mail_from: MailFrom
    # (mailbox, folder) -> the RCPTs that lead there; folder None is INBOX.
    local: dict[tuple[str, str | None], list[RcptTo]] = field(default_factory=dict)
    remote: list[RcptTo] = field(default_factory=list)
    # Remote addresses reached through an alias or SRS: (the RCPT, the address).
    forwards: list[tuple[RcptTo, str]] = field(default_factory=list)

    @property
    def recipient_count(self) -> int:
        return sum(map(len, self.local.values())) + len(self.remote) + len(self.forwards)

    def recipient_addresses(self) -> tuple[str, ...]:
        """Every RCPT TO address once, in the order given (for the spam filter)."""
        rcpts = [r for rs in self.local.values() for r in rs] + self.remote + [r for r, _ in self.forwards]
        return tuple(dict.fromkeys(str(rcpt.recipient) for rcpt in rcpts))


def build_router(config: Config, userdb: IUserDB, *, reactor, quota=None, threadpool=None) -> Router:
    """The production Router: the alias file, SRS with the data directory's
    secret, and the quota. The main process and each SMTP worker build one."""
    from mailgw.routing import srs as srs_module

    routing = config.routing
    srs = srs_module.SRS(srs_module.load_secret(config.data_dir), routing.srs_domain,
                         clock=reactor.seconds, max_age_days=routing.srs_max_age)
    resolver = Resolver.from_config(config, userdb, clock=reactor, srs=srs)
    router = Router(config, userdb, resolver, quota=quota, srs=srs)
    router.sieve = build_sieve(config, reactor=reactor, threadpool=threadpool)
    return router


def build_sieve(config: Config, *, reactor, threadpool=None):
    """The Sieve stage over <data_dir>/sieve (mailgw.sieve.delivery); its
    file I/O and script runs in `threadpool` (inline without one)."""
    from twisted.internet.threads import deferToThreadPool

    from mailgw.sieve.delivery import SieveStage
    from mailgw.sieve.interpreter import compile_script
    from mailgw.sieve.scripts import ScriptStore

    root = config.data_dir / "sieve"
    store = ScriptStore(root, check=compile_script)
    run_in_thread = None if threadpool is None else \
        (lambda f, *args: deferToThreadPool(reactor, threadpool, f, *args))
    return SieveStage(store, root, delimiter=config.recipient_delimiter or "+", run_in_thread=run_in_thread)


class Dispatcher:
    """Resolved recipients in, durable copies out (see the module docstring)."""

    log = Logger()

    def __init__(self, *, router: Router, store, spool, clock):
        self.router = router
        # The Sieve stage (mailgw.sieve.delivery.SieveStage) or None: from the router.
        self.sieve = getattr(router, "sieve", None)
        self.store = store
        self.spool = spool
        self.clock = clock

    def add_local(self, transaction: Transaction, rcpt: RcptTo) -> None:
        """Resolve a recipient in one of our domains into `transaction`;
        MailError (the reply to RCPT) when it leads nowhere or is full."""
        targets = self.router.resolve(rcpt.recipient)
        local = [target for target in targets if isinstance(target, LocalTarget)]
        if local and len(local) == len(targets) and all(self.router.over_quota(t.mailbox) for t in local):
            # RFC 3463 §3.3 4.2.2: mailbox full. Temporary, so the sender retries
            # once the user has made room; an alias with members under quota goes on.
            raise refusal(codes.MAILBOX_FULL)
        for target in targets:
            if isinstance(target, LocalTarget):
                transaction.local.setdefault((target.mailbox, target.folder), []).append(rcpt)
            else:
                transaction.forwards.append((rcpt, target.address))

    def commit(self, transaction: Transaction, message: bytes, queue_id: str, *, lf: bool = False,
               client: EnvelopeClient | dict, user: str | None = None, origin=None):
        """Make the message durable for every recipient; fires with queue_id.
        `client`: the session, as the spool envelope records it (a dict is
        its JSON form, docs/spool-format.md).

        All or nothing: if any part fails, what was already written for this
        message is removed again and the client is told to retry (4xx), so a
        250 always means every recipient's copy is on disk.
        """
        if user is not None and not self.router.config.allow_sender_mismatch:
            refused = self.header_sender_refused(user, message)
            if refused is not None:
                return defer.fail(refused)
        stages = self.router.stages
        if stages is None or origin is None:
            return self._write(transaction, message, queue_id, lf=lf, client=client)
        # The checks and modifiers stages (mailgw.mailauth.stages), then the targets.
        d = stages.process(message, lf=lf, origin=origin, queue_id=queue_id,
                           recipients=transaction.recipient_addresses())
        return d.addCallback(lambda outcome: self._write(transaction, outcome.message, queue_id, lf=lf,
                                                         client=client, quarantine=outcome.quarantine_folder))

    def _write(self, transaction: Transaction, message: bytes, queue_id: str, *, lf: bool,
               client: EnvelopeClient | dict, quarantine: str | None = None):
        started = self.clock.seconds()
        filed: dict = {}            # (mailbox, folder) -> the folder a quarantined copy went to
        targets = []                # (key in transaction.local, mailbox, the folder it goes to, its RCPTs)
        for key in sorted(transaction.local, key=_target_order):
            mailbox, folder = key
            if quarantine is not None:
                # A quarantine verdict (DMARC p=quarantine) sends the copy to that
                # folder: the user's own spelling of it if there is one, else it is
                # made (as Dovecot's autocreate does for Junk).
                folder = filed[key] = self.router.resolver.folder_for(mailbox, quarantine) or quarantine
            targets.append((key, mailbox, folder, transaction.local[key]))
        if self.sieve is None or not targets:
            return self._write_targets(transaction, message, queue_id, lf, client, targets, {}, started,
                                       filed if quarantine else None)
        sender = str(transaction.mail_from.sender) if transaction.mail_from.sender else ""
        d = self.sieve.plans([(key, mailbox, folder, [str(r.recipient) for r in rcpts])
                              for key, mailbox, folder, rcpts in targets], message, sender)

        def unfiltered(failure):
            # RFC 5228 §2.10.6: whatever went wrong, the mail is delivered (unfiltered).
            self.log.failure("{queue_id}: sieve stage failed, delivering without filters", failure,
                             queue_id=queue_id)
            return {}
        d.addErrback(unfiltered)
        return d.addCallback(lambda plans: self._write_targets(transaction, message, queue_id, lf, client,
                                                               targets, plans, started,
                                                               filed if quarantine else None))

    def _write_targets(self, transaction: Transaction, message: bytes, queue_id: str, lf: bool,
                       client: EnvelopeClient | dict, targets: list, plans: dict, started: float,
                       quarantined: dict | None):
        work = []
        sender = transaction.mail_from.sender
        sender_text = str(sender) if sender else ""
        redirects: list = []            # (the RCPT, the address) of Sieve redirects
        sieved: dict = {}               # key -> the Sieve plan its copy followed
        boxes = []
        for key, mailbox, folder, rcpts in targets:
            plan = plans.get(key)
            if plan is not None:
                # The Sieve stage (mailgw.sieve.delivery) decided where this copy goes.
                boxes.extend((mailbox, f or "INBOX", plan.flags.get(f, ())) for f in plan.folders)
                redirects.extend((rcpts[0], address) for address in plan.redirects)
                sieved[key] = plan
            else:
                boxes.append(mailbox if folder is None else (mailbox, folder))
        if boxes:
            # RFC 5321 §4.4: the delivering MTA records the reverse-path as Return-Path.
            work.append(self.store.deliver(boxes, message, lf=lf, return_path=sender_text))
        # The spool keeps the SMTP wire form (docs/spool-format.md).
        wire = None
        forwards = transaction.forwards + redirects
        if transaction.remote or forwards:
            wire = message.replace(b"\n", b"\r\n") if lf else message
        if transaction.remote:
            recipients = [_spool_recipient(rcpt, str(rcpt.recipient)) for rcpt in transaction.remote]
            work.append(self._enqueue(transaction, queue_id, wire, recipients, sender_text, client))
        if forwards:
            # A forward (an alias's or a Sieve redirect) leaves with an SRS sender of ours (so its bounce comes
            # back to us and on to the original sender, never to the alias's
            # owner): its own spool entry when direct remote recipients keep
            # the original sender.
            forward_id = new_queue_id(self.clock.seconds()) if transaction.remote else queue_id
            recipients = [_spool_recipient(rcpt, address) for rcpt, address in forwards]
            work.append(self._enqueue(transaction, forward_id, wire, recipients,
                                      self.router.forward_sender(sender_text), client))
        done = defer.DeferredList(work, consumeErrors=True)

        def settle(results):
            failures = [result for ok, result in results if not ok]
            if not failures:
                self._log_local(transaction, queue_id, started, quarantined, sieved)
                self._send_vacations(sieved)
                return queue_id
            for ok, result in results:
                if ok and isinstance(result, list):
                    self.store.discard(result)
                elif ok and isinstance(result, str):
                    self.spool.discard(result)
            return failures[0]          # the first error becomes the reply
        return done.addCallback(settle)

    def _send_vacations(self, sieved: dict) -> None:
        """Sieve vacation replies go out once the message is committed, through
        local submission: resolved, signed and queued as any message."""
        if not any(plan.vacations for plan in sieved.values()):
            return
        make_submission = self.router.local_submission
        if make_submission is None:
            self.log.warn("sieve: vacation replies not sent: no local submission on this router")
            return
        config = self.router.config
        submitter = make_submission(router=self.router, store=self.store, spool=self.spool, clock=self.clock,
                                    hostname=config.hostname, max_size=config.smtp.max_message_size,
                                    max_recipients=config.smtp.max_recipients)
        for (mailbox, _), plan in sieved.items():
            if plan.vacations:
                self.sieve.send_vacations(mailbox, plan, submitter.submit, hostname=config.hostname,
                                          now=self.clock.seconds())

    def header_sender_refused(self, user: str, message: bytes) -> MailError | None:
        """RFC 5322 §3.6.2: the From: (and Sender:) of an authenticated user's
        message must be addresses it may send as, as its MAIL FROM must: a
        DMARC receiver judges the header, not the envelope."""
        end = message.find(b"\n\n")
        head = message if end < 0 else message[:end + 1]
        try:
            headers = HeaderParser(policy=compat32).parsestr(head.decode("utf-8", "replace"))
        except Exception:
            return refusal(codes.HEADER_SENDER_NOT_OWNED)
        for name in ("From", "Sender"):
            for value in headers.get_all(name) or ():
                for _, address in getaddresses([str(value)]):
                    if address and not self.router.owns(user, address):
                        return refusal(codes.HEADER_SENDER_NOT_OWNED)
        return None

    def _log_local(self, transaction: Transaction, queue_id: str, started: float,
                   quarantined: dict | None = None, sieved: dict | None = None) -> None:
        # One line per mailbox, in the queue runner's shape (queue/runner.py _log_result).
        delay = self.clock.seconds() - started
        for mailbox, folder in sorted(transaction.local, key=_target_order):
            first = str(transaction.local[(mailbox, folder)][0].recipient)
            orig = f", orig_to=<{first}>" if first.lower() != mailbox else ""
            if quarantined is not None:
                folder = quarantined[(mailbox, folder)]
            where = "maildir" if folder is None else f"maildir folder {folder}"
            if quarantined is not None:
                where += ", quarantined"
            plan = (sieved or {}).get((mailbox, folder))
            if plan is not None:
                where = ", ".join(["sieve: " + ", ".join(
                    ["maildir" if f is None else f"folder {f}" for f in plan.folders] +
                    [f"redirect to <{a}>" for a in plan.redirects])] + plan.notes) \
                    if plan.folders or plan.redirects else ", ".join(plan.notes)
            self.log.info("{queue_id}: to=<{to}>{orig}, relay=local, delay={delay:.2f}, dsn=2.0.0, "
                          "status=sent (delivered to {where})",
                          queue_id=queue_id, to=mailbox, orig=orig, delay=delay, where=where)

    def _enqueue(self, transaction: Transaction, queue_id: str, wire: bytes, recipients: list[EnvelopeRecipient],
                 sender: str, client: EnvelopeClient | dict):
        """spool.enqueue of a new envelope; a client that is not valid fails
        the Deferred as an invalid envelope does (ValueError)."""
        try:
            envelope = self._envelope(transaction, queue_id, len(wire), recipients, sender, client)
        except ValueError:
            return defer.fail()
        return self.spool.enqueue(queue_id, envelope, wire)

    def _envelope(self, transaction: Transaction, queue_id: str, size: int, recipients: list[EnvelopeRecipient],
                  sender: str, client: EnvelopeClient | dict) -> Envelope:
        mail_from = transaction.mail_from
        now = self.clock.seconds()
        return Envelope(
            id=queue_id,
            arrival=now,
            sender=sender,
            sender_utf8=mail_from.smtputf8,
            body=mail_from.body,
            size=size,
            envid=mail_from.envid,
            ret=mail_from.ret,
            client=client if isinstance(client, EnvelopeClient) else EnvelopeClient.from_json(client),
            recipients=recipients,
            attempts=0,
            next_attempt=now,
            history=[],
        )


def _target_order(target: tuple[str, str | None]):
    mailbox, folder = target
    return mailbox, folder or ""


def _spool_recipient(rcpt: RcptTo, address: str) -> EnvelopeRecipient:
    entry = EnvelopeRecipient(address, orcpt=rcpt.orcpt, notify=tuple(rcpt.notify) if rcpt.notify else None)
    original = str(rcpt.recipient)
    if original.lower() != address.lower():
        # What the client asked for, for the log's orig_to= and, when the
        # client gave no ORCPT, the DSN's Original-Recipient (RFC 3461 §4.2).
        entry.orig_to = original
        if rcpt.orcpt is None:
            entry.orcpt = f"rfc822;{original}"
    return entry
