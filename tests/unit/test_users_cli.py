"""`mailgw users add|passwd|delete|list`."""
from __future__ import annotations

import fcntl
import io
import os
import stat
import sys
import types
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from mailgw.auth import admin, userdb
from mailgw.auth.admin import users_main

FAST = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
ALICE = "alice@example.test"


@pytest.fixture(autouse=True)
def fast_hashing(monkeypatch):
    monkeypatch.setattr(userdb, "_default_hasher", lambda: FAST)


@pytest.fixture
def users_file(tmp_path):
    return tmp_path / "data" / "users"  # parent does not exist yet


def stdin_lines(monkeypatch, data: bytes):
    """A non-terminal stdin, as with `echo secret | mailgw users add ...`."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


def run(monkeypatch, users_file, *argv, stdin=b""):
    stdin_lines(monkeypatch, stdin)
    return users_main([*argv, "--users-file", str(users_file)])


def users_in(path: Path) -> dict[str, str]:
    users, problems = userdb.read_users(path)
    assert problems == []
    return users


def test_add_creates_a_0600_file_in_a_0700_directory(monkeypatch, users_file, capsys):
    assert run(monkeypatch, users_file, "add", "Alice@Example.TEST", stdin=b"s3cret pw\n") == 0
    assert stat.S_IMODE(os.stat(users_file).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(users_file.parent).st_mode) == 0o700
    users = users_in(users_file)
    assert list(users) == [ALICE]
    assert FAST.verify(users[ALICE], "s3cret pw"), "only the line end is stripped"
    out, err = capsys.readouterr()
    assert "s3cret" not in out + err
    assert ALICE in out


def test_add_reads_one_line_only(monkeypatch, users_file):
    assert run(monkeypatch, users_file, "add", ALICE, stdin=b"first\r\nsecond\n") == 0
    assert FAST.verify(users_in(users_file)[ALICE], "first")


def test_add_accepts_stdin_without_a_binary_buffer(monkeypatch, users_file):
    monkeypatch.setattr(sys, "stdin", io.StringIO("pw\n"))
    assert users_main(["add", ALICE, "--users-file", str(users_file)]) == 0
    assert FAST.verify(users_in(users_file)[ALICE], "pw")


def test_add_existing_user_fails(monkeypatch, users_file, capsys):
    run(monkeypatch, users_file, "add", ALICE, stdin=b"one\n")
    before = users_file.read_bytes()
    assert run(monkeypatch, users_file, "add", ALICE, stdin=b"two\n") == 1
    assert "already exists" in capsys.readouterr().err
    assert users_file.read_bytes() == before


@pytest.mark.parametrize("stdin", [b"\n", b"", b"\r\n"])
def test_empty_password_is_refused(monkeypatch, users_file, capsys, stdin):
    assert run(monkeypatch, users_file, "add", ALICE, stdin=stdin) == 1
    assert "empty password" in capsys.readouterr().err
    assert not users_file.exists()


def test_password_that_is_not_utf8_is_refused(monkeypatch, users_file):
    assert run(monkeypatch, users_file, "add", ALICE, stdin=b"\xff\xfe\n") == 1
    assert not users_file.exists()


@pytest.mark.parametrize("address", ["../x@example.test", "a/b@example.test", ".a@example.test",
                                     "a..b@example.test", "no-at-sign"])
def test_invalid_address_is_refused(monkeypatch, users_file, capsys, address):
    assert run(monkeypatch, users_file, "add", address, stdin=b"pw\n") == 1
    assert "invalid address" in capsys.readouterr().err
    assert not users_file.exists()


def test_password_on_the_command_line_is_a_usage_error(monkeypatch, users_file, capsys):
    stdin_lines(monkeypatch, b"")
    assert users_main(["add", "a@b", "supersecret"]) == 2
    assert users_main(["add", "a@b", "--users-file", str(users_file), "supersecret"]) == 2
    assert users_main(["add", "--password", "supersecret", "a@b"]) == 2
    out, err = capsys.readouterr()
    assert "supersecret" not in out + err, "the rejected argument is not echoed"
    assert "never taken from the command line" in err
    assert not users_file.exists()


@pytest.mark.parametrize("argv", [[], ["bogus"], ["add"], ["passwd"], ["list", "extra"],
                                  ["add", ALICE, "--config", "a", "--users-file", "b"]])
def test_usage_errors_exit_2(monkeypatch, argv):
    stdin_lines(monkeypatch, b"pw\n")
    assert users_main(argv) == 2


def test_help_exits_0(capsys):
    assert users_main(["--help"]) == 0
    assert "mailgw users add" in capsys.readouterr().out


def test_passwd_changes_the_password(monkeypatch, users_file, capsys):
    run(monkeypatch, users_file, "add", ALICE, stdin=b"old\n")
    assert run(monkeypatch, users_file, "passwd", ALICE, stdin=b"new\n") == 0
    new_hash = users_in(users_file)[ALICE]
    assert FAST.verify(new_hash, "new")
    assert stat.S_IMODE(os.stat(users_file).st_mode) == 0o600
    out, err = capsys.readouterr()
    assert "new" not in err and "old" not in out + err


def test_passwd_unknown_user_fails(monkeypatch, users_file, capsys):
    run(monkeypatch, users_file, "add", ALICE, stdin=b"pw\n")
    assert run(monkeypatch, users_file, "passwd", "bob@example.test", stdin=b"pw\n") == 1
    assert "no such user" in capsys.readouterr().err


def test_delete_removes_the_user(monkeypatch, users_file):
    run(monkeypatch, users_file, "add", ALICE, stdin=b"pw\n")
    run(monkeypatch, users_file, "add", "bob@example.test", stdin=b"pw\n")
    assert run(monkeypatch, users_file, "delete", ALICE) == 0
    assert list(users_in(users_file)) == ["bob@example.test"]


def test_delete_unknown_user_fails(monkeypatch, users_file, capsys):
    assert run(monkeypatch, users_file, "delete", ALICE) == 1
    run(monkeypatch, users_file, "add", ALICE, stdin=b"pw\n")
    assert run(monkeypatch, users_file, "delete", "bob@example.test") == 1
    assert "no such user" in capsys.readouterr().err


def test_list_prints_sorted_addresses_and_no_hashes(monkeypatch, users_file, capsys):
    assert run(monkeypatch, users_file, "list") == 0
    assert capsys.readouterr().out == ""
    run(monkeypatch, users_file, "add", "zed@example.test", stdin=b"pw\n")
    run(monkeypatch, users_file, "add", ALICE, stdin=b"pw\n")
    capsys.readouterr()
    assert run(monkeypatch, users_file, "list") == 0
    out = capsys.readouterr().out
    assert out == f"{ALICE}\nzed@example.test\n"


def test_malformed_lines_make_writes_refuse_but_list_warns(monkeypatch, users_file, capsys):
    run(monkeypatch, users_file, "add", ALICE, stdin=b"pw\n")
    with open(users_file, "a") as f:
        f.write("broken line\n")
    before = users_file.read_bytes()
    assert run(monkeypatch, users_file, "add", "bob@example.test", stdin=b"pw\n") == 1
    assert "line 4" in capsys.readouterr().err
    assert users_file.read_bytes() == before
    assert run(monkeypatch, users_file, "list") == 0
    out, err = capsys.readouterr()
    assert out == f"{ALICE}\n" and "skipped" in err


def test_prompt_with_confirmation_on_a_terminal(monkeypatch, users_file):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    answers = iter(["typed pw", "typed pw", "one", "other"])
    prompts = []
    monkeypatch.setattr(sys, "stdin", Terminal(""))

    def fake_getpass(prompt="Password: "):
        prompts.append(prompt)
        return next(answers)

    monkeypatch.setattr(admin.getpass, "getpass", fake_getpass)
    argv = ["--users-file", str(users_file)]
    assert users_main(["add", ALICE, *argv]) == 0
    assert FAST.verify(users_in(users_file)[ALICE], "typed pw")
    assert len(prompts) == 2, "asked twice"
    assert users_main(["passwd", ALICE, *argv]) == 1, "mismatch changes nothing"
    assert FAST.verify(users_in(users_file)[ALICE], "typed pw")


def test_writers_hold_an_exclusive_lock(monkeypatch, users_file):
    run(monkeypatch, users_file, "add", ALICE, stdin=b"pw\n")
    lock_path = users_file.with_name("users.lock")
    with userdb.locked_users_file(users_file):
        fd = os.open(lock_path, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    assert stat.S_IMODE(os.stat(lock_path).st_mode) == 0o600


def test_real_hasher_writes_argon2id_with_library_defaults(monkeypatch, users_file):
    monkeypatch.setattr(userdb, "_default_hasher", PasswordHasher)
    assert run(monkeypatch, users_file, "add", ALICE, stdin=b"pw\n") == 0
    assert users_in(users_file)[ALICE].startswith("$argon2id$v=19$m=65536,t=3,p=4$")


def test_dispatched_from_the_mailgw_command(monkeypatch, users_file):
    from mailgw.cli import main
    stdin_lines(monkeypatch, b"pw\n")
    assert main(["users", "add", ALICE, "--users-file", str(users_file)]) == 0
    assert ALICE in users_in(users_file)


# -- with a configuration ------------------------------------------------------------

class FakeConfigError(Exception):
    pass


@pytest.fixture
def fake_config(monkeypatch, tmp_path):
    """Stands in for mailgw.config so these tests don't depend on its TOML."""
    loaded = []
    users_path = tmp_path / "cfgdata" / "users"

    def load(path=None):
        loaded.append(path)
        if path is not None and path.name == "broken.toml":
            raise FakeConfigError("broken.toml: line 1: unknown key 'x'")
        return types.SimpleNamespace(users_file=users_path,
                                     local_domains=frozenset({"example.test"}))

    module = types.ModuleType("mailgw.config")
    module.load, module.ConfigError = load, FakeConfigError
    monkeypatch.setitem(sys.modules, "mailgw.config", module)
    monkeypatch.delenv("MAILGW_CONFIG", raising=False)
    return types.SimpleNamespace(loaded=loaded, users_file=users_path)


