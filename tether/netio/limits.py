"""Per-peer admission: at most N concurrent unauthenticated connections per
source address, so one host cannot hold every handshake slot."""

from __future__ import annotations


class PeerSlot:
    """One admitted connection; :meth:`release` is idempotent."""

    def __init__(self, limiter: PerPeerLimiter, peer: str) -> None:
        self._limiter = limiter
        self._peer: str | None = peer

    def release(self) -> None:
        if self._peer is not None:
            self._limiter._release(self._peer)
            self._peer = None


class PerPeerLimiter:
    """Counts connections per peer address while they hold a slot."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self._counts: dict[str, int] = {}
        self._warned: set[str] = set()

    def acquire(self, peer: str) -> PeerSlot | None:
        """A slot for ``peer``, or None when it already holds ``limit``."""
        count = self._counts.get(peer, 0)
        if count >= self.limit:
            return None
        self._counts[peer] = count + 1
        return PeerSlot(self, peer)

    def first_refusal(self, peer: str) -> bool:
        """True once per episode of ``peer`` being at its limit (log once)."""
        if peer in self._warned:
            return False
        self._warned.add(peer)
        return True

    def _release(self, peer: str) -> None:
        count = self._counts.get(peer, 0) - 1
        if count <= 0:
            self._counts.pop(peer, None)
        else:
            self._counts[peer] = count
        if count < self.limit:
            self._warned.discard(peer)
