"""Config -> data loaders.

``build_train_loader`` returns an infinite ``torch.utils.data.DataLoader`` whose order and augmentation are a
pure function of ``(seed, global position)``; ``set_train_loader_start`` makes it continue from any iteration.
``build_test_loader`` returns a finite loader that visits each sample once across all processes.
"""
import functools
import logging
import random
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset

from ..utils import comm
from .augment import RandomShift
from .catalog import DatasetCatalog
from .common import ConcatDataset, PositionSeededDataset
from .samplers import WORKER_TAG, InferenceSampler, TrainingBatchSampler, TrainingSampler, derive_seed

__all__ = [
    "build_train_loader",
    "build_test_loader",
    "set_train_loader_start",
    "get_train_loader_seed",
    "collate",
    "trivial_batch_collator",
    "worker_init_fn",
]

logger = logging.getLogger(__name__)

DEFAULT_TEST_BATCH_SIZE = 128


def trivial_batch_collator(batch: List[Any]) -> List[Any]:
    """Returns the batch as the list of items (for models that take a list, as in detectron2)."""
    return batch


def collate(batch: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """Stacks a list of dict items into one dict.

    Per key: tensors are stacked (``torch.stack``); numpy arrays are stacked into a tensor; Python numbers become
    a 1-d tensor (int -> int64, float -> float32, bool -> bool), numpy numbers one of their own dtype (like numpy
    arrays: ``np.float64`` gives float64); anything else (strings, ...) becomes a list.

    Raises:
        TypeError: an item is not a dict.
        KeyError: an item lacks a key that the first item has.
    """
    if len(batch) == 0:
        raise ValueError("collate got an empty batch.")
    first = batch[0]
    if not isinstance(first, Mapping):
        raise TypeError(
            f"collate expects dict items, got {type(first).__name__}. Return dicts from your dataset, or pass "
            "collate_fn=trivial_batch_collator to get the items as a list."
        )
    out = {}
    for key in first:
        try:
            values = [item[key] for item in batch]
        except KeyError:
            missing = next(i for i, item in enumerate(batch) if key not in item)
            raise KeyError(f"collate: item {missing} of the batch has no key {key!r} (item 0 has it).") from None
        out[key] = _collate_values(values)
    return out


def _collate_values(values: List[Any]) -> Any:
    first = values[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(values)
    if isinstance(first, np.ndarray):
        return torch.from_numpy(np.stack(values))
    if isinstance(first, (bool, int, float, np.number, np.bool_)):
        return torch.tensor(values)
    return list(values)


def worker_init_fn(seed: int, rank: int, worker_id: int) -> None:
    """Seeds torch, numpy and ``random`` in a data-loading worker from ``(seed, rank, worker_id)``.

    Bind the first two arguments with ``functools.partial``. The built-in augmentation does not use these
    global RNGs (it is seeded per sample); this makes other code that does use them deterministic too.
    """
    worker_seed = derive_seed(seed, WORKER_TAG, rank, worker_id)
    torch.manual_seed(worker_seed)
    np.random.seed(worker_seed % 2**32)
    random.seed(worker_seed)


def _names(value: Union[str, Sequence[str]], key: str) -> List[str]:
    names = [value] if isinstance(value, str) else list(value)
    if not names:
        raise ValueError(f"{key} is empty; set it to the names of registered data sets, e.g. ('digits_train',).")
    return names


def _get_dataset(names: List[str]) -> Dataset:
    datasets = [DatasetCatalog.get(name) for name in names]
    for name, dataset in zip(names, datasets):
        if len(dataset) == 0:
            raise ValueError(f"Dataset {name!r} is empty.")
    return datasets[0] if len(datasets) == 1 else ConcatDataset(datasets)


def _data_loader(
    dataset: Dataset, batch_sampler, num_workers: int, seed: int, collate_fn: Callable, pin_memory: bool, **kwargs
) -> DataLoader:
    if num_workers < 0:
        raise ValueError(f"DATALOADER.NUM_WORKERS is {num_workers}; it must be >= 0 (0 loads in the main process).")
    rank = comm.get_rank()
    # The loader draws its workers' base seed from `generator` on every iter(); a private generator keeps
    # that draw off torch's global RNG, so training randomness (dropout, ...) is unaffected by data loading.
    generator = torch.Generator()
    generator.manual_seed(derive_seed(seed, WORKER_TAG, rank))
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        worker_init_fn=functools.partial(worker_init_fn, seed, rank) if num_workers > 0 else None,
        generator=generator,
        **kwargs,
    )


def _pin_memory(cfg) -> bool:
    return str(cfg.MODEL.DEVICE).startswith("cuda") and torch.cuda.is_available()


def _check_train_loader_cfg(cfg, world_size: int) -> None:
    if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
        raise ValueError(
            f"DATALOADER.SAMPLER_TRAIN is {cfg.DATALOADER.SAMPLER_TRAIN!r}; only 'TrainingSampler' is built in. "
            "Override DefaultTrainer.build_train_loader for a custom sampler."
        )
    total_batch = cfg.SOLVER.IMS_PER_BATCH
    if total_batch <= 0 or total_batch % world_size != 0:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH ({total_batch}) is the total batch size over all processes and must be a "
            f"positive multiple of the number of processes ({world_size}). Set it to a multiple of {world_size}."
        )
    accum = _grad_accum_steps(cfg)
    if total_batch % (world_size * accum) != 0:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH ({total_batch}) does not divide into SOLVER.GRAD_ACCUM_STEPS ({accum}) "
            f"micro-batches on each of the {world_size} process(es): it is the batch of one optimizer step, and "
            f"each process loads IMS_PER_BATCH / (processes * GRAD_ACCUM_STEPS) samples at a time. Set "
            f"SOLVER.IMS_PER_BATCH to a multiple of {world_size * accum}, or SOLVER.GRAD_ACCUM_STEPS to a divisor "
            f"of {total_batch // world_size}."
        )


