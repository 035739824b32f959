"""Pebble (Let's Encrypt's test ACME server, /usr/bin/pebble) on 127.0.0.1 for
the ACME tests, with what it needs around it:

- `TestCA`: a CA made here with `cryptography` and a certificate from it for
  127.0.0.1/localhost, which pebble serves its ACME and management API with;
  clients trust `TestCA.ca_path` (mailgw's `[tls] acme_ca_file`).
- `NameServer`: tests/e2e/dns_server.py in a process of its own, with a zone
  that answers A 127.0.0.1 for the names given; pebble's `-dnsserver`, so its
  validation connects to 127.0.0.1 and never to this machine's resolver.
- `Pebble`: the process, on ephemeral ports (API and management), validating
  HTTP-01 on `http_port` and TLS-ALPN-01 on `tls_port` (the test's listeners),
  PEBBLE_VA_NOSLEEP=1 (validate at once), PEBBLE_WFE_NONCEREJECT=0 (no random
  badNonce), PEBBLE_AUTHZREUSE=0 (every order proves every name again, so a
  broken challenge listener fails the order). `root_pem()` is the root of
  this run's issuing chain (management API /roots/0). Stopped by its PID.

Every wait has a deadline and polls; nothing sleeps for a fixed time.
"""
from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PEBBLE = "/usr/bin/pebble"
DNS_SERVER = Path(__file__).with_name("dns_server.py")
START_DEADLINE = 30.0      # seconds for pebble (or the DNS server) to answer
STOP_DEADLINE = 10.0


def wait_for(condition, what: str, within: float, poll: float = 0.05):
    """Poll `condition` until it returns something true (and return it), at most `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"not within {within}s: {what}")
        time.sleep(poll)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 just now (for pebble's own listeners, which
    cannot be handed a bound socket; Pebble.start retries if one is taken)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=STOP_DEADLINE)


class TestCA:
    """A throw-away CA and a server certificate from it for 127.0.0.1 and localhost."""

    __test__ = False     # not a pytest test class

    def __init__(self, root: Path):
        root.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.timezone.utc)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mailgw test CA for pebble")])
        ca = (x509.CertificateBuilder()
              .subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
              .serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                           content_commitment=False, key_encipherment=False, data_encipherment=False,
                                           key_agreement=False, encipher_only=False, decipher_only=False),
                             critical=True)
              .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
              .sign(ca_key, hashes.SHA256()))
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
                .issuer_name(ca_name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                            x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                               critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        self.ca_path = root / "test-ca.pem"
        self.cert_path = root / "pebble-cert.pem"
        self.key_path = root / "pebble-key.pem"
        self.ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        self.cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
        self.key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
        os.chmod(self.key_path, 0o600)


class NameServer:
    """tests/e2e/dns_server.py answering A 127.0.0.1 (and no AAAA) for `names`."""

    def __init__(self, root: Path, names):
        root.mkdir(parents=True, exist_ok=True)
        self.zone_path = root / "zone.json"
        self.port_path = root / "dns.port"
        self.log_path = root / "dns.log"
        self.zone_path.write_text(json.dumps({name: {"A": ["127.0.0.1"]} for name in names}))
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen([sys.executable, str(DNS_SERVER), str(self.zone_path), str(self.port_path)],
                                        stdout=self._log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: self.port_path.exists() or self.process.poll() is not None,
                     "the DNS server's port file", START_DEADLINE)
            if self.process.poll() is not None:
                raise RuntimeError(f"dns_server.py exited: {self.log_path.read_text()}")
        except BaseException:
            self.stop()
            raise
        self.port = int(self.port_path.read_text())

    def stop(self) -> None:
        _stop(self.process)
        self._log.close()


class Pebble:
    """One pebble process; `start()` returns once its directory answers."""

    def __init__(self, root: Path, ca: TestCA, *, http_port: int, tls_port: int, dns_port: int):
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.ca = ca
        self.http_port = http_port
        self.tls_port = tls_port
        self.dns_port = dns_port
        self.log_path = root / "pebble.log"
        self.process: subprocess.Popen | None = None
        self.port = self.management_port = 0

    @property
    def directory_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    @property
    def management_url(self) -> str:
        return f"https://127.0.0.1:{self.management_port}"

    def start(self, attempts: int = 3) -> "Pebble":
        for attempt in range(attempts):
            self.port, self.management_port = free_port(), free_port()
            if self.port == self.management_port:
                continue
            config = {"pebble": {
                "listenAddress": f"127.0.0.1:{self.port}",
                "managementListenAddress": f"127.0.0.1:{self.management_port}",
                "certificate": str(self.ca.cert_path),
                "privateKey": str(self.ca.key_path),
                "httpPort": self.http_port,
                "tlsPort": self.tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
            }}
            config_path = self.root / "pebble-config.json"
            config_path.write_text(json.dumps(config, indent=2))
            env = dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT="0", PEBBLE_AUTHZREUSE="0")
            with open(self.log_path, "ab") as log_file:
                self.process = subprocess.Popen(
                    [PEBBLE, "-config", str(config_path), "-dnsserver", f"127.0.0.1:{self.dns_port}",
                     "-strict=false"],
                    stdout=log_file, stderr=subprocess.STDOUT, cwd=self.root, env=env)
            try:
                wait_for(lambda: self._answers() or self.process.poll() is not None,
                         "pebble's ACME directory", START_DEADLINE)
            except BaseException:
                self.stop()
                raise
            if self.process.poll() is None:
                return self
            # Exited: most likely a port taken between free_port() and its bind. Again, new ports.
        raise RuntimeError(f"pebble did not start; its log:\n{self.log_tail()}")

    def _answers(self) -> bool:
        try:
            return requests.get(self.directory_url, verify=str(self.ca.ca_path), timeout=2).ok
        except requests.RequestException:
            return False

    def root_pem(self) -> bytes:
        """The root certificate of this run (pebble makes new ones at each start)."""
        response = requests.get(f"{self.management_url}/roots/0", verify=str(self.ca.ca_path), timeout=10)
        response.raise_for_status()
        return response.content

    def intermediate_pem(self) -> bytes:
        response = requests.get(f"{self.management_url}/intermediates/0", verify=str(self.ca.ca_path), timeout=10)
        response.raise_for_status()
        return response.content

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process)
