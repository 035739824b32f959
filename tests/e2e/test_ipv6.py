"""Issue 24: a wildcard `tcp:PORT` listener takes IPv6 clients too (before, it
bound 0.0.0.0 only and `::1` was refused though trusted_networks lists it).
Clients connect to ::1 and 127.0.0.1 only."""
from __future__ import annotations

import smtplib
import socket

import pytest

pytestmark = pytest.mark.e2e


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="this host has no IPv6 loopback")
def test_wildcard_listener_answers_ipv6_and_trusts_the_ipv6_loopback(e2e, tmp_path, users_template):
    class WildcardRelay(e2e.MailServer):
        def write_config(self):
            super().write_config()
            text = self.config_path.read_text()
            relay = self.ports["relay"]
            text = text.replace(f'"tcp:{relay}:interface=127.0.0.1"', f'"tcp:{relay}"')
            # The default's trusted networks (the e2e config trusts 127.0.0.2 only).
            trusted = 'trusted_networks = ["127.0.0.2/32"]'
            assert trusted in text
            text = text.replace(trusted, 'trusted_networks = ["127.0.0.0/8", "::1/128"]')
            self.config_path.write_text(text)

    server = WildcardRelay(tmp_path / "wildcard", users_template=users_template)
    server.start()
    try:
        port = server.ports["relay"]
        for address in ("::1", "127.0.0.1"):
            with smtplib.SMTP(address, port, timeout=e2e.CLIENT_TIMEOUT) as client:
                assert client.ehlo("client.example.test")[0] == 250
                assert client.mail("alice@example.test")[0] == 250
                # Relaying to another domain: only for trusted networks, ::1/128 among them.
                code, text = client.rcpt("someone@elsewhere.example")
                assert code == 250, (address, code, text)
                client.rset()
        log = server.log_text()
        assert f"listening for relay on :::{port}" in log
        assert f"listening for relay on 0.0.0.0:{port}" in log
    finally:
        server.stop()


def test_ipv4_only_setting_keeps_one_socket(e2e, tmp_path, users_template):
    class WildcardRelayIPv4(e2e.MailServer):
        def write_config(self):
            super().write_config()
            text = self.config_path.read_text()
            relay = self.ports["relay"]
            text = text.replace(f'"tcp:{relay}:interface=127.0.0.1"', f'"tcp:{relay}"')
            text = text.replace("[server]\n", '[server]\ninet_protocols = "ipv4"\n', 1)
            self.config_path.write_text(text)

    server = WildcardRelayIPv4(tmp_path / "ipv4", users_template=users_template)
    server.start()
    try:
        port = server.ports["relay"]
        with smtplib.SMTP("127.0.0.1", port, timeout=e2e.CLIENT_TIMEOUT) as client:
            assert client.ehlo("client.example.test")[0] == 250
        if ipv6_loopback():
            with pytest.raises(OSError):
                socket.create_connection(("::1", port), timeout=5).close()
        assert f"listening for relay on :::{port}" not in server.log_text()
    finally:
        server.stop()
