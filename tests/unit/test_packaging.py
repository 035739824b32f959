"""pyproject.toml ships every package of mailgw: a directory left out of
[tool.setuptools] packages is missing from a non-editable `pip install .`
(the README's install-and-start command) while every editable test passes."""
from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_directory_is_listed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(path.parent.relative_to(ROOT).parts) for path in (ROOT / "mailgw").rglob("__init__.py")}
    assert on_disk - listed == set()
