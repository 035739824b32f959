"""Per-mailbox storage quotas (RFC 9208 resources STORAGE and MESSAGE).

A mailbox is one address with all its folders; its limits are `[quota]
default_bytes / default_messages`, or the address's line in the quotas file.
0 means no limit. Format of both files: docs/store-format.md §10.

Usage: the Maildir++ `maildirsize` file (Courier's README.maildirquota, as
Dovecot's maildir quota backend keeps it) at the root of the user's Maildir,
mail_dir/<domain>/<local>/maildirsize:

    1073741824S,10000C          the limits it was computed for ("<bytes>S,<messages>C")
    18223301 1523               then "<octets> <messages>" lines: a total, and deltas
    4211 1                      (negative for removals), each appended with O_APPEND
    -4211 -1                    in one write(2), so concurrent writers never mix

Whoever stores or removes a message appends its delta (`record`): local
delivery (MaildirStore, in the main process and in the SMTP workers), IMAP
APPEND/COPY/MOVE, and every expunge (IMAP, POP3, MOVE's source, folder
delete). Nobody scans the Maildir per message. A check is one stat(); only
when the file grew are the new whole lines read (from the offset we had).

The file is recalculated, by listing every folder's cur/ and new/ (sizes from
the S= field of the file names, else a stat) under an flock of
`mailgw-quota.lock` and replaced atomically, when it is missing or unreadable
(at once: there is no other answer), and in the background (in the thread
pool, when there is one; the current sums answer meanwhile) when it is larger
than 5120 octets, its first line is not the current limit, its sums are
negative, or it says "over quota" and has not changed for 15 minutes
(Maildir++'s rules). The totals are Maildir++'s: approximate by design. A
change racing a recalculation may be counted twice or not at all until the
next one.
"""
from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from mailgw.auth.userdb import locked_users_file, replace_file, validate_address
from mailgw.config_types import QuotaConfig
from mailgw.store.maildir import split_mailbox_address
from mailgw.store.maildir_name import size_from_name
from mailgw.store.names import decode_dirname
from mailgw.watched import WatchedTable, parsed_lines

MAILDIRSIZE = "maildirsize"
# flock'ed as "mailgw-quota.lock" (userdb.locked_users_file adds ".lock"): not
# Dovecot's "maildirsize.lock", a dotlock whose mere existence means "locked".
LOCK_BASE = "mailgw-quota"
MAX_MAILDIRSIZE = 5120          # Maildir++: a larger maildirsize is recalculated
STALE_SECONDS = 15 * 60         # Maildir++: "over quota" older than this is recalculated
MAX_READ = 1024 * 1024          # a maildirsize this large is damage, not deltas: recalculate, don't read
SCAN_ATTEMPTS = 3               # listings while directories keep changing under us
RETRY_SECONDS = 60.0            # after a failed recalculation (permissions?), the old answer stands this long
MAX_VALUE = 2**63 - 1           # RFC 9208 §4.1.3: number64
UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_MAX_CACHED = 10_000            # addresses whose maildirsize state is kept

_SIZE = re.compile(r"([0-9]{1,20})([KMGT]?)", re.IGNORECASE)
_COUNT = re.compile(r"[0-9]{1,20}")
_DELTA = re.compile(rb"-?[0-9]{1,20}")

URGENT, LATER = "urgent", "later"


class IQuota(Interface):
    """Storage limits of mailboxes (all folders of one address together) and
    what they hold. Synchronous and cheap (a stat, a few lines read), safe
    from any thread."""

    def limits(address):
        """(bytes_limit, messages_limit) of the mailbox; 0 means no limit."""

    def usage(address):
        """(octets, messages) stored: files in every folder's cur/ and new/,
        octets as on disk (the S= of the file names)."""

    def over(address, incoming_octets=0, incoming_messages=0):
        """True when the mailbox is at or over a limit, or `incoming_*` more
        would take it over one. Without limits: False, and no I/O."""

    def record(address, octets_delta, messages_delta):
        """Note a change the caller has made (after it is durable): negative
        for removals. One appended line; I/O errors are logged, never raised."""

    def status(address):
        """dict: address, bytes, bytes_limit, messages, messages_limit,
        bytes_from and messages_from ("default" or "override"), over."""


class IQuotaOverrides(Interface):
    path = Attribute("the quotas file")

    def overrides():
        """{address: Override}, reloaded when the file changed."""


# -- the quotas file ------------------------------------------------------------------------

@dataclass(frozen=True)
class Override:
    """One line of the quotas file: None keeps the [quota] default."""
    bytes: int | None = None
    messages: int | None = None
    line: int = 0


