"""End to end: `[server] smtp_workers = 2`.

The main twistd process binds the SMTP listeners and N worker processes
(`python -m mailgw.worker`, its children) accept on them. What stays in the
main process is reached over each worker's pipe: password checks (so a
lockout is one table for every worker and for POP3/IMAP), committed relay
entries (`queued`: the main process's queue runner relays them), local
deliveries. Here with real sockets against the real process tree:

* local delivery through the workers, each message stored once, accepted by
  worker processes (log lines `[smtp-worker-N]`), two of them, not the main
  process;
* submission (587 STARTTLS + AUTH, 465 implicit TLS) relayed to a real
  SMTP sink by the main process's runner, and the queue empties;
* a lockout earned on one worker refuses logins on the other, and on
  POP3S/IMAPS (served by the main process);
* kill -9 of a worker: it is started again, nothing that got a 250 is lost,
  mail keeps flowing;
* SIGTERM of the main process leaves no worker behind; after a kill -9 of
  the main process the workers go too, and a new start can bind the ports.

Which worker serves a connection is found in /proc: the server end of the
TCP connection (/proc/net/tcp) is an fd of exactly one worker. Every wait is
bounded (wait_until / wait_for_log / socket timeouts).
"""
from __future__ import annotations

import base64
import os
import re
import signal
import socket
import smtplib
import threading
import time
import uuid
from pathlib import Path

import pytest

from conftest import LineConnection, wait_until
from sink import queue_list, wait_until_queue_empty

pytestmark = pytest.mark.e2e

ALICE, PASSWORD = "alice@example.test", "secret"
WORKERS = "smtp_workers = 2"
TRUSTED = "127.0.0.2"              # conftest: trusted_networks = ["127.0.0.2/32"]
IO_TIMEOUT = 10.0
# "<time> [system] [namespace#level] <queue id>: accepted client=..." (workers' lines carry two brackets)
ACCEPTED = re.compile(r"^\S+ \[([^\]]+)\] (?:\[[^\]]+\] )?(\S+): accepted client=", re.M)


# -- the process tree ------------------------------------------------------------------------------

def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:        # gone
        return b""


def children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found.update(int(child) for child in (task / "children").read_text().split())
        except OSError:
            pass
    return found


def stopped(pid: int) -> bool:
    """Every thread of `pid` is in the stopped state (SIGSTOP has taken effect)."""
    states = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
        except (OSError, IndexError):
            pass
    return bool(states) and all(state == "T" for state in states)


def worker_pids(server) -> set[int]:
    """The live worker processes of `server` (zombies have an empty cmdline)."""
    return {child for child in children(server.pid) if b"mailgw.worker" in _cmdline(child)}


def worker_alive(pid: int) -> bool:
    """Still running as a worker: not gone, not a zombie, not a reused pid."""
    return b"mailgw.worker" in _cmdline(pid)


def wait_for_workers(server, count: int = 2, *, without: set[int] = frozenset(), within: float = 15.0) -> set[int]:
    """`count` live workers, none of them in `without`, each logged as accepting."""
    def ready():
        pids = worker_pids(server)
        if len(pids) != count or pids & set(without):
            return None
        log = server.log_text()
        if all(f"accepting SMTP (pid {pid})" in log for pid in pids):
            return pids
        return None
    return wait_until(ready, f"{count} workers accepting (not {sorted(without)}), have {worker_pids(server)}",
                      within)


def _tcp_entries():
    """(local (ip, port), remote (ip, port), inode) of every IPv4 TCP socket."""
    def address(text: str):
        ip, port = text.split(":")
        return socket.inet_ntoa(bytes.fromhex(ip)[::-1]), int(port, 16)
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        yield address(fields[1]), address(fields[2]), fields[9]


