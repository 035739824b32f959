#!/usr/bin/env python3
"""Routing scale (issue 13): durable accept with 10,000 users and 1,000 aliases vs. without.

    python3 bench/routing_scale.py [--reps N] [--out PREFIX] [--modes shared,pinned]
                                   [--no-direct] [-n MESSAGES] [--port-a P] [--port-b P] [--keep-data]

Issue 13's requirement: "durable accept at 32 connections with 1,000 aliases and 10,000 users
configured is within 5 % of the figure without them (resolution must be an in-memory lookup,
reloaded on change)".

Two mailgw instances from this checkout (`PYTHONPATH=<repo> twistd -n mailgw --config ...`),
same config apart from port and data dir:

  A  baseline: users sink@gw.test and alice@gw.test (password secret, `mailgw users add`, as
     bench/smtp_accept.sh), no alias table;
  B  the same two users plus 10,000 generated users (written straight into the users file:
     one argon2id hash from argon2-cffi's PasswordHasher() reused for every generated line;
     sink and alice keep their real hashes) and 1,000 aliases in <data_dir>/aliases: 700 lists
     of 1-5 users, 200 groups (2-3 lists + a user), 99 tops (2 groups + a list: 3 levels)
     and `bench-sink@gw.test  sink@gw.test`.

Cells, each 2,000 x 2 KiB at C=32, 1 message per connection (smtp_accept.sh's C=32 row), waited
for in sink's Maildir (emptied before every run):
  A          RCPT sink@gw.test on A
  B-alias    RCPT bench-sink@gw.test on B (resolved through the alias table to sink)
  B-direct   RCPT sink@gw.test on B (users file lookup only; --no-direct drops it)

Rounds (`--modes`, default both, in this order): `shared` = nothing pinned; `pinned` = each
server under `taskset -c 0`, mailbench under `taskset -c 1`. Each round starts A and B fresh,
one warm-up of 100 messages per cell, then --reps repetitions, each running every cell once;
the cell order alternates (A first in odd reps, last in even ones). At the end of the last
round: B's alias table gets one more alias (atomic replace), and an SMTP RCPT to it must be
accepted within check_interval (1 s) + 3 s without a restart (the reload).

Before the rounds, an in-process probe (a subprocess running this file with --probe-resolve)
loads A's and B's tables the way the server does (UserFile + Resolver.from_config) and times
the table load (= what a reload costs, on the reactor thread) and one Resolver.resolve() of
each benchmark recipient (best of 5 x 20,000 calls): the per-RCPT cost of routing, too small
for throughput runs to resolve on a shared machine.

Checks recorded in PREFIX.txt: B's log lines "loaded N users" / "loaded N entries of the alias
table" in every round, `mailgw check`, `mailgw resolve` of the bench and a 3-level alias, the
Maildir count after every run (= the messages accepted), tracebacks in the logs.
Writes PREFIX.txt (environment, tables, checks) and PREFIX.jsonl (every mailbench line with its
command and meta). Everything started here is stopped by its PID on exit (also on Ctrl-C /
SIGTERM), and the scratch dir /tmp/mailgw-routing.XXXXXX is removed (unless --keep-data).

Env: BENCH=/work/shared/bench  PYTHON=python3  TWISTD=twistd
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import smtplib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import (MAILBENCH, PROCS, PYTHON, REPO, SINK, TWISTD, clear_maildir, env, loadavg, machine_line,
                      mailbench_json, on_exit, port_open, report_checks, stop_proc, transcript, twistd_log,
                      write_rec)

HERE = Path(__file__).resolve().parent

N_USERS = 10_000
N_ALIASES = 1_000
ALIAS_RCPT = "bench-sink@gw.test"

SCRATCH: Path | None = None
KEEP = False


# --------------------------------------------------------------------------- cleanup

def stop(name: str) -> None:
    stop_proc(name, timeout=10, label="mailgw pid")


def cleanup() -> None:
    for name in list(PROCS):
        try:
            stop(name)
        except Exception as e:  # noqa: BLE001 - keep cleaning up
            print(f"stopping {name}: {e}", file=sys.stderr)
    if SCRATCH is not None and SCRATCH.exists():
        if KEEP:
            print(f"data kept in {SCRATCH}")
        else:
            shutil.rmtree(SCRATCH, ignore_errors=True)


# --------------------------------------------------------------------------- setup

def cli(args, config: Path, stdin: str | None = None, check=True) -> subprocess.CompletedProcess:
    cp = subprocess.run([PYTHON, "-m", "mailgw.cli", *args, "--config", str(config)], input=stdin,
                        capture_output=True, text=True, timeout=120, env=env())
    if check and cp.returncode != 0:
        raise SystemExit(f"mailgw {' '.join(args)} failed ({cp.returncode}): {cp.stdout}{cp.stderr}")
    return cp


def write_config(d: Path, port: int) -> Path:
    config = d / "mailgw.toml"
    config.write_text(
        "# written by bench/routing_scale.py (same as bench/smtp_accept.sh's, port and data dir apart)\n"
        "[server]\n"
        'hostname = "mx.gw.test"\n'
        'local_domains = ["gw.test"]\n'
        'trusted_networks = ["127.0.0.0/8"]\n'
        f'data_dir = "{d}/data"\n'
        "\n[[listeners]]\n"
        'role = "relay"\n'
        f'endpoint = "tcp:{port}:interface=127.0.0.1"\n')
    return config


def replace_file(path: Path, text: str, mode=0o600) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def add_generated_users(users_file: Path, rng: random.Random) -> int:
    """Append N_USERS users to the users file, all with one argon2id hash (of a random password)."""
    from argon2 import PasswordHasher
    shared_hash = PasswordHasher().hash("not-used-%d" % rng.getrandbits(64))
    existing = users_file.read_text()
    lines = [f"user{i:05d}@gw.test:{shared_hash}" for i in range(N_USERS)]
    replace_file(users_file, existing.rstrip("\n") + "\n" + "\n".join(lines) + "\n")
    return len(lines)


def write_aliases(path: Path, rng: random.Random) -> dict:
    """N_ALIASES aliases: lists -> users, groups -> lists + user, tops -> groups + list, bench-sink."""
    n_lists, n_groups = 700, 200
    n_tops = N_ALIASES - n_lists - n_groups - 1
    user = lambda: f"user{rng.randrange(N_USERS):05d}@gw.test"  # noqa: E731
    out = ["# written by bench/routing_scale.py: lists -> users, groups -> lists, tops -> groups"]
    for i in range(n_lists):
        targets = sorted({user() for _ in range(rng.randint(1, 5))})
        out.append(f"list{i:04d}@gw.test  {', '.join(targets)}")
    for i in range(n_groups):
        targets = [f"list{j:04d}@gw.test" for j in rng.sample(range(n_lists), rng.randint(2, 3))] + [user()]
        out.append(f"group{i:04d}@gw.test  {', '.join(targets)}")
    for i in range(n_tops):
        targets = [f"group{j:04d}@gw.test" for j in rng.sample(range(n_groups), 2)] + \
                  [f"list{rng.randrange(n_lists):04d}@gw.test"]
        out.append(f"top{i:04d}@gw.test  {', '.join(targets)}")
    out.append(f"{ALIAS_RCPT}  {SINK}")
    replace_file(path, "\n".join(out) + "\n", mode=0o644)
    return dict(lists=n_lists, groups=n_groups, tops=n_tops, bench=1,
                total=n_lists + n_groups + n_tops + 1)


def start_server(name: str, d: Path, config: Path, port: int, pin: str | None, tag: str) -> dict:
    if port_open(port):
        raise SystemExit(f"port {port} is already in use")
    log = d / f"mailgw-{tag}.log"
    pidfile = d / "mailgw.pid"
    argv = ([ "taskset", "-c", pin] if pin else []) + [
        TWISTD, "-n", "--pidfile", str(pidfile), "--logfile", str(log), "mailgw", "--config", str(config)]
    stdout = open(d / f"stdout-{tag}.log", "w")
    proc = subprocess.Popen(argv, cwd=d, stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.STDOUT,
                            env=env(), start_new_session=True)
    PROCS[name] = proc     # taskset execs twistd: the PID is twistd's
    for _ in range(300):
        if port_open(port):
            break
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited: {(d / f'stdout-{tag}.log').read_text()[-2000:]}")
        time.sleep(0.1)
    else:
        raise SystemExit(f"{name} did not open port {port}")
    if pidfile.read_text().split()[0] != str(proc.pid):
        raise SystemExit(f"{name}: pid file {pidfile} does not hold {proc.pid}")
    allowed = [ln.split(":", 1)[1].strip() for ln in open(f"/proc/{proc.pid}/status")
               if ln.startswith("Cpus_allowed_list")][0]
    return dict(name=name, pid=proc.pid, pidfile=str(pidfile), log=str(log), port=port,
                cpus_allowed=allowed)


# --------------------------------------------------------------------------- measuring

def maildir_count(d: Path) -> int:
    return sum(len(os.listdir(d / sub)) for sub in ("new", "cur") if (d / sub).is_dir())


def run_mailbench(cell: dict, n: int, pin_client: str | None, meta: dict, log) -> dict:
    args = ["smtp", "--port", str(cell["port"]), "-n", str(n), "-s", "2048", "-c", "32", "-m", "1",
            "--to", cell["rcpt"], "--label", cell["name"], "--cpu-pidfile", cell["pidfile"],
            "--until-maildir", str(cell["maildir"]), "--deadline", "300"]
    argv = (["taskset", "-c", pin_client] if pin_client else []) + [PYTHON, str(MAILBENCH), *args]
    clear_maildir(cell["maildir"])
    t0 = time.time()
    rec = mailbench_json(argv)
    rec["meta"] = dict(meta, maildir_files=maildir_count(cell["maildir"]))
    write_rec(rec, " ".join(argv[:3] + ["mailbench.py"] + args) if pin_client else
              "python3 mailbench.py " + " ".join(args), t0, log)
    r = rec.get("result", {})
    print(f"  {meta['mode']:6} rep {meta['rep']!s:6} {cell['name']:8} "
          f"{r.get('msgs_per_s', r.get('fatal'))} msgs/s, ok {r.get('ok')}, errors {r.get('errors')}, "
          f"maildir {rec['meta']['maildir_files']}, cpu {r.get('server_cpu_ms_per_msg')} ms/msg, "
          f"other {r.get('other_cpu_s')} s", flush=True)
    return rec


def grep(path: str, needle: str) -> list[str]:
    try:
        return [ln.rstrip() for ln in open(path, errors="replace") if needle in ln]
    except FileNotFoundError:
        return []


def check_reload(b: dict, aliases: Path, check_interval: float = 1.0) -> tuple[bool, str]:
    """Add one alias to B's running table; RCPT to it must be accepted without a restart."""
    new = "reload-probe@gw.test"
    with smtplib.SMTP("127.0.0.1", b["port"], timeout=30) as s:
        s.ehlo("bench.test")
        s.mail("bench@sender.test")
        before = s.rcpt(new)[0]
        s.rset()
    text = aliases.read_text() + f"{new}  {SINK}\n"
    replace_file(aliases, text, mode=0o644)
    t0 = time.time()
    code = None
    while time.time() - t0 < check_interval + 3:
        with smtplib.SMTP("127.0.0.1", b["port"], timeout=30) as s:
            s.ehlo("bench.test")
            s.mail("bench@sender.test")
            code = s.rcpt(new)[0]
            s.rset()
        if code == 250:
            break
        time.sleep(0.2)
    took = time.time() - t0
    loaded = grep(b["log"], "loaded 1001 entries of the alias table")
    ok = before == 550 and code == 250 and bool(loaded)
    return ok, (f"RCPT {new}: {before} before the change, {code} {took:.1f} s after it; "
                f"log: {loaded[-1] if loaded else 'no line loaded 1001 entries'}")


