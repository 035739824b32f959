"""Typed, frozen configuration objects.

`mailgw.config.load(path)` builds these from TOML; nothing else constructs them
except tests. Every component receives the part it needs; nothing is global.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Listener roles and what each one means.
ROLE_RELAY = "relay"              # port 25: inbound for local domains, relay for trusted/authenticated
ROLE_SUBMISSION = "submission"    # port 587: STARTTLS, then AUTH required (RFC 6409)
ROLE_SUBMISSIONS = "submissions"  # port 465: implicit TLS, AUTH required (RFC 8314 §3.3)
ROLE_POP3 = "pop3"                # port 110: STLS, then USER/PASS or AUTH
ROLE_POP3S = "pop3s"
ROLE_IMAP = "imap"                # port 143: STARTTLS, then LOGIN/AUTHENTICATE
ROLE_IMAPS = "imaps"
ROLE_HTTP = "http"                # /metrics (Prometheus), /healthz, /readyz: keep it on loopback
ROLE_ACME_HTTP = "acme-http"      # port 80: ACME HTTP-01 challenges (RFC 8555 §8.3), nothing else
ROLE_ACME_TLS = "acme-tls"        # ACME TLS-ALPN-01 challenges (RFC 8737) where port 80 is not available
SMTP_ROLES = (ROLE_RELAY, ROLE_SUBMISSION, ROLE_SUBMISSIONS)
MAIL_ROLES = SMTP_ROLES + (ROLE_POP3, ROLE_POP3S, ROLE_IMAP, ROLE_IMAPS)
ALL_ROLES = MAIL_ROLES + (ROLE_HTTP, ROLE_ACME_HTTP, ROLE_ACME_TLS)
IMPLICIT_TLS_ROLES = (ROLE_SUBMISSIONS, ROLE_POP3S, ROLE_IMAPS)


@dataclass(frozen=True)
class ListenerConfig:
    role: str            # one of ALL_ROLES
    endpoint: str        # Twisted server endpoint string, e.g. "tcp:25:interface=0.0.0.0"
    name: str            # unique, for logs; defaults to the role


@dataclass(frozen=True)
class TLSConfig:
    certificate: Path    # PEM chain (leaf first); generated self-signed if `generated`
    private_key: Path    # PEM key
    generated: bool      # True when no certificate was configured: make one on first start
    min_version: str     # "TLSv1.2" or "TLSv1.3"
    check_interval: float = 30.0        # seconds between stat()s of the files: a renewal on disk is picked up
    acme: bool = False                  # obtain and renew the certificate by ACME (RFC 8555)
    acme_contact: str = ""              # the account's contact address (mailto:)
    acme_directory: str = ""            # the CA's directory URL
    acme_names: tuple[str, ...] = ()    # DNS names in the certificate: the hostname first
    acme_ca_file: Path | None = None    # trust this CA for the directory's HTTPS (a private or test CA)


# [smtp] bare_newline: what a bare LF in DATA gets (a bare CR is always refused).
BARE_NEWLINE_MODES = ("reject", "normalize-trusted", "normalize")


@dataclass(frozen=True)
class SMTPLimits:
    max_message_size: int          # octets; SIZE advertised, 552 above it
    max_recipients: int            # per transaction, >= 100 (RFC 5321 §4.5.3.1.8); then 452
    max_command_line: int          # octets incl. CRLF, base before extension allowances (RFC 5321 §4.5.3.1.4: 512)
    max_text_line: int             # octets incl. CRLF in DATA (RFC 5321 §4.5.3.1.6: 1000)
    max_commands_before_mail: int  # HELO/NOOP/RSET/VRFY/... before the first MAIL
    max_errors: int                # error replies in a session before 421 and close
    command_timeout: float         # seconds idle waiting for a command (RFC 5321 §4.5.3.2.7: >= 5 min)
    data_timeout: float            # seconds idle inside DATA (RFC 5321 §4.5.3.2.6: 3 min per block)
    session_timeout: float         # seconds, total session time
    max_connections: int           # per listener, all clients
    max_connections_per_ip: int    # per listener, per client address
    auth_failure_delay: float      # seconds added per consecutive failed login from an address
    max_auth_failures: int         # failed AUTH in one session before 421 and close
    auth_max_delay: float          # the failure delay never grows beyond this (seconds)
    auth_lockout_failures: int     # failed logins in a row from an address before its logins are refused (0: never)
    auth_lockout_time: float       # seconds those logins are refused
    # Bare LF in DATA (one of BARE_NEWLINE_MODES): refused, or taken as CRLF (Postfix
    # smtpd_forbid_bare_newline = normalize); "normalize-trusted" only for trusted networks and AUTH.
    bare_newline: str = "normalize-trusted"


@dataclass(frozen=True)
class POP3Limits:
    max_command_line: int          # octets incl. CRLF (RFC 2449 §4: 255); AUTH lines and SASL responses may be longer
    max_errors: int                # -ERR replies in a session before the connection is closed
    max_auth_failures: int         # failed logins in one session before the connection is closed
    command_timeout: float         # seconds idle (RFC 1939 §3: the autologout timer is at least 10 minutes)
    session_timeout: float         # seconds, total session time
    max_connections: int           # per listener, all clients
    max_connections_per_ip: int    # per listener, per client address
    allow_plaintext_auth: bool     # USER/PASS/AUTH without TLS (false: only after STLS or on 995)


@dataclass(frozen=True)
class IMAPLimits:
    idle_timeout: float            # seconds without client input before "* BYE" (RFC 3501 §5.4: at least 30 minutes)
    login_timeout: float           # seconds from connect until LOGIN/AUTHENTICATE must have succeeded
    session_timeout: float         # seconds a whole session may last; 0 = no limit (IDLE clients stay for days)
    max_connections: int           # per listener, all clients
    max_connections_per_ip: int    # per listener, per client address
    max_command_line: int          # octets of one command line outside literals, incl. CRLF; over it: BAD, line dropped
    max_literal: int               # octets of one literal outside APPEND; a whole command: + max_command_line
    max_append: int                # octets of an APPEND message (RFC 7889 APPENDLIMIT); over it: NO [TOOBIG]
    max_paren_depth: int           # nesting of parentheses (and NOT) in one command
    max_errors: int                # BAD replies in a session before "* BYE" and close
    max_auth_failures: int         # failed LOGIN/AUTHENTICATE in one session before "* BYE" and close
    allow_plaintext_auth: bool     # LOGIN/AUTHENTICATE without TLS (false: only after STARTTLS or on 993)


# Outbound TLS policies of the relay queue's client: per relay host, and towards MX hosts.
TLS_NONE = "none"                    # never STARTTLS
TLS_OPPORTUNISTIC = "opportunistic"  # STARTTLS when offered, certificate not checked; plaintext retry if it fails
TLS_REQUIRED = "required"            # STARTTLS must succeed and the certificate must verify for the host
TLS_IMPLICIT = "implicit"            # TLS from the first byte (port 465), certificate verified
OUTBOUND_TLS_MODES = (TLS_NONE, TLS_OPPORTUNISTIC, TLS_REQUIRED, TLS_IMPLICIT)


@dataclass(frozen=True)
class RelayHost:
    """Where to send instead of the MX: a smarthost for everything or for one domain."""
    host: str                      # DNS name or IP address
    port: int
    tls: str                       # one of OUTBOUND_TLS_MODES
    username: str | None           # AUTH PLAIN/LOGIN credentials, only sent over TLS
    password: str | None
    ca_file: Path | None           # trust these CAs instead of the system store (for "required"/"implicit")


@dataclass(frozen=True)
class QueueConfig:
    retry_schedule: tuple[float, ...]   # seconds to wait after attempt 1, 2, ...; the last repeats
    max_lifetime: float                 # seconds after arrival when we give up and bounce (RFC 5321 §4.5.4.1: 4-5 days)
    delay_notice_after: float           # seconds after arrival for the one delay DSN (0: never)
    max_deliveries: int                 # concurrent outbound transactions in total
    max_per_domain: int                 # concurrent outbound transactions per destination
    connect_timeout: float              # seconds
    reply_timeout: float                # seconds per reply (RFC 5321 §4.5.3.2: 5 min)
    data_timeout: float                 # seconds for the data phase and its final reply (§4.5.3.2.6: 10 min)
    connection_cache_time: float        # seconds an idle outbound connection waits for the next message (0: never reused)
    connection_reuse_time: float        # seconds after connecting when a connection takes no new transaction
    mx_port: int                        # port used for MX delivery (25; other values only for tests)
    mx_tls: str                         # TLS policy towards MX hosts
    smarthost: RelayHost | None         # send everything here instead of the MX
    routes: tuple[tuple[str, RelayHost], ...]   # (domain, relay host) overrides, exact domain match


@dataclass(frozen=True)
class RoutingConfig:
    """[routing]: where addresses lead (mailgw/routing, docs/routing.md)."""
    aliases_file: Path                  # the alias table (Postfix virtual(5)-like lines), reloaded on change
    abuse: str                          # mailbox or address that abuse@<each local domain> reaches (RFC 2142)
    max_alias_depth: int                # alias -> alias -> ... nesting; deeper is a table error
    max_expansion: int                  # final targets one recipient may expand to; more is a table error
    srs_domain: str                     # domain of SRS0 envelope senders on forwards (one of local_domains)
    srs_max_age: int                    # days an SRS0 address stays valid for bounces coming back
    check_interval: float               # seconds between stat()s of the tables for changes


@dataclass(frozen=True)
class QuotaConfig:
    """[quota]: per-mailbox storage limits (RFC 9208); 0 means no limit."""
    default_bytes: int
    default_messages: int
    quotas_file: Path                   # per-user overrides (`mailgw quota set`), reloaded on change


@dataclass(frozen=True)
class DNSConfig:
    """[dns]: the one resolver behind MX, SPF, DKIM, DMARC and reverse DNS lookups."""
    nameservers: tuple[tuple[str, int], ...]   # () = the system's (/etc/resolv.conf)
    timeout: float                             # seconds per query, retries included


@dataclass(frozen=True)
class DKIMConfig:
    """[dkim]: signing of mail that leaves (docs/dkim.md)."""
    sign: bool                          # sign for every domain with a key in keys_dir
    keys_dir: Path                      # <domain>/<selector>.<rsa|ed25519>.pem (`mailgw dkim keygen`)
    add_missing_headers: bool           # Date: and Message-ID: added at submission (RFC 6409 §8.2, §8.3)


@dataclass(frozen=True)
class ChecksConfig:
    """[checks]: SPF, DKIM, DMARC and ARC on mail from untrusted clients on
    the relay role (mailgw/mailauth/stages.py, docs/authentication.md)."""
    spf: bool
    dkim: bool
    dmarc: bool
    arc: bool
    authserv_id: str                    # our name in Authentication-Results (RFC 8601 §2.5)
    dmarc_enforce: bool                 # act on p=reject/quarantine; False: only record the result
    quarantine_folder: str              # where p=quarantine mail goes
    on_temperror: str                   # "accept" (record temperror) or "defer" (451 4.7.x)
    budget: float                       # seconds all checks of one message may take
    received_spf: bool                  # also add Received-SPF: (RFC 7208 §9.1)
    reverse_dns: bool                   # FCrDNS of clients, for Received: and policy
    min_key_bits: int                   # RSA DKIM keys below this are permerror (RFC 8301 §3.2)


@dataclass(frozen=True)
class SpamConfig:
    """[spam]: the screen before the greeting (DNS blocklists, pregreet),
    rspamd at the end of DATA and Junk learning (mailgw/spam/, docs/spam.md)."""
    rspamd_url: str                     # rspamd's normal worker ("" : no scanning), e.g. http://127.0.0.1:11333
    controller_url: str                 # its controller, for /learnspam and /learnham ("" : no learning)
    password: str                       # the controller's password ("" : none, secure_ip only)
    timeout: float                      # seconds one scan may take
    on_failure: str                     # rspamd down or slow: "accept" (logged, counted) or "defer" (451 4.7.1)
    scan_outbound: bool                 # also scan authenticated users' mail (a compromised account)
    max_scan_size: int                  # larger messages are delivered unscanned (and logged)
    junk_folder: str                    # where "add header" / "rewrite subject" mail goes
    subject_tag: str                    # prefixed to the Subject: of spam ("" : rspamd's rewrite only)
    learn: bool                         # Junk moves and $Junk/$NotJunk teach rspamd
    learn_concurrency: int              # learn requests in flight at once
    learn_backlog: int                  # learns pending (waiting or in flight) beyond this are dropped, counted
    dnsbl_sites: tuple                  # mailgw.spam.dnsbl.DNSBLSite, postscreen_dnsbl_sites syntax
    dnsbl_threshold: int                # refuse at this total weight
    dnsbl_budget: float                 # seconds all blocklist queries of one client may take
    allow_networks: tuple[Network, ...] # never screened (besides [server] trusted_networks)
    pregreet_wait: float                # seconds of the pregreet test (0: off), postscreen_greet_wait
    pregreet_pass_ttl: float            # a passed address skips the test this long, postscreen_greet_ttl

    @property
    def screens(self) -> bool:
        """Is anything checked before the greeting?"""
        return bool(self.dnsbl_sites) or self.pregreet_wait > 0


@dataclass(frozen=True)
class Config:
    hostname: str                          # our FQDN: greeting, Received, EHLO
    local_domains: frozenset[str]          # lower-case, exact match only
    trusted_networks: tuple[Network, ...]  # may relay without AUTH on the relay role
    postmaster: str                        # mailbox that receives postmaster@<each local domain>
    recipient_delimiter: str               # "" or one char, e.g. "+": alice+tag@ -> alice@
    allow_sender_mismatch: bool            # authenticated users may use any MAIL FROM
    data_dir: Path                         # everything we write lives under here
    users_file: Path
    mail_dir: Path                         # <data_dir>/mail: Maildirs
    queue_dir: Path                        # <data_dir>/queue: relay spool
    io_threads: int                        # thread pool for fsync and file I/O
    user: str                              # "" or the account to run as after binding (when started as root)
    tls: TLSConfig
    smtp: SMTPLimits
    listeners: tuple[ListenerConfig, ...]
    queue: QueueConfig | None = field(default=None)   # None only in configs built by hand in tests
    source: Path | None = field(default=None)   # the file this came from (None: embedded default)
    pop3: POP3Limits | None = field(default=None)     # None only in configs built by hand in tests
    imap: IMAPLimits | None = field(default=None)     # None only in configs built by hand in tests
    smtp_workers: int = 0                  # SMTP worker processes (0: SMTP in the main process)
    # Which families a wildcard "tcp:PORT" listener takes: "all" (an IPv6 twin socket beside it), "ipv4".
    inet_protocols: str = "all"
    routing: RoutingConfig | None = field(default=None)   # None only in configs built by hand in tests
    quota: QuotaConfig | None = field(default=None)       # None only in configs built by hand in tests
    dns: DNSConfig | None = field(default=None)           # None only in configs built by hand in tests
    dkim: DKIMConfig | None = field(default=None)         # None: no signing (configs built by hand in tests)
    checks: ChecksConfig | None = field(default=None)     # None: no checks (configs built by hand in tests)
    spam: SpamConfig | None = field(default=None)         # None: no spam defences (configs built by hand in tests)
    min_free_space: int = 100 * 1024 * 1024     # octets free under data_dir below which /readyz says not ready
    log_format: str = "text"                    # [log] format: "text" (twistd's lines) or "json" (one object a line)
