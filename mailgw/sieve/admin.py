"""`mailgw sieve`: the admin's view of users' Sieve scripts (the same store
ManageSieve edits, <data_dir>/sieve)."""
from __future__ import annotations

import sys

from mailgw.admin_cli import EXIT_ERROR, EXIT_OK, EXIT_USAGE, AdminError, Parser, UsageError, load_config

SIEVE_USAGE = """usage: mailgw sieve COMMAND USER [NAME] [FILE] [--config PATH]

  list USER                the user's scripts, the active one marked "active"
  show USER [NAME]         print a script (without NAME: the active one)
  put USER NAME [FILE]     store a script from FILE or stdin; refused with the line and
                           column if it does not compile
  activate USER NAME       make NAME the script that runs at delivery ("" deactivates)
  check [FILE]             compile a script from FILE or stdin and say what is wrong

The running server picks up a changed script at the next delivery.
"""


def _parser() -> Parser:
    common = Parser(add_help=False)
    common.add_argument("--config", metavar="PATH")
    parser = Parser(prog="mailgw sieve", add_help=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    listing = commands.add_parser("list", parents=[common], add_help=False)
    listing.add_argument("user")
    show = commands.add_parser("show", parents=[common], add_help=False)
    show.add_argument("user")
    show.add_argument("name", nargs="?")
    put = commands.add_parser("put", parents=[common], add_help=False)
    put.add_argument("user")
    put.add_argument("name")
    put.add_argument("file", nargs="?")
    activate = commands.add_parser("activate", parents=[common], add_help=False)
    activate.add_argument("user")
    activate.add_argument("name")
    check = commands.add_parser("check", parents=[common], add_help=False)
    check.add_argument("file", nargs="?")
    return parser


def _store(config):
    from mailgw.sieve.interpreter import compile_script
    from mailgw.sieve.scripts import ScriptStore
    return ScriptStore(config.data_dir / "sieve", check=compile_script)


def _read(path: str | None) -> str:
    try:
        data = sys.stdin.buffer.read() if path in (None, "-") else open(path, "rb").read()
        return data.decode("utf-8")
    except OSError as error:
        raise AdminError(f"cannot read {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise AdminError("the script is not UTF-8 (RFC 5228 §2.2)") from None


def sieve_main(argv: list[str]) -> int:
    from mailgw.sieve.grammar import SieveSyntaxError
    from mailgw.sieve.interpreter import compile_script
    from mailgw.sieve.scripts import ScriptStoreError

    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help", "help") or argv[-1] in ("-h", "--help"):
        print(SIEVE_USAGE, end="", file=sys.stdout if argv else sys.stderr)
        return EXIT_OK if argv else EXIT_USAGE
    try:
        args = _parser().parse_args(argv)
    except UsageError as error:
        print(f"mailgw sieve: {error}\n\n{SIEVE_USAGE}", end="", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.command == "check":
            compile_script(_read(args.file))
            print("ok")
            return EXIT_OK
        store = _store(load_config(args.config))
        user = args.user.lower()
        if args.command == "list":
            for name, active in store.list(user):
                print(f"{name}\tactive" if active else name)
        elif args.command == "show":
            if args.name is None:
                active = store.active(user)
                if active is None:
                    raise AdminError(f"{user} has no active script")
                print(active[1], end="")
            else:
                print(store.get(user, args.name), end="")
        elif args.command == "put":
            store.put(user, args.name, _read(args.file))
            print(f"stored {args.name!r} for {user}")
        elif args.command == "activate":
            store.set_active(user, args.name)
            print(f"active script of {user}: {args.name!r}" if args.name else f"{user}: no active script")
        return EXIT_OK
    except SieveSyntaxError as error:
        print(f"mailgw sieve: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyError as error:
        print(f"mailgw sieve: no such script: {error.args[0] if error.args else ''}", file=sys.stderr)
        return EXIT_ERROR
    except (AdminError, ScriptStoreError) as error:
        print(f"mailgw sieve: {error}", file=sys.stderr)
        return EXIT_ERROR
