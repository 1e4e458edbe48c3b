"""``--server-name``: the TLS server name (SNI) the agent sends and checks the
broker certificate against, with ``{cluster}`` substituted (docs/operations.md
"Sharding clusters across broker sets"). Bad values stop the agent with one
line naming the flag; the end-to-end behaviour is tests/test_e2e_sni_sharding.py."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import pytest
import trio

from edge_agent.config import from_args, tls_server_name
from tether.netio import tls
from tether.netio.tls_stream import TLSStream
from tether.tools.certs import PkiPaths
from tether.tools.launch import BIN

CREDS = ["--ca-cert=ca.crt", "--agent-cert=a.crt", "--agent-key=a.key", "--agent-id=edge-1"]


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("template", "cluster", "host", "expected"),
    [
        ("", "", "broker.example", "broker.example"),  # default: --proxy-server-host
        ("", "", "127.0.0.1", "127.0.0.1"),  # an address: no SNI is sent
        ("", "", "[fd00::1]", "fd00::1"),
        ("{cluster}.brokers.example", "tenant-a", "lb.example", "tenant-a.brokers.example"),
        ("a.{cluster}.example", "prod", "10.0.0.1", "a.prod.example"),
        ("fixed.example", "", "lb.example", "fixed.example"),
        ("10.0.0.7", "", "lb.example", "10.0.0.7"),
    ],
)
def test_server_name_resolves(template: str, cluster: str, host: str, expected: str) -> None:
    assert tls_server_name(template, cluster, host) == expected


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("template", "cluster", "message"),
    [
        ("{cluster}.brokers.example", "", "uses {cluster}, but --cluster is not set"),
        ("{host}.brokers.example", "a", "only {cluster} may be substituted"),
        ("{cluster.brokers.example", "a", "only {cluster} may be substituted"),
        ("*.brokers.example", "", "is not a DNS name"),  # a wildcard is for certificates
        ("brokers.example.", "", "is not a DNS name"),  # SNI carries no trailing dot
        ("{cluster}.brokers.example", "a_b", "'a_b.brokers.example' is not a DNS name"),
        ("bad name.example", "", "is not a DNS name"),
        ("-a.example", "", "is not a DNS name"),
        ("a..example", "", "is not a DNS name"),
        ("x" * 64 + ".example", "", "is not a DNS name"),
        ("1.2.3.999", "", "is not a DNS name"),  # numeric, and no address
        ("bröker.example", "", "is not a DNS name"),  # IDNs go in xn-- form
    ],
)
def test_bad_server_names_are_refused(template: str, cluster: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        tls_server_name(template, cluster, "lb.example")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.timeout(10)
def test_config_checks_the_resolved_name(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = from_args([*CREDS, "--cluster=alpha", "--server-name={cluster}.brokers.test"], {})
    assert cfg.server_name == "{cluster}.brokers.test"
    with pytest.raises(SystemExit) as info:
        from_args([*CREDS, "--server-name={cluster}.brokers.test"], {})
    assert info.value.code == 2
    assert "--server-name: '{cluster}.brokers.test' uses {cluster}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        from_args(CREDS, {"TETHER_AGENT_SERVER_NAME": "*.brokers.test"})
    assert "TETHER_AGENT_SERVER_NAME: '*.brokers.test' is not a DNS name" in (
        capsys.readouterr().err
    )


@pytest.mark.timeout(20)
def test_the_command_exits_with_one_line() -> None:
    run = subprocess.run(
        [str(BIN / "tether-agent"), *CREDS, "--server-name=*.brokers.test"],
        capture_output=True,
        text=True,
        timeout=15,
    )
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--server-name: '*.brokers.test' is not a DNS name" in errors[0]


async def _handshake(paths: PkiPaths, server_name: str) -> str:
    """One TLS handshake over a real socket pair with the agent's own client
    context and TLS stream; "" on success, else the agent's diagnosis."""
    cert, key = paths.agent("agent-1")
    server_ctx = tls.server_context(paths.broker_cert, paths.broker_key, paths.ca_cert, alpn=["h2"])
    client_ctx = tls.client_context(paths.ca_cert, cert, key, alpn=["h2"])
    a, b = trio.socket.socketpair()
    server = TLSStream(trio.SocketStream(a), server_ctx, server_side=True)
    client = TLSStream(
        trio.SocketStream(b), client_ctx, server_side=False, server_hostname=server_name
    )
    error = ""

    async def serve() -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            await server.do_handshake()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            try:
                await client.do_handshake()
            except trio.BrokenResourceError as exc:
                error = tls.tls_diagnosis(str(exc.__cause__)) or str(exc.__cause__)
            await trio.aclose_forcefully(client)
    await trio.aclose_forcefully(server)
    return error


@pytest.mark.timeout(30)
async def test_wildcard_broker_certificate_matches_one_label(tmp_path: Path) -> None:
    """One certificate for every set of a domain: ``tether certs init --san
    '*.brokers.test'``. It matches ``<cluster>.brokers.test`` and nothing
    deeper or elsewhere, so hostname verification stays on."""
    run = subprocess.run(
        [
            str(BIN / "tether"),
            "certs",
            "init",
            "--dir",
            str(tmp_path / "pki"),
            "--san",
            "*.brokers.test",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 0, run.stderr
    paths = PkiPaths.in_dir(tmp_path / "pki")
    name = tls_server_name("{cluster}.brokers.test", "alpha", "lb.example")
    assert await _handshake(paths, name) == ""
    for wrong in ("a.alpha.brokers.test", "alpha.brokers.other", "brokers.test"):
        error = await _handshake(paths, wrong)
        assert error.startswith("cannot verify the broker's certificate: Hostname mismatch"), (
            wrong,
            error,
        )


def _doc_block(lang: str, after: str) -> str:
    """The first ``lang`` code block of docs/operations.md after ``after``."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "operations.md").read_text()
    rest = text[text.index(after) :]
    start = rest.index(f"```{lang}\n") + len(lang) + 4
    return rest[start : rest.index("```", start)]


@pytest.mark.timeout(60)
def test_documented_kubernetes_layout_is_consistent() -> None:
    """docs/operations.md's Kubernetes form of the SNI layout: the Service
    validates (Kubernetes 1.34, strict, offline); the TLSRoute's hostname is
    the name the agents' --server-name makes, under the Gateway listener's
    wildcard, and its backend is the Service."""
    import kubernetes_validate
    import yaml

    objects = list(yaml.safe_load_all(_doc_block("yaml", "**The same on Kubernetes.**")))
    by_kind = {o["kind"]: o for o in objects}
    assert set(by_kind) == {"Service", "Gateway", "TLSRoute"}
    kubernetes_validate.validate(by_kind["Service"], "1.34", strict=True)
    listener = by_kind["Gateway"]["spec"]["listeners"][0]
    assert listener["protocol"] == "TLS" and listener["tls"]["mode"] == "Passthrough"
    route = by_kind["TLSRoute"]["spec"]
    (hostname,) = route["hostnames"]
    assert hostname == tls_server_name("{cluster}.brokers.example", "alpha", "lb.example")
    assert hostname.endswith(listener["hostname"].lstrip("*"))
    assert route["parentRefs"][0]["sectionName"] == listener["name"]
    backend = route["rules"][0]["backendRefs"][0]
    assert backend["name"] == by_kind["Service"]["metadata"]["name"]
    assert backend["port"] == by_kind["Service"]["spec"]["ports"][0]["port"]
