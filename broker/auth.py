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

    sha256:<64 hex digits>  <cluster>  <agent-id or glob>  [max=N]  [identifiers=...]

An entry names one exact agent id, or an id glob (``*``, ``?``, ``[``) with
``max=N``: the most ids the token may hold connected at once. A glob
without ``max=`` stops the broker at start (and is skipped, with an error,
when the file is re-read). ``identifiers=`` (konnectivity's form, host
patterns may be globs) lists the identifiers an agent holding the token may
declare.

Who may replace a live connection of the same id: only a connection of the
same credential (``Identity.credential``). A glob entry is shared by many
devices, so its connections never replace each other: the live one wins.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import time
from collections.abc import Callable

import attrs
import trio
from cryptography import x509
from cryptography.x509.oid import NameOID

from broker import roles
from broker.clusters import ClusterConfig, ConfigError
from broker.tokenreview import (
    FailureCache,
    RateLimiter,
    TokenReviewer,
    TokenReviewError,
    load_kubeconfig,
)
from protocol import handshake
from protocol.identifiers import Allowance, valid_name

log = logging.getLogger("tether.broker")

_ENTRY = re.compile(r"^sha256:([0-9a-fA-F]{64})\s+(\S+)\s+(\S+)((?:\s+\S+)*)$")
_GLOB_CHARS = frozenset("*?[")


@attrs.frozen
class Identity:
    cluster: str
    agent_id: str
    method: str  # "mtls", "token" or "tokenreview"
    #: The credential behind the connection; only the same credential may
    #: replace a live connection of this id. None: never replaces.
    credential: str | None = None
    #: Capped credentials (token id globs) count their live connections.
    cap_key: str | None = None
    cap: int = 0
    #: Identifiers this agent may declare; None: any (policy "any").
    allowed: Allowance | None = None


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
    #: The most ids a glob entry may hold at once (0 for an exact id).
    max_ids: int = 0
    identifiers: Allowance = attrs.Factory(Allowance)
    line: int = 0

    @property
    def is_glob(self) -> bool:
        return bool(_GLOB_CHARS & set(self.agent_pattern))


def parse_entry(line: str, number: int = 0) -> TokenEntry:
    """One token file line (comment already stripped); ValueError says why."""
    m = _ENTRY.match(line)
    if m is None:
        raise ValueError(
            "want 'sha256:<64 hex> <cluster> <agent-id or glob> [max=N] [identifiers=...]'"
        )
    max_ids, allowance = 0, Allowance()
    for option in m[4].split():
        key, _, value = option.partition("=")
        if key == "max" and value.isdigit() and int(value) > 0:
            max_ids = int(value)
        elif key == "identifiers" and value:
            allowance = Allowance.parse(value)
        else:
            raise ValueError(f"unknown or bad option {option!r} (known: max=N, identifiers=...)")
    entry = TokenEntry(bytes.fromhex(m[1]), m[2], m[3], max_ids, allowance, number)
    if entry.is_glob and not max_ids:
        raise ValueError(
            f"agent-id glob {entry.agent_pattern!r} needs max=N (how many ids it may hold at once)"
        )
    return entry


class TokenStore:
    """sha256 token entries from a file, reloaded when the file changes.

    The first load is strict (a bad line raises ConfigError naming it, so
    the broker does not start); later reloads skip bad lines with an error.
    """

    def __init__(self, path: str, on_bad_line: Callable[[str], None] | None = None) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._entries: list[TokenEntry] = []
        self.on_bad_line = on_bad_line
        self._strict = True
        self.reload_if_changed()
        self._strict = False

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
                try:
                    entries.append(parse_entry(line, number))
                except ValueError as exc:
                    if self._strict:
                        raise ConfigError(
                            f"{self.path}:{number}: token entry refused: {exc}"
                        ) from None
                    log.error("%s:%d: token entry skipped: %s", self.path, number, exc)
                    if self.on_bad_line is not None:
                        self.on_bad_line(
                            "glob_without_max" if "needs max=" in str(exc) else "malformed"
                        )
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
        #: Failed reviews, by (cluster, token digest), answered without asking again.
        self.review_failures = FailureCache()
        #: TokenReviews per source address (and in all), per cluster, so junk
        #: cannot flood an apiserver.
        self.review_limiters = {
            c.name: RateLimiter(rate=c.tokenreview_source_rate, burst=c.tokenreview_source_burst)
            for c in clusters
            if c.name in self.reviewers
        }
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

    async def authenticate(
        self, peer_der: bytes | None, headers: dict[str, str], source: str = ""
    ) -> Identity:
        """Who the connection is (raises AuthError), with the credential it
        used and the identifiers that credential and the cluster allow."""
        identity = await self._authenticate(peer_der, headers, source)
        if peer_der and identity.credential is None:
            identity = attrs.evolve(
                identity,
                credential="cert:" + hashlib.sha256(peer_der).hexdigest(),
                allowed=_san_allowance(peer_der),
            )
        return attrs.evolve(identity, allowed=self._allowance(identity))

    def _allowance(self, identity: Identity) -> Allowance | None:
        """The identifiers ``identity`` may declare: its credential's, plus
        the cluster's ``allowed_identifiers`` for its id; None: any."""
        cluster = self.clusters.get(identity.cluster)
        if cluster is None or cluster.agent_identifiers == "any":
            return None
        allowed = identity.allowed or Allowance()
        for pattern, text in cluster.allowed_identifiers:
            if fnmatch.fnmatchcase(identity.agent_id, pattern):
                allowed = allowed.union(Allowance.parse(text))
        return allowed

    async def _authenticate(
        self, peer_der: bytes | None, headers: dict[str, str], source: str
    ) -> Identity:
        agent_id = headers.get(handshake.AGENT_ID, "")
        claimed_cluster = headers.get(handshake.CLUSTER, "")
        if not valid_name(agent_id):
            raise AuthError(403, "bad_agent_id", f"missing or invalid {handshake.AGENT_ID} header")
        if claimed_cluster and not valid_name(claimed_cluster):
            raise AuthError(403, "bad_cluster", f"invalid {handshake.CLUSTER} header")
        if peer_der:
            return self._by_certificate(peer_der, agent_id, claimed_cluster)
        token = handshake.bearer_token(headers)
        if token is not None:
            return await self._by_token(token, agent_id, claimed_cluster, source)
        raise AuthError(401, "unauthenticated", "no client certificate and no bearer token")

    def _by_certificate(self, der: bytes, agent_id: str, claimed: str) -> Identity:
        cert = x509.load_der_x509_certificate(der)
        cluster = self._issuing_cluster(cert)
        if cluster is None:
            raise AuthError(403, "unknown_issuer", "certificate issuer matches no cluster CA")
        # A resumed TLS session (a ticket) restores the certificate of the
        # handshake it came from without OpenSSL checking its dates again.
        now = time.time()
        if not cert.not_valid_before_utc.timestamp() <= now < cert.not_valid_after_utc.timestamp():
            raise AuthError(403, "certificate_expired", "certificate is not valid now")
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

    async def _by_token(self, token: str, agent_id: str, claimed: str, source: str) -> Identity:
        entries = self.tokens.match(token) if self.tokens is not None else []
        if not entries:
            if self.reviewers:
                return await self._by_token_review(token, agent_id, claimed, source)
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
                key = f"token:{entry.digest.hex()}:{entry.line}"
                if entry.is_glob:
                    # Shared by many devices: no connection replaces another.
                    return Identity(
                        entry.cluster,
                        agent_id,
                        "token",
                        credential=None,
                        cap_key=key,
                        cap=entry.max_ids,
                        allowed=entry.identifiers,
                    )
                return Identity(
                    entry.cluster, agent_id, "token", credential=key, allowed=entry.identifiers
                )
        raise AuthError(
            403,
            "token_scope",
            f"token is not valid for agent {agent_id!r}"
            + (f" in cluster {claimed!r}" if claimed else ""),
        )

    async def _by_token_review(
        self, token: str, agent_id: str, claimed: str, source: str
    ) -> Identity:
        if claimed:
            if claimed not in self.reviewers:
                raise AuthError(403, "token_scope", f"cluster {claimed!r} takes no reviewed tokens")
            cluster = claimed
        elif len(self.reviewers) == 1:
            cluster = next(iter(self.reviewers))
        else:
            raise AuthError(403, "bad_cluster", f"several clusters: send {handshake.CLUSTER}")
        reviewer, allowed = self.reviewers[cluster]
        key = (cluster, hashlib.sha256(token.encode()).digest())
        now = trio.current_time()
        failed = self.review_failures.get(key, now)
        if failed is not None:
            raise AuthError(*failed)
        if not self.review_limiters[cluster].take(source, now):
            raise AuthError(
                429,
                "tokenreview_rate_limited",
                f"too many token reviews from {source or '?'}; retry later",
            )
        try:
            result = await reviewer.review(token)
        except TokenReviewError as exc:
            log.error("TokenReview for cluster %s failed: %s", cluster, exc)
            raise AuthError(503, "tokenreview_unavailable", str(exc)) from None
        refusal: tuple[int, str, str] | None = None
        if not result.authenticated:
            refusal = (401, "bad_token", result.error or "TokenReview: not authenticated")
        elif reviewer.audience and reviewer.audience not in result.audiences:
            refusal = (401, "bad_token", f"token is not for audience {reviewer.audience!r}")
        elif result.username not in allowed:
            refusal = (403, "token_scope", f"service account {result.username!r} may not register")
        if refusal is not None:
            self.review_failures.put(key, refusal, now)
            raise AuthError(*refusal)
        node = result.node_name
        if node and self.clusters[cluster].tokenreview_bind_node_name and node != agent_id:
            raise AuthError(
                403,
                "node_mismatch",
                f"token was issued for node {node!r}, the agent claims id {agent_id!r}",
            )
        # A token bound to a node names one identity; an unbound ServiceAccount
        # token is shared by every agent, so it never replaces a live one.
        credential = f"sa:{result.username}:{node}" if node else None
        return Identity(cluster, agent_id, "tokenreview", credential=credential)


def _san_allowance(der: bytes) -> Allowance:
    """What a certificate's subject alternative names allow: DNS names as
    ``host=``, IP addresses as ``ipv4=``/``ipv6=``."""
    try:
        cert = x509.load_der_x509_certificate(der)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return Allowance()
    hosts = frozenset(name.lower() for name in sans.get_values_for_type(x509.DNSName))
    addresses = frozenset(
        a
        for a in sans.get_values_for_type(x509.IPAddress)
        if isinstance(a, ipaddress.IPv4Address | ipaddress.IPv6Address)
    )
    return Allowance(hosts=hosts, addresses=addresses)
