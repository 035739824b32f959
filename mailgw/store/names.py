"""Folder names and their directory names (docs/store-format.md).

Shared by the mailbox store (mailbox.py) and local delivery (maildir.py),
which files subaddressed mail into a folder."""
from __future__ import annotations

import re

INBOX = "INBOX"
NAME_MAX = 255          # octets in one directory name (Linux NAME_MAX)
SEPARATOR = "/"         # IMAP hierarchy separator; "." in the directory name
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_ESCAPE = re.compile(r"%([0-9A-F]{2})")


def folder_dirname(name) -> tuple[str, str | None]:
    """(canonical name, directory name below the user's directory) of an
    IMAP folder name; the directory is None for INBOX (the user's directory
    itself). ValueError for names that are not allowed.

    The name stays UTF-8; in each "/"-separated component "%" becomes "%25"
    and "." becomes "%2E", then the components are joined with "." behind a
    leading "." (Maildir++): "Work/2024.Q1" -> ".Work.2024%2EQ1". A component
    cannot contain "/" (it is the separator), and control characters are
    refused, so nothing else needs escaping; "." and ".." components,
    leading/trailing/double "/", NUL, lone surrogates and directory names
    longer than NAME_MAX are refused: no name leaves the user's directory."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"not a folder name: {name!r}")
    if name.upper() == INBOX:  # RFC 3501 §5.1: INBOX is case-insensitive
        return INBOX, None
    if _CONTROL.search(name):
        raise ValueError(f"control character in folder name: {name!r}")
    parts = name.split(SEPARATOR)
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"not an allowed folder name: {name!r}")
    dirname = "." + ".".join(part.replace("%", "%25").replace(".", "%2E") for part in parts)
    try:
        size = len(dirname.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"not UTF-8: {name!r}") from None
    if size > NAME_MAX:
        raise ValueError(f"folder name too long: {name!r}")
    return name, dirname


def decode_dirname(dirname: str) -> str | None:
    """The folder name of a directory name, or None if it is not one this
    store would have made (those are ignored, never guessed at)."""
    if not dirname.startswith(".") or dirname in (".", ".."):
        return None
    name = SEPARATOR.join(_ESCAPE.sub(lambda m: chr(int(m[1], 16)), part) for part in dirname[1:].split("."))
    try:
        canonical, again = folder_dirname(name)
    except ValueError:
        return None
    return canonical if again == dirname else None
