"""The relay queue's durable storage (format: docs/spool-format.md).

    queue_dir/incoming/   files being written; never trusted, emptied by recover()
    queue_dir/active/     <id>.msg (message, CRLF wire form) + <id>.env (JSON envelope)
    queue_dir/corrupt/    entries recover() could not read, moved aside, never dropped
    (deferred/ and hold/ belong to the queue runner, issue 3)

Commit protocol (one DurableWriter.commit): <id>.msg is written and fsynced in
incoming/ and linked into active/, then <id>.env the same way, then active/ is
fsynced; only then does enqueue()'s Deferred fire and the client get 250.
The presence of <id>.env in active/ is the commit point: a .msg alone is a
leftover of a transaction that was never acknowledged.

Storing only: when to send is the runner's business (design §3.4).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import threading
from pathlib import Path

from twisted.internet.defer import Deferred, fail
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw.durable import DurableWriter, fsync_directory
from mailgw.interfaces import ISpool
from mailgw.iopool import ReactorInbox

ENVELOPE_VERSION = 1
MSG_SUFFIX = ".msg"
ENV_SUFFIX = ".env"

# Crockford base32 (https://www.crockford.com/base32.html): no I L O U, so
# never "/" or "." either; fixed width, so string order is numeric order.
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
QUEUE_ID_LENGTH = 16  # 80 bits = 48-bit ms timestamp + 32 random bits
_QUEUE_ID = re.compile(r"[0-9A-HJKMNP-TV-Z]{16}")
_TIMESTAMP_MASK = (1 << 48) - 1
_RANDOM_BITS = 32

_id_lock = threading.Lock()
_last_id_value = 0


def new_queue_id(now: float) -> str:
    """16 Crockford base32 characters: 48-bit millisecond timestamp, then 32
    random bits (`secrets`). Sorts by time. Within one millisecond of one
    process the value is incremented instead of drawn again (as ULID's
    monotonic mode does), so ids of a process never collide and keep their
    order; across processes/restarts 32 random bits make a clash unlikely, and
    the writer's O_EXCL/link would refuse it rather than overwrite."""
    global _last_id_value
    milliseconds = int(now * 1000) & _TIMESTAMP_MASK
    with _id_lock:
        if _last_id_value >> _RANDOM_BITS == milliseconds:
            value = _last_id_value + 1
        else:
            value = (milliseconds << _RANDOM_BITS) | secrets.randbits(_RANDOM_BITS)
        _last_id_value = value
    digits = []
    for _ in range(QUEUE_ID_LENGTH):
        digits.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(digits))


def is_queue_id(text) -> bool:
    return isinstance(text, str) and _QUEUE_ID.fullmatch(text) is not None


class EnvelopeError(ValueError):
    """An envelope that does not follow docs/spool-format.md version 1."""


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional_str(value) -> bool:
    return value is None or isinstance(value, str)


_ENVELOPE_FIELDS = {
    "version": lambda v: v == ENVELOPE_VERSION,
    "id": is_queue_id,
    "arrival": _is_number,
    "sender": lambda v: isinstance(v, str),
    "sender_utf8": lambda v: isinstance(v, bool),
    "body": lambda v: v in ("7BIT", "8BITMIME"),
    "size": lambda v: _is_int(v) and v >= 0,
    "envid": _optional_str,
    "ret": lambda v: v in ("FULL", "HDRS", None),
    "client": lambda v: isinstance(v, dict),
    "recipients": lambda v: isinstance(v, list) and len(v) > 0,
    "attempts": lambda v: _is_int(v) and v >= 0,
    "next_attempt": _is_number,
    "history": lambda v: isinstance(v, list),
}
_CLIENT_FIELDS = {
    "ip": lambda v: isinstance(v, str),
    "helo": _optional_str,
    "tls": lambda v: isinstance(v, bool),
    "auth": _optional_str,
    "listener": lambda v: isinstance(v, str),
}
_RECIPIENT_FIELDS = {
    "address": lambda v: isinstance(v, str),
    "orcpt": _optional_str,
    "notify": lambda v: v is None or (isinstance(v, list) and all(isinstance(n, str) for n in v)),
    "state": lambda v: isinstance(v, str),
    "attempts": lambda v: _is_int(v) and v >= 0,
    "last_reply": lambda v: True,  # the runner's business (issue 3)
}


