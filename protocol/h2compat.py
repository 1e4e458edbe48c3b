"""Work-arounds for h2/hyperframe behaviour, in one place for every h2 user.

:func:`initiate` starts a connection with our settings in force at once.

h2 4.x formats ``repr(frame)`` for *every* received frame (for a trace log
call that is usually disabled), and hyperframe's DataFrame repr serialises
and hex-encodes the whole payload before truncating it to 20 characters.
On a bulk transfer that was several percent of the broker's CPU. A DATA
frame's repr now names its size instead; nothing else changes.
"""

from __future__ import annotations

import h2.connection
import h2.settings
from hyperframe.frame import DataFrame


def _data_frame_body_repr(self: DataFrame) -> str:
    return f"<{len(self.data)} bytes>"


DataFrame._body_repr = _data_frame_body_repr  # type: ignore[method-assign,assignment]


def initiate(
    conn: h2.connection.H2Connection,
    *,
    client: bool,
    max_concurrent_streams: int,
    stream_window: int,
    max_frame_size: int,
    max_header_list_size: int,
    connection_window: int,
) -> None:
    """Send the preface with our SETTINGS and raise the connection window."""
    conn.local_settings = h2.settings.Settings(
        client=client,
        initial_values={
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: stream_window,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: max_frame_size,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: max_header_list_size,
        },
    )
    # Values set this way count as current at once (the peer cannot use them
    # before it sees our SETTINGS), so mirror them into h2's caches.
    conn.max_inbound_frame_size = max_frame_size
    conn.decoder.max_header_list_size = max_header_list_size
    conn.initiate_connection()
    extra = connection_window - conn.inbound_flow_control_window
    if extra > 0:
        conn.increment_flow_control_window(extra)
