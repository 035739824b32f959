"""`mailgw aliases ...` and `mailgw resolve` (mailgw.routing.admin)."""
from __future__ import annotations

from pathlib import Path

import pytest

from mailgw import cli
from mailgw.auth import userdb
from mailgw.errors import MailError

HASH = userdb.hash_password("pw", userdb.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))


@pytest.fixture
def config_path(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "mailgw.toml"
    data = tmp_path / "data"
    data.mkdir()
    path.write_text(f'[server]\ndata_dir = "{data}"\nlocal_domains = ["example.com", "example.net"]\n'
                    f'postmaster = "alice@example.com"\n')
    userdb.write_users(data / "users", {"alice@example.com": HASH, "bob@example.com": HASH})
    monkeypatch.setenv("MAILGW_CONFIG", str(path))
    return path


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def aliases_file(config_path: Path) -> Path:
    return config_path.parent / "data" / "aliases"


def test_add_show_list_delete_round_trip(config_path, capsys):
    assert run(capsys, "aliases", "add", "info@example.com", "alice@example.com", "bob@example.com")[0] == 0
    assert run(capsys, "aliases", "add", "sales@example.com", "bob@example.com", "--send-as")[0] == 0
    assert run(capsys, "aliases", "add", "@example.net", "@example.com")[0] == 0
    code, out, _ = run(capsys, "aliases", "show", "INFO@example.com")
    assert code == 0 and out.split() == ["info@example.com", "alice@example.com,", "bob@example.com"]
    code, out, _ = run(capsys, "aliases", "list")
    lines = [line.split()[0] for line in out.splitlines()]
    assert lines == ["info@example.com", "sales@example.com", "@example.net"]
    assert "[send-as]" in out.splitlines()[1]
    # Adding to an existing alias merges; deleting one target keeps the rest.
    assert run(capsys, "aliases", "add", "info@example.com", "carol@elsewhere.example")[0] == 0
    assert run(capsys, "aliases", "delete", "info@example.com", "alice@example.com")[0] == 0
    assert run(capsys, "aliases", "show", "info@example.com")[1].split()[1:] == \
        ["bob@example.com,", "carol@elsewhere.example"]
    assert run(capsys, "aliases", "delete", "info@example.com")[0] == 0
    code, _, err = run(capsys, "aliases", "show", "info@example.com")
    assert code == 1 and "no alias info@example.com" in err
    assert (aliases_file(config_path).stat().st_mode & 0o777) == 0o600


def test_a_loop_is_refused_and_nothing_is_written(config_path, capsys):
    assert run(capsys, "aliases", "add", "a@example.com", "b@example.com")[0] == 0
    before = aliases_file(config_path).read_bytes()
    code, _, err = run(capsys, "aliases", "add", "b@example.com", "a@example.com")
    assert code == 1 and "alias loop" in err and "nothing written" in err
    assert aliases_file(config_path).read_bytes() == before


def test_a_domain_that_is_not_ours_is_refused(config_path, capsys):
    code, _, err = run(capsys, "aliases", "add", "x@elsewhere.example", "alice@example.com")
    assert code == 1 and "not one of server.local_domains" in err
    assert not aliases_file(config_path).exists()


def test_a_file_with_bad_lines_is_not_rewritten_and_the_lines_are_named(config_path, capsys):
    aliases_file(config_path).write_text("info@example.com alice@example.com\nthis is wrong @@\n")
    code, _, err = run(capsys, "aliases", "add", "x@example.com", "bob@example.com")
    assert code == 1 and f"{aliases_file(config_path)}:2:" in err
    code, out, err = run(capsys, "aliases", "list")
    assert code == 0 and "info@example.com" in out and ":2:" in err


def test_bad_addresses_and_usage(config_path, capsys):
    assert run(capsys, "aliases", "add", "info@example.com", "not an address")[0] == 1
    assert run(capsys, "aliases", "add", "info@example.com")[0] == 2
    assert run(capsys, "aliases", "frobnicate")[0] == 2
    assert run(capsys, "aliases", "--help")[0] == 0


def test_resolve_prints_each_final_target(config_path, capsys):
    (config_path.parent / "data" / "mail" / "example.com" / "alice" / ".Lists").mkdir(parents=True)
    run(capsys, "aliases", "add", "team@example.com", "alice@example.com", "bob@example.com",
        "friend@elsewhere.example")
    code, out, _ = run(capsys, "resolve", "team@example.com")
    assert code == 0
    assert out.splitlines() == ["alice@example.com", "bob@example.com",
                                "friend@elsewhere.example remote forwarded"]
    assert run(capsys, "resolve", "alice+lists@example.com")[1] == "alice@example.com folder=Lists\n"
    assert run(capsys, "resolve", "abuse@example.net")[1] == "alice@example.com\n"
    assert run(capsys, "resolve", "x@other.example")[1] == "x@other.example remote\n"
    code, out, err = run(capsys, "resolve", "nobody@example.com", "bob@example.com")
    assert code == 1 and "550 5.1.1" in err and out == "bob@example.com: bob@example.com\n"


def test_alias_change_is_seen_by_a_running_resolver_without_restart(config_path, capsys):
    from twisted.internet import task

    from mailgw.config import load
    from mailgw.routing.resolver import Resolver, LocalTarget

    config = load(config_path)
    clock = task.Clock()
    resolver = Resolver.from_config(config, userdb.UserFile(config.users_file, threadpool=None, reactor=clock),
                                    clock=clock)
    with pytest.raises(MailError):
        resolver.resolve("help@example.com")
    assert run(capsys, "aliases", "add", "help@example.com", "bob@example.com")[0] == 0
    clock.advance(config.routing.check_interval)
    assert resolver.resolve("help@example.com") == (LocalTarget("bob@example.com"),)


def test_check_reports_bad_alias_lines_with_file_and_line(config_path, capsys):
    aliases_file(config_path).write_text("a@example.com b@example.com\nb@example.com a@example.com\n"
                                         "ok@example.com alice@example.com\n")
    code, _, err = run(capsys, "check", "--config", str(config_path))
    assert code == 1
    assert f"error: {aliases_file(config_path)}:1: alias loop" in err
    assert f"error: {aliases_file(config_path)}:2: alias loop" in err
    aliases_file(config_path).write_text("ok@example.com alice@example.com\n")
    assert run(capsys, "check", "--config", str(config_path))[0] == 0
