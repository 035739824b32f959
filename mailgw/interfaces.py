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

    def deliver(mailboxes, message, lf=False):
        """Durably add `message` (bytes, CRLF line ends; or LF-only line ends
        when `lf` is true) to the INBOX of every mailbox in `mailboxes` (list of
        lower-case addresses). Deferred fires with the list of stored paths
        when all are on disk; fails (and leaves nothing behind) otherwise."""


class ISpool(Interface):
    """The relay queue's storage (mailgw.queue.spool)."""

    def enqueue(queue_id, envelope, message):
        """Durably store `message` (bytes, CRLF) with `envelope` (a
        mailgw.queue.envelope.Envelope) under `queue_id`. Deferred fires with queue_id once
        both are fsynced and committed."""


class ISessionInfo(Interface):
    """What the realm and policy may know about an SMTP session (the cred `mind`)."""

    listener = Attribute("ListenerConfig of the listener the client came in on")
    client_ip = Attribute("client address as an ipaddress object")
    client_text = Attribute("client_ip as text, formatted once per session")
    tls = Attribute("True once the session is encrypted")
    helo = Attribute("the HELO/EHLO argument, str, or None")


class IRelayTransport(Interface):
    """Sends one DeliveryRequest to its destination (mailgw.queue.outbound)."""

    def destination(domain):
        """The key of where mail for `domain` goes ("[host]:port" of a relay
        host, or the domain itself for MX delivery). Recipients with the same
        key go in one transaction, and concurrency is limited per key."""

    def deliver(request):
        """Deferred[AttemptResult] with one RecipientResult per recipient of
        `request`, in order. Never fails: connection, DNS and protocol
        trouble become deferred (4xx-class) or bounced (5xx-class) results."""

    def close():
        """Deferred: idle connections kept for reuse are closed (at shutdown)."""


# -- the mailbox store: shared by POP3 and IMAP ---------------------------------
# Flags are str: the IMAP system flags "\\Seen" "\\Answered" "\\Flagged" "\\Deleted"
# "\\Draft" and keywords (atoms without a backslash). \\Recent is not stored: it
# is a property of a session (see IFolder.sync).

class IMailStore(Interface):
    """All users' mailboxes (mailgw.store.mailbox.MailStore). One per process."""

    def mailbox(address):
        """The IUserMailbox of `address` (lower-case user@domain); ValueError if
        the address is not a safe mailbox name. Cheap: no I/O until used."""


class IUserMailbox(Interface):
    """One user's folders: INBOX plus Maildir++ folders (".Name")."""

    address = Attribute("the owner, lower-case user@domain")

    def folders():
        """Deferred[list[str]]: every folder name, INBOX first; the default
        folders Drafts, Sent, Junk, Trash exist from the first call on.
        Hierarchy separator "/" (IMAP); names are UTF-8 str."""

    def folder(name):
        """Deferred[IFolder]; fails with KeyError if it does not exist, with
        ValueError for a name that is not allowed ("..", "/" at the ends, NUL,
        control characters, too long). "INBOX" is case-insensitive. The same
        IFolder object is returned to every caller in this process."""

    def create(name):
        """Deferred[None]; KeyError-style failure (FileExistsError) if it exists."""

    def delete(name):
        """Deferred[None]; INBOX cannot be deleted (ValueError)."""

    def rename(old, new):
        """Deferred[None]; renaming INBOX moves its messages into `new` (RFC 3501 §6.3.5)."""

    def subscriptions():
        """Deferred[list[str]]."""

    def subscribe(name):
        """Deferred[None]."""

    def unsubscribe(name):
        """Deferred[None]."""


class IFolder(Interface):
    """One Maildir folder with persistent UIDs. Every method that touches disk
    returns a Deferred and runs its file work off the reactor thread; calls on
    one folder are serialised (in this process by a lock, across processes by
    a file lock on the index)."""

    name = Attribute("the folder's name, e.g. 'INBOX' or 'Sent'")
    uidvalidity = Attribute("int, persistent (RFC 3501 §2.3.1.1)")
    uidnext = Attribute("int, the next UID to be assigned; never decreases")

    def sync():
        """Pick up changes made by anyone else (new files in new/ or cur/ from
        any MDA or process, flag renames, removals). Deferred[SyncResult] with
        the UIDs this call moved from new/ to cur/ (the caller's \\Recent), plus
        the events it published to subscribers.

        The store itself also syncs folders that have subscribers (after a
        local delivery, and by polling) so IDLE sessions hear of new mail at
        once; the UIDs such a background sync moves are published as Added
        and handed out as \\Recent by the next sync() call, whoever makes it.
        Either way each UID is \\Recent for exactly one caller."""

    def messages():
        """The current list of MessageInfo sorted by UID (in memory, no I/O;
        as of the last sync or change)."""

    def open(uid):
        """Deferred[bytes]: the message with CRLF line ends (wire form), exactly
        MessageInfo.size octets. KeyError if the UID is gone."""

    def open_many(uids):
        """Deferred[list]: open() of each UID in order, None where the UID is
        gone; one batch of file reads instead of one job per message."""

    def store_flags(uids, flags, mode):
        """mode "add" | "remove" | "replace". Deferred[dict[uid, frozenset]] of
        the new flags of each UID that still exists."""

    def expunge(uids):
        """Remove these messages. Deferred[list[int]] of the UIDs removed."""

    def append(message, flags=(), internaldate=None):
        """Add a message (bytes, CRLF or LF). Deferred[int]: its UID. Durable
        (fsync file and directory) before it fires."""

    def copy(uids, target):
        """Copy to another IFolder. Deferred[list[tuple[int, int]]] of
        (source uid, target uid) pairs, in source UID order (RFC 4315 COPYUID)."""

    def subscribe(listener):
        """listener(event) on the reactor thread for every change published by
        this folder, whoever caused it: mailgw.store.events.Added(uids),
        FlagsChanged(uids), Expunged(uids)."""

    def unsubscribe(listener):
        """Stop calling listener."""


class ISieveAccount(Interface):
    """The ManageSieve avatar (RFC 5804): whose scripts the session manages."""

    address = Attribute("the logged-in user's canonical address, str, lower-cased")
