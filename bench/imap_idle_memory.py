#!/usr/bin/env python3
"""Memory of idle IMAP IDLE connections: open N connections to an IMAP server on 127.0.0.1
(implicit TLS with --tls, STARTTLS with --starttls, else plain), each LOGIN + SELECT INBOX +
IDLE (waits for the "+" continuation), hold them, and read the server's VmRSS / VmHWM from
/proc/PID/status before, once all are idling (and again after --hold seconds), and after they
are closed. Prints one JSON line.

  python3 bench/imap_idle_memory.py --port 1193 --tls -n 1000 --login alice@gw.test:secret \\
      --pidfile /tmp/mailgw-mbox.X/mailgw.pid [--concurrency 50] [--deadline 240] [--hold 5]

Stdlib only. Loopback only. Raises its own RLIMIT_NOFILE soft limit to what N needs. The
server must admit N connections from 127.0.0.1 (mailgw: [imap] max_connections and
max_connections_per_ip; bench/mailbox.sh sets both to 1100).
"""
import argparse
import asyncio
import json
import os
import resource
import ssl
import time


def status(pid):
    """VmRSS, VmHWM in KiB and the thread count from /proc/PID/status, plus open fds."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
                out[k] = int(v.split()[0])
    try:
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        pass
    return out


def tree_rss_kib(pid):
    """VmRSS of pid and its descendants (mailgw under twistd -n is one process; in case not)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += status(p).get("VmRSS", 0)
            for t in os.listdir(f"/proc/{p}/task"):
                try:
                    with open(f"/proc/{p}/task/{t}/children") as f:
                        todo += [int(c) for c in f.read().split()]
                except OSError:
                    pass
        except OSError:
            pass
    return total


class Conn:
    def __init__(self, a, ctx, i):
        self.a, self.ctx, self.i = a, ctx, i
        self.r = self.w = None
        self.tag = 0

    async def line(self):
        ln = await self.r.readline()
        if not ln:
            raise ConnectionError("closed by server")
        return ln

    async def cmd(self, text):
        self.tag += 1
        t = f"a{self.tag}".encode()
        self.w.write(t + b" " + text.encode() + b"\r\n")
        await self.w.drain()
        while True:
            ln = await self.line()
            if ln.startswith(t + b" "):
                if not ln[len(t) + 1:].startswith(b"OK"):
                    raise RuntimeError(f"{text.split()[0]}: {ln!r}")
                return

    async def open(self):
        a = self.a
        self.r, self.w = await asyncio.open_connection(
            "127.0.0.1", a.port, ssl=self.ctx if a.tls else None, limit=1 << 20)
        await self.line()   # greeting
        if a.starttls:
            await self.cmd("STARTTLS")
            await self.w.start_tls(self.ctx)
        user, _, pw = a.login.partition(":")
        await self.cmd(f'LOGIN "{user}" "{pw}"')
        await self.cmd("SELECT INBOX")
        self.tag += 1
        self.idle_tag = f"a{self.tag}".encode()
        self.w.write(self.idle_tag + b" IDLE\r\n")
        await self.w.drain()
        while True:
            ln = await self.line()
            if ln.startswith(b"+"):
                return
            if ln.startswith(self.idle_tag):
                raise RuntimeError(f"IDLE: {ln!r}")

    async def close(self):
        try:
            self.w.write(b"DONE\r\n")
            self.w.write(b"z LOGOUT\r\n")
            await asyncio.wait_for(self.w.drain(), 5)
            self.w.close()
            await asyncio.wait_for(self.w.wait_closed(), 5)
        except Exception:
            pass


async def main(a):
    if a.port <= 0:
        raise SystemExit("--port")
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    pid = int(open(a.pidfile).read().split()[0])
    before = status(pid)
    before_tree = tree_rss_kib(pid)
    sem = asyncio.Semaphore(a.concurrency)
    conns, errors = [], []
    t0 = time.monotonic()

    async def one(i):
        c = Conn(a, ctx, i)
        async with sem:
            try:
                await c.open()
                conns.append(c)
            except Exception as e:   # counted and reported, not fatal
                errors.append(f"{type(e).__name__}: {e}"[:200])
                if c.w:
                    c.w.close()

    tasks = [asyncio.create_task(one(i)) for i in range(a.n)]
    done, pending = await asyncio.wait(tasks, timeout=a.deadline)
    for t in pending:
        t.cancel()
    setup_s = time.monotonic() - t0
    await asyncio.sleep(1.0)   # let the server finish whatever follows the "+"
    idling = status(pid)
    idling_tree = tree_rss_kib(pid)
    held = None
    if a.hold > 0:
        await asyncio.sleep(a.hold)
        held = status(pid)
    # still alive? (a NOOP is not allowed in IDLE; check that nothing closed them)
    alive = sum(1 for c in conns if not c.r.at_eof())
    await asyncio.gather(*(c.close() for c in conns))
    await asyncio.sleep(2.0)
    after = status(pid)
    n_ok = len(conns)
    delta = idling["VmRSS"] - before["VmRSS"]
    res = dict(
        tool="imap_idle_memory", port=a.port,
        mode="tls" if a.tls else ("starttls" if a.starttls else "plain"),
        requested=a.n, idling=n_ok, alive_before_close=alive, errors=len(errors),
        error_samples=sorted(set(errors))[:5], pending_at_deadline=len(pending),
        setup_s=round(setup_s, 2), concurrency=a.concurrency,
        rss_before_mib=round(before["VmRSS"] / 1024, 1),
        rss_idling_mib=round(idling["VmRSS"] / 1024, 1),
        rss_after_hold_mib=round(held["VmRSS"] / 1024, 1) if held else None,
        rss_after_close_mib=round(after["VmRSS"] / 1024, 1),
        hwm_mib=round(after.get("VmHWM", 0) / 1024, 1),
        rss_delta_mib=round(delta / 1024, 1),
        kib_per_connection=round(delta / n_ok, 1) if n_ok else None,
        tree_rss_before_mib=round(before_tree / 1024, 1),
        tree_rss_idling_mib=round(idling_tree / 1024, 1),
        server_fds_idling=idling.get("fds"), server_threads=idling.get("Threads"),
        anon_idling_mib=round(idling.get("RssAnon", 0) / 1024, 1),
        target_total_rss_under_200mib=idling["VmRSS"] < 200 * 1024,
    )
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("-n", type=int, default=1000)
    ap.add_argument("--login", default="alice@gw.test:secret")
    ap.add_argument("--pidfile", required=True)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--tls", action="store_true", help="implicit TLS (imaps)")
    g.add_argument("--starttls", action="store_true")
    ap.add_argument("--concurrency", type=int, default=50, help="connections being set up at once")
    ap.add_argument("--deadline", type=float, default=240.0, help="seconds for the set-up")
    ap.add_argument("--hold", type=float, default=5.0, help="seconds to hold, then RSS again")
    a = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = a.n + 64
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(need, soft), hard), hard))
    asyncio.run(main(a))