def probe_resolve(config_path: str, addresses: list[str]) -> dict:
    """In-process (run in a subprocess with PYTHONPATH=<repo>): the time to load the tables
    (what a reload costs) and the time of one Resolver.resolve() per address, best of 5 x 20,000
    calls. The resolver is mailgw resolve's (mailgw.routing.admin.build_resolver:
    Resolver.from_config over a UserFile and an AliasFile, as the server builds it)."""
    import timeit
    from mailgw import config as config_module
    from mailgw.auth.userdb import UserFile
    from mailgw.routing.admin import _Clock
    from mailgw.routing.resolver import Resolver
    config = config_module.load(config_path)
    clock = _Clock()
    t0 = time.perf_counter()
    users = UserFile(config.users_file, threadpool=None, reactor=clock)
    t1 = time.perf_counter()
    resolver = Resolver.from_config(config, users, clock=clock)
    t2 = time.perf_counter()
    out = dict(config=config_path, users_load_ms=round((t1 - t0) * 1e3, 1),
               aliases_load_ms=round((t2 - t1) * 1e3, 1), users=len(resolver.users.addresses()),
               aliases=len(resolver.aliases.table().exact), resolve_us={}, targets={})
    for address in addresses:
        out["targets"][address] = [str(t) for t in resolver.resolve(address)]
        loops = 20000
        best = min(timeit.repeat(lambda: resolver.resolve(address), number=loops, repeat=5))
        out["resolve_us"][address] = round(best / loops * 1e6, 2)
    return out


