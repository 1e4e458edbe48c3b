"""Logging setup shared by both commands: text or one JSON object per line.

Log lines that matter to operators carry an ``event`` from a fixed
vocabulary (:data:`EVENTS`) plus key/value fields, passed as
``extra=event("agent_connected", agent_id=...)``. Message wording may change
between releases; event names and their fields are the stable interface for
log pipelines and alerts. The JSON format emits the fields as keys, the text
format appends ``event=<name>`` so grep works the same way.

Secrets are kept out at the call sites (tokens and keys are never passed to
a logger); as a second line of defence both formats redact anything that
looks like a bearer token or a PEM private key before the line is written.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

#: The stable event vocabulary (documented in docs/operations.md).
EVENTS = frozenset(
    {
        "started",  # process up: listeners open
        "stopped",  # process finished its drain
        "agent_connected",  # broker: agent registered; agent: broker accepted us
        "agent_disconnected",  # an agent connection that had been accepted ended
        "auth_rejected",  # broker refused an agent at the control stream
        "tls_handshake_failed",  # a TLS handshake failed or timed out
        "protocol_violation",  # the peer broke the wire protocol; connection closed
        "dial_ok",  # a dial reached its target (debug level)
        "dial_failed",  # a dial failed, with its reason code
        "dial_cancelled",  # the client gave up while the agent was dialing
        "drain",  # a drain started (signal, broker hint, or agent going away)
        "reconnect",  # agent: waiting to reconnect, with delay and cause
        "cert_reloaded",  # new certificate/key/CA in use for new connections
        "cert_reload_failed",  # reload refused; the previous certificate stays in use
        "buffer_budget_exhausted",  # --max-buffered-bytes is used up: new dials refused (busy)
    }
)


def event(name: str, **fields: object) -> dict[str, object]:
    """``extra=`` for a log call: the event name and its fields."""
    assert name in EVENTS, f"unknown log event {name!r}"
    return {"event": name, **fields}


# "Bearer <token>" in a header value or a repr of headers. Tokens are long
# (token68 alphabet); the length floor spares prose like "no bearer token".
_BEARER = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9\-._~+/]{8,}=*")
_PRIVATE_KEY = re.compile(
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|$)", re.S
)


def redact(text: str) -> str:
    """Blank out bearer tokens and PEM private keys."""
    if "-----BEGIN" in text:
        text = _PRIVATE_KEY.sub("<redacted key>", text)
    return _BEARER.sub(r"\1 <redacted>", text)


# Attributes every LogRecord has; anything else came in through ``extra``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out and value is not None:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(out, ensure_ascii=False, default=str))


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        name = getattr(record, "event", None)
        return f"{line}  event={name}" if name else line

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def setup_logging(fmt: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # h2 and hpack log every frame and header at DEBUG: far too much to be useful,
    # and headers include the agent's Authorization.
    for noisy in ("h2", "hpack"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, root.level))
