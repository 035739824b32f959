"""`twistd mailgw`: options and the composition root.

This is the main process's composition root (worker.py is an SMTP
worker's): it wires concrete parts together and touches the global reactor:
config -> thread pools, store, spool, users, portal -> one listener per
configured endpoint, and the SMTP workers when configured.
"""
from __future__ import annotations

import os
import pwd
import re

from twisted.application import service
from twisted.cred.checkers import AllowAnonymousAccess
from twisted.cred.portal import Portal
from twisted.logger import Logger
from twisted.python import usage

from mailgw import config as config_module
from mailgw.auth.checkers import PasswordChecker
from mailgw.realm import MailRealm
from mailgw.auth.userdb import UserFile
from mailgw.config_types import SMTP_ROLES, Config
from mailgw.imap.message import MessageCache
from mailgw.store.mailbox import MailStore
from mailgw.durable import DurableWriter
from mailgw.queue import control
from mailgw.queue.outbound import RelayTransport
from mailgw.queue.runner import QueueRunner
from mailgw.queue.spool import Spool, message_reader
from mailgw.mailauth.dns import MailDNS
from mailgw.mailauth.stages import build_resolver, build_stages
from mailgw.spam.learning import build_learner
from mailgw.routing.dispatch import build_router
from mailgw.routing.submit import LocalSubmission
from mailgw.store.maildir import MaildirStore
from mailgw.store.quota import Quota
from mailgw import pidfile, tls
from mailgw.iopool import IOThreadPool
from mailgw.dualstack import IPv6ListenerService, wildcard_port
from mailgw.services import HangupIgnored, ListenerService, ThreadPoolService, listener_factory
from mailgw.twisted_wall import listening_family, stop_accepting
from mailgw.workers import SMTPWorkers

log = Logger()

_PORT_FORMS = (re.compile(r"^(tcp6?:)(\d+)"), re.compile(r"(:port=)(\d+)"))


def offset_endpoint(description: str, offset: int) -> str:
    """Add `offset` to the port of a tcp/tcp6 endpoint string."""
    if not offset:
        return description
    for form in _PORT_FORMS:
        if form.search(description):
            return form.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + offset}", description, count=1)
    return description


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = ("Run the mailgw mail gateway. Without --config it runs on the embedded default "
                "configuration (etc/mailgw.toml in the source tree).")
    optParameters = [
        ["config", "c", None, "Path to the TOML configuration (default: $MAILGW_CONFIG, else embedded default)."],
        ["port-offset", None, "0", "Add N to every TCP port, e.g. 10000 to run unprivileged "
                                   "(25 -> 10025, 465 -> 10465, 587 -> 10587)."],
    ]

    def postOptions(self):
        path = self["config"] or os.environ.get("MAILGW_CONFIG")
        try:
            self["port-offset"] = int(self["port-offset"])
        except ValueError:
            raise usage.UsageError("--port-offset must be an integer")
        try:
            self.config = config_module.load(path)
        except config_module.ConfigError as error:
            raise usage.UsageError("invalid configuration:\n  " + "\n  ".join(error.errors))
        except OSError as error:
            raise usage.UsageError(f"cannot read configuration {path}: {error.strerror}")


def drop_privileges(config: Config) -> None:
    """After every port is bound: hand data_dir to config.user and become it.

    twistd's own --uid/--gid would switch only after our files were made by
    root (and then be unable to open them), so the switch happens here."""
    if not config.user or os.geteuid() != 0:
        return
    account = pwd.getpwnam(config.user)
    for directory, subdirectories, files in os.walk(config.data_dir):
        os.chown(directory, account.pw_uid, account.pw_gid)
        for name in files:
            os.chown(os.path.join(directory, name), account.pw_uid, account.pw_gid, follow_symlinks=False)
    if config.users_file.exists():
        os.chown(config.users_file, account.pw_uid, account.pw_gid)
    os.setgroups([])
    os.setgid(account.pw_gid)
    os.setuid(account.pw_uid)
    log.info("running as {user} (uid {uid}); data in {data_dir}", user=config.user, uid=account.pw_uid,
             data_dir=str(config.data_dir))


class PrivilegeDrop(service.Service):
    """The last service: privilegedStartService runs after every port is
    bound and twistd has written its pidfile, and before anything starts.

    `twistd_options` (twistd's own options, the parent of ours) name the pid
    file: once we are `[server] user`, twistd could not remove it, so a root
    helper (mailgw/pidfile.py) does when we exit and twistd is told not to."""

    def __init__(self, config: Config, twistd_options=None):
        self.config = config
        self.twistd_options = twistd_options
        self._pid_file_pipe = None      # held open until we exit: its EOF tells the helper

    def privilegedStartService(self):
        super().privilegedStartService()
        if self.config.user and os.geteuid() == 0 and self.twistd_options is not None:
            pid_file = self.twistd_options.get("pidfile")
            if pid_file and os.path.exists(pid_file):
                self._pid_file_pipe = pidfile.keep(pid_file)
                self.twistd_options["pidfile"] = ""     # twistd's removePID: nothing to do
        drop_privileges(self.config)


