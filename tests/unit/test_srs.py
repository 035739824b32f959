"""mailgw.routing.srs: SRS0/SRS1 forward and reverse (libsrs2 format), and the secret file."""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from fuzzing import fuzz_settings
from mailgw.routing import srs as srs_module
from mailgw.routing.srs import SRS, SRSError, SecretFileError, load_secret

SECRET = b"0123456789abcdef0123456789abcdef"
DAY = 86400
START = 1_700_000_000.0            # day 19675; 19675 % 1024 == 219
REPO = Path(__file__).resolve().parents[2]
BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"


class FakeClock:
    def __init__(self, now: float = START):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance_days(self, days: float) -> None:
        self.now += days * DAY


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def srs(clock):
    return SRS(SECRET, "fwd.example", clock=clock)


def expected_hash(secret: bytes, *parts: str) -> str:
    """libsrs2's definition, written out independently."""
    digest = hmac.new(secret, "".join(parts).lower().encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()[:4]


def stamp_for(now: float) -> str:
    day = int(now // DAY) % 1024
    return BASE32[day // 32] + BASE32[day % 32]


def reason(srs: SRS, address: str) -> str:
    with pytest.raises(SRSError) as caught:
        srs.reverse(address)
    return caught.value.reason


# -- forward / reverse ----------------------------------------------------------


def test_round_trip_and_format(srs, clock):
    forwarded = srs.forward("Alice@Example.org")
    stamp = stamp_for(clock.now)
    hash_ = expected_hash(SECRET, stamp, "example.org", "alice")
    assert forwarded == f"SRS0={hash_}={stamp}=Example.org=Alice@fwd.example"
    assert srs.is_srs(forwarded.partition("@")[0])
    assert srs.reverse(forwarded) == "Alice@Example.org"
    assert srs.reverse(forwarded.partition("@")[0]) == "Alice@Example.org"   # a local part alone


def test_known_answers_from_another_implementation():
    # Made by pysrs 1.0.3 (the Python port of Mail::SRS, Guarded) with this
    # secret on day 20794 (stamp "J2"): the same addresses, byte for byte.
    clock = FakeClock(1796644800.0)
    ours = SRS(b"0123456789abcdef0123", "fwd.example", clock=clock)
    assert ours.forward("Alice@Example.org") == "SRS0=QSAg=J2=Example.org=Alice@fwd.example"
    assert ours.forward("bob.smith+tag@sub.example.com") == "SRS0=szIn=J2=sub.example.com=bob.smith+tag@fwd.example"
    srs0 = "SRS0=yYqa=J2=example.org=alice@first.example"
    assert ours.forward(srs0) == "SRS1=nys1=first.example==yYqa=J2=example.org=alice@fwd.example"
    assert ours.reverse("SRS1=nys1=first.example==yYqa=J2=example.org=alice@fwd.example") == srs0


@pytest.mark.parametrize("change", [str.upper, str.lower, str.swapcase])
def test_case_changed_address_still_reverses(srs, change):
    forwarded = srs.forward("bob.smith@example.org")
    assert srs.reverse(change(forwarded)).lower() == "bob.smith@example.org"


@pytest.mark.parametrize("separator", ["=", "+", "-"])
def test_separators_after_the_tag_are_accepted(srs, separator):
    forwarded = srs.forward("carol@example.org")
    assert srs.reverse("SRS0" + separator + forwarded[5:]) == "carol@example.org"


def test_forged_hash_refused(srs):
    forwarded = srs.forward("alice@example.org")
    hash_ = forwarded[5:9]
    forged = "AAAA" if hash_.lower() != "aaaa" else "BBBB"
    assert reason(srs, forwarded.replace(hash_, forged, 1)) == SRSError.BAD_HASH
    # the same address under another secret is not ours
    other = SRS(b"another secret, 16+ bytes", "fwd.example", clock=srs._clock)
    assert reason(other, forwarded) == SRSError.BAD_HASH


@pytest.mark.parametrize("old, new", [("=example.org=", "=evil.example="), ("=alice@", "=mallory@")])
def test_tampered_domain_or_local_refused(srs, old, new):
    forwarded = srs.forward("alice@example.org")
    assert reason(srs, forwarded.replace(old, new)) == SRSError.BAD_HASH


def test_tampered_timestamp_refused_as_forged(srs, clock):
    forwarded = srs.forward("alice@example.org")
    stamp = stamp_for(clock.now)
    other = stamp_for(clock.now - DAY)
    assert reason(srs, forwarded.replace(f"={stamp}=", f"={other}=")) == SRSError.BAD_HASH


def test_expiry(srs, clock):
    forwarded = srs.forward("alice@example.org")
    clock.advance_days(20)
    assert srs.reverse(forwarded) == "alice@example.org"
    clock.advance_days(1)                          # 21 days: still valid (libsrs2: now <= then + maxage)
    assert srs.reverse(forwarded) == "alice@example.org"
    clock.advance_days(1)                          # 22 days
    assert reason(srs, forwarded) == SRSError.EXPIRED


def test_expiry_a_forged_old_address_is_reported_as_forged(srs, clock):
    forwarded = srs.forward("alice@example.org")
    clock.advance_days(100)
    assert reason(srs, forwarded.replace("alice", "mallory")) == SRSError.BAD_HASH


def test_wrap_around_of_the_1024_day_cycle():
    clock = FakeClock((1024 * 20 + 1020) * DAY + 3600)     # day 1020 of a cycle
    srs = SRS(SECRET, "fwd.example", clock=clock)
    forwarded = srs.forward("alice@example.org")
    assert forwarded.split("=")[2] == BASE32[1020 // 32] + BASE32[1020 % 32]
    clock.advance_days(10)                                  # day 6 of the next cycle
    assert stamp_for(clock.now) == "AG"
    assert srs.reverse(forwarded) == "alice@example.org"
    clock.advance_days(12)                                  # 22 days
    assert reason(srs, forwarded) == SRSError.EXPIRED
    clock.advance_days(1024 - 22)                           # a whole cycle on: looks new again (libsrs2)
    assert srs.reverse(forwarded) == "alice@example.org"


def test_future_timestamp(clock):
    ahead = FakeClock(clock.now)
    made_ahead = SRS(SECRET, "fwd.example", clock=ahead)
    srs = SRS(SECRET, "fwd.example", clock=clock)
    ahead.advance_days(1)                                   # one day of slack for clocks that differ
    assert srs.reverse(made_ahead.forward("alice@example.org")) == "alice@example.org"
    ahead.advance_days(1)
    assert reason(srs, made_ahead.forward("alice@example.org")) == SRSError.FUTURE
    ahead.advance_days(3)
    assert reason(srs, made_ahead.forward("alice@example.org")) == SRSError.FUTURE


def test_future_across_the_cycle_boundary():
    clock = FakeClock(1024 * 20 * DAY + 3 * DAY)            # day 3 of a cycle
    srs = SRS(SECRET, "fwd.example", clock=clock)
    ahead = SRS(SECRET, "fwd.example", clock=FakeClock(clock.now + 10 * DAY))
    behind = SRS(SECRET, "fwd.example", clock=FakeClock(clock.now - 10 * DAY))   # day 1017 of the last one
    assert reason(srs, ahead.forward("alice@example.org")) == SRSError.FUTURE
    assert srs.reverse(behind.forward("alice@example.org")) == "alice@example.org"


def test_srs1_round_trip(clock):
    first = SRS(b"first forwarder's own secret", "first.example", clock=clock)
    ours = SRS(SECRET, "fwd.example", clock=clock)
    srs0 = first.forward("alice@example.org")
    srs1 = ours.forward(srs0)
    local0 = srs0.partition("@")[0]
    hash_ = expected_hash(SECRET, "first.example", local0[4:])
    assert srs1 == f"SRS1={hash_}=first.example={local0[4:]}@fwd.example"
    assert srs1.startswith("SRS1=") and "=first.example==" in srs1
    assert ours.reverse(srs1) == srs0                       # back to the first forwarder
    assert first.reverse(ours.reverse(srs1)) == "alice@example.org"
    assert ours.reverse(srs1.upper()).lower() == srs0.lower()
    clock.advance_days(100)                                 # SRS1 has no stamp: the first forwarder checks its own
    assert ours.reverse(srs1) == srs0


def test_srs1_from_another_forwarder_points_to_the_first(clock):
    first = SRS(b"first forwarder's own secret", "first.example", clock=clock)
    second = SRS(b"second forwarder's secret!", "second.example", clock=clock)
    ours = SRS(SECRET, "fwd.example", clock=clock)
    srs0 = first.forward("alice@example.org")
    srs1_second = second.forward(srs0)
    srs1_ours = ours.forward(srs1_second)
    assert "=first.example==" in srs1_ours and "second.example" not in srs1_ours
    assert len(srs1_ours) == len(srs1_second) - len("second") + len("fwd")   # no growth per hop
    assert ours.reverse(srs1_ours) == srs0


def test_srs0_with_other_separators_from_another_domain(clock):
    ours = SRS(SECRET, "fwd.example", clock=clock)
    sender = "srs0+HaSh=AB=example.org=alice@first.example"
    srs1 = ours.forward(sender)
    assert srs1.startswith("SRS1=") and "=first.example=+HaSh=" in srs1
    assert ours.reverse(srs1) == "SRS0+HaSh=AB=example.org=alice@first.example"


def test_srs1_tampered(clock):
    first = SRS(b"first forwarder's own secret", "first.example", clock=clock)
    ours = SRS(SECRET, "fwd.example", clock=clock)
    srs1 = ours.forward(first.forward("alice@example.org"))
    assert reason(ours, srs1.replace("first.example", "evil.example")) == SRSError.BAD_HASH
    assert reason(ours, srs1.replace("=alice@", "=mallory@")) == SRSError.BAD_HASH


def test_null_sender_untouched(srs):
    assert srs.forward("") == ""
    assert srs.needs_rewrite("", {"example.com"}) is False


def test_needs_rewrite(srs):
    local_domains = frozenset({"example.com", "fwd.example"})
    assert srs.needs_rewrite("alice@example.org", local_domains) is True
    assert srs.needs_rewrite("alice@EXAMPLE.com", local_domains) is False
    assert srs.needs_rewrite("alice@fwd.example", frozenset()) is False
    assert srs.needs_rewrite("nodomain", local_domains) is True         # and forward() refuses it


def test_sender_in_our_srs_domain_is_not_rewritten(srs, clock):
    own = srs.forward("alice@example.org")
    assert srs.forward(own) == own                          # libsrs2: same domain, no rewrite
    assert srs.forward("bob@FWD.example") == "bob@FWD.example"


@pytest.mark.parametrize("sender", [
    "nobody", "@example.org", "alice@", "alice bob@example.org", "a@@example.org",
    "alice@exa=mple.org", "alice@exa mple.org", ".alice@example.org", "a..b@example.org",
    "alice\r\n@example.org", '"unterminated@example.org', "alice@example.org\n",
])
def test_forward_rejects_senders_that_are_not_local_at_domain(srs, sender):
    with pytest.raises(ValueError):
        srs.forward(sender)


def test_quoted_local_part(srs):
    sender = '"john \\"j\\" doe"@example.org'
    forwarded = srs.forward(sender)
    assert forwarded.startswith('"SRS0=') and forwarded.endswith('=john \\"j\\" doe"@fwd.example')
    assert srs.is_srs(forwarded.rpartition("@")[0])
    assert srs.reverse(forwarded) == sender
    # a quoted Dot-string comes back unquoted: the same mailbox (RFC 5321 §4.1.2)
    assert srs.reverse(srs.forward('"john"@example.org')) == "john@example.org"


def test_address_literal_domain(srs):
    forwarded = srs.forward("alice@[192.0.2.1]")
    assert forwarded.startswith('"SRS0=')                   # "[" is not atext: quoted
    assert srs.reverse(forwarded) == "alice@[192.0.2.1]"


def test_local_part_over_64_octets_is_still_produced(srs):
    sender = "a-rather-long-local-part.of-forty-octets@subdomain.example.org"
    forwarded = srs.forward(sender)
    assert len(forwarded.partition("@")[0].encode()) > srs_module.MAX_LOCAL_PART
    assert srs.reverse(forwarded) == sender


def test_utf8_local_part(srs):
    sender = "jürgen@example.org"
    forwarded = srs.forward(sender)
    assert forwarded.endswith("=jürgen@fwd.example")
    assert srs.reverse(forwarded) == sender


@pytest.mark.parametrize("local, expected", [
    ("SRS0=abcd=AB=example.org=alice", True), ("srs0+abcd", True), ("SRS1-x", True), ("srs1=", True),
    ('"SRS0=abcd=AB=d=john doe"', True),
    ("srs1999", False), ("srs", False), ("SRS0", False), ("alice", False), ("", False), ("xSRS0=a", False),
    ("\u017fRS0=abcd=AB=example.org=alice", False),
])
def test_is_srs(srs, local, expected):
    assert srs.is_srs(local) is expected


def test_not_srs(srs):
    assert reason(srs, "alice@fwd.example") == SRSError.NOT_SRS
    assert reason(srs, "srs1999@fwd.example") == SRSError.NOT_SRS


@pytest.mark.parametrize("local", [
    "SRS0=", "SRS0=abcd", "SRS0=abcd=", "SRS0=abcd=AB", "SRS0=abcd=AB=", "SRS0=abcd=AB=example.org",
    "SRS0=abcd=AB=example.org=", "SRS0==AB=example.org=alice", "SRS0=abcd==example.org=alice",
    "SRS0=abcd=AB==alice", "SRS0=abcd=A1=example.org=alice", "SRS0=abcd=ABC=example.org=alice",
    "SRS0=abcd=A=example.org=alice", "SRS0=abc=AB=example.org=alice", "SRS0=abcde=AB=example.org=alice",
    "SRS0=abcd=Aß=example.org=alice",
    "SRS1=", "SRS1=abcd", "SRS1=abcd=", "SRS1=abcd=first.example", "SRS1=abcd=first.example=",
    "SRS1==first.example==abcd=AB=d=l", "SRS1=abcd==x",
])
def test_malformed(srs, local):
    assert reason(srs, local + "@fwd.example") == SRSError.MALFORMED


def test_error_text_names_the_reason(srs):
    with pytest.raises(SRSError, match="^malformed: "):
        srs.reverse("SRS0=abcd@fwd.example")
    assert isinstance(SRSError(SRSError.EXPIRED, "x"), ValueError)


def test_the_injected_clock_is_the_only_time_source(srs, clock, monkeypatch):
    def no_time():
        raise AssertionError("time.time() called")
    monkeypatch.setattr(time, "time", no_time)
    forwarded = srs.forward("alice@example.org")
    clock.advance_days(22)
    assert reason(srs, forwarded) == SRSError.EXPIRED


def test_constructor_checks(clock):
    with pytest.raises(ValueError):
        SRS(b"short", "fwd.example", clock=clock)
    with pytest.raises(ValueError):
        SRS(SECRET, "", clock=clock)
    with pytest.raises(ValueError):
        SRS(SECRET, "fwd.example", clock=clock, max_age_days=0)
    with pytest.raises(ValueError):
        SRS(SECRET, "fwd.example", clock=clock, max_age_days=600)
    assert SRS(SECRET, "FWD.Example", clock=clock).domain == "fwd.example"


# -- properties -------------------------------------------------------------------

_SRSISH = st.text(alphabet="SRS01srs=+-@abAB27.\"\\ ß\u017f", max_size=40)


@fuzz_settings(300)
@given(st.one_of(
    st.text(),
    _SRSISH,
    st.builds(lambda tag, rest: tag + rest, st.sampled_from(["SRS0=", "srs1+", "SRS1-", "SRS0-", '"SRS0=']), _SRSISH),
))
def test_reverse_raises_only_srserror(text):
    srs = SRS(SECRET, "fwd.example", clock=FakeClock())
    try:
        result = srs.reverse(text)
    except SRSError as error:
        assert error.reason in (SRSError.NOT_SRS, SRSError.MALFORMED, SRSError.BAD_HASH,
                                SRSError.EXPIRED, SRSError.FUTURE)
    else:
        assert isinstance(result, str)


@fuzz_settings(300)
@given(st.text())
def test_forward_raises_only_valueerror(text):
    srs = SRS(SECRET, "fwd.example", clock=FakeClock())
    try:
        result = srs.forward(text)
    except ValueError:
        return
    assert isinstance(result, str)


_ATOM = st.text(alphabet="abcXYZ019!#$%&'*+-/=?^_`{|}~ü", min_size=1, max_size=12)
_DOT_STRING = st.lists(_ATOM, min_size=1, max_size=4).map(".".join)
_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
_DOMAIN = st.lists(_LABEL, min_size=1, max_size=4).map(".".join)


@fuzz_settings(200)
@given(_DOT_STRING, _DOMAIN, st.integers(min_value=0, max_value=21 * DAY))
def test_round_trip_property(local, domain, later):
    clock = FakeClock()
    srs = SRS(SECRET, "fwd.example", clock=clock)
    sender = f"{local}@{domain}"
    forwarded = srs.forward(sender)
    clock.now += later - (START % DAY)                      # up to 21 whole days after the stamp's day
    assert srs.reverse(forwarded) == sender


@fuzz_settings(200)
@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e)))
def test_quote_unquote_property(text):
    assert srs_module._unquote(srs_module._quote(text)) == text


@fuzz_settings(200)
@given(st.data())
def test_one_changed_character_is_refused_or_the_same_mailbox(data):
    srs = SRS(SECRET, "fwd.example", clock=FakeClock())
    forwarded = srs.forward("alice@example.org")
    local = forwarded.partition("@")[0]
    index = data.draw(st.integers(min_value=0, max_value=len(local) - 1))
    char = data.draw(st.sampled_from("aZ09=+-/.x@\""))
    mutated = local[:index] + char + local[index + 1:]
    try:
        result = srs.reverse(mutated)
    except SRSError:
        return
    assert result.lower() == "alice@example.org"            # a case or separator change only


# -- the secret file ---------------------------------------------------------------


def test_load_secret_creates_once(tmp_path):
    secret = load_secret(tmp_path)
    path = tmp_path / "srs.secret"
    assert len(secret) == 32
    assert path.read_bytes() == secret
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_secret(tmp_path) == secret
    assert sorted(p.name for p in tmp_path.iterdir()) == ["srs.secret"]    # no temporary file left


def test_load_secret_mode_0600_whatever_the_umask(tmp_path):
    old = os.umask(0o277)
    try:
        load_secret(tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "srs.secret").stat().st_mode) == 0o600


