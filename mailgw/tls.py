"""TLS for the listeners: load (or on first start, make) the certificate and
build the server-side OpenSSL context options.

Twisted's CertificateOptions defaults are sound (TLS 1.2 minimum, AEAD
ciphers first, no compression, no tickets); we raise the minimum to what the
config says. RFC 8996: nothing below TLS 1.2; RFC 8314 §4.1 for submission.
"""
from __future__ import annotations

import datetime
import os
import re
from pathlib import Path

from OpenSSL import SSL
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from mailgw.config_types import TLSConfig
from mailgw.durable import write_private

log = Logger()

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def ensure_certificate(tls: TLSConfig, hostname: str, *, now: datetime.datetime | None = None) -> None:
    """Make a self-signed certificate for `hostname` when none was configured
    and none was made before. Key file 0600, written before the certificate
    so a crash never leaves a certificate without its key."""
    if not tls.generated or (tls.certificate.exists() and tls.private_key.exists()):
        return
    now = now or datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    tls.private_key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private(tls.private_key, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    write_private(tls.certificate, certificate.public_bytes(serialization.Encoding.PEM))
    log.info("generated a self-signed certificate for {hostname} at {path}; "
             "configure [tls] certificate/private_key for a real one",
             hostname=hostname, path=str(tls.certificate))


def check_files(tls: TLSConfig) -> list[str]:
    """Why the [tls] files cannot serve TLS, one line per problem naming the
    file (empty: they can). For `mailgw check` and start-up alike, so neither
    says OK to a pair that fails every handshake later ("key values mismatch").

    The self-signed default not made yet is fine: ensure_certificate makes it."""
    if tls.generated:
        try:
            if not (tls.certificate.exists() and tls.private_key.exists()):
                return []
        except OSError as error:        # EACCES on the directory: exists() lets it through
            return [f"tls.certificate: {tls.certificate}: cannot read: {error.strerror}"]
    data: dict[str, bytes] = {}
    problems = []
    for key, path in (("certificate", tls.certificate), ("private_key", tls.private_key)):
        try:
            data[key] = path.read_bytes()
        except OSError as error:
            problems.append(f"tls.{key}: {path}: cannot read: {error.strerror}")
    if problems:
        return problems
    chain = _PEM_CERT.findall(data["certificate"])
    if not chain:
        return [f"tls.certificate: {tls.certificate}: no PEM certificate found"]
    certificates = []
    for number, pem in enumerate(chain, 1):
        try:
            certificates.append(x509.load_pem_x509_certificate(pem))
        except ValueError:
            return [f"tls.certificate: {tls.certificate}: certificate {number} of {len(chain)} is not valid PEM"]
    try:
        key = serialization.load_pem_private_key(data["private_key"], password=None)
    except TypeError:       # encrypted: a daemon has nobody to type the passphrase
        return [f"tls.private_key: {tls.private_key}: encrypted with a passphrase; "
                "store it unencrypted (mode 0600): openssl pkey -in KEY -out PLAIN"]
    except (ValueError, UnsupportedAlgorithm):
        return [f"tls.private_key: {tls.private_key}: no PEM private key found"]
    ours = _public_der(key)
    if _public_der(certificates[0]) != ours:
        if any(_public_der(other) == ours for other in certificates[1:]):
            return [f"tls.certificate: {tls.certificate}: the certificate for tls.private_key "
                    "must come first, then its intermediates"]
        return [f"tls.private_key: {tls.private_key} does not match tls.certificate {tls.certificate}"]
    try:
        server_options(tls).getContext()     # anything else OpenSSL refuses
    except (SSL.Error, ValueError) as error:
        return [f"tls.certificate: {tls.certificate}: OpenSSL refuses it: {error}"]
    return []


def _public_der(holder) -> bytes:
    return holder.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)


