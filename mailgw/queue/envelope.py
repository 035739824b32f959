"""The relay spool's envelope: what `<ID>.env` holds (docs/spool-format.md §2).

`Envelope`, with its `EnvelopeClient` and one `EnvelopeRecipient` per RCPT, is
the typed form the spool, the queue runner, DSNs, `mailgw queue` and the
targets stage work with. `to_json()` / `from_json()` here are the only places
the on-disk key names are spelled; `encode()` / `decode()` add the file's
bytes (UTF-8 JSON on one line, then a newline).

Reading (`from_json`) validates exactly as the spool always has: the required
keys of docs/spool-format.md, each with its type (`_ENVELOPE_FIELDS`,
`_CLIENT_FIELDS`, `_RECIPIENT_FIELDS`); anything wrong is an EnvelopeError
(recovery moves such an entry to corrupt/). Writing (`encode`) checks what it
writes against the same tables, so nothing is written that reading refuses.

Nothing on disk is lost or reshaped by a read and a rewrite:

* keys this module does not know (a later release's optional keys) are kept
  in `extra` and written back, after the known ones;
* the optional keys (`hold`, `bounce_requested`, `delay_notice_sent`,
  per recipient `orig_to`) are None when absent and then stay absent;
  present, they keep their stored value (only its truth value is used);
* `history` and `last_reply` are the runner's and stay JSON values as stored
  (`HistoryRecord` builds and reads an attempt record).

Versions: `ENVELOPE_VERSION` is written. A reader of an older version is an
entry in `_UPGRADES` (old version -> function giving the next version's JSON
object); there is none yet, version 1 being the only one there has been. Any
other version is refused (docs/spool-format.md, versioning policy).
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from mailgw.queue.model import PENDING

ENVELOPE_VERSION = 1

_QUEUE_ID = re.compile(r"[0-9A-HJKMNP-TV-Z]{16}")   # Crockford base32, 16 digits (spool.new_queue_id)


def is_queue_id(text) -> bool:
    return isinstance(text, str) and _QUEUE_ID.fullmatch(text) is not None


class EnvelopeError(ValueError):
    """An envelope that does not follow docs/spool-format.md."""


# -- validation: the on-disk keys and their types ---------------------------------------

def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional_str(value) -> bool:
    return value is None or isinstance(value, str)


_ENVELOPE_FIELDS = {
    "version": lambda v: v == ENVELOPE_VERSION,
    "id": is_queue_id,
    "arrival": _is_number,
    "sender": lambda v: isinstance(v, str),
    "sender_utf8": lambda v: isinstance(v, bool),
    "body": lambda v: v in ("7BIT", "8BITMIME"),
    "size": lambda v: _is_int(v) and v >= 0,
    "envid": _optional_str,
    "ret": lambda v: v in ("FULL", "HDRS", None),
    "client": lambda v: isinstance(v, dict),
    "recipients": lambda v: isinstance(v, list) and len(v) > 0,
    "attempts": lambda v: _is_int(v) and v >= 0,
    "next_attempt": _is_number,
    "history": lambda v: isinstance(v, list),
}
_CLIENT_FIELDS = {
    "ip": lambda v: isinstance(v, str),
    "helo": _optional_str,
    "tls": lambda v: isinstance(v, bool),
    "auth": _optional_str,
    "listener": lambda v: isinstance(v, str),
}
_RECIPIENT_FIELDS = {
    "address": lambda v: isinstance(v, str),
    "orcpt": _optional_str,
    "notify": lambda v: v is None or (isinstance(v, list) and all(isinstance(n, str) for n in v)),
    "state": lambda v: isinstance(v, str),
    "attempts": lambda v: _is_int(v) and v >= 0,
    "last_reply": lambda v: True,  # the runner's business
}
# Optional keys (versioning policy: adding one keeps the version). Not validated:
# their truth value is what readers have always used.
_OPTIONAL_FLAGS = ("hold", "bounce_requested", "delay_notice_sent")
_OPTIONAL_RECIPIENT = ("orig_to",)

_ENVELOPE_KEYS = frozenset(_ENVELOPE_FIELDS) | frozenset(_OPTIONAL_FLAGS)
_CLIENT_KEYS = frozenset(_CLIENT_FIELDS)
_RECIPIENT_KEYS = frozenset(_RECIPIENT_FIELDS) | frozenset(_OPTIONAL_RECIPIENT)

# Older versions' readers: version -> its JSON object made into the next version's.
_UPGRADES: dict[int, Callable[[dict], dict]] = {}


def _check_fields(mapping, fields, where: str) -> None:
    if not isinstance(mapping, dict):
        raise EnvelopeError(f"{where}: not an object")
    for key, valid in fields.items():
        if key not in mapping:
            raise EnvelopeError(f"{where}: missing {key!r}")
        if not valid(mapping[key]):
            raise EnvelopeError(f"{where}: bad {key!r}: {mapping[key]!r}")


def check_json(value) -> None:
    """EnvelopeError unless `value` is a valid envelope JSON object of the
    current version. Unknown extra keys are allowed (readers ignore them)."""
    if not isinstance(value, dict):
        raise EnvelopeError("envelope: not an object")
    if value.get("version") != ENVELOPE_VERSION:
        raise EnvelopeError(f"unknown envelope version {value.get('version')!r}")
    _check_fields(value, _ENVELOPE_FIELDS, "envelope")
    _check_fields(value["client"], _CLIENT_FIELDS, "client")
    for index, recipient in enumerate(value["recipients"]):
        _check_fields(recipient, _RECIPIENT_FIELDS, f"recipient {index}")


def encode_json(value: dict) -> bytes:
    """The bytes of an `<ID>.env` holding the JSON object `value` (checked or
    not: see Envelope.encode)."""
    # allow_nan=False: NaN/Infinity are not JSON (RFC 8259 §6). One line, no
    # indent: with indent json.dumps falls back to its pure-Python encoder
    # (3x slower; `mailgw queue show` is the readable view).
    return json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8") + b"\n"


def _extra(value: dict, known: frozenset) -> dict:
    return {key: item for key, item in value.items() if key not in known}


def _copied(value, memo):
    """copy.deepcopy, without its cost for the scalars most values are."""
    return value if value is None or type(value) in (str, int, float, bool) else copy.deepcopy(value, memo)


def _add_extra(data: dict, extra: dict, known: frozenset) -> dict:
    for key, item in extra.items():
        if key not in known:         # a typed attribute is the truth for a known key
            data[key] = item
    return data


# -- the types ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class EnvelopeClient:
    """The SMTP session (or local submission) the message came from."""
    ip: str
    helo: str | None
    tls: bool
    auth: str | None                    # authenticated identity
    listener: str                       # listener name (config)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        return _add_extra({"ip": self.ip, "helo": self.helo, "tls": self.tls, "auth": self.auth,
                           "listener": self.listener}, self.extra, _CLIENT_KEYS)

    def __deepcopy__(self, memo):
        return self if not self.extra else EnvelopeClient(self.ip, self.helo, self.tls, self.auth, self.listener,
                                                          copy.deepcopy(self.extra, memo))

    @classmethod
    def from_json(cls, value) -> EnvelopeClient:
        _check_fields(value, _CLIENT_FIELDS, "client")
        return cls._from_checked(value)

    @classmethod
    def _from_checked(cls, value: dict) -> EnvelopeClient:
        return cls(value["ip"], value["helo"], value["tls"], value["auth"], value["listener"],
                   _extra(value, _CLIENT_KEYS))


@dataclass(slots=True)
class EnvelopeRecipient:
    """One RCPT TO and how far its delivery got."""
    address: str                        # the forward-path
    orcpt: str | None = None            # RFC 3461 ORCPT "addr-type;address", decoded
    notify: tuple[str, ...] | None = None   # RFC 3461 NOTIFY; None when not given
    state: str = PENDING                # model.PENDING / SENT / BOUNCED / EXPIRED
    attempts: int = 0
    last_reply: Any = None              # the last remote reply (the runner writes a str)
    orig_to: str | None = None          # what the client gave, when an alias/SRS led here; None: absent
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        if isinstance(self.notify, str):
            raise TypeError("notify must be a sequence of keywords, not a str")
        data = {"address": self.address, "orcpt": self.orcpt,
                "notify": None if self.notify is None else list(self.notify),
                "state": self.state, "attempts": self.attempts, "last_reply": self.last_reply}
        if self.orig_to is not None:
            data["orig_to"] = self.orig_to
        return _add_extra(data, self.extra, _RECIPIENT_KEYS)

    def __deepcopy__(self, memo):
        return EnvelopeRecipient(self.address, self.orcpt, self.notify, self.state, self.attempts,
                                 _copied(self.last_reply, memo), self.orig_to,
                                 copy.deepcopy(self.extra, memo) if self.extra else {})

    @classmethod
    def _from_checked(cls, value: dict) -> EnvelopeRecipient:
        notify = value["notify"]
        return cls(value["address"], value["orcpt"], None if notify is None else tuple(notify), value["state"],
                   value["attempts"], value["last_reply"], value.get("orig_to"), _extra(value, _RECIPIENT_KEYS))


@dataclass(slots=True, kw_only=True)
class Envelope:
    """One spool entry's envelope (docs/spool-format.md §2, "Envelope")."""
    version: ClassVar[int] = ENVELOPE_VERSION     # what to_json writes; from_json reads older ones up
    id: str                             # the queue id, also the file name
    arrival: float                      # unix time the message was accepted
    sender: str                         # MAIL FROM; "" for the null reverse-path
    sender_utf8: bool                   # SMTPUTF8 on MAIL FROM
    body: str                           # "7BIT" or "8BITMIME"
    size: int                           # octets of <ID>.msg
    envid: str | None = None            # RFC 3461 ENVID, xtext-decoded
    ret: str | None = None              # RFC 3461 RET: "FULL", "HDRS" or None
    client: EnvelopeClient
    recipients: list[EnvelopeRecipient]
    attempts: int = 0                   # delivery runs for the whole message
    next_attempt: float                 # unix time of the next run
    history: list = field(default_factory=list)   # attempt records (HistoryRecord.to_json()), newest last
    # Optional keys; None: absent from the file.
    hold: bool | None = None            # never tried until released
    bounce_requested: bool | None = None  # `mailgw queue bounce` offline: give up at the next start
    delay_notice_sent: bool | None = None  # the sender was told of the delay (once per message)
    extra: dict[str, Any] = field(default_factory=dict)   # keys of a later release, kept as read

    # -- the JSON object -------------------------------------------------------------------
    def to_json(self) -> dict:
        """The JSON object as stored, unchecked (see `encode`)."""
        data = {
            "version": ENVELOPE_VERSION,
            "id": self.id,
            "arrival": self.arrival,
            "sender": self.sender,
            "sender_utf8": self.sender_utf8,
            "body": self.body,
            "size": self.size,
            "envid": self.envid,
            "ret": self.ret,
            "client": self.client.to_json(),
            "recipients": [recipient.to_json() for recipient in self.recipients],
            "attempts": self.attempts,
            "next_attempt": self.next_attempt,
            "history": list(self.history),
        }
        if self.hold is not None:
            data["hold"] = self.hold
        if self.bounce_requested is not None:
            data["bounce_requested"] = self.bounce_requested
        if self.delay_notice_sent is not None:
            data["delay_notice_sent"] = self.delay_notice_sent
        return _add_extra(data, self.extra, _ENVELOPE_KEYS)

    @classmethod
    def from_json(cls, value) -> Envelope:
        """The Envelope of a JSON object of any version the spool reads;
        EnvelopeError if it is not one."""
        if not isinstance(value, dict):
            raise EnvelopeError("envelope: not an object")
        version = value.get("version")
        while version != ENVELOPE_VERSION:
            upgrade = _UPGRADES.get(version) if _is_int(version) else None
            if upgrade is None:
                raise EnvelopeError(f"unknown envelope version {version!r}")
            value = upgrade(value)
            version = value.get("version")
        check_json(value)
        return cls(
            id=value["id"], arrival=value["arrival"], sender=value["sender"], sender_utf8=value["sender_utf8"],
            body=value["body"], size=value["size"], envid=value["envid"], ret=value["ret"],
            client=EnvelopeClient._from_checked(value["client"]),
            recipients=[EnvelopeRecipient._from_checked(recipient) for recipient in value["recipients"]],
            attempts=value["attempts"], next_attempt=value["next_attempt"], history=list(value["history"]),
            hold=value.get("hold"), bounce_requested=value.get("bounce_requested"),
            delay_notice_sent=value.get("delay_notice_sent"), extra=_extra(value, _ENVELOPE_KEYS))

    def __deepcopy__(self, memo):
        # What the runner copies before it changes an envelope: field by field,
        # about as fast as the deep copy of the JSON object it replaces.
        return Envelope(
            id=self.id, arrival=self.arrival, sender=self.sender, sender_utf8=self.sender_utf8, body=self.body,
            size=self.size, envid=self.envid, ret=self.ret, client=copy.deepcopy(self.client, memo),
            recipients=[copy.deepcopy(recipient, memo) for recipient in self.recipients], attempts=self.attempts,
            next_attempt=self.next_attempt, history=copy.deepcopy(self.history, memo), hold=_copied(self.hold, memo),
            bounce_requested=_copied(self.bounce_requested, memo),
            delay_notice_sent=_copied(self.delay_notice_sent, memo),
            extra=copy.deepcopy(self.extra, memo) if self.extra else {})

    def checked_json(self) -> dict:
        """`to_json()`, validated as a reader would: EnvelopeError if it is not."""
        try:
            data = self.to_json()
        except (AttributeError, TypeError) as e:
            raise EnvelopeError(f"envelope: {e}") from None
        check_json(data)
        return data

    # -- the file ---------------------------------------------------------------------------
    def encode(self) -> bytes:
        """The `<ID>.env` file: EnvelopeError (a ValueError) if invalid, and
        ValueError for NaN or Infinity, which are not JSON (RFC 8259 §6)."""
        return encode_json(self.checked_json())

    @classmethod
    def decode(cls, data: bytes, queue_id: str) -> Envelope:
        """The Envelope in the bytes of `<queue_id>.env`; EnvelopeError if
        they are not one, or if it belongs to another id. Any layout (files
        written before 2026-11-22 are indented)."""
        try:
            value = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise EnvelopeError(f"not UTF-8 JSON: {e}") from None
        envelope = cls.from_json(value)
        if envelope.id != queue_id:
            raise EnvelopeError(f"id {envelope.id!r} does not match the file name")
        return envelope

    # -- helpers ----------------------------------------------------------------------------
    def pending(self) -> list[EnvelopeRecipient]:
        """The recipients still to be tried."""
        return [recipient for recipient in self.recipients if recipient.state == PENDING]


