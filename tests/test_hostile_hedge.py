"""The hedge marker (``tether-agent-hedge``) is bound to the authenticated
identity (docs/security.md, "Which connection wins"): it lets the same agent
process, with the same credential, open a second connection that takes new
dials while the first keeps its streams. From another credential, or another
process, it changes nothing: the live connection stays and the newcomer is
refused as without the marker; a malformed marker is refused with a reason."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from hostile import metric
from procs import BrokerHandle, Proc
from test_e2e_routing import dials_by, serve_whoami, whoami
from test_hostile_identity import control_status, rejected_total, token_line

pytestmark = [pytest.mark.e2e]

HEDGE = (("tether-agent-hedge", "1"),)


@pytest.mark.timeout(120)
async def test_a_hedge_marker_does_not_let_another_credential_or_process_in(
    tmp_path: Path,
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    nursery: trio.Nursery,
) -> None:
    own, fleet = "own-token-0123456789", "fleet-token-0123456789"
    tokens = tmp_path / "tokens"
    tokens.write_text(token_line(own, "edge-02") + token_line(fleet, "edge-*", "max=3"))
    broker = broker_factory(f"--agent-token-file={tokens}")
    await broker.up()
    tok = tmp_path / "own.token"
    tok.write_text(own + "\n")
    real = agent_factory(
        broker, f"--service-account-token-path={tok}", agent_id="edge-02", client_cert=False
    )
    await broker.ready(agents=1)
    found = re.search(r"agent connected: id=edge-02 .*instance=([0-9a-f]+)", broker.proc.log())
    assert found is not None, broker.proc.log()[-2000:]
    instance = found.group(1)  # an attacker may learn it: it is not a secret
    port = await serve_whoami(nursery, "127.0.0.1")
    target = f"127.0.0.1:{port}"

    # Another credential (the fleet token), the real process's instance, the marker.
    status, text = await control_status(broker, "edge-02", fleet, instance=instance, extra=HEDGE)
    assert status == "409" and "identity_in_use:" in text, (status, text)
    # The same credential from another process (instance), with the marker:
    # the live one answers its probe, so the newcomer is refused.
    status, text = await control_status(broker, "edge-02", own, instance="f" * 16, extra=HEDGE)
    assert status == "409" and "agent_id_live:" in text, (status, text)
    # Malformed markers: a clear refusal with its reason, and a metric.
    status, text = await control_status(
        broker, "edge-02", own, instance=instance, extra=(("tether-agent-hedge", "yes"),)
    )
    assert status == "403" and "bad_hedge:" in text, (status, text)
    status, text = await control_status(broker, "edge-02", own, extra=HEDGE)
    assert status == "403" and "bad_hedge:" in text, (status, text)

    # The real agent kept its place throughout: every dial reaches it.
    before = len(dials_by(real))
    for _ in range(5):
        assert await whoami(broker, target) == (200, b"127.0.0.1")
    assert len(dials_by(real)) == before + 5
    text = await broker.metrics()
    assert metric(text, "tether_agent_hedges_accepted_total") == 0
    assert rejected_total(text, "identity_in_use") >= 1
    assert rejected_total(text, "agent_id_live") >= 1
    assert rejected_total(text, "bad_hedge") == 2
    assert metric(text, "tether_agent_disconnects_total", cause="replaced") == 0
    assert "agent_hedged" not in broker.proc.log()
    assert real.alive() and "disconnected from broker" not in real.log()


@pytest.mark.timeout(120)
async def test_one_race_holds_one_place_and_the_agent_gets_it_back(
    tmp_path: Path,
    broker_factory: Callable[..., BrokerHandle],
    agent_factory: Callable[..., Proc],
    nursery: trio.Nursery,
) -> None:
    """With the agent's own credential and instance (a stolen device's, say)
    a hedge takes new dials; a second one while the first is live is refused
    409 ``duplicate``, so one race never stacks connections; when the
    hedge ends, the agent's own connection takes dials again."""
    own = "own-token-0123456789"
    tokens = tmp_path / "tokens"
    tokens.write_text(token_line(own, "edge-02"))
    broker = broker_factory(f"--agent-token-file={tokens}")
    await broker.up()
    tok = tmp_path / "own.token"
    tok.write_text(own + "\n")
    real = agent_factory(
        broker,
        f"--service-account-token-path={tok}",
        "--hedge-after=0",
        agent_id="edge-02",
        client_cert=False,
    )
    await broker.ready(agents=1)
    found = re.search(r"agent connected: id=edge-02 .*instance=([0-9a-f]+)", broker.proc.log())
    assert found is not None
    instance = found.group(1)
    port = await serve_whoami(nursery, "127.0.0.1")
    target = f"127.0.0.1:{port}"
    held: list[trio.abc.Stream] = []
    status, text = await control_status(
        broker, "edge-02", own, instance=instance, extra=HEDGE, hold=held
    )
    assert status == "200", (status, text)
    status, text = await control_status(broker, "edge-02", own, instance=instance, extra=HEDGE)
    assert status == "409" and "duplicate:" in text, (status, text)
    text = await broker.metrics()
    assert metric(text, "tether_agent_hedges_accepted_total") == 1
    assert metric(text, "tether_agents_connected", kind="tether") == 1
    for stream in held:
        await trio.aclose_forcefully(stream)
    with trio.fail_after(20):
        while "takes dials again" not in broker.proc.log():
            await trio.sleep(0.1)
    before = len(dials_by(real))
    for _ in range(3):
        assert await whoami(broker, target) == (200, b"127.0.0.1")
    assert len(dials_by(real)) == before + 3
    text = await broker.metrics()
    assert metric(text, "tether_agents_connected", kind="tether") == 1