def parse_size(text: str) -> int:
    """"1G" -> 1073741824: digits and an optional K, M, G or T (powers of 1024)."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"not a size: {text!r} (digits, optionally followed by K, M, G or T)")
    value = int(m[1]) * UNITS[m[2].upper()]
    if value > MAX_VALUE:
        raise ValueError(f"size too large: {text!r}")
    return value


def parse_count(text: str) -> int:
    if not _COUNT.fullmatch(text.strip()) or int(text) > MAX_VALUE:
        raise ValueError(f"not a number of messages: {text!r}")
    return int(text)


def format_size(value: int) -> str:
    """The shortest exact form parse_size reads back: 1073741824 -> "1G"."""
    for unit in ("T", "G", "M", "K"):
        if value and value % UNITS[unit] == 0:
            return f"{value // UNITS[unit]}{unit}"
    return str(value)


def human_size(value: int) -> str:
    """1572864 -> "1.5 MiB" (for people; not exact)."""
    if value < 1024:
        return f"{value} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def parse_line(text: str, number: int = 0) -> tuple[str, Override] | None:
    """One line -> (address, Override); None for blank and comment lines;
    ValueError says what is wrong."""
    text = text.split("#", 1)[0].strip()
    if not text:
        return None
    words = text.split()
    address = validate_address(words[0])
    if len(words) == 1:
        raise ValueError(f"{address}: expected bytes=SIZE and/or messages=N")
    values: dict[str, int] = {}
    for word in words[1:]:
        key, equals, value = word.partition("=")
        key = key.lower()
        if not equals or key not in ("bytes", "messages"):
            raise ValueError(f"{address}: unknown setting {word!r} (bytes=SIZE, messages=N)")
        if key in values:
            raise ValueError(f"{address}: {key}= given twice")
        values[key] = parse_size(value) if key == "bytes" else parse_count(value)
    return address, Override(values.get("bytes"), values.get("messages"), number)


def parse_quotas(data: bytes) -> tuple[dict[str, Override], list[tuple[int, str]]]:
    """The quotas file's bytes -> ({address: Override}, [(line, problem)]).
    A bad line is skipped; the rest loads. A repeated address keeps its first line."""
    overrides: dict[str, Override] = {}
    problems: list[tuple[int, str]] = []
    for number, (address, override) in parsed_lines(data, parse_line, problems):
        if address in overrides:
            problems.append((number, f"{address} already on line {overrides[address].line}; this line is ignored"))
            continue
        overrides[address] = override
    return overrides, problems


def format_line(address: str, override: Override) -> str:
    fields = []
    if override.bytes is not None:
        fields.append(f"bytes={format_size(override.bytes)}")
    if override.messages is not None:
        fields.append(f"messages={override.messages}")
    return f"{address:<32} {' '.join(fields)}"


def format_quotas(overrides: dict[str, Override]) -> bytes:
    lines = ["# mailgw quotas: address bytes=SIZE messages=N (K M G T = powers of 1024; 0 = no limit).",
             "# Written by `mailgw quota set`; edits by hand are fine, comments are not kept."]
    lines += [format_line(address, overrides[address]) for address in sorted(overrides)
              if overrides[address].bytes is not None or overrides[address].messages is not None]
    return ("\n".join(lines) + "\n").encode("utf-8")


def read_quotas(path: Path) -> tuple[dict[str, Override], list[tuple[int, str]]]:
    """`parse_quotas` of the file; a missing file has no overrides."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return {}, []
    return parse_quotas(data)




class _WallClock:
    def seconds(self) -> float:
        return time.time()


@implementer(IQuotaOverrides)
class QuotasFile(WatchedTable):
    """The quotas file in memory, reloaded when it changed: at most one
    stat() per check_interval (`clock`: IReactorTime)."""

    log = Logger()

    what = "quotas file"

    def overrides(self) -> dict[str, Override]:
        return self.current()

    def parse(self, data: bytes):
        return parse_quotas(data)

    def empty(self) -> dict[str, Override]:
        return {}


# -- maildirsize ----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Sums:
    """What we know of one maildirsize (immutable: replaced, never changed)."""
    ino: int
    size: int           # st_size when we looked
    mtime_ns: int       # st_mtime_ns when we looked
    offset: int         # octets parsed: whole lines only
    definition: str | None
    bytes: int
    messages: int
    bad: bool           # a line that is not "<octets> <messages>": recalculate


def format_definition(bytes_limit: int, messages_limit: int) -> str:
    return f"{bytes_limit}S,{messages_limit}C"


