"""The relay queue's value types, shared by the runner, the outbound client and DSNs.

These types describe one delivery attempt. The envelope the spool stores
(docs/spool-format.md) is mailgw.queue.envelope.Envelope; the recipient
states below are its recipients' `state`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Recipient states in the envelope (EnvelopeRecipient.state).
PENDING = "pending"        # not yet delivered; will be tried (again)
SENT = "sent"              # accepted by the next hop (2xx)
BOUNCED = "bounced"        # failed permanently (5xx) or gave up; the sender was told
EXPIRED = "expired"        # max_lifetime reached; the sender was told
FINAL_STATES = (SENT, BOUNCED, EXPIRED)

# Outcome of one attempt for one recipient.
STATUS_SENT = "sent"
STATUS_DEFERRED = "deferred"   # 4xx, connection or DNS trouble: try again later
STATUS_BOUNCED = "bounced"     # 5xx or a permanent DNS answer (NXDOMAIN, Null MX)


@dataclass(frozen=True)
class Recipient:
    address: str                        # as given in RCPT TO (UTF-8 allowed with SMTPUTF8)
    notify: tuple[str, ...] | None      # RFC 3461 NOTIFY, None when not given
    orcpt: str | None                   # RFC 3461 ORCPT "type;address", None when not given


@dataclass(frozen=True)
class DeliveryRequest:
    """One SMTP transaction to attempt: one destination, several recipients."""
    queue_id: str
    domain: str                         # routing domain (lower-case); every recipient here has the
                                        # same destination (this domain's MX, or one relay host)
    sender: str                         # "" for the null reverse-path <>
    recipients: tuple[Recipient, ...]
    message_path: Path                  # the spooled message, CRLF line ends, dot-stuffing NOT applied
    size: int
    body: str                           # "7BIT" or "8BITMIME"
    smtputf8: bool
    envid: str | None
    ret: str | None                     # "FULL", "HDRS" or None


@dataclass(frozen=True)
class RecipientResult:
    address: str
    status: str                         # STATUS_SENT / STATUS_DEFERRED / STATUS_BOUNCED
    code: int                           # the remote reply code; 0 when there was no reply
    enhanced: str                       # RFC 3463 code, e.g. "2.0.0", "4.4.1", "5.1.1"
    text: str                           # the remote reply text, or what went wrong (no internals)

    @property
    def diagnostic(self) -> str:
        """RFC 3464 §2.3.6 Diagnostic-Code value (smtp; ...) or "" when no reply."""
        return f"smtp; {self.code} {self.enhanced} {self.text}".strip() if self.code else ""


@dataclass(frozen=True)
class AttemptResult:
    relay: str | None                   # "host[ip]:port" of the server that answered last; None if none did
    tls: str | None                     # e.g. "TLSv1.3" when the transaction ran over TLS
    dsn_relayed: bool                   # the next hop accepted our DSN parameters (it advertised DSN)
    results: tuple[RecipientResult, ...]   # one per recipient of the request, same order