def serving_worker(server, client_sock: socket.socket, port: int, workers: set[int]) -> int:
    """The worker whose fd is the server end of `client_sock`'s connection."""
    mine = client_sock.getsockname()
    inodes = {inode for local, remote, inode in _tcp_entries()
              if local == ("127.0.0.1", port) and remote == mine}
    assert len(inodes) == 1, (mine, inodes)
    link = f"socket:[{inodes.pop()}]"
    owners = []
    for pid in workers:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                if os.readlink(fd) == link:
                    owners.append(pid)
                    break
            except OSError:
                pass
    assert len(owners) == 1, (link, owners, workers)
    return owners[0]


# -- clients ----------------------------------------------------------------------------------------

def deliver_one(server, mark: str, source: str | None = None) -> str:
    """One message to alice over its own connection to the relay listener; the queue id."""
    client = server.smtp("relay", source=source)
    try:
        client.ehlo()
        return server.send(client, "sender@elsewhere.test", [ALICE], server.build_message(mark))
    finally:
        client.quit()


def auth_plain(client: smtplib.SMTP, password: str) -> tuple[int, bytes]:
    """One AUTH PLAIN exchange (smtplib's login() would try every mechanism in turn)."""
    token = base64.b64encode(f"\0{ALICE}\0{password}".encode()).decode()
    return client.docmd("AUTH", "PLAIN " + token)


def submission_client(server, source: str) -> smtplib.SMTP:
    client = server.smtp("submission", source=source)
    client.starttls(context=server.tls_client_context())
    client.ehlo()
    return client


def assert_no_traceback(server) -> None:
    log = server.log_text(every_start=True)
    assert "Traceback" not in log and "Unhandled" not in log, server.log_tail(80)


def accepted_by(server) -> dict[str, str]:
    """queue id -> the log system (process) that logged its `accepted` line."""
    return {queue_id: system for system, queue_id in ACCEPTED.findall(server.log_text())}


def wait_for_accepted(server, count: int) -> dict[str, str]:
    """accepted_by once it has `count` lines: workers send info lines in
    batches, up to workers.FLUSH_DELAY after the 250."""
    return wait_until(lambda: (lambda found: found if len(found) >= count else None)(accepted_by(server)),
                      f"{count} accepted lines in the log", within=5.0)


# -- tests ------------------------------------------------------------------------------------------

def test_local_delivery_is_accepted_by_two_worker_processes_and_stored_once(make_server):
    server = make_server(extra_server=WORKERS).start()
    workers = wait_for_workers(server)
    assert server.pid not in workers and len(workers) == 2
    started = re.findall(r"\[mailgw\.workers#info\] started smtp-worker-(\d) \(pid (\d+)\)", server.log_text())
    assert sorted(n for n, _ in started) == ["1", "2"] and {int(pid) for _, pid in started} == workers, started

    marks = [uuid.uuid4().hex for _ in range(20)]
    errors: list[BaseException] = []

    def send_some(chunk):
        try:
            for mark in chunk:
                deliver_one(server, mark)
        except BaseException as error:      # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=send_some, args=(marks[i::4],), daemon=True) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive()
    assert not errors, errors
    assert len(server.queue_ids) == 20 and len(set(server.queue_ids)) == 20

    for mark in marks:                      # a 250 after DATA means it is on disk
        server.find(ALICE, mark)            # exactly one copy each
    assert len(server.messages(ALICE)) == 20

    systems = wait_for_accepted(server, 20)
    assert set(server.queue_ids) <= set(systems), "an accepted message without its log line"
    assert {systems[q] for q in server.queue_ids} <= {"smtp-worker-1", "smtp-worker-2"}, systems
    assert worker_pids(server) == workers, "no worker restarted meanwhile"
    assert "starting it again" not in server.log_text()
    assert_no_traceback(server)


