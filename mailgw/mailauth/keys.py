"""The DKIM key store: private keys on disk, which of them sign, and the DNS
records to publish (RFC 6376 §3.6, RFC 8463 §4).

Layout (docs/dkim.md)::

    <directory>/                          mode 0700
        <domain>/                         mode 0700, lower case, IDNA A-label
            <selector>.rsa.pem            PKCS#8 PEM private key, mode 0600
            <selector>.ed25519.pem
            active                        JSON {"version": 1, "active": {"rsa": SELECTOR, "ed25519": null}}
                                          (null: that algorithm's keys are all published-only)

Every file is written atomically (temporary file, fsync, rename, fsync of
the directory), so a crash leaves either the old file or the new one.

Activation and rotation:

- The first key of an algorithm for a domain signs at once: a domain that
  has a key is signed without further configuration.
- A later `keygen` for the same domain and algorithm makes a key that is
  *published but not signing*: the admin publishes its TXT record, waits
  until DNS serves it, then `mailgw dkim activate DOMAIN SELECTOR` makes it
  the signing key of that algorithm. The old key stays on disk, published,
  so mail signed with it and still in flight keeps verifying, until
  `mailgw dkim remove DOMAIN SELECTOR`.
- Removing the active key of an algorithm is refused unless forced (the
  domain would silently stop being signed with that algorithm).
- At most one key per algorithm signs: RSA (rsa-sha256, what every verifier
  knows) and Ed25519 (ed25519-sha256; RFC 8463 §6 suggests signing with
  both while verifiers catch up).
- An algorithm the `active` file does not mention (keys copied in by hand,
  no active file at all) signs with its key when it has exactly one; with
  several, none signs until one is activated. An active key whose file is
  gone is never replaced by a guess: that algorithm stops signing, and
  `problems` says so.

The store keeps an immutable snapshot of the keys; `reload()` builds a new
one and swaps it in with one assignment, so signer threads read it without a
lock. Problems found while loading (an unreadable file, a bad PEM) are kept
in `problems` and the rest of the store still works.
"""
from __future__ import annotations

import base64
import contextlib
import datetime
import fcntl
import json
import os
import re
import tempfile
import threading
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mailgw.durable import fsync_directory

ALGORITHMS = ("rsa", "ed25519")                 # signing order: RSA first, then Ed25519
SELECTOR_PREFIX = {"rsa": "rsa", "ed25519": "ed"}
# RFC 8301 §3.2: signers MUST use RSA keys of at least 1024 bits, SHOULD use 2048;
# verifiers need only accept up to 4096 (and longer keys hardly fit in DNS).
MIN_RSA_BITS, DEFAULT_RSA_BITS, MAX_RSA_BITS = 1024, 2048, 4096
FILE_MODE, DIRECTORY_MODE = 0o600, 0o700
ACTIVE_FILE = "active"
ACTIVE_FORMAT_VERSION = 1
# RFC 1035 §3.3.14: one TXT character-string holds at most 255 octets.
TXT_STRING_LIMIT = 255

# RFC 6376 §3.1: selector = sub-domain *( "." sub-domain ); we keep to LDH labels.
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_SELECTOR_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


class KeyStoreError(Exception):
    """The request cannot be done; the message says why."""


def normalize_domain(text: str) -> str:
    """The domain as stored and compared: lower case, no trailing dot, IDNA
    A-label for a non-ASCII name (RFC 5890). ValueError when it is not a
    host name."""
    name = text.strip().rstrip(".")
    if not name:
        raise ValueError("empty domain")
    try:
        name = name.encode("idna").decode("ascii") if not name.isascii() else name
    except UnicodeError:
        raise ValueError(f"{text!r} is not a valid domain name") from None
    name = name.lower()
    labels = name.split(".")
    if len(name) > 253 or len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        raise ValueError(f"{text!r} is not a valid domain name")
    return name


def normalize_selector(text: str) -> str:
    # DNS names are case-insensitive: one spelling per selector on disk.
    selector = text.strip().lower()
    labels = selector.split(".")
    if not selector or len(selector) > 63 or not all(_SELECTOR_LABEL.match(label) for label in labels):
        raise ValueError(f"{text!r} is not a valid selector (letters, digits, '-', dot-separated labels)")
    return selector


