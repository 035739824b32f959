"""The fuzzing set-up itself (tests/unit/fuzzing.py, docs/fuzzing.md)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from twisted.logger import Logger

from fuzzing import ENV, campaign_examples, fuzz_settings, no_logged_failures

UNIT = Path(__file__).parent
DOC = UNIT.parent.parent / "docs" / "fuzzing.md"


def test_ci_settings_are_bounded_and_reproducible(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    settings = fuzz_settings(123)
    assert settings.max_examples == 123
    assert settings.derandomize and settings.database is None and settings.deadline is None
    assert settings.print_blob


def test_campaign_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv(ENV, "20000")
    assert campaign_examples() == 20000
    settings = fuzz_settings(123)
    assert settings.max_examples == 20000
    assert not settings.derandomize and settings.deadline is None


@pytest.mark.parametrize("value", ["many", "0", "-5", "1.5"])
def test_a_bad_campaign_size_is_an_error_not_silently_ci(monkeypatch, value):
    monkeypatch.setenv(ENV, value)
    with pytest.raises(ValueError, match=ENV):
        fuzz_settings(10)


def test_logged_failures_fail_the_block():
    with pytest.raises(AssertionError, match="1 failure"):
        with no_logged_failures():
            try:
                1 / 0
            except ZeroDivisionError:
                Logger().failure("caught and logged")
    with no_logged_failures():
        Logger().warn("a warning is fine")


def _decorated_tests() -> dict[str, int]:
    """{"file.py::test_name": CI examples} for every Hypothesis test in tests/unit."""
    found = {}
    for path in sorted(UNIT.glob("test_*.py")):
        lines = path.read_text().splitlines()
        for index, line in enumerate(lines):
            if not line.lstrip().startswith("@given("):
                continue
            block_start = index
            while block_start > 0 and lines[block_start - 1].lstrip().startswith(("@", ")")) \
                    or block_start > 0 and lines[block_start - 1].startswith(" " * 8):
                block_start -= 1
            decorators = "\n".join(lines[block_start:index])
            match = re.search(r"@fuzz_settings\((\d+)", decorators)
            assert match, f"{path.name}:{index + 1}: @given without @fuzz_settings (tests/unit/fuzzing.py)"
            name = None
            for following in lines[index:]:
                defined = re.match(r"\s*def (\w+)\(", following)
                if defined:
                    name = defined.group(1)
                    break
            found[f"{path.name}::{name}"] = int(match.group(1))
    return found


def test_every_property_uses_fuzz_settings_and_is_in_the_doc():
    tests = _decorated_tests()
    assert len(tests) >= 30
    rows = dict(re.findall(r"^\|[^|]*\|\s*`([\w.]+::\w+)`\s*\|\s*(\d+)\s*\|", DOC.read_text(), re.MULTILINE))
    documented = {name: int(examples) for name, examples in rows.items()}
    assert documented == tests, "docs/fuzzing.md's table and the tests disagree"


if __name__ == "__main__":
    # The node IDs of every property, for a campaign (docs/fuzzing.md):
    #   MAILGW_FUZZ_EXAMPLES=20000 python3 -m pytest -q $(python3 tests/unit/test_fuzzing.py)
    for node in _decorated_tests():
        print(f"{UNIT.relative_to(Path.cwd()) if UNIT.is_relative_to(Path.cwd()) else UNIT}/{node}")
