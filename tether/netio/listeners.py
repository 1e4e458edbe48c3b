"""Listener helpers trio does not ship: Unix sockets with a safe mode."""

from __future__ import annotations

import os
import socket
import stat

import trio


def open_unix_listener(path: str, *, mode: int = 0o660, backlog: int = 512) -> trio.SocketListener:
    """Bind a UDS at ``path`` with ``mode``; replace a stale socket, nothing else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(f"{path} exists and is not a socket; refusing to replace it")
        os.unlink(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    sock.listen(backlog)
    sock.setblocking(False)
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


async def open_tcp_listener(host: str, port: int, *, backlog: int = 512) -> trio.SocketListener:
    """One TCP listener; ``host`` empty means every address."""
    listeners = await trio.open_tcp_listeners(port, host=host or None, backlog=backlog)
    if len(listeners) == 1:
        return listeners[0]
    # Dual-stack hosts return one per family; keep the first, close the rest.
    for extra in listeners[1:]:
        await extra.aclose()
    return listeners[0]


def listener_port(listener: trio.SocketListener) -> int:
    return int(listener.socket.getsockname()[1])
