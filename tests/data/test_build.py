import itertools
import random
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainkit.config import get_cfg
from trainkit.data import (
    DatasetCatalog,
    DatasetFromTensors,
    build_test_loader,
    build_train_loader,
    collate,
    get_train_loader_seed,
    load_digits,
    set_train_loader_start,
    trivial_batch_collator,
)
from trainkit.data.samplers import TrainingSampler


def make_cfg(batch=8, workers=0, augment=False, seed=3, train=("digits_train",)):
    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.DATASETS.TRAIN = train
    cfg.SOLVER.IMS_PER_BATCH = batch
    cfg.DATALOADER.NUM_WORKERS = workers
    cfg.INPUT.AUGMENT.ENABLED = augment
    cfg.INPUT.AUGMENT.MAX_SHIFT = 2
    cfg.SEED = seed
    return cfg


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key


def index_dataset(n):
    return DatasetFromTensors(index=torch.arange(n))


# ---------------------------------------------------------------- collate


def test_collate_stacks_tensors_numbers_arrays_and_lists_the_rest():
    batch = [
        {"t": torch.tensor([1.0, 2.0]), "i": 3, "f": 0.5, "b": True, "a": np.array([1, 2]), "s": "x"},
        {"t": torch.tensor([3.0, 4.0]), "i": 4, "f": 1.5, "b": False, "a": np.array([3, 4]), "s": "y"},
    ]
    out = collate(batch)
    assert torch.equal(out["t"], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert out["i"].dtype == torch.int64 and out["i"].tolist() == [3, 4]
    assert out["f"].dtype == torch.float32 and out["f"].tolist() == [0.5, 1.5]
    assert out["b"].dtype == torch.bool and out["b"].tolist() == [True, False]
    assert torch.equal(out["a"], torch.tensor([[1, 2], [3, 4]]))
    assert out["s"] == ["x", "y"]


def test_collate_errors_name_the_problem():
    with pytest.raises(KeyError, match="item 1 of the batch has no key 'y'"):
        collate([{"x": 1, "y": 2}, {"x": 3}])
    with pytest.raises(TypeError, match="expects dict items, got tuple.*trivial_batch_collator"):
        collate([(1, 2)])
    assert trivial_batch_collator([(1, 2)]) == [(1, 2)]


# ---------------------------------------------------------------- train loader


def test_train_batches_follow_the_sampler_stream():
    cfg = make_cfg(batch=8, seed=11)
    batches = take(build_train_loader(cfg, dataset=index_dataset(20)), 5)
    stream = list(itertools.islice(iter(TrainingSampler(20, seed=11)), 40))
    assert [b["index"].tolist() for b in batches] == [stream[8 * j : 8 * j + 8] for j in range(5)]


def test_train_loader_yields_dicts_of_stacked_digits():
    batch = take(build_train_loader(make_cfg(batch=16)), 1)[0]
    assert batch["image"].shape == (16, 1, 8, 8) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (16,) and batch["label"].dtype == torch.int64


def test_several_train_sets_are_concatenated():
    DatasetCatalog.register("test_build_a", lambda: index_dataset(3))
    DatasetCatalog.register("test_build_b", lambda: DatasetFromTensors(index=torch.arange(100, 104)))
    try:
        cfg = make_cfg(batch=7, train=("test_build_a", "test_build_b"))
        batch = take(build_train_loader(cfg), 1)[0]
        assert sorted(batch["index"].tolist()) == [0, 1, 2, 100, 101, 102, 103]
    finally:
        DatasetCatalog.remove("test_build_a")
        DatasetCatalog.remove("test_build_b")


def test_augmentation_is_the_same_with_and_without_workers():
    expected = take(build_train_loader(make_cfg(augment=True, workers=0)), 6)
    got = take(build_train_loader(make_cfg(augment=True, workers=2)), 6)
    assert_batches_equal(got, expected)
    originals = load_digits("train")
    stream = list(itertools.islice(iter(TrainingSampler(len(originals), seed=3)), 48))
    unshifted = torch.stack([originals[i]["image"] for i in stream]).view(6, 8, 1, 8, 8)
    assert not all(torch.equal(b["image"], u) for b, u in zip(expected, unshifted))
    assert [b["label"].tolist() for b in expected] == [[originals[i]["label"].item() for i in stream[8 * j : 8 * j + 8]] for j in range(6)]


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_loader_continues_with_the_same_augmented_batches(workers):
    expected = take(build_train_loader(make_cfg(augment=True, workers=workers)), 8)
    loader = build_train_loader(make_cfg(augment=True, workers=workers))
    assert_batches_equal(take(loader, 2), expected[:2])
    assert set_train_loader_start(loader, 5) is True
    assert_batches_equal(take(loader, 3), expected[5:8])


def test_set_train_loader_start_ignores_foreign_loaders():
    loader = torch.utils.data.DataLoader(index_dataset(4), batch_size=2)
    assert set_train_loader_start(loader, 3) is False
    assert [b["index"].tolist() for b in loader] == [[0, 1], [2, 3]]
    assert get_train_loader_seed(loader) is None


@pytest.mark.parametrize("workers", [0, 2])
def test_loading_does_not_touch_the_global_rngs(workers):
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    states = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    loader = build_train_loader(make_cfg(augment=True, workers=workers))
    take(loader, 3)
    take(loader, 2)
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert random.getstate() == states[2]


def test_negative_seed_draws_one_and_reports_it():
    np.random.seed(42)
    loader = build_train_loader(make_cfg(seed=-1))
    assert get_train_loader_seed(loader) == int(np.random.RandomState(42).randint(2**31))


def test_bad_train_configs_are_clear_errors():
    with pytest.raises(ValueError, match=r"SOLVER.IMS_PER_BATCH \(0\).*multiple of the number of processes \(1\)"):
        build_train_loader(make_cfg(batch=0))
    with pytest.raises(ValueError, match="DATASETS.TRAIN is empty"):
        build_train_loader(make_cfg(train=()))
    cfg = make_cfg()
    cfg.DATALOADER.SAMPLER_TRAIN = "RepeatFactorTrainingSampler"
    with pytest.raises(ValueError, match="'RepeatFactorTrainingSampler'; only 'TrainingSampler'"):
        build_train_loader(cfg)
    cfg = make_cfg(workers=-1)
    with pytest.raises(ValueError, match="NUM_WORKERS is -1"):
        build_train_loader(cfg)


def test_augmenting_items_without_image_is_a_clear_error():
    loader = build_train_loader(make_cfg(augment=True), dataset=index_dataset(4))
    with pytest.raises(TypeError, match="needs dict items with an 'image' key; item . is dict with keys \\['index'\\]"):
        take(loader, 1)


# ---------------------------------------------------------------- test loader


@pytest.mark.parametrize("workers", [0, 2])
def test_test_loader_visits_each_sample_once_in_order_without_augmentation(workers):
    cfg = make_cfg(augment=True, workers=workers)
    batches = list(build_test_loader(cfg, "digits_test", batch_size=100))
    assert [len(b["label"]) for b in batches] == [100, 100, 100, 59]
    test = load_digits("test")
    assert torch.equal(torch.cat([b["image"] for b in batches]), torch.stack([test[i]["image"] for i in range(359)]))
    assert [len(b["label"]) for b in build_test_loader(cfg, "digits_test")] == [128, 128, 103]


def test_test_loader_rejects_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size=0"):
        build_test_loader(make_cfg(), "digits_test", batch_size=0)


# ---------------------------------------------------------------- two processes


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_process_worker(rank, world_size, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        loader = build_train_loader(make_cfg(batch=8, augment=True, seed=-1))
        batches = take(loader, 4)
        set_train_loader_start(loader, 2)
        resumed = take(loader, 1)
        test_batches = list(build_test_loader(make_cfg(), "digits_test", batch_size=50))
        try:
            build_train_loader(make_cfg(batch=5))
            error = ""
        except ValueError as e:
            error = str(e)
        result = dict(batches=batches, resumed=resumed, test=test_batches, error=error, seed=get_train_loader_seed(loader))
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_together_load_exactly_the_single_process_batches(tmp_path):
    # fork, not spawn: the children need no fresh interpreter and start in milliseconds instead of seconds.
    # fork, not spawn: the children need no fresh interpreter and start in milliseconds instead of seconds.
    mp.start_processes(_two_process_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["seed"] == ranks[1]["seed"]
    single = take(build_train_loader(make_cfg(batch=8, augment=True, seed=ranks[0]["seed"])), 4)
    for j in range(4):
        for key in ("image", "label"):
            parts = [ranks[r]["batches"][j][key] for r in range(2)]
            assert parts[0].shape[0] == 4
            # Rank r holds global positions j*8 + r + 2m: interleave the ranks to get the single-process batch.
            assert torch.equal(torch.stack(parts, dim=1).flatten(0, 1), single[j][key])
    for r in range(2):
        assert_batches_equal(ranks[r]["resumed"], ranks[r]["batches"][2:3])
    assert [len(b["label"]) for b in ranks[0]["test"]] == [50, 50, 50, 30]
    images = torch.cat([b["image"] for r in range(2) for b in ranks[r]["test"]])
    assert torch.equal(images, torch.cat([b["image"] for b in build_test_loader(make_cfg(), "digits_test")]))
    assert "SOLVER.IMS_PER_BATCH (5)" in ranks[0]["error"] and "number of processes (2)" in ranks[0]["error"]
