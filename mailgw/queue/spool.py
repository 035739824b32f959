"""The relay queue's durable storage (format: docs/spool-format.md).

    queue_dir/incoming/   files being written; never trusted, emptied by recover()
    queue_dir/active/     <id>.msg (message, CRLF wire form) + <id>.env (JSON envelope)
    queue_dir/corrupt/    entries recover() could not read, moved aside, never dropped
    (deferred/ and hold/ are reserved for the queue runner)

Commit protocol (one DurableWriter.commit): <id>.msg is written and fsynced in
incoming/ and linked into active/, then <id>.env the same way, then active/ is
fsynced; only then does enqueue()'s Deferred fire and the client get 250.
The presence of <id>.env in active/ is the commit point: a .msg alone is a
leftover of a transaction that was never acknowledged.

The envelope is a mailgw.queue.envelope.Envelope; its JSON form, versions
and validation live there. Storing only: when to send is the runner's
business (design §3.4).
"""
from __future__ import annotations

import os
import secrets
import shutil
import threading
from pathlib import Path

from twisted.internet.defer import Deferred, fail
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgw.durable import DurableWriter, fsync_directory, read_file
from mailgw.interfaces import ISpool
from mailgw.iopool import ReactorInbox
from mailgw.queue.envelope import Envelope, EnvelopeError, encode_json, is_queue_id

MSG_SUFFIX = ".msg"
ENV_SUFFIX = ".env"

# Crockford base32 (https://www.crockford.com/base32.html): no I L O U, so
# never "/" or "." either; fixed width, so string order is numeric order.
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
QUEUE_ID_LENGTH = 16  # 80 bits = 48-bit ms timestamp + 32 random bits
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
        # Per queue id: the writes of an entry with one in flight (a control
        # command's update may race the runner's; both write the same file,
        # and the later one to land must be the later one asked for).
        self._writes: dict[str, _EntryWrites] = {}
        # Start-up, before the reactor runs.
        self._make_layout()

    def new_id(self) -> str:
        return new_queue_id(self._reactor.seconds())

    def enqueue(self, queue_id: str, envelope: Envelope, message: bytes) -> Deferred:
        """Durably store message + envelope; fires with queue_id after the
        commit, fails with ValueError for an invalid id or envelope (nothing
        written) or StorageFull/StorageFailed."""
        try:
            if not is_queue_id(queue_id):
                raise ValueError(f"not a queue id: {queue_id!r}")
            data = _checked(envelope)
            encoded = encode_json(data)
            if envelope.id != queue_id:
                raise EnvelopeError("envelope id differs from queue_id")
            if envelope.size != len(message):
                raise EnvelopeError("envelope size differs from the message length")
        except (ValueError, TypeError):
            return fail()
        # Order matters: .msg durable and in active/ before .env appears there.
        d = self._writer.commit(
            [
                (self.active, self.incoming, queue_id + MSG_SUFFIX, message),
                (self.active, self.incoming, queue_id + ENV_SUFFIX, encoded),
            ]
        )
        return d.addCallback(self._committed, queue_id, data)

    def add_listener(self, listener) -> None:
        """`listener(data)` is called on the reactor thread after each
        enqueue has committed (the queue runner schedules it), with the
        envelope's JSON form as written (`Envelope.to_json()`): an SMTP worker
        process forwards it to the main process as it is (mailgw/worker.py),
        and QueueRunner.add takes it."""
        self._listeners.append(listener)

    def _committed(self, _, queue_id: str, data: dict) -> str:
        for listener in self._listeners:
            try:
                listener(data)
            except Exception:
                self.log.failure("spool listener failed for {queue_id}", queue_id=queue_id)
        return queue_id

    def update(self, envelope: Envelope) -> Deferred:
        """Durably replace the envelope of a committed entry (new recipient
        states, attempts, hold flag...). Fires with the queue id. Updates and
        discards of one entry are applied one at a time, in the order asked."""
        try:
            encoded = encode_json(_checked(envelope))
        except (ValueError, TypeError):
            return fail()
        return self._serialised(envelope.id, _UPDATE, encoded)

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

    def recover(self) -> list[Envelope]:
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

    def load(self, queue_id: str) -> tuple[Envelope, Path]:
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

    def _read_entry(self, queue_id: str, env_path: Path, msg_path: Path) -> Envelope:
        envelope = Envelope.decode(env_path.read_bytes(), queue_id)
        size = msg_path.stat().st_size  # FileNotFoundError: .env without .msg
        if size != envelope.size:
            raise EnvelopeError(f"message is {size} octets, envelope says {envelope.size}")
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


def _checked(envelope: Envelope) -> dict:
    if not isinstance(envelope, Envelope):
        raise TypeError(f"not an Envelope: {type(envelope).__name__}")
    return envelope.checked_json()


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


