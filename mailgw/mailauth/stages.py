"""The checks and modifiers stages: what happens to a message between the
end of DATA (or a local submission) and its targets (routing.dispatch).

The order is fixed, here and nowhere else (docs/authentication.md):

    checks     (inbound: untrusted clients on the relay role only)
      1. SPF of MAIL FROM and of HELO     }  in parallel, each within the
      2. DKIM, every signature            }  [checks] budget
      3. ARC chain                        }
      4. DMARC of the From: domain, from 1 and 2
      -> verdict: reject (550 5.7.1), defer (451 4.7.x, on_temperror =
         "defer"), quarantine (local targets go to the Junk folder), accept
      5. rspamd ([spam] rspamd_url; inbound, and submissions with
         scan_outbound), told the results of 1-4 (mailgw/spam/rspamd.py)
      -> verdict: reject (554 5.7.1), soft reject or greylist (451 4.7.1),
         spam (local targets go to the Junk folder), accept; rspamd
         unavailable: accept unscanned or 451 4.7.1 ([spam] on_failure)
    modifiers
      6. Authentication-Results that claim our authserv-id removed (RFC 8601
         §5), on every path: no client can hand our users a forged verdict;
         on scanned mail, X-Spam-* headers from outside removed too
      7. our Authentication-Results (and Received-SPF) and X-Spam-* added
         right under our Received: (the order Postfix + a milter gives), the
         Subject: tagged for spam ([spam] subject_tag, rspamd's rewrite)
      8. Date: and Message-ID: added to submissions that lack them
         (RFC 6409 §8.2, §8.3)
      9. DKIM signatures (outbound), last: they cover the header as it leaves

The server has already put its Received: on top before this stage, so the
checks see the message as the recipient will, minus steps 5-8. The
verification and signing CPU work runs in the thread pool
(`run_in_thread`); DNS runs on the reactor through the one MailDNS.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.header import Header
from email.utils import format_datetime

from twisted.internet import defer
from twisted.logger import Logger

# Imported here, not where they are used: the server may drop privileges after
# start-up and then no longer be able to read the libraries' files.
from mailgw.errors import MailError, PermanentError
from mailgw.mailauth import arc, dkim_verify, dmarc, spf
from mailgw.mailauth.dkim_sign import DKIMSigner, header_from_domain
from mailgw.mailauth.keys import DKIMKeyStore
from mailgw.smtp import codes
from mailgw.spam import rspamd as rspamd_module
from mailgw.spam.rspamd import RspamdUnavailable, ScanEnvelope

log = Logger()

# What a message may be, for this stage.
INBOUND = "inbound"           # port 25 from an untrusted, unauthenticated client: checked
SUBMISSION = "submission"     # authenticated, or `mailgw sendmail`: signed, Date/Message-ID added
TRUSTED_RELAY = "trusted"     # a trusted network on the relay role: signed when the From: domain is ours


@dataclass(frozen=True)
class Origin:
    """Who handed us the message, as far as this stage cares."""
    kind: str                         # INBOUND | SUBMISSION | TRUSTED_RELAY
    client_ip: str
    helo: str | None
    sender: str                       # MAIL FROM, "" for <>
    user: str | None = None
    client_name: str | None = None    # forward-confirmed reverse DNS, when known


@dataclass
class Outcome:
    """The stage's result: the message to store and send, and where local copies go."""
    message: bytes
    quarantine_folder: str | None = None     # local targets go here instead of their folder
    results: dict = field(default_factory=dict)   # method -> result text, for logs and tests
    scan: object = None                      # rspamd's Scan, when the message was scanned
    scanned: bool = False                    # rspamd was asked (even if it failed)


def split_header(message: bytes, newline: bytes) -> tuple[bytes, bytes]:
    """(header block incl. its last newline, the rest from the empty line on)."""
    if message.startswith(newline):
        return b"", message
    end = message.find(newline + newline)
    if end < 0:
        return message if message.endswith(newline) else message + newline, b""
    return message[:end + len(newline)], message[end + len(newline):]


