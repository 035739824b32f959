"""twistd plugin: `twistd mailgw --config PATH`.

No __init__.py here or in twisted/: this directory is a portion of Twisted's
plugin namespace (twisted.plugins), found through sys.path.
"""
from twisted.application.service import ServiceMaker


class _MailgwServiceMaker(ServiceMaker):
    """Options and the service from mailgw.tap; the service wrapped by
    mailgw.logs, which sets the log observer (--logfile in text or JSON,
    reopened on SIGUSR1) on twistd's application."""

    @property
    def makeService(self):
        from mailgw.logs import make_service
        return make_service


mailgw = _MailgwServiceMaker(
    "mailgw",
    "mailgw.tap",
    "mailgw mail gateway: SMTP relay/submission with durable Maildir delivery",
    "mailgw",
)
