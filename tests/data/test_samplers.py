import itertools
import time

import numpy as np
import pytest
import torch

from trainkit.data import InferenceSampler, TrainingBatchSampler, TrainingSampler, derive_seed
from trainkit.data.samplers import SAMPLER_TAG, _splitmix64


def take(iterable, n):
    return list(itertools.islice(iterable, n))


def test_splitmix64_matches_the_reference_first_output():
    # SplitMix64 seeded with 0 first returns 0xE220A8397B1DCDAF (Vigna's reference implementation).
    assert _splitmix64(0) == 0xE220A8397B1DCDAF


def test_derive_seed_is_pure_63_bit_and_separates_keys():
    assert derive_seed(7, 0, 3) == derive_seed(7, 0, 3)
    assert derive_seed(7, 0, 3) == _splitmix64(_splitmix64(_splitmix64(7) ^ 0) ^ 3) >> 1
    seeds = {derive_seed(s, t, p) for s in range(3) for t in range(2) for p in range(50)}
    assert len(seeds) == 300
    assert all(0 <= s < 2**63 for s in seeds)


def test_each_epoch_is_the_documented_permutation():
    size, seed = 13, 5
    stream = take(iter(TrainingSampler(size, seed=seed)), 4 * size)
    for epoch in range(4):
        g = torch.Generator().manual_seed(derive_seed(seed, SAMPLER_TAG, epoch))
        assert stream[epoch * size : (epoch + 1) * size] == torch.randperm(size, generator=g).tolist()
    assert len({tuple(stream[e * size : (e + 1) * size]) for e in range(4)}) == 4


def test_without_shuffle_the_stream_cycles_in_order():
    assert take(iter(TrainingSampler(4, shuffle=False, seed=0)), 10) == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]


@pytest.mark.parametrize("start", [0, 1, 12, 13, 40, 1000])
def test_starting_at_any_position_continues_the_same_stream(start):
    full = take(iter(TrainingSampler(13, seed=9)), 1100)
    assert take(iter(TrainingSampler(13, seed=9, start=start)), 60) == full[start : start + 60]


def test_set_start_takes_effect_at_the_next_iter_only():
    sampler = TrainingSampler(10, seed=1)
    full = take(iter(TrainingSampler(10, seed=1)), 60)
    running = iter(sampler)
    assert take(running, 3) == full[:3]
    sampler.set_start(37)
    assert sampler.start == 37
    assert take(running, 3) == full[3:6]
    assert take(iter(sampler), 5) == full[37:42]


def test_iter_with_positions_pairs_positions_and_indices():
    sampler = TrainingSampler(7, seed=2, start=5)
    pairs = take(sampler.iter_with_positions(), 10)
    assert [p for p, _ in pairs] == list(range(5, 15))
    assert [i for _, i in pairs] == take(iter(TrainingSampler(7, seed=2)), 15)[5:]


def test_seed_none_uses_the_shared_random_seed():
    np.random.seed(123)
    expected = int(np.random.RandomState(123).randint(2**31))
    assert TrainingSampler(5).seed == expected


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError, match="size=0"):
        TrainingSampler(0, seed=0)
    with pytest.raises(ValueError, match=r"set_start\(-1\)"):
        TrainingSampler(3, seed=0).set_start(-1)
    with pytest.raises(ValueError, match="size=0"):
        InferenceSampler(0)


def test_stream_is_fast_one_permutation_per_epoch():
    # 300k items of a 100k-sample dataset: a permutation per item would take hours.
    sampler = TrainingSampler(100_000, seed=0)
    t0 = time.perf_counter()
    items = take(iter(sampler), 300_000)
    assert time.perf_counter() - t0 < 2.0
    assert sorted(items[:100_000]) == list(range(100_000))


def test_batch_sampler_groups_positions_and_starts_at_an_iteration():
    sampler = TrainingSampler(10, seed=4)
    full = take(sampler.iter_with_positions(), 40)
    batch_sampler = TrainingBatchSampler(sampler, 4)
    assert batch_sampler.total_batch_size == 4
    batches = take(iter(batch_sampler), 3)
    assert batches == [full[0:4], full[4:8], full[8:12]]
    batch_sampler.set_start_iter(7)
    assert sampler.start == 28
    assert next(iter(batch_sampler)) == full[28:32]


def test_inference_sampler_single_process_is_everything_in_order():
    sampler = InferenceSampler(11)
    assert list(sampler) == list(range(11))
    assert len(sampler) == 11


def test_inference_shards_are_contiguous_and_cover_each_index_once():
    shards = [InferenceSampler._get_local_indices(10, 3, r) for r in range(3)]
    assert [list(s) for s in shards] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    shards = [InferenceSampler._get_local_indices(2, 4, r) for r in range(4)]
    assert [list(s) for s in shards] == [[0], [1], [], []]
