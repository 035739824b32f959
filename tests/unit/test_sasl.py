"""The SASL PLAIN rules every protocol shares (RFC 4616 §2, RFC 4954 §4)."""
import base64

import pytest

from mailgw.auth import sasl


def test_equals_sign_is_an_empty_response():
    assert sasl.decode_response(b"=") == b""


@pytest.mark.parametrize("encoded", [b"!!!", b"YWJj ZA==", b"YWJ", b"YWJjZA==\n"])
def test_only_strict_base64(encoded):
    with pytest.raises(sasl.BadEncoding):
        sasl.decode_response(encoded)


def test_plain_with_and_without_authzid():
    assert sasl.parse_plain(b"\0alice@example.test\0pw") == (b"alice@example.test", b"pw")
    assert sasl.parse_plain(b"Alice@Example.Test\0alice@example.test\0pw") == (b"alice@example.test", b"pw")
    assert sasl.decode_response(base64.b64encode(b"\0a\0b")) == b"\0a\0b"


@pytest.mark.parametrize("decoded", [b"", b"alice\0pw", b"a\0b\0c\0d"])
def test_malformed_plain(decoded):
    with pytest.raises(sasl.MalformedPlain):
        sasl.parse_plain(decoded)


def test_acting_as_another_user_is_refused():
    with pytest.raises(sasl.ForeignIdentity) as refused:
        sasl.parse_plain(b"bob@example.test\0alice@example.test\0pw")
    assert refused.value.authcid == b"alice@example.test"
