"""DKIM verification (RFC 6376, RFC 8463 Ed25519, RFC 8301 key sizes).

The work is split the way the design asks (design.md §5): the reactor parses
the DKIM-Signature fields and asks the DNS for every key at once, through
`MailDNS` and within one time budget on the injected clock; only then does
the thread pool run dkimpy's hashing and RSA/Ed25519 arithmetic, one call
per signature, with a `dnsfunc` that answers from what was fetched and never
touches the network. So a slow DNS never holds a pool thread, and a hanging
one ends at `budget` like every other stage's.

Results use the RFC 8601 §2.7.1 vocabulary (pass | fail | neutral |
temperror | permerror | policy), one `DKIMResult` per signature checked, in
header order; a message without signatures gives [].

Decisions beyond the RFC's letter:

* `l=` (body length) signatures are not verified at all: the result is
  `policy`, "l= not accepted". RFC 6376 §8.2 shows that anything may be
  appended after the signed length (a whole new HTML part, for instance) and
  the signature still passes; we refuse partial-body signatures rather than
  honour them, as RFC 6376 §6.1.1 lets a verifier ignore signatures it does
  not accept. `policy` is RFC 8601's word for exactly that.
* RSA keys under `min_key_bits` (1024, RFC 8301 §3.2) are permerror,
  whether the signature would verify or not.
* Only the first `max_signatures` signatures are checked (RFC 6376 §6.1:
  a verifier may limit how many it tries, against denial of service); the
  rest are left out of the results.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import dkim
from dkim.util import InvalidTagValueList, parse_tag_value
from twisted.internet import defer

from mailgw.mailauth.dns import TempDNSError

log = logging.getLogger(__name__)

_WSP = re.compile(rb"\s+")


@dataclass(frozen=True)
class DKIMResult:
    result: str          # pass | fail | neutral | temperror | permerror | policy (RFC 8601 §2.7.1)
    domain: str          # d=
    selector: str        # s=
    algorithm: str       # a=
    identity: str        # i=, or "@" + d= (RFC 6376 §3.5 default)
    b_prefix: str        # header.b (RFC 6008 §4: enough of b= to tell signatures apart)
    reason: str


@dataclass
class _Signature:
    """One DKIM-Signature header as the reactor saw it."""
    index: int
    tags: dict | None
    domain: str = ""
    selector: str = ""
    algorithm: str = ""
    identity: str = ""
    b_prefix: str = ""
    verdict: tuple[str, str] | None = None     # decided without crypto: (result, reason)

    @property
    def key_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}".lower()

    def result(self, result: str, reason: str) -> DKIMResult:
        return DKIMResult(result, self.domain, self.selector, self.algorithm, self.identity,
                          self.b_prefix, reason)


def _text(value: bytes | None) -> str:
    # Tag values may be folded (RFC 6376 §3.2: FWS around and inside); none of d/s/a/i/b keeps it.
    return _WSP.sub(b"", value or b"").decode("utf-8", "replace")


def _parse_signature(index: int, value: bytes) -> _Signature:
    try:
        tags = parse_tag_value(value)
    except InvalidTagValueList as e:
        sig = _Signature(index, None)
        sig.verdict = ("permerror", f"malformed signature: {e}")
        return sig
    sig = _Signature(index, tags)
    sig.domain = _text(tags.get(b"d")).lower()
    sig.selector = _text(tags.get(b"s"))
    sig.algorithm = _text(tags.get(b"a")).lower()
    sig.identity = _text(tags.get(b"i")) or ("@" + sig.domain if sig.domain else "")
    sig.b_prefix = _text(tags.get(b"b"))[:8]
    try:
        dkim.validate_signature_fields(tags)
    except dkim.ValidationError as e:
        # RFC 6376 §6.1.1: missing or bad tags, i= outside d=, x= past -> PERMFAIL.
        sig.verdict = ("permerror", str(e))
        return sig
    except Exception as e:                  # noqa: BLE001 - dkimpy trips on some odd values (i= == d=)
        sig.verdict = ("permerror", f"malformed signature: {e!r}")
        return sig
    signed = [h.strip().lower() for h in tags[b"h"].split(b":")]
    if b"from" not in signed:
        # RFC 6376 §6.1.1: "h=" without From -> PERMFAIL (From field not signed).
        sig.verdict = ("permerror", "From not signed")
    elif b"l" in tags:
        # RFC 6376 §8.2: content after l= is unsigned; we refuse such signatures.
        sig.verdict = ("policy", "l= not accepted")
    return sig


def _signatures(message: bytes) -> list[_Signature]:
    headers, _ = dkim.rfc822_parse(message)
    return [_parse_signature(i, value)
            for i, (name, value) in enumerate((n, v) for n, v in headers if n.lower() == b"dkim-signature")]


def pick_key_record(records: list[bytes]) -> bytes:
    """RFC 6376 §6.1.2 step 3: with several records the verifier may choose;
    take the first that looks like a key record."""
    for record in records:
        try:
            if b"p" in parse_tag_value(record):
                return record
        except InvalidTagValueList:
            continue
    return records[0] if records else b""


def _key_problem(sig: _Signature, record: bytes, min_key_bits: int) -> str | None:
    """The permerror reason the key record gives, before any crypto, or None."""
    if not record:
        return "no key"                     # RFC 6376 §6.1.2 step 3: PERMFAIL (no key for signature)
    try:
        tags = parse_tag_value(record)
    except InvalidTagValueList as e:
        return f"bad key record: {e}"
    if not _WSP.sub(b"", tags.get(b"p", b"")):
        return "key revoked"                # RFC 6376 §3.6.1: empty p= means the key was revoked
    try:
        _, bits, ktag, _ = dkim.evaluate_pk(sig.key_name.encode(), record)
    except dkim.DKIMException as e:
        return f"bad key record: {e}"
    except Exception as e:                  # noqa: BLE001 - base64/ASN.1 garbage in a public record
        return f"bad key record: {e}"
    if not sig.algorithm.startswith(ktag.decode() + "-"):
        # RFC 6376 §6.1.2 step 6: key unsuitable for a= -> PERMFAIL (inappropriate key algorithm).
        return f"key type {ktag.decode()} does not match a={sig.algorithm}"
    if ktag == b"rsa" and bits < min_key_bits:
        return f"key too small ({bits} bits)"   # RFC 8301 §3.2: verifiers MUST NOT accept < 1024
    return None


def _verify_in_thread(message: bytes, sig: _Signature, record: bytes, min_key_bits: int) -> DKIMResult:
    """Runs in the pool: key checks and dkimpy's verification of one signature."""
    problem = _key_problem(sig, record, min_key_bits)
    if problem:
        return sig.result("permerror", problem)

    def dnsfunc(name, timeout=5):
        # Only the prefetched record: nothing in a pool thread waits on the network.
        return record

    try:
        ok = dkim.DKIM(message, minkey=min_key_bits).verify(idx=sig.index, dnsfunc=dnsfunc)
    except dkim.ValidationError as e:
        if "body hash mismatch" in str(e):
            return sig.result("fail", "body hash mismatch")   # RFC 6376 §6.1.3
        return sig.result("permerror", str(e))
    except dkim.KeyFormatError as e:
        return sig.result("permerror", str(e))
    except dkim.DKIMException as e:
        return sig.result("permerror", str(e))
    if ok:
        return sig.result("pass", "")
    return sig.result("fail", "signature did not verify")     # RFC 6376 §6.1.3


