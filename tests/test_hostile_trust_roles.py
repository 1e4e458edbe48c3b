"""Hostile: every credential opens exactly one door (issue 11, rows 1, 2, 13
and the migration of an existing PKI), through the real broker and agent
processes and the real curl.

- row 1a: an agent's client certificate on the TCP mTLS CONNECT frontend,
  even with the agent CA bundled into ``--server-ca-cert``;
- row 1b: ``frontend.crt`` presented on the agent port as ``tether-frontend``;
- row 2: a certificate from tenant A's frontend CA naming ``O=tenant-b``;
- row 13: TLS 1.2 CBC-only clients, and TLS 1.2 on the agent port;
- migration: a PKI from before the frontend CA existed.
"""

from __future__ import annotations

import datetime
import functools
import shutil
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hostile import bad_input, metric, tunnel_roundtrip, wait_log
from procs import BrokerHandle, Proc, serve_echo, wait_for

from tether.tools import cli
from tether.tools.certs import PkiPaths, init_pki
from tether.tools.launch import start_broker

pytestmark = [pytest.mark.e2e]

# TLS 1.2 suites without AEAD: CBC with ECDHE, and RSA key exchange.
CBC_ONLY = (
    "ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA:ECDHE-ECDSA-AES128-SHA256:"
    "ECDHE-ECDSA-AES256-SHA384:ECDHE-RSA-AES128-SHA:AES128-SHA:AES256-SHA:AES128-SHA256"
)


# ------------------------------------------------------------------ helpers


def frontend_ca_of(pki: PkiPaths) -> Path:
    """The frontend CA of this PKI: its own file, or ca.crt for an old PKI."""
    own = pki.ca_cert.parent / "frontend-ca.crt"
    return own if own.exists() else pki.ca_cert


def bundle(path: Path, *certs: Path) -> Path:
    path.write_bytes(b"".join(c.read_bytes() for c in certs))
    return path


def issue(
    ca_cert: Path,
    ca_key: Path,
    out: Path,
    attributes: list[tuple[x509.ObjectIdentifier, str]],
) -> tuple[Path, Path]:
    """A client certificate signed by ``ca_cert`` with exactly ``attributes``."""
    ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    signer = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    assert isinstance(signer, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(oid, v) for oid, v in attributes]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
            critical=False,
        )
        .sign(signer, hashes.SHA256())
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out.with_suffix(".crt"), out.with_suffix(".key")
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def legacy_pki(
    directory: Path, cluster: str = "default", agents: tuple[str, ...] = ("agent-1", "agent-2")
) -> PkiPaths:
    """What `tether certs init` wrote before the frontend CA: one CA signs
    the broker, the frontend and the agents; subjects carry no role."""
    pki = init_pki(directory, cluster=cluster, agents=agents)
    for name in ("frontend-ca.crt", "frontend-ca.key"):
        (directory / name).unlink(missing_ok=True)
    leaves = [("tether-frontend", directory / "frontend")]
    leaves += [(a, directory / "agents" / a) for a in agents]
    for cn, out in leaves:
        issue(
            pki.ca_cert,
            pki.ca_key,
            out,
            [(NameOID.ORGANIZATION_NAME, cluster), (NameOID.COMMON_NAME, cn)],
        )
    return pki


