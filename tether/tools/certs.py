"""A small private PKI for one Tether cluster: two CAs, the broker, the frontend and the agents.

The broker learns who an agent is (cluster and agent id) from the certificate the agent
presents, so the subjects written here are part of the protocol: ``O=<cluster>``,
``OU=tether-agent`` and ``CN=<agent id>``. The frontend (kube-apiserver) has a CA of its own
(``frontend-ca.crt``, the one ``--server-ca-cert`` names), so an agent certificate never
chains to what the frontend port trusts and a frontend certificate never chains to what the
agent port trusts; its subject is ``O=<cluster>, OU=tether-frontend, CN=tether-frontend``.
The ``OU`` is the role marker: each port also checks it, so a CA file bundled into the wrong
flag still cannot turn one role into the other.

A directory holds the PKI of exactly one cluster. Running :func:`init_pki` again on the same
directory is safe: the existing CA is kept and only missing or unusable leaf files are
issued, so agents can be added one at a time without invalidating the ones already deployed.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import re
import secrets
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tether.pki import (
    BROKER_CN,
    CA_CN_PREFIX,
    DEFAULT_AGENT,
    DEFAULT_CLUSTER,
    FRONTEND_CA_CN_PREFIX,
    FRONTEND_CN,
    ROLE_AGENT,
    ROLE_FRONTEND,
)

__all__ = [
    "BROKER_CN",
    "CA_CN_PREFIX",
    "DEFAULT_AGENT",
    "DEFAULT_CLUSTER",
    "FRONTEND_CA_CN_PREFIX",
    "FRONTEND_CN",
    "ROLE_AGENT",
    "ROLE_FRONTEND",
    "CertError",
    "PkiPaths",
    "add_frontend_ca",
    "init_pki",
    "validate_name",
]


# Names end up in file names and in certificate subjects that the broker parses, so the
# alphabet is kept small enough that neither can be abused (no "/", no "..", no spaces).
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_DNS_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_RE = re.compile(rf"^(\*\.)?{_DNS_LABEL}(\.{_DNS_LABEL})*\.?$")
_DEFAULT_BROKER_SANS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")

# A CA that expires with its leaves would force every edge device to be re-provisioned at
# once; keeping it long-lived lets leaves be rotated one by one.
_CA_MIN_DAYS = 3650
# Edge devices often have poorly synchronised clocks right after boot.
_CLOCK_SKEW = datetime.timedelta(minutes=5)

_CERT_MODE = 0o644
_KEY_MODE = 0o600
_DIR_MODE = 0o700


class CertError(Exception):
    """A request that cannot be honoured without guessing: bad names or an unusable PKI dir."""


def validate_name(value: str, *, what: str) -> str:
    """Reject names that could escape the PKI directory or confuse the broker's subject parsing."""
    if not _NAME_RE.fullmatch(value):
        raise CertError(
            f"invalid {what} {value!r}: use 1-63 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return value


@attrs.frozen
class PkiPaths:
    """Where each file of a cluster's PKI lives; other components locate their TLS files here."""

    ca_cert: Path
    ca_key: Path
    frontend_ca_cert: Path
    frontend_ca_key: Path
    broker_cert: Path
    broker_key: Path
    frontend_cert: Path
    frontend_key: Path
    agents_dir: Path

    @classmethod
    def in_dir(cls, directory: Path) -> PkiPaths:
        """The fixed layout, so that callers never have to agree on file names by convention."""
        directory = Path(directory)
        return cls(
            ca_cert=directory / "ca.crt",
            ca_key=directory / "ca.key",
            frontend_ca_cert=directory / "frontend-ca.crt",
            frontend_ca_key=directory / "frontend-ca.key",
            broker_cert=directory / "broker.crt",
            broker_key=directory / "broker.key",
            frontend_cert=directory / "frontend.crt",
            frontend_key=directory / "frontend.key",
            agents_dir=directory / "agents",
        )

    def agent(self, agent_id: str) -> tuple[Path, Path]:
        """Return (cert, key); the id is validated because it becomes part of a path."""
        validate_name(agent_id, what="agent id")
        return self.agents_dir / f"{agent_id}.crt", self.agents_dir / f"{agent_id}.key"


@attrs.frozen
class _Ca:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def init_pki(
    directory: Path,
    *,
    cluster: str | None = None,
    agents: Sequence[str] = (DEFAULT_AGENT,),
    extra_sans: Sequence[str] = (),
    days: int = 365,
    force: bool = False,
    report: Callable[[Path], None] | None = None,
) -> PkiPaths:
    """Create or complete the PKI in ``directory`` and return its layout.

    ``cluster`` defaults to the existing CA's cluster, or ``"default"`` for a new CA; naming a
    different cluster than the existing CA's is an error rather than a silent mix of two
    clusters in one directory. A new CA (first run, missing ``ca.crt`` or ``force``) reissues
    every leaf in the directory, including agents issued earlier, because the old ones would no
    longer verify. ``report`` is called with each file written, for user-facing summaries.
    """
    if cluster is not None:
        validate_name(cluster, what="cluster name")
    agent_ids = list(dict.fromkeys(_agent_id(a) for a in agents))
    wanted_sans = _parse_sans([*_DEFAULT_BROKER_SANS, *extra_sans])
    if days < 1:
        raise CertError(f"invalid validity {days} days: must be at least 1")

    paths = PkiPaths.in_dir(Path(directory))
    _ensure_dir(Path(directory))
    _ensure_dir(paths.agents_dir)
    emit = report if report is not None else _ignore

    ca: _Ca | None = None
    if paths.ca_cert.exists() and not force:
        ca = _load_ca(paths)
        ca_cluster = _cluster_of_ca(ca.cert)
        if cluster is None:
            cluster = ca_cluster or DEFAULT_CLUSTER
        elif ca_cluster is not None and ca_cluster != cluster:
            raise CertError(
                f"{paths.ca_cert} belongs to cluster {ca_cluster!r}, not {cluster!r}; "
                "use another directory or --force to replace the CA"
            )
    if cluster is None:
        cluster = DEFAULT_CLUSTER

    now = datetime.datetime.now(datetime.UTC)
    fresh_ca = ca is None
    if ca is None:
        ca = _new_ca(cluster, now, days)
        # Key first: a crash between the two writes then leaves no ca.crt, and the next run
        # starts over instead of finding a certificate whose key is missing.
        _write_key(paths.ca_key, ca.key, emit)
        _write_cert(paths.ca_cert, ca.cert, emit)
        # Agents issued by the replaced CA are reissued too: keeping them would leave
        # certificates in the directory that the new CA no longer vouches for.
        agent_ids = list(dict.fromkeys([*agent_ids, *_existing_agent_ids(paths.agents_dir)]))

    issuer = _Issuer(ca, now, days)

    broker = None if fresh_ca else _usable_leaf(paths.broker_cert, paths.broker_key, ca)
    if broker is None or not wanted_sans <= _sans_of(broker):
        # Keep SANs from an earlier run so that adding one name never drops another.
        sans = wanted_sans if broker is None else _sans_of(broker) | wanted_sans
        issuer.issue(
            paths.broker_cert,
            paths.broker_key,
            subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, BROKER_CN)]),
            usage=ExtendedKeyUsageOID.SERVER_AUTH,
            sans=_ordered_sans(sans),
            emit=emit,
        )

    _ensure_frontend(paths, cluster, now, days, emit, fresh=fresh_ca)

    for agent_id in agent_ids:
        cert_path, key_path = paths.agent(agent_id)
        if fresh_ca or _usable_leaf(cert_path, key_path, ca) is None:
            issuer.issue(
                cert_path,
                key_path,
                subject=_client_subject(cluster, agent_id, ROLE_AGENT),
                usage=ExtendedKeyUsageOID.CLIENT_AUTH,
                sans=[],
                emit=emit,
            )

    return paths


