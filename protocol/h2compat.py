"""Work-arounds for h2/hyperframe behaviour.

h2 4.x formats ``repr(frame)`` for *every* received frame (for a trace log
call that is usually disabled), and hyperframe's DataFrame repr serialises
and hex-encodes the whole payload before truncating it to 20 characters.
On a bulk transfer that was several percent of the broker's CPU.
:func:`quiet_data_frame_repr` makes a DATA frame's repr name its size
instead; nothing else changes. Importing this module patches nothing: the
trio runtime (:mod:`tether.netio.h2driver`) calls it once.
"""

from __future__ import annotations

from h2.connection import H2Connection
from hyperframe.frame import DataFrame


def _data_frame_body_repr(self: DataFrame) -> str:
    return f"<{len(self.data)} bytes>"


def quiet_data_frame_repr() -> None:
    """Make ``repr()`` of a DATA frame cheap (idempotent)."""
    DataFrame._body_repr = _data_frame_body_repr  # type: ignore[method-assign,assignment]


def between_frames(conn: H2Connection) -> bool:
    """Whether h2 holds no part of a frame, no preface still due and no
    header block awaiting its CONTINUATION (h2 has no public API for this;
    anything unexpected answers False, which only disables a fast path)."""
    buf = getattr(conn, "incoming_buffer", None)
    return (
        buf is not None
        and not getattr(buf, "_data", True)
        and getattr(buf, "_preamble_len", 1) == 0
        and not getattr(buf, "_headers_buffer", True)
    )
