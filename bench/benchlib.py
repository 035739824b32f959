"""What the Python benchmarks in bench/ share (routing_scale.py, dkim_sign.py, spam_accept.py).

Paths and tools, running mailbench and writing its records, the closing checks, and, for the
benchmarks that run mailgw next to private Postfix instances and a milter or scanner
(dkim_sign.py, spam_accept.py): the registry of everything they start, starting and stopping it
by its PID, and removing their scratch dirs on exit.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(os.environ.get("BENCH", "/work/shared/bench"))
MAILBENCH = BENCH / "mailbench.py"
PEER_POSTFIX = BENCH / "peers" / "postfix"
PYTHON = os.environ.get("PYTHON", "python3")
TWISTD = os.environ.get("TWISTD", "twistd")
CLK_TCK = os.sysconf("SC_CLK_TCK")

DOMAIN = "gw.test"
SINK = "sink@gw.test"
SERVER_CPU = "1"     # pinned rounds: the servers (and their milter / scanner) here ...
CLIENT_CPU = "0"     # ... and mailbench here

PROCS: dict[str, subprocess.Popen] = {}      # processes started here (mailgw, a milter, a scanner), by name
POSTFIXES: dict[str, dict] = {}              # Postfix instances started here: etc dir, master pid
DAEMONS: dict[str, int] = {}                 # the main pid of a daemon a process in PROCS launched, by its name
SCRATCH: list[Path] = []                     # removed on exit (cleanup)


def on_signal(signum, frame):
    """SIGTERM/SIGINT -> SystemExit, so atexit clean-up runs."""
    raise SystemExit(128 + signum)


def on_exit(fn, *args) -> None:
    """fn(*args) at exit, also on Ctrl-C / SIGTERM."""
    atexit.register(fn, *args)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def sbin_on_path() -> None:
    """postfix, postconf, opendkim live in sbin directories."""
    os.environ["PATH"] = os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin"


def scratch_dir(prefix: str, parent: str = "/tmp") -> Path:
    """A fresh dir below parent, removed on exit (SCRATCH); mode 755, for Postfix (user postfix)
    and virtual(8) (uid 5000) to work below it."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    SCRATCH.append(d)
    os.chmod(d, 0o755)
    return d


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def env() -> dict:
    """The environment for mailgw processes: this checkout first on PYTHONPATH."""
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + (":" + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


def clear_maildir(d: Path) -> None:
    for sub in ("new", "cur", "tmp"):
        p = d / sub
        if p.is_dir():
            for name in os.listdir(p):
                try:
                    os.unlink(p / name)
                except OSError:
                    pass


def maildir_files(d: Path) -> list[Path]:
    return [d / sub / n for sub in ("new", "cur") if (d / sub).is_dir() for n in os.listdir(d / sub)]


def wait_port(port: int, seconds: float, alive=lambda: True, what="") -> None:
    end = time.time() + seconds
    while time.time() < end:
        if port_open(port):
            return
        if not alive():
            raise SystemExit(f"{what} exited before opening port {port}")
        time.sleep(0.1)
    raise SystemExit(f"{what} did not open port {port} within {seconds} s")


def run(argv, **kw) -> subprocess.CompletedProcess:
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=kw.pop("timeout", 120), **kw)
    if cp.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, argv))} failed ({cp.returncode}): {cp.stdout}{cp.stderr}")
    return cp


