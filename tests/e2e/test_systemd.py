"""End to end, issue 17: running under systemd.

etc/mailgw.service passes `systemd-analyze verify`; the real `twistd mailgw`
speaks sd_notify (READY=1 once its ports accept, RELOADING=1 then READY=1
around a SIGHUP reload, STOPPING=1 at SIGTERM) to a datagram socket of ours
as $NOTIFY_SOCKET; with `[log] format = "json"` and --logfile every line of
the file is JSON, and SIGUSR1 after a rename (logrotate) reopens the path."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
REPO_ROOT = Path(__file__).resolve().parents[2]
UNIT = REPO_ROOT / "etc" / "mailgw.service"
LISTENERS = (("relay", "relay"), ("submission", "submission"))
WAIT = 20.0


# -- (a) the unit file ----------------------------------------------------------
def test_unit_file_verifies(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    text = UNIT.read_text()
    assert "ExecStart=/opt/mailgw/.venv/bin/twistd " in text
    # verify checks that the ExecStart binary exists: point it at one that does.
    unit = tmp_path / "mailgw.service"
    unit.write_text(text.replace("/opt/mailgw/.venv/bin/twistd", sys.executable))
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert "mailgw.service" not in done.stderr, done.stderr
    for line in ("Type=notify", "NotifyAccess=main", "ExecReload=/bin/kill -HUP $MAINPID", "User=mailgw",
                 "AmbientCapabilities=CAP_NET_BIND_SERVICE", "ProtectSystem=strict", "StateDirectory=mailgw"):
        assert line in text.splitlines(), line


# -- the real server with a notify socket ------------------------------------------
class NotifySocket:
    def __init__(self):
        self.directory = tempfile.mkdtemp(prefix="mgw-sd-")     # short: AF_UNIX paths are limited
        self.path = os.path.join(self.directory, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[str] = []

    def first(self, within: float = WAIT) -> str:
        """The first KEY=VALUE line of the next message (a STATUS= line may follow)."""
        return self.next(within).split("\n")[0]

    def next(self, within: float = WAIT) -> str:
        self.sock.settimeout(within)
        try:
            message = self.sock.recv(4096).decode()
        except socket.timeout:
            raise AssertionError(f"no sd_notify message within {within}s (so far: {self.messages})")
        self.messages.append(message)
        return message

    def wait_for(self, first_line: str, within: float = WAIT) -> str:
        deadline = time.monotonic() + within
        while True:
            message = self.next(max(0.1, deadline - time.monotonic()))
            if message.split("\n")[0] == first_line:
                return message
            assert time.monotonic() < deadline, f"no {first_line} within {within}s: {self.messages}"

    def close(self):
        self.sock.close()
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture
def notify_socket():
    sock = NotifySocket()
    yield sock
    sock.close()


def start(e2e, server, notify: NotifySocket, *twistd_args: str) -> subprocess.Popen:
    """twistd as MailServer._start_once runs it, plus NOTIFY_SOCKET (and `twistd_args`)."""
    server.write_config()
    server.add_users()
    args = [*e2e.TWISTD, "-n", "--pidfile", str(server.pidfile), *twistd_args,
            "mailgw", "--config", str(server.config_path)]
    env = e2e.server_env()
    env["NOTIFY_SOCKET"] = notify.path
    with open(server.log_path, "wb") as out:
        server.process = subprocess.Popen(args, cwd=server.root, env=env, stdin=subprocess.DEVNULL,
                                          stdout=out, stderr=subprocess.STDOUT)
    return server.process


def ports_accept(server) -> bool:
    for port in server.ports.values():
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        except OSError:
            return False
    return True


def stop(server) -> None:
    try:
        server.stop()        # SIGTERM by PID, SIGKILL after a deadline
    finally:
        server.process = None


def test_ready_after_ports_accept_and_reload(e2e, tmp_path, notify_socket, users_template):
    server = e2e.MailServer(tmp_path / "server", listeners=LISTENERS, users_template=users_template)
    process = start(e2e, server, notify_socket)
    try:
        assert notify_socket.first() == "READY=1", server.log_tail()
        # READY=1 comes after every listener is bound: they accept at once.
        assert ports_accept(server), server.log_tail()
        assert "control socket for `mailgw queue`" in server.log_text()

        process.send_signal(signal.SIGHUP)
        reloading = notify_socket.next().split("\n")
        assert reloading[0] == "RELOADING=1", reloading
        assert reloading[1].startswith("MONOTONIC_USEC=") and int(reloading[1].split("=")[1]) > 0
        assert notify_socket.first() == "READY=1"
        server.wait_for_log("reload done")
        assert ports_accept(server)

        process.send_signal(signal.SIGTERM)
        assert notify_socket.wait_for("STOPPING=1").startswith("STOPPING=1")
        # twistd ends itself with the signal that stopped it (ApplicationRunner._exitSignal): -SIGTERM.
        assert process.wait(e2e.STOP_DEADLINE) in (0, -signal.SIGTERM), server.log_tail()
    finally:
        stop(server)


def test_json_log_and_reopen_on_sigusr1(e2e, tmp_path, notify_socket, users_template):
    server = e2e.MailServer(tmp_path / "server", listeners=LISTENERS, users_template=users_template,
                            extra='[log]\nformat = "json"\n')
    log_path = tmp_path / "mailgw.log"
    process = start(e2e, server, notify_socket, "--logfile", str(log_path))
    try:
        assert notify_socket.first() == "READY=1", server.log_tail()
        assert ports_accept(server)

        def events(path: Path) -> list[dict]:
            text = path.read_text()
            assert text.endswith("\n"), text[-200:]
            return [json.loads(line) for line in text.splitlines()]      # every line is JSON

        e2e.wait_until(lambda: any("control socket" in event.get("log_format", "") for event in events(log_path)),
                       "the control socket line in the JSON log", within=WAIT)
        first = events(log_path)
        assert any("twistd {version}" in event.get("log_format", "") for event in first)
        assert all("log_time" in event for event in first)

        rotated = tmp_path / "mailgw.log.1"
        log_path.rename(rotated)
        process.send_signal(signal.SIGUSR1)
        e2e.wait_until(log_path.exists, "a new log file at the path after SIGUSR1", within=WAIT)
        # Something that logs: a reload.
        process.send_signal(signal.SIGHUP)
        assert notify_socket.wait_for("READY=1")
        e2e.wait_until(lambda: any("reload done" in event.get("log_format", "") for event in events(log_path)),
                       "the reload's lines at the new file", within=WAIT)
        assert not any("reload done" in event.get("log_format", "") for event in events(rotated))
        assert process.poll() is None, "SIGUSR1 must not end the server"

        process.send_signal(signal.SIGTERM)
        assert process.wait(e2e.STOP_DEADLINE) in (0, -signal.SIGTERM)
        final = events(log_path)
        assert any("Server Shut Down." in event.get("log_format", "") for event in final)
        events(rotated)
    finally:
        stop(server)
