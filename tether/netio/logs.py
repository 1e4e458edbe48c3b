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

Log lines cannot be forged: peers put text into messages (a target name, an
agent's ``dial_fail`` text, a TLS error), so the text format escapes control
characters, line and paragraph separators, bidi and zero-width format
characters and lone surrogates (``\\n``, ``\\x1b``, ``\\u2028``) in the
whole line, traceback included: one record is always one line. JSON escapes
C0 controls itself; the same other characters are written as ``\\uXXXX``.

Nor flooded: warnings that one unauthenticated peer can cause go through
:func:`limited` (a :class:`LogLimiter` per process), at most
:data:`PER_SOURCE` lines per :data:`INTERVAL` seconds per (event, source),
then one ``log_suppressed`` line with the count.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from typing import Any

import attrs
import trio

#: The stable event vocabulary (documented in docs/operations.md).
EVENTS = frozenset(
    {
        "started",  # process up: listeners open
        "stopped",  # process finished its drain
        "supervisor_started",  # broker --workers: the supervisor started its workers
        "worker_exited",  # broker --workers: a worker exited; restarted with backoff
        "agent_evicted",  # broker --workers: the same agent id won on another worker
        "agent_connected",  # broker: agent registered; agent: broker accepted us
        "agent_disconnected",  # an agent connection that had been accepted ended
        "agent_replaced",  # broker: a newcomer took an agent id's place; agent: we were replaced
        "agent_hedged",  # broker: a hedge took new dials, the old connection keeps its streams
        "hedge_started",  # agent: a quiet link; fresh connections race beside it
        "hedge_won",  # agent: a hedged connection took new dials
        "hedge_recovered",  # agent: the quiet link answered first; the race stopped
        "hedge_retired",  # agent: the old connection ended after a hedge won
        "network_changed",  # agent: the tunnel's address went away or its route moved
        "auth_rejected",  # broker refused an agent at the control stream
        "broker_overloaded",  # agent: 503 overloaded, waiting out the broker's retry hint
        "frontend_rejected",  # broker refused a TCP frontend client certificate (role/cluster)
        "pki_migration_needed",  # startup: frontend and agent share a CA (an old PKI)
        "tls_handshake_failed",  # a TLS handshake failed or timed out
        "protocol_violation",  # the peer broke the wire protocol; connection closed
        "dial_ok",  # a dial reached its target (debug level)
        "dial_failed",  # a dial failed, with its reason code
        "dial_held",  # a dial waited for a departed agent (--agent-return-wait)
        "dial_cancelled",  # the client gave up while the agent was dialing
        "drain",  # a drain started (signal, broker hint, or agent going away)
        "reconnect",  # agent: waiting to reconnect, with delay and cause
        "cert_reloaded",  # new certificate/key/CA in use for new connections
        "cert_reload_failed",  # reload refused; the previous certificate stays in use
        "lease_created",  # broker: its coordination.k8s.io Lease exists now
        "lease_failed",  # broker: its Lease could not be renewed (logged once per episode)
        "lease_collected",  # broker: an expired Lease of another replica was deleted
        "lease_count",  # agent: the number of live broker Leases changed
        "lease_count_failed",  # agent: the Leases could not be listed (once per episode)
        "identifiers_changed",  # broker: an agent's identifiers were set or changed
        "identifier_not_allowed",  # broker: claims beyond the agent's credential, dropped
        "keepalive_announced",  # broker: a tether-keepalive-ms refused or clamped
        "bad_input",  # a frontend or health request refused as malformed
        "log_suppressed",  # similar lines from one source were dropped; with the count
        "frontend_socket",  # broker: a frontend Unix socket created (owner, group, mode)
        "stale_socket_replaced",  # broker: a dead socket at the path was replaced
        "frontend_socket_lost",  # broker: its socket path was removed or replaced
        "flood_penalty",  # broker: an address that keeps flooding is refused at accept for a while
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


# Characters a log line must not carry raw: C0 and C1 controls and DEL; line
# and paragraph separators (U+2028/9, which splitlines() honours); soft
# hyphen, zero-width and bidi format characters (they reorder or hide text on
# a terminal); BOM and interlinear annotations; lone surrogates (unencodable).
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\xad\u061c\u180e\u200b-\u200f\u2028-\u202e"
    "\u2060-\u206f\ufeff\ufff9-\ufffb\ud800-\udfff]"
)
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def escape_controls(text: str) -> str:
    """``text`` with every unsafe character written as a backslash escape."""
    return _UNSAFE.sub(_escape_one, text) if _UNSAFE.search(text) else text


def _json_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


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
        line = json.dumps(out, ensure_ascii=False, default=str)
        # json escaped C0 already; what is left can only sit inside strings.
        return redact(_UNSAFE.sub(_json_escape, line))


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        name = getattr(record, "event", None)
        return f"{line}  event={name}" if name else line

    def format(self, record: logging.LogRecord) -> str:
        return escape_controls(redact(super().format(record)))


class LogFileError(ValueError):
    """--log-file cannot be used (one line, for a start-up error)."""


def _log_file(file: str, max_bytes: int) -> logging.Handler:
    """--log-file: rotated to FILE.1 at the size cap, so it never takes more
    than twice that. A write that fails (disk full, file gone read-only) is
    reported once on stderr instead of a traceback per line.

    logging.handlers (and the pickle it imports) is loaded only here: a
    process that logs to stderr does not carry it (about 0.3 MB)."""
    import logging.handlers

    class LogFile(logging.handlers.RotatingFileHandler):
        failed = False

        def handleError(self, record: logging.LogRecord) -> None:
            if not self.failed:
                self.failed = True
                exc = sys.exc_info()[1]
                print(
                    f"tether: cannot write --log-file {self.baseFilename}: {exc}", file=sys.stderr
                )

    return LogFile(file, maxBytes=max_bytes, backupCount=1, encoding="utf-8")


def setup_logging(
    fmt: str,
    level: str,
    *,
    file: str = "",
    file_max_mib: int = 0,
    to_stderr: bool = True,
) -> None:
    """Send every line to stderr and/or ``file``; raises :class:`LogFileError`."""
    formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    handlers: list[logging.Handler] = []
    if not to_stderr and not file:
        raise LogFileError("--no-log-stderr needs --log-file: no line would be written anywhere")
    if file:
        try:
            # Created with a mode of our choosing; the handler then appends.
            os.close(os.open(file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640))
            handlers.append(_log_file(file, file_max_mib * 1024 * 1024))
        except OSError as exc:
            raise LogFileError(f"cannot open --log-file {file}: {exc.strerror or exc}") from None
    if to_stderr:
        handlers.append(logging.StreamHandler(sys.stderr))
    for handler in handlers:
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel(level.upper())
    # h2 and hpack log every frame and header at DEBUG: far too much to be useful,
    # and headers include the agent's Authorization.
    for noisy in ("h2", "hpack"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, root.level))


def start_logging(cfg: Any, command: str, logger: str) -> logging.Logger | None:
    """Both commands' start: logging as ``cfg`` says (its ``log_*`` fields),
    then the konnectivity-flag warnings; None (after one line on stderr)
    when ``--log-file`` cannot be used: the caller exits 2."""
    try:
        setup_logging(
            cfg.log_format,
            cfg.log_level,
            file=cfg.log_file,
            file_max_mib=cfg.log_file_max_size,
            to_stderr=cfg.log_stderr,
        )
    except LogFileError as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return None
    log = logging.getLogger(logger)
    for warning in cfg.compat_warnings:
        log.warning("%s", warning)
    return log


# ------------------------------------------------------------- rate limiting

#: Lines per (event, source) per interval before suppression starts.
PER_SOURCE = 10
#: Lines per event, all sources together, per interval.
PER_EVENT = 100
#: Seconds of one counting window.
INTERVAL = 10.0
#: (event, source) keys tracked at once; further sources share one key.
MAX_KEYS = 1024
OTHER_SOURCES = "other addresses"


@attrs.define
class _Window:
    started: float
    logger: str
    lines: int = 0
    suppressed: int = 0


@attrs.frozen
class Suppressed:
    """What one window dropped, for the ``log_suppressed`` line."""

    event: str
    source: str
    count: int
    seconds: float
    logger: str

    def message(self) -> str:
        return (
            f"suppressed {self.count} similar messages from {self.source} "
            f"in the last {self.seconds:.0f}s ({self.event})"
        )


class LogLimiter:
    """Counts log lines per (event, source) in fixed windows, sans-IO.

    :meth:`admit` says whether one more line may be written now; lines over
    ``per_source`` per key, or ``per_event`` per event, in one window are
    counted instead. A window that dropped lines yields one
    :class:`Suppressed` when it ends, from :meth:`admit` for the same key or
    from :meth:`expired` (called periodically). Memory is bounded: at most
    ``max_keys`` keys, then new sources share the key ``OTHER_SOURCES``.
    The clock is passed in.
    """

    def __init__(
        self,
        per_source: int = PER_SOURCE,
        interval: float = INTERVAL,
        *,
        per_event: int = PER_EVENT,
        max_keys: int = MAX_KEYS,
    ) -> None:
        self.per_source = per_source
        self.per_event = per_event
        self.interval = interval
        self.max_keys = max_keys
        self._windows: dict[tuple[str, str], _Window] = {}
        self._events: dict[str, _Window] = {}

    def __len__(self) -> int:
        return len(self._windows)

    def admit(
        self, event_name: str, source: str, now: float, logger: str = ""
    ) -> tuple[bool, Suppressed | None]:
        """(write this line?, the summary of this key's window that ended)."""
        ended: Suppressed | None = None
        key = (event_name, source)
        window = self._windows.get(key)
        if window is not None and now - window.started >= self.interval:
            ended = self._close(key, window, now)
            window = None
        if window is None:
            if len(self._windows) >= self.max_keys:
                self._sweep(now)
            if len(self._windows) >= self.max_keys:
                key = (event_name, OTHER_SOURCES)
                window = self._windows.get(key)
            if window is None:
                window = self._windows[key] = _Window(now, logger)
        total = self._events.get(event_name)
        if total is None or now - total.started >= self.interval:
            total = self._events[event_name] = _Window(now, logger)
        if window.lines < self.per_source and total.lines < self.per_event:
            window.lines += 1
            total.lines += 1
            return True, ended
        window.suppressed += 1
        return False, ended

    def expired(self, now: float) -> list[Suppressed]:
        """Summaries of every window that ended; forgets those keys."""
        return self._sweep(now)

    def _sweep(self, now: float) -> list[Suppressed]:
        out: list[Suppressed] = []
        for key, window in list(self._windows.items()):
            if now - window.started >= self.interval:
                summary = self._close(key, window, now)
                if summary is not None:
                    out.append(summary)
        for name, total in list(self._events.items()):
            if now - total.started >= self.interval:
                del self._events[name]
        return out

    def _close(self, key: tuple[str, str], window: _Window, now: float) -> Suppressed | None:
        del self._windows[key]
        if not window.suppressed:
            return None
        return Suppressed(key[0], key[1], window.suppressed, now - window.started, window.logger)


#: The process's limiter (the broker flushes it with :func:`run_suppressed_reporter`).
LIMITER = LogLimiter()


def _report(summary: Suppressed) -> None:
    logging.getLogger(summary.logger or "tether").warning(
        "%s",
        summary.message(),
        extra=event(
            "log_suppressed",
            suppressed_event=summary.event,
            source=summary.source,
            count=summary.count,
            seconds=round(summary.seconds, 1),
        ),
    )


def limited(
    logger: logging.Logger,
    level: int,
    source: str,
    msg: str,
    *args: object,
    extra: dict[str, object] | None = None,
    key: str | None = None,
) -> bool:
    """Log one line that a peer at ``source`` caused, within the budget.

    ``key`` (default: the ``event`` in ``extra``, else ``msg``) groups similar
    lines. Returns whether the line was written.
    """
    name = key or str((extra or {}).get("event") or msg)
    ok, ended = LIMITER.admit(name, source, time.monotonic(), logger.name)
    if ended is not None:
        _report(ended)
    if ok:
        logger.log(level, msg, *args, extra=extra)
    return ok


async def run_suppressed_reporter(period: float = 1.0) -> None:
    """Write the ``log_suppressed`` lines of windows that ended, every ``period`` s."""
    while True:
        await trio.sleep(period)
        for summary in LIMITER.expired(time.monotonic()):
            _report(summary)