def cli(args, config: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    return run([PYTHON, "-m", "mailgw.cli", *args, "--config", str(config)], input=stdin, env=env())


# --------------------------------------------------------------------------- the machine, the source

def git_head() -> str:
    """The commit HEAD names, read from .git's files (no git command is run)."""
    try:
        head = (REPO / ".git" / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head[:7]
        ref = head[5:]
        p = REPO / ".git" / ref
        if p.exists():
            return p.read_text().strip()[:7]
        for line in (REPO / ".git" / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0][:7]
    except OSError:
        pass
    return "unknown"


def source_hash() -> str:
    h = hashlib.sha256()
    for p in sorted(list((REPO / "mailgw").rglob("*.py")) + list((REPO / "mailgw").rglob("*.toml"))
                    + list((REPO / "twisted").rglob("*.py"))):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def loadavg() -> list[str]:
    return open("/proc/loadavg").read().split()[:3]


def machine_line() -> str:
    return f"nproc: {os.cpu_count()}; cpu: " + next((ln.split(':', 1)[1].strip() for ln in open('/proc/cpuinfo')
                                                     if ln.startswith('model name')), '?')


def header_lines(head: str) -> list[str]:
    """date, this checkout (HEAD and a hash of its source), the machine."""
    return [f"date: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}",
            f"mailgw: HEAD {head} (read from .git, no git command run); source sha256 of mailgw/ + twisted/: "
            f"{source_hash()}",
            machine_line()]


# --------------------------------------------------------------------------- processes

def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def wait_gone(pid: int, seconds: float) -> bool:
    end = time.time() + seconds
    while time.time() < end:
        if not alive(pid):
            return True
        time.sleep(0.1)
    return not alive(pid)


def proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, utime+stime+cutime+cstime seconds), from /proc."""
    table = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            table[int(d)] = (int(fields[1]), sum(int(x) for x in fields[11:15]) / CLK_TCK)
        except (OSError, IndexError, ValueError):
            pass
    return table


def tree(pid: int, table=None, dead_root: bool = False) -> list[int]:
    """pid and its live descendants; pid itself only while it lives, unless dead_root."""
    table = table or proc_table()
    kids: dict[int, list[int]] = {}
    for p, (pp, _) in table.items():
        kids.setdefault(pp, []).append(p)
    out, stack = [], [pid]
    while stack and len(out) < 10000:
        p = stack.pop()
        if p in table or (dead_root and p == pid):
            out.append(p)
            stack.extend(kids.get(p, ()))
    return out


def cpus_allowed(pid: int) -> str:
    try:
        for ln in open(f"/proc/{pid}/status"):
            if ln.startswith("Cpus_allowed_list"):
                return ln.split(":", 1)[1].strip()
    except OSError:
        pass
    return "gone"


def comm(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/comm").read().strip()
    except OSError:
        return "?"


def stop_proc(name: str, timeout: float = 15.0, label: str = "pid") -> None:
    """SIGTERM, SIGKILL after timeout s; then the daemon it launched (DAEMONS), if it is still there:
    by its PID, and what is left of its tree."""
    proc = PROCS.pop(name, None)
    if proc is None:
        return
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        print(f"{name}: {label} {proc.pid} stopped", flush=True)
    main = DAEMONS.pop(name, None)
    if main is not None and alive(main):
        # the launcher was killed before it could stop its daemon: stop that by its PID,
        # then whatever of its tree is left
        pids = tree(main)
        os.kill(main, signal.SIGTERM)
        if not wait_gone(main, 15):
            for p in pids:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        print(f"{name}: {name} main pid {main} stopped", flush=True)


def stop_postfix(name: str) -> None:
    pf = POSTFIXES.pop(name, None)
    if pf is None:
        return
    subprocess.run(["postfix", "-c", str(pf["etc"]), "stop"], capture_output=True, timeout=60)
    if not wait_gone(pf["pid"], 15):
        try:
            os.kill(pf["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass
    print(f"{name}: Postfix master pid {pf['pid']} stopped", flush=True)


def stop_all(last: str, timeout: float = 15.0) -> None:
    """The processes, then the Postfix instances, then the processes whose name starts with
    `last` (the milter or scanner the Postfix instances use)."""
    for name in [n for n in PROCS if not n.startswith(last)]:
        stop_proc(name, timeout)
    for name in list(POSTFIXES):
        stop_postfix(name)
    for name in list(PROCS):
        stop_proc(name, timeout)


def cleanup(keep: bool, last: str, timeout: float = 15.0) -> None:
    """stop_all(last, timeout), then remove the SCRATCH dirs (unless keep)."""
    try:
        stop_all(last, timeout)
    except Exception as e:  # noqa: BLE001 - keep cleaning up
        print(f"cleanup: {e}", file=sys.stderr)
    for d in SCRATCH:
        if d.exists():
            if keep:
                print(f"data kept in {d}")
            else:
                shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------- servers

def setup_postfix(d: Path, port: int, syslog_name: str, milter_port: int | None, milter_settings) -> dict:
    """A Postfix instance in d: the shared peer's main.cf / master.cf, own port, spool and Maildirs;
    with a milter_port, also milter_settings ({milter} = inet:127.0.0.1:MILTER_PORT)."""
    etc, spool, data, mail = d / "etc", d / "spool", d / "data", d / "mail"
    for p in (etc, spool, data, mail / "sink" / "Maildir"):
        p.mkdir(parents=True, exist_ok=True)
    shutil.copy(PEER_POSTFIX / "main.cf", etc / "main.cf")
    master = (PEER_POSTFIX / "master.cf").read_text()
    if "127.0.0.1:2525 " not in master:
        raise SystemExit(f"{PEER_POSTFIX}/master.cf has no 127.0.0.1:2525 smtpd line")
    (etc / "master.cf").write_text(master.replace("127.0.0.1:2525 ", f"127.0.0.1:{port} ", 1))
    (etc / "vmailbox").write_text(f"{SINK}   sink/Maildir/\n")
    settings = [f"queue_directory={spool}", f"data_directory={data}", f"syslog_name={syslog_name}-{port}",
                f"maillog_file={d}/postfix.log", f"maillog_file_prefixes={d}", f"virtual_mailbox_base={mail}",
                f"virtual_mailbox_maps=texthash:{etc}/vmailbox"]
    if milter_port is not None:
        settings += [x.format(milter=f"inet:127.0.0.1:{milter_port}") for x in milter_settings]
    run(["postconf", "-c", str(etc), "-e", *settings])
    shutil.chown(data, "postfix")
    for p in [mail, *mail.rglob("*")]:
        os.chown(p, 5000, 5000)
    run(["postfix", "-c", str(etc), "check"])
    return dict(dir=d, etc=etc, port=port, pidfile=spool / "pid" / "master.pid",
                maildir=mail / "sink" / "Maildir", log=d / "postfix.log", milter=milter_port)


def start_mailgw(name: str, cell: dict, pin: str | None, tag: str) -> None:
    d = cell["dir"]
    if port_open(cell["port"]):
        raise SystemExit(f"port {cell['port']} is already in use")
    log = d / f"mailgw-{tag}.log"
    argv = (["taskset", "-c", pin] if pin else []) + [
        TWISTD, "-n", "--pidfile", str(cell["pidfile"]), "--logfile", str(log), "mailgw", "--config",
        str(cell["config"])]
    out = open(d / f"stdout-{tag}.log", "w")
    proc = subprocess.Popen(argv, cwd=d, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                            env=env(), start_new_session=True)
    PROCS[name] = proc     # taskset execs twistd: the PID is twistd's
    wait_port(cell["port"], 30, lambda: proc.poll() is None, name)
    if cell["pidfile"].read_text().split()[0] != str(proc.pid):
        raise SystemExit(f"{name}: pid file {cell['pidfile']} does not hold {proc.pid}")
    cell.update(pid=proc.pid, log=log)


def start_postfix(name: str, cell: dict, pin: str | None) -> None:
    if port_open(cell["port"]):
        raise SystemExit(f"port {cell['port']} is already in use")
    cell["pidfile"].unlink(missing_ok=True)
    run((["taskset", "-c", pin] if pin else []) + ["postfix", "-c", str(cell["etc"]), "start"], timeout=60)
    for _ in range(100):
        if cell["pidfile"].exists() and cell["pidfile"].read_text().split():
            break
        time.sleep(0.1)
    pid = int(cell["pidfile"].read_text().split()[0])
    POSTFIXES[name] = dict(etc=cell["etc"], pid=pid)
    wait_port(cell["port"], 30, lambda: alive(pid), name)
    cell.update(pid=pid)


def start_cells(cells: dict, names, pin: str | None, tag: str) -> None:
    for name in names:
        if cells[name]["kind"] == "mailgw":
            start_mailgw(name, cells[name], pin, tag)
        else:
            start_postfix(name, cells[name], pin)


def stop_cells(cells: dict, names, tag: str, logs: dict, timeout: float = 15.0) -> None:
    """Stop each cell's server; a mailgw's log goes to logs[f"{name}/{tag}"]."""
    for name in names:
        if cells[name]["kind"] == "mailgw":
            stop_proc(name, timeout)
            logs[f"{name}/{tag}"] = twistd_log(cells[name]["log"])
        else:
            stop_postfix(name)


def twistd_log(log) -> list[str]:
    """The lines of a twistd log: it rotates at 1 MB, so every piece, oldest first."""
    pieces = sorted(Path(log).parent.glob(Path(log).name + "*"),
                    key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0)
    return [ln for p in pieces for ln in open(p, errors="replace")]


# --------------------------------------------------------------------------- mailbench

def mailbench_json(argv) -> dict:
    """Run mailbench (argv) in BENCH, 400 s at most: the JSON record of its last line."""
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=400, cwd=BENCH)
        out, err = cp.stdout, cp.stderr
    except subprocess.TimeoutExpired as e:
        out, err = "", f"timeout: {e}"
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"result": {"fatal": "no JSON from mailbench", "stdout": out[-500:], "stderr": err[-500:]}}


def mailbench_smtp(args: list[str], maildir: Path, pin: str | None, settle: float) -> tuple[list[str], dict]:
    """mailbench.py ARGS (under taskset -c PIN) into an emptied Maildir: the command as shown, the record."""
    argv = (["taskset", "-c", pin] if pin else []) + [PYTHON, str(MAILBENCH), *args]
    clear_maildir(maildir)
    if settle:
        # the previous run's writes and these unlinks reach the disk now, not inside this run's
        # window (where a server's fsync() would wait for them)
        os.sync()
        time.sleep(settle)
    rec = mailbench_json(argv)
    shown = (["taskset", "-c", pin] if pin else []) + ["python3", "mailbench.py", *args]
    return shown, rec


def write_rec(rec: dict, command: str, t0: float, log) -> None:
    """The record's command and wall time since t0, then the record as one line of the .jsonl."""
    rec["command"] = command
    rec["wall"] = round(time.time() - t0, 3)
    log.write(json.dumps(rec) + "\n")
    log.flush()


def pins(mode: str) -> tuple[str | None, str | None]:
    """(the servers' CPU, mailbench's CPU) in a round: pinned, or nothing pinned."""
    return (SERVER_CPU, CLIENT_CPU) if mode == "pinned" else (None, None)


def rotation(cells, rep: int):
    """The cell order of repetition rep: rotated by one cell per repetition, so each cell takes
    each position once in every len(cells) repetitions and none runs twice in a row."""
    k = (rep - 1) % len(cells)
    return cells[k:] + cells[:k]


# --------------------------------------------------------------------------- report

def median(xs):
    return statistics.median(xs) if xs else None


def half_range_pct(xs) -> float:
    m = median(xs)
    return (max(xs) - min(xs)) / 2 / m * 100 if xs and m else 0.0


def fmt(x, nd=1):
    return "–" if x is None else f"{x:,.{nd}f}"


def transcript():
    """say(line): print the line and keep it in txt, the .txt report; returns (say, txt)."""
    txt: list[str] = []

    def say(line=""):
        print(line, flush=True)
        txt.append(line)
    return say, txt


def measured_runs(recs):
    """(meta, result) of each record that counts: no warm-up, no fatal mailbench error."""
    for r in recs:
        meta = r["meta"]
        if meta["rep"] == "warmup":
            continue
        res = r.get("result", {})
        if "fatal" in res:
            continue
        yield meta, res


def add_run(d: dict, res: dict, cpu: str) -> None:
    """Append a run's msgs/s, delivered msgs/s, server CPU ms/msg (to d[cpu]), p50, p99 and errors
    to the lists of its cell's summary d."""
    d["msgs_per_s"].append(res["msgs_per_s"])
    if res.get("delivered_msgs_per_s") is not None:
        d["delivered_msgs_per_s"].append(res["delivered_msgs_per_s"])
    if res.get("server_cpu_ms_per_msg") is not None:
        d[cpu].append(res["server_cpu_ms_per_msg"])
    d["p50"].append(res["lat_p50_ms"])
    d["p99"].append(res["lat_p99_ms"])
    d["errors"].append(res.get("errors", 0))


def maildir_check(recs) -> tuple[str, bool, str]:
    bad = [r for r in recs if r.get("result", {}).get("ok") != r["meta"]["maildir_files"]
           or r.get("result", {}).get("errors") or "fatal" in r.get("result", {})]
    return ("every run: files in the Maildir = messages accepted, no SMTP errors", not bad,
            f"{sum(r['meta']['maildir_files'] for r in recs)} files over {len(recs)} runs"
            + (f"; bad: {[(r['meta'], r.get('result', {}).get('ok'), r.get('result', {}).get('errors')) for r in bad][:5]}"
               if bad else ""))


def postfix_log_checks(cells: dict, names) -> list[tuple[str, bool, str]]:
    checks = []
    for name in names:
        try:
            plog = cells[name]["log"].read_text(errors="replace").splitlines()
        except OSError:
            plog = []
        milter_err = sum("milter" in ln and ("error" in ln or "reject" in ln or "warning" in ln) for ln in plog)
        sent = sum("status=sent" in ln for ln in plog)
        checks.append((f"{name} log: no milter errors/warnings", milter_err == 0,
                       f"{sent} status=sent, {milter_err} milter error/warning lines"))
    return checks


def report_checks(checks, say, txt: list, out) -> int:
    """The closing "## checks" block, the .txt report beside the .jsonl, and
    the exit status: 0 when every check holds."""
    say("\n## checks")
    for what, ok, detail in checks:
        say(f"  [{'ok' if ok else 'FAIL'}] {what}: {detail}")
    Path(str(out) + ".txt").write_text("\n".join(txt) + "\n")
    print(f"\nresults: {out}.txt, {out}.jsonl")
    return 0 if all(ok for _, ok, _ in checks) else 1
