"""A real rspamd on 127.0.0.1, configured from scratch in a temporary directory.

For the end-to-end tests (tests/e2e) and the benchmarks (bench/): the code
writes a complete rspamd configuration under a root directory, starts
`rspamd -f` on ephemeral loopback ports and waits until it answers.

Configuration approach
----------------------
We write our own top-level file, ROOT/rspamd.conf, and start
`rspamd -f -c ROOT/rspamd.conf --var=LOCAL_CONFDIR=ROOT/conf --var=DBDIR=ROOT/db
--var=RUNDIR=ROOT/run --var=LOGDIR=ROOT/log`. That file includes Debian's
stock rule set (`$CONFDIR/common.conf`, CONFDIR stays /etc/rspamd: scores,
actions, groups, the modules.d sections), so the rules scanned are the real
ones, but it declares the workers itself: Debian's /etc/rspamd/rspamd.conf
hard-codes bind_socket = localhost:1133x, and a local.d include can only
*add* sockets to that, never take the default ones away. Our own changes go
where the stock files already look for them, $LOCAL_CONFDIR/local.d/*.conf
(priority 1) and $LOCAL_CONFDIR/override.d/*.conf (priority 10), so
/etc/rspamd is only read, never written, and every state file (sqlite
statistics, learn cache, history, rrd, control socket, pid file, temporary
files) lives under ROOT.

No network
----------
Every module that would ask DNS or fetch something over HTTP(S) is switched
off (`enabled = false` in local.d/<module>.conf; see DISABLED_MODULES for the
reason per module), fuzzy_check is dropped from `options.filters` (it sends
UDP to the rspamd.com fuzzy servers), and the resolver is pointed at
127.0.0.1:DNS_PORT with a 100 ms timeout and one try, so whatever slipped
through would fail fast instead of leaving the machine. RspamdServer binds
that port itself (a UDP socket it never answers) and `dns_queries()` counts
what arrived, so a test can assert that rspamd asked nothing.

SPF, DKIM and DMARC are not computed by rspamd: the http_headers plugin
(present in 3.4, off by default, switched on here) adds a condition to
SPF_CHECK, DKIM_CHECK and DMARC_CALLBACK that turns the request headers
    SPF: {"result":"pass"}
    DKIM: {"results":[{"result":"pass","domain":"example.org"}]}
    DMARC: {"result":"pass"}
into R_SPF_ALLOW, R_DKIM_ALLOW (+ DKIM_TRACE) and DMARC_POLICY_ALLOW (and the
corresponding FAIL/REJECT/... symbols for other results), and whose condition
returns false whether or not the header is there: with the plugin on, these
three checks never run, so they never ask DNS. (mailgw does its own
SPF/DKIM/DMARC and hands the verdicts over; see AUTH_PASS_HEADERS.)

Statistics
----------
Bayes uses the sqlite3 backend (still in 3.4, deprecated upstream): one file
per class, ROOT/db/bayes.{spam,ham}.sqlite, and the sqlite3 learn cache
ROOT/db/learn_cache.sqlite. No redis-server is needed. min_learns stays at
the stock 200 (configurable): Bayes only classifies once *both* classes have
that many. `learned()` is the sum of the statfiles' `revision` in /stat
(with sqlite3, each class's learn count, kept in its database).

The learn cache makes rspamd refuse a message it has learned already, as the
same class: HTTP 404, {"error":"<Message-ID> has been already learned as
spam, ignore it"} (learning it as the other class moves it: 200, one
unlearn plus one learn). Its key is a hash of the message's *body* tokens
only, so messages that differ only in Message-ID or Subject count as one.
And the tokens depend on the language rspamd detects, which adapts to what
the process has seen: short word-salad bodies detected as "af" early were
"en" 130 learns later, hashed differently and were learned twice. Learn
distinct, plain-English bodies and the count is exact.

Actions and test triggers
-------------------------
The stock thresholds are kept: reject 15, add header 6, greylist 4 (the
stock actions.conf is included unchanged). GTUBE gives "reject". A header on
the test message picks a verdict deterministically (TRIGGER_HEADER):

    X-Mailgw-Test: add-header   -> symbol MAILGW_TEST_ADD_HEADER, score 10
                                   (the middle of [6, 15): a short well-formed
                                   message scores within about +-1 otherwise)
    X-Mailgw-Test: greylist     -> force_actions: action "greylist"
    X-Mailgw-Test: soft-reject  -> force_actions: action "soft reject"

The add-header case is score-based, like a real borderline spam (the score
in the reply is consistent with the action); greylist is forced because its
score band [4, 6) is too narrow to hit reliably, and soft reject has no
score band at all.

Workers
-------
normal (scanning, /checkv2) on normal_port; controller (learning,
/learnspam, /learnham, /stat) on controller_port with `secure_ip = 127.0.0.1`
(loopback may learn without a password) and the password also set, as
`password` and `enable_password`, for clients that send one; when proxy_port
is given, rspamd_proxy in milter mode (for Postfix's
smtpd_milters = inet:127.0.0.1:PROXY_PORT) with the normal worker as its
upstream. Workers run as the invoking user (`-u`/`-g`; as root that is
root, since ROOT is usually inside a 0700 pytest tmp tree that _rspamd
could not even traverse).

The one thing outside ROOT: the hyperscan cache
----------------------------------------------
Before its workers bind, rspamd compiles the 9600 public-suffix patterns
into a hyperscan database (about 12 s of CPU, 40 MB), and after start its
hs_helper compiles the regexp rules (about 5 s more, in the background).
Both are saved in `options.hs_cache_dir` under file names that hash their
input, and are loaded from there at the next start (about 0.5 s to
ready). So hs_cache_dir defaults to a per-user cache shared by all runs,
$MAILGW_RSPAMD_HS_CACHE or ~/.cache/mailgw/rspamd-hs (ROOT/db if that
cannot be created); pass hs_cache_dir=ROOT/... to keep a run fully apart.
It holds only compiled patterns, no state: deleting it costs one slow start.
start() also waits (HYPERSCAN_DEADLINE) until the scanners use the full
hyperscan database: until then they match with PCRE, and if rspamd stops
before hs_helper's compile is loaded, its exit clean-up deletes the new
files as stale, so every short run would compile again. (Setting
`options.disable_hyperscan = true` was tried: in 3.4 hs_helper compiled and
the workers loaded the database anyway.)

As a script (for bench/ shell scripts):

    python tests/e2e/rspamd_server.py --root DIR --normal-port N \
        --controller-port N [--proxy-port N]

prints one JSON line {"pid", "normal_url", "controller_url", "milter"} once
rspamd answers, and stays in the foreground until SIGTERM/SIGINT, then stops
rspamd and exits 0 (1 if rspamd died by itself). "pid" is rspamd's main
process; kill this script's own PID to stop both.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import grp
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

RSPAMD = "rspamd"
STOCK_CONFDIR = Path("/etc/rspamd")
DEFAULT_PASSWORD = "mailgw-test"
START_DEADLINE = 60.0       # seconds for both HTTP workers to answer /ping
HYPERSCAN_DEADLINE = 120.0  # more seconds for a cold hyperscan compile to be loaded
STOP_DEADLINE = 10.0        # seconds after SIGTERM before SIGKILL

TRIGGER_HEADER = "X-Mailgw-Test"
ADD_HEADER_TRIGGER = (TRIGGER_HEADER, "add-header")
GREYLIST_TRIGGER = (TRIGGER_HEADER, "greylist")
SOFT_REJECT_TRIGGER = (TRIGGER_HEADER, "soft-reject")
ADD_HEADER_SCORE = 10.0

# Request headers for /checkv2 that make rspamd's own SPF/DKIM/DMARC checks
# report "pass" (http_headers plugin) instead of looking anything up.
AUTH_PASS_HEADERS = {
    "SPF": '{"result":"pass"}',
    "DKIM": '{"results":[{"result":"pass","domain":"example.org"}]}',
    "DMARC": '{"result":"pass"}',
}

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"

# Module -> why it is off. Each gets `enabled = false;` in local.d.
DISABLED_MODULES = {
    "rbl": "DNS blocklists (also the url/email lists that were surbl/emails)",
    "surbl": "URL DNS blocklists (converted into rbl rules at load time)",
    "emails": "e-mail address DNS blocklists (a tombstone in 3.4: its rules became rbl rules)",
    "asn": "asn.rspamd.com DNS lookups for the sender IP",
    "hfilter": "A/MX lookups of the HELO name and hostname",
    "once_received": "PTR lookup of the sender IP when no hostname is passed",
    "phishing": "openphish/phishtank feeds over HTTPS and DNS checks",
    "arc": "DNS lookups of ARC signing keys",
    "mx_check": "MX lookups and SMTP probes (off in stock, kept off)",
    "whitelist": "SPF/DKIM/DMARC whitelists fetched from maps.rspamd.com",
    "multimap": "stock freemail/disposable maps fetched from maps.rspamd.com",
    "mime_types": "bad-extension map fetched from maps.rspamd.com",
    "mid": "Message-ID map fetched from maps.rspamd.com",
    "rspamd_update": "rule updates fetched from updates.rspamd.com",
    "url_redirector": "follows redirector URLs over HTTP (and needs redis)",
    "reputation": "DNS/redis reputation backends",
    "dkim_signing": "signs mail from loopback (sign_local): keys under /var/lib/rspamd, and not ours to sign",
    "neural": "needs redis",
    "ratelimit": "needs redis",
    "greylist": "needs redis (the greylist *action* still exists, by score or trigger)",
    "replies": "needs redis",
    "history_redis": "needs redis (the controller keeps its in-memory history)",
    "bayes_expiry": "redis-only statistics expiry",
    "spamtrap": "needs redis",
    "dcc": "talks to a dccifd (off in stock, kept off)",
    "spamassassin": "SpamAssassin rule files, whose URIBL/RBL tests ask DNS (none configured)",
    "antivirus": "external scanners",
    "external_services": "external scanners (oletools, razor, pyzor, ...)",
    "clickhouse": "exports to a ClickHouse server",
    "elastic": "exports to Elasticsearch",
    "metadata_exporter": "pushes results over HTTP/SMTP/redis",
    "metric_exporter": "pushes metrics to graphite",
    "bimi": "needs redis and an HTTP helper",
    "p0f": "talks to a p0f socket",
    "aws_s3": "uploads to S3",
    "fuzzy_check": "UDP to the rspamd.com fuzzy servers (also dropped from options.filters)",
}
FILTERS = "chartable,dkim,regexp"   # stock minus fuzzy_check; dkim stays: http_headers hooks DKIM_CHECK


def _top_level_config(normal_port: int, controller_port: int, proxy_port: int | None,
                      password: str, normal_workers: int) -> str:
    workers = f'''
worker "normal" {{
    bind_socket = "127.0.0.1:{normal_port}";
    count = {normal_workers};
    mime = true;
}}

worker "controller" {{
    bind_socket = "127.0.0.1:{controller_port}";
    count = 1;
    password = {json.dumps(password)};
    enable_password = {json.dumps(password)};
    secure_ip = "127.0.0.1";
    static_dir = "${{WWWDIR}}";
}}
'''
    if proxy_port is not None:
        workers += f'''
worker "rspamd_proxy" {{
    bind_socket = "127.0.0.1:{proxy_port}";
    count = 1;
    milter = yes;                 # speak the milter protocol, not HTTP
    timeout = 120s;
    upstream "local" {{
        default = yes;
        hosts = "127.0.0.1:{normal_port}";
    }}
    max_retries = 5;
    discard_on_reject = false;
    quarantine_on_reject = false;
    spam_header = "X-Spam";
    reject_message = "Spam message rejected";
}}
'''
    return f'''# Written by tests/e2e/rspamd_server.py: Debian's rule set, our workers.
.include "$CONFDIR/common.conf"

options {{
    pidfile = "$RUNDIR/rspamd.pid";
    .include "$CONFDIR/options.inc"
    .include(try=true; priority=1,duplicate=merge) "$LOCAL_CONFDIR/local.d/options.inc"
    .include(try=true; priority=10) "$LOCAL_CONFDIR/override.d/options.inc"
}}

logging {{
    type = "console";             # stderr, which RspamdServer sends to ROOT/log/rspamd.log
    .include "$CONFDIR/logging.inc"
    .include(try=true; priority=1,duplicate=merge) "$LOCAL_CONFDIR/local.d/logging.inc"
    .include(try=true; priority=10) "$LOCAL_CONFDIR/override.d/logging.inc"
}}
{workers}'''


def _options(root: Path, dns_port: int, hs_cache_dir: Path | None) -> str:
    hs_cache = f'hs_cache_dir = {json.dumps(str(hs_cache_dir) + "/")};\n' if hs_cache_dir else ""
    return f'''filters = "{FILTERS}";
tempdir = {json.dumps(str(root / "tmp"))};
{hs_cache}
# Relative to rspamd's working directory (ROOT/run): a unix socket path is cut
# at 108 bytes, and a long ROOT would put a truncated socket outside it.
control_socket = "./rspamd.sock mode=0600";
# Nothing should ask DNS; if something does, it meets a socket that never answers.
dns {{
    nameserver = ["127.0.0.1:{dns_port}"];
    timeout = 0.1s;
    retransmits = 1;
    sockets = 1;
}}
'''


def _statistic(min_learns: int) -> str:
    return f'''# Replaces the stock redis classifier (override.d: priority 10).
classifier "bayes" {{
    tokenizer {{
        name = "osb";
    }}
    backend = "sqlite3";
    min_tokens = 11;
    min_learns = {min_learns};
    cache {{
        type = "sqlite3";
        file = "$DBDIR/learn_cache.sqlite";
    }}
    statfile {{
        symbol = "BAYES_HAM";
        spam = false;
        path = "$DBDIR/bayes.ham.sqlite";
    }}
    statfile {{
        symbol = "BAYES_SPAM";
        spam = true;
        path = "$DBDIR/bayes.spam.sqlite";
    }}
    learn_condition = 'return require("lua_bayes_learn").can_learn';
}}
'''


_LOCAL_LUA = f'''-- Written by tests/e2e/rspamd_server.py: test triggers, keyed on one header.
local function trigger(value)
  return function(task)
    local h = task:get_header('{TRIGGER_HEADER}')
    if h and h:lower():match('^%s*' .. value .. '%s*$') then
      return true
    end
    return false
  end
end

rspamd_config:register_symbol{{
  name = 'MAILGW_TEST_ADD_HEADER', type = 'normal', group = 'mailgw_test',
  score = {ADD_HEADER_SCORE}, description = '{TRIGGER_HEADER}: add-header',
  callback = trigger('add%-header'),
}}
rspamd_config:register_symbol{{
  name = 'MAILGW_TEST_GREYLIST', type = 'normal', group = 'mailgw_test',
  score = 0.0, description = '{TRIGGER_HEADER}: greylist',
  callback = trigger('greylist'),
}}
rspamd_config:register_symbol{{
  name = 'MAILGW_TEST_SOFT_REJECT', type = 'normal', group = 'mailgw_test',
  score = 0.0, description = '{TRIGGER_HEADER}: soft-reject',
  callback = trigger('soft%-reject'),
}}
'''

_FORCE_ACTIONS = '''rules {
    MAILGW_TEST_FORCE_GREYLIST {
        action = "greylist";
        expression = "MAILGW_TEST_GREYLIST";
        message = "Greylisted by X-Mailgw-Test";
    }
    MAILGW_TEST_FORCE_SOFT_REJECT {
        action = "soft reject";
        expression = "MAILGW_TEST_SOFT_REJECT";
        message = "Soft reject by X-Mailgw-Test";
    }
}
'''


def rspamd_vars(root: Path) -> dict[str, str]:
    """The --var=NAME=VALUE settings that put every path of ours under root."""
    root = Path(root).resolve()
    return {"CONFDIR": str(STOCK_CONFDIR), "LOCAL_CONFDIR": str(root / "conf"),
            "DBDIR": str(root / "db"), "RUNDIR": str(root / "run"), "LOGDIR": str(root / "log")}


def default_hs_cache_dir() -> Path | None:
    """The shared hyperscan cache (see the module docstring), or None if it cannot be made."""
    chosen = os.environ.get("MAILGW_RSPAMD_HS_CACHE")
    if chosen:
        path = Path(chosen)
    else:
        path = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mailgw" / "rspamd-hs"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return path if os.access(path, os.W_OK | os.X_OK) else None


def write_config(root: Path, *, normal_port: int, controller_port: int, proxy_port: int | None = None,
                 password: str = DEFAULT_PASSWORD, dns_port: int = 9, min_learns: int = 200,
                 normal_workers: int = 1, hs_cache_dir: Path | None = None) -> Path:
    """Write a complete configuration under root; return the top-level file
    (pass it to `rspamd -c` together with rspamd_vars(root)). dns_port is
    where the resolver is pointed (default 9, discard, normally closed: a
    refused query fails at once). hs_cache_dir None: ROOT/db (stock place)."""
    root = Path(root).resolve()
    for sub in ("conf/local.d", "conf/override.d", "db", "run", "log", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    local, override = root / "conf/local.d", root / "conf/override.d"
    for module, why in DISABLED_MODULES.items():
        (local / f"{module}.conf").write_text(f"# {why}\nenabled = false;\n")
    (local / "http_headers.conf").write_text("# SPF/DKIM/DMARC verdicts come from request headers\nenabled = true;\n")
    (local / "options.inc").write_text(_options(root, dns_port, hs_cache_dir))
    (override / "statistic.conf").write_text(_statistic(min_learns))
    (local / "force_actions.conf").write_text(_FORCE_ACTIONS)
    (root / "conf/rspamd.local.lua").write_text(_LOCAL_LUA)
    top = root / "rspamd.conf"
    top.write_text(_top_level_config(normal_port, controller_port, proxy_port, password, normal_workers))
    return top


def _session_members(session: int) -> list[int]:
    """PIDs whose session id is `session` (from /proc; [] where there is none)."""
    members = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue                            # gone meanwhile
        if len(fields) > 3 and int(fields[3]) == session:     # state ppid pgrp session ...
            members.append(int(entry.name))
    return members


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None,
         timeout: float = 30.0) -> tuple[int, bytes]:
    """(status, body) of one request; HTTP errors are returned, not raised."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


