"""Gradient accumulation under DistributedDataParallel, in a real 2-process gloo group.

Each rank runs ``SimpleTrainer(grad_accum_steps=3)`` on a DDP model whose communication hook counts the
all-reduces it launches (and then runs the real one). Per optimizer step each gradient bucket is all-reduced
once: the first two micro-batches' backward passes run under ``no_sync``. The weights equal those of one
process stepping on the union of both ranks' micro-batches. The workers write what they saw; the assertions
run here.
"""
import json
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from tests.engine.accumulation_parts import TwoMeanLosses
from trainkit.engine import HookBase, SimpleTrainer
from trainkit.engine.launch import launch

K, MICRO, ITERS, WORLD = 3, 2, 4, 2
TIMEOUT = timedelta(seconds=60)


def _global_batches():
    """Step i, micro-batch j, rank r: ``_global_batches()[i][j][r]``, the same on every rank."""
    g = torch.Generator().manual_seed(3)
    return [[[(torch.randn(MICRO, 6, generator=g), torch.randn(MICRO, 2, generator=g)) for _ in range(WORLD)]
             for _ in range(K)] for _ in range(ITERS)]


def _counting_allreduce(calls, bucket):
    calls.append(bucket.index())
    return default_hooks.allreduce_hook(None, bucket)  # the real all-reduce (an average over the ranks)


class _AllReducesPerStep(HookBase):
    def __init__(self, calls):
        self.calls, self.per_step = calls, []

    def after_step(self):
        self.per_step.append(sorted(self.calls))
        self.calls.clear()


def _train(out_dir: str) -> None:
    rank = dist.get_rank()
    steps = _global_batches()
    mine = [micro[rank] for step in steps for micro in step]
    calls = []
    model = DistributedDataParallel(TwoMeanLosses())
    model.register_comm_hook(state=calls, hook=_counting_allreduce)
    counter = _AllReducesPerStep(calls)
    trainer = SimpleTrainer(model, iter(mine), torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                            gather_metric_period=2, grad_accum_steps=K)
    trainer.register_hooks([counter])
    trainer.train(0, ITERS)
    results = {
        "per_step": counter.per_step,
        "weights": [p.detach().tolist() for p in model.module.parameters()],
        "total_loss": trainer.storage.history("total_loss").values(),
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


def test_accumulating_under_ddp_all_reduces_each_bucket_once_per_step_and_matches_one_big_batch(tmp_path):
    launch(_train, num_gpus_per_machine=WORLD, args=(str(tmp_path),), timeout=TIMEOUT)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for r in range(WORLD):
        per_step = ranks[r]["per_step"]
        assert len(per_step) == ITERS
        # Every bucket exactly once per optimizer step; without no_sync each would come K times. (DDP may
        # regroup the buckets after the first step, so their number is read, not assumed.)
        for indices in per_step:
            assert indices and indices == sorted(set(indices)) and indices == list(range(len(indices)))

    # One process, the union of both ranks' micro-batches of a step as one batch.
    union = [tuple(torch.cat(parts) for parts in zip(*[b for micro in step for b in micro]))
             for step in _global_batches()]
    model = TwoMeanLosses()
    trainer = SimpleTrainer(model, iter(union), torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                            gather_metric_period=2)
    trainer.train(0, ITERS)
    for r in range(WORLD):
        for saved, p in zip(ranks[r]["weights"], model.parameters()):
            torch.testing.assert_close(torch.tensor(saved), p.detach(), rtol=1e-5, atol=1e-6)
    # The logged loss: the mean over micro-batches and ranks, i.e. the whole batch's loss.
    expected = [v for v, _ in trainer.storage.history("total_loss").values()]
    torch.testing.assert_close([v for v, _ in ranks[0]["total_loss"]], expected, rtol=1e-5, atol=1e-6)
