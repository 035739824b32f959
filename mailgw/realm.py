"""The twisted.cred realm: one avatar per protocol for an authenticated (or
anonymous) identity: SMTP an IMessageDelivery, POP3 a Maildrop, IMAP an
IMAPAccount. It sits above the protocols (it builds their avatars), next to
the composition root; auth/ below them only checks passwords."""
from __future__ import annotations

from twisted.cred.checkers import ANONYMOUS
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm
from twisted.mail import imap4, pop3, smtp
from zope.interface import implementer

from mailgw.imap.mailbox import IMAPAccount
from mailgw.interfaces import ISieveAccount
from mailgw.pop3.maildrop import Maildrop, MaildropLocks
from mailgw.smtp.inbound import Router, SMTPDelivery


@implementer(IRealm)
class MailRealm:
    def __init__(self, *, router: Router, store, spool, clock, mail_store=None, learner=None,
                 junk_folder: str = "Junk"):
        self.router = router
        self.learner = learner                  # mailgw.spam.learning.JunkLearner, or None
        self.junk_folder = junk_folder
        self.store = store
        self.spool = spool
        self.clock = clock
        self.mail_store = mail_store            # IMailStore: the POP3 (and IMAP) mailboxes
        # RFC 1939 §8 maildrop locks, shared by every POP3 listener of this process.
        self.pop3_locks = MaildropLocks()

    def requestAvatar(self, avatarId, mind, *interfaces):
        """`mind` is the protocol's ISessionInfo; `avatarId` the canonical
        address, or ANONYMOUS before AUTH."""
        if smtp.IMessageDelivery in interfaces:
            user = None if avatarId is ANONYMOUS else avatarId
            avatar = SMTPDelivery(user, mind, router=self.router, store=self.store,
                                  spool=self.spool, clock=self.clock)
            return smtp.IMessageDelivery, avatar, avatar.reset
        if pop3.IMailbox in interfaces:
            # Cheap: no I/O until the server calls maildrop.open() (lock + snapshot).
            maildrop = Maildrop(self._mailbox(avatarId, "POP3"), locks=self.pop3_locks)
            return pop3.IMailbox, maildrop, maildrop.close
        if imap4.IAccount in interfaces:
            # Only the user's own mailbox: the account has no way to reach another.
            account = IMAPAccount(self._mailbox(avatarId, "IMAP"), learner=self.learner,
                                  junk_folder=self.junk_folder)
            return imap4.IAccount, account, account.logout
        if ISieveAccount in interfaces:
            if avatarId is ANONYMOUS:
                raise UnauthorizedLogin("ManageSieve has no anonymous access")
            address = avatarId.decode("utf-8") if isinstance(avatarId, bytes) else str(avatarId)
            return ISieveAccount, _SieveAccount(address.lower()), lambda: None
        raise NotImplementedError(f"no avatar for {interfaces!r}")

    def _mailbox(self, avatarId, protocol: str):
        """The logged-in user's own mailbox; never for an anonymous session."""
        if avatarId is ANONYMOUS:
            raise UnauthorizedLogin(f"{protocol} has no anonymous access")
        if self.mail_store is None:
            raise NotImplementedError(f"no mail store configured for {protocol}")
        return self.mail_store.mailbox(avatarId)


@implementer(ISieveAccount)
class _SieveAccount:
    """ManageSieve's avatar: only whose scripts; the server holds the ScriptStore."""

    def __init__(self, address: str):
        self.address = address
