"""Started as root, mailgw binds its ports, then runs as `[server] user`, and
its data files are readable by nobody else (issue 6 §5); at stop its pid file
is removed though nobody cannot write the directory it is in (issue 24)."""
from __future__ import annotations

import os
import shutil
import signal
import smtplib
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")]


def test_runs_as_the_configured_user_with_private_files(e2e):
    root = Path(tempfile.mkdtemp(prefix="mailgw-priv-", dir="/tmp"))
    os.chmod(root, 0o755)               # the unprivileged user must reach its data dir
    try:
        port, = e2e.free_ports(1)
        config = root / "mailgw.toml"
        config.write_text(e2e.config_text(
            data_dir=root / "data", listeners=[("relay", "relay", f"tcp:{port}:interface=127.0.0.1")],
            extra_server='user = "nobody"'))
        done = e2e.run_cli(["users", "add", "alice@example.test", "--config", str(config)], cwd=root,
                           stdin="secret\n")
        assert done.returncode == 0, done.stderr
        log = open(root / "server.log", "wb")
        process = subprocess.Popen([*e2e.TWISTD, "-n", "--pidfile", str(root / "twistd.pid"), "mailgw",
                                    "--config", str(config)], cwd=root, env=e2e.server_env(),
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    client = smtplib.SMTP("127.0.0.1", port, timeout=5)
                    break
                except OSError:
                    assert process.poll() is None, (root / "server.log").read_text()
                    assert time.monotonic() < deadline
                    time.sleep(0.05)        # polling for the port to open, bounded
            client.sendmail("x@elsewhere.test", ["alice@example.test"], b"Subject: priv\r\n\r\nhello\r\n")
            client.quit()
            status = Path(f"/proc/{process.pid}/status").read_text()
            uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
            assert uid_line.split()[1:] == ["65534"] * 4, uid_line
            files = [p for p in (root / "data").rglob("*") if p.is_file()]
            assert any("/new/" in str(p) for p in files)
            for path in files:
                mode = path.stat().st_mode
                assert not mode & (stat.S_IRWXG | stat.S_IRWXO), f"{path} is {oct(mode)}"
                assert path.stat().st_uid == 65534, path
        finally:
            process.terminate()
            process.wait(10)
        # Issue 24: twistd, by then running as nobody, could not remove its root-written pid file.
        assert process.returncode in (0, -signal.SIGTERM), (root / "server.log").read_text()
        log_text = (root / "server.log").read_text()
        assert "No permission to delete pid file" not in log_text
        e2e.wait_until(lambda: not (root / "twistd.pid").exists(), "the pid file to be removed")
    finally:
        shutil.rmtree(root, ignore_errors=True)
