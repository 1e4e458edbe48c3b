"""Running a command's trio main with errors mapped to exit codes."""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable

import trio

from tether.netio.logs import event


def run_main(fn: Callable[[], Awaitable[object]], log: logging.Logger) -> int:
    """Run ``fn`` under trio; 0 on a clean stop, 1 if it could not start."""
    code = 0
    try:
        trio.run(fn)
    except* OSError as group:
        for exc in group.exceptions:
            log.error("cannot start: %s", exc)
        code = 1
    except* KeyboardInterrupt:
        code = 130
    return code


async def wait_for_stop_signal(log: logging.Logger) -> None:
    """Return at SIGTERM or SIGINT (trio turns neither into an exception)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            log.info("received %s: draining", name, extra=event("drain", initiator=name))
            return
