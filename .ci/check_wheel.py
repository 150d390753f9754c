#!/usr/bin/env python3
"""Checks a built fcsa wheel: size, contents, exported symbols, shared-library needs,
and the GPU architectures its device code is compiled for.

    python .ci/check_wheel.py [--expect-cuda] [--expect-sm 80,86,...] WHEEL_OR_DIR...
    python .ci/check_wheel.py [--expect-cuda] [--expect-sm 80,86,...] path/to/libfcsa.so

Used by the wheel build (cibuildwheel's repair step) and by the workflows. Needs only
the standard library and binutils (nm, readelf, objcopy). Exits non-zero if any wheel
fails, naming every problem found in it.

The size limit (FCSA_MAX_WHEEL_MB, default 70) keeps the wheel well under the package
index's default limit for one uploaded file (100 MB); every install downloads it, so
growing past it should be a decision. The history: 50 MB until 2026-12-02, when the
packed-sequence kernels (every sm80 kernel also instantiated for varlen) took the
seven-target wheel to 86.9 MB (measured). The decision then: no separate sm_86 and sm_89
SASS (sm_80's runs on them; 22.5 MB of duplicates), 64.3 MB for the five targets
(measured), and this limit. The way back under 50 MB is less device code: the varlen case
as a run-time branch of one kernel instead of a second instantiation. Release builds
leave -lineinfo out: it was 49 of sm_90a's 70 MB of device code.
"""

from __future__ import annotations

import argparse
import os
import re
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

MAX_WHEEL_MB = float(os.environ.get("FCSA_MAX_WHEEL_MB", "70"))

# Files the wheel must hold besides the Python package: the C library, its header, and
# the CMake package and pkg-config file that let C, C++ and Rust builds find them.
REQUIRED = (
    "fcsa/__init__.py",
    "fcsa/lib/libfcsa.so",
    "fcsa/include/fcsa.h",
    "fcsa/lib/cmake/fcsa/fcsaConfig.cmake",
    "fcsa/lib/cmake/fcsa/fcsaConfigVersion.cmake",
    "fcsa/lib/cmake/fcsa/fcsaTargets.cmake",
    "fcsa/lib/pkgconfig/fcsa.pc",
)

FATBIN_MAGIC = 0xBA55ED50
FATBIN_SASS, FATBIN_PTX = 2, 1

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


def fatbin_architectures(section: bytes) -> tuple[set[int], set[int]]:
    """(SASS architectures, PTX architectures) in a .nv_fatbin section, e.g. {80, 90}.

    The section is a sequence of fat binaries, one per translation unit: a 16-byte
    header (magic, version, header size, size of the entries) followed by entries, each
    with its own header (kind: 2 for SASS, 1 for PTX; header size; payload size; the
    architecture as a number at byte 28) and its payload, compressed or not."""
    sass: set[int] = set()
    ptx: set[int] = set()
    offset = 0
    while offset + 16 <= len(section):
        magic, _version, header_size, size = struct.unpack_from("<IHHQ", section, offset)
        if magic != FATBIN_MAGIC:
            offset += 8  # fat binaries are 8-byte aligned; skip padding
            continue
        entry, end = offset + header_size, offset + header_size + size
        while entry + 32 <= end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", section, entry)
            (arch,) = struct.unpack_from("<I", section, entry + 28)
            if kind == FATBIN_SASS:
                sass.add(arch)
            elif kind == FATBIN_PTX:
                ptx.add(arch)
            if entry_header == 0:
                break
            entry += entry_header + payload
        offset = end
    return sass, ptx


def section_bytes(lib: Path, name: str, tmp: str) -> bytes | None:
    """The contents of one ELF section, or None when the file has no such section."""
    if name not in run("readelf", "-S", "-W", str(lib)):
        return None
    out = Path(tmp) / "section.bin"
    run("objcopy", "-O", "binary", f"--only-section={name}", str(lib), str(out))
    return out.read_bytes()


def check_library(lib: Path, expect_cuda: bool, expect_sm: list[int]) -> list[str]:
    """Exports, shared-library needs and device code of one libfcsa.so."""
    problems: list[str] = []
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
    with tempfile.TemporaryDirectory() as tmp:
        fatbin = section_bytes(lib, ".nv_fatbin", tmp)
    if fatbin is None:
        print("  CUDA device code: none")
        if expect_cuda or expect_sm:
            problems.append("libfcsa.so carries no CUDA device code (.nv_fatbin)")
        return problems
    sass, ptx = fatbin_architectures(fatbin)
    print(f"  CUDA device code: {len(fatbin) / 1e6:.1f} MB; SASS for "
          f"{', '.join(f'sm_{a}' for a in sorted(sass)) or 'nothing'}; PTX for "
          f"{', '.join(f'compute_{a}' for a in sorted(ptx)) or 'nothing'}")
    missing = [a for a in expect_sm if a not in sass]
    if missing:
        problems.append(f"no SASS for {', '.join(f'sm_{a}' for a in missing)} "
                        f"in libfcsa.so (found {sorted(sass)})")
    return problems


def check_wheel(wheel: Path, expect_cuda: bool, expect_sm: list[int]) -> list[str]:
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
        for required in REQUIRED:
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
        if "fcsa/lib/libfcsa.so" in names:
            with tempfile.TemporaryDirectory() as tmp:
                lib = Path(zf.extract("fcsa/lib/libfcsa.so", tmp))
                problems += check_library(lib, expect_cuda, expect_sm)
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path,
                        help="wheels, folders holding them, or a libfcsa.so to check alone")
    parser.add_argument("--expect-cuda", action="store_true",
                        help="fail unless libfcsa carries CUDA device code")
    parser.add_argument("--expect-sm", default="", metavar="LIST",
                        help="fail unless libfcsa has SASS for each of these architectures, "
                             "given as numbers or as a CUDA architecture list "
                             "('80,90' or '80-real;90a-real;120-virtual': the real ones)")
    args = parser.parse_args()
    expect_sm = set()
    for item in re.split(r"[;, ]+", args.expect_sm.strip()):
        if item and not item.endswith("-virtual"):
            number = re.match(r"(?:sm_)?(\d+)", item)
            if number is None:
                parser.error(f"--expect-sm: {item!r} is not an architecture")
            expect_sm.add(int(number.group(1)))
    expect_sm = sorted(expect_sm)

    files = []
    for path in args.paths:
        files += sorted(path.glob("fcsa-*.whl")) if path.is_dir() else [path]
    if not files:
        print("no fcsa wheel found in", *args.paths, file=sys.stderr)
        return 1
    failed = False
    for path in files:
        if path.suffix == ".whl":
            problems = check_wheel(path, args.expect_cuda, expect_sm)
        else:
            print(f"{path}:")
            problems = check_library(path, args.expect_cuda, expect_sm)
        for problem in problems:
            print(f"  FAIL: {problem}", file=sys.stderr)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