def test_submission_and_implicit_tls_are_relayed_by_the_main_runner(make_server, sink):
    server = make_server(extra_server=WORKERS, relay_port=sink.controller.port).start()
    workers = wait_for_workers(server)
    marks = [uuid.uuid4().hex for _ in range(2)]

    client = submission_client(server, "127.0.0.1")             # 587: STARTTLS + AUTH
    client.login(ALICE, PASSWORD)
    assert client.sendmail(ALICE, ["friend@remote.test"], f"Subject: {marks[0]}\r\n\r\nvia 587\r\n".encode()) == {}
    client.quit()
    client = server.smtp("submissions")                           # 465: implicit TLS
    client.login(ALICE, PASSWORD)
    assert client.sendmail(ALICE, ["other@remote.test"], f"Subject: {marks[1]}\r\n\r\nvia 465\r\n".encode()) == {}
    client.quit()

    # No worker exited: only the `queued` lines can have told the runner.
    sink.wait_for(2)
    subjects = sorted(content.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
                      for _, _, content in sink.messages)
    assert subjects == sorted(marks)
    assert sorted(rcpt for _, rcpts, _ in sink.messages for rcpt in rcpts) == \
        ["friend@remote.test", "other@remote.test"]
    assert all(mail_from == ALICE for mail_from, _, _ in sink.messages)
    wait_until_queue_empty(server)
    listed = queue_list(server, "--json")
    assert listed.returncode == 0 and listed.stdout.strip() == "[]", (listed.stdout, listed.stderr)

    log = server.log_text()
    assert log.count("status=sent") == 2
    assert "found in the spool after a worker exited" not in log and "starting it again" not in log
    assert worker_pids(server) == workers
    systems = wait_for_accepted(server, 2)
    accepted = list(systems.values())
    assert len(accepted) == 2 and all(s.startswith("smtp-worker-") for s in accepted), systems
    assert_no_traceback(server)


def test_a_lockout_earned_on_one_worker_holds_on_every_worker_and_on_pop3_and_imap(make_server):
    server = make_server(extra_server=WORKERS,
                         smtp={"auth_lockout_failures": 3, "auth_lockout_time": 600.0}).start()
    workers = wait_for_workers(server)
    locked, elsewhere = "127.0.0.8", "127.0.0.9"
    port = server.ports["submission"]

    # Connections from the guessing address, two on each worker. An idle
    # worker takes every new connection (EPOLLEXCLUSIVE wakes one, the same
    # one while it is idle), so the others are stopped (SIGSTOP: not waiting
    # in epoll) while a connection for the remaining one is opened.
    by_worker: dict[int, list[smtplib.SMTP]] = {}
    opened = []
    try:
        for target in sorted(workers):
            others = workers - {target}
            for pid in others:
                os.kill(pid, signal.SIGSTOP)
                # Only once every thread is stopped is none left waiting in epoll to be woken.
                wait_until(lambda: stopped(pid), f"worker {pid} stopped")
            try:
                for _ in range(2):
                    client = submission_client(server, locked)
                    opened.append(client)
                    by_worker.setdefault(serving_worker(server, client.sock, port, workers), []).append(client)
            finally:
                for pid in others:
                    os.kill(pid, signal.SIGCONT)
        assert sorted(by_worker) == sorted(workers) and all(len(c) == 2 for c in by_worker.values()), by_worker
        first, second = by_worker.values()
        guessers = [first[0], second[0], (first[1:] + second[1:])[0]]     # both workers guess
        for n, client in enumerate(guessers):
            code, reply = auth_plain(client, f"guess-{n}")
            assert code == 535, (n, code, reply)
        # Locked out everywhere: the right password now gets 454 4.7.0 on both workers.
        for clients in (first, second):
            client = clients[-1]
            code, reply = auth_plain(client, PASSWORD)
            assert (code, reply[:6]) == (454, b"4.7.0 "), (code, reply)
            assert b"Too many failed logins" in reply
        # ... and on a new connection, whichever worker takes it.
        client = submission_client(server, locked)
        opened.append(client)
        code, reply = auth_plain(client, PASSWORD)
        assert (code, reply[:6]) == (454, b"4.7.0 "), (code, reply)
    finally:
        for client in opened:
            try:
                client.close()
            except OSError:
                pass

    # POP3S and IMAPS (the main process) refuse that address too.
    pop3 = LineConnection(server.ports["pop3s"], source=locked, tls=True)
    try:
        assert pop3.line().startswith(b"+OK")
        assert pop3.command(f"USER {ALICE}").startswith(b"+OK")
        reply = pop3.command(f"PASS {PASSWORD}")
        assert reply.startswith(b"-ERR [SYS/TEMP] Too many failed logins"), reply
    finally:
        pop3.close()
    imap = LineConnection(server.ports["imaps"], source=locked, tls=True)
    try:
        assert imap.line().startswith(b"* OK")
        reply = imap.command(f'b LOGIN {ALICE} "{PASSWORD}"', until=b"b ")
        assert reply.startswith(b"b NO [UNAVAILABLE] Too many failed logins"), reply
    finally:
        imap.close()

    # The user herself, elsewhere, is not affected (through a worker, and IMAPS).
    client = submission_client(server, elsewhere)
    code, reply = auth_plain(client, PASSWORD)
    assert code == 235, (code, reply)
    client.quit()
    imap = LineConnection(server.ports["imaps"], source=elsewhere, tls=True)
    try:
        assert imap.line().startswith(b"* OK")
        assert imap.command(f'b LOGIN {ALICE} "{PASSWORD}"', until=b"b ").startswith(b"b OK")
    finally:
        imap.close()

    log = server.log_text()
    assert f"{locked}: 3 failed logins in a row, refusing its logins for 600 s" in log
    failed = re.findall(r"\[(smtp-worker-\d)\] \[[^\]]+\] AUTH failed user='" + re.escape(ALICE)
                        + r"' client=\[" + re.escape(locked) + r"\]: bad credentials", log)
    assert len(failed) == 3 and len(set(failed)) == 2, failed
    # ... and checked by the one checker, in the main process (no worker's name on the line).
    checked = re.findall(r"^\S+ \[mailgw\.auth\.checkers#warn\] authentication failed for '"
                         + re.escape(ALICE) + "' from " + re.escape(locked), log, re.M)
    assert len(checked) == 3, log
    assert log.count(f"login for '{ALICE}' from {locked} refused: locked out") == 5
    assert not any(f"guess-{n}" in log for n in range(3)) and PASSWORD not in log
    assert worker_pids(server) == workers
    assert_no_traceback(server)


