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
from twisted.internet import protocol
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python import usage

from mailgw import config as config_module
from mailgw.auth.checkers import PasswordChecker
from mailgw.realm import MailRealm
from mailgw.auth.userdb import UserFile
from mailgw.config_types import ROLE_ACME_HTTP, ROLE_ACME_TLS, ROLE_HTTP, SMTP_ROLES, Config
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
from mailgw import acme_certs, metrics, ops_http, pidfile, sd_notify, tls
from mailgw.iopool import IOThreadPool
from mailgw.dualstack import IPv6ListenerService, wildcard_port
from mailgw.reload import ReloadRefused, Reloader, check_new_config
from mailgw.services import ListenerService, ThreadPoolService, listener_factory
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

    tls.ensure_certificate(config.tls, config.hostname)
    if problems := tls.check_files(config.tls):
        # One line naming the file, not a traceback (or, worse, a server whose every handshake fails).
        raise SystemExit("mailgw: cannot start: " + "; ".join(problems))
    for warning in config_module.placeholder_warnings(config):
        log.warn("{warning}", warning=warning)

    parts = ServerParts(reactor=reactor, top=top, port_offset=port_offset, io_pool=io_pool, auth_pool=auth_pool,
                        store=store, mail_store=mail_store, spool=spool, quota=quota, checker=checker,
                        userdb=userdb, read_message=message_reader(reactor, io_pool),
                        tls_context=tls.ReloadingTLS(config.tls, clock=reactor))
    if config.tls.acme:
        # Orders block a thread for up to a minute or two (the acme library is synchronous): a pool of its own.
        acme_pool = IOThreadPool(maxthreads=1, name="mailgw-acme")
        ThreadPoolService(acme_pool).setServiceParent(top)
        roles = {listener.role for listener in config.listeners}
        challenges = [kind for kind, role in ((acme_certs.HTTP01, ROLE_ACME_HTTP),
                                              (acme_certs.TLS_ALPN01, ROLE_ACME_TLS))
                      if role in roles]
        parts.acme = acme_certs.CertificateManager(config.tls, reactor=reactor, clock=reactor, threadpool=acme_pool,
                                                   on_installed=parts.tls_context.check_files_changed,
                                                   challenges=challenges)
    parts.configure(config)
    parts.runner.load(waiting)
    parts.runner.setServiceParent(top)
    top.parts = parts
    top.control = control.control_service(reactor, control.socket_path(config.data_dir), parts.runner,
                                          parts.submitter)
    top.control.setServiceParent(top)
    parts.open_listeners(config)
    if parts.worker_sockets:
        parts.workers = SMTPWorkers(reactor=reactor, clock=reactor, count=config.smtp_workers,
                                    config_path=config.source, sockets=parts.worker_sockets, checker=checker,
                                    runner=parts.runner, spool=spool, mail_store=mail_store, threadpool=io_pool)
        parts.workers.setServiceParent(top)
    top.reloader = Reloader(config=config, reactor=reactor, load_config=config_module.load, apply=parts.reconfigure,
                            check=parts.check, notify=sd_notify.Notifier(),
                            run_in_thread=lambda f: deferToThreadPool(reactor, io_pool, f))
    top.reloader.setServiceParent(top)
    if parts.acme is not None:
        parts.acme.setServiceParent(top)        # after the listeners: the CA may call back at once
    top.control.factory.reloader = top.reloader
    sd_notify.ReadyNotifier(reactor).setServiceParent(top)   # READY=1 once every listener is bound and started
    PrivilegeDrop(config, twistd_options).setServiceParent(top)     # last: after twistd wrote its pidfile
    return top