def folder_usage(folder_dir) -> tuple[int, int]:
    """(octets, messages) of one Maildir folder's cur/ and new/."""
    octets = messages = 0
    for sub in ("cur", "new"):
        try:
            entries = os.scandir(os.path.join(folder_dir, sub))
        except FileNotFoundError:
            continue
        with entries:
            for entry in entries:
                # Maildir: names starting with "." are not messages.
                if entry.name[0] == "." or entry.is_dir(follow_symlinks=False):
                    continue
                size = size_from_name(entry.name)
                if size is None:
                    try:
                        size = entry.stat(follow_symlinks=False).st_size
                    except FileNotFoundError:
                        continue
                octets += size
                messages += 1
    return octets, messages


def _folders(user_dir: Path) -> list[str]:
    """The user's Maildir and the folder directories the store shows (others
    are invisible to the user, who could not empty them)."""
    folders = [str(user_dir)]
    with os.scandir(user_dir) as entries:
        for entry in entries:
            if entry.name[0] == "." and entry.is_dir(follow_symlinks=False) and decode_dirname(entry.name):
                folders.append(entry.path)
    return folders


def _signature(user_dir: Path, folders: list[str]) -> tuple:
    stamps = [os.stat(user_dir).st_mtime_ns]
    for folder in folders:
        for sub in ("cur", "new"):
            try:
                stamps.append(os.stat(os.path.join(folder, sub)).st_mtime_ns)
            except FileNotFoundError:
                stamps.append(None)
    return tuple(stamps)


def mailbox_usage(user_dir: Path) -> tuple[int, int]:
    """(octets, messages) of every folder: the recalculation's listing. Listed
    again (up to SCAN_ATTEMPTS times) while a directory changes under us."""
    for _ in range(SCAN_ATTEMPTS):
        folders = _folders(user_dir)
        before = _signature(user_dir, folders)
        octets = messages = 0
        for folder in folders:
            folder_octets, folder_messages = folder_usage(folder)
            octets += folder_octets
            messages += folder_messages
        if _signature(user_dir, folders) == before:
            break
    return octets, messages


def _parse(data: bytes, base: _Sums | None) -> tuple[str | None, int, int, int, bool]:
    """(definition, octets, messages, octets parsed, bad) of `data`: the
    whole file (base None) or the tail after base.offset. Only whole lines
    count: a line still being written is read next time."""
    end = data.rfind(b"\n") + 1
    if base is None:
        first = data.find(b"\n")
        if first < 0:
            return None, 0, 0, 0, True
        definition = data[:first].decode("ascii", "replace").strip()
        body, octets, messages, bad = data[first + 1:end], 0, 0, False
    else:
        definition, body = base.definition, data[:end]
        octets, messages, bad = base.bytes, base.messages, base.bad
    for line in body.split(b"\n"):
        fields = line.split()
        if not fields:
            continue        # Courier pads lines with spaces; an empty one is harmless
        if len(fields) != 2 or not all(_DELTA.fullmatch(f) for f in fields):
            bad = True
            continue
        octets += int(fields[0])
        messages += int(fields[1])
    return definition, octets, messages, (base.offset if base else 0) + end, bad


def read_maildirsize(path, known: _Sums | None = None) -> _Sums | None:
    """The sums of `path` (None if missing): `known` itself when the file is
    unchanged (one stat), else known plus the lines appended since."""
    st = os.stat(path)
    if known is not None and (known.ino, known.size, known.mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns):
        return known
    with open(path, "rb") as f:
        fst = os.fstat(f.fileno())
        if fst.st_size > MAX_READ:
            return _Sums(fst.st_ino, fst.st_size, fst.st_mtime_ns, 0, None, 0, 0, True)
        base = known if known is not None and known.ino == fst.st_ino and fst.st_size >= known.offset else None
        if base is not None:
            f.seek(base.offset)
        data = f.read()
    definition, octets, messages, offset, bad = _parse(data, base)
    return _Sums(fst.st_ino, fst.st_size, fst.st_mtime_ns, offset, definition, octets, messages, bad)


# -- the quota ---------------------------------------------------------------------------------

