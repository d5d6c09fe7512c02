"""Built-in data sets, registered in the catalogs when ``trainkit.data`` is imported.

``digits_train`` / ``digits_test``
    scikit-learn's bundled handwritten digits (``sklearn.datasets.load_digits``: 1,797 8x8 images, no
    download). Fixed, stratified split: within each class, the samples are shuffled by a torch.Generator
    seeded with 0 and the first 20% (rounded) go to ``digits_test``, the rest to ``digits_train``, each kept
    in file order; 1,438 train and 359 test samples (see :func:`digits_split_indices`). The split is the
    same on every machine and every torch version that keeps ``torch.randperm``'s CPU stream.
``synthetic_train`` / ``synthetic_test``
    10 Gaussian clusters in 64 dimensions (5,000 / 1,000 samples), from
    :func:`make_synthetic_classification` with seed 0. Shared centres, independent samples. For tests and
    benchmarks; needs nothing beyond torch.

Items are ``{"image": float32 tensor of shape (1, 8, 8), "label": int64 scalar tensor}``; digits pixels are
scaled to [0, 1]. All four have metadata ``evaluator_type="classification"``, ``num_classes=10`` and
``thing_classes`` (the class names).
"""
import functools
import logging
import math
from typing import Tuple

import torch

from .catalog import DatasetCatalog, MetadataCatalog
from .common import DatasetFromTensors
from .samplers import derive_seed

__all__ = [
    "load_digits",
    "digits_split_indices",
    "make_synthetic_classification",
    "DIGITS_TEST_FRACTION",
    "register_builtin_datasets",
]

logger = logging.getLogger(__name__)

DIGITS_TEST_FRACTION = 0.2
SYNTHETIC_SIZES = {"train": 5000, "test": 1000}


@functools.lru_cache(maxsize=1)
def _digits_tensors() -> Tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as e:
        raise ImportError(
            "The digits data sets need scikit-learn. Install it with `pip install trainkit[examples]` "
            "(or `pip install scikit-learn`)."
        ) from e
    raw = _sk_load_digits()
    images = torch.as_tensor(raw.images, dtype=torch.float32).div_(16.0).unsqueeze(1).contiguous()
    labels = torch.as_tensor(raw.target, dtype=torch.int64)
    return images, labels


def digits_split_indices(labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The (train, test) sample indices of the fixed stratified digits split, each sorted."""
    g = torch.Generator().manual_seed(0)
    train, test = [], []
    for c in range(int(labels.max()) + 1):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = int(round(len(idx) * DIGITS_TEST_FRACTION))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def load_digits(split: str) -> DatasetFromTensors:
    """The digits data set's ``"train"`` or ``"test"`` split (see the module docstring)."""
    images, labels = _digits_tensors()
    if split not in ("train", "test"):
        raise ValueError(f"load_digits(split={split!r}): split must be 'train' or 'test'.")
    train, test = digits_split_indices(labels)
    part = train if split == "train" else test
    return DatasetFromTensors(image=images[part], label=labels[part])


def make_synthetic_classification(
    num_samples: int,
    num_classes: int = 10,
    image_shape: Tuple[int, ...] = (1, 8, 8),
    noise: float = 3.0,
    seed: int = 0,
    split: int = 0,
) -> DatasetFromTensors:
    """Gaussian clusters: class ``c`` is ``centre_c + noise * N(0, I)``, with ``centre_c ~ N(0, I)``.

    Labels cycle ``0, 1, ..., num_classes - 1, 0, ...`` so classes are balanced. The centres depend only on
    ``seed``; the samples on ``(seed, split)``, so different splits of the same seed share their clusters.

    Args:
        num_samples: number of samples.
        num_classes: number of clusters / classes.
        image_shape: shape of each item's ``"image"`` (its number of elements is the feature dimension).
        noise: standard deviation of the samples around their centre.
        seed: seed of the centres.
        split: seed offset of the samples (e.g. 0 for train, 1 for test).
    """
    if num_samples <= 0 or num_classes <= 0:
        raise ValueError(
            f"make_synthetic_classification(num_samples={num_samples}, num_classes={num_classes}): both must be > 0."
        )
    dim = math.prod(image_shape)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(derive_seed(seed, 0)))
    g = torch.Generator().manual_seed(derive_seed(seed, 1, split))
    labels = torch.arange(num_samples, dtype=torch.int64) % num_classes
    features = centres[labels] + noise * torch.randn(num_samples, dim, generator=g)
    return DatasetFromTensors(image=features.view(num_samples, *image_shape), label=labels)


def _load_synthetic(split: str) -> DatasetFromTensors:
    return make_synthetic_classification(SYNTHETIC_SIZES[split], split=0 if split == "train" else 1)


def register_builtin_datasets() -> None:
    """Registers the built-in data sets and their metadata (called once, on import of ``trainkit.data``)."""
    for split in ("train", "test"):
        DatasetCatalog.register(f"digits_{split}", functools.partial(load_digits, split))
        DatasetCatalog.register(f"synthetic_{split}", functools.partial(_load_synthetic, split))
        for name in (f"digits_{split}", f"synthetic_{split}"):
            MetadataCatalog.get(name).set(
                evaluator_type="classification", num_classes=10, thing_classes=[str(i) for i in range(10)]
            )
