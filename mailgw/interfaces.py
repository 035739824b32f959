"""The seams between mailgw's parts. Policy and storage only behind these."""
from zope.interface import Attribute, Interface


class IUserDB(Interface):
    """Users and their argon2id password hashes (mailgw.auth.userdb)."""

    def exists(address):
        """True if `address` (lower-case user@domain) is a user. In memory, no I/O
        beyond an occasional stat to pick up file changes."""

    def verify(address, password):
        """Deferred firing with the canonical address when `password` (str) matches,
        or None. Hashing runs off the reactor thread."""

    def addresses():
        """Sorted list of all user addresses."""


class IDurableWriter(Interface):
    """Writes files so that they survive a crash once the Deferred fires (mailgw.durable)."""

    def commit(writes):
        """`writes`: list of (directory: Path, tmp_directory: Path,
        final_name: str, data: bytes).

        Each file is created as `tmp_directory/final_name` (O_EXCL), written,
        fsynced, renamed into `directory/final_name` without ever replacing an
        existing file, and `directory` is fsynced; concurrent commits share
        directory fsyncs (group commit). Files are written in list order.
        Deferred fires with the list of final paths (same order); on any error
        it fails with StorageFull (ENOSPC/EDQUOT) or StorageFailed and no file
        of this call is left behind in either place."""


class ILocalStore(Interface):
    """Mailboxes (mailgw.store.maildir)."""

    def deliver(mailboxes, message):
        """Durably add `message` (bytes, CRLF line ends) to the INBOX of every
        mailbox in `mailboxes` (list of lower-case addresses). Deferred fires with
        the list of stored paths when all are on disk; fails (and leaves nothing
        behind) otherwise."""


class ISpool(Interface):
    """The relay queue's storage (mailgw.queue.spool)."""

    def enqueue(queue_id, envelope, message):
        """Durably store `message` (bytes, CRLF) with `envelope` (a dict, see
        docs/spool-format.md) under `queue_id`. Deferred fires with queue_id once
        both are fsynced and committed."""


class ISessionInfo(Interface):
    """What the realm and policy may know about an SMTP session (the cred `mind`)."""

    listener = Attribute("ListenerConfig of the listener the client came in on")
    client_ip = Attribute("client address as an ipaddress object")
    tls = Attribute("True once the session is encrypted")
    helo = Attribute("the HELO/EHLO argument, str, or None")


class IRelayTransport(Interface):
    """Sends one DeliveryRequest to its destination (mailgw.queue.delivery)."""

    def destination(domain):
        """The key of where mail for `domain` goes ("[host]:port" of a relay
        host, or the domain itself for MX delivery). Recipients with the same
        key go in one transaction, and concurrency is limited per key."""

    def deliver(request):
        """Deferred[AttemptResult] with one RecipientResult per recipient of
        `request`, in order. Never fails: connection, DNS and protocol
        trouble become deferred (4xx-class) or bounced (5xx-class) results."""