def test_load_secret_keeps_an_existing_file(tmp_path):
    (tmp_path / "srs.secret").write_bytes(b"s" * 16)
    assert load_secret(tmp_path) == b"s" * 16


def test_load_secret_concurrent_creation_the_first_file_wins(tmp_path, monkeypatch):
    winner = b"W" * 32
    real_move = srs_module._move_noreplace

    def other_process_first(source, destination):
        Path(destination).write_bytes(winner)             # another process named its file first
        real_move(source, destination)

    monkeypatch.setattr(srs_module, "_move_noreplace", other_process_first)
    assert load_secret(tmp_path) == winner
    assert (tmp_path / "srs.secret").read_bytes() == winner
    assert sorted(p.name for p in tmp_path.iterdir()) == ["srs.secret"]


def test_load_secret_processes_starting_together_agree(tmp_path):
    code = ("import sys; from pathlib import Path; from mailgw.routing.srs import load_secret; "
            "sys.stdin.read(); print(load_secret(Path(sys.argv[1])).hex())")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    processes = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO)
                 for _ in range(6)]
    for process in processes:                                 # all released at once
        process.stdin.close()
    outputs = []
    for process in processes:
        out = process.stdout.read().decode()
        assert process.wait(timeout=60) == 0, out
        outputs.append(out.strip())
    assert len(set(outputs)) == 1
    assert bytes.fromhex(outputs[0]) == (tmp_path / "srs.secret").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["srs.secret"]


@pytest.mark.parametrize("content", [b"", b"x" * 15])
def test_load_secret_too_short(tmp_path, content):
    (tmp_path / "srs.secret").write_bytes(content)
    with pytest.raises(SecretFileError, match=re.escape(f"is {len(content)} bytes, at least 16")):
        load_secret(tmp_path)
    assert (tmp_path / "srs.secret").read_bytes() == content          # never replaced behind the admin's back


def test_load_secret_unreadable(tmp_path):
    (tmp_path / "srs.secret").mkdir()
    with pytest.raises(SecretFileError, match="cannot read the SRS secret"):
        load_secret(tmp_path)


def test_load_secret_missing_directory(tmp_path):
    with pytest.raises(SecretFileError, match="cannot make the SRS secret"):
        load_secret(tmp_path / "missing")
