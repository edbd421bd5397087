"""Every torchslim module's docstring examples run (the examples cannot drift from the code)."""
import doctest
import importlib
import pkgutil
import tempfile

import pytest

import torchslim

MODULES = sorted(
    name for _, name, _ in pkgutil.walk_packages(torchslim.__path__, prefix="torchslim.")
    if name != "torchslim.__main__"   # runs the command line when imported
)


def test_every_module_is_collected():
    assert {"torchslim", "torchslim.learning", "torchslim.progress", "torchslim.data.digits"} <= {
        "torchslim", *MODULES}


@pytest.mark.parametrize("module_name", ["torchslim", *MODULES])
def test_doctests(module_name, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))   # the examples' mkdtemp() lands in tmp_path
    module = importlib.import_module(module_name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    report = []
    tests = doctest.DocTestFinder().find(module, module_name)
    for test in sorted(tests, key=lambda t: t.name):
        torchslim.collections.reset()                           # each example starts as a new program
        runner.run(test, out=report.append)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, "".join(report)
