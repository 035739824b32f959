"""Connection limits shared by every listener's factory (SMTP, POP3, IMAP)."""
from __future__ import annotations

from collections import Counter


class ConnectionLimits:
    """Open connections of one listener, in total and per client address.

    `exempt` networks (SMTP's trusted_networks, like Postfix's
    smtpd_client_event_limit_exceptions) count towards the total only."""

    def __init__(self, *, max_total: int, max_per_client: int, exempt=()):
        self.max_total = max_total
        self.max_per_client = max_per_client
        self.exempt = tuple(exempt)
        self.open_total = 0
        self.open_per_client: Counter = Counter()

    def _exempt(self, client_ip) -> bool:
        return any(client_ip in network for network in self.exempt if network.version == client_ip.version)

    def admit(self, client_ip) -> bool:
        """Count a new connection; False (and nothing counted) if over a limit."""
        if self.open_total >= self.max_total:
            return False
        if self.open_per_client[client_ip] >= self.max_per_client and not self._exempt(client_ip):
            return False
        self.open_total += 1
        self.open_per_client[client_ip] += 1
        return True

    def release(self, client_ip) -> None:
        self.open_total -= 1
        self.open_per_client[client_ip] -= 1
        if self.open_per_client[client_ip] <= 0:
            del self.open_per_client[client_ip]
