"""SPF (RFC 7208) for inbound mail: pyspf's evaluation, its DNS through
`MailDNS`, without blocking the reactor and without threads.

pyspf is synchronous: `spf.query.dns()` calls the module-level
`spf.DNSLookup(name, qtype, strict, timeout)` and waits for the answer. We
replay instead of waiting:

1. `install_hook()` replaces `spf.DNSLookup`, once, with a hook. While one of
   our evaluations runs, a `ContextVar` holds its answer table and the hook
   answers from it. When the variable is unset the hook calls the function it
   replaced, with the same arguments, so every other user of pyspf in the
   process (a CLI, a milter, pyspf's own test suite, which swaps
   `spf.DNSLookup` the same way) sees pyspf unchanged.
2. A query missing from the table is recorded and the hook raises `_Miss`.
   `_Miss` derives from BaseException and the driver trusts the record, not
   the exception: pyspf has bare `except:` clauses (around `exp=`) that
   swallow it.
3. The driver runs `spf.query(...).check()` to the end. If anything was
   missed, it fetches every missed query at once through MailDNS, stores the
   answers (or a marker that makes the hook raise `spf.TempError`) and runs
   pyspf again from scratch, until a run misses nothing. Every run starts from
   a fresh `spf.query`, so pyspf's limits (RFC 7208 §4.6.4: 10 lookup terms,
   2 void lookups) count one evaluation, whatever the number of runs.

Rounds are bounded (`MAX_ROUNDS`) and the whole evaluation has a time budget on
the injected clock; when either runs out the result is temperror. Each run is
pure CPU over a table of at most a few dozen answers, cheap enough for the
reactor thread (design.md §5 puts SPF evaluation in the pool; with the DNS
taken out of it there is nothing left worth a thread hop).
"""
from __future__ import annotations

import contextvars
import ipaddress
import re
from dataclasses import dataclass

import spf
from twisted.internet import defer
from twisted.logger import Logger

from mailgw.mailauth.dns import TempDNSError

__all__ = ["SPFResult", "check_spf", "check_helo", "received_spf_header", "install_hook",
           "DEFAULT_BUDGET", "MAX_ROUNDS"]

log = Logger()

# Seconds on the injected clock for one whole evaluation. RFC 7208 §4.6.4 says
# the limit SHOULD allow at least 20 s; 10 s is what the SMTP stage asked for
# (the DATA reply waits on it), callers wanting the RFC's figure pass budget=20.
DEFAULT_BUDGET = 10.0
# An include chain at the 10-lookup limit takes 11 rounds, ten "mx" or "ptr"
# terms about 21 (their addresses come with the MX/PTR answer, see
# _Replay._answered): 40 leaves room for any record pyspf would accept and
# still stops a replay that never settles.
MAX_ROUNDS = 40
MAX_TEXT = 450            # RFC 5321 §4.5.3.1.5: a reply line is at most 512 octets

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
_QTYPES = frozenset({"TXT", "A", "AAAA", "MX", "PTR"})

