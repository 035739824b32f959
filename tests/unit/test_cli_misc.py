"""Issue 24 item 6 and item 2: `mailgw --version`, a top-level help that lists
every subcommand, `mailgw check`'s warnings about placeholder settings, and
SIGHUP logged and ignored instead of ending the server."""
from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

import pytest

from mailgw import cli
from mailgw.auth import admin as users_admin
from mailgw.config import check_main
from mailgw.sieve import admin as sieve_admin
from mailgw.queue import admin as queue_admin
from mailgw.routing import admin as routing_admin
from mailgw.store import quota_admin

REPO = Path(__file__).resolve().parents[2]


def test_version_is_the_project_version(capsys):
    assert cli.main(["--version"]) == 0
    wanted = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert capsys.readouterr().out == f"mailgw {wanted}\n"
    import mailgw
    assert mailgw.__version__ == wanted


def subcommands(parser: argparse.ArgumentParser) -> list[str]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return list(action.choices)


@pytest.mark.parametrize("group, parser", [("users", users_admin._parser), ("queue", queue_admin._parser),
                                           ("aliases", routing_admin._aliases_parser),
                                           ("quota", quota_admin._parser),
                                           ("sieve", sieve_admin._parser)])
def test_help_lists_every_subcommand(capsys, group, parser):
    assert cli.main(["--help"]) == 0
    usage = capsys.readouterr().out
    names = subcommands(parser())
    assert names                                    # the parser was found at all
    missing = [name for name in names if f"  {group} {name}" not in usage]
    assert missing == []
    assert "  check " in usage and "--version" in usage


def write_config(tmp_path, server: str) -> Path:
    path = tmp_path / "mailgw.toml"
    path.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\n{server}')
    return path


def test_check_warns_about_placeholders(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("socket.getfqdn", lambda *a: "buildbox")     # no dot: not a FQDN
    assert check_main(["--config", str(write_config(tmp_path, ""))]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("config OK")
    warnings = err.splitlines()
    assert len(warnings) == 2, err
    assert warnings[0].startswith("warning: server.hostname is localhost.localdomain")
    assert warnings[1].startswith("warning: server.local_domains has the placeholder example.test")


def test_check_is_quiet_when_configured(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("socket.getfqdn", lambda *a: "buildbox")
    config = write_config(tmp_path, 'hostname = "mx.example.org"\nlocal_domains = ["example.org"]\n')
    assert check_main(["--config", str(config)]) == 0
    assert capsys.readouterr().err == ""


def test_check_says_what_spam_defences_are_on_and_refuses_a_bad_site(tmp_path, capsys):
    config = write_config(tmp_path, 'hostname = "mx.example.org"\nlocal_domains = ["example.org"]\n'
                                    '[spam]\nrspamd_url = "http://127.0.0.1:11333"\n'
                                    'controller_url = "http://127.0.0.1:11334"\n'
                                    'dnsbl_sites = ["zen.spamhaus.org=127.0.0.[2..11]*3"]\ndnsbl_threshold = 3\n'
                                    'pregreet_wait = 6\n')
    assert check_main(["--config", str(config)]) == 0
    assert ("spam: rspamd http://127.0.0.1:11333, learning via http://127.0.0.1:11334, 1 DNSBL site(s), "
            "threshold 3, pregreet 6 s") in capsys.readouterr().out.splitlines()
    config.write_text(config.read_text().replace("127.0.0.[2..11]*3", "127.0.0.[2..11*3"))
    assert check_main(["--config", str(config)]) == 1
    assert capsys.readouterr().err.startswith('error: spam.dnsbl_sites[0]: "zen.spamhaus.org=127.0.0.[2..11*3"')
