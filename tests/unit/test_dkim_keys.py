"""The DKIM key store (mailgw.mailauth.keys) and `mailgw dkim ...`
(mailgw.mailauth.dkim_admin): files and modes, DNS records, and the
activation model: the first key signs, a later one waits for `activate`,
the active one is removed only with --force."""
from __future__ import annotations

import base64
import datetime
import json
import os
import re
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.internet import task

from mailgw.mailauth.dkim_admin import dkim_main
from mailgw.mailauth.keys import DKIMKeyStore, KeyStoreError, txt_strings

DECEMBER_2026 = datetime.datetime(2026, 12, 3, 12, 0, tzinfo=datetime.timezone.utc)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def record_tags(record: str) -> dict[str, str]:
    return dict(part.strip().split("=", 1) for part in record.split(";") if part.strip())


@pytest.fixture
def store(tmp_path) -> DKIMKeyStore:
    return DKIMKeyStore(tmp_path / "dkim")


# -- files ---------------------------------------------------------------------------

def test_keygen_writes_a_0600_pkcs8_file_in_0700_directories(store, tmp_path):
    key = store.keygen("example.org", now=DECEMBER_2026)
    assert key.path == str(tmp_path / "dkim" / "example.org" / "rsa202612.rsa.pem")
    assert mode(key.path) == 0o600
    assert mode(tmp_path / "dkim") == 0o700 and mode(tmp_path / "dkim" / "example.org") == 0o700
    data = Path(key.path).read_bytes()
    assert data.startswith(b"-----BEGIN PRIVATE KEY-----\n")          # PKCS#8, not PKCS#1
    loaded = serialization.load_pem_private_key(data, password=None)
    assert isinstance(loaded, rsa.RSAPrivateKey) and loaded.key_size == 2048 == key.bits
    # Nothing half-written is left behind.
    assert sorted(os.listdir(tmp_path / "dkim" / "example.org")) == ["active", "rsa202612.rsa.pem"]


def test_default_selectors_come_from_the_month(store):
    assert store.keygen("example.org", now=DECEMBER_2026).selector == "rsa202612"
    assert store.keygen("example.org", algorithm="ed25519", now=DECEMBER_2026).selector == "ed202612"
    clock = task.Clock()
    clock.advance(datetime.datetime(2027, 3, 1, tzinfo=datetime.timezone.utc).timestamp())
    clocked = DKIMKeyStore(store.directory, clock=clock)
    assert clocked.keygen("example.net", algorithm="ed25519").selector == "ed202703"


def test_rsa_record_publishes_the_public_key_of_the_file(store):
    key = store.keygen("example.org", "s1", bits=1024)
    assert key.dns_name == "s1._domainkey.example.org"
    assert key.dns_record.startswith("v=DKIM1; k=rsa; p=")            # RFC 6376 §3.6.1: v= first
    tags = record_tags(key.dns_record)
    published = serialization.load_der_public_key(base64.b64decode(tags["p"]))
    assert published.public_numbers() == key.private_key.public_key().public_numbers()
    assert tags["p"] == key.public_key_b64 and key.bits == 1024


def test_ed25519_record_is_the_raw_32_byte_key(store):
    key = store.keygen("example.org", "e1", "ed25519")
    tags = record_tags(key.dns_record)
    assert tags["v"] == "DKIM1" and tags["k"] == "ed25519"
    raw = base64.b64decode(tags["p"])
    # RFC 8463 §4.2: the bare key, not a SubjectPublicKeyInfo.
    assert len(raw) == 32
    assert raw == key.private_key.public_key().public_bytes(serialization.Encoding.Raw,
                                                             serialization.PublicFormat.Raw)
    assert key.bits is None
    assert Path(key.path).name == "e1.ed25519.pem"


def test_zone_record_splits_into_255_byte_strings(store):
    key = store.keygen("example.org", "big", bits=4096)
    strings = txt_strings(key.dns_record)
    assert "".join(strings) == key.dns_record and len(strings) >= 3
    assert all(len(s.encode()) <= 255 for s in strings)
    assert strings[0] == "v=DKIM1; k=rsa; "
    quoted = re.findall(r'"([^"]*)"', key.zone_record)
    assert quoted == strings
    assert key.zone_record.startswith("big._domainkey.example.org. IN TXT ( ")


