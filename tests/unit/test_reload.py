"""Issue 17 item 2: reload without a restart (mailgw/reload.py), the TLS files
watched on disk (mailgw/tls.py ReloadingTLS), and what a listener's new
factory takes over from the old one (mailgw/session/listener.py)."""
from __future__ import annotations

import dataclasses
import ipaddress
import os
import signal

from twisted.internet import task
from cryptography.x509.oid import NameOID

from mailgw import config as config_module
from mailgw.config_types import TLSConfig
from mailgw.reload import Reloader, check_new_config, restart_only_changes
from mailgw.tls import ReloadingTLS
from test_tls_files import make_pair, pem_cert, pem_key
from smtp_harness import Session, make_config


class CallsFromThread:
    def __init__(self):
        self.calls = []

    def callFromThread(self, function, *args):
        self.calls.append((function, args))


class Notifier:
    def __init__(self):
        self.events = []

    def reloading(self):
        self.events.append("reloading")

    def ready(self):
        self.events.append("ready")


def reloader_for(config, *, load, apply=None, check=lambda new: [], notify=None):
    applied = []

    def default_apply(new):
        applied.append(new)
        return ["applied"]

    reloader = Reloader(config=config, reactor=CallsFromThread(), load_config=load,
                        apply=apply or default_apply, check=check, notify=notify)
    return reloader, applied


def results(deferred):
    found = []
    deferred.addCallback(found.append)
    assert found, "the reload did not finish"
    return found[0]


def test_sighup_asks_the_reactor_for_a_reload_while_running():
    config = make_config()
    reloader, _ = reloader_for(config, load=lambda path: config)
    before = signal.getsignal(signal.SIGHUP)
    reloader.startService()
    try:
        os.kill(os.getpid(), signal.SIGHUP)         # the default action would end this process
        signal.pthread_sigmask(signal.SIG_BLOCK, [])  # a system call: the Python-level handler has run
        assert reloader.reactor.calls == [(reloader.reload, ("SIGHUP",))]
    finally:
        reloader.stopService()
    assert signal.getsignal(signal.SIGHUP) == before


def test_a_config_error_changes_nothing_and_reports_every_error():
    config = make_config()

    def broken(path):
        raise config_module.ConfigError(["server.hostname: bad", "smtp.max_recipients: bad"])

    notifier = Notifier()
    reloader, applied = reloader_for(config, load=broken, notify=notifier)
    answer = results(reloader.reload())
    assert answer == {"ok": False, "errors": ["server.hostname: bad", "smtp.max_recipients: bad"], "changes": []}
    assert applied == [] and reloader.config is config
    assert (reloader.reloads, reloader.failures) == (0, 1)
    assert notifier.events == ["reloading", "ready"]       # systemd hears the reload is over either way


def test_a_good_config_is_applied_and_becomes_the_current_one():
    config = make_config()
    new = make_config(smtp={"max_recipients": 200})
    reloader, applied = reloader_for(config, load=lambda path: new)
    assert results(reloader.reload()) == {"ok": True, "errors": [], "changes": ["applied"]}
    assert applied == [new] and reloader.config is new and reloader.reloads == 1


def test_restart_only_settings_are_refused_with_the_reason():
    config = make_config()
    new = dataclasses.replace(config, io_threads=config.io_threads + 1, smtp_workers=2)
    problems = restart_only_changes(config, new)
    assert len(problems) == 2 and all("only a restart applies it" in line for line in problems)
    reloader, applied = reloader_for(config, load=lambda path: new)
    answer = results(reloader.reload())
    assert not answer["ok"] and answer["errors"] == problems and applied == []


def test_a_check_that_fails_or_breaks_is_a_refusal():
    config = make_config()
    reloader, applied = reloader_for(config, load=lambda path: config,
                                     check=lambda new: ["aliases:3: no such target"])
    assert results(reloader.reload())["errors"] == ["aliases:3: no such target"]

    def crashing(new):
        raise RuntimeError("boom")

    reloader, applied = reloader_for(config, load=lambda path: config, check=crashing)
    answer = results(reloader.reload())
    assert not answer["ok"] and "boom" in answer["errors"][0] and applied == []


