"""Dialing a target next to the agent, with failures mapped to wire codes.

Every way a dial can fail ends in :class:`DialFailed` with a wire code: the
address is validated first (``bad_address``), and whatever the resolver or a
codec raises (``socket.gaierror``, ``UnicodeError`` from IDNA, ``ValueError``
for an embedded NUL, any other ``OSError`` or exception) is mapped, so no
address can make a dial task raise.
"""

from __future__ import annotations

import errno
import ipaddress
import socket

import trio

from edge_agent.policy import Policy
from protocol.addresses import BadAddress, parse_address
from protocol.codes import DialFailCode


class DialFailed(Exception):
    def __init__(self, code: DialFailCode, msg: str) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg


_REFUSED = {errno.ECONNREFUSED}
_UNREACHABLE = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EHOSTDOWN, errno.ENETDOWN}


def _leaf_errors(exc: BaseException) -> list[BaseException]:
    """trio reports happy-eyeballs failures as a group under ``__cause__``."""
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        out: list[BaseException] = []
        for sub in cause.exceptions:
            out.extend(_leaf_errors(sub) or [sub])
        return out
    return [exc]


def classify(exc: OSError) -> DialFailed:
    if isinstance(exc, socket.gaierror):
        return DialFailed(DialFailCode.DNS, f"name resolution failed: {exc.strerror or exc}")
    leaves = _leaf_errors(exc)
    errnos = {getattr(e, "errno", None) for e in leaves}
    detail = "; ".join(str(e) for e in leaves)
    if errnos & _REFUSED:
        return DialFailed(DialFailCode.REFUSED, f"connection refused: {detail}")
    if errnos & _UNREACHABLE:
        return DialFailed(DialFailCode.UNREACHABLE, f"unreachable: {detail}")
    if errno.ETIMEDOUT in errnos:
        return DialFailed(DialFailCode.TIMEOUT, f"connect timed out: {detail}")
    return DialFailed(DialFailCode.ERROR, detail or str(exc))


async def _allowed_address(host: str, port: int, policy: Policy) -> str:
    """Resolve ``host`` and check every address, so a name cannot smuggle a
    dial past the policy; return the address to connect to."""
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise classify(exc) from None
    addrs = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    for ip in addrs:
        if not policy.allows(ip, port):
            raise DialFailed(
                DialFailCode.FORBIDDEN, f"destination {ip}:{port} is not in the agent's allowlist"
            )
    if not addrs:
        raise DialFailed(DialFailCode.DNS, f"{host} has no addresses")
    return str(addrs[0])


async def dial_target(addr: str, timeout: float, policy: Policy | None = None) -> trio.SocketStream:
    """Open a TCP connection to ``host:port`` within ``timeout`` seconds;
    raise :class:`DialFailed` and nothing else (cancellation aside)."""
    try:
        parsed = parse_address(addr)
    except BadAddress as exc:
        raise DialFailed(DialFailCode.BAD_ADDRESS, f"{exc.reason}: {exc}") from None
    host, port = parsed.host, parsed.port
    try:
        with trio.fail_after(timeout):
            if policy is not None and not policy.open:
                host = await _allowed_address(host, port, policy)
            return await trio.open_tcp_stream(host, port)
    except trio.TooSlowError:
        raise DialFailed(
            DialFailCode.TIMEOUT, f"connect to {addr} timed out after {timeout:g}s"
        ) from None
    except OSError as exc:
        raise classify(exc) from None
    except DialFailed:
        raise
    except (UnicodeError, ValueError) as exc:
        # The resolver's codecs (IDNA) refused the name.
        raise DialFailed(DialFailCode.DNS, f"name cannot be resolved: {exc}") from None
    except Exception as exc:  # anything else is still one failed dial
        raise DialFailed(DialFailCode.ERROR, f"{type(exc).__name__}: {exc}") from None
