"""End to end, issue 17: reload without a restart (SIGHUP and `mailgw reload`).

The real server, real clients: a certificate replaced on disk reaches new
TLS connections while an IMAP IDLE session from before stays and still hears
of new mail; a broken config changes nothing and says why; an alias added
and a user deleted take effect; listeners come and go; a session open across
the reload finishes its transaction."""
from __future__ import annotations

import datetime
import imaplib
import os
import signal
import socket
import ssl
import uuid

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

pytestmark = pytest.mark.e2e
ALICE, BOB = "alice@example.test", "bob@example.test"
PASSWORDS = {ALICE: "secret", BOB: "hunter2"}
# Alias and user tables are looked at only when a reload says so (or after an
# hour): what changes below changes because of the reload.
SLOW_WATCH = "[routing]\ncheck_interval = 3600.0\n"
LISTENERS = (("relay", "relay"), ("submission", "submission"), ("imaps", "imaps"), ("pop3", "pop3"))


def write_pair(certificate_path, key_path, common_name: str) -> bytes:
    """A new self-signed pair where the server's is; the DER of the certificate.
    Key first, then certificate, each renamed into place, as certbot does."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=30))
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName(common_name)]), critical=False)
                   .sign(key, hashes.SHA256()))
    for path, data in ((key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption())),
                       (certificate_path, certificate.public_bytes(serialization.Encoding.PEM))):
        tmp = path.with_name(path.name + ".new")
        tmp.write_bytes(data)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    return certificate.public_bytes(serialization.Encoding.DER)


def served_certificate(port: int) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="mx.example.test") as tls:
            return tls.getpeercert(binary_form=True)


def reload(e2e, server):
    return e2e.run_cli(["reload", "--config", str(server.config_path)], cwd=server.root)


class IdleSession:
    """An IMAP session over implicit TLS, in IDLE (RFC 2177)."""

    def __init__(self, server):
        self.client = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=server.tls_client_context(),
                                        timeout=15)
        self.client.login(ALICE, PASSWORDS[ALICE])
        self.client.select("INBOX")
        self.client.send(b"I1 IDLE\r\n")
        assert self.client.readline().startswith(b"+")

    def wait_for(self, text: bytes) -> bytes:
        """The next untagged line carrying `text` (EXISTS may come with RECENT)."""
        seen = []
        for _ in range(5):
            line = self.client.readline()
            if text in line:
                return line
            seen.append(line)
        raise AssertionError(f"no {text!r} in {seen}")

    def done(self) -> None:
        self.client.send(b"DONE\r\n")
        self.wait_for(b"I1 OK")
        assert self.client.noop()[0] == "OK"
        self.client.logout()


def deliver(server, recipient: str, mark: str) -> None:
    client = server.smtp("relay")
    client.sendmail("someone@elsewhere.test", [recipient],
                    f"Subject: {mark}\r\nX-Test-Marker: {mark}\r\n\r\nbody\r\n".encode())
    client.quit()


def test_a_new_certificate_reaches_new_connections_and_idle_stays(e2e, make_server):
    server = make_server(listeners=LISTENERS, extra="[tls]\ncheck_interval = 1.0\n").start()
    tls_dir = server.data_dir / "tls"
    first = served_certificate(server.ports["imaps"])
    idle = IdleSession(server)

    # By itself: the files change on disk (a certbot renewal), no signal.
    renewed = write_pair(tls_dir / "cert.pem", tls_dir / "key.pem", "renewed.example.test")
    assert renewed != first
    e2e.wait_until(lambda: served_certificate(server.ports["imaps"]) == renewed,
                   "the renewed certificate on new connections", within=15)
    deliver(server, ALICE, uuid.uuid4().hex)
    idle.wait_for(b"EXISTS")

    # And at once with `mailgw reload`, on STARTTLS too.
    again = write_pair(tls_dir / "cert.pem", tls_dir / "key.pem", "again.example.test")
    done = reload(e2e, server)
    assert done.returncode == 0, done.stderr
    assert "reloaded" in done.stdout
    assert served_certificate(server.ports["imaps"]) == again
    smtp = server.smtp("submission")
    smtp.starttls(context=server.tls_client_context())
    assert smtp.sock.getpeercert(binary_form=True) == again
    smtp.quit()
    deliver(server, ALICE, uuid.uuid4().hex)
    idle.wait_for(b"EXISTS")
    idle.done()
    assert "TLS certificate" in server.log_text() and "again.example.test" in server.log_text()


def test_a_broken_config_changes_nothing_and_says_why(e2e, make_server):
    server = make_server(listeners=LISTENERS).start()
    good = server.config_path.read_text()
    server.config_path.write_text(good.replace('hostname = "mx.example.test"', 'hostname = "mx..example.test"')
                                  .replace("[smtp]\n", '[smtp]\nmax_recipients = "many"\n'))
    os.kill(server.pid, signal.SIGHUP)
    server.wait_for_log("reload refused, nothing changed")
    log = server.log_text()
    assert "server.hostname" in log and "smtp.max_recipients" in log      # every error at once
    done = reload(e2e, server)
    assert done.returncode == 1
    assert "server.hostname" in done.stderr and "Traceback" not in done.stderr + log
    # Still the old settings, still serving.
    client = server.smtp("relay")
    code, banner = client.ehlo()
    assert code == 250 and banner.startswith(b"mx.example.test")
    client.quit()

    # Valid TOML whose settings a reload cannot apply: refused by the server itself.
    server.config_path.write_text(good.replace("io_threads = 8", "io_threads = 4"))
    done = reload(e2e, server)
    assert done.returncode == 1
    assert "server.io_threads" in done.stderr and "restart" in done.stderr
    server.config_path.write_text(good)
    assert reload(e2e, server).returncode == 0


def test_an_alias_added_and_a_user_deleted_take_effect(e2e, make_server):
    server = make_server(listeners=LISTENERS, extra=SLOW_WATCH).start()
    pop3_login = _pop3_login(server, BOB)
    assert pop3_login == b"+OK"
    client = server.smtp("relay")
    client.ehlo()
    client.mail("someone@elsewhere.test")
    assert client.rcpt("team@example.test")[0] == 550      # no such alias yet
    client.quit()

    done = e2e.run_cli(["aliases", "add", "team@example.test", ALICE, "--config", str(server.config_path)],
                       cwd=server.root)
    assert done.returncode == 0, done.stderr
    done = e2e.run_cli(["users", "delete", BOB, "--config", str(server.config_path)], cwd=server.root)
    assert done.returncode == 0, done.stderr
    done = reload(e2e, server)
    assert done.returncode == 0, done.stderr

    mark = uuid.uuid4().hex
    deliver(server, "team@example.test", mark)
    server.find(ALICE, mark)
    assert _pop3_login(server, BOB) == b"-ERR"


def _pop3_login(server, user: str) -> bytes:
    with socket.create_connection(("127.0.0.1", server.ports["pop3"]), timeout=10) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"+OK")
        sock.sendall(b"STLS\r\n")
        assert reader.readline().startswith(b"+OK")
        context = server.tls_client_context()
        with context.wrap_socket(sock, server_hostname="mx.example.test") as tls:
            reader = tls.makefile("rb")
            tls.sendall(f"USER {user}\r\n".encode())
            reader.readline()
            tls.sendall(f"PASS {PASSWORDS[user]}\r\n".encode())
            answer = reader.readline().split(b" ", 1)[0].strip()
            tls.sendall(b"QUIT\r\n")
            return answer


def test_listeners_come_and_go_and_an_open_session_finishes(e2e, make_server):
    server = make_server(listeners=LISTENERS).start()
    before = server.smtp("relay")
    before.ehlo()
    before.mail("someone@elsewhere.test")
    assert before.rcpt(ALICE)[0] == 250

    # A new listener on a port someone else holds: the reload is refused before anything changed.
    good = server.config_path.read_text()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = (good.replace('hostname = "mx.example.test"', 'hostname = "mx3.example.test"')
                + f'\n[[listeners]]\nrole = "pop3"\nname = "pop3-busy"\n'
                  f'endpoint = "tcp:{taken.getsockname()[1]}:interface=127.0.0.1"\n')
        server.config_path.write_text(busy)
        done = reload(e2e, server)
    assert done.returncode == 1 and "cannot listen on" in done.stderr, done.stderr
    probe = server.smtp("relay")
    assert probe.ehlo()[1].startswith(b"mx.example.test")
    probe.quit()

    new_port = e2e.free_ports(1)[0]
    text = good
    old_pop3 = f'name = "pop3"\nendpoint = "tcp:{server.ports["pop3"]}:interface=127.0.0.1"'
    assert old_pop3 in text
    text = text.replace(old_pop3, f'name = "pop3-new"\nendpoint = "tcp:{new_port}:interface=127.0.0.1"')
    text = text.replace('hostname = "mx.example.test"', 'hostname = "mx2.example.test"')
    server.config_path.write_text(text)
    done = reload(e2e, server)
    assert done.returncode == 0, done.stderr
    assert "listener pop3 closed" in done.stdout and "listener pop3-new opened" in done.stdout

    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.ports["pop3"]), timeout=5).close()
    with socket.create_connection(("127.0.0.1", new_port), timeout=10) as sock:
        assert sock.makefile("rb").readline().startswith(b"+OK")
    after = server.smtp("relay")
    code, banner = after.ehlo()
    assert banner.startswith(b"mx2.example.test")
    after.quit()

    # The session from before the reload ends its transaction as it began.
    mark = uuid.uuid4().hex
    code, _ = before.data(f"Subject: {mark}\r\nX-Test-Marker: {mark}\r\n\r\nbody\r\n".encode())
    assert code == 250
    before.quit()
    _, stored = server.find(ALICE, mark)
    assert b"by mx.example.test" in stored          # its Received: names the host it began with


def test_smtp_workers_reload_too(e2e, make_server):
    server = make_server(listeners=LISTENERS, extra_server="smtp_workers = 2").start()
    server.wait_for_log("worker 2 of 2 accepting SMTP")
    before = server.smtp("relay")
    before.ehlo()
    before.mail("someone@elsewhere.test")
    assert before.rcpt(ALICE)[0] == 250
    server.config_path.write_text(server.config_path.read_text()
                                  .replace('hostname = "mx.example.test"', 'hostname = "mx2.example.test"'))
    done = reload(e2e, server)
    assert done.returncode == 0, done.stderr
    assert "SMTP workers told to reload" in done.stdout
    e2e.wait_until(lambda: server.log_text().count("reloaded the configuration") >= 2,
                   "both workers reloaded", within=10)
    for _ in range(6):          # whichever worker takes the connection
        client = server.smtp("relay")
        assert client.ehlo()[1].startswith(b"mx2.example.test")
        client.quit()
    mark = uuid.uuid4().hex
    assert before.data(f"Subject: {mark}\r\nX-Test-Marker: {mark}\r\n\r\nbody\r\n".encode())[0] == 250
    before.quit()
    server.find(ALICE, mark)
