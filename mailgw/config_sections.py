"""The parsers of the sections of the configuration, for `mailgw.config`.

One function per table ([tls], [smtp], [queue], [pop3], [imap], [routing], [quota],
[dns], [dkim], [checks], [spam]) and one for the [[listeners]] array. Each records every
problem in its table's error list and returns the frozen section, or None when
anything was wrong. The defaults of their keys are here; `mailgw/default.toml`
spells out the same values, and a test keeps the two in agreement.
"""
from __future__ import annotations

import ipaddress
import math
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mailgw.config_table import _absolute, _address_problem, _describe, _dns_name_problem, _network, _Table
from mailgw.config_types import (
    ALL_ROLES,
    BARE_NEWLINE_MODES,
    IMPLICIT_TLS_ROLES,
    ROLE_ACME_TLS,
    OUTBOUND_TLS_MODES,
    TLS_OPPORTUNISTIC,
    ChecksConfig,
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
    SpamConfig,
    TLSConfig,
)
from mailgw.spam.dnsbl import parse_site

LOG_FORMATS = ("text", "json")

# [tls] min_version
TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")

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

# [[listeners]] name
_LISTENER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


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


ON_RSPAMD_FAILURE = ("accept", "defer")


def _http_url_problem(url: str) -> str | None:
    try:
        parts = urlsplit(url)
        parts.port                  # noqa: B018 - raises on a bad port
    except ValueError as error:
        return f"not a URL ({error})"
    if parts.scheme not in ("http", "https"):
        return 'must start with "http://" or "https://"'
    if not parts.hostname:
        return "must name a host, e.g. http://127.0.0.1:11333"
    if parts.query or parts.fragment or parts.username:
        return "must not carry a query, fragment or user name"
    return None


def _spam(table: _Table) -> SpamConfig | None:
    urls = {}
    for key in ("rspamd_url", "controller_url"):
        url = table.string(key, "")
        if url and (problem := _http_url_problem(url)):
            table.error(key, f"{_describe(url)}: {problem}")
            url = None
        urls[key] = url.rstrip("/") if url else url
    password = table.string("password", "")
    timeout = table.seconds("timeout", 15.0, 0.1)
    on_failure = table.string("on_failure", "accept")
    if on_failure is not None and on_failure not in ON_RSPAMD_FAILURE:
        table.error("on_failure", f'must be one of {", ".join(ON_RSPAMD_FAILURE)}, got {_describe(on_failure)}')
        on_failure = None
    scan_outbound = table.boolean("scan_outbound", False)
    max_scan_size = table.integer("max_scan_size", 20 * 1024 * 1024, 1024)
    junk = table.string("junk_folder", "Junk")
    if junk is not None and (not junk or "/" in junk or junk.startswith(".")):
        table.error("junk_folder", f"{_describe(junk)}: must be a folder name such as Junk")
        junk = None
    subject_tag = table.string("subject_tag", "")
    # RFC 5322 §2.2: a header field is ASCII (the tag goes in front of the raw Subject: value).
    if subject_tag and not (subject_tag.isascii() and subject_tag.isprintable()):
        table.error("subject_tag", f"{_describe(subject_tag)}: must be printable ASCII such as \"[SPAM] \"")
        subject_tag = None
    learn = table.boolean("learn", True)
    learn_concurrency = table.integer("learn_concurrency", 2, 1, 64)
    learn_backlog = table.integer("learn_backlog", 10000, 1)
    site_texts = table.string_list("dnsbl_sites", ())
    sites = []
    for index, text in enumerate(site_texts or ()):
        try:
            sites.append(parse_site(text))
        except ValueError as error:
            table.error(f"dnsbl_sites[{index}]", f"{_describe(text)}: {error}")
    threshold = table.integer("dnsbl_threshold", 1, 1)
    budget = table.seconds("dnsbl_budget", 3.0, 0.1)
    allow_texts = table.string_list("allow_networks", ())
    allow = [_network(text, f"allow_networks[{index}]", table) for index, text in enumerate(allow_texts or ())]
    pregreet_wait = table.seconds("pregreet_wait", 0.0, 0.0)
    pass_ttl = table.seconds("pregreet_pass_ttl", 86400.0, 0.0)
    table.finish()
    values = (urls["rspamd_url"], urls["controller_url"], password, timeout, on_failure, scan_outbound,
              max_scan_size, junk, subject_tag, learn, learn_concurrency, learn_backlog)
    screen = (threshold, budget, pregreet_wait, pass_ttl)
    if None in values or None in screen or site_texts is None or len(sites) != len(site_texts) \
            or allow_texts is None or None in allow:
        return None
    return SpamConfig(*values, tuple(sites), threshold, budget, tuple(allow), pregreet_wait, pass_ttl)


