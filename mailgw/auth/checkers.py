"""The twisted.cred checker for passwords: IUsernamePassword against an IUserDB.

Only IUsernamePassword (SASL PLAIN, LOGIN, POP3 USER/PASS, IMAP LOGIN): we keep
argon2id hashes, so challenge-response mechanisms that need the plaintext
secret (CRAM-MD5, APOP) cannot be offered.

The client's address. cred's Portal calls ``checker.requestAvatarId(credentials)``
and nothing else, so the protocols (SMTP, POP3, IMAP) set an attribute on the
credentials object before ``portal.login``::

    credentials.client_ip = session.client_ip   # ipaddress object or str
    portal.login(credentials, mind, interface)

Without it the client is "unknown", and all such clients share one throttling
bucket: protocols must set it.

Throttling. A failed login is answered only after a delay that doubles with
each consecutive failure from the same client (`failure_delay` * 2**(n-1),
at most `max_delay`), and further attempts from that client wait until the
previous delay has run out, so parallel connections gain nothing. A success
resets the client's counter. A per-user counter grows the same way and slows
answers to failures against that user from anywhere (a distributed guesser),
but a correct password from a client without recent failures is never delayed
by it: a legitimate user is not locked out by someone else's guessing.
After `lockout_failures` consecutive failures from one client (0: never),
every login from that client fails at once with LoginsRefused (a temporary
error; the password is not even checked) for `lockout_time` seconds: the
guesser stops costing argon2 time, and users elsewhere are unaffected. IPv6
clients are counted per /64, the block one subscriber usually has. Both
tables are bounded (`max_entries`) and forget a key `failure_expiry` seconds
after its last failure.

Auth cache (like Dovecot's auth_cache). Mail clients reconnect constantly and
each argon2 verification costs ~50 ms of CPU, so after a successful one we
remember HMAC-SHA256(random per-process key, address NUL password) -> address
for `cache_ttl` seconds (0 disables). Failures are never cached. The whole
cache is dropped when the user database reloads (its `generation` changes),
so a changed or deleted password stops working at once.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from collections import OrderedDict
from dataclasses import dataclass

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.internet.task import deferLater
from twisted.logger import Logger
from zope.interface import implementer

from mailgw import metrics as metrics_module
from mailgw.errors import LoginsRefused

UNKNOWN_CLIENT = "unknown"
DEFAULT_MAX_ENTRIES = 10_000
DEFAULT_FAILURE_EXPIRY = 15 * 60.0
# Usernames are logged; cap what a client can put into one log line.
MAX_LOGGED_USERNAME = 100

_log = Logger()


@dataclass
class _Failures:
    count: int
    last_failure: float
    blocked_until: float


class FailureTable:
    """Consecutive failures per key (client or user), bounded and expiring.

    Entries are kept in order of their last failure (re-inserted on update), so
    the oldest and the expired ones are at the front.
    """

    def __init__(self, *, failure_delay: float, max_delay: float,
                 expiry: float = DEFAULT_FAILURE_EXPIRY, max_entries: int = DEFAULT_MAX_ENTRIES):
        self.failure_delay = failure_delay
        self.max_delay = max_delay
        self.expiry = expiry
        self.max_entries = max_entries
        self._entries: OrderedDict[str, _Failures] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def delay(self, count: int) -> float:
        """The delay after the `count`-th consecutive failure."""
        # Cap the exponent: 2**1100 as float overflows, and max_delay wins long before.
        return min(self.failure_delay * 2.0 ** min(count - 1, 64), self.max_delay)

    def _get(self, key: str, now: float) -> _Failures | None:
        entry = self._entries.get(key)
        if entry is not None and now - entry.last_failure >= self.expiry:
            del self._entries[key]
            return None
        return entry

    def count(self, key: str, now: float) -> int:
        entry = self._get(key, now)
        return entry.count if entry else 0

    def wait(self, key: str, now: float) -> float:
        """Seconds an attempt for `key` must still wait (0 if none)."""
        entry = self._get(key, now)
        return max(0.0, entry.blocked_until - now) if entry else 0.0

    def record_failure(self, key: str, now: float) -> float:
        """Count a failure; return the time until which `key` is slowed down."""
        entry = self._get(key, now)
        if entry is None:
            self._make_room(now)
            entry = _Failures(count=0, last_failure=now, blocked_until=now)
        else:
            del self._entries[key]  # re-inserted at the end: newest last
        entry.count += 1
        entry.last_failure = now
        # Delays queue up behind each other (parallel attempts gain nothing),
        # but nobody waits more than max_delay from now.
        start = max(now, entry.blocked_until)
        entry.blocked_until = min(start + self.delay(entry.count), now + self.max_delay)
        self._entries[key] = entry
        return entry.blocked_until

    def reset(self, key: str) -> None:
        self._entries.pop(key, None)

    def _make_room(self, now: float) -> None:
        while self._entries:
            oldest = next(iter(self._entries.values()))
            if now - oldest.last_failure < self.expiry and len(self._entries) < self.max_entries:
                break
            self._entries.popitem(last=False)


def _client_label(credentials) -> str:
    """The client's address as text for logs, from `credentials.client_ip`."""
    client = getattr(credentials, "client_ip", None)
    if client is None:
        return UNKNOWN_CLIENT
    # Also accept a Twisted IAddress (IPv4Address/IPv6Address have .host).
    return str(getattr(client, "host", client))


