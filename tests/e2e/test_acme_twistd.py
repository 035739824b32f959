"""End to end, issue 17 item 3 through the real `twistd mailgw`: `[tls] acme`
with an `acme-http` listener gets a certificate from pebble and serves it to
new TLS connections without a restart (the manager writes the files, the
listeners' ReloadingTLS picks them up)."""
from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest
from cryptography import x509

from tests.e2e.pebble_server import PEBBLE, NameServer, Pebble, TestCA

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not Path(PEBBLE).exists(), reason="pebble not installed")]


def served(port: int) -> x509.Certificate:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="mx.example.test") as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


def test_twistd_mailgw_obtains_and_serves_an_acme_certificate(e2e, make_server, tmp_path):
    ca = TestCA(tmp_path / "ca")
    dns = NameServer(tmp_path / "dns", [e2e.HOSTNAME])
    server = make_server(listeners=(("imaps", "imaps"), ("acme-http", "acme")))
    server.write_config()        # the ports, before pebble is told where to validate
    pebble = Pebble(tmp_path / "pebble", ca, http_port=server.ports["acme"], tls_port=1, dns_port=dns.port).start()
    try:
        text = server.config_path.read_text().replace(
            "[smtp]\n", f'[tls]\nacme = true\nacme_contact = "postmaster@example.test"\n'
                        f'acme_directory = "{pebble.directory_url}"\nacme_ca_file = "{ca.ca_path}"\n\n[smtp]\n', 1)
        server.config_path.write_text(text)
        server.add_users()
        server.start()
        placeholder = served(server.ports["imaps"])
        assert placeholder.issuer == placeholder.subject          # self-signed until the CA answers
        e2e.wait_until(lambda: "Pebble" in served(server.ports["imaps"]).issuer.rfc4514_string(),
                       f"the ACME certificate on imaps\n{server.log_tail()}", within=60, poll=0.2)
        leaf = served(server.ports["imaps"])
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName)
        assert names == [e2e.HOSTNAME]
        assert (server.data_dir / "acme" / "cert.pem").stat().st_mode & 0o777 == 0o600
    finally:
        server.stop()
        pebble.stop()
        dns.stop()
