"""Reload without a restart: SIGHUP and `mailgw reload`.

A reload re-reads the config file the server started with and everything it
names (users, aliases, DKIM keys, TLS certificate and key), checks all of it,
and only then switches: on any problem nothing changes, every problem is
logged and returned to `mailgw reload` (exit 1), like `mailgw check`.

What a switch means (`apply`, given by the composition root, tap.py):
new connections get factories built from the new config (router, checks,
limits, TLS); a listener added in the config is bound, a removed one stops
accepting; sessions already open finish on the parts they started with
(an IMAP IDLE session stays, a transaction in DATA ends as it began). The
relay queue keeps its entries and takes the new queue settings at its next
attempt. Some settings are the process's own and need a restart
(`RESTART_ONLY`): changing one of them is refused with that reason, so a
reload never half-applies a config.

Users, aliases and quota overrides are also re-read by themselves when
their files change (mailgw/watched.py); a reload makes it immediate and
reports a broken file instead of logging it.
"""
from __future__ import annotations

import signal

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from mailgw.config_types import Config

log = Logger()

# Config fields only a restart can change: the data directory and the
# process's shape (privileges, threads, worker processes, address families).
RESTART_ONLY = ("data_dir", "user", "io_threads", "smtp_workers", "inet_protocols")


class ReloadRefused(Exception):
    """Raised by `apply` when it finds, before changing anything, that the
    config cannot be switched to (a new port that cannot be bound)."""

    def __init__(self, errors: list[str]):
        super().__init__("; ".join(errors))
        self.errors = list(errors)


# The ACME account and its timers are the process's too (mailgw/acme_certs.py).
RESTART_ONLY_TLS = ("acme", "acme_contact", "acme_directory", "acme_names", "acme_ca_file")


def restart_only_changes(old: Config, new: Config) -> list[str]:
    problems = [f"server.{name}: changed from {getattr(old, name)!r} to {getattr(new, name)!r}; "
                "only a restart applies it" for name in RESTART_ONLY if getattr(old, name) != getattr(new, name)]
    if old.tls.acme or new.tls.acme:        # acme_names follows the hostname even with ACME off
        problems += [f"tls.{name}: changed; only a restart applies it" for name in RESTART_ONLY_TLS
                     if getattr(old.tls, name) != getattr(new.tls, name)]
    return problems


def check_new_config(new: Config) -> list[str]:
    """Everything a new config names that could stop it from serving: the
    TLS pair, the users file, the alias table, the DKIM keys. One line per
    problem, naming the file (and line)."""
    from mailgw.auth.userdb import read_users
    from mailgw.mailauth.keys import DKIMKeyStore
    from mailgw.routing.aliases import read_aliases
    from mailgw.tls import check_files

    problems = list(check_files(new.tls))
    try:
        _, user_problems = read_users(new.users_file)
    except FileNotFoundError:
        user_problems = []
    except OSError as error:
        user_problems = [(0, f"cannot read: {error.strerror}")]
    problems += [f"{new.users_file}:{line}: {reason}" for line, reason in user_problems]
    routing = new.routing
    if routing is not None:
        try:
            _, alias_problems = read_aliases(routing.aliases_file, new.local_domains,
                                             max_depth=routing.max_alias_depth, max_expansion=routing.max_expansion)
        except OSError as error:
            alias_problems = [(0, f"cannot read: {error.strerror}")]
        problems += [f"{routing.aliases_file}:{line}: {reason}" for line, reason in alias_problems]
    if new.dkim is not None and new.dkim.sign:
        problems += [f"dkim: {problem}" for problem in DKIMKeyStore(new.dkim.keys_dir).problems]
    return problems