_CURRENT: contextvars.ContextVar["_Replay | None"] = contextvars.ContextVar("mailgw_spf_replay", default=None)
_LABEL = re.compile(r"^[a-z0-9_-]{1,63}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


@dataclass(frozen=True)
class SPFResult:
    result: str        # pass|fail|softfail|neutral|none|temperror|permerror
    identity: str      # "mailfrom" or "helo"
    domain: str        # the domain whose policy was evaluated (A-labels)
    explanation: str   # RFC 7208 §6.2: the domain's exp= text, for "fail" only; third-party text
    smtp_comment: str  # our own words for logs and replies (errors quote the record's problem)


class _Miss(BaseException):
    """A query this run has no answer for yet. BaseException so that pyspf's
    `except Exception`-style handlers cannot turn it into a result; its bare
    `except:` clauses still catch it, hence the recorded misses."""


class _TempFailure:
    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason


# ---------------------------------------------------------------------------
# The hook

def _make_hook(original):
    def hook(name, qtype, *args, **kwargs):
        replay = _CURRENT.get()
        if replay is None:
            # Not inside one of our evaluations: pyspf as if we were not here.
            return hook.original(name, qtype, *args, **kwargs)
        return replay.lookup(name, qtype)
    hook.original = original
    hook.mailgw_replay = True
    return hook


def install_hook():
    """Put the replay hook in `spf.DNSLookup`; idempotent. If something else
    replaced `spf.DNSLookup` after us, the hook wraps that one in turn, so it
    stays the answer outside our evaluations. Returns the hook."""
    current = spf.DNSLookup
    if getattr(current, "mailgw_replay", False):
        return current
    spf.DNSLookup = _make_hook(current)
    return spf.DNSLookup


# ---------------------------------------------------------------------------
# The replay driver

def _key(name: str, qtype: str) -> tuple[str, str]:
    return (str(name).rstrip(".").lower(), qtype)


def _askable(name: str) -> bool:
    # pyspf's query.dns() answers [] itself for these without asking the DNS.
    return bool(name) and all(0 < len(label) < 64 for label in name.split("."))


class _Replay:
    def __init__(self, mail_dns, clock, budget: float, *, ip: str, sender: str, helo: str,
                 receiver: str, identity: str, local: str, domain: str):
        self.mail_dns = mail_dns
        self.clock = clock
        self.budget = budget
        self.ip, self.sender, self.helo, self.receiver = ip, sender, helo, receiver
        self.identity, self.local, self.domain = identity, local, domain
        address = ipaddress.ip_address(ip)
        if address.version == 6 and address.ipv4_mapped is None:
            self.address_type = "AAAA"
        else:
            self.address_type = "A"        # pyspf checks ::ffff:a.b.c.d as IPv4 too
        # RFC 7208 §7.2: %{t} (exp= text only) is "the current timestamp";
        # the evaluation's start on the injected clock, the same in every run.
        self.timestamp = str(int(clock.seconds()))
        self.answers: dict[tuple[str, str], list | _TempFailure] = {}
        self.misses: list[tuple[str, str]] = []
        self.inflight: dict[tuple[str, str], defer.Deferred] = {}
        self.rounds = 0
        self.done = False
        self._launching = 0
        self.timer = None
        self.result = defer.Deferred(self._cancel)

    # -- called by the hook, inside a run
    def lookup(self, name, qtype):
        key = _key(name, qtype)
        if qtype not in _QTYPES:
            # Type SPF (99) is only asked in pyspf's "harsh" mode, which we do
            # not use; RFC 7208 §3.1 retired it.
            return []
        try:
            value = self.answers[key]
        except KeyError:
            if key not in self.misses:
                self.misses.append(key)
            raise _Miss(key) from None
        if isinstance(value, _TempFailure):
            # RFC 7208 §5: a DNS error while evaluating is temperror.
            raise spf.TempError("DNS " + value.reason)
        # pyspf caches what it gets by the key we return, so the key is the
        # name it asked for. No CNAME entries: MailDNS answers for the name
        # (the resolver follows the chain), and a stale CNAME in pyspf's
        # per-query cache would send it to a name we never fetched.
        return [(key, list(v) if isinstance(v, list) else v) for v in value]

    # -- one synchronous pyspf run
    def _run_once(self):
        self.misses = []
        token = _CURRENT.set(self)
        try:
            if self.identity == "helo":
                # RFC 7208 §2.3: the HELO identity, checked as postmaster@helo.
                query = spf.query(i=self.ip, s="", h=self.domain, receiver=self.receiver,
                                  strict=True, querytime=0)
            else:
                query = spf.query(i=self.ip, s=self.sender, h=self.helo, receiver=self.receiver,
                                  strict=True, querytime=0)
                # pyspf splits at the first "@"; the domain follows the last one.
                query.l, query.o, query.d = self.local, self.domain, self.domain
            query.t = self.timestamp
            try:
                verdict = query.check()
            except _Miss:
                verdict = None
        finally:
            _CURRENT.reset(token)
        return query, verdict

    def start(self) -> defer.Deferred:
        self.timer = self.clock.callLater(self.budget, self._expire)
        self._step()
        return self.result

    def _step(self):
        while not self.done:
            try:
                query, verdict = self._run_once()
            except Exception:  # noqa: BLE001 - a pyspf bug must not lose the message
                log.failure("SPF evaluation of {domain} failed", domain=self.domain)
                self._finish("temperror", "SPF Temporary Error: evaluation failed")
                return
            if not self.misses:
                self._finish_with(query, verdict)
                return
            if self.rounds >= MAX_ROUNDS:
                self._finish("temperror", f"SPF Temporary Error: more than {MAX_ROUNDS} rounds of DNS lookups")
                return
            self.rounds += 1
            self._launching += 1
            try:
                for key in self.misses:
                    self._fetch(key)
            finally:
                self._launching -= 1
            if self.inflight:
                return           # _answered/_failed call _step when the round is complete

    def _fetch(self, key):
        if self.done or key in self.answers or key in self.inflight:
            return
        name, qtype = key
        d = self.mail_dns.query(name, qtype)
        self.inflight[key] = d       # before the callbacks: a fake answers at once
        d.addCallbacks(self._answered, self._failed, callbackArgs=(key,), errbackArgs=(key,))

    def _answered(self, values, key):
        if self.done:
            return None
        self.answers[key] = values
        self.inflight.pop(key, None)
        name, qtype = key
        # pyspf looks up the address of every exchange (RFC 7208 §5.4) and of
        # every PTR name (§5.5) it keeps, one after the other; fetching them
        # with the list saves a round trip each.
        follow = []
        if qtype == "MX" and len(values) <= spf.MAX_MX:
            follow = [host for _, host in sorted(values)[:spf.MAX_MX]]
        elif qtype == "PTR":
            follow = values[:spf.MAX_PTR]
        self._launching += 1
        try:
            for host in follow:
                if _askable(host):
                    self._fetch(_key(host, self.address_type))
        finally:
            self._launching -= 1
        self._round_maybe_complete()
        return None

    def _failed(self, failure, key):
        if self.done:
            return None          # cancelled by _finish/_expire: nothing to report
        if not failure.check(TempDNSError):
            log.failure("SPF: unexpected DNS failure for {key}", failure, key=key)
        self.answers[key] = _TempFailure(failure.getErrorMessage() or failure.type.__name__)
        self.inflight.pop(key, None)
        self._round_maybe_complete()
        return None

    def _round_maybe_complete(self):
        if not self.inflight and not self._launching and not self.done:
            self._step()

    def _expire(self):
        self.timer = None
        # RFC 7208 §4.6.4: the elapsed time of check_host() SHOULD be
        # limited, and exceeding the limit SHOULD give "temperror".
        self._finish("temperror", f"SPF Temporary Error: DNS lookups took longer than {self.budget:g}s")

    def _stop(self):
        self.done = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        pending, self.inflight = list(self.inflight.values()), {}
        for d in pending:
            d.cancel()

    def _cancel(self, _d):
        self._stop()           # the Deferred then fails with CancelledError

    def _finish(self, result: str, comment: str, explanation: str = ""):
        if self.done:
            return
        self._stop()
        self.result.callback(SPFResult(result, self.identity, self.domain, explanation, _clean(comment)))

    def _finish_with(self, query, verdict):
        result, _code, text = verdict
        if result not in RESULTS:                      # "ambiguous" exists only in harsh mode
            result = "permerror"
        explanation = ""
        if result == "fail" and query.exps.get("fail") != query.defexps.get("fail"):
            # RFC 7208 §6.2: exp= explains a fail only; pyspf also lets it
            # replace softfail/permerror texts, which we do not pass on.
            explanation = _clean(text)
        if result in ("temperror", "permerror"):
            comment = text
        elif result == "none":
            comment = "no SPF record"
        else:
            comment = query.defexps.get(result, "")
        self._finish(result, comment, explanation)


def _clean(text) -> str:
    """One printable line: explanations and problems come from the domain's
    DNS and may end up in an SMTP reply, so no CR/LF may survive."""
    text = _CONTROL.sub(" ", str(text or "")).strip()
    text = text.encode("ascii", "replace").decode("ascii")
    return text[:MAX_TEXT]


# ---------------------------------------------------------------------------
# Public API

def _domain(name: str) -> str | None:
    """The A-label form of a domain fit for check_host(), or None.
    RFC 7208 §4.3: a malformed or single-label domain yields "none";
    internationalized names are used as A-labels. An address literal or bare
    address (RFC 7208 §2.3: HELO may be one) is no domain."""
    name = (name or "").strip().rstrip(".").lower()
    if not name or name.startswith("["):
        return None
    try:
        ipaddress.ip_address(name)
        return None
    except ValueError:
        pass
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    labels = name.split(".")
    if len(name) > 253 or len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        return None
    return name


def _none(identity: str, domain: str) -> defer.Deferred:
    # RFC 7208 §4.3: malformed, single-label or no domain at all -> "none".
    return defer.succeed(SPFResult("none", identity, _clean(domain), "", "no valid domain to check"))


def check_helo(mail_dns, *, ip: str, helo: str, receiver: str, clock,
               budget: float = DEFAULT_BUDGET) -> defer.Deferred:
    """RFC 7208 §2.3: the HELO identity alone -> Deferred[SPFResult]."""
    ipaddress.ip_address(ip)                          # ValueError: the caller's bug
    domain = _domain(helo)
    if domain is None:
        return _none("helo", helo or "")
    install_hook()
    return _Replay(mail_dns, clock, budget, ip=ip, sender="", helo=domain, receiver=receiver,
                   identity="helo", local="postmaster", domain=domain).start()


def check_spf(mail_dns, *, ip: str, sender: str, helo: str, receiver: str, clock,
              budget: float = DEFAULT_BUDGET) -> defer.Deferred:
    """check_host() for the identity a message's SPF verdict is about ->
    Deferred[SPFResult]; it has already fired when every answer was at hand.

    RFC 7208 §2.4: the MAIL FROM identity; with a null reverse-path it is
    postmaster@<HELO>, which is the HELO check (identity "helo", as pyspf
    reports it). Failures of the DNS are results (temperror), never errbacks;
    an `ip` that is no address raises ValueError at once."""
    if not sender:
        return check_helo(mail_dns, ip=ip, helo=helo, receiver=receiver, clock=clock, budget=budget)
    ipaddress.ip_address(ip)
    local, at, domain_part = sender.rpartition("@")
    if not at:
        local, domain_part = "postmaster", sender      # as pyspf's split_email
    local = local or "postmaster"                      # RFC 7208 §4.3: no local-part -> "postmaster"
    domain = _domain(domain_part)
    if domain is None:
        return _none("mailfrom", domain_part)
    install_hook()
    return _Replay(mail_dns, clock, budget, ip=ip, sender=sender, helo=helo, receiver=receiver,
                   identity="mailfrom", local=local, domain=domain).start()


def _quote(value: str) -> str:
    # RFC 7208 §9.1: key-value-pair = key [CFWS] "=" ( dot-atom / quoted-string )
    return spf.quote_value(_CONTROL.sub(" ", value))


def _comment(text: str) -> str:
    # RFC 5322 §3.2.2: ctext excludes "(", ")" and "\", which are quoted-pairs.
    text = _CONTROL.sub(" ", text)
    return re.sub(r"([()\\])", r"\\\1", text)


def received_spf_header(result: SPFResult, *, ip: str, helo: str, sender: str, receiver: str) -> str:
    """RFC 7208 §9.1: the `Received-SPF:` field, name included, on one line
    without CRLF (the caller folds it if it must)."""
    address = ipaddress.ip_address(ip)
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    client = str(address)
    who = sender if result.identity == "mailfrom" and sender else result.domain
    texts = {
        "pass": f"domain of {who} designates {client} as permitted sender",
        "fail": f"domain of {who} does not designate {client} as permitted sender",
        "softfail": f"domain of transitioning {who} does not designate {client} as permitted sender",
        "neutral": f"{client} is neither permitted nor denied by domain of {who}",
        "none": f"domain of {who} does not designate permitted sender hosts",
        "temperror": f"error in processing during lookup of {who}",
        "permerror": f"permanent error in processing domain of {who}",
    }
    comment = texts.get(result.result, result.result)
    if receiver:
        comment = f"{receiver}: {comment}"
    pairs = [("client-ip", client)]
    if result.identity == "mailfrom" and sender:
        pairs.append(("envelope-from", _quote(sender)))
    if helo:
        pairs.append(("helo", _quote(helo)))
    if result.result in ("permerror", "temperror") and result.smtp_comment:
        problem = re.sub(r"^SPF (Permanent|Temporary) Error: ", "", result.smtp_comment)
        pairs.append(("problem", _quote(problem)))
    if receiver:
        pairs.append(("receiver", _quote(receiver)))
    pairs.append(("identity", result.identity))
    fields = "; ".join(f"{key}={value}" for key, value in pairs)
    return f"Received-SPF: {result.result} ({_comment(comment)}) {fields}"
