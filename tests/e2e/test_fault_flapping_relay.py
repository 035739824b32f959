"""Fault injection, issue 6: the relay target flaps.

"The relay target flaps (accepts, 4xx, drops the connection mid-DATA, times
out): every message is delivered once the target is back, duplicates only
where SMTP cannot avoid them, counted and reported."

The real `twistd mailgw` relays through its smarthost to a scripted SMTP
target in this module (a threaded socket server on 127.0.0.1). While it
flaps, the target takes its behaviour from a seeded schedule (shuffled blocks
of every behaviour, so each one occurs and the run is reproducible): drawn
once per connection, and again for every further transaction on the same
connection (so the test keeps working once outbound connections are reused).

    accept            250 after the final dot (recorded)
    accept_then_close 250 after the final dot, then close (FIN) without waiting for QUIT
    accept_then_421   250 after the final dot, then "421 idle timeout" and close (a server
                      ending a connection mailgw may be about to reuse)
    greeting_421      421 instead of the 220 greeting (later in a session: 421 to MAIL, close)
    drop_on_connect   accept the TCP connection, close it at once
    stall_greeting    never send a greeting (mailgw's reply_timeout fires)
    tempfail_mail     451 to MAIL
    tempfail_rcpt     451 to the first RCPT, 250 to the others (partial delivery)
    tempfail_data     451 to DATA
    tempfail_eod      451 after the final dot (nothing stored)
    drop_mid_data     close after a few lines of the payload (nothing stored)
    drop_after_dot    the whole payload and its final dot arrive, the connection
                      closes before the reply: the target HAS the message, mailgw
                      cannot know. Recorded as "maybe delivered".
    stall_rcpt        no reply to the first RCPT (reply_timeout)
    stall_after_dot   the final dot arrives, no reply ever (data_timeout);
                      recorded as "maybe delivered", like drop_after_dot

When the schedule is used up the target accepts everything, and the queue
must drain. Then, per (message, recipient) pair, from the target's records in
arrival order:

- exactly one *confirmed* acceptance (our 250 was followed by another command
  on the same connection, so mailgw read it), and it is the pair's last record:
  after mailgw has seen a 250 it never sends that pair again;
- every earlier record is ambiguous, i.e. one SMTP cannot avoid repeating:
  a message cut after its final dot, or a 250 mailgw may never have read
  (the connection ended without another command);
- so the duplicates are counted exactly: duplicates == ambiguous records;
- every copy is the submitted message byte for byte (after mailgw's Received:);
- nothing bounced: no null-sender notice reached the target, no
  status=bounced/expired in the log, one status=sent log line per pair, and
  status=deferred lines for the faults; no Traceback in the log.

Run twice: with outbound connection reuse as configured by default, and with
`connection_cache_time = 0` (one message per connection). A summary (messages,
connections and behaviours, duplicates, wall time) is printed and written to
tmp_path/flapping-summary.{txt,json}. FLAP_SEED=N picks another schedule.

Bounded polling with deadlines only; no fixed sleeps.
"""
from __future__ import annotations

import json
import os
import random
import re
import socket
import socketserver
import threading
import time
import uuid
from collections import Counter, defaultdict, deque

import pytest

from sink import queue_list

pytestmark = pytest.mark.e2e

SEED = int(os.environ.get("FLAP_SEED", "20260607"))     # FLAP_SEED=... to explore other schedules
MESSAGES = 200
FLAP_BLOCKS = 30                 # shuffled blocks of CYCLE while the target flaps
SENDER = "app@internal.test"     # remote sender: a bounce would go out through the target as MAIL FROM:<>
DOMAINS = ("alpha.test", "beta.test", "gamma.test")
BIG_EVERY = 20                   # every 20th message is ~200 KiB, so drop_mid_data really cuts a transfer
DROP_MID_DATA_LINES = 3          # payload lines read before drop_mid_data closes (always before the dot)
QUEUE_EXTRA = ("[queue]\n"
               "retry_schedule = [1]\n"
               "reply_timeout = 2.0\n"
               "data_timeout = 3.0\n"
               "connect_timeout = 2.0\n")
