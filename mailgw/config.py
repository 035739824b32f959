"""Load the TOML configuration once into the frozen objects of `config_types`.

    config = load("/etc/mailgw.toml")              # or load() for the embedded default
    config = load(path, overrides={"server": {"data_dir": "/tmp/x"}})

Every mistake in the file is collected and reported together in one ConfigError,
each message naming its key (`smtp.max_recipients: must be ...`), so an operator
fixes the file in one pass. Unknown keys are errors, never silently ignored: a
typo must not quietly fall back to a default.

Missing keys take the defaults below; `mailgw/default.toml` spells out the same
values, and a test keeps the two in agreement.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import ipaddress
import math
import os
import pwd
import re
import socket
import sys
import tomllib
from pathlib import Path
from typing import Any

from mailgw.config_types import (
    ALL_ROLES,
    BARE_NEWLINE_MODES,
    IMPLICIT_TLS_ROLES,
    OUTBOUND_TLS_MODES,
    TLS_OPPORTUNISTIC,
    ChecksConfig,
    Config,
    DKIMConfig,
    DNSConfig,
    IMAPLimits,
    ListenerConfig,
    POP3Limits,
    QueueConfig,
    QuotaConfig,
    RoutingConfig,
    RelayHost,
    SMTPLimits,
    TLSConfig,
)

EMBEDDED_DEFAULT = Path(__file__).with_name("default.toml")
CONFIG_ENV_VAR = "MAILGW_CONFIG"

DEFAULT_DATA_DIR = "mailgw-data"
FALLBACK_HOSTNAME = "localhost.localdomain"
DEFAULT_LOCAL_DOMAINS = ("example.test",)
DEFAULT_TRUSTED_NETWORKS = ("127.0.0.0/8", "::1/128")
RECIPIENT_DELIMITERS = "+-_."
# [server] inet_protocols: "all" gives each wildcard tcp: listener an IPv6 twin (mailgw/dualstack.py).
INET_PROTOCOLS = ("all", "ipv4")
TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")
DEFAULT_LISTENERS = (
    {"role": "relay", "endpoint": "tcp:25"},
    {"role": "submission", "endpoint": "tcp:587"},
    {"role": "submissions", "endpoint": "tcp:465"},
    {"role": "pop3", "endpoint": "tcp:110"},
    {"role": "pop3s", "endpoint": "tcp:995"},
    {"role": "imap", "endpoint": "tcp:143"},
    {"role": "imaps", "endpoint": "tcp:993"},
)

# key: (default, minimum, maximum); maximum None = unbounded.
SMTP_INTEGER_LIMITS: dict[str, tuple[int, int, int | None]] = {
    "max_message_size": (35 * 1024 * 1024, 1024, None),
    # RFC 5321 §4.5.3.1.8: at least 100 recipients must be accepted.
    "max_recipients": (1000, 100, None),
    # RFC 5321 §4.5.3.1.4: a command line is at least 512 octets including CRLF.
    "max_command_line": (512, 512, None),
    # RFC 5321 §4.5.3.1.6: a text line is at least 1000 octets including CRLF.
    "max_text_line": (1000, 1000, None),
    "max_commands_before_mail": (50, 1, None),
    "max_errors": (10, 1, None),
    "max_connections": (500, 1, None),
    "max_connections_per_ip": (20, 1, None),
    "max_auth_failures": (3, 1, None),
    # Failed logins in a row from one address (any protocol) before its logins are refused; 0 = never.
    "auth_lockout_failures": (10, 0, None),
}
# key: (default seconds, minimum seconds). Below the RFC 5321 §4.5.3.2 minimums is
# allowed on purpose (tests, hostile networks); the defaults follow the RFC.
SMTP_SECONDS_LIMITS: dict[str, tuple[float, float]] = {
    "command_timeout": (300.0, 1.0),
    "data_timeout": (180.0, 1.0),
    "session_timeout": (3600.0, 1.0),
    "auth_failure_delay": (1.0, 0.0),
    "auth_max_delay": (30.0, 0.0),
    "auth_lockout_time": (900.0, 1.0),
}

# [pop3]: key: (default, minimum, maximum); maximum None = unbounded.
POP3_INTEGER_LIMITS: dict[str, tuple[int, int, int | None]] = {
    # RFC 2449 §4: a command line is up to 255 octets including CRLF; a server
    # must accept that much. AUTH lines and SASL responses have their own, larger bound.
    "max_command_line": (255, 255, None),
    "max_errors": (10, 1, None),
    "max_auth_failures": (3, 1, None),
    "max_connections": (500, 1, None),
    "max_connections_per_ip": (20, 1, None),
}
# key: (default seconds, minimum seconds). RFC 1939 §3: the autologout timer is at
# least 10 minutes; lower values are allowed on purpose (tests, hostile networks).
POP3_SECONDS_LIMITS: dict[str, tuple[float, float]] = {
    "command_timeout": (600.0, 1.0),
    "session_timeout": (3600.0, 1.0),
}

# [imap]: key: (default, minimum, maximum); maximum None = unbounded.
IMAP_INTEGER_LIMITS: dict[str, tuple[int, int, int | None]] = {
    "max_connections": (1000, 1, None),
    "max_connections_per_ip": (50, 1, None),
    # RFC 7162 §4 recommends accepting command lines of at least 8192 octets;
    # clients send long UID sets, so the default is generous.
    "max_command_line": (64 * 1024, 1024, None),
    "max_literal": (64 * 1024, 1024, None),
    # 0: the same as smtp.max_message_size (what SMTP would accept, APPEND accepts).
    "max_append": (0, 0, None),
    "max_paren_depth": (32, 2, 1000),
    "max_errors": (20, 1, None),
    "max_auth_failures": (3, 1, None),
}
# key: (default seconds, minimum seconds). RFC 3501 §5.4: the autologout timer is at
# least 30 minutes; lower values are allowed on purpose (tests, hostile networks).
IMAP_SECONDS_LIMITS: dict[str, tuple[float, float]] = {
    "idle_timeout": (1800.0, 1.0),
    "login_timeout": (60.0, 1.0),
    # 0: no limit. IDLE clients keep one session open for days.
    "session_timeout": (0.0, 0.0),
}

# RFC 1035 §2.3.1 / RFC 1123 §2.1: letters, digits, inner hyphens; 63 per label, 253 in all.
_DNS_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# RFC 5322 §3.2.3: dot-atom local part (quoted local parts are not accepted here).
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_LISTENER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class ConfigError(Exception):
    """Every problem found in one configuration, one message per problem."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))

    def __str__(self) -> str:
        return "\n".join(self.errors)


