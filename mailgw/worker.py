"""`python -m mailgw.worker`: one SMTP worker process, started by the main
process (workers.SMTPWorkers) with the listening sockets from fd 3 on and
the pipe to the main process on stdin/stdout. The composition root of a
worker, as tap.py is the main process's: it wires the SMTP half of mailgw
(store, spool, router, realm) with a password checker that asks the main
process.
"""
from __future__ import annotations

import argparse
import os
import sys

from twisted.application import service
from twisted.cred.checkers import AllowAnonymousAccess
from twisted.cred.portal import Portal
from twisted.internet import defer, stdio
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, globalLogBeginner

from mailgw import config as config_module
from mailgw import metrics, ops_http, tls
from mailgw.auth.userdb import UserFile
from mailgw.config_types import SMTP_ROLES, Config
from mailgw.durable import DurableWriter
from mailgw.queue.spool import Spool
from mailgw.realm import MailRealm
from mailgw.mailauth.dns import MailDNS
from mailgw.mailauth.stages import build_resolver, build_stages
from mailgw.routing.dispatch import build_router
from mailgw.routing.submit import LocalSubmission
from mailgw.store.maildir import MaildirStore
from mailgw.store.quota import Quota
from mailgw.iopool import IOThreadPool
from mailgw.services import ThreadPoolService, end_sessions, listener_factory
from mailgw.twisted_wall import accept_exclusively
from mailgw.workers import (FLUSH_DELAY, MasterLink, RemoteChecker, StderrLog, WorkerMetricsReporter,
                            ignore_terminal_signals)

log = Logger()


class AdoptedPorts(service.Service):
    """The inherited listening sockets, accepted on while the service runs."""

    def __init__(self, reactor, sockets, names=()):
        self.reactor = reactor
        self.sockets = sockets          # [(fd, family, factory)]
        self.listener_names = list(names) or [None] * len(sockets)
        self.ports = []
        self.names = {}                 # port -> listener name, for a reload

    def startService(self):
        super().startService()
        for (fd, family, factory), name in zip(self.sockets, self.listener_names):
            port = self.reactor.adoptStreamPort(fd, family, factory)
            os.close(fd)      # adoptStreamPort made its own copy
            accept_exclusively(self.reactor, port)
            self.ports.append(port)
            self.names[port] = name

    def stopService(self):
        super().stopService()
        ports, self.ports = self.ports, []
        for port in ports:
            port.stopListening()
        # The main process closed our pipe: 421 to our SMTP clients, as the
        # main process's listeners do (services.ListenerService).
        return defer.DeferredList([end_sessions(self.reactor, factory) for _, _, factory in self.sockets])


def build(config: Config, reactor, *, sockets, link: MasterLink) -> service.MultiService:
    """Everything one worker runs. `sockets`: [(listener name, fd, family)]."""
    # Connection limits count per worker: dividing them would refuse a client
    # below the configured figure whenever the kernel hands one worker most
    # connections (EPOLLEXCLUSIVE wakes the same idle worker first).
    top = service.MultiService()
    io_pool = IOThreadPool(maxthreads=config.io_threads, name="mailgw-io")
    ThreadPoolService(io_pool).setServiceParent(top)

    writer = DurableWriter(reactor=reactor, threadpool=io_pool)
    quota = Quota(config.mail_dir, config.quota, clock=reactor, threadpool=io_pool,
                  check_interval=config.routing.check_interval)
    store = MaildirStore(config.mail_dir, writer=writer, hostname=config.hostname,
                         on_delivered=lambda addresses: link.send("delivered", _as_list(addresses)), quota=quota)
    spool = Spool(config.queue_dir, writer=writer, reactor=reactor)
    spool.add_listener(lambda envelope: link.send("queued", envelope))
    userdb = UserFile(config.users_file, threadpool=io_pool, reactor=reactor)
    tls_context = tls.ReloadingTLS(config.tls, clock=reactor)     # the main process made the certificate
    parts = WorkerParts(reactor=reactor, io_pool=io_pool, store=store, spool=spool, quota=quota, userdb=userdb,
                        link=link, tls_context=tls_context)
    factories = parts.configure(config)
    adopted = []
    for name, fd, family in sockets:
        if name not in factories:
            raise SystemExit(f"mailgw worker: listener {name!r} is not an SMTP listener")
        adopted.append((fd, family, factories[name]))
    parts.ports = AdoptedPorts(reactor, adopted, names=[name for name, _, _ in sockets])
    parts.ports.setServiceParent(top)
    top.parts = parts
    # Metrics: this worker's counts go to the main process (mailgw/metrics.py, "Worker mode").
    ops_http.watch_worker(metrics.DEFAULT, lambda: _current_factories(parts.ports))
    WorkerMetricsReporter(link, clock=reactor).setServiceParent(top)
    return top


