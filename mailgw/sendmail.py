"""`mailgw sendmail`: the sendmail(1) command local programs (cron, web apps) expect.

    mailgw sendmail [-t] [-i|-oi] [-f SENDER] [-F NAME] [--config PATH] [RECIPIENT...]
    mailgw sendmail -bv ADDRESS... [--config PATH]

Like Postfix's sendmail(1): the message is read from standard input until
EOF or, without -i/-oi, until a line with only "."; LF or CRLF line ends,
handed on with CRLF (RFC 5322 §2.3). Recipients are the arguments, each
parsed as an address list ("a@x, Name <b@y>"); with -t also the addresses of
the To:, Cc: and Bcc: headers (added to the arguments, as Postfix does).
Bcc: headers are always removed from the message (RFC 5322 §3.6.3), so blind
copies stay blind. A leading "From " line (an mbox separator) is dropped,
as Postfix does. Addresses without a domain get the first of
server.local_domains ("root" -> root@example.org). Only the header section
is parsed; the body is passed on as it came.

Missing headers are added at the end of the header section: Date: (local
time) and Message-ID: (RFC 5322 §3.6.1, §3.6.4: a message must have a Date:
and should have a Message-ID:), and From: - `NAME <SENDER>` with -F, else
SENDER. The envelope sender is -f (or -r), else <login>@<first local domain>;
`-f ""` or `-f "<>"` is the null sender.

The message goes to the running server over its control socket
(<data_dir>/control.sock, mailgw/queue/control.py, request `submit`): no
network hop, and the server knows the sender's uid (SO_PEERCRED). It is
queued, or refused, before this command returns; nothing is spooled when no
server runs. -bv prints what each ADDRESS resolves to (`mailgw resolve`).

Options sendmail programs commonly pass are accepted and ignored: -Am -Ac
-B 7BIT|8BITMIME -C FILE -G -h N -L LABEL -m -n -N DSN -O OPT -o X (-oem,
-odb, -odi, -oQDIR, -om, -o7, -o8, ...) -R RET -U -V ENVID -v -X FILE, and
-bm (the default mode). Anything else is refused (exit 64).

Exit codes (sysexits.h): 0 queued (nothing is printed), 64 usage, 65 data
error (no recipients, message too big, the server refused it with a 5xx),
69 unavailable (the server does not take submissions, or this user may not
use its socket), 75 temporary failure (the server is not running, cannot
queue now, or answered 4xx: try again later), 78 configuration error. Every
error is one line on stderr starting with "mailgw sendmail: ".
"""
from __future__ import annotations

import datetime
import email.utils
import os
import pwd
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75
EX_CONFIG = 78

PREFIX = "mailgw sendmail: "

USAGE = """usage: mailgw sendmail [-t] [-i|-oi] [-f SENDER] [-F NAME] [--config PATH] [RECIPIENT...]
       mailgw sendmail -bv ADDRESS... [--config PATH]

Reads a message on standard input and queues it with the running mailgw.

  -t          also send to the To:, Cc: and Bcc: addresses of the message
  -i, -oi     a line with only "." does not end the message (read to EOF)
  -f SENDER   envelope sender (default: your login name at the first local domain)
  -F NAME     your full name, for the From: header added when there is none
  -bv         print what each ADDRESS resolves to; send nothing
  --config    configuration file (default: $MAILGW_CONFIG, else the embedded default)

Exit status: 0 queued, 64 usage, 65 bad message or refused, 69 unavailable,
75 try again later (mailgw not running, 4xx), 78 configuration error.
"""

_READ = 64 * 1024             # octets per readline(): bounds one line in memory
_ANSWER_TIMEOUT = 300.0       # seconds for the server to make the message durable
# RFC 5322 §3.6.8: a field name is printable US-ASCII except ":";
# §4.5.6 (obsolete syntax) allows white space before the colon.
_FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:")
_FOLD = re.compile(rb"\r\n(?=[ \t])")
_RECIPIENT_FIELDS = (b"to", b"cc", b"bcc")
# Postfix strips leading mbox separator lines (">From " too, for UUCP).
_MBOX_FROM = re.compile(rb">*From ")