def _check_fields(mapping, fields, where: str) -> None:
    if not isinstance(mapping, dict):
        raise EnvelopeError(f"{where}: not an object")
    for key, valid in fields.items():
        if key not in mapping:
            raise EnvelopeError(f"{where}: missing {key!r}")
        if not valid(mapping[key]):
            raise EnvelopeError(f"{where}: bad {key!r}: {mapping[key]!r}")


def check_envelope(envelope) -> None:
    """EnvelopeError unless `envelope` is a valid version-1 envelope. Unknown
    extra keys are allowed (readers ignore them); see the versioning policy."""
    if not isinstance(envelope, dict):
        raise EnvelopeError("envelope: not an object")
    if envelope.get("version") != ENVELOPE_VERSION:
        raise EnvelopeError(f"unknown envelope version {envelope.get('version')!r}")
    _check_fields(envelope, _ENVELOPE_FIELDS, "envelope")
    _check_fields(envelope["client"], _CLIENT_FIELDS, "client")
    for index, recipient in enumerate(envelope["recipients"]):
        _check_fields(recipient, _RECIPIENT_FIELDS, f"recipient {index}")


def encode_envelope(envelope: dict) -> bytes:
    # allow_nan=False: NaN/Infinity are not JSON (RFC 8259 §6). One line, no
    # indent: with indent json.dumps falls back to its pure-Python encoder
    # (3x slower; `mailgw queue show` is the readable view).
    return json.dumps(envelope, ensure_ascii=False, allow_nan=False).encode("utf-8") + b"\n"


def decode_envelope(data: bytes, queue_id: str) -> dict:
    try:
        envelope = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise EnvelopeError(f"not UTF-8 JSON: {e}") from None
    check_envelope(envelope)
    if envelope["id"] != queue_id:
        raise EnvelopeError(f"id {envelope['id']!r} does not match the file name")
    return envelope


class _EntryWrites:
    """The envelope writes of one entry: one in flight, and the newest later
    request waiting. A waiting update is replaced by a newer one (the newer
    envelope carries every change, the runner builds it from its own copy)
    and by a discard; a discard is never replaced. Every caller's Deferred
    fires once the write that carries its request has landed."""

    __slots__ = ("waiting", "waiting_deferreds")

    def __init__(self):
        self.waiting: tuple[str, bytes | None] | None = None
        self.waiting_deferreds: list[tuple[Deferred, str]] = []


_UPDATE, _DISCARD = "update", "discard"


