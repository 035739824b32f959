"""ScriptStore: per-user Sieve scripts (RFC 5804 semantics), atomic writes, confinement."""
from __future__ import annotations

import os
import stat

import pytest

from mailgw.sieve.scripts import (
    ActiveScriptError,
    BadNameError,
    ExistsError,
    QuotaError,
    ScriptStore,
    ScriptStoreError,
)

USER = "alice@example.org"
OTHER = "bob@example.org"
SCRIPT = 'require "fileinto";\r\nkeep;\r\n'


class SyntaxErr(ValueError):
    pass


def _strict(text):
    if "bad" in text:
        raise SyntaxErr("line 1: unknown command bad")
    return object()


@pytest.fixture
def root(tmp_path):
    return tmp_path / "sieve"


@pytest.fixture
def store(root):
    return ScriptStore(root)


def _all_files(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# -- basics -------------------------------------------------------------------


def test_empty_user_has_nothing(store, root):
    assert store.list(USER) == []
    assert store.active(USER) is None
    assert store.active_path(USER) is None
    with pytest.raises(KeyError):
        store.get(USER, "x")
    assert not root.exists()  # reads create nothing


def test_put_get_list(store, root):
    store.put(USER, "b", "keep;")
    store.put(USER, "a", SCRIPT)
    assert store.get(USER, "a") == SCRIPT  # CRLF kept exactly
    assert store.list(USER) == [("a", False), ("b", False)]
    assert (root / "example.org" / "alice" / "scripts" / "a.sieve").is_file()


def test_put_replaces(store):
    store.put(USER, "a", "keep;")
    store.put(USER, "a", "discard;")
    assert store.get(USER, "a") == "discard;"
    assert store.list(USER) == [("a", False)]


def test_modes(store, root):
    store.put(USER, "a", "keep;")
    store.set_active(USER, "a")
    user_dir = root / "example.org" / "alice"
    for d in (root, root / "example.org", user_dir, user_dir / "scripts"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for f in (user_dir / "scripts" / "a.sieve", user_dir / "active"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600


def test_users_are_separate(store):
    store.put(USER, "a", "keep;")
    store.set_active(USER, "a")
    assert store.list(OTHER) == []
    assert store.active(OTHER) is None
    with pytest.raises(KeyError):
        store.get(OTHER, "a")


# -- names --------------------------------------------------------------------


@pytest.mark.parametrize("name", [
    "my script", "Vacation (summer)", "Ünïcødé", "日本語", "a%41b", "100%", "x.sieve",
    "a b\tc".replace("\t", " "), "-dash_", "e\u0301", "😀",
])
def test_names_round_trip(store, root, name):
    store.put(USER, name, "keep;")
    assert store.list(USER) == [(name, False)]
    assert store.get(USER, name) == "keep;"
    store.set_active(USER, name)
    assert store.active(USER) == (name, "keep;")
    files = os.listdir(root / "example.org" / "alice" / "scripts")
    assert len(files) == 1 and all(
        c.isascii() and (c.isalnum() or c in "_.-%") for c in files[0])


def test_percent_names_do_not_collide(store):
    store.put(USER, "%41", "one;")
    store.put(USER, "A", "two;")
    assert store.get(USER, "%41") == "one;"
    assert store.get(USER, "A") == "two;"
    assert store.list(USER) == [("%41", False), ("A", False)]


@pytest.mark.parametrize("name", [
    "", ".", "..", "../x", "a/b", "/etc/passwd", ".hidden", "\x00", "a\x00b", "a\nb",
    "a\rb", "\x7f", "\x85", "a\u2028b", "a\u2029b", "x" * 129, "\ud800",
])
def test_bad_names_refused_everywhere(store, root, name):
    store.put(USER, "ok", "keep;")
    with pytest.raises(BadNameError):
        store.put(USER, name, "keep;")
    with pytest.raises(BadNameError):
        store.get(USER, name)
    with pytest.raises(BadNameError):
        store.delete(USER, name)
    with pytest.raises(BadNameError):
        store.rename(USER, "ok", name)
    with pytest.raises(BadNameError):
        store.rename(USER, name, "new")
    with pytest.raises(BadNameError):
        store.have_space(USER, name, 1)
    if name:
        with pytest.raises(BadNameError):
            store.set_active(USER, name)
    assert _all_files(root) == [
        "example.org", "example.org/alice", "example.org/alice/scripts",
        "example.org/alice/scripts/ok.sieve"]


def test_name_length_limit(root):
    store = ScriptStore(root, max_name_length=5)
    store.put(USER, "abcde", "keep;")
    with pytest.raises(BadNameError):
        store.put(USER, "abcdef", "keep;")


def test_name_too_long_as_file_name(root):
    store = ScriptStore(root, max_name_length=200)
    with pytest.raises(BadNameError):
        store.put(USER, "ü" * 100, "keep;")  # 600 octets encoded
    store.put(USER, "ü" * 40, "keep;")
    assert store.list(USER) == [("ü" * 40, False)]


@pytest.mark.parametrize("user", [
    "../../etc@x", "..@example.org", "a/b@example.org", "a@../x", "a@x/y", "a@..",
    "nobody", "a@b@c", "", "a\x00@example.org", ".a@example.org", "A@example.org",
    "a@", "@example.org",
])
def test_bad_addresses_refused(store, root, user):
    for call in (
        lambda: store.list(user),
        lambda: store.get(user, "a"),
        lambda: store.put(user, "a", "keep;"),
        lambda: store.set_active(user, "a"),
        lambda: store.set_active(user, ""),
        lambda: store.delete(user, "a"),
        lambda: store.rename(user, "a", "b"),
        lambda: store.active(user),
        lambda: store.active_path(user),
        lambda: store.have_space(user, "a", 1),
    ):
        with pytest.raises(BadNameError):
            call()
    assert not root.exists()
    assert not (root.parent / "etc").exists()


def test_stray_files_ignored(store, root):
    store.put(USER, "a", "keep;")
    scripts = root / "example.org" / "alice" / "scripts"
    (scripts / ".tmp-junk").write_text("x")
    (scripts / "notes.txt").write_text("x")
    (scripts / "%zz.sieve").write_text("x")
    (scripts / "a b.sieve").write_text("x")  # never written by us (space unencoded)
    assert store.list(USER) == [("a", False)]


def test_symlinked_script_not_followed(store, root, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("top secret")
    store.put(USER, "a", "keep;")
    os.symlink(secret, root / "example.org" / "alice" / "scripts" / "b.sieve")
    with pytest.raises(OSError):
        store.get(USER, "b")


# -- quota --------------------------------------------------------------------


def test_size_limit_in_octets(root):
    store = ScriptStore(root, max_script_size=10)
    store.put(USER, "a", "x" * 10)
    with pytest.raises(QuotaError, match="10"):
        store.put(USER, "b", "ü" * 6)  # 6 characters, 12 octets
    assert store.list(USER) == [("a", False)]
    with pytest.raises(QuotaError):
        store.put(USER, "a", "x" * 11)
    assert store.get(USER, "a") == "x" * 10


def test_script_count_limit(root):
    store = ScriptStore(root, max_scripts=2)
    store.put(USER, "a", "keep;")
    store.put(USER, "b", "keep;")
    with pytest.raises(QuotaError, match="2"):
        store.put(USER, "c", "keep;")
    store.put(USER, "a", "discard;")  # replacing is not a new script
    assert store.get(USER, "a") == "discard;"
    store.put(OTHER, "c", "keep;")  # per user
    store.delete(USER, "b")
    store.put(USER, "c", "keep;")
    assert [n for n, _ in store.list(USER)] == ["a", "c"]


def test_have_space(root):
    store = ScriptStore(root, max_scripts=1, max_script_size=100)
    assert store.have_space(USER, "a", 100) is None
    with pytest.raises(QuotaError):
        store.have_space(USER, "a", 101)
    store.put(USER, "a", "keep;")
    assert store.have_space(USER, "a", 50) is None  # replacing
    with pytest.raises(QuotaError):
        store.have_space(USER, "b", 1)
    assert issubclass(QuotaError, ScriptStoreError)


# -- check --------------------------------------------------------------------


def test_failing_check_writes_nothing(root):
    store = ScriptStore(root, check=_strict)
    with pytest.raises(SyntaxErr, match="unknown command bad"):
        store.put(USER, "a", "bad;")
    assert not root.exists() or not list((root).rglob("*.sieve"))
    store.put(USER, "a", "keep;")
    with pytest.raises(ValueError):
        store.put(USER, "a", "bad;")
    assert store.get(USER, "a") == "keep;"
    assert _all_files(root / "example.org" / "alice") == ["scripts", "scripts/a.sieve"]


def test_check_not_called_over_quota(root):
    calls = []
    store = ScriptStore(root, check=calls.append, max_script_size=3)
    with pytest.raises(QuotaError):
        store.put(USER, "a", "keep;")
    assert calls == []
    store.put(USER, "a", "k;")
    assert calls == ["k;"]


# -- atomicity ----------------------------------------------------------------


def test_no_tmp_files_left(store, root):
    for i in range(5):
        store.put(USER, "a", f"keep; # {i}")
        store.set_active(USER, "a")
    store.put(USER, "b", "keep;")
    store.rename(USER, "a", "c")
    assert _all_files(root / "example.org" / "alice") == [
        "active", "scripts", "scripts/b.sieve", "scripts/c.sieve"]


def test_failed_write_leaves_old_content(store, root, monkeypatch):
    store.put(USER, "a", "keep;")

    def boom(*args):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        store.put(USER, "a", "discard;")
    monkeypatch.undo()
    assert store.get(USER, "a") == "keep;"
    assert os.listdir(root / "example.org" / "alice" / "scripts") == ["a.sieve"]


# -- active -------------------------------------------------------------------


def test_set_active_and_deactivate(store, root):
    store.put(USER, "a", "keep;")
    store.put(USER, "b", "discard;")
    store.set_active(USER, "a")
    assert store.list(USER) == [("a", True), ("b", False)]
    assert store.active(USER) == ("a", "keep;")
    store.set_active(USER, "b")
    assert store.list(USER) == [("a", False), ("b", True)]
    assert (root / "example.org" / "alice" / "active").read_text() == "b"
    store.set_active(USER, "")
    assert store.active(USER) is None
    assert store.list(USER) == [("a", False), ("b", False)]
    store.set_active(USER, "")  # deactivating twice is fine


def test_set_active_unknown(store):
    with pytest.raises(KeyError):
        store.set_active(USER, "nope")
    store.put(USER, "a", "keep;")
    store.set_active(USER, "a")
    with pytest.raises(KeyError):
        store.set_active(USER, "nope")
    assert store.active(USER) == ("a", "keep;")


def test_active_path_and_stat_key(store, root):
    store.put(USER, "a", "keep;")
    store.set_active(USER, "a")
    path = store.active_path(USER)
    assert path == root / "example.org" / "alice" / "scripts" / "a.sieve"
    key = store.stat_key(path)
    st = os.stat(path)
    assert key == (st.st_mtime_ns, st.st_size, st.st_ino)
    store.put(USER, "a", "discard;")
    assert store.stat_key(path) != key  # replaced: new inode


def test_active_pointing_to_missing_script(store, root):
    store.put(USER, "a", "keep;")
    (root / "example.org" / "alice" / "active").write_text("../../../etc/passwd")
    assert store.active(USER) is None
    assert store.active_path(USER) is None
    (root / "example.org" / "alice" / "active").write_text("gone")
    assert store.active(USER) is None
    assert store.list(USER) == [("a", False)]


# -- delete -------------------------------------------------------------------


def test_delete(store):
    store.put(USER, "a", "keep;")
    store.delete(USER, "a")
    assert store.list(USER) == []
    with pytest.raises(KeyError):
        store.delete(USER, "a")
    with pytest.raises(KeyError):
        store.get(USER, "a")


def test_delete_active_refused(store):
    store.put(USER, "a", "keep;")
    store.set_active(USER, "a")
    with pytest.raises(ActiveScriptError):
        store.delete(USER, "a")
    assert store.get(USER, "a") == "keep;"
    store.set_active(USER, "")
    store.delete(USER, "a")
    assert store.list(USER) == []


# -- rename -------------------------------------------------------------------


def test_rename(store):
    store.put(USER, "a", "keep;")
    store.rename(USER, "a", "neu name ü")
    assert store.list(USER) == [("neu name ü", False)]
    assert store.get(USER, "neu name ü") == "keep;"
    with pytest.raises(KeyError):
        store.get(USER, "a")


def test_rename_errors(store):
    with pytest.raises(KeyError):
        store.rename(USER, "a", "b")
    store.put(USER, "a", "one;")
    store.put(USER, "b", "two;")
    with pytest.raises(ExistsError):
        store.rename(USER, "a", "b")
    with pytest.raises(ExistsError):
        store.rename(USER, "a", "a")
    assert store.get(USER, "a") == "one;"
    assert store.get(USER, "b") == "two;"


def test_active_follows_rename(store):
    store.put(USER, "a", "keep;")
    store.put(USER, "b", "discard;")
    store.set_active(USER, "a")
    store.rename(USER, "a", "c")
    assert store.list(USER) == [("b", False), ("c", True)]
    assert store.active(USER) == ("c", "keep;")
    store.rename(USER, "b", "d")  # renaming an inactive one leaves active alone
    assert store.active(USER) == ("c", "keep;")


def test_exception_hierarchy():
    for exc in (QuotaError, ActiveScriptError, ExistsError, BadNameError):
        assert issubclass(exc, ScriptStoreError)
    assert not issubclass(ScriptStoreError, KeyError)


def test_put_text_must_be_str(store, root):
    with pytest.raises(TypeError):
        store.put(USER, "a", b"keep;")
    with pytest.raises(ScriptStoreError):
        store.put(USER, "a", "\ud800")  # lone surrogate: not UTF-8
    assert not root.exists()