def default_selector(algorithm: str, when: datetime.datetime) -> str:
    """"rsa202612" / "ed202612": the algorithm and the month, so selectors sort
    by age and say which key a signature used."""
    return f"{SELECTOR_PREFIX[algorithm]}{when.year:04d}{when.month:02d}"


def public_key_b64(private_key) -> str:
    """The p= value: RFC 6376 §3.6.1 base64 of the DER SubjectPublicKeyInfo for
    RSA; RFC 8463 §4.2 base64 of the raw 32-byte public key for Ed25519."""
    public = private_key.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        raw = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(raw).decode("ascii")


def algorithm_of(private_key) -> str:
    if isinstance(private_key, rsa.RSAPrivateKey):
        return "rsa"
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    raise ValueError(f"unsupported key type {type(private_key).__name__} (rsa or ed25519)")


def txt_strings(record: str) -> list[str]:
    """The record as TXT character-strings of at most 255 octets. Verifiers
    join them without spaces (RFC 6376 §3.6.2.2), so the cut can fall
    anywhere; the tags before p= go in the first string, for readability."""
    head, marker, key = record.partition("p=")
    strings = [head] if head else []
    tail = marker + key
    strings += [tail[i:i + TXT_STRING_LIMIT] for i in range(0, len(tail), TXT_STRING_LIMIT)]
    return strings


@dataclass(frozen=True)
class DKIMKey:
    domain: str
    selector: str
    algorithm: str                       # "rsa" | "ed25519"
    path: str
    active: bool
    private_key: object = field(repr=False, compare=False)

    @property
    def dns_name(self) -> str:
        # RFC 6376 §3.6.2.1: the key record lives at selector._domainkey.domain.
        return f"{self.selector}._domainkey.{self.domain}"

    @property
    def public_key_b64(self) -> str:
        return public_key_b64(self.private_key)

    @property
    def dns_record(self) -> str:
        # RFC 6376 §3.6.1: v= first when present; k= names the key type (RFC 8463 §4.2: ed25519).
        return f"v=DKIM1; k={self.algorithm}; p={self.public_key_b64}"

    @property
    def bits(self) -> int | None:
        return self.private_key.key_size if self.algorithm == "rsa" else None

    @property
    def zone_record(self) -> str:
        """The record in zone-file form, split into character-strings."""
        strings = " ".join(f'"{s}"' for s in txt_strings(self.dns_record))
        return f"{self.dns_name}. IN TXT ( {strings} )"


# -- files -------------------------------------------------------------------------

def _owner_for(path: str) -> tuple[int, int] | None:
    """The uid/gid new files under `path` should have when root writes them:
    the nearest existing directory's, so `sudo mailgw dkim keygen` leaves files
    the server (running as config.user) can read."""
    if os.geteuid() != 0:
        return None
    candidate = os.path.abspath(path)
    while True:
        try:
            st = os.stat(candidate)
            return st.st_uid, st.st_gid
        except FileNotFoundError:
            parent = os.path.dirname(candidate)
            if parent == candidate:
                return None
            candidate = parent


def _make_directory(path: str, owner) -> None:
    if os.path.isdir(path):
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        os.mkdir(path, DIRECTORY_MODE)
    except FileExistsError:
        return
    os.chmod(path, DIRECTORY_MODE)           # mkdir's mode is masked by the umask
    if owner is not None:
        os.chown(path, *owner)
    fsync_directory(os.path.dirname(os.path.abspath(path)))


def write_file_atomically(path: str, data: bytes, *, replace: bool, owner=None) -> None:
    """tmp file (0600) -> write -> fsync -> rename -> fsync directory. With
    replace=False an existing file is never overwritten (FileExistsError):
    link() refuses an existing name where rename() would not."""
    directory = os.path.dirname(path)
    fd, tmp_path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as tmp:
            os.fchmod(tmp.fileno(), FILE_MODE)
            if owner is not None:
                os.fchown(tmp.fileno(), *owner)
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        if replace:
            os.replace(tmp_path, path)
        else:
            os.link(tmp_path, path)
            os.unlink(tmp_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_path)
        raise
    fsync_directory(directory)


def _key_file_name(selector: str, algorithm: str) -> str:
    return f"{selector}.{algorithm}.pem"


