"""Tokenizer and parser for the Sieve grammar (RFC 5228 §8).

`parse(text)` turns a script into a tuple of `Command` nodes. Only the
grammar is checked here: command, test and tag names are not validated
(the compiler does that). Every error is a `SieveSyntaxError` carrying a
1-based line and column (columns count characters, not octets). The parser
is iterative, so no input can raise RecursionError.

Multi-line strings keep their line endings as written (CRLF or LF); a final
"." line at the very end of the script needs no line ending.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

__all__ = ["Command", "Number", "SieveSyntaxError", "StringList", "Tag", "Test", "parse",
           "DEFAULT_MAX_SIZE", "DEFAULT_MAX_NESTING", "MAX_NUMBER"]

DEFAULT_MAX_SIZE = 1 << 20
DEFAULT_MAX_NESTING = 64
# Numbers must fit a signed 64-bit integer once the quantifier is applied.
MAX_NUMBER = (1 << 63) - 1

# RFC 5228 §2.4.1: the quantifiers are powers of two.
_QUANTIFIERS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_PUNCT = frozenset("[](){};,")
_WHITESPACE = frozenset(" \t\r\n")


class SieveSyntaxError(ValueError):
    """A script that does not match the RFC 5228 §8 grammar."""

    def __init__(self, line: int, column: int, message: str):
        super().__init__(f"line {line}, column {column}: {message}")
        self.line = line
        self.column = column
        self.message = message


@dataclass(frozen=True)
class Tag:
    """`:name` (name lower-cased, without the colon)."""
    name: str
    line: int
    column: int


@dataclass(frozen=True)
class Number:
    """A number with its K/M/G quantifier already applied."""
    value: int
    line: int
    column: int


@dataclass(frozen=True)
class StringList:
    """`["a", "b"]` (is_list True) or a single string (is_list False)."""
    values: tuple[str, ...]
    line: int
    column: int
    is_list: bool


Argument = Union[Tag, Number, StringList]


@dataclass(frozen=True)
class Test:
    """`name arguments [test / test-list]`."""
    name: str
    arguments: tuple[Argument, ...]
    tests: tuple["Test", ...]
    line: int
    column: int


@dataclass(frozen=True)
class Command:
    """`name arguments [test / test-list] (";" / block)`; block None after `;`."""
    name: str
    arguments: tuple[Argument, ...]
    tests: tuple[Test, ...]
    block: tuple["Command", ...] | None
    line: int
    column: int


# --------------------------------------------------------------------------
# Input decoding

def _decode(text: str | bytes, max_size: int) -> str:
    """Check the size limit and return the script as str."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        data = bytes(text)
        if len(data) > max_size:
            raise SieveSyntaxError(1, 1, f"script is larger than the limit of {max_size} octets")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            # RFC 5228 §2.2: scripts are UTF-8; report the first bad byte.
            start = exc.start
            line = data.count(b"\n", 0, start) + 1
            line_start = data.rfind(b"\n", 0, start) + 1
            column = len(data[line_start:start].decode("utf-8")) + 1
            raise SieveSyntaxError(line, column, f"invalid UTF-8 (byte 0x{data[start]:02x})") from None
    if not isinstance(text, str):
        raise TypeError(f"script must be str or bytes, not {type(text).__name__}")
    size = len(text) if len(text) > max_size else len(text.encode("utf-8", "surrogatepass"))
    if size > max_size:
        raise SieveSyntaxError(1, 1, f"script is larger than the limit of {max_size} octets")
    return text


# --------------------------------------------------------------------------
# Tokenizer

# A token: (kind, value, line, column). kind is "id", "tag", "num", "str",
# "mstr" (multi-line string), one of _PUNCT, or "eof".
_Token = tuple


def _describe(tok: _Token) -> str:
    kind, value = tok[0], tok[1]
    if kind == "id":
        return f"identifier '{value}'"
    if kind == "tag":
        return f"tag ':{value}'"
    if kind == "num":
        return f"number {tok[4]}"
    if kind in ("str", "mstr"):
        return "string"
    if kind == "eof":
        return "end of script"
    return f"'{kind}'"


