"""``--count-server-leases``: the agent learns how many broker replicas there
are from their live Leases (see protocol/leases.py), as a konnectivity agent
does, instead of from the count each broker reports.

Imported only with the flag, so agents without it never load PyYAML or the
Kubernetes client.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

import trio

from protocol import leases
from tether.netio.kubeapi import KubeApiError, KubeClient, list_leases
from tether.netio.logs import event

log = logging.getLogger("tether.agent")


class LeaseCounter:
    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        labels: Mapping[str, str],
        on_count: Callable[[int], None],
        *,
        clock: Callable[[], float] = time.time,
        interval_s: float = leases.RENEW_S,
        on_list: Callable[[int, str, float], None] | None = None,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.labels = dict(labels)
        self.on_count = on_count
        self.clock = clock
        self.interval_s = interval_s
        #: Told of every list call: (HTTP status, 0 when none came back;
        #: reason token; seconds), for konnectivity's lease_lists_total.
        self.on_list = on_list
        #: Live Leases at the last successful count; 0 until one succeeded.
        self.count = 0
        self._failing = False

    async def poll_once(self) -> int:
        started = trio.current_time()
        try:
            found = await list_leases(self.client, self.namespace, self.labels)
        except KubeApiError as exc:
            self._observe(exc.status, "error" if exc.status else "unreachable", started)
            raise
        self._observe(200, "ok", started)
        return len(leases.live(found, self.clock()))

    def _observe(self, status: int, reason: str, started: float) -> None:
        if self.on_list is not None:
            self.on_list(status, reason, trio.current_time() - started)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while True:
                try:
                    count = await self.poll_once()
                except KubeApiError as exc:
                    if not self._failing:
                        log.warning(
                            "cannot count broker leases in %s: %s (keeping %d)",
                            self.namespace,
                            exc,
                            self.count,
                            extra=event("lease_count_failed", error=str(exc)),
                        )
                    self._failing = True
                else:
                    self._failing = False
                    if count != self.count:
                        log.info(
                            "broker leases: %d live (was %d)",
                            count,
                            self.count,
                            extra=event("lease_count", count=count, previous=self.count),
                        )
                        self.count = count
                        if count > 0:
                            self.on_count(count)
                await trio.sleep(self.interval_s)
        finally:
            with trio.CancelScope(shield=True):
                await self.client.aclose()
