"""The IMAP avatar (imap4.IAccount) and the per-session view of a selected folder.

The store's IFolder is shared by every session of the process (and by POP3);
what RFC 3501 calls message sequence numbers belong to one session. So a
SessionView keeps this session's list of UIDs in sequence order, its \\Recent
set, and the changes it has been told about but not yet passed on to the
client:

- `Added` only marks that something is new: the new UIDs are whatever the
  folder holds above the view's last UID when the client may be told
  (`* n EXISTS`, never a decrease);
- `Expunged` UIDs stay in the view (as "ghosts" that can no longer be
  fetched) until an EXPUNGE response is allowed: never while answering
  FETCH, STORE or SEARCH (RFC 3501 §7.4.1, RFC 2180 §4.1), and then they are
  sent in descending sequence order so that each number is right when it is
  read;
- `FlagsChanged` UIDs become `* n FETCH (FLAGS ...)`, except where the
  client already knows the flags because this session stored them
  (no duplicate FETCH to the storing session, unlike Twisted's listener);
- \\Recent is only ever the UIDs this session's own `folder.sync()` returned
  in SyncResult.recent (RFC 3501 §2.3.2: exactly one session sees it).

The account only ever holds the IUserMailbox the realm gave it (its own
address): there is no path from one user's session to another user's mail.
"""
from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from operator import attrgetter
from typing import Callable

from twisted.internet import defer
from twisted.mail import imap4
from zope.interface import implementer

from mailgw.imap.parser import STAR
from mailgw.imap.wire import decode_mailbox, flag_list, sorted_flags
from mailgw.spam import learning
from mailgw.store.events import SYSTEM_FLAGS, Added, Expunged, FlagsChanged

_UID = attrgetter("uid")
RECENT = "\\Recent"


class SequenceError(Exception):
    """A message sequence number that does not exist: BAD."""


def normalise_name(name) -> str:
    """A mailbox name as the store wants it: str, INBOX upper-cased."""
    if isinstance(name, bytes):
        name = decode_mailbox(name)
    if name.upper() == "INBOX":
        return "INBOX"
    if name[:6].upper() == "INBOX/":
        return "INBOX" + name[5:]
    return name


@implementer(imap4.IAccount)
class IMAPAccount:
    """One user's folders as IMAP sees them. Every method returns a Deferred."""

    def __init__(self, mailbox, *, learner=None, junk_folder: str = "Junk"):
        self.mailbox = mailbox                  # IUserMailbox of the logged-in user only
        self.address = mailbox.address
        # mailgw.spam.learning.JunkLearner, or None: what the user files as junk teaches nobody.
        self.learner = learner
        self.junk_folder = junk_folder
        # mailgw.store.quota.IQuota of the store, or None (no QUOTA extension):
        # the user's folders together are one quota root, "" (RFC 9208 §3.1).
        self.quota = getattr(mailbox, "quota", None)

    # -- what the server uses ------------------------------------------------
    def folders(self):
        return defer.maybeDeferred(self.mailbox.folders)

    def folder(self, name):
        return defer.maybeDeferred(self.mailbox.folder, normalise_name(name))

    def subscriptions(self):
        return defer.maybeDeferred(self.mailbox.subscriptions)

    def logout(self):
        """The avatar holds no resources; selected views are closed by the server."""

    # -- junk learning (mailgw.spam.learning) --------------------------------
    def copied(self, source_name: str, target, target_uids) -> None:
        """A COPY or MOVE landed `target_uids` in folder `target`; learn from it in the background."""
        if self.learner is None or not target_uids:
            return
        kind = learning.copy_verdict(source_name, target.name, junk=self.junk_folder)
        if kind is not None:
            self.learner.submit(kind, target, target_uids, self.address)

    def flagged(self, folder, uids, flags, mode: str) -> None:
        """A STORE set `flags` on `uids`: $Junk and $NotJunk teach."""
        if self.learner is None or not uids:
            return
        kind = learning.flag_verdict(flags, mode)
        if kind is not None:
            self.learner.submit(kind, folder, uids, self.address)

    # -- imap4.IAccount ------------------------------------------------------
    def addMailbox(self, name, mbox=None):
        return self.create(name)

    def create(self, pathspec):
        return defer.maybeDeferred(self.mailbox.create, normalise_name(pathspec))

    def select(self, name, rw=True):
        return self.folder(name).addCallback(lambda folder: SessionView(folder, readonly=not rw))

    def delete(self, name):
        return defer.maybeDeferred(self.mailbox.delete, normalise_name(name))

    def rename(self, oldname, newname):
        return defer.maybeDeferred(self.mailbox.rename, normalise_name(oldname), normalise_name(newname))

    def isSubscribed(self, name):
        name = normalise_name(name)
        return self.subscriptions().addCallback(lambda names: name in names)

    def subscribe(self, name):
        return defer.maybeDeferred(self.mailbox.subscribe, normalise_name(name))

    def unsubscribe(self, name):
        return defer.maybeDeferred(self.mailbox.unsubscribe, normalise_name(name))

    def listMailboxes(self, ref, wildcard):
        from mailgw.imap.listing import match_pattern
        pattern = normalise_name(ref) + normalise_name(wildcard)
        return self.folders().addCallback(
            lambda names: [(name, None) for name in names if match_pattern(pattern, name)])


