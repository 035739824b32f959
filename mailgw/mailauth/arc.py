"""ARC chain validation (RFC 8617), for the Authentication-Results `arc=` result.

As in dkim_verify: the reactor reads the d=/s= of every ARC-Seal and
ARC-Message-Signature and fetches all their keys through `MailDNS` at once,
within `budget` on the injected clock; then one pool thread runs dkimpy's
`ARC.verify` with a `dnsfunc` that answers from what was fetched.

The result is the chain validation status of RFC 8617 §4.1.3 (none | pass |
fail) with the highest instance seen. There is no temperror among those
states: a key we could not fetch in time makes the chain unvalidated, so
fail, with the reason saying why (RFC 8617 §5.2: the chain is validated, or
it is not). A chain that ended with cv=fail at an earlier hop is fail too.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import dkim
from dkim.util import InvalidTagValueList, parse_tag_value
from twisted.internet import defer

from mailgw.mailauth.dkim_verify import pick_key_record
from mailgw.mailauth.dns import TempDNSError

log = logging.getLogger(__name__)

# RFC 8617 §4.2.1: instances run from 1 to 50.
MAX_INSTANCE = 50

_ARC_HEADERS = (b"arc-seal", b"arc-message-signature", b"arc-authentication-results")
_SIGNED = (b"arc-seal", b"arc-message-signature")
_WSP = re.compile(rb"\s+")
_INSTANCE = re.compile(rb"(?:^|;)\s*i\s*=\s*(\d+)", re.IGNORECASE)


@dataclass(frozen=True)
class ARCResult:
    result: str        # none | pass | fail (RFC 8617 §4.1.3 cv, reported as arc=)
    instance: int      # the highest i= in the message; 0 when there is no ARC set
    reason: str


def _scan(message: bytes) -> tuple[int, list[str]]:
    """(highest instance, key names) of the ARC headers, read on the reactor."""
    headers, _ = dkim.rfc822_parse(message)
    highest = 0
    names: set[str] = set()
    for name, value in headers:
        lower = name.lower()
        if lower not in _ARC_HEADERS:
            continue
        unfolded = _WSP.sub(b" ", value)
        m = _INSTANCE.search(unfolded)
        if m:
            highest = max(highest, int(m.group(1)))
        if lower not in _SIGNED:
            continue
        try:
            tags = parse_tag_value(unfolded)
        except InvalidTagValueList:
            continue                        # dkimpy reports it; nothing to fetch
        d = _WSP.sub(b"", tags.get(b"d", b"")).decode("utf-8", "replace")
        s = _WSP.sub(b"", tags.get(b"s", b"")).decode("utf-8", "replace")
        if d and s:
            names.add(f"{s}._domainkey.{d}".lower())
    return highest, sorted(names)


def _normal(name) -> str:
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    return name.rstrip(".").lower()


def _verify_in_thread(message: bytes, keys: dict[str, bytes], highest: int) -> ARCResult:
    def dnsfunc(name, timeout=5):
        # Only prefetched records: a pool thread never waits on the network.
        return keys.get(_normal(name), b"")

    try:
        cv, results, reason = dkim.ARC(message).verify(dnsfunc=dnsfunc)
    except dkim.DKIMException as e:
        return ARCResult("fail", highest, str(e))
    if cv == dkim.CV_Pass:
        return ARCResult("pass", highest, "")
    if cv == dkim.CV_None:
        return ARCResult("none", 0, reason)
    # cv None from dkimpy: an earlier hop sealed cv=fail, the chain ended there.
    return ARCResult("fail", highest, reason)


def verify_arc(mail_dns, message: bytes, *, run_in_thread, clock, budget: float = 10.0) -> defer.Deferred:
    """Deferred[ARCResult] for a CRLF-form message."""
    try:
        highest, names = _scan(message)
    except dkim.DKIMException as e:
        if b"arc-" not in message.split(b"\r\n\r\n", 1)[0].lower():
            return defer.succeed(ARCResult("none", 0, "no ARC headers"))
        return defer.succeed(ARCResult("fail", 0, f"malformed message: {e}"))
    if highest == 0:
        return defer.succeed(ARCResult("none", 0, "no ARC headers"))
    if highest > MAX_INSTANCE:
        return defer.succeed(ARCResult("fail", highest, f"instance over {MAX_INSTANCE}"))  # RFC 8617 §4.2.1

    lookups = [mail_dns.txt(name, timeout=budget) for name in names]
    fetched = defer.DeferredList(lookups, consumeErrors=True)

    def keys_arrived(answers):
        keys: dict[str, bytes] = {}
        for name, (ok, value) in zip(names, answers):
            if not ok:
                why = value.getErrorMessage() if value.check(TempDNSError) else repr(value.value)
                return ARCResult("fail", highest, f"key lookup failed for now: {why}")
            keys[name] = pick_key_record(value)
        d = run_in_thread(_verify_in_thread, message, keys, highest)

        def crashed(failure):
            log.error("ARC verification crashed",
                      exc_info=(failure.type, failure.value, failure.getTracebackObject()))
            return ARCResult("fail", highest, "internal error")
        return d.addErrback(crashed)

    return fetched.addCallback(keys_arrived)