def test_a_worker_killed_with_sigkill_is_started_again_and_nothing_accepted_is_lost(make_server):
    server = make_server(extra_server=WORKERS).start()
    workers = wait_for_workers(server)
    port = server.ports["relay"]
    before = [uuid.uuid4().hex for _ in range(6)]
    for mark in before:
        deliver_one(server, mark)

    # A session on the victim: one message accepted on it, then the kill.
    client = server.smtp("relay")
    client.ehlo()
    victim = serving_worker(server, client.sock, port, workers)
    survivor = (workers - {victim}).pop()
    in_session = uuid.uuid4().hex
    server.send(client, "sender@elsewhere.test", [ALICE], server.build_message(in_session))
    number = re.search(rf"\[smtp-worker-(\d)\] \[[^\]]+\] worker \d of 2 accepting SMTP \(pid {victim}\)",
                       server.log_text()).group(1)
    os.kill(victim, signal.SIGKILL)
    with pytest.raises((smtplib.SMTPServerDisconnected, ConnectionError)):
        client.noop()                                   # its connection went with it
    client.close()

    server.wait_for_log(f"smtp-worker-{number} exited")
    server.wait_for_log("starting it again in 0.5 s")
    restarted = wait_for_workers(server, without={victim})
    assert survivor in restarted and not worker_alive(victim)
    assert f"started smtp-worker-{number} (pid {(restarted - {survivor}).pop()})" in server.log_text()

    after = [uuid.uuid4().hex for _ in range(6)]
    for mark in after:
        deliver_one(server, mark)
    for mark in [*before, in_session, *after]:
        server.find(ALICE, mark)
    assert len(server.messages(ALICE)) == 13
    assert worker_pids(server) == restarted