def test_domains_are_stored_lower_case_a_labels(store):
    assert store.keygen("Example.ORG.", "s1", "ed25519").domain == "example.org"
    key = store.keygen("Bücher.Example", "s1", "ed25519")
    assert key.domain == "xn--bcher-kva.example"
    assert os.path.isdir(os.path.join(store.directory, "xn--bcher-kva.example"))
    assert store.keys("BÜCHER.example") == [key]


@pytest.mark.parametrize("domain", ["", "localhost", "../etc", "a/b.example", "-x.example", "x" * 64 + ".example"])
def test_bad_domains_are_refused(store, domain):
    with pytest.raises(KeyStoreError):
        store.keygen(domain, "s1", "ed25519")


@pytest.mark.parametrize("selector", ["", "a b", "../x", "x/y", "-x", "a_b"])
def test_bad_selectors_are_refused(store, selector):
    with pytest.raises(KeyStoreError):
        store.keygen("example.org", selector, "ed25519")


def test_weak_or_huge_rsa_keys_are_refused(store):
    with pytest.raises(KeyStoreError, match="RFC 8301"):
        store.keygen("example.org", "s1", bits=512)
    with pytest.raises(KeyStoreError):
        store.keygen("example.org", "s1", bits=8192)
    assert store.keys() == []


def test_an_existing_selector_is_refused_for_either_algorithm(store):
    first = store.keygen("example.org", "s1", "ed25519")
    before = Path(first.path).read_bytes()
    with pytest.raises(KeyStoreError, match="already has"):
        store.keygen("example.org", "s1", "ed25519")
    with pytest.raises(KeyStoreError, match="already has"):
        store.keygen("example.org", "S1", "rsa", bits=1024)        # one selector, one DNS name
    assert Path(first.path).read_bytes() == before
    # Another domain may use the same selector.
    assert store.keygen("example.net", "s1", "ed25519").domain == "example.net"


# -- activation ---------------------------------------------------------------------

def test_first_key_signs_second_waits_for_activate(store):
    first = store.keygen("example.org", "old", "ed25519")
    assert first.active
    assert [k.selector for k in store.signing_keys("example.org")] == ["old"]
    second = store.keygen("example.org", "new", "ed25519")
    assert not second.active
    assert [k.selector for k in store.signing_keys("example.org")] == ["old"]
    previous = store.activate("example.org", "new")
    assert previous.selector == "old"
    assert [k.selector for k in store.signing_keys("example.org")] == ["new"]
    # The old key stays, published, so mail it signed still verifies.
    assert {k.selector: k.active for k in store.keys("example.org")} == {"new": True, "old": False}
    assert os.path.exists(first.path)
    # Activating the active key again changes nothing.
    assert store.activate("example.org", "new") is None


def test_one_signing_key_per_algorithm_rsa_first(store):
    store.keygen("example.org", "ed1", "ed25519")
    store.keygen("example.org", "rsa1", "rsa", bits=1024)
    store.keygen("example.org", "rsa2", "rsa", bits=1024)
    assert [(k.algorithm, k.selector) for k in store.signing_keys("example.org")] == \
        [("rsa", "rsa1"), ("ed25519", "ed1")]
    store.activate("example.org", "rsa2")
    assert [(k.algorithm, k.selector) for k in store.signing_keys("example.org")] == \
        [("rsa", "rsa2"), ("ed25519", "ed1")]
    assert store.signing_keys("example.net") == []


def test_active_selectors_are_kept_in_a_versioned_active_file(store):
    store.keygen("example.org", "ed1", "ed25519")
    store.keygen("example.org", "rsa1", "rsa", bits=1024)
    path = os.path.join(store.directory, "example.org", "active")
    assert json.loads(Path(path).read_text()) == {"version": 1, "active": {"rsa": "rsa1", "ed25519": "ed1"}}
    assert mode(path) == 0o600


