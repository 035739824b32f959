"""Load the TOML configuration once into the frozen objects of `config_types`.

    config = load("/etc/mailgw.toml")              # or load() for the embedded default
    config = load(path, overrides={"server": {"data_dir": "/tmp/x"}})

Every mistake in the file is collected and reported together in one ConfigError,
each message naming its key (`smtp.max_recipients: must be ...`), so an operator
fixes the file in one pass. Unknown keys are errors, never silently ignored: a
typo must not quietly fall back to a default.

Missing keys take the defaults given here and in `config_sections` (one parser per
section; `config_table` holds the typed getters and the checks of single values);
`mailgw/default.toml` spells out the same values, and a test keeps the two in agreement.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import pwd
import socket
import sys
import tomllib
from pathlib import Path
from typing import Any

from mailgw.config_sections import (
    DEFAULT_RETRY_SCHEDULE,
    IMAP_INTEGER_LIMITS,
    IMAP_SECONDS_LIMITS,
    ON_TEMPERROR,
    POP3_INTEGER_LIMITS,
    POP3_SECONDS_LIMITS,
    QUEUE_INTEGER_LIMITS,
    QUEUE_SECONDS_LIMITS,
    SMTP_INTEGER_LIMITS,
    SMTP_SECONDS_LIMITS,
    TLS_VERSIONS,
    _checks,
    _spam,
    _dkim,
    _dns,
    _imap,
    _listeners,
    _log,
    _pop3,
    _queue,
    _quota,
    _routing,
    _smtp,
    _tls,
)
from mailgw.config_table import _absolute, _address_problem, _describe, _dns_name_problem, _network, _Table
from mailgw.config_types import ROLE_ACME_HTTP, ROLE_ACME_TLS, Config

__all__ = [
    "CONFIG_ENV_VAR", "EMBEDDED_DEFAULT", "ConfigError", "ConfigFileError", "check_main", "load",
    "placeholder_warnings",
    "DEFAULT_DATA_DIR", "DEFAULT_LISTENERS", "DEFAULT_LOCAL_DOMAINS", "DEFAULT_TRUSTED_NETWORKS",
    "FALLBACK_HOSTNAME", "INET_PROTOCOLS", "RECIPIENT_DELIMITERS",
    # The defaults and bounds of the sections, defined in config_sections.
    "DEFAULT_RETRY_SCHEDULE", "IMAP_INTEGER_LIMITS", "IMAP_SECONDS_LIMITS", "ON_TEMPERROR",
    "POP3_INTEGER_LIMITS", "POP3_SECONDS_LIMITS", "QUEUE_INTEGER_LIMITS", "QUEUE_SECONDS_LIMITS",
    "SMTP_INTEGER_LIMITS", "SMTP_SECONDS_LIMITS", "TLS_VERSIONS",
]

EMBEDDED_DEFAULT = Path(__file__).with_name("default.toml")
CONFIG_ENV_VAR = "MAILGW_CONFIG"

DEFAULT_DATA_DIR = "mailgw-data"
FALLBACK_HOSTNAME = "localhost.localdomain"
DEFAULT_LOCAL_DOMAINS = ("example.test",)
DEFAULT_TRUSTED_NETWORKS = ("127.0.0.0/8", "::1/128")
RECIPIENT_DELIMITERS = "+-_."
# [server] inet_protocols: "all" gives each wildcard tcp: listener an IPv6 twin (mailgw/dualstack.py).
INET_PROTOCOLS = ("all", "ipv4")
DEFAULT_LISTENERS = (
    {"role": "relay", "endpoint": "tcp:25"},
    {"role": "submission", "endpoint": "tcp:587"},
    {"role": "submissions", "endpoint": "tcp:465"},
    {"role": "pop3", "endpoint": "tcp:110"},
    {"role": "pop3s", "endpoint": "tcp:995"},
    {"role": "imap", "endpoint": "tcp:143"},
    {"role": "imaps", "endpoint": "tcp:993"},
    {"role": "http", "endpoint": "tcp:9925:interface=127.0.0.1"},
)


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


# --- the whole file, and its [server] table ------------------------------------


def _default_hostname() -> str:
    """Our FQDN if the machine knows one, else a name that at least parses."""
    fqdn = socket.getfqdn()
    if "." in fqdn and _dns_name_problem(fqdn) is None:
        return fqdn
    return FALLBACK_HOSTNAME


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
    spam_table = _Table(root.take("spam", {}), "spam", errors)
    log_table = _Table(root.take("log", {}), "log", errors)
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
    min_free_space = server.integer("min_free_space", 100 * 1024 * 1024, 0)
    user = server.string("user", "")
    if user:
        try:
            pwd.getpwnam(user)
        except KeyError:
            server.error("user", f"{_describe(user)}: no such user on this system")
            user = None
    server.finish()

    tls = _tls(tls_table, data_dir, hostname)
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
    spam = _spam(spam_table)
    log_format = _log(log_table)
    _acme_listeners(config_tls=tls, listeners=listeners, errors=errors)
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
        spam=spam,
        min_free_space=min_free_space,
        log_format=log_format,
    )


def _acme_listeners(*, config_tls, listeners, errors: list[str]) -> None:
    """ACME needs a listener the CA can reach for its challenges (RFC 8555 §8)."""
    if config_tls is None or not config_tls.acme:
        return
    if not any(listener.role in (ROLE_ACME_HTTP, ROLE_ACME_TLS) for listener in listeners):
        errors.append(f'tls.acme: needs a [[listeners]] entry with role "{ROLE_ACME_HTTP}" (port 80, HTTP-01) '
                      f'or "{ROLE_ACME_TLS}" (TLS-ALPN-01, RFC 8737)')


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
    # load() does not see that a certificate and key do not match; unchecked, such a pair
    # passed here and then failed every handshake.
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
    spam = config.spam
    if spam.rspamd_url or spam.screens:
        parts = [f"rspamd {spam.rspamd_url}" if spam.rspamd_url else "no rspamd"]
        if spam.controller_url and spam.learn:
            parts.append(f"learning via {spam.controller_url}")
        if spam.dnsbl_sites:
            parts.append(f"{len(spam.dnsbl_sites)} DNSBL site(s), threshold {spam.dnsbl_threshold}")
        if spam.pregreet_wait:
            parts.append(f"pregreet {spam.pregreet_wait:g} s")
        print("spam: " + ", ".join(parts))
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
