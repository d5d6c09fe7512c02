"""SimpleTrainer's metric gather in a real 2-process gloo group.

CPU losses are read as floats in their own step by default; accelerator losses stay tensors until the gather.
Both must reach every rank's storage as the float32 mean over the ranks (data_time: the maximum), the same
numbers either way. Ranks whose models return different losses must get a clear error on every rank, not a
crashed or hung collective. Each launch() runs several trainings (spawning costs seconds); the workers write
what they saw and the assertions run here.
"""
import itertools
import json
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from trainkit.engine import SimpleTrainer
from trainkit.engine.launch import launch

ITERS = 11  # gathers at 4, 9 and 10 with gather_metric_period=5
TIMEOUT = timedelta(seconds=60)  # a hung collective fails the test in a minute, not in launch's default 30


class _TwoLosses(nn.Module):
    def __init__(self, seen):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 1)
        self.seen = seen  # this rank's own total loss per step, read here by the test itself

    def forward(self, batch):
        x, y = batch
        losses = {"loss_mse": ((self.linear(x) - y) ** 2).mean(), "loss_l1": 0.01 * self.linear.weight.abs().sum()}
        self.seen.append((losses["loss_mse"] + losses["loss_l1"]).item())
        return losses


def _train(out_dir: str) -> None:
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(rank)  # each rank sees other data
    data = [(torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)) for _ in range(ITERS)]
    seen = []
    model = _TwoLosses(seen)
    trainer = SimpleTrainer(model, itertools.cycle(data), torch.optim.SGD(model.parameters(), lr=0.05),
                            gather_metric_period=5)
    trainer.train(0, ITERS)
    results = {
        "own_total": seen,
        "stored": {name: trainer.storage.history(name).values() for name in ("total_loss", "loss_mse", "data_time")},
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


def test_every_rank_stores_the_float32_mean_over_ranks(tmp_path):
    launch(_train, num_gpus_per_machine=2, args=(str(tmp_path),), timeout=TIMEOUT)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[1]["stored"] == ranks[0]["stored"]  # every rank stores the same numbers (data_time: the slowest's)
    own = [ranks[r]["own_total"] for r in range(2)]
    assert own[0] != own[1]
    expected = [torch.tensor([a, b], dtype=torch.float32).mean().item() for a, b in zip(*own)]
    assert [v for v, _ in ranks[0]["stored"]["total_loss"]] == expected
    assert [it for _, it in ranks[0]["stored"]["total_loss"]] == list(range(ITERS))


class _RankDependentLosses(nn.Module):
    """Rank 1 returns an extra loss from iteration ``extra_from`` on, or its losses in another order."""

    def __init__(self, rank, extra_from=None, swap_order=False):
        super().__init__()
        self.linear = nn.Linear(4, 1)
        self.rank, self.extra_from, self.swap_order, self.calls = rank, extra_from, swap_order, 0

    def forward(self, batch):
        x, y = batch
        losses = {"loss_mse": ((self.linear(x) - y) ** 2).mean(), "loss_l1": 0.01 * self.linear.weight.abs().sum()}
        if self.rank == 1 and self.swap_order:
            losses = {"loss_l1": losses["loss_l1"], "loss_mse": losses["loss_mse"]}
        if self.rank == 1 and self.extra_from is not None and self.calls >= self.extra_from:
            losses["loss_extra"] = 0.0 * losses["loss_mse"]
        self.calls += 1
        return losses


def _train_with_disagreeing_ranks(out_dir: str) -> None:
    rank = dist.get_rank()
    data = [(torch.randn(8, 4), torch.randn(8, 1)) for _ in range(4)]
    results = {}
    for case, kwargs in {"extra loss from the start": dict(extra_from=0),
                         "extra loss from iteration 6": dict(extra_from=6),
                         "other order": dict(swap_order=True)}.items():
        model = _RankDependentLosses(rank, **kwargs)
        trainer = SimpleTrainer(model, itertools.cycle(data), torch.optim.SGD(model.parameters(), lr=0.05),
                                gather_metric_period=5)
        try:
            trainer.train(0, ITERS)
            results[case] = None
        except RuntimeError as e:
            results[case] = [str(e), trainer.iter]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


def test_ranks_returning_different_losses_get_a_clear_error_on_every_rank(tmp_path):
    launch(_train_with_disagreeing_ranks, num_gpus_per_machine=2, args=(str(tmp_path),), timeout=TIMEOUT)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for case in ("extra loss from the start", "extra loss from iteration 6", "other order"):
        for rank in ranks:
            assert rank[case] is not None, case
            message, _ = rank[case]
            assert message.startswith("The processes disagree on the losses to average: rank 0: ['loss_mse', "
                                      "'loss_l1', 'total_loss']"), message
            assert "same loss names, in the same order" in message
    # Rank 1 flushes alone when its losses change at iteration 6; the error comes at rank 0's next gather (9).
    assert [rank["extra loss from iteration 6"][1] for rank in ranks] == [9, 6]
    assert ("rank 1: ['loss_mse', 'loss_l1', 'total_loss'] for iterations 5..5, then ['loss_mse', 'loss_l1', "
            "'loss_extra'] from 6.") in ranks[0]["extra loss from iteration 6"][0]
    assert "rank 1: ['loss_l1', 'loss_mse', 'total_loss']" in ranks[0]["other order"][0]