class ServerParts:
    """What a config builds on top of the process's long-lived parts (thread
    pools, durable writer, store, spool, password checker): router, checks,
    realm, portal, relay transport and one protocol factory per listener.
    Built at start by `configure`, and again by each reload
    (mailgw/reload.py), which then switches the listeners to the new
    factories and opens or closes listeners (`reconfigure`)."""

    def __init__(self, *, reactor, top, port_offset, io_pool, auth_pool, store, mail_store, spool, quota,
                 checker, userdb, read_message, tls_context):
        self.reactor = reactor
        self.top = top
        self.port_offset = port_offset
        self.io_pool = io_pool
        self.auth_pool = auth_pool
        self.store = store
        self.mail_store = mail_store
        self.spool = spool
        self.quota = quota
        self.checker = checker
        self.userdb = userdb
        self.read_message = read_message
        self.tls_context = tls_context
        self.imap_cache = MessageCache()      # parsed headers, shared by the IMAP listeners
        self.config: Config | None = None
        self.runner: QueueRunner | None = None
        self.workers: SMTPWorkers | None = None
        self.worker_sockets = []              # (name, fd, family) of the SMTP ports the workers accept on
        self.listening: dict[str, list] = {}  # listener name -> [ListenerService (+ its IPv6 twin)]
        self.factories: dict[str, object] = {}
        self.pop3_locks = None
        self.acme = None                      # mailgw.acme_certs.CertificateManager with [tls] acme
        self.acme_factories: dict[str, object] = {}
        self.ops_site = None                  # the http role's Site (mailgw/ops_http.py), made on first use

    def configure(self, config: Config) -> None:
        """Build the config's parts (not the listeners: `open_listeners`)."""
        reactor = self.reactor
        if self.config is not None and config.users_file != self.config.users_file:
            self.userdb = UserFile(config.users_file, threadpool=self.auth_pool, reactor=reactor)
        else:
            self.userdb.refresh_now()
        smtp = config.smtp
        self.checker.reconfigure(self.userdb, failure_delay=smtp.auth_failure_delay, max_delay=smtp.auth_max_delay,
                                 lockout_failures=smtp.auth_lockout_failures, lockout_time=smtp.auth_lockout_time)
        self.quota.reconfigure(config.quota, check_interval=config.routing.check_interval)
        router = build_router(config, self.userdb, reactor=reactor, quota=self.quota, threadpool=self.io_pool)
        router.local_submission = LocalSubmission
        # One resolver for every lookup: MX, SPF, DKIM, DMARC, reverse DNS.
        resolver = build_resolver(config)
        self.mail_dns = MailDNS(resolver, clock=reactor, timeout=config.dns.timeout)
        router.stages = build_stages(config, router=router, mail_dns=self.mail_dns, reactor=reactor,
                                     threadpool=self.io_pool)
        # Junk learning (mailgw.spam.learning) reuses the stage's rspamd connections.
        learner = build_learner(config, router.stages.rspamd)
        realm = MailRealm(router=router, store=self.store, spool=self.spool, clock=reactor, mail_store=self.mail_store,
                          learner=learner, junk_folder=config.spam.junk_folder)
        # RFC 1939 §8: one set of maildrop locks for the process, whichever config a session started under.
        if self.pop3_locks is None:
            self.pop3_locks = realm.pop3_locks
        realm.pop3_locks = self.pop3_locks
        self.portal = Portal(realm, [self.checker, AllowAnonymousAccess()])
        transport = RelayTransport(config=config, reactor=reactor, resolver=resolver, read_message=self.read_message)
        if self.runner is None:
            self.runner = QueueRunner(config=config, spool=self.spool, transport=transport, store=self.store,
                                      router=router, clock=reactor, read_message=self.read_message)
        else:
            # Deliveries under way finish on the transport they started with.
            self.runner.reconfigure(config=config, transport=transport, router=router)
        # `mailgw sendmail` submits here: the same resolution and targets as SMTP.
        self.submitter = LocalSubmission(router=router, store=self.store, spool=self.spool, clock=reactor,
                                         hostname=config.hostname, max_size=smtp.max_message_size,
                                         max_recipients=smtp.max_recipients)
        if self.config is not None:
            self.top.control.factory.submitter = self.submitter
            self.tls_context.install(tls.server_options(config.tls), tls=config.tls)
        self.config = config
        self.factories = {listener.name: self._factory(config, listener) for listener in config.listeners
                          if not (config.smtp_workers and listener.role in SMTP_ROLES)}

    def _factory(self, config: Config, listener):
        if listener.role in (ROLE_ACME_HTTP, ROLE_ACME_TLS):
            # One manager for the process (its settings are restart-only): the same factory each reload.
            if listener.role not in self.acme_factories:
                make = acme_certs.http01_site if listener.role == ROLE_ACME_HTTP else acme_certs.tls_alpn01_factory
                self.acme_factories[listener.role] = make(self.acme)
            return self.acme_factories[listener.role]
        if listener.role == ROLE_HTTP and self.ops_site is None:
            # /metrics, /healthz, /readyz: one Site for the process, whatever the reloads.
            self.ops_site = ops_http.site_for_parts(self, reactor=self.reactor, threadpool=self.io_pool)
            # Every mailgw_ metric has its HELP and TYPE from the first scrape on.
            metrics.DEFAULT.declare(*metrics.catalog())
        return listener_factory(config, listener, portal=self.portal, clock=self.reactor, tls_options=self.tls_context,
                                imap_cache=self.imap_cache, mail_dns=self.mail_dns, ops_site=self.ops_site)

    def open_listeners(self, config: Config) -> None:
        """Bind and start every listener of the config (at start-up)."""
        for listener in config.listeners:
            if config.smtp_workers and listener.role in SMTP_ROLES:
                factory = self._factory(config, listener)      # the main process only holds the socket
            else:
                factory = self.factories[listener.name]
            self._start_listening(config, listener, self._bind(config, listener, factory))

    def _bind(self, config: Config, listener, factory) -> list[ListenerService]:
        """Bound ports (not started); SystemExit with one clear line if one cannot be."""
        description = offset_endpoint(listener.endpoint, self.port_offset)
        listening = [ListenerService(self.reactor, description, factory, listener.name)]
        wildcard = wildcard_port(description)
        if wildcard is not None and config.inet_protocols == "all":
            try:
                listening.append(IPv6ListenerService(self.reactor, wildcard, factory, listener.name))
            except SystemExit:
                listening[0].stop_accepting_only()
                raise
        return listening

    def _start_listening(self, config: Config, listener, listening: list[ListenerService]) -> None:
        for each in listening:
            each.setServiceParent(self.top)
            if config.smtp_workers and listener.role in SMTP_ROLES and each.port is not None:
                # Bound here (as root if need be), accepted on only by the workers.
                stop_accepting(each.port)
                self.worker_sockets.append((listener.name, each.port.fileno(), listening_family(each.port)))
        self.listening[listener.name] = listening

    def check(self, config: Config) -> list[str]:
        """Why `config` cannot be switched to (besides mailgw/reload.py's own checks)."""
        problems = check_new_config(config)
        if self.workers is not None:
            def smtp(listeners):
                return {listener.name: listener for listener in listeners if listener.role in SMTP_ROLES}
            if smtp(self.config.listeners) != smtp(config.listeners):
                problems.append("listeners: the SMTP listeners changed while server.smtp_workers > 0 (the workers "
                                "hold their sockets): only a restart applies it")
        return problems

    def reconfigure(self, config: Config) -> list[str]:
        """Switch to `config` (already checked by the Reloader); what changed.
        New listeners are bound first, so one that cannot be (a port taken, or
        below 1024 after the privilege drop) refuses the reload before
        anything changed."""
        old = self.config
        old_listeners = {listener.name: listener for listener in old.listeners}
        new_listeners = {listener.name: listener for listener in config.listeners}
        removed = [name for name, listener in old_listeners.items() if new_listeners.get(name) != listener]
        added = [name for name, listener in new_listeners.items() if old_listeners.get(name) != listener]
        bound: dict[str, list[ListenerService]] = {}
        try:
            for name in added:
                # Nothing is accepted before the real factory is in (the same reactor turn).
                bound[name] = self._bind(config, new_listeners[name], _NOT_YET)
        except SystemExit as error:
            for listening in bound.values():
                for each in listening:
                    each.stop_accepting_only()
            raise ReloadRefused([line.removeprefix("mailgw: ") for line in str(error).splitlines()])

        changes = [] if old == config else ["configuration re-read"]
        self.configure(config)
        for name, listener in new_listeners.items():
            if name in added or name not in self.factories:
                continue
            for each in self.listening.get(name, ()):
                _switch_factory(each, self.factories[name])
        for name in removed:
            for each in self.listening.pop(name, ()):
                each.stop_accepting_only()      # its sessions finish; the service ends them at shutdown
            changes.append(f"listener {name} closed")
        for name, listening in bound.items():
            for each in listening:
                _switch_factory(each, self.factories[name])
            self._start_listening(config, new_listeners[name], listening)
            changes.append(f"listener {name} opened on {new_listeners[name].endpoint}")
        if self.workers is not None:
            self.workers.reload()
            changes.append("SMTP workers told to reload")
        return changes


class _NotYet(protocol.ServerFactory):
    """The factory of a port bound by a reload until its real one is in."""

    noisy = False

    def buildProtocol(self, addr):
        return None         # Twisted closes the connection


_NOT_YET = _NotYet()


def _inner_factory(factory):
    return getattr(factory, "wrappedFactory", factory)     # inside TLSMemoryBIOFactory on implicit TLS


def _switch_factory(listening: ListenerService, factory) -> None:
    """New connections on this port get `factory`; the connections open keep theirs."""
    inner_new, inner_old = _inner_factory(factory), _inner_factory(listening.factory)
    if hasattr(inner_new, "take_over") and hasattr(inner_old, "sessions") and inner_old is not inner_new:
        inner_new.take_over(inner_old)
    listening.factory = factory
    if listening.port is not None:
        listening.port.factory = factory


def makeService(options: Options) -> service.MultiService:
    from twisted.internet import reactor
    return build(options.config, reactor, port_offset=options["port-offset"], twistd_options=options.parent)
