"""Data: named data sets, deterministic samplers, and config-driven loaders.

Importing this package registers the built-in data sets (``digits_train``, ``digits_test``,
``synthetic_train``, ``synthetic_test``); see :mod:`trainkit.data.datasets`.
"""
from .augment import RandomShift, shift_image
from .build import (
    build_test_loader,
    build_train_loader,
    collate,
    get_train_loader_seed,
    set_train_loader_start,
    trivial_batch_collator,
    worker_init_fn,
)
from .catalog import DatasetCatalog, Metadata, MetadataCatalog
from .common import ConcatDataset, DatasetFromTensors, PositionSeededDataset, get_item
from .datasets import load_digits, make_synthetic_classification, register_builtin_datasets
from .samplers import InferenceSampler, TrainingBatchSampler, TrainingSampler, derive_seed

__all__ = [
    "DatasetCatalog",
    "MetadataCatalog",
    "Metadata",
    "TrainingSampler",
    "TrainingBatchSampler",
    "InferenceSampler",
    "derive_seed",
    "build_train_loader",
    "build_test_loader",
    "set_train_loader_start",
    "get_train_loader_seed",
    "collate",
    "trivial_batch_collator",
    "worker_init_fn",
    "RandomShift",
    "shift_image",
    "get_item",
    "DatasetFromTensors",
    "ConcatDataset",
    "PositionSeededDataset",
    "load_digits",
    "make_synthetic_classification",
    "register_builtin_datasets",
]

register_builtin_datasets()
