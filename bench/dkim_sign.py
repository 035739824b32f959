#!/usr/bin/env python3
"""DKIM signing cost (issue 14): mailgw vs. Postfix + OpenDKIM, RSA-2048, C=32.

    python3 bench/dkim_sign.py [--reps N] [--out PREFIX] [--modes pinned,shared] [-n MESSAGES]
                               [-m PER_CONN] [--port-base P] [--keep-data]

Issue 14's requirement: mailgw's signing cost, (b) - (a), in server CPU per message and in the
msgs/s drop, is at most Postfix + OpenDKIM's, (d) - (c).

Four servers, all on 127.0.0.1, all started by this script (nothing shared is touched):

  mailgw             (a) this checkout, relay listener, trusted_networks 127.0.0.0/8, local domain
                         gw.test, user sink@gw.test (as bench/smtp_accept.sh), [dkim] sign = false
  mailgw+dkim        (b) the same with [dkim] sign = true (the default): an RSA-2048 key made by
                         `mailgw dkim keygen gw.test --selector mgw2048` (both data dirs get one;
                         only the flag differs). mailgw signs a trusted client's mail whose From:
                         domain is local and has a key.
  postfix            (c) a Postfix 3.7 instance with the shared peer's main.cf / master.cf
                         (/work/shared/bench/peers/postfix: virtual(8) to a Maildir, durable), only
                         port, queue / data directories, log file and mailbox base changed
  postfix+opendkim   (d) a second such instance with smtpd_milters = non_smtpd_milters =
                         inet:127.0.0.1:MILTER, milter_default_action = tempfail (a milter failure
                         is a 4xx the run counts as an error, never an unsigned message), and
                         OpenDKIM 2.11 (Debian) on that port: Mode s, Domain gw.test, Selector
                         odk2048, KeyFile from `opendkim-genkey -b 2048`, Canonicalization
                         relaxed/relaxed, InternalHosts 127.0.0.0/8, SignHeaders /
                         OversignHeaders set to the header fields mailgw signs / oversigns,
                         Background no, Syslog no, UserID opendkim. Its config and key live in
                         /run/mailgw-dkim.XXXXXX: OpenDKIM refuses a config under /tmp
                         ("/tmp can be read or written by other users").

Workload per run: mailbench.py smtp -n N -s 2048 -c 32 -m M --from bench@gw.test --to sink@gw.test
--until-maildir <the server's sink Maildir> (emptied before each run). mailbench writes
`From: Mail Bench <bench@gw.test>` (its --from), so every message is one both signers sign.

CPU per message = mailbench's --cpu-pidfile figure: CPU of the process tree of each pid given
(utime + stime of every live descendant, plus cutime + cstime of reaped ones), after minus before
the run, summed. mailgw: twistd's pid (smtp_workers = 0: one process). Postfix: the master's pid
(spool/pid/master.pid), whose tree holds smtpd, cleanup, qmgr, trivial-rewrite, virtual, anvil,
postlogd. Postfix + OpenDKIM: the master's pid AND OpenDKIM's pid (a second --cpu-pidfile;
OpenDKIM is not a child of the master: one multi-threaded process, all its threads are in its
/proc/PID/stat).

Rounds (--modes, default pinned then shared): `pinned` = every server (mailgw's twistd, both
Postfix instances started with `taskset -c 1 postfix -c ETC start`, so the master and every child
it forks, and OpenDKIM) on CPU 1 and mailbench on CPU 0; `shared` = nothing pinned. Each round
starts the four servers fresh, checks that (b) and (d) sign and (a) and (c) do not (3 messages
each; the DKIM-Signature's d= / s= and a dkimpy verification against the public key, exit 1
otherwise), warms each up with 200 messages, then runs --reps repetitions of every cell, the order
rotated by one cell per repetition (a b c d, b c d a, c d a b, ...: every position once in 4
repetitions, never the same server twice in a row). Before each run the Maildir is emptied,
then sync(2) and --settle seconds (1), so one run's disk writes do not land in the next one's
window. After every run, 3 delivered files are checked again for the
expected signature (or its absence). The Cpus_allowed_list of every server process is recorded.

Also, before the rounds, an in-process probe (this file with --probe-sign, in a subprocess) times
mailgw's signer on the benchmark's message (DKIMSigner.signatures_for, best of 5 x 200) and
`openssl speed rsa2048` gives OpenSSL's raw RSA-2048 sign rate (what OpenDKIM calls as well).

Writes PREFIX.txt (environment, probe, tables, signing costs, verdict, checks) and PREFIX.jsonl
(every mailbench line with its command and meta). Everything started here is stopped by its PID
(Postfix instances by `postfix -c ETC stop`, then by the master's PID if it is still there) on
exit, also on Ctrl-C / SIGTERM, and the scratch dirs are removed (unless --keep-data).

Env: BENCH=/work/shared/bench  PYTHON=python3  TWISTD=twistd
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchlib import (BENCH, DOMAIN, PROCS, PYTHON, SERVER_CPU, SINK, TWISTD, add_run, cleanup, clear_maildir, cli,
                      comm, cpus_allowed, env, fmt, git_head, half_range_pct, header_lines, loadavg, mailbench_smtp,
                      maildir_check, maildir_files, measured_runs, median, on_exit, pins, port_open,
                      postfix_log_checks, report_checks, rotation, run, sbin_on_path, scratch_dir, setup_postfix,
                      start_cells, stop_cells, stop_proc, transcript, tree, wait_port, write_rec)

HERE = Path(__file__).resolve().parent
sbin_on_path()

FROM = "bench@gw.test"
MGW_SELECTOR = "mgw2048"
ODK_SELECTOR = "odk2048"
CELLS = ("mailgw", "mailgw+dkim", "postfix", "postfix+opendkim")     # (a) (b) (c) (d)
SIGNS = {"mailgw": None, "mailgw+dkim": MGW_SELECTOR, "postfix": None, "postfix+opendkim": ODK_SELECTOR}
MILTER = ("smtpd_milters={milter}", "non_smtpd_milters={milter}", "milter_default_action=tempfail")

# what mailgw signs (mailgw/mailauth/dkim_sign.py SIGNED_HEADERS / OVERSIGNED_HEADERS), for OpenDKIM
SIGN_HEADERS = ("From,Reply-To,Subject,Date,To,Cc,Resent-Date,Resent-From,Resent-To,Resent-Cc,In-Reply-To,"
                "References,List-Id,List-Help,List-Unsubscribe,List-Subscribe,List-Post,List-Owner,"
                "List-Archive,Message-ID,MIME-Version,Content-Type,Content-Transfer-Encoding,"
                "List-Unsubscribe-Post")
OVERSIGN_HEADERS = "From,Subject,Date,To"


# --------------------------------------------------------------------------- helpers

def public_record(private_pem: bytes) -> bytes:
    """The DKIM TXT record (v=DKIM1; k=rsa; p=...) of a PEM private key (PKCS#1 or PKCS#8)."""
    from cryptography.hazmat.primitives import serialization
    key = serialization.load_pem_private_key(private_pem, password=None)
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)


