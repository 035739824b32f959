#!/usr/bin/env python3
"""Soak test (issue 6 item 4): one mailgw under steady mixed traffic for a long time.

    python3 bench/soak.py --duration 600 --out bench/results/soak-$(git rev-parse --short HEAD)
    python3 bench/soak.py --duration 60 --keep-data          # short trial, keep the data dir

What it does (stdlib clients + aiosmtpd; everything on 127.0.0.1; every loop bounded):

1. Scratch dir /tmp/mailgw-soak.XXXXXX: mailgw.toml with listeners relay, submission, pop3,
   pop3s, imap, imaps on free 127.0.0.1 ports; local domain soak.test; trusted_networks
   127.0.0.0/8 (relaying without AUTH); [queue.smarthost] = an aiosmtpd sink run by this script
   on 127.0.0.1 (tls "none"), retry_schedule [5, 10, 30] so a deferral is retried within the
   drain; [smtp] auth_failure_delay = 0; allow_plaintext_auth in [pop3] and [imap] (most
   sessions still use STLS / STARTTLS / implicit TLS). Users alice, bob, carol, dave, erin
   @soak.test (added with `python3 -m mailgw.cli users add`, password on stdin).
2. PYTHONPATH=<repo> twistd -n --pidfile D/mailgw.pid --logfile D/mailgw.log mailgw --config
   D/mailgw.toml as a child of this script (own session); stopped by its PID (SIGTERM, then
   SIGKILL after 15 s) at the end, on errors and on Ctrl-C / SIGTERM.
3. For --duration seconds, worker threads:
   - SMTP senders (relay listener, unauthenticated from the trusted 127.0.0.1; one on
     submission with STARTTLS + AUTH as a random user): Poisson arrivals at --rate messages/s
     in total, 1-5 messages per connection, 1-64 KiB bodies (1 % 256 KiB) with dot-leading
     lines; recipients local (one or two users), remote (remote.test / other.test, relayed to
     the sink), or both in one transaction. Every message carries X-Soak-Marker (unique) and
     X-Soak-Sum (hash of its body; every reader checks it).
   - POP3 retrievers for alice (pop3, sometimes STLS) and bob (pop3s): UIDL, RETR, DELE
     (90 %), QUIT; 5 % of sessions drop the connection without QUIT (nothing may be removed).
   - IMAP clients on bob, carol (two), dave: SELECT INBOX, UID FETCH of the markers, full
     BODY.PEEK[] of a few (checked), STORE \\Seen / \\Flagged, COPY to Trash (+ \\Deleted),
     UID MOVE to Trash, \\Deleted + EXPUNGE / UID EXPUNGE / CLOSE, SEARCH UNSEEN; sometimes
     empty Trash. bob's INBOX is shared with the POP3 retriever.
   - IMAP IDLE clients on carol (imap) and dave (imaps): IDLE for 10-30 s, DONE, again;
     counting EXISTS / EXPUNGE / FETCH notifications.
   erin's INBOX is never read (a mailbox that only grows).
4. Every --sample-interval s: the server's VmRSS, VmHWM, open fds, threads, CPU s, queue length
   (DATA/queue/active/*.env), messages in the Maildirs, counters and errors per worker type.
5. At the end: clients stop, the queue drains (--drain-timeout), last sample, server stopped,
   Maildirs scanned. Accounting per (marker, recipient): every acked (250) local recipient must
   have been removed by a client that read it (POP3 DELE + QUIT, IMAP \\Deleted / MOVE) or be in
   the Maildir now; every acked remote recipient must have reached the sink (one still queued
   after the drain counts as lost; the queue left is reported too); every COPY/MOVE to Trash (COPYUID) must be in Trash or removed by a client.
   lost = acked - accounted; duplicates = a (marker, user) with two INBOX UIDs or files, a
   (marker, rcpt) the sink got twice, a Trash UID more than expected.
6. Writes PREFIX.json (config, summary, samples, error samples, server-log findings) and
   PREFIX.csv (samples); prints the summary. Exit 0 only when errors, lost and duplicates are 0
   (and no server traceback, nothing left queued, a clean server exit).

Diagnosis only (a `python -c` launcher around twistd; nothing under mailgw/ is changed):
--tracemalloc FRAMES (snapshots at 1/3 and at the end of the traffic, PREFIX.tracemalloc.txt)
and --imap-cache-bytes N (the default bound of mailgw.imap.message.MessageCache).
"""
from __future__ import annotations

import argparse
import collections
import csv
import glob
import hashlib
import imaplib
import json
import os
import poplib
import random
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
DOMAIN = "soak.test"
REMOTE_DOMAINS = ("remote.test", "other.test")
USERS = ("alice", "bob", "carol", "dave", "erin")
PASSWORD = "soak-pw-7"
CLIENT_NAME = "soak.client.test"
TIMEOUT = 30.0                 # every client socket operation
START_DEADLINE = 60.0
STOP_DEADLINE = 15.0
MAX_ERROR_SAMPLES = 60
ABORT_AFTER_ERRORS = 2000      # a run that is this broken stops early
LISTENERS = ("relay", "submission", "pop3", "pop3s", "imap", "imaps")
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]

MARKER_RE = re.compile(rb"^X-Soak-Marker: (\S+)\r?$", re.M | re.I)
SUM_RE = re.compile(rb"^X-Soak-Sum: (\S+)\r?$", re.M | re.I)
UID_RE = re.compile(rb"\bUID (\d+)")
FLAGS_RE = re.compile(rb"\bFLAGS \(([^)]*)\)")
COPYUID_RE = re.compile(rb"COPYUID (\d+) ([0-9:,]+) ([0-9:,]+)")
WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november "
         "oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu mail gateway "
         "twisted maildir queue relay soak test message line body").split()


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S ") + msg, flush=True)


def tls_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE         # the server's certificate is self-signed
    return ctx


def free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# -- messages -----------------------------------------------------------------------
def body_digest(body: bytes) -> str:
    """Hash of the body independent of CRLF / LF storage."""
    lines = [line.rstrip(b"\r") for line in body.split(b"\n")]
    return hashlib.sha256(b"\n".join(lines).rstrip(b"\n")).hexdigest()[:20]


def split_message(data: bytes) -> tuple[bytes, bytes]:
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = data.find(sep)
        if i >= 0:
            return data[:i + len(sep)], data[i + len(sep):]
    return data, b""


def check_message(data: bytes) -> tuple[str | None, bool]:
    """(marker, body intact?) of a message as read back."""
    head, body = split_message(data)
    m = MARKER_RE.search(head)
    s = SUM_RE.search(head)
    if not m:
        return None, False
    return m.group(1).decode(), bool(s) and s.group(1).decode() == body_digest(body)


def build_message(rng: random.Random, marker: str, sender: str, rcpts: list[str]) -> bytes:
    r = rng.random()
    size = 262144 if r < 0.01 else int(1024 * 2 ** rng.uniform(0, 6))       # 1-64 KiB, 1 % 256 KiB
    lines, n = [], 0
    while n < size:
        words = " ".join(rng.choices(WORDS, k=rng.randint(1, 14)))
        lead = rng.random()
        if lead < 0.04:
            words = "." + words           # dot-stuffing on every hop
        elif lead < 0.05:
            words = "."
        elif lead < 0.08:
            words = ""
        elif lead < 0.09:
            words = "From " + words
        lines.append(words)
        n += len(words) + 2
    body = ("\r\n".join(lines) + "\r\n").encode()
    head = (f"From: <{sender}>\r\n"
            f"To: {', '.join('<' + r + '>' for r in rcpts)}\r\n"
            f"Subject: soak {marker}\r\n"
            f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
            f"Message-ID: <{marker}@soak.client.test>\r\n"
            f"X-Soak-Marker: {marker}\r\n"
            f"X-Soak-Sum: {body_digest(body)}\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n").encode()
    return head + body


