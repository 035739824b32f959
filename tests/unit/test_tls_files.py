"""Issue 24 item 1: the [tls] files are loaded and matched by `mailgw check`
and at start-up; each problem is one line naming the file. Before, a key that
did not match its certificate passed `check`, the server started, and every
handshake failed ("key values mismatch")."""
from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mailgw.config_types import TLSConfig
from mailgw.tls import check_files, ensure_certificate, server_options

NOW = datetime.datetime(2026, 12, 1, tzinfo=datetime.timezone.utc)


def make_pair(name: str, issuer_key=None, issuer_name: str | None = None):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name or name)])
    certificate = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(NOW).not_valid_after(NOW + datetime.timedelta(days=90))
                   .sign(issuer_key or key, hashes.SHA256()))
    return key, certificate


def pem_key(key, password: bytes | None = None) -> bytes:
    encryption = (serialization.BestAvailableEncryption(password) if password
                  else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def pem_cert(certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def configured(tmp_path, certificate: bytes, key: bytes) -> TLSConfig:
    (tmp_path / "cert.pem").write_bytes(certificate)
    (tmp_path / "key.pem").write_bytes(key)
    return TLSConfig(certificate=tmp_path / "cert.pem", private_key=tmp_path / "key.pem", generated=False,
                     min_version="TLSv1.2")


def test_a_matching_pair_with_its_chain_passes_and_loads(tmp_path):
    ca_key, ca = make_pair("Test CA")
    key, leaf = make_pair("mx.example.test", issuer_key=ca_key, issuer_name="Test CA")
    tls = configured(tmp_path, pem_cert(leaf) + pem_cert(ca), pem_key(key))
    assert check_files(tls) == []
    server_options(tls).getContext()


def test_a_key_of_another_certificate_is_named(tmp_path):
    key, _ = make_pair("a.example.test")
    _, other = make_pair("b.example.test")
    tls = configured(tmp_path, pem_cert(other), pem_key(key))
    assert check_files(tls) == [f"tls.private_key: {tmp_path / 'key.pem'} does not match "
                                f"tls.certificate {tmp_path / 'cert.pem'}"]


def test_garbage_certificate_file_is_named(tmp_path):
    key, _ = make_pair("a.example.test")
    tls = configured(tmp_path, b"this is not a certificate\n", pem_key(key))
    assert check_files(tls) == [f"tls.certificate: {tmp_path / 'cert.pem'}: no PEM certificate found"]


def test_corrupt_pem_body_is_named(tmp_path):
    key, certificate = make_pair("a.example.test")
    broken = pem_cert(certificate).replace(b"M", b"*", 5)
    (problem,) = check_files(configured(tmp_path, broken, pem_key(key)))
    assert problem.startswith(f"tls.certificate: {tmp_path / 'cert.pem'}: certificate 1 of 1")


def test_garbage_key_file_is_named(tmp_path):
    _, certificate = make_pair("a.example.test")
    tls = configured(tmp_path, pem_cert(certificate), b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    assert check_files(tls) == [f"tls.private_key: {tmp_path / 'key.pem'}: no PEM private key found"]


def test_encrypted_key_says_how_to_fix(tmp_path):
    key, certificate = make_pair("a.example.test")
    (problem,) = check_files(configured(tmp_path, pem_cert(certificate), pem_key(key, b"passphrase")))
    assert problem.startswith(f"tls.private_key: {tmp_path / 'key.pem'}: encrypted with a passphrase")


def test_leaf_after_its_intermediate_is_explained(tmp_path):
    ca_key, ca = make_pair("Test CA")
    key, leaf = make_pair("mx.example.test", issuer_key=ca_key, issuer_name="Test CA")
    (problem,) = check_files(configured(tmp_path, pem_cert(ca) + pem_cert(leaf), pem_key(key)))
    assert "must come first" in problem


def test_missing_files_are_named(tmp_path):
    tls = TLSConfig(certificate=tmp_path / "nope.pem", private_key=tmp_path / "nokey.pem", generated=False,
                    min_version="TLSv1.2")
    assert check_files(tls) == [f"tls.certificate: {tmp_path / 'nope.pem'}: cannot read: No such file or directory",
                                f"tls.private_key: {tmp_path / 'nokey.pem'}: cannot read: No such file or directory"]


def test_generated_certificate_not_made_yet_is_fine_then_checked(tmp_path):
    tls = TLSConfig(certificate=tmp_path / "tls" / "cert.pem", private_key=tmp_path / "tls" / "key.pem",
                    generated=True, min_version="TLSv1.2")
    assert check_files(tls) == []           # the first start makes it
    ensure_certificate(tls, "mx.example.test")
    assert check_files(tls) == []
    # A generated pair that was later damaged is reported like a configured one.
    _, other = make_pair("other.example.test")
    tls.certificate.write_bytes(pem_cert(other))
    assert check_files(tls) == [f"tls.private_key: {tls.private_key} does not match tls.certificate {tls.certificate}"]


@pytest.mark.parametrize("certificate, key", [(b"garbage", None), (None, "other")], ids=["garbage", "mismatch"])
def test_check_command_refuses_bad_files(tmp_path, capsys, certificate, key):
    from mailgw.config import check_main
    own_key, own_cert = make_pair("mx.example.test")
    _, other_cert = make_pair("other.example.test")
    (tmp_path / "cert.pem").write_bytes(certificate if certificate is not None else pem_cert(other_cert))
    (tmp_path / "key.pem").write_bytes(pem_key(own_key))
    config = tmp_path / "mailgw.toml"
    config.write_text(f'[server]\nhostname = "mx.example.org"\nlocal_domains = ["example.org"]\n'
                      f'data_dir = "{tmp_path / "data"}"\n\n[tls]\ncertificate = "{tmp_path / "cert.pem"}"\n'
                      f'private_key = "{tmp_path / "key.pem"}"\n')
    assert check_main(["--config", str(config)]) == 1
    out, err = capsys.readouterr()
    assert "config OK" not in out
    (line,) = err.splitlines()
    assert line.startswith("error: tls.") and str(tmp_path) in line
