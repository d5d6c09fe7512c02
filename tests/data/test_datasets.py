import sys

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits as sk_load_digits

from trainkit.data import DatasetCatalog, load_digits, make_synthetic_classification
from trainkit.data.datasets import _digits_tensors, digits_split_indices


FIRST_TEST_INDICES = [1, 2, 6, 10, 13]


def test_digits_split_is_a_fixed_stratified_partition_of_all_1797_images():
    train, test = DatasetCatalog.get("digits_train"), DatasetCatalog.get("digits_test")
    assert (len(train), len(test)) == (1438, 359)
    raw = sk_load_digits()
    train_idx, test_idx = digits_split_indices(torch.as_tensor(raw.target))
    # A partition: every image exactly once, each split in file order.
    assert sorted(train_idx.tolist() + test_idx.tolist()) == list(range(1797))
    assert train_idx.tolist() == sorted(train_idx.tolist()) and test_idx.tolist() == sorted(test_idx.tolist())
    for dataset, indices in ((train, train_idx), (test, test_idx)):
        for i in (0, 7, len(dataset) - 1):
            item = dataset[i]
            assert item["image"].shape == (1, 8, 8) and item["image"].dtype == torch.float32
            assert item["label"].dtype == torch.int64 and item["label"].dim() == 0
            assert np.array_equal(item["image"][0].numpy(), (raw.images[indices[i]] / 16).astype(np.float32))
            assert item["label"].item() == raw.target[indices[i]]
    # Stratified: 20% of each class (rounded) is in the test split.
    labels = torch.stack([test[i]["label"] for i in range(len(test))])
    per_class = np.bincount(raw.target)
    assert torch.bincount(labels).tolist() == [int(round(n * 0.2)) for n in per_class]
    # Fixed: the same indices every time (a regression guard on the documented split).
    assert test_idx[:5].tolist() == FIRST_TEST_INDICES


def test_digits_pixels_are_in_unit_range():
    images = torch.stack([load_digits("train")[i]["image"] for i in range(1438)])
    assert images.min().item() == 0.0 and images.max().item() == 1.0
    with pytest.raises(ValueError, match="split='val'"):
        load_digits("val")


def test_missing_scikit_learn_says_how_to_install(monkeypatch):
    _digits_tensors.cache_clear()
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    try:
        with pytest.raises(ImportError, match=r"pip install trainkit\[examples\]"):
            load_digits("train")
    finally:
        _digits_tensors.cache_clear()


def test_synthetic_sets_are_fixed_balanced_and_share_centres():
    train, test = DatasetCatalog.get("synthetic_train"), DatasetCatalog.get("synthetic_test")
    assert (len(train), len(test)) == (5000, 1000)
    assert train[3]["image"].shape == (1, 8, 8) and train[3]["label"].item() == 3
    assert torch.equal(DatasetCatalog.get("synthetic_train")[42]["image"], train[42]["image"])
    assert not torch.equal(train[0]["image"], test[0]["image"])
    train_x = torch.stack([train[i]["image"].flatten() for i in range(5000)])
    test_x = torch.stack([test[i]["image"].flatten() for i in range(1000)])
    train_means = train_x.view(500, 10, 64).mean(0)
    test_means = test_x.view(100, 10, 64).mean(0)
    # Same centres (within sampling noise, 3 / sqrt(100) = 0.3 per coordinate); different classes far apart.
    assert (train_means - test_means).abs().max().item() < 1.5
    assert torch.cdist(train_means, train_means).add(torch.eye(10) * 100).min().item() > 8


def test_make_synthetic_classification_shapes_and_errors():
    dataset = make_synthetic_classification(7, num_classes=3, image_shape=(2, 3), seed=1)
    assert [dataset[i]["label"].item() for i in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert dataset[0]["image"].shape == (2, 3)
    with pytest.raises(ValueError, match="num_samples=0"):
        make_synthetic_classification(0)