# --------------------------------------------------------------------------- setup

def write_mailgw_config(d: Path, port: int, sign: bool) -> Path:
    config = d / "mailgw.toml"
    config.write_text(
        "# written by bench/dkim_sign.py (bench/smtp_accept.sh's config + [dkim])\n"
        "[server]\n"
        'hostname = "mx.gw.test"\n'
        f'local_domains = ["{DOMAIN}"]\n'
        'trusted_networks = ["127.0.0.0/8"]\n'
        f'data_dir = "{d}/data"\n'
        "\n[dkim]\n"
        f"sign = {'true' if sign else 'false'}\n"
        "\n[[listeners]]\n"
        'role = "relay"\n'
        f'endpoint = "tcp:{port}:interface=127.0.0.1"\n')
    return config


def setup_opendkim(r: Path, port: int) -> dict:
    run(["opendkim-genkey", "-b", "2048", "-d", DOMAIN, "-s", ODK_SELECTOR, "-D", str(r)])
    key = r / f"{ODK_SELECTOR}.private"
    shutil.chown(key, "opendkim", "opendkim")
    os.chmod(key, 0o600)
    (r / "internal").write_text("127.0.0.0/8\n")
    conf = r / "opendkim.conf"
    conf.write_text(
        "# written by bench/dkim_sign.py\n"
        "Mode s\n"
        f"Domain {DOMAIN}\n"
        f"Selector {ODK_SELECTOR}\n"
        f"KeyFile {key}\n"
        f"Socket inet:{port}@127.0.0.1\n"
        "Canonicalization relaxed/relaxed\n"
        "SignatureAlgorithm rsa-sha256\n"
        f"SignHeaders {SIGN_HEADERS}\n"
        f"OversignHeaders {OVERSIGN_HEADERS}\n"
        f"InternalHosts {r}/internal\n"
        "Background no\n"
        f"PidFile {r}/opendkim.pid\n"
        "UserID opendkim\n"
        "Syslog no\n")
    return dict(conf=conf, port=port, key=key, pidfile=r / "opendkim.pid", record=public_record(key.read_bytes()),
                dir=r)


