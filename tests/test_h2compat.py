"""protocol/h2compat.py: CompactSettings behaves exactly as h2's Settings
(any sequence of changes, acknowledgements and reads), and a connection our
H2Base starts holds no deque-backed settings."""

from __future__ import annotations

import collections
import sys

import h2.exceptions
import h2.settings
from hypothesis import given
from hypothesis import strategies as st

from protocol.h2base import H2Base, H2Settings
from protocol.h2compat import CompactSettings, compact_settings

Codes = h2.settings.SettingCodes
KEYS = [*Codes, 0x99]  # every known setting and an unknown one
VALUES = st.one_of(
    st.integers(0, 2**31 + 10),
    st.sampled_from([0, 1, 2, 16383, 16384, 2**24 - 1, 2**24, 2**31 - 1, 2**31]),
)
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("set"), st.sampled_from(KEYS), VALUES),
        st.tuples(st.just("ack")),
        st.tuples(st.just("del"), st.sampled_from(KEYS)),
    ),
    max_size=40,
)


PROPERTIES = (
    "header_table_size",
    "enable_push",
    "initial_window_size",
    "max_frame_size",
    "max_concurrent_streams",
    "max_header_list_size",
    "enable_connect_protocol",
)


def observe(s: h2.settings.Settings) -> object:
    seen: list[object] = [sorted((int(k), s.get(k)) for k in s), len(s)]
    for name in PROPERTIES:
        try:
            seen.append(getattr(s, name))
        except KeyError:
            seen.append("KeyError")
    return seen


def apply(s: h2.settings.Settings, op: tuple[object, ...]) -> object:
    try:
        if op[0] == "set":
            s[op[1]] = op[2]  # type: ignore[index]
            return None
        if op[0] == "del":
            del s[op[1]]  # type: ignore[arg-type]
            return None
        return sorted((int(k), c.original_value, c.new_value) for k, c in s.acknowledge().items())
    except (h2.exceptions.InvalidSettingsValueError, KeyError) as exc:
        return type(exc).__name__


@given(client=st.booleans(), start=st.booleans(), ops=OPS)
def test_compact_settings_answer_as_h2s_settings_do(
    client: bool, start: bool, ops: list[tuple[object, ...]]
) -> None:
    initial = {Codes.MAX_CONCURRENT_STREAMS: 100, Codes.INITIAL_WINDOW_SIZE: 1 << 20}
    ours = CompactSettings(client=client, initial_values=initial if start else None)
    theirs = h2.settings.Settings(client=client, initial_values=initial if start else None)
    assert observe(ours) == observe(theirs)
    for op in ops:
        assert apply(ours, op) == apply(theirs, op), op
        assert observe(ours) == observe(theirs), op
    # A copy keeps the pending values too.
    copy = CompactSettings.like(theirs)
    assert apply(copy, ("ack",)) == apply(theirs, ("ack",))
    assert observe(copy) == observe(theirs)


def test_a_started_connection_keeps_its_settings_in_lists() -> None:
    base = H2Base(H2Settings(), client=False, now=0.0)
    base.initiate()
    conn = base.h2
    for settings in (conn.local_settings, conn.remote_settings):
        assert isinstance(settings, CompactSettings)
        stacks = list(settings._settings.values())
        assert stacks and not any(isinstance(v, collections.deque) for v in stacks)
    # What it saves: one deque against one short list, per setting.
    assert sys.getsizeof(collections.deque([1])) > 5 * sys.getsizeof([1])
    compact_settings(conn)  # idempotent
    assert isinstance(conn.local_settings, CompactSettings)
