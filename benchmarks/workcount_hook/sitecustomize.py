"""Work counters for ``benchmarks/workcount.py``, loaded only by its runs.

``python -m benchmarks.workcount`` puts this directory first on PYTHONPATH,
so every Tether process it starts (broker, agent) imports this file at
start-up. It counts, without changing behaviour:

- trio task steps (each is one task switch),
- HTTP/2 frames parsed and serialized, by type (hyperframe),
- TLS writes and records sent (ssl.SSLObject.write), TLS reads,

and writes the counts to ``$TETHER_WORKCOUNT_DIR/<pid>.json`` on SIGUSR2.
Never used by the product: only benchmark runs set TETHER_WORKCOUNT_DIR.
"""

from __future__ import annotations

import os

_DIR = os.environ.get("TETHER_WORKCOUNT_DIR")


def _install(out_dir: str) -> None:
    import json
    import signal
    import ssl
    from collections import Counter
    from typing import Any

    import hyperframe.frame
    import trio

    counts: Counter[str] = Counter()

    class Steps(trio.abc.Instrument):
        def before_task_step(self, task: Any) -> None:
            counts["task_steps"] += 1

        def after_io_wait(self, timeout: float) -> None:
            counts["io_waits"] += 1

    real_run = trio.run

    def run(*args: Any, **kwargs: Any) -> Any:
        kwargs["instruments"] = [*kwargs.get("instruments", ()), Steps()]
        return real_run(*args, **kwargs)

    trio.run = run  # type: ignore[assignment]

    parse = hyperframe.frame.Frame.parse_frame_header

    def parse_frame_header(header: Any, strict: bool = False) -> Any:
        frame, length = parse(header, strict)
        counts[f"h2_rx_{type(frame).__name__}"] += 1
        return frame, length

    hyperframe.frame.Frame.parse_frame_header = staticmethod(parse_frame_header)  # type: ignore[assignment]

    serialize = hyperframe.frame.Frame.serialize

    def frame_serialize(self: Any) -> bytes:
        counts[f"h2_tx_{type(self).__name__}"] += 1
        return serialize(self)

    hyperframe.frame.Frame.serialize = frame_serialize  # type: ignore[method-assign]

    tls_write = ssl.SSLObject.write
    tls_read = ssl.SSLObject.read

    def write(self: Any, data: Any) -> int:
        n: int = tls_write(self, data)
        counts["tls_writes"] += 1
        counts["tls_records_tx"] += -(-n // 16384)
        return n

    def read(self: Any, *args: Any, **kwargs: Any) -> Any:
        counts["tls_reads"] += 1
        return tls_read(self, *args, **kwargs)

    ssl.SSLObject.write = write  # type: ignore[method-assign]
    ssl.SSLObject.read = read  # type: ignore[method-assign]

    def dump(signum: int, frame: object) -> None:
        path = os.path.join(out_dir, f"{os.getpid()}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(dict(counts), f)
        os.replace(path + ".tmp", path)

    signal.signal(signal.SIGUSR2, dump)


if _DIR:
    _install(_DIR)
