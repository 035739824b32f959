"""mailgw: a mail gateway on Twisted."""

# Kept equal to pyproject.toml's version (tests/unit/test_cli_misc.py checks).
__version__ = "0.1.0"