# -- test messages ----------------------------------------------------------

def message(body: str, *, subject: str = "Lunch on Friday", extra: tuple[tuple[str, str], ...] = (),
            mid: str = "note-1@example.org") -> bytes:
    headers = [("From", "Alice <alice@example.org>"), ("To", "Bob <bob@example.test>"), ("Subject", subject),
               ("Date", "Mon, 07 Dec 2026 10:00:00 +0000"), ("Message-ID", f"<{mid}>"),
               ("MIME-Version", "1.0"), ("Content-Type", "text/plain; charset=us-ascii"), *extra]
    return ("".join(f"{name}: {value}\r\n" for name, value in headers) + "\r\n" + body + "\r\n").encode()


_PRODUCTS = ["watches", "pills", "loans", "diplomas", "sunglasses", "handbags", "supplements", "crypto coins",
             "casino chips", "software licences"]
_OPENERS = ["Dear friend", "Dear customer", "Hello there", "Attention please", "Good news", "Congratulations"]
_CLAIMS = ["you have been selected for an exclusive offer", "your account has won a special prize",
           "we are clearing our warehouse this week", "this is a limited time deal just for you",
           "our best price ever is waiting for you"]


def spam_message(i: int) -> bytes:
    """A distinct spam-ish message. rspamd's learn cache keys on the body's
    words (not Message-ID or Subject), so the bodies differ in words; and it
    is plain English, so rspamd's language detection is stable (see the
    module docstring of rspamd_server)."""
    rnd = random.Random(i)
    product, other = rnd.sample(_PRODUCTS, 2)
    code = "".join(chr(ord("a") + (i // 26 ** k) % 26) for k in range(3))      # a word only message i has
    body = (f"{rnd.choice(_OPENERS)},\r\n\r\n{rnd.choice(_CLAIMS)}. Buy our cheap {product} and {other} "
            f"today and save {10 + i % 80} percent on every order. Click the link below to claim your "
            f"reward before it expires, and do not forget to tell your friends about this amazing deal.\r\n\r\n"
            f"Use the coupon word zq{code} at the checkout. Reply now, the offer ends at midnight.\r\n")
    return message(body, subject=f"Offer {i}: cheap {product}", mid=f"offer-{i}@spam.example")


class RspamdServer:
    """rspamd under root, on the given (or free) loopback ports.

        with RspamdServer(tmp_path / "rspamd", milter=True) as rspamd:
            status, body = http("POST", rspamd.normal_url + "/checkv2", message)

    milter=True (or a proxy_port) adds the milter proxy; hs_cache_dir None
    means the shared default_hs_cache_dir(). Free ports are picked just
    before the start; a port taken in between makes start() fail (rspamd
    exits), so a caller that must not fail retries with new ports.
    """

    def __init__(self, root: Path, *, normal_port: int | None = None, controller_port: int | None = None,
                 proxy_port: int | None = None, milter: bool = False, password: str = DEFAULT_PASSWORD,
                 min_learns: int = 200, normal_workers: int = 1, hs_cache_dir: Path | None = None):
        self.root = Path(root).resolve()
        self.normal_port = normal_port or free_port()
        self.controller_port = controller_port or free_port()
        self.proxy_port = proxy_port or (free_port() if milter else None)
        self.password = password
        self._config_args = dict(min_learns=min_learns, normal_workers=normal_workers,
                                 hs_cache_dir=Path(hs_cache_dir) if hs_cache_dir else default_hs_cache_dir())
        self.process: subprocess.Popen | None = None
        self._dns_sink: socket.socket | None = None
        self._dns_seen = 0
        self.log_path = self.root / "log" / "rspamd.log"
        self._log_offset = 0                     # where this start's part of the (appended) log begins
        self.startup_seconds: float | None = None      # until /ping answered on both ports
        self.hyperscan_seconds: float | None = None    # until the workers use the full hyperscan database

    # -- addresses -------------------------------------------------------
    @property
    def normal_url(self) -> str:
        return f"http://127.0.0.1:{self.normal_port}"

    @property
    def controller_url(self) -> str:
        return f"http://127.0.0.1:{self.controller_port}"

    @property
    def milter_address(self) -> str | None:
        """Postfix syntax, for smtpd_milters; None without a proxy worker."""
        return None if self.proxy_port is None else f"inet:127.0.0.1:{self.proxy_port}"

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    # -- life cycle ------------------------------------------------------
    def start(self) -> "RspamdServer":
        """Start, and wait until it answers. On a fresh DBDIR the normal worker
        and the controller both create the sqlite statistics at once; the one
        that loses the lock runs without Bayes ("cannot init backend sqlite3",
        and every learn then fails with "cannot find statfile backend"). The
        files exist after that start, so a second start is clean."""
        for attempt in range(3):
            self._start_once()
            if "cannot init backend" not in self._log_since_start():
                return self
            self.stop()
        raise RuntimeError(f"rspamd could not open its statistics in 3 starts\n{self.log_tail()}")

    def _start_once(self) -> None:
        if shutil.which(RSPAMD) is None:
            raise FileNotFoundError("rspamd is not installed (apt-get install rspamd)")
        # The resolver's target: bound, never read until dns_queries(), never answered.
        self._dns_sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._dns_sink.bind(("127.0.0.1", 0))
        self._dns_sink.setblocking(False)
        config = write_config(self.root, normal_port=self.normal_port, controller_port=self.controller_port,
                              proxy_port=self.proxy_port, password=self.password,
                              dns_port=self._dns_sink.getsockname()[1], **self._config_args)
        user, group = pwd.getpwuid(os.geteuid()).pw_name, grp.getgrgid(os.getegid()).gr_name
        argv = [RSPAMD, "-f", "-c", str(config), "-u", user, "-g", group]
        argv += [f"--var={name}={value}" for name, value in rspamd_vars(self.root).items()]
        started = time.monotonic()
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            # Own session: a SIGKILL fallback can take the workers with the main process.
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            cwd=self.root / "run", start_new_session=True)
        try:
            self._wait_ready(started + START_DEADLINE)
            self.startup_seconds = time.monotonic() - started
            self._wait_hyperscan(time.monotonic() + HYPERSCAN_DEADLINE)
            self.hyperscan_seconds = time.monotonic() - started
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, deadline: float) -> None:
        pending = {"normal": self.normal_url + "/ping", "controller": self.controller_url + "/ping"}
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"rspamd exited with status {self.process.returncode}\n{self.log_tail()}")
            for name, url in list(pending.items()):
                try:
                    status, body = http("GET", url, timeout=2.0)
                except OSError:         # not listening yet
                    continue
                if status == 200 and body.strip() == b"pong":
                    del pending[name]
            if not pending and (self.proxy_port is None or self._accepts(self.proxy_port)):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"rspamd did not answer /ping on {sorted(pending) or ['milter']} "
                                   f"within {START_DEADLINE:.0f} s\n{self.log_tail()}")
            time.sleep(0.1)

    def _wait_hyperscan(self, deadline: float) -> None:
        """Wait until the scanners use the full hyperscan database. Until then
        they match with PCRE (slower: timings would depend on the moment),
        and a stop before hs_helper's compile is loaded makes rspamd's exit
        clean-up delete the fresh files as stale, so every start would
        compile again. rspamd says so only in its log."""
        while True:
            text = self._log_since_start()
            if "loaded hyperscan engine" not in text and "rspamd_fork_worker" in text:
                return                          # no hyperscan on this CPU/build: nothing to wait for
            loads = re.findall(r"#\d+\((\w+)\)[^\n]*full hyperscan database of", text)
            forked = text.find("rspamd_fork_worker")
            if forked != -1 and re.search(r"\(main\)[^\n]*full hyperscan database of", text[:forked]):
                return                          # loaded from the cache before the workers were forked
            if loads.count("normal") >= self._config_args["normal_workers"]:
                return                          # compiled now, and every scanner has reloaded it
            if self.process.poll() is not None:
                raise RuntimeError(f"rspamd exited with status {self.process.returncode}\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"rspamd's hyperscan database was not loaded within "
                                   f"{HYPERSCAN_DEADLINE:.0f} s\n{self.log_tail()}")
            time.sleep(0.2)

    def _log_since_start(self) -> str:
        with open(self.log_path, "rb") as log:
            log.seek(self._log_offset)
            return log.read().decode("utf-8", "replace")

    @staticmethod
    def _accepts(port: int) -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM rspamd's main process (it stops its workers); SIGKILL
        after STOP_DEADLINE. Then SIGKILL, by PID, any process still in the
        session rspamd was started in (start_new_session): workers outlive a
        main process that was killed -9, and would keep the ports."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=STOP_DEADLINE)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=STOP_DEADLINE)
            for orphan in _session_members(self.process.pid):
                try:
                    os.kill(orphan, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self._dns_sink is not None:
            self.dns_queries()
            self._dns_sink.close()
            self._dns_sink = None

    def __enter__(self) -> "RspamdServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- inspection ------------------------------------------------------
    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def dns_queries(self) -> int:
        """How many datagrams reached the resolver address since start (should stay 0)."""
        while self._dns_sink is not None:
            try:
                self._dns_sink.recv(65535)
            except (BlockingIOError, InterruptedError):
                break
            self._dns_seen += 1
        return self._dns_seen

    def stat(self) -> dict:
        status, body = http("GET", self.controller_url + "/stat")
        if status != 200:
            raise RuntimeError(f"/stat: HTTP {status}: {body[:200]!r}")
        return json.loads(body)

    def learned(self, symbol: str | None = None) -> int:
        """Messages learned, from /stat: the sum of `revision` over the
        statfiles (only `symbol`'s, e.g. "BAYES_SPAM", if given). With the
        sqlite3 backend a statfile's revision is its learn count (an unlearn
        takes one off), stored in its database. /stat's top-level `learned`
        counts every successful learn request instead, including a message
        moved from one class to the other (saved in ROOT/db/stats.ucl)."""
        return sum(int(entry.get("revision", 0)) for entry in self.stat().get("statfiles", [])
                   if symbol is None or entry.get("symbol") == symbol)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a throw-away rspamd on 127.0.0.1 (see module docstring).")
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--normal-port", required=True, type=int)
    parser.add_argument("--controller-port", required=True, type=int)
    parser.add_argument("--proxy-port", type=int)
    parser.add_argument("--password", default=DEFAULT_PASSWORD)
    parser.add_argument("--workers", type=int, default=1, help="normal (scanner) worker processes")
    parser.add_argument("--min-learns", type=int, default=200)
    parser.add_argument("--hs-cache", type=Path, help="hyperscan cache directory (default: the shared one)")
    args = parser.parse_args(argv)

    stopping = []
    def on_signal(signum, frame):
        stopping.append(signum)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    server = RspamdServer(args.root, normal_port=args.normal_port, controller_port=args.controller_port,
                          proxy_port=args.proxy_port, password=args.password, min_learns=args.min_learns,
                          normal_workers=args.workers, hs_cache_dir=args.hs_cache)
    server.start()
    try:
        print(json.dumps({"pid": server.pid, "normal_url": server.normal_url,
                          "controller_url": server.controller_url, "milter": server.milter_address}), flush=True)
        while not stopping and server.process.poll() is None:
            time.sleep(0.2)     # signal handlers run between sleeps
        died = not stopping
        if died:
            print(f"rspamd exited with status {server.process.returncode}\n{server.log_tail()}", file=sys.stderr)
        return 1 if died else 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