@dataclass(frozen=True, slots=True)
class HistoryResult:
    """One recipient's outcome in an attempt record."""
    address: str | None
    relay: str | None                   # "host[ip]:port" that answered, None if none did
    status: str | None                  # model.STATUS_* or "expired"
    dsn: str | None                     # RFC 3463 code
    reply: Any                          # the reply (the recipient's last_reply)

    def to_json(self) -> dict:
        return {"address": self.address, "relay": self.relay, "status": self.status, "dsn": self.dsn,
                "reply": self.reply}


@dataclass(frozen=True, slots=True)
class HistoryRecord:
    """One delivery run in `Envelope.history`. History is never validated
    (the runner writes it, people read it), so `from_json` is lenient."""
    time: Any                           # unix time of the run
    results: tuple = ()                 # HistoryResult, or an item of another shape as stored

    def to_json(self) -> dict:
        return {"time": self.time, "results": [result.to_json() if isinstance(result, HistoryResult) else result
                                                for result in self.results]}

    @classmethod
    def from_json(cls, value) -> HistoryRecord | None:
        """The record, or None if `value` is not an object with a "results"
        list; a result that is not an object stays as stored; a missing key is None."""
        if not (isinstance(value, dict) and isinstance(value.get("results"), list)):
            return None
        return cls(value.get("time"), tuple(
            HistoryResult(result.get("address"), result.get("relay"), result.get("status"), result.get("dsn"),
                          result.get("reply")) if isinstance(result, dict) else result
            for result in value["results"]))
