#!/usr/bin/env python3
"""Reactor-thread py-spy samples of mailgw by category (used for issue 16, rspamd in the path).

    python3 bench/pyspy_categories.py NAME=RAW=MS [NAME=RAW=MS ...]

RAW is a `py-spy record --format raw --threads` file as bench/profile_smtp.py writes it
(OUT.cpu.raw.txt), MS the reactor thread's CPU ms/msg of a run of the same workload (profile_smtp.py's
reactor_ms_per_msg). Only MainThread samples count. Each sample goes to the category of the innermost
frame that matches one of RULES (checked in order), so the categories do not overlap; ms/msg =
share x MS. Prints a markdown table; the last column is the first NAME minus the last.
"""
import collections
import sys

RULES = [  # (category, predicate on one frame "func (path:line)"), the innermost matching frame decides
 ("I/O pool hand-off (IOThreadPool.callInThread)", lambda f: "mailgw/iopool.py" in f),
 ("logging (twisted.logger, log file)", lambda f: "twisted/logger/" in f or "logfile.py" in f or "twisted/python/log.py" in f and "callWithLogger" not in f and "callWithContext" not in f),
 ("rspamd: new TCP connection (HostnameEndpoint, getaddrinfo in the reactor's thread pool, connect)", lambda f: any(k in f for k in ("HostnameEndpoint", "GAIResolver", "doConnect", "BaseClient", "resolveAddress", "deferToThreadPool", "_threads/", "threadpool.py", "endpoints.py"))),
 ("rspamd: twisted.web HTTP client (request, response parser, connection pool, close)", lambda f: "twisted/web/" in f),
 ("rspamd: mailgw/spam/rspamd.py (headers, JSON, Scan)", lambda f: "mailgw/spam/" in f or "json/" in f),
 ("stage: X-Spam-* headers, Authentication-Results (mailauth/stages.py)", lambda f: "mailgw/mailauth/" in f),
 ("delivery (routing, store, durable, quota)", lambda f: any(k in f for k in ("mailgw/store/", "mailgw/routing/", "mailgw/durable.py", "mailgw/queue/"))),
 ("SMTP session (mailgw/smtp, mailgw/session, LineReceiver)", lambda f: any(k in f for k in ("mailgw/smtp/", "mailgw/session/", "protocols/basic.py", "twisted_wall.py"))),
 ("TCP teardown / accept (tcp.py connectionLost, close, accept)", lambda f: "tcp.py" in f and any(k in f for k in ("connectionLost", "_closeSocket", "doAccept", "accept", "_SocketCloser"))),
 ("socket send (Connection.writeSomeData)", lambda f: "writeSomeData" in f or "untilConcludes" in f),
 ("socket recv (Connection.doRead)", lambda f: "Connection.doRead" in f or "readFromFD" in f),
 ("Deferred machinery / zope.interface", lambda f: "defer.py" in f or "interface/" in f),
 ("epoll and the reactor loop", lambda f: "epollreactor.py" in f or "base.py" in f or "posixbase.py" in f),
]
def load(p):
    st = collections.Counter()
    for line in open(p):
        stack, _, c = line.rstrip("\n").rpartition(" ")
        if stack:
            st[stack] += int(c)
    return st
def classify(path):
    st = load(path)
    out = collections.Counter()
    tot = 0
    for s, c in st.items():
        parts = s.split(";")
        if not parts[0].endswith("MainThread"):
            continue
        tot += c
        frames = [f for f in parts[1:] if f][::-1]
        cat = "other"
        for f in frames:
            hit = next((name for name, pred in RULES if pred(f)), None)
            if hit:
                cat = hit
                break
        out[cat] += c
    return tot, out
res = {}
for arg in sys.argv[1:]:
    name, path, ms = arg.split("=")
    tot, out = classify(path)
    res[name] = (tot, out, float(ms))
cats = [n for n, _ in RULES] + ["other"]
names = list(res)
print("| reactor category (innermost matching frame) | " + " | ".join(f"{n}: % / ms/msg" for n in names) + " | Δ ms/msg |")
print("|---|" + "---|" * (len(names) + 1))
for cat in cats:
    vals = []
    for n in names:
        tot, out, ms = res[n]
        vals.append((out[cat] / tot, out[cat] / tot * ms))
    d = vals[0][1] - vals[-1][1]
    print(f"| {cat} | " + " | ".join(f"{p:.1%} / {m:.3f}" for p, m in vals) + f" | {d:+.3f} |")
print("| total | " + " | ".join(f"{res[n][0]} samples / {res[n][2]:.3f}" for n in names) + f" | {res[names[0]][2]-res[names[-1]][2]:+.3f} |")
