"""The users file: addresses and their argon2id password hashes.

File format (UTF-8 text, one user per line)::

    # comment lines and blank lines are ignored
    alice@example.test:$argon2id$v=19$m=65536,t=3,p=4$<salt>$<hash>

* The address comes first, then one ``:``, then an argon2id hash in the PHC
  string format written by argon2-cffi (``$argon2id$...``; it contains no ``:``).
* Addresses are lower-case ``local@domain``. The local part may contain only
  ``a-z 0-9 . _ + -``, must not start or end with ``.``, must not contain ``..``
  and is at most 64 octets (RFC 5321 §4.5.3.1.1). The domain is a DNS name
  (labels of ``a-z 0-9 -``, RFC 1035 §2.3.1 / RFC 1123 §2.1), at most 253 octets.
  SECURITY: the local part and the domain become directory names in the mail
  store, so this restriction is what keeps ``../x``, ``a/b`` or ``.`` out of
  paths. Every address that enters the system from this file or from the CLI
  goes through `validate_address`.
* A malformed line is skipped and logged with its line number (never its hash);
  the other lines still load. A duplicate address keeps its first line.
* A missing file means "no users", not an error.

Who writes it: only `mailgw users` (mailgw.auth.admin) through `write_users`,
which replaces the file atomically (temporary file in the same directory, mode
0600, fsync, rename, fsync of the directory). Readers therefore never see a
half-written file and need no lock. Writers serialise their read-modify-write
with an exclusive ``fcntl.flock`` on the sibling ``<users>.lock`` file
(`locked_users_file`), so two CLI invocations cannot lose each other's change.

The server never writes this file: `UserFile` notices a new version by
stat()ing it at most once per ``check_interval`` and reloads it.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from argon2 import PasswordHasher, extract_parameters
from argon2.exceptions import InvalidHashError, VerificationError
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from mailgw.durable import fsync_directory
from mailgw.interfaces import IUserDB

HASH_PREFIX = "$argon2id$"

# RFC 5321 §4.5.3.1.1: local part at most 64 octets.
MAX_LOCAL_PART = 64
# RFC 1035 §2.3.4: 255 octets on the wire = 253 characters in text form; 63 per label.
MAX_DOMAIN = 253
_LOCAL_PART = re.compile(r"[a-z0-9_+-][a-z0-9._+-]*")
_DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")

_log = Logger()


def validate_address(address: str) -> str:
    """Return `address` normalised (stripped, lower-case) or raise ValueError.

    This is a security check, not only a syntax check: the result is used as a
    directory name in the mail store (see the module docstring).
    """
    if not isinstance(address, str):
        raise ValueError("address must be text")
    # Check ASCII before lower(): "\u212a".lower() == "k" would let a
    # non-ASCII spelling silently become another user's address.
    if not address.isascii():
        raise ValueError(
            f"invalid address {address!r}: only ASCII is allowed "
            "(write international domains in their xn-- form)")
    normalised = address.strip().lower()
    local, at, domain = normalised.rpartition("@")
    if not at or not local or not domain:
        raise ValueError(f"invalid address {address!r}: expected local@domain")
    if "@" in local:
        raise ValueError(f"invalid address {address!r}: more than one '@'")
    if len(local) > MAX_LOCAL_PART:
        raise ValueError(
            f"invalid address {address!r}: local part longer than {MAX_LOCAL_PART} octets")
    if not _LOCAL_PART.fullmatch(local):
        raise ValueError(
            f"invalid address {address!r}: the local part may contain only "
            "a-z 0-9 . _ + - and must not start with '.'")
    if ".." in local or local.endswith("."):
        raise ValueError(
            f"invalid address {address!r}: the local part must not contain '..' or end with '.'")
    if len(domain) > MAX_DOMAIN or not all(
            _DNS_LABEL.fullmatch(label) for label in domain.split(".")):
        raise ValueError(
            f"invalid address {address!r}: the domain must be a DNS name "
            "(labels of a-z 0-9 -, separated by single dots)")
    return normalised


def _check_hash(password_hash: str) -> None:
    """Raise ValueError unless `password_hash` is a well-formed argon2id hash."""
    if not password_hash.startswith(HASH_PREFIX):
        raise ValueError("not an argon2id hash")
    if any(ch.isspace() or ch == ":" for ch in password_hash):
        raise ValueError("hash contains whitespace or ':'")
    try:
        extract_parameters(password_hash)
    except (InvalidHashError, ValueError):
        raise ValueError("malformed argon2id hash") from None


def parse_users(data: bytes) -> tuple[dict[str, str], list[tuple[int, str]]]:
    """Parse the users file's bytes.

    Returns ``(users, problems)``: ``users`` maps address -> hash; ``problems``
    lists ``(line_number, reason)`` for each skipped line. Reasons never
    contain the hash.
    """
    users: dict[str, str] = {}
    problems: list[tuple[int, str]] = []
    # Decode per line so that one bad byte costs one user, not all of them.
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            problems.append((number, "not valid UTF-8"))
            continue
        if not line or line.startswith("#"):
            continue
        address, colon, password_hash = line.partition(":")
        if not colon:
            problems.append((number, "expected address:hash"))
            continue
        try:
            address = validate_address(address)
        except ValueError as e:
            problems.append((number, str(e)))
            continue
        try:
            _check_hash(password_hash.strip())
        except ValueError as e:
            problems.append((number, f"{address}: {e}"))
            continue
        if address in users:
            problems.append((number, f"{address}: duplicate, the first line wins"))
            continue
        users[address] = password_hash.strip()
    return users, problems


def read_users(path: Path) -> tuple[dict[str, str], list[tuple[int, str]]]:
    """`parse_users` on the file at `path`; a missing file is empty."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return {}, []
    return parse_users(data)


