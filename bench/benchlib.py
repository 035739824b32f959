"""Small pieces the Python benchmarks in bench/ share (routing_scale.py, dkim_sign.py)."""
from __future__ import annotations

import os
import socket
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def on_signal(signum, frame):
    """SIGTERM/SIGINT -> SystemExit, so atexit clean-up runs."""
    raise SystemExit(128 + signum)


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


def report_checks(checks, say, txt: list, out) -> int:
    """The closing "## checks" block, the .txt report beside the .jsonl, and
    the exit status: 0 when every check holds."""
    say("\n## checks")
    for what, ok, detail in checks:
        say(f"  [{'ok' if ok else 'FAIL'}] {what}: {detail}")
    Path(str(out) + ".txt").write_text("\n".join(txt) + "\n")
    print(f"\nresults: {out}.txt, {out}.jsonl")
    return 0 if all(ok for _, ok, _ in checks) else 1

