"""The Sieve stage of local delivery: for each local target, the global
"before" scripts, the user's active script and the global "after" scripts
decide where the copy goes (design.md §5: after the checks and modifiers,
before the store).

    Dispatcher._write -> SieveStage.plans(targets, message, sender)   (in the I/O pool)
                      -> Plan(folders to store into, addresses to redirect to)

Scripts are compiled once and cached by (path, mtime, size, inode), so a
script edited or re-uploaded is picked up by the next delivery and an
unchanged one costs a stat. A script that no longer compiles, and every
run-time error, give the implicit keep (RFC 5228 §2.10.6), logged once per
script version.

imap4flags: the system flags of each copy are stored with it (keywords
are not yet). Vacation replies go out after the commit (`send_vacations`).
Not done yet (docs/sieve.md): reject/ereject are not carried out (the mail
is kept and that is logged).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from twisted.internet import defer
from twisted.logger import Logger

from mailgw.sieve import interpreter
from mailgw.sieve.interpreter import FileInto, Keep, Limits, Redirect, Reject, Vacation
from mailgw.sieve.message import SieveMessage
from mailgw.sieve.scripts import ScriptStore, ScriptStoreError
from mailgw.sieve.vacation import VacationTracker, compose
from mailgw.store.names import folder_dirname

GLOBAL_DIRECTORY = ".global"        # under <data_dir>/sieve: a domain directory never starts with "."
BEFORE = "before.sieve"
AFTER = "after.sieve"
_CACHE_SIZE = 4096


@dataclass
class Plan:
    folders: list = field(default_factory=list)      # folder names; None is INBOX
    flags: dict = field(default_factory=dict)        # folder -> imap4flags flags of that copy
    redirects: list = field(default_factory=list)    # addresses
    notes: list = field(default_factory=list)        # what the log line should say
    vacations: list = field(default_factory=list)    # interpreter.Vacation, sent after the commit


class SieveStage:
    log = Logger()

    def __init__(self, store: ScriptStore, root: Path, *, limits: Limits = Limits(), delimiter: str = "+",
                 run_in_thread=None):
        self.store = store
        # run_in_thread(f, *args) -> Deferred: the I/O pool in the server (script
        # stats, reads, compiles and runs, vacation records); None runs inline (tests).
        self.run_in_thread = run_in_thread or defer.maybeDeferred
        self.root = Path(root)
        self.limits = limits
        self.delimiter = delimiter
        self._cache: dict[Path, tuple[tuple, interpreter.Script | None]] = {}
        self.vacations = VacationTracker(self.root)

    def _compiled(self, path: Path | None) -> interpreter.Script | None:
        if path is None:
            return None
        try:
            key = ScriptStore.stat_key(path)
        except OSError:
            return None
        known = self._cache.get(path)
        if known is not None and known[0] == key:
            return known[1]
        try:
            script = interpreter.compile_script(path.read_bytes(), name=path.name)
        except (OSError, ValueError) as error:
            # Uploads are checked, so this is a script changed behind our back:
            # ignored (keep), and said once per version of the file.
            self.log.warn("sieve: {path} is not usable, ignored: {error}", path=str(path), error=str(error))
            script = None
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.clear()
        self._cache[path] = (key, script)
        return script

    def scripts_for(self, mailbox: str) -> list[interpreter.Script]:
        global_dir = self.root / GLOBAL_DIRECTORY
        try:
            personal = self.store.active_path(mailbox)
        except (ValueError, OSError, ScriptStoreError):
            personal = None
        found = [self._compiled(global_dir / BEFORE), self._compiled(personal), self._compiled(global_dir / AFTER)]
        return [script for script in found if script is not None]

    def plans(self, targets, message: bytes, sender: str):
        """Fires with {key: Plan or None} for `targets`, (key, mailbox, folder,
        the addresses it was sent to) each, worked out in the thread pool:
        finding and reading scripts is file I/O and running them is CPU work,
        neither belongs on the reactor. The message is parsed once, and only
        when some target has a script."""
        return self.run_in_thread(self._plans_now, list(targets), message, sender)

    def _plans_now(self, targets, message: bytes, sender: str) -> dict:
        parsed = []

        def parse():
            if not parsed:
                parsed.append(SieveMessage.from_bytes(message))
            return parsed[0]
        return {key: self.plan(mailbox, folder, parse, sender, user_addresses=addresses)
                for key, mailbox, folder, addresses in targets}

    def plan(self, mailbox: str, folder: str | None, message, sender: str,
             original_recipient: str | None = None, user_addresses=()) -> Plan | None:
        """Where `mailbox`'s copy goes; None when no script applies (the
        caller stores as before). `message`: the bytes, or a callable giving
        the parsed SieveMessage. Blocking (see `plans`); never raises for a
        script's sake."""
        scripts = self.scripts_for(mailbox)
        if not scripts:
            return None
        envelope = interpreter.Envelope(sender=sender, recipient=mailbox, original_recipient=original_recipient,
                                        delimiter=self.delimiter,
                                        user_addresses=frozenset(a.lower() for a in (mailbox, *user_addresses)))
        try:
            parsed = message() if callable(message) else SieveMessage.from_bytes(message)
            outcome = interpreter.run(scripts, parsed, envelope, limits=self.limits)
        except Exception:
            # RFC 5228 §2.10.6: whatever happens, the mail is not lost.
            self.log.failure("sieve: run failed for {mailbox}, kept", mailbox=mailbox)
            return Plan(folders=[folder], notes=["sieve failed, kept"])
        plan = Plan()
        if outcome.failed is not None:
            self.log.warn("sieve: script error for {mailbox}, kept: {why}", mailbox=mailbox, why=outcome.failed)
            plan.notes.append("sieve error, kept")
        for action in outcome.actions:
            if isinstance(action, Keep):
                plan.folders.append(folder)
                plan.flags[folder] = action.flags
            elif isinstance(action, FileInto):
                try:
                    canonical, _ = folder_dirname(action.mailbox)
                except ValueError:
                    # RFC 5228 §4.1: a mailbox that cannot be filed into gives the keep.
                    plan.notes.append(f"sieve fileinto {action.mailbox!r} refused, kept")
                    plan.folders.append(folder)
                    continue
                target = None if canonical == "INBOX" else canonical
                plan.folders.append(target)
                plan.flags[target] = action.flags
            elif isinstance(action, Redirect):
                plan.redirects.append(action.address)
            elif isinstance(action, Reject):
                # Not carried out yet: keeping is the safe side (nothing lost).
                plan.folders.append(folder)
                plan.notes.append("sieve reject not supported yet, kept")
            elif isinstance(action, Vacation):
                plan.vacations.append((action, parsed))
        plan.folders = list(dict.fromkeys(plan.folders))
        if not plan.folders and not plan.redirects:
            plan.notes.append("discarded by sieve")
        return plan

    def send_vacations(self, mailbox: str, plan: Plan, submit, *, hostname: str, now: float) -> None:
        """After the commit: each vacation reply not already sent to this
        sender within its period goes to `submit(sender, recipients, message,
        origin=...)` (routing.submit.LocalSubmission) with the null sender
        (RFC 3834 §3.3: so that nothing answers the answer). Best effort:
        the original is delivered whatever happens here."""
        for action, parsed in plan.vacations:
            # The record is a small fsynced file: written in the thread pool.
            d = self.run_in_thread(self._claim_and_compose, mailbox, action, parsed, hostname, now)
            d.addCallback(self._submit_vacation, mailbox, action, submit)
            d.addErrback(lambda failure: self.log.failure("sieve: vacation reply for {mailbox} failed", failure,
                                                          mailbox=mailbox))

    def _claim_and_compose(self, mailbox: str, action, parsed, hostname: str, now: float) -> bytes | None:
        if not self.vacations.claim(mailbox, action.handle, action.reply_to, action.seconds, now):
            return None
        return compose(action, mailbox, parsed, hostname=hostname, now=now)

    def _submit_vacation(self, reply: bytes | None, mailbox: str, action, submit):
        if reply is None:
            self.log.info("sieve: vacation to <{to}> for {mailbox} not sent: replied within the period",
                          to=action.reply_to, mailbox=mailbox)
            return None
        d = submit("", [action.reply_to], reply, origin={"login": f"sieve vacation of {mailbox}"})
        return d.addCallback(lambda queue_id: self.log.info(
            "sieve: vacation reply to <{to}> for {mailbox} queued as {queue_id}",
            to=action.reply_to, mailbox=mailbox, queue_id=queue_id))
