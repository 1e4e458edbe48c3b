"""A hostile agent that floods its control stream with every message type an
agent may send (and some it may not), for ``test_hostile_control_flood.py``.

Used in-process by the flood tests, and as a separate process by the
fairness measurement (``python tests/control_flood.py ...``), so that the
flooder's own CPU does not run in the measuring test's event loop::

    control_flood.py AGENT_PORT PKI_DIR AGENT_ID [KIND ...]

It connects with the agent certificate from ``PKI_DIR``, floods until the
broker's GOAWAY, reconnects at once, and so on, while switched on (SIGUSR1
on, SIGUSR2 off); at SIGTERM it prints one line
``control_flood connections=N goaways=M calm=K refused=R``.
"""

from __future__ import annotations

import itertools
import signal
import sys
from pathlib import Path

import msgpack
import trio

from protocol import messages
from protocol.codes import DialFailCode

if __name__ == "__main__":  # run as a script: tests/ is sys.path[0]
    sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from hostile import (
    DATA,
    ENHANCE_YOUR_CALM,
    GOAWAY,
    FrameReader,
    RawPeer,
    frame,
    open_peer,
)

from tether.tools.certs import PkiPaths
from tether.tools.launch import BrokerHandle

#: About 200 CIDRs in 4 KB: what the issue's attacker sent.
CIDRS = "&".join(f"cidr=10.{i // 250}.{i % 250}.0/24" for i in range(200))
CIDRS_ALT = "&".join(f"cidr=10.{100 + i // 250}.{i % 250}.0/24" for i in range(200))

#: Every kind the flood tests name, each with its messages (encoded).
KINDS = ("identifiers", "dial_fail", "drain", "other")


def units(kind: str) -> list[bytes]:
    """Encoded control messages of one flood kind (a few variants)."""
    if kind == "identifiers":
        # Two sets in turn, so an "unchanged, skip it" shortcut is no defence.
        return [messages.encode(messages.Identifiers(v)) for v in (CIDRS, CIDRS_ALT)]
    if kind == "dial_fail":  # answers to dials the broker never sent
        return [
            messages.encode(messages.DialFail(id=i, code=DialFailCode.REFUSED, msg="no"))
            for i in range(1000, 1010)
        ]
    if kind == "drain":
        return [messages.encode(messages.Drain())]
    if kind == "other":  # types an agent must not send, and unknown types
        return [
            messages.encode(messages.Cancel(id=7)),
            msgpack.packb({"t": "tether.future", "x": 1}),
        ]
    raise ValueError(kind)


def flood_block(kinds: tuple[str, ...], frame_size: int = 16 * 1024) -> bytes:
    """DATA frames on the control stream (stream 1), the kinds interleaved."""
    cycle = itertools.cycle([u for kind in kinds for u in units(kind)])
    frames, payload = [], b""
    while len(frames) < 16:
        unit = next(cycle)
        if len(payload) + len(unit) > frame_size:
            frames.append(frame(DATA, 0, 1, payload))
            payload = b""
        payload += unit
    return b"".join(frames)


async def flood_until_closed(
    peer: RawPeer, block: bytes, timeout: float, *, linger: bool = True
) -> int | None:
    """Send ``block`` over and over until the broker closes the connection
    (without ``linger``: until its GOAWAY arrives); return the GOAWAY error
    code it sent (None: no GOAWAY within ``timeout``).

    The reader never writes (RawPeer's reader would send WINDOW_UPDATEs), so
    the two tasks never share the stream's send side.
    """
    code: int | None = None
    reader = FrameReader()

    async def read() -> None:
        nonlocal code
        while True:
            try:
                data = await peer.stream.receive_some(1 << 16)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                peer.eof = True
                break
            for f in reader.feed(bytes(data)):
                if f.kind == GOAWAY and code is None:
                    code = f.error_code
            if code is not None and not linger:
                break  # an attacker does not wait for the close: reconnect now
        nursery.cancel_scope.cancel()

    with trio.move_on_after(timeout):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            while await peer.send(block):
                await trio.lowlevel.checkpoint()
            # The broker stopped reading: wait for the reader to see the end.
    return code


async def flood_for(
    broker: BrokerHandle,
    agent_id: str,
    seconds: float,
    kinds: tuple[str, ...] = KINDS,
    stats: dict[str, int] | None = None,
) -> dict[str, int]:
    """Flood, reconnecting after every close, for ``seconds``; counts go
    into ``stats`` as they happen (so a cancelled flood still reports)."""
    block = flood_block(kinds)
    stats = {} if stats is None else stats
    stats.update(connections=0, goaways=0, calm=0, refused=0)
    with trio.move_on_after(seconds):
        while True:
            try:
                peer = await open_peer(broker, agent_id=agent_id, identifiers="host=evil")
            except (AssertionError, OSError, trio.BrokenResourceError, trio.TooSlowError):
                stats["refused"] += 1  # e.g. a handshake limit: try again
                await trio.sleep(0.01)
                continue
            stats["connections"] += 1
            try:
                code = await flood_until_closed(peer, block, timeout=seconds, linger=False)
            finally:
                await peer.aclose()
            if code is not None:
                stats["goaways"] += 1
                stats["calm"] += code == ENHANCE_YOUR_CALM
    return stats


async def _main(argv: list[str]) -> None:
    """Flood while switched on: SIGUSR1 starts, SIGUSR2 stops (the
    connection is dropped), SIGTERM prints the counts and exits."""
    port, pki_dir, agent_id, *kinds = argv
    broker = BrokerHandle(
        None,  # type: ignore[arg-type]  # only the port and the PKI are used
        int(port),
        0,
        0,
        "",
        PkiPaths.in_dir(Path(pki_dir)),
    )
    stats: dict[str, int] = {}
    totals: dict[str, int] = {}
    scope: trio.CancelScope | None = None

    async def run(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as cancel:
            task_status.started(cancel)
            try:
                await flood_for(broker, agent_id, float("inf"), tuple(kinds) or KINDS, stats)
            finally:
                for k, v in stats.items():
                    totals[k] = totals.get(k, 0) + v
                stats.clear()

    signals_wanted = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
    with trio.open_signal_receiver(*signals_wanted) as signals:
        print("control_flood ready", flush=True)
        async with trio.open_nursery() as nursery:
            async for sig in signals:
                if sig == signal.SIGUSR1 and scope is None:
                    scope = await nursery.start(run)
                elif sig != signal.SIGUSR1 and scope is not None:
                    scope.cancel()
                    scope = None
                if sig == signal.SIGTERM:
                    break
    print("control_flood " + " ".join(f"{k}={v}" for k, v in totals.items()), flush=True)


if __name__ == "__main__":
    trio.run(_main, sys.argv[1:])
