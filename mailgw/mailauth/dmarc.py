"""DMARC (RFC 7489): policy discovery, identifier alignment, policy with pct.

`evaluate_dmarc` takes what the SPF and DKIM stages found and the one
RFC5322.From domain, asks the DNS for the policy (on the reactor, within
`budget` on the injected clock) and says what to do. Deciding that there is
exactly one From domain (RFC 7489 §6.6.1) is the caller's: it has
`header_from_domains` for that and passes None when there is not one.

Organizational domains come from the Public Suffix List (RFC 7489 §3.2) of
the `publicsuffixlist` package, which each release ships with a current
list: keeping the package current keeps the list current. Where Debian's
`publicsuffix` package has a newer list in /usr/share/publicsuffix, that one
is used instead. The list is parsed once per process, at first use (some
tens of milliseconds); call `organizational_domain` at start-up to pay that
before the first message.
"""
from __future__ import annotations

import email
import email.policy
import email.utils
import os
import random as _random
import re
import threading
import time
from dataclasses import dataclass

from publicsuffixlist import PSLFILE, PublicSuffixList
from twisted.internet import defer
from twisted.python.failure import Failure

from mailgw.mailauth.dns import TempDNSError

SYSTEM_PSL = "/usr/share/publicsuffix/public_suffix_list.dat"

_psl: PublicSuffixList | None = None
_psl_lock = threading.Lock()
_VERSION = re.compile(rb"^// VERSION: (\d{4})-(\d{2})-(\d{2})", re.MULTILINE)


def _list_date(path: str) -> float:
    """When a PSL file was cut: its "// VERSION:" line when it has one (the
    upstream list does since 2023), else the file's mtime."""
    with open(path, "rb") as f:
        head = f.read(4096)
    m = _VERSION.search(head)
    if m:
        return time.mktime((int(m.group(1)), int(m.group(2)), int(m.group(3)), 0, 0, 0, 0, 0, 0))
    return os.stat(path).st_mtime


def psl_path(system: str = SYSTEM_PSL, bundled: str = PSLFILE) -> str:
    """The newer of Debian's list and the package's own."""
    try:
        if _list_date(system) > _list_date(bundled):
            return system
    except OSError:
        pass
    return bundled


def _get_psl() -> PublicSuffixList:
    global _psl
    if _psl is None:
        with _psl_lock:
            if _psl is None:
                with open(psl_path(), "rb") as source:
                    _psl = PublicSuffixList(source)
    return _psl


def _clean(domain: str) -> str:
    return domain.strip().rstrip(".").lower()


def organizational_domain(domain: str) -> str:
    """RFC 7489 §3.2: the public suffix that matches most labels, plus one
    label. A name that is itself a public suffix is its own."""
    domain = _clean(domain)
    return _get_psl().privatesuffix(domain) or domain


# --- the record ---------------------------------------------------------------------

POLICIES = ("none", "quarantine", "reject")


@dataclass(frozen=True)
class DMARCRecord:
    p: str                   # none | quarantine | reject
    sp: str | None           # for subdomains, when given (RFC 7489 §6.3)
    pct: int                 # 0-100
    adkim: str               # r | s
    aspf: str                # r | s
    rua: str | None
    ruf: str | None


def _tags(text: str) -> list[tuple[str, str]]:
    tags = []
    for part in text.split(";"):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        if not sep:
            return []               # not a tag-list at all
        tags.append((name.strip(), value.strip()))
    return tags


def _has_valid_uri(value: str | None) -> bool:
    # RFC 7489 §6.4: dmarc-uri is a URI with an optional "!size".
    return bool(value) and any(re.match(r"[A-Za-z][A-Za-z0-9+.-]*:\S+", u.strip()) for u in value.split(","))


