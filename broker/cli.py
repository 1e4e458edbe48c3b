"""``tether-broker``: parse flags, set up logging, run the broker."""

from __future__ import annotations

import os
import sys
import time

import attrs

from broker.app import Broker, clusters_from
from broker.clusters import ClusterConfig, ConfigError
from broker.config import WORKER_ENV, BrokerConfig, from_args
from broker.tokenreview import TokenReviewError
from tether.netio import tls
from tether.netio.kubeapi import KubeApiError
from tether.netio.listeners import UnixSocketError
from tether.netio.logs import start_logging
from tether.netio.process import catch_stop_signals_early, run_main
from tether.netio.tls import TLSConfigError


def _cas(cfg: BrokerConfig, clusters: list[ClusterConfig]) -> list[tuple[str, str]]:
    """Every CA bundle the broker will load, once each, named as the operator
    gave it: the flags, then the config file's clusters."""
    named = [(cfg.cluster_ca_cert, "--cluster-ca-cert"), (cfg.server_ca_cert, "--server-ca-cert")]
    for c in clusters if cfg.config else []:
        named += [
            (c.agent_ca, f"{cfg.config}: cluster {c.name}: agent_ca"),
            (c.frontend_ca, f"{cfg.config}: cluster {c.name}: frontend_ca"),
        ]
    seen: set[str] = set()
    out = []
    for path, name in named:
        if path and path not in seen:
            seen.add(path)
            out.append((path, name))
    return out


def main(argv: list[str] | None = None) -> int:
    catch_stop_signals_early()
    cfg = from_args(argv)
    log = start_logging(cfg, "tether-broker", "tether.broker")
    if log is None:
        return 2
    try:
        clusters = clusters_from(cfg)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    checks = tls.check_files(
        [
            (cfg.cluster_cert, cfg.cluster_key, "--cluster-cert", "--cluster-key"),
            (cfg.server_cert, cfg.server_key, "--server-cert", "--server-key"),
        ],
        _cas(cfg, clusters),
        time.time(),
        readable=[(cfg.agent_token_file, "--agent-token-file"), (cfg.kubeconfig, "--kubeconfig")],
    )
    if not tls.start_up_checks_pass(checks, log):
        return 2
    env = None
    if os.environ.get(WORKER_ENV) or cfg.workers > 1:
        # Imported only with --workers: a broker without them does not pay
        # for the module (issue 16).
        from broker import workers

        env = workers.worker_env()
    if env is not None:  # one of a supervisor's workers (broker/workers.py)
        first = int(env["index"]) == 0
        cfg = attrs.evolve(cfg, enable_lease_controller=cfg.enable_lease_controller and first)
    try:
        broker = Broker(cfg, workers.make_registry) if env is not None else Broker(cfg)
        if env is None:
            broker.bind_sockets()
    except (TLSConfigError, ConfigError, TokenReviewError, UnixSocketError, KubeApiError) as exc:
        log.error("%s", exc)
        return 2
    if env is not None:
        broker.worker = workers.WorkerLink(env, broker.metrics, broker.registry)
    elif cfg.workers > 1:
        supervisor = workers.Supervisor(broker, sys.argv[1:] if argv is None else argv)
        return run_main(supervisor.run, log)
    return run_main(broker.run, log)


if __name__ == "__main__":
    sys.exit(main())