class Reloader(service.Service):
    """Owns SIGHUP while the server runs and serves the control socket's
    `reload`. `load_config(path)` -> Config (raises config.ConfigError);
    `apply(config)` -> [what changed] switches the server to it (must not
    fail once checks passed; if it does, the error is reported and the
    server goes on with what it has). One reload at a time: a second
    request while one runs waits for it and then runs, so a SIGHUP after
    an edit is never lost."""

    def __init__(self, *, config: Config, reactor, load_config, apply, check=check_new_config, notify=None,
                 run_in_thread=None):
        self.reactor = reactor
        # f -> Deferred of f() off the reactor thread (tap: the I/O pool); None: inline (tests).
        self._run_in_thread = run_in_thread if run_in_thread is not None else (lambda f: f())
        self.config = config
        self._load_config = load_config
        self._apply = apply
        self._check = check
        self._notify = notify               # mailgw.sd_notify-like: reloading(), ready(); or None
        self._previous_handler = None
        self._tail: defer.Deferred = defer.succeed(None)
        self.reloads = 0                    # counters for metrics
        self.failures = 0

    # -- SIGHUP ------------------------------------------------------------------
    def startService(self):
        super().startService()
        self._previous_handler = signal.signal(signal.SIGHUP, self._hangup)

    def stopService(self):
        super().stopService()
        if self._previous_handler is not None:
            signal.signal(signal.SIGHUP, self._previous_handler)
            self._previous_handler = None

    def _hangup(self, signum, frame):
        # In a signal handler: only hand the work to the reactor.
        self.reactor.callFromThread(self.reload, "SIGHUP")

    # -- reloading ---------------------------------------------------------------
    def reload(self, why: str = "mailgw reload") -> defer.Deferred:
        """Fires with {"ok": bool, "errors": [...], "changes": [...]}; never fails."""
        done = defer.Deferred()

        def run(_):
            d = self._reload_now(why)
            d.addCallback(done.callback)
            return d.addErrback(lambda failure: None)

        self._tail.addCallback(run)
        return done

    def _reload_now(self, why: str) -> defer.Deferred:
        log.info("reloading the configuration ({why})", why=why)
        if self._notify is not None:
            self._notify.reloading()
        # Reading and checking the files (config, users, aliases, keys, TLS) is
        # file I/O: in the thread pool. The switch itself is the reactor's.
        d = defer.maybeDeferred(self._run_in_thread, self._read_and_check)
        d.addCallback(self._switch)
        d.addErrback(self._broken, "reading and checking the new configuration")
        d.addCallback(self._report)
        return d

    def _read_and_check(self):
        """(the new Config, None) or (None, the refusal); blocking."""
        from mailgw import config as config_module

        path = self.config.source
        try:
            new = self._load_config(path)
        except config_module.ConfigError as error:
            return None, _refused(list(error.errors))
        except OSError as error:
            return None, _refused([f"cannot read {path}: {error.strerror}"])
        problems = restart_only_changes(self.config, new)
        try:
            problems += self._check(new)
        except Exception as error:      # a check that breaks is a refusal, never a half reload
            log.failure("reload: checking the new configuration failed")
            problems.append(f"checking the new configuration failed: {error}")
        return (None, _refused(problems)) if problems else (new, None)

    def _switch(self, checked) -> dict:
        new, refusal = checked
        if refusal is not None:
            return refusal
        try:
            changes = self._apply(new)
        except ReloadRefused as error:
            return _refused(error.errors)
        except Exception:
            log.failure("reload: applying the new configuration failed")
            return _refused(["applying the new configuration failed (see the server log); "
                             "the server may run partly on the new settings: restart it"])
        self.config = new
        return {"ok": True, "errors": [], "changes": changes}

    def _broken(self, failure, what: str) -> dict:
        log.failure("reload: {what} failed", failure, what=what)
        return _refused([f"{what} failed (see the server log)"])

    def _report(self, result: dict) -> dict:
        if self._notify is not None:
            self._notify.ready()
        if result["ok"]:
            self.reloads += 1
            log.info("reload done: {changes}", changes="; ".join(result["changes"]) or "nothing changed")
        else:
            self.failures += 1
            for line in result["errors"]:
                log.error("reload refused, nothing changed: {error}", error=line)
        return result


def _refused(errors: list[str]) -> dict:
    return {"ok": False, "errors": list(errors), "changes": []}


def reload_main(argv: list[str]) -> int:
    """`mailgw reload [--config PATH]`: ask the running server to reload
    (through its control socket) and print what changed or every reason it
    refused. Exit 0 reloaded, 1 refused or no server."""
    import argparse
    import os
    import sys

    from mailgw import config as config_module
    from mailgw.queue import control

    parser = argparse.ArgumentParser(prog="mailgw reload",
                                     description="Reload the running server's configuration, users, aliases, "
                                                 "DKIM keys and TLS certificate (like SIGHUP), and report.")
    parser.add_argument("--config", metavar="PATH", default=os.environ.get(config_module.CONFIG_ENV_VAR) or None,
                        help="the server's config file (to find its data directory)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        config = config_module.load(args.config)
    except config_module.ConfigError as error:
        # The server would refuse the same file for the same reasons: nothing is sent.
        print("mailgw reload: the configuration has errors; the running server keeps its own:", file=sys.stderr)
        for line in error.errors:
            print(f"error: {line}", file=sys.stderr)
        return 1
    path = control.socket_path(config.data_dir)
    try:
        client = control.connect(path)
        if client is None:
            print(f"mailgw reload: no server is running (nothing listens on {path})", file=sys.stderr)
            return 1
        with client:
            result = client.call({"cmd": "reload"}, timeout=120.0)
    except (OSError, control.ControlError) as error:
        print(f"mailgw reload: {error}", file=sys.stderr)
        return 1
    if not result["ok"]:
        print("mailgw reload: refused, nothing changed:", file=sys.stderr)
        for line in result["errors"]:
            print(f"error: {line}", file=sys.stderr)
        return 1
    print("reloaded" + (": " + "; ".join(result["changes"]) if result["changes"] else ": nothing changed"))
    return 0