def test_apply_failing_is_reported_not_raised():
    config = make_config()

    def failing(new):
        raise OSError("disk gone")

    reloader, _ = reloader_for(config, load=lambda path: config, apply=failing)
    answer = results(reloader.reload())
    assert not answer["ok"] and "restart it" in answer["errors"][0]
    assert reloader.config is config


def test_check_new_config_names_the_bad_alias_line_and_tls_pair(tmp_path):
    config = make_config(tmp_path)
    aliases = config.routing.aliases_file
    aliases.parent.mkdir(parents=True, exist_ok=True)
    aliases.write_text("team@example.test alice@example.test\nbroken line without a domain\n")
    key, _ = make_pair("a.example.test")
    _, other = make_pair("b.example.test")
    (tmp_path / "cert.pem").write_bytes(pem_cert(other))
    (tmp_path / "key.pem").write_bytes(pem_key(key))
    new = dataclasses.replace(config, tls=TLSConfig(certificate=tmp_path / "cert.pem",
                                                     private_key=tmp_path / "key.pem", generated=False,
                                                     min_version="TLSv1.2"))
    problems = check_new_config(new)
    assert any("does not match" in line for line in problems)
    assert any(line.startswith(f"{aliases}:2:") for line in problems)


# -- TLS files watched ------------------------------------------------------------

def write_pair(tmp_path, name: str):
    key, certificate = make_pair(name)
    (tmp_path / "key.pem").write_bytes(pem_key(key))
    (tmp_path / "cert.pem").write_bytes(pem_cert(certificate))
    return certificate


def served_name(reloading: ReloadingTLS) -> str:
    """The common name a new connection would be shown."""
    certificate = reloading.serverConnectionForTLS(None).get_certificate().to_cryptography()
    return certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def test_changed_files_are_served_after_check_interval(tmp_path):
    write_pair(tmp_path, "first.example.test")
    tls = TLSConfig(certificate=tmp_path / "cert.pem", private_key=tmp_path / "key.pem", generated=False,
                    min_version="TLSv1.2", check_interval=30.0)
    clock = task.Clock()
    reloading = ReloadingTLS(tls, clock=clock)
    assert served_name(reloading) == "first.example.test"
    write_pair(tmp_path, "second.example.test")
    clock.advance(29)
    assert served_name(reloading) == "first.example.test"      # not looked at yet
    clock.advance(1)
    assert served_name(reloading) == "second.example.test"
    assert (reloading.reloads, reloading.reload_failures) == (1, 0)


def test_a_mismatched_pair_on_disk_keeps_the_old_certificate_and_is_counted_once(tmp_path):
    write_pair(tmp_path, "first.example.test")
    tls = TLSConfig(certificate=tmp_path / "cert.pem", private_key=tmp_path / "key.pem", generated=False,
                    min_version="TLSv1.2", check_interval=1.0)
    clock = task.Clock()
    reloading = ReloadingTLS(tls, clock=clock)
    _, other = make_pair("other.example.test")
    (tmp_path / "cert.pem").write_bytes(pem_cert(other))        # key not replaced: half a renewal
    for _ in range(3):
        clock.advance(1)
        assert served_name(reloading) == "first.example.test"
    assert reloading.reload_failures == 1
    write_pair(tmp_path, "fixed.example.test")                  # the renewal completes
    clock.advance(1)
    assert served_name(reloading) == "fixed.example.test"


# -- a listener's factory replaced --------------------------------------------------

def test_a_new_factory_takes_over_the_counts_and_sessions_of_the_old():
    clock = task.Clock()
    old_session = Session(clock=clock, smtp={"max_connections": 5, "max_connections_per_ip": 5})
    old = old_session.factory
    assert old.connections.open_total == 1 and len(old.sessions) == 1
    replacement = Session(clock=clock, smtp={"max_connections": 1, "max_connections_per_ip": 1}).factory
    replacement.connections.release(next(iter(replacement.connections.open_per_client)))
    replacement.sessions.clear()
    replacement.take_over(old)
    # The open session counts against the new limit of 1: a second client is refused.
    assert replacement.connections.max_total == 1 and replacement.connections.open_total == 1
    assert not replacement.admit(ipaddress.ip_address("192.0.2.99"))
    # A shutdown through the new factory ends the session the old one started.
    gone = replacement.shutdown_sessions()
    assert not gone.called
    assert b"421" in old_session.transport.value()
    old_session.server.connectionLost(None)
    assert gone.called
