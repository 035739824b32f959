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
