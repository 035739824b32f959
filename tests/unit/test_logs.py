"""mailgw/logs.py: the log observer twistd takes from the application, JSON lines, reopen."""
from __future__ import annotations

import json
import os
import signal

from twisted.application import service
from twisted.logger import ILogObserver, Logger, LogPublisher

from mailgw import logs


def emit(observer, text: str, **fields) -> None:
    publisher = LogPublisher(observer)
    Logger(namespace="mailgw.test", observer=publisher).info(text, **fields)


def test_json_lines_parse(tmp_path):
    out = logs.ReopeningFile(str(tmp_path / "mailgw.log"))
    observer = logs.file_observer(out, "json")
    emit(observer, "first {n}", n=1)
    emit(observer, "second with a newline\nin it {who}", who="x\ny")
    out.close()
    lines = (tmp_path / "mailgw.log").read_text().splitlines()
    assert len(lines) == 2
    events = [json.loads(line) for line in lines]
    assert events[0]["log_format"] == "first {n}" and events[0]["n"] == 1
    assert events[0]["log_namespace"] == "mailgw.test"
    assert events[1]["who"] == "x\ny"
    assert "\x1e" not in (tmp_path / "mailgw.log").read_text()


def test_text_lines(tmp_path):
    out = logs.ReopeningFile(str(tmp_path / "mailgw.log"))
    emit(logs.file_observer(out, "text"), "hello {n}", n=7)
    out.close()
    text = (tmp_path / "mailgw.log").read_text()
    assert text.endswith("[mailgw.test#info] hello 7\n"), text


def test_reopen_after_rename_writes_a_new_file(tmp_path):
    path = tmp_path / "mailgw.log"
    out = logs.ReopeningFile(str(path))
    observer = logs.file_observer(out, "json")
    emit(observer, "before")
    path.rename(tmp_path / "mailgw.log.1")
    emit(observer, "still the old file")
    assert not path.exists()
    assert out.reopen()
    emit(observer, "after")
    out.close()
    old = [json.loads(line)["log_format"] for line in (tmp_path / "mailgw.log.1").read_text().splitlines()]
    new = [json.loads(line)["log_format"] for line in path.read_text().splitlines()]
    assert old == ["before", "still the old file"]
    assert "after" in new and "before" not in new


def test_reopen_failure_keeps_the_old_file(tmp_path):
    directory = tmp_path / "logs"
    directory.mkdir()
    out = logs.ReopeningFile(str(directory / "mailgw.log"))
    (directory / "mailgw.log").rename(tmp_path / "moved.log")
    directory.rmdir()                       # the path cannot be created again
    assert out.reopen() is False
    out.write("still written\n")
    out.close()
    assert (tmp_path / "moved.log").read_text() == "still written\n"


def test_destination_follows_twistd():
    assert logs.log_destination({"logfile": "/var/log/x.log", "nodaemon": True}) == "/var/log/x.log"
    assert logs.log_destination({"logfile": "-", "nodaemon": True}) == "-"
    assert logs.log_destination({"logfile": None, "nodaemon": True}) == "-"
    assert logs.log_destination({"logfile": None, "nodaemon": False}) == "twistd.log"
    assert logs.log_destination({"logfile": "-", "nodaemon": False}) is None      # twistd refuses that itself
    assert logs.log_destination({"logfile": "x", "syslog": True}) is None
    assert logs.log_destination({"logfile": "x", "logger": "some.factory"}) is None


class FakeReactor:
    def __init__(self):
        self.calls = []

    def callFromThread(self, f, *args):
        self.calls.append((f, args))


def test_sigusr1_reopens_in_the_reactor_thread(tmp_path):
    reactor = FakeReactor()
    out = logs.ReopeningFile(str(tmp_path / "mailgw.log"))
    previous = logs.install_sigusr1(out, reactor)
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert reactor.calls == [(out.reopen, ())]
    finally:
        signal.signal(signal.SIGUSR1, previous)
        out.close()


def test_root_sets_the_application_component(tmp_path):
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        top = service.MultiService()
        root = logs.LogObserverRoot(top, log_format="json",
                                    twistd_options={"logfile": str(tmp_path / "l.log"), "nodaemon": True})
        application = service.Application("mailgw")
        root.setServiceParent(application)
        observer = application.getComponent(ILogObserver, None)
        assert observer is not None
        assert list(service.IServiceCollection(application)) == [root] and list(root) == [top]
        emit(observer, "x")
        root.log_file.close()
        assert json.loads((tmp_path / "l.log").read_text())["log_format"] == "x"
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_root_leaves_syslog_to_twistd():
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        root = logs.LogObserverRoot(service.MultiService(), twistd_options={"syslog": True, "nodaemon": True})
        application = service.Application("mailgw")
        root.setServiceParent(application)
        assert application.getComponent(ILogObserver, None) is None
    finally:
        signal.signal(signal.SIGUSR1, previous)
