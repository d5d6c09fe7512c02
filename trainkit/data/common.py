"""Dataset wrappers and the ``get(index, generator)`` protocol for reproducible augmentation.

A dataset that augments randomly may implement, next to ``__getitem__``, a method
``get(index, generator)`` that draws all its randomness from the given ``torch.Generator``. The training
loader calls it with a generator seeded from ``(seed, global position)`` (see :class:`PositionSeededDataset`),
so the augmentation of every sample is a pure function of the seed and the sample's place in the stream:
independent of the number of workers, of the process's RNG state, and of whether the run was resumed.
"""
import bisect
import logging
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from .samplers import AUGMENT_TAG, derive_seed

__all__ = ["get_item", "DatasetFromTensors", "ConcatDataset", "PositionSeededDataset"]

logger = logging.getLogger(__name__)


def get_item(dataset: Dataset, index: int, generator: Optional[torch.Generator]) -> Any:
    """``dataset.get(index, generator)`` if the dataset implements it, else ``dataset[index]``."""
    get = getattr(dataset, "get", None)
    if get is not None and generator is not None:
        return get(index, generator)
    return dataset[index]


class DatasetFromTensors(Dataset):
    """A map-style dataset over equal-length tensors; item ``i`` is ``{name: tensor[i]}``.

    Example: ``DatasetFromTensors(image=images, label=labels)``.
    """

    def __init__(self, **tensors: torch.Tensor) -> None:
        if not tensors:
            raise ValueError("DatasetFromTensors needs at least one named tensor, e.g. image=..., label=....")
        lengths = {name: len(t) for name, t in tensors.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"DatasetFromTensors: all tensors need the same length, got {lengths}.")
        self._tensors = tensors
        self._len = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        return {name: t[index] for name, t in self._tensors.items()}


class ConcatDataset(torch.utils.data.ConcatDataset):
    """``torch.utils.data.ConcatDataset`` that forwards ``get(index, generator)`` to its parts."""

    def _locate(self, index: int) -> Tuple[int, int]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a ConcatDataset of length {len(self)}")
        part = bisect.bisect_right(self.cumulative_sizes, index)
        offset = self.cumulative_sizes[part - 1] if part > 0 else 0
        return part, index - offset

    def get(self, index: int, generator: torch.Generator) -> Any:
        """Item ``index`` with its part's randomness drawn from ``generator``."""
        part, local = self._locate(index)
        return get_item(self.datasets[part], local, generator)


class PositionSeededDataset(Dataset):
    """Wraps a dataset for the training loader: keys are ``(global_position, index)`` pairs.

    For each key it seeds a fresh ``torch.Generator`` with ``derive_seed(seed, AUGMENT_TAG, position)`` and
    returns ``get_item(dataset, index, generator)``. The global RNGs (torch, numpy, random) are not touched,
    so dropout and other training randomness are undisturbed by data loading. Datasets without ``get`` are
    indexed directly and no generator is made.

    Args:
        dataset: the map-style dataset to wrap.
        seed: the base seed of the training stream.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = int(seed)
        self._has_get = hasattr(dataset, "get")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Sequence[int]) -> Any:
        position, index = key
        if not self._has_get:
            return self.dataset[index]
        generator = torch.Generator()
        generator.manual_seed(derive_seed(self.seed, AUGMENT_TAG, position))
        return self.dataset.get(index, generator)