def parse_record(text) -> DMARCRecord | None:
    """A DMARC TXT record, or None when it is not one (or, RFC 7489 §6.6.3
    step 6, has no valid p= and no reporting address to honour)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    tags = _tags(text)
    # RFC 7489 §6.4: v=DMARC1 first, its value case-sensitive.
    if not tags or tags[0] != ("v", "DMARC1"):
        return None
    values: dict[str, str] = {}
    for name, value in tags[1:]:
        values.setdefault(name.lower(), value)      # first wins; unknown tags are ignored (§6.3)
    p = values.get("p", "").lower()
    sp = values.get("sp", "").lower() if "sp" in values else None
    rua, ruf = values.get("rua"), values.get("ruf")
    if p not in POLICIES or (sp is not None and sp not in POLICIES):
        # RFC 7489 §6.6.3 step 6: act as p=none when rua= can take reports, else no DMARC at all.
        if not _has_valid_uri(rua):
            return None
        p, sp = "none", None
    try:
        pct = int(values.get("pct", "100"))
    except ValueError:
        pct = 100
    if not 0 <= pct <= 100:
        pct = 100                                    # §6.3: 0-100; anything else is no usable value
    adkim = values.get("adkim", "r").lower()
    aspf = values.get("aspf", "r").lower()
    return DMARCRecord(p=p, sp=sp, pct=pct, adkim=adkim if adkim in ("r", "s") else "r",
                       aspf=aspf if aspf in ("r", "s") else "r", rua=rua, ruf=ruf)


# --- evaluation -----------------------------------------------------------------------

@dataclass(frozen=True)
class DMARCResult:
    result: str              # pass | fail | none | temperror | permerror
    policy: str              # the requested p= (or sp=): none | quarantine | reject
    disposition: str         # what to apply after pct sampling: none | quarantine | reject
    domain: str | None       # RFC5322.From domain
    policy_domain: str | None  # where the record was found
    spf_aligned: bool
    dkim_aligned: bool
    reason: str


def aligned(a: str, b: str, mode: str) -> bool:
    """RFC 7489 §3.1: strict is the same name, relaxed the same
    Organizational Domain."""
    a, b = _clean(a), _clean(b)
    if not a or not b:
        return False
    if mode == "s":
        return a == b
    return a == b or organizational_domain(a) == organizational_domain(b)


def _dmarc_records(answers: list[bytes]) -> list[bytes]:
    # RFC 7489 §6.6.3 steps 2 and 4: only records starting with v=DMARC1 count.
    return [r for r in answers if re.match(rb"v\s*=\s*DMARC1\s*(;|$)", r.strip())]


def evaluate_dmarc(mail_dns, *, from_domain: str | None, spf_result: str, spf_domain: str,
                   dkim_results: list, clock, budget: float = 10.0,
                   random=_random.random) -> defer.Deferred:
    """Deferred[DMARCResult]. `dkim_results` are DKIMResult-like (`result`,
    `domain`); `spf_domain` is the domain SPF checked (RFC 7489 §3.1.2:
    MAIL FROM, or HELO for a null sender). `random()` in [0, 1) samples pct."""
    if from_domain is None:
        # RFC 7489 §6.6.1: no single author domain to check; the caller rejects or not.
        return defer.succeed(DMARCResult("permerror", "none", "none", None, None, False, False,
                                         "no single RFC5322.From domain"))
    domain = _clean(from_domain)

    def alignment(record: DMARCRecord | None) -> tuple[bool, bool]:
        adkim = record.adkim if record else "r"
        aspf = record.aspf if record else "r"
        dkim_ok = any(r.result == "pass" and aligned(r.domain, domain, adkim) for r in dkim_results)
        spf_ok = spf_result == "pass" and aligned(spf_domain or "", domain, aspf)
        return spf_ok, dkim_ok

    def nothing(reason: str, result: str = "none") -> DMARCResult:
        spf_ok, dkim_ok = alignment(None)
        return DMARCResult(result, "none", "none", domain, None, spf_ok, dkim_ok, reason)

    def decide(found) -> DMARCResult:
        records, where = found
        if not records:
            return nothing("no DMARC record")
        if len(records) > 1:
            # RFC 7489 §6.6.3 step 5: several records -> DMARC is not applied.
            return nothing(f"{len(records)} DMARC records at _dmarc.{where}")
        record = parse_record(records[0])
        if record is None:
            return nothing(f"unusable DMARC record at _dmarc.{where}")
        # RFC 7489 §6.3: sp= is for subdomains, so only a record found at the Organizational Domain.
        policy = record.sp if (where != domain and record.sp) else record.p
        spf_ok, dkim_ok = alignment(record)
        if spf_ok or dkim_ok:
            # RFC 7489 §4.2: either aligned pass is a DMARC pass.
            return DMARCResult("pass", policy, "none", domain, where, spf_ok, dkim_ok, "")
        disposition = policy
        if policy != "none" and record.pct < 100 and not (random() * 100 < record.pct):
            # RFC 7489 §6.6.4: not sampled, apply the next policy down.
            disposition = "quarantine" if policy == "reject" else "none"
        reason = "no aligned SPF or DKIM pass"
        if disposition != policy:
            reason += f"; not sampled at pct={record.pct}"
        return DMARCResult("fail", policy, disposition, domain, where, False, False, reason)

    def at(name: str) -> defer.Deferred:
        d = mail_dns.txt(f"_dmarc.{name}", timeout=budget)
        return d.addCallback(lambda answers: (_dmarc_records(answers), name))

    def fallback(found):
        records, _ = found
        org = organizational_domain(domain)
        if records or org == domain:
            return found
        # RFC 7489 §6.6.3 step 3: none at the From domain, ask its Organizational Domain.
        return at(org)

    def temp(failure):
        failure.trap(TempDNSError)
        return nothing(f"DNS: {failure.getErrorMessage()}", "temperror")

    # One budget for the whole discovery: a first answer late in it leaves the second less.
    d = at(domain).addCallback(fallback)
    d.addTimeout(budget, clock,
                 onTimeoutCancel=lambda *_: Failure(TempDNSError("DMARC policy discovery timed out")))
    return d.addCallbacks(decide, temp)


# --- the From header ------------------------------------------------------------------

def _header_section(message: bytes) -> bytes:
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[:end + 2]


def header_from_domains(message: bytes) -> list[str]:
    """The domain of every address in every From: header, in order, lower
    case; "" for an address without one. For the caller's RFC 7489 §6.6.1
    checks: exactly one entry that is not "" is the normal case."""
    headers = email.message_from_bytes(_header_section(message) + b"\r\n", policy=email.policy.default)
    domains: list[str] = []
    for value in headers.get_all("From") or []:
        try:
            addresses = [a.domain for a in value.addresses]
        except Exception:              # noqa: BLE001 - a header the parser gives up on: read it plainly
            addresses = [addr.rpartition("@")[2] if "@" in addr else ""
                         for _, addr in email.utils.getaddresses([str(value)])]
        domains.extend(_clean(d) for d in addresses)
    return domains
