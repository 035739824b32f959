"""`mailgw aliases ...` and `mailgw resolve ADDRESS`: the alias table and what an address leads to.

Changes are written to the alias file (mailgw.routing.aliases) atomically,
under its lock; a running server notices the new file within
`[routing] check_interval` seconds, no restart. A change that would make
the table wrong (a loop, too deep, a domain that is not ours) is refused
and nothing is written.

Exit codes: 0 done, 1 the request cannot be done (unknown alias, bad
address, a table error, unknown recipient for `resolve`), 2 usage error.
"""
from __future__ import annotations

import argparse
import sys

from mailgw.admin_cli import EXIT_ERROR, EXIT_OK, EXIT_USAGE, AdminError, Parser, UsageError, load_config
from mailgw.auth import userdb
from mailgw.routing import aliases as table_module
from mailgw.watched import parsed_lines

ALIASES_USAGE = """usage: mailgw aliases add ALIAS TARGET... [--send-as] [--config PATH]
       mailgw aliases delete ALIAS [TARGET...]    [--config PATH]
       mailgw aliases show ALIAS                  [--config PATH]
       mailgw aliases list                        [--config PATH]

  ALIAS    local@domain, or @domain (a catch-all; or a domain alias when the
           one TARGET is @otherdomain)
  TARGET   a user, another alias, an address elsewhere (forwarded with SRS),
           or user+Folder@domain to file into one of the user's folders
  add      creates the alias or adds targets to it; --send-as lets its members
           send as the alias (MAIL FROM and From:)
  delete   removes the alias, or only the TARGETs given

The table is [routing] aliases_file (default <data_dir>/aliases), lines like
Postfix's virtual(5): "info@example.com  alice@example.com, bob@example.com".
A running server picks up changes without a restart.
"""

RESOLVE_USAGE = """usage: mailgw resolve ADDRESS... [--config PATH]

Prints the final targets of each ADDRESS, one per line, as the server resolves
a recipient (users, aliases and lists, subaddresses, role addresses, domain
aliases, catch-alls, SRS): "alice@example.com", "alice@example.com folder=Lists",
"bob@elsewhere.example remote" (+ " forwarded" when an alias led there).
With several ADDRESSes each line starts with "ADDRESS: ".
Exit 1 if an address leads nowhere (the server answers 550 to it).
"""


# -- mailgw aliases ------------------------------------------------------------------

