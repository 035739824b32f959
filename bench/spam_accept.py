#!/usr/bin/env python3
"""Durable accept with rspamd in the path (issue 16): mailgw vs. Postfix + rspamd's milter, C=32.

    python3 bench/spam_accept.py [--reps N] [--out PREFIX] [--modes pinned,shared] [-n MESSAGES]
                                 [-c CONC] [-m PER_CONN] [--rspamd-workers N] [--port-base P]
                                 [--settle S] [--keep-data]
    python3 bench/spam_accept.py --serve SECONDS [--serve-mode pinned|shared] [--port-base P]
                                 [--serve-cells mailgw+rspamd,mailgw]
        only rspamd and mailgw+rspamd (and/or the mailgw baseline), for bench/profile_smtp.py:
        prints each pid file, port and Maildir, stops everything after SECONDS (or on Ctrl-C /
        SIGTERM). Pinned (default): rspamd and mailgw on CPU 1; run the profiler under
        `taskset -c 0`.

Issue 16's requirement: durable accept at 32 connections with rspamd in the path, next to Postfix
with rspamd as its milter (rspamd_proxy in milter mode, Debian's package) in the same run:
mailgw's msgs/s at least Postfix's.

Four servers, all on 127.0.0.1, all started here (the shared peers on 2525 are not used or touched):

  mailgw           this checkout: relay listener, local domain gw.test, user sink@gw.test, Maildir
                   delivery (as bench/smtp_accept.sh), but trusted_networks = [] so that the
                   generator on 127.0.0.1 is an untrusted inbound client -- mailgw scans only mail
                   from untrusted clients on the relay role. [smtp] max_connections_per_ip = 64
                   (untrusted clients are held to it; the default 20 would refuse 12 of 32).
                   [checks] spf/dkim/dmarc/arc/reverse_dns = false: Postfix here does none of them
                   either, and they would ask DNS; [dns] nameservers = 127.0.0.1:9 so that nothing
                   can leave the machine. No [spam]: the baseline.
  mailgw+rspamd    the same plus [spam] rspamd_url = the normal worker, on_failure = "defer"
                   (a failed scan is a 451 the run counts as an error, never unscanned mail)
  postfix          a Postfix 3.7 instance with the shared peer's main.cf / master.cf
                   (/work/shared/bench/peers/postfix: virtual(8) to a Maildir, durable), only port,
                   queue / data directories, log file and mailbox base changed. The baseline.
  postfix+rspamd   a second such instance with smtpd_milters = inet:127.0.0.1:PROXY (rspamd_proxy,
                   milter = yes, upstream = the same normal worker), milter_protocol = 6,
                   milter_default_action = tempfail (a milter failure is a 4xx the run counts)

rspamd: one instance per round, tests/e2e/rspamd_server.py (Debian's rspamd 3.4 rule set, no
network: DNS/HTTP modules off, resolver on a dead loopback port), --rspamd-workers normal
workers (default 1), a controller, and the milter proxy. Both rspamd cells use the *same*
instance, so the scanner is the same for both; the baselines do not use it. Its hyperscan cache
is the shared one (rspamd_server.py waits until it is loaded).

Workload per run: mailbench.py smtp -n N -s 2048 -c C -m M --from bench@sender.test
--to sink@gw.test --until-maildir <the server's sink Maildir> (emptied, sync(2), --settle seconds
before each run). Per run also: rspamd's /stat "scanned" before and after (the delta must be the
number of messages accepted for an rspamd cell, 0 for a baseline), the CPU of rspamd's process
tree before and after (per process: main, normal, controller, rspamd_proxy, hs_helper), and 3
delivered files checked: mailgw+rspamd's must carry X-Spam-Score / X-Spam-Action (mailgw's
headers from the scan), the baselines' none of rspamd's or mailgw's spam headers. Debian's
milter_headers has `use = []`, so rspamd's milter adds no header to ham: for postfix+rspamd the
proof is the scanned delta and rspamd's log line for each sampled message's Message-ID.

CPU per message: server = mailbench's --cpu-pidfile (twistd's pid, one process; for Postfix the
master, whose tree holds smtpd, cleanup, qmgr, trivial-rewrite, virtual, anvil, postlogd);
rspamd = its tree, measured here; total = both. "other CPU" = mailbench's other_cpu_s minus
rspamd's (everything neither server, rspamd nor the generator: the noise).

Rounds (--modes, default pinned then shared): `pinned` = every server process (twistd started
under `taskset -c 1`, both Postfix instances with `taskset -c 1 postfix -c ETC start`, so the
master and every child it forks) AND rspamd (rspamd_server.py under `taskset -c 1`: rspamd and
all its workers inherit it) on CPU 1, mailbench on CPU 0 -- the server under test shares its CPU
with its scanner, identically for both; `shared` = nothing pinned. Each round starts rspamd and
the four servers fresh, checks the scan path (3 messages per cell), warms each cell up with 200
messages, then runs --reps repetitions of every cell, the order rotated by one cell per
repetition (never the same server twice in a row). Every process's Cpus_allowed_list is recorded
and, pinned, checked.

Writes PREFIX.txt (environment, tables, ratios, verdict, checks), PREFIX.jsonl (every mailbench
line with its command and meta), PREFIX.summary.json (medians per mode and cell) and
PREFIX.ratios.json (mailgw / postfix per mode). Everything started here is stopped by its PID
(Postfix instances by `postfix -c ETC stop`, then by the master's PID if still there; rspamd by
SIGTERM to rspamd_server.py, which stops rspamd) on exit, also on Ctrl-C / SIGTERM, and the
scratch dir is removed (unless --keep-data). Exit 1 if a check fails.

Env: BENCH=/work/shared/bench  PYTHON=python3  TWISTD=twistd
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import select
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from benchlib import (BENCH, DAEMONS, DOMAIN, PROCS, PYTHON, REPO, SERVER_CPU, SINK, TWISTD, add_run, cleanup,
                      clear_maildir, cli, comm, cpus_allowed, env, fmt, git_head, half_range_pct, header_lines,
                      loadavg, mailbench_smtp, maildir_check, maildir_files, measured_runs, median, on_exit, pins,
                      port_open, postfix_log_checks, proc_table, report_checks, rotation, run, sbin_on_path,
                      scratch_dir, setup_postfix, start_cells, start_mailgw, stop_cells, stop_proc, transcript,
                      tree, write_rec)

HERE = Path(__file__).resolve().parent
RSPAMD_SERVER = REPO / "tests" / "e2e" / "rspamd_server.py"
sbin_on_path()

FROM = "bench@sender.test"          # an outside sender: inbound mail
CELLS = ("mailgw", "mailgw+rspamd", "postfix", "postfix+rspamd")
SCANNED = {"mailgw": False, "mailgw+rspamd": True, "postfix": False, "postfix+rspamd": True}
MILTER = ("smtpd_milters={milter}", "milter_protocol=6", "milter_default_action=tempfail")
STOP_TIMEOUT = 30    # s, for mailgw and rspamd_server.py to stop after SIGTERM


# --------------------------------------------------------------------------- processes

def rspamd_role(pid: int) -> str:
    """main / normal / controller / rspamd_proxy / hs_helper ... from rspamd's process title."""
    try:
        title = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"
    m = re.search(r"rspamd: (\w+) process", title)
    if m:
        return m.group(1)
    return "main" if "main process" in title or title.startswith("rspamd") else title[:30]


