"""Any bytes in any state: well-formed replies only, nothing escapes, the session stays usable.

CI runs a bounded number of examples; for a long campaign:
    HYPOTHESIS_PROFILE=long python3 -m pytest tests/unit/test_smtp_fuzz.py
"""
from __future__ import annotations

import os
import re

from hypothesis import HealthCheck, given, settings, strategies as st

from smtp_harness import Session

settings.register_profile("ci", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=int(os.environ.get("HYPOTHESIS_EXAMPLES", "200000")), deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REPLY = re.compile(r"\d{3}[ -].*")

# Prefixes that put the session into each state before the fuzzed input arrives.
STATES = {
    "fresh": [],
    "greeted": ["EHLO fuzz.test"],
    "mail": ["EHLO fuzz.test", "MAIL FROM:<a@x.test>"],
    "rcpt": ["EHLO fuzz.test", "MAIL FROM:<a@x.test>", "RCPT TO:<alice@example.test>"],
    "data": ["EHLO fuzz.test", "MAIL FROM:<a@x.test>", "RCPT TO:<alice@example.test>", "DATA"],
    "sasl": ["EHLO fuzz.test", "AUTH LOGIN"],
}
VERBS = st.sampled_from([b"HELO", b"EHLO", b"MAIL FROM:", b"RCPT TO:", b"DATA", b"RSET", b"NOOP",
                         b"QUIT", b"VRFY", b"HELP", b"AUTH", b"STARTTLS", b"BDAT", b""])
LINES = st.builds(lambda verb, rest: verb + b" " + rest, VERBS, st.binary(max_size=300)) | st.binary(max_size=600)


@given(state=st.sampled_from(sorted(STATES)), lines=st.lists(LINES, min_size=1, max_size=8),
       separator=st.sampled_from([b"\r\n", b"\n", b"\r", b""]))
def test_any_input_in_any_state_gets_well_formed_replies(state, lines, separator):
    s = Session(role="submissions" if state == "sasl" else "relay", tls=state == "sasl",
                starttls=state != "sasl", smtp={"max_errors": 1000, "max_commands_before_mail": 1000})
    for line in STATES[state]:
        s.cmd(line)
    s.read()
    replies = s.send(separator.join(lines) + b"\r\n")
    for reply in replies:
        assert REPLY.fullmatch(reply), reply
        assert "Traceback" not in reply and "Error:" not in reply
    if s.closed:
        return
    # Usable afterwards: end any DATA, abort any SASL, then NOOP must answer 250.
    s.send(b"\r\n.\r\n*\r\n")
    s.read()
    if not s.closed:
        assert s.last("NOOP") == "250 2.0.0 Ok"
