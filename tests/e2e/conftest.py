"""End-to-end fixtures: the real `twistd mailgw` process, talked to by real clients.

Everything here runs the service exactly as an operator does:

    PYTHONPATH=<repo> twistd -n --pidfile PIDFILE mailgw --config PATH [--port-offset N]

(spelled `python -c "from twisted.scripts.twistd import run; run()"` so the
interpreter running the tests is the one running the server), with users made
by `python -m mailgw.cli users add`. Listeners are on 127.0.0.1 only, on free
ports picked just before the start (one retry if another process took a port
in between). `trusted_networks` is 127.0.0.2/32, so 127.0.0.1 is an untrusted
client and a client bound to source address 127.0.0.2 a trusted one.

Nothing here waits for mail with a sleep: a 250 after DATA means the message
is on disk. The only polling is for the listening sockets at start-up, with a
deadline.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCAL_DOMAIN = "example.test"
HOSTNAME = "mx.example.test"
CLIENT_NAME = "client.example.net"     # EHLO name; also keeps smtplib from calling getfqdn()
USERS = {"alice@example.test": "secret", "bob@example.test": "hunter2"}
STANDARD_LISTENERS = (("relay", "relay"), ("submission", "submission"), ("submissions", "submissions"),
                      ("pop3", "pop3"), ("pop3s", "pop3s"), ("imap", "imap"), ("imaps", "imaps"))
START_DEADLINE = 20.0        # seconds for the listeners to accept connections
STOP_DEADLINE = 10.0         # seconds after SIGTERM before SIGKILL
CLIENT_TIMEOUT = 15.0        # seconds per client socket operation
QUEUED = re.compile(rb"^250 2\.0\.0 Ok: queued as (\S+)\r?$", re.M)

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]

_running: list["MailServer"] = []     # servers whose log tail is attached to a failure report


class LoopbackDNS:
    """The session's DNS server (tests/e2e/dns_server.py) on 127.0.0.1: every
    server under test asks it, never this machine's resolver. `set(zone)`
    replaces the zone; it answers from the new one at its next query."""

    def __init__(self, root: Path):
        self.zone_path = root / "zone.json"
        self.port_path = root / "dns.port"
        self.log = open(root / "dns.log", "wb")
        self.set({})
        self.process = subprocess.Popen([sys.executable, str(Path(__file__).with_name("dns_server.py")),
                                         str(self.zone_path), str(self.port_path)],
                                        stdout=self.log, stderr=subprocess.STDOUT)
        wait_until(self.port_path.exists, "the loopback DNS server's port", within=60.0)
        self.port = int(self.port_path.read_text())

    def set(self, zone: dict) -> None:
        temporary = self.zone_path.with_suffix(".tmp")
        temporary.write_text(__import__("json").dumps(zone))
        temporary.replace(self.zone_path)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
        self.log.close()


_dns: LoopbackDNS | None = None


@pytest.fixture(scope="session", autouse=True)
def loopback_dns(tmp_path_factory):
    global _dns
    _dns = LoopbackDNS(tmp_path_factory.mktemp("dns"))
    yield _dns
    _dns.stop()
    _dns = None


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "e2e: end-to-end test against the real twistd mailgw process (slow-ish, uses 127.0.0.1 ports)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and report.when in ("setup", "call"):
        for server in list(_running):
            report.sections.append((f"mailgw server log tail ({server.log_path})", server.log_tail()))


def server_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("MAILGW_CONFIG", None)
    return env


def wait_until(condition, what: str, within: float = 10.0, poll: float = 0.05):
    """Poll `condition` until it returns something true, and return that. For
    real processes, which have no Clock to drive; bounded by `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {within}s: {what}"
        time.sleep(poll)


def free_ports(count: int) -> list[int]:
    """`count` distinct ports that were free on 127.0.0.1 a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def run_cli(args: list[str], *, cwd: Path, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mailgw.cli", *args], input=stdin, capture_output=True,
                          text=True, cwd=cwd, env=server_env(), timeout=timeout)


def run_twistd(args: list[str], *, cwd: Path, timeout: float = 30) -> subprocess.CompletedProcess:
    """twistd in the foreground until it exits by itself (start-up failures)."""
    return subprocess.run([*TWISTD, "-n", "--pidfile", str(cwd / "twistd.pid"), *args], capture_output=True,
                          text=True, cwd=cwd, env=server_env(), timeout=timeout)


def config_text(*, data_dir: Path, listeners, extra_server: str = "", extra: str = "",
                relay_port: int | None = None, smtp: dict | None = None) -> str:
    """A complete config; `listeners` is [(role, name, endpoint)].

    Relayed mail always goes to a smarthost on 127.0.0.1 (`relay_port`, or
    port 1 where nothing listens, so attempts fail at once and mail stays
    queued): no test ever makes the queue look up an MX or leave the machine."""
    if relay_port is None:
        relay_port = 1
    lines = [
        "[server]",
        f'hostname = "{HOSTNAME}"',
        f'local_domains = ["{LOCAL_DOMAIN}"]',
        'trusted_networks = ["127.0.0.2/32"]',
        f'data_dir = "{data_dir}"',
        "io_threads = 8",
        extra_server,
        "",
        "[smtp]",
        # No throttling delay unless a test asks: the wrong-password tests would otherwise wait.
        *(f"{key} = {value}" for key, value in {"auth_failure_delay": 0.0, **(smtp or {})}.items()),
        "",
        "[queue.smarthost]",
        'host = "127.0.0.1"',
        f"port = {relay_port}",
        'tls = "none"',
        "",
        extra,
    ]
    if _dns is not None and "[dns]" not in extra:
        # Every lookup goes to the loopback DNS server, never to this machine's resolver.
        lines += ["[dns]", f'nameservers = ["127.0.0.1:{_dns.port}"]', "timeout = 2.0", ""]
    for role, name, endpoint in listeners:
        lines += ["[[listeners]]", f'role = "{role}"', f'name = "{name}"', f'endpoint = "{endpoint}"', ""]
    return "\n".join(lines)


def tls_client_context() -> ssl.SSLContext:
    """The server's certificate is self-signed: no verification (as the brief says)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class LineConnection:
    """A raw client connection from a chosen loopback address, read line by
    line (SMTP, POP3, IMAP alike); TLS at once (`tls=True`) or later."""

    def __init__(self, port: int, *, source: str = "127.0.0.1", tls: bool = False,
                 timeout: float = CLIENT_TIMEOUT):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))
        self.buffer = b""
        if tls:
            self.start_tls()

    def start_tls(self) -> None:
        assert not self.buffer, self.buffer      # nothing read before the handshake may be kept
        self.sock = tls_client_context().wrap_socket(self.sock)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed; unread {self.buffer!r}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def lines_until(self, prefix: bytes) -> list[bytes]:
        lines = [self.line()]
        while not lines[-1].startswith(prefix):
            lines.append(self.line())
        return lines

    def command(self, data: bytes | str, until: bytes | None = None) -> bytes:
        """Send one line; the first reply line, or with `until` the first one starting so."""
        self.send((data.encode() if isinstance(data, str) else data) + b"\r\n")
        return self.lines_until(until)[-1] if until is not None else self.line()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def build_message(marker: str, *, subject: str = "test", body: bytes | None = None,
                  sender: str = "sender@elsewhere.test", to: str = "alice@example.test") -> bytes:
    """A CRLF message whose Message-ID and X-Test-Marker carry `marker`."""
    if body is None:
        body = (f"Hello, this is message {marker}.\r\n"
                "Second line.\r\n"
                "\r\n"
                "Last line.\r\n").encode()
    head = (f"From: <{sender}>\r\n"
            f"To: <{to}>\r\n"
            f"Subject: {subject} {marker}\r\n"
            f"Message-ID: <{marker}@e2e.example.net>\r\n"
            # A Date:, as every mail client writes: a submission without one gets one added.
            "Date: Mon, 07 Dec 2026 10:00:00 +0000\r\n"
            f"X-Test-Marker: {marker}\r\n"
            "MIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n"
            "\r\n").encode()
    return head + body


def split_received(stored: bytes, *, newline: bytes = b"\n") -> tuple[bytes, bytes]:
    """(our Received: header and Authentication-Results, the rest) of a stored
    message; ours is the first field, after the Return-Path: and Delivered-To:
    of a local delivery."""
    lines = stored.split(newline)
    start = 0
    while start < len(lines) and lines[start].startswith((b"Return-Path: ", b"Delivered-To: ")):
        start += 1
    assert lines[start].startswith(b"Received: "), stored[:200]
    end = start + 1
    while end < len(lines) and lines[end][:1] in (b" ", b"\t"):
        end += 1
    # Our Authentication-Results (mail from untrusted clients on port 25) belongs to
    # our trace block, right under our Received: (mailgw/mailauth/stages.py).
    if lines[end].startswith(f"Authentication-Results: {HOSTNAME};".encode()) if end < len(lines) else False:
        end += 1
        while end < len(lines) and lines[end][:1] in (b" ", b"\t"):
            end += 1
    return newline.join(lines[start:end]), newline.join(lines[end:])


def send_message(client: smtplib.SMTP, sender: str, recipients: list[str], message: bytes) -> str:
    """MAIL/RCPT/DATA on an open smtplib session; asserts each step; returns the queue id."""
    code, reply = client.mail(sender)
    assert code == 250, (code, reply)
    for rcpt in recipients:
        code, reply = client.rcpt(rcpt)
        assert code == 250, (rcpt, code, reply)
    code, reply = client.data(message)
    assert code == 250, (code, reply)
    found = re.match(rb"2\.0\.0 Ok: queued as (\S+)$", reply)
    assert found, reply
    return found.group(1).decode()


class ServerExited(Exception):
    pass


class MailServer:
    """One mailgw installation under `root`: config, data dir, users, logs, the process."""

    def __init__(self, root: Path, *, listeners=STANDARD_LISTENERS, port_offset: int = 0,
                 extra_server: str = "", users: dict[str, str] | None = None, users_template: Path | None = None,
                 relay_port: int | None = None, extra: str = "", smtp: dict | None = None):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.data_dir = root / "data"
        self.config_path = root / "mailgw.toml"
        self.pidfile = root / "twistd.pid"
        self.listener_roles = list(listeners)     # [(role, name)]
        self.port_offset = port_offset
        self.extra_server = extra_server
        self.extra = extra                        # more config tables, e.g. "[queue]\nretry_schedule = [1]"
        self.smtp_settings = dict(smtp or {})     # keys for the [smtp] table, e.g. {"max_connections": 4}
        self.relay_port = relay_port
        self.users = dict(USERS if users is None else users)
        self._users_template = users_template
        self.ports: dict[str, int] = {}
        self.process: subprocess.Popen | None = None
        self.starts = 0
        self.log_path = root / "server-0.log"
        self.queue_ids: list[str] = []            # every queue id a client got a 250 for

    # -- set-up -----------------------------------------------------------------
    def write_config(self) -> None:
        ports = free_ports(len(self.listener_roles))
        self.ports = {name: port for (_, name), port in zip(self.listener_roles, ports)}
        listeners = [(role, name, f"tcp:{self.ports[name] - self.port_offset}:interface=127.0.0.1")
                     for role, name in self.listener_roles]
        self.config_path.write_text(config_text(data_dir=self.data_dir, listeners=listeners,
                                                extra_server=self.extra_server, extra=self.extra,
                                                relay_port=self.relay_port, smtp=self.smtp_settings))

    def add_users(self) -> None:
        target = self.data_dir / "users"
        if self._users_template is not None and self.users == USERS:
            # Made once per test session by the same CLI (argon2 hashing is slow on purpose).
            self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            shutil.copy2(self._users_template, target)
            return
        for address, password in self.users.items():
            done = run_cli(["users", "add", address, "--config", str(self.config_path)],
                           cwd=self.root, stdin=password + "\n")
            assert done.returncode == 0, (done.stdout, done.stderr)

    # -- process ----------------------------------------------------------------
    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> "MailServer":
        """Start twistd; returns once every listener accepts connections."""
        first = not self.config_path.exists()
        if first:
            self.write_config()
            self.add_users()
        try:
            self._start_once()
        except ServerExited:
            if not (first and "cannot listen on" in self.log_text()):
                raise
            # Another process took one of our ports between picking and binding: once more.
            self.write_config()
            self._start_once()
        return self

    def _start_once(self) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        self.log_path = self.root / f"server-{self.starts}.log"
        self.starts += 1
        args = [*TWISTD, "-n", "--pidfile", str(self.pidfile), "mailgw", "--config", str(self.config_path)]
        if self.port_offset:
            args += ["--port-offset", str(self.port_offset)]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(args, cwd=self.root, env=server_env(), stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT)
        if self not in _running:
            _running.append(self)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, deadline: float = START_DEADLINE) -> None:
        """Every port accepts, and the services have started. Ports are bound
        while the service is built, before reactor.run() installs its signal
        handlers; the control socket line is logged once services start."""
        waiting = set(self.ports.values())
        end = time.monotonic() + deadline
        while waiting or "control socket for `mailgw queue`" not in self.log_text():
            if self.process.poll() is not None:
                raise ServerExited(f"twistd exited with {self.process.returncode} during start-up:\n"
                                   + self.log_tail())
            if time.monotonic() > end:
                raise TimeoutError(f"not ready after {deadline}s (ports still closed: {sorted(waiting)}):\n" + self.log_tail())
            for port in sorted(waiting):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.25).close()
                except OSError:
                    continue
                waiting.discard(port)
            time.sleep(0.05)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after STOP_DEADLINE; only the process we started."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_DEADLINE)
        return process.returncode

    def forget(self) -> None:
        """No more log tails of this server in failure reports (fixture teardown)."""
        self.stop()
        if self in _running:
            _running.remove(self)

    def kill9(self) -> None:
        """SIGKILL now (the crash), and reap."""
        os.kill(self.pid, signal.SIGKILL)
        self.process.wait(STOP_DEADLINE)

    # -- logs -------------------------------------------------------------------
    def log_text(self, every_start: bool = False) -> str:
        paths = [self.root / f"server-{i}.log" for i in range(self.starts)] if every_start else [self.log_path]
        return "".join(p.read_text(errors="replace") for p in paths if p.exists())

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_for_log(self, text: str, within: float = 10.0) -> None:
        wait_until(lambda: text in self.log_text(), f"{text!r} in the log\n{self.log_tail()}", within, poll=0.02)

    # -- storage ----------------------------------------------------------------
    def mailbox(self, user: str) -> Path:
        local, domain = user.split("@")
        return self.data_dir / "mail" / domain / local

    def maildir(self, user: str) -> Path:
        """new/ of the user's INBOX Maildir."""
        return self.mailbox(user) / "new"

    def messages(self, user: str) -> dict[str, bytes]:
        """Every message in the user's INBOX by file name: new/ (never read) and
        cur/ (seen by POP3/IMAP). The store may move a file from new/ to cur/
        between the two listings; it then counts once, under its cur/ name."""
        found: dict[str, bytes] = {}
        for sub in ("new", "cur"):
            directory = self.mailbox(user) / sub
            if not directory.is_dir():
                continue
            for path in sorted(directory.iterdir()):
                try:
                    found[path.name] = path.read_bytes()
                except FileNotFoundError:
                    pass               # moved to cur/ meanwhile: read there
        moved = {name.split(",", 1)[0] for name in found if ",U=" in name}
        return {name: data for name, data in found.items()
                if ",U=" in name or name.split(",", 1)[0] not in moved}

    def find(self, user: str, marker: str) -> tuple[str, bytes]:
        """The one stored message of `user` carrying `marker`."""
        needle = f"X-Test-Marker: {marker}\n".encode()
        found = [(name, data) for name, data in self.messages(user).items() if needle in data]
        assert len(found) == 1, f"{len(found)} messages with marker {marker} for {user}"
        return found[0]

    @property
    def queue_active(self) -> Path:
        return self.data_dir / "queue" / "active"

    # -- clients ----------------------------------------------------------------
    def smtp(self, listener: str = "relay", *, source: str | None = None) -> smtplib.SMTP:
        source_address = (source, 0) if source else None
        if listener == "submissions":
            return smtplib.SMTP_SSL("127.0.0.1", self.ports[listener], local_hostname=CLIENT_NAME,
                                    timeout=CLIENT_TIMEOUT, context=tls_client_context(),
                                    source_address=source_address)
        return smtplib.SMTP("127.0.0.1", self.ports[listener], local_hostname=CLIENT_NAME,
                            timeout=CLIENT_TIMEOUT, source_address=source_address)

    def send(self, client: smtplib.SMTP, sender: str, recipients: list[str], message: bytes) -> str:
        queue_id = send_message(client, sender, recipients, message)
        self.queue_ids.append(queue_id)
        return queue_id

    # Helpers and constants for the test modules, reached through the fixture
    # (test modules do not import conftest: with several conftest.py files in
    # the tree, "conftest" is whichever pytest imported last).
    HOSTNAME = HOSTNAME
    CLIENT_NAME = CLIENT_NAME
    CLIENT_TIMEOUT = CLIENT_TIMEOUT
    QUEUED = QUEUED
    build_message = staticmethod(build_message)
    split_received = staticmethod(split_received)
    tls_client_context = staticmethod(tls_client_context)


_THIS_MODULE = sys.modules[__name__]


@pytest.fixture(scope="session")
def e2e():
    """This module: its helpers (run_cli, run_twistd, free_ports, config_text, ...)."""
    return _THIS_MODULE


@pytest.fixture(scope="session")
def users_template(tmp_path_factory) -> Path:
    """alice and bob, added once with `mailgw users add` (password on stdin)."""
    root = tmp_path_factory.mktemp("users-template")
    data_dir = root / "data"
    config = root / "mailgw.toml"
    config.write_text(config_text(data_dir=data_dir, listeners=[("relay", "relay", "tcp:0:interface=127.0.0.1")]))
    for address, password in USERS.items():
        done = run_cli(["users", "add", address, "--config", str(config)], cwd=root, stdin=password + "\n")
        assert done.returncode == 0, (done.stdout, done.stderr)
        assert password not in done.stdout + done.stderr
    return data_dir / "users"


@pytest.fixture(scope="module")
def server(tmp_path_factory, users_template):
    """One running server (relay, submission, submissions) shared by a module."""
    instance = MailServer(tmp_path_factory.mktemp("mailgw"), users_template=users_template)
    instance.start()
    yield instance
    instance.forget()


@pytest.fixture
def make_server(tmp_path, users_template):
    """Factory for servers private to one test; every one is stopped at teardown."""
    made: list[MailServer] = []

    def make(name: str = "server", **options) -> MailServer:
        options.setdefault("users_template", users_template)
        instance = MailServer(tmp_path / name, **options)
        made.append(instance)
        return instance

    yield make
    for instance in made:
        instance.forget()


@pytest.fixture
def sink(e2e):
    """An aiosmtpd sink on 127.0.0.1 (tests/e2e/sink.py); pass `relay_port=sink.port` to make_server."""
    from sink import Sink
    instance = Sink(e2e.free_ports(1)[0])
    instance.controller.start()
    yield instance
    instance.controller.stop()
