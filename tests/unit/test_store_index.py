"""The index file format (mailgw.store.index, docs/store-format.md §4)."""
from __future__ import annotations

import errno
import fcntl
import os
import zlib

import pytest

from mailgw.errors import StorageFull
from mailgw.store import index as ix
from mailgw.store.folder import crlf_size, split_flags, to_crlf
from mailgw.store.maildir_name import make_name, parse_name

try:
    from test_durable import RecordingOS
except ImportError:  # pragma: no cover
    from tests.unit.test_durable import RecordingOS


def sample() -> ix.Index:
    return ix.Index(
        uidvalidity=1_700_000_000, uidnext=42, generation=7, keywords=["$Forwarded", "Work"],
        entries=[
            ix.Entry(1, 1_699_999_999.25, 1234, 0, "1699999999.M1P2Q3.mx,S=1200,W=1234,U=1:2,S"),
            ix.Entry(5, 1_700_000_000.0, 10, 0b11, "odd name with spaces and 100%:2,"),
            ix.Entry(9, 1_700_000_001.5, 7, 0b10, "non-utf8-\udcff\n-newline:2,FS"),
            ix.Entry(41, 1_700_000_002.0, 0, 0, "Entwürfe,W=0,U=41:2,"),
        ],
    )


def test_round_trip():
    data = ix.format_index(sample())
    assert data.startswith(b"mailgw-index 1 uidvalidity=1700000000 uidnext=42 generation=7 keywords=2 messages=4 crc32=")
    assert data.isascii() and data.count(b"\n") == 1 + 2 + 4
    assert ix.parse_index(data) == sample()


def test_empty_index_round_trips():
    empty = ix.Index(uidvalidity=3, uidnext=1, generation=1)
    assert ix.parse_index(ix.format_index(empty)) == empty


def test_every_truncation_is_detected():
    data = ix.format_index(sample())
    for length in range(len(data)):
        with pytest.raises(ix.IndexCorrupt):
            ix.parse_index(data[:length])


def test_every_single_bit_flip_is_detected():
    data = ix.format_index(sample())
    for position in range(len(data)):
        damaged = bytearray(data)
        damaged[position] ^= 0x01
        with pytest.raises(ix.IndexCorrupt):
            ix.parse_index(bytes(damaged))


def reseal(text: str) -> bytes:
    """A hand-made index with a correct checksum (to test the strict parser behind it)."""
    head, body = text.split("\n", 1)
    head = head.encode()
    body = body.encode()
    return head + f" crc32={zlib.crc32(body, zlib.crc32(head)):08x}\n".encode() + body


@pytest.mark.parametrize("text", [
    "mailgw-index 2 uidvalidity=1 uidnext=2 generation=1 keywords=0 messages=0\n",       # unknown version
    "mailgw-index 1 uidvalidity=0 uidnext=2 generation=1 keywords=0 messages=0\n",       # uidvalidity 0
    "mailgw-index 1 uidvalidity=1 uidnext=2 generation=1 keywords=0 messages=2\nm 1 1.0 1 0 a\n",  # count
    "mailgw-index 1 uidvalidity=1 uidnext=3 generation=1 keywords=0 messages=2\nm 2 1.0 1 0 a\nm 1 1.0 1 0 b\n",
    "mailgw-index 1 uidvalidity=1 uidnext=3 generation=1 keywords=0 messages=2\nm 1 1.0 1 0 a\nm 1 1.0 1 0 b\n",
    "mailgw-index 1 uidvalidity=1 uidnext=3 generation=1 keywords=0 messages=2\nm 1 1.0 1 0 a\nm 2 1.0 1 0 a\n",
    "mailgw-index 1 uidvalidity=1 uidnext=2 generation=1 keywords=0 messages=1\nm 2 1.0 1 0 a\n",  # uid >= uidnext
    "mailgw-index 1 uidvalidity=1 uidnext=2 generation=1 keywords=1 messages=1\nk A\nm 1 1.0 1 2 a\n",  # mask
    "mailgw-index 1 uidvalidity=1 uidnext=2 generation=1 keywords=2 messages=0\nk A\nk a\n",  # duplicate keyword
    "mailgw-index 1 uidvalidity=1 uidnext=2 generation=1 keywords=1 messages=0\nk a(b\n",    # not an atom
    "mailgw-index 1 uidvalidity=1 uidnext=2 generation=1 keywords=0 messages=1\nm 1 nan 1 0 a\n",
    "mailgw-index 1 uidvalidity=1 uidnext=2 generation=1 keywords=0 messages=1\nm 1 1.0 -1 0 a\n",
    "mailgw-index 1 uidvalidity=1 uidnext=2 generation=1 keywords=0 messages=1\nm 1 1.0 1 0 a b\n",
    "mailgw-index 1 uidvalidity=1 uidnext=2 generation=1 keywords=0 messages=1\nm 1 1.0 1 0 a%2Fb\n",  # "/"
    "mailgw-index 1 uidvalidity=1 uidnext=2 generation=1 keywords=0 messages=1\nm 1 1.0 1 0 a%00b\n",  # NUL
    "mailgw-index 1 uidvalidity=1 uidnext=2 generation=1 keywords=0 messages=1\nx 1 1.0 1 0 a\n",
])
def test_strict_parsing(text):
    with pytest.raises(ix.IndexCorrupt):
        ix.parse_index(reseal(text))


