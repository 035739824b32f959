"""DKIM signing (mailgw.mailauth.dkim_sign): signatures that dkimpy and
OpenDKIM verify, what h= covers (RFC 6376 §5.4, §8.15, RFC 8058 §4), and the
RFC 8463 Appendix A vectors reproduced bit for bit."""
from __future__ import annotations

import base64
import re
import shutil
import subprocess
import threading

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.internet import task

from mailgw.mailauth.dkim_sign import (DKIMSigner, header_from_domain, relaxed_body, sign_message)
from mailgw.mailauth.keys import DKIMKey, DKIMKeyStore

NOW = 1_790_000_000

MESSAGE = (b"From: Alice <alice@example.org>\r\n"
           b"To: Bob <bob@example.net>\r\n"
           b"Cc: carol@example.net\r\n"
           b"Cc: dave@example.net\r\n"
           b"Subject: Lunch  tomorrow?\r\n"
           b"Date: Mon, 16 Nov 2026 10:00:00 +0000\r\n"
           b"Message-ID: <1@example.org>\r\n"
           b"Received: from somewhere\r\n"
           b"MIME-Version: 1.0\r\n"
           b"Content-Type: text/plain; charset=utf-8\r\n"
           b"\r\n"
           b"Shall we meet at noon?  \r\n"
           b"\r\n"
           b"Alice\r\n"
           b"\r\n")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> DKIMKeyStore:
    store = DKIMKeyStore(tmp_path_factory.mktemp("dkim"))
    store.keygen("example.org", "rsa1", "rsa", now=NOW)
    store.keygen("example.org", "ed1", "ed25519", now=NOW)
    return store


@pytest.fixture(scope="module", params=["rsa", "ed25519"])
def key(request, store) -> DKIMKey:
    return next(k for k in store.signing_keys("example.org") if k.algorithm == request.param)


def dnsfunc_for(*keys):
    records = {f"{k.dns_name}.".encode(): k.dns_record.encode() for k in keys}
    return lambda name, timeout=5: records.get(name)


def verifies(signed: bytes, *keys) -> bool:
    return dkim.verify(signed, dnsfunc=dnsfunc_for(*keys))


def tags(header: bytes) -> dict[str, str]:
    value = header.decode().split(":", 1)[1]
    unfolded = re.sub(r"\s+", "", value)
    return dict(part.split("=", 1) for part in unfolded.split(";") if part)


def h_list(header: bytes) -> list[str]:
    return tags(header)["h"].split(":")


# -- verification by dkimpy -----------------------------------------------------------

def test_signature_verifies_with_dkimpy(key):
    header = sign_message(MESSAGE, key, timestamp=NOW)
    assert header.startswith(b"DKIM-Signature: ") and header.endswith(b"\r\n")
    assert verifies(header + MESSAGE, key)
    found = tags(header)
    assert found["a"] == {"rsa": "rsa-sha256", "ed25519": "ed25519-sha256"}[key.algorithm]
    assert (found["v"], found["c"], found["d"], found["s"], found["t"]) == \
        ("1", "relaxed/relaxed", "example.org", key.selector, str(NOW))
    # RFC 6376 §8.2: no l= (appended text would pass); no x= either.
    assert "l" not in found and "x" not in found


def test_a_one_byte_body_change_fails(key):
    header = sign_message(MESSAGE, key, timestamp=NOW)
    assert not verifies(header + MESSAGE.replace(b"noon", b"nooN"), key)


@pytest.mark.parametrize("added", [b"From: Mallory <mallory@example.org>\r\n",
                                   b"Subject: Send me your password\r\n",
                                   b"Date: Tue, 17 Nov 2026 10:00:00 +0000\r\n",
                                   b"To: everyone@example.net\r\n"])
@pytest.mark.parametrize("where", ["top", "bottom"])
def test_an_added_oversigned_header_fails(key, added, where):
    header = sign_message(MESSAGE, key, timestamp=NOW)
    head, body = MESSAGE.split(b"\r\n\r\n", 1)
    tampered = added + MESSAGE if where == "top" else head + b"\r\n" + added + b"\r\n" + body
    assert not verifies(header + tampered, key)


def test_an_added_header_that_is_not_signed_does_not_break_it(key):
    header = sign_message(MESSAGE, key, timestamp=NOW)
    assert verifies(header + b"Received: from relay.example.net\r\n" + MESSAGE, key)


