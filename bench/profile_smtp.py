#!/usr/bin/env python3
"""Where does a running mailgw spend its time under one SMTP workload?

    python3 bench/profile_smtp.py --pidfile D/mailgw.pid --port 2540 \
        --maildir D/data/mail/gw.test/sink -n 2000 -s 2048 -c 32 -m 1 \
        [--pyspy idle|gil|cpu|none] [--rate 250] [--out /tmp/prof-c32] [--top 25]
    python3 bench/profile_smtp.py --pidfile D/mailgw.pid --port 2550 \
        --counter-file /tmp/peers/sink/count.log ...      (relay: bench/smtp_relay.sh --serve)

1. Per-thread CPU from /proc/PID/task/*/stat (user and system seconds, before/after): the
   reactor thread (TID == PID) versus the thread-pool threads (I/O + auth pools together:
   Python 3.11 does not name OS threads, so /proc tells them apart only by TID). No profiler.
2. Optionally a second run of the same workload under `py-spy record --format raw --threads`
   (needs `pip install py-spy`), aggregated here into: samples per thread class (reactor =
   MainThread, io-pool = PoolThread-mailgw-io-*, other), top functions by self samples, top
   source lines by self samples, and top functions by inclusive samples.
     --pyspy idle : every thread, also when blocked (wall-clock view: epoll wait, fsync wait)
     --pyspy cpu  : only samples where the thread is running (py-spy's default)
     --pyspy gil  : only the thread holding the GIL (who serialises the process)
Prints one JSON line with the CPU split, and tables for the profile. Loopback only; bounded.
With --counter-file (relaying to smtp-sink) each run lasts until the sink has counted every
message, so the CPU split and the profile include the queue runner and the outbound client
(they run on the reactor thread; the spool reads and writes in the pool threads).
"""
import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import time

MAILBENCH = os.environ.get("MAILBENCH", "/work/shared/bench/mailbench.py")
TICK = os.sysconf("SC_CLK_TCK")


def read_pid(pidfile):
    with open(pidfile) as f:
        return int(f.read().split()[0])


