"""Tests for the Sieve tokenizer and parser (RFC 5228 §8)."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzzing import fuzz_settings
from mailgw.sieve.grammar import Command, Number, SieveSyntaxError, StringList, Tag, parse
from mailgw.sieve.grammar import Test as SieveTest  # not "Test*": pytest would collect it


def one(text):
    """The single command of a one-command script."""
    (command,) = parse(text)
    return command


def error(text, **kwargs) -> SieveSyntaxError:
    with pytest.raises(SieveSyntaxError) as info:
        parse(text, **kwargs)
    return info.value


# --------------------------------------------------------------------------
# Tokens

def test_empty_script():
    assert parse("") == ()
    assert parse(b"") == ()
    assert parse("  \t\r\n# only a comment") == ()


def test_identifier_is_lower_cased_and_positioned():
    cmd = one("  KeeP;")
    assert cmd == Command("keep", (), (), None, 1, 3)


def test_identifier_with_digits_and_underscore():
    assert one("_a1_B2;").name == "_a1_b2"


def test_tag():
    cmd = one("x :Contains :is_2;")
    assert cmd.arguments == (Tag("contains", 1, 3), Tag("is_2", 1, 13))


def test_numbers_and_quantifiers():
    cmd = one("x 0 42 1K 2M 3G 5k 007;")
    assert [a.value for a in cmd.arguments] == [0, 42, 1 << 10, 2 << 20, 3 << 30, 5 << 10, 7]
    assert cmd.arguments[1] == Number(42, 1, 5)


def test_number_limit():
    assert one("x 9223372036854775807;").arguments[0].value == (1 << 63) - 1
    assert one("x 8589934591G;").arguments[0].value == 8589934591 << 30


def test_quoted_string_escapes():
    # RFC 5228 §2.4.2: only \\ and \" are escapes; "\a" is just "a".
    cmd = one(r'x "a\\b\"c\d" "";')
    assert cmd.arguments == (StringList(('a\\b"cd',), 1, 3, False), StringList(("",), 1, 15, False))


def test_quoted_string_spans_lines():
    cmd = one('x "a\r\nb"; y;'.replace("; y;", ";"))
    assert cmd.arguments[0].values == ("a\r\nb",)
    first, second = parse('x "a\nb\nc" ;\n  y;')
    assert second.line == 4 and second.column == 3


def test_string_list():
    cmd = one('x ["a", "b" ,"c"] ["d"];')
    assert cmd.arguments == (StringList(("a", "b", "c"), 1, 3, True), StringList(("d",), 1, 19, True))


def test_hash_comment():
    assert parse("# a comment\nkeep; # another\n#last") == (Command("keep", (), (), None, 2, 1),)


def test_bracket_comment():
    cmds = parse("/* one\n * two ** / */ keep /**/; /* x */")
    assert cmds == (Command("keep", (), (), None, 2, 16),)


def test_bracket_comment_does_not_nest():
    assert error("/* /* */ */ keep;").column == 10


def test_punctuation_and_test_list():
    cmd = one("if anyof(a, b (c), d) {}")
    assert cmd.name == "if"
    (anyof,) = cmd.tests
    assert anyof.name == "anyof"
    assert [t.name for t in anyof.tests] == ["a", "b", "d"]
    assert anyof.tests[1].tests == (SieveTest("c", (), (), 1, 16),)
    assert cmd.block == ()


def test_multiline_string():
    cmd = one("x text:\nline 1\n..dot\n.. \n.x\n.\n;")
    assert cmd.arguments == (StringList(("line 1\n.dot\n. \n.x\n",), 1, 3, False),)


def test_multiline_string_crlf_and_comment():
    cmd = one("x TEXT: \t# comment\r\nhello\r\n..\r\n.\r\n;")
    assert cmd.arguments[0].values == ("hello\r\n.\r\n",)


def test_multiline_string_empty_and_in_list():
    cmd = one('x [text:\n.\n, "b"];')
    assert cmd.arguments[0].values == ("", "b")


def test_multiline_string_positions_after():
    first, second = parse("x text:\na\nb\n.\n;\n  keep;")
    assert (second.line, second.column) == (6, 3)


def test_multiline_string_dot_at_end_of_script():
    assert error("x text:\na\n.").message.startswith("missing ';'")


def test_text_as_plain_identifier():
    assert one("text;").name == "text"
    assert one("x texts:a;").tests == (SieveTest("texts", (Tag("a", 1, 8),), (), 1, 3),)


def test_bytes_input():
    assert one("fileinto \"é\";".encode()).arguments[0].values == ("é",)


def test_columns_count_characters():
    e = error('x "é€" @')
    assert (e.line, e.column) == (1, 8)


# --------------------------------------------------------------------------
# AST shape

RFC5228_EXAMPLE = """\
#
# Example Sieve Filter
# Declare any optional features or extension used by the script
#
require ["fileinto"];

