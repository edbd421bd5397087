"""The README's Python code blocks run, in order, as one program: the README cannot drift from the code."""
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks(path):
    with open(path, encoding="utf-8") as f:
        return BLOCK.findall(f.read())


def test_readme_has_the_two_commands_first():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        head = f.read()[:1500]
    assert "bash scripts/demo.sh" in head and "bash scripts/test.sh" in head


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = _blocks(os.path.join(REPO, "README.md"))
    assert len(blocks) >= 5
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    for i, source in enumerate(blocks):
        try:
            exec(compile(source, f"README.md block {i + 1}", "exec"), namespace)
        except Exception as e:  # name the block that broke
            pytest.fail(f"README.md python block {i + 1} failed: {type(e).__name__}: {e}\n---\n{source}")