def build(config: Config, reactor, *, port_offset: int = 0, twistd_options=None) -> service.MultiService:
    """Everything mailgw runs, as one MultiService."""
    top = service.MultiService()
    for directory in (config.data_dir, config.mail_dir, config.queue_dir):
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    io_pool = IOThreadPool(maxthreads=config.io_threads, name="mailgw-io")
    # Password hashing gets its own small pool: a burst of logins must not
    # delay fsyncs, and argon2 is deliberately CPU- and memory-hungry.
    auth_pool = IOThreadPool(maxthreads=2, name="mailgw-auth")
    HangupIgnored(reactor).setServiceParent(top)
    ThreadPoolService(io_pool).setServiceParent(top)
    ThreadPoolService(auth_pool).setServiceParent(top)

    # One mailgw per data directory: the lock also tells `mailgw queue` to use
    # the control socket instead of editing the spool files itself.
    top.server_lock = control.acquire_server_lock(config.queue_dir)

    writer = DurableWriter(reactor=reactor, threadpool=io_pool)
    # One quota object per process: delivery, IMAP and the RCPT check share its cached usage.
    quota = Quota(config.mail_dir, config.quota, clock=reactor, threadpool=io_pool,
                  check_interval=config.routing.check_interval)
    mail_store = MailStore(config.mail_dir, reactor=reactor, threadpool=io_pool, writer=writer, clock=reactor,
                           quota=quota)
    # A local delivery wakes the user's IMAP IDLE sessions at once.
    store = MaildirStore(config.mail_dir, writer=writer, hostname=config.hostname,
                         on_delivered=mail_store.delivered, quota=quota)
    spool = Spool(config.queue_dir, writer=writer, reactor=reactor)
    if removed := store.clean_tmp():
        log.info("removed {count} stale file(s) from Maildir tmp/ directories", count=removed)
    waiting = spool.recover()
    if waiting:
        log.info("{count} message(s) waiting in the relay queue", count=len(waiting))

    userdb = UserFile(config.users_file, threadpool=auth_pool, reactor=reactor)
    checker = PasswordChecker(userdb, reactor=reactor, failure_delay=config.smtp.auth_failure_delay,
                              max_delay=config.smtp.auth_max_delay,
                              lockout_failures=config.smtp.auth_lockout_failures,
                              lockout_time=config.smtp.auth_lockout_time)
    router = build_router(config, userdb, reactor=reactor, quota=quota)
    # One resolver for every lookup: MX, SPF, DKIM, DMARC, reverse DNS.
    resolver = build_resolver(config)
    mail_dns = MailDNS(resolver, clock=reactor, timeout=config.dns.timeout)
    router.stages = build_stages(config, router=router, mail_dns=mail_dns, reactor=reactor, threadpool=io_pool)
    # Junk learning (mailgw.spam.learning) reuses the stage's rspamd connections.
    learner = build_learner(config, router.stages.rspamd)
    realm = MailRealm(router=router, store=store, spool=spool, clock=reactor, mail_store=mail_store,
                      learner=learner, junk_folder=config.spam.junk_folder)
    portal = Portal(realm, [checker, AllowAnonymousAccess()])

    read_message = message_reader(reactor, io_pool)
    transport = RelayTransport(config=config, reactor=reactor, resolver=resolver,
                               read_message=read_message)
    runner = QueueRunner(config=config, spool=spool, transport=transport, store=store, router=router,
                         clock=reactor, read_message=read_message)
    runner.load(waiting)
    runner.setServiceParent(top)
    # `mailgw sendmail` submits here: the same resolution and targets as SMTP.
    submitter = LocalSubmission(router=router, store=store, spool=spool, clock=reactor, hostname=config.hostname,
                                max_size=config.smtp.max_message_size, max_recipients=config.smtp.max_recipients)
    control.control_service(reactor, control.socket_path(config.data_dir), runner,
                            submitter).setServiceParent(top)

    tls.ensure_certificate(config.tls, config.hostname)
    if problems := tls.check_files(config.tls):
        # One line naming the file, not a traceback (or, worse, a server whose every handshake fails).
        raise SystemExit("mailgw: cannot start: " + "; ".join(problems))
    tls_options = tls.server_options(config.tls)
    for warning in config_module.placeholder_warnings(config):
        log.warn("{warning}", warning=warning)

    imap_cache = MessageCache()      # parsed headers, shared by the IMAP listeners
    worker_sockets = []              # (name, fd, family) of the SMTP ports the workers accept on
    for listener in config.listeners:
        factory = listener_factory(config, listener, portal=portal, clock=reactor, tls_options=tls_options,
                                   imap_cache=imap_cache, mail_dns=mail_dns)
        description = offset_endpoint(listener.endpoint, port_offset)
        listening = [ListenerService(reactor, description, factory, listener.name)]
        wildcard = wildcard_port(description)
        if wildcard is not None and config.inet_protocols == "all":
            listening.append(IPv6ListenerService(reactor, wildcard, factory, listener.name))
        for each in listening:
            each.setServiceParent(top)
            if config.smtp_workers and listener.role in SMTP_ROLES and each.port is not None:
                # Bound here (as root if need be), accepted on only by the workers.
                stop_accepting(each.port)
                worker_sockets.append((listener.name, each.port.fileno(), listening_family(each.port)))
    if worker_sockets:
        SMTPWorkers(reactor=reactor, clock=reactor, count=config.smtp_workers, config_path=config.source,
                    sockets=worker_sockets, checker=checker, runner=runner, spool=spool,
                    mail_store=mail_store, threadpool=io_pool).setServiceParent(top)
    PrivilegeDrop(config, twistd_options).setServiceParent(top)     # last: after twistd wrote its pidfile
    return top


def makeService(options: Options) -> service.MultiService:
    from twisted.internet import reactor
    return build(options.config, reactor, port_offset=options["port-offset"], twistd_options=options.parent)
