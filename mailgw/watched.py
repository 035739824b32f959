"""A table file kept in memory and reloaded when it changes on disk.

The alias table (routing/resolver.py) and the quota overrides (store/quota.py)
work like the users file: writers replace the file atomically, readers
stat() it at most once per `check_interval` and re-read it only when it
changed. A file that cannot be read keeps the previous table (each distinct
error is logged once); a missing file is an empty table."""
from __future__ import annotations

import os
from pathlib import Path

from twisted.logger import Logger

_NOT_LOADED = object()


def parsed_lines(data: bytes, parse_line, problems: list):
    """(line number, result) of each line `parse_line(text, number)` accepts
    (None: blank or comment). A line it refuses with ValueError, or that is
    not UTF-8, is added to `problems` and skipped: one bad line costs only
    itself."""
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            parsed = parse_line(raw.decode("utf-8"), number)
        except UnicodeDecodeError:
            problems.append((number, "not valid UTF-8"))
            continue
        except ValueError as error:
            problems.append((number, str(error)))
            continue
        if parsed is not None:
            yield number, parsed


def file_key(st: os.stat_result):
    """Changes whenever the file does: a rename gives a new inode, an edit in
    place a new mtime or size."""
    return st.st_mtime_ns, st.st_size, st.st_ino


class WatchedTable:
    """Subclasses set `what` (for log lines) and provide `parse(data) ->
    (table, [(line, problem), ...])`, `empty()` and `size(table)`."""

    log = Logger()
    what = "table"

    def __init__(self, path: Path, *, clock, check_interval: float = 1.0):
        self.path = Path(path)
        self._clock = clock
        self._check_interval = check_interval
        self._table = self.empty()
        self._key: object = _NOT_LOADED
        self._last_check: float | None = None
        self._last_error: str | None = None
        self.generation = 0
        self.current()

    def current(self):
        now = self._clock.seconds()
        if self._last_check is None or now - self._last_check >= self._check_interval:
            self._last_check = now
            self._reload()
        return self._table

    def _reload(self) -> None:
        try:
            if file_key(os.stat(self.path)) == self._key:
                return
            with open(self.path, "rb") as f:
                # The key of what we read, even if the file is replaced meanwhile.
                key = file_key(os.fstat(f.fileno()))
                data = f.read()
        except FileNotFoundError:
            if self._key is not None:
                self._install(self.empty(), None)
            return
        except OSError as error:
            message = f"{type(error).__name__}: {error.strerror}"
            if message != self._last_error:       # each distinct error once
                self.log.error("cannot read {what} {path}: {error}; keeping the previous one",
                               what=self.what, path=str(self.path), error=message)
                self._last_error = message
            return
        table, problems = self.parse(data)
        for line, reason in problems:
            self.log.warn("{path}:{line}: {reason}", path=str(self.path), line=line, reason=reason)
        self.log.info("loaded {count} entries of the {what} {path}", count=self.size(table), what=self.what,
                      path=str(self.path))
        self._install(table, key)

    def _install(self, table, key) -> None:
        self._table, self._key, self._last_error = table, key, None
        self.generation += 1

    # -- for subclasses ---------------------------------------------------------------
    def parse(self, data: bytes):
        raise NotImplementedError

    def empty(self):
        raise NotImplementedError

    def size(self, table) -> int:
        return len(table)
