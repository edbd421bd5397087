"""The one compiled part: the writer thread's histogram loop and the copy a summary write takes on the training
thread (torchslim/_histograms.c; torchslim/event_file.py and torchslim/summary_records.py say why). Optional:
where no C compiler is found the install still succeeds, and numpy and torch.cat do the same work.
Everything else is in pyproject.toml."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("torchslim._histograms", ["torchslim/_histograms.c"], optional=True)])
