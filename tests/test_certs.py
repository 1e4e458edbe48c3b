"""`tether certs init`: the files it writes, what they say, and that real TLS accepts them."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import stat
import subprocess
import sys
import types
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tether.tools import certs, cli
from tether.tools.certs import CertError, PkiPaths, init_pki

pytestmark = pytest.mark.timeout(30)


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _attr(name: x509.Name, oid: x509.ObjectIdentifier) -> str:
    (attr,) = name.get_attributes_for_oid(oid)
    assert isinstance(attr.value, str)
    return attr.value


def _eku(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- files and contents ------------------------------------------------------------------


def test_default_layout_and_modes(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    paths = init_pki(directory)

    assert paths == PkiPaths.in_dir(directory)
    assert _mode(directory) == 0o700
    assert _mode(paths.agents_dir) == 0o700
    agent_cert, agent_key = paths.agent("agent-1")
    assert agent_cert == directory / "agents" / "agent-1.crt"
    assert agent_key == directory / "agents" / "agent-1.key"
    for cert, key in [
        (paths.ca_cert, paths.ca_key),
        (paths.frontend_ca_cert, paths.frontend_ca_key),
        (paths.broker_cert, paths.broker_key),
        (paths.frontend_cert, paths.frontend_key),
        (agent_cert, agent_key),
    ]:
        assert _mode(cert) == 0o644
        assert _mode(key) == 0o600
        assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert sorted(p.name for p in directory.iterdir()) == [
        "agents",
        "broker.crt",
        "broker.key",
        "ca.crt",
        "ca.key",
        "frontend-ca.crt",
        "frontend-ca.key",
        "frontend.crt",
        "frontend.key",
    ]
    assert sorted(p.name for p in paths.agents_dir.iterdir()) == ["agent-1.crt", "agent-1.key"]


def test_ca_extensions(tmp_path: Path) -> None:
    ca = _load(init_pki(tmp_path, cluster="edge-eu").ca_cert)

    assert _attr(ca.subject, NameOID.COMMON_NAME) == "tether-ca edge-eu"
    assert ca.issuer == ca.subject
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca
    assert constraints.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign
    assert usage.crl_sign
    ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    ca.verify_directly_issued_by(ca)


def test_leaf_subjects_and_usages(tmp_path: Path) -> None:
    paths = init_pki(tmp_path, cluster="prod", agents=["gw-01", "gw.02"])
    ca = _load(paths.ca_cert)

    for agent_id in ["gw-01", "gw.02"]:
        cert = _load(paths.agent(agent_id)[0])
        cert.verify_directly_issued_by(ca)
        assert _attr(cert.subject, NameOID.ORGANIZATION_NAME) == "prod"
        assert _attr(cert.subject, NameOID.ORGANIZATIONAL_UNIT_NAME) == "tether-agent"
        assert _attr(cert.subject, NameOID.COMMON_NAME) == agent_id
        assert _eku(cert) == {ExtendedKeyUsageOID.CLIENT_AUTH}

    # The frontend has a CA of its own: it never chains to the agents' CA, nor they to it.
    frontend_ca = _load(paths.frontend_ca_cert)
    assert _attr(frontend_ca.subject, NameOID.COMMON_NAME) == "tether-frontend-ca prod"
    assert frontend_ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert frontend_ca.public_key() != ca.public_key()
    frontend = _load(paths.frontend_cert)
    frontend.verify_directly_issued_by(frontend_ca)
    with pytest.raises(ValueError):
        frontend.verify_directly_issued_by(ca)
    assert _attr(frontend.subject, NameOID.ORGANIZATION_NAME) == "prod"
    assert _attr(frontend.subject, NameOID.ORGANIZATIONAL_UNIT_NAME) == "tether-frontend"
    assert _attr(frontend.subject, NameOID.COMMON_NAME) == "tether-frontend"
    assert _eku(frontend) == {ExtendedKeyUsageOID.CLIENT_AUTH}

    broker = _load(paths.broker_cert)
    broker.verify_directly_issued_by(ca)
    assert _attr(broker.subject, NameOID.COMMON_NAME) == "tether-broker"
    assert ExtendedKeyUsageOID.SERVER_AUTH in _eku(broker)


def test_broker_sans(tmp_path: Path) -> None:
    paths = init_pki(tmp_path, extra_sans=["broker.example.com", "10.1.2.3", "fd00::7"])
    sans = _load(paths.broker_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)

    assert set(sans.value.get_values_for_type(x509.DNSName)) == {
        "localhost",
        "broker.example.com",
    }
    assert set(sans.value.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("10.1.2.3"),
        ipaddress.ip_address("fd00::7"),
    }


def test_leaf_validity_follows_days(tmp_path: Path) -> None:
    paths = init_pki(tmp_path, days=30)
    agent = _load(paths.agent("agent-1")[0])
    ca = _load(paths.ca_cert)

    lifetime = agent.not_valid_after_utc - agent.not_valid_before_utc
    assert 30 <= lifetime.days <= 31
    # The CA outlives its leaves so they can be rotated without re-provisioning everything.
    assert ca.not_valid_after_utc > agent.not_valid_after_utc


# --- reuse, force, adding agents --------------------------------------------------------


def test_rerun_reuses_ca_and_adds_agent(tmp_path: Path) -> None:
    paths = init_pki(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    written: list[Path] = []
    init_pki(tmp_path, agents=["agent-2"], report=written.append)

    agent2_cert, agent2_key = paths.agent("agent-2")
    assert written == [agent2_key, agent2_cert]
    for path, content in before.items():
        assert path.read_bytes() == content, path
    cert = _load(agent2_cert)
    cert.verify_directly_issued_by(_load(paths.ca_cert))
    assert _attr(cert.subject, NameOID.ORGANIZATION_NAME) == "default"


def test_rerun_keeps_cluster_of_existing_ca(tmp_path: Path) -> None:
    paths = init_pki(tmp_path, cluster="factory")
    init_pki(tmp_path, agents=["agent-2"])

    cert = _load(paths.agent("agent-2")[0])
    assert _attr(cert.subject, NameOID.ORGANIZATION_NAME) == "factory"


def test_rerun_with_other_cluster_is_refused(tmp_path: Path) -> None:
    init_pki(tmp_path, cluster="factory")
    with pytest.raises(CertError, match="belongs to cluster 'factory'"):
        init_pki(tmp_path, cluster="office")


def test_rerun_reissues_missing_or_foreign_leaves(tmp_path: Path, other_pki: PkiPaths) -> None:
    paths = init_pki(tmp_path)
    paths.frontend_key.unlink()
    # An agent certificate from another CA must not be mistaken for a usable one.
    agent_cert, agent_key = paths.agent("agent-1")
    other_cert, other_key = other_pki.agent("agent-1")
    agent_cert.write_bytes(other_cert.read_bytes())
    agent_key.write_bytes(other_key.read_bytes())

    written: list[Path] = []
    init_pki(tmp_path, report=written.append)

    assert set(written) == {paths.frontend_cert, paths.frontend_key, agent_cert, agent_key}
    ca = _load(paths.ca_cert)
    _load(paths.frontend_cert).verify_directly_issued_by(_load(paths.frontend_ca_cert))
    _load(agent_cert).verify_directly_issued_by(ca)
    assert _mode(agent_key) == 0o600


def test_new_san_reissues_broker_keeping_old_ones(tmp_path: Path) -> None:
    paths = init_pki(tmp_path, extra_sans=["a.example"])
    written: list[Path] = []
    init_pki(tmp_path, extra_sans=["b.example"], report=written.append)

    assert written == [paths.broker_key, paths.broker_cert]
    sans = _load(paths.broker_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert {"a.example", "b.example", "localhost"} <= set(
        sans.value.get_values_for_type(x509.DNSName)
    )


def test_force_regenerates_everything(tmp_path: Path) -> None:
    paths = init_pki(tmp_path)
    init_pki(tmp_path, agents=["agent-2"])
    old_ca = paths.ca_cert.read_bytes()
    old_frontend_ca = paths.frontend_ca_cert.read_bytes()

    init_pki(tmp_path, agents=["agent-3"], force=True)

    assert paths.ca_cert.read_bytes() != old_ca
    assert paths.frontend_ca_cert.read_bytes() != old_frontend_ca
    ca = _load(paths.ca_cert)
    # Agents issued before are reissued too: the replaced CA no longer vouches for them.
    for agent_id in ["agent-1", "agent-2", "agent-3"]:
        _load(paths.agent(agent_id)[0]).verify_directly_issued_by(ca)
    _load(paths.broker_cert).verify_directly_issued_by(ca)
    _load(paths.frontend_cert).verify_directly_issued_by(_load(paths.frontend_ca_cert))


def test_frontend_name_is_reserved_for_the_frontend(tmp_path: Path) -> None:
    with pytest.raises(CertError, match="reserved for the frontend"):
        init_pki(tmp_path, agents=["tether-frontend"])


def _legacy(directory: Path) -> PkiPaths:
    """A PKI as `tether certs init` wrote it before the frontend CA existed."""
    paths = init_pki(directory, cluster="old", agents=["agent-1"])
    ca = certs._load_ca(paths)
    issuer = certs._Issuer(ca, datetime.datetime.now(datetime.UTC), 30)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "old"),
            x509.NameAttribute(NameOID.COMMON_NAME, "tether-frontend"),
        ]
    )
    issuer.issue(
        paths.frontend_cert,
        paths.frontend_key,
        subject=subject,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        sans=[],
        emit=lambda _p: None,
    )
    paths.frontend_ca_cert.unlink()
    paths.frontend_ca_key.unlink()
    return paths


def test_add_frontend_ca_migrates_an_old_pki(tmp_path: Path) -> None:
    paths = _legacy(tmp_path)
    untouched = [paths.ca_cert, paths.ca_key, paths.broker_cert, paths.broker_key]
    untouched += list(paths.agent("agent-1"))
    before = {p: p.read_bytes() for p in untouched}

    written: list[Path] = []
    assert certs.add_frontend_ca(tmp_path, report=written.append) == paths

    assert set(written) == {
        paths.frontend_ca_cert,
        paths.frontend_ca_key,
        paths.frontend_cert,
        paths.frontend_key,
    }
    assert {p: p.read_bytes() for p in untouched} == before
    assert _mode(paths.frontend_ca_key) == 0o600
    frontend_ca = _load(paths.frontend_ca_cert)
    assert _attr(frontend_ca.subject, NameOID.COMMON_NAME) == "tether-frontend-ca old"
    frontend = _load(paths.frontend_cert)
    frontend.verify_directly_issued_by(frontend_ca)
    assert _attr(frontend.subject, NameOID.ORGANIZATIONAL_UNIT_NAME) == "tether-frontend"
    assert _attr(frontend.subject, NameOID.ORGANIZATION_NAME) == "old"

    # Running it again changes nothing; init afterwards keeps the frontend CA too.
    written.clear()
    certs.add_frontend_ca(tmp_path, report=written.append)
    init_pki(tmp_path, report=written.append)
    assert written == []


def test_add_frontend_ca_needs_an_existing_pki(tmp_path: Path) -> None:
    with pytest.raises(CertError, match="tether certs init"):
        certs.add_frontend_ca(tmp_path / "nothing")


def test_cli_add_frontend_ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = _legacy(tmp_path / "pki")
    assert cli.main(["certs", "add-frontend-ca", str(tmp_path / "pki")]) == 0
    out = capsys.readouterr().out
    assert "frontend-ca.crt" in out and "frontend.crt" in out
    assert f"--server-ca-cert={paths.frontend_ca_cert}" in out
    assert cli.main(["certs", "add-frontend-ca", str(tmp_path / "pki")]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert cli.main(["certs", "add-frontend-ca", str(tmp_path / "none")]) == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["", "-x", "a/b", "..", "a b", "ü", "x" * 64])
def test_invalid_names_are_rejected(tmp_path: Path, bad: str) -> None:
    with pytest.raises(CertError, match="invalid agent id"):
        init_pki(tmp_path, agents=[bad])
    with pytest.raises(CertError, match="invalid cluster name"):
        init_pki(tmp_path, cluster=bad)
    with pytest.raises(CertError, match="invalid agent id"):
        PkiPaths.in_dir(tmp_path).agent(bad)
    assert list(tmp_path.iterdir()) == []


def test_invalid_san_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(CertError, match="subject alternative name"):
        init_pki(tmp_path, extra_sans=["not a name"])


# --- real mutual TLS --------------------------------------------------------------------


@pytest.fixture
def pki(tmp_path: Path) -> PkiPaths:
    return init_pki(tmp_path / "pki", agents=["agent-1"])


@pytest.fixture
def other_pki(tmp_path: Path) -> PkiPaths:
    return init_pki(tmp_path / "other", agents=["agent-1"])


def _server_context(paths: PkiPaths, client_ca: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(paths.broker_cert, paths.broker_key)
    ctx.load_verify_locations(cafile=client_ca or paths.ca_cert)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(["h2"])
    return ctx


def _client_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["h2"])
    return ctx


def _subject_of(peercert: dict[str, object]) -> dict[str, str]:
    subject = peercert["subject"]
    assert isinstance(subject, tuple)
    return {key: value for rdn in subject for key, value in rdn}


async def _handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str = "localhost"
) -> tuple[trio.SSLStream[trio.SocketStream] | BaseException, BaseException | None]:
    """Run one TLS exchange; return the server's stream (or its error) and the client's error.

    The client sends one byte and waits for the echo because with TLS 1.3 a rejected client
    certificate only surfaces on the client after its own handshake has completed.
    """
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    listener = listeners[0]
    port = listener.socket.getsockname()[1]
    server_result: list[trio.SSLStream[trio.SocketStream] | BaseException] = []
    client_error: BaseException | None = None

    async def serve() -> None:
        tcp = await listener.accept()
        stream = trio.SSLStream(tcp, server_ctx, server_side=True)
        try:
            await stream.do_handshake()
            await stream.send_all(await stream.receive_some(1))
            server_result.append(stream)
        except trio.BrokenResourceError as exc:
            server_result.append(exc)
            await trio.aclose_forcefully(stream)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            client = trio.SSLStream(tcp, client_ctx, server_hostname=server_hostname)
            try:
                await client.do_handshake()
                assert client.selected_alpn_protocol() == "h2"
                await client.send_all(b"x")
                if await client.receive_some(1) != b"x":
                    raise trio.BrokenResourceError("server closed without echoing")
            except trio.BrokenResourceError as exc:
                client_error = exc
            finally:
                await trio.aclose_forcefully(client)
    await listener.aclose()
    (server,) = server_result
    if isinstance(server, trio.SSLStream):
        await trio.aclose_forcefully(server)
    return server, client_error


@pytest.mark.parametrize("server_hostname", ["localhost", "127.0.0.1"])
async def test_agent_mutual_tls_with_h2(pki: PkiPaths, server_hostname: str) -> None:
    cert, key = pki.agent("agent-1")
    server, client_error = await _handshake(
        _server_context(pki), _client_context(pki.ca_cert, cert, key), server_hostname
    )

    assert client_error is None
    assert isinstance(server, trio.SSLStream)
    assert server.selected_alpn_protocol() == "h2"
    peercert = server.getpeercert()
    assert peercert is not None
    assert _subject_of(peercert) == {
        "organizationName": "default",
        "organizationalUnitName": "tether-agent",
        "commonName": "agent-1",
    }


async def test_frontend_mutual_tls(pki: PkiPaths) -> None:
    frontend_port = _server_context(pki, client_ca=pki.frontend_ca_cert)
    server, client_error = await _handshake(
        frontend_port, _client_context(pki.ca_cert, pki.frontend_cert, pki.frontend_key)
    )

    assert client_error is None
    assert isinstance(server, trio.SSLStream)
    peercert = server.getpeercert()
    assert peercert is not None
    assert _subject_of(peercert)["commonName"] == "tether-frontend"


@pytest.mark.parametrize("port", ["agent", "frontend"])
async def test_certificate_of_the_other_role_does_not_verify(pki: PkiPaths, port: str) -> None:
    # The agent port trusts ca.crt, the frontend port frontend-ca.crt: each
    # role's certificate fails the other's TLS verification.
    agent_cert, agent_key = pki.agent("agent-1")
    if port == "agent":
        server_ctx = _server_context(pki)
        client_ctx = _client_context(pki.ca_cert, pki.frontend_cert, pki.frontend_key)
    else:
        server_ctx = _server_context(pki, client_ca=pki.frontend_ca_cert)
        client_ctx = _client_context(pki.ca_cert, agent_cert, agent_key)
    server, client_error = await _handshake(server_ctx, client_ctx)

    assert isinstance(server, trio.BrokenResourceError)
    assert "certificate verify failed" in str(server.__cause__)
    assert client_error is not None


async def test_client_cert_from_other_ca_is_rejected(pki: PkiPaths, other_pki: PkiPaths) -> None:
    cert, key = other_pki.agent("agent-1")
    # The client trusts the right CA, so only the server's verification can fail.
    server, client_error = await _handshake(
        _server_context(pki), _client_context(pki.ca_cert, cert, key)
    )

    assert isinstance(server, trio.BrokenResourceError)
    assert isinstance(server.__cause__, ssl.SSLError)
    assert "certificate verify failed" in str(server.__cause__)
    assert client_error is not None


async def test_server_cert_from_other_ca_is_rejected(pki: PkiPaths, other_pki: PkiPaths) -> None:
    cert, key = pki.agent("agent-1")
    server, client_error = await _handshake(
        _server_context(other_pki), _client_context(pki.ca_cert, cert, key)
    )

    assert isinstance(client_error, trio.BrokenResourceError)
    assert isinstance(client_error.__cause__, ssl.SSLCertVerificationError)
    assert isinstance(server, trio.BrokenResourceError)


async def test_broker_cert_cannot_act_as_client(pki: PkiPaths) -> None:
    # Without clientAuth in its EKU, a stolen broker key cannot log in as an agent.
    server, _ = await _handshake(
        _server_context(pki), _client_context(pki.ca_cert, pki.broker_cert, pki.broker_key)
    )

    assert isinstance(server, trio.BrokenResourceError)


# --- command line -----------------------------------------------------------------------


def test_cli_init_writes_and_summarises(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "pki"
    argv = ["certs", "init", "--dir", str(directory), "--cluster", "c1", "--agent", "a"]
    assert cli.main([*argv, "--agent", "b", "--san", "10.9.9.9", "--days", "7"]) == 0

    out = capsys.readouterr().out
    for name in ["ca.crt", "ca.key", "broker.crt", "frontend.key", "agents/a.crt", "agents/b.key"]:
        assert name in out
    paths = PkiPaths.in_dir(directory)
    assert _attr(_load(paths.agent("b")[0]).subject, NameOID.ORGANIZATION_NAME) == "c1"
    assert not paths.agent("agent-1")[0].exists()

    assert cli.main(["certs", "init", "--dir", str(directory), "--agent", "a"]) == 0
    out = capsys.readouterr().out
    assert "using existing CA" in out
    assert "nothing to do" in out


def test_cli_default_agent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["certs", "init", "--dir", str(tmp_path)]) == 0
    assert (tmp_path / "agents" / "agent-1.crt").exists()
    assert "agents/agent-1.key" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--agent", "../etc"], "invalid agent id '../etc'"),
        (["--cluster", "a b"], "invalid cluster name 'a b'"),
        (["--days", "0"], "--days"),
        (["--san", "bad name"], "invalid subject alternative name"),
    ],
)
def test_cli_invalid_input_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    directory = tmp_path / "pki"
    assert cli.main(["certs", "init", "--dir", str(directory), *args]) == 2

    assert message in capsys.readouterr().err
    assert not directory.exists()


def test_cli_cluster_mismatch_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["certs", "init", "--dir", str(tmp_path), "--cluster", "one"]) == 0
    assert cli.main(["certs", "init", "--dir", str(tmp_path), "--cluster", "two"]) == 2
    assert "--force" in capsys.readouterr().err


def test_cli_usage_errors_return_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert cli.main(["certs"]) == 2
    assert cli.main(["certs", "init"]) == 2
    assert "--dir" in capsys.readouterr().err
    assert cli.main(["--help"]) == 0


def test_cli_demo_passes_arguments_through(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def fake_main(argv: list[str]) -> int:
        seen.append(argv)
        return 7

    fake = types.ModuleType("tether.tools.demo")
    fake.main = fake_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tether.tools.demo", fake)

    assert cli.main(["demo", "--help", "--agents", "3", "x"]) == 7
    assert seen == [["--help", "--agents", "3", "x"]]


def test_cli_import_does_not_load_cryptography() -> None:
    code = "import sys, tether.tools.cli; sys.exit('cryptography' in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=20)
