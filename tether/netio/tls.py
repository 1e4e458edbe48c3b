"""TLS contexts for every listener and dialer, built in one place.

TLS 1.2 is the floor (1.3 preferred by OpenSSL's negotiation); the broker's
agent port asks for 1.3 by default (``--agent-tls-min-version``). Wherever
1.2 is allowed only ECDHE key exchange with AEAD ciphers (AES-GCM,
ChaCha20-Poly1305) is offered or accepted: no CBC, no static RSA key
exchange (every TLS 1.3 suite is AEAD already). The agent tunnel speaks only
HTTP/2 (ALPN ``h2``); the CONNECT frontend speaks HTTP/1.1. Every server
here requires a client certificate.

Certificates rotate without a restart: each listener or dialer holds a
:class:`ReloadableContext` and takes :attr:`ReloadableContext.current` for
every new connection, and :func:`watch_certificates` rebuilds the contexts on
SIGHUP or when their files change.
"""

from __future__ import annotations

import logging
import os
import signal
import ssl
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs
import trio

from tether.netio.logs import event

log = logging.getLogger("tether.tls")


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


#: TLS 1.2 suites allowed anywhere: forward secret (ECDHE) and AEAD only.
AEAD_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"

#: ``--agent-tls-min-version`` values.
TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def _harden(ctx: ssl.SSLContext, min_version: str) -> None:
    try:
        ctx.minimum_version = TLS_VERSIONS[min_version]
    except KeyError:
        raise TLSConfigError(f"unknown TLS version {min_version!r}: use 1.2 or 1.3") from None
    ctx.set_ciphers(AEAD_CIPHERS)


def server_context(
    cert: str | Path,
    key: str | Path,
    client_ca: str | Path | list[str],
    *,
    alpn: list[str] | None,
    optional: bool = False,
    min_version: str = "1.2",
) -> ssl.SSLContext:
    """A server context that verifies client certificates against ``client_ca``
    (one CA file or several). With ``optional`` a client may present none
    (token login); one that is presented must still verify."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx, min_version)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
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
    _harden(ctx, "1.2")
    ctx.options |= ssl.OP_NO_COMPRESSION
    _load_ca(ctx, ca)
    if cert is not None and key is not None:
        _load_chain(ctx, cert, key)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


# ------------------------------------------------------------------ rotation


@attrs.frozen
class CertInfo:
    serial: int
    not_after: float  # seconds since the epoch


def describe_cert(path: str | Path) -> CertInfo | None:
    """Serial and expiry of the first certificate in a PEM file (None if unreadable).

    cryptography is imported here, not at module level: the agent's import
    path stays light, and this only runs on a reload or a metrics scrape.
    """
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError):
        return None
    return CertInfo(cert.serial_number, cert.not_valid_after_utc.timestamp())


_Stamp = tuple[int, int, int] | None


class ReloadableContext:
    """The SSL context a listener or dialer uses for its next connection.

    An ``SSLContext`` reads its files once, when it is built. Rotation tools
    (cert-manager, a Kubernetes Secret volume, a fleet agent) replace the
    files instead, so this holder rebuilds the context from the same
    ``build`` function on demand. A connection keeps the context it was made
    with: open tunnels are never disturbed by a rotation. A rebuild that
    fails (a half-copied file, a key that does not match its certificate)
    keeps the previous context, so a botched rotation never stops service;
    it is logged and counted, and retried when the files change again.
    """

    def __init__(
        self,
        name: str,
        build: Callable[[], ssl.SSLContext],
        files: Sequence[str | Path],
        *,
        cert_file: str | Path | None = None,
    ) -> None:
        #: Which certificate this is, for logs and metric labels.
        self.name = name
        self._build = build
        self.files = tuple(str(f) for f in files if f)
        self.cert_file = str(cert_file) if cert_file else None
        self._stamps = self._stat()
        self._context = build()  # TLSConfigError here: the command exits 2
        self._info: tuple[tuple[_Stamp, ...], CertInfo | None] | None = None

    @property
    def current(self) -> ssl.SSLContext:
        return self._context

    def _stat(self) -> tuple[_Stamp, ...]:
        stamps: list[_Stamp] = []
        for path in self.files:
            try:
                st = os.stat(path)  # follows symlinks: a Secret volume's swap counts
            except OSError:
                stamps.append(None)
            else:
                stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(stamps)

    def changed(self) -> bool:
        """Whether any file changed since the last (attempted) build."""
        return self._stat() != self._stamps

    def cert_info(self) -> CertInfo | None:
        """The leaf certificate now in use (cached until the next reload)."""
        if self.cert_file is None:
            return None
        if self._info is None or self._info[0] != self._stamps:
            self._info = (self._stamps, describe_cert(self.cert_file))
        return self._info[1]

    def reload(self, trigger: str) -> bool:
        """Rebuild from the files; on failure keep the current context."""
        stamps = self._stat()  # before reading: a change during the build is seen next time
        try:
            context = self._build()
        except TLSConfigError as exc:
            self._stamps = stamps
            log.error(
                "cannot reload the %s certificate (%s); the previous one stays in use: %s",
                self.name,
                trigger,
                exc,
                extra=event("cert_reload_failed", cert=self.name, trigger=trigger, error=str(exc)),
            )
            return False
        self._context, self._stamps = context, stamps
        info = self.cert_info()
        log.info(
            "reloaded the %s certificate (%s): serial %s; new connections use it",
            self.name,
            trigger,
            f"{info.serial:x}" if info else "-",
            extra=event(
                "cert_reloaded",
                cert=self.name,
                trigger=trigger,
                serial=f"{info.serial:x}" if info else None,
                not_after=info.not_after if info else None,
            ),
        )
        return True


#: How long a change must settle before a reload: rotation tools copy the
#: certificate and the key one after the other.
SETTLE = 0.25


async def watch_certificates(
    contexts: Sequence[ReloadableContext],
    interval: float,
    on_reload: Callable[[ReloadableContext, bool], None] | None = None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Reload ``contexts`` on SIGHUP, and when their files change (checked
    every ``interval`` seconds: a few ``stat`` calls; 0 turns polling off).

    ``task_status.started()`` fires once SIGHUP is handled, so a caller that
    waits for it knows a SIGHUP can no longer kill the process.
    """

    def reload(ctx: ReloadableContext, trigger: str) -> None:
        ok = ctx.reload(trigger)
        if on_reload is not None:
            on_reload(ctx, ok)

    async def poll() -> None:
        while True:
            await trio.sleep(interval)
            changed = [ctx for ctx in contexts if ctx.changed()]
            if changed:
                await trio.sleep(SETTLE)
                for ctx in changed:
                    reload(ctx, "file change")

    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            if interval > 0:
                nursery.start_soon(poll)
            task_status.started()
            async for _ in signals:
                for ctx in contexts:
                    reload(ctx, "SIGHUP")
