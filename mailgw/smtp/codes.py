"""Named SMTP replies: (code, enhanced status code, text).

RFC 5321 §4.2.3 gives the reply codes, RFC 3463 the enhanced codes and
RFC 2034 §3 says they preface every reply except the greeting and the
answer to HELO/EHLO. Texts are what a client may see; they never carry
internals, and they are ASCII (RFC 5321 §2.4: commands and replies are
composed of ASCII characters; so "section", never the sign).
"""
from __future__ import annotations

from typing import NamedTuple


class Reply(NamedTuple):
    code: int
    enhanced: str
    text: str

    def with_text(self, text: str) -> "Reply":
        return Reply(self.code, self.enhanced, text)

    def as_temporary(self) -> "Reply":
        """The same reply as a deferral: enhanced class 4 (5.1.1 -> 4.1.1),
        code and text kept. The outbound client and relay transport use it
        for failures that must not bounce (a session failure, a failed attempt)."""
        if not self.enhanced or self.enhanced.startswith("4"):
            return self
        return self._replace(enhanced="4" + self.enhanced[1:])


OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Ok")
QUEUED = Reply(250, "2.0.0", "Ok: queued as {queue_id}")
BYE = Reply(221, "2.0.0", "Bye")
HELP = Reply(214, "2.0.0", "See RFC 5321; commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP STARTTLS AUTH")
# RFC 5321 §3.5.3: 252 when we will not verify but will accept mail.
CANNOT_VRFY = Reply(252, "2.5.2", "Cannot VRFY user, but will accept message and attempt delivery")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
READY_TLS = Reply(220, "2.0.0", "Ready to start TLS")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")

# 4xx: try again later
SERVICE_UNAVAILABLE = Reply(421, "4.3.2", "Service not available, closing transmission channel")
# RFC 5321 §3.8: a server that must stop sends 421 to every client, then closes.
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down")
TIMEOUT = Reply(421, "4.4.2", "Timeout, closing transmission channel")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing transmission channel")
TOO_MANY_COMMANDS = Reply(421, "4.7.0", "Too many commands without a transaction")
TOO_MANY_AUTH_FAILURES = Reply(421, "4.7.0", "Too many failed authentications")
LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")
# RFC 5321 §4.5.3.1.10: 452 for too many recipients, the client sends the rest later.
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
TLS_UNAVAILABLE = Reply(454, "4.7.0", "TLS not available")
AUTH_TEMPORARY = Reply(454, "4.7.0", "Temporary authentication failure")

# 5xx: permanent
SYNTAX_ERROR = Reply(500, "5.5.2", "Syntax error, command unrecognized")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
INVALID_UTF8 = Reply(500, "5.5.2", "Invalid UTF-8 in command")
BAD_ARGUMENTS = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
BAD_CHARACTERS = Reply(501, "5.5.2", "CR, LF or NUL not allowed in commands")
BAD_SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
HELO_FIRST = Reply(503, "5.5.1", "Send HELO/EHLO first")
NESTED_MAIL = Reply(503, "5.5.1", "Sender already specified")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command")
NEED_RCPT = Reply(503, "5.5.1", "Need RCPT command")
ALREADY_AUTHENTICATED = Reply(503, "5.5.1", "Already authenticated")
AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "AUTH not allowed during a mail transaction")
TLS_ALREADY_ACTIVE = Reply(503, "5.5.1", "TLS already active")
UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication mechanism")
# RFC 4954 §6: 530 when the policy needs AUTH, 538 when the mechanism needs TLS.
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
ENCRYPTION_REQUIRED = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_ABORTED = Reply(501, "5.7.0", "Authentication aborted")
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode response")
UNKNOWN_USER = Reply(550, "5.1.1", "User unknown in local recipient table")
# RFC 5321 §3.6.2 and RFC 3463 5.7.1: relaying refused.
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
SENDER_NOT_OWNED = Reply(553, "5.7.1", "Sender address rejected: not owned by user")
# RFC 5322 §3.6.2 header From:/Sender: of an authenticated user's message; RFC 3463 5.7.1.
HEADER_SENDER_NOT_OWNED = Reply(550, "5.7.1", "From: header address rejected: not owned by user")
# RFC 3463 §3.3 4.2.2: mailbox full (over quota); temporary, the sender retries.
MAILBOX_FULL = Reply(452, "4.2.2", "Mailbox full: user is over quota")
NULL_SENDER_NOT_ALLOWED = Reply(553, "5.7.1", "Null sender not allowed for authenticated submission")
# RFC 7489 §7.3 / RFC 3463 5.7.1: the From: domain's DMARC policy says reject.
DMARC_REJECT = Reply(550, "5.7.1", "Message rejected: it fails the DMARC policy of {domain}")
# RFC 7372 §3.2 X.7.24: SPF could not be evaluated now (DNS); the client retries.
SPF_TEMPERROR = Reply(451, "4.7.24", "Temporary SPF validation error, try again later")
# RFC 3463 4.7.0: a DKIM or DMARC check could not finish now.
AUTH_CHECK_TEMPERROR = Reply(451, "4.7.0", "Temporary DKIM/DMARC validation error, try again later")
# rspamd's verdicts (mailgw/spam/rspamd.py); RFC 3463 5.7.1: delivery not authorized.
SPAM_REJECT = Reply(554, "5.7.1", "Spam message rejected")
SPAM_SOFT_REJECT = Reply(451, "4.7.1", "Try again later")
# Greylisting: a well-behaved client retries later and is accepted then.
GREYLISTED = Reply(451, "4.7.1", "Greylisted, please try again later")
SPAM_FILTER_UNAVAILABLE = Reply(451, "4.7.1", "Spam filter unavailable, try again later")
# RFC 5321 §3.1: "554" instead of the greeting: no service for this client.
DNSBL_BLOCKED = Reply(554, "5.7.1", "Service unavailable; client [{client}] blocked using {lists}")
# Postscreen's pregreet verdict: the client talked before our greeting.
PREGREET = Reply(554, "5.5.1", "Protocol error: talked before the greeting")
# RFC 5321 §3.1: after a 554 greeting, every command but QUIT gets 503.
REFUSED_SESSION = Reply(503, "5.5.1", "Bad sequence of commands: no service here, send QUIT")
# RFC 1870 §6.2 / RFC 3463 5.3.4: message too big for the system.
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")
# RFC 5321 §4.1.1.11: 555 for unrecognised MAIL/RCPT parameters.
UNKNOWN_PARAMETER = Reply(555, "5.5.4", "Unsupported parameter")
# RFC 6531 §3.5: non-ASCII address without SMTPUTF8.
NEEDS_SMTPUTF8 = Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
# RFC 5321 §2.3.8 and §4.1.1.4: CR and LF only together; bare ones are how smuggling works.
BARE_LINE_ENDING = Reply(554, "5.6.0", "Message refused: bare CR or LF in message (RFC 5321 section 2.3.8)")
TEXT_LINE_TOO_LONG = Reply(554, "5.6.0",
                           "Message refused: line longer than {limit} octets (RFC 5321 section 4.5.3.1.6)")