def test_removing_the_active_key_needs_force(store):
    store.keygen("example.org", "old", "ed25519")
    store.keygen("example.org", "new", "ed25519")
    with pytest.raises(KeyStoreError, match="active ed25519 key"):
        store.remove("example.org", "old")
    assert len(store.keys("example.org")) == 2
    removed = store.remove("example.org", "new")                   # a published-only key goes freely
    assert not os.path.exists(removed.path)
    store.remove("example.org", "old", force=True)
    assert store.keys("example.org") == [] and store.signing_keys("example.org") == []
    assert not os.path.exists(os.path.join(store.directory, "example.org"))


def test_forced_removal_does_not_promote_another_key(store):
    store.keygen("example.org", "old", "ed25519")
    store.keygen("example.org", "new", "ed25519")                  # maybe not in DNS yet
    store.remove("example.org", "old", force=True)
    assert [(k.selector, k.active) for k in store.keys("example.org")] == [("new", False)]
    assert DKIMKeyStore(store.directory).signing_keys("example.org") == []


def test_unknown_keys_are_reported(store):
    store.keygen("example.org", "s1", "ed25519")
    with pytest.raises(KeyStoreError, match="no key with selector s2"):
        store.activate("example.org", "s2")
    with pytest.raises(KeyStoreError):
        store.remove("example.net", "s1")


# -- loading ------------------------------------------------------------------------

def test_reload_sees_files_written_by_another_process(store, tmp_path):
    other = DKIMKeyStore(store.directory)
    other.keygen("example.org", "s1", "ed25519")
    assert store.keys() == []
    assert store.reload_if_changed() is True
    assert [k.selector for k in store.keys()] == ["s1"]
    assert store.reload_if_changed() is False
    # A key copied in by hand (no active file for that domain): its only key signs.
    directory = tmp_path / "dkim" / "example.net"
    directory.mkdir(mode=0o700)
    pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (directory / "copied.ed25519.pem").write_bytes(pem)
    os.chmod(directory / "copied.ed25519.pem", 0o600)
    store.reload()
    assert [(k.selector, k.active) for k in store.keys("example.net")] == [("copied", True)]


def test_bad_files_are_reported_and_the_rest_still_works(store, tmp_path):
    store.keygen("example.org", "good", "ed25519")
    domain_dir = tmp_path / "dkim" / "example.org"
    (domain_dir / "broken.ed25519.pem").write_bytes(b"not a key")
    (domain_dir / "wrong.rsa.pem").write_bytes(Path(store.get("example.org", "good").path).read_bytes())
    (tmp_path / "dkim" / "Upper.Example").mkdir()
    store.reload()
    assert [k.selector for k in store.keys()] == ["good"]
    assert store.signing_keys("example.org")[0].selector == "good"
    problems = "\n".join(store.problems)
    assert "broken.ed25519.pem" in problems and "wrong.rsa.pem" in problems and "Upper.Example" in problems


def test_a_missing_active_key_is_never_replaced_by_a_guess(store):
    old = store.keygen("example.org", "old", "ed25519")
    store.keygen("example.org", "new", "ed25519")
    os.unlink(old.path)                                            # deleted by hand
    store.reload()
    assert store.signing_keys("example.org") == []
    assert any("active ed25519 key old is missing" in p for p in store.problems)


def test_readable_by_others_is_warned_about(store):
    key = store.keygen("example.org", "s1", "ed25519")
    os.chmod(key.path, 0o644)
    store.reload()
    assert store.signing_keys("example.org") and any("chmod 600" in p for p in store.problems)


# -- mailgw dkim ------------------------------------------------------------------------

