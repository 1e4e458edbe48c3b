"""The messages between a broker host's supervisor and its workers
(``tether-broker --workers N``), and the routing state the supervisor keeps.

Sans-IO: bytes in, messages out, and back. The Trio side is
:mod:`broker.workers`.

Wire format of one frame: a 4-byte big-endian length of what follows, one
kind byte, then a UTF-8 JSON object of the kind's fields. A frame is at
most :data:`MAX_FRAME` bytes. Anything else (an oversize length, an
unknown kind, JSON that is not an object of the expected fields and types)
raises :class:`WorkerProtocolError` with a stable ``reason`` token; the
receiver counts it and closes the channel.

The supervisor's :class:`HostTable` is the host's registry view: which
worker owns each (cluster, agent id), with the identifiers it declared. A
worker announces its agents (:class:`AgentUp` / :class:`AgentDown`); the
table broadcasts every change to every worker, so every worker routes on
the same view, and settles a (cluster, agent id) that two workers claim at
once the way one broker's registry does: the same credential replaces the
older connection, another credential loses to the live one
(:class:`Evict`).
"""

from __future__ import annotations

import base64
import json
import re
import struct
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

#: Largest frame accepted (length prefix included).
MAX_FRAME = 64 * 1024
_HEAD = struct.Struct(">IB")


class WorkerProtocolError(Exception):
    """A malformed frame; ``reason`` is a stable token for metrics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@attrs.frozen
class Hello:
    """A worker's first message to the supervisor."""

    worker: int
    pid: int
    admin_port: int


@attrs.frozen
class AgentUp:
    """``worker`` serves this agent (new, or its identifiers changed)."""

    worker: int
    cluster: str
    agent_id: str
    identifiers: str
    credential: str = ""


@attrs.frozen
class AgentDown:
    worker: int
    cluster: str
    agent_id: str


@attrs.frozen
class WorkerGone:
    """The supervisor saw ``worker`` exit: forget all it announced."""

    worker: int


@attrs.frozen
class Evict:
    """Supervisor to owner: close this agent's connection (``reason`` token)."""

    cluster: str
    agent_id: str
    reason: str


@attrs.frozen
class Handover:
    """Worker to worker, with the frontend connection's descriptor as
    ``SCM_RIGHTS``: serve it as if accepted here; ``data`` is what the
    sender already read from it."""

    cluster: str
    frontend: str
    data: bytes


Message = Hello | AgentUp | AgentDown | WorkerGone | Evict | Handover

_KINDS: dict[type[Any], int] = {
    Hello: 1,
    AgentUp: 2,
    AgentDown: 3,
    WorkerGone: 4,
    Evict: 5,
    Handover: 6,
}
_BY_KIND = {k: t for t, k in _KINDS.items()}


def encode(msg: Message) -> bytes:
    """One frame for ``msg``; ValueError if it would exceed :data:`MAX_FRAME`."""
    fields = attrs.asdict(msg)
    if isinstance(msg, Handover):
        fields["data"] = base64.b64encode(msg.data).decode()
    body = json.dumps(fields, separators=(",", ":")).encode()
    if len(body) + _HEAD.size > MAX_FRAME:
        raise ValueError(f"worker message of {len(body)} bytes exceeds {MAX_FRAME}")
    return _HEAD.pack(len(body) + 1, _KINDS[type(msg)]) + body


def _decode(kind: int, body: bytes) -> Message:
    cls = _BY_KIND.get(kind)
    if cls is None:
        raise WorkerProtocolError("unknown_kind", f"unknown message kind {kind}")
    try:
        fields = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise WorkerProtocolError("bad_json", "message body is not UTF-8 JSON") from None
    if not isinstance(fields, dict):
        raise WorkerProtocolError("bad_json", "message body is not a JSON object")
    expected = {a.name: a for a in attrs.fields(cls)}
    if set(fields) - set(expected) or {
        n for n, a in expected.items() if a.default is attrs.NOTHING
    } - set(fields):
        raise WorkerProtocolError("bad_field", f"{cls.__name__}: unexpected or missing fields")
    for name, value in fields.items():
        want = expected[name].type
        ok = isinstance(value, int) and not isinstance(value, bool) if want == "int" else True
        if want in ("str", "bytes"):
            ok = isinstance(value, str)
        if not ok:
            raise WorkerProtocolError("bad_field", f"{cls.__name__}.{name}: wrong type")
    if cls is Handover:
        try:
            fields["data"] = base64.b64decode(fields["data"], validate=True)
        except ValueError:
            raise WorkerProtocolError("bad_field", "Handover.data is not base64") from None
    msg: Message = cls(**fields)
    return msg


