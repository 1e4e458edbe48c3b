"""Listener helpers trio does not ship: Unix sockets with an owner, a group and
a mode that never replace a live socket."""

from __future__ import annotations

import contextlib
import fcntl
import grp
import os
import pwd
import socket
import stat

import attrs
import trio


class UnixSocketError(Exception):
    """A Unix socket cannot be set up; the message is one line naming the path."""


def resolve_user(spec: str | int) -> int:
    """A uid from a user name or number; ``KeyError`` naming a missing user."""
    text = str(spec).strip()
    if text.isdigit():
        return int(text)
    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        raise KeyError(f"no such user {text!r}") from None


def resolve_group(spec: str | int) -> int:
    """A gid from a group name or number; ``KeyError`` naming a missing group."""
    text = str(spec).strip()
    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise KeyError(f"no such group {text!r}") from None


def parse_mode(spec: str | int) -> int:
    """A file mode from octal text (``"0660"``, ``"660"``) or a number (TOML ``0o660``)."""
    if isinstance(spec, bool):
        raise ValueError('must be an octal mode such as "0660"')
    if isinstance(spec, int):
        value = spec
    else:
        text = spec.strip().lower().removeprefix("0o")
        if not text or any(ch not in "01234567" for ch in text):
            raise ValueError(f'must be an octal mode such as "0660", got {spec!r}')
        value = int(text, 8)
    if not 0 <= value <= 0o777:
        raise ValueError(f"must be 0 to 0777 (permission bits only), got {value:#o}")
    return value


@attrs.frozen
class UnixSocketSpec:
    """Where and with which owner, group and mode a Unix socket is created;
    -1 keeps the process's own uid or gid."""

    path: str
    mode: int = 0o660
    uid: int = -1
    gid: int = -1


@attrs.define
class BoundUnixSocket:
    """A listening Unix socket and the file it created: (st_dev, st_ino) of
    the socket file. While the socket is open the kernel holds that inode,
    so no other file can take its number: the pair tells whether the path
    still leads to *this* socket."""

    spec: UnixSocketSpec
    sock: socket.socket
    identity: tuple[int, int]
    #: The owner, group and mode the socket file got.
    uid: int
    gid: int
    replaced_stale: bool = False

    def owned(self) -> bool:
        try:
            st = os.lstat(self.spec.path)
        except OSError:
            return False
        return stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == self.identity

    def remove_if_owned(self) -> bool:
        """Unlink the path only if it is still this socket (call before closing it)."""
        if not self.owned():
            return False
        try:
            os.unlink(self.spec.path)
        except OSError:
            return False
        return True

    def listener(self) -> trio.SocketListener:
        return trio.SocketListener(trio.socket.from_stdlib_socket(self.sock))


def bind_unix_socket(spec: UnixSocketSpec, *, backlog: int = 512) -> BoundUnixSocket:
    """Create a listening Unix socket at ``spec.path``, never taking a live one.

    Something already at the path is probed with ``connect()``: a socket
    that accepts belongs to a running process and is left alone
    (:class:`UnixSocketError` "in use by another process"); only a stale
    one (``ECONNREFUSED``: nobody listens) is replaced. A file that is not
    a socket is refused. Brokers starting at the same moment take turns on
    an ``flock`` of the directory, so two probes cannot both see a stale
    socket and the second unlink the first one's new socket. The socket is
    created owner-only, then given its owner, group and mode.
    """
    path = spec.path
    parent = os.path.dirname(path) or "."
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        raise UnixSocketError(f"socket {path}: directory: {exc.strerror or exc}") from None
    try:
        dir_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        dir_fd = -1  # a directory we may not read: no lock, the probe still runs
    try:
        # Held until listen(): a socket bound but not yet listening refuses
        # connections, and another broker's probe must not take it for stale.
        if dir_fd >= 0:
            fcntl.flock(dir_fd, fcntl.LOCK_EX)
        stale = _clear_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            raise UnixSocketError(f"socket {path}: cannot bind: {exc.strerror or exc}") from None
        finally:
            os.umask(old_umask)
        try:
            if spec.uid != -1 or spec.gid != -1:
                os.chown(path, spec.uid, spec.gid)
            os.chmod(path, spec.mode)
            st = os.lstat(path)
            sock.listen(backlog)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise UnixSocketError(
                f"socket {path}: cannot set owner {spec.uid} group {spec.gid} "
                f"mode {spec.mode:04o}: {exc.strerror or exc}"
            ) from None
    finally:
        if dir_fd >= 0:
            os.close(dir_fd)  # closing the descriptor drops the lock
    return BoundUnixSocket(spec, sock, (st.st_dev, st.st_ino), st.st_uid, st.st_gid, stale)


def _clear_stale(path: str) -> bool:
    """Remove a stale socket at ``path``; True if there was one."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise UnixSocketError(f"socket {path}: {exc.strerror or exc}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise UnixSocketError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        pass  # stale: bound once, nobody listens now
    except FileNotFoundError:
        return False
    except OSError as exc:
        # EAGAIN (a full backlog) is a live socket too; anything else we
        # cannot tell apart from one, so it is not ours to remove either.
        raise UnixSocketError(
            f"socket {path} in use by another process ({exc.strerror or exc})"
        ) from None
    else:
        raise UnixSocketError(f"socket {path} in use by another process")
    finally:
        probe.close()
    os.unlink(path)
    return True


class ListenError(OSError):
    """A listener could not be opened; the message names it, its address and the reason."""


async def open_tcp_listener(
    host: str, port: int, *, backlog: int = 512, what: str = "listener"
) -> trio.SocketListener:
    """One TCP listener; ``host`` empty means every address. ``what`` names
    it (and its flag) in the one-line error when it cannot be opened."""
    try:
        listeners = await trio.open_tcp_listeners(port, host=host or None, backlog=backlog)
    except OSError as exc:
        where = f"{host or '*'}:{port}"
        raise ListenError(
            exc.errno, f"cannot listen on {what} {where}: {exc.strerror or exc}"
        ) from None
    if len(listeners) == 1:
        return listeners[0]
    # Dual-stack hosts return one per family; keep the first, close the rest.
    for extra in listeners[1:]:
        await extra.aclose()
    return listeners[0]


def listener_port(listener: trio.SocketListener) -> int:
    return int(listener.socket.getsockname()[1])
