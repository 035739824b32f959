"""The Sieve checker and interpreter (mailgw.sieve.interpreter): each command,
test and action, the limits, and the fallback to keep on a run-time error."""
from __future__ import annotations

import pytest

from mailgw.sieve.grammar import SieveSyntaxError
from mailgw.sieve.interpreter import (Envelope, FileInto, Keep, Limits, Redirect, Reject, compile_script,
                                      run)
from mailgw.sieve.message import SieveMessage

try:  # rootdir-relative import, or tests as a package
    from test_sieve_grammar import RFC5228_EXAMPLE
except ImportError:  # pragma: no cover
    from tests.unit.test_sieve_grammar import RFC5228_EXAMPLE

MESSAGE = (b"Return-Path: <alice@example.org>\r\n"
           b"From: Alice <alice@example.org>\r\n"
           b"To: Bob <bob+lists@example.com>, carol@example.net\r\n"
           b"Cc: me@example.com\r\n"
           b"Sender: owner-ietf-mta-filters@imc.org\r\n"
           b"Subject: Make money fast at the university of diplomas\r\n"
           b"X-Spam: yes\r\n"
           b"\r\n"
           b"Hello, this is the body.\r\n")
ENVELOPE = Envelope(sender="alice@example.org", recipient="bob+lists@example.com")


def actions(script: str, message: bytes = MESSAGE, envelope: Envelope = ENVELOPE, **limits):
    outcome = run([compile_script(script)], SieveMessage.from_bytes(message), envelope,
                  limits=Limits(**limits))
    assert outcome.failed is None, outcome.failed
    return outcome.actions


# RFC 5228 §9, the example script (the parser's tests hold its text), with the messages
# that take each branch.


def test_rfc5228_example_list_mail_goes_to_filter():
    assert actions(RFC5228_EXAMPLE) == [FileInto("filter")]


def test_rfc5228_example_company_mail_is_kept():
    message = MESSAGE.replace(b"Sender: owner-ietf-mta-filters@imc.org\r\n", b"")
    assert actions(RFC5228_EXAMPLE, message) == [Keep()]


def test_rfc5228_example_spam_subject():
    message = (b"From: x@other.test\r\nTo: y@other.test\r\nCc: me@example.com\r\n"
               b"Subject: Make MONEY fast\r\n\r\nhi\r\n")
    assert actions(RFC5228_EXAMPLE, message) == [FileInto("spam")]


def test_rfc5228_example_not_to_me_is_spam():
    message = b"From: x@other.test\r\nTo: someone@other.test\r\nSubject: lunch\r\n\r\nhi\r\n"
    assert actions(RFC5228_EXAMPLE, message) == [FileInto("spam")]


def test_rfc5228_example_other_mail_is_personal():
    message = b"From: x@other.test\r\nTo: y@other.test\r\nCc: me@example.com\r\nSubject: lunch\r\n\r\nhi\r\n"
    assert actions(RFC5228_EXAMPLE, message) == [FileInto("personal")]


def test_implicit_keep_without_actions():
    assert actions("") == [Keep()]


def test_discard_cancels_the_implicit_keep():
    assert actions("discard;") == []


def test_stop_ends_the_script():
    assert actions('require "fileinto"; fileinto "a"; stop; fileinto "b";') == [FileInto("a")]


def test_fileinto_twice_is_one_copy_and_keep_is_inbox():
    assert actions('require "fileinto"; fileinto "a"; fileinto "a"; keep; fileinto "INBOX";') \
        == [FileInto("a"), FileInto("INBOX")]


def test_copy_keeps_the_implicit_keep():
    assert actions('require ["fileinto", "copy"]; fileinto :copy "a";') == [FileInto("a"), Keep()]


def test_mailbox_create():
    assert actions('require ["fileinto", "mailbox"]; fileinto :create "x/y";') \
        == [FileInto("x/y", create=True)]


def test_redirect_and_copy():
    assert actions('redirect "dave@example.net";') == [Redirect("dave@example.net")]
    assert actions('require "copy"; redirect :copy "dave@example.net";') \
        == [Redirect("dave@example.net"), Keep()]


def test_redirect_limit_falls_back_to_keep():
    script = compile_script("".join(f'redirect "u{i}@example.net";' for i in range(5)))
    outcome = run([script], SieveMessage.from_bytes(MESSAGE), ENVELOPE, limits=Limits(max_redirects=4))
    assert outcome.failed and "redirects" in outcome.failed
    assert outcome.actions == [Keep()]


def test_action_limit_falls_back_to_keep():
    script = compile_script('require "fileinto";' + "".join(f'fileinto "f{i}";' for i in range(10)))
    outcome = run([script], SieveMessage.from_bytes(MESSAGE), ENVELOPE, limits=Limits(max_actions=5))
    assert outcome.failed and outcome.actions == [Keep()]


def test_step_limit_falls_back_to_keep():
    script = compile_script("".join('if true { keep; }' for _ in range(100)))
    outcome = run([script], SieveMessage.from_bytes(MESSAGE), ENVELOPE, limits=Limits(max_steps=50))
    assert outcome.failed and "steps" in outcome.failed and outcome.actions == [Keep()]


