"""`mailgw sieve`: list, show, put, activate and check against the real
script store of a config's data directory."""
from __future__ import annotations

import io
import sys

from mailgw import cli

GOOD = 'require "fileinto";\nif header :contains "subject" "x" { fileinto "X"; }\n'
BAD = 'require "fileinto";\nif header :nope "subject" "x" { keep; }\n'


def run(capsys, tmp_path, *argv, stdin=None, monkeypatch=None):
    config = tmp_path / "mailgw.toml"
    if not config.exists():
        config.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\n')
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin.encode())))
    code = cli.main(["sieve", *argv, "--config", str(config)])
    out, err = capsys.readouterr()
    return code, out, err


def test_put_activate_list_show(capsys, tmp_path):
    script = tmp_path / "main.sieve"
    script.write_text(GOOD)
    assert run(capsys, tmp_path, "put", "alice@example.org", "main", str(script))[0] == 0
    assert run(capsys, tmp_path, "activate", "alice@example.org", "main")[0] == 0
    code, out, _ = run(capsys, tmp_path, "list", "Alice@example.org")
    assert (code, out) == (0, "main\tactive\n")
    code, out, _ = run(capsys, tmp_path, "show", "alice@example.org")
    assert (code, out) == (0, GOOD)
    assert (tmp_path / "data" / "sieve" / "example.org" / "alice" / "active").read_text().strip() == "main"


def test_put_refuses_a_broken_script_with_line_and_column(capsys, tmp_path):
    script = tmp_path / "bad.sieve"
    script.write_text(BAD)
    code, _, err = run(capsys, tmp_path, "put", "alice@example.org", "bad", str(script))
    assert code == 1 and "line 2, column 11" in err
    assert run(capsys, tmp_path, "list", "alice@example.org")[1] == ""


def test_check_from_stdin(capsys, tmp_path, monkeypatch):
    assert run(capsys, tmp_path, "check", stdin=GOOD, monkeypatch=monkeypatch)[:2] == (0, "ok\n")
    code, _, err = run(capsys, tmp_path, "check", stdin=BAD, monkeypatch=monkeypatch)
    assert code == 1 and "line 2" in err


def test_unknown_script_and_usage(capsys, tmp_path):
    code, _, err = run(capsys, tmp_path, "activate", "alice@example.org", "nope")
    assert code == 1 and "no such script" in err
    assert run(capsys, tmp_path, "frob", "x")[0] == 2