def add_frontend_ca(
    directory: Path,
    *,
    days: int = 365,
    report: Callable[[Path], None] | None = None,
) -> PkiPaths:
    """Give an existing PKI (from before the frontend CA) its frontend CA.

    Writes ``frontend-ca.crt``/``frontend-ca.key`` (kept if already there and usable) and
    reissues ``frontend.crt``/``frontend.key`` from it; ``ca.crt``, the broker certificate
    and every agent certificate stay as they are, so no edge device needs touching. The
    broker's ``--server-ca-cert`` then names ``frontend-ca.crt``.
    """
    if days < 1:
        raise CertError(f"invalid validity {days} days: must be at least 1")
    paths = PkiPaths.in_dir(Path(directory))
    if not paths.ca_cert.exists():
        raise CertError(f"{paths.ca_cert} does not exist: run `tether certs init` instead")
    ca = _load_ca(paths)
    cluster = _cluster_of_ca(ca.cert) or DEFAULT_CLUSTER
    emit = report if report is not None else _ignore
    _ensure_frontend(paths, cluster, datetime.datetime.now(datetime.UTC), days, emit, fresh=False)
    return paths


def _ensure_frontend(
    paths: PkiPaths,
    cluster: str,
    now: datetime.datetime,
    days: int,
    emit: Callable[[Path], None],
    *,
    fresh: bool,
) -> None:
    """The frontend CA (made if missing, unusable or of another cluster, or if ``fresh``)
    and a frontend certificate it issued."""
    fca: _Ca | None = None
    if not fresh and paths.frontend_ca_cert.exists():
        try:
            fca = _load_ca(paths, frontend=True)
        except CertError:
            fca = None
        if fca is not None and _cluster_of_ca(fca.cert, FRONTEND_CA_CN_PREFIX) != cluster:
            fca = None
    new_fca = fca is None
    if fca is None:
        fca = _new_ca(cluster, now, days, prefix=FRONTEND_CA_CN_PREFIX)
        _write_key(paths.frontend_ca_key, fca.key, emit)
        _write_cert(paths.frontend_ca_cert, fca.cert, emit)
    if new_fca or _usable_leaf(paths.frontend_cert, paths.frontend_key, fca) is None:
        _Issuer(fca, now, days).issue(
            paths.frontend_cert,
            paths.frontend_key,
            subject=_client_subject(cluster, FRONTEND_CN, ROLE_FRONTEND),
            usage=ExtendedKeyUsageOID.CLIENT_AUTH,
            sans=[],
            emit=emit,
        )


