"""Regenerate the `.expected` files of the Sieve differential corpus from
Dovecot Pigeonhole's `sieve-test`.

Layout: each case is ``NNN-short-name.sieve``. Its first line is a comment

    # envelope: from=<sender> to=<recipient> message=messages/<file>.eml

The null reverse-path cannot be given to sieve-test (``-f ""`` and
``-f "<>"`` are refused; without ``-f`` it falls back to the message's
headers), so every case has a real envelope sender. An optional second comment line

    # pigeonhole-rewrite: ereject->reject

tells this script to textually replace ``ereject`` by ``reject`` before
giving the script to Pigeonhole: Pigeonhole 2.3 has no ``ereject``
extension, and both normalize to the same ``reject`` line anyway.

``NNN-short-name.expected`` is Pigeonhole's normalized result, one action
per line, sorted:

    keep flags=<flags>            (explicit or implicit keep, fileinto "INBOX")
    fileinto <mailbox> flags=<flags>
    redirect <address>
    reject
    discard                       (only when there is no other action)
    failed                        (the run failed; followed by the keep)

Flags are lower-cased, deduplicated and sorted, separated by one space.

sieve-test refuses to run as root and wants a mail location, so it is run
with a tiny config in a temporary directory:

    sieve-test -c <tmp>/dovecot.conf -f <sender> -r <recipient> <script> <message>

with mail_uid/mail_gid = 65534 (nobody) when we are root.

Usage: python tests/sieve_corpus/regenerate.py [NAME-SUBSTRING ...]
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CORPUS = Path(__file__).resolve().parent
_HEADER = re.compile(r"^# envelope: from=(\S*) to=(\S+) message=(\S+)\s*$")


def cases() -> list[Path]:
    return sorted(CORPUS.glob("[0-9][0-9][0-9]-*.sieve"))


def parse_header(path: Path) -> dict:
    lines = path.read_text(encoding="utf-8").splitlines()
    m = _HEADER.match(lines[0])
    if not m:
        raise ValueError(f"{path.name}: first line must be '# envelope: ...'")
    sender = m.group(1)
    rewrites = []
    for line in lines[1:3]:
        if line.startswith("# pigeonhole-rewrite:"):
            old, new = line.split(":", 1)[1].strip().split("->")
            rewrites.append((old, new))
    return {"sender": sender, "recipient": m.group(2), "message": CORPUS / m.group(3),
            "rewrites": rewrites}


def format_flags(flags) -> str:
    return " ".join(sorted({f.lower() for f in flags}))


def finish(lines: list[str]) -> str:
    lines = [line for line in lines if line != "discard"]
    if not any(line != "failed" for line in lines):
        lines.append("discard")
    return "\n".join(sorted(lines)) + "\n"


def _store(mailbox: str, flags) -> str:
    if mailbox.upper() == "INBOX":
        return f"keep flags={format_flags(flags)}"
    return f"fileinto {mailbox} flags={format_flags(flags)}"


def normalize_pigeonhole(stdout: str, stderr: str) -> str:
    """sieve-test's report ("Performed actions:" / "Implicit keep:") as lines."""
    lines: list[str] = []
    current: list | None = None     # [mailbox, flags] of the last store

    def flush():
        nonlocal current
        if current is not None:
            lines.append(_store(current[0], current[1]))
            current = None

    failed = "final result: failed" in stderr
    for raw in stdout.splitlines():
        text = raw.strip()
        if text.startswith("* "):
            flush()
            body = text[2:]
            if body.startswith("store message in folder: "):
                current = [body[len("store message in folder: "):], []]
            elif body.startswith("redirect message to: "):
                lines.append("redirect " + body[len("redirect message to: "):].strip("<>"))
            elif body.startswith("reject message"):
                lines.append("reject")
            elif body == "discard":
                lines.append("discard")
            else:
                lines.append("unknown " + body)
        elif text.startswith("+ add IMAP flags: ") and current is not None:
            current[1].extend(text[len("+ add IMAP flags: "):].split())
    flush()
    if failed:
        if not any(line.startswith("keep") for line in lines):
            lines.append("keep flags=")
        lines.append("failed")
    return finish(lines)


_CONF = """\
mail_uid = {uid}
mail_gid = {gid}
first_valid_uid = 1
first_valid_gid = 1
mail_location = maildir:{tmp}/mail
"""


def run_pigeonhole(path: Path, binary: str = "sieve-test") -> str:
    """Run one case through sieve-test; the normalized result."""
    header = parse_header(path)
    with tempfile.TemporaryDirectory(prefix="sieve-diff-") as tmp:
        os.chmod(tmp, 0o755)
        uid, gid = (65534, 65534) if os.geteuid() == 0 else (os.getuid(), os.getgid())
        os.makedirs(os.path.join(tmp, "mail"))
        os.chmod(os.path.join(tmp, "mail"), 0o777)
        conf = os.path.join(tmp, "dovecot.conf")
        Path(conf).write_text(_CONF.format(uid=uid, gid=gid, tmp=tmp))
        text = path.read_text(encoding="utf-8")
        for old, new in header["rewrites"]:
            text = text.replace(old, new)
        script = os.path.join(tmp, "case.sieve")
        Path(script).write_text(text, encoding="utf-8")
        message = os.path.join(tmp, "message.eml")
        shutil.copyfile(header["message"], message)
        for p in (conf, script, message):
            os.chmod(p, 0o644)
        proc = subprocess.run(
            [binary, "-c", conf, "-f", header["sender"], "-r", header["recipient"], script, message],
            capture_output=True, text=True, timeout=30, cwd=tmp)
    if "Fatal:" in proc.stderr:
        raise RuntimeError(f"{path.name}: sieve-test did not run it:\n{proc.stderr}")
    return normalize_pigeonhole(proc.stdout, proc.stderr)


def main(argv: list[str]) -> int:
    binary = shutil.which("sieve-test")
    if not binary:
        print("sieve-test not found", file=sys.stderr)
        return 1
    status = 0
    for path in cases():
        if argv and not any(a in path.name for a in argv):
            continue
        try:
            result = run_pigeonhole(path, binary)
        except RuntimeError as error:
            print(error, file=sys.stderr)
            status = 1
            continue
        path.with_suffix(".expected").write_text(result)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
