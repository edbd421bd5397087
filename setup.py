"""The one compiled part: the writer thread's histogram loop (torchslim/_histograms.c; torchslim/event_file.py
says why). Optional: where no C compiler is found the install still succeeds, and numpy does the same work.
Everything else is in pyproject.toml."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("torchslim._histograms", ["torchslim/_histograms.c"], optional=True)])
