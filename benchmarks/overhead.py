"""How much does trainkit's loop cost over a hand-written PyTorch loop?

Runs, in one process and interleaved, a hand-written loop and trainkit's ``SimpleTrainer`` on the same model,
data and optimizer, and prints the ratio of their times (median over repeats; each repeat times both
variants back to back, so machine noise hits them alike).

* "hooks": SimpleTrainer with IterationTimer, LRScheduler and PeriodicWriter(JSONWriter, CommonMetricPrinter)
  against a hand-written loop that does the same work: steps an LR scheduler every iteration and, every 20
  iterations, reads the loss (``.item()``) and appends a JSON line.
* "bare": SimpleTrainer with no hooks against the plainest loop (forward, zero_grad, backward, step).

Workloads: "tiny" (``Linear(32, 32)``, batch 8: almost pure loop overhead) and "mlp" (784-512-512-10,
batch 64). A second measurement puts 1,000,000 iterations of 10 scalars into an EventStorage and reports the
growth of resident memory.

Usage: ``python benchmarks/overhead.py [--iters 2000] [--repeats 7] [--threads 1] [--skip-memory]``
"""
import argparse
import gc
import itertools
import json
import logging
import os
import statistics
import tempfile
import time
from typing import Callable, Dict, List

import torch
from torch import nn

from trainkit.engine import SimpleTrainer, hooks
from trainkit.utils.events import CommonMetricPrinter, EventStorage, JSONWriter


class Regressor(nn.Module):
    """Any network plus a loss; returns ``{"loss": ...}`` like a trainkit model."""

    def __init__(self, net: nn.Module, loss: Callable) -> None:
        super().__init__()
        self.net = net
        self.loss = loss

    def forward(self, batch):
        x, y = batch
        return {"loss": self.loss(self.net(x), y)}


def make_workload(name: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if name == "tiny":
        net = nn.Linear(32, 32)
        batches = [(torch.randn(8, 32, generator=g), torch.randn(8, 32, generator=g)) for _ in range(64)]
        loss = nn.functional.mse_loss
    else:
        net = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
        batches = [(torch.randn(64, 784, generator=g), torch.randint(0, 10, (64,), generator=g)) for _ in range(64)]
        loss = nn.functional.cross_entropy
    torch.manual_seed(seed)
    model = Regressor(net, loss)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1000, gamma=0.5)
    return model, itertools.cycle(batches), opt, sched


def hand_loop(model, data, opt, sched, iters: int, with_logging: bool, json_path: str) -> float:
    f = open(json_path, "a") if with_logging else None
    start = time.perf_counter()
    for it in range(iters):
        batch = next(data)
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if with_logging:
            sched.step()
            if (it + 1) % 20 == 0 or it == iters - 1:
                f.write(json.dumps({"iteration": it, "loss": loss.item(), "lr": opt.param_groups[0]["lr"]}) + "\n")
                f.flush()
    elapsed = time.perf_counter() - start
    if f:
        f.close()
    return elapsed


def trainkit_loop(model, data, opt, sched, iters: int, with_hooks: bool, json_path: str) -> float:
    trainer = SimpleTrainer(model, data, opt)
    if with_hooks:
        trainer.scheduler = sched
        writers = [JSONWriter(json_path), CommonMetricPrinter(iters)]
        trainer.register_hooks([hooks.IterationTimer(), hooks.LRScheduler(), hooks.PeriodicWriter(writers)])
    start = time.perf_counter()
    trainer.train(0, iters)
    return time.perf_counter() - start


def measure(workload: str, variant: str, iters: int, repeats: int, tmp: str) -> Dict[str, float]:
    """Hand-written loop (0) against trainkit (1), interleaved, in the same process."""
    with_extras = variant == "hooks"
    ratios: List[float] = []
    hand_times: List[float] = []
    tk_times: List[float] = []
    for r in range(repeats + 1):  # repeat 0 warms up both and is not counted
        order = [0, 1] if r % 2 == 0 else [1, 0]
        times = [0.0, 0.0]
        for which in order:
            model, data, opt, sched = make_workload(workload)
            path = os.path.join(tmp, f"{workload}_{variant}_{which}_{r}.json")
            gc.collect()
            if which == 0:
                times[0] = hand_loop(model, data, opt, sched, iters, with_extras, path)
            else:
                times[1] = trainkit_loop(model, data, opt, sched, iters, with_extras, path)
        if r > 0:
            hand_times.append(times[0])
            tk_times.append(times[1])
            ratios.append(times[1] / times[0])
    return {
        "hand_us_per_iter": statistics.median(hand_times) / iters * 1e6,
        "trainkit_us_per_iter": statistics.median(tk_times) / iters * 1e6,
        "ratio": statistics.median(ratios),
    }


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def storage_memory(iters: int = 1_000_000, names: int = 10) -> Dict[str, float]:
    keys = [f"metric_{i}" for i in range(names)]
    gc.collect()
    before = _rss_bytes()
    start = time.perf_counter()
    with EventStorage(0) as storage:
        for _ in range(iters):
            for k in keys:
                storage.put_scalar(k, 0.5)
            storage.step()
        gc.collect()
        after = _rss_bytes()
        exact = storage.history("metric_0").global_avg() == 0.5
    return {"iters": iters, "growth_mb": (after - before) / 2**20, "seconds": time.perf_counter() - start,
            "global_avg_exact": exact}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: least noise)")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)  # keep the console writer's lines out of the timings' output

    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.iters} iterations x {args.repeats} repeats")
    print(f"{'workload':<8} {'variant':<7} {'hand us/it':>11} {'trainkit us/it':>15} {'ratio':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for workload, variant in [("tiny", "bare"), ("tiny", "hooks"), ("mlp", "bare"), ("mlp", "hooks")]:
            r = measure(workload, variant, args.iters, args.repeats, tmp)
            print(f"{workload:<8} {variant:<7} {r['hand_us_per_iter']:>11.1f} {r['trainkit_us_per_iter']:>15.1f} "
                  f"{r['ratio']:>7.3f}")
    if not args.skip_memory:
        m = storage_memory()
        print(f"EventStorage: {m['iters']:,} iterations x 10 scalars: resident memory grew {m['growth_mb']:.1f} MB "
              f"in {m['seconds']:.1f} s (global_avg exact: {m['global_avg_exact']})")


if __name__ == "__main__":
    main()
