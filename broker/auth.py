"""Who is this agent? Identity from a client certificate or a bearer token.

- **mTLS.** The certificate's issuer decides the cluster (each cluster has
  its own CA); its subject names the agent (``CN``) and may name the cluster
  (``O``). Headers that disagree are refused with 403: no impersonation.
  A frontend certificate (see :mod:`broker.roles`) is refused with 403
  ``wrong_role``, whichever CA file it got past.
- **Tokens.** ``Authorization: Bearer <token>``, checked against a token file
  of sha256 entries, each scoped to a cluster and an agent-id pattern. The
  file is re-read when it changes, so removing a line revokes a token on the
  agent's next connect.

Token file format, one entry per line (``#`` starts a comment)::

    sha256:<64 hex digits>  <cluster>  <agent-id glob>
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import logging
import os
import re

import attrs
from cryptography import x509
from cryptography.x509.oid import NameOID

from broker import roles
from broker.clusters import ClusterConfig
from broker.tokenreview import TokenReviewer, TokenReviewError, load_kubeconfig
from protocol.identifiers import valid_name

log = logging.getLogger("tether.broker")

_ENTRY = re.compile(r"^sha256:([0-9a-fA-F]{64})\s+(\S+)\s+(\S+)$")


@attrs.frozen
class Identity:
    cluster: str
    agent_id: str
    method: str  # "mtls" or "token"


class AuthError(Exception):
    """Refused; ``reason`` is a stable token used as a metric label."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.status = status
        self.reason = reason


@attrs.frozen
class TokenEntry:
    digest: bytes
    cluster: str
    agent_pattern: str


