"""How `mailgw queue ...` and a running server agree on who touches the spool.

Two rules (docs/spool-format.md §4):

* The server holds an exclusive `flock` on `<queue_dir>/server.lock` for its
  whole life (`acquire_server_lock`). Whoever holds that lock is the only one
  writing the spool. A `mailgw queue` command that gets the lock knows no
  server runs and edits the files itself while holding it; one that does not
  get it talks to the server instead.
* The server serves a control socket at `<data_dir>/control.sock` (UNIX
  socket, mode 0600, removed at stop; `control_service`). The requests are
  applied by the queue runner in-process, serialised with the deliveries in
  flight, so the CLI never writes a file the runner is writing too.

Wire format: one JSON object per line each way ("\\n"-terminated, at most
MAX_REQUEST octets per request). Requests are answered in the order they
arrive, each with `{"ok": true, "result": ...}` or `{"ok": false, "error": "..."}`;
an error never carries a traceback (those go to the server log).

    {"cmd": "list"}                          -> [envelope + "in_flight", ...], oldest first (`listed`)
    {"cmd": "show", "id": ID}                -> envelope + "in_flight"
    {"cmd": "flush", "ids": [ID, ...]|null}  -> [ID, ...] flushed (held ones are skipped)
    {"cmd": "hold"|"release"|"delete"|"bounce", "id": ID} -> ID, once the runner has done it
    {"cmd": "stats"}                         -> QueueRunner.stats(): the queue now, counts since start
    {"cmd": "reload"}                        -> {"ok": bool, "errors": [...], "changes": [...]}
                                                (mailgw/reload.py; `mailgw reload`)
    {"cmd": "submit", "sender": S, "recipients": [R, ...], "size": N, "local_user": LOGIN, "uid": UID}
        then exactly N raw octets, the message  -> {"queue_id": ID}, once it is durable

`submit` is `mailgw sendmail` handing over a message (mailgw/sendmail.py;
the server side is the injected submitter, mailgw/routing/submit.py). The
message cannot travel inside the JSON line (MAX_REQUEST), so its N octets
follow the line, with no terminator; then the next request may begin. S is
the envelope sender ("" for the null sender), the message has CRLF line ends.
"local_user" is the login name the command claims; "uid" is informational
only: the server trusts SO_PEERCRED, not the client, for the uid it passes on.
A refusal carries the SMTP codes, so the command can tell 4xx from 5xx:

    {"ok": false, "error": TEXT, "code": 552, "enhanced": "5.3.4"}

A header the server refuses before reading the octets (no submitter, a
malformed header, N above the size limit) is answered and then the
connection is closed: the octets already on their way cannot be told from
requests. The client may see EPIPE while still sending; the answer is there
to read all the same. A failure that is not a MailError is logged with its
traceback and answered with a generic "internal error" (code 451).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import struct
import time
from pathlib import Path

from twisted.application import service
from twisted.internet import defer, endpoints, protocol
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver

from mailgw.errors import MailError
from mailgw.queue.envelope import Envelope, EnvelopeError, is_queue_id

LOCK_NAME = "server.lock"          # in queue_dir
SOCKET_NAME = "control.sock"       # in data_dir
SOCKET_MODE = 0o600
MAX_REQUEST = 64 * 1024            # octets per request line, the newline not counted
# More requests than this waiting on one connection: stop reading from it
# until the backlog halves (a client pipelining without reading answers).
_MAX_WAITING = 64
# Largest `submit` message when neither control_service nor the submitter says
# (the default of [smtp] max_message_size).
DEFAULT_MAX_SUBMISSION = 35 * 1024 * 1024
# RFC 3463 §3.4 / RFC 5321 §4.5.3.1.10: what SMTP answers for these cases too.
_TOO_BIG = (552, "5.3.4")
_INTERNAL = (451, "4.3.0")

_log = Logger(namespace="mailgw.queue.control")


# -- the lock ---------------------------------------------------------------------

def lock_path(queue_dir) -> Path:
    return Path(queue_dir) / LOCK_NAME


def socket_path(data_dir) -> Path:
    return Path(data_dir) / SOCKET_NAME


def acquire_server_lock(queue_dir, *, wait: float = 2.0):
    """Take the server's exclusive lock on `<queue_dir>/server.lock` (created
    if missing, with queue_dir). Returns the open file: keep a reference for
    the whole life of the process - closing it (or losing the last reference)
    releases the lock. A fork (twistd daemonising) keeps it: the child shares
    the open file description.

    `wait`: seconds to retry while the lock is taken, to let an offline
    `mailgw queue` command finish (it holds the lock for milliseconds). Then
    SystemExit with a one-line explanation: another server runs here."""
    queue_dir = Path(queue_dir)
    path = lock_path(queue_dir)
    try:
        queue_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise SystemExit(f"mailgw: cannot open the lock file {path}: {e.strerror}") from None
    lock_file = os.fdopen(fd, "r+b", buffering=0)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return lock_file
        except BlockingIOError:
            if time.monotonic() >= deadline:
                lock_file.close()
                raise SystemExit(
                    f"mailgw: another mailgw is running on {queue_dir} ({path} is locked); "
                    "stop it first, or give this one another data_dir") from None
            time.sleep(0.05)
        except OSError as e:
            lock_file.close()
            raise SystemExit(f"mailgw: cannot lock {path}: {e.strerror}") from None


def try_lock(queue_dir):
    """The CLI's side: the lock file, locked, if no server holds it; else
    None. OSError if the file cannot be opened (permissions).

    Opened read-only (flock does not need write access), so it also works for
    a user who may read the queue but not write it. When root creates the
    file, it is given to the owner of queue_dir, so the server (running as
    that user) can still open it."""
    queue_dir = Path(queue_dir)
    path = lock_path(queue_dir)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        give_to_owner_of(fd, queue_dir)
    lock_file = os.fdopen(fd, "rb", buffering=0)
    try:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.close()
        return None
    except BaseException:
        lock_file.close()
        raise
    return lock_file


def give_to_owner_of(fd: int, directory: Path) -> None:
    """When running as root, chown a file we created to the owner of
    `directory`: the server runs as that user and must be able to use it."""
    if os.geteuid() != 0:
        return
    owner = os.stat(directory)
    os.fchown(fd, owner.st_uid, owner.st_gid)


# -- the server side ----------------------------------------------------------------

class _BadRequest(Exception):
    """The request is malformed; the message says how (sent to the client)."""


def _shown(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _queue_id(request: dict, key: str = "id") -> str:
    value = request.get(key)
    if not is_queue_id(value):
        raise _BadRequest(f"not a queue id: {_shown(value)}")
    return value


def listed(envelope: Envelope, in_flight: bool) -> dict:
    """An envelope as `list` and `show` answer it: its JSON form
    (docs/spool-format.md) plus "in_flight"."""
    return dict(envelope.to_json(), in_flight=in_flight)


def unlisted(value) -> tuple[Envelope, bool]:
    """(envelope, in_flight) of an item `list` or `show` answered;
    EnvelopeError if it is not one."""
    if not isinstance(value, dict):
        raise EnvelopeError("envelope: not an object")
    data = dict(value)
    in_flight = bool(data.pop("in_flight", False))
    return Envelope.from_json(data), in_flight


def encode(message: dict) -> bytes:
    """One wire line (ASCII JSON + newline)."""
    return json.dumps(message, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii") + b"\n"


def peer_uid(transport) -> int | None:
    """The uid of the process at the other end of a UNIX socket (SO_PEERCRED),
    or None where the platform or the transport cannot say."""
    option = getattr(socket, "SO_PEERCRED", None)
    try:
        handle = transport.getHandle()
        if option is None or handle.family != socket.AF_UNIX:
            return None
        credentials = handle.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
    except (AttributeError, OSError, TypeError):
        return None
    _pid, uid, _gid = struct.unpack("3i", credentials)
    return uid


class _Refusal(Exception):
    """A `submit` header refused before its octets are read; `answer` says why."""

    def __init__(self, answer: dict):
        super().__init__(answer.get("error"))
        self.answer = answer


class ControlProtocol(LineReceiver):
    """One client connection. Connection state only: the requests are the
    factory's business. Answers go out in request order: each request waits
    for the one before it (a `hold` may wait for a delivery in flight).

    A `submit` line switches to raw mode for its N octets, then back to lines."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_REQUEST

    def connectionMade(self):
        self._tail = defer.succeed(None)
        self._waiting = 0
        self._pauses: set[str] = set()    # why reading is paused: "backlog", "submit"
        self._closing = False
        self._submission = None           # while reading octets: [request, chunks, octets to come]
        self._peer_uid = peer_uid(self.transport)

    def dataReceived(self, data):
        if self._closing:
            return
        super().dataReceived(data)

    def lineReceived(self, line):
        if self._closing:
            return
        request, error = self.factory.parse(line)
        if error is None and request.get("cmd") == "submit":
            self._submit_header(request)
            return
        self._enqueue(lambda: error if error is not None else self.factory.handle_request(request))

    def lineLengthExceeded(self, line):
        # The stream cannot be framed any more: answer (after what came
        # before), then hang up.
        error = {"ok": False, "error": f"request too long (more than {MAX_REQUEST} octets)"}
        self._refuse(error)

    def _refuse(self, answer: dict) -> None:
        """Answer after what came before, then close; read nothing more."""
        self._closing = True
        self._buffer = b""
        self._enqueue(lambda: answer, close=True)

    # -- submit --------------------------------------------------------------------

    def _submit_header(self, request: dict) -> None:
        try:
            size = self.factory.submission_size(request)
        except _Refusal as refusal:
            self._refuse(refusal.answer)
            return
        self._submission = [request, [], size]
        if size == 0:
            self._submission_complete()
        else:
            self.setRawMode()

    def rawDataReceived(self, data):
        if self._closing or self._submission is None:
            return
        request, chunks, left = self._submission
        piece = data[:left]
        chunks.append(piece)
        self._submission[2] = left - len(piece)
        if self._submission[2]:
            return
        self._submission_complete()
        # What follows the octets is the next request (LineReceiver buffers it
        # while we are inside its dataReceived).
        self.setLineMode(data[len(piece):])

    def _submission_complete(self) -> None:
        request, chunks, _ = self._submission
        self._submission = None
        message = b"".join(chunks)
        origin = {"uid": self._peer_uid, "login": request.get("local_user")}
        # One message in memory per connection: read no further until this one is answered.
        self._pause("submit")
        self._enqueue(lambda: self.factory.submit(request, message, origin), resume="submit")

    # -- answers -------------------------------------------------------------------

    def _pause(self, reason: str) -> None:
        if not self._pauses:
            self.transport.pauseProducing()
        self._pauses.add(reason)

    def _resume(self, reason: str) -> None:
        if reason in self._pauses:
            self._pauses.discard(reason)
            if not self._pauses and not self._closing:
                self.transport.resumeProducing()

    def _enqueue(self, make_answer, close: bool = False, resume: str | None = None) -> None:
        self._waiting += 1
        if self._waiting > _MAX_WAITING:
            self._pause("backlog")
        def step(_):
            d = defer.maybeDeferred(make_answer)
            d.addErrback(self.factory.internal_error, "answering a control request")
            d.addCallback(self._answer, close, resume)
            # Keep the chain alive whatever happens: the next request must still be answered.
            d.addErrback(lambda failure: self.factory.log.failure("control connection", failure))
            return d

        self._tail.addCallback(step)

    def _answer(self, answer: dict, close: bool, resume: str | None = None) -> None:
        self._waiting -= 1
        try:
            data = encode(answer)
        except (TypeError, ValueError):
            self.factory.log.failure("control answer is not JSON: {answer!r}", answer=answer)
            data = encode({"ok": False, "error": "internal error (see the server log)"})
        self.transport.write(data)
        if close:
            self.transport.loseConnection()
            return
        if resume is not None:
            self._resume(resume)
        if self._waiting <= _MAX_WAITING // 2:
            self._resume("backlog")


