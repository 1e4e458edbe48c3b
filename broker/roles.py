"""Which role a client certificate may play: agent or frontend.

Roles are kept apart three ways, so that no single mistake merges them:

1. **Separate CAs.** ``tether certs init`` issues agent certificates from
   ``ca.crt`` and the frontend certificate from ``frontend-ca.crt``; the
   agent port trusts only agent CAs (``--cluster-ca-cert``, ``agent_ca``),
   the TCP frontend only frontend CAs (``--server-ca-cert``, ``frontend_ca``).
2. **A role marker in the subject.** ``OU=tether-agent`` or
   ``OU=tether-frontend`` (see :mod:`tether.pki`).
3. **A list of frontend subjects** (``--frontend-allowed-subjects``, default
   ``tether-frontend``): the common names a frontend certificate without a
   role marker may carry (an operator's own PKI, or one from before the
   marker).

A frontend is accepted when its certificate was issued by a cluster's
frontend CA (that CA, never a subject field, decides the cluster), carries
no agent marker, and carries the frontend marker or an allowed common name;
an ``O`` naming another cluster is refused. An agent is refused with
``wrong_role`` when its certificate carries the frontend marker, an allowed
frontend common name, or was issued by a CA named as a frontend CA.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from tether.pki import FRONTEND_CA_CN_PREFIX, FRONTEND_CN, ROLE_AGENT, ROLE_FRONTEND

DEFAULT_FRONTEND_SUBJECTS = (FRONTEND_CN,)
SHA256 = hashes.SHA256()


class RoleError(Exception):
    """A certificate refused for the port it came to; ``reason`` is a metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


def parse_subjects(text: str) -> frozenset[str]:
    """``--frontend-allowed-subjects``: comma-separated common names."""
    return frozenset(s.strip() for s in text.split(",") if s.strip())


def _values(name: x509.Name, oid: x509.ObjectIdentifier) -> list[str]:
    return [str(a.value) for a in name.get_attributes_for_oid(oid)]


def _cn(name: x509.Name) -> str | None:
    values = _values(name, NameOID.COMMON_NAME)
    return values[0] if values else None


def frontend_role_of(cert: x509.Certificate, subjects: frozenset[str]) -> str | None:
    """Why ``cert`` may not be used as a frontend client, or None if it may."""
    units = _values(cert.subject, NameOID.ORGANIZATIONAL_UNIT_NAME)
    cn = _cn(cert.subject)
    if ROLE_AGENT in units:
        return f"certificate {cn!r} is an agent certificate (OU={ROLE_AGENT})"
    if ROLE_FRONTEND in units or cn in subjects:
        return None
    return (
        f"certificate {cn!r} carries no frontend role (OU={ROLE_FRONTEND}) and its "
        "common name is not in --frontend-allowed-subjects"
    )


def agent_role_of(cert: x509.Certificate, subjects: frozenset[str]) -> str | None:
    """Why ``cert`` may not register as an agent, or None if it may."""
    units = _values(cert.subject, NameOID.ORGANIZATIONAL_UNIT_NAME)
    cn = _cn(cert.subject)
    if ROLE_FRONTEND in units:
        return f"certificate {cn!r} is a frontend certificate (OU={ROLE_FRONTEND})"
    if cn in subjects:
        return f"common name {cn!r} is a frontend subject (--frontend-allowed-subjects)"
    issuer = _cn(cert.issuer) or ""
    if issuer.startswith(FRONTEND_CA_CN_PREFIX):
        return f"certificate was issued by the frontend CA {issuer!r}"
    return None


def issuing(cert: x509.Certificate, cas: Iterable[tuple[str, x509.Certificate]]) -> str | None:
    """The first name whose CA directly issued ``cert`` (signature checked)."""
    for name, ca in cas:
        if ca.subject != cert.issuer:
            continue
        try:
            cert.verify_directly_issued_by(ca)
        except Exception:  # signature, key type or extension mismatch
            continue
        return name
    return None


def load_pem_bundle(path: str) -> list[x509.Certificate]:
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificates(f.read())


@attrs.define
class FrontendSource:
    """Where one cluster's frontend CAs come from."""

    cluster: str
    ca_file: str
    #: True when the CA file is the cluster's agent CA (a cluster without
    #: ``frontend_ca``: a PKI from before the frontend CA).
    legacy: bool = False


class FrontendTrust:
    """Decides the cluster and the role of a TCP frontend client certificate."""

    def __init__(self, sources: Sequence[FrontendSource], subjects: frozenset[str]) -> None:
        self.sources = list(sources)
        self.subjects = subjects
        self._cas: list[tuple[str, x509.Certificate]] = []
        self.load()

    @property
    def ca_files(self) -> list[str]:
        return list(dict.fromkeys(s.ca_file for s in self.sources))

    def load(self) -> None:
        """(Re)read the CA files; called with every rebuild of the TLS context."""
        self._cas = [(s.cluster, ca) for s in self.sources for ca in load_pem_bundle(s.ca_file)]

    def identify(self, der: bytes | None) -> str:
        """The cluster this client certificate is a frontend of; RoleError if none."""
        if not der:
            raise RoleError("unauthenticated", "no client certificate")
        cert = x509.load_der_x509_certificate(der)
        cluster = issuing(cert, self._cas)
        if cluster is None:
            raise RoleError("unknown_issuer", "certificate issuer is no cluster's frontend CA")
        why = frontend_role_of(cert, self.subjects)
        if why is not None:
            raise RoleError("wrong_role", why)
        for org in _values(cert.subject, NameOID.ORGANIZATION_NAME):
            if org != cluster:
                raise RoleError(
                    "identity_mismatch",
                    f"certificate names cluster {org!r}, but was issued by the frontend CA "
                    f"of cluster {cluster!r}",
                )
        return cluster

    def migration_warnings(self, agent_ca_files: Iterable[str]) -> list[str]:
        """One line per frontend CA that is also an agent CA: an old PKI."""
        agent_cas = set()
        for path in agent_ca_files:
            agent_cas |= {ca.fingerprint(SHA256) for ca in load_pem_bundle(path)}
        lines = []
        for source in self.sources:
            shared = any(
                ca.fingerprint(SHA256) in agent_cas for ca in load_pem_bundle(source.ca_file)
            )
            if not (shared or source.legacy):
                continue
            where = (
                f"cluster {source.cluster} has no frontend_ca, so its agent CA "
                f"{source.ca_file} vouches for frontend clients"
                if source.legacy
                else f"{source.ca_file} (frontend CA of cluster {source.cluster}) is also an "
                "agent CA"
            )
            lines.append(
                f"{where}: frontend and agent certificates are told apart by their subjects "
                "only (a PKI from before the frontend CA, accepted for one more release, or "
                "an agent CA bundled into the frontend's). Run `tether certs add-frontend-ca "
                "<pki dir>` and point --server-ca-cert (or frontend_ca) at "
                "<pki dir>/frontend-ca.crt alone"
            )
        return lines
