"""Running a command's trio main with errors mapped to exit codes."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio


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
