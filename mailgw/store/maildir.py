"""Durable delivery into Maildirs (https://cr.yp.to/proto/maildir.html).

Layout under `mail_dir` (see docs/spool-format.md):

    mail_dir/<domain>/<local>/          the mailbox of local@domain = its INBOX Maildir
        tmp/  new/  cur/                Maildir; delivery goes tmp/ -> new/
        .Drafts/ .Sent/ .Junk/ .Trash/  Maildir++ folders, each with tmp/ new/ cur/
        index files of the IMAP store   (docs/store-format.md)

Messages are stored with LF line ends (the Maildir convention Dovecot and mutt
expect); the SMTP wire form is CRLF. The file name in new/ is

    <unix seconds>.M<microseconds>P<pid>Q<counter>.<hostname>,S=<octets on disk>,W=<octets with CRLF>

following Dovecot: S= is the file size, W= the RFC 822 (CRLF) size, so POP3
LIST and IMAP RFC822.SIZE need no read of the file. In the hostname "/", ":"
and "," are written as \\057, \\072 and \\054 (":" starts the info part, ","
separates the size fields). Names are built by mailgw.store.maildir_name.

The address becomes a path, so it is validated again here, whatever the SMTP
layer already checked.
"""
from __future__ import annotations

import itertools
import os
import re
import time
from pathlib import Path
from typing import Callable

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from zope.interface import implementer

from mailgw.durable import DurableWriter
from mailgw.interfaces import ILocalStore
from mailgw.store.maildir_name import FLAG_LETTERS, INFO, delivery_name, escape_hostname, unique_base
from mailgw.store.names import folder_dirname

# Lower-case only: "Alice" and "alice" must not become two mailboxes.
_LOCAL_PART = re.compile(r"[a-z0-9_+\-][a-z0-9._+\-]*")
_DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9\-]{0,61}[a-z0-9])?")
MAX_LOCAL_PART = 64   # RFC 5321 §4.5.3.1.1
MAX_DOMAIN = 255      # RFC 5321 §4.5.3.1.2

# What may go between <> of Return-Path: no line end, NUL or angle bracket.
_HEADER_SAFE = re.compile(r"[^\r\n\0<>]*")
MAILDIR_SUBDIRECTORIES = ("tmp", "new", "cur")
# https://cr.yp.to/proto/maildir.html: a tmp/ file untouched for 36 hours is garbage.
TMP_MAX_AGE = 36 * 3600.0
# Mailbox directory paths kept per address (a small organisation has far fewer).
_MAX_KNOWN_MAILBOXES = 10_000


def split_mailbox_address(address: str) -> tuple[str, str]:
    """(local, domain) of a mailbox address that is safe to use as a path;
    ValueError for anything else."""
    if not isinstance(address, str) or address.count("@") != 1:
        raise ValueError(f"not a mailbox address: {address!r}")
    local, domain = address.split("@")
    if (
        not 0 < len(local) <= MAX_LOCAL_PART
        or not _LOCAL_PART.fullmatch(local)  # no leading dot: hidden file / Maildir++ folder
        or ".." in local
    ):
        raise ValueError(f"unsafe local part: {address!r}")
    labels = domain.split(".")
    if len(domain) > MAX_DOMAIN or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"unsafe domain: {address!r}")
    return local, domain