def tree_cpu_by_role(pid: int) -> dict[str, float]:
    """CPU seconds of rspamd's tree, per process role (reaped children count in their parent)."""
    table = proc_table()
    out: dict[str, float] = {}
    for p in tree(pid, table):
        role = rspamd_role(p)
        out[role] = out.get(role, 0.0) + table[p][1]
    return out


# --------------------------------------------------------------------------- helpers

def http_json(url: str, timeout: float = 10.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


# --------------------------------------------------------------------------- set-up

def write_mailgw_config(d: Path, port: int, rspamd_url: str | None) -> Path:
    config = d / "mailgw.toml"
    spam = ("\n# issue 16: rspamd in the path; a failed scan is 451 (counted), never unscanned mail\n"
            "[spam]\n"
            f'rspamd_url = "{rspamd_url}"\n'
            'on_failure = "defer"\n') if rspamd_url else ""
    config.write_text(
        "# written by bench/spam_accept.py (bench/smtp_accept.sh's config, the generator untrusted)\n"
        "[server]\n"
        'hostname = "mx.gw.test"\n'
        f'local_domains = ["{DOMAIN}"]\n'
        "# mailgw scans only mail from untrusted clients on the relay role: the generator's\n"
        "# 127.0.0.1 must not be trusted (smtp_accept.sh trusts 127.0.0.0/8)\n"
        "trusted_networks = []\n"
        f'data_dir = "{d}/data"\n'
        "\n[smtp]\n"
        "# untrusted clients are held to this (default 20): the generator opens 32 at once\n"
        "max_connections_per_ip = 64\n"
        "\n# Postfix here checks no SPF/DKIM/DMARC either, and they would ask DNS\n"
        "[checks]\n"
        "spf = false\ndkim = false\ndmarc = false\narc = false\nreverse_dns = false\n"
        "\n[dns]\n"
        "# nothing should ask; if something does, it fails at once, on loopback\n"
        'nameservers = ["127.0.0.1:9"]\n'
        f"{spam}"
        "\n[[listeners]]\n"
        'role = "relay"\n'
        f'endpoint = "tcp:{port}:interface=127.0.0.1"\n')
    return config


# --------------------------------------------------------------------------- servers

def start_rspamd(rsp: dict, pin: str | None, workers: int) -> None:
    for port in (rsp["normal"], rsp["controller"], rsp["proxy"]):
        if port_open(port):
            raise SystemExit(f"port {port} is already in use")
    argv = (["taskset", "-c", pin] if pin else []) + [
        PYTHON, str(RSPAMD_SERVER), "--root", str(rsp["root"]), "--normal-port", str(rsp["normal"]),
        "--controller-port", str(rsp["controller"]), "--proxy-port", str(rsp["proxy"]), "--workers", str(workers)]
    err = open(rsp["root"].parent / "rspamd_server.stderr", "a")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, text=True,
                            start_new_session=True, env=env())
    PROCS["rspamd"] = proc
    started = time.time()
    line = ""
    while time.time() < started + 300:      # a cold hyperscan compile takes ~20 s; bounded
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline()
            break
        if proc.poll() is not None:
            break
    try:
        info = json.loads(line)
    except json.JSONDecodeError:
        raise SystemExit(f"rspamd_server.py gave no JSON line ({line!r}); see {err.name}")
    DAEMONS["rspamd"] = info["pid"]      # stopped by its PID if rspamd_server.py could not stop it
    rsp.update(pid=info["pid"], normal_url=info["normal_url"], controller_url=info["controller_url"],
               milter=info["milter"], ready_s=round(time.time() - started, 1))