def server_options(tls: TLSConfig) -> ssl.CertificateOptions:
    """CertificateOptions for our listeners, from the PEM files."""
    chain = _PEM_CERT.findall(tls.certificate.read_bytes())
    if not chain:
        raise ValueError(f"{tls.certificate}: no PEM certificate found")
    # cryptography objects: pyOpenSSL 26 deprecates its own X509/PKey here.
    certificates = [x509.load_pem_x509_certificate(pem) for pem in chain]
    key = serialization.load_pem_private_key(tls.private_key.read_bytes(), password=None)
    minimum = ssl.TLSVersion.TLSv1_3 if tls.min_version == "TLSv1.3" else ssl.TLSVersion.TLSv1_2
    return ssl.CertificateOptions(
        privateKey=key, certificate=certificates[0], extraCertChain=certificates[1:],
        raiseMinimumTo=minimum)


@implementer(IOpenSSLServerConnectionCreator)
class ReloadingTLS:
    """The listeners' TLS context factory: the certificate and key files are
    re-read when they change on disk, so a renewal (certbot, ACME, an admin's
    copy) reaches new connections without a restart, and `install()` swaps in
    the options a reload built. Sessions already in TLS keep their context.

    Each handshake asks for `getContext()` (TLSMemoryBIOFactory for implicit
    TLS, startTLS for STARTTLS); at most once per `tls.check_interval` that
    costs two stat()s. A changed pair is checked with `check_files` first: a
    half-written or mismatched pair is logged once and the old context kept.
    As an IOpenSSLServerConnectionCreator, TLSMemoryBIOFactory (implicit TLS)
    and startTLS (STARTTLS) ask it for each connection, and nothing caches the
    context in between (docs/twisted.md §6.3)."""

    def __init__(self, tls: TLSConfig, *, clock, options: ssl.CertificateOptions | None = None):
        self._clock = clock
        self.tls = tls
        self._options = options if options is not None else server_options(tls)
        self._key = self._files_key(tls)
        self._checked_at = clock.seconds()
        self._last_problem: tuple | None = None
        self.reloads = 0                # counters for metrics: certificates re-read and installed
        self.reload_failures = 0        # changed files that could not be used

    @staticmethod
    def _files_key(tls: TLSConfig):
        keys = []
        for path in (tls.certificate, tls.private_key):
            try:
                st = os.stat(path)
            except OSError:
                keys.append(None)
            else:
                keys.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(keys)

    def serverConnectionForTLS(self, tls_protocol) -> SSL.Connection:
        return SSL.Connection(self.getContext(), None)

    def getContext(self):
        now = self._clock.seconds()
        if now - self._checked_at >= self.tls.check_interval:
            self._checked_at = now
            self.check_files_changed()
        return self._options.getContext()

    def check_files_changed(self) -> bool:
        """Re-read the files if they changed since we last read them; True
        if new ones are now served."""
        key = self._files_key(self.tls)
        if key == self._key:
            return False
        problems = check_files(self.tls)
        if problems:
            if key != self._last_problem:        # once per state of the files
                self._last_problem = key
                self.reload_failures += 1
                log.error("TLS files changed but cannot be used ({problems}); still serving the previous "
                          "certificate", problems="; ".join(problems))
            return False
        try:
            options = server_options(self.tls)
            options.getContext()
        except (OSError, ValueError, SSL.Error) as error:
            self._last_problem = key
            self.reload_failures += 1
            log.error("TLS files changed but cannot be used ({error}); still serving the previous certificate",
                      error=error)
            return False
        self.install(options, tls=self.tls, key=key)
        return True

    def install(self, options: ssl.CertificateOptions, *, tls: TLSConfig, key=None) -> None:
        """Serve `options` (built from `tls`) to new connections from now on."""
        self._options = options
        self.tls = tls
        self._key = key if key is not None else self._files_key(tls)
        self._last_problem = None
        self.reloads += 1
        log.info("TLS certificate {path} loaded: {summary}", path=str(tls.certificate),
                 summary=describe_certificate(tls.certificate))


def describe_certificate(path: Path) -> str:
    """"CN=..., valid until ...", for log lines; "" when unreadable."""
    try:
        pem = _PEM_CERT.search(Path(path).read_bytes())
        certificate = x509.load_pem_x509_certificate(pem.group(0))
    except (OSError, ValueError, AttributeError):
        return ""
    return f"{certificate.subject.rfc4514_string()}, valid until {certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
