"""`mailgw queue`: look at and act on the relay queue, whether mailgw runs or not.

    mailgw queue list [--json]        every message, oldest first
    mailgw queue show [--json] ID     one envelope with its history, and the message's headers
    mailgw queue flush [ID...]        try now (all messages without IDs); held ones stay held
    mailgw queue hold ID              never try it until released
    mailgw queue release ID           undo hold, and try it now
    mailgw queue delete ID            drop it; the sender is not told
    mailgw queue bounce ID            give up now and send the sender a failure notice
    mailgw queue stats [--json]       messages queued and held; with a server running, deliveries in
                                      progress and the counts since it started (sent, deferred, ...)

How this command and a running server agree (docs/spool-format.md §4):

* A running mailgw holds an exclusive flock(2) on `<queue_dir>/server.lock`
  for its whole life, and serves a control socket at `<data_dir>/control.sock`
  (UNIX socket, mode 0600, removed at stop). See mailgw/queue/control.py.
* This command first tries `flock(LOCK_EX | LOCK_NB)` on that file.
  - It gets the lock: no server runs. It works on the spool files directly and
    keeps the lock until it is done, so a server starting meanwhile waits (a
    moment) or stops with a clear message; nobody else writes the spool.
    Envelopes are replaced atomically (temporary file in incoming/, fsync,
    rename over the old one, fsync active/); `delete` removes the .env (the
    commit point) before the .msg. What needs the runner happens at the next
    start: `flush` and `release` set `next_attempt` to 0 (tried at once),
    `bounce` sets `bounce_requested` (the notice is sent then).
  - The lock is taken: a server runs. The request goes over the control
    socket and the server's queue runner applies it in-process, after any
    delivery attempt in flight for that message (so nothing is written twice).
    While the lock is held but nothing answers on the socket (a server
    starting or stopping, or another `mailgw queue` working offline), it
    retries for a few seconds, then gives up with an error.

Output is for people, except `--json` (ASCII JSON; envelopes as in
docs/spool-format.md plus `in_flight`, always false when no server runs).
Text from outside (addresses, remote replies, headers) is printed with control
characters escaped, so a hostile reply cannot drive the terminal.

Exit codes: 0 done, 1 the request cannot be done (unknown id, unreadable
config, server unreachable, ...), 2 usage error. Errors are one line, never a
traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from mailgw.admin_cli import Parser, UsageError
from mailgw.durable import fsync_directory
from mailgw.queue import control
from mailgw.queue.envelope import Envelope, EnvelopeError, EnvelopeRecipient, HistoryRecord, HistoryResult
from mailgw.queue.spool import ENV_SUFFIX, MSG_SUFFIX, Spool, is_queue_id

USAGE = """usage: mailgw queue list [--json]      [--config PATH]
       mailgw queue show [--json] ID   [--config PATH]
       mailgw queue flush [ID...]      [--config PATH]
       mailgw queue hold ID            [--config PATH]
       mailgw queue release ID         [--config PATH]
       mailgw queue delete ID          [--config PATH]
       mailgw queue bounce ID          [--config PATH]
       mailgw queue stats [--json]     [--config PATH]

  list       every queued message, oldest first: id, age, size, sender, and each
             recipient's state, attempts and last error
  show       one message: the envelope with its attempt history, and the headers
             (never the body)
  flush      try now: the given messages, or all; held messages stay held
  hold       do not try a message until it is released
  release    undo hold and try the message now
  delete     remove a message from the queue; the sender is NOT notified
  bounce     give up on a message and send the sender a failure notice

  --config PATH   configuration file (default: $MAILGW_CONFIG, else the embedded default)
  --json          machine-readable output

