"""twistd plugin: `twistd mailgw --config PATH`.

No __init__.py here or in twisted/: this directory is a portion of Twisted's
plugin namespace (twisted.plugins), found through sys.path.
"""
from twisted.application.service import ServiceMaker

mailgw = ServiceMaker(
    "mailgw",
    "mailgw.tap",
    "mailgw mail gateway: SMTP relay/submission with durable Maildir delivery",
    "mailgw",
)