class SessionView:
    """This session's numbering of one selected folder."""

    def __init__(self, folder, *, readonly: bool):
        self.folder = folder
        self.readonly = readonly
        self.uids = array("I")             # sequence number n is uids[n - 1]
        self.recent: set[int] = set()
        self.keywords: set[str] = set()
        self.on_change: Callable[[], None] | None = None
        self.on_expunged: Callable[[tuple[int, ...]], None] | None = None   # store event, at once
        self.closed = False
        self._new = False
        self._expunged: set[int] = set()
        self._flag_changes: set[int] = set()
        self._reported: dict[int, frozenset] = {}
        self._told_recent = 0              # the last RECENT count the client was given

    # -- life cycle -----------------------------------------------------------
    def start(self):
        """Sync, take the snapshot, listen. Deferred[self]."""
        def synced(result):
            if self.closed:
                return self
            messages = self.folder.messages()
            self.uids = array("I", [m.uid for m in messages])
            present = set(self.uids)
            self.recent = {uid for uid in result.recent if uid in present}
            self.keywords = {flag for m in messages for flag in m.flags if not flag.startswith("\\")}
            self._told_recent = len(self.recent)
            self.folder.subscribe(self._event)
            return self
        return defer.maybeDeferred(self.folder.sync).addCallback(synced)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.on_change = None
            self.folder.unsubscribe(self._event)

    def sync(self):
        """Ask the store for changes made elsewhere; this session gets the \\Recent."""
        def synced(result):
            self.recent.update(result.recent)
            return result
        return defer.maybeDeferred(self.folder.sync).addCallback(synced)

    def _event(self, event) -> None:
        if self.closed:
            return
        if isinstance(event, Added):
            self._new = True
        elif isinstance(event, FlagsChanged):
            self._flag_changes.update(event.uids)
        elif isinstance(event, Expunged):
            self._expunged.update(event.uids)
            if self.on_expunged is not None:
                self.on_expunged(event.uids)
        else:
            return
        if self.on_change is not None:
            self.on_change()

    @property
    def pending(self) -> bool:
        return (self._new or bool(self._expunged) or bool(self._flag_changes)
                or len(self.recent) != self._told_recent)

    # -- lookups ----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.uids)

    def seq_of(self, uid: int) -> int | None:
        index = bisect_left(self.uids, uid)
        if index < len(self.uids) and self.uids[index] == uid:
            return index + 1
        return None

    def lookup(self, count: int = 0) -> Callable[[int], object]:
        """uid -> MessageInfo (None for a message no longer in the folder)."""
        messages = self.folder.messages()
        if count > 64:
            table = {m.uid: m for m in messages}
            return table.get

        def find(uid):
            index = bisect_left(messages, uid, key=_UID)
            if index < len(messages) and messages[index].uid == uid:
                return messages[index]
            return None
        return find

    def flags_of(self, uid: int, info) -> frozenset:
        return info.flags | {RECENT} if uid in self.recent else info.flags

    def resolve(self, ranges, uid_mode: bool) -> list[int]:
        """Sequence numbers (ascending, each once) named by a sequence set.
        Nothing is allocated per number of a range, only per message found."""
        count = len(self.uids)
        spans = []
        if uid_mode:
            if not count:
                return []
            top = self.uids[-1]
            for low, high in ranges:
                low = top if low is STAR else low
                high = top if high is STAR else high
                if low > high:
                    low, high = high, low
                start = bisect_left(self.uids, low)
                end = bisect_right(self.uids, high)
                if start < end:
                    spans.append((start + 1, end))
        else:
            for low, high in ranges:
                if low is STAR and high is STAR and not count:
                    continue
                low = count if low is STAR else low
                high = count if high is STAR else high
                if low > high:
                    low, high = high, low
                if low > count:
                    raise SequenceError("Invalid message sequence number")
                if low >= 1:
                    spans.append((low, min(high, count)))
        spans.sort()
        seqs: list[int] = []
        last = 0
        for low, high in spans:
            low = max(low, last + 1)
            if low <= high:
                seqs.extend(range(low, high + 1))
                last = high
        return seqs

    # -- our own changes ---------------------------------------------------------
    def stored(self, new_flags: dict) -> None:
        """This session stored these flags and tells its client itself."""
        self._reported.update(new_flags)

    def expunged_here(self, uids) -> None:
        """This session expunged these; their EXPUNGE responses go out with the
        next `updates(allow_expunge=True)`."""
        self._expunged.update(uids)

    def new_keywords(self, flags) -> bool:
        fresh = {flag for flag in flags if not flag.startswith("\\")} - self.keywords
        if fresh:
            self.keywords |= fresh
            return True
        return False

    # -- untagged updates ----------------------------------------------------------
    def flags_response(self) -> bytes:
        flags = [*SYSTEM_FLAGS_ORDER, *sorted(self.keywords)]
        out = b"* FLAGS " + flag_list(flags) + b"\r\n"
        if self.readonly:
            return out + b"* OK [PERMANENTFLAGS ()] Read-only mailbox\r\n"
        return out + b"* OK [PERMANENTFLAGS " + flag_list([*flags, "\\*"]) + b"] Flags permitted\r\n"

    def updates(self, allow_expunge: bool, uid_in_fetch: bool = True) -> list[bytes]:
        """The untagged responses owed to the client, in a valid order:
        EXPUNGE (if allowed) first, then EXISTS/RECENT, then flag changes."""
        out: list[bytes] = []
        if allow_expunge and self._expunged:
            self._apply_expunges(out)
        if self._new:
            self._new = False
            messages = self.folder.messages()
            last = self.uids[-1] if self.uids else 0
            start = bisect_right(messages, last, key=_UID)
            if start < len(messages):
                fresh = messages[start:]
                if self.new_keywords({flag for m in fresh for flag in m.flags}):
                    out.append(self.flags_response())
                self.uids.extend(m.uid for m in fresh)
                out.append(b"* %d EXISTS\r\n" % len(self.uids))
        self.recent = {uid for uid in self.recent if self.seq_of(uid) is not None}
        if out and out[-1].endswith(b" EXISTS\r\n") or len(self.recent) != self._told_recent:
            # RFC 3501 §7.3.2: RECENT with every EXISTS, and whenever our count changes
            # (a later sync of ours may claim \Recent for messages already announced).
            out.append(b"* %d RECENT\r\n" % len(self.recent))
            self._told_recent = len(self.recent)
        if self._flag_changes:
            changed, self._flag_changes = self._flag_changes, set()
            reported, self._reported = self._reported, {}
            find = self.lookup(len(changed))
            lines = []
            fresh_flags: set[str] = set()
            for uid in sorted(changed):
                seq = self.seq_of(uid)
                info = find(uid) if seq is not None else None
                if info is None or uid in self._expunged:
                    continue
                if reported.get(uid) == info.flags:
                    continue
                fresh_flags |= info.flags
                flags = sorted_flags(self.flags_of(uid, info))
                if uid_in_fetch:
                    lines.append(b"* %d FETCH (UID %d FLAGS %s)\r\n" % (seq, uid, flag_list(flags)))
                else:
                    lines.append(b"* %d FETCH (FLAGS %s)\r\n" % (seq, flag_list(flags)))
            if self.new_keywords(fresh_flags):
                out.append(self.flags_response())
            out.extend(lines)
        else:
            self._reported = {}
        return out

    def _apply_expunges(self, out: list[bytes]) -> None:
        gone, self._expunged = self._expunged, set()
        indexes = []
        for uid in gone:
            seq = self.seq_of(uid)
            if seq is not None:
                indexes.append(seq - 1)
        if not indexes:
            return
        indexes.sort(reverse=True)
        # Descending: removing a higher number never renumbers a lower one, so
        # each "* n EXPUNGE" is right as the client reads it.
        out.append(b"".join(b"* %d EXPUNGE\r\n" % (index + 1) for index in indexes))
        removed = set()
        for index in indexes:
            removed.add(self.uids[index])
        self.uids = array("I", [uid for uid in self.uids if uid not in removed])
        self.recent -= removed


SYSTEM_FLAGS_ORDER = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")
assert set(SYSTEM_FLAGS_ORDER) == set(SYSTEM_FLAGS)
