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
import time
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


#: OpenSSL's words for what went wrong in a handshake, and what it means to
#: an operator. Alerts the broker sent name our certificate; a verify
#: failure is about the broker's. Matched against the error text, whichever
#: layer reported it (a TLS 1.3 alert arrives after the handshake, at the
#: first read).
_TLS_DIAGNOSES = (
    ("TLSV1_ALERT_UNKNOWN_CA", "the broker rejected our certificate: unknown CA"),
    ("SSLV3_ALERT_CERTIFICATE_EXPIRED", "the broker rejected our certificate: certificate expired"),
    ("SSLV3_ALERT_CERTIFICATE_REVOKED", "the broker rejected our certificate: certificate revoked"),
    ("SSLV3_ALERT_BAD_CERTIFICATE", "the broker rejected our certificate: bad certificate"),
    ("SSLV3_ALERT_CERTIFICATE_UNKNOWN", "the broker rejected our certificate: not usable"),
    ("TLSV1_ALERT_DECRYPT_ERROR", "the broker rejected our certificate: signature check failed"),
    (
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
        "the broker wants a client certificate (--agent-cert/--agent-key)",
    ),
    ("TLSV1_ALERT_PROTOCOL_VERSION", "the broker refused our TLS version"),
    ("UNSUPPORTED_PROTOCOL", "no TLS version in common with the broker"),
    ("SSLV3_ALERT_HANDSHAKE_FAILURE", "TLS handshake refused by the broker (no common suite)"),
)


def tls_diagnosis(error: str) -> str | None:
    """One line saying why a TLS handshake with the broker failed, from the
    error's text; None when it names no known cause."""
    for code, meaning in _TLS_DIAGNOSES:
        if code in error:
            return meaning
    if "CERTIFICATE_VERIFY_FAILED" in error:
        detail = error.split("certificate verify failed:", 1)[-1].split("(_ssl", 1)[0]
        return f"cannot verify the broker's certificate: {detail.strip(' )') or 'untrusted'}"
    return None


# ------------------------------------------------------------ start-up checks

#: A certificate that expires sooner than this is a WARNING at start.
EXPIRY_WARNING_S = 7 * 24 * 3600


@attrs.frozen
class FileChecks:
    """What is wrong with the TLS files a command was given (one line each,
    naming the flag) and what only deserves a warning."""

    problems: list[str] = attrs.Factory(list)
    warnings: list[str] = attrs.Factory(list)


def _validity(path: str) -> tuple[float, float] | None:
    """(notBefore, notAfter) of the first certificate in ``path``, read with
    the ssl module alone (the agent's import path stays free of
    cryptography); None if this Python cannot tell."""
    decode = getattr(ssl._ssl, "_test_decode_cert", None)  # type: ignore[attr-defined]
    if decode is None:
        return None
    try:
        info = decode(path)
        return ssl.cert_time_to_seconds(info["notBefore"]), ssl.cert_time_to_seconds(
            info["notAfter"]
        )
    except (ssl.SSLError, OSError, KeyError, ValueError):
        return None


def _readable(path: str, flag: str, checks: FileChecks) -> bool:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        checks.problems.append(f"{flag}: cannot read {path}: {exc.strerror or exc}")
        return False
    return True


def check_files(
    chains: Sequence[tuple[str, str, str, str]],
    cas: Sequence[tuple[str, str]],
    now: float,
    readable: Sequence[tuple[str, str]] = (),
) -> FileChecks:
    """Check before anything starts: each (cert, key, cert flag, key flag)
    chain exists, parses, has the key that matches it and is valid now;
    each (CA bundle, flag) parses; each (file, flag) in ``readable`` can be
    read (tokens, kubeconfigs). Empty paths are skipped."""
    checks = FileChecks()
    for path, flag in readable:
        if path:
            _readable(path, flag, checks)
    for cert, key, cert_flag, key_flag in chains:
        if not cert or not key:
            continue
        if not (_readable(cert, cert_flag, checks) & _readable(key, key_flag, checks)):
            continue
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            ctx.load_cert_chain(cert, key)
        except ssl.SSLError as exc:
            if "KEY_VALUES_MISMATCH" in str(exc):
                checks.problems.append(f"{key_flag}: {key} is not the key of {cert_flag} {cert}")
            else:
                checks.problems.append(
                    f"{cert_flag}/{key_flag}: {cert} / {key} are not a PEM certificate "
                    f"and key ({exc.reason or exc})"
                )
            continue
        validity = _validity(cert)
        if validity is None:
            continue
        not_before, not_after = validity
        if now < not_before:
            checks.problems.append(
                f"{cert_flag}: {cert} is not valid yet (until {_utc(not_before)})"
            )
        elif now >= not_after:
            checks.problems.append(f"{cert_flag}: {cert} expired at {_utc(not_after)}")
        elif not_after - now < EXPIRY_WARNING_S:
            days = (not_after - now) / 86400
            checks.warnings.append(
                f"{cert_flag}: {cert} expires in {days:.1f} days ({_utc(not_after)}); renew it"
            )
    for ca, flag in cas:
        if not ca or not _readable(ca, flag, checks):
            continue
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=ca)
        except ssl.SSLError as exc:
            checks.problems.append(f"{flag}: {ca} is not a PEM CA bundle ({exc.reason or exc})")
    return checks


def start_up_checks_pass(checks: FileChecks, logger: logging.Logger) -> bool:
    """Log the warnings, and each problem once as ``cannot start: ...``;
    whether the command may start (the callers exit 2 otherwise)."""
    for warning in checks.warnings:
        logger.warning("%s", warning)
    for problem in dict.fromkeys(checks.problems):  # a file named twice is one problem
        logger.error("cannot start: %s", problem)
    return not checks.problems


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))