class TokenStore:
    """sha256 token entries from a file, reloaded when the file changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._entries: list[TokenEntry] = []
        self.reload_if_changed()

    def reload_if_changed(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            log.error("token file %s unreadable: %s; refusing token logins", self.path, exc)
            self._entries, self._stamp = [], None
            return
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return
        entries = []
        with open(self.path, encoding="utf-8") as f:
            for number, raw in enumerate(f, 1):
                line = raw.split("#", 1)[0].strip()
                if not line:
                    continue
                m = _ENTRY.match(line)
                if m is None:
                    log.error("token file %s line %d is malformed; skipped", self.path, number)
                    continue
                entries.append(TokenEntry(bytes.fromhex(m[1]), m[2], m[3]))
        self._entries, self._stamp = entries, stamp
        log.info("token file %s loaded: %d entr(ies)", self.path, len(entries))

    def match(self, token: str) -> list[TokenEntry]:
        self.reload_if_changed()
        digest = hashlib.sha256(token.encode()).digest()
        return [e for e in self._entries if hmac.compare_digest(e.digest, digest)]


def _name_attr(name: x509.Name, oid: x509.ObjectIdentifier) -> str | None:
    attrs_ = name.get_attributes_for_oid(oid)
    return str(attrs_[0].value) if attrs_ else None


class Authenticator:
    def __init__(
        self,
        clusters: list[ClusterConfig],
        tokens: TokenStore | None,
        *,
        frontend_subjects: frozenset[str] = frozenset(roles.DEFAULT_FRONTEND_SUBJECTS),
    ) -> None:
        self.clusters = {c.name: c for c in clusters}
        #: Common names only a frontend may carry (--frontend-allowed-subjects).
        self.frontend_subjects = frontend_subjects
        self.tokens = tokens
        self.reviewers: dict[str, tuple[TokenReviewer, frozenset[str]]] = {}
        for cluster in clusters:
            if cluster.tokenreview_kubeconfig:
                reviewer = TokenReviewer(
                    load_kubeconfig(cluster.tokenreview_kubeconfig), cluster.tokenreview_audience
                )
                allowed = frozenset(
                    "system:serviceaccount:" + sa for sa in cluster.allowed_service_accounts
                )
                self.reviewers[cluster.name] = (reviewer, allowed)
        self._cas: list[tuple[str, x509.Certificate]] = []
        self.load_cas()

    def load_cas(self) -> None:
        """(Re)read every cluster's CA bundle. Called again when the agent
        listener's certificates are reloaded, so a CA added to a bundle during
        a rotation decides the cluster just as the TLS layer trusts it."""
        cas = []
        for cluster in self.clusters.values():
            if cluster.agent_ca:
                with open(cluster.agent_ca, "rb") as f:
                    for ca in x509.load_pem_x509_certificates(f.read()):
                        cas.append((cluster.name, ca))
        self._cas = cas

    @property
    def ca_files(self) -> list[str]:
        return sorted({c.agent_ca for c in self.clusters.values() if c.agent_ca})

    @property
    def allows_tokens(self) -> bool:
        file_tokens = self.tokens is not None and any(
            c.token_agents for c in self.clusters.values()
        )
        return file_tokens or bool(self.reviewers)

    async def authenticate(self, peer_der: bytes | None, headers: dict[str, str]) -> Identity:
        agent_id = headers.get("tether-agent-id", "")
        claimed_cluster = headers.get("tether-cluster", "")
        if not valid_name(agent_id):
            raise AuthError(403, "bad_agent_id", "missing or invalid tether-agent-id header")
        if claimed_cluster and not valid_name(claimed_cluster):
            raise AuthError(403, "bad_cluster", "invalid tether-cluster header")
        if peer_der:
            return self._by_certificate(peer_der, agent_id, claimed_cluster)
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer ") and len(auth) > 7:
            return await self._by_token(auth[7:].strip(), agent_id, claimed_cluster)
        raise AuthError(401, "unauthenticated", "no client certificate and no bearer token")

    def _by_certificate(self, der: bytes, agent_id: str, claimed: str) -> Identity:
        cert = x509.load_der_x509_certificate(der)
        cluster = self._issuing_cluster(cert)
        if cluster is None:
            raise AuthError(403, "unknown_issuer", "certificate issuer matches no cluster CA")
        wrong_role = roles.agent_role_of(cert, self.frontend_subjects)
        if wrong_role is not None:
            raise AuthError(403, "wrong_role", f"{wrong_role}: not an agent credential")
        cn = _name_attr(cert.subject, NameOID.COMMON_NAME)
        org = _name_attr(cert.subject, NameOID.ORGANIZATION_NAME)
        if cn != agent_id:
            raise AuthError(
                403,
                "identity_mismatch",
                f"certificate names agent {cn!r}, header claims {agent_id!r}",
            )
        for source, name in (("certificate", org), ("header", claimed)):
            if name and name != cluster:
                raise AuthError(
                    403,
                    "identity_mismatch",
                    f"{source} names cluster {name!r}, but the certificate was issued "
                    f"for cluster {cluster!r}",
                )
        return Identity(cluster, agent_id, "mtls")

    def _issuing_cluster(self, cert: x509.Certificate) -> str | None:
        for cluster, ca in self._cas:
            if ca.subject != cert.issuer:
                continue
            try:
                cert.verify_directly_issued_by(ca)
            except (ValueError, TypeError, Exception):  # signature or type mismatch
                continue
            return cluster
        return None

    async def _by_token(self, token: str, agent_id: str, claimed: str) -> Identity:
        entries = self.tokens.match(token) if self.tokens is not None else []
        if not entries:
            if self.reviewers:
                return await self._by_token_review(token, agent_id, claimed)
            if self.tokens is None:
                raise AuthError(401, "unauthenticated", "token login is not enabled here")
            raise AuthError(401, "bad_token", "unknown or revoked token")
        for entry in entries:
            cluster = self.clusters.get(entry.cluster)
            if cluster is None or not cluster.token_agents:
                continue
            if claimed and claimed != entry.cluster:
                continue
            if fnmatch.fnmatchcase(agent_id, entry.agent_pattern):
                return Identity(entry.cluster, agent_id, "token")
        raise AuthError(
            403,
            "token_scope",
            f"token is not valid for agent {agent_id!r}"
            + (f" in cluster {claimed!r}" if claimed else ""),
        )

    async def _by_token_review(self, token: str, agent_id: str, claimed: str) -> Identity:
        if claimed:
            if claimed not in self.reviewers:
                raise AuthError(403, "token_scope", f"cluster {claimed!r} takes no reviewed tokens")
            cluster = claimed
        elif len(self.reviewers) == 1:
            cluster = next(iter(self.reviewers))
        else:
            raise AuthError(403, "bad_cluster", "several clusters: send tether-cluster")
        reviewer, allowed = self.reviewers[cluster]
        try:
            result = await reviewer.review(token)
        except TokenReviewError as exc:
            log.error("TokenReview for cluster %s failed: %s", cluster, exc)
            raise AuthError(503, "tokenreview_unavailable", str(exc)) from None
        if not result.authenticated:
            raise AuthError(401, "bad_token", result.error or "TokenReview: not authenticated")
        if reviewer.audience and reviewer.audience not in result.audiences:
            raise AuthError(401, "bad_token", f"token is not for audience {reviewer.audience!r}")
        if result.username not in allowed:
            raise AuthError(
                403, "token_scope", f"service account {result.username!r} may not register"
            )
        return Identity(cluster, agent_id, "tokenreview")