def test_time_limit_uses_the_injected_clock():
    ticks = iter(range(0, 10_000, 1))
    script = compile_script("".join('if header :contains "subject" "zzz" { keep; }' for _ in range(200)))
    outcome = run([script], SieveMessage.from_bytes(MESSAGE), ENVELOPE, limits=Limits(max_seconds=5),
                  monotonic=lambda: next(ticks))
    assert outcome.failed and "longer" in outcome.failed


def test_reject_and_ereject():
    assert actions('require "reject"; reject "go away";') == [Reject("go away")]
    assert actions('require "ereject"; ereject "no";') == [Reject("no", extended=True)]


def test_reject_with_fileinto_is_an_error_and_keeps():
    script = compile_script('require ["reject", "fileinto"]; fileinto "a"; reject "no";')
    outcome = run([script], SieveMessage.from_bytes(MESSAGE), ENVELOPE)
    assert outcome.failed and outcome.actions == [Keep()]


def test_size_and_exists():
    assert actions('if size :under 1K { discard; }') == []
    assert actions('if size :over 1M { discard; }') == [Keep()]
    assert actions('if exists ["X-Spam", "From"] { discard; }') == []
    assert actions('if exists ["X-Spam", "X-Nope"] { discard; }') == [Keep()]


def test_header_match_types_and_comparators():
    assert actions('if header :contains "subject" "MONEY" { discard; }') == []
    assert actions('if header :contains :comparator "i;octet" "subject" "MONEY" { discard; }') == [Keep()]
    assert actions('if header :is "x-spam" "YES" { discard; }') == []
    assert actions('if header :matches "subject" "Make*fast*" { discard; }') == []


def test_address_parts_and_subaddress():
    script = 'require ["subaddress", "fileinto"]; if address :detail "to" "lists" { fileinto "lists"; }'
    assert actions(script) == [FileInto("lists")]
    assert actions('require "subaddress"; if address :user "to" "bob" { discard; }') == []
    assert actions('if address :localpart "from" "alice" { discard; }') == []
    assert actions('if address :domain "from" "EXAMPLE.org" { discard; }') == []


def test_envelope():
    script = 'require "envelope"; if envelope :domain "from" "example.org" { discard; }'
    assert actions(script) == []
    null = Envelope(sender="", recipient="bob@example.com")
    assert actions('require "envelope"; if envelope :is "from" "" { discard; }', envelope=null) == []


def test_not_allof_anyof():
    assert actions('if not exists "x-nope" { discard; }') == []
    assert actions('if allof (true, false) { discard; }') == [Keep()]
    assert actions('if anyof (false, true) { discard; }') == []
    assert actions('if allof (true, not false, anyof (false, exists "from")) { discard; }') == []


def test_imap4flags():
    script = 'require "imap4flags"; addflag "\\\\seen $Label1"; removeflag "$label1"; keep;'
    assert actions(script) == [Keep(frozenset({"\\Seen"}))]
    script = 'require ["imap4flags", "fileinto"]; setflag "\\\\Flagged"; fileinto "a";'
    assert actions(script) == [FileInto("a", frozenset({"\\Flagged"}))]
    script = 'require ["imap4flags", "fileinto"]; fileinto :flags "$x" "a";'
    assert actions(script) == [FileInto("a", frozenset({"$x"}))]
    script = 'require "imap4flags"; addflag "a"; if hasflag "A" { discard; }'
    assert actions(script) == []


def test_implicit_keep_carries_the_flags():
    assert actions('require "imap4flags"; addflag "\\\\Flagged";') == [Keep(frozenset({"\\Flagged"}))]


def test_imap4flags_with_a_variable_after_rfc5232_section_6():
    script = """require ["imap4flags", "fileinto", "variables"];
    if header :contains "from" "alice@example.org" {
        setflag "flagvar" "\\\\Flagged";
        fileinto :flags "${flagvar}" "INBOX.From Boss";
    }"""
    assert actions(script) == [FileInto("INBOX.From Boss", frozenset({"\\Flagged"}))]


def test_variables_after_rfc5229_section_7():
    script = r"""require ["variables", "fileinto"];
    if header :matches "List-ID" "*<*@*" {
        fileinto "INBOX.lists.${2}"; stop;
    }
    if header :matches "Subject" "[*] *" {
        fileinto "INBOX.lists.${1}"; stop;
    }
    if address :matches ["To", "Cc"] ["coyote@**.example.org", "wile@**.example.org"] {
        fileinto "INBOX.business.${2}"; stop;
    }
    """
    message = b"List-ID: Sieve discussion <ietf-mta-filters@imc.org>\r\nSubject: x\r\n\r\nb\r\n"
    assert actions(script, message) == [FileInto("INBOX.lists.ietf-mta-filters")]
    message = b"Subject: [acme-users] [fwd] version 1.0 is out\r\n\r\nb\r\n"
    assert actions(script, message) == [FileInto("INBOX.lists.acme-users")]
    message = b"To: coyote@ny.us.example.org\r\nSubject: plan\r\n\r\nb\r\n"
    assert actions(script, message) == [FileInto("INBOX.business.ny.us")]