def _aliases_parser() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    common.add_argument("--config", metavar="PATH")
    parser = Parser(prog="mailgw aliases", add_help=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = commands.add_parser("add", parents=[common], add_help=False)
    add.add_argument("alias")
    add.add_argument("targets", nargs="+")
    add.add_argument("--send-as", action="store_true")
    delete = commands.add_parser("delete", parents=[common], add_help=False)
    delete.add_argument("alias")
    delete.add_argument("targets", nargs="*")
    show = commands.add_parser("show", parents=[common], add_help=False)
    show.add_argument("alias")
    commands.add_parser("list", parents=[common], add_help=False)
    return parser


def aliases_main(argv: list[str]) -> int:
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help", "help") or argv[-1] in ("-h", "--help"):
        print(ALIASES_USAGE, end="", file=sys.stdout if argv else sys.stderr)
        return EXIT_OK if argv else EXIT_USAGE
    try:
        args = _aliases_parser().parse_args(argv)
    except UsageError as error:
        print(f"mailgw aliases: {error}\n\n{ALIASES_USAGE}", end="", file=sys.stderr)
        return EXIT_USAGE
    try:
        config = load_config(args.config)
        return _ALIAS_COMMANDS[args.command](config, args)
    except AdminError as error:
        print(f"mailgw aliases: {error}", file=sys.stderr)
        return EXIT_ERROR


def _read_entries(config, *, for_writing: bool) -> list[table_module.AliasEntry]:
    """The file's entries in file order. For writing, a file with bad lines
    is refused: rewriting it would drop them."""
    path = config.routing.aliases_file
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        data = b""
    except OSError as error:
        raise AdminError(f"cannot read {path}: {error.strerror}") from None
    line_problems: list = []
    entries = [entry for _, entry in parsed_lines(data, table_module.parse_line, line_problems)]
    _, table_problems = _table(config, entries)
    problems = [f"{path}:{line}: {reason}" for line, reason in line_problems + table_problems]
    if problems and for_writing:
        raise AdminError("the alias table has errors; fix them first (nothing written):\n  "
                         + "\n  ".join(problems))
    for problem in problems:
        print(f"mailgw aliases: warning: {problem}", file=sys.stderr)
    return entries


def _table(config, entries):
    routing = config.routing
    return table_module.build_table(entries, config.local_domains, max_depth=routing.max_alias_depth,
                                    max_expansion=routing.max_expansion)


def _parsed(function, text: str) -> str:
    try:
        return function(text)
    except ValueError as error:
        raise AdminError(str(error)) from None


def _write(config, entries) -> None:
    # Number the lines as they will be written, so a refusal can name them.
    numbered = [table_module.AliasEntry(e.pattern, e.targets, e.send_as, i) for i, e in enumerate(entries, 3)]
    table, problems = _table(config, numbered)
    if problems:
        by_line = {e.line: e.pattern for e in numbered}
        raise AdminError("refused, nothing written:\n  " + "\n  ".join(
            f"{by_line.get(line, '?')}: {reason}" for line, reason in problems))
    userdb.replace_file(config.routing.aliases_file, table_module.format_aliases(table))


def _add(config, args) -> int:
    pattern = _parsed(table_module.parse_pattern, args.alias)
    targets = [_parsed(table_module.parse_target, target) for target in args.targets]
    path = config.routing.aliases_file
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with userdb.locked_users_file(path):
        entries = _read_entries(config, for_writing=True)
        existing = next((e for e in entries if e.pattern == pattern), None)
        if existing is not None:
            merged = tuple(dict.fromkeys(existing.targets + tuple(targets)))
            new = table_module.AliasEntry(pattern, merged, existing.send_as or args.send_as)
            entries = [new if e is existing else e for e in entries]
        else:
            new = table_module.AliasEntry(pattern, tuple(dict.fromkeys(targets)), args.send_as)
            entries.append(new)
        try:
            table_module.parse_line(new.format())       # the same rules as a line in the file
        except ValueError as error:
            raise AdminError(f"{pattern}: {error}") from None
        _write(config, entries)
    print(new.format())
    return EXIT_OK


def _delete(config, args) -> int:
    pattern = _parsed(table_module.parse_pattern, args.alias)
    targets = [_parsed(table_module.parse_target, target) for target in args.targets]
    path = config.routing.aliases_file
    with userdb.locked_users_file(path):
        entries = _read_entries(config, for_writing=True)
        existing = next((e for e in entries if e.pattern == pattern), None)
        if existing is None:
            raise AdminError(f"no alias {pattern}")
        if targets:
            missing = [t for t in targets if t not in existing.targets]
            if missing:
                raise AdminError(f"{pattern} has no target {', '.join(missing)}")
            left = tuple(t for t in existing.targets if t not in targets)
            replacement = [table_module.AliasEntry(pattern, left, existing.send_as)] if left else []
        else:
            replacement = []
        entries = [r for e in entries for r in ((replacement if e is existing else [e]))]
        _write(config, entries)
    print(f"{pattern}: " + ("deleted" if not replacement else f"now {', '.join(replacement[0].targets)}"))
    return EXIT_OK


def _show(config, args) -> int:
    pattern = _parsed(table_module.parse_pattern, args.alias)
    for entry in _read_entries(config, for_writing=False):
        if entry.pattern == pattern:
            print(entry.format())
            return EXIT_OK
    raise AdminError(f"no alias {pattern}")


def _list(config, args) -> int:
    entries = _read_entries(config, for_writing=False)
    table, _ = _table(config, entries)
    for entry in table.entries():
        print(entry.format())
    return EXIT_OK


_ALIAS_COMMANDS = {"add": _add, "delete": _delete, "show": _show, "list": _list}


# -- mailgw resolve --------------------------------------------------------------------

class _Clock:
    def __init__(self):
        import time
        self.seconds = time.time

    def callFromThread(self, function, *args, **kwargs):     # never used: no password checks here
        function(*args, **kwargs)


def build_resolver(config):
    """The resolver the server would build, from the files as they are now.
    The SRS secret is read only if the server made one already."""
    from mailgw.auth.userdb import UserFile
    from mailgw.routing.resolver import Resolver

    clock = _Clock()
    users = UserFile(config.users_file, threadpool=None, reactor=clock)
    srs = None
    secret_path = config.data_dir / "srs.secret"
    if secret_path.exists():
        from mailgw.routing import srs as srs_module
        try:
            srs = srs_module.SRS(srs_module.load_secret(config.data_dir), config.routing.srs_domain,
                                 clock=clock.seconds, max_age_days=config.routing.srs_max_age)
        except (OSError, ValueError) as error:
            print(f"mailgw resolve: warning: SRS addresses not checked: {error}", file=sys.stderr)
    return Resolver.from_config(config, users, clock=clock, srs=srs)


def describe(target) -> str:
    from mailgw.routing.resolver import LocalTarget

    if isinstance(target, LocalTarget):
        return target.mailbox if target.folder is None else f"{target.mailbox} folder={target.folder}"
    return f"{target.address} remote" + (" forwarded" if target.forwarded else "")


def resolve_main(argv: list[str]) -> int:
    from mailgw.errors import MailError

    parser = Parser(prog="mailgw resolve", add_help=False)
    parser.add_argument("addresses", nargs="*")
    parser.add_argument("--config", metavar="PATH")
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(RESOLVE_USAGE, end="", file=sys.stdout if argv else sys.stderr)
        return EXIT_OK if argv else EXIT_USAGE
    try:
        args = parser.parse_args(argv)
        if not args.addresses:
            raise UsageError("an ADDRESS is required")
    except UsageError as error:
        print(f"mailgw resolve: {error}\n\n{RESOLVE_USAGE}", end="", file=sys.stderr)
        return EXIT_USAGE
    try:
        resolver = build_resolver(load_config(args.config))
    except AdminError as error:
        print(f"mailgw resolve: {error}", file=sys.stderr)
        return EXIT_ERROR
    status = EXIT_OK
    for address in args.addresses:
        prefix = f"{address}: " if len(args.addresses) > 1 else ""
        try:
            targets = resolver.resolve(address.strip().strip("<>"))
        except MailError as error:
            print(f"mailgw resolve: {address}: {error.code} {error.enhanced} {error.text}", file=sys.stderr)
            status = EXIT_ERROR
            continue
        for target in targets:
            print(prefix + describe(target))
    return status
