#!/usr/bin/env python3
"""Regenerate (or check) the committed protobuf module for the konnectivity schemas.

    python scripts/gen_proto.py                 # write protocol/{konnectivity,agent}_pb2.py{,i}
    python scripts/gen_proto.py --out DIR       # write them into DIR instead
    python scripts/gen_proto.py --check         # exit 1 if the committed files are stale

Only the message module is generated: the runtime speaks gRPC framing itself
and must not need grpcio, so no ``_pb2_grpc.py`` is written (tests build their
own stubs, see ``tests/grpc_stubs.py``).

The output depends on the protoc bundled with grpcio-tools, so ``--check``
only passes with the grpcio-tools version the committed files were made with.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO_DIR = REPO / "protocol"
#: Schemas, in dependency order (agent.proto imports konnectivity.proto).
PROTO_NAMES = ("konnectivity.proto", "agent.proto")
GENERATED = (
    "konnectivity_pb2.py",
    "konnectivity_pb2.pyi",
    "agent_pb2.py",
    "agent_pb2.pyi",
)
#: protoc writes a top-level import for a schema another one imports; inside
#: the ``protocol`` package it must be a package import.
_IMPORT_FIXES = (
    (
        "import konnectivity_pb2 as konnectivity__pb2",
        "from protocol import konnectivity_pb2 as konnectivity__pb2",
    ),
    (
        "import konnectivity_pb2 as _konnectivity_pb2",
        "from protocol import konnectivity_pb2 as _konnectivity_pb2",
    ),
)


def generate(out_dir: Path) -> None:
    """Run protoc (from grpcio-tools) on the schema, writing into ``out_dir``."""
    try:
        from grpc_tools import protoc  # type: ignore[import-untyped]
    except ImportError:
        sys.exit("grpcio-tools is not installed: pip install -e '.[test]'")
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        *(str(PROTO_DIR / name) for name in PROTO_NAMES),
    ]
    rc = protoc.main(args)
    if rc != 0:
        sys.exit(f"protoc failed with exit status {rc}")
    for name in GENERATED:
        path = out_dir / name
        text = path.read_text(encoding="utf-8")
        for old, new in _IMPORT_FIXES:
            text = re.sub(rf"^{re.escape(old)}$", new, text, flags=re.M)
        path.write_text(text, encoding="utf-8")


def _version_line(text: str) -> str:
    for line in text.splitlines():
        if line.startswith("# Protobuf Python Version:"):
            return line
    return ""


def check() -> int:
    """Generate into a temp dir and compare with the committed files."""
    stale: list[str] = []
    with tempfile.TemporaryDirectory(prefix="tether-proto-") as tmp:
        tmp_dir = Path(tmp)
        generate(tmp_dir)
        for name in GENERATED:
            fresh = (tmp_dir / name).read_text(encoding="utf-8")
            committed_path = PROTO_DIR / name
            committed = (
                committed_path.read_text(encoding="utf-8") if committed_path.exists() else ""
            )
            if fresh == committed:
                continue
            stale.append(name)
            diff = difflib.unified_diff(
                committed.splitlines(keepends=True),
                fresh.splitlines(keepends=True),
                fromfile=f"protocol/{name} (committed)",
                tofile=f"protocol/{name} (generated)",
                n=1,
            )
            sys.stderr.writelines(list(diff)[:40])
            old_v, new_v = _version_line(committed), _version_line(fresh)
            if old_v != new_v:
                print(
                    f"note: protoc version differs ({old_v!r} vs {new_v!r}); "
                    "check the installed grpcio-tools version",
                    file=sys.stderr,
                )
    if stale:
        print(
            f"stale generated code: run make proto ({', '.join(stale)})",
            file=sys.stderr,
        )
        return 1
    print("generated protobuf code is up to date")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--out",
        type=Path,
        default=PROTO_DIR,
        help="directory to write the generated module into (default: protocol/)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="generate into a temp dir and fail if the committed files differ",
    )
    args = parser.parse_args(argv)
    if args.check:
        return check()
    generate(args.out)
    print(f"wrote {', '.join(GENERATED)} into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
