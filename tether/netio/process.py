"""Running a command's trio main with errors mapped to exit codes."""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable

import trio

from tether.netio.listeners import ListenError
from tether.netio.logs import event

#: Stop signals that arrived while no trio signal receiver was open.
_early: list[int] = []


def _record(signum: int, _frame: object) -> None:
    _early.append(signum)


def catch_stop_signals_early() -> None:
    """From now on SIGTERM and SIGINT are never fatal: until the command
    waits for them (:func:`wait_for_stop_signal`), and during its drain after
    that, they are recorded instead of ending the process with status 143.
    Called first thing in each command's ``main``."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _record)


def run_main(fn: Callable[[], Awaitable[object]], log: logging.Logger) -> int:
    """Run ``fn`` under trio; 0 on a clean stop, 1 if it could not start."""
    code = 0
    try:
        trio.run(fn)
    except* ListenError as listen_errors:  # a port taken, an address the host lacks: exit 2
        for exc in listen_errors.exceptions:
            log.error("cannot start: %s", exc)
        code = 2
    except* OSError as os_errors:
        for error in os_errors.exceptions:
            log.error("cannot start: %s", error)
        code = 1
    except* KeyboardInterrupt:
        code = 130
    finally:
        # The drain is over; a stop signal now would only race the exit. Ignored
        # handlers survive interpreter shutdown, which resets Python ones to the
        # default (fatal) action.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)
    return code


async def wait_for_stop_signal(log: logging.Logger) -> None:
    """Return at SIGTERM or SIGINT (trio turns neither into an exception)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        if _early:  # it came while the command was still starting
            name = signal.Signals(_early[0]).name
            log.info(
                "received %s during start-up: draining", name, extra=event("drain", initiator=name)
            )
            return
        async for signum in signals:
            name = signal.Signals(signum).name
            log.info("received %s: draining", name, extra=event("drain", initiator=name))
            return