def rspamd_stat(rsp: dict) -> dict:
    s = http_json(rsp["controller_url"] + "/stat")
    return dict(scanned=int(s.get("scanned", 0)), actions=dict(s.get("actions", {})))


# --------------------------------------------------------------------------- measuring

def header_block(path: Path) -> str:
    data = path.read_bytes().replace(b"\r\n", b"\n")
    return data.split(b"\n\n", 1)[0].decode("utf-8", "replace")


def message_id(head: str) -> str | None:
    m = re.search(r"^message-id:\s*<([^>]+)>", head, re.IGNORECASE | re.MULTILINE)
    return m.group(1) if m else None


SPAM_FIELDS = re.compile(r"^(x-spam-[a-z-]+|x-rspamd-[a-z-]+|x-spamd-[a-z-]+|x-spam):", re.IGNORECASE | re.MULTILINE)


def check_file(path: Path, cell: str, rspamd_log: str) -> tuple[bool, str]:
    """The delivered file shows the scan (or its absence), as far as a file can."""
    head = header_block(path)
    fields = sorted({m.group(1).lower() for m in SPAM_FIELDS.finditer(head)})
    if cell == "mailgw+rspamd":
        score = re.search(r"^X-Spam-Score:\s*(.*)$", head, re.MULTILINE)
        action = re.search(r"^X-Spam-Action:\s*(.*)$", head, re.MULTILINE)
        ok = bool(score and action)
        return ok, (f"X-Spam-Score: {score.group(1)}, X-Spam-Action: {action.group(1)}" if ok
                    else f"no X-Spam-Score/X-Spam-Action (fields {fields})")
    if cell == "postfix+rspamd":
        mid = message_id(head)
        # rspamd's task log line names the Message-ID of every message it scanned
        found = bool(mid and mid in rspamd_log)
        return found, (f"Message-ID <{mid}> in rspamd's log: {'yes' if found else 'NO'}; "
                       f"spam header fields: {fields or 'none (Debian milter_headers use = [])'}")
    return (not fields), ("no spam header fields" if not fields else f"unexpected spam fields {fields}")


def rspamd_log_size(rsp: dict) -> int:
    try:
        return (rsp["root"] / "log" / "rspamd.log").stat().st_size
    except OSError:
        return 0