@pytest.fixture
def config_path(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "mailgw.toml"
    data = tmp_path / "data"
    data.mkdir()
    path.write_text(f'[server]\ndata_dir = "{data}"\nlocal_domains = ["example.org"]\n'
                    f'postmaster = "alice@example.org"\n')
    monkeypatch.delenv("MAILGW_CONFIG", raising=False)
    return path


def run(capsys, config_path, *argv):
    code = dkim_main([*argv, "--config", str(config_path)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_keygen_prints_the_path_and_the_record(config_path, capsys):
    code, out, err = run(capsys, config_path, "keygen", "example.org", "--selector", "mail1")
    assert code == 0, err
    path = config_path.parent / "data" / "dkim" / "example.org" / "mail1.rsa.pem"
    assert str(path) in out and mode(path) == 0o600
    key = DKIMKeyStore(config_path.parent / "data" / "dkim").get("example.org", "mail1")
    assert key.zone_record in out                     # zone-file form, <=255-byte strings
    assert f"  {key.dns_record}\n" in out             # and on one line, for web forms
    assert "signs mail from example.org now" in out


def test_cli_rotation_keygen_list_activate_remove(config_path, capsys):
    assert run(capsys, config_path, "keygen", "example.org", "--selector", "old", "--bits", "1024")[0] == 0
    assert run(capsys, config_path, "keygen", "example.org", "--algorithm", "ed25519", "--selector", "ed1")[0] == 0
    code, out, _ = run(capsys, config_path, "keygen", "example.org", "--selector", "new", "--bits", "1024")
    assert code == 0 and "mailgw dkim activate example.org new" in out
    code, out, _ = run(capsys, config_path, "list")
    rows = [line.split() for line in out.splitlines()]
    assert rows == [["DOMAIN", "SELECTOR", "ALGORITHM", "BITS", "STATE"],
                    ["example.org", "ed1", "ed25519", "-", "active"],
                    ["example.org", "new", "rsa", "1024", "published"],
                    ["example.org", "old", "rsa", "1024", "active"]]
    code, out, _ = run(capsys, config_path, "activate", "example.org", "new")
    assert code == 0 and "new is now the rsa signing key" in out and "mailgw dkim remove example.org old" in out
    code, _, err = run(capsys, config_path, "remove", "example.org", "new")
    assert code == 1 and "active rsa key" in err and "--force" in err
    code, out, _ = run(capsys, config_path, "remove", "example.org", "old")
    assert code == 0 and "old._domainkey.example.org" in out
    code, out, _ = run(capsys, config_path, "list", "example.org")
    assert [line.split()[1] for line in out.splitlines()[1:]] == ["ed1", "new"]
    code, out, _ = run(capsys, config_path, "remove", "example.org", "ed1", "--force")
    assert code == 0 and "no longer signed with ed25519" in out


def test_cli_errors_and_usage(config_path, capsys):
    assert run(capsys, config_path, "keygen", "example.org", "--bits", "512")[0] == 1
    assert run(capsys, config_path, "activate", "example.org", "nope")[0] == 1
    assert run(capsys, config_path, "keygen", "not a domain")[0] == 1
    assert run(capsys, config_path, "keygen", "example.org", "--algorithm", "ed25519", "--bits", "2048")[0] == 2
    assert run(capsys, config_path, "keygen", "example.org", "--algorithm", "dsa")[0] == 2
    assert run(capsys, config_path, "frobnicate")[0] == 2
    assert run(capsys, config_path, "activate", "example.org")[0] == 2
    assert dkim_main(["--help"]) == 0
    assert dkim_main([]) == 2
    capsys.readouterr()


def test_cli_uses_the_configured_keys_dir(tmp_path, capsys):
    keys_dir = tmp_path / "elsewhere"
    config = tmp_path / "mailgw.toml"
    config.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\nlocal_domains = ["example.org"]\n'
                      f'postmaster = "alice@example.org"\n[dkim]\nkeys_dir = "{keys_dir}"\n')
    code, out, err = run(capsys, config, "keygen", "example.org", "--algorithm", "ed25519", "--selector", "s")
    assert code == 0, err
    assert (keys_dir / "example.org" / "s.ed25519.pem").exists()


def test_cli_bad_config_is_an_error(tmp_path, capsys):
    config = tmp_path / "mailgw.toml"
    config.write_text("[server]\nno_such_key = 1\n")
    code, _, err = run(capsys, config, "list")
    assert code == 1 and "configuration error" in err
