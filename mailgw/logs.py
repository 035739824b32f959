"""The server's log: twistd's --logfile, in text or JSON, reopened on SIGUSR1.

twistd's own file log (twisted.python.logfile.LogFile) rotates by itself
every megabyte, and its SIGUSR1 handler rotates it too (log -> log.1 ...).
Under logrotate (or anything that moves the file away) the server must
instead *reopen* the path: the old file keeps what was written to it, new
lines go to a new file at the path. And `[log] format = "json"` wants one
JSON object a line (twisted.logger's eventAsJSON) for log shippers.

How: twistd's AppLogger.start (twisted/application/app.py) takes the
application's ILogObserver component, if there is one, instead of building
its own observer from --logfile. twistd builds the application and then
calls `ser.setServiceParent(application)` on what the plugin's makeService
returned, before AppLogger.start: `LogObserverRoot` (the service the plugin
returns, with the server's top service as its only child) sets that
component there, writing where twistd would have written:

    --logfile PATH          PATH, opened in append mode, reopened on SIGUSR1
    --logfile - (with -n)   stdout (systemd: the journal); SIGUSR1 ignored
    no --logfile, -n        stdout
    no --logfile, daemon    twistd.log (as twistd)

With --syslog or --logger, or `--logfile -` without -n (twistd refuses
that), twistd keeps doing its own logging and nothing here is installed.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

from twisted.application import service
from twisted.logger import ILogObserver, Logger, jsonFileLogObserver, textFileLogObserver

log = Logger()


class ReopeningFile:
    """A text file at `path` that `reopen()` opens again by name (after a
    rename it is a new file). write/flush/reopen are serialised: log events
    can come from any thread."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self._lock = threading.Lock()
        self._file = self._open()
        self.reopens = 0

    def _open(self):
        return open(self.path, "a", encoding="utf-8", errors="backslashreplace")

    def write(self, text: str) -> None:
        with self._lock:
            self._file.write(text)

    def flush(self) -> None:
        with self._lock:
            self._file.flush()

    def reopen(self) -> bool:
        """Open the path again; on failure keep writing to the old file."""
        try:
            new = self._open()
        except OSError as error:
            log.error("cannot reopen the log file {path}: {error}; still writing to the old one",
                      path=self.path, error=error.strerror or str(error))
            return False
        with self._lock:
            old, self._file = self._file, new
            self.reopens += 1
        try:
            old.close()
        except OSError:
            pass
        log.info("log file {path} reopened", path=self.path)
        return True

    def close(self) -> None:
        with self._lock:
            self._file.close()


def file_observer(out, log_format: str = "text"):
    """A twisted.logger observer writing to `out`: twistd's text lines, or one JSON object a line."""
    if log_format == "json":
        # recordSeparator "": plain JSON lines (the default "\x1e" starts each record, for JSON text sequences).
        return jsonFileLogObserver(out, recordSeparator="")
    return textFileLogObserver(out)


def log_destination(twistd_options) -> str | None:
    """The file twistd would log to, "-" for stdout, None if twistd must log itself."""
    options = twistd_options if twistd_options is not None else {}
    if options.get("syslog") or options.get("logger"):
        return None
    path = options.get("logfile") or ""
    nodaemon = bool(options.get("nodaemon"))
    if path == "-":
        return "-" if nodaemon else None       # twistd itself exits: "Daemons cannot log to stdout"
    if not path:
        return "-" if nodaemon else "twistd.log"
    return path


def install_sigusr1(target: ReopeningFile | None, reactor=None):
    """SIGUSR1 reopens `target` (in the reactor thread); with no file it is ignored
    rather than left at its default action (terminate). Returns the previous handler."""
    def reopen(signum, frame):
        if target is None:
            return
        nonlocal reactor
        if reactor is None:
            from twisted.internet import reactor
        reactor.callFromThread(target.reopen)

    return signal.signal(signal.SIGUSR1, reopen)


def make_observer(log_format: str, twistd_options, *, reactor=None):
    """(observer, ReopeningFile or None), or None if twistd should log by itself."""
    destination = log_destination(twistd_options)
    if destination is None:
        return None
    if destination == "-":
        out = None
        observer = file_observer(sys.stdout, log_format)
    else:
        out = ReopeningFile(destination)
        observer = file_observer(out, log_format)
    install_sigusr1(out, reactor)
    return observer, out


class LogObserverRoot(service.MultiService):
    """What `twistd mailgw` runs: the server's top service, plus the log
    observer component set on the application as twistd adds us to it."""

    def __init__(self, top: service.IService, *, log_format: str = "text", twistd_options=None):
        super().__init__()
        self.top = top
        self.log_format = log_format
        self.twistd_options = twistd_options
        self.log_file: ReopeningFile | None = None
        top.setServiceParent(self)

    def setServiceParent(self, parent):
        made = make_observer(self.log_format, self.twistd_options)
        if made is not None and hasattr(parent, "setComponent"):
            observer, self.log_file = made
            parent.setComponent(ILogObserver, observer)
        return super().setServiceParent(parent)


def make_service(options) -> LogObserverRoot:
    """The plugin's makeService: mailgw.tap's, wrapped."""
    from mailgw import tap

    return LogObserverRoot(tap.makeService(options), log_format=options.config.log_format,
                           twistd_options=options.parent)
