"""Process self-inspection for leak checks: live trio tasks and open fds.

Exposed as gauges on both commands' metrics, so a soak or leak test (or an
operator) can see that tasks and descriptors return to their baseline once
traffic stops.
"""

from __future__ import annotations

import os

import trio


def trio_task_count() -> int:
    """Every task in the running trio loop (call from the trio thread)."""
    try:
        root = trio.lowlevel.current_root_task()
    except RuntimeError:
        return 0
    if root is None:
        return 0
    count = 0
    stack = [root]
    while stack:
        task = stack.pop()
        count += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count


def open_fd_count() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0