@implementer(IQuota)
class Quota:
    """Limits from `config` (QuotaConfig) and its quotas file, usage from each
    user's maildirsize below `mail_dir` (the MaildirStore's directory).

    `clock` (IReactorTime; default: the wall clock) paces the reloads of the
    quotas file (one stat per `check_interval` seconds) and dates maildirsize
    files. With `threadpool` (and `clock` the reactor, which deferToThreadPool
    needs), recalculations that can wait run there; without one (the CLI,
    tests) every recalculation runs at once."""

    log = Logger()

    def __init__(self, mail_dir: Path, config: QuotaConfig, *, clock=None, threadpool=None,
                 check_interval: float = 1.0, overrides: IQuotaOverrides | None = None):
        self._mail_dir = Path(mail_dir)
        self._config = config
        self._clock = clock if clock is not None else _WallClock()
        self._pool = threadpool
        self._overrides = overrides if overrides is not None else QuotasFile(
            config.quotas_file, clock=self._clock, check_interval=check_interval)
        self._sums: dict[str, _Sums] = {}
        self._pending: set[str] = set()          # background recalculations under way
        self._pending_lock = threading.Lock()
        self._failed: dict[str, float] = {}      # address -> when its recalculation last failed
        self._last_error: str | None = None

    def reconfigure(self, config: QuotaConfig, *, check_interval: float = 1.0) -> None:
        """A reload (mailgw/reload.py): new default limits, maybe another overrides file."""
        if config.quotas_file != self._config.quotas_file and isinstance(self._overrides, QuotasFile):
            self._overrides = QuotasFile(config.quotas_file, clock=self._clock, check_interval=check_interval)
        self._config = config

    # -- IQuota ------------------------------------------------------------------

    def limits(self, address):
        override = self._overrides.overrides().get(address)
        bytes_limit = self._config.default_bytes
        messages_limit = self._config.default_messages
        if override is not None:
            if override.bytes is not None:
                bytes_limit = override.bytes
            if override.messages is not None:
                messages_limit = override.messages
        return bytes_limit, messages_limit

    def usage(self, address):
        sums = self._current(address, self.limits(address))
        if sums is None:
            return 0, 0
        # Negative after drift (removals counted twice): a recalculation is on its way.
        return max(sums.bytes, 0), max(sums.messages, 0)

    def over(self, address, incoming_octets=0, incoming_messages=0):
        bytes_limit, messages_limit = self.limits(address)
        if not bytes_limit and not messages_limit:
            return False
        used_bytes, used_messages = self.usage(address)
        return _over(used_bytes, used_messages, bytes_limit, messages_limit, incoming_octets, incoming_messages)

    def record(self, address, octets_delta, messages_delta):
        octets_delta, messages_delta = int(octets_delta), int(messages_delta)
        if not octets_delta and not messages_delta:
            return
        try:
            path = self._user_dir(address) / MAILDIRSIZE
        except ValueError:
            self.log.error("quota: not recording for unsafe address {address!r}", address=address)
            return
        try:
            # No O_CREAT (Maildir++): without the file there is nothing to
            # update, and the next check lists the Maildir anyway.
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        except OSError as error:
            self._error(f"cannot open {path}", error)
            return
        try:
            # One write(2) of a short line with O_APPEND: other processes'
            # lines never interleave with it, none is lost.
            os.write(fd, b"%d %d\n" % (octets_delta, messages_delta))
        except OSError as error:
            self._error(f"cannot append to {path}", error)
        finally:
            os.close(fd)

    def status(self, address):
        override = self._overrides.overrides().get(address)
        bytes_limit, messages_limit = self.limits(address)
        used_bytes, used_messages = self.usage(address)
        return {
            "address": address,
            "bytes": used_bytes,
            "bytes_limit": bytes_limit,
            "bytes_from": "override" if override is not None and override.bytes is not None else "default",
            "messages": used_messages,
            "messages_limit": messages_limit,
            "messages_from": "override" if override is not None and override.messages is not None else "default",
            "over": _over(used_bytes, used_messages, bytes_limit, messages_limit, 0, 0),
        }

    def totals(self, addresses) -> tuple[int, int, int]:
        """(octets, messages, mailboxes) of these users' mailboxes together,
        for metrics: `usage` of each (a stat and the new lines of its
        maildirsize; a listing the first time). Blocking: call it in a thread."""
        octets = messages = mailboxes = 0
        for address in addresses:
            try:
                if not self._user_dir(address).is_dir():
                    continue
                used_octets, used_messages = self.usage(address)
            except (ValueError, OSError):
                continue
            octets += used_octets
            messages += used_messages
            mailboxes += 1
        return octets, messages, mailboxes

    # -- internals ---------------------------------------------------------------------

    def _user_dir(self, address: str) -> Path:
        local, domain = split_mailbox_address(address)
        return self._mail_dir / domain / local

    def _error(self, text: str, error: OSError) -> None:
        message = f"{text}: {type(error).__name__}: {error.strerror}"
        if message != self._last_error:       # each distinct error once in a row
            self.log.error("quota: {message}", message=message)
            self._last_error = message

    def _current(self, address: str, limits) -> _Sums | None:
        """The sums of `address` (None: no mailbox yet, nothing stored),
        recalculated first if they cannot be used."""
        user_dir = self._user_dir(address)
        path = user_dir / MAILDIRSIZE
        definition = format_definition(*limits)
        known = self._sums.get(address)
        try:
            sums = read_maildirsize(path, known)
        except FileNotFoundError:
            sums = None
        except OSError as error:
            self._error(f"cannot read {path}", error)
            return known
        need = self._need(sums, definition, limits)
        failed = self._failed.get(address)
        if need is not None and failed is not None and self._clock.seconds() - failed < RETRY_SECONDS:
            return sums if sums is not None and need == LATER else known     # not a listing per check
        if need == URGENT:
            if not user_dir.is_dir():
                return None
            try:
                sums = self._recalculate(address, user_dir, definition, limits)
            except OSError as error:
                self._recalculation_failed(address, path, error)
                return known
        elif need == LATER:
            sums = self._recalculate_later(address, user_dir, definition, limits) or sums
        self._remember(address, sums)
        return sums

    def _need(self, sums: _Sums | None, definition: str, limits) -> str | None:
        """Whether `sums` must be recalculated: URGENT (there is no usable
        answer), LATER (the answer stands meanwhile) or not (None)."""
        if sums is None or sums.bad or sums.definition is None:
            return URGENT
        if sums.definition != definition or sums.size > MAX_MAILDIRSIZE or sums.bytes < 0 or sums.messages < 0:
            return LATER
        if _over(sums.bytes, sums.messages, *limits, 0, 0) \
                and self._clock.seconds() - sums.mtime_ns / 1e9 > STALE_SECONDS:
            return LATER      # over for a long time: perhaps someone deleted mail without telling us
        return None

    def _recalculate(self, address: str, user_dir: Path, definition: str, limits) -> _Sums:
        path = user_dir / MAILDIRSIZE
        with locked_users_file(user_dir / LOCK_BASE):
            # Another thread or process may have done it while we waited.
            try:
                current = read_maildirsize(path)
            except FileNotFoundError:
                current = None
            if current is not None and self._need(current, definition, limits) is None:
                return current
            octets, messages = mailbox_usage(user_dir)
            data = f"{definition}\n{octets} {messages}\n".encode("ascii")
            replace_file(path, data)
            st = os.stat(path)
        self.log.info("quota: recalculated {path}: {octets} octets, {messages} messages",
                      path=str(path), octets=octets, messages=messages)
        # Lines appended since the rename are beyond `offset`: read next time.
        return _Sums(st.st_ino, len(data), st.st_mtime_ns, len(data), definition, octets, messages, False)

    def _recalculate_later(self, address, user_dir, definition, limits) -> _Sums | None:
        """Recalculate in the pool (None now), or at once without one (the new sums)."""
        if self._pool is None:
            try:
                return self._recalculate(address, user_dir, definition, limits)
            except OSError as error:
                self._recalculation_failed(address, user_dir / MAILDIRSIZE, error)
                return None
        with self._pending_lock:
            if address in self._pending:
                return None
            self._pending.add(address)

        def job():
            try:
                return self._recalculate(address, user_dir, definition, limits)
            finally:
                with self._pending_lock:
                    self._pending.discard(address)

        def failed(failure):
            if failure.check(OSError):
                self._recalculation_failed(address, user_dir / MAILDIRSIZE, failure.value)
            else:
                self.log.failure("quota: recalculating {path} failed", failure, path=str(user_dir / MAILDIRSIZE))

        d = deferToThreadPool(self._clock, self._pool, job)
        d.addCallbacks(lambda sums: self._remember(address, sums), failed)
        return None

    def _recalculation_failed(self, address: str, path: Path, error: OSError) -> None:
        self._error(f"cannot recalculate {path}", error)
        if len(self._failed) >= _MAX_CACHED:
            self._failed.clear()
        self._failed[address] = self._clock.seconds()

    def _remember(self, address: str, sums: _Sums | None) -> None:
        self._failed.pop(address, None)
        if sums is None:
            self._sums.pop(address, None)
            return
        if len(self._sums) >= _MAX_CACHED and address not in self._sums:
            self._sums.clear()
        self._sums[address] = sums


def _over(used_bytes, used_messages, bytes_limit, messages_limit, incoming_octets, incoming_messages) -> bool:
    if bytes_limit and (used_bytes >= bytes_limit or used_bytes + incoming_octets > bytes_limit):
        return True
    if messages_limit and (used_messages >= messages_limit or used_messages + incoming_messages > messages_limit):
        return True
    return False
