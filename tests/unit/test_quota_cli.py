"""`mailgw quota show | set | list` (mailgw.store.quota_admin) in a temporary
data directory, and a running server's Quota seeing what `set` wrote."""
from __future__ import annotations

import pytest
from twisted.internet import task
from twisted.logger import Logger

from mailgw import config as config_module
from mailgw.store.quota import MAILDIRSIZE, Quota, QuotasFile
from mailgw.store.quota_admin import quota_main

ALICE = "alice@example.test"


@pytest.fixture(autouse=True)
def _quiet_logs(monkeypatch):
    silent = Logger(observer=lambda event: None)
    for cls in (Quota, QuotasFile):
        monkeypatch.setattr(cls, "log", silent)


@pytest.fixture
def config_path(tmp_path, monkeypatch):
    monkeypatch.delenv("MAILGW_CONFIG", raising=False)
    path = tmp_path / "mailgw.toml"
    path.write_text(f'[server]\nlocal_domains = ["example.test"]\ndata_dir = "{tmp_path / "data"}"\n'
                    "[quota]\ndefault_bytes = 1048576\ndefault_messages = 0\n")
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    code = quota_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_set_show_list_round_trip(tmp_path, config_path, capsys):
    config = config_module.load(config_path)
    inbox = tmp_path / "data" / "mail" / "example.test" / "alice" / "new"
    inbox.mkdir(parents=True)
    (inbox / "1.M1P1Q1.h,S=1536,W=1570").write_bytes(b"x" * 1536)

    code, out, _ = run(capsys, "show", ALICE, "--config", str(config_path))
    assert code == 0
    assert out.splitlines() == [
        ALICE,
        "  storage   1.5 KiB of 1.0 MiB (1536 of 1048576 octets, 0.1%)  [default]",
        "  messages  1, no limit  [default]"]

    code, out, _ = run(capsys, "set", "Alice@Example.TEST", "--bytes", "1G", "--messages", "10000",
                       "--config", str(config_path))
    assert (code, out) == (0, f"{ALICE}: bytes=1G messages=10000\n")
    code, out, _ = run(capsys, "set", "bob@example.test", "--messages", "5", "--config", str(config_path))
    assert (code, out) == (0, "bob@example.test: bytes=default (1M) messages=5\n")
    code, out, _ = run(capsys, "list", "--config", str(config_path))
    assert code == 0 and [line.split() for line in out.splitlines()] == [
        [ALICE, "bytes=1G", "messages=10000"], ["bob@example.test", "messages=5"]]

    code, out, _ = run(capsys, "show", ALICE, "--config", str(config_path))
    assert out.splitlines()[1:] == [
        "  storage   1.5 KiB of 1.0 GiB (1536 of 1073741824 octets, 0.0%)  [set for this user]",
        "  messages  1 of 10000 (0.0%)  [set for this user]"]
    assert (inbox.parent / MAILDIRSIZE).read_text() == "1073741824S,10000C\n1536 1\n"

    # "default" removes one override; removing both drops the line.
    run(capsys, "set", ALICE, "--bytes", "default", "--config", str(config_path))
    code, out, _ = run(capsys, "set", "bob@example.test", "--messages", "default", "--config", str(config_path))
    assert out == "bob@example.test: bytes=default (1M) messages=default (no limit)\n"
    code, out, _ = run(capsys, "list", "--config", str(config_path))
    assert [line.split() for line in out.splitlines()] == [[ALICE, "messages=10000"]]
    assert config.quota.quotas_file.stat().st_mode & 0o777 == 0o600


def test_a_running_server_sees_the_change(tmp_path, config_path, capsys):
    config = config_module.load(config_path)
    clock = task.Clock()
    server = Quota(config.mail_dir, config.quota, clock=clock, check_interval=1.0)
    assert server.limits(ALICE) == (1048576, 0)
    run(capsys, "set", ALICE, "--bytes", "0", "--messages", "3", "--config", str(config_path))
    assert server.limits(ALICE) == (1048576, 0)
    clock.advance(1)
    assert server.limits(ALICE) == (0, 3)


def test_environment_names_the_config(tmp_path, config_path, capsys, monkeypatch):
    monkeypatch.setenv("MAILGW_CONFIG", str(config_path))
    assert run(capsys, "set", ALICE, "--messages", "2")[0] == 0
    assert run(capsys, "list")[1].split() == [ALICE, "messages=2"]


def test_user_errors_exit_1(tmp_path, config_path, capsys):
    cfg = ("--config", str(config_path))
    code, _, err = run(capsys, "set", "bob@elsewhere.example", "--bytes", "1G", *cfg)
    assert code == 1 and "not a local domain" in err
    code, _, err = run(capsys, "set", "../x@example.test", "--bytes", "1G", *cfg)
    assert code == 1 and "invalid address" in err
    code, _, err = run(capsys, "set", ALICE, "--bytes", "1.5G", *cfg)
    assert code == 1 and "--bytes" in err
    code, _, err = run(capsys, "show", ALICE, "--config", str(tmp_path / "missing.toml"))
    assert code == 1


def test_a_broken_quotas_file_is_not_rewritten(tmp_path, config_path, capsys):
    quotas = tmp_path / "data" / "quotas"
    quotas.parent.mkdir(parents=True)
    quotas.write_text(f"{ALICE} bytes=1G\nbob@example.test bytes=much\n")
    code, _, err = run(capsys, "set", ALICE, "--messages", "9", "--config", str(config_path))
    assert code == 1 and f"{quotas}:2:" in err
    assert quotas.read_text() == f"{ALICE} bytes=1G\nbob@example.test bytes=much\n"
    code, out, err = run(capsys, "list", "--config", str(config_path))
    assert code == 0 and out.split() == [ALICE, "bytes=1G"] and f"{quotas}:2:" in err


@pytest.mark.parametrize("argv", [[], ["show"], ["set", ALICE], ["frobnicate"], ["set", ALICE, "--colour", "x"]])
def test_usage_errors_exit_2(capsys, argv):
    assert run(capsys, *argv)[0] == 2


def test_help_exits_0(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "mailgw quota set USER" in out
