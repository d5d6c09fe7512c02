"""comm helpers: with a real 2-process gloo group on localhost, and as a world of one without torch.distributed.

All 2-process checks run in one launch() (spawning costs seconds): each worker writes what it saw to a JSON
file and the assertions run here, in the test process.
"""
import json
import os
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist

from trainkit.engine.launch import launch
from trainkit.utils import comm


def _collect_comm_results(out_dir: str) -> None:
    """Worker: exercises every helper and writes the results to ``<out_dir>/rank<r>.json``."""
    rank = dist.get_rank()
    results = {
        "world_size": comm.get_world_size(),
        "rank": comm.get_rank(),
        "local_rank": comm.get_local_rank(),
        "local_size": comm.get_local_size(),
        "is_main_process": comm.is_main_process(),
    }

    # synchronize is a barrier: rank 1 writes a file late, rank 0 must see it after the barrier.
    marker = os.path.join(out_dir, "written_before_barrier")
    if rank == 1:
        time.sleep(0.5)
        with open(marker, "w") as f:
            f.write("1")
    comm.synchronize()
    results["marker_seen_after_synchronize"] = os.path.exists(marker)

    results["all_gather"] = comm.all_gather({"rank": rank, "square": (rank + 3) ** 2})
    results["all_gather_ints"] = comm.all_gather_ints([rank, 7, 2**40 + rank])
    results["gather_to_0"] = comm.gather(f"from {rank}")
    results["gather_to_1"] = comm.gather([rank, rank], dst=1)
    # A group holding only global rank 1: gather's dst is a global rank, not a rank within the group.
    only_rank_1 = dist.new_group([1])
    if rank == 1:
        results["gather_in_subgroup"] = comm.gather("alone", dst=1, group=only_rank_1)

    np.random.seed(100 + rank)  # different RNG states: the seed must still agree
    results["shared_random_seed"] = comm.shared_random_seed()

    # Insertion order differs between the ranks on purpose.
    losses = {"loss": torch.tensor(rank + 1.0), "acc": torch.tensor(2.0 * rank)}
    if rank == 1:
        losses = {"acc": losses["acc"], "loss": losses["loss"]}
    averaged = comm.reduce_dict(losses)
    summed = comm.reduce_dict(losses, average=False)
    counts = comm.reduce_dict({"count": torch.tensor(rank, dtype=torch.int64)})
    results["reduce_average"] = [[k, v.item()] for k, v in averaged.items()]
    results["reduce_sum"] = [[k, v.item()] for k, v in summed.items()]
    results["reduce_int_average"] = [counts["count"].item(), str(counts["count"].dtype)]
    results["inputs_unchanged"] = [[k, v.item()] for k, v in losses.items()]

    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("comm")
    launch(_collect_comm_results, num_gpus_per_machine=2, args=(str(out_dir),))
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]


def test_ranks_and_world_size_in_two_processes(two_process_results):
    r0, r1 = two_process_results
    assert [r0["world_size"], r0["rank"], r0["local_rank"], r0["local_size"], r0["is_main_process"]] == [
        2, 0, 0, 2, True]
    assert [r1["world_size"], r1["rank"], r1["local_rank"], r1["local_size"], r1["is_main_process"]] == [
        2, 1, 1, 2, False]


def test_synchronize_waits_for_every_process(two_process_results):
    assert [r["marker_seen_after_synchronize"] for r in two_process_results] == [True, True]


def test_all_gather_ints_returns_every_rank_ints_in_rank_order(two_process_results):
    for r in two_process_results:
        assert r["all_gather_ints"] == [[0, 7, 2**40], [1, 7, 2**40 + 1]]


def test_all_gather_returns_every_rank_object_in_rank_order(two_process_results):
    expected = [{"rank": 0, "square": 9}, {"rank": 1, "square": 16}]
    assert [r["all_gather"] for r in two_process_results] == [expected, expected]


def test_gather_fills_only_the_destination(two_process_results):
    r0, r1 = two_process_results
    assert r0["gather_to_0"] == ["from 0", "from 1"] and r1["gather_to_0"] == []
    assert r0["gather_to_1"] == [] and r1["gather_to_1"] == [[0, 0], [1, 1]]


def test_gather_dst_is_a_global_rank_within_a_subgroup(two_process_results):
    assert two_process_results[1]["gather_in_subgroup"] == ["alone"]


def test_shared_random_seed_is_rank_0_draw(two_process_results):
    expected = int(np.random.RandomState(100).randint(2**31))
    assert [r["shared_random_seed"] for r in two_process_results] == [expected, expected]


def test_reduce_dict_averages_and_sums_exactly(two_process_results):
    r0, r1 = two_process_results
    assert r0["reduce_average"] == [["loss", 1.5], ["acc", 1.0]]
    assert r1["reduce_average"] == [["acc", 1.0], ["loss", 1.5]]  # each rank keeps its own key order
    assert r0["reduce_sum"] == [["loss", 3.0], ["acc", 2.0]]
    assert r1["reduce_sum"] == [["acc", 2.0], ["loss", 3.0]]
    assert r0["inputs_unchanged"] == [["loss", 1.0], ["acc", 0.0]]
    assert r1["inputs_unchanged"] == [["acc", 2.0], ["loss", 2.0]]


def test_reduce_dict_average_of_integers_is_floating_point(two_process_results):
    assert [r["reduce_int_average"] for r in two_process_results] == [[0.5, "torch.float32"]] * 2


@pytest.fixture
def no_process_group():
    assert not dist.is_initialized(), "another test left torch.distributed initialised"


def test_rank_helpers_without_distributed(no_process_group):
    assert comm.get_world_size() == 1
    assert comm.get_rank() == 0
    assert comm.get_local_rank() == 0
    assert comm.get_local_size() == 1
    assert comm.is_main_process() is True


def test_synchronize_without_distributed_is_a_no_op(no_process_group):
    assert comm.synchronize() is None


def test_all_gather_and_gather_without_distributed(no_process_group):
    obj = {"a": [1, 2]}
    assert comm.all_gather(obj) == [obj]
    assert comm.all_gather(obj)[0] is obj
    assert comm.gather(obj) == [obj]
    assert comm.all_gather_ints((3, 4)) == [[3, 4]]


def test_shared_random_seed_without_distributed_is_the_local_draw(no_process_group):
    np.random.seed(7)
    expected = int(np.random.RandomState(7).randint(2**31))
    assert comm.shared_random_seed() == expected


def test_reduce_dict_without_distributed_returns_the_input(no_process_group):
    losses = {"loss": torch.tensor(2.5), "acc": torch.tensor(0.25)}
    assert comm.reduce_dict(losses) is losses
    assert comm.reduce_dict(losses, average=False) is losses
    assert [(k, v.item()) for k, v in losses.items()] == [("loss", 2.5), ("acc", 0.25)]
