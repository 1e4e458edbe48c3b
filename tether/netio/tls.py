"""TLS contexts for every listener and dialer, built in one place.

TLS 1.2 is the floor (1.3 preferred by OpenSSL's negotiation). The agent
tunnel speaks only HTTP/2 (ALPN ``h2``); the CONNECT frontend speaks
HTTP/1.1. Every server here requires a client certificate.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import attrs


class TLSConfigError(Exception):
    """A certificate, key or CA file is missing or unusable."""


def _load_chain(ctx: ssl.SSLContext, cert: str | Path, key: str | Path) -> None:
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"cannot load certificate {cert} / key {key}: {exc}") from None


def _load_ca(ctx: ssl.SSLContext, ca: str | Path) -> None:
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"cannot load CA bundle {ca}: {exc}") from None


def server_context(
    cert: str | Path,
    key: str | Path,
    client_ca: str | Path | list[str],
    *,
    alpn: list[str] | None,
    optional: bool = False,
) -> ssl.SSLContext:
    """A server context that verifies client certificates against ``client_ca``
    (one CA file or several). With ``optional`` a client may present none
    (token login); one that is presented must still verify."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    _load_chain(ctx, cert, key)
    for ca in [client_ca] if isinstance(client_ca, str | Path) else client_ca:
        _load_ca(ctx, ca)
    ctx.verify_mode = ssl.CERT_OPTIONAL if optional else ssl.CERT_REQUIRED
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def client_context(
    ca: str | Path, cert: str | Path | None, key: str | Path | None, *, alpn: list[str] | None
) -> ssl.SSLContext:
    """A client context verifying the server against ``ca``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    _load_ca(ctx, ca)
    if cert is not None and key is not None:
        _load_chain(ctx, cert, key)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


@attrs.frozen
class PeerIdentity:
    """Who a verified client certificate names: ``O=<cluster>, CN=<name>``."""

    common_name: str
    organization: str | None


def peer_identity(peercert: dict[str, Any] | None) -> PeerIdentity | None:
    if not peercert:
        return None
    cn: str | None = None
    org: str | None = None
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                cn = value
            elif key == "organizationName":
                org = value
    if cn is None:
        return None
    return PeerIdentity(cn, org)