@implementer(ISpool)
class Spool:
    log = Logger()

    def __init__(self, queue_dir: Path, *, writer: DurableWriter, reactor):
        self._queue_dir = Path(queue_dir)
        self.incoming = self._queue_dir / "incoming"
        self.active = self._queue_dir / "active"
        self.corrupt = self._queue_dir / "corrupt"
        self._writer = writer
        self._reactor = reactor
        self._listeners = []
        # Per queue id: the writes of an entry with one in flight (issue 23:
        # a control command's update raced the runner's and both wrote the
        # same file; the later one to land must be the later one asked for).
        self._writes: dict[str, _EntryWrites] = {}
        # Start-up, before the reactor runs.
        self._make_layout()

    def new_id(self) -> str:
        return new_queue_id(self._reactor.seconds())

    def enqueue(self, queue_id: str, envelope: dict, message: bytes) -> Deferred:
        """Durably store message + envelope; fires with queue_id after the
        commit, fails with ValueError for an invalid id or envelope (nothing
        written) or StorageFull/StorageFailed."""
        try:
            if not is_queue_id(queue_id):
                raise ValueError(f"not a queue id: {queue_id!r}")
            check_envelope(envelope)
            if envelope["id"] != queue_id:
                raise EnvelopeError("envelope id differs from queue_id")
            if envelope["size"] != len(message):
                raise EnvelopeError("envelope size differs from the message length")
            encoded = encode_envelope(envelope)
        except (ValueError, TypeError):
            return fail()
        # Order matters: .msg durable and in active/ before .env appears there.
        d = self._writer.commit(
            [
                (self.active, self.incoming, queue_id + MSG_SUFFIX, message),
                (self.active, self.incoming, queue_id + ENV_SUFFIX, encoded),
            ]
        )
        return d.addCallback(self._committed, envelope)

    def add_listener(self, listener) -> None:
        """`listener(envelope)` is called on the reactor thread after each
        enqueue has committed (the queue runner schedules it)."""
        self._listeners.append(listener)

    def _committed(self, _, envelope: dict) -> str:
        for listener in self._listeners:
            try:
                listener(envelope)
            except Exception:
                self.log.failure("spool listener failed for {queue_id}", queue_id=envelope["id"])
        return envelope["id"]

    def update(self, envelope: dict) -> Deferred:
        """Durably replace the envelope of a committed entry (new recipient
        states, attempts, hold flag...). Fires with the queue id. Updates and
        discards of one entry are applied one at a time, in the order asked."""
        try:
            check_envelope(envelope)
            encoded = encode_envelope(envelope)
        except (ValueError, TypeError):
            return fail()
        return self._serialised(envelope["id"], _UPDATE, encoded)

    def _serialised(self, queue_id: str, kind: str, data: bytes | None) -> Deferred:
        d = Deferred()
        entry = self._writes.get(queue_id)
        if entry is None:
            self._writes[queue_id] = entry = _EntryWrites()
            self._start(queue_id, entry, kind, data, [(d, kind)])
            return d
        if entry.waiting is not None and entry.waiting[0] == _DISCARD and kind == _UPDATE:
            # The entry is on its way out: an update now would bring back an
            # envelope without its message.
            return fail(KeyError(queue_id))
        entry.waiting = (kind, data)
        entry.waiting_deferreds.append((d, kind))
        return d

    def _start(self, queue_id: str, entry: _EntryWrites, kind: str, data, deferreds) -> None:
        if kind == _UPDATE:
            d = self._writer.replace(self.active, self.incoming, queue_id + ENV_SUFFIX, data)
        else:
            # No directory fsync: if a crash undoes the removal, the entry is
            # delivered (or answered 4xx) once more - a duplicate, never a loss;
            # and it saves a flush per relayed message.
            d = self._writer.remove(
                [self.active / (queue_id + ENV_SUFFIX), self.active / (queue_id + MSG_SUFFIX)], sync=False)
        d.addBoth(self._written, queue_id, entry, deferreds)

    def _written(self, outcome, queue_id: str, entry: _EntryWrites, deferreds) -> None:
        # The callers first (they may ask for more: that waits), then the next
        # write. Each gets what its own call promises: update the id, discard None.
        for d, kind in deferreds:
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(queue_id if kind == _UPDATE else None)
        if entry.waiting is None:
            del self._writes[queue_id]
            return
        (kind, data), entry.waiting = entry.waiting, None
        waiting, entry.waiting_deferreds = entry.waiting_deferreds, []
        self._start(queue_id, entry, kind, data, waiting)

    def message_path(self, queue_id: str) -> Path:
        return self.active / (queue_id + MSG_SUFFIX)

    def discard(self, queue_id: str) -> Deferred:
        """Un-commit an entry `enqueue` stored, when the transaction failed
        elsewhere (e.g. the Maildir store): the client will retry; or remove
        one that is done. The .env goes first: it is the commit point, and a
        .msg left alone by a crash is deleted by recover(). Waits for an
        update of the entry in flight. Best effort, never fails."""
        if not is_queue_id(queue_id):
            return fail(ValueError(f"not a queue id: {queue_id!r}"))
        return self._serialised(queue_id, _DISCARD, None)

    # -- blocking: start-up, the CLI, or a pool thread -------------------------

    def recover(self) -> list[dict]:
        """Bring the spool back to committed entries only, after any crash.
        Returns the valid envelopes sorted by id (= by arrival)."""
        self._make_layout()
        for entry in self.incoming.iterdir():
            _remove(entry)
        names = set(os.listdir(self.active))
        valid = []
        for name in sorted(names):
            path = self.active / name
            stem, suffix = name[: -len(ENV_SUFFIX)], name[-len(ENV_SUFFIX):]
            if suffix == MSG_SUFFIX and is_queue_id(stem):
                if stem + ENV_SUFFIX not in names:
                    _remove(path)  # never committed, never acknowledged
                continue
            if suffix != ENV_SUFFIX or not is_queue_id(stem):
                self._move_to_corrupt([path], "not a queue file")
                continue
            msg_path = self.active / (stem + MSG_SUFFIX)
            try:
                envelope = self._read_entry(stem, path, msg_path)
            except (OSError, EnvelopeError) as e:
                # .msg first: if we crash between the two moves, the .env left
                # behind still marks the entry, and the next recover() moves it.
                self._move_to_corrupt([msg_path, path], str(e))
                continue
            valid.append(envelope)
        for directory in (self.incoming, self.active, self.corrupt):
            fsync_directory(directory)
        return valid

    def load(self, queue_id: str) -> tuple[dict, Path]:
        """(envelope, path of the .msg) of a committed entry. KeyError if there
        is none, EnvelopeError if it is unreadable."""
        if not is_queue_id(queue_id):
            raise ValueError(f"not a queue id: {queue_id!r}")
        env_path = self.active / (queue_id + ENV_SUFFIX)
        msg_path = self.active / (queue_id + MSG_SUFFIX)
        try:
            envelope = self._read_entry(queue_id, env_path, msg_path)
        except FileNotFoundError:
            if not env_path.exists():
                raise KeyError(queue_id) from None
            raise EnvelopeError(f"{queue_id}: message file missing") from None
        return envelope, msg_path

    def ids(self) -> list[str]:
        """Ids of the committed entries in active/, oldest first."""
        return sorted(
            name[: -len(ENV_SUFFIX)]
            for name in os.listdir(self.active)
            if name.endswith(ENV_SUFFIX) and is_queue_id(name[: -len(ENV_SUFFIX)])
        )

    # -- helpers ----------------------------------------------------------------

    def _read_entry(self, queue_id: str, env_path: Path, msg_path: Path) -> dict:
        envelope = decode_envelope(env_path.read_bytes(), queue_id)
        size = msg_path.stat().st_size  # FileNotFoundError: .env without .msg
        if size != envelope["size"]:
            raise EnvelopeError(f"message is {size} octets, envelope says {envelope['size']}")
        return envelope

    def _make_layout(self) -> None:
        created = False
        for directory in (self._queue_dir, self.incoming, self.active, self.corrupt):
            if not directory.is_dir():
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                created = True
        if created:
            for directory in (self._queue_dir.parent, self._queue_dir):
                fsync_directory(directory)

    def _move_to_corrupt(self, paths: list[Path], reason: str) -> None:
        moved = []
        for path in paths:
            if not os.path.lexists(path):
                continue
            target = self.corrupt / path.name
            serial = 0
            while os.path.lexists(target):  # keep an earlier corrupt entry of the same name
                serial += 1
                target = self.corrupt / f"{path.name}.{serial}"
            os.rename(path, target)
            moved.append(target.name)
        self.log.error(
            "spool entry {names} is corrupt ({reason}); moved to {corrupt}",
            names=[p.name for p in paths],
            reason=reason,
            corrupt=str(self.corrupt),
            moved=moved,
        )


def read_file(path) -> bytes:
    """The whole file in as few system calls as possible (open, read, close):
    in a pool thread each one is a GIL hand-off."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        parts = []
        while chunk := os.read(fd, 1 << 20):
            parts.append(chunk)
        return b"".join(parts)
    finally:
        os.close(fd)


def message_reader(reactor, threadpool):
    """read_message(path) -> Deferred[bytes], in `threadpool`: for the queue
    runner and the relay transport. The results of a burst of reads wake the
    reactor once (ReactorInbox)."""
    to_reactor = ReactorInbox(reactor)

    def read_message(path):
        return deferToThreadPool(to_reactor, threadpool, read_file, path)
    return read_message


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


