"""Start-up as an operator meets it: `mailgw check`, and `twistd mailgw` failing
(or not) with a clear message and never a Python traceback."""
from __future__ import annotations

import re
import signal
import socket
import time

import pytest

pytestmark = pytest.mark.e2e

# Several mistakes at once, each reported (design §3.8: all errors at once).
BAD_CONFIG = """\
[server]
local_domains = []
trusted_networks = ["10.0.0.1/8"]
io_threads = 0
colour = "blue"
data_dir = "{data_dir}"

[smtp]
max_recipients = 10

[[listeners]]
role = "bogus"
endpoint = "tcp:0:interface=127.0.0.1"

[[listeners]]
role = "relay"
endpoint = "nonsense:xyz"
"""
# (the key the error names, a word of its explanation)
BAD_CONFIG_ERRORS = [
    ("server.local_domains", "at least one"),
    ("server.trusted_networks[0]", "host bits"),
    ("server.io_threads", "1 to 256"),
    ("server.colour", "unknown key"),
    ("smtp.max_recipients", ">= 100"),
    ("listeners[0].role", "bogus"),
    ("listeners[1].endpoint", "nonsense:xyz"),
]
START_FAILURE_DEADLINE = 15.0      # "quickly": seconds for twistd to give up


def write_good_config(e2e, tmp_path):
    ports = e2e.free_ports(3)
    path = tmp_path / "good.toml"
    path.write_text(e2e.config_text(data_dir=tmp_path / "data", listeners=[
        ("relay", "mx", f"tcp:{ports[0]}:interface=127.0.0.1"),
        ("submission", "submission", f"tcp:{ports[1]}:interface=127.0.0.1"),
        ("submissions", "submissions", f"tcp:{ports[2]}:interface=127.0.0.1"),
    ]))
    return path, ports


def test_check_accepts_a_good_config(e2e, tmp_path):
    path, ports = write_good_config(e2e, tmp_path)
    done = e2e.run_cli(["check", "--config", str(path)], cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"config OK: {path}" in done.stdout
    for port in ports:
        assert f"tcp:{port}:interface=127.0.0.1" in done.stdout
    assert "mx" in done.stdout and "(relay)" in done.stdout
    assert not (tmp_path / "data").exists(), "check starts nothing and writes nothing"


def test_check_lists_every_mistake_and_exits_1(e2e, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(BAD_CONFIG.format(data_dir=tmp_path / "data"))
    done = e2e.run_cli(["check", "--config", str(path)], cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "Traceback" not in output
    error_lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    for key, words in BAD_CONFIG_ERRORS:
        assert any(line.startswith(f"error: {key}: ") and words in line for line in error_lines), (key, output)
    assert len(error_lines) == len(BAD_CONFIG_ERRORS), output


def test_check_reports_a_missing_file(e2e, tmp_path):
    done = e2e.run_cli(["check", "--config", str(tmp_path / "missing.toml")], cwd=tmp_path)
    assert done.returncode == 1
    assert "missing.toml" in done.stderr and "Traceback" not in done.stdout + done.stderr


def test_twistd_with_a_config_error_prints_the_errors_without_traceback(e2e, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(BAD_CONFIG.format(data_dir=tmp_path / "data"))
    started = time.monotonic()
    done = e2e.run_twistd(["mailgw", "--config", str(path)], cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert time.monotonic() - started < START_FAILURE_DEADLINE
    assert "Traceback" not in output, output
    assert "invalid configuration" in output
    for key, words in BAD_CONFIG_ERRORS:
        assert any(f"{key}: " in line and words in line for line in output.splitlines()), (key, output)
    assert not (tmp_path / "data").exists(), "nothing is created from a rejected config"


def test_twistd_with_a_missing_config_file_says_so_without_traceback(e2e, tmp_path):
    done = e2e.run_twistd(["mailgw", "--config", str(tmp_path / "missing.toml")], cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "missing.toml" in output and "Traceback" not in output, output


def test_twistd_port_in_use_fails_fast_with_one_clear_message(e2e, tmp_path):
    ports = e2e.free_ports(3)
    busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        busy.bind(("127.0.0.1", ports[1]))
        busy.listen(1)
        endpoint = f"tcp:{ports[1]}:interface=127.0.0.1"
        path = tmp_path / "mailgw.toml"
        path.write_text(e2e.config_text(data_dir=tmp_path / "data", listeners=[
            ("relay", "relay", f"tcp:{ports[0]}:interface=127.0.0.1"),
            ("submission", "submission", endpoint),
            ("submissions", "submissions", f"tcp:{ports[2]}:interface=127.0.0.1"),
        ]))
        started = time.monotonic()
        done = e2e.run_twistd(["mailgw", "--config", str(path)], cwd=tmp_path)
        elapsed = time.monotonic() - started
    finally:
        busy.close()
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert elapsed < START_FAILURE_DEADLINE, elapsed
    assert "Traceback" not in output, output
    message = [line for line in output.splitlines() if "mailgw: " in line]
    assert 1 <= len(message) <= 3, output
    assert any(endpoint in line and "submission" in line for line in message), output
    assert any("in use" in line for line in message), output
    assert "--port-offset" in output, output


def test_twistd_failing_to_listen_leaves_no_stale_pidfile(e2e, tmp_path):
    # A start that failed must not leave its pidfile: if another process later
    # gets that PID, the next `twistd --pidfile` refuses to start
    # ("Another twistd server is running").
    busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        path = tmp_path / "mailgw.toml"
        path.write_text(e2e.config_text(data_dir=tmp_path / "data", listeners=[
            ("relay", "relay", f"tcp:{busy.getsockname()[1]}:interface=127.0.0.1")]))
        done = e2e.run_twistd(["mailgw", "--config", str(path)], cwd=tmp_path)
    finally:
        busy.close()
    assert done.returncode != 0
    assert not (tmp_path / "twistd.pid").exists(), "stale pidfile left behind by the failed start"


def test_port_offset_shifts_every_listener(make_server):
    offset = 1000
    server = make_server("offset", port_offset=offset)
    server.start()              # config says tcp:PORT-1000; the server.ports are PORT
    config_text = server.config_path.read_text()
    assert all(f"tcp:{port - offset}:" in config_text for port in server.ports.values()), \
        (server.ports, config_text)
    log = server.log_text()
    for name, port in server.ports.items():
        assert f"listening for {name} on 127.0.0.1:{port}" in log, (name, port, log)
        # (?!\d): an unshifted port must not match as the prefix of a longer number in the log
        assert not re.search(rf"127\.0\.0\.1:{port - offset}(?!\d)", log), (name, port, log)
    with socket.create_connection(("127.0.0.1", server.ports["relay"]), timeout=10) as sock:
        banner = sock.recv(512)
        assert banner.startswith(b"220 "), banner
    with server.smtp("relay") as client:
        client.ehlo()
        mark = "offset-" + str(server.ports["relay"])
        server.send(client, "x@elsewhere.test", ["alice@example.test"], server.build_message(mark))
    server.find("alice@example.test", mark)


def test_sigterm_shuts_down_cleanly(make_server):
    server = make_server("stop").start()
    assert server.pidfile.read_text().strip() == str(server.pid)
    # twistd re-raises the signal that stopped it once the reactor is down, so
    # the exit status is "killed by SIGTERM" after a clean shutdown.
    assert server.stop() in (0, -signal.SIGTERM)
    log = server.log_text()
    assert "Traceback" not in log, log
    assert "Server Shut Down." in log
    assert not server.pidfile.exists(), "twistd removes its pidfile on a clean stop"