@implementer(ILocalStore)
class MaildirStore:
    def __init__(
        self,
        mail_dir: Path,
        *,
        writer: DurableWriter,
        hostname: str,
        clock: Callable[[], float] = time.time,
        on_delivered: Callable[[list], None] | None = None,
        quota=None,
    ):
        self._mail_dir = Path(mail_dir)
        # IQuota (mailgw.store.quota) or None: told what each commit stored.
        # Never asked here: a message that got its 250 is delivered even over quota.
        self._quota = quota
        # Told the addresses after each successful commit (MailStore.delivered:
        # wakes IMAP IDLE sessions of those INBOXes).
        self._on_delivered = on_delivered
        self._writer = writer
        self._host = escape_hostname(hostname)
        self._clock = clock
        self._pid = os.getpid()
        self._counter = itertools.count(1)
        # Mailboxes whose directory chain this process has made durable.
        self._ready: set[Path] = set()
        # address -> (mailbox, its new/, its tmp/): built once, not per message.
        self._directories: dict[str, tuple[Path, Path, Path]] = {}
        # Start-up, before the reactor runs: the root must exist for
        # ensure_directories.
        self._mail_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    def mailbox_path(self, address: str) -> Path:
        """The INBOX Maildir of `address`; ValueError if it is not safe."""
        local, domain = split_mailbox_address(address)
        return self._mail_dir / domain / local

    def _mailbox_directories(self, address: str, folder: str | None = None) -> tuple[Path, Path, Path]:
        """(Maildir, its new/, its tmp/) of `address`'s INBOX or of one of its folders."""
        key = (address, folder)
        known = self._directories.get(key)
        if known is None:
            path = self.mailbox_path(address)          # ValueError if unsafe: not kept
            if folder is not None:
                _, dirname = folder_dirname(folder)    # ValueError for a name that would leave the mailbox
                if dirname is not None:
                    path = path / dirname
            if len(self._directories) >= _MAX_KNOWN_MAILBOXES:
                self._directories.clear()
            known = self._directories[key] = (path, path / "new", path / "tmp")
        return known

    def deliver(self, mailboxes, message: bytes, lf: bool = False, return_path: str | None = None) -> Deferred:
        """Store `message` (CRLF; or already LF-only when `lf`, which saves a
        pass over big messages) in new/ of every mailbox, all or nothing.
        A mailbox is an address (its INBOX), an (address, folder) pair
        (subaddress filing, routing.resolver) or an (address, folder, flags)
        triple (Sieve's imap4flags: the system flags go into the name's info,
        which the folder keeps when it moves the file to cur/); one copy per
        distinct target.
        With `return_path` (the envelope sender, "" for <>), each copy starts
        with Return-Path: and Delivered-To: its mailbox, so copies differ.
        Fires with the stored paths (one per distinct mailbox)."""
        targets = [(box, None, "") if isinstance(box, str) else
                   (box[0], box[1] if box[1] != "INBOX" else None, _info(box[2] if len(box) > 2 else ()))
                   for box in mailboxes]
        targets = list(dict.fromkeys(targets))
        addresses = list(dict.fromkeys(address for address, _, _ in targets))
        try:
            directories = [self._mailbox_directories(address, folder) for address, folder, _ in targets]
            if return_path is not None and not _HEADER_SAFE.fullmatch(return_path):
                raise ValueError(f"unsafe return path: {return_path!r}")
        except ValueError:
            return fail()
        if not directories:
            return succeed([])
        paths = [path for path, _, _ in directories]
        if lf:
            stored, wire_size = message, len(message) + message.count(b"\n")
        else:
            stored, wire_size = message.replace(b"\r\n", b"\n"), len(message)
        if return_path is None:
            name = self._new_name(len(stored), wire_size)
            writes = [(new, tmp, name + info, stored) for (_, _, info), (_, new, tmp) in zip(targets, directories)]
        else:
            writes = []
            for (address, _, info), (_, new, tmp) in zip(targets, directories):
                # RFC 5321 §4.4: the final delivery adds Return-Path; Delivered-To (RFC 9228: a bare addr-spec)
                # as Postfix's local(8), so a forwarding loop can be seen.
                header = f"Return-Path: <{return_path}>\nDelivered-To: {address}\n".encode("utf-8")
                data = header + stored
                writes.append((new, tmp, self._new_name(len(data), wire_size + len(header) + 2) + info, data))

        missing = [path for path in paths if path not in self._ready]
        if missing:
            d = self._writer.ensure_directories(
                self._mail_dir, [path / sub for path in missing for sub in MAILDIR_SUBDIRECTORIES]
            )
            d.addCallback(lambda _: self._ready.update(missing))
            d.addCallback(lambda _: self._writer.commit(writes))
        else:
            d = self._writer.commit(writes)

        def forget(failure):
            # A mailbox removed behind our back is recreated on the next try.
            self._ready.difference_update(paths)
            return failure

        d.addErrback(forget)
        if self._quota is not None:
            per_address: dict[str, list[int]] = {}    # address -> [octets, messages]
            for (address, _, _), (_, _, _, data) in zip(targets, writes):
                totals = per_address.setdefault(address, [0, 0])
                totals[0] += len(data)
                totals[1] += 1
            d.addCallback(self._record_quota, per_address, 1)
        if self._on_delivered is not None:
            d.addCallback(self._notify_delivered, addresses)
        return d

    def _record_quota(self, result, per_address: dict[str, list[int]], sign: int):
        # One maildirsize line per address (its INBOX and folder copies together), octets as on disk (S=).
        for address, (octets, messages) in per_address.items():
            try:
                self._quota.record(address, sign * octets, sign * messages)
            except Exception:  # the mail is stored: a failed count must not undo that
                Logger().failure("quota record failed for {address}", address=address)
        return result

    def _notify_delivered(self, stored, addresses):
        try:
            self._on_delivered(addresses)
        except Exception:  # the mail is stored: a failed notification must not undo that
            Logger().failure("on_delivered callback failed")
        return stored

    def discard(self, paths) -> Deferred:
        """Remove messages `deliver` stored, when the transaction failed
        elsewhere (e.g. the relay spool): the client will retry, so keeping
        them would deliver twice. Best effort; only files in a new/ below
        mail_dir are touched."""
        mine = []
        per_address: dict[str, list[int]] = {}
        for path in map(Path, paths):
            if path.parent.name == "new" and self._mail_dir in path.parents and ".." not in path.parts:
                mine.append(path)
                if self._quota is not None:
                    # Only what is still in new/: a file a sync already moved to cur/ stays (and counts).
                    try:
                        size = os.stat(path).st_size
                    except OSError:
                        continue
                    domain, local = path.relative_to(self._mail_dir).parts[:2]
                    totals = per_address.setdefault(f"{local}@{domain}", [0, 0])
                    totals[0] += size
                    totals[1] += 1
        d = self._writer.remove(mine)
        if per_address:
            d.addCallback(self._record_quota, per_address, -1)
        return d

    def clean_tmp(self, *, older_than: float = TMP_MAX_AGE) -> int:
        """Remove files left in tmp/ by a crashed writer. Start-up only (blocking).

        The Maildir spec says tmp/ files untouched for 36 hours are garbage;
        younger ones may belong to another MDA still writing, so they stay.
        Returns how many were removed."""
        cutoff = self._clock() - older_than
        removed = 0
        for pattern in ("*/*/tmp/*", "*/*/.*/tmp/*"):
            for path in self._mail_dir.glob(pattern):
                try:
                    if path.is_file() and path.stat().st_mtime < cutoff:
                        path.unlink()
                        removed += 1
                except OSError:
                    continue
        return removed

    def _new_name(self, size: int, wire_size: int) -> str:
        # Unique within this host: the pid tells processes apart, the counter
        # deliveries within one (the clock may repeat or go back).
        return delivery_name(unique_base(self._clock(), self._pid, next(self._counter), self._host),
                             size, wire_size)


def _info(flags) -> str:
    """The Maildir info of the system flags among `flags` ("" for none).
    Keywords have no letter of their own here (docs/store-format.md §3)."""
    letters = "".join(sorted({FLAG_LETTERS[flag] for flag in flags if flag in FLAG_LETTERS}))
    return INFO + letters if letters else ""
