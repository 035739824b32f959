"""Typed access to one TOML table, and the checks of single values, for `mailgw.config`.

Nothing here raises on a bad value: each problem is appended to the one shared
error list as `key: message`, so that `mailgw.config.load` reports them all at once.
"""
from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
from pathlib import Path
from typing import Any

# RFC 1035 §2.3.1 / RFC 1123 §2.1: letters, digits, inner hyphens; 63 per label, 253 in all.
_DNS_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# RFC 5322 §3.2.3: dot-atom local part (quoted local parts are not accepted here).
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")


# --- typed access to one TOML table, collecting errors -------------------------


def _describe(value: Any) -> str:
    """A value as the operator wrote it in TOML, for "got ..." in messages."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


class _Table:
    """One TOML table: typed getters that record errors instead of raising.

    A getter returns None when the value is wrong; the caller only builds the
    Config when no error at all was recorded, so None never escapes.
    """

    def __init__(self, raw: Any, where: str, errors: list[str]):
        self.where = where
        self.errors = errors
        self.seen: set[str] = set()
        if not isinstance(raw, dict):
            self.error("", f"must be a table, got {_describe(raw)}")
            raw = {}
        self.raw = raw

    def key_name(self, key: str) -> str:
        if not key:
            return self.where
        return f"{self.where}.{key}" if self.where else key

    def error(self, key: str, message: str) -> None:
        self.errors.append(f"{self.key_name(key)}: {message}")

    def has(self, key: str) -> bool:
        return key in self.raw

    def take(self, key: str, default: Any) -> Any:
        self.seen.add(key)
        return self.raw.get(key, default)

    def integer(self, key: str, default: int, minimum: int, maximum: int | None = None) -> int | None:
        value = self.take(key, default)
        if maximum is None:
            wanted = f"must be an integer >= {minimum}"
        else:
            wanted = f"must be an integer from {minimum} to {maximum}"
        # bool is an int subclass in Python; `true` is never a count.
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(key, f"{wanted}, got {_describe(value)}")
            return None
        if value < minimum or (maximum is not None and value > maximum):
            self.error(key, f"{wanted}, got {value}")
            return None
        return value

    def seconds(self, key: str, default: float, minimum: float) -> float | None:
        value = self.take(key, default)
        wanted = f"must be a number of seconds >= {minimum:g}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.error(key, f"{wanted}, got {_describe(value)}")
            return None
        # `not >=` also refuses nan; inf would never fire a timer.
        if not (value >= minimum) or not math.isfinite(value):
            self.error(key, f"{wanted}, got {_describe(value)}")
            return None
        return float(value)

    def boolean(self, key: str, default: bool) -> bool | None:
        value = self.take(key, default)
        if not isinstance(value, bool):
            self.error(key, f"must be true or false, got {_describe(value)}")
            return None
        return value

    def string(self, key: str, default: str) -> str | None:
        value = self.take(key, default)
        if not isinstance(value, str):
            self.error(key, f"must be a string, got {_describe(value)}")
            return None
        return value

    def string_list(self, key: str, default: tuple[str, ...]) -> list[str] | None:
        value = self.take(key, list(default))
        if not isinstance(value, list):
            self.error(key, f"must be an array of strings, got {_describe(value)}")
            return None
        ok = True
        for index, item in enumerate(value):
            if not isinstance(item, str):
                self.error(f"{key}[{index}]", f"must be a string, got {_describe(item)}")
                ok = False
        return value if ok else None

    def path_text(self, key: str, default: str) -> str | None:
        """A path as written ("" when empty); Path objects are welcome in overrides."""
        value = self.take(key, default)
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str):
            self.error(key, f"must be a path string, got {_describe(value)}")
            return None
        if "\0" in value:
            self.error(key, "must not contain a NUL character")
            return None
        return value

    def finish(self, unknown: str = "unknown key", list_known: bool = False) -> None:
        """Report every key nobody asked for, with the nearest known one as a hint."""
        for key in self.raw:
            if key in self.seen:
                continue
            close = difflib.get_close_matches(key, self.seen, n=1)
            if close:
                hint = f'; did you mean "{close[0]}"?'
            elif list_known:
                hint = f" (known: {', '.join(sorted(self.seen))})"
            else:
                hint = ""
            self.error(key, f"{unknown}{hint}")


def _absolute(value: str) -> Path:
    # abspath, not resolve(): keep symlinks as the operator wrote them.
    return Path(os.path.abspath(os.path.expanduser(value)))


# --- validation of single values -----------------------------------------------


def _dns_name_problem(name: str) -> str | None:
    """Why `name` is not a usable DNS name, or None when it is."""
    if not name:
        return "empty"
    if len(name) > 253:
        return f"longer than 253 characters ({len(name)})"
    if "*" in name:
        return "wildcards are not supported; list each domain"
    labels = name.split(".")
    if any(label == "" for label in labels):
        return "empty label (leading, trailing or doubled dot)"
    for label in labels:
        if not _DNS_LABEL.fullmatch(label):
            return f'label "{label}" must be 1-63 letters, digits or inner hyphens'
    # RFC 3696 §2: a top-level domain is never all-numeric (that is an IP address).
    if labels[-1].isdigit():
        return "looks like an IP address, not a domain name"
    return None


def _address_problem(address: str) -> str | None:
    local, at, domain = address.rpartition("@")
    if not at or not local:
        return "must be an address like postmaster@example.org"
    # RFC 5321 §4.5.3.1.1: local part at most 64 octets.
    if len(local) > 64 or not _DOT_ATOM.fullmatch(local):
        return "local part must be a plain dot-atom of at most 64 characters"
    problem = _dns_name_problem(domain)
    return None if problem is None else f"domain: {problem}"


def _network(text: str, key: str, table: _Table) -> Any:
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            table.error(key, f"{_describe(text)} is not an IPv4 or IPv6 network "
                             f'such as "10.0.0.0/8" or "2001:db8::/32"')
            return None
        table.error(key, f'{_describe(text)} has host bits set; did you mean "{loose}"?')
        return None