def _parse_key_file_name(name: str) -> tuple[str, str] | None:
    for algorithm in ALGORITHMS:
        suffix = f".{algorithm}.pem"
        if name.endswith(suffix) and len(name) > len(suffix) and not name.startswith("."):
            return name[:-len(suffix)], algorithm
    return None


def _read_active(path: str, problems: list[str]) -> dict[str, str | None] | None:
    """{algorithm: selector, or None for "none of its keys signs"}, or None
    when there is no (usable) active file."""
    try:
        with open(path, "rb") as file:
            data = json.loads(file.read().decode("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        problems.append(f"{path}: unreadable ({error}); treated as absent")
        return None
    if not isinstance(data, dict) or data.get("version") != ACTIVE_FORMAT_VERSION \
            or not isinstance(data.get("active"), dict):
        problems.append(f"{path}: not a version {ACTIVE_FORMAT_VERSION} active file; treated as absent")
        return None
    return {alg: sel for alg, sel in data["active"].items()
            if alg in ALGORITHMS and (sel is None or isinstance(sel, str))}


def _load_private_key(path: str, algorithm: str):
    with open(path, "rb") as file:
        data = file.read()
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (TypeError, ValueError) as error:
        raise ValueError(f"not an unencrypted PEM private key ({error})") from None
    found = algorithm_of(key)
    if found != algorithm:
        raise ValueError(f"holds a {found} key, the name says {algorithm}")
    if algorithm == "rsa" and key.key_size < MIN_RSA_BITS:
        # RFC 8301 §3.2: keys under 1024 bits MUST NOT be used for signing.
        raise ValueError(f"{key.key_size}-bit RSA key is below {MIN_RSA_BITS} bits (RFC 8301 §3.2)")
    return key


def _signing_state(keys) -> dict[str, str | None]:
    """What the active file records: for each algorithm that has keys, the
    selector that signs, or None when none does."""
    state: dict[str, str | None] = {}
    for key in keys:
        if key.active or key.algorithm not in state:
            state[key.algorithm] = key.selector if key.active else state.get(key.algorithm)
    return state


# -- the store ------------------------------------------------------------------------

class DKIMKeyStore:
    """The keys under `directory` (see the module docstring). `clock` (an
    object with seconds(), e.g. the reactor) dates default selectors."""

    def __init__(self, directory, *, clock=None):
        self.directory = os.fspath(directory)
        self._clock = clock
        self._keys: dict[str, tuple[DKIMKey, ...]] = {}     # domain -> keys, sorted; replaced, never changed
        self.problems: list[str] = []
        self._change_key: object = None
        self._reload_lock = threading.Lock()
        self.load()

    # -- reading ----------------------------------------------------------
    def load(self) -> None:
        self.reload()

    def reload(self) -> None:
        """Re-read the directory and swap in the new snapshot."""
        with self._reload_lock:
            change_key = self._directory_change_key()
            keys, problems = self._read_all()
            self._keys, self.problems, self._change_key = keys, problems, change_key

    def reload_if_changed(self) -> bool:
        """Reload when a key or active file was added, removed or replaced
        since the last load (every such change is a rename or unlink in a
        domain directory, so the directories' mtimes tell). A few stat()s."""
        if self._directory_change_key() == self._change_key:
            return False
        self.reload()
        return True

    def _domain_directories(self) -> list[str]:
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return []
        return [n for n in names if not n.startswith(".") and os.path.isdir(os.path.join(self.directory, n))]

    def _directory_change_key(self):
        parts = []
        for path in [self.directory] + [os.path.join(self.directory, d) for d in self._domain_directories()]:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            parts.append((path, st.st_mtime_ns, st.st_ino))
        return tuple(parts)

    def _read_all(self) -> tuple[dict[str, tuple[DKIMKey, ...]], list[str]]:
        problems: list[str] = []
        keys: dict[str, tuple[DKIMKey, ...]] = {}
        try:
            domains = self._domain_directories()
        except OSError as error:
            return {}, [f"{self.directory}: cannot list ({error.strerror})"]
        for name in domains:
            try:
                domain = normalize_domain(name)
            except ValueError:
                problems.append(f"{os.path.join(self.directory, name)}: not a domain name; ignored")
                continue
            if domain != name:
                problems.append(f"{os.path.join(self.directory, name)}: domain directories are lower-case "
                                f"A-labels ({domain}); ignored")
                continue
            found = self._read_domain(domain, problems)
            if found:
                keys[domain] = found
        return keys, problems

    def _read_domain(self, domain: str, problems: list[str]) -> tuple[DKIMKey, ...]:
        directory = os.path.join(self.directory, domain)
        loaded: list[tuple[str, str, str, object]] = []
        try:
            names = sorted(os.listdir(directory))
        except OSError as error:
            problems.append(f"{directory}: cannot list ({error.strerror})")
            return ()
        for name in names:
            parsed = _parse_key_file_name(name)
            if parsed is None:
                continue
            selector, algorithm = parsed
            path = os.path.join(directory, name)
            try:
                selector = normalize_selector(selector)
                key = _load_private_key(path, algorithm)
                mode = os.stat(path).st_mode & 0o777
            except (OSError, ValueError) as error:
                problems.append(f"{path}: {getattr(error, 'strerror', None) or error}; not used")
                continue
            if mode & 0o077:
                problems.append(f"{path}: mode {mode:04o}, others can read the private key (chmod 600)")
            loaded.append((selector, algorithm, path, key))
        active = _read_active(os.path.join(directory, ACTIVE_FILE), problems)
        signing: dict[str, str] = {}
        for algorithm in ALGORITHMS:
            selectors = [sel for sel, alg, _, _ in loaded if alg == algorithm]
            if active is not None and algorithm in active:
                if active[algorithm] is None:
                    pass                                # recorded: none of them signs (a forced remove)
                elif active[algorithm] in selectors:
                    signing[algorithm] = active[algorithm]
                else:
                    # Never guess another key: it may not be in DNS yet.
                    problems.append(f"{domain}: the active {algorithm} key {active[algorithm]} is missing; "
                                    f"not signing with {algorithm} (mailgw dkim activate {domain} SELECTOR)")
            elif len(selectors) == 1:
                signing[algorithm] = selectors[0]
            elif selectors:
                problems.append(f"{domain}: {len(selectors)} {algorithm} keys and none active; not signing "
                                f"with {algorithm} (mailgw dkim activate {domain} SELECTOR)")
        return tuple(sorted(
            (DKIMKey(domain, sel, alg, path, signing.get(alg) == sel, key) for sel, alg, path, key in loaded),
            key=lambda k: (k.selector, k.algorithm)))

    def keys(self, domain: str | None = None) -> list[DKIMKey]:
        """Every key, sorted by domain then selector; or one domain's."""
        snapshot = self._keys
        if domain is not None:
            try:
                return list(snapshot.get(normalize_domain(domain), ()))
            except ValueError:
                return []
        return [key for name in sorted(snapshot) for key in snapshot[name]]

    def signing_keys(self, domain: str) -> list[DKIMKey]:
        """The active keys of `domain`, at most one per algorithm, RSA first."""
        active = [key for key in self.keys(domain) if key.active]
        return sorted(active, key=lambda k: ALGORITHMS.index(k.algorithm))

    def get(self, domain: str, selector: str) -> DKIMKey:
        domain, selector = self._names(domain, selector)
        for key in self.keys(domain):
            if key.selector == selector:
                return key
        raise KeyStoreError(f"{domain} has no key with selector {selector}")

    # -- changing ---------------------------------------------------------
    def keygen(self, domain: str, selector: str | None = None, algorithm: str = "rsa",
               bits: int = DEFAULT_RSA_BITS, *, now: datetime.datetime | float | None = None) -> DKIMKey:
        """Make, store and return a new key (see the module docstring for
        whether it signs at once)."""
        if algorithm not in ALGORITHMS:
            raise KeyStoreError(f"unknown algorithm {algorithm!r} (rsa or ed25519)")
        domain = self._domain(domain)
        if selector is None:
            selector = default_selector(algorithm, self._now(now))
        selector = self._selector(selector)
        if algorithm == "rsa":
            if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
                raise KeyStoreError(f"RSA keys have {MIN_RSA_BITS} to {MAX_RSA_BITS} bits (RFC 8301 §3.2), "
                                    f"not {bits}")
            private_key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        else:
            private_key = ed25519.Ed25519PrivateKey.generate()
        pem = private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
        directory = os.path.join(self.directory, domain)
        with self._locked():
            self.reload()
            existing = self.keys(domain)
            taken = next((k for k in existing if k.selector == selector), None)
            if taken is not None:
                # One selector, one DNS name: refuse even for the other algorithm.
                raise KeyStoreError(f"{domain} already has the {taken.algorithm} key {selector} ({taken.path}); "
                                    f"choose another selector")
            owner = _owner_for(self.directory)
            _make_directory(self.directory, owner)
            _make_directory(directory, owner)
            path = os.path.join(directory, _key_file_name(selector, algorithm))
            try:
                write_file_atomically(path, pem, replace=False, owner=owner)
            except FileExistsError:
                raise KeyStoreError(f"{path} exists; choose another selector") from None
            state = _signing_state(existing)
            if algorithm not in state:
                state[algorithm] = selector             # the first key of its algorithm signs at once
            self._write_active(domain, state, owner)
            self.reload()
        return self.get(domain, selector)

    def activate(self, domain: str, selector: str) -> DKIMKey | None:
        """Make the key the signing key of its algorithm; returns the key it
        replaces (None if none), which stays on disk and published."""
        domain, selector = self._names(domain, selector)
        with self._locked():
            self.reload()
            key = self.get(domain, selector)
            previous = next((k for k in self.keys(domain) if k.active and k.algorithm == key.algorithm), None)
            state = _signing_state(self.keys(domain))
            state[key.algorithm] = selector
            self._write_active(domain, state, _owner_for(self.directory))
            self.reload()
        return None if previous is None or previous.selector == selector else previous

    def remove(self, domain: str, selector: str, *, force: bool = False) -> DKIMKey:
        """Delete the key's file; the active key of its algorithm only with
        force (then that algorithm stops signing for the domain)."""
        domain, selector = self._names(domain, selector)
        with self._locked():
            self.reload()
            key = self.get(domain, selector)
            if key.active and not force:
                raise KeyStoreError(
                    f"{selector} is the active {key.algorithm} key of {domain}: activate another "
                    f"{key.algorithm} key first, or use --force (mail from {domain} is then not signed "
                    f"with {key.algorithm})")
            directory = os.path.join(self.directory, domain)
            remaining = [k for k in self.keys(domain) if k.selector != selector]
            if remaining:
                # After a forced remove the algorithm's other keys are recorded as not
                # signing: one may not be in DNS yet, so none is promoted by default.
                self._write_active(domain, _signing_state(remaining), _owner_for(self.directory))
            os.unlink(key.path)
            if not remaining:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(directory, ACTIVE_FILE))
                with contextlib.suppress(OSError):
                    os.rmdir(directory)
            else:
                fsync_directory(directory)
            self.reload()
        return key

    # -- helpers ------------------------------------------------------------
    def _write_active(self, domain: str, active: dict[str, str | None], owner) -> None:
        data = json.dumps({"version": ACTIVE_FORMAT_VERSION,
                           "active": {alg: active[alg] for alg in ALGORITHMS if alg in active}},
                          indent=1) + "\n"
        write_file_atomically(os.path.join(self.directory, domain, ACTIVE_FILE), data.encode("utf-8"),
                              replace=True, owner=owner)

    @contextlib.contextmanager
    def _locked(self):
        """One admin change at a time (an flock on <directory>/.lock): each is
        a read-modify-write of a domain's files."""
        owner = _owner_for(self.directory)
        _make_directory(self.directory, owner)
        fd = os.open(os.path.join(self.directory, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _now(self, now) -> datetime.datetime:
        if isinstance(now, datetime.datetime):
            return now.astimezone(datetime.timezone.utc) if now.tzinfo else now
        if now is None:
            now = self._clock.seconds() if self._clock is not None else None
        if now is None:
            return datetime.datetime.now(datetime.timezone.utc)
        return datetime.datetime.fromtimestamp(now, datetime.timezone.utc)

    @staticmethod
    def _domain(domain: str) -> str:
        try:
            return normalize_domain(domain)
        except ValueError as error:
            raise KeyStoreError(str(error)) from None

    @staticmethod
    def _selector(selector: str) -> str:
        try:
            return normalize_selector(selector)
        except ValueError as error:
            raise KeyStoreError(str(error)) from None

    def _names(self, domain: str, selector: str) -> tuple[str, str]:
        return self._domain(domain), self._selector(selector)
