"""`mailgw`: the admin command.

    mailgw check [--config PATH]          validate the configuration, start nothing
    mailgw reload [--config PATH]         make the running server re-read its configuration (SIGHUP)
    mailgw users add|passwd|delete|list   manage the users file (passwords from a prompt or stdin)
    mailgw queue list|show|flush|stats|hold|release|delete|bounce   the relay queue, running or not
    mailgw aliases add|delete|show|list   the alias table (lists, forwards, catch-alls, domain aliases)
    mailgw resolve ADDRESS                what an address leads to (postmap -q / sendmail -bv)
    mailgw quota show|set|list            mailbox quotas
    mailgw sendmail [-t] [-i] [-f ...]    submit a message from stdin, like sendmail(1)
    mailgw dkim keygen|list|activate|remove   DKIM signing keys and the records to publish
    mailgw doctor [DOMAIN]                the DNS and TLS checks before going live
    mailgw sieve list|show|put|activate|check   users' Sieve scripts
    mailgw --version                      the installed version

Each subcommand lives next to what it manages; this module only dispatches.
"""
from __future__ import annotations

import sys

USAGE = """usage: mailgw COMMAND [--config PATH] ...

commands:
  check                      validate the configuration and exit (non-zero on error)
  reload                     the running server re-reads config, users, aliases, DKIM keys, certificates
  users add ADDRESS          create a user (password from a prompt, or one line on stdin)
  users passwd ADDRESS       change a password
  users delete ADDRESS       remove a user
  users list                 list users
  queue list [--json]        list the relay queue, oldest first
  queue show [--json] ID     one queued message: envelope, history, headers
  queue flush [ID...]        try queued messages now (all without IDs)
  queue stats [--json]       messages queued and held; with the server running, deliveries in progress
  queue hold ID              do not try a message until released
  queue release ID           undo hold and try it now
  queue delete ID            remove a message (the sender is not notified)
  queue bounce ID            give up on a message and notify the sender
  aliases add ALIAS TARGET... [--send-as]   create an alias or add targets (@domain: catch-all or domain alias)
  aliases delete ALIAS [TARGET...]          remove an alias, or some of its targets
  aliases show ALIAS         one alias
  aliases list               every alias, catch-all and domain alias
  resolve ADDRESS...         print where mail to ADDRESS goes, one target per line
  quota show USER            a mailbox's usage and limits
  quota set USER [--bytes SIZE] [--messages N]   override the default limits
  quota list                 the overrides
  sendmail [-t] [-i] [-f SENDER] [-F NAME] [RCPT...]   queue a message read from stdin (cron, web apps)
  dkim keygen DOMAIN [--selector S] [--algorithm rsa|ed25519]   a signing key and its DNS record
  dkim list                  every key: domain, selector, algorithm, active or only published
  dkim activate DOMAIN SELECTOR   sign with this key from now on (rotation, docs/dkim.md)
  dkim remove DOMAIN SELECTOR     delete a key that no longer signs
  doctor [DOMAIN] [--nameserver IP[:PORT]]   MX, PTR, SPF, DKIM, DMARC and TLS checks, with fixes
  sieve list USER            a user's Sieve scripts, the active one marked
  sieve show USER [NAME]     print a script (the active one without NAME)
  sieve put USER NAME [FILE] store a script (refused with line and column if it does not compile)
  sieve activate USER NAME   the script that runs at delivery ("" for none)
  sieve check [FILE]         compile a script and say what is wrong

options:
  --version                  print the version and exit
  --help                     this text

The server itself: twistd -n mailgw [--config PATH] (see twistd mailgw --help).
"""


def version() -> str:
    """The installed distribution's version (pyproject.toml), or the source tree's."""
    from importlib import metadata
    try:
        return metadata.version("mailgw")
    except metadata.PackageNotFoundError:     # run from a checkout that was never installed
        from mailgw import __version__
        return __version__


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if args else 2
    if args[0] in ("-V", "--version", "version"):
        print(f"mailgw {version()}")
        return 0
    command, rest = args[0], args[1:]
    if command == "check":
        from mailgw.config import check_main
        return check_main(rest)
    if command == "reload":
        from mailgw.reload import reload_main
        return reload_main(rest)
    if command == "users":
        from mailgw.auth.admin import users_main
        return users_main(rest)
    if command == "queue":
        from mailgw.queue.admin import queue_main
        return queue_main(rest)
    if command == "aliases":
        from mailgw.routing.admin import aliases_main
        return aliases_main(rest)
    if command == "resolve":
        from mailgw.routing.admin import resolve_main
        return resolve_main(rest)
    if command == "quota":
        from mailgw.store.quota_admin import quota_main
        return quota_main(rest)
    if command == "dkim":
        from mailgw.mailauth.dkim_admin import dkim_main
        return dkim_main(rest)
    if command == "doctor":
        from mailgw.mailauth.doctor import doctor_main
        return doctor_main(rest)
    if command == "sieve":
        from mailgw.sieve.admin import sieve_main
        return sieve_main(rest)
    if command == "sendmail":
        from mailgw.sendmail import main as sendmail_main
        return sendmail_main(rest)
    print(f"mailgw: unknown command {command!r}\n\n{USAGE}", end="", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
