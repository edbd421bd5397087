"""The 8x8 hand-written digits shipped with torchslim: a real data set that needs no download.

    import torchslim as slim

    images, labels = slim.data.digits.load_digits('train')   # 1437 x 1 x 8 x 8 float32 in [0, 1], int64
    test_images, test_labels = slim.data.digits.load_digits('test')   # the 360 held-out digits
    dataset = slim.data.digits.DigitsDataset('train')          # the same as a torch Dataset

The data is the test set of the UCI ML hand-written digits data set
(E. Alpaydin and C. Kaynak, 1998; CC BY 4.0), as scikit-learn ships it:
1,797 images of 8x8 pixels whose values 0..16 count the set pixels of a
4x4 block of a 32x32 bitmap, with their labels 0..9. It is stored in
``torchslim/data/digits/digits.csv.gz`` (one row per image: 64 pixel
values, row by row, then the label); see the README beside it for the
credit.

The split into train and test parts is fixed: a permutation of the 1,797
row numbers drawn by ``numpy.random.RandomState(SPLIT_SEED)`` (numpy
guarantees that this legacy generator draws the same numbers in every
version), whose first ``TEST_SIZE`` = 360 rows are the held-out test part,
the remaining 1,437 the train part; each part is then sorted by row number.
So every install, platform and run trains and evaluates on exactly the same
digits.
"""
from __future__ import annotations

import functools
import gzip
import importlib.resources
import io

import numpy as np
import torch

__all__ = [
    "IMAGE_SHAPE",
    "NUM_CLASSES",
    "NUM_EXAMPLES",
    "SPLITS",
    "SPLIT_SEED",
    "TEST_SIZE",
    "TRAIN_SIZE",
    "DigitsDataset",
    "load_digits",
    "split_indices",
]

NUM_EXAMPLES = 1797
NUM_CLASSES = 10
TEST_SIZE = 360
TRAIN_SIZE = NUM_EXAMPLES - TEST_SIZE
SPLIT_SEED = 0
IMAGE_SHAPE = (1, 8, 8)
SPLITS = ("train", "test", "all")
_MAX_PIXEL = 16.0
_FILE = "digits.csv.gz"


def _check_split(split: object) -> str:
    if not isinstance(split, str) or split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


@functools.lru_cache(maxsize=1)
def _read_all() -> tuple[np.ndarray, np.ndarray]:
    """Every row of the shipped file as (uint8 pixels N x 64, int64 labels N); read once per process."""
    resource = importlib.resources.files(__package__).joinpath("digits").joinpath(_FILE)
    with resource.open("rb") as raw, gzip.open(raw, "rt") as text:
        table = np.loadtxt(io.StringIO(text.read()), delimiter=",", dtype=np.int64)
    if table.shape != (NUM_EXAMPLES, 65):
        raise RuntimeError(
            f"the shipped digits file {_FILE} has shape {table.shape}, expected ({NUM_EXAMPLES}, 65); "
            "the installation is damaged, reinstall torchslim"
        )
    pixels, labels = table[:, :64], table[:, 64]
    if pixels.min() < 0 or pixels.max() > _MAX_PIXEL or labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise RuntimeError(f"the shipped digits file {_FILE} holds values out of range; reinstall torchslim")
    pixels, labels = pixels.astype(np.uint8), labels.copy()
    pixels.flags.writeable = False  # cached and shared: load_digits hands out copies
    labels.flags.writeable = False
    return pixels, labels


def split_indices(split: str) -> np.ndarray:
    """Row numbers (sorted, into the shipped file) of the ``'train'``, ``'test'`` or ``'all'`` part.

    Example:
        >>> len(split_indices('train')), len(split_indices('test')), len(split_indices('all'))
        (1437, 360, 1797)
        >>> bool(np.intersect1d(split_indices('train'), split_indices('test')).size == 0)
        True
    """
    split = _check_split(split)
    if split == "all":
        return np.arange(NUM_EXAMPLES)
    order = np.random.RandomState(SPLIT_SEED).permutation(NUM_EXAMPLES)
    part = order[:TEST_SIZE] if split == "test" else order[TEST_SIZE:]
    return np.sort(part)


def load_digits(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """The ``split`` part of the shipped digits: ``(images, labels)``.

    ``images`` is float32 of shape ``[N, 1, 8, 8]`` (NCHW) with the pixel
    counts 0..16 scaled to [0, 1]; ``labels`` is int64 of shape ``[N]`` with
    values 0..9. ``split`` is ``'train'`` (1,437 digits), ``'test'`` (the 360
    held-out digits) or ``'all'`` (1,797, in file order). Each call returns
    new tensors, which the caller may modify.

    Example:
        >>> images, labels = load_digits('test')
        >>> tuple(images.shape), images.dtype, labels.dtype
        ((360, 1, 8, 8), torch.float32, torch.int64)
        >>> float(images.min()), float(images.max())
        (0.0, 1.0)
    """
    index = split_indices(split)
    pixels, labels = _read_all()
    images = torch.from_numpy(pixels[index].astype(np.float32) / _MAX_PIXEL).reshape(-1, *IMAGE_SHAPE)
    return images, torch.from_numpy(labels[index].copy())


class DigitsDataset(torch.utils.data.TensorDataset):
    """A ``torch.utils.data.Dataset`` of ``(image [1, 8, 8], label)`` pairs of one split.

    Example:
        >>> ds = DigitsDataset('test')
        >>> len(ds), tuple(ds[0][0].shape)
        (360, (1, 8, 8))
    """

    def __init__(self, split: str = "train") -> None:
        self.split = _check_split(split)
        images, labels = load_digits(split)
        super().__init__(images, labels)
