"""Checking agent bearer tokens with a Kubernetes TokenReview.

This is how konnectivity authenticates agents that run in the cluster: the
agent presents its projected ServiceAccount token, and the broker asks the
cluster's apiserver (``POST /apis/authentication.k8s.io/v1/tokenreviews``)
whether it is valid for the expected audience and which ServiceAccount it
belongs to. The apiserver is reached with the credentials of a kubeconfig
(server URL, CA, client certificate or bearer token).

The apiserver is protected from floods of junk tokens: failed reviews are
remembered for :data:`FAILURE_TTL` seconds (by token digest, at most
:data:`FAILURE_CACHE_SIZE` entries), reviews are rate-limited per source
address (token bucket, :data:`SOURCE_RATE`/s with bursts of
:data:`SOURCE_BURST`, at most :data:`MAX_SOURCES` addresses tracked) and in
all (:data:`GLOBAL_RATE`), and reviews reuse at most :data:`POOL_SIZE`
keep-alive HTTPS connections instead of a TLS handshake each.
"""

from __future__ import annotations

import logging

import attrs
import trio

from tether.netio import kubeapi
from tether.netio.kubeapi import ApiServer

log = logging.getLogger("tether.broker")

#: Seconds a failed review is answered from memory.
FAILURE_TTL = 10.0
FAILURE_CACHE_SIZE = 10_000
#: Reviews per second (and burst) one source address may cause.
SOURCE_RATE = 5.0
SOURCE_BURST = 20
#: Reviews per second (and burst) all sources together may cause.
GLOBAL_RATE = 50.0
GLOBAL_BURST = 100
MAX_SOURCES = 4096
#: Concurrent (kept-alive) HTTPS connections to the apiserver.
POOL_SIZE = 4
REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"


class FailureCache:
    """Recent failed reviews: key -> (status, reason, message), with a TTL
    and a size bound (the oldest entry goes first). Clock-free: callers
    pass ``now``."""

    def __init__(self, ttl: float = FAILURE_TTL, size: int = FAILURE_CACHE_SIZE) -> None:
        self.ttl = ttl
        self.size = size
        self._entries: dict[object, tuple[float, tuple[int, str, str]]] = {}

    def get(self, key: object, now: float) -> tuple[int, str, str] | None:
        found = self._entries.get(key)
        if found is None:
            return None
        if now - found[0] >= self.ttl:
            del self._entries[key]
            return None
        return found[1]

    def put(self, key: object, refusal: tuple[int, str, str], now: float) -> None:
        self._entries.pop(key, None)
        while len(self._entries) >= self.size:
            del self._entries[next(iter(self._entries))]  # oldest first
        self._entries[key] = (now, refusal)

    def __len__(self) -> int:
        return len(self._entries)


class RateLimiter:
    """Token buckets per source address plus one for all sources; the
    table is bounded (full buckets are forgotten first, then the oldest)."""

    def __init__(
        self,
        rate: float = SOURCE_RATE,
        burst: int = SOURCE_BURST,
        global_rate: float = GLOBAL_RATE,
        global_burst: int = GLOBAL_BURST,
        max_sources: int = MAX_SOURCES,
    ) -> None:
        self.rate, self.burst = rate, float(burst)
        self.global_rate, self.global_burst = global_rate, float(global_burst)
        self.max_sources = max_sources
        self._buckets: dict[str, tuple[float, float]] = {}  # source -> (tokens, stamp)
        self._global: tuple[float, float] | None = None

    @staticmethod
    def _refill(bucket: tuple[float, float] | None, rate: float, burst: float, now: float) -> float:
        if bucket is None:
            return burst
        tokens, stamp = bucket
        return min(burst, tokens + max(0.0, now - stamp) * rate)

    def take(self, source: str, now: float) -> bool:
        """Spend one review for ``source``; False if over its budget."""
        tokens = self._refill(self._buckets.get(source), self.rate, self.burst, now)
        shared = self._refill(self._global, self.global_rate, self.global_burst, now)
        if tokens < 1 or shared < 1:
            self._buckets[source] = (tokens, now)
            return False
        if source not in self._buckets and len(self._buckets) >= self.max_sources:
            self._evict(now)
        self._buckets[source] = (tokens - 1, now)
        self._global = (shared - 1, now)
        return True

    def _evict(self, now: float) -> None:
        for key, bucket in list(self._buckets.items()):
            if self._refill(bucket, self.rate, self.burst, now) >= self.burst:
                del self._buckets[key]
        while len(self._buckets) >= self.max_sources:
            del self._buckets[next(iter(self._buckets))]

    def __len__(self) -> int:
        return len(self._buckets)


class TokenReviewError(Exception):
    """The review could not be performed (apiserver unreachable, bad answer)."""


@attrs.frozen
class ReviewResult:
    authenticated: bool
    username: str = ""
    audiences: tuple[str, ...] = ()
    error: str = ""
    #: ``authentication.kubernetes.io/node-name`` of a node-bound token.
    node_name: str = ""


def load_kubeconfig(path: str) -> ApiServer:
    """The current context's cluster and user from a kubeconfig file (one
    reader for both commands: tether.netio.kubeapi)."""
    try:
        return kubeapi.load_kubeconfig(path)
    except kubeapi.KubeApiError as exc:
        raise TokenReviewError(str(exc)) from None


class TokenReviewer:
    """Reviews over at most ``pool_size`` kept-alive apiserver connections
    (:class:`tether.netio.kubeapi.KubeClient`, one request at a time each)."""

    def __init__(
        self,
        apiserver: ApiServer,
        audience: str,
        timeout: float = 5.0,
        pool_size: int = POOL_SIZE,
    ) -> None:
        self.apiserver = apiserver
        self.audience = audience
        self.timeout = timeout
        self._clients = [kubeapi.KubeClient(apiserver, timeout) for _ in range(pool_size)]
        self._idle = list(self._clients)
        self._slots = trio.Semaphore(pool_size)

    @property
    def connections_opened(self) -> int:
        """TLS connections opened so far (a metric's worth; tests read it too)."""
        return sum(client.connections_opened for client in self._clients)

    async def review(self, token: str) -> ReviewResult:
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {
                "token": token,
                **({"audiences": [self.audience]} if self.audience else {}),
            },
        }
        async with self._slots:
            client = self._idle.pop()
            try:
                status, answer = await client.request("POST", REVIEW_PATH, body)
            except kubeapi.KubeApiError as exc:
                raise TokenReviewError(str(exc)) from None
            finally:
                self._idle.append(client)
        if status != 201 and status != 200:
            message = str(answer.get("message", ""))[:200]
            raise TokenReviewError(f"apiserver answered {status}: {message}")
        try:
            st = answer.get("status") or {}
            user = st.get("user") or {}
            extra = user.get("extra") or {}
            nodes = extra.get("authentication.kubernetes.io/node-name") or []
            return ReviewResult(
                authenticated=bool(st.get("authenticated")),
                username=str(user.get("username", "")),
                audiences=tuple(str(a) for a in st.get("audiences") or ()),
                error=str(st.get("error", "")),
                node_name=str(nodes[0]) if isinstance(nodes, list) and nodes else "",
            )
        except (ValueError, AttributeError) as exc:
            raise TokenReviewError(f"unreadable TokenReview answer: {exc}") from None

    async def aclose(self) -> None:
        """Close the kept-alive connections."""
        for client in self._clients:
            await client.aclose()
