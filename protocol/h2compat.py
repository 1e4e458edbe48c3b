"""Work-arounds for h2/hyperframe behaviour.

h2 4.x formats ``repr(frame)`` for *every* received frame (for a trace log
call that is usually disabled), and hyperframe's DataFrame repr serialises
and hex-encodes the whole payload before truncating it to 20 characters.
On a bulk transfer that was several percent of the broker's CPU.
:func:`quiet_data_frame_repr` makes a DATA frame's repr name its size
instead; nothing else changes. Importing this module patches nothing: the
trio runtime (:mod:`tether.netio.h2driver`) calls it once.

h2's :class:`~h2.settings.Settings` keeps every setting's value stack in a
``collections.deque``, 760 bytes each for what is one integer nearly always;
a connection's two Settings held about 10 KiB, a sixth of what a broker
spends per idle agent. :class:`CompactSettings` keeps the same stacks in
lists (:func:`compact_settings` swaps them into a connection).
"""

from __future__ import annotations

from h2.connection import H2Connection
from h2.settings import ChangedSetting, SettingCodes, Settings
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


class CompactSettings(Settings):
    """h2's Settings with each value stack in a list instead of a deque
    (same behaviour: the first value is current, later ones await their
    acknowledgement; validation stays h2's own)."""

    def __init__(
        self, client: bool = True, initial_values: dict[SettingCodes, int] | None = None
    ) -> None:
        super().__init__(client, initial_values)
        self._settings = {k: list(v) for k, v in self._settings.items()}  # type: ignore[misc]

    @classmethod
    def like(cls, settings: Settings) -> CompactSettings:
        """A compact copy of ``settings``, pending values included."""
        out = cls(client=settings._client)
        out._settings = {k: list(v) for k, v in settings._settings.items()}  # type: ignore[misc]
        return out

    def acknowledge(self) -> dict[SettingCodes | int, ChangedSetting]:
        changed: dict[SettingCodes | int, ChangedSetting] = {}
        for key, stack in self._settings.items():
            if len(stack) > 1:
                old = stack.pop(0)  # type: ignore[call-arg]
                changed[key] = ChangedSetting(key, old, stack[0])
        return changed

    def __setitem__(self, key: SettingCodes | int, value: int) -> None:
        super().__setitem__(key, value)  # validates; a new key gets a deque
        stack = self._settings[key]
        if not isinstance(stack, list):
            self._settings[key] = list(stack)  # type: ignore[assignment]


def compact_settings(conn: H2Connection) -> None:
    """Give ``conn`` :class:`CompactSettings` for its local and remote
    settings, their current and pending values kept (idempotent)."""
    for name in ("local_settings", "remote_settings"):
        current = getattr(conn, name)
        if not isinstance(current, CompactSettings):
            setattr(conn, name, CompactSettings.like(current))
