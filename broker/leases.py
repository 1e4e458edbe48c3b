"""The broker's Lease (``--enable-lease-controller``): created at start,
renewed every few seconds, deleted on a clean stop; expired Leases of other
replicas with the same label are garbage-collected, as konnectivity's lease
controller does. Agents with ``--count-server-leases`` count the live ones.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

import trio

from protocol import leases
from tether.netio.kubeapi import KubeApiError, KubeClient, list_leases
from tether.netio.logs import event

log = logging.getLogger("tether.broker")


class LeasePublisher:
    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        labels: Mapping[str, str],
        server_id: str,
        *,
        on_count: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.time,
        renew_s: float = leases.RENEW_S,
        duration_s: int = leases.DURATION_S,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.labels = dict(labels)
        self.server_id = server_id
        self.on_count = on_count
        self.name = leases.lease_name(server_id)
        self.clock = clock
        self.renew_s = renew_s
        self.duration_s = duration_s
        #: Live Leases with our label at the last renewal (ours included), 0 before.
        self.live_count = 0
        self._failing = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            try:
                await self.renew()
                await self.collect()
                if self._failing:
                    log.info("lease %s/%s renewed again", self.namespace, self.name)
                self._failing = False
            except KubeApiError as exc:
                if not self._failing:
                    log.warning(
                        "cannot renew lease %s/%s: %s",
                        self.namespace,
                        self.name,
                        exc,
                        extra=event("lease_failed", lease=self.name, error=str(exc)),
                    )
                self._failing = True
            await trio.sleep(self.renew_s)

    async def renew(self) -> None:
        path = leases.object_path(self.namespace, self.name)
        status, current = await self.client.request("GET", path)
        now = self.clock()
        if status == 404:
            body = leases.lease_body(
                self.namespace,
                self.name,
                self.server_id,
                self.labels,
                now,
                duration_s=self.duration_s,
            )
            status, answer = await self.client.request(
                "POST", leases.collection_path(self.namespace), body
            )
            if status not in (200, 201):
                raise KubeApiError(f"creating lease: {status} {answer.get('message', '')}", status)
            log.info(
                "lease %s/%s created",
                self.namespace,
                self.name,
                extra=event("lease_created", lease=self.name, namespace=self.namespace),
            )
            return
        if status != 200:
            raise KubeApiError(f"reading lease: {status} {current.get('message', '')}", status)
        version = str((current.get("metadata") or {}).get("resourceVersion", ""))
        body = leases.lease_body(
            self.namespace,
            self.name,
            self.server_id,
            self.labels,
            now,
            resource_version=version,
            duration_s=self.duration_s,
        )
        status, answer = await self.client.request("PUT", path, body)
        if status != 200:
            raise KubeApiError(f"renewing lease: {status} {answer.get('message', '')}", status)

    async def collect(self) -> None:
        """Count the live Leases of our label; delete the expired ones."""
        found = await list_leases(self.client, self.namespace, self.labels)
        now = self.clock()
        self.live_count = len(leases.live(found, now))
        if self.on_count is not None:
            self.on_count(self.live_count)
        for old in leases.expired(found, now):
            if not old.name or old.name == self.name:
                continue
            status, _ = await self.client.request(
                "DELETE", leases.object_path(self.namespace, old.name)
            )
            if status in (200, 202, 404):
                log.info(
                    "expired lease %s/%s of %s removed",
                    self.namespace,
                    old.name,
                    old.holder or "?",
                    extra=event("lease_collected", lease=old.name, holder=old.holder),
                )

    async def release(self) -> None:
        """On a clean stop: the replica is gone at once, not after the duration."""
        status = 0
        try:
            with trio.move_on_after(3):
                status, _ = await self.client.request(
                    "DELETE", leases.object_path(self.namespace, self.name)
                )
        except KubeApiError as exc:
            log.warning("cannot delete lease %s/%s: %s", self.namespace, self.name, exc)
        else:
            if status in (200, 202, 404):
                log.info("lease %s/%s deleted", self.namespace, self.name)
            else:
                log.warning(
                    "cannot delete lease %s/%s: %s",
                    self.namespace,
                    self.name,
                    f"apiserver answered {status}" if status else "no answer within 3s",
                )
        await self.client.aclose()