def test_read_generation(tmp_path):
    path = tmp_path / ix.INDEX_NAME
    assert ix.read_generation(path) is None
    path.write_bytes(ix.format_index(sample()))
    assert ix.read_generation(path) == 7
    path.write_bytes(b"garbage\n")
    assert ix.read_generation(path) is None


def test_uidvalidity_file():
    data = ix.format_uidvalidity(1_700_000_000, 2048)
    assert data == b"mailgw-uidvalidity 1 1700000000 2048\n"
    assert ix.parse_uidvalidity(data) == (1_700_000_000, 2048)
    for bad in (b"", b"mailgw-uidvalidity 1 0 5\n", b"mailgw-uidvalidity 2 1 5\n", data[:-1], b"x" + data):
        with pytest.raises(ix.IndexCorrupt):
            ix.parse_uidvalidity(bad)


def test_keywords_are_imap_atoms():
    for good in ("$Forwarded", "NonJunk", "a.b-c_d+e", "x" * ix.MAX_KEYWORD_LENGTH, "[bracket", "~!#&'"):
        assert ix.valid_keyword(good), good
    for bad in ("", "two words", "par(en", "br{ace", "per%cent", "st*r", 'q"uote', "back\\slash", "brack]",
                "tab\t", "ü", "x" * (ix.MAX_KEYWORD_LENGTH + 1), None):
        assert not ix.valid_keyword(bad), bad


def test_flags_split_into_letters_and_keywords():
    assert split_flags(["\\seen", "\\DELETED", "Work", "work", "$x"]) == (frozenset("ST"), ("Work", "$x"))
    assert split_flags("\\Draft") == (frozenset("D"), ())
    for bad in (["\\Recent"], ["\\*"], ["a b"], [None]):
        with pytest.raises(ValueError):
            split_flags(bad)


def test_file_names():
    assert parse_name("1700.M1P2Q3.mx,S=10,W=12") == ("1700.M1P2Q3.mx,S=10,W=12", None, 12, "")
    assert parse_name("1700.M1P2Q3.mx,S=10,W=12,U=7:2,FS") == ("1700.M1P2Q3.mx,S=10,W=12", 7, 12, "FS")
    assert parse_name("plain:2,") == ("plain", None, None, "")
    assert parse_name("exp:1,whatever") == ("exp", None, None, "")
    assert parse_name("a,U=x,W=,U=3:2,S") == ("a,U=x,W=", 3, None, "S")
    assert make_name("1700.M1P2Q3.mx,S=10,W=12", 7, "FS") == "1700.M1P2Q3.mx,S=10,W=12,U=7:2,FS"


def test_crlf_size_matches_to_crlf():
    for data in (b"", b"a", b"a\n", b"a\r\n", b"a\r\r\nb\rc\n\n", b"\n" * 5, b"x\r"):
        assert crlf_size(data) == len(to_crlf(data))
        assert b"\n" not in to_crlf(data).replace(b"\r\n", b"")


def test_write_atomic_replaces(tmp_path):
    ix.write_atomic(RecordingOS(), tmp_path, "f", b"one")
    ix.write_atomic(RecordingOS(), tmp_path, "f", b"two")
    assert (tmp_path / "f").read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


@pytest.mark.parametrize("step", ["open", "write", "fsync", "rename"])
def test_enospc_leaves_the_old_file_intact(tmp_path, step):
    (tmp_path / "f").write_bytes(b"old")
    (tmp_path / "f.tmp").write_bytes(b"left over by a crash")
    osc = RecordingOS()
    osc.fail(step, match=lambda p: p.name.startswith("f"))
    with pytest.raises(StorageFull):
        ix.write_atomic(osc, tmp_path, "f", b"new" * 1000)
    assert (tmp_path / "f").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_other_errors_are_raised_as_they_are(tmp_path):
    osc = RecordingOS()
    osc.fail("write", err=errno.EIO)
    with pytest.raises(OSError) as caught:
        ix.write_atomic(osc, tmp_path, "f", b"x")
    assert caught.value.errno == errno.EIO and not (tmp_path / "f.tmp").exists()


def test_the_lock_excludes_other_open_files(tmp_path):
    path = tmp_path / ix.LOCK_NAME
    with ix.locked(path):
        fd = os.open(path, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released
    finally:
        os.close(fd)


def test_uidvalidity_allocation_always_increases(tmp_path):
    values = [ix.allocate_uidvalidity(RecordingOS(), tmp_path) for _ in range(5)]
    assert values == sorted(set(values)) and len(values) == 5
    (tmp_path / ix.NEXT_UIDVALIDITY_NAME).write_bytes(b"mailgw-next-uidvalidity 1 4000000000\n")
    assert ix.allocate_uidvalidity(RecordingOS(), tmp_path) == 4_000_000_000