def header_fields(head: bytes, newline: bytes) -> list[bytes]:
    """The header block as whole fields (continuation lines kept with their field)."""
    fields: list[bytes] = []
    for line in head.split(newline)[:-1] if head else ():
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += newline + line
        else:
            fields.append(line)
    return fields


_AR_ID = re.compile(rb"^authentication-results\s*:\s*(?:\([^)]*\)\s*)*([^\s;()]+)", re.IGNORECASE)


def strip_our_results(message: bytes, newline: bytes, authserv_id: str) -> tuple[bytes, int]:
    """RFC 8601 §5: remove every Authentication-Results whose authserv-id is
    ours (case-insensitive), wherever it is in the header. (message, removed)."""
    head, rest = split_header(message, newline)
    if b"uthentication-" not in head and b"UTHENTICATION-" not in head:
        return message, 0
    ours = authserv_id.lower().encode("ascii", "replace")
    kept, removed = [], 0
    for field_bytes in header_fields(head, newline):
        unfolded = field_bytes.replace(newline, b" ")
        match = _AR_ID.match(unfolded)
        if match and match.group(1).lower() == ours:
            removed += 1
            continue
        kept.append(field_bytes)
    if not removed:
        return message, 0
    return b"".join(f + newline for f in kept) + rest, removed


# Spam verdicts a filter writes: X-Spam-*, X-Spamd-* (SpamAssassin, rspamd's
# milter headers) and X-Rspamd-*. On scanned mail only ours may be there.
_SPAM_HEADER = re.compile(rb"^(?:x-spam[a-z0-9-]*|x-rspamd-[a-z0-9-]*)\s*:", re.IGNORECASE)


def strip_spam_headers(message: bytes, newline: bytes) -> tuple[bytes, int]:
    """Remove every X-Spam*/X-Rspamd-* field from the header. (message, removed)."""
    head, rest = split_header(message, newline)
    lowered = head.lower()
    if b"x-spam" not in lowered and b"x-rspamd-" not in lowered:
        return message, 0
    fields = header_fields(head, newline)
    kept = [f for f in fields if not _SPAM_HEADER.match(f)]
    if len(kept) == len(fields):
        return message, 0
    return b"".join(f + newline for f in kept) + rest, len(fields) - len(kept)


def spam_headers(scan, newline: bytes) -> bytes:
    """Our X-Spam-* fields for rspamd's `scan` (the SpamAssassin names that
    Sieve scripts and mail clients filter on)."""
    spam = scan.is_spam or scan.action in (rspamd_module.REJECT, rspamd_module.SOFT_REJECT)
    lines = []
    if spam:
        lines.append(b"X-Spam-Flag: YES")
    lines.append(b"X-Spam-Score: %.2f / %.2f" % (scan.score, scan.required_score))
    lines.append(b"X-Spam-Action: " + scan.action.encode("ascii"))
    tests = [f"{name}({score:.2f})" for name, score in scan.symbols if _DOT_ATOM.match(name)]
    status = f"X-Spam-Status: {'Yes' if spam else 'No'}, score={scan.score:.2f} required={scan.required_score:.2f}"
    if tests:
        # RFC 5322 §2.2.3: folded after the commas, each line well under 78 characters.
        folded = [f"tests={tests[0]}"]
        for item in tests[1:]:
            if len(folded[-1]) + len(item) > 70:
                folded[-1] += ","
                folded.append(item)
            else:
                folded[-1] += f", {item}"
        status += "".join("\n\t" + line for line in folded)
    lines.append(status.encode("ascii").replace(b"\n", newline))
    return b"".join(line + newline for line in lines)