class ControlFactory(protocol.Factory):
    """Serves `mailgw queue` requests for a running server (module docstring).

    `runner`: the QueueRunner (snapshot/flush/hold/release/delete/bounce);
    `snapshot()` gives (Envelope, in_flight) pairs, sent as `listed` makes them.
    `submitter`: takes `submit` requests (`submit(sender, recipients, message,
    *, origin)` -> Deferred queue id, failing with MailError); None: refused.
    `max_size`: the largest message `submit` reads (default: the submitter's
    `max_size`, else DEFAULT_MAX_SUBMISSION)."""

    protocol = ControlProtocol
    noisy = False

    def __init__(self, runner, *, submitter=None, max_size: int | None = None, log: Logger | None = None):
        self.runner = runner
        self.submitter = submitter
        if max_size is None:
            max_size = getattr(submitter, "max_size", None)
        self.max_size = max_size if isinstance(max_size, int) and max_size > 0 else DEFAULT_MAX_SUBMISSION
        self.log = log or _log
        self.reloader = None        # mailgw.reload.Reloader, set by the composition root
        self._commands = {
            "list": self._list, "show": self._show, "flush": self._flush, "stats": self._stats,
            "reload": self._reload,
            "hold": self._single, "release": self._single, "delete": self._single, "bounce": self._single,
        }

    def handle(self, line: bytes) -> defer.Deferred:
        """Deferred firing with the answer (a dict) to one request line; never fails."""
        request, error = self.parse(line)
        if error is not None:
            return defer.succeed(error)
        return self.handle_request(request)

    @staticmethod
    def parse(line: bytes) -> tuple[dict | None, dict | None]:
        """(the request, None), or (None, the error answer) for a malformed line."""
        try:
            request = json.loads(line.removesuffix(b"\r").decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None, {"ok": False, "error": "bad request: not UTF-8 JSON"}
        if not isinstance(request, dict):
            return None, {"ok": False, "error": "bad request: not a JSON object"}
        return request, None

    def handle_request(self, request: dict) -> defer.Deferred:
        """Deferred firing with the answer to a parsed request (not `submit`); never fails."""
        command = request.get("cmd")
        if command == "submit":
            # Only the protocol can read the octets that follow.
            return defer.succeed({"ok": False, "error": "bad request: submit needs its message octets"})
        handler = self._commands.get(command) if isinstance(command, str) else None
        if handler is None:
            return defer.succeed({"ok": False, "error": f"unknown command: {_shown(command)}"})
        d = defer.maybeDeferred(handler, command, request)
        d.addCallbacks(lambda result: {"ok": True, "result": result}, self._failed,
                       errbackArgs=(command, request))
        return d

    # -- commands ------------------------------------------------------------------

    def _list(self, command, request):
        return [listed(envelope, in_flight) for envelope, in_flight in self.runner.snapshot()]

    def _stats(self, command, request):
        return self.runner.stats()

    def _reload(self, command, request):
        if self.reloader is None:
            raise _BadRequest("this server cannot reload")
        return self.reloader.reload("mailgw reload")

    def _show(self, command, request):
        queue_id = _queue_id(request)
        for envelope, in_flight in self.runner.snapshot():
            if envelope.id == queue_id:
                return listed(envelope, in_flight)
        raise KeyError(queue_id)

    def _flush(self, command, request):
        ids = request.get("ids")
        if ids is not None:
            if not isinstance(ids, list):
                raise _BadRequest("ids must be a list of queue ids or null")
            ids = list(dict.fromkeys(_queue_id({"id": value}) for value in ids))
            # Refuse the whole request rather than flush some ids and then
            # fail on an unknown one.
            known = {envelope.id for envelope, _ in self.runner.snapshot()}
            for queue_id in ids:
                if queue_id not in known:
                    raise KeyError(queue_id)
        self.log.info("queue flush of {which} requested over the control socket",
                      which="all" if ids is None else " ".join(ids))
        return defer.maybeDeferred(self.runner.flush, ids).addCallback(list)

    def _single(self, command, request):
        queue_id = _queue_id(request)
        self.log.info("queue {command} {queue_id} requested over the control socket",
                      command=command, queue_id=queue_id)
        d = defer.maybeDeferred(getattr(self.runner, command), queue_id)
        return d.addCallback(lambda _: queue_id)

    # -- submit --------------------------------------------------------------------

    def submission_size(self, request: dict) -> int:
        """N, the octets that follow a valid `submit` header; _Refusal if the
        header is refused (the protocol then reads none of them)."""
        if self.submitter is None:
            raise _Refusal({"ok": False, "error": "submission not available"})
        size = request.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise _Refusal({"ok": False, "error": f"bad request: size must be an octet count, got {_shown(size)}"})
        sender = request.get("sender")
        if not isinstance(sender, str):
            raise _Refusal({"ok": False, "error": f"bad request: sender must be a string, got {_shown(sender)}"})
        recipients = request.get("recipients")
        if not isinstance(recipients, list) or not all(isinstance(r, str) for r in recipients):
            raise _Refusal({"ok": False, "error": "bad request: recipients must be a list of strings"})
        login = request.get("local_user")
        if login is not None and not isinstance(login, str):
            raise _Refusal({"ok": False, "error": "bad request: local_user must be a string"})
        if size > self.max_size:
            # Refused before one octet is read: a big message costs us nothing.
            code, enhanced = _TOO_BIG
            raise _Refusal({"ok": False, "error": f"message too big: {size} octets, the limit is {self.max_size}",
                            "code": code, "enhanced": enhanced})
        return size

    def submit(self, request: dict, message: bytes, origin: dict) -> defer.Deferred:
        """Deferred firing with the answer to a complete `submit`; never fails."""
        d = defer.maybeDeferred(self.submitter.submit, request["sender"], list(request["recipients"]),
                                message, origin=origin)
        d.addCallbacks(lambda queue_id: {"ok": True, "result": {"queue_id": str(queue_id)}},
                       self._submit_failed, errbackArgs=(origin,))
        return d

    def _submit_failed(self, failure, origin: dict) -> dict:
        if failure.check(MailError):
            error = failure.value
            self.log.info("local submission (uid {uid}, login {login}) refused: {code} {enhanced} {text}",
                          uid=origin.get("uid"), login=origin.get("login"), code=error.code,
                          enhanced=error.enhanced, text=error.text)
            return {"ok": False, "error": str(error.text), "code": error.code, "enhanced": error.enhanced}
        answer = self.internal_error(failure, "local submission")
        code, enhanced = _INTERNAL
        return dict(answer, code=code, enhanced=enhanced)

    # -- errors --------------------------------------------------------------------

    def _failed(self, failure, command, request) -> dict:
        if failure.check(_BadRequest):
            return {"ok": False, "error": f"bad request: {failure.value}"}
        if failure.check(KeyError):
            missing = failure.value.args[0] if failure.value.args else request.get("id")
            which = f": {missing}" if is_queue_id(missing) else ""
            return {"ok": False, "error": f"no such message{which}"}
        if failure.check(MailError):
            self.log.warn("queue {command}: {error}", command=command, error=failure.value.text)
            return {"ok": False, "error": f"the spool could not be updated: {failure.value.text}"}
        return self.internal_error(failure, f"queue {command}")

    def internal_error(self, failure, what: str) -> dict:
        self.log.failure("{what} failed", failure, what=what)
        return {"ok": False, "error": "internal error (see the server log)"}


class ControlService(service.Service):
    """Listens on the control socket while running; removes it at stop."""

    def __init__(self, reactor, path, runner, *, submitter=None, max_size: int | None = None,
                 log: Logger | None = None):
        self.reactor = reactor
        self.path = Path(path)
        self.factory = ControlFactory(runner, submitter=submitter, max_size=max_size, log=log)
        self.log = log or _log
        self.port = None

    def startService(self):
        super().startService()
        # The caller holds the server lock, so no other server can be using a
        # socket found here: it is a leftover of a server that died.
        _remove_stale_socket(self.path)
        endpoint = endpoints.UNIXServerEndpoint(self.reactor, str(self.path), mode=SOCKET_MODE)
        return endpoint.listen(self.factory).addCallbacks(self._listening, self._cannot_listen)

    def _listening(self, port) -> None:
        self.port = port
        self.log.info("control socket for `mailgw queue` at {path}", path=str(self.path))

    def _cannot_listen(self, failure) -> None:
        # Mail keeps flowing; only `mailgw queue` cannot reach us. Say so plainly.
        self.log.error("cannot listen on the control socket {path}: {error}; `mailgw queue` "
                       "will not work while this server runs", path=str(self.path), error=failure.value)

    def stopService(self):
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return None
        d = defer.maybeDeferred(port.stopListening)
        d.addBoth(lambda result: (_remove_stale_socket(self.path), result)[1])
        return d


def control_service(reactor, socket_path, runner, submitter=None, *, max_size: int | None = None,
                    log: Logger | None = None) -> ControlService:
    """The control socket as a Service; start it after the server lock is taken.
    `submitter`/`max_size`: see ControlFactory (None: `submit` is refused)."""
    return ControlService(reactor, socket_path, runner, submitter=submitter, max_size=max_size, log=log)


def _remove_stale_socket(path: Path) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):  # never remove anything else
            os.unlink(path)
    except FileNotFoundError:
        pass