def test_relaxed_canonicalization_survives_refolding_and_whitespace(key):
    header = sign_message(MESSAGE, key, timestamp=NOW)
    reformatted = MESSAGE.replace(b"Subject: Lunch  tomorrow?", b"Subject:   Lunch\r\n\ttomorrow?   ") \
                         .replace(b"noon?  \r\n", b"noon?\r\n")
    assert verifies(header + reformatted, key)


def test_h_names_each_field_once_per_occurrence_and_oversigns(store):
    rsa_key = store.signing_keys("example.org")[0]
    header = sign_message(MESSAGE, rsa_key, timestamp=NOW)
    assert h_list(header) == ["From", "From", "Subject", "Subject", "Date", "Date", "To", "To", "Cc", "Cc",
                              "Message-ID", "MIME-Version", "Content-Type"]
    # Received is trace, not content: relays add to it.
    assert "Received" not in h_list(header)


def test_absent_oversigned_fields_are_still_named_so_they_cannot_be_added(store):
    rsa_key = store.signing_keys("example.org")[0]
    message = b"From: alice@example.org\r\n\r\nhi\r\n"
    header = sign_message(message, rsa_key, timestamp=NOW)
    assert h_list(header) == ["From", "From", "Subject", "Date", "To"]
    assert verifies(header + message, rsa_key)
    assert not verifies(header + b"Subject: added later\r\n" + message, rsa_key)


def test_list_unsubscribe_and_its_post_field_are_signed(key):
    message = (b"List-Unsubscribe: <https://lists.example.org/u/123>\r\n"
               b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
               b"List-Id: <news.example.org>\r\n" + MESSAGE)
    header = sign_message(message, key, timestamp=NOW)
    names = h_list(header)
    # RFC 8058 §4: List-Unsubscribe-Post MUST be covered by the signature.
    assert {"List-Unsubscribe", "List-Unsubscribe-Post", "List-Id"} <= set(names)
    assert verifies(header + message, key)
    assert not verifies(header + message.replace(b"/u/123", b"/u/124"), key)


def test_extra_headers_are_signed_too(store):
    rsa_key = store.signing_keys("example.org")[0]
    message = b"Feedback-ID: 1:campaign\r\n" + MESSAGE
    header = sign_message(message, rsa_key, timestamp=NOW, extra_headers=["Feedback-ID"])
    assert "Feedback-ID" in h_list(header)
    assert not verifies(header + message.replace(b"1:campaign", b"2:campaign"), rsa_key)


def test_lf_message_gets_the_signature_of_its_crlf_form(key):
    lf_message = MESSAGE.replace(b"\r\n", b"\n")
    header = sign_message(lf_message, key, timestamp=NOW, lf=True)
    assert b"\r\n" in header                         # the caller converts to LF
    assert verifies(header + MESSAGE, key)
    if key.algorithm == "ed25519":                   # deterministic: the very same field
        assert header == sign_message(MESSAGE, key, timestamp=NOW)


def test_folded_lines_stay_within_78_characters(store):
    rsa_key = store.signing_keys("example.org")[0]
    header = sign_message(b"List-Unsubscribe: <https://x>\r\nList-Unsubscribe-Post: x\r\n" + MESSAGE, rsa_key,
                          timestamp=NOW)
    lines = header.split(b"\r\n")[:-1]
    assert len(lines) > 3 and all(len(line) <= 78 for line in lines)
    assert all(line.startswith(b" ") for line in lines[1:])


def test_a_message_without_from_is_refused(key):
    with pytest.raises(ValueError, match="From"):
        sign_message(b"To: bob@example.net\r\nSubject: x\r\n\r\nbody\r\n", key, timestamp=NOW)


def test_empty_and_missing_bodies_canonicalize_as_rfc_6376_says():
    assert relaxed_body(b"") == b""
    assert relaxed_body(b"\r\n\r\n") == b""
    assert relaxed_body(b"a  b \t\r\n\r\n\r\n") == b"a b\r\n"
    assert relaxed_body(b"no newline") == b"no newline\r\n"


# -- the From: domain ------------------------------------------------------------------