# Options sendmail(1) callers pass that make no difference here (Postfix's list).
_IGNORED_FLAGS = set("GUmnv")
_IGNORED_WITH_VALUE = set("ACLNORVXh")
_WITH_VALUE = set("fFrbBoq")


class _Exit(Exception):
    """Stop with this exit status and one line on stderr."""

    def __init__(self, status: int, message: str = ""):
        super().__init__(message)
        self.status = status
        self.message = message


class _Help(Exception):
    pass


@dataclass
class Options:
    extract: bool = False            # -t
    dot_ends: bool = True            # without -i / -oi
    sender: str | None = None        # -f / -r, as given
    full_name: str | None = None     # -F
    verify: bool = False             # -bv
    config: str | None = None        # --config
    recipients: list[str] = field(default_factory=list)


# -- arguments -------------------------------------------------------------------------

def parse_args(argv: list[str]) -> Options:
    """sendmail's getopt-style options: clustered flags (-ti), values attached
    or in the next argument (-fme@x, -f me@x). Options end at the first
    argument that is not one (as POSIX getopt, Postfix) or at "--"; only
    --config is still recognised after that."""
    options = Options()
    index = 0
    while index < len(argv):
        arg = argv[index]
        index += 1
        if arg == "--":
            options.recipients.extend(argv[index:])
            break
        if arg == "--help":
            raise _Help()
        if arg == "--config" or arg.startswith("--config="):
            index = _config_option(options, arg, argv, index)
            continue
        if arg.startswith("--"):
            raise _Exit(EX_USAGE, f"unknown option {_safe(arg)} (see --help)")
        if not arg.startswith("-") or arg == "-":
            # The recipients: no more options, except --config.
            rest = argv[index - 1:]
            position = 0
            while position < len(rest):
                item = rest[position]
                position += 1
                if item == "--config" or item.startswith("--config="):
                    position = _config_option(options, item, rest, position)
                else:
                    options.recipients.append(item)
            break
        position = 1
        while position < len(arg):
            letter = arg[position]
            position += 1
            if letter == "t":
                options.extract = True
                continue
            if letter == "i":
                options.dot_ends = False
                continue
            if letter in _IGNORED_FLAGS:
                continue
            if letter not in _WITH_VALUE and letter not in _IGNORED_WITH_VALUE:
                raise _Exit(EX_USAGE, f"unknown option -{_safe(letter)} (see --help)")
            value = arg[position:]
            if not value:
                if index >= len(argv):
                    raise _Exit(EX_USAGE, f"option -{letter} needs a value")
                value = argv[index]
                index += 1
            _valued_option(options, letter, value)
            break
    if options.verify:
        if options.extract:
            raise _Exit(EX_USAGE, "-t cannot be used with -bv")
        if not options.recipients:
            raise _Exit(EX_USAGE, "-bv needs an ADDRESS")
    return options


def _config_option(options: Options, arg: str, argv: list[str], index: int) -> int:
    if arg.startswith("--config="):
        value = arg.partition("=")[2]
    elif index < len(argv):
        value = argv[index]
        index += 1
    else:
        raise _Exit(EX_USAGE, "--config needs a PATH")
    if not value:
        raise _Exit(EX_USAGE, "--config needs a PATH")
    options.config = value
    return index


def _valued_option(options: Options, letter: str, value: str) -> None:
    if letter in ("f", "r"):          # -r: the old name of -f
        options.sender = value
    elif letter == "F":
        options.full_name = value
    elif letter == "o":
        if value.startswith("i"):     # -oi; other -oX (-oem, -odb, -oQ...) mean nothing here
            options.dot_ends = False
    elif letter == "b":
        if value == "v":
            options.verify = True
        elif value != "m":            # -bm: read mail and deliver it, the default
            raise _Exit(EX_USAGE, f"-b{_safe(value)} is not supported by mailgw sendmail "
                                  "(only -bm and -bv; see `mailgw queue` for the queue)")
    elif letter == "B":
        if value.upper() not in ("7BIT", "8BITMIME"):
            raise _Exit(EX_USAGE, "-B needs 7BIT or 8BITMIME")
    elif letter == "q":
        raise _Exit(EX_USAGE, f"-q{_safe(value)} is not supported: use `mailgw queue flush`")
    # else: one of _IGNORED_WITH_VALUE