# -- the client side (blocking: the CLI) ----------------------------------------------

class ControlError(Exception):
    """The server could not be asked, or it answered ok: false."""


class ControlClient:
    """A blocking connection to the control socket."""

    def __init__(self, path, *, connect_timeout: float = 5.0):
        self.path = Path(path)
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socket.settimeout(connect_timeout)
        try:
            self._socket.connect(str(self.path))
        except BaseException:
            self._socket.close()
            raise
        self._buffer = b""

    def close(self) -> None:
        self._socket.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def call(self, request: dict, *, timeout: float = 300.0, slow_after: float | None = None, on_slow=None):
        """Send one request and return its result; ControlError if the server
        says no, cannot be reached, or does not answer within `timeout`
        seconds. `on_slow()` is called once if no answer came within
        `slow_after` seconds (the runner may be waiting for a delivery)."""
        data = encode(request)
        if len(data) - 1 > MAX_REQUEST:
            raise ControlError("request too long")
        deadline = time.monotonic() + timeout
        slow_at = None if slow_after is None or on_slow is None else time.monotonic() + slow_after
        try:
            self._socket.settimeout(timeout)
            self._socket.sendall(data)
            line = self._answer_line(timeout, deadline, slow_at, on_slow)
        except OSError as e:
            raise ControlError(f"control socket {self.path}: {e.strerror or e}") from None
        answer = self._decode(line)
        if not answer["ok"]:
            raise ControlError(str(answer.get("error") or "request refused"))
        return answer.get("result")

    def submit(self, request: dict, message: bytes, *, timeout: float = 300.0) -> dict:
        """Send a `submit` request (its "size" must be len(message)) and the
        message octets; return the answer as sent, ok or not (a refusal's
        "code" matters to the caller). ControlError if there is no answer.

        A server that refuses the header closes without reading the octets:
        a write error here is not the end, the answer is already on its way."""
        if request.get("size") != len(message):
            raise ValueError("submit: size must be the length of the message")
        data = encode(request)
        if len(data) - 1 > MAX_REQUEST:
            raise ControlError("request too long")
        deadline = time.monotonic() + timeout
        try:
            self._socket.settimeout(timeout)
            self._socket.sendall(data)
            try:
                self._socket.sendall(message)
            except (BrokenPipeError, ConnectionResetError):
                pass
            line = self._answer_line(timeout, deadline)
        except OSError as e:
            raise ControlError(f"control socket {self.path}: {e.strerror or e}") from None
        return self._decode(line)

    def _answer_line(self, timeout: float, deadline: float, slow_at: float | None = None, on_slow=None) -> bytes:
        while b"\n" not in self._buffer:
            now = time.monotonic()
            if now >= deadline:
                raise ControlError(f"no answer from mailgw within {timeout:.0f} s "
                                   "(the request may still be carried out)")
            wake = deadline if slow_at is None else min(deadline, slow_at)
            self._socket.settimeout(max(0.01, wake - now))
            try:
                chunk = self._socket.recv(65536)
            except socket.timeout:
                if slow_at is not None and time.monotonic() >= slow_at:
                    slow_at = None
                    on_slow()
                continue
            except ConnectionResetError:
                chunk = b""   # the server hung up after answering what it had read
            if not chunk:
                raise ControlError("mailgw closed the control connection without answering "
                                   "(is it stopping?); the request may or may not have been carried out")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    @staticmethod
    def _decode(line: bytes) -> dict:
        try:
            answer = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise ControlError("mailgw sent an answer that is not JSON") from None
        if not isinstance(answer, dict) or "ok" not in answer:
            raise ControlError("mailgw sent an answer of the wrong shape")
        return answer


def connect(path) -> ControlClient | None:
    """A client for the control socket, or None if nobody listens there (no
    socket file yet or any more, or a stale one)."""
    try:
        return ControlClient(path)
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ECONNREFUSED):
            return None
        raise
