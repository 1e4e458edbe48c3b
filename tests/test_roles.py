"""Role separation rules (broker/roles.py), the ``frontend_ca`` config key and
the TLS settings of every context, without processes."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from test_hostile_trust_roles import issue, legacy_pki

from broker.clusters import ConfigError, load_clusters
from broker.roles import (
    FrontendSource,
    FrontendTrust,
    RoleError,
    agent_role_of,
    frontend_role_of,
    parse_subjects,
)
from tether.netio import tls
from tether.tools.certs import PkiPaths, init_pki

pytestmark = pytest.mark.timeout(30)

SUBJECTS = parse_subjects("tether-frontend, kube-apiserver,")


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _der(path: Path) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return _load(path).public_bytes(serialization.Encoding.DER)


@pytest.fixture
def two(tmp_path: Path) -> tuple[PkiPaths, PkiPaths]:
    return (
        init_pki(tmp_path / "a", cluster="a", agents=["agent-1"]),
        init_pki(tmp_path / "b", cluster="b", agents=["agent-1"]),
    )


def test_parse_subjects() -> None:
    assert frozenset({"tether-frontend", "kube-apiserver"}) == SUBJECTS
    assert parse_subjects("") == frozenset()


def test_roles_of_issued_certificates(two: tuple[PkiPaths, PkiPaths]) -> None:
    a, _ = two
    agent = _load(a.agent("agent-1")[0])
    frontend = _load(a.frontend_cert)
    assert frontend_role_of(frontend, SUBJECTS) is None
    assert agent_role_of(agent, SUBJECTS) is None
    assert "agent certificate" in (frontend_role_of(agent, SUBJECTS) or "")
    assert "frontend certificate" in (agent_role_of(frontend, SUBJECTS) or "")
    # Without the marker the subject list decides; an empty list admits no unmarked cert.
    assert frontend_role_of(frontend, frozenset()) is None
    assert frontend_role_of(agent, frozenset({"agent-1"})) is not None


def test_roles_of_unmarked_certificates(tmp_path: Path) -> None:
    old = legacy_pki(tmp_path / "old")
    agent = _load(old.agent("agent-1")[0])
    frontend = _load(old.frontend_cert)
    assert frontend_role_of(frontend, SUBJECTS) is None
    assert frontend_role_of(agent, SUBJECTS) is not None
    assert agent_role_of(agent, SUBJECTS) is None
    assert agent_role_of(frontend, SUBJECTS) is not None
    # A certificate from a frontend CA is no agent, whatever its subject says.
    pki = init_pki(tmp_path / "new")
    cert, _ = issue(
        pki.frontend_ca_cert,
        pki.frontend_ca_key,
        tmp_path / "x" / "edge",
        [(NameOID.ORGANIZATION_NAME, "default"), (NameOID.COMMON_NAME, "edge-9")],
    )
    assert "issued by the frontend CA" in (agent_role_of(_load(cert), SUBJECTS) or "")


def test_frontend_cluster_comes_from_the_issuing_ca(
    tmp_path: Path, two: tuple[PkiPaths, PkiPaths]
) -> None:
    a, b = two
    trust = FrontendTrust(
        [
            FrontendSource("a", str(a.frontend_ca_cert)),
            FrontendSource("b", str(b.frontend_ca_cert)),
        ],
        SUBJECTS,
    )
    assert trust.identify(_der(a.frontend_cert)) == "a"
    assert trust.identify(_der(b.frontend_cert)) == "b"
    forged, _ = issue(
        a.frontend_ca_cert,
        a.frontend_ca_key,
        tmp_path / "f" / "frontend",
        [(NameOID.ORGANIZATION_NAME, "b"), (NameOID.COMMON_NAME, "tether-frontend")],
    )
    cases = {
        "identity_mismatch": forged,
        "unknown_issuer": a.agent("agent-1")[0],
    }
    for reason, path in cases.items():
        with pytest.raises(RoleError) as err:
            trust.identify(_der(path))
        assert err.value.reason == reason
    with pytest.raises(RoleError) as err:
        trust.identify(None)
    assert err.value.reason == "unauthenticated"
    assert trust.migration_warnings([str(a.ca_cert), str(b.ca_cert)]) == []

    # The agent CA mis-bundled as a frontend CA: agent certificates are still refused.
    mixed = FrontendTrust([FrontendSource("a", str(a.ca_cert))], SUBJECTS)
    with pytest.raises(RoleError) as err:
        mixed.identify(_der(a.agent("agent-1")[0]))
    assert err.value.reason == "wrong_role"
    (warning,) = mixed.migration_warnings([str(a.ca_cert)])
    assert "tether certs add-frontend-ca" in warning and str(a.ca_cert) in warning


def test_frontend_ca_config_key(tmp_path: Path, two: tuple[PkiPaths, PkiPaths]) -> None:
    a, _ = two
    config = tmp_path / "c.toml"
    config.write_text(
        f'[[clusters]]\nname = "a"\nagent_ca = "{a.ca_cert}"\nfrontend_ca = "{a.frontend_ca_cert}"\n'
    )
    (cluster,) = load_clusters(str(config))
    assert cluster.frontend_ca == str(a.frontend_ca_cert)
    config.write_text(
        f'[[clusters]]\nname = "a"\nagent_ca = "{a.ca_cert}"\nfrontend_ca = "{tmp_path}/no"\n'
    )
    with pytest.raises(ConfigError, match="frontend_ca: no such file"):
        load_clusters(str(config))
    config.write_text(f'[[clusters]]\nname = "a"\nagent_ca = "{a.ca_cert}"\nfrontend_ca = 1\n')
    with pytest.raises(ConfigError, match="frontend_ca: must be a str"):
        load_clusters(str(config))


def _tls12_suites(ctx: ssl.SSLContext) -> list[str]:
    return [c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]


def test_every_context_is_aead_only_and_agent_port_can_require_tls13(
    two: tuple[PkiPaths, PkiPaths],
) -> None:
    a, _ = two
    contexts = [
        tls.server_context(a.broker_cert, a.broker_key, str(a.ca_cert), alpn=["h2"]),
        tls.client_context(a.ca_cert, *a.agent("agent-1"), alpn=["h2"]),
    ]
    for ctx in contexts:
        suites = _tls12_suites(ctx)
        assert suites, "TLS 1.2 keeps some suites"
        for name in suites:
            assert name.startswith("ECDHE-"), name
            assert "GCM" in name or "CHACHA20" in name, name
    strict = tls.server_context(
        a.broker_cert, a.broker_key, str(a.ca_cert), alpn=["h2"], min_version="1.3"
    )
    assert strict.minimum_version == ssl.TLSVersion.TLSv1_3
    assert contexts[0].minimum_version == ssl.TLSVersion.TLSv1_2
    with pytest.raises(tls.TLSConfigError, match="unknown TLS version"):
        tls.server_context(
            a.broker_cert, a.broker_key, str(a.ca_cert), alpn=None, min_version="1.1"
        )
