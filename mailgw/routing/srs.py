"""Sender Rewriting Scheme: the envelope sender of mail forwarded elsewhere.

When an alias leads to another domain, mailgw sends the mail on with an
envelope sender in its own `srs_domain`, so the receiver's SPF check sees
our domain, and a bounce comes back to us, who alone can tell where it goes
next. The format is that of Shevek's paper "Sender Rewriting Scheme" and
libsrs2 (also postsrsd, Mail::SRS), so addresses are interchangeable with
theirs given the same secret::

    SRS0=HHHH=TT=orig-domain=orig-local@srs_domain

* HHHH: the first 4 characters of base64(HMAC-SHA1(secret, TT + orig-domain
  + orig-local)), the text ASCII-lower-cased before hashing (as libsrs2),
  and compared without regard to case, since relays may change it.
* TT: the day (days since the epoch) mod 1024, 2 characters of the base32
  alphabet A-Z2-7. An address is valid for `max_age_days` after that day; a
  stamp up to one day in the future is allowed for clocks that differ.
* The separator after the tag is "=" here; "+" and "-" are accepted when
  reversing (libsrs2). The fields after it are always separated by "=".

A sender that is already an SRS address of another domain (a forward of a
forward) becomes SRS1, pointing straight at the first forwarder, so the
address does not grow with every hop::

    SRS0=HHHH=TT=orig-domain=orig-local@first.example            (their sender)
    SRS1=GGGG=first.example==HHHH=TT=orig-domain=orig-local@srs_domain

GGGG hashes "first.example" + "=HHHH=TT=orig-domain=orig-local". An SRS1
sender from elsewhere keeps its first forwarder and gets our hash (Mail::SRS
and postsrsd; the original libsrs2 C code mangles this case). An SRS1 address carries no
timestamp of its own: the first forwarder checks the SRS0 one. Reversing an
SRS1 address of ours gives the SRS0 address at the first forwarder.

A sender in `srs_domain` itself (SRS addresses of ours included) is never
rewritten, as libsrs2 does without `alwaysrewrite`: a bounce to it comes to
us, and the resolver reverses it then, one hop at a time.

Limits, as in libsrs2:

* The local part is 13 + len(domain) + len(local) octets for SRS0; over the
  64 of RFC 5321 §4.5.3.1.1 it is still produced (many MTAs accept longer
  ones), but a receiver may refuse it, and so does mailgw's own SMTP parser
  when a bounce to it comes back.
* The stamp cycles every 1024 days, so an address 1024 + n days old looks n
  days old: the hash, not the stamp, is the protection against forgery.
* The hash compared without case leaves about 38^4 (2 million) values: enough
  to stop casual forgery of bounces, which is all SRS aims at.

A local part that needs quoting (RFC 5321 §4.1.2 Quoted-string) is unquoted
before it goes into the SRS address, and the SRS local part is quoted when
the result is not a Dot-string.

The secret is `<data_dir>/srs.secret` (see `load_secret`): 32 random bytes,
made once, shared by every process of the server.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Callable, Collection
from pathlib import Path

from mailgw.durable import fsync_directory, rename_noreplace

SECRET_FILE = "srs.secret"
SECRET_BYTES = 32
MIN_SECRET_BYTES = 16
# RFC 5321 §4.5.3.1.1: a local part is at most 64 octets.
MAX_LOCAL_PART = 64

_TAGS = ("SRS0", "SRS1")
_SEPARATORS = "=+-"          # after the tag (libsrs2 srs_separators)
_SEP = "="                   # between the fields
_HASH_LENGTH = 4
_BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_DAY = 24 * 60 * 60
_STAMP_SLOTS = 1 << 10       # 2 base32 characters
_FUTURE_SLACK_DAYS = 1

# RFC 5322 §3.2.3 atext, RFC 6531 §3.3 adds UTF-8; RFC 5321 §4.1.2 Dot-string
# and Quoted-string (qtextSMTP / quoted-pairSMTP).
_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~\u0080-\U0010ffff"
_DOT_STRING = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*")
_QUOTED_STRING = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"')
_QUOTED_PAIR = re.compile(r"\\(.)")
# "=" would split the domain field on reversal; the rest is never a domain.
_BAD_DOMAIN = re.compile(r'[\x00-\x20\x7f@="\\]')


class SRSError(ValueError):
    """An address that reverse() will not turn back into a sender.

    `reason` is one of the class constants: NOT_SRS (no SRS0/SRS1 tag),
    MALFORMED (a field missing or ill-formed), BAD_HASH (forged or altered),
    EXPIRED (older than max_age_days), FUTURE (stamped more than a day ahead).
    """

    NOT_SRS = "not-srs"
    MALFORMED = "malformed"
    BAD_HASH = "bad-hash"
    EXPIRED = "expired"
    FUTURE = "future"

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class SecretFileError(ValueError):
    """srs.secret is unreadable, too short, or could not be made."""


class SRS:
    """Forward and reverse SRS addresses in `domain` with `secret`.

    `clock` returns seconds since the epoch (time.time, or the reactor's
    seconds); it is the only source of time here, so tests can fake it.
    """

    def __init__(self, secret: bytes, domain: str, *, clock: Callable[[], float], max_age_days: int = 21):
        if not isinstance(secret, bytes) or len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the SRS secret must be at least {MIN_SECRET_BYTES} bytes")
        if not domain or _BAD_DOMAIN.search(domain):
            raise ValueError(f"invalid SRS domain {domain!r}")
        # Past half the stamp cycle, "expired" and "from the future" overlap.
        if not 1 <= max_age_days < _STAMP_SLOTS // 2:
            raise ValueError(f"max_age_days must be 1-{_STAMP_SLOTS // 2 - 1}, not {max_age_days}")
        self._secret = secret
        self.domain = domain.lower()
        self.max_age_days = max_age_days
        self._clock = clock

    # -- forward ---------------------------------------------------------

    def needs_rewrite(self, sender: str, local_domains: Collection[str]) -> bool:
        """Whether a forward of mail from `sender` needs an SRS sender: not
        for <> (bounces are never rewritten), nor for a sender in one of our
        own domains (our SPF record covers it already). A sender without a
        domain answers True, and forward() then raises ValueError."""
        if sender == "":
            return False
        domain = _split_address(sender)[1].lower()
        if not domain:
            return True
        return domain != self.domain and domain not in {d.lower() for d in local_domains}

    def forward(self, sender: str) -> str:
        """The SRS sender for mail from `sender` forwarded elsewhere.

        "" stays "" (RFC 5321 §4.5.5: the null reverse-path is never
        changed) and a sender in our srs_domain stays as it is (see the
        module docstring). ValueError if `sender` is not local@domain.
        """
        if sender == "":
            return ""
        local_text, domain = _split_address(sender)
        if not local_text or not domain:
            raise ValueError(f"cannot rewrite sender {sender!r}: expected local@domain")
        if _BAD_DOMAIN.search(domain):
            raise ValueError(f"cannot rewrite sender {sender!r}: unusable domain")
        local = _unquote(local_text)
        if local is None:
            raise ValueError(f"cannot rewrite sender {sender!r}: the local part is neither "
                             "a Dot-string nor a Quoted-string (RFC 5321 §4.1.2)")
        _check_utf8(sender)
        if domain.lower() == self.domain:
            return sender
        tag, rest = _tag(local)
        if tag == "SRS1":
            fields = rest.split(_SEP, 2)
            if len(fields) == 3 and all(fields) and not _BAD_DOMAIN.search(fields[1]):
                # Another forwarder's SRS1: keep the first forwarder, our hash.
                _, first_host, first_user = fields
                return self._srs1(first_host, first_user)
        elif tag == "SRS0":
            # Their SRS0 stays whole (separator included); we point to them.
            return self._srs1(domain, local[len("SRS0"):])
        # An ordinary sender; also an SRS1 we cannot parse, which is wrapped
        # whole rather than refused (libsrs2 would fail the forward).
        stamp = self._stamp(self._today())
        return _format(f"SRS0={self._hash(stamp, domain, local)}={stamp}={domain}={local}", self.domain)

    def _srs1(self, first_host: str, first_user: str) -> str:
        return _format(f"SRS1={self._hash(first_host, first_user)}={first_host}={first_user}", self.domain)

    # -- reverse ---------------------------------------------------------

    def is_srs(self, local_part: str) -> bool:
        """Whether `local_part` (or a whole address) carries an SRS0/SRS1 tag
        and separator, in any case. "srs1999" is an ordinary user."""
        local = _unquote(_split_address(local_part)[0]) if isinstance(local_part, str) else None
        return local is not None and _tag(local)[0] is not None

    def reverse(self, address: str) -> str:
        """The address an SRS address of ours stands for: the original
        sender for SRS0, the first forwarder's SRS0 address for SRS1.

        `address` is a local part or local@domain; the domain is not looked
        at (libsrs2): the hash, over everything that matters, proves the
        address ours. Raises SRSError, and only SRSError.
        """
        if not isinstance(address, str):
            raise SRSError(SRSError.NOT_SRS, "not text")
        local = _unquote(_split_address(address)[0])
        if local is None:
            raise SRSError(SRSError.NOT_SRS, "not a local part")
        tag, rest = _tag(local)
        if tag is None:
            raise SRSError(SRSError.NOT_SRS, "no SRS0/SRS1 tag")
        try:
            _check_utf8(local)
        except ValueError:
            raise SRSError(SRSError.MALFORMED, "not UTF-8") from None
        if tag == "SRS1":
            fields = rest.split(_SEP, 2)
            if len(fields) != 3 or not all(fields):
                raise SRSError(SRSError.MALFORMED, "SRS1 needs hash=host=local")
            given, first_host, first_user = fields
            self._check_hash(given, first_host, first_user)
            return f"{_quote('SRS0' + first_user)}@{first_host}"
        fields = rest.split(_SEP, 3)
        if len(fields) != 4 or not all(fields):
            raise SRSError(SRSError.MALFORMED, "SRS0 needs hash=stamp=domain=local")
        given, stamp, orig_domain, orig_local = fields
        day = _decode_stamp(stamp)
        # The hash before the stamp: a forged address is reported as forged,
        # whatever its stamp says (libsrs2 checks the stamp first).
        self._check_hash(given, stamp, orig_domain, orig_local)
        self._check_age(day)
        return f"{_quote(orig_local)}@{orig_domain}"

    # -- pieces ----------------------------------------------------------

    def _today(self) -> int:
        return int(self._clock() // _DAY)

    @staticmethod
    def _stamp(day: int) -> str:
        day %= _STAMP_SLOTS
        return _BASE32[day >> 5] + _BASE32[day & 31]

    def _hash(self, *parts: str) -> str:
        # libsrs2 lower-cases ASCII only (C tolower); bytes.lower() does the same.
        data = "".join(parts).encode("utf-8").lower()
        digest = hmac.new(self._secret, data, hashlib.sha1).digest()
        return base64.b64encode(digest).decode("ascii")[:_HASH_LENGTH]

    def _check_hash(self, given: str, *parts: str) -> None:
        if len(given) != _HASH_LENGTH:
            raise SRSError(SRSError.MALFORMED, f"the hash must be {_HASH_LENGTH} characters")
        expected = self._hash(*parts).lower().encode("ascii")
        # Constant time, so the hash cannot be guessed one character at a time.
        if not hmac.compare_digest(given.encode("utf-8").lower(), expected):
            raise SRSError(SRSError.BAD_HASH, "hash mismatch (forged or altered)")

    def _check_age(self, day: int) -> None:
        age = (self._today() - day) % _STAMP_SLOTS       # modular, as libsrs2
        if age <= self.max_age_days or age >= _STAMP_SLOTS - _FUTURE_SLACK_DAYS:
            return
        if age >= _STAMP_SLOTS // 2:
            raise SRSError(SRSError.FUTURE, f"stamped {_STAMP_SLOTS - age} days in the future")
        raise SRSError(SRSError.EXPIRED, f"{age} days old, valid for {self.max_age_days}")


def _tag(local: str) -> tuple[str | None, str]:
    """("SRS0"|"SRS1", what follows the separator) or (None, local)."""
    tag = local[:4].upper()
    # ASCII only: "\u017f".upper() is "S", and no such spelling is ours.
    if local[:4].isascii() and tag in _TAGS and len(local) > 4 and local[4] in _SEPARATORS:
        return tag, local[5:]
    return None, local


def _decode_stamp(stamp: str) -> int:
    if len(stamp) != 2 or not stamp.isascii():
        raise SRSError(SRSError.MALFORMED, "the timestamp must be 2 base32 characters")
    day = 0
    for char in stamp.upper():      # postsrsd accepts either case, as relays may change it
        index = _BASE32.find(char)
        if index < 0:
            raise SRSError(SRSError.MALFORMED, "bad base32 character in the timestamp")
        day = day << 5 | index
    return day


def _split_address(address: str) -> tuple[str, str]:
    """(local, domain), domain "" when there is none. A domain never holds
    '@' or '"', so the last '@' after the last quote is the one."""
    local, at, domain = address.rpartition("@")
    if not at or '"' in domain:
        return address, ""
    return local, domain


def _unquote(local: str) -> str | None:
    """The local part's text (RFC 5321 §4.1.2): a Dot-string as it is, a
    Quoted-string without its quotes and backslashes; None if neither."""
    if _DOT_STRING.fullmatch(local):
        return local
    if _QUOTED_STRING.fullmatch(local):
        return _QUOTED_PAIR.sub(r"\1", local[1:-1])
    return None


def _quote(text: str) -> str:
    """`text` as a local part: a Dot-string where it is one, else quoted
    (RFC 5321 §4.1.2: a Quoted-string only where needed)."""
    if _DOT_STRING.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _format(local: str, domain: str) -> str:
    return f"{_quote(local)}@{domain}"


def _check_utf8(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{text!r} is not valid UTF-8 text") from None


# -- the secret ----------------------------------------------------------------

# Replaced by tests to simulate another process creating the file first.
_move_noreplace = rename_noreplace


def load_secret(data_dir: Path) -> bytes:
    """The SRS secret in `<data_dir>/srs.secret`, made on first use.

    Every process of the server calls this and must get the same bytes, so
    the file is made whole under a temporary name (O_EXCL, mode 0600,
    fsync) and then given its name without replacing one that exists: of
    processes starting together, the first to name its file wins and the
    others read that one. The directory is fsynced, so a crash cannot lose
    a secret already used in addresses. Raises SecretFileError.
    """
    path = Path(data_dir) / SECRET_FILE
    secret = _read_secret(path)
    if secret is not None:
        return secret
    _create_secret(path)
    secret = _read_secret(path)
    if secret is None:                      # removed again at once: refuse to guess
        raise SecretFileError(f"{path}: vanished right after it was made")
    return secret


def _read_secret(path: Path) -> bytes | None:
    try:
        secret = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise SecretFileError(f"{path}: cannot read the SRS secret: {error.strerror or error}") from error
    if len(secret) < MIN_SECRET_BYTES:
        raise SecretFileError(
            f"{path}: the SRS secret is {len(secret)} bytes, at least {MIN_SECRET_BYTES} are needed; "
            "remove the file to have a new one made (SRS addresses given out so far then stop working)")
    return secret


def _create_secret(path: Path) -> None:
    directory = path.parent
    tmp = directory / f".{SECRET_FILE}.{os.getpid()}.{secrets.token_hex(8)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as error:
        raise SecretFileError(f"{path}: cannot make the SRS secret: {error.strerror or error}") from error
    try:
        try:
            os.fchmod(fd, 0o600)            # whatever the umask
            data = memoryview(secrets.token_bytes(SECRET_BYTES))
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)                    # the data on disk before it has its name
        finally:
            os.close(fd)
        try:
            _move_noreplace(tmp, path)
        except FileExistsError:
            pass                            # another process was first: its secret counts
        fsync_directory(directory)
    except OSError as error:
        raise SecretFileError(f"{path}: cannot make the SRS secret: {error.strerror or error}") from error
    finally:
        # Gone already when it became srs.secret; else a loser's copy. A
        # copy that cannot be removed is harmless, and the secret is there.
        with contextlib.suppress(OSError):
            os.unlink(tmp)