@pytest.mark.parametrize("message, domain", [
    (b"From: Alice <alice@Example.ORG>\r\n\r\n", "example.org"),
    (b"Subject: x\nFrom: alice@example.org\n\nbody\n", "example.org"),             # LF line ends
    (b"From: \"Smith, Alice\"\r\n <alice@example.org>\r\n\r\n", "example.org"),    # folded, comma in name
    ("From: Jörg <joerg@bücher.example>\r\n\r\n".encode(), "xn--bcher-kva.example"),
    (b"To: bob@example.net\r\n\r\n", None),                                        # no From
    (b"From: a@example.org, b@example.net\r\n\r\n", None),                          # several authors
    (b"From: a@example.org\r\nFrom: b@example.org\r\n\r\n", None),                  # several fields
    (b"From: undisclosed-recipients:;\r\n\r\n", None),
    (b"From: not an address\r\n\r\n", None),
    (b"From: a@\r\n\r\n", None),
])
def test_header_from_domain(message, domain):
    assert header_from_domain(message) == domain


# -- the signer --------------------------------------------------------------------------

def test_signer_adds_rsa_then_ed25519_and_both_verify(store):
    clock = task.Clock()
    clock.advance(NOW)
    signer = DKIMSigner(store, clock=clock)
    assert signer.has_key("EXAMPLE.org") and not signer.has_key("example.net")
    signatures = signer.signatures_for(MESSAGE, lf=False, domain="example.org")
    fields = [b"DKIM-Signature:" + f for f in signatures.split(b"DKIM-Signature:")[1:]]
    assert [tags(f)["a"] for f in fields] == ["rsa-sha256", "ed25519-sha256"]
    assert all(tags(f)["t"] == str(NOW) for f in fields)
    signed = signatures + MESSAGE
    rsa_key, ed_key = store.signing_keys("example.org")
    parsed = dkim.DKIM(signed)
    assert parsed.verify(0, dnsfunc=dnsfunc_for(rsa_key, ed_key))
    assert parsed.verify(1, dnsfunc=dnsfunc_for(rsa_key, ed_key))
    assert signer.signatures_for(MESSAGE, lf=False, domain="example.net") == b""


def test_signer_on_lf_messages(store):
    clock = task.Clock()
    signer = DKIMSigner(store, clock=clock)
    lf_message = MESSAGE.replace(b"\r\n", b"\n")
    signatures = signer.signatures_for(lf_message, lf=True, domain="example.org")
    signed = signatures.replace(b"\r\n", b"\n") + lf_message
    assert verifies(signed.replace(b"\n", b"\r\n"), *store.signing_keys("example.org"))


def test_signer_sees_an_activated_key_after_check_interval(tmp_path):
    store = DKIMKeyStore(tmp_path)
    clock = task.Clock()
    signer = DKIMSigner(store, clock=clock, check_interval=5)
    assert not signer.has_key("example.org")
    # Another process (`mailgw dkim keygen`) writes the first key.
    DKIMKeyStore(tmp_path).keygen("example.org", "ed1", "ed25519")
    assert not signer.has_key("example.org")           # not checked yet
    clock.advance(5)
    assert signer.has_key("example.org")
    DKIMKeyStore(tmp_path).keygen("example.org", "ed2", "ed25519")
    DKIMKeyStore(tmp_path).activate("example.org", "ed2")
    clock.advance(5)
    signer.has_key("example.org")
    assert tags(signer.signatures_for(MESSAGE, lf=False, domain="example.org"))["s"] == "ed2"