# --------------------------------------------------------------------------- servers

def start_opendkim(odk: dict, pin: str | None) -> None:
    if port_open(odk["port"]):
        raise SystemExit(f"port {odk['port']} is already in use")
    odk["pidfile"].unlink(missing_ok=True)
    argv = (["taskset", "-c", pin] if pin else []) + ["opendkim", "-x", str(odk["conf"])]
    out = open(odk["dir"] / "stdout.log", "a")
    proc = subprocess.Popen(argv, cwd=odk["dir"], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    PROCS["opendkim"] = proc
    wait_port(odk["port"], 30, lambda: proc.poll() is None, "opendkim")
    for _ in range(50):
        if odk["pidfile"].exists() and odk["pidfile"].read_text().split():
            break
        time.sleep(0.1)
    if odk["pidfile"].read_text().split()[0] != str(proc.pid):
        raise SystemExit(f"opendkim: pid file {odk['pidfile']} does not hold {proc.pid}")
    odk["pid"] = proc.pid


# --------------------------------------------------------------------------- measuring

def signature_tags(message: bytes) -> list[dict]:
    """The tags of each DKIM-Signature in the header (unfolded)."""
    head = message.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]
    fields: list[bytes] = []
    for line in head.split(b"\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    out = []
    for f in fields:
        if f.lower().startswith(b"dkim-signature:"):
            value = f.split(b":", 1)[1].decode("ascii", "replace")
            tags = {}
            for part in value.split(";"):
                if "=" in part:
                    k, v = part.split("=", 1)
                    tags[k.strip()] = "".join(v.split())
            out.append(tags)
    return out


def check_signed(path: Path, selector: str | None, record: bytes | None, verify: bool) -> tuple[bool, str]:
    """The delivered file has exactly the expected signature (or none), and it verifies (dkimpy)."""
    msg = path.read_bytes()
    sigs = signature_tags(msg)
    if selector is None:
        return (not sigs), ("no DKIM-Signature" if not sigs else f"unexpected DKIM-Signature {sigs}")
    if len(sigs) != 1 or sigs[0].get("d") != DOMAIN or sigs[0].get("s") != selector \
            or sigs[0].get("a") != "rsa-sha256":
        return False, f"expected one DKIM-Signature a=rsa-sha256 d={DOMAIN} s={selector}, got {sigs}"
    detail = f"a=rsa-sha256 d={DOMAIN} s={selector} c={sigs[0].get('c')} h={sigs[0].get('h')}"
    if verify:
        import dkim   # dkimpy, which mailgw's verifier uses
        crlf = msg.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        expected = f"{selector}._domainkey.{DOMAIN}.".encode()

        def dnsfunc(name, timeout=5):
            name = name if isinstance(name, bytes) else name.encode()
            return record if name.rstrip(b".") == expected.rstrip(b".") else None
        ok = dkim.DKIM(crlf, minkey=1024).verify(dnsfunc=dnsfunc)
        detail += f", dkimpy verify against the key's public half: {'pass' if ok else 'FAIL'}"
        if not ok:
            return False, detail
    return True, detail


def mailbench(cell: dict, n: int, per_conn: int, pin: str | None, extra=(), settle: float = 0.0) -> tuple[list[str], dict]:
    args = ["smtp", "--port", str(cell["port"]), "-n", str(n), "-s", "2048", "-c", str(cell.get("c", 32)),
            "-m", str(per_conn), "--from", FROM, "--to", SINK, "--label", cell["name"],
            *[x for p in cell["cpu_pidfiles"] for x in ("--cpu-pidfile", str(p))],
            "--until-maildir", str(cell["maildir"]), "--deadline", "300", *extra]
    return mailbench_smtp(args, cell["maildir"], pin, settle)


def run_cell(cell: dict, n: int, per_conn: int, pin: str | None, meta: dict, log, rng, settle: float) -> dict:
    t0 = time.time()
    shown, rec = mailbench(cell, n, per_conn, pin, settle=settle)
    files = maildir_files(cell["maildir"])
    sample = rng.sample(files, min(3, len(files)))
    sig_ok = [check_signed(p, cell["selector"], cell["record"], verify=False) for p in sample]
    rec["meta"] = dict(meta, maildir_files=len(files), signature_checked=len(sample),
                       signature_ok=all(ok for ok, _ in sig_ok),
                       signature_detail=[d for _, d in sig_ok][:1])
    write_rec(rec, " ".join(shown), t0, log)
    r = rec.get("result", {})
    print(f"  {meta['mode']:6} rep {meta['rep']!s:6} {cell['name']:17} "
          f"{r.get('msgs_per_s', r.get('fatal'))} msgs/s, ok {r.get('ok')}, errors {r.get('errors')}, "
          f"maildir {len(files)}, cpu {r.get('server_cpu_ms_per_msg')} ms/msg, other {r.get('other_cpu_s')} s, "
          f"signature {'ok' if rec['meta']['signature_ok'] else 'WRONG'}", flush=True)
    return rec


# --------------------------------------------------------------------------- probe

def probe_sign(config_path: str, message_size: int) -> dict:
    """In process: mailgw's signer (DKIMSigner.signatures_for, as the server calls it) on a
    mailbench message of `message_size` bytes; best of 5 x 200 calls. And the parts."""
    import timeit
    sys.path.insert(0, str(BENCH))
    import mailbench as mb  # noqa: E402 - the generator's own message
    from mailgw import config as config_module
    from mailgw.mailauth.dkim_sign import DKIMSigner, body_hash, header_from_domain, _split
    from mailgw.mailauth.keys import DKIMKeyStore
    config = config_module.load(config_path)

    class Clock:
        def seconds(self):
            return time.time()
    store = DKIMKeyStore(config.dkim.keys_dir)
    signer = DKIMSigner(store, clock=Clock())
    msg = mb.MessageFactory(message_size, FROM, SINK).build(1)
    out = dict(message_bytes=len(msg), keys=[f"{k.domain}/{k.selector} {k.algorithm} {k.bits}"
                                             for k in store.signing_keys(DOMAIN)])

    def best_us(fn, loops=200):
        return round(min(timeit.repeat(fn, number=loops, repeat=5)) / loops * 1e6, 1)
    out["signatures_for_us"] = best_us(lambda: signer.signatures_for(msg, lf=False, domain=DOMAIN))
    out["has_key_plus_from_domain_us"] = best_us(lambda: (header_from_domain(msg), signer.has_key(DOMAIN)), 2000)
    _, body = _split(msg)
    out["body_hash_us"] = best_us(lambda: body_hash(body), 2000)
    key = store.signing_keys(DOMAIN)[0]
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding
    out["rsa2048_sign_only_us"] = best_us(lambda: key.private_key.sign(b"x" * 400, padding.PKCS1v15(),
                                                                       hashes.SHA256()))
    return out


def openssl_speed(pin: str | None) -> str:
    argv = (["taskset", "-c", pin] if pin else []) + ["openssl", "speed", "-seconds", "2", "rsa2048"]
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"openssl speed failed: {e}"
    lines = [ln for ln in cp.stdout.splitlines() if ln.strip().startswith("rsa 2048") or "sign/s" in ln]
    return " | ".join(" ".join(ln.split()) for ln in lines) or cp.stdout[-300:]


# --------------------------------------------------------------------------- report

def summarise(recs, modes):
    s = {m: {c: {k: [] for k in ("msgs_per_s", "delivered_msgs_per_s", "cpu", "p50", "p99", "other", "errors")}
             for c in CELLS} for m in modes}
    per_rep = {m: {} for m in modes}
    for meta, res in measured_runs(recs):
        d = s[meta["mode"]][meta["cell"]]
        add_run(d, res, "cpu")
        if res.get("other_cpu_s") is not None:
            d["other"].append(res["other_cpu_s"])
        per_rep[meta["mode"]].setdefault(meta["rep"], {})[meta["cell"]] = res
    return s, per_rep


def costs(s, per_rep, mode, base, signed):
    """Signing cost of one server in one mode: from the medians, and the median of per-rep pairs."""
    a, b = s[mode][base], s[mode][signed]
    out = dict(cpu_base=median(a["cpu"]), cpu_signed=median(b["cpu"]),
               rate_base=median(a["msgs_per_s"]), rate_signed=median(b["msgs_per_s"]))
    out["d_cpu"] = out["cpu_signed"] - out["cpu_base"]
    out["drop"] = out["rate_base"] - out["rate_signed"]
    out["drop_pct"] = out["drop"] / out["rate_base"] * 100
    # wall time per message at the measured rate (1/throughput): what the drop costs per message
    out["d_ms_per_msg"] = 1000 / out["rate_signed"] - 1000 / out["rate_base"]
    pairs = [(r[base], r[signed]) for r in per_rep[mode].values() if base in r and signed in r]
    out["pair_d_cpu"] = [pb["server_cpu_ms_per_msg"] - pa["server_cpu_ms_per_msg"] for pa, pb in pairs]
    out["pair_drop_pct"] = [(pa["msgs_per_s"] - pb["msgs_per_s"]) / pa["msgs_per_s"] * 100 for pa, pb in pairs]
    return out


def report(s, per_rep, modes, reps) -> list[str]:
    lines = []
    for m in modes:
        lines.append(f"\n### {m} (medians of {reps}; ±x % = half the min-max range as % of the median)")
        lines.append("| server | msgs/s | delivered msgs/s | server CPU ms/msg | p50 ms | p99 ms | errors | other-CPU s |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for c in CELLS:
            d = s[m][c]
            if not d["msgs_per_s"]:
                lines.append(f"| {c} | no data | | | | | | |")
                continue
            lines.append(f"| {c} | {fmt(median(d['msgs_per_s']))} (±{half_range_pct(d['msgs_per_s']):.0f}%) | "
                         f"{fmt(median(d['delivered_msgs_per_s']))} | {fmt(median(d['cpu']), 3)} "
                         f"(±{half_range_pct(d['cpu']):.0f}%) | {fmt(median(d['p50']))} | {fmt(median(d['p99']))} | "
                         f"{sum(d['errors'])} | {fmt(median(d['other']), 2)} |")
        lines.append("")
        lines.append("per-repetition msgs/s / CPU ms/msg:")
        for c in CELLS:
            row = [f"{per_rep[m][r][c]['msgs_per_s']:.0f} / {per_rep[m][r][c].get('server_cpu_ms_per_msg', 0):.2f}"
                   for r in sorted(per_rep[m]) if c in per_rep[m][r]]
            lines.append(f"  {c:17} " + ", ".join(row))
    return lines


def cost_lines(s, per_rep, modes) -> tuple[list[str], dict]:
    lines = ["| mode | signing cost of | CPU ms/msg unsigned → signed | Δ CPU ms/msg (median of per-rep Δ) | "
             "msgs/s unsigned → signed | drop msgs/s (%) [median per-rep %] | Δ wall ms/msg (1/rate) |",
             "|---|---|---|---|---|---|---|"]
    verdicts = {}
    for m in modes:
        try:
            mg = costs(s, per_rep, m, "mailgw", "mailgw+dkim")
            pf = costs(s, per_rep, m, "postfix", "postfix+opendkim")
        except (TypeError, ZeroDivisionError):
            lines.append(f"| {m} | no data | | | | | |")
            continue
        for label, c in (("mailgw (b − a)", mg), ("Postfix+OpenDKIM (d − c)", pf)):
            lines.append(f"| {m} | {label} | {c['cpu_base']:.3f} → {c['cpu_signed']:.3f} | **{c['d_cpu']:+.3f}** "
                         f"({median(c['pair_d_cpu']):+.3f}) | {c['rate_base']:,.1f} → {c['rate_signed']:,.1f} | "
                         f"**{c['drop']:+,.1f} ({c['drop_pct']:+.1f} %)** [{median(c['pair_drop_pct']):+.1f} %] | "
                         f"{c['d_ms_per_msg']:+.3f} |")
        verdicts[m] = dict(mailgw=mg, postfix=pf,
                           cpu_ok=mg["d_cpu"] <= pf["d_cpu"],
                           drop_pct_ok=mg["drop_pct"] <= pf["drop_pct"],
                           drop_abs_ok=mg["drop"] <= pf["drop"],
                           pair_cpu_ok=median(mg["pair_d_cpu"]) <= median(pf["pair_d_cpu"]),
                           pair_drop_ok=median(mg["pair_drop_pct"]) <= median(pf["pair_drop_pct"]))
    return lines, verdicts


# --------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("-n", "--count", type=int, default=2000)
    ap.add_argument("-m", "--per-conn", type=int, default=1, help="messages per connection (1)")
    ap.add_argument("--modes", default="pinned,shared")
    ap.add_argument("--port-base", type=int, default=2590,
                    help="mailgw P, mailgw+dkim P+1, postfix P+2, postfix+opendkim P+3, opendkim milter P+4")
    ap.add_argument("--out", default=None)
    ap.add_argument("--keep-data", action="store_true")
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--settle", type=float, default=1.0,
                    help="after emptying the Maildir before each run: sync, then sleep this long (s)")
    ap.add_argument("--probe-sign", nargs=2, metavar=("CONFIG", "SIZE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe_sign:
        print(json.dumps(probe_sign(args.probe_sign[0], int(args.probe_sign[1]))))
        return 0
    if not 1 <= args.reps <= 50 or not 1 <= args.count <= 100000:
        ap.error("--reps 1..50, -n 1..100000")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if any(m not in ("pinned", "shared") for m in modes):
        ap.error("--modes: pinned and/or shared")
    if os.geteuid() != 0:
        raise SystemExit("run as root (Postfix instances, OpenDKIM's UserID, chown to the virtual uid 5000)")
    for tool in ("postfix", "postconf", "opendkim", "opendkim-genkey", "taskset", TWISTD):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found (Postfix: {BENCH}/peers/install.sh system; OpenDKIM: apt-get "
                             "install -y -qq --no-install-recommends opendkim opendkim-tools)")
    head = git_head()
    out = Path(args.out) if args.out else HERE / "results" / f"dkim-sign-{head}"
    out.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)

    on_exit(cleanup, args.keep_data, "opendkim")
    scratch = scratch_dir("mailgw-dkim.")
    rundir = scratch_dir("mailgw-dkim.", "/run")

    say, txt = transcript()

    # ---- set-up
    pb = args.port_base
    cells = {}
    for i, (name, sign) in enumerate((("mailgw", False), ("mailgw+dkim", True))):
        d = scratch / name.replace("+", "-")
        (d / "data").mkdir(parents=True)
        config = write_mailgw_config(d, pb + i, sign)
        cli(["users", "add", SINK], config, stdin="secret\n")
        keygen = cli(["dkim", "keygen", DOMAIN, "--selector", MGW_SELECTOR, "--algorithm", "rsa", "--bits", "2048"],
                     config)
        cli(["check"], config)
        keyfile = d / "data" / "dkim" / DOMAIN / f"{MGW_SELECTOR}.rsa.pem"
        if not keyfile.exists():
            raise SystemExit(f"mailgw dkim keygen did not write {keyfile}: {keygen.stdout}{keygen.stderr}")
        cells[name] = dict(name=name, kind="mailgw", dir=d, config=config, port=pb + i, pidfile=d / "mailgw.pid",
                           cpu_pidfiles=[d / "mailgw.pid"], maildir=d / "data" / "mail" / DOMAIN / "sink",
                           selector=SIGNS[name],
                           record=public_record(keyfile.read_bytes()), keygen=keygen.stdout.strip())
        cells[name]["maildir"].mkdir(parents=True, exist_ok=True)
    odk = setup_opendkim(rundir, pb + 4)
    for i, (name, milter) in enumerate((("postfix", None), ("postfix+opendkim", pb + 4))):
        pf = setup_postfix(scratch / name.replace("+", "-"), pb + 2 + i, "postfix-dkimbench", milter, MILTER)
        cells[name] = dict(pf, name=name, kind="postfix", selector=SIGNS[name], record=odk["record"])
        cells[name]["cpu_pidfiles"] = [pf["pidfile"]] + ([odk["pidfile"]] if milter else [])

    # ---- probe (in process, no server running)
    probe_cp = subprocess.run([PYTHON, str(Path(__file__).resolve()), "--probe-sign",
                               str(cells["mailgw+dkim"]["config"]), "2048"],
                              capture_output=True, text=True, timeout=300, env=env())
    try:
        probe = json.loads(probe_cp.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        probe = {"error": (probe_cp.stdout + probe_cp.stderr)[-800:]}
    speed = openssl_speed(SERVER_CPU if "pinned" in modes else None)

    # ---- environment
    say(f"# DKIM signing cost (issue 14): bench/dkim_sign.py --reps {args.reps} --modes {','.join(modes)} "
        f"-n {args.count} -m {args.per_conn} --settle {args.settle}")
    for ln in header_lines(head):
        say(ln)
    say(f"python: {sys.version.split()[0]}; postfix {run(['postconf', '-h', 'mail_version']).stdout.strip()}; "
        f"{run(['opendkim', '-V']).stdout.splitlines()[0].strip()}; "
        f"{run(['openssl', 'version']).stdout.strip()}")
    say(f"load before: {loadavg()}")
    say(f"workload: {args.count} x 2 KiB, C=32, {args.per_conn} message(s) per connection, From: <{FROM}>, "
        f"RCPT {SINK}, --until-maildir (emptied, sync, {args.settle} s before each run); warm-up 200 per cell "
        f"per round; order rotated by one cell per repetition")
    for c in CELLS:
        e = cells[c]
        say(f"{c}: 127.0.0.1:{e['port']}, CPU = tree(s) of {', '.join(str(p) for p in e.get('cpu_pidfiles', [e['pidfile']]))}, "
            f"Maildir {e['maildir']}, signs: {'d=' + DOMAIN + ' s=' + e['selector'] if e['selector'] else 'no'}")
    say(f"opendkim: {odk['conf']}: " + "; ".join(ln for ln in odk["conf"].read_text().splitlines()
                                                 if ln and not ln.startswith("#")))
    say(f"mailgw keygen: {cells['mailgw+dkim']['keygen'].splitlines()[0] if cells['mailgw+dkim']['keygen'] else ''}")
    say("\n## in-process probe (mailgw's signer on the benchmark's 2 KiB message; best of 5 x 200 calls)")
    say(f"  {json.dumps(probe)}")
    say(f"  openssl speed rsa2048 ({'taskset -c ' + SERVER_CPU if 'pinned' in modes else 'unpinned'}): {speed}")

    # ---- rounds
    recs = []
    checks: list[tuple[str, bool, str]] = []
    logs: dict[str, list[str]] = {}
    with open(str(out) + ".jsonl", "w") as jl:
        for mode in modes:
            pin_srv, pin_cli = pins(mode)
            start_opendkim(odk, pin_srv)
            start_cells(cells, CELLS, pin_srv, mode)
            # proof: (b) and (d) sign with the expected key, (a) and (c) do not
            for name in CELLS:
                e = cells[name]
                _, rec = mailbench(dict(e, c=1), 3, 1, pin_cli)
                files = maildir_files(e["maildir"])
                r = rec.get("result", {})
                if r.get("ok") != 3 or len(files) != 3:
                    raise SystemExit(f"{mode}/{name}: proof run failed: {r} ({len(files)} files)")
                for f in files:
                    ok, detail = check_signed(f, e["selector"], e["record"], verify=True)
                    if not ok:
                        raise SystemExit(f"{mode}/{name}: SIGNING CHECK FAILED on {f}: {detail}")
                checks.append((f"{mode}: {name} {'signs' if e['selector'] else 'does not sign'} (3 messages)",
                               True, detail))
            for name in CELLS:
                recs.append(run_cell(cells[name], 200, args.per_conn, pin_cli,
                                     dict(mode=mode, cell=name, rep="warmup"), jl, rng, args.settle))
            # affinity of every server process, now that Postfix has forked its children
            aff = []
            for name in CELLS:
                pids = tree(cells[name]["pid"], dead_root=True)
                aff.append(f"{name}: " + ", ".join(f"{comm(p)}={cpus_allowed(p)}" for p in pids))
            aff.append(f"opendkim: {cpus_allowed(odk['pid'])}")
            say(f"\n== round {mode}: mailbench CPUs {pin_cli or 'any'}; load {loadavg()}")
            for ln in aff:
                say("  affinity " + ln)
            want = pin_srv if pin_srv else None
            allowed = [a.rsplit("=", 1)[-1] for ln in aff for a in ln.split(": ", 1)[1].split(", ")]
            if want:
                checks.append((f"{mode}: every server process on CPU {want}", all(a == want for a in allowed),
                               f"{len(allowed)} processes"))
            for rep in range(1, args.reps + 1):
                order = rotation(CELLS, rep)
                for name in order:
                    recs.append(run_cell(cells[name], args.count, args.per_conn, pin_cli,
                                         dict(mode=mode, cell=name, rep=rep, position=order.index(name) + 1),
                                         jl, rng, args.settle))
            stop_cells(cells, CELLS, mode, logs)
            stop_proc("opendkim")
            for name in CELLS:
                clear_maildir(cells[name]["maildir"])
    say(f"load after: {loadavg()}")

    # ---- checks over the runs
    checks.append(maildir_check(recs))
    wrong = [r for r in recs if not r["meta"]["signature_ok"]]
    checks.append(("every run: 3 delivered files have the expected DKIM-Signature (or none)", not wrong,
                   f"{sum(r['meta']['signature_checked'] for r in recs)} files checked"
                   + (f"; wrong: {[r['meta'] for r in wrong][:3]}" if wrong else "")))
    for key, lines in logs.items():
        tracebacks = sum("Traceback" in ln for ln in lines)
        accepted = sum(": accepted " in ln for ln in lines)
        checks.append((f"mailgw log {key}: no tracebacks", tracebacks == 0,
                       f"{tracebacks} tracebacks, {accepted} ': accepted ' lines"))
    checks += postfix_log_checks(cells, ("postfix", "postfix+opendkim"))

    s, per_rep = summarise(recs, modes)
    say("\n## results (msgs/s = accepted msgs/s from mailbench; delivered = until in the Maildir)")
    for ln in report(s, per_rep, modes, args.reps):
        say(ln)
    say("\n## signing cost (Δ = signed − unsigned, from the medians; ( ) / [ ] = median of the per-repetition "
        "differences, b − a and d − c in the same repetition)")
    clines, verdicts = cost_lines(s, per_rep, modes)
    for ln in clines:
        say(ln)
    say("\n## verdict against issue 14 (mailgw's cost <= Postfix+OpenDKIM's)")
    for m, v in verdicts.items():
        mg, pf = v["mailgw"], v["postfix"]
        say(f"  {m:6}: CPU: mailgw {mg['d_cpu']:+.3f} vs Postfix+OpenDKIM {pf['d_cpu']:+.3f} ms/msg -> "
            f"{'met' if v['cpu_ok'] else 'NOT met'} (per-rep medians {median(mg['pair_d_cpu']):+.3f} vs "
            f"{median(pf['pair_d_cpu']):+.3f}: {'met' if v['pair_cpu_ok'] else 'NOT met'}); "
            f"msgs/s drop: mailgw {mg['drop_pct']:+.1f} % ({mg['drop']:+.1f}) vs Postfix+OpenDKIM "
            f"{pf['drop_pct']:+.1f} % ({pf['drop']:+.1f}) -> {'met' if v['drop_pct_ok'] else 'NOT met'} in %, "
            f"{'met' if v['drop_abs_ok'] else 'NOT met'} in msgs/s (per-rep medians {median(mg['pair_drop_pct']):+.1f} "
            f"vs {median(pf['pair_drop_pct']):+.1f} %: {'met' if v['pair_drop_ok'] else 'NOT met'})")
    return report_checks(checks, say, txt, out)


if __name__ == "__main__":
    sys.exit(main())
