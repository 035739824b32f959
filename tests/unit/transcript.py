"""The transcript player shared by the SMTP, POP3 and IMAP transcript tests.

A transcript is a text file, one line per step:
    # comment                   ignored (cite the RFC clause here)
    @session key=value ...      options for the protocol's session (before it starts)
    @NAME argument              a protocol-specific set-up directive (see each test module)
    C: text                     client line, sent at once with CRLF
    C| text                     client line, held and sent with the following lines (pipelining)
    R: python-bytes-expression  raw client bytes: bytes literals joined with + and repeated
                                with * count, e.g. R: b"USER " + b"a" * 300 + b"\\r\\n"
    S: text                     expected server line, exact ("S:" alone: an empty line)
    S~ regex                    expected server line, re.fullmatch
    S> prefix                   expected server line starting with prefix
    S* prefix                   skip server lines up to and including one starting with prefix
    = closed | open             connection state; other "= WHAT N" checks per protocol
Every block of S lines must account for the server's output since the previous
client input: no missing and no extra lines (S* consumes the lines it skips).

A protocol's test subclasses Transcript: `new_session(options)`, and where it
has them `directive(name, argument)` and `check(what, argument)`.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

EXPECT = ("S:", "S~", "S>", "S*")


def session_options(text: str) -> dict:
    """`key=value ...` -> {key: value}, with yes/no as booleans."""
    options = {}
    for item in text.split():
        key, _, value = item.partition("=")
        options[key] = {"yes": True, "no": False}.get(value, value)
    return options


def raw_bytes(expression: str) -> bytes:
    """A bytes literal, or bytes literals joined with + and repeated with * count."""
    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (bytes, int)):
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError(f"not a bytes expression: {expression!r}")
    result = value(ast.parse(expression, mode="eval").body)
    assert isinstance(result, bytes), expression
    return result


class Transcript:
    def __init__(self, path: Path):
        self.path = path
        self.options: dict = {}
        self.session = None
        self.lineno = 0
        self._pending = b""
        self._expected: list[tuple[str, str, int]] = []

    # -- what a protocol provides --------------------------------------------------
    def new_session(self, options: dict):
        raise NotImplementedError

    def directive(self, name: str, argument: str) -> None:
        self.fail(f"unknown directive @{name}")

    def check(self, what: str, argument: str) -> None:
        self.fail(f"unknown assertion {what!r}")

    def output(self) -> list[str]:
        """The server's lines since the last call."""
        return self.session.read()

    # -- the player -------------------------------------------------------------------
    def fail(self, why: str):
        raise AssertionError(f"{self.path.name}:{self.lineno}: {why}")

    def start(self):
        if self.session is None:
            self.session = self.new_session(dict(self.options))
        return self.session

    def send(self, data: bytes) -> None:
        self.start().server.dataReceived(data)

    def play(self) -> None:
        for self.lineno, raw in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            if not raw.strip() or raw.startswith("#"):
                continue
            if raw.startswith("@"):
                name, _, argument = raw[1:].partition(" ")
                if name == "session":
                    if self.session is not None:
                        self.fail("@session must come before the session starts")
                    self.options = session_options(argument)
                    continue
                if self._expected:
                    self._verify()
                self.directive(name, argument.strip())
                continue
            tag, body = raw[:2], raw[3:]
            if tag in ("C:", "C|", "R:") and self._expected:
                self._verify()
            self.start()
            if tag == "C:":
                self.send(self._pending + body.encode("utf-8") + b"\r\n")
                self._pending = b""
            elif tag == "C|":
                self._pending += body.encode("utf-8") + b"\r\n"
            elif tag == "R:":
                self._pending += raw_bytes(body)
            elif tag in EXPECT:
                self._expected.append((tag, body, self.lineno))
            elif raw.startswith("= "):
                self._verify()
                what, _, argument = raw[2:].strip().partition(" ")
                if what == "closed":
                    assert self.session.closed, f"{self.path.name}:{self.lineno}: connection should be closed"
                elif what == "open":
                    assert not self.session.closed, f"{self.path.name}:{self.lineno}: connection should be open"
                else:
                    self.check(what, argument)
            else:
                self.fail(f"cannot parse {raw!r}")
        self._verify()

    def _verify(self) -> None:
        self.start()
        if self._pending:
            self.send(self._pending)
            self._pending = b""
        output, name = self.output(), self.path.name
        index = 0
        for kind, text, lineno in self._expected:
            if kind == "S*":
                while index < len(output) and not output[index].startswith(text):
                    index += 1
                assert index < len(output), f"{name}:{lineno}: no line starting {text!r}\nall output: {output}"
                index += 1
                continue
            got = output[index] if index < len(output) else "<nothing>"
            if kind == "S:":
                ok = got == text
            elif kind == "S~":
                ok = re.fullmatch(text, got) is not None
            else:
                ok = got.startswith(text)
            assert ok, f"{name}:{lineno}: expected {kind} {text!r}, got {got!r}\nall output: {output}"
            index += 1
        assert index == len(output), f"{name}: extra server output {output[index:]} (expected {len(self._expected)} lines)"
        self._expected = []
