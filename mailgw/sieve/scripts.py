"""Per-user store of Sieve scripts, for ManageSieve (RFC 5804) and the admin CLI.

Layout under `root` (= <data_dir>/sieve):

    root/<domain>/<local>/              one directory per user local@domain
        scripts/<encoded name>.sieve    one file per script
        active                          the name of the active script (absent: none)

The file name is the script name with every UTF-8 octet outside
[A-Za-z0-9_.-] written as %XX, so names round-trip exactly and can never be
a path. Writes go to a temporary file in the same directory, are fsynced,
renamed into place and the directory fsynced. All methods are synchronous:
the server calls them in a thread pool; one lock per user serialises changes.
"""
from __future__ import annotations

import os
import re
import secrets
import threading
from pathlib import Path
from typing import Callable

from mailgw.durable import fsync_directory
from mailgw.store.maildir import split_mailbox_address

FILE_MODE = 0o600
DIRECTORY_MODE = 0o700
SUFFIX = ".sieve"
ACTIVE_FILE = "active"
SCRIPTS_DIR = "scripts"
_NAME_MAX = 255  # longest file name on common Linux file systems
_SAFE_OCTETS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")
# RFC 5804 §1.6: no control characters, no line/paragraph separators.
_FORBIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_ENCODED = re.compile(r"(?:[A-Za-z0-9_.\-]|%[0-9A-F]{2})+")


class ScriptStoreError(Exception):
    """Base of the errors of the script store."""


class QuotaError(ScriptStoreError):
    """Too many scripts, or a script too large (RFC 5804 QUOTA)."""


class ActiveScriptError(ScriptStoreError):
    """The active script cannot be deleted (RFC 5804 ACTIVE)."""


class ExistsError(ScriptStoreError):
    """A script of that name exists already (RFC 5804 ALREADYEXISTS)."""


class BadNameError(ScriptStoreError):
    """Not an acceptable script name or user address."""


def _encode_name(name: str) -> str:
    return "".join(chr(b) if b in _SAFE_OCTETS else f"%{b:02X}" for b in name.encode("utf-8"))


def _decode_name(encoded: str) -> str | None:
    """The script name of a file stem, None if it is not one we wrote."""
    if not _ENCODED.fullmatch(encoded):
        return None
    out = bytearray()
    i = 0
    while i < len(encoded):
        if encoded[i] == "%":
            out.append(int(encoded[i + 1:i + 3], 16))
            i += 3
        else:
            out.append(ord(encoded[i]))
            i += 1
    try:
        name = out.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return name if _encode_name(name) == encoded else None