def _grad_accum_steps(cfg) -> int:
    # A config made from other defaults than trainkit's (a user's own) may lack the key: no accumulation.
    return cfg.SOLVER.get("GRAD_ACCUM_STEPS", 1)


def build_train_loader(
    cfg, *, dataset: Optional[Dataset] = None, collate_fn: Optional[Callable] = None
) -> DataLoader:
    """The infinite training loader of ``cfg``.

    - Data: the data sets named in ``DATASETS.TRAIN`` (concatenated in order), or ``dataset`` if given.
      With ``INPUT.AUGMENT.ENABLED``, items' ``"image"`` are randomly shifted by up to
      ``INPUT.AUGMENT.MAX_SHIFT`` pixels (:class:`~trainkit.data.augment.RandomShift`).
    - Batch: ``SOLVER.IMS_PER_BATCH`` is the total batch of one optimizer step over all processes; each
      process loads ``IMS_PER_BATCH / (world_size * SOLVER.GRAD_ACCUM_STEPS)`` samples per batch (a
      micro-batch when accumulating). With micro-batch ``B = IMS_PER_BATCH / GRAD_ACCUM_STEPS`` over all
      processes, rank ``r``'s batch ``j`` holds global positions ``j * B + r + world_size * m``, so the ranks'
      batches ``j`` together are exactly the single-process batch ``j``, and the ``GRAD_ACCUM_STEPS`` batches
      of one optimizer step hold the same samples as without accumulation.
    - Order: :class:`~trainkit.data.samplers.TrainingSampler` with seed ``cfg.SEED`` if ``>= 0``, else one
      random seed shared by all ranks (read it back with :func:`get_train_loader_seed`). Each sample's
      augmentation is seeded from ``(seed, global position)``, so order and augmentation do not depend on
      ``DATALOADER.NUM_WORKERS`` or on any RNG state, and a resumed run (:func:`set_train_loader_start`)
      sees the very same batches.
    - Workers: ``DATALOADER.NUM_WORKERS`` persistent workers, seeded by :func:`worker_init_fn`.

    Args:
        cfg: the config.
        dataset: use this map-style dataset instead of ``DATASETS.TRAIN``.
        collate_fn: turns a list of items into a batch; default :func:`collate` (a dict of stacked tensors).

    Returns:
        an infinite DataLoader; ``len()`` is undefined.

    Raises:
        ValueError: ``IMS_PER_BATCH`` is not divisible by the world size times ``GRAD_ACCUM_STEPS``, an unknown
            ``DATALOADER.SAMPLER_TRAIN``, or an empty ``DATASETS.TRAIN``.
    """
    world_size = comm.get_world_size()
    total_batch = cfg.SOLVER.IMS_PER_BATCH
    _check_train_loader_cfg(cfg, world_size)
    if dataset is None:
        dataset = _get_dataset(_names(cfg.DATASETS.TRAIN, "DATASETS.TRAIN"))
    if cfg.INPUT.AUGMENT.ENABLED:
        dataset = RandomShift(dataset, cfg.INPUT.AUGMENT.MAX_SHIFT)
    seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
    sampler = TrainingSampler(len(dataset), shuffle=True, seed=seed)
    per_process = total_batch // (world_size * _grad_accum_steps(cfg))
    batch_sampler = TrainingBatchSampler(sampler, per_process)
    num_workers = cfg.DATALOADER.NUM_WORKERS
    logger.info(
        "Training loader: %d samples, batches of %d per process x %d processes (%d per optimizer step), seed %d, "
        "%d workers", len(dataset), per_process, world_size, total_batch, seed, num_workers,
    )
    return _data_loader(
        PositionSeededDataset(dataset, seed),
        batch_sampler,
        num_workers,
        seed,
        collate_fn or collate,
        _pin_memory(cfg),
        persistent_workers=num_workers > 0,
    )