# --------------------------------------------------------------------------- report

def median(xs):
    return statistics.median(xs) if xs else float("nan")


def half_range_pct(xs):
    return 50 * (max(xs) - min(xs)) / statistics.median(xs) if len(xs) > 1 and statistics.median(xs) else 0.0


def summarise(recs, modes, cells):
    """{mode: {cell: {field: [per-rep values]}}} of the measured (non-warm-up) runs."""
    fields = ("msgs_per_s", "delivered_msgs_per_s", "lat_p50_ms", "lat_p99_ms", "server_cpu_ms_per_msg",
              "other_cpu_s", "client_cpu_s", "errors")
    out = {m: {c: {f: [] for f in fields} for c in cells} for m in modes}
    for rec in recs:
        meta, r = rec["meta"], rec.get("result", {})
        if meta["rep"] == "warmup" or "msgs_per_s" not in r:
            continue
        for f in fields:
            if r.get(f) is not None:
                out[meta["mode"]][meta["cell"]][f].append(r[f])
    return out


def fmt(x, nd=1):
    return "–" if x is None or x != x else f"{x:,.{nd}f}"


def report(summary, modes, cells, reps):
    lines = []
    for m in modes:
        s = summary[m]
        a = s["A"]["msgs_per_s"]
        lines.append(f"\n### {m}: " + ("nothing pinned (servers, generator and the rest share both CPUs)"
                                        if m == "shared" else
                                        "servers `taskset -c 0`, mailbench `taskset -c 1`"))
        lines.append("")
        lines.append("| cell | RCPT | msgs/s median (±½-range) | B/A (ratio of medians) | B/A per rep "
                     "(median [min–max]) | delivered msgs/s | p50 ms | p99 ms | server CPU ms/msg | "
                     "CPU B/A | other-CPU s | errors |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for c in cells:
            v = s[c]["msgs_per_s"]
            if not v:
                continue
            rcpt = ALIAS_RCPT if c == "B-alias" else SINK
            if c == "A" or not a:
                ratio, per_rep = "1", "–"
                cpu_ratio = "1"
            else:
                ratio = f"{median(v) / median(a):.3f}"
                pr = [b / x for b, x in zip(v, a)]
                per_rep = f"{median(pr):.3f} [{min(pr):.3f}–{max(pr):.3f}]"
                ca, cb = s["A"]["server_cpu_ms_per_msg"], s[c]["server_cpu_ms_per_msg"]
                cpu_ratio = f"{median(cb) / median(ca):.3f}" if ca and cb else "–"
            lines.append(
                f"| {c} | {rcpt} | {fmt(median(v))} (±{half_range_pct(v):.0f}%) | {ratio} | {per_rep} | "
                f"{fmt(median(s[c]['delivered_msgs_per_s']))} | {fmt(median(s[c]['lat_p50_ms']))} | "
                f"{fmt(median(s[c]['lat_p99_ms']))} | {fmt(median(s[c]['server_cpu_ms_per_msg']), 3)} | "
                f"{cpu_ratio} | {fmt(median(s[c]['other_cpu_s']), 2)} | {sum(s[c]['errors']):.0f} |")
        lines.append("")
        lines.append("per rep msgs/s (run order alternates: A first in odd reps, last in even reps):")
        for c in cells:
            lines.append(f"  {c:8}: " + ", ".join(fmt(x) for x in s[c]["msgs_per_s"]))
    return "\n".join(lines)


# --------------------------------------------------------------------------- main

def main() -> int:
    global SCRATCH, KEEP
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("-n", "--count", type=int, default=2000)
    ap.add_argument("--modes", default="shared,pinned")
    ap.add_argument("--no-direct", action="store_true", help="skip the B-direct cell")
    ap.add_argument("--port-a", type=int, default=2571)
    ap.add_argument("--port-b", type=int, default=2572)
    ap.add_argument("--out", default=None)
    ap.add_argument("--keep-data", action="store_true")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--probe-resolve", nargs="+", metavar=("CONFIG", "ADDRESS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe_resolve:     # internal: the in-process resolution probe, one JSON line
        print(json.dumps(probe_resolve(args.probe_resolve[0], args.probe_resolve[1:])))
        return 0
    modes = [m for m in args.modes.split(",") if m]
    if any(m not in ("shared", "pinned") for m in modes) or not 1 <= args.reps <= 50:
        ap.error("--modes takes shared,pinned; --reps 1..50")
    if "pinned" in modes and os.cpu_count() < 2:
        ap.error("pinned mode needs 2 CPUs")
    cells = ["A", "B-alias"] + ([] if args.no_direct else ["B-direct"])
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip() or "nogit"
    out = Path(args.out) if args.out else HERE / "results" / f"routing-scale-{head}"
    out.parent.mkdir(parents=True, exist_ok=True)
    KEEP = args.keep_data

    on_exit(cleanup)
    SCRATCH = Path(tempfile.mkdtemp(prefix="mailgw-routing.", dir="/tmp"))
    rng = random.Random(args.seed)
    say, txt = transcript()

    # ---- data dirs, users, aliases
    dirs = {"A": SCRATCH / "A", "B": SCRATCH / "B"}
    configs = {}
    for name, port in (("A", args.port_a), ("B", args.port_b)):
        dirs[name].mkdir()
        configs[name] = write_config(dirs[name], port)
        for u in (SINK, "alice@gw.test"):
            cli(["users", "add", u], configs[name], stdin="secret\n")
        (dirs[name] / "data" / "mail" / "gw.test" / "sink").mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    n_gen = add_generated_users(dirs["B"] / "data" / "users", rng)
    alias_counts = write_aliases(dirs["B"] / "data" / "aliases", rng)
    gen_s = time.time() - t0
    checks: list[tuple[str, bool, str]] = []
    for name in ("A", "B"):
        cp = cli(["check"], configs[name], check=False)
        checks.append((f"mailgw check ({name})", cp.returncode == 0, (cp.stdout + cp.stderr).strip()[-300:].replace("\n", "; ")))
    cp = cli(["resolve", ALIAS_RCPT, "top0000@gw.test"], configs["B"], check=False)
    res = cp.stdout.strip().splitlines()
    bench_targets = [ln.split(": ", 1)[1] for ln in res if ln.startswith(ALIAS_RCPT + ": ")]
    top_targets = [ln for ln in res if ln.startswith("top0000@gw.test: ")]
    checks.append((f"mailgw resolve {ALIAS_RCPT} (B)", cp.returncode == 0 and bench_targets == [SINK],
                   f"-> {bench_targets}"))
    checks.append(("mailgw resolve top0000@gw.test (B, 3 levels: top -> groups -> lists -> users)",
                   cp.returncode == 0 and len(top_targets) >= 2, f"-> {len(top_targets)} mailboxes"))

    # ---- resolution cost, in process (no server running yet)
    probes = {}
    for name, addresses in (("A", [SINK]), ("B", [SINK, ALIAS_RCPT, "top0000@gw.test"])):
        cp = subprocess.run([PYTHON, str(Path(__file__).resolve()), "--probe-resolve", str(configs[name]),
                             *addresses], capture_output=True, text=True, timeout=300, env=env())
        try:
            probes[name] = json.loads(cp.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            probes[name] = {"error": (cp.stdout + cp.stderr)[-500:]}

    # ---- environment
    porcelain = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True,
                               text=True).stdout.splitlines()
    say(f"# routing scale (issue 13): bench/routing_scale.py --reps {args.reps} --modes {','.join(modes)}"
        f"{' --no-direct' if args.no_direct else ''} -n {args.count}")
    say(f"date: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
    say(f"mailgw git: {head} (+ uncommitted: {len(porcelain)} paths; under mailgw/: "
        f"{' '.join(p for p in porcelain if ' mailgw/' in p) or 'none'})")
    say(machine_line())
    say(f"python: {sys.version.split()[0]}; load before: {loadavg()}")
    say(f"workload: {args.count} x 2 KiB, C=32, 1 message per connection, --until-maildir (sink's Maildir,"
        f" emptied before each run); warm-up 100 per cell per round; {args.reps} reps per round")
    say(f"A: users file 2 lines (sink, alice), no alias file; port {args.port_a}")
    say(f"B: users file {n_gen + 2} lines (sink, alice + {n_gen} generated with one shared argon2id hash), "
        f"aliases {alias_counts} ({gen_s:.1f} s to generate); port {args.port_b}")

    # ---- rounds
    recs = []
    log_lines: dict[str, list[str]] = {}
    with open(str(out) + ".jsonl", "w") as jl:
        for mode in modes:
            pin_srv, pin_cli = ("0", "1") if mode == "pinned" else (None, None)
            srv = {}
            for name, port in (("A", args.port_a), ("B", args.port_b)):
                srv[name] = start_server(name, dirs[name], configs[name], port, pin_srv, mode)
            say(f"\n== round {mode}: A pid {srv['A']['pid']} cpus {srv['A']['cpus_allowed']}, "
                f"B pid {srv['B']['pid']} cpus {srv['B']['cpus_allowed']}, mailbench cpus "
                f"{pin_cli or 'any'}; load {loadavg()}")
            table = {
                "A": dict(srv["A"], name="A", rcpt=SINK, maildir=dirs["A"] / "data/mail/gw.test/sink"),
                "B-alias": dict(srv["B"], name="B-alias", rcpt=ALIAS_RCPT,
                                maildir=dirs["B"] / "data/mail/gw.test/sink"),
                "B-direct": dict(srv["B"], name="B-direct", rcpt=SINK,
                                 maildir=dirs["B"] / "data/mail/gw.test/sink"),
            }
            for c in cells:
                recs.append(run_mailbench(table[c], min(100, args.count), pin_cli,
                                          dict(mode=mode, cell=c, rep="warmup"), jl))
            for rep in range(1, args.reps + 1):
                order = cells if rep % 2 else list(reversed(cells))
                for c in order:
                    recs.append(run_mailbench(table[c], args.count, pin_cli, dict(mode=mode, cell=c, rep=rep), jl))
            for name in ("A", "B"):
                clear_maildir(table["A" if name == "A" else "B-alias"]["maildir"])
            if mode == modes[-1]:
                ok, detail = check_reload(srv["B"], dirs["B"] / "data" / "aliases")
                checks.append(("reload on change (B, last round, no restart)", ok, detail))
            for name in ("A", "B"):
                stop(name)
                log_lines[f"{name}/{mode}"] = twistd_log(srv[name]["log"])
    say(f"load after: {loadavg()}")

    # ---- log checks
    for key, lines in log_lines.items():
        users = [ln.strip() for ln in lines if "loaded " in ln and " users from " in ln]
        aliases = [ln.strip() for ln in lines if "entries of the alias table" in ln]
        tracebacks = sum("Traceback" in ln for ln in lines)
        accepted = sum(": accepted " in ln for ln in lines)
        if key.startswith("B/"):
            ok = any(f"loaded {N_USERS + 2} users" in ln for ln in users) and \
                any(f"loaded {N_ALIASES} entries of the alias table" in ln for ln in aliases)
        else:
            ok = any("loaded 2 users" in ln for ln in users) and not aliases
        checks.append((f"log {key}: users/aliases loaded", ok and tracebacks == 0,
                       f"{(users[0].split(' [', 1)[-1] if users else 'no users line')} | "
                       f"{(aliases[0].split(' [', 1)[-1] if aliases else 'no alias table line')} | "
                       f"{tracebacks} tracebacks, {accepted} ': accepted ' lines"))
    measured = [r for r in recs]
    bad = [r for r in measured if r.get("result", {}).get("ok") != r["meta"]["maildir_files"]
           or r.get("result", {}).get("errors")]
    total_files = sum(r["meta"]["maildir_files"] for r in measured)
    checks.append(("every run: files in sink's Maildir = messages accepted, no errors", not bad,
                   f"{total_files} files counted over {len(measured)} runs"
                   + (f"; mismatches: {[(r['meta'], r.get('result', {}).get('ok')) for r in bad][:5]}"
                      if bad else "")))

    summary = summarise(recs, modes, cells)
    say("\n## resolution cost in process (Resolver.resolve per call, best of 5 x 20,000; table load = reload)")
    for name, p in probes.items():
        if "error" in p:
            say(f"  {name}: probe failed: {p['error']}")
            continue
        say(f"  {name}: {p['users']} users loaded in {p['users_load_ms']:.1f} ms, {p['aliases']} exact aliases "
            f"in {p['aliases_load_ms']:.1f} ms (at start and on each change, on the reactor thread); "
            + "; ".join(f"resolve({a}) {us:.2f} us -> {len(p['targets'][a])} target(s)"
                        for a, us in p["resolve_us"].items()))
    cpu_a = [median(summary[m]["A"]["server_cpu_ms_per_msg"]) for m in modes if summary[m]["A"]["server_cpu_ms_per_msg"]]
    if cpu_a and all("error" not in p for p in probes.values()):
        extra = probes["B"]["resolve_us"][ALIAS_RCPT] - probes["A"]["resolve_us"][SINK]
        say(f"  B-alias minus A per RCPT: {extra:.2f} us = {extra / (min(cpu_a) * 1e3) * 100:.3f} % of A's "
            f"server CPU per message ({min(cpu_a):.3f} ms, the lower round median)")
    say("\n## results (msgs/s = accepted msgs/s from mailbench; delivered = until in the Maildir)")
    say(report(summary, modes, cells, args.reps))
    say("\n## verdict against issue 13 (B within 5 % of A: B-alias/A >= 0.95, ratio of medians)")
    for m in modes:
        a, b = summary[m]["A"]["msgs_per_s"], summary[m]["B-alias"]["msgs_per_s"]
        if a and b:
            r = median(b) / median(a)
            say(f"  {m:6}: A {median(a):,.1f}, B-alias {median(b):,.1f} msgs/s -> B/A {r:.3f} "
                f"({'NOT within 5 %' if r < 0.95 else 'within 5 %' if r <= 1.05 else 'not slower; B faster by more than 5 %: noise'}); A's own spread ±{half_range_pct(a):.0f}%, "
                f"B's ±{half_range_pct(b):.0f}%")
    return report_checks(checks, say, txt, out)


if __name__ == "__main__":
    sys.exit(main())
