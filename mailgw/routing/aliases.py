"""The alias table: addresses that lead elsewhere (Postfix virtual(5) style).

File format (UTF-8 text; `mailgw aliases` writes it, editing by hand is fine)::

    # pattern              targets, separated by commas and/or spaces
    info@example.com       alice@example.com, bob@example.com
    sales@example.com      alice@example.com bob@example.com  [send-as]
    abuse@example.com      carol@example.com
    bob@example.com        bob@example.com, bob@elsewhere.example   # keep a copy and forward
                                                    # (an alias naming itself means the user)
    @example.org           @example.com      # domain alias: x@example.org is x@example.com
    @example.com           carol@example.com # catch-all: only when no user or alias matches

* A pattern is `local@domain` (one address) or `@domain`. A `@domain` line
  whose single target is `@otherdomain` is a domain alias, any other
  `@domain` line a catch-all.
* Targets are addresses: our users (`alice+Lists@...` files into her folder
  `Lists`), other aliases (expanded again, up to `[routing] max_alias_depth`)
  or addresses in other domains (forwarded, with an SRS envelope sender).
* `[send-as]` after the targets lets the members of the alias use it as
  their MAIL FROM and header From: (the members of sales@ answer as sales@).
* A pattern's domain must be one of `[server] local_domains` or the source
  of a domain alias: an alias never makes mailgw accept mail for a domain
  that is not ours by accident.
* A bad line is reported with file and line number and skipped; so is every
  alias in a loop (a -> b -> a) or nested deeper than the limit: it then
  resolves to nothing (550), and mail never loops. `mailgw aliases add`
  refuses to write such a table. A duplicate pattern keeps its first line.

Writers replace the file atomically under an flock of `<file>.lock`, like
the users file (mailgw.auth.userdb); the server stat()s it and reloads.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from mailgw.auth.userdb import validate_address
from mailgw.watched import parsed_lines

SEND_AS = "[send-as]"
_SPLIT = re.compile(r"[\s,]+")
_DOMAIN = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*")


@dataclass(frozen=True)
class AliasEntry:
    pattern: str                 # "local@domain" or "@domain"
    targets: tuple[str, ...]     # addresses, or one "@domain" for a domain alias
    send_as: bool = False
    line: int = 0                # in the file it came from (0: made in code)

    @property
    def is_domain_alias(self) -> bool:
        return self.pattern.startswith("@") and len(self.targets) == 1 and self.targets[0].startswith("@")

    def format(self) -> str:
        text = f"{self.pattern:<24} {', '.join(self.targets)}"
        return text + f"  {SEND_AS}" if self.send_as else text


@dataclass
class AliasTable:
    """What the resolver looks up: exact aliases, domain aliases, catch-alls."""
    exact: dict[str, AliasEntry] = field(default_factory=dict)          # "local@domain" -> entry
    domain_aliases: dict[str, str] = field(default_factory=dict)        # "example.org" -> "example.com"
    catch_all: dict[str, AliasEntry] = field(default_factory=dict)      # "example.com" -> entry

    def entries(self) -> list[AliasEntry]:
        domain_entries = [AliasEntry(f"@{source}", (f"@{target}",)) for source, target in self.domain_aliases.items()]
        return sorted([*self.exact.values(), *domain_entries, *self.catch_all.values()],
                      key=lambda entry: (entry.pattern.partition("@")[2], entry.pattern))

    @property
    def domains(self) -> frozenset[str]:
        """Domains the table makes ours beyond local_domains: domain alias sources."""
        return frozenset(self.domain_aliases)


def parse_domain(text: str) -> str:
    domain = text.lower()
    if not domain.isascii() or len(domain) > 253 or not _DOMAIN.fullmatch(domain):
        raise ValueError(f"invalid domain {text!r} (write international domains in their xn-- form)")
    return domain


def parse_pattern(text: str) -> str:
    if text.startswith("@"):
        return "@" + parse_domain(text[1:])
    return validate_address(text)


def parse_target(text: str) -> str:
    if text.startswith("@"):
        return "@" + parse_domain(text[1:])
    return validate_address(text)


def parse_line(line: str, number: int = 0) -> AliasEntry | None:
    """One line -> entry (None for blank and comment lines); ValueError says why not."""
    line = line.split("#", 1)[0].strip()
    if not line:
        return None
    send_as = line.endswith(SEND_AS)
    if send_as:
        line = line[: -len(SEND_AS)].rstrip()
    words = [word for word in _SPLIT.split(line) if word]
    if len(words) < 2:
        raise ValueError("expected a pattern and at least one target")
    pattern = parse_pattern(words[0])
    targets = tuple(dict.fromkeys(parse_target(word) for word in words[1:]))   # duplicates collapsed
    entry = AliasEntry(pattern, targets, send_as, number)
    domain_targets = [target for target in targets if target.startswith("@")]
    if domain_targets and not entry.is_domain_alias:
        raise ValueError("a @domain target must be the only target of a @domain pattern (a domain alias)")
    if entry.is_domain_alias and send_as:
        raise ValueError(f"{SEND_AS} applies to an address alias, not a domain alias")
    if entry.is_domain_alias and pattern == targets[0]:
        raise ValueError("a domain alias to itself")
    return entry


def parse_aliases(data: bytes, local_domains, *, max_depth: int,
                  max_expansion: int) -> tuple[AliasTable, list[tuple[int, str]]]:
    """The file's bytes -> (table, [(line number, problem), ...]).

    Every problem skips only its own line (or the aliases of a loop); the
    rest loads."""
    problems: list[tuple[int, str]] = []
    entries: list[AliasEntry] = []
    seen: dict[str, int] = {}
    for number, entry in parsed_lines(data, parse_line, problems):
        if entry.pattern in seen:
            problems.append((number, f"{entry.pattern} already defined on line {seen[entry.pattern]}; "
                                     "this line is ignored"))
            continue
        seen[entry.pattern] = number
        entries.append(entry)
    return build_table(entries, local_domains, max_depth=max_depth, max_expansion=max_expansion,
                       problems=problems)


def build_table(entries, local_domains, *, max_depth: int, max_expansion: int,
                problems: list | None = None) -> tuple[AliasTable, list[tuple[int, str]]]:
    problems = [] if problems is None else problems
    local_domains = frozenset(local_domains)
    table = AliasTable()
    for entry in entries:
        if entry.is_domain_alias:
            source, target = entry.pattern[1:], entry.targets[0][1:]
            if target not in local_domains:
                problems.append((entry.line, f"domain alias target {target} is not one of server.local_domains"))
                continue
            table.domain_aliases[source] = target
    ours = local_domains | table.domains
    for entry in entries:
        if entry.is_domain_alias:
            continue
        domain = entry.pattern.partition("@")[2]
        if domain not in ours:
            problems.append((entry.line, f"{domain} is not one of server.local_domains "
                                         "(nor the source of a domain alias)"))
            continue
        if domain in table.domain_aliases and entry.pattern.startswith("@"):
            problems.append((entry.line, f"@{domain} is already a domain alias; a catch-all for it "
                                         f"belongs to @{table.domain_aliases[domain]}"))
            continue
        if entry.pattern.startswith("@"):
            table.catch_all[domain] = entry
        else:
            table.exact[entry.pattern] = entry
    for pattern, chain, reason in _bad_nesting(table, max_depth, max_expansion):
        entry = table.exact.pop(pattern, None) or table.catch_all.pop(pattern.lstrip("@"), None)
        if entry is not None:
            problems.append((entry.line, f"{reason}: {' -> '.join(chain)}; {entry.pattern} is ignored"))
    return table, problems


def _bad_nesting(table: AliasTable, max_depth: int, max_expansion: int):
    """(pattern, chain, reason) of every alias in a loop, nested too deep, or
    expanding to too many addresses. Only alias-to-alias edges count here;
    users are data the resolver meets at run time (and guards there too)."""

    def next_aliases(entry: AliasEntry) -> list[str]:
        found = []
        for target in entry.targets:
            local, _, domain = target.partition("@")
            domain = table.domain_aliases.get(domain, domain)
            address = f"{local}@{domain}"
            # An alias naming itself keeps a copy in that mailbox (Postfix
            # virtual(5): "bob@ bob@, bob@elsewhere"): not an edge, not a loop.
            if address in table.exact and address != entry.pattern:
                found.append(address)
        return found

    bad = []
    for start in [*table.exact, *(f"@{domain}" for domain in table.catch_all)]:
        entry = table.exact.get(start) or table.catch_all[start[1:]]
        # Depth-first over alias edges, carrying the path: a repeat on the path is a loop.
        stack = [(entry, [start])]
        leaves = 0
        problem = None
        while stack and problem is None:
            current, path = stack.pop()
            children = next_aliases(current)
            leaves += len(current.targets) - len(children)
            if leaves > max_expansion:
                problem = ("expands to more than max_expansion addresses", path)
            for child in children:
                if child in path:
                    problem = ("alias loop", path + [child])
                    break
                if len(path) > max_depth:
                    problem = ("nested deeper than max_alias_depth", path + [child])
                    break
                stack.append((table.exact[child], path + [child]))
        if problem is not None:
            bad.append((start, problem[1], problem[0]))
    return bad


def format_aliases(table: AliasTable) -> bytes:
    lines = ["# mailgw aliases: pattern targets..., one per line (see `mailgw aliases --help`).",
             "# Written by `mailgw aliases`; edits by hand are fine, comments are not kept."]
    lines += [entry.format() for entry in table.entries()]
    return ("\n".join(lines) + "\n").encode("utf-8")


def read_aliases(path: Path, local_domains, *, max_depth: int, max_expansion: int):
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        data = b""
    return parse_aliases(data, local_domains, max_depth=max_depth, max_expansion=max_expansion)