def _agent_id(value: str) -> str:
    validate_name(value, what="agent id")
    if value == FRONTEND_CN:
        raise CertError(f"invalid agent id {value!r}: reserved for the frontend certificate")
    return value


def _ignore(_path: Path) -> None:
    """Stand-in report callback so the issuing code needs no None checks."""


def _client_subject(cluster: str, common_name: str, role: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, cluster),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _parse_sans(names: Iterable[str]) -> frozenset[x509.GeneralName]:
    """IP literals must become iPAddress entries: TLS clients never match an IP against DNS."""
    result: set[x509.GeneralName] = set()
    for name in names:
        try:
            result.add(x509.IPAddress(ipaddress.ip_address(name)))
            continue
        except ValueError:
            pass
        if len(name) > 253 or not _DNS_RE.fullmatch(name):
            raise CertError(f"invalid subject alternative name {name!r}: not an IP or DNS name")
        result.add(x509.DNSName(name.rstrip(".").lower()))
    return frozenset(result)


def _ordered_sans(sans: Iterable[x509.GeneralName]) -> list[x509.GeneralName]:
    """A stable order keeps reissued certificates easy to compare by eye (openssl x509 -text)."""

    def key(name: x509.GeneralName) -> tuple[int, str]:
        if isinstance(name, x509.DNSName):
            return (0, name.value)
        if isinstance(name, x509.IPAddress):
            return (1 if name.value.version == 4 else 2, str(name.value))
        return (3, repr(name))

    return sorted(sans, key=key)


def _sans_of(cert: x509.Certificate) -> frozenset[x509.GeneralName]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return frozenset()
    return frozenset(ext.value)


