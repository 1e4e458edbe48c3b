"""The benchmark harness is not an installed package: make ``import benchmarks``
work from the repository root whatever directory pytest was started in."""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
