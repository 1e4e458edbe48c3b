"""Broker authentication in process (broker/auth.py): token file entries
(exact ids, id globs with ``max=N``, ``identifiers=``), reloads and
revocation, the header checks, the identifiers policy, and certificate
identities checked against the issuing cluster's CA (no TLS: the
certificate's DER is what the TLS layer would hand over)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from broker.auth import Authenticator, AuthError, Identity, TokenStore
from broker.clusters import ClusterConfig, ConfigError
from protocol.identifiers import Allowance
from tether.tools.certs import PkiPaths

pytestmark = pytest.mark.timeout(30)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _token_file(path: Path, *lines: str) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def _tokens_auth(tmp_path: Path, *lines: str, **cluster: object) -> Authenticator:
    store = TokenStore(_token_file(tmp_path / "tokens", *lines))
    return Authenticator([ClusterConfig(name="c", token_agents=True, **cluster)], store)  # type: ignore[arg-type]


def _headers(agent_id: str, token: str | None = None, cluster: str = "") -> dict[str, str]:
    headers = {"tether-agent-id": agent_id}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    if cluster:
        headers["tether-cluster"] = cluster
    return headers


async def _refused(
    auth: Authenticator, headers: dict[str, str], der: bytes | None = None
) -> AuthError:
    with pytest.raises(AuthError) as refused:
        await auth.authenticate(der, headers, "192.0.2.1")
    return refused.value


# ------------------------------------------------------------- tokens


async def test_an_exact_token_entry_names_one_id_and_one_credential(tmp_path: Path) -> None:
    auth = _tokens_auth(
        tmp_path,
        "# comment line",
        f"sha256:{_digest('t-one')} c edge-01 identifiers=host=edge-01  # trailing comment",
    )
    identity = await auth.authenticate(None, _headers("edge-01", "t-one"), "192.0.2.1")
    assert (identity.cluster, identity.agent_id, identity.method) == ("c", "edge-01", "token")
    assert identity.credential == f"token:{_digest('t-one')}:2"
    assert identity.cap_key is None
    assert identity.allowed == Allowance.parse("host=edge-01")
    # "bearer" is case-insensitive; the cluster header may name the entry's cluster.
    again = await auth.authenticate(
        None, {**_headers("edge-01", cluster="c"), "authorization": "bearer t-one"}
    )
    assert again.credential == identity.credential


async def test_a_glob_entry_is_shared_and_capped(tmp_path: Path) -> None:
    auth = _tokens_auth(tmp_path, f"sha256:{_digest('fleet')} c edge-* max=3")
    a = await auth.authenticate(None, _headers("edge-a", "fleet"))
    b = await auth.authenticate(None, _headers("edge-b", "fleet"))
    assert a.credential is None and b.credential is None  # never replaces a live one
    assert a.cap_key == b.cap_key == f"token:{_digest('fleet')}:1"
    assert a.cap == 3
    refused = await _refused(auth, _headers("core-1", "fleet"))
    assert (refused.status, refused.reason) == (403, "token_scope")


async def test_token_refusals(tmp_path: Path) -> None:
    auth = _tokens_auth(tmp_path, f"sha256:{_digest('t')} c edge-01")
    cases = [
        (_headers("edge-01", "wrong"), 401, "bad_token"),
        (_headers("edge-02", "t"), 403, "token_scope"),
        (_headers("edge-01", "t", cluster="other"), 403, "token_scope"),
        (_headers("edge-01"), 401, "unauthenticated"),
        ({**_headers("edge-01"), "authorization": "Bearer "}, 401, "unauthenticated"),
        ({**_headers("edge-01"), "authorization": "Basic dDp0"}, 401, "unauthenticated"),
        (_headers("", "t"), 403, "bad_agent_id"),
        (_headers("-bad", "t"), 403, "bad_agent_id"),
        (_headers("edge-01", "t", cluster="no/slash"), 403, "bad_cluster"),
    ]
    for headers, status, reason in cases:
        refused = await _refused(auth, headers)
        assert (refused.status, refused.reason) == (status, reason), headers
        assert str(refused).startswith(f"{reason}: ")
    no_tokens = Authenticator([ClusterConfig(name="c")], None)
    refused = await _refused(no_tokens, _headers("edge-01", "t"))
    assert (refused.status, refused.reason) == (401, "unauthenticated")


async def test_a_cluster_without_token_agents_takes_no_token(tmp_path: Path) -> None:
    store = TokenStore(_token_file(tmp_path / "tokens", f"sha256:{_digest('t')} c edge-01"))
    auth = Authenticator([ClusterConfig(name="c", token_agents=False)], store)
    assert not auth.allows_tokens
    refused = await _refused(auth, _headers("edge-01", "t"))
    assert refused.reason == "token_scope"


async def test_the_token_file_is_reread_and_a_removed_line_revokes(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    bad_lines: list[str] = []
    store = TokenStore(
        _token_file(path, f"sha256:{_digest('t')} c edge-01"), on_bad_line=bad_lines.append
    )
    auth = Authenticator([ClusterConfig(name="c", token_agents=True)], store)
    await auth.authenticate(None, _headers("edge-01", "t"))
    _token_file(
        path,
        f"sha256:{_digest('u')} c edge-02",
        f"sha256:{_digest('g')} c edge-* ",  # a glob without max=: skipped on reload
        "not an entry",
    )
    os.utime(path, ns=(1, 1))  # a new stamp even within one clock tick
    refused = await _refused(auth, _headers("edge-01", "t"))
    assert refused.reason == "bad_token"
    assert (await auth.authenticate(None, _headers("edge-02", "u"))).agent_id == "edge-02"
    assert bad_lines == ["glob_without_max", "malformed"]
    path.unlink()  # unreadable: every token login is refused
    assert (await _refused(auth, _headers("edge-02", "u"))).reason == "bad_token"


def test_the_first_load_is_strict(tmp_path: Path) -> None:
    path = _token_file(tmp_path / "tokens", f"sha256:{_digest('g')} c edge-*")
    with pytest.raises(ConfigError, match=r"tokens:1: token entry refused: .*needs max=N"):
        TokenStore(path)


# -------------------------------------------------- identifiers policy


async def test_identifiers_policy(tmp_path: Path) -> None:
    line = f"sha256:{_digest('t')} c edge-01 identifiers=host=edge-01"
    credential = _tokens_auth(
        tmp_path, line, allowed_identifiers=(("edge-*", "cidr=10.20.0.0/16"), ("core-*", "host=x"))
    )
    identity = await credential.authenticate(None, _headers("edge-01", "t"))
    assert identity.allowed == Allowance.parse("host=edge-01&cidr=10.20.0.0/16")
    trusting = _tokens_auth(tmp_path, line, agent_identifiers="any")
    assert (await trusting.authenticate(None, _headers("edge-01", "t"))).allowed is None


# -------------------------------------------------------- certificates


def _der(path: Path) -> bytes:
    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(Encoding.DER)


async def test_a_certificate_names_the_agent_and_its_cluster(pki: PkiPaths) -> None:
    auth = Authenticator([ClusterConfig(name="default", agent_ca=str(pki.ca_cert))], None)
    der = _der(pki.agent("agent-1")[0])
    identity = await auth.authenticate(der, _headers("agent-1"))
    assert isinstance(identity, Identity)
    assert (identity.cluster, identity.agent_id, identity.method) == ("default", "agent-1", "mtls")
    assert identity.credential == "cert:" + hashlib.sha256(der).hexdigest()
    assert identity.allowed is not None  # policy "credential": only what its SANs allow
    for headers, reason in [
        (_headers("agent-2"), "identity_mismatch"),  # the header must equal the CN
        (_headers("agent-1", cluster="other"), "identity_mismatch"),
    ]:
        refused = await _refused(auth, headers, der)
        assert (refused.status, refused.reason) == (403, reason)


async def test_a_certificate_from_another_ca_or_role_is_refused(pki: PkiPaths) -> None:
    # A "cluster" trusting only the frontend CA: agent certificates are of an
    # unknown issuer there, and a frontend certificate is of the wrong role.
    auth = Authenticator([ClusterConfig(name="default", agent_ca=str(pki.frontend_ca_cert))], None)
    agent = await _refused(auth, _headers("agent-1"), _der(pki.agent("agent-1")[0]))
    assert (agent.status, agent.reason) == (403, "unknown_issuer")
    frontend_der = _der(pki.frontend_cert)
    cn = (
        x509.load_der_x509_certificate(frontend_der)
        .subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0]
        .value
    )
    frontend = await _refused(auth, _headers(str(cn)), frontend_der)
    assert (frontend.status, frontend.reason) == (403, "wrong_role")
