"""SimpleTrainer's metric gather in a real 2-process gloo group, on both ways of recording losses.

CPU losses are read as floats in their own step by default; accelerator losses stay tensors until the gather.
Both must reach every rank's storage as the float32 mean over the ranks (data_time: the maximum), the same
numbers either way. One launch() runs both (spawning costs seconds); the workers write what they stored and
the assertions run here.
"""
import itertools
import json
import os

import torch
import torch.distributed as dist
from torch import nn

from trainkit.engine import SimpleTrainer
from trainkit.engine.launch import launch

ITERS = 11  # gathers at 4, 9 and 10 with gather_metric_period=5


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


def _train_both_ways(out_dir: str) -> None:
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(rank)  # each rank sees other data
    data = [(torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)) for _ in range(ITERS)]
    results = {}
    for read_at_once in (True, False):
        seen = []
        model = _TwoLosses(seen)
        trainer = SimpleTrainer(model, itertools.cycle(data), torch.optim.SGD(model.parameters(), lr=0.05),
                                gather_metric_period=5)
        trainer.read_cpu_losses_at_once = read_at_once
        trainer.train(0, ITERS)
        results[str(read_at_once)] = {
            "own_total": seen,
            "stored": {name: trainer.storage.history(name).values() for name in ("total_loss", "loss_mse", "data_time")},
        }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


def test_both_ways_store_the_float32_mean_over_ranks_on_every_rank(tmp_path):
    launch(_train_both_ways, num_gpus_per_machine=2, args=(str(tmp_path),))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for way in ("True", "False"):  # every rank stores the same numbers (data_time: the slowest rank's)
        assert ranks[1][way]["stored"] == ranks[0][way]["stored"]
    floats, tensors = ranks[0]["True"], ranks[0]["False"]
    for name in ("total_loss", "loss_mse"):  # the same losses either way
        assert floats["stored"][name] == tensors["stored"][name]
    own = [ranks[r]["True"]["own_total"] for r in range(2)]
    assert own[0] != own[1]
    expected = [torch.tensor([a, b], dtype=torch.float32).mean().item() for a, b in zip(*own)]
    assert [v for v, _ in floats["stored"]["total_loss"]] == expected
    assert [it for _, it in floats["stored"]["total_loss"]] == list(range(ITERS))
