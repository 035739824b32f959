"""Issue 24 items 1 and 2 against the real server: SIGHUP does not stop
mailgw, and a certificate with the wrong key (or a garbage certificate) stops
`mailgw check` and twistd with one line naming the file, not a traceback."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("workers", [0, 1], ids=["main-process", "smtp-workers"])
def test_sighup_reloads_and_the_server_keeps_serving(make_server, workers):
    server = make_server(extra_server=f"smtp_workers = {workers}").start()
    # To mailgw and to each of its worker processes, as a closing terminal
    # signals its whole process group (which here is pytest's, so not killpg).
    if workers:
        server.wait_for_log("worker 1 of 1 accepting SMTP")     # past its start-up, signals set
    children = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
    assert len(children) == workers
    for pid in [server.pid, *map(int, children)]:
        os.kill(pid, signal.SIGHUP)
    server.wait_for_log("reload done")             # SIGHUP is a reload (mailgw/reload.py), never an exit
    assert server.process.poll() is None
    for _ in range(3):                  # with workers: more than one connection, whichever worker takes it
        with server.smtp() as client:
            assert client.ehlo("client.example.net")[0] == 250
            assert client.mail("someone@elsewhere.test")[0] == 250
            assert client.rcpt("alice@example.test")[0] == 250
    assert "exited" not in server.log_text().split("reloading the configuration (SIGHUP)")[1]
    assert server.pidfile.exists()


def bad_tls_config(e2e, tmp_path, kind: str):
    """A config whose [tls] names a certificate and a key that cannot serve."""
    port, = e2e.free_ports(1)
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    if kind == "garbage":
        (tmp_path / "cert.pem").write_text("not a certificate\n")
    else:
        # The right kind of file, made for another key.
        from mailgw.config_types import TLSConfig
        from mailgw.tls import ensure_certificate
        other = TLSConfig(certificate=tmp_path / "cert.pem", private_key=tmp_path / "other-key.pem",
                          generated=True, min_version="TLSv1.2")
        ensure_certificate(other, "mx.example.test")
    config = tmp_path / "mailgw.toml"
    config.write_text(e2e.config_text(
        data_dir=tmp_path / "data", listeners=[("relay", "relay", f"tcp:{port}:interface=127.0.0.1")],
        extra=f'[tls]\ncertificate = "{tmp_path / "cert.pem"}"\nprivate_key = "{tmp_path / "key.pem"}"\n'))
    return config


@pytest.mark.parametrize("kind, wanted", [
    ("garbage", "tls.certificate: {dir}/cert.pem: no PEM certificate found"),
    ("mismatch", "tls.private_key: {dir}/key.pem does not match tls.certificate {dir}/cert.pem"),
])
def test_unusable_tls_files_stop_check_and_start_up(e2e, tmp_path, kind, wanted):
    config = bad_tls_config(e2e, tmp_path, kind)
    wanted = wanted.format(dir=tmp_path)
    checked = e2e.run_cli(["check", "--config", str(config)], cwd=tmp_path)
    assert checked.returncode == 1
    assert checked.stderr == f"error: {wanted}\n"
    started = e2e.run_twistd(["mailgw", "--config", str(config)], cwd=tmp_path)
    assert started.returncode != 0
    output = started.stdout + started.stderr
    assert f"mailgw: cannot start: {wanted}" in output
    assert "Traceback" not in output
