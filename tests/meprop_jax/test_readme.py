"""Every fenced Python block of the README runs as written, each on its own."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.MULTILINE | re.DOTALL)


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index):
    # A fresh namespace per block: a reader copies one block, not the ones above it.
    code = compile(BLOCKS[index], f"README.md, Python block {index + 1}", "exec")
    exec(code, {"__name__": f"readme_block_{index + 1}"})