class FrameDecoder:
    """Bytes of a channel in, whole messages out."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        while len(self._buf) >= 4:
            (length,) = struct.unpack_from(">I", self._buf)
            if length < 1 or length + 4 > MAX_FRAME:
                raise WorkerProtocolError("frame_size", f"frame length {length} out of range")
            if len(self._buf) < 4 + length:
                break
            kind = self._buf[4]
            body = bytes(self._buf[5 : 4 + length])
            del self._buf[: 4 + length]
            out.append(_decode(kind, body))
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)


# ------------------------------------------------------------- host table


@attrs.frozen
class _Owned:
    worker: int
    identifiers: str
    credential: str


class HostTable:
    """Which worker owns which agent: the supervisor's view of the host.

    Each ``apply_*`` returns what to send, as ``(worker, message)`` pairs,
    ``worker`` -1 meaning every live worker."""

    def __init__(self) -> None:
        self._owners: dict[tuple[str, str], _Owned] = {}

    def __len__(self) -> int:
        return len(self._owners)

    def count(self, worker: int | None = None) -> int:
        if worker is None:
            return len(self._owners)
        return sum(1 for o in self._owners.values() if o.worker == worker)

    def owner(self, cluster: str, agent_id: str) -> int | None:
        o = self._owners.get((cluster, agent_id))
        return o.worker if o is not None else None

    def apply_up(self, up: AgentUp) -> list[tuple[int, Message]]:
        key = (up.cluster, up.agent_id)
        old = self._owners.get(key)
        out: list[tuple[int, Message]] = []
        if old is not None and old.worker != up.worker:
            if up.credential and old.credential == up.credential:
                # A reconnect that landed on another worker: the newcomer wins.
                out.append((old.worker, Evict(up.cluster, up.agent_id, "replaced")))
            else:
                return [(up.worker, Evict(up.cluster, up.agent_id, "identity_in_use"))]
        self._owners[key] = _Owned(up.worker, up.identifiers, up.credential)
        out.append((-1, up))
        return out

    def apply_down(self, down: AgentDown) -> list[tuple[int, Message]]:
        key = (down.cluster, down.agent_id)
        old = self._owners.get(key)
        if old is None or old.worker != down.worker:
            return []  # already replaced by another worker's connection
        del self._owners[key]
        return [(-1, down)]

    def apply_gone(self, worker: int) -> list[tuple[int, Message]]:
        for key in [k for k, o in self._owners.items() if o.worker == worker]:
            del self._owners[key]
        return [(-1, WorkerGone(worker))]

    def snapshot(self) -> list[Message]:
        """What a (re)started worker is told first: every agent now owned."""
        return [
            AgentUp(o.worker, cluster, agent_id, o.identifiers, o.credential)
            for (cluster, agent_id), o in self._owners.items()
        ]


# ---------------------------------------------------------------- metrics

_SAMPLE = re.compile(rb"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?( .*)$")


def merge_metrics(texts: Mapping[str, bytes], label: str = "worker") -> bytes:
    """Prometheus text of several processes as one exposition: each sample
    gets ``label="<key>"``; each ``# HELP``/``# TYPE`` line is kept once."""
    seen: set[bytes] = set()
    families: dict[bytes, list[bytes]] = {}
    order: list[bytes] = []
    for key, text in texts.items():
        tag = b'%s="%s"' % (label.encode(), key.encode())
        family = b""
        for line in text.splitlines():
            if line.startswith(b"# HELP ") or line.startswith(b"# TYPE "):
                parts = line.split(b" ", 3)
                family = parts[2] if len(parts) > 2 else b""
                if family not in families:
                    families[family] = []
                    order.append(family)
                if line not in seen:
                    seen.add(line)
                    families[family].append(line)
                continue
            m = _SAMPLE.match(line)
            if m is None:
                continue
            name, labels, rest = m.group(1), m.group(2), m.group(3)
            inner = labels[1:-1] if labels else b""
            merged = tag + (b"," + inner if inner else b"")
            # A sample belongs to the family its HELP/TYPE named (``_total``,
            # ``_bucket``... suffixes), else to a family of its own name.
            home = family if family and name.startswith(family) else name
            if home not in families:
                families[home] = []
                order.append(home)
            families[home].append(name + b"{" + merged + b"}" + rest)
    return b"".join(line + b"\n" for f in order for line in families[f])


def merged_agents(rows: Iterable[tuple[int, list[Any]]]) -> list[Any]:
    """``/agents`` of every worker as one list, each row naming its worker."""
    out = []
    for worker, items in rows:
        for item in items:
            if isinstance(item, dict):
                out.append({**item, "worker": worker})
    return sorted(out, key=lambda r: (str(r.get("cluster")), str(r.get("agent_id"))))
