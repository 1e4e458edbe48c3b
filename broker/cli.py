"""``tether-broker``: parse flags, set up logging, run the broker."""

from __future__ import annotations

import logging
import sys

from broker.app import Broker
from broker.clusters import ConfigError
from broker.config import from_args
from broker.tokenreview import TokenReviewError
from tether.netio.kubeapi import KubeApiError
from tether.netio.listeners import UnixSocketError
from tether.netio.logs import setup_logging
from tether.netio.process import catch_stop_signals_early, run_main
from tether.netio.tls import TLSConfigError


def main(argv: list[str] | None = None) -> int:
    catch_stop_signals_early()
    cfg = from_args(argv)
    setup_logging(cfg.log_format, cfg.log_level)
    log = logging.getLogger("tether.broker")
    for warning in cfg.compat_warnings:
        log.warning("%s", warning)
    try:
        broker = Broker(cfg)
        broker.bind_sockets()
    except (TLSConfigError, ConfigError, TokenReviewError, UnixSocketError, KubeApiError) as exc:
        log.error("%s", exc)
        return 2
    return run_main(broker.run, log)


if __name__ == "__main__":
    sys.exit(main())
