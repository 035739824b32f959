"""`mailgw dkim ...`: DKIM keys, their DNS records, which of them sign.

The keys live in [dkim] keys_dir (default <data_dir>/dkim), laid out as
mailgw.mailauth.keys describes. A running server notices a new, activated or
removed key within a few seconds, no restart.

Exit codes: 0 done, 1 the request cannot be done (unknown key, selector
taken, the active key without --force, a configuration error), 2 usage error.
"""
from __future__ import annotations

import argparse
import os
import sys

from mailgw.admin_cli import EXIT_ERROR, EXIT_OK, EXIT_USAGE, AdminError, Parser, UsageError, load_config
from mailgw.mailauth import keys as keys_module

DKIM_USAGE = """usage: mailgw dkim keygen DOMAIN [--selector S] [--algorithm rsa|ed25519] [--bits N] [--config PATH]
       mailgw dkim list [DOMAIN]                     [--config PATH]
       mailgw dkim activate DOMAIN SELECTOR          [--config PATH]
       mailgw dkim remove DOMAIN SELECTOR [--force]  [--config PATH]

  keygen    makes a key (default rsa, 2048 bits; selector "rsaYYYYMM" or
            "edYYYYMM") and prints the TXT record to publish. The first key
            of an algorithm for a domain signs at once; a later one is only
            published until you activate it.
  list      every key: domain, selector, algorithm, bits, active/published
  activate  makes the key the signing key of its algorithm, once its TXT
            record is in DNS; the previous key stays published
  remove    deletes a key that no longer signs (--force: even the active one;
            the domain is then not signed with that algorithm). Remove its
            TXT record a few days later, when mail signed with it is delivered.

Rotation, step by step: docs/dkim.md.
"""


class _Problems:
    """Prints the store's load problems once, as warnings."""

    def __init__(self):
        self.seen: set[str] = set()

    def show(self, store) -> None:
        for problem in store.problems:
            if problem not in self.seen:
                self.seen.add(problem)
                print(f"mailgw dkim: warning: {problem}", file=sys.stderr)


def keys_directory(config) -> str:
    """[dkim] keys_dir when the config has it, else <data_dir>/dkim."""
    dkim = getattr(config, "dkim", None)
    if dkim is not None and getattr(dkim, "keys_dir", None):
        return os.fspath(dkim.keys_dir)
    return os.path.join(config.data_dir, "dkim")


def _parser() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    common.add_argument("--config", metavar="PATH")
    parser = Parser(prog="mailgw dkim", add_help=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    keygen = commands.add_parser("keygen", parents=[common], add_help=False)
    keygen.add_argument("domain")
    keygen.add_argument("--selector")
    keygen.add_argument("--algorithm", choices=keys_module.ALGORITHMS, default="rsa")
    keygen.add_argument("--bits", type=int)
    listing = commands.add_parser("list", parents=[common], add_help=False)
    listing.add_argument("domain", nargs="?")
    activate = commands.add_parser("activate", parents=[common], add_help=False)
    activate.add_argument("domain")
    activate.add_argument("selector")
    remove = commands.add_parser("remove", parents=[common], add_help=False)
    remove.add_argument("domain")
    remove.add_argument("selector")
    remove.add_argument("--force", action="store_true")
    return parser


def dkim_main(argv: list[str]) -> int:
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help", "help") or argv[-1] in ("-h", "--help"):
        print(DKIM_USAGE, end="", file=sys.stdout if argv else sys.stderr)
        return EXIT_OK if argv else EXIT_USAGE
    try:
        args = _parser().parse_args(argv)
        if args.command == "keygen" and args.bits is not None and args.algorithm != "rsa":
            raise UsageError("--bits is for rsa keys only (Ed25519 keys have one size)")
    except UsageError as error:
        print(f"mailgw dkim: {error}\n\n{DKIM_USAGE}", end="", file=sys.stderr)
        return EXIT_USAGE
    problems = _Problems()
    try:
        config = load_config(args.config)
        store = keys_module.DKIMKeyStore(keys_directory(config))
        problems.show(store)
        try:
            return _COMMANDS[args.command](store, args)
        finally:
            problems.show(store)
    except keys_module.KeyStoreError as error:
        print(f"mailgw dkim: {error}", file=sys.stderr)
        return EXIT_ERROR
    except AdminError as error:
        print(f"mailgw dkim: {error}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as error:
        print(f"mailgw dkim: {error.filename or 'key store'}: {error.strerror or error}", file=sys.stderr)
        return EXIT_ERROR


def _keygen(store, args) -> int:
    bits = args.bits if args.bits is not None else keys_module.DEFAULT_RSA_BITS
    key = store.keygen(args.domain, args.selector, args.algorithm, bits)
    size = f", {key.bits} bits" if key.bits else ""
    print(f"created {key.path} ({key.algorithm}{size})")
    if key.active:
        print(f"It signs mail from {key.domain} now: publish this record before sending.")
    else:
        print(f"It is published only: add this record, wait until DNS serves it "
              f"(dig +short TXT {key.dns_name}), then\n"
              f"  mailgw dkim activate {key.domain} {key.selector}")
    print()
    print("Zone file:")
    print(f"  {key.zone_record}")
    print()
    print(f"On one line, for a DNS provider's web form (name {key.dns_name}, type TXT):")
    print(f"  {key.dns_record}")
    return EXIT_OK


def _list(store, args) -> int:
    keys = store.keys(args.domain)
    if args.domain is not None and not keys:
        raise keys_module.KeyStoreError(f"no keys for {args.domain}")
    rows = [("DOMAIN", "SELECTOR", "ALGORITHM", "BITS", "STATE")]
    rows += [(k.domain, k.selector, k.algorithm, str(k.bits) if k.bits else "-",
              "active" if k.active else "published") for k in keys]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return EXIT_OK


def _activate(store, args) -> int:
    previous = store.activate(args.domain, args.selector)
    key = store.get(args.domain, args.selector)
    print(f"{key.domain}: {key.selector} is now the {key.algorithm} signing key")
    if previous is not None:
        print(f"{previous.selector} stays published, so mail it signed still verifies; when that mail is "
              f"delivered (a few days):\n  mailgw dkim remove {key.domain} {previous.selector}")
    return EXIT_OK


def _remove(store, args) -> int:
    key = store.remove(args.domain, args.selector, force=args.force)
    print(f"removed {key.path}")
    if key.active:
        print(f"{key.domain} is no longer signed with {key.algorithm}.")
    print(f"Delete the TXT record {key.dns_name} once the mail it signed has been delivered (a few days).")
    return EXIT_OK


_COMMANDS = {"keygen": _keygen, "list": _list, "activate": _activate, "remove": _remove}