# Let's Encrypt's production directory (RFC 8555 §7.1.1).
DEFAULT_ACME_DIRECTORY = "https://acme-v02.api.letsencrypt.org/directory"


def _tls(table: _Table, data_dir: Path | None, hostname: str | None) -> TLSConfig | None:
    certificate_text = table.path_text("certificate", "")
    private_key_text = table.path_text("private_key", "")
    min_version = table.string("min_version", "TLSv1.2")
    if min_version is not None and min_version not in TLS_VERSIONS:
        table.error("min_version", f'must be "TLSv1.2" or "TLSv1.3", got {_describe(min_version)}')
        min_version = None
    check_interval = table.seconds("check_interval", 30.0, 1.0)
    acme = _acme(table, hostname)
    table.finish()
    if certificate_text is None or private_key_text is None or check_interval is None or acme is None:
        return None
    extra = dict(check_interval=check_interval, **acme)

    if acme["acme"]:
        if certificate_text or private_key_text:
            for key, text in (("certificate", certificate_text), ("private_key", private_key_text)):
                if text:
                    table.error(key, "must be empty with tls.acme = true: the ACME certificate lives in "
                                     "<data_dir>/acme/")
            return None
        if data_dir is None or min_version is None:
            return None
        # Until the first certificate arrives the listeners serve a self-signed one made here.
        return TLSConfig(certificate=data_dir / "acme" / "cert.pem", private_key=data_dir / "acme" / "key.pem",
                         generated=True, min_version=min_version, **extra)

    if certificate_text == "" and private_key_text == "":
        if data_dir is None or min_version is None:
            return None
        return TLSConfig(certificate=data_dir / "tls" / "cert.pem",
                         private_key=data_dir / "tls" / "key.pem",
                         generated=True, min_version=min_version, **extra)

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
                     generated=False, min_version=min_version, **extra)


def _acme(table: _Table, hostname: str | None) -> dict | None:
    """The [tls] acme* keys, as TLSConfig keyword arguments."""
    enabled = table.boolean("acme", False)
    contact = table.string("acme_contact", "")
    directory = table.string("acme_directory", DEFAULT_ACME_DIRECTORY)
    names = table.string_list("acme_names", ())
    ca_text = table.path_text("acme_ca_file", "")
    if None in (enabled, contact, directory, names, ca_text):
        return None
    ok = True
    if enabled:
        if not contact:
            table.error("acme_contact", "must be set with tls.acme = true: the CA writes there about "
                                        "expiring certificates and problems (RFC 8555 §7.3)")
            ok = False
        elif problem := _address_problem(contact.removeprefix("mailto:")):
            table.error("acme_contact", f"{_describe(contact)}: {problem}")
            ok = False
        if problem := _http_url_problem(directory):
            table.error("acme_directory", f"{_describe(directory)}: {problem}")
            ok = False
        elif not directory.startswith("https://"):
            table.error("acme_directory", f"{_describe(directory)}: RFC 8555 §6.1 requires https://")
            ok = False
    for index, name in enumerate(names):
        if problem := _dns_name_problem(name):
            table.error(f"acme_names[{index}]", f"{_describe(name)}: {problem}")
            ok = False
    ca_file = _absolute(ca_text) if ca_text else None
    if ca_file is not None and not ca_file.is_file():
        table.error("acme_ca_file", f"{ca_file}: no such file")
        ok = False
    if not ok:
        return None
    ordered = [hostname] if hostname else []
    ordered += [name.lower() for name in names if name.lower() not in ordered]
    return dict(acme=enabled, acme_contact=contact.removeprefix("mailto:"), acme_directory=directory,
                acme_names=tuple(ordered), acme_ca_file=ca_file)


def _log(table: _Table) -> str | None:
    """[log]: the log line format."""
    log_format = table.string("format", "text")
    if log_format is not None and log_format not in LOG_FORMATS:
        table.error("format", f'must be one of {", ".join(LOG_FORMATS)}, got {_describe(log_format)}')
        log_format = None
    table.finish()
    return log_format


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
    if (role in IMPLICIT_TLS_ROLES or role == ROLE_ACME_TLS) and kind not in ("tcp", "tcp6"):
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