def tag_subject(message: bytes, newline: bytes, scan, tag: str) -> bytes:
    """Spam's Subject: with [spam] subject_tag in front, or (no tag) rspamd's
    rewritten subject for "rewrite subject"; unchanged otherwise."""
    if tag:
        new_value = None
    elif scan.action == rspamd_module.REWRITE_SUBJECT and scan.subject:
        new_value = scan.subject
    else:
        return message
    head, rest = split_header(message, newline)
    fields = header_fields(head, newline)
    for index, field_bytes in enumerate(fields):
        if field_bytes[:8].lower() == b"subject:":
            if new_value is None:
                value = field_bytes[8:].lstrip(b" \t")
                if value.startswith(tag.encode("utf-8")):
                    return message
                fields[index] = b"Subject: " + tag.encode("utf-8") + value
            else:
                fields[index] = b"Subject: " + _encoded_word(new_value)
            break
    else:
        fields.append(b"Subject: " + (tag.rstrip().encode("utf-8") if new_value is None
                                      else _encoded_word(new_value)))
    return b"".join(f + newline for f in fields) + rest


def _encoded_word(text: str) -> bytes:
    # RFC 2047 §2: a non-ASCII subject as encoded-words.
    text = text.replace("\r", " ").replace("\n", " ")
    if text.isascii():
        return text.encode("ascii")
    return Header(text, "utf-8").encode().encode("ascii")


_COMMENT_UNSAFE = re.compile(r"[^\x20-\x7e]|[()\\]")
_DOT_ATOM = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+$")


def _comment(text: str) -> str:
    text = _COMMENT_UNSAFE.sub("?", text or "").strip()[:120]
    return f" ({text})" if text else ""


def _mailfrom_value(sender: str) -> str:
    """RFC 8601 §2.3 pvalue: the address when its local part is a dot-atom, else the domain."""
    local, _, domain = sender.rpartition("@")
    if local and _DOT_ATOM.match(local) and _DOT_ATOM.match(domain):
        return sender
    return domain if _DOT_ATOM.match(domain) else "unknown"


def _token(text: str) -> str:
    return text if text and _DOT_ATOM.match(text) else "unknown"