def set_train_loader_start(loader: DataLoader, start_iter: int) -> bool:
    """Makes a loader from :func:`build_train_loader` continue from iteration ``start_iter``.

    Takes effect at the loader's next ``iter()``: its first batch is then batch ``start_iter`` of the
    stream (global position ``start_iter * SOLVER.IMS_PER_BATCH``), exactly as an uninterrupted run would
    have loaded it. Iterators created before the call are unaffected.

    Args:
        loader: any data loader.
        start_iter: the iteration the next batch is for (``trainer.start_iter`` on resume). With gradient
            accumulation the loader counts micro-batches: pass ``start_iter * SOLVER.GRAD_ACCUM_STEPS``.

    Returns:
        True if the loader was recognised and moved; False (and nothing is done) otherwise.
    """
    batch_sampler = getattr(loader, "batch_sampler", None)
    if not isinstance(batch_sampler, TrainingBatchSampler):
        return False
    batch_sampler.set_start_iter(start_iter)
    return True


def get_train_loader_seed(loader: DataLoader) -> Optional[int]:
    """The seed of a loader from :func:`build_train_loader` (None for other loaders).

    Useful when ``SEED`` was negative and the seed was drawn: store it to resume the same order.
    """
    batch_sampler = getattr(loader, "batch_sampler", None)
    if not isinstance(batch_sampler, TrainingBatchSampler):
        return None
    return batch_sampler.sampler.seed


def build_test_loader(
    cfg,
    dataset_name: Union[str, Sequence[str]],
    batch_size: int = DEFAULT_TEST_BATCH_SIZE,
    *,
    num_workers: Optional[int] = None,
    collate_fn: Optional[Callable] = None,
) -> DataLoader:
    """A finite loader over ``dataset_name`` for inference: every sample exactly once across processes.

    Uses :class:`~trainkit.data.samplers.InferenceSampler` (contiguous shards, in order), no augmentation,
    and keeps the last, smaller batch. Unlike detectron2's default of 1 image per process, the default batch
    here is 128 samples per process: the built-in models are small classifiers.

    Args:
        cfg: the config (``DATALOADER.NUM_WORKERS``, ``MODEL.DEVICE`` for memory pinning, ``SEED``).
        dataset_name: a registered data set name, or several (concatenated).
        batch_size: samples per batch per process.
        num_workers: overrides ``DATALOADER.NUM_WORKERS``. Workers are not persistent (they would sit idle
            between evaluations).
        collate_fn: default :func:`collate`.
    """
    if batch_size <= 0:
        raise ValueError(f"build_test_loader(batch_size={batch_size}): batch_size must be positive.")
    dataset = _get_dataset(_names(dataset_name, "dataset_name"))
    sampler = InferenceSampler(len(dataset))
    batch_sampler = BatchSampler(sampler, batch_size, drop_last=False)
    return _data_loader(
        dataset,
        batch_sampler,
        cfg.DATALOADER.NUM_WORKERS if num_workers is None else num_workers,
        max(cfg.SEED, 0),
        collate_fn or collate,
        _pin_memory(cfg),
    )
