"""A work-around for hyperframe behaviour, applied by the runtime, not here.

h2 4.x formats ``repr(frame)`` for *every* received frame (for a trace log
call that is usually disabled), and hyperframe's DataFrame repr serialises
and hex-encodes the whole payload before truncating it to 20 characters.
On a bulk transfer that was several percent of the broker's CPU.
:func:`quiet_data_frame_repr` makes a DATA frame's repr name its size
instead; nothing else changes. Importing this module patches nothing: the
trio runtime (:mod:`tether.netio.h2driver`) calls it once.
"""

from __future__ import annotations

from hyperframe.frame import DataFrame


def _data_frame_body_repr(self: DataFrame) -> str:
    return f"<{len(self.data)} bytes>"


def quiet_data_frame_repr() -> None:
    """Make ``repr()`` of a DATA frame cheap (idempotent)."""
    DataFrame._body_repr = _data_frame_body_repr  # type: ignore[method-assign,assignment]