def _is_alpha(c: str) -> bool:
    return ("a" <= c <= "z") or ("A" <= c <= "Z") or c == "_"


def _is_digit(c: str) -> bool:
    return "0" <= c <= "9"


class _Lexer:
    """Turns a script into a list of tokens."""

    def __init__(self, text: str):
        self.text = text
        self.pos = 0
        self.line = 1
        self.line_start = 0

    def _col(self, pos: int | None = None) -> int:
        return (self.pos if pos is None else pos) - self.line_start + 1

    def _advance_to(self, end: int) -> None:
        """Move to `end`, counting the newlines passed over."""
        text = self.text
        n = text.count("\n", self.pos, end)
        if n:
            self.line += n
            self.line_start = text.rfind("\n", self.pos, end) + 1
        self.pos = end

    def _error(self, message: str, line: int | None = None, column: int | None = None) -> SieveSyntaxError:
        return SieveSyntaxError(self.line if line is None else line,
                                self._col() if column is None else column, message)

    def tokens(self) -> list[_Token]:
        out: list[_Token] = []
        text = self.text
        size = len(text)
        while True:
            self._skip_space()
            if self.pos >= size:
                out.append(("eof", None, self.line, self._col()))
                return out
            c = text[self.pos]
            line, col = self.line, self._col()
            if c in _PUNCT:
                out.append((c, c, line, col))
                self.pos += 1
            elif c == '"':
                out.append(("str", self._quoted(), line, col))
            elif _is_digit(c):
                out.append(self._number())
            elif _is_alpha(c):
                end = self._ident_end(self.pos)
                word = text[self.pos:end].lower()
                if word == "text" and end < size and text[end] == ":":
                    # RFC 5228 §2.4.2: "text:" starts a multi-line string.
                    self.pos = end + 1
                    out.append(("mstr", self._multiline(line, col), line, col))
                else:
                    self.pos = end
                    out.append(("id", word, line, col))
            elif c == ":":
                if self.pos + 1 < size and _is_alpha(text[self.pos + 1]):
                    end = self._ident_end(self.pos + 1)
                    out.append(("tag", text[self.pos + 1:end].lower(), line, col))
                    self.pos = end
                else:
                    raise self._error("expected an identifier after ':'")
            else:
                raise self._error(f"unexpected character {c!r}")

    def _ident_end(self, pos: int) -> int:
        text, size = self.text, len(self.text)
        while pos < size and (_is_alpha(text[pos]) or _is_digit(text[pos])):
            pos += 1
        return pos

    def _skip_space(self) -> None:
        text, size = self.text, len(self.text)
        while self.pos < size:
            c = text[self.pos]
            if c in _WHITESPACE:
                self._advance_to(self.pos + 1)
            elif c == "#":
                # RFC 5228 §2.3: a hash comment runs to the end of the line.
                end = text.find("\n", self.pos)
                self._advance_to(size if end < 0 else end)
            elif c == "/" and text.startswith("/*", self.pos):
                # RFC 5228 §2.3: bracket comments do not nest; "*/" ends them.
                end = text.find("*/", self.pos + 2)
                if end < 0:
                    raise self._error("unterminated comment: '/*' without '*/'")
                self._advance_to(end + 2)
            else:
                return

    def _quoted(self) -> str:
        """A quoted string; self.pos is at the opening quote."""
        text, size = self.text, len(self.text)
        line, col = self.line, self._col()
        start = self.pos + 1
        parts: list[str] = []
        i = start
        while True:
            j = i
            while j < size and text[j] != '"' and text[j] != "\\":
                j += 1
            parts.append(text[i:j])
            if j >= size:
                raise self._error("unterminated string: no closing '\"'", line, col)
            if text[j] == '"':
                self._advance_to(j + 1)
                return "".join(parts)
            if j + 1 >= size:
                raise self._error("unterminated string: no closing '\"'", line, col)
            # RFC 5228 §2.4.2: "\x" for any other x is just x.
            parts.append(text[j + 1])
            i = j + 2

    def _number(self) -> _Token:
        text, size = self.text, len(self.text)
        line, col = self.line, self._col()
        end = self.pos
        while end < size and _is_digit(text[end]):
            end += 1
        digits = text[self.pos:end]
        multiplier = 1
        if end < size and text[end].lower() in _QUANTIFIERS:
            multiplier = _QUANTIFIERS[text[end].lower()]
            end += 1
        source = text[self.pos:end]
        significant = digits.lstrip("0")
        # Never call int() on a huge digit string (3.11's int_max_str_digits).
        if len(significant) > 19 or int(significant or "0") * multiplier > MAX_NUMBER:
            shown = source if len(source) <= 30 else source[:27] + "..."
            raise self._error(f"number {shown} is too large (the limit is 2**63 - 1)", line, col)
        self.pos = end
        return ("num", int(significant or "0") * multiplier, line, col, source)

    def _multiline(self, line: int, col: int) -> str:
        """A multi-line string; self.pos is just after "text:"."""
        text, size = self.text, len(self.text)
        pos = self.pos
        while pos < size and text[pos] in " \t":
            pos += 1
        if pos < size and text[pos] == "#":
            while pos < size and text[pos] != "\n":
                pos += 1
        if text.startswith("\r\n", pos):
            pos += 2
        elif text.startswith("\n", pos):
            pos += 1
        elif pos >= size:
            self.pos = pos
            raise self._error("unterminated multi-line string: no line with only '.'", line, col)
        else:
            self.pos = pos
            raise self._error("expected end of line after 'text:'")
        self._advance_to(pos)
        lines: list[str] = []
        while True:
            if pos >= size:
                raise self._error("unterminated multi-line string: no line with only '.'", line, col)
            nl = text.find("\n", pos)
            end = size if nl < 0 else nl + 1
            body = text[pos:end]
            bare = body[:-2] if body.endswith("\r\n") else body[:-1] if body.endswith("\n") else body
            if bare == ".":
                self._advance_to(end)
                return "".join(lines)
            if nl < 0:
                self._advance_to(end)
                raise self._error("unterminated multi-line string: no line with only '.'", line, col)
            # RFC 5228 §2.4.2: a line starting ".." is dot-stuffed.
            lines.append(body[1:] if body.startswith("..") else body)
            pos = end


