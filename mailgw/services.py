"""The services and factories both composition roots build from: the main
process's (tap.py) and an SMTP worker's (worker.py)."""
from __future__ import annotations

import errno

from twisted.application import service
from twisted.internet import defer, endpoints
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from mailgw.config_types import (IMPLICIT_TLS_ROLES, ROLE_ACME_HTTP, ROLE_ACME_TLS, ROLE_HTTP, ROLE_IMAP, ROLE_IMAPS,
                                 ROLE_POP3, ROLE_POP3S, ROLE_RELAY, SMTP_ROLES, Config)
from mailgw.imap.server import IMAPFactory
from mailgw.pop3.server import POP3Factory
from mailgw.queue.spool import new_queue_id
from mailgw.smtp.server import SMTPFactory
from mailgw.spam.screen import build_screen

log = Logger()

# Seconds a stopping listener gives its sessions to take the shutdown notice
# and go (TLS close_notify included) before the reactor stops regardless; the
# reactor drops whatever is still unsent when it stops.
SHUTDOWN_GRACE = 2.0


class ThreadPoolService(service.Service):
    def __init__(self, pool):
        self.pool = pool

    def startService(self):
        super().startService()
        self.pool.start()

    def stopService(self):
        super().stopService()
        self.pool.stop()


def _cannot_listen(description: str, role: str, error: BaseException) -> str:
    lines = [f"mailgw: cannot listen on {description} ({role}): {error}"]
    os_error = getattr(error, "socketError", None) or error
    if getattr(os_error, "errno", None) == errno.EACCES:
        lines.append("mailgw: ports below 1024 need root (twistd --uid/--gid drops privileges after "
                     "binding); or start with --port-offset 10000, or change [[listeners]] in the config.")
    elif getattr(os_error, "errno", None) == errno.EADDRINUSE:
        lines.append("mailgw: another program already listens there (a system Postfix?); stop it, "
                     "or start with --port-offset 10000, or change [[listeners]] in the config.")
    else:
        lines.append("mailgw: check the endpoint in [[listeners]], or start with --port-offset 10000.")
    return "\n".join(lines)


class ListenerService(service.Service):
    """One listening port. It binds while the service is being built, i.e.
    as the user twistd starts as and before twistd writes its pidfile, so a
    port that cannot be bound ends the start with one clear message, no
    traceback and no stale pidfile."""

    def __init__(self, reactor, description: str, factory, role: str):
        self.reactor = reactor
        self.description = description
        self.factory = factory
        self.role = role
        self.port = None
        failure = []
        endpoint = endpoints.serverFromString(reactor, description)
        endpoint.listen(factory).addCallbacks(self._listening, failure.append)
        if failure:
            raise SystemExit(_cannot_listen(description, role, failure[0].value))

    def _listening(self, port):
        self.port = port
        address = port.getHost()
        log.info("listening for {role} on {host}:{port}", role=self.role, host=address.host, port=address.port)

    def stop_accepting_only(self) -> None:
        """A reload removed this listener: no new connections; its sessions
        go on and are ended at shutdown like any other."""
        if self.port is not None:
            port, self.port = self.port, None
            port.stopListening()
            log.info("stopped listening for {role} on {description}", role=self.role,
                     description=self.description)

    def stopService(self):
        super().stopService()
        stopped = defer.succeed(None)
        if self.port is not None:
            port, self.port = self.port, None
            stopped = defer.maybeDeferred(port.stopListening)
        # After the port: no session can start behind the notices.
        ended = end_sessions(self.reactor, self.factory)
        return defer.gatherResults([stopped, ended], consumeErrors=True)


def end_sessions(clock, factory, grace: float = SHUTDOWN_GRACE) -> defer.Deferred:
    """Have a listener's factory tell its sessions we stop, and close them
    (its `shutdown_sessions()`, limits.ListenerFactory's, where it has one). Fires (never fails) when
    they are gone or after `grace` seconds, whichever comes first, so the
    reactor does not stop before the notices are written."""
    inner = getattr(factory, "wrappedFactory", factory)      # inside TLSMemoryBIOFactory on implicit TLS
    shutdown = getattr(inner, "shutdown_sessions", None)
    if shutdown is None:
        return defer.succeed(None)
    done = defer.Deferred()

    def gone(_=None):
        if not done.called:
            deadline.cancel()
            done.callback(None)

    def too_late():
        log.warn("{factory}: sessions still open {grace} s after the shutdown notice; stopping anyway",
                 factory=type(inner).__name__, grace=grace)
        done.callback(None)

    deadline = clock.callLater(grace, too_late)
    try:
        result = shutdown()
    except Exception:
        log.failure("{factory}: shutdown_sessions failed", factory=type(inner).__name__)
        gone()
        return done
    result.addErrback(lambda failure: log.failure("{factory}: shutdown_sessions failed", failure=failure,
                                                  factory=type(inner).__name__))
    result.addBoth(gone)
    return done


def listener_factory(config: Config, listener, *, portal, clock, tls_options, imap_cache=None, mail_dns=None,
                     ops_site=None, metrics=None):
    """The protocol factory for one configured listener (wrapped in TLS for
    the implicit-TLS roles). Shared by the main process and the SMTP workers.
    `ops_site`: the twisted.web Site of the `http` listener (mailgw/ops_http.py).
    `metrics`: the registry the sessions count in (mailgw/metrics.py; None: the process's)."""
    if listener.role == ROLE_HTTP:
        if ops_site is None:
            raise AssertionError("listener_factory: an http listener needs ops_site")
        return ops_site
    if listener.role in (ROLE_ACME_HTTP, ROLE_ACME_TLS):
        raise NotImplementedError(f"{listener.role} listeners are wired by tap (the ACME certificate manager)")
    implicit = listener.role in IMPLICIT_TLS_ROLES
    common = dict(config=config, listener=listener, portal=portal, clock=clock,
                  tls_context=None if implicit else tls_options, implicit_tls=implicit, metrics=metrics)
    if listener.role in SMTP_ROLES:
        screen = build_screen(config, mail_dns=mail_dns, clock=clock) if listener.role == ROLE_RELAY else None
        factory = SMTPFactory(new_queue_id=new_queue_id, mail_dns=mail_dns, screen=screen, **common)
    elif listener.role in (ROLE_POP3, ROLE_POP3S):
        factory = POP3Factory(**common)
    elif listener.role in (ROLE_IMAP, ROLE_IMAPS):
        factory = IMAPFactory(message_cache=imap_cache, **common)
    else:   # config validation admits no other role
        raise AssertionError(listener.role)
    if implicit:
        # RFC 8314 §3.3: TLS from the first byte; no STARTTLS/STLS is offered inside.
        factory = TLSMemoryBIOFactory(tls_options, False, factory)
        factory.noisy = False
    return factory
