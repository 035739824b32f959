"""The README's two install commands, in a fresh venv, in either order: after
each one `twistd` must know the mailgw plugin (issue 24: after the test
command's editable install it said `Unknown command: mailgw`).

The pip arguments are read from the README itself, so the test follows it.
The checkout is copied first (pip writes build metadata into the source tree).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def readme_pip_arguments() -> tuple[list[str], list[str]]:
    """(run command's pip install arguments, test command's), without -q."""
    text = (ROOT / "README.md").read_text()
    run_section = text.split("Install and start mailgw", 1)[1]
    test_section = text.split("Install and run the tests", 1)[1]
    found = []
    for section in (run_section, test_section):
        command = re.search(r"```sh\n(.+?)\n```", section, re.S).group(1)
        pip = re.search(r"\.venv/bin/pip install ([^&]+)", command).group(1).split()
        found.append([argument.strip("'") for argument in pip if argument != "-q"])
    return found[0], found[1]


def copy_checkout(target: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def plugin_listed(environment: Path, cwd: Path) -> bool:
    # From a directory without a twisted/ folder, so only the installation counts.
    done = subprocess.run([str(environment / "bin" / "twistd"), "--help"], cwd=cwd, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return re.search(r"^\s+mailgw\s", done.stdout, re.M) is not None


def pip_install(environment: Path, arguments: list[str], checkout: Path) -> None:
    # The extras need nothing for this check; dropping them keeps it fast.
    arguments = [re.sub(r"^\.\[.*\]$", ".", argument) for argument in arguments]
    done = subprocess.run([str(environment / "bin" / "python"), "-m", "pip", "install", "-q", *arguments],
                          cwd=checkout, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="mailgw targets Python 3.11")
def test_both_readme_installs_in_either_order_keep_the_plugin(tmp_path):
    run_install, test_install = readme_pip_arguments()
    assert "-e" in test_install and "." in run_install
    checkout = tmp_path / "checkout"
    copy_checkout(checkout)
    environment = tmp_path / "venv"
    venv.create(environment, with_pip=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    pip_install(environment, test_install, checkout)        # test command first
    assert plugin_listed(environment, elsewhere), "editable install: twistd does not see the mailgw plugin"
    pip_install(environment, run_install, checkout)         # then the run command
    assert plugin_listed(environment, elsewhere), "regular install: twistd does not see the mailgw plugin"
    # Listing the plugin imports little: every module of the installed package must import
    # (a package left out of pyproject.toml's list is missing only from a regular install).
    imported = subprocess.run([str(environment / "bin" / "python"), "-c",
                               "import importlib, pkgutil, mailgw\n"
                               "for m in pkgutil.walk_packages(mailgw.__path__, 'mailgw.'):\n"
                               "    importlib.import_module(m.name)\n"
                               "import mailgw.tap, mailgw.worker\n"], cwd=elsewhere, capture_output=True,
                              text=True, timeout=120)
    assert imported.returncode == 0, imported.stderr[-2000:]
    pip_install(environment, test_install, checkout)        # and back
    assert plugin_listed(environment, elsewhere), "editable after regular: twistd does not see the mailgw plugin"