#
# Handle messages from known mailing lists
# Move messages from IETF filter discussion list to filter mailbox
#
if header :is "Sender" "owner-ietf-mta-filters@imc.org"
        {
        fileinto "filter";  # move to "filter" mailbox
        }
#
# Keep all messages to or from people in my company
#
elsif address :DOMAIN :is ["From", "To"] "example.com"
        {
        keep;               # keep in "In" mailbox
        }

#
# Try and catch unsolicited email.  If a message is not to me,
# or it contains a subject known to be spam, file it away.
#
elsif anyof (NOT address :all :contains
               ["To", "Cc", "Bcc"] "me@example.com",
             header :matches "subject"
               ["*make*money*fast*", "*university*dipl*mas*"])
        {
        fileinto "spam";   # move to "spam" mailbox
        }
else
        {
        # Move all other (non-company) mail to "personal"
        # mailbox.
        fileinto "personal";
        }
"""


def test_rfc5228_section9_example():
    require, if_, elsif1, elsif2, else_ = parse(RFC5228_EXAMPLE)
    assert require == Command("require", (StringList(("fileinto",), 5, 9, True),), (), None, 5, 1)

    assert (if_.name, if_.line, if_.column) == ("if", 11, 1)
    (header,) = if_.tests
    assert header == SieveTest("header", (Tag("is", 11, 11), StringList(("Sender",), 11, 15, False),
                                     StringList(("owner-ietf-mta-filters@imc.org",), 11, 24, False)),
                          (), 11, 4)
    assert if_.block == (Command("fileinto", (StringList(("filter",), 13, 18, False),), (), None, 13, 9),)

    assert elsif1.name == "elsif"
    (address,) = elsif1.tests
    assert address.name == "address"
    assert address.arguments == (Tag("domain", 18, 15), Tag("is", 18, 23),
                                 StringList(("From", "To"), 18, 27, True),
                                 StringList(("example.com",), 18, 42, False))
    assert elsif1.block == (Command("keep", (), (), None, 20, 9),)

    (anyof,) = elsif2.tests
    assert anyof.name == "anyof" and anyof.arguments == ()
    not_, header2 = anyof.tests
    assert not_.name == "not" and not_.arguments == ()
    (address2,) = not_.tests
    assert [type(a) for a in address2.arguments] == [Tag, Tag, StringList, StringList]
    assert address2.arguments[2].values == ("To", "Cc", "Bcc")
    assert header2.arguments[2].values == ("*make*money*fast*", "*university*dipl*mas*")
    assert [c.name for c in elsif2.block] == ["fileinto"]

    assert else_.name == "else" and else_.tests == () and else_.arguments == ()
    assert else_.block[0].arguments[0].values == ("personal",)


def test_nested_blocks():
    (cmd,) = parse("if true { if false { stop; } keep; }")
    inner, keep = cmd.block
    assert inner.block == (Command("stop", (), (), None, 1, 22),)
    assert keep.name == "keep"


def test_arguments_then_test():
    cmd = one('foo :a 1 "s" ["t"] bar :b;')
    assert [type(a) for a in cmd.arguments] == [Tag, Number, StringList, StringList]
    assert cmd.tests == (SieveTest("bar", (Tag("b", 1, 24),), (), 1, 20),)


def test_nodes_are_frozen():
    cmd = one("keep;")
    with pytest.raises(AttributeError):
        cmd.name = "stop"


# --------------------------------------------------------------------------
# Errors: exact positions and messages

@pytest.mark.parametrize("text, line, column, fragment", [
    ("keep", 1, 5, "missing ';' after command 'keep'"),
    ("if true {\n  stop\n}", 3, 1, "missing ';' after command 'stop': expected ';' or '{', got '}'"),
    ('fileinto "a" ]', 1, 14, "expected ';' or '{', got ']'"),
    ("keep;\n}", 2, 1, "expected a command, got '}'"),
    ("if true { keep;", 1, 16, "expected a command or '}', got end of script"),
    ('"a";', 1, 1, "expected a command, got string"),
    ("x [];", 1, 3, "empty string list"),
    ("x [\n 1];", 2, 2, "expected a string in string list, got number 1"),
    ('x ["a" "b"];', 1, 8, "expected ',' or ']' in string list, got string"),
    ('x ["a",];', 1, 8, "expected a string in string list, got ']'"),
    ("if anyof() {}", 1, 10, "expected a test in test list, got ')'"),
    ("if anyof(a (b) c) {}", 1, 16, "expected ',' or ')' in test list, got identifier 'c'"),
    ("if anyof(a ; ) {}", 1, 12, "expected ',' or ')' in test list, got ';'"),
    ("if anyof(a, :x) {}", 1, 13, "expected a test in test list, got tag ':x'"),
    ("if not (a) b;", 1, 12, "expected ';' or '{', got identifier 'b'"),
    ('x "a" 1 (b) "c";', 1, 13, "expected ';' or '{', got string"),
    ("keep;\n  x\t\"abc\n\ndef", 2, 5, "unterminated string"),
    ('x "ab\\', 1, 3, "unterminated string"),
    ("keep; /* a\n*", 1, 7, "unterminated comment"),
    ("x text:\nabc\n..\n", 1, 3, "unterminated multi-line string"),
    ("x\n text:", 2, 2, "unterminated multi-line string"),
    ("x text: y\n.\n;", 1, 9, "expected end of line after 'text:'"),
    ("x text:\r.\n;", 1, 8, "expected end of line after 'text:'"),
    ("x 9223372036854775808;", 1, 3, "number 9223372036854775808 is too large"),
    ("x\n  8589934592G;", 2, 3, "number 8589934592G is too large"),
    ("x " + "9" * 5000 + ";", 1, 3, "is too large"),
    ("x : a;", 1, 3, "expected an identifier after ':'"),
    ("x :1;", 1, 3, "expected an identifier after ':'"),
    ("keep;\n x @;", 2, 4, "unexpected character '@'"),
    ("x / y;", 1, 3, "unexpected character '/'"),
    ("x\x0c;", 1, 2, "unexpected character '\\x0c'"),
])
def test_errors(text, line, column, fragment):
    e = error(text)
    assert (e.line, e.column) == (line, column)
    assert fragment in e.message
    assert str(e) == f"line {line}, column {column}: {e.message}"
    assert isinstance(e, ValueError)


@pytest.mark.parametrize("data, line, column", [
    (b"keep;\xff", 1, 6),
    (b'keep;\n x "\xc3\xa9\xe2\x82"', 2, 6),
    (b"\xc3", 1, 1),
    (b"a\r\n\xc3\xa9\xc3\xa9 \x80", 2, 4),
])
def test_invalid_utf8(data, line, column):
    e = error(data)
    assert (e.line, e.column) == (line, column)
    assert e.message.startswith("invalid UTF-8")


def test_max_size_counts_octets():
    assert parse("keep;", max_size=5)
    e = error("keep; ", max_size=5)
    assert (e.line, e.column) == (1, 1) and "larger than the limit of 5" in e.message
    error("x \"é\";", max_size=6)  # 7 octets, 6 characters
    assert parse("x \"é\";", max_size=7)
    error(b"keep; ", max_size=5)


def test_default_max_size():
    assert parse("#" + "x" * ((1 << 20) - 1)) == ()
    e = error("#" + "x" * (1 << 20))
    assert "larger than the limit of 1048576" in e.message


def test_not_str_or_bytes():
    with pytest.raises(TypeError):
        parse(42)


def test_nesting_limit_blocks():
    assert parse("if a {" * 64 + "}" * 64)
    e = error("if a {" * 65 + "}" * 65)
    assert (e.line, e.column) == (1, 64 * 6 + 6)
    assert e.message == "nesting deeper than the limit of 64"


def test_nesting_limit_test_lists():
    assert parse("if " + "anyof(" * 64 + "a" + ")" * 64 + ";")
    e = error("if " + "anyof(" * 65 + "a" + ")" * 65 + ";")
    assert (e.line, e.column) == (1, 3 + 64 * 6 + 6)
    assert e.message == "nesting deeper than the limit of 64"


def test_nesting_limit_nested_tests():
    # The test of `if` is not nested; each test inside another test is.
    assert parse("if " + "not " * 64 + "a;")
    e = error("if " + "not " * 65 + "a;")
    assert (e.line, e.column) == (1, 3 + 65 * 4 + 1)
    assert e.message == "nesting deeper than the limit of 64"


def test_nesting_limit_is_configurable():
    assert parse("if a {if a {}}", max_nesting=2)
    assert error("if a {if a {}}", max_nesting=1).column == 12


@pytest.mark.parametrize("text", [
    "if a {" * 200_000,
    "x " + "(" * 200_000,
    "x " + "not " * 200_000,
    "x " + "allof(" * 200_000,
    "[" * 200_000,
])
def test_deep_input_never_recurses(text):
    error(text)


def test_deep_input_with_large_limit_does_not_recurse():
    n = 50_000
    (cmd,) = parse("if a {" * n + "}" * n, max_nesting=n)
    assert cmd.name == "if"


# --------------------------------------------------------------------------
# Fuzzing

FRAGMENTS = ["if", "elsif", "else", "keep", "not", "anyof", "allof", "header", ":is", ":contains",
             "text:", "text:\n", "\n.\n", "..", ".", '"a"', '"\\"', '"', "\\", "[", "]", "(", ")",
             "{", "}", ";", ",", " ", "\t", "\r\n", "\n", "#c", "/*", "*/", "*", "/", "1", "10K",
             "99999999999999999999", "G", "é", ":", "_x", "\x00"]


@fuzz_settings(300)
@given(st.one_of(st.text(), st.lists(st.sampled_from(FRAGMENTS), max_size=60).map("".join)))
def test_fuzz_text(text):
    try:
        result = parse(text)
    except SieveSyntaxError as e:
        assert e.line >= 1 and e.column >= 1
        assert str(e) == f"line {e.line}, column {e.column}: {e.message}"
    else:
        assert isinstance(result, tuple)
        assert all(isinstance(c, Command) for c in result)


@fuzz_settings(200)
@given(st.one_of(st.binary(), st.lists(st.sampled_from(FRAGMENTS), max_size=40)
                 .map(lambda parts: "".join(parts).encode()), st.text().map(lambda s: s.encode())))
def test_fuzz_bytes(data):
    try:
        result = parse(data, max_nesting=4)
    except SieveSyntaxError as e:
        assert e.line >= 1 and e.column >= 1
    else:
        assert isinstance(result, tuple)
