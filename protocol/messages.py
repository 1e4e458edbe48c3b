"""Control-stream messages and the data-stream ``close`` map (``docs/protocol.md``
sections 2 and 3).

Messages are attrs value classes. :func:`encode` turns one into msgpack bytes;
:func:`decode` validates a decoded msgpack map strictly (types, ranges, sizes)
and returns the message, or ``None`` for an unknown ``t`` so that the protocol
can grow additively.
"""

from __future__ import annotations

from typing import Any

import attrs
import msgpack

from protocol.addresses import MAX_ADDR_LEN as MAX_ADDR_LEN  # re-exported
from protocol.addresses import parse_address
from protocol.codes import CloseCode, DialFailCode
from protocol.errors import InvalidMessage, MessageTooLarge

#: Largest encoded control message, and largest ``close`` map (``docs/protocol.md``
#: section 2, "Control messages").
MAX_MESSAGE_SIZE = 64 * 1024
#: Largest ``early`` payload that rides inside a ``dial`` message.
MAX_EARLY_DATA = 32 * 1024
MAX_TEXT_LEN = 4096
MAX_U64 = 2**64 - 1
MAX_TIMEOUT_MS = 3_600_000


def _check_addr(_inst: object, _attr: object, value: str) -> None:
    if not isinstance(value, str) or len(value) > MAX_TEXT_LEN:
        raise InvalidMessage("dial address must be a string of at most 4096 characters")


@attrs.frozen
class Dial:
    """``addr`` is only checked for type and size here, so a malformed one
    reaches the agent as a dial it answers with ``dial_fail`` ``bad_address``
    rather than as a connection-level error that would end every tunnel of
    the link. Both ends validate it with :func:`protocol.addresses.parse_address`
    (the broker before routing, the agent before resolving)."""

    id: int
    addr: str = attrs.field(validator=_check_addr)
    timeout_ms: int
    proto: str = "tcp"
    early: bytes | None = None


@attrs.frozen
class Cancel:
    id: int


@attrs.frozen
class Drain:
    """B→A with ``retry_ms``: reconnect within that window. A→B without it."""

    retry_ms: int | None = None


@attrs.frozen
class Replaced:
    """B→A just before the broker closes this connection: another connection
    with the same agent id and credential took its place (docs/protocol.md,
    2. The control stream). ``instance`` and ``remote``: the newcomer's
    instance id ("" if it sent none) and address."""

    instance: str = ""
    remote: str = ""


@attrs.frozen
class DialFail:
    id: int
    code: DialFailCode
    msg: str = ""


@attrs.frozen
class Identifiers:
    value: str


@attrs.frozen
class Close:
    """Reason for an error close of a data stream; END_STREAM follows it."""

    code: CloseCode
    msg: str = ""


Message = Dial | Cancel | Drain | DialFail | Identifiers | Replaced


def split_host_port(addr: str) -> tuple[str, int]:
    """Split and validate ``host:port`` or ``[v6]:port``.

    Raises :class:`protocol.addresses.BadAddress` (an InvalidMessage) if
    malformed; see :func:`protocol.addresses.parse_address` for the rules.
    """
    parsed = parse_address(addr)
    return parsed.host, parsed.port


def encode(msg: Message | Close) -> bytes:
    """Encode one message as a msgpack map; refuse anything over the limit."""
    body: dict[str, Any]
    if isinstance(msg, Dial):
        body = {"t": "dial", "id": msg.id, "proto": msg.proto, "addr": msg.addr}
        body["timeout_ms"] = msg.timeout_ms
        if msg.early:
            body["early"] = msg.early
    elif isinstance(msg, Cancel):
        body = {"t": "cancel", "id": msg.id}
    elif isinstance(msg, Drain):
        body = {"t": "drain"}
        if msg.retry_ms is not None:
            body["retry_ms"] = msg.retry_ms
    elif isinstance(msg, Replaced):
        body = {"t": "replaced", "instance": msg.instance, "remote": msg.remote}
    elif isinstance(msg, DialFail):
        body = {"t": "dial_fail", "id": msg.id, "code": msg.code.value, "msg": msg.msg}
    elif isinstance(msg, Identifiers):
        body = {"t": "identifiers", "value": msg.value}
    else:
        body = {"t": "close", "code": msg.code.value, "msg": msg.msg}
    data: bytes = msgpack.packb(body, use_bin_type=True)
    if len(data) > MAX_MESSAGE_SIZE:
        raise MessageTooLarge(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_SIZE}")
    return data


def _get(body: dict[str, Any], key: str, kind: type, *, optional: bool = False) -> Any:
    if key not in body:
        if optional:
            return None
        raise InvalidMessage(f"{body.get('t')!r} message lacks field {key!r}")
    value = body[key]
    # bool is an int subclass; a wire boolean is never a valid integer field.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidMessage(f"field {key!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _int(body: dict[str, Any], key: str, lo: int, hi: int, *, optional: bool = False) -> Any:
    value = _get(body, key, int, optional=optional)
    if value is not None and not lo <= value <= hi:
        raise InvalidMessage(f"field {key!r} out of range: {value}")
    return value


def _text(body: dict[str, Any], key: str, *, optional: bool = False) -> str:
    value = _get(body, key, str, optional=optional)
    if value is None:
        return ""
    if len(value) > MAX_TEXT_LEN:
        raise InvalidMessage(f"field {key!r} longer than {MAX_TEXT_LEN}")
    return str(value)


def _enum(body: dict[str, Any], key: str, enum_type: type[Any]) -> Any:
    value = _text(body, key)
    try:
        return enum_type(value)
    except ValueError:
        raise InvalidMessage(f"unknown {key!r} value {value!r}") from None


def decode(body: object) -> Message | Close | None:
    """Validate one decoded msgpack object. ``None`` means an unknown type."""
    if not isinstance(body, dict):
        raise InvalidMessage(f"message must be a map, got {type(body).__name__}")
    kind = _get(body, "t", str)
    if kind == "dial":
        early = _get(body, "early", bytes, optional=True)
        if early is not None and len(early) > MAX_EARLY_DATA:
            raise MessageTooLarge(f"early data of {len(early)} bytes exceeds {MAX_EARLY_DATA}")
        return Dial(
            id=_int(body, "id", 0, MAX_U64),
            addr=_text(body, "addr"),
            timeout_ms=_int(body, "timeout_ms", 1, MAX_TIMEOUT_MS),
            proto=_text(body, "proto"),
            early=early or None,
        )
    if kind == "cancel":
        return Cancel(id=_int(body, "id", 0, MAX_U64))
    if kind == "drain":
        return Drain(retry_ms=_int(body, "retry_ms", 0, MAX_TIMEOUT_MS, optional=True))
    if kind == "dial_fail":
        return DialFail(
            id=_int(body, "id", 0, MAX_U64),
            code=_enum(body, "code", DialFailCode),
            msg=_text(body, "msg", optional=True),
        )
    if kind == "identifiers":
        return Identifiers(value=_text(body, "value"))
    if kind == "replaced":
        return Replaced(
            instance=_text(body, "instance", optional=True),
            remote=_text(body, "remote", optional=True),
        )
    if kind == "close":
        return Close(code=_enum(body, "code", CloseCode), msg=_text(body, "msg", optional=True))
    return None
