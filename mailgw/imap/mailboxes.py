"""IMAP commands of the authenticated state (RFC 3501 §6.3): SELECT and
EXAMINE, mailbox management, LIST/LSUB/STATUS, APPEND, NAMESPACE, ENABLE,
and RFC 9208 QUOTA. A mixin of mailgw.imap.server.IMAPServer, which owns
the session and the command table."""
from __future__ import annotations

from twisted.internet import defer

from mailgw.imap import listing
from mailgw.imap.mailbox import SessionView, normalise_name
from mailgw.imap.parser import ParseError, Reader
from mailgw.imap.replies import (
    AUTHENTICATED,
    BAD,
    NO,
    NO_REPLY,
    OK,
    OVER_QUOTA_TEXT,
    SELECTED,
    STORE_REFUSED,
    trap,
)
from mailgw.imap.wire import BadMailboxName, astring, decode_mailbox, encode_mailbox
from mailgw.store.events import SEEN

class MailboxCommands:
    # -- authenticated ------------------------------------------------------------------
    def _mailbox(self, reader: Reader) -> str:
        raw = reader.astring()
        if not raw:
            raise NO("Empty mailbox name", b"CANNOT")
        return normalise_name(raw)

    def do_SELECT(self, tag, reader, uid):
        return self._select(reader, readonly=False)

    def do_EXAMINE(self, tag, reader, uid):
        return self._select(reader, readonly=True)

    def _select(self, reader, readonly: bool):
        reader.sp()
        name = self._mailbox(reader)
        reader.end()
        # RFC 3501 §6.3.1: a SELECT, even a failing one, leaves the old mailbox.
        self._deselect()

        def got(folder):
            view = SessionView(folder, readonly=readonly)
            prefix = self._cache_prefix(folder)
            cache = self.cache

            def forget(uids):
                # Parsed headers of expunged messages are dead weight in the shared cache.
                for uid in uids:
                    cache.discard(prefix + (uid,))
            view.on_expunged = forget
            return view.start()

        def started(view):
            if self.closing:
                view.close()
                return NO_REPLY
            self.view = view
            self.state = SELECTED
            messages = view.folder.messages()
            out = [view.flags_response(),
                   b"* %d EXISTS\r\n" % len(view),
                   b"* %d RECENT\r\n" % len(view.recent)]
            for seq, info in enumerate(messages, 1):
                if SEEN not in info.flags:
                    out.append(b"* OK [UNSEEN %d] First unseen message\r\n" % seq)
                    break
            out.append(b"* OK [UIDVALIDITY %d] UIDs valid\r\n" % view.folder.uidvalidity)
            out.append(b"* OK [UIDNEXT %d] Predicted next UID\r\n" % view.folder.uidnext)
            self._write(b"".join(out))
            if readonly:
                return OK("EXAMINE completed", b"READ-ONLY")
            return OK("SELECT completed", b"READ-WRITE")
        return (self.account.folder(name)
                .addErrback(trap(KeyError, NO("No such mailbox", b"NONEXISTENT")))
                .addErrback(trap(ValueError, NO("Invalid mailbox name", b"CANNOT")))
                .addCallback(got).addCallback(started))

    def _deselect(self) -> None:
        view, self.view = self.view, None
        if view is not None:
            view.close()
        if self.state == SELECTED:
            self.state = AUTHENTICATED

    def do_CREATE(self, tag, reader, uid):
        reader.sp()
        name = self._mailbox(reader)
        reader.end()
        # RFC 3501 §6.3.3: a trailing separator only declares the name a parent.
        name = name.rstrip(listing.SEPARATOR) or name
        if name == "INBOX":
            raise NO("INBOX always exists", b"ALREADYEXISTS")
        return (self.account.create(name)
                .addCallback(lambda _: OK("CREATE completed"))
                .addErrback(trap(FileExistsError, NO("Mailbox already exists", b"ALREADYEXISTS")))
                .addErrback(trap(KeyError, NO("Parent mailbox does not exist", b"NONEXISTENT")))
                .addErrback(trap(ValueError, NO("Invalid mailbox name", b"CANNOT"))))

    def do_DELETE(self, tag, reader, uid):
        reader.sp()
        name = self._mailbox(reader)
        reader.end()
        if name == "INBOX":
            raise NO("INBOX cannot be deleted", b"CANNOT")
        if self.view is not None and self.view.folder.name == name:
            raise NO("Mailbox is selected; CLOSE it first", b"INUSE")
        return (self.account.delete(name)
                .addCallback(lambda _: OK("DELETE completed"))
                .addErrback(trap(KeyError, NO("No such mailbox", b"NONEXISTENT")))
                .addErrback(trap(ValueError, NO("Mailbox cannot be deleted", b"CANNOT"))))

    def do_RENAME(self, tag, reader, uid):
        reader.sp()
        old = self._mailbox(reader)
        reader.sp()
        new = self._mailbox(reader).rstrip(listing.SEPARATOR)
        reader.end()
        if not new:
            raise NO("Invalid mailbox name", b"CANNOT")
        if new == "INBOX":
            raise NO("INBOX already exists", b"ALREADYEXISTS")
        if self.view is not None and (self.view.folder.name == old
                                      or self.view.folder.name.startswith(old + listing.SEPARATOR)):
            raise NO("Mailbox is selected; CLOSE it first", b"INUSE")
        return (self.account.rename(old, new)
                .addCallback(lambda _: OK("RENAME completed"))
                .addErrback(trap(FileExistsError, NO("Target mailbox already exists", b"ALREADYEXISTS")))
                .addErrback(trap(KeyError, NO("No such mailbox", b"NONEXISTENT")))
                .addErrback(trap(ValueError, NO("Invalid mailbox name", b"CANNOT"))))

    def do_SUBSCRIBE(self, tag, reader, uid):
        reader.sp()
        name = self._mailbox(reader)
        reader.end()
        return (self.account.subscribe(name)
                .addCallback(lambda _: OK("SUBSCRIBE completed"))
                .addErrback(trap(KeyError, NO("No such mailbox", b"NONEXISTENT")))
                .addErrback(trap(ValueError, NO("Invalid mailbox name", b"CANNOT"))))

    def do_UNSUBSCRIBE(self, tag, reader, uid):
        reader.sp()
        name = self._mailbox(reader)
        reader.end()
        return (self.account.unsubscribe(name)
                .addCallback(lambda _: OK("UNSUBSCRIBE completed"))
                .addErrback(trap(KeyError, NO("Not subscribed", b"NONEXISTENT")))
                .addErrback(trap(ValueError, NO("Invalid mailbox name", b"CANNOT"))))

    def _options(self, reader: Reader) -> set[str]:
        reader.open_paren()
        options = set()
        if not reader.maybe(b")"):
            while True:
                options.add(reader.keyword())
                if reader.maybe(b")"):
                    break
                reader.sp()
        reader.leave()
        return options

    def do_LIST(self, tag, reader, uid):
        # RFC 3501 §6.3.8, with the RFC 5258 selection and return options
        # that SPECIAL-USE (RFC 6154 §5) and CHILDREN need.
        reader.sp()
        selection = set()
        if reader.peek() == 0x28:
            selection = self._options(reader)
            reader.sp()
        reference = _pattern(reader.astring())
        reader.sp()
        if reader.peek() == 0x28:
            reader.open_paren()
            patterns = [reader.list_mailbox()]
            while not reader.maybe(b")"):
                reader.sp()
                patterns.append(reader.list_mailbox())
            reader.leave()
        else:
            patterns = [reader.list_mailbox()]
        returns = set()
        if reader.maybe_sp():
            if reader.keyword() != "RETURN":
                raise ParseError("Expected RETURN")
            reader.sp()
            returns = self._options(reader)
        reader.end()
        unknown = (selection - {"SUBSCRIBED", "SPECIAL-USE", "REMOTE", "RECURSIVEMATCH"}) | \
            (returns - {"SUBSCRIBED", "SPECIAL-USE", "CHILDREN"})
        if unknown:
            raise BAD(f"Unsupported LIST option {sorted(unknown)[0]}")
        if patterns == [b""] and not selection:
            # RFC 3501 §6.3.8: the hierarchy delimiter and root name.
            self._write(b'* LIST (\\Noselect) "/" ""\r\n')
            return OK("LIST completed")
        try:
            patterns = [reference + _pattern(raw) for raw in patterns]
        except BadMailboxName as error:
            raise NO(f"Invalid mailbox pattern: {error}", b"CANNOT") from None
        want_subscribed = "SUBSCRIBED" in selection or "SUBSCRIBED" in returns

        def listed(results):
            folders, subscribed = results
            seen = set()
            out = []
            for pattern in patterns:
                for name, attributes in listing.list_entries(
                        folders, pattern, subscribed=set(subscribed) if want_subscribed else None,
                        only_subscribed="SUBSCRIBED" in selection,
                        only_special="SPECIAL-USE" in selection):
                    if name not in seen:
                        seen.add(name)
                        out.append(b"* LIST (" + " ".join(attributes).encode("ascii") + b') "/" '
                                   + astring(encode_mailbox(name)) + b"\r\n")
            self._write(b"".join(out))
            return OK("LIST completed")
        subscriptions = self.account.subscriptions() if want_subscribed else defer.succeed([])
        return defer.gatherResults([self.account.folders(), subscriptions], consumeErrors=True) \
            .addErrback(lambda failure: failure.value.subFailure).addCallback(listed)

    def do_LSUB(self, tag, reader, uid):
        reader.sp()
        reference = reader.astring()
        reader.sp()
        raw = reader.list_mailbox()
        reader.end()
        try:
            pattern = _pattern(reference) + _pattern(raw)
        except BadMailboxName as error:
            raise NO(f"Invalid mailbox pattern: {error}", b"CANNOT") from None

        def listed(subscribed):
            out = [b"* LSUB (" + " ".join(attributes).encode("ascii") + b') "/" '
                   + astring(encode_mailbox(name)) + b"\r\n"
                   for name, attributes in listing.lsub_entries(list(subscribed), pattern)]
            self._write(b"".join(out))
            return OK("LSUB completed")
        return self.account.subscriptions().addCallback(listed)

    def do_STATUS(self, tag, reader, uid):
        reader.sp()
        name = self._mailbox(reader)
        reader.sp()
        reader.open_paren()
        items = [reader.keyword()]
        while not reader.maybe(b")"):
            reader.sp()
            items.append(reader.keyword())
        reader.leave()
        reader.end()
        for item in items:
            if item not in ("MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN"):
                raise BAD(f"Unknown STATUS item {item[:40]}")
        view = self.view
        state = {}

        def got(folder):
            state["folder"] = folder
            return folder.sync()

        def synced(result):
            folder = state["folder"]
            if view is not None and view.folder is folder:
                # Our own selected folder: the \Recent found now are ours.
                view.recent.update(result.recent)
                recent = len(view.recent)
            else:
                # RFC 3501 §6.3.10: this session is the first to see these.
                recent = len(result.recent)
            messages = folder.messages()
            values = {
                "MESSAGES": len(messages),
                "RECENT": recent,
                "UIDNEXT": folder.uidnext,
                "UIDVALIDITY": folder.uidvalidity,
                "UNSEEN": sum(1 for m in messages if SEEN not in m.flags),
            }
            body = " ".join(f"{item} {values[item]}" for item in items).encode("ascii")
            self._write(b"* STATUS " + astring(encode_mailbox(folder.name)) + b" (" + body + b")\r\n")
            return OK("STATUS completed")
        return (self.account.folder(name)
                .addErrback(trap(KeyError, NO("No such mailbox", b"NONEXISTENT")))
                .addErrback(trap(ValueError, NO("Invalid mailbox name", b"CANNOT")))
                .addCallback(got).addCallback(synced))

    def do_APPEND(self, tag, reader, uid):
        reader.sp()
        name = self._mailbox(reader)
        reader.sp()
        flags: list[str] = []
        date = None
        if reader.peek() == 0x28:
            flags = reader.flag_list()
            reader.sp()
        if reader.peek() == 0x22:
            date = reader.date_time()
            reader.sp()
        if not reader.at_literal():
            raise ParseError("APPEND needs the message as a literal")
        message = reader.literal()
        reader.end()
        if len(message) > self.limits.max_append:
            raise NO(f"Message larger than APPENDLIMIT={self.limits.max_append}", b"TOOBIG")
        if not message:
            raise NO("Empty message")

        def got(folder):
            quota = self._quota()
            # Stored with LF line ends: the octets it takes on disk (S=).
            if quota is not None and quota.over(self.user, len(message) - message.count(b"\r\n"), 1):
                raise NO(OVER_QUOTA_TEXT, b"OVERQUOTA")             # RFC 9208 §4.3: nothing stored
            return (defer.maybeDeferred(folder.append, message, flags=tuple(flags), internaldate=date)
                    .addErrback(trap(ValueError, STORE_REFUSED))
                    .addCallback(lambda new_uid: OK(
                        "APPEND completed", b"APPENDUID %d %d" % (folder.uidvalidity, new_uid))))   # RFC 4315
        return (self.account.folder(name)
                .addErrback(trap(KeyError, NO("No such mailbox", b"TRYCREATE")))
                .addErrback(trap(ValueError, NO("Invalid mailbox name", b"CANNOT")))
                .addCallback(got))

    def do_NAMESPACE(self, tag, reader, uid):
        reader.end()
        # RFC 2342: personal, other users', shared: only the personal one.
        self._write(b'* NAMESPACE (("" "/")) NIL NIL\r\n')
        return OK("NAMESPACE completed")

    def do_ENABLE(self, tag, reader, uid):
        reader.sp()
        reader.atom()
        while reader.maybe_sp():
            reader.atom()
        reader.end()
        # RFC 5161: nothing we offer needs enabling (no CONDSTORE, no UTF8=ACCEPT).
        self._write(b"* ENABLED\r\n")
        return OK("ENABLE completed")


    # -- RFC 9208 QUOTA ------------------------------------------------------------------
    def _copy_octets(self, infos) -> int:
        """Octets copies of `infos` take on disk: the store's exact figure when its folder
        has one, else RFC822.SIZE (a little more than the LF-only files: errs on refusing)."""
        measure = getattr(self.view.folder, "octets_on_disk", None)
        return measure([info.uid for info in infos]) if measure is not None else sum(info.size for info in infos)

    def _require_quota(self, name: str):
        quota = self._quota()
        if quota is None:
            raise ParseError(f"Unknown command {name}")     # not advertised: as if it did not exist
        return quota

    def _quota_line(self, quota) -> bytes | None:
        """`* QUOTA "" (...)` of the user's one quota root, None when it has no limit."""
        resources = _quota_resources(quota.status(self.user))
        return b'* QUOTA "" (' + resources + b")\r\n" if resources else None

    def do_GETQUOTAROOT(self, tag, reader, uid):
        quota = self._require_quota("GETQUOTAROOT")
        reader.sp()
        name = self._mailbox(reader)
        reader.end()

        def listed(names):
            if name not in names:
                raise NO("No such mailbox", b"NONEXISTENT")
            line = self._quota_line(quota)
            mailbox = astring(encode_mailbox(name))
            if line is None:
                # RFC 9208 §4.2.2: a mailbox without quota roots (no limits at all).
                self._write(b"* QUOTAROOT " + mailbox + b"\r\n")
            else:
                # RFC 9208 §4.1.2: every folder of the user shares the root "".
                self._write(b"* QUOTAROOT " + mailbox + b' ""\r\n' + line)
            return OK("GETQUOTAROOT completed")
        return self.account.folders().addCallback(listed)

    def do_GETQUOTA(self, tag, reader, uid):
        quota = self._require_quota("GETQUOTA")
        reader.sp()
        root = reader.astring()
        reader.end()
        line = self._quota_line(quota) if root == b"" else None
        if line is None:
            raise NO("No such quota root", b"NONEXISTENT")    # RFC 9208 §4.1.1
        self._write(line)
        return OK("GETQUOTA completed")

    def do_SETQUOTA(self, tag, reader, uid):
        self._require_quota("SETQUOTA")
        # RFC 9208 §4.1.3: SETQUOTA root (resource limit ...); parsed, so that bad syntax is BAD.
        reader.sp()
        reader.astring()
        reader.sp()
        reader.open_paren()
        if not reader.maybe(b")"):
            while True:
                reader.atom()
                reader.sp()
                if not reader.atom().isdigit():                # number64
                    raise ParseError("Expected a number")
                if reader.maybe(b")"):
                    break
                reader.sp()
        reader.leave()
        reader.end()
        # RFC 9208 §4.1.3: without QUOTASET it is not supported; limits are `mailgw quota set`'s.
        raise NO("Quotas are set by the administrator", b"NOPERM")


def _quota_resources(status: dict) -> bytes:
    """The resource list of a QUOTA response; a resource without limit is left out."""
    parts = []
    if status["bytes_limit"]:
        # RFC 9208 §5.1: STORAGE counts units of 1024 octets; usage rounded up, the limit down.
        parts.append(b"STORAGE %d %d" % (-(-status["bytes"] // 1024), max(status["bytes_limit"] // 1024, 1)))
    if status["messages_limit"]:
        parts.append(b"MESSAGE %d %d" % (status["messages"], status["messages_limit"]))    # RFC 9208 §5.2
    return b" ".join(parts)


def _pattern(raw: bytes) -> str:
    """A LIST reference or pattern: the mailbox-name encoding decoded, wildcards
    kept (INBOX's case is handled by the matcher)."""
    return decode_mailbox(raw)