def verify_dkim(mail_dns, message: bytes, *, run_in_thread, clock, budget: float = 10.0,
                min_key_bits: int = 1024, max_signatures: int = 5) -> defer.Deferred:
    """Deferred[list[DKIMResult]]: one result per DKIM-Signature (the first
    `max_signatures`), in header order. `message` is CRLF-form bytes.
    `run_in_thread(f, *args)` -> Deferred runs the crypto off the reactor."""
    try:
        signatures = _signatures(message)
    except dkim.DKIMException as e:
        if b"dkim-signature" not in message.split(b"\r\n\r\n", 1)[0].lower():
            return defer.succeed([])
        # The header section does not parse, so no signature in it can be checked.
        return defer.succeed([DKIMResult("permerror", "", "", "", "", "", f"malformed message: {e}")])
    signatures = signatures[:max_signatures]
    if not signatures:
        return defer.succeed([])

    names = sorted({sig.key_name for sig in signatures if sig.verdict is None})
    # Every key at once, each query ending by `budget` on the injected clock: the stage's deadline.
    lookups = [mail_dns.txt(name, timeout=budget) for name in names]
    fetched = defer.DeferredList(lookups, consumeErrors=True)

    def keys_arrived(answers):
        keys: dict[str, bytes | Exception] = {}
        for name, (ok, value) in zip(names, answers):
            if ok:
                keys[name] = pick_key_record(value)
            else:
                keys[name] = value.value if value.check(TempDNSError) else TempDNSError(
                    f"TXT {name}: {value.getErrorMessage()}")
        checks = [_check(sig, keys) for sig in signatures]
        return defer.gatherResults(checks)

    def _check(sig: _Signature, keys) -> defer.Deferred:
        if sig.verdict is not None:
            return defer.succeed(sig.result(*sig.verdict))
        key = keys[sig.key_name]
        if isinstance(key, Exception):
            # RFC 6376 §6.1.2 step 2: key unavailable for now -> TEMPFAIL.
            return defer.succeed(sig.result("temperror", f"key lookup: {key}"))
        d = run_in_thread(_verify_in_thread, message, sig, key, min_key_bits)

        def crashed(failure):
            log.error("DKIM verification of %s crashed", sig.key_name,
                      exc_info=(failure.type, failure.value, failure.getTracebackObject()))
            return sig.result("temperror", "internal error")
        return d.addErrback(crashed)

    return fetched.addCallback(keys_arrived)
