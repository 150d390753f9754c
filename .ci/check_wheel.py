#!/usr/bin/env python3
"""Checks a built fcsa wheel: size, contents, exported symbols, shared-library needs.

    python .ci/check_wheel.py [--expect-cuda] WHEEL_OR_DIR...

Used by the wheel build (cibuildwheel's repair step) and by the workflows. Needs only
the standard library and binutils (nm, readelf). Exits non-zero on the first wheel
that fails, naming every problem found in it.

The size limit (FCSA_MAX_WHEEL_MB, default 100) is the package index's default limit
for one uploaded file: a bigger wheel cannot be published without asking for a quota,
and every install downloads all of it. Growing past it should be a decision.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

MAX_WHEEL_MB = float(os.environ.get("FCSA_MAX_WHEEL_MB", "100"))

# What libfcsa may load: the C and C++ runtimes and the glibc pieces the static CUDA
# runtime uses. Never libcudart (linked statically), libcuda (opened at run time by the
# CUDA runtime itself) or anything of Python or PyTorch.
ALLOWED_NEEDED = re.compile(
    r"^(libc|libm|libdl|librt|libpthread|libstdc\+\+|libgcc_s|ld-linux[-.\w]*)\.so(\.\d+)*$"
)


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def exported_symbols(lib: Path) -> list[str]:
    names = []
    for line in run("nm", "-D", "--defined-only", str(lib)).splitlines():
        parts = line.split()
        if len(parts) >= 3:
            names.append(parts[2].split("@")[0])
    return names


def needed_libraries(lib: Path) -> list[str]:
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", run("readelf", "-d", str(lib)))


def check(wheel: Path, expect_cuda: bool) -> list[str]:
    problems: list[str] = []
    size_mb = wheel.stat().st_size / 1e6
    print(f"{wheel.name}: {size_mb:.1f} MB (limit {MAX_WHEEL_MB:g} MB)")
    if size_mb > MAX_WHEEL_MB:
        problems.append(f"wheel is {size_mb:.1f} MB, over the {MAX_WHEEL_MB:g} MB limit")

    tags = wheel.name[:-4].split("-")
    if len(tags) < 5 or tags[-2] != "abi3" or not tags[-3].startswith("cp3"):
        problems.append(f"expected a cp3x-abi3 wheel, got tags {'-'.join(tags[-3:])}")

    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        for required in ("fcsa/__init__.py", "fcsa/lib/libfcsa.so", "fcsa/include/fcsa.h"):
            if required not in names:
                problems.append(f"{required} is missing")
        if not any(re.fullmatch(r"fcsa/_lib\.abi3\.so", n) for n in names):
            problems.append("the abi3 extension fcsa/_lib.abi3.so is missing")
        copies = [n for n in names if re.search(r"(^|/)libfcsa[-.\w]*\.so", n) and n != "fcsa/lib/libfcsa.so"]
        if copies:
            problems.append(f"extra copies of libfcsa: {copies}")
        leaked = [n for n in names if n.endswith((".pyx", ".pxd", "CMakeLists.txt"))]
        if leaked:
            problems.append(f"build sources in the wheel: {leaked}")
        if "fcsa/lib/libfcsa.so" not in names:
            return problems

        with tempfile.TemporaryDirectory() as tmp:
            lib = Path(zf.extract("fcsa/lib/libfcsa.so", tmp))
            symbols = exported_symbols(lib)
            # The version script's node name shows up as an absolute symbol.
            foreign = [s for s in symbols if not s.startswith("fcsa_") and not s.startswith("FCSA_")]
            print(f"  libfcsa.so exports {len(symbols)} symbols")
            if foreign:
                problems.append(f"libfcsa.so exports non-fcsa symbols: {foreign[:20]}")
            if "fcsa_forward" not in symbols:
                problems.append("libfcsa.so does not export fcsa_forward")
            needed = needed_libraries(lib)
            print(f"  libfcsa.so needs {', '.join(needed)}")
            bad = [n for n in needed if not ALLOWED_NEEDED.match(n)]
            if bad:
                problems.append(f"libfcsa.so needs libraries outside the C/C++ runtimes: {bad}")
            has_fatbin = ".nv_fatbin" in run("readelf", "-S", "-W", str(lib))
            print(f"  CUDA device code: {'yes' if has_fatbin else 'no'}")
            if expect_cuda and not has_fatbin:
                problems.append("libfcsa.so carries no CUDA device code (.nv_fatbin)")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="wheels, or folders holding them")
    parser.add_argument("--expect-cuda", action="store_true",
                        help="fail unless libfcsa carries CUDA device code")
    args = parser.parse_args()

    wheels = []
    for path in args.paths:
        wheels += sorted(path.glob("fcsa-*.whl")) if path.is_dir() else [path]
    if not wheels:
        print("no fcsa wheel found in", *args.paths, file=sys.stderr)
        return 1
    failed = False
    for wheel in wheels:
        for problem in check(wheel, args.expect_cuda):
            print(f"  FAIL: {problem}", file=sys.stderr)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