def parse_uid_set(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        if ":" in part:
            a, b = (int(x) for x in part.split(":"))
            out.extend(range(a, b + 1) if a <= b else range(a, b - 1, -1))
        elif part:
            out.append(int(part))
    return out


def uid_set(uids) -> str:
    return ",".join(str(u) for u in sorted(uids))


# -- shared bookkeeping ---------------------------------------------------------------
class Tracker:
    def __init__(self):
        self.lock = threading.Lock()
        self.counters = collections.Counter()
        self.errors = collections.Counter()          # per worker type
        self.races = collections.Counter()           # expected concurrency outcomes, not errors
        self.error_samples: list[dict] = []
        self.acked_local: dict[tuple[str, str], float] = {}    # (marker, user) -> time
        self.acked_remote: dict[tuple[str, str], float] = {}   # (marker, rcpt) -> time
        self.acked_markers: set[str] = set()
        self.sink = collections.Counter()                      # (marker, rcpt) -> deliveries
        self.sink_unexpected: list[str] = []
        self.inbox_uids = collections.defaultdict(set)         # (marker, user) -> INBOX UIDs seen
        self.consumed: set[tuple[str, str]] = set()            # (marker, user) removed by a reader
        self.trash_expected: dict[tuple[str, int], str] = {}   # (user, Trash UID) -> marker
        self.trash_consumed: dict[tuple[str, int], str] = {}
        self.uidvalidity = collections.defaultdict(set)        # (user, folder) -> values seen
        self.corrupt: list[str] = []
        self.stop = threading.Event()

    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counters[key] += n

    def error(self, kind: str, worker: str, exc: BaseException | str) -> None:
        with self.lock:
            self.errors[kind] += 1
            total = sum(self.errors.values())
            if len(self.error_samples) < MAX_ERROR_SAMPLES:
                text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
                self.error_samples.append({"t": round(time.monotonic() - T0, 1), "kind": kind,
                                           "worker": worker, "error": text[:500]})
        if total >= ABORT_AFTER_ERRORS:
            self.stop.set()

    def race(self, key: str) -> None:
        with self.lock:
            self.races[key] += 1

    def bad_body(self, where: str, marker: str | None) -> None:
        with self.lock:
            self.errors["corrupt"] += 1
            if len(self.corrupt) < 50:
                self.corrupt.append(f"{where}: {marker}")


T0 = time.monotonic()
TRACK = Tracker()


def sleep_until(deadline: float) -> None:
    """Sleep until monotonic `deadline` or stop."""
    while not TRACK.stop.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            return
        TRACK.stop.wait(min(left, 1.0))


# -- the relay sink -----------------------------------------------------------------------
class SinkHandler:
    async def handle_DATA(self, server, session, envelope):
        data = envelope.original_content or b""
        marker, intact = check_message(data)
        with TRACK.lock:
            TRACK.counters["sink_transactions"] += 1
            if marker is None:
                head, _ = split_message(data)
                subj = re.search(rb"^Subject: (.*)$", head, re.M)
                if len(TRACK.sink_unexpected) < 50:
                    TRACK.sink_unexpected.append(
                        f"from=<{envelope.mail_from}> to={envelope.rcpt_tos} subject="
                        f"{subj.group(1)[:120].decode(errors='replace') if subj else '?'}")
            else:
                for rcpt in envelope.rcpt_tos:
                    TRACK.sink[(marker, rcpt.lower())] += 1
                    TRACK.counters["sink_rcpts"] += 1
        if marker is not None and not intact:
            TRACK.bad_body("sink", marker)
        return "250 2.0.0 Ok: sunk"


# -- workers ----------------------------------------------------------------------------
class Ctx:
    """What every worker needs."""

    def __init__(self, ports: dict[str, int], rate: float, duration: float, seed: int):
        self.ports = ports
        self.rate = rate
        self.end = time.monotonic() + duration
        self.seed = seed
        self.run_id = f"{seed:x}"[-6:]
        self.seq = 0
        self.seq_lock = threading.Lock()

    def marker(self) -> str:
        with self.seq_lock:
            self.seq += 1
            return f"s{self.run_id}-{self.seq:07d}"

    def running(self) -> bool:
        return not TRACK.stop.is_set() and time.monotonic() < self.end


def pick_recipients(rng: random.Random) -> list[str]:
    r = rng.random()
    local = lambda: f"{rng.choice(USERS)}@{DOMAIN}"            # noqa: E731
    remote = lambda: f"r{rng.randint(1, 20)}@{rng.choice(REMOTE_DOMAINS)}"   # noqa: E731
    if r < 0.45:
        rcpts = [local()]
    elif r < 0.55:
        rcpts = [local(), local()]
    elif r < 0.80:
        rcpts = [remote() for _ in range(rng.randint(1, 3))]
    else:
        rcpts = [local(), remote()]
    seen, out = set(), []
    for a in rcpts:
        if a not in seen:
            seen.add(a)
            out.append(a)
    return out


def smtp_worker(ctx: Ctx, name: str, listener: str, rate: float, rng: random.Random) -> None:
    next_t = time.monotonic() + rng.expovariate(rate)
    while ctx.running():
        client = None
        try:
            if next_t - time.monotonic() > 0.5:         # do not hold an idle connection open
                sleep_until(next_t - 0.2)
                if not ctx.running():
                    break
            client = smtplib.SMTP(HOST, ctx.ports[listener], local_hostname=CLIENT_NAME, timeout=TIMEOUT)
            TRACK.count(f"conn_{listener}")
            client.ehlo()
            if listener == "submission":
                client.starttls(context=tls_context())
                client.ehlo()
                user = rng.choice(USERS)
                client.login(f"{user}@{DOMAIN}", PASSWORD)
                sender = f"{user}@{DOMAIN}"
            else:
                sender = f"sender{rng.randint(1, 9)}@outside.test"
            for _ in range(rng.randint(1, 5)):
                if next_t < time.monotonic() - 5:            # far behind: do not burst
                    TRACK.count("smtp_rate_shortfall")
                    next_t = time.monotonic()
                sleep_until(next_t)
                next_t += rng.expovariate(rate)
                if not ctx.running():
                    break
                rcpts = pick_recipients(rng)
                marker = ctx.marker()
                msg = build_message(rng, marker, sender, rcpts)
                code, reply = client.mail(sender, ["SIZE=%d" % len(msg)])
                if code != 250:
                    raise RuntimeError(f"MAIL {code} {reply!r}")
                ok_rcpts = []
                for r in rcpts:
                    code, reply = client.rcpt(r)
                    if code != 250:
                        TRACK.error("smtp_rcpt", name, f"RCPT {r}: {code} {reply!r}")
                    else:
                        ok_rcpts.append(r)
                if not ok_rcpts:
                    client.rset()
                    continue
                code, reply = client.data(msg)
                if code != 250:
                    raise RuntimeError(f"DATA {code} {reply!r}")
                now = time.monotonic()
                with TRACK.lock:
                    TRACK.counters["smtp_acked_msgs"] += 1
                    TRACK.counters["smtp_acked_bytes"] += len(msg)
                    TRACK.acked_markers.add(marker)
                    for r in ok_rcpts:
                        local, domain = r.split("@")
                        if domain == DOMAIN:
                            TRACK.acked_local[(marker, local)] = now
                            TRACK.counters["smtp_acked_local_rcpts"] += 1
                        else:
                            TRACK.acked_remote[(marker, r.lower())] = now
                            TRACK.counters["smtp_acked_remote_rcpts"] += 1
            client.quit()
            client = None
        except Exception as exc:            # noqa: BLE001 - counted and reported
            TRACK.error("smtp", name, exc)
            sleep_until(time.monotonic() + 1)
        finally:
            if client is not None:
                try:
                    client.close()
                except Exception:           # noqa: BLE001
                    pass


def pop3_worker(ctx: Ctx, name: str, user: str, listener: str, rng: random.Random) -> None:
    address = f"{user}@{DOMAIN}"
    while ctx.running():
        sleep_until(time.monotonic() + rng.uniform(1.5, 5.0))
        if not ctx.running():
            break
        p = None
        try:
            if listener == "pop3s":
                p = poplib.POP3_SSL(HOST, ctx.ports["pop3s"], timeout=TIMEOUT, context=tls_context())
            else:
                p = poplib.POP3(HOST, ctx.ports["pop3"], timeout=TIMEOUT)
                if rng.random() < 0.3:
                    p.stls(tls_context())
                    TRACK.count("pop3_stls")
            TRACK.count(f"conn_{listener}")
            p.user(address)
            try:
                p.pass_(PASSWORD)
            except poplib.error_proto as exc:
                if b"IN-USE" in exc.args[0]:
                    TRACK.race("pop3_in_use")
                    p.close()
                    p = None
                    continue
                raise
            _, listing, _ = p.uidl()
            deleted = []
            for entry in listing[:60]:                   # bounded per session
                n, uidl = entry.split()
                uidvalidity, uid = int(uidl[:8], 16), int(uidl[8:], 16)
                try:
                    if rng.random() < 0.1:
                        p.top(int(n), 3)
                    _, lines, _ = p.retr(int(n))
                except poplib.error_proto as exc:
                    if b"removed by another session" in exc.args[0]:
                        TRACK.race("pop3_gone")      # expunged over IMAP after our snapshot
                        continue
                    raise
                TRACK.count("pop3_retr")
                marker, intact = check_message(b"\r\n".join(lines) + b"\r\n")
                if marker is None or not intact:
                    TRACK.bad_body(f"pop3 {user} uid {uid}", marker)
                    continue
                with TRACK.lock:
                    TRACK.inbox_uids[(marker, user)].add(uid)
                    TRACK.uidvalidity[(user, "INBOX")].add(uidvalidity)
                if rng.random() < 0.9:
                    p.dele(int(n))
                    deleted.append(marker)
            if rng.random() < 0.05:
                TRACK.race("pop3_drop_without_quit")      # nothing may be removed
                p.sock.close()
                p = None
                continue
            p.quit()
            p = None
            with TRACK.lock:
                for marker in deleted:
                    TRACK.consumed.add((marker, user))
                TRACK.counters["pop3_deleted"] += len(deleted)
        except Exception as exc:            # noqa: BLE001
            TRACK.error("pop3", name, exc)
            sleep_until(time.monotonic() + 1)
        finally:
            if p is not None:
                try:
                    p.close()
                except Exception:           # noqa: BLE001
                    pass


def imap_connect(ctx: Ctx, listener: str, rng: random.Random) -> imaplib.IMAP4:
    if listener == "imaps":
        imap = imaplib.IMAP4_SSL(HOST, ctx.ports["imaps"], ssl_context=tls_context(), timeout=TIMEOUT)
    else:
        imap = imaplib.IMAP4(HOST, ctx.ports["imap"], timeout=TIMEOUT)
        if rng.random() < 0.3:
            imap.starttls(tls_context())
            TRACK.count("imap_starttls")
    TRACK.count(f"conn_{listener}")
    return imap


def check(result, what: str):
    typ, data = result
    if typ != "OK":
        raise RuntimeError(f"{what}: {typ} {data!r}"[:400])
    return data


def parse_fetch(data) -> list[tuple[int, bytes, bytes]]:
    """[(uid, flags, literal)] of the FETCH items that carry a literal (ours)."""
    out = []
    for i, item in enumerate(data):
        if not isinstance(item, tuple):
            continue
        head = item[0]
        tail = data[i + 1] if i + 1 < len(data) and isinstance(data[i + 1], bytes) else b""
        u = UID_RE.search(head) or UID_RE.search(tail)
        f = FLAGS_RE.search(head) or FLAGS_RE.search(tail)
        if u:
            out.append((int(u.group(1)), f.group(1) if f else b"", item[1]))
    return out


def imap_uidvalidity(imap: imaplib.IMAP4) -> int | None:
    v = imap.untagged_responses.get("UIDVALIDITY")
    try:
        return int(v[-1]) if v else None
    except (TypeError, ValueError):
        return None


def imap_select(imap: imaplib.IMAP4, user: str, folder: str) -> None:
    imap.untagged_responses.pop("UIDVALIDITY", None)
    check(imap.select(folder), f"SELECT {folder}")
    uv = imap_uidvalidity(imap)
    if uv is not None:
        with TRACK.lock:
            TRACK.uidvalidity[(user, folder)].add(uv)


def imap_empty_trash(imap: imaplib.IMAP4, user: str) -> None:
    imap_select(imap, user, "Trash")
    data = check(imap.uid("FETCH", "1:*", "(UID BODY.PEEK[HEADER.FIELDS (X-SOAK-MARKER)])"), "FETCH Trash")
    found = parse_fetch(data)
    if found:
        uids = [u for u, _, _ in found][:200]
        check(imap.uid("STORE", uid_set(uids), "+FLAGS.SILENT", r"(\Deleted)"), "STORE Trash")
        with TRACK.lock:
            for u, _, lit in found:
                m = MARKER_RE.search(lit)
                if u in uids:
                    TRACK.trash_consumed[(user, u)] = m.group(1).decode() if m else "?"
        check(imap.expunge(), "EXPUNGE Trash")
        TRACK.count("imap_trash_emptied", len(uids))
    TRACK.count("imap_trash_sessions")


def imap_worker(ctx: Ctx, name: str, user: str, listener: str, rng: random.Random) -> None:
    address = f"{user}@{DOMAIN}"
    while ctx.running():
        imap = None
        try:
            imap = imap_connect(ctx, listener, rng)
            check(imap.login(address, PASSWORD), "LOGIN")
            imap_select(imap, user, "INBOX")
            for _cycle in range(rng.randint(3, 15)):            # bounded per session
                sleep_until(time.monotonic() + rng.uniform(0.3, 2.0))
                if not ctx.running():
                    break
                imap.untagged_responses.clear()
                if rng.random() < 0.08:
                    imap_empty_trash(imap, user)
                    imap_select(imap, user, "INBOX")
                    continue
                check(imap.noop(), "NOOP")
                data = check(imap.uid("FETCH", "1:*", "(UID FLAGS RFC822.SIZE BODY.PEEK[HEADER.FIELDS (X-SOAK-MARKER)])"),
                             "FETCH")
                msgs = {}
                for u, flags, lit in parse_fetch(data):
                    m = MARKER_RE.search(lit)
                    if not m:
                        TRACK.error("imap_nomarker", name, f"{user} uid {u}: {lit[:100]!r}")
                        continue
                    msgs[u] = (m.group(1).decode(), flags)
                TRACK.count("imap_fetch_cmds")
                with TRACK.lock:
                    for u, (marker, _) in msgs.items():
                        TRACK.inbox_uids[(marker, user)].add(u)
                if not msgs:
                    continue
                uids = sorted(msgs)[:200]
                # full bodies of a few, checked
                for u in rng.sample(uids, min(2, len(uids))):
                    body = check(imap.uid("FETCH", str(u), "(BODY.PEEK[])"), "FETCH BODY")
                    got = [lit for uu, _, lit in parse_fetch(body) if uu == u]
                    if not got:
                        TRACK.race("imap_body_gone")          # expunged by another session meanwhile
                        continue
                    marker, intact = check_message(got[0])
                    TRACK.count("imap_body_fetched")
                    if marker != msgs[u][0] or not intact:
                        TRACK.bad_body(f"imap {user} uid {u}", marker)
                seen = [u for u in uids if rng.random() < 0.5]
                if seen:
                    check(imap.uid("STORE", uid_set(seen), "+FLAGS", r"(\Seen)"), "STORE Seen")
                flag = [u for u in uids if rng.random() < 0.2]
                if flag:
                    op = "+FLAGS" if rng.random() < 0.6 else "-FLAGS"
                    check(imap.uid("STORE", uid_set(flag), op, r"(\Flagged)"), "STORE Flagged")
                TRACK.count("imap_store_cmds")
                if rng.random() < 0.1:
                    check(imap.uid("SEARCH", "UNSEEN"), "SEARCH")
                # remove about half: some copied to Trash first, some moved, the rest deleted
                victims = [u for u in uids if rng.random() < 0.5]
                to_copy = [u for u in victims if rng.random() < 0.3]
                to_move = [u for u in victims if u not in to_copy and rng.random() < 0.15]
                plain = [u for u in victims if u not in to_copy and u not in to_move]
                deleted = list(plain)
                if to_copy:
                    # imaplib's uid() drops the tagged reply text, where COPYUID is: call below it
                    data = check(imap._simple_command("UID", "COPY", uid_set(to_copy), "Trash"), "COPY")
                    pairs = copyuid_pairs(data)
                    record_trash(user, msgs, pairs)
                    deleted += [s for s, _ in pairs]
                    TRACK.count("imap_copied", len(pairs))
                    missing = set(to_copy) - {s for s, _ in pairs}
                    if missing:
                        TRACK.race("imap_copy_gone")
                if to_move:
                    imap.untagged_responses.pop("COPYUID", None)
                    check(imap.uid("MOVE", uid_set(to_move), "Trash"), "MOVE")
                    raw = imap.untagged_responses.pop("COPYUID", [])
                    pairs = copyuid_pairs([b"[COPYUID " + (r if isinstance(r, bytes) else r.encode()) + b"]"
                                           for r in raw])
                    record_trash(user, msgs, pairs)
                    with TRACK.lock:
                        for s, _ in pairs:
                            TRACK.consumed.add((msgs[s][0], user))
                    TRACK.count("imap_moved", len(pairs))
                if deleted:
                    check(imap.uid("STORE", uid_set(deleted), "+FLAGS.SILENT", r"(\Deleted)"), "STORE Deleted")
                    with TRACK.lock:
                        for u in deleted:
                            TRACK.consumed.add((msgs[u][0], user))
                        TRACK.counters["imap_deleted"] += len(deleted)
                    r = rng.random()
                    if r < 0.45:
                        check(imap.expunge(), "EXPUNGE")
                        TRACK.count("imap_expunge_cmds")
                    elif r < 0.85:
                        check(imap.uid("EXPUNGE", uid_set(deleted)), "UID EXPUNGE")
                        TRACK.count("imap_uid_expunge_cmds")
                    # else: left \Deleted for CLOSE or another session's EXPUNGE
            if rng.random() < 0.5:
                check(imap.close(), "CLOSE")
            imap.logout()
            imap = None
        except Exception as exc:            # noqa: BLE001
            TRACK.error("imap", name, exc)
            sleep_until(time.monotonic() + 1)
        finally:
            if imap is not None:
                try:
                    imap.shutdown()
                except Exception:           # noqa: BLE001
                    pass


def copyuid_pairs(data) -> list[tuple[int, int]]:
    pairs = []
    for item in data:
        if isinstance(item, tuple):
            item = item[0]
        if not isinstance(item, bytes):
            continue
        m = COPYUID_RE.search(item)
        if m:
            pairs += list(zip(parse_uid_set(m.group(2).decode()), parse_uid_set(m.group(3).decode())))
    return pairs


def record_trash(user: str, msgs: dict, pairs) -> None:
    with TRACK.lock:
        for s, d in pairs:
            TRACK.trash_expected[(user, d)] = msgs[s][0] if s in msgs else "?"


class LineConn:
    """Minimal IMAP line reader on a raw (TLS) socket, for IDLE (imaplib has none in 3.11)."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def send(self, line: bytes) -> None:
        self.sock.sendall(line + b"\r\n")

    def readline(self, timeout: float) -> bytes | None:
        end = time.monotonic() + timeout
        while b"\r\n" not in self.buf:
            left = end - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except (socket.timeout, ssl.SSLWantReadError):
                return None
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        lit = re.search(rb"\{(\d+)\}$", line)
        if lit:                                  # swallow a literal and the rest of its line
            need = int(lit.group(1))
            while len(self.buf) < need:
                self.sock.settimeout(TIMEOUT)
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("server closed the connection")
                self.buf += chunk
            self.buf = self.buf[need:]
            rest = self.readline(TIMEOUT)
            line += b" <literal> " + (rest or b"")
        return line

    def command(self, tag: bytes, line: bytes, on_untagged=None) -> bytes:
        self.send(tag + b" " + line)
        while True:
            resp = self.readline(TIMEOUT)
            if resp is None:
                raise TimeoutError(f"no reply to {line[:40]!r}")
            if resp.startswith(tag + b" "):
                if not resp[len(tag) + 1:].startswith(b"OK"):
                    raise RuntimeError(f"{line[:40]!r}: {resp[:200]!r}")
                return resp
            if on_untagged:
                on_untagged(resp)


def idle_worker(ctx: Ctx, name: str, user: str, listener: str, rng: random.Random) -> None:
    address = f"{user}@{DOMAIN}"
    exists_re = re.compile(rb"^\* (\d+) (EXISTS|EXPUNGE|FETCH|RECENT)")

    def untagged(resp: bytes) -> None:
        m = exists_re.match(resp)
        if m:
            TRACK.count(f"idle_{m.group(2).decode().lower()}")
        elif resp.startswith(b"* BYE"):
            raise ConnectionError(f"server said {resp[:100]!r}")

    while ctx.running():
        sock = None
        try:
            raw = socket.create_connection((HOST, ctx.ports[listener]), timeout=TIMEOUT)
            sock = tls_context().wrap_socket(raw, server_hostname="localhost") if listener == "imaps" else raw
            TRACK.count(f"conn_{listener}")
            conn = LineConn(sock)
            greeting = conn.readline(TIMEOUT)
            if not greeting or not greeting.startswith(b"* OK"):
                raise RuntimeError(f"greeting {greeting!r}")
            n = 0

            def tag() -> bytes:
                nonlocal n
                n += 1
                return b"i%d" % n
            conn.command(tag(), b"LOGIN " + address.encode() + b' "' + PASSWORD.encode() + b'"')
            conn.command(tag(), b"SELECT INBOX")
            for _cycle in range(rng.randint(3, 10)):              # bounded per session
                if not ctx.running():
                    break
                t = tag()
                conn.send(t + b" IDLE")
                while True:
                    resp = conn.readline(TIMEOUT)
                    if resp is None:
                        raise TimeoutError("no continuation for IDLE")
                    if resp.startswith(b"+"):
                        break
                    if resp.startswith(t + b" "):
                        raise RuntimeError(f"IDLE refused: {resp!r}")
                    untagged(resp)
                TRACK.count("idle_cycles")
                until = min(time.monotonic() + rng.uniform(10, 30), ctx.end)
                while time.monotonic() < until and not TRACK.stop.is_set():
                    resp = conn.readline(min(1.0, max(0.05, until - time.monotonic())))
                    if resp is not None:
                        untagged(resp)
                conn.send(b"DONE")
                while True:
                    resp = conn.readline(TIMEOUT)
                    if resp is None:
                        raise TimeoutError("no tagged reply after DONE")
                    if resp.startswith(t + b" "):
                        if not resp[len(t) + 1:].startswith(b"OK"):
                            raise RuntimeError(f"IDLE ended with {resp!r}")
                        break
                    untagged(resp)
                conn.command(tag(), b"NOOP", untagged)
            conn.command(tag(), b"LOGOUT", lambda r: None)
        except Exception as exc:            # noqa: BLE001
            TRACK.error("idle", name, exc)
            sleep_until(time.monotonic() + 1)
        finally:
            if sock is not None:
                try:
                    sock.close()
                except Exception:           # noqa: BLE001
                    pass


# -- the server -------------------------------------------------------------------------
def write_config(d: Path, ports: dict[str, int], sink_port: int) -> Path:
    lines = [
        "# written by bench/soak.py",
        "[server]",
        'hostname = "mx.soak.test"',
        f'local_domains = ["{DOMAIN}"]',
        'trusted_networks = ["127.0.0.0/8"]',
        f'data_dir = "{d / "data"}"',
        "",
        "[smtp]",
        "auth_failure_delay = 0.0",
        "",
        "[pop3]",
        "allow_plaintext_auth = true",
        "",
        "[imap]",
        "allow_plaintext_auth = true",
        "",
        "[queue]",
        "# short retries, so that a deferral is retried within the soak's drain",
        "retry_schedule = [5, 10, 30]",
        "",
        "[queue.smarthost]",
        f'host = "{HOST}"',
        f"port = {sink_port}",
        'tls = "none"',
        "",
    ]
    for role in LISTENERS:
        lines += ["[[listeners]]", f'role = "{role}"', f'name = "{role}"',
                  f'endpoint = "tcp:{ports[role]}:interface={HOST}"', ""]
    path = d / "mailgw.toml"
    path.write_text("\n".join(lines))
    return path


def server_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("MAILGW_CONFIG", None)
    return env


def cli(args: list[str], cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mailgw.cli", *args], input=stdin, capture_output=True,
                          text=True, cwd=cwd, env=server_env(), timeout=120)


# Diagnostic wrappers around twistd (nothing under mailgw/ is changed):
# --tracemalloc: a tracemalloc snapshot on SIGUSR2 (twistd uses SIGUSR1 for log rotation;
#   the handler runs on the reactor thread);
# --imap-cache-bytes: the default bound of mailgw.imap.message.MessageCache (tap.py makes
#   the process's one cache with `MessageCache()`), to tell a filling cache from a leak.
TRACEMALLOC_PART = """
import itertools, signal, tracemalloc
tracemalloc.start({frames})
_n = itertools.count()
def _dump(signum, frame):
    tracemalloc.take_snapshot().dump("{snapdir}/snap-%02d.tmp" % next(_n))
signal.signal(signal.SIGUSR2, _dump)
"""
CACHE_PART = """
import mailgw.imap.message as _message
_message.MessageCache.__init__.__defaults__ = ({cache_bytes},)
"""
RUN_PART = """
from twisted.scripts.twistd import run
run()
"""


class Server:
    def __init__(self, d: Path, config: Path, ports: dict[str, int], tracemalloc_frames: int = 0,
                 imap_cache_bytes: int = 0):
        self.d, self.config, self.ports = d, config, ports
        self.pidfile = d / "mailgw.pid"
        self.logfile = d / "mailgw.log"
        self.proc: subprocess.Popen | None = None
        self.tracemalloc_frames = tracemalloc_frames
        self.imap_cache_bytes = imap_cache_bytes
        self.snapdir = d / "tracemalloc"
        self.snapshots: list[Path] = []

    def start(self) -> None:
        out = open(self.d / "stdout.log", "wb")
        twistd = TWISTD
        if self.tracemalloc_frames or self.imap_cache_bytes:
            code = ""
            if self.tracemalloc_frames:
                self.snapdir.mkdir()
                code += TRACEMALLOC_PART.format(frames=self.tracemalloc_frames, snapdir=self.snapdir)
            if self.imap_cache_bytes:
                code += CACHE_PART.format(cache_bytes=int(self.imap_cache_bytes))
            twistd = [sys.executable, "-c", code + RUN_PART]
        self.proc = subprocess.Popen(
            [*twistd, "-n", "--pidfile", str(self.pidfile), "--logfile", str(self.logfile),
             "mailgw", "--config", str(self.config)],
            cwd=self.d, env=server_env(), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)        # Ctrl-C on the terminal reaches only us; we stop it by PID
        out.close()
        waiting = set(self.ports.values())
        end = time.monotonic() + START_DEADLINE
        while waiting or "control socket for `mailgw queue`" not in self.log_text():
            if self.proc.poll() is not None:
                raise RuntimeError(f"twistd exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}"
                                   f"{(self.d / 'stdout.log').read_text(errors='replace')[-2000:]}")
            if time.monotonic() > end:
                raise RuntimeError(f"mailgw not ready after {START_DEADLINE}s; closed ports {sorted(waiting)}")
            for port in sorted(waiting):
                try:
                    socket.create_connection((HOST, port), timeout=0.25).close()
                    waiting.discard(port)
                except OSError:
                    pass
            time.sleep(0.1)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def snapshot(self, timeout: float = 120.0) -> Path | None:
        """Ask the tracemalloc wrapper for a snapshot; its path once written."""
        path = self.snapdir / f"snap-{len(self.snapshots):02d}.tmp"
        os.kill(self.proc.pid, signal.SIGUSR2)
        end = time.monotonic() + timeout
        size = -1
        while time.monotonic() < end and self.proc.poll() is None:
            if path.exists() and path.stat().st_size == size and size > 0:
                self.snapshots.append(path)
                return path
            size = path.stat().st_size if path.exists() else -1
            time.sleep(1.0)
        return None

    def log_text(self) -> str:
        parts = []
        for p in sorted(glob.glob(str(self.logfile) + ".*"), key=lambda s: -int(s.rsplit(".", 1)[1])
                        if s.rsplit(".", 1)[1].isdigit() else 0):
            parts.append(Path(p).read_text(errors="replace"))
        if self.logfile.exists():
            parts.append(self.logfile.read_text(errors="replace"))
        return "".join(parts)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(STOP_DEADLINE)
        return self.proc.returncode


def proc_sample(pid: int) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(val.split()[0]) / 1024.0
                elif key == "Threads":
                    out["Threads"] = int(val)
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        out["cpu_s"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        pass
    return out


def count_files(pattern: str) -> int:
    return len(glob.glob(pattern))


def mailbox_dir(data: Path, user: str) -> Path:
    return data / "mail" / DOMAIN / user


def sample(server: Server, data: Path, t0: float) -> dict:
    p = proc_sample(server.pid)
    inbox = {u: count_files(str(mailbox_dir(data, u) / "new" / "*")) +
             count_files(str(mailbox_dir(data, u) / "cur" / "*")) for u in USERS}
    with TRACK.lock:
        c = dict(TRACK.counters)
        errs = dict(TRACK.errors)
    conns = sum(v for k, v in c.items() if k.startswith("conn_"))
    return {
        "t_s": round(time.monotonic() - t0, 1),
        "rss_mib": round(p.get("VmRSS", 0), 1),
        "hwm_mib": round(p.get("VmHWM", 0), 1),
        "fds": p.get("fds", 0),
        "threads": p.get("Threads", 0),
        "cpu_s": round(p.get("cpu_s", 0), 1),
        "queue_active": count_files(str(data / "queue" / "active" / "*.env")),
        "inbox_msgs": sum(inbox.values()),
        "erin_msgs": inbox["erin"],
        "acked_msgs": c.get("smtp_acked_msgs", 0),
        "acked_local": c.get("smtp_acked_local_rcpts", 0),
        "acked_remote": c.get("smtp_acked_remote_rcpts", 0),
        "sink_rcpts": c.get("sink_rcpts", 0),
        "pop3_retr": c.get("pop3_retr", 0),
        "imap_fetch": c.get("imap_fetch_cmds", 0),
        "imap_deleted": c.get("imap_deleted", 0),
        "idle_exists": c.get("idle_exists", 0),
        "connections": conns,
        "errors": sum(errs.values()),
        "err_smtp": errs.get("smtp", 0) + errs.get("smtp_rcpt", 0),
        "err_pop3": errs.get("pop3", 0),
        "err_imap": errs.get("imap", 0) + errs.get("imap_nomarker", 0),
        "err_idle": errs.get("idle", 0),
        "err_corrupt": errs.get("corrupt", 0),
        "load1": float(open("/proc/loadavg").read().split()[0]),
    }


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of y over x."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in points) / sxx


def theil_sen(points: list[tuple[float, float]]) -> float | None:
    """Median of the pairwise slopes: robust to a few transient spikes (an argon2id
    verification holds 64 MiB for a fraction of a second; a sample may catch it)."""
    pairs = [(y2 - y1) / (x2 - x1) for i, (x1, y1) in enumerate(points) for x2, y2 in points[i + 1:] if x2 != x1]
    if len(pairs) < 3:
        return None
    pairs.sort()
    mid = len(pairs) // 2
    return pairs[mid] if len(pairs) % 2 else (pairs[mid - 1] + pairs[mid]) / 2


# -- the end: accounting -------------------------------------------------------------------
def scan_folder(directory: Path) -> list[tuple[str | None, int | None, str, bool]]:
    """[(marker, uid, file name, intact)] of every message file in a Maildir folder."""
    out = []
    for sub in ("new", "cur"):
        for path in sorted((directory / sub).glob("*")) if (directory / sub).is_dir() else []:
            data = path.read_bytes()
            marker, intact = check_message(data)
            u = re.search(r",U=(\d+)", path.name)
            out.append((marker, int(u.group(1)) if u else None, path.name, intact))
    return out


def account(data: Path) -> dict:
    lost_local, lost_remote, lost_trash, dups = [], [], [], []
    present_inbox = collections.defaultdict(list)        # (marker, user) -> [(uid, name)]
    present_trash = {}                                    # (user, uid) -> marker
    unknown_files, corrupt_files = [], []
    for user in USERS:
        base = mailbox_dir(data, user)
        for marker, uid, name, intact in scan_folder(base):
            if marker is None:
                unknown_files.append(f"{user}/{name}")
                continue
            if not intact:
                corrupt_files.append(f"{user}/{name}")
            present_inbox[(marker, user)].append((uid, name))
        for marker, uid, name, intact in scan_folder(base / ".Trash"):
            if marker is None or uid is None:
                unknown_files.append(f"{user}/.Trash/{name}")
                continue
            if not intact:
                corrupt_files.append(f"{user}/.Trash/{name}")
            if (user, uid) in present_trash:
                dups.append(f"Trash {user} uid {uid} twice")
            present_trash[(user, uid)] = marker
        others = [p.name for p in base.glob(".*") if p.is_dir() and p.name != ".Trash"
                  and any((p / s).glob("*") for s in ("new", "cur"))]
        for folder in others:
            if scan_folder(base / folder):
                unknown_files.append(f"{user}/{folder}: messages in an unexpected folder")
    with TRACK.lock:
        for key in TRACK.acked_local:
            if key not in TRACK.consumed and key not in present_inbox:
                lost_local.append(f"{key[0]} -> {key[1]}@{DOMAIN}")
        for key in set(TRACK.inbox_uids) | set(present_inbox):
            uids = set(TRACK.inbox_uids.get(key, set())) | {u for u, _ in present_inbox.get(key, []) if u}
            files = present_inbox.get(key, [])
            if len(uids) > 1 or len(files) > 1:
                dups.append(f"INBOX {key[1]} {key[0]}: uids {sorted(uids)} files {len(files)}")
        unacked_local = [f"{m} -> {u}" for (m, u) in set(TRACK.inbox_uids) | set(present_inbox)
                         if (m, u) not in TRACK.acked_local]
        for key in TRACK.acked_remote:
            if TRACK.sink.get(key, 0) == 0:
                lost_remote.append(f"{key[0]} -> {key[1]}")
        for key, n in TRACK.sink.items():
            if n > 1:
                dups.append(f"sink {key[1]} {key[0]}: {n} times")
        unacked_remote = [f"{m} -> {r}" for (m, r) in TRACK.sink if (m, r) not in TRACK.acked_remote]
        for key, marker in TRACK.trash_expected.items():
            if key not in TRACK.trash_consumed and key not in present_trash:
                lost_trash.append(f"{marker} -> {key[0]} Trash uid {key[1]}")
        unexpected_trash = [f"{u} uid {uid}" for (u, uid) in present_trash if (u, uid) not in TRACK.trash_expected]
        uidvalidity_changes = {f"{u}/{f}": sorted(v) for (u, f), v in TRACK.uidvalidity.items() if len(v) > 1}
        result = {
            "acked_msgs": TRACK.counters["smtp_acked_msgs"],
            "acked_local_rcpts": len(TRACK.acked_local),
            "acked_remote_rcpts": len(TRACK.acked_remote),
            "local_consumed_by_clients": sum(1 for k in TRACK.acked_local if k in TRACK.consumed),
            "local_present_at_end": sum(1 for k in TRACK.acked_local if k in present_inbox),
            "remote_at_sink": sum(1 for k in TRACK.acked_remote if TRACK.sink.get(k, 0) > 0),
            "trash_copies_expected": len(TRACK.trash_expected),
            "trash_removed_by_clients": len(TRACK.trash_consumed),
            "trash_present_at_end": len(present_trash),
            "lost_local": len(lost_local),
            "lost_remote": len(lost_remote),
            "lost_trash": len(lost_trash),
            "lost": len(lost_local) + len(lost_remote) + len(lost_trash),
            "duplicates": len(dups),
            "unacked_found_local": len(unacked_local),
            "unacked_found_remote": len(unacked_remote),
            "unexpected_trash": len(unexpected_trash),
            "sink_unexpected_messages": len(TRACK.sink_unexpected),
            "unknown_files": len(unknown_files),
            "corrupt_files_at_end": len(corrupt_files),
            "uidvalidity_changes": uidvalidity_changes,
            "examples": {
                "lost_local": lost_local[:20], "lost_remote": lost_remote[:20], "lost_trash": lost_trash[:20],
                "duplicates": dups[:20], "unacked_local": unacked_local[:10], "unacked_remote": unacked_remote[:10],
                "unexpected_trash": unexpected_trash[:10], "sink_unexpected": TRACK.sink_unexpected[:10],
                "unknown_files": unknown_files[:10], "corrupt_files": corrupt_files[:10],
                "corrupt_reads": TRACK.corrupt[:20],
            },
        }
    return result


def server_log_findings(text: str) -> dict:
    lines = text.splitlines()
    tb = [i for i, line in enumerate(lines) if "Traceback (most recent call last)" in line]
    excerpts = []
    for i in tb[:5]:
        excerpts.append("\n".join(lines[max(0, i - 2):i + 25]))
    # twistd's level tags: "#error", "#critical", "#warn"
    levels = collections.Counter()
    for line in lines:
        m = re.search(r"#(error|critical|warn)\]", line)
        if m:
            levels[m.group(1)] += 1
    warn_examples = [line[:300] for line in lines if re.search(r"#(error|critical|warn)\]", line)][:15]
    unhandled = [line[:300] for line in lines if "Unhandled" in line][:10]
    return {
        "lines": len(lines),
        "tracebacks": len(tb),
        "levels": dict(levels),
        "status_sent": sum(1 for line in lines if "status=sent" in line),
        "status_deferred": sum(1 for line in lines if "status=deferred" in line),
        "status_bounced": sum(1 for line in lines if "status=bounced" in line),
        "status_expired": sum(1 for line in lines if "status=expired" in line),
        "unhandled": unhandled,
        "warn_error_examples": warn_examples,
        "traceback_excerpts": excerpts,
    }


# -- main --------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=600, help="seconds of traffic (600)")
    ap.add_argument("--rate", type=float, default=4.0, help="SMTP messages per second in total (4)")
    ap.add_argument("--smtp-threads", type=int, default=3, help="relay-listener senders (3), plus one on submission")
    ap.add_argument("--sample-interval", type=float, default=10.0, help="seconds between samples (10)")
    ap.add_argument("--drain-timeout", type=float, default=120.0, help="seconds to wait for the queue to empty (120)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--out", default=None, help="results prefix (bench/results/soak-<git short hash>)")
    ap.add_argument("--keep-data", action="store_true", help="keep the scratch dir (kept anyway on anomalies)")
    ap.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES",
                    help="diagnosis: run mailgw under tracemalloc (FRAMES per trace), snapshot at 1/3 of the "
                         "run and at its end, write PREFIX.tracemalloc.txt (slows mailgw; RSS includes "
                         "tracemalloc's own memory)")
    ap.add_argument("--imap-cache-bytes", type=int, default=0, metavar="N",
                    help="diagnosis: bound mailgw's IMAP parsed-header cache (MessageCache, default 64 MiB "
                         "by its own estimate) to N bytes, set in the server process by the launch wrapper")
    args = ap.parse_args()
    if not 1 <= args.duration <= 86400 or not 0.05 <= args.rate <= 200 or not 1 <= args.smtp_threads <= 32:
        ap.error("duration 1-86400 s, rate 0.05-200 msgs/s, smtp-threads 1-32")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "nogit"
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "mailgw", "twisted"],
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        head, dirty = "nogit", []
    prefix = Path(args.out) if args.out else REPO / "bench" / "results" / f"soak-{head}"
    prefix.parent.mkdir(parents=True, exist_ok=True)

    d = Path(tempfile.mkdtemp(prefix="mailgw-soak.", dir="/tmp"))
    ports = dict(zip(LISTENERS + ("sink",), free_ports(len(LISTENERS) + 1)))
    sink_port = ports.pop("sink")
    config = write_config(d, ports, sink_port)
    server = Server(d, config, ports, args.tracemalloc, args.imap_cache_bytes)
    controller = None
    threads: list[threading.Thread] = []
    interrupted = False
    samples: list[dict] = []
    anomalies = True

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    log(f"soak: data {d}, seed {seed}, duration {args.duration:.0f}s, rate {args.rate}/s, ports {ports}, sink {sink_port}")
    try:
        for user in USERS:
            done = cli(["users", "add", f"{user}@{DOMAIN}", "--config", str(config)], d, PASSWORD + "\n")
            if done.returncode != 0:
                raise RuntimeError(f"users add {user}: {done.stdout} {done.stderr}")
        done = cli(["check", "--config", str(config)], d)
        if done.returncode != 0:
            raise RuntimeError(f"mailgw check: {done.stdout} {done.stderr}")

        from aiosmtpd.controller import Controller
        controller = Controller(SinkHandler(), hostname=HOST, port=sink_port)
        controller.start()

        server.start()
        log(f"mailgw pid {server.pid} ready")
        data = d / "data"
        ctx = Ctx(ports, args.rate, args.duration, seed)
        master = random.Random(seed)
        per_thread = args.rate * 0.8 / args.smtp_threads
        specs = [(smtp_worker, f"smtp-relay-{i}", ("relay", per_thread)) for i in range(args.smtp_threads)]
        specs += [(smtp_worker, "smtp-submission", ("submission", args.rate * 0.2)),
                  (pop3_worker, "pop3-alice", ("alice", "pop3")),
                  (pop3_worker, "pop3-bob", ("bob", "pop3s")),
                  (imap_worker, "imap-bob", ("bob", "imaps")),
                  (imap_worker, "imap-carol-1", ("carol", "imap")),
                  (imap_worker, "imap-carol-2", ("carol", "imaps")),
                  (imap_worker, "imap-dave", ("dave", "imap")),
                  (idle_worker, "idle-carol", ("carol", "imap")),
                  (idle_worker, "idle-dave", ("dave", "imaps"))]
        t0 = time.monotonic()
        samples.append(sample(server, data, t0))
        samples[0]["queue_peak_1s"] = 0
        for fn, name, extra in specs:
            rng = random.Random(master.randrange(1 << 30))
            th = threading.Thread(target=fn, args=(ctx, name, *extra, rng), name=name, daemon=True)
            th.start()
            threads.append(th)
        next_sample = t0 + args.sample_interval
        snap_at = t0 + args.duration / 3 if args.tracemalloc else None
        queue_glob = str(data / "queue" / "active" / "*.env")
        queue_peak = 0                  # polled every second: relayed mail rarely waits 10 s
        try:
            while ctx.running():
                sleep_until(min(next_sample, ctx.end, time.monotonic() + 1.0))
                queue_peak = max(queue_peak, count_files(queue_glob))
                if snap_at is not None and time.monotonic() >= snap_at:
                    snap_at = None
                    log(f"tracemalloc snapshot: {server.snapshot()}")
                if time.monotonic() >= next_sample:
                    s = sample(server, data, t0)
                    s["queue_peak_1s"] = max(queue_peak, s["queue_active"])
                    queue_peak = 0
                    samples.append(s)
                    next_sample += args.sample_interval
                    log(f"t={s['t_s']:.0f}s rss={s['rss_mib']}MiB fds={s['fds']} thr={s['threads']} "
                        f"queue={s['queue_active']}/{s['queue_peak_1s']} acked={s['acked_msgs']} sink={s['sink_rcpts']} "
                        f"pop3={s['pop3_retr']} imapdel={s['imap_deleted']} idle={s['idle_exists']} "
                        f"conns={s['connections']} errors={s['errors']} load={s['load1']}")
                if server.proc.poll() is not None:
                    TRACK.error("server", "main", f"mailgw exited with {server.proc.returncode}")
                    break
        except KeyboardInterrupt:
            interrupted = True
            log("interrupted: stopping the clients")
        traffic_s = time.monotonic() - t0
        if args.tracemalloc and server.proc.poll() is None:
            log(f"tracemalloc snapshot: {server.snapshot()}")     # still under load
        TRACK.stop.set()
        join_end = time.monotonic() + 60
        for th in threads:
            th.join(max(0.1, join_end - time.monotonic()))
        stuck = [th.name for th in threads if th.is_alive()]
        if stuck:
            TRACK.error("harness", "main", f"workers still running after 60 s: {stuck}")
        # drain the queue
        drain_start = time.monotonic()
        while (server.proc.poll() is None and count_files(str(data / "queue" / "active" / "*.env"))
               and time.monotonic() - drain_start < args.drain_timeout and not interrupted):
            time.sleep(0.5)
        drain_s = time.monotonic() - drain_start
        time.sleep(1.0)
        samples.append(sample(server, data, t0))
        queue_left = count_files(str(data / "queue" / "active" / "*.env"))
        samples[-1]["queue_peak_1s"] = queue_left
        log(f"clients stopped; queue drained in {drain_s:.1f}s ({queue_left} left); stopping mailgw")
        rc = server.stop()
        # twistd stops on SIGTERM and then re-raises the signal, so -15 is its clean exit
        server_alive_to_end = rc in (0, -signal.SIGTERM) and "Server Shut Down." in server.log_text()
        acct = account(data)
        findings = server_log_findings(server.log_text())

        steady = [s for s in samples[1:-1]] or samples
        half = [s for s in steady if s["t_s"] >= traffic_s / 2]
        rss_slope = slope([(s["t_s"] / 60, s["rss_mib"]) for s in half])
        rss_slope_all = slope([(s["t_s"] / 60, s["rss_mib"]) for s in steady])
        fds_slope = slope([(s["t_s"] / 60, s["fds"]) for s in half])
        rss_robust = theil_sen([(s["t_s"] / 60, s["rss_mib"]) for s in half])
        rss_robust_all = theil_sen([(s["t_s"] / 60, s["rss_mib"]) for s in steady])
        with TRACK.lock:
            counters, errors, races = dict(TRACK.counters), dict(TRACK.errors), dict(TRACK.races)
            error_samples = list(TRACK.error_samples)
        last = samples[-1]
        summary = {
            "duration_s": round(traffic_s, 1),
            "drain_s": round(drain_s, 1),
            "interrupted": interrupted,
            "messages_acked": counters.get("smtp_acked_msgs", 0),
            "acked_mib": round(counters.get("smtp_acked_bytes", 0) / 2 ** 20, 1),
            "acked_local_rcpts": counters.get("smtp_acked_local_rcpts", 0),
            "acked_remote_rcpts": counters.get("smtp_acked_remote_rcpts", 0),
            "relayed_to_sink_rcpts": counters.get("sink_rcpts", 0),
            "sink_transactions": counters.get("sink_transactions", 0),
            "pop3_retrieved": counters.get("pop3_retr", 0),
            "pop3_deleted": counters.get("pop3_deleted", 0),
            "imap_fetch_cmds": counters.get("imap_fetch_cmds", 0),
            "imap_bodies_checked": counters.get("imap_body_fetched", 0),
            "imap_deleted": counters.get("imap_deleted", 0),
            "imap_copied_to_trash": counters.get("imap_copied", 0),
            "imap_moved_to_trash": counters.get("imap_moved", 0),
            "imap_trash_emptied": counters.get("imap_trash_emptied", 0),
            "imap_expunge_cmds": counters.get("imap_expunge_cmds", 0) + counters.get("imap_uid_expunge_cmds", 0),
            "idle_cycles": counters.get("idle_cycles", 0),
            "idle_notifications": {k[5:]: v for k, v in counters.items()
                                   if k.startswith("idle_") and k != "idle_cycles"},
            "connections": {k[5:]: v for k, v in counters.items() if k.startswith("conn_")},
            "connections_total": sum(v for k, v in counters.items() if k.startswith("conn_")),
            "errors": errors,
            "errors_total": sum(errors.values()),
            "races_expected": races,
            "lost": acct["lost"],
            "duplicates": acct["duplicates"],
            "rss_mib": {"first": samples[0]["rss_mib"], "peak": max(s["rss_mib"] for s in samples),
                        "last": last["rss_mib"], "vmhwm": max(s["hwm_mib"] for s in samples),
                        "slope_second_half_mib_per_min": None if rss_slope is None else round(rss_slope, 3),
                        "slope_all_mib_per_min": None if rss_slope_all is None else round(rss_slope_all, 3),
                        "theil_sen_second_half_mib_per_min": None if rss_robust is None else round(rss_robust, 3),
                        "theil_sen_all_mib_per_min": None if rss_robust_all is None else round(rss_robust_all, 3)},
            "fds": {"first": samples[0]["fds"], "peak": max(s["fds"] for s in samples), "last": last["fds"],
                    "slope_second_half_per_min": None if fds_slope is None else round(fds_slope, 3)},
            "threads": {"first": samples[0]["threads"], "peak": max(s["threads"] for s in samples),
                        "last": last["threads"]},
            "queue_len": {"max": max(s["queue_active"] for s in samples),
                          "max_polled_1s": max(s.get("queue_peak_1s", 0) for s in samples), "last": queue_left},
            "server_cpu_s": last["cpu_s"],
            "soak_client_cpu_s": round(sum(os.times()[:2]), 1),
            "load1": {"first": samples[0]["load1"], "max": max(s["load1"] for s in samples),
                      "last": last["load1"]},
            "server_exit_code": rc,
            "server_log": {k: findings[k] for k in ("lines", "tracebacks", "levels", "status_sent",
                                                     "status_deferred", "status_bounced", "status_expired")},
        }
        anomalies = bool(summary["errors_total"] or acct["lost"] or acct["duplicates"] or findings["tracebacks"]
                         or queue_left or not server_alive_to_end or acct["unacked_found_local"]
                         or acct["unacked_found_remote"] or acct["unknown_files"] or interrupted)
        result = {
            "tool": "bench/soak.py", "git": head, "uncommitted_mailgw_paths": [p for p in dirty if p],
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seed": seed,
            "args": vars(args), "nproc": os.cpu_count(), "ports": ports, "sink_port": sink_port,
            "config": config.read_text(), "summary": summary, "accounting": acct,
            "server_log_findings": findings, "error_samples": error_samples, "samples": samples,
            "data_dir": str(d) if (anomalies or args.keep_data) else None,
        }
        if args.tracemalloc:
            result["tracemalloc"] = tracemalloc_report(server.snapshots, Path(str(prefix) + ".tracemalloc.txt"))
        Path(str(prefix) + ".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
        with open(str(prefix) + ".csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(samples[0]))
            w.writeheader()
            w.writerows(samples)
        print_summary(summary, acct, findings, error_samples, prefix)
        return 1 if anomalies else 0
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except Exception:
        traceback.print_exc()
        return 2
    finally:
        TRACK.stop.set()
        try:
            server.stop()
        except Exception:           # noqa: BLE001
            traceback.print_exc()
        if controller is not None:
            try:
                controller.stop()
            except Exception:       # noqa: BLE001
                pass
        if args.keep_data or anomalies:
            log(f"data kept in {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)


def tracemalloc_report(snapshots: list[Path], out: Path) -> dict:
    """Growth between the first and the last snapshot, by line, by file, and the
    tracebacks of the largest growths."""
    import tracemalloc
    if len(snapshots) < 2:
        return {"error": f"{len(snapshots)} snapshots"}
    keep = (tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen *>"),
            tracemalloc.Filter(False, "<unknown>"))
    a = tracemalloc.Snapshot.load(str(snapshots[0])).filter_traces(keep)
    b = tracemalloc.Snapshot.load(str(snapshots[-1])).filter_traces(keep)
    total_a = sum(st.size for st in a.statistics("filename"))
    total_b = sum(st.size for st in b.statistics("filename"))
    lines = [f"traced Python memory: {total_a / 2**20:.2f} MiB -> {total_b / 2**20:.2f} MiB "
             f"({(total_b - total_a) / 2**20:+.2f} MiB) between {snapshots[0].name} and {snapshots[-1].name}", "",
             "== growth by line (top 25)"]
    by_line = b.compare_to(a, "lineno")
    for st in by_line[:25]:
        lines.append(str(st))
    lines += ["", "== growth by file (top 15)"]
    by_file = b.compare_to(a, "filename")
    for st in by_file[:15]:
        lines.append(str(st))
    lines += ["", "== tracebacks of the 5 largest growths"]
    by_tb = b.compare_to(a, "traceback")
    for st in by_tb[:5]:
        lines.append(f"{st.size_diff / 1024:+.1f} KiB, {st.count_diff:+d} blocks (now {st.size / 1024:.1f} KiB):")
        lines += ["    " + x for x in st.traceback.format()]
    out.write_text("\n".join(lines) + "\n")
    return {"file": str(out), "traced_mib_first": round(total_a / 2**20, 2), "traced_mib_last": round(total_b / 2**20, 2),
            "top_lines": [str(st) for st in by_line[:10]], "top_files": [str(st) for st in by_file[:8]]}


def print_summary(s: dict, acct: dict, findings: dict, error_samples: list, prefix: Path) -> None:
    print()
    print(f"== soak summary ({prefix}.json, .csv)")
    print(f"duration {s['duration_s']} s (+ drain {s['drain_s']} s)")
    print(f"SMTP acked {s['messages_acked']} msgs ({s['acked_mib']} MiB): {s['acked_local_rcpts']} local rcpts, "
          f"{s['acked_remote_rcpts']} remote rcpts; sink got {s['relayed_to_sink_rcpts']} rcpts in "
          f"{s['sink_transactions']} transactions")
    print(f"POP3 retrieved {s['pop3_retrieved']}, deleted {s['pop3_deleted']}; IMAP FETCH cmds {s['imap_fetch_cmds']}, "
          f"bodies checked {s['imap_bodies_checked']}, deleted {s['imap_deleted']}, copied {s['imap_copied_to_trash']}, "
          f"moved {s['imap_moved_to_trash']}, Trash emptied {s['imap_trash_emptied']}; IDLE cycles {s['idle_cycles']} "
          f"notifications {s['idle_notifications']}")
    print(f"connections {s['connections_total']} {s['connections']}")
    print(f"errors {s['errors_total']} {s['errors']}; expected races {s['races_expected']}")
    print(f"accounting: local {acct['acked_local_rcpts']} = consumed {acct['local_consumed_by_clients']} / "
          f"present {acct['local_present_at_end']}; remote {acct['acked_remote_rcpts']} at sink "
          f"{acct['remote_at_sink']}; Trash copies {acct['trash_copies_expected']} (removed "
          f"{acct['trash_removed_by_clients']}, present {acct['trash_present_at_end']})")
    print(f"LOST {acct['lost']} (local {acct['lost_local']}, remote {acct['lost_remote']}, trash "
          f"{acct['lost_trash']}); DUPLICATES {acct['duplicates']}; unacked found local "
          f"{acct['unacked_found_local']} remote {acct['unacked_found_remote']}; sink unexpected "
          f"{acct['sink_unexpected_messages']}; uidvalidity changes {acct['uidvalidity_changes']}")
    r = s["rss_mib"]
    print(f"RSS MiB first {r['first']} peak {r['peak']} last {r['last']} (VmHWM {r['vmhwm']}); slope 2nd half "
          f"{r['slope_second_half_mib_per_min']} MiB/min (whole run {r['slope_all_mib_per_min']}); Theil-Sen 2nd half "
          f"{r['theil_sen_second_half_mib_per_min']} (whole run {r['theil_sen_all_mib_per_min']})")
    f = s["fds"]
    print(f"fds first {f['first']} peak {f['peak']} last {f['last']} (slope 2nd half {f['slope_second_half_per_min']}/min);"
          f" threads {s['threads']}; queue max {s['queue_len']['max']} (1 s polls {s['queue_len']['max_polled_1s']}) last {s['queue_len']['last']}; "
          f"server CPU {s['server_cpu_s']} s (soak client {s['soak_client_cpu_s']} s); exit code "
          f"{s['server_exit_code']}; load1 {s['load1']}")
    print(f"server log: {s['server_log']}")
    for e in error_samples[:10]:
        print(f"  error: {e}")
    for k, v in acct["examples"].items():
        if v:
            print(f"  {k}: {v[:5]}")
    for ex in findings["traceback_excerpts"][:2]:
        print("  server traceback:\n    " + ex.replace("\n", "\n    "))


if __name__ == "__main__":
    sys.exit(main())
