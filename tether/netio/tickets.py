"""TLS session tickets with a key from a file (``--agent-tls-ticket-key-file``).

OpenSSL encrypts the session tickets it issues with a key of its own, drawn
at random for each ``SSL_CTX``: a ticket cannot outlive the broker process
or be used at another replica, so after a crash every agent pays a full
handshake. With a key file every process that reads it (HA replicas,
restarts) issues and accepts the same tickets, and a reconnect resumes: no
certificate signature or chain check, a cheaper handshake.

Python's :mod:`ssl` has no API for the ticket key, so this calls
``SSL_CTX_ctrl(SSL_CTRL_SET_TLSEXT_TICKET_KEYS)`` of the libssl that Python
itself loaded, through :mod:`ctypes`, on the ``SSL_CTX`` pointer that sits
right after the object header of an ``ssl.SSLContext``. That pointer is
checked before anything is written through it (the options and verify
mode OpenSSL reports must be the ones Python set); any mismatch is a
:class:`TLSConfigError`, never a guess.

A resumed session carries the client certificate of the handshake that
created it. Tickets are bound to the trust they were verified against: the
session id context is a digest of the CA bundles, so a ticket issued under
other trust (another broker set sharing the key file by mistake, or a CA
removed since) does not resume; it is a full handshake with the current
CAs. The broker also re-checks the certificate itself on every connection
(broker/auth.py: issuer, signature, validity period, identity).

The file holds exactly :data:`KEY_SIZE` random bytes (``head -c 80
/dev/urandom``) and must not be readable by group or others. Rotation:
replace the file; the broker reloads it with the certificates (SIGHUP or
file change) and tickets under the old key fall back to a full handshake
once.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import ssl
import stat
import sys
from collections.abc import Sequence
from pathlib import Path

from tether.netio.tls import TLSConfigError

#: 16 bytes key name, 32 bytes HMAC secret, 32 bytes AES-256 key (OpenSSL's layout).
KEY_SIZE = 80
_SSL_CTRL_GET_TLSEXT_TICKET_KEYS = 58
_SSL_CTRL_SET_TLSEXT_TICKET_KEYS = 59
#: OpenSSL's SSL_VERIFY_PEER (1) and SSL_VERIFY_FAIL_IF_NO_PEER_CERT (2)
#: bits for each verify mode Python sets.
_VERIFY_MODES = {ssl.CERT_NONE: 0, ssl.CERT_OPTIONAL: 1, ssl.CERT_REQUIRED: 3}
#: How long an issued ticket may be used, seconds (OpenSSL's default is 2 h).
TICKET_LIFETIME = 3600


def load_key(path: str | Path, flag: str = "--agent-tls-ticket-key-file") -> bytes:
    """The key in ``path``; :class:`TLSConfigError` (one line) when the
    file cannot be read, is readable by group or others, or is not
    :data:`KEY_SIZE` bytes."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise TLSConfigError(f"{flag}: cannot read {path}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise TLSConfigError(f"{flag}: {path} is not a regular file")
        if st.st_mode & 0o077:
            raise TLSConfigError(
                f"{flag}: {path} is readable or writable by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 it"
            )
        data = os.read(fd, KEY_SIZE + 1)
    finally:
        os.close(fd)
    if len(data) != KEY_SIZE:
        raise TLSConfigError(
            f"{flag}: {path} must hold exactly {KEY_SIZE} random bytes "
            f"(head -c {KEY_SIZE} /dev/urandom), not {len(data)}"
            + (" or more" if len(data) > KEY_SIZE else "")
        )
    return data


def session_context(ca_files: Sequence[str | Path]) -> bytes:
    """The session id context of agent-port tickets: a digest of the CA
    bundles they were verified against (32 bytes, OpenSSL's maximum)."""
    h = hashlib.sha256(b"tether agent port tickets v1\0")
    for ca in ca_files:
        try:
            h.update(Path(ca).read_bytes())
        except OSError as exc:
            raise TLSConfigError(f"cannot read CA bundle {ca}: {exc.strerror or exc}") from None
        h.update(b"\0")
    return h.digest()


def _libssl() -> ctypes.CDLL:
    """The libssl Python's ``_ssl`` module is linked against."""
    import _ssl

    path = getattr(_ssl, "__file__", None)
    candidates: list[str] = []
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        maps = ""
    for line in maps.splitlines():
        name = line.rpartition(" ")[2]
        if "/libssl.so" in name and name not in candidates:
            candidates.append(name)
    if not candidates and path is None:
        candidates.append("")  # statically linked into the interpreter
    for name in candidates:
        try:
            lib = ctypes.CDLL(name or None)
            lib.SSL_CTX_ctrl  # noqa: B018 - the symbol must exist
            return lib
        except (OSError, AttributeError):
            continue
    raise TLSConfigError("TLS ticket keys: cannot find the libssl this Python uses")


def _ssl_ctx(lib: ctypes.CDLL, ctx: ssl.SSLContext) -> int:
    """The ``SSL_CTX *`` of ``ctx``, checked against what Python reports."""
    if sys.implementation.name != "cpython":
        raise TLSConfigError("TLS ticket keys need CPython")
    pointer = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not pointer:
        raise TLSConfigError("TLS ticket keys: no SSL_CTX in this SSLContext")
    lib.SSL_CTX_get_options.restype = ctypes.c_uint64
    lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
    lib.SSL_CTX_get_verify_mode.restype = ctypes.c_int
    lib.SSL_CTX_get_verify_mode.argtypes = [ctypes.c_void_p]
    verify = _VERIFY_MODES[ctx.verify_mode]
    if (
        lib.SSL_CTX_get_options(pointer) != int(ctx.options)
        or lib.SSL_CTX_get_verify_mode(pointer) & 0x3 != verify
    ):
        raise TLSConfigError("TLS ticket keys: this Python's SSLContext layout is not known")
    return int(pointer)


def apply(ctx: ssl.SSLContext, key: bytes, sid_ctx: bytes) -> None:
    """Make ``ctx`` issue and accept tickets under ``key``, bound to
    ``sid_ctx``; read back to be sure."""
    if len(key) != KEY_SIZE or not 0 < len(sid_ctx) <= 32:
        raise TLSConfigError("TLS ticket keys: bad key or session context size")
    lib = _libssl()
    pointer = _ssl_ctx(lib, ctx)
    lib.SSL_CTX_ctrl.restype = ctypes.c_long
    lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    lib.SSL_CTX_set_session_id_context.restype = ctypes.c_int
    lib.SSL_CTX_set_session_id_context.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    lib.SSL_CTX_set_timeout.restype = ctypes.c_long
    lib.SSL_CTX_set_timeout.argtypes = [ctypes.c_void_p, ctypes.c_long]
    buf = ctypes.create_string_buffer(key, KEY_SIZE)
    if lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_TLSEXT_TICKET_KEYS, KEY_SIZE, buf) != 1:
        raise TLSConfigError("TLS ticket keys: OpenSSL refused the key")
    back = ctypes.create_string_buffer(KEY_SIZE)
    if (
        lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_GET_TLSEXT_TICKET_KEYS, KEY_SIZE, back) != 1
        or back.raw != key
    ):
        raise TLSConfigError("TLS ticket keys: the key did not take")
    if lib.SSL_CTX_set_session_id_context(pointer, sid_ctx, len(sid_ctx)) != 1:
        raise TLSConfigError("TLS ticket keys: cannot set the session id context")
    lib.SSL_CTX_set_timeout(pointer, TICKET_LIFETIME)
    ctypes.memset(buf, 0, KEY_SIZE)
    ctypes.memset(back, 0, KEY_SIZE)