class AuthenticationStage:
    """Checks and modifiers for one process (see the module docstring).

    `checks` is the [checks] config (None: no inbound checks), `signer` a
    DKIMSigner (None: no signing), `mail_dns` the MailDNS, `run_in_thread`
    `f, *args -> Deferred` (the thread pool; tests run it inline)."""

    def __init__(self, *, checks, add_missing_headers: bool, signer, mail_dns, run_in_thread, clock,
                 hostname: str, is_local_domain, random=None, spam=None, rspamd=None):
        self.checks = checks
        self.spam = spam                    # [spam] config, or None
        self.rspamd = rspamd                # RspamdClient, or None: no scanning
        self.unscanned = 0                  # messages accepted because rspamd failed (on_failure = accept)
        self.add_missing_headers = add_missing_headers
        self.signer = signer
        self.mail_dns = mail_dns
        self.run_in_thread = run_in_thread
        self.clock = clock
        self.hostname = hostname
        self.is_local_domain = is_local_domain
        self.random = random

    # -- the stage -------------------------------------------------------
    def process(self, message: bytes, *, lf: bool, origin: Origin, queue_id: str,
                recipients: tuple[str, ...] = ()) -> defer.Deferred:
        """Deferred[Outcome]; fails with MailError when the message is refused."""
        if origin.kind == INBOUND and self.checks is not None and self.mail_dns is not None:
            d = self._check(message, lf=lf, origin=origin)
        else:
            d = defer.succeed(None)
        if self._scans(origin):
            d.addCallback(self._scan, message, lf=lf, origin=origin, queue_id=queue_id, recipients=recipients)
        else:
            d.addCallback(lambda found: (found, None))
        d.addCallback(self._modify, message, lf=lf, origin=origin, queue_id=queue_id)
        return d

    # -- rspamd ------------------------------------------------------------
    def _scans(self, origin: Origin) -> bool:
        if self.rspamd is None or not self.spam.rspamd_url:
            return False
        if origin.kind == INBOUND:
            return True
        # Our own notices (DSNs) and `mailgw sendmail` have no user: not scanned.
        return origin.kind == SUBMISSION and origin.user is not None and self.spam.scan_outbound

    def _scan(self, found, message: bytes, *, lf: bool, origin: Origin, queue_id: str, recipients):
        """(found, Scan | None | RspamdUnavailable): rspamd's view, with the checks' results."""
        if len(message) > self.spam.max_scan_size:
            log.info("{queue_id}: not scanned: {size} bytes is over [spam] max_scan_size",
                     queue_id=queue_id, size=len(message))
            return (found, None)
        results = {}
        if found is not None:
            spf_result = found.get("spf")
            dmarc_result = found.get("dmarc")
            results = dict(
                spf=spf_result.result if spf_result is not None else None,
                dkim=tuple((r.result, r.domain) for r in found["dkim"]) if found.get("dkim") is not None else None,
                dmarc=dmarc_result.result if dmarc_result is not None else None)
        envelope = ScanEnvelope(sender=origin.sender, recipients=tuple(recipients), client_ip=origin.client_ip,
                                helo=origin.helo, client_name=origin.client_name, user=origin.user,
                                queue_id=queue_id, **results)
        crlf = message.replace(b"\n", b"\r\n") if lf else message
        def unavailable(failure):
            failure.trap(RspamdUnavailable)
            return failure.value            # judged with the rest in _spam_verdict
        d = self.rspamd.check(crlf, envelope)
        d.addErrback(unavailable)
        return d.addCallback(lambda scan: (found, scan))

    def _spam_verdict(self, scan, outcome: Outcome, queue_id: str) -> None:
        spam = self.spam
        outcome.scanned = True
        if isinstance(scan, RspamdUnavailable):
            if spam.on_failure == "defer":
                log.warn("{queue_id}: rspamd unavailable ({why}): deferred", queue_id=queue_id, why=scan)
                raise MailError(*codes.SPAM_FILTER_UNAVAILABLE)
            self.unscanned += 1
            log.warn("{queue_id}: rspamd unavailable ({why}): accepted unscanned", queue_id=queue_id, why=scan)
            return
        outcome.scan = scan
        outcome.results["spam"] = scan.action
        log.info("{queue_id}: rspamd action={action} score={score:.2f}/{required:.2f} symbols={symbols}",
                 queue_id=queue_id, action=scan.action, score=scan.score, required=scan.required_score,
                 symbols=",".join(name for name, _ in scan.symbols[:12]))
        if scan.action == rspamd_module.REJECT:
            reply = codes.SPAM_REJECT.with_text(scan.reply_text) if scan.reply_text else codes.SPAM_REJECT
            raise PermanentError(*reply)
        if scan.action == rspamd_module.SOFT_REJECT:
            raise MailError(*(codes.SPAM_SOFT_REJECT.with_text(scan.reply_text) if scan.reply_text
                              else codes.SPAM_SOFT_REJECT))
        if scan.action == rspamd_module.GREYLIST:
            raise MailError(*codes.GREYLISTED)
        if scan.is_spam:
            outcome.quarantine_folder = spam.junk_folder

    # -- checks ------------------------------------------------------------
    def _check(self, message: bytes, *, lf: bool, origin: Origin) -> defer.Deferred:
        checks = self.checks
        crlf = message.replace(b"\n", b"\r\n") if lf else message
        budget = checks.budget
        # One budget for all checks of the message: DMARC, which needs the
        # SPF and DKIM results, gets what is left of it.
        deadline = self.clock.seconds() + budget
        common = dict(clock=self.clock, budget=budget)
        helo = origin.helo or ""
        started = {}
        if checks.spf or checks.dmarc:
            started["spf"] = spf.check_spf(self.mail_dns, ip=origin.client_ip, sender=origin.sender, helo=helo,
                                           receiver=checks.authserv_id, **common)
            if origin.sender:
                started["spf_helo"] = spf.check_helo(self.mail_dns, ip=origin.client_ip, helo=helo,
                                                     receiver=checks.authserv_id, **common)
        if checks.dkim or checks.dmarc:
            started["dkim"] = dkim_verify.verify_dkim(self.mail_dns, crlf, run_in_thread=self.run_in_thread,
                                                      min_key_bits=checks.min_key_bits, **common)
        if checks.arc:
            started["arc"] = arc.verify_arc(self.mail_dns, crlf, run_in_thread=self.run_in_thread, **common)
        names = list(started)
        gathered = defer.DeferredList([self._bounded(started[name], budget) for name in names],
                                      consumeErrors=True)

        def got(results):
            found = {}
            for name, (ok, value) in zip(names, results):
                if ok:
                    found[name] = value
                else:
                    log.failure("{check} check failed", value, check=name)
                    found[name] = None          # recorded as temperror
            if not checks.dmarc:
                return found
            spf_result = found.get("spf")
            from_domains = dmarc.header_from_domains(crlf)
            # RFC 7489 §6.6.1: exactly one author domain, or no DMARC verdict.
            from_domain = from_domains[0] if len(set(from_domains)) == 1 and from_domains[0] else None
            spf_domain = (origin.sender.rpartition("@")[2] if origin.sender else helo).lower()
            left = max(0.1, deadline - self.clock.seconds())
            d = dmarc.evaluate_dmarc(self.mail_dns, from_domain=from_domain,
                                     spf_result=spf_result.result if spf_result else "temperror",
                                     spf_domain=spf_domain, dkim_results=found.get("dkim") or [],
                                     clock=self.clock, budget=left,
                                     **({"random": self.random} if self.random else {}))
            d = self._bounded(d, left)

            def with_dmarc(result):
                found["dmarc"] = result
                found["from_domain"] = from_domain or (from_domains[0] if from_domains else None)
                return found

            def dmarc_failed(failure):
                log.failure("DMARC check failed", failure)
                found["dmarc"] = None
                return found
            return d.addCallbacks(with_dmarc, dmarc_failed)
        return gathered.addCallback(got)

    def _bounded(self, d: defer.Deferred, budget: float) -> defer.Deferred:
        # Each check has its own budget; this is the stage's guarantee that
        # a check that forgets its own cannot hold the session.
        return d.addTimeout(budget + 1.0, self.clock)

    # -- verdict and modifiers ----------------------------------------------
    def _modify(self, checked, message: bytes, *, lf: bool, origin: Origin, queue_id: str) -> Outcome:
        found, scan = checked
        newline = b"\n" if lf else b"\r\n"
        outcome = Outcome(message)
        checks = self.checks
        if found is not None:
            self._verdict(found, outcome, queue_id)
        if scan is not None:
            self._spam_verdict(scan, outcome, queue_id)
        if checks is not None:
            message, removed = strip_our_results(message, newline, checks.authserv_id)
            if removed:
                log.info("{queue_id}: removed {count} Authentication-Results claiming {id}",
                         queue_id=queue_id, count=removed, id=checks.authserv_id)
        trace = b""
        if found is not None:
            trace = self._results_header(found, origin).encode("utf-8").replace(b"\r\n", newline) + newline
        if outcome.scanned:
            # A verdict a client wrote itself must never reach a user's filter.
            message, _ = strip_spam_headers(message, newline)
            if outcome.scan is not None:
                trace += spam_headers(outcome.scan, newline)
                if outcome.scan.is_spam:
                    message = tag_subject(message, newline, outcome.scan, self.spam.subject_tag)
        if trace:
            message = _below_our_received(message, newline, trace)
        if origin.kind == SUBMISSION and self.add_missing_headers:
            message = self._add_missing(message, newline, queue_id)
        outcome.message = message
        if self.signer is None or origin.kind == INBOUND:
            return outcome
        return self._sign(outcome, lf=lf, origin=origin)

    def _verdict(self, found: dict, outcome: Outcome, queue_id: str) -> None:
        checks = self.checks
        dmarc_result = found.get("dmarc")
        spf_result = found.get("spf")
        outcome.results = {
            "spf": spf_result.result if spf_result else "temperror",
            "dkim": ",".join(r.result for r in found.get("dkim") or ()) or "none",
            "dmarc": dmarc_result.result if dmarc_result else ("temperror" if checks.dmarc else "none"),
            "arc": found["arc"].result if found.get("arc") else ("temperror" if checks.arc else "none"),
        }
        log.info("{queue_id}: spf={spf} dkim={dkim} dmarc={dmarc} arc={arc}", queue_id=queue_id,
                 **outcome.results)
        if dmarc_result is not None and dmarc_result.result == "fail" and checks.dmarc_enforce:
            if dmarc_result.disposition == "reject":
                text = codes.DMARC_REJECT.text.format(domain=dmarc_result.domain)
                raise PermanentError(codes.DMARC_REJECT.code, codes.DMARC_REJECT.enhanced, text)
            if dmarc_result.disposition == "quarantine":
                outcome.quarantine_folder = checks.quarantine_folder
        if checks.on_temperror == "defer":
            if checks.spf and outcome.results["spf"] == "temperror":
                raise MailError(*codes.SPF_TEMPERROR)
            if "temperror" in (outcome.results["dmarc"],) or "temperror" in outcome.results["dkim"].split(","):
                raise MailError(*codes.AUTH_CHECK_TEMPERROR)

    def _results_header(self, found: dict, origin: Origin) -> str:
        """RFC 8601 §2.2 Authentication-Results, one method result per line."""
        checks = self.checks
        parts = []
        spf_result = found.get("spf")
        if checks.spf:
            if spf_result is None:
                parts.append("spf=temperror (check did not finish)")
            elif spf_result.identity == "helo" or not origin.sender:
                parts.append(f"spf={spf_result.result}{_comment(spf_result.smtp_comment)} "
                             f"smtp.helo={_token(origin.helo or '')}")
            else:
                parts.append(f"spf={spf_result.result}{_comment(spf_result.smtp_comment)} "
                             f"smtp.mailfrom={_mailfrom_value(origin.sender)}")
            helo_result = found.get("spf_helo")
            if helo_result is not None and helo_result.result != "none":
                parts.append(f"spf={helo_result.result} smtp.helo={_token(origin.helo or '')}")
        if checks.dkim:
            dkim_results = found.get("dkim")
            if dkim_results is None:
                parts.append("dkim=temperror (check did not finish)")
            elif not dkim_results:
                parts.append("dkim=none")
            for result in dkim_results or ():
                # RFC 6008 §4: header.b tells two signatures of one domain apart.
                parts.append(f"dkim={result.result}{_comment(result.reason)} header.d={_token(result.domain)} "
                             f"header.s={_token(result.selector)} header.a={_token(result.algorithm)} "
                             f"header.b={_b_prefix(result.b_prefix)}")
        if checks.dmarc:
            dmarc_result = found.get("dmarc")
            if dmarc_result is None:
                parts.append("dmarc=temperror (check did not finish)")
            else:
                detail = f"p={dmarc_result.policy} dis={dmarc_result.disposition}"
                if dmarc_result.reason and dmarc_result.result != "pass":
                    detail += f"; {dmarc_result.reason}"
                from_domain = found.get("from_domain") or dmarc_result.domain or ""
                parts.append(f"dmarc={dmarc_result.result}{_comment(detail)} header.from={_token(from_domain)}")
        if checks.arc:
            arc_result = found.get("arc")
            if arc_result is None:
                parts.append("arc=temperror (check did not finish)")
            else:
                parts.append(f"arc={arc_result.result}{_comment(arc_result.reason)}")
        header = f"Authentication-Results: {checks.authserv_id};" + ";".join(f"\r\n\t{p}" for p in parts)
        if not parts:
            header += " none"
        if checks.received_spf and spf_result is not None:
            header += "\r\n" + spf.received_spf_header(spf_result, ip=origin.client_ip, helo=origin.helo or "",
                                                   sender=origin.sender, receiver=checks.authserv_id)
        return header

    def _add_missing(self, message: bytes, newline: bytes, queue_id: str) -> bytes:
        head, rest = split_header(message, newline)
        names = {f.split(b":", 1)[0].strip().lower() for f in header_fields(head, newline)}
        added = b""
        if b"date" not in names:
            # RFC 6409 §8.2: the MSA may add Date: when the client left it out.
            now = datetime.fromtimestamp(int(self.clock.seconds()), timezone.utc)
            added += b"Date: " + format_datetime(now).encode("ascii") + newline
        if b"message-id" not in names:
            # RFC 6409 §8.3: and Message-ID:, unique by the queue id.
            added += f"Message-ID: <{queue_id}@{self.hostname}>".encode("ascii") + newline
        return head + added + rest if added else message

    def _sign(self, outcome: Outcome, *, lf: bool, origin: Origin) -> defer.Deferred:
        message = outcome.message
        domain = header_from_domain(message)
        if domain is None or not self.signer.has_key(domain):
            return defer.succeed(outcome)
        if origin.kind == TRUSTED_RELAY and not self.is_local_domain(domain):
            return defer.succeed(outcome)
        d = self.run_in_thread(self.signer.signatures_for, message, lf=lf, domain=domain)

        def signed(signatures: bytes):
            if signatures:
                outcome.message = (signatures.replace(b"\r\n", b"\n") if lf else signatures) + message
            return outcome
        return d.addCallback(signed)


