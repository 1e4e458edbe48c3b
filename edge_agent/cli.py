"""``tether-agent``: parse flags, set up logging, run the agent."""

from __future__ import annotations

import sys
import time

from edge_agent.app import Agent
from edge_agent.config import from_args
from tether.netio import tls
from tether.netio.logs import start_logging
from tether.netio.process import catch_stop_signals_early, run_main
from tether.netio.tls import TLSConfigError


def _start_up_errors() -> tuple[type[Exception], ...]:
    """What ``Agent()`` raises for a setting it cannot use: TLS files, and the
    kubeconfig of --count-server-leases. tether/netio/kubeapi.py is imported
    only with that flag (issue 16), so only then can its error be raised."""
    kubeapi = sys.modules.get("tether.netio.kubeapi")
    if kubeapi is None:
        return (TLSConfigError,)
    kube_error: type[Exception] = kubeapi.KubeApiError
    return (TLSConfigError, kube_error)


def main(argv: list[str] | None = None) -> int:
    catch_stop_signals_early()
    cfg = from_args(argv)
    log = start_logging(cfg, "tether-agent", "tether.agent")
    if log is None:
        return 2
    log.info("agent id %s (from %s)", cfg.agent_id, cfg.agent_id_source)
    checks = tls.check_files(
        [(cfg.agent_cert, cfg.agent_key, "--agent-cert", "--agent-key")],
        [(cfg.ca_cert, "--ca-cert")],
        time.time(),
        readable=[
            (cfg.service_account_token_path, "--service-account-token-path"),
            (cfg.kubeconfig, "--kubeconfig"),
        ],
    )
    if not tls.start_up_checks_pass(checks, log):
        return 2
    try:
        agent = Agent(cfg)
    except _start_up_errors() as exc:
        log.error("%s", exc)
        return 2
    return run_main(agent.run, log)


if __name__ == "__main__":
    sys.exit(main())