def _cluster_of_ca(cert: x509.Certificate, prefix: str = CA_CN_PREFIX) -> str | None:
    """None for a CA not made by this module (an operator may bring their own)."""
    for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        value = attr.value if isinstance(attr.value, str) else attr.value.decode()
        if value.startswith(prefix):
            return value[len(prefix) :]
    return None


def _ensure_dir(path: Path) -> None:
    """Create with 0700 explicitly: mkdir's mode is filtered by the umask."""
    if path.is_dir():
        return
    path.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    os.chmod(path, _DIR_MODE)


def _existing_agent_ids(agents_dir: Path) -> list[str]:
    found = {p.stem for p in agents_dir.glob("*.crt")} | {p.stem for p in agents_dir.glob("*.key")}
    return sorted(a for a in found if _NAME_RE.fullmatch(a))


def _load_ca(paths: PkiPaths, *, frontend: bool = False) -> _Ca:
    cert_path, key_path = (
        (paths.frontend_ca_cert, paths.frontend_ca_key)
        if frontend
        else (paths.ca_cert, paths.ca_key)
    )
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except ValueError as exc:
        raise CertError(f"{cert_path} is not a PEM certificate: {exc}") from exc
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise CertError(
            f"{cert_path} exists but {key_path} does not; use --force to make a new CA"
        ) from exc
    except (ValueError, TypeError) as exc:
        raise CertError(f"{key_path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not _same_public_key(key, cert):
        raise CertError(f"{key_path} is not the EC private key of {cert_path}")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise CertError(f"{cert_path} is not a CA certificate")
    return _Ca(cert=cert, key=key)


def _same_public_key(key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key.public_key().public_bytes(*fmt) == cert.public_key().public_bytes(*fmt)


def _usable_leaf(cert_path: Path, key_path: Path, ca: _Ca) -> x509.Certificate | None:
    """The existing leaf if it can still be deployed as is, else None so it gets reissued.

    Anything short of a matching key pair, issued by this CA and not about to expire, would
    only fail later in a TLS handshake on a remote device, where it is much harder to debug.
    """
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not _same_public_key(key, cert):
        return None
    try:
        cert.verify_directly_issued_by(ca.cert)
    except (ValueError, TypeError, InvalidSignature):
        return None
    if cert.not_valid_after_utc <= datetime.datetime.now(datetime.UTC):
        return None
    return cert


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _new_ca(cluster: str, now: datetime.datetime, days: int, *, prefix: str = CA_CN_PREFIX) -> _Ca:
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{prefix}{cluster}")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=max(days, _CA_MIN_DAYS)))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _Ca(cert=cert, key=key)


@attrs.frozen
class _Issuer:
    ca: _Ca
    now: datetime.datetime
    days: int

    def issue(
        self,
        cert_path: Path,
        key_path: Path,
        *,
        subject: x509.Name,
        usage: x509.ObjectIdentifier,
        sans: list[x509.GeneralName],
        emit: Callable[[Path], None],
    ) -> None:
        key = _new_key()
        # A leaf outliving its CA is rejected by verifiers anyway; clamping makes the
        # certificate say what will actually happen.
        not_after = min(
            self.now + datetime.timedelta(days=self.days), self.ca.cert.not_valid_after_utc
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.ca.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.now - _CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca.key.public_key()),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.ca.key, hashes.SHA256())
        _write_key(key_path, key, emit)
        _write_cert(cert_path, cert, emit)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey, emit: Callable[[Path], None]) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_atomic(path, data, _KEY_MODE)
    emit(path)


def _write_cert(path: Path, cert: x509.Certificate, emit: Callable[[Path], None]) -> None:
    _write_atomic(path, cert.public_bytes(serialization.Encoding.PEM), _CERT_MODE)
    emit(path)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write via a fresh file created with ``mode`` and renamed into place.

    Creating the file with its final mode means a key is never readable by others, not even
    briefly; the rename means a reader (or a crash) never sees half a PEM file, and that a
    pre-existing file with looser permissions is replaced rather than rewritten in place.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            # The umask may have stripped bits we want (0644 for certificates).
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
