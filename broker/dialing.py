"""What a dial can end in, and how each outcome maps onto a frontend.

Frontends (CONNECT and gRPC) call :meth:`broker.registry.Registry.dial` and
get a tunnel stream or a :class:`DialError`; they only translate the error.
"""

from __future__ import annotations

import enum

from protocol.codes import DialFailCode


class DialOutcome(enum.Enum):
    NO_AGENT = "no_agent"
    FORBIDDEN = "forbidden"
    FAILED = "failed"
    TIMEOUT = "timeout"
    AGENT_LOST = "agent_lost"
    BAD_ADDRESS = "bad_address"
    #: A buffer budget is exhausted: the agent's (``busy``) or the broker's.
    BUSY = "busy"


#: HTTP status a CONNECT client sees for each outcome.
HTTP_STATUS = {
    DialOutcome.NO_AGENT: 503,
    DialOutcome.FORBIDDEN: 403,
    DialOutcome.FAILED: 502,
    DialOutcome.TIMEOUT: 504,
    DialOutcome.AGENT_LOST: 502,
    DialOutcome.BAD_ADDRESS: 400,
    DialOutcome.BUSY: 503,
}


class DialError(Exception):
    def __init__(self, outcome: DialOutcome, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.message = message
        #: The agent's ``dial_fail`` code, or the outcome's name.
        self.code = code or outcome.value

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.outcome]

    @classmethod
    def from_agent(cls, code: DialFailCode, msg: str) -> DialError:
        if code is DialFailCode.TIMEOUT:
            return cls(DialOutcome.TIMEOUT, f"dial timed out at the agent: {msg}", code=code.value)
        if code is DialFailCode.BUSY:
            return cls(DialOutcome.BUSY, f"agent busy: {msg}", code=code.value)
        if code is DialFailCode.FORBIDDEN:
            return cls(DialOutcome.FORBIDDEN, f"destination forbidden: {msg}", code=code.value)
        if code is DialFailCode.BAD_ADDRESS:
            return cls(DialOutcome.BAD_ADDRESS, f"bad address: {msg}", code=code.value)
        return cls(DialOutcome.FAILED, f"dial failed ({code.value}): {msg}", code=code.value)


class Rerouted(DialError):
    """The agent connection a dial was sent on was superseded by a hedged
    connection of the same agent before the agent answered: the dial goes
    again on the newest connection (docs/protocol.md, 6. Reconnect)."""

    def __init__(self, message: str = "superseded by a hedged connection") -> None:
        super().__init__(DialOutcome.AGENT_LOST, message, code="rerouted")