def read_rspamd_log(rsp: dict, offset: int = 0) -> str:
    """rspamd's log from `offset` on (its task lines name each scanned message's Message-ID)."""
    try:
        with open(rsp["root"] / "log" / "rspamd.log", "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def mailbench(cell: dict, n: int, conc: int, per_conn: int, pin: str | None, settle: float) -> tuple[list[str], dict]:
    args = ["smtp", "--port", str(cell["port"]), "-n", str(n), "-s", "2048", "-c", str(conc),
            "-m", str(per_conn), "--from", FROM, "--to", SINK, "--label", cell["name"],
            "--cpu-pidfile", str(cell["pidfile"]), "--until-maildir", str(cell["maildir"]), "--deadline", "300"]
    return mailbench_smtp(args, cell["maildir"], pin, settle)


def run_cell(cell: dict, rsp: dict, n: int, conc: int, per_conn: int, pin: str | None, meta: dict, log, rng,
             settle: float) -> dict:
    t0 = time.time()
    st0, cpu0, log0 = rspamd_stat(rsp), tree_cpu_by_role(rsp["pid"]), rspamd_log_size(rsp)
    shown, rec = mailbench(cell, n, conc, per_conn, pin, settle)
    time.sleep(0.2)      # rspamd updates /stat after it has answered
    st1, cpu1 = rspamd_stat(rsp), tree_cpu_by_role(rsp["pid"])
    files = maildir_files(cell["maildir"])
    sample = rng.sample(files, min(3, len(files)))
    rlog = read_rspamd_log(rsp, log0) if cell["name"] == "postfix+rspamd" else ""
    checked = [check_file(p, cell["name"], rlog) for p in sample]
    r = rec.get("result", {})
    ok = r.get("ok") or 0
    rsp_cpu = {role: round(cpu1.get(role, 0.0) - cpu0.get(role, 0.0), 3) for role in sorted(set(cpu0) | set(cpu1))}
    rsp_total = sum(rsp_cpu.values())
    rec["meta"] = dict(meta, maildir_files=len(files), files_checked=len(sample),
                       files_ok=all(c for c, _ in checked), file_detail=[d for _, d in checked][:1],
                       rspamd_scanned=st1["scanned"] - st0["scanned"],
                       rspamd_actions={k: st1["actions"].get(k, 0) - st0["actions"].get(k, 0)
                                       for k in st1["actions"] if st1["actions"].get(k, 0) - st0["actions"].get(k, 0)},
                       rspamd_cpu_s=rsp_cpu, rspamd_cpu_ms_per_msg=round(rsp_total / ok * 1000, 3) if ok else None)
    if r.get("server_cpu_ms_per_msg") is not None and ok:
        rec["meta"]["total_cpu_ms_per_msg"] = round(r["server_cpu_ms_per_msg"] + rsp_total / ok * 1000, 3)
    if r.get("other_cpu_s") is not None:
        rec["meta"]["other_cpu_s_minus_rspamd"] = round(r["other_cpu_s"] - rsp_total, 3)
    write_rec(rec, " ".join(shown), t0, log)
    m = rec["meta"]
    print(f"  {meta['mode']:6} rep {meta['rep']!s:6} {cell['name']:15} "
          f"{r.get('msgs_per_s', r.get('fatal'))} msgs/s, ok {r.get('ok')}, errors {r.get('errors')}, "
          f"maildir {len(files)}, scanned {m['rspamd_scanned']}, cpu {r.get('server_cpu_ms_per_msg')} + rspamd "
          f"{m['rspamd_cpu_ms_per_msg']} ms/msg, other {m.get('other_cpu_s_minus_rspamd')} s, "
          f"files {'ok' if m['files_ok'] else 'WRONG'}", flush=True)
    return rec


# --------------------------------------------------------------------------- report

KEYS = ("msgs_per_s", "delivered_msgs_per_s", "server_cpu", "rspamd_cpu", "total_cpu", "p50", "p99", "other",
        "errors", "scanned", "ok")


def summarise(recs, modes):
    s = {m: {c: {k: [] for k in KEYS} for c in CELLS} for m in modes}
    per_rep = {m: {} for m in modes}
    for meta, res in measured_runs(recs):
        d = s[meta["mode"]][meta["cell"]]
        add_run(d, res, "server_cpu")
        if meta.get("rspamd_cpu_ms_per_msg") is not None:
            d["rspamd_cpu"].append(meta["rspamd_cpu_ms_per_msg"])
        if meta.get("total_cpu_ms_per_msg") is not None:
            d["total_cpu"].append(meta["total_cpu_ms_per_msg"])
        if meta.get("other_cpu_s_minus_rspamd") is not None:
            d["other"].append(meta["other_cpu_s_minus_rspamd"])
        d["scanned"].append(meta["rspamd_scanned"])
        d["ok"].append(res.get("ok", 0))
        per_rep[meta["mode"]].setdefault(meta["rep"], {})[meta["cell"]] = dict(res, **{"_meta": meta})
    return s, per_rep


def medians(s):
    return {m: {c: {k: (sum(v) if k in ("errors", "scanned", "ok") else median(v)) for k, v in d.items()}
                for c, d in cells.items()} for m, cells in s.items()}


def report(s, per_rep, modes, reps) -> list[str]:
    lines = []
    for m in modes:
        lines.append(f"\n### {m} (medians of {reps}; ±x % = half the min-max range as % of the median)")
        lines.append("| server | msgs/s | delivered msgs/s | p50 ms | p99 ms | server CPU ms/msg | rspamd CPU ms/msg "
                     "| server+rspamd ms/msg | scanned / accepted | errors | other-CPU s |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for c in CELLS:
            d = s[m][c]
            if not d["msgs_per_s"]:
                lines.append(f"| {c} | no data | | | | | | | | | |")
                continue
            lines.append(f"| {c} | {fmt(median(d['msgs_per_s']))} (±{half_range_pct(d['msgs_per_s']):.0f}%) | "
                         f"{fmt(median(d['delivered_msgs_per_s']))} | {fmt(median(d['p50']))} | "
                         f"{fmt(median(d['p99']))} | {fmt(median(d['server_cpu']), 3)} "
                         f"(±{half_range_pct(d['server_cpu']):.0f}%) | {fmt(median(d['rspamd_cpu']), 3)} | "
                         f"{fmt(median(d['total_cpu']), 3)} | {sum(d['scanned'])} / {sum(d['ok'])} | "
                         f"{sum(d['errors'])} | {fmt(median(d['other']), 2)} |")
        lines.append("")
        lines.append("per repetition: msgs/s / server CPU ms/msg / rspamd CPU ms/msg (position in the rotation):")
        for c in CELLS:
            row = [f"{per_rep[m][r][c]['msgs_per_s']:.0f} / {per_rep[m][r][c].get('server_cpu_ms_per_msg') or 0:.2f}"
                   f" / {per_rep[m][r][c]['_meta'].get('rspamd_cpu_ms_per_msg') or 0:.2f} "
                   f"(#{per_rep[m][r][c]['_meta'].get('position')})"
                   for r in sorted(per_rep[m]) if c in per_rep[m][r]]
            lines.append(f"  {c:15} " + ", ".join(row))
        roles = {}
        for r in per_rep[m].values():
            for c, res in r.items():
                ok = res.get("ok") or 0
                for role, sec in res["_meta"]["rspamd_cpu_s"].items():
                    if ok:
                        roles.setdefault(c, {}).setdefault(role, []).append(sec / ok * 1000)
        lines.append("rspamd CPU per process role, ms/msg (medians):")
        for c in CELLS:
            if c in roles:
                lines.append(f"  {c:15} " + ", ".join(f"{role} {median(v):.3f}" for role, v in sorted(roles[c].items())
                                                      if median(v) >= 0.0005))
    return lines


def ratios(s, per_rep, modes) -> dict:
    """mailgw / postfix per mode: with rspamd (the requirement) and without (the baselines)."""
    out = {}
    for m in modes:
        out[m] = {}
        for label, a, b in (("with rspamd", "mailgw+rspamd", "postfix+rspamd"), ("baseline", "mailgw", "postfix")):
            da, db = s[m][a], s[m][b]
            if not da["msgs_per_s"] or not db["msgs_per_s"]:
                continue
            pairs = [(r[a], r[b]) for r in per_rep[m].values() if a in r and b in r]
            rate_pairs = [pa["msgs_per_s"] / pb["msgs_per_s"] for pa, pb in pairs]
            out[m][label] = dict(
                mailgw=a, postfix=b,
                msgs_per_s=(median(da["msgs_per_s"]), median(db["msgs_per_s"])),
                ratio_msgs_per_s=median(da["msgs_per_s"]) / median(db["msgs_per_s"]),
                per_rep_ratio_min=min(rate_pairs), per_rep_ratio_median=median(rate_pairs),
                per_rep_ratio_max=max(rate_pairs), reps_mailgw_faster=sum(x >= 1 for x in rate_pairs), reps=len(rate_pairs),
                server_cpu=(median(da["server_cpu"]), median(db["server_cpu"])),
                total_cpu=(median(da["total_cpu"]), median(db["total_cpu"])),
                p50=(median(da["p50"]), median(db["p50"])), p99=(median(da["p99"]), median(db["p99"])))
        for srv, base, scanned in (("mailgw", "mailgw", "mailgw+rspamd"), ("postfix", "postfix", "postfix+rspamd")):
            b0, b1 = s[m][base], s[m][scanned]
            if b0["msgs_per_s"] and b1["msgs_per_s"]:
                out[m][f"scan cost {srv}"] = dict(
                    msgs_per_s=(median(b0["msgs_per_s"]), median(b1["msgs_per_s"])),
                    drop_pct=(1 - median(b1["msgs_per_s"]) / median(b0["msgs_per_s"])) * 100,
                    d_server_cpu=median(b1["server_cpu"]) - median(b0["server_cpu"]),
                    d_total_cpu=median(b1["total_cpu"]) - median(b0["total_cpu"]),
                    d_wall_ms_per_msg=1000 / median(b1["msgs_per_s"]) - 1000 / median(b0["msgs_per_s"]))
    return out


def ratio_lines(rt) -> list[str]:
    lines = ["| mode | pair | msgs/s mailgw / postfix | ratio of medians [per-rep min–median–max] | reps mailgw ≥ postfix "
             "| server CPU ms/msg | server+rspamd ms/msg | p50 ms | p99 ms |", "|---|---|---|---|---|---|---|---|---|"]
    for m, d in rt.items():
        for label in ("with rspamd", "baseline"):
            if label not in d:
                continue
            x = d[label]
            lines.append(f"| {m} | {label} | {x['msgs_per_s'][0]:,.0f} / {x['msgs_per_s'][1]:,.0f} | "
                         f"**{x['ratio_msgs_per_s']:.2f}** [{x['per_rep_ratio_min']:.2f}–{x['per_rep_ratio_median']:.2f}–"
                         f"{x['per_rep_ratio_max']:.2f}] | {x['reps_mailgw_faster']}/{x['reps']} | "
                         f"{fmt(x['server_cpu'][0], 3)} / {fmt(x['server_cpu'][1], 3)} | "
                         f"{fmt(x['total_cpu'][0], 3)} / {fmt(x['total_cpu'][1], 3)} | "
                         f"{fmt(x['p50'][0])} / {fmt(x['p50'][1])} | {fmt(x['p99'][0])} / {fmt(x['p99'][1])} |")
    lines += ["", "| mode | scan cost of | msgs/s without → with rspamd | drop | Δ server CPU ms/msg | "
              "Δ server+rspamd ms/msg | Δ wall ms/msg (1/rate) |", "|---|---|---|---|---|---|---|"]
    for m, d in rt.items():
        for srv in ("mailgw", "postfix"):
            x = d.get(f"scan cost {srv}")
            if x:
                lines.append(f"| {m} | {srv} | {x['msgs_per_s'][0]:,.0f} → {x['msgs_per_s'][1]:,.0f} | "
                             f"{x['drop_pct']:.1f} % | {x['d_server_cpu']:+.3f} | {x['d_total_cpu']:+.3f} | "
                             f"{x['d_wall_ms_per_msg']:+.3f} |")
    return lines


# --------------------------------------------------------------------------- main

def build_cells(scratch: Path, pb: int, rsp: dict) -> dict:
    cells = {}
    for i, name in enumerate(("mailgw", "mailgw+rspamd")):
        d = scratch / name.replace("+", "-")
        (d / "data").mkdir(parents=True)
        config = write_mailgw_config(d, pb + i, rsp["normal_url_planned"] if SCANNED[name] else None)
        cli(["users", "add", SINK], config, stdin="secret\n")
        cli(["check"], config)
        cells[name] = dict(name=name, kind="mailgw", dir=d, config=config, port=pb + i, pidfile=d / "mailgw.pid",
                           maildir=d / "data" / "mail" / DOMAIN / "sink")
        cells[name]["maildir"].mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(("postfix", "postfix+rspamd")):
        pf = setup_postfix(scratch / name.replace("+", "-"), pb + 2 + i, "postfix-spambench",
                           rsp["proxy"] if SCANNED[name] else None, MILTER)
        cells[name] = dict(pf, name=name, kind="postfix")
    return cells


def serve(args, scratch: Path, cells: dict, rsp: dict) -> int:
    pin = SERVER_CPU if args.serve_mode == "pinned" else None
    start_rspamd(rsp, pin, args.rspamd_workers)
    names = [n.strip() for n in args.serve_cells.split(",") if n.strip()]
    if any(n not in ("mailgw", "mailgw+rspamd") for n in names):
        raise SystemExit("--serve-cells: mailgw and/or mailgw+rspamd")
    print(f"rspamd: {json.dumps({k: rsp[k] for k in ('pid', 'normal_url', 'controller_url', 'milter')})}; "
          f"affinity {sorted({cpus_allowed(p) for p in tree(rsp['pid'])})}")
    for name in names:
        c = cells[name]
        start_mailgw(name, c, pin, "serve")
        print(f"serving {name}: --pidfile {c['pidfile']} --port {c['port']} --maildir {c['maildir']} "
              f"(affinity {cpus_allowed(c['pid'])}; log {c['log']})")
    print(f"rspamd stat: {rsp['controller_url']}/stat; stopping after {args.serve} s (or kill -TERM {os.getpid()})",
          flush=True)
    end = time.time() + args.serve
    while time.time() < end and PROCS["rspamd"].poll() is None and all(PROCS[n].poll() is None for n in names):
        time.sleep(0.5)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("-n", "--count", type=int, default=2000)
    ap.add_argument("-c", "--concurrency", type=int, default=32)
    ap.add_argument("-m", "--per-conn", type=int, default=1, help="messages per connection (1)")
    ap.add_argument("--modes", default="pinned,shared")
    ap.add_argument("--rspamd-workers", type=int, default=1, help="rspamd normal (scanner) worker processes")
    ap.add_argument("--port-base", type=int, default=2600,
                    help="mailgw P, mailgw+rspamd P+1, postfix P+2, postfix+rspamd P+3; rspamd normal P+4, "
                         "controller P+5, milter proxy P+6")
    ap.add_argument("--out", default=None)
    ap.add_argument("--keep-data", action="store_true")
    ap.add_argument("--seed", type=int, default=16)
    ap.add_argument("--settle", type=float, default=1.0,
                    help="after emptying the Maildir before each run: sync, then sleep this long (s)")
    ap.add_argument("--serve", type=float, default=None, metavar="SECONDS")
    ap.add_argument("--serve-mode", choices=("pinned", "shared"), default="pinned")
    ap.add_argument("--serve-cells", default="mailgw+rspamd", help="with --serve: mailgw and/or mailgw+rspamd")
    args = ap.parse_args()
    if not 1 <= args.reps <= 50 or not 1 <= args.count <= 100000 or not 1 <= args.concurrency <= 200:
        ap.error("--reps 1..50, -n 1..100000, -c 1..200")
    if not 1 <= args.rspamd_workers <= 8:
        ap.error("--rspamd-workers 1..8")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if any(m not in ("pinned", "shared") for m in modes):
        ap.error("--modes: pinned and/or shared")
    if os.geteuid() != 0:
        raise SystemExit("run as root (Postfix instances, chown to the virtual uid 5000)")
    if shutil.which("postfix") is None:
        print(f"postfix missing: running {BENCH}/peers/install.sh system", flush=True)
        subprocess.run([str(BENCH / "peers" / "install.sh"), "system"], check=True, timeout=1800)
    for tool in ("postfix", "postconf", "rspamd", "taskset", TWISTD):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found (Postfix: {BENCH}/peers/install.sh system; rspamd: apt-get install "
                             "-y --no-install-recommends rspamd)")
    if (args.serve is None or args.serve_mode == "pinned") and "pinned" in modes and (os.cpu_count() or 1) < 2:
        raise SystemExit("pinned needs 2 CPUs")
    head = git_head()
    out = Path(args.out) if args.out else HERE / "results" / f"spam-accept-{head}"
    rng = random.Random(args.seed)

    on_exit(cleanup, args.keep_data, "rspamd", STOP_TIMEOUT)
    scratch = scratch_dir("mailgw-spam.")

    pb = args.port_base
    rsp = dict(root=scratch / "rspamd" / "root", normal=pb + 4, controller=pb + 5, proxy=pb + 6,
               normal_url_planned=f"http://127.0.0.1:{pb + 4}")
    rsp["root"].mkdir(parents=True)
    cells = build_cells(scratch, pb, rsp)
    if args.serve is not None:
        return serve(args, scratch, cells, rsp)
    out.parent.mkdir(parents=True, exist_ok=True)

    say, txt = transcript()

    say(f"# rspamd in the path (issue 16): bench/spam_accept.py --reps {args.reps} --modes {','.join(modes)} "
        f"-n {args.count} -c {args.concurrency} -m {args.per_conn} --rspamd-workers {args.rspamd_workers} "
        f"--settle {args.settle}")
    for ln in header_lines(head):
        say(ln)
    say(f"python: {sys.version.split()[0]}; postfix {run(['postconf', '-h', 'mail_version']).stdout.strip()}; "
        f"{run(['rspamd', '--version']).stdout.strip().splitlines()[0]}; kernel {os.uname().release}")
    say(f"load before: {loadavg()}")
    say(f"workload: {args.count} x 2 KiB, C={args.concurrency}, {args.per_conn} message(s) per connection, "
        f"MAIL FROM <{FROM}>, RCPT {SINK}, --until-maildir (emptied, sync, {args.settle} s before each run); "
        f"warm-up 200 per cell per round; order rotated by one cell per repetition")
    for c in CELLS:
        e = cells[c]
        say(f"{c}: 127.0.0.1:{e['port']}, CPU tree of {e['pidfile']}, Maildir {e['maildir']}, "
            f"rspamd: {'yes' if SCANNED[c] else 'no'}")
    say("mailgw+rspamd config: " + " | ".join(ln for ln in cells["mailgw+rspamd"]["config"].read_text().splitlines()
                                               if ln and not ln.startswith("#")))
    pf_milter = run(["postconf", "-c", str(cells["postfix+rspamd"]["etc"]), "-n"]).stdout
    say("postfix+rspamd main.cf (postconf -n, milter lines): " + " | ".join(
        ln for ln in pf_milter.splitlines() if "milter" in ln))
    say(f"rspamd: tests/e2e/rspamd_server.py --workers {args.rspamd_workers}: normal 127.0.0.1:{rsp['normal']} "
        f"(mailgw's /checkv2), controller {rsp['controller']} (/stat), rspamd_proxy milter {rsp['proxy']} "
        f"(Postfix; upstream = the normal worker)")

    recs = []
    checks: list[tuple[str, bool, str]] = []
    logs: dict[str, list[str]] = {}
    with open(str(out) + ".jsonl", "w") as jl:
        for mode in modes:
            pin_srv, pin_cli = pins(mode)
            start_rspamd(rsp, pin_srv, args.rspamd_workers)
            say(f"\n== round {mode}: rspamd pid {rsp['pid']} ready after {rsp['ready_s']} s")
            start_cells(cells, CELLS, pin_srv, mode)
            # proof: the scan path, 3 messages per cell, one connection
            for name in CELLS:
                e = cells[name]
                before, log0 = rspamd_stat(rsp)["scanned"], rspamd_log_size(rsp)
                _, rec = mailbench(e, 3, 1, 1, pin_cli, 0.0)
                time.sleep(0.3)
                scanned = rspamd_stat(rsp)["scanned"] - before
                files = maildir_files(e["maildir"])
                r = rec.get("result", {})
                want = 3 if SCANNED[name] else 0
                if r.get("ok") != 3 or len(files) != 3 or scanned != want:
                    raise SystemExit(f"{mode}/{name}: proof run failed: {r} ({len(files)} files, rspamd scanned "
                                     f"{scanned}, expected {want})")
                details = []
                for f in files:
                    ok, detail = check_file(f, name, read_rspamd_log(rsp, log0))
                    if not ok:
                        raise SystemExit(f"{mode}/{name}: SCAN CHECK FAILED on {f}: {detail}")
                    details.append(detail)
                checks.append((f"{mode}: {name} {'is scanned' if want else 'is not scanned'} (3 messages)", True,
                               f"rspamd scanned +{scanned}; {details[0]}"))
            for name in CELLS:
                recs.append(run_cell(cells[name], rsp, 200, args.concurrency, args.per_conn, pin_cli,
                                     dict(mode=mode, cell=name, rep="warmup"), jl, rng, args.settle))
            # affinity of every process, now that Postfix and rspamd have forked their children
            aff = []
            for name in CELLS:
                pids = tree(cells[name]["pid"])
                aff.append((name, [(comm(p), cpus_allowed(p)) for p in pids]))
            aff.append(("rspamd", [(rspamd_role(p), cpus_allowed(p)) for p in tree(rsp["pid"])]))
            say(f"round {mode}: mailbench CPUs {pin_cli or 'any'}; load {loadavg()}")
            for name, procs in aff:
                say(f"  affinity {name}: " + ", ".join(f"{c}={a}" for c, a in procs))
            if pin_srv:
                allowed = [a for _, procs in aff for _, a in procs]
                checks.append((f"{mode}: every server and rspamd process on CPU {pin_srv}",
                               all(a == pin_srv for a in allowed), f"{len(allowed)} processes"))
            for rep in range(1, args.reps + 1):
                order = rotation(CELLS, rep)
                for name in order:
                    recs.append(run_cell(cells[name], rsp, args.count, args.concurrency, args.per_conn, pin_cli,
                                         dict(mode=mode, cell=name, rep=rep, position=order.index(name) + 1),
                                         jl, rng, args.settle))
            say(f"round {mode}: load at the end {loadavg()}; rspamd /stat: {json.dumps(rspamd_stat(rsp))}")
            stop_cells(cells, CELLS, mode, logs, STOP_TIMEOUT)
            stop_proc("rspamd", STOP_TIMEOUT)
            for name in CELLS:
                clear_maildir(cells[name]["maildir"])
    say(f"load after: {loadavg()}")

    # ---- checks over the runs
    checks.append(maildir_check(recs))
    wrong_scan = [r for r in recs if r["meta"]["rspamd_scanned"] != (r.get("result", {}).get("ok", -1)
                                                                     if SCANNED[r["meta"]["cell"]] else 0)]
    for mode in modes:
        for c in CELLS:
            rs = [r for r in recs if r["meta"]["mode"] == mode and r["meta"]["cell"] == c]
            checks.append((f"{mode}: {c}: rspamd /stat scanned grew by {'the messages accepted' if SCANNED[c] else '0'}"
                           " in every run", not [r for r in rs if r in wrong_scan],
                           f"scanned {sum(r['meta']['rspamd_scanned'] for r in rs)} / accepted "
                           f"{sum(r.get('result', {}).get('ok', 0) for r in rs)} over {len(rs)} runs (warm-up included)"))
    wrong = [r for r in recs if not r["meta"]["files_ok"]]
    checks.append(("every run: 3 delivered files show the scan (or none)", not wrong,
                   f"{sum(r['meta']['files_checked'] for r in recs)} files checked"
                   + (f"; wrong: {[r['meta'] for r in wrong][:3]}" if wrong else "")))
    for key, lines in logs.items():
        tracebacks = sum("Traceback" in ln for ln in lines)
        accepted = sum(": accepted " in ln for ln in lines)
        unavailable = sum("rspamd unavailable" in ln for ln in lines)
        checks.append((f"mailgw log {key}: no tracebacks, no 'rspamd unavailable'", tracebacks == 0 and unavailable == 0,
                       f"{tracebacks} tracebacks, {unavailable} rspamd unavailable, {accepted} ': accepted ' lines, "
                       f"{sum('rspamd action=' in ln for ln in lines)} 'rspamd action=' lines"))
    checks += postfix_log_checks(cells, ("postfix", "postfix+rspamd"))
    # rspamd's log: worker crashes, upstream or timeout trouble fail the check; the start-up
    # notes of a fresh root (no symbols.cache / stats.ucl / history yet, two stock-rule
    # dependency notes) and the proxy's "Unexpected EOF" from rspamd_server.py's readiness probe
    # (it connects to the milter port and closes) are listed, not failed
    rlog = read_rspamd_log(rsp).splitlines()
    tasks = sum("rspamd_task_write_log" in ln for ln in rlog)
    bad_log = [ln for ln in rlog if re.search(r"terminated abnormally|upstream|timed? ?out|rspamd_proxy.*error",
                                              ln, re.IGNORECASE)
               and "rspamd_task_write_log" not in ln and "error: Unexpected EOF" not in ln]
    eof = sum("Unexpected EOF" in ln for ln in rlog)
    checks.append(("rspamd log: no worker crash, upstream error or timeout", not bad_log,
                   f"{len(rlog)} lines, {tasks} task (scan) lines, {eof} proxy 'Unexpected EOF' (readiness probes), "
                   f"{len(bad_log)} bad" + (f"; first: {bad_log[0][:200]}" if bad_log else "")))

    s, per_rep = summarise(recs, modes)
    say("\n## results (msgs/s = accepted msgs/s from mailbench; delivered = until in the Maildir)")
    for ln in report(s, per_rep, modes, args.reps):
        say(ln)
    rt = ratios(s, per_rep, modes)
    say("\n## mailgw / Postfix (>1: mailgw faster; CPU and latency as mailgw / postfix)")
    for ln in ratio_lines(rt):
        say(ln)
    say("\n## verdict against issue 16 (mailgw+rspamd msgs/s >= postfix+rspamd msgs/s, ratio of medians)")
    for m, d in rt.items():
        x = d.get("with rspamd")
        if x:
            say(f"  {m:6}: {x['msgs_per_s'][0]:,.1f} vs {x['msgs_per_s'][1]:,.1f} msgs/s = {x['ratio_msgs_per_s']:.2f} -> "
                f"{'met' if x['ratio_msgs_per_s'] >= 1 else 'NOT met'} (mailgw ahead in {x['reps_mailgw_faster']} of "
                f"{x['reps']} repetitions)")
    Path(str(out) + ".summary.json").write_text(json.dumps(medians(s), indent=1) + "\n")
    Path(str(out) + ".ratios.json").write_text(json.dumps(rt, indent=1) + "\n")
    rc = report_checks(checks, say, txt, out)
    print(f"also: {out}.summary.json, {out}.ratios.json")
    return rc


if __name__ == "__main__":
    sys.exit(main())
