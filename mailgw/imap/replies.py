"""What the IMAP command modules share: the session states (RFC 3501 §3)
and the command results, the tagged OK/NO/BAD a handler returns or raises.

A handler returns OK(...) (or NO_REPLY when it answered by itself) or raises
NO(...)/BAD(...); the server turns them into the tagged line
(mailgw.imap.server: `_finish`, `error_reply`).
"""
from __future__ import annotations

NOT_AUTHENTICATED, AUTHENTICATED, SELECTED = "not authenticated", "authenticated", "selected"

NO_REPLY = None          # a handler that answered (or will answer) by itself


def OK(text: str, code: bytes | None = None):
    return ("OK", code, text)


class IMAPError(Exception):
    """A tagged NO or BAD with an optional response code (RFC 5530)."""

    def __init__(self, status: str, text: str, code: bytes | None = None):
        super().__init__(text)
        self.status = status
        self.text = text
        self.code = code


def NO(text: str, code: bytes | None = None) -> IMAPError:
    return IMAPError("NO", text, code)


def BAD(text: str) -> IMAPError:
    return IMAPError("BAD", text)


def trap(kind, error: IMAPError):
    """An errback turning one store exception type into a reply."""
    def errback(failure):
        failure.trap(kind)
        raise error
    return errback


# The store's ValueError for data it cannot keep (RFC 5530 LIMIT): more
# keywords than a folder's table holds, a keyword too long, ...
STORE_REFUSED = NO("The mailbox cannot store this (too many or too long keywords?)", b"LIMIT")


def selected_call(d):
    """A call on the selected folder: KeyError means it was deleted or renamed
    (by another session) since SELECT."""
    return d.addErrback(trap(KeyError, NO("The selected mailbox no longer exists", b"NONEXISTENT")))


def gone(failure):
    failure.trap(KeyError)
    return None


OVER_QUOTA_TEXT = "Mailbox is over quota"
