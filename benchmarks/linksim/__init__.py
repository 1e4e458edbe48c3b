"""User-space link emulator for the benchmark harness (see README.md here)."""

from __future__ import annotations

from .model import DirectionParams, DirectionStats, DropReason, GilbertElliott, LinkModel, Outage
from .netns import (
    DEFAULT_PREFIX,
    LinkSimError,
    LinkSimUnavailable,
    check_available,
    cleanup_stale,
    list_namespaces,
)
from .profiles import (
    DIRECTIONS,
    Direction,
    LinkProfile,
    ProfileError,
    default_queue_bytes,
    load_profile,
    load_profiles,
)
from .selfcheck import CheckReport, CheckSettings, run_self_check
from .sim import CLOUD_ADDR, EDGE_ADDR, IFACE, LinkSim, Side

__all__ = [
    "CLOUD_ADDR",
    "DEFAULT_PREFIX",
    "DIRECTIONS",
    "EDGE_ADDR",
    "IFACE",
    "CheckReport",
    "CheckSettings",
    "Direction",
    "DirectionParams",
    "DirectionStats",
    "DropReason",
    "GilbertElliott",
    "LinkModel",
    "LinkProfile",
    "LinkSim",
    "LinkSimError",
    "LinkSimUnavailable",
    "Outage",
    "ProfileError",
    "Side",
    "check_available",
    "cleanup_stale",
    "default_queue_bytes",
    "list_namespaces",
    "load_profile",
    "load_profiles",
    "run_self_check",
]
