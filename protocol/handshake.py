"""The control-stream handshake as typed values (docs/protocol.md, 2. The
control stream).

The agent's :class:`Hello` travels in the request headers of the control
stream, the broker's :class:`Welcome` in the 200 response headers and its
:class:`Refusal` in a non-200 response. Each value renders itself with
``to_headers()`` and is read back with ``from_headers()``, which validates
and raises :class:`HandshakeError` with a stable ``reason`` token. Every
header name of the handshake is defined here, once.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

import attrs

from protocol import keepalive
from protocol.errors import ProtocolError
from protocol.identifiers import AgentIdentifiers, valid_name

#: The major protocol version; it is part of every path (docs/protocol.md, 8. Versioning).
PROTOCOL_VERSION = "v1"
CONTROL_PATH = f"/tether.{PROTOCOL_VERSION}/connect"
STREAM_PATH = f"/tether.{PROTOCOL_VERSION}/stream"
CONTENT_TYPE = "application/msgpack"

# The agent's hello (request headers).
AGENT_ID = "tether-agent-id"
CLUSTER = "tether-cluster"
AGENT_IDENTIFIERS = "tether-agent-identifiers"
CONNECTED_SERVERS = "tether-connected-servers"
#: The agent process's instance id, drawn once per start (absent: an older agent).
AGENT_INSTANCE = "tether-agent-instance"
#: A hedged connection (``1``): the agent keeps its current connection to
#: this replica while this one is set up (docs/protocol.md, 6. Reconnect).
AGENT_HEDGE = "tether-agent-hedge"
AUTHORIZATION = "authorization"
# The broker's welcome (200 response headers).
SERVER_ID = "tether-server-id"
SERVER_COUNT = "tether-server-count"
DIAL_FAIL_CODES = "tether-dial-fail-codes"
# The broker's refusal (non-200 response headers), beside the body text.
REFUSAL = "tether-refusal"
#: With ``503 overloaded``: milliseconds to wait before dialing again.
RETRY_AFTER = "tether-retry-after"
#: The longest retry hint an agent takes (longer: not a hint).
MAX_RETRY_AFTER_MS = 3_600_000
# A data stream's request header.
DIAL_ID = "tether-dial-id"

#: The most replicas a broker may announce; more is a broken welcome.
MAX_SERVER_COUNT = 1000
_MAX_SERVER_ID = 253
_MAX_TOKEN = 64
_TOKEN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")
_MAX_INSTANCE = 32
_INSTANCE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")


class HandshakeError(ProtocolError):
    """A hello, welcome or refusal that does not validate; ``reason`` says
    which field (``bad_agent_id``, ``bad_server_count``, ...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}", reason=reason)


class RefusalReason(enum.Enum):
    """Refusal tokens the agent acts on; a broker may send others (every
    token is also the metric label of the rejection on the broker)."""

    #: 409: the agent already holds a connection to this replica (HA).
    DUPLICATE = "duplicate"
    #: 409: a live agent with this id is connected with another credential.
    IDENTITY_IN_USE = "identity_in_use"
    #: 409: this id is live on another connection with the same credential,
    #: from another agent process (two devices sharing one identity).
    AGENT_ID_LIVE = "agent_id_live"
    #: 503: the broker is shedding new connections (a reconnect storm);
    #: :data:`RETRY_AFTER` says when to dial again.
    OVERLOADED = "overloaded"


def valid_token(token: str) -> bool:
    """A refusal token: ``[a-z0-9_]{1,64}``."""
    return 0 < len(token) <= _MAX_TOKEN and set(token) <= _TOKEN_CHARS


def valid_instance(instance: str) -> bool:
    """An agent instance id: ``[a-z0-9]{1,32}``."""
    return 0 < len(instance) <= _MAX_INSTANCE and set(instance) <= _INSTANCE_CHARS


def _server_id_ok(server_id: str) -> bool:
    return len(server_id) <= _MAX_SERVER_ID and server_id.isprintable()