def _current_factories(ports: AdoptedPorts) -> dict:
    """{listener name: factory} of the adopted ports now (a reload switches them)."""
    if ports.ports:
        return {ports.names.get(port): port.factory for port in ports.ports}
    return {name: factory for (_, _, factory), name in zip(ports.sockets, ports.listener_names)}


class WorkerParts:
    """What a config builds in a worker (router, checks, realm, portal, the
    SMTP factories); again on each reload the main process passes on."""

    def __init__(self, *, reactor, io_pool, store, spool, quota, userdb, link, tls_context):
        self.reactor, self.io_pool, self.store, self.spool = reactor, io_pool, store, spool
        self.quota, self.userdb, self.link, self.tls_context = quota, userdb, link, tls_context
        self.config: Config | None = None
        self.ports: AdoptedPorts | None = None

    def configure(self, config: Config) -> dict:
        reactor = self.reactor
        if self.config is not None:
            self.quota.reconfigure(config.quota, check_interval=config.routing.check_interval)
            self.tls_context.install(tls.server_options(config.tls), tls=config.tls)
            if config.users_file != self.config.users_file:
                self.userdb = UserFile(config.users_file, threadpool=self.io_pool, reactor=reactor)
            else:
                self.userdb.refresh_now()
        router = build_router(config, self.userdb, reactor=reactor, quota=self.quota, threadpool=self.io_pool)
        router.local_submission = LocalSubmission
        mail_dns = MailDNS(build_resolver(config), clock=reactor, timeout=config.dns.timeout)
        router.stages = build_stages(config, router=router, mail_dns=mail_dns, reactor=reactor,
                                     threadpool=self.io_pool)
        realm = MailRealm(router=router, store=self.store, spool=self.spool, clock=reactor)
        portal = Portal(realm, [RemoteChecker(self.link), AllowAnonymousAccess()])
        self.config = config
        return {listener.name: listener_factory(config, listener, portal=portal, clock=reactor,
                                                tls_options=self.tls_context, mail_dns=mail_dns)
                for listener in config.listeners if listener.role in SMTP_ROLES}

    def reload(self, path) -> None:
        """The main process reloaded (it checked the file): the same file, new factories."""
        try:
            config = config_module.load(path)
            factories = self.configure(config)
        except Exception as error:      # the main process refused nothing, so this is a race with an edit
            log.error("reload: cannot use the configuration ({error}); keeping the previous one",
                      error=getattr(error, "errors", error))
            return
        for port in self.ports.ports:
            name = self.ports.names.get(port)
            factory = factories.get(name)
            if factory is None:
                continue
            if hasattr(port.factory, "sessions"):
                factory.take_over(port.factory)
            port.factory = factory
        log.info("reloaded the configuration")


def _as_list(addresses) -> list[str]:
    return [addresses] if isinstance(addresses, str) else list(addresses)


def parse_socket(text: str) -> tuple[str, int, int]:
    """NAME=FD:FAMILY -> (name, fd, family)."""
    name, _, rest = text.rpartition("=")
    fd, _, family = rest.partition(":")
    return name, int(fd), int(family)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mailgw.worker",
                                     description="An SMTP worker; started by `twistd mailgw`, not by hand.")
    parser.add_argument("--config")
    parser.add_argument("--number", type=int, required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--socket", action="append", type=parse_socket, default=[])
    args = parser.parse_args(argv)

    ignore_terminal_signals()
    log_lines = StderrLog(hold=True)
    globalLogBeginner.beginLoggingTo([log_lines], redirectStandardIO=False)
    try:
        config = config_module.load(args.config)
    except config_module.ConfigError as error:
        log.critical("invalid configuration: {errors}", errors="; ".join(error.errors))
        return 1
    except OSError as error:
        log.critical("cannot read the configuration: {error}", error=error)
        return 1

    from twisted.internet import reactor

    def master_gone():
        # The main process stopped us or died: finish what runs and exit.
        if reactor.running:
            reactor.stop()

    link = MasterLink(on_lost=master_gone, clock=reactor)
    stdio.StandardIO(link, reactor=reactor)
    flushing = LoopingCall(log_lines.flush)
    flushing.clock = reactor
    flushing.start(FLUSH_DELAY, now=False)
    reactor.addSystemEventTrigger("after", "shutdown", log_lines.flush)
    top = build(config, reactor, sockets=args.socket, link=link)
    link.on_reload = lambda: top.parts.reload(args.config)
    top.startService()
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    log.info("worker {number} of {workers} accepting SMTP (pid {pid})", number=args.number,
             workers=args.workers, pid=os.getpid())
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
