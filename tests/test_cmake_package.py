"""libfcsa as other build systems find it: the CMake package (find_package(fcsa), the
imported target fcsa::fcsa) and the pkg-config file (fcsa.pc).

Both are tried where a user finds them: in the installed Python package
(fcsa.get_cmake_dir(), fcsa.get_pkgconfig_dir()) and in an install prefix that plain
CMake makes from the source tree (configure with FCSA_CUDA=OFF, build, `cmake --install
--prefix`). The consumer is the C example's own project, examples/c/CMakeLists.txt: it
is configured, built and run against each; the program checks its results against a
float64 computation and exits non-zero on a mismatch.

Skipped when cmake or a C compiler is missing (the pkg-config tests: when pkg-config
is), and the install-prefix tests when the source tree is not at hand (cibuildwheel
tests the installed wheel with tests/ and examples/ alone).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

import fcsa

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_PROJECT = ROOT / "examples" / "c"
CMAKE = shutil.which("cmake")
NINJA = shutil.which("ninja")
PKG_CONFIG = shutil.which("pkg-config") or shutil.which("pkgconf")
CC = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")

pytestmark = [
    pytest.mark.skipif(CMAKE is None, reason="cmake not found"),
    pytest.mark.skipif(CC is None, reason="no C compiler found"),
]
needs_pkg_config = pytest.mark.skipif(PKG_CONFIG is None, reason="pkg-config not found")


def run(cmd, env=None, cwd=None) -> str:
    """Runs cmd; fails the test with its whole output unless it exits 0."""
    done = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=env, cwd=cwd, timeout=600)
    assert done.returncode == 0, f"{shlex.join(map(str, cmd))}: exit {done.returncode}\n{done.stdout}"
    return done.stdout


def generator() -> list[str]:
    return ["-G", "Ninja"] if NINJA else []


def without_library_path() -> dict:
    """The environment minus LD_LIBRARY_PATH: programs must find libfcsa by their RPATH."""
    return {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}


def run_example(program: Path):
    out = run([program], env=without_library_path())
    assert re.search(rf"^fcsa {re.escape(fcsa.__version__)} ", out, re.M), out
    assert out.rstrip().endswith("all checks passed"), out


def build_example(tmp_path: Path, *cmake_args: str) -> str:
    """Configures and builds examples/c; runs the program; returns the configure log."""
    build = tmp_path / "example-build"
    log = run([CMAKE, "-S", EXAMPLE_PROJECT, "-B", build, *generator(),
               "-DCMAKE_BUILD_TYPE=Release", *cmake_args])
    run([CMAKE, "--build", build])
    run_example(build / "attention")
    return log


@pytest.fixture(scope="session")
def prefix(tmp_path_factory) -> Path:
    """libfcsa (CPU backend) built from the source tree and installed by plain CMake."""
    if not (ROOT / "cuda" / "CMakeLists.txt").is_file():
        pytest.skip("the source tree (cuda/) is not here")
    version = re.search(r"(\d+)\.(\d+)", run([CMAKE, "--version"]))
    if (int(version[1]), int(version[2])) < (3, 24):
        pytest.skip(f"libfcsa needs CMake >= 3.24, found {version[0]}")
    work = tmp_path_factory.mktemp("fcsa-install")
    build, installed = work / "build", work / "prefix"
    run([CMAKE, "-S", ROOT, "-B", build, *generator(), "-DFCSA_CUDA=OFF",
         "-DCMAKE_BUILD_TYPE=Release"])
    run([CMAKE, "--build", build, "--parallel", str(os.cpu_count() or 2)])
    run([CMAKE, "--install", build, "--prefix", installed])
    return installed


def test_the_package_holds_the_cmake_and_pkg_config_files():
    cmake_dir, pc_dir = Path(fcsa.get_cmake_dir()), Path(fcsa.get_pkgconfig_dir())
    for name in ("fcsaConfig.cmake", "fcsaConfigVersion.cmake", "fcsaTargets.cmake"):
        assert (cmake_dir / name).is_file(), f"{name} missing from {cmake_dir}"
    assert (pc_dir / "fcsa.pc").is_file()
    package = Path(fcsa.__file__).resolve().parent
    assert cmake_dir.resolve().is_relative_to(package) and pc_dir.resolve().is_relative_to(package)


def test_find_package_in_the_python_package(tmp_path):
    log = build_example(tmp_path, f"-Dfcsa_DIR={fcsa.get_cmake_dir()}")
    cuda = "ON" if fcsa.cuda_compiled() else "OFF"
    assert re.search(rf"fcsa {re.escape(fcsa.__version__)} from .* \(CUDA: {cuda}\)", log), log


def test_find_package_in_an_install_prefix(prefix, tmp_path):
    assert (prefix / "include" / "fcsa.h").is_file()
    log = build_example(tmp_path, f"-DCMAKE_PREFIX_PATH={prefix}")
    assert re.search(r"\(CUDA: OFF\)", log), log


def compile_with_pkg_config(pc_dir: Path, tmp_path: Path):
    env = dict(os.environ, PKG_CONFIG_PATH=str(pc_dir))
    flags = shlex.split(run([PKG_CONFIG, "--cflags", "--libs", "fcsa"], env=env))
    libdir = run([PKG_CONFIG, "--variable=libdir", "fcsa"], env=env).strip()
    assert (Path(libdir) / "libfcsa.so").is_file(), libdir
    assert run([PKG_CONFIG, "--modversion", "fcsa"], env=env).strip() == fcsa.__version__
    program = tmp_path / "attention"
    run([CC, "-std=c99", "-O2", EXAMPLE_PROJECT / "attention.c", *flags,
         f"-Wl,-rpath,{libdir}", "-lm", "-o", program])
    run_example(program)


@needs_pkg_config
def test_pkg_config_in_the_python_package(tmp_path):
    compile_with_pkg_config(Path(fcsa.get_pkgconfig_dir()), tmp_path)


@needs_pkg_config
def test_pkg_config_in_an_install_prefix(prefix, tmp_path):
    (pc,) = prefix.glob("lib*/**/pkgconfig/fcsa.pc")
    compile_with_pkg_config(pc.parent, tmp_path)