Works whether mailgw runs or not: with a running server the request goes
through its control socket (<data_dir>/control.sock); otherwise the spool files
are changed directly and the server acts on them when it next starts.
"""

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2

HEADER_LINES = 50            # `show` prints at most this many header lines
_HEADER_LINE_READ = 8192     # octets read per header line; the rest is cut
_LOCK_WAIT = 5.0             # seconds to retry while the lock is held but nobody answers
_SLOW_NOTICE = 2.0           # seconds before telling the user we are waiting for the runner


class QueueError(Exception):
    """The request cannot be done; the message says why (exit 1)."""


def _parser() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    common.add_argument("--config", metavar="PATH")
    parser = Parser(prog="mailgw queue", add_help=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    listing = commands.add_parser("list", parents=[common], add_help=False)
    listing.add_argument("--json", action="store_true")
    show = commands.add_parser("show", parents=[common], add_help=False)
    show.add_argument("--json", action="store_true")
    show.add_argument("id", metavar="ID")
    flush = commands.add_parser("flush", parents=[common], add_help=False)
    flush.add_argument("ids", metavar="ID", nargs="*")
    stats = commands.add_parser("stats", parents=[common], add_help=False)
    stats.add_argument("--json", action="store_true")
    for name in ("hold", "release", "delete", "bounce"):
        commands.add_parser(name, parents=[common], add_help=False).add_argument("id", metavar="ID")
    return parser


def queue_main(argv: list[str], *, clock=time.time) -> int:
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help", "help") or "-h" in argv or "--help" in argv:
        print(USAGE, end="", file=sys.stdout if argv else sys.stderr)
        return EXIT_OK if argv else EXIT_USAGE
    try:
        args = _parser().parse_args(argv)
    except UsageError as e:
        print(f"mailgw queue: {e}\n\n{USAGE}", end="", file=sys.stderr)
        return EXIT_USAGE
    try:
        ids = _queue_ids(args)
        config = _config(args.config)
        backend = _open_backend(config, clock)
        try:
            return _COMMANDS[args.command](backend, args, ids, clock())
        finally:
            backend.close()
    except QueueError as e:
        print(f"mailgw queue: {e}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"mailgw queue: {where}{e.strerror or e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("\nmailgw queue: interrupted", file=sys.stderr)
        return EXIT_ERROR


def _queue_ids(args) -> list[str]:
    given = getattr(args, "ids", None)
    if given is None:
        given = [args.id] if getattr(args, "id", None) is not None else []
    ids = []
    for text in given:
        queue_id = text.strip().upper()  # ids are upper-case Crockford base32; accept a lower-case paste
        if not is_queue_id(queue_id):
            raise QueueError(f"not a queue id: {_safe(text)!r} (16 characters of 0-9 and A-Z)")
        if queue_id not in ids:
            ids.append(queue_id)
    return ids


def _config(path_text: str | None):
    from mailgw.config import CONFIG_ENV_VAR, ConfigError, load

    path_text = path_text or os.environ.get(CONFIG_ENV_VAR) or None
    try:
        return load(Path(path_text) if path_text else None)
    except ConfigError as e:
        raise QueueError(f"configuration error:\n{e}") from None
    except OSError as e:
        raise QueueError(f"cannot read configuration {path_text}: {e.strerror}") from None


# -- where the queue is: the spool files (no server) or the server ---------------------

def _open_backend(config, clock):
    queue_dir = Path(config.queue_dir)
    if not queue_dir.is_dir():
        return _Offline(queue_dir, None, clock)   # mailgw never ran here: an empty queue
    lock_file = control.lock_path(queue_dir)
    sock = control.socket_path(config.data_dir)
    deadline = time.monotonic() + _LOCK_WAIT
    while True:
        try:
            lock = control.try_lock(queue_dir)
        except OSError as e:
            raise QueueError(f"cannot open {lock_file}: {e.strerror} "
                             "(run this as the user mailgw runs as)") from None
        if lock is not None:
            return _Offline(queue_dir, lock, clock)
        try:
            client = control.connect(sock)
        except OSError as e:
            raise QueueError(f"mailgw is running but its control socket {sock} cannot be used: {e.strerror} "
                             "(run this as the user mailgw runs as)") from None
        if client is not None:
            return _Online(client, queue_dir)
        if time.monotonic() >= deadline:
            raise QueueError(f"{lock_file} is locked but nothing answers on {sock}: mailgw is starting "
                             "or stopping, or another `mailgw queue` command is running; try again")
        time.sleep(0.1)


class _Online:
    """A running server: requests over the control socket."""

    online = True

    def __init__(self, client: control.ControlClient, queue_dir: Path):
        self.client = client
        self.queue_dir = queue_dir

    def close(self):
        self.client.close()

    def _call(self, request: dict, *, waiting_for: str | None = None):
        def slow():
            print(f"mailgw queue: {waiting_for} has a delivery attempt in progress; waiting for it to finish...",
                  file=sys.stderr, flush=True)
        try:
            return self.client.call(request, slow_after=_SLOW_NOTICE if waiting_for else None,
                                    on_slow=slow if waiting_for else None)
        except control.ControlError as e:
            raise QueueError(str(e)) from None

    def envelopes(self) -> list[tuple[Envelope, bool]]:
        result = self._call({"cmd": "list"})
        if not isinstance(result, list):
            raise QueueError("mailgw sent an answer of the wrong shape")
        listed = []
        for item in result:
            if not isinstance(item, dict):
                continue
            try:
                listed.append(control.unlisted(item))
            except EnvelopeError as e:
                print(f"mailgw queue: warning: mailgw sent an envelope this command cannot read ({_safe(e)})",
                      file=sys.stderr)
        return listed

    def show(self, queue_id: str) -> tuple[Envelope, bool]:
        result = self._call({"cmd": "show", "id": queue_id})
        if not isinstance(result, dict):
            raise QueueError("mailgw sent an answer of the wrong shape")
        try:
            return control.unlisted(result)
        except EnvelopeError as e:
            raise QueueError(f"mailgw sent an envelope this command cannot read ({_safe(e)})") from None

    def flush(self, ids: list[str] | None) -> list[str]:
        result = self._call({"cmd": "flush", "ids": ids})
        return [queue_id for queue_id in result or [] if isinstance(queue_id, str)]

    def act(self, command: str, queue_id: str) -> None:
        self._call({"cmd": command, "id": queue_id}, waiting_for=queue_id)

    def stats(self) -> dict:
        result = self._call({"cmd": "stats"})
        if not isinstance(result, dict):
            raise QueueError("mailgw sent an answer of the wrong shape")
        return result


class _Offline:
    """No server: the spool files, changed while holding the server lock."""

    online = False

    def __init__(self, queue_dir: Path, lock, clock):
        self.queue_dir = queue_dir
        self.lock = lock
        self.clock = clock
        self.active = queue_dir / "active"
        self.incoming = queue_dir / "incoming"
        # Spool's reading half only (ids/load): nothing here needs a reactor.
        self.spool = Spool(queue_dir, writer=None, reactor=None) if self.active.is_dir() else None

    def close(self):
        if self.lock is not None:
            self.lock.close()   # releases the flock
            self.lock = None

    def _load(self, queue_id: str) -> Envelope:
        if self.spool is None:
            raise QueueError(f"no such message: {queue_id}")
        try:
            envelope, _ = self.spool.load(queue_id)
        except KeyError:
            raise QueueError(f"no such message: {queue_id}") from None
        except EnvelopeError as e:
            raise QueueError(f"{queue_id}: unreadable entry ({_safe(e)}); mailgw moves it to "
                             f"{self.queue_dir / 'corrupt'} when it next starts") from None
        return envelope

    def _readable(self, ids) -> list[Envelope]:
        envelopes = []
        for queue_id in ids:
            try:
                envelopes.append(self._load(queue_id))
            except QueueError as e:
                if str(e).startswith("no such message"):
                    continue
                print(f"mailgw queue: warning: {e}", file=sys.stderr)
        return envelopes

    def envelopes(self) -> list[tuple[Envelope, bool]]:
        if self.spool is None:
            return []
        return [(envelope, False) for envelope in self._readable(self.spool.ids())]

    def show(self, queue_id: str) -> tuple[Envelope, bool]:
        return self._load(queue_id), False

    def stats(self) -> dict:
        envelopes = self.envelopes()
        return {"messages": len(envelopes), "held": sum(1 for envelope, _ in envelopes if envelope.hold)}

    def flush(self, ids: list[str] | None) -> list[str]:
        if ids is None:
            envelopes = self._readable(self.spool.ids()) if self.spool is not None else []
        else:
            envelopes = [self._load(queue_id) for queue_id in ids]  # all known, or nothing changes
        flushed = []
        for envelope in envelopes:
            if envelope.hold:
                continue
            if envelope.next_attempt != 0:
                self._replace(dataclasses.replace(envelope, next_attempt=0))
            flushed.append(envelope.id)
        return flushed

    def act(self, command: str, queue_id: str) -> None:
        envelope = self._load(queue_id)
        if command == "delete":
            self._delete(queue_id)
            return
        changes = {      # Envelope attributes
            "hold": dict(hold=True),
            "release": dict(hold=False, next_attempt=0),
            "bounce": dict(bounce_requested=True),
        }[command]
        if any(getattr(envelope, name) != value for name, value in changes.items()):
            self._replace(dataclasses.replace(envelope, **changes))

    # -- writing: what Spool.update and Spool.discard do, synchronously --------------

    def _replace(self, envelope: Envelope) -> None:
        """Atomically replace the .env: temporary file in incoming/, fsync,
        rename over the old one, fsync active/. Readers see the old or the new
        envelope, never a mix; after a crash, one of the two."""
        data = envelope.encode()
        name = envelope.id + ENV_SUFFIX
        self.incoming.mkdir(mode=0o700, exist_ok=True)
        tmp = self.incoming / name
        tmp.unlink(missing_ok=True)  # a leftover of an interrupted run; we hold the lock
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        try:
            control.give_to_owner_of(fd, self.queue_dir)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.rename(tmp, self.active / name)
        fsync_directory(self.active)

    def _delete(self, queue_id: str) -> None:
        # The .env first: it is the commit point. A crash in between leaves a
        # lone .msg, which recovery deletes.
        (self.active / (queue_id + ENV_SUFFIX)).unlink()
        (self.active / (queue_id + MSG_SUFFIX)).unlink(missing_ok=True)
        fsync_directory(self.active)




# -- commands ---------------------------------------------------------------------------

def _list(backend, args, ids, now) -> int:
    envelopes = sorted(backend.envelopes(), key=lambda item: (_number(item[0].arrival), item[0].id))
    if args.json:
        print(_json([control.listed(envelope, in_flight) for envelope, in_flight in envelopes]))
        return EXIT_OK
    print(format_list(envelopes, now), end="")
    return EXIT_OK


def _show(backend, args, ids, now) -> int:
    queue_id = ids[0]
    envelope, in_flight = backend.show(queue_id)
    message = backend.queue_dir / "active" / (queue_id + MSG_SUFFIX)
    try:
        headers, more = read_headers(message)
        missing = None
    except FileNotFoundError:
        headers, more, missing = [], False, "(the message file is gone: delivered or deleted meanwhile)"
    if args.json:
        print(_json({"envelope": control.listed(envelope, in_flight), "headers": headers, "more_headers": more}))
        return EXIT_OK
    print(format_envelope(envelope, now, in_flight=in_flight), end="")
    print(f"Headers ({message.name}, first {HEADER_LINES} header lines, no body):")
    if missing:
        print(f"  {missing}")
    for line in headers:
        print(f"  {_safe(line.expandtabs(8))}")
    if more:
        print("  ... (more header lines not shown)")
    return EXIT_OK


def _flush(backend, args, ids, now) -> int:
    flushed = backend.flush(ids or None)
    for queue_id in ids:
        if queue_id not in flushed:
            print(f"{queue_id}: held, not flushed (release it with `mailgw queue release {queue_id}`)")
    count = _plural(len(flushed), "message")
    if not flushed:
        print(f"flushed {count}")
    elif backend.online:
        print(f"flushed {count}: trying now")
    else:
        print(f"flushed {count}: mailgw is not running; it tries them as soon as it starts")
    return EXIT_OK


_DONE = {
    # command: (running server, no server)
    "hold": ("held; it will not be tried until `mailgw queue release {id}`",
             "held; it will not be tried until `mailgw queue release {id}`"),
    "release": ("released; trying it now",
                "released; mailgw is not running, it tries the message as soon as it starts"),
    "delete": ("deleted (the sender was not notified)",
               "deleted (the sender was not notified)"),
    "bounce": ("bounced: given up, and the sender is notified as the message's DSN options ask",
               "bounce requested: mailgw is not running; when it next starts it gives up on the "
               "message and notifies the sender"),
}


def _act(backend, args, ids, now) -> int:
    queue_id = ids[0]
    backend.act(args.command, queue_id)
    online, offline = _DONE[args.command]
    print(f"{queue_id}: " + (online if backend.online else offline).format(id=queue_id))
    return EXIT_OK


def _stats(backend, args, ids, now) -> int:
    stats = backend.stats()
    if args.json:
        print(_json(stats))
        return EXIT_OK
    print(f"queue: {_plural(int(_number(stats.get('messages'))), 'message')}, {int(_number(stats.get('held')))} held")
    if not backend.online:
        print("mailgw is not running: no deliveries in progress, no counts")
        return EXIT_OK
    print(f"deliveries: {stats.get('deliveries_active')} in progress, {stats.get('deliveries_waiting')} waiting "
          f"for a slot; {stats.get('in_flight')} messages being tried; "
          f"{stats.get('idle_connections')} idle connections kept for reuse")
    since = stats.get("since")
    counters = stats.get("counters") or {}
    shown = ", ".join(f"{_safe(key)} {int(_number(value))}" for key, value in counters.items()) or "nothing yet"
    uptime = f" (for {human_duration(now - _number(since))})" if since else ""
    print(f"since mailgw started{uptime}: {shown}")
    return EXIT_OK


_COMMANDS = {"list": _list, "show": _show, "flush": _flush, "stats": _stats,
             "hold": _act, "release": _act, "delete": _act, "bounce": _act}


# -- formatting ---------------------------------------------------------------------------

def human_duration(seconds: float) -> str:
    """5s, 5m, 3h, 2d: the largest whole unit, rounded down."""
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _safe(value) -> str:
    """`value` as one line of text with control and format characters escaped
    (remote replies and headers come from strangers)."""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else
                   (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}" if ord(c) < 0x10000
                    else f"\\U{ord(c):08x}") for c in text)


def _sender(envelope: Envelope) -> str:
    return f"<{_safe(envelope.sender or '')}>"


def _status(envelope: Envelope, in_flight: bool, now: float) -> str:
    parts = []
    if in_flight:
        parts.append("in flight")
    if envelope.bounce_requested:
        parts.append("bounce requested")
    if envelope.hold:
        parts.append("held")
    elif not in_flight and not envelope.bounce_requested:
        wait = _number(envelope.next_attempt) - now
        parts.append(f"next in {human_duration(wait)}" if wait >= 1 else "next: due")
    parts.append(_plural(envelope.attempts, "attempt"))
    return ", ".join(parts)


def _recipient(entry: EnvelopeRecipient) -> str:
    state = _safe(entry.state)
    text = f"{_safe(entry.address)}  {state}, {_plural(entry.attempts, 'attempt')}"
    last = entry.last_reply
    if last and state != "sent":
        text += f", last error: {_safe(last)}"
    return text


def format_list(envelopes: list[tuple[Envelope, bool]], now: float) -> str:
    """The text of `mailgw queue list`: (envelope, in_flight) pairs."""
    if not envelopes:
        return "mail queue is empty\n"
    lines = [f"{'QUEUE ID':<16}  {'AGE':>4}  {'SIZE':>9}  SENDER / RECIPIENTS"]
    total = held = 0
    for envelope, in_flight in envelopes:
        size = envelope.size
        total += size
        held += bool(envelope.hold)
        age = human_duration(now - _number(envelope.arrival))
        lines.append(f"{_safe(envelope.id):<16}  {age:>4}  {size:>9}  "
                     f"{_sender(envelope)}  ({_status(envelope, in_flight, now)})")
        for entry in envelope.recipients:
            lines.append(f"    {_recipient(entry)}")
    summary = f"-- {_plural(len(envelopes), 'message')}, {total} octets"
    if held:
        summary += f", {held} held"
    lines.append(summary)
    return "\n".join(lines) + "\n"


def _utc(timestamp) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(_number(timestamp)))
    except (OverflowError, OSError, ValueError):
        return _safe(timestamp)


def _or_dash(value) -> str:
    return "-" if value is None or value == "" else _safe(value)


def _or_unknown(value) -> str:
    return "?" if value is None else _safe(value)


def format_envelope(envelope: Envelope, now: float, *, in_flight: bool = False) -> str:
    """The envelope part of `mailgw queue show`."""
    client = envelope.client
    flags = [name for on, name in ((envelope.hold, "held"), (in_flight, "in flight"),
                                   (envelope.bounce_requested, "bounce requested"),
                                   (envelope.delay_notice_sent, "delay notice sent")) if on]
    arrival = _number(envelope.arrival)
    wait = _number(envelope.next_attempt) - now
    lines = [
        f"Queue ID:    {_safe(envelope.id)}",
        f"Arrival:     {_utc(arrival)} ({human_duration(now - arrival)} ago)",
        f"Sender:      {_sender(envelope)}" + ("  SMTPUTF8" if envelope.sender_utf8 else ""),
        f"Size:        {envelope.size} octets, body {_or_dash(envelope.body)}",
        f"Client:      {_or_dash(client.ip)}, helo {_or_dash(client.helo)}, "
        f"TLS {'yes' if client.tls else 'no'}, auth {_or_dash(client.auth)}, "
        f"listener {_or_dash(client.listener)}",
        f"DSN:         envid {_or_dash(envelope.envid)}, ret {_or_dash(envelope.ret)}",
        f"Attempts:    {envelope.attempts}, next "
        + (f"{_utc(envelope.next_attempt)} (in {human_duration(wait)})" if wait >= 1 else "due now"),
    ]
    if flags:
        lines.append(f"Flags:       {', '.join(flags)}")
    lines.append("Recipients:")
    for entry in envelope.recipients:
        lines.append(f"  {_safe(entry.address)}: {_safe(entry.state)}, {_plural(entry.attempts, 'attempt')}")
        notify = entry.notify
        lines.append(f"    notify {','.join(map(_safe, notify)) if notify is not None else '-'}, "
                     f"orcpt {_or_dash(entry.orcpt)}")
        if entry.last_reply:
            lines.append(f"    last reply: {_safe(entry.last_reply)}")
    history = envelope.history
    lines.append("History:" if history else "History:    none yet")
    for raw in history:
        record = HistoryRecord.from_json(raw)
        if record is None:
            lines.append(f"  {_safe(json.dumps(raw, ensure_ascii=False, default=str))}")
            continue
        lines.append(f"  {_utc(record.time)}")
        for result in record.results:
            if not isinstance(result, HistoryResult):
                lines.append(f"    {_safe(result)}")
                continue
            lines.append(f"    {_or_unknown(result.address)}: {_or_unknown(result.status)}"
                         f" via {_or_dash(result.relay)}, {_or_dash(result.dsn)}"
                         f", {_or_dash(result.reply)}")
    # Keys of a later release (or written by hand), shown as they are.
    for key, value in sorted(envelope.extra.items()):
        lines.append(f"{_safe(key)}: {_safe(json.dumps(value, ensure_ascii=False, default=str))}")
    return "\n".join(lines) + "\n"


def read_headers(path: Path, limit: int = HEADER_LINES) -> tuple[list[str], bool]:
    """The first `limit` header lines of a spooled message (CRLF wire form),
    and whether more follow. Stops at the empty line: never reads the body."""
    lines: list[str] = []
    with open(path, "rb") as f:
        while True:
            raw = f.readline(_HEADER_LINE_READ)
            if not raw or raw in (b"\r\n", b"\n"):
                return lines, False
            if len(lines) == limit:
                return lines, True
            if not raw.endswith(b"\n"):      # an over-long line: skip the rest of it
                while (rest := f.readline(_HEADER_LINE_READ)) and not rest.endswith(b"\n"):
                    pass
                raw += b" [...]"
            lines.append(raw.rstrip(b"\r\n").decode("utf-8", errors="backslashreplace"))


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=True, allow_nan=False, indent=2, sort_keys=False)