# -- the message -------------------------------------------------------------------------

def read_message(stream, *, dot_ends: bool, limit: int) -> bytes:
    """The message from `stream` (binary) with CRLF line ends, ending in
    CRLF. Stops at EOF, or at a line with only "." when `dot_ends`.
    _Exit(65) as soon as it grows beyond `limit` octets: never holds much
    more than that, whatever comes in."""
    out = bytearray()
    line_start = True          # the next octet begins a line
    pending_cr = False         # a read ended in CR: is it the CR of a CRLF?
    leading = True             # no line kept yet (mbox separators are dropped)
    while True:
        piece = stream.readline(_READ)
        if not piece:
            break
        if pending_cr:
            pending_cr = False
            if piece == b"\n":   # that CR ended the line
                out += b"\r\n"
                line_start = True
                continue
            out += b"\r"
        if piece.endswith(b"\n"):
            content, ends = piece[:-1].removesuffix(b"\r"), True
        elif len(piece) < _READ:          # the last line, without a newline
            content, ends = piece.removesuffix(b"\r"), True
        elif piece.endswith(b"\r"):       # a CRLF may have been cut by the read size
            content, ends, pending_cr = piece[:-1], False, True
        else:                             # a line longer than one read: more follows
            content, ends = piece, False
        if line_start and ends:
            if dot_ends and content == b".":
                break
            if leading and _MBOX_FROM.match(content):
                continue
        leading = False
        out += content
        if ends:
            out += b"\r\n"
        line_start = ends
        if len(out) > limit:
            raise _Exit(EX_DATAERR, f"message too big (more than {limit} octets)")
    if pending_cr or (out and not out.endswith(b"\r\n")):
        out += b"\r\n"         # RFC 5322 §2.1: lines end in CRLF, the last one too
    if len(out) > limit:
        raise _Exit(EX_DATAERR, f"message too big (more than {limit} octets)")
    return bytes(out)


def split_header(message: bytes) -> tuple[list[bytes], bytes]:
    """The header fields (each with its folded lines and CRLFs, as they came)
    and the body. The header section ends at the empty line (consumed) or at
    the first line that is not a field: then everything from it is body."""
    fields: list[bytes] = []
    position = 0
    while position < len(message):
        end = message.find(b"\r\n", position)
        end = len(message) if end < 0 else end + 2
        line = message[position:end]
        if line == b"\r\n":
            return fields, message[end:]
        if line[:1] in (b" ", b"\t"):
            if not fields:
                break
            fields[-1] += line
        elif _FIELD.match(line):
            fields.append(line)
        else:
            break
        position = end
    return fields, message[position:]


def field_name(raw: bytes) -> bytes:
    return _FIELD.match(raw).group(1).lower()


def field_value(raw: bytes) -> str:
    """The unfolded value (RFC 5322 §2.2.3), as text for email.utils."""
    value = raw[_FIELD.match(raw).end():]
    return _FOLD.sub(b"", value).rstrip(b"\r\n").decode("utf-8", errors="replace")


@dataclass
class Prepared:
    message: bytes
    header_recipients: list[str]


def prepare(message: bytes, *, extract: bool, sender_address: str, full_name: str | None,
            hostname: str, now: datetime.datetime) -> Prepared:
    """Bcc: removed, missing Date:/Message-ID:/From: added, the To:/Cc:/Bcc:
    addresses collected when `extract`. The body is not touched."""
    fields, body = split_header(message)
    kept: list[bytes] = []
    found: list[str] = []
    present = set()
    for raw in fields:
        name = field_name(raw)
        present.add(name)
        if extract and name in _RECIPIENT_FIELDS:
            found.append(field_value(raw))
        if name == b"bcc":
            continue               # RFC 5322 §3.6.3: blind copies must not show the Bcc: list
        kept.append(raw)
    added: list[str] = []
    if b"date" not in present:
        # RFC 5322 §3.6.1: the origination date is required.
        added.append(f"Date: {email.utils.format_datetime(now)}")
    if b"message-id" not in present:
        # RFC 5322 §3.6.4: every message should have a Message-ID.
        added.append(f"Message-ID: {email.utils.make_msgid(domain=hostname)}")
    if b"from" not in present:
        # RFC 5322 §3.6.2: the author is required.
        name = _printable(full_name or "")
        added.append(f"From: {email.utils.formataddr((name, sender_address)) if name else sender_address}")
    header = b"".join(kept) + b"".join(line.encode("utf-8") + b"\r\n" for line in added)
    return Prepared(header + b"\r\n" + body, addresses_of(found))