class ConfigFileError(ConfigError):
    """The file itself could not be read or is not TOML; nothing was validated."""


# --- loading -------------------------------------------------------------------


def load(path: str | Path | None = None, *, overrides: dict | None = None) -> Config:
    """Parse and validate a config file (None: the embedded default).

    Relative paths in the file are resolved against the current working
    directory now, at load time, so the Config only holds absolute paths.
    """
    file = EMBEDDED_DEFAULT if path is None else Path(path)
    raw = _read_toml(file)
    if overrides:
        raw = _merged(raw, overrides)
    errors: list[str] = []
    config = _build_config(raw, errors)
    if errors or config is None:
        raise ConfigError(errors)
    source = None if path is None else Path(os.path.abspath(file))
    return dataclasses.replace(config, source=source)


def _read_toml(file: Path) -> dict[str, Any]:
    try:
        data = file.read_bytes()
    except OSError as e:
        raise ConfigFileError([f"{file}: cannot read: {e.strerror or e}"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigFileError([f"{file}: not UTF-8 text (byte offset {e.start})"]) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # tomllib's message already ends with "(at line L, column C)".
        raise ConfigFileError([f"{file}: invalid TOML: {e}"]) from None


def _merged(base: dict, overrides: dict) -> dict:
    """`overrides` laid over `base`, tables merged key by key, anything else replaced.

    None means "not given" (an unset command-line option) and keeps the file's value.
    """
    result = dict(base)
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = _merged(result[key], value)
        else:
            result[key] = value
    return result


# --- typed access to one TOML table, collecting errors -------------------------


def _describe(value: Any) -> str:
    """A value as the operator wrote it in TOML, for "got ..." in messages."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


class _Table:
    """One TOML table: typed getters that record errors instead of raising.

    A getter returns None when the value is wrong; the caller only builds the
    Config when no error at all was recorded, so None never escapes.
    """

    def __init__(self, raw: Any, where: str, errors: list[str]):
        self.where = where
        self.errors = errors
        self.seen: set[str] = set()
        if not isinstance(raw, dict):
            self.error("", f"must be a table, got {_describe(raw)}")
            raw = {}
        self.raw = raw

    def key_name(self, key: str) -> str:
        if not key:
            return self.where
        return f"{self.where}.{key}" if self.where else key

    def error(self, key: str, message: str) -> None:
        self.errors.append(f"{self.key_name(key)}: {message}")

    def has(self, key: str) -> bool:
        return key in self.raw

    def take(self, key: str, default: Any) -> Any:
        self.seen.add(key)
        return self.raw.get(key, default)

    def integer(self, key: str, default: int, minimum: int, maximum: int | None = None) -> int | None:
        value = self.take(key, default)
        if maximum is None:
            wanted = f"must be an integer >= {minimum}"
        else:
            wanted = f"must be an integer from {minimum} to {maximum}"
        # bool is an int subclass in Python; `true` is never a count.
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(key, f"{wanted}, got {_describe(value)}")
            return None
        if value < minimum or (maximum is not None and value > maximum):
            self.error(key, f"{wanted}, got {value}")
            return None
        return value

    def seconds(self, key: str, default: float, minimum: float) -> float | None:
        value = self.take(key, default)
        wanted = f"must be a number of seconds >= {minimum:g}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.error(key, f"{wanted}, got {_describe(value)}")
            return None
        # `not >=` also refuses nan; inf would never fire a timer.
        if not (value >= minimum) or not math.isfinite(value):
            self.error(key, f"{wanted}, got {_describe(value)}")
            return None
        return float(value)

    def boolean(self, key: str, default: bool) -> bool | None:
        value = self.take(key, default)
        if not isinstance(value, bool):
            self.error(key, f"must be true or false, got {_describe(value)}")
            return None
        return value

    def string(self, key: str, default: str) -> str | None:
        value = self.take(key, default)
        if not isinstance(value, str):
            self.error(key, f"must be a string, got {_describe(value)}")
            return None
        return value

    def string_list(self, key: str, default: tuple[str, ...]) -> list[str] | None:
        value = self.take(key, list(default))
        if not isinstance(value, list):
            self.error(key, f"must be an array of strings, got {_describe(value)}")
            return None
        ok = True
        for index, item in enumerate(value):
            if not isinstance(item, str):
                self.error(f"{key}[{index}]", f"must be a string, got {_describe(item)}")
                ok = False
        return value if ok else None

    def path_text(self, key: str, default: str) -> str | None:
        """A path as written ("" when empty); Path objects are welcome in overrides."""
        value = self.take(key, default)
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str):
            self.error(key, f"must be a path string, got {_describe(value)}")
            return None
        if "\0" in value:
            self.error(key, "must not contain a NUL character")
            return None
        return value

    def finish(self, unknown: str = "unknown key", list_known: bool = False) -> None:
        """Report every key nobody asked for, with the nearest known one as a hint."""
        for key in self.raw:
            if key in self.seen:
                continue
            close = difflib.get_close_matches(key, self.seen, n=1)
            if close:
                hint = f'; did you mean "{close[0]}"?'
            elif list_known:
                hint = f" (known: {', '.join(sorted(self.seen))})"
            else:
                hint = ""
            self.error(key, f"{unknown}{hint}")


def _absolute(value: str) -> Path:
    # abspath, not resolve(): keep symlinks as the operator wrote them.
    return Path(os.path.abspath(os.path.expanduser(value)))


# --- validation of single values -----------------------------------------------


def _dns_name_problem(name: str) -> str | None:
    """Why `name` is not a usable DNS name, or None when it is."""
    if not name:
        return "empty"
    if len(name) > 253:
        return f"longer than 253 characters ({len(name)})"
    if "*" in name:
        return "wildcards are not supported; list each domain"
    labels = name.split(".")
    if any(label == "" for label in labels):
        return "empty label (leading, trailing or doubled dot)"
    for label in labels:
        if not _DNS_LABEL.fullmatch(label):
            return f'label "{label}" must be 1-63 letters, digits or inner hyphens'
    # RFC 3696 §2: a top-level domain is never all-numeric (that is an IP address).
    if labels[-1].isdigit():
        return "looks like an IP address, not a domain name"
    return None


def _address_problem(address: str) -> str | None:
    local, at, domain = address.rpartition("@")
    if not at or not local:
        return "must be an address like postmaster@example.org"
    # RFC 5321 §4.5.3.1.1: local part at most 64 octets.
    if len(local) > 64 or not _DOT_ATOM.fullmatch(local):
        return "local part must be a plain dot-atom of at most 64 characters"
    problem = _dns_name_problem(domain)
    return None if problem is None else f"domain: {problem}"


def _default_hostname() -> str:
    """Our FQDN if the machine knows one, else a name that at least parses."""
    fqdn = socket.getfqdn()
    if "." in fqdn and _dns_name_problem(fqdn) is None:
        return fqdn
    return FALLBACK_HOSTNAME


def _network(text: str, key: str, table: _Table) -> Any:
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            table.error(key, f"{_describe(text)} is not an IPv4 or IPv6 network "
                             f'such as "10.0.0.0/8" or "2001:db8::/32"')
            return None
        table.error(key, f'{_describe(text)} has host bits set; did you mean "{loose}"?')
        return None


# --- the sections --------------------------------------------------------------


def _build_config(raw: dict, errors: list[str]) -> Config | None:
    root = _Table(raw, "", errors)
    server = _Table(root.take("server", {}), "server", errors)
    tls_table = _Table(root.take("tls", {}), "tls", errors)
    smtp_table = _Table(root.take("smtp", {}), "smtp", errors)
    queue_table = _Table(root.take("queue", {}), "queue", errors)
    pop3_table = _Table(root.take("pop3", {}), "pop3", errors)
    imap_table = _Table(root.take("imap", {}), "imap", errors)
    routing_table = _Table(root.take("routing", {}), "routing", errors)
    quota_table = _Table(root.take("quota", {}), "quota", errors)
    dns_table = _Table(root.take("dns", {}), "dns", errors)
    dkim_table = _Table(root.take("dkim", {}), "dkim", errors)
    checks_table = _Table(root.take("checks", {}), "checks", errors)
    listeners_raw = root.take("listeners", [dict(entry) for entry in DEFAULT_LISTENERS])

    hostname = server.string("hostname", "")
    if hostname == "":
        hostname = _default_hostname()
    elif hostname is not None and (problem := _dns_name_problem(hostname)):
        server.error("hostname", f"{_describe(hostname)}: {problem}")
        hostname = None

    local_domains = _local_domains(server)
    trusted = _trusted_networks(server)

    postmaster = server.string("postmaster", "")
    if postmaster == "" and local_domains:
        postmaster = f"postmaster@{local_domains[0]}"
    elif postmaster and (problem := _address_problem(postmaster)):
        server.error("postmaster", f"{_describe(postmaster)}: {problem}")
        postmaster = None
    elif postmaster:
        local, _, domain = postmaster.rpartition("@")
        postmaster = f"{local}@{domain.lower()}"

    delimiter = server.string("recipient_delimiter", "+")
    if delimiter is not None and delimiter != "" and (
            len(delimiter) != 1 or delimiter not in RECIPIENT_DELIMITERS):
        server.error("recipient_delimiter",
                     f'must be "" or one of {" ".join(RECIPIENT_DELIMITERS)}, got {_describe(delimiter)}')
        delimiter = None

    allow_mismatch = server.boolean("allow_sender_mismatch", False)
    data_dir = users_file = None
    data_dir_text = server.path_text("data_dir", DEFAULT_DATA_DIR)
    if data_dir_text == "":
        server.error("data_dir", 'must not be empty (use "." for the current directory)')
    elif data_dir_text is not None:
        data_dir = _absolute(data_dir_text)
    users_file_text = server.path_text("users_file", "")
    if users_file_text:
        users_file = _absolute(users_file_text)
    elif users_file_text == "" and data_dir is not None:
        users_file = data_dir / "users"
    io_threads = server.integer("io_threads", 8, 1, 256)
    smtp_workers = server.integer("smtp_workers", 0, 0, 64)
    inet_protocols = server.string("inet_protocols", "all")
    if inet_protocols is not None and inet_protocols not in INET_PROTOCOLS:
        server.error("inet_protocols", f'must be one of {", ".join(INET_PROTOCOLS)}, got {_describe(inet_protocols)}')
        inet_protocols = None
    user = server.string("user", "")
    if user:
        try:
            pwd.getpwnam(user)
        except KeyError:
            server.error("user", f"{_describe(user)}: no such user on this system")
            user = None
    server.finish()

    tls = _tls(tls_table, data_dir)
    smtp = _smtp(smtp_table)
    queue = _queue(queue_table)
    pop3 = _pop3(pop3_table)
    imap = _imap(imap_table, smtp)
    listeners = _listeners(listeners_raw, errors)
    routing = _routing(routing_table, data_dir, local_domains, postmaster)
    quota = _quota(quota_table, data_dir)
    dns_config = _dns(dns_table)
    dkim = _dkim(dkim_table, data_dir)
    checks = _checks(checks_table, hostname)
    root.finish("unknown top-level table or key", list_known=True)

    if errors:
        return None
    return Config(
        hostname=hostname,
        local_domains=frozenset(local_domains),
        trusted_networks=tuple(trusted),
        postmaster=postmaster,
        recipient_delimiter=delimiter,
        allow_sender_mismatch=allow_mismatch,
        data_dir=data_dir,
        users_file=users_file,
        mail_dir=data_dir / "mail",
        queue_dir=data_dir / "queue",
        io_threads=io_threads,
        smtp_workers=smtp_workers,
        inet_protocols=inet_protocols,
        user=user,
        tls=tls,
        smtp=smtp,
        listeners=tuple(listeners),
        queue=queue,
        pop3=pop3,
        imap=imap,
        routing=routing,
        quota=quota,
        dns=dns_config,
        dkim=dkim,
        checks=checks,
    )


def _routing(table: _Table, data_dir: Path | None, local_domains, postmaster) -> RoutingConfig | None:
    aliases_text = table.path_text("aliases_file", "")
    aliases_file = _absolute(aliases_text) if aliases_text else (
        data_dir / "aliases" if data_dir is not None else None)
    # RFC 2142 §2: abuse@ must reach a person; by default the one postmaster@ reaches.
    abuse = table.string("abuse", "")
    if abuse == "":
        abuse = postmaster
    elif abuse and (problem := _address_problem(abuse)):
        table.error("abuse", f"{_describe(abuse)}: {problem}")
        abuse = None
    elif abuse:
        local, _, domain = abuse.rpartition("@")
        abuse = f"{local.lower()}@{domain.lower()}"
    max_depth = table.integer("max_alias_depth", 10, 1, 100)
    max_expansion = table.integer("max_expansion", 1000, 1, 100_000)
    srs_domain = table.string("srs_domain", "")
    if srs_domain == "" and local_domains:
        srs_domain = local_domains[0]
    elif srs_domain and local_domains and srs_domain.lower() not in local_domains:
        table.error("srs_domain", f"{_describe(srs_domain)}: must be one of server.local_domains "
                                  "(bounces to SRS addresses come back to it)")
        srs_domain = None
    elif srs_domain:
        srs_domain = srs_domain.lower()
    srs_max_age = table.integer("srs_max_age", 21, 1, 365)
    check_interval = table.seconds("check_interval", 1.0, 0.0)
    table.finish()
    values = (aliases_file, abuse, max_depth, max_expansion, srs_domain, srs_max_age, check_interval)
    if None in values:
        return None
    return RoutingConfig(*values)


def _quota(table: _Table, data_dir: Path | None) -> QuotaConfig | None:
    default_bytes = table.integer("default_bytes", 0, 0)
    default_messages = table.integer("default_messages", 0, 0)
    quotas_text = table.path_text("quotas_file", "")
    quotas_file = _absolute(quotas_text) if quotas_text else (
        data_dir / "quotas" if data_dir is not None else None)
    table.finish()
    if None in (default_bytes, default_messages, quotas_file):
        return None
    return QuotaConfig(default_bytes, default_messages, quotas_file)


def _dns(table: _Table) -> DNSConfig | None:
    servers_text = table.string_list("nameservers", ())
    timeout = table.seconds("timeout", 5.0, 0.1)
    table.finish()
    servers = []
    for text in servers_text or ():
        host, port = text, 53
        if text.count(":") == 1:                 # "host:port"; a bare IPv6 address has several colons
            host, _, port_text = text.partition(":")
            port = int(port_text) if port_text.isdigit() else -1
        elif text.startswith("[") and "]:" in text:
            host, _, port_text = text[1:].partition("]:")
            port = int(port_text) if port_text.isdigit() else -1
        try:
            ipaddress.ip_address(host)
        except ValueError:
            table.error("nameservers", f"{_describe(text)}: must be an IP address, optionally with :port")
            continue
        if not 0 < port < 65536:
            table.error("nameservers", f"{_describe(text)}: port must be 1-65535")
            continue
        servers.append((host, port))
    if servers_text is None or timeout is None or len(servers) != len(servers_text):
        return None
    return DNSConfig(tuple(servers), timeout)


def _dkim(table: _Table, data_dir: Path | None) -> DKIMConfig | None:
    sign = table.boolean("sign", True)
    keys_text = table.path_text("keys_dir", "")
    keys_dir = _absolute(keys_text) if keys_text else (data_dir / "dkim" if data_dir is not None else None)
    add_missing = table.boolean("add_missing_headers", True)
    table.finish()
    if None in (sign, keys_dir, add_missing):
        return None
    return DKIMConfig(sign, keys_dir, add_missing)


ON_TEMPERROR = ("accept", "defer")


def _checks(table: _Table, hostname: str | None) -> ChecksConfig | None:
    flags = [table.boolean(name, True) for name in ("spf", "dkim", "dmarc", "arc")]
    authserv_id = table.string("authserv_id", "")
    if authserv_id == "":
        authserv_id = hostname
    elif authserv_id and (problem := _dns_name_problem(authserv_id)):
        table.error("authserv_id", f"{_describe(authserv_id)}: {problem}")
        authserv_id = None
    enforce = table.boolean("dmarc_enforce", True)
    folder = table.string("quarantine_folder", "Junk")
    if folder is not None and (not folder or "/" in folder or folder.startswith(".")):
        table.error("quarantine_folder", f"{_describe(folder)}: must be a folder name such as Junk")
        folder = None
    on_temperror = table.string("on_temperror", "accept")
    if on_temperror is not None and on_temperror not in ON_TEMPERROR:
        table.error("on_temperror", f'must be one of {", ".join(ON_TEMPERROR)}, got {_describe(on_temperror)}')
        on_temperror = None
    budget = table.seconds("budget", 10.0, 0.1)
    received_spf = table.boolean("received_spf", False)
    reverse_dns = table.boolean("reverse_dns", True)
    min_key_bits = table.integer("min_key_bits", 1024, 512, 16384)
    table.finish()
    values = (*flags, authserv_id, enforce, folder, on_temperror, budget, received_spf, reverse_dns, min_key_bits)
    if None in values:
        return None
    return ChecksConfig(*values)


def _local_domains(server: _Table) -> list[str] | None:
    domains = server.string_list("local_domains", DEFAULT_LOCAL_DOMAINS)
    if domains is None:
        return None
    if not domains:
        server.error("local_domains", "at least one domain is required")
        return None
    result: list[str] = []
    for index, domain in enumerate(domains):
        if problem := _dns_name_problem(domain):
            server.error(f"local_domains[{index}]", f"{_describe(domain)}: {problem}")
        elif domain.lower() not in result:
            result.append(domain.lower())
    return result or None


def _trusted_networks(server: _Table) -> list | None:
    texts = server.string_list("trusted_networks", DEFAULT_TRUSTED_NETWORKS)
    if texts is None:
        return None
    networks = [_network(text, f"trusted_networks[{i}]", server) for i, text in enumerate(texts)]
    return None if None in networks else networks


def _tls(table: _Table, data_dir: Path | None) -> TLSConfig | None:
    certificate_text = table.path_text("certificate", "")
    private_key_text = table.path_text("private_key", "")
    min_version = table.string("min_version", "TLSv1.2")
    if min_version is not None and min_version not in TLS_VERSIONS:
        table.error("min_version", f'must be "TLSv1.2" or "TLSv1.3", got {_describe(min_version)}')
        min_version = None
    table.finish()
    if certificate_text is None or private_key_text is None:
        return None

    if certificate_text == "" and private_key_text == "":
        if data_dir is None or min_version is None:
            return None
        return TLSConfig(certificate=data_dir / "tls" / "cert.pem",
                         private_key=data_dir / "tls" / "key.pem",
                         generated=True, min_version=min_version)

    both_or_neither = ("set both, or leave both empty to have a self-signed "
                       "certificate generated on first start")
    if private_key_text == "":
        table.error("private_key", f"is empty but tls.certificate is set; {both_or_neither}")
    if certificate_text == "":
        table.error("certificate", f"is empty but tls.private_key is set; {both_or_neither}")
    paths: dict[str, Path] = {}
    for key, text in (("certificate", certificate_text), ("private_key", private_key_text)):
        if text == "":
            continue
        path = paths[key] = _absolute(text)
        # Unlike the data directory, a configured certificate is never created for you.
        if not path.exists():
            table.error(key, f"{path}: no such file")
        elif not path.is_file():
            table.error(key, f"{path}: not a regular file")
        elif not os.access(path, os.R_OK):
            table.error(key, f"{path}: not readable by this user")
    if len(paths) != 2 or min_version is None:
        return None
    return TLSConfig(certificate=paths["certificate"], private_key=paths["private_key"],
                     generated=False, min_version=min_version)


# RFC 5321 §4.5.4.1: retry after at least 30 minutes, give up after 4-5 days;
# a first retry within minutes catches greylisting.
DEFAULT_RETRY_SCHEDULE = (300, 900, 1800, 3600, 7200, 14400)
QUEUE_INTEGER_LIMITS = {           # key: (default, minimum, maximum)
    # Postfix: default_process_limit 100, default_destination_concurrency_limit 20.
    "max_deliveries": (100, 1, 1000),
    "max_per_domain": (20, 1, 1000),
    "mx_port": (25, 1, 65535),
}
QUEUE_SECONDS_LIMITS = {           # key: (default, minimum)
    "max_lifetime": (5 * 86400.0, 60.0),
    "delay_notice_after": (4 * 3600.0, 0.0),
    "connect_timeout": (30.0, 1.0),
    "reply_timeout": (300.0, 1.0),
    "data_timeout": (600.0, 1.0),
    # Postfix smtp_connection_cache_time_limit (2 s) and smtp_connection_reuse_time_limit (300 s).
    "connection_cache_time": (2.0, 0.0),
    "connection_reuse_time": (300.0, 1.0),
}


def _queue(table: _Table) -> QueueConfig | None:
    values: dict[str, Any] = {}
    for key, (default, minimum, maximum) in QUEUE_INTEGER_LIMITS.items():
        values[key] = table.integer(key, default, minimum, maximum)
    for key, (default, minimum) in QUEUE_SECONDS_LIMITS.items():
        values[key] = table.seconds(key, default, minimum)
    schedule = table.take("retry_schedule", list(DEFAULT_RETRY_SCHEDULE))
    if (not isinstance(schedule, list) or not schedule
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 1
                       for x in schedule)):
        table.error("retry_schedule", f"must be a non-empty array of seconds >= 1, got {_describe(schedule)}")
        schedule = None
    values["retry_schedule"] = None if schedule is None else tuple(float(x) for x in schedule)
    values["mx_tls"] = table.string("mx_tls", TLS_OPPORTUNISTIC)
    if values["mx_tls"] is not None and values["mx_tls"] not in OUTBOUND_TLS_MODES[:3]:
        table.error("mx_tls", f'must be "none", "opportunistic" or "required", got {_describe(values["mx_tls"])}')
        values["mx_tls"] = None
    ok = True
    smarthost = None
    if table.has("smarthost"):
        smarthost = _relay_host(_Table(table.take("smarthost", {}), "queue.smarthost", table.errors))
        ok = smarthost is not None
    routes = []
    raw_routes = table.take("routes", [])
    if not isinstance(raw_routes, list):
        table.error("routes", f"must be an array of tables ([[queue.routes]]), got {_describe(raw_routes)}")
        ok = False
        raw_routes = []
    for index, raw in enumerate(raw_routes):
        route = _Table(raw, f"queue.routes[{index}]", table.errors)
        domain = route.string("domain", "")
        if domain is not None and (problem := _dns_name_problem(domain) if domain else "must be set"):
            route.error("domain", f"{_describe(domain)}: {problem}")
            domain = None
        host = _relay_host(route, extra_keys=("domain",))
        if domain is None or host is None:
            ok = False
        else:
            routes.append((domain.lower(), host))
    table.finish()
    if values["max_lifetime"] is not None and values["delay_notice_after"] is not None \
            and values["delay_notice_after"] >= values["max_lifetime"]:
        table.error("delay_notice_after", "must be shorter than queue.max_lifetime (or 0 for never)")
        ok = False
    if None in values.values() or not ok:
        return None
    return QueueConfig(smarthost=smarthost, routes=tuple(routes), **values)


def _relay_host(table: _Table, extra_keys: tuple[str, ...] = ()) -> RelayHost | None:
    host = table.string("host", "")
    if host is not None and not host:
        table.error("host", "must be set")
        host = None
    elif host is not None:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if problem := _dns_name_problem(host):
                table.error("host", f"{_describe(host)}: {problem}")
                host = None
    port = table.integer("port", 25, 1, 65535)
    tls = table.string("tls", TLS_OPPORTUNISTIC)
    if tls is not None and tls not in OUTBOUND_TLS_MODES:
        table.error("tls", f"must be one of {', '.join(OUTBOUND_TLS_MODES)}, got {_describe(tls)}")
        tls = None
    username = table.string("username", "")
    password = table.string("password", "")
    if username is not None and password is not None and bool(username) != bool(password):
        table.error("password" if username else "username", "set both username and password, or neither")
    if username and tls in ("none", TLS_OPPORTUNISTIC):
        # Credentials only over a verified channel; opportunistic TLS can be stripped.
        table.error("tls", 'must be "required" or "implicit" when username/password are set')
        tls = None
    ca_text = table.path_text("ca_file", "")
    ca_file = None
    if ca_text:
        ca_file = _absolute(ca_text)
        if not ca_file.is_file():
            table.error("ca_file", f"{ca_file}: no such file")
            ca_file = None
    table.seen.update(extra_keys)
    table.finish()
    if None in (host, port, tls, username, password) or (ca_text and ca_file is None):
        return None
    return RelayHost(host=host, port=port, tls=tls, username=username or None,
                     password=password or None, ca_file=ca_file)


def _smtp(table: _Table) -> SMTPLimits | None:
    values: dict[str, Any] = {}
    for key, (default, minimum, maximum) in SMTP_INTEGER_LIMITS.items():
        values[key] = table.integer(key, default, minimum, maximum)
    for key, (default, minimum) in SMTP_SECONDS_LIMITS.items():
        values[key] = table.seconds(key, default, minimum)
    bare_newline = values["bare_newline"] = table.string("bare_newline", "normalize-trusted")
    if bare_newline is not None and bare_newline not in BARE_NEWLINE_MODES:
        table.error("bare_newline",
                    f'must be one of {", ".join(BARE_NEWLINE_MODES)}, got {_describe(bare_newline)}')
        values["bare_newline"] = None
    table.finish()
    per_ip, total = values["max_connections_per_ip"], values["max_connections"]
    if per_ip is not None and total is not None and per_ip > total:
        table.error("max_connections_per_ip",
                    f"must not exceed smtp.max_connections ({total}), got {per_ip}")
    if None in values.values():
        return None
    return SMTPLimits(**values)


def _pop3(table: _Table) -> POP3Limits | None:
    values: dict[str, Any] = {}
    for key, (default, minimum, maximum) in POP3_INTEGER_LIMITS.items():
        values[key] = table.integer(key, default, minimum, maximum)
    for key, (default, minimum) in POP3_SECONDS_LIMITS.items():
        values[key] = table.seconds(key, default, minimum)
    values["allow_plaintext_auth"] = table.boolean("allow_plaintext_auth", False)
    table.finish()
    per_ip, total = values["max_connections_per_ip"], values["max_connections"]
    if per_ip is not None and total is not None and per_ip > total:
        table.error("max_connections_per_ip",
                    f"must not exceed pop3.max_connections ({total}), got {per_ip}")
    if None in values.values():
        return None
    return POP3Limits(**values)


def _imap(table: _Table, smtp: SMTPLimits | None) -> IMAPLimits | None:
    values: dict[str, Any] = {}
    for key, (default, minimum, maximum) in IMAP_INTEGER_LIMITS.items():
        values[key] = table.integer(key, default, minimum, maximum)
    for key, (default, minimum) in IMAP_SECONDS_LIMITS.items():
        values[key] = table.seconds(key, default, minimum)
    values["allow_plaintext_auth"] = table.boolean("allow_plaintext_auth", False)
    table.finish()
    per_ip, total = values["max_connections_per_ip"], values["max_connections"]
    if per_ip is not None and total is not None and per_ip > total:
        table.error("max_connections_per_ip",
                    f"must not exceed imap.max_connections ({total}), got {per_ip}")
    if values["max_append"] == 0 and smtp is not None:
        values["max_append"] = smtp.max_message_size
    elif values["max_append"] is not None and 0 < values["max_append"] < 1024:
        table.error("max_append", f"must be 0 (= smtp.max_message_size) or >= 1024, got {values['max_append']}")
        values["max_append"] = None
    if None in values.values() or smtp is None:
        return None
    return IMAPLimits(**values)


def _listeners(raw: Any, errors: list[str]) -> list[ListenerConfig]:
    if not isinstance(raw, list) or not all(isinstance(entry, dict) for entry in raw):
        errors.append(f"listeners: must be an array of tables ([[listeners]]), "
                      f"got {_describe(raw)}")
        return []
    if not raw:
        errors.append("listeners: at least one [[listeners]] entry is required")
        return []
    listeners: list[ListenerConfig] = []
    names: dict[str, int] = {}
    bound: dict[tuple[int, str], str] = {}
    for index, entry in enumerate(raw):
        table = _Table(entry, f"listeners[{index}]", errors)
        role = table.string("role", "")
        endpoint = table.string("endpoint", "")
        name = table.string("name", "")
        table.finish()

        if role == "":
            table.error("role", f"missing; one of {', '.join(ALL_ROLES)}")
            role = None
        elif role is not None and role not in ALL_ROLES:
            table.error("role", f"must be one of {', '.join(ALL_ROLES)}, got {_describe(role)}")
            role = None

        if not table.has("name"):
            name = role  # the default; the role is already validated
        elif name is not None and not _LISTENER_NAME.fullmatch(name):
            table.error("name", "must be 1-64 letters, digits, '_', '.' or '-', "
                                f"starting with a letter or digit, got {_describe(name)}")
            name = None
        if name is not None:
            if name in names:
                table.error("name", f'"{name}" is already used by listeners[{names[name]}]; '
                                    f"names must be unique (set name = \"...\")")
            else:
                names[name] = index

        if endpoint == "":
            table.error("endpoint", 'missing; a Twisted server endpoint such as "tcp:25"')
            endpoint = None
        elif endpoint is not None:
            address = _endpoint_address(endpoint, role, table)
            # Port 0 never clashes: the kernel picks a fresh port each time.
            if address is not None and address[0] != 0:
                if address in bound:
                    table.error("endpoint", f"{_describe(endpoint)} uses the same port and "
                                            f'address as listener "{bound[address]}"')
                else:
                    bound[address] = name or f"listeners[{index}]"
        if role is not None and endpoint is not None and name is not None:
            listeners.append(ListenerConfig(role=role, endpoint=endpoint, name=name))
    return listeners


class _NoReactor:
    """Stands in for the reactor while parsing endpoint strings: nothing is bound."""


def _endpoint_address(endpoint: str, role: str | None, table: _Table) -> tuple[int, str] | None:
    """Syntax-check a server endpoint string without listening.

    Returns (port, interface) for tcp:/tcp6: endpoints (to find two listeners
    on one port), None otherwise or on error.
    """
    from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, serverFromString

    kind = endpoint.split(":", 1)[0].lower()
    # ssl: would read server.pem at parse time, and TLS is mailgw's job: implicit-TLS
    # roles wrap the plain socket themselves, STARTTLS roles upgrade it.
    if kind == "ssl":
        table.error("endpoint", f"{_describe(endpoint)}: use a plain tcp: or tcp6: endpoint; "
                                "mailgw adds TLS itself from [tls]")
        return None
    if role in IMPLICIT_TLS_ROLES and kind not in ("tcp", "tcp6"):
        table.error("endpoint", f'role "{role}" needs a plain tcp: or tcp6: endpoint '
                                f"(mailgw adds TLS itself), got {_describe(endpoint)}")
        return None
    try:
        parsed = serverFromString(_NoReactor(), endpoint)
    except Exception as e:  # endpoint parsers raise ValueError, TypeError, KeyError, ...
        table.error("endpoint", f"{_describe(endpoint)} is not a valid Twisted server "
                                f"endpoint: {e}")
        return None
    if not isinstance(parsed, (TCP4ServerEndpoint, TCP6ServerEndpoint)):
        return None
    port, interface = getattr(parsed, "_port", None), getattr(parsed, "_interface", "")
    if not isinstance(port, int) or not 0 <= port <= 65535:
        table.error("endpoint", f"{_describe(endpoint)}: port must be 0-65535")
        return None
    if interface:
        try:
            interface = str(ipaddress.ip_address(interface))
        except ValueError:
            table.error("endpoint", f"{_describe(endpoint)}: interface must be an IP address, "
                                    f"got {_describe(interface)}")
            return None
    else:
        interface = "0.0.0.0"
    return port, interface


# --- `mailgw check` ------------------------------------------------------------


def check_main(argv: list[str]) -> int:
    """`mailgw check [--config PATH]`: validate, print a summary, start nothing."""
    parser = argparse.ArgumentParser(
        prog="mailgw check",
        description="Validate the mailgw configuration without starting anything.")
    parser.add_argument(
        "--config", metavar="PATH", default=os.environ.get(CONFIG_ENV_VAR) or None,
        help=f"config file (default: ${CONFIG_ENV_VAR}, else the embedded default)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help or a usage error; argparse already printed why
        return e.code if isinstance(e.code, int) else 2

    try:
        config = load(args.config)
    except ConfigError as e:
        for line in e.errors:
            print(f"error: {line}", file=sys.stderr)
        return 1

    from mailgw.tls import check_files          # cryptography: only for the command that needs it
    # Issue 24: a certificate and key that do not match passed here, then failed every handshake.
    if problems := check_files(config.tls):
        for line in problems:
            print(f"error: {line}", file=sys.stderr)
        return 1
    from mailgw.routing.aliases import read_aliases
    # The alias table is data, not config, but a bad line in it is the
    # admin's mistake as much as a bad key: name file and line, exit 1.
    routing = config.routing
    try:
        _, alias_problems = read_aliases(routing.aliases_file, config.local_domains,
                                         max_depth=routing.max_alias_depth, max_expansion=routing.max_expansion)
    except OSError as e:
        alias_problems = [(0, f"cannot read: {e.strerror}")]
    if alias_problems:
        for line, reason in alias_problems:
            print(f"error: {routing.aliases_file}:{line}: {reason}", file=sys.stderr)
        return 1
    print(f"config OK: {config.source if config.source else 'embedded default'}")
    width = max(len(listener.name) for listener in config.listeners)
    for listener in config.listeners:
        role = "" if listener.name == listener.role else f"  ({listener.role})"
        print(f"{listener.name:<{width}}  {listener.endpoint}{role}")
    for line in placeholder_warnings(config):
        print(f"warning: {line}", file=sys.stderr)
    return 0


def placeholder_warnings(config: Config) -> list[str]:
    """Settings that are valid but almost certainly not what the admin meant:
    the values mailgw falls back to when nothing better is known."""
    warnings = []
    if config.hostname == FALLBACK_HOSTNAME:
        # RFC 5321 §4.1.1.1: HELO/EHLO carries our FQDN; receivers refuse this one.
        warnings.append(f"server.hostname is {FALLBACK_HOSTNAME} (this host's name is not a fully "
                        "qualified domain name): set [server] hostname to the name in your MX record")
    placeholders = [domain for domain in config.local_domains if domain in DEFAULT_LOCAL_DOMAINS]
    if placeholders:
        warnings.append(f"server.local_domains has the placeholder {', '.join(placeholders)}: "
                        "set [server] local_domains to the domains you receive mail for")
    return warnings