# --------------------------------------------------------------------------
# Parser (an explicit stack of frames instead of recursion)

class _Block:
    __slots__ = ("top", "commands")

    def __init__(self, top: bool):
        self.top = top
        self.commands: list[Command] = []


class _Node:
    """A command or test being parsed."""
    __slots__ = ("is_test", "name", "line", "column", "arguments", "tests", "nested")

    def __init__(self, is_test: bool, tok: _Token, nested: bool):
        self.is_test = is_test
        self.name = tok[1]
        self.line, self.column = tok[2], tok[3]
        self.arguments: list[Argument] = []
        self.tests: tuple[Test, ...] | None = None
        self.nested = nested  # counts towards the nesting depth


class _TestList:
    __slots__ = ("tests", "expect_test")

    def __init__(self):
        self.tests: list[Test] = []
        self.expect_test = True


def _string_list(tokens: list[_Token], i: int) -> tuple[StringList, int]:
    """`[ string *("," string) ]` starting at tokens[i] == "["."""
    open_tok = tokens[i]
    i += 1
    values: list[str] = []
    if tokens[i][0] == "]":
        raise SieveSyntaxError(open_tok[2], open_tok[3], "empty string list: '[]' needs at least one string")
    while True:
        tok = tokens[i]
        if tok[0] not in ("str", "mstr"):
            raise SieveSyntaxError(tok[2], tok[3], f"expected a string in string list, got {_describe(tok)}")
        values.append(tok[1])
        tok = tokens[i + 1]
        i += 2
        if tok[0] == "]":
            return StringList(tuple(values), open_tok[2], open_tok[3], True), i
        if tok[0] != ",":
            raise SieveSyntaxError(tok[2], tok[3], f"expected ',' or ']' in string list, got {_describe(tok)}")


