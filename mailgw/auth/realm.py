"""The twisted.cred realm: one avatar per protocol for an authenticated (or
anonymous) identity. SMTP gets an IMessageDelivery; POP3 and IMAP avatars
join here with their issues."""
from __future__ import annotations

from twisted.cred.checkers import ANONYMOUS
from twisted.cred.portal import IRealm
from twisted.mail import smtp
from zope.interface import implementer

from mailgw.smtp.delivery import Router, SMTPDelivery


@implementer(IRealm)
class MailRealm:
    def __init__(self, *, router: Router, store, spool, clock):
        self.router = router
        self.store = store
        self.spool = spool
        self.clock = clock

    def requestAvatar(self, avatarId, mind, *interfaces):
        """`mind` is the protocol's ISessionInfo; `avatarId` the canonical
        address, or ANONYMOUS before AUTH."""
        if smtp.IMessageDelivery in interfaces:
            user = None if avatarId is ANONYMOUS else avatarId
            avatar = SMTPDelivery(user, mind, router=self.router, store=self.store,
                                  spool=self.spool, clock=self.clock)
            return smtp.IMessageDelivery, avatar, avatar.reset
        raise NotImplementedError(f"no avatar for {interfaces!r}")