# Outbound connection reuse (Postfix's connection cache) on, as configured by default, and off.
REUSE_OFF = "connection_cache_time = 0\n"
FLAP_DEADLINE = 60.0             # seconds for the flap schedule to be used up
DRAIN_DEADLINE = 45.0            # seconds, after flapping, for the queue to empty
IDLE_DEADLINE = 20.0             # seconds for the target's last connections to end

CONNECTION_FAULTS = ("greeting_421", "drop_on_connect", "stall_greeting")
TRANSACTION_FAULTS = ("accept_then_close", "accept_then_421", "tempfail_mail", "tempfail_rcpt", "tempfail_data", "tempfail_eod",
                      "drop_mid_data", "drop_after_dot", "stall_rcpt", "stall_after_dot")
CYCLE = ("accept", "accept") + CONNECTION_FAULTS + TRANSACTION_FAULTS
AMBIGUOUS = ("after-dot-drop", "after-dot-stall", "accepted-unconfirmed")

_MARKER = re.compile(rb"^X-Test-Marker: (\S+)\r$", re.M)
_ADDRESS = re.compile(r"<([^>]*)>")
_LOG_RESULT = re.compile(r"(\S+): to=<([^>]*)>, relay=\S+, delay=\S+, dsn=\S+, status=(\w+) ")


