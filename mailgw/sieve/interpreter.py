"""Sieve: checking a parsed script (`compile_script`) and running it on one
message for one recipient (`run`).

The parser (mailgw.sieve.grammar) gives commands and tests with their
arguments in order; `compile_script` checks each against its signature
(which tags, how many positional arguments, which extension it needs) and
fails with the line and column of the first problem, so a script that
would fail at delivery is refused when it is uploaded.

`run` is iterative: blocks are walked with an explicit stack, so a script's
nesting never grows Python's stack, and every step counts against
`Limits.max_steps` and the wall-clock budget. Whatever goes wrong at run
time gives `Outcome.failed` with the reason and only an implicit keep:
RFC 5228 §2.10.6, a failed script never loses the mail.

Not here yet (docs/sieve.md): date/currentdate, index, include.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from mailgw.sieve import grammar, matching
from mailgw.sieve.grammar import Command, Number, SieveSyntaxError, StringList, Tag, Test
from mailgw.sieve.message import split_subaddress

# The extensions `require` accepts (and ManageSieve's SIEVE capability lists).
SUPPORTED_EXTENSIONS = (
    "fileinto", "mailbox", "reject", "ereject", "envelope", "imap4flags", "variables",
    "relational", "subaddress", "body", "regex", "copy", "comparator-i;ascii-numeric",
    "vacation", "vacation-seconds",
)
ADDRESS_PARTS = ("localpart", "domain", "all", "user", "detail")
MATCH_TAGS = ("is", "contains", "matches", "regex", "value", "count")
VARIABLE_MODIFIERS = {  # RFC 5229 §4.1: precedence, highest applied last
    "lower": 40, "upper": 40, "lowerfirst": 30, "upperfirst": 30, "quotewildcard": 20, "length": 10,
}
SYSTEM_FLAGS = {"\\seen": "\\Seen", "\\answered": "\\Answered", "\\flagged": "\\Flagged",
                "\\deleted": "\\Deleted", "\\draft": "\\Draft"}


class SieveRuntimeError(Exception):
    """The script cannot go on: its actions are dropped and the mail kept."""


# -- actions ----------------------------------------------------------------------

@dataclass(frozen=True)
class Keep:
    flags: frozenset = frozenset()


@dataclass(frozen=True)
class FileInto:
    mailbox: str
    flags: frozenset = frozenset()
    create: bool = False


@dataclass(frozen=True)
class Redirect:
    address: str


@dataclass(frozen=True)
class Reject:
    reason: str
    extended: bool = False      # ereject (RFC 5429 §2.1): refuse in the protocol where possible


@dataclass(frozen=True)
class Vacation:
    """RFC 5230: a reply to send, if the durable record (mailgw.sieve.vacation)
    says this sender has not had one for this handle within `seconds`.
    The interpreter has already applied the rules that need no state."""
    reply_to: str               # the envelope sender
    reason: str
    seconds: int
    handle: str
    subject: str | None = None
    from_: str | None = None
    mime: bool = False


@dataclass(frozen=True)
class Envelope:
    sender: str                 # "" for <>
    recipient: str              # the address delivered to (after alias resolution)
    original_recipient: str | None = None
    auth: str | None = None
    delimiter: str = "+"        # RFC 5233: the recipient delimiter of our domains
    # RFC 5230 §4.5: the user's own addresses (aliases included), lower-case.
    user_addresses: frozenset = frozenset()


@dataclass(frozen=True)
class Limits:
    max_actions: int = 32       # Pigeonhole's sieve_max_actions
    max_redirects: int = 4      # Pigeonhole's sieve_max_redirects
    max_steps: int = 100_000
    max_seconds: float = 1.0
    max_variable_size: int = 4096   # RFC 5229 §6: at least 1000 octets per variable
    # RFC 5230 §4.1 / RFC 6131 §2: the period between replies to one sender is
    # kept within these bounds (Pigeonhole: sieve_vacation_min_period 1d, max 60d,
    # default 7d); :seconds may go lower, down to vacation_min_seconds.
    vacation_default_days: int = 7
    vacation_max_days: int = 60
    vacation_min_seconds: int = 0


@dataclass
class Outcome:
    actions: list = field(default_factory=list)     # Keep/FileInto/Redirect/Reject/Vacation, in order
    failed: str | None = None                       # why the run gave up (then: implicit keep only)


@dataclass(frozen=True)
class Script:
    name: str
    commands: tuple
    required: frozenset
    # id(command or test) -> (tags, positional arguments), split once by the
    # checker against the signature, so a run never parses an argument list.
    arguments: dict = field(default_factory=dict, compare=False)


# -- compiling ----------------------------------------------------------------------

def compile_script(text: str | bytes, *, name: str = "script", max_size: int = 1 << 20) -> Script:
    """The checked script, or SieveSyntaxError with the line and column."""
    commands = grammar.parse(text, max_size=max_size)
    checker = _Checker()
    checker.block(commands, top=True)
    return Script(name, commands, frozenset(checker.required), checker.split)


def _error(node, message: str) -> SieveSyntaxError:
    return SieveSyntaxError(node.line, node.column, message)


@dataclass
class _Signature:
    positional: tuple           # "string" | "strings" | "number" per positional argument
    tags: dict                  # tag -> None (flag) | "string" | "strings" | "number" | "relation"
    extension: str | None = None
    optional_first: bool = False    # RFC 5232 §3: [<variablename>] before the flag list


_MATCH = {"is": None, "contains": None, "matches": None, "regex": None, "value": "relation",
          "count": "relation", "comparator": "string"}
_ADDR_PARTS = {part: None for part in ADDRESS_PARTS}
# Tags of which one command or test may carry only one.
_GROUPS = (frozenset(MATCH_TAGS), frozenset(ADDRESS_PARTS), frozenset({"raw", "text", "content"}),
           frozenset({"days", "seconds"}))
TESTS = {
    "true": _Signature((), {}),
    "false": _Signature((), {}),
    "exists": _Signature(("strings",), {}),
    "size": _Signature(("number",), {"over": None, "under": None}),
    "header": _Signature(("strings", "strings"), dict(_MATCH)),
    "address": _Signature(("strings", "strings"), {**_MATCH, **_ADDR_PARTS}),
    "envelope": _Signature(("strings", "strings"), {**_MATCH, **_ADDR_PARTS}, "envelope"),
    "string": _Signature(("strings", "strings"), dict(_MATCH), "variables"),
    "hasflag": _Signature(("strings",), dict(_MATCH), "imap4flags", optional_first=True),
    "body": _Signature(("strings",), {**_MATCH, "raw": None, "text": None, "content": "strings"}, "body"),
}
COMMANDS = {
    "keep": _Signature((), {"flags": "strings"}),
    "discard": _Signature((), {}),
    "stop": _Signature((), {}),
    "fileinto": _Signature(("string",), {"flags": "strings", "copy": None, "create": None}, "fileinto"),
    "redirect": _Signature(("string",), {"copy": None}),
    "reject": _Signature(("string",), {}, "reject"),
    "ereject": _Signature(("string",), {}, "ereject"),
    "setflag": _Signature(("strings",), {}, "imap4flags", optional_first=True),
    "addflag": _Signature(("strings",), {}, "imap4flags", optional_first=True),
    "removeflag": _Signature(("strings",), {}, "imap4flags", optional_first=True),
    "set": _Signature(("string", "string"), {m: None for m in VARIABLE_MODIFIERS}, "variables"),
    "vacation": _Signature(("string",), {"days": "number", "seconds": "number", "subject": "string",
                                         "from": "string", "addresses": "strings", "mime": None,
                                         "handle": "string"}, "vacation"),
}
# Tags that need an extension of their own.
TAG_EXTENSIONS = {"seconds": "vacation-seconds", "copy": "copy", "create": "mailbox", "flags": "imap4flags", "regex": "regex",
                  "value": "relational", "count": "relational", "user": "subaddress", "detail": "subaddress"}


class _Checker:
    def __init__(self):
        self.required: set[str] = set()
        self.split: dict[int, tuple[dict, list]] = {}

    def block(self, commands, *, top: bool = False) -> None:
        stack = [(list(commands), top, 0)]
        while stack:
            pending, at_top, index = stack.pop()
            if index >= len(pending):
                continue
            command = pending[index]
            stack.append((pending, at_top, index + 1))
            previous = pending[index - 1].name if index else None
            self.command(command, at_top, previous, pending[:index])
            if command.block is not None:
                stack.append((list(command.block), False, 0))

    def command(self, command: Command, at_top: bool, previous: str | None, before) -> None:
        name = command.name
        if name == "require":
            # RFC 5228 §3.2: require only at the start of the script.
            if not at_top or any(c.name != "require" for c in before):
                raise _error(command, "require must come before any other command")
            if len(command.arguments) != 1 or not isinstance(command.arguments[0], StringList):
                raise _error(command, "require takes one string list")
            for extension in command.arguments[0].values:
                if extension.lower() not in SUPPORTED_EXTENSIONS and extension not in SUPPORTED_EXTENSIONS:
                    raise _error(command.arguments[0], f"unsupported extension {extension!r}")
                self.required.add(extension.lower())
            return
        if name in ("if", "elsif", "else"):
            if name != "if" and previous not in ("if", "elsif"):
                raise _error(command, f"{name} without if")
            if command.block is None:
                raise _error(command, f"{name} needs a block")
            if command.arguments:
                raise _error(command.arguments[0], f"{name} takes no arguments")
            if name == "else":
                if command.tests:
                    raise _error(command.tests[0], "else takes no test")
                return
            if len(command.tests) != 1:
                raise _error(command, f"{name} needs exactly one test")
            self.test(command.tests[0])
            return
        signature = COMMANDS.get(name)
        if signature is None:
            raise _error(command, f"unknown command {name!r}")
        if command.block is not None:
            raise _error(command, f"{name} takes no block")
        if command.tests:
            raise _error(command.tests[0], f"{name} takes no test")
        self.arguments(command, signature)

    def test(self, root: Test) -> None:
        stack = [root]
        while stack:
            test = stack.pop()
            if test.name in ("allof", "anyof"):
                if test.arguments or not test.tests:
                    raise _error(test, f"{test.name} takes a list of tests")
                stack.extend(test.tests)
                continue
            if test.name == "not":
                if test.arguments or len(test.tests) != 1:
                    raise _error(test, "not takes one test")
                stack.append(test.tests[0])
                continue
            signature = TESTS.get(test.name)
            if signature is None:
                raise _error(test, f"unknown test {test.name!r}")
            if test.tests:
                raise _error(test.tests[0], f"{test.name} takes no nested test")
            self.arguments(test, signature)

    def need(self, extension: str | None, node) -> None:
        if extension is not None and extension not in self.required:
            raise _error(node, f"{extension!r} is used without require")

    def arguments(self, node, signature: _Signature) -> None:
        self.need(signature.extension, node)
        arguments = list(node.arguments)
        seen: set[str] = set()
        tags: dict = {}             # tag -> its value node, or True for a flag tag
        positional = []
        i = 0
        while i < len(arguments):
            argument = arguments[i]
            if isinstance(argument, Tag):
                if positional:
                    raise _error(argument, f"tag :{argument.name} after the positional arguments")
                if argument.name not in signature.tags:
                    raise _error(argument, f"{node.name} has no tag :{argument.name}")
                if argument.name in seen:
                    raise _error(argument, f"tag :{argument.name} given twice")
                for group in _GROUPS:
                    if argument.name in group and seen & group:
                        raise _error(argument, f"tag :{argument.name} conflicts with :{min(seen & group)}")
                seen.add(argument.name)
                self.need(TAG_EXTENSIONS.get(argument.name), argument)
                kind = signature.tags[argument.name]
                tags[argument.name] = True
                if kind is not None:
                    i += 1
                    if i >= len(arguments):
                        raise _error(argument, f"tag :{argument.name} needs a value")
                    self.value(arguments[i], kind, argument)
                    tags[argument.name] = arguments[i]
                i += 1
                continue
            positional.append(argument)
            i += 1
        self.split[id(node)] = (tags, list(positional))
        if signature.optional_first and len(positional) == len(signature.positional) + 1:
            self.need("variables", node)
            self.value(positional.pop(0), "strings", node)
        if len(positional) != len(signature.positional):
            raise _error(node, f"{node.name} takes {len(signature.positional)} positional argument(s), "
                               f"got {len(positional)}")
        for argument, kind in zip(positional, signature.positional):
            self.value(argument, kind, node)
        comparator = tags["comparator"].values[0] if "comparator" in tags else "i;ascii-casemap"
        if "comparator" in tags:
            match_type = next((m for m in MATCH_TAGS if m in tags), "is")
            try:
                # RFC 5228 §2.7.3: an unknown comparator, or one that cannot do the match type, is an error.
                matching.check_comparator(comparator, "is" if match_type == "count" else match_type)
            except ValueError as error:
                raise _error(tags["comparator"], str(error)) from None
            if comparator == "i;ascii-numeric":
                self.need("comparator-i;ascii-numeric", node)
        if "regex" in seen:
            keys = positional[-1].values
            for key in keys:
                if "${" in key and "variables" in self.required:
                    continue        # expanded at run time, checked then
                try:
                    matching.check_regex(key, comparator)
                except ValueError as error:
                    raise _error(positional[-1], f"bad regex {key!r}: {error}") from None

    def value(self, argument, kind: str, node) -> None:
        if kind == "number":
            if not isinstance(argument, Number):
                raise _error(argument, f"{node.name} expects a number")
        elif kind in ("string", "strings", "relation"):
            if not isinstance(argument, StringList):
                raise _error(argument, f"{node.name} expects a string")
            if kind in ("string", "relation") and argument.is_list and len(argument.values) != 1:
                raise _error(argument, f"{node.name} expects one string, not a list")
            if kind == "relation" and argument.values[0].lower() not in matching.RELATIONS:
                raise _error(argument, f"unknown relation {argument.values[0]!r}")


# -- running ------------------------------------------------------------------------

def run(scripts: Sequence[Script], message, envelope: Envelope, *, limits: Limits = Limits(),
        monotonic: Callable[[], float] = time.monotonic) -> Outcome:
    """The actions of `scripts` run in sequence on `message` (a
    mailgw.sieve.message.SieveMessage). Pigeonhole's sieve_before/after
    semantics (draft-degener-sieve-multiscript): `stop` ends the script it
    is in, the implicit keep happens once at the end unless a script
    cancelled it."""
    run_ = _Run(message, envelope, limits, monotonic)
    try:
        for script in scripts:
            run_.execute(script)
    except SieveRuntimeError as error:
        return Outcome([Keep()], failed=str(error))
    except (ValueError, LookupError, TypeError) as error:
        return Outcome([Keep()], failed=f"internal error: {error!r}")
    return run_.outcome()


class _Run:
    def __init__(self, message, envelope: Envelope, limits: Limits, monotonic):
        self.message = message
        self.envelope = envelope
        self.limits = limits
        self.monotonic = monotonic
        self.deadline = monotonic() + limits.max_seconds
        self.steps = 0
        self.actions: list = []
        self.implicit_keep = True
        self.flags: set[str] = set()        # RFC 5232 §3: the internal variable
        self.variables: dict[str, str] = {}
        self.match_variables: tuple[str, ...] = ()
        self.required: frozenset = frozenset()
        self.arguments: dict = {}
        self.redirects = 0

    def outcome(self) -> Outcome:
        actions = list(self.actions)
        if self.implicit_keep:
            actions.append(Keep(frozenset(self.flags)))
        return Outcome(_deduplicated(actions))

    def step(self) -> None:
        self.steps += 1
        if self.steps > self.limits.max_steps:
            raise SieveRuntimeError(f"more than {self.limits.max_steps} steps")
        if self.steps % 64 == 0 and self.monotonic() > self.deadline:
            raise SieveRuntimeError(f"ran longer than {self.limits.max_seconds} s")

    def execute(self, script: Script) -> None:
        self.required = script.required
        self.arguments = script.arguments
        self.variables = {}
        self.match_variables = ()
        stack = [iter(script.commands)]
        # if/elsif/else: whether a branch of the current chain was taken, per block level.
        taken = [False]
        while stack:
            command = next(stack[-1], None)
            if command is None:
                stack.pop()
                taken.pop()
                continue
            self.step()
            name = command.name
            if name == "require":
                continue
            if name in ("if", "elsif", "else"):
                if name == "if":
                    taken[-1] = False
                if taken[-1]:
                    continue
                if name == "else" or self.test(command.tests[0]):
                    taken[-1] = True
                    stack.append(iter(command.block))
                    taken.append(False)
                continue
            taken[-1] = False
            if name == "stop":
                return
            self.action(command)

    # -- commands ---------------------------------------------------------------------
    def add(self, action) -> None:
        if len(self.actions) >= self.limits.max_actions:
            raise SieveRuntimeError(f"more than {self.limits.max_actions} actions")
        self.actions.append(action)

    def action(self, command: Command) -> None:
        name = command.name
        tags, args = self.arguments[id(command)]
        if name == "keep":
            self.add(Keep(self.flag_argument(tags)))
            self.implicit_keep = False
        elif name == "discard":
            self.implicit_keep = False
        elif name == "fileinto":
            mailbox = self.expand(args[0].values[0])
            self.add(FileInto(mailbox, self.flag_argument(tags), create="create" in tags))
            if "copy" not in tags:   # RFC 3894 §3: :copy keeps the implicit keep
                self.implicit_keep = False
        elif name == "redirect":
            address = self.expand(args[0].values[0])
            if "@" not in address or any(c in address for c in " \t\r\n<>"):
                raise SieveRuntimeError(f"redirect to an invalid address {address!r}")
            self.redirects += 1
            if self.redirects > self.limits.max_redirects:
                raise SieveRuntimeError(f"more than {self.limits.max_redirects} redirects")
            self.add(Redirect(address))
            if "copy" not in tags:
                self.implicit_keep = False
        elif name in ("reject", "ereject"):
            # RFC 5429 §2.1: reject cancels the implicit keep; it cannot go with keep or fileinto.
            if any(isinstance(a, (Keep, FileInto)) for a in self.actions):
                raise SieveRuntimeError(f"{name} together with keep or fileinto")
            self.add(Reject(self.expand(args[0].values[0]), extended=name == "ereject"))
            self.implicit_keep = False
        elif name in ("setflag", "addflag", "removeflag"):
            flags = self.flag_list(args[-1].values)
            if len(args) == 2:
                # RFC 5232 §3: the flags live in a variable, space-separated.
                variable = args[0].values[0].lower()
                current = set(self.variables.get(variable, "").split())
                self.variables[variable] = " ".join(sorted(_apply_flags(name, current, flags)))
            else:
                self.flags = _apply_flags(name, self.flags, flags)
        elif name == "set":
            self.set_variable(command, tags, args)
        elif name == "vacation":
            self.vacation(tags, self.expand(args[0].values[0]))

    def vacation(self, tags, reason: str) -> None:
        """RFC 5230 §4.5-§4.6 and RFC 3834 §2: the rules that need no state; a
        message that fails one gets no reply (and the script goes on)."""
        if any(isinstance(a, Vacation) for a in self.actions):
            raise SieveRuntimeError("vacation more than once")   # RFC 5230 §4.7
        limits = self.limits
        if "seconds" in tags:
            seconds = max(limits.vacation_min_seconds, tags["seconds"].value)
        else:
            days = tags["days"].value if "days" in tags else limits.vacation_default_days
            seconds = max(1, days) * 86400
        seconds = min(seconds, limits.vacation_max_days * 86400)
        subject = self.expand(tags["subject"].values[0]) if "subject" in tags else None
        from_ = self.expand(tags["from"].values[0]) if "from" in tags else None
        mime = "mime" in tags
        # RFC 5230 §4.2: without :handle, the same reply text is the same handle.
        handle = self.expand(tags["handle"].values[0]) if "handle" in tags else \
            "\0".join([reason, subject or "", from_ or "", "mime" if mime else ""])
        sender = self.envelope.sender
        if not self.should_reply(sender, tags):
            return
        self.add(Vacation(sender, reason, seconds, handle, subject, from_, mime))

    def should_reply(self, sender: str, tags) -> bool:
        if not sender:
            return False            # RFC 5230 §4.6: never to the null sender
        mine = {a.lower() for a in self.envelope.user_addresses} | {self.envelope.recipient.lower()}
        if "addresses" in tags:
            mine |= {self.expand(a).lower() for a in tags["addresses"].values}
        local = sender.rpartition("@")[0].lower()
        if sender.lower() in mine:
            return False            # RFC 5230 §4.6: not to ourselves
        if local in ("mailer-daemon", "listserv", "majordomo", "postmaster") or \
                local.startswith("owner-") or local.endswith("-request"):
            return False            # RFC 5230 §4.6: not to list and system addresses
        message = self.message
        for value in message.headers("auto-submitted"):
            if value.strip().split(";")[0].strip().lower() != "no":
                return False        # RFC 3834 §2: never answer an automatic message
        for value in message.headers("precedence"):
            if value.strip().lower() in ("bulk", "list", "junk"):
                return False
        if any(name.lower().startswith("list-") for name in message.raw_header_names):
            return False            # RFC 2369/2919: a list message
        # RFC 5230 §4.5: only when one of the user's addresses is a recipient in the header.
        seen = {a.all.lower() for h in ("to", "cc", "bcc", "resent-to", "resent-cc")
                for a in message.addresses(h)}
        return bool(seen & mine)

    def flag_argument(self, tags) -> frozenset:
        value = tags.get("flags")
        if value is None:
            return frozenset(self.flags)
        return frozenset(self.flag_list(value.values))

    def flag_list(self, values) -> list[str]:
        # RFC 5232 §3: a string may hold several flags separated by spaces; system
        # flags are case-insensitive.
        out = []
        for value in values:
            for flag in self.expand(value).split():
                out.append(SYSTEM_FLAGS.get(flag.lower(), flag))
        return out

    def set_variable(self, command, tags, args) -> None:
        name = args[0].values[0].lower()
        value = self.expand(args[1].values[0])
        # RFC 5229 §4.1: modifiers apply from the highest precedence down.
        for modifier in sorted((m for m in VARIABLE_MODIFIERS if m in tags),
                               key=lambda m: -VARIABLE_MODIFIERS[m]):
            if modifier == "lower":
                value = value.lower()
            elif modifier == "upper":
                value = value.upper()
            elif modifier == "lowerfirst":
                value = value[:1].lower() + value[1:]
            elif modifier == "upperfirst":
                value = value[:1].upper() + value[1:]
            elif modifier == "quotewildcard":
                value = value.replace("\\", "\\\\").replace("*", "\\*").replace("?", "\\?")
            elif modifier == "length":
                value = str(len(value))
        self.variables[name] = value[:self.limits.max_variable_size]

    def expand(self, text: str) -> str:
        """RFC 5229 §3: ${name} and ${n} substituted, once, left to right."""
        if "variables" not in self.required or "${" not in text:
            return text
        out = []
        i = 0
        while i < len(text):
            start = text.find("${", i)
            if start < 0:
                out.append(text[i:])
                break
            out.append(text[i:start])
            end = text.find("}", start + 2)
            if end < 0:
                out.append(text[start:])
                break
            name = text[start + 2:end]
            if name.isdigit():
                index = int(name)
                out.append(self.match_variables[index] if index < len(self.match_variables) else "")
                i = end + 1
            elif name and _is_identifier(name):
                out.append(self.variables.get(name.lower(), ""))
                i = end + 1
            else:
                # Not a variable reference: kept as written (RFC 5229 §3).
                out.append("${")
                i = start + 2
        return "".join(out)[:self.limits.max_variable_size * 4]

    # -- tests ------------------------------------------------------------------------
    def test(self, root: Test) -> bool:
        """allof/anyof/not are walked with an explicit stack; results are
        combined in post-order, short-circuiting as RFC 5228 §5.2/§5.3 allow."""
        # Each frame: (test, list of child results so far).
        stack: list[tuple[Test, list]] = [(root, [])]
        result = False
        while stack:
            test, results = stack[-1]
            self.step()
            name = test.name
            if name in ("allof", "anyof", "not"):
                done = len(results) == len(test.tests) or \
                    (name == "allof" and results and not results[-1]) or \
                    (name == "anyof" and results and results[-1])
                if not done:
                    stack.append((test.tests[len(results)], []))
                    continue
                if name == "allof":
                    result = all(results)
                elif name == "anyof":
                    result = any(results)
                else:
                    result = not results[0]
            else:
                result = self.simple_test(test)
            stack.pop()
            if stack:
                stack[-1][1].append(result)
        return result

    def simple_test(self, test: Test) -> bool:
        name = test.name
        if name == "true":
            return True
        if name == "false":
            return False
        tags, args = self.arguments[id(test)]
        if name == "exists":
            return all(self.message.headers(h) for h in self.expanded(args[0].values))
        if name == "size":
            limit = args[0].value
            return self.message.size > limit if "over" in tags else self.message.size < limit
        if name == "header":
            values = [v for h in self.expanded(args[0].values) for v in self.message.headers(h)]
            return self.matches(values, args[1].values, tags)
        if name == "address":
            addresses = [a for h in self.expanded(args[0].values) for a in self.message.addresses(h)]
            return self.matches([self.address_part(a.localpart, a.domain, a.all, tags) for a in addresses],
                                args[1].values, tags)
        if name == "envelope":
            values = []
            for part in self.expanded(args[0].values):
                part = part.lower()
                address = {"from": self.envelope.sender, "to": self.envelope.recipient,
                           "auth": self.envelope.auth}.get(part)
                if address is None:
                    continue
                local, _, domain = address.rpartition("@") if "@" in address else (address, "", "")
                values.append(self.address_part(local, domain, address, tags))
            return self.matches(values, args[1].values, tags)
        if name == "string":
            return self.matches(self.expanded(args[0].values), args[1].values, tags, empty_counts=False)
        if name == "hasflag":
            if len(args) == 2:
                flags = {f for v in self.expanded(args[0].values)
                         for f in self.variables.get(v.lower(), "").split()}
            else:
                flags = self.flags
            return self.matches(sorted(flags), args[-1].values, tags)
        if name == "body":
            if "raw" in tags:
                transform, types = "raw", ()
            elif "content" in tags:
                transform, types = "content", tuple(self.expanded(tags["content"].values))
            else:
                transform, types = "text", ()
            return self.matches(self.message.body_text(transform, types), args[0].values, tags)
        raise SieveRuntimeError(f"unknown test {name!r}")

    def address_part(self, local: str, domain: str, whole: str, tags) -> str | None:
        if "localpart" in tags:
            return local
        if "domain" in tags:
            return domain
        if "user" in tags or "detail" in tags:
            user, detail = split_subaddress(local, self.envelope.delimiter)
            # RFC 5233 §4: no detail means :detail matches nothing.
            return user if "user" in tags else detail
        return whole

    def expanded(self, values) -> list[str]:
        return [self.expand(v) for v in values]

    def matches(self, values, keys, tags, *, empty_counts: bool = True) -> bool:
        comparator = tags["comparator"].values[0] if "comparator" in tags else "i;ascii-casemap"
        keys = self.expanded(keys)
        values = [v for v in values if v is not None]
        if "count" in tags:
            count = len([v for v in values if v != ""]) if not empty_counts else len(values)
            return matching.count_match(count, keys, tags["count"].values[0].lower(), comparator)
        if "value" in tags:
            match_type, relation = "value", tags["value"].values[0].lower()
        else:
            match_type = next((m for m in ("is", "contains", "matches", "regex") if m in tags), "is")
            relation = None
        for value in values:
            result = matching.match(value, keys, match_type=match_type, comparator=comparator,
                                    relation=relation)
            if result is not None:
                if match_type in ("matches", "regex") and "variables" in self.required:
                    self.match_variables = tuple(result.groups)
                return True
        return False


def _apply_flags(command: str, current: set, flags: list) -> set:
    if command == "setflag":
        return set(flags)
    if command == "addflag":
        return set(current) | set(flags)
    return {f for f in current if f.lower() not in {g.lower() for g in flags}}


def _is_identifier(name: str) -> bool:
    # RFC 5229 §3: identifier, or namespace.identifier (none are supported: they stay text).
    return (name[0].isalpha() or name[0] == "_") and all(c.isalnum() or c == "_" for c in name) \
        and name.isascii()


def _deduplicated(actions: list) -> list:
    """RFC 5228 §2.10.3: a mailbox filed into twice gets one copy; keep and
    fileinto "INBOX" are the same copy. Flags of the later one win."""
    out: list = []
    where: dict[str, int] = {}
    for action in actions:
        if isinstance(action, (Keep, FileInto)):
            box = "INBOX" if isinstance(action, Keep) or action.mailbox.upper() == "INBOX" else action.mailbox
            if box in where:
                out[where[box]] = action
                continue
            where[box] = len(out)
        elif isinstance(action, Redirect) and action in out:
            continue
        out.append(action)
    return out