@attrs.frozen
class Hello:
    """What the agent says when it opens the control stream."""

    agent_id: str
    #: konnectivity's query-string form (``host=n1&ipv4=10.0.0.5``), as sent.
    identifiers: str = ""
    cluster: str = ""
    #: Server ids of the replicas this agent already holds (HA).
    connected_servers: tuple[str, ...] = ()
    #: The bearer token (token mode), None without one.
    token: str | None = attrs.field(default=None, repr=False)
    version: str = PROTOCOL_VERSION
    #: The agent process's instance id (:func:`valid_instance`); "" from an
    #: older agent, which sends none.
    instance: str = ""
    #: The keepalive interval this agent drives, as announced
    #: (:func:`protocol.keepalive.header_value`); None: the broker drives.
    keepalive_ms: str | None = None
    #: A hedged connection: the broker takes it for new dials and leaves the
    #: agent's current one (same credential and instance) open until it ends.
    hedge: bool = False

    @property
    def path(self) -> str:
        return f"/tether.{self.version}/connect"

    def to_headers(self) -> dict[str, str]:
        headers = {AGENT_ID: self.agent_id, AGENT_IDENTIFIERS: self.identifiers}
        if self.cluster:
            headers[CLUSTER] = self.cluster
        if self.connected_servers:
            headers[CONNECTED_SERVERS] = ",".join(sorted(self.connected_servers))
        if self.instance:
            headers[AGENT_INSTANCE] = self.instance
        if self.hedge:
            headers[AGENT_HEDGE] = "1"
        if self.token is not None:
            headers[AUTHORIZATION] = f"Bearer {self.token}"
        if self.keepalive_ms is not None:
            headers[keepalive.HEADER] = self.keepalive_ms
        return headers

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> Hello:
        agent_id = headers.get(AGENT_ID, "")
        if not valid_name(agent_id):
            raise HandshakeError("bad_agent_id", f"missing or invalid {AGENT_ID} header")
        cluster = headers.get(CLUSTER, "")
        if cluster and not valid_name(cluster):
            raise HandshakeError("bad_cluster", f"invalid {CLUSTER} header")
        identifiers = headers.get(AGENT_IDENTIFIERS, "")
        try:
            AgentIdentifiers.parse(identifiers)
        except ValueError as exc:
            raise HandshakeError("bad_identifiers", str(exc)) from None
        held = headers.get(CONNECTED_SERVERS, "")
        servers = tuple(s for s in held.split(",") if s)
        instance = headers.get(AGENT_INSTANCE, "")
        if instance and not valid_instance(instance):
            raise HandshakeError("bad_instance", f"invalid {AGENT_INSTANCE} header")
        hedge = headers.get(AGENT_HEDGE, "")
        if hedge not in ("", "1"):
            raise HandshakeError("bad_hedge", f"invalid {AGENT_HEDGE} header (only 1)")
        if hedge and not instance:
            raise HandshakeError("bad_hedge", f"{AGENT_HEDGE} needs {AGENT_INSTANCE}")
        return cls(
            agent_id=agent_id,
            identifiers=identifiers,
            cluster=cluster,
            connected_servers=servers,
            token=bearer_token(headers),
            instance=instance,
            hedge=bool(hedge),
        )


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The token of ``authorization: Bearer <token>``; None without one."""
    scheme, _, rest = headers.get(AUTHORIZATION, "").partition(" ")
    if scheme.lower() != "bearer" or not rest:
        return None
    return rest.strip()


@attrs.frozen
class Welcome:
    """What the broker answers (200) when it accepts the control stream."""

    server_id: str
    #: How many replicas the agent should hold a connection to.
    server_count: int = 1
    #: ``dial_fail`` codes beyond the first release's that this broker knows.
    dial_fail_codes: frozenset[str] = frozenset()

    def to_headers(self) -> dict[str, str]:
        headers = {SERVER_ID: self.server_id, SERVER_COUNT: str(self.server_count)}
        if self.dial_fail_codes:
            headers[DIAL_FAIL_CODES] = ",".join(sorted(self.dial_fail_codes))
        return headers

    @classmethod
    def from_headers(cls, headers: Mapping[str, str], *, lenient: bool = False) -> Welcome:
        """``lenient``: what agents have always done with a welcome that does
        not validate: a server count outside 1..1000 counts as one replica,
        and any server id is taken as it is."""
        server_id = headers.get(SERVER_ID, "")
        if server_id and not lenient and not _server_id_ok(server_id):
            raise HandshakeError("bad_server_id", f"invalid {SERVER_ID} header")
        # Absent: a broker from before HA, which is one replica.
        count = headers.get(SERVER_COUNT, "1")
        if not (count.isascii() and count.isdigit() and 0 < int(count) <= MAX_SERVER_COUNT):
            if not lenient:
                raise HandshakeError("bad_server_count", f"invalid {SERVER_COUNT} header {count!r}")
            count = "1"
        codes = frozenset(c for c in headers.get(DIAL_FAIL_CODES, "").split(",") if c)
        return cls(server_id=server_id, server_count=int(count), dial_fail_codes=codes)


@attrs.frozen
class Refusal:
    """What the broker answers when it refuses the control stream: the status,
    a stable token (header :data:`REFUSAL`, what agents act on) and the text
    for humans and older agents (the body, ``<token>: <explanation>``)."""

    status: int
    token: str
    text: str = ""
    #: When to dial again (:data:`RETRY_AFTER`), milliseconds; None: no hint.
    retry_after_ms: int | None = None

    def __attrs_post_init__(self) -> None:
        if not valid_token(self.token):
            raise HandshakeError("bad_refusal", f"invalid refusal token {self.token!r}")
        if self.retry_after_ms is not None and not 0 <= self.retry_after_ms <= MAX_RETRY_AFTER_MS:
            raise HandshakeError("bad_refusal", f"retry hint out of range: {self.retry_after_ms}")

    def to_headers(self) -> dict[str, str]:
        headers = {REFUSAL: self.token}
        if self.retry_after_ms is not None:
            headers[RETRY_AFTER] = str(self.retry_after_ms)
        return headers

    @staticmethod
    def retry_after_from_headers(headers: Mapping[str, str]) -> float | None:
        """The retry hint of a response in seconds; None when absent (an
        older broker) or not a number of milliseconds within an hour."""
        value = headers.get(RETRY_AFTER, "")
        if not (value.isascii() and value.isdigit() and len(value) <= 7):
            return None
        ms = int(value)
        return ms / 1000.0 if ms <= MAX_RETRY_AFTER_MS else None

    @staticmethod
    def token_from_headers(headers: Mapping[str, str]) -> str:
        """The refusal token of a response; "" when absent (an older broker)
        or not a token."""
        token = headers.get(REFUSAL, "")
        return token if valid_token(token) else ""

    @staticmethod
    def reason_of(token: str) -> RefusalReason | None:
        """The :class:`RefusalReason` the agent acts on, None for any other."""
        try:
            return RefusalReason(token)
        except ValueError:
            return None
