"""Start-up errors are one line naming the flag, exit 2; rejections say what
happened (issue 15 rows 5 and 6). Through the real commands."""

from __future__ import annotations

import datetime as dt
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from procs import BrokerHandle, Proc, free_port, wait_for

from tether.tools.certs import PkiPaths, init_pki
from tether.tools.launch import BIN

pytestmark = [pytest.mark.e2e]


def _leaf(pki: PkiPaths, tmp: Path, name: str, *, start: float, end: float) -> tuple[Path, Path]:
    """An agent certificate for ``name`` signed by the PKI's CA, valid from
    ``start`` to ``end`` days from now (negative: in the past)."""
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), None)
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "default"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "tether-agent"),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + dt.timedelta(days=start))
        .not_valid_after(now + dt.timedelta(days=end))
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    cert_path, key_path = tmp / f"{name}.crt", tmp / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def _broker_argv(pki: PkiPaths, tmp: Path, **override: str) -> list[str]:
    flags = {
        "uds-name": str(tmp / "b.sock"),
        "cluster-cert": str(pki.broker_cert),
        "cluster-key": str(pki.broker_key),
        "cluster-ca-cert": str(pki.ca_cert),
        "agent-bind-address": "127.0.0.1",
        "agent-port": "0",
        "health-port": "0",
        "admin-port": "0",
        **override,
    }
    return [str(BIN / "tether-broker"), *(f"--{k}={v}" for k, v in flags.items())]


def _agent_argv(pki: PkiPaths, cert: Path, key: Path, port: int = 1) -> list[str]:
    return [
        str(BIN / "tether-agent"),
        f"--ca-cert={pki.ca_cert}",
        f"--agent-cert={cert}",
        f"--agent-key={key}",
        "--agent-id=agent-1",
        "--proxy-server-host=127.0.0.1",
        f"--proxy-server-port={port}",
        "--health-server-port=0",
        "--sync-interval=0.2",
        "--sync-interval-cap=1",
    ]


def _one_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.mark.timeout(90)
def test_broker_file_flags_are_checked_up_front(tmp_path: Path, pki: PkiPaths) -> None:
    missing = tmp_path / "nope" / "ca.crt"
    line = _one_error(_run(_broker_argv(pki, tmp_path, **{"cluster-ca-cert": str(missing)})))
    assert f"--cluster-ca-cert: cannot read {missing}: No such file or directory" in line
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("not a certificate\n")
    line = _one_error(_run(_broker_argv(pki, tmp_path, **{"cluster-ca-cert": str(garbage)})))
    assert f"--cluster-ca-cert: {garbage} is not a PEM CA bundle" in line
    other = init_pki(tmp_path / "other")
    line = _one_error(_run(_broker_argv(pki, tmp_path, **{"cluster-key": str(other.broker_key)})))
    assert f"--cluster-key: {other.broker_key} is not the key of --cluster-cert" in line
    unreadable = tmp_path / "tokens"
    line = _one_error(_run(_broker_argv(pki, tmp_path, **{"agent-token-file": str(unreadable)})))
    assert f"--agent-token-file: cannot read {unreadable}" in line


@pytest.mark.timeout(90)
def test_agent_certificate_expired_or_not_yet_valid(tmp_path: Path, pki: PkiPaths) -> None:
    cert, key = _leaf(pki, tmp_path, "old", start=-30, end=-1)
    line = _one_error(_run(_agent_argv(pki, cert, key)))
    assert f"--agent-cert: {cert} expired at" in line
    cert, key = _leaf(pki, tmp_path, "future", start=2, end=30)
    line = _one_error(_run(_agent_argv(pki, cert, key)))
    assert f"--agent-cert: {cert} is not valid yet" in line


@pytest.mark.timeout(90)
async def test_expiring_certificate_warns_and_rejections_are_named(
    tmp_path: Path,
    pki: PkiPaths,
    broker_factory: Callable[..., BrokerHandle],
    procs_started: list[Proc],
) -> None:
    broker = broker_factory()
    await broker.up()
    # a certificate that expires in 3 days: a WARNING, and the agent connects
    cert, key = _leaf(pki, tmp_path, "agent-1", start=-1, end=3)
    agent = Proc("agent", _agent_argv(pki, cert, key, broker.agent_port), tmp_path / "a.log")
    procs_started.append(agent)
    await broker.ready(agents=1)
    assert f"--agent-cert: {cert} expires in " in agent.log()
    assert "WARNING" in next(line for line in agent.log().splitlines() if "expires in" in line)
    assert agent.stop() == 0
    # a certificate from a CA the broker does not trust: said so, at ERROR
    stranger = init_pki(tmp_path / "stranger")
    cert, key = stranger.agent("agent-1")
    args = _agent_argv(pki, cert, key, broker.agent_port)
    agent = Proc("stranger", args, tmp_path / "s.log")
    procs_started.append(agent)

    async def said() -> bool:
        return "the broker rejected our certificate: unknown CA" in agent.log()

    await wait_for(said, 20, "the rejection named")
    line = next(line for line in agent.log().splitlines() if "unknown CA" in line)
    assert " ERROR " in line
    assert "cause: TLS handshake failed: the broker rejected our certificate" in agent.log()


@pytest.mark.timeout(60)
def test_connect_failures_carry_the_errno_and_rise_to_warning(
    tmp_path: Path, pki: PkiPaths
) -> None:
    """A broker port where nothing listens (issue 15 row 7): the reason is
    the system's ("connection refused"), and from the third attempt on the
    line is a WARNING."""
    cert, key = pki.agent("agent-1")
    port = free_port()
    proc = Proc("agent", _agent_argv(pki, cert, key, port), tmp_path / "a.log")
    try:

        def warned() -> bool:
            return any(
                "WARNING" in line and "attempt 3" in line for line in proc.log().splitlines()
            )

        deadline = time.monotonic() + 30
        while not warned():
            assert time.monotonic() < deadline, proc.log()
            time.sleep(0.1)
        assert f"connect failed: 127.0.0.1:{port}: connection refused" in proc.log()
    finally:
        proc.stop()
