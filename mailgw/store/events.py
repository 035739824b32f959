"""Value types of the mailbox store, shared by the store, POP3 and IMAP."""
from __future__ import annotations

from dataclasses import dataclass

# IMAP system flags (RFC 3501 §2.3.2). Their Maildir info letters:
# mailgw.store.maildir_name.FLAG_LETTERS.
SEEN, ANSWERED, FLAGGED, DELETED, DRAFT = "\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft"
SYSTEM_FLAGS = (ANSWERED, DELETED, DRAFT, FLAGGED, SEEN)
DEFAULT_FOLDERS = ("Drafts", "Sent", "Junk", "Trash")
# RFC 6154 special-use attributes of the default folders.
SPECIAL_USE = {"Drafts": "\\Drafts", "Sent": "\\Sent", "Junk": "\\Junk", "Trash": "\\Trash"}


@dataclass(frozen=True)
class MessageInfo:
    uid: int
    flags: frozenset          # system flags and keywords, str
    size: int                 # octets in wire form (CRLF), what RETR/FETCH send
    internaldate: float       # unix time of delivery (RFC 3501 §2.3.3)


@dataclass(frozen=True)
class Added:
    """New messages appeared (delivered, appended, copied, or found on disk)."""
    uids: tuple[int, ...]


@dataclass(frozen=True)
class FlagsChanged:
    uids: tuple[int, ...]


@dataclass(frozen=True)
class Expunged:
    uids: tuple[int, ...]


@dataclass(frozen=True)
class SyncResult:
    recent: tuple[int, ...]   # UIDs this sync moved from new/ to cur/: \Recent for the caller only
    events: tuple             # Added / FlagsChanged / Expunged published by this sync
