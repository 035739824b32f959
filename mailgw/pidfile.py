"""Removes twistd's pid file when mailgw, running as `[server] user`, exits.

twistd writes the pid file as root and removes it, at stop, as whoever the
process is by then; after our switch to `[server] user` that fails in any
directory the user cannot write ("No permission to delete pid file", and a
stale file for the next start). So before the switch, mailgw starts this small
helper as root. It holds nothing but the read end of a pipe whose write end
only mailgw has; when mailgw exits, however it exits, the pipe reaches EOF and
the helper removes the pid file if it still names mailgw's pid, then exits.
twistd is told to leave the file alone (its `pidfile` option is cleared).

Run as a script with `python -I` (no environment, no mailgw import: it runs
as root), so only the standard library is used here.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys


def keep(pid_file: str) -> int:
    """Start the helper for this process's `pid_file`; returns the pipe's
    write end, which must stay open for the life of the process."""
    read_end, write_end = os.pipe()          # both close-on-exec: later children never hold them
    try:
        subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__), pid_file, str(os.getpid())],
                         stdin=read_end, stdout=subprocess.DEVNULL, cwd="/", close_fds=True)
    finally:
        os.close(read_end)
    return write_end


def _wait_and_remove(pid_file: str, pid: str) -> int:
    # The terminal's or systemd's signals go to mailgw too; it exits, and the EOF ends us.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    while os.read(0, 512):
        pass
    try:
        with open(pid_file) as f:
            if f.read().strip() != pid:
                return 0            # a newer mailgw's file: not ours to remove
        os.unlink(pid_file)
    except FileNotFoundError:
        pass
    except OSError as error:
        print(f"mailgw: cannot remove pid file {pid_file}: {error.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_wait_and_remove(sys.argv[1], sys.argv[2]))