def test_config_gives_the_users_file(monkeypatch, fake_config):
    stdin_lines(monkeypatch, b"pw\n")
    assert users_main(["add", ALICE, "--config", "/etc/mailgw/mailgw.toml"]) == 0
    assert fake_config.loaded == [Path("/etc/mailgw/mailgw.toml")]
    assert ALICE in users_in(fake_config.users_file)


def test_config_from_environment_else_embedded_default(monkeypatch, fake_config):
    stdin_lines(monkeypatch, b"")
    users_main(["list"])
    monkeypatch.setenv("MAILGW_CONFIG", "/srv/mailgw.toml")
    users_main(["list"])
    assert fake_config.loaded == [None, Path("/srv/mailgw.toml")]


def test_add_requires_a_local_domain(monkeypatch, fake_config, capsys):
    stdin_lines(monkeypatch, b"pw\n")
    assert users_main(["add", "alice@elsewhere.test"]) == 1
    assert "not a local domain" in capsys.readouterr().err
    assert not fake_config.users_file.exists()


def test_users_file_override_skips_the_config_and_domain_check(monkeypatch, fake_config,
                                                               users_file):
    assert run(monkeypatch, users_file, "add", "alice@elsewhere.test", stdin=b"pw\n") == 0
    assert fake_config.loaded == []


def test_config_error_exits_1(monkeypatch, fake_config, capsys):
    stdin_lines(monkeypatch, b"pw\n")
    assert users_main(["list", "--config", "broken.toml"]) == 1
    assert "unknown key" in capsys.readouterr().err