def thread_times(pid):
    """{tid: (utime_s, stime_s)} for every thread of pid."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[int(tid)] = (int(fields[11]) / TICK, int(fields[12]) / TICK)
        except (OSError, IndexError, ValueError):
            pass
    return out


def clear_maildir(d):
    for sub in ("new", "cur", "tmp"):
        p = os.path.join(d, sub)
        if os.path.isdir(p):
            for name in os.listdir(p):
                try:
                    os.unlink(os.path.join(p, name))
                except OSError:
                    pass


def mailbench(a, pid):
    cmd = [sys.executable, MAILBENCH, "smtp", "--port", str(a.port), "-n", str(a.n), "-s", str(a.s),
           "-c", str(a.c), "-m", str(a.m), "--to", a.rcpt, "--cpu-pid", str(pid), "--deadline", "300"]
    if a.maildir:
        cmd += ["--until-maildir", a.maildir]
    elif a.counter_file:
        cmd += ["--until-counter-file", a.counter_file]
    cp = subprocess.run(cmd, capture_output=True, text=True, timeout=360)
    line = cp.stdout.strip().splitlines()[-1] if cp.stdout.strip() else "{}"
    return json.loads(line).get("result", {"fatal": cp.stderr[-300:]})


def cpu_split(a, pid):
    before = thread_times(pid)
    t0 = time.monotonic()
    result = mailbench(a, pid)
    wall = time.monotonic() - t0
    after = thread_times(pid)
    split = {"reactor": [0.0, 0.0], "pool": [0.0, 0.0]}
    busy_pool_threads = 0
    for tid, (u, s) in after.items():
        u0, s0 = before.get(tid, (0.0, 0.0))
        cls = "reactor" if tid == pid else "pool"
        split[cls][0] += u - u0
        split[cls][1] += s - s0
        if cls == "pool" and (u - u0) + (s - s0) > 0:
            busy_pool_threads += 1
    ok = result.get("ok") or 1
    return {
        "workload": dict(n=a.n, s=a.s, c=a.c, m=a.m),
        "msgs_per_s": result.get("msgs_per_s"), "delivered_msgs_per_s": result.get("delivered_msgs_per_s"),
        "lat_p50_ms": result.get("lat_p50_ms"),
        "lat_p99_ms": result.get("lat_p99_ms"), "errors": result.get("errors"),
        "wall_s": round(wall, 3), "threads": len(after),
        "pool_threads_with_cpu": busy_pool_threads,
        "reactor_user_s": round(split["reactor"][0], 2), "reactor_sys_s": round(split["reactor"][1], 2),
        "pool_user_s": round(split["pool"][0], 2), "pool_sys_s": round(split["pool"][1], 2),
        "reactor_ms_per_msg": round(sum(split["reactor"]) / ok * 1000, 3),
        "pool_ms_per_msg": round(sum(split["pool"]) / ok * 1000, 3),
        "reactor_busy_pct": round(sum(split["reactor"]) / result.get("seconds", wall) * 100, 1)
        if result.get("seconds") else None,
        # relaying: the run ends at the last delivery, so this is the busy share of the whole run
        "reactor_busy_pct_until_delivered": round(sum(split["reactor"]) / result["delivered_seconds"] * 100, 1)
        if result.get("delivered_seconds") else None,
        "other_cpu_s": result.get("other_cpu_s"),
    }


def frame_name(frame):
    # raw format frame: "function (path/file.py:line)"; drop the line number
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path = where.rsplit(":", 1)[0]
    for cut in ("site-packages/", "/work/main/"):
        if cut in path:
            path = path.split(cut, 1)[1]
    return f"{name} ({path})"


def profile(a, pid):
    if not shutil.which("py-spy"):
        print("py-spy not found (pip install py-spy)", file=sys.stderr)
        return None
    raw = (a.out or f"/tmp/mailgw-prof-{os.getpid()}") + f".{a.pyspy}.raw.txt"
    cmd = ["py-spy", "record", "--pid", str(pid), "--format", "raw", "--threads", "--rate",
           str(a.rate), "--output", raw, "--nonblocking"]
    if a.pyspy == "idle":
        cmd.append("--idle")
    elif a.pyspy == "gil":
        cmd.append("--gil")
    spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)   # let it attach
    if a.maildir:
        clear_maildir(a.maildir)
    result = mailbench(a, pid)
    spy.send_signal(2)   # SIGINT: py-spy writes the file and exits
    try:
        spy.wait(timeout=60)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait()
    stacks = collections.Counter()
    with open(raw) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if stack:
                stacks[stack] += int(count)
    per_class = collections.Counter()
    classes = ("reactor", "io-pool", "other")
    self_t = {c: collections.Counter() for c in classes}
    line_t = {c: collections.Counter() for c in classes}
    incl_t = {c: collections.Counter() for c in classes}
    for stack, count in stacks.items():
        frames = stack.split(";")
        head = frames[0]               # "thread (TID): NAME"
        thread_name = head.split(": ", 1)[-1]
        frames = [fr for fr in frames[1:] if fr]
        cls = ("reactor" if thread_name == "MainThread"
               else "io-pool" if "mailgw-io" in thread_name else "other")
        per_class[cls] += count
        if not frames:
            continue
        names = [frame_name(fr) for fr in frames]
        self_t[cls][names[-1]] += count
        line_t[cls][frames[-1]] += count
        for n in set(names):
            incl_t[cls][n] += count
    return {"mode": a.pyspy, "raw": raw, "result": {k: result.get(k) for k in
            ("msgs_per_s", "delivered_msgs_per_s", "lat_p50_ms", "lat_p99_ms", "errors",
             "other_cpu_s")},
            "samples": dict(per_class), "self": self_t, "line": line_t, "inclusive": incl_t}


def print_profile(p, top):
    total = sum(p["samples"].values()) or 1
    print(f"\n### py-spy ({p['mode']}): {total} samples; "
          + ", ".join(f"{k} {v} ({v / total:.0%})" for k, v in p["samples"].items())
          + f"; run under profiler: {p['result']}")
    for cls in ("reactor", "io-pool", "other"):
        if not p["samples"].get(cls):
            continue
        n = p["samples"][cls]
        for kind in ("self", "line", "inclusive"):
            print(f"\n{cls} thread(s), top {top} by {kind} samples (% of this class's samples)")
            for name, c in p[kind][cls].most_common(top):
                print(f"  {c / n:6.1%}  {name}")
    print(f"\nraw stacks: {p['raw']}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pidfile", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--maildir")
    ap.add_argument("--counter-file", help="smtp-sink counter (relay): wait until it counted every message")
    ap.add_argument("--rcpt", default="sink@gw.test")
    ap.add_argument("-n", type=int, default=2000)
    ap.add_argument("-s", type=int, default=2048)
    ap.add_argument("-c", type=int, default=32)
    ap.add_argument("-m", type=int, default=1)
    ap.add_argument("--pyspy", choices=["idle", "gil", "cpu", "none"], default="none")
    ap.add_argument("--rate", type=int, default=250)
    ap.add_argument("--out")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--settle", type=float, default=0.0,
                    help="seconds to wait after emptying the Maildir before the run (ext4 without a "
                         "journal skips inodes deleted in the last dirty_expire_centisecs: 30 s)")
    a = ap.parse_args()
    pid = read_pid(a.pidfile)
    if a.maildir:
        clear_maildir(a.maildir)
    time.sleep(a.settle)
    print(json.dumps(cpu_split(a, pid)), flush=True)
    if a.pyspy != "none":
        p = profile(a, pid)
        if p:
            print_profile(p, a.top)
    if a.maildir:
        clear_maildir(a.maildir)


if __name__ == "__main__":
    main()
