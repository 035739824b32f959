"""`mailgw quota show | set | list`: mailbox quotas (mailgw.store.quota).

`set` rewrites the quotas file ([quota] quotas_file) atomically under its
lock, like `mailgw users` does the users file; a running server picks the
change up within `[routing] check_interval` seconds, no restart. `show`
reads the mailbox's maildirsize (recalculating it if it must, as the server
would).

Exit codes: 0 done, 1 the request cannot be done (bad address, a domain that
is not ours, an unreadable configuration or quotas file), 2 usage error.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mailgw.admin_cli import EXIT_ERROR, EXIT_OK, EXIT_USAGE, AdminError, Parser, UsageError, load_config
from mailgw.auth import userdb
from mailgw.store import quota as quota_module

USAGE = """usage: mailgw quota show USER                                [--config PATH]
       mailgw quota set USER [--bytes SIZE] [--messages N]    [--config PATH]
       mailgw quota list                                     [--config PATH]

  show   the mailbox's usage and limits (all folders together)
  set    override [quota] default_bytes / default_messages for USER:
         SIZE is octets with an optional K, M, G or T (powers of 1024), N a
         number; 0 = no limit; "default" removes the override
  list   the overrides in the quotas file ([quota] quotas_file, default
         <data_dir>/quotas)

A running server picks up changes without a restart.
"""
DEFAULT = "default"


def _parser() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    common.add_argument("--config", metavar="PATH")
    parser = Parser(prog="mailgw quota", add_help=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    show = commands.add_parser("show", parents=[common], add_help=False)
    show.add_argument("user", metavar="USER")
    change = commands.add_parser("set", parents=[common], add_help=False)
    change.add_argument("user", metavar="USER")
    change.add_argument("--bytes", metavar="SIZE")
    change.add_argument("--messages", metavar="N")
    commands.add_parser("list", parents=[common], add_help=False)
    return parser


def quota_main(argv: list[str]) -> int:
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help", "help") or argv[-1] in ("-h", "--help"):
        print(USAGE, end="", file=sys.stdout if argv else sys.stderr)
        return EXIT_OK if argv else EXIT_USAGE
    try:
        args = _parser().parse_args(argv)
        if args.command == "set" and args.bytes is None and args.messages is None:
            raise UsageError("set needs --bytes and/or --messages")
    except UsageError as error:
        print(f"mailgw quota: {error}\n\n{USAGE}", end="", file=sys.stderr)
        return EXIT_USAGE
    try:
        return _COMMANDS[args.command](args)
    except AdminError as error:
        print(f"mailgw quota: {error}", file=sys.stderr)
        return EXIT_ERROR


def _load_config(path_text: str | None):
    config = load_config(path_text)
    if config.quota is None:
        raise AdminError("the configuration has no [quota] settings")
    return config


def _user(text: str, config) -> str:
    try:
        address = userdb.validate_address(text)
    except ValueError as error:
        raise AdminError(str(error)) from None
    domain = address.rpartition("@")[2]
    if domain not in config.local_domains:
        listed = ", ".join(sorted(config.local_domains)) or "none"
        raise AdminError(f"{domain} is not a local domain (local_domains: {listed})")
    return address


def _read(path: Path, *, for_writing: bool) -> dict[str, quota_module.Override]:
    try:
        overrides, problems = quota_module.read_quotas(path)
    except OSError as error:
        raise AdminError(f"cannot read {path}: {error.strerror}") from None
    if problems and for_writing:
        # Rewriting would silently drop these lines (and a user's quota with them).
        details = "".join(f"\n  {path}:{line}: {reason}" for line, reason in problems)
        raise AdminError(f"refusing to rewrite {path}, fix or remove these lines first:{details}")
    for line, reason in problems:
        print(f"mailgw quota: warning: {path}:{line}: {reason} (skipped)", file=sys.stderr)
    return overrides


def _limit_text(used: int, limit: int, *, octets: bool) -> str:
    if octets:
        exact = f"{used} octets"
        if not limit:
            return f"{quota_module.human_size(used)}, no limit ({exact})"
        return (f"{quota_module.human_size(used)} of {quota_module.human_size(limit)} "
                f"({used} of {limit} octets, {100 * used / limit:.1f}%)")
    if not limit:
        return f"{used}, no limit"
    return f"{used} of {limit} ({100 * used / limit:.1f}%)"


def _show(args) -> int:
    config = _load_config(args.config)
    address = _user(args.user, config)
    quota = quota_module.Quota(config.mail_dir, config.quota, check_interval=0.0)
    try:
        status = quota.status(address)
    except OSError as error:
        raise AdminError(f"cannot read the mailbox of {address}: {error.strerror}") from None
    source = {"default": "default", "override": "set for this user"}
    print(address)
    print(f"  storage   {_limit_text(status['bytes'], status['bytes_limit'], octets=True)}"
          f"  [{source[status['bytes_from']]}]")
    print(f"  messages  {_limit_text(status['messages'], status['messages_limit'], octets=False)}"
          f"  [{source[status['messages_from']]}]")
    if status["over"]:
        print("  OVER QUOTA: new mail is refused (SMTP 452 4.2.2, IMAP NO [OVERQUOTA])")
    return EXIT_OK


def _value(text: str | None, parse, what: str):
    """None: leave as is; DEFAULT: remove the override; else the parsed value."""
    if text is None:
        return None
    if text.lower() == DEFAULT:
        return DEFAULT
    try:
        return parse(text)
    except ValueError as error:
        raise AdminError(f"--{what}: {error}") from None


def _set(args) -> int:
    config = _load_config(args.config)
    address = _user(args.user, config)
    new_bytes = _value(args.bytes, quota_module.parse_size, "bytes")
    new_messages = _value(args.messages, quota_module.parse_count, "messages")
    path = Path(config.quota.quotas_file)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as error:
        raise AdminError(f"cannot create {path.parent}: {error.strerror}") from None
    with userdb.locked_users_file(path):
        overrides = _read(path, for_writing=True)
        old = overrides.get(address, quota_module.Override())
        changed = quota_module.Override(
            old.bytes if new_bytes is None else (None if new_bytes == DEFAULT else new_bytes),
            old.messages if new_messages is None else (None if new_messages == DEFAULT else new_messages))
        if changed.bytes is None and changed.messages is None:
            overrides.pop(address, None)
        else:
            overrides[address] = changed
        try:
            userdb.replace_file(path, quota_module.format_quotas(overrides))
        except OSError as error:
            raise AdminError(f"cannot write {path}: {error.strerror}") from None
    defaults = config.quota
    shown_bytes = (f"bytes={quota_module.format_size(changed.bytes)}" if changed.bytes is not None
                   else f"bytes=default ({_limit_name(quota_module.format_size(defaults.default_bytes))})")
    shown_messages = (f"messages={changed.messages}" if changed.messages is not None
                      else f"messages=default ({_limit_name(str(defaults.default_messages))})")
    print(f"{address}: {shown_bytes} {shown_messages}")
    return EXIT_OK


def _limit_name(text: str) -> str:
    return "no limit" if text == "0" else text


def _list(args) -> int:
    config = _load_config(args.config)
    overrides = _read(Path(config.quota.quotas_file), for_writing=False)
    for address in sorted(overrides):
        print(quota_module.format_line(address, overrides[address]).rstrip())
    return EXIT_OK


_COMMANDS = {"show": _show, "set": _set, "list": _list}
