"""One error hierarchy, turned into protocol replies in one place per protocol.

A MailError carries the reply code, the RFC 3463 enhanced status code and the
text the client may see. Anything that is not a MailError is a bug or an
environmental failure: the protocol logs it with its traceback and answers
with TEMPORARY_FAILURE, never with the exception text.
"""
from __future__ import annotations


class MailError(Exception):
    def __init__(self, code: int, enhanced: str, text: str):
        super().__init__(f"{code} {enhanced} {text}")
        self.code = code
        self.enhanced = enhanced
        self.text = text

    @property
    def permanent(self) -> bool:
        return self.code >= 500


def log_failure(log, failure, message: str, **fields) -> None:
    """Log a failed operation: a MailError (disk full, a write that failed) is
    expected in operation and gets one line; anything else is a bug or an
    environmental surprise and gets its traceback."""
    if failure.check(MailError):
        log.error(message + " ({error})", error=failure.value, **fields)
    else:
        log.failure(message, failure, **fields)


class TemporaryError(MailError):
    """A 4xx: the client should try again later."""


class PermanentError(MailError):
    """A 5xx: the client must not retry as is."""


class LoginsRefused(TemporaryError):
    """Too many failed logins from this client address: every login from it is
    refused, without checking the password, until the lockout ends."""

    def __init__(self, text: str = "Too many failed logins from your address, try again later"):
        super().__init__(454, "4.7.0", text)


class StorageFull(TemporaryError):
    """The disk is full (ENOSPC/EDQUOT). RFC 3463 §3.4 4.3.1: mail system full."""

    def __init__(self, text: str = "Insufficient system storage"):
        super().__init__(452, "4.3.1", text)


class StorageFailed(TemporaryError):
    """Any other write error. RFC 3463 §3.4 4.3.0."""

    def __init__(self, text: str = "Local error in processing"):
        super().__init__(451, "4.3.0", text)
