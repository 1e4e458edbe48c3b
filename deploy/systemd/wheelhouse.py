"""Build an offline wheelhouse for edge devices: ``make wheelhouse``.

One folder holds the project's wheel and every dependency for each target
architecture, plus ``pip`` (install.sh bootstraps the venv with it) and the
installer, unit and example settings, so it can be copied to a device that
has no internet and installed with ``sudo ./install.sh``.

Targets are glibc Linux (manylinux) whose python3 is 3.11 or newer: Debian
12 and 13, Raspberry Pi OS 12, Ubuntu 24.04 (docs/operations.md lists them;
Debian 11 and Ubuntu 20.04/22.04 ship an older python3 and are not covered):

- ``x86_64`` and ``aarch64``: binary wheels for everything.
- ``armv7l``: PyPI has binary wheels for cryptography and pure ones for the
  rest, but none for ``msgpack``, ``PyYAML`` and ``cffi``. msgpack and
  PyYAML are built here as pure-Python wheels (same API, slower; their C
  extensions are optional); cffi comes as a source archive that
  the device compiles during install (gcc, libffi-dev and the Python
  headers needed there once), unless a cffi wheel built on an armv7
  machine (``pip wheel cffi==<version>``) is dropped into the folder.

Wheels are for one CPython minor version (``--python-version``, 3.11 by
default; repeat it for several).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BUNDLE = ("install.sh", "tether-agent.service", "agent.toml.example")
ARCHES = ("x86_64", "aarch64", "armv7l")
# Packages whose C extension is optional are built here as pure wheels when
# PyPI has no binary for the target; these variables skip the extension.
PURE_BUILDS = {
    "msgpack": {"MSGPACK_PUREPYTHON": "1"},
    "pyyaml": {"PYYAML_FORCE_LIBYAML": "0"},
}


def platform_tags(arch: str) -> list[str]:
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(17, 32)]
    if arch in ("x86_64", "aarch64"):
        tags.append(f"manylinux2014_{arch}")
    else:
        tags.append(f"linux_{arch}")
    return tags


def pip(*args: str, env: dict[str, str] | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def target_args(arch: str, python_version: str) -> list[str]:
    abi = "cp" + python_version.replace(".", "")
    args = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    args += ["--abi", abi, "--abi", "abi3", "--abi", "none"]
    for tag in platform_tags(arch):
        args += ["--platform", tag]
    return args


def name_version(filename: str) -> tuple[str, str]:
    """``(name, version)`` of a wheel or sdist file name."""
    stem = filename.removesuffix(".whl").removesuffix(".tar.gz").removesuffix(".zip")
    if filename.endswith(".whl"):
        name, version = stem.split("-")[:2]
    else:
        name, _, version = stem.rpartition("-")
    return name.replace("_", "-").lower(), version


def build_own_wheel(dest: Path) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        pip("wheel", "--no-deps", "--wheel-dir", tmp, str(ROOT))
        (built,) = Path(tmp).glob("tether-*.whl")
        target = dest / built.name
        shutil.copy2(built, target)
    return target


def download_arch(own: Path, arch: str, python_version: str, dest: Path, tools: list[str]) -> None:
    """Everything the project needs on ``arch``, all binary."""
    with tempfile.TemporaryDirectory() as tmp:
        pip("download", "--dest", tmp, *target_args(arch, python_version), str(own), *tools)
        for f in Path(tmp).iterdir():
            shutil.copy2(f, dest / f.name)


def download_armv7(python_version: str, dest: Path, pins: list[tuple[str, str]]) -> list[str]:
    """The x86_64 resolution, re-fetched for armv7l package by package: a
    binary wheel where PyPI has one, else a pure build, else the sdist.
    Returns the packages that the device has to compile."""
    compile_on_device = []
    for name, version in pins:
        spec = f"{name}=={version}"
        with tempfile.TemporaryDirectory() as tmp:
            try:
                pip(
                    "download",
                    "--no-deps",
                    "--dest",
                    tmp,
                    *target_args("armv7l", python_version),
                    spec,
                )
            except subprocess.CalledProcessError:
                if name in PURE_BUILDS:
                    env = {**os.environ, **PURE_BUILDS[name]}
                    pip("wheel", "--no-deps", f"--no-binary={name}", "-w", tmp, spec, env=env)
                else:
                    pip("download", "--no-deps", "--no-binary=:all:", "--dest", tmp, spec)
                    compile_on_device.append(spec)
            for f in Path(tmp).iterdir():
                shutil.copy2(f, dest / f.name)
    # Building an sdist offline needs its build backend from the wheelhouse.
    if compile_on_device:
        pip("download", "--dest", str(dest), "--only-binary=:all:", "setuptools")
    return compile_on_device


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dest", type=Path, default=ROOT / "wheelhouse", help="output folder")
    p.add_argument("--arch", action="append", choices=ARCHES, help="target (default: all three)")
    p.add_argument(
        "--python-version", action="append", help="CPython minor version (default: 3.11)"
    )
    p.add_argument("--no-bundle", action="store_true", help="wheels only, no installer files")
    p.add_argument("--clean", action="store_true", help="empty the folder first")
    args = p.parse_args(argv)
    arches = args.arch or list(ARCHES)
    versions = args.python_version or ["3.11"]
    dest: Path = args.dest
    if args.clean and dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True, exist_ok=True)

    own = build_own_wheel(dest)
    tools = ["pip"]
    notes = []
    for version in versions:
        # armv7l follows the x86_64 resolution, so that one always runs.
        with tempfile.TemporaryDirectory() as tmp:
            reference = Path(tmp)
            download_arch(own, "x86_64", version, reference, tools)
            pins = sorted(
                name_version(f.name)
                for f in reference.iterdir()
                if not f.name.startswith(("tether-", "pip-"))
            )
            for f in reference.iterdir():
                # Pure wheels (pip among them) serve every target.
                if "x86_64" in arches or f.name.endswith("-none-any.whl"):
                    shutil.copy2(f, dest / f.name)
        if "aarch64" in arches:
            download_arch(own, "aarch64", version, dest, tools)
        if "armv7l" in arches:
            for spec in download_armv7(version, dest, pins):
                notes.append(f"armv7l, Python {version}: {spec} is compiled on the device")

    if not args.no_bundle:
        for name in BUNDLE:
            shutil.copy2(HERE / name, dest / name)
    sums = [
        f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.name}"
        for f in sorted(dest.iterdir())
        if f.is_file() and f.name != "SHA256SUMS"
    ]
    (dest / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    print(f"wheelhouse {dest}: {len(sums)} files for {', '.join(arches)}; Python {versions}")
    for note in notes:
        print("note:", note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
