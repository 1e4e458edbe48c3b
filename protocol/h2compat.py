"""Work-arounds for h2/hyperframe behaviour that costs us on the hot path.

h2 4.x formats ``repr(frame)`` for *every* received frame (for a trace log
call that is usually disabled), and hyperframe's DataFrame repr serialises
and hex-encodes the whole payload before truncating it to 20 characters.
On a bulk transfer that was several percent of the broker's CPU. A DATA
frame's repr now names its size instead; nothing else changes.
"""

from __future__ import annotations

from hyperframe.frame import DataFrame


def _data_frame_body_repr(self: DataFrame) -> str:
    return f"<{len(self.data)} bytes>"


DataFrame._body_repr = _data_frame_body_repr  # type: ignore[method-assign,assignment]
