"""Recipient resolution: one address -> its final targets.

Every path that hands mail to someone asks this one object: SMTP RCPT on
every listener, `mailgw sendmail`, the queue's notices (DSNs) and forwards.
A target is a local mailbox (with the folder to file into) or a remote
address. The lookup order, for `local+tag@domain` in one of our domains
(docs/routing.md; Postfix virtual(5) and Dovecot's lda are the model):

 1. an SRS0/SRS1 address of ours: verified, then the original sender (remote);
    forged or expired ones are refused (550 5.7.1)
 2. an alias `local+tag@domain`, then a user `local+tag@domain`
 3. RFC 5233 subaddress: an alias `local@domain`, then the user `local@domain`,
    into the folder named by the tag if the user has one, else INBOX
 4. the role addresses postmaster@ and abuse@ of every domain (RFC 5321
    §4.5.1, RFC 2142 §2)
 5. a domain alias `@domain -> @other`: the same address at the other domain
 6. the domain's catch-all
 7. else unknown (550 5.1.1)

Alias targets are resolved again by the same rules. The alias table itself
rejects loops and over-deep nesting when it is loaded; the walk here still
carries the path, so whatever users and catch-alls add at run time cannot
loop either: a target seen again on its own path is dropped and logged.
Duplicates collapse: one copy per (mailbox, folder).

Everything is an in-memory lookup (the tables are reloaded on change); the
one file-system access is the stat of a subaddress folder.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from twisted.logger import Logger

from mailgw.errors import MailError, PermanentError
from mailgw.routing import aliases as alias_table
from mailgw.routing.srs import SRSError
from mailgw.store.maildir import split_mailbox_address
from mailgw.store.names import decode_dirname, folder_dirname
from mailgw.watched import WatchedTable

_log = Logger(namespace="mailgw.routing")

# RFC 3463 §3.2 5.1.1: bad destination mailbox address.
UNKNOWN = (550, "5.1.1", "User unknown in local recipient table")
# RFC 3463 §3.8 5.7.1: not authorised (a forged or expired SRS address).
BAD_SRS = (550, "5.7.1", "Invalid or expired SRS address")
# RFC 3463 §3.4 5.3.0 (other mail system status): an alias with too many targets.
TOO_MANY_TARGETS = (550, "5.3.0", "Alias expands to too many recipients")


@dataclass(frozen=True)
class LocalTarget:
    mailbox: str                   # a user's address (its Maildir)
    folder: str | None = None      # None: INBOX

    def __str__(self) -> str:
        return self.mailbox if self.folder is None else f"{self.mailbox} (folder {self.folder})"


@dataclass(frozen=True)
class RemoteTarget:
    address: str
    forwarded: bool = False        # reached through an alias or SRS: sent on with an SRS sender

    def __str__(self) -> str:
        return self.address


class AliasFile(WatchedTable):
    """The alias table file in memory, reloaded when it changes (at most one
    stat() per check_interval, like the users file)."""

    what = "alias table"

    def __init__(self, path: Path, local_domains, *, clock, check_interval: float = 1.0,
                 max_depth: int = 10, max_expansion: int = 1000):
        self.local_domains = frozenset(local_domains)
        self.max_depth = max_depth
        self.max_expansion = max_expansion
        super().__init__(path, clock=clock, check_interval=check_interval)

    def table(self) -> alias_table.AliasTable:
        return self.current()

    def parse(self, data: bytes):
        return alias_table.parse_aliases(data, self.local_domains, max_depth=self.max_depth,
                                         max_expansion=self.max_expansion)

    def empty(self) -> alias_table.AliasTable:
        return alias_table.AliasTable()

    def size(self, table) -> int:
        return len(table.exact) + len(table.catch_all) + len(table.domain_aliases)


class StaticAliases:
    """An alias table that never changes (tests, and configs without a file)."""

    def __init__(self, table: alias_table.AliasTable | None = None):
        self._table = table if table is not None else alias_table.AliasTable()
        self.generation = 0

    def table(self) -> alias_table.AliasTable:
        return self._table


class Resolver:
    """The recipient-resolution stage. `users` is an IUserDB (`exists`);
    `srs` a mailgw.routing.srs.SRS or None; `mail_dir` where the Maildirs
    are, for subaddress folders (None: never file into a folder)."""

    log = _log

    def __init__(self, *, local_domains, postmaster: str, abuse: str, recipient_delimiter: str,
                 users, aliases: AliasFile, srs=None, mail_dir: Path | None = None,
                 max_depth: int = 10, max_expansion: int = 1000):
        self.local_domains = frozenset(local_domains)
        self.postmaster = postmaster.lower()
        self.abuse = abuse.lower()
        self.delimiter = recipient_delimiter
        self.users = users
        self.aliases = aliases
        self.srs = srs
        self.mail_dir = None if mail_dir is None else Path(mail_dir)
        self.max_depth = max_depth
        self.max_expansion = max_expansion

    @classmethod
    def from_config(cls, config, users, *, clock, srs=None) -> "Resolver":
        routing = config.routing
        aliases = AliasFile(routing.aliases_file, config.local_domains, clock=clock,
                            check_interval=routing.check_interval, max_depth=routing.max_alias_depth,
                            max_expansion=routing.max_expansion)
        return cls(local_domains=config.local_domains, postmaster=config.postmaster, abuse=routing.abuse,
                   recipient_delimiter=config.recipient_delimiter, users=users, aliases=aliases, srs=srs,
                   mail_dir=config.mail_dir, max_depth=routing.max_alias_depth,
                   max_expansion=routing.max_expansion)

    @classmethod
    def static(cls, config, users) -> "Resolver":
        """No alias file: users, subaddresses and role addresses only (configs
        built by hand in tests)."""
        abuse = config.routing.abuse if config.routing is not None else config.postmaster
        return cls(local_domains=config.local_domains, postmaster=config.postmaster, abuse=abuse,
                   recipient_delimiter=config.recipient_delimiter, users=users, aliases=StaticAliases())

    # -- questions ----------------------------------------------------------------
    def is_ours(self, domain: str) -> bool:
        """A domain we receive for: a local domain or a domain alias source.
        Exact match only: "evil-example.test" is never "example.test"."""
        domain = domain.lower()
        return domain in self.local_domains or domain in self.aliases.table().domain_aliases

    def resolve(self, address: str) -> tuple[LocalTarget | RemoteTarget, ...]:
        """The final targets of `address` ("local@domain", case as sent;
        "postmaster" alone is RFC 5321's <Postmaster>). MailError when it
        leads nowhere."""
        table = self.aliases.table()
        local, at, domain = address.rpartition("@")
        if not at:
            local, domain = address, ""
        domain = domain.lower()
        if domain and not (domain in self.local_domains or domain in table.domain_aliases):
            return (RemoteTarget(address),)
        found: dict[object, None] = {}
        self._walk(local, domain, table, [], found, forwarded=False)
        if not found:
            raise PermanentError(*UNKNOWN)
        if len(found) > self.max_expansion:
            raise PermanentError(*TOO_MANY_TARGETS)
        return tuple(found)

    def owns(self, user: str, address: str) -> bool:
        """May authenticated `user` use `address` as sender (MAIL FROM and
        header From:)? Its own address, its subaddresses, the same at a
        domain alias, and [send-as] aliases it is a member of. Never a
        catch-all: being its target does not make every address yours."""
        local, at, domain = address.rpartition("@")
        if not at or not local.isascii() or local.startswith('"'):
            return False
        local, domain = local.lower(), domain.lower()
        table = self.aliases.table()
        domain = table.domain_aliases.get(domain, domain)
        candidates = [f"{local}@{domain}"]
        if self.delimiter and self.delimiter in local:
            candidates.append(f"{local.split(self.delimiter, 1)[0]}@{domain}")
        if user in candidates:
            return True
        for candidate in candidates:
            entry = table.exact.get(candidate)
            if entry is not None and entry.send_as:
                try:
                    targets = self.resolve(candidate)
                except MailError:
                    continue
                if any(isinstance(t, LocalTarget) and t.mailbox == user for t in targets):
                    return True
        return False

    # -- the walk -------------------------------------------------------------------
    def _walk(self, local: str, domain: str, table, path: list[str], found: dict, *, forwarded: bool) -> None:
        if not local.isascii() or local.startswith('"'):
            # Quoted or non-ASCII local parts never name a user or alias of ours
            # (their names are restricted to [a-z0-9._+-]); "%" and "!" fall out the same way.
            return
        lowered = local.lower()
        if not domain:                       # RFC 5321 §4.1.1.3: <Postmaster> without a domain
            if lowered == "postmaster":
                self._add_address(self.postmaster, table, path, found, forwarded=forwarded)
            return
        address = f"{lowered}@{domain}"
        if address in path:
            # Seen on its own path: the address itself, not expanded again
            # (Postfix: an alias that names itself keeps a copy); a user gets
            # it, anything else is a loop and is dropped.
            if self.users.exists(address):
                found.setdefault(LocalTarget(address), None)
            else:
                self.log.warn("alias loop through {address} ({path}): that target is dropped",
                              address=address, path=" -> ".join(path))
            return
        if len(path) > self.max_depth:
            self.log.warn("aliases nested deeper than {depth} at {address}: that target is dropped",
                          depth=self.max_depth, address=address)
            return
        path = path + [address]

        if self.srs is not None and domain == self.srs.domain and self.srs.is_srs(lowered):
            try:
                original = self.srs.reverse(f"{local}@{domain}")
            except SRSError:
                if path[:-1]:
                    return                          # an alias target: drop it, never refuse the whole message
                raise PermanentError(*BAD_SRS) from None
            self._add_address(original, table, path, found, forwarded=True)
            return
        entry = table.exact.get(address)
        if entry is not None:
            self._expand(entry, table, path, found)
            return
        if self.users.exists(address):
            found.setdefault(LocalTarget(address), None)
            return
        if self.delimiter and self.delimiter in lowered:
            base, tag = local.split(self.delimiter, 1)[0], local.split(self.delimiter, 1)[1]
            base_address = f"{base.lower()}@{domain}"
            entry = table.exact.get(base_address)
            if entry is not None and base:
                self._expand(entry, table, path, found)
                return
            if base and self.users.exists(base_address):
                found.setdefault(LocalTarget(base_address, self.folder_for(base_address, tag)), None)
                return
        if lowered in ("postmaster", "abuse"):
            role = self.postmaster if lowered == "postmaster" else self.abuse
            if role != address:
                self._add_address(role, table, path, found, forwarded=forwarded)
            else:
                # The configured role mailbox itself, user or not: these must
                # always reach someone (its Maildir is made on first delivery).
                found.setdefault(LocalTarget(address), None)
            return
        target_domain = table.domain_aliases.get(domain)
        if target_domain is not None:
            self._walk(local, target_domain, table, path, found, forwarded=forwarded)
            return
        entry = table.catch_all.get(domain)
        if entry is not None:
            self._expand(entry, table, path, found)

    def _expand(self, entry, table, path, found) -> None:
        for target in entry.targets:
            if len(found) > self.max_expansion:
                return
            self._add_address(target, table, path, found, forwarded=True)

    def _add_address(self, address: str, table, path, found, *, forwarded: bool) -> None:
        local, _, domain = address.rpartition("@")
        domain = domain.lower()
        if domain in self.local_domains or domain in table.domain_aliases:
            before = len(found)
            self._walk(local, domain, table, path, found, forwarded=forwarded)
            if len(found) == before and path:
                self.log.warn("{alias}: target <{target}> leads nowhere: dropped", alias=path[0], target=address)
        else:
            found.setdefault(RemoteTarget(address, forwarded=forwarded), None)

    # -- RFC 5233 subaddress folders -------------------------------------------------
    def folder_for(self, mailbox: str, tag: str) -> str | None:
        """The folder of `mailbox` that `tag` names (as written, else the one
        that matches case-insensitively), or None for INBOX."""
        if self.mail_dir is None or not tag:
            return None
        try:
            local, domain = split_mailbox_address(mailbox)
            user_dir = self.mail_dir / domain / local
            name, dirname = folder_dirname(tag)
        except ValueError:
            return None
        if dirname is None:
            return None                        # "+inbox" is INBOX
        if (user_dir / dirname).is_dir():
            return name
        try:
            entries = os.listdir(user_dir)
        except OSError:
            return None
        wanted = tag.casefold()
        for entry in sorted(entries):
            folder = decode_dirname(entry)
            if folder is not None and folder.casefold() == wanted and (user_dir / entry).is_dir():
                return folder
        return None