class FlappingTarget:
    """A scripted SMTP server on 127.0.0.1: one thread per connection."""

    def __init__(self, seed: int, blocks: int):
        rng = random.Random(seed)
        schedule: list[str] = []
        for _ in range(blocks):
            block = list(CYCLE)
            rng.shuffle(block)
            schedule += block
        self.scheduled = len(schedule)
        self._schedule = deque(schedule)
        self.lock = threading.Lock()
        self.flap_over = threading.Event()
        self.draws: Counter = Counter()          # behaviour -> times used while flapping
        self.events: Counter = Counter()         # what happened, e.g. "rcpt-451", "mail", "quit"
        self.connections = 0
        self.active = 0
        self.records: list[dict] = []            # every message the target ended up holding
        self.anomalies: list[str] = []           # protocol trouble seen from mailgw's side
        self._sockets: set[socket.socket] = set()
        self._seq = 0
        target = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                target._serve(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True
            request_queue_size = 128             # mailgw opens up to max_per_domain (20) at once

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="flapping-target", daemon=True)

    # -- control ----------------------------------------------------------------
    def start(self) -> "FlappingTarget":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        with self.lock:
            sockets = list(self._sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(10)

    def wait_idle(self, deadline: float) -> None:
        """No connection open (so every QUIT after a 250 has been read)."""
        end = time.monotonic() + deadline
        while True:
            with self.lock:
                if self.active == 0:
                    return
                active = self.active
            assert time.monotonic() < end, f"{active} target connections still open after {deadline}s"
            time.sleep(0.05)

    def draw(self) -> str:
        with self.lock:
            if not self._schedule:
                return "accept"
            behaviour = self._schedule.popleft()
            self.draws[behaviour] += 1
            if not self._schedule:
                self.flap_over.set()
            return behaviour

    def _record(self, kind: str, txn: dict, data: bytes) -> dict:
        found = _MARKER.search(data)
        with self.lock:
            self._seq += 1
            record = {"seq": self._seq, "kind": kind, "conn": txn["conn"], "sender": txn["sender"],
                      "rcpts": list(txn["rcpts"]), "marker": found.group(1).decode() if found else None,
                      "data": data, "time": time.monotonic()}
            self.records.append(record)
        return record

    def _count(self, event: str) -> None:
        with self.lock:
            self.events[event] += 1

    def _anomaly(self, text: str) -> None:
        with self.lock:
            self.anomalies.append(text)

    # -- one connection ---------------------------------------------------------------
    def _serve(self, sock: socket.socket) -> None:
        with self.lock:
            self.connections += 1
            self.active += 1
            conn = self.connections
            self._sockets.add(sock)
        sock.settimeout(60)
        reader = sock.makefile("rb")
        try:
            self._session(sock, reader, conn)
        except OSError:
            pass                                  # mailgw aborted (timeouts do), or stop()
        finally:
            reader.close()
            try:
                sock.close()
            except OSError:
                pass
            with self.lock:
                self.active -= 1
                self._sockets.discard(sock)

    @staticmethod
    def _stall(reader) -> None:
        """Never answer: read and drop everything until mailgw gives up and closes."""
        while reader.read1(65536):
            pass

    def _session(self, sock: socket.socket, reader, conn: int) -> None:
        def send(text: str) -> None:
            sock.sendall(text.encode() + b"\r\n")

        first = self.draw()
        self._count(f"connection-{first}" if first in CONNECTION_FAULTS else "connection-ok")
        if first == "drop_on_connect":
            return
        if first == "stall_greeting":
            return self._stall(reader)
        if first == "greeting_421":
            send("421 4.3.2 target.test flapping, try again later")
            return                             # RFC 5321 §3.1: then close
        send("220 target.test ESMTP flapping target")
        pending = first                        # the first transaction's behaviour
        txn: dict | None = None
        unconfirmed: dict | None = None        # an "accepted" record whose 250 has not been seen to arrive
        while True:
            line = reader.readline(4096)
            if not line:
                return                         # EOF: an unconfirmed 250 stays unconfirmed
            if unconfirmed is not None:
                unconfirmed["kind"] = "accepted"   # mailgw sent another command: it read our 250
                unconfirmed = None
            if not line.endswith(b"\r\n"):
                self._anomaly(f"conn {conn}: command line without CRLF: {line[:80]!r}")
            command = line.rstrip(b"\r\n").decode("utf-8", "replace")
            verb = command.split(" ", 1)[0].upper()
            if verb == "EHLO":
                txn = None
                sock.sendall(b"250-target.test\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n"
                             b"250 8BITMIME\r\n")
            elif verb == "HELO":
                txn = None
                send("250 target.test")
            elif verb == "MAIL":
                if txn is not None:
                    send("503 5.5.1 nested MAIL")
                    self._anomaly(f"conn {conn}: MAIL inside a transaction")
                    continue
                behaviour = pending or self.draw()
                pending = None
                self._count("mail")
                if behaviour in ("greeting_421",):
                    send("421 4.3.2 target.test flapping, closing")
                    return
                if behaviour == "drop_on_connect":
                    return
                if behaviour == "stall_greeting":
                    return self._stall(reader)
                found = _ADDRESS.search(command)
                txn = {"behaviour": behaviour, "conn": conn, "sender": found.group(1) if found else None,
                       "rcpts": [], "refused": False, "tempfailed": False}
                if behaviour == "tempfail_mail":
                    txn["refused"] = True
                    self._count("mail-451")
                    send("451 4.3.0 target.test flapping: MAIL refused for now")
                else:
                    send("250 2.1.0 Ok")
            elif verb == "RCPT":
                if txn is None or txn["refused"]:
                    send("503 5.5.1 MAIL first")
                    continue
                found = _ADDRESS.search(command)
                address = found.group(1) if found else ""
                if txn["behaviour"] == "stall_rcpt":
                    return self._stall(reader)
                if txn["behaviour"] == "tempfail_rcpt" and not txn["tempfailed"]:
                    txn["tempfailed"] = True
                    self._count("rcpt-451")
                    send(f"451 4.2.0 <{address}> mailbox busy, try again later")
                else:
                    txn["rcpts"].append(address)
                    send("250 2.1.5 Ok")
            elif verb == "DATA":
                if txn is None or txn["refused"]:
                    send("503 5.5.1 MAIL first")
                    continue
                if not txn["rcpts"]:
                    # RFC 2920 §3.1: a pipelining client sends DATA with its RCPTs,
                    # before it knows whether one was accepted.
                    send("554 5.5.1 no valid recipients")
                    self._count("data-no-rcpt")
                    txn = None
                    continue
                behaviour = txn["behaviour"]
                if behaviour == "tempfail_data":
                    self._count("data-451")
                    send("451 4.3.0 target.test flapping: DATA refused for now")
                    txn = None
                    continue
                send("354 End data with <CR><LF>.<CR><LF>")
                if behaviour == "drop_mid_data":
                    for _ in range(DROP_MID_DATA_LINES):
                        reader.readline(65536)
                    self._count("drop-mid-data")
                    return                     # close with the rest unread: mailgw sees a reset
                data = self._read_data(reader, conn)
                if data is None:
                    return                     # mailgw closed before its final dot
                if behaviour == "drop_after_dot":
                    self._record("after-dot-drop", txn, data)
                    return
                if behaviour == "stall_after_dot":
                    self._record("after-dot-stall", txn, data)
                    return self._stall(reader)
                if behaviour == "tempfail_eod":
                    self._count("eod-451")
                    send("451 4.3.0 target.test flapping: message not stored")
                    txn = None
                    continue
                if behaviour in ("accept_then_close", "accept_then_421"):
                    # The 250 is in the stream before the FIN: mailgw reads it.
                    self._record("accepted", txn, data)
                    send("250 2.0.0 Ok: stored" + ("\r\n421 4.4.2 target.test idle timeout, closing"
                                                   if behaviour == "accept_then_421" else ""))
                    self._count(behaviour.replace("_", "-"))
                    sock.shutdown(socket.SHUT_WR)
                    return self._stall(reader)         # read (and drop) until mailgw closes too
                unconfirmed = self._record("accepted-unconfirmed", txn, data)
                send("250 2.0.0 Ok: stored")
                txn = None
            elif verb == "RSET":
                txn = None
                send("250 2.0.0 Ok")
            elif verb == "NOOP":
                send("250 2.0.0 Ok")
            elif verb == "QUIT":
                self._count("quit")
                send("221 2.0.0 Bye")
                return
            else:
                self._anomaly(f"conn {conn}: unknown command {command[:80]!r}")
                send("502 5.5.2 command not recognised")

    def _read_data(self, reader, conn: int) -> bytes | None:
        """The payload up to its final dot, dot-unstuffed (RFC 5321 §4.5.2)."""
        lines = []
        while True:
            line = reader.readline(65536)
            if not line:
                return None
            if not line.endswith(b"\r\n"):
                self._anomaly(f"conn {conn}: DATA line without CRLF: {line[:80]!r}")
            if line == b".\r\n":
                return b"".join(lines)
            if line.startswith(b"."):
                line = line[1:]
            lines.append(line)


def build(marker: str, index: int, recipients: list[str]) -> bytes:
    """A CRLF message carrying `marker`, with lines that need dot-stuffing."""
    body = [f"Message {index} of the flapping-relay test, marker {marker}.",
            ".a line that starts with a dot",
            "..two dots",
            ".",
            "a lone dot above; it must not end the DATA"]
    if index % BIG_EVERY == 7:
        body += [f"{n:06d} " + "x" * 64 for n in range(3000)]       # ~210 KiB
    body += ["", "Last line."]
    head = [f"From: <{SENDER}>", f"To: {', '.join(f'<{r}>' for r in recipients)}",
            f"Subject: flapping relay {index}", f"Message-ID: <{marker}@flap.example.net>",
            f"X-Test-Marker: {marker}", "MIME-Version: 1.0", "Content-Type: text/plain; charset=us-ascii"]
    return ("\r\n".join(head) + "\r\n\r\n" + "\r\n".join(body) + "\r\n").encode()


def wait_until_queue_empty(server, deadline: float) -> int:
    """Poll `mailgw queue list` until the queue is empty; returns the number of polls."""
    end = time.monotonic() + deadline
    polls = 0
    while True:
        polls += 1
        done = queue_list(server)
        assert done.returncode == 0, done.stderr
        if "mail queue is empty" in done.stdout:
            return polls
        assert time.monotonic() < end, f"queue not empty {deadline}s after the target came back:\n" + \
            done.stdout[-3000:]


def _has_queue_key(key: str) -> bool:
    from mailgw import config
    return key in getattr(config, "QUEUE_SECONDS_LIMITS", {})


@pytest.mark.parametrize("reuse", [True, False], ids=["reuse", "one-per-connection"])
def test_flapping_relay_target_every_message_delivered_duplicates_only_after_the_dot(make_server, tmp_path, reuse):
    if not reuse and not _has_queue_key("connection_cache_time"):
        pytest.skip("no [queue] connection_cache_time: connections are never reused anyway")
    started = time.monotonic()
    rng = random.Random(SEED)
    target = FlappingTarget(SEED, FLAP_BLOCKS).start()
    try:
        server = make_server(relay_port=target.port, extra=QUEUE_EXTRA + ("" if reuse else REUSE_OFF)).start()

        # -- submit: MESSAGES messages, 1-3 remote recipients each, from the trusted address
        sent: dict[str, dict] = {}
        client = server.smtp("relay", source="127.0.0.2")
        client.ehlo()
        for index in range(MESSAGES):
            marker = f"flap{index:03d}-{uuid.uuid4().hex[:12]}"
            count = rng.randint(1, 3)
            recipients: list[str] = []
            while len(recipients) < count:      # same domain often: they share the transaction anyway
                address = f"user{rng.randint(0, 9)}@{rng.choice(DOMAINS)}"
                if address not in recipients:
                    recipients.append(address)
            message = build(marker, index, recipients)
            queue_id = server.send(client, SENDER, recipients, message)
            sent[marker] = {"queue_id": queue_id, "recipients": recipients, "message": message}
        client.quit()
        submitted = time.monotonic()

        # -- the target flaps until its schedule is used up, then accepts everything
        assert target.flap_over.wait(FLAP_DEADLINE), \
            f"flap schedule not used up after {FLAP_DEADLINE}s: {sum(target.draws.values())} of " \
            f"{target.scheduled} behaviours drawn"
        flap_over = time.monotonic()
        with target.lock:
            delivered_while_flapping = len({r["marker"] for r in target.records if r["kind"].startswith("accepted")})
        polls = wait_until_queue_empty(server, DRAIN_DEADLINE)
        drained = time.monotonic()
        target.wait_idle(IDLE_DEADLINE)
    finally:
        target.stop()
    wall = time.monotonic() - started

    # -- the target's view: per (message, recipient) pair, its copies in arrival order ------------
    strays = [r for r in target.records if r["marker"] not in sent]
    by_pair: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for record in sorted(target.records, key=lambda r: r["seq"]):
        if record["marker"] in sent:
            for rcpt in record["rcpts"]:
                by_pair[(record["marker"], rcpt)].append(record)
    pairs = [(marker, rcpt) for marker, info in sent.items() for rcpt in info["recipients"]]
    kinds = Counter(record["kind"] for record in target.records)
    duplicates = sum(len(records) - 1 for records in by_pair.values())
    duplicated_by_kind = Counter(record["kind"] for records in by_pair.values() for record in records[:-1])
    after_dot_pair_records = sum(len(r["rcpts"]) for r in target.records
                                 if r["kind"] in ("after-dot-drop", "after-dot-stall"))

    # -- mailgw's view: its log -------------------------------------------------------------------------
    log = server.log_text()
    statuses: Counter = Counter()
    sent_lines: Counter = Counter()
    for queue_id, to, status in _LOG_RESULT.findall(log):
        statuses[status] += 1
        if status == "sent":
            sent_lines[(queue_id, to)] += 1

    # -- report (before the verdicts, so a failing run is reported too) ------------------------------
    summary = {
        "seed": SEED,
        "connection_reuse": reuse,
        "messages": MESSAGES,
        "pairs": len(pairs),
        "connections": target.connections,
        "behaviours_drawn": dict(sorted(target.draws.items())),
        "target_events": dict(sorted(target.events.items())),
        "target_records": dict(sorted(kinds.items())),
        "messages_accepted_while_flapping": delivered_while_flapping,
        "duplicates": duplicates,
        "duplicates_by_cause": dict(sorted(duplicated_by_kind.items())),
        "max_copies_of_a_pair": max((len(r) for r in by_pair.values()), default=0),
        "mailgw_log_results": dict(sorted(statuses.items())),
        "queue_polls": polls,
        "seconds": {"submit": round(submitted - started, 2), "flapping": round(flap_over - submitted, 2),
                    "drain_after_switch": round(drained - flap_over, 2), "wall": round(wall, 2)},
    }
    text = "\n".join([
        f"flapping relay: {MESSAGES} messages, {len(pairs)} (message, recipient) pairs, seed {SEED}, "
        f"connection reuse {'on' if reuse else 'off'}",
        f"  target connections: {target.connections}; behaviours drawn while flapping (per connection, and per "
        f"further transaction on one): {summary['behaviours_drawn']}",
        f"  target events: {summary['target_events']}",
        f"  target records: {summary['target_records']}",
        f"  duplicates: {duplicates} (by kind of the earlier copy: {summary['duplicates_by_cause']}), "
        f"max copies of one pair: {summary['max_copies_of_a_pair']}",
        f"  mailgw log: {summary['mailgw_log_results']}",
        f"  seconds: {summary['seconds']}",
    ])
    print("\n" + text)
    (tmp_path / "flapping-summary.txt").write_text(text + "\n")
    (tmp_path / "flapping-summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    # -- verdicts ---------------------------------------------------------------------------------------
    if "Traceback" in log:
        at = log.index("Traceback")
        pytest.fail("Traceback in the server log:\n" + log[max(0, at - 2000):at + 4000])
    assert "Unhandled" not in log
    assert not target.anomalies, target.anomalies[:20]
    assert set(target.draws) == set(CYCLE), f"not every behaviour occurred: {dict(target.draws)}"
    assert not strays, f"the target got a message nobody sent: {strays[0]['data'][:300]!r}"
    for record in target.records:
        marker = record["marker"]
        assert record["sender"] == SENDER, \
            f"unexpected sender <{record['sender']}> (a bounce or delay notice?) for {record['rcpts']}"
        assert record["data"].startswith(b"Received: "), record["data"][:200]
        assert record["data"].endswith(sent[marker]["message"]), \
            f"{marker}: content changed in transit ({record['kind']}, conn {record['conn']})"
        for rcpt in record["rcpts"]:
            assert rcpt in sent[marker]["recipients"], f"{marker}: sent to {rcpt}, not a recipient"

    # Nothing lost: every pair reached the target.
    lost = [pair for pair in pairs if pair not in by_pair]
    assert not lost, f"{len(lost)} (message, recipient) pairs never reached the target: {lost[:10]}"
    # Each pair: its last copy is the one 250 mailgw read; every earlier copy is one SMTP cannot avoid.
    unconfirmed_final, not_last, avoidable = [], [], []
    for pair in pairs:
        *earlier, last = by_pair[pair]
        if last["kind"] == "accepted-unconfirmed":
            unconfirmed_final.append(pair)
        elif last["kind"] != "accepted":
            not_last.append((pair, last["kind"], last["conn"]))
        avoidable += [(pair, r["kind"], r["conn"], [x["kind"] for x in by_pair[pair]])
                      for r in earlier if r["kind"] not in AMBIGUOUS]
    assert not avoidable, f"a pair was sent again after mailgw had read its 250: {avoidable[:10]}"
    assert not not_last, f"pairs whose last copy is not a 250 mailgw read: {not_last[:10]}"
    # Every copy cut after its final dot was sent again (nothing told mailgw it had arrived): those are
    # exactly the duplicates, plus 250s mailgw may not have read (none expected with data_timeout 3 s).
    assert duplicates == after_dot_pair_records + duplicated_by_kind["accepted-unconfirmed"], \
        (duplicates, after_dot_pair_records, dict(duplicated_by_kind))
    assert not unconfirmed_final, \
        f"{len(unconfirmed_final)} pairs whose final 250 was never followed by a command: {unconfirmed_final[:10]}"

    # Nothing bounced; mailgw counted one success per pair and deferrals for the faults.
    assert not statuses["bounced"] and not statuses["expired"], dict(statuses)
    assert " notice " not in log, "a DSN notice was made for a temporary failure"
    assert statuses["deferred"] > 0, dict(statuses)
    for marker, info in sent.items():
        for rcpt in info["recipients"]:
            assert sent_lines[(info["queue_id"], rcpt)] == 1, \
                f"{info['queue_id']} to=<{rcpt}>: {sent_lines[(info['queue_id'], rcpt)]} status=sent lines"
    assert sum(sent_lines.values()) == len(pairs), dict(statuses)
    assert wall < 120, f"took {wall:.0f}s"