def _throttle_key(client: str) -> str:
    """What failures are counted under: the address, or its /64 for IPv6."""
    try:
        ip = ipaddress.ip_address(client)
    except ValueError:
        return client
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def _strict_text(value) -> str:
    """bytes decoded as strict UTF-8, or str that is valid Unicode; else UnicodeError."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, str):
        value.encode("utf-8")  # rejects lone surrogates
        return value
    raise UnicodeError(f"expected bytes or str, got {type(value).__name__}")


def normalise_username(username: str) -> str:
    """Lookup form of a login name: stripped, ASCII lower-cased.

    Non-ASCII names are left as they are (they match no user): str.lower()
    would turn e.g. KELVIN SIGN into "k" and another user's address.
    """
    username = username.strip()
    return username.lower() if username.isascii() else username


@implementer(ICredentialsChecker)
class PasswordChecker:
    """Checks IUsernamePassword credentials against an IUserDB.

    `requestAvatarId` fires with the canonical address (str) or fails with
    UnauthorizedLogin. Other failures (e.g. the thread pool broke) pass through
    unchanged so the protocol can answer with a temporary error.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, userdb, *, reactor, failure_delay: float = 1.0, max_delay: float = 30.0,
                 log: Logger | None = None, cache_ttl: float = 60.0,
                 max_entries: int = DEFAULT_MAX_ENTRIES,
                 failure_expiry: float = DEFAULT_FAILURE_EXPIRY,
                 lockout_failures: int = 0, lockout_time: float = 900.0, metrics=None):
        self._userdb = userdb
        # mailgw_logins_total{result}: success, failure, lockout (refused, locked out).
        self.metrics = metrics_module.registry_or_default(metrics)
        self.metrics.declare(metrics_module.LOGINS, metrics_module.LOCKOUTS)
        self._lockout_failures = lockout_failures
        self._lockout_time = lockout_time
        self._locked_out: OrderedDict[str, float] = OrderedDict()      # client key -> until
        self._max_entries = max_entries
        self._reactor = reactor
        self._log = log if log is not None else _log
        self._client_failures = FailureTable(failure_delay=failure_delay, max_delay=max_delay,
                                             expiry=failure_expiry, max_entries=max_entries)
        self._user_failures = FailureTable(failure_delay=failure_delay, max_delay=max_delay,
                                           expiry=failure_expiry, max_entries=max_entries)
        # The cache is only safe if we can tell when the database changed.
        self._cache_ttl = cache_ttl if hasattr(userdb, "generation") else 0.0
        self._cache_max_entries = max_entries
        self._cache_secret = os.urandom(32)
        self._cache: OrderedDict[bytes, tuple[str, float]] = OrderedDict()
        self._cache_generation = None
        # Verifications running now, by cache key: later identical attempts wait on them.
        self._in_flight: dict[bytes, list[Deferred]] = {}

    def reconfigure(self, userdb, *, failure_delay: float, max_delay: float, lockout_failures: int,
                    lockout_time: float) -> None:
        """A reload (mailgw/reload.py): new limits, maybe a new users file;
        the failure counts and lockouts so far stay (a reload is no way out of
        a lockout). A new database drops the auth cache."""
        if userdb is not self._userdb:
            self._userdb = userdb
            self._cache.clear()
            self._cache_generation = None
        for table in (self._client_failures, self._user_failures):
            table.failure_delay, table.max_delay = failure_delay, max_delay
        self._lockout_failures = lockout_failures
        self._lockout_time = lockout_time

    def requestAvatarId(self, credentials) -> Deferred:
        return Deferred.fromCoroutine(self._authenticate(credentials))

    async def _authenticate(self, credentials) -> str:
        client = _client_label(credentials)
        client_key = _throttle_key(client)
        try:
            username = normalise_username(_strict_text(credentials.username))
        except (UnicodeError, AttributeError):
            username = None
        try:
            password = _strict_text(credentials.password)
        except (UnicodeError, AttributeError):
            password = None

        self._check_lockout(client, client_key, username)
        await self._wait_before_attempt(client_key, username)

        address = None
        if username is None:
            reason = "username is not UTF-8"
        elif password is None:
            reason = "password is not UTF-8"
        elif not password:
            reason = "empty password"
        else:
            address = self._cached(username, password)
            if address is None:
                address = await self._verify_once(username, password)
                if address is None:
                    reason = "wrong password" if self._userdb.exists(username) else "unknown user"

        if address is None:
            await self._fail(client, client_key, username, reason)
        self.metrics.inc(metrics_module.LOGINS, "success")
        self._client_failures.reset(client_key)
        self._log.info("authenticated {address} from {client}", address=address, client=client)
        return address

    async def _verify_once(self, username: str, password: str) -> str | None:
        """userdb.verify, shared by concurrent attempts with the same
        credentials: a burst of logins (1,000 IMAP clients of one user
        reconnecting) costs one argon2id hash (64 MiB, ~50 ms), not one each."""
        key = self._cache_key(username, password)
        waiters = self._in_flight.get(key)
        if waiters is not None:
            mine = Deferred()
            waiters.append(mine)
            return await mine
        self._in_flight[key] = waiters = []
        generation = getattr(self._userdb, "generation", None)
        try:
            address = await self._userdb.verify(username, password)
        except BaseException:
            failure = Failure()
            del self._in_flight[key]
            for waiter in waiters:
                waiter.errback(failure)
            raise
        del self._in_flight[key]
        if address is not None:
            self._remember(username, password, address, generation)
        for waiter in waiters:
            waiter.callback(address)
        return address

    async def _wait_before_attempt(self, client_key: str, username: str | None) -> None:
        now = self._reactor.seconds()
        wait = self._client_failures.wait(client_key, now)
        # The per-user delay only applies to clients that have failed recently.
        if username is not None and self._client_failures.count(client_key, now):
            wait = max(wait, self._user_failures.wait(username, now))
        if wait > 0:
            await deferLater(self._reactor, wait)

    def _check_lockout(self, client: str, client_key: str, username: str | None) -> None:
        until = self._locked_out.get(client_key)
        if until is None:
            return
        now = self._reactor.seconds()
        if now >= until:
            del self._locked_out[client_key]
            return
        self._log.warn("login for {username} from {client} refused: locked out for {left:.0f} s more",
                       username=_loggable(username), client=client, left=until - now)
        self.metrics.inc(metrics_module.LOGINS, "lockout")
        raise LoginsRefused()

    def _lock_out(self, client: str, client_key: str, now: float) -> None:
        while self._locked_out and (len(self._locked_out) >= self._max_entries
                                    or next(iter(self._locked_out.values())) <= now):
            self._locked_out.popitem(last=False)     # bounded; expired ones first in line
        self._locked_out.pop(client_key, None)
        self._locked_out[client_key] = now + self._lockout_time
        self._client_failures.reset(client_key)
        self.metrics.inc(metrics_module.LOCKOUTS)
        self._log.warn("{client}: {count} failed logins in a row, refusing its logins for {seconds:.0f} s",
                       client=client, count=self._lockout_failures, seconds=self._lockout_time)

    async def _fail(self, client: str, client_key: str, username: str | None, reason: str):
        self.metrics.inc(metrics_module.LOGINS, "failure")
        now = self._reactor.seconds()
        until = self._client_failures.record_failure(client_key, now)
        if self._lockout_failures and self._client_failures.count(client_key, now) >= self._lockout_failures:
            self._lock_out(client, client_key, now)
        if username is not None:
            until = max(until, self._user_failures.record_failure(username, now))
        self._log.warn(
            "authentication failed for {username} from {client}: {reason}",
            username=_loggable(username), client=client, reason=reason)
        if until > now:
            await deferLater(self._reactor, until - now)
        raise UnauthorizedLogin("authentication failed")

    # auth cache

    def _cache_key(self, username: str, password: str) -> bytes:
        message = f"{username}\0{password}".encode("utf-8")
        return hmac.new(self._cache_secret, message, hashlib.sha256).digest()

    def _sync_cache_generation(self) -> None:
        generation = self._userdb.generation
        if generation != self._cache_generation:
            self._cache.clear()
            self._cache_generation = generation

    def _cached(self, username: str, password: str) -> str | None:
        if self._cache_ttl <= 0:
            return None
        # exists() stats the file now and then, so a reload is noticed (and
        # the generation bumped) before we trust the cache.
        if not self._userdb.exists(username):
            return None
        self._sync_cache_generation()
        key = self._cache_key(username, password)
        entry = self._cache.get(key)
        if entry is None:
            return None
        address, expires = entry
        if self._reactor.seconds() >= expires:
            del self._cache[key]
            return None
        return address

    def _remember(self, username: str, password: str, address: str, generation) -> None:
        if self._cache_ttl <= 0 or self._userdb.generation != generation:
            return  # disabled, or the file changed while we were verifying
        self._sync_cache_generation()
        now = self._reactor.seconds()
        # Same TTL for all: insertion order is expiry order.
        while self._cache and (len(self._cache) >= self._cache_max_entries
                               or next(iter(self._cache.values()))[1] <= now):
            self._cache.popitem(last=False)
        key = self._cache_key(username, password)
        self._cache.pop(key, None)
        self._cache[key] = (address, now + self._cache_ttl)


def _loggable(username: str | None) -> str:
    if username is None:
        return "<not UTF-8>"
    if len(username) > MAX_LOGGED_USERNAME:
        username = username[:MAX_LOGGED_USERNAME] + "..."
    return repr(username)  # quotes, and escapes control characters (no log injection)
