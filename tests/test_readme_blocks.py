"""The README's Python blocks work when pasted: each is valid Python, and all of them run,
in order and in one namespace as a reader's session would, on the CPU (with their
sequence lengths scaled down, so that they take seconds).

Skipped when the README is not at hand."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
pytestmark = pytest.mark.skipif(not README.is_file(), reason="README.md is not here")

# The sequence lengths the README uses, and what the test runs instead.
SHORTER = {"2048": "160", "1024": "96", "512": "64"}


def python_blocks() -> list:
    return re.findall(r"^```python\n(.*?)^```$", README.read_text(), re.M | re.S)


def test_every_python_block_is_valid_python():
    blocks = python_blocks()
    assert len(blocks) >= 10
    for number, block in enumerate(blocks, 1):
        compile(block, f"README.md, Python block {number}", "exec")


def test_the_python_blocks_run_in_order():
    namespace = {}
    for number, block in enumerate(python_blocks(), 1):
        code = re.sub(r"\b(2048|1024|512)\b", lambda m: SHORTER[m[1]], block)
        code = code.replace('"cuda" if torch.cuda.is_available() else "cpu"', '"cpu"')
        exec(compile(code, f"README.md, Python block {number}", "exec"), namespace)
    assert namespace["out"].shape == namespace["q"].shape