def _read_text(path: Path) -> str:
    """The file's text; FileNotFoundError if absent. Never follows a symlink."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        return f.read().decode("utf-8")


def _write_atomic(path: Path, data: bytes) -> None:
    """tmp file in the same directory, fsync, rename over `path`, fsync dir.
    Not durable.write_private: its tmp name is fixed (PATH.tmp), and the admin
    command and the server may write one user's script at the same time from
    two processes (the per-user lock is per process), so each write here has
    its own O_EXCL tmp name and removes it on failure."""
    directory = path.parent
    tmp = directory / f".tmp-{secrets.token_hex(8)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_directory(directory)


class ScriptStore:
    """Sieve scripts of each user, one of them possibly active."""

    def __init__(
        self,
        root: Path,
        *,
        check: Callable[[str], object] | None = None,
        max_scripts: int = 20,
        max_script_size: int = 65536,
        max_name_length: int = 128,
    ):
        self._root = Path(root)
        # Raises ValueError (SieveSyntaxError) with the message for the client.
        self._check = check
        self.max_scripts = max_scripts
        self.max_script_size = max_script_size
        self.max_name_length = max_name_length
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    # -- paths ---------------------------------------------------------------

    def _user_dir(self, user: str) -> Path:
        try:
            local, domain = split_mailbox_address(user)
        except ValueError as e:
            raise BadNameError(str(e)) from None
        path = self._root / domain / local
        # Belt and braces: split_mailbox_address already refuses "..", "/".
        if path.parent.parent != self._root or local in (".", "..") or domain in (".", ".."):
            raise BadNameError(f"unsafe address: {user!r}")
        return path

    def _check_name(self, name: str) -> str:
        """The file name of script `name`; BadNameError if not acceptable."""
        if not isinstance(name, str):
            raise BadNameError("script name must be a string")
        # RFC 5804 §1.6: a name is 1..N characters, no controls, no U+2028/2029.
        if not 0 < len(name) <= self.max_name_length:
            raise BadNameError(f"script name must be 1 to {self.max_name_length} characters")
        if _FORBIDDEN.search(name):
            raise BadNameError("script name contains a control character")
        # Names become file names: no separators, no hidden or special entries.
        if "/" in name or name.startswith("."):
            raise BadNameError("script name must not contain '/' or start with '.'")
        try:
            encoded = _encode_name(name)
        except UnicodeEncodeError:
            raise BadNameError("script name is not valid UTF-8") from None
        if len(encoded) + len(SUFFIX) > _NAME_MAX:
            raise BadNameError("script name too long")
        return encoded + SUFFIX

    def _script_path(self, user: str, name: str) -> Path:
        return self._user_dir(user) / SCRIPTS_DIR / self._check_name(name)

    def _lock(self, user: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(user, threading.Lock())

    def _ensure_dirs(self, user: str) -> Path:
        """Create root/<domain>/<local>/scripts (mode 0700); the scripts dir."""
        user_dir = self._user_dir(user)
        scripts = user_dir / SCRIPTS_DIR
        # The data directory itself may not exist yet (an admin command before the first start).
        self._root.parent.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
        for path in (self._root, user_dir.parent, user_dir, scripts):
            try:
                os.mkdir(path, DIRECTORY_MODE)
            except FileExistsError:
                pass
            else:
                os.chmod(path, DIRECTORY_MODE)  # whatever the umask
                fsync_directory(path.parent)
        return scripts

    def _names(self, user: str) -> dict[str, str]:
        """{name: file name} of the user's scripts."""
        scripts = self._user_dir(user) / SCRIPTS_DIR
        try:
            entries = os.listdir(scripts)
        except FileNotFoundError:
            return {}
        found = {}
        for entry in entries:
            if not entry.endswith(SUFFIX) or entry.startswith("."):
                continue
            name = _decode_name(entry[: -len(SUFFIX)])
            if name is not None:
                found[name] = entry
        return found

    def _active_name(self, user: str) -> str | None:
        """The name in the `active` file if that script exists, else None."""
        try:
            name = _read_text(self._user_dir(user) / ACTIVE_FILE)
        except (FileNotFoundError, UnicodeDecodeError):
            return None
        try:
            path = self._script_path(user, name)
        except BadNameError:
            return None
        return name if path.is_file() and not path.is_symlink() else None

    # -- queries -------------------------------------------------------------

    def list(self, user: str) -> list[tuple[str, bool]]:
        """[(name, active)] sorted by name (RFC 5804 §2.7 LISTSCRIPTS)."""
        active = self._active_name(user)
        return [(name, name == active) for name in sorted(self._names(user))]

    def get(self, user: str, name: str) -> str:
        """The text of script `name` (RFC 5804 §2.9 GETSCRIPT); KeyError if absent."""
        path = self._script_path(user, name)
        try:
            return _read_text(path)
        except (FileNotFoundError, NotADirectoryError):
            raise KeyError(name) from None

    def have_space(self, user: str, name: str, size: int) -> None:
        """RFC 5804 §2.3 HAVESPACE: QuotaError if `name` of `size` octets would not fit."""
        self._check_name(name)
        if size > self.max_script_size:
            raise QuotaError(
                f"script of {size} octets exceeds the limit of {self.max_script_size}")
        names = self._names(user)
        if name not in names and len(names) >= self.max_scripts:
            raise QuotaError(f"no more than {self.max_scripts} scripts allowed")

    def active(self, user: str) -> tuple[str, str] | None:
        """(name, text) of the active script, None if none is."""
        name = self._active_name(user)
        if name is None:
            return None
        try:
            return name, self.get(user, name)
        except KeyError:
            return None

    def active_path(self, user: str) -> Path | None:
        """The file of the active script, None if none is."""
        name = self._active_name(user)
        return None if name is None else self._script_path(user, name)

    @staticmethod
    def stat_key(path: Path) -> tuple[int, int, int]:
        """(st_mtime_ns, st_size, st_ino): changes whenever the file is replaced."""
        st = os.stat(path, follow_symlinks=False)
        return st.st_mtime_ns, st.st_size, st.st_ino

    # -- changes -------------------------------------------------------------

    def put(self, user: str, name: str, text: str) -> None:
        """Store script `name` (RFC 5804 §2.6 PUTSCRIPT), replacing any of that name."""
        self._check_name(name)
        if not isinstance(text, str):
            raise TypeError("script text must be str")
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:
            raise ScriptStoreError("script is not valid UTF-8") from None
        with self._lock(user):
            self.have_space(user, name, len(data))
            if self._check is not None:
                self._check(text)  # ValueError: nothing written
            scripts = self._ensure_dirs(user)
            _write_atomic(scripts / self._check_name(name), data)

    def set_active(self, user: str, name: str) -> None:
        """RFC 5804 §2.8 SETACTIVE; "" deactivates all scripts."""
        with self._lock(user):
            user_dir = self._user_dir(user)
            if name == "":
                # RFC 5804 §2.8: the empty name deactivates whatever is active.
                try:
                    os.unlink(user_dir / ACTIVE_FILE)
                except FileNotFoundError:
                    return
                fsync_directory(user_dir)
                return
            if name not in self._names(user):
                self._check_name(name)
                raise KeyError(name)
            _write_atomic(user_dir / ACTIVE_FILE, name.encode("utf-8"))

    def delete(self, user: str, name: str) -> None:
        """RFC 5804 §2.10 DELETESCRIPT; ActiveScriptError for the active one."""
        path = self._script_path(user, name)
        with self._lock(user):
            if name not in self._names(user):
                raise KeyError(name)
            # RFC 5804 §2.10: the active script MUST NOT be deleted.
            if self._active_name(user) == name:
                raise ActiveScriptError(f"script {name!r} is active")
            os.unlink(path)
            fsync_directory(path.parent)

    def rename(self, user: str, old: str, new: str) -> None:
        """RFC 5804 §2.11.1 RENAMESCRIPT; the active pointer follows."""
        old_path = self._script_path(user, old)
        new_path = self._script_path(user, new)
        with self._lock(user):
            names = self._names(user)
            if old not in names:
                raise KeyError(old)
            if new in names:
                raise ExistsError(f"script {new!r} exists")
            # link (never replaces), repoint active, unlink: a crash leaves
            # at worst two names for one script, never none.
            try:
                os.link(old_path, new_path, follow_symlinks=False)
            except FileExistsError:
                raise ExistsError(f"script {new!r} exists") from None
            fsync_directory(new_path.parent)
            if self._active_name(user) == old:
                _write_atomic(self._user_dir(user) / ACTIVE_FILE, new.encode("utf-8"))
            os.unlink(old_path)
            fsync_directory(old_path.parent)