def test_stopping_the_server_leaves_no_worker_behind(make_server):
    server = make_server(extra_server=WORKERS).start()
    workers = wait_for_workers(server)
    deliver_one(server, uuid.uuid4().hex)
    started = time.monotonic()
    assert server.stop() in (0, -signal.SIGTERM)
    wait_until(lambda: not any(worker_alive(pid) for pid in workers),
               f"workers {sorted(workers)} gone after SIGTERM", within=5.0)
    assert time.monotonic() - started < 8.0, "the stop waited for its SIGKILL grace"
    assert_no_traceback(server)


def test_workers_go_when_the_main_process_is_killed_and_a_new_start_can_bind(make_server):
    server = make_server(extra_server=WORKERS).start()
    workers = wait_for_workers(server)
    deliver_one(server, "first")
    server.kill9()
    # Their pipe closed: they stop (and release the listening sockets they inherited).
    wait_until(lambda: not any(worker_alive(pid) for pid in workers),
               f"workers {sorted(workers)} gone after the main process died", within=10.0)
    server.start()
    again = wait_for_workers(server)
    assert not again & workers
    deliver_one(server, "second")
    server.find(ALICE, "first")
    server.find(ALICE, "second")


def test_a_delivery_through_a_worker_wakes_imap_idle_in_the_main_process_at_once(make_server):
    """The worker's `delivered` line syncs the INBOX the IDLE session watches
    now, not at the next 1 s poll: after each EXISTS the next message is sent
    at once, so with only the poll every later EXISTS would come ~1 s after
    its 250."""
    server = make_server(extra_server=WORKERS).start()
    wait_for_workers(server)
    imap = LineConnection(server.ports["imaps"], source="127.0.0.1", tls=True)
    try:
        assert imap.line().startswith(b"* OK")
        assert imap.command(f'a LOGIN {ALICE} "{PASSWORD}"', until=b"a ").startswith(b"a OK")
        assert imap.command("s SELECT INBOX", until=b"s ").startswith(b"s OK")
        assert imap.command("i IDLE").startswith(b"+ ")
        took = []
        for n in range(1, 5):
            client = server.smtp("relay")
            client.ehlo()
            server.send(client, "sender@elsewhere.test", [ALICE], server.build_message(f"idle-{n}"))
            sent = time.monotonic()
            line = imap.line()
            while not line.endswith(b" EXISTS"):
                line = imap.line()
            took.append(time.monotonic() - sent)
            assert line == f"* {n} EXISTS".encode(), line
            client.quit()
        print("IDLE wake-up after the 250 (s):", [round(t, 3) for t in took])
        assert max(took) < 0.6, took
        assert imap.command("DONE", until=b"i ").startswith(b"i OK")
    finally:
        imap.close()
    for n in range(1, 5):
        server.find(ALICE, f"idle-{n}")


def test_each_worker_admits_up_to_the_connection_limit(make_server):
    """max_connections_per_ip = 2 with two workers: each worker admits 2 from
    one address (a client is never refused below the configured figure), so
    the server as a whole admits at most 2 x 2."""
    server = make_server(extra_server=WORKERS, smtp={"max_connections_per_ip": 2}).start()
    workers = wait_for_workers(server)
    port = server.ports["relay"]
    admitted: list[tuple[socket.socket, int]] = []
    refused = 0
    opened = []
    try:
        for _ in range(6):
            conn = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT, source_address=("127.0.0.6", 0))
            opened.append(conn)
            reply = conn.recv(4096)
            if reply.startswith(b"220 "):
                admitted.append((conn, serving_worker(server, conn, port, workers)))
            else:
                assert reply.startswith(b"421 4.7.0 Too many connections"), reply
                refused += 1
        assert 2 <= len(admitted) <= 4 and refused == 6 - len(admitted), (admitted, refused)
        on = [pid for _, pid in admitted]
        assert all(on.count(pid) <= 2 for pid in on), f"more than 2 sessions on one worker: {on}"
        # Another address is not affected.
        client = server.smtp("relay")
        assert client.noop()[0] == 250
        client.quit()
    finally:
        for conn in opened:
            conn.close()
    server.wait_for_log("connection limit: refusing 127.0.0.6 on relay")