def test_set_modifiers():
    script = r"""require ["variables", "fileinto"];
    set :upperfirst "b" "hello"; set :length "n" "${b}"; set :lower :upperfirst "c" "WORLD";
    fileinto "${b}-${n}-${c}";"""
    assert actions(script) == [FileInto("Hello-5-World")]


def test_string_test_and_relational():
    script = r"""require ["variables", "relational", "comparator-i;ascii-numeric"];
    set "x" "10"; if string :value "gt" :comparator "i;ascii-numeric" "${x}" "9" { discard; }"""
    assert actions(script) == []
    script = 'require ["relational", "comparator-i;ascii-numeric"]; if address :count "ge" :comparator "i;ascii-numeric" ["to", "cc"] "3" ' \
             '{ discard; }'
    assert actions(script) == []
    # RFC 5228 §2.7.3: i;ascii-numeric must be required like any extension.
    with pytest.raises(SieveSyntaxError):
        compile_script('require "relational"; if header :count "ge" :comparator "i;ascii-numeric" "to" "3" {}')


def test_body():
    assert actions('require "body"; if body :contains "the body" { discard; }') == []
    assert actions('require "body"; if body :raw :contains "nothing" { discard; }') == [Keep()]


def test_regex():
    script = 'require ["regex", "variables", "fileinto"]; ' \
             'if header :regex "subject" "^Make ([a-z]+)" { fileinto "${1}"; }'
    assert actions(script) == [FileInto("money")]


def test_several_scripts_in_sequence():
    before = compile_script('require ["fileinto"]; if exists "x-spam" { fileinto "Junk"; stop; }')
    user = compile_script('require ["fileinto"]; fileinto "mine";')
    outcome = run([before, user], SieveMessage.from_bytes(MESSAGE), ENVELOPE)
    # stop ends the script it is in; the next one still runs (draft-degener-sieve-multiscript).
    assert outcome.actions == [FileInto("Junk"), FileInto("mine")]


@pytest.mark.parametrize("script, where", [
    ('fileinto "a";', (1, 1)),                                   # without require
    ('require "nope";', (1, 9)),
    ('keep; require "fileinto";', (1, 7)),
    ('if true { keep; } else keep;', None),
    ('elsif true { keep; }', (1, 1)),
    ('frobnicate;', (1, 1)),
    ('if header :nope "a" "b" { keep; }', (1, 11)),
    ('if header :is :contains "a" "b" { keep; }', (1, 15)),
    ('if header "a" { keep; }', (1, 4)),
    ('require "regex"; if header :regex "a" "(" { keep; }', None),
    ('if size :over "x" { keep; }', None),
])
def test_refused_scripts_name_the_place(script, where):
    with pytest.raises(SieveSyntaxError) as raised:
        compile_script(script)
    if where is not None:
        assert (raised.value.line, raised.value.column) == where, str(raised.value)


def test_deep_nesting_does_not_recurse_in_python():
    depth = 60
    script = "if true {" * depth + "discard;" + "}" * depth
    assert actions(script) == []


def test_vacation_period_and_handle():
    from mailgw.sieve.interpreter import Vacation
    envelope = Envelope(sender="alice@example.org", recipient="bob@example.com",
                        user_addresses=frozenset({"me@example.com"}))
    (vacation, keep) = actions('require "vacation"; vacation :days 3 :handle "h" "away";', envelope=envelope)
    assert vacation == Vacation("alice@example.org", "away", 3 * 86400, "h") and keep == Keep()
    (vacation, _) = actions('require ["vacation", "vacation-seconds"]; vacation :seconds 30 "away";',
                            envelope=envelope)
    assert vacation.seconds == 30
    (vacation, _) = actions('require "vacation"; vacation :days 365 "x";', envelope=envelope)
    assert vacation.seconds == 60 * 86400                       # clamped to the maximum
    with pytest.raises(SieveSyntaxError):
        compile_script('require "vacation"; vacation :seconds 30 "away";')     # needs vacation-seconds
    with pytest.raises(SieveSyntaxError):
        compile_script('require ["vacation", "vacation-seconds"]; vacation :days 1 :seconds 3 "x";')


def test_vacation_addresses_make_a_recipient_mine():
    envelope = Envelope(sender="alice@example.org", recipient="nobody@example.com")
    assert actions('require "vacation"; vacation "x";', envelope=envelope) == [Keep()]
    (vacation, _) = actions('require "vacation"; vacation :addresses ["carol@example.net"] "x";',
                            envelope=envelope)
    assert vacation.reply_to == "alice@example.org"


def test_a_comparator_that_cannot_do_the_match_type_is_refused_at_compile_time():
    # RFC 5228 §2.7.3 / RFC 4790 §9.1: i;ascii-numeric has no substring match.
    with pytest.raises(SieveSyntaxError) as raised:
        compile_script('require "comparator-i;ascii-numeric";\n'
                       'if header :contains :comparator "i;ascii-numeric" "x" "1" { keep; }')
    assert (raised.value.line, raised.value.column) == (2, 33)     # at the comparator's name
