"""grpcio stubs for the konnectivity ProxyService, generated at test time.

The runtime never needs grpcio, so no ``_pb2_grpc.py`` is committed. Tests
that act as kube-apiserver (a real grpcio client on ``unix:/path``) get the
stub from here::

    from grpc_stubs import proxy_service_stub  # tests/ is on sys.path under pytest
    from protocol import konnectivity_pb2 as pb

    with grpc.insecure_channel(f"unix:{path}") as channel:
        stub = proxy_service_stub()(channel)
        responses = stub.Proxy(iter([pb.Packet(...)]))

protoc writes ``konnectivity_pb2.py`` and ``konnectivity_pb2_grpc.py`` from
``protocol/konnectivity.proto`` into a temporary directory. The grpc module is
then loaded against the committed ``protocol.konnectivity_pb2``, so the stub
sends and returns the very ``Packet`` class the code under test uses.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import shutil
import sys
import tempfile
import threading
import types
from pathlib import Path
from typing import Any

from protocol import konnectivity_pb2

PROTO_DIR = Path(__file__).resolve().parent.parent / "protocol"
PROTO_FILE = PROTO_DIR / "konnectivity.proto"
METHOD_PATH = "/ProxyService/Proxy"

_MODULE_NAME = "tether_test_konnectivity_pb2_grpc"


def _generate(out_dir: Path) -> Path:
    from grpc_tools import protoc  # type: ignore[import-untyped]

    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(PROTO_FILE),
        ]
    )
    if rc != 0:
        raise RuntimeError(f"protoc failed ({rc}) on {PROTO_FILE}")
    grpc_module = out_dir / "konnectivity_pb2_grpc.py"
    if not grpc_module.is_file():
        raise RuntimeError(f"protoc wrote no {grpc_module.name} into {out_dir}")
    return grpc_module


_LOAD_LOCK = threading.Lock()


def load_grpc_module() -> types.ModuleType:
    """Generate and import ``konnectivity_pb2_grpc`` (once per process).

    Thread-safe: client threads may ask for the stub concurrently, and the
    import briefly swaps an entry of ``sys.modules``.
    """
    with _LOAD_LOCK:
        return _load_grpc_module()


@functools.cache
def _load_grpc_module() -> types.ModuleType:
    out_dir = Path(tempfile.mkdtemp(prefix="tether-grpc-stubs-"))
    atexit.register(shutil.rmtree, out_dir, ignore_errors=True)
    path = _generate(out_dir)

    spec = importlib.util.spec_from_file_location(_MODULE_NAME, path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    # The generated code does `import konnectivity_pb2`; point that at the
    # committed module for the duration of the import only.
    saved = sys.modules.get("konnectivity_pb2")
    sys.modules["konnectivity_pb2"] = konnectivity_pb2
    try:
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            del sys.modules["konnectivity_pb2"]
        else:
            sys.modules["konnectivity_pb2"] = saved
    sys.modules[_MODULE_NAME] = module
    module.__dict__["GENERATED_DIR"] = out_dir  # where protoc wrote both modules
    return module


def proxy_service_stub() -> Any:
    """The generated ``ProxyServiceStub`` class; call it with a grpc channel."""
    return load_grpc_module().ProxyServiceStub