def _below_our_received(message: bytes, newline: bytes, fields: bytes) -> bytes:
    """Our trace block: `fields` right under the Received: we put on top, as
    Postfix with a milter writes it (its Received: first, then the milter's
    Authentication-Results); at the very top when there is no such line."""
    if not message[:9].lower() == b"received:":
        return fields + message
    end = message.find(newline)
    while end >= 0 and message[end + len(newline):end + len(newline) + 1] in (b" ", b"\t"):
        end = message.find(newline, end + len(newline))
    if end < 0:
        return fields + message
    cut = end + len(newline)
    return message[:cut] + fields + message[cut:]


def _b_prefix(prefix: str) -> str:
    prefix = "".join(c for c in prefix or "" if c.isalnum() or c in "+/=")
    return prefix or "unknown"


def build_stages(config, *, router, mail_dns, reactor, threadpool) -> AuthenticationStage:
    """The production stage: the DKIM keys of [dkim] keys_dir, the checks of
    [checks], CPU work in `threadpool`. The main process and each SMTP worker build one."""
    from functools import partial

    from twisted.internet.threads import deferToThreadPool


    # The Public Suffix List is read now, while its file is still readable (see the imports).
    dmarc.organizational_domain("example.com")
    dkim = config.dkim
    signer = DKIMSigner(DKIMKeyStore(dkim.keys_dir), clock=reactor) if dkim is not None and dkim.sign else None
    return AuthenticationStage(checks=config.checks, add_missing_headers=dkim is not None and dkim.add_missing_headers,
                               signer=signer, mail_dns=mail_dns,
                               run_in_thread=partial(deferToThreadPool, reactor, threadpool), clock=reactor,
                               hostname=config.hostname, is_local_domain=router.is_local_domain,
                               spam=config.spam, rspamd=build_rspamd(config, reactor))


def build_rspamd(config, reactor):
    """The process's one RspamdClient ([spam]), or None when nothing asks rspamd."""
    spam = config.spam
    if spam is None or not (spam.rspamd_url or (spam.controller_url and spam.learn)):
        return None
    client = rspamd_module.RspamdClient(reactor=reactor, url=spam.rspamd_url, controller_url=spam.controller_url,
                                        password=spam.password, timeout=spam.timeout, hostname=config.hostname)
    return client


def build_resolver(config):
    """The one twisted.names resolver of the process ([dns] nameservers, else resolv.conf)."""
    from twisted.names import client

    from twisted.names import cache, hosts, resolve

    if config.dns is None or not config.dns.nameservers:
        return client.createResolver()
    # createResolver(servers=...) would also read /etc/resolv.conf (or, when it
    # is empty, add 127.0.0.1:53) and spread the queries over both lists: the
    # same chain, with only the configured servers.
    return resolve.ResolverChain([hosts.Resolver(b"/etc/hosts"), cache.CacheResolver(),
                                  client.Resolver(servers=list(config.dns.nameservers))])
