"""IMAP commands of the selected state (RFC 3501 §6.4): CHECK, CLOSE,
UNSELECT, EXPUNGE, SEARCH, FETCH, STORE, COPY and MOVE. A mixin of
mailgw.imap.server.IMAPServer, which owns the session and the command table."""
from __future__ import annotations

from twisted.internet import defer, task

from mailgw.imap import fetch, search
from mailgw.imap.message import parse_header_of
from mailgw.imap.parser import ParseError
from mailgw.imap.replies import NO, NO_REPLY, OK, OVER_QUOTA_TEXT, STORE_REFUSED, gone, selected_call, trap
from mailgw.imap.wire import flag_list, ordered_uid_set, sorted_flags
from mailgw.store.events import DELETED, SEEN
# FETCH/SEARCH work in chunks: at most this many messages, or this many
# octets of message text, per chunk (one write, one batch of file reads).
CHUNK_MESSAGES = 512
CHUNK_OCTETS = 1024 * 1024


class SelectedCommands:
    # -- selected ---------------------------------------------------------------------
    def do_CHECK(self, tag, reader, uid):
        reader.end()
        return selected_call(self.view.sync()).addCallback(lambda _: OK("CHECK completed"))

    def do_CLOSE(self, tag, reader, uid):
        reader.end()
        view = self.view
        if view.readonly:
            self._deselect()
            return OK("CLOSE completed")
        find = view.lookup(len(view))
        doomed = [u for u in view.uids if (info := find(u)) is not None and DELETED in info.flags]

        def expunged(_):
            self._deselect()
            return OK("CLOSE completed")
        # RFC 3501 §6.4.2: expunge silently, no EXPUNGE responses.
        if not doomed:
            return expunged(None)
        return selected_call(defer.maybeDeferred(view.folder.expunge, doomed)).addCallback(expunged)

    def do_UNSELECT(self, tag, reader, uid):
        reader.end()
        self._deselect()                                  # RFC 3691: like CLOSE, without expunging
        return OK("UNSELECT completed")

    def do_EXPUNGE(self, tag, reader, uid):
        ranges = None
        if uid:
            reader.sp()
            ranges = reader.sequence_set()                # RFC 4315 §2.1 UID EXPUNGE
        reader.end()
        view = self.view
        if view.readonly:
            raise NO("Mailbox is read-only", b"READ-ONLY")
        uids = view.uids if ranges is None else [view.uids[s - 1] for s in view.resolve(ranges, True)]
        find = view.lookup(len(uids))
        doomed = [u for u in uids if (info := find(u)) is not None and DELETED in info.flags]
        if not doomed:
            return OK("EXPUNGE completed")

        def expunged(removed):
            view.expunged_here(removed)
            return OK("EXPUNGE completed")
        return selected_call(defer.maybeDeferred(view.folder.expunge, doomed)).addCallback(expunged)

    def do_SEARCH(self, tag, reader, uid):
        reader.sp()
        query = search.parse(reader)
        return self._search(query, uid)

    @defer.inlineCallbacks
    def _search(self, query: search.Query, uid_mode: bool):
        view = self.view
        count = len(view)
        query.bind(count, view.uids[-1] if count else 0)
        find = view.lookup(count)
        folder = view.folder
        prefix = self._cache_prefix()
        hits: list[int] = []
        candidates = []
        for index, uid in enumerate(view.uids):
            info = find(uid)
            if info is not None:
                candidates.append((index + 1, uid, info))
        position = 0
        while position < len(candidates):
            if query.needs == search.META:
                chunk = candidates
            else:
                chunk, octets = [], 0
                for entry in candidates[position:]:
                    chunk.append(entry)
                    octets += entry[2].size
                    if len(chunk) >= CHUNK_MESSAGES or (query.needs == search.TEXT and octets >= CHUNK_OCTETS):
                        break
            position += len(chunk)
            headers = {}
            data = {}
            if query.needs >= search.HEADER:
                missing = []
                for seq, uid, info in chunk:
                    parsed = self.cache.get(prefix + (uid,))
                    if parsed is None:
                        missing.append(uid)
                    else:
                        headers[uid] = parsed.header
                wanted = [uid for _, uid, _ in chunk] if query.needs == search.TEXT else missing
                if wanted:
                    opened = yield self._open_many(folder, wanted)
                    data = {uid: content for uid, content in opened.items() if content is not None}
                    for uid in missing:
                        if uid in data:
                            headers[uid] = self.cache.put(prefix + (uid,), parse_header_of(data[uid])).header
            for seq, uid, info in chunk:
                candidate = search.Candidate(seq, uid, info, uid in view.recent,
                                             headers.get(uid), data.get(uid))
                if query.match(candidate):
                    hits.append(uid if uid_mode else seq)
            if position < len(candidates) and query.needs != search.META:
                yield task.deferLater(self.clock, 0, lambda: None)
            if self.closing or self.view is not view:
                return NO_REPLY
        self._write(b"* SEARCH" + b"".join(b" %d" % hit for hit in hits) + b"\r\n")
        return OK("SEARCH completed")

    def _cache_prefix(self, folder=None) -> tuple:
        """Keys of `folder`'s (default: the selected one's) messages in the shared MessageCache."""
        folder = folder or self.view.folder
        return (self.account.address, folder.name, folder.uidvalidity)

    @staticmethod
    def _open_many(folder, uids):
        """Deferred[dict uid -> bytes or None (gone)]: one batch of reads.

        IFolder.open reads one message per thread-pool job; at ~80 µs of
        reactor time per job that is most of a large FETCH BODY[]. A folder
        that also offers `open_many(uids)` (Deferred[list of bytes or None, in
        order]: one job for the batch) is used that way; otherwise the reads
        run in parallel, one job each."""
        open_many = getattr(folder, "open_many", None)
        if open_many is not None:
            return defer.maybeDeferred(open_many, uids).addCallback(
                lambda contents: dict(zip(uids, contents)))
        reads = [defer.maybeDeferred(folder.open, uid).addErrback(gone) for uid in uids]
        return (defer.gatherResults(reads, consumeErrors=True)
                .addErrback(lambda failure: failure.value.subFailure)
                .addCallback(lambda contents: dict(zip(uids, contents))))

    def do_FETCH(self, tag, reader, uid):
        reader.sp()
        ranges = reader.sequence_set()
        reader.sp()
        items = fetch.parse_items(reader)
        reader.end()
        view = self.view
        seqs = view.resolve(ranges, uid)
        plan = fetch.Plan(items, uid)
        if not seqs:
            return OK("FETCH completed")
        if plan.sets_seen and not view.readonly:
            find = view.lookup(len(seqs))
            unseen = [u for u in (view.uids[s - 1] for s in seqs)
                      if (info := find(u)) is not None and SEEN not in info.flags]
            if unseen:
                # RFC 3501 §6.4.5: BODY[...] sets \Seen; the FETCH then says so.
                def stored(new_flags):
                    view.stored(new_flags)
                    return self._fetch(plan, seqs, set(new_flags))
                return selected_call(defer.maybeDeferred(view.folder.store_flags, unseen, [SEEN], "add")) \
                    .addCallback(stored)
        return self._fetch(plan, seqs, set())

    @defer.inlineCallbacks
    def _fetch(self, plan: fetch.Plan, seqs: list[int], seen_changed: set[int]):
        view = self.view
        folder = view.folder
        find = view.lookup(len(seqs))
        prefix = self._cache_prefix()
        cache = self.cache
        wants_parsed = plan.wants_header or plan.wants_structure
        vanished = False
        position = 0
        while position < len(seqs):
            chunk = []
            octets = 0
            while position < len(seqs) and len(chunk) < CHUNK_MESSAGES and octets < CHUNK_OCTETS:
                seq = seqs[position]
                position += 1
                uid = view.uids[seq - 1]
                info = find(uid)
                if info is None:
                    vanished = True
                    continue
                parsed = cache.get(prefix + (uid,)) if wants_parsed else None
                needs = plan.needs_content(parsed)
                if needs:
                    octets += info.size
                chunk.append((seq, uid, info, parsed, needs))
            opened = {}
            wanted = [entry[1] for entry in chunk if entry[4]]
            if wanted:
                opened = yield self._open_many(folder, wanted)
                if self.closing or self.view is not view:
                    return NO_REPLY
            out = []
            for seq, uid, info, parsed, needs in chunk:
                data = None
                if needs:
                    data = opened.get(uid)
                    if data is None:
                        vanished = True
                        continue
                    if parsed is None and wants_parsed:
                        parsed = cache.put(prefix + (uid,), parse_header_of(data))
                flags = view.flags_of(uid, info)
                if uid in seen_changed:
                    flags = flags | {SEEN}
                out.append(fetch.render(plan, seq, info, flags, parsed, data, uid in seen_changed))
            if out:
                self._write(b"".join(out))
            if position < len(seqs):
                yield self.writable()
                if self.closing or self.view is not view:
                    return NO_REPLY
        if vanished and not plan.uid_mode:
            # RFC 2180 §4.1.2, RFC 5530: some messages were expunged meanwhile.
            # (A UID FETCH names UIDs, which stay valid: the gone ones are just absent.)
            return ("NO", b"EXPUNGEISSUED", "Some messages no longer exist")
        return OK("FETCH completed")

    def do_STORE(self, tag, reader, uid):
        reader.sp()
        ranges = reader.sequence_set()
        reader.sp()
        operation = reader.atom().upper()
        modes = {b"FLAGS": "replace", b"+FLAGS": "add", b"-FLAGS": "remove"}
        silent = operation.endswith(b".SILENT")
        mode = modes.get(operation[:-7] if silent else operation)
        if mode is None:
            raise ParseError("Expected FLAGS, +FLAGS or -FLAGS")
        reader.sp()
        if reader.peek() == 0x28:
            flags = reader.flag_list()
        else:
            flags = [reader.flag()]
            while reader.maybe_sp():
                flags.append(reader.flag())
        reader.end()
        view = self.view
        if view.readonly:
            raise NO("Mailbox is read-only", b"READ-ONLY")
        seqs = view.resolve(ranges, uid)
        find = view.lookup(len(seqs))
        targets = [(seq, view.uids[seq - 1]) for seq in seqs]
        present = [u for _, u in targets if find(u) is not None]
        if not present:
            return OK("STORE completed")
        def stored(new_flags):
            # Junk learning, in the background (never delays this reply).
            self.account.flagged(view.folder, present, flags, mode)
            if view.new_keywords(flags):
                # RFC 3501 §7.2.6: the new keywords before any FETCH that uses them.
                self._write(view.flags_response())
            view.stored(new_flags)
            if not silent:
                out = []
                for seq, target in targets:
                    current = new_flags.get(target)
                    if current is None:
                        continue
                    if target in view.recent:
                        current = current | {"\\Recent"}
                    listed = flag_list(sorted_flags(current))
                    if uid:
                        out.append(b"* %d FETCH (UID %d FLAGS %s)\r\n" % (seq, target, listed))
                    else:
                        out.append(b"* %d FETCH (FLAGS %s)\r\n" % (seq, listed))
                self._write(b"".join(out))
            return OK("STORE completed")
        return (selected_call(defer.maybeDeferred(view.folder.store_flags, present, flags, mode))
                .addErrback(trap(ValueError, STORE_REFUSED)).addCallback(stored))

    def do_COPY(self, tag, reader, uid):
        return self._copy(reader, uid, move=False)

    def do_MOVE(self, tag, reader, uid):
        return self._copy(reader, uid, move=True)       # RFC 6851

    def _copy(self, reader, uid_mode: bool, move: bool):
        reader.sp()
        ranges = reader.sequence_set()
        reader.sp()
        name = self._mailbox(reader)
        reader.end()
        view = self.view
        if move and view.readonly:
            raise NO("Mailbox is read-only", b"READ-ONLY")
        seqs = view.resolve(ranges, uid_mode)
        find = view.lookup(len(seqs))
        infos = [info for info in (find(u) for u in (view.uids[s - 1] for s in seqs)) if info is not None]
        uids = [info.uid for info in infos]
        verb = "MOVE" if move else "COPY"

        def got(target):
            if not uids:
                return OK(f"{verb} completed")
            quota = self._quota()
            # RFC 9208 §4.3: a COPY that would go over stores nothing. A MOVE never changes
            # the usage of our one quota root (a full mailbox can still move mail to Trash),
            # so it is never refused for quota (Dovecot does the same).
            if not move and quota is not None and quota.over(self.user, self._copy_octets(infos), len(infos)):
                raise NO(OVER_QUOTA_TEXT, b"OVERQUOTA")
            return (selected_call(defer.maybeDeferred(view.folder.copy, uids, target))
                    .addErrback(trap(ValueError, STORE_REFUSED)).addCallback(copied, target))

        def copied(pairs, target):
            code = None
            if pairs:
                # Junk learning, in the background (never delays this reply).
                self.account.copied(view.folder.name, target, [t for _, t in pairs])
                code = (b"COPYUID %d " % target.uidvalidity + ordered_uid_set([s for s, _ in pairs])
                        + b" " + ordered_uid_set([t for _, t in pairs]))          # RFC 4315 §3
            if not move:
                return OK("COPY completed", code)
            if code is not None:
                self._write(b"* OK [" + code + b"] Moved\r\n")                    # RFC 6851 §4.3
            return selected_call(defer.maybeDeferred(view.folder.expunge, [s for s, _ in pairs])).addCallback(moved)

        def moved(removed):
            view.expunged_here(removed)
            return OK("MOVE completed")
        return (self.account.folder(name)
                .addErrback(trap(KeyError, NO("No such mailbox", b"TRYCREATE")))
                .addErrback(trap(ValueError, NO("Invalid mailbox name", b"CANNOT")))
                .addCallback(got))
