"""What the realm and the policy may know of a session: the cred `mind`."""
from __future__ import annotations

from zope.interface import implementer

from mailgw.config_types import ListenerConfig
from mailgw.interfaces import ISessionInfo


@implementer(ISessionInfo)
class SessionInfo:
    """One per connection, for every protocol."""

    def __init__(self, listener: ListenerConfig, client_ip, transport=None, *, tls: bool = False):
        self.listener = listener
        self.client_ip = client_ip
        self.client_text = str(client_ip)   # for Received:, replies and logs
        self.tls = tls
        self.helo: str | None = None        # SMTP's HELO/EHLO argument
        self.esmtp = False
        self.queue_id: str | None = None    # SMTP: the message being received
        # The forward-confirmed reverse DNS name, "unknown" when there is none
        # (Postfix's client name); None until looked up, or when not looked up.
        self.client_name: str | None = None
        self._transport = transport

    @property
    def tls_details(self) -> str | None:
        """RFC 5321 §4.4 allows comments in Received: say how the client was protected."""
        if not self.tls:
            return None
        try:
            connection = self._transport.getHandle()
            version = connection.get_protocol_version_name()
            cipher = connection.get_cipher_name()
            bits = connection.get_cipher_bits()
        except Exception:   # not an OpenSSL connection (tests) or handshake not done
            return "using TLS"
        return f"using {version} with cipher {cipher} ({bits} bits)"
