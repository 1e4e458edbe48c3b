"""The agent loads at start only what an idle agent needs (issue 16): every
module is memory the edge device pays for. Those below are loaded on first
use instead (a config file, --log-file, the broker's certificate and gRPC
code)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

#: Loaded on demand only: tomllib/difflib with a config file,
#: logging.handlers (and pickle) with --log-file; the rest is the broker's.
NOT_AT_IDLE = (
    "tomllib",
    "difflib",
    "logging.handlers",
    "pickle",
    "cryptography",
    "prometheus_client",
    "google.protobuf",
    "grpc",
)


@pytest.mark.timeout(60)
def test_the_agent_command_imports_no_on_demand_module() -> None:
    code = "import sys, json, edge_agent.cli; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=50, check=True
    )
    loaded = set(json.loads(out.stdout))
    assert not loaded & set(NOT_AT_IDLE), sorted(loaded & set(NOT_AT_IDLE))
