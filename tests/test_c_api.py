"""libfcsa as a C or C++ program sees it: the header and the library of the INSTALLED
package (fcsa.get_include(), fcsa.get_library()), never the source tree's.

Compiles examples/c/attention.c with `cc -std=c99` and runs it (it checks its own
results against a float64 computation and exits non-zero on a mismatch), checks that
fcsa.h compiles alone as C99 and as C++, and that libfcsa.so exports fcsa_* and nothing
else. Skipped only when there is no C compiler.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "c" / "attention.c"


def _tool(env_var: str, *names: str) -> list[str] | None:
    if os.environ.get(env_var):
        return shlex.split(os.environ[env_var])
    for name in names:
        path = shutil.which(name)
        if path:
            return [path]
    return None


CC = _tool("CC", "cc", "gcc", "clang")
CXX = _tool("CXX", "c++", "g++", "clang++")
STRICT = ["-Wall", "-Wextra", "-pedantic", "-Werror"]

pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler (cc, gcc or clang) found")


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, (
        f"{shlex.join(cmd)} exited {result.returncode}\n"
        f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    )
    return result


def _binutil(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} (binutils) not found")
    return path


@pytest.fixture(scope="module")
def installed() -> dict:
    import fcsa

    package_dir = Path(fcsa.__file__).resolve().parent
    if hasattr(fcsa, "get_include"):
        include = Path(fcsa.get_include())
    else:  # the layout the wheel installs
        include = package_dir / "include"
    if hasattr(fcsa, "get_library"):
        library = Path(fcsa.get_library())
        if library.is_dir():
            library = library / "libfcsa.so"
    else:
        library = package_dir / "lib" / "libfcsa.so"
    assert (include / "fcsa.h").is_file(), f"no fcsa.h in {include}"
    assert library.is_file(), f"no libfcsa.so at {library}"
    return {"module": fcsa, "include": include, "library": library, "header": include / "fcsa.h"}


def _declared_functions(header: Path) -> set[str]:
    text = header.read_text()
    return set(re.findall(r"FCSA_API\b[^;(]*?\b(fcsa_\w+)\s*\(", text))


def _link_flags(library: Path) -> list[str]:
    # Link the installed file itself and record its folder as the run-time search path,
    # so the program runs without LD_LIBRARY_PATH.
    return [str(library), f"-Wl,-rpath,{library.parent}"]


def test_installed_paths_come_from_the_package(installed):
    fcsa = installed["module"]
    assert hasattr(fcsa, "get_include") and hasattr(fcsa, "get_library"), (
        "fcsa.get_include() and fcsa.get_library() are the documented way to find the C API"
    )
    assert installed["include"].is_relative_to(Path(fcsa.__file__).resolve().parent)
    assert installed["library"].name == "libfcsa.so"


def test_header_compiles_alone_as_c99(installed):
    _run([*CC, "-std=c99", "-fsyntax-only", *STRICT, "-x", "c", str(installed["header"])])


@pytest.mark.skipif(CXX is None, reason="no C++ compiler found")
def test_header_compiles_alone_as_cpp(installed):
    _run([*CXX, "-std=c++11", "-fsyntax-only", *STRICT, "-x", "c++", str(installed["header"])])


@pytest.mark.skipif(CXX is None, reason="no C++ compiler found")
def test_cpp_program_links_with_c_linkage(installed, tmp_path):
    # Names declared in a C++ translation unit must resolve to the library's C symbols.
    source = tmp_path / "hello.cpp"
    source.write_text(
        "#include <fcsa.h>\n#include <cstdio>\n#include <cstring>\n"
        "int main() {\n"
        "  std::printf(\"%s\\n\", fcsa_version());\n"
        "  return std::strcmp(fcsa_status_string(FCSA_STATUS_INVALID_DTYPE),\n"
        "                     \"FCSA_STATUS_INVALID_DTYPE\") != 0;\n"
        "}\n"
    )
    exe = tmp_path / "hello"
    _run([*CXX, "-std=c++11", *STRICT, f"-I{installed['include']}", str(source), "-o", str(exe),
          *_link_flags(installed["library"])])
    out = _run([str(exe)]).stdout.strip()
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", out), out


def test_c_example_builds_and_matches_float64(installed, tmp_path):
    exe = tmp_path / "attention"
    _run([*CC, "-std=c99", "-O2", *STRICT, f"-I{installed['include']}", str(EXAMPLE), "-o", str(exe),
          *_link_flags(installed["library"]), "-lm"])
    out = _run([str(exe)], env={k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}).stdout
    print(out)

    header = installed["header"].read_text()
    major, minor, patch = (
        re.search(rf"#define FCSA_VERSION_{part}\s+(\d+)", header).group(1)
        for part in ("MAJOR", "MINOR", "PATCH")
    )
    assert re.search(rf"^fcsa {major}\.{minor}\.{patch}\b", out, re.M), out
    for name in ("out", "dq", "dk", "dv"):
        assert re.search(rf"^{name}\s+max error vs float64: \S+ \(tolerance \S+\) ok$", out, re.M), out
    # The refused call names its status and carries a message.
    m = re.search(r"^mismatched shape: FCSA_STATUS_INVALID_ARGUMENT: (.+)$", out, re.M)
    assert m and m.group(1).strip(), out
    assert out.rstrip().endswith("all checks passed")


def test_library_exports_only_fcsa_symbols(installed):
    nm = _binutil("nm")
    lines = _run([nm, "-D", "--defined-only", str(installed["library"])]).stdout.splitlines()
    symbols = {line.split()[2].split("@")[0] for line in lines if len(line.split()) >= 3}
    # The version script's node (FCSA_1) shows up as an absolute symbol; nothing else may.
    foreign = sorted(s for s in symbols if not s.startswith("fcsa_") and not re.fullmatch(r"FCSA_\d+", s))
    assert not foreign, f"libfcsa.so exports symbols outside its API: {foreign[:30]}"
    assert not [s for s in symbols if s.startswith(("_Z", "cuda", "__cuda", "__gxx", "_ZSt"))]

    declared = _declared_functions(installed["header"])
    assert {"fcsa_forward", "fcsa_backward", "fcsa_version"} <= declared
    missing = sorted(declared - symbols)
    assert not missing, f"declared in fcsa.h but not exported: {missing}"


def test_library_needs_only_the_c_and_cpp_runtimes(installed):
    readelf = _binutil("readelf")
    dynamic = _run([readelf, "-d", str(installed["library"])]).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic)
    allowed = re.compile(r"^(libc|libm|libdl|librt|libpthread|libstdc\+\+|libgcc_s|ld-linux[-.\w]*)\.so(\.\d+)*$")
    assert needed and all(allowed.match(n) for n in needed), needed
    # The CUDA runtime is linked statically: no cuda* symbol is left for the loader.
    nm = _binutil("nm")
    undefined = _run([nm, "-D", "--undefined-only", str(installed["library"])]).stdout
    assert not re.search(r"\bcuda\w*", undefined), undefined