def test_signing_from_many_threads_at_once(store):
    signer = DKIMSigner(store, clock=task.Clock())
    keys = store.signing_keys("example.org")
    results, errors = [], []

    def sign(n):
        try:
            message = MESSAGE.replace(b"noon", f"noon {n}".encode())
            results.append((message, signer.signatures_for(message, lf=False, domain="example.org")))
        except Exception as error:                      # pragma: no cover - reported below
            errors.append(error)
    threads = [threading.Thread(target=sign, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 16
    for message, signatures in results:
        parsed = dkim.DKIM(signatures + message)
        assert parsed.verify(0, dnsfunc=dnsfunc_for(*keys)) and parsed.verify(1, dnsfunc=dnsfunc_for(*keys))


# -- RFC 8463 Appendix A ------------------------------------------------------------------

# A.2: the Ed25519 private key (its seed) and the public key record.
RFC8463_ED25519_SEED = "nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A="
RFC8463_ED25519_RECORD = "v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
# A.1: the RSA private key; A.2: its public key record.
RFC8463_RSA_KEY = b"""-----BEGIN RSA PRIVATE KEY-----
MIICXQIBAAKBgQDkHlOQoBTzWRiGs5V6NpP3idY6Wk08a5qhdR6wy5bdOKb2jLQi
Y/J16JYi0Qvx/byYzCNb3W91y3FutACDfzwQ/BC/e/8uBsCR+yz1Lxj+PL6lHvqM
KrM3rG4hstT5QjvHO9PzoxZyVYLzBfO2EeC3Ip3G+2kryOTIKT+l/K4w3QIDAQAB
AoGAH0cxOhFZDgzXWhDhnAJDw5s4roOXN4OhjiXa8W7Y3rhX3FJqmJSPuC8N9vQm
6SVbaLAE4SG5mLMueHlh4KXffEpuLEiNp9Ss3O4YfLiQpbRqE7Tm5SxKjvvQoZZe
zHorimOaChRL2it47iuWxzxSiRMv4c+j70GiWdxXnxe4UoECQQDzJB/0U58W7RZy
6enGVj2kWF732CoWFZWzi1FicudrBFoy63QwcowpoCazKtvZGMNlPWnC7x/6o8Gc
uSe0ga2xAkEA8C7PipPm1/1fTRQvj1o/dDmZp243044ZNyxjg+/OPN0oWCbXIGxy
WvmZbXriOWoSALJTjExEgraHEgnXssuk7QJBALl5ICsYMu6hMxO73gnfNayNgPxd
WFV6Z7ULnKyV7HSVYF0hgYOHjeYe9gaMtiJYoo0zGN+L3AAtNP9huqkWlzECQE1a
licIeVlo1e+qJ6Mgqr0Q7Aa7falZ448ccbSFYEPD6oFxiOl9Y9se9iYHZKKfIcst
o7DUw1/hz2Ck4N5JrgUCQQCyKveNvjzkkd8HjYs0SwM0fPjK16//5qDZ2UiDGnOe
uEzxBDAr518Z8VFbR41in3W4Y3yCDgQlLlcETrS+zYcL
-----END RSA PRIVATE KEY-----
"""
RFC8463_RSA_RECORD = ("v=DKIM1; k=rsa; p=MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDkHlOQoBTzWR"
                      "iGs5V6NpP3idY6Wk08a5qhdR6wy5bdOKb2jLQiY/J16JYi0Qvx/byYzCNb3W91y3FutAC"
                      "DfzwQ/BC/e/8uBsCR+yz1Lxj+PL6lHvqMKrM3rG4hstT5QjvHO9PzoxZyVYLzBfO2EeC3"
                      "Ip3G+2kryOTIKT+l/K4w3QIDAQAB")
# A.3: the signed message.
RFC8463_SIGNATURES = (
    b"DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed;\r\n"
    b" d=football.example.com; i=@football.example.com;\r\n"
    b" q=dns/txt; s=brisbane; t=1528637909; h=from : to :\r\n"
    b" subject : date : message-id : from : subject : date;\r\n"
    b" bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;\r\n"
    b" b=/gCrinpcQOoIfuHNQIbq4pgh9kyIK3AQUdt9OdqQehSwhEIug4D11Bus\r\n"
    b" Fa3bT3FY5OsU7ZbnKELq+eXdp1Q1Dw==\r\n"
    b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;\r\n"
    b" d=football.example.com; i=@football.example.com;\r\n"
    b" q=dns/txt; s=test; t=1528637909; h=from : to : subject :\r\n"
    b" date : message-id : from : subject : date;\r\n"
    b" bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;\r\n"
    b" b=F45dVWDfMbQDGHJFlXUNB2HKfbCeLRyhDXgFpEL8GwpsRe0IeIixNTe3\r\n"
    b" DhCVlUrSjV4BwcVcOF6+FF3Zo9Rpo1tFOeS9mPYQTnGdaSGsgeefOsk2Jz\r\n"
    b" dA+L10TeYt9BgDfQNZtKdN1WO//KgIqXP7OdEFE4LjFYNcUxZQ4FADY+8=\r\n")
RFC8463_MESSAGE = (
    b"From: Joe SixPack <joe@football.example.com>\r\n"
    b"To: Suzie Q <suzie@shopping.example.net>\r\n"
    b"Subject: Is dinner ready?\r\n"
    b"Date: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)\r\n"
    b"Message-ID: <20030712040037.46341.5F8J@football.example.com>\r\n"
    b"\r\n"
    b"Hi.\r\n"
    b"\r\n"
    b"We lost the game.  Are you hungry yet?\r\n"
    b"\r\n"
    b"Joe.\r\n")
RFC8463_H = ["from", "to", "subject", "date", "message-id", "from", "subject", "date"]
RFC8463_EXTRA_TAGS = [("i", "@football.example.com"), ("q", "dns/txt")]


def rfc8463_keys() -> tuple[DKIMKey, DKIMKey]:
    seed = ed25519.Ed25519PrivateKey.from_private_bytes(base64.b64decode(RFC8463_ED25519_SEED))
    rsa_key = serialization.load_pem_private_key(RFC8463_RSA_KEY, password=None)
    return (DKIMKey("football.example.com", "brisbane", "ed25519", "", True, seed),
            DKIMKey("football.example.com", "test", "rsa", "", True, rsa_key))


def rfc8463_published(selector: str) -> dict[str, str]:
    fields = [b"DKIM-Signature:" + f for f in RFC8463_SIGNATURES.split(b"DKIM-Signature:")[1:]]
    return next(tags(f) for f in fields if tags(f)["s"] == selector)


def test_our_key_records_are_the_rfc_8463_records():
    ed_key, rsa_key = rfc8463_keys()
    assert ed_key.dns_record == RFC8463_ED25519_RECORD
    assert rsa_key.dns_record == RFC8463_RSA_RECORD
    assert ed_key.dns_name == "brisbane._domainkey.football.example.com"


def test_the_rfc_8463_signed_message_verifies_with_our_records():
    ed_key, rsa_key = rfc8463_keys()
    parsed = dkim.DKIM(RFC8463_SIGNATURES + RFC8463_MESSAGE)
    assert parsed.verify(0, dnsfunc=dnsfunc_for(ed_key, rsa_key))
    assert parsed.verify(1, dnsfunc=dnsfunc_for(ed_key, rsa_key))


@pytest.mark.parametrize("selector", ["brisbane", "test"])
def test_we_reproduce_the_rfc_8463_signatures_exactly(selector):
    # Ed25519 (RFC 8032) and RSASSA-PKCS1-v1_5 are both deterministic: the same
    # key, data and tags give the published b= to the bit.
    key = next(k for k in rfc8463_keys() if k.selector == selector)
    header = sign_message(RFC8463_MESSAGE, key, timestamp=1528637909, header_names=RFC8463_H,
                          extra_tags=RFC8463_EXTRA_TAGS, header_separator=" : ")
    ours, published = tags(header), rfc8463_published(selector)
    assert ours["bh"] == published["bh"] == "2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8="
    assert ours["b"] == published["b"]
    assert ours == published


# -- an independent verifier: OpenDKIM ----------------------------------------------------

OPENDKIM = shutil.which("opendkim") or shutil.which("opendkim", path="/usr/sbin:/usr/local/sbin")


def opendkim_verify(tmp_path, signed: bytes, *keys) -> str:
    """`opendkim -t` (test mode: libopendkim's verifier on a file, no MTA),
    with the keys from TestPublicKeys instead of DNS."""
    (tmp_path / "public-keys").write_text("".join(f"{k.dns_name} {k.dns_record}\n" for k in keys))
    (tmp_path / "opendkim.conf").write_text(f"Mode v\nSyslog no\nTestPublicKeys {tmp_path / 'public-keys'}\n")
    (tmp_path / "message").write_bytes(signed)
    done = subprocess.run([OPENDKIM, "-x", str(tmp_path / "opendkim.conf"), "-t", str(tmp_path / "message")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.skipif(OPENDKIM is None, reason="opendkim not installed (apt-get install opendkim opendkim-tools)")
def test_opendkim_verifies_our_signature_and_fails_a_changed_body(tmp_path, key):
    header = sign_message(MESSAGE, key, timestamp=NOW)
    out = opendkim_verify(tmp_path, header + MESSAGE, key)
    assert f"verification (s={key.selector}, d=example.org," in out and "succeeded" in out, out
    out = opendkim_verify(tmp_path, header + MESSAGE.replace(b"noon", b"nooN"), key)
    assert "failed" in out and "succeeded" not in out, out


@pytest.mark.skipif(OPENDKIM is None, reason="opendkim not installed (apt-get install opendkim opendkim-tools)")
def test_opendkim_refuses_an_added_from(tmp_path, key):
    header = sign_message(MESSAGE, key, timestamp=NOW)
    out = opendkim_verify(tmp_path, header + b"From: mallory@example.org\r\n" + MESSAGE, key)
    assert "succeeded" not in out, out
