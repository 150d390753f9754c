"""`import fcsa` is quiet: without numpy, torch's import warns "Failed to initialize
NumPy", which says nothing about fcsa (it never converts to or from numpy arrays)."""

import subprocess
import sys


def test_import_without_numpy_shows_no_numpy_warning(tmp_path):
    # numpy made unimportable, as on a machine without it.
    code = "import sys; sys.modules['numpy'] = None; import fcsa; print(fcsa.__version__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "NumPy" not in done.stderr, done.stderr
    assert done.stdout.strip()
