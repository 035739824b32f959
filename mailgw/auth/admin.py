"""`mailgw users`: add, change, delete and list users in the users file.

Passwords come from a prompt with confirmation when stdin is a terminal, or as
one line from stdin otherwise (``echo secret | mailgw users add a@example.test``),
never from the command line, where every user of the machine can read them
(``ps``, shell history). Nothing secret is ever printed.

Exit codes: 0 done, 1 the request cannot be done (bad address, user exists or
not, empty password, unreadable config), 2 usage error.
"""
from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path

from mailgw.admin_cli import Parser, UsageError
from mailgw.auth import userdb

USAGE = """usage: mailgw users add ADDRESS     [--config PATH | --users-file PATH]
       mailgw users passwd ADDRESS  [--config PATH | --users-file PATH]
       mailgw users delete ADDRESS  [--config PATH | --users-file PATH]
       mailgw users list            [--config PATH | --users-file PATH]

  --config PATH      configuration file (default: $MAILGW_CONFIG, else the embedded default);
                     the users file is its `users_file`
  --users-file PATH  use this users file and skip the configuration
                     (and the check that the domain is a local domain)

The password is read from a prompt, or as one line from stdin when stdin is not
a terminal. It is never accepted on the command line.
"""

EXIT_OK = 0
EXIT_USER_ERROR = 1
EXIT_USAGE = 2


class UserError(Exception):
    """The request cannot be done; the message says why (exit 1)."""


def _parser() -> argparse.ArgumentParser:
    # No argparse help: USAGE is printed instead (add_help would also make
    # argparse exit on its own).
    common = Parser(add_help=False)
    source = common.add_mutually_exclusive_group()
    source.add_argument("--config", metavar="PATH")
    source.add_argument("--users-file", metavar="PATH")

    parser = Parser(prog="mailgw users", add_help=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in ("add", "passwd", "delete"):
        sub = commands.add_parser(name, parents=[common], add_help=False)
        sub.add_argument("address", metavar="ADDRESS")
    commands.add_parser("list", parents=[common], add_help=False)
    return parser


def users_main(argv: list[str]) -> int:
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help", "help") or argv[-1] in ("-h", "--help"):
        print(USAGE, end="", file=sys.stdout if argv else sys.stderr)
        return EXIT_OK if argv else EXIT_USAGE
    try:
        args, extra = _parser().parse_known_args(argv)
        if extra:
            # Don't echo the extra words: they may well be a password.
            raise UsageError(
                f"{len(extra)} unexpected argument(s); passwords are never taken from the "
                "command line (they are read from a prompt or one line of stdin)")
    except UsageError as e:
        print(f"mailgw users: {e}\n\n{USAGE}", end="", file=sys.stderr)
        return EXIT_USAGE
    try:
        return _COMMANDS[args.command](args)
    except UserError as e:
        print(f"mailgw users: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("\nmailgw users: cancelled, nothing changed", file=sys.stderr)
        return EXIT_USER_ERROR


def _users_file_and_domains(args) -> tuple[Path, frozenset[str] | None]:
    """The users file to edit, and the local domains (None: don't check)."""
    if args.users_file:
        return Path(args.users_file), None
    from mailgw.config import ConfigError, load

    config_path = args.config or os.environ.get("MAILGW_CONFIG") or None
    try:
        config = load(Path(config_path) if config_path else None)
    except ConfigError as e:
        raise UserError(f"configuration error:\n{e}") from None
    except OSError as e:
        raise UserError(f"cannot read configuration {config_path}: {e.strerror}") from None
    return Path(config.users_file), frozenset(config.local_domains)


def _address(text: str) -> str:
    try:
        return userdb.validate_address(text)
    except ValueError as e:
        raise UserError(str(e)) from None


def _read(path: Path, *, for_writing: bool) -> dict[str, str]:
    try:
        users, problems = userdb.read_users(path)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if problems and for_writing:
        # Rewriting would silently drop these lines (and perhaps a user with them).
        details = "".join(f"\n  line {line}: {reason}" for line, reason in problems)
        raise UserError(f"refusing to rewrite {path}, fix or remove these lines first:{details}")
    for line, reason in problems:
        print(f"mailgw users: warning: {path} line {line} skipped: {reason}", file=sys.stderr)
    return users


def _read_password() -> str:
    stdin = sys.stdin
    if stdin is not None and stdin.isatty():
        try:
            password = getpass.getpass("Password: ")
            if password and getpass.getpass("Retype password: ") != password:
                raise UserError("the passwords do not match, nothing changed")
        except EOFError:
            raise UserError("no password given, nothing changed") from None
    else:
        # One line. Read bytes where we can: the server decodes passwords as
        # strict UTF-8 whatever this terminal's locale says.
        binary = getattr(stdin, "buffer", None)
        if binary is not None:
            try:
                line = binary.readline().decode("utf-8")
            except UnicodeDecodeError:
                raise UserError("the password on stdin is not valid UTF-8") from None
        else:
            line = stdin.readline() if stdin is not None else ""
        password = line.removesuffix("\n").removesuffix("\r")
    if not password:
        raise UserError("empty password refused, nothing changed")
    return password


def _prepare_directory(path: Path) -> None:
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {path.parent}: {e.strerror}") from None


def _write(path: Path, users: dict[str, str]) -> None:
    try:
        userdb.write_users(path, users)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None


def _add(args) -> int:
    path, local_domains = _users_file_and_domains(args)
    address = _address(args.address)
    domain = address.rpartition("@")[2]
    if local_domains is not None and domain not in local_domains:
        listed = ", ".join(sorted(local_domains)) or "none"
        raise UserError(f"{domain} is not a local domain (local_domains: {listed})")
    # Fail before asking for a password when we already know the answer.
    if address in _read(path, for_writing=True):
        raise UserError(f"{address} already exists (use `mailgw users passwd` to change "
                        "its password)")
    password_hash = userdb.hash_password(_read_password())
    _prepare_directory(path)
    with userdb.locked_users_file(path):
        users = _read(path, for_writing=True)
        if address in users:
            raise UserError(f"{address} already exists")
        users[address] = password_hash
        _write(path, users)
    print(f"added {address}")
    return EXIT_OK


def _passwd(args) -> int:
    path, _ = _users_file_and_domains(args)
    address = _address(args.address)
    if address not in _read(path, for_writing=True):
        raise UserError(f"no such user: {address}")
    password_hash = userdb.hash_password(_read_password())
    with userdb.locked_users_file(path):
        users = _read(path, for_writing=True)
        if address not in users:
            raise UserError(f"no such user: {address}")
        users[address] = password_hash
        _write(path, users)
    print(f"password changed for {address}")
    return EXIT_OK


def _delete(args) -> int:
    path, _ = _users_file_and_domains(args)
    address = _address(args.address)
    if not path.parent.is_dir():
        raise UserError(f"no such user: {address}")
    with userdb.locked_users_file(path):
        users = _read(path, for_writing=True)
        if address not in users:
            raise UserError(f"no such user: {address}")
        del users[address]
        _write(path, users)
    print(f"deleted {address}")
    return EXIT_OK


def _list(args) -> int:
    path, _ = _users_file_and_domains(args)
    for address in sorted(_read(path, for_writing=False)):
        print(address)
    return EXIT_OK


_COMMANDS = {"add": _add, "passwd": _passwd, "delete": _delete, "list": _list}