def parse(text: str | bytes, *, max_size: int = DEFAULT_MAX_SIZE,
          max_nesting: int = DEFAULT_MAX_NESTING) -> tuple[Command, ...]:
    """Parse a Sieve script into its commands (RFC 5228 §8.2)."""
    tokens = _Lexer(_decode(text, max_size)).tokens()
    i = 0
    depth = 0
    stack: list = [_Block(top=True)]
    result = None  # a finished Command, Test, tuple of tests or block

    def too_deep(tok: _Token) -> SieveSyntaxError:
        return SieveSyntaxError(tok[2], tok[3], f"nesting deeper than the limit of {max_nesting}")

    while True:
        frame = stack[-1]
        tok = tokens[i]
        if isinstance(frame, _Block):
            if result is not None:
                frame.commands.append(result)
                result = None
            kind = tok[0]
            if kind == "id":
                stack.append(_Node(False, tok, False))
                i += 1
            elif kind == "eof" and frame.top:
                return tuple(frame.commands)
            elif kind == "}" and not frame.top:
                stack.pop()
                depth -= 1
                result = tuple(frame.commands)
                i += 1
            else:
                expected = "a command" if frame.top else "a command or '}'"
                raise SieveSyntaxError(tok[2], tok[3], f"expected {expected}, got {_describe(tok)}")
        elif isinstance(frame, _TestList):
            if result is not None:
                frame.tests.append(result)
                result = None
                frame.expect_test = False
            if frame.expect_test:
                if tok[0] != "id":
                    raise SieveSyntaxError(tok[2], tok[3], f"expected a test in test list, got {_describe(tok)}")
                stack.append(_Node(True, tok, False))
                i += 1
            elif tok[0] == ",":
                frame.expect_test = True
                i += 1
            elif tok[0] == ")":
                stack.pop()
                depth -= 1
                result = tuple(frame.tests)
                i += 1
            else:
                raise SieveSyntaxError(tok[2], tok[3], f"expected ',' or ')' in test list, got {_describe(tok)}")
        else:
            node: _Node = frame
            if result is not None:
                if isinstance(result, Test):
                    node.tests = (result,)
                elif node.is_test or node.tests is None:
                    node.tests = result
                else:
                    # The block of a command: the command is complete.
                    stack.pop()
                    result = Command(node.name, tuple(node.arguments), node.tests, result,
                                     node.line, node.column)
                    continue
                result = None
                continue
            kind = tok[0]
            if node.tests is None:
                # RFC 5228 §8.2: arguments = *argument [ test / test-list ]
                if kind in ("str", "mstr"):
                    node.arguments.append(StringList((tok[1],), tok[2], tok[3], False))
                    i += 1
                    continue
                if kind == "[":
                    value, i = _string_list(tokens, i)
                    node.arguments.append(value)
                    continue
                if kind == "num":
                    node.arguments.append(Number(tok[1], tok[2], tok[3]))
                    i += 1
                    continue
                if kind == "tag":
                    node.arguments.append(Tag(tok[1], tok[2], tok[3]))
                    i += 1
                    continue
                if kind == "(":
                    depth += 1
                    if depth > max_nesting:
                        raise too_deep(tok)
                    stack.append(_TestList())
                    i += 1
                    continue
                if kind == "id":
                    nested = node.is_test
                    if nested:
                        depth += 1
                        if depth > max_nesting:
                            raise too_deep(tok)
                    stack.append(_Node(True, tok, nested))
                    i += 1
                    continue
                node.tests = ()
            if node.is_test:
                stack.pop()
                if node.nested:
                    depth -= 1
                result = Test(node.name, tuple(node.arguments), node.tests, node.line, node.column)
                continue
            if kind == ";":
                stack.pop()
                i += 1
                result = Command(node.name, tuple(node.arguments), node.tests, None, node.line, node.column)
                continue
            if kind == "{":
                depth += 1
                if depth > max_nesting:
                    raise too_deep(tok)
                stack.append(_Block(top=False))
                i += 1
                continue
            raise SieveSyntaxError(tok[2], tok[3],
                                   f"missing ';' after command '{node.name}': expected ';' or '{{', "
                                   f"got {_describe(tok)}")
