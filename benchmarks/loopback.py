"""Loopback comparison, kept as a shortcut into the harness.

    python -m benchmarks.loopback [--quick] [--out DIR]

is ``python -m benchmarks run --profile loopback --scenario S1,S2``: S1 bulk
(with CPU per GB) and S2 echo for every contender on 127.0.0.1, no link
emulation and no root needed.
"""

from __future__ import annotations

import sys

from benchmarks.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["run", "--profile", "loopback", "--scenario", "S1,S2", *sys.argv[1:]]))