def _default_hasher() -> PasswordHasher:
    # argon2id with argon2-cffi's defaults (RFC 9106 "low memory" profile).
    return PasswordHasher()


def hash_password(password: str, hasher: PasswordHasher | None = None) -> str:
    """Hash `password` with argon2id. Blocking and CPU-heavy: not on the reactor."""
    return (hasher or _default_hasher()).hash(password)


def _lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def _owner_for(path: Path) -> tuple[int, int] | None:
    """The uid/gid a new version of `path` should have: the current file's,
    else its directory's. Only root can (and needs to) change it: without this,
    `sudo mailgw users add` would leave a root-owned 0600 file the server
    (running as an unprivileged user) cannot read."""
    if os.geteuid() != 0:
        return None
    for candidate in (path, path.parent):
        try:
            st = os.stat(candidate)
        except FileNotFoundError:
            continue
        return st.st_uid, st.st_gid
    return None


@contextlib.contextmanager
def locked_users_file(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``<path>.lock`` for a read-modify-write
    (of the users file, or of another table written with `replace_file`).

    Readers don't need it (writes are atomic renames); only writers take it.
    """
    path = Path(path)
    fd = os.open(_lock_path(path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        owner = _owner_for(path)
        if owner is not None:
            os.fchown(fd, *owner)
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def format_users(mapping: Mapping[str, str]) -> bytes:
    """The file content for `mapping`, validated, sorted by address."""
    lines = [
        "# mailgw users: address:argon2id-hash, one per line.",
        "# Written by `mailgw users`; edits by hand are fine, comments are not kept.",
    ]
    for address in sorted(mapping):
        if validate_address(address) != address:
            raise ValueError(f"address {address!r} is not normalised")
        _check_hash(mapping[address])
        lines.append(f"{address}:{mapping[address]}")
    return ("\n".join(lines) + "\n").encode("utf-8")


def write_users(path: Path, mapping: Mapping[str, str]) -> None:
    """Atomically replace the users file with `mapping` (address -> hash).

    tmp file in the same directory (mode 0600) -> write -> fsync -> rename ->
    fsync the directory: after a crash the file is either the old or the new
    version, never a mix. Callers doing read-modify-write hold
    `locked_users_file(path)` around it.
    """
    replace_file(path, format_users(mapping))


def replace_file(path: Path, data: bytes) -> None:
    """Atomically replace `path` with `data` (mode 0600, owned like the file or
    its directory when run as root): the users file's write, also used for
    the alias and quota tables."""
    path = Path(path)
    owner = _owner_for(path)
    # mkstemp creates the file with mode 0600.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as tmp:
            os.fchmod(tmp.fileno(), 0o600)
            if owner is not None:
                os.fchown(tmp.fileno(), *owner)
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    fsync_directory(path.parent)


# Stands for "never loaded", distinct from None ("file missing").
_NOT_LOADED = object()


def _file_key(st: os.stat_result) -> tuple[int, int, int]:
    """Changes whenever the file does: an atomic rename gives a new inode, an
    edit in place a new mtime or size."""
    return st.st_mtime_ns, st.st_size, st.st_ino


@implementer(IUserDB)
class UserFile:
    """The users file, kept in memory and reloaded when it changes on disk.

    `reactor` must provide IReactorTime (``seconds``) and IReactorFromThreads
    (``callFromThread``, for `deferToThreadPool`). `threadpool` runs every
    argon2 computation, so the reactor thread never spends ~50 ms hashing.
    Reloading (a read of a small file, only after it changed) stays on the
    caller's thread so that `exists` can answer synchronously.

    `generation` increases on every (re)load; caches derived from this
    database (the checker's auth cache) compare it to know when to drop.
    """

    log = _log

    def __init__(self, path: Path, *, threadpool, reactor,
                 hasher: PasswordHasher | None = None, check_interval: float = 1.0):
        self.path = Path(path)
        self._threadpool = threadpool
        self._reactor = reactor
        self._hasher = hasher or _default_hasher()
        self._check_interval = check_interval
        self._users: dict[str, str] = {}
        self._file_key: object = _NOT_LOADED
        self._last_check: float | None = None
        self._last_error: str | None = None
        self._dummy_hash: str | None = None
        self.generation = 0
        self._refresh()

    # IUserDB

    def exists(self, address: str) -> bool:
        self._refresh()
        return address in self._users

    def addresses(self) -> list[str]:
        self._refresh()
        return sorted(self._users)

    def verify(self, address: str, password: str):
        self._refresh()
        stored = self._users.get(address)
        d = deferToThreadPool(self._reactor, self._threadpool,
                              self._password_matches, stored, password)
        d.addCallback(lambda matches: address if matches else None)
        return d

    # internals

    def _password_matches(self, stored_hash: str | None, password: str) -> bool:
        """Runs in the thread pool."""
        if stored_hash is None:
            # Unknown user: spend the same argon2 work as for a known one, so
            # the answer's timing doesn't tell which addresses exist.
            with contextlib.suppress(VerificationError):
                self._hasher.verify(self._get_dummy_hash(), password)
            return False
        try:
            self._hasher.verify(stored_hash, password)
        except (VerificationError, InvalidHashError):  # VerifyMismatchError included
            return False
        # A True check_needs_rehash(stored_hash) is deliberately ignored: only
        # the CLI writes the users file; `mailgw users passwd` rehashes.
        return True

    def _get_dummy_hash(self) -> str:
        # Computed lazily in the pool (never on the reactor) with the same
        # parameters as new hashes; a race only computes it twice.
        if self._dummy_hash is None:
            self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(24))
        return self._dummy_hash

    def refresh_now(self) -> None:
        """Look at the file now (a reload), not at the next check_interval."""
        self._last_check = None
        self._refresh()

    def _refresh(self) -> None:
        """Reload the file if it changed; stat at most once per check_interval."""
        now = self._reactor.seconds()
        if self._last_check is not None and now - self._last_check < self._check_interval:
            return
        self._last_check = now
        try:
            # A cheap stat first: the file rarely changes.
            if _file_key(os.stat(self.path)) == self._file_key:
                return
            with open(self.path, "rb") as f:
                # The key of the descriptor we read, so key and content match
                # even if the file is replaced between stat and open.
                key = _file_key(os.fstat(f.fileno()))
                data = f.read()
        except FileNotFoundError:
            if self._file_key is None:
                return
            self.log.info("users file {path} does not exist: no users", path=str(self.path))
            self._install({}, None)
            return
        except OSError as e:
            # Keep serving the users we have; report each distinct error once.
            message = f"{type(e).__name__}: {e.strerror}"
            if message != self._last_error:
                self.log.error("cannot read users file {path}: {error}; keeping the "
                               "previous users", path=str(self.path), error=message)
                self._last_error = message
            return
        users, problems = parse_users(data)
        for line, reason in problems:
            self.log.warn("users file {path} line {line} skipped: {reason}",
                          path=str(self.path), line=line, reason=reason)
        self.log.info("loaded {count} users from {path}", count=len(users), path=str(self.path))
        self._install(users, key)

    def _install(self, users: dict[str, str], key: object) -> None:
        self._users = users
        self._file_key = key
        self._last_error = None
        self.generation += 1
