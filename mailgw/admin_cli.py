"""What every `mailgw` admin subcommand shares: exit codes, the two errors,
the argparse parser that raises instead of exiting, and loading the config."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


class AdminError(Exception):
    """The request cannot be done; the message says why (exit 1)."""


class UsageError(Exception):
    """The command line is wrong (exit 2, with the usage text)."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print and sys.exit(2) itself
        raise UsageError(message)


def load_config(path_text: str | None):
    """--config, else $MAILGW_CONFIG, else the embedded default; AdminError
    with every configuration error at once."""
    from mailgw.config import ConfigError, load

    config_path = path_text or os.environ.get("MAILGW_CONFIG") or None
    try:
        return load(Path(config_path) if config_path else None)
    except ConfigError as error:
        raise AdminError("configuration error:\n  " + "\n  ".join(error.errors)) from None
    except OSError as error:
        raise AdminError(f"cannot read configuration {config_path}: {error.strerror}") from None