async def curl_connect(
    broker: BrokerHandle, target: str, cert: Path, key: Path
) -> tuple[str, bytes]:
    """CONNECT through the TCP mTLS frontend with real curl; returns the
    CONNECT status curl saw ("000": no HTTP answer, e.g. a TLS alert) and
    the body fetched through the tunnel."""
    curl = shutil.which("curl")
    assert curl, "curl is installed by `make sysdeps`"
    result = await trio.run_process(
        [
            curl,
            "-sS",
            "--max-time",
            "15",
            "-p",
            "--proxy",
            f"https://localhost:{broker.server_port}",
            "--proxy-cacert",
            str(broker.pki.ca_cert),
            "--proxy-cert",
            str(cert),
            "--proxy-key",
            str(key),
            "-o",
            "-",
            "-w",
            "\n%{http_connect}",
            f"http://{target}/",
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    body, _, code = result.stdout.rpartition(b"\n")
    return code.decode().strip(), body


async def serve_named(nursery: trio.Nursery, name: bytes) -> int:
    """An HTTP target that answers with its name."""

    async def handler(stream: trio.SocketStream) -> None:
        try:
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                request += chunk
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(name)
                + name
            )
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


async def rejected_count(broker: BrokerHandle, reason: str) -> float:
    return metric(await broker.metrics(), "tether_agent_connections_rejected_total", reason=reason)


async def agent_rejected(proc: Proc) -> bool:
    return "broker rejected this agent" in proc.log()


def tls12_client(
    ca: Path, cert: Path | None, key: Path | None, *, ciphers: str | None, alpn: list[str]
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(ca))
    if cert is not None and key is not None:
        ctx.load_cert_chain(str(cert), str(key))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if ciphers:
        ctx.set_ciphers(ciphers)
    ctx.set_alpn_protocols(alpn)
    return ctx


async def handshake(port: int, ctx: ssl.SSLContext) -> str | None:
    """The negotiated cipher, or None if the server refused the handshake."""
    with trio.fail_after(10):
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        stream = trio.SSLStream(tcp, ctx, server_hostname="localhost")
        try:
            await stream.do_handshake()
            # TLS 1.3 client certificate errors arrive after the handshake.
            with trio.move_on_after(0.3):
                await stream.receive_some(1)
        except trio.BrokenResourceError:
            return None
        finally:
            await trio.aclose_forcefully(stream)
        cipher = stream.cipher()
        return cipher[0] if cipher else None


# ------------------------------------------------------------------ row 1a


@pytest.mark.timeout(90)
@pytest.mark.parametrize("trust", ["default", "agent-ca-bundled"])
async def test_agent_certificate_is_refused_on_the_tcp_frontend(
    tmp_path: Path,
    pki: PkiPaths,
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    nursery: trio.Nursery,
    trust: str,
) -> None:
    extra = []
    if trust == "agent-ca-bundled":
        # The operator's mistake: the agent CA bundled into --server-ca-cert.
        mixed = bundle(tmp_path / "frontend-trust.pem", frontend_ca_of(pki), pki.ca_cert)
        extra.append(f"--server-ca-cert={mixed}")
    broker = broker_factory(*extra)
    agent_factory(broker)  # agent-1, next to the target
    await broker.ready(agents=1)
    port = await serve_named(nursery, b"beside agent-1")
    target = f"127.0.0.1:{port}"

    stolen_cert, stolen_key = pki.agent("agent-2")
    code, body = await curl_connect(broker, target, stolen_cert, stolen_key)
    assert code != "200" and b"beside agent-1" not in body, (code, body)
    if trust == "default":
        # agents/*.crt does not chain to the frontend CA: a TLS alert.
        assert code == "000", code
        assert await wait_log(broker, "frontend TLS handshake failed")
        assert await bad_input(broker, "frontend", "tls") >= 1
    else:
        # It chains, but the role check refuses it.
        assert code == "403", code
        assert await wait_log(broker, "frontend client certificate refused")
        assert "wrong_role" in broker.proc.log()
        assert await bad_input(broker, "frontend", "wrong_role") >= 1

    # The frontend's own certificate still works on the same broker.
    code, body = await curl_connect(broker, target, pki.frontend_cert, pki.frontend_key)
    assert (code, body) == ("200", b"beside agent-1")
    assert broker.proc.alive()


# ------------------------------------------------------------------ row 1b


@pytest.mark.timeout(90)
@pytest.mark.parametrize("trust", ["default", "frontend-ca-bundled"])
async def test_frontend_certificate_cannot_register_as_an_agent(
    tmp_path: Path,
    pki: PkiPaths,
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    nursery: trio.Nursery,
    trust: str,
) -> None:
    extra = []
    if trust == "frontend-ca-bundled":
        agent_trust = bundle(tmp_path / "agent-trust.pem", pki.ca_cert, frontend_ca_of(pki))
        extra.append(f"--cluster-ca-cert={agent_trust}")
    broker = broker_factory(*extra)
    await broker.up()
    impostor = agent_factory(
        broker,
        f"--agent-cert={pki.frontend_cert}",
        f"--agent-key={pki.frontend_key}",
        agent_id="tether-frontend",
    )
    if trust == "default":
        # frontend.crt does not chain to the agent CA: the handshake fails.
        async def refused_tls() -> bool:
            return await bad_input(broker, "agent", "tls_handshake") >= 1

        await wait_for(refused_tls, 20, "TLS refusal of frontend.crt on the agent port")
        assert await wait_log(broker, "TLS handshake failed")
    else:
        await wait_for(lambda: agent_rejected(impostor), 20, "impostor rejected")
        assert await wait_log(broker, "rejected (403): wrong_role")
        assert await rejected_count(broker, "wrong_role") >= 1
        assert "wrong_role" in impostor.log()
    await trio.sleep(0.5)
    assert "agent connected: id=tether-frontend" not in broker.proc.log()

    # A real agent still registers and carries a tunnel.
    agent_factory(broker)
    await broker.ready(agents=1)
    echo = await serve_echo(nursery)
    await tunnel_roundtrip(broker, echo, via="uds")


# ------------------------------------------------------------------- row 2


@pytest.mark.timeout(120)
@pytest.mark.parametrize("style", ["current", "legacy"])
async def test_tenant_certificate_cannot_name_another_tenant(
    tmp_path: Path,
    agent_factory: Callable[..., Proc],
    procs_started: list[Proc],
    nursery: trio.Nursery,
    style: str,
) -> None:
    if style == "current":
        pki_a = init_pki(tmp_path / "a", cluster="tenant-a", agents=("agent-a",))
        pki_b = init_pki(tmp_path / "b", cluster="tenant-b", agents=("agent-b",))
    else:
        pki_a = legacy_pki(tmp_path / "a", cluster="tenant-a", agents=("agent-a",))
        pki_b = legacy_pki(tmp_path / "b", cluster="tenant-b", agents=("agent-b",))
    ca_a, ca_b = frontend_ca_of(pki_a), frontend_ca_of(pki_b)
    frontend_keys = {"a": "", "b": ""}
    if style == "current":
        frontend_keys = {"a": f'frontend_ca = "{ca_a}"', "b": f'frontend_ca = "{ca_b}"'}
    config = tmp_path / "clusters.toml"
    config.write_text(
        f"""
[[clusters]]
name = "tenant-a"
agent_ca = "{pki_a.ca_cert}"
{frontend_keys["a"]}
frontend_uds = "{tmp_path / "a.sock"}"

[[clusters]]
name = "tenant-b"
agent_ca = "{pki_b.ca_cert}"
{frontend_keys["b"]}
frontend_uds = "{tmp_path / "b.sock"}"
"""
    )
    trust = bundle(tmp_path / "frontend-bundle.pem", ca_a, ca_b)
    broker = start_broker(
        tmp_path,
        pki_a,
        f"--config={config}",
        f"--server-ca-cert={trust}",
        "--cluster-ca-cert=",
        "--uds-name=",
    )
    procs_started.append(broker.proc)
    await broker.up()
    # Agents of b trust the broker certificate of a's PKI (its ca.crt).
    agent_factory(broker, agent_id="agent-b", pki=pki_b)
    await broker.ready(agents=1)
    port = await serve_named(nursery, b"beside tenant-b")
    target = f"127.0.0.1:{port}"

    # Tenant b's own frontend reaches its agent.
    code, body = await curl_connect(broker, target, pki_b.frontend_cert, pki_b.frontend_key)
    assert (code, body) == ("200", b"beside tenant-b")

    # Tenant a signs a frontend certificate naming tenant-b.
    attrs = [(NameOID.ORGANIZATION_NAME, "tenant-b")]
    if style == "current":
        attrs.append((NameOID.ORGANIZATIONAL_UNIT_NAME, "tether-frontend"))
    attrs.append((NameOID.COMMON_NAME, "tether-frontend"))
    ca_key_a = ca_a.with_suffix(".key")
    forged_cert, forged_key = issue(ca_a, ca_key_a, tmp_path / "forged" / "frontend", attrs)
    code, body = await curl_connect(broker, target, forged_cert, forged_key)
    assert code == "403" and b"beside tenant-b" not in body, (code, body)
    assert await wait_log(broker, "frontend client certificate refused")
    assert "identity_mismatch" in broker.proc.log()
    assert await bad_input(broker, "frontend", "identity_mismatch") >= 1

    # Tenant b still works afterwards.
    code, body = await curl_connect(broker, target, pki_b.frontend_cert, pki_b.frontend_key)
    assert (code, body) == ("200", b"beside tenant-b")


# ------------------------------------------------------------------ row 13


@pytest.mark.timeout(90)
async def test_tls12_cbc_refused_and_agent_port_is_tls13(
    pki: PkiPaths,
    tunnel_env: tuple[BrokerHandle, Proc],
    nursery: trio.Nursery,
) -> None:
    broker, _agent = tunnel_env
    agent_cert, agent_key = pki.agent("agent-2")
    before_agent = await bad_input(broker, "agent", "tls_handshake")
    before_frontend = await bad_input(broker, "frontend", "tls")

    # CBC-only TLS 1.2 client on the agent port and on the TCP frontend.
    cbc_agent = tls12_client(pki.ca_cert, agent_cert, agent_key, ciphers=CBC_ONLY, alpn=["h2"])
    assert await handshake(broker.agent_port, cbc_agent) is None
    cbc_front = tls12_client(
        pki.ca_cert, pki.frontend_cert, pki.frontend_key, ciphers=CBC_ONLY, alpn=["http/1.1"]
    )
    assert await handshake(broker.server_port, cbc_front) is None

    # TLS 1.2, even with an AEAD suite, is refused on the agent port by default.
    aead_agent = tls12_client(pki.ca_cert, agent_cert, agent_key, ciphers=None, alpn=["h2"])
    assert await handshake(broker.agent_port, aead_agent) is None

    # ... while the TCP frontend still speaks TLS 1.2 with AEAD suites.
    aead_front = tls12_client(
        pki.ca_cert, pki.frontend_cert, pki.frontend_key, ciphers=None, alpn=["http/1.1"]
    )
    cipher = await handshake(broker.server_port, aead_front)
    assert cipher is not None and ("GCM" in cipher or "CHACHA20" in cipher), cipher

    assert await bad_input(broker, "agent", "tls_handshake") >= before_agent + 2
    assert await bad_input(broker, "frontend", "tls") >= before_frontend + 1
    assert await wait_log(broker, "frontend TLS handshake failed")
    agent_lines = [
        line
        for line in broker.proc.log().splitlines()
        if "agent connection from 127.0.0.1" in line and "TLS handshake failed" in line
    ]
    assert len(agent_lines) >= 2, broker.proc.log()[-2000:]

    echo = await serve_echo(nursery)
    await tunnel_roundtrip(broker, echo, via="tcp")


@pytest.mark.timeout(90)
async def test_agent_port_lowered_to_tls12_still_refuses_cbc(
    pki: PkiPaths,
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    nursery: trio.Nursery,
) -> None:
    broker = broker_factory("--agent-tls-min-version=1.2")
    await broker.up()
    agent_cert, agent_key = pki.agent("agent-2")
    cbc = tls12_client(pki.ca_cert, agent_cert, agent_key, ciphers=CBC_ONLY, alpn=["h2"])
    assert await handshake(broker.agent_port, cbc) is None
    assert await bad_input(broker, "agent", "tls_handshake") >= 1
    aead = tls12_client(pki.ca_cert, agent_cert, agent_key, ciphers=None, alpn=["h2"])
    cipher = await handshake(broker.agent_port, aead)
    assert cipher is not None and ("GCM" in cipher or "CHACHA20" in cipher), cipher
    agent_factory(broker)
    await broker.ready(agents=1)
    echo = await serve_echo(nursery)
    await tunnel_roundtrip(broker, echo, via="uds")


# -------------------------------------------------------------- migration


@pytest.mark.timeout(120)
async def test_old_pki_keeps_working_with_a_warning_then_migrates(
    tmp_path: Path,
    agent_factory: Callable[..., Proc],
    procs_started: list[Proc],
    nursery: trio.Nursery,
) -> None:
    old = legacy_pki(tmp_path / "pki")
    agent_files = {p: p.read_bytes() for p in sorted(old.agents_dir.iterdir())}
    ca_before = old.ca_cert.read_bytes()
    broker = start_broker(tmp_path, old, f"--server-ca-cert={old.ca_cert}")
    procs_started.append(broker.proc)
    await broker.up()
    agent_factory(broker, pki=old)
    await broker.ready(agents=1)
    port = await serve_named(nursery, b"beside agent-1")
    target = f"127.0.0.1:{port}"

    warnings = [
        line
        for line in broker.proc.log().splitlines()
        if "WARNING" in line and "tether certs add-frontend-ca" in line
    ]
    assert len(warnings) == 1, broker.proc.log()[-3000:]
    assert str(old.ca_cert) in warnings[0]

    # The old frontend certificate works; an agent certificate does not.
    code, body = await curl_connect(broker, target, old.frontend_cert, old.frontend_key)
    assert (code, body) == ("200", b"beside agent-1")
    cert, key = old.agent("agent-2")
    code, body = await curl_connect(broker, target, cert, key)
    assert code == "403" and b"beside" not in body, (code, body)
    assert await bad_input(broker, "frontend", "wrong_role") >= 1
    # ... and the old frontend certificate cannot register as an agent.
    impostor = agent_factory(
        broker,
        f"--agent-cert={old.frontend_cert}",
        f"--agent-key={old.frontend_key}",
        pki=old,
        agent_id="tether-frontend",
    )
    await wait_for(lambda: agent_rejected(impostor), 20, "old frontend.crt rejected as agent")
    assert await rejected_count(broker, "wrong_role") >= 1
    assert await wait_log(broker, "rejected (403): wrong_role")
    broker.proc.stop()

    # The command the warning names: agents and ca.crt stay as they are.
    assert cli.main(["certs", "add-frontend-ca", str(tmp_path / "pki")]) == 0
    assert {p: p.read_bytes() for p in sorted(old.agents_dir.iterdir())} == agent_files
    assert old.ca_cert.read_bytes() == ca_before
    new = PkiPaths.in_dir(tmp_path / "pki")
    assert new.frontend_ca_cert.exists()

    broker = start_broker(tmp_path, new, f"--server-ca-cert={new.frontend_ca_cert}")
    procs_started.append(broker.proc)
    await broker.up()
    agent_factory(broker, pki=new)  # the same agent certificate as before
    await broker.ready(agents=1)
    assert "tether certs add-frontend-ca" not in broker.proc.log()
    code, body = await curl_connect(broker, target, new.frontend_cert, new.frontend_key)
    assert (code, body) == ("200", b"beside agent-1")
    code, _ = await curl_connect(broker, target, cert, key)
    assert code in ("403", "000"), code
