"""LIST and LSUB (RFC 3501 §6.3.8-9, RFC 3348 CHILDREN, RFC 6154 SPECIAL-USE).

Mailbox attributes are computed here from the folder names; Twisted printed a
mailbox's *message* flags as its attributes (docs/twisted.md §4.1).

Wildcards are matched with bit sets over the name's positions, so a pattern
like "*a*a*a*...b" costs O(len(pattern) * len(name) / word size), never the
exponential backtracking a translated regular expression could take.
"""
from __future__ import annotations

from mailgw.store.events import SPECIAL_USE

SEPARATOR = "/"


def match_pattern(pattern: str, name: str) -> bool:
    """RFC 3501 §6.3.8: "*" matches anything, "%" anything but the separator;
    INBOX is case-insensitive."""
    if (name == "INBOX" or name.startswith("INBOX/")) and pattern[:5].upper() == "INBOX":
        pattern = "INBOX" + pattern[5:]
    length = len(name)
    full = (1 << (length + 1)) - 1
    masks: dict[str, int] = {}
    for index, char in enumerate(name):
        masks[char] = masks.get(char, 0) | (1 << index)
    not_separator = full & ~masks.get(SEPARATOR, 0) & ((1 << length) - 1)
    state = 1                       # bit i: the pattern so far matches name[:i]
    for char in pattern:
        if char == "*":
            lowest = state & -state
            state = full & ~(lowest - 1)
        elif char == "%":
            while True:
                grown = state | ((state & not_separator) << 1)
                if grown == state:
                    break
                state = grown
        else:
            state = (state & masks.get(char, 0)) << 1
        if not state:
            return False
    return bool(state >> length & 1)


def _ancestors(name: str):
    parts = name.split(SEPARATOR)
    for end in range(1, len(parts)):
        yield SEPARATOR.join(parts[:end])


def list_entries(folders: list[str], pattern: str, *, subscribed: set[str] | None = None,
                 only_subscribed: bool = False, only_special: bool = False,
                 return_special: bool = True) -> list[tuple[str, list[str]]]:
    """(name, attributes) of every mailbox matching `pattern`, INBOX first."""
    existing = set(folders)
    parents: set[str] = set()
    for name in folders:
        parents.update(_ancestors(name))
    names = sorted(existing | parents, key=lambda n: (n != "INBOX", n))
    entries = []
    for name in names:
        if not match_pattern(pattern, name):
            continue
        is_subscribed = subscribed is not None and name in subscribed
        if only_subscribed and not is_subscribed:
            continue
        special = SPECIAL_USE.get(name) if name in existing else None
        if only_special and special is None:
            continue
        attributes = []
        if name not in existing:
            attributes.append("\\Noselect")
        attributes.append("\\HasChildren" if name in parents else "\\HasNoChildren")
        if special and return_special:
            attributes.append(special)
        if is_subscribed:
            attributes.append("\\Subscribed")
        entries.append((name, attributes))
    return entries


def lsub_entries(subscribed: list[str], pattern: str) -> list[tuple[str, list[str]]]:
    """RFC 3501 §6.3.9: subscribed names; a parent that is not subscribed but
    matches "%" where its subscribed child does not is listed \\Noselect."""
    chosen = set(subscribed)
    entries: dict[str, list[str]] = {}
    for name in subscribed:
        if match_pattern(pattern, name):
            entries[name] = []
            continue
        for parent in _ancestors(name):
            if parent not in chosen and parent not in entries and match_pattern(pattern, parent):
                entries[parent] = ["\\Noselect"]
    return sorted(entries.items(), key=lambda item: (item[0] != "INBOX", item[0]))