# -- addresses ---------------------------------------------------------------------------

def addresses_of(texts: list[str]) -> list[str]:
    """Every address in address-list texts ("a@x, Name <b@y>"); groups, empty
    entries and undisclosed-recipients:; give none."""
    return [address for _, address in email.utils.getaddresses(texts) if address]


def qualified(address: str, domain: str) -> str:
    """`address`, with @`domain` if it has none ("root" -> root@domain)."""
    return address if "@" in address else f"{address}@{domain}"


def unique(addresses: list[str]) -> list[str]:
    """In order, each once (domains compare without case)."""
    seen = set()
    result = []
    for address in addresses:
        local, at, domain = address.rpartition("@")
        key = f"{local}@{domain.lower()}" if at else address
        if key not in seen:
            seen.add(key)
            result.append(address)
    return result


def envelope_sender(given: str | None, login: str, domain: str) -> str:
    if given is None:
        return f"{login}@{domain}"
    if given.strip() in ("", "<>"):
        return ""                  # the null sender (RFC 5321 §4.5.5)
    found = addresses_of([given])
    if not found:
        raise _Exit(EX_USAGE, f"-f {_safe(given)}: not an address")
    return qualified(found[0], domain)


def login_name() -> str:
    """The real uid's account name (not $USER: that is whatever the caller says)."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return os.environ.get("LOGNAME") or os.environ.get("USER") or str(os.getuid())


def first_local_domain(config, config_path: Path | None) -> str:
    """server.local_domains[0]. The loaded Config keeps them as a set, so the
    order comes from the file itself."""
    from mailgw.config import EMBEDDED_DEFAULT

    try:
        with open(config_path or EMBEDDED_DEFAULT, "rb") as file:
            listed = tomllib.load(file).get("server", {}).get("local_domains") or []
    except (OSError, tomllib.TOMLDecodeError, AttributeError):
        listed = []
    for domain in listed if isinstance(listed, list) else []:
        if isinstance(domain, str) and domain.lower() in config.local_domains:
            return domain.lower()
    return sorted(config.local_domains)[0]


# -- main ---------------------------------------------------------------------------------

def main(argv: list[str] | None = None, *, stdin=None, stderr=None, now=None, login=None,
         answer_timeout: float = _ANSWER_TIMEOUT) -> int:
    """`mailgw sendmail`; the keywords are for tests (default: the process's
    stdin/stderr, the local time, the real uid's login name)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    stderr = stderr or sys.stderr
    try:
        options = parse_args(argv)
        if options.verify:
            return _verify(options)
        return _send(options, stdin=stdin, now=now, login=login, answer_timeout=answer_timeout)
    except _Help:
        print(USAGE, end="")
        return EX_OK
    except _Exit as stop:
        if stop.message:
            print(PREFIX + _one_line(stop.message), file=stderr)
        return stop.status
    except KeyboardInterrupt:
        print(PREFIX + "interrupted; the message may not have been queued", file=stderr)
        return EX_TEMPFAIL


def _config_path(options: Options) -> Path | None:
    from mailgw.config import CONFIG_ENV_VAR

    text = options.config or os.environ.get(CONFIG_ENV_VAR) or None
    return Path(text) if text else None


def _load_config(path: Path | None):
    from mailgw.config import ConfigError, load

    try:
        return load(path)
    except ConfigError as error:
        raise _Exit(EX_CONFIG, "configuration error: " + "; ".join(error.errors)) from None
    except OSError as error:
        raise _Exit(EX_CONFIG, f"cannot read configuration {path}: {error.strerror or error}") from None


def _verify(options: Options) -> int:
    path = _config_path(options)
    _load_config(path)             # its errors as ours, before resolve's
    try:
        from mailgw.routing.admin import resolve_main
    except ImportError:
        raise _Exit(EX_UNAVAILABLE, "-bv is not available: address resolution "
                                    "(mailgw.routing.admin) is not installed") from None
    status = resolve_main((["--config", str(path)] if path else []) + options.recipients)
    return EX_OK if status == 0 else EX_USAGE if status == 2 else EX_DATAERR


def _send(options: Options, *, stdin, now, login, answer_timeout: float) -> int:
    from mailgw.queue import control

    path = _config_path(options)
    config = _load_config(path)
    domain = first_local_domain(config, path)
    login = login or login_name()
    sender = envelope_sender(options.sender, login, domain)
    limit = config.smtp.max_message_size

    stream = stdin if stdin is not None else (sys.stdin.buffer if sys.stdin is not None else None)
    raw = read_message(stream, dot_ends=options.dot_ends, limit=limit) if stream is not None else b""
    moment = now() if now is not None else datetime.datetime.now().astimezone()
    prepared = prepare(raw, extract=options.extract, sender_address=sender or f"{login}@{domain}",
                       full_name=options.full_name, hostname=config.hostname, now=moment)
    recipients = addresses_of(options.recipients) + prepared.header_recipients
    recipients = unique([qualified(address, domain) for address in recipients])
    for address in [sender, *recipients]:
        if any(ord(c) < 0x20 or ord(c) == 0x7f for c in address):
            raise _Exit(EX_DATAERR, f"bad address {_safe(address)!r}")
    if not recipients:
        raise _Exit(EX_DATAERR, "no recipients: give them as arguments, or use -t and To:, Cc: or Bcc: headers")
    message = prepared.message
    if len(message) > limit:
        raise _Exit(EX_DATAERR, f"message too big ({len(message)} octets, at most {limit})")

    request = {"cmd": "submit", "sender": sender, "recipients": recipients, "size": len(message),
               "local_user": login, "uid": os.getuid()}
    if len(control.encode(request)) - 1 > control.MAX_REQUEST:
        raise _Exit(EX_DATAERR, f"too many recipients ({len(recipients)}) for one message")

    socket_path = control.socket_path(config.data_dir)
    try:
        client = control.connect(socket_path)
    except PermissionError:
        raise _Exit(EX_UNAVAILABLE, f"cannot use {socket_path}: permission denied "
                                    "(only root and the account mailgw runs as may submit)") from None
    except OSError as error:
        raise _Exit(EX_TEMPFAIL, f"cannot reach mailgw at {socket_path}: {error.strerror or error}") from None
    if client is None:
        raise _Exit(EX_TEMPFAIL, f"mailgw is not running (nothing listens on {socket_path}); "
                                 "the message was not queued")
    with client:
        try:
            answer = client.submit(request, message, timeout=answer_timeout)
        except control.ControlError as error:
            raise _Exit(EX_TEMPFAIL, str(error)) from None
    return _outcome(answer)


def _outcome(answer: dict) -> int:
    if answer.get("ok"):
        result = answer.get("result")
        if not (isinstance(result, dict) and isinstance(result.get("queue_id"), str)):
            raise _Exit(EX_TEMPFAIL, "mailgw sent an answer of the wrong shape; the message may have been queued")
        return EX_OK
    text = str(answer.get("error") or "refused")
    code = answer.get("code")
    if isinstance(code, int) and not isinstance(code, bool) and 400 <= code <= 599:
        enhanced = answer.get("enhanced")
        shown = f"{code} {enhanced} {text}" if isinstance(enhanced, str) and enhanced else f"{code} {text}"
        if code < 500:
            raise _Exit(EX_TEMPFAIL, f"not queued, try again later: {_safe(shown)}")
        raise _Exit(EX_DATAERR, f"refused: {_safe(shown)}")
    raise _Exit(EX_UNAVAILABLE, f"mailgw refused the submission: {_safe(text)}")


def _printable(text: str) -> str:
    """A display name fit for a header: no control characters (no CR/LF to
    start another field with), white space collapsed."""
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


def _one_line(text: str) -> str:
    return " ".join(text.split()) if any(c in text for c in "\r\n\t\v\f") else text


def _safe(value) -> str:
    """One line of text with control characters escaped (server answers,
    addresses: text from elsewhere must not drive the terminal)."""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"
                   for c in text)


if __name__ == "__main__":
    sys.exit(main())
