"""Sieve comparators and match types.

RFC 5228 §2.7 (match types :is, :contains, :matches; comparators), RFC 5229
§3.2 (match variables), RFC 5231 (relational :value and :count),
draft-ietf-sieve-regex (:regex) and RFC 4790 §9 (the comparators).

Regular expressions are run by RE2 (google-re2), which matches in time
linear in the input: a user-written pattern cannot cause catastrophic
backtracking.  :matches patterns are translated into RE2 patterns too.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import re2

__all__ = [
    "COMPARATORS",
    "MATCH_TYPES",
    "RELATIONS",
    "MatchResult",
    "RegexError",
    "check_comparator",
    "check_regex",
    "count_match",
    "match",
]

COMPARATORS = frozenset({"i;octet", "i;ascii-casemap", "i;ascii-numeric"})
MATCH_TYPES = frozenset({"is", "contains", "matches", "regex", "value", "count"})
RELATIONS = frozenset({"gt", "ge", "lt", "le", "eq", "ne"})

# Bounds on user-controlled input.  A value longer than MAX_VALUE characters
# is cut to its first MAX_VALUE characters before :matches and :regex (RE2 is
# linear, but a bound keeps the per-test cost predictable); a wildcard
# therefore never sees text beyond 64 KiB.  Patterns longer than MAX_PATTERN
# are refused.
MAX_VALUE = 64 * 1024
MAX_PATTERN = 8 * 1024
_RE2_MAX_MEM = 8 << 20  # bytes of RE2 program memory per pattern
_CACHE_SIZE = 512


class RegexError(ValueError):
    """A :regex (or translated :matches) pattern that RE2 refuses."""


@dataclass(frozen=True)
class MatchResult:
    """A successful match.

    ``groups`` are the match variables ${0}, ${1}, ... (RFC 5229 §3.2); they
    are empty for match types that do not set them (:is, :contains, :value,
    :count).  ``key`` is the key that matched.
    """

    groups: tuple[str, ...] = ()
    key: str = ""


# --- comparators (RFC 4790 §9) ---------------------------------------------

_ASCII_FOLD = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _casefold(s: str) -> str:
    # RFC 4790 §9.2: i;ascii-casemap folds only the ASCII letters A-Z; other
    # characters (e.g. "É") are compared as octets.  str.lower() would fold
    # them too.  The translation keeps the length, so spans found in the
    # folded string index the original one.
    return s.translate(_ASCII_FOLD)


def _numeric_key(s: str) -> tuple[int, str] | None:
    """RFC 4790 §9.1.1: the number in the leading digits; None = infinity.

    Compared as (length, digits) after dropping leading zeros, so no int()
    conversion (Python limits int() of long digit strings).
    """
    n = 0
    while n < len(s) and "0" <= s[n] <= "9":
        n += 1
    if n == 0:
        # RFC 4790 §9.1.1: a string that does not start with a digit is
        # positive infinity.
        return None
    digits = s[:n].lstrip("0") or "0"
    return (len(digits), digits)


def _numeric_cmp(a: str, b: str) -> int:
    ka, kb = _numeric_key(a), _numeric_key(b)
    if ka is None and kb is None:
        return 0  # RFC 4790 §9.1.1: equal infinities are equal
    if ka is None:
        return 1
    if kb is None:
        return -1
    return (ka > kb) - (ka < kb)


def _cmp(a: str, b: str, comparator: str) -> int:
    if comparator == "i;ascii-numeric":
        return _numeric_cmp(a, b)
    if comparator == "i;ascii-casemap":
        a, b = _casefold(a), _casefold(b)
    # i;octet: code-point order of a str is the octet order of its UTF-8.
    return (a > b) - (a < b)


def check_comparator(comparator: str, match_type: str = "is") -> None:
    """Raise ValueError if the comparator is unknown or cannot do match_type.

    RFC 5228 §2.7.3: a comparator that does not support a match type is an
    error.  RFC 4790 §9.1: i;ascii-numeric offers only equality and ordering,
    not substring operations (:contains, :matches, :regex).
    """
    if comparator not in COMPARATORS:
        raise ValueError(f"unknown comparator {comparator!r}")
    if match_type not in MATCH_TYPES:
        raise ValueError(f"unknown match type {match_type!r}")
    if comparator == "i;ascii-numeric" and match_type in ("contains", "matches", "regex"):
        raise ValueError(f"comparator {comparator} does not support :{match_type}")


def _relation_holds(c: int, relation: str) -> bool:
    if relation == "gt":
        return c > 0
    if relation == "ge":
        return c >= 0
    if relation == "lt":
        return c < 0
    if relation == "le":
        return c <= 0
    if relation == "eq":
        return c == 0
    if relation == "ne":
        return c != 0
    raise ValueError(f"unknown relation {relation!r}")


# --- pattern compilation ----------------------------------------------------


def _options(case_sensitive: bool) -> "re2.Options":
    opts = re2.Options()
    opts.log_errors = False  # RE2 would write refusals to stderr
    opts.max_mem = _RE2_MAX_MEM
    opts.case_sensitive = case_sensitive
    return opts


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _compile_regex(pattern: str, comparator: str):
    if len(pattern) > MAX_PATTERN:
        raise RegexError(f"pattern longer than {MAX_PATTERN} characters")
    # draft-ietf-sieve-regex: with i;ascii-casemap the match is case
    # insensitive.  RE2's case-insensitive mode also folds non-ASCII letters
    # (a small departure from RFC 4790 §9.2 for :regex only).
    try:
        return re2.compile(pattern, _options(comparator != "i;ascii-casemap"))
    except re2.error as exc:
        msg = exc.args[0] if exc.args else exc
        if isinstance(msg, bytes):
            msg = msg.decode("utf-8", "replace")
        raise RegexError(f"invalid regular expression {pattern!r}: {msg}") from None


def check_regex(pattern: str, comparator: str = "i;ascii-casemap") -> None:
    """Compile-time check of a :regex key; raises RegexError or ValueError."""
    check_comparator(comparator, "regex")
    _compile_regex(pattern, comparator)


def _wildcard_to_re2(pattern: str) -> str:
    """Translate a :matches pattern into an RE2 pattern for fullmatch.

    RFC 5228 §2.7.1: "*" matches zero or more characters, "?" exactly one,
    and a backslash quotes the next character ("\\*" is a literal "*").
    RFC 5229 §3.2: each wildcard becomes a match variable ${1}, ${2}, ...
    and each "*" takes as little as it can while the whole still matches
    (so "[*] *" on "[a] [b] c" gives ${1}="a", ${2}="[b] c", and "**" leaves
    ${1} empty): a non-greedy group, anchored by fullmatch.
    """
    out = ["(?s)"]  # wildcards match newlines too
    literal: list[str] = []

    def flush() -> None:
        if literal:
            out.append(re2.escape("".join(literal)))
            literal.clear()

    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            literal.append(pattern[i + 1])
            i += 2
            continue
        if ch == "*":
            flush()
            out.append("(.*?)")
        elif ch == "?":
            flush()
            out.append("(.)")
        else:
            # A trailing lone backslash is taken literally.
            literal.append(ch)
        i += 1
    flush()
    return "".join(out)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _compile_matches(pattern: str, comparator: str):
    if len(pattern) > MAX_PATTERN:
        raise RegexError(f"pattern longer than {MAX_PATTERN} characters")
    if comparator == "i;ascii-casemap":
        # Fold the pattern (and later the value) ASCII-only, RFC 4790 §9.2.
        # Escapes are plain characters here, so folding before translation
        # is safe.
        pattern = _casefold(pattern)
    try:
        return re2.compile(_wildcard_to_re2(pattern), _options(True))
    except re2.error as exc:  # pragma: no cover - escaped literals compile
        raise RegexError(f"pattern {pattern!r} refused: {exc}") from None


# --- match types ------------------------------------------------------------


def _match_one(value: str, key: str, match_type: str, comparator: str,
               relation: str | None) -> MatchResult | None:
    if match_type == "is":
        if comparator == "i;ascii-numeric":
            ok = _numeric_cmp(value, key) == 0
        elif comparator == "i;ascii-casemap":
            ok = _casefold(value) == _casefold(key)
        else:
            ok = value == key
        return MatchResult((), key) if ok else None
    if match_type == "contains":
        if comparator == "i;ascii-casemap":
            ok = _casefold(key) in _casefold(value)
        else:
            ok = key in value
        return MatchResult((), key) if ok else None
    if match_type == "value":
        if relation is None:
            raise ValueError(":value needs a relation")
        # RFC 5231 §4: the value is on the left of the relation, the key on
        # the right ("value gt key").
        ok = _relation_holds(_cmp(value, key, comparator), relation)
        return MatchResult((), key) if ok else None
    if match_type == "matches":
        cut = value[:MAX_VALUE]
        subject = _casefold(cut) if comparator == "i;ascii-casemap" else cut
        m = _compile_matches(key, comparator).fullmatch(subject)
        if m is None:
            return None
        # RFC 5229 §3.2: ${0} is the whole value, ${n} each wildcard's text,
        # taken from the unfolded value (folding keeps positions).
        groups = [cut]
        for g in range(1, m.re.groups + 1):
            start, end = m.span(g)
            groups.append(cut[start:end] if start >= 0 else "")
        return MatchResult(tuple(groups), key)
    if match_type == "regex":
        cut = value[:MAX_VALUE]
        m = _compile_regex(key, comparator).search(cut)
        if m is None:
            return None
        # draft-ietf-sieve-regex (with RFC 5229): ${0} is the matched substring and
        # ${1}.. the parenthesised groups; a group that did not take part
        # is empty.
        groups = [m.group(0)]
        for g in range(1, m.re.groups + 1):
            groups.append(m.group(g) or "")
        return MatchResult(tuple(groups), key)
    if match_type == "count":
        raise ValueError(":count counts values: use count_match()")
    raise ValueError(f"unknown match type {match_type!r}")


def match(value: str, keys: Sequence[str], *, match_type: str,
          comparator: str = "i;ascii-casemap",
          relation: str | None = None) -> MatchResult | None:
    """Test one value against the keys; the first key that matches wins.

    RFC 5228 §2.7.1: a test with a list of keys is true if any key matches.
    Returns None when no key matches.
    """
    check_comparator(comparator, match_type)
    if match_type in ("value", "count"):
        if relation not in RELATIONS:
            raise ValueError(f"unknown relation {relation!r}")
    if isinstance(keys, str):
        keys = (keys,)
    for key in keys:
        result = _match_one(value, key, match_type, comparator, relation)
        if result is not None:
            return result
    return None


def count_match(count: int, keys: Sequence[str], relation: str,
                comparator: str = "i;ascii-numeric") -> MatchResult | None:
    """RFC 5231 §4 :count: the number of values, in decimal, against keys.

    The count is compared with the given comparator, in practice
    i;ascii-numeric (with i;ascii-casemap "10" sorts before "9").
    """
    if comparator not in COMPARATORS:
        raise ValueError(f"unknown comparator {comparator!r}")
    if relation not in RELATIONS:
        raise ValueError(f"unknown relation {relation!r}")
    if isinstance(keys, str):
        keys = (keys,)
    text = str(int(count))
    for key in keys:
        if _relation_holds(_cmp(text, key, comparator), relation):
            return MatchResult((), key)
    return None
